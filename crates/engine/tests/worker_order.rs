//! The expert worker on its own, driven by hand through the in-process transport: it takes a
//! slot as soon as every member's dispatch for it is here, whatever older slot of another
//! micro-batch is still missing (a replica's lanes drift apart), and it refuses dispatches
//! for iterations worker 0 has not started.

use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::{Members, Slot};
use tandem_engine::expert_worker::ExpertWorker;
use tandem_engine::stats::WorkerStats;
use tandem_engine::transport::{in_process, ReplicaLink, SlotHeader, ToReplica, ToWorker};
use tandem_engine::{DispatchMsg, EngineError};
use tandem_model::{Assignment, Model};

const WAIT: Duration = Duration::from_secs(20);

/// The worker's thread: what `ExpertWorker::run` returned.
type Worker = std::thread::JoinHandle<Result<(), EngineError>>;

fn start(micro_batches: u32) -> (Arc<Model>, Box<dyn ReplicaLink>, Worker) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral");
    let model = Arc::new(Model::load(&dir).unwrap());
    let (mut reps, mut exps) = in_process(1, 1);
    let worker = ExpertWorker {
        id: 0,
        model: model.clone(),
        link: exps.remove(0),
        micro_batches,
        experts: (0..model.cfg.num_experts as u32).collect(),
        initial_epoch: 1,
        recover: false,
        status: Default::default(),
    };
    let h = std::thread::spawn(move || worker.run(&WorkerStats::default()));
    (model, reps.remove(0), h)
}

/// Joins and returns (epoch, iteration) of the welcome.
fn join(link: &dyn ReplicaLink) -> (u64, u64) {
    link.control(ToWorker::Join { replica: 0 }).unwrap();
    match link.recv(WAIT).unwrap() {
        ToReplica::Welcome {
            epoch,
            iteration,
            members,
        } => {
            assert_eq!(members, Members::one(0));
            (epoch, iteration)
        }
        _ => panic!("expected a welcome"),
    }
}

/// One row routed to expert 0.
fn dispatch(model: &Model, epoch: u64, slot: Slot) -> DispatchMsg {
    let d = model.cfg.hidden_size;
    let x = Tensor::from_vec(vec![0.5f32; d], (1, d), &Device::Cpu).unwrap();
    DispatchMsg {
        header: SlotHeader {
            epoch,
            slot,
            sender: 0,
        },
        members: Members::one(0),
        more: true,
        x,
        assignments: vec![Assignment {
            row: 0,
            expert: 0,
            weight: 1.0,
        }],
    }
}

fn combine_slot(link: &dyn ReplicaLink) -> Slot {
    match link.recv(WAIT).unwrap() {
        ToReplica::Combine(c) => {
            assert_eq!(c.y.dims(), &[1, c.y.dims()[1]]);
            c.header.slot
        }
        _ => panic!("expected a combine"),
    }
}

fn moe_layers(model: &Model) -> Vec<u32> {
    (0..model.cfg.num_layers)
        .filter(|l| model.cfg.is_moe_layer(*l))
        .map(|l| l as u32)
        .collect()
}

#[test]
fn a_lane_ahead_is_not_held_back_by_a_lane_behind() {
    let (model, link, worker) = start(2);
    let moe = moe_layers(&model);
    assert!(moe.len() >= 2, "the fixture needs two MoE layers");
    let (epoch, it) = join(link.as_ref());
    // Lane 0 runs two layers while lane 1 has sent nothing yet.
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[0], 0)))
        .unwrap();
    assert_eq!(combine_slot(link.as_ref()), Slot::new(it, moe[0], 0));
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[1], 0)))
        .unwrap();
    assert_eq!(
        combine_slot(link.as_ref()),
        Slot::new(it, moe[1], 0),
        "the later slot of lane 0 waited for lane 1"
    );
    // Lane 1 catches up.
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[0], 1)))
        .unwrap();
    assert_eq!(combine_slot(link.as_ref()), Slot::new(it, moe[0], 1));
    // Sending a processed slot again is a protocol error that stops the (in-process) worker.
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[0], 1)))
        .unwrap();
    let err = worker.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("over or not a slot"), "{err}");
}

#[test]
fn a_dispatch_for_an_iteration_worker_0_did_not_start_is_refused() {
    let (model, link, worker) = start(2);
    let moe = moe_layers(&model);
    let (epoch, it) = join(link.as_ref());
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it + 1, moe[0], 0)))
        .unwrap();
    let err = worker.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("did not start"), "{err}");
}

/// A replica whose join timed out drops the welcome that came too late and asks again: worker
/// 0 counts it in the iteration it welcomed it to, so it must answer with that welcome again
/// (it once queued the join behind an iteration nobody would run, and every request of the
/// deployment failed from then on while `/health` said 200).
#[test]
fn a_lost_welcome_is_sent_again() {
    let (model, link, _worker) = start(2);
    let moe = moe_layers(&model);
    let (epoch, it) = join(link.as_ref());
    assert_eq!(join(link.as_ref()), (epoch, it), "the welcome sent again");
    // The replica can run the iteration it was welcomed to.
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[0], 0)))
        .unwrap();
    assert_eq!(combine_slot(link.as_ref()), Slot::new(it, moe[0], 0));
}

/// A replica asking to join an iteration it has already sent dispatches for has lost its place
/// in the middle of it: worker 0 starts a new epoch (telling it so) and welcomes it there.
#[test]
fn a_join_in_the_middle_of_an_iteration_starts_a_new_epoch() {
    let (model, link, _worker) = start(2);
    let moe = moe_layers(&model);
    let (epoch, it) = join(link.as_ref());
    link.dispatch(0, dispatch(&model, epoch, Slot::new(it, moe[0], 0)))
        .unwrap();
    assert_eq!(combine_slot(link.as_ref()), Slot::new(it, moe[0], 0));
    link.control(ToWorker::Join { replica: 0 }).unwrap();
    match link.recv(WAIT).unwrap() {
        ToReplica::Reset { epoch: e, why } => {
            assert_eq!(e, epoch + 1);
            assert!(why.contains("asked to join"), "{why}");
        }
        _ => panic!("expected a reset"),
    }
    match link.recv(WAIT).unwrap() {
        ToReplica::Welcome {
            epoch: e,
            iteration,
            members,
        } => {
            assert_eq!((e, members), (epoch + 1, Members::one(0)));
            assert!(iteration > it, "welcomed to {iteration}, not after {it}");
        }
        _ => panic!("expected a welcome"),
    }
}
