//! The kernels of multi-head latent attention (DeepSeek-V2/V3): the absorbed decode path,
//! which scores a row's heads against the cached latents `[c | k_pe]` directly, and the
//! dot/axpy/softmax loops the model's expanded prefill path shares. The weights' loading,
//! the projections and the cache are the model's (`tandem-model`'s `mla.rs`).

use crate::simd::Simd;
use rayon::prelude::*;

/// The shape of a layer's latent attention (the part of the model's config the kernels read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaDims {
    /// A query or key head: the no-rope part, then the rope part.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// One cached position: the latent `c`, then the shared rope key `k_pe`.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// What the absorbed kernel reads of a layer: its shape, head count, softmax scale and the
/// up-projection's rows `[H * (nope + v), kv_lora_rank]` in f32.
#[derive(Debug, Clone, Copy)]
pub struct MlaKernel<'a> {
    pub dims: MlaDims,
    pub num_heads: usize,
    pub kv_b_rows: &'a [f32],
    pub scale: f32,
}

/// Softmax of `scores` in place (all finite).
pub fn softmax(scores: &mut [f32]) {
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    scores.iter_mut().for_each(|x| *x /= sum);
}

/// Dot product with eight independent partial sums per lane group, so the compiler can keep
/// them in vector registers.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `acc += x * v`.
#[inline(always)]
pub fn axpy(acc: &mut [f32], x: f32, v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += x * b;
    }
}

/// Rows `start..start + n` of one sequence, scored against the cached latents directly. The
/// heads are split into as many chunks as the pool has threads; a chunk reads each cached
/// latent once for all its heads.
pub fn attend_absorbed(
    w: &MlaKernel,
    q: &[f32],
    cache: &[f32],
    offs: &[usize],
    start: usize,
    out: &mut [f32],
    simd: Simd,
) {
    assert!(simd <= crate::simd::detected_simd());
    let h = w.num_heads;
    let vd = w.dims.v_head_dim;
    let per = h.div_ceil(rayon::current_num_threads().clamp(1, h.max(1)));
    let rows = out.len() / (h * vd).max(1);
    let chunks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(h * vd)
        .enumerate()
        .flat_map(|(i, row)| {
            row.chunks_mut(per * vd)
                .enumerate()
                .map(move |(c, o)| (i, c * per, o))
        })
        .collect();
    debug_assert_eq!(chunks.len(), rows * h.div_ceil(per));
    chunks.into_par_iter().for_each(|(i, h0, o)| {
        #[cfg(target_arch = "x86_64")]
        {
            if simd >= Simd::Avx2 {
                // SAFETY: the level, checked against the CPU above, includes AVX2 and FMA.
                unsafe { absorbed_heads_avx2(w, q, cache, offs, start + i, i, h0, o) };
                return;
            }
        }
        absorbed_heads(w, q, cache, offs, start + i, i, h0, o);
    });
}

/// [`absorbed_heads`] compiled for AVX2 + FMA (the loops vectorise 8 lanes wide).
///
/// # Safety
/// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional extensions
/// this module asks for) first.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn absorbed_heads_avx2(
    w: &MlaKernel,
    q: &[f32],
    cache: &[f32],
    offs: &[usize],
    pos: usize,
    i: usize,
    h0: usize,
    o: &mut [f32],
) {
    absorbed_heads(w, q, cache, offs, pos, i, h0, o)
}

/// Heads `h0..h0 + o.len() / v_head_dim` of row `i` (at position `pos`) into `o`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn absorbed_heads(
    w: &MlaKernel,
    q: &[f32],
    cache: &[f32],
    offs: &[usize],
    pos: usize,
    i: usize,
    h0: usize,
    o: &mut [f32],
) {
    let m = w.dims;
    let h = w.num_heads;
    let (nope, r, vd, ld) = (
        m.qk_nope_head_dim,
        m.kv_lora_rank,
        m.v_head_dim,
        m.latent_dim(),
    );
    let qk = m.qk_head_dim();
    let nh = o.len() / vd;
    let len = pos + 1;
    let wk = &w.kv_b_rows; // [H * (nope + v), r]
    let head_rows = |hh: usize| &wk[hh * (nope + vd) * r..(hh + 1) * (nope + vd) * r];
    let qh = |hh: usize| &q[i * h * qk + hh * qk..i * h * qk + (hh + 1) * qk];
    // q_c = W_uk[h]^T q_nope, one row of `r` per head.
    let mut qc = vec![0f32; nh * r];
    for (k, qc) in qc.chunks_exact_mut(r).enumerate() {
        let (rows, qv) = (head_rows(h0 + k), qh(h0 + k));
        for (n, x) in qv[..nope].iter().enumerate() {
            axpy(qc, *x, &rows[n * r..(n + 1) * r]);
        }
    }
    let mut scores = vec![0f32; nh * len];
    for (t, &off) in offs[..len].iter().enumerate() {
        let (c, kpe) = (&cache[off..off + r], &cache[off + r..off + ld]);
        for k in 0..nh {
            let s = dot(&qc[k * r..(k + 1) * r], c) + dot(&qh(h0 + k)[nope..], kpe);
            scores[k * len + t] = s * w.scale;
        }
    }
    for sc in scores.chunks_exact_mut(len) {
        softmax(sc);
    }
    let mut ctx = vec![0f32; nh * r];
    for (t, &off) in offs[..len].iter().enumerate() {
        let c = &cache[off..off + r];
        for k in 0..nh {
            axpy(&mut ctx[k * r..(k + 1) * r], scores[k * len + t], c);
        }
    }
    for k in 0..nh {
        let rows = head_rows(h0 + k);
        for (j, ov) in o[k * vd..(k + 1) * vd].iter_mut().enumerate() {
            *ov = dot(
                &rows[(nope + j) * r..(nope + j + 1) * r],
                &ctx[k * r..(k + 1) * r],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_levels;

    fn rnd(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The absorbed computation written out in f64: `q_c = W_uk^T q_nope`, scores against the
    /// latents and rope keys, softmax, the latents' weighted sum, then `W_uv`.
    fn naive(
        w: &MlaKernel,
        q: &[f32],
        cache: &[f32],
        offs: &[usize],
        start: usize,
        rows: usize,
    ) -> Vec<f32> {
        let d = w.dims;
        let (h, nope, r, vd, qk) = (
            w.num_heads,
            d.qk_nope_head_dim,
            d.kv_lora_rank,
            d.v_head_dim,
            d.qk_head_dim(),
        );
        let wk =
            |hh: usize, row: usize, c: usize| w.kv_b_rows[(hh * (nope + vd) + row) * r + c] as f64;
        let mut out = Vec::new();
        for i in 0..rows {
            let pos = start + i;
            for hh in 0..h {
                let qh = &q[i * h * qk + hh * qk..][..qk];
                let qc: Vec<f64> = (0..r)
                    .map(|c| (0..nope).map(|n| qh[n] as f64 * wk(hh, n, c)).sum())
                    .collect();
                let scores: Vec<f64> = offs[..=pos]
                    .iter()
                    .map(|&o| {
                        let lat: f64 = (0..r).map(|c| qc[c] * cache[o + c] as f64).sum();
                        let pe: f64 = (0..d.qk_rope_head_dim)
                            .map(|j| qh[nope + j] as f64 * cache[o + r + j] as f64)
                            .sum();
                        (lat + pe) * w.scale as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                let ctx: Vec<f64> = (0..r)
                    .map(|c| {
                        offs[..=pos]
                            .iter()
                            .zip(&scores)
                            .map(|(&o, s)| (s - m).exp() / z * cache[o + c] as f64)
                            .sum()
                    })
                    .collect();
                for j in 0..vd {
                    out.push((0..r).map(|c| wk(hh, nope + j, c) * ctx[c]).sum::<f64>() as f32);
                }
            }
        }
        out
    }

    #[test]
    fn absorbed_matches_the_f64_oracle_at_every_level() {
        let dims = MlaDims {
            kv_lora_rank: 20,
            qk_nope_head_dim: 6,
            qk_rope_head_dim: 4,
            v_head_dim: 5,
        };
        let h = 3;
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let rows_w = rnd(h * (6 + 5) * 20, &mut seed);
        let w = MlaKernel {
            dims,
            num_heads: h,
            kv_b_rows: &rows_w,
            scale: 0.3,
        };
        let (start, rows, slots) = (5, 2, 16);
        let cache = rnd(slots * dims.latent_dim(), &mut seed);
        // Positions in slots out of order.
        let offs: Vec<usize> = (0..start + rows)
            .map(|p| (p * 7 + 3) % slots * dims.latent_dim())
            .collect();
        let q = rnd(rows * h * dims.qk_head_dim(), &mut seed);
        let want = naive(&w, &q, &cache, &offs, start, rows);
        for level in available_levels() {
            let mut got = vec![f32::NAN; rows * h * dims.v_head_dim];
            attend_absorbed(&w, &q, &cache, &offs, start, &mut got, level);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-5, "{level:?} [{i}]: {a} vs {b}");
            }
        }
    }
}
