//! tandem-model: Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DBRX,
//! GLM-4.5, DeepSeek-V2/V3)
//! loaded into an attention stage and an expert stage per layer, the seam the disaggregated
//! runtime cuts at. See ARCHITECTURE.md at the repository root.

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
pub mod kernels;
pub mod kquant;
pub mod kv;
pub mod layers;
pub mod mem;
pub mod mla;
pub mod model;
pub mod packed;
pub mod quant;
pub mod source;
pub mod stages;
pub mod tokenizer;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use error::{ModelError, Result};
pub use kv::{BatchLayout, KvCache, SeqSlot};
pub use model::{ExpertSelection, Model};
pub use packed::WeightType;
pub use source::ModelSource;
pub use stages::{Assignment, AttentionOutput, AttentionStage, ExpertStage, Routing};
pub use tokenizer::Tokenizer;
