//! Per-sequence constraints on the next token (structured output: JSON schemas, regular
//! expressions, choices, grammars, tool calls).
//!
//! The scheduler knows no grammar: a [`TokenConstraint`] is an object the frontend builds
//! (tandem-engine's `constraint.rs` implements it with llguidance) and hands over with the
//! sequence. [`crate::Scheduler::sample`] asks it for its mask before sampling (disallowed
//! logits become `-inf`, so the sampler can only pick an allowed token) and tells it the
//! token sampled right after. Unconstrained sequences of the same batch are untouched.

use std::fmt;
use std::sync::{Arc, Mutex};

/// What a constraint says after taking a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// More tokens may follow.
    Continue,
    /// The structure is complete and nothing may follow: the sequence ends (`stop`).
    Done,
}

/// A constraint on the tokens of one sequence.
///
/// The calls alternate: `apply` (mask the next token's logits), then `commit` (the token
/// sampled from them), then `apply` again... An implementation may compute the next mask
/// in the background as soon as `commit` returns (the next forward pass runs meanwhile).
pub trait TokenConstraint: Send {
    /// Sets the logits of disallowed tokens to `-inf`.
    fn apply(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Takes the token sampled from the masked logits.
    fn commit(&mut self, token: u32) -> Result<Commit, String>;
}

/// A sequence's constraint, shared by the clones of its [`crate::Sequence`].
#[derive(Clone, Default)]
pub struct ConstraintSlot(Option<Arc<Mutex<Box<dyn TokenConstraint>>>>);

impl ConstraintSlot {
    pub fn new(c: Box<dyn TokenConstraint>) -> Self {
        Self(Some(Arc::new(Mutex::new(c))))
    }

    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Runs `f` on the constraint, if there is one.
    pub(crate) fn with<R>(
        &self,
        f: impl FnOnce(&mut dyn TokenConstraint) -> Result<R, String>,
    ) -> Option<Result<R, String>> {
        let c = self.0.as_ref()?;
        Some(match c.lock() {
            Ok(mut g) => f(g.as_mut()),
            Err(_) => Err("the constraint's lock is poisoned".into()),
        })
    }
}

impl fmt::Debug for ConstraintSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ConstraintSlot(Some)"
        } else {
            "ConstraintSlot(None)"
        })
    }
}
