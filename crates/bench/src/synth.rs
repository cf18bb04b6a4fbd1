//! `tandem synth-gguf`: a GGUF file with random weights in the exact shapes of a named model
//! (Qwen3-30B-A3B, GPT-OSS-20B, DeepSeek-V2-Lite, Mixtral-8x7B), in a chosen ggml type, with
//! a working byte-level BPE tokenizer, so tandem and llama.cpp can be measured on the same
//! file at the size people run, without downloading the model.
//!
//! The tensor names, shapes (ggml order: innermost first) and metadata keys are those
//! llama.cpp's `convert_hf_to_gguf.py` writes for the architecture (`qwen3moe`, `gpt-oss`,
//! `deepseek2` in its MLA form with `attn_k_b`/`attn_v_b`, `llama` for Mixtral), so both
//! loaders take the file. Quantized blocks are generated directly (no f32 tensor is ever
//! built): random quants under f16 scales chosen so that a weight's values have a standard
//! deviation of `1/sqrt(fan_in)`, which keeps activations finite through every layer.
//! Tensors are streamed to the file through [`GgufWriter::tensor_with`], chunk by chunk,
//! generated in parallel with rayon.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use tandem_model::gguf_format::{GgmlType, GgufWriter, Value};
use tandem_plan::model::{ModelCatalog, ModelShape};

/// The weight types a synthetic file can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthType {
    /// Every 2-D weight in Q8_0 (norms, biases, routers in F32).
    #[value(name = "q8_0")]
    Q8_0,
    /// Every 2-D weight in Q4_0, the LM head in Q6_K (llama.cpp's Q4_0 mix).
    #[value(name = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the LM head and for attn_v and
    /// ffn_down(_exps) of the layers llama.cpp gives more bits (`use_more_bits`).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// The experts in MXFP4, the other 2-D weights in Q8_0 (GPT-OSS's hub GGUF layout).
    #[value(name = "mxfp4")]
    Mxfp4,
}

impl SynthType {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            SynthType::Q8_0 => 7,
            SynthType::Q4_0 => 2,
            SynthType::Q4KM => 15,
            SynthType::Mxfp4 => 38,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct SynthArgs {
    /// qwen3-30b-a3b, gpt-oss-20b, deepseek-v2-lite or mixtral-8x7b.
    #[arg(long)]
    pub model: String,
    /// The weight type.
    #[arg(long = "type", value_enum)]
    pub ty: SynthType,
    /// The GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write only the first N layers (the model's shape otherwise).
    #[arg(long)]
    pub layers: Option<usize>,
}

/// The llama.cpp architecture of a synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen3Moe,
    GptOss,
    Deepseek2,
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3Moe => "qwen3moe",
            Arch::GptOss => "gpt-oss",
            Arch::Deepseek2 => "deepseek2",
            Arch::Llama => "llama",
        }
    }
}

/// MLA widths (DeepSeek).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlaSpec {
    pub kv_lora_rank: usize,
    pub rope_dim: usize,
    pub nope_dim: usize,
    pub v_dim: usize,
}

/// YaRN rope scaling as the converter writes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_context: u32,
    /// `rope.scaling.yarn_log_multiplier` (DeepSeek: 0.1 * mscale_all_dim).
    pub log_multiplier: Option<f32>,
}

/// Everything the file's shapes and metadata are made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    /// Leading layers with a dense FFN (DeepSeek's `first_k_dense_replace`).
    pub dense_layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_ff: usize,
    /// The dense FFN width (`intermediate_size`).
    pub dense_ff: usize,
    pub shared_experts: usize,
    pub mla: Option<MlaSpec>,
    pub context: u32,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub yarn: Option<Yarn>,
    pub sliding_window: Option<u32>,
    /// Where the numbers beyond the plan catalog's come from.
    pub source: &'static str,
}

/// The names `tandem synth-gguf --model` takes.
pub const MODELS: &[&str] = &[
    "qwen3-30b-a3b",
    "gpt-oss-20b",
    "deepseek-v2-lite",
    "mixtral-8x7b",
];

fn from_catalog(name: &str) -> Result<ModelShape> {
    let cat = ModelCatalog::builtin().context("the plan's model catalog")?;
    cat.resolve(name)
        .with_context(|| format!("model {name} in the plan's catalog"))
}

/// The shapes of model `name` (one of [`MODELS`]): the plan catalog's where it has them,
/// with the rest from the model's `config.json` (named in `source`).
pub fn spec(name: &str) -> Result<Spec> {
    let s = match name.to_ascii_lowercase().as_str() {
        // Not in the plan catalog (it has qwen3-235b-a22b): Qwen/Qwen3-30B-A3B config.json.
        "qwen3-30b-a3b" => Spec {
            name: "qwen3-30b-a3b".into(),
            arch: Arch::Qwen3Moe,
            hidden: 2048,
            layers: 48,
            dense_layers: 0,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            vocab: 151936,
            experts: 128,
            top_k: 8,
            expert_ff: 768,
            dense_ff: 6144,
            shared_experts: 0,
            mla: None,
            context: 40960,
            rope_theta: 1e6,
            rms_eps: 1e-6,
            yarn: None,
            sliding_window: None,
            source: "Qwen/Qwen3-30B-A3B config.json (hidden 2048, 48 layers, 32/4 heads of \
                     128, 128 experts top-8 of 768, intermediate 6144, vocab 151936, \
                     rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 40960)",
        },
        "gpt-oss-20b" => {
            let m = from_catalog("gpt-oss-20b")?;
            Spec {
                name: m.name.clone(),
                arch: Arch::GptOss,
                hidden: m.hidden_size as usize,
                layers: m.num_layers as usize,
                dense_layers: 0,
                heads: m.num_heads as usize,
                kv_heads: m.num_kv_heads as usize,
                head_dim: m.head_dim as usize,
                vocab: m.vocab_size as usize,
                experts: m.num_experts as usize,
                top_k: m.top_k as usize,
                expert_ff: m.expert_intermediate as usize,
                dense_ff: m.expert_intermediate as usize,
                shared_experts: 0,
                mla: None,
                context: 131072,
                rope_theta: 150000.0,
                rms_eps: 1e-5,
                yarn: Some(Yarn {
                    factor: 32.0,
                    original_context: 4096,
                    log_multiplier: None,
                }),
                sliding_window: Some(128),
                source: "plan catalog; openai/gpt-oss-20b config.json: rope_theta 150000, \
                         rms_norm_eps 1e-5, yarn factor 32 over 4096, sliding_window 128 on \
                         alternate layers, max_position_embeddings 131072",
            }
        }
        "deepseek-v2-lite" => {
            let m = from_catalog("deepseek-v2-lite")?;
            let mla = m
                .mla
                .context("the catalog's deepseek-v2-lite has no MLA shape")?;
            let shared = m
                .shared_expert_intermediate
                .checked_div(m.expert_intermediate)
                .unwrap_or(0) as usize;
            Spec {
                name: m.name.clone(),
                arch: Arch::Deepseek2,
                hidden: m.hidden_size as usize,
                layers: m.num_layers as usize,
                dense_layers: m.num_dense_layers as usize,
                heads: m.num_heads as usize,
                kv_heads: m.num_kv_heads as usize,
                head_dim: mla.qk_nope_head_dim as usize + mla.qk_rope_head_dim as usize,
                vocab: m.vocab_size as usize,
                experts: m.num_experts as usize,
                top_k: m.top_k as usize,
                expert_ff: m.expert_intermediate as usize,
                dense_ff: m.dense_intermediate as usize,
                shared_experts: shared,
                mla: Some(MlaSpec {
                    kv_lora_rank: mla.kv_lora_rank as usize,
                    rope_dim: mla.qk_rope_head_dim as usize,
                    nope_dim: mla.qk_nope_head_dim as usize,
                    v_dim: mla.v_head_dim as usize,
                }),
                context: 163840,
                rope_theta: 10000.0,
                rms_eps: 1e-6,
                yarn: Some(Yarn {
                    factor: 40.0,
                    original_context: 4096,
                    log_multiplier: Some(0.1 * 0.707),
                }),
                sliding_window: None,
                source: "plan catalog; deepseek-ai/DeepSeek-V2-Lite config.json: rope_theta \
                         10000, rms_norm_eps 1e-6, yarn factor 40 over 4096 with \
                         mscale_all_dim 0.707, max_position_embeddings 163840, softmax \
                         routing (greedy), routed_scaling_factor 1.0",
            }
        }
        "mixtral-8x7b" => {
            let m = from_catalog("mixtral-8x7b")?;
            Spec {
                name: m.name.clone(),
                arch: Arch::Llama,
                hidden: m.hidden_size as usize,
                layers: m.num_layers as usize,
                dense_layers: 0,
                heads: m.num_heads as usize,
                kv_heads: m.num_kv_heads as usize,
                head_dim: m.head_dim as usize,
                vocab: m.vocab_size as usize,
                experts: m.num_experts as usize,
                top_k: m.top_k as usize,
                expert_ff: m.expert_intermediate as usize,
                dense_ff: m.expert_intermediate as usize,
                shared_experts: 0,
                mla: None,
                context: 32768,
                rope_theta: 1e6,
                rms_eps: 1e-5,
                yarn: None,
                sliding_window: None,
                source: "plan catalog; mistralai/Mixtral-8x7B-v0.1 config.json: rope_theta \
                         1e6, rms_norm_eps 1e-5, max_position_embeddings 32768",
            }
        }
        other => bail!(
            "no synthetic shapes for model {other:?} (known: {})",
            MODELS.join(", ")
        ),
    };
    Ok(s)
}

/// What a tensor holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fill {
    /// F32 ones (norm weights).
    Ones,
    /// F32 zeros (biases, attention sinks).
    Zeros,
    /// Random weights of standard deviation `1/sqrt(fan_in)`, in the type of `role`.
    Weight { fan_in: usize, role: Role },
}

/// What the type choice of a weight depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Output,
    /// A router (`ffn_gate_inp`): F32, as the converter leaves it.
    Router,
    AttnK,
    AttnV,
    AttnOutput,
    FfnDown,
    /// A stacked expert tensor (`ffn_*_exps`); `down` for `ffn_down_exps`.
    Experts {
        down: bool,
    },
    Other,
}

/// One tensor of the file: its llama.cpp name, shape (PyTorch order: outermost first, the
/// reverse of ggml's `ne`), type and contents.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub fill: Fill,
    /// The layer (for llama.cpp's `use_more_bits`).
    pub layer: Option<usize>,
}

/// llama.cpp's rule for the layers whose attn_v / ffn_down get more bits under Q4_K_M.
fn use_more_bits(i: usize, n: usize) -> bool {
    if i < n / 8 || i >= 7 * n / 8 {
        return true;
    }
    (i - n / 8) % 3 == 2
}

/// The ggml type of a weight of `role` in layer `layer` of `layers`, in a model of
/// `experts` experts, whose rows are `row` values long.
fn weight_type(
    ty: SynthType,
    role: Role,
    layer: Option<usize>,
    layers: usize,
    experts: usize,
    row: usize,
) -> GgmlType {
    // A K-quant needs rows of whole 256-value blocks; llama.cpp falls back for other rows
    // (to Q5_0/Q8_0 depending on the type); here Q8_0, which tandem holds in place.
    let k_or_q8 = |k: GgmlType| {
        if row.is_multiple_of(256) {
            k
        } else {
            GgmlType::Q8_0
        }
    };
    let more = layer.is_some_and(|l| use_more_bits(l, layers));
    match (ty, role) {
        (_, Role::Router) => GgmlType::F32,
        (SynthType::Q8_0, _) => GgmlType::Q8_0,
        (SynthType::Q4_0, Role::Output) => k_or_q8(GgmlType::Q6_K),
        (SynthType::Q4_0, _) => GgmlType::Q4_0,
        (SynthType::Q4KM, Role::Output) => k_or_q8(GgmlType::Q6_K),
        // llama-quant.cpp: 8-expert models (Mixtral) get Q8_0 attn_k/attn_v and Q5_K
        // attn_output.
        (SynthType::Q4KM, Role::AttnK | Role::AttnV) if experts == 8 => GgmlType::Q8_0,
        (SynthType::Q4KM, Role::AttnOutput) if experts == 8 => k_or_q8(GgmlType::Q5_K),
        (SynthType::Q4KM, Role::AttnV | Role::FfnDown | Role::Experts { down: true }) if more => {
            k_or_q8(GgmlType::Q6_K)
        }
        (SynthType::Q4KM, _) => k_or_q8(GgmlType::Q4_K),
        (SynthType::Mxfp4, Role::Experts { .. }) => GgmlType::MXFP4,
        (SynthType::Mxfp4, _) => GgmlType::Q8_0,
    }
}

/// Collects the tensors of a plan, choosing each one's ggml type as it is added.
struct Planner<'a> {
    s: &'a Spec,
    ty: SynthType,
    v: Vec<TensorPlan>,
}

impl Planner<'_> {
    fn add(&mut self, name: String, shape: Vec<usize>, fill: Fill, layer: Option<usize>) {
        let ty = match fill {
            Fill::Ones | Fill::Zeros => GgmlType::F32,
            Fill::Weight { role, .. } => weight_type(
                self.ty,
                role,
                layer,
                self.s.layers,
                self.s.experts,
                *shape.last().unwrap_or(&1),
            ),
        };
        self.v.push(TensorPlan {
            name,
            shape,
            ty,
            fill,
            layer,
        });
    }
}

/// A random weight of fan-in `fan_in`, typed as `role`.
fn w(fan_in: usize, role: Role) -> Fill {
    Fill::Weight { fan_in, role }
}

/// Every tensor of the file, in the order the converter writes them.
pub fn plan(s: &Spec, ty: SynthType) -> Vec<TensorPlan> {
    let mut p = Planner {
        s,
        ty,
        v: Vec::new(),
    };
    let d = s.hidden;
    p.add(
        "token_embd.weight".into(),
        vec![s.vocab, d],
        w(1, Role::Embedding),
        None,
    );
    for l in 0..s.layers {
        p.add(
            format!("blk.{l}.attn_norm.weight"),
            vec![d],
            Fill::Ones,
            Some(l),
        );
        match (s.arch, s.mla) {
            (Arch::Deepseek2, Some(m)) => plan_mla_attention(&mut p, l, m),
            _ => plan_attention(&mut p, l),
        }
        let post = if s.arch == Arch::GptOss {
            "post_attention_norm.weight"
        } else {
            "ffn_norm.weight"
        };
        p.add(format!("blk.{l}.{post}"), vec![d], Fill::Ones, Some(l));
        if l < s.dense_layers {
            plan_dense_ffn(&mut p, l);
        } else {
            plan_moe_ffn(&mut p, l);
        }
    }
    p.add("output_norm.weight".into(), vec![d], Fill::Ones, None);
    p.add(
        "output.weight".into(),
        vec![s.vocab, d],
        w(d, Role::Output),
        None,
    );
    p.v
}

/// The MLA attention tensors of layer `l` (DeepSeek).
fn plan_mla_attention(p: &mut Planner, l: usize, m: MlaSpec) {
    let s = p.s;
    let d = s.hidden;
    let b = |t: &str| format!("blk.{l}.{t}");
    let at = Some(l);
    let q_width = s.heads * s.head_dim;
    p.add(b("attn_q.weight"), vec![q_width, d], w(d, Role::Other), at);
    p.add(
        b("attn_kv_a_mqa.weight"),
        vec![m.kv_lora_rank + m.rope_dim, d],
        w(d, Role::Other),
        at,
    );
    p.add(
        b("attn_kv_a_norm.weight"),
        vec![m.kv_lora_rank],
        Fill::Ones,
        at,
    );
    p.add(
        b("attn_k_b.weight"),
        vec![s.heads, m.kv_lora_rank, m.nope_dim],
        w(m.nope_dim, Role::Other),
        at,
    );
    p.add(
        b("attn_v_b.weight"),
        vec![s.heads, m.v_dim, m.kv_lora_rank],
        w(m.kv_lora_rank, Role::AttnV),
        at,
    );
    p.add(
        b("attn_output.weight"),
        vec![d, s.heads * m.v_dim],
        w(s.heads * m.v_dim, Role::Other),
        at,
    );
}

/// The (grouped-query) attention tensors of layer `l`, with GPT-OSS's biases and sinks
/// and Qwen3's q/k norms.
fn plan_attention(p: &mut Planner, l: usize) {
    let s = p.s;
    let d = s.hidden;
    let b = |t: &str| format!("blk.{l}.{t}");
    let at = Some(l);
    let q_width = s.heads * s.head_dim;
    let kv_width = s.kv_heads * s.head_dim;
    let bias = s.arch == Arch::GptOss;
    p.add(b("attn_q.weight"), vec![q_width, d], w(d, Role::Other), at);
    if bias {
        p.add(b("attn_q.bias"), vec![q_width], Fill::Zeros, at);
    }
    p.add(b("attn_k.weight"), vec![kv_width, d], w(d, Role::AttnK), at);
    if bias {
        p.add(b("attn_k.bias"), vec![kv_width], Fill::Zeros, at);
    }
    p.add(b("attn_v.weight"), vec![kv_width, d], w(d, Role::AttnV), at);
    if bias {
        p.add(b("attn_v.bias"), vec![kv_width], Fill::Zeros, at);
    }
    p.add(
        b("attn_output.weight"),
        vec![d, q_width],
        w(q_width, Role::AttnOutput),
        at,
    );
    if bias {
        p.add(b("attn_output.bias"), vec![d], Fill::Zeros, at);
        p.add(b("attn_sinks.weight"), vec![s.heads], Fill::Zeros, at);
    }
    if s.arch == Arch::Qwen3Moe {
        p.add(b("attn_q_norm.weight"), vec![s.head_dim], Fill::Ones, at);
        p.add(b("attn_k_norm.weight"), vec![s.head_dim], Fill::Ones, at);
    }
}

/// The dense feed-forward tensors of layer `l` (one of the first `dense_layers`).
fn plan_dense_ffn(p: &mut Planner, l: usize) {
    let (d, f) = (p.s.hidden, p.s.dense_ff);
    let b = |t: &str| format!("blk.{l}.{t}");
    let at = Some(l);
    p.add(b("ffn_gate.weight"), vec![f, d], w(d, Role::Other), at);
    p.add(b("ffn_down.weight"), vec![d, f], w(f, Role::FfnDown), at);
    p.add(b("ffn_up.weight"), vec![f, d], w(d, Role::Other), at);
}

/// The router, expert and shared-expert tensors of MoE layer `l`.
fn plan_moe_ffn(p: &mut Planner, l: usize) {
    let s = p.s;
    let d = s.hidden;
    let b = |t: &str| format!("blk.{l}.{t}");
    let at = Some(l);
    let (e, f) = (s.experts, s.expert_ff);
    p.add(b("ffn_gate_inp.weight"), vec![e, d], w(d, Role::Router), at);
    let bias = s.arch == Arch::GptOss;
    if bias {
        p.add(b("ffn_gate_inp.bias"), vec![e], Fill::Zeros, at);
    }
    let up = Role::Experts { down: false };
    let down = Role::Experts { down: true };
    p.add(b("ffn_gate_exps.weight"), vec![e, f, d], w(d, up), at);
    if bias {
        p.add(b("ffn_gate_exps.bias"), vec![e, f], Fill::Zeros, at);
    }
    p.add(b("ffn_down_exps.weight"), vec![e, d, f], w(f, down), at);
    if bias {
        p.add(b("ffn_down_exps.bias"), vec![e, d], Fill::Zeros, at);
    }
    p.add(b("ffn_up_exps.weight"), vec![e, f, d], w(d, up), at);
    if bias {
        p.add(b("ffn_up_exps.bias"), vec![e, f], Fill::Zeros, at);
    }
    if s.shared_experts > 0 {
        let sf = s.shared_experts * f;
        p.add(
            b("ffn_gate_shexp.weight"),
            vec![sf, d],
            w(d, Role::Other),
            at,
        );
        p.add(
            b("ffn_down_shexp.weight"),
            vec![d, sf],
            w(sf, Role::FfnDown),
            at,
        );
        p.add(b("ffn_up_shexp.weight"), vec![sf, d], w(d, Role::Other), at);
    }
}

// ---------------------------------------------------------------------------------------
// Random blocks.

/// splitmix64: one stream per (seed, tensor, chunk), so chunks are generated in any order.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, tensor: u64, chunk: u64) -> Self {
        let mut r = Rng(seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.0 ^= chunk.wrapping_mul(0xD1B5_4A32_D192_ED03);
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let x = self.next().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&x[..n]);
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % (hi - lo + 1) as u64) as u32
    }
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

/// Standard deviation of a uniform integer on `0..n` (n values).
fn uniform_std(n: f32) -> f32 {
    ((n * n - 1.0) / 12.0).sqrt()
}

/// Fills `out` (whole blocks of `ty`) with random blocks whose values have standard
/// deviation about `sigma` and mean about 0.
fn random_blocks(ty: GgmlType, sigma: f32, rng: &mut Rng, out: &mut [u8]) {
    rng.fill(out);
    match ty {
        GgmlType::Q8_0 => {
            // d, 32 x i8 quants uniform in -128..=127.
            let d = sigma / uniform_std(256.0);
            for b in out.chunks_exact_mut(34) {
                b[..2].copy_from_slice(&f16_bytes(d));
            }
        }
        GgmlType::Q4_0 => {
            // d, 16 bytes of nibbles; value = d * (q - 8). q = 0 (-8) is moved to 8 (0) so the
            // values are symmetric (-7..=7, 0 twice as likely): mean 0, std sqrt(17.5) d.
            let d = sigma / 17.5f32.sqrt();
            for b in out.chunks_exact_mut(18) {
                b[..2].copy_from_slice(&f16_bytes(d));
                for q in b[2..].iter_mut() {
                    let (mut lo, mut hi) = (*q & 15, *q >> 4);
                    if lo == 0 {
                        lo = 8;
                    }
                    if hi == 0 {
                        hi = 8;
                    }
                    *q = lo | (hi << 4);
                }
            }
        }
        GgmlType::Q4_K => {
            // d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes
            // of nibbles; value = d * sc * q - dmin * m. With m = sc and dmin = 7.5 d a
            // sub-block is d * sc * (q - 7.5): centred, std d * sc * 4.6.
            for b in out.chunks_exact_mut(144) {
                let mut sc = [0u8; 8];
                for s in sc.iter_mut() {
                    *s = rng.range(24, 40) as u8;
                }
                let d = sigma / (32.0 * uniform_std(16.0));
                b[..2].copy_from_slice(&f16_bytes(d));
                b[2..4].copy_from_slice(&f16_bytes(7.5 * d));
                pack_k_scales(&sc, &sc, &mut b[4..16]);
            }
        }
        GgmlType::Q5_K => {
            // d, dmin, 12 bytes of scales and mins (as Q4_K), 32 bytes of high bits, 128 of
            // nibbles: q in 0..32; m = sc and dmin = 15.5 d centre it.
            for b in out.chunks_exact_mut(176) {
                let mut sc = [0u8; 8];
                for s in sc.iter_mut() {
                    *s = rng.range(24, 40) as u8;
                }
                let d = sigma / (32.0 * uniform_std(32.0));
                b[..2].copy_from_slice(&f16_bytes(d));
                b[2..4].copy_from_slice(&f16_bytes(15.5 * d));
                pack_k_scales(&sc, &sc, &mut b[4..16]);
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes low nibbles, 64 bytes high bits, 16 x i8 scales, d;
            // value = d * scale * (q - 32), q uniform in 0..64.
            for b in out.chunks_exact_mut(210) {
                for s in b[192..208].iter_mut() {
                    *s = rng.range(12, 20) as u8;
                }
                let d = sigma / (16.0 * uniform_std(64.0));
                b[208..210].copy_from_slice(&f16_bytes(d));
            }
        }
        GgmlType::MXFP4 => {
            // An E8M0 exponent, 16 bytes of e2m1 nibbles. ggml's e2m1 table is in half
            // units (0, 1, 2, 3, 4, 6, 8, 12, signed) under a scale of 2^(e - 128); the RMS
            // of a uniform nibble is sqrt(274 / 8) = 5.85 such units.
            let e = (128.0 + (sigma / 5.85).log2()).round().clamp(1.0, 254.0) as u8;
            for b in out.chunks_exact_mut(17) {
                b[0] = e;
            }
        }
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                let u = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                // Uniform in [-sqrt3, sqrt3) sigma: standard deviation sigma.
                let x = ((u as f32 / u32::MAX as f32) * 2.0 - 1.0) * 3f32.sqrt() * sigma;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        _ => unreachable!("synth writes no {ty} weights"),
    }
}

/// The 12 bytes of 6-bit scales and mins of a Q4_K / Q5_K block (ggml's
/// `get_scale_min_k4` read backwards).
fn pack_k_scales(sc: &[u8; 8], m: &[u8; 8], s: &mut [u8]) {
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
}

fn constant_f32(x: f32, out: &mut [u8]) {
    let b = x.to_le_bytes();
    for c in out.chunks_exact_mut(4) {
        c.copy_from_slice(&b);
    }
}

/// Progress on stderr: bytes written of the total, at most once a second.
struct Progress {
    total: u64,
    done: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed().as_secs_f64() >= 1.0 || self.done == self.total {
            self.last = Instant::now();
            let s = self.start.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\rsynth-gguf: {:.2} / {:.2} GB ({:.0}%), {:.0} MB/s   ",
                self.done as f64 / 1e9,
                self.total as f64 / 1e9,
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.done as f64 / 1e6 / s
            );
            if self.done == self.total {
                eprintln!();
            }
        }
    }
}

/// Bytes generated per parallel chunk (rounded to whole blocks).
const CHUNK: usize = 4 << 20;

fn stream_tensor(
    w: &mut dyn Write,
    t: &TensorPlan,
    index: u64,
    seed: u64,
    progress: &std::sync::Mutex<Progress>,
) -> std::io::Result<()> {
    let n: u64 = t.shape.iter().map(|d| *d as u64).product();
    let total = t.ty.bytes_for(n).unwrap_or(0) as usize;
    let block = t.ty.type_size();
    let chunk = (CHUNK / block).max(1) * block;
    let n_chunks = total.div_ceil(chunk);
    // A batch of chunks at a time: each thread generates one, then they are written in order.
    let batch = rayon::current_num_threads().max(1) * 2;
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut c0 = 0;
    while c0 < n_chunks {
        let c1 = (c0 + batch).min(n_chunks);
        bufs.resize_with(c1 - c0, Vec::new);
        bufs.par_iter_mut().enumerate().for_each(|(i, buf)| {
            let c = c0 + i;
            let len = chunk.min(total - c * chunk);
            buf.resize(len, 0);
            match t.fill {
                Fill::Ones => constant_f32(1.0, buf),
                Fill::Zeros => constant_f32(0.0, buf),
                Fill::Weight { fan_in, .. } => {
                    let mut rng = Rng::new(seed, index, c as u64);
                    random_blocks(t.ty, 1.0 / (fan_in as f32).sqrt(), &mut rng, buf);
                }
            }
        });
        for b in &bufs {
            w.write_all(b)?;
            progress.lock().map(|mut p| p.add(b.len() as u64)).ok();
        }
        c0 = c1;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tokenizer.

/// GPT-2's byte -> printable character map (`bytes_to_unicode`).
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        *slot = if printable {
            char::from_u32(b as u32).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    out
}

/// Text the merges are learned from (written for this purpose).
const CORPUS: &str = "The quick brown fox jumps over the lazy dog. A model of experts sends every \
token to the few experts its router picks, and the attention side keeps the cache of keys and \
values. The server answers requests in the order they came, streams the tokens it generates, \
and stops when the model says the answer is complete. What is the capital of France? The \
capital of France is Paris. Write a function that returns the sum of two numbers: def add(a, \
b): return a + b. Hello, world! This is a test of the tokenizer, the sampler and the engine. \
Numbers like 12345 and 2026 are split one digit at a time. There were three things on the \
table: the paper, the pen and the phone. They said that the weather in the north would be \
cold and the roads would be closed. She thinks the results are interesting and that the \
method is simple. We measured the throughput and the latency of the system under load.";

/// Byte-level BPE merges learned greedily on [`CORPUS`] (the most frequent pair first, ties
/// by the pair's text): every merge's parts are tokens before it, so the vocabulary is one
/// llama.cpp and HF tokenizers both apply consistently. Returns (new tokens, merges).
pub fn learn_merges(max: usize) -> (Vec<String>, Vec<String>) {
    let chars = byte_chars();
    // Words as the qwen2 pre-tokenizer would split plain text: a leading space joins the
    // next word.
    let mut words: std::collections::BTreeMap<Vec<String>, usize> = Default::default();
    let mut cur = String::new();
    let push = |w: &str, words: &mut std::collections::BTreeMap<Vec<String>, usize>| {
        if !w.is_empty() {
            let syms = w.bytes().map(|b| chars[b as usize].to_string()).collect();
            *words.entry(syms).or_default() += 1;
        }
    };
    for c in CORPUS.chars() {
        if c.is_alphabetic() {
            cur.push(c);
        } else {
            push(&cur, &mut words);
            cur.clear();
            if c == ' ' {
                cur.push(' ');
            } else {
                push(&c.to_string(), &mut words);
            }
        }
    }
    push(&cur, &mut words);
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    let mut tokens = Vec::new();
    let mut merges = Vec::new();
    let mut known: std::collections::HashSet<String> =
        chars.iter().map(|c| c.to_string()).collect();
    while merges.len() < max {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for (w, n) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += n;
            }
        }
        let Some(((a, b), n)) = counts
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0)))
        else {
            break;
        };
        if n < 2 {
            break;
        }
        let joined = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        if known.insert(joined.clone()) {
            tokens.push(joined.clone());
        }
        for (w, _) in words.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(joined.clone());
                    i += 2;
                } else {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
            *w = out;
        }
    }
    (tokens, merges)
}

/// The special tokens, in vocabulary order after the merged ones.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen's templates write it (`\n` escapes inside the Jinja strings).
const CHAT_TEMPLATE: &str = r#"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

/// The tokenizer metadata: 256 byte tokens, merged tokens, the special tokens, then
/// `[PADn]` tokens up to `vocab`, typed USER_DEFINED: a random model mostly samples them, and
/// llama.cpp renders UNUSED tokens as no text at all, which a load generator reads as an empty
/// stream; user-defined ones are their text in both engines.
fn tokenizer_meta(w: &mut GgufWriter<'_>, vocab: usize) -> Result<()> {
    let (merged, merges) = learn_merges(400);
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(merged);
    let first_special = tokens.len();
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    if tokens.len() > vocab {
        bail!(
            "the vocabulary of {vocab} tokens is smaller than the {} the tokenizer needs",
            tokens.len()
        );
    }
    let mut types = vec![1i32; tokens.len()];
    for t in types.iter_mut().skip(first_special) {
        *t = 3; // control
    }
    for i in tokens.len()..vocab {
        tokens.push(format!("[PAD{i}]"));
        types.push(4); // user-defined
    }
    let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let eot = first_special as u32;
    let im_end = first_special as u32 + 2;
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("qwen2".into()))
        .meta("tokenizer.ggml.tokens", strs(tokens))
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        )
        .meta("tokenizer.ggml.merges", strs(merges))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(eot))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(im_end))
        .meta("tokenizer.ggml.padding_token_id", Value::U32(eot))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta(
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The file.

fn arch_meta(w: &mut GgufWriter<'_>, s: &Spec, ty: SynthType) -> Result<()> {
    let a = s.arch.name();
    let k = |key: &str| format!("{a}.{key}");
    let u = |x: usize| Value::U32(x as u32);
    w.meta("general.architecture", Value::String(a.into()))
        .meta(
            "general.name",
            Value::String(format!("{} (synthetic, random weights)", s.name)),
        )
        .meta("general.file_type", Value::U32(ty.file_type()))
        .meta("general.quantization_version", Value::U32(2));
    w.meta(&k("vocab_size"), u(s.vocab))
        .meta(&k("context_length"), Value::U32(s.context))
        .meta(&k("embedding_length"), u(s.hidden))
        .meta(&k("block_count"), u(s.layers))
        // Mixtral's converter writes its expert width (intermediate_size) here.
        .meta(
            &k("feed_forward_length"),
            u(if s.arch == Arch::Llama {
                s.expert_ff
            } else {
                s.dense_ff
            }),
        )
        .meta(&k("attention.head_count"), u(s.heads))
        .meta(&k("rope.freq_base"), Value::F32(s.rope_theta))
        .meta(
            &k("attention.layer_norm_rms_epsilon"),
            Value::F32(s.rms_eps),
        )
        .meta(&k("expert_count"), u(s.experts))
        .meta(&k("expert_used_count"), u(s.top_k));
    match s.arch {
        Arch::Deepseek2 => {
            let m = s
                .mla
                .with_context(|| format!("{}: a deepseek2 model without MLA widths", s.name))?;
            // The MLA form: one shared latent "head" of kv_lora + rope.
            w.meta(&k("attention.head_count_kv"), u(1))
                .meta(&k("attention.key_length"), u(m.kv_lora_rank + m.rope_dim))
                .meta(&k("attention.value_length"), u(m.kv_lora_rank))
                .meta(&k("attention.key_length_mla"), u(m.nope_dim + m.rope_dim))
                .meta(&k("attention.value_length_mla"), u(m.v_dim))
                .meta(&k("attention.kv_lora_rank"), u(m.kv_lora_rank))
                // V2-Lite has no low-rank query (the converter writes no key for its null
                // q_lora_rank); llama.cpp only knows that from the layer count (27), so a
                // file cut by --layers says 0, which both loaders read as "none".
                .meta(&k("attention.q_lora_rank"), u(0))
                .meta(&k("rope.dimension_count"), u(m.rope_dim))
                .meta(&k("leading_dense_block_count"), u(s.dense_layers))
                .meta(&k("expert_feed_forward_length"), u(s.expert_ff))
                .meta(&k("expert_shared_count"), u(s.shared_experts))
                .meta(&k("expert_weights_scale"), Value::F32(1.0))
                .meta(&k("expert_gating_func"), Value::U32(1));
        }
        _ => {
            w.meta(&k("attention.head_count_kv"), u(s.kv_heads))
                .meta(&k("attention.key_length"), u(s.head_dim))
                .meta(&k("attention.value_length"), u(s.head_dim));
            if s.arch == Arch::Llama {
                w.meta(&k("rope.dimension_count"), u(s.head_dim));
            } else {
                w.meta(&k("expert_feed_forward_length"), u(s.expert_ff));
            }
        }
    }
    if let Some(sw) = s.sliding_window {
        w.meta(&k("attention.sliding_window"), Value::U32(sw));
    }
    if let Some(y) = s.yarn {
        w.meta(&k("rope.scaling.type"), Value::String("yarn".into()))
            .meta(&k("rope.scaling.factor"), Value::F32(y.factor))
            .meta(
                &k("rope.scaling.original_context_length"),
                Value::U32(y.original_context),
            );
        if let Some(m) = y.log_multiplier {
            w.meta(&k("rope.scaling.yarn_log_multiplier"), Value::F32(m));
        }
    }
    Ok(())
}

/// Writes the synthetic GGUF of `spec` in `ty` to `out`; returns the number of bytes.
pub fn write(spec: &Spec, ty: SynthType, out: &Path, seed: u64) -> Result<u64> {
    let tensors = plan(spec, ty);
    let mut w = GgufWriter::new();
    arch_meta(&mut w, spec, ty)?;
    tokenizer_meta(&mut w, spec.vocab)?;
    let total: u64 = tensors
        .iter()
        .map(|t| {
            let n: u64 = t.shape.iter().map(|d| *d as u64).product();
            t.ty.bytes_for(n).unwrap_or(0)
        })
        .sum();
    eprintln!(
        "synth-gguf: {} ({}), {} layers, {} tensors, {:.2} GB of weights -> {}",
        spec.name,
        spec.arch.name(),
        spec.layers,
        tensors.len(),
        total as f64 / 1e9,
        out.display()
    );
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress {
        total,
        done: 0,
        start: Instant::now(),
        last: Instant::now(),
    }));
    for (i, t) in tensors.into_iter().enumerate() {
        let p = progress.clone();
        let (name, tty, shape) = (t.name.clone(), t.ty, t.shape.clone());
        w.tensor_with(&name, tty, &shape, move |wr| {
            stream_tensor(wr, &t, i as u64, seed, &p)
        })
        .with_context(|| format!("tensor {name}"))?;
    }
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut bw = std::io::BufWriter::with_capacity(8 << 20, file);
    w.write(&mut bw)
        .with_context(|| format!("writing {}", out.display()))?;
    bw.flush()?;
    let len = std::fs::metadata(out)?.len();
    eprintln!(
        "synth-gguf: wrote {:.2} GB in {:.1} s",
        len as f64 / 1e9,
        progress
            .lock()
            .map(|p| p.start.elapsed().as_secs_f64())
            .unwrap_or(0.0)
    );
    Ok(len)
}

/// The file [`write`] makes (the same header: metadata, tokenizer, every tensor's name, shape,
/// type and place) with every tensor's data left as zeros that are never written: a sparse
/// file, the header's few megabytes on disk whatever the model's size. For tests of what is
/// decided from the header alone (the tensor map, memory estimates) at the real size.
/// Returns the file's length.
pub fn write_hollow(spec: &Spec, ty: SynthType, out: &Path) -> Result<u64> {
    let mut w = GgufWriter::new();
    arch_meta(&mut w, spec, ty)?;
    tokenizer_meta(&mut w, spec.vocab)?;
    for t in plan(spec, ty) {
        let n: u64 = t.shape.iter().map(|d| *d as u64).product();
        let size =
            t.ty.bytes_for(n)
                .with_context(|| format!("tensor {}: {n} values are not whole blocks", t.name))?;
        w.tensor_with(&t.name, t.ty, &t.shape, move |wr| {
            static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
            let mut left = size;
            while left > 0 {
                let k = left.min(ZEROS.len() as u64) as usize;
                wr.write_all(&ZEROS[..k])?;
                left -= k as u64;
            }
            Ok(())
        })
        .with_context(|| format!("tensor {}", t.name))?;
    }
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut h = Holes { file, len: 0 };
    w.write(&mut h)
        .with_context(|| format!("writing {}", out.display()))?;
    h.file.set_len(h.len)?;
    Ok(h.len)
}

/// A file writer that skips (seeks over) writes of zeros, leaving holes.
struct Holes {
    file: std::fs::File,
    len: u64,
}

impl Write for Holes {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        use std::io::{Seek, SeekFrom};
        if b.iter().fold(0u8, |a, x| a | x) == 0 {
            self.file.seek(SeekFrom::Current(b.len() as i64))?;
        } else {
            self.file.write_all(b)?;
        }
        self.len += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// `tandem synth-gguf`.
pub fn run(a: &SynthArgs) -> Result<()> {
    let mut s = spec(&a.model)?;
    if let Some(n) = a.layers {
        if n == 0 || n > s.layers {
            bail!("--layers {n}: {} has 1 to {} layers", s.name, s.layers);
        }
        s.layers = n;
        s.dense_layers = s.dense_layers.min(n);
    }
    write(&s, a.ty, &a.out, a.seed)?;
    Ok(())
}
