//! `tandem generate`: batched generation for scripts and tests.

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args};
use std::path::{Path, PathBuf};
use tandem_core::Deployment;
use tandem_engine::Engine;
use tandem_sched::{FinishReason, SamplingParams};

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (Hugging Face layout) or llama.cpp GGUF file (`*.gguf`: weights,
    /// config and tokenizer from the one file). Default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A text prompt (repeatable: a batch).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A prompt as comma-separated token ids (repeatable).
    #[arg(long = "prompt-ids")]
    pub prompt_ids: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop strings (repeatable): text that ends generation and is not returned.
    #[arg(long)]
    pub stop: Vec<String>,
    /// One JSON object per prompt and line: {"index", "token_ids", "text"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
    #[command(flatten)]
    pub role: crate::roles::RoleArgs,
}

/// The deployment shape flags shared by `generate` and the benchmarks.
#[derive(Args, Clone)]
pub struct ShapeArgs {
    /// Deployment file (TOML); the flags below override it.
    #[arg(long)]
    pub deployment: Option<PathBuf>,
    /// Attention replicas (n_a).
    #[arg(long)]
    pub attention_replicas: Option<u32>,
    /// Expert workers (N); 0 = colocated (each replica runs its own experts).
    #[arg(long)]
    pub expert_workers: Option<u32>,
    /// Micro-batches per iteration (m).
    #[arg(long)]
    pub micro_batches: Option<u32>,
    /// Threads per worker.
    #[arg(long)]
    pub threads_per_worker: Option<u32>,
    /// Pin workers to cores (replicas first, then expert workers).
    #[arg(long)]
    pub pin_cores: bool,
}

impl ShapeArgs {
    /// Whether any shape flag or a deployment file was given.
    pub fn is_explicit(&self) -> bool {
        self.deployment.is_some()
            || self.attention_replicas.is_some()
            || self.expert_workers.is_some()
            || self.micro_batches.is_some()
            || self.threads_per_worker.is_some()
            || self.pin_cores
    }

    /// The deployment the flags describe; with none at all (and no role), the default shape
    /// for this host and the model at `model` (`tandem_plan::default_shape`: from this
    /// machine's cached `tandem profile` of the model if there is one, else the one-host
    /// rule), logged with its reason.
    pub fn deployment_or_default(&self, has_role: bool, model: &Path) -> Result<Deployment> {
        use tandem_plan::default_shape as ds;
        if self.is_explicit() || has_role {
            return self.deployment();
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cached = ds::profile_cache_path(&tandem_model::demo::cache_root(), model);
        let from_profile = || -> Result<ds::DefaultShape, String> {
            let profile = tandem_plan::Profile::load(&cached).map_err(|e| e.to_string())?;
            let shape =
                tandem_plan::model::ModelShape::from_path(model).map_err(|e| e.to_string())?;
            let machine = tandem_bench::sysinfo::machine_line(cores);
            ds::from_profile(&profile, &shape, cores, &machine)
        };
        let s = if cached.exists() {
            match from_profile() {
                Ok(s) => s,
                Err(why) => {
                    tracing::warn!("not using the profile {}: {why}", cached.display());
                    ds::default_shape(cores)
                }
            }
        } else {
            ds::default_shape(cores)
        };
        tracing::info!("shape: {}", s.reason);
        Ok(s.deployment)
    }

    pub fn deployment(&self) -> Result<Deployment> {
        let mut d = match &self.deployment {
            Some(p) => Deployment::load(p)?,
            None => Deployment::default(),
        };
        if let Some(v) = self.attention_replicas {
            d.attention_replicas = v;
        }
        if let Some(v) = self.expert_workers {
            d.expert_workers = v;
        }
        if let Some(v) = self.micro_batches {
            d.micro_batches = v;
        }
        if let Some(v) = self.threads_per_worker {
            d.threads_per_worker = v;
        }
        if self.pin_cores {
            d.pin_cores = true;
        }
        d.validate_shape()?;
        Ok(d)
    }
}

enum PromptArg {
    Text(String),
    Ids(Vec<u32>),
}

/// Prompts in command-line order, `--prompt` and `--prompt-ids` interleaved as given.
fn ordered_prompts(a: &GenerateArgs, m: &ArgMatches) -> Result<Vec<PromptArg>> {
    let mut v: Vec<(usize, PromptArg)> = Vec::new();
    if let Some(idx) = m.indices_of("prompt") {
        for (i, p) in idx.zip(&a.prompt) {
            v.push((i, PromptArg::Text(p.clone())));
        }
    }
    if let Some(idx) = m.indices_of("prompt_ids") {
        for (i, p) in idx.zip(&a.prompt_ids) {
            let ids = p
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("--prompt-ids {p:?}: expected comma-separated token ids")
                })?;
            v.push((i, PromptArg::Ids(ids)));
        }
    }
    v.sort_by_key(|(i, _)| *i);
    Ok(v.into_iter().map(|(_, p)| p).collect())
}

pub fn run(mut a: GenerateArgs, m: &ArgMatches) -> Result<()> {
    let prompts = ordered_prompts(&a, m)?;
    if prompts.is_empty() {
        bail!("give at least one --prompt or --prompt-ids");
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        seed: a.seed,
        max_tokens: Some(a.max_tokens),
        ignore_eos: a.ignore_eos,
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    params.validate()?;
    let dir = crate::models::resolve(&a.model)?;
    let mut dep = a.shape.deployment_or_default(a.role.role.is_some(), &dir)?;
    a.role.resolve(&mut dep)?;
    let (engine, tok) = crate::roles::start_engine(&dir, dep, &a.role, a.weights.linear_type()?)?;
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(match p {
            PromptArg::Ids(v) => v.clone(),
            PromptArg::Text(t) => match &tok {
                Some(tk) => tk.encode(t, true)?,
                None => bail!("{} has no tokenizer: use --prompt-ids", dir.display()),
            },
        });
        if ids.last().is_some_and(|v| v.is_empty()) {
            bail!("prompt {} is empty", ids.len() - 1);
        }
    }
    let outputs = generate(&engine, &ids, &params)?;
    engine.shutdown();
    for (i, (out, text)) in outputs.iter().enumerate() {
        if a.json {
            println!(
                "{}",
                serde_json::json!({"index": i, "token_ids": out, "text": text})
            );
        } else {
            println!("[{i}] {text}");
        }
    }
    Ok(())
}

/// Runs every prompt through the engine (prompts spread over the replicas) and returns the
/// generated token ids per prompt, in prompt order.
pub fn generate(
    engine: &Engine,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<(Vec<u32>, String)>> {
    let handles = prompts
        .iter()
        .map(|p| engine.add_request(p.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        let mut rx = h.rx;
        let (mut toks, mut text) = (Vec::new(), String::new());
        while let Some(o) = rx.blocking_recv() {
            toks.extend(o.token);
            text.push_str(&o.text);
            if let Some(f) = o.finish {
                if let FinishReason::Error(e) = f.reason {
                    bail!("request {} failed: {e}", h.id.0);
                }
                break;
            }
        }
        outs.push((toks, text));
    }
    Ok(outs)
}
