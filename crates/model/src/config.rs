//! The model configuration every family is parsed into. Each family file
//! (`families/*.rs`) has the serde struct of its own `config.json` at the top and converts it
//! here; the layers read only this struct.

use crate::error::{ModelError, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    Dbrx,
    Glm4Moe,
    DeepseekV2,
    DeepseekV3,
    GptOss,
}

impl Family {
    pub fn from_model_type(t: &str) -> Result<Self> {
        Ok(match t {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "olmoe" => Family::Olmoe,
            "dbrx" => Family::Dbrx,
            "glm4_moe" => Family::Glm4Moe,
            "deepseek_v2" => Family::DeepseekV2,
            "deepseek_v3" | "kimi_k2" => Family::DeepseekV3,
            "gpt_oss" => Family::GptOss,
            other => return Err(ModelError::UnknownFamily(other.to_string())),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
            Family::Dbrx => "dbrx",
            Family::Glm4Moe => "glm4_moe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::GptOss => "gpt_oss",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum NormKind {
    Rms,
    /// LayerNorm without bias (DBRX).
    LayerNoBias,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3-MoE).
    PerHead,
    /// RMSNorm over the whole q / k projection (OLMoE).
    Full,
}

/// How a router turns its logits into the top-k experts of a token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum RouterKind {
    /// Softmax over every expert, then the top k (Mixtral, Qwen, OLMoE, DBRX, DeepSeek-V2's
    /// `greedy`).
    Softmax,
    /// DeepSeek-V2's `group_limited_greedy`: softmax; the experts split into `n_group` equal
    /// groups ranked by their best probability; only the top `topk_group` groups compete.
    SoftmaxGroupLimited { n_group: usize, topk_group: usize },
    /// DeepSeek-V3's and GLM-4.5's `noaux_tc`: sigmoid scores; experts are *chosen* by score
    /// plus the per-expert `e_score_correction_bias`, groups ranked by the sum of their two
    /// best biased scores; the weights are the unbiased scores.
    SigmoidNoauxTc { n_group: usize, topk_group: usize },
}

/// YaRN rope scaling (`rope_type: "yarn"`): interpolated low frequencies, extrapolated high
/// ones, a linear ramp between, and cos/sin scaled by an attention factor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// YaRN's magnitude correction `0.1 * m * ln(scale) + 1` (1 when not stretching).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Yarn {
    /// The factor cos and sin are multiplied by.
    pub fn cos_sin_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                yarn_mscale(self.factor, m) / yarn_mscale(self.factor, ma)
            }
            _ => yarn_mscale(self.factor, 1.0),
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through an optional low-rank
/// bottleneck, keys and values compressed to one `kv_lora_rank` latent per token plus a
/// decoupled rotary key of `qk_rope_head_dim` shared by all heads. The KV cache holds only
/// the latent and the rotary key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mla {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl Mla {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// Floats one token occupies in one layer's cache.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Sliding-window attention: a query at position `p` of a layer with `layers[l]` set sees the
/// positions `p + 1 - window ..= p` only (transformers' `kv_idx > q_idx - sliding_window`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlidingWindow {
    pub window: usize,
    /// `layers[l]`: layer `l` uses the window (`"sliding_attention"`), else full attention.
    pub layers: Vec<bool>,
}

impl SlidingWindow {
    /// The window of layer `l`, if it has one.
    pub fn of_layer(&self, l: usize) -> Option<usize> {
        self.layers
            .get(l)
            .copied()
            .unwrap_or(false)
            .then_some(self.window)
    }
}

/// The gated activation `act(gate, up)` of an FFN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub enum ExpertAct {
    /// `silu(gate) * up` (every family but GPT-OSS).
    #[default]
    Silu,
    /// GPT-OSS: `gate` clamped above at `limit`, `up` to `[-limit, limit]`, then
    /// `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// How the top-k router weights are rescaled after softmax + top-k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum TopkNorm {
    None,
    /// Divide by their sum (Mixtral; `norm_topk_prob`).
    Sum,
    /// Divide by their p-norm (DBRX `moe_normalize_expert_weights`).
    PNorm(f32),
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub rope_theta: f64,
    pub qkv_bias: bool,
    pub clip_qkv: Option<f32>,
    pub qk_norm: QkNorm,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_intermediate_size: usize,
    pub topk_norm: TopkNorm,
    pub router: RouterKind,
    /// The routed experts' weights are multiplied by this after normalisation (DeepSeek,
    /// GLM-4.5); 1 elsewhere.
    pub routed_scaling_factor: f32,
    /// Leading dimensions of each head that rotary embeddings rotate (`head_dim` unless the
    /// family has `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Rotary pairs are adjacent `(x0, x1), (x2, x3)` (DeepSeek) rather than the two halves.
    pub rope_interleaved: bool,
    pub yarn: Option<Yarn>,
    /// Multi-head latent attention instead of grouped-query attention.
    pub mla: Option<Mla>,
    /// Sliding-window attention on some layers (GPT-OSS's `layer_types`); `None`: every layer
    /// attends to all earlier positions.
    pub sliding_window: Option<SlidingWindow>,
    /// The gated activation of the routed experts (`GatedMlp::act`, set by the family file
    /// where it builds them; dense and shared MLPs stay SiLU).
    pub expert_act: ExpertAct,
    /// Qwen2-MoE's always-on shared expert (with a sigmoid gate), its FFN width.
    pub shared_expert_intermediate_size: Option<usize>,
    /// FFN width of dense (non-MoE) layers.
    pub dense_intermediate_size: usize,
    /// `dense_layers[l]`: layer `l` has a dense MLP instead of routed experts.
    pub dense_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and parses `dir/config.json`, or the metadata of a GGUF file.
    pub fn from_dir(src: impl Into<crate::ModelSource>) -> Result<Self> {
        let dir = match src.into() {
            crate::ModelSource::Gguf(f) => {
                return Self::from_gguf(&crate::gguf::GgufFile::open(&f)?)
            }
            crate::ModelSource::HfDir(d) => d,
        };
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// The hub `config.json` a GGUF file's metadata stands for, through the same parser and
    /// validation as a checkpoint directory's.
    pub fn from_gguf(g: &crate::gguf::GgufFile) -> Result<Self> {
        Self::from_value(g.config_json()?, &g.path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::from_value(v, path)
    }

    fn from_value(v: Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                msg: "no \"model_type\" string".into(),
            })?;
        let family = Family::from_model_type(model_type)?;
        let cx = ParseCx {
            path: path.to_path_buf(),
        };
        check_limits(&v, &cx)?;
        let cfg = match family {
            Family::Mixtral => crate::families::mixtral::parse(&v, &cx)?,
            Family::Qwen2Moe => crate::families::qwen2_moe::parse(&v, &cx)?,
            Family::Qwen3Moe => crate::families::qwen3_moe::parse(&v, &cx)?,
            Family::Olmoe => crate::families::olmoe::parse(&v, &cx)?,
            Family::Dbrx => crate::families::dbrx::parse(&v, &cx)?,
            Family::Glm4Moe => crate::families::glm4_moe::parse(&v, &cx)?,
            Family::DeepseekV2 | Family::DeepseekV3 => {
                crate::families::deepseek::parse(&v, &cx, family)?
            }
            Family::GptOss => crate::families::gpt_oss::parse(&v, &cx)?,
        };
        cfg.validate(&cx)?;
        Ok(cfg)
    }

    fn validate(&self, cx: &ParseCx) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.top_k),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(cx.err(format!("{k} must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(cx.err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.top_k > self.num_experts {
            return Err(cx.err(format!(
                "num_experts_per_tok ({}) exceeds the number of experts ({})",
                self.top_k, self.num_experts
            )));
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return Err(cx.err(format!(
                "the rotary dimensions ({}) must be even and at most head_dim ({})",
                self.rotary_dim, self.head_dim
            )));
        }
        match self.router {
            RouterKind::Softmax => {}
            RouterKind::SoftmaxGroupLimited {
                n_group,
                topk_group,
            }
            | RouterKind::SigmoidNoauxTc {
                n_group,
                topk_group,
            } => {
                if n_group == 0 || !self.num_experts.is_multiple_of(n_group) {
                    return Err(cx.err(format!(
                        "n_group ({n_group}) must divide the number of experts ({})",
                        self.num_experts
                    )));
                }
                if topk_group == 0 || topk_group > n_group {
                    return Err(cx.err(format!(
                        "topk_group ({topk_group}) must be between 1 and n_group ({n_group})"
                    )));
                }
                let per_group = self.num_experts / n_group;
                if matches!(self.router, RouterKind::SigmoidNoauxTc { .. }) && per_group < 2 {
                    return Err(cx.err(format!(
                        "noaux_tc routing ranks groups by their two best experts: n_group \
                         ({n_group}) leaves {per_group} expert per group"
                    )));
                }
                if topk_group * per_group < self.top_k {
                    return Err(cx.err(format!(
                        "topk_group ({topk_group}) groups of {per_group} experts cannot hold \
                         num_experts_per_tok ({})",
                        self.top_k
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.dense_layers.get(layer).copied().unwrap_or(false)
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Floats one token takes in one layer's key and value caches: `kv_dim` each, or the
    /// latent plus the rotary key (and no separate values) under MLA.
    pub fn kv_cache_widths(&self) -> (usize, usize) {
        match &self.mla {
            Some(m) => (m.latent_dim(), 0),
            None => (self.kv_dim(), self.kv_dim()),
        }
    }

    /// Total parameters (counting every expert).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let attn = match &self.mla {
            Some(m) => {
                let h = self.num_heads;
                let q = match m.q_lora_rank {
                    Some(r) => d * r + r + r * h * m.qk_head_dim(),
                    None => d * h * m.qk_head_dim(),
                };
                q + d * m.latent_dim()
                    + m.kv_lora_rank
                    + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
                    + h * m.v_head_dim * d
            }
            None => d * (self.q_dim() + 2 * self.kv_dim()) + self.q_dim() * d,
        };
        let mut total = self.vocab_size * d * if self.tie_word_embeddings { 1 } else { 2 };
        for l in 0..self.num_layers {
            total += attn + d * 2;
            if self.is_moe_layer(l) {
                total += self.num_experts * (d + 3 * d * self.moe_intermediate_size);
                if let Some(s) = self.shared_expert_intermediate_size {
                    total += 3 * d * s + d;
                }
            } else {
                total += 3 * d * self.dense_intermediate_size;
            }
        }
        total
    }
}

/// What [`ParseCx::rope_with_yarn`] reads.
#[derive(Debug, Clone, Copy)]
pub struct RopeParams {
    pub theta: f64,
    pub yarn: Option<Yarn>,
    pub partial_rotary_factor: f64,
}

/// Context for parse errors (the config path).
pub struct ParseCx {
    pub path: PathBuf,
}

impl ParseCx {
    pub fn err(&self, msg: String) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            msg,
        }
    }
    pub fn unsupported(&self, msg: String) -> ModelError {
        ModelError::Unsupported {
            path: self.path.clone(),
            msg,
        }
    }
    /// Deserialises the family's raw config struct; errors name the offending key.
    pub fn typed<T: serde::de::DeserializeOwned>(&self, v: &Value) -> Result<T> {
        serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                self.err(inner.to_string())
            } else {
                self.err(format!("{path}: {inner}"))
            }
        })
    }

    /// The rope base, from either layout: transformers 5's `rope_parameters` or the older
    /// top-level `rope_theta` (+ `rope_scaling`). Any scaling other than the default is
    /// refused rather than silently ignored.
    pub fn rope_theta(
        &self,
        v: &Value,
        legacy_theta: Option<f64>,
        default_theta: f64,
    ) -> Result<f64> {
        let check_type = |obj: &Value, key: &str| -> Result<()> {
            let t = obj
                .get("rope_type")
                .or_else(|| obj.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if t != "default" {
                return Err(self.unsupported(format!(
                    "{key}: rope type {t:?} is not implemented (only \"default\")"
                )));
            }
            Ok(())
        };
        if let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) {
            check_type(s, "rope_scaling")?;
        }
        if let Some(p) = v.get("rope_parameters").filter(|p| !p.is_null()) {
            check_type(p, "rope_parameters")?;
            if let Some(t) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                return Ok(t);
            }
        }
        Ok(legacy_theta.unwrap_or(default_theta))
    }

    /// The rope base, YaRN scaling and `partial_rotary_factor` of the families that have
    /// them, from either layout (`rope_parameters`, or top-level `rope_theta` +
    /// `rope_scaling`). Rope types other than "default" and "yarn" are refused.
    pub fn rope_with_yarn(
        &self,
        v: &Value,
        legacy_theta: Option<f64>,
        default_theta: f64,
        max_position_embeddings: usize,
    ) -> Result<RopeParams> {
        let params = v
            .get("rope_parameters")
            .filter(|p| !p.is_null())
            .map(|p| ("rope_parameters", p))
            .or_else(|| {
                v.get("rope_scaling")
                    .filter(|s| !s.is_null())
                    .map(|s| ("rope_scaling", s))
            });
        let num = |obj: &Value, k: &str| obj.get(k).and_then(|x| x.as_f64());
        let mut out = RopeParams {
            theta: legacy_theta.unwrap_or(default_theta),
            yarn: None,
            partial_rotary_factor: num(v, "partial_rotary_factor").unwrap_or(1.0),
        };
        let Some((key, p)) = params else {
            return Ok(out);
        };
        if let Some(t) = num(p, "rope_theta") {
            out.theta = t;
        }
        if let Some(f) = num(p, "partial_rotary_factor") {
            out.partial_rotary_factor = f;
        }
        let t = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        match t {
            "default" => {}
            "yarn" => {
                let factor = num(p, "factor")
                    .ok_or_else(|| self.err(format!("{key}.factor: YaRN needs a factor")))?;
                let orig = match p
                    .get("original_max_position_embeddings")
                    .and_then(|x| x.as_u64())
                {
                    Some(o) => o as usize,
                    None => max_position_embeddings,
                };
                out.yarn = Some(Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: num(p, "beta_fast").unwrap_or(32.0),
                    beta_slow: num(p, "beta_slow").unwrap_or(1.0),
                    mscale: num(p, "mscale"),
                    mscale_all_dim: num(p, "mscale_all_dim"),
                    attention_factor: num(p, "attention_factor"),
                    truncate: p.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
                });
            }
            other => {
                return Err(self.unsupported(format!(
                    "{key}: rope type {other:?} is not implemented (only \"default\" and \"yarn\")"
                )))
            }
        }
        if !(out.partial_rotary_factor > 0.0 && out.partial_rotary_factor <= 1.0) {
            return Err(self.err(format!(
                "partial_rotary_factor = {} must be in (0, 1]",
                out.partial_rotary_factor
            )));
        }
        Ok(out)
    }

    /// `eos_token_id` may be a number or a list.
    pub fn eos_ids(&self, v: &Value) -> Vec<u32> {
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        }
    }
}

/// Upper bounds on the sizes that allocations are made from before any tensor is checked, so
/// that an absurd config is an error rather than an out-of-memory abort.
fn check_limits(v: &Value, cx: &ParseCx) -> Result<()> {
    const LIMITS: [(&str, u64); 14] = [
        ("num_hidden_layers", 4096),
        ("n_layers", 4096),
        ("num_local_experts", 65536),
        ("num_experts", 65536),
        ("ffn_config.moe_num_experts", 65536),
        ("num_experts_per_tok", 65536),
        ("head_dim", 65536),
        ("hidden_size", 1 << 20),
        ("d_model", 1 << 20),
        ("num_attention_heads", 65536),
        ("n_heads", 65536),
        ("num_key_value_heads", 65536),
        ("vocab_size", 1 << 24),
        ("intermediate_size", 1 << 24),
    ];
    for (key, max) in LIMITS {
        let mut cur = Some(v);
        for part in key.split('.') {
            cur = cur.and_then(|c| c.get(part));
        }
        if let Some(n) = cur.and_then(|x| x.as_u64()) {
            if n > max {
                return Err(cx.err(format!(
                    "{key} = {n} is larger than tandem supports ({max})"
                )));
            }
        }
    }
    Ok(())
}

/// The "hidden_act" of every supported family must be SiLU.
pub fn check_silu(cx: &ParseCx, act: Option<&str>) -> Result<()> {
    match act {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(other) => Err(cx.unsupported(format!(
            "activation {other:?} is not implemented (only silu)"
        ))),
    }
}
