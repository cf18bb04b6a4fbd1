//! tandem-plan: predicts how an MoE model serves on hardware nobody here can touch.
//!
//! - [`hardware`]: the device catalog (peak numbers, links, prices, efficiency factors).
//! - [`model`]: model shapes from the catalog or any supported HF `config.json`.
//! - [`closed_form`]: the paper's equations 1-8 and BALANCE as pure functions.
//! - [`perf`]: per-layer stage times (roofline) behind the [`perf::StageModel`] trait;
//!   [`profile`]: the same from a measured profile file.
//! - [`planner`]: Algorithm 1 and the colocated baseline.
//! - [`sim`]: a discrete-event simulation of the ping-pong pipeline with load imbalance,
//!   jitter and stragglers.
//! - [`default_shape`]: the shape `serve` runs when none is given.
//! - [`deploy`]: plans to deployment files; [`reproduce`]: the paper-reproduction report.
//! - [`report`]: the text reports the CLI prints (plan table, catalogs, engine prediction,
//!   simulation).
//! - [`engine_model`]: decode throughput of tandem's own engine for an explicit shape, from a
//!   measured profile (the calibration target), running the engine's own lane policy
//!   (`tandem_core::lanes`) on modeled costs.
//!
//! Units everywhere: seconds, bytes, FLOPs, tokens; names say so (`_s`, `_bytes`).
//!
//! Owns: prediction. May not depend on tensor code (core only): model shapes are parsed
//! here from `config.json`, and the engine's behaviour comes from `tandem_core::lanes`.

pub mod closed_form;
pub mod default_shape;
pub mod deploy;
pub mod engine_model;
pub mod error;
pub mod hardware;
pub mod model;
pub mod perf;
pub mod planner;
pub mod profile;
pub mod report;
pub mod reproduce;
mod rng;
pub mod sim;
pub mod svg;

pub use closed_form::StageTimes;
pub use error::{PlanError, Result};
pub use hardware::{Hardware, HardwareCatalog, PriceUnit};
pub use model::{ModelCatalog, ModelShape};
pub use perf::{PipelineShape, Roofline, StageModel};
pub use planner::{plan, Objective, PerfSource, Plan, PlanReport, PlanRequest, ReplicaSearch};
pub use profile::{HeadFit, Profile, ProfileModel};
