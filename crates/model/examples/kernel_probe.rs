//! Microbenchmark of `kernels::matmul_wt` on the demo model's expert and LM-head shapes, on
//! one thread, weights cycled through several copies so they come from memory (like the
//! experts of one layer). One JSON object per line.
//!
//! `cargo run --release -p tandem-model --example kernel_probe [ROWS,ROWS,...]`
//! (pin it with `taskset -c 1`; compare variants in one run, the machine is shared).

use serde_json::json;
use std::time::Instant;
use tandem_model::demo::DemoSpec;
use tandem_model::kernels::matmul_wt;

fn main() {
    let rows_list: Vec<usize> = std::env::args()
        .nth(1)
        .map(|s| s.split(',').map(|v| v.parse().expect("rows")).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 32, 64, 128]);
    let spec = DemoSpec::DEFAULT;
    let (d, f) = (spec.hidden, spec.ffn);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool.install(|| {
        for (what, n, k, copies) in [
            ("expert gate_up", 2 * f, d, 8usize),
            ("expert down", d, f, 8),
            ("lm_head", spec.vocab, d, 2),
        ] {
            let ws: Vec<Vec<f32>> = (0..copies)
                .map(|c| {
                    (0..n * k)
                        .map(|i| ((i * 7 + c) % 13) as f32 * 0.01)
                        .collect()
                })
                .collect();
            for &rows in &rows_list {
                let x: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 * 0.1).collect();
                let mut out = vec![0f32; rows * n];
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t = Instant::now();
                    for w in &ws {
                        matmul_wt(&x, rows, k, w, n, &mut out);
                    }
                    best = best.min(t.elapsed().as_secs_f64() / copies as f64);
                }
                let flops = 2.0 * (rows * n * k) as f64;
                println!(
                    "{}",
                    json!({"matrix": what, "n": n, "k": k, "rows": rows, "ms": best * 1e3,
                           "weight_gb_s": (n * k * 4) as f64 / best / 1e9,
                           "gflop_s": flops / best / 1e9})
                );
            }
        }
    });
}
