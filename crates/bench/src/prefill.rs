//! `tandem bench prefill`: prompt processing speed, the counterpart of `llama-bench -p 512
//! -n 0`. For every weight type and prompt length asked, the colocated model runs the whole
//! prompt as one forward pass into an empty KV cache and computes the last token's logits
//! (what a server does before its first token); tokens/s = prompt tokens / that time. One
//! JSON object on stdout, with the machine, as the other bench commands.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::time::Instant;
use tandem_model::weights::LinearType;
use tandem_model::{BatchLayout, ExpertSelection, KvCache, Model, ModelSource, SeqSlot};

use crate::stats::percentile;
use crate::sysinfo::{load_average, machine_info, unix_secs, utc_stamp};

/// The flags of `tandem bench prefill` besides the model.
#[derive(Args, Clone, Debug)]
pub struct PrefillArgs {
    /// Prompt lengths in tokens, comma-separated (`llama-bench -p`).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub prompt_len: Vec<usize>,
    /// Weight types of the linear layers, comma-separated: `auto` (the checkpoint's own),
    /// `f32`, `bf16`, `q8_0`, `q4_0`. The model is loaded once per type.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub dtype: Vec<String>,
    /// Timed prompts per type and length.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Untimed prompts first, per type and length.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// One entry of `--dtype`: a float type goes to `LinearType::from_flags` as a dtype, a
/// quantized one as a quantization.
pub fn parse_weight_type(s: &str) -> Result<LinearType> {
    let t = s.trim().to_ascii_lowercase();
    let r = match t.as_str() {
        "q8_0" | "q4_0" => LinearType::from_flags("auto", Some(&t)),
        _ => LinearType::from_flags(&t, None),
    };
    r.map_err(|_| {
        anyhow::anyhow!(
            "--dtype {s:?}: unknown weight type (supported: auto, f32, bf16, q8_0, q4_0)"
        )
    })
}

/// Checks the flags before any model is loaded: every type known, lengths and reps not 0.
pub fn check(a: &PrefillArgs) -> Result<Vec<LinearType>> {
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!(
            "--prompt-len {:?}: every prompt length must be at least 1 token",
            a.prompt_len
        );
    }
    if a.reps == 0 {
        bail!("--reps 0: at least one timed prompt is needed");
    }
    if a.dtype.is_empty() {
        bail!("--dtype: name at least one weight type");
    }
    a.dtype.iter().map(|d| parse_weight_type(d)).collect()
}

/// The timings of one weight type at one prompt length.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillResult {
    /// The `--dtype` entry asked for.
    pub asked: String,
    /// The type the linear layers were held in (`auto` resolved).
    pub weight_type: String,
    pub prompt_len: usize,
    /// Seconds of each timed prompt.
    pub seconds: Vec<f64>,
}

/// Median, min, max and every value.
fn spread(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match (s.first(), s.last()) {
        (Some(lo), Some(hi)) => {
            json!({"median": percentile(&s, 50.0), "min": lo, "max": hi, "values": v})
        }
        _ => json!({"median": 0.0, "min": 0.0, "max": 0.0, "values": []}),
    }
}

impl PrefillResult {
    fn to_json(&self) -> serde_json::Value {
        let tps: Vec<f64> = self
            .seconds
            .iter()
            .map(|s| self.prompt_len as f64 / s.max(1e-12))
            .collect();
        let ms: Vec<f64> = self.seconds.iter().map(|s| s * 1e3).collect();
        json!({
            "dtype": self.asked,
            "weight_type": self.weight_type,
            "prompt_len": self.prompt_len,
            "tokens_per_s": spread(&tps),
            "ms": spread(&ms),
        })
    }
}

/// The report: the model, the flags, one entry per (type, length) in the order asked, and
/// the machine.
pub fn report(
    model: &str,
    family: &str,
    params: u64,
    threads: usize,
    a: &PrefillArgs,
    results: &[PrefillResult],
) -> serde_json::Value {
    json!({
        "bench": "prefill",
        "model": model,
        "family": family,
        "params": params,
        "threads": threads,
        "reps": a.reps,
        "warmup": a.warmup,
        "definitions": {
            "prompt": "prompt_len tokens as one forward pass into an empty KV cache, then the last token's logits (llama-bench -p N -n 0)",
            "tokens_per_s": "prompt_len / seconds of one prompt; median, min, max over reps",
        },
        "results": results.iter().map(PrefillResult::to_json).collect::<Vec<_>>(),
        "date": utc_stamp(unix_secs()),
        "load_average": load_average(),
        "machine": machine_info(),
    })
}

/// Runs `tandem bench prefill` on the model `src` and prints the report.
pub fn run(src: &ModelSource, a: &PrefillArgs) -> Result<()> {
    let types = check(a)?;
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let out = pool.install(|| measure(src, a, &types, threads))?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn measure(
    src: &ModelSource,
    a: &PrefillArgs,
    types: &[LinearType],
    threads: usize,
) -> Result<serde_json::Value> {
    let mut results = Vec::new();
    let mut about = None;
    for (asked, &ty) in a.dtype.iter().zip(types) {
        let model = Model::load_typed(src.clone(), &ExpertSelection::All, ty)
            .with_context(|| format!("loading {} with --dtype {asked}", src.path().display()))?;
        let cfg = &model.cfg;
        about.get_or_insert((cfg.family.name().to_string(), cfg.num_params()));
        for &len in &a.prompt_len {
            if len > cfg.max_position_embeddings {
                bail!(
                    "--prompt-len {len}: longer than the model's max_position_embeddings ({})",
                    cfg.max_position_embeddings
                );
            }
            let mut seconds = Vec::with_capacity(a.reps);
            for rep in 0..a.warmup + a.reps {
                let s = one_prompt(&model, len, rep)?;
                if rep >= a.warmup {
                    seconds.push(s);
                }
            }
            eprintln!(
                "bench prefill: {asked} ({}), {len} tokens: {:.1} ms (median of {})",
                model.weight_type().name(),
                percentile(&sorted(&seconds), 50.0) * 1e3,
                a.reps
            );
            results.push(PrefillResult {
                asked: asked.clone(),
                weight_type: model.weight_type().name().to_string(),
                prompt_len: len,
                seconds,
            });
        }
    }
    let (family, params) = about.unwrap_or_default();
    Ok(report(
        &src.path().display().to_string(),
        &family,
        params as u64,
        threads,
        a,
        &results,
    ))
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

/// Seconds of one prompt of `len` deterministic tokens (different per `rep`, so no prefix
/// is shared) into a fresh KV cache, the last token's logits included.
fn one_prompt(model: &Model, len: usize, rep: usize) -> Result<f64> {
    let cfg = &model.cfg;
    let bs = 16;
    let blocks = len.div_ceil(bs);
    let mut kv = KvCache::new(cfg, bs, blocks);
    let prompt: Vec<u32> = (0..len)
        .map(|j| ((rep * 7919 + j * 104729 + 1) % cfg.vocab_size) as u32)
        .collect();
    let layout = BatchLayout {
        seqs: vec![SeqSlot {
            start_pos: 0,
            num_tokens: len,
            block_table: (0..blocks as u32).collect(),
        }],
    };
    let t = Instant::now();
    let h = model.forward(&prompt, &layout, &mut kv)?;
    let logits = model.logits(&h, &layout.last_rows())?;
    let s = t.elapsed().as_secs_f64();
    if logits.len() != cfg.vocab_size || logits.iter().any(|x| !x.is_finite()) {
        bail!(
            "prefill of {len} tokens gave {} logits (expected {}) or a non-finite one",
            logits.len(),
            cfg.vocab_size
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: PrefillArgs,
    }

    fn parse(args: &[&str]) -> PrefillArgs {
        Cli::try_parse_from(std::iter::once("prefill").chain(args.iter().copied()))
            .map(|c| c.a)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn flags_take_lists_of_lengths_and_types() {
        let a = parse(&[
            "--prompt-len",
            "512,2048",
            "--dtype",
            "f32,bf16,q8_0",
            "--reps",
            "5",
        ]);
        assert_eq!(a.prompt_len, vec![512, 2048]);
        assert_eq!(a.dtype, vec!["f32", "bf16", "q8_0"]);
        assert_eq!(a.reps, 5);
        let types = check(&a).unwrap();
        assert_eq!(
            types,
            vec![
                LinearType::from_flags("f32", None).unwrap(),
                LinearType::from_flags("bf16", None).unwrap(),
                LinearType::from_flags("auto", Some("q8_0")).unwrap(),
            ]
        );
        // The defaults: llama-bench's -p 512, the checkpoint's own type.
        let d = parse(&[]);
        assert_eq!(d.prompt_len, vec![512]);
        assert_eq!(d.dtype, vec!["auto"]);
        assert_eq!(check(&d).unwrap(), vec![LinearType::Auto]);
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag_and_the_value() {
        let e = check(&parse(&["--dtype", "f32,q3_k"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dtype") && e.contains("q3_k"), "{e}");
        let e = check(&parse(&["--prompt-len", "512,0"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--prompt-len") && e.contains("[512, 0]"), "{e}");
        let e = check(&parse(&["--reps", "0"])).unwrap_err().to_string();
        assert!(e.contains("--reps 0"), "{e}");
    }

    #[test]
    fn the_report_has_one_entry_per_type_and_length_with_tokens_per_second() {
        let a = parse(&[
            "--prompt-len",
            "100,400",
            "--dtype",
            "f32,q8_0",
            "--reps",
            "2",
        ]);
        let results = vec![
            PrefillResult {
                asked: "f32".into(),
                weight_type: "f32".into(),
                prompt_len: 100,
                seconds: vec![0.5, 0.25],
            },
            PrefillResult {
                asked: "q8_0".into(),
                weight_type: "q8_0".into(),
                prompt_len: 400,
                seconds: vec![1.0, 2.0],
            },
        ];
        let r = report("demo", "mixtral", 489, 2, &a, &results);
        assert_eq!(r["bench"], "prefill");
        assert_eq!(r["reps"], 2);
        assert_eq!(r["threads"], 2);
        assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
        assert!(r["load_average"].is_string());
        let e = r["results"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["dtype"], "f32");
        assert_eq!(e[0]["prompt_len"], 100);
        // 100 tokens in 0.5 s and 0.25 s: 200 and 400 tokens/s, median 300.
        assert_eq!(e[0]["tokens_per_s"]["values"], json!([200.0, 400.0]));
        assert_eq!(e[0]["tokens_per_s"]["median"], 300.0);
        assert_eq!(e[0]["tokens_per_s"]["min"], 200.0);
        assert_eq!(e[0]["ms"]["max"], 500.0);
        assert_eq!(e[1]["weight_type"], "q8_0");
        assert_eq!(e[1]["tokens_per_s"]["median"], 300.0);
    }
}
