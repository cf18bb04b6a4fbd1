//! The embedded default model: a Mixtral-architecture checkpoint with random weights and a
//! byte-level BPE tokenizer trained here, on a generated corpus. It is written in the same
//! Hugging Face layout as a real checkpoint (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json) and loaded through the same code.

use crate::error::{ModelError, Result};
use rayon::prelude::*;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Shape of a generated demo model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemoSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub experts: usize,
    pub top_k: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub seed: u64,
}

impl DemoSpec {
    /// The default: ~490M parameters (1024 hidden, 8 layers, 8 experts, top-2, 32k vocab),
    /// the shape used to compare with llama.cpp.
    pub const DEFAULT: DemoSpec = DemoSpec {
        hidden: 1024,
        layers: 8,
        heads: 16,
        kv_heads: 8,
        experts: 8,
        top_k: 2,
        ffn: 2048,
        vocab: 32000,
        max_pos: 4096,
        seed: 7,
    };
    /// A few hundred kilobytes, for tests.
    pub const TINY: DemoSpec = DemoSpec {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        experts: 4,
        top_k: 2,
        ffn: 128,
        vocab: 512,
        max_pos: 1024,
        seed: 7,
    };

    /// About as many parameters as the default (~460M) in 32 layers of half the width: the
    /// LM head and sampling (the step boundary) weigh a quarter as much against the layers,
    /// for measuring ping-pong where the boundary does not dominate (docs/pingpong.md).
    pub const DEEP: DemoSpec = DemoSpec {
        hidden: 512,
        layers: 32,
        heads: 8,
        kv_heads: 4,
        ffn: 1024,
        ..Self::DEFAULT
    };

    /// The presets by name, for `tandem init-demo --preset`.
    pub const PRESETS: [(&'static str, DemoSpec); 3] = [
        ("default", Self::DEFAULT),
        ("tiny", Self::TINY),
        ("deep", Self::DEEP),
    ];

    pub fn preset(name: &str) -> Result<Self> {
        Self::PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::PRESETS.iter().map(|(n, _)| *n).collect();
                ModelError::Input(format!(
                    "unknown demo preset {name:?} ({})",
                    names.join(", ")
                ))
            })
    }

    fn tensors(&self) -> Vec<(String, Vec<usize>, Init)> {
        let (d, f, hd) = (self.hidden, self.ffn, self.hidden / self.heads);
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab, d],
            Init::Normal(1.0),
        )];
        let lin = |fan_in: usize| Init::Normal(1.0 / (fan_in as f32).sqrt());
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![d], Init::Ones));
            t.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                Init::Ones,
            ));
            t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, d],
                lin(d),
            ));
            t.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, d],
                lin(d),
            ));
            t.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, d],
                lin(d),
            ));
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, self.heads * hd],
                lin(d),
            ));
            t.push((
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![self.experts, d],
                lin(d),
            ));
            for e in 0..self.experts {
                let q = format!("{p}.block_sparse_moe.experts.{e}");
                t.push((format!("{q}.w1.weight"), vec![f, d], lin(d)));
                t.push((format!("{q}.w3.weight"), vec![f, d], lin(d)));
                t.push((format!("{q}.w2.weight"), vec![d, f], lin(f)));
            }
        }
        t.push(("model.norm.weight".into(), vec![d], Init::Ones));
        t.push(("lm_head.weight".into(), vec![self.vocab, d], lin(d)));
        t
    }

    fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "num_local_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": null,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
            "tandem_demo": {"seed": self.seed, "note": "random weights, generated by tandem init-demo"}
        })
    }
}

#[derive(Clone, Copy)]
enum Init {
    Ones,
    /// Roughly normal with this standard deviation (sum of uniforms).
    Normal(f32),
}

/// splitmix64: a tiny, fast, reproducible generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn hash_str(s: &str, seed: u64) -> u64 {
    let mut h = seed ^ 0xcbf29ce484222325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// bf16 bytes of one tensor.
fn tensor_bytes(name: &str, n: usize, init: Init, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; n * 2];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK * 2)
        .enumerate()
        .for_each(|(ci, c)| {
            let mut rng = Rng(hash_str(name, seed) ^ (ci as u64).wrapping_mul(0x2545F4914F6CDD1D));
            for b in c.chunks_exact_mut(2) {
                let v = match init {
                    Init::Ones => 1.0,
                    Init::Normal(std) => {
                        // Irwin-Hall with 4 terms: mean 2, variance 1/3.
                        let s = rng.unit() + rng.unit() + rng.unit() + rng.unit() - 2.0;
                        s * std * 3f32.sqrt()
                    }
                };
                b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        });
    out
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the demo checkpoint to `dir` (created if needed). Overwrites existing files.
pub fn write_demo(dir: &Path, spec: &DemoSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Tokenizer first: it is the slow part for the default vocabulary.
    write_tokenizer(dir, spec.vocab, spec.seed)?;
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&spec.config_json()).unwrap_or_default(),
    )
    .map_err(io_err(&cfg_path))?;
    let gen_path = dir.join("generation_config.json");
    std::fs::write(&gen_path, r#"{"bos_token_id": 1, "eos_token_id": 2}"#)
        .map_err(io_err(&gen_path))?;

    // safetensors: 8-byte header length, JSON header, then the data in header order.
    let tensors = spec.tensors();
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, _) in &tensors {
        let n: usize = shape.iter().product();
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n * 2]}),
        );
        off += n * 2;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.partial");
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(io_err(&tmp))?;
    w.write_all(&hbytes).map_err(io_err(&tmp))?;
    for (name, shape, init) in &tensors {
        let n: usize = shape.iter().product();
        w.write_all(&tensor_bytes(name, n, *init, spec.seed))
            .map_err(io_err(&tmp))?;
    }
    w.flush().map_err(io_err(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(())
}

/// tandem's cache directory: `$TANDEM_HOME` or `~/.cache/tandem` (the demo model, profiles).
pub fn cache_root() -> PathBuf {
    if let Ok(h) = std::env::var("TANDEM_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/tandem")
}

/// The directory of the default demo model: `$TANDEM_HOME/demo` or `~/.cache/tandem/demo`.
pub fn default_demo_dir() -> PathBuf {
    cache_root().join("demo")
}

/// Writes the default demo model unless a complete one is already there.
pub fn ensure_demo(dir: &Path, spec: &DemoSpec) -> Result<()> {
    let complete = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .all(|f| dir.join(f).exists());
    if !complete {
        tracing::info!(dir = %dir.display(), "writing the embedded demo model (random weights)");
        write_demo(dir, spec)?;
    }
    Ok(())
}

const SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as many Qwen and Mixtral fine-tunes use.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Trains a byte-level BPE tokenizer of `vocab` entries on a generated corpus and writes
/// `tokenizer.json` and `tokenizer_config.json`.
pub fn write_tokenizer(dir: &Path, vocab: usize, seed: u64) -> Result<()> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};
    let terr = |e: tokenizers::Error| ModelError::Tokenizer {
        path: dir.join("tokenizer.json"),
        msg: e.to_string(),
    };
    let mut tk: TokenizerImpl<BPE, tokenizers::NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .build()
            .map_err(terr)?;
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let corpus = corpus(if vocab > 4096 { 600_000 } else { 20_000 }, seed);
    tk.train(&mut trainer, corpus.iter()).map_err(terr)?;
    let path = dir.join("tokenizer.json");
    tk.save(&path, false).map_err(terr)?;
    let tc = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": false,
        "model_max_length": 4096,
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let tc_path = dir.join("tokenizer_config.json");
    std::fs::write(
        &tc_path,
        serde_json::to_string_pretty(&tc).unwrap_or_default(),
    )
    .map_err(io_err(&tc_path))?;
    Ok(())
}

const ENGLISH: &str = "the of and to in is that it for as with was on be by this are or from at \
which an but not have has had were all can their there one more also its when will into been \
other some than time only these may about over after such most many new first two then model \
expert experts attention token tokens batch layer layers memory bandwidth compute network \
server request requests latency throughput cache key value router weight weights hidden state \
pipeline micro replica worker workers decode prefill sequence sequences schedule scheduler \
block blocks page paged kernel matrix vector sum softmax norm rotary position embedding head \
heads group query serve serving cluster node nodes cost price hardware plan planner simulate";

/// A deterministic pseudo-English corpus: real function words plus generated words from
/// syllables, with Zipf-like frequencies, so BPE finds enough merges for a large vocabulary.
fn corpus(words: usize, seed: u64) -> Vec<String> {
    let onsets = [
        "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
        "z", "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr",
    ];
    let vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "y"];
    let codas = [
        "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x",
    ];
    let mut rng = Rng(seed ^ 0x5EED);
    let lexicon_size = if words > 100_000 { 40_000 } else { 2_000 };
    let english: Vec<&str> = ENGLISH.split_whitespace().collect();
    let lexicon: Vec<String> = (0..lexicon_size)
        .map(|_| {
            let syl = 1 + rng.below(3);
            (0..syl)
                .map(|_| {
                    format!(
                        "{}{}{}",
                        onsets[rng.below(onsets.len())],
                        vowels[rng.below(vowels.len())],
                        codas[rng.below(codas.len())]
                    )
                })
                .collect::<String>()
        })
        .collect();
    let mut lines = Vec::new();
    let mut line = String::new();
    for i in 0..words {
        // Zipf-like: rank ~ 1/u.
        let w: String = if rng.below(3) == 0 {
            english[rng.below(english.len())].to_string()
        } else {
            let u = rng.unit().max(1e-6);
            let rank = ((1.0 / u) as usize).min(lexicon.len()) - 1;
            let r =
                (rank + rng.below(lexicon.len()) * usize::from(rng.below(4) == 0)) % lexicon.len();
            lexicon[r].clone()
        };
        if !line.is_empty() {
            line.push(' ');
        }
        if line.is_empty() || rng.below(20) == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                line.extend(f.to_uppercase());
                line.push_str(c.as_str());
            }
        } else {
            line.push_str(&w);
        }
        match rng.below(40) {
            0 => line.push_str(", "),
            1 => line.push_str(&format!(" {}", rng.below(10_000))),
            _ => {}
        }
        if rng.below(15) == 0 || i + 1 == words {
            line.push('.');
            lines.push(std::mem::take(&mut line));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::DemoSpec;

    #[test]
    fn presets_by_name() {
        assert_eq!(DemoSpec::preset("default").unwrap(), DemoSpec::DEFAULT);
        assert_eq!(DemoSpec::preset("tiny").unwrap(), DemoSpec::TINY);
        let deep = DemoSpec::preset("deep").unwrap();
        assert_eq!((deep.layers, deep.hidden), (32, 512));
        assert_eq!(deep.hidden % deep.heads, 0);
        assert_eq!(deep.heads % deep.kv_heads, 0);
        let e = DemoSpec::preset("huge").unwrap_err().to_string();
        assert!(
            e.contains("\"huge\"") && e.contains("default, tiny, deep"),
            "{e}"
        );
    }
}
