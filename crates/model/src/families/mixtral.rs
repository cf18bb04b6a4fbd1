//! Mixtral (`MixtralForCausalLM`): GQA attention, softmax router with top-k renormalised.

use super::{gated, llama_attention, AttentionWeights, FamilyWeights};
use crate::config::{check_silu, ModelConfig, NormKind, ParseCx, QkNorm, RouterKind, TopkNorm};
use crate::error::Result;
use crate::layers::GatedMlp;
use crate::weights::Weights;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct MixtralConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
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
    pub num_local_experts: Option<usize>,
    pub num_experts: Option<usize>,
    #[serde(default = "default_topk")]
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
}

fn default_max_pos() -> usize {
    4096 * 32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_topk() -> usize {
    2
}

pub fn parse(v: &Value, cx: &ParseCx) -> Result<ModelConfig> {
    let c: MixtralConfig = cx.typed(v)?;
    check_silu(cx, c.hidden_act.as_deref())?;
    if let Some(w) = c.sliding_window {
        return Err(cx.unsupported(format!(
            "sliding_window = {w}: sliding-window attention is not implemented"
        )));
    }
    let heads = c.num_attention_heads;
    let experts = c
        .num_local_experts
        .or(c.num_experts)
        .ok_or_else(|| cx.err("neither num_local_experts nor num_experts is set".into()))?;
    Ok(ModelConfig {
        router: RouterKind::Softmax,
        routed_scaling_factor: 1.0,
        rope_interleaved: false,
        yarn: None,
        mla: None,
        sliding_window: None,
        expert_act: Default::default(),
        family: crate::config::Family::Mixtral,
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: heads,
        num_kv_heads: c.num_key_value_heads.unwrap_or(heads),
        head_dim: c.head_dim.unwrap_or(c.hidden_size / heads.max(1)),
        rotary_dim: c.head_dim.unwrap_or(c.hidden_size / heads.max(1)),
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        norm: NormKind::Rms,
        norm_eps: c.rms_norm_eps as f32,
        rope_theta: cx.rope_theta(v, c.rope_theta, 1e6)?,
        qkv_bias: false,
        clip_qkv: None,
        qk_norm: QkNorm::None,
        num_experts: experts,
        top_k: c.num_experts_per_tok,
        moe_intermediate_size: c.intermediate_size,
        topk_norm: TopkNorm::Sum,
        shared_expert_intermediate_size: None,
        dense_intermediate_size: c.intermediate_size,
        dense_layers: vec![false; c.num_hidden_layers],
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_ids: cx.eos_ids(v),
    })
}

pub struct Names;

impl FamilyWeights for Names {
    fn attention(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<AttentionWeights> {
        let p = format!("model.layers.{l}");
        llama_attention(w, cfg, &p, Some(&format!("{p}.block_sparse_moe.gate")))
    }
    fn expert(&self, w: &Weights, cfg: &ModelConfig, l: usize, e: usize) -> Result<GatedMlp> {
        let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
        gated(
            w,
            &p,
            ["w1", "w3", "w2"],
            cfg.hidden_size,
            cfg.moe_intermediate_size,
        )
    }
    fn dense_mlp(&self, _w: &Weights, _cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
        Err(crate::error::ModelError::Input(format!(
            "mixtral has no dense layers (asked for layer {l})"
        )))
    }
}
