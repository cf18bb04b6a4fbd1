//! Paged KV cache storage: per layer, `num_blocks * block_size` slots of `[kv_heads * head_dim]`
//! keys and values. Which blocks a sequence owns is decided outside (the block manager in
//! `tandem-sched`); the attention kernel reads the blocks in place through a block table.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::mem::HugeBuf;

/// Keys and values of one layer, `[num_blocks * block_size, kv_dim]` each.
pub struct LayerKv {
    pub k: HugeBuf<f32>,
    pub v: HugeBuf<f32>,
}

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Floats per slot of the key cache (the latent + rotary key under MLA).
    pub kv_dim: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let (kw, vw) = cfg.kv_cache_widths();
        let kv_dim = kw;
        let slots = num_blocks * block_size;
        let layers = (0..cfg.num_layers)
            .map(|_| LayerKv {
                k: HugeBuf::zeroed(slots * kw),
                v: HugeBuf::zeroed(slots * vw),
            })
            .collect();
        Self {
            block_size,
            num_blocks,
            kv_dim,
            layers,
        }
    }

    /// Bytes of one token's keys and values over all layers (f32): `2 * kv_dim` floats per
    /// layer, or the latent plus the rotary key under MLA.
    pub fn bytes_per_token(cfg: &ModelConfig) -> usize {
        let (kw, vw) = cfg.kv_cache_widths();
        (kw + vw) * cfg.num_layers * 4
    }

    /// One token's cache in words, for the start-up log.
    pub fn describe_per_token(cfg: &ModelConfig) -> String {
        let b = Self::bytes_per_token(cfg);
        match &cfg.mla {
            Some(m) => format!(
                "KV cache {b} B per token (MLA: a {} + {} float latent per layer; full keys and \
                 values would take {} B)",
                m.kv_lora_rank,
                m.qk_rope_head_dim,
                cfg.num_heads * (m.qk_head_dim() + m.v_head_dim) * cfg.num_layers * 4
            ),
            None => format!("KV cache {b} B per token"),
        }
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_for_bytes(cfg: &ModelConfig, block_size: usize, bytes: usize) -> usize {
        bytes / (Self::bytes_per_token(cfg) * block_size).max(1)
    }
}

/// Where one sequence's new tokens sit in a flat batch, and where its cache lives.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSlot {
    /// Position of the first new token (= tokens already in the cache).
    pub start_pos: usize,
    /// New tokens of this sequence in the batch.
    pub num_tokens: usize,
    /// Physical block of every `block_size` positions.
    pub block_table: Vec<u32>,
}

/// The sequences of one forward pass, in row order of the `[T, D]` hidden states.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchLayout {
    pub seqs: Vec<SeqSlot>,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }

    /// Row index of the last token of every sequence (where logits are taken).
    pub fn last_rows(&self) -> Vec<usize> {
        let mut r = 0;
        self.seqs
            .iter()
            .map(|s| {
                r += s.num_tokens;
                r - 1
            })
            .collect()
    }

    /// `(sequence index, position)` of every row.
    pub fn row_positions(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for (i, s) in self.seqs.iter().enumerate() {
            for j in 0..s.num_tokens {
                out.push((i, s.start_pos + j));
            }
        }
        out
    }
}

pub use tandem_kernels::attention::{AttnDims, AttnExtras};
use tandem_kernels::attention::{PagedKv, PagedSeq};
use tandem_kernels::Simd;

/// Causal attention of every row of `q` (`[T, heads * head_dim]`, rows in `layout` order)
/// over its sequence's cached positions `0..=pos`, reading the keys and values of `kv` in
/// place through the block tables (block size `bs`). Returns `[T, heads * head_dim]`.
///
/// The kernel is `tandem_kernels::attention::paged_attention`, at the process's instruction
/// set ([`tandem_kernels::simd()`]).
pub fn paged_attention(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    dims: AttnDims,
) -> Result<Vec<f32>> {
    paged_attention_ext(q, layout, kv, bs, dims, AttnExtras::default())
}

/// [`paged_attention`] with a sliding window and/or attention sinks.
pub fn paged_attention_ext(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    dims: AttnDims,
    extras: AttnExtras,
) -> Result<Vec<f32>> {
    attention_at(q, layout, kv, bs, dims, extras, tandem_kernels::simd())
}

/// The same computation without SIMD (the fast path's test oracle).
pub fn paged_attention_scalar(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    dims: AttnDims,
) -> Result<Vec<f32>> {
    paged_attention_scalar_ext(q, layout, kv, bs, dims, AttnExtras::default())
}

/// [`paged_attention_ext`] without SIMD.
pub fn paged_attention_scalar_ext(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    dims: AttnDims,
    extras: AttnExtras,
) -> Result<Vec<f32>> {
    attention_at(q, layout, kv, bs, dims, extras, Simd::Scalar)
}

/// The kernel's view of `layout` and `kv`, its shape errors as the model's.
fn attention_at(
    q: &[f32],
    layout: &BatchLayout,
    kv: &LayerKv,
    bs: usize,
    dims: AttnDims,
    extras: AttnExtras,
    simd: Simd,
) -> Result<Vec<f32>> {
    let seqs: Vec<PagedSeq> = layout
        .seqs
        .iter()
        .map(|s| PagedSeq {
            start_pos: s.start_pos,
            num_tokens: s.num_tokens,
            block_table: &s.block_table,
        })
        .collect();
    let kv = PagedKv { k: &kv.k, v: &kv.v };
    tandem_kernels::attention::paged_attention(q, &seqs, kv, bs, dims, extras, simd)
        .map_err(|e| ModelError::Input(e.0))
}
