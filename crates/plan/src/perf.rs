//! The performance model: per-layer stage times of the ping-pong pipeline.
//!
//! Two sources implement [`StageModel`]: [`Roofline`] (catalog peak numbers times efficiency
//! factors, for hardware we cannot touch) and [`crate::profile::ProfileModel`] (linear fits
//! `T_a = k1 b_a + k2`, `T_e = k3 b_e + k4` and a `Util(size)` table measured on real
//! hardware by `tandem profile`).
//!
//! Units: seconds, bytes, FLOPs; `b_a` is sequences (= tokens in decoding) per micro-batch
//! per attention replica, `tokens` per expert per micro-batch.

use crate::closed_form::{self, LatencyUtil, StageTimes};
use crate::error::{PlanError, Result};
use crate::hardware::{Efficiency, Hardware, HardwareCatalog};
use crate::model::ModelShape;
use serde::Serialize;

/// Per-layer stage times for one hardware pair and one model.
pub trait StageModel {
    /// `T_a`, seconds: one micro-batch of `b_a` sequences through one MoE layer's attention
    /// stage on one replica of `tp_a` GPUs. Includes the dense layers' and the LM head's work
    /// amortised over the MoE layers.
    fn attention_s(&self, tp_a: u32, b_a: f64) -> Result<f64>;
    /// `T_e`, seconds: one expert worker of `tp_e` GPUs runs one layer of its experts;
    /// `tokens[i]` tokens (may be fractional in the balanced model) go to its `i`-th expert.
    fn expert_s(&self, tp_e: u32, tokens: &[f64]) -> Result<f64>;
    /// [`Self::expert_s`] for `count` experts that all get `tokens` tokens.
    fn expert_balanced_s(&self, tp_e: u32, count: u32, tokens: f64) -> Result<f64>;
    /// One side of Eq. 6: seconds for an attention GPU to send (or receive) `bytes`.
    fn attention_link_s(&self, bytes: f64) -> f64;
    /// One side of Eq. 6: seconds for an expert GPU to send (or receive) `bytes`.
    fn expert_link_s(&self, bytes: f64) -> f64;
    /// Bytes per hidden-state element on the wire.
    fn wire_elem_bytes(&self) -> f64;
    /// Tensor-parallel degrees this source can price (None = any).
    fn attention_tps(&self) -> Option<Vec<u32>> {
        None
    }
    fn expert_tps(&self) -> Option<Vec<u32>> {
        None
    }
    /// Where the numbers come from, for reports.
    fn describe(&self) -> String;
}

/// The shape of one disaggregated deployment, as far as stage times go.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PipelineShape {
    /// Tensor parallelism inside an attention replica.
    pub tp_a: u32,
    /// `n_a`: attention replicas.
    pub n_a: u32,
    /// Tensor parallelism inside an expert worker.
    pub tp_e: u32,
    /// Routed experts held by one expert worker (the paper: 1).
    pub experts_per_worker: u32,
    /// `m`: micro-batches.
    pub m: u32,
    /// `b_a`: sequences per micro-batch per replica.
    pub b_a: f64,
}

impl PipelineShape {
    /// `N`: expert workers.
    pub fn expert_workers(&self, model: &ModelShape) -> u32 {
        (model.num_experts as u32).div_ceil(self.experts_per_worker.max(1))
    }
    /// `b_e`: tokens per expert per micro-batch (token conservation).
    pub fn tokens_per_expert(&self, model: &ModelShape) -> f64 {
        closed_form::tokens_per_expert(self.b_a, self.n_a, model.top_k, model.num_experts)
    }
    /// `B`: sequences in flight over all replicas and micro-batches.
    pub fn global_batch(&self) -> f64 {
        self.b_a * self.m as f64 * self.n_a as f64
    }
}

/// Dispatch bytes one attention GPU sends per micro-batch per layer: `b_a h K / tp_a`.
pub fn dispatch_bytes_per_attention_gpu(model: &ModelShape, tp_a: u32, b_a: f64, eb: f64) -> f64 {
    b_a * model.hidden_size as f64 * model.top_k as f64 / tp_a as f64 * eb
}

/// Bytes one expert GPU receives per micro-batch per layer: `tokens h / tp_e`.
pub fn bytes_per_expert_gpu(model: &ModelShape, tp_e: u32, worker_tokens: f64, eb: f64) -> f64 {
    worker_tokens * model.hidden_size as f64 / tp_e as f64 * eb
}

/// `T_a`, `T_e`, `T_c` of a balanced deployment (every expert gets `b_e` tokens).
pub fn stage_times(
    sm: &dyn StageModel,
    model: &ModelShape,
    p: &PipelineShape,
) -> Result<StageTimes> {
    stage_times_loaded(sm, model, p, 1.0)
}

/// `T_a`, `T_e`, `T_c` when the busiest expert worker gets `load_factor` times the mean
/// tokens (max / mean load; 1 = balanced). Every layer waits for that worker, so its time
/// is the expert stage's, and its bytes are the expert side of Eq. 6.
pub fn stage_times_loaded(
    sm: &dyn StageModel,
    model: &ModelShape,
    p: &PipelineShape,
    load_factor: f64,
) -> Result<StageTimes> {
    let b_e = p.tokens_per_expert(model) * load_factor.max(1.0);
    let t_a = sm.attention_s(p.tp_a, p.b_a)?;
    let t_e = sm.expert_balanced_s(p.tp_e, p.experts_per_worker, b_e)?;
    let eb = sm.wire_elem_bytes();
    let s_a = dispatch_bytes_per_attention_gpu(model, p.tp_a, p.b_a, eb);
    let s_e = bytes_per_expert_gpu(model, p.tp_e, b_e * p.experts_per_worker as f64, eb);
    let t_c = sm.attention_link_s(s_a).max(sm.expert_link_s(s_e));
    Ok(StageTimes {
        t_a_s: t_a,
        t_e_s: t_e,
        t_c_s: t_c,
    })
}

/// Roofline time of one kernel, seconds: `max(flops / peak, bytes / bandwidth)`.
pub fn roof_s(flops: f64, bytes: f64, peak_flops: f64, bw_bytes_s: f64) -> f64 {
    (flops / peak_flops).max(bytes / bw_bytes_s)
}

/// Roofline with efficiency factors, from catalog numbers.
#[derive(Debug, Clone)]
pub struct Roofline {
    pub model: ModelShape,
    pub attention_hw: Hardware,
    pub expert_hw: Hardware,
    pub attention_eff: Efficiency,
    pub expert_eff: Efficiency,
    /// Tokens of context per sequence whose KV the attention stage reads.
    pub context_tokens: f64,
}

/// Bytes moved and FLOPs of one device-side kernel group.
struct Dev<'a> {
    hw: &'a Hardware,
    eff: Efficiency,
}

impl Dev<'_> {
    fn peak(&self) -> f64 {
        self.hw.peak_flops() * self.eff.gemm
    }
    fn bw(&self) -> f64 {
        self.hw.mem_bw_bytes_s() * self.eff.memory
    }
    fn roof(&self, flops: f64, bytes: f64) -> f64 {
        roof_s(flops, bytes, self.peak(), self.bw())
    }
    /// Ring all-reduce of `bytes` over `tp` GPUs of a node, seconds.
    fn all_reduce_s(&self, tp: u32, bytes: f64) -> f64 {
        if tp <= 1 {
            return 0.0;
        }
        let t = tp as f64;
        2.0 * (t - 1.0) / t * bytes / (self.hw.intra_link_bytes_s() * self.eff.intra_link)
            + self.eff.collective_latency_us * 1e-6
    }
    /// Reduce-scatter of `bytes` over `tp` GPUs of a node, seconds.
    fn reduce_scatter_s(&self, tp: u32, bytes: f64) -> f64 {
        if tp <= 1 {
            return 0.0;
        }
        let t = tp as f64;
        (t - 1.0) / t * bytes / (self.hw.intra_link_bytes_s() * self.eff.intra_link)
            + self.eff.collective_latency_us * 1e-6
    }
    fn overhead_s(&self) -> f64 {
        self.eff.stage_overhead_us * 1e-6
    }
    fn util(&self) -> LatencyUtil {
        LatencyUtil {
            peak: self.eff.nic_peak_util,
            half_size_bytes: self.hw.nic_bytes_s() * self.eff.nic_latency_us * 1e-6,
        }
    }
}

impl Roofline {
    /// A roofline for `model` with attention on `attention_hw` and experts on `expert_hw`,
    /// efficiency factors from the catalog.
    pub fn new(
        catalog: &HardwareCatalog,
        model: &ModelShape,
        attention_hw: &Hardware,
        expert_hw: &Hardware,
        context_tokens: f64,
    ) -> Self {
        Self {
            model: model.clone(),
            attention_hw: attention_hw.clone(),
            expert_hw: expert_hw.clone(),
            attention_eff: catalog.efficiency(attention_hw),
            expert_eff: catalog.efficiency(expert_hw),
            context_tokens,
        }
    }

    fn a(&self) -> Dev<'_> {
        Dev {
            hw: &self.attention_hw,
            eff: self.attention_eff,
        }
    }
    fn e(&self) -> Dev<'_> {
        Dev {
            hw: &self.expert_hw,
            eff: self.expert_eff,
        }
    }

    /// Attention-side work of one whole decode step for `b` sequences on `tp` GPUs of `dev`,
    /// divided by the MoE layers: seconds per pipeline layer (no stage overhead).
    fn attention_work_s(&self, dev: &Dev<'_>, tp: u32, b: f64) -> f64 {
        let m = &self.model;
        let eb = dev.hw.elem_bytes();
        let tpf = tp as f64;
        let l = m.num_layers as f64;
        let lm = m.moe_layers() as f64;
        let ld = m.num_dense_layers as f64;
        let h = m.hidden_size as f64;
        // Dense GEMMs of the whole step, elements per GPU: attention projections of every
        // layer, routers and shared experts of the MoE layers, dense FFNs, LM head.
        let w_step = (l * m.attn_params_per_layer()
            + lm * (m.router_params_per_layer() + m.shared_params_per_layer())
            + ld * m.dense_ffn_params_per_layer()
            + m.lm_head_params())
            / tpf;
        // Per GEMM group: weights read once, activations (in + out, [b, h]) read/written.
        let gemm = dev.roof(2.0 * b * w_step, w_step * eb + l * 4.0 * b * h * eb);
        // Attention core: every layer reads the KV of `context_tokens` tokens per sequence.
        let shards = (tp as u64).min(m.kv_shardable()).max(1) as f64;
        let kv_bytes = l * b * self.context_tokens * m.kv_elems_per_token_layer() * eb / shards;
        let core_flops = l * b * self.context_tokens * m.attn_core_flops_per_pair() / tpf;
        let core = dev.roof(core_flops, kv_bytes);
        // Row-parallel outputs need an all-reduce of [b, h]: one per layer for attention,
        // one more per dense layer.
        let ar = (l + ld) * dev.all_reduce_s(tp, b * h * eb);
        (gemm + core + ar) / lm
    }

    /// One routed expert with `t` tokens on `tp` GPUs of `dev`, seconds (no overhead).
    fn one_expert_s(&self, dev: &Dev<'_>, tp: u32, t: f64) -> f64 {
        if t <= 0.0 {
            return 0.0;
        }
        let m = &self.model;
        let eb = dev.hw.elem_bytes();
        let h = m.hidden_size as f64;
        let hi = m.expert_intermediate as f64;
        let w = m.expert_params_per_layer() / tp as f64;
        let act = t * (2.0 * h + 4.0 * hi / tp as f64) * eb;
        dev.roof(2.0 * t * w, w * eb + act)
    }

    fn experts_s(&self, dev: &Dev<'_>, tp: u32, tokens: &[f64]) -> f64 {
        let eb = dev.hw.elem_bytes();
        let h = self.model.hidden_size as f64;
        let gemm: f64 = tokens.iter().map(|&t| self.one_expert_s(dev, tp, t)).sum();
        let total: f64 = tokens.iter().sum();
        // Row-parallel FFN-out leaves partial sums; reduce-scatter so each GPU sends its
        // 1/tp slice (the `b_e h / tp_e` of Eq. 6).
        gemm + dev.reduce_scatter_s(tp, total * h * eb)
    }

    /// Colocated baseline, seconds per MoE layer: one replica of `tp` GPUs on the attention
    /// hardware holds attention and all experts and runs a batch of `b` sequences. Experts
    /// are spread by TP/EP over the same GPUs, so each GPU reads `1/tp` of every touched
    /// expert; a full all-reduce (reduce-scatter + all-gather) closes the MoE block.
    pub fn colocated_layer_s(&self, tp: u32, b: f64) -> f64 {
        let dev = self.a();
        let m = &self.model;
        let e = m.num_experts as f64;
        let per_expert = b * m.top_k as f64 / e;
        let eb = dev.hw.elem_bytes();
        let h = m.hidden_size as f64;
        let experts =
            e * self.one_expert_s(&dev, tp, per_expert) + dev.all_reduce_s(tp, b * h * eb);
        self.attention_work_s(&dev, tp, b) + experts + 2.0 * dev.overhead_s()
    }
}

impl StageModel for Roofline {
    fn attention_s(&self, tp_a: u32, b_a: f64) -> Result<f64> {
        let dev = self.a();
        Ok(self.attention_work_s(&dev, tp_a, b_a) + dev.overhead_s())
    }

    fn expert_s(&self, tp_e: u32, tokens: &[f64]) -> Result<f64> {
        let dev = self.e();
        Ok(self.experts_s(&dev, tp_e, tokens) + dev.overhead_s())
    }

    fn expert_balanced_s(&self, tp_e: u32, count: u32, tokens: f64) -> Result<f64> {
        let dev = self.e();
        let eb = dev.hw.elem_bytes();
        let h = self.model.hidden_size as f64;
        let c = count as f64;
        Ok(c * self.one_expert_s(&dev, tp_e, tokens)
            + dev.reduce_scatter_s(tp_e, c * tokens * h * eb)
            + dev.overhead_s())
    }

    fn attention_link_s(&self, bytes: f64) -> f64 {
        let dev = self.a();
        closed_form::transfer_s(bytes, dev.hw.nic_bytes_s(), &dev.util())
    }

    fn expert_link_s(&self, bytes: f64) -> f64 {
        let dev = self.e();
        closed_form::transfer_s(bytes, dev.hw.nic_bytes_s(), &dev.util())
    }

    fn wire_elem_bytes(&self) -> f64 {
        self.attention_hw.elem_bytes()
    }

    fn describe(&self) -> String {
        format!(
            "roofline: attention {} (gemm {:.2}, memory {:.2}), experts {} (gemm {:.2}, memory {:.2}), context {} tokens",
            self.attention_hw.name,
            self.attention_eff.gemm,
            self.attention_eff.memory,
            self.expert_hw.name,
            self.expert_eff.gemm,
            self.expert_eff.memory,
            self.context_tokens
        )
    }
}

/// The paper's linear performance model fitted to any stage model over `b` in
/// `[b_max / 16, b_max]`: `(k1, k2)` for attention at `tp_a`, `(k3, k4)` for one expert at `tp_e`.
pub fn fit_linear(
    sm: &dyn StageModel,
    tp_a: u32,
    tp_e: u32,
    b_max: f64,
) -> Result<((f64, f64), (f64, f64))> {
    if b_max.is_nan() || b_max < 2.0 {
        return Err(PlanError::Invalid(format!(
            "fit range b_max {b_max} must be >= 2"
        )));
    }
    // Evenly spaced in b: the fit is for the operating range (tens to hundreds of
    // sequences), where the roofline is linear; below the ridge it is flat.
    let xs: Vec<f64> = (1..=16)
        .map(|i| (b_max * i as f64 / 16.0).round().max(1.0))
        .collect();
    let mut pa = Vec::with_capacity(xs.len());
    let mut pe = Vec::with_capacity(xs.len());
    for &x in &xs {
        pa.push((x, sm.attention_s(tp_a, x)?));
        pe.push((x, sm.expert_balanced_s(tp_e, 1, x)?));
    }
    Ok((closed_form::fit_line(&pa), closed_form::fit_line(&pe)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelCatalog;

    fn roof(model: &str, a: &str, e: &str) -> Roofline {
        let c = HardwareCatalog::builtin().unwrap();
        let m = ModelCatalog::builtin().unwrap().resolve(model).unwrap();
        Roofline::new(&c, &m, c.get(a).unwrap(), c.get(e).unwrap(), 730.0)
    }

    #[test]
    fn attention_is_memory_bound_and_grows_with_batch_and_context() {
        let r = roof("mixtral", "A800", "A800");
        let t1 = r.attention_s(2, 1.0).unwrap();
        let t256 = r.attention_s(2, 256.0).unwrap();
        assert!(t256 > t1);
        // Hand check at b = 256, tp = 2: KV bytes per GPU = 56 * 256 * 730 * 2048 * 2 / 2
        // = 21.43 GB over 56 layers = 382.7 MB per layer at 2039e9 * 0.8 B/s = 234.6 us.
        let kv = 56.0 * 256.0 * 730.0 * 2048.0 * 2.0 / 2.0 / 56.0 / (2039e9 * 0.8);
        assert!(t256 > kv && t256 < kv + 200e-6, "{t256} vs kv {kv}");
        let mut long = r.clone();
        long.context_tokens = 4096.0;
        assert!(long.attention_s(2, 256.0).unwrap() > 4.0 * kv);
    }

    #[test]
    fn expert_roofline_memory_then_compute_bound() {
        let r = roof("mixtral", "A800", "A800");
        // One token: weights dominate: 3 * 6144 * 16384 * 2 B / (2039e9 * 0.8) = 370.3 us.
        let w = 3.0 * 6144.0 * 16384.0 * 2.0 / (2039e9 * 0.8);
        let t1 = r.expert_balanced_s(1, 1, 1.0).unwrap() - 20e-6;
        assert!((t1 - w).abs() / w < 0.01, "{t1} vs {w}");
        // 1024 tokens: compute: 2 * 1024 * 302M / (312e12 * 0.7) = 2.83 ms.
        let c = 2.0 * 1024.0 * 3.0 * 6144.0 * 16384.0 / (312e12 * 0.7);
        let t = r.expert_balanced_s(1, 1, 1024.0).unwrap() - 20e-6;
        assert!((t - c).abs() / c < 0.01, "{t} vs {c}");
        // The list form agrees with the balanced fast path.
        let a = r.expert_s(2, &[100.0, 100.0]).unwrap();
        let b = r.expert_balanced_s(2, 2, 100.0).unwrap();
        assert!((a - b).abs() < 1e-12);
        // An expert with no tokens reads no weights.
        assert!(r.expert_s(1, &[0.0]).unwrap() < 30e-6);
    }

    #[test]
    fn stage_times_use_eq6() {
        let r = roof("mixtral", "H20", "L40S");
        let m = r.model.clone();
        let p = PipelineShape {
            tp_a: 2,
            n_a: 4,
            tp_e: 1,
            experts_per_worker: 1,
            m: 3,
            b_a: 128.0,
        };
        let t = stage_times(&r, &m, &p).unwrap();
        // Attention GPU sends 128 * 6144 * 2 / 2 * 2 B = 1.57 MB at 25 GB/s; the expert GPU
        // receives b_e = 128 tokens * 6144 * 2 B = 1.57 MB at 12.5 GB/s: the expert side binds.
        let want = r.expert_link_s(1_572_864.0);
        assert!((t.t_c_s - want).abs() < 1e-15);
        let raw = 1_572_864.0 / 12.5e9;
        assert!(t.t_c_s > raw / 0.9 && t.t_c_s < raw / 0.9 + 11e-6 / 0.9 + 1e-9);
    }

    #[test]
    fn colocated_reads_every_expert() {
        let r = roof("mixtral", "A800", "A800");
        let t = r.colocated_layer_s(8, 1.0);
        // 8 experts * 302M * 2 B / 8 GPUs = 604 MB per GPU -> >= 370 us.
        assert!(t > 370e-6, "{t}");
    }

    #[test]
    fn linear_fit_recovers_a_line() {
        let r = roof("dbrx", "A800", "A800");
        let ((k1, k2), (k3, k4)) = fit_linear(&r, 2, 1, 512.0).unwrap();
        assert!(k1 > 0.0 && k2 > 0.0 && k3 > 0.0 && k4 > 0.0);
        assert!(fit_linear(&r, 2, 1, 1.0).is_err());
    }
}
