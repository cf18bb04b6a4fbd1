//! tandem-kernels: the compute kernels of tandem's CPU backend, by weight type, and the
//! instruction set they run with.
//!
//! It owns:
//! - the matmul of every linear layer on its weights: f32 and bf16 panels ([`packed`]:
//!   [`packed::PackedWeights`], [`packed::WeightType`]), llama.cpp's q8_0/q4_0 block groups
//!   ([`quant`]), GGUF's Q4_K/Q5_K/Q6_K and MXFP4 blocks in place ([`kquant`]);
//! - the inner kernels of attention: paged grouped-query attention ([`attention`]) and the
//!   absorbed multi-head latent attention of one row ([`mla`]);
//! - the vector helpers of the decode and sampling paths ([`mod@simd`]: `silu_mul`, `sum`,
//!   the 8-lane `exp`; [`sampling`]: the softmax denominator `sum_exp`);
//! - the instruction-set choice, made once per process: [`simd::simd`] (AVX-512, AVX2 or
//!   scalar, capped by `TANDEM_SIMD`) is the only place any kernel asks which level to run;
//!   optional extensions (AVX-VNNI, AVX-512 VNNI) are only asked for within the level it
//!   returned, never to go above it;
//! - zero-filled buffers on transparent huge pages for the big arrays ([`mem::HugeBuf`]);
//! - the scalar path of every kernel, the oracle every SIMD path is tested against here.
//!
//! It may not touch: model families and their configs, checkpoint or file formats' parsing
//! (safetensors, GGUF headers, tokenizers), any I/O (files, network, the environment beyond
//! `TANDEM_SIMD`), or tensor libraries: it takes and returns slices and the weight containers
//! above. Shapes arrive as plain numbers ([`attention::AttnDims`], [`mla::MlaDims`]); the
//! model crate (`tandem-model`) owns the KV cache, the batch layout and the forward pass and
//! calls these kernels. It depends on nothing of tandem's.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod attention;
pub mod kquant;
pub mod mem;
pub mod mla;
pub mod packed;
pub mod quant;
pub mod sampling;
pub mod simd;

pub use simd::{simd, Simd};

/// The output pointer a parallel matmul hands to its tasks. Each task writes a disjoint set
/// of elements (its tile), which is what makes sharing it between threads sound; the kernels
/// that take it say so in their `# Safety` sections.
#[derive(Copy, Clone)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only written through by tasks whose tiles are disjoint, and the
// buffer outlives the parallel loop that shares it.
unsafe impl Send for SyncPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for SyncPtr {}
