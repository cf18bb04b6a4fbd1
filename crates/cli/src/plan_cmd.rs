//! `tandem plan`, `tandem plan reproduce`, `tandem plan catalog`, `tandem plan profile-template`,
//! `tandem plan engine` and `tandem simulate`: flags to the library's inputs, and printing
//! what it returns; the logic and the reports' text are in `tandem-plan`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use tandem_deploy::{load_hw_catalog, load_profile, resolve_model_shape};
use tandem_plan::deploy::{self, SimulateOptions};
use tandem_plan::engine_model::{predict_decode, EngineShape};
use tandem_plan::planner::{Objective, PerfSource, PlanRequest, ReplicaSearch};
use tandem_plan::sim::{Imbalance, RoutingTrace};
use tandem_plan::{report, ModelCatalog, PriceUnit, Profile};

/// `tandem plan`: search deployment plans, or one of the subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: Option<PlanCommand>,
    #[command(flatten)]
    pub search: PlanSearchArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Regenerate the paper-reproduction report: OUT/reproduction.md and OUT/img/*.svg.
    Reproduce(ReproduceArgs),
    /// List the hardware and model catalogs.
    Catalog(CatalogArgs),
    /// Write a performance-profile file fitted to the roofline: the format `tandem profile`
    /// fills with measurements.
    ProfileTemplate(ProfileTemplateArgs),
    /// Predict the decode throughput of tandem's own engine for one explicit shape from a
    /// profile measured by `tandem profile` (what `tandem profile --calibrate` checks).
    Engine(EnginePredictArgs),
}

#[derive(Debug, Args)]
pub struct EnginePredictArgs {
    /// Profile written by `tandem profile`.
    #[arg(long)]
    pub profile: PathBuf,
    /// Model: a config.json or its directory, a GGUF file, or a catalog name; default: the
    /// profile's.
    #[arg(long)]
    pub model: Option<String>,
    /// The shape, resolved as `bench engine` resolves the same flags (so the prediction is of
    /// the run those flags make; `--pin-cores` is accepted and does not change it).
    #[command(flatten)]
    pub shape: tandem_deploy::ShapeArgs,
    /// Decoding sequences per replica.
    #[arg(long, default_value_t = 16)]
    pub batch: u32,
    /// Mean context per sequence over the decode, tokens.
    #[arg(long, default_value_t = 88.0)]
    pub context: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ObjectiveArg {
    /// Tokens/s per unit of hourly price.
    Cost,
    /// Tokens/s per GPU.
    Gpu,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PriceArg {
    /// The paper's normalised prices (L20 = 1.00).
    Norm,
    /// Public USD per GPU-hour.
    Usd,
}

/// Search flags of `tandem plan`.
#[derive(Debug, Args)]
pub struct PlanSearchArgs {
    /// Model: catalog name (see `tandem plan catalog`), a config.json / its directory, or a GGUF
    /// file.
    #[arg(long)]
    pub model: Option<String>,
    /// Attention hardware, comma-separated catalog names (default: every non-placeholder device).
    #[arg(long, value_delimiter = ',')]
    pub attention_hw: Vec<String>,
    /// Expert hardware, comma-separated (default: every non-placeholder device).
    #[arg(long, value_delimiter = ',')]
    pub expert_hw: Vec<String>,
    /// Same hardware for attention and experts (shorthand for both flags).
    #[arg(long, conflicts_with_all = ["attention_hw", "expert_hw"])]
    pub hw: Option<String>,
    /// Time-between-tokens target, milliseconds (Eq. 7).
    #[arg(long, default_value_t = 150.0)]
    pub tbt_slo_ms: f64,
    /// Context per sequence, tokens (KV read per step and KV memory per sequence).
    #[arg(long, default_value_t = 730)]
    pub context: u32,
    /// Fewest micro-batches searched.
    #[arg(long, default_value_t = 1)]
    pub min_micro_batches: u32,
    /// Most micro-batches searched (the paper's N_m).
    #[arg(long, default_value_t = 4)]
    pub max_micro_batches: u32,
    /// Most GPUs per attention replica (default: a node).
    #[arg(long)]
    pub max_tp_attention: Option<u32>,
    /// Most GPUs per expert worker (default: a node).
    #[arg(long)]
    pub max_tp_expert: Option<u32>,
    /// Routed experts per expert worker (default: search the divisors of E; the paper uses 1).
    #[arg(long)]
    pub experts_per_worker: Option<u32>,
    /// Most attention replicas.
    #[arg(long, default_value_t = 64)]
    pub max_replicas: u32,
    /// Most GPUs in the deployment.
    #[arg(long)]
    pub max_gpus: Option<u32>,
    /// Most sequences per micro-batch per replica.
    #[arg(long, default_value_t = 4096)]
    pub max_micro_batch_seqs: u32,
    /// Fraction of device memory usable for weights + KV.
    #[arg(long, default_value_t = 0.9)]
    pub mem_fraction: f64,
    /// Rank plans by throughput per cost or per GPU.
    #[arg(long, value_enum, default_value = "cost")]
    pub objective: ObjectiveArg,
    /// Which prices rank plans.
    #[arg(long, value_enum, default_value = "norm")]
    pub price: PriceArg,
    /// Max / mean tokens per expert worker to size for (1 = balanced routing; `tandem
    /// simulate --skew` reports it for a plan).
    #[arg(long, default_value_t = 1.0)]
    pub expert_load_factor: f64,
    /// Algorithm 1 as written: only n_a = BALANCE (default: every n_a up to --max-replicas).
    #[arg(long)]
    pub balance_only: bool,
    /// Extra hardware catalog (TOML) adding or overriding devices.
    #[arg(long)]
    pub hw_catalog: Option<PathBuf>,
    /// Measured performance profile for its hardware pair (roofline elsewhere).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Plans shown.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Write the best plan as a deployment file (and FILE's .meta.toml sidecar).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the best plan as Kubernetes manifests into DIR (`kubectl apply -k DIR`).
    #[arg(long, value_name = "DIR", requires = "model_path")]
    pub k8s: Option<PathBuf>,
    #[command(flatten)]
    pub k8s_args: crate::k8s_cmd::K8sArgs,
}

#[derive(Debug, Args)]
pub struct ReproduceArgs {
    /// Output directory: writes reproduction.md and img/*.svg there.
    #[arg(long, default_value = "docs")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CatalogArgs {
    /// Extra hardware catalog (TOML).
    #[arg(long)]
    pub hw_catalog: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProfileTemplateArgs {
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub attention_hw: String,
    #[arg(long)]
    pub expert_hw: String,
    #[arg(long, default_value_t = 730)]
    pub context: u32,
    /// Output TOML file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub hw_catalog: Option<PathBuf>,
}

/// `tandem simulate`: a discrete-event simulation of a plan file's ping-pong pipeline.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Deployment file written by `tandem plan --out`.
    #[arg(long)]
    pub plan: PathBuf,
    /// Model (catalog name, config.json or GGUF file); default: the plan's .meta.toml sidecar.
    #[arg(long)]
    pub model: Option<String>,
    /// Context per sequence, tokens; default: the sidecar's, else 730.
    #[arg(long)]
    pub context: Option<u32>,
    /// Expert popularity skew (Zipf exponent; 0 = uniform, sampled). Absent: perfectly
    /// balanced routing, the closed form's assumption.
    #[arg(long, conflicts_with = "routing_trace")]
    pub skew: Option<f64>,
    /// Recorded routing: JSON {"num_experts": E, "layers": [[tokens per expert], ...]}.
    #[arg(long)]
    pub routing_trace: Option<PathBuf>,
    /// Coefficient of variation of each message's time (log-normal).
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Probability that a compute task straggles.
    #[arg(long, default_value_t = 0.0)]
    pub straggler_prob: f64,
    /// Slowdown of a straggling task.
    #[arg(long, default_value_t = 3.0)]
    pub straggler_factor: f64,
    /// Decode steps simulated.
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write an SVG timeline of one steady step here.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Layers shown in the timeline.
    #[arg(long, default_value_t = 4)]
    pub timeline_layers: u32,
    #[arg(long)]
    pub hw_catalog: Option<PathBuf>,
    /// Measured performance profile to take stage times from.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `tandem plan` and its subcommands.
pub fn plan(args: PlanArgs) -> Result<()> {
    match args.command {
        Some(PlanCommand::Reproduce(r)) => reproduce(r),
        Some(PlanCommand::Catalog(c)) => catalog(c),
        Some(PlanCommand::ProfileTemplate(p)) => profile_template(p),
        Some(PlanCommand::Engine(e)) => engine_predict(e),
        None => search(args.search),
    }
}

fn search(a: PlanSearchArgs) -> Result<()> {
    let Some(model_ref) = a.model.clone() else {
        bail!("tandem plan needs --model (a catalog name or a config.json); see `tandem plan catalog`");
    };
    let cat = load_hw_catalog(a.hw_catalog.as_ref())?;
    let model =
        resolve_model_shape(&model_ref).with_context(|| format!("resolving model {model_ref}"))?;
    let mut req = PlanRequest::new(model, "", "");
    (req.attention_hw, req.expert_hw) = match &a.hw {
        Some(h) => (vec![h.clone()], vec![h.clone()]),
        None => (
            cat.or_measured(&a.attention_hw),
            cat.or_measured(&a.expert_hw),
        ),
    };
    req.tbt_slo_s = a.tbt_slo_ms / 1e3;
    req.context_tokens = a.context as f64;
    req.min_micro_batches = a.min_micro_batches;
    req.max_micro_batches = a.max_micro_batches;
    req.max_tp_attention = a.max_tp_attention;
    req.max_tp_expert = a.max_tp_expert;
    req.experts_per_worker = a.experts_per_worker;
    req.max_replicas = a.max_replicas;
    req.max_gpus = a.max_gpus;
    req.max_micro_batch_seqs = a.max_micro_batch_seqs;
    req.mem_fraction = a.mem_fraction;
    req.expert_load_factor = a.expert_load_factor;
    req.objective = match a.objective {
        ObjectiveArg::Cost => Objective::PerCost,
        ObjectiveArg::Gpu => Objective::PerGpu,
    };
    req.price_unit = match a.price {
        PriceArg::Norm => PriceUnit::Norm,
        PriceArg::Usd => PriceUnit::Usd,
    };
    req.replica_search = if a.balance_only {
        ReplicaSearch::Balance
    } else {
        ReplicaSearch::Exhaustive
    };
    req.keep = a.top.max(1);
    let profile = load_profile(a.profile.as_ref())?;
    let source = profile
        .as_ref()
        .map_or(PerfSource::Roofline, PerfSource::Profile);
    let report = tandem_plan::plan(&req, &cat, source).context("planning")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::plan_report(&req, &report));
    }
    if let Some(out) = &a.out {
        let best = report.best().context("no plan to write")?;
        let side = deploy::write_plan(best, &model_ref, out)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {} (and {})", out.display(), side.display());
    }
    if let Some(dir) = &a.k8s {
        let best = report.best().context("no disaggregated plan to deploy")?;
        a.k8s_args.write(&deploy::to_deployment(best), &cat, dir)?;
    }
    Ok(())
}

fn reproduce(a: ReproduceArgs) -> Result<()> {
    let s = tandem_plan::reproduce::reproduce(&a.out)
        .with_context(|| format!("writing the reproduction report to {}", a.out.display()))?;
    print!("{}", report::reproduction(&s));
    Ok(())
}

fn catalog(a: CatalogArgs) -> Result<()> {
    let cat = load_hw_catalog(a.hw_catalog.as_ref())?;
    print!("{}", report::catalog(&cat, &ModelCatalog::builtin()?));
    Ok(())
}

fn profile_template(a: ProfileTemplateArgs) -> Result<()> {
    let cat = load_hw_catalog(a.hw_catalog.as_ref())?;
    let model = resolve_model_shape(&a.model)?;
    let ctx = a.context as f64;
    let text = Profile::roofline_template(&cat, &model, &a.attention_hw, &a.expert_hw, ctx)?;
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn engine_predict(a: EnginePredictArgs) -> Result<()> {
    let profile = Profile::load(&a.profile)
        .with_context(|| format!("loading profile {}", a.profile.display()))?;
    let model_ref = a.model.unwrap_or_else(|| profile.profile.model.clone());
    let model =
        resolve_model_shape(&model_ref).with_context(|| format!("resolving model {model_ref}"))?;
    let d = a.shape.deployment()?;
    let shape = EngineShape::from_deployment(&d, a.batch, a.context);
    let p = predict_decode(&profile, &model, &shape).context("predicting the engine")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", report::engine_prediction(&p));
    }
    Ok(())
}

/// Runs `tandem simulate`.
pub fn simulate(a: SimulateArgs) -> Result<()> {
    let cat = load_hw_catalog(a.hw_catalog.as_ref())?;
    let profile = load_profile(a.profile.as_ref())?;
    let imbalance = match (&a.routing_trace, a.skew) {
        (Some(p), _) => Imbalance::Trace(
            RoutingTrace::load(p)
                .with_context(|| format!("loading routing trace {}", p.display()))?,
        ),
        (None, Some(s)) => Imbalance::Zipf { skew: s },
        (None, None) => Imbalance::None,
    };
    let steps = a.steps.max(1);
    let opts = SimulateOptions {
        model: a.model.clone(),
        context_tokens: a.context.map(|c| c as f64),
        imbalance,
        jitter_cv: a.jitter,
        straggler_prob: a.straggler_prob,
        straggler_factor: a.straggler_factor,
        steps,
        seed: a.seed,
        timeline_step: a.timeline.as_ref().map(|_| if steps > 1 { 1 } else { 0 }),
    };
    let s = deploy::simulate_plan_file(&a.plan, &opts, &cat, profile.as_ref())
        .with_context(|| format!("simulating {}", a.plan.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s.report)?);
    } else {
        print!("{}", report::simulation(&s));
    }
    if let Some(path) = &a.timeline {
        let text = report::simulation_timeline_svg(&s, a.timeline_layers);
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[allow(clippy::large_enum_variant)]
    #[derive(Debug, Subcommand)]
    enum Cmd {
        Plan(PlanArgs),
        Simulate(SimulateArgs),
    }

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("tandem").chain(args.iter().copied()))
            .map(|c| c.cmd)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn flags_parse_as_documented() {
        let Cmd::Plan(p) = parse(&[
            "plan",
            "--model",
            "mixtral",
            "--attention-hw",
            "H20",
            "--expert-hw",
            "L40S",
            "--tbt-slo-ms",
            "150",
            "--context",
            "730",
            "--out",
            "x.toml",
        ]) else {
            panic!("not plan")
        };
        assert!(p.command.is_none());
        assert_eq!(p.search.attention_hw, vec!["H20"]);
        assert_eq!(p.search.context, 730);
        let Cmd::Plan(p) = parse(&["plan", "reproduce", "--out", "docs/"]) else {
            panic!("not plan")
        };
        assert!(matches!(p.command, Some(PlanCommand::Reproduce(_))));
        let Cmd::Plan(p) = parse(&[
            "plan",
            "engine",
            "--profile",
            "p.toml",
            "--expert-workers",
            "0",
            "--batch",
            "8",
        ]) else {
            panic!("not plan")
        };
        let Some(PlanCommand::Engine(e)) = p.command else {
            panic!("not plan engine")
        };
        assert_eq!(
            (e.shape.expert_workers, e.batch, e.context),
            (Some(0), 8, 88.0)
        );
        let Cmd::Plan(p) = parse(&["plan", "--model", "dbrx", "--attention-hw", "H20,H800"]) else {
            panic!("not plan")
        };
        assert_eq!(p.search.attention_hw.len(), 2);
        let Cmd::Simulate(s) = parse(&[
            "simulate", "--plan", "p.toml", "--skew", "0.5", "--jitter", "0.1",
        ]) else {
            panic!("not simulate")
        };
        assert_eq!(s.skew, Some(0.5));
        assert!(Cli::try_parse_from([
            "tandem",
            "simulate",
            "--plan",
            "p",
            "--skew",
            "1",
            "--routing-trace",
            "t"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["tandem", "plan", "--hw", "A800", "--attention-hw", "H20"])
                .is_err()
        );
    }

    /// `plan engine` predicts the run `bench engine` makes with the same flags: an
    /// expert-worker count without `--micro-batches` gets the one default `m`
    /// (`tandem_core::default_micro_batches`), not a second default of its own.
    #[test]
    fn plan_engine_resolves_the_shape_bench_engine_runs() {
        for workers in [0u32, 1, 3] {
            let w = workers.to_string();
            let Cmd::Plan(p) = parse(&[
                "plan",
                "engine",
                "--profile",
                "p.toml",
                "--expert-workers",
                &w,
            ]) else {
                panic!("not plan")
            };
            let Some(PlanCommand::Engine(e)) = p.command else {
                panic!("not plan engine")
            };
            let d = e.shape.deployment().unwrap();
            assert_eq!(d.expert_workers, workers);
            assert_eq!(d.micro_batches, tandem_core::default_micro_batches(workers));
        }
    }

    #[test]
    fn plan_then_simulate_end_to_end() {
        let dir = std::env::temp_dir().join(format!("tandem-plan-cmd-{}", std::process::id()));
        let out = dir.join("plan.toml");
        let out_s = out.display().to_string();
        let Cmd::Plan(p) = parse(&[
            "plan",
            "--model",
            "mixtral-8x22b",
            "--attention-hw",
            "H20",
            "--expert-hw",
            "L40S",
            "--max-replicas",
            "8",
            "--out",
            &out_s,
            "--k8s",
            &dir.join("k8s").display().to_string(),
            "--model-path",
            "/models/mixtral",
        ]) else {
            panic!("not plan")
        };
        plan(p).unwrap();
        assert!(out.exists());
        // The manifests hold the same deployment as the plan file, addresses aside.
        let planned = tandem_core::Deployment::load(&out).unwrap();
        let yaml =
            std::fs::read_to_string(dir.join("k8s/configmap-tandem-deployment.yaml")).unwrap();
        assert!(yaml.contains(&format!(
            "attention_replicas = {}",
            planned.attention_replicas
        )));
        assert!(dir.join("k8s/kustomization.yaml").exists());
        assert!(Cli::try_parse_from(["tandem", "plan", "--model", "m", "--k8s", "d"]).is_err());
        let Cmd::Simulate(s) = parse(&["simulate", "--plan", &out_s, "--steps", "2"]) else {
            panic!("not simulate")
        };
        simulate(s).unwrap();
        let Cmd::Plan(p) = parse(&[
            "plan",
            "--model",
            "mixtral",
            "--hw",
            "A800",
            "--tbt-slo-ms",
            "1",
        ]) else {
            panic!("not plan")
        };
        let e = format!("{:#}", plan(p).unwrap_err());
        assert!(e.contains("SLO binds"), "{e}");
        let Cmd::Plan(p) = parse(&["plan"]) else {
            panic!("not plan")
        };
        assert!(plan(p).unwrap_err().to_string().contains("--model"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
