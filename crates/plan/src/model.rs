//! Model shapes: what the planner needs to know about an MoE model (no weights).
//!
//! Shapes come from the shipped catalog (`catalog/models.toml`: the paper's three models,
//! DeepSeek-V3, Qwen3-235B-A22B and small ones) or from any HF `config.json` of a supported
//! family. All sizes here are element counts; bytes follow from the device's dtype.

use crate::error::{read_file, PlanError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

const BUILTIN: &str = include_str!("../catalog/models.toml");

/// Multi-head latent attention (DeepSeek-V2/V3): the KV cache stores one compressed latent
/// of `kv_lora_rank + qk_rope_head_dim` elements per token per layer, shared by all heads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mla {
    /// 0 = no low-rank query projection.
    pub q_lora_rank: u64,
    pub kv_lora_rank: u64,
    pub qk_rope_head_dim: u64,
    pub qk_nope_head_dim: u64,
    pub v_head_dim: u64,
}

/// The shape of an MoE decoder. Symbols of the paper in brackets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// HF `model_type`.
    pub family: String,
    /// `h`.
    pub hidden_size: u64,
    /// `L`: decoder layers, MoE and dense.
    pub num_layers: u64,
    /// Leading layers whose FFN is dense (DeepSeek `first_k_dense_replace`; Qwen
    /// `mlp_only_layers`); they have no expert stage.
    #[serde(default)]
    pub num_dense_layers: u64,
    pub num_heads: u64,
    /// KV heads (`num_heads / g`).
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    /// `E`: routed experts per MoE layer.
    pub num_experts: u64,
    /// `K`: experts per token.
    pub top_k: u64,
    /// `h'`: intermediate size of one routed expert.
    pub expert_intermediate: u64,
    /// Summed intermediate size of the shared experts of one MoE layer (0 = none).
    #[serde(default)]
    pub shared_expert_intermediate: u64,
    /// Intermediate size of the dense FFN layers.
    #[serde(default)]
    pub dense_intermediate: u64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub mla: Option<Mla>,
    #[serde(default)]
    pub source: String,
}

impl ModelShape {
    /// MoE layers (`L` of the pipeline: the layers with an expert stage).
    pub fn moe_layers(&self) -> u64 {
        self.num_layers.saturating_sub(self.num_dense_layers)
    }

    /// `g`: query heads per KV head (1 for MLA, whose latent is shared by all heads).
    pub fn gqa_group(&self) -> f64 {
        if self.mla.is_some() {
            1.0
        } else {
            self.num_heads as f64 / self.num_kv_heads.max(1) as f64
        }
    }

    /// How many ways the KV cache can be split across tensor-parallel ranks: KV heads for
    /// GQA, 1 for MLA (every rank holds the whole latent).
    pub fn kv_shardable(&self) -> u64 {
        if self.mla.is_some() {
            1
        } else {
            self.num_kv_heads.max(1)
        }
    }

    /// Attention projection weights of one layer, elements (QKV + output, or MLA's).
    pub fn attn_params_per_layer(&self) -> f64 {
        let h = self.hidden_size as f64;
        let nh = self.num_heads as f64;
        match &self.mla {
            Some(m) => {
                let qk = (m.qk_nope_head_dim + m.qk_rope_head_dim) as f64;
                let q = if m.q_lora_rank > 0 {
                    h * m.q_lora_rank as f64 + m.q_lora_rank as f64 * nh * qk
                } else {
                    h * nh * qk
                };
                let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim) as f64;
                let kv_b = m.kv_lora_rank as f64 * nh * (m.qk_nope_head_dim + m.v_head_dim) as f64;
                let o = nh * m.v_head_dim as f64 * h;
                q + kv_a + kv_b + o
            }
            None => {
                let hd = self.head_dim as f64;
                let q = h * nh * hd;
                let kv = 2.0 * h * self.num_kv_heads as f64 * hd;
                let o = nh * hd * h;
                q + kv + o
            }
        }
    }

    /// KV-cache elements per token per layer (`2 h / g` for GQA with `h = heads * head_dim`).
    pub fn kv_elems_per_token_layer(&self) -> f64 {
        match &self.mla {
            Some(m) => (m.kv_lora_rank + m.qk_rope_head_dim) as f64,
            None => 2.0 * self.num_kv_heads as f64 * self.head_dim as f64,
        }
    }

    /// Attention-core FLOPs per (query token, cached token) pair per layer: `QK^T` and `PV`.
    /// MLA counts the weight-absorbed form decoders use.
    pub fn attn_core_flops_per_pair(&self) -> f64 {
        let nh = self.num_heads as f64;
        match &self.mla {
            Some(m) => nh * 2.0 * ((m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank) as f64,
            None => nh * 4.0 * self.head_dim as f64,
        }
    }

    /// Router (gate) weights of one MoE layer, elements.
    pub fn router_params_per_layer(&self) -> f64 {
        (self.hidden_size * self.num_experts) as f64
    }

    /// One routed expert of one layer (SwiGLU: gate, up, down), elements.
    pub fn expert_params_per_layer(&self) -> f64 {
        3.0 * (self.hidden_size * self.expert_intermediate) as f64
    }

    /// Shared experts of one MoE layer, elements.
    pub fn shared_params_per_layer(&self) -> f64 {
        3.0 * (self.hidden_size * self.shared_expert_intermediate) as f64
    }

    /// Dense FFN of one dense layer, elements.
    pub fn dense_ffn_params_per_layer(&self) -> f64 {
        3.0 * (self.hidden_size * self.dense_intermediate) as f64
    }

    /// Embedding + LM head, elements.
    pub fn embedding_params(&self) -> f64 {
        let one = (self.vocab_size * self.hidden_size) as f64;
        if self.tie_word_embeddings {
            one
        } else {
            2.0 * one
        }
    }

    /// LM head, elements (read once per decode step per micro-batch).
    pub fn lm_head_params(&self) -> f64 {
        (self.vocab_size * self.hidden_size) as f64
    }

    /// `P_a`: everything an attention node holds, elements: attention of every layer, routers,
    /// shared experts and dense FFN layers (they run on attention nodes in tandem), embeddings.
    pub fn attention_side_params(&self) -> f64 {
        let l = self.num_layers as f64;
        let lm = self.moe_layers() as f64;
        let ld = self.num_dense_layers as f64;
        l * self.attn_params_per_layer()
            + lm * (self.router_params_per_layer() + self.shared_params_per_layer())
            + ld * self.dense_ffn_params_per_layer()
            + self.embedding_params()
    }

    /// `P_e` for one expert: that expert in every MoE layer, elements.
    pub fn params_per_expert(&self) -> f64 {
        self.moe_layers() as f64 * self.expert_params_per_layer()
    }

    /// All parameters, elements.
    pub fn total_params(&self) -> f64 {
        self.attention_side_params() + self.num_experts as f64 * self.params_per_expert()
    }

    /// Parameters one token touches, elements.
    pub fn active_params(&self) -> f64 {
        self.attention_side_params() - self.embedding_params()
            + self.lm_head_params()
            + self.top_k as f64 * self.params_per_expert()
    }

    fn matches(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    /// Checks the invariants the performance model divides by.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(PlanError::BadModel {
                path: self.name.clone(),
                msg,
            })
        };
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("num_experts", self.num_experts),
            ("top_k", self.top_k),
            ("expert_intermediate", self.expert_intermediate),
        ];
        for (f, v) in nonzero {
            if v == 0 {
                return bad(format!("{f} must be positive"));
            }
        }
        if self.top_k > self.num_experts {
            return bad(format!(
                "top_k {} exceeds num_experts {}",
                self.top_k, self.num_experts
            ));
        }
        if self.num_dense_layers >= self.num_layers {
            return bad("every layer is dense: this is not an MoE model".into());
        }
        if self.num_dense_layers > 0 && self.dense_intermediate == 0 {
            return bad("dense layers need dense_intermediate".into());
        }
        Ok(())
    }

    /// Parses an HF `config.json` text. `path` is only for messages.
    pub fn from_hf_config(text: &str, path: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| PlanError::Parse {
            path: path.to_string(),
            msg: e.to_string(),
        })?;
        parse_hf(&v, path)
    }

    /// Reads `dir/config.json` or a config file directly.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = read_file(&file)?;
        Self::from_hf_config(&text, &file.display().to_string())
    }
}

fn get_u64(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| {
        let mut cur = v;
        for part in k.split('.') {
            cur = cur.get(part)?;
        }
        cur.as_u64()
    })
}

fn parse_hf(v: &Value, path: &str) -> Result<ModelShape> {
    let bad = |msg: String| PlanError::BadModel {
        path: path.to_string(),
        msg,
    };
    let family = v
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no model_type".into()))?
        .to_string();
    let need = |keys: &[&str]| -> Result<u64> {
        get_u64(v, keys).ok_or_else(|| bad(format!("missing {}", keys.join(" / "))))
    };
    let known = [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "dbrx",
        "deepseek_v3",
        "deepseek_v2",
        "glm4_moe",
        "gpt_oss",
    ];
    if !known.contains(&family.as_str()) {
        return Err(bad(format!(
            "model_type {family:?} is not a supported MoE family ({})",
            known.join(", ")
        )));
    }
    let hidden = need(&["hidden_size", "d_model"])?;
    let layers = need(&["num_hidden_layers", "n_layers"])?;
    let heads = need(&["num_attention_heads", "n_heads"])?;
    let kv_heads = get_u64(v, &["num_key_value_heads", "attn_config.kv_n_heads"]).unwrap_or(heads);
    let head_dim = get_u64(v, &["head_dim"]).unwrap_or(hidden / heads.max(1));
    let vocab = need(&["vocab_size"])?;
    let experts = need(&[
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "ffn_config.moe_num_experts",
    ])?;
    let top_k = need(&[
        "num_experts_per_tok",
        "ffn_config.moe_top_k",
        "experts_per_token",
    ])?;
    let is_ds = family.starts_with("deepseek");
    // GLM-4.5 lays out its experts, shared experts and dense first layers like DeepSeek.
    let ds_layout = is_ds || family == "glm4_moe";
    let expert_inter = match family.as_str() {
        "mixtral" | "olmoe" | "gpt_oss" => need(&["intermediate_size"])?,
        "dbrx" => need(&["ffn_config.ffn_hidden_size"])?,
        _ => need(&["moe_intermediate_size"])?,
    };
    let shared = if ds_layout {
        let default_shared = if is_ds { 0 } else { 1 };
        get_u64(v, &["n_shared_experts"]).unwrap_or(default_shared) * expert_inter
    } else {
        get_u64(v, &["shared_expert_intermediate_size"]).unwrap_or(0)
    };
    let mut dense_layers = 0;
    let mut dense_inter = 0;
    if ds_layout {
        let default_dense = if is_ds { 0 } else { 1 };
        dense_layers = get_u64(v, &["first_k_dense_replace"]).unwrap_or(default_dense);
        dense_inter = get_u64(v, &["intermediate_size"]).unwrap_or(0);
    } else if family.starts_with("qwen") {
        let only = v
            .get("mlp_only_layers")
            .and_then(Value::as_array)
            .map_or(0, |a| a.len() as u64);
        let step = get_u64(v, &["decoder_sparse_step"]).unwrap_or(1).max(1);
        let sparse = (0..layers).filter(|l| (l + 1) % step == 0).count() as u64;
        dense_layers = (layers - sparse.min(layers)).max(only).min(layers);
        if dense_layers > 0 {
            dense_inter = get_u64(v, &["intermediate_size"]).unwrap_or(0);
        }
    }
    let mla = if is_ds {
        Some(Mla {
            q_lora_rank: get_u64(v, &["q_lora_rank"]).unwrap_or(0),
            kv_lora_rank: need(&["kv_lora_rank"])?,
            qk_rope_head_dim: need(&["qk_rope_head_dim"])?,
            qk_nope_head_dim: need(&["qk_nope_head_dim"])?,
            v_head_dim: need(&["v_head_dim"])?,
        })
    } else {
        None
    };
    let name = v
        .get("_name_or_path")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| path.to_string());
    let tie = v
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let shape = ModelShape {
        name,
        aliases: Vec::new(),
        family,
        hidden_size: hidden,
        num_layers: layers,
        num_dense_layers: dense_layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        num_experts: experts,
        top_k,
        expert_intermediate: expert_inter,
        shared_expert_intermediate: shared,
        dense_intermediate: dense_inter,
        tie_word_embeddings: tie,
        mla,
        source: path.to_string(),
    };
    shape.validate().map_err(|e| match e {
        PlanError::BadModel { msg, .. } => bad(msg),
        other => other,
    })?;
    Ok(shape)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    model: Vec<ModelShape>,
}

/// The shipped model shapes.
#[derive(Debug, Clone)]
pub struct ModelCatalog {
    pub models: Vec<ModelShape>,
}

impl ModelCatalog {
    pub fn builtin() -> Result<Self> {
        let f: CatalogFile = toml::from_str(BUILTIN).map_err(|e| PlanError::Parse {
            path: "<builtin models.toml>".into(),
            msg: e.to_string(),
        })?;
        for m in &f.model {
            m.validate()?;
        }
        Ok(Self { models: f.model })
    }

    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    /// A catalog name (case-insensitive, aliases too) or a path to a `config.json` or a
    /// directory holding one.
    pub fn resolve(&self, name_or_path: &str) -> Result<ModelShape> {
        if let Some(m) = self.models.iter().find(|m| m.matches(name_or_path)) {
            return Ok(m.clone());
        }
        let p = Path::new(name_or_path);
        if p.exists() {
            return ModelShape::from_path(p);
        }
        Err(PlanError::UnknownModel {
            name: name_or_path.to_string(),
            known: self.names().join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> ModelCatalog {
        ModelCatalog::builtin().unwrap()
    }

    #[test]
    fn paper_models_have_their_parameter_counts() {
        // Paper Table 4: 141B, 132B, 317B; DeepSeek-V3 671B (MTP excluded), Qwen3 235B.
        let c = cat();
        for (name, billions) in [
            ("mixtral-8x22b", 141.0),
            ("dbrx", 132.0),
            ("scaled-moe", 317.0),
            ("deepseek-v3", 671.0),
            ("qwen3-235b-a22b", 235.0),
            ("mixtral-8x7b", 46.7),
            ("olmoe-1b-7b", 6.9),
            ("deepseek-v2", 236.0),
            ("deepseek-v2-lite", 15.7),
            ("glm-4.5", 355.0),
            ("glm-4.5-air", 106.0),
            ("gpt-oss-120b", 116.8),
            ("gpt-oss-20b", 20.9),
        ] {
            let m = c.resolve(name).unwrap();
            let got = m.total_params() / 1e9;
            assert!(
                (got - billions).abs() / billions < 0.015,
                "{name}: {got:.1}B vs {billions}B"
            );
        }
        // Active parameters of the newer families (their model cards: 21B, 2.4B, 32B, 12B).
        for (name, billions) in [
            ("deepseek-v2", 21.0),
            ("deepseek-v2-lite", 2.4),
            ("glm-4.5", 32.0),
            ("glm-4.5-air", 12.0),
        ] {
            let got = c.resolve(name).unwrap().active_params() / 1e9;
            assert!(
                (got - billions).abs() / billions < 0.08,
                "{name}: {got:.2}B active vs {billions}B"
            );
        }
        let ds = c.resolve("DeepSeek-V3").unwrap();
        assert!(
            (ds.active_params() / 1e9 - 37.0).abs() < 1.5,
            "{}",
            ds.active_params()
        );
    }

    #[test]
    fn mixtral_hand_computed_shapes() {
        let m = cat().resolve("mixtral").unwrap();
        // q 6144x6144, k/v 6144x1024 each, o 6144x6144.
        assert_eq!(
            m.attn_params_per_layer(),
            2.0 * 6144.0 * 6144.0 + 2.0 * 6144.0 * 1024.0
        );
        assert_eq!(m.kv_elems_per_token_layer(), 2048.0);
        assert_eq!(m.gqa_group(), 6.0);
        assert_eq!(m.expert_params_per_layer(), 3.0 * 6144.0 * 16384.0);
        assert_eq!(m.moe_layers(), 56);
    }

    #[test]
    fn parses_hf_configs_of_every_family() {
        let mixtral = r#"{"model_type":"mixtral","hidden_size":4096,"num_hidden_layers":32,
            "num_attention_heads":32,"num_key_value_heads":8,"vocab_size":32000,
            "num_local_experts":8,"num_experts_per_tok":2,"intermediate_size":14336}"#;
        let m = ModelShape::from_hf_config(mixtral, "m").unwrap();
        assert_eq!((m.head_dim, m.num_experts, m.top_k), (128, 8, 2));
        assert_eq!(
            m,
            ModelShape {
                name: "m".into(),
                source: "m".into(),
                ..cat().resolve("mixtral-8x7b").unwrap()
            }
            .clone()
            .with_aliases(vec![])
        );

        let dbrx = r#"{"model_type":"dbrx","d_model":6144,"n_layers":40,"n_heads":48,
            "vocab_size":100352,"attn_config":{"kv_n_heads":8},
            "ffn_config":{"ffn_hidden_size":10752,"moe_num_experts":16,"moe_top_k":4}}"#;
        let d = ModelShape::from_hf_config(dbrx, "d").unwrap();
        assert_eq!(
            (
                d.num_kv_heads,
                d.expert_intermediate,
                d.num_experts,
                d.top_k
            ),
            (8, 10752, 16, 4)
        );
        assert!((d.total_params() / 1e9 - 132.0).abs() < 2.0);

        let qwen2 = r#"{"model_type":"qwen2_moe","hidden_size":2048,"num_hidden_layers":24,
            "num_attention_heads":16,"num_key_value_heads":16,"vocab_size":151936,
            "num_experts":60,"num_experts_per_tok":4,"moe_intermediate_size":1408,
            "shared_expert_intermediate_size":5632,"intermediate_size":5632,
            "decoder_sparse_step":1,"mlp_only_layers":[]}"#;
        let q = ModelShape::from_hf_config(qwen2, "q").unwrap();
        assert_eq!(
            (q.shared_expert_intermediate, q.num_dense_layers),
            (5632, 0)
        );
        assert!(
            (q.total_params() / 1e9 - 14.3).abs() < 0.5,
            "{}",
            q.total_params()
        );

        let qwen3 = r#"{"model_type":"qwen3_moe","hidden_size":4096,"num_hidden_layers":94,
            "num_attention_heads":64,"num_key_value_heads":4,"head_dim":128,"vocab_size":151936,
            "num_experts":128,"num_experts_per_tok":8,"moe_intermediate_size":1536,
            "intermediate_size":12288,"decoder_sparse_step":1,"mlp_only_layers":[]}"#;
        let q3 = ModelShape::from_hf_config(qwen3, "q3").unwrap();
        assert!(
            (q3.total_params() - cat().resolve("qwen3-235b-a22b").unwrap().total_params()).abs()
                < 1.0
        );

        let olmoe = r#"{"model_type":"olmoe","hidden_size":2048,"num_hidden_layers":16,
            "num_attention_heads":16,"num_key_value_heads":16,"vocab_size":50304,
            "num_experts":64,"num_experts_per_tok":8,"intermediate_size":1024}"#;
        let o = ModelShape::from_hf_config(olmoe, "o").unwrap();
        assert_eq!(o.expert_intermediate, 1024);

        let ds = r#"{"model_type":"deepseek_v3","hidden_size":7168,"num_hidden_layers":61,
            "num_attention_heads":128,"num_key_value_heads":128,"vocab_size":129280,
            "n_routed_experts":256,"num_experts_per_tok":8,"moe_intermediate_size":2048,
            "n_shared_experts":1,"intermediate_size":18432,"first_k_dense_replace":3,
            "q_lora_rank":1536,"kv_lora_rank":512,"qk_rope_head_dim":64,"qk_nope_head_dim":128,
            "v_head_dim":128}"#;
        let d3 = ModelShape::from_hf_config(ds, "ds").unwrap();
        let cat_ds = cat().resolve("deepseek-v3").unwrap();
        assert!((d3.total_params() - cat_ds.total_params()).abs() < 1.0);
        assert_eq!(d3.kv_elems_per_token_layer(), 576.0);
        assert_eq!(d3.moe_layers(), 58);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = ModelShape::from_hf_config(r#"{"model_type":"llama"}"#, "x").unwrap_err();
        assert!(e.to_string().contains("not a supported MoE family"), "{e}");
        let e = ModelShape::from_hf_config(r#"{"model_type":"mixtral","hidden_size":8}"#, "x")
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let e = ModelShape::from_hf_config("{", "x").unwrap_err();
        assert!(e.to_string().contains("cannot parse"), "{e}");
        let e = cat().resolve("no-such-model").unwrap_err();
        assert!(e.to_string().contains("mixtral-8x22b"), "{e}");
    }

    impl ModelShape {
        fn with_aliases(mut self, a: Vec<String>) -> Self {
            self.aliases = a;
            self
        }
    }
}
