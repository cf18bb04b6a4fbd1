//! Tokenizer (`tokenizer.json`, via the `tokenizers` crate), special tokens and the chat
//! template (`tokenizer_config.json`, rendered with minijinja like transformers does).

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// A tokenizer built from its parts: a `tokenizer.json` document, the BOS/EOS token texts
    /// and the chat template (`path` is what errors name).
    pub fn from_parts(
        path: &Path,
        tokenizer_json: &Value,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let err = |e: &dyn std::fmt::Display| ModelError::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        let text = serde_json::to_string(tokenizer_json).map_err(|e| err(&e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| err(&e))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos_token,
            eos_token,
            chat_template,
        })
    }

    /// The tokenizer of a GGUF file's metadata (see [`crate::gguf::GgufFile::tokenizer_parts`]).
    pub fn from_gguf(g: &crate::gguf::GgufFile) -> Result<Self> {
        let p = g.tokenizer_parts()?;
        Self::from_parts(
            &g.path,
            &p.tokenizer_json,
            p.bos_token,
            p.eos_token,
            p.chat_template,
        )
    }

    /// True when `src` has a tokenizer [`Tokenizer::load`] can read (see
    /// [`crate::ModelSource::has_tokenizer`]).
    pub fn exists_at(src: impl Into<crate::ModelSource>) -> bool {
        src.into().has_tokenizer()
    }

    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json`), or the tokenizer in the
    /// metadata of a GGUF file.
    pub fn load(src: impl Into<crate::ModelSource>) -> Result<Self> {
        let dir = match src.into() {
            crate::ModelSource::Gguf(f) => {
                return Self::from_gguf(&crate::gguf::GgufFile::open(&f)?)
            }
            crate::ModelSource::HfDir(d) => d,
        };
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut bos_token, mut eos_token, mut chat_template) = (None, None, None);
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
                path: cfg_path.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer {
                path: cfg_path.clone(),
                msg: e.to_string(),
            })?;
            bos_token = token_str(v.get("bos_token"));
            eos_token = token_str(v.get("eos_token"));
            chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            };
        }
        // transformers 5 may keep the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = std::fs::read_to_string(&jinja).ok();
        }
        Ok(Self {
            inner,
            path,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Renders the checkpoint's chat template over `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let msgs =
            serde_json::to_value(messages).map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        self.render_chat(&msgs, None, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders the chat template as transformers' `apply_chat_template` does: `messages` as
    /// JSON objects (an assistant's `tool_calls`, a tool message's `tool_call_id` and `name`
    /// are passed through), `tools` (the OpenAI tool list, `None` when the request has none)
    /// and extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`,
    /// `reasoning_effort`), which cannot override the ones set here.
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let tmpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::ChatTemplate("the tokenizer has no chat_template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tmpl)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let t = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let mut ctx = kwargs.clone();
        ctx.insert("messages".into(), messages.clone());
        if let Some(tools) = tools {
            ctx.insert("tools".into(), tools.clone());
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert(
            "bos_token".into(),
            Value::String(self.bos_token.clone().unwrap_or_default()),
        );
        ctx.insert(
            "eos_token".into(),
            Value::String(self.eos_token.clone().unwrap_or_default()),
        );
        t.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streams text out of a growing list of token ids without splitting multi-byte characters:
/// text is released only once it decodes to valid UTF-8 without a replacement character at
/// its end.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one token and returns the new text it completes (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = full.get(prefix.len()..).unwrap_or_default().to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}
