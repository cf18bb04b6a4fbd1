//! The ping-pong policy: which of an attention replica's lanes does what next, and how a lane
//! moves from state to state. Pure functions with model-free tests, shared by the engine
//! (`tandem-engine`'s `replica.rs` runs them on real work) and the planner (`tandem-plan`'s
//! `engine_model.rs` runs them on modeled costs), so the two cannot drift apart.
//!
//! A replica splits its sequences into `m` lanes (one per micro-batch). With remote experts
//! each lane is an independent chain of layers, and the expert workers take each lane's slots
//! as its dispatches complete. A lane moves through these states ([`Lane`]; the replica holds
//! the data, [`transition`] is every move, [`next_action`] decides which move comes next):
//!
//! ```text
//!            Start (iteration decided, this replica a member, no lane behind)
//!   Idle ─────────────────────────────────────────────► Running(layer 0)
//!    ▲                                                      │ run layer l
//!    │                              RanHere (dense layer,    ▼
//!    │                             ┌─── or colocated) ─── attention ── Dispatched (MoE) ──┐
//!    │                             ▼                                                     ▼
//!    │                    Running(l + 1) ◄──── Settled (every worker's Combine) ─── Waiting(slot)
//!    │                             │ l + 1 == layers                                     │
//!    │                             ▼                                                     │
//!    └── Finished: LM head ─── Done ◄──────────── (last layer settled) ──────────────────┘
//!          (other lanes' layers between its parts), sampling, tokens out
//! ```
//!
//! plus `Join` (an idle replica joins the membership: every lane idle on the iteration worker
//! 0 named) and `Abandoned` (after an error: the lane's step is lost, it is idle on the
//! iteration after it).
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
//! Colocated (no remote experts) the same policy runs a round: every lane starts the round's
//! iteration, then [`next_action`] with nothing further decided runs the layers (the lane
//! furthest behind first, so layer by layer and lane by lane) and finishes the lanes in order
//! until every lane is idle again ([`Action::Leave`] ends the round).

use crate::Members;
use std::collections::BTreeMap;

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

/// The replica's view of the membership protocol (see `tandem-engine`'s `transport.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Membership<'a> {
    /// This replica's id.
    pub me: u32,
    /// Whether it takes part in the pipeline.
    pub member: bool,
    /// The members of each iteration decided so far.
    pub decided: &'a BTreeMap<u64, Members>,
}

impl Membership<'static> {
    /// No membership protocol (colocated): nothing is decided, so the policy starts no lane
    /// and leaves once every lane is idle.
    pub fn none(me: u32) -> Self {
        static NOTHING: BTreeMap<u64, Members> = BTreeMap::new();
        Membership {
            me,
            member: false,
            decided: &NOTHING,
        }
    }
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

/// Every layer a lane has: how many, and how many expert workers send it a combine per MoE
/// layer (0 colocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneShape {
    pub layers: usize,
    pub workers: usize,
}

/// One lane's state without its data (the replica keeps the step's tensors beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// No step; the next one runs `next_iteration`.
    Idle { next_iteration: u64 },
    /// A step of `iteration` whose hidden state is here; layer `next_layer` runs next.
    Running { iteration: u64, next_layer: usize },
    /// MoE layer `layer` of a step of `iteration` is with the expert workers (the slot
    /// `(iteration, layer, lane)`); `combines` of their combines have arrived.
    Waiting {
        iteration: u64,
        layer: usize,
        combines: usize,
    },
    /// Every layer of a step of `iteration` ran: the LM head, sampling and the scheduler's
    /// update are next.
    Done { iteration: u64 },
}

/// What happened to a lane (see the diagram in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The replica joined the membership at `iteration`: an idle lane's next step runs it.
    Join { iteration: u64 },
    /// An idle lane was scheduled and its tokens embedded for `iteration` (never one it has
    /// passed).
    Start { iteration: u64 },
    /// The lane's next layer ran here in full (a dense layer, or colocated experts).
    RanHere,
    /// The lane's next layer ran its attention and sent its tokens to the expert workers.
    Dispatched,
    /// One worker's combine of slot `(iteration, layer, this lane)` arrived.
    Combine { iteration: u64, layer: usize },
    /// Every worker's combine was added into the lane's hidden state.
    Settled,
    /// The lane's LM head, sampling and scheduler update ran: its step is over.
    Finished,
    /// After an error: the lane's step (if any) is lost.
    Abandoned,
}

/// An event the lane's state does not allow (a protocol error or a bug, never applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a lane in state {lane:?} cannot take {event:?}: {why}")]
pub struct LaneError {
    pub lane: Lane,
    pub event: Event,
    pub why: &'static str,
}

impl Lane {
    /// The iteration this lane's next step runs.
    pub fn next_iteration(self) -> u64 {
        match self {
            Lane::Idle { next_iteration } => next_iteration,
            Lane::Running { iteration, .. }
            | Lane::Waiting { iteration, .. }
            | Lane::Done { iteration } => iteration + 1,
        }
    }

    /// The iteration of the step in flight, if any.
    pub fn iteration(self) -> Option<u64> {
        match self {
            Lane::Idle { .. } => None,
            Lane::Running { iteration, .. }
            | Lane::Waiting { iteration, .. }
            | Lane::Done { iteration } => Some(iteration),
        }
    }

    /// The layer that runs next, if the lane's hidden state is here and it has one left.
    pub fn runnable_layer(self) -> Option<usize> {
        match self {
            Lane::Running { next_layer, .. } => Some(next_layer),
            _ => None,
        }
    }

    /// The lane as [`next_action`] sees it.
    pub fn progress(self, shape: LaneShape) -> Progress {
        let busy = |iteration, next_layer, input_here| Progress::Busy {
            iteration,
            next_layer,
            input_here,
        };
        match self {
            Lane::Idle { next_iteration } => Progress::Idle { next_iteration },
            Lane::Running {
                iteration,
                next_layer,
            } => busy(iteration, next_layer, true),
            Lane::Waiting {
                iteration,
                layer,
                combines,
            } => busy(iteration, layer + 1, combines >= shape.workers),
            Lane::Done { iteration } => busy(iteration, shape.layers, true),
        }
    }
}

/// After layer `layer` of a step of `iteration` settled on the replica: done if it was the
/// last layer, else running the next one.
fn after_layer(iteration: u64, layer: usize, shape: LaneShape) -> Lane {
    if layer + 1 >= shape.layers {
        Lane::Done { iteration }
    } else {
        Lane::Running {
            iteration,
            next_layer: layer + 1,
        }
    }
}

/// Every move of a lane: its state after `event`, or why the event is not allowed there.
pub fn transition(lane: Lane, event: Event, shape: LaneShape) -> Result<Lane, LaneError> {
    let refuse = |why| Err(LaneError { lane, event, why });
    match (lane, event) {
        (Lane::Idle { .. }, Event::Join { iteration }) => Ok(Lane::Idle {
            next_iteration: iteration,
        }),
        (_, Event::Join { .. }) => refuse("only an idle lane joins"),
        (Lane::Idle { next_iteration }, Event::Start { iteration }) => {
            if iteration < next_iteration {
                refuse("an iteration the lane has passed")
            } else if shape.layers == 0 {
                Ok(Lane::Done { iteration })
            } else {
                Ok(Lane::Running {
                    iteration,
                    next_layer: 0,
                })
            }
        }
        (_, Event::Start { .. }) => refuse("a step is in flight"),
        (
            Lane::Running {
                iteration,
                next_layer,
            },
            Event::RanHere,
        ) => Ok(after_layer(iteration, next_layer, shape)),
        (
            Lane::Running {
                iteration,
                next_layer,
            },
            Event::Dispatched,
        ) => Ok(Lane::Waiting {
            iteration,
            layer: next_layer,
            combines: 0,
        }),
        (_, Event::RanHere | Event::Dispatched) => refuse("no layer to run"),
        (
            Lane::Waiting {
                iteration,
                layer,
                combines,
            },
            Event::Combine {
                iteration: i,
                layer: l,
            },
        ) if i == iteration && l == layer => {
            if combines >= shape.workers {
                refuse("every worker's combine is already here")
            } else {
                Ok(Lane::Waiting {
                    iteration,
                    layer,
                    combines: combines + 1,
                })
            }
        }
        (_, Event::Combine { .. }) => refuse("the lane does not wait for that slot"),
        (
            Lane::Waiting {
                iteration,
                layer,
                combines,
            },
            Event::Settled,
        ) => {
            if combines < shape.workers {
                refuse("settled before every worker's combine arrived")
            } else {
                Ok(after_layer(iteration, layer, shape))
            }
        }
        (_, Event::Settled) => refuse("the lane waits for no combine"),
        (Lane::Done { iteration }, Event::Finished) => Ok(Lane::Idle {
            next_iteration: iteration + 1,
        }),
        (_, Event::Finished) => refuse("finished before its last layer"),
        (_, Event::Abandoned) => Ok(Lane::Idle {
            next_iteration: lane.next_iteration(),
        }),
    }
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
    const SHAPE: LaneShape = LaneShape {
        layers: 3,
        workers: 2,
    };

    fn running(iteration: u64, next_layer: usize) -> Lane {
        Lane::Running {
            iteration,
            next_layer,
        }
    }

    fn waiting(iteration: u64, layer: usize, combines: usize) -> Lane {
        Lane::Waiting {
            iteration,
            layer,
            combines,
        }
    }

    fn step(lane: Lane, event: Event) -> Result<Lane, LaneError> {
        transition(lane, event, SHAPE)
    }

    /// Every state a lane can be in, for the refusals.
    fn every_state() -> [Lane; 4] {
        [
            Lane::Idle { next_iteration: 4 },
            running(4, 1),
            waiting(4, 1, 1),
            Lane::Done { iteration: 4 },
        ]
    }

    /// `event` is refused in every state but the ones `allowed` accepts.
    fn refused_elsewhere(event: Event, allowed: impl Fn(Lane) -> bool) {
        for lane in every_state().into_iter().filter(|l| !allowed(*l)) {
            let e = match step(lane, event) {
                Ok(next) => panic!("{lane:?} + {event:?} gave {next:?}"),
                Err(e) => e,
            };
            assert_eq!((e.lane, e.event), (lane, event));
        }
    }

    #[test]
    fn join_sets_an_idle_lanes_next_iteration() {
        let j = Event::Join { iteration: 9 };
        assert_eq!(
            step(Lane::Idle { next_iteration: 2 }, j),
            Ok(Lane::Idle { next_iteration: 9 })
        );
        refused_elsewhere(j, |l| matches!(l, Lane::Idle { .. }));
    }

    #[test]
    fn start_runs_layer_zero_of_an_iteration_not_passed() {
        let idle = Lane::Idle { next_iteration: 4 };
        assert_eq!(step(idle, Event::Start { iteration: 4 }), Ok(running(4, 0)));
        // A later iteration (the lane sat out some), never an earlier one.
        assert_eq!(step(idle, Event::Start { iteration: 6 }), Ok(running(6, 0)));
        let e = step(idle, Event::Start { iteration: 3 }).unwrap_err();
        assert_eq!(e.why, "an iteration the lane has passed");
        // A model without layers is done at once.
        let none = LaneShape {
            layers: 0,
            workers: 2,
        };
        assert_eq!(
            transition(idle, Event::Start { iteration: 4 }, none),
            Ok(Lane::Done { iteration: 4 })
        );
        refused_elsewhere(Event::Start { iteration: 5 }, |l| {
            matches!(l, Lane::Idle { .. })
        });
    }

    #[test]
    fn a_layer_run_here_moves_to_the_next_or_done_after_the_last() {
        assert_eq!(step(running(4, 0), Event::RanHere), Ok(running(4, 1)));
        assert_eq!(step(running(4, 1), Event::RanHere), Ok(running(4, 2)));
        assert_eq!(
            step(running(4, 2), Event::RanHere),
            Ok(Lane::Done { iteration: 4 })
        );
        refused_elsewhere(Event::RanHere, |l| matches!(l, Lane::Running { .. }));
    }

    #[test]
    fn a_dispatch_waits_for_the_layers_slot() {
        assert_eq!(step(running(4, 1), Event::Dispatched), Ok(waiting(4, 1, 0)));
        assert_eq!(step(running(4, 2), Event::Dispatched), Ok(waiting(4, 2, 0)));
        refused_elsewhere(Event::Dispatched, |l| matches!(l, Lane::Running { .. }));
    }

    #[test]
    fn combines_count_only_for_the_awaited_slot_and_at_most_one_per_worker() {
        let c = Event::Combine {
            iteration: 4,
            layer: 1,
        };
        assert_eq!(step(waiting(4, 1, 0), c), Ok(waiting(4, 1, 1)));
        assert_eq!(step(waiting(4, 1, 1), c), Ok(waiting(4, 1, 2)));
        let e = step(waiting(4, 1, 2), c).unwrap_err();
        assert_eq!(e.why, "every worker's combine is already here");
        for other in [
            Event::Combine {
                iteration: 5,
                layer: 1,
            },
            Event::Combine {
                iteration: 4,
                layer: 2,
            },
        ] {
            let e = step(waiting(4, 1, 0), other).unwrap_err();
            assert_eq!(e.why, "the lane does not wait for that slot");
        }
        refused_elsewhere(c, |l| matches!(l, Lane::Waiting { .. }));
    }

    #[test]
    fn settling_needs_every_combine_and_moves_to_the_next_layer_or_done() {
        let e = step(waiting(4, 1, 1), Event::Settled).unwrap_err();
        assert_eq!(e.why, "settled before every worker's combine arrived");
        assert_eq!(step(waiting(4, 1, 2), Event::Settled), Ok(running(4, 2)));
        assert_eq!(
            step(waiting(4, 2, 2), Event::Settled),
            Ok(Lane::Done { iteration: 4 })
        );
        refused_elsewhere(Event::Settled, |l| matches!(l, Lane::Waiting { .. }));
    }

    #[test]
    fn finishing_a_done_lane_makes_it_idle_on_the_next_iteration() {
        assert_eq!(
            step(Lane::Done { iteration: 4 }, Event::Finished),
            Ok(Lane::Idle { next_iteration: 5 })
        );
        let e = step(running(4, 1), Event::Finished).unwrap_err();
        assert_eq!(e.why, "finished before its last layer");
        refused_elsewhere(Event::Finished, |l| matches!(l, Lane::Done { .. }));
    }

    #[test]
    fn abandoning_drops_the_step_and_keeps_the_iteration_count() {
        assert_eq!(
            step(Lane::Idle { next_iteration: 4 }, Event::Abandoned),
            Ok(Lane::Idle { next_iteration: 4 })
        );
        for lane in &every_state()[1..] {
            assert_eq!(
                step(*lane, Event::Abandoned),
                Ok(Lane::Idle { next_iteration: 5 }),
                "{lane:?}"
            );
        }
    }

    #[test]
    fn the_policy_sees_a_waiting_lanes_input_once_every_combine_is_here() {
        let busy = |iteration, next_layer, input_here| Busy {
            iteration,
            next_layer,
            input_here,
        };
        assert_eq!(waiting(4, 1, 1).progress(SHAPE), busy(4, 2, false));
        assert_eq!(waiting(4, 1, 2).progress(SHAPE), busy(4, 2, true));
        assert_eq!(running(4, 1).progress(SHAPE), busy(4, 1, true));
        assert_eq!(
            Lane::Done { iteration: 4 }.progress(SHAPE),
            busy(4, 3, true)
        );
        assert_eq!(
            Lane::Idle { next_iteration: 4 }.progress(SHAPE),
            Idle { next_iteration: 4 }
        );
        assert_eq!(running(4, 1).runnable_layer(), Some(1));
        assert_eq!(waiting(4, 1, 2).runnable_layer(), None);
        assert_eq!(waiting(4, 1, 2).iteration(), Some(4));
        assert_eq!(Lane::Idle { next_iteration: 4 }.iteration(), None);
    }

    #[test]
    fn colocated_a_round_runs_layer_by_layer_then_finishes_lane_by_lane() {
        // Two lanes started on iteration 0, every layer run here, nothing else decided.
        let shape = LaneShape {
            layers: 2,
            workers: 0,
        };
        let mut lanes = [Lane::Idle { next_iteration: 0 }; 2];
        for l in &mut lanes {
            *l = transition(*l, Event::Start { iteration: 0 }, shape).unwrap();
        }
        let mut seen = Vec::new();
        loop {
            let p: Vec<Progress> = lanes.iter().map(|l| l.progress(shape)).collect();
            let a = next_action(&p, shape.layers, Membership::none(0));
            seen.push(a);
            let (k, event) = match a {
                Action::RunLayer(k) => (k, Event::RanHere),
                Action::Finish(k) => (k, Event::Finished),
                Action::Leave => break,
                other => panic!("{other:?}"),
            };
            lanes[k] = transition(lanes[k], event, shape).unwrap();
        }
        use Action::{Finish, Leave, RunLayer};
        assert_eq!(
            seen,
            [
                RunLayer(0),
                RunLayer(1),
                RunLayer(0),
                RunLayer(1),
                Finish(0),
                Finish(1),
                Leave
            ]
        );
        assert_eq!(lanes, [Lane::Idle { next_iteration: 1 }; 2]);
    }
}
