//! Paged KV cache storage: per layer, `num_blocks * block_size` slots of `[kv_heads * head_dim]`
//! keys and values. Which blocks a sequence owns is decided outside (the block manager in
//! `tandem-sched`); the attention kernel reads the blocks in place through a block table.

use crate::config::ModelConfig;

/// Keys and values of one layer, `[num_blocks * block_size, kv_dim]` each.
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_dim: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let kv_dim = cfg.kv_dim();
        let n = num_blocks * block_size * kv_dim;
        let layers = (0..cfg.num_layers)
            .map(|_| LayerKv {
                k: vec![0.0; n],
                v: vec![0.0; n],
            })
            .collect();
        Self {
            block_size,
            num_blocks,
            kv_dim,
            layers,
        }
    }

    /// Bytes of one token's keys and values over all layers (f32).
    pub fn bytes_per_token(cfg: &ModelConfig) -> usize {
        2 * cfg.kv_dim() * cfg.num_layers * 4
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
