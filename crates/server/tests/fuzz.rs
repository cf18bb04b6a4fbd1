//! Hostile bodies thrown at every POST handler through tower's `oneshot`: no panic, no 5xx,
//! and every error is in OpenAI's shape.

mod common;

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::time::Duration;
use tower::ServiceExt;

const PATHS: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
];

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "stream",
    "stream_options",
    "tokens",
    "echo",
    "logit_bias",
    "user",
    "best_of",
    "min_tokens",
    "stop_token_ids",
    "response_format",
    "tools",
    "tool_choice",
    "add_special_tokens",
    "weird_field",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-3i64..40).prop_map(|i| json!(i)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z<|> ]{0,12}".prop_map(Value::String),
        Just(json!("tiny-mixtral")),
        Just(json!([{"role": "user", "content": "hi"}])),
        Just(json!([{"role": "user"}])),
        Just(json!([{"content": "x"}])),
        Just(json!([[1, 2], [3]])),
        Just(json!([1, 2, 99999])),
        Just(json!({"include_usage": true})),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,6}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid request for `path`.
fn base(path: &str) -> Value {
    match path {
        "/v1/completions" => json!({"prompt": "hi", "max_tokens": 2}),
        "/v1/chat/completions" => {
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        }
        "/tokenize" => json!({"prompt": "hi"}),
        _ => json!({"tokens": [5, 6]}),
    }
}

/// A valid request with up to three fields replaced by arbitrary values, so that many bodies
/// get past the parser into validation and generation.
fn mutated(path: &'static str) -> impl Strategy<Value = Value> {
    prop::collection::vec((prop::sample::select(FIELDS), value()), 0..3).prop_map(move |kv| {
        let mut v = base(path);
        if let Some(m) = v.as_object_mut() {
            for (k, x) in kv {
                m.insert(k.to_string(), x);
            }
            // Keep accidental valid generations short.
            if m.get("max_tokens")
                .and_then(Value::as_u64)
                .is_none_or(|t| t > 8)
            {
                m.insert("max_tokens".into(), json!(2));
            }
            m.remove("max_completion_tokens");
        }
        v
    })
}

fn body(path: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => "[{}\\[\\]\":,0-9a-z \\\\]{0,40}".prop_map(String::into_bytes),
        1 => value().prop_map(|v| v.to_string().into_bytes()),
        4 => mutated(path).prop_map(|v| v.to_string().into_bytes()),
        // Truncated JSON.
        1 => mutated(path).prop_map(|v| {
            let s = v.to_string();
            s.as_bytes()[..s.len() / 2].to_vec()
        }),
    ]
}

fn case() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    prop::sample::select(PATHS).prop_flat_map(|p| (Just(p), body(p)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_bodies_never_5xx((path, body) in case()) {
        let rt = runtime();
        let app = app();
        let status_and_body = rt.block_on(async {
            let req = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(60), app.oneshot(req))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            let streaming = resp
                .headers()
                .get("content-type")
                .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
            // A stream is dropped unread (that aborts its engine request).
            let bytes = if streaming {
                Vec::new()
            } else {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    axum::body::to_bytes(resp.into_body(), 1 << 24),
                )
                .await
                .map_err(|_| "body timed out".to_string())?
                .map_err(|e| e.to_string())?
                .to_vec()
            };
            Ok::<_, String>((status, bytes))
        });
        let (status, out) = status_and_body.map_err(TestCaseError::fail)?;
        let input = String::from_utf8_lossy(&body).into_owned();
        prop_assert!(status < 500, "{path} {input:?} -> {status}: {}", String::from_utf8_lossy(&out));
        if status >= 400 {
            let v: Value = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(format!("error body not JSON: {e}")))?;
            prop_assert!(v["error"]["message"].is_string(), "{v}");
            prop_assert!(v["error"]["type"].is_string(), "{v}");
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn app() -> axum::Router {
    static STATE: std::sync::OnceLock<tandem_server::AppState> = std::sync::OnceLock::new();
    tandem_server::router(
        STATE
            .get_or_init(|| common::state(1024, Duration::from_secs(1)))
            .clone(),
    )
}
