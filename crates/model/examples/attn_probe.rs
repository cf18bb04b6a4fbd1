//! Microbenchmark of `kv::paged_attention` decode on the demo model's attention shape, on
//! the calling thread's pool: sequences with their own blocks (read from memory) and
//! sequences sharing a prefix (its blocks stay in cache). One JSON object per line.
//!
//! `RAYON_NUM_THREADS=1 taskset -c 1 cargo run --release -p tandem-model --example attn_probe [CONTEXT]`

use serde_json::json;
use std::time::Instant;
use tandem_model::demo::DemoSpec;
use tandem_model::kv::{paged_attention, AttnDims, BatchLayout, LayerKv, SeqSlot};

fn main() {
    let ctx: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("context"))
        .unwrap_or(1040);
    let spec = DemoSpec::DEFAULT;
    let (hq, hk, dh, bs) = (spec.heads, spec.kv_heads, spec.hidden / spec.heads, 16);
    let kd = hk * dh;
    let per_seq = ctx.div_ceil(bs);
    let prefix_blocks = (ctx - 1) / bs; // full blocks before the last position
    let nblocks = 33 * per_seq + 1; // the largest batch, plus the shared prefix
    let kv = LayerKv {
        k: (0..nblocks * bs * kd)
            .map(|i| (i % 97) as f32 * 0.001)
            .collect(),
        v: (0..nblocks * bs * kd)
            .map(|i| (i % 89) as f32 * 0.001)
            .collect(),
    };
    for shared in [false, true] {
        for batch in [8usize, 16, 32] {
            let mut next = 0u32;
            let mut fresh = || {
                next += 1;
                next - 1
            };
            let prefix: Vec<u32> = (0..prefix_blocks).map(|_| fresh()).collect();
            let seqs: Vec<SeqSlot> = (0..batch)
                .map(|_| {
                    let mut t: Vec<u32> = if shared {
                        prefix.clone()
                    } else {
                        (0..prefix_blocks).map(|_| fresh()).collect()
                    };
                    t.extend((prefix_blocks..per_seq).map(|_| fresh()));
                    SeqSlot {
                        start_pos: ctx - 1,
                        num_tokens: 1,
                        block_table: t,
                    }
                })
                .collect();
            let layout = BatchLayout { seqs };
            let q: Vec<f32> = (0..batch * hq * dh)
                .map(|i| (i % 13) as f32 * 0.01)
                .collect();
            let dims = AttnDims {
                heads: hq,
                kv_heads: hk,
                head_dim: dh,
            };
            let mut best = f64::MAX;
            for _ in 0..10 {
                let t = Instant::now();
                let o = paged_attention(&q, &layout, &kv, bs, dims).expect("attention");
                std::hint::black_box(o);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let kv_bytes = (batch * ctx * kd * 2 * 4) as f64;
            println!(
                "{}",
                json!({"case": if shared { "shared prefix" } else { "distinct" },
                       "batch": batch, "context": ctx, "ms": best * 1e3,
                       "us_per_seq": best * 1e6 / batch as f64,
                       "logical_kv_gb_s": kv_bytes / best / 1e9})
            );
        }
    }
}
