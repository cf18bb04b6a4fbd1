//! The tokenizer a GGUF file's metadata describes, as the Hugging Face `tokenizer.json` of the
//! same model (read by the `tokenizers` crate in [`crate::Tokenizer::from_parts`]).
//!
//! llama.cpp's converter writes the vocabulary as `tokenizer.ggml.tokens` (+ `scores`,
//! `token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the kind
//! of tokenizer as `tokenizer.ggml.model`, and for byte-level BPE the merges and the name of
//! the pre-tokenizer split (`tokenizer.ggml.pre`). Two kinds are read:
//!
//! - **`llama`: SentencePiece BPE** (Llama 2, Mistral, Mixtral), as transformers 5 tokenizes
//!   it (`LlamaTokenizer`, `legacy`): a BPE model with byte fallback over the pieces (`<0xXX>`
//!   byte tokens), the merges derived from the pieces and their scores as transformers'
//!   converter derives them (the merges of the hub's `tokenizer.json`; `spm_merges`), a
//!   Metaspace pre-tokenizer (spaces become `▁`, and a `▁` is prepended to the text and to the
//!   text after every special token, as llama.cpp does, unless it already starts with one or
//!   `tokenizer.ggml.add_space_prefix` is false) and the matching decoder. Where transformers 4
//!   and llama.cpp differ from transformers 5: text that starts with a space gets a second
//!   `▁` there (`" Hello"` is `▁` `▁Hello`), here not (`▁Hello`).
//! - **`gpt2`: byte-level BPE**, the merges as written, the split of the llama.cpp
//!   pre-tokenizer name ([`BPE_PRE_TOKENIZERS`]) as the hub's `Split` regexes (the originals
//!   of the regexes llama.cpp's `llama-vocab.cpp` adapts).
//!
//! Control tokens (and the unknown token) become special added tokens, user-defined tokens
//! non-special added tokens, as in the hub tokenizers. `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` become the post-processor; when the file does not say, BOS is added where
//! llama.cpp adds it (SentencePiece, and the llama3 and tekken splits).

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::gguf_format::Value;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

/// What [`crate::Tokenizer::from_parts`] is built from.
pub struct TokenizerParts {
    /// A `tokenizer.json` document.
    pub tokenizer_json: Json,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

// The hub's split regexes (what llama.cpp's adapted ones stand for).
const LLAMA3_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const O200K_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK_LLM_RES: [&str; 6] = [
    r##"[\r\n]"##,
    r##"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+"##,
    r##"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+"##,
    r##"\s+$"##,
    r##"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"##,
    r##"\p{N}+"##,
];
const DEEPSEEK_CODER_RES: [&str; 5] = [
    r##"[\r\n]"##,
    r##"\s?\p{L}+"##,
    r##"\s?\p{P}+"##,
    r##"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"##,
    r##"\p{N}"##,
];
const DEEPSEEK_V3_RES: [&str; 3] = [
    r##"\p{N}{1,3}"##,
    r##"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

/// How a byte-level BPE vocabulary splits text before its merges.
#[derive(Clone, Copy)]
enum Split {
    /// GPT-2's own regex (the `ByteLevel` pre-tokenizer with `use_regex`).
    Gpt2,
    /// Each digit alone, then GPT-2's regex (StarCoder's `Digits` + `ByteLevel`).
    DigitsGpt2,
    /// These regexes one after the other (`Split` ... `Isolated`), then the byte mapping.
    Regexes(&'static [&'static str]),
}

/// A llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) as the hub's tokenizer does it.
struct Pre {
    split: Split,
    /// The BPE model's `ignore_merges` (a word in the vocabulary is one token).
    ignore_merges: bool,
    /// Whether BOS is added when `tokenizer.ggml.add_bos_token` is absent (llama.cpp's default).
    add_bos: bool,
}

/// The `tokenizer.ggml.pre` names of byte-level BPE tokenizers that can be loaded, with
/// llama.cpp's name groups (`llama-vocab.cpp`): each group is one split.
pub const BPE_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "exaone4",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "megrez",
    "stablelm2",
    "qwen35",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "gpt-4o",
    "llama4",
    "minimax-m2",
    "tekken",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
];

fn bpe_pre(name: &str) -> Option<Pre> {
    let pre = |split, ignore_merges, add_bos| Pre {
        split,
        ignore_merges,
        add_bos,
    };
    Some(match name {
        // "default" is what a file without the key gets in llama.cpp too; its tokenizer is
        // taken to be GPT-2's.
        "default" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "exaone4" => {
            pre(Split::Gpt2, false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => {
            pre(Split::Regexes(&[LLAMA3_RE]), true, true)
        }
        "dbrx" | "smaug-bpe" | "chatglm-bpe" => pre(Split::Regexes(&[LLAMA3_RE]), false, false),
        "glm4" | "glm5" => pre(Split::Regexes(&[LLAMA3_RE]), true, false),
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => {
            pre(Split::Regexes(&[QWEN2_RE]), false, false)
        }
        "qwen35" => pre(Split::Regexes(&[QWEN35_RE]), false, false),
        "deepseek-llm" => pre(Split::Regexes(&DEEPSEEK_LLM_RES), false, false),
        "deepseek-coder" => pre(Split::Regexes(&DEEPSEEK_CODER_RES), false, false),
        "deepseek-v3" => pre(Split::Regexes(&DEEPSEEK_V3_RES), false, false),
        "gpt-4o" | "llama4" | "minimax-m2" => pre(Split::Regexes(&[O200K_RE]), false, false),
        "tekken" => pre(Split::Regexes(&[TEKKEN_RE]), true, true),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            pre(Split::DigitsGpt2, false, false)
        }
        _ => return None,
    })
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

impl Split {
    fn pre_tokenizer(self) -> Json {
        match self {
            Split::Gpt2 => byte_level(true),
            Split::DigitsGpt2 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            Split::Regexes(res) => {
                let mut v: Vec<Json> = res
                    .iter()
                    .map(|re| {
                        json!({"type": "Split", "pattern": {"Regex": re},
                               "behavior": "Isolated", "invert": false})
                    })
                    .collect();
                v.push(byte_level(false));
                json!({"type": "Sequence", "pretokenizers": v})
            }
        }
    }
}

/// The post-processor that adds BOS and/or EOS around each sequence, as transformers' Llama
/// tokenizer writes it (`None` when it adds nothing).
fn post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return Json::Null;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (name, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some((b, _)) = bos {
            out.push(special(b, type_id));
        }
        out.push(seq(name, type_id));
        if let Some((e, _)) = eos {
            out.push(special(e, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    for (t, id) in [bos, eos].into_iter().flatten() {
        specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair,
           "special_tokens": specials})
}

/// SentencePiece's merges as transformers' converter derives them from the pieces and their
/// scores (the order of the hub's `tokenizer.json` of Llama and Mistral): every split of a
/// piece into two pieces of the vocabulary, ordered by the score of the piece (highest first),
/// then by the lengths of the left and right parts (longest first), then by piece id and the
/// ids of the parts. In a trained SentencePiece BPE model the scores fall with the id, except
/// for pieces given a score of their own (Llama's `▁▁` has -1e9: merged last).
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &HashMap<&str, usize>) -> Vec<Json> {
    struct M<'a> {
        l: &'a str,
        r: &'a str,
        score: f32,
        len: (usize, usize),
    }
    let mut merges = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                local.push((a, b, l, r));
            }
        }
        local.sort_by_key(|&(a, b, _, _)| (a, b));
        merges.extend(local.into_iter().map(|(_, _, l, r)| M {
            l,
            r,
            score,
            len: (l.chars().count(), r.chars().count()),
        }));
    }
    // Descending and stable, as Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| b.len.cmp(&a.len)));
    merges.into_iter().map(|m| json!([m.l, m.r])).collect()
}

impl GgufFile {
    fn tokenizer_err(&self, msg: String) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            msg,
        }
    }

    fn tokenizer_strings(&self, key: &str) -> Result<Vec<String>> {
        match self.meta(key) {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.tokenizer_err(format!("{key}[{i}] is not a string"))),
                })
                .collect(),
            None => Ok(vec![]),
            _ => Err(self.tokenizer_err(format!("{key} is not an array"))),
        }
    }

    /// `tokenizer.ggml.scores`, one per token (zeros when absent).
    fn tokenizer_scores(&self, n: usize) -> Result<Vec<f32>> {
        let key = "tokenizer.ggml.scores";
        match self.meta(key) {
            None => Ok(vec![0.0; n]),
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    _ => Err(self.tokenizer_err(format!("{key}[{i}] is not a float"))),
                })
                .collect(),
            Some(Value::Array(a)) => {
                Err(self.tokenizer_err(format!("{key} has {} entries for {n} tokens", a.len())))
            }
            Some(_) => Err(self.tokenizer_err(format!("{key} is not an array"))),
        }
    }

    /// A boolean key: `None` when absent.
    fn tokenizer_flag(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match v.to_u64() {
                Ok(x) => Ok(Some(x != 0)),
                Err(_) => Err(self.tokenizer_err(format!("{key} is not a boolean"))),
            },
        }
    }

    /// `tokenizer.ggml.token_type`, one per token (all normal, 1, when absent).
    fn tokenizer_types(&self, n: usize) -> Result<Vec<i64>> {
        match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => {
                if a.len() != n {
                    return Err(self.tokenizer_err(format!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        a.len(),
                        n
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::I32(x) => Ok(*x as i64),
                        v => v.to_u64().map(|x| x as i64).map_err(|_| {
                            self.tokenizer_err(format!(
                                "tokenizer.ggml.token_type[{i}] is not an integer"
                            ))
                        }),
                    })
                    .collect()
            }
            None => Ok(vec![1; n]),
            Some(_) => Err(self.tokenizer_err("tokenizer.ggml.token_type is not an array".into())),
        }
    }

    /// A special token id, checked against the vocabulary: its text and id, `None` when absent.
    fn tokenizer_token_id(&self, tokens: &[String], key: &str) -> Result<Option<(String, u32)>> {
        match self.meta_u64(key) {
            None => Ok(None),
            Some(i) => match tokens.get(i as usize) {
                Some(t) => Ok(Some((t.clone(), i as u32))),
                None => Err(self.tokenizer_err(format!(
                    "{key} = {i} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            },
        }
    }

    /// The parts of a SentencePiece BPE (`tokenizer.ggml.model = "llama"`) tokenizer.
    fn llama_parts(
        &self,
        tokens: &[String],
        types: &[i64],
        vocab: Map<String, Json>,
        add_bos: Option<bool>,
    ) -> Result<ModelParts> {
        let index: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let scores = self.tokenizer_scores(tokens.len())?;
        let merges = spm_merges(tokens, &scores, &index);
        let prefix = self
            .tokenizer_flag("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        let unk = self
            .tokenizer_token_id(tokens, "tokenizer.ggml.unknown_token_id")?
            .map(|(t, _)| t)
            .or_else(|| {
                types
                    .iter()
                    .position(|&t| t == UNKNOWN)
                    .map(|i| tokens[i].clone())
            });
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(ModelParts {
            normalizer: Json::Null,
            pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}",
                   "prepend_scheme": if prefix { "always" } else { "never" },
                   "split": false}),
            decoder: json!({"type": "Sequence", "decoders": decoders}),
            model: json!({"type": "BPE", "dropout": null, "unk_token": unk,
                   "continuing_subword_prefix": null, "end_of_word_suffix": null,
                   "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                   "vocab": vocab, "merges": merges}),
            add_bos: add_bos.unwrap_or(true),
        })
    }

    /// The parts of a byte-level BPE (`tokenizer.ggml.model = "gpt2"`) tokenizer.
    fn gpt2_parts(&self, vocab: Map<String, Json>, add_bos: Option<bool>) -> Result<ModelParts> {
        let name = self.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre = bpe_pre(name).ok_or_else(|| {
            self.tokenizer_err(format!(
                "tokenizer.ggml.pre = {name:?} is not supported (supported: {})",
                BPE_PRE_TOKENIZERS.join(", ")
            ))
        })?;
        // Merges are "a b" strings in GGUF; the hub format takes pairs.
        let merges: Vec<Json> = self
            .tokenizer_strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(self.tokenizer_err(format!("merge {m:?} is not two tokens"))),
            })
            .collect::<Result<_>>()?;
        Ok(ModelParts {
            normalizer: Json::Null,
            pre_tokenizer: pre.split.pre_tokenizer(),
            decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                   "use_regex": true}),
            model: json!({"type": "BPE", "dropout": null, "unk_token": null,
                   "continuing_subword_prefix": null, "end_of_word_suffix": null,
                   "fuse_unk": false, "byte_fallback": false,
                   "ignore_merges": pre.ignore_merges, "vocab": vocab,
                   "merges": merges}),
            add_bos: add_bos.unwrap_or(pre.add_bos),
        })
    }

    /// Refuses `tokenizer.ggml.add_{what}_token` set without the token id `t`.
    fn tokenizer_need(&self, what: &str, t: &Option<(String, u32)>) -> Result<()> {
        match t {
            Some(_) => Ok(()),
            None => Err(self.tokenizer_err(format!(
                "tokenizer.ggml.add_{what}_token is set but tokenizer.ggml.{what}_token_id \
                 is missing"
            ))),
        }
    }

    /// The tokenizer the metadata describes as a `tokenizer.json` value, with the BOS/EOS
    /// token texts and the chat template (`tokenizer.chat_template`).
    pub fn tokenizer_parts(&self) -> Result<TokenizerParts> {
        let model = self
            .meta_str("tokenizer.ggml.model")
            .ok_or_else(|| self.tokenizer_err("no tokenizer.ggml.model in the metadata".into()))?;
        let tokens = self.tokenizer_strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(self.tokenizer_err("tokenizer.ggml.tokens is missing or empty".into()));
        }
        let types = self.tokenizer_types(tokens.len())?;
        let bos = self.tokenizer_token_id(&tokens, "tokenizer.ggml.bos_token_id")?;
        let eos = self.tokenizer_token_id(&tokens, "tokenizer.ggml.eos_token_id")?;
        let add_bos = self.tokenizer_flag("tokenizer.ggml.add_bos_token")?;
        let add_eos = self
            .tokenizer_flag("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);

        let (vocab, added) = vocab_and_added(&tokens, &types);
        let parts = match model {
            "llama" => self.llama_parts(&tokens, &types, vocab, add_bos)?,
            "gpt2" => self.gpt2_parts(vocab, add_bos)?,
            other => {
                return Err(self.tokenizer_err(format!(
                    "tokenizer.ggml.model = {other:?} is not supported (supported: \"llama\", \
                     SentencePiece BPE; \"gpt2\", byte-level BPE)"
                )))
            }
        };
        let add_bos = parts.add_bos;
        // An absent BOS with BOS added by default only is no error: nothing is added.
        if add_eos {
            self.tokenizer_need("eos", &eos)?;
        }
        if add_bos && self.meta("tokenizer.ggml.add_bos_token").is_some() {
            self.tokenizer_need("bos", &bos)?;
        }
        let pick = |on: bool, t: &Option<(String, u32)>| {
            t.as_ref().filter(|_| on).map(|(s, i)| (s.clone(), *i))
        };
        let (b, e) = (pick(add_bos, &bos), pick(add_eos, &eos));
        let post = post_processor(
            b.as_ref().map(|(s, i)| (s.as_str(), *i)),
            e.as_ref().map(|(s, i)| (s.as_str(), *i)),
        );
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": parts.normalizer,
            "pre_tokenizer": parts.pre_tokenizer,
            "post_processor": post,
            "decoder": parts.decoder,
            "model": parts.model,
        });
        Ok(TokenizerParts {
            tokenizer_json,
            bos_token: bos.map(|(t, _)| t),
            eos_token: eos.map(|(t, _)| t),
            chat_template: self.meta_str("tokenizer.chat_template").map(String::from),
        })
    }
}

/// The parts of `tokenizer.json` that depend on `tokenizer.ggml.model`, and whether BOS is
/// added (the model's default when `tokenizer.ggml.add_bos_token` is absent).
struct ModelParts {
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    model: Json,
    add_bos: bool,
}

/// The vocabulary (text to id) and the added tokens (unknown, control and user-defined ones).
fn vocab_and_added(tokens: &[String], types: &[i64]) -> (Map<String, Json>, Vec<Json>) {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        vocab.insert(t.clone(), json!(id));
        if matches!(ty, UNKNOWN | CONTROL | USER_DEFINED) {
            added.push(json!({"id": id, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false,
                "special": ty != USER_DEFINED}));
        }
    }
    (vocab, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_pre_tokenizer_is_known_and_its_regexes_compile() {
        for name in BPE_PRE_TOKENIZERS {
            let pre = bpe_pre(name).unwrap_or_else(|| panic!("{name} listed but unknown"));
            let json = pre.split.pre_tokenizer();
            let p: tokenizers::pre_tokenizers::PreTokenizerWrapper =
                serde_json::from_value(json.clone())
                    .unwrap_or_else(|e| panic!("{name}: {e}: {json}"));
            let mut s = tokenizers::PreTokenizedString::from("Hello  world's 12345 日本語\n\tx");
            tokenizers::PreTokenizer::pre_tokenize(&p, &mut s).unwrap();
        }
        assert!(bpe_pre("no-such-split").is_none());
    }

    /// The splits against what the hub's regexes give on a string that tells them apart
    /// (words of the byte-level pre-tokenizer, in the GPT-2 byte alphabet: `Ġ` is a space).
    #[test]
    fn splits_cut_where_the_hub_tokenizers_cut() {
        let words = |name: &str, text: &str| -> Vec<String> {
            let p: tokenizers::pre_tokenizers::PreTokenizerWrapper =
                serde_json::from_value(bpe_pre(name).unwrap().split.pre_tokenizer()).unwrap();
            let mut s = tokenizers::PreTokenizedString::from(text);
            tokenizers::PreTokenizer::pre_tokenize(&p, &mut s).unwrap();
            s.get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(w, _, _)| w.to_string())
            .collect()
        };
        let t = "I'LL pay 12345 now";
        assert_eq!(
            words("gpt-2", t),
            ["I", "'", "LL", "Ġpay", "Ġ12345", "Ġnow"]
        );
        // llama3: case-insensitive contractions, digits in threes.
        assert_eq!(
            words("llama-bpe", t),
            ["I", "'LL", "Ġpay", "Ġ", "123", "45", "Ġnow"]
        );
        // qwen2: single digits.
        assert_eq!(
            words("qwen2", t),
            ["I", "'LL", "Ġpay", "Ġ", "1", "2", "3", "4", "5", "Ġnow"]
        );
        assert_eq!(words("starcoder", "ab 123"), ["ab", "Ġ", "1", "2", "3"]);
        // deepseek-v3: digits in threes first, then CJK runs, then the word regex.
        assert_eq!(
            words("deepseek-v3", "x12345日本語abc"),
            ["x", "123", "45", "æĹ¥æľ¬èªŀ", "abc"]
        );
        assert_eq!(
            words("deepseek-v3", "a.b .Hello (x) 1234"),
            ["a", ".b", "Ġ.", "Hello", "Ġ(", "x", ")", "Ġ", "123", "4"]
        );
        // gpt-4o: a capitalised word is cut before the next capital.
        assert_eq!(words("gpt-4o", "HelloWorld"), ["Hello", "World"]);
    }

    #[test]
    fn merges_follow_the_scores_then_the_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "aa", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "aa" has a score of its own below every other piece: merged last, as Llama's "▁▁".
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -1e9, -4.0];
        let index: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let m = spm_merges(&tokens, &scores, &index);
        assert_eq!(
            m,
            vec![
                json!(["a", "b"]),
                json!(["b", "c"]),
                json!(["ab", "c"]),
                json!(["a", "bc"]),
                json!(["a", "a"])
            ]
        );
    }
}
