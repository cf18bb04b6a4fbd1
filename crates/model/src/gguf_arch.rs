//! The GGUF architectures whose tensors and metadata need more than [`crate::gguf`]'s common
//! mapping: `deepseek2` (DeepSeek-V2, V2-Lite, V3, Kimi-K2), `glm4moe` (GLM-4.5), `gpt-oss` and
//! `dbrx`, in the layout llama.cpp's `convert_hf_to_gguf.py` writes (the version of
//! llama-cpp-python 0.3.36). [`build_map`] names every tensor the family loader asks for and
//! [`config_json`] writes the hub `config.json` the metadata stands for; both answer `None`
//! for the other architectures.
//!
//! What the converter changes and how it is undone:
//! - **deepseek2**: MLA's `kv_b_proj` `[H * (nope + v), R]` is split into `attn_k_b`
//!   `[H, R, nope]` (each head's key part transposed) and `attn_v_b` `[H, v, R]`; it is rebuilt
//!   from the two ([`Synth::KvB`]). Files made before that split hold `attn_kv_b` itself. The
//!   head sizes come from `attention.key_length_mla` / `value_length_mla` (the plain
//!   `key_length` is `kv_lora_rank + rope` there, the latent's width); older files without
//!   them give the real sizes in `key_length` / `value_length`. The rotary pairs are
//!   interleaved (llama.cpp's "norm" rope for this architecture), so `rope_interleave` is true.
//!   The router: `expert_gating_func` 2 (sigmoid) is DeepSeek-V3's `noaux_tc`, 1 (softmax) is
//!   V2's, with `group_limited_greedy` when `expert_group_count` > 1. The converter writes the
//!   gating function only when the hub config names `scoring_func`; without it, a file with
//!   `exp_probs_b` (V3's `e_score_correction_bias`, which only sigmoid routing has) is V3 and
//!   one without is V2 (llama.cpp itself assumes softmax there, for V2 files that predate the
//!   key). YaRN: `rope.scaling.yarn_log_multiplier` is `0.1 * mscale_all_dim`; `mscale` is not
//!   written, and is read as llama.cpp reads it: equal to `mscale_all_dim` when that is not 1
//!   (DeepSeek-V2's configs), else 1. `expert_weights_norm` is written only when true, so its
//!   absence is `norm_topk_prob: false` (as llama.cpp reads it; every released V3 config says
//!   true, and its file has the key).
//! - **glm4moe**: `rope.dimension_count` is the rotary part of a head
//!   (`partial_rotary_factor * head_dim`); the multi-token-prediction layers are counted in
//!   `block_count` (`nextn_predict_layers` of them, stored last) and are not mapped.
//! - **gpt-oss**: `gate_up_proj` `[E, D, 2F]` (gate and up interleaved in the columns, used as
//!   `x @ W`) is stored as `ffn_gate_exps` and `ffn_up_exps` `[E, F, D]`, its bias as two
//!   `[E, F]`, and `down_proj` `[E, F, D]` transposed to `ffn_down_exps` `[E, D, F]`. The
//!   weights are not rebuilt: each expert's gate, up and down `[out, in]` matrices are cut
//!   from the stacked tensors as the other families' experts are
//!   (`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`, names the hub checkpoint
//!   does not have), in the file's type (MXFP4, the hub's, used in place), and the family
//!   loader takes gate and up separately; only the small biases are interleaved back
//!   ([`Synth::GateUpBias`]). Sliding layers: `attention.sliding_window_pattern` (per-layer
//!   flags or a period) or llama.cpp's default period 2 (even layers sliding). The clamped
//!   SwiGLU's `swiglu_alpha` and `swiglu_limit` are not written: llama.cpp uses 1.702 and 7.0,
//!   those of every released GPT-OSS, and so does this. YaRN is not truncated (`truncate:
//!   false`, as in the released configs).
//! - **dbrx**: the experts are `[E, F, D]` (`w1` gate, `v1` up: the hub's `[E * F, D]` as they
//!   are) and `ffn_down_exps` `[E, D, F]`, whose experts are transposed back into `w2`
//!   `[E * F, D]`; `attn_qkv` is the fused `Wqkv` unchanged, `attention.clamp_kqv` is
//!   `clip_qkv`.
//!
//! Synthesized tensors are built in f32 from the (dequantized) GGUF tensors.

use crate::error::Result;
use crate::gguf::{Entry, GgufFile};
use crate::gguf_format::Value;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

/// The architectures this file maps.
pub(crate) const ARCHS: &[&str] = &["deepseek2", "glm4moe", "gpt-oss", "dbrx"];

/// A hub tensor rebuilt from the GGUF tensors the converter made of it.
#[derive(Clone, Debug)]
pub(crate) enum Synth {
    /// MLA's `kv_b_proj` `[H * (nope + v), R]` from `attn_k_b` `[H, R, nope]` and `attn_v_b`
    /// `[H, v, R]`: head `h`'s `nope` key rows (`k_b[h]` transposed), then its `v` value rows.
    KvB {
        k_b: String,
        v_b: String,
        heads: usize,
        nope: usize,
        v: usize,
        rank: usize,
    },
    /// GPT-OSS's `gate_up_proj_bias` `[E, 2F]` from gate and up biases `[E, F]`, interleaved.
    GateUpBias {
        gate: String,
        up: String,
        experts: usize,
        f: usize,
    },
    /// `src` `[E, rows, cols]` with every expert's matrix transposed: `[E, cols, rows]`.
    Transposed {
        src: String,
        experts: usize,
        rows: usize,
        cols: usize,
    },
}

/// Reads a whole GGUF tensor as f32, checked to have a shape (PyTorch order).
pub(crate) type ReadF32<'a> = dyn Fn(&str, &[usize]) -> Result<Vec<f32>> + 'a;

impl Synth {
    /// The values of the hub tensor, row-major.
    pub(crate) fn build(&self, read: &ReadF32) -> Result<Vec<f32>> {
        Ok(match self {
            Synth::KvB {
                k_b,
                v_b,
                heads,
                nope,
                v,
                rank,
            } => {
                let (h, nope, v, r) = (*heads, *nope, *v, *rank);
                let kb = read(k_b, &[h, r, nope])?;
                let vb = read(v_b, &[h, v, r])?;
                let mut out = Vec::with_capacity(h * (nope + v) * r);
                for hh in 0..h {
                    let k = &kb[hh * r * nope..(hh + 1) * r * nope];
                    for i in 0..nope {
                        out.extend((0..r).map(|j| k[j * nope + i]));
                    }
                    out.extend_from_slice(&vb[hh * v * r..(hh + 1) * v * r]);
                }
                out
            }
            Synth::GateUpBias {
                gate,
                up,
                experts,
                f,
            } => {
                let g = read(gate, &[*experts, *f])?;
                let u = read(up, &[*experts, *f])?;
                g.iter().zip(&u).flat_map(|(a, b)| [*a, *b]).collect()
            }
            Synth::Transposed {
                src,
                experts,
                rows,
                cols,
            } => {
                let (e, r, c) = (*experts, *rows, *cols);
                let x = read(src, &[e, r, c])?;
                let mut out = vec![0f32; e * r * c];
                for ee in 0..e {
                    let base = ee * r * c;
                    for i in 0..r {
                        for j in 0..c {
                            out[base + j * r + i] = x[base + i * c + j];
                        }
                    }
                }
                out
            }
        })
    }
}

fn whole(tensor: &str, shape: Vec<usize>) -> Entry {
    Entry {
        tensor: tensor.to_string(),
        expert: None,
        unpermute: None,
        shape,
        synth: None,
    }
}

fn synth(tensor: &str, shape: Vec<usize>, s: Synth) -> Entry {
    Entry {
        synth: Some(s),
        ..whole(tensor, shape)
    }
}

/// `blk.{layer}.{base}.{suffix}` split up.
fn split(name: &str) -> Option<(usize, &str, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    Some((layer.parse().ok()?, base, suffix))
}

/// The f32 metadata value as the decimal the hub config wrote (1e-5, not 9.99999974e-6).
fn short(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

fn meta_bool(g: &GgufFile, key: &str) -> Result<Option<bool>> {
    match g.meta(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(g.corrupt(format!("metadata {key} is {v:?}, expected a bool"))),
    }
}

fn need(g: &GgufFile, key: &str) -> Result<u64> {
    g.arch_u64(key)
        .ok_or_else(|| g.corrupt(format!("metadata {}.{key} is missing", g.arch())))
}

fn need_f(g: &GgufFile, key: &str) -> Result<f64> {
    let k = format!("{}.{key}", g.arch());
    g.meta_f64(&k)
        .ok_or_else(|| g.corrupt(format!("metadata {k} is missing")))
}

fn has(g: &GgufFile, tensor: &str) -> bool {
    g.dims(tensor).is_some()
}

/// The dimensions of a tensor the mapping needs, with an error naming it.
fn dims_of(g: &GgufFile, tensor: &str, rank: usize) -> Result<Vec<usize>> {
    let d = g
        .dims(tensor)
        .ok_or_else(|| g.corrupt(format!("tensor {tensor} is missing")))?;
    if d.len() != rank {
        return Err(g.corrupt(format!(
            "tensor {tensor} has shape {d:?}, expected {rank} dimensions"
        )));
    }
    Ok(d)
}

/// The hub names of every tensor of a `deepseek2`, `glm4moe`, `gpt-oss` or `dbrx` file; `None`
/// for another architecture.
pub(crate) fn build_map(g: &GgufFile) -> Result<Option<HashMap<String, Entry>>> {
    let arch = g.arch();
    if !ARCHS.contains(&arch) {
        return Ok(None);
    }
    let layers = num_layers(g)? as usize;
    let dbrx = arch == "dbrx";
    let mut map = HashMap::new();
    let mut names: Vec<&str> = g.tensor_names().collect();
    names.sort_unstable();
    for name in names {
        let dims = g.dims(name).unwrap_or_default();
        let top = match (name, dbrx) {
            ("token_embd.weight", false) => Some("model.embed_tokens.weight"),
            ("output_norm.weight", false) => Some("model.norm.weight"),
            ("token_embd.weight", true) => Some("transformer.wte.weight"),
            ("output_norm.weight", true) => Some("transformer.norm_f.weight"),
            ("output.weight", _) => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(hub) = top {
            map.insert(hub.to_string(), whole(name, dims));
            continue;
        }
        let Some((l, base, suffix)) = split(name) else {
            continue;
        };
        if l >= layers {
            // glm4moe's multi-token-prediction layers, stored after the last layer.
            continue;
        }
        let added = match arch {
            "deepseek2" => deepseek2_tensor(g, &mut map, name, l, base, suffix, &dims)?,
            "glm4moe" => glm4moe_tensor(&mut map, name, l, base, suffix, &dims)?,
            "gpt-oss" => gpt_oss_tensor(g, &mut map, name, l, base, suffix, &dims)?,
            _ => dbrx_tensor(g, &mut map, name, l, base, suffix, &dims)?,
        };
        if !added {
            tracing::debug!("{}: GGUF tensor {name} is not used", g.path.display());
        }
    }
    Ok(Some(map))
}

/// Layers the family loader runs (glm4moe's `block_count` also counts its
/// multi-token-prediction layers).
fn num_layers(g: &GgufFile) -> Result<u64> {
    let blocks = need(g, "block_count")?;
    if g.arch() != "glm4moe" {
        return Ok(blocks);
    }
    let nextn = g.arch_u64("nextn_predict_layers").unwrap_or(0);
    blocks.checked_sub(nextn).filter(|n| *n > 0).ok_or_else(|| {
        g.corrupt(format!(
            "metadata glm4moe.nextn_predict_layers = {nextn} leaves no layers of \
             glm4moe.block_count = {blocks}"
        ))
    })
}

/// Stacked experts `[E, ...]` cut into one hub tensor per expert.
fn experts(
    map: &mut HashMap<String, Entry>,
    name: &str,
    dims: &[usize],
    hub: impl Fn(usize) -> String,
) -> Result<bool> {
    if dims.len() != 3 {
        return Ok(false);
    }
    for e in 0..dims[0] {
        map.insert(
            hub(e),
            Entry {
                tensor: name.to_string(),
                expert: Some(e),
                unpermute: None,
                shape: dims[1..].to_vec(),
                synth: None,
            },
        );
    }
    Ok(true)
}

/// The tensors deepseek2 and glm4moe name alike (llama-style attention names, DeepSeek-style
/// MLPs); `false` for any other.
fn deepseek_style(
    map: &mut HashMap<String, Entry>,
    name: &str,
    l: usize,
    base: &str,
    suffix: &str,
    dims: &[usize],
) -> Result<bool> {
    let p = format!("model.layers.{l}");
    let hub = match base {
        "attn_norm" => format!("{p}.input_layernorm"),
        "attn_output" => format!("{p}.self_attn.o_proj"),
        "ffn_gate_inp" => format!("{p}.mlp.gate"),
        // The hub's name has no `.bias`.
        "exp_probs_b" => {
            map.insert(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                whole(name, dims.to_vec()),
            );
            return Ok(true);
        }
        "ffn_gate" => format!("{p}.mlp.gate_proj"),
        "ffn_up" => format!("{p}.mlp.up_proj"),
        "ffn_down" => format!("{p}.mlp.down_proj"),
        "ffn_gate_shexp" => format!("{p}.mlp.shared_experts.gate_proj"),
        "ffn_up_shexp" => format!("{p}.mlp.shared_experts.up_proj"),
        "ffn_down_shexp" => format!("{p}.mlp.shared_experts.down_proj"),
        "ffn_gate_exps" | "ffn_up_exps" | "ffn_down_exps" => {
            let which = &base[4..base.len() - 5];
            return experts(map, name, dims, |e| {
                format!("{p}.mlp.experts.{e}.{which}_proj.{suffix}")
            });
        }
        _ => return Ok(false),
    };
    map.insert(format!("{hub}.{suffix}"), whole(name, dims.to_vec()));
    Ok(true)
}

fn deepseek2_tensor(
    g: &GgufFile,
    map: &mut HashMap<String, Entry>,
    name: &str,
    l: usize,
    base: &str,
    suffix: &str,
    dims: &[usize],
) -> Result<bool> {
    if deepseek_style(map, name, l, base, suffix, dims)? {
        return Ok(true);
    }
    let a = format!("model.layers.{l}.self_attn");
    let hub = match base {
        "ffn_norm" => format!("model.layers.{l}.post_attention_layernorm"),
        "attn_q" => format!("{a}.q_proj"),
        "attn_q_a" => format!("{a}.q_a_proj"),
        "attn_q_a_norm" => format!("{a}.q_a_layernorm"),
        "attn_q_b" => format!("{a}.q_b_proj"),
        "attn_kv_a_mqa" => format!("{a}.kv_a_proj_with_mqa"),
        "attn_kv_a_norm" => format!("{a}.kv_a_layernorm"),
        "attn_kv_b" => format!("{a}.kv_b_proj"),
        "attn_k_b" if suffix == "weight" => {
            // kv_b_proj, rebuilt from this and attn_v_b.
            let v_b = format!("blk.{l}.attn_v_b.weight");
            let kd = dims_of(g, name, 3)?;
            let vd = dims_of(g, &v_b, 3)?;
            let (heads, rank, nope) = (kd[0], kd[1], kd[2]);
            if vd[0] != heads || vd[2] != rank {
                return Err(g.corrupt(format!(
                    "tensors {name} {kd:?} and {v_b} {vd:?} disagree on the heads or the \
                     kv_lora_rank"
                )));
            }
            let v = vd[1];
            map.insert(
                format!("{a}.kv_b_proj.weight"),
                synth(
                    name,
                    vec![heads * (nope + v), rank],
                    Synth::KvB {
                        k_b: name.to_string(),
                        v_b,
                        heads,
                        nope,
                        v,
                        rank,
                    },
                ),
            );
            return Ok(true);
        }
        "attn_v_b" => return Ok(true),
        _ => return Ok(false),
    };
    map.insert(format!("{hub}.{suffix}"), whole(name, dims.to_vec()));
    Ok(true)
}

fn glm4moe_tensor(
    map: &mut HashMap<String, Entry>,
    name: &str,
    l: usize,
    base: &str,
    suffix: &str,
    dims: &[usize],
) -> Result<bool> {
    if deepseek_style(map, name, l, base, suffix, dims)? {
        return Ok(true);
    }
    let p = format!("model.layers.{l}");
    let hub = match base {
        "post_attention_norm" => format!("{p}.post_attention_layernorm"),
        "attn_q" => format!("{p}.self_attn.q_proj"),
        "attn_k" => format!("{p}.self_attn.k_proj"),
        "attn_v" => format!("{p}.self_attn.v_proj"),
        "attn_q_norm" => format!("{p}.self_attn.q_norm"),
        "attn_k_norm" => format!("{p}.self_attn.k_norm"),
        _ => return Ok(false),
    };
    map.insert(format!("{hub}.{suffix}"), whole(name, dims.to_vec()));
    Ok(true)
}

fn gpt_oss_tensor(
    g: &GgufFile,
    map: &mut HashMap<String, Entry>,
    name: &str,
    l: usize,
    base: &str,
    suffix: &str,
    dims: &[usize],
) -> Result<bool> {
    let p = format!("model.layers.{l}");
    let x = format!("{p}.mlp.experts");
    let hub = match (base, suffix) {
        ("attn_norm", _) => format!("{p}.input_layernorm.{suffix}"),
        ("post_attention_norm", _) => format!("{p}.post_attention_layernorm.{suffix}"),
        ("attn_q", _) => format!("{p}.self_attn.q_proj.{suffix}"),
        ("attn_k", _) => format!("{p}.self_attn.k_proj.{suffix}"),
        ("attn_v", _) => format!("{p}.self_attn.v_proj.{suffix}"),
        ("attn_output", _) => format!("{p}.self_attn.o_proj.{suffix}"),
        // The converter adds the `.weight`.
        ("attn_sinks", "weight") => format!("{p}.self_attn.sinks"),
        ("ffn_gate_inp", _) => format!("{p}.mlp.router.{suffix}"),
        ("ffn_down_exps", "bias") => format!("{x}.down_proj_bias"),
        // The experts stay in the file's type (MXFP4 as the hub ships it, used in place):
        // one `[out, in]` matrix per expert, as the other families' experts are cut.
        // `ffn_down_exps` `[E, D, F]` is already `[out, in]` per expert.
        ("ffn_down_exps", "weight") => {
            let d = dims_of(g, name, 3)?;
            return experts(map, name, &d, |e| format!("{x}.{e}.down_proj.weight"));
        }
        ("ffn_gate_exps" | "ffn_up_exps", "weight") => {
            let d = dims_of(g, name, 3)?;
            if base == "ffn_gate_exps" {
                let up = format!("blk.{l}.ffn_up_exps.weight");
                let ud = dims_of(g, &up, 3)?;
                if ud != d {
                    return Err(g.corrupt(format!(
                        "tensors {name} {d:?} and {up} {ud:?} differ in shape"
                    )));
                }
            }
            let which = if base == "ffn_gate_exps" {
                "gate"
            } else {
                "up"
            };
            return experts(map, name, &d, |e| format!("{x}.{e}.{which}_proj.weight"));
        }
        ("ffn_gate_exps", "bias") => {
            let up = format!("blk.{l}.ffn_up_exps.bias");
            let d = dims_of(g, name, 2)?;
            let ud = dims_of(g, &up, 2)?;
            if ud != d {
                return Err(g.corrupt(format!(
                    "tensors {name} {d:?} and {up} {ud:?} differ in shape"
                )));
            }
            map.insert(
                format!("{x}.gate_up_proj_bias"),
                synth(
                    name,
                    vec![d[0], 2 * d[1]],
                    Synth::GateUpBias {
                        gate: name.to_string(),
                        up,
                        experts: d[0],
                        f: d[1],
                    },
                ),
            );
            return Ok(true);
        }
        ("ffn_up_exps", "bias") => return Ok(true),
        _ => return Ok(false),
    };
    map.insert(hub, whole(name, dims.to_vec()));
    Ok(true)
}

fn dbrx_tensor(
    g: &GgufFile,
    map: &mut HashMap<String, Entry>,
    name: &str,
    l: usize,
    base: &str,
    suffix: &str,
    dims: &[usize],
) -> Result<bool> {
    let p = format!("transformer.blocks.{l}");
    let na = format!("{p}.norm_attn_norm");
    let x = format!("{p}.ffn.experts.mlp");
    let hub = match (base, suffix) {
        ("attn_norm", _) => format!("{na}.norm_1.{suffix}"),
        ("attn_output_norm", _) => format!("{na}.norm_2.{suffix}"),
        ("attn_qkv", _) => format!("{na}.attn.Wqkv.{suffix}"),
        ("attn_output", _) => format!("{na}.attn.out_proj.{suffix}"),
        ("ffn_gate_inp", _) => format!("{p}.ffn.router.layer.{suffix}"),
        ("ffn_gate_exps" | "ffn_up_exps", "weight") => {
            // [E, F, D] is the hub's [E * F, D], byte for byte.
            let d = dims_of(g, name, 3)?;
            let which = if base == "ffn_gate_exps" { "w1" } else { "v1" };
            map.insert(format!("{x}.{which}"), whole(name, vec![d[0] * d[1], d[2]]));
            return Ok(true);
        }
        ("ffn_down_exps", "weight") => {
            // [E, D, F]: each expert's [D, F] transposed is w2's [F, D] block.
            let d = dims_of(g, name, 3)?;
            map.insert(
                format!("{x}.w2"),
                synth(
                    name,
                    vec![d[0] * d[2], d[1]],
                    Synth::Transposed {
                        src: name.to_string(),
                        experts: d[0],
                        rows: d[1],
                        cols: d[2],
                    },
                ),
            );
            return Ok(true);
        }
        _ => return Ok(false),
    };
    map.insert(hub, whole(name, dims.to_vec()));
    Ok(true)
}

/// The fields every family's config has, in the names most hub configs use.
fn common(g: &GgufFile, c: &mut Map<String, Json>) -> Result<()> {
    c.insert("hidden_size".into(), json!(need(g, "embedding_length")?));
    c.insert("num_hidden_layers".into(), json!(num_layers(g)?));
    c.insert(
        "num_attention_heads".into(),
        json!(need(g, "attention.head_count")?),
    );
    if let Some(kv) = g.arch_u64("attention.head_count_kv") {
        c.insert("num_key_value_heads".into(), json!(kv));
    }
    c.insert("vocab_size".into(), json!(vocab(g)?));
    if let Some(n) = g.arch_u64("context_length") {
        c.insert("max_position_embeddings".into(), json!(n));
    }
    c.insert(
        "rms_norm_eps".into(),
        json!(short(need_f(g, "attention.layer_norm_rms_epsilon")?)),
    );
    c.insert(
        "num_experts_per_tok".into(),
        json!(need(g, "expert_used_count")?),
    );
    ids_and_tie(g, c);
    Ok(())
}

fn vocab(g: &GgufFile) -> Result<u64> {
    g.dims("token_embd.weight")
        .and_then(|d| d.first().map(|v| *v as u64))
        .or(g.arch_u64("vocab_size"))
        .ok_or_else(|| g.corrupt("no token_embd.weight tensor".into()))
}

fn ids_and_tie(g: &GgufFile, c: &mut Map<String, Json>) {
    c.insert(
        "tie_word_embeddings".into(),
        json!(!has(g, "output.weight")),
    );
    if let Some(b) = g.meta_u64("tokenizer.ggml.bos_token_id") {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = g.meta_u64("tokenizer.ggml.eos_token_id") {
        c.insert("eos_token_id".into(), json!(e));
    }
}

/// `rope_parameters` from `rope.freq_base` and `rope.scaling.*`: "default" or "yarn" (another
/// scaling type is passed on for the family parser to refuse by name).
fn rope_parameters(g: &GgufFile, yarn_extra: &dyn Fn(&mut Map<String, Json>)) -> Result<Json> {
    let a = g.arch();
    let mut r = Map::new();
    if let Some(t) = g.meta_f64(&format!("{a}.rope.freq_base")) {
        r.insert("rope_theta".into(), json!(short(t)));
    }
    let key = |k: &str| format!("{a}.rope.scaling.{k}");
    for k in ["attn_factor", "yarn_ext_factor"] {
        if let Some(x) = g.meta_f64(&key(k)) {
            if x != 1.0 {
                return Err(g.unsupported(format!(
                    "metadata {} = {x}: a rope scaling {k} other than 1 is not implemented",
                    key(k)
                )));
            }
        }
    }
    let ty = g.meta_str(&key("type")).unwrap_or("none");
    match ty {
        "none" => {
            r.insert("rope_type".into(), json!("default"));
        }
        "yarn" => {
            r.insert("rope_type".into(), json!("yarn"));
            r.insert(
                "factor".into(),
                json!(short(g.meta_f64(&key("factor")).ok_or_else(|| {
                    g.corrupt(format!("metadata {} is missing (YaRN)", key("factor")))
                })?)),
            );
            let orig = g.meta_u64(&key("original_context_length")).ok_or_else(|| {
                g.corrupt(format!(
                    "metadata {} is missing (YaRN)",
                    key("original_context_length")
                ))
            })?;
            r.insert("original_max_position_embeddings".into(), json!(orig));
            for (k, hub) in [
                ("yarn_beta_fast", "beta_fast"),
                ("yarn_beta_slow", "beta_slow"),
                ("yarn_attn_factor", "attention_factor"),
            ] {
                if let Some(x) = g.meta_f64(&key(k)) {
                    r.insert(hub.into(), json!(short(x)));
                }
            }
            yarn_extra(&mut r);
        }
        other => {
            // The family parser names what it does not implement.
            r.insert("rope_type".into(), json!(other));
            if let Some(f) = g.meta_f64(&key("factor")) {
                r.insert("factor".into(), json!(short(f)));
            }
        }
    }
    Ok(Json::Object(r))
}

/// The hub `config.json` of a `deepseek2`, `glm4moe`, `gpt-oss` or `dbrx` file; `None` for
/// another architecture.
pub(crate) fn config_json(g: &GgufFile) -> Result<Option<Json>> {
    let c = match g.arch() {
        "deepseek2" => deepseek2_config(g)?,
        "glm4moe" => glm4moe_config(g)?,
        "gpt-oss" => gpt_oss_config(g)?,
        "dbrx" => dbrx_config(g)?,
        _ => return Ok(None),
    };
    Ok(Some(Json::Object(c)))
}

fn any_layer_has(g: &GgufFile, base_suffix: &str) -> bool {
    g.tensor_names()
        .any(|n| n.starts_with("blk.") && n.ends_with(&format!(".{base_suffix}")))
}

/// `expert_gating_func`: 1 softmax, 2 sigmoid.
fn gating(g: &GgufFile) -> Result<Option<&'static str>> {
    let key = format!("{}.expert_gating_func", g.arch());
    match g.meta_u64(&key) {
        None => Ok(None),
        Some(1) => Ok(Some("softmax")),
        Some(2) => Ok(Some("sigmoid")),
        Some(x) => Err(g.unsupported(format!(
            "metadata {key} = {x} is not implemented (1 softmax, 2 sigmoid)"
        ))),
    }
}

fn deepseek2_config(g: &GgufFile) -> Result<Map<String, Json>> {
    let a = g.arch();
    let mut c = Map::new();
    common(g, &mut c)?;
    let kv_lora = need(g, "attention.kv_lora_rank")?;
    let rope = need(g, "rope.dimension_count")?;
    let (k_head, v_head) = match (
        g.arch_u64("attention.key_length_mla"),
        g.arch_u64("attention.value_length_mla"),
    ) {
        (Some(k), Some(v)) => {
            // key_length is the latent's width then (MLA stored as one shared key head).
            if let Some(kl) = g.arch_u64("attention.key_length") {
                if kl != kv_lora + rope {
                    return Err(g.corrupt(format!(
                        "metadata {a}.attention.key_length = {kl}, but kv_lora_rank + \
                         rope.dimension_count = {kv_lora} + {rope}"
                    )));
                }
            }
            (k, v)
        }
        (None, None) => (
            need(g, "attention.key_length")?,
            need(g, "attention.value_length")?,
        ),
        (Some(_), None) => {
            return Err(g.corrupt(format!(
                "metadata {a}.attention.value_length_mla is missing (key_length_mla is set)"
            )))
        }
        (None, Some(_)) => {
            return Err(g.corrupt(format!(
                "metadata {a}.attention.key_length_mla is missing (value_length_mla is set)"
            )))
        }
    };
    if k_head <= rope {
        return Err(g.corrupt(format!(
            "metadata {a}: the key heads ({k_head}) are not wider than their rotary part \
             (rope.dimension_count = {rope})"
        )));
    }
    c.insert("kv_lora_rank".into(), json!(kv_lora));
    c.insert("qk_rope_head_dim".into(), json!(rope));
    c.insert("qk_nope_head_dim".into(), json!(k_head - rope));
    c.insert("v_head_dim".into(), json!(v_head));
    let q_lora = g.arch_u64("attention.q_lora_rank").filter(|r| *r > 0);
    if q_lora.is_some() != has(g, "blk.0.attn_q_a.weight") {
        return Err(g.corrupt(format!(
            "metadata {a}.attention.q_lora_rank is {} but blk.0.attn_q_a.weight is {}",
            if q_lora.is_some() { "set" } else { "missing" },
            if q_lora.is_some() { "missing" } else { "there" }
        )));
    }
    c.insert("q_lora_rank".into(), json!(q_lora));
    c.insert("rope_interleave".into(), json!(true));
    let bias = any_layer_has(g, "exp_probs_b.bias");
    let sigmoid = match gating(g)? {
        Some(f) => f == "sigmoid",
        None => bias,
    };
    if !sigmoid && bias {
        return Err(g.unsupported(format!(
            "metadata {a}.expert_gating_func is softmax but the file has exp_probs_b \
             (a routing-correction bias, which only sigmoid routing uses)"
        )));
    }
    let experts = need(g, "expert_count")?;
    let n_group = g.arch_u64("expert_group_count");
    let topk_group = g.arch_u64("expert_group_used_count");
    if let Some(n) = n_group {
        c.insert("n_group".into(), json!(n));
        let k = topk_group.ok_or_else(|| {
            g.corrupt(format!(
                "metadata {a}.expert_group_used_count is missing (expert_group_count = {n})"
            ))
        })?;
        c.insert("topk_group".into(), json!(k));
    }
    if sigmoid {
        c.insert("model_type".into(), json!("deepseek_v3"));
        c.insert("scoring_func".into(), json!("sigmoid"));
        c.insert("topk_method".into(), json!("noaux_tc"));
    } else {
        c.insert("model_type".into(), json!("deepseek_v2"));
        c.insert("scoring_func".into(), json!("softmax"));
        let grouped = n_group.is_some_and(|n| n > 1);
        c.insert(
            "topk_method".into(),
            json!(if grouped {
                "group_limited_greedy"
            } else {
                "greedy"
            }),
        );
    }
    // The converter writes expert_weights_norm only when it is true.
    c.insert(
        "norm_topk_prob".into(),
        json!(meta_bool(g, &format!("{a}.expert_weights_norm"))?.unwrap_or(false)),
    );
    c.insert("n_routed_experts".into(), json!(experts));
    c.insert(
        "n_shared_experts".into(),
        json!(g.arch_u64("expert_shared_count").unwrap_or(0)),
    );
    let moe_ff = need(g, "expert_feed_forward_length")?;
    c.insert("moe_intermediate_size".into(), json!(moe_ff));
    c.insert(
        "intermediate_size".into(),
        json!(g.arch_u64("feed_forward_length").unwrap_or(moe_ff)),
    );
    c.insert(
        "first_k_dense_replace".into(),
        json!(g.arch_u64("leading_dense_block_count").unwrap_or(0)),
    );
    if let Some(s) = g.meta_f64(&format!("{a}.expert_weights_scale")) {
        c.insert("routed_scaling_factor".into(), json!(short(s)));
    }
    c.insert(
        "attention_bias".into(),
        json!(has(g, "blk.0.attn_kv_a_mqa.bias")),
    );
    let log_mul_key = format!("{a}.rope.scaling.yarn_log_multiplier");
    let log_mul = g.meta_f64(&log_mul_key);
    c.insert(
        "rope_parameters".into(),
        rope_parameters(g, &|r| {
            if let Some(m) = log_mul {
                // 0.1 * mscale_all_dim: the config's decimal is the f32's shortest decimal
                // times 10 (0.08 -> 0.8; dividing the f32 by 0.1 gives 0.79999995). mscale
                // is not written: llama.cpp takes mscale_all_dim when that is not 1, else 1,
                // which is mscale_all_dim either way.
                let all = short(short(m) * 10.0);
                r.insert("mscale_all_dim".into(), json!(all));
                r.insert("mscale".into(), json!(all));
            }
        })?,
    );
    Ok(c)
}

fn glm4moe_config(g: &GgufFile) -> Result<Map<String, Json>> {
    let a = g.arch();
    let mut c = Map::new();
    common(g, &mut c)?;
    c.insert("model_type".into(), json!("glm4_moe"));
    let heads = need(g, "attention.head_count")?;
    let head_dim = match g.arch_u64("attention.key_length") {
        Some(k) => k,
        None => need(g, "embedding_length")? / heads.max(1),
    };
    if let Some(v) = g.arch_u64("attention.value_length") {
        if v != head_dim {
            return Err(g.unsupported(format!(
                "metadata {a}.attention.value_length = {v} differs from the key heads \
                 ({head_dim}); tandem's GLM-4.5 has one head size"
            )));
        }
    }
    c.insert("head_dim".into(), json!(head_dim));
    if let Some(f) = gating(g)? {
        if f != "sigmoid" {
            return Err(g.unsupported(format!(
                "metadata {a}.expert_gating_func is {f}; GLM-4.5 routes with sigmoid scores"
            )));
        }
    }
    let mut rope = rope_parameters(g, &|_| {})?;
    let rot = g.arch_u64("rope.dimension_count").unwrap_or(head_dim / 2);
    let factor = rot as f64 / head_dim as f64;
    if rot == 0 || rot > head_dim || (head_dim as f64 * factor) as u64 != rot {
        return Err(g.unsupported(format!(
            "metadata {a}.rope.dimension_count = {rot} is not a rotary part of the {head_dim}-wide \
             heads that partial_rotary_factor can express"
        )));
    }
    if let Json::Object(r) = &mut rope {
        r.insert("partial_rotary_factor".into(), json!(factor));
    }
    c.insert("rope_parameters".into(), rope);
    c.insert("n_routed_experts".into(), json!(need(g, "expert_count")?));
    let moe_ff = need(g, "expert_feed_forward_length")?;
    c.insert("moe_intermediate_size".into(), json!(moe_ff));
    c.insert(
        "intermediate_size".into(),
        json!(g.arch_u64("feed_forward_length").unwrap_or(moe_ff)),
    );
    // Absent keys keep the family's defaults (the converter writes each one the hub config
    // has).
    for (k, hub) in [
        ("expert_shared_count", "n_shared_experts"),
        ("expert_group_count", "n_group"),
        ("expert_group_used_count", "topk_group"),
        ("leading_dense_block_count", "first_k_dense_replace"),
    ] {
        if let Some(x) = g.arch_u64(k) {
            c.insert(hub.into(), json!(x));
        }
    }
    if let Some(s) = g.meta_f64(&format!("{a}.expert_weights_scale")) {
        c.insert("routed_scaling_factor".into(), json!(short(s)));
    }
    if let Some(b) = meta_bool(g, &format!("{a}.expert_weights_norm"))? {
        c.insert("norm_topk_prob".into(), json!(b));
    }
    c.insert("attention_bias".into(), json!(has(g, "blk.0.attn_q.bias")));
    c.insert(
        "use_qk_norm".into(),
        json!(has(g, "blk.0.attn_q_norm.weight")),
    );
    Ok(c)
}

fn gpt_oss_config(g: &GgufFile) -> Result<Map<String, Json>> {
    let a = g.arch();
    let mut c = Map::new();
    common(g, &mut c)?;
    c.insert("model_type".into(), json!("gpt_oss"));
    let heads = need(g, "attention.head_count")?;
    let head_dim = match g.arch_u64("attention.key_length") {
        Some(k) => k,
        None => need(g, "embedding_length")? / heads.max(1),
    };
    for k in ["attention.value_length", "rope.dimension_count"] {
        if let Some(v) = g.arch_u64(k) {
            if v != head_dim {
                return Err(g.unsupported(format!(
                    "metadata {a}.{k} = {v} differs from the head size ({head_dim}); \
                     GPT-OSS has one head size and rotates whole heads"
                )));
            }
        }
    }
    c.insert("head_dim".into(), json!(head_dim));
    let experts = need(g, "expert_count")?;
    c.insert("num_local_experts".into(), json!(experts));
    c.insert(
        "intermediate_size".into(),
        json!(match g.arch_u64("expert_feed_forward_length") {
            Some(f) => f,
            None => need(g, "feed_forward_length")?,
        }),
    );
    if let Some(f) = gating(g)? {
        if f != "softmax" {
            return Err(g.unsupported(format!(
                "metadata {a}.expert_gating_func is {f}; GPT-OSS routes with a softmax"
            )));
        }
    }
    // llama.cpp's clamped SwiGLU for this architecture (not in the metadata).
    c.insert("swiglu_alpha".into(), json!(1.702));
    c.insert("swiglu_limit".into(), json!(7.0));
    c.insert("attention_bias".into(), json!(has(g, "blk.0.attn_q.bias")));
    let layers = num_layers(g)? as usize;
    let window = g.arch_u64("attention.sliding_window").filter(|w| *w > 0);
    let pattern_key = format!("{a}.attention.sliding_window_pattern");
    let sliding: Vec<bool> = match g.meta(&pattern_key) {
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                return Err(g.corrupt(format!(
                    "metadata {pattern_key} has {} entries for {layers} layers",
                    flags.len()
                )));
            }
            flags
                .iter()
                .map(|f| match f {
                    Value::Bool(b) => Ok(*b),
                    v => Err(g.corrupt(format!("metadata {pattern_key} holds {v:?}, not bools"))),
                })
                .collect::<Result<_>>()?
        }
        other => {
            // A period n: layer l slides unless it is the last of its n (llama.cpp's rule).
            let n = match other {
                None => 2,
                Some(v) => v.to_u64().map_err(|_| {
                    g.corrupt(format!(
                        "metadata {pattern_key} is {v:?}, not a number or flags"
                    ))
                })?,
            };
            (0..layers as u64).map(|l| n > 0 && l % n < n - 1).collect()
        }
    };
    if window.is_none() && sliding.iter().any(|s| *s) {
        return Err(g.corrupt(format!(
            "metadata {a}.attention.sliding_window is missing or 0 but layers slide"
        )));
    }
    if let Some(w) = window {
        c.insert("sliding_window".into(), json!(w));
    }
    c.insert(
        "layer_types".into(),
        json!(sliding
            .iter()
            .map(|s| if *s {
                "sliding_attention"
            } else {
                "full_attention"
            })
            .collect::<Vec<_>>()),
    );
    c.insert(
        "rope_parameters".into(),
        rope_parameters(g, &|r| {
            r.insert("truncate".into(), json!(false));
        })?,
    );
    Ok(c)
}

fn dbrx_config(g: &GgufFile) -> Result<Map<String, Json>> {
    let a = g.arch();
    let eps_key = format!("{a}.attention.layer_norm_epsilon");
    if let Some(e) = g.meta_f64(&eps_key) {
        if e as f32 != 1e-5f32 {
            return Err(g.unsupported(format!(
                "metadata {eps_key} = {e}: DBRX's LayerNorm epsilon is 1e-5"
            )));
        }
    }
    let heads = need(g, "attention.head_count")?;
    let mut attn = Map::new();
    attn.insert(
        "kv_n_heads".into(),
        json!(g.arch_u64("attention.head_count_kv").unwrap_or(heads)),
    );
    if let Some(t) = g.meta_f64(&format!("{a}.rope.freq_base")) {
        attn.insert("rope_theta".into(), json!(short(t)));
    }
    if let Some(x) = g.meta_f64(&format!("{a}.attention.clamp_kqv")) {
        attn.insert("clip_qkv".into(), json!(short(x)));
    }
    if let Some(t) = g.meta_str(&format!("{a}.rope.scaling.type")) {
        if t != "none" {
            return Err(g.unsupported(format!(
                "metadata {a}.rope.scaling.type = {t:?}: DBRX has no rope scaling"
            )));
        }
    }
    let ff = need(g, "feed_forward_length")?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!("dbrx"));
    c.insert("d_model".into(), json!(need(g, "embedding_length")?));
    c.insert("n_heads".into(), json!(heads));
    c.insert("n_layers".into(), json!(need(g, "block_count")?));
    if let Some(n) = g.arch_u64("context_length") {
        c.insert("max_seq_len".into(), json!(n));
    }
    c.insert("vocab_size".into(), json!(vocab(g)?));
    c.insert("attn_config".into(), Json::Object(attn));
    c.insert(
        "ffn_config".into(),
        json!({
            "ffn_hidden_size": ff,
            "moe_num_experts": need(g, "expert_count")?,
            "moe_top_k": need(g, "expert_used_count")?,
        }),
    );
    ids_and_tie(g, &mut c);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ModelError;

    fn reader(
        tensors: Vec<(&'static str, Vec<f32>)>,
    ) -> impl Fn(&str, &[usize]) -> Result<Vec<f32>> {
        move |name: &str, shape: &[usize]| {
            let (_, v) = tensors
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| ModelError::Input(format!("no {name}")))?;
            assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
            Ok(v.clone())
        }
    }

    /// The converter's kv_b split (view [H, nope + v, R], split, k transposed) undone.
    #[test]
    fn kv_b_is_rebuilt_from_its_halves() {
        let (h, nope, v, r) = (3usize, 4usize, 2usize, 5usize);
        let kv_b: Vec<f32> = (0..h * (nope + v) * r).map(|i| i as f32).collect();
        // k_b[h][j][i] = kv_b[h][i][j] (i < nope); v_b[h][i][j] = kv_b[h][nope + i][j]
        let mut k_b = vec![0f32; h * r * nope];
        let mut v_b = vec![0f32; h * v * r];
        for hh in 0..h {
            for i in 0..nope + v {
                for j in 0..r {
                    let x = kv_b[(hh * (nope + v) + i) * r + j];
                    if i < nope {
                        k_b[(hh * r + j) * nope + i] = x;
                    } else {
                        v_b[(hh * v + i - nope) * r + j] = x;
                    }
                }
            }
        }
        let s = Synth::KvB {
            k_b: "k".into(),
            v_b: "v".into(),
            heads: h,
            nope,
            v,
            rank: r,
        };
        let got = s.build(&reader(vec![("k", k_b), ("v", v_b)])).unwrap();
        assert_eq!(got, kv_b);
    }

    /// The converter's gate/up bias split (columns 0::2 and 1::2) undone.
    #[test]
    fn gate_up_bias_is_interleaved_back() {
        let (e, f) = (2usize, 4usize);
        let bias: Vec<f32> = (0..e * 2 * f).map(|i| i as f32).collect();
        let gb: Vec<f32> = bias.iter().step_by(2).copied().collect();
        let ub: Vec<f32> = bias.iter().skip(1).step_by(2).copied().collect();
        let s = Synth::GateUpBias {
            gate: "g".into(),
            up: "u".into(),
            experts: e,
            f,
        };
        assert_eq!(s.build(&reader(vec![("g", gb), ("u", ub)])).unwrap(), bias);
    }

    #[test]
    fn experts_are_transposed_one_by_one() {
        // two experts of [2, 3]
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let s = Synth::Transposed {
            src: "x".into(),
            experts: 2,
            rows: 2,
            cols: 3,
        };
        assert_eq!(
            s.build(&reader(vec![("x", x)])).unwrap(),
            vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]
        );
    }
}
