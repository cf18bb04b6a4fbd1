//! tandem-engine: the disaggregated runtime. Attention replicas and expert workers run on
//! their own threads and thread pools, exchange hidden states through a [`transport`], and
//! keep each other busy with a ping-pong pipeline of micro-batches: `lanes.rs` is the policy
//! (which micro-batch does what next; `tandem_core::lanes`, re-exported), `replica.rs` runs
//! it, `m2n_client.rs` is a replica's side of the protocol and `expert_worker.rs` the other
//! side.
//! [`Engine`] is the API: `add_request` returns a stream of outputs; `abort` cancels.
//!
//! Owns: threads, lanes, the M2N transports and the engine API. May not parse HTTP or
//! checkpoint files (the server and `tandem-model` do), nor compute kernels itself (it calls
//! the model's stages).

pub mod auth;
pub mod constraint;
pub mod engine;
pub mod expert_worker;
pub mod lanes;
pub mod m2n_client;
pub mod net;
pub mod output;
pub mod replica;
#[cfg(target_os = "linux")]
pub mod shm;
#[cfg(not(target_os = "linux"))]
#[path = "shm_none.rs"]
pub mod shm;
pub mod stats;
pub mod tls;
pub mod transport;
pub mod wire;

pub use constraint::{ConstraintSpec, Grammars, Reasoning};
pub use engine::{Engine, EngineOptions, HealthProbe, RequestHandle};
pub use output::{Finish, RequestOutput};
pub use stats::StatsSnapshot;
pub use transport::{CombineMsg, DispatchMsg};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Sched(#[from] tandem_sched::SchedError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("the iteration was interrupted: {0}")]
    Interrupted(String),
    #[error("M2N protocol error: {0}")]
    Protocol(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid deployment: {0}")]
    Deployment(String),
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    #[error("cannot start a worker: {0}")]
    Spawn(String),
}
