//! End-to-end tests of the OpenAI-compatible endpoints over real HTTP.

mod common;

use common::{bounded, error_message, read_sse, TestServer, MODEL};
use serde_json::{json, Value};

fn text_of(v: &Value, i: usize) -> String {
    v["choices"][i]["text"]
        .as_str()
        .expect("choices[i].text")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_basic_and_prompt_forms() {
    bounded(async {
        let s = TestServer::start(64).await;
        let body = json!({"model": MODEL, "prompt": "hello world", "max_tokens": 6,
                          "temperature": 0, "ignore_eos": true});
        let (st, v) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], MODEL);
        assert!(v["id"].as_str().is_some_and(|i| i.starts_with("cmpl-")));
        assert!(v["created"].as_u64().is_some());
        assert_eq!(v["choices"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        let (_, tk) = s
            .post("/tokenize", &json!({"prompt": "hello world"}))
            .await;
        let prompt_ids = tk["tokens"].clone();
        assert_eq!(v["usage"]["prompt_tokens"], tk["count"]);
        assert_eq!(
            v["usage"]["total_tokens"].as_u64(),
            tk["count"].as_u64().map(|c| c + 6)
        );
        // Greedy is deterministic, and token ids give the same result as the text.
        let (_, v2) = s
            .post(
                "/v1/completions",
                &json!({"prompt": prompt_ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(text_of(&v, 0), text_of(&v2, 0));
        // A list of prompts: one choice each, in order.
        let (st, v3) = s
            .post(
                "/v1/completions",
                &json!({"prompt": ["hello world", "the cat"], "max_tokens": 6,
                        "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{v3}");
        assert_eq!(v3["choices"].as_array().map(Vec::len), Some(2));
        assert_eq!(text_of(&v3, 0), text_of(&v, 0));
        assert_eq!(v3["choices"][1]["index"], 1);
        assert_eq!(v3["usage"]["completion_tokens"], 12);
        // A list of token id lists.
        let (st, v4) = s
            .post(
                "/v1/completions",
                &json!({"prompt": [prompt_ids, [5, 6, 7]], "max_tokens": 3, "temperature": 0,
                        "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{v4}");
        assert_eq!(v4["choices"].as_array().map(Vec::len), Some(2));
        // Default max_tokens for completions is 16 (OpenAI's).
        let (_, v5) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "hi", "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(v5["usage"]["completion_tokens"], 16);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_basic_and_template() {
    bounded(async {
        let s = TestServer::start(64).await;
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]);
        let (st, v) = s
            .post(
                "/v1/chat/completions",
                &json!({"model": MODEL, "messages": messages, "max_completion_tokens": 5,
                        "temperature": 0, "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().is_some_and(|i| i.starts_with("chatcmpl-")));
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert!(v["choices"][0]["message"]["content"].is_string());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        // The prompt is the ChatML rendering, encoded without extra special tokens.
        let (_, tk) = s.post("/tokenize", &json!({"messages": messages})).await;
        assert_eq!(v["usage"]["prompt_tokens"], tk["count"]);
        let (_, text) = s
            .post("/detokenize", &json!({"tokens": tk["tokens"]}))
            .await;
        let rendered = text["prompt"].as_str().expect("prompt");
        assert!(
            rendered.contains("<|im_start|>user") && rendered.ends_with("<|im_start|>assistant\n"),
            "{rendered:?}"
        );
        // max_tokens works too; the same request is deterministic.
        let (_, v2) = s
            .post(
                "/v1/chat/completions",
                &json!({"messages": messages, "max_tokens": 5, "temperature": 0,
                        "ignore_eos": true}),
            )
            .await;
        assert_eq!(
            v["choices"][0]["message"]["content"],
            v2["choices"][0]["message"]["content"]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming() {
    bounded(async {
        let s = TestServer::start(64).await;
        let body = json!({"prompt": "once upon", "max_tokens": 12, "temperature": 0,
                          "ignore_eos": true});
        let (_, full) = s.post("/v1/completions", &body).await;
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let resp = s
            .client
            .post(s.url("/v1/completions"))
            .json(&sb)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
        assert!(resp
            .headers()
            .get("content-type")
            .and_then(|h| h.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream")));
        let (events, done) = read_sse(resp).await;
        assert!(done, "no [DONE]");
        let (last, chunks) = events.split_last().expect("events");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], full["usage"]);
        let mut text = String::new();
        let mut finish = Vec::new();
        for c in chunks {
            assert_eq!(c["object"], "text_completion");
            assert!(c.get("usage").is_none());
            text.push_str(c["choices"][0]["text"].as_str().expect("text"));
            if !c["choices"][0]["finish_reason"].is_null() {
                finish.push(c["choices"][0]["finish_reason"].clone());
            }
        }
        assert_eq!(text, text_of(&full, 0));
        assert_eq!(finish, vec![json!("length")]);

        // Chat: a role chunk first, then content deltas; no usage chunk unless asked.
        let cb = json!({"messages": [{"role": "user", "content": "hey"}], "max_tokens": 8,
                        "temperature": 0, "ignore_eos": true});
        let (_, cfull) = s.post("/v1/chat/completions", &cb).await;
        let mut csb = cb.clone();
        csb["stream"] = json!(true);
        let resp = s
            .client
            .post(s.url("/v1/chat/completions"))
            .json(&csb)
            .send()
            .await
            .expect("sent");
        let (events, done) = read_sse(resp).await;
        assert!(done);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let mut content = String::new();
        for e in &events {
            assert_eq!(e["object"], "chat.completion.chunk");
            assert!(e.get("usage").is_none());
            if let Some(c) = e["choices"][0]["delta"]["content"].as_str() {
                content.push_str(c);
            }
        }
        assert_eq!(
            Some(content.as_str()),
            cfull["choices"][0]["message"]["content"].as_str()
        );
        let last = events.last().expect("events");
        assert_eq!(last["choices"][0]["finish_reason"], "length");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    bounded(async {
        let s = TestServer::start(64).await;
        let base = json!({"prompt": "the quick brown", "max_tokens": 24, "temperature": 0,
                          "ignore_eos": true});
        let (_, v) = s.post("/v1/completions", &base).await;
        let full = text_of(&v, 0);
        let chars: Vec<char> = full.chars().collect();
        assert!(chars.len() >= 6, "too little text to test stops: {full:?}");
        // A stop string taken from the middle of the greedy text.
        let mid = chars.len() / 2;
        let stop: String = chars[mid..mid + 2].iter().collect();
        let want = &full[..full.find(&stop).expect("stop occurs")];
        for stop_field in [json!(stop), json!(["\u{1}never", stop])] {
            let mut b = base.clone();
            b["stop"] = stop_field;
            let (st, v2) = s.post("/v1/completions", &b).await;
            assert_eq!(st, 200, "{v2}");
            assert_eq!(text_of(&v2, 0), want, "stop {stop:?} in {full:?}");
            assert_eq!(v2["choices"][0]["finish_reason"], "stop");
            // Streaming gives the same text.
            b["stream"] = json!(true);
            let resp = s
                .client
                .post(s.url("/v1/completions"))
                .json(&b)
                .send()
                .await
                .expect("sent");
            let (events, done) = read_sse(resp).await;
            assert!(done);
            let streamed: String = events
                .iter()
                .filter_map(|e| e["choices"][0]["text"].as_str())
                .collect();
            assert_eq!(streamed, want);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_use_distinct_seeds() {
    bounded(async {
        let s = TestServer::start(64).await;
        let body = json!({"prompt": "hello", "max_tokens": 8, "temperature": 1.0, "seed": 7,
                          "n": 3, "ignore_eos": true});
        let (st, v) = s.post("/v1/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        let choices = v["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 3);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            // Choice i is the single request seeded seed + i.
            let (_, one) = s
                .post(
                    "/v1/completions",
                    &json!({"prompt": "hello", "max_tokens": 8, "temperature": 1.0,
                            "seed": 7 + i, "ignore_eos": true}),
                )
                .await;
            assert_eq!(c["text"], one["choices"][0]["text"], "choice {i}");
        }
        assert_eq!(v["usage"]["completion_tokens"], 24);
        // Repeatable.
        let (_, again) = s.post("/v1/completions", &body).await;
        assert_eq!(v["choices"], again["choices"]);
        // Streaming with n = 2 on chat: every index finishes once.
        let resp = s
            .client
            .post(s.url("/v1/chat/completions"))
            .json(
                &json!({"messages": [{"role": "user", "content": "x"}], "n": 2,
                          "max_tokens": 4, "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true}}),
            )
            .send()
            .await
            .expect("sent");
        let (events, done) = read_sse(resp).await;
        assert!(done);
        let mut finished = [0, 0];
        for e in &events {
            if let Some(c) = e["choices"].as_array().and_then(|c| c.first()) {
                if !c["finish_reason"].is_null() {
                    finished[c["index"].as_u64().expect("index") as usize] += 1;
                }
            }
        }
        assert_eq!(finished, [1, 1]);
        assert_eq!(
            events
                .last()
                .map(|e| e["usage"]["completion_tokens"].clone()),
            Some(json!(8))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_shapes() {
    bounded(async {
        let s = TestServer::start(64).await;
        let (st, v) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 3,
                        "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let toks = lp["tokens"].as_array().expect("tokens");
        let tlp = lp["token_logprobs"].as_array().expect("token_logprobs");
        let top = lp["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(toks.len(), 5);
        assert_eq!(tlp.len(), 5);
        assert_eq!(top.len(), 5);
        assert_eq!(lp["text_offset"].as_array().map(Vec::len), Some(5));
        for (l, t) in tlp.iter().zip(top) {
            let l = l.as_f64().expect("logprob");
            assert!(l <= 0.0);
            let m = t.as_object().expect("top dict");
            assert!(!m.is_empty() && m.len() <= 3);
            // Greedy: the chosen token is the most likely one.
            let best = m
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::MIN, f64::max);
            assert!((best - l).abs() < 1e-4, "{best} vs {l}");
        }
        let (st, c) = s
            .post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 4,
                        "temperature": 0, "logprobs": true, "top_logprobs": 2,
                        "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{c}");
        let content = c["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("content");
        assert_eq!(content.len(), 4);
        for e in content {
            assert!(e["token"].is_string() && e["bytes"].is_array());
            assert!(e["logprob"].as_f64().is_some_and(|l| l <= 0.0));
            assert_eq!(e["top_logprobs"].as_array().map(Vec::len), Some(2));
        }
        // Without logprobs: null.
        let (_, c2) = s
            .post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2}),
            )
            .await;
        assert_eq!(c2["choices"][0]["logprobs"], Value::Null);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_openai_shaped() {
    bounded(async {
        let s = TestServer::start(64).await;
        let c = "/v1/completions";
        let ch = "/v1/chat/completions";
        let long: Vec<u32> = vec![5; 600];
        let cases: Vec<(&str, String, u16, &str)> = vec![
            (c, "{\"prompt\": ".into(), 400, "parse"),
            (c, "not json".into(), 400, "parse"),
            (c, "[1, 2]".into(), 400, "object"),
            (c, json!({"prompt": "x", "bogus": 1}).to_string(), 400, "bogus"),
            (c, json!({"max_tokens": 2}).to_string(), 400, "prompt"),
            (c, json!({"prompt": "x", "model": "nope"}).to_string(), 404, "nope"),
            (ch, json!({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}).to_string(), 404, "gpt-4"),
            (c, json!({"prompt": "x", "temperature": -1}).to_string(), 400, "temperature"),
            (c, json!({"prompt": "x", "top_p": 2}).to_string(), 400, "top_p"),
            (c, json!({"prompt": "x", "n": 0}).to_string(), 400, "n must"),
            (c, json!({"prompt": "x", "logprobs": 21}).to_string(), 400, "logprobs"),
            (c, json!({"prompt": "x", "max_tokens": -1}).to_string(), 400, "invalid"),
            (c, json!({"prompt": "x", "max_tokens": 0}).to_string(), 400, "max_tokens"),
            (c, json!({"prompt": "x", "presence_penalty": 3}).to_string(), 400, "presence_penalty"),
            (c, json!({"prompt": "x", "stop": ""}).to_string(), 400, "stop"),
            (c, json!({"prompt": "x", "temperature": "hot"}).to_string(), 400, "invalid"),
            (c, json!({"prompt": long}).to_string(), 400, "context length"),
            (c, json!({"prompt": "x", "max_tokens": 100000}).to_string(), 400, "context length"),
            (c, json!({"prompt": [99999]}).to_string(), 400, "vocabulary"),
            (c, json!({"prompt": []}).to_string(), 400, "empty"),
            (c, json!({"prompt": "x", "logit_bias": {"5": 1.0}}).to_string(), 400, "logit_bias"),
            (c, json!({"prompt": "x", "echo": true}).to_string(), 400, "echo"),
            (c, json!({"prompt": "x", "n": 1000}).to_string(), 400, "n must"),
            (c, json!({"prompt": "x", "stream_options": {"include_usage": true}}).to_string(), 400, "stream"),
            (ch, json!({"messages": []}).to_string(), 400, "empty"),
            (ch, json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "role"),
            (ch, json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(), 400, "image_url"),
            (ch, json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(), 400, "logprobs"),
            (ch, json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}).to_string(), 400, "tools"),
            (ch, json!({"messages": "hi"}).to_string(), 400, "invalid"),
            ("/tokenize", json!({}).to_string(), 400, "exactly one"),
            ("/detokenize", json!({"tokens": [100000]}).to_string(), 400, "vocabulary"),
            ("/detokenize", json!({"tokens": [-1]}).to_string(), 400, "invalid"),
        ];
        for (path, body, want, needle) in cases {
            let (st, v) = s.post_raw(path, body.clone()).await;
            assert_eq!(st, want, "{path} {body}: {v}");
            let msg = error_message(&v);
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "{path} {body}: message {msg:?} lacks {needle:?}"
            );
        }
        // `param` names the field the client sent: unknown ones, one endpoint's fields sent to
        // the other, and each out-of-range sampling value.
        let user = json!([{"role": "user", "content": "x"}]);
        let params: Vec<(&str, Value, &str)> = vec![
            (c, json!({"prompt": "x", "bogus": 1}), "bogus"),
            (ch, json!({"messages": user, "bogus": 1}), "bogus"),
            (ch, json!({"messages": user, "best_of": 1}), "best_of"),
            (c, json!({"prompt": "x", "top_logprobs": 1}), "top_logprobs"),
            (c, json!({"prompt": "x", "temperature": -1}), "temperature"),
            (ch, json!({"messages": user, "temperature": -1}), "temperature"),
            (ch, json!({"messages": user, "top_k": -2}), "top_k"),
            (c, json!({"prompt": "x", "repetition_penalty": 0}), "repetition_penalty"),
            (c, json!({"prompt": "x", "min_tokens": 5, "max_tokens": 2}), "min_tokens"),
            (c, json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
            (c, json!({"prompt": "x", "stop": ""}), "stop"),
            (c, json!({"prompt": "x", "n": 0}), "n"),
            (c, json!({"prompt": "x", "logprobs": 21}), "logprobs"),
            (ch, json!({"messages": user, "max_tokens": 0}), "max_tokens"),
            (ch, json!({"messages": user, "max_completion_tokens": 0}), "max_completion_tokens"),
            (ch, json!({"messages": user, "logprobs": true, "top_logprobs": 21}), "top_logprobs"),
            (c, json!({"prompt": "x", "n": 2, "best_of": 3}), "best_of"),
        ];
        for (path, body, param) in params {
            let (st, v) = s.post(path, &body).await;
            assert_eq!(st, 400, "{path} {body}: {v}");
            assert_eq!(v["error"]["param"], json!(param), "{path} {body}: {v}");
        }
        // Known OpenAI fields asking for the default are accepted.
        let (st, v) = s
            .post(
                c,
                &json!({"prompt": "x", "max_tokens": 1, "user": "u", "logit_bias": {},
                        "echo": false, "best_of": 1, "stream": false, "model": MODEL,
                        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 3}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = s
            .post(
                ch,
                &json!({"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": null}],
                        "max_tokens": 1, "tool_choice": "none",
                        "response_format": {"type": "text"}, "parallel_tool_calls": false,
                        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 3}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        // Unknown routes and methods.
        let r = s.client.get(s.url(c)).send().await.expect("sent");
        assert_eq!(r.status(), 405);
        let v: Value = r.json().await.expect("json");
        error_message(&v);
        let (st, t) = s.get_text("/v2/nothing").await;
        assert_eq!(st, 404);
        error_message(&serde_json::from_str(&t).expect("json"));
        // Errors are counted by status.
        let (_, m) = s.get_text("/metrics").await;
        assert!(
            m.lines().any(|l| l.starts_with("tandem_http_requests_total")
                && l.contains("endpoint=\"/v1/completions\"")
                && l.contains("status=\"400\"")),
            "{m}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_health_models_metrics() {
    bounded(async {
        let s = TestServer::start(64).await;
        let (st, v) = s
            .post(
                "/tokenize",
                &json!({"prompt": "hello world", "model": MODEL}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let toks = v["tokens"].as_array().expect("tokens").clone();
        assert!(!toks.is_empty());
        assert_eq!(v["count"], toks.len());
        assert_eq!(v["max_model_len"], 512);
        let (_, no_special) = s
            .post(
                "/tokenize",
                &json!({"prompt": "hello world", "add_special_tokens": false}),
            )
            .await;
        assert_eq!(no_special["count"].as_u64(), Some(toks.len() as u64 - 1));
        let (st, d) = s.post("/detokenize", &json!({"tokens": toks})).await;
        assert_eq!(st, 200, "{d}");
        assert!(
            d["prompt"]
                .as_str()
                .is_some_and(|p| p.contains("hello world")),
            "{d}"
        );

        let (st, h) = s.get_text("/health").await;
        assert_eq!(st, 200, "{h}");
        let (st, m) = s.get_text("/v1/models").await;
        assert_eq!(st, 200);
        let m: Value = serde_json::from_str(&m).expect("json");
        assert_eq!(m["object"], "list");
        assert_eq!(m["data"][0]["id"], MODEL);
        assert_eq!(m["data"][0]["object"], "model");

        let (st, _) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "metrics please", "max_tokens": 4, "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200);
        let (st, text) = s.get_text("/metrics").await;
        assert_eq!(st, 200);
        for name in [
            "tandem_http_requests_total{",
            "tandem_time_to_first_token_seconds_bucket",
            "tandem_inter_token_latency_seconds_bucket",
            "tandem_e2e_request_latency_seconds_count",
            "tandem_requests_in_flight",
            "tandem_worker_busy_fraction{",
            "tandem_expert_tokens_total{",
            "tandem_queue_waiting{",
            "tandem_kv_blocks_used{",
            "tandem_worker_busy_ns{",
            "tandem_generation_tokens_total",
        ] {
            assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
        }
        assert!(text.contains("role=\"expert\"") && text.contains("role=\"attention\""));
    })
    .await;
}
