//! Request bodies (OpenAI's names; vLLM's extra sampling fields) and their translation into
//! [`SamplingParams`].
//!
//! Unknown fields are rejected with a 400 (as OpenAI does). Known OpenAI fields this server
//! does not implement are accepted when they ask for the default behaviour (`user`,
//! `metadata`, `store`, `service_tier`, `parallel_tool_calls`, an empty `logit_bias`,
//! `tool_choice: "none"`, `response_format: {"type": "text"}`, `echo: false`, `best_of == n`)
//! and rejected with a 400 naming the field otherwise.

use crate::error::ApiError;
use crate::limits::LimitError;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use tandem_model::tokenizer::ChatMessage;
use tandem_sched::SamplingParams;

/// The default of the largest `n` a request may ask for (`serve --max-n`,
/// [`crate::ServerOptions::max_n`]).
pub const MAX_CHOICES: usize = 128;

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Accepted and ignored, or rejected unless they ask for the default (see module docs).
    pub user: Option<String>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<Value>,
    pub best_of: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    /// Completions: the number of top logprobs per token (0 = only the chosen token's).
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    // Flattened by hand (serde's `flatten` does not combine with `deny_unknown_fields`).
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<Value>,
    pub best_of: Option<usize>,
}

/// `content`: a string, or a list of parts of which only `{"type": "text"}` is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    /// Chat: whether to return logprobs; `top_logprobs` says how many alternatives.
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub add_generation_prompt: Option<bool>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<usize>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<Value>,
}

/// `/tokenize`: a prompt or a conversation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<InMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// Parses a JSON body into `T`; every failure is a 400 in OpenAI's shape.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(String::from);
        let mut err = ApiError::bad_request(format!("invalid request: {msg}"));
        err.param = param;
        err
    })
}

impl Sampling {
    /// The engine parameters (`n` is kept; the caller fans out), after the checks for fields
    /// this server accepts only in their default form; `n` may be at most `max_n`.
    pub fn to_params(
        &self,
        max_tokens: Option<usize>,
        logprobs: Option<usize>,
        max_n: usize,
    ) -> Result<SamplingParams, ApiError> {
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_param(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        let n = self.n.unwrap_or(1);
        if let Some(b) = self.best_of {
            if b != n {
                return Err(ApiError::bad_param(
                    "best_of",
                    "best_of is not supported (only best_of == n)",
                ));
            }
        }
        if n > max_n {
            return Err(LimitError::TooManyChoices {
                requested: n,
                limit: max_n,
            }
            .into());
        }
        let d = SamplingParams::default();
        let p = SamplingParams {
            n,
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            max_tokens,
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
            include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
        };
        p.validate().map_err(|e| {
            let msg = e.to_string();
            let param = msg.split_whitespace().next().map(String::from);
            let mut err = ApiError::bad_request(msg);
            err.param = param;
            err
        })?;
        Ok(p)
    }
}

impl CompletionRequest {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            stop: self.stop.clone(),
            n: self.n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
            stream: self.stream,
            stream_options: self.stream_options.clone(),
            user: self.user.clone(),
            logit_bias: self.logit_bias.clone(),
            metadata: self.metadata.clone(),
            store: self.store,
            service_tier: self.service_tier.clone(),
            best_of: self.best_of,
        }
    }

    /// Rejects the OpenAI fields this server does not implement, unless they are the default.
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::bad_param("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_param("suffix", "suffix is not supported"));
        }
        Ok(())
    }
}

impl ChatRequest {
    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            stop: self.stop.clone(),
            n: self.n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            include_stop_str_in_output: self.include_stop_str_in_output,
            stream: self.stream,
            stream_options: self.stream_options.clone(),
            user: self.user.clone(),
            logit_bias: self.logit_bias.clone(),
            metadata: self.metadata.clone(),
            store: self.store,
            service_tier: self.service_tier.clone(),
            best_of: None,
        }
    }

    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_param("tools", "tools are not supported"));
        }
        match &self.tool_choice {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    "tool_choice is not supported (only \"none\" or \"auto\")",
                ))
            }
        }
        if let Some(rf) = &self.response_format {
            let kind = rf.get("type").and_then(Value::as_str);
            if !(rf.is_null() || kind == Some("text")) {
                return Err(ApiError::bad_param(
                    "response_format",
                    "response_format is not supported (only {\"type\": \"text\"})",
                ));
            }
        }
        if self.top_logprobs.is_some_and(|k| k > 0) && self.logprobs != Some(true) {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ));
        }
        Ok(())
    }
}

/// The conversation as the chat template sees it. Roles: system, developer (rendered as
/// system), user, assistant.
pub fn chat_messages(msgs: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].role"),
                        format!(
                            "unsupported role {other:?} (system, developer, user and assistant are supported)"
                        ),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad_param(
                                    &format!("messages[{i}].content"),
                                    format!(
                                        "unsupported content part of type {:?} (only text parts)",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}
