//! The paged attention kernel (AVX2 and scalar paths, one and several threads) against a
//! naive f64 reference: MHA and GQA, odd head dims, block sizes 1..16, decode rows, whole and
//! chunked prefills, partial last blocks, scattered block tables.

use tandem_model::kv::{
    paged_attention, paged_attention_ext, paged_attention_scalar, paged_attention_scalar_ext,
    AttnDims, AttnExtras, LayerKv,
};
use tandem_model::{BatchLayout, SeqSlot};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.f() + 1.0) * 0.5 * n as f32) as usize % n
    }
}

/// softmax(q k^T / sqrt(dh)) v per row and head, in f64, position by position.
fn reference(q: &[f32], layout: &BatchLayout, kv: &LayerKv, bs: usize, d: AttnDims) -> Vec<f32> {
    reference_ext(q, layout, kv, bs, d, AttnExtras::default())
}

/// [`reference`] over the positions `pos + 1 - window ..= pos` only, with `exp(sinks[h])`
/// added to head h's softmax denominator.
fn reference_ext(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    d: AttnDims,
    ex: AttnExtras,
) -> Vec<f32> {
    let (qd, kd, group) = (
        d.heads * d.head_dim,
        d.kv_heads * d.head_dim,
        d.heads / d.kv_heads,
    );
    let dh = d.head_dim;
    let mut out = vec![0f32; q.len()];
    let mut row = 0;
    for s in &layout.seqs {
        for j in 0..s.num_tokens {
            let pos = s.start_pos + j;
            for h in 0..d.heads {
                let g = h / group;
                let qh = &q[row * qd + h * dh..row * qd + (h + 1) * dh];
                let at = |p: usize| (s.block_table[p / bs] as usize * bs + p % bs) * kd + g * dh;
                let lo = (pos + 1).saturating_sub(ex.window.unwrap_or(usize::MAX));
                let scores: Vec<f64> = (lo..=pos)
                    .map(|p| {
                        let k = &kv.k[at(p)..at(p) + dh];
                        qh.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let sink = ex.sinks.map(|s| s[h] as f64);
                let max = scores
                    .iter()
                    .cloned()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum::<f64>() + sink.map_or(0.0, |k| (k - max).exp());
                for x in 0..dh {
                    let v: f64 = (lo..=pos)
                        .map(|p| e[p - lo] / sum * kv.v[at(p) + x] as f64)
                        .sum();
                    out[row * qd + h * dh + x] = v as f32;
                }
            }
            row += 1;
        }
    }
    out
}

/// A cache of `blocks` blocks with random contents, and a layout of sequences
/// `(start_pos, num_tokens)` on disjoint, shuffled blocks.
fn setup(
    rng: &mut Rng,
    d: AttnDims,
    bs: usize,
    seqs: &[(usize, usize)],
) -> (Vec<f32>, BatchLayout, LayerKv) {
    let kd = d.kv_heads * d.head_dim;
    let need: Vec<usize> = seqs.iter().map(|(s, n)| (s + n).div_ceil(bs)).collect();
    let blocks: usize = need.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut next = ids.into_iter();
    let layout = BatchLayout {
        seqs: seqs
            .iter()
            .zip(&need)
            .map(|(&(start_pos, num_tokens), &n)| SeqSlot {
                start_pos,
                num_tokens,
                block_table: next.by_ref().take(n).collect(),
            })
            .collect(),
    };
    let kv = LayerKv {
        k: (0..blocks * bs * kd).map(|_| rng.f() * 2.0).collect(),
        v: (0..blocks * bs * kd).map(|_| rng.f()).collect(),
    };
    let t = layout.num_tokens();
    let q = (0..t * d.heads * d.head_dim)
        .map(|_| rng.f() * 2.0)
        .collect();
    (q, layout, kv)
}

fn check(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 2e-5 + 2e-5 * b.abs(),
            "{name}: value {i}: {a} vs reference {b}"
        );
    }
}

#[test]
fn fast_and_scalar_paths_match_the_reference() {
    let mut rng = Rng(7);
    let dims = [
        (4, 4, 8),   // MHA
        (8, 2, 13),  // GQA 4:1, odd head dim
        (6, 3, 64),  // GQA 2:1
        (16, 8, 64), // the demo model
        (2, 1, 5),   // MQA, head dim below one vector
        (3, 1, 24),
        (8, 2, 128), // wider than the 64 columns the decode kernel keeps in registers
        (5, 5, 72),
    ];
    // (start_pos, num_tokens): decode rows, a whole prefill longer than a row tile, a chunk
    // of a prefill, a single-token prompt, a long decode.
    let seqs = [
        (37, 1),
        (0, 19),
        (5, 10),
        (0, 1),
        (70, 1),
        (16, 3),
        (7, 1),
        (8, 1),
    ];
    for &(heads, kv_heads, head_dim) in &dims {
        for bs in [1, 3, 16] {
            let d = AttnDims {
                heads,
                kv_heads,
                head_dim,
            };
            let (q, layout, kv) = setup(&mut rng, d, bs, &seqs);
            let want = reference(&q, &layout, &kv, bs, d);
            let name = format!("{heads}/{kv_heads}x{head_dim} bs {bs}");
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let (fast, scalar) = pool.install(|| {
                    (
                        paged_attention(&q, &layout, &kv, bs, d).unwrap(),
                        paged_attention_scalar(&q, &layout, &kv, bs, d).unwrap(),
                    )
                });
                check(&format!("{name} fast x{threads}"), &fast, &want);
                check(&format!("{name} scalar x{threads}"), &scalar, &want);
            }
        }
    }
}

#[test]
fn sliding_window_and_sinks_match_the_reference() {
    // GPT-OSS: windows shorter than, equal to and longer than the sequences, not multiples of
    // the block size or of the kernel's chunk of 8 positions; sinks large enough to take most
    // of the weight of some heads; decode rows, prefills longer than the window and chunks.
    let mut rng = Rng(23);
    let dims = [(4, 2, 32), (8, 2, 13), (4, 4, 64), (2, 1, 5), (8, 2, 128)];
    let seqs = [
        (37, 1),
        (0, 19),
        (5, 10),
        (0, 1),
        (70, 1),
        (16, 3),
        (7, 1),
        (130, 12),
    ];
    for &(heads, kv_heads, head_dim) in &dims {
        for bs in [1, 3, 16] {
            for window in [
                None,
                Some(1),
                Some(4),
                Some(6),
                Some(9),
                Some(128),
                Some(500),
            ] {
                for with_sinks in [false, true] {
                    let d = AttnDims {
                        heads,
                        kv_heads,
                        head_dim,
                    };
                    let (q, layout, kv) = setup(&mut rng, d, bs, &seqs);
                    let sinks: Vec<f32> = (0..heads).map(|_| rng.f() * 4.0).collect();
                    let ex = AttnExtras {
                        window,
                        sinks: with_sinks.then_some(&sinks[..]),
                    };
                    let want = reference_ext(&q, &layout, &kv, bs, d, ex);
                    let name =
                        format!("{heads}/{kv_heads}x{head_dim} bs {bs} window {window:?} sinks {with_sinks}");
                    for threads in [1, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let (fast, scalar) = pool.install(|| {
                            (
                                paged_attention_ext(&q, &layout, &kv, bs, d, ex).unwrap(),
                                paged_attention_scalar_ext(&q, &layout, &kv, bs, d, ex).unwrap(),
                            )
                        });
                        check(&format!("{name} fast x{threads}"), &fast, &want);
                        check(&format!("{name} scalar x{threads}"), &scalar, &want);
                    }
                }
            }
        }
    }
}

#[test]
fn a_window_of_one_is_the_value_itself_and_sinks_take_weight() {
    let mut rng = Rng(5);
    let d = AttnDims {
        heads: 2,
        kv_heads: 1,
        head_dim: 8,
    };
    let (q, layout, kv) = setup(&mut rng, d, 4, &[(0, 9)]);
    let one = AttnExtras {
        window: Some(1),
        sinks: None,
    };
    let got = paged_attention_ext(&q, &layout, &kv, 4, d, one).unwrap();
    // Each row sees only itself: the output of every head is that position's value.
    for (r, row) in got.chunks_exact(16).enumerate() {
        let b = layout.seqs[0].block_table[r / 4] as usize;
        let v = &kv.v[(b * 4 + r % 4) * 8..][..8];
        for h in 0..2 {
            for (a, b) in row[h * 8..(h + 1) * 8].iter().zip(v) {
                assert!((a - b).abs() < 1e-6, "row {r} head {h}");
            }
        }
    }
    // A sink far above every score leaves almost nothing to the values.
    let sinks = [60.0f32, 60.0];
    let sunk = AttnExtras {
        window: None,
        sinks: Some(&sinks),
    };
    let got = paged_attention_ext(&q, &layout, &kv, 4, d, sunk).unwrap();
    assert!(got.iter().all(|x| x.abs() < 1e-6), "{got:?}");
}

#[test]
fn bad_extras_are_errors() {
    let mut rng = Rng(9);
    let d = AttnDims {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (q, layout, kv) = setup(&mut rng, d, 4, &[(0, 6)]);
    let zero = AttnExtras {
        window: Some(0),
        sinks: None,
    };
    assert!(paged_attention_ext(&q, &layout, &kv, 4, d, zero).is_err());
    let three = [0.0f32; 3];
    let short = AttnExtras {
        window: None,
        sinks: Some(&three),
    };
    assert!(paged_attention_ext(&q, &layout, &kv, 4, d, short).is_err());
}

#[test]
fn large_scores_stay_finite() {
    // Scores in the hundreds: the softmax must subtract the max before exponentiating.
    let mut rng = Rng(11);
    let d = AttnDims {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let (mut q, layout, kv) = setup(&mut rng, d, 4, &[(0, 9), (30, 1)]);
    q.iter_mut().for_each(|x| *x *= 60.0);
    let want = reference(&q, &layout, &kv, 4, d);
    let got = paged_attention(&q, &layout, &kv, 4, d).unwrap();
    assert!(got.iter().all(|x| x.is_finite()));
    check("large scores", &got, &want);
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng(3);
    let d = AttnDims {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (q, mut layout, kv) = setup(&mut rng, d, 4, &[(0, 6)]);
    // The block table misses the block of position 5.
    let mut short = layout.clone();
    short.seqs[0].block_table.truncate(1);
    assert!(paged_attention(&q, &short, &kv, 4, d).is_err());
    // A block outside the cache.
    layout.seqs[0].block_table[1] = 1000;
    assert!(paged_attention(&q, &layout, &kv, 4, d).is_err());
    // Queries of the wrong size.
    assert!(paged_attention(&q[1..], &short, &kv, 4, d).is_err());
}
