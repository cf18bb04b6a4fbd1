//! Discrete-event simulation of the ping-pong pipeline.
//!
//! Nodes: `n_a` attention replicas and `N` expert workers, each serving its tasks in the
//! engine's fixed order `(step, layer, micro-batch)`; each node's NIC sends its messages in
//! the same order. A task starts when its node is free and its inputs have arrived:
//! - attention `(s, l, j)` on replica `r`: needs the combine of `(s, l-1, j)` from every worker
//!   (for `l = 0`: the last layer of step `s-1`);
//! - expert `(s, l, j)` on worker `w`: needs the dispatch of `(s, l, j)` from every replica.
//!
//! Because every node serves a fixed order, event times follow from one pass over the tasks
//! in that order (each event depends only on events earlier in it); no event queue is needed
//! and the result is exact. With balanced routing, no jitter and no stragglers, the first step
//! equals Eq. 5 whenever constraint 3 holds (tested).
//!
//! Imbalance: per `(step, layer, micro-batch, replica)` the `b_a K` routed tokens are drawn
//! from per-layer expert probabilities (Zipf with a skew, or a recorded routing trace), with
//! probabilities capped at `1/K` since a token picks `K` distinct experts. A message takes
//! `max(sender time, receiver time)` (Eq. 6) times a log-normal jitter; a compute task is
//! slowed by `straggler_factor` with probability `straggler_prob`.
//!
//! Units: seconds; tokens.

use crate::closed_form::{self, StageTimes};
use crate::error::{read_file, PlanError, Result};
use crate::model::ModelShape;
use crate::perf::{
    bytes_per_expert_gpu, dispatch_bytes_per_attention_gpu, stage_times, PipelineShape, StageModel,
};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Recorded routing: tokens routed to each expert, per MoE layer (layers cycle if fewer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingTrace {
    pub num_experts: usize,
    /// `layers[l][e]`: tokens (or any non-negative weight) routed to expert `e` in layer `l`.
    pub layers: Vec<Vec<f64>>,
}

impl RoutingTrace {
    /// Reads the JSON form `{"num_experts": E, "layers": [[...E counts...], ...]}`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_file(path)?;
        let t: RoutingTrace = serde_json::from_str(&text).map_err(|e| PlanError::Parse {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        t.validate(&path.display().to_string())?;
        Ok(t)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |msg: String| {
            Err(PlanError::Parse {
                path: origin.to_string(),
                msg,
            })
        };
        if self.layers.is_empty() {
            return bad("routing trace has no layers".into());
        }
        for (l, row) in self.layers.iter().enumerate() {
            if row.len() != self.num_experts {
                return bad(format!(
                    "layer {l} lists {} experts, num_experts is {}",
                    row.len(),
                    self.num_experts
                ));
            }
            if row.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || row.iter().sum::<f64>() <= 0.0 {
                return bad(format!(
                    "layer {l}: counts must be non-negative with a positive sum"
                ));
            }
        }
        Ok(())
    }
}

/// How tokens spread over experts.
#[derive(Debug, Clone, PartialEq)]
pub enum Imbalance {
    /// Exactly `b_e` tokens per expert (the closed form's assumption).
    None,
    /// Expert popularity `∝ 1 / rank^skew`, ranks shuffled per layer; 0 = uniform but sampled.
    Zipf {
        skew: f64,
    },
    Trace(RoutingTrace),
}

/// A simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub shape: PipelineShape,
    /// `workers[e]`: workers holding expert `e` (tokens split evenly between copies); None =
    /// contiguous, `experts_per_worker` each.
    pub placement: Option<Vec<Vec<u32>>>,
    /// Decode steps simulated (>= 1). Steady-state numbers use steps after the first.
    pub steps: u32,
    pub imbalance: Imbalance,
    /// Coefficient of variation of each message's time (log-normal, mean 1).
    pub jitter_cv: f64,
    pub straggler_prob: f64,
    pub straggler_factor: f64,
    pub seed: u64,
    /// Record the timeline of this step.
    pub timeline_step: Option<u32>,
}

impl SimConfig {
    pub fn new(shape: PipelineShape) -> Self {
        Self {
            shape,
            placement: None,
            steps: 6,
            imbalance: Imbalance::None,
            jitter_cv: 0.0,
            straggler_prob: 0.0,
            straggler_factor: 1.0,
            seed: 1,
            timeline_step: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    Attention,
    Expert,
    Dispatch,
    Combine,
}

/// One busy interval on one timeline row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub row: usize,
    pub start_s: f64,
    pub end_s: f64,
    pub layer: u32,
    pub micro_batch: u32,
    pub kind: SpanKind,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeUtil {
    pub name: String,
    pub busy_s: f64,
    /// Busy time over the simulated span.
    pub utilisation: f64,
}

/// What a simulation found, next to the closed form.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub steps: u32,
    pub global_batch: f64,
    /// Balanced stage times (the closed form's inputs).
    pub closed: StageTimes,
    /// Eq. 5: one step from an empty pipeline, seconds.
    pub eq5_step_s: f64,
    /// Simulated first step, seconds.
    pub first_step_s: f64,
    /// `(first_step - eq5) / eq5`.
    pub eq5_rel_err: f64,
    /// Closed-form steady TBT (Eq. 4's upper bound, or the round trip when not fed), s.
    pub closed_tbt_s: f64,
    pub tbt_mean_s: f64,
    pub tbt_p99_s: f64,
    pub closed_tokens_per_s: f64,
    /// Steady-state simulated throughput, tokens/s.
    pub tokens_per_s: f64,
    pub attention_util: Vec<NodeUtil>,
    pub expert_util: Vec<NodeUtil>,
    /// Mean over tasks of (max worker tokens / mean worker tokens).
    pub worker_load_max_over_mean: f64,
    /// Where and why the closed form and the simulation disagree.
    pub findings: Vec<String>,
    pub timeline_rows: Vec<String>,
    pub timeline: Vec<Span>,
}

/// Caps probabilities at `cap` and renormalises (water-filling), so that no expert expects
/// more tokens than a top-k router can give it.
fn cap_probs(p: &mut [f64], cap: f64) {
    for _ in 0..p.len() {
        let over: f64 = p.iter().filter(|x| **x > cap).map(|x| x - cap).sum();
        if over <= 1e-15 {
            break;
        }
        let free: f64 = p.iter().filter(|x| **x < cap).sum();
        if free <= 0.0 {
            break;
        }
        for x in p.iter_mut() {
            if *x > cap {
                *x = cap;
            } else {
                *x += over * *x / free;
            }
        }
    }
}

fn layer_probs(
    imb: &Imbalance,
    experts: usize,
    layers: usize,
    top_k: f64,
    rng: &mut Rng,
) -> Vec<Vec<f64>> {
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut p: Vec<f64> = match imb {
            Imbalance::None => vec![1.0; experts],
            Imbalance::Zipf { skew } => {
                let mut ranks: Vec<usize> = (0..experts).collect();
                for i in (1..experts).rev() {
                    let k = rng.below(i + 1);
                    ranks.swap(i, k);
                }
                ranks
                    .iter()
                    .map(|&r| 1.0 / ((r + 1) as f64).powf(*skew))
                    .collect()
            }
            Imbalance::Trace(t) => t.layers[l % t.layers.len()].clone(),
        };
        let s: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= s);
        cap_probs(&mut p, 1.0 / top_k);
        out.push(p);
    }
    out
}

/// Multinomial(n, p) by conditional binomials.
fn multinomial(rng: &mut Rng, n: u64, p: &[f64], out: &mut [f64]) {
    let mut left = n;
    let mut mass = 1.0;
    for (i, &pi) in p.iter().enumerate() {
        if i + 1 == p.len() {
            out[i] = left as f64;
            break;
        }
        let q = if mass > 0.0 {
            (pi / mass).min(1.0)
        } else {
            0.0
        };
        let k = rng.binomial(left, q);
        out[i] = k as f64;
        left -= k;
        mass -= pi;
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Refuses a shape, step count, noise or routing trace the simulation cannot run.
fn check_config(model: &ModelShape, cfg: &SimConfig) -> Result<()> {
    let p = cfg.shape;
    if p.n_a == 0
        || p.m == 0
        || p.tp_a == 0
        || p.tp_e == 0
        || p.experts_per_worker == 0
        || p.b_a.is_nan()
        || p.b_a <= 0.0
    {
        return Err(PlanError::Invalid(
            "simulation shape needs positive counts and batch".into(),
        ));
    }
    if cfg.steps == 0 {
        return Err(PlanError::Invalid("simulate at least one step".into()));
    }
    if !(cfg.jitter_cv >= 0.0
        && (0.0..=1.0).contains(&cfg.straggler_prob)
        && cfg.straggler_factor >= 1.0)
    {
        return Err(PlanError::Invalid(
            "jitter must be >= 0, straggler probability in [0, 1], straggler factor >= 1".into(),
        ));
    }
    let e_count = model.num_experts as usize;
    if let Imbalance::Trace(t) = &cfg.imbalance {
        t.validate("routing trace")?;
        if t.num_experts != e_count {
            return Err(PlanError::Invalid(format!(
                "routing trace has {} experts, the model {}",
                t.num_experts, e_count
            )));
        }
    }
    Ok(())
}

/// The workers of each expert: `cfg.placement`, else contiguous ranges.
fn placement_of(model: &ModelShape, cfg: &SimConfig) -> Result<Vec<Vec<u32>>> {
    let (p, e_count) = (cfg.shape, model.num_experts as usize);
    let placement: Vec<Vec<u32>> = match &cfg.placement {
        Some(pl) => pl.clone(),
        None => {
            let workers = p.expert_workers(model) as usize;
            (0..e_count)
                .map(|e| vec![(e * workers / e_count) as u32])
                .collect()
        }
    };
    if placement.len() != e_count || placement.iter().any(|w| w.is_empty()) {
        return Err(PlanError::Invalid(
            "placement must list at least one worker for every expert".into(),
        ));
    }
    Ok(placement)
}

/// What stays fixed over one simulation.
struct Ctx<'a> {
    sm: &'a dyn StageModel,
    model: &'a ModelShape,
    cfg: &'a SimConfig,
    p: PipelineShape,
    /// Routing probabilities per layer.
    probs: Vec<Vec<f64>>,
    /// Experts of each worker, with the share of the expert's tokens it gets.
    worker_experts: Vec<Vec<(usize, f64)>>,
    closed: StageTimes,
    n_a: usize,
    n_w: usize,
    e_count: usize,
    eb: f64,
    t_a: f64,
    send_a: f64,
    exact_tokens: f64,
    n_tokens: u64,
    rows_a: usize,
    rows_w: usize,
}

/// The clocks and counters the simulation advances.
struct State {
    rng: Rng,
    attn_free: Vec<f64>,
    attn_nic_free: Vec<f64>,
    attn_busy: Vec<f64>,
    work_free: Vec<f64>,
    work_nic_free: Vec<f64>,
    work_busy: Vec<f64>,
    /// Combine arrival of the previous layer per replica and micro-batch.
    ready: Vec<Vec<f64>>,
    /// Token emission time per (step, replica, micro-batch).
    emitted: Vec<Vec<Vec<f64>>>,
    counts: Vec<Vec<f64>>,
    row: Vec<f64>,
    worker_tokens: Vec<f64>,
    expert_tokens: Vec<f64>,
    attn_end: Vec<f64>,
    disp_start: Vec<f64>,
    load_ratio_sum: f64,
    load_ratio_n: usize,
    timeline: Vec<Span>,
}

impl State {
    fn new(c: &Ctx, m: usize, rng: Rng) -> Self {
        let (n_a, n_w, e_count) = (c.n_a, c.n_w, c.e_count);
        Self {
            rng,
            attn_free: vec![0.0f64; n_a],
            attn_nic_free: vec![0.0f64; n_a],
            attn_busy: vec![0.0f64; n_a],
            work_free: vec![0.0f64; n_w],
            work_nic_free: vec![0.0f64; n_w],
            work_busy: vec![0.0f64; n_w],
            ready: vec![vec![0.0f64; m]; n_a],
            emitted: vec![vec![vec![0.0f64; m]; n_a]; c.cfg.steps as usize],
            counts: vec![vec![0.0f64; e_count]; n_a],
            row: vec![0.0f64; e_count],
            worker_tokens: vec![0.0f64; n_w],
            expert_tokens: vec![0.0f64; e_count],
            attn_end: vec![0.0f64; n_a],
            disp_start: vec![0.0f64; n_a],
            load_ratio_sum: 0.0,
            load_ratio_n: 0,
            timeline: Vec::new(),
        }
    }
}

impl Ctx<'_> {
    /// Attention of micro-batch `j` at layer `l` on every replica, then its dispatch and the
    /// routing of its tokens.
    // Indices run over several per-node arrays at once; iterators would hide which is which.
    #[allow(clippy::needless_range_loop)]
    fn attention_pass(&self, st: &mut State, l: usize, j: usize, record: bool) {
        let Ctx {
            cfg,
            ref probs,
            n_a,
            e_count,
            t_a,
            send_a,
            exact_tokens,
            n_tokens,
            rows_a,
            ..
        } = *self;
        let State {
            rng,
            attn_free,
            attn_nic_free,
            attn_busy,
            ready,
            counts,
            row,
            attn_end,
            disp_start,
            timeline,
            ..
        } = st;
        // Attention on every replica, then its dispatch.
        for r in 0..n_a {
            let strag = if cfg.straggler_prob > 0.0 && rng.f64() < cfg.straggler_prob {
                cfg.straggler_factor
            } else {
                1.0
            };
            let start = attn_free[r].max(ready[r][j]);
            let end = start + t_a * strag;
            attn_free[r] = end;
            attn_busy[r] += end - start;
            attn_end[r] = end;
            disp_start[r] = end.max(attn_nic_free[r]);
            attn_nic_free[r] = disp_start[r] + send_a;
            if record && r < rows_a {
                timeline.push(Span {
                    row: r,
                    start_s: start,
                    end_s: end,
                    layer: l as u32,
                    micro_batch: j as u32,
                    kind: SpanKind::Attention,
                });
            }
            // Routing of this replica's tokens.
            match cfg.imbalance {
                Imbalance::None => counts[r]
                    .iter_mut()
                    .for_each(|c| *c = exact_tokens / e_count as f64),
                _ => {
                    multinomial(rng, n_tokens, &probs[l], row);
                    counts[r].copy_from_slice(row);
                }
            }
        }
    }

    /// The expert workers' part of micro-batch `j` at layer `l` of step `s`: each waits for
    /// every replica's message, computes and sends back; the replicas' next layer is ready
    /// when the last answer arrives.
    // Indices run over several per-node arrays at once; iterators would hide which is which.
    #[allow(clippy::needless_range_loop)]
    fn expert_pass(
        &self,
        st: &mut State,
        s: usize,
        l: usize,
        j: usize,
        record: bool,
    ) -> Result<()> {
        let Ctx {
            sm,
            model,
            cfg,
            p,
            ref worker_experts,
            ref closed,
            n_a,
            n_w,
            eb,
            send_a,
            rows_a,
            rows_w,
            ..
        } = *self;
        let layers = model.moe_layers() as usize;
        let State {
            rng,
            work_free,
            work_nic_free,
            work_busy,
            ready,
            emitted,
            counts,
            worker_tokens,
            expert_tokens,
            disp_start,
            load_ratio_sum,
            load_ratio_n,
            timeline,
            ..
        } = st;
        for (e, t) in expert_tokens.iter_mut().enumerate() {
            *t = counts.iter().map(|c| c[e]).sum();
        }
        for (w, wt) in worker_tokens.iter_mut().enumerate() {
            *wt = worker_experts[w]
                .iter()
                .map(|&(e, share)| expert_tokens[e] * share)
                .sum();
        }
        let mean_w = worker_tokens.iter().sum::<f64>() / n_w as f64;
        if mean_w > 0.0 {
            *load_ratio_sum += worker_tokens.iter().cloned().fold(0.0, f64::max) / mean_w;
            *load_ratio_n += 1;
        }
        // Experts: wait for every replica's message, compute, send back.
        let mut arrive = vec![0.0f64; n_a];
        for w in 0..n_w {
            let bytes_w = bytes_per_expert_gpu(model, p.tp_e, worker_tokens[w], eb);
            let recv_w = sm.expert_link_s(bytes_w);
            let msg = send_a.max(recv_w);
            let mut inputs = 0.0f64;
            for &ds in disp_start.iter() {
                let jit = rng_jitter(rng, cfg.jitter_cv);
                inputs = inputs.max(ds + msg * jit);
            }
            let tokens: Vec<f64> = worker_experts[w]
                .iter()
                .map(|&(e, share)| expert_tokens[e] * share)
                .collect();
            let strag = if cfg.straggler_prob > 0.0 && rng.f64() < cfg.straggler_prob {
                cfg.straggler_factor
            } else {
                1.0
            };
            let dur = sm.expert_s(p.tp_e, &tokens)? * strag;
            let start = work_free[w].max(inputs);
            let end = start + dur;
            work_free[w] = end;
            work_busy[w] += dur;
            let send_w = recv_w;
            let cstart = end.max(work_nic_free[w]);
            work_nic_free[w] = cstart + send_w;
            let back = send_w.max(send_a);
            for a in arrive.iter_mut() {
                let jit = rng_jitter(rng, cfg.jitter_cv);
                *a = a.max(cstart + back * jit);
            }
            if record && w < rows_w {
                timeline.push(Span {
                    row: rows_a + w,
                    start_s: start,
                    end_s: end,
                    layer: l as u32,
                    micro_batch: j as u32,
                    kind: SpanKind::Expert,
                });
            }
            if record && w == 0 {
                timeline.push(Span {
                    row: rows_a + rows_w + 1,
                    start_s: cstart,
                    end_s: cstart + back,
                    layer: l as u32,
                    micro_batch: j as u32,
                    kind: SpanKind::Combine,
                });
            }
        }
        if record {
            timeline.push(Span {
                row: rows_a + rows_w,
                start_s: disp_start[0],
                end_s: disp_start[0] + send_a.max(closed.t_c_s),
                layer: l as u32,
                micro_batch: j as u32,
                kind: SpanKind::Dispatch,
            });
        }
        for r in 0..n_a {
            ready[r][j] = arrive[r];
            if l + 1 == layers {
                emitted[s][r][j] = arrive[r];
            }
        }
        Ok(())
    }
}

/// What the report says about a run `r` (its findings left empty) of `cfg`: the first step
/// against Eq. 5, a starved pipeline, queued NICs, imbalance, jitter, stragglers and the
/// steady TBT.
fn findings(r: &SimReport, cfg: &SimConfig, send_a: f64, nodes: usize) -> Vec<String> {
    let (p, closed, load) = (cfg.shape, &r.closed, r.worker_load_max_over_mean);
    let (first_step_s, eq5, eq5_rel_err) = (r.first_step_s, r.eq5_step_s, r.eq5_rel_err);
    let (tbt_mean, tbt_p99, closed_tbt) = (r.tbt_mean_s, r.tbt_p99_s, r.closed_tbt_s);
    let mut findings = Vec::new();
    let fed = closed_form::pipeline_fed(closed, p.m);
    if eq5_rel_err.abs() <= 0.01 {
        findings.push(format!(
            "first step {:.3} ms vs Eq. 5 {:.3} ms: agree within 1% ({:+.2}%)",
            first_step_s * 1e3,
            eq5 * 1e3,
            eq5_rel_err * 100.0
        ));
    } else {
        findings.push(format!(
            "first step {:.3} ms vs Eq. 5 {:.3} ms: {:+.1}%",
            first_step_s * 1e3,
            eq5 * 1e3,
            eq5_rel_err * 100.0
        ));
    }
    if !fed {
        findings.push(format!(
            "m = {} is below constraint 3 (2 (1 + T_c/T_f) = {:.2}): each micro-batch waits for its own round trip T_a + T_e + 2 T_c = {:.3} ms per layer, which Eq. 5 (it assumes a fed pipeline) does not count",
            p.m,
            closed_form::min_micro_batches(closed),
            (closed.t_a_s + closed.t_e_s + 2.0 * closed.t_c_s) * 1e3
        ));
    }
    if send_a > closed.t_a_s {
        findings.push(format!(
            "an attention GPU needs {:.3} ms to send a micro-batch but computes one in {:.3} ms: its NIC queues, which the closed form ignores",
            send_a * 1e3,
            closed.t_a_s * 1e3
        ));
    }
    if load > 1.005 {
        findings.push(format!(
            "expert load imbalance: the busiest worker gets {:.2}x the mean tokens per micro-batch; every layer waits for it, so the expert stage is longer than the balanced T_e = {:.3} ms (plan with an expert load factor of {0:.2} to size for it)",
            load,
            closed.t_e_s * 1e3
        ));
    }
    if cfg.jitter_cv > 0.0 {
        findings.push(format!(
            "communication jitter (cv {:.2}): each stage waits for the slowest of {} messages",
            cfg.jitter_cv, nodes
        ));
    }
    if cfg.straggler_prob > 0.0 {
        findings.push(format!(
            "stragglers: {:.1}% of tasks run {:.1}x slower; a straggler delays every node that waits for it",
            cfg.straggler_prob * 100.0,
            cfg.straggler_factor
        ));
    }
    let steady_err = (tbt_mean - closed_tbt) / closed_tbt;
    findings.push(format!(
        "steady TBT: simulated mean {:.3} ms (p99 {:.3} ms) vs closed form {:.3} ms ({:+.1}%)",
        tbt_mean * 1e3,
        tbt_p99 * 1e3,
        closed_tbt * 1e3,
        steady_err * 100.0
    ));
    findings
}

/// Runs the simulation of `cfg` with stage times from `sm`.
// Indices run over several per-node arrays at once; iterators would hide which is which.
#[allow(clippy::needless_range_loop)]
pub fn simulate(sm: &dyn StageModel, model: &ModelShape, cfg: &SimConfig) -> Result<SimReport> {
    check_config(model, cfg)?;
    let p = cfg.shape;
    let e_count = model.num_experts as usize;
    let placement = placement_of(model, cfg)?;
    let n_w = placement.iter().flatten().copied().max().unwrap_or(0) as usize + 1;
    let n_a = p.n_a as usize;
    let m = p.m as usize;
    let layers = model.moe_layers() as usize;
    let k = model.top_k as f64;
    let eb = sm.wire_elem_bytes();
    let mut rng = Rng::new(cfg.seed);
    let probs = layer_probs(&cfg.imbalance, e_count, layers, k, &mut rng);
    // experts of each worker, with the share of the expert's tokens it gets.
    let mut worker_experts: Vec<Vec<(usize, f64)>> = vec![Vec::new(); n_w];
    for (e, ws) in placement.iter().enumerate() {
        for &w in ws {
            worker_experts[w as usize].push((e, 1.0 / ws.len() as f64));
        }
    }
    let closed = stage_times(sm, model, &p)?;
    let t_a = sm.attention_s(p.tp_a, p.b_a)?;
    let send_a = sm.attention_link_s(dispatch_bytes_per_attention_gpu(model, p.tp_a, p.b_a, eb));
    let exact_tokens = p.b_a * k;
    let (rows_a, rows_w) = (n_a.min(4), n_w.min(8));
    let cx = Ctx {
        sm,
        model,
        cfg,
        p,
        probs,
        worker_experts,
        closed,
        n_a,
        n_w,
        e_count,
        eb,
        t_a,
        send_a,
        exact_tokens,
        n_tokens: exact_tokens.round().max(0.0) as u64,
        rows_a,
        rows_w,
    };
    let mut st = State::new(&cx, m, rng);
    for s in 0..cfg.steps as usize {
        let record = cfg.timeline_step == Some(s as u32);
        for l in 0..layers {
            for j in 0..m {
                cx.attention_pass(&mut st, l, j, record);
                cx.expert_pass(&mut st, s, l, j, record)?;
            }
        }
    }
    let Ctx { closed, .. } = cx;
    let State {
        emitted,
        attn_busy,
        work_busy,
        load_ratio_sum,
        load_ratio_n,
        timeline,
        ..
    } = st;

    let steps = cfg.steps as usize;
    let last = |s: usize| emitted[s].iter().flatten().cloned().fold(0.0, f64::max);
    let first_step_s = last(0);
    let end_s = last(steps - 1);
    let global = p.global_batch();
    let mut tbts: Vec<f64> = Vec::new();
    for s in 1..steps {
        for r in 0..n_a {
            for j in 0..m {
                tbts.push(emitted[s][r][j] - emitted[s - 1][r][j]);
            }
        }
    }
    tbts.sort_by(f64::total_cmp);
    let lm = model.moe_layers();
    let closed_tbt = closed_form::steady_tbt(&closed, p.m, lm);
    let (tbt_mean, tbt_p99, tokens_per_s) = if tbts.is_empty() {
        (first_step_s, first_step_s, global / first_step_s)
    } else {
        let k0 = if steps >= 4 { 1 } else { 0 };
        let span = end_s - last(k0);
        let tput = global * (steps - 1 - k0) as f64 / span;
        (
            tbts.iter().sum::<f64>() / tbts.len() as f64,
            percentile(&tbts, 0.99),
            tput,
        )
    };
    let eq5 = closed_form::total_eq5(&closed, p.m, lm);
    let eq5_rel_err = (first_step_s - eq5) / eq5;
    let util = |busy: &[f64], prefix: &str| -> Vec<NodeUtil> {
        busy.iter()
            .enumerate()
            .map(|(i, b)| NodeUtil {
                name: format!("{prefix}{i}"),
                busy_s: *b,
                utilisation: b / end_s,
            })
            .collect()
    };
    let load = if load_ratio_n > 0 {
        load_ratio_sum / load_ratio_n as f64
    } else {
        1.0
    };

    let mut timeline_rows: Vec<String> = (0..rows_a).map(|r| format!("attention {r}")).collect();
    timeline_rows.extend((0..rows_w).map(|w| format!("expert {w}")));
    timeline_rows.push("dispatch (attn 0)".into());
    timeline_rows.push("combine (expert 0)".into());

    let mut report = SimReport {
        steps: cfg.steps,
        global_batch: global,
        closed,
        eq5_step_s: eq5,
        first_step_s,
        eq5_rel_err,
        closed_tbt_s: closed_tbt,
        tbt_mean_s: tbt_mean,
        tbt_p99_s: tbt_p99,
        closed_tokens_per_s: global / closed_tbt,
        tokens_per_s,
        attention_util: util(&attn_busy, "attention "),
        expert_util: util(&work_busy, "expert "),
        worker_load_max_over_mean: load,
        findings: Vec::new(),
        timeline_rows,
        timeline,
    };
    report.findings = findings(&report, cfg, send_a, n_a.max(n_w));
    Ok(report)
}

fn rng_jitter(rng: &mut Rng, cv: f64) -> f64 {
    if cv > 0.0 {
        rng.lognormal_unit_mean(cv)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::HardwareCatalog;
    use crate::model::ModelCatalog;
    use crate::perf::Roofline;

    fn setup(model: &str, a: &str, e: &str) -> (Roofline, ModelShape) {
        let c = HardwareCatalog::builtin().unwrap();
        let m = ModelCatalog::builtin().unwrap().resolve(model).unwrap();
        (
            Roofline::new(&c, &m, c.get(a).unwrap(), c.get(e).unwrap(), 730.0),
            m,
        )
    }

    fn shape(tp_a: u32, n_a: u32, tp_e: u32, m: u32, b_a: f64) -> PipelineShape {
        PipelineShape {
            tp_a,
            n_a,
            tp_e,
            experts_per_worker: 1,
            m,
            b_a,
        }
    }

    #[test]
    fn agrees_with_eq5_within_1pct_without_imbalance_or_jitter() {
        let mut fed_cases = 0;
        for (model, a, e, sh) in [
            ("mixtral", "A800", "A800", shape(2, 3, 2, 3, 200.0)),
            ("mixtral", "H20", "L40S", shape(2, 4, 1, 4, 128.0)),
            ("dbrx", "A800", "A800", shape(4, 4, 1, 4, 100.0)),
            ("scaled-moe", "A800", "A800", shape(4, 4, 1, 3, 256.0)),
            (
                "deepseek-v3",
                "H800",
                "H800",
                PipelineShape {
                    experts_per_worker: 8,
                    ..shape(8, 4, 1, 4, 64.0)
                },
            ),
        ] {
            let (r, m) = setup(model, a, e);
            let t = stage_times(&r, &m, &sh).unwrap();
            fed_cases += usize::from(closed_form::pipeline_fed(&t, sh.m));
            let mut cfg = SimConfig::new(sh);
            cfg.steps = 3;
            let rep = simulate(&r, &m, &cfg).unwrap();
            if closed_form::pipeline_fed(&t, sh.m) {
                assert!(rep.eq5_rel_err.abs() < 0.01, "{model}: {:?}", rep.findings);
                assert!(
                    ((rep.tbt_mean_s - rep.closed_tbt_s) / rep.closed_tbt_s).abs() < 0.01,
                    "{model}: {:?}",
                    rep.findings
                );
            } else {
                // Starved pipeline: Eq. 5 is a lower bound, the steady closed form still holds.
                assert!(rep.eq5_rel_err > -1e-9, "{model}");
            }
            assert!((rep.worker_load_max_over_mean - 1.0).abs() < 1e-9);
        }
        assert!(fed_cases >= 3, "only {fed_cases} fed cases");
    }

    #[test]
    fn hand_built_case_is_exact() {
        // With a hand-checkable profile: T_a = 1 ms, T_e = 0.8 ms (+0), T_c = 0.2 ms.
        use crate::profile::{
            AttentionFit, ExpertFit, NetworkFit, Networks, Profile, ProfileHeader, ProfileModel,
        };
        let m = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        // b_a = 100 sequences, n_a = 4: b_e = 100 tokens; 1.57 MB at 12.5e9*... set bandwidths
        // so that both sides take 0.2 ms: attention sends 100*6144*2*2/1 = 2_457_600 B.
        let gbit_a = 2_457_600.0 * 8.0 / 0.2e-3 / 1e9;
        let gbit_e = 100.0 * 6144.0 * 2.0 * 8.0 / 0.2e-3 / 1e9;
        let p = Profile {
            profile: ProfileHeader {
                format: 1,
                model: "mixtral".into(),
                attention_hw: "x".into(),
                expert_hw: "y".into(),
                source: "hand".into(),
                moe_layers: 0,
                machine: String::new(),
                settings: String::new(),
            },
            attention: vec![AttentionFit {
                tp: 1,
                context_tokens: 730.0,
                k1_s: 0.0,
                k2_s: 1e-3,
                k_ctx_s: 0.0,
            }],
            head: Vec::new(),
            expert: vec![ExpertFit {
                tp: 1,
                k3_s: 0.0,
                k4_s: 0.8e-3,
                worker_overhead_s: 0.0,
            }],
            network: Networks {
                attention: NetworkFit {
                    bandwidth_gbit_s: gbit_a,
                    util: vec![[1.0, 1.0]],
                },
                expert: NetworkFit {
                    bandwidth_gbit_s: gbit_e,
                    util: vec![[1.0, 1.0]],
                },
                loopback_tcp: None,
            },
        };
        let pm = ProfileModel::new(p, 730.0, 2.0);
        let sh = shape(1, 4, 1, 3, 100.0);
        let mut cfg = SimConfig::new(sh);
        cfg.steps = 2;
        let rep = simulate(&pm, &m, &cfg).unwrap();
        // Eq. 5: (1 + 0.8 + 0.4) + 1 * (3 * 56 - 1) = 169.2 ms.
        assert!((rep.eq5_step_s - 0.1692).abs() < 1e-9, "{}", rep.eq5_step_s);
        assert!(
            (rep.first_step_s - 0.1692).abs() < 1e-9,
            "{}",
            rep.first_step_s
        );
        // Steady: m T_f L = 3 * 1 * 56 = 168 ms.
        assert!((rep.tbt_mean_s - 0.168).abs() < 1e-9);
        // m = 2 starves (needs 2 (1 + 0.2) = 2.4): period = T_a + T_e + 2 T_c = 2.2 ms.
        let mut cfg2 = SimConfig::new(shape(1, 4, 1, 2, 100.0));
        cfg2.steps = 3;
        let rep2 = simulate(&pm, &m, &cfg2).unwrap();
        assert!(
            (rep2.tbt_mean_s - 2.2e-3 * 56.0).abs() < 1e-9,
            "{}",
            rep2.tbt_mean_s
        );
        assert!(rep2
            .findings
            .iter()
            .any(|f| f.contains("below constraint 3")));
        // Utilisation: attention busy 3 ms of every 3 ms in the fed case.
        assert!(rep.attention_util[0].utilisation > 0.98);
    }

    #[test]
    fn imbalance_and_jitter_slow_it_down_and_are_explained() {
        let (r, m) = setup("dbrx", "A800", "A800");
        let sh = shape(4, 4, 1, 4, 128.0);
        let mut cfg = SimConfig::new(sh);
        cfg.steps = 4;
        let base = simulate(&r, &m, &cfg).unwrap();
        cfg.imbalance = Imbalance::Zipf { skew: 1.0 };
        let skew = simulate(&r, &m, &cfg).unwrap();
        assert!(
            skew.worker_load_max_over_mean > 1.3,
            "{}",
            skew.worker_load_max_over_mean
        );
        assert!(skew.tokens_per_s < base.tokens_per_s);
        assert!(skew.findings.iter().any(|f| f.contains("imbalance")));
        cfg.imbalance = Imbalance::None;
        cfg.jitter_cv = 0.5;
        cfg.straggler_prob = 0.01;
        cfg.straggler_factor = 3.0;
        let jit = simulate(&r, &m, &cfg).unwrap();
        assert!(jit.tokens_per_s < base.tokens_per_s);
        assert!(jit.tbt_p99_s > base.tbt_p99_s);
        // Same seed, same answer.
        let again = simulate(&r, &m, &cfg).unwrap();
        assert_eq!(again.tokens_per_s, jit.tokens_per_s);
    }

    #[test]
    fn traces_and_bad_inputs() {
        let (r, m) = setup("mixtral", "A800", "A800");
        let sh = shape(2, 2, 2, 3, 64.0);
        let mut cfg = SimConfig::new(sh);
        cfg.steps = 2;
        cfg.imbalance = Imbalance::Trace(RoutingTrace {
            num_experts: 8,
            layers: vec![vec![8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]],
        });
        let rep = simulate(&r, &m, &cfg).unwrap();
        // Expert 0 is capped at 1/K = 0.5 of the tokens: worker 0 gets ~4x the mean.
        assert!(
            rep.worker_load_max_over_mean > 3.0,
            "{}",
            rep.worker_load_max_over_mean
        );
        cfg.imbalance = Imbalance::Trace(RoutingTrace {
            num_experts: 4,
            layers: vec![vec![1.0; 4]],
        });
        assert!(simulate(&r, &m, &cfg).is_err());
        cfg.imbalance = Imbalance::None;
        cfg.steps = 0;
        assert!(simulate(&r, &m, &cfg).is_err());
        cfg.steps = 1;
        cfg.straggler_factor = 0.5;
        assert!(simulate(&r, &m, &cfg).is_err());
        let mut p = vec![0.7, 0.1, 0.1, 0.1];
        cap_probs(&mut p, 0.5);
        assert!((p[0] - 0.5).abs() < 1e-12 && (p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn timeline_is_recorded_for_one_step() {
        let (r, m) = setup("mixtral", "A800", "A800");
        let mut cfg = SimConfig::new(shape(2, 2, 2, 3, 64.0));
        cfg.steps = 2;
        cfg.timeline_step = Some(1);
        let rep = simulate(&r, &m, &cfg).unwrap();
        let attn0 = rep
            .timeline
            .iter()
            .filter(|s| s.row == 0 && s.kind == SpanKind::Attention)
            .count();
        assert_eq!(attn0, 56 * 3);
        assert!(rep.timeline.iter().all(|s| s.end_s >= s.start_s));
    }
}
