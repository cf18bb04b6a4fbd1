//! M2N: how attention replicas and expert workers exchange hidden states. Every message
//! carries a [`SlotHeader`] (iteration, layer, micro-batch, sender) so that it can only be
//! applied to the slot it was computed for. The in-process transport moves candle tensors
//! through channels: the hidden states are never copied.

use candle_core::Tensor;
use std::sync::mpsc;
use std::time::Duration;
use tandem_model::Assignment;

/// Which pipeline slot a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotHeader {
    pub iteration: u64,
    pub layer: u32,
    pub micro_batch: u32,
    /// Replica id for a dispatch, worker id for a combine.
    pub sender: u32,
}

impl SlotHeader {
    /// The slot without the sender.
    pub fn slot(&self) -> (u64, u32, u32) {
        (self.iteration, self.layer, self.micro_batch)
    }
}

/// Attention -> expert: the rows routed to this worker and what to do with each.
pub struct DispatchMsg {
    pub header: SlotHeader,
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
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer {0} is gone")]
    Disconnected(String),
    #[error("no message from {what} within {secs:.1}s")]
    Timeout { what: String, secs: f64 },
}

/// A replica's end: dispatch to any worker, receive combines from all.
pub trait ReplicaLink: Send {
    fn num_workers(&self) -> usize;
    fn dispatch(&self, worker: u32, msg: DispatchMsg) -> Result<(), TransportError>;
    fn recv_combine(&self, timeout: Duration) -> Result<CombineMsg, TransportError>;
}

/// A worker's end: receive dispatches from all replicas, combine to any.
pub trait ExpertLink: Send {
    fn num_replicas(&self) -> usize;
    /// Blocks until a dispatch arrives; `Ok(None)` when every replica has hung up (shutdown).
    fn recv_dispatch(&self) -> Result<Option<DispatchMsg>, TransportError>;
    fn combine(&self, replica: u32, msg: CombineMsg) -> Result<(), TransportError>;
}

struct InProcReplica {
    to_workers: Vec<mpsc::Sender<DispatchMsg>>,
    from_workers: mpsc::Receiver<CombineMsg>,
}

struct InProcExpert {
    from_replicas: mpsc::Receiver<DispatchMsg>,
    to_replicas: Vec<mpsc::Sender<CombineMsg>>,
}

impl ReplicaLink for InProcReplica {
    fn num_workers(&self) -> usize {
        self.to_workers.len()
    }
    fn dispatch(&self, worker: u32, msg: DispatchMsg) -> Result<(), TransportError> {
        self.to_workers
            .get(worker as usize)
            .ok_or_else(|| TransportError::Disconnected(format!("expert worker {worker}")))?
            .send(msg)
            .map_err(|_| TransportError::Disconnected(format!("expert worker {worker}")))
    }
    fn recv_combine(&self, timeout: Duration) -> Result<CombineMsg, TransportError> {
        self.from_workers
            .recv_timeout(timeout)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => TransportError::Timeout {
                    what: "the expert workers".into(),
                    secs: timeout.as_secs_f64(),
                },
                mpsc::RecvTimeoutError::Disconnected => {
                    TransportError::Disconnected("every expert worker".into())
                }
            })
    }
}

impl ExpertLink for InProcExpert {
    fn num_replicas(&self) -> usize {
        self.to_replicas.len()
    }
    fn recv_dispatch(&self) -> Result<Option<DispatchMsg>, TransportError> {
        Ok(self.from_replicas.recv().ok())
    }
    fn combine(&self, replica: u32, msg: CombineMsg) -> Result<(), TransportError> {
        self.to_replicas
            .get(replica as usize)
            .ok_or_else(|| TransportError::Disconnected(format!("attention replica {replica}")))?
            .send(msg)
            .map_err(|_| TransportError::Disconnected(format!("attention replica {replica}")))
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
                from_replicas: rx,
                to_replicas: c_tx.clone(),
            }) as Box<dyn ExpertLink>
        })
        .collect();
    (reps, exps)
}
