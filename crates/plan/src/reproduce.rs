//! `tandem plan reproduce`: runs the paper's experiments through the planner and the
//! simulator and writes `reproduction.md` with SVG plots under `img/`.
//!
//! Nothing here is tuned per model: every number comes from the shipped catalogs, the one
//! set of efficiency factors, and the paper's workload (SLO 150 ms, context 571 + 159 = 730).

use crate::error::{write_file, Result};
use crate::hardware::HardwareCatalog;
use crate::model::{ModelCatalog, ModelShape};
use crate::perf::{PipelineShape, Roofline};
use crate::planner::{self, Objective, PerfSource, Plan, PlanRequest, ReplicaSearch};
use crate::sim::{self, Imbalance, SimConfig, SimReport};
use crate::svg::{self, Series};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The paper's three models (Table 4) and their published numbers.
struct PaperModel {
    name: &'static str,
    label: &'static str,
    /// m = 2 -> 3 gain (section 7 ablation).
    gain_m2_m3: f64,
    /// Per-GPU throughput vs vLLM / TensorRT-LLM (homogeneous cluster, "up to").
    vs_vllm: f64,
    vs_trt: f64,
}

const PAPER: [PaperModel; 3] = [
    PaperModel {
        name: "mixtral-8x22b",
        label: "Mixtral 8x22B",
        gain_m2_m3: 1.10,
        vs_vllm: 2.56,
        vs_trt: 1.28,
    },
    PaperModel {
        name: "dbrx",
        label: "DBRX",
        gain_m2_m3: 1.28,
        vs_vllm: 2.56,
        vs_trt: 1.28,
    },
    PaperModel {
        name: "scaled-moe",
        label: "Scaled-MoE",
        gain_m2_m3: 1.38,
        vs_vllm: 7.11,
        vs_trt: 1.90,
    },
];

/// Paper: m = 1 -> 2 gives ~1.9x.
const PAPER_GAIN_M1_M2: f64 = 1.9;
/// Paper: heterogeneous throughput per cost vs vLLM / TensorRT-LLM on H20, "up to".
const PAPER_HETERO_VS_VLLM: f64 = 3.24;
const PAPER_HETERO_VS_TRT: f64 = 1.86;

/// The SLO of the imbalance-aware planning example, seconds (tight enough to bind).
const SKEW_CASE_SLO_S: f64 = 0.050;

/// The homogeneous cluster: 8 nodes x 8 Ampere 80 GB GPUs.
const CLUSTER_GPUS: u32 = 64;

/// What the run produced.
#[derive(Debug, Clone)]
pub struct ReproSummary {
    pub markdown: PathBuf,
    pub images: Vec<PathBuf>,
    /// One line per headline number: ours vs the paper's.
    pub headlines: Vec<String>,
}

fn base_request(model: &ModelShape, a: &str, e: &str, objective: Objective) -> PlanRequest {
    let mut r = PlanRequest::new(model.clone(), a, e);
    r.objective = objective;
    r.max_gpus = Some(CLUSTER_GPUS);
    r.experts_per_worker = Some(1);
    r.max_replicas = 48;
    r.keep = 1;
    r
}

fn colocated(req: &PlanRequest, cat: &HardwareCatalog, hw: &str) -> Result<Plan> {
    let h = cat.get(hw)?;
    let roof = Roofline::new(cat, &req.model, h, h, req.context_tokens);
    planner::plan_colocated(req, h, &roof)
}

/// The colocated deployment as the paper's baselines run it: one node with TP, more nodes
/// (pipeline stages) only when the weights do not fit one.
fn colocated_fewest_nodes(req: &PlanRequest, cat: &HardwareCatalog, hw: &str) -> Result<Plan> {
    let mut last = None;
    for pp in [1, 2, 4, 8] {
        let mut r = req.clone();
        r.colocated_max_pp = pp;
        match colocated(&r, cat, hw) {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| crate::PlanError::Infeasible("no colocated plan".into())))
}

fn disagg(req: &PlanRequest, cat: &HardwareCatalog) -> Result<Plan> {
    let rep = planner::plan(req, cat, PerfSource::Roofline)?;
    rep.ranked
        .into_iter()
        .next()
        .ok_or_else(|| crate::PlanError::Infeasible("empty".into()))
}

fn shape_of(p: &Plan) -> PipelineShape {
    PipelineShape {
        tp_a: p.tp_a,
        n_a: p.n_a,
        tp_e: p.tp_e,
        experts_per_worker: p.experts_per_worker,
        m: p.micro_batches,
        b_a: p.micro_batch_seqs as f64,
    }
}

fn plan_cell(p: &Plan) -> String {
    match p.layout {
        planner::Layout::Disaggregated => format!(
            "{} x{} x{} + {} x{} x{}, m={}, b_a={}",
            p.attention_hw,
            p.tp_a,
            p.n_a,
            p.expert_hw,
            p.tp_e,
            p.expert_workers,
            p.micro_batches,
            p.micro_batch_seqs
        ),
        planner::Layout::Colocated => format!(
            "{} TP{} x PP{}, B={}",
            p.attention_hw, p.tp_a, p.pp, p.global_batch
        ),
    }
}

/// `-0.0000` prints as `0.0000`.
fn no_neg_zero(x: f64) -> f64 {
    if x.abs() < 5e-5 {
        0.0
    } else {
        x
    }
}

fn pct(ours: f64, paper: f64) -> String {
    format!("{:+.0}%", (ours / paper - 1.0) * 100.0)
}

fn binding(p: &Plan) -> &'static str {
    match p.binding {
        planner::Binding::Slo => "SLO",
        planner::Binding::Memory => "memory",
        planner::Binding::BatchCap => "batch cap",
    }
}

struct Homog {
    label: &'static str,
    dis: Plan,
    col: Plan,
    node: Plan,
    bal: Option<Plan>,
}

struct Ablation {
    label: &'static str,
    /// tokens/s by m = 1..=4: (closed form, simulated, plan), None where infeasible.
    tput: Vec<Option<(f64, f64, Plan)>>,
}

struct Hetero {
    label: &'static str,
    plans: Vec<Option<Plan>>,
    /// H20 + L40S with Algorithm 1's BALANCE only.
    balance: Option<Plan>,
}

/// The setups of the heterogeneous comparison: (attention, experts, colocated).
const SETUPS: [(&str, &str, bool); 9] = [
    ("H20", "L40S", false),
    ("H20", "H20", false),
    ("L40S", "L40S", false),
    ("A800", "A800", false),
    ("H800", "H800", false),
    ("H20", "H20", true),
    ("L40S", "L40S", true),
    ("A800", "A800", true),
    ("H800", "H800", true),
];

/// Section 2: per-GPU plans on the homogeneous A800 cluster.
fn run_homog(cat: &HardwareCatalog, models: &ModelCatalog) -> Result<Vec<Homog>> {
    let mut out = Vec::new();
    for pm in &PAPER {
        let model = models.resolve(pm.name)?;
        let req = base_request(&model, "A800", "A800", Objective::PerGpu);
        let dis = disagg(&req, cat)?;
        let col = colocated(&req, cat, "A800")?;
        let node = colocated_fewest_nodes(&req, cat, "A800")?;
        let mut breq = req.clone();
        breq.replica_search = ReplicaSearch::Balance;
        let bal = disagg(&breq, cat).ok();
        out.push(Homog {
            label: pm.label,
            dis,
            col,
            node,
            bal,
        });
    }
    Ok(out)
}

/// Section 1: the homogeneous plans with m = 1..=4, simulated.
fn run_ablation(
    cat: &HardwareCatalog,
    models: &ModelCatalog,
    homog: &[Homog],
) -> Result<Vec<Ablation>> {
    let mut out = Vec::new();
    for (pm, h) in PAPER.iter().zip(homog) {
        let model = models.resolve(pm.name)?;
        let req = base_request(&model, "A800", "A800", Objective::PerGpu);
        let hw = cat.get("A800")?;
        let roof = Roofline::new(cat, &model, hw, hw, req.context_tokens);
        let mut tput = Vec::new();
        for m in 1..=4 {
            let p = planner::plan_fixed_shape(
                &req, cat, "A800", "A800", h.dis.tp_a, h.dis.n_a, h.dis.tp_e, 1, m,
            )?;
            match p {
                Some(p) => {
                    let mut cfg = SimConfig::new(shape_of(&p));
                    cfg.steps = 4;
                    let s = sim::simulate(&roof, &model, &cfg)?;
                    tput.push(Some((p.tokens_per_s, s.tokens_per_s, p)));
                }
                None => tput.push(None),
            }
        }
        out.push(Ablation {
            label: pm.label,
            tput,
        });
    }
    Ok(out)
}

/// Section 3: per-cost plans on every setup.
fn run_hetero(cat: &HardwareCatalog, models: &ModelCatalog) -> Result<Vec<Hetero>> {
    let mut out = Vec::new();
    for pm in &PAPER {
        let model = models.resolve(pm.name)?;
        let mut plans = Vec::new();
        for (a, e, col) in SETUPS {
            let req = base_request(&model, a, e, Objective::PerCost);
            let p = if col {
                colocated(&req, cat, a)
            } else {
                disagg(&req, cat)
            };
            plans.push(p.ok());
        }
        let mut breq = base_request(&model, "H20", "L40S", Objective::PerCost);
        breq.replica_search = ReplicaSearch::Balance;
        let balance = disagg(&breq, cat).ok();
        out.push(Hetero {
            label: pm.label,
            plans,
            balance,
        });
    }
    Ok(out)
}

fn gain(a: &Ablation, i: usize) -> f64 {
    match (&a.tput[i - 1], &a.tput[i]) {
        (Some(x), Some(y)) => y.1 / x.1,
        _ => f64::NAN,
    }
}

fn hetero_vs_colocated_h20(h: &Hetero) -> f64 {
    let score = |i: usize| h.plans[i].as_ref().and_then(|p| p.tokens_per_s_per_cost);
    match (score(0), score(5)) {
        (Some(a), Some(b)) => a / b,
        _ => f64::NAN,
    }
}

/// Headline ratios under one catalog, for the sensitivity table: m 2->3 gain per model,
/// disaggregated / colocated (fewest nodes) per GPU per model, H20+L40S / colocated H20 per
/// cost per model.
fn headline_ratios(cat: &HardwareCatalog, models: &ModelCatalog) -> Result<Vec<f64>> {
    let homog = run_homog(cat, models)?;
    let abl = run_ablation(cat, models, &homog)?;
    let het = run_hetero(cat, models)?;
    let mut v: Vec<f64> = abl.iter().map(|a| gain(a, 2)).collect();
    v.extend(
        homog
            .iter()
            .map(|h| h.dis.tokens_per_s_per_gpu / h.node.tokens_per_s_per_gpu),
    );
    v.extend(het.iter().map(hetero_vs_colocated_h20));
    Ok(v)
}

/// Section 6's simulations.
struct SimRuns {
    sims: Vec<(&'static str, SimReport)>,
    starved: SimReport,
    /// The SLO-bound plan and its simulation, then the load-aware plan and its.
    skew_case: (Plan, SimReport, Plan, SimReport),
}

/// Every experiment's results, which the figures and the report are made from.
struct Experiments {
    eff: crate::hardware::Efficiency,
    homog: Vec<Homog>,
    ablation: Vec<Ablation>,
    hetero: Vec<Hetero>,
    sensitivity: Vec<(String, Vec<f64>)>,
    runs: SimRuns,
}

/// Section 5: the headline ratios again with one efficiency factor changed at a time.
fn sensitivity(cat: &HardwareCatalog, models: &ModelCatalog) -> Result<Vec<(String, Vec<f64>)>> {
    // Sensitivity of the headline ratios to the efficiency factors (one factor at a time).
    let variants: Vec<(String, HardwareCatalog)> = {
        let mut v = vec![("as shipped".to_string(), cat.clone())];
        let mut add = |name: &str, f: &dyn Fn(&mut crate::hardware::Efficiency)| {
            let mut c = cat.clone();
            f(&mut c.defaults);
            v.push((name.to_string(), c));
        };
        add("GEMM efficiency 0.55", &|e| e.gemm = 0.55);
        add("GEMM efficiency 0.85", &|e| e.gemm = 0.85);
        add("memory efficiency 0.65", &|e| e.memory = 0.65);
        add("memory efficiency 0.90", &|e| e.memory = 0.90);
        add("M2N latency 3 us", &|e| e.nic_latency_us = 3.0);
        add("M2N latency 30 us", &|e| e.nic_latency_us = 30.0);
        add("stage overhead 5 us", &|e| e.stage_overhead_us = 5.0);
        add("stage overhead 60 us", &|e| e.stage_overhead_us = 60.0);
        let mut l40s = cat.clone();
        if let Some(d) = l40s.devices.iter_mut().find(|d| d.name == "L40S") {
            let mut o = d.efficiency.unwrap_or_default();
            o.gemm = Some(0.50);
            d.efficiency = Some(o);
        }
        v.push(("GEMM efficiency 0.50 on L40S only".to_string(), l40s));
        v
    };
    let mut sensitivity = Vec::new();
    for (name, c) in &variants {
        sensitivity.push((name.clone(), headline_ratios(c, models)?));
    }
    Ok(sensitivity)
}

/// Section 6's runs: the Mixtral plan `mix_plan` simulated under each scenario, starved at
/// m = 2, and planned for imbalance.
fn simulator_runs(
    cat: &HardwareCatalog,
    models: &ModelCatalog,
    mix_plan: &Plan,
) -> Result<SimRuns> {
    let mix = models.resolve("mixtral-8x22b")?;
    let a800 = cat.get("A800")?;
    let mix_roof = Roofline::new(cat, &mix, a800, a800, 730.0);
    let scenarios: Vec<(&str, Imbalance, f64, f64)> = vec![
        (
            "balanced (closed-form assumptions)",
            Imbalance::None,
            0.0,
            0.0,
        ),
        (
            "uniform routing, sampled",
            Imbalance::Zipf { skew: 0.0 },
            0.0,
            0.0,
        ),
        ("Zipf skew 0.5", Imbalance::Zipf { skew: 0.5 }, 0.0, 0.0),
        ("Zipf skew 1.0", Imbalance::Zipf { skew: 1.0 }, 0.0, 0.0),
        ("jitter cv 0.3", Imbalance::None, 0.3, 0.0),
        ("stragglers 1% x3", Imbalance::None, 0.0, 0.01),
        (
            "skew 0.5 + jitter 0.3 + stragglers",
            Imbalance::Zipf { skew: 0.5 },
            0.3,
            0.01,
        ),
    ];
    let mut sims: Vec<(&str, SimReport)> = Vec::new();
    for (name, imb, jit, strag) in scenarios {
        let mut cfg = SimConfig::new(shape_of(mix_plan));
        cfg.steps = 8;
        cfg.imbalance = imb;
        cfg.jitter_cv = jit;
        cfg.straggler_prob = strag;
        cfg.straggler_factor = 3.0;
        cfg.seed = 2025;
        cfg.timeline_step = Some(1);
        sims.push((name, sim::simulate(&mix_roof, &mix, &cfg)?));
    }
    // A starved pipeline (m = 2) for contrast.
    let starved = {
        let mut sh = shape_of(mix_plan);
        sh.m = 2;
        let mut cfg = SimConfig::new(sh);
        cfg.steps = 4;
        cfg.timeline_step = Some(1);
        sim::simulate(&mix_roof, &mix, &cfg)?
    };

    // Planning for imbalance: an SLO-bound Mixtral plan sized with and without the load
    // factor the simulator measures under Zipf skew 0.5.
    let skew_case = {
        let mut req = base_request(&mix, "A800", "A800", Objective::PerGpu);
        req.tbt_slo_s = SKEW_CASE_SLO_S;
        let balanced = disagg(&req, cat)?;
        let run = |p: &Plan| -> Result<SimReport> {
            let mut cfg = SimConfig::new(shape_of(p));
            cfg.steps = 8;
            cfg.imbalance = Imbalance::Zipf { skew: 0.5 };
            cfg.seed = 2025;
            sim::simulate(&mix_roof, &mix, &cfg)
        };
        let sim_bal = run(&balanced)?;
        req.expert_load_factor = sim_bal.worker_load_max_over_mean;
        let aware = disagg(&req, cat)?;
        let sim_aware = run(&aware)?;
        (balanced, sim_bal, aware, sim_aware)
    };
    Ok(SimRuns {
        sims,
        starved,
        skew_case,
    })
}

/// A setup's name in the figures and tables.
fn setup_name((a, e, col): (&str, &str, bool)) -> String {
    if col {
        format!("colocated {a}")
    } else if a == e {
        format!("disagg. {a}")
    } else {
        format!("disagg. {a} + {e}")
    }
}

/// Tokens/s per cost of five of the setups, one series each, for the figure.
fn hetero_series(hetero: &[Hetero]) -> Vec<Series> {
    SETUPS
        .iter()
        .enumerate()
        .filter(|(i, _)| [0usize, 1, 3, 5, 7].contains(i))
        .map(|(i, s)| Series {
            name: setup_name(*s),
            values: hetero
                .iter()
                .map(|h| {
                    h.plans[i]
                        .as_ref()
                        .and_then(|p| p.tokens_per_s_per_cost)
                        .unwrap_or(f64::NAN)
                })
                .collect(),
        })
        .collect()
}

/// The figures: writes every SVG under `img` and returns their paths.
fn plots(ex: &Experiments, img: &Path) -> Result<Vec<PathBuf>> {
    let Experiments {
        homog,
        ablation,
        hetero,
        runs: SimRuns { sims, starved, .. },
        ..
    } = ex;
    let mix_plan = &homog[0].dis;
    let mut images = Vec::new();
    let labels: Vec<String> = PAPER.iter().map(|p| p.label.to_string()).collect();
    let mut save = |name: &str, text: String| -> Result<()> {
        let p = img.join(name);
        write_file(&p, &text)?;
        images.push(p);
        Ok(())
    };
    let norm_series: Vec<Series> = ablation
        .iter()
        .map(|a| {
            let base = a.tput[0].as_ref().map(|t| t.1).unwrap_or(f64::NAN);
            Series {
                name: format!("{} (simulated)", a.label),
                values: a
                    .tput
                    .iter()
                    .map(|t| t.as_ref().map_or(f64::NAN, |t| t.1 / base))
                    .collect(),
            }
        })
        .collect();
    save(
        "microbatch_ablation.svg",
        svg::lines(
            "Throughput vs micro-batches (A800 cluster, normalised to m = 1)",
            "micro-batches m",
            "throughput / throughput at m = 1",
            &[1.0, 2.0, 3.0, 4.0],
            &norm_series,
        ),
    )?;
    save(
        "microbatch_gain_2_to_3.svg",
        svg::grouped_bars(
            "Gain from m = 2 to m = 3: paper vs tandem-plan",
            "throughput ratio",
            &labels,
            &[
                Series {
                    name: "paper".into(),
                    values: PAPER.iter().map(|p| p.gain_m2_m3).collect(),
                },
                Series {
                    name: "tandem-plan (sim)".into(),
                    values: ablation.iter().map(|a| gain(a, 2)).collect(),
                },
            ],
        ),
    )?;
    save(
        "homogeneous_per_gpu.svg",
        svg::grouped_bars(
            "Decode throughput per GPU, A800 cluster (SLO 150 ms, context 730)",
            "tokens/s per GPU",
            &labels,
            &[
                Series {
                    name: "disaggregated".into(),
                    values: homog.iter().map(|h| h.dis.tokens_per_s_per_gpu).collect(),
                },
                Series {
                    name: "colocated, best TP x PP".into(),
                    values: homog.iter().map(|h| h.col.tokens_per_s_per_gpu).collect(),
                },
                Series {
                    name: "colocated, fewest nodes".into(),
                    values: homog.iter().map(|h| h.node.tokens_per_s_per_gpu).collect(),
                },
            ],
        ),
    )?;
    let het_series = hetero_series(hetero);
    save(
        "heterogeneous_per_cost.svg",
        svg::grouped_bars(
            "Decode throughput per cost (tokens/s per L20-normalised price unit)",
            "tokens/s per price unit",
            &labels,
            &het_series,
        ),
    )?;
    let sim_rel: Vec<f64> = sims
        .iter()
        .map(|(_, s)| s.tokens_per_s / s.closed_tokens_per_s)
        .collect();
    save(
        "simulator_vs_closed_form.svg",
        svg::grouped_bars(
            "Mixtral 8x22B plan: simulated throughput / closed form",
            "ratio",
            &sims
                .iter()
                .enumerate()
                .map(|(i, _)| format!("S{}", i + 1))
                .collect::<Vec<_>>(),
            &[Series {
                name: "simulated / Eq. 4-5".into(),
                values: sim_rel,
            }],
        ),
    )?;
    if let Some((_, s)) = sims.first() {
        save(
            "timeline_mixtral.svg",
            svg::timeline(
                &format!(
                    "One steady decode step, first 3 of 56 layers: {}",
                    plan_cell(mix_plan)
                ),
                &s.timeline_rows,
                &s.timeline,
                Some(3),
            ),
        )?;
    }
    save(
        "timeline_mixtral_m2.svg",
        svg::timeline(
            "Same deployment with m = 2: the pipeline starves (first 3 layers)",
            &starved.timeline_rows,
            &starved.timeline,
            Some(3),
        ),
    )?;
    Ok(images)
}

/// The title, the setting, the headline table and the efficiency factors.
fn md_head(md: &mut String, ex: &Experiments) {
    let Experiments {
        ablation,
        homog,
        hetero,
        runs: SimRuns { sims, .. },
        eff,
        ..
    } = ex;
    let _ = writeln!(
        md,
        "# Reproducing MegaScale-Infer's numbers with tandem-plan\n"
    );
    let _ = writeln!(
        md,
        "Generated by `tandem plan reproduce --out docs/` (crate `tandem-plan`, module `reproduce`). Do not edit by hand: \
         change the catalogs, the model or the code and regenerate. Every number below is a prediction of the \
         performance model and the simulator for hardware we do not have; none is a measurement.\n"
    );
    let _ = writeln!(md, "Setting (the paper's): BF16 weights, activations and KV cache; time-between-tokens SLO 150 ms; \
        context 730 tokens per sequence (median input 571 + median output 159), used both for the KV read per step \
        and for the KV memory per sequence; one routed expert per expert worker, as in the paper; `m` searched in 1..4; \
        90% of device memory usable for weights + KV. The homogeneous cluster is at most {CLUSTER_GPUS} A800 GPUs \
        (8 nodes x 8, NVLink 400 GB/s, 200 Gbit/s per GPU). Hardware numbers are the paper's Table 3 \
        (`crates/plan/catalog/hardware.toml` lists every source).\n");

    let _ = writeln!(md, "## Headlines\n");
    let _ = writeln!(
        md,
        "| claim | paper | tandem-plan | how close |\n|---|---|---|---|"
    );
    for (a, pm) in ablation.iter().zip(&PAPER) {
        let _ = writeln!(
            md,
            "| {}: m = 1 -> 2 | ~{PAPER_GAIN_M1_M2}x | {:.2}x | {} |",
            a.label,
            gain(a, 1),
            pct(gain(a, 1), PAPER_GAIN_M1_M2)
        );
        let _ = writeln!(
            md,
            "| {}: m = 2 -> 3 | {:.2}x | {:.2}x | {} |",
            a.label,
            pm.gain_m2_m3,
            gain(a, 2),
            pct(gain(a, 2), pm.gain_m2_m3)
        );
    }
    for (h, pm) in homog.iter().zip(&PAPER) {
        let rn = h.dis.tokens_per_s_per_gpu / h.node.tokens_per_s_per_gpu;
        let _ = writeln!(md, "| {}: disaggregated / colocated, per GPU | {:.2}x vs TensorRT-LLM ({:.2}x vs vLLM) | {:.2}x vs an ideal colocated deployment | {} vs TensorRT-LLM |", h.label, pm.vs_trt, pm.vs_vllm, rn, pct(rn, pm.vs_trt));
    }
    for h in hetero {
        let r = hetero_vs_colocated_h20(h);
        let _ = writeln!(md, "| {}: H20 + L40S / colocated H20, per cost | up to {PAPER_HETERO_VS_TRT}x vs TensorRT-LLM ({PAPER_HETERO_VS_VLLM}x vs vLLM) | {:.2}x | {} |", h.label, r, pct(r, PAPER_HETERO_VS_TRT));
    }
    if let Some((_, s)) = sims.first() {
        let _ = writeln!(md, "| simulator vs Eq. 5, balanced routing, no jitter | (acceptance: within 1%) | {:.4}% | exact |", no_neg_zero(s.eq5_rel_err * 100.0));
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Performance model and its efficiency factors\n");
    let _ = writeln!(md, "Per layer and micro-batch, `T_a` sums rooflines `max(FLOPs / (peak x gemm), bytes / (bandwidth x memory))` over the attention side's GEMMs \
        (QKV, output, router; the LM head and any dense layers amortised over the MoE layers) and the attention core (KV read of the whole context), plus the TP all-reduce \
        over the intra-node link and a fixed stage overhead. `T_e` sums one roofline per expert on the worker (weights read once, `2 * 3 * h * h' * tokens / tp_e` FLOPs) \
        plus a reduce-scatter and the overhead. `T_c` is Eq. 6 with `Util(size) = peak * s / (s + W * latency)`. One set of factors for every GPU (the CPU placeholder has its own):\n");
    let _ = writeln!(md, "| factor | value | basis |\n|---|---|---|");
    let _ = writeln!(md, "| GEMM efficiency | {:.2} | cuBLAS/CUTLASS BF16 GEMMs reach 70-80% of dense peak on A100/H100 at large sizes; the low end because expert GEMMs are short-and-wide |", eff.gemm);
    let _ = writeln!(md, "| memory efficiency | {:.2} | streaming reads of weights and paged KV reach 75-90% of peak HBM/GDDR bandwidth in decode kernels |", eff.memory);
    let _ = writeln!(
        md,
        "| intra-node link efficiency | {:.2} | NCCL bus bandwidth vs link rate |",
        eff.intra_link
    );
    let _ = writeln!(
        md,
        "| NIC peak utilisation | {:.2} | RDMA goodput vs line rate for large messages |",
        eff.nic_peak_util
    );
    let _ = writeln!(md, "| M2N per-message latency | {:.0} us | sets `Util(size)`: a 250 KB message reaches half of a 200 Gbit/s NIC's rate |", eff.nic_latency_us);
    let _ = writeln!(
        md,
        "| collective latency | {:.0} us | one NCCL all-reduce / reduce-scatter inside a node |",
        eff.collective_latency_us
    );
    let _ = writeln!(md, "| stage overhead | {:.0} us | per layer per stage: ~5 kernel launches under CUDA graphs |\n", eff.stage_overhead_us);
    let _ = writeln!(md, "These are engineering estimates, not measurements, and the same for every model: no constant is set per model or per experiment. \
        `tandem profile` (later) will replace them with fitted `k1..k4` and a measured `Util(size)` table; the file format is documented in \
        `crates/plan/src/profile.rs` and `tandem plan profile-template` writes one fitted to the roofline. Section 5 shows how much each factor moves the headline ratios.\n");
}

/// Section 1: micro-batches.
fn md_ablation(md: &mut String, ex: &Experiments, headlines: &mut Vec<String>) {
    let Experiments { ablation, .. } = ex;
    // 1. Ablation.
    let _ = writeln!(md, "## 1. Micro-batches (the paper's ping-pong ablation)\n");
    let _ = writeln!(md, "Each model's best homogeneous plan (section 2) is kept fixed (`tp_a`, `n_a`, `tp_e`); for each `m` the planner takes the largest batch that meets \
        the SLO and the memory limit, and the simulator (balanced routing) measures steady-state throughput. The paper does not state the batch of its ablation; \
        this is the batch the deployment would actually run at.\n");
    let _ = writeln!(md, "| model | plan at m = 3 | tok/s m=1 | m=2 | m=3 | m=4 | 1->2 (paper ~{PAPER_GAIN_M1_M2}) | 2->3 (paper) | 3->4 | T_c / T_f at m = 3 | m needed (constraint 3) |\n|---|---|---|---|---|---|---|---|---|---|---|");
    for (a, pm) in ablation.iter().zip(&PAPER) {
        let cells: Vec<String> = a
            .tput
            .iter()
            .map(|t| {
                t.as_ref()
                    .map_or("infeasible".into(), |t| format!("{:.0}", t.1))
            })
            .collect();
        let at3 = a.tput[2].as_ref();
        let ratio_tc = at3.map_or(f64::NAN, |t| t.2.times.t_c_s / t.2.times.t_f_s());
        let need = at3.map_or(f64::NAN, |t| t.2.min_micro_batches);
        let (g12, g23, g34) = (gain(a, 1), gain(a, 2), gain(a, 3));
        let shape = at3.map_or(String::new(), |t| plan_cell(&t.2));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.2} ({}) | {:.2} vs {:.2} ({}) | {:.2} | {:.2} | {:.2} |",
            a.label, shape, cells[0], cells[1], cells[2], cells[3], g12, pct(g12, PAPER_GAIN_M1_M2), g23, pm.gain_m2_m3, pct(g23, pm.gain_m2_m3), g34, ratio_tc, need
        );
        headlines.push(format!(
            "{}: m 1->2 {:.2}x (paper ~1.9x), m 2->3 {:.2}x (paper {:.2}x)",
            a.label, g12, g23, pm.gain_m2_m3
        ));
    }
    let _ = writeln!(md, "\n![micro-batch ablation](img/microbatch_ablation.svg)\n\n![gain 2 to 3](img/microbatch_gain_2_to_3.svg)\n");
    let _ = writeln!(md, "{ABLATION_NOTES}");
}

/// Section 2: disaggregated vs colocated per GPU.
fn md_homog(md: &mut String, ex: &Experiments, headlines: &mut Vec<String>) {
    let Experiments { homog, .. } = ex;
    // 2. Homogeneous.
    let _ = writeln!(
        md,
        "## 2. Disaggregated vs colocated, per GPU, homogeneous A800 cluster\n"
    );
    let _ = writeln!(md, "Disaggregated: the best plan by tokens/s per GPU within {CLUSTER_GPUS} GPUs. Colocated: one replica holding attention and all experts with TP (<= 8, inside a node), \
        with the same roofline, i.e. an ideal implementation. Two colocated baselines: *fewest nodes* (TP in one node; more nodes, as pipeline stages, only when the weights \
        do not fit one, which is how the paper's vLLM and TensorRT-LLM baselines are deployed) and *best TP x PP* (any of 1-8 pipeline stages with no bubbles and free \
        inter-stage transfers: more stages leave more memory for KV; an upper bound no deployed system reaches).\n");
    let _ = writeln!(md, "| model | disaggregated plan | tok/s/GPU | binds | colocated, fewest nodes | tok/s/GPU | ratio | colocated, best TP x PP | tok/s/GPU | ratio | paper vs TRT-LLM | paper vs vLLM |\n|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (h, pm) in homog.iter().zip(&PAPER) {
        let r = h.dis.tokens_per_s_per_gpu / h.col.tokens_per_s_per_gpu;
        let rn = h.dis.tokens_per_s_per_gpu / h.node.tokens_per_s_per_gpu;
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} ({}) | {:.0} | **{:.2}x** ({}) | {} ({}) | {:.0} | **{:.2}x** ({}) | {:.2}x | {:.2}x |",
            h.label,
            plan_cell(&h.dis),
            h.dis.tokens_per_s_per_gpu,
            binding(&h.dis),
            plan_cell(&h.node),
            binding(&h.node),
            h.node.tokens_per_s_per_gpu,
            rn,
            pct(rn, pm.vs_trt),
            plan_cell(&h.col),
            binding(&h.col),
            h.col.tokens_per_s_per_gpu,
            r,
            pct(r, pm.vs_trt),
            pm.vs_trt,
            pm.vs_vllm
        );
        headlines.push(format!("{}: disaggregated / colocated per GPU {:.2}x (fewest nodes) {:.2}x (best TP x PP); paper {:.2}x vs TensorRT-LLM, {:.2}x vs vLLM", h.label, rn, r, pm.vs_trt, pm.vs_vllm));
    }
    let _ = writeln!(md, "\n![per GPU](img/homogeneous_per_gpu.svg)\n");
    let _ = writeln!(md, "{HOMOG_NOTES}");
}

/// Section 3: heterogeneous vs homogeneous per cost.
fn md_hetero(md: &mut String, ex: &Experiments, headlines: &mut Vec<String>) {
    let Experiments { hetero, .. } = ex;
    let setups = SETUPS;
    // 3. Hetero.
    let _ = writeln!(
        md,
        "## 3. Heterogeneous H20 + L40S vs homogeneous, per cost\n"
    );
    let _ = writeln!(md, "The best plan by tokens/s per cost (the paper's normalised prices, L20 = 1.00) within {CLUSTER_GPUS} GPUs, SLO 150 ms. Cells: tokens/s per price unit (plan). \
        Colocated here is the best TP x PP.\n");
    let _ = write!(md, "| model |");
    for s in setups {
        let _ = write!(md, " {} |", setup_name(s));
    }
    let _ = writeln!(md, " H20+L40S / colocated H20 (paper: up to {PAPER_HETERO_VS_TRT}x vs TRT-LLM, {PAPER_HETERO_VS_VLLM}x vs vLLM) | H20+L40S / best homogeneous disagg. |");
    let _ = writeln!(md, "|{}", "---|".repeat(setups.len() + 3));
    for h in hetero {
        let _ = write!(md, "| {} |", h.label);
        for p in &h.plans {
            match p {
                Some(p) => {
                    let _ = write!(
                        md,
                        " {:.1} ({}) |",
                        p.tokens_per_s_per_cost.unwrap_or(f64::NAN),
                        plan_cell(p)
                    );
                }
                None => {
                    let _ = write!(md, " infeasible |");
                }
            }
        }
        let score = |i: usize| h.plans[i].as_ref().and_then(|p| p.tokens_per_s_per_cost);
        let vs_col = hetero_vs_colocated_h20(h);
        let best_homog = [1usize, 2, 3, 4]
            .iter()
            .filter_map(|&i| score(i))
            .fold(f64::NAN, f64::max);
        let vs_homog = score(0).map_or(f64::NAN, |a| a / best_homog);
        let _ = writeln!(
            md,
            " **{:.2}x** ({}) | {:.2}x |",
            vs_col,
            pct(vs_col, PAPER_HETERO_VS_TRT),
            vs_homog
        );
        headlines.push(format!("{}: H20+L40S per cost / colocated H20 {:.2}x (paper up to {PAPER_HETERO_VS_TRT}x vs TensorRT-LLM); / best homogeneous disaggregated {:.2}x", h.label, vs_col, vs_homog));
    }
    let _ = writeln!(md, "\n![per cost](img/heterogeneous_per_cost.svg)\n");
    let _ = writeln!(md, "{HETERO_NOTES}");
}

/// Section 4: Algorithm 1 against the widened search.
fn md_balance(md: &mut String, ex: &Experiments) {
    let Experiments { homog, hetero, .. } = ex;
    // BALANCE.
    let _ = writeln!(md, "## 4. Algorithm 1 as written vs the widened search\n");
    let _ = writeln!(md, "BALANCE fits `T_a = k1 b_a + k2` and `T_e = k3 b_e + k4` (least squares over b in 32..512 on the roofline) and sets `n_a = k1 E / (k3 K)`; \
        by default the planner also tries every `n_a` up to the limit (48 here) and keeps the best (`--balance-only` restores Algorithm 1).\n");
    let _ = writeln!(md, "| model | objective | BALANCE plan (its n_a) | value | exhaustive plan | value | gain |\n|---|---|---|---|---|---|---|");
    let row = |md: &mut String,
               label: &str,
               obj: &str,
               bal: &Option<Plan>,
               ex: Option<&Plan>,
               f: &dyn Fn(&Plan) -> f64| {
        match (bal, ex) {
            (Some(b), Some(e)) => {
                let _ = writeln!(
                    md,
                    "| {label} | {obj} | {} ({:.2}) | {:.1} | {} | {:.1} | {:.2}x |",
                    plan_cell(b),
                    b.n_a_balance,
                    f(b),
                    plan_cell(e),
                    f(e),
                    f(e) / f(b)
                );
            }
            (None, Some(e)) => {
                let _ = writeln!(
                    md,
                    "| {label} | {obj} | infeasible | | {} | {:.1} | |",
                    plan_cell(e),
                    f(e)
                );
            }
            _ => {
                let _ = writeln!(md, "| {label} | {obj} | | | infeasible | | |");
            }
        }
    };
    for h in homog {
        row(md, h.label, "tok/s/GPU, A800", &h.bal, Some(&h.dis), &|p| {
            p.tokens_per_s_per_gpu
        });
    }
    for h in hetero {
        row(
            md,
            h.label,
            "tok/s/cost, H20 + L40S",
            &h.balance,
            h.plans[0].as_ref(),
            &|p| p.tokens_per_s_per_cost.unwrap_or(f64::NAN),
        );
    }
    let _ = writeln!(md, "\n{BALANCE_NOTES}");
}

/// Section 5: sensitivity to the efficiency factors.
fn md_sensitivity(md: &mut String, ex: &Experiments) {
    let Experiments { sensitivity, .. } = ex;
    // 5. Sensitivity.
    let _ = writeln!(md, "## 5. Sensitivity to the efficiency factors\n");
    let _ = writeln!(md, "Each row changes one factor for every device and reruns sections 1-3. Columns: the m = 2 -> 3 gain, disaggregated / colocated (fewest nodes) per GPU, \
        and H20 + L40S / colocated H20 per cost.\n");
    let _ = write!(md, "| variant |");
    for what in ["2->3", "disagg/coloc per GPU", "hetero/coloc H20 per cost"] {
        for pm in &PAPER {
            let _ = write!(md, " {} {what} |", pm.label);
        }
    }
    let _ = writeln!(md, "\n|{}", "---|".repeat(10));
    let _ = write!(md, "| paper |");
    for pm in &PAPER {
        let _ = write!(md, " {:.2} |", pm.gain_m2_m3);
    }
    for pm in &PAPER {
        let _ = write!(md, " {:.2} (TRT) |", pm.vs_trt);
    }
    for _ in &PAPER {
        let _ = write!(md, " <= {PAPER_HETERO_VS_TRT} (TRT) |");
    }
    let _ = writeln!(md);
    for (name, v) in sensitivity {
        let _ = write!(md, "| {name} |");
        for x in v {
            let _ = write!(md, " {x:.2} |");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "\n{SENSITIVITY_NOTES}");
}

/// Section 6: the simulator against the closed form.
fn md_simulator(md: &mut String, ex: &Experiments, headlines: &mut Vec<String>) {
    let Experiments {
        homog,
        runs: SimRuns {
            sims,
            starved,
            skew_case,
        },
        ..
    } = ex;
    let mix_plan = &homog[0].dis;
    // 6. Simulator.
    let _ = writeln!(md, "## 6. Simulator vs closed form\n");
    let _ = writeln!(md, "The Mixtral 8x22B plan of section 2 ({}), 8 decode steps, seed 2025. S1 has the closed form's assumptions (balanced routing, no jitter); \
        the others add what the closed form is blind to. `tandem simulate --plan FILE [--skew S | --routing-trace T] [--jitter CV] [--straggler-prob P]` runs the same on any plan file.\n", plan_cell(mix_plan));
    let _ = writeln!(md, "| | scenario | Eq. 5 step (ms) | simulated first step (ms) | closed-form TBT (ms) | simulated TBT mean / p99 (ms) | tok/s closed | tok/s simulated | sim / closed | busiest worker / mean load | expert utilisation (mean) |\n|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, (name, s)) in sims.iter().enumerate() {
        let eu = s.expert_util.iter().map(|u| u.utilisation).sum::<f64>()
            / s.expert_util.len().max(1) as f64;
        let _ = writeln!(
            md,
            "| S{} | {} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} |",
            i + 1,
            name,
            s.eq5_step_s * 1e3,
            s.first_step_s * 1e3,
            s.closed_tbt_s * 1e3,
            s.tbt_mean_s * 1e3,
            s.tbt_p99_s * 1e3,
            s.closed_tokens_per_s,
            s.tokens_per_s,
            s.tokens_per_s / s.closed_tokens_per_s,
            s.worker_load_max_over_mean,
            eu
        );
    }
    if let Some((_, s)) = sims.first() {
        headlines.push(format!(
            "simulator vs Eq. 5 (balanced, no jitter): {:.4}%",
            no_neg_zero(s.eq5_rel_err * 100.0)
        ));
    }
    let _ = writeln!(
        md,
        "\n![simulated / closed form](img/simulator_vs_closed_form.svg)\n"
    );
    let _ = writeln!(md, "What the simulator reports for S7:\n");
    if let Some((_, s)) = sims.last() {
        for f in &s.findings {
            let _ = writeln!(md, "- {f}");
        }
    }
    let _ = writeln!(md, "\nAnd for the same deployment with `m = 2`:\n");
    for f in &starved.findings {
        let _ = writeln!(md, "- {f}");
    }
    let _ = writeln!(
        md,
        "\n![timeline](img/timeline_mixtral.svg)\n\n![timeline m=2](img/timeline_mixtral_m2.svg)\n"
    );
    let _ = writeln!(md, "{SIM_NOTES}");
    {
        let (bal, sb, aware, sa) = &skew_case;
        let _ = writeln!(md, "**Planning for imbalance.** The closed form sizes the batch for balanced routing. With a tighter SLO ({:.0} ms) the Mixtral plan becomes SLO-bound. \
            The table simulates it under Zipf skew 0.5, and the plan made again with `--expert-load-factor` set to the busiest-worker load the simulator measured on the first ({:.2}):\n", SKEW_CASE_SLO_S * 1e3, sb.worker_load_max_over_mean);
        let _ = writeln!(md, "| plan | predicted TBT (ms) | predicted tok/s/GPU | simulated TBT mean / p99 under skew 0.5 (ms) | simulated tok/s/GPU | meets the SLO |\n|---|---|---|---|---|---|");
        for (name, p, s) in [
            ("balanced (load factor 1)", bal, sb),
            ("load-aware", aware, sa),
        ] {
            let _ = writeln!(
                md,
                "| {name}: {} | {:.1} | {:.0} | {:.1} / {:.1} | {:.0} | {} |",
                plan_cell(p),
                p.tbt_s * 1e3,
                p.tokens_per_s_per_gpu,
                s.tbt_mean_s * 1e3,
                s.tbt_p99_s * 1e3,
                s.tokens_per_s / p.gpus() as f64,
                if s.tbt_p99_s <= SKEW_CASE_SLO_S {
                    "yes"
                } else {
                    "no"
                }
            );
        }
        let _ = writeln!(md);
    }
}

/// Runs every experiment and writes `out_dir/reproduction.md` and `out_dir/img/*.svg`.
pub fn reproduce(out_dir: &Path) -> Result<ReproSummary> {
    let cat = HardwareCatalog::builtin()?;
    let models = ModelCatalog::builtin()?;
    let homog = run_homog(&cat, &models)?;
    let ablation = run_ablation(&cat, &models, &homog)?;
    let hetero = run_hetero(&cat, &models)?;
    let sensitivity = sensitivity(&cat, &models)?;
    let runs = simulator_runs(&cat, &models, &homog[0].dis)?;
    let ex = Experiments {
        eff: cat.defaults,
        homog,
        ablation,
        hetero,
        sensitivity,
        runs,
    };
    let images = plots(&ex, &out_dir.join("img"))?;
    let mut headlines = Vec::new();
    let mut md = String::new();
    md_head(&mut md, &ex);
    md_ablation(&mut md, &ex, &mut headlines);
    md_homog(&mut md, &ex, &mut headlines);
    md_hetero(&mut md, &ex, &mut headlines);
    md_balance(&mut md, &ex);
    md_sensitivity(&mut md, &ex);
    md_simulator(&mut md, &ex, &mut headlines);
    let _ = writeln!(md, "## What is not modelled\n\n{NOT_MODELLED}");

    let path = out_dir.join("reproduction.md");
    write_file(&path, &md)?;
    Ok(ReproSummary {
        markdown: path,
        images,
        headlines,
    })
}

const ABLATION_NOTES: &str = "**How close, and why.** *m = 1 -> 2* lands within 5% of the paper's ~1.9x for all three models. With one \
micro-batch the attention and expert nodes take turns; with two they overlap, and because the batch is bounded by the same KV memory (or \
the same SLO) the per-token work barely changes, so the model predicts close to the ideal 2x. The paper's slightly smaller gain is plausibly what real \
overlap costs (launch gaps, synchronisation, uneven micro-batches), which a roofline does not see.

*m = 2 -> 3* comes out higher than the paper for all three models, by 7-22%, with the paper's ordering kept (Mixtral lowest, Scaled-MoE highest). \
In the model this gain is decided by `T_c / T_f`: constraint 3 needs `m >= 2 (1 + T_c / T_f)`, so with any non-zero `T_c` two micro-batches cannot \
cover a round trip `T_a + T_e + 2 T_c` and the nodes idle; three micro-batches recover up to 1.5x. Our `T_c / T_f` is 0.4 (Mixtral) to 0.7-0.8 \
(DBRX, Scaled-MoE) at context 730 on 200 Gbit/s per GPU: dispatch moves `h K` BF16 values per token per layer (Mixtral: 24.6 KB at K = 2, about \
1.1 us at 25 GB/s x 0.9) against a KV read of 730 tokens x 4 KB (about 1.8 us at 2039 GB/s x 0.8), and DBRX and Scaled-MoE route to K = 4 \
experts, doubling the bytes. DBRX and Scaled-MoE therefore need m >= 3.4-3.6 and are starved at both m = 2 and m = 3 in our model, which pins \
their 2 -> 3 gain at ~1.5x. In this model's terms the paper's 1.10x for Mixtral corresponds to `T_c / T_f` of about 0.1, i.e. communication 3-4x faster relative to \
compute than our catalog gives (or another batch/context in their ablation, which the paper does not state). We did not tune the network to hit it.

*m = 3 -> 4*: Mixtral has `T_c / T_f < 0.5`, so three micro-batches already feed the pipeline and a fourth only splits the same KV-limited batch \
into smaller pieces that each pay the fixed per-micro-batch costs again: a loss. DBRX and Scaled-MoE still gain 7-16% because they need m > 3. \
This matches the paper's remark that m = 4 adds little on a fast network, with our network being the slower one.
";

const HOMOG_NOTES: &str = "**How close, and why.** Against the fewest-nodes colocated deployment (how the paper's baselines run), disaggregation \
lands at 1.13-1.19x per GPU, 9-12% below the paper's 1.28x over TensorRT-LLM for Mixtral and DBRX and 38% below its 1.90x for Scaled-MoE. \
In a roofline both layouts reach the same expert efficiency once an expert GEMM sees more than ~134 tokens (the A800 ridge point: \
312 TFLOPS x 0.7 over 2039 GB/s x 0.8, in BF16 one token is one FLOP per weight byte), and the colocated replica gets there with its large \
batch (Mixtral TP8: 1760 sequences x 2 / 8 = 440 tokens per expert). What disaggregation still buys in the model: attention GPUs hold no \
expert weights, so a replica keeps more sequences' KV, and attention and experts each run at their own roofline instead of adding up on one \
GPU. What a roofline cannot show is how far real colocated MoE kernels fall below it at moderate batch; the paper's vLLM ratios (2.56x, 7.11x) \
are mostly that, and TensorRT-LLM sits in between. Scaled-MoE (317B) is where the paper's gain is largest and ours too: colocated, its \
634 GB of weights need two A800 nodes and leave the least KV room. Against the *best TP x PP* baseline (more pipeline stages, more KV room, \
no bubbles, free transfers: an upper bound) disaggregation is break-even or slightly behind for Mixtral and DBRX in this model. So the model \
supports the paper's direction, with smaller margins than measured; sections 1 and 6 add what the closed form misses in the disaggregated \
design itself (starved pipelines, imbalance).
";

const BALANCE_NOTES: &str = "BALANCE uses only the slopes, and in decoding the intercepts are large (every micro-batch re-reads the \
weights: `k2`, `k4`), while the roofline bends at the ridge point, so one straight line fits it poorly. On the homogeneous A800 plans \
BALANCE's `n_a` happens to be the best one; on the heterogeneous pair it is far off (it even proposes more GPUs than the 64-GPU budget for \
Scaled-MoE), and searching every `n_a` gains 1.3-1.5x per cost. That is why the planner searches `n_a` exhaustively by default: it costs \
milliseconds.
";

const HETERO_NOTES: &str = "**How close, and why.** H20 attention + L40S experts beats colocated H20 by 2.0-2.4x per cost in the model, \
above the paper's \"up to 1.86x\" over TensorRT-LLM on H20. The direction is the paper's argument, and the model shows its mechanism: the H20 \
has the best memory bandwidth per price (4096 GB/s for 1.85) but only 148 TFLOPS, so a colocated H20 replica is compute-bound in its \
experts; the L40S has the best compute per price (362 TFLOPS for 1.08) but little memory and bandwidth, so it suits experts and not attention. \
Heterogeneous also beats the best homogeneous disaggregated deployment by 1.12-1.28x per cost (the paper gives no direct number for this). \
We overshoot the paper, most likely because the roofline gives the L40S the same 0.70 GEMM efficiency as an SXM part (section 5: at 0.50 \
on the L40S alone the ratio drops noticeably) and we assume 8 L40S per node sharing its 2 x 400 Gbit/s (100 Gbit/s per GPU). Changing \
the GEMM efficiency of every device at once moves the ratio the other way, because the colocated H20 baseline is compute-bound and \
suffers most. The paper does not say which model its 1.86x is for or what its \
heterogeneous cluster size is; we cap every deployment at 64 GPUs.
";

const SENSITIVITY_NOTES: &str = "No single factor brings the numbers onto the paper's. The m = 2 -> 3 gains of DBRX and Scaled-MoE stay at \
~1.48 under every variant because their pipelines are starved at both m = 2 and m = 3 (communication, not compute, sets `T_c / T_f`; only a \
faster network or a longer context would change that). The per-GPU advantage of disaggregation stays at 1.07-1.22x: it comes from memory \
(where the KV cache lives), not from efficiency factors that both layouts share. The heterogeneous ratio moves most with GEMM efficiency, \
in opposite directions depending on whether it changes everywhere (the compute-bound colocated H20 baseline suffers most) or on the \
L40S alone (the experts suffer).
";

const SIM_NOTES: &str = "**How close, and why.** With the closed form's assumptions (S1) the simulator agrees with Eq. 5 to rounding (the \
unit tests require < 1% on five deployments, including DeepSeek-V3 with 8 experts per worker, and check a hand-computed case exactly); its \
steady time between tokens equals Eq. 4's upper bound `m T_f L`, which is what the planner holds to the SLO. Everything else is where the \
closed form is blind. Merely sampling the routing from a uniform distribution makes the busiest of 8 expert workers ~12% busier than the \
mean per micro-batch (S2), and every layer waits for the busiest worker, so throughput follows the maximum load, not the mean: Zipf skew 0.5 \
costs ~30% and skew 1.0 halves throughput (S3, S4). Jitter and stragglers cost 7% and 14% here because every stage is a barrier over all \
replicas or all workers (S5, S6). The `m = 2` timeline shows the starved pipeline of section 1: the nodes idle while each micro-batch makes \
its own round trip, which Eq. 5 does not count (it assumes constraint 3 holds) and the planner's TBT does.
";

const NOT_MODELLED: &str = "- Prefill (the paper serves it separately) and the growth of context during decoding: every sequence is \
charged the full 730-token context.
- Kernel efficiency as a function of GEMM shape (tile and wave quantisation): one GEMM efficiency for all sizes above the ridge point.
- Expert replication and load-aware placement (the simulator accepts a placement with replicas; the planner uses one expert per worker \
or contiguous groups).
- Inter-stage transfers and bubbles of the colocated baseline's pipeline parallelism; vLLM's and TensorRT-LLM's own overheads.
- Network topology and congestion beyond per-message jitter; the M2N library's ACK and congestion-control behaviour.
- Measured hardware: every device number is a datasheet or paper number times the efficiency factors above. `tandem profile` (not yet \
written) will measure `k1..k4` and `Util(size)` into the profile format that `--profile` already reads.
";

#[cfg(test)]
mod tests {
    #[test]
    fn writes_a_complete_deterministic_report() {
        let dir = std::env::temp_dir().join(format!("tandem-repro-{}", std::process::id()));
        let s = super::reproduce(&dir).unwrap();
        let md = std::fs::read_to_string(&s.markdown).unwrap();
        for section in [
            "## 1.",
            "## 2.",
            "## 3.",
            "## 4.",
            "## 5.",
            "## 6.",
            "## What is not modelled",
        ] {
            assert!(md.contains(section), "{section}");
        }
        assert_eq!(s.images.len(), 7);
        for img in &s.images {
            let svg = std::fs::read_to_string(img).unwrap();
            assert!(
                svg.starts_with("<svg") && !svg.contains("NaN"),
                "{}",
                img.display()
            );
            assert!(md.contains(&format!(
                "img/{}",
                img.file_name().unwrap().to_string_lossy()
            )));
        }
        assert!(!md.contains("NaN"));
        // The acceptance check, as the report states it.
        assert!(s
            .headlines
            .iter()
            .any(|h| h.contains("simulator vs Eq. 5") && h.contains("0.0000%")));
        // Same inputs, same bytes.
        let again = super::reproduce(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&again.markdown).unwrap(), md);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
