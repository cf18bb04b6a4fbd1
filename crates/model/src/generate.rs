//! The simplest generation loop: one sequence at a time, colocated model, contiguous block
//! table. It is the reference the engine is tested against, and what `tandem bench decode`
//! uses to time a step without a scheduler in the way.

use crate::error::{ModelError, Result};
use crate::kv::{BatchLayout, KvCache, SeqSlot};
use crate::model::Model;

/// A batch of independent sequences sharing one KV cache with fixed, contiguous block tables.
pub struct SimpleBatch {
    pub cache: KvCache,
    pub seqs: Vec<SeqState>,
}

pub struct SeqState {
    pub block_table: Vec<u32>,
    pub len: usize,
    pub capacity: usize,
}

impl SimpleBatch {
    /// Room for `batch` sequences of up to `max_len` tokens each.
    pub fn new(model: &Model, batch: usize, max_len: usize, block_size: usize) -> Self {
        let per = max_len.div_ceil(block_size);
        let cache = KvCache::new(&model.cfg, block_size, per * batch);
        let seqs = (0..batch)
            .map(|i| SeqState {
                block_table: ((i * per) as u32..((i + 1) * per) as u32).collect(),
                len: 0,
                capacity: per * block_size,
            })
            .collect();
        Self { cache, seqs }
    }

    /// Runs `tokens[i]` (any number each, maybe none) for every sequence i; returns the logits
    /// `[V]` of the last new token of each sequence that had tokens.
    pub fn step(&mut self, model: &Model, tokens: &[Vec<u32>]) -> Result<Vec<Option<Vec<f32>>>> {
        let mut layout = BatchLayout::default();
        let mut flat = Vec::new();
        let mut which = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                continue;
            }
            let s = &self.seqs[i];
            if s.len + t.len() > s.capacity {
                return Err(ModelError::Input(format!(
                    "sequence {i} would exceed its {} KV slots",
                    s.capacity
                )));
            }
            layout.seqs.push(SeqSlot {
                start_pos: s.len,
                num_tokens: t.len(),
                block_table: s.block_table.clone(),
            });
            flat.extend_from_slice(t);
            which.push(i);
        }
        let mut out = vec![None; tokens.len()];
        if flat.is_empty() {
            return Ok(out);
        }
        let h = model.forward(&flat, &layout, &mut self.cache)?;
        let logits = model.logits(&h, &layout.last_rows())?;
        let v = model.cfg.vocab_size;
        for (k, &i) in which.iter().enumerate() {
            self.seqs[i].len += tokens[i].len();
            out[i] = Some(logits[k * v..(k + 1) * v].to_vec());
        }
        Ok(out)
    }
}

/// Greedy argmax, lowest index on ties.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy continuation of one prompt: `n` new tokens (no stopping at EOS).
pub fn greedy(model: &Model, prompt: &[u32], n: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut b = SimpleBatch::new(model, 1, prompt.len() + n + 1, 16);
    let mut logits = b
        .step(model, &[prompt.to_vec()])?
        .pop()
        .flatten()
        .ok_or_else(|| ModelError::Input("empty prompt".into()))?;
    let first = logits.clone();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        if out.len() == n {
            break;
        }
        logits = b
            .step(model, &[vec![t]])?
            .pop()
            .flatten()
            .ok_or_else(|| ModelError::Input("no logits".into()))?;
    }
    Ok((out, first))
}
