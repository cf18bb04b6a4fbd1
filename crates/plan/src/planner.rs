//! Deployment plan search: the paper's Algorithm 1, widened where the closed form is blind,
//! plus the colocated baseline on the same hardware.
//!
//! For each hardware pair, `tp_a`, `tp_e` and experts per worker: skip unless the weights fit;
//! for each replica count `n_a` (BALANCE's value, or every count up to a limit) and each `m`
//! in `min..=max` micro-batches, take the largest micro-batch `b_a` that meets the TBT SLO
//! (Eq. 7) and the memory limit (Eq. 8), and rank the plans by throughput per cost or per
//! GPU. Nothing returned violates memory or the SLO; when nothing is feasible the error says
//! which constraint binds.

use crate::closed_form::{self, StageTimes};
use crate::error::{PlanError, Result};
use crate::hardware::{Hardware, HardwareCatalog, PriceUnit};
use crate::model::ModelShape;
use crate::perf::{fit_linear, stage_times_loaded, PipelineShape, Roofline, StageModel};
use crate::profile::{Profile, ProfileModel};
use serde::Serialize;

/// What plans are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Tokens/s per unit of hourly price (the paper's throughput per cost).
    #[default]
    PerCost,
    /// Tokens/s per GPU.
    PerGpu,
}

/// How replica counts are searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaSearch {
    /// Algorithm 1 as written: only `n_a = BALANCE` (rounded down and up).
    Balance,
    /// Every `n_a` in `1..=max_replicas`: finds the balance point the linear fit misses
    /// (its intercepts are large when weight reads dominate).
    #[default]
    Exhaustive,
}

/// A planning request. Times in seconds, sizes in tokens.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelShape,
    /// Candidate attention hardware (catalog names).
    pub attention_hw: Vec<String>,
    /// Candidate expert hardware (catalog names).
    pub expert_hw: Vec<String>,
    /// Eq. 7: time-between-tokens target, seconds.
    pub tbt_slo_s: f64,
    /// Context per sequence (prompt + generated so far), tokens: the KV read per step and
    /// the KV memory per sequence.
    pub context_tokens: f64,
    /// Micro-batch counts searched: `min_micro_batches..=max_micro_batches` (`N_m` = 4).
    pub min_micro_batches: u32,
    pub max_micro_batches: u32,
    /// `M_a`, `M_e`: most GPUs per attention replica / expert worker (default: a node).
    pub max_tp_attention: Option<u32>,
    pub max_tp_expert: Option<u32>,
    /// Routed experts per worker; None searches the divisors of `E`. The paper uses 1.
    pub experts_per_worker: Option<u32>,
    pub max_replicas: u32,
    /// Most GPUs in one deployment (attention + experts), if bounded.
    pub max_gpus: Option<u32>,
    /// Most sequences per micro-batch per replica.
    pub max_micro_batch_seqs: u32,
    /// Fraction of device memory usable for weights + KV (the rest: activations, runtime).
    pub mem_fraction: f64,
    pub price_unit: PriceUnit,
    pub objective: Objective,
    pub replica_search: ReplicaSearch,
    /// Also plan the colocated baseline on each hardware involved.
    pub colocated_baseline: bool,
    /// Most pipeline stages (nodes) the colocated baseline may use: 1, 2, 4 or 8.
    pub colocated_max_pp: u32,
    /// Max / mean tokens per expert worker to plan for (1 = balanced routing, the closed
    /// form's assumption). `tandem simulate --skew` or a routing trace measures it.
    pub expert_load_factor: f64,
    /// Plans kept in the report.
    pub keep: usize,
}

impl PlanRequest {
    /// Defaults of the paper's setting: SLO 150 ms, context 730 (571 in + 159 out), m in 1..=4.
    pub fn new(model: ModelShape, attention_hw: &str, expert_hw: &str) -> Self {
        Self {
            model,
            attention_hw: vec![attention_hw.to_string()],
            expert_hw: vec![expert_hw.to_string()],
            tbt_slo_s: 0.150,
            context_tokens: 730.0,
            min_micro_batches: 1,
            max_micro_batches: 4,
            max_tp_attention: None,
            max_tp_expert: None,
            experts_per_worker: None,
            max_replicas: 64,
            max_gpus: None,
            max_micro_batch_seqs: 4096,
            mem_fraction: 0.9,
            price_unit: PriceUnit::Norm,
            objective: Objective::PerCost,
            replica_search: ReplicaSearch::Exhaustive,
            colocated_baseline: true,
            colocated_max_pp: 8,
            expert_load_factor: 1.0,
            keep: 10,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(PlanError::Invalid(m.to_string()));
        if !(self.tbt_slo_s.is_finite() && self.tbt_slo_s > 0.0) {
            return bad("the TBT SLO must be a positive time");
        }
        if !(self.context_tokens.is_finite() && self.context_tokens >= 1.0) {
            return bad("context must be at least one token");
        }
        if self.min_micro_batches == 0 || self.min_micro_batches > self.max_micro_batches {
            return bad("micro-batch range must be 1 <= min <= max");
        }
        if !(self.mem_fraction > 0.0 && self.mem_fraction <= 1.0) {
            return bad("memory fraction must be in (0, 1]");
        }
        if !(self.expert_load_factor.is_finite() && self.expert_load_factor >= 1.0) {
            return bad("the expert load factor (max / mean tokens per worker) must be >= 1");
        }
        if self.max_replicas == 0 || self.max_micro_batch_seqs == 0 {
            return bad("max replicas and max micro-batch size must be positive");
        }
        if self.attention_hw.is_empty() || self.expert_hw.is_empty() {
            return bad("name at least one attention and one expert hardware");
        }
        if let Some(e) = self.experts_per_worker {
            if e == 0 || !self.model.num_experts.is_multiple_of(e as u64) {
                return Err(PlanError::Invalid(format!(
                    "experts per worker {e} must divide the model's {} experts",
                    self.model.num_experts
                )));
            }
        }
        self.model.validate()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Attention replicas + expert workers (MegaScale-Infer).
    Disaggregated,
    /// One replica holds attention and experts with TP (x PP across nodes), as vLLM and
    /// TensorRT-LLM deploy.
    Colocated,
}

/// Which constraint stopped the batch from growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// Eq. 7: one more sequence per micro-batch would exceed the TBT SLO.
    Slo,
    /// Eq. 8: one more would not fit the KV cache.
    Memory,
    /// The request's cap on sequences per micro-batch.
    BatchCap,
}

/// One deployment plan and what the model predicts for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub layout: Layout,
    pub model: String,
    pub attention_hw: String,
    pub expert_hw: String,
    /// GPUs per attention replica (colocated: TP degree of the replica).
    pub tp_a: u32,
    /// `n_a` (colocated: 1).
    pub n_a: u32,
    /// GPUs per expert worker (colocated: same GPUs as attention).
    pub tp_e: u32,
    pub experts_per_worker: u32,
    /// `N` (colocated: 0).
    pub expert_workers: u32,
    /// Pipeline stages across nodes (colocated only; 1 otherwise).
    pub pp: u32,
    /// `m` (colocated: `pp` micro-batches in flight).
    pub micro_batches: u32,
    /// `b_a`: sequences per micro-batch per replica.
    pub micro_batch_seqs: u32,
    /// `B`: sequences decoding at once over the whole deployment.
    pub global_batch: u32,
    /// `b_e`: tokens per expert per micro-batch.
    pub tokens_per_expert: f64,
    /// Per-layer stage times (colocated: `t_a_s` attention part, `t_e_s` expert part).
    pub times: StageTimes,
    /// Time between tokens in steady state, seconds.
    pub tbt_s: f64,
    /// Eq. 5: one decode step of the whole batch from an empty pipeline, seconds.
    pub eq5_step_s: f64,
    /// Constraint 3: `2 (1 + T_c / T_f)`.
    pub min_micro_batches: f64,
    pub tokens_per_s: f64,
    pub gpus_attention: u32,
    pub gpus_expert: u32,
    /// Hourly price of the deployment in `price_unit`, if every device has one.
    pub cost_per_hour: Option<f64>,
    pub price_unit: PriceUnit,
    pub tokens_per_s_per_gpu: f64,
    pub tokens_per_s_per_cost: Option<f64>,
    /// Board power of all devices, W.
    pub power_w: Option<f64>,
    /// Bytes used / available per attention GPU (weights + KV).
    pub attention_mem_used_bytes: f64,
    pub attention_mem_capacity_bytes: f64,
    /// Bytes used / available per expert GPU.
    pub expert_mem_used_bytes: f64,
    pub expert_mem_capacity_bytes: f64,
    pub binding: Binding,
    /// BALANCE's `n_a` from the linear fit (disaggregated only).
    pub n_a_balance: f64,
    pub context_tokens: f64,
    pub tbt_slo_s: f64,
    /// Where the stage times come from.
    pub source: String,
}

impl Plan {
    pub fn gpus(&self) -> u32 {
        self.gpus_attention + self.gpus_expert
    }
    /// The ranking value under `objective` (None if the plan has no price).
    pub fn score(&self, objective: Objective) -> Option<f64> {
        match objective {
            Objective::PerCost => self.tokens_per_s_per_cost,
            Objective::PerGpu => Some(self.tokens_per_s_per_gpu),
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub objective: Objective,
    /// Disaggregated plans, best first (the best `n_a` of each hardware pair, `tp_a`, `tp_e`,
    /// experts per worker and `m`).
    pub ranked: Vec<Plan>,
    /// The best colocated plan on each hardware involved.
    pub colocated: Vec<Plan>,
    /// Skipped hardware, missing prices, and similar.
    pub notes: Vec<String>,
}

impl PlanReport {
    /// The chosen plan.
    pub fn best(&self) -> Option<&Plan> {
        self.ranked.first()
    }
    /// The best colocated plan on the plan's own hardware (attention or expert kind).
    pub fn baseline_for(&self, plan: &Plan) -> Option<&Plan> {
        self.colocated
            .iter()
            .filter(|c| c.attention_hw == plan.attention_hw || c.attention_hw == plan.expert_hw)
            .max_by(|a, b| {
                let (x, y) = (a.score(self.objective), b.score(self.objective));
                x.unwrap_or(f64::MIN).total_cmp(&y.unwrap_or(f64::MIN))
            })
    }
    /// Objective of `plan` over that of its colocated baseline.
    pub fn ratio(&self, plan: &Plan) -> Option<f64> {
        let base = self.baseline_for(plan)?;
        Some(plan.score(self.objective)? / base.score(self.objective)?)
    }
}

/// Where stage times come from for a hardware pair.
pub enum PerfSource<'a> {
    Roofline,
    /// A measured profile: used for the pair it was measured on, roofline elsewhere.
    Profile(&'a Profile),
}

fn powers_of_two_upto(max: u32) -> Vec<u32> {
    let mut v = Vec::new();
    let mut t = 1;
    while t <= max {
        v.push(t);
        t *= 2;
    }
    v
}

fn divisors(n: u64) -> Vec<u32> {
    (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d as u32)
        .collect()
}

/// Why candidates failed, to explain an empty answer.
#[derive(Debug, Default)]
struct Diagnosis {
    /// Largest `tp * C * frac` over `P_a * bytes` seen (attention weights), bytes.
    attention_weights: Option<(f64, f64, String)>,
    expert_weights: Option<(f64, f64, String)>,
    weight_fits: usize,
    smallest_gpus: Option<u32>,
    budget_fits: usize,
    kv_fail: usize,
    kv_need: Option<(f64, f64, String)>,
    /// Best TBT at one sequence per micro-batch, with the plan that gets it.
    best_tbt_at_1: Option<(f64, String)>,
    feasible: usize,
}

impl Diagnosis {
    fn message(&self, req: &PlanRequest) -> String {
        let gb = |b: f64| b / 1e9;
        if self.weight_fits == 0 {
            let mut parts = Vec::new();
            if let Some((need, have, hw)) = &self.attention_weights {
                if need > have {
                    parts.push(format!(
                        "attention-side weights ({:.1} GB) exceed {:.1} GB usable on the largest attention replica ({hw})",
                        gb(*need),
                        gb(*have)
                    ));
                }
            }
            if let Some((need, have, hw)) = &self.expert_weights {
                if need > have {
                    parts.push(format!(
                        "one expert worker's weights ({:.1} GB) exceed {:.1} GB usable on the largest expert worker ({hw})",
                        gb(*need),
                        gb(*have)
                    ));
                }
            }
            if parts.is_empty() {
                parts.push("no tensor-parallel degree divides the model's heads/FFN".into());
            }
            return format!("memory binds: {}", parts.join("; "));
        }
        if self.budget_fits == 0 {
            return format!(
                "GPU budget binds: the smallest candidate plan whose weights fit needs {} GPUs, above --max-gpus {}",
                self.smallest_gpus.unwrap_or(0),
                req.max_gpus.unwrap_or(0)
            );
        }
        if self.kv_fail == self.budget_fits {
            if let Some((need, have, hw)) = &self.kv_need {
                return format!(
                    "memory binds: after the weights, {:.2} GB per GPU is left for the KV cache but \
                     the smallest batch ({} micro-batch(es) of one sequence of {} tokens) needs {:.2} GB ({hw})",
                    gb(*have),
                    req.min_micro_batches,
                    req.context_tokens,
                    gb(*need)
                );
            }
        }
        match &self.best_tbt_at_1 {
            Some((t, plan)) => format!(
                "the TBT SLO binds: the fastest plan ({plan}) needs {:.2} ms between tokens with one \
                 sequence per micro-batch, above the {:.2} ms target",
                t * 1e3,
                req.tbt_slo_s * 1e3
            ),
            None => "no candidate could be evaluated".into(),
        }
    }
}

/// Plans a request against the catalog.
pub fn plan(
    req: &PlanRequest,
    catalog: &HardwareCatalog,
    source: PerfSource<'_>,
) -> Result<PlanReport> {
    req.validate()?;
    let mut notes = Vec::new();
    let mut ranked = Vec::new();
    let mut diag = Diagnosis::default();
    let mut hw_seen: Vec<Hardware> = Vec::new();
    for an in &req.attention_hw {
        let ha = catalog.get(an)?;
        for en in &req.expert_hw {
            let he = catalog.get(en)?;
            if req.objective == Objective::PerCost
                && (ha.price(req.price_unit).is_err() || he.price(req.price_unit).is_err())
            {
                let which = if ha.price(req.price_unit).is_err() {
                    ha
                } else {
                    he
                };
                if req.attention_hw.len() * req.expert_hw.len() == 1 {
                    return Err(which
                        .price(req.price_unit)
                        .err()
                        .unwrap_or(PlanError::Invalid("missing price".into())));
                }
                let note = format!("skipped {}: no {:?} price", which.name, req.price_unit);
                if !notes.contains(&note) {
                    notes.push(note);
                }
                continue;
            }
            for hw in [ha, he] {
                if !hw_seen.iter().any(|h| h.name == hw.name) {
                    hw_seen.push(hw.clone());
                }
            }
            let roof = Roofline::new(catalog, &req.model, ha, he, req.context_tokens);
            let profiled;
            let sm: &dyn StageModel = match &source {
                // The profile names its hardware as the user did (`tandem profile` writes
                // "cpu"): an alias counts.
                PerfSource::Profile(p)
                    if ha.matches(&p.profile.attention_hw) && he.matches(&p.profile.expert_hw) =>
                {
                    profiled = ProfileModel::new((*p).clone(), req.context_tokens, ha.elem_bytes());
                    &profiled
                }
                _ => &roof,
            };
            search_pair(req, ha, he, sm, &mut ranked, &mut diag)?;
        }
    }
    let mut colocated = Vec::new();
    if req.colocated_baseline {
        if let PerfSource::Profile(p) = &source {
            if hw_seen.iter().any(|h| h.matches(&p.profile.attention_hw)) {
                notes.push(
                    "the colocated baselines use the roofline: the profile has no colocated \
                     fit, so 'vs coloc' compares a measured plan with a modelled baseline \
                     (`tandem plan engine --expert-workers 0 --profile FILE` predicts a \
                     colocated shape of the engine from the profile)"
                        .to_string(),
                );
            }
        }
        for hw in &hw_seen {
            let roof = Roofline::new(catalog, &req.model, hw, hw, req.context_tokens);
            match plan_colocated(req, hw, &roof) {
                Ok(p) => colocated.push(p),
                Err(e) => notes.push(format!("colocated baseline on {}: {e}", hw.name)),
            }
        }
    }
    if ranked.is_empty() {
        if hw_seen.is_empty() {
            return Err(PlanError::Infeasible(format!(
                "no hardware pair has a {:?} price; {}",
                req.price_unit,
                notes.join("; ")
            )));
        }
        return Err(PlanError::Infeasible(diag.message(req)));
    }
    sort_plans(&mut ranked, req.objective);
    ranked.truncate(req.keep.max(1));
    Ok(PlanReport {
        objective: req.objective,
        ranked,
        colocated,
        notes,
    })
}

fn sort_plans(v: &mut [Plan], objective: Objective) {
    v.sort_by(|a, b| {
        let (x, y) = (a.score(objective), b.score(objective));
        y.unwrap_or(f64::MIN)
            .total_cmp(&x.unwrap_or(f64::MIN))
            .then(b.tokens_per_s_per_gpu.total_cmp(&a.tokens_per_s_per_gpu))
    });
}

/// Largest integer in `[lo, hi]` with `ok`, assuming `ok` is monotone (true then false).
fn largest_ok(lo: u32, hi: u32, mut ok: impl FnMut(u32) -> Result<bool>) -> Result<Option<u32>> {
    if lo > hi || !ok(lo)? {
        return Ok(None);
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(Some(good))
}

/// Memory per attention GPU: (weights bytes, KV bytes per sequence).
fn attention_memory(model: &ModelShape, hw: &Hardware, tp_a: u32, context: f64) -> (f64, f64) {
    let eb = hw.elem_bytes();
    let weights = model.attention_side_params() * eb / tp_a as f64;
    let shards = (tp_a as u64).min(model.kv_shardable()).max(1) as f64;
    let kv_per_seq =
        context * model.kv_elems_per_token_layer() * model.num_layers as f64 * eb / shards;
    (weights, kv_per_seq)
}

#[allow(clippy::too_many_arguments)]
fn search_pair(
    req: &PlanRequest,
    ha: &Hardware,
    he: &Hardware,
    sm: &dyn StageModel,
    out: &mut Vec<Plan>,
    diag: &mut Diagnosis,
) -> Result<()> {
    let model = &req.model;
    let cap_a = ha.memory_bytes() * req.mem_fraction;
    let cap_e = he.memory_bytes() * req.mem_fraction;
    let tps_a: Vec<u32> = powers_of_two_upto(req.max_tp_attention.unwrap_or(ha.gpus_per_node))
        .into_iter()
        .filter(|t| model.num_heads.is_multiple_of(*t as u64))
        .filter(|t| sm.attention_tps().is_none_or(|v| v.contains(t)))
        .collect();
    let tps_e: Vec<u32> = powers_of_two_upto(req.max_tp_expert.unwrap_or(he.gpus_per_node))
        .into_iter()
        .filter(|t| model.expert_intermediate.is_multiple_of(*t as u64))
        .filter(|t| sm.expert_tps().is_none_or(|v| v.contains(t)))
        .collect();
    let epns = match req.experts_per_worker {
        Some(e) => vec![e],
        None => divisors(model.num_experts),
    };
    for &tp_a in &tps_a {
        let (w_a, _) = attention_memory(model, ha, tp_a, req.context_tokens);
        let have = cap_a;
        if diag
            .attention_weights
            .as_ref()
            .is_none_or(|(_, h, _)| have * tp_a as f64 > *h)
        {
            diag.attention_weights = Some((
                w_a * tp_a as f64,
                have * tp_a as f64,
                format!("{} x{tp_a}", ha.name),
            ));
        }
        if w_a >= cap_a {
            continue;
        }
        for &tp_e in &tps_e {
            // The paper's BALANCE from the linear fit at this TP pair.
            let ((k1, _), (k3, _)) = fit_linear(sm, tp_a, tp_e, 512.0)?;
            for &epn in &epns {
                let w_e = epn as f64 * model.params_per_expert() * he.elem_bytes() / tp_e as f64;
                let total_e = w_e * tp_e as f64;
                if diag
                    .expert_weights
                    .as_ref()
                    .is_none_or(|(n, h, _)| cap_e * (tp_e as f64) / total_e > *h / n.max(1.0))
                {
                    diag.expert_weights = Some((
                        total_e,
                        cap_e * tp_e as f64,
                        format!("{} x{tp_e}, {epn} expert(s)", he.name),
                    ));
                }
                if w_e >= cap_e {
                    continue;
                }
                diag.weight_fits += 1;
                let n_bal =
                    closed_form::balance(k1, k3 * epn as f64, model.num_experts, model.top_k);
                let replicas: Vec<u32> = match req.replica_search {
                    ReplicaSearch::Exhaustive => (1..=req.max_replicas).collect(),
                    ReplicaSearch::Balance => {
                        let lo = (n_bal.floor() as u32).clamp(1, req.max_replicas);
                        let hi = (n_bal.ceil() as u32).clamp(1, req.max_replicas);
                        if lo == hi {
                            vec![lo]
                        } else {
                            vec![lo, hi]
                        }
                    }
                };
                for m in req.min_micro_batches..=req.max_micro_batches {
                    let mut best: Option<Plan> = None;
                    for &n_a in &replicas {
                        let cand = Candidate {
                            tp_a,
                            n_a,
                            tp_e,
                            epn,
                            m,
                            n_bal,
                        };
                        let Some(plan) = fit_batch(req, ha, he, sm, &cand, diag)? else {
                            continue;
                        };
                        let better = best.as_ref().is_none_or(|cur| {
                            plan.score(req.objective).unwrap_or(f64::MIN)
                                > cur.score(req.objective).unwrap_or(f64::MIN)
                        });
                        if better {
                            best = Some(plan);
                        }
                    }
                    out.extend(best);
                }
            }
        }
    }
    Ok(())
}

/// One point of the search space, without the batch.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    tp_a: u32,
    n_a: u32,
    tp_e: u32,
    epn: u32,
    m: u32,
    n_bal: f64,
}

/// The largest batch for one candidate under the SLO and memory, as a plan (None if even
/// one sequence per micro-batch fails; `diag` records why).
fn fit_batch(
    req: &PlanRequest,
    ha: &Hardware,
    he: &Hardware,
    sm: &dyn StageModel,
    c: &Candidate,
    diag: &mut Diagnosis,
) -> Result<Option<Plan>> {
    let model = &req.model;
    let Candidate {
        tp_a,
        n_a,
        tp_e,
        epn,
        m,
        n_bal,
    } = *c;
    let cap_a = ha.memory_bytes() * req.mem_fraction;
    let (w_a, kv_seq) = attention_memory(model, ha, tp_a, req.context_tokens);
    let w_e = epn as f64 * model.params_per_expert() * he.elem_bytes() / tp_e as f64;
    let workers = (model.num_experts as u32).div_ceil(epn);
    let price_a = ha.price(req.price_unit).ok();
    let price_e = he.price(req.price_unit).ok();
    let gpus = tp_a * n_a + tp_e * workers;
    diag.smallest_gpus = Some(diag.smallest_gpus.map_or(gpus, |g| g.min(gpus)));
    if req.max_gpus.is_some_and(|g| gpus > g) {
        return Ok(None);
    }
    diag.budget_fits += 1;
    // Eq. 8: largest b_a whose KV fits.
    let b_mem = ((cap_a - w_a) / (kv_seq * m as f64)).floor();
    if b_mem < 1.0 {
        diag.kv_fail += 1;
        diag.kv_need = Some((
            kv_seq * m as f64,
            cap_a - w_a,
            format!("{} x{tp_a}", ha.name),
        ));
        return Ok(None);
    }
    let b_hi = (b_mem as u32).min(req.max_micro_batch_seqs);
    let shape = |b: u32| PipelineShape {
        tp_a,
        n_a,
        tp_e,
        experts_per_worker: epn,
        m,
        b_a: b as f64,
    };
    let tbt = |b: u32| -> Result<(StageTimes, f64)> {
        let t = stage_times_loaded(sm, model, &shape(b), req.expert_load_factor)?;
        Ok((t, closed_form::steady_tbt(&t, m, model.moe_layers())))
    };
    let (_, tbt1) = tbt(1)?;
    if diag.best_tbt_at_1.as_ref().is_none_or(|(t, _)| tbt1 < *t) {
        diag.best_tbt_at_1 = Some((
            tbt1,
            format!(
                "{} x{tp_a} x{n_a} + {} x{tp_e} x{workers}, m={m}",
                ha.name, he.name
            ),
        ));
    }
    let Some(b) = largest_ok(1, b_hi, |b| Ok(tbt(b)?.1 <= req.tbt_slo_s))? else {
        return Ok(None);
    };
    diag.feasible += 1;
    let (times, tbt_s) = tbt(b)?;
    let binding = if b == req.max_micro_batch_seqs {
        Binding::BatchCap
    } else if b == b_hi {
        Binding::Memory
    } else {
        Binding::Slo
    };
    let p = shape(b);
    let global = p.global_batch();
    let tokens_per_s = global / tbt_s;
    let gpus_attention = tp_a * n_a;
    let gpus_expert = tp_e * workers;
    let cost = match (price_a, price_e) {
        (Some(a), Some(e)) => Some(a * gpus_attention as f64 + e * gpus_expert as f64),
        _ => None,
    };
    let power = match (ha.power_w, he.power_w) {
        (Some(a), Some(e)) => Some(a * gpus_attention as f64 + e * gpus_expert as f64),
        _ => None,
    };
    Ok(Some(Plan {
        layout: Layout::Disaggregated,
        model: model.name.clone(),
        attention_hw: ha.name.clone(),
        expert_hw: he.name.clone(),
        tp_a,
        n_a,
        tp_e,
        experts_per_worker: epn,
        expert_workers: workers,
        pp: 1,
        micro_batches: m,
        micro_batch_seqs: b,
        global_batch: global as u32,
        tokens_per_expert: p.tokens_per_expert(model),
        times,
        tbt_s,
        eq5_step_s: closed_form::total_eq5(&times, m, model.moe_layers()),
        min_micro_batches: closed_form::min_micro_batches(&times),
        tokens_per_s,
        gpus_attention,
        gpus_expert,
        cost_per_hour: cost,
        price_unit: req.price_unit,
        tokens_per_s_per_gpu: tokens_per_s / (gpus_attention + gpus_expert) as f64,
        tokens_per_s_per_cost: cost.map(|c| tokens_per_s / c),
        power_w: power,
        attention_mem_used_bytes: w_a + kv_seq * (m * b) as f64,
        attention_mem_capacity_bytes: ha.memory_bytes(),
        expert_mem_used_bytes: w_e,
        expert_mem_capacity_bytes: he.memory_bytes(),
        binding,
        n_a_balance: n_bal,
        context_tokens: req.context_tokens,
        tbt_slo_s: req.tbt_slo_s,
        source: sm.describe(),
    }))
}

/// The largest-batch plan for a fixed deployment shape (`tp_a`, `n_a`, `tp_e`, experts per
/// worker, `m`) on one hardware pair, with roofline stage times; None if infeasible.
#[allow(clippy::too_many_arguments)]
pub fn plan_fixed_shape(
    req: &PlanRequest,
    catalog: &HardwareCatalog,
    attention_hw: &str,
    expert_hw: &str,
    tp_a: u32,
    n_a: u32,
    tp_e: u32,
    experts_per_worker: u32,
    m: u32,
) -> Result<Option<Plan>> {
    req.validate()?;
    let ha = catalog.get(attention_hw)?;
    let he = catalog.get(expert_hw)?;
    let roof = Roofline::new(catalog, &req.model, ha, he, req.context_tokens);
    if ha.memory_bytes() * req.mem_fraction
        <= attention_memory(&req.model, ha, tp_a, req.context_tokens).0
        || he.memory_bytes() * req.mem_fraction
            <= experts_per_worker as f64 * req.model.params_per_expert() * he.elem_bytes()
                / tp_e as f64
    {
        return Ok(None);
    }
    let cand = Candidate {
        tp_a,
        n_a,
        tp_e,
        epn: experts_per_worker,
        m,
        n_bal: f64::NAN,
    };
    fit_batch(req, ha, he, &roof, &cand, &mut Diagnosis::default())
}

/// The colocated baseline on `hw`: `tp` GPUs per node (TP/EP) times `pp` pipeline stages
/// across nodes, the largest batch under the SLO and memory, best by the objective.
pub fn plan_colocated(req: &PlanRequest, hw: &Hardware, roof: &Roofline) -> Result<Plan> {
    req.validate()?;
    let model = &req.model;
    let eb = hw.elem_bytes();
    let cap = hw.memory_bytes() * req.mem_fraction;
    let price = hw.price(req.price_unit).ok();
    let lm = model.moe_layers();
    let mut best: Option<Plan> = None;
    let mut why = Vec::new();
    for tp in powers_of_two_upto(req.max_tp_attention.unwrap_or(hw.gpus_per_node))
        .into_iter()
        .filter(|t| model.num_heads.is_multiple_of(*t as u64))
    {
        for pp in [1u32, 2, 4, 8]
            .into_iter()
            .filter(|p| *p <= req.colocated_max_pp.max(1))
        {
            let gpus = tp * pp;
            if req.max_gpus.is_some_and(|g| gpus > g) {
                continue;
            }
            let shards = (tp as u64).min(model.kv_shardable()).max(1) as f64 * pp as f64;
            let weights = model.total_params() * eb / gpus as f64;
            if weights >= cap {
                why.push(format!(
                    "x{gpus}: weights {:.1} GB > {:.1} GB",
                    weights / 1e9,
                    cap / 1e9
                ));
                continue;
            }
            let kv_seq = req.context_tokens
                * model.kv_elems_per_token_layer()
                * model.num_layers as f64
                * eb
                / shards;
            let b_mem = ((cap - weights) / kv_seq).floor();
            if b_mem < pp as f64 {
                why.push(format!("x{gpus}: no room for KV"));
                continue;
            }
            let cap_b = (req.max_micro_batch_seqs as u64 * pp as u64).min(u32::MAX as u64) as u32;
            let b_hi = (b_mem as u32).min(cap_b);
            // pp micro-batches of B/pp each keep the stages busy; a micro-batch passes all L
            // layers once per step.
            let tbt = |b: u32| roof.colocated_layer_s(tp, b as f64 / pp as f64) * lm as f64;
            let Some(b) = largest_ok(pp, b_hi, |b| Ok(tbt(b) <= req.tbt_slo_s))? else {
                why.push(format!(
                    "x{gpus}: {:.1} ms per token at the smallest batch",
                    tbt(pp) * 1e3
                ));
                continue;
            };
            let tbt_s = tbt(b);
            let tokens_per_s = b as f64 / tbt_s;
            let binding = if b == cap_b {
                Binding::BatchCap
            } else if b == b_hi {
                Binding::Memory
            } else {
                Binding::Slo
            };
            let per_mb = b as f64 / pp as f64;
            let whole = roof.colocated_layer_s(tp, per_mb);
            let attn = roof.attention_s(tp, per_mb)?;
            let times = StageTimes {
                t_a_s: attn,
                t_e_s: whole - attn,
                t_c_s: 0.0,
            };
            let plan = Plan {
                layout: Layout::Colocated,
                model: model.name.clone(),
                attention_hw: hw.name.clone(),
                expert_hw: hw.name.clone(),
                tp_a: tp,
                n_a: 1,
                tp_e: tp,
                experts_per_worker: model.num_experts as u32,
                expert_workers: 0,
                pp,
                micro_batches: pp,
                micro_batch_seqs: (b / pp).max(1),
                global_batch: b,
                tokens_per_expert: per_mb * model.top_k as f64 / model.num_experts as f64,
                times,
                tbt_s,
                eq5_step_s: tbt_s,
                min_micro_batches: 1.0,
                tokens_per_s,
                gpus_attention: gpus,
                gpus_expert: 0,
                cost_per_hour: price.map(|p| p * gpus as f64),
                price_unit: req.price_unit,
                tokens_per_s_per_gpu: tokens_per_s / gpus as f64,
                tokens_per_s_per_cost: price.map(|p| tokens_per_s / (p * gpus as f64)),
                power_w: hw.power_w.map(|w| w * gpus as f64),
                attention_mem_used_bytes: weights + kv_seq * b as f64,
                attention_mem_capacity_bytes: hw.memory_bytes(),
                expert_mem_used_bytes: 0.0,
                expert_mem_capacity_bytes: 0.0,
                binding,
                n_a_balance: 0.0,
                context_tokens: req.context_tokens,
                tbt_slo_s: req.tbt_slo_s,
                source: roof.describe(),
            };
            let better = best.as_ref().is_none_or(|cur| {
                plan.score(req.objective).unwrap_or(f64::MIN)
                    > cur.score(req.objective).unwrap_or(f64::MIN)
            });
            if better {
                best = Some(plan);
            }
        }
    }
    best.ok_or_else(|| {
        PlanError::Infeasible(format!("colocated on {}: {}", hw.name, why.join("; ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelCatalog;
    use crate::perf::stage_times;

    fn req(model: &str, a: &str, e: &str) -> PlanRequest {
        let m = ModelCatalog::builtin().unwrap().resolve(model).unwrap();
        PlanRequest::new(m, a, e)
    }

    fn cat() -> HardwareCatalog {
        HardwareCatalog::builtin().unwrap()
    }

    fn check_feasible(r: &PlanRequest, p: &Plan) {
        // Never returns a plan that violates the SLO or memory.
        assert!(p.tbt_s <= r.tbt_slo_s * (1.0 + 1e-12), "{p:?}");
        assert!(p.attention_mem_used_bytes <= p.attention_mem_capacity_bytes * r.mem_fraction);
        assert!(p.expert_mem_used_bytes <= p.expert_mem_capacity_bytes * r.mem_fraction);
        if let Some(g) = r.max_gpus {
            assert!(p.gpus() <= g);
        }
        assert!(
            p.micro_batches >= r.min_micro_batches && p.micro_batches <= r.max_micro_batches.max(8)
        );
        if p.layout == Layout::Disaggregated {
            assert_eq!(p.global_batch, p.micro_batch_seqs * p.micro_batches * p.n_a);
        }
    }

    #[test]
    fn plans_respect_slo_and_memory() {
        let c = cat();
        for (model, a, e, slo) in [
            ("mixtral", "H20", "L40S", 0.150),
            ("dbrx", "A800", "A800", 0.150),
            ("scaled-moe", "A800", "A800", 0.080),
            ("mixtral", "A800", "A800", 0.030),
        ] {
            let mut r = req(model, a, e);
            r.tbt_slo_s = slo;
            r.max_replicas = 16;
            r.max_gpus = Some(64);
            let rep = plan(&r, &c, PerfSource::Roofline).unwrap();
            assert!(!rep.ranked.is_empty());
            for p in &rep.ranked {
                check_feasible(&r, p);
            }
            for p in &rep.colocated {
                check_feasible(&r, p);
            }
            // The best plan's batch is maximal: one more sequence per micro-batch breaks
            // the constraint it reports.
            let best = rep.best().unwrap();
            let roof = Roofline::new(
                &c,
                &r.model,
                c.get(a).unwrap(),
                c.get(e).unwrap(),
                r.context_tokens,
            );
            let shape = PipelineShape {
                tp_a: best.tp_a,
                n_a: best.n_a,
                tp_e: best.tp_e,
                experts_per_worker: best.experts_per_worker,
                m: best.micro_batches,
                b_a: best.micro_batch_seqs as f64 + 1.0,
            };
            let t = stage_times(&roof, &r.model, &shape).unwrap();
            let tbt = closed_form::steady_tbt(&t, shape.m, r.model.moe_layers());
            let (w, kv) =
                attention_memory(&r.model, c.get(a).unwrap(), best.tp_a, r.context_tokens);
            let mem = w + kv * shape.m as f64 * shape.b_a;
            match best.binding {
                Binding::Slo => assert!(tbt > slo),
                Binding::Memory => assert!(mem > c.get(a).unwrap().memory_bytes() * r.mem_fraction),
                Binding::BatchCap => assert_eq!(best.micro_batch_seqs, r.max_micro_batch_seqs),
            }
        }
    }

    #[test]
    fn tight_slo_is_reported_as_binding() {
        let mut r = req("mixtral", "A800", "A800");
        r.tbt_slo_s = 0.002;
        r.max_replicas = 8;
        let e = plan(&r, &cat(), PerfSource::Roofline).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("TBT SLO binds") && s.contains("2.00 ms"), "{s}");
    }

    #[test]
    fn weights_that_do_not_fit_are_reported() {
        let mut r = req("deepseek-v3", "L20", "L20");
        r.max_tp_attention = Some(1);
        r.max_tp_expert = Some(1);
        r.experts_per_worker = Some(256);
        r.max_replicas = 2;
        let e = plan(&r, &cat(), PerfSource::Roofline)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory binds") && e.contains("expert worker"),
            "{e}"
        );
    }

    #[test]
    fn kv_memory_is_reported_when_it_binds() {
        let mut r = req("mixtral", "L20", "L40S");
        r.context_tokens = 2_000_000.0;
        r.max_replicas = 2;
        let e = plan(&r, &cat(), PerfSource::Roofline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory binds") && e.contains("KV cache"), "{e}");
    }

    #[test]
    fn gpu_budget_is_reported_when_it_binds() {
        let mut r = req("scaled-moe", "A800", "A800");
        r.max_gpus = Some(8);
        r.experts_per_worker = Some(1);
        r.max_replicas = 4;
        let e = plan(&r, &cat(), PerfSource::Roofline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU budget binds"), "{e}");
    }

    #[test]
    fn missing_price_and_bad_requests_are_clear() {
        let mut r = req("mixtral-8x7b", "cpu", "cpu");
        let e = plan(&r, &cat(), PerfSource::Roofline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("price"), "{e}");
        r.objective = Objective::PerGpu;
        r.tbt_slo_s = 60.0;
        r.max_replicas = 2;
        // The placeholder CPU: Mixtral-8x7B in f32 is 187 GB and does not fit 24 GB.
        let e = plan(&r, &cat(), PerfSource::Roofline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory binds"), "{e}");
        let mut r2 = req("olmoe-1b-7b", "cpu", "cpu");
        r2.objective = Objective::PerGpu;
        r2.tbt_slo_s = 10.0;
        r2.max_replicas = 2;
        let rep = plan(&r2, &cat(), PerfSource::Roofline).unwrap();
        assert!(rep.best().unwrap().tokens_per_s > 0.0);
        r2.tbt_slo_s = -1.0;
        assert!(matches!(
            plan(&r2, &cat(), PerfSource::Roofline),
            Err(PlanError::Invalid(_))
        ));
        let mut r3 = req("mixtral", "nope", "L40S");
        r3.max_replicas = 1;
        assert!(matches!(
            plan(&r3, &cat(), PerfSource::Roofline),
            Err(PlanError::UnknownHardware { .. })
        ));
    }

    #[test]
    fn exhaustive_replicas_never_lose_to_balance() {
        let c = cat();
        let mut r = req("dbrx", "H20", "L40S");
        r.experts_per_worker = Some(1);
        r.max_replicas = 32;
        r.replica_search = ReplicaSearch::Balance;
        let bal = plan(&r, &c, PerfSource::Roofline).unwrap();
        r.replica_search = ReplicaSearch::Exhaustive;
        let ex = plan(&r, &c, PerfSource::Roofline).unwrap();
        let s = |p: &PlanReport| p.best().unwrap().tokens_per_s_per_cost.unwrap();
        assert!(s(&ex) >= s(&bal) * (1.0 - 1e-12));
        // Every answer comes with its colocated ratio.
        assert!(ex.ratio(ex.best().unwrap()).is_some());
    }

    #[test]
    fn profile_source_is_used_for_its_pair() {
        let c = cat();
        let r0 = req("mixtral", "H20", "L40S");
        let roof = Roofline::new(
            &c,
            &r0.model,
            c.get("H20").unwrap(),
            c.get("L40S").unwrap(),
            730.0,
        );
        let prof = Profile::from_stage_model(
            &roof,
            "mixtral-8x22b",
            "H20",
            "L40S",
            &[2],
            &[1],
            730.0,
            512.0,
        )
        .unwrap();
        let mut r = r0.clone();
        r.max_replicas = 16;
        let rep = plan(&r, &c, PerfSource::Profile(&prof)).unwrap();
        let best = rep.best().unwrap();
        assert!(best.source.starts_with("profile"));
        assert_eq!((best.tp_a, best.tp_e), (2, 1));
    }

    #[test]
    fn a_profile_named_by_an_alias_is_used() {
        // `tandem profile` writes attention_hw = "cpu"; the catalog entry is named
        // differently and lists "cpu" as an alias.
        let c = cat();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/mixtral");
        let m = ModelCatalog::builtin().unwrap().resolve(dir).unwrap();
        let mut r = PlanRequest::new(m, "cpu", "cpu");
        r.objective = Objective::PerGpu;
        r.tbt_slo_s = 1.0;
        let cpu = c.get("cpu").unwrap();
        assert_ne!(cpu.name, "cpu");
        let roof = Roofline::new(&c, &r.model, cpu, cpu, 730.0);
        let prof =
            Profile::from_stage_model(&roof, "mixtral", "cpu", "cpu", &[1], &[1], 730.0, 64.0)
                .unwrap();
        let rep = plan(&r, &c, PerfSource::Profile(&prof)).unwrap();
        assert!(
            rep.best().unwrap().source.starts_with("profile"),
            "{:?}",
            rep.best()
        );
    }

    #[test]
    fn planning_for_imbalance_shrinks_the_batch_and_keeps_the_slo() {
        let c = cat();
        let mut r = req("dbrx", "A800", "A800");
        r.tbt_slo_s = 0.040;
        r.experts_per_worker = Some(1);
        r.max_replicas = 16;
        let bal = plan(&r, &c, PerfSource::Roofline).unwrap();
        r.expert_load_factor = 1.8;
        let skew = plan(&r, &c, PerfSource::Roofline).unwrap();
        let (b, s) = (bal.best().unwrap(), skew.best().unwrap());
        assert!(s.tokens_per_s_per_cost.unwrap() < b.tokens_per_s_per_cost.unwrap());
        assert!(s.tbt_s <= r.tbt_slo_s);
        // Its T_e is the busiest worker's: 1.8x the mean tokens.
        let roof = Roofline::new(
            &c,
            &r.model,
            c.get("A800").unwrap(),
            c.get("A800").unwrap(),
            730.0,
        );
        let te = roof
            .expert_balanced_s(s.tp_e, 1, s.tokens_per_expert * 1.8)
            .unwrap();
        assert!((te - s.times.t_e_s).abs() < 1e-12);
        r.expert_load_factor = 0.5;
        assert!(matches!(
            plan(&r, &c, PerfSource::Roofline),
            Err(PlanError::Invalid(_))
        ));
    }

    #[test]
    fn largest_ok_finds_the_edge() {
        assert_eq!(largest_ok(1, 100, |b| Ok(b <= 37)).unwrap(), Some(37));
        assert_eq!(largest_ok(1, 100, |_| Ok(false)).unwrap(), None);
        assert_eq!(largest_ok(1, 100, |_| Ok(true)).unwrap(), Some(100));
    }
}
