//! M2N: how attention replicas and expert workers exchange hidden states, and the small
//! control protocol that keeps them in step without a central coordinator.
//!
//! Every data message carries a [`SlotHeader`] (epoch, iteration, layer, micro-batch,
//! sender) so that it can only be applied to the slot it was computed for. The in-process
//! transport moves candle tensors through channels (the hidden states are never copied);
//! the TCP transport (`net.rs`) writes them from and reads them into tensor memory.
//!
//! ## Membership
//! An expert worker must know, for every slot, which replicas will send it a dispatch. The
//! replicas taking part in an iteration are its *members* (a [`Members`] set). Expert worker 0 is
//! the authority: a replica with work and no membership sends [`ToWorker::Join`]; worker 0
//! answers [`ToReplica::Welcome`] (epoch, iteration, members) at once when no iteration is
//! running, else on the current one's *decision slot*: the first micro-batch of the last MoE
//! layer. Every dispatch carries the iteration's member mask, so the other workers learn it
//! from the first message of a slot. A member says in each dispatch whether it has `more`
//! work; worker 0 puts the next iteration's members in its combine of the decision slot
//! ([`CombineMsg::next_members`]). That combine is the one a replica waits for before it
//! samples micro-batch 0 and starts it on the next iteration; its other micro-batches start
//! that iteration once it is decided. A replica's micro-batches are independent lanes (one
//! may be layers ahead of another, or in the next iteration), so workers keep the members of
//! every iteration in progress and take a slot as soon as every member's dispatch for it is
//! here, the smallest such slot first. A replica left out stops sending; when nobody is a
//! member the whole deployment sleeps.
//!
//! ## Epochs
//! A failure (a replica that went away, a worker that died or stalled) makes worker 0 start a
//! new epoch: it forgets the memberships and broadcasts [`ToReplica::Reset`]. Replicas fail the
//! requests of the interrupted iteration and join again; the other workers drop every pending
//! message of an older epoch when the first message of the new one arrives. A restarted
//! worker 0 starts from an epoch derived from the clock, so it is newer than any before.

use candle_core::Tensor;
use std::sync::mpsc;
use std::time::Duration;
use tandem_core::{Members, Slot};
use tandem_model::Assignment;

/// Which pipeline slot a message belongs to, in which epoch, from whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotHeader {
    pub epoch: u64,
    pub slot: Slot,
    /// Replica id for a dispatch, worker id for a combine.
    pub sender: u32,
}

/// Attention -> expert: the rows routed to this worker and what to do with each.
pub struct DispatchMsg {
    pub header: SlotHeader,
    /// The replicas taking part in this iteration.
    pub members: Members,
    /// The sender has work beyond this iteration (read by worker 0 on the decision slot).
    pub more: bool,
    /// `[n, D]` post-attention-normed hidden states.
    pub x: Tensor,
    /// `row` indexes `x`.
    pub assignments: Vec<Assignment>,
}

/// Expert -> attention: `[n, D]`, row i = weighted sum of this worker's experts for row i
/// of the matching dispatch.
pub struct CombineMsg {
    pub header: SlotHeader,
    pub y: Tensor,
    /// Set by worker 0 on the decision slot of an iteration: the next iteration's members.
    pub next_members: Option<Members>,
}

/// Everything a worker receives.
pub enum ToWorker {
    Dispatch(DispatchMsg),
    /// Replica `replica` has work and asks to take part (worker 0 only).
    Join {
        replica: u32,
    },
    /// Replica `replica` saw a failure in `epoch` (a worker gone or silent): start a new
    /// epoch (worker 0 only).
    Trouble {
        replica: u32,
        epoch: u64,
        why: String,
    },
    /// The connection to replica `replica` is gone (network transports only).
    Gone {
        replica: u32,
    },
}

/// Everything a replica receives.
pub enum ToReplica {
    Combine(CombineMsg),
    /// From worker 0: take part in `iteration` of `epoch` with these members.
    Welcome {
        epoch: u64,
        iteration: u64,
        members: Members,
    },
    /// From worker 0: `epoch` starts; every membership is forgotten.
    Reset {
        epoch: u64,
        why: String,
    },
    /// The connection to worker `worker` is gone (network transports only).
    Lost {
        worker: u32,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Says which peer and why, e.g. "expert worker 1 at HOST:PORT: closed by the worker".
    #[error("{0}")]
    Disconnected(String),
    #[error("no message from {what} within {secs:.1}s")]
    Timeout { what: String, secs: f64 },
}

/// A replica's end: dispatch to any worker, receive from all.
pub trait ReplicaLink: Send {
    fn num_workers(&self) -> usize;
    fn dispatch(&self, worker: u32, msg: DispatchMsg) -> Result<(), TransportError>;
    /// Sends a control message (`Join`, `Trouble`) to worker 0.
    fn control(&self, msg: ToWorker) -> Result<(), TransportError>;
    fn recv(&self, timeout: Duration) -> Result<ToReplica, TransportError>;
    /// `Err(why)` while some worker is unreachable.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A worker's end: receive from all replicas, send to any.
pub trait ExpertLink: Send {
    /// `n_a`: how many replicas the deployment has (connected or not).
    fn num_replicas(&self) -> usize;
    /// Blocks until something arrives; `Ok(None)` when the link is closed for good
    /// (every in-process replica hung up, or the process is stopping).
    fn recv(&self) -> Result<Option<ToWorker>, TransportError>;
    fn send(&self, replica: u32, msg: ToReplica) -> Result<(), TransportError>;
}

struct InProcReplica {
    to_workers: Vec<mpsc::Sender<ToWorker>>,
    from_workers: mpsc::Receiver<ToReplica>,
}

struct InProcExpert {
    num_replicas: usize,
    from_replicas: mpsc::Receiver<ToWorker>,
    to_replicas: Vec<mpsc::Sender<ToReplica>>,
}

fn send_to<T>(
    senders: &[mpsc::Sender<T>],
    i: u32,
    what: &str,
    msg: T,
) -> Result<(), TransportError> {
    senders
        .get(i as usize)
        .ok_or_else(|| TransportError::Disconnected(format!("{what} {i} does not exist")))?
        .send(msg)
        .map_err(|_| TransportError::Disconnected(format!("{what} {i} is gone")))
}

impl ReplicaLink for InProcReplica {
    fn num_workers(&self) -> usize {
        self.to_workers.len()
    }
    fn dispatch(&self, worker: u32, msg: DispatchMsg) -> Result<(), TransportError> {
        send_to(
            &self.to_workers,
            worker,
            "expert worker",
            ToWorker::Dispatch(msg),
        )
    }
    fn control(&self, msg: ToWorker) -> Result<(), TransportError> {
        send_to(&self.to_workers, 0, "expert worker", msg)
    }
    fn recv(&self, timeout: Duration) -> Result<ToReplica, TransportError> {
        self.from_workers
            .recv_timeout(timeout)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => TransportError::Timeout {
                    what: "the expert workers".into(),
                    secs: timeout.as_secs_f64(),
                },
                mpsc::RecvTimeoutError::Disconnected => {
                    TransportError::Disconnected("every expert worker is gone".into())
                }
            })
    }
}

impl ExpertLink for InProcExpert {
    fn num_replicas(&self) -> usize {
        self.num_replicas
    }
    fn recv(&self) -> Result<Option<ToWorker>, TransportError> {
        Ok(self.from_replicas.recv().ok())
    }
    fn send(&self, replica: u32, msg: ToReplica) -> Result<(), TransportError> {
        send_to(&self.to_replicas, replica, "attention replica", msg)
    }
}

pub type Links = (Vec<Box<dyn ReplicaLink>>, Vec<Box<dyn ExpertLink>>);

/// Channels between `replicas` attention replicas and `workers` expert workers.
pub fn in_process(replicas: usize, workers: usize) -> Links {
    let (mut d_tx, mut d_rx) = (Vec::new(), Vec::new());
    for _ in 0..workers {
        let (t, r) = mpsc::channel();
        d_tx.push(t);
        d_rx.push(r);
    }
    let (mut c_tx, mut c_rx) = (Vec::new(), Vec::new());
    for _ in 0..replicas {
        let (t, r) = mpsc::channel();
        c_tx.push(t);
        c_rx.push(r);
    }
    let reps = c_rx
        .into_iter()
        .map(|rx| {
            Box::new(InProcReplica {
                to_workers: d_tx.clone(),
                from_workers: rx,
            }) as Box<dyn ReplicaLink>
        })
        .collect();
    let exps = d_rx
        .into_iter()
        .map(|rx| {
            Box::new(InProcExpert {
                num_replicas: replicas,
                from_replicas: rx,
                to_replicas: c_tx.clone(),
            }) as Box<dyn ExpertLink>
        })
        .collect();
    (reps, exps)
}
