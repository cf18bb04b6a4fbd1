//! The text reports of `tandem plan` (the ranked plans), `plan catalog`, `plan engine`,
//! `plan reproduce` and `tandem simulate`: each a function from the library's values to the
//! lines the CLI prints, every line ending in `\n`.

use crate::deploy::SimulatedPlan;
use crate::engine_model::EnginePrediction;
use crate::hardware::{HardwareCatalog, PriceUnit};
use crate::model::ModelCatalog;
use crate::planner::{Layout, Objective, Plan, PlanReport, PlanRequest};
use crate::reproduce::ReproSummary;
use crate::sim::NodeUtil;
use std::fmt::Write;

/// `writeln!` into a `String`, which cannot fail.
macro_rules! emit {
    ($out:expr) => {
        $out.push('\n')
    };
    ($out:expr, $($fmt:tt)*) => {
        let _ = writeln!($out, $($fmt)*);
    };
}

/// `v` with `prec` decimals, `-` when absent.
fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// The attention and expert columns of a plan's row.
fn plan_label(p: &Plan) -> (String, String) {
    match p.layout {
        Layout::Disaggregated => (
            format!("{} tp{} x{}", p.attention_hw, p.tp_a, p.n_a),
            format!("{} tp{} x{}", p.expert_hw, p.tp_e, p.expert_workers),
        ),
        Layout::Colocated => (
            format!("{} tp{} pp{}", p.attention_hw, p.tp_a, p.pp),
            "(colocated)".into(),
        ),
    }
}

/// `tandem plan`'s table: the request on top, one row per ranked plan (with its ratio to the
/// colocated baseline), the colocated baselines, the best plan's stage times and the notes.
pub fn plan_report(req: &PlanRequest, r: &PlanReport) -> String {
    let mut out = String::new();
    emit!(
        out,
        "model {} | SLO {:.1} ms between tokens | context {} tokens | ranked by tokens/s per {}",
        req.model.name,
        req.tbt_slo_s * 1e3,
        req.context_tokens,
        match r.objective {
            Objective::PerCost => match req.price_unit {
                PriceUnit::Norm => "cost (L20-normalised price)",
                PriceUnit::Usd => "USD/hour",
            },
            Objective::PerGpu => "GPU",
        }
    );
    emit!(
        out,
        "{:>3}  {:<18} {:<18} {:>2} {:>5} {:>6} {:>7} {:>9} {:>9} {:>9} {:>5} {:>7} {:>8}",
        "#",
        "attention",
        "experts",
        "m",
        "b_a",
        "B",
        "TBT ms",
        "tok/s",
        "tok/s/GPU",
        "tok/s/$",
        "GPUs",
        "binds",
        "vs coloc"
    );
    let row = |out: &mut String, i: String, p: &Plan, ratio: Option<f64>| {
        let (a, e) = plan_label(p);
        emit!(
            out,
            "{:>3}  {:<18} {:<18} {:>2} {:>5} {:>6} {:>7.1} {:>9.0} {:>9.1} {:>9} {:>5} {:>7} {:>8}",
            i,
            a,
            e,
            p.micro_batches,
            p.micro_batch_seqs,
            p.global_batch,
            p.tbt_s * 1e3,
            p.tokens_per_s,
            p.tokens_per_s_per_gpu,
            fmt_opt(p.tokens_per_s_per_cost, 1),
            p.gpus(),
            format!("{:?}", p.binding).to_lowercase(),
            ratio.map_or("-".into(), |x| format!("{x:.2}x"))
        );
    };
    for (i, p) in r.ranked.iter().enumerate() {
        row(&mut out, format!("{}", i + 1), p, r.ratio(p));
    }
    if !r.colocated.is_empty() {
        emit!(
            out,
            "colocated baselines (one replica, TP in a node x PP across nodes):"
        );
        for p in &r.colocated {
            row(&mut out, "c".into(), p, None);
        }
    }
    if let Some(b) = r.best() {
        emit!(
            out,
            "best: T_a {:.3} ms, T_e {:.3} ms, T_c {:.3} ms per layer; m >= {:.2} keeps the pipeline fed; BALANCE n_a = {:.2}; Eq. 5 step {:.1} ms",
            b.times.t_a_s * 1e3,
            b.times.t_e_s * 1e3,
            b.times.t_c_s * 1e3,
            b.min_micro_batches,
            b.n_a_balance,
            b.eq5_step_s * 1e3
        );
        emit!(out, "stage times from: {}", b.source);
    }
    for n in &r.notes {
        emit!(out, "note: {n}");
    }
    out
}

/// `tandem plan catalog`: one row per device of `hw`, a blank line, one row per model.
pub fn catalog(hw: &HardwareCatalog, models: &ModelCatalog) -> String {
    let mut out = String::new();
    emit!(
        out,
        "{:<22} {:>5} {:>8} {:>8} {:>6} {:>8} {:>7} {:>6} {:>8}  note",
        "hardware",
        "dtype",
        "TFLOPS",
        "GB/s",
        "GB",
        "link GB/s",
        "NIC Gb",
        "price",
        "USD/h"
    );
    for d in &hw.devices {
        emit!(
            out,
            "{:<22} {:>5} {:>8.1} {:>8.0} {:>6.0} {:>8.0} {:>7.0} {:>6} {:>8}  {}",
            d.name,
            format!("{:?}", d.dtype).to_lowercase(),
            d.tflops,
            d.mem_bw_gb_s,
            d.memory_gb,
            d.intra_link_gb_s,
            d.nic_gbit_s,
            fmt_opt(d.price_norm, 2),
            fmt_opt(d.usd_per_hour, 2),
            if d.placeholder {
                "PLACEHOLDER, not measured"
            } else if d.price_norm_estimated {
                "price_norm estimated"
            } else {
                ""
            }
        );
    }
    emit!(out);
    emit!(
        out,
        "{:<18} {:>8} {:>7} {:>7} {:>6} {:>4} {:>3} {:>7}  family",
        "model",
        "params B",
        "active",
        "layers",
        "hidden",
        "E",
        "K",
        "h'"
    );
    for m in &models.models {
        emit!(
            out,
            "{:<18} {:>8.1} {:>7.1} {:>7} {:>6} {:>4} {:>3} {:>7}  {}",
            m.name,
            m.total_params() / 1e9,
            m.active_params() / 1e9,
            m.num_layers,
            m.hidden_size,
            m.num_experts,
            m.top_k,
            m.expert_intermediate,
            m.family
        );
    }
    out
}

/// `tandem plan engine`: the shape, the step, and the per-layer times behind it.
pub fn engine_prediction(p: &EnginePrediction) -> String {
    let shape = &p.shape;
    let what = if shape.expert_workers == 0 {
        format!(
            "colocated, {} replica(s) x {} threads",
            shape.attention_replicas, shape.threads_per_worker
        )
    } else {
        format!(
            "{} replica(s) + {} expert worker(s), m={}, {} thread(s) each",
            shape.attention_replicas,
            shape.expert_workers,
            shape.micro_batches,
            shape.threads_per_worker
        )
    };
    let mut out = String::new();
    emit!(
        out,
        "{what}, batch {} at context {:.0}: {:.1} tokens/s, {:.1} ms per step",
        shape.batch,
        shape.context_tokens,
        p.tokens_per_s,
        p.step_s * 1e3
    );
    emit!(
        out,
        "per layer (largest micro-batch): T_a {:.2} ms, T_e {:.2} ms ({:.1} experts hit), T_c {:.3} ms; a micro-batch's layers {:.1} ms, head {:.1} ms; busiest expert worker {:.0}% busy",
        p.t_a_s * 1e3,
        p.t_e_s * 1e3,
        p.experts_hit,
        p.t_c_s * 1e3,
        p.layers_s * 1e3,
        p.head_s * 1e3,
        p.expert_utilisation * 100.0
    );
    out
}

/// `tandem plan reproduce`: the headline numbers, then what was written.
pub fn reproduction(s: &ReproSummary) -> String {
    let mut out = String::new();
    for h in &s.headlines {
        emit!(out, "{h}");
    }
    emit!(
        out,
        "wrote {} and {} plots",
        s.markdown.display(),
        s.images.len()
    );
    out
}

/// Mean, min and max utilisation of `nodes`, in percent.
fn utilisation_summary(nodes: &[NodeUtil]) -> String {
    let v: Vec<f64> = nodes.iter().map(|u| u.utilisation).collect();
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!(
        "mean {:.1}%, min {:.1}%, max {:.1}% over {} nodes",
        mean * 100.0,
        min * 100.0,
        max * 100.0,
        v.len()
    )
}

/// `tandem simulate`: the plan simulated, the simulation next to the closed form, the
/// load imbalance, utilisation, and where the two differ.
pub fn simulation(s: &SimulatedPlan) -> String {
    let (p, r) = (&s.shape, &s.report);
    let mut out = String::new();
    emit!(
        out,
        "{}: attention {} tp{} x{}, experts {} tp{} ({} per worker), m={}, b_a={:.0}, B={:.0}, context {} | {}",
        s.model.name,
        s.attention_hw,
        p.tp_a,
        p.n_a,
        s.expert_hw,
        p.tp_e,
        p.experts_per_worker,
        p.m,
        p.b_a,
        r.global_batch,
        s.context_tokens,
        s.source
    );
    emit!(
        out,
        "closed form: T_a {:.3} ms, T_e {:.3} ms, T_c {:.3} ms per layer",
        r.closed.t_a_s * 1e3,
        r.closed.t_e_s * 1e3,
        r.closed.t_c_s * 1e3
    );
    emit!(
        out,
        "throughput: {:.0} tokens/s simulated vs {:.0} closed form ({:+.1}%)",
        r.tokens_per_s,
        r.closed_tokens_per_s,
        (r.tokens_per_s / r.closed_tokens_per_s - 1.0) * 100.0
    );
    emit!(
        out,
        "time between tokens: mean {:.2} ms, p99 {:.2} ms (closed form {:.2} ms)",
        r.tbt_mean_s * 1e3,
        r.tbt_p99_s * 1e3,
        r.closed_tbt_s * 1e3
    );
    emit!(
        out,
        "one step from empty: {:.2} ms simulated vs Eq. 5 {:.2} ms ({:+.2}%)",
        r.first_step_s * 1e3,
        r.eq5_step_s * 1e3,
        r.eq5_rel_err * 100.0
    );
    emit!(
        out,
        "busiest expert worker / mean load: {:.2} (size plans for it: tandem plan --expert-load-factor {:.2})",
        r.worker_load_max_over_mean,
        r.worker_load_max_over_mean
    );
    emit!(
        out,
        "utilisation: attention {}; experts {}",
        utilisation_summary(&r.attention_util),
        utilisation_summary(&r.expert_util)
    );
    emit!(out, "where the closed form and the simulation differ:");
    for f in &r.findings {
        emit!(out, "  - {f}");
    }
    out
}

/// `tandem simulate --timeline`: an SVG of the simulated steady step's first `layers` layers.
pub fn simulation_timeline_svg(s: &SimulatedPlan, layers: u32) -> String {
    crate::svg::timeline(
        &format!(
            "{}: one steady decode step (first {} layers)",
            s.model.name, layers
        ),
        &s.report.timeline_rows,
        &s.report.timeline,
        Some(layers),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_model::EngineShape;
    use crate::planner::{plan, PerfSource};

    #[test]
    fn plan_report_heads_with_the_request_and_has_a_row_per_plan() {
        let cat = HardwareCatalog::builtin().unwrap();
        let model = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        let mut req = PlanRequest::new(model, "H20", "L40S");
        req.tbt_slo_s = 0.125;
        req.max_replicas = 8;
        req.keep = 3;
        let r = plan(&req, &cat, PerfSource::Roofline).unwrap();
        assert!(!r.ranked.is_empty());
        let text = plan_report(&req, &r);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(&format!("model {} | SLO 125.0 ms", req.model.name)));
        assert!(lines[0].ends_with("per cost (L20-normalised price)"));
        for (i, p) in r.ranked.iter().enumerate() {
            let rank = format!("{:>3}  ", i + 1);
            let row = lines.iter().find(|l| l.starts_with(&rank)).unwrap();
            assert!(row.contains(&format!("{} tp{} x{}", p.attention_hw, p.tp_a, p.n_a)));
            assert!(
                row.ends_with('x'),
                "a ranked plan is compared to colocated: {row}"
            );
        }
        let coloc = lines.iter().filter(|l| l.starts_with("  c  ")).count();
        assert_eq!(coloc, r.colocated.len());
        let best = r.best().unwrap();
        assert!(lines.contains(&format!("stage times from: {}", best.source).as_str()));
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("note: ")).count(),
            r.notes.len()
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn catalog_lists_every_device_then_every_model() {
        let hw = HardwareCatalog::builtin().unwrap();
        let models = ModelCatalog::builtin().unwrap();
        let text = catalog(&hw, &models);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            1 + hw.devices.len() + 1 + 1 + models.models.len()
        );
        for (d, l) in hw.devices.iter().zip(&lines[1..]) {
            assert_eq!(l.split_whitespace().next(), Some(d.name.as_str()));
            assert_eq!(l.contains("PLACEHOLDER"), d.placeholder);
        }
        assert_eq!(lines[1 + hw.devices.len()], "");
        for (m, l) in models.models.iter().zip(&lines[3 + hw.devices.len()..]) {
            assert!(l.starts_with(&m.name) && l.ends_with(&m.family), "{l}");
        }
    }

    fn prediction(expert_workers: u32) -> EnginePrediction {
        EnginePrediction {
            shape: EngineShape {
                attention_replicas: 2,
                expert_workers,
                micro_batches: 3,
                threads_per_worker: 4,
                batch: 16,
                context_tokens: 88.0,
            },
            step_s: 0.0125,
            tokens_per_s: 2560.04,
            layers_s: 0.011,
            head_s: 0.0015,
            t_a_s: 0.0002,
            t_e_s: 0.0003,
            t_c_s: 0.00004,
            experts_hit: 7.5,
            expert_utilisation: 0.42,
        }
    }

    #[test]
    fn engine_prediction_names_the_shape_and_the_step() {
        let text = engine_prediction(&prediction(0));
        assert!(text.starts_with(
            "colocated, 2 replica(s) x 4 threads, batch 16 at context 88: 2560.0 tokens/s, 12.5 ms per step\n"
        ));
        let text = engine_prediction(&prediction(5));
        assert!(text.starts_with("2 replica(s) + 5 expert worker(s), m=3, 4 thread(s) each,"));
        let second = text.lines().nth(1).unwrap();
        assert!(second.contains("T_a 0.20 ms, T_e 0.30 ms (7.5 experts hit), T_c 0.040 ms"));
        assert!(second.ends_with("busiest expert worker 42% busy"));
    }

    #[test]
    fn utilisation_summary_is_mean_min_max_in_percent() {
        let node = |u: f64| NodeUtil {
            name: "n".into(),
            busy_s: u,
            utilisation: u,
        };
        assert_eq!(
            utilisation_summary(&[node(0.5), node(1.0)]),
            "mean 75.0%, min 50.0%, max 100.0% over 2 nodes"
        );
    }
}
