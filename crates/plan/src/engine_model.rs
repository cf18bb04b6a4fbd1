//! Decode throughput of tandem's own engine (`tandem-engine`, in-process M2N) for one
//! explicit shape, priced by a measured [`Profile`]: what `tandem profile --calibrate` and
//! `tandem plan engine` compare against the real engine.
//!
//! The engine is not the paper's steady pipeline in three ways that matter at small scale:
//!
//! 1. **Lanes, not a fixed order.** A replica's micro-batches are independent lanes
//!    (`tandem_core::lanes`, the policy `tandem-engine`'s replica runs): each runs its chain
//!    of layers, waits only for its own combines, and finishes with the head work
//!    (embedding, final norm, LM head, sampling) in parts, between which the other lanes'
//!    ready layers run; a lane starts its next iteration once worker 0 has decided it,
//!    within one iteration of the other lanes. [`predict_decode`] runs that same policy code
//!    (`next_action`, `interleave`, `transition`, the part counts) on modeled costs as a
//!    discrete-event simulation (`LaneSim`: the replica and each expert worker are one
//!    resource each, a worker serves dispatches as they arrive) for 32 iterations and prices
//!    a step as the steady-state period, measured over the middle half (after the fill,
//!    before the drain). Without head work it equals the paper's steady pipeline (tested against
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
use std::collections::BTreeMap;
use tandem_core::lanes::{
    self, Action, Event, Lane, LaneShape, Membership, Progress, LM_HEAD_PARTS, SAMPLE_PARTS,
};
use tandem_core::Members;

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
    let run = simulate_lanes(&lanes, SIM_ITERATIONS)?;
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

/// What the lane simulation did, in order (the tests replay it against the policy).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Traced {
    /// At `at`, [`lanes::next_action`] chose `action`.
    Chose { at: f64, action: Action },
    /// At `at`, while lane `busy` was being finished, [`lanes::interleave`] chose `lane`.
    Interleaved {
        at: f64,
        busy: usize,
        lane: Option<usize>,
    },
    /// Lane `lane` dispatched a MoE layer; every worker's combine is back at `back`.
    Sent { lane: usize, back: f64 },
    /// Iteration `iteration`'s members are known on the replica at `at`.
    Decided { iteration: u64, at: f64 },
    /// Lane `lane`'s head work is over: its step is finished.
    Finished { lane: usize },
}

/// The engine's lane policy (`tandem_core::lanes`, what `tandem-engine`'s replica runs) on
/// modeled costs: the lanes' states change only by [`lanes::transition`], the replica's
/// choices are [`lanes::next_action`] and [`lanes::interleave`], and time advances by the
/// costs. The replica is one resource (its thread pool), each expert worker another; a worker
/// serves dispatches in the order they arrive.
struct LaneSim<'a> {
    c: &'a LaneCosts<'a>,
    shape: LaneShape,
    iterations: usize,
    last_moe: Option<usize>,
    now: f64,
    lanes: Vec<Lane>,
    /// Per lane: when its input is here (every combine of its slot) and when its step started.
    input_at: Vec<f64>,
    started: Vec<f64>,
    /// Per worker: when it is next free, and its busy time so far.
    e_free: Vec<f64>,
    e_busy: Vec<f64>,
    /// When each iteration's members are known on the replica (worker 0's combine of the
    /// first micro-batch of the last MoE layer of the iteration before).
    decided_at: Vec<f64>,
    /// The iterations known by `now`, each with this replica (0) a member: the policy's view.
    decided: BTreeMap<u64, Members>,
    /// When each iteration's last lane finished.
    finished: Vec<f64>,
    /// Sum and count of the lanes' times from their start to their last layer's input.
    chain: (f64, usize),
    /// Worker busy times when lane 0 finished iterations `iterations / 4` and
    /// `iterations - iterations / 4`.
    busy_marks: [Option<Vec<f64>>; 2],
    trace: Vec<Traced>,
}

impl<'a> LaneSim<'a> {
    fn new(c: &'a LaneCosts<'a>, iterations: usize) -> Self {
        let m = c.t_a.len();
        let workers = c.t_e.first().map_or(0, |v| v.len());
        let mut decided_at = vec![f64::INFINITY; iterations + 1];
        decided_at[0] = 0.0;
        Self {
            c,
            shape: LaneShape {
                layers: c.moe_of.len(),
                workers,
            },
            iterations,
            last_moe: c.moe_of.iter().rposition(|&x| x),
            now: 0.0,
            lanes: vec![Lane::Idle { next_iteration: 0 }; m],
            input_at: vec![0.0; m],
            started: vec![0.0; m],
            e_free: vec![0.0; workers],
            e_busy: vec![0.0; workers],
            decided_at,
            decided: BTreeMap::new(),
            finished: vec![0.0; iterations],
            chain: (0.0, 0),
            busy_marks: [None, None],
            trace: Vec::new(),
        }
    }

    /// Lane `j`'s state after `event` (the policy's transition).
    fn apply(&mut self, j: usize, event: Event) -> Result<()> {
        self.lanes[j] = lanes::transition(self.lanes[j], event, self.shape)
            .map_err(|e| PlanError::Invalid(format!("lane simulation, lane {j}: {e}")))?;
        Ok(())
    }

    /// The lanes as the policy sees them at `now`: a waiting lane's combines are all here
    /// once its input time has come.
    fn progress(&mut self) -> Result<Vec<Progress>> {
        for j in 0..self.lanes.len() {
            if let Lane::Waiting {
                iteration,
                layer,
                combines,
            } = self.lanes[j]
            {
                if self.input_at[j] <= self.now {
                    for _ in combines..self.shape.workers {
                        self.apply(j, Event::Combine { iteration, layer })?;
                    }
                }
            }
        }
        Ok(self.lanes.iter().map(|l| l.progress(self.shape)).collect())
    }

    /// Runs the policy until every lane has run every iteration.
    fn run(&mut self) -> Result<()> {
        loop {
            let progress = self.progress()?;
            for (i, &at) in self.decided_at.iter().enumerate().take(self.iterations) {
                if at <= self.now {
                    self.decided.entry(i as u64).or_insert(Members::one(0));
                }
            }
            let view = Membership {
                me: 0,
                member: true,
                decided: &self.decided,
            };
            let action = lanes::next_action(&progress, self.shape.layers, view);
            let at = self.now;
            self.trace.push(Traced::Chose { at, action });
            match action {
                Action::RunLayer(j) => self.run_layer(j)?,
                Action::Start { lane, iteration } => {
                    self.started[lane] = self.now;
                    self.input_at[lane] = self.now;
                    self.apply(lane, Event::Start { iteration })?;
                }
                Action::Finish(j) => self.finish(j)?,
                Action::Wait => match self.next_event() {
                    next if next.is_finite() => self.now = next,
                    _ => return Ok(()),
                },
                // No iteration left for this replica.
                Action::Leave => return Ok(()),
            }
        }
    }

    /// Lane `j`'s next layer at `now` (settling its combine first): attention on the
    /// replica, then its experts on the workers (a MoE layer) or nothing more (dense).
    fn run_layer(&mut self, j: usize) -> Result<()> {
        if matches!(self.lanes[j], Lane::Waiting { .. }) {
            self.apply(j, Event::Settled)?;
        }
        let lane = self.lanes[j];
        let (Some(layer), Some(it)) = (lane.runnable_layer(), lane.iteration()) else {
            return Err(PlanError::Invalid(format!(
                "lane simulation: lane {j} ({lane:?}) has no layer to run"
            )));
        };
        let c = self.c;
        let done = self.now + c.t_a[j];
        if c.moe_of[layer] {
            let arrive = done + c.t_c[j];
            let mut back = 0.0f64;
            for w in 0..self.shape.workers {
                let s = self.e_free[w].max(arrive);
                self.e_free[w] = s + c.t_e[j][w];
                self.e_busy[w] += c.t_e[j][w];
                back = back.max(self.e_free[w] + c.t_c[j]);
                let next = it as usize + 1;
                if w == 0 && j == 0 && Some(layer) == self.last_moe && next < self.decided_at.len()
                {
                    self.decided_at[next] = self.e_free[0] + c.t_c[j];
                    let at = self.decided_at[next];
                    self.trace.push(Traced::Decided {
                        iteration: next as u64,
                        at,
                    });
                }
            }
            self.input_at[j] = back;
            self.trace.push(Traced::Sent { lane: j, back });
            self.apply(j, Event::Dispatched)?;
        } else {
            self.input_at[j] = done;
            self.apply(j, Event::RanHere)?;
        }
        if layer + 1 == self.shape.layers {
            self.chain.0 += self.input_at[j] - self.started[j];
            self.chain.1 += 1;
        }
        self.now = done;
        Ok(())
    }

    /// Lane `j`'s head work in the engine's parts, the other lanes' ready layers between
    /// them: [`LM_HEAD_PARTS`] parts of the head's cost, then [`SAMPLE_PARTS`] groups of
    /// sampling, which cost nothing more here (the profile's head fit includes sampling).
    fn finish(&mut self, j: usize) -> Result<()> {
        if matches!(self.lanes[j], Lane::Waiting { .. }) {
            self.apply(j, Event::Settled)?;
        }
        let it = self.lanes[j].iteration().unwrap_or(0) as usize;
        for part in 0..LM_HEAD_PARTS + SAMPLE_PARTS {
            if part < LM_HEAD_PARTS {
                self.now += self.c.head[j] / LM_HEAD_PARTS as f64;
            }
            self.serve_others(j)?;
        }
        self.finished[it] = self.finished[it].max(self.now);
        let marks = [self.iterations / 4, self.iterations - self.iterations / 4];
        for (mark, at) in self.busy_marks.iter_mut().zip(marks) {
            if j == 0 && it == at {
                *mark = Some(self.e_busy.clone());
            }
        }
        self.trace.push(Traced::Finished { lane: j });
        self.apply(j, Event::Finished)
    }

    /// While lane `busy` is being finished: the other lanes' layers that can run now.
    fn serve_others(&mut self, busy: usize) -> Result<()> {
        loop {
            let progress = self.progress()?;
            let lane = lanes::interleave(&progress, self.shape.layers, busy);
            let at = self.now;
            self.trace.push(Traced::Interleaved { at, busy, lane });
            match lane {
                Some(k) => self.run_layer(k)?,
                None => return Ok(()),
            }
        }
    }

    /// The next combine or decision after `now` (infinite if none).
    fn next_event(&self) -> f64 {
        (0..self.lanes.len())
            .filter_map(|j| match self.lanes[j] {
                Lane::Waiting { .. } if self.input_at[j] > self.now => Some(self.input_at[j]),
                Lane::Idle { next_iteration } => {
                    let at = self.decided_at.get(next_iteration as usize)?;
                    ((next_iteration as usize) < self.iterations && *at > self.now).then_some(*at)
                }
                _ => None,
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The steady state: after the pipeline filled, before it drains (the last iterations
    /// finish faster, with no next iteration competing for the replica).
    fn result(&self) -> LaneRun {
        let n = self.iterations;
        let (a, b) = (n / 4, n - n / 4);
        let period = (self.finished[b] - self.finished[a]) / (b - a) as f64;
        let worker_busy_s = match &self.busy_marks {
            [Some(m0), Some(m1)] => m1
                .iter()
                .zip(m0)
                .map(|(x, y)| (x - y) / (b - a) as f64)
                .collect(),
            _ => vec![0.0; self.shape.workers],
        };
        LaneRun {
            period_s: period,
            layers_s: if self.chain.1 > 0 {
                self.chain.0 / self.chain.1 as f64
            } else {
                0.0
            },
            worker_busy_s,
        }
    }
}

/// Runs the replica's lane policy as a discrete-event simulation ([`LaneSim`]) for
/// `iterations` iterations.
fn simulate_lanes(c: &LaneCosts<'_>, iterations: usize) -> Result<LaneRun> {
    let mut sim = LaneSim::new(c, iterations);
    sim.run()?;
    Ok(sim.result())
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

    /// Costs of `m` lanes on `workers` workers over `moe_of`'s layers, in whole numbers so
    /// that the times are exact.
    fn costs(m: usize, workers: usize, head: f64) -> (Vec<f64>, Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let t_a = (0..m).map(|j| 1.0 + j as f64).collect();
        let t_e = (0..m)
            .map(|j| (0..workers).map(|w| 2.0 + ((j + w) % 3) as f64).collect())
            .collect();
        let t_c = (0..m).map(|j| (j % 2) as f64).collect();
        (t_a, t_e, t_c, vec![head; m])
    }

    /// The engine's side of the agreement: `tandem-engine`'s replica loop (`run_lanes`,
    /// `finish_lane`, `serve_others`) in miniature, on lane states changed only by the
    /// policy's transitions and fed the planner's combine and decision times. At every
    /// decision the planner's simulation logged, the policy must choose what it chose; each
    /// finished lane must have offered the other lanes `LM_HEAD_PARTS + SAMPLE_PARTS` chances.
    fn replay(trace: &[Traced], m: usize, shape: LaneShape, moe_of: &[bool], iterations: usize) {
        let mut lanes = vec![Lane::Idle { next_iteration: 0 }; m];
        let mut back = vec![0.0f64; m];
        let mut decided_at: BTreeMap<u64, f64> = [(0, 0.0)].into();
        let mut chances = 0;
        // Lane `j`'s combines are here at `at`; its state as the engine sees it.
        let view = |lanes: &mut [Lane], back: &[f64], at: f64| -> Vec<Progress> {
            for (j, l) in lanes.iter_mut().enumerate() {
                if let Lane::Waiting {
                    iteration,
                    layer,
                    combines,
                } = *l
                {
                    if back[j] <= at {
                        for _ in combines..shape.workers {
                            let e = Event::Combine { iteration, layer };
                            *l = lanes::transition(*l, e, shape).unwrap();
                        }
                    }
                }
            }
            lanes.iter().map(|l| l.progress(shape)).collect()
        };
        // The engine's `run_layer`: settle, then run here or dispatch.
        let run = |lanes: &mut [Lane], k: usize| {
            if matches!(lanes[k], Lane::Waiting { .. }) {
                lanes[k] = lanes::transition(lanes[k], Event::Settled, shape).unwrap();
            }
            let l = lanes[k].runnable_layer().expect("a layer to run");
            let e = if moe_of[l] {
                Event::Dispatched
            } else {
                Event::RanHere
            };
            lanes[k] = lanes::transition(lanes[k], e, shape).unwrap();
        };
        for (n, t) in trace.iter().enumerate() {
            match *t {
                Traced::Chose { at, action } => {
                    let p = view(&mut lanes, &back, at);
                    let decided: BTreeMap<u64, Members> = (decided_at.iter())
                        .filter(|(i, t)| **i < iterations as u64 && **t <= at)
                        .map(|(i, _)| (*i, Members::one(7)))
                        .collect();
                    let m2n = Membership {
                        me: 7,
                        member: true,
                        decided: &decided,
                    };
                    let want = lanes::next_action(&p, shape.layers, m2n);
                    assert_eq!(want, action, "decision {n} at {at}");
                    match action {
                        Action::RunLayer(k) => run(&mut lanes, k),
                        Action::Start { lane, iteration } => {
                            let e = Event::Start { iteration };
                            lanes[lane] = lanes::transition(lanes[lane], e, shape).unwrap();
                        }
                        Action::Finish(k) => {
                            if matches!(lanes[k], Lane::Waiting { .. }) {
                                let e = Event::Settled;
                                lanes[k] = lanes::transition(lanes[k], e, shape).unwrap();
                            }
                            assert!(matches!(lanes[k], Lane::Done { .. }), "{:?}", lanes[k]);
                            chances = 0;
                        }
                        Action::Wait | Action::Leave => {}
                    }
                }
                Traced::Interleaved { at, busy, lane } => {
                    let p = view(&mut lanes, &back, at);
                    assert_eq!(
                        lanes::interleave(&p, shape.layers, busy),
                        lane,
                        "{n} at {at}"
                    );
                    match lane {
                        Some(k) => run(&mut lanes, k),
                        None => chances += 1,
                    }
                }
                Traced::Sent { lane, back: b } => back[lane] = b,
                Traced::Decided { iteration, at } => {
                    decided_at.insert(iteration, at);
                }
                Traced::Finished { lane } => {
                    assert_eq!(chances, LM_HEAD_PARTS + SAMPLE_PARTS);
                    lanes[lane] = lanes::transition(lanes[lane], Event::Finished, shape).unwrap();
                }
            }
        }
        assert_eq!(
            lanes,
            vec![
                Lane::Idle {
                    next_iteration: iterations as u64
                };
                m
            ],
            "every lane ran every iteration"
        );
    }

    #[test]
    fn the_engines_policy_and_the_planners_model_agree_on_a_schedule() {
        let mut saw = [false; 3];
        for (m, workers, dense, moe, head) in [
            (1, 1, 0, 3, 4.0),
            (2, 1, 0, 2, 0.0),
            (2, 2, 1, 3, 6.0),
            (3, 2, 2, 4, 9.0),
            (4, 3, 1, 2, 30.0),
        ] {
            let (t_a, t_e, t_c, head) = costs(m, workers, head);
            let moe_of: Vec<bool> = (0..dense + moe).map(|l| l >= dense).collect();
            let c = LaneCosts {
                t_a: &t_a,
                t_e: &t_e,
                t_c: &t_c,
                head: &head,
                moe_of: &moe_of,
            };
            let mut sim = LaneSim::new(&c, 8);
            sim.run().unwrap();
            let shape = LaneShape {
                layers: moe_of.len(),
                workers,
            };
            replay(&sim.trace, m, shape, &moe_of, 8);
            for t in &sim.trace {
                match t {
                    Traced::Chose {
                        action: Action::Wait,
                        ..
                    } => saw[0] = true,
                    Traced::Chose {
                        action: Action::Finish(_),
                        ..
                    } => saw[1] = true,
                    Traced::Interleaved { lane: Some(_), .. } => saw[2] = true,
                    _ => {}
                }
            }
        }
        // The schedules exercised what the policy decides between: waits, finishes, and
        // layers run between the parts of a head.
        assert_eq!(saw, [true; 3]);
    }

    #[test]
    fn a_two_lane_schedule_by_hand() {
        // One MoE layer, one worker; attention 1 s, experts 1 s, free links, no head.
        let (t_a, t_e, t_c, head) = (vec![1.0; 2], vec![vec![1.0]; 2], vec![0.0; 2], vec![0.0; 2]);
        let moe_of = [true];
        let c = LaneCosts {
            t_a: &t_a,
            t_e: &t_e,
            t_c: &t_c,
            head: &head,
            moe_of: &moe_of,
        };
        let mut sim = LaneSim::new(&c, 2);
        sim.run().unwrap();
        let chose: Vec<(f64, Action)> = (sim.trace.iter())
            .filter_map(|t| match *t {
                Traced::Chose { at, action } => Some((at, action)),
                _ => None,
            })
            .collect();
        use Action::{Finish, Leave, RunLayer, Start, Wait};
        let start = |lane, iteration| Start { lane, iteration };
        assert_eq!(
            chose,
            [
                // Lane 0 starts and dispatches (back at 2; iteration 1 decided then).
                (0.0, start(0, 0)),
                (0.0, RunLayer(0)),
                // Lane 1 starts while lane 0's experts run (its combine back at 3).
                (1.0, start(1, 0)),
                (1.0, RunLayer(1)),
                // Lane 0's combine is here and no lane is idle: lane 0 is finished, then
                // starts iteration 1 (decided at 2) before anything else.
                (2.0, Finish(0)),
                (2.0, start(0, 1)),
                (2.0, RunLayer(0)),
                (3.0, Finish(1)),
                (3.0, start(1, 1)),
                (3.0, RunLayer(1)),
                (4.0, Finish(0)),
                // Lane 0 may not start iteration 2 (the last was 1): wait for lane 1.
                (4.0, Wait),
                (5.0, Finish(1)),
                (5.0, Leave),
            ]
        );
    }
}
