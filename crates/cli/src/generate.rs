//! `tandem generate`: batched generation for scripts and tests.

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args};
use std::path::PathBuf;
use tandem_sched::SamplingParams;

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
    pub shape: tandem_deploy::ShapeArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
    #[command(flatten)]
    pub role: tandem_deploy::RoleArgs,
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
    let src = crate::models::resolve(&a.model)?;
    let mut dep = a.shape.deployment_or_default(a.role.role.is_some(), &src)?;
    a.role.resolve(&mut dep)?;
    let (engine, tok) = tandem_deploy::start_engine(&src, dep, &a.role, a.weights.linear_type()?)?;
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(match p {
            PromptArg::Ids(v) => v.clone(),
            PromptArg::Text(t) => match &tok {
                Some(tk) => tk.encode(t, true)?,
                None => bail!(
                    "{} has no tokenizer: use --prompt-ids",
                    src.path().display()
                ),
            },
        });
        if ids.last().is_some_and(|v| v.is_empty()) {
            bail!("prompt {} is empty", ids.len() - 1);
        }
    }
    let outputs = tandem_deploy::generate(&engine, &ids, &params)?;
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
