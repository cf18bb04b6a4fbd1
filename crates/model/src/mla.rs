//! Multi-head latent attention (DeepSeek-V2/V3). Every token's keys and values are one
//! `kv_lora_rank` latent `c` (after an RMSNorm) plus one rotary key `k_pe` of
//! `qk_rope_head_dim` shared by all heads; the cache holds exactly `[c | k_pe]` per token and
//! layer. Head `h` sees `k = [W_uk[h] c | k_pe]` and `v = W_uv[h] c`, where
//! `kv_b_proj = [W_uk[0]; W_uv[0]; W_uk[1]; ...]`.
//!
//! Two ways to attend, equal up to rounding (tested against each other below):
//! - **expanded** (prefill, several new rows of a sequence): up-project every cached latent of
//!   the sequence to full per-head keys and values once, then ordinary attention;
//! - **absorbed** (decode, one new row): fold `W_uk[h]` into the query (`q_c = W_uk[h]^T q`)
//!   and score it against the cached latents directly, sum the latents with the attention
//!   weights, and apply `W_uv[h]` once to that sum. Nothing per cached token is expanded.

use crate::config::Mla;
use crate::error::{ModelError, Result};
use crate::kv::{BatchLayout, LayerKv};
use crate::layers::{Linear, Norm, Rope};
use rayon::prelude::*;
use tandem_kernels::mla::{attend_absorbed, axpy, dot, softmax, MlaDims, MlaKernel};
use tandem_kernels::simd;

/// The projections of one MLA layer besides the fused first one (which lives in
/// `AttentionWeights::qkv`: `q_a_proj` or `q_proj`, then `kv_a_proj_with_mqa`).
#[derive(Clone)]
pub struct MlaWeights {
    pub dims: Mla,
    pub num_heads: usize,
    /// RMSNorm of the query bottleneck (`q_a_layernorm`), with `q_b` its up-projection.
    pub q_a_norm: Option<Norm>,
    pub q_b: Option<Linear>,
    /// RMSNorm of the latent (`kv_a_layernorm`).
    pub kv_a_norm: Norm,
    /// `kv_b_proj` `[H * (nope + v), rank]`, packed for the expanded path.
    pub kv_b: Linear,
    /// The same matrix row-major in f32, for the absorbed path.
    pub kv_b_rows: Vec<f32>,
    /// Softmax scale: `qk_head_dim^-1/2`, times YaRN's `mscale_all_dim` correction squared.
    pub scale: f32,
}

impl MlaWeights {
    /// What the absorbed kernel reads of these weights.
    pub fn kernel(&self) -> MlaKernel<'_> {
        let m = self.dims;
        MlaKernel {
            dims: MlaDims {
                kv_lora_rank: m.kv_lora_rank,
                qk_nope_head_dim: m.qk_nope_head_dim,
                qk_rope_head_dim: m.qk_rope_head_dim,
                v_head_dim: m.v_head_dim,
            },
            num_heads: self.num_heads,
            kv_b_rows: &self.kv_b_rows,
            scale: self.scale,
        }
    }

    /// Width of the fused first projection's output: the query part, then `[c | k_pe]`.
    pub fn first_out_dim(&self) -> usize {
        self.query_part() + self.dims.latent_dim()
    }

    fn query_part(&self) -> usize {
        match self.dims.q_lora_rank {
            Some(r) => r,
            None => self.num_heads * self.dims.qk_head_dim(),
        }
    }

    pub fn weight_bytes(&self) -> usize {
        self.q_b.as_ref().map_or(0, |l| l.weight_bytes()) + self.kv_b.weight_bytes()
    }

    /// Splits the fused projection `first` (`[T, first_out_dim]`) into the queries
    /// `[T, H * qk_head_dim]` (per head `[nope | rope]`, rope not yet applied) and the cache
    /// rows `[T, rank + rope]` (latent normed, rope not yet applied).
    pub fn split(&self, first: &[f32], t: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (qp, lat) = (self.query_part(), self.dims.latent_dim());
        let mut q_in = Vec::with_capacity(t * qp);
        let mut cache = Vec::with_capacity(t * lat);
        for row in first.chunks_exact(qp + lat) {
            q_in.extend_from_slice(&row[..qp]);
            cache.extend_from_slice(&row[qp..]);
        }
        let q = match (&self.q_a_norm, &self.q_b) {
            (Some(n), Some(b)) => {
                n.apply_inplace(&mut q_in);
                b.forward(&q_in, t)?
            }
            _ => q_in,
        };
        let r = self.dims.kv_lora_rank;
        for row in cache.chunks_exact_mut(lat) {
            self.kv_a_norm.apply_inplace(&mut row[..r]);
        }
        Ok((q, cache))
    }

    /// Rotates the rope parts of the queries (every head) and of the cache rows.
    pub fn apply_rope(&self, rope: &Rope, q: &mut [f32], cache: &mut [f32], positions: &[usize]) {
        let (nope, pe) = (self.dims.qk_nope_head_dim, self.dims.qk_rope_head_dim);
        let (qk, lat, r) = (
            self.dims.qk_head_dim(),
            self.dims.latent_dim(),
            self.dims.kv_lora_rank,
        );
        let mut buf = vec![0f32; pe];
        for (i, &pos) in positions.iter().enumerate() {
            for h in 0..self.num_heads {
                let off = i * self.num_heads * qk + h * qk + nope;
                buf.copy_from_slice(&q[off..off + pe]);
                rope.apply(&mut buf, pos);
                q[off..off + pe].copy_from_slice(&buf);
            }
            rope.apply(&mut cache[i * lat + r..(i + 1) * lat], pos);
        }
    }
}

/// How a sequence's rows are attended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlaPath {
    /// Absorbed for single-row (decode) sequences, expanded for longer ones.
    Auto,
    Absorbed,
    Expanded,
}

/// Offset in the key cache of every position `0..len` of a sequence (`lat` floats a slot),
/// checked against the cache.
fn slot_offsets(
    kv: &LayerKv,
    table: &[u32],
    len: usize,
    bs: usize,
    lat: usize,
) -> Result<Vec<usize>> {
    (0..len)
        .map(|pos| {
            let b = table.get(pos / bs).ok_or_else(|| {
                ModelError::Input(format!(
                    "position {pos} has no KV block (block table has {} blocks of {bs})",
                    table.len()
                ))
            })?;
            let slot = *b as usize * bs + pos % bs;
            if (slot + 1) * lat > kv.k.len() {
                return Err(ModelError::Input(format!(
                    "KV slot {slot} is outside the cache"
                )));
            }
            Ok(slot * lat)
        })
        .collect()
}

/// Causal attention of every row of `q` (`[T, H * qk_head_dim]`, rope applied) over its
/// sequence's cached `[c | k_pe]` rows `0..=pos`, read in place. Returns `[T, H * v_head_dim]`.
pub fn mla_attention(
    w: &MlaWeights,
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    path: MlaPath,
) -> Result<Vec<f32>> {
    let m = w.dims;
    let h = w.num_heads;
    let (qk, vd) = (m.qk_head_dim(), m.v_head_dim);
    let mut out = vec![0f32; layout.num_tokens() * h * vd];
    let mut row0 = 0;
    for s in &layout.seqs {
        let n = s.num_tokens;
        let q_s = &q[row0 * h * qk..(row0 + n) * h * qk];
        let out_s = &mut out[row0 * h * vd..(row0 + n) * h * vd];
        let expanded = match path {
            MlaPath::Auto => n > 1,
            MlaPath::Absorbed => false,
            MlaPath::Expanded => true,
        };
        let offs = slot_offsets(kv, &s.block_table, s.start_pos + n, bs, m.latent_dim())?;
        let cache: &[f32] = &kv.k;
        if expanded {
            attend_expanded(w, q_s, cache, &offs, s.start_pos, out_s)?;
        } else {
            attend_absorbed(&w.kernel(), q_s, cache, &offs, s.start_pos, out_s, simd());
        }
        row0 += n;
    }
    Ok(out)
}

/// Rows `start..start + n` of one sequence, keys and values up-projected from the cached
/// latents (at `offs` in `cache`).
fn attend_expanded(
    w: &MlaWeights,
    q: &[f32],
    cache: &[f32],
    offs: &[usize],
    start: usize,
    out: &mut [f32],
) -> Result<()> {
    let m = w.dims;
    let h = w.num_heads;
    let (nope, r, vd) = (m.qk_nope_head_dim, m.kv_lora_rank, m.v_head_dim);
    let qk = m.qk_head_dim();
    let len = offs.len();
    let mut c = Vec::with_capacity(len * r);
    for &o in offs {
        c.extend_from_slice(&cache[o..o + r]);
    }
    let kvb = w.kv_b.forward(&c, len)?; // [len, H * (nope + v)]
    out.par_chunks_mut(h * vd).enumerate().for_each(|(i, o)| {
        let pos = start + i;
        let mut scores = vec![0f32; pos + 1];
        for hh in 0..h {
            let qh = &q[i * h * qk + hh * qk..i * h * qk + (hh + 1) * qk];
            for (t, sc) in scores.iter_mut().enumerate() {
                let kn = &kvb[t * h * (nope + vd) + hh * (nope + vd)..][..nope];
                let kpe = &cache[offs[t] + r..offs[t] + m.latent_dim()];
                *sc = (dot(&qh[..nope], kn) + dot(&qh[nope..], kpe)) * w.scale;
            }
            softmax(&mut scores);
            let oh = &mut o[hh * vd..(hh + 1) * vd];
            oh.fill(0.0);
            for (t, p) in scores.iter().enumerate() {
                axpy(
                    oh,
                    *p,
                    &kvb[t * h * (nope + vd) + hh * (nope + vd) + nope..][..vd],
                );
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::SeqSlot;
    use crate::mem::HugeBuf;
    use crate::packed::WeightType;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    fn weights(m: Mla, h: usize) -> MlaWeights {
        let rows = h * (m.qk_nope_head_dim + m.v_head_dim);
        let kvb = rand(rows * m.kv_lora_rank, 7);
        MlaWeights {
            dims: m,
            num_heads: h,
            q_a_norm: None,
            q_b: None,
            kv_a_norm: Norm::Rms {
                w: vec![1.0; m.kv_lora_rank],
                eps: 1e-6,
            },
            kv_b: Linear::from_f32(&kvb, rows, m.kv_lora_rank, None, WeightType::F32),
            kv_b_rows: kvb,
            scale: 1.0 / (m.qk_head_dim() as f32).sqrt(),
        }
    }

    /// The absorbed and the expanded forms give the same output, for decode rows at several
    /// positions and for a prefill chunk after cached tokens, across block boundaries.
    #[test]
    fn absorbed_equals_expanded_on_random_weights() {
        let m = Mla {
            q_lora_rank: None,
            kv_lora_rank: 24,
            qk_nope_head_dim: 12,
            qk_rope_head_dim: 8,
            v_head_dim: 10,
        };
        let h = 3;
        let w = weights(m, h);
        let bs = 4;
        let num_blocks = 16;
        let mut kv = LayerKv {
            k: HugeBuf::zeroed(num_blocks * bs * m.latent_dim()),
            v: HugeBuf::zeroed(0),
        };
        let cache = rand(num_blocks * bs * m.latent_dim(), 11);
        kv.k.copy_from_slice(&cache);
        // Two sequences: one decoding at position 13, one with 5 new rows after 6 cached.
        let layout = BatchLayout {
            seqs: vec![
                SeqSlot {
                    start_pos: 13,
                    num_tokens: 1,
                    block_table: vec![9, 2, 5, 0],
                },
                SeqSlot {
                    start_pos: 6,
                    num_tokens: 5,
                    block_table: vec![3, 12, 7],
                },
            ],
        };
        let q = rand(6 * h * m.qk_head_dim(), 5);
        let a = mla_attention(&w, &q, &layout, &kv, bs, MlaPath::Absorbed).unwrap();
        let e = mla_attention(&w, &q, &layout, &kv, bs, MlaPath::Expanded).unwrap();
        assert_eq!(a.len(), 6 * h * m.v_head_dim);
        let max = a
            .iter()
            .zip(&e)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "absorbed and expanded differ by {max}");
        assert!(a.iter().any(|x| x.abs() > 1e-3), "outputs are not all zero");
    }
}
