//! A loaded checkpoint: embeddings, per-layer attention and expert stages, final norm and
//! lm_head, and the colocated forward pass that composes the stages in one place (the
//! reference the disaggregated runtime is tested against).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::families::{self, FamilyWeights};
use crate::kv::{BatchLayout, KvCache};
use crate::layers::{from_vec, with_slice, Linear, Norm, Rope};
use crate::stages::{Assignment, AttentionStage, ExpertStage};
use crate::weights::Weights;
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which routed experts to load.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertSelection {
    All,
    None,
    /// These expert ids (the same in every layer).
    Only(Vec<u32>),
}

pub struct Layer {
    pub attention: AttentionStage,
    pub experts: ExpertStage,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    /// `[V, D]`
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    /// `[V, D]` (shares `embed` when tied).
    pub lm_head: Linear,
}

impl Model {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &ExpertSelection::All)
    }

    pub fn load_with(dir: &Path, sel: &ExpertSelection) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::from_weights(cfg, &weights, dir, sel)
    }

    pub fn from_weights(
        cfg: ModelConfig,
        w: &Weights,
        dir: &Path,
        sel: &ExpertSelection,
    ) -> Result<Self> {
        let names: Box<dyn FamilyWeights + Send + Sync> = families::for_family(cfg.family);
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed = w.get(&names.embed(), &[v, d])?;
        let rope = Arc::new(Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.max_position_embeddings,
        ));
        let wanted: Vec<usize> = match sel {
            ExpertSelection::All => (0..cfg.num_experts).collect(),
            ExpertSelection::None => vec![],
            ExpertSelection::Only(ids) => {
                if let Some(bad) = ids.iter().find(|e| **e as usize >= cfg.num_experts) {
                    return Err(ModelError::Input(format!(
                        "expert {bad} does not exist (the model has {})",
                        cfg.num_experts
                    )));
                }
                ids.iter().map(|e| *e as usize).collect()
            }
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let aw = names.attention(w, &cfg, l)?;
            let mut routed = vec![None; cfg.num_experts];
            let (mut shared, mut dense) = (None, None);
            if cfg.is_moe_layer(l) {
                for (e, mlp) in wanted.iter().zip(names.experts(w, &cfg, l, &wanted)?) {
                    routed[*e] = Some(Arc::new(mlp));
                }
                shared = names.shared_expert(w, &cfg, l)?;
            } else {
                dense = Some(names.dense_mlp(w, &cfg, l)?);
            }
            layers.push(Layer {
                attention: AttentionStage::new(l, aw, &cfg, rope.clone()),
                experts: ExpertStage {
                    layer: l,
                    hidden: d,
                    routed,
                    shared,
                    dense,
                },
            });
        }
        let final_norm = families::norm(w, &cfg, &names.final_norm(), d)?;
        let lm_head =
            if cfg.tie_word_embeddings && !w.contains(&format!("{}.weight", names.lm_head())) {
                Linear::new(embed.clone(), None)?
            } else {
                families::linear(w, &names.lm_head(), v, d)?
            };
        Ok(Self {
            cfg,
            dir: dir.to_path_buf(),
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// Embeddings of `tokens` -> `[T, D]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        let v = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= v) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {v})"
            )));
        }
        let out = with_slice(&self.embed, |e| {
            let mut out = Vec::with_capacity(tokens.len() * d);
            for &t in tokens {
                out.extend_from_slice(&e[t as usize * d..(t as usize + 1) * d]);
            }
            out
        })?;
        from_vec(out, tokens.len(), d)
    }

    /// Final norm + lm_head on the given rows of the last hidden states `[T, D]` ->
    /// `[rows, V]` logits.
    pub fn logits(&self, hidden: &Tensor, rows: &[usize]) -> Result<Vec<f32>> {
        let x = self.lm_head_input(hidden, rows)?;
        self.lm_head.forward(&x, rows.len())
    }

    /// The given rows of the last hidden states `[T, D]` after the final norm: what
    /// `lm_head` multiplies (`[rows.len(), D]`). With [`Linear::forward_cols`] a caller can
    /// compute [`Model::logits`] a vocabulary range at a time.
    pub fn lm_head_input(&self, hidden: &Tensor, rows: &[usize]) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let mut x = with_slice(hidden, |h| {
            let mut x = Vec::with_capacity(rows.len() * d);
            for &r in rows {
                x.extend_from_slice(&h[r * d..(r + 1) * d]);
            }
            x
        })?;
        self.final_norm.apply_inplace(&mut x);
        Ok(x)
    }

    /// The colocated forward pass: every stage in this thread, in order. Returns the last
    /// hidden states `[T, D]` (before the final norm).
    pub fn forward(
        &self,
        tokens: &[u32],
        layout: &BatchLayout,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_observed(tokens, layout, kv, &mut |_, _| {})
    }

    /// [`Model::forward`], calling `observe(layer, routing)` for every MoE layer.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        layout: &BatchLayout,
        kv: &mut KvCache,
        observe: &mut dyn FnMut(usize, &crate::stages::Routing),
    ) -> Result<Tensor> {
        if tokens.len() != layout.num_tokens() {
            return Err(ModelError::Input(format!(
                "{} tokens but the layout has {}",
                tokens.len(),
                layout.num_tokens()
            )));
        }
        let mut h = self.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let a = layer
                .attention
                .forward(&h, layout, &mut kv.layers[l], kv.block_size)?;
            if let Some(r) = &a.routing {
                observe(l, r);
            }
            h = self.finish_layer(layer, a)?;
        }
        Ok(h)
    }

    /// Expert stage of one layer, colocated: routed experts + shared/dense + residual.
    pub fn finish_layer(&self, layer: &Layer, a: crate::stages::AttentionOutput) -> Result<Tensor> {
        let mut out = with_slice(&a.residual, |s| s.to_vec())?;
        if let Some(r) = &a.routing {
            let assignments = assignments_of(r);
            let y = layer.experts.forward_routed(&a.normed, &assignments)?;
            with_slice(&y, |y| add_into(&mut out, y))?;
        }
        if let Some(y) = layer.experts.forward_shared(&a.normed)? {
            with_slice(&y, |y| add_into(&mut out, y))?;
        }
        from_vec(out, a.residual.dims2()?.0, self.cfg.hidden_size)
    }

    /// Bytes of weights one decode step reads for a batch whose tokens hit `experts_hit`
    /// distinct experts per layer on average (embedding rows are negligible).
    pub fn bytes_per_step(&self, experts_hit_per_layer: f64) -> f64 {
        let mut b = self.lm_head.weight_bytes() as f64;
        for layer in &self.layers {
            b += layer.attention.weight_bytes() as f64;
            b += layer.experts.shared_bytes() as f64;
            if let Some(m) = layer.experts.routed.iter().flatten().next() {
                b += experts_hit_per_layer * m.weight_bytes() as f64;
            }
        }
        b
    }
}

pub fn add_into(out: &mut [f32], y: &[f32]) {
    for (o, v) in out.iter_mut().zip(y) {
        *o += v;
    }
}

/// Every (token, expert, weight) of a routing decision, rows = token indices.
pub fn assignments_of(r: &crate::stages::Routing) -> Vec<Assignment> {
    r.ids
        .iter()
        .zip(&r.weights)
        .enumerate()
        .map(|(i, (&e, &w))| Assignment {
            row: (i / r.top_k) as u32,
            expert: e,
            weight: w,
        })
        .collect()
}
