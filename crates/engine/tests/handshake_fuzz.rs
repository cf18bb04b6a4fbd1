//! The M2N handshake against hostile peers (issue: chaos and fuzz): a worker with a cluster
//! secret receives (a) random bytes, (b) a valid hello followed by random bytes, (c) hellos
//! and proofs with random field values, cut at a random point. Every connection must be
//! closed by the worker within its handshake deadline (plus scheduling slack), nothing in
//! the process may panic, and afterwards a properly keyed replica still gets the greedy
//! tokens of the colocated reference.

use proptest::prelude::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tandem_core::deployment::Addresses;
use tandem_core::Deployment;
use tandem_engine::auth::ClusterSecret;
use tandem_engine::net::{serve_expert, Identity, NetOptions, TcpReplicaLink};
use tandem_engine::wire::{write_frame, Frame, Header, WIRE_VERSION};
use tandem_engine::{Engine, EngineOptions};
use tandem_model::generate::greedy;
use tandem_model::{ExpertSelection, Model};
use tandem_sched::{FinishReason, SamplingParams};

const DEADLINE: Duration = Duration::from_millis(400);
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(15);

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral")
}

fn secret() -> ClusterSecret {
    ClusterSecret::new("fuzz-test-cluster-secret-0123456789", "test").unwrap()
}

fn net() -> NetOptions {
    NetOptions {
        cluster_secret: Some(secret()),
        handshake_timeout: DEADLINE,
        ..NetOptions::default()
    }
}

/// One keyed expert worker (the whole deployment's experts) in this process, for every
/// case; the panic hook counts panics on any thread (a worker connection's included).
fn worker() -> &'static (Deployment, String) {
    static W: OnceLock<(Deployment, String)> = OnceLock::new();
    W.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info)
        }));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let dep = Deployment {
            attention_replicas: 1,
            expert_workers: 1,
            micro_batches: 2,
            kv_block_size: 4,
            num_kv_blocks: 256,
            addresses: Addresses {
                attention: vec![],
                expert: vec![addr.clone()],
            },
            ..Deployment::default()
        };
        let model = Arc::new(Model::load_with(dir(), &ExpertSelection::All).unwrap());
        let d = dep.clone();
        std::thread::spawn(move || {
            let _ = serve_expert(model, &d, 0, l, net());
        });
        (dep, addr)
    })
}

fn identity() -> &'static Identity {
    static I: OnceLock<Identity> = OnceLock::new();
    I.get_or_init(|| {
        let model = Model::load_with(dir(), &ExpertSelection::None).unwrap();
        Identity::new(&model, &worker().0).unwrap()
    })
}

fn frame(f: &Frame) -> Vec<u8> {
    let mut b = Vec::new();
    write_frame(&mut b, f, 0).unwrap();
    b
}

fn hello(v: serde_json::Value) -> Vec<u8> {
    frame(&Frame::Hello(v.to_string()))
}

fn valid_hello() -> serde_json::Value {
    serde_json::json!({"wire_version": WIRE_VERSION, "tandem_version": "fuzz", "role": "replica",
        "rank": 0, "identity": identity(), "nonce": "ab".repeat(32), "authenticated": true})
}

/// Sends `bytes` (keeping our side open) and waits for the worker to close the connection:
/// EOF or a reset within the deadline + slack. What it sent before closing is ignored.
fn closed_in_time(bytes: &[u8]) -> Result<(), String> {
    let t = Instant::now();
    let mut s = TcpStream::connect(&worker().1).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(DEADLINE + SLACK)).unwrap();
    // The worker may close before it has read everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "still open after {:?} ({} bytes sent)",
                    t.elapsed(),
                    bytes.len()
                ))
            }
            Err(_) => break, // reset
        }
    }
    if t.elapsed() > DEADLINE + SLACK {
        return Err(format!("closed after {:?}", t.elapsed()));
    }
    Ok(())
}

/// A hex string of random length (a valid nonce has 64 digits), sometimes not hex at all.
fn hexish() -> impl Strategy<Value = String> {
    prop_oneof!["[0-9a-f]{64}", "[0-9a-f]{0,80}", ".{0,40}",]
}

/// Hello and proof with random field values (some valid, some not), encoded.
fn random_frames() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(WIRE_VERSION), any::<u16>()],
        prop_oneof![
            Just("replica".to_string()),
            Just("status".to_string()),
            ".{0,12}"
        ],
        any::<u32>(),
        any::<bool>(),
        hexish(),
        any::<bool>(),
        hexish(),
        prop_oneof![
            Just(serde_json::Value::Null),
            Just(serde_json::json!("bf16")),
            Just(serde_json::json!(17)),
        ],
    )
        .prop_map(|(v, role, rank, auth, nonce, with_id, proof, dtype)| {
            let mut h = valid_hello();
            h["wire_version"] = v.into();
            h["role"] = role.into();
            h["rank"] = rank.into();
            h["authenticated"] = auth.into();
            h["nonce"] = nonce.into();
            if !with_id {
                h["identity"] = serde_json::json!({"model_hash": 3});
            }
            if !dtype.is_null() {
                h["wire_dtype"] = dtype;
            }
            let mut b = hello(h);
            b.extend(frame(&Frame::Proof(
                serde_json::json!({ "proof": proof }).to_string(),
            )));
            b
        })
}

/// A header with the right magic and a random kind and payload length, then random bytes.
fn lying_header() -> impl Strategy<Value = Vec<u8>> {
    (
        1u16..=20,
        any::<u64>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(kind, len, rows, tail)| {
            let mut b = Header {
                kind,
                rows,
                payload_len: len % (1 << 20),
                ..Header::default()
            }
            .encode()
            .to_vec();
            b.extend(tail);
            b
        })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // (a) random bytes
        proptest::collection::vec(any::<u8>(), 0..512),
        // (b) a valid hello, then random bytes
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(|tail| {
            let mut b = hello(valid_hello());
            b.extend(tail);
            b
        }),
        // (c) frames with random field values, cut at a random point
        (random_frames(), any::<prop::sample::Index>()).prop_map(|(b, cut)| {
            let n = cut.index(b.len() + 1);
            b[..n].to_vec()
        }),
        lying_header(),
    ]
}

/// 64 hostile connections (a fixed budget: a few seconds), then a keyed replica is served
/// the colocated greedy tokens.
#[test]
fn hostile_handshakes_are_closed_in_time_and_a_keyed_replica_still_served() {
    worker();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        max_shrink_iters: 32,
        ..ProptestConfig::default()
    });
    let t = Instant::now();
    runner
        .run(&input(), |bytes| {
            prop_assert_eq!(closed_in_time(&bytes), Ok(()));
            prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
            Ok(())
        })
        .unwrap();
    println!("64 hostile handshakes in {:?}", t.elapsed());
    let (dep, _) = worker();
    let model = Arc::new(Model::load_with(dir(), &ExpertSelection::None).unwrap());
    let link = TcpReplicaLink::connect(
        0,
        dep.addresses.expert.clone(),
        Identity::new(&model, dep).unwrap(),
        net(),
    );
    link.wait_ready(Duration::from_secs(20)).unwrap();
    let engine = Engine::start_remote(
        model.clone(),
        None,
        EngineOptions {
            deployment: dep.clone(),
            peer_timeout: Duration::from_secs(20),
            ..EngineOptions::default()
        },
        0,
        Box::new(link),
    )
    .unwrap();
    let reference = Model::load(dir()).unwrap();
    for prompt in [vec![3u32, 4, 5], vec![11, 2, 40, 7, 9]] {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: Some(6),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let mut rx = engine.add_request(prompt.clone(), params).unwrap().rx;
        let mut toks = Vec::new();
        while let Some(o) = rx.blocking_recv() {
            toks.extend(o.token);
            if let Some(f) = o.finish {
                assert!(
                    !matches!(f.reason, FinishReason::Error(_)),
                    "{:?}",
                    f.reason
                );
                break;
            }
        }
        assert_eq!(toks, greedy(&reference, &prompt, 6).unwrap().0);
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}
