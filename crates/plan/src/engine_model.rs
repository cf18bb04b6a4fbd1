//! Decode throughput of tandem's own engine (`tandem-engine`, in-process M2N) for one
//! explicit shape, priced by a measured [`Profile`]: what `tandem profile --calibrate` and
//! `tandem plan engine` compare against the real engine.
//!
//! The engine is not the paper's steady pipeline in three ways that matter at small scale:
//!
//! 1. **Iteration boundaries.** This model prices every decode step from an empty pipeline
//!    and ends it with the head work (final norm, LM head, sampling) of each micro-batch on
//!    the replica while the expert workers idle: Eq. 5's fill-and-drain plus that tail, not
//!    Eq. 4's period. The engine does better than that: its micro-batches are independent
//!    lanes (`tandem-engine`'s `lanes.rs`) that start their next iteration while others
//!    finish, and other lanes' layers run between the parts of a lane's LM head; this model
//!    does not price that overlap, so it is pessimistic for m >= 2 by up to the head work
//!    per iteration (docs/pingpong.md measures it).
//! 2. **Weights re-read per micro-batch.** Each micro-batch runs every expert it hits on its
//!    own, so the per-expert cost `k4` (mostly reading the expert's weights) is paid once per
//!    hit expert per micro-batch, and the LM head once per micro-batch.
//! 3. **Not every expert is hit.** With `t` routed tokens over `E` experts, top-`K`, uniform
//!    routing hits an expert with probability `1 - (1 - K/E)^t`; the expected cost of a worker
//!    holding `c` experts is `c (k3 t K / E + P(hit) k4) + overhead`.
//!
//! The order priced here is a fixed one: for each layer, for each micro-batch, wait for that
//! micro-batch's combine of the previous layer, run attention, dispatch, and an expert worker
//! serves the slots in the same order. (The engine takes whichever lane's combine arrives
//! first and workers take slots as they complete; with equal micro-batches the two orders
//! coincide.) Dense (non-MoE) layers are priced as attention only (no dense-MLP fit in the
//! profile). Units: seconds, sequences, tokens.

use crate::error::{PlanError, Result};
use crate::model::ModelShape;
use crate::perf::StageModel;
use crate::profile::{Profile, ProfileModel};
use serde::Serialize;

/// One engine deployment running a decode batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EngineShape {
    /// `n_a`.
    pub attention_replicas: u32,
    /// `N`; 0 = colocated (each replica runs its own experts, `micro_batches` ignored).
    pub expert_workers: u32,
    /// `m`.
    pub micro_batches: u32,
    /// Threads of each worker's pool (the profile's `tp`).
    pub threads_per_worker: u32,
    /// Decoding sequences per replica (one token each per step).
    pub batch: u32,
    /// Mean context per sequence over the steps predicted, tokens. Step time is linear in the
    /// context, so the mean context gives the mean step time.
    pub context_tokens: f64,
}

impl EngineShape {
    /// The shape of deployment `d` running `batch` sequences per replica at a mean context
    /// of `context_tokens`.
    pub fn from_deployment(d: &tandem_core::Deployment, batch: u32, context_tokens: f64) -> Self {
        Self {
            attention_replicas: d.attention_replicas,
            expert_workers: d.expert_workers,
            micro_batches: d.micro_batches,
            threads_per_worker: d.threads_per_worker,
            batch,
            context_tokens,
        }
    }
}

/// What [`predict_decode`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnginePrediction {
    pub shape: EngineShape,
    /// One decode step, seconds.
    pub step_s: f64,
    /// Output tokens per second over all replicas.
    pub tokens_per_s: f64,
    /// When the last micro-batch's last combine is back on the replica, seconds into the step.
    pub layers_s: f64,
    /// Head work of the step (all micro-batches), seconds.
    pub head_s: f64,
    /// Attention stage of one layer for the largest micro-batch, seconds.
    pub t_a_s: f64,
    /// Busiest expert worker's time for one layer of the largest micro-batch (colocated: the
    /// replica's local experts), seconds.
    pub t_e_s: f64,
    /// One-way transport of the largest dispatch, seconds (0 colocated).
    pub t_c_s: f64,
    /// Expected experts hit per layer per micro-batch, over all workers.
    pub experts_hit: f64,
    /// Busy time of the busiest expert worker over the step (0 colocated).
    pub expert_utilisation: f64,
}

/// Micro-batch sizes of `batch` sequences split `m` ways as evenly as whole sequences allow.
pub fn split_batch(batch: u32, m: u32) -> Vec<u32> {
    let m = m.max(1).min(batch.max(1));
    (0..m)
        .map(|j| batch * (j + 1) / m - batch * j / m)
        .collect()
}

/// Expected seconds for a worker holding `held` of `experts` experts when `tokens` tokens are
/// routed top-`k` uniformly over all experts (see the module docs).
pub fn expected_worker_s(
    pm: &ProfileModel,
    tp: u32,
    held: u32,
    experts: u64,
    top_k: u64,
    tokens: f64,
) -> Result<(f64, f64)> {
    let f = pm.expert_fit(tp)?;
    let p = (top_k as f64 / experts as f64).min(1.0);
    let p_hit = if tokens > 0.0 {
        1.0 - (1.0 - p).powf(tokens)
    } else {
        0.0
    };
    let per_expert_tokens = tokens * p;
    let h = held as f64;
    let t = h * (f.k3_s * per_expert_tokens + p_hit * f.k4_s) + f.worker_overhead_s;
    Ok((t, h * p_hit))
}

/// Predicts one decode step of `shape` on the machine `profile` was measured on.
pub fn predict_decode(
    profile: &Profile,
    model: &ModelShape,
    shape: &EngineShape,
) -> Result<EnginePrediction> {
    if shape.attention_replicas == 0 || shape.batch == 0 || shape.threads_per_worker == 0 {
        return Err(PlanError::Invalid(
            "engine shape needs replicas, batch and threads >= 1".into(),
        ));
    }
    if !(shape.context_tokens.is_finite() && shape.context_tokens >= 0.0) {
        return Err(PlanError::Invalid("context must be >= 0".into()));
    }
    // Hidden states cross the in-process link as f32.
    let pm = ProfileModel::new(profile.clone(), shape.context_tokens, 4.0);
    let tp = shape.threads_per_worker;
    let ctx = shape.context_tokens;
    let e = model.num_experts;
    let k = model.top_k;
    let n_a = shape.attention_replicas as f64;
    let moe = model.moe_layers() as usize;
    let dense = model.num_dense_layers as usize;
    let h = model.hidden_size as f64;

    if shape.expert_workers == 0 {
        let b = shape.batch as f64;
        let t_a = pm.attention_layer_s(tp, b, ctx)?;
        let (t_e, hit) = expected_worker_s(&pm, tp, e as u32, e, k, b)?;
        let head = pm.head_s(tp, b);
        let layers_s = moe as f64 * (t_a + t_e) + dense as f64 * t_a;
        let step = layers_s + head;
        return Ok(EnginePrediction {
            shape: *shape,
            step_s: step,
            tokens_per_s: n_a * b / step,
            layers_s,
            head_s: head,
            t_a_s: t_a,
            t_e_s: t_e,
            t_c_s: 0.0,
            experts_hit: hit,
            expert_utilisation: 0.0,
        });
    }

    let n_w = shape.expert_workers as usize;
    let sizes = split_batch(shape.batch, shape.micro_batches);
    let m = sizes.len();
    // Experts per worker: contiguous ranges, as `ExpertPlacement::contiguous`.
    let held: Vec<u32> = (0..n_w)
        .map(|w| {
            (0..e as usize)
                .filter(|x| x * n_w / e as usize == w)
                .count() as u32
        })
        .collect();
    let t_a: Vec<f64> = sizes
        .iter()
        .map(|&b| pm.attention_layer_s(tp, b as f64, ctx))
        .collect::<Result<_>>()?;
    // Per micro-batch and worker: expected time and hit experts.
    let mut t_e = vec![vec![0.0; n_w]; m];
    let mut hit = vec![0.0; m];
    for (j, &b) in sizes.iter().enumerate() {
        for (w, &c) in held.iter().enumerate() {
            let (t, x) = expected_worker_s(&pm, tp, c, e, k, n_a * b as f64)?;
            t_e[j][w] = t;
            hit[j] += x;
        }
    }
    // One-way link time of a micro-batch's dispatch (each token's row goes once to each
    // worker that holds one of its experts; at most the whole micro-batch).
    let t_c: Vec<f64> = sizes
        .iter()
        .map(|&b| {
            let rows_per_worker = b as f64 * (1.0 - (1.0 - 1.0 / n_w as f64).powf(k as f64));
            pm.attention_link_s(rows_per_worker * h * 4.0)
                .max(pm.expert_link_s(rows_per_worker * h * 4.0))
        })
        .collect();

    let mut a_free = 0.0f64;
    let mut e_free = vec![0.0f64; n_w];
    let mut e_busy = vec![0.0f64; n_w];
    let mut ready = vec![0.0f64; m];
    for _ in 0..dense {
        a_free += t_a.iter().sum::<f64>();
    }
    for _ in 0..moe {
        for j in 0..m {
            let start = a_free.max(ready[j]);
            a_free = start + t_a[j];
            let arrive = a_free + t_c[j];
            let mut back = 0.0f64;
            for w in 0..n_w {
                let s = e_free[w].max(arrive);
                e_free[w] = s + t_e[j][w];
                e_busy[w] += t_e[j][w];
                back = back.max(e_free[w] + t_c[j]);
            }
            ready[j] = back;
        }
    }
    let layers_s = ready.iter().cloned().fold(a_free, f64::max);
    let mut head = 0.0;
    for (j, &b) in sizes.iter().enumerate() {
        let hj = pm.head_s(tp, b as f64);
        a_free = a_free.max(ready[j]) + hj;
        head += hj;
    }
    let step = a_free;
    let big = (0..m).max_by_key(|&j| sizes[j]).unwrap_or(0);
    Ok(EnginePrediction {
        shape: *shape,
        step_s: step,
        tokens_per_s: n_a * shape.batch as f64 / step,
        layers_s,
        head_s: head,
        t_a_s: t_a[big],
        t_e_s: t_e[big].iter().cloned().fold(0.0, f64::max),
        t_c_s: t_c[big],
        experts_hit: hit[big],
        expert_utilisation: e_busy.iter().cloned().fold(0.0, f64::max) / step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelCatalog;
    use crate::perf::PipelineShape;
    use crate::profile::{
        AttentionFit, ExpertFit, HeadFit, NetworkFit, Networks, Profile, ProfileHeader,
    };
    use crate::sim::{simulate, SimConfig};

    /// T_a = 1 ms + 0.1 ms/seq, T_e per hit expert 2 ms + 0.05 ms/token, head 5 ms + 0.2
    /// ms/seq, links at `gbit` Gbit/s.
    fn profile_at(head: bool, gbit: f64) -> Profile {
        let net = NetworkFit {
            bandwidth_gbit_s: gbit,
            util: vec![[1.0, 1.0]],
        };
        Profile {
            profile: ProfileHeader {
                format: 1,
                model: "mixtral".into(),
                attention_hw: "cpu".into(),
                expert_hw: "cpu".into(),
                source: "hand".into(),
                moe_layers: 0,
                machine: String::new(),
                settings: String::new(),
            },
            attention: vec![AttentionFit {
                tp: 1,
                context_tokens: 100.0,
                k1_s: 1e-4,
                k2_s: 1e-3,
                k_ctx_s: 1e-7,
            }],
            head: if head {
                vec![HeadFit {
                    tp: 1,
                    k1_s: 2e-4,
                    k2_s: 5e-3,
                }]
            } else {
                vec![]
            },
            expert: vec![ExpertFit {
                tp: 1,
                k3_s: 5e-5,
                k4_s: 2e-3,
                worker_overhead_s: 0.0,
            }],
            network: Networks {
                attention: net.clone(),
                expert: net,
                loopback_tcp: None,
            },
        }
    }

    fn profile(head: bool) -> Profile {
        profile_at(head, 8.0)
    }

    fn model() -> ModelShape {
        // 8 experts, top-2, 56 MoE layers.
        ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap()
    }

    fn shape(n_e: u32, m: u32, b: u32) -> EngineShape {
        EngineShape {
            attention_replicas: 1,
            expert_workers: n_e,
            micro_batches: m,
            threads_per_worker: 1,
            batch: b,
            context_tokens: 100.0,
        }
    }

    #[test]
    fn splits_like_the_engine() {
        assert_eq!(split_batch(16, 2), vec![8, 8]);
        assert_eq!(split_batch(16, 3), vec![5, 5, 6]);
        assert_eq!(split_batch(2, 4), vec![1, 1]);
    }

    #[test]
    fn expected_hits_follow_uniform_routing() {
        let pm = ProfileModel::new(profile(false), 100.0, 4.0);
        // One token hits exactly K = 2 of 8 experts.
        let (t, hit) = expected_worker_s(&pm, 1, 8, 8, 2, 1.0).unwrap();
        assert!((hit - 2.0).abs() < 1e-12, "{hit}");
        assert!((t - (2.0 * 2e-3 + 2.0 * 5e-5)).abs() < 1e-12, "{t}");
        // Many tokens hit every expert.
        let (_, hit) = expected_worker_s(&pm, 1, 8, 8, 2, 200.0).unwrap();
        assert!((hit - 8.0).abs() < 1e-9, "{hit}");
    }

    #[test]
    fn one_micro_batch_is_serial() {
        // m = 1, one worker: every layer is T_a + T_c + T_e + T_c, then the head.
        let p = profile(true);
        let mm = model();
        let b = 400; // every expert hit (1 - (3/4)^400 = 1 - 1e-50)
        let pr = predict_decode(&p, &mm, &shape(1, 1, b)).unwrap();
        let t_a = 1e-3 + 1e-4 * 400.0;
        let t_e = 8.0 * (2e-3 + 5e-5 * 400.0 * 2.0 / 8.0);
        // 400 rows of 6144 f32 at 1 GB/s.
        let t_c = 400.0 * 6144.0 * 4.0 / 1e9;
        let head = 5e-3 + 2e-4 * 400.0;
        let want = 56.0 * (t_a + t_e + 2.0 * t_c) + head;
        assert!((pr.step_s - want).abs() < 1e-9, "{} vs {want}", pr.step_s);
        assert!((pr.tokens_per_s - 400.0 / want).abs() < 1e-6);
    }

    #[test]
    fn pipeline_matches_the_simulator_from_empty() {
        // Without head work and with a free link the engine's step is the simulator's first
        // step from empty.
        let p = profile_at(false, 1e12);
        let mm = model();
        for (n_e, m) in [(1, 2), (2, 2), (4, 3), (8, 4)] {
            let b = 480;
            let pr = predict_decode(&p, &mm, &shape(n_e, m, b)).unwrap();
            let pm = ProfileModel::new(p.clone(), 100.0, 4.0);
            let mut cfg = SimConfig::new(PipelineShape {
                tp_a: 1,
                n_a: 1,
                tp_e: 1,
                experts_per_worker: 8 / n_e,
                m,
                b_a: (b / m) as f64,
            });
            cfg.steps = 1;
            let rep = simulate(&pm, &mm, &cfg).unwrap();
            let rel = (pr.step_s - rep.first_step_s).abs() / rep.first_step_s;
            assert!(
                rel < 1e-6,
                "N={n_e} m={m}: {} vs {}",
                pr.step_s,
                rep.first_step_s
            );
        }
    }

    #[test]
    fn micro_batches_re_read_the_experts() {
        // Expert-bound (k4 dominates): splitting the batch in two pays k4 twice per layer, so
        // m = 2 is slower than m = 1, as measured on the CPU.
        let p = profile(true);
        let mm = model();
        let one = predict_decode(&p, &mm, &shape(1, 1, 16)).unwrap();
        let two = predict_decode(&p, &mm, &shape(1, 2, 16)).unwrap();
        assert!(two.step_s > one.step_s, "{} vs {}", two.step_s, one.step_s);
        // With m = 2 each micro-batch of 8 hits 8 (1 - (3/4)^8) = 7.2 experts, not 8.
        assert!((two.experts_hit - 8.0 * (1.0 - 0.75f64.powi(8))).abs() < 1e-9);
        // Two heads of 8 sequences cost 5 ms more than one head of 16.
        assert!((two.head_s - one.head_s - 5e-3).abs() < 1e-12);
    }

    #[test]
    fn colocated_adds_stages_and_head() {
        let p = profile(true);
        let mm = model();
        let pr = predict_decode(&p, &mm, &shape(0, 3, 400)).unwrap();
        let t_a = 1e-3 + 1e-4 * 400.0;
        let t_e = 8.0 * (2e-3 + 5e-5 * 100.0);
        let want = 56.0 * (t_a + t_e) + 5e-3 + 2e-4 * 400.0;
        assert!((pr.step_s - want).abs() < 1e-9, "{} vs {want}", pr.step_s);
        assert_eq!(pr.t_c_s, 0.0);
        // The context term: 100 more tokens of context add k_ctx * b * 100 per layer.
        let mut s = shape(0, 1, 400);
        s.context_tokens = 200.0;
        let far = predict_decode(&p, &mm, &s).unwrap();
        assert!((far.step_s - pr.step_s - 56.0 * 1e-7 * 400.0 * 100.0).abs() < 1e-9);
        assert!(predict_decode(&p, &mm, &shape(0, 1, 0)).is_err());
    }
}
