//! The seam of every MoE layer: an **attention stage** (input norm, attention over the paged
//! KV cache, residual, post-attention norm, router top-k) and an **expert stage** (the routed
//! experts' FFNs, plus the shared expert or dense MLP where the family has one). The runtime
//! decides where each stage runs; this file only computes.

use crate::config::{ModelConfig, QkNorm, RouterKind, TopkNorm};
use crate::error::{ModelError, Result};
use crate::families::{AttentionWeights, SharedExpert};
use crate::kv::{paged_attention_ext, AttnDims, AttnExtras, BatchLayout, LayerKv};
use crate::layers::{from_vec, sigmoid, with_slice, GatedMlp, Rope};
use crate::mla::{mla_attention, MlaPath, MlaWeights};
use candle_core::Tensor;
use std::sync::Arc;

/// Top-k routing of `T` tokens: `ids[t * k + j]` is token t's j-th expert (by descending
/// weight), `weights[t * k + j]` its weight.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn num_tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }
}

/// What the attention stage hands on.
pub struct AttentionOutput {
    /// `[T, D]` residual stream after attention: `h + attn(norm(h))`.
    pub residual: Tensor,
    /// `[T, D]` post-attention-normed hidden states: the experts' input.
    pub normed: Tensor,
    /// Router decision; `None` on dense layers.
    pub routing: Option<Routing>,
}

pub struct AttentionStage {
    pub layer: usize,
    pub w: AttentionWeights,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    clip_qkv: Option<f32>,
    qk_norm: QkNorm,
    top_k: usize,
    topk_norm: TopkNorm,
    router: RouterKind,
    routed_scaling_factor: f32,
    rope: Arc<Rope>,
    /// This layer's sliding window, if it has one (GPT-OSS).
    window: Option<usize>,
}

impl AttentionStage {
    pub fn new(layer: usize, w: AttentionWeights, cfg: &ModelConfig, rope: Arc<Rope>) -> Self {
        Self {
            layer,
            w,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            hidden: cfg.hidden_size,
            clip_qkv: cfg.clip_qkv,
            qk_norm: cfg.qk_norm,
            top_k: cfg.top_k,
            topk_norm: cfg.topk_norm,
            router: cfg.router,
            routed_scaling_factor: cfg.routed_scaling_factor,
            rope,
            window: cfg.sliding_window.as_ref().and_then(|s| s.of_layer(layer)),
        }
    }

    /// Bytes of weights this stage reads per forward pass.
    pub fn weight_bytes(&self) -> usize {
        self.w.qkv.weight_bytes()
            + self.w.o.weight_bytes()
            + self.w.mla.as_ref().map_or(0, |m| m.weight_bytes())
            + self.w.router.as_ref().map_or(0, |r| r.weight_bytes())
    }

    /// h `[T, D]` -> residual, normed `[T, D]` and routing. Writes this batch's keys and values
    /// into `kv` (block size `block_size`) before attending, so a token sees itself and every
    /// earlier position of its sequence.
    pub fn forward(
        &self,
        h: &Tensor,
        layout: &BatchLayout,
        kv: &mut LayerKv,
        block_size: usize,
    ) -> Result<AttentionOutput> {
        let t = layout.num_tokens();
        let d = self.hidden;
        let h = with_slice(h, |s| s.to_vec())?; // [T, D]
        if h.len() != t * d {
            return Err(ModelError::Input(format!(
                "hidden states have {} values, layout says {t} tokens of {d}",
                h.len()
            )));
        }
        let x = self.w.input_norm.apply(&h);
        let attn = match &self.w.mla {
            Some(m) => self.attend_mla(m, &x, layout, kv, block_size)?,
            None => self.attend_gqa(&x, layout, kv, block_size)?,
        };
        let o = self.w.o.forward(&attn, t)?; // [T, D]
        let mut residual = h;
        for (r, a) in residual.iter_mut().zip(&o) {
            *r += a;
        }
        let normed = self.w.post_norm.apply(&residual);
        let routing = match &self.w.router {
            Some(r) => Some(self.route(&r.forward(&normed, t)?, t)),
            None => None,
        };
        Ok(AttentionOutput {
            residual: from_vec(residual, t, d)?,
            normed: from_vec(normed, t, d)?,
            routing,
        })
    }

    /// Grouped-query attention of the normed rows `x`: q/k/v, norms, clipping, rope, the new
    /// keys and values into the cache, then paged attention. `[T, H * Dh]`.
    fn attend_gqa(
        &self,
        x: &[f32],
        layout: &BatchLayout,
        kv: &mut LayerKv,
        block_size: usize,
    ) -> Result<Vec<f32>> {
        let t = layout.num_tokens();
        let (hq, hk, dh) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (qd, kd) = (hq * dh, hk * dh);
        let qkv = self.w.qkv.forward(x, t)?; // [T, qd + 2 kd]
        let mut q = Vec::with_capacity(t * qd); // [T, H * Dh]
        let mut k = Vec::with_capacity(t * kd); // [T, KV * Dh]
        let mut v = Vec::with_capacity(t * kd);
        for row in qkv.chunks_exact(qd + 2 * kd) {
            q.extend_from_slice(&row[..qd]);
            k.extend_from_slice(&row[qd..qd + kd]);
            v.extend_from_slice(&row[qd + kd..]);
        }
        if self.qk_norm != QkNorm::None {
            // Per-head norms have head_dim weights, full norms the whole width: both apply
            // row by row over their own width.
            if let Some(n) = &self.w.q_norm {
                n.apply_inplace(&mut q);
            }
            if let Some(n) = &self.w.k_norm {
                n.apply_inplace(&mut k);
            }
        }
        if let Some(c) = self.clip_qkv {
            for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                *x = x.clamp(-c, c);
            }
        }
        let rows = layout.row_positions();
        for (i, &(_, pos)) in rows.iter().enumerate() {
            self.rope.apply(&mut q[i * qd..(i + 1) * qd], pos);
            self.rope.apply(&mut k[i * kd..(i + 1) * kd], pos);
        }
        // Write keys and values into their slots.
        for (i, &(si, pos)) in rows.iter().enumerate() {
            let slot = slot_of(&layout.seqs[si].block_table, pos, block_size)?;
            let dst = slot * kd;
            if dst + kd > kv.k.len() {
                return Err(ModelError::Input(format!(
                    "KV slot {slot} is outside the cache"
                )));
            }
            kv.k[dst..dst + kd].copy_from_slice(&k[i * kd..(i + 1) * kd]);
            kv.v[dst..dst + kd].copy_from_slice(&v[i * kd..(i + 1) * kd]);
        }
        self.attend(&q, layout, kv, block_size)
    }

    /// Multi-head latent attention (`mla`): the latent and rotary key of each new row into
    /// the cache, then absorbed (decode) or expanded (prefill) attention. `[T, H * v_dim]`.
    fn attend_mla(
        &self,
        m: &MlaWeights,
        x: &[f32],
        layout: &BatchLayout,
        kv: &mut LayerKv,
        block_size: usize,
    ) -> Result<Vec<f32>> {
        let t = layout.num_tokens();
        let first = self.w.qkv.forward(x, t)?;
        let (mut q, mut rows) = m.split(&first, t)?;
        let positions: Vec<(usize, usize)> = layout.row_positions();
        let pos: Vec<usize> = positions.iter().map(|p| p.1).collect();
        m.apply_rope(&self.rope, &mut q, &mut rows, &pos);
        let lat = m.dims.latent_dim();
        for (i, &(si, p)) in positions.iter().enumerate() {
            let slot = slot_of(&layout.seqs[si].block_table, p, block_size)?;
            let dst = slot * lat;
            if dst + lat > kv.k.len() {
                return Err(ModelError::Input(format!(
                    "KV slot {slot} is outside the cache"
                )));
            }
            kv.k[dst..dst + lat].copy_from_slice(&rows[i * lat..(i + 1) * lat]);
        }
        mla_attention(m, &q, layout, kv, block_size, MlaPath::Auto)
    }

    /// Causal attention of every row over its sequence's cached positions `0..=pos` (the
    /// last `window` of them on a sliding-window layer), with the layer's attention sinks if
    /// it has them (`kv::paged_attention_ext`: parallel over sequences x KV heads, SIMD inner
    /// loops).
    fn attend(&self, q: &[f32], layout: &BatchLayout, kv: &LayerKv, bs: usize) -> Result<Vec<f32>> {
        paged_attention_ext(
            q,
            layout,
            kv,
            bs,
            AttnDims {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
            },
            AttnExtras {
                window: self.window,
                sinks: self.w.sinks.as_deref(),
            },
        )
    }

    /// The router's choice for every token: see [`route`].
    fn route(&self, logits: &[f32], t: usize) -> Routing {
        route(
            logits,
            t,
            RouterSpec {
                kind: self.router,
                top_k: self.top_k,
                topk_norm: self.topk_norm,
                scaling: self.routed_scaling_factor,
                correction_bias: self.w.router_bias.as_deref(),
            },
        )
    }
}

/// How one layer's router picks and weighs experts.
#[derive(Debug, Clone, Copy)]
pub struct RouterSpec<'a> {
    pub kind: RouterKind,
    pub top_k: usize,
    pub topk_norm: TopkNorm,
    pub scaling: f32,
    /// `e_score_correction_bias` (noaux_tc routing only).
    pub correction_bias: Option<&'a [f32]>,
}

/// Routes `t` tokens from their router logits (`[t, E]`): scores (softmax or sigmoid), the
/// allowed groups, the top k by (biased) score, then the family's normalisation and scaling.
/// Experts come out by descending selection score, lower index first on ties.
pub fn route(logits: &[f32], t: usize, spec: RouterSpec) -> Routing {
    let k = spec.top_k;
    if t == 0 {
        return Routing {
            top_k: k,
            ids: vec![],
            weights: vec![],
        };
    }
    let e = logits.len() / t;
    let mut ids = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    for row in logits.chunks_exact(e) {
        // `scores` weigh the chosen experts, `choice` chooses them.
        let (scores, mut choice): (Vec<f32>, Vec<f32>) = match spec.kind {
            RouterKind::Softmax | RouterKind::SoftmaxGroupLimited { .. } => {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                let probs: Vec<f32> = exps.iter().map(|x| x / sum).collect();
                (probs.clone(), probs)
            }
            RouterKind::SigmoidNoauxTc { .. } => {
                let s: Vec<f32> = row.iter().map(|x| sigmoid(*x)).collect();
                let c = match spec.correction_bias {
                    Some(b) => s.iter().zip(b).map(|(x, b)| x + b).collect(),
                    None => s.clone(),
                };
                (s, c)
            }
        };
        let groups = match spec.kind {
            RouterKind::Softmax => None,
            RouterKind::SoftmaxGroupLimited {
                n_group,
                topk_group,
            } => Some((n_group, topk_group, 1)),
            RouterKind::SigmoidNoauxTc {
                n_group,
                topk_group,
            } => Some((n_group, topk_group, 2)),
        };
        if let Some((n_group, topk_group, best_of)) = groups {
            // A group's rank: the sum of its `best_of` best choice scores.
            let per = e / n_group.max(1);
            let mut group_score: Vec<(usize, f32)> = choice
                .chunks_exact(per.max(1))
                .map(|g| {
                    let mut v = g.to_vec();
                    v.sort_by(|a, b| b.total_cmp(a));
                    v.iter().take(best_of).sum::<f32>()
                })
                .enumerate()
                .collect();
            group_score.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for &(g, _) in &group_score[topk_group.min(n_group)..] {
                choice[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
            }
        }
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        let top = &order[..k];
        let mut w: Vec<f32> = top.iter().map(|&i| scores[i]).collect();
        match spec.topk_norm {
            TopkNorm::None => {}
            TopkNorm::Sum => {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= s);
            }
            TopkNorm::PNorm(p) => {
                let n: f32 = w.iter().map(|x| x.abs().powf(p)).sum::<f32>().powf(1.0 / p);
                w.iter_mut().for_each(|x| *x /= n);
            }
        }
        if spec.scaling != 1.0 {
            w.iter_mut().for_each(|x| *x *= spec.scaling);
        }
        ids.extend(top.iter().map(|&i| i as u32));
        weights.extend(w);
    }
    Routing {
        top_k: k,
        ids,
        weights,
    }
}

fn slot_of(table: &[u32], pos: usize, bs: usize) -> Result<usize> {
    let b = table.get(pos / bs).ok_or_else(|| {
        ModelError::Input(format!(
            "position {pos} has no KV block (block table has {} blocks of {bs})",
            table.len()
        ))
    })?;
    Ok(*b as usize * bs + pos % bs)
}

/// One token-to-expert assignment inside a dispatch: row of the payload, expert, weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub row: u32,
    pub expert: u32,
    pub weight: f32,
}

/// The FFN side of one layer. `routed[e]` is `None` for experts this process does not hold.
pub struct ExpertStage {
    pub layer: usize,
    pub hidden: usize,
    pub routed: Vec<Option<Arc<GatedMlp>>>,
    /// Qwen2-MoE's shared expert (runs on every token).
    pub shared: Option<SharedExpert>,
    /// The MLP of a dense (non-MoE) layer.
    pub dense: Option<GatedMlp>,
}

impl ExpertStage {
    /// The routed part: x `[n, D]` (the dispatched rows) and their assignments -> `[n, D]`,
    /// row r = sum over its assignments of `weight * expert(x[r])`. Each expert runs once on
    /// all of its rows.
    pub fn forward_routed(&self, x: &Tensor, assignments: &[Assignment]) -> Result<Tensor> {
        let d = self.hidden;
        let xs = with_slice(x, |s| s.to_vec())?;
        let n = xs.len() / d;
        let out = routed_ffn(&xs, n, d, assignments, |e| {
            self.routed.get(e as usize).and_then(|m| m.as_deref())
        })?;
        from_vec(out, n, d)
    }

    /// The always-on part: shared expert (gated) or dense MLP, x `[T, D]` -> `[T, D]`;
    /// `None` where the layer has neither.
    pub fn forward_shared(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.shared.is_none() && self.dense.is_none() {
            return Ok(None);
        }
        let d = self.hidden;
        let xs = with_slice(x, |s| s.to_vec())?;
        let t = xs.len() / d;
        let out = if let Some(mlp) = &self.dense {
            mlp.forward(&xs, t)?
        } else if let Some(sh) = &self.shared {
            let mut y = sh.mlp.forward(&xs, t)?;
            if let Some(g) = &sh.gate {
                let gl = g.forward(&xs, t)?; // [T, 1]
                for (row, gv) in y.chunks_exact_mut(d).zip(&gl) {
                    let s = sigmoid(*gv);
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            y
        } else {
            unreachable!("checked above")
        };
        Ok(Some(from_vec(out, t, d)?))
    }

    /// Bytes of expert weights read when the given experts run.
    pub fn routed_bytes(&self, experts: impl Iterator<Item = u32>) -> usize {
        experts
            .filter_map(|e| self.routed.get(e as usize).and_then(|m| m.as_ref()))
            .map(|m| m.weight_bytes())
            .sum()
    }

    pub fn shared_bytes(&self) -> usize {
        self.dense.as_ref().map_or(0, |m| m.weight_bytes())
            + self.shared.as_ref().map_or(0, |s| {
                s.mlp.weight_bytes() + s.gate.as_ref().map_or(0, |g| g.weight_bytes())
            })
    }
}

/// Groups `assignments` by expert, runs each expert on its gathered rows of `x` `[n, d]`,
/// and accumulates `weight * out` per row.
///
/// The experts run side by side on the rayon pool (each product still splits its own tiles,
/// which idle threads steal): at batch 1 with top-8 routing a layer is then one fork/join
/// instead of two per expert, the cost that decode at 128 experts paid ~1000 times a token.
/// The outputs are summed in expert order afterwards, so the result does not depend on which
/// thread ran what.
pub fn routed_ffn<'a>(
    x: &[f32],
    n: usize,
    d: usize,
    assignments: &[Assignment],
    expert: impl Fn(u32) -> Option<&'a GatedMlp> + Sync,
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let mut by_expert: std::collections::BTreeMap<u32, Vec<(u32, f32)>> = Default::default();
    for a in assignments {
        if a.row as usize >= n {
            return Err(ModelError::Input(format!(
                "assignment row {} outside {n} rows",
                a.row
            )));
        }
        by_expert
            .entry(a.expert)
            .or_default()
            .push((a.row, a.weight));
    }
    let groups = by_expert
        .into_iter()
        .map(|(e, rows)| {
            expert(e)
                .map(|mlp| (mlp, rows))
                .ok_or_else(|| ModelError::Input(format!("expert {e} is not held by this worker")))
        })
        .collect::<Result<Vec<_>>>()?;
    let run = |(mlp, rows): &(&GatedMlp, Vec<(u32, f32)>)| {
        let mut xb = Vec::with_capacity(rows.len() * d);
        for (r, _) in rows {
            let r = *r as usize;
            xb.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        mlp.forward(&xb, rows.len())
    };
    let ys = if groups.len() > 1 && rayon::current_num_threads() > 1 {
        groups.par_iter().map(run).collect::<Result<Vec<_>>>()?
    } else {
        groups.iter().map(run).collect::<Result<Vec<_>>>()?
    };
    let mut out = vec![0f32; n * d];
    for ((_, rows), y) in groups.iter().zip(&ys) {
        for ((r, w), yr) in rows.iter().zip(y.chunks_exact(d)) {
            let o = &mut out[*r as usize * d..(*r as usize + 1) * d];
            for (ov, yv) in o.iter_mut().zip(yr) {
                *ov += w * yv;
            }
        }
    }
    Ok(out)
}
