//! Errors of the model crate. Every message names what is wrong and where (file, tensor).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error(
        "unknown model_type {0:?} (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, dbrx, \
         glm4_moe, deepseek_v2, deepseek_v3)"
    )]
    UnknownFamily(String),
    #[error("unsupported option in {path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    #[error("corrupt checkpoint file {path}: {msg}")]
    CorruptFile { path: PathBuf, msg: String },
    #[error("missing tensor {name} (looked in {files})")]
    MissingTensor { name: String, files: String },
    #[error("tensor {name} in {path} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} in {path} has unsupported dtype {dtype}")]
    WrongDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    /// A block-FP8 weight (`F8_E4M3` + `_scale_inv`) that cannot be dequantized.
    #[error("FP8 tensor {name} in {path}: {msg}")]
    Fp8 {
        name: String,
        path: PathBuf,
        msg: String,
    },
    /// The weights will not fit in memory in the type asked for (checked before loading).
    #[error(
        "{path}: the weights will not fit in memory: they need about {} resident {what} but \
         only {} is available (MemAvailable); {hint}",
        crate::mem::gib(*needed), crate::mem::gib(*available)
    )]
    TooLarge {
        path: PathBuf,
        /// Estimated resident bytes.
        needed: u64,
        /// The memory budget in bytes.
        available: u64,
        /// "as q8_0", "in the checkpoint's own types", ...
        what: String,
        /// What to try instead.
        hint: String,
    },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    Input(String),
    /// A GGUF metadata value of another type than the one asked for (`Value::to_u64()?`).
    #[error("GGUF metadata: {0}")]
    Metadata(#[from] crate::gguf_format::ValueError),
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
