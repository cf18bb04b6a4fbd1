//! Per-worker busy/idle accounting (the pipeline bubble) and engine counters, kept as atomics
//! so that benchmarks can read them, and mirrored into the `metrics` crate.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Default)]
pub struct WorkerStats {
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    /// Attention replicas: the part of `busy_ns` spent in the LM head (final norm included).
    pub lm_head_ns: AtomicU64,
    /// Attention replicas: the part of `busy_ns` spent sampling, updating the scheduler and
    /// streaming tokens.
    pub sample_ns: AtomicU64,
}

#[derive(Default)]
pub struct EngineStats {
    pub replicas: Vec<WorkerStats>,
    pub experts: Vec<WorkerStats>,
    pub iterations: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Lane steps started while another lane's step of the previous iteration was still
    /// with the expert workers (pipelining across iterations at work).
    pub overlapped_steps: AtomicU64,
    /// Layers of one lane run between the LM head parts or sampling of another (the
    /// expert workers fed during a lane's step boundary).
    pub interleaved_layers: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerSnapshot {
    pub role: &'static str,
    pub id: usize,
    pub busy_s: f64,
    pub idle_s: f64,
    pub busy_fraction: f64,
    /// Of `busy_s`: LM head, and sampling (attention replicas; 0 for expert workers).
    pub lm_head_s: f64,
    pub sample_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub workers: Vec<WorkerSnapshot>,
    pub iterations: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub overlapped_steps: u64,
    pub interleaved_layers: u64,
}

impl EngineStats {
    pub fn new(replicas: usize, experts: usize) -> Arc<Self> {
        Arc::new(Self {
            replicas: (0..replicas).map(|_| WorkerStats::default()).collect(),
            experts: (0..experts).map(|_| WorkerStats::default()).collect(),
            ..Default::default()
        })
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let one = |role, id, w: &WorkerStats| {
            let b = w.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let i = w.idle_ns.load(Ordering::Relaxed) as f64 / 1e9;
            WorkerSnapshot {
                role,
                id,
                busy_s: b,
                idle_s: i,
                busy_fraction: if b + i > 0.0 { b / (b + i) } else { 0.0 },
                lm_head_s: w.lm_head_ns.load(Ordering::Relaxed) as f64 / 1e9,
                sample_s: w.sample_ns.load(Ordering::Relaxed) as f64 / 1e9,
            }
        };
        let mut workers: Vec<_> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(i, w)| one("attention", i, w))
            .collect();
        workers.extend(
            self.experts
                .iter()
                .enumerate()
                .map(|(i, w)| one("expert", i, w)),
        );
        StatsSnapshot {
            workers,
            iterations: self.iterations.load(Ordering::Relaxed),
            generated_tokens: self.generated_tokens.load(Ordering::Relaxed),
            preemptions: self.preemptions.load(Ordering::Relaxed),
            overlapped_steps: self.overlapped_steps.load(Ordering::Relaxed),
            interleaved_layers: self.interleaved_layers.load(Ordering::Relaxed),
        }
    }
}

/// Accumulates time into busy or idle buckets as a worker switches between them.
pub struct Clock<'a> {
    w: &'a WorkerStats,
    last: Instant,
    role: &'static str,
    id: String,
}

impl<'a> Clock<'a> {
    pub fn new(w: &'a WorkerStats, role: &'static str, id: usize) -> Self {
        Self {
            w,
            last: Instant::now(),
            role,
            id: id.to_string(),
        }
    }
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let d = now.duration_since(self.last).as_nanos() as u64;
        self.last = now;
        d
    }
    /// The time since the last call was spent working.
    pub fn busy(&mut self) {
        let d = self.lap();
        self.w.busy_ns.fetch_add(d, Ordering::Relaxed);
        metrics::counter!("tandem_worker_busy_ns", "role" => self.role, "id" => self.id.clone())
            .increment(d);
    }
    /// Records `d` of LM-head time (part of the busy time).
    pub fn lm_head(&self, d: std::time::Duration) {
        let d = d.as_nanos() as u64;
        self.w.lm_head_ns.fetch_add(d, Ordering::Relaxed);
        metrics::counter!("tandem_replica_lm_head_ns", "id" => self.id.clone()).increment(d);
    }
    /// Records `d` of sampling time (part of the busy time).
    pub fn sample(&self, d: std::time::Duration) {
        let d = d.as_nanos() as u64;
        self.w.sample_ns.fetch_add(d, Ordering::Relaxed);
        metrics::counter!("tandem_replica_sample_ns", "id" => self.id.clone()).increment(d);
    }
    /// The time since the last call was spent waiting.
    pub fn idle(&mut self) {
        let d = self.lap();
        self.w.idle_ns.fetch_add(d, Ordering::Relaxed);
        metrics::counter!("tandem_worker_idle_ns", "role" => self.role, "id" => self.id.clone())
            .increment(d);
    }
}
