//! An attention replica: owns its requests (scheduler), its paged KV cache, the attention
//! weights, router, lm_head and sampler. One iteration = schedule -> run -> postprocess
//! (STYLE item 4). `run` is where the ping-pong lives: the batch is split into `m`
//! micro-batches that go through the layers in turn, so that while the expert workers
//! compute micro-batch `i` of a layer, this replica computes the attention of `i + 1`.

use crate::microbatch::split;
use crate::output::{RequestOutput, RequestState};
use crate::stats::{Clock, WorkerStats};
use crate::transport::{CombineMsg, DispatchMsg, ReplicaLink, SlotHeader, ToReplica, ToWorker};
use crate::EngineError;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::{ExpertPlacement, RequestId};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::model::{add_into, assignments_of};
use tandem_model::{Assignment, BatchLayout, KvCache, Model, SeqSlot, Tokenizer};
use tandem_sched::{FinishReason, FinishedSeq, Sampler, Scheduler, SchedulerOutput, Sequence};

/// Where a replica's routed experts run.
pub enum Experts {
    /// In this thread, on the replica's own copy (the colocated deployment).
    Local,
    /// On the expert workers, through M2N.
    Remote {
        link: Box<dyn ReplicaLink>,
        placement: ExpertPlacement,
        timeout: Duration,
    },
}

/// Per micro-batch state of one layer between dispatch and combine.
struct InFlight {
    /// `[T, D]` residual after attention (+ shared expert once computed).
    residual: Vec<f32>,
    /// Per worker: the token rows it was sent, in dispatch order.
    rows: Vec<Vec<usize>>,
}

pub struct Replica {
    pub id: u32,
    pub model: Arc<Model>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub sched: Scheduler,
    pub kv: KvCache,
    pub sampler: Sampler,
    pub experts: Experts,
    pub micro_batches: usize,
    pub requests: HashMap<RequestId, RequestState>,
    combines: HashMap<(u64, u32, u32), Vec<CombineMsg>>,
    /// Tokens sampled so far (read into the engine stats after each step).
    pub generated: u64,
    /// Iterations run.
    pub steps: u64,
    /// Where this replica stands in the M2N protocol (see `transport.rs`).
    m2n: Membership,
    /// Set when the engine stops: waits for peers end early.
    stop: Arc<AtomicBool>,
}

/// A replica's view of the membership protocol.
#[derive(Debug, Default)]
struct Membership {
    member: bool,
    epoch: u64,
    /// The iteration to run next (meaningful while a member).
    iteration: u64,
    members: u64,
    join_outstanding: bool,
    /// From worker 0's combine of the current iteration's last slot.
    next_members: Option<u64>,
}

impl Replica {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        sched: Scheduler,
        kv: KvCache,
        sampler: Sampler,
        experts: Experts,
        micro_batches: usize,
    ) -> Self {
        Self {
            id,
            model,
            tokenizer,
            sched,
            kv,
            sampler,
            experts,
            micro_batches: micro_batches.max(1),
            requests: HashMap::new(),
            combines: HashMap::new(),
            generated: 0,
            steps: 0,
            m2n: Membership::default(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shares the engine's stop flag.
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = stop;
        self
    }

    /// Whether this replica must take part in the membership protocol: its routed experts
    /// are remote and the model has MoE layers.
    fn uses_protocol(&self) -> bool {
        matches!(self.experts, Experts::Remote { .. })
            && (0..self.model.cfg.num_layers).any(|l| self.model.cfg.is_moe_layer(l))
    }

    /// Whether the replica's loop should call [`Replica::tick`] now rather than wait for a
    /// command: it has requests, or it is a member of the next iteration (and must send its
    /// dispatches even if it has nothing to run).
    pub fn wants_to_step(&self) -> bool {
        self.m2n.member || self.has_work()
    }

    /// One turn of the replica's loop: join the next iteration if needed, then step. On an
    /// error the requests of the interrupted iteration have already been failed; the replica
    /// can go on.
    pub fn tick(&mut self, stats: &WorkerStats) -> Result<(), EngineError> {
        if self.uses_protocol() && !self.m2n.member {
            if !self.has_work() {
                return Ok(());
            }
            if let Err(e) = self.join() {
                let msg = format!("attention replica {}: {e}", self.id);
                self.fail_all(&msg);
                return Err(e);
            }
        }
        self.step(stats)
    }

    /// Asks worker 0 for a place in the next iteration and waits for it.
    fn join(&mut self) -> Result<(), EngineError> {
        let Experts::Remote { link, timeout, .. } = &self.experts else {
            return Ok(());
        };
        // A worker being restarted gets a few seconds to come back, not the whole timeout.
        let deadline = Instant::now() + (*timeout).min(CONNECT_WAIT);
        while let Err(why) = link.ready() {
            if Instant::now() >= deadline {
                return Err(EngineError::Transport(
                    crate::transport::TransportError::Disconnected(why),
                ));
            }
            self.check_stop()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + *timeout;
        if !self.m2n.join_outstanding {
            // Whatever is queued is from before (a stale loss notice or reset).
            while let Ok(ev) = link.recv(Duration::ZERO) {
                if let ToReplica::Reset { epoch, .. } = ev {
                    self.m2n.epoch = self.m2n.epoch.max(epoch);
                }
            }
            link.control(ToWorker::Join { replica: self.id })?;
            self.m2n.join_outstanding = true;
        }
        loop {
            let ev = match link.recv(POLL.min(*timeout)) {
                Ok(ev) => ev,
                Err(crate::transport::TransportError::Timeout { .. })
                    if Instant::now() < deadline =>
                {
                    self.check_stop()?;
                    continue;
                }
                Err(e) => {
                    self.m2n.join_outstanding = false;
                    return Err(e.into());
                }
            };
            match ev {
                ToReplica::Welcome {
                    epoch,
                    iteration,
                    members,
                } => {
                    self.m2n = Membership {
                        member: true,
                        epoch,
                        iteration,
                        members,
                        join_outstanding: false,
                        next_members: None,
                    };
                    self.combines.clear();
                    return Ok(());
                }
                // Worker 0 keeps pending joins across epochs: keep waiting.
                ToReplica::Reset { epoch, .. } => self.m2n.epoch = self.m2n.epoch.max(epoch),
                ToReplica::Combine(_) => {}
                ToReplica::Lost { worker, why } => {
                    if worker == 0 {
                        self.m2n.join_outstanding = false;
                        return Err(EngineError::Transport(
                            crate::transport::TransportError::Disconnected(why),
                        ));
                    }
                }
            }
        }
    }

    /// Before the replica stops: run (empty) iterations until worker 0 no longer counts it
    /// as a member, so that its departure interrupts nobody.
    pub fn leave(&mut self, stats: &WorkerStats) {
        for _ in 0..4 {
            if !self.m2n.member || self.step(stats).is_err() {
                break;
            }
        }
    }

    fn check_stop(&self) -> Result<(), EngineError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(EngineError::Stopped("shutting down".into()));
        }
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_unfinished()
    }

    /// Admits a request; a request the scheduler refuses ends at once with an error.
    pub fn add(&mut self, seq: Sequence, state: RequestState) {
        let id = seq.id();
        match self.sched.add(seq) {
            Ok(()) => {
                self.requests.insert(id, state);
            }
            Err(e) => state.finish_error(id, e.to_string()),
        }
    }

    pub fn abort(&mut self, id: RequestId) {
        if let Ok(Some(f)) = self.sched.abort(id) {
            self.finish(f);
        }
        self.publish_gauges();
    }

    /// One engine iteration: schedule, run the micro-batches through every layer, sample,
    /// update. Runs the M2N protocol even with nothing scheduled (an idle replica sends empty
    /// dispatches so that the expert workers can complete every slot).
    fn step(&mut self, stats: &WorkerStats) -> Result<(), EngineError> {
        let mut clock = Clock::new(stats, "attention", self.id as usize);
        let out = self.sched.schedule()?;
        self.publish_gauges();
        for id in &out.preempted {
            tracing::debug!(replica = self.id, request = id.0, "preempted (recompute)");
            metrics::counter!("tandem_preemptions_total").increment(1);
        }
        let protocol = self.uses_protocol();
        self.m2n.next_members = None;
        let iteration = self.m2n.iteration;
        self.steps += 1;
        match self.run(iteration, &out, &mut clock) {
            Ok(logits) => {
                if protocol {
                    match self.m2n.next_members {
                        Some(k) => {
                            self.m2n.member = k & (1u64 << self.id) != 0;
                            self.m2n.members = k;
                            self.m2n.iteration += 1;
                        }
                        None => {
                            tracing::error!(
                                replica = self.id,
                                "worker 0 did not say who takes part next; joining again"
                            );
                            self.m2n.member = false;
                        }
                    }
                }
                self.postprocess(logits)?;
            }
            Err(e) => {
                // The iteration is lost: its sequences end with the error; the others wait.
                let msg = format!("attention replica {}: {e}", self.id);
                for s in &out.seqs {
                    let _ = self.sched.abort(s.id);
                    if let Some(st) = self.requests.remove(&s.id) {
                        st.finish_error(s.id, msg.clone());
                    }
                }
                // Every sequence of the step is gone: this closes the step.
                let _ = self.sched.update(&[]);
                self.combines.clear();
                if protocol {
                    self.m2n.member = false;
                    if !matches!(e, EngineError::Interrupted(_) | EngineError::Stopped(_)) {
                        if let Experts::Remote { link, .. } = &self.experts {
                            let _ = link.control(ToWorker::Trouble {
                                replica: self.id,
                                epoch: self.m2n.epoch,
                                why: e.to_string(),
                            });
                        }
                    }
                }
                self.publish_gauges();
                return Err(e);
            }
        }
        self.publish_gauges();
        clock.busy();
        Ok(())
    }

    /// Queue lengths and KV usage, refreshed before and after every step and on abort.
    fn publish_gauges(&self) {
        let id = self.id.to_string();
        metrics::gauge!("tandem_queue_waiting", "replica" => id.clone())
            .set(self.sched.num_waiting() as f64);
        metrics::gauge!("tandem_queue_running", "replica" => id.clone())
            .set(self.sched.num_running() as f64);
        metrics::gauge!("tandem_kv_blocks_used", "replica" => id)
            .set(self.sched.num_used_blocks() as f64);
    }

    /// The forward pass of one iteration; returns `(request, logits [V])` for every sequence
    /// that samples this step.
    fn run(
        &mut self,
        iteration: u64,
        out: &SchedulerOutput,
        clock: &mut Clock,
    ) -> Result<Vec<(RequestId, Vec<f32>)>, EngineError> {
        let model = self.model.clone();
        let cfg = &model.cfg;
        let d = cfg.hidden_size;
        let mbs = split(&out.seqs, self.micro_batches);
        let m = mbs.len();
        let layouts: Vec<BatchLayout> = mbs
            .iter()
            .map(|mb| BatchLayout {
                seqs: mb
                    .iter()
                    .map(|&i| SeqSlot {
                        start_pos: out.seqs[i].start_pos,
                        num_tokens: out.seqs[i].token_ids.len(),
                        block_table: out.seqs[i].block_table.clone(),
                    })
                    .collect(),
            })
            .collect();
        let mut h: Vec<Tensor> = Vec::with_capacity(m);
        for mb in &mbs {
            let toks: Vec<u32> = mb
                .iter()
                .flat_map(|&i| out.seqs[i].token_ids.iter().copied())
                .collect();
            h.push(model.embed(&toks)?);
        }
        let mut inflight: Vec<Option<InFlight>> = (0..m).map(|_| None).collect();
        // Worker 0 reads this on the last slot to decide the next iteration's members.
        let more = self.has_work();
        for (l, layer) in model.layers.iter().enumerate() {
            for mb in 0..m {
                if let Some(f) = inflight[mb].take() {
                    h[mb] = self.combine(iteration, l as u32 - 1, mb as u32, f, clock)?;
                }
                let a = layer.attention.forward(
                    &h[mb],
                    &layouts[mb],
                    &mut self.kv.layers[l],
                    self.kv.block_size,
                )?;
                match (&a.routing, &self.experts) {
                    (
                        Some(routing),
                        Experts::Remote {
                            link, placement, ..
                        },
                    ) => {
                        let rows = dispatch(
                            link.as_ref(),
                            placement,
                            (self.m2n.members, more),
                            SlotHeader {
                                epoch: self.m2n.epoch,
                                iteration,
                                layer: l as u32,
                                micro_batch: mb as u32,
                                sender: self.id,
                            },
                            &a.normed,
                            routing,
                            d,
                        )?;
                        // The shared expert runs here while the workers run the routed ones.
                        let mut residual = with_slice(&a.residual, |s| s.to_vec())?;
                        if let Some(y) = layer.experts.forward_shared(&a.normed)? {
                            with_slice(&y, |y| add_into(&mut residual, y))?;
                        }
                        inflight[mb] = Some(InFlight { residual, rows });
                    }
                    _ => {
                        // Dense layer, or colocated: finish the layer here.
                        h[mb] = model.finish_layer(layer, a)?;
                    }
                }
            }
        }
        let last = cfg.num_layers as u32 - 1;
        let mut logits = Vec::new();
        for mb in 0..m {
            if let Some(f) = inflight[mb].take() {
                h[mb] = self.combine(iteration, last, mb as u32, f, clock)?;
            }
            // Rows that sample: the last token of each sequence whose prompt is complete.
            let mut rows = Vec::new();
            let mut ids = Vec::new();
            let mut r = 0;
            for &i in &mbs[mb] {
                let s = &out.seqs[i];
                r += s.token_ids.len();
                if s.samples {
                    rows.push(r - 1);
                    ids.push(s.id);
                }
            }
            if rows.is_empty() {
                continue;
            }
            let lg = model.logits(&h[mb], &rows)?;
            let v = cfg.vocab_size;
            for (k, id) in ids.into_iter().enumerate() {
                logits.push((id, lg[k * v..(k + 1) * v].to_vec()));
            }
        }
        Ok(logits)
    }

    /// Waits for every worker's combine of a slot and finishes the layer:
    /// residual (+ shared) + sum of the workers' weighted expert outputs.
    fn combine(
        &mut self,
        iteration: u64,
        layer: u32,
        mb: u32,
        f: InFlight,
        clock: &mut Clock,
    ) -> Result<Tensor, EngineError> {
        let Experts::Remote { link, timeout, .. } = &self.experts else {
            return Err(EngineError::Protocol(
                "combine without expert workers".into(),
            ));
        };
        let n = link.num_workers();
        let want = (iteration, layer, mb);
        clock.busy();
        let deadline = Instant::now() + *timeout;
        while self.combines.get(&want).map_or(0, |v| v.len()) < n {
            let ev = match link.recv(POLL.min(*timeout)) {
                Ok(ev) => ev,
                Err(crate::transport::TransportError::Timeout { .. })
                    if Instant::now() < deadline =>
                {
                    self.check_stop()?;
                    continue;
                }
                Err(crate::transport::TransportError::Timeout { .. }) => {
                    return Err(EngineError::Transport(
                        crate::transport::TransportError::Timeout {
                            what: format!(
                                "the expert workers for slot {want:?} (have {} of {n})",
                                self.combines.get(&want).map_or(0, |v| v.len())
                            ),
                            secs: timeout.as_secs_f64(),
                        },
                    ))
                }
                Err(e) => return Err(e.into()),
            };
            let msg = match ev {
                ToReplica::Combine(msg) => msg,
                ToReplica::Reset { epoch, why } => {
                    if epoch > self.m2n.epoch {
                        self.m2n.epoch = epoch;
                        return Err(EngineError::Interrupted(why));
                    }
                    continue;
                }
                ToReplica::Lost { why, .. } => {
                    return Err(EngineError::Transport(
                        crate::transport::TransportError::Disconnected(why),
                    ))
                }
                ToReplica::Welcome { .. } => {
                    return Err(EngineError::Protocol(format!(
                        "replica {}: a welcome while taking part in iteration {iteration}",
                        self.id
                    )))
                }
            };
            if msg.header.epoch != self.m2n.epoch {
                continue; // from an interrupted epoch
            }
            let s = msg.header.slot();
            if s < want {
                return Err(EngineError::Protocol(format!(
                    "replica {}: combine for past slot {s:?} (now at {want:?})",
                    self.id
                )));
            }
            if msg.header.sender == 0 {
                if let Some(k) = msg.next_members {
                    self.m2n.next_members = Some(k);
                }
            }
            self.combines.entry(s).or_default().push(msg);
        }
        clock.idle();
        let msgs = self.combines.remove(&want).unwrap_or_default();
        let d = self.model.cfg.hidden_size;
        let mut out = f.residual;
        let t = out.len() / d;
        let mut msgs = msgs;
        msgs.sort_by_key(|m| m.header.sender);
        for m in msgs {
            let w = m.header.sender as usize;
            let rows = f
                .rows
                .get(w)
                .ok_or_else(|| EngineError::Protocol(format!("combine from unknown worker {w}")))?;
            with_slice(&m.y, |y| -> Result<(), EngineError> {
                if y.len() != rows.len() * d {
                    return Err(EngineError::Protocol(format!(
                        "worker {w} returned {} rows for {} dispatched",
                        y.len() / d,
                        rows.len()
                    )));
                }
                for (yr, &r) in y.chunks_exact(d).zip(rows) {
                    add_into(&mut out[r * d..(r + 1) * d], yr);
                }
                Ok(())
            })??;
        }
        Ok(from_vec(out, t, d)?)
    }

    /// Samples, updates the scheduler, streams tokens and text, applies stop strings.
    fn postprocess(&mut self, logits: Vec<(RequestId, Vec<f32>)>) -> Result<(), EngineError> {
        let mut sampled = Vec::with_capacity(logits.len());
        let mut extra = Vec::with_capacity(logits.len());
        for (id, mut l) in logits {
            let s = self.sched.sample(id, &self.sampler, &mut l)?;
            sampled.push((id, s.token));
            extra.push(s);
        }
        self.generated += sampled.len() as u64;
        let finished = self.sched.update(&sampled)?;
        let mut finished: HashMap<RequestId, FinishedSeq> =
            finished.into_iter().map(|f| (f.id, f)).collect();
        let mut stopped = Vec::new();
        for ((id, tok), s) in sampled.iter().zip(extra) {
            let Some(st) = self.requests.get_mut(id) else {
                continue;
            };
            let is_final = finished.contains_key(id);
            let (text, stop_hit) = st.push_token(self.tokenizer.as_deref(), *tok, is_final)?;
            let o = RequestOutput {
                id: *id,
                token: Some(*tok),
                logprob: Some(s.logprob),
                top_logprobs: s.top_logprobs,
                text,
                finish: None,
            };
            if !st.send(o) {
                // The client went away: free its blocks.
                stopped.push((*id, FinishReason::Abort));
            } else if stop_hit {
                match finished.get_mut(id) {
                    // Finished this very step (e.g. max_tokens): the stop string still wins,
                    // as in vLLM.
                    Some(f) => f.reason = FinishReason::Stop,
                    None => stopped.push((*id, FinishReason::Stop)),
                }
            }
        }
        for (_, f) in finished {
            self.finish(f);
        }
        for (id, reason) in stopped {
            if let Ok(Some(f)) = self.sched.finish(id, reason) {
                self.finish(f);
            }
        }
        Ok(())
    }

    fn finish(&mut self, f: FinishedSeq) {
        if let Some(st) = self.requests.remove(&f.id) {
            st.finish(f);
        }
    }

    /// Ends every request with an error (the replica cannot go on).
    pub fn fail_all(&mut self, msg: &str) {
        for (id, st) in std::mem::take(&mut self.requests) {
            let _ = self.sched.abort(id);
            st.finish_error(id, msg.to_string());
        }
        self.publish_gauges();
    }

    pub fn stats_preemptions(&self) -> u64 {
        self.sched.num_preemptions()
    }
}

/// Splits one micro-batch's routed tokens by worker and sends a dispatch to every worker
/// (empty where none of its experts was chosen). Returns, per worker, the token rows sent.
fn dispatch(
    link: &dyn ReplicaLink,
    placement: &ExpertPlacement,
    (members, more): (u64, bool),
    header: SlotHeader,
    normed: &Tensor,
    routing: &tandem_model::Routing,
    d: usize,
) -> Result<Vec<Vec<usize>>, EngineError> {
    let n = link.num_workers();
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut asg: Vec<Vec<Assignment>> = vec![Vec::new(); n];
    // Local row of token t on worker w, if already sent.
    let mut local: Vec<HashMap<usize, u32>> = vec![HashMap::new(); n];
    for a in assignments_of(routing) {
        let t = a.row as usize;
        let holders = placement
            .workers
            .get(a.expert as usize)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                EngineError::Protocol(format!("expert {} is placed nowhere", a.expert))
            })?;
        // A replicated expert's tokens are split between its copies by token index.
        let w = holders[t % holders.len()] as usize;
        let r = *local[w].entry(t).or_insert_with(|| {
            rows[w].push(t);
            (rows[w].len() - 1) as u32
        });
        asg[w].push(Assignment { row: r, ..a });
    }
    with_slice(normed, |x| -> Result<(), EngineError> {
        for w in 0..n {
            let mut xb = Vec::with_capacity(rows[w].len() * d);
            for &t in &rows[w] {
                xb.extend_from_slice(&x[t * d..(t + 1) * d]);
            }
            let msg = DispatchMsg {
                header,
                members,
                more,
                x: from_vec(xb, rows[w].len(), d)?,
                assignments: std::mem::take(&mut asg[w]),
            };
            link.dispatch(w as u32, msg)?;
        }
        Ok(())
    })??;
    Ok(rows)
}

/// How often waits for peers check the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// How long a replica with work waits for an unreachable expert worker to come back.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Records a replica's preemption count into the shared stats.
pub fn record_preemptions(stats: &crate::stats::EngineStats, before: u64, after: u64) {
    stats
        .preemptions
        .fetch_add(after.saturating_sub(before), Ordering::Relaxed);
}
