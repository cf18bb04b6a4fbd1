//! The engine: spawns the replicas and expert workers of a deployment and exposes
//! `add_request` / `abort`.
//!
//! There is no central coordinator: each replica runs its own loop (take commands, run an
//! iteration), and the expert workers keep the replicas in step through the membership
//! protocol described in `transport.rs` (worker 0 admits replicas with work into the next
//! iteration; a member with nothing scheduled still sends empty dispatches so every worker
//! can complete every slot). A replica with no work and no membership sleeps on its
//! command channel, so an idle deployment does not spin. Requests may arrive at any time;
//! a replica takes them between iterations.

use crate::expert_worker::ExpertWorker;
use crate::output::{RequestOutput, RequestState};
use crate::replica::{Experts, Replica};
use crate::stats::{EngineStats, StatsSnapshot};
use crate::transport::{in_process, ReplicaLink};
use crate::EngineError;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tandem_core::{Deployment, RequestId};
use tandem_model::{KvCache, Model, Tokenizer};
use tandem_sched::{
    Sampler, SamplingParams, Scheduler, SchedulerConfig, Sequence, TokenConstraint,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub deployment: Deployment,
    /// KV cache budget per replica when `deployment.num_kv_blocks` is 0.
    pub kv_cache_bytes: usize,
    /// How long a replica waits for the expert workers before failing its requests.
    pub peer_timeout: Duration,
    pub enable_prefix_caching: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            deployment: Deployment::default(),
            kv_cache_bytes: 1 << 30,
            peer_timeout: Duration::from_secs(60),
            enable_prefix_caching: true,
        }
    }
}

enum ReplicaCmd {
    Add(Box<Sequence>, Box<RequestState>),
    Abort(RequestId),
    Shutdown,
}

/// A request's output stream.
pub struct RequestHandle {
    pub id: RequestId,
    pub replica: usize,
    pub rx: UnboundedReceiver<RequestOutput>,
}

pub struct Engine {
    /// One command channel per replica run by this process.
    rep_txs: Mutex<Vec<mpsc::Sender<ReplicaCmd>>>,
    next_id: AtomicU64,
    next_replica: AtomicUsize,
    n_replicas: usize,
    max_model_len: usize,
    vocab: usize,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dead: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    /// Extra health check (e.g. "every expert worker is connected").
    probe: Mutex<Option<HealthProbe>>,
}

/// Says why the deployment cannot serve right now, or `Ok`.
pub type HealthProbe = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One rayon pool per worker, pinned to cores when the deployment asks.
fn pool_for(
    cores: &[core_affinity::CoreId],
    dep: &Deployment,
    index: usize,
    name: String,
) -> Result<rayon::ThreadPool, EngineError> {
    let threads_per = dep.threads_per_worker.max(1) as usize;
    let cores = cores.to_vec();
    let pin = dep.pin_cores && !cores.is_empty();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads_per)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |i| {
            if pin {
                let c = cores[(index * threads_per + i) % cores.len()];
                core_affinity::set_for_current(c);
            }
        })
        .build()
        .map_err(|e| EngineError::Spawn(e.to_string()))
}

/// A replica's thread: take commands, and run iterations while there is work or the
/// membership protocol needs this replica; sleep on the command channel otherwise.
fn replica_loop(rep: &mut Replica, rx: mpsc::Receiver<ReplicaCmd>) {
    loop {
        let mut cmds = Vec::new();
        if !rep.wants_to_step() {
            match rx.recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        for c in cmds {
            match c {
                ReplicaCmd::Add(seq, st) => rep.add(*seq, *st),
                ReplicaCmd::Abort(id) => rep.abort(id),
                ReplicaCmd::Shutdown => {
                    rep.fail_all("the engine is shutting down");
                    rep.leave();
                    return;
                }
            }
        }
        if !rep.wants_to_step() {
            continue;
        }
        match rep.tick() {
            Ok(()) => {}
            Err(EngineError::Stopped(_)) => {
                rep.fail_all("the engine is shutting down");
                return;
            }
            Err(e) => {
                tracing::warn!(replica = rep.id, "{e}");
                // Never a hot loop, whatever keeps failing.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Engine {
    pub fn start(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let dep = &opts.deployment;
        dep.validate_shape()
            .map_err(|e| EngineError::Deployment(e.to_string()))?;
        let cfg = &model.cfg;
        let n_a = dep.attention_replicas as usize;
        let n_e = dep.expert_workers as usize;
        let placement = dep
            .placement_for(cfg.num_experts)
            .map_err(|e| EngineError::Deployment(e.to_string()))?;
        let stats = EngineStats::new(n_a, n_e);
        let dead: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let (rep_links, exp_links) = if n_e > 0 {
            in_process(n_a, n_e)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut threads = Vec::new();
        // Expert workers.
        for (w, link) in exp_links.into_iter().enumerate() {
            let worker = ExpertWorker {
                id: w as u32,
                model: model.clone(),
                link,
                micro_batches: dep.micro_batches,
                experts: placement.experts_of(w as u32),
                initial_epoch: 1,
                recover: false,
                status: Default::default(),
            };
            let pool = pool_for(&cores, dep, n_a + w, format!("expert{w}"))?;
            let stats = stats.clone();
            let dead = dead.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("expert{w}"))
                    .spawn(move || {
                        if let Err(e) = pool.install(|| worker.run(&stats.experts[w])) {
                            tracing::error!(worker = w, "expert worker failed: {e}");
                            if let Ok(mut d) = dead.lock() {
                                d.get_or_insert(format!("expert worker {w}: {e}"));
                            }
                        }
                    })
                    .map_err(|e| EngineError::Spawn(e.to_string()))?,
            );
        }
        let links = if n_e > 0 {
            rep_links.into_iter().map(Some).collect()
        } else {
            (0..n_a).map(|_| None).collect()
        };
        let ids = (0..n_a as u32).collect();
        Self::start_replicas(model, tokenizer, opts, ids, links, stats, dead, threads)
    }

    /// Runs attention replica `rank` of a multi-process deployment in this process; its
    /// routed experts are reached through `link` (e.g. TCP to the expert worker processes).
    pub fn start_remote(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: EngineOptions,
        rank: u32,
        link: Box<dyn ReplicaLink>,
    ) -> Result<Self, EngineError> {
        let dep = &opts.deployment;
        dep.validate_shape()
            .map_err(|e| EngineError::Deployment(e.to_string()))?;
        if rank >= dep.attention_replicas {
            return Err(EngineError::Deployment(format!(
                "attention rank {rank} but the deployment has {} replicas",
                dep.attention_replicas
            )));
        }
        let stats = EngineStats::new(1, 0);
        let dead = Arc::new(Mutex::new(None));
        Self::start_replicas(
            model,
            tokenizer,
            opts,
            vec![rank],
            vec![Some(link)],
            stats,
            dead,
            Vec::new(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_replicas(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: EngineOptions,
        ids: Vec<u32>,
        links: Vec<Option<Box<dyn ReplicaLink>>>,
        stats: Arc<EngineStats>,
        dead: Arc<Mutex<Option<String>>>,
        mut threads: Vec<JoinHandle<()>>,
    ) -> Result<Self, EngineError> {
        let dep = &opts.deployment;
        let cfg = &model.cfg;
        let n_total = dep.attention_replicas.max(1) as usize;
        let placement = dep
            .placement_for(cfg.num_experts)
            .map_err(|e| EngineError::Deployment(e.to_string()))?;
        let bs = dep.kv_block_size as usize;
        let num_blocks = if dep.num_kv_blocks > 0 {
            dep.num_kv_blocks as usize
        } else {
            KvCache::blocks_for_bytes(cfg, bs, opts.kv_cache_bytes / n_total).max(1)
        };
        let max_model_len = cfg.max_position_embeddings.min(num_blocks * bs);
        let mut eos = cfg.eos_token_ids.clone();
        if let Some(e) = tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut rep_txs = Vec::new();
        for (local, (id, link)) in ids.into_iter().zip(links).enumerate() {
            let sched = Scheduler::new(SchedulerConfig {
                max_num_seqs: dep.max_num_seqs as usize,
                max_num_batched_tokens: dep.max_num_batched_tokens as usize,
                block_size: bs,
                num_blocks,
                enable_prefix_caching: opts.enable_prefix_caching,
                long_prefill_chunk: None,
                max_model_len: Some(cfg.max_position_embeddings),
            })?;
            let experts = match link {
                Some(link) => Experts::remote(id, link, placement.clone(), opts.peer_timeout),
                None => Experts::Local,
            };
            let kv = KvCache::new(cfg, bs, num_blocks);
            let mut rep = Replica::new(
                id,
                model.clone(),
                tokenizer.clone(),
                sched,
                kv,
                Sampler::new(eos.clone()),
                experts,
                dep.micro_batches as usize,
                (stats.clone(), local),
            )
            .with_stop(stop.clone());
            let (tx, rx) = mpsc::channel::<ReplicaCmd>();
            rep_txs.push(tx);
            let pool = pool_for(&cores, dep, local, format!("attn{id}"))?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("attn{id}"))
                    .spawn(move || pool.install(move || replica_loop(&mut rep, rx)))
                    .map_err(|e| EngineError::Spawn(e.to_string()))?,
            );
        }
        let n_local = rep_txs.len();
        Ok(Self {
            rep_txs: Mutex::new(rep_txs),
            next_id: AtomicU64::new(0),
            next_replica: AtomicUsize::new(0),
            n_replicas: n_local,
            max_model_len,
            vocab: cfg.vocab_size,
            eos,
            stats,
            threads: Mutex::new(threads),
            dead,
            stop,
            probe: Mutex::new(None),
        })
    }

    /// The longest prompt + output a request may have.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The model's vocabulary (the width of a logits row).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Queues a request on the next replica (round robin) and returns its output stream.
    pub fn add_request(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestHandle, EngineError> {
        self.add_constrained(prompt, params, None)
    }

    /// [`Engine::add_request`] with a constraint on the output tokens (structured output,
    /// see [`crate::constraint`]); `None` is unconstrained.
    pub fn add_constrained(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<RequestHandle, EngineError> {
        let r = self.next_replica.fetch_add(1, Ordering::Relaxed) % self.n_replicas.max(1);
        self.add_to(r, prompt, params, constraint)
    }

    /// Queues a request on replica `replica`.
    pub fn add_request_to(
        &self,
        replica: usize,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestHandle, EngineError> {
        self.add_to(replica, prompt, params, None)
    }

    fn add_to(
        &self,
        replica: usize,
        prompt: Vec<u32>,
        params: SamplingParams,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<RequestHandle, EngineError> {
        if let Some(why) = self.dead.lock().ok().and_then(|d| d.clone()) {
            return Err(EngineError::Stopped(why));
        }
        params
            .validate()
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= self.max_model_len {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; this deployment's context is {} tokens",
                prompt.len(),
                self.max_model_len
            )));
        }
        if let Some(bad) = prompt.iter().find(|t| **t as usize >= self.vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        let replica = replica % self.n_replicas.max(1);
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = unbounded_channel();
        let state = RequestState::new(
            tx,
            &params.stop,
            params.include_stop_str_in_output,
            prompt.len(),
        );
        let mut seq = Sequence::new(id, prompt, params, self.eos.clone());
        if let Some(c) = constraint {
            seq = seq.with_constraint(c);
        }
        self.send(
            Some(replica),
            ReplicaCmd::Add(Box::new(seq), Box::new(state)),
        )?;
        Ok(RequestHandle { id, replica, rx })
    }

    pub fn abort(&self, id: RequestId) -> Result<(), EngineError> {
        // Only the owning replica knows the id; the others ignore it.
        for r in 0..self.n_replicas {
            self.send(Some(r), ReplicaCmd::Abort(id))?;
        }
        Ok(())
    }

    fn send(&self, replica: Option<usize>, c: ReplicaCmd) -> Result<(), EngineError> {
        let txs = self
            .rep_txs
            .lock()
            .map_err(|_| EngineError::Stopped("poisoned".into()))?;
        let sent = match replica.and_then(|r| txs.get(r)) {
            Some(tx) => tx.send(c).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        Err(EngineError::Stopped(
            self.dead
                .lock()
                .ok()
                .and_then(|d| d.clone())
                .unwrap_or_else(|| "shut down".into()),
        ))
    }

    /// Why the engine cannot serve (a worker failed, or a probe says a peer is unreachable),
    /// or `None` while it is healthy.
    pub fn failure(&self) -> Option<String> {
        if let Some(d) = self.dead.lock().ok().and_then(|d| d.clone()) {
            return Some(d);
        }
        let probe = self.probe.lock().ok()?;
        probe.as_ref().and_then(|p| p().err())
    }

    /// Adds a health check consulted by [`Engine::failure`].
    pub fn set_health_probe(&self, probe: HealthProbe) {
        if let Ok(mut p) = self.probe.lock() {
            *p = Some(probe);
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops every worker after the current iteration; in-flight requests end with an error.
    pub fn shutdown(&self) {
        if let Ok(txs) = self.rep_txs.lock() {
            for tx in txs.iter() {
                let _ = tx.send(ReplicaCmd::Shutdown);
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        // Replicas leave the membership cleanly (an empty iteration or two) so that the
        // other processes of a deployment go on undisturbed; past a deadline, waits for
        // peers are cut short.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
