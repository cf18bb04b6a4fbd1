//! Request bodies (OpenAI's names; vLLM's extra sampling fields) and their translation into
//! [`SamplingParams`].
//!
//! Unknown fields are rejected with a 400 (as OpenAI does). Known OpenAI fields this server
//! does not implement are accepted when they ask for the default behaviour (`user`,
//! `metadata`, `store`, `service_tier`, an empty `logit_bias`, `echo: false`, `best_of == n`)
//! and rejected with a 400 naming the field otherwise. Structured output and tools
//! (`response_format`, `structured_outputs`, `tools`, `tool_choice`) are checked in
//! [`crate::structured`].

use crate::error::ApiError;
use crate::limits::LimitError;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// The fields both generation endpoints accept, listed once: `sampling_fields!(m! { .. })`
/// expands to `m! { .. { name: Type, .. } }`. [`Sampling`], [`CompletionRequest`] and
/// [`ChatRequest`] (and their `sampling()`) are built from this list, so a new option is one
/// line here plus its use in [`Sampling::to_params`]. (A request struct cannot embed
/// `Sampling` with serde's `flatten`: that does not combine with `deny_unknown_fields`.)
macro_rules! sampling_fields {
    ($then:ident ! { $($args:tt)* }) => {
        $then! { $($args)* {
            temperature: Option<f32>,
            top_p: Option<f32>,
            top_k: Option<i32>,
            min_p: Option<f32>,
            seed: Option<u64>,
            stop: Option<Stop>,
            n: Option<usize>,
            presence_penalty: Option<f32>,
            frequency_penalty: Option<f32>,
            repetition_penalty: Option<f32>,
            ignore_eos: Option<bool>,
            min_tokens: Option<usize>,
            stop_token_ids: Option<Vec<u32>>,
            include_stop_str_in_output: Option<bool>,
            stream: Option<bool>,
            stream_options: Option<StreamOptions>,
            // Accepted and ignored, or rejected unless they ask for the default (see module
            // docs).
            user: Option<String>,
            logit_bias: Option<HashMap<String, f32>>,
            metadata: Option<Value>,
            store: Option<bool>,
            service_tier: Option<Value>,
        } }
    };
}

/// Declares [`Sampling`] from the shared list.
macro_rules! sampling_struct {
    ({ $( $field:ident : $ty:ty, )* }) => {
        /// Sampling fields shared by both endpoints (declared by `sampling_fields!`).
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        pub struct Sampling {
            $( pub $field: $ty, )*
        }
    };
}

sampling_fields!(sampling_struct! {});

/// Declares a request body: its own fields, then the shared ones, unknown fields refused;
/// and its `sampling()`.
macro_rules! request_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
        { $( $shared:ident : $sty:ty, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            $( pub $shared: $sty, )*
        }

        impl $name {
            /// The shared fields, as [`Sampling`].
            pub fn sampling(&self) -> Sampling {
                Sampling {
                    $( $shared: self.$shared.clone(), )*
                }
            }
        }
    };
}

sampling_fields!(request_struct! {
    /// `POST /v1/completions`.
    pub struct CompletionRequest {
        pub model: Option<String>,
        pub prompt: Prompt,
        pub max_tokens: Option<usize>,
        /// Completions: the number of top logprobs per token (0 = only the chosen token's).
        pub logprobs: Option<usize>,
        pub echo: Option<bool>,
        pub suffix: Option<String>,
        /// Completions only; accepted when equal to `n`.
        pub best_of: Option<usize>,
        /// vLLM's structured output (`json`, `regex`, `choice`, `grammar`).
        pub structured_outputs: Option<Value>,
    }
});

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
    /// An assistant's calls (OpenAI's shape: `id`, `type`, `function.name`,
    /// `function.arguments` as JSON text).
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A tool message's answer to this call.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// An assistant's reasoning, passed to templates that render it.
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

sampling_fields!(request_struct! {
    /// `POST /v1/chat/completions`.
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
        /// vLLM's structured output (`json`, `regex`, `choice`, `grammar`).
        pub structured_outputs: Option<Value>,
        /// Passed to the chat template (templates that take it, e.g. GPT-OSS).
        pub reasoning_effort: Option<String>,
        /// Extra chat template variables (e.g. `{"enable_thinking": false}`).
        pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    }
});

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
    /// this server accepts only in their default form (`best_of`: completions only, `None`
    /// for chat); `n` may be at most `max_n`.
    pub fn to_params(
        &self,
        max_tokens: Option<usize>,
        logprobs: Option<usize>,
        best_of: Option<usize>,
        max_n: usize,
    ) -> Result<SamplingParams, ApiError> {
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::bad_param(
                "logit_bias",
                "logit_bias is not supported by this server",
            ));
        }
        let n = self.n.unwrap_or(1);
        if let Some(b) = best_of {
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
        p.validate()
            .map_err(|e| ApiError::bad_param(e.param(), e.to_string()))?;
        Ok(p)
    }
}

impl CompletionRequest {
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
    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        if self.top_logprobs.is_some_and(|k| k > 0) && self.logprobs != Some(true) {
            return Err(ApiError::bad_param(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ));
        }
        if let Some(e) = &self.reasoning_effort {
            if !matches!(e.as_str(), "minimal" | "low" | "medium" | "high") {
                return Err(ApiError::bad_param(
                    "reasoning_effort",
                    "reasoning_effort is one of minimal, low, medium and high",
                ));
            }
        }
        Ok(())
    }
}

fn text_of(i: usize, c: &Option<Content>) -> Result<String, ApiError> {
    Ok(match c {
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
    })
}

/// The conversation as the chat template sees it (transformers' shapes). Roles: system,
/// developer (rendered as system), user, assistant (with its `tool_calls`, whose
/// `arguments` are given to the template as objects, as vLLM does), tool (with
/// `tool_call_id` and `name`).
pub fn chat_messages(msgs: &[InMessage]) -> Result<Vec<Value>, ApiError> {
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
                "tool" => "tool",
                other => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].role"),
                        format!(
                            "unsupported role {other:?} (system, developer, user, assistant and tool are supported)"
                        ),
                    ))
                }
            };
            let mut out = serde_json::Map::new();
            out.insert("role".into(), Value::String(role.into()));
            out.insert("content".into(), Value::String(text_of(i, &m.content)?));
            if let Some(n) = &m.name {
                out.insert("name".into(), Value::String(n.clone()));
            }
            if let Some(calls) = &m.tool_calls {
                if role != "assistant" {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].tool_calls"),
                        "only assistant messages have tool_calls",
                    ));
                }
                let mut list = Vec::new();
                for (j, c) in calls.iter().enumerate() {
                    let p = format!("messages[{i}].tool_calls[{j}]");
                    let f = c.get("function").and_then(Value::as_object).ok_or_else(|| {
                        ApiError::bad_param(&p, "a tool call needs a function object")
                    })?;
                    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                        ApiError::bad_param(&format!("{p}.function.name"), "a tool call needs a name")
                    })?;
                    let args = match f.get("arguments") {
                        None | Some(Value::Null) => Value::Object(Default::default()),
                        Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                            ApiError::bad_param(
                                &format!("{p}.function.arguments"),
                                format!("arguments must be JSON text: {e}"),
                            )
                        })?,
                        Some(v) => v.clone(),
                    };
                    let mut call = serde_json::json!({
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    });
                    if let Some(id) = c.get("id") {
                        call["id"] = id.clone();
                    }
                    list.push(call);
                }
                out.insert("tool_calls".into(), Value::Array(list));
            }
            if let Some(id) = &m.tool_call_id {
                out.insert("tool_call_id".into(), Value::String(id.clone()));
            } else if role == "tool" {
                return Err(ApiError::bad_param(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs the tool_call_id it answers",
                ));
            }
            if let Some(r) = &m.reasoning_content {
                out.insert("reasoning_content".into(), Value::String(r.clone()));
            }
            Ok(Value::Object(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every shared field, each with a value other than its default.
    fn shared_fields() -> Vec<(&'static str, Value)> {
        vec![
            ("temperature", json!(0.5)),
            ("top_p", json!(0.9)),
            ("top_k", json!(5)),
            ("min_p", json!(0.1)),
            ("seed", json!(7)),
            ("stop", json!(["x"])),
            ("n", json!(2)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(-0.5)),
            ("repetition_penalty", json!(1.1)),
            ("ignore_eos", json!(true)),
            ("min_tokens", json!(1)),
            ("stop_token_ids", json!([3])),
            ("include_stop_str_in_output", json!(true)),
            ("stream", json!(true)),
            (
                "stream_options",
                json!({"include_usage": true, "continuous_usage_stats": false}),
            ),
            ("user", json!("u")),
            ("logit_bias", json!({})),
            ("metadata", json!({"k": "v"})),
            ("store", json!(false)),
            ("service_tier", json!("auto")),
        ]
    }

    fn completion_body() -> Value {
        json!({"prompt": "x"})
    }

    fn chat_body() -> Value {
        json!({"messages": [{"role": "user", "content": "x"}]})
    }

    fn with(mut body: Value, field: &str, value: Value) -> Vec<u8> {
        body[field] = value;
        body.to_string().into_bytes()
    }

    #[test]
    fn every_shared_field_is_accepted_by_both_endpoints() {
        let mut all = serde_json::Map::new();
        for (field, value) in shared_fields() {
            // The name is a field of `Sampling` (which ignores unknown keys) and the value is
            // not its default, so it must show up.
            let alone: Sampling = serde_json::from_value(json!({ field: value.clone() }))
                .unwrap_or_else(|e| panic!("{field}: {e}"));
            assert_ne!(alone, Sampling::default(), "{field}");
            let c: CompletionRequest =
                parse_body(&with(completion_body(), field, value.clone())).expect(field);
            assert_eq!(c.sampling(), alone, "{field} via /v1/completions");
            let ch: ChatRequest =
                parse_body(&with(chat_body(), field, value.clone())).expect(field);
            assert_eq!(ch.sampling(), alone, "{field} via /v1/chat/completions");
            all.insert(field.to_string(), value);
        }
        // The list above covers `Sampling`: with all of them set, no field is left `None`.
        let full: Sampling = serde_json::from_value(Value::Object(all)).expect("all fields");
        assert!(!format!("{full:?}").contains("None"), "{full:?}");
    }

    #[test]
    fn unknown_and_other_endpoint_fields_are_refused_naming_them() {
        fn refused<T: serde::de::DeserializeOwned + std::fmt::Debug>(body: Vec<u8>, field: &str) {
            let e = parse_body::<T>(&body).expect_err(field);
            assert_eq!(e.status, 400, "{field}");
            assert_eq!(e.param.as_deref(), Some(field), "{e:?}");
            assert!(e.message.contains("unknown field"), "{e:?}");
        }
        refused::<CompletionRequest>(with(completion_body(), "bogus", json!(1)), "bogus");
        refused::<ChatRequest>(with(chat_body(), "bogus", json!(1)), "bogus");
        for field in [
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "add_generation_prompt",
            "response_format",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "reasoning_effort",
            "chat_template_kwargs",
        ] {
            refused::<CompletionRequest>(with(completion_body(), field, json!(null)), field);
        }
        for field in ["prompt", "echo", "suffix", "best_of"] {
            refused::<ChatRequest>(with(chat_body(), field, json!(null)), field);
        }
        // best_of is a completions field.
        let c: CompletionRequest =
            parse_body(&with(completion_body(), "best_of", json!(2))).expect("best_of");
        assert_eq!(c.best_of, Some(2));
    }

    #[test]
    fn to_params_names_the_field_of_each_refusal() {
        let cases = [
            (json!({"temperature": -1}), None, None, "temperature"),
            (json!({"top_k": -2}), None, None, "top_k"),
            (json!({"n": 0}), None, None, "n"),
            (json!({"stop": ""}), None, None, "stop"),
            (json!({"min_tokens": 3}), Some(2), None, "min_tokens"),
            (json!({}), Some(0), None, "max_tokens"),
            (json!({"n": 2}), None, Some(3), "best_of"),
            (json!({"n": 200}), None, None, "n"),
            (json!({"logit_bias": {"5": 1.0}}), None, None, "logit_bias"),
        ];
        for (body, max_tokens, best_of, field) in cases {
            let s: Sampling = serde_json::from_value(body.clone()).expect("parses");
            let e = s
                .to_params(max_tokens, None, best_of, MAX_CHOICES)
                .expect_err(field);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
        }
        let s: Sampling = serde_json::from_value(json!({})).expect("parses");
        let e = s
            .to_params(None, Some(21), None, MAX_CHOICES)
            .expect_err("logprobs");
        assert_eq!(e.param.as_deref(), Some("logprobs"));
        let p = s
            .to_params(Some(4), Some(2), Some(1), MAX_CHOICES)
            .expect("valid");
        assert_eq!((p.max_tokens, p.logprobs, p.n), (Some(4), Some(2), 1));
    }
}
