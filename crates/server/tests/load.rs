//! Admission control (503 + Retry-After), client disconnects (abort, permits and KV freed),
//! and graceful shutdown.

mod common;

use common::{bounded, error_message, read_sse, TestServer, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn long_stream() -> Value {
    json!({"prompt": "a long story", "max_tokens": 400, "ignore_eos": true, "stream": true,
           "temperature": 0})
}

/// Opens a stream and waits for its first chunk (so it is admitted and generating).
async fn open_stream(s: &TestServer) -> reqwest::Response {
    let mut resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&long_stream())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(WAIT, resp.chunk())
        .await
        .expect("first chunk in time")
        .expect("chunk read");
    assert!(first.is_some_and(|c| c.starts_with(b"data: ")));
    resp
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_with_retry_after() {
    bounded(async {
        let s = TestServer::start(1).await;
        // One stream holds the only slot: everything else is turned away, none hangs.
        let held = open_stream(&s).await;
        let burst = (0..6).map(|i| {
            s.client
                .post(s.url("/v1/completions"))
                .json(&json!({"prompt": format!("burst {i}"), "max_tokens": 4}))
                .send()
        });
        for r in futures_util::future::join_all(burst).await {
            let r = r.expect("sent");
            assert_eq!(r.status(), 503);
            assert_eq!(
                r.headers().get("retry-after").and_then(|h| h.to_str().ok()),
                Some("1")
            );
            let v: Value = r.json().await.expect("json");
            assert!(error_message(&v).contains("capacity"));
        }
        // A request that could never fit is a 400, not a 503.
        let (st, v) = s
            .post("/v1/completions", &json!({"prompt": "x", "n": 2}))
            .await;
        assert_eq!(st, 400, "{v}");
        // The held stream still completes normally.
        let (events, done) = read_sse(held).await;
        assert!(done);
        let text: usize = events
            .iter()
            .filter(|e| !e["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(text, 1);
        // And the slot is free again.
        let (st, v) = s
            .post(
                "/v1/completions",
                &json!({"prompt": "after", "max_tokens": 2}),
            )
            .await;
        assert_eq!(st, 200, "{v}");

        // A concurrent burst: each request either completes fully or gets 503; none is lost.
        let burst = (0..8).map(|i| {
            let s = &s;
            async move {
                s.post(
                    "/v1/completions",
                    &json!({"prompt": format!("b{i}"), "max_tokens": 20, "ignore_eos": true}),
                )
                .await
            }
        });
        let results = futures_util::future::join_all(burst).await;
        let ok = results.iter().filter(|(st, _)| *st == 200).count();
        let busy = results.iter().filter(|(st, _)| *st == 503).count();
        assert_eq!(ok + busy, 8, "{results:?}");
        assert!(ok >= 1);
        for (st, v) in &results {
            if *st == 200 {
                assert_eq!(v["usage"]["completion_tokens"], 20);
            }
        }
        let (_, m) = s.get_text("/metrics").await;
        assert!(
            metric_value(&m, "tandem_requests_rejected_total") >= 6.0,
            "{m}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_request() {
    bounded(async {
        let s = TestServer::start(1).await;
        let (_, before) = s.get_text("/metrics").await;
        let aborted_before = metric_value(&before, "tandem_requests_aborted_total");
        let mut resp = open_stream(&s).await;
        let second = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .expect("chunk in time");
        assert!(second.is_ok());
        drop(resp);
        // The abort frees the only admission slot: a new request gets in (bounded retries),
        // long before the 400-token stream could have finished on its own.
        let t = Instant::now();
        loop {
            let (st, v) = s
                .post(
                    "/v1/completions",
                    &json!({"prompt": "next", "max_tokens": 3,
                                                  "ignore_eos": true}),
                )
                .await;
            if st == 200 {
                assert_eq!(v["usage"]["completion_tokens"], 3);
                break;
            }
            assert_eq!(st, 503, "{v}");
            assert!(t.elapsed() < Duration::from_secs(30), "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, after) = s.get_text("/metrics").await;
        assert!(
            metric_value(&after, "tandem_requests_aborted_total") >= aborted_before + 1.0,
            "{after}"
        );
        // A non-streaming request whose client goes away is aborted too.
        let before = s.get_text("/metrics").await.1;
        let aborted = metric_value(&before, "tandem_requests_aborted_total");
        let prompt_tokens = metric_value(&before, "tandem_prompt_tokens_total");
        let body = json!({"prompt": "cancel me", "max_tokens": 500, "ignore_eos": true,
                          "temperature": 0})
        .to_string();
        let addr = s.base.trim_start_matches("http://").to_string();
        let mut sock = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut sock, req.as_bytes())
            .await
            .expect("write");
        // Drop the connection once the engine has the request (its prompt counted in
        // /metrics), not after a sleep guessed long enough for the server to have read it.
        let t = Instant::now();
        loop {
            let m = s.get_text("/metrics").await.1;
            if metric_value(&m, "tandem_prompt_tokens_total") > prompt_tokens {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "never admitted: {m}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(sock);
        let t = Instant::now();
        loop {
            let m = s.get_text("/metrics").await.1;
            if metric_value(&m, "tandem_requests_aborted_total") >= aborted + 1.0 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "never aborted: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The engine still works for streams too.
        let resp = s
            .client
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": "again", "max_tokens": 3, "stream": true}))
            .send()
            .await
            .expect("sent");
        let (_, done) = read_sse(resp).await;
        assert!(done);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    bounded(async {
        let mut s = TestServer::start_with(8, Duration::from_secs(30)).await;
        let resp = s
            .client
            .post(s.url("/v1/completions"))
            .json(
                &json!({"prompt": "drain", "max_tokens": 60, "ignore_eos": true,
                          "stream": true}),
            )
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let first = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("in time");
        assert!(first.is_some());
        s.trigger_shutdown();
        // The in-flight stream runs to its end.
        let mut rest = Vec::new();
        while let Some(c) = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("in time")
        {
            rest.extend_from_slice(&c.expect("chunk"));
        }
        let text = String::from_utf8(rest).expect("utf8");
        assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
        let base = s.base.clone();
        s.stop().await;
        // Nothing listens any more.
        let r = reqwest::Client::new()
            .get(format!("{base}/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(r.is_err());
    })
    .await;
}
