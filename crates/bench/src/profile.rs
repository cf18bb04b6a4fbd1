//! `tandem profile`: measures the real engine's stages on this machine and writes the
//! hardware profile `tandem plan` / `tandem simulate` / `tandem plan engine` read
//! (`tandem_plan::Profile`). With `--calibrate` it then predicts and measures the decode
//! throughput of three engine shapes and prints both.
//!
//! What is timed, each on a rayon pool of `tp` threads pinned to cores `0..tp` (the engine
//! pins one worker per core; a pool's threads split every GEMM as tensor parallelism would):
//! - attention: `AttentionStage::forward` of one layer for `b` decoding sequences whose KV
//!   cache holds `c` tokens, over the batch x context grid;
//! - head: once per step and micro-batch, embedding + final norm + LM head + greedy sampling;
//! - experts: `routed_ffn` of one layer with `t` tokens on each of `h` experts, over tokens
//!   per expert and experts hit (separates the per-token, per-expert and per-call costs);
//! - transport: the in-process M2N round trip (what the engine uses) and a loopback TCP echo
//!   of a length-prefixed message (std::net), over message sizes.
//!
//! Caches are flushed (a 64 MiB read) before every timed call, as in the engine, where a
//! layer's weights and KV have left the cache by the time the layer comes round again. The
//! fits use the fastest of the repetitions: on a shared machine other processes only ever add
//! time, so the minimum is the best estimate of the stage's own cost (the median and the
//! spread are printed and kept in the JSON). The least-squares fits are the profile format's
//! own (`tandem_plan::profile::least_squares`, `NetworkFit::from_points`).

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_model::layers::from_vec;
use tandem_model::stages::routed_ffn;
use tandem_model::{Assignment, BatchLayout, Model, ModelSource, SeqSlot};
use tandem_plan::engine_model::{predict_decode, EngineShape};
use tandem_plan::profile::{
    least_squares, max_rel_residual, AttentionFit, ExpertFit, HeadFit, NetworkFit, Networks,
    Profile, ProfileHeader,
};
use tandem_plan::ModelShape;

use crate::sysinfo::{load_average, unix_secs, utc_date};

/// The flags of `tandem profile` besides the model.
#[derive(Args)]
pub struct ProfileArgs {
    /// Where to write the profile (TOML).
    #[arg(long, default_value = "profile.toml")]
    pub out: PathBuf,
    /// Decoding sequences per attention measurement.
    /// (Default: the small-batch kernel's range; past 24 rows the CPU kernels switch to a
    /// GEMM and one line cannot fit both sides.)
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub batches: Vec<u32>,
    /// Cached tokens per sequence per attention measurement.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    pub contexts: Vec<u32>,
    /// Tokens per expert per expert measurement.
    /// (Default: the decode range; the cost per expert is concave in tokens, so fit the range
    /// the deployment will see.)
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub expert_tokens: Vec<u32>,
    /// Pool sizes to measure, each written as a `tp` entry (default: 1 and all cores).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<u32>,
    /// Timed repetitions per point (the fastest is fitted).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// A smaller grid and fewer repetitions (a rough profile in seconds).
    #[arg(long)]
    pub quick: bool,
    /// Then predict and measure three engine shapes (colocated on all cores; 1 replica + 1
    /// expert worker pinned, m = 1 and m = 2) and print predicted vs measured.
    #[arg(long)]
    pub calibrate: bool,
    /// With --calibrate: use this profile instead of measuring one.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Calibration: decoding sequences.
    #[arg(long, default_value_t = 16)]
    pub calib_batch: u32,
    /// Calibration: prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub calib_input_len: u32,
    /// Calibration: generated tokens per sequence.
    #[arg(long, default_value_t = 48)]
    pub calib_output_len: u32,
    /// Calibration: runs per shape (the spread is reported).
    #[arg(long, default_value_t = 2)]
    pub calib_runs: usize,
}

/// Profiles the model `src` (and with `--calibrate` checks the profile against the engine).
pub fn run(src: &ModelSource, a: &ProfileArgs) -> Result<()> {
    let dir = src.path();
    let model =
        Arc::new(Model::load(src.clone()).with_context(|| format!("loading {}", dir.display()))?);
    let shape = ModelShape::from_path(dir)
        .with_context(|| format!("reading {} as a planner model shape", dir.display()))?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (profile, summary) = match &a.profile {
        Some(p) if a.calibrate => (
            Profile::load(p).with_context(|| format!("loading profile {}", p.display()))?,
            json!({"profile": p.display().to_string(), "measured": false}),
        ),
        _ => {
            let (p, s) = measure(a, &model, &shape, dir, cores)?;
            let text = format!(
                "# Measured by `tandem profile` on this machine ({}). tp = threads per worker.\n{}",
                p.profile.machine,
                p.to_toml_string()?
            );
            std::fs::write(&a.out, &text)
                .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!("profile: wrote {}", a.out.display());
            // The cached copy is what `serve` and `generate` choose their default shape from.
            let cached = tandem_plan::default_shape::profile_cache_path(
                &tandem_model::demo::cache_root(),
                dir,
            );
            let wrote = cached
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&cached, &text));
            match wrote {
                Ok(()) => eprintln!(
                    "profile: cached as {} (serve and generate pick their default shape from it)",
                    cached.display()
                ),
                Err(e) => eprintln!("profile: could not cache it as {}: {e}", cached.display()),
            }
            (p, s)
        }
    };
    let mut out = summary;
    if a.calibrate {
        out["calibration"] = calibrate(a, &model, &shape, &profile, cores)?;
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Measurement helpers.

/// A rayon pool of `threads` threads pinned to cores `0..threads`.
fn pinned_pool(threads: usize) -> Result<rayon::ThreadPool> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("profile-{i}"))
        .start_handler(move |i| {
            if let Some(c) = cores.get(i % cores.len().max(1)) {
                core_affinity::set_for_current(*c);
            }
        })
        .build()?)
}

/// Evicts the caches: reads a buffer twice the L3 size of most servers.
struct Flusher {
    buf: Vec<f32>,
}

impl Flusher {
    fn new() -> Self {
        Self {
            buf: vec![1.0; 16 << 20],
        }
    }
    fn flush(&self) {
        std::hint::black_box(tandem_kernels::simd::sum(&self.buf));
    }
}

/// Median, min and max of `reps` timed calls of `f` after one untimed call, each preceded by
/// a cache flush.
fn time_it(reps: usize, flusher: &Flusher, mut f: impl FnMut() -> Result<()>) -> Result<Stat> {
    flusher.flush();
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        flusher.flush();
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(Stat::of(v))
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
    fn spread(&self) -> f64 {
        (self.max - self.min) / self.median
    }
}

/// Deterministic pseudo-random activations in [-1, 1).
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The measurements.

fn measure(
    a: &ProfileArgs,
    model: &Arc<Model>,
    shape: &ModelShape,
    dir: &Path,
    cores: usize,
) -> Result<(Profile, serde_json::Value)> {
    let mut batches = a.batches.clone();
    let mut contexts = a.contexts.clone();
    let mut tokens = a.expert_tokens.clone();
    let mut reps = a.reps;
    if a.quick {
        batches = vec![1, 4, 16];
        contexts = vec![128, 1024];
        tokens = vec![1, 4, 16];
        reps = reps.min(3);
    }
    let mut threads: Vec<u32> = if a.threads.is_empty() {
        let mut t = vec![1];
        if cores > 1 {
            t.push(cores as u32);
        }
        t
    } else {
        a.threads.clone()
    };
    threads.sort_unstable();
    threads.dedup();
    if threads.contains(&0) || batches.contains(&0) || tokens.contains(&0) {
        bail!("--threads, --batches and --expert-tokens must be positive");
    }
    if batches.len() < 2 || tokens.len() < 2 {
        bail!("need at least two batch sizes and two token counts to fit lines");
    }
    let flusher = Flusher::new();
    let load_before = load_average();
    let t0 = Instant::now();
    let mut attention = Vec::new();
    let mut head = Vec::new();
    let mut expert = Vec::new();
    let mut points = serde_json::Map::new();
    for &tp in &threads {
        let pool = pinned_pool(tp as usize)?;
        let (att, hd, ex, pts) = pool.install(|| -> Result<_> {
            let (att, p_att) = measure_attention(model, tp, &batches, &contexts, reps, &flusher)?;
            let (hd, p_head) = measure_head(model, tp, &batches, reps, &flusher)?;
            let (ex, p_exp) = measure_experts(model, tp, &tokens, reps, &flusher)?;
            Ok((
                att,
                hd,
                ex,
                json!({"attention": p_att, "head": p_head, "experts": p_exp}),
            ))
        })?;
        attention.extend(att);
        head.push(hd);
        expert.push(ex);
        points.insert(format!("tp{tp}"), pts);
    }
    let sizes: Vec<usize> = if a.quick {
        vec![4096, 65536, 1 << 20]
    } else {
        vec![1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20]
    };
    // On threads of their own: they pin themselves, and threads spawned later (the engine's,
    // in --calibrate) inherit the affinity of the thread that spawns them.
    let hidden = model.cfg.hidden_size;
    let n = reps.max(20) * 4;
    let inproc = std::thread::scope(|s| s.spawn(|| measure_in_process(hidden, &sizes, n)).join())
        .map_err(|_| anyhow::anyhow!("in-process link measurement panicked"))??;
    eprintln!(
        "profile: in-process M2N one-way {}",
        inproc
            .iter()
            .map(|(s, t)| format!("{}B {:.1}us", s, t * 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let tcp = if cores > 1 {
        let t = std::thread::scope(|s| s.spawn(|| measure_tcp(&sizes, n)).join())
            .map_err(|_| anyhow::anyhow!("TCP measurement panicked"))??;
        eprintln!(
            "profile: loopback TCP one-way {}",
            t.iter()
                .map(|(s, t)| format!("{}B {:.1}us", s, t * 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Some(t)
    } else {
        None
    };
    let machine = crate::sysinfo::machine_line(cores);
    let settings = format!(
        "threads {:?}, batches {:?}, contexts {:?}, expert tokens {:?}, {} reps (fastest fitted), caches flushed, load average {} before / {} after, {:.0} s",
        threads,
        batches,
        contexts,
        tokens,
        reps,
        load_before,
        load_average(),
        t0.elapsed().as_secs_f64()
    );
    let profile = Profile {
        profile: ProfileHeader {
            format: 1,
            model: dir.display().to_string(),
            attention_hw: "cpu".into(),
            expert_hw: "cpu".into(),
            source: format!("tandem profile, {}", utc_date(unix_secs())),
            moe_layers: shape.moe_layers() as u32,
            machine,
            settings,
        },
        attention,
        head,
        expert,
        network: Networks {
            attention: NetworkFit::from_points(&inproc),
            expert: NetworkFit::from_points(&inproc),
            loopback_tcp: tcp.as_deref().map(NetworkFit::from_points),
        },
    };
    let summary = json!({
        "out": a.out.display().to_string(),
        "measured": true,
        "model": dir.display().to_string(),
        "machine": profile.profile.machine,
        "settings": profile.profile.settings,
        "attention": profile.attention.iter().map(|f| json!({
            "tp": f.tp, "context_tokens": f.context_tokens,
            "k1_us": f.k1_s * 1e6, "k2_us": f.k2_s * 1e6, "k_ctx_ns": f.k_ctx_s * 1e9,
        })).collect::<Vec<_>>(),
        "head": profile.head.iter().map(|f| json!({
            "tp": f.tp, "k1_us": f.k1_s * 1e6, "k2_us": f.k2_s * 1e6,
        })).collect::<Vec<_>>(),
        "expert": profile.expert.iter().map(|f| json!({
            "tp": f.tp, "k3_us": f.k3_s * 1e6, "k4_us": f.k4_s * 1e6,
            "worker_overhead_us": f.worker_overhead_s * 1e6,
        })).collect::<Vec<_>>(),
        "in_process_one_way_us": inproc.iter().map(|(s, t)| json!([s, t * 1e6])).collect::<Vec<_>>(),
        "loopback_tcp_one_way_us": tcp.as_ref().map(|v| v.iter().map(|(s, t)| json!([s, t * 1e6])).collect::<Vec<_>>()),
        "points": points,
    });
    Ok((profile, summary))
}

/// Attention of one layer over the batch x context grid; per context a line in `b`, and one
/// per-(sequence, cached token) slope over the whole grid.
fn measure_attention(
    model: &Model,
    tp: u32,
    batches: &[u32],
    contexts: &[u32],
    reps: usize,
    flusher: &Flusher,
) -> Result<(Vec<AttentionFit>, serde_json::Value)> {
    let cfg = &model.cfg;
    let layer = (0..cfg.num_layers)
        .find(|l| cfg.is_moe_layer(*l))
        .unwrap_or(0);
    let stage = &model.layers[layer].attention;
    let d = cfg.hidden_size;
    let bs = 16usize;
    // keys and values per slot (MLA: the latent + rotary key, no separate values)
    let (kw, vw) = cfg.kv_cache_widths();
    let b_max = *batches.iter().max().unwrap_or(&1) as usize;
    let mut all_x = Vec::new();
    let mut all_y = Vec::new();
    let mut per_ctx = Vec::new();
    let mut pts = Vec::new();
    for &c in contexts {
        let c = c as usize;
        let per_seq = (c + 1).div_ceil(bs);
        let slots = b_max * per_seq * bs;
        // Non-zero so that every page is touched before timing.
        let mut kv = tandem_model::kv::LayerKv {
            k: std::iter::repeat_n(1e-3, slots * kw).collect(),
            v: std::iter::repeat_n(-1e-3, slots * vw).collect(),
        };
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for &b in batches {
            let b = b as usize;
            let layout = BatchLayout {
                seqs: (0..b)
                    .map(|i| SeqSlot {
                        start_pos: c,
                        num_tokens: 1,
                        block_table: ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect(),
                    })
                    .collect(),
            };
            let h = from_vec(activations(b * d, b as u64), b, d)?;
            let st = time_it(reps, flusher, || {
                stage.forward(&h, &layout, &mut kv, bs)?;
                Ok(())
            })?;
            eprintln!(
                "profile: tp{tp} attention b={b:>3} context={c:>5}: {:8.1} us (median {:.1}, spread {:.0}%)",
                st.min * 1e6,
                st.median * 1e6,
                st.spread() * 100.0
            );
            pts.push(json!({"b": b, "context": c, "us": st.min * 1e6, "median_us": st.median * 1e6, "spread": st.spread()}));
            xs.push(vec![1.0, b as f64]);
            ys.push(st.min);
            all_x.push(vec![1.0, b as f64, (b * c) as f64]);
            all_y.push(st.min);
        }
        let beta = least_squares(&xs, &ys)?;
        eprintln!(
            "profile: tp{tp} attention context {c}: T_a = {:.2} us/seq * b + {:.1} us (worst residual {:.1}%)",
            beta[1] * 1e6,
            beta[0] * 1e6,
            max_rel_residual(&xs, &ys, &beta) * 100.0
        );
        per_ctx.push((c, beta[1], beta[0]));
    }
    let k_ctx = if contexts.len() > 1 {
        let beta = least_squares(&all_x, &all_y)?;
        eprintln!(
            "profile: tp{tp} attention over the grid: {:.2} ns per (sequence, cached token) (worst residual {:.1}%)",
            beta[2] * 1e9,
            max_rel_residual(&all_x, &all_y, &beta) * 100.0
        );
        beta[2].max(0.0)
    } else {
        0.0
    };
    let fits = per_ctx
        .into_iter()
        .map(|(c, k1, k2)| AttentionFit {
            tp,
            context_tokens: c as f64,
            k1_s: k1.max(0.0),
            k2_s: k2.max(0.0),
            k_ctx_s: k_ctx,
        })
        .collect();
    Ok((fits, json!(pts)))
}

/// Embedding + final norm + LM head + greedy sampling of `b` sequences.
fn measure_head(
    model: &Model,
    tp: u32,
    batches: &[u32],
    reps: usize,
    flusher: &Flusher,
) -> Result<(HeadFit, serde_json::Value)> {
    use tandem_sched::{RequestRng, Sampler, SamplingParams};
    let v = model.cfg.vocab_size;
    let sampler = Sampler::new(model.cfg.eos_token_ids.clone());
    let params = SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut pts = Vec::new();
    for &b in batches {
        let b = b as usize;
        let toks: Vec<u32> = (0..b).map(|i| ((i * 7919 + 13) % v) as u32).collect();
        let rows: Vec<usize> = (0..b).collect();
        let st = time_it(reps, flusher, || {
            let h = model.embed(&toks)?;
            let logits = model.logits(&h, &rows)?;
            let mut rng = RequestRng::new(1);
            for r in 0..b {
                let mut l = logits[r * v..(r + 1) * v].to_vec();
                sampler.sample(&mut l, &params, &[], &[], &mut rng)?;
            }
            Ok(())
        })?;
        eprintln!(
            "profile: tp{tp} head b={b:>3}: {:8.1} us (median {:.1}, spread {:.0}%)",
            st.min * 1e6,
            st.median * 1e6,
            st.spread() * 100.0
        );
        pts.push(json!({"b": b, "us": st.min * 1e6, "median_us": st.median * 1e6, "spread": st.spread()}));
        xs.push(vec![1.0, b as f64]);
        ys.push(st.min);
    }
    let beta = least_squares(&xs, &ys)?;
    eprintln!(
        "profile: tp{tp} head: {:.2} us/seq * b + {:.1} us (worst residual {:.1}%)",
        beta[1] * 1e6,
        beta[0] * 1e6,
        max_rel_residual(&xs, &ys, &beta) * 100.0
    );
    Ok((
        HeadFit {
            tp,
            k1_s: beta[1].max(0.0),
            k2_s: beta[0].max(0.0),
        },
        json!(pts),
    ))
}

/// `routed_ffn` of one layer with `t` tokens on each of `h` experts; fits
/// `T = overhead + k4 h + k3 t h`. The layer rotates between calls so that weights are cold.
fn measure_experts(
    model: &Model,
    tp: u32,
    tokens: &[u32],
    reps: usize,
    flusher: &Flusher,
) -> Result<(ExpertFit, serde_json::Value)> {
    let cfg = &model.cfg;
    let d = cfg.hidden_size;
    let e = cfg.num_experts;
    let moe: Vec<usize> = (0..cfg.num_layers)
        .filter(|l| cfg.is_moe_layer(*l))
        .collect();
    if moe.is_empty() || e == 0 {
        bail!("the model has no MoE layer to profile");
    }
    let mut hits = vec![1, e.div_ceil(2), e];
    hits.dedup();
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut pts = Vec::new();
    let mut call = 0usize;
    for &h in &hits {
        for &t in tokens {
            let t = t as usize;
            let n = t * h;
            let x = activations(n * d, (t * 31 + h) as u64);
            let asg: Vec<Assignment> = (0..n)
                .map(|r| Assignment {
                    row: r as u32,
                    expert: (r / t) as u32,
                    weight: 0.5,
                })
                .collect();
            let st = time_it(reps, flusher, || {
                let layer = &model.layers[moe[call % moe.len()]];
                call += 1;
                routed_ffn(&x, n, d, &asg, |ex| {
                    layer
                        .experts
                        .routed
                        .get(ex as usize)
                        .and_then(|m| m.as_deref())
                })?;
                Ok(())
            })?;
            eprintln!(
                "profile: tp{tp} experts hit={h} tokens/expert={t:>3}: {:8.1} us (median {:.1}, spread {:.0}%)",
                st.min * 1e6,
                st.median * 1e6,
                st.spread() * 100.0
            );
            pts.push(json!({"experts": h, "tokens_per_expert": t, "us": st.min * 1e6, "median_us": st.median * 1e6, "spread": st.spread()}));
            xs.push(vec![1.0, h as f64, (t * h) as f64]);
            ys.push(st.min);
        }
    }
    let beta = least_squares(&xs, &ys)?;
    eprintln!(
        "profile: tp{tp} experts: {:.2} us/token + {:.1} us/expert + {:.1} us/call (worst residual {:.1}%)",
        beta[2] * 1e6,
        beta[1] * 1e6,
        beta[0] * 1e6,
        max_rel_residual(&xs, &ys, &beta) * 100.0
    );
    Ok((
        ExpertFit {
            tp,
            k3_s: beta[2].max(0.0),
            k4_s: beta[1].max(0.0),
            worker_overhead_s: beta[0].max(0.0),
        },
        json!(pts),
    ))
}

/// Pins the current thread to core `i` (if it exists).
fn pin(i: usize) {
    if let Some(c) = core_affinity::get_core_ids().and_then(|v| v.get(i).copied()) {
        core_affinity::set_for_current(c);
    }
}

/// One-way time (half the round trip, fastest) of the engine's in-process M2N link: a
/// dispatch of `[n, hidden]` to a worker thread on core 1 that sends it back as a combine.
fn measure_in_process(hidden: usize, sizes: &[usize], reps: usize) -> Result<Vec<(usize, f64)>> {
    use tandem_core::{Members, Slot};
    use tandem_engine::transport::{
        in_process, CombineMsg, DispatchMsg, SlotHeader, ToReplica, ToWorker,
    };
    let (mut reps_l, mut exps_l) = in_process(1, 1);
    let (Some(rl), Some(el)) = (reps_l.pop(), exps_l.pop()) else {
        bail!("in_process(1, 1) gave no links");
    };
    let echo = std::thread::spawn(move || {
        pin(1);
        while let Ok(Some(msg)) = el.recv() {
            if let ToWorker::Dispatch(d) = msg {
                let back = ToReplica::Combine(CombineMsg {
                    header: d.header,
                    y: d.x,
                    next_members: None,
                });
                if el.send(0, back).is_err() {
                    break;
                }
            }
        }
    });
    pin(0);
    let mut out: Vec<(usize, f64)> = Vec::new();
    let mut it = 0u64;
    for &bytes in sizes {
        let rows = (bytes / (hidden * 4)).max(1);
        if out.last().is_some_and(|(s, _)| *s >= rows * hidden * 4) {
            continue;
        }
        let mut v = Vec::with_capacity(reps);
        for r in 0..reps + 5 {
            let x = from_vec(activations(rows * hidden, it), rows, hidden)?;
            let header = SlotHeader {
                epoch: 0,
                slot: Slot::new(it, 0, 0),
                sender: 0,
            };
            it += 1;
            let t = Instant::now();
            rl.dispatch(
                0,
                DispatchMsg {
                    header,
                    members: Members::one(0),
                    more: false,
                    x,
                    assignments: Vec::new(),
                },
            )?;
            let back = rl.recv(Duration::from_secs(10))?;
            let dt = t.elapsed().as_secs_f64();
            // Freeing the tensor is the receiver's work, not the link's.
            if !matches!(back, ToReplica::Combine(_)) {
                bail!("in-process echo: unexpected message");
            }
            drop(back);
            if r >= 5 {
                v.push(dt / 2.0);
            }
        }
        out.push((rows * hidden * 4, Stat::of(v).min));
    }
    drop(rl);
    let _ = echo.join();
    Ok(out)
}

/// One-way time (half the round trip, fastest) of a length-prefixed message echoed over a
/// loopback TCP connection (Nagle off), client on core 0, echo on core 1.
fn measure_tcp(sizes: &[usize], reps: usize) -> Result<Vec<(usize, f64)>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        pin(1);
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).is_err() {
                return Ok(());
            }
            let n = u64::from_le_bytes(len) as usize;
            buf.resize(n, 0);
            s.read_exact(&mut buf)?;
            s.write_all(&len)?;
            s.write_all(&buf)?;
        }
    });
    pin(0);
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut out = Vec::new();
    let mut back = Vec::new();
    for &bytes in sizes {
        let msg: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
        back.resize(bytes, 0);
        let mut v = Vec::with_capacity(reps);
        for r in 0..reps + 5 {
            let t = Instant::now();
            s.write_all(&(bytes as u64).to_le_bytes())?;
            s.write_all(&msg)?;
            let mut len = [0u8; 8];
            s.read_exact(&mut len)?;
            s.read_exact(&mut back)?;
            if r >= 5 {
                v.push(t.elapsed().as_secs_f64() / 2.0);
            }
        }
        if back != msg {
            bail!("loopback TCP echo corrupted a {bytes}-byte message");
        }
        out.push((bytes, Stat::of(v).min));
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("TCP echo thread panicked"))??;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Calibration: predicted vs measured decode throughput of the engine.

/// Decode throughput of one engine run, measured over the window where every sequence is
/// decoding: from the last first token (every prompt prefilled) to the first last token.
fn measure_engine(
    model: &Arc<Model>,
    d: &tandem_core::Deployment,
    batch: u32,
    input_len: u32,
    output_len: u32,
) -> Result<serde_json::Value> {
    use tandem_engine::{Engine, EngineOptions};
    use tandem_sched::SamplingParams;
    let v = model.cfg.vocab_size;
    let engine = Engine::start(
        model.clone(),
        None,
        EngineOptions {
            deployment: d.clone(),
            enable_prefix_caching: false,
            ..EngineOptions::default()
        },
    )?;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(output_len as usize),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let t0 = Instant::now();
    let mut waiters = Vec::new();
    for i in 0..batch as usize {
        let prompt: Vec<u32> = (0..input_len as usize)
            .map(|j| ((i * 7919 + j * 104729 + 13) % v) as u32)
            .collect();
        let h = engine.add_request(prompt, params.clone())?;
        let mut rx = h.rx;
        // One thread per stream, blocked until each token: timestamps without polling.
        waiters.push(std::thread::spawn(move || -> Result<Vec<f64>, String> {
            let mut times = Vec::new();
            while let Some(o) = rx.blocking_recv() {
                if o.token.is_some() {
                    times.push(t0.elapsed().as_secs_f64());
                }
                if let Some(f) = o.finish {
                    if let tandem_sched::FinishReason::Error(e) = f.reason {
                        return Err(e);
                    }
                    break;
                }
            }
            Ok(times)
        }));
    }
    let mut streams = Vec::new();
    for w in waiters {
        streams.push(
            w.join()
                .map_err(|_| anyhow::anyhow!("a stream thread panicked"))?
                .map_err(|e| anyhow::anyhow!("request failed: {e}"))?,
        );
    }
    let wall = t0.elapsed().as_secs_f64();
    engine.shutdown();
    let first = streams
        .iter()
        .filter_map(|s| s.first().copied())
        .fold(0.0, f64::max);
    let last = streams
        .iter()
        .filter_map(|s| s.last().copied())
        .fold(f64::INFINITY, f64::min);
    let in_window: usize = streams
        .iter()
        .map(|s| s.iter().filter(|t| **t > first && **t <= last).count())
        .sum();
    if in_window == 0 || last <= first {
        bail!("no decode window: the requests did not decode together (batch too large for one prefill?)");
    }
    let total: usize = streams.iter().map(|s| s.len()).sum();
    Ok(json!({
        "decode_tokens_per_s": in_window as f64 / (last - first),
        "decode_window_s": last - first,
        "decode_window_tokens": in_window,
        "end_to_end_tokens_per_s": total as f64 / wall,
        "wall_s": wall,
    }))
}

fn calibrate(
    a: &ProfileArgs,
    model: &Arc<Model>,
    shape: &ModelShape,
    profile: &Profile,
    cores: usize,
) -> Result<serde_json::Value> {
    let base = tandem_core::Deployment {
        pin_cores: true,
        max_num_seqs: a.calib_batch.max(1),
        max_num_batched_tokens: (a.calib_batch * a.calib_input_len).max(2048),
        ..tandem_core::Deployment::default()
    };
    let coloc = tandem_core::Deployment {
        attention_replicas: 1,
        expert_workers: 0,
        micro_batches: 1,
        threads_per_worker: cores as u32,
        ..base.clone()
    };
    let disagg = |m: u32| tandem_core::Deployment {
        attention_replicas: 1,
        expert_workers: 1,
        micro_batches: m,
        threads_per_worker: 1,
        ..base.clone()
    };
    let shapes = [
        (format!("colocated, 1 replica x {cores} threads"), coloc),
        (
            "1 attention + 1 expert worker, m=1, pinned".into(),
            disagg(1),
        ),
        (
            "1 attention + 1 expert worker, m=2, pinned".into(),
            disagg(2),
        ),
    ];
    // Tokens of context over the decode window: the prompt plus half the generated tokens.
    let context = a.calib_input_len as f64 + a.calib_output_len as f64 / 2.0;
    let mut rows = Vec::new();
    eprintln!(
        "calibrate: batch {}, prompt {}, output {} (mean context {context:.0}), {} runs per shape, load {}",
        a.calib_batch,
        a.calib_input_len,
        a.calib_output_len,
        a.calib_runs,
        load_average()
    );
    for (label, d) in shapes {
        let es = EngineShape {
            attention_replicas: d.attention_replicas,
            expert_workers: d.expert_workers,
            micro_batches: d.micro_batches,
            threads_per_worker: d.threads_per_worker,
            batch: a.calib_batch,
            context_tokens: context,
        };
        let p = predict_decode(profile, shape, &es).with_context(|| {
            format!(
                "predicting {label} (does the profile have tp={}?)",
                es.threads_per_worker
            )
        })?;
        let mut runs = Vec::new();
        for _ in 0..a.calib_runs.max(1) {
            runs.push(measure_engine(
                model,
                &d,
                a.calib_batch,
                a.calib_input_len,
                a.calib_output_len,
            )?);
        }
        let tps: Vec<f64> = runs
            .iter()
            .filter_map(|r| r["decode_tokens_per_s"].as_f64())
            .collect();
        let mean = tps.iter().sum::<f64>() / tps.len() as f64;
        let lo = tps.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = tps.iter().cloned().fold(0.0, f64::max);
        // The profile fits the fastest repetition, so the fastest run is the like-for-like
        // measurement; the mean and the spread say how much the machine's load moved it.
        let err = (p.tokens_per_s - hi) / hi;
        let err_mean = (p.tokens_per_s - mean) / mean;
        let load = load_average();
        eprintln!(
            "calibrate: {label}: predicted {:.1} tok/s, measured best {:.1} tok/s (mean {:.1}, runs {:.1}..{:.1}), error {:+.1}% (vs mean {:+.1}%), load {load}",
            p.tokens_per_s,
            hi,
            mean,
            lo,
            hi,
            err * 100.0,
            err_mean * 100.0
        );
        rows.push(json!({
            "shape": label,
            "predicted_tokens_per_s": p.tokens_per_s,
            "measured_best_tokens_per_s": hi,
            "measured_mean_tokens_per_s": mean,
            "measured_min_tokens_per_s": lo,
            "error_vs_best": err,
            "error_vs_mean": err_mean,
            "load_average": load,
            "prediction": p,
            "runs": runs,
        }));
    }
    Ok(json!({
        "batch": a.calib_batch,
        "input_len": a.calib_input_len,
        "output_len": a.calib_output_len,
        "mean_context": context,
        "load_average_after": load_average(),
        "shapes": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_sane() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((s.spread() - 1.0).abs() < 1e-12);
    }
}
