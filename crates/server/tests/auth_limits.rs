//! The API key (401 in OpenAI's shape, `/health` and `/metrics` open) and the operator
//! limits (413 body, 400 prompt / max_tokens / n, 429 in flight per client address), each
//! refused over real HTTP with a request just below it accepted.

mod common;

use common::{bounded, error_message, test_options, TestServer, MODEL};
use serde_json::{json, Value};
use std::time::Duration;
use tandem_server::{ApiKey, ServerOptions};
use tokio::io::AsyncWriteExt;

const KEY: &str = "tk-test-0123456789";

fn with_key() -> ServerOptions {
    ServerOptions {
        api_key: Some(ApiKey::new(KEY, "test").expect("key")),
        ..test_options()
    }
}

/// Sends `body` to `path` with an optional `Authorization` header value.
async fn post_auth(
    s: &TestServer,
    path: &str,
    auth: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = s
        .client
        .post(s.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    let r = rb.send().await.expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("non-JSON body ({e}) with status {status}: {text}"));
    (status, headers, v)
}

async fn get_auth(s: &TestServer, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut rb = s.client.get(s.url(path));
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    let r = rb.send().await.expect("request sent");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// Asserts a 401 in OpenAI's shape (`invalid_api_key`) and returns its message.
fn assert_401(status: u16, headers: &reqwest::header::HeaderMap, v: &Value) -> String {
    assert_eq!(status, 401, "{v}");
    let msg = error_message(v);
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    assert_eq!(v["error"]["param"], Value::Null, "{v}");
    assert_eq!(
        headers.get("www-authenticate").map(|h| h.as_bytes()),
        Some(&b"Bearer"[..])
    );
    assert!(!msg.contains(KEY), "the key must never be echoed: {msg}");
    msg
}

fn small_completion() -> Value {
    json!({"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0,
           "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_every_route_but_health_and_metrics() {
    bounded(async {
        let s = TestServer::start_opts(with_key()).await;
        let body = small_completion();
        let bearer = format!("Bearer {KEY}");

        // No key, a wrong key (also one that is a prefix of the right one), a wrong scheme.
        let (st, h, v) = post_auth(&s, "/v1/completions", None, &body).await;
        assert!(assert_401(st, &h, &v).contains("didn't provide an API key"));
        let (st, h, v) = post_auth(&s, "/v1/completions", Some("Bearer wrong"), &body).await;
        assert!(assert_401(st, &h, &v).contains("Incorrect API key"));
        let prefix = format!("Bearer {}", &KEY[..KEY.len() - 1]);
        let (st, h, v) = post_auth(&s, "/v1/completions", Some(&prefix), &body).await;
        assert_401(st, &h, &v);
        let basic = format!("Basic {KEY}");
        let (st, h, v) = post_auth(&s, "/v1/completions", Some(&basic), &body).await;
        assert_401(st, &h, &v);
        let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        let (st, h, v) = post_auth(&s, "/v1/chat/completions", None, &chat).await;
        assert_401(st, &h, &v);
        let (st, h, v) = post_auth(&s, "/tokenize", None, &json!({"prompt": "hi"})).await;
        assert_401(st, &h, &v);
        let (st, text) = get_auth(&s, "/v1/models", Some("Bearer nope")).await;
        assert_eq!(st, 401, "{text}");

        // The right key.
        let (st, _, v) = post_auth(&s, "/v1/completions", Some(&bearer), &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        let (st, _, v) = post_auth(&s, "/v1/chat/completions", Some(&bearer), &chat).await;
        assert_eq!(st, 200, "{v}");
        let (st, text) = get_auth(&s, "/v1/models", Some(&bearer)).await;
        assert_eq!(st, 200, "{text}");
        // The scheme is case-insensitive.
        let lower = format!("bearer {KEY}");
        let (st, _, v) = post_auth(&s, "/tokenize", Some(&lower), &json!({"prompt": "hi"})).await;
        assert_eq!(st, 200, "{v}");

        // Probes and scrapers need no key.
        let (st, text) = get_auth(&s, "/health", None).await;
        assert_eq!(st, 200, "{text}");
        let (st, text) = get_auth(&s, "/metrics", None).await;
        assert_eq!(st, 200, "{text}");
        assert!(
            text.contains("tandem_requests_unauthorized_total"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_everything_is_open() {
    bounded(async {
        let s = TestServer::start_opts(test_options()).await;
        let (st, _, v) = post_auth(&s, "/v1/completions", None, &small_completion()).await;
        assert_eq!(st, 200, "{v}");
        // A client that sends a key anyway is not refused.
        let (st, _, v) =
            post_auth(&s, "/v1/completions", Some("Bearer x"), &small_completion()).await;
        assert_eq!(st, 200, "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_size_limit() {
    bounded(async {
        let limit = 400;
        let s = TestServer::start_opts(ServerOptions {
            max_body_bytes: limit,
            ..test_options()
        })
        .await;
        let pad = |len: usize| {
            let mut b = small_completion();
            b["user"] = json!("");
            let fill = len - b.to_string().len();
            b["user"] = json!("x".repeat(fill));
            assert_eq!(b.to_string().len(), len);
            b
        };
        // At the limit: accepted.
        let (st, v) = s.post("/v1/completions", &pad(limit)).await;
        assert_eq!(st, 200, "{v}");
        // One byte over, with a Content-Length: 413 before the body is read.
        let (st, v) = s.post("/v1/completions", &pad(limit + 1)).await;
        assert_eq!(st, 413, "{v}");
        assert!(error_message(&v).contains("--max-body-bytes"), "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        // Chunked (no Content-Length): the limit is found while reading.
        let big = pad(limit + 100).to_string().into_bytes();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            big.chunks(64).map(|c| Ok(c.to_vec())).collect();
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status().as_u16(), 413);
        let v: Value = r.json().await.expect("JSON");
        assert!(error_message(&v).contains("larger than 400 bytes"), "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_max_tokens_and_n_limits() {
    bounded(async {
        let s = TestServer::start_opts(ServerOptions {
            max_prompt_tokens: 16,
            max_tokens: 5,
            max_n: 2,
            ..test_options()
        })
        .await;
        let ids = |n: u32| (10..10 + n).collect::<Vec<u32>>();
        let req = |prompt: Vec<u32>, max_tokens: usize, n: usize| {
            json!({"prompt": prompt, "max_tokens": max_tokens, "n": n, "temperature": 0,
                   "ignore_eos": true})
        };
        let refused = |st: u16, v: &Value, param: &str, code: Option<&str>| {
            assert_eq!(st, 400, "{v}");
            error_message(v);
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            assert_eq!(v["error"]["param"], param, "{v}");
            if let Some(c) = code {
                assert_eq!(v["error"]["code"], c, "{v}");
            }
        };

        // Prompt tokens: 16 accepted, 17 refused (the fixture's context is far larger).
        let (st, v) = s.post("/v1/completions", &req(ids(16), 1, 1)).await;
        assert_eq!(st, 200, "{v}");
        let (st, v) = s.post("/v1/completions", &req(ids(17), 1, 1)).await;
        refused(st, &v, "prompt", Some("prompt_too_long"));
        assert!(error_message(&v).contains("--max-prompt-tokens"), "{v}");
        let long_chat = json!({"messages": [{"role": "user", "content": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"}],
                               "max_tokens": 1});
        let (st, v) = s.post("/v1/chat/completions", &long_chat).await;
        refused(st, &v, "messages", Some("prompt_too_long"));

        // max_tokens: 5 accepted, 6 refused under the name the client used.
        let (st, v) = s.post("/v1/completions", &req(ids(3), 5, 1)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        let (st, v) = s.post("/v1/completions", &req(ids(3), 6, 1)).await;
        refused(st, &v, "max_tokens", Some("max_tokens_too_large"));
        let chat = |extra: Value| {
            let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                               "ignore_eos": true});
            if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            b
        };
        let (st, v) = s
            .post("/v1/chat/completions", &chat(json!({"max_completion_tokens": 6})))
            .await;
        refused(st, &v, "max_completion_tokens", Some("max_tokens_too_large"));
        // A chat without max_tokens stops at the operator's cap.
        let (st, v) = s.post("/v1/chat/completions", &chat(json!({}))).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");

        // n: 2 accepted, 3 refused.
        let (st, v) = s.post("/v1/completions", &req(ids(3), 1, 2)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"].as_array().map(Vec::len), Some(2));
        let (st, v) = s.post("/v1/completions", &req(ids(3), 1, 3)).await;
        refused(st, &v, "n", None);
        assert!(error_message(&v).contains("--max-n"), "{v}");
        let (st, v) = s
            .post("/v1/chat/completions", &chat(json!({"n": 3, "max_tokens": 1})))
            .await;
        refused(st, &v, "n", None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_per_client_address() {
    bounded(async {
        let s = TestServer::start_opts(ServerOptions {
            max_concurrent_per_ip: 1,
            ..with_key()
        })
        .await;
        let bearer = format!("Bearer {KEY}");
        let body = small_completion();
        // One request held in flight: headers sent, the body still on its way.
        let addr = s.base.trim_start_matches("http://").to_string();
        let mut held = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: {bearer}\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{"
        );
        held.write_all(head.as_bytes()).await.expect("write");
        held.flush().await.expect("flush");

        // The server sees the held request soon; from then on a second one is refused. (A
        // deadline, not a count of tries: on a loaded machine "soon" can take seconds.)
        let mut refusal = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let (st, h, v) = post_auth(&s, "/v1/completions", Some(&bearer), &body).await;
            if st == 429 {
                refusal = Some((h, v));
                break;
            }
            assert_eq!(st, 200, "{v}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let (h, v) = refusal.expect("a second request in flight was never refused");
        error_message(&v);
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        assert_eq!(v["error"]["param"], Value::Null, "{v}");
        assert!(error_message(&v).contains("--max-concurrent-per-ip"), "{v}");
        assert_eq!(h.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
        // Still refused while the first is held; /health stays open; a wrong key is a 401
        // (authentication comes first and takes no slot).
        let (st, _, v) = post_auth(&s, "/v1/completions", Some(&bearer), &body).await;
        assert_eq!(st, 429, "{v}");
        let (st, text) = get_auth(&s, "/health", None).await;
        assert_eq!(st, 200, "{text}");
        let (st, _, v) = post_auth(&s, "/v1/completions", Some("Bearer x"), &body).await;
        assert_eq!(st, 401, "{v}");

        // The held client goes away: its slot is given back and the next request is served.
        drop(held);
        assert!(
            served_soon(&s, &bearer, &body).await,
            "the slot of a closed connection was never given back"
        );

        // A stream holds its slot until it ends; afterwards the next request is served.
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("authorization", &bearer)
            .json(&json!({"prompt": "hi", "max_tokens": 4, "stream": true, "ignore_eos": true}))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status().as_u16(), 200);
        let (events, done) = common::read_sse(r).await;
        assert!(done && !events.is_empty());
        assert!(
            served_soon(&s, &bearer, &body).await,
            "the slot of a finished stream was never given back"
        );
    })
    .await;
}

/// Retries (429 only) until the request is served; false after 5 s.
async fn served_soon(s: &TestServer, bearer: &str, body: &Value) -> bool {
    for _ in 0..200 {
        let (st, _, v) = post_auth(s, "/v1/completions", Some(bearer), body).await;
        if st == 200 {
            return true;
        }
        assert_eq!(st, 429, "{v}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}
