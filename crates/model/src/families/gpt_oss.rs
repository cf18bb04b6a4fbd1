//! GPT-OSS (`GptOssForCausalLM`): attention sinks (`self_attn.sinks`, one logit per head in the
//! softmax's denominator), sliding-window and full attention layers alternating as
//! `layer_types` says, biases on q/k/v/o, the router and the experts, a clamped SwiGLU
//! (`swiglu_alpha`, `swiglu_limit`), softmax over the top-k router logits, YaRN rope. The
//! experts are stored stacked: `mlp.experts.gate_up_proj` `[E, D, 2F]` with gate and up
//! interleaved (columns `0::2` and `1::2`) and `down_proj` `[E, F, D]`, both used as `x @ W`;
//! the hub checkpoints hold them as MXFP4 instead (`*_blocks` `[E, out, in / 32, 16]` +
//! `*_scales` `[E, out, in / 32]`, already `[out, in]`), dequantized here at load. A GGUF file
//! names each expert's gate, up and down `[out, in]` matrices instead
//! (`experts.{e}.{gate,up,down}_proj.weight`, cut from llama.cpp's `ffn_*_exps` by
//! `crate::gguf_arch`): they are taken as the other families' experts are, in the file's
//! type (MXFP4 blocks used in place, not rebuilt in f32).

use super::{linear_b, norm, AttentionWeights, FamilyWeights};
use crate::config::{
    check_silu, ExpertAct, Family, ModelConfig, NormKind, ParseCx, QkNorm, RouterKind,
    SlidingWindow, TopkNorm, Yarn,
};
use crate::error::{ModelError, Result};
use crate::layers::{GatedMlp, Linear};
use crate::packed::PackedWeights;
use crate::quant::dequantize_mxfp4;
use crate::weights::{Role, Weights};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
pub struct GptOssConfig {
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
    pub num_local_experts: usize,
    pub num_experts_per_tok: Option<usize>,
    /// The name openai's own configs use.
    pub experts_per_token: Option<usize>,
    pub sliding_window: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_alpha")]
    pub swiglu_alpha: f64,
    #[serde(default = "default_limit")]
    pub swiglu_limit: f64,
    #[serde(default = "super::yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
    pub quantization_config: Option<QuantizationConfig>,
}

#[derive(Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: Option<String>,
}

fn default_max_pos() -> usize {
    131072
}
fn default_eps() -> f64 {
    1e-5
}
fn default_alpha() -> f64 {
    1.702
}
fn default_limit() -> f64 {
    7.0
}

/// transformers' rope when a GPT-OSS config names none: YaRN, factor 32 over 4096 positions.
fn default_yarn() -> Yarn {
    Yarn {
        factor: 32.0,
        original_max_position_embeddings: 4096,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        attention_factor: None,
        truncate: false,
    }
}

pub fn parse(v: &Value, cx: &ParseCx) -> Result<ModelConfig> {
    let c: GptOssConfig = cx.typed(v)?;
    check_silu(cx, c.hidden_act.as_deref())?;
    if let Some(m) = c
        .quantization_config
        .as_ref()
        .and_then(|q| q.quant_method.as_deref())
    {
        if m != "mxfp4" {
            return Err(cx.unsupported(format!(
                "quantization_config.quant_method: {m:?} is not implemented (only \"mxfp4\")"
            )));
        }
    }
    let heads = c.num_attention_heads;
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads.max(1));
    let top_k = c
        .num_experts_per_tok
        .or(c.experts_per_token)
        .ok_or_else(|| cx.err("neither num_experts_per_tok nor experts_per_token is set".into()))?;
    let named_rope = ["rope_parameters", "rope_scaling"]
        .iter()
        .any(|k| v.get(*k).is_some_and(|p| !p.is_null()));
    let mut rope = cx.rope_with_yarn(v, c.rope_theta, 150000.0, c.max_position_embeddings)?;
    if !named_rope {
        rope.yarn = Some(default_yarn());
    }
    if rope.partial_rotary_factor != 1.0 {
        return Err(cx.unsupported(
            "partial_rotary_factor: GPT-OSS rotates whole heads; a partial factor is not \
             implemented for this family"
                .into(),
        ));
    }
    // transformers' default: even layers sliding, odd layers full.
    let types = c.layer_types.clone().unwrap_or_else(|| {
        (0..c.num_hidden_layers)
            .map(|l| {
                if l % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
                .to_string()
            })
            .collect()
    });
    if types.len() != c.num_hidden_layers {
        return Err(cx.err(format!(
            "layer_types has {} entries for {} layers (num_hidden_layers)",
            types.len(),
            c.num_hidden_layers
        )));
    }
    let mut sliding = Vec::with_capacity(types.len());
    for (l, t) in types.iter().enumerate() {
        sliding.push(match t.as_str() {
            "sliding_attention" => true,
            "full_attention" => false,
            other => {
                return Err(cx.unsupported(format!(
                    "layer_types[{l}]: {other:?} is not implemented (only \"sliding_attention\" \
                     and \"full_attention\")"
                )))
            }
        });
    }
    let sliding_window =
        if sliding.iter().any(|s| *s) {
            match c.sliding_window {
                Some(w) if w > 0 => Some(SlidingWindow {
                    window: w,
                    layers: sliding,
                }),
                _ => return Err(cx.err(
                    "sliding_window must be a positive number: layer_types has sliding_attention \
                     layers"
                        .into(),
                )),
            }
        } else {
            None
        };
    if c.swiglu_limit.is_nan() || c.swiglu_limit <= 0.0 {
        return Err(cx.err(format!(
            "swiglu_limit = {} must be positive",
            c.swiglu_limit
        )));
    }
    Ok(ModelConfig {
        family: Family::GptOss,
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
        rotary_dim: head_dim,
        rope_interleaved: false,
        yarn: rope.yarn,
        mla: None,
        sliding_window,
        expert_act: ExpertAct::ClampedSwiglu {
            alpha: c.swiglu_alpha as f32,
            limit: c.swiglu_limit as f32,
        },
        qkv_bias: c.attention_bias,
        clip_qkv: None,
        qk_norm: QkNorm::None,
        num_experts: c.num_local_experts,
        top_k,
        moe_intermediate_size: c.intermediate_size,
        // Softmax over the k largest logits = softmax over all, top k, divided by their sum.
        topk_norm: TopkNorm::Sum,
        router: RouterKind::Softmax,
        routed_scaling_factor: 1.0,
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
        let d = cfg.hidden_size;
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        let proj = |n: &str, out: usize, inp: usize| {
            let name = format!("{a}.{n}");
            if cfg.qkv_bias {
                linear_b(w, &name, out, inp)
            } else {
                super::linear(w, &name, out, inp)
            }
        };
        let q = proj("q_proj", cfg.q_dim(), d)?;
        let k = proj("k_proj", cfg.kv_dim(), d)?;
        let v = proj("v_proj", cfg.kv_dim(), d)?;
        let r = format!("{p}.mlp.router");
        Ok(AttentionWeights {
            input_norm: norm(w, cfg, &format!("{p}.input_layernorm"), d)?,
            qkv: Linear::concat(&[q, k, v])?,
            o: proj("o_proj", d, cfg.q_dim())?,
            q_norm: None,
            k_norm: None,
            post_norm: norm(w, cfg, &format!("{p}.post_attention_layernorm"), d)?,
            router: Some(Linear::from_packed(
                w.packed(&format!("{r}.weight"), cfg.num_experts, d, Role::Router)?,
                Some(w.get_vec(&format!("{r}.bias"), &[cfg.num_experts])?),
            )),
            router_bias: None,
            mla: None,
            sinks: Some(w.get_vec(&format!("{a}.sinks"), &[cfg.num_heads])?),
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
        let p = format!("model.layers.{l}.mlp.experts");
        let gu_bias = w.get_vec(&format!("{p}.gate_up_proj_bias"), &[ne, 2 * f])?;
        let down_bias = w.get_vec(&format!("{p}.down_proj_bias"), &[ne, d])?;
        // Even entries gate, odd entries up.
        let biases = |e: usize| {
            let gub = &gu_bias[e * 2 * f..(e + 1) * 2 * f];
            let gb: Vec<f32> = gub.iter().step_by(2).copied().collect();
            let ub: Vec<f32> = gub.iter().skip(1).step_by(2).copied().collect();
            (gb, ub, down_bias[e * d..(e + 1) * d].to_vec())
        };
        if ids.iter().any(|&e| e >= ne) {
            return Err(ModelError::Input(format!(
                "experts {ids:?} of layer {l}: out of range {ne}"
            )));
        }
        // A GGUF file: one matrix per expert, held in its own type (see the module doc).
        if w.contains(&format!("{p}.0.gate_proj.weight")) {
            return ids
                .iter()
                .map(|&e| {
                    let (gb, ub, db) = biases(e);
                    let lin = |n: &str, out: usize, inp: usize, b: Vec<f32>| -> Result<Linear> {
                        let name = format!("{p}.{e}.{n}.weight");
                        Ok(Linear::from_packed(
                            w.packed(&name, out, inp, Role::Linear)?,
                            Some(b),
                        ))
                    };
                    let mlp = GatedMlp::new(
                        lin("gate_proj", f, d, gb)?,
                        lin("up_proj", f, d, ub)?,
                        lin("down_proj", d, f, db)?,
                    )?;
                    Ok(mlp.with_act(cfg.expert_act))
                })
                .collect();
        }
        let mxfp4 = w.contains(&format!("{p}.gate_up_proj_blocks"));
        // Dequantized MXFP4 values are exact in bf16: under `auto` they take the type the
        // checkpoint's other expert tensors (the biases) are stored in.
        let ty = |n: &str| {
            let name = if mxfp4 {
                format!("{p}.{n}_bias")
            } else {
                format!("{p}.{n}")
            };
            w.type_for(&name, Role::Linear)
        };
        // The source of every expert's [2F, D] (gate and up rows interleaved) and [D, F],
        // row-major: MXFP4 bytes read in place and dequantized one expert at a time (a layer
        // of gpt-oss-120b's experts is 12.7 GB in f32), or the stacked tensors.
        enum Source<'a> {
            Mxfp4 {
                gate_up: (&'a [u8], &'a [u8]),
                down: (&'a [u8], &'a [u8]),
            },
            /// [E, D, 2F] and [E, F, D] (x @ W), transposed per expert.
            Stacked { gate_up: Vec<f32>, down: Vec<f32> },
        }
        let src = if mxfp4 {
            let mx = |n: &str, rows: usize, cols: usize| -> Result<(&[u8], &[u8])> {
                if !cols.is_multiple_of(32) {
                    return Err(ModelError::Input(format!(
                        "{p}.{n}_blocks: rows of {cols} values are not whole MXFP4 blocks of 32"
                    )));
                }
                let g = cols / 32;
                Ok((
                    w.get_u8(&format!("{p}.{n}_blocks"), &[ne, rows, g, 16])?,
                    w.get_u8(&format!("{p}.{n}_scales"), &[ne, rows, g])?,
                ))
            };
            Source::Mxfp4 {
                gate_up: mx("gate_up_proj", 2 * f, d)?,
                down: mx("down_proj", d, f)?,
            }
        } else {
            Source::Stacked {
                gate_up: w.get_vec(&format!("{p}.gate_up_proj"), &[ne, d, 2 * f])?,
                down: w.get_vec(&format!("{p}.down_proj"), &[ne, f, d])?,
            }
        };
        // Expert e's `[rows, cols]` matrix (`[out, in]`).
        let matrix = |e: usize, which: usize, rows: usize, cols: usize| -> Vec<f32> {
            let n = rows * cols;
            match &src {
                Source::Mxfp4 { gate_up, down } => {
                    let (b, s) = if which == 0 { gate_up } else { down };
                    let (nb, ns) = (n / 2, n / 32);
                    dequantize_mxfp4(
                        &b[e * nb..(e + 1) * nb],
                        &s[e * ns..(e + 1) * ns],
                        rows,
                        cols,
                    )
                }
                Source::Stacked { gate_up, down } => {
                    let x = if which == 0 { gate_up } else { down };
                    transpose(&x[e * n..(e + 1) * n], cols, rows)
                }
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for &e in ids {
            let gu = matrix(e, 0, 2 * f, d);
            // Even rows gate, odd rows up.
            let (mut gw, mut uw) = (Vec::with_capacity(f * d), Vec::with_capacity(f * d));
            for (i, row) in gu.chunks_exact(d).enumerate() {
                if i % 2 == 0 { &mut gw } else { &mut uw }.extend_from_slice(row);
            }
            let (gb, ub, db) = biases(e);
            let lin = |wt: &[f32], o: usize, i: usize, b: Vec<f32>, n: &str| {
                Linear::from_packed(PackedWeights::pack_as(wt, o, i, ty(n)), Some(b))
            };
            let mlp = GatedMlp::new(
                lin(&gw, f, d, gb, "gate_up_proj"),
                lin(&uw, f, d, ub, "gate_up_proj"),
                lin(&matrix(e, 1, d, f), d, f, db, "down_proj"),
            )?;
            out.push(mlp.with_act(cfg.expert_act));
        }
        Ok(out)
    }
    fn dense_mlp(&self, _w: &Weights, _cfg: &ModelConfig, l: usize) -> Result<GatedMlp> {
        Err(ModelError::Input(format!(
            "gpt_oss has no dense layers (asked for layer {l})"
        )))
    }
}

/// `[r, c]` -> `[c, r]`.
fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = x[i * c + j];
        }
    }
    out
}
