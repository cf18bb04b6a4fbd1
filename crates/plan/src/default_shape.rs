//! The shape `tandem serve` and `tandem generate` run when the user names none (no shape
//! flags, no deployment file, no role): the fastest for one host.
//!
//! With a `tandem profile` of this model measured on this machine in the cache
//! ([`profile_cache_path`]; `tandem profile` writes it), [`from_profile`] prices every
//! one-host shape with the engine model (`engine_model::predict_decode`: colocated on every
//! core, and one attention replica + one expert worker on half the cores each with m = 1, 2,
//! 3) at 1, 8 and 32 decoding sequences and runs the best. Without one, [`default_shape`]
//! applies the rule that the model predicts on one host:
//!
//! On one host every worker shares the same cores and the same memory bus. A decode step
//! reads every weight once whichever worker holds it, so splitting attention and experts into
//! separate workers cannot read fewer bytes; it only leaves one side idle while the other
//! computes, which ping-pong micro-batches recover only in part (docs/pingpong.md). The
//! colocated shape instead runs every matmul on all the cores. Measured side by side on a
//! 2-core machine of this project's type (`tandem bench serve`, 128 in / 128 out, see
//! docs/weights.md): colocated with both cores beat 1 replica + 1 expert worker at m = 2 at 1,
//! 8 and 32 clients. Disaggregation pays where the roles get hardware of their own: that is
//! what a deployment file (from `tandem plan`) describes, and it always wins over both.

use crate::engine_model::{predict_decode, EngineShape};
use crate::model::ModelShape;
use crate::profile::Profile;
use std::path::{Path, PathBuf};
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
        micro_batches: tandem_core::default_micro_batches(0),
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

/// Decoding sequences the profile-driven choice prices every shape at (one client, a few,
/// many); a shape's score is its mean throughput relative to the best at each.
pub const LOAD_BATCHES: [u32; 3] = [1, 8, 32];

/// Mean context the choice prices (a 128-token prompt and 128 generated tokens).
pub const LOAD_CONTEXT: f64 = 192.0;

/// Where `tandem profile` caches the profile of the model at `model` for this machine, under
/// `cache_root` (`~/.cache/tandem` or `$TANDEM_HOME`): one file per model path.
pub fn profile_cache_path(cache_root: &Path, model: &Path) -> PathBuf {
    let full = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    let text = full.to_string_lossy();
    // FNV-1a: a stable name for the path (std's hasher is not stable across releases).
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let name: String = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cache_root
        .join("profiles")
        .join(format!("{name}-{hash:016x}.toml"))
}

/// The one-host shapes [`from_profile`] compares on `cores` cores.
pub fn one_host_candidates(cores: usize) -> Vec<Deployment> {
    let cores = cores.max(1) as u32;
    let mut v = vec![default_shape(cores as usize).deployment];
    if cores >= 2 {
        for m in 1..=3 {
            v.push(Deployment {
                attention_replicas: 1,
                expert_workers: 1,
                micro_batches: m,
                threads_per_worker: cores / 2,
                pin_cores: true,
                ..Deployment::default()
            });
        }
    }
    v
}

/// A short name of a one-host shape for the log.
fn describe(d: &Deployment) -> String {
    if d.expert_workers == 0 {
        format!("colocated x {} threads", d.threads_per_worker)
    } else {
        format!(
            "{} attention + {} expert worker{} x {} threads, m = {}",
            d.attention_replicas,
            d.expert_workers,
            if d.expert_workers == 1 { "" } else { "s" },
            d.threads_per_worker,
            d.micro_batches
        )
    }
}

/// The shape the engine model predicts fastest on this host from `profile` (measured on
/// `machine`, which must be this one: the `machine` line `tandem profile` writes), over
/// [`LOAD_BATCHES`]. Shapes whose threads the profile did not measure are skipped; an error
/// says why no choice could be made (the caller then falls back to [`default_shape`]).
pub fn from_profile(
    profile: &Profile,
    model: &ModelShape,
    cores: usize,
    machine: &str,
) -> Result<DefaultShape, String> {
    if profile.profile.machine != machine {
        return Err(format!(
            "the profile was measured on {:?}, this is {machine:?}",
            profile.profile.machine
        ));
    }
    let mut priced: Vec<(Deployment, Vec<f64>)> = Vec::new();
    for d in one_host_candidates(cores) {
        let tps: Result<Vec<f64>, _> = LOAD_BATCHES
            .iter()
            .map(|&b| {
                let s = EngineShape::from_deployment(&d, b, LOAD_CONTEXT);
                predict_decode(profile, model, &s).map(|p| p.tokens_per_s)
            })
            .collect();
        if let Ok(t) = tps {
            if t.iter().all(|x| x.is_finite() && *x > 0.0) {
                priced.push((d, t));
            }
        }
    }
    if priced.is_empty() {
        return Err(format!(
            "the profile prices none of the one-host shapes (threads measured: {:?})",
            profile.attention.iter().map(|a| a.tp).collect::<Vec<_>>()
        ));
    }
    let best: Vec<f64> = (0..LOAD_BATCHES.len())
        .map(|i| priced.iter().map(|(_, t)| t[i]).fold(0.0, f64::max))
        .collect();
    let score = |t: &[f64]| t.iter().zip(&best).map(|(x, b)| x / b).sum::<f64>() / t.len() as f64;
    let (i, _) = priced
        .iter()
        .enumerate()
        .map(|(i, (_, t))| (i, score(t)))
        .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
    let fmt = |t: &[f64]| {
        t.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    let others: Vec<String> = priced
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, (d, t))| format!("{} {}", describe(d), fmt(t)))
        .collect();
    let (d, t) = priced.swap_remove(i);
    let reason = format!(
        "one host, from this machine's profile: {} predicted fastest, {} tokens/s at {} {}",
        describe(&d),
        fmt(&t),
        LOAD_BATCHES.map(|b| b.to_string()).join("/"),
        format_args!(
            "sequences (others: {}). Pass --expert-workers/--micro-batches or --deployment \
             to choose a shape",
            others.join("; ")
        )
    );
    Ok(DefaultShape {
        deployment: d,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelCatalog;
    use crate::profile::{
        AttentionFit, ExpertFit, HeadFit, NetworkFit, Networks, Profile, ProfileHeader,
    };

    const MACHINE: &str = "Test CPU, 2 cores";

    /// A synthetic profile: per `(tp, x)`, attention `k1 b + k2`, head, experts `k3 t + k4_s`
    /// per hit expert, every stage's time divided by `x` (how well it uses `tp` threads).
    fn synthetic(threads: &[(u32, f64)], k4_s: f64) -> Profile {
        let net = NetworkFit {
            bandwidth_gbit_s: 50.0,
            util: vec![[1.0, 1.0]],
        };
        Profile {
            profile: ProfileHeader {
                format: 1,
                model: "mixtral".into(),
                attention_hw: "cpu".into(),
                expert_hw: "cpu".into(),
                source: "test".into(),
                moe_layers: 0,
                machine: MACHINE.into(),
                settings: String::new(),
            },
            attention: threads
                .iter()
                .map(|&(tp, x)| AttentionFit {
                    tp,
                    context_tokens: 192.0,
                    k1_s: 5e-4 / x,
                    k2_s: 1e-3 / x,
                    k_ctx_s: 0.0,
                })
                .collect(),
            head: threads
                .iter()
                .map(|&(tp, x)| HeadFit {
                    tp,
                    k1_s: 1e-4 / x,
                    k2_s: 5e-3 / x,
                })
                .collect(),
            expert: threads
                .iter()
                .map(|&(tp, x)| ExpertFit {
                    tp,
                    k3_s: 5e-4 / x,
                    k4_s: k4_s / x,
                    worker_overhead_s: 0.0,
                })
                .collect(),
            network: Networks {
                attention: net.clone(),
                expert: net,
                loopback_tcp: None,
            },
        }
    }

    fn mixtral() -> ModelShape {
        ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap()
    }

    fn shape_of(d: &Deployment) -> (u32, u32, u32, u32) {
        (
            d.attention_replicas,
            d.expert_workers,
            d.micro_batches,
            d.threads_per_worker,
        )
    }

    #[test]
    fn a_profile_where_threads_scale_picks_colocated() {
        // Two threads do every stage in half the time (memory-bound, as measured on the
        // 2-core machines): one colocated replica on both cores beats splitting them.
        let s = from_profile(
            &synthetic(&[(1, 1.0), (2, 2.0)], 1.5e-3),
            &mixtral(),
            2,
            MACHINE,
        )
        .unwrap();
        assert_eq!(shape_of(&s.deployment), (1, 0, 1, 2), "{}", s.reason);
        assert!(
            s.reason.contains("colocated x 2 threads predicted fastest"),
            "{}",
            s.reason
        );
        s.deployment.validate_shape().unwrap();
    }

    #[test]
    fn a_profile_where_threads_do_not_scale_picks_ping_pong() {
        // A second thread buys nothing, and the experts cost per token rather than per weight
        // read (small k4, so splitting a batch re-reads little): attention and experts on a
        // core each, overlapped by micro-batches, beat running them one after the other.
        let p = synthetic(&[(1, 1.0), (2, 1.0)], 1e-4);
        let s = from_profile(&p, &mixtral(), 2, MACHINE).unwrap();
        let d = &s.deployment;
        assert_eq!(
            (d.expert_workers, d.threads_per_worker),
            (1, 1),
            "{}",
            s.reason
        );
        assert!(d.micro_batches >= 2 && d.pin_cores, "{}", s.reason);
        d.validate_shape().unwrap();
    }

    #[test]
    fn a_profile_of_another_machine_or_threads_is_not_used() {
        let p = synthetic(&[(1, 1.0), (2, 2.0)], 1.5e-3);
        let e = from_profile(&p, &mixtral(), 2, "Other CPU, 2 cores").unwrap_err();
        assert!(e.contains("measured on"), "{e}");
        // Measured with 4 threads only: nothing on a 2-core host can be priced.
        let e = from_profile(&synthetic(&[(4, 4.0)], 1.5e-3), &mixtral(), 2, MACHINE).unwrap_err();
        assert!(e.contains("prices none"), "{e}");
        // Measured with 1 thread only: the colocated 2-thread shape cannot be priced, the
        // split one can.
        let s = from_profile(&synthetic(&[(1, 1.0)], 1.5e-3), &mixtral(), 2, MACHINE).unwrap();
        assert_eq!(s.deployment.threads_per_worker, 1, "{}", s.reason);
    }

    #[test]
    fn the_cache_path_is_stable_and_per_model() {
        let root = Path::new("/cache");
        let a = profile_cache_path(root, Path::new("/no/such/models/demo"));
        assert_eq!(
            a,
            profile_cache_path(root, Path::new("/no/such/models/demo"))
        );
        assert_ne!(
            a,
            profile_cache_path(root, Path::new("/no/such/other/demo"))
        );
        assert!(a.starts_with("/cache/profiles"));
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("demo-"));
    }

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
