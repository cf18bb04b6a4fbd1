//! An attention replica's side of M2N: the link to the expert workers, the expert placement,
//! the peer timeout and where the replica stands in the membership protocol (see
//! `transport.rs`). It joins, dispatches, receives and abandons; which lane does what is
//! `lanes.rs`'s business and the model work is `replica.rs`'s.

use crate::lanes::Membership;
use crate::transport::TransportError;
use crate::transport::{CombineMsg, DispatchMsg, ReplicaLink, SlotHeader, ToReplica, ToWorker};
use crate::EngineError;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::{ExpertPlacement, Members, Slot};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::model::assignments_of;
use tandem_model::{Assignment, Routing};

/// What [`M2nClient::recv`] got.
pub enum Received {
    /// Nothing within the wait.
    Nothing,
    /// A message the client dealt with itself (a combine of an interrupted epoch, an old
    /// reset).
    Handled,
    /// A combine of the current epoch, for one of the replica's lanes.
    Combine(CombineMsg),
}

pub struct M2nClient {
    /// The replica this client speaks for.
    replica: u32,
    link: Box<dyn ReplicaLink>,
    placement: ExpertPlacement,
    timeout: Duration,
    /// Set when the engine stops: waits for peers end early.
    stop: Arc<AtomicBool>,
    /// Whether the replica takes part in the pipeline.
    member: bool,
    epoch: u64,
    /// A join was sent and not answered yet.
    join_outstanding: bool,
    /// Members of the iterations this replica knows of: the one it was welcomed to, then
    /// each next one from worker 0's combine of the decision slot (the first micro-batch of
    /// the last MoE layer).
    decided: BTreeMap<u64, Members>,
}

impl M2nClient {
    pub fn new(
        replica: u32,
        link: Box<dyn ReplicaLink>,
        placement: ExpertPlacement,
        timeout: Duration,
    ) -> Self {
        Self {
            replica,
            link,
            placement,
            timeout,
            stop: Arc::new(AtomicBool::new(false)),
            member: false,
            epoch: 0,
            join_outstanding: false,
            decided: BTreeMap::new(),
        }
    }

    /// Shares the engine's stop flag.
    pub fn set_stop(&mut self, stop: Arc<AtomicBool>) {
        self.stop = stop;
    }

    pub fn workers(&self) -> usize {
        self.link.num_workers()
    }

    pub fn is_member(&self) -> bool {
        self.member
    }

    /// The membership as the lane policy reads it.
    pub fn view(&self) -> Membership<'_> {
        Membership {
            me: self.replica,
            member: self.member,
            decided: &self.decided,
        }
    }

    /// The members of `iteration` (empty if not decided).
    pub fn members_of(&self, iteration: u64) -> Members {
        self.decided.get(&iteration).copied().unwrap_or_default()
    }

    /// Forgets the iterations before `oldest` (no lane will start them again).
    pub fn forget_before(&mut self, oldest: u64) {
        self.decided.retain(|i, _| *i >= oldest);
    }

    fn check_stop(&self) -> Result<(), EngineError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(EngineError::Stopped("shutting down".into()));
        }
        Ok(())
    }

    /// Asks worker 0 for a place in the next iteration and waits for it; returns the
    /// iteration the replica was welcomed to.
    pub fn join(&mut self) -> Result<u64, EngineError> {
        // A worker being restarted gets a few seconds to come back, not the whole timeout.
        let deadline = Instant::now() + self.timeout.min(CONNECT_WAIT);
        while let Err(why) = self.link.ready() {
            if Instant::now() >= deadline {
                return Err(TransportError::Disconnected(why).into());
            }
            self.check_stop()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + self.timeout;
        if !self.join_outstanding {
            // Whatever is queued is from before (a stale loss notice or reset).
            while let Ok(ev) = self.link.recv(Duration::ZERO) {
                if let ToReplica::Reset { epoch, .. } = ev {
                    self.epoch = self.epoch.max(epoch);
                }
            }
            self.link.control(ToWorker::Join {
                replica: self.replica,
            })?;
            self.join_outstanding = true;
        }
        loop {
            let ev = match self.link.recv(POLL.min(self.timeout)) {
                Ok(ev) => ev,
                Err(TransportError::Timeout { .. }) if Instant::now() < deadline => {
                    self.check_stop()?;
                    continue;
                }
                Err(mut e) => {
                    self.join_outstanding = false;
                    if let TransportError::Timeout { what, secs } = &mut e {
                        // The poll's own wait is not what the error is about.
                        *what = "expert worker 0 (a welcome after asking to join)".into();
                        *secs = self.timeout.as_secs_f64();
                        // Worker 0 may have welcomed this replica after all, too late: it
                        // would wait for its dispatches forever (the welcome is dropped with
                        // the rest of the queue at the next join). Telling it makes it start
                        // over without this replica's place.
                        let _ = self.link.control(ToWorker::Trouble {
                            replica: self.replica,
                            epoch: self.epoch,
                            why: e.to_string(),
                        });
                    }
                    return Err(e.into());
                }
            };
            match ev {
                ToReplica::Welcome {
                    epoch,
                    iteration,
                    members,
                } => {
                    self.member = true;
                    self.epoch = epoch;
                    self.join_outstanding = false;
                    self.decided = BTreeMap::from([(iteration, members)]);
                    return Ok(iteration);
                }
                // Worker 0 keeps pending joins across epochs: keep waiting.
                ToReplica::Reset { epoch, .. } => self.epoch = self.epoch.max(epoch),
                ToReplica::Combine(_) => {}
                ToReplica::Lost { worker, why } => {
                    if worker == 0 {
                        self.join_outstanding = false;
                        return Err(TransportError::Disconnected(why).into());
                    }
                }
            }
        }
    }

    /// Splits one lane's routed tokens by worker and sends a dispatch for `slot` to every
    /// worker (empty where none of its experts was chosen). `more`: the replica has work
    /// beyond this iteration (worker 0 reads it on the decision slot). Returns, per worker,
    /// the token rows sent.
    pub fn dispatch(
        &self,
        slot: Slot,
        members: Members,
        more: bool,
        normed: &Tensor,
        routing: &Routing,
        d: usize,
    ) -> Result<Vec<Vec<usize>>, EngineError> {
        let n = self.link.num_workers();
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut asg: Vec<Vec<Assignment>> = vec![Vec::new(); n];
        // Local row of token t on worker w, if already sent.
        let mut local: Vec<HashMap<usize, u32>> = vec![HashMap::new(); n];
        for a in assignments_of(routing) {
            let t = a.row as usize;
            let holders = self
                .placement
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
        let header = SlotHeader {
            epoch: self.epoch,
            slot,
            sender: self.replica,
        };
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
                self.link.dispatch(w as u32, msg)?;
            }
            Ok(())
        })??;
        Ok(rows)
    }

    /// Receives one message from the expert workers, waiting up to `wait`. Worker 0's
    /// decision about the next iteration is noted; a reset or a lost worker is an error.
    pub fn recv(&mut self, wait: Duration) -> Result<Received, EngineError> {
        let ev = match self.link.recv(wait) {
            Ok(ev) => ev,
            Err(TransportError::Timeout { .. }) => return Ok(Received::Nothing),
            Err(e) => return Err(e.into()),
        };
        let msg = match ev {
            ToReplica::Combine(msg) => msg,
            ToReplica::Reset { epoch, why } => {
                if epoch > self.epoch {
                    self.epoch = epoch;
                    return Err(EngineError::Interrupted(why));
                }
                return Ok(Received::Handled);
            }
            ToReplica::Lost { why, .. } => return Err(TransportError::Disconnected(why).into()),
            ToReplica::Welcome { .. } => {
                return Err(EngineError::Protocol(format!(
                    "replica {}: a welcome while taking part in the pipeline",
                    self.replica
                )))
            }
        };
        if msg.header.epoch != self.epoch {
            return Ok(Received::Handled); // from an interrupted epoch
        }
        if msg.header.sender == 0 {
            if let Some(k) = msg.next_members {
                self.decided.insert(msg.header.slot.iteration + 1, k);
            }
        }
        Ok(Received::Combine(msg))
    }

    /// Waits up to the peer timeout for the next message; the timeout error names `what`
    /// was awaited.
    pub fn wait(&mut self, what: impl FnOnce() -> String) -> Result<Received, EngineError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.recv(POLL.min(self.timeout))? {
                Received::Nothing => {}
                got => return Ok(got),
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout {
                    what: what(),
                    secs: self.timeout.as_secs_f64(),
                }
                .into());
            }
            self.check_stop()?;
        }
    }

    /// The replica is out of the next iteration (worker 0 left it out).
    pub fn leave(&mut self) {
        self.member = false;
        self.decided.clear();
    }

    /// After an error: the replica leaves the membership, and tells worker 0 unless the
    /// failure came from it.
    pub fn abandon(&mut self, e: &EngineError) {
        self.leave();
        if !matches!(e, EngineError::Interrupted(_) | EngineError::Stopped(_)) {
            let _ = self.link.control(ToWorker::Trouble {
                replica: self.replica,
                epoch: self.epoch,
                why: e.to_string(),
            });
        }
    }
}

/// How often waits for peers check the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// How long a replica with work waits for an unreachable expert worker to come back.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
