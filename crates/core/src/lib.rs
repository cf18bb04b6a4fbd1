//! Types shared by every tandem crate: request ids, pipeline slots and member sets, the
//! deployment shape, and the lane policy (`lanes`: which of a replica's micro-batches does what
//! next, as pure functions the engine runs on real work and the planner on modeled costs).
//!
//! This crate has no tensor code and no I/O beyond reading/writing a deployment file and the
//! machine facts of [`machine`] (/proc), so the planner (`tandem-plan`), the engine, the CLI
//! and the benchmarks can all depend on it.
//!
//! Owns: the types and the pure lane policy every crate shares. May not depend on any other
//! tandem crate.

pub mod deployment;
pub mod ids;
pub mod lanes;
pub mod machine;
pub mod slot;

pub use deployment::{default_micro_batches, Deployment, DeploymentError, ExpertPlacement};
pub use ids::RequestId;
pub use slot::{Members, Slot};
