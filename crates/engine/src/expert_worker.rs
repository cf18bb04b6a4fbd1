//! An expert worker: for every pipeline slot (iteration, MoE layer, micro-batch) it waits for
//! the dispatch of every **member** replica of that iteration (a member with nothing routed
//! here sends an empty one), concatenates their rows, runs each of its experts once on all the
//! rows routed to it, and returns to each replica the weighted sums for its rows. Aggregating
//! across replicas is what makes the expert GEMMs bigger. Slots are taken as they complete
//! (the smallest complete one first), not in a fixed order: a replica's micro-batches are
//! independent lanes that drift apart.
//!
//! Worker 0 also decides who the members are (see the protocol in `transport.rs`).

use crate::stats::{Clock, WorkerStats};
use crate::transport::{CombineMsg, DispatchMsg, ExpertLink, SlotHeader, ToReplica, ToWorker};
use crate::EngineError;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tandem_core::{Members, Slot};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::stages::routed_ffn;
use tandem_model::{Assignment, Model};

pub struct ExpertWorker {
    pub id: u32,
    pub model: Arc<Model>,
    pub link: Box<dyn ExpertLink>,
    pub micro_batches: u32,
    /// Experts this worker holds (checked against each assignment).
    pub experts: Vec<u32>,
    /// Worker 0's first epoch (others follow the replicas' messages).
    pub initial_epoch: u64,
    /// On a replica's protocol violation: log it and start over (network deployments) instead
    /// of stopping with an error (in-process, where it can only be a bug).
    pub recover: bool,
    /// Where the worker publishes its state for status queries.
    pub status: Arc<Mutex<WorkerStatus>>,
}

/// What a status query sees.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WorkerStatus {
    pub worker: u32,
    pub epoch: u64,
    /// The slot the worker waits for.
    pub waiting_for: Option<Slot>,
    /// Members of that slot's iteration (replica ids), when known.
    pub members: Option<Vec<u32>>,
    pub slots_done: u64,
    pub epochs_started: u64,
    pub protocol_errors: u64,
}

/// The worker's view of the pipeline. Slots are processed as soon as every member's dispatch
/// for them is here, the smallest `(iteration, layer, micro-batch)` first: a replica runs its
/// micro-batches as independent lanes (one can be layers ahead of another, or already in the
/// next iteration), and each lane waits only for its own combines, so a slot never waits for
/// another lane's.
struct State {
    epoch: u64,
    /// Members of every iteration in progress (worker 0 decides them; the others read them
    /// from the dispatches). Worker 0 also keeps its newest decided iteration here, even with
    /// no members (the deployment is idle).
    members: BTreeMap<u64, Members>,
    /// Slots processed, per iteration in progress.
    done: HashMap<u64, HashSet<(u32, u32)>>,
    /// The latest [`RECENT`] iterations that completed (every slot processed): a dispatch for
    /// one of them, or for an iteration older than all of them once the window is full, is a
    /// protocol error. (Not "older than the newest completed": iterations of different
    /// replicas can complete out of order, e.g. a replica welcomed into `i + 1` while the
    /// dispatches of another replica's `i` are still on their way to this worker.)
    completed: BTreeSet<u64>,
    pending: HashMap<Slot, Vec<DispatchMsg>>,
    /// Worker 0: its newest decided iteration (the next one is decided on this one's
    /// decision slot).
    head: u64,
    /// Worker 0: replicas waiting to join at the next iteration.
    joins: Members,
}

impl State {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            members: BTreeMap::new(),
            done: HashMap::new(),
            completed: BTreeSet::new(),
            pending: HashMap::new(),
            head: 0,
            joins: Members::NONE,
        }
    }

    fn reset(&mut self) {
        self.members.clear();
        self.done.clear();
        self.pending.clear();
        self.completed.clear();
    }

    /// Whether `it` is over (see `completed`).
    fn is_past(&self, it: u64) -> bool {
        !self.members.contains_key(&it)
            && (self.completed.contains(&it)
                || (self.completed.len() >= RECENT
                    && self.completed.first().is_some_and(|f| it < *f)))
    }

    fn complete(&mut self, it: u64) {
        self.done.remove(&it);
        self.members.remove(&it);
        self.completed.insert(it);
        while self.completed.len() > RECENT {
            self.completed.pop_first();
        }
    }

    /// The smallest slot not yet processed of the oldest iteration with members (for status).
    fn waiting_for(&self, moe_layers: &[u32], m: u32) -> Option<Slot> {
        let (&it, _) = self.members.iter().find(|(_, v)| !v.is_empty())?;
        let done = self.done.get(&it);
        moe_layers
            .iter()
            .flat_map(|&l| (0..m).map(move |mb| (l, mb)))
            .find(|s| done.is_none_or(|d| !d.contains(s)))
            .map(|(l, mb)| Slot::new(it, l, mb))
    }
}

/// How many completed iterations a worker remembers (to refuse stale dispatches).
const RECENT: usize = 64;

/// The slot on which worker 0 decides the next iteration's members: the first micro-batch of
/// the last MoE layer. Its combine is the one lane 0 of a replica waits for before it samples
/// and starts the next iteration; the replica's other lanes start it after lane 0.
fn decides(slot: Slot, moe_layers: &[u32]) -> bool {
    slot.micro_batch == 0 && moe_layers.last() == Some(&slot.layer)
}

impl ExpertWorker {
    /// Runs until the link closes for good. Returns an error on a protocol violation unless
    /// `recover` is set.
    pub fn run(self, stats: &WorkerStats) -> Result<(), EngineError> {
        let cfg = &self.model.cfg;
        let moe_layers: Vec<u32> = (0..cfg.num_layers)
            .filter(|l| cfg.is_moe_layer(*l))
            .map(|l| l as u32)
            .collect();
        if moe_layers.is_empty() {
            return Ok(());
        }
        let n_a = self.link.num_replicas();
        if n_a > Members::CAPACITY {
            return Err(EngineError::Deployment(format!(
                "{n_a} attention replicas; at most {} are supported",
                Members::CAPACITY
            )));
        }
        let mut st = State::new(if self.id == 0 { self.initial_epoch } else { 0 });
        if self.id == 0 {
            // Idle: iteration 0 has nobody yet.
            st.members.insert(0, Members::NONE);
        }
        let mut clock = Clock::new(stats, "expert", self.id as usize);
        self.publish(&st, &moe_layers, |_| {});
        loop {
            if let Some(slot) = self.ready(&st) {
                clock.idle();
                let msgs = st.pending.remove(&slot).unwrap_or_default();
                self.process(&mut st, slot, msgs, &moe_layers)?;
                clock.busy();
                self.publish(&st, &moe_layers, |s| s.slots_done += 1);
                continue;
            }
            let Some(ev) = self.link.recv()? else {
                return Ok(());
            };
            let res = match ev {
                ToWorker::Dispatch(m) => self.on_dispatch(&mut st, m, &moe_layers, n_a),
                ToWorker::Join { replica } => self.on_join(&mut st, replica, n_a),
                ToWorker::Trouble {
                    replica,
                    epoch,
                    why,
                } => {
                    if self.id == 0 && epoch == st.epoch {
                        self.new_epoch(&mut st, &format!("replica {replica} reported: {why}"), n_a);
                    }
                    Ok(())
                }
                ToWorker::Gone { replica } => {
                    if self.id == 0 {
                        st.joins.remove(replica);
                        if st.members.values().any(|m| m.contains(replica)) {
                            self.new_epoch(
                                &mut st,
                                &format!("attention replica {replica} went away"),
                                n_a,
                            );
                        }
                    }
                    Ok(())
                }
            };
            if let Err(e) = res {
                if !self.recover {
                    return Err(e);
                }
                tracing::error!(worker = self.id, "{e}; starting over");
                self.publish(&st, &moe_layers, |s| s.protocol_errors += 1);
                if self.id == 0 {
                    self.new_epoch(&mut st, &e.to_string(), n_a);
                } else {
                    st.reset();
                }
            }
            self.publish(&st, &moe_layers, |_| {});
        }
    }

    fn publish(&self, st: &State, moe_layers: &[u32], f: impl FnOnce(&mut WorkerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            s.worker = self.id;
            s.epoch = st.epoch;
            s.waiting_for = st.waiting_for(moe_layers, self.micro_batches);
            s.members = s
                .waiting_for
                .and_then(|w| st.members.get(&w.iteration))
                .map(|m| m.iter().collect());
            f(&mut s);
        }
    }

    /// The smallest slot whose every member's dispatch is here, if any.
    fn ready(&self, st: &State) -> Option<Slot> {
        st.pending
            .iter()
            .filter(|(slot, got)| {
                let here: Members = got.iter().map(|m| m.header.sender).collect();
                st.members
                    .get(&slot.iteration)
                    .is_some_and(|&members| !members.is_empty() && here == members)
            })
            .map(|(slot, _)| *slot)
            .min()
    }

    fn on_dispatch(
        &self,
        st: &mut State,
        m: DispatchMsg,
        moe_layers: &[u32],
        n_a: usize,
    ) -> Result<(), EngineError> {
        let h = m.header;
        if h.epoch < st.epoch {
            tracing::debug!(
                worker = self.id,
                "dropping a dispatch of old epoch {}",
                h.epoch
            );
            return Ok(());
        }
        if h.epoch > st.epoch {
            if self.id == 0 {
                // Only worker 0 starts epochs: this replica followed a previous worker 0.
                return Err(EngineError::Protocol(format!(
                    "replica {} sent epoch {} but this worker 0 is at epoch {}",
                    h.sender, h.epoch, st.epoch
                )));
            }
            st.epoch = h.epoch;
            st.reset();
            self.publish(st, moe_layers, |s| s.epochs_started += 1);
        }
        if h.sender as usize >= n_a || !m.members.contains(h.sender) {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: dispatch from replica {} which is not in its members {:?}",
                self.id, h.sender, m.members
            )));
        }
        let slot = h.slot;
        let processed = st
            .done
            .get(&slot.iteration)
            .is_some_and(|d| d.contains(&(slot.layer, slot.micro_batch)));
        if st.is_past(slot.iteration)
            || processed
            || !moe_layers.contains(&slot.layer)
            || slot.micro_batch >= self.micro_batches
        {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: dispatch for slot {slot} from replica {}, which is over or not a slot",
                self.id, h.sender
            )));
        }
        match st.members.get(&slot.iteration) {
            Some(&k) if k == m.members => {}
            Some(&k) => {
                return Err(EngineError::Protocol(format!(
                    "expert worker {}: replica {} says iteration {} has members {:?}, expected {k:?}",
                    self.id, h.sender, slot.iteration, m.members
                )))
            }
            // Worker 0 decides every iteration before anyone may send for it.
            None if self.id == 0 => {
                return Err(EngineError::Protocol(format!(
                    "expert worker 0: dispatch from replica {} for iteration {}, which it did not start",
                    h.sender, slot.iteration
                )))
            }
            None => {
                st.members.insert(slot.iteration, m.members);
            }
        }
        let v = st.pending.entry(slot).or_default();
        if v.iter().any(|x| x.header.sender == h.sender) {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: two dispatches from replica {} for slot {slot}",
                self.id, h.sender
            )));
        }
        v.push(m);
        Ok(())
    }

    fn on_join(&self, st: &mut State, replica: u32, n_a: usize) -> Result<(), EngineError> {
        if self.id != 0 || replica as usize >= n_a {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: join from replica {replica} (only worker 0 admits, {n_a} replicas)",
                self.id
            )));
        }
        if let Some(&k) = st.members.get(&st.head).filter(|k| k.contains(replica)) {
            // Worker 0 counts this replica in its newest iteration, but the replica asks for a
            // place: it never saw its welcome (its join had timed out when the welcome came,
            // and it dropped it). Nothing of it has arrived for that iteration, so the welcome
            // is sent again; otherwise it has lost its place mid-iteration and everybody starts
            // over.
            let started = st.done.get(&st.head).is_some_and(|d| !d.is_empty())
                || st.pending.iter().any(|(s, v)| {
                    s.iteration == st.head && v.iter().any(|m| m.header.sender == replica)
                });
            if started {
                st.joins.insert(replica);
                self.new_epoch(
                    st,
                    &format!(
                        "replica {replica} asked to join while taking part in iteration {}",
                        st.head
                    ),
                    n_a,
                );
            } else {
                tracing::info!(
                    worker = self.id,
                    "replica {replica} asked to join iteration {} again (its welcome was lost)",
                    st.head
                );
                self.welcome(st.epoch, st.head, k, Members::one(replica));
            }
            return Ok(());
        }
        match st.members.get_mut(&st.head) {
            Some(m) if m.is_empty() => {
                // Nobody takes part in the newest iteration: it starts now, with this replica.
                *m = Members::one(replica);
                self.welcome(st.epoch, st.head, *m, *m);
            }
            _ => st.joins.insert(replica),
        }
        Ok(())
    }

    fn welcome(&self, epoch: u64, iteration: u64, members: Members, to: Members) {
        for r in to.iter() {
            let msg = ToReplica::Welcome {
                epoch,
                iteration,
                members,
            };
            if let Err(e) = self.link.send(r, msg) {
                tracing::debug!(worker = self.id, "welcome to replica {r}: {e}");
            }
        }
    }

    /// Worker 0: forget every membership, tell every replica, admit those waiting to join.
    fn new_epoch(&self, st: &mut State, why: &str, n_a: usize) {
        st.epoch += 1;
        let newest = st.members.keys().next_back().copied().unwrap_or(st.head);
        st.head = newest.max(st.head) + 1;
        st.reset();
        st.members.insert(st.head, Members::NONE);
        tracing::warn!(worker = self.id, epoch = st.epoch, "new epoch: {why}");
        if let Ok(mut s) = self.status.lock() {
            s.epochs_started += 1;
        }
        for r in 0..n_a as u32 {
            let msg = ToReplica::Reset {
                epoch: st.epoch,
                why: why.to_string(),
            };
            let _ = self.link.send(r, msg);
        }
        if !st.joins.is_empty() {
            st.members.insert(st.head, st.joins);
            self.welcome(st.epoch, st.head, st.joins, st.joins);
            st.joins = Members::NONE;
        }
    }

    fn process(
        &self,
        st: &mut State,
        slot: Slot,
        mut msgs: Vec<DispatchMsg>,
        moe_layers: &[u32],
    ) -> Result<(), EngineError> {
        let d = self.model.cfg.hidden_size;
        let layer = &self.model.layers[slot.layer as usize];
        msgs.sort_by_key(|m| m.header.sender);
        // Concatenate every replica's rows: [sum n_r, D].
        let mut x = Vec::new();
        let mut assignments: Vec<Assignment> = Vec::new();
        let mut offsets = Vec::with_capacity(msgs.len());
        let mut rows = 0u32;
        for m in &msgs {
            let n = with_slice(&m.x, |s| {
                x.extend_from_slice(s);
                s.len() / d
            })?;
            offsets.push((rows as usize, n));
            for a in &m.assignments {
                if !self.experts.contains(&a.expert) || a.row as usize >= n {
                    return Err(EngineError::Protocol(format!(
                        "expert worker {} got row {} (of {n}) for expert {} from replica {}; it holds {:?}",
                        self.id, a.row, a.expert, m.header.sender, self.experts
                    )));
                }
                assignments.push(Assignment {
                    row: a.row + rows,
                    ..*a
                });
            }
            rows += n as u32;
        }
        let total = rows as usize;
        let y = if assignments.is_empty() {
            vec![0f32; total * d]
        } else {
            for a in &assignments {
                metrics::counter!("tandem_expert_tokens_total", "layer" => slot.layer.to_string(), "expert" => a.expert.to_string())
                    .increment(1);
            }
            routed_ffn(&x, total, d, &assignments, |e| {
                layer
                    .experts
                    .routed
                    .get(e as usize)
                    .and_then(|m| m.as_deref())
            })?
        };
        // Worker 0 decides the next iteration's members on the decision slot.
        let next_members = (self.id == 0 && decides(slot, moe_layers)).then(|| {
            msgs.iter()
                .filter(|m| m.more)
                .fold(st.joins, |a, m| a.with(m.header.sender))
        });
        for (m, (off, n)) in msgs.iter().zip(offsets) {
            let y_r = y[off * d..(off + n) * d].to_vec();
            let msg = ToReplica::Combine(CombineMsg {
                header: SlotHeader {
                    epoch: st.epoch,
                    slot,
                    sender: self.id,
                },
                y: from_vec(y_r, n, d)?,
                next_members,
            });
            if let Err(e) = self.link.send(m.header.sender, msg) {
                // The replica is gone; worker 0 hears of it and starts a new epoch.
                tracing::debug!(
                    worker = self.id,
                    "combine to replica {}: {e}",
                    m.header.sender
                );
            }
        }
        if let Some(k) = next_members {
            // The newest iteration's members were decided before any of its dispatches, so the
            // decision slot's iteration is the newest one.
            let next = slot.iteration + 1;
            st.head = next;
            st.members.insert(next, k);
            if !st.joins.is_empty() {
                self.welcome(st.epoch, next, k, st.joins);
                st.joins = Members::NONE;
            }
        }
        let done = st.done.entry(slot.iteration).or_default();
        done.insert((slot.layer, slot.micro_batch));
        if done.len() == moe_layers.len() * self.micro_batches as usize {
            st.complete(slot.iteration);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{State, RECENT};
    use tandem_core::{Members, Slot};

    fn state() -> State {
        State::new(0)
    }

    #[test]
    fn an_iteration_is_past_once_it_completed() {
        let mut st = state();
        assert!(!st.is_past(0));
        st.members.insert(4, Members::one(0));
        st.complete(4);
        assert!(st.members.is_empty() && st.is_past(4));
        // Iteration 3 of another replica may still arrive after 4 completed.
        assert!(!st.is_past(3) && !st.is_past(5));
        // Once the window is full, anything older than it is over too.
        for it in 10..10 + RECENT as u64 {
            st.complete(it);
        }
        assert_eq!(st.completed.len(), RECENT);
        assert!(st.is_past(3) && st.is_past(4) && st.is_past(10 + RECENT as u64 - 1));
        assert!(!st.is_past(10 + RECENT as u64));
    }

    #[test]
    fn status_names_the_first_missing_slot_of_the_oldest_iteration_with_members() {
        let moe = [1, 3];
        let mut st = state();
        st.members.insert(2, Members::NONE);
        assert_eq!(st.waiting_for(&moe, 2), None, "idle: nothing to wait for");
        st.members.insert(5, Members::first(2));
        st.members.insert(6, Members::one(0));
        st.done
            .entry(5)
            .or_default()
            .extend([(1, 0), (1, 1), (3, 0)]);
        assert_eq!(st.waiting_for(&moe, 2), Some(Slot::new(5, 3, 1)));
        st.done.entry(5).or_default().insert((3, 1));
        st.members.remove(&5);
        assert_eq!(st.waiting_for(&moe, 2), Some(Slot::new(6, 1, 0)));
    }
}
