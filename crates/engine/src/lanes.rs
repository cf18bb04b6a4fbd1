//! The ping-pong policy: which of an attention replica's lanes does what next.
//!
//! A replica splits its sequences into `m` lanes (one per micro-batch). With remote experts
//! each lane is an independent chain of layers, and the expert workers take each lane's slots
//! as its dispatches complete. A lane moves through these states (`replica.rs` holds the
//! data; this module only decides):
//!
//! ```text
//!            start (iteration decided, this replica a member, no lane behind)
//!   Idle ─────────────────────────────────────────────► Running(layer 0)
//!    ▲                                                      │ run layer l
//!    │                                   dense layer        ▼
//!    │                             ┌──────────────────── attention ───────── MoE layer ──┐
//!    │                             ▼                                                     ▼
//!    │                    Running(l + 1) ◄──── every worker's combine here ──── Waiting(slot)
//!    │                             │ l + 1 == layers                                     │
//!    │                             ▼                                                     │
//!    └──── finish: LM head ─── Done ◄──────────── (last layer's combines here) ──────────┘
//!          (other lanes' layers between its parts), sampling, tokens out
//! ```
//!
//! [`next_action`] is the whole policy, a pure function of the lanes' [`Progress`] and the
//! replica's view of the membership, in this order:
//! 1. **Run a layer** of a lane whose input is here and that has layers left: its dispatch
//!    is what an expert worker may be waiting for. The lane furthest behind goes first.
//! 2. **Start** an idle lane on its next iteration, once worker 0 has decided that iteration
//!    with this replica a member and every other lane has started the iteration before
//!    (lanes stay within one iteration of each other; an empty lane never runs ahead).
//! 3. **Finish** a lane done with its layers: LM head, sampling, tokens out. While it
//!    runs, in [`LM_HEAD_PARTS`] vocabulary ranges and [`SAMPLE_PARTS`] groups of rows, the
//!    replica asks [`interleave`] between the parts so that the other lanes' layers (and the
//!    expert workers behind them) are not held up by a whole LM head.
//! 4. **Wait** for a combine when some lane waits for one.
//! 5. **Leave** otherwise: every lane is idle and none may start, so worker 0 left this
//!    replica out of the next iteration; it is no longer a member.
//!
//! Colocated (no remote experts) there is nothing to overlap: a round runs every lane's
//! step layer by layer and lane by lane, without this policy.

use std::collections::BTreeMap;
use tandem_core::Members;

/// Parts of a lane's LM head computed between chances for the other lanes to run; on the
/// demo model's 32k vocabulary and 64 rows, about 4 ms each.
pub const LM_HEAD_PARTS: usize = 16;

/// Groups of rows of a lane's sampling between chances for the other lanes to run.
pub const SAMPLE_PARTS: usize = 4;

/// Where one lane stands, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// No step in flight; the lane's next step runs `next_iteration`.
    Idle { next_iteration: u64 },
    /// A step of `iteration`. `next_layer` is the layer it runs next (the number of layers
    /// once every layer ran); `input_here`: its hidden state is here (no combine outstanding,
    /// or every worker's combine has arrived).
    Busy {
        iteration: u64,
        next_layer: usize,
        input_here: bool,
    },
}

impl Progress {
    /// The iteration this lane's next step runs.
    pub fn next_iteration(self) -> u64 {
        match self {
            Progress::Idle { next_iteration } => next_iteration,
            Progress::Busy { iteration, .. } => iteration + 1,
        }
    }
}

/// What the replica does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Lane `0`'s next layer (settling its combine first).
    RunLayer(usize),
    /// Start `lane` on `iteration`: schedule it and embed its tokens.
    Start { lane: usize, iteration: u64 },
    /// Lane `0`'s LM head, sampling and scheduler update.
    Finish(usize),
    /// Wait for a message from the expert workers.
    Wait,
    /// Every lane is idle and none may start: the replica is out of the membership.
    Leave,
}

/// The replica's view of the membership protocol (see `transport.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Membership<'a> {
    /// This replica's id.
    pub me: u32,
    /// Whether it takes part in the pipeline.
    pub member: bool,
    /// The members of each iteration decided so far.
    pub decided: &'a BTreeMap<u64, Members>,
}

/// The next thing to do, from the lanes and the membership (see the module docs).
pub fn next_action(lanes: &[Progress], layers: usize, m2n: Membership<'_>) -> Action {
    if let Some(k) = ready(lanes, layers, None, false) {
        return Action::RunLayer(k);
    }
    if let Some((lane, iteration)) = startable(lanes, m2n) {
        return Action::Start { lane, iteration };
    }
    if let Some(k) = ready(lanes, layers, None, true) {
        return Action::Finish(k);
    }
    if lanes.iter().any(|p| {
        matches!(
            p,
            Progress::Busy {
                input_here: false,
                ..
            }
        )
    }) {
        return Action::Wait;
    }
    Action::Leave
}

/// While lane `busy` is being finished: another lane whose next layer can run now.
pub fn interleave(lanes: &[Progress], layers: usize, busy: usize) -> Option<usize> {
    ready(lanes, layers, Some(busy), false)
}

/// A lane (other than `except`) whose input is here, with layers left (`done`: with none
/// left); the one furthest behind first.
fn ready(lanes: &[Progress], layers: usize, except: Option<usize>, done: bool) -> Option<usize> {
    lanes
        .iter()
        .enumerate()
        .filter(|(k, _)| Some(*k) != except)
        .filter_map(|(k, p)| match *p {
            Progress::Busy {
                iteration,
                next_layer,
                input_here: true,
            } if (next_layer >= layers) == done => Some((iteration, next_layer, k)),
            _ => None,
        })
        .min()
        .map(|(_, _, k)| k)
}

/// An idle lane whose next iteration is decided with this replica a member, and that every
/// other lane has reached (a lane starts iteration `i` only once all the others have started
/// `i - 1`); the earliest iteration, then the lowest lane, first.
fn startable(lanes: &[Progress], m2n: Membership<'_>) -> Option<(usize, u64)> {
    if !m2n.member {
        return None;
    }
    let floor = lanes.iter().map(|p| p.next_iteration()).min()?;
    lanes
        .iter()
        .enumerate()
        .filter_map(|(k, p)| match *p {
            Progress::Idle { next_iteration } => Some((next_iteration, k)),
            Progress::Busy { .. } => None,
        })
        .filter(|(it, _)| *it == floor)
        .find(|(it, _)| m2n.decided.get(it).is_some_and(|m| m.contains(m2n.me)))
        .map(|(it, k)| (k, it))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Progress::{Busy, Idle};

    const LAYERS: usize = 4;

    fn busy(iteration: u64, next_layer: usize, input_here: bool) -> Progress {
        Busy {
            iteration,
            next_layer,
            input_here,
        }
    }

    fn decided(its: &[(u64, &[u32])]) -> BTreeMap<u64, Members> {
        its.iter()
            .map(|(i, m)| (*i, m.iter().copied().collect()))
            .collect()
    }

    fn act(lanes: &[Progress], d: &BTreeMap<u64, Members>) -> Action {
        next_action(
            lanes,
            LAYERS,
            Membership {
                me: 1,
                member: true,
                decided: d,
            },
        )
    }

    #[test]
    fn a_lane_whose_combine_arrived_runs_before_a_lane_that_could_start() {
        let d = decided(&[(5, &[1]), (6, &[1])]);
        let lanes = [busy(5, 2, true), Idle { next_iteration: 6 }];
        assert_eq!(act(&lanes, &d), Action::RunLayer(0));
        // Once lane 0 waits for its combine, lane 1 starts.
        let lanes = [busy(5, 3, false), Idle { next_iteration: 6 }];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 1,
                iteration: 6
            }
        );
    }

    #[test]
    fn the_lane_furthest_behind_runs_first() {
        let d = decided(&[]);
        let lanes = [busy(6, 1, true), busy(5, 3, true), busy(5, 2, true)];
        assert_eq!(act(&lanes, &d), Action::RunLayer(2));
        let lanes = [busy(5, 2, true), busy(5, 2, true)];
        assert_eq!(
            act(&lanes, &d),
            Action::RunLayer(0),
            "ties go to the lower lane"
        );
    }

    #[test]
    fn starting_comes_before_finishing_and_finishing_before_waiting() {
        let d = decided(&[(7, &[1])]);
        let lanes = [busy(6, LAYERS, true), Idle { next_iteration: 7 }];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 1,
                iteration: 7
            }
        );
        let lanes = [busy(6, LAYERS, true), busy(7, 1, false)];
        assert_eq!(act(&lanes, &d), Action::Finish(0));
        // A done lane whose last combine is still out waits like any other.
        let lanes = [busy(6, LAYERS, false), busy(7, 1, false)];
        assert_eq!(act(&lanes, &d), Action::Wait);
    }

    #[test]
    fn lanes_stay_within_one_iteration() {
        // Lane 0 finished iteration 5 and could start 6 (decided), but lane 1 has not
        // started 5 yet: lane 1 starts 5 first, and lane 0 waits for that.
        let d = decided(&[(5, &[1]), (6, &[1])]);
        let lanes = [Idle { next_iteration: 6 }, Idle { next_iteration: 5 }];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 1,
                iteration: 5
            }
        );
        let lanes = [Idle { next_iteration: 6 }, busy(5, 0, false)];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 0,
                iteration: 6
            }
        );
        // Lane 1 has started 6, so lane 0 may start 7 (one iteration ahead)...
        let d = decided(&[(7, &[1])]);
        let lanes = [Idle { next_iteration: 7 }, busy(6, 2, false)];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 0,
                iteration: 7
            }
        );
        // ...but not 8 while lane 1 has not started 7.
        let d = decided(&[(7, &[1]), (8, &[1])]);
        let lanes = [Idle { next_iteration: 8 }, busy(6, 2, false)];
        assert_eq!(act(&lanes, &d), Action::Wait);
    }

    #[test]
    fn an_empty_lane_never_runs_ahead() {
        // Every iteration up to 20 is decided (worker 0 keeps the replica in), yet an idle
        // lane does not start iteration after iteration while the other lane is still busy.
        let d: BTreeMap<u64, Members> = (0..20).map(|i| (i, Members::one(1))).collect();
        let lanes = [Idle { next_iteration: 4 }, busy(3, 1, false)];
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 0,
                iteration: 4
            }
        );
        let lanes = [busy(4, 0, false), busy(3, 1, false)];
        assert_eq!(act(&lanes, &d), Action::Wait);
        let lanes = [Idle { next_iteration: 5 }, busy(3, 1, false)];
        assert_eq!(act(&lanes, &d), Action::Wait);
    }

    #[test]
    fn a_lane_starts_only_on_an_iteration_decided_with_this_replica() {
        let lanes = [Idle { next_iteration: 3 }, Idle { next_iteration: 3 }];
        // Not decided yet, with another lane waiting for the decision slot's combine.
        let d = decided(&[]);
        let waiting = [Idle { next_iteration: 3 }, busy(2, 4, false)];
        assert_eq!(act(&waiting, &d), Action::Wait);
        // Decided without this replica (id 1): out of the membership.
        let d = decided(&[(3, &[0, 2])]);
        assert_eq!(act(&lanes, &d), Action::Leave);
        // Decided with it.
        let d = decided(&[(3, &[1])]);
        assert_eq!(
            act(&lanes, &d),
            Action::Start {
                lane: 0,
                iteration: 3
            }
        );
        // Not a member: nothing starts even if an iteration names this replica.
        let out = Membership {
            me: 1,
            member: false,
            decided: &d,
        };
        assert_eq!(next_action(&lanes, LAYERS, out), Action::Leave);
    }

    #[test]
    fn leave_happens_only_when_every_lane_is_idle() {
        let d = decided(&[]);
        for lanes in [
            [Idle { next_iteration: 3 }, busy(2, 1, false)],
            [busy(2, 4, false), Idle { next_iteration: 3 }],
            [busy(2, 1, true), Idle { next_iteration: 3 }],
            [busy(2, 4, true), Idle { next_iteration: 3 }],
        ] {
            assert_ne!(act(&lanes, &d), Action::Leave, "{lanes:?}");
        }
        let idle = [Idle { next_iteration: 3 }, Idle { next_iteration: 3 }];
        assert_eq!(act(&idle, &d), Action::Leave);
        assert_eq!(act(&[], &d), Action::Leave);
    }

    #[test]
    fn interleaving_runs_other_lanes_layers_only() {
        let lanes = [
            busy(5, LAYERS, true),
            busy(5, 2, true),
            busy(6, LAYERS, true),
            Idle { next_iteration: 6 },
        ];
        assert_eq!(interleave(&lanes, LAYERS, 0), Some(1));
        assert_eq!(
            interleave(&lanes, LAYERS, 1),
            None,
            "done lanes and idle lanes wait"
        );
        let lanes = [busy(5, LAYERS, true), busy(5, 2, false)];
        assert_eq!(
            interleave(&lanes, LAYERS, 0),
            None,
            "its combine is not here"
        );
    }
}
