//! GLM-4.5 (`Glm4MoeForCausalLM`): partial rotary embeddings (`partial_rotary_factor`, 0.5 by
//! default), q/k/v biases (`attention_bias`), optional per-head q/k RMSNorm (`use_qk_norm`),
//! sigmoid routing with an `e_score_correction_bias` and group-limited choice (`noaux_tc`),
//! `routed_scaling_factor`, always-on shared experts without a gate, and the first
//! `first_k_dense_replace` layers dense. Next-token-prediction layers stored after the last
//! layer are not loaded.

use super::{
    deepseek_style_shared, llama_attention, AttentionWeights, FamilyWeights, SharedExpert,
};
use crate::config::{
    check_silu, Family, ModelConfig, NormKind, ParseCx, QkNorm, RouterKind, TopkNorm,
};
use crate::error::Result;
use crate::layers::GatedMlp;
use crate::weights::Weights;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct Glm4MoeConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub n_routed_experts: Option<usize>,
    /// transformers 5 may write this name.
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default = "super::one")]
    pub n_shared_experts: usize,
    #[serde(default = "super::one")]
    pub n_group: usize,
    #[serde(default = "super::one")]
    pub topk_group: usize,
    #[serde(default = "super::one_f")]
    pub routed_scaling_factor: f64,
    #[serde(default = "super::yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "super::one")]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_qk_norm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
}

fn default_max_pos() -> usize {
    131072
}
fn default_eps() -> f64 {
    1e-5
}

pub fn parse(v: &Value, cx: &ParseCx) -> Result<ModelConfig> {
    let c: Glm4MoeConfig = cx.typed(v)?;
    check_silu(cx, c.hidden_act.as_deref())?;
    let heads = c.num_attention_heads;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads.max(1));
    let num_experts = c
        .n_routed_experts
        .or(c.num_local_experts)
        .ok_or_else(|| cx.err("neither n_routed_experts nor num_local_experts is set".into()))?;
    let has_factor = v.get("partial_rotary_factor").is_some()
        || v.get("rope_parameters")
            .and_then(|p| p.get("partial_rotary_factor"))
            .is_some();
    let mut rope = cx.rope_with_yarn(v, c.rope_theta, 10000.0, c.max_position_embeddings)?;
    if !has_factor {
        // transformers' default for this family
        rope.partial_rotary_factor = 0.5;
    }
    Ok(ModelConfig {
        family: Family::Glm4Moe,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
        head_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms,
        norm_eps: c.rms_norm_eps as f32,
        rope_theta: rope.theta,
        rotary_dim: (head_dim as f64 * rope.partial_rotary_factor) as usize,
        rope_interleaved: false,
        yarn: rope.yarn,
        mla: None,
        sliding_window: None,
        expert_act: Default::default(),
        qkv_bias: c.attention_bias,
        clip_qkv: None,
        qk_norm: if c.use_qk_norm {
            QkNorm::PerHead
        } else {
            QkNorm::None
        },
        num_experts,
        top_k: c.num_experts_per_tok,
        moe_intermediate_size: c.moe_intermediate_size,
        topk_norm: if c.norm_topk_prob {
            TopkNorm::Sum
        } else {
            TopkNorm::None
        },
        router: RouterKind::SigmoidNoauxTc {
            n_group: c.n_group,
            topk_group: c.topk_group,
        },
        routed_scaling_factor: c.routed_scaling_factor as f32,
        shared_expert_intermediate_size: Some(c.moe_intermediate_size * c.n_shared_experts)
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

pub struct Names;

impl FamilyWeights for Names {
    fn attention(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<AttentionWeights> {
        let p = format!("model.layers.{l}");
        let router = cfg.is_moe_layer(l).then(|| format!("{p}.mlp.gate"));
        let mut a = llama_attention(w, cfg, &p, router.as_deref())?;
        if cfg.is_moe_layer(l) {
            a.router_bias = Some(w.get_vec(
                &format!("{p}.mlp.gate.e_score_correction_bias"),
                &[cfg.num_experts],
            )?);
        }
        Ok(a)
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
