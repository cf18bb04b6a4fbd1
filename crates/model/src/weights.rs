//! Checkpoints: safetensors, single file or sharded (`model.safetensors.index.json`), or a
//! llama.cpp GGUF file ([`crate::gguf`], its tensors under the hub names), memory mapped.
//! Tensors are converted to f32 when taken (bf16/f16/f32 on disk, block-FP8 `F8_E4M3`
//! weights times their `_scale_inv` blocks ([`crate::fp8`]), GGUF blocks dequantized);
//! the weights of linear layers are then packed in the type [`LinearType`] says (a GGUF's
//! q8_0/q4_0 blocks are taken as they are when that type is theirs, and its Q4_K/Q5_K/Q6_K
//! blocks are used in place, a range of the mapped file). Every error names the tensor and
//! the file.

use crate::error::{ModelError, Result};
use crate::fp8::Fp8Config;
use crate::gguf::GgufFile;
use crate::gguf_format::GgmlType;
use crate::kquant::{KQuantWeights, SharedBytes};
use crate::packed::{PackedWeights, WeightType};
use crate::quant::{QuantFormat, QuantWeights};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct File {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// What a weight matrix is for: quantization treats them differently (as llama.cpp does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Attention projections, experts, shared experts, dense MLPs.
    Linear,
    /// The embedding table.
    Embedding,
    /// The LM head.
    LmHead,
    /// A router or a shared-expert gate: a few rows whose small differences decide which
    /// experts run. Never quantized: it stays in the checkpoint's type (f32 or bf16).
    Router,
}

/// The type linear layers (and the embedding table) are held in after loading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinearType {
    /// The checkpoint's own type: bf16 stays bf16, f32 stays f32; f16 becomes f32 (bf16 has
    /// three fewer mantissa bits, so converting would round the weights).
    #[default]
    Auto,
    /// Every linear layer in this type (converted or quantized at load); with a quantized
    /// type, routers keep the checkpoint's type and, under q4_0, the LM head is q8_0 (llama.cpp
    /// gives its 4-bit files' output matrix 6 bits for the same reason: it decides the token).
    Is(WeightType),
}

impl LinearType {
    /// From `--dtype auto|f32|bf16` and `--quantization q8_0|q4_0` (which wins when given).
    pub fn from_flags(dtype: &str, quantization: Option<&str>) -> Result<Self, String> {
        if let Some(q) = quantization {
            return match WeightType::parse(q) {
                Some(t @ (WeightType::Q8_0 | WeightType::Q4_0)) => Ok(LinearType::Is(t)),
                _ => Err(format!(
                    "unknown quantization {q:?} (supported: q8_0, q4_0)"
                )),
            };
        }
        match dtype.to_ascii_lowercase().as_str() {
            "auto" => Ok(LinearType::Auto),
            d => match WeightType::parse(d) {
                Some(t @ (WeightType::F32 | WeightType::Bf16)) => Ok(LinearType::Is(t)),
                _ => Err(format!(
                    "unknown dtype {dtype:?} (supported: auto, f32, bf16; quantized types go \
                     in --quantization)"
                )),
            },
        }
    }
}

/// All tensors of one checkpoint directory (or GGUF file).
pub struct Weights {
    source: Source,
    linear_type: LinearType,
    /// The block-FP8 layout `config.json`'s `quantization_config` describes, if any.
    fp8: Option<Fp8Config>,
}

/// The companion of an FP8 weight: `W` -> `W_scale_inv`.
const SCALE_SUFFIX: &str = "_scale_inv";

enum Source {
    Safetensors {
        files: Vec<File>,
        /// tensor name -> index in `files`
        index: HashMap<String, usize>,
    },
    Gguf(Box<GgufFile>),
}

impl Weights {
    /// Opens a GGUF file, or in a directory `model.safetensors.index.json` if present, else
    /// every `*.safetensors` file.
    pub fn open(src: impl Into<crate::ModelSource>) -> Result<Self> {
        let dir = match src.into() {
            crate::ModelSource::Gguf(f) => {
                return Ok(Self {
                    source: Source::Gguf(Box::new(GgufFile::open(&f)?)),
                    linear_type: LinearType::Auto,
                    fp8: None,
                })
            }
            crate::ModelSource::HfDir(d) => d,
        };
        let dir = dir.as_path();
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<PathBuf> = Vec::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                path: index_path.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::CorruptFile {
                    path: index_path.clone(),
                    msg: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::CorruptFile {
                    path: index_path.clone(),
                    msg: "no weight_map object".into(),
                })?;
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| ModelError::CorruptFile {
                    path: index_path.clone(),
                    msg: "weight_map values must be file names".into(),
                })?;
                let p = dir.join(f);
                if !names.contains(&p) {
                    names.push(p);
                }
            }
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    names.push(p);
                }
            }
            names.sort();
        }
        if names.is_empty() {
            return Err(ModelError::Io {
                path: dir.join("model.safetensors"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no safetensors files"),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in names {
            let f = std::fs::File::open(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only; a checkpoint changed underneath a running
            // server is outside what we can defend against (as in every mmap-based loader).
            let mmap = unsafe { Mmap::map(&f) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::CorruptFile {
                    path: path.clone(),
                    msg: match e {
                        safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                            "file is truncated or has trailing bytes (its size does not match \
                             the header)"
                                .to_string()
                        }
                        safetensors::SafeTensorError::InvalidHeaderLength => {
                            header_length_msg(&mmap)
                        }
                        safetensors::SafeTensorError::TensorInvalidInfo => {
                            invalid_tensor_msg(&mmap)
                        }
                        other => other.to_string(),
                    },
                })?;
            let fi = files.len();
            for name in meta.tensors().keys() {
                index.insert(name.clone(), fi);
            }
            files.push(File {
                path,
                mmap,
                header_len,
                meta,
            });
        }
        Ok(Self {
            source: Source::Safetensors { files, index },
            linear_type: LinearType::Auto,
            fp8: fp8_config(dir)?,
        })
    }

    /// The block-FP8 layout of the checkpoint (`quantization_config.quant_method: "fp8"`).
    pub fn fp8(&self) -> Option<Fp8Config> {
        self.fp8
    }

    /// The GGUF file behind these weights, if they come from one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf(g) => Some(g),
            Source::Safetensors { .. } => None,
        }
    }

    /// Linear layers taken after this are packed as `t` says.
    pub fn set_linear_type(&mut self, t: LinearType) {
        self.linear_type = t;
    }

    /// The type the weight `name` with role `role` is held in.
    pub fn type_for(&self, name: &str, role: Role) -> WeightType {
        self.type_for_as(name, role, self.linear_type)
    }

    /// The type the weight `name` with role `role` would be held in were `linear_type` asked
    /// for (the memory estimate compares types before loading).
    pub fn type_for_as(&self, name: &str, role: Role, linear_type: LinearType) -> WeightType {
        let own = match &self.source {
            Source::Gguf(g) => g.own_type(name),
            Source::Safetensors { .. } => match self.dtype_of(name).as_deref() {
                // FP8 weights dequantize into bf16: 8 bits of mantissa for e4m3's 3 (the
                // product with the block scale is rounded once).
                Some("BF16" | "F8_E4M3") => WeightType::Bf16,
                _ => WeightType::F32,
            },
        };
        match (linear_type, role) {
            (LinearType::Auto, _) => own,
            (LinearType::Is(t @ (WeightType::Q8_0 | WeightType::Q4_0)), r) => match r {
                Role::Router => own,
                Role::LmHead if t == WeightType::Q4_0 => WeightType::Q8_0,
                _ => t,
            },
            (LinearType::Is(t), _) => t,
        }
    }

    /// The `[out, inp]` weight `name`, packed in its type (see [`Weights::type_for`]).
    pub fn packed(&self, name: &str, out: usize, inp: usize, role: Role) -> Result<PackedWeights> {
        let ty = self.type_for(name, role);
        if let Source::Gguf(g) = &self.source {
            // q8_0 / q4_0 blocks wanted in their own type: taken as they are.
            let format = match ty {
                WeightType::Q8_0 => Some((QuantFormat::Q8_0, GgmlType::Q8_0)),
                WeightType::Q4_0 => Some((QuantFormat::Q4_0, GgmlType::Q4_0)),
                _ => None,
            };
            // K-quants wanted in their own type: the file's bytes, used where they are mapped
            // (rows llama.cpp permuted are put back in a copy).
            if let Some(kf) = ty.k_format().filter(|_| g.own_type(name) == ty) {
                let made = if g.rows_reordered(name) {
                    KQuantWeights::from_bytes(g.raw(name, &[out, inp])?.bytes, out, inp, kf)
                } else {
                    let (_, range) = g.tensor_range(name, &[out, inp])?;
                    g.note_in_place(range.clone());
                    let map: SharedBytes = g.mapping().clone();
                    KQuantWeights::from_shared(map, range, out, inp, kf)
                };
                let q = made.map_err(|msg| ModelError::CorruptFile {
                    path: g.path.clone(),
                    msg: format!("tensor {name} ({}): {msg}", kf.name()),
                })?;
                return Ok(PackedWeights::from_kquant(q));
            }
            if let Some((format, dtype)) = format {
                if g.dtype_of(name).as_deref() == Some(format.name().to_ascii_uppercase().as_str())
                {
                    let raw = g.raw(name, &[out, inp])?;
                    debug_assert_eq!(raw.dtype, dtype);
                    return Ok(PackedWeights::from_quant(QuantWeights::from_gguf_blocks(
                        &raw.bytes, out, inp, format,
                    )));
                }
            }
        }
        let v = self.get_vec(name, &[out, inp])?;
        Ok(PackedWeights::pack_as(&v, out, inp, ty))
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { index, .. } => index.contains_key(name),
            Source::Gguf(g) => g.contains(name),
        }
    }

    /// The names of the tensors, but not the `_scale_inv` companions of FP8 weights (they
    /// are part of their weight, not weights themselves).
    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.source {
            Source::Safetensors { index, .. } => Box::new(
                index
                    .keys()
                    .map(|s| s.as_str())
                    .filter(move |s| !self.is_fp8_scale(s)),
            ),
            Source::Gguf(g) => Box::new(g.names()),
        }
    }

    /// Whether `name` is the `_scale_inv` of an FP8 weight in this checkpoint.
    pub fn is_fp8_scale(&self, name: &str) -> bool {
        name.strip_suffix(SCALE_SUFFIX)
            .is_some_and(|w| self.dtype_of(w).as_deref() == Some("F8_E4M3"))
    }

    fn files_list(files: &[File]) -> String {
        files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The dtype a tensor is stored in ("F32", "BF16", ...; GGUF's type names for a GGUF).
    pub fn dtype_of(&self, name: &str) -> Option<String> {
        match &self.source {
            Source::Safetensors { files, index } => {
                let f = &files[*index.get(name)?];
                f.meta.info(name).map(|i| format!("{:?}", i.dtype))
            }
            Source::Gguf(g) => g.dtype_of(name),
        }
    }

    /// The tensor `name` as f32, checked to have `shape`.
    pub fn get_vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (files, index) = match &self.source {
            Source::Safetensors { files, index } => (files, index),
            Source::Gguf(g) => return g.get_vec(name, shape),
        };
        let fi = *index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            files: Self::files_list(files),
        })?;
        let f = &files[fi];
        let info = f.meta.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            files: Self::files_list(files),
        })?;
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                path: f.path.clone(),
                found: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let (s, e) = info.data_offsets;
        let base = 8 + f.header_len;
        let bytes = &f.mmap[base + s..base + e];
        let n: usize = shape.iter().product();
        let out = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F8_E4M3 => self.dequantize_fp8(name, &f.path, bytes, shape)?,
            Dtype::F8_E5M2 => {
                return Err(ModelError::WrongDtype {
                    name: name.to_string(),
                    path: f.path.clone(),
                    dtype: "F8_E5M2 (FP8 e5m2 weights are not supported; only e4m3 with \
                            block scales)"
                        .into(),
                })
            }
            other => {
                return Err(ModelError::WrongDtype {
                    name: name.to_string(),
                    path: f.path.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if out.len() != n {
            return Err(ModelError::CorruptFile {
                path: f.path.clone(),
                msg: format!("tensor {name}: byte size does not match shape {shape:?}"),
            });
        }
        Ok(out)
    }

    /// The `[out, inp]` F8_E4M3 weight `name` (its `bytes`, in `path`) times its block
    /// scales, as f32.
    fn dequantize_fp8(
        &self,
        name: &str,
        path: &Path,
        bytes: &[u8],
        shape: &[usize],
    ) -> Result<Vec<f32>> {
        let err = |msg: String| ModelError::Fp8 {
            name: name.to_string(),
            path: path.to_path_buf(),
            msg,
        };
        let Some(cfg) = self.fp8 else {
            return Err(err(
                "the checkpoint's config.json has no quantization_config with quant_method \
                 \"fp8\" (its weight_block_size says how the scales cover the weight)"
                    .into(),
            ));
        };
        let &[out, inp] = shape else {
            return Err(err(format!(
                "FP8 weights are 2-D [out, in] matrices, this one has shape {shape:?}"
            )));
        };
        if bytes.len() != out * inp {
            return Err(err(format!("{} bytes for shape {shape:?}", bytes.len())));
        }
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let want = cfg.scale_shape(out, inp);
        let Some(found) = self.shape_of(&scale_name) else {
            return Err(err(format!(
                "its scale tensor {scale_name} is missing (a [{out}, {inp}] weight in blocks of \
                 {:?} needs a {want:?} scale_inv)",
                cfg.block
            )));
        };
        if found != want {
            let hint = match found[..] {
                [s0, s1] => format!(
                    "; that grid fits {} rows and {} columns per block",
                    block_range(out, s0),
                    block_range(inp, s1)
                ),
                _ => String::new(),
            };
            return Err(err(format!(
                "its scale tensor {scale_name} has shape {found:?}, but a [{out}, {inp}] weight \
                 in blocks of {:?} (quantization_config.weight_block_size) needs \
                 [ceil({out}/{}), ceil({inp}/{})] = {want:?}{hint}",
                cfg.block, cfg.block[0], cfg.block[1]
            )));
        }
        let scales = self.get_vec(&scale_name, &want)?;
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(err(format!(
                "scale {scale_name}[{}, {}] is {}",
                i / want[1],
                i % want[1],
                scales[i]
            )));
        }
        if let Some(i) = bytes.iter().position(|b| crate::fp8::e4m3_is_nan(*b)) {
            return Err(err(format!(
                "element [{}, {}] is NaN (byte {:#04x})",
                i / inp,
                i % inp,
                bytes[i]
            )));
        }
        Ok(crate::fp8::dequantize(bytes, &scales, out, inp, cfg.block))
    }

    /// The bytes of the `U8` tensor `name` (MXFP4 blocks and scales), checked to have `shape`,
    /// read in place from the mapped file.
    pub fn get_u8(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        let (files, index) = match &self.source {
            Source::Safetensors { files, index } => (files, index),
            Source::Gguf(g) => {
                return Err(ModelError::WrongDtype {
                    name: name.to_string(),
                    path: g.path.clone(),
                    dtype: "a GGUF tensor (MXFP4 blocks are read from safetensors only)".into(),
                })
            }
        };
        let missing = || ModelError::MissingTensor {
            name: name.to_string(),
            files: Self::files_list(files),
        };
        let f = &files[*index.get(name).ok_or_else(missing)?];
        let info = f.meta.info(name).ok_or_else(missing)?;
        if info.dtype != Dtype::U8 {
            return Err(ModelError::WrongDtype {
                name: name.to_string(),
                path: f.path.clone(),
                dtype: format!("{:?} (expected U8)", info.dtype),
            });
        }
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                path: f.path.clone(),
                found: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let (s, e) = info.data_offsets;
        let base = 8 + f.header_len;
        let bytes = &f.mmap[base + s..base + e];
        if bytes.len() != shape.iter().product::<usize>() {
            return Err(ModelError::CorruptFile {
                path: f.path.clone(),
                msg: format!("tensor {name}: byte size does not match shape {shape:?}"),
            });
        }
        Ok(bytes)
    }

    /// The tensor `name` as an f32 candle tensor of `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let v = self.get_vec(name, shape)?;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// The shape recorded for `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Safetensors { files, index } => {
                let f = &files[*index.get(name)?];
                f.meta.info(name).map(|i| i.shape.clone())
            }
            Source::Gguf(g) => g.shape_of(name),
        }
    }
}

/// The block sizes `b` with `ceil(dim / b) == blocks`: "16..=23", "at least 64", "no".
fn block_range(dim: usize, blocks: usize) -> String {
    if blocks == 0 || dim == 0 {
        return "no".into();
    }
    let lo = dim.div_ceil(blocks);
    if blocks == 1 {
        return format!("at least {lo}");
    }
    let hi = (dim - 1) / (blocks - 1);
    match lo.cmp(&hi) {
        std::cmp::Ordering::Less => format!("{lo}..={hi}"),
        std::cmp::Ordering::Equal => format!("{lo}"),
        std::cmp::Ordering::Greater => "no".into(),
    }
}

/// The FP8 layout of `dir/config.json`'s `quantization_config` (`None` without a config).
fn fp8_config(dir: &Path) -> Result<Option<Fp8Config>> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    // A config that does not parse is reported by the config loader, with its own message.
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Ok(None);
    };
    Fp8Config::from_config(&v, &path)
}

/// Why the header length is invalid: usually a file cut inside its header.
fn header_length_msg(buf: &[u8]) -> String {
    let n = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    format!(
        "file is truncated: its header says {n} bytes of JSON but the file has {} bytes",
        buf.len()
    )
}

/// Names the tensor whose shape and dtype disagree with its byte range.
fn invalid_tensor_msg(buf: &[u8]) -> String {
    let generic = "a tensor's shape and dtype do not match its byte range".to_string();
    let Some(n) = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return generic;
    };
    let Some(header) = buf.get(8..8 + n as usize) else {
        return generic;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(header) else {
        return generic;
    };
    let Some(obj) = v.as_object() else {
        return generic;
    };
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let bytes_per = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            _ => 1,
        };
        let offs: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        if let [s, e] = offs[..] {
            let want = shape.iter().product::<u64>() * bytes_per;
            if e.saturating_sub(s) != want {
                return format!(
                    "tensor {name}: shape {shape:?} needs {want} bytes but its data range holds {}",
                    e.saturating_sub(s)
                );
            }
        }
    }
    generic
}
