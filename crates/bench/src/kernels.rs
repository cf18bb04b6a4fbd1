//! `tandem bench kernels`: the two hot CPU kernels of decode, measured alone on a rayon pool of
//! `--threads` threads: the matmul of every linear layer (`packed::PackedWeights::matmul`, in
//! each of `--weight-types`, against candle on the same shapes: its GEMM on the f32 weight for
//! f32/bf16, its quantized matmul `QMatMul` in the same format for q8_0/q4_0) for the demo
//! model's expert matrices, and paged attention decode
//! (`kv::paged_attention`) for its attention shape; plus the memory read bandwidth they are
//! bounded by. One JSON object on stdout, a progress line per measurement on stderr.

use anyhow::{ensure, Result};
use clap::Args;
use serde_json::json;
use std::time::Instant;
use tandem_model::demo::DemoSpec;
use tandem_model::kv::{paged_attention, AttnDims, LayerKv};
use tandem_model::layers::Linear;
use tandem_model::{BatchLayout, SeqSlot, WeightType};

/// Distinct weight matrices per shape, cycled through so the weights come from memory rather
/// than cache (like the 8 experts of one layer of the demo model).
const MATRICES: usize = 8;
/// KV block size of the attention measurement (the engine's default).
const BLOCK_SIZE: usize = 16;

#[derive(Args)]
pub struct KernelsArgs {
    /// Threads of the rayon pool every kernel runs on.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Pin the pool's threads to cores CORE, CORE+1, ... (default: not pinned).
    #[arg(long)]
    pub core: Option<usize>,
    /// Token rows of the matmul measurements.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4, 8, 16, 24, 32, 64, 128])]
    pub rows: Vec<usize>,
    /// Timed passes per measurement; the best one is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Positions every sequence attends over in the attention measurement.
    #[arg(long, default_value_t = 1040)]
    pub context: usize,
    /// Sequences per attention call.
    #[arg(long, value_delimiter = ',', default_values_t = [8usize, 16, 32])]
    pub batches: Vec<usize>,
    /// Buffer of the memory read bandwidth measurement, MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: usize,
    /// Override the demo model's hidden size (matmul shapes, head_dim = hidden / heads);
    /// for quick runs.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override the demo model's expert FFN size (matmul shapes); for quick runs.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Weight types of the matmul measurements (f32, bf16, q8_0, q4_0).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string()])]
    pub weight_types: Vec<String>,
}

pub fn run(a: KernelsArgs) -> Result<()> {
    let spec = DemoSpec::DEFAULT;
    let hidden = a.hidden.unwrap_or(spec.hidden);
    let ffn = a.ffn.unwrap_or(spec.ffn);
    ensure!(a.threads >= 1, "--threads must be at least 1");
    ensure!(a.repeat >= 1, "--repeat must be at least 1");
    ensure!(a.mem_mib >= 1, "--mem-mib must be at least 1");
    ensure!(
        hidden >= 1 && ffn >= 1,
        "--hidden and --ffn must be positive"
    );
    ensure!(
        !a.rows.is_empty() && a.rows.iter().all(|&r| r >= 1),
        "--rows must be positive"
    );
    ensure!(
        !a.batches.is_empty() && a.batches.iter().all(|&b| b >= 1),
        "--batches must be positive"
    );
    ensure!(a.context >= 1, "--context must be at least 1");
    let types = a
        .weight_types
        .iter()
        .map(|t| {
            WeightType::parse(t)
                .ok_or_else(|| anyhow::anyhow!("unknown weight type {t:?} (f32, bf16, q8_0, q4_0)"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        hidden.is_multiple_of(spec.heads),
        "--hidden must be a multiple of the {} attention heads",
        spec.heads
    );
    let dims = AttnDims {
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: hidden / spec.heads,
    };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    if let Some(c) = a.core {
        ensure!(
            c + a.threads <= cores.len(),
            "--core {c} with {} thread(s) needs cores {c}..{}, this machine has {}",
            a.threads,
            c + a.threads,
            cores.len()
        );
    }
    let pin = a.core;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .thread_name(|i| format!("bench-kernels-{i}"))
        .start_handler(move |i| {
            if let Some(c) = pin.and_then(|c| cores.get(c + i)) {
                core_affinity::set_for_current(*c);
            }
        })
        .build()?;
    let load_before = crate::sysinfo::load_average();
    let (mem, matmul, attention) = pool.install(|| -> Result<_> {
        let mem = crate::sysinfo::read_bandwidth(a.mem_mib << 20, 3);
        eprintln!(
            "bench kernels: memory read {:.2} GB/s ({} MiB)",
            mem / 1e9,
            a.mem_mib
        );
        let mut matmul = Vec::new();
        // (n, k) of the expert's gate and up projections together, and of its down projection.
        for &ty in &types {
            for (n, k) in [(2 * ffn, hidden), (hidden, ffn)] {
                matmul.extend(matmul_shape(n, k, ty, &a.rows, a.repeat)?);
            }
        }
        let attention = attention(dims, a.context, &a.batches, a.repeat)?;
        Ok((mem, matmul, attention))
    })?;
    let out = json!({
        "bench": "kernels",
        "threads": a.threads,
        "core": a.core,
        "settings": {
            "repeat": a.repeat,
            "rows": a.rows,
            "matrices_per_shape": MATRICES,
            "weight_types": a.weight_types,
            "hidden": hidden,
            "ffn": ffn,
            "heads": dims.heads,
            "kv_heads": dims.kv_heads,
            "head_dim": dims.head_dim,
            "kv_block_size": BLOCK_SIZE,
            "context": a.context,
            "batches": a.batches,
            "memory_buffer_bytes": a.mem_mib << 20,
        },
        "memory_read_gbps": mem / 1e9,
        "matmul": matmul,
        "attention": attention,
        "load_avg_before": load_before,
        "load_avg_after": crate::sysinfo::load_average(),
        "machine": crate::sysinfo::machine_info(),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// candle's side of a comparison: its GEMM on the f32 weight, or its quantized matmul.
enum Baseline {
    Gemm(candle_core::Tensor),
    Quant(candle_core::quantized::QMatMul),
}

impl Baseline {
    fn new(l: &Linear, ty: WeightType) -> Result<Self> {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        let w = l.weight_tensor()?;
        let q = match ty {
            WeightType::Q8_0 => GgmlDType::Q8_0,
            WeightType::Q4_0 => GgmlDType::Q4_0,
            WeightType::Q4K => GgmlDType::Q4K,
            WeightType::Q5K => GgmlDType::Q5K,
            WeightType::Q6K => GgmlDType::Q6K,
            // candle has no MXFP4: its GEMM on the f32 weight.
            WeightType::F32 | WeightType::Bf16 | WeightType::Mxfp4 => return Ok(Baseline::Gemm(w)),
        };
        Ok(Baseline::Quant(QMatMul::from_qtensor(QTensor::quantize(
            &w, q,
        )?)?))
    }

    fn run(&self, l: &Linear, x: &[f32], rows: usize) -> Result<()> {
        match self {
            Baseline::Gemm(w) => {
                std::hint::black_box(l.forward_gemm_with(w, x, rows)?);
            }
            Baseline::Quant(q) => {
                use candle_core::Module;
                let xt = candle_core::Tensor::from_slice(
                    x,
                    (rows, l.in_dim),
                    &candle_core::Device::Cpu,
                )?;
                std::hint::black_box(q.forward(&xt)?);
            }
        }
        Ok(())
    }
}

/// The packed matmul (`Linear::forward`, no bias) in `ty` and candle's (see [`Baseline`]) on
/// `[rows, k] x [n, k]^T` for every row count, each pass cycling through `MATRICES` distinct
/// weight matrices; the two are measured in alternating passes so drift on a shared machine
/// hits both alike.
fn matmul_shape(
    n: usize,
    k: usize,
    ty: WeightType,
    rows_list: &[usize],
    repeat: usize,
) -> Result<Vec<serde_json::Value>> {
    let linears = (0..MATRICES)
        .map(|c| {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7 + c) % 13) as f32 * 0.01 - 0.06)
                .collect();
            let l = Linear::from_f32(&w, n, k, None, ty);
            let b = Baseline::new(&l, ty)?;
            Ok((l, b))
        })
        .collect::<Result<Vec<_>>>()?;
    let weight_bytes = ty.bytes(n, k) as f64;
    let mut rows_out = Vec::new();
    for &rows in rows_list {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        // One untimed pass of each warms the code paths and candle's packing buffers.
        let packed_pass = || -> Result<f64> {
            let t = Instant::now();
            for (l, _) in &linears {
                std::hint::black_box(l.forward(&x, rows)?);
            }
            Ok(t.elapsed().as_secs_f64() / MATRICES as f64)
        };
        let gemm_pass = || -> Result<f64> {
            let t = Instant::now();
            for (l, b) in &linears {
                b.run(l, &x, rows)?;
            }
            Ok(t.elapsed().as_secs_f64() / MATRICES as f64)
        };
        packed_pass()?;
        gemm_pass()?;
        let (mut pk, mut gemm) = (f64::MAX, f64::MAX);
        for _ in 0..repeat {
            pk = pk.min(packed_pass()?);
            gemm = gemm.min(gemm_pass()?);
        }
        let flops = 2.0 * (rows * n * k) as f64;
        eprintln!(
            "bench kernels: matmul {ty} n={n} k={k} rows={rows}: {:.3} ms ({:.2} GB/s, {:.1} GFLOP/s), \
             candle {:.3} ms, {:.2}x",
            pk * 1e3,
            weight_bytes / pk / 1e9,
            flops / pk / 1e9,
            gemm * 1e3,
            gemm / pk
        );
        rows_out.push(json!({
            "weight_type": ty.name(),
            "baseline": if matches!(ty, WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4K | WeightType::Q5K | WeightType::Q6K) { "candle QMatMul" } else { "candle GEMM (f32)" },
            "n": n,
            "k": k,
            "rows": rows,
            "ms": pk * 1e3,
            "gbps": weight_bytes / pk / 1e9,
            "gflops": flops / pk / 1e9,
            "gemm_ms": gemm * 1e3,
            "gemm_gflops": flops / gemm / 1e9,
            "speedup_vs_gemm": gemm / pk,
        }));
    }
    Ok(rows_out)
}

/// The block tables of `batch` decode sequences at `context` positions: with `shared`, every
/// sequence has the same blocks for the full blocks of its first `context - BLOCK_SIZE`
/// positions (a shared prefix) and its own after; otherwise all its blocks are its own.
fn decode_layout(batch: usize, context: usize, shared: bool) -> (BatchLayout, usize) {
    let per_seq = context.div_ceil(BLOCK_SIZE);
    let prefix = if shared {
        context.saturating_sub(BLOCK_SIZE) / BLOCK_SIZE
    } else {
        0
    };
    let mut next = prefix as u32;
    let seqs = (0..batch)
        .map(|_| {
            let mut table: Vec<u32> = (0..prefix as u32).collect();
            table.extend((prefix..per_seq).map(|_| {
                next += 1;
                next - 1
            }));
            SeqSlot {
                start_pos: context - 1,
                num_tokens: 1,
                block_table: table,
            }
        })
        .collect();
    (BatchLayout { seqs }, next as usize)
}

/// Paged attention decode (one new token per sequence, attending over `context` positions),
/// distinct blocks per sequence and a shared prefix, for every batch size.
fn attention(
    dims: AttnDims,
    context: usize,
    batches: &[usize],
    repeat: usize,
) -> Result<Vec<serde_json::Value>> {
    let kd = dims.kv_heads * dims.head_dim;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    // Enough blocks for the largest batch without sharing; the shared case uses fewer.
    let blocks = decode_layout(max_batch, context, false).1;
    let slots = blocks * BLOCK_SIZE * kd;
    let kv = LayerKv {
        k: (0..slots).map(|i| (i % 97) as f32 * 0.001 - 0.05).collect(),
        v: (0..slots).map(|i| (i % 89) as f32 * 0.001 - 0.04).collect(),
    };
    let mut out = Vec::new();
    for (case, shared) in [("distinct", false), ("shared_prefix", true)] {
        for &batch in batches {
            let (layout, _) = decode_layout(batch, context, shared);
            let q: Vec<f32> = (0..batch * dims.heads * dims.head_dim)
                .map(|i| (i % 13) as f32 * 0.01 - 0.06)
                .collect();
            std::hint::black_box(paged_attention(&q, &layout, &kv, BLOCK_SIZE, dims)?);
            let mut best = f64::MAX;
            for _ in 0..repeat {
                let t = Instant::now();
                std::hint::black_box(paged_attention(&q, &layout, &kv, BLOCK_SIZE, dims)?);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let kv_bytes = (batch * context * kd * 2 * 4) as f64;
            eprintln!(
                "bench kernels: attention {case} batch={batch} context={context}: {:.3} ms \
                 ({:.1} us/seq, {:.2} GB/s logical KV)",
                best * 1e3,
                best * 1e6 / batch as f64,
                kv_bytes / best / 1e9
            );
            out.push(json!({
                "case": case,
                "batch": batch,
                "context": context,
                "ms": best * 1e3,
                "us_per_seq": best * 1e6 / batch as f64,
                "kv_gbps": kv_bytes / best / 1e9,
            }));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_tables_share_only_the_prefix() {
        let (l, used) = decode_layout(3, 40, true);
        // 40 positions = 3 blocks; the first 24 positions hold one full block, shared.
        assert_eq!(used, 1 + 3 * 2);
        for s in &l.seqs {
            assert_eq!(s.block_table.len(), 3);
            assert_eq!(s.block_table[0], 0);
            assert_eq!((s.start_pos, s.num_tokens), (39, 1));
        }
        assert_eq!(l.seqs[2].block_table[1..], [5, 6]);
        let (l, used) = decode_layout(3, 40, false);
        assert_eq!(used, 9);
        assert_eq!(l.seqs[1].block_table, [3, 4, 5]);
    }
}
