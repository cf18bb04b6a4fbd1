//! tandem-model: Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DBRX,
//! GLM-4.5, DeepSeek-V2/V3)
//! loaded into an attention stage and an expert stage per layer, the seam the disaggregated
//! runtime cuts at. See ARCHITECTURE.md at the repository root.
//!
//! It owns the families' configs, checkpoint and GGUF loading, tokenizers, the KV cache and
//! the forward pass; every compute kernel (matmuls by weight type, attention's inner loops,
//! the instruction-set choice) is `tandem-kernels`', called through its interface. It may not
//! hold SIMD code of its own, nor know about scheduling, the M2N protocol or serving.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod demo;
pub mod error;
pub mod families;
pub mod fp8;
pub mod generate;
pub mod gguf;
mod gguf_arch;
pub mod gguf_format;
pub mod gguf_tokenizer;
pub mod kv;
pub mod layers;
pub mod mem;
pub mod mla;
pub mod model;
pub mod source;
pub mod stages;
pub mod tokenizer;
pub mod weights;

// The kernels' modules under the paths the model's code has always used for them, and the
// instruction-set level they run at (`simd`: tests ask whether bf16 products are exact).
pub use tandem_kernels::{kquant, packed, quant, simd};

pub use config::{Family, ModelConfig};
pub use error::{ModelError, Result};
pub use kv::{BatchLayout, KvCache, SeqSlot};
pub use model::{ExpertSelection, Model};
pub use packed::WeightType;
pub use source::ModelSource;
pub use stages::{Assignment, AttentionOutput, AttentionStage, ExpertStage, Routing};
pub use tokenizer::Tokenizer;
