//! A server that nobody scrapes does not keep its latency samples: the Prometheus
//! recorder's histograms are drained every `UPKEEP_EVERY` samples (they used to be drained
//! only by a `/metrics` scrape, and the attention replicas grew by ~200 bytes a request).
//! Its own process: the recorder and the counters are process-wide.

mod common;

use common::TestServer;
use futures_util::future::join_all;
use serde_json::json;
use tandem_server::{pending_histogram_samples, upkeeps_run, UPKEEP_EVERY};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histogram_samples_stay_bounded_without_scrapes() {
    let s = TestServer::start(64).await;
    // One TTFT or inter-token sample per token and one e2e sample per request.
    let max_tokens = 32;
    let per_request = max_tokens + 1;
    let requests = 2 * UPKEEP_EVERY / per_request + 1;
    let mut sent = 0;
    while sent < requests {
        let batch = (requests - sent).min(16);
        let replies = join_all((0..batch).map(|i| {
            let body = json!({"prompt": format!("prompt {}", (sent + i) % 8),
                              "max_tokens": max_tokens, "ignore_eos": true,
                              "temperature": 0, "stream": true});
            s.client.post(s.url("/v1/completions")).json(&body).send()
        }))
        .await;
        for r in replies {
            let r = r.expect("sent");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("stream read");
        }
        sent += batch;
    }
    assert!(
        pending_histogram_samples() < UPKEEP_EVERY,
        "{} histogram samples held after {requests} requests without a scrape",
        pending_histogram_samples()
    );
    assert!(upkeeps_run() >= 2, "{} upkeeps", upkeeps_run());
}
