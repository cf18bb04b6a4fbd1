//! DBRX (`DbrxForCausalLM`): LayerNorm without bias, fused `Wqkv` with `clip_qkv`, experts
//! stored stacked as `[E * ffn, d]` (`w1` gate, `v1` up, `w2` down stored un-transposed),
//! router weights rescaled by their p-norm (`moe_normalize_expert_weights`).

use super::{linear, linear_as, norm, AttentionWeights, FamilyWeights};
use crate::config::{
    check_silu, Family, ModelConfig, NormKind, ParseCx, QkNorm, RouterKind, TopkNorm,
};
use crate::error::{ModelError, Result};
use crate::layers::{GatedMlp, Linear};
use crate::weights::{Role, Weights};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct DbrxConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    #[serde(default = "default_max_seq")]
    pub max_seq_len: usize,
    pub vocab_size: usize,
    pub attn_config: DbrxAttnConfig,
    pub ffn_config: DbrxFfnConfig,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
}

#[derive(Deserialize)]
pub struct DbrxAttnConfig {
    pub clip_qkv: Option<f64>,
    #[serde(default = "super::one")]
    pub kv_n_heads: usize,
    pub rope_theta: Option<f64>,
}

#[derive(Deserialize)]
pub struct DbrxFfnConfig {
    pub ffn_hidden_size: usize,
    pub moe_num_experts: usize,
    #[serde(default = "super::one")]
    pub moe_top_k: usize,
    #[serde(default = "default_pnorm")]
    pub moe_normalize_expert_weights: Option<f64>,
    pub ffn_act_fn: Option<Value>,
}

fn default_max_seq() -> usize {
    2048
}
fn default_pnorm() -> Option<f64> {
    Some(1.0)
}

pub fn parse(v: &Value, cx: &ParseCx) -> Result<ModelConfig> {
    let c: DbrxConfig = cx.typed(v)?;
    let act = c
        .ffn_config
        .ffn_act_fn
        .as_ref()
        .and_then(|a| a.get("name"))
        .and_then(|n| n.as_str());
    check_silu(cx, act)?;
    // transformers 5 may also write rope_parameters at the top level or inside attn_config.
    let attn_v = v.get("attn_config").cloned().unwrap_or(Value::Null);
    let theta = cx.rope_theta(&attn_v, c.attn_config.rope_theta, 10000.0)?;
    let theta = cx.rope_theta(v, Some(theta), theta)?;
    Ok(ModelConfig {
        router: RouterKind::Softmax,
        routed_scaling_factor: 1.0,
        rope_interleaved: false,
        yarn: None,
        mla: None,
        sliding_window: None,
        expert_act: Default::default(),
        family: Family::Dbrx,
        hidden_size: c.d_model,
        num_layers: c.n_layers,
        num_heads: c.n_heads,
        num_kv_heads: c.attn_config.kv_n_heads,
        head_dim: c.d_model / c.n_heads.max(1),
        rotary_dim: c.d_model / c.n_heads.max(1),
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_seq_len,
        norm: NormKind::LayerNoBias,
        norm_eps: 1e-5,
        rope_theta: theta,
        qkv_bias: false,
        clip_qkv: c.attn_config.clip_qkv.map(|x| x as f32),
        qk_norm: QkNorm::None,
        num_experts: c.ffn_config.moe_num_experts,
        top_k: c.ffn_config.moe_top_k,
        moe_intermediate_size: c.ffn_config.ffn_hidden_size,
        topk_norm: match c.ffn_config.moe_normalize_expert_weights {
            Some(p) => TopkNorm::PNorm(p as f32),
            None => TopkNorm::None,
        },
        shared_expert_intermediate_size: None,
        dense_intermediate_size: c.ffn_config.ffn_hidden_size,
        dense_layers: vec![false; c.n_layers],
        tie_word_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_ids: cx.eos_ids(v),
    })
}

pub struct Names;

impl FamilyWeights for Names {
    fn embed(&self) -> String {
        "transformer.wte.weight".into()
    }
    fn final_norm(&self) -> String {
        "transformer.norm_f".into()
    }
    fn lm_head(&self) -> String {
        "lm_head".into()
    }
    fn attention(&self, w: &Weights, cfg: &ModelConfig, l: usize) -> Result<AttentionWeights> {
        let d = cfg.hidden_size;
        let p = format!("transformer.blocks.{l}");
        let na = format!("{p}.norm_attn_norm");
        Ok(AttentionWeights {
            input_norm: norm(w, cfg, &format!("{na}.norm_1"), d)?,
            qkv: linear(
                w,
                &format!("{na}.attn.Wqkv"),
                cfg.q_dim() + 2 * cfg.kv_dim(),
                d,
            )?,
            o: linear(w, &format!("{na}.attn.out_proj"), d, cfg.q_dim())?,
            q_norm: None,
            k_norm: None,
            post_norm: norm(w, cfg, &format!("{na}.norm_2"), d)?,
            router: Some(linear_as(
                w,
                &format!("{p}.ffn.router.layer"),
                cfg.num_experts,
                d,
                Role::Router,
            )?),
            router_bias: None,
            mla: None,
            sinks: None,
        })
    }
    fn expert(&self, w: &Weights, cfg: &ModelConfig, l: usize, e: usize) -> Result<GatedMlp> {
        let mut v = self.experts(w, cfg, l, &[e])?;
        v.pop()
            .ok_or_else(|| ModelError::Input(format!("no expert {e} in layer {l}")))
    }
    fn experts(
        &self,
        w: &Weights,
        cfg: &ModelConfig,
        l: usize,
        ids: &[usize],
    ) -> Result<Vec<GatedMlp>> {
        let (d, f, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        let p = format!("transformer.blocks.{l}.ffn.experts.mlp");
        let w1 = w.get_vec(&format!("{p}.w1"), &[ne * f, d])?;
        let v1 = w.get_vec(&format!("{p}.v1"), &[ne * f, d])?;
        let w2 = w.get_vec(&format!("{p}.w2"), &[ne * f, d])?;
        let ty = |n: &str| w.type_for(&format!("{p}.{n}"), Role::Linear);
        let mut out = Vec::with_capacity(ids.len());
        for &e in ids {
            if e >= ne {
                return Err(ModelError::Input(format!("expert {e} out of range {ne}")));
            }
            let rows = e * f * d..(e + 1) * f * d;
            let gate = Linear::from_f32(&w1[rows.clone()], f, d, None, ty("w1"));
            let up = Linear::from_f32(&v1[rows.clone()], f, d, None, ty("v1"));
            // w2 holds down^T ([f, d]); the linear wants [d, f].
            let w2e = &w2[rows];
            let mut down_t = vec![0f32; d * f];
            for i in 0..f {
                for j in 0..d {
                    down_t[j * f + i] = w2e[i * d + j];
                }
            }
            let down = Linear::from_f32(&down_t, d, f, None, ty("w2"));
            out.push(GatedMlp::new(gate, up, down)?);
        }
        Ok(out)
    }
    fn dense_mlp(&self, _w: &Weights, _cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
        Err(ModelError::Input(format!(
            "dbrx has no dense layers (asked for layer {l})"
        )))
    }
}
