//! The process-wide Prometheus recorder and the metrics the server itself records.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Latency buckets (seconds) for every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets (seconds) of the structured-output histograms (`tandem_constraint_*_seconds`,
/// `tandem_engine::constraint`): a token's mask takes microseconds, below the first latency
/// bucket, so these go from 1 us in steps of 1-2-5.
pub const CONSTRAINT_BUCKETS: &[f64] = &[
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
    0.2, 0.5, 1.0,
];

/// Histogram samples recorded (through [`record_seconds`]) between two upkeeps at most.
///
/// The recorder built with `build_recorder` keeps every histogram sample in memory until its
/// upkeep drains them into the buckets, and nothing runs that upkeep on its own (only
/// `install`/`build` spawn a task for it). Upkeep used to run only when `/metrics` was
/// scraped: a server nobody scraped kept every latency sample it ever recorded, about one
/// per generated token plus two per request (8 bytes each, plus the bucket's overhead), so
/// its memory grew linearly with the requests served. Now every `UPKEEP_EVERY` samples the
/// request path runs it too.
pub const UPKEEP_EVERY: usize = 4096;

/// Samples recorded since the last upkeep (an upper bound: one racing with an upkeep may be
/// drained already).
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Upkeeps run since the process started (by the sample count or by a scrape).
static UPKEEPS: AtomicUsize = AtomicUsize::new(0);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Records `secs` in the histogram `name`, and runs the recorder's upkeep once
/// [`UPKEEP_EVERY`] samples are waiting for it, so the samples held stay bounded whether or
/// not anyone scrapes `/metrics`.
pub fn record_seconds(name: &'static str, secs: f64) {
    metrics::histogram!(name).record(secs);
    if PENDING.fetch_add(1, Ordering::Relaxed) + 1 >= UPKEEP_EVERY {
        // The thread that takes the count runs the upkeep; the others go on.
        if PENDING.swap(0, Ordering::Relaxed) >= UPKEEP_EVERY {
            // Without our recorder (another one was installed first) there is nothing to do.
            if let Some(Some(h)) = HANDLE.get() {
                run_upkeep(h);
            }
        }
    }
}

/// Drains the recorded histogram samples into their buckets (before a render, or when
/// [`UPKEEP_EVERY`] samples are waiting).
pub fn run_upkeep(h: &PrometheusHandle) {
    PENDING.store(0, Ordering::Relaxed);
    h.run_upkeep();
    UPKEEPS.fetch_add(1, Ordering::Relaxed);
}

/// Histogram samples recorded through [`record_seconds`] and not yet drained by an upkeep.
pub fn pending_histogram_samples() -> usize {
    PENDING.load(Ordering::Relaxed)
}

/// Upkeeps run so far in this process.
pub fn upkeeps_run() -> usize {
    UPKEEPS.load(Ordering::Relaxed)
}

/// Installs the Prometheus recorder as the global `metrics` recorder, once per process (later
/// calls return the same handle). `None` when another recorder was installed first; the
/// server then answers `/metrics` with only the engine-stats gauges it renders itself.
pub fn install_metrics() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                // A prefix matcher is tried before a suffix matcher.
                .set_buckets_for_metric(
                    Matcher::Prefix("tandem_constraint_".into()),
                    CONSTRAINT_BUCKETS,
                )
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
    metrics::describe_histogram!(
        tandem_engine::constraint::MASK_SECONDS,
        "Structured output: time to compute one token's mask (on the sequence's own thread, \
         overlapped with the forward pass)"
    );
    metrics::describe_histogram!(
        tandem_engine::constraint::MASK_WAIT_SECONDS,
        "Structured output: time a step waited for a token's mask after the forward pass \
         (0 when it was ready)"
    );
    metrics::describe_histogram!(
        tandem_engine::constraint::COMMIT_SECONDS,
        "Structured output: time a step waited for the matcher to take the sampled token"
    );
    metrics::describe_counter!("tandem_prompt_tokens_total", "Prompt tokens processed");
    metrics::describe_counter!("tandem_generation_tokens_total", "Tokens generated");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a scrape, the samples waiting for an upkeep stay under `UPKEEP_EVERY` however
    /// many are recorded, and none is lost: the render counts them all.
    #[test]
    fn unscraped_histogram_samples_are_drained_by_count() {
        let h = install_metrics().expect("the Prometheus recorder installs");
        let before = upkeeps_run();
        let n = 3 * UPKEEP_EVERY + 7;
        for i in 0..n {
            record_seconds("tandem_test_upkeep_seconds", 0.001);
            assert!(
                pending_histogram_samples() < UPKEEP_EVERY,
                "{} samples waiting after {} recorded",
                pending_histogram_samples(),
                i + 1
            );
        }
        assert!(upkeeps_run() >= before + 3);
        let text = h.render();
        assert!(
            text.lines()
                .any(|l| l == format!("tandem_test_upkeep_seconds_count {n}")),
            "{text}"
        );
    }
}
