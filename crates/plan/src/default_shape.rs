//! The shape `tandem serve` and `tandem generate` run when the user names none (no shape
//! flags, no deployment file, no role): the fastest for one host.
//!
//! On one host every worker shares the same cores and the same memory bus. A decode step
//! reads every weight once whichever worker holds it, so splitting attention and experts into
//! separate workers cannot read fewer bytes; it only leaves one side idle while the other
//! computes, which ping-pong micro-batches recover only in part (docs/pingpong.md). The
//! colocated shape instead runs every matmul on all the cores. Measured side by side on a
//! 2-core machine of this project's type (`tandem bench serve`, 128 in / 128 out, see
//! docs/weights.md): colocated with both cores beat 1 replica + 1 expert worker at m = 2 at 1,
//! 8 and 32 clients. Disaggregation pays where the roles get hardware of their own: that is
//! what a deployment file (from `tandem plan`) describes, and it always wins over this rule.
//!
//! What is not here yet: choosing from a measured `tandem profile` of the host (the planner's
//! engine model would price every shape); the rule above is what it predicts on one host.

use tandem_core::Deployment;

/// The default shape and why, for the log line at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct DefaultShape {
    pub deployment: Deployment,
    pub reason: String,
}

/// The default deployment for a host with `cores` cores.
pub fn default_shape(cores: usize) -> DefaultShape {
    let cores = cores.max(1);
    let deployment = Deployment {
        attention_replicas: 1,
        expert_workers: 0,
        micro_batches: 1,
        threads_per_worker: cores as u32,
        ..Deployment::default()
    };
    DefaultShape {
        deployment,
        reason: format!(
            "one host: colocated on all {cores} core{} (every matmul on every core; \
             disaggregated roles would share this host's cores and memory bus). Pass \
             --expert-workers/--micro-batches or --deployment to choose a shape",
            if cores == 1 { "" } else { "s" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_colocated_replica_on_every_core() {
        for cores in [1usize, 2, 16, 96] {
            let s = default_shape(cores);
            let d = &s.deployment;
            assert_eq!(
                (d.attention_replicas, d.expert_workers, d.micro_batches),
                (1, 0, 1)
            );
            assert_eq!(d.threads_per_worker as usize, cores);
            d.validate_shape().unwrap();
            assert!(
                s.reason.contains(&format!("all {cores} core")),
                "{}",
                s.reason
            );
        }
        // No cores reported: one thread, not zero.
        assert_eq!(default_shape(0).deployment.threads_per_worker, 1);
    }
}
