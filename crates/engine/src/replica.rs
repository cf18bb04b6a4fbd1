//! An attention replica: owns its requests (scheduler), its paged KV cache, the attention
//! weights, router, lm_head and sampler, and its lanes. [`Replica::tick`] is where the
//! ping-pong lives.
//!
//! The replica's sequences are split into `m` lanes (one per micro-batch, see
//! [`tandem_sched::Scheduler::set_lanes`]). Lane `k`'s step is schedule -> the layers, with
//! its MoE layers on the expert workers as micro-batch `k` -> LM head -> sample -> update.
//!
//! With remote experts the lanes are independent chains that share this thread. Which lane
//! does what next, and every move of a lane's state, is the policy in `lanes.rs`
//! (`tandem_core::lanes`, with its state diagram): `Replica::run_lanes` asks
//! `lanes::next_action` and does it, and `Replica::apply` is the one place a lane's state
//! changes (`lanes::transition`). The protocol side is `m2n_client.rs`; this file holds the
//! lanes' data ([`LaneData`]) and runs the model. Colocated, a round starts every lane and the
//! same policy runs their layers (layer by layer and lane by lane) and finishes them.

use crate::lanes::{
    self, Action, Event, Lane, LaneShape, Membership, Progress, LM_HEAD_PARTS, SAMPLE_PARTS,
};
use crate::m2n_client::{M2nClient, Received};
use crate::output::{RequestOutput, RequestState};
use crate::stats::{Clock, EngineStats};
use crate::transport::{CombineMsg, ReplicaLink};
use crate::EngineError;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::{ExpertPlacement, Members, RequestId, Slot};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::model::add_into;
use tandem_model::{BatchLayout, KvCache, Model, SeqSlot, Tokenizer};
use tandem_sched::{FinishReason, FinishedSeq, Sampler, Scheduler, SchedulerOutput, Sequence};

/// Where a replica's routed experts run.
pub enum Experts {
    /// In this thread, on the replica's own copy (the colocated deployment).
    Local,
    /// On the expert workers, through M2N.
    Remote(Box<M2nClient>),
}

impl Experts {
    /// Remote experts for replica `replica` behind `link`.
    pub fn remote(
        replica: u32,
        link: Box<dyn ReplicaLink>,
        placement: ExpertPlacement,
        timeout: Duration,
    ) -> Self {
        Experts::Remote(Box::new(M2nClient::new(replica, link, placement, timeout)))
    }
}

/// One lane's step between its schedule and its sampling.
struct Step {
    out: SchedulerOutput,
    layout: BatchLayout,
    /// `[T, D]` hidden state after the last layer settled on this replica.
    h: Tensor,
    /// Members of the step's iteration (sent with its dispatches).
    members: Members,
}

/// Per lane: its state (see the diagram in `lanes.rs`; changed only by `Replica::apply`)
/// and the data of its step.
struct LaneData {
    state: Lane,
    /// The step in flight: there unless the lane is idle (or its step is out being finished).
    step: Option<Step>,
    /// While the lane is `Waiting`: what stays here, and the workers' combines so far.
    flight: Option<InFlight>,
    combines: Vec<CombineMsg>,
}

impl LaneData {
    fn idle() -> Self {
        Self {
            state: Lane::Idle { next_iteration: 0 },
            step: None,
            flight: None,
            combines: Vec::new(),
        }
    }
}

/// What stays on the replica while a layer's routed experts run remotely.
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
    /// One per micro-batch.
    lanes: Vec<LaneData>,
    /// Iterations started.
    steps: u64,
    /// Time spent in other lanes' layers while a lane was being finished (kept out of the
    /// LM head and sampling times).
    served: Duration,
    /// Counters shared with the engine; `local` is this replica's index in its workers.
    stats: Arc<EngineStats>,
    local: usize,
    /// Whether the model has MoE layers (else remote experts are never used).
    has_moe: bool,
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
        (stats, local): (Arc<EngineStats>, usize),
    ) -> Self {
        let m = micro_batches.max(1);
        let has_moe = (0..model.cfg.num_layers).any(|l| model.cfg.is_moe_layer(l));
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
            lanes: (0..m).map(|_| LaneData::idle()).collect(),
            steps: 0,
            served: Duration::ZERO,
            stats,
            local,
            has_moe,
        }
    }

    /// Shares the engine's stop flag (waits for peers end early once it is set).
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        if let Experts::Remote(client) = &mut self.experts {
            client.set_stop(stop);
        }
        self
    }

    /// The M2N client, when this replica takes part in the membership protocol: its routed
    /// experts are remote and the model has MoE layers.
    fn protocol(&self) -> Option<&M2nClient> {
        match &self.experts {
            Experts::Remote(c) if self.has_moe => Some(c),
            _ => None,
        }
    }

    fn protocol_mut(&mut self) -> Option<&mut M2nClient> {
        match &mut self.experts {
            Experts::Remote(c) if self.has_moe => Some(c),
            _ => None,
        }
    }

    fn is_member(&self) -> bool {
        self.protocol().is_some_and(M2nClient::is_member)
    }

    /// Whether the replica's loop should call [`Replica::tick`] now rather than wait for a
    /// command: it has requests, a step in flight, or it is a member of the next iteration
    /// (and must send its dispatches even if it has nothing to run).
    pub fn wants_to_step(&self) -> bool {
        self.is_member() || self.in_flight() || self.has_work()
    }

    /// Whether a lane holds a step that is not sampled yet.
    fn in_flight(&self) -> bool {
        self.lanes.iter().any(|l| l.state.iteration().is_some())
    }

    /// The layers of a lane and the workers each MoE layer waits for.
    fn lane_shape(&self) -> LaneShape {
        LaneShape {
            layers: self.model.cfg.num_layers,
            workers: self.protocol().map_or(0, M2nClient::workers),
        }
    }

    /// The lanes as the policy sees them.
    fn progress(&self) -> Vec<Progress> {
        let shape = self.lane_shape();
        self.lanes.iter().map(|l| l.state.progress(shape)).collect()
    }

    /// The one place a lane's state changes: `event` happened to lane `k` (the policy's
    /// transition; an event its state does not allow is a protocol error, not applied).
    fn apply(&mut self, k: usize, event: Event) -> Result<(), EngineError> {
        let shape = self.lane_shape();
        let id = self.id;
        let lane = self.lanes.get_mut(k).ok_or_else(|| {
            EngineError::Protocol(format!("replica {id}: no lane {k} for {event:?}"))
        })?;
        lane.state = lanes::transition(lane.state, event, shape)
            .map_err(|e| EngineError::Protocol(format!("replica {id}: lane {k}: {e}")))?;
        Ok(())
    }

    /// Lane `k`'s step, taken out (the lane's state says it has one).
    fn take_step(&mut self, k: usize) -> Result<Step, EngineError> {
        self.lanes[k].step.take().ok_or_else(|| {
            EngineError::Protocol(format!(
                "replica {}: lane {k} ({:?}) holds no step",
                self.id, self.lanes[k].state
            ))
        })
    }

    /// One turn of the replica's loop: join the next iteration if needed, then run a round.
    /// On an error the requests of the interrupted steps have already been failed; the
    /// replica can go on.
    pub fn tick(&mut self) -> Result<(), EngineError> {
        let preempted = self.sched.num_preemptions();
        let res = self.join_and_round();
        self.stats.preemptions.fetch_add(
            self.sched.num_preemptions().saturating_sub(preempted),
            Ordering::Relaxed,
        );
        self.stats
            .iterations
            .fetch_max(self.steps, Ordering::Relaxed);
        res
    }

    fn join_and_round(&mut self) -> Result<(), EngineError> {
        if !self.is_member() && !self.in_flight() {
            let has_work = self.has_work();
            if let Some(client) = self.protocol_mut() {
                if !has_work {
                    return Ok(());
                }
                let joined = client.join();
                match joined {
                    Ok(iteration) => {
                        for k in 0..self.lanes.len() {
                            self.apply(k, Event::Join { iteration })?;
                        }
                    }
                    Err(e) => {
                        let msg = format!("attention replica {}: {e}", self.id);
                        self.fail_all(&msg);
                        return Err(e);
                    }
                }
            }
        }
        self.round()
    }

    /// Before the replica stops: run (empty) iterations until worker 0 no longer counts it
    /// as a member, so that its departure interrupts nobody.
    pub fn leave(&mut self) {
        // A round ends after one lane's step: a few iterations of every lane.
        for _ in 0..8 * self.lanes.len() {
            if !(self.is_member() || self.in_flight()) || self.round().is_err() {
                break;
            }
        }
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

    /// One round. With the membership protocol: lanes advance as the policy says (see
    /// `lanes.rs`) until one lane has finished a step (its tokens are out) or the replica
    /// leaves; an idle lane of a member sends empty dispatches so that the expert workers
    /// can complete every slot. Colocated: every lane starts the round's iteration and the
    /// policy runs each lane's whole step.
    fn round(&mut self) -> Result<(), EngineError> {
        let stats = self.stats.clone();
        let mut clock = Clock::new(&stats.replicas[self.local], "attention", self.id as usize);
        let res = if self.protocol().is_some() {
            self.run_lanes(&mut clock)
        } else {
            self.start_round().and_then(|()| self.run_lanes(&mut clock))
        };
        if let Err(e) = &res {
            self.abandon(e);
        }
        self.publish_gauges();
        clock.busy();
        res
    }

    /// Colocated (or a model without MoE layers): every lane starts the next iteration.
    fn start_round(&mut self) -> Result<(), EngineError> {
        let iteration = self.steps;
        self.steps += 1;
        for k in 0..self.lanes.len() {
            self.start_lane(k, iteration, Members::NONE)?;
        }
        Ok(())
    }

    /// Does what the lane policy says. With the membership protocol, until one lane has
    /// finished a step or the replica is out of the membership; colocated (nothing decided,
    /// so no lane starts), until every lane's step is finished.
    fn run_lanes(&mut self, clock: &mut Clock) -> Result<(), EngineError> {
        let layers = self.model.cfg.num_layers;
        loop {
            self.poll_combines()?;
            let progress = self.progress();
            let action = match self.protocol() {
                Some(client) => lanes::next_action(&progress, layers, client.view()),
                None => lanes::next_action(&progress, layers, Membership::none(self.id)),
            };
            match action {
                Action::RunLayer(k) => self.run_layer(k)?,
                Action::Start { lane, iteration } => self.start_next(lane, iteration)?,
                Action::Finish(k) => {
                    self.finish_lane(k, clock)?;
                    if self.protocol().is_some() {
                        return Ok(());
                    }
                }
                Action::Wait => self.wait_combine(clock)?,
                Action::Leave => {
                    if let Some(client) = self.protocol_mut() {
                        client.leave();
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Starts lane `k` on `iteration` (decided, with this replica a member).
    fn start_next(&mut self, k: usize, iteration: u64) -> Result<(), EngineError> {
        let members = self
            .protocol()
            .map_or(Members::NONE, |c| c.members_of(iteration));
        // The first lane to start an iteration counts it.
        if self
            .lanes
            .iter()
            .all(|l| l.state.next_iteration() <= iteration)
        {
            self.steps += 1;
        }
        let res = self.start_lane(k, iteration, members);
        let oldest = self.lanes.iter().map(|l| l.state.next_iteration()).min();
        if let (Some(client), Some(oldest)) = (self.protocol_mut(), oldest) {
            client.forget_before(oldest);
        }
        res
    }

    /// Schedules lane `k`'s next step and embeds its tokens.
    fn start_lane(
        &mut self,
        k: usize,
        iteration: u64,
        members: Members,
    ) -> Result<(), EngineError> {
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
        let behind = self
            .lanes
            .iter()
            .filter_map(|l| l.state.iteration())
            .any(|i| i < iteration);
        if behind && !out.seqs.is_empty() {
            self.stats.overlapped_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.lanes[k].step = Some(Step {
            out,
            layout,
            h,
            members,
        });
        self.apply(k, Event::Start { iteration })
    }

    /// Lane `k`'s next layer: its pending combine first, if any, then attention, then the
    /// experts (dispatched, or here for a dense layer or colocated).
    fn run_layer(&mut self, k: usize) -> Result<(), EngineError> {
        self.settle(k)?;
        let state = self.lanes[k].state;
        let (Some(l), Some(iteration)) = (state.runnable_layer(), state.iteration()) else {
            return Err(EngineError::Protocol(format!(
                "replica {}: lane {k} ({state:?}) has no layer to run",
                self.id
            )));
        };
        let mut step = self.take_step(k)?;
        let res = self.layer(Slot::new(iteration, l as u32, k as u32), &mut step);
        // On an error the step stays (`abandon` fails its sequences).
        self.lanes[k].step = Some(step);
        match res? {
            Some(flight) => {
                self.lanes[k].flight = Some(flight);
                self.apply(k, Event::Dispatched)
            }
            None => self.apply(k, Event::RanHere),
        }
    }

    /// Layer `slot.layer` of lane `slot.micro_batch`'s step: attention, then the routed
    /// experts dispatched (what stays here is returned) or run here.
    fn layer(&mut self, slot: Slot, step: &mut Step) -> Result<Option<InFlight>, EngineError> {
        let l = slot.layer as usize;
        let model = self.model.clone();
        let layer = &model.layers[l];
        let a = layer.attention.forward(
            &step.h,
            &step.layout,
            &mut self.kv.layers[l],
            self.kv.block_size,
        )?;
        let (Some(routing), Some(client)) = (&a.routing, self.protocol()) else {
            // Dense layer, or colocated: finish the layer here.
            step.h = model.finish_layer(layer, a)?;
            return Ok(None);
        };
        let rows = client.dispatch(
            slot,
            step.members,
            // Worker 0 reads `more` on the decision slot: keep this replica a member? Asked
            // now, after the latest samples, not when the step started.
            self.has_work(),
            &a.normed,
            routing,
            model.cfg.hidden_size,
        )?;
        // The shared expert runs here while the workers run the routed ones.
        let mut residual = with_slice(&a.residual, |s| s.to_vec())?;
        if let Some(y) = layer.experts.forward_shared(&a.normed)? {
            with_slice(&y, |y| add_into(&mut residual, y))?;
        }
        Ok(Some(InFlight { residual, rows }))
    }

    /// If lane `k` waits on a slot (every worker's combine is here): its combine becomes the
    /// lane's hidden state.
    fn settle(&mut self, k: usize) -> Result<(), EngineError> {
        let Lane::Waiting {
            iteration, layer, ..
        } = self.lanes[k].state
        else {
            return Ok(());
        };
        self.apply(k, Event::Settled)?;
        let slot = Slot::new(iteration, layer as u32, k as u32);
        let lane = &mut self.lanes[k];
        let combines = std::mem::take(&mut lane.combines);
        let flight = lane.flight.take().ok_or_else(|| {
            EngineError::Protocol(format!("replica {}: slot {slot} has no flight", self.id))
        })?;
        let h = self.combine(flight, combines)?;
        if let Some(step) = self.lanes[k].step.as_mut() {
            step.h = h;
        }
        Ok(())
    }

    /// Ends lane `k`'s step: its last combine, the LM head over the rows that sample
    /// (sequences aborted meanwhile skipped), sampling, the scheduler's update, and the
    /// tokens to the clients.
    fn finish_lane(&mut self, k: usize, clock: &mut Clock) -> Result<(), EngineError> {
        self.settle(k)?;
        if !matches!(self.lanes[k].state, Lane::Done { .. }) {
            // Refused by the transition, which names the lane's state.
            return self.apply(k, Event::Finished);
        }
        let step = self.take_step(k)?;
        let res = self.sample_step(k, &step, clock);
        if res.is_err() {
            // `abandon` fails its sequences.
            self.lanes[k].step = Some(step);
            return res;
        }
        self.apply(k, Event::Finished)
    }

    fn sample_step(&mut self, k: usize, step: &Step, clock: &mut Clock) -> Result<(), EngineError> {
        // Rows that sample: the last token of each live sequence whose prompt is complete.
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        let mut r = 0;
        for s in &step.out.seqs {
            r += s.token_ids.len();
            if s.samples && self.sched.sequence(s.id).is_some() {
                rows.push(r - 1);
                ids.push(s.id);
            }
        }
        let logits = if rows.is_empty() {
            Vec::new()
        } else if self.interleaves() {
            self.logits_serving(k, &step.h, &rows, clock)?
        } else {
            let t = Instant::now();
            let logits = self.model.logits(&step.h, &rows)?;
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
    /// (the membership protocol and more than one lane).
    fn interleaves(&self) -> bool {
        self.protocol().is_some() && self.lanes.len() > 1
    }

    /// While lane `busy` is being finished: runs the next layer of every other lane whose
    /// combine has arrived, so the expert workers get their next dispatch now.
    fn serve_others(&mut self, busy: usize) -> Result<(), EngineError> {
        let t = Instant::now();
        let layers = self.model.cfg.num_layers;
        self.poll_combines()?;
        while let Some(j) = lanes::interleave(&self.progress(), layers, busy) {
            self.run_layer(j)?;
            self.stats
                .interleaved_layers
                .fetch_add(1, Ordering::Relaxed);
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
            let lane = &mut self.lanes[k];
            lane.flight = None;
            lane.combines.clear();
            if let Some(step) = lane.step.take() {
                for s in &step.out.seqs {
                    let _ = self.sched.abort(s.id);
                    if let Some(st) = self.requests.remove(&s.id) {
                        st.finish_error(s.id, msg.clone());
                    }
                }
            }
            // Never refused: every state may be abandoned.
            let _ = self.apply(k, Event::Abandoned);
            // Every sequence of the step is gone: this closes it.
            let _ = self.sched.update_lane(k, &[]);
        }
        if let Some(client) = self.protocol_mut() {
            client.abandon(e);
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
        loop {
            let got = match self.protocol_mut() {
                Some(client) => client.recv(Duration::ZERO)?,
                None => return Ok(()),
            };
            if matches!(got, Received::Nothing) {
                return Ok(());
            }
            self.accept(got)?;
        }
    }

    /// Waits for the next message from the expert workers (some lane waits for a combine).
    fn wait_combine(&mut self, clock: &mut Clock) -> Result<(), EngineError> {
        let waiting: Vec<Slot> = (self.lanes.iter().enumerate())
            .filter_map(|(k, l)| match l.state {
                Lane::Waiting {
                    iteration, layer, ..
                } => Some(Slot::new(iteration, layer as u32, k as u32)),
                _ => None,
            })
            .collect();
        let Some(client) = self.protocol_mut() else {
            return Err(EngineError::Protocol(
                "waiting for a combine without expert workers".into(),
            ));
        };
        clock.busy();
        let got = client.wait(|| {
            let slots: Vec<String> = waiting.iter().map(Slot::to_string).collect();
            format!("the expert workers for slots {}", slots.join(", "))
        })?;
        clock.idle();
        self.accept(got)
    }

    /// Keeps a combine for the lane waiting on its slot; a combine no lane waits for (or a
    /// second one from the same worker) is a protocol error.
    fn accept(&mut self, got: Received) -> Result<(), EngineError> {
        let Received::Combine(msg) = got else {
            return Ok(());
        };
        let slot = msg.header.slot;
        let sender = msg.header.sender;
        let (k, id) = (slot.micro_batch as usize, self.id);
        let refuse = |why: String| {
            EngineError::Protocol(format!(
                "replica {id}: a combine from worker {sender} for slot {slot}, which none of its lanes waits for ({why})"
            ))
        };
        let duplicate = (self.lanes.get(k))
            .is_some_and(|l| l.combines.iter().any(|c| c.header.sender == sender));
        if duplicate {
            return Err(refuse("a second one from that worker".into()));
        }
        let event = Event::Combine {
            iteration: slot.iteration,
            layer: slot.layer as usize,
        };
        self.apply(k, event).map_err(|e| refuse(e.to_string()))?;
        self.lanes[k].combines.push(msg);
        Ok(())
    }

    /// A layer's output from every worker's combine of its slot (all here: the `Settled`
    /// transition checked it): residual (+ shared) + the sum of the workers' weighted expert
    /// outputs.
    fn combine(&self, f: InFlight, mut msgs: Vec<CombineMsg>) -> Result<Tensor, EngineError> {
        let d = self.model.cfg.hidden_size;
        let mut out = f.residual;
        let t = out.len() / d;
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
        self.stats
            .generated_tokens
            .fetch_add(sampled.len() as u64, Ordering::Relaxed);
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
}
