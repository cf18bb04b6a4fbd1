//! Plans become deployment files (`tandem_core::Deployment`), plus a minimal sidecar with
//! what `PlanInfo` cannot hold yet (model, context, SLO).

use crate::error::{read_file, write_file, PlanError, Result};
use crate::hardware::HardwareCatalog;
use crate::model::{ModelCatalog, ModelShape};
use crate::perf::{PipelineShape, Roofline, StageModel};
use crate::planner::{Layout, Plan};
use crate::profile::{Profile, ProfileModel};
use crate::sim::{simulate, Imbalance, SimConfig, SimReport};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tandem_core::deployment::PlanInfo;
use tandem_core::Deployment;

/// Fields the planner records beside the deployment file until `PlanInfo` grows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSidecar {
    /// Catalog name or path of the model's config.json.
    pub model: String,
    /// Context per sequence the plan was sized for, tokens.
    pub context_tokens: f64,
    /// The TBT target, milliseconds.
    pub tbt_slo_ms: f64,
    /// Routed experts per expert worker.
    pub experts_per_worker: u32,
}

/// `plan.toml` -> `plan.meta.toml`.
pub fn sidecar_path(deployment: &Path) -> PathBuf {
    deployment.with_extension("meta.toml")
}

/// The deployment file the engine reads for `plan`.
pub fn to_deployment(plan: &Plan) -> Deployment {
    let colocated = plan.layout == Layout::Colocated;
    let per_replica_seqs = plan.micro_batch_seqs * plan.micro_batches;
    let d = Deployment {
        attention_replicas: plan.n_a.max(1),
        expert_workers: if colocated { 0 } else { plan.expert_workers },
        micro_batches: if colocated {
            1
        } else {
            plan.micro_batches.max(1)
        },
        max_num_seqs: per_replica_seqs.max(1),
        max_num_batched_tokens: per_replica_seqs.max(2048),
        ..Deployment::default()
    };
    Deployment {
        plan: PlanInfo {
            attention_hw: Some(plan.attention_hw.clone()),
            expert_hw: Some(plan.expert_hw.clone()),
            tp_attention: Some(plan.tp_a),
            tp_expert: Some(plan.tp_e),
            global_batch: Some(plan.global_batch),
            predicted_tokens_per_s: Some(plan.tokens_per_s),
            predicted_tbt_ms: Some(plan.tbt_s * 1e3),
            attention_mem_bytes: Some(plan.attention_mem_used_bytes),
            expert_mem_bytes: (!colocated).then_some(plan.expert_mem_used_bytes),
        },
        ..d
    }
}

/// Writes the deployment file and its sidecar; returns the sidecar's path.
pub fn write_plan(plan: &Plan, model_ref: &str, out: &Path) -> Result<PathBuf> {
    write_file(out, &to_deployment(plan).to_toml_string())?;
    let side = PlanSidecar {
        model: model_ref.to_string(),
        context_tokens: plan.context_tokens,
        tbt_slo_ms: plan.tbt_slo_s * 1e3,
        experts_per_worker: plan.experts_per_worker,
    };
    let text = toml::to_string_pretty(&side).map_err(|e| PlanError::Parse {
        path: "<sidecar>".into(),
        msg: e.to_string(),
    })?;
    let p = sidecar_path(out);
    write_file(
        &p,
        &format!(
            "# Written by `tandem plan` beside {}: fields PlanInfo lacks.\n{text}",
            out.display()
        ),
    )?;
    Ok(p)
}

/// Reads a deployment file and, if present, its sidecar.
pub fn read_plan(path: &Path) -> Result<(Deployment, Option<PlanSidecar>)> {
    let d = Deployment::load(path).map_err(|e| PlanError::Parse {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let sp = sidecar_path(path);
    let side = if sp.exists() {
        let text = read_file(&sp)?;
        Some(toml::from_str(&text).map_err(|e| PlanError::Parse {
            path: sp.display().to_string(),
            msg: e.to_string(),
        })?)
    } else {
        None
    };
    Ok((d, side))
}

/// The pipeline a deployment file describes for `model`: its shape and expert placement
/// (`workers[e]`). `b_a` comes from `plan.global_batch` if recorded, else `max_num_seqs`.
pub fn pipeline_of(d: &Deployment, model: &ModelShape) -> Result<(PipelineShape, Vec<Vec<u32>>)> {
    if d.expert_workers == 0 {
        return Err(PlanError::Invalid(
            "this deployment is colocated (expert_workers = 0); the simulator models disaggregated plans".into(),
        ));
    }
    let e = model.num_experts as usize;
    let placement = d
        .placement_for(e)
        .map_err(|err| PlanError::Invalid(err.to_string()))?;
    let m = d.micro_batches.max(1);
    let n_a = d.attention_replicas.max(1);
    let b_a = match d.plan.global_batch {
        Some(g) if g > 0 => g as f64 / (m as f64 * n_a as f64),
        _ => d.max_num_seqs as f64 / m as f64,
    };
    if b_a < 1.0 {
        return Err(PlanError::Invalid(format!(
            "the deployment has fewer than one sequence per micro-batch ({b_a:.2})"
        )));
    }
    let max_held = (0..d.expert_workers)
        .map(|w| placement.experts_of(w).len() as u32)
        .max()
        .unwrap_or(1)
        .max(1);
    let shape = PipelineShape {
        tp_a: d.plan.tp_attention.unwrap_or(1).max(1),
        n_a,
        tp_e: d.plan.tp_expert.unwrap_or(1).max(1),
        experts_per_worker: max_held,
        m,
        b_a,
    };
    Ok((shape, placement.workers))
}

/// A plan file, simulated.
#[derive(Debug, Clone)]
pub struct SimulatedPlan {
    pub model: ModelShape,
    pub attention_hw: String,
    pub expert_hw: String,
    pub context_tokens: f64,
    pub shape: PipelineShape,
    pub report: SimReport,
    /// Where the stage times come from.
    pub source: String,
}

/// What to simulate beyond the plan file.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Catalog name or config path; overrides the sidecar's.
    pub model: Option<String>,
    /// Overrides the sidecar's context (tokens).
    pub context_tokens: Option<f64>,
    pub imbalance: Imbalance,
    pub jitter_cv: f64,
    pub straggler_prob: f64,
    pub straggler_factor: f64,
    pub steps: u32,
    pub seed: u64,
    pub timeline_step: Option<u32>,
}

/// Reads a plan file (and its sidecar), resolves model and hardware, and simulates it.
pub fn simulate_plan_file(
    path: &Path,
    opts: &SimulateOptions,
    catalog: &HardwareCatalog,
    profile: Option<&Profile>,
) -> Result<SimulatedPlan> {
    let (d, side) = read_plan(path)?;
    let model_ref = opts
        .model
        .clone()
        .or_else(|| side.as_ref().map(|s| s.model.clone()))
        .ok_or_else(|| {
            PlanError::Invalid(format!(
                "{} names no model (no {} sidecar): pass --model",
                path.display(),
                sidecar_path(path).display()
            ))
        })?;
    let model = ModelCatalog::builtin()?.resolve(&model_ref)?;
    let context = opts
        .context_tokens
        .or_else(|| side.as_ref().map(|s| s.context_tokens))
        .unwrap_or(730.0);
    let hw_name = |v: &Option<String>, which: &str| {
        v.clone().ok_or_else(|| {
            PlanError::Invalid(format!(
                "{} has no plan.{which}: write it with `tandem plan` or add it",
                path.display()
            ))
        })
    };
    let an = hw_name(&d.plan.attention_hw, "attention_hw")?;
    let en = hw_name(&d.plan.expert_hw, "expert_hw")?;
    let ha = catalog.get(&an)?;
    let he = catalog.get(&en)?;
    let (shape, placement) = pipeline_of(&d, &model)?;
    let roof = Roofline::new(catalog, &model, ha, he, context);
    let profiled;
    let sm: &dyn StageModel = match profile {
        Some(p) => {
            profiled = ProfileModel::new(p.clone(), context, ha.elem_bytes());
            &profiled
        }
        None => &roof,
    };
    let cfg = SimConfig {
        shape,
        placement: Some(placement),
        steps: opts.steps,
        imbalance: opts.imbalance.clone(),
        jitter_cv: opts.jitter_cv,
        straggler_prob: opts.straggler_prob,
        straggler_factor: opts.straggler_factor,
        seed: opts.seed,
        timeline_step: opts.timeline_step,
    };
    let report = simulate(sm, &model, &cfg)?;
    Ok(SimulatedPlan {
        model,
        attention_hw: ha.name.clone(),
        expert_hw: he.name.clone(),
        context_tokens: context,
        shape,
        report,
        source: sm.describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{plan, PerfSource, PlanRequest};

    #[test]
    fn plan_file_round_trips_into_the_simulator() {
        let cat = HardwareCatalog::builtin().unwrap();
        let model = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        let mut req = PlanRequest::new(model, "H20", "L40S");
        req.max_replicas = 12;
        let rep = plan(&req, &cat, PerfSource::Roofline).unwrap();
        let best = rep.best().unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-plan-test-{}", std::process::id()));
        let out = dir.join("plan.toml");
        let side = write_plan(best, "mixtral-8x22b", &out).unwrap();
        assert!(side.ends_with("plan.meta.toml"));
        let (d, s) = read_plan(&out).unwrap();
        assert_eq!(d.attention_replicas, best.n_a);
        assert_eq!(d.micro_batches, best.micro_batches);
        assert_eq!(d.plan.tp_attention, Some(best.tp_a));
        assert_eq!(s.unwrap().model, "mixtral-8x22b");
        let opts = SimulateOptions {
            model: None,
            context_tokens: None,
            imbalance: Imbalance::None,
            jitter_cv: 0.0,
            straggler_prob: 0.0,
            straggler_factor: 1.0,
            steps: 3,
            seed: 1,
            timeline_step: None,
        };
        let sim = simulate_plan_file(&out, &opts, &cat, None).unwrap();
        // The simulator reproduces the planner's prediction for its own plan.
        let rel = (sim.report.tokens_per_s - best.tokens_per_s).abs() / best.tokens_per_s;
        assert!(
            rel < 0.01,
            "{} vs {}",
            sim.report.tokens_per_s,
            best.tokens_per_s
        );
        // Without the sidecar the model must be named.
        std::fs::remove_file(&side).unwrap();
        let e = simulate_plan_file(&out, &opts, &cat, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--model"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn colocated_plans_are_refused_by_the_simulator() {
        let model = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        let d = Deployment {
            expert_workers: 0,
            ..Deployment::default()
        };
        assert!(pipeline_of(&d, &model)
            .unwrap_err()
            .to_string()
            .contains("colocated"));
    }
}
