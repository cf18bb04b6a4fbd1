//! Types shared by every tandem crate: id newtypes and the deployment shape.
//!
//! This crate has no tensor code and no I/O beyond reading/writing a deployment file, so the
//! planner (`tandem-plan`), the engine and the CLI can all depend on it.

pub mod deployment;
pub mod ids;

pub use deployment::{Deployment, DeploymentError, ExpertPlacement};
pub use ids::{ExpertId, LayerId, MicroBatchId, ReplicaId, RequestId, WorkerId};
