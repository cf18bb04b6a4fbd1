//! DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`) and DeepSeek-V3 (`DeepseekV3ForCausalLM`,
//! also the layout of Kimi-K2-style checkpoints): multi-head latent attention (`crate::mla`:
//! optional q LoRA, a `kv_lora_rank` latent plus a decoupled rotary key, the cache holding
//! only those), interleaved rotary pairs, YaRN with its softmax-scale correction, shared
//! experts, the first `first_k_dense_replace` layers dense, and the routers:
//! - V2: softmax, `topk_method` `greedy` or `group_limited_greedy` (`n_group`, `topk_group`);
//! - V3: sigmoid scores, `e_score_correction_bias` for the choice only, `noaux_tc` grouped
//!   top-k, `norm_topk_prob`;
//!
//! both scaled by `routed_scaling_factor`. Multi-token-prediction layers (stored after the
//! last layer) are not loaded.

use super::{deepseek_style_shared, linear, linear_as, linear_b, norm_eps, AttentionWeights};
use super::{FamilyWeights, SharedExpert};
use crate::config::{
    check_silu, yarn_mscale, Family, Mla, ModelConfig, NormKind, ParseCx, QkNorm, RouterKind,
    TopkNorm,
};
use crate::error::Result;
use crate::layers::{GatedMlp, Linear};
use crate::mla::MlaWeights;
use crate::weights::{Role, Weights};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct DeepseekConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub n_routed_experts: Option<usize>,
    /// transformers 5 may write these names.
    pub num_local_experts: Option<usize>,
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub topk_method: Option<String>,
    pub scoring_func: Option<String>,
    #[serde(default = "super::one_f")]
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "super::one")]
    pub moe_layer_freq: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rope_interleave: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub num_nextn_predict_layers: Option<usize>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
}

fn default_max_pos() -> usize {
    4096
}
fn default_eps() -> f64 {
    1e-6
}

/// The router `scoring_func` and `topk_method` describe: DeepSeek-V3's sigmoid with
/// `noaux_tc` (grouped or not), V2's softmax (greedy or group-limited); anything else is
/// refused by name.
fn router(c: &DeepseekConfig, cx: &ParseCx, v3: bool) -> Result<RouterKind> {
    let groups = || -> Result<(usize, usize)> {
        match (c.n_group, c.topk_group) {
            (Some(n), Some(k)) => Ok((n, k)),
            _ => Err(cx.err(format!(
                "topk_method {:?} needs n_group and topk_group",
                c.topk_method.as_deref().unwrap_or("noaux_tc")
            ))),
        }
    };
    Ok(if v3 {
        match c.scoring_func.as_deref() {
            None | Some("sigmoid") => {}
            Some(other) => {
                return Err(cx.unsupported(format!(
                    "scoring_func: {other:?} is not implemented for DeepSeek-V3 (only \"sigmoid\")"
                )))
            }
        }
        match c.topk_method.as_deref() {
            None | Some("noaux_tc") => {
                let (n_group, topk_group) = match (c.n_group, c.topk_group) {
                    (None, None) => (1, 1),
                    _ => groups()?,
                };
                RouterKind::SigmoidNoauxTc {
                    n_group,
                    topk_group,
                }
            }
            Some(other) => {
                return Err(cx.unsupported(format!(
                    "topk_method: {other:?} is not implemented for DeepSeek-V3 (only \"noaux_tc\")"
                )))
            }
        }
    } else {
        match c.scoring_func.as_deref() {
            None | Some("softmax") => {}
            Some(other) => {
                return Err(cx.unsupported(format!(
                    "scoring_func: {other:?} is not implemented for DeepSeek-V2 (only \"softmax\")"
                )))
            }
        }
        match c.topk_method.as_deref() {
            None | Some("greedy") => RouterKind::Softmax,
            Some("group_limited_greedy") => {
                let (n_group, topk_group) = groups()?;
                RouterKind::SoftmaxGroupLimited {
                    n_group,
                    topk_group,
                }
            }
            Some(other) => {
                return Err(cx.unsupported(format!(
                    "topk_method: {other:?} is not implemented for DeepSeek-V2 (only \"greedy\" \
                     and \"group_limited_greedy\")"
                )))
            }
        }
    })
}

pub fn parse(v: &Value, cx: &ParseCx, family: Family) -> Result<ModelConfig> {
    let c: DeepseekConfig = cx.typed(v)?;
    check_silu(cx, c.hidden_act.as_deref())?;
    let v3 = family == Family::DeepseekV3;
    let heads = c.num_attention_heads;
    let num_experts = c
        .n_routed_experts
        .or(c.num_local_experts)
        .or(c.num_experts)
        .ok_or_else(|| cx.err("n_routed_experts is not set".into()))?;
    if c.mlp_bias {
        return Err(cx.unsupported("mlp_bias = true is not implemented".into()));
    }
    if c.moe_layer_freq != 1 {
        return Err(cx.unsupported(format!(
            "moe_layer_freq = {}: only every layer after first_k_dense_replace being MoE (1) is \
             implemented",
            c.moe_layer_freq
        )));
    }
    let router = router(&c, cx, v3)?;
    // transformers' DeepSeek-V2 never renormalises the top-k weights; V3 does by default.
    let topk_norm = if v3 && c.norm_topk_prob.unwrap_or(true) {
        TopkNorm::Sum
    } else {
        TopkNorm::None
    };
    if let Some(n) = c.num_nextn_predict_layers.filter(|n| *n > 0) {
        tracing::info!(
            "{}: num_nextn_predict_layers = {n}: multi-token-prediction layers are not loaded (tandem decodes one token per step)",
            cx.path.display()
        );
    }
    let rope = cx.rope_with_yarn(v, c.rope_theta, 10000.0, c.max_position_embeddings)?;
    let mla = Mla {
        q_lora_rank: c.q_lora_rank.filter(|r| *r > 0),
        kv_lora_rank: c.kv_lora_rank,
        qk_nope_head_dim: c.qk_nope_head_dim,
        qk_rope_head_dim: c.qk_rope_head_dim,
        v_head_dim: c.v_head_dim,
    };
    for (k, x) in [
        ("kv_lora_rank", c.kv_lora_rank),
        ("qk_rope_head_dim", c.qk_rope_head_dim),
        ("v_head_dim", c.v_head_dim),
    ] {
        if x == 0 {
            return Err(cx.err(format!("{k} must be positive")));
        }
    }
    Ok(ModelConfig {
        family,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: heads,
        // every head has its own keys and values (expanded from the shared latent)
        num_kv_heads: heads,
        head_dim: c.qk_rope_head_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms,
        norm_eps: c.rms_norm_eps as f32,
        rope_theta: rope.theta,
        rotary_dim: c.qk_rope_head_dim,
        rope_interleaved: !v3 || c.rope_interleave.unwrap_or(true),
        yarn: rope.yarn,
        mla: Some(mla),
        sliding_window: None,
        expert_act: Default::default(),
        qkv_bias: c.attention_bias,
        clip_qkv: None,
        qk_norm: QkNorm::None,
        num_experts,
        top_k: c.num_experts_per_tok,
        moe_intermediate_size: c.moe_intermediate_size,
        topk_norm,
        router,
        routed_scaling_factor: c.routed_scaling_factor as f32,
        shared_expert_intermediate_size: c
            .n_shared_experts
            .map(|n| n * c.moe_intermediate_size)
            .filter(|s| *s > 0),
        dense_intermediate_size: c.intermediate_size,
        dense_layers: (0..c.num_hidden_layers)
            .map(|l| l < c.first_k_dense_replace)
            .collect(),
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_ids: cx.eos_ids(v),
    })
}

/// The softmax scale of MLA: `qk_head_dim^-1/2`, times YaRN's `mscale(factor,
/// mscale_all_dim)^2` when both are set.
pub fn mla_scale(cfg: &ModelConfig, m: &Mla) -> f32 {
    let mut s = 1.0 / (m.qk_head_dim() as f64).sqrt();
    if let Some(y) = &cfg.yarn {
        if let Some(ma) = y.mscale_all_dim.filter(|x| *x != 0.0) {
            let ms = yarn_mscale(y.factor, ma);
            s *= ms * ms;
        }
    }
    s as f32
}

pub struct Names;

impl FamilyWeights for Names {
    fn attention(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<AttentionWeights> {
        let m = cfg.mla.expect("DeepSeek configs always have MLA");
        let d = cfg.hidden_size;
        let h = cfg.num_heads;
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        let biased = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            if cfg.qkv_bias {
                linear_b(w, name, out, inp)
            } else {
                linear(w, name, out, inp)
            }
        };
        let (q_first, q_a_norm, q_b) = match m.q_lora_rank {
            Some(r) => (
                biased(&format!("{a}.q_a_proj"), r, d)?,
                Some(norm_eps(w, &format!("{a}.q_a_layernorm"), r, 1e-6)?),
                Some(linear(w, &format!("{a}.q_b_proj"), h * m.qk_head_dim(), r)?),
            ),
            None => (
                linear(w, &format!("{a}.q_proj"), h * m.qk_head_dim(), d)?,
                None,
                None,
            ),
        };
        let kv_a = biased(&format!("{a}.kv_a_proj_with_mqa"), m.latent_dim(), d)?;
        let kv_b_rows_n = h * (m.qk_nope_head_dim + m.v_head_dim);
        let kv_b = linear(w, &format!("{a}.kv_b_proj"), kv_b_rows_n, m.kv_lora_rank)?;
        let kv_b_rows = kv_b.w.unpack();
        let moe = cfg.is_moe_layer(l);
        Ok(AttentionWeights {
            input_norm: super::norm(w, cfg, &format!("{p}.input_layernorm"), d)?,
            qkv: Linear::concat(&[q_first, kv_a])?,
            o: biased(&format!("{a}.o_proj"), d, h * m.v_head_dim)?,
            q_norm: None,
            k_norm: None,
            post_norm: super::norm(w, cfg, &format!("{p}.post_attention_layernorm"), d)?,
            router: if moe {
                Some(linear_as(
                    w,
                    &format!("{p}.mlp.gate"),
                    cfg.num_experts,
                    d,
                    Role::Router,
                )?)
            } else {
                None
            },
            router_bias: if moe && matches!(cfg.router, RouterKind::SigmoidNoauxTc { .. }) {
                Some(w.get_vec(
                    &format!("{p}.mlp.gate.e_score_correction_bias"),
                    &[cfg.num_experts],
                )?)
            } else {
                None
            },
            mla: Some(MlaWeights {
                dims: m,
                num_heads: h,
                q_a_norm,
                q_b,
                kv_a_norm: norm_eps(w, &format!("{a}.kv_a_layernorm"), m.kv_lora_rank, 1e-6)?,
                kv_b,
                kv_b_rows,
                scale: mla_scale(cfg, &m),
            }),
            sinks: None,
        })
    }
    fn expert(&self, w: &Weights, cfg: &ModelConfig, l: usize, e: usize) -> Result<GatedMlp> {
        super::mlp_expert(w, cfg, l, e)
    }
    fn shared_expert(
        &self,
        w: &Weights,
        cfg: &ModelConfig,
        l: usize,
    ) -> Result<Option<SharedExpert>> {
        deepseek_style_shared(w, cfg, l)
    }
    fn dense_mlp(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
        super::mlp_dense(w, cfg, l)
    }
}
