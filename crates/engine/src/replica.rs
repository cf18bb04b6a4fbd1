//! An attention replica: owns its requests (scheduler), its paged KV cache, the attention
//! weights, router, lm_head and sampler. [`Replica::round`] is where the ping-pong lives.
//!
//! The replica's sequences are split into `m` lanes (one per micro-batch, see
//! [`tandem_sched::Scheduler::set_lanes`]). Lane `k`'s step is schedule -> the layers, with
//! its MoE layers on the expert workers as micro-batch `k` -> LM head -> sample -> update
//! (STYLE item 4).
//!
//! With remote experts the lanes are independent chains that share this thread: whenever a
//! lane's combine is here, its next layer runs (attention, then the dispatch that gives the
//! expert workers their next slot); a lane done with its layers is finished (LM head,
//! sampling, update) and starts its next step. While one lane's LM head runs, in vocabulary
//! chunks, the other lanes' layers run between the chunks as their combines arrive, so the
//! expert workers are not left waiting for a whole LM head. Lanes therefore drift apart by
//! a few layers and across iterations; the expert workers take slots in the order their
//! dispatches complete. Colocated, a round runs layer by layer and lane by lane.

use crate::output::{RequestOutput, RequestState};
use crate::stats::{Clock, WorkerStats};
use crate::transport::{CombineMsg, DispatchMsg, ReplicaLink, SlotHeader, ToReplica, ToWorker};
use crate::EngineError;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::{ExpertPlacement, RequestId};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::model::{add_into, assignments_of};
use tandem_model::{Assignment, BatchLayout, KvCache, Model, SeqSlot, Tokenizer};
use tandem_sched::{FinishReason, FinishedSeq, Sampler, Scheduler, SchedulerOutput, Sequence};

/// One lane's step between its schedule and its sampling.
struct Lane {
    out: SchedulerOutput,
    layout: BatchLayout,
    /// `[T, D]` hidden state after the last layer finished on this replica.
    h: Tensor,
    /// The MoE layer dispatched and not yet combined.
    pending: Option<(u32, InFlight)>,
    iteration: u64,
    /// The next layer to run; the number of layers once all have run.
    next_layer: usize,
    /// Members of the lane's iteration (sent with its dispatches).
    members: u64,
}

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
    pub requests: HashMap<RequestId, RequestState>,
    /// One per micro-batch: the step in flight, if any.
    lanes: Vec<Option<Lane>>,
    combines: HashMap<(u64, u32, u32), Vec<CombineMsg>>,
    /// Tokens sampled so far (read into the engine stats after each step).
    pub generated: u64,
    /// Iterations run.
    pub steps: u64,
    /// Lane steps started while another lane's previous step was still with the experts.
    pub overlapped: u64,
    /// Layers run between the LM head parts or sampling of another lane.
    pub interleaved: u64,
    /// Time spent in those layers (kept out of the LM head and sampling times).
    served: Duration,
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
    join_outstanding: bool,
    /// Members of the iterations this replica knows of: the one it was welcomed to, then
    /// each next one from worker 0's combine of the decision slot (the first micro-batch of
    /// the last MoE layer).
    decided: BTreeMap<u64, u64>,
    /// Per lane: the iteration its next step runs (meaningful while a member).
    next: Vec<u64>,
}

impl Replica {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        mut sched: Scheduler,
        kv: KvCache,
        sampler: Sampler,
        experts: Experts,
        micro_batches: usize,
    ) -> Self {
        let m = micro_batches.max(1);
        // A fresh scheduler has no step in flight: this cannot fail.
        let lanes = sched.set_lanes(m);
        debug_assert!(lanes.is_ok());
        Self {
            id,
            model,
            tokenizer,
            sched,
            kv,
            sampler,
            experts,
            requests: HashMap::new(),
            lanes: (0..m).map(|_| None).collect(),
            combines: HashMap::new(),
            generated: 0,
            steps: 0,
            overlapped: 0,
            interleaved: 0,
            served: Duration::ZERO,
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
    /// command: it has requests, a step in flight, or it is a member of the next iteration
    /// (and must send its dispatches even if it has nothing to run).
    pub fn wants_to_step(&self) -> bool {
        self.m2n.member || self.in_flight() || self.has_work()
    }

    /// Whether a lane holds a step that is not sampled yet.
    fn in_flight(&self) -> bool {
        self.lanes.iter().any(Option::is_some)
    }

    /// One turn of the replica's loop: join the next iteration if needed, then run a round.
    /// On an error the requests of the interrupted steps have already been failed; the
    /// replica can go on.
    pub fn tick(&mut self, stats: &WorkerStats) -> Result<(), EngineError> {
        if self.uses_protocol() && !self.m2n.member && !self.in_flight() {
            if !self.has_work() {
                return Ok(());
            }
            if let Err(e) = self.join() {
                let msg = format!("attention replica {}: {e}", self.id);
                self.fail_all(&msg);
                return Err(e);
            }
        }
        self.round(stats)
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
                        join_outstanding: false,
                        decided: BTreeMap::from([(iteration, members)]),
                        next: vec![iteration; self.lanes.len()],
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
        // A round ends after one lane's step: a few iterations of every lane.
        for _ in 0..8 * self.lanes.len() {
            if !(self.m2n.member || self.in_flight()) || self.round(stats).is_err() {
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

    /// One round. With remote experts: lanes advance as their combines arrive (see the module
    /// docs) until one lane has finished a step (its tokens are out) or nothing can go on.
    /// With the membership protocol the replica runs the M2N protocol even with nothing
    /// scheduled (an idle lane sends empty dispatches so that the expert workers can complete
    /// every slot). Colocated: every lane runs a whole step, layer by layer and lane by lane.
    fn round(&mut self, stats: &WorkerStats) -> Result<(), EngineError> {
        let mut clock = Clock::new(stats, "attention", self.id as usize);
        let res = if self.uses_protocol() {
            self.run_lanes(&mut clock)
        } else {
            self.run_round(&mut clock)
        };
        if let Err(e) = &res {
            self.abandon(e);
        }
        self.publish_gauges();
        clock.busy();
        res
    }

    /// Colocated (or a model without MoE layers): one step of every lane.
    fn run_round(&mut self, clock: &mut Clock) -> Result<(), EngineError> {
        let iteration = self.steps;
        self.steps += 1;
        let lanes = self.lanes.len();
        for k in 0..lanes {
            self.start_lane(k, iteration, 0)?;
        }
        for l in 0..self.model.cfg.num_layers {
            for k in 0..lanes {
                self.lane_layer(l, k)?;
            }
        }
        for k in 0..lanes {
            self.finish_lane(k, clock)?;
        }
        Ok(())
    }

    /// Remote experts: runs whatever lane can go on, most urgent first, until one lane has
    /// finished a step or nothing can go on.
    fn run_lanes(&mut self, clock: &mut Clock) -> Result<(), EngineError> {
        loop {
            self.poll_combines()?;
            // A lane whose combine is here: its next layer feeds the expert workers.
            if let Some(k) = self.ready_lane(None, false) {
                let l = self.lanes[k].as_ref().map_or(0, |x| x.next_layer);
                self.lane_layer(l, k)?;
                continue;
            }
            // An idle lane whose next iteration is decided: start it (its first layer next).
            if let Some(k) = self.startable() {
                self.start_next(k)?;
                continue;
            }
            // A lane done with its layers: LM head (other lanes' layers between its chunks),
            // sampling, tokens out.
            if let Some(k) = self.ready_lane(None, true) {
                self.finish_lane(k, clock)?;
                return Ok(());
            }
            if self.lanes.iter().flatten().any(|l| l.pending.is_some()) {
                self.wait_combine(clock)?;
                continue;
            }
            // Nothing in flight and no lane may start: this replica is out of the next
            // iteration (worker 0 left it out), so it is no longer a member.
            self.m2n.member = false;
            self.m2n.decided.clear();
            return Ok(());
        }
    }

    /// Starts lane `k` on its next iteration (decided, with this replica a member).
    fn start_next(&mut self, k: usize) -> Result<(), EngineError> {
        let it = self.m2n.next[k];
        let members = self.m2n.decided.get(&it).copied().unwrap_or(0);
        // The first lane to start an iteration counts it.
        if self.m2n.next.iter().all(|n| *n <= it) {
            self.steps += 1;
        }
        self.m2n.next[k] = it + 1;
        // Forget iterations no lane will start again.
        let oldest = self.m2n.next.iter().copied().min().unwrap_or(it);
        self.m2n.decided.retain(|i, _| *i >= oldest);
        self.start_lane(k, it, members)
    }

    /// Whether the combines of lane `k`'s pending slot, if any, are all here.
    fn combined(&self, k: usize, lane: &Lane) -> bool {
        let Some((pl, _)) = &lane.pending else {
            return true;
        };
        let n = match &self.experts {
            Experts::Remote { link, .. } => link.num_workers(),
            Experts::Local => 0,
        };
        self.combines
            .get(&(lane.iteration, *pl, k as u32))
            .map_or(0, Vec::len)
            >= n
    }

    /// A lane (other than `except`) whose input is here, with layers left (`finished`:
    /// done with its layers); the one furthest behind first.
    fn ready_lane(&self, except: Option<usize>, finished: bool) -> Option<usize> {
        let layers = self.model.cfg.num_layers;
        (0..self.lanes.len())
            .filter(|k| Some(*k) != except)
            .filter_map(|k| self.lanes[k].as_ref().map(|l| (k, l)))
            .filter(|(k, l)| (l.next_layer >= layers) == finished && self.combined(*k, l))
            .min_by_key(|(k, l)| (l.iteration, l.next_layer, *k))
            .map(|(k, _)| k)
    }

    /// An idle lane whose next iteration is decided and includes this replica, and that every
    /// other lane has reached: a lane starts iteration `i` only once all the others have
    /// started `i - 1`, so lanes stay within an iteration of each other (a lane with nothing
    /// to run would otherwise race ahead through empty iterations).
    fn startable(&self) -> Option<usize> {
        if !self.m2n.member || self.m2n.next.len() != self.lanes.len() {
            return None;
        }
        let me = 1u64 << self.id;
        let next = &self.m2n.next;
        (0..self.lanes.len())
            .filter(|k| self.lanes[*k].is_none())
            .filter(|k| next.iter().all(|n| *n >= next[*k]))
            .filter(|k| {
                self.m2n
                    .decided
                    .get(&self.m2n.next[*k])
                    .is_some_and(|m| m & me != 0)
            })
            .min_by_key(|k| (self.m2n.next[*k], *k))
    }

    /// Schedules lane `k`'s next step and embeds its tokens.
    fn start_lane(&mut self, k: usize, iteration: u64, members: u64) -> Result<(), EngineError> {
        let out = self.sched.schedule_lane(k)?;
        for id in &out.preempted {
            tracing::debug!(replica = self.id, request = id.0, "preempted (recompute)");
            metrics::counter!("tandem_preemptions_total").increment(1);
        }
        let layout = BatchLayout {
            seqs: out
                .seqs
                .iter()
                .map(|s| SeqSlot {
                    start_pos: s.start_pos,
                    num_tokens: s.token_ids.len(),
                    block_table: s.block_table.clone(),
                })
                .collect(),
        };
        let toks: Vec<u32> = out
            .seqs
            .iter()
            .flat_map(|s| s.token_ids.iter().copied())
            .collect();
        let h = self.model.embed(&toks)?;
        let behind = self.lanes.iter().flatten().any(|l| l.iteration < iteration);
        if behind && !out.seqs.is_empty() {
            self.overlapped += 1;
        }
        self.lanes[k] = Some(Lane {
            out,
            layout,
            h,
            pending: None,
            iteration,
            next_layer: 0,
            members,
        });
        Ok(())
    }

    /// Lane `k`'s part of layer `l`: the previous MoE layer's combine if one is pending,
    /// attention, then the experts (dispatched, or here for a dense layer or colocated).
    fn lane_layer(&mut self, l: usize, k: usize) -> Result<(), EngineError> {
        let mut lane = self.lanes[k]
            .take()
            .ok_or_else(|| EngineError::Protocol(format!("lane {k} runs no step")))?;
        let res = self.lane_layer_inner(l, k, &mut lane);
        self.lanes[k] = Some(lane);
        res
    }

    fn lane_layer_inner(&mut self, l: usize, k: usize, lane: &mut Lane) -> Result<(), EngineError> {
        self.settle(k, lane)?;
        let model = self.model.clone();
        let layer = &model.layers[l];
        let a = layer.attention.forward(
            &lane.h,
            &lane.layout,
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
                    // Worker 0 reads `more` on the decision slot: keep this replica a member?
                    // Asked now, after the latest samples, not when the step started.
                    (lane.members, self.has_work()),
                    SlotHeader {
                        epoch: self.m2n.epoch,
                        iteration: lane.iteration,
                        layer: l as u32,
                        micro_batch: k as u32,
                        sender: self.id,
                    },
                    &a.normed,
                    routing,
                    model.cfg.hidden_size,
                )?;
                // The shared expert runs here while the workers run the routed ones.
                let mut residual = with_slice(&a.residual, |s| s.to_vec())?;
                if let Some(y) = layer.experts.forward_shared(&a.normed)? {
                    with_slice(&y, |y| add_into(&mut residual, y))?;
                }
                lane.pending = Some((l as u32, InFlight { residual, rows }));
            }
            // Dense layer, or colocated: finish the layer here.
            _ => lane.h = model.finish_layer(layer, a)?,
        }
        lane.next_layer = l + 1;
        Ok(())
    }

    /// Applies lane `k`'s pending combine, if any (every worker's is here), as the lane's
    /// hidden state.
    fn settle(&mut self, k: usize, lane: &mut Lane) -> Result<(), EngineError> {
        if let Some((pl, f)) = lane.pending.take() {
            lane.h = self.combine(lane.iteration, pl, k as u32, f)?;
        }
        Ok(())
    }

    /// Ends lane `k`'s step, if it has one: its last combine, the LM head over the rows that
    /// sample (sequences aborted meanwhile skipped), sampling, the scheduler's update, and
    /// the tokens to the clients.
    fn finish_lane(&mut self, k: usize, clock: &mut Clock) -> Result<(), EngineError> {
        let Some(mut lane) = self.lanes[k].take() else {
            return Ok(());
        };
        let res = self.finish_lane_inner(k, &mut lane, clock);
        if res.is_err() {
            // `abandon` fails its sequences.
            self.lanes[k] = Some(lane);
        }
        res
    }

    fn finish_lane_inner(
        &mut self,
        k: usize,
        lane: &mut Lane,
        clock: &mut Clock,
    ) -> Result<(), EngineError> {
        self.settle(k, lane)?;
        // Rows that sample: the last token of each live sequence whose prompt is complete.
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        let mut r = 0;
        for s in &lane.out.seqs {
            r += s.token_ids.len();
            if s.samples && self.sched.sequence(s.id).is_some() {
                rows.push(r - 1);
                ids.push(s.id);
            }
        }
        let logits = if rows.is_empty() {
            Vec::new()
        } else if self.interleaves() {
            self.logits_serving(k, &lane.h, &rows, clock)?
        } else {
            let t = Instant::now();
            let logits = self.model.logits(&lane.h, &rows)?;
            clock.lm_head(t.elapsed());
            logits
        };
        let (t, served) = (Instant::now(), self.served);
        let res = self.postprocess(k, &ids, logits);
        clock.sample(t.elapsed().saturating_sub(self.served - served));
        res
    }

    /// Lane `k`'s logits (`[rows.len(), V]`), [`LM_HEAD_PARTS`] vocabulary ranges at a time,
    /// running the other lanes' layers whose combines arrived between the parts.
    fn logits_serving(
        &mut self,
        k: usize,
        h: &Tensor,
        rows: &[usize],
        clock: &mut Clock,
    ) -> Result<Vec<f32>, EngineError> {
        let model = self.model.clone();
        let x = model.lm_head_input(h, rows)?;
        let v = model.cfg.vocab_size;
        let step = v
            .div_ceil(LM_HEAD_PARTS)
            .next_multiple_of(tandem_model::packed::NR);
        let mut logits = vec![0f32; rows.len() * v];
        let mut c0 = 0;
        while c0 < v {
            let c1 = (c0 + step).min(v);
            let t = Instant::now();
            model
                .lm_head
                .forward_cols(&x, rows.len(), c0..c1, &mut logits);
            clock.lm_head(t.elapsed());
            c0 = c1;
            self.serve_others(k)?;
        }
        Ok(logits)
    }

    /// Whether other lanes' layers run between the parts of a lane's LM head and sampling
    /// (remote experts and more than one lane).
    fn interleaves(&self) -> bool {
        self.uses_protocol() && self.lanes.len() > 1
    }

    /// While lane `busy` is being finished: runs the next layer of every other lane whose
    /// combine has arrived, so the expert workers get their next dispatch now.
    fn serve_others(&mut self, busy: usize) -> Result<(), EngineError> {
        let t = Instant::now();
        self.poll_combines()?;
        while let Some(j) = self.ready_lane(Some(busy), false) {
            let l = self.lanes[j].as_ref().map_or(0, |x| x.next_layer);
            self.lane_layer(l, j)?;
            self.interleaved += 1;
            self.poll_combines()?;
        }
        self.served += t.elapsed();
        Ok(())
    }

    /// After an error: every step in flight is lost; its sequences end with the error (the
    /// others wait), and the replica leaves the membership (and tells worker 0 unless the
    /// failure came from it).
    fn abandon(&mut self, e: &EngineError) {
        let msg = format!("attention replica {}: {e}", self.id);
        for k in 0..self.lanes.len() {
            if let Some(lane) = self.lanes[k].take() {
                for s in &lane.out.seqs {
                    let _ = self.sched.abort(s.id);
                    if let Some(st) = self.requests.remove(&s.id) {
                        st.finish_error(s.id, msg.clone());
                    }
                }
            }
            // Every sequence of the step is gone: this closes it.
            let _ = self.sched.update_lane(k, &[]);
        }
        self.combines.clear();
        if self.uses_protocol() {
            self.m2n.member = false;
            self.m2n.decided.clear();
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

    /// Takes every message from the expert workers that is already here.
    fn poll_combines(&mut self) -> Result<(), EngineError> {
        while self.recv_one(Duration::ZERO)? {}
        Ok(())
    }

    /// Waits for the next message from the expert workers (some lane waits for a combine).
    fn wait_combine(&mut self, clock: &mut Clock) -> Result<(), EngineError> {
        let Experts::Remote { timeout, .. } = &self.experts else {
            return Err(EngineError::Protocol(
                "waiting for a combine without expert workers".into(),
            ));
        };
        let timeout = *timeout;
        clock.busy();
        let deadline = Instant::now() + timeout;
        while !self.recv_one(POLL.min(timeout))? {
            if Instant::now() >= deadline {
                let waiting: Vec<(u64, u32, usize)> = (0..self.lanes.len())
                    .filter_map(|k| {
                        let l = self.lanes[k].as_ref()?;
                        l.pending.as_ref().map(|(pl, _)| (l.iteration, *pl, k))
                    })
                    .collect();
                return Err(EngineError::Transport(
                    crate::transport::TransportError::Timeout {
                        what: format!("the expert workers for slots {waiting:?}"),
                        secs: timeout.as_secs_f64(),
                    },
                ));
            }
            self.check_stop()?;
        }
        clock.idle();
        Ok(())
    }

    /// Receives one message from the expert workers, waiting up to `wait`; `false` if none
    /// came. A combine is kept for its lane; worker 0's decision about the next iteration is
    /// noted; a reset or a lost worker ends the round with an error.
    fn recv_one(&mut self, wait: Duration) -> Result<bool, EngineError> {
        let Experts::Remote { link, .. } = &self.experts else {
            return Ok(false);
        };
        let ev = match link.recv(wait) {
            Ok(ev) => ev,
            Err(crate::transport::TransportError::Timeout { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let msg = match ev {
            ToReplica::Combine(msg) => msg,
            ToReplica::Reset { epoch, why } => {
                if epoch > self.m2n.epoch {
                    self.m2n.epoch = epoch;
                    return Err(EngineError::Interrupted(why));
                }
                return Ok(true);
            }
            ToReplica::Lost { why, .. } => {
                return Err(EngineError::Transport(
                    crate::transport::TransportError::Disconnected(why),
                ))
            }
            ToReplica::Welcome { .. } => {
                return Err(EngineError::Protocol(format!(
                    "replica {}: a welcome while taking part in the pipeline",
                    self.id
                )))
            }
        };
        if msg.header.epoch != self.m2n.epoch {
            return Ok(true); // from an interrupted epoch
        }
        let s = msg.header.slot();
        let awaited = self
            .lanes
            .get(s.2 as usize)
            .and_then(Option::as_ref)
            .is_some_and(|l| {
                l.iteration == s.0 && l.pending.as_ref().is_some_and(|(pl, _)| *pl == s.1)
            });
        let got = self.combines.entry(s).or_default();
        if !awaited || got.iter().any(|m| m.header.sender == msg.header.sender) {
            return Err(EngineError::Protocol(format!(
                "replica {}: a combine from worker {} for slot {s:?}, which none of its lanes waits for",
                self.id, msg.header.sender
            )));
        }
        if msg.header.sender == 0 {
            if let Some(k) = msg.next_members {
                self.m2n.decided.insert(s.0 + 1, k);
            }
        }
        got.push(msg);
        Ok(true)
    }

    /// Finishes lane `mb`'s layer from every worker's combine of its slot (all here):
    /// residual (+ shared) + sum of the workers' weighted expert outputs.
    fn combine(
        &mut self,
        iteration: u64,
        layer: u32,
        mb: u32,
        f: InFlight,
    ) -> Result<Tensor, EngineError> {
        let Experts::Remote { link, .. } = &self.experts else {
            return Err(EngineError::Protocol(
                "combine without expert workers".into(),
            ));
        };
        let n = link.num_workers();
        let want = (iteration, layer, mb);
        if self.combines.get(&want).map_or(0, Vec::len) < n {
            return Err(EngineError::Protocol(format!(
                "replica {}: slot {want:?} settled before every worker's combine arrived",
                self.id
            )));
        }
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

    /// Samples lane `lane`'s tokens (`logits` is `[ids.len(), V]`), updates the scheduler,
    /// streams tokens and text, applies stop strings.
    fn postprocess(
        &mut self,
        lane: usize,
        ids: &[RequestId],
        mut logits: Vec<f32>,
    ) -> Result<(), EngineError> {
        let mut sampled = Vec::with_capacity(ids.len());
        let mut extra = Vec::with_capacity(ids.len());
        let v = self.model.cfg.vocab_size;
        // With other lanes in flight, they get a chance to run every few rows.
        let serve = self.interleaves();
        let group = ids.len().div_ceil(SAMPLE_PARTS).max(1);
        for (i, (&id, l)) in ids
            .iter()
            .zip(logits.chunks_exact_mut(v.max(1)))
            .enumerate()
        {
            let s = self.sched.sample(id, &self.sampler, l)?;
            sampled.push((id, s.token));
            extra.push(s);
            if serve && (i + 1) % group == 0 {
                self.serve_others(lane)?;
            }
        }
        self.generated += sampled.len() as u64;
        let finished = self.sched.update_lane(lane, &sampled)?;
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

/// Parts of an LM head computed between chances for the other lanes to run (see
/// [`Replica::logits_serving`]); on the demo model's 32k vocabulary and 64 rows, about 4 ms
/// each.
const LM_HEAD_PARTS: usize = 16;

/// Parts of a lane's sampling between chances for the other lanes to run.
const SAMPLE_PARTS: usize = 4;

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
