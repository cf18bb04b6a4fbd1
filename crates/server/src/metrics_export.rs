//! The process-wide Prometheus recorder and the metrics the server itself records.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Latency buckets (seconds) for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder as the global `metrics` recorder, once per process (later
/// calls return the same handle). `None` when another recorder was installed first; the
/// server then answers `/metrics` with only the engine-stats gauges it renders itself.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("a metrics recorder is already installed: {e}");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "tandem_http_requests_total",
        "HTTP requests by endpoint and status code"
    );
    metrics::describe_histogram!(
        "tandem_time_to_first_token_seconds",
        "Time from request arrival to its first generated token"
    );
    metrics::describe_histogram!(
        "tandem_inter_token_latency_seconds",
        "Time between consecutive generated tokens of a request"
    );
    metrics::describe_histogram!(
        "tandem_e2e_request_latency_seconds",
        "Time from request arrival to its last token"
    );
    metrics::describe_gauge!(
        "tandem_requests_in_flight",
        "Engine requests admitted (running or waiting in the engine)"
    );
    metrics::describe_counter!(
        "tandem_requests_aborted_total",
        "Engine requests aborted because the client went away"
    );
    metrics::describe_counter!(
        "tandem_requests_rejected_total",
        "Requests turned away by admission control (503)"
    );
    metrics::describe_gauge!(
        "tandem_worker_busy_fraction",
        "Busy time / (busy + idle) of each attention replica and expert worker"
    );
    metrics::describe_counter!("tandem_prompt_tokens_total", "Prompt tokens processed");
    metrics::describe_counter!("tandem_generation_tokens_total", "Tokens generated");
}
