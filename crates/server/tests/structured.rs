//! Structured output and tools over plain HTTP: both endpoints, streamed and not, and the
//! refusals that name their parameter.

mod common;

use common::{bounded, read_sse, TestServer, MODEL};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_on_both_endpoints() {
    bounded(async {
        let s = TestServer::start(64).await;
        // Completions: a regex, on random weights, ended by the constraint.
        for seed in 0..3 {
            let (st, v) = s
                .post(
                    "/v1/completions",
                    &json!({"model": MODEL, "prompt": "the code is", "max_tokens": 30, "seed": seed,
                            "structured_outputs": {"regex": "[A-F]{2}-[0-9]{1,3}"}}),
                )
                .await;
            assert_eq!(st, 200, "{v}");
            let t = v["choices"][0]["text"].as_str().unwrap_or_default().to_string();
            let (a, b) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
            assert!(a.len() == 2 && a.chars().all(|c| ('A'..='F').contains(&c)), "{t:?}");
            assert!((1..=3).contains(&b.len()) && b.chars().all(|c| c.is_ascii_digit()), "{t:?}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        }
        // Chat, streamed: the content deltas put together are the schema's JSON.
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                            "b": {"type": "boolean"}}, "required": ["n", "b"], "additionalProperties": false});
        let r = s
            .client
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 40,
                          "seed": 4, "stream": true,
                          "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}))
            .send()
            .await
            .expect("sent");
        let (events, done) = read_sse(r).await;
        assert!(done);
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)) && v["b"].is_boolean(), "{v}");
        let finish: Vec<&Value> = events
            .iter()
            .map(|e| &e["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec![&json!("stop")]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_parameter() {
    bounded(async {
        let s = TestServer::start(64).await;
        let user = json!([{"role": "user", "content": "x"}]);
        let f = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/v1/completions", json!({"prompt": "x", "structured_outputs": {"regex": "("}}), "structured_outputs"),
            ("/v1/completions", json!({"prompt": "x", "structured_outputs": {"choice": []}}), "structured_outputs.choice"),
            ("/v1/completions", json!({"prompt": "x", "min_tokens": 2, "structured_outputs": {"choice": ["a"]}}), "min_tokens"),
            ("/v1/chat/completions", json!({"messages": user, "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}}), "response_format"),
            ("/v1/chat/completions", json!({"messages": user, "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"}}), "structured_outputs"),
            ("/v1/chat/completions", json!({"messages": user, "tools": f, "tool_choice": {"type": "function", "function": {"name": "g"}}}), "tool_choice"),
            ("/v1/chat/completions", json!({"messages": user, "tool_choice": "required"}), "tool_choice"),
            // The fixture's ChatML template has no tool-call format to enforce.
            ("/v1/chat/completions", json!({"messages": user, "tools": f, "tool_choice": "required"}), "tool_choice"),
            ("/v1/chat/completions", json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].tool_call_id"),
            ("/v1/chat/completions", json!({"messages": user, "reasoning_effort": "max"}), "reasoning_effort"),
        ];
        for (path, body, param) in cases {
            let (st, v) = s.post(path, &body).await;
            assert_eq!(st, 400, "{body}: {v}");
            assert_eq!(v["error"]["param"], param, "{body}: {v}");
        }
        // tool_choice "auto" with a template that knows no format: served, as content.
        let (st, v) = s
            .post("/v1/chat/completions", &json!({"messages": user, "tools": f, "max_tokens": 3}))
            .await;
        assert_eq!(st, 200, "{v}");
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    })
    .await;
}
