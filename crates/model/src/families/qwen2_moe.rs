//! Qwen2-MoE (`Qwen2MoeForCausalLM`): QKV biases, a shared expert gated by
//! `sigmoid(shared_expert_gate(x))`, optional dense layers (`decoder_sparse_step`,
//! `mlp_only_layers`), top-k weights renormalised only if `norm_topk_prob`.

use super::{
    gated, linear_as, llama_attention, qwen_dense_layers, AttentionWeights, FamilyWeights,
    SharedExpert,
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
pub struct Qwen2MoeConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub num_experts: Option<usize>,
    /// transformers 5 writes this name.
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "super::one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    pub qkv_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
}

fn default_max_pos() -> usize {
    32768
}
fn default_eps() -> f64 {
    1e-6
}

pub fn parse(v: &Value, cx: &ParseCx) -> Result<ModelConfig> {
    let c: Qwen2MoeConfig = cx.typed(v)?;
    check_silu(cx, c.hidden_act.as_deref())?;
    if c.use_sliding_window {
        return Err(cx.unsupported(
            "use_sliding_window = true: sliding-window attention is not implemented".into(),
        ));
    }
    let heads = c.num_attention_heads;
    let num_experts = c
        .num_experts
        .or(c.num_local_experts)
        .ok_or_else(|| cx.err("neither num_experts nor num_local_experts is set".into()))?;
    Ok(ModelConfig {
        router: RouterKind::Softmax,
        routed_scaling_factor: 1.0,
        rope_interleaved: false,
        yarn: None,
        mla: None,
        sliding_window: None,
        expert_act: Default::default(),
        family: Family::Qwen2Moe,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
        head_dim: c.hidden_size / heads.max(1),
        rotary_dim: c.hidden_size / heads.max(1),
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms,
        norm_eps: c.rms_norm_eps as f32,
        rope_theta: cx.rope_theta(v, c.rope_theta, 10000.0)?,
        qkv_bias: c.qkv_bias.unwrap_or(true),
        clip_qkv: None,
        qk_norm: QkNorm::None,
        num_experts,
        top_k: c.num_experts_per_tok,
        moe_intermediate_size: c.moe_intermediate_size,
        topk_norm: if c.norm_topk_prob {
            TopkNorm::Sum
        } else {
            TopkNorm::None
        },
        shared_expert_intermediate_size: Some(c.shared_expert_intermediate_size).filter(|s| *s > 0),
        dense_intermediate_size: c.intermediate_size,
        dense_layers: qwen_dense_layers(
            c.num_hidden_layers,
            num_experts,
            c.decoder_sparse_step,
            &c.mlp_only_layers,
        ),
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
        llama_attention(w, cfg, &p, router.as_deref())
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
        let Some(s) = cfg.shared_expert_intermediate_size else {
            return Ok(None);
        };
        let p = format!("model.layers.{l}.mlp");
        Ok(Some(SharedExpert {
            mlp: gated(
                w,
                &format!("{p}.shared_expert"),
                super::GUD,
                cfg.hidden_size,
                s,
            )?,
            gate: Some(linear_as(
                w,
                &format!("{p}.shared_expert_gate"),
                1,
                cfg.hidden_size,
                crate::weights::Role::Router,
            )?),
        }))
    }
    fn dense_mlp(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
        super::mlp_dense(w, cfg, l)
    }
}
