//! `tandem bench ...`: measurements printed as one JSON object on stdout.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;
use tandem_model::generate::argmax;
use tandem_model::{BatchLayout, KvCache, Model, SeqSlot};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Decode steps of the colocated model at a fixed batch: tokens/s, ms/step and the
    /// fraction of the memory-bandwidth roofline reached.
    Decode(DecodeArgs),
    /// Offline throughput of the engine: N requests through one or more deployment shapes,
    /// measured one after another in the same run.
    Engine(EngineArgs),
    /// Load generator for any OpenAI-compatible server, compatible with `vllm bench serve`.
    Serve(crate::bench_serve::BenchServeArgs),
}

#[derive(Args)]
pub struct EngineArgs {
    /// Checkpoint directory; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request (EOS ignored).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Run the shape once per value of m (e.g. 1,2,3); default: the shape's own m.
    #[arg(long, value_delimiter = ',')]
    pub sweep_micro_batches: Vec<u32>,
    /// Also run the colocated shape (1 replica, experts local, all cores in its pool).
    #[arg(long)]
    pub with_colocated: bool,
    #[command(flatten)]
    pub shape: crate::generate::ShapeArgs,
}

#[derive(Args)]
pub struct DecodeArgs {
    /// Checkpoint directory; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt tokens per sequence before the timed steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::Engine(a) => engine(a),
        BenchCmd::Serve(a) => crate::bench_serve::run(a),
    }
}

/// Best-of-5 read bandwidth over a 1 GiB buffer in the current rayon pool, bytes/s.
pub fn measure_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 1usize << 28; // f32s = 1 GiB
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i & 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(tandem_model::kernels::sum)
            .sum();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

pub fn machine_info() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
    })
}

fn decode(a: DecodeArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let dir = crate::models::resolve(&a.model)?;
    pool.install(|| decode_in_pool(&a, &dir, threads))
}

fn decode_in_pool(a: &DecodeArgs, dir: &std::path::Path, threads: usize) -> Result<()> {
    let model = Model::load(dir).with_context(|| format!("loading {}", dir.display()))?;
    let cfg = &model.cfg;
    let bs = 16;
    let total = a.context + a.warmup + a.steps + 1;
    let per = total.div_ceil(bs);
    let mut kv = KvCache::new(cfg, bs, per * a.batch);
    let tables: Vec<Vec<u32>> = (0..a.batch)
        .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
        .collect();
    // Prefill every sequence with a deterministic prompt (not timed).
    let mut next = Vec::with_capacity(a.batch);
    for (i, table) in tables.iter().enumerate() {
        let prompt: Vec<u32> = (0..a.context)
            .map(|j| ((i * 7919 + j * 104729) % cfg.vocab_size) as u32)
            .collect();
        let layout = BatchLayout {
            seqs: vec![SeqSlot {
                start_pos: 0,
                num_tokens: prompt.len(),
                block_table: table.clone(),
            }],
        };
        let h = model.forward(&prompt, &layout, &mut kv)?;
        next.push(argmax(&model.logits(&h, &layout.last_rows())?));
    }
    let mut times = Vec::new();
    let mut experts_hit = 0usize;
    let mut moe_layer_steps = 0usize;
    let mut kv_bytes = 0f64;
    let kv_tok = KvCache::bytes_per_token(cfg) as f64;
    for step in 0..a.warmup + a.steps {
        let pos = a.context + step;
        let layout = BatchLayout {
            seqs: tables
                .iter()
                .map(|t| SeqSlot {
                    start_pos: pos,
                    num_tokens: 1,
                    block_table: t.clone(),
                })
                .collect(),
        };
        let timed = step >= a.warmup;
        let t = Instant::now();
        let mut hit = 0usize;
        let mut layers = 0usize;
        let h = model.forward_observed(&next, &layout, &mut kv, &mut |_, r| {
            hit += r.ids.iter().collect::<HashSet<_>>().len();
            layers += 1;
        })?;
        let logits = model.logits(&h, &layout.last_rows())?;
        let v = cfg.vocab_size;
        next = (0..a.batch)
            .map(|i| argmax(&logits[i * v..(i + 1) * v]))
            .collect();
        if timed {
            times.push(t.elapsed().as_secs_f64());
            experts_hit += hit;
            moe_layer_steps += layers;
            // Each sequence reads the keys and values of positions 0..=pos.
            kv_bytes += a.batch as f64 * (pos + 1) as f64 * kv_tok;
        }
    }
    let n = times.len().max(1) as f64;
    let step_s = times.iter().sum::<f64>() / n;
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median_s = sorted.get(sorted.len() / 2).copied().unwrap_or(step_s);
    let hit_per_layer = experts_hit as f64 / moe_layer_steps.max(1) as f64;
    let weight_bytes = model.bytes_per_step(hit_per_layer);
    let bytes = weight_bytes + kv_bytes / n;
    let bw = measure_bandwidth();
    let achieved = bytes / step_s;
    let out = json!({
        "bench": "decode",
        "model": dir.display().to_string(),
        "family": cfg.family.name(),
        "params": cfg.num_params(),
        "batch": a.batch,
        "context": a.context,
        "steps": a.steps,
        "threads": threads,
        "ms_per_step": step_s * 1e3,
        "ms_per_step_median": median_s * 1e3,
        "tokens_per_s": a.batch as f64 / step_s,
        "experts_hit_per_moe_layer": hit_per_layer,
        "bytes_per_step": {"weights": weight_bytes, "kv": kv_bytes / n, "total": bytes},
        "achieved_gb_s": achieved / 1e9,
        "measured_bandwidth_gb_s": bw / 1e9,
        "roofline_fraction": achieved / bw,
        "machine": machine_info(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn engine(a: EngineArgs) -> Result<()> {
    use std::sync::Arc;
    use tandem_engine::{Engine, EngineOptions};
    use tandem_sched::SamplingParams;
    let dir = crate::models::resolve(&a.model)?;
    let model = Arc::new(Model::load(&dir).with_context(|| format!("loading {}", dir.display()))?);
    let base = a.shape.deployment()?;
    let mut shapes = Vec::new();
    if a.sweep_micro_batches.is_empty() {
        shapes.push(base.clone());
    }
    for m in &a.sweep_micro_batches {
        let mut d = base.clone();
        d.micro_batches = *m;
        shapes.push(d);
    }
    if a.with_colocated {
        let mut d = base.clone();
        d.attention_replicas = 1;
        d.expert_workers = 0;
        d.micro_batches = 1;
        d.threads_per_worker = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        shapes.push(d);
    }
    let v = model.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = (0..a.requests)
        .map(|i| {
            (0..a.input_len)
                .map(|j| ((i * 7919 + j * 104729 + 13) % v) as u32)
                .collect()
        })
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(a.output_len),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut runs = Vec::new();
    for d in shapes {
        let label = if d.expert_workers == 0 {
            format!("colocated x{} threads", d.threads_per_worker)
        } else {
            format!(
                "n_a={} N={} m={}",
                d.attention_replicas, d.expert_workers, d.micro_batches
            )
        };
        eprintln!("bench engine: {label} ...");
        let engine = Engine::start(
            model.clone(),
            None,
            EngineOptions {
                deployment: d.clone(),
                enable_prefix_caching: false,
                ..EngineOptions::default()
            },
        )?;
        let t = Instant::now();
        let handles = prompts
            .iter()
            .map(|p| engine.add_request(p.clone(), params.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tokens = 0usize;
        let mut first_token_s = Vec::new();
        for h in handles {
            let mut rx = h.rx;
            let mut first = true;
            while let Some(o) = rx.blocking_recv() {
                if o.token.is_some() {
                    tokens += 1;
                    if first {
                        first_token_s.push(t.elapsed().as_secs_f64());
                        first = false;
                    }
                }
                if let Some(f) = o.finish {
                    if let tandem_sched::FinishReason::Error(e) = f.reason {
                        anyhow::bail!("{label}: request failed: {e}");
                    }
                    break;
                }
            }
        }
        let wall = t.elapsed().as_secs_f64();
        let stats = engine.stats();
        engine.shutdown();
        let workers = &stats.workers;
        let bubble = if workers.is_empty() {
            0.0
        } else {
            workers.iter().map(|w| 1.0 - w.busy_fraction).sum::<f64>() / workers.len() as f64
        };
        runs.push(json!({
            "shape": label,
            "attention_replicas": d.attention_replicas,
            "expert_workers": d.expert_workers,
            "micro_batches": d.micro_batches,
            "threads_per_worker": d.threads_per_worker,
            "pin_cores": d.pin_cores,
            "wall_s": wall,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens as f64 / wall,
            "iterations": stats.iterations,
            "preemptions": stats.preemptions,
            "workers": workers,
            "bubble_fraction": bubble,
        }));
    }
    let base_tps = runs
        .first()
        .and_then(|r| r["output_tokens_per_s"].as_f64())
        .unwrap_or(0.0);
    for r in runs.iter_mut() {
        let tps = r["output_tokens_per_s"].as_f64().unwrap_or(0.0);
        r["speedup_vs_first"] = json!(if base_tps > 0.0 { tps / base_tps } else { 0.0 });
    }
    let out = json!({
        "bench": "engine",
        "model": dir.display().to_string(),
        "requests": a.requests,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "runs": runs,
        "machine": machine_info(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
