//! An expert worker: for every pipeline slot (iteration, MoE layer, micro-batch), in order, it
//! waits for the dispatch of every **member** replica of that iteration (a member with nothing
//! routed here sends an empty one), concatenates their rows, runs each of its experts once on
//! all the rows routed to it, and returns to each replica the weighted sums for its rows.
//! Aggregating across replicas is what makes the expert GEMMs bigger.
//!
//! Worker 0 also decides who the members are (see the protocol in `transport.rs`).

use crate::stats::{Clock, WorkerStats};
use crate::transport::{CombineMsg, DispatchMsg, ExpertLink, SlotHeader, ToReplica, ToWorker};
use crate::EngineError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// The slot the worker waits for: (iteration, layer, micro-batch).
    pub waiting_for: Option<(u64, u32, u32)>,
    /// Members of that slot's iteration, when known.
    pub members: Option<u64>,
    pub slots_done: u64,
    pub epochs_started: u64,
    pub protocol_errors: u64,
}

/// Slot order: iteration, then MoE layers ascending, then micro-batches.
fn next_slot(slot: (u64, u32, u32), moe_layers: &[u32], m: u32) -> (u64, u32, u32) {
    let (it, l, mb) = slot;
    if mb + 1 < m {
        return (it, l, mb + 1);
    }
    match moe_layers.iter().position(|x| *x == l) {
        Some(i) if i + 1 < moe_layers.len() => (it, moe_layers[i + 1], 0),
        _ => (it + 1, moe_layers[0], 0),
    }
}

/// The worker's view of the pipeline.
struct State {
    epoch: u64,
    /// The next slot to process; `None` until the first message of an epoch (workers > 0).
    want: Option<(u64, u32, u32)>,
    /// Members of `want`'s iteration, once known (worker 0 always knows; 0 = idle).
    members: Option<u64>,
    pending: HashMap<(u64, u32, u32), Vec<DispatchMsg>>,
    /// Worker 0: replicas waiting to join at the next iteration.
    joins: u64,
    /// Worker 0: the next iteration's members, once decided (on the decision slot).
    next_members: Option<u64>,
}

/// The slot on which worker 0 decides the next iteration's members: the first micro-batch of
/// the last MoE layer. Its combine is the one a pipelining replica waits for before it starts
/// micro-batch 0 of the next iteration, while the other micro-batches are still in flight.
fn decides(slot: (u64, u32, u32), moe_layers: &[u32]) -> bool {
    slot.2 == 0 && moe_layers.last() == Some(&slot.1)
}

fn bit(r: u32) -> u64 {
    1u64 << r
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
        if n_a > 64 {
            return Err(EngineError::Deployment(format!(
                "{n_a} attention replicas; at most 64 are supported"
            )));
        }
        let mut st = State {
            epoch: if self.id == 0 { self.initial_epoch } else { 0 },
            want: (self.id == 0).then_some((0, moe_layers[0], 0)),
            members: (self.id == 0).then_some(0),
            pending: HashMap::new(),
            joins: 0,
            next_members: None,
        };
        let mut clock = Clock::new(stats, "expert", self.id as usize);
        self.publish(&st, |_| {});
        loop {
            if let Some(want) = self.ready(&st) {
                clock.idle();
                let msgs = st.pending.remove(&want).unwrap_or_default();
                self.process(&mut st, want, msgs, &moe_layers)?;
                clock.busy();
                self.publish(&st, |s| s.slots_done += 1);
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
                        self.new_epoch(
                            &mut st,
                            &format!("replica {replica} reported: {why}"),
                            &moe_layers,
                            n_a,
                        );
                    }
                    Ok(())
                }
                ToWorker::Gone { replica } => {
                    if self.id == 0 {
                        st.joins &= !bit(replica);
                        if st.members.unwrap_or(0) & bit(replica) != 0 {
                            self.new_epoch(
                                &mut st,
                                &format!("attention replica {replica} went away"),
                                &moe_layers,
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
                self.publish(&st, |s| s.protocol_errors += 1);
                if self.id == 0 {
                    self.new_epoch(&mut st, &e.to_string(), &moe_layers, n_a);
                } else {
                    st.pending.clear();
                    st.want = None;
                    st.members = None;
                }
            }
            self.publish(&st, |_| {});
        }
    }

    fn publish(&self, st: &State, f: impl FnOnce(&mut WorkerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            s.worker = self.id;
            s.epoch = st.epoch;
            s.waiting_for = st.want;
            s.members = st.members;
            f(&mut s);
        }
    }

    /// The slot to process now, if every member's dispatch for it is here.
    fn ready(&self, st: &State) -> Option<(u64, u32, u32)> {
        let want = st.want?;
        let members = st.members?;
        if members == 0 {
            return None;
        }
        let got = st.pending.get(&want)?;
        let mask = got.iter().fold(0u64, |a, m| a | bit(m.header.sender));
        (mask == members).then_some(want)
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
            st.pending.clear();
            st.want = None;
            st.members = None;
            self.publish(st, |s| s.epochs_started += 1);
        }
        let want = *st.want.get_or_insert((h.iteration, moe_layers[0], 0));
        if h.sender as usize >= n_a || m.members & bit(h.sender) == 0 {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: dispatch from replica {} which is not in its member mask {:#x}",
                self.id, h.sender, m.members
            )));
        }
        // A replica may start the next iteration before this worker has finished the current
        // one: a member pipelining its micro-batches, or one just welcomed (worker 0 decides
        // and welcomes on the decision slot). Worker 0 accepts that once it has decided.
        let ahead = h.iteration == want.0 + 1 && (self.id != 0 || st.next_members.is_some());
        if (h.iteration != want.0 && !ahead)
            || h.slot() < want
            || !moe_layers.contains(&h.layer)
            || h.micro_batch >= self.micro_batches
        {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: dispatch for slot {:?} from replica {} while expecting {want:?}",
                self.id,
                h.slot(),
                h.sender
            )));
        }
        let known = if ahead && self.id == 0 {
            st.next_members
        } else if ahead {
            st.pending
                .iter()
                .find(|(s, v)| s.0 == h.iteration && !v.is_empty())
                .map(|(_, v)| v[0].members)
        } else {
            st.members
        };
        match known {
            None if !ahead => st.members = Some(m.members),
            None => {}
            Some(k) if k == m.members => {}
            Some(k) => {
                return Err(EngineError::Protocol(format!(
                "expert worker {}: replica {} says iteration {} has members {:#x}, expected {k:#x}",
                self.id, h.sender, h.iteration, m.members
            )))
            }
        }
        let v = st.pending.entry(h.slot()).or_default();
        if v.iter().any(|x| x.header.sender == h.sender) {
            return Err(EngineError::Protocol(format!(
                "expert worker {}: two dispatches from replica {} for slot {:?}",
                self.id,
                h.sender,
                h.slot()
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
        match (st.want, st.members) {
            (Some(want), Some(0)) => {
                // Idle: the next iteration starts now, with this replica.
                st.members = Some(bit(replica));
                self.welcome(st.epoch, want.0, bit(replica), bit(replica));
            }
            _ => st.joins |= bit(replica),
        }
        Ok(())
    }

    fn welcome(&self, epoch: u64, iteration: u64, members: u64, to: u64) {
        for r in 0..64u32 {
            if to & bit(r) != 0 {
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
    }

    /// Worker 0: forget every membership, tell every replica, admit those waiting to join.
    fn new_epoch(&self, st: &mut State, why: &str, moe_layers: &[u32], n_a: usize) {
        st.epoch += 1;
        let it = st.want.map_or(0, |w| w.0) + 1;
        st.want = Some((it, moe_layers[0], 0));
        st.pending.clear();
        st.members = Some(0);
        st.next_members = None;
        tracing::warn!(worker = self.id, epoch = st.epoch, "new epoch: {why}");
        self.publish(st, |s| s.epochs_started += 1);
        for r in 0..n_a as u32 {
            let msg = ToReplica::Reset {
                epoch: st.epoch,
                why: why.to_string(),
            };
            let _ = self.link.send(r, msg);
        }
        if st.joins != 0 {
            st.members = Some(st.joins);
            self.welcome(st.epoch, it, st.joins, st.joins);
            st.joins = 0;
        }
    }

    fn process(
        &self,
        st: &mut State,
        slot: (u64, u32, u32),
        mut msgs: Vec<DispatchMsg>,
        moe_layers: &[u32],
    ) -> Result<(), EngineError> {
        let d = self.model.cfg.hidden_size;
        let layer = &self.model.layers[slot.1 as usize];
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
                metrics::counter!("tandem_expert_tokens_total", "layer" => slot.1.to_string(), "expert" => a.expert.to_string())
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
        let next = next_slot(slot, moe_layers, self.micro_batches);
        let last = next.0 != slot.0;
        // Worker 0 decides the next iteration's members on the decision slot.
        let next_members = (self.id == 0 && decides(slot, moe_layers)).then(|| {
            msgs.iter()
                .filter(|m| m.more)
                .fold(st.joins, |a, m| a | bit(m.header.sender))
        });
        for (m, (off, n)) in msgs.iter().zip(offsets) {
            let y_r = y[off * d..(off + n) * d].to_vec();
            let msg = ToReplica::Combine(CombineMsg {
                header: SlotHeader {
                    epoch: st.epoch,
                    iteration: slot.0,
                    layer: slot.1,
                    micro_batch: slot.2,
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
            st.next_members = Some(k);
            if st.joins != 0 {
                self.welcome(st.epoch, slot.0 + 1, k, st.joins);
                st.joins = 0;
            }
        }
        st.want = Some(next);
        if last {
            st.members = if self.id == 0 {
                st.next_members.take()
            } else {
                // The next iteration's members, if one of them already wrote.
                st.pending
                    .iter()
                    .find(|(s, v)| s.0 == next.0 && !v.is_empty())
                    .map(|(_, v)| v[0].members)
            };
            // Worker 0: replicas that asked to join after the decision, when nobody takes
            // part in the next iteration, start it now rather than never.
            if self.id == 0 && st.members == Some(0) && st.joins != 0 {
                st.members = Some(st.joins);
                self.welcome(st.epoch, next.0, st.joins, st.joins);
                st.joins = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::next_slot;

    #[test]
    fn slot_order_skips_dense_layers() {
        let moe = [0, 2];
        let mut s = (0, 0, 0);
        let mut seen = vec![];
        for _ in 0..6 {
            seen.push(s);
            s = next_slot(s, &moe, 2);
        }
        assert_eq!(
            seen,
            vec![
                (0, 0, 0),
                (0, 0, 1),
                (0, 2, 0),
                (0, 2, 1),
                (1, 0, 0),
                (1, 0, 1)
            ]
        );
    }
}
