//! A loaded checkpoint: embeddings, per-layer attention and expert stages, final norm and
//! lm_head, and the colocated forward pass that composes the stages in one place (the
//! reference the disaggregated runtime is tested against).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::families::{self, FamilyWeights};
use crate::kv::{BatchLayout, KvCache};
use crate::layers::{from_vec, with_slice, Linear, Norm, Rope};
use crate::packed::{PackedWeights, WeightType};
use crate::source::ModelSource;
use crate::stages::{Assignment, AttentionStage, ExpertStage};
use crate::weights::{LinearType, Role, Weights};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Which routed experts to load.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertSelection {
    All,
    None,
    /// These expert ids (the same in every layer).
    Only(Vec<u32>),
}

/// The expert id of a per-expert tensor name (`...experts.7.w1.weight` -> 7).
fn expert_of(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once(".experts.")?;
    rest.split('.').next()?.parse().ok()
}

/// About how many bytes the weights of `w` take once loaded with linear layers in `ty` and
/// the experts `sel`: each matrix in the type [`Weights::type_for_as`] gives it (routers keep
/// theirs, the LM head follows `Role::LmHead`), vectors in f32, plus the largest tensor once
/// in f32 (it is converted from that while loading). MXFP4 `*_blocks` hold two values a byte;
/// a stacked `[E, ...]` tensor counts for the selected share of its experts.
pub fn estimate_resident_bytes(
    cfg: &ModelConfig,
    w: &Weights,
    sel: &ExpertSelection,
    ty: LinearType,
) -> u64 {
    let names = families::for_family(cfg.family);
    let embed = names.embed();
    let lm_head = format!("{}.weight", names.lm_head());
    let ne = cfg.num_experts;
    let chosen = |e: usize| match sel {
        ExpertSelection::All => true,
        ExpertSelection::None => false,
        ExpertSelection::Only(ids) => ids.iter().any(|i| *i as usize == e),
    };
    let share = match sel {
        ExpertSelection::All => 1.0,
        ExpertSelection::None => 0.0,
        ExpertSelection::Only(_) => {
            (0..ne).filter(|e| chosen(*e)).count() as f64 / ne.max(1) as f64
        }
    };
    let (mut total, mut largest) = (0u64, 0u64);
    for name in w.names() {
        if expert_of(name).is_some_and(|e| !chosen(e)) {
            continue;
        }
        let Some(shape) = w.shape_of(name) else {
            continue;
        };
        let mut values = shape.iter().map(|d| *d as u64).product::<u64>();
        let dtype = w.dtype_of(name).unwrap_or_default();
        if dtype == "U8" {
            if name.ends_with("_scales") {
                continue;
            }
            values *= 2;
        }
        largest = largest.max(values.saturating_mul(4));
        let bytes = if shape.len() < 2 {
            values * 4
        } else {
            let role = if name == embed {
                Role::Embedding
            } else if name == lm_head {
                Role::LmHead
            } else if ne > 0 && shape.len() == 2 && (shape[0] == ne || shape[0] == 1) {
                Role::Router
            } else {
                Role::Linear
            };
            let cols = *shape.last().unwrap_or(&1) as u64;
            let rows = values / cols.max(1);
            let t = w.type_for_as(name, role, ty);
            let b = t.bytes(rows as usize, cols as usize) as u64;
            if shape.len() >= 3 && shape[0] == ne && expert_of(name).is_none() {
                (b as f64 * share) as u64
            } else {
                b
            }
        };
        total = total.saturating_add(bytes);
    }
    total.saturating_add(largest)
}

/// [`ModelError::TooLarge`] unless the weights of `w` in `ty` fit in `available` bytes; the
/// message names the smaller types that would fit.
pub fn check_fits(
    cfg: &ModelConfig,
    w: &Weights,
    dir: &Path,
    sel: &ExpertSelection,
    ty: LinearType,
    available: u64,
) -> Result<()> {
    let needed = estimate_resident_bytes(cfg, w, sel, ty);
    if needed <= available {
        return Ok(());
    }
    let describe = |t: LinearType| match t {
        LinearType::Auto => "in the checkpoint's own types".to_string(),
        LinearType::Is(t) => format!("as {t}"),
    };
    let mut fits = Vec::new();
    let mut smallest = (needed, ty);
    for (alt, flag) in [
        (LinearType::Auto, "--dtype auto (the file's own types)"),
        (LinearType::Is(WeightType::Q8_0), "--quantization q8_0"),
        (LinearType::Is(WeightType::Q4_0), "--quantization q4_0"),
    ] {
        if alt == ty {
            continue;
        }
        let n = estimate_resident_bytes(cfg, w, sel, alt);
        if n < smallest.0 {
            smallest = (n, alt);
        }
        if n <= available {
            fits.push(format!("{flag} (about {})", crate::mem::gib(n)));
        }
    }
    let hint = if fits.is_empty() {
        format!(
            "even {} needs about {}: use a machine with more memory, or spread the experts \
             over several processes (expert parallelism)",
            describe(smallest.1),
            crate::mem::gib(smallest.0)
        )
    } else {
        format!("try {}", fits.join(" or "))
    };
    Err(ModelError::TooLarge {
        path: dir.to_path_buf(),
        needed,
        available,
        what: describe(ty),
        hint,
    })
}

/// After a GGUF load: releases the mapping's pages that loading read to copy tensors and,
/// when this process holds every expert, the file fits in `available` memory with room to
/// spare and `TANDEM_POPULATE` is not `0`, pre-faults the ranges used in place
/// ([`GgufFile::settle`]). A worker holding a subset of the experts maps its pages as they
/// are used.
fn settle_mapping(g: &crate::gguf::GgufFile, sel: &ExpertSelection, available: Option<u64>) {
    let len = g.mapping().len() as u64;
    let mut populate = !std::env::var("TANDEM_POPULATE").is_ok_and(|v| v == "0")
        && matches!(sel, ExpertSelection::All);
    if populate && available.is_some_and(|a| len > a / 10 * 9) {
        tracing::info!(
            "not pre-faulting {} ({:.1} GB, more than 90% of the memory available): its pages \
             are mapped as tokens use them",
            g.path().display(),
            len as f64 / 1e9
        );
        populate = false;
    }
    g.settle(populate);
}

pub struct Layer {
    pub attention: AttentionStage,
    pub experts: ExpertStage,
}

pub struct Model {
    pub cfg: ModelConfig,
    /// Where it was loaded from.
    pub source: ModelSource,
    /// `[V, D]`, in the linear layers' type (a row is converted when looked up).
    pub embed: PackedWeights,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    /// `[V, D]` (shares `embed` when tied).
    pub lm_head: Linear,
}

impl Model {
    /// Loads every expert from a checkpoint directory or a GGUF file (a path is classified
    /// by [`ModelSource::of_path`]).
    pub fn load(src: impl Into<ModelSource>) -> Result<Self> {
        Self::load_with(src, &ExpertSelection::All)
    }

    pub fn load_with(src: impl Into<ModelSource>, sel: &ExpertSelection) -> Result<Self> {
        Self::load_typed(src, sel, LinearType::Auto)
    }

    /// Loads the experts `sel` with every linear layer held as `ty` says. `src` is a
    /// checkpoint directory or a GGUF file.
    ///
    /// Before anything large is allocated, the resident size of the weights in that type is
    /// compared with the memory available (`MemAvailable`): a model that will not fit is a
    /// [`ModelError::TooLarge`] saying what to try instead.
    pub fn load_typed(
        src: impl Into<ModelSource>,
        sel: &ExpertSelection,
        ty: LinearType,
    ) -> Result<Self> {
        Self::load_within(src, sel, ty, crate::mem::mem_available())
    }

    /// [`Model::load_typed`] with `available` bytes of memory instead of `MemAvailable`
    /// (`None`: no check).
    pub fn load_within(
        src: impl Into<ModelSource>,
        sel: &ExpertSelection,
        ty: LinearType,
        available: Option<u64>,
    ) -> Result<Self> {
        let src: ModelSource = src.into();
        let mut weights = Weights::open(src.clone())?;
        let cfg = match weights.gguf() {
            Some(g) => ModelConfig::from_gguf(g)?,
            None => ModelConfig::from_dir(src.clone())?,
        };
        if let Some(available) = available {
            check_fits(&cfg, &weights, src.path(), sel, ty, available)?;
        }
        weights.set_linear_type(ty);
        let model = Self::from_weights(cfg, &weights, src, sel)?;
        if let Some(g) = weights.gguf() {
            settle_mapping(g, sel, available);
        }
        Ok(model)
    }

    pub fn from_weights(
        cfg: ModelConfig,
        w: &Weights,
        src: impl Into<ModelSource>,
        sel: &ExpertSelection,
    ) -> Result<Self> {
        let names: Box<dyn FamilyWeights + Send + Sync> = families::for_family(cfg.family);
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed = w.packed(&names.embed(), v, d, Role::Embedding)?;
        let rope = Arc::new(Rope::for_config(&cfg));
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
                Linear::from_packed(embed.clone(), None)
            } else {
                families::linear_as(w, &names.lm_head(), v, d, Role::LmHead)?
            };
        Ok(Self {
            cfg,
            source: src.into(),
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
        let mut out = vec![0f32; tokens.len() * d];
        for (&t, row) in tokens.iter().zip(out.chunks_exact_mut(d.max(1))) {
            self.embed.row_into(t as usize, row);
        }
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

/// Bytes of a model's weights by type, as held in memory.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WeightMemory {
    /// Bytes of the linear layers and the embedding by weight type, by the types' own
    /// definitions (what the weights are).
    pub by_type: BTreeMap<String, usize>,
    /// The same weights as held: padded to whole panels / groups.
    pub resident_bytes: usize,
    /// Norms and biases (f32).
    pub other_bytes: usize,
}

impl WeightMemory {
    pub fn weight_bytes(&self) -> usize {
        self.by_type.values().sum()
    }

    fn add(&mut self, w: &PackedWeights) {
        // A stack of GGUF tensors can mix K-quants (Q4_K_M: Q4_K q/k, Q6_K v).
        for (ty, bytes) in w.bytes_by_type() {
            *self.by_type.entry(ty.name().into()).or_default() += bytes;
        }
        self.resident_bytes += w.resident_bytes();
    }

    fn add_linear(&mut self, l: &Linear) {
        self.add(&l.w);
        self.other_bytes += l.b.as_ref().map_or(0, |b| b.len() * 4);
    }

    /// "q8_0 480.1 MB + f32 0.3 MB (resident 497.0 MB)".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .by_type
            .iter()
            .map(|(t, b)| format!("{t} {:.1} MB", *b as f64 / 1e6))
            .collect();
        format!(
            "{} (resident {:.1} MB, norms and biases {:.1} MB)",
            parts.join(" + "),
            self.resident_bytes as f64 / 1e6,
            self.other_bytes as f64 / 1e6
        )
    }
}

impl Model {
    /// The weights' memory, by type (the embedding counted once when the LM head shares it).
    pub fn weight_memory(&self) -> WeightMemory {
        let mut m = WeightMemory::default();
        m.add(&self.embed);
        if !self.lm_head.w.shares(&self.embed) {
            m.add_linear(&self.lm_head);
        }
        m.other_bytes += self.final_norm.dim() * 4;
        for layer in &self.layers {
            let a = &layer.attention.w;
            for l in [Some(&a.qkv), Some(&a.o), a.router.as_ref()]
                .into_iter()
                .flatten()
            {
                m.add_linear(l);
            }
            for n in [
                Some(&a.input_norm),
                Some(&a.post_norm),
                a.q_norm.as_ref(),
                a.k_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                m.other_bytes += n.dim() * 4;
            }
            let e = &layer.experts;
            let mlps = e
                .routed
                .iter()
                .flatten()
                .map(|m| m.as_ref())
                .chain(e.dense.as_ref())
                .chain(e.shared.as_ref().map(|s| &s.mlp));
            for mlp in mlps {
                m.add_linear(&mlp.gate_up);
                m.add_linear(&mlp.down);
            }
            if let Some(g) = e.shared.as_ref().and_then(|s| s.gate.as_ref()) {
                m.add_linear(g);
            }
        }
        m
    }

    /// The type of the linear layers (the first layer's attention projections; routers and,
    /// under q4_0, the LM head differ: [`Model::weight_memory`] lists every type).
    pub fn weight_type(&self) -> WeightType {
        self.layers.first().map_or(self.lm_head.weight_type(), |l| {
            l.attention.w.qkv.weight_type()
        })
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
