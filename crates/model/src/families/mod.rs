//! One file per model family: the serde struct of its `config.json` at the top, its conversion
//! into [`ModelConfig`](crate::config::ModelConfig), and the names of its tensors. The shared
//! loaders below turn names into the building blocks of `layers`.

pub mod dbrx;
pub mod deepseek;
pub mod glm4_moe;
pub mod gpt_oss;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;

use crate::config::{Family, ModelConfig, NormKind};
use crate::error::Result;
use crate::layers::{GatedMlp, Linear, Norm};
use crate::weights::{Role, Weights};

/// Weights of one layer's attention stage (everything that runs on an attention replica).
#[derive(Clone)]
pub struct AttentionWeights {
    pub input_norm: Norm,
    /// q, k, v stacked: `[(H + 2 KV) * Dh, D]`.
    pub qkv: Linear,
    /// `[D, H * Dh]`.
    pub o: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub post_norm: Norm,
    /// Router `[E, D]`; `None` on dense layers.
    pub router: Option<Linear>,
    /// `e_score_correction_bias` `[E]` of noaux_tc routers (added for the choice only).
    pub router_bias: Option<Vec<f32>>,
    /// Multi-head latent attention; `qkv` then holds its fused first projection.
    pub mla: Option<crate::mla::MlaWeights>,
    /// Attention sinks `[H]` (GPT-OSS): one learned logit per query head in the softmax's
    /// denominator.
    pub sinks: Option<Vec<f32>>,
}

/// Qwen2-MoE's shared expert: an always-on FFN scaled by `sigmoid(gate(x))`.
#[derive(Clone)]
pub struct SharedExpert {
    pub mlp: GatedMlp,
    /// `[1, D]`
    pub gate: Option<Linear>,
}

/// Tensor names and layout of one family.
pub trait FamilyWeights {
    /// Embedding, final norm and lm_head names; the defaults are the Llama layout.
    fn embed(&self) -> String {
        "model.embed_tokens.weight".into()
    }
    fn final_norm(&self) -> String {
        "model.norm".into()
    }
    fn lm_head(&self) -> String {
        "lm_head".into()
    }
    fn attention(&self, w: &Weights, cfg: &ModelConfig, layer: usize) -> Result<AttentionWeights>;
    fn expert(&self, w: &Weights, cfg: &ModelConfig, layer: usize, e: usize) -> Result<GatedMlp>;
    /// Several experts of one layer (families that store experts stacked read them once).
    fn experts(
        &self,
        w: &Weights,
        cfg: &ModelConfig,
        layer: usize,
        ids: &[usize],
    ) -> Result<Vec<GatedMlp>> {
        ids.iter().map(|&e| self.expert(w, cfg, layer, e)).collect()
    }
    fn shared_expert(
        &self,
        _w: &Weights,
        _cfg: &ModelConfig,
        _layer: usize,
    ) -> Result<Option<SharedExpert>> {
        Ok(None)
    }
    fn dense_mlp(&self, w: &Weights, cfg: &ModelConfig, layer: usize) -> Result<GatedMlp>;
}

// serde defaults the family config structs share.
pub(crate) fn one() -> usize {
    1
}
pub(crate) fn one_f() -> f64 {
    1.0
}
pub(crate) fn yes() -> bool {
    true
}

pub fn for_family(f: Family) -> Box<dyn FamilyWeights + Send + Sync> {
    match f {
        Family::Mixtral => Box::new(mixtral::Names),
        Family::Qwen2Moe => Box::new(qwen2_moe::Names),
        Family::Qwen3Moe => Box::new(qwen3_moe::Names),
        Family::Olmoe => Box::new(olmoe::Names),
        Family::Dbrx => Box::new(dbrx::Names),
        Family::Glm4Moe => Box::new(glm4_moe::Names),
        Family::DeepseekV2 | Family::DeepseekV3 => Box::new(deepseek::Names),
        Family::GptOss => Box::new(gpt_oss::Names),
    }
}

/// `{name}.weight` `[out, inp]`, held in the type the loader was asked for.
pub fn linear(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Linear> {
    linear_as(w, name, out, inp, Role::Linear)
}

/// [`linear`] for a weight with another [`Role`] (router, LM head).
pub fn linear_as(w: &Weights, name: &str, out: usize, inp: usize, role: Role) -> Result<Linear> {
    Ok(Linear::from_packed(
        w.packed(&format!("{name}.weight"), out, inp, role)?,
        None,
    ))
}

pub fn linear_b(w: &Weights, name: &str, out: usize, inp: usize) -> Result<Linear> {
    let b = w.get_vec(&format!("{name}.bias"), &[out])?;
    Ok(Linear::from_packed(
        w.packed(&format!("{name}.weight"), out, inp, Role::Linear)?,
        Some(b),
    ))
}

pub fn norm(w: &Weights, cfg: &ModelConfig, name: &str, dim: usize) -> Result<Norm> {
    let g = w.get_vec(&format!("{name}.weight"), &[dim])?;
    Ok(match cfg.norm {
        NormKind::Rms => Norm::Rms {
            w: g,
            eps: cfg.norm_eps,
        },
        NormKind::LayerNoBias => Norm::Layer {
            w: g,
            eps: cfg.norm_eps,
        },
    })
}

/// An RMSNorm with its own epsilon (DeepSeek's latent norms use 1e-6 whatever the config).
pub fn norm_eps(w: &Weights, name: &str, dim: usize, eps: f32) -> Result<Norm> {
    Ok(Norm::Rms {
        w: w.get_vec(&format!("{name}.weight"), &[dim])?,
        eps,
    })
}

/// `model.layers.{l}.mlp.shared_experts.{gate,up,down}_proj`: DeepSeek's and GLM-4.5's
/// always-on shared experts (one MLP of `n_shared_experts` times the expert width, no gate).
pub fn deepseek_style_shared(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
) -> Result<Option<SharedExpert>> {
    let Some(s) = cfg.shared_expert_intermediate_size else {
        return Ok(None);
    };
    let p = format!("model.layers.{l}.mlp.shared_experts");
    Ok(Some(SharedExpert {
        mlp: gated(w, &p, GUD, cfg.hidden_size, s)?,
        gate: None,
    }))
}

/// Separate q/k/v/o projections under `{prefix}.self_attn.` (Llama layout) with the norms
/// named `input_layernorm` / `post_attention_layernorm` and the router at `router`.
pub fn llama_attention(
    w: &Weights,
    cfg: &ModelConfig,
    prefix: &str,
    router: Option<&str>,
) -> Result<AttentionWeights> {
    let d = cfg.hidden_size;
    let a = format!("{prefix}.self_attn");
    let proj = |n: &str, out: usize| {
        if cfg.qkv_bias {
            linear_b(w, &format!("{a}.{n}"), out, d)
        } else {
            linear(w, &format!("{a}.{n}"), out, d)
        }
    };
    let q = proj("q_proj", cfg.q_dim())?;
    let k = proj("k_proj", cfg.kv_dim())?;
    let v = proj("v_proj", cfg.kv_dim())?;
    let (q_norm, k_norm) = match cfg.qk_norm {
        crate::config::QkNorm::None => (None, None),
        crate::config::QkNorm::PerHead => (
            Some(norm(w, cfg, &format!("{a}.q_norm"), cfg.head_dim)?),
            Some(norm(w, cfg, &format!("{a}.k_norm"), cfg.head_dim)?),
        ),
        crate::config::QkNorm::Full => (
            Some(norm(w, cfg, &format!("{a}.q_norm"), cfg.q_dim())?),
            Some(norm(w, cfg, &format!("{a}.k_norm"), cfg.kv_dim())?),
        ),
    };
    Ok(AttentionWeights {
        input_norm: norm(w, cfg, &format!("{prefix}.input_layernorm"), d)?,
        qkv: Linear::concat(&[q, k, v])?,
        o: linear(w, &format!("{a}.o_proj"), d, cfg.q_dim())?,
        q_norm,
        k_norm,
        post_norm: norm(w, cfg, &format!("{prefix}.post_attention_layernorm"), d)?,
        router: match router {
            Some(r) => Some(linear_as(w, r, cfg.num_experts, d, Role::Router)?),
            None => None,
        },
        router_bias: None,
        mla: None,
        sinks: None,
    })
}

/// A gated MLP stored as three linears `{prefix}.{gate,up,down}`.
pub fn gated(
    w: &Weights,
    prefix: &str,
    [g, u, dn]: [&str; 3],
    d: usize,
    f: usize,
) -> Result<GatedMlp> {
    GatedMlp::new(
        linear(w, &format!("{prefix}.{g}"), f, d)?,
        linear(w, &format!("{prefix}.{u}"), f, d)?,
        linear(w, &format!("{prefix}.{dn}"), d, f)?,
    )
}

/// `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj` (Qwen, OLMoE).
pub fn mlp_expert(w: &Weights, cfg: &ModelConfig, l: usize, e: usize) -> Result<GatedMlp> {
    let p = format!("model.layers.{l}.mlp.experts.{e}");
    gated(w, &p, GUD, cfg.hidden_size, cfg.moe_intermediate_size)
}

/// `model.layers.{l}.mlp.{gate,up,down}_proj`, a dense layer's MLP (Qwen).
pub fn mlp_dense(w: &Weights, cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
    let p = format!("model.layers.{l}.mlp");
    gated(w, &p, GUD, cfg.hidden_size, cfg.dense_intermediate_size)
}

pub const GUD: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Layers that are dense under Qwen's `decoder_sparse_step` / `mlp_only_layers` rule.
pub fn qwen_dense_layers(
    num_layers: usize,
    num_experts: usize,
    decoder_sparse_step: usize,
    mlp_only_layers: &[usize],
) -> Vec<bool> {
    (0..num_layers)
        .map(|l| {
            let sparse = !mlp_only_layers.contains(&l)
                && num_experts > 0
                && decoder_sparse_step > 0
                && (l + 1) % decoder_sparse_step == 0;
            !sparse
        })
        .collect()
}
