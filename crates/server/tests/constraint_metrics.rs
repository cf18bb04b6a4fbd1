//! The structured-output cost histograms on `/metrics`: one sample per constrained token in
//! each (the mask's compute time, the step's wait for it, the commit), none for an
//! unconstrained request. Its own process: the recorder is process-wide, so no other test
//! adds samples between the scrapes.

mod common;

use common::{bounded, TestServer, MODEL};
use serde_json::json;

const HISTOGRAMS: [&str; 3] = [
    "tandem_constraint_mask_seconds",
    "tandem_constraint_mask_wait_seconds",
    "tandem_constraint_commit_seconds",
];

/// `NAME_count` of each histogram (0 when not rendered yet).
async fn counts(s: &TestServer) -> [u64; 3] {
    let (st, text) = s.get_text("/metrics").await;
    assert_eq!(st, 200, "{text}");
    HISTOGRAMS.map(|h| {
        let key = format!("{h}_count ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().parse::<u64>().expect("a count"))
            .unwrap_or(0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_tokens_are_counted_in_the_mask_histograms() {
    bounded(async {
        let s = TestServer::start(64).await;
        let before = counts(&s).await;
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                            "s": {"type": "string", "maxLength": 8}}, "required": ["n", "s"],
                            "additionalProperties": false});
        let mut tokens = 0;
        for seed in 0..2 {
            let (st, v) = s
                .post(
                    "/v1/chat/completions",
                    &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 40,
                            "seed": seed,
                            "response_format": {"type": "json_schema",
                                                "json_schema": {"name": "s", "schema": schema, "strict": true}}}),
                )
                .await;
            assert_eq!(st, 200, "{v}");
            let n = v["usage"]["completion_tokens"].as_u64().expect("usage");
            assert!(n > 0, "{v}");
            tokens += n;
        }
        let after = counts(&s).await;
        for (i, h) in HISTOGRAMS.iter().enumerate() {
            assert_eq!(after[i] - before[i], tokens, "{h}: {before:?} -> {after:?}");
        }
        // The buckets are the fine ones (a mask takes microseconds).
        let (_, text) = s.get_text("/metrics").await;
        assert!(
            text.contains("tandem_constraint_mask_seconds_bucket{le=\"0.00001\"}"),
            "{text}"
        );
        // Unconstrained requests add nothing.
        let (st, v) = s
            .post(
                "/v1/chat/completions",
                &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 12,
                        "ignore_eos": true}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
        assert_eq!(counts(&s).await, after);
    })
    .await;
}
