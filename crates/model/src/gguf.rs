//! llama.cpp's GGUF files as a tensor source: the tensors under the Hugging Face names the
//! family loaders ask for, the `config.json` the metadata stands for, and the tokenizer
//! (`gguf_tokenizer.rs`: SentencePiece `llama` and byte-level `gpt2` tokenizers as the hub's
//! `tokenizer.json`).
//!
//! The header is parsed by candle (`gguf_file::Content`); the tensor data is memory mapped.
//! llama.cpp's names are mapped to the hub names (`blk.N.attn_q.weight` ->
//! `model.layers.N.self_attn.q_proj.weight`, ...); stacked experts (`ffn_gate_exps`,
//! `[E, F, D]`) are cut into one `[F, D]` tensor per expert, which is a byte range of the
//! stacked one whatever its type. GGUF lists dimensions innermost first; shapes here are in
//! PyTorch order (outermost first), as candle reports them.
//!
//! **q/k rows.** llama.cpp's converter permutes the rows of `q_proj` / `k_proj` for the
//! `llama` architecture (Mixtral is converted as `llama`) so that each head's rotary pairs are
//! interleaved (`(x0, x1), (x2, x3), ...`, the layout of its RoPE kernel); tandem's RoPE is
//! the hub's rotate-half form (`(x_i, x_{i + d/2})`). Its permute is
//! `w.reshape(heads, 2, d/2, k).swapaxes(1, 2)`: GGUF row `h*d + 2i + s` is hub row
//! `h*d + s*d/2 + i`. Loading undoes it; a row is whole blocks in every type, so quantized
//! rows move without dequantizing.
//!
//! **Types.** F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K. Q8_0 and Q4_0 linear weights are
//! kept in their own blocks (tandem's q8_0/q4_0 are llama.cpp's, block for block) unless
//! `--dtype`/`--quantization` ask for another type. Q4_K and Q6_K have no native kernel yet:
//! they are dequantized to f32 and packed in the requested type (f32 under `auto`), as are
//! F16/BF16 (BF16 stays bf16 under `auto`). Any other type is an error naming the tensor.

use crate::error::{ModelError, Result};
use crate::packed::WeightType;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;
use memmap2::Mmap;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// True when `path` names a GGUF file (by its extension) rather than a checkpoint directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
}

/// Where a hub-named tensor lives in the file.
#[derive(Clone, Debug)]
struct Entry {
    /// The GGUF tensor name.
    tensor: String,
    /// Expert `e` of a stacked `[E, ...]` tensor.
    expert: Option<usize>,
    /// Undo llama.cpp's q/k row permutation with this many heads.
    unpermute: Option<usize>,
    /// The shape in PyTorch order (the expert's, for a stacked tensor).
    shape: Vec<usize>,
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    content: Content,
    arch: String,
    /// hub name -> where it is
    map: HashMap<String, Entry>,
}

/// A tensor's raw bytes (after the expert cut and the q/k un-permutation) and type.
pub struct Raw {
    pub dtype: GgmlDType,
    pub bytes: Vec<u8>,
}

fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K";

fn supported(t: GgmlDType) -> bool {
    matches!(
        t,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4K
            | GgmlDType::Q6K
    )
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |msg: String| ModelError::CorruptFile {
            path: path.to_path_buf(),
            msg,
        };
        let f = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only mapping; see `Weights::open`.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| corrupt(format!("cannot read the GGUF header: {e}")))?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(corrupt("no general.architecture string".into())),
        };
        // Every tensor's data must lie in the file (a truncated download is the usual cause).
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            let row = info.shape.dims().last().copied().unwrap_or(1);
            if !row.is_multiple_of(bs) {
                return Err(corrupt(format!(
                    "tensor {name}: rows of {row} values are not whole {} blocks of {bs}",
                    type_name(info.ggml_dtype)
                )));
            }
            let size = (elems / bs) as u64 * info.ggml_dtype.type_size() as u64;
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(size);
            if end > mmap.len() as u64 {
                return Err(corrupt(format!(
                    "file is truncated: tensor {name} needs bytes {start}..{end} but the file has \
                     {} bytes",
                    mmap.len()
                )));
            }
        }
        let mut g = Self {
            path: path.to_path_buf(),
            mmap,
            content,
            arch,
            map: HashMap::new(),
        };
        g.map = g.build_map()?;
        Ok(g)
    }

    pub(crate) fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(|v| v.to_u64().ok())
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            v => v.to_u64().ok().map(|x| x as f64),
        }
    }

    pub(crate) fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn arch_u64(&self, key: &str) -> Option<u64> {
        self.meta_u64(&format!("{}.{key}", self.arch))
    }

    fn corrupt(&self, msg: String) -> ModelError {
        ModelError::CorruptFile {
            path: self.path.clone(),
            msg,
        }
    }

    fn unsupported(&self, msg: String) -> ModelError {
        ModelError::Unsupported {
            path: self.path.clone(),
            msg,
        }
    }

    /// The tensor's shape in PyTorch order.
    fn dims(&self, tensor: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(tensor)
            .map(|i| i.shape.dims().to_vec())
    }

    /// Hub names for every tensor of the file.
    fn build_map(&self) -> Result<HashMap<String, Entry>> {
        let mixtral = self.arch == "llama";
        let (heads, kv_heads) = (
            self.arch_u64("attention.head_count").unwrap_or(0) as usize,
            self.arch_u64("attention.head_count_kv").unwrap_or(0) as usize,
        );
        match self.arch.as_str() {
            "llama" | "qwen2moe" | "qwen3moe" | "olmoe" => {}
            "dbrx" => {
                return Err(self.unsupported(
                    "GGUF architecture \"dbrx\" is not supported yet (its fused attn_qkv and \
                     transposed ffn_down_exps need their own mapping); use the safetensors \
                     checkpoint"
                        .into(),
                ))
            }
            a => {
                return Err(self.unsupported(format!(
                    "GGUF architecture {a:?} is not supported (supported: llama (Mixtral), \
                     qwen2moe, qwen3moe, olmoe)"
                )))
            }
        }
        let mut map = HashMap::new();
        for (name, info) in &self.content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            let whole = |hub: String, unpermute: Option<usize>| {
                (
                    hub,
                    Entry {
                        tensor: name.clone(),
                        expert: None,
                        unpermute,
                        shape: dims.clone(),
                    },
                )
            };
            match name.as_str() {
                "token_embd.weight" => {
                    let (k, v) = whole("model.embed_tokens.weight".into(), None);
                    map.insert(k, v);
                    continue;
                }
                "output_norm.weight" => {
                    let (k, v) = whole("model.norm.weight".into(), None);
                    map.insert(k, v);
                    continue;
                }
                "output.weight" => {
                    let (k, v) = whole("lm_head.weight".into(), None);
                    map.insert(k, v);
                    continue;
                }
                _ => {}
            }
            let Some(rest) = name.strip_prefix("blk.") else {
                continue;
            };
            let Some((layer, rest)) = rest.split_once('.') else {
                continue;
            };
            let Ok(l) = layer.parse::<usize>() else {
                continue;
            };
            let Some((base, suffix)) = rest.rsplit_once('.') else {
                continue;
            };
            let p = format!("model.layers.{l}");
            let moe = if mixtral {
                format!("{p}.block_sparse_moe")
            } else {
                format!("{p}.mlp")
            };
            let permute_q = mixtral.then_some(heads);
            let permute_k = mixtral.then_some(kv_heads);
            let hub = |s: &str| format!("{s}.{suffix}");
            let (single, unpermute) = match base {
                "attn_norm" => (hub(&format!("{p}.input_layernorm")), None),
                "ffn_norm" => (hub(&format!("{p}.post_attention_layernorm")), None),
                "attn_q" => (hub(&format!("{p}.self_attn.q_proj")), permute_q),
                "attn_k" => (hub(&format!("{p}.self_attn.k_proj")), permute_k),
                "attn_v" => (hub(&format!("{p}.self_attn.v_proj")), None),
                "attn_output" => (hub(&format!("{p}.self_attn.o_proj")), None),
                "attn_q_norm" => (hub(&format!("{p}.self_attn.q_norm")), None),
                "attn_k_norm" => (hub(&format!("{p}.self_attn.k_norm")), None),
                "ffn_gate_inp" => (hub(&format!("{moe}.gate")), None),
                "ffn_gate" => (hub(&format!("{p}.mlp.gate_proj")), None),
                "ffn_up" => (hub(&format!("{p}.mlp.up_proj")), None),
                "ffn_down" => (hub(&format!("{p}.mlp.down_proj")), None),
                "ffn_gate_shexp" => (hub(&format!("{p}.mlp.shared_expert.gate_proj")), None),
                "ffn_up_shexp" => (hub(&format!("{p}.mlp.shared_expert.up_proj")), None),
                "ffn_down_shexp" => (hub(&format!("{p}.mlp.shared_expert.down_proj")), None),
                "ffn_gate_inp_shexp" => {
                    // llama.cpp keeps the shared-expert gate as a vector `[D]`; the hub's is
                    // a one-row linear `[1, D]`.
                    let mut e = whole(hub(&format!("{p}.mlp.shared_expert_gate")), None);
                    if e.1.shape.len() == 1 {
                        e.1.shape.insert(0, 1);
                    }
                    map.insert(e.0, e.1);
                    continue;
                }
                "ffn_gate_exps" | "ffn_up_exps" | "ffn_down_exps" => {
                    let which = match (base, mixtral) {
                        ("ffn_gate_exps", true) => "w1",
                        ("ffn_up_exps", true) => "w3",
                        ("ffn_down_exps", true) => "w2",
                        ("ffn_gate_exps", false) => "gate_proj",
                        ("ffn_up_exps", false) => "up_proj",
                        _ => "down_proj",
                    };
                    if dims.len() != 3 {
                        return Err(self.corrupt(format!(
                            "tensor {name} has shape {dims:?}, expected [experts, rows, cols]"
                        )));
                    }
                    for e in 0..dims[0] {
                        map.insert(
                            format!("{moe}.experts.{e}.{which}.{suffix}"),
                            Entry {
                                tensor: name.clone(),
                                expert: Some(e),
                                unpermute: None,
                                shape: dims[1..].to_vec(),
                            },
                        );
                    }
                    continue;
                }
                _ => continue,
            };
            let (k, v) = whole(single, unpermute);
            map.insert(k, v);
        }
        Ok(map)
    }

    pub fn contains(&self, hub: &str) -> bool {
        self.map.contains_key(hub)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }

    pub fn shape_of(&self, hub: &str) -> Option<Vec<usize>> {
        self.map.get(hub).map(|e| e.shape.clone())
    }

    /// The GGUF type name of the tensor behind `hub` ("F32", "Q8_0", ...).
    pub fn dtype_of(&self, hub: &str) -> Option<String> {
        let e = self.map.get(hub)?;
        Some(type_name(self.content.tensor_infos[&e.tensor].ggml_dtype).to_string())
    }

    /// The type a weight stored as `hub` is held in when no other type is asked for.
    pub fn own_type(&self, hub: &str) -> WeightType {
        match self
            .map
            .get(hub)
            .map(|e| self.content.tensor_infos[&e.tensor].ggml_dtype)
        {
            Some(GgmlDType::BF16) => WeightType::Bf16,
            Some(GgmlDType::Q8_0) => WeightType::Q8_0,
            Some(GgmlDType::Q4_0) => WeightType::Q4_0,
            _ => WeightType::F32,
        }
    }

    fn entry(&self, hub: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.map.get(hub).ok_or_else(|| ModelError::MissingTensor {
            name: hub.to_string(),
            files: self.path.display().to_string(),
        })?;
        if e.shape != shape {
            return Err(ModelError::WrongShape {
                name: format!("{hub} (GGUF {})", e.tensor),
                path: self.path.clone(),
                found: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }

    /// The bytes of `hub` (checked to have `shape`) in the file's own type: the expert's part
    /// of a stacked tensor, q/k rows back in the hub's order.
    pub fn raw(&self, hub: &str, shape: &[usize]) -> Result<Raw> {
        let e = self.entry(hub, shape)?;
        let info = &self.content.tensor_infos[&e.tensor];
        let dtype = info.ggml_dtype;
        if !supported(dtype) {
            return Err(ModelError::WrongDtype {
                name: format!("{} ({hub})", e.tensor),
                path: self.path.clone(),
                dtype: format!("{} (supported: {SUPPORTED})", type_name(dtype)),
            });
        }
        let elems: usize = e.shape.iter().product();
        let size = elems / dtype.block_size() * dtype.type_size();
        let start =
            (self.content.tensor_data_offset + info.offset) as usize + e.expert.unwrap_or(0) * size;
        let bytes = &self.mmap[start..start + size];
        let bytes = match e.unpermute {
            None => bytes.to_vec(),
            Some(h) => {
                let rows = e.shape[0];
                if h == 0 || !rows.is_multiple_of(h) || !(rows / h).is_multiple_of(2) {
                    return Err(self.corrupt(format!(
                        "tensor {}: {rows} rows do not split into {h} heads of an even size",
                        e.tensor
                    )));
                }
                let rb = size / rows;
                let d = rows / h;
                let mut out = vec![0u8; size];
                for hh in 0..h {
                    for i in 0..d / 2 {
                        for s in 0..2 {
                            let from = hh * d + 2 * i + s;
                            let to = hh * d + s * d / 2 + i;
                            out[to * rb..(to + 1) * rb]
                                .copy_from_slice(&bytes[from * rb..(from + 1) * rb]);
                        }
                    }
                }
                out
            }
        };
        Ok(Raw { dtype, bytes })
    }

    /// `hub` as f32 values (dequantized), checked to have `shape`.
    pub fn get_vec(&self, hub: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let raw = self.raw(hub, shape)?;
        let b = &raw.bytes;
        Ok(match raw.dtype {
            GgmlDType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GgmlDType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlDType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            t => {
                let q = ggml_file::qtensor_from_ggml(t, b, shape.to_vec(), &Device::Cpu)?;
                q.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        })
    }

    /// The hub `config.json` the metadata stands for, parsed by the family's own parser.
    pub fn config_json(&self) -> Result<Json> {
        let a = self.arch.as_str();
        let need = |key: &str| {
            self.arch_u64(key)
                .ok_or_else(|| self.corrupt(format!("metadata {a}.{key} is missing")))
        };
        let heads = need("attention.head_count")?;
        let mut c = Map::new();
        c.insert("hidden_size".into(), json!(need("embedding_length")?));
        c.insert("num_hidden_layers".into(), json!(need("block_count")?));
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert(
            "num_key_value_heads".into(),
            json!(self.arch_u64("attention.head_count_kv").unwrap_or(heads)),
        );
        let vocab = self
            .dims("token_embd.weight")
            .and_then(|d| d.first().copied())
            .or(self.arch_u64("vocab_size").map(|v| v as usize))
            .ok_or_else(|| self.corrupt("no token_embd.weight tensor".into()))?;
        c.insert("vocab_size".into(), json!(vocab));
        if let Some(n) = self.arch_u64("context_length") {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        if let Some(e) = self.meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon")) {
            // The metadata is f32: print the shortest decimal of that f32 (1e-5, not
            // 9.999999747378752e-6), which is what the hub config said.
            c.insert(
                "rms_norm_eps".into(),
                json!((e as f32).to_string().parse::<f64>().ok()),
            );
        }
        if let Some(t) = self.meta_f64(&format!("{a}.rope.freq_base")) {
            c.insert(
                "rope_theta".into(),
                json!((t as f32).to_string().parse::<f64>().ok()),
            );
        }
        if let Some(s) = self.meta_str(&format!("{a}.rope.scaling.type")) {
            if s != "none" {
                c.insert("rope_scaling".into(), json!({ "rope_type": s }));
            }
        }
        let key_len = self.arch_u64("attention.key_length");
        if let Some(k) = key_len {
            c.insert("head_dim".into(), json!(k));
        }
        let head_dim = key_len.unwrap_or(need("embedding_length")? / heads.max(1));
        if let Some(r) = self.arch_u64("rope.dimension_count") {
            if r != head_dim {
                return Err(self.unsupported(format!(
                    "{a}.rope.dimension_count = {r} but heads are {head_dim} wide: partial \
                     rotary embeddings are not implemented"
                )));
            }
        }
        let experts = self.arch_u64("expert_count").unwrap_or(0);
        c.insert(
            "num_experts_per_tok".into(),
            json!(need("expert_used_count")?),
        );
        c.insert(
            "tie_word_embeddings".into(),
            json!(!self.content.tensor_infos.contains_key("output.weight")),
        );
        if let Some(b) = self.meta_u64("tokenizer.ggml.bos_token_id") {
            c.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = self.meta_u64("tokenizer.ggml.eos_token_id") {
            c.insert("eos_token_id".into(), json!(e));
        }
        let has = |t: &str| self.content.tensor_infos.contains_key(t);
        let ff = self.arch_u64("feed_forward_length");
        let expert_ff = self.arch_u64("expert_feed_forward_length");
        let norm_topk = |default: bool| match self.meta(&format!("{a}.expert_weights_norm")) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        match a {
            "llama" => {
                if experts == 0 {
                    return Err(self.unsupported(
                        "a llama GGUF without experts is a dense model; tandem serves \
                         Mixture-of-Experts models"
                            .into(),
                    ));
                }
                c.insert("model_type".into(), json!("mixtral"));
                c.insert("num_local_experts".into(), json!(experts));
                c.insert(
                    "intermediate_size".into(),
                    json!(expert_ff.or(ff).ok_or_else(
                        || self.corrupt(format!("metadata {a}.feed_forward_length is missing"))
                    )?),
                );
            }
            "qwen2moe" | "qwen3moe" => {
                let qwen3 = a == "qwen3moe";
                c.insert(
                    "model_type".into(),
                    json!(if qwen3 { "qwen3_moe" } else { "qwen2_moe" }),
                );
                c.insert("num_experts".into(), json!(experts));
                let moe_ff = expert_ff.ok_or_else(|| {
                    self.corrupt(format!(
                        "metadata {a}.expert_feed_forward_length is missing"
                    ))
                })?;
                c.insert("moe_intermediate_size".into(), json!(moe_ff));
                c.insert("intermediate_size".into(), json!(ff.unwrap_or(moe_ff)));
                // Dense layers are the ones without a router.
                let layers = need("block_count")?;
                let dense: Vec<u64> = (0..layers)
                    .filter(|l| !has(&format!("blk.{l}.ffn_gate_inp.weight")))
                    .collect();
                c.insert("mlp_only_layers".into(), json!(dense));
                c.insert("decoder_sparse_step".into(), json!(1));
                // llama.cpp renormalises the top-k weights for qwen3moe, not for qwen2moe.
                c.insert("norm_topk_prob".into(), json!(norm_topk(qwen3)));
                let bias = has("blk.0.attn_q.bias");
                if qwen3 {
                    c.insert("attention_bias".into(), json!(bias));
                } else {
                    c.insert("qkv_bias".into(), json!(bias));
                    c.insert(
                        "shared_expert_intermediate_size".into(),
                        json!(self
                            .arch_u64("expert_shared_feed_forward_length")
                            .unwrap_or(0)),
                    );
                }
            }
            "olmoe" => {
                c.insert("model_type".into(), json!("olmoe"));
                c.insert("num_experts".into(), json!(experts));
                c.insert(
                    "intermediate_size".into(),
                    json!(expert_ff.or(ff).ok_or_else(
                        || self.corrupt(format!("metadata {a}.feed_forward_length is missing"))
                    )?),
                );
                c.insert("norm_topk_prob".into(), json!(norm_topk(false)));
                c.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
                if let Some(x) = self.meta_f64(&format!("{a}.attention.clamp_kqv")) {
                    c.insert("clip_qkv".into(), json!(x));
                }
            }
            other => {
                return Err(self.unsupported(format!("GGUF architecture {other:?}")));
            }
        }
        Ok(Json::Object(c))
    }
}

pub use crate::gguf_tokenizer::TokenizerParts;
