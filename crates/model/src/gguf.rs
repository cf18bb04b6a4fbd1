//! llama.cpp's GGUF files as a tensor source: the tensors under the Hugging Face names the
//! family loaders ask for, the `config.json` the metadata stands for, and the tokenizer
//! (`gguf_tokenizer.rs`: SentencePiece `llama` and byte-level `gpt2` tokenizers as the hub's
//! `tokenizer.json`).
//!
//! **Architectures.** `llama` (Mixtral), `qwen2moe`, `qwen3moe` and `olmoe` are mapped here;
//! `deepseek2` (DeepSeek-V2, V2-Lite, V3, Kimi-K2), `glm4moe` (GLM-4.5), `gpt-oss` and `dbrx`
//! in `crate::gguf_arch` (hooked into the first lines of `GgufFile::build_map` and
//! `GgufFile::config_json`), which also rebuilds the tensors llama.cpp's
//! converter split or transposed (MLA's `kv_b_proj`, GPT-OSS's `gate_up_proj_bias`, DBRX's
//! `w2`) in f32; GPT-OSS's expert weights are cut per expert and kept in their type instead.
//! Any other architecture is refused by name.
//!
//! The header is read by tandem's own reader ([`crate::gguf_format`]: every ggml type
//! llama.cpp writes, every count checked against the file); the file is memory mapped and held
//! as an `Arc<Mmap>` ([`GgufFile::mapping`]), and [`GgufFile::tensor_range`] gives a tensor's
//! (or one expert's) byte range in it for loaders that use the blocks in place.
//!
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
//! **Types.** Every type is listed (`dtype_of`, `tensor_range`); these load: F32, F16, BF16,
//! Q8_0 and Q4_0 (kept in their own blocks: tandem's q8_0/q4_0 are llama.cpp's, block for
//! block, unless `--dtype`/`--quantization` ask for another type), Q4_K, Q5_K, Q6_K and MXFP4
//! (used in place: a byte range of the mapping ([`GgufFile::tensor_range`]) multiplied by the
//! kernels of [`crate::kquant`], no copy; q/k rows that must be un-permuted are copied once),
//! and Q4_1, Q5_0, Q5_1, Q2_K, Q3_K (dequantized by candle to f32 and packed in the requested
//! type, f32 under `auto`). Asked for another type, K-quants and MXFP4 are dequantized
//! (gguf-py's values, bit for bit) and packed in it, as are F16/BF16 (BF16 stays bf16 under
//! `auto`). Any other type (the IQ types, ...) is an error naming the tensor, its type and
//! the supported ones.

use crate::error::{ModelError, Result};
use crate::gguf_format::{Content, GgmlType, GgufError, Value};
use crate::kquant::{KFormat, KQuantWeights};
use crate::packed::WeightType;
use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;
use memmap2::Mmap;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a hub-named tensor lives in the file.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The GGUF tensor name (the first source of a synthesized tensor).
    pub(crate) tensor: String,
    /// Expert `e` of a stacked `[E, ...]` tensor.
    pub(crate) expert: Option<usize>,
    /// Undo llama.cpp's q/k row permutation with this many heads.
    pub(crate) unpermute: Option<usize>,
    /// The shape in PyTorch order (the expert's, for a stacked tensor).
    pub(crate) shape: Vec<usize>,
    /// A hub tensor the converter split or transposed, rebuilt in f32 from its GGUF tensors
    /// (`crate::gguf_arch`).
    pub(crate) synth: Option<crate::gguf_arch::Synth>,
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: Arc<Mmap>,
    content: Content,
    arch: String,
    /// hub name -> where it is
    map: HashMap<String, Entry>,
    /// Byte ranges of the mapping that loaded weights use in place (K-quant and MXFP4
    /// tensors): what [`GgufFile::settle`] keeps mapped.
    in_place: std::sync::Mutex<Vec<Range<usize>>>,
}

/// A tensor's raw bytes (after the expert cut and the q/k un-permutation) and type.
pub struct Raw {
    pub dtype: GgmlType,
    pub bytes: Vec<u8>,
}

/// The types [`GgufFile::raw`] and [`GgufFile::get_vec`] load.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, MXFP4";

/// The [`crate::kquant`] format of a GGUF type, where tandem has kernels for it.
pub fn k_format(t: GgmlType) -> Option<KFormat> {
    KFormat::from_ggml_type(t.id())
}

/// candle's type for ours, where candle dequantizes it.
fn candle_type(t: GgmlType) -> Option<GgmlDType> {
    Some(match t {
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        _ => return None,
    })
}

/// Whether tensors of type `t` load (dequantized or as they are).
pub fn supported(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0
    ) || k_format(t).is_some()
        || candle_type(t).is_some()
}

/// Q8_0 blocks (an f16 scale, 32 signed bytes) to f32.
fn dequant_q8_0(b: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / 34 * 32);
    for blk in b.chunks_exact(34) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        out.extend(blk[2..].iter().map(|q| (*q as i8) as f32 * d));
    }
    out
}

/// Q4_0 blocks (an f16 scale, 16 bytes: values `j` in the low nibbles, `j + 16` in the high
/// ones, offset by 8) to f32.
fn dequant_q4_0(b: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() / 18 * 32);
    for blk in b.chunks_exact(18) {
        let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let qs = &blk[2..];
        out.extend(qs.iter().map(|q| ((q & 0x0f) as i32 - 8) as f32 * d));
        out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
    }
    out
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only mapping; see `Weights::open`.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Every count is checked against the file, every tensor's data lies in it (a
        // truncated download is the usual cause of a failure here).
        let content = Content::read(&mmap[..]).map_err(|e| match e {
            GgufError::Corrupt(msg) => ModelError::CorruptFile {
                path: path.to_path_buf(),
                msg,
            },
            GgufError::Unsupported(msg) => ModelError::Unsupported {
                path: path.to_path_buf(),
                msg,
            },
        })?;
        let arch = match content.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ModelError::CorruptFile {
                    path: path.to_path_buf(),
                    msg: "no general.architecture string".into(),
                })
            }
        };
        let mut g = Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            content,
            arch,
            map: HashMap::new(),
            in_place: std::sync::Mutex::new(Vec::new()),
        };
        g.map = g.build_map()?;
        Ok(g)
    }

    /// Records that a loaded weight uses `range` of the mapping in place.
    pub(crate) fn note_in_place(&self, range: Range<usize>) {
        if let Ok(mut v) = self.in_place.lock() {
            v.push(range);
        }
    }

    /// After loading: drops this process's mappings of every page (`MADV_DONTNEED`; the page
    /// cache keeps them, nothing is lost), so the pages that loading read to copy or convert
    /// tensors stop counting as resident beside their copies; then, with `populate`, faults
    /// back in the ranges weights use in place (`MADV_POPULATE_READ`, 256 MiB at a time on
    /// the rayon pool, progress logged), so the first token routed to an expert does not pay
    /// its page faults inside a decode step. Returns the bytes populated; where the kernel
    /// lacks an advice (before Linux 5.14) it says so in a debug log line and stops there.
    pub fn settle(&self, populate: bool) -> u64 {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        const CHUNK: usize = 256 << 20;
        // SAFETY: a shared read-only file mapping: DONTNEED only drops page-table entries,
        // and a later read faults the same bytes back from the page cache or the file.
        if let Err(e) = unsafe {
            self.mmap
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        } {
            tracing::debug!("not releasing {}: {e}", self.path.display());
        }
        if !populate {
            return 0;
        }
        let mut ranges = self.in_place.lock().map(|v| v.clone()).unwrap_or_default();
        ranges.sort_by_key(|r| r.start);
        let mut chunks: Vec<Range<usize>> = Vec::new();
        for r in ranges {
            match chunks.last_mut() {
                Some(last) if r.start <= last.end && last.len() < CHUNK => {
                    last.end = last.end.max(r.end)
                }
                _ => chunks.push(r),
            }
        }
        let chunks: Vec<Range<usize>> = chunks
            .into_iter()
            .flat_map(|r| {
                (r.start..r.end)
                    .step_by(CHUNK)
                    .map(move |a| a..(a + CHUNK).min(r.end))
            })
            .collect();
        let total: u64 = chunks.iter().map(|r| r.len() as u64).sum();
        let (done, failed) = (AtomicU64::new(0), AtomicBool::new(false));
        let t0 = std::time::Instant::now();
        let step = (total / 8).max(1 << 30);
        chunks.into_par_iter().for_each(|r| {
            if failed.load(Ordering::Relaxed) || r.is_empty() {
                return;
            }
            let n = r.len() as u64;
            if let Err(e) = self
                .mmap
                .advise_range(memmap2::Advice::PopulateRead, r.start, r.len())
            {
                tracing::debug!("not populating {}: {e}", self.path.display());
                failed.store(true, Ordering::Relaxed);
                return;
            }
            let before = done.fetch_add(n, Ordering::Relaxed);
            if (before + n) / step != before / step {
                tracing::info!(
                    "mapping {}: {:.1} / {:.1} GB in {:.1} s",
                    self.path.display(),
                    (before + n) as f64 / 1e9,
                    total as f64 / 1e9,
                    t0.elapsed().as_secs_f64()
                );
            }
        });
        done.into_inner()
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The mapped file (tensor ranges from [`GgufFile::tensor_range`] index it).
    pub fn mapping(&self) -> &Arc<Mmap> {
        &self.mmap
    }

    pub(crate) fn meta(&self, key: &str) -> Option<&Value> {
        self.content.get(key)
    }

    pub(crate) fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta(key).and_then(|v| v.to_u64().ok())
    }

    pub(crate) fn meta_f64(&self, key: &str) -> Option<f64> {
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

    pub(crate) fn arch_u64(&self, key: &str) -> Option<u64> {
        self.meta_u64(&format!("{}.{key}", self.arch))
    }

    pub(crate) fn corrupt(&self, msg: String) -> ModelError {
        ModelError::CorruptFile {
            path: self.path.clone(),
            msg,
        }
    }

    pub(crate) fn unsupported(&self, msg: String) -> ModelError {
        ModelError::Unsupported {
            path: self.path.clone(),
            msg,
        }
    }

    /// The `general.architecture` string.
    pub(crate) fn arch(&self) -> &str {
        &self.arch
    }

    /// The GGUF names of every tensor in the file.
    pub(crate) fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensors.iter().map(|t| t.name.as_str())
    }

    /// The tensor's shape in PyTorch order.
    pub(crate) fn dims(&self, tensor: &str) -> Option<Vec<usize>> {
        self.content.tensor(tensor).map(|i| i.shape())
    }

    /// Hub names for every tensor of the file.
    fn build_map(&self) -> Result<HashMap<String, Entry>> {
        if let Some(map) = crate::gguf_arch::build_map(self)? {
            return Ok(map);
        }
        let mixtral = self.arch == "llama";
        let (heads, kv_heads) = (
            self.arch_u64("attention.head_count").unwrap_or(0) as usize,
            self.arch_u64("attention.head_count_kv").unwrap_or(0) as usize,
        );
        match self.arch.as_str() {
            "llama" | "qwen2moe" | "qwen3moe" | "olmoe" => {}
            a => {
                return Err(self.unsupported(format!(
                    "GGUF architecture {a:?} is not supported (supported: llama (Mixtral), \
                     qwen2moe, qwen3moe, olmoe, {})",
                    crate::gguf_arch::ARCHS.join(", ")
                )))
            }
        }
        let mut map = HashMap::new();
        for info in &self.content.tensors {
            let name = &info.name;
            let dims = info.shape();
            let whole = |hub: String, unpermute: Option<usize>| {
                (
                    hub,
                    Entry {
                        tensor: name.clone(),
                        expert: None,
                        unpermute,
                        shape: dims.clone(),
                        synth: None,
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
                                synth: None,
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
        if e.synth.is_some() {
            return Some("F32".into());
        }
        Some(self.tensor_type(&e.tensor)?.name().to_string())
    }

    /// The type a weight stored as `hub` is held in when no other type is asked for.
    pub fn own_type(&self, hub: &str) -> WeightType {
        match self
            .map
            .get(hub)
            .filter(|e| e.synth.is_none())
            .and_then(|e| self.tensor_type(&e.tensor))
        {
            Some(GgmlType::BF16) => WeightType::Bf16,
            Some(GgmlType::Q8_0) => WeightType::Q8_0,
            Some(GgmlType::Q4_0) => WeightType::Q4_0,
            Some(GgmlType::Q4_K) => WeightType::Q4K,
            Some(GgmlType::Q5_K) => WeightType::Q5K,
            Some(GgmlType::Q6_K) => WeightType::Q6K,
            Some(GgmlType::MXFP4) => WeightType::Mxfp4,
            _ => WeightType::F32,
        }
    }

    /// Whether loading reorders the rows of `hub` (llama's q/k permutation): then its bytes
    /// are [`GgufFile::raw`]'s, not the range of [`GgufFile::tensor_range`].
    pub fn rows_reordered(&self, hub: &str) -> bool {
        self.map.get(hub).is_some_and(|e| e.unpermute.is_some())
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

    fn tensor_type(&self, tensor: &str) -> Option<GgmlType> {
        self.content.tensor(tensor).map(|i| i.ggml_type)
    }

    /// The type and byte range (in [`GgufFile::mapping`]) of `hub`'s data, checked to have
    /// `shape`: the tensor, or one expert's slice of a stacked one.
    fn range_of(&self, hub: &str, e: &Entry) -> Result<(GgmlType, Range<usize>)> {
        let info = self
            .content
            .tensor(&e.tensor)
            .ok_or_else(|| ModelError::MissingTensor {
                name: e.tensor.clone(),
                files: self.path.display().to_string(),
            })?;
        let ty = info.ggml_type;
        let elems: usize = e.shape.iter().product();
        // The reader checked the whole tensor's size and place; an expert's slice is a part.
        let size = ty.bytes_for(elems as u64).ok_or_else(|| {
            self.corrupt(format!(
                "tensor {} ({hub}): {elems} values are not whole {ty} blocks",
                e.tensor
            ))
        })? as usize;
        let whole = self.content.data_range(info);
        let start = whole.start + e.expert.unwrap_or(0) * size;
        if start + size > whole.end {
            return Err(self.corrupt(format!(
                "tensor {} ({hub}): expert {} lies outside its data",
                e.tensor,
                e.expert.unwrap_or(0)
            )));
        }
        Ok((ty, start..start + size))
    }

    /// The type of `hub` and the byte range of its data in [`GgufFile::mapping`], checked to
    /// have `shape`: the whole tensor, or one expert's slice of a stacked tensor. Tensors whose
    /// rows llama.cpp permuted (`llama` q/k projections) are an error: their bytes are not the
    /// hub's in place (use [`GgufFile::raw`]).
    pub fn tensor_range(&self, hub: &str, shape: &[usize]) -> Result<(GgmlType, Range<usize>)> {
        let e = self.entry(hub, shape)?;
        if e.unpermute.is_some() {
            return Err(self.unsupported(format!(
                "tensor {} ({hub}): its rows are permuted (llama.cpp's q/k layout) and are not \
                 the hub's rows in place; read it with raw()",
                e.tensor
            )));
        }
        self.range_of(hub, e)
    }

    /// The bytes of `hub` (checked to have `shape`) in the file's own type: the expert's part
    /// of a stacked tensor, q/k rows back in the hub's order.
    pub fn raw(&self, hub: &str, shape: &[usize]) -> Result<Raw> {
        let e = self.entry(hub, shape)?;
        if let Some(s) = &e.synth {
            let v = s.build(&|t, sh| self.tensor_f32(t, sh))?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            return Ok(Raw {
                dtype: GgmlType::F32,
                bytes,
            });
        }
        self.raw_entry(hub, e)
    }

    /// The whole GGUF tensor `tensor` as f32 values, checked to have `shape` (PyTorch order).
    pub(crate) fn tensor_f32(&self, tensor: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let dims = self.dims(tensor).ok_or_else(|| ModelError::MissingTensor {
            name: tensor.to_string(),
            files: self.path.display().to_string(),
        })?;
        if dims != shape {
            return Err(ModelError::WrongShape {
                name: format!("GGUF {tensor}"),
                path: self.path.clone(),
                found: dims,
                expected: shape.to_vec(),
            });
        }
        let e = Entry {
            tensor: tensor.to_string(),
            expert: None,
            unpermute: None,
            shape: dims,
            synth: None,
        };
        self.decode(tensor, self.raw_entry(tensor, &e)?, shape)
    }

    fn raw_entry(&self, hub: &str, e: &Entry) -> Result<Raw> {
        let (dtype, range) = self.range_of(hub, e)?;
        if !supported(dtype) {
            return Err(ModelError::WrongDtype {
                name: format!("{} ({hub})", e.tensor),
                path: self.path.clone(),
                dtype: format!("{dtype} (supported: {SUPPORTED})"),
            });
        }
        let size = range.len();
        let bytes = &self.mmap[range];
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
        let e = self.entry(hub, shape)?;
        if let Some(s) = &e.synth {
            return s.build(&|t, sh| self.tensor_f32(t, sh));
        }
        self.decode(hub, self.raw_entry(hub, e)?, shape)
    }

    fn decode(&self, hub: &str, raw: Raw, shape: &[usize]) -> Result<Vec<f32>> {
        let b = &raw.bytes;
        Ok(match raw.dtype {
            GgmlType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            GgmlType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlType::Q8_0 => dequant_q8_0(b),
            GgmlType::Q4_0 => dequant_q4_0(b),
            t if k_format(t).is_some() => {
                let format = k_format(t).unwrap_or(KFormat::Q4K);
                let k = shape.last().copied().unwrap_or(1);
                let n = shape.iter().product::<usize>() / k.max(1);
                KQuantWeights::from_bytes(raw.bytes, n, k, format)
                    .map_err(|msg| self.corrupt(format!("tensor {hub}: {msg}")))?
                    .dequantize()
            }
            t => {
                // `raw` refused the types neither we nor candle dequantize.
                let ct = candle_type(t).ok_or_else(|| ModelError::WrongDtype {
                    name: hub.to_string(),
                    path: self.path.clone(),
                    dtype: format!("{t} (supported: {SUPPORTED})"),
                })?;
                let q = ggml_file::qtensor_from_ggml(ct, b, shape.to_vec(), &Device::Cpu)?;
                q.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        })
    }

    /// The hub `config.json` the metadata stands for, parsed by the family's own parser.
    pub fn config_json(&self) -> Result<Json> {
        if let Some(c) = crate::gguf_arch::config_json(self)? {
            return Ok(c);
        }
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
            json!(self.content.tensor("output.weight").is_none()),
        );
        if let Some(b) = self.meta_u64("tokenizer.ggml.bos_token_id") {
            c.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = self.meta_u64("tokenizer.ggml.eos_token_id") {
            c.insert("eos_token_id".into(), json!(e));
        }
        self.arch_config(&mut c, experts)?;
        Ok(Json::Object(c))
    }

    /// The keys of `config.json` that differ by architecture (`llama` as Mixtral, `qwen2moe`,
    /// `qwen3moe`, `olmoe`): the model type, the expert count and widths, dense layers, biases.
    fn arch_config(&self, c: &mut Map<String, Json>, experts: u64) -> Result<()> {
        let a = self.arch.as_str();
        let need = |key: &str| {
            self.arch_u64(key)
                .ok_or_else(|| self.corrupt(format!("metadata {a}.{key} is missing")))
        };
        let has = |t: &str| self.content.tensor(t).is_some();
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
        Ok(())
    }
}

pub use crate::gguf_tokenizer::TokenizerParts;
