//! `tandem bench decode` and `tandem bench engine`: measurements printed as one JSON object on
//! stdout. The binary resolves the model and the deployment shape; the harnesses own the
//! flags of their own.

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tandem_core::Deployment;
use tandem_engine::stats::StatsSnapshot;
use tandem_engine::{Engine, EngineOptions};
use tandem_model::generate::argmax;
use tandem_model::weights::LinearType;
use tandem_model::{BatchLayout, ExpertSelection, KvCache, Model, ModelSource, SeqSlot};
use tandem_sched::SamplingParams;

use crate::stats::percentile;
use crate::sysinfo::{load_average, machine_info, measure_bandwidth};

/// The flags of `tandem bench engine` besides the model, the shape and the weight type.
#[derive(Args)]
pub struct EngineArgs {
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
    /// KV cache per replica, GiB (long contexts x many sequences need more than the default).
    #[arg(long)]
    pub kv_cache_gb: Option<f64>,
    /// Per replica: most sequences in one iteration (overrides the deployment).
    #[arg(long)]
    pub max_num_seqs: Option<u32>,
    /// Per replica: most tokens in one iteration (overrides the deployment).
    #[arg(long)]
    pub max_num_batched_tokens: Option<u32>,
    /// The first P tokens of every prompt are the same (a shared system prompt). Turns on
    /// prefix caching and computes the prefix once per shape before the clock starts, so long
    /// contexts cost little prefill; decode still attends over all of them.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_len: usize,
    /// Run every shape this many times, interleaved (round 1: all shapes, round 2: all shapes,
    /// ...), and add a `summary` with each shape's median and its median ratio to the first
    /// shape within a round: on a shared, noisy machine, drift then hits all shapes alike.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// The flags of `tandem bench decode` besides the model and the weight type.
#[derive(Args)]
pub struct DecodeArgs {
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

/// Decode steps of the colocated model `src` (loaded with weights of type `ty`) at a fixed
/// batch.
pub fn decode(src: &ModelSource, ty: LinearType, a: &DecodeArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| decode_in_pool(a, src, ty, threads))
}

fn decode_in_pool(a: &DecodeArgs, src: &ModelSource, ty: LinearType, threads: usize) -> Result<()> {
    let dir = src.path();
    let model = Model::load_typed(src.clone(), &ExpertSelection::All, ty)
        .with_context(|| format!("loading {}", dir.display()))?;
    let memory = model.weight_memory();
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
        "weight_type": model.weight_type().name(),
        "weight_memory": {
            "by_type_bytes": memory.by_type,
            "weight_bytes": memory.weight_bytes(),
            "resident_bytes": memory.resident_bytes,
            "norms_and_biases_bytes": memory.other_bytes,
            "resident_over_weight": memory.resident_bytes as f64 / memory.weight_bytes().max(1) as f64,
        },
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

/// One token or the end of a request, as the bench's receiver threads saw it.
enum Event {
    Token(Instant),
    Done(Result<(), String>),
}

/// Busy seconds of each worker between two snapshots, and the mean busy fraction.
fn phase_workers(
    before: &tandem_engine::stats::StatsSnapshot,
    after: &tandem_engine::stats::StatsSnapshot,
) -> (Vec<serde_json::Value>, f64) {
    let mut out = Vec::new();
    let mut idle = 0.0;
    for (a, b) in after.workers.iter().zip(&before.workers) {
        let busy = a.busy_s - b.busy_s;
        let idl = a.idle_s - b.idle_s;
        let f = if busy + idl > 0.0 {
            busy / (busy + idl)
        } else {
            0.0
        };
        idle += 1.0 - f;
        out.push(json!({
            "role": a.role, "id": a.id, "busy_s": busy, "idle_s": idl, "busy_fraction": f,
            "lm_head_s": a.lm_head_s - b.lm_head_s, "sample_s": a.sample_s - b.sample_s,
        }));
    }
    let n = out.len().max(1) as f64;
    (out, idle / n)
}

/// Median, min and max of `v` (empty: zeros).
fn spread(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return json!({"median": 0.0, "min": 0.0, "max": 0.0, "values": []});
    }
    let n = v.len();
    json!({"median": percentile(&v, 50.0), "min": v[0], "max": v[n - 1], "values": v})
}

/// Per shape (runs are `rounds x n_shapes`, round-major): the spread of its throughputs and
/// of its ratios to the first shape of the same round.
fn summarize_rounds(runs: &[serde_json::Value], n_shapes: usize) -> Vec<serde_json::Value> {
    (0..n_shapes)
        .map(|j| {
            let of = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| {
                spread(
                    runs.iter()
                        .skip(j)
                        .step_by(n_shapes)
                        .filter_map(f)
                        .collect(),
                )
            };
            json!({
                "shape": runs[j]["shape"],
                "output_tokens_per_s": of(&|r| r["output_tokens_per_s"].as_f64()),
                "decode_tokens_per_s": of(&|r| r["decode"]["output_tokens_per_s"].as_f64()),
                "speedup_vs_first": of(&|r| r["speedup_vs_first"].as_f64()),
                "decode_speedup_vs_first": of(&|r| r["decode_speedup_vs_first"].as_f64()),
                "bubble_fraction": of(&|r| r["decode"]["bubble_fraction"].as_f64()),
            })
        })
        .collect()
}

/// The shapes one round runs: `base`, or `base` at each `--sweep-micro-batches`, and with
/// `--with-colocated` one replica with every core.
fn sweep_shapes(base: &Deployment, a: &EngineArgs) -> Vec<Deployment> {
    let mut shapes = Vec::new();
    if a.sweep_micro_batches.is_empty() {
        shapes.push(base.clone());
    }
    for m in &a.sweep_micro_batches {
        let mut d = base.clone();
        d.micro_batches = *m;
        shapes.push(d);
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    if a.with_colocated {
        // The same machine: one replica whose pool has every core (as many threads as the
        // disaggregated shapes have in all when they use one per core).
        let mut d = base.clone();
        d.attention_replicas = 1;
        d.expert_workers = 0;
        d.micro_batches = 1;
        d.threads_per_worker = cores;
        shapes.push(d);
    }
    shapes
}

/// The shared prefix (`--shared-prefix-len` tokens) and the prompts that start with it, in
/// a vocabulary of `v` tokens.
fn bench_prompts(a: &EngineArgs, v: usize) -> (Vec<u32>, Vec<Vec<u32>>) {
    let p = a.shared_prefix_len.min(a.input_len);
    let prefix: Vec<u32> = (0..p).map(|j| ((j * 104729 + 7) % v) as u32).collect();
    let prompts: Vec<Vec<u32>> = (0..a.requests)
        .map(|i| {
            let mut t = prefix.clone();
            t.extend((p..a.input_len).map(|j| ((i * 7919 + j * 104729 + 13) % v) as u32));
            t
        })
        .collect();
    (prefix, prompts)
}

/// What one timed run of the prompts saw.
struct Timed {
    /// When the requests were added.
    t: Instant,
    tokens: usize,
    /// Each request's first token.
    first: Vec<Option<Instant>>,
    /// Decode phase: from the moment every request has its first token (tokens and stats
    /// then).
    decode_start: Option<(Instant, usize, StatsSnapshot)>,
    last_token: Instant,
    /// The first request error.
    failure: Option<String>,
    busy_before: StatsSnapshot,
    stats: StatsSnapshot,
    wall: f64,
}

/// Computes (and caches) the shared prefix once, untimed: its own request.
fn prime_prefix(engine: &Engine, prefix: &[u32], params: &SamplingParams) -> Result<()> {
    let mut prime = prefix.to_vec();
    prime.push(1);
    let h = engine.add_request(
        prime,
        SamplingParams {
            max_tokens: Some(1),
            ..params.clone()
        },
    )?;
    let mut rx_h = h.rx;
    while let Some(o) = rx_h.blocking_recv() {
        if o.finish.is_some() {
            break;
        }
    }
    Ok(())
}

/// Adds every prompt and times every token as it arrives (one receiver thread per request).
fn time_requests(engine: &Engine, prompts: &[Vec<u32>], params: &SamplingParams) -> Result<Timed> {
    let busy_before = engine.stats();
    let t = Instant::now();
    let handles = prompts
        .iter()
        .map(|p| engine.add_request(p.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    // One receiver thread per request, so that every token is timed when it arrives.
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let receivers: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut rx_h = h.rx;
                while let Some(o) = rx_h.blocking_recv() {
                    if o.token.is_some() {
                        let _ = tx.send((i, Event::Token(Instant::now())));
                    }
                    if let Some(f) = o.finish {
                        let r = match f.reason {
                            tandem_sched::FinishReason::Error(e) => Err(e),
                            _ => Ok(()),
                        };
                        let _ = tx.send((i, Event::Done(r)));
                        return;
                    }
                }
                let _ = tx.send((i, Event::Done(Err("stream closed".into()))));
            })
        })
        .collect();
    drop(tx);
    let n = prompts.len();
    let mut tokens = 0usize;
    let mut first = vec![None::<Instant>; n];
    let mut with_first = 0usize;
    let mut done = 0usize;
    // Decode phase: from the moment every request has its first token.
    let mut decode_start: Option<(Instant, usize, StatsSnapshot)> = None;
    let mut last_token = t;
    let mut failure = None;
    while done < n {
        let Ok((i, ev)) = rx.recv() else { break };
        match ev {
            Event::Token(at) => {
                tokens += 1;
                last_token = last_token.max(at);
                if first[i].is_none() {
                    first[i] = Some(at);
                    with_first += 1;
                    if with_first == n {
                        decode_start = Some((at, tokens, engine.stats()));
                    }
                }
            }
            Event::Done(r) => {
                done += 1;
                if let Err(e) = r {
                    failure.get_or_insert(e);
                }
            }
        }
    }
    for r in receivers {
        let _ = r.join();
    }
    let wall = t.elapsed().as_secs_f64();
    Ok(Timed {
        t,
        tokens,
        first,
        decode_start,
        last_token,
        failure,
        busy_before,
        stats: engine.stats(),
        wall,
    })
}

/// The decode phase of a run of shape `d` (`None` when some request had no token).
fn decode_json(
    r: &Timed,
    d: &Deployment,
    cfg: &tandem_model::ModelConfig,
) -> Option<serde_json::Value> {
    let stats = &r.stats;
    let m = d.micro_batches.max(1) as f64;
    // Mean busy time of one worker per pipeline slot (layer x micro-batch of an iteration).
    let per_slot = |ws: &[serde_json::Value], role: &str, iters: f64, layers: usize| {
        let busy: Vec<f64> = ws
            .iter()
            .filter(|w| w["role"] == role)
            .filter_map(|w| w["busy_s"].as_f64())
            .collect();
        if busy.is_empty() || iters <= 0.0 {
            return serde_json::Value::Null;
        }
        let mean = busy.iter().sum::<f64>() / busy.len() as f64;
        json!(mean / (iters * layers as f64 * m) * 1e3)
    };
    // Mean over the attention replicas of a replica's `key` seconds, per iteration, in ms.
    let per_iteration = |ws: &[serde_json::Value], key: &str, iters: f64| {
        let v: Vec<f64> = ws
            .iter()
            .filter(|w| w["role"] == "attention")
            .filter_map(|w| w[key].as_f64())
            .collect();
        if v.is_empty() || iters <= 0.0 {
            return serde_json::Value::Null;
        }
        json!(v.iter().sum::<f64>() / v.len() as f64 / iters * 1e3)
    };
    let moe_layers = (0..cfg.num_layers).filter(|l| cfg.is_moe_layer(*l)).count();
    r.decode_start.as_ref().map(|(at, before_tokens, before)| {
        let secs = r.last_token.duration_since(*at).as_secs_f64();
        let toks = r.tokens - before_tokens;
        let (ws, bubble) = phase_workers(before, stats);
        let iters = stats.iterations.saturating_sub(before.iterations) as f64;
        let expert_layers = if d.expert_workers == 0 {
            cfg.num_layers
        } else {
            moe_layers
        };
        json!({
            "start_s": at.duration_since(r.t).as_secs_f64(),
            "seconds": secs,
            "output_tokens": toks,
            "output_tokens_per_s": if secs > 0.0 { toks as f64 / secs } else { 0.0 },
            "iterations": iters,
            "workers": ws,
            "bubble_fraction": bubble,
            // Busy ms per slot: attention (incl. lm_head, sampling and scheduling, spread
            // over the slots) and expert, the T_a and T_e of the ping-pong.
            "attention_busy_ms_per_slot": per_slot(&ws, "attention", iters, cfg.num_layers),
            "expert_busy_ms_per_slot": per_slot(&ws, "expert", iters, expert_layers),
            // Of the attention side's busy time: LM head and sampling per iteration (all
            // micro-batches; mean over replicas), the work at each micro-batch's
            // iteration boundary.
            "lm_head_ms_per_iteration": per_iteration(&ws, "lm_head_s", iters),
            "sample_ms_per_iteration": per_iteration(&ws, "sample_s", iters),
            // Micro-batch steps started while another was still with the experts.
            "overlapped_steps": stats.overlapped_steps.saturating_sub(before.overlapped_steps),
            // Layers run between another lane's LM head parts or sampling.
            "interleaved_layers": stats.interleaved_layers.saturating_sub(before.interleaved_layers),
        })
    })
}

/// The label of shape `d` in the log and the report.
fn shape_label(d: &Deployment) -> String {
    if d.expert_workers == 0 {
        format!("colocated x{} threads", d.threads_per_worker)
    } else {
        format!(
            "n_a={} N={} m={}",
            d.attention_replicas, d.expert_workers, d.micro_batches
        )
    }
}

/// Everything one bench engine run needs besides its shape.
struct RunInputs<'a> {
    model: &'a Arc<Model>,
    prefix: &'a [u32],
    prompts: &'a [Vec<u32>],
    params: &'a SamplingParams,
    kv_cache_bytes: usize,
    rounds: usize,
}

/// One round of one shape: starts an engine, runs the prompts, and reports the run.
fn run_shape(x: &RunInputs, d: &Deployment, round: usize) -> Result<serde_json::Value> {
    let label = shape_label(d);
    eprintln!(
        "bench engine: round {}/{}: {label} ... (load {})",
        round + 1,
        x.rounds,
        load_average()
    );
    let load_before = load_average();
    let p = x.prefix.len();
    let engine = Engine::start(
        x.model.clone(),
        None,
        EngineOptions {
            deployment: d.clone(),
            enable_prefix_caching: p > 0,
            kv_cache_bytes: x.kv_cache_bytes,
            ..EngineOptions::default()
        },
    )?;
    if p > 0 {
        prime_prefix(&engine, x.prefix, x.params)?;
    }
    let r = time_requests(&engine, x.prompts, x.params)?;
    engine.shutdown();
    if let Some(e) = &r.failure {
        anyhow::bail!("{label}: request failed: {e}");
    }
    let (stats, busy_before) = (&r.stats, &r.busy_before);
    // The timed window only (not the priming of a shared prefix).
    let (workers, bubble) = phase_workers(busy_before, stats);
    let iterations = stats.iterations.saturating_sub(busy_before.iterations);
    let mut ttft: Vec<f64> = r
        .first
        .iter()
        .flatten()
        .map(|f| f.duration_since(r.t).as_secs_f64())
        .collect();
    ttft.sort_by(|x, y| x.total_cmp(y));
    let decode = decode_json(&r, d, &x.model.cfg);
    let (tokens, wall) = (r.tokens, r.wall);
    eprintln!(
        "bench engine: {label}: {:.2} output tok/s overall, {:.2} in decode, bubble {:.2}",
        tokens as f64 / wall,
        decode
            .as_ref()
            .and_then(|d| d["output_tokens_per_s"].as_f64())
            .unwrap_or(0.0),
        bubble
    );
    Ok(json!({
        "shape": label,
        "attention_replicas": d.attention_replicas,
        "expert_workers": d.expert_workers,
        "micro_batches": d.micro_batches,
        "threads_per_worker": d.threads_per_worker,
        "threads_total": d.threads_per_worker * (d.attention_replicas + d.expert_workers),
        "pin_cores": d.pin_cores,
        "max_num_seqs": d.max_num_seqs,
        "max_num_batched_tokens": d.max_num_batched_tokens,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / wall,
        "ttft_s": {
            "min": ttft.first(),
            "median": ttft.get(ttft.len() / 2),
            "max": ttft.last(),
        },
        "iterations": iterations,
        "overlapped_steps": stats.overlapped_steps.saturating_sub(busy_before.overlapped_steps),
        "interleaved_layers": stats.interleaved_layers.saturating_sub(busy_before.interleaved_layers),
        "preemptions": stats.preemptions,
        "workers": workers,
        "bubble_fraction": bubble,
        "decode": decode,
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
        "round": round + 1,
    }))
}

/// Ratios against the first shape of the same round.
fn add_ratios(runs: &mut [serde_json::Value], n_shapes: usize) {
    let bases: Vec<(f64, f64)> = runs
        .chunks(n_shapes)
        .map(|c| {
            (
                c[0]["output_tokens_per_s"].as_f64().unwrap_or(0.0),
                c[0]["decode"]["output_tokens_per_s"]
                    .as_f64()
                    .unwrap_or(0.0),
            )
        })
        .collect();
    for (i, r) in runs.iter_mut().enumerate() {
        let (base_tps, base_decode) = bases[i / n_shapes];
        let tps = r["output_tokens_per_s"].as_f64().unwrap_or(0.0);
        r["speedup_vs_first"] = json!(if base_tps > 0.0 { tps / base_tps } else { 0.0 });
        let dtps = r["decode"]["output_tokens_per_s"].as_f64().unwrap_or(0.0);
        r["decode_speedup_vs_first"] = json!(if base_decode > 0.0 {
            dtps / base_decode
        } else {
            0.0
        });
    }
}

/// Offline throughput of the engine on the model `src` (weights of type `ty`): the shapes
/// `base` (the deployment the flags describe) gives with `a`'s sweep, one after another.
pub fn engine(
    src: &ModelSource,
    ty: LinearType,
    mut base: Deployment,
    a: &EngineArgs,
) -> Result<()> {
    let dir = src.path();
    let model = Arc::new(
        Model::load_typed(src.clone(), &ExpertSelection::All, ty)
            .with_context(|| format!("loading {}", dir.display()))?,
    );
    if let Some(v) = a.max_num_seqs {
        base.max_num_seqs = v;
    }
    if let Some(v) = a.max_num_batched_tokens {
        base.max_num_batched_tokens = v;
    }
    base.validate_shape()?;
    let defaults = EngineOptions::default();
    let kv_cache_bytes = a.kv_cache_gb.map_or(defaults.kv_cache_bytes, |g| {
        (g * (1u64 << 30) as f64) as usize
    });
    let shapes = sweep_shapes(&base, a);
    let (prefix, prompts) = bench_prompts(a, model.cfg.vocab_size);
    let p = prefix.len();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(a.output_len),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    if a.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    let inputs = RunInputs {
        model: &model,
        prefix: &prefix,
        prompts: &prompts,
        params: &params,
        kv_cache_bytes,
        rounds: a.rounds,
    };
    let n_shapes = shapes.len();
    let mut runs = Vec::new();
    for (round, d) in (0..a.rounds).flat_map(|r| shapes.iter().cloned().map(move |d| (r, d))) {
        runs.push(run_shape(&inputs, &d, round)?);
    }
    add_ratios(&mut runs, n_shapes);
    let summary = summarize_rounds(&runs, n_shapes);
    for r in &summary {
        eprintln!(
            "bench engine: {}: median decode {:.2} tok/s over {} round(s), {:.2}x the first shape",
            r["shape"].as_str().unwrap_or(""),
            r["decode_tokens_per_s"]["median"].as_f64().unwrap_or(0.0),
            a.rounds,
            r["decode_speedup_vs_first"]["median"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    let out = json!({
        "bench": "engine",
        "model": dir.display().to_string(),
        "requests": a.requests,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "settings": {
            "kv_cache_bytes_per_replica": kv_cache_bytes,
            "max_num_seqs": base.max_num_seqs,
            "max_num_batched_tokens": base.max_num_batched_tokens,
            "kv_block_size": base.kv_block_size,
            "shared_prefix_len": p,
            "prefix_caching": p > 0,
            "sampling": "greedy, EOS ignored",
        },
        "rounds": a.rounds,
        "runs": runs,
        "summary": summary,
        "machine": machine_info(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

#[cfg(test)]
mod rounds_tests {
    use super::{spread, summarize_rounds};
    use serde_json::json;

    #[test]
    fn spread_takes_the_middle() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0])["median"], json!(2.0));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0])["median"], json!(2.5));
        assert_eq!(spread(vec![4.0, 1.0])["min"], json!(1.0));
        assert_eq!(spread(vec![])["median"], json!(0.0));
    }

    #[test]
    fn rounds_are_grouped_per_shape() {
        // Two rounds of two shapes, round-major.
        let run = |shape: &str, tps: f64, ratio: f64| {
            json!({"shape": shape, "output_tokens_per_s": tps, "speedup_vs_first": ratio,
                   "decode_speedup_vs_first": ratio,
                   "decode": {"output_tokens_per_s": tps, "bubble_fraction": 0.1}})
        };
        let runs = vec![
            run("a", 10.0, 1.0),
            run("b", 15.0, 1.5),
            run("a", 20.0, 1.0),
            run("b", 26.0, 1.3),
        ];
        let s = summarize_rounds(&runs, 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1]["shape"], json!("b"));
        assert_eq!(s[1]["decode_tokens_per_s"]["values"], json!([15.0, 26.0]));
        assert_eq!(s[1]["decode_speedup_vs_first"]["median"], json!(1.4));
        assert_eq!(s[0]["output_tokens_per_s"]["max"], json!(20.0));
    }
}
