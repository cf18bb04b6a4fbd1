//! Types shared by every tandem crate: request ids, pipeline slots and member sets, the
//! deployment shape, and the lane policy (`lanes`: which of a replica's micro-batches does what
//! next, as pure functions the engine runs on real work and the planner on modeled costs).
//!
//! This crate has no tensor code and no I/O beyond reading/writing a deployment file, so the
//! planner (`tandem-plan`), the engine and the CLI can all depend on it.

pub mod deployment;
pub mod ids;
pub mod lanes;
pub mod slot;

pub use deployment::{Deployment, DeploymentError, ExpertPlacement};
pub use ids::RequestId;
pub use slot::{Members, Slot};
