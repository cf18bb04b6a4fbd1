//! M2N over TCP on loopback, in one test process: expert workers served by `serve_expert` on
//! their own listeners, attention replicas started with `Engine::start_remote` — the same code
//! the multi-process roles run. Greedy tokens must equal the colocated reference for every
//! fixture family (with a cluster secret, and once without); a peer with another model or
//! deployment is refused with a reason; a malformed frame drops the connection, not the
//! worker. Authentication (issue #17): a peer without the secret, with another one, or
//! replaying a recorded handshake is refused and logged with its address, a connection that
//! does not complete the handshake is closed in bounded time, a replica refuses a worker that
//! cannot prove the secret, and the deployment keeps serving a keyed replica throughout.
//! TLS: the same greedy tokens over TLS (and mutual TLS); a replica with another CA, a
//! certificate for another name, a plaintext peer of a TLS worker (and the reverse), and a
//! replica without the client certificate a worker requires are refused with the reason on
//! both sides; a TLS handshake that does not complete is closed within the deadline; unusable
//! PEM files are named in the error.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::deployment::Addresses;
use tandem_core::Deployment;
use tandem_engine::auth::ClusterSecret;
use tandem_engine::net::{
    query_status, query_status_with, serve_expert, Identity, NetOptions, TcpReplicaLink,
};
use tandem_engine::tls::{TlsClient, TlsServer};
use tandem_engine::wire::{read_frame, write_frame, Frame, Header};
use tandem_engine::{Engine, EngineOptions, RequestHandle, RequestOutput};
use tandem_model::generate::greedy;
use tandem_model::{ExpertSelection, Model};
use tandem_sched::{FinishReason, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Binds `n` loopback listeners on free ports.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (ls, addrs)
}

fn deployment(n_a: u32, n_e: u32, m: u32, expert: Vec<String>) -> Deployment {
    Deployment {
        attention_replicas: n_a,
        expert_workers: n_e,
        micro_batches: m,
        kv_block_size: 4,
        num_kv_blocks: 256,
        addresses: Addresses {
            attention: vec![],
            expert,
        },
        ..Deployment::default()
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new("tcp-test-cluster-secret-0123456789", "test").unwrap()
}

/// The options every test uses unless it says otherwise: the suite runs with a secret.
fn keyed() -> NetOptions {
    NetOptions {
        cluster_secret: Some(secret()),
        ..NetOptions::default()
    }
}

/// Starts every expert worker of `dep` on its listener (each loading only its experts),
/// with the cluster secret.
fn start_workers(dir: &Path, dep: &Deployment, ls: Vec<TcpListener>) {
    start_workers_with(dir, dep, ls, keyed())
}

fn start_workers_with(dir: &Path, dep: &Deployment, ls: Vec<TcpListener>, opts: NetOptions) {
    let cfg = tandem_model::ModelConfig::from_dir(dir).unwrap();
    let placement = dep.placement_for(cfg.num_experts).unwrap();
    for (w, l) in ls.into_iter().enumerate() {
        let sel = ExpertSelection::Only(placement.experts_of(w as u32));
        let model = Arc::new(Model::load_with(dir, &sel).unwrap());
        let dep = dep.clone();
        let opts = opts.clone();
        std::thread::spawn(move || {
            let _ = serve_expert(model, &dep, w as u32, l, opts);
        });
    }
}

fn start_replica(model: &Arc<Model>, dep: &Deployment, rank: u32) -> Engine {
    start_replica_with(model, dep, rank, keyed())
}

fn start_replica_with(model: &Arc<Model>, dep: &Deployment, rank: u32, net: NetOptions) -> Engine {
    let link = TcpReplicaLink::connect(
        rank,
        dep.addresses.expert.clone(),
        Identity::new(model, dep).unwrap(),
        net,
    );
    link.wait_ready(Duration::from_secs(20)).unwrap();
    Engine::start_remote(
        model.clone(),
        None,
        EngineOptions {
            deployment: dep.clone(),
            peer_timeout: Duration::from_secs(20),
            ..EngineOptions::default()
        },
        rank,
        Box::new(link),
    )
    .unwrap()
}

fn collect(h: RequestHandle) -> Result<Vec<u32>, String> {
    collect_rx(h.rx)
}

fn collect_rx(mut rx: UnboundedReceiver<RequestOutput>) -> Result<Vec<u32>, String> {
    let mut toks = Vec::new();
    while let Some(o) = rx.blocking_recv() {
        toks.extend(o.token);
        if let Some(f) = o.finish {
            if let FinishReason::Error(e) = f.reason {
                return Err(e);
            }
            break;
        }
    }
    Ok(toks)
}

fn greedy_params(n: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    (0..6)
        .map(|i| {
            (0..3 + 2 * i)
                .map(|j| ((i * 31 + j * 7 + 1) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Held by a run that lends every matrix, while it counts loans.
static LENDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The suite of one family over both same-host transports: shared memory (the default
/// between processes of one host; every matrix lent, read once by the peer, where the
/// default lends only the large ones and these models' are small) and plain TCP.
fn tcp_equals_colocated(family: &str) {
    tcp_equals_colocated_with(
        family,
        NetOptions {
            // Both ends live in this test process, which a reader refuses to read unless told.
            shm_lending: tandem_engine::shm::Lending {
                min: 1,
                same_process: true,
            },
            ..keyed()
        },
    );
    tcp_equals_colocated_with(
        family,
        NetOptions {
            shared_memory: false,
            ..keyed()
        },
    );
}

/// Every replica of `dep` is connected to every worker over `want` ("shm", "tcp", "tls"),
/// as the workers report it.
fn assert_transport(dep: &Deployment, opts: &NetOptions, want: &str) {
    for (w, a) in dep.addresses.expert.iter().enumerate() {
        let r = query_status_with(
            a,
            Duration::from_secs(5),
            opts.cluster_secret.as_ref(),
            opts.tls_client.as_ref(),
        )
        .unwrap();
        let n = dep.attention_replicas as usize;
        assert_eq!(
            r.transports,
            vec![Some(want.to_string()); n],
            "worker {w}: {r:?}"
        );
    }
}

fn tcp_equals_colocated_with(family: &str, opts: NetOptions) {
    let dir = fixture(family);
    let (ls, addrs) = listeners(2);
    let dep = deployment(2, 2, 2, addrs);
    start_workers_with(&dir, &dep, ls, opts.clone());
    // Replicas hold no routed experts: everything routed goes over TCP.
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let reference = Model::load(&dir).unwrap();
    let engines: Vec<Engine> = (0..2)
        .map(|r| start_replica_with(&model, &dep, r, opts.clone()))
        .collect();
    let want = match (&opts.tls_client, opts.shared_memory) {
        (Some(_), _) => "tls",
        (None, true) => "shm",
        (None, false) => "tcp",
    };
    assert_transport(&dep, &opts, want);
    // The loan counters are the process's: runs that lend take turns, so that what a run
    // counts is its own (the other tests lend nothing: their matrices are below the default).
    let lends = opts.shm_lending.min == 1;
    let _turn = lends.then(|| LENDING.lock().unwrap_or_else(|e| e.into_inner()));
    let loans_before = tandem_engine::shm::loans();
    let ps = prompts(model.cfg.vocab_size);
    let n = 10;
    let handles: Vec<(usize, RequestHandle)> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                i,
                engines[i % 2]
                    .add_request(p.clone(), greedy_params(n))
                    .unwrap(),
            )
        })
        .collect();
    for (i, h) in handles {
        let got = collect(h).unwrap_or_else(|e| panic!("{family} prompt {i}: {e}"));
        let want = greedy(&reference, &ps[i], n).unwrap().0;
        assert_eq!(got, want, "{family} prompt {i}");
    }
    // A second wave after the deployment went idle (members left, workers asleep).
    std::thread::sleep(Duration::from_millis(100));
    let h = engines[1]
        .add_request(ps[0].clone(), greedy_params(n))
        .unwrap();
    assert_eq!(
        collect(h).unwrap(),
        greedy(&reference, &ps[0], n).unwrap().0,
        "{family} after idle"
    );
    // With every matrix lendable, the matrices crossed as loans (the counters are the
    // process's: other tests only add to them).
    if cfg!(target_os = "linux") && want == "shm" && lends {
        let (made, read) = tandem_engine::shm::loans();
        assert!(
            made > loans_before.0 && read > loans_before.1,
            "{family}: no loans ({loans_before:?} -> {:?})",
            (made, read)
        );
    }
}

#[test]
fn tcp_mixtral() {
    tcp_equals_colocated("mixtral");
}
#[test]
fn tcp_qwen2_moe() {
    tcp_equals_colocated("qwen2_moe");
}
#[test]
fn tcp_qwen3_moe() {
    tcp_equals_colocated("qwen3_moe");
}
#[test]
fn tcp_olmoe() {
    tcp_equals_colocated("olmoe");
}
#[test]
fn tcp_dbrx() {
    tcp_equals_colocated("dbrx");
}
#[test]
fn tcp_glm4_moe() {
    tcp_equals_colocated("glm4_moe");
}
#[test]
fn tcp_deepseek_v2() {
    tcp_equals_colocated("deepseek_v2");
}
#[test]
fn tcp_deepseek_v3() {
    tcp_equals_colocated("deepseek_v3");
}
/// The same without a cluster secret on either side (a loopback deployment's default).
#[test]
fn tcp_mixtral_without_a_secret() {
    tcp_equals_colocated_with("mixtral", NetOptions::default());
}

/// Replica 0 sends hidden states in bf16, replica 1 in f32, to the same workers (which
/// answer each in its own type). On these fixtures and prompts the rounding (2^-9 relative,
/// twice a layer) leaves every greedy token as the f32 reference's; a wire path that
/// garbled values, misread a flag or answered in the wrong type would not. Tokens alone
/// would also pass if the option were ignored, so the workers' own count of what arrived is
/// checked too: every dispatch with rows from replica 0 came in bf16 (2 bytes a value), every
/// one from replica 1 in f32.
#[test]
fn bf16_on_the_wire_keeps_the_greedy_tokens() {
    for family in ["mixtral", "qwen2_moe"] {
        let dir = fixture(family);
        let (ls, addrs) = listeners(2);
        let status_addrs = addrs.clone();
        let dep = deployment(2, 2, 2, addrs);
        start_workers(&dir, &dep, ls);
        let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
        let reference = Model::load(&dir).unwrap();
        let bf16 = NetOptions {
            wire_dtype: tandem_engine::wire::WireDtype::Bf16,
            ..keyed()
        };
        let engines = [
            start_replica_with(&model, &dep, 0, bf16),
            start_replica(&model, &dep, 1),
        ];
        let ps = prompts(model.cfg.vocab_size);
        let n = 10;
        let handles: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                engines[i % 2]
                    .add_request(p.clone(), greedy_params(n))
                    .unwrap()
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let got = collect(h).unwrap_or_else(|e| panic!("{family} prompt {i}: {e}"));
            let want = greedy(&reference, &ps[i], n).unwrap().0;
            assert_eq!(got, want, "{family} prompt {i} (replica {})", i % 2);
        }
        let hidden = model.cfg.hidden_size as u64;
        for a in &status_addrs {
            let r = query_status(a, Duration::from_secs(5), Some(&secret())).unwrap();
            let (bf16, f32) = (&r.traffic[0], &r.traffic[1]);
            println!(
                "{family} worker {}: replica 0 {bf16:?}, replica 1 {f32:?}",
                r.worker
            );
            assert!(
                bf16.bf16_dispatches > 0 && bf16.f32_dispatches == 0,
                "{family} worker {}: replica 0 asked for bf16: {bf16:?}",
                r.worker
            );
            assert!(
                f32.f32_dispatches > 0 && f32.bf16_dispatches == 0,
                "{family} worker {}: replica 1 sends f32: {f32:?}",
                r.worker
            );
            // The values take 2 (4) bytes each; the rest is 12-byte assignments, at most
            // top-k per row.
            let top_k = model.cfg.top_k as u64;
            for (t, bytes) in [(bf16, 2), (f32, 4)] {
                let values = t.rows * hidden * bytes;
                let rest = t.payload_bytes.checked_sub(values).unwrap_or_else(|| {
                    panic!("{family}: {t:?} is fewer bytes than {bytes}-byte values")
                });
                assert!(
                    rest % 12 == 0 && rest <= t.rows * top_k * 12,
                    "{family}: {t:?} is not {bytes}-byte values plus assignments"
                );
            }
        }
    }
}

#[test]
fn a_peer_with_another_model_or_deployment_is_refused_with_a_reason() {
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers(&dir, &dep, ls);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let other = Arc::new(Model::load_with(fixture("olmoe"), &ExpertSelection::None).unwrap());
    let link = TcpReplicaLink::connect(
        0,
        addrs.clone(),
        Identity::new(&other, &dep).unwrap(),
        keyed(),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("model mismatch"), "{e}");
    let other_dep = deployment(1, 1, 3, addrs.clone());
    let link = TcpReplicaLink::connect(
        0,
        addrs.clone(),
        Identity::new(&model, &other_dep).unwrap(),
        keyed(),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("deployment mismatch"), "{e}");
    // A rank the deployment does not have.
    let link = TcpReplicaLink::connect(
        5,
        addrs.clone(),
        Identity::new(&model, &dep).unwrap(),
        keyed(),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("rank 5"), "{e}");
    // The right one still gets in and is served.
    keyed_replica_is_served(&dir, &model, &dep);
}

#[test]
fn garbage_drops_the_connection_not_the_worker() {
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 1, addrs.clone());
    // No secret: the test speaks the handshake itself.
    start_workers_with(&dir, &dep, ls, NetOptions::default());
    // Garbage instead of a hello, then a truncated hello header.
    for junk in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x54, 0x4e, 0x44, 0x4d, 1, 0][..],
    ] {
        let mut s = TcpStream::connect(&addrs[0]).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The worker answers with a rejection or closes; either way it must not hang us.
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    }
    let status = query_status(&addrs[0], Duration::from_secs(5), None).unwrap();
    assert_eq!(status.worker, 0);
    // A peer that handshakes properly and then sends a dispatch whose length field lies is
    // dropped (we read EOF); the worker serves a real replica afterwards.
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let id = Identity::new(&model, &dep).unwrap();
    let mut s = TcpStream::connect(&addrs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let hello = serde_json::json!({"wire_version": 2, "tandem_version": "test", "role": "replica",
        "rank": 0, "identity": id, "nonce": "ab".repeat(32), "authenticated": false});
    write_frame(&mut s, &Frame::Hello(hello.to_string()), 0).unwrap();
    assert!(matches!(
        read_frame(&mut s, 0, 0).unwrap(),
        Frame::Challenge(_)
    ));
    write_frame(&mut s, &Frame::Proof(r#"{"proof": null}"#.into()), 0).unwrap();
    assert!(matches!(
        read_frame(&mut s, 0, 0).unwrap(),
        Frame::HelloAck(_)
    ));
    let lie = Header {
        kind: 4,
        rows: 1_000_000,
        payload_len: 12,
        ..Header::default()
    };
    s.write_all(&lie.encode()).unwrap();
    s.write_all(&[0u8; 12]).unwrap();
    let mut buf = Vec::new();
    let n = std::io::Read::read_to_end(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the worker must close, not answer");
    let engine = start_replica_with(&model, &dep, 0, NetOptions::default());
    let reference = Model::load(&dir).unwrap();
    assert_greedy(&engine, &reference, &[7, 8, 9], 5);
    drop(engine);
    let status = query_status(&addrs[0], Duration::from_secs(5), None).unwrap();
    assert_eq!(status.worker, 0);
    let engine = start_replica_with(&model, &dep, 0, NetOptions::default());
    assert_greedy(&engine, &reference, &[7, 8, 9], 5);
}

#[test]
fn a_dead_worker_fails_requests_quickly_and_a_replacement_rejoins() {
    dead_worker_case(keyed());
}

/// The same with the links on plain TCP (the relay cuts the data path itself there; over
/// shared memory it cuts only the socket, which ends the link all the same).
#[test]
fn a_dead_worker_fails_requests_quickly_over_tcp_too() {
    dead_worker_case(NetOptions {
        shared_memory: false,
        ..keyed()
    });
}

fn dead_worker_case(opts: NetOptions) {
    let dir = fixture("mixtral");
    let (mut ls, addrs) = listeners(2);
    let dep = deployment(1, 2, 2, addrs.clone());
    // Worker 0 is served directly; worker 1 sits behind a TCP relay that can play dead (a
    // killed process looks the same from the replica: connections reset, connects refused).
    let l1 = ls.pop().unwrap();
    start_workers_with(&dir, &dep, ls, opts.clone());
    // The real worker 1 listens on a private port; the deployment's address is a relay.
    let (inner, inner_addr) = listeners(1);
    let cfg = tandem_model::ModelConfig::from_dir(&dir).unwrap();
    let placement = dep.placement_for(cfg.num_experts).unwrap();
    let w1 =
        Arc::new(Model::load_with(&dir, &ExpertSelection::Only(placement.experts_of(1))).unwrap());
    {
        let dep = dep.clone();
        let w1 = w1.clone();
        let l = inner.into_iter().next().unwrap();
        let opts = opts.clone();
        std::thread::spawn(move || {
            let _ = serve_expert(w1, &dep, 1, l, opts);
        });
    }
    let relay = Relay::start(l1, inner_addr[0].clone());
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let engine = start_replica_with(&model, &dep, 0, opts.clone());
    let want = if opts.shared_memory { "shm" } else { "tcp" };
    assert_transport(&dep, &opts, want);
    let reference = Model::load(&dir).unwrap();
    let long = engine
        .add_request(
            vec![1, 2, 3],
            greedy_params(100_000.min(engine.max_model_len() - 4)),
        )
        .unwrap();
    // Wait for the first token, not for a fixed time: on a fast machine the whole request
    // (a few hundred tokens of a tiny model) can finish within any sleep we would pick.
    let mut rx = long.rx;
    let first = rx.blocking_recv().expect("the request streams");
    assert!(first.finish.is_none(), "{:?}", first.finish);
    // "Kill" worker 1: the relay cuts every connection and refuses new ones.
    relay.set_down(true);
    let t = Instant::now();
    let e = collect_rx(rx).expect_err("the request must fail");
    // A dead connection fails the request at once, not after the peer timeout (60 s); the
    // bound leaves a busy machine all the slack it needs and still tells the two apart.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "failure took {:?}",
        t.elapsed()
    );
    assert!(e.contains("expert worker 1"), "{e}");
    // While it is down, a new request fails with a clear error (bounded wait).
    let h = engine.add_request(vec![4, 5], greedy_params(4)).unwrap();
    let e = collect(h).expect_err("worker 1 is down");
    assert!(e.contains("expert worker 1"), "{e}");
    // It comes back: the replica reconnects and serves again, nothing restarted.
    relay.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = engine.add_request(vec![4, 5], greedy_params(4)).unwrap();
        match collect(h) {
            Ok(t) => {
                assert_eq!(t, greedy(&reference, &[4, 5], 4).unwrap().0);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the deployment did not recover: {e}"),
        }
    }
}

/// A TCP relay that can play dead: while down it closes every relayed connection and every
/// new one at once.
struct Relay {
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(listener: TcpListener, target: String) -> Self {
        use std::sync::atomic::Ordering;
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = down.clone();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(c) = c else { continue };
                if d.load(Ordering::Relaxed) {
                    drop(c);
                    continue;
                }
                let Ok(s) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = s.set_nodelay(true);
                for (mut a, mut b) in [
                    (c.try_clone().unwrap(), s.try_clone().unwrap()),
                    (s.try_clone().unwrap(), c.try_clone().unwrap()),
                ] {
                    let d = d.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            if d.load(Ordering::Relaxed) {
                                break;
                            }
                            a.set_read_timeout(Some(Duration::from_millis(50))).ok();
                            match std::io::Read::read(&mut a, &mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if b.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { down }
    }
    fn set_down(&self, v: bool) {
        self.down.store(v, std::sync::atomic::Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Authentication (issue #17)
// ---------------------------------------------------------------------------------------

/// Everything this test process logs at INFO and above (every test's workers log here).
fn logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct W(&'static std::sync::Mutex<Vec<u8>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || W(buf))
            .try_init();
        buf
    })
}

/// Reads `s` to its end: the worker closes it (EOF or a reset) before the read timeout set on
/// it runs out. The handshake deadline itself is checked through the worker's log line ("did
/// not complete within ..."), not by a wall-clock bet on a busy machine.
fn assert_closed_by_peer(s: &mut TcpStream) {
    let mut buf = Vec::new();
    match std::io::Read::read_to_end(s, &mut buf) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the worker held the connection open: {e}"
        ),
    }
}

/// Waits (bounded) until the log has a line containing every one of `parts`.
fn logged(parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        if let Some(l) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?}; the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn other_secret() -> ClusterSecret {
    ClusterSecret::new("another-cluster-secret-0123456789", "test").unwrap()
}

/// The engine's greedy tokens for `prompt` equal the colocated reference's.
fn assert_greedy(engine: &Engine, reference: &Model, prompt: &[u32], n: usize) {
    let h = engine
        .add_request(prompt.to_vec(), greedy_params(n))
        .unwrap();
    assert_eq!(collect(h).unwrap(), greedy(reference, prompt, n).unwrap().0);
}

/// Greedy tokens of replica 0 (keyed like the workers, if they are) equal the colocated
/// reference's.
fn keyed_replica_is_served(dir: &Path, model: &Arc<Model>, dep: &Deployment) {
    let engine = start_replica(model, dep, 0);
    let reference = Model::load(dir).unwrap();
    assert_greedy(&engine, &reference, &[3, 4, 5], 6);
}

#[test]
fn peers_without_the_secret_or_with_another_are_refused_and_logged() {
    logs();
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers(&dir, &dep, ls);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let id = Identity::new(&model, &dep).unwrap();
    // No secret: refused, with the reason on both sides.
    let link = TcpReplicaLink::connect(0, addrs.clone(), id.clone(), NetOptions::default());
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(
        e.contains("refused") && e.contains("requires the cluster secret"),
        "{e}"
    );
    drop(link);
    logged(&[
        "refusing 127.0.0.1:",
        "requires the cluster secret and the peer has none",
    ]);
    // Another secret: refused when its proof does not verify.
    let wrong = NetOptions {
        cluster_secret: Some(other_secret()),
        ..NetOptions::default()
    };
    let link = TcpReplicaLink::connect(0, addrs.clone(), id.clone(), wrong);
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    drop(link);
    logged(&["refusing 127.0.0.1:", "authentication failed"]);
    // Status queries too: none without the secret, another's refused, the right one answered.
    let e = query_status(&addrs[0], Duration::from_secs(5), None).unwrap_err();
    assert!(e.contains("requires the cluster secret"), "{e}");
    let e = query_status(&addrs[0], Duration::from_secs(5), Some(&other_secret())).unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    assert_eq!(
        query_status(&addrs[0], Duration::from_secs(5), Some(&secret()))
            .unwrap()
            .worker,
        0
    );
    // The deployment kept serving: a keyed replica gets the reference's tokens.
    keyed_replica_is_served(&dir, &model, &dep);
}

#[test]
fn a_worker_without_a_secret_refuses_a_peer_with_one() {
    logs();
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers_with(&dir, &dep, ls, NetOptions::default());
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let link = TcpReplicaLink::connect(
        0,
        addrs.clone(),
        Identity::new(&model, &dep).unwrap(),
        keyed(),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("this worker has none"), "{e}");
    logged(&[
        "refusing 127.0.0.1:",
        "holds a cluster secret but this worker has none",
    ]);
}

/// A relay that records what the connecting side sends on each connection.
fn recording_relay(target: String) -> (String, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let (mut ls, addrs) = listeners(1);
    let l = ls.pop().unwrap();
    let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let Ok(s) = TcpStream::connect(&target) else {
                continue;
            };
            let i = {
                let mut g = rec.lock().unwrap();
                g.push(Vec::new());
                g.len() - 1
            };
            let (mut s_in, mut c_out) = (s.try_clone().unwrap(), c.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
            let rec = rec.clone();
            let mut s_out = s;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match std::io::Read::read(&mut c, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            rec.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                            if s_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addrs[0].clone(), recorded)
}

#[test]
fn a_replayed_handshake_is_refused() {
    logs();
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers(&dir, &dep, ls);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    // A real keyed replica connects through a relay that records its bytes.
    let (relay, recorded) = recording_relay(addrs[0].clone());
    let link = TcpReplicaLink::connect(
        0,
        vec![relay],
        Identity::new(&model, &dep).unwrap(),
        keyed(),
    );
    link.wait_ready(Duration::from_secs(10)).unwrap();
    drop(link);
    let bytes = recorded.lock().unwrap()[0].clone();
    // What it sent is the handshake: a hello, then a proof.
    let mut r = &bytes[..];
    assert!(matches!(read_frame(&mut r, 0, 0).unwrap(), Frame::Hello(_)));
    assert!(matches!(read_frame(&mut r, 0, 0).unwrap(), Frame::Proof(p) if p.contains("proof")));
    // Replayed on a new connection: the worker's nonce is new, so the proof is refused.
    let mut s = TcpStream::connect(&addrs[0]).unwrap();
    let me = s.local_addr().unwrap().to_string();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&bytes).unwrap();
    assert!(matches!(
        read_frame(&mut s, 0, 0).unwrap(),
        Frame::Challenge(_)
    ));
    match read_frame(&mut s, 0, 0) {
        Ok(Frame::Reject(why)) => assert!(why.contains("authentication failed"), "{why}"),
        Ok(_) => panic!("the replay was not refused"),
        Err(e) => panic!("no rejection: {e}"),
    }
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "nothing after the rejection");
    logged(&[&format!("refusing {me}: authentication failed"), "replayed"]);
    keyed_replica_is_served(&dir, &model, &dep);
}

#[test]
fn an_incomplete_handshake_is_closed_in_bounded_time() {
    logs();
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    let opts = NetOptions {
        handshake_timeout: Duration::from_millis(800),
        max_pending_handshakes: 4,
        ..keyed()
    };
    start_workers_with(&dir, &dep, ls, opts);
    // One connection trickling a byte at a time, then silent ones, more than the pending
    // limit: each is closed within the handshake timeout (plus scheduling slack), never
    // held open; those beyond the limit at once.
    let t = Instant::now();
    let mut trickle = TcpStream::connect(&addrs[0]).unwrap();
    let me = trickle.local_addr().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(50));
    let silent: Vec<TcpStream> = (0..6)
        .map(|_| {
            let s = TcpStream::connect(&addrs[0]).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    let hello = Header {
        kind: 1,
        payload_len: 10,
        ..Header::default()
    }
    .encode();
    // The header is 40 bytes: a byte every 100 ms would take 4 s, five times the timeout;
    // then the trickle goes on (zeros) for up to 30 s in all, so only a worker that never
    // closes it fails here, not a slow one.
    let mut closed = false;
    for i in 0..300 {
        let b = hello.get(i).copied().unwrap_or(0);
        if trickle.write_all(&[b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed, "a trickling peer held the connection for 30 s");
    for mut s in silent {
        assert_closed_by_peer(&mut s);
    }
    println!("closed after {:?}", t.elapsed());
    logged(&[&format!("refusing {me}:"), "did not complete within 0.8s"]);
    logged(&["connections are already in the handshake"]);
    // The worker still serves a keyed replica (its handshake completes in time).
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    keyed_replica_is_served(&dir, &model, &dep);
}

/// A fake worker that answers the hello with a challenge saying `authenticated`, then (if it
/// gets a proof) an ack with a made-up proof.
fn fake_worker(authenticated: bool) -> String {
    let (mut ls, addrs) = listeners(1);
    let l = ls.pop().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                if !matches!(read_frame(&mut c, 0, 0), Ok(Frame::Hello(_))) {
                    return;
                }
                let ch = serde_json::json!({"worker": 0, "nonce": "cd".repeat(32),
                    "authenticated": authenticated});
                let _ = write_frame(&mut c, &Frame::Challenge(ch.to_string()), 0);
                if !matches!(read_frame(&mut c, 0, 0), Ok(Frame::Proof(_))) {
                    return;
                }
                let ack = serde_json::json!({"worker": 0, "epoch": 1, "proof": "00".repeat(32)});
                let _ = write_frame(&mut c, &Frame::HelloAck(ack.to_string()), 0);
                let mut buf = Vec::new();
                let _ = std::io::Read::read_to_end(&mut c, &mut buf);
            });
        }
    });
    addrs[0].clone()
}

#[test]
fn a_replica_refuses_a_worker_that_cannot_prove_the_secret() {
    let dir = fixture("mixtral");
    let dep = deployment(1, 1, 2, vec![]);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let id = Identity::new(&model, &dep).unwrap();
    // A worker that does not authenticate at all.
    let link = TcpReplicaLink::connect(0, vec![fake_worker(false)], id.clone(), keyed());
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("refusing an unauthenticated worker"), "{e}");
    // One that claims to but cannot prove it.
    let link = TcpReplicaLink::connect(0, vec![fake_worker(true)], id, keyed());
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("did not prove the cluster secret"), "{e}");
}

/// A version-1 peer (the handshake before the cluster secret) is refused with a reason that
/// names both versions, in a frame whose header says version 2, which a version-1 decoder
/// reports as "peer speaks wire version 2, this build speaks 1".
#[test]
fn an_old_peer_is_refused_naming_both_versions() {
    logs();
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers(&dir, &dep, ls);
    let mut s = TcpStream::connect(&addrs[0]).unwrap();
    let me = s.local_addr().unwrap().to_string();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = r#"{"wire_version": 1, "tandem_version": "0.0.1", "role": "replica", "rank": 0}"#;
    let mut h = Header {
        kind: 1,
        payload_len: hello.len() as u64,
        ..Header::default()
    }
    .encode();
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    s.write_all(&h).unwrap();
    s.write_all(hello.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut reply);
    assert!(reply.len() > 64, "no rejection frame");
    assert_eq!(u16::from_le_bytes([reply[4], reply[5]]), 2);
    match read_frame(&mut &reply[..], 0, 0) {
        Ok(Frame::Reject(why)) => assert!(why.contains("wire version 1"), "{why}"),
        _ => panic!("not a rejection"),
    }
    logged(&[&format!("refusing {me}:"), "wire version 1"]);
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

/// A throwaway PKI made with rcgen in a temporary directory: `ca.pem`; `worker.pem`/`.key`
/// for 127.0.0.1 and `client.pem`/`.key`, both signed by it; `misnamed.pem`/`.key` signed by
/// it for another host name; `other-ca.pem`, a CA that signed nothing here.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("tandem-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            (p.self_signed(&key).unwrap(), key)
        };
        let (ca_cert, ca_key) = ca("tandem test CA");
        let (other, _) = ca("another CA");
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        write("other-ca.pem", other.pem());
        for (name, sans) in [
            ("worker", vec!["127.0.0.1".to_string()]),
            ("client", vec!["replica.tandem.invalid".to_string()]),
            ("misnamed", vec!["elsewhere.tandem.invalid".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A worker presenting `name`.pem; `mutual`: requiring client certificates.
    fn server(&self, name: &str, mutual: bool) -> TlsServer {
        let ca = self.path("ca.pem");
        TlsServer::from_pem_files(
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}.key")),
            mutual.then_some(ca.as_path()),
        )
        .unwrap()
    }

    /// A replica trusting `ca`; `with_cert`: presenting the client certificate.
    fn client(&self, ca: &str, with_cert: bool) -> TlsClient {
        let (c, k) = (self.path("client.pem"), self.path("client.key"));
        TlsClient::from_pem_files(
            &self.path(ca),
            with_cert.then_some((c.as_path(), k.as_path())),
        )
        .unwrap()
    }

    /// Both sides' TLS (each side uses its own half), with the cluster secret.
    fn keyed(&self, mutual: bool) -> NetOptions {
        NetOptions {
            tls_server: Some(self.server("worker", mutual)),
            tls_client: Some(self.client("ca.pem", mutual)),
            ..keyed()
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The TCP equivalence test with TLS on (and the cluster secret inside it).
#[test]
fn tcp_mixtral_over_tls() {
    let pki = Pki::new("eq");
    tcp_equals_colocated_with("mixtral", pki.keyed(false));
}

#[test]
fn tcp_qwen2_moe_over_tls() {
    let pki = Pki::new("eq2");
    tcp_equals_colocated_with("qwen2_moe", pki.keyed(false));
}

/// With mutual TLS: a replica without the client certificate is refused (the worker logs
/// why), one with it gets the reference's tokens.
#[test]
fn mutual_tls_requires_the_client_certificate() {
    logs();
    let pki = Pki::new("mutual");
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers_with(&dir, &dep, ls, pki.keyed(true));
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let id = Identity::new(&model, &dep).unwrap();
    let no_cert = NetOptions {
        tls_client: Some(pki.client("ca.pem", false)),
        ..keyed()
    };
    let link = TcpReplicaLink::connect(0, addrs.clone(), id, no_cert);
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    drop(link);
    logged(&[
        "refusing 127.0.0.1:",
        "TLS handshake failed",
        "no certificates",
    ]);
    let engine = start_replica_with(&model, &dep, 0, pki.keyed(true));
    let reference = Model::load(&dir).unwrap();
    assert_greedy(&engine, &reference, &[3, 4, 5], 6);
}

#[test]
fn tls_peers_that_do_not_fit_are_refused_and_logged() {
    logs();
    let pki = Pki::new("refuse");
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    let tls = pki.keyed(false);
    start_workers_with(&dir, &dep, ls, tls.clone());
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let id = Identity::new(&model, &dep).unwrap();
    // A replica trusting another CA: the certificate problem is named on both sides.
    let other_ca = NetOptions {
        tls_client: Some(pki.client("other-ca.pem", false)),
        ..keyed()
    };
    let link = TcpReplicaLink::connect(0, addrs.clone(), id.clone(), other_ca);
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(
        e.contains("TLS handshake failed")
            && e.contains("invalid peer certificate")
            && e.contains("UnknownIssuer"),
        "{e}"
    );
    drop(link);
    logged(&["refusing 127.0.0.1:", "TLS handshake failed", "UnknownCA"]);
    // A plaintext replica: told that the worker expects TLS, which logs the same.
    let link = TcpReplicaLink::connect(0, addrs.clone(), id.clone(), keyed());
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(e.contains("refused") && e.contains("expects TLS"), "{e}");
    drop(link);
    logged(&[
        "refusing 127.0.0.1:",
        "expects TLS and the peer speaks plaintext M2N",
    ]);
    // Status queries: plaintext refused, over TLS answered.
    let e = query_status(&addrs[0], Duration::from_secs(5), Some(&secret())).unwrap_err();
    assert!(e.contains("expects TLS"), "{e}");
    let report = query_status_with(
        &addrs[0],
        Duration::from_secs(5),
        Some(&secret()),
        tls.tls_client.as_ref(),
    )
    .unwrap();
    assert_eq!(report.worker, 0);
    // The deployment kept serving a TLS replica.
    let engine = start_replica_with(&model, &dep, 0, tls);
    let reference = Model::load(&dir).unwrap();
    assert_greedy(&engine, &reference, &[3, 4, 5], 6);
}

/// A worker whose certificate (signed by the right CA) names another host is refused.
#[test]
fn a_worker_certificate_for_another_name_is_refused() {
    let pki = Pki::new("name");
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    let worker = NetOptions {
        tls_server: Some(pki.server("misnamed", false)),
        ..keyed()
    };
    start_workers_with(&dir, &dep, ls, worker);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let link = TcpReplicaLink::connect(
        0,
        addrs,
        Identity::new(&model, &dep).unwrap(),
        pki.keyed(false),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(
        e.contains("invalid peer certificate")
            && e.contains("not valid for name \"127.0.0.1\"")
            && e.contains("elsewhere.tandem.invalid"),
        "{e}"
    );
}

/// A TLS replica and a plaintext worker: the worker says the peer speaks TLS, the replica
/// that the worker answered in plaintext (with the worker's reason).
#[test]
fn a_tls_replica_and_a_plaintext_worker_refuse_each_other() {
    logs();
    let pki = Pki::new("plainworker");
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    start_workers(&dir, &dep, ls);
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let link = TcpReplicaLink::connect(
        0,
        addrs,
        Identity::new(&model, &dep).unwrap(),
        pki.keyed(false),
    );
    let e = link.wait_ready(Duration::from_secs(3)).unwrap_err();
    assert!(
        e.contains("TLS handshake failed")
            && e.contains("answered in plaintext M2N")
            && e.contains("no TLS certificate"),
        "{e}"
    );
    logged(&[
        "refusing 127.0.0.1:",
        "the peer speaks TLS but this worker has no TLS certificate",
    ]);
}

#[test]
fn unusable_tls_files_are_named_in_the_error() {
    let pki = Pki::new("files");
    let p = |f: &str| pki.path(f);
    let server = |c: &str, k: &str| {
        TlsServer::from_pem_files(&p(c), &p(k), None)
            .unwrap_err()
            .to_string()
    };
    let e = server("missing.pem", "worker.key");
    assert!(
        e.contains("certificate file") && e.contains("missing.pem"),
        "{e}"
    );
    let e = server("worker.key", "worker.key");
    assert!(
        e.contains("worker.key") && e.contains("no PEM CERTIFICATE"),
        "{e}"
    );
    let e = server("worker.pem", "worker.pem");
    assert!(
        e.contains("worker.pem") && e.contains("no PEM private key"),
        "{e}"
    );
    let e = server("worker.pem", "client.key");
    assert!(
        e.contains("worker.pem") && e.contains("client.key") && e.contains("do not make"),
        "{e}"
    );
    std::fs::write(p("garbage.pem"), "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
    let e = TlsClient::from_pem_files(&p("garbage.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("CA bundle file") && e.contains("garbage.pem"),
        "{e}"
    );
    let e = TlsClient::from_pem_files(&p("missing-ca.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing-ca.pem"), "{e}");
}

/// A TLS worker closes a silent peer, and one that starts a TLS record and stops, within
/// the handshake deadline, which the TLS handshake counts in.
#[test]
fn an_incomplete_tls_handshake_is_closed_in_bounded_time() {
    logs();
    let pki = Pki::new("slow");
    let dir = fixture("mixtral");
    let (ls, addrs) = listeners(1);
    let dep = deployment(1, 1, 2, addrs.clone());
    let opts = NetOptions {
        handshake_timeout: Duration::from_millis(800),
        ..pki.keyed(false)
    };
    start_workers_with(&dir, &dep, ls, opts);
    let t = Instant::now();
    let silent = TcpStream::connect(&addrs[0]).unwrap();
    let mut started = TcpStream::connect(&addrs[0]).unwrap();
    let me = started.local_addr().unwrap().to_string();
    // A record header of a TLS handshake message that never comes.
    started.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    for mut s in [silent, started] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_closed_by_peer(&mut s);
    }
    println!("closed after {:?}", t.elapsed());
    logged(&[
        &format!("refusing {me}:"),
        "TLS handshake failed",
        "did not complete within 0.8s",
    ]);
    // A TLS replica still gets in.
    let model = Arc::new(Model::load_with(&dir, &ExpertSelection::None).unwrap());
    let engine = start_replica_with(&model, &dep, 0, pki.keyed(false));
    let reference = Model::load(&dir).unwrap();
    assert_greedy(&engine, &reference, &[3, 4, 5], 6);
}
#[test]
fn tcp_gpt_oss() {
    tcp_equals_colocated("gpt_oss");
}
#[test]
fn tcp_gpt_oss_mxfp4() {
    tcp_equals_colocated("gpt_oss_mxfp4");
}
