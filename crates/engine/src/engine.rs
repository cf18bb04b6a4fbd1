//! The engine: spawns the replicas and expert workers of a deployment, runs the iteration
//! lockstep, and exposes `add_request` / `abort`.
//!
//! Lockstep: a coordinator thread starts iteration `i` on **every** replica and waits for all
//! of them before starting `i + 1`. A replica with nothing scheduled still takes part (it
//! sends empty dispatches), so every expert worker can complete every slot
//! (iteration, layer, micro-batch) in order. When no replica has work, the coordinator blocks
//! on its command channel: an idle deployment does not spin. Requests may arrive at any time;
//! they are handed to their replica between iterations.

use crate::expert_worker::ExpertWorker;
use crate::output::{RequestOutput, RequestState};
use crate::replica::{record_preemptions, Experts, Replica};
use crate::stats::{EngineStats, StatsSnapshot};
use crate::transport::in_process;
use crate::EngineError;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tandem_core::{Deployment, RequestId};
use tandem_model::{KvCache, Model, Tokenizer};
use tandem_sched::{Sampler, SamplingParams, Scheduler, SchedulerConfig, Sequence};
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

enum Cmd {
    Add {
        replica: usize,
        seq: Box<Sequence>,
        state: Box<RequestState>,
    },
    Abort(RequestId),
    Shutdown,
}

enum ReplicaCmd {
    Add(Box<Sequence>, Box<RequestState>),
    Abort(RequestId),
    Step(u64),
}

/// A request's output stream.
pub struct RequestHandle {
    pub id: RequestId,
    pub replica: usize,
    pub rx: UnboundedReceiver<RequestOutput>,
}

pub struct Engine {
    cmd_tx: Mutex<mpsc::Sender<Cmd>>,
    next_id: AtomicU64,
    next_replica: AtomicUsize,
    n_replicas: usize,
    max_model_len: usize,
    vocab: usize,
    eos: Vec<u32>,
    stats: Arc<EngineStats>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    dead: Arc<Mutex<Option<String>>>,
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
        let bs = dep.kv_block_size as usize;
        let num_blocks = if dep.num_kv_blocks > 0 {
            dep.num_kv_blocks as usize
        } else {
            KvCache::blocks_for_bytes(cfg, bs, opts.kv_cache_bytes / n_a.max(1)).max(1)
        };
        let max_model_len = cfg.max_position_embeddings.min(num_blocks * bs);
        let mut eos = cfg.eos_token_ids.clone();
        if let Some(e) = tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        let stats = EngineStats::new(n_a, n_e);
        let dead: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let threads_per = dep.threads_per_worker.max(1) as usize;
        let pool_for = |index: usize, name: String| -> Result<rayon::ThreadPool, EngineError> {
            let cores = cores.clone();
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
        };
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
            };
            let pool = pool_for(n_a + w, format!("expert{w}"))?;
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
        // Replicas.
        let (done_tx, done_rx) = mpsc::channel::<(usize, Result<bool, String>)>();
        let mut rep_txs = Vec::new();
        let mut rep_links = rep_links.into_iter();
        for r in 0..n_a {
            let sched = Scheduler::new(SchedulerConfig {
                max_num_seqs: dep.max_num_seqs as usize,
                max_num_batched_tokens: dep.max_num_batched_tokens as usize,
                block_size: bs,
                num_blocks,
                enable_prefix_caching: opts.enable_prefix_caching,
                long_prefill_chunk: None,
                max_model_len: Some(cfg.max_position_embeddings),
            })?;
            let experts = match rep_links.next() {
                Some(link) => Experts::Remote {
                    link,
                    placement: placement.clone(),
                    timeout: opts.peer_timeout,
                },
                None => Experts::Local,
            };
            let kv = KvCache::new(cfg, bs, num_blocks);
            let mut rep = Replica::new(
                r as u32,
                model.clone(),
                tokenizer.clone(),
                sched,
                kv,
                Sampler::new(eos.clone()),
                experts,
                dep.micro_batches as usize,
            );
            let (tx, rx) = mpsc::channel::<ReplicaCmd>();
            rep_txs.push(tx);
            let pool = pool_for(r, format!("attn{r}"))?;
            let done_tx = done_tx.clone();
            let stats = stats.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("attn{r}"))
                    .spawn(move || {
                        pool.install(move || {
                            while let Ok(cmd) = rx.recv() {
                                match cmd {
                                    ReplicaCmd::Add(seq, st) => rep.add(*seq, *st),
                                    ReplicaCmd::Abort(id) => rep.abort(id),
                                    ReplicaCmd::Step(it) => {
                                        let before = rep.stats_preemptions();
                                        let gen_before = rep.generated;
                                        let res = rep.step(it, &stats.replicas[r]);
                                        record_preemptions(&stats, before, rep.stats_preemptions());
                                        stats.generated_tokens.fetch_add(
                                            rep.generated - gen_before,
                                            Ordering::Relaxed,
                                        );
                                        let res = match res {
                                            Ok(()) => Ok(rep.has_work()),
                                            Err(e) => {
                                                let msg = format!("attention replica {r}: {e}");
                                                rep.fail_all(&msg);
                                                Err(msg)
                                            }
                                        };
                                        let failed = res.is_err();
                                        if done_tx.send((r, res)).is_err() || failed {
                                            break;
                                        }
                                    }
                                }
                            }
                        })
                    })
                    .map_err(|e| EngineError::Spawn(e.to_string()))?,
            );
        }
        drop(done_tx);
        // Coordinator.
        let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
        {
            let stats = stats.clone();
            let dead = dead.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("coordinator".into())
                    .spawn(move || coordinate(cmd_rx, rep_txs, done_rx, stats, dead))
                    .map_err(|e| EngineError::Spawn(e.to_string()))?,
            );
        }
        Ok(Self {
            cmd_tx: Mutex::new(cmd_tx),
            next_id: AtomicU64::new(0),
            next_replica: AtomicUsize::new(0),
            n_replicas: n_a,
            max_model_len,
            vocab: cfg.vocab_size,
            eos,
            stats,
            threads: Mutex::new(threads),
            dead,
        })
    }

    /// The longest prompt + output a request may have.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Queues a request on the next replica (round robin) and returns its output stream.
    pub fn add_request(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestHandle, EngineError> {
        let r = self.next_replica.fetch_add(1, Ordering::Relaxed) % self.n_replicas.max(1);
        self.add_request_to(r, prompt, params)
    }

    /// Queues a request on replica `replica`.
    pub fn add_request_to(
        &self,
        replica: usize,
        prompt: Vec<u32>,
        params: SamplingParams,
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
        let seq = Sequence::new(id, prompt, params, self.eos.clone());
        self.send(Cmd::Add {
            replica,
            seq: Box::new(seq),
            state: Box::new(state),
        })?;
        Ok(RequestHandle { id, replica, rx })
    }

    pub fn abort(&self, id: RequestId) -> Result<(), EngineError> {
        self.send(Cmd::Abort(id))
    }

    fn send(&self, c: Cmd) -> Result<(), EngineError> {
        let tx = self
            .cmd_tx
            .lock()
            .map_err(|_| EngineError::Stopped("poisoned".into()))?;
        tx.send(c).map_err(|_| {
            EngineError::Stopped(
                self.dead
                    .lock()
                    .ok()
                    .and_then(|d| d.clone())
                    .unwrap_or_else(|| "shut down".into()),
            )
        })
    }

    /// Why the engine stopped serving (a worker failed), or `None` while it is healthy.
    pub fn failure(&self) -> Option<String> {
        self.dead.lock().ok().and_then(|d| d.clone())
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Stops every worker after the current iteration; in-flight requests end with an error.
    pub fn shutdown(&self) {
        let _ = self.send(Cmd::Shutdown);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
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

fn coordinate(
    cmd_rx: mpsc::Receiver<Cmd>,
    rep_txs: Vec<mpsc::Sender<ReplicaCmd>>,
    done_rx: mpsc::Receiver<(usize, Result<bool, String>)>,
    stats: Arc<EngineStats>,
    dead: Arc<Mutex<Option<String>>>,
) {
    let n = rep_txs.len();
    let mut busy = vec![false; n];
    let mut iteration = 0u64;
    'outer: loop {
        let mut cmds = Vec::new();
        if !busy.iter().any(|b| *b) {
            // Idle: block until something arrives.
            match cmd_rx.recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        while let Ok(c) = cmd_rx.try_recv() {
            cmds.push(c);
        }
        for c in cmds {
            match c {
                Cmd::Add {
                    replica,
                    seq,
                    state,
                } => {
                    busy[replica] = true;
                    if rep_txs[replica].send(ReplicaCmd::Add(seq, state)).is_err() {
                        break 'outer;
                    }
                }
                Cmd::Abort(id) => {
                    for tx in &rep_txs {
                        let _ = tx.send(ReplicaCmd::Abort(id));
                    }
                }
                Cmd::Shutdown => break 'outer,
            }
        }
        if !busy.iter().any(|b| *b) {
            continue;
        }
        for tx in &rep_txs {
            if tx.send(ReplicaCmd::Step(iteration)).is_err() {
                break 'outer;
            }
        }
        for _ in 0..n {
            match done_rx.recv() {
                Ok((r, Ok(has_work))) => busy[r] = has_work,
                Ok((_, Err(msg))) => {
                    tracing::error!("{msg}");
                    if let Ok(mut d) = dead.lock() {
                        d.get_or_insert(msg);
                    }
                    break 'outer;
                }
                Err(_) => break 'outer,
            }
        }
        iteration += 1;
        stats.iterations.store(iteration, Ordering::Relaxed);
    }
    // Dropping the replica senders ends their loops; their links drop and the expert workers
    // see every replica hang up.
    drop(rep_txs);
}
