//! Decode throughput of tandem's own engine (`tandem-engine`, in-process M2N) for one
//! explicit shape, priced by a measured [`Profile`]: what `tandem profile --calibrate` and
//! `tandem plan engine` compare against the real engine.
//!
//! The engine is not the paper's steady pipeline in three ways that matter at small scale:
//!
//! 1. **Lanes, not a fixed order.** A replica's micro-batches are independent lanes
//!    (`tandem-engine`'s `lanes.rs`): each runs its chain of layers, waits only for its own
//!    combines, and finishes with the head work (embedding, final norm, LM head, sampling)
//!    in parts, between which the other lanes' ready layers run; a lane starts its next
//!    iteration once worker 0 has decided it, within one iteration of the other lanes.
//!    [`predict_decode`] runs exactly that policy as a discrete-event simulation
//!    (`simulate_lanes`: the replica and each expert worker are one resource each, a worker
//!    serves dispatches as they arrive) for 32 iterations and prices a step as the
//!    steady-state period, measured over the middle half (after the fill, before the
//!    drain). Without head work it equals the paper's steady pipeline (tested against
//!    `sim::simulate`); with it, a lane's head overlaps the other lanes' layers, and with
//!    one micro-batch it adds in full.
//! 2. **Weights re-read per micro-batch.** Each micro-batch runs every expert it hits on its
//!    own, so the per-expert cost `k4` (mostly reading the expert's weights) is paid once per
//!    hit expert per micro-batch, and the LM head once per micro-batch.
//! 3. **Not every expert is hit.** With `t` routed tokens over `E` experts, top-`K`, uniform
//!    routing hits an expert with probability `1 - (1 - K/E)^t`; the expected cost of a worker
//!    holding `c` experts is `c (k3 t K / E + P(hit) k4) + overhead`.
//!
//! Dense (non-MoE) layers are priced as attention only (no dense-MLP fit in the
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
    /// One decode step (every micro-batch one token per sequence) in the steady state,
    /// seconds.
    pub step_s: f64,
    /// Output tokens per second over all replicas.
    pub tokens_per_s: f64,
    /// A micro-batch's layers, from its start to its last layer's output (colocated: every
    /// micro-batch's), seconds.
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
    /// Busy fraction of the busiest expert worker (0 colocated).
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

    let moe_of: Vec<bool> = (0..dense + moe).map(|l| l >= dense).collect();
    let lanes = LaneCosts {
        t_a: &t_a,
        t_e: &t_e,
        t_c: &t_c,
        head: &sizes
            .iter()
            .map(|&b| pm.head_s(tp, b as f64))
            .collect::<Vec<_>>(),
        moe_of: &moe_of,
    };
    let run = simulate_lanes(&lanes, SIM_ITERATIONS);
    let step = run.period_s;
    let big = (0..m).max_by_key(|&j| sizes[j]).unwrap_or(0);
    Ok(EnginePrediction {
        shape: *shape,
        step_s: step,
        tokens_per_s: n_a * shape.batch as f64 / step,
        layers_s: run.layers_s,
        head_s: lanes.head.iter().sum(),
        t_a_s: t_a[big],
        t_e_s: t_e[big].iter().cloned().fold(0.0, f64::max),
        t_c_s: t_c[big],
        experts_hit: hit[big],
        expert_utilisation: run.worker_busy_s.iter().cloned().fold(0.0, f64::max) / step,
    })
}

/// Iterations the lane simulation runs; the period is measured over the middle half.
const SIM_ITERATIONS: usize = 32;

/// What one replica's lanes cost, per lane `j` (a micro-batch) and worker `w`.
struct LaneCosts<'a> {
    /// Attention (or a dense layer) of one layer, on the replica.
    t_a: &'a [f64],
    /// `[j][w]`: one MoE layer's experts on worker `w`.
    t_e: &'a [Vec<f64>],
    /// One way over the link.
    t_c: &'a [f64],
    /// Embedding, final norm, LM head and sampling, on the replica.
    head: &'a [f64],
    /// Per layer: whether it is a MoE layer (its experts are remote).
    moe_of: &'a [bool],
}

/// What [`simulate_lanes`] found.
struct LaneRun {
    /// Steady-state time per iteration (every lane one step), seconds.
    period_s: f64,
    /// Mean time from a lane's start to its last layer's input, seconds.
    layers_s: f64,
    /// Busy time of each worker per iteration, seconds.
    worker_busy_s: Vec<f64>,
}

/// A lane as [`simulate_lanes`] tracks it.
#[derive(Clone, Copy)]
enum SimLane {
    Idle {
        next: usize,
    },
    Busy {
        it: usize,
        layer: usize,
        input_at: f64,
        started: f64,
    },
}

/// Runs the replica's lane policy (`tandem-engine`'s `lanes.rs`) as a discrete-event
/// simulation: the replica is one resource (its thread pool), each expert worker another.
/// The replica, when free, runs the layer of a lane whose combine is here (furthest behind
/// first), else starts an idle lane whose iteration is decided (worker 0's first micro-batch
/// of the last MoE layer; lanes stay within one iteration of each other), else finishes a
/// lane (the head in the engine's parts, other lanes' ready layers run between them), else
/// waits for the next combine. A worker serves dispatches in the order they arrive.
fn simulate_lanes(c: &LaneCosts<'_>, iterations: usize) -> LaneRun {
    const HEAD_PARTS: usize = 16;
    let m = c.t_a.len();
    let n_w = c.t_e.first().map_or(0, |v| v.len());
    let layers = c.moe_of.len();
    let last_moe = c.moe_of.iter().rposition(|&x| x);
    let mut lanes = vec![SimLane::Idle { next: 0 }; m];
    let mut e_free = vec![0.0f64; n_w];
    let mut e_busy = vec![0.0f64; n_w];
    // When each iteration's members are known on the replica.
    let mut decided = vec![f64::INFINITY; iterations + 1];
    decided[0] = 0.0;
    // When each iteration's last lane finished.
    let mut finished = vec![0.0f64; iterations];
    let mut chain = (0.0f64, 0usize);
    let mut now = 0.0f64;

    // Runs lane `j`'s next layer at `now`; returns the new `now`.
    let run_layer = |lanes: &mut [SimLane],
                     decided: &mut [f64],
                     chain: &mut (f64, usize),
                     (e_free, e_busy): (&mut [f64], &mut [f64]),
                     now: f64,
                     j: usize|
     -> f64 {
        let SimLane::Busy {
            it, layer, started, ..
        } = lanes[j]
        else {
            return now;
        };
        let done = now + c.t_a[j];
        let input_at = if c.moe_of[layer] {
            let arrive = done + c.t_c[j];
            let mut back = 0.0f64;
            for w in 0..n_w {
                let s = e_free[w].max(arrive);
                e_free[w] = s + c.t_e[j][w];
                e_busy[w] += c.t_e[j][w];
                back = back.max(e_free[w] + c.t_c[j]);
                if w == 0 && j == 0 && Some(layer) == last_moe && it + 1 < decided.len() {
                    decided[it + 1] = e_free[0] + c.t_c[j];
                }
            }
            back
        } else {
            done
        };
        if layer + 1 == layers {
            chain.0 += input_at - started;
            chain.1 += 1;
        }
        lanes[j] = SimLane::Busy {
            it,
            layer: layer + 1,
            input_at,
            started,
        };
        done
    };
    // The lane (other than `except`) whose next layer can run at `now`, furthest behind first.
    let ready = |lanes: &[SimLane], now: f64, except: Option<usize>, done: bool| {
        lanes
            .iter()
            .enumerate()
            .filter(|(k, _)| Some(*k) != except)
            .filter_map(|(k, l)| match *l {
                SimLane::Busy {
                    it,
                    layer,
                    input_at,
                    ..
                } if input_at <= now && (layer >= layers) == done => Some((it, layer, k)),
                _ => None,
            })
            .min()
            .map(|(_, _, k)| k)
    };
    let (mut busy_mark, mut busy_end): (Option<Vec<f64>>, Option<Vec<f64>>) = (None, None);
    loop {
        if let Some(j) = ready(&lanes, now, None, false) {
            now = run_layer(
                &mut lanes,
                &mut decided,
                &mut chain,
                (&mut e_free, &mut e_busy),
                now,
                j,
            );
            continue;
        }
        let floor = lanes
            .iter()
            .map(|l| match *l {
                SimLane::Idle { next } => next,
                SimLane::Busy { it, .. } => it + 1,
            })
            .min()
            .unwrap_or(0);
        if lanes
            .iter()
            .all(|l| matches!(*l, SimLane::Idle { next } if next >= iterations))
        {
            break;
        }
        let start = lanes.iter().position(|l| {
            matches!(*l, SimLane::Idle { next }
                if next == floor && next < iterations && decided[next] <= now)
        });
        if let Some(j) = start {
            lanes[j] = SimLane::Busy {
                it: floor,
                layer: 0,
                input_at: now,
                started: now,
            };
            continue;
        }
        if let Some(j) = ready(&lanes, now, None, true) {
            for _ in 0..HEAD_PARTS {
                now += c.head[j] / HEAD_PARTS as f64;
                while let Some(k) = ready(&lanes, now, Some(j), false) {
                    now = run_layer(
                        &mut lanes,
                        &mut decided,
                        &mut chain,
                        (&mut e_free, &mut e_busy),
                        now,
                        k,
                    );
                }
            }
            let SimLane::Busy { it, .. } = lanes[j] else {
                unreachable!("a lane being finished is busy")
            };
            finished[it] = finished[it].max(now);
            if j == 0 && it == iterations / 4 {
                busy_mark = Some(e_busy.clone());
            }
            if j == 0 && it == iterations - iterations / 4 {
                busy_end = Some(e_busy.clone());
            }
            lanes[j] = SimLane::Idle { next: it + 1 };
            continue;
        }
        // Wait for the next combine or decision.
        let next = lanes
            .iter()
            .filter_map(|l| match *l {
                SimLane::Busy { input_at, .. } if input_at > now => Some(input_at),
                SimLane::Idle { next } if next < iterations && decided[next] > now => {
                    Some(decided[next])
                }
                _ => None,
            })
            .fold(f64::INFINITY, f64::min);
        if !next.is_finite() {
            break;
        }
        now = next;
    }
    // Steady state: after the pipeline filled, before it drains (the last iterations finish
    // faster, with no next iteration competing for the replica).
    let (a, b) = (iterations / 4, iterations - iterations / 4);
    let period = (finished[b] - finished[a]) / (b - a) as f64;
    let worker_busy_s = match (&busy_mark, &busy_end) {
        (Some(m0), Some(m1)) => m1
            .iter()
            .zip(m0)
            .map(|(x, y)| (x - y) / (b - a) as f64)
            .collect(),
        _ => vec![0.0; n_w],
    };
    LaneRun {
        period_s: period,
        layers_s: if chain.1 > 0 {
            chain.0 / chain.1 as f64
        } else {
            0.0
        },
        worker_busy_s,
    }
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
    fn pipeline_matches_the_simulators_steady_state() {
        // Without head work and with a free link, the lanes settle into the paper's steady
        // pipeline: the period is the simulator's steady time between tokens.
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
            cfg.steps = 8;
            let rep = simulate(&pm, &mm, &cfg).unwrap();
            let rel = (pr.step_s - rep.tbt_mean_s).abs() / rep.tbt_mean_s;
            assert!(
                rel < 1e-6,
                "N={n_e} m={m}: {} vs {}",
                pr.step_s,
                rep.tbt_mean_s
            );
        }
    }

    #[test]
    fn other_lanes_layers_hide_part_of_the_head() {
        // Expert-bound (the worker's 56 layers x 2 micro-batches take 4.5 s, the replica's
        // 2.9 s): while one lane runs its LM head, the other lane's layers keep the worker
        // partly busy (it idles while the replica runs that lane's next attention), so the
        // head adds less than itself to the period. The fixed order of the old model paid it
        // in full after the last layer.
        let mm = model();
        let with = predict_decode(&profile(true), &mm, &shape(1, 2, 480)).unwrap();
        let without = predict_decode(&profile(false), &mm, &shape(1, 2, 480)).unwrap();
        let head = 2.0 * (5e-3 + 2e-4 * 240.0);
        assert!((with.head_s - head).abs() < 1e-12, "{}", with.head_s);
        let added = with.step_s - without.step_s;
        assert!(
            added > 0.0 && added < 0.9 * head,
            "the head added {added} s of its {head} s"
        );
        // Nothing beats the busier side: the worker's experts of every layer and lane.
        let worker = 56.0 * 2.0 * with.t_e_s;
        assert!(
            with.step_s >= worker * (1.0 - 1e-9),
            "{} < {worker}",
            with.step_s
        );
        assert!(
            with.expert_utilisation > 0.95,
            "{}",
            with.expert_utilisation
        );
        // One lane has nothing to overlap: the head adds in full.
        let with = predict_decode(&profile(true), &mm, &shape(1, 1, 480)).unwrap();
        let without = predict_decode(&profile(false), &mm, &shape(1, 1, 480)).unwrap();
        let head = 5e-3 + 2e-4 * 480.0;
        assert!((with.step_s - without.step_s - head).abs() < 1e-9);
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
