//! The ping-pong policy lives in `tandem-core` ([`tandem_core::lanes`]) so that the planner's
//! engine model (`tandem-plan`'s `engine_model.rs`) runs the same code on modeled costs; this
//! module re-exports it for the engine. `replica.rs` applies its transitions (one function,
//! `Replica::apply`) and asks [`next_action`] what to do next, with remote experts and
//! colocated alike.

pub use tandem_core::lanes::*;
