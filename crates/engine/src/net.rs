//! M2N over TCP: the [`ReplicaLink`] / [`ExpertLink`] of a multi-process deployment.
//!
//! Each attention replica keeps one connection to every expert worker, set up once (and set
//! up again after a failure), with `TCP_NODELAY` and socket buffers large enough for whole
//! frames ([`NetOptions::socket_buffer`]). A connection starts with a versioned
//! handshake of four messages (see `docs/m2n.md`):
//!
//! 1. hello (connecting side): wire version, role, rank, the hashes of the model configuration
//!    and of the deployment shape, the wire dtype, a fresh nonce, whether it holds a secret;
//! 2. challenge (worker): its own fresh nonce and whether it holds a secret;
//! 3. proof (connecting side): with a cluster secret, HMAC-SHA256 over both nonces and what
//!    the hello claimed ([`crate::auth`]);
//! 4. hello ack (worker): its epoch and, with a secret, its own proof over the same transcript.
//!
//! The worker refuses (with a reason, logged with the peer's address, then closes) a peer
//! whose version, secret, model or deployment disagrees; nothing but the handshake is read
//! before the proof is checked, and a connection that has not completed the handshake within
//! [`NetOptions::handshake_timeout`] is closed. The replica refuses a worker that does not
//! prove the secret it holds. Frames are [`crate::wire`]'s: tensors are written from and
//! read into the memory that becomes the tensor. Back-pressure is TCP's: a writer blocks when
//! the peer's socket buffers are full.
//!
//! Failures: a connection that breaks or carries a malformed frame is dropped (never the
//! process), logged, and reported to the local side as [`ToReplica::Lost`] /
//! [`ToWorker::Gone`], which the membership protocol turns into errors for the requests of
//! the interrupted iteration and a new epoch. Replicas reconnect by themselves, so a
//! restarted worker rejoins without restarting anything else.

use crate::auth::{
    from_hex, nonce, to_hex, ClusterSecret, Transcript, NONCE_LEN, TAG_PEER, TAG_WORKER,
};
use crate::expert_worker::{ExpertWorker, WorkerStatus};
use crate::stats::WorkerStats;
use crate::tls::{self, ReadHalf, TlsClient, TlsServer, WriteHalf};
use crate::transport::{ExpertLink, ReplicaLink, ToReplica, ToWorker, TransportError};
use crate::wire::{
    fnv1a, read_frame, read_frame_from, read_frame_meta, write_frame, write_frame_as, Frame,
    WireDtype, WireError, WIRE_VERSION,
};
use crate::{DispatchMsg, EngineError};
use serde::{Deserialize, Serialize};
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_core::Deployment;
use tandem_model::Model;

/// What both ends of a connection must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub model_hash: String,
    pub deployment_hash: String,
    pub hidden_size: usize,
}

impl Identity {
    /// Hashes the model configuration (architecture and every size) and the deployment's
    /// shape (replicas, workers, micro-batches, placement).
    pub fn new(model: &Model, dep: &Deployment) -> Result<Self, EngineError> {
        let cfg = &model.cfg;
        let placement = dep
            .placement_for(cfg.num_experts)
            .map_err(|e| EngineError::Deployment(e.to_string()))?;
        let shape = format!(
            "n_a={} N={} m={} placement={:?}",
            dep.attention_replicas, dep.expert_workers, dep.micro_batches, placement.workers
        );
        Ok(Self {
            model_hash: format!("{:016x}", fnv1a(format!("{cfg:?}").as_bytes())),
            deployment_hash: format!("{:016x}", fnv1a(shape.as_bytes())),
            hidden_size: cfg.hidden_size,
        })
    }
}

/// Step 1 of the handshake, from the connecting side.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    wire_version: u16,
    tandem_version: String,
    /// "replica" or "status".
    role: String,
    rank: u32,
    identity: Option<Identity>,
    /// How the replica sends hidden states, and wants them back (absent: f32).
    #[serde(default)]
    wire_dtype: WireDtype,
    /// A fresh random nonce (hex), part of both proofs.
    nonce: String,
    /// Whether this side holds a cluster secret (and will prove it).
    authenticated: bool,
    /// A replica on the worker's host offers shared-memory rings ([`crate::shm`]).
    #[serde(default)]
    shm: Option<ShmOffer>,
}

/// Where the rings are and the token their header holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShmOffer {
    path: String,
    token: String,
}

/// Step 2, from the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Challenge {
    worker: u32,
    /// A fresh random nonce (hex): a proof made for another connection never matches it.
    nonce: String,
    /// Whether the worker holds a cluster secret.
    authenticated: bool,
}

/// Step 3, from the connecting side.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proof {
    /// HMAC-SHA256(secret, peer tag, transcript), hex; absent without a secret.
    proof: Option<String>,
}

/// Step 4, from the worker: the peer is accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HelloAck {
    worker: u32,
    epoch: u64,
    /// HMAC-SHA256(secret, worker tag, transcript), hex; absent without a secret.
    proof: Option<String>,
    /// The worker took the shared-memory offer: everything after this ack goes through the
    /// rings, and the socket only tells that the peer is alive.
    #[serde(default)]
    shm: bool,
}

/// What both proofs of a connection cover: both nonces and everything the hello claims, so
/// a proof neither travels to another connection nor vouches for other claims.
fn transcript(hello: &Hello, worker: u32, worker_nonce: &[u8], peer_nonce: &[u8]) -> Transcript {
    let id = hello.identity.as_ref();
    Transcript::default()
        .field(&WIRE_VERSION.to_le_bytes())
        .field(worker_nonce)
        .field(peer_nonce)
        .field(hello.role.as_bytes())
        .field(&hello.rank.to_le_bytes())
        .field(id.map_or(&b""[..], |i| i.model_hash.as_bytes()))
        .field(id.map_or(&b""[..], |i| i.deployment_hash.as_bytes()))
        .field(&id.map_or(0u64, |i| i.hidden_size as u64).to_le_bytes())
        .field(hello.wire_dtype.name().as_bytes())
        .field(hello.shm.as_ref().map_or(&b""[..], |o| o.path.as_bytes()))
        .field(hello.shm.as_ref().map_or(&b""[..], |o| o.token.as_bytes()))
        .field(&worker.to_le_bytes())
}

fn parse_nonce(hex: &str) -> Result<Vec<u8>, String> {
    from_hex(hex)
        .filter(|n| n.len() == NONCE_LEN)
        .ok_or_else(|| format!("the nonce is not {NONCE_LEN} bytes of hex"))
}

/// Where to put the secret (for messages).
const SECRET_HOWTO: &str =
    "--cluster-secret-file, TANDEM_CLUSTER_SECRET or [security] cluster_secret_file";

/// Limits and timeouts of a TCP link.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Largest data payload a peer may announce (bytes).
    pub max_payload: u64,
    /// How long a handshake may take, all of it: from the connection's start to the ack.
    /// A worker closes a connection that has not completed it by then, so a peer cannot hold
    /// connections open without proving the secret.
    pub handshake_timeout: Duration,
    /// Most connections a worker keeps in the handshake at once; it closes new ones beyond.
    pub max_pending_handshakes: usize,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
    /// How a replica sends hidden states (and the workers answer it); ignored by workers,
    /// which answer each replica in the type it announced.
    pub wire_dtype: WireDtype,
    /// The deployment's shared secret. With one, every peer must prove it (and a worker
    /// proves it back); without, a peer that has one is refused, and so is one that
    /// has none by a worker that has one.
    pub cluster_secret: Option<ClusterSecret>,
    /// A worker's TLS certificate: with one, the worker accepts only TLS connections
    /// (ignored by replicas).
    pub tls_server: Option<TlsServer>,
    /// The CA bundle a replica (or status query) checks workers' certificates against: with
    /// one, it connects only with TLS (ignored by workers).
    pub tls_client: Option<TlsClient>,
    /// Whether a replica and a worker on one host move frames through shared memory
    /// ([`crate::shm`]) instead of the socket (never with TLS). A replica with `false` offers
    /// nothing; a worker with `false` declines every offer.
    pub shared_memory: bool,
    /// Bytes of each shared-memory ring (one per direction and connection).
    pub shm_ring_bytes: usize,
    /// Over shared memory, f32 matrices of at least `min` bytes are lent: the peer copies
    /// them once, straight from this process ([`crate::shm`]), instead of through the ring
    /// (`usize::MAX`: never); loans from this very process are read only with
    /// `same_process` (both ends in one process: tests).
    pub shm_lending: Lending,
    /// `SO_SNDBUF` and `SO_RCVBUF` of every M2N socket, asked before the connection is set
    /// up (the kernel caps them at `net.core.wmem_max` / `rmem_max` and doubles them);
    /// 0 leaves the OS's autotuning. See [`DEFAULT_SOCKET_BUFFER`].
    pub socket_buffer: usize,
}

/// The socket buffers asked for every M2N connection: room for several whole messages, so
/// a writer's `writev` of a 256 KiB matrix lands in the kernel at once instead of waiting,
/// a slice at a time, for the peer's reader thread to be scheduled and drain the socket.
/// With the autotuned default (a receive window that starts at 64 KiB and grows only as
/// the reader keeps up) a worker sending its combines one after another waited on every
/// replica's reader in turn: on 2 cores with 16 processes that chain of wake-ups held
/// rounds for 60-140 ms (`docs/m2n.md`, "TCP tail").
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// Sets the options of an M2N socket (or of a listener, whose accepted sockets inherit
/// them): `TCP_NODELAY` (a frame's last segment must not wait for an acknowledgement) and,
/// when `buffer` is not 0, the send and receive buffers.
pub(crate) fn tune_socket(sock: socket2::SockRef<'_>, buffer: usize) -> std::io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    if buffer > 0 {
        sock.set_send_buffer_size(buffer)?;
        sock.set_recv_buffer_size(buffer)?;
    }
    Ok(())
}

/// Over shared memory ([`crate::shm`]), matrices at least this long are lent (copied once, by
/// the reader) rather than copied into the ring and out: below it the two copies are cheaper than the loan's bookkeeping.
pub const DEFAULT_LEND_MIN: usize = 64 << 10;

/// What a process lends over shared memory ([`crate::shm`]) and whose loans it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lending {
    /// f32 matrices of at least this many bytes are lent (`usize::MAX`: none).
    pub min: usize,
    /// Read loans from this very process. Only both ends of a link in one process (tests)
    /// need it; otherwise a peer naming this process would make it read its own memory
    /// for the peer, so such a loan is refused.
    pub same_process: bool,
}

impl Default for Lending {
    fn default() -> Self {
        Self {
            min: DEFAULT_LEND_MIN,
            same_process: false,
        }
    }
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            max_payload: 1 << 30,
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 64,
            max_backoff: Duration::from_secs(1),
            wire_dtype: WireDtype::F32,
            cluster_secret: None,
            tls_server: None,
            tls_client: None,
            shared_memory: true,
            shm_ring_bytes: crate::shm::DEFAULT_RING_BYTES,
            shm_lending: Lending::default(),
            socket_buffer: DEFAULT_SOCKET_BUFFER,
        }
    }
}

fn send_text(w: &mut WriteHalf, f: &Frame) -> Result<(), String> {
    write_frame(w, f, 0).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())
}

/// The worker's answer to what this side sent (`after`): the JSON of the frame `pick`
/// accepts; a refusal, another frame or a broken read is the reason the handshake failed.
fn read_answer<T: serde::de::DeserializeOwned>(
    rd: &mut ReadHalf,
    after: &str,
    pick: impl FnOnce(Frame) -> Option<String>,
) -> Result<T, String> {
    match read_frame(rd, 0, 0) {
        Ok(Frame::Reject(why)) => Err(format!("refused: {why}")),
        Ok(f) => {
            let text = pick(f).ok_or_else(|| format!("unexpected answer to the {after}"))?;
            serde_json::from_str(&text)
                .map_err(|e| format!("unreadable answer to the {after}: {e}"))
        }
        Err(e) => Err(format!("handshake: {e}")),
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_string(v).unwrap_or_default()
}

/// The connecting side of the handshake (a replica, or a status query): sends `hello` with a
/// fresh nonce, answers the challenge and checks the worker's proof. `expect_worker`: the
/// worker index this address has in the deployment, checked against the worker's own. The
/// caller has set the deadlines ([`open_client`]).
fn client_handshake(
    rd: &mut ReadHalf,
    wr: &mut WriteHalf,
    mut hello: Hello,
    secret: Option<&ClusterSecret>,
    expect_worker: Option<u32>,
) -> Result<HelloAck, String> {
    let peer_nonce = nonce()?;
    hello.nonce = to_hex(&peer_nonce);
    hello.authenticated = secret.is_some();
    send_text(wr, &Frame::Hello(json(&hello)))?;
    let ch: Challenge = read_answer(rd, "hello", |f| match f {
        Frame::Challenge(t) => Some(t),
        _ => None,
    })?;
    if let Some(w) = expect_worker {
        if ch.worker != w {
            return Err(format!(
                "this address answers as expert worker {}, but the deployment lists it as worker {w}",
                ch.worker
            ));
        }
    }
    match (secret.is_some(), ch.authenticated) {
        (true, false) => {
            return Err(format!(
                "the worker has no cluster secret but this side has one: refusing an \
                 unauthenticated worker (give every process the same secret: {SECRET_HOWTO})"
            ))
        }
        (false, true) => {
            return Err(format!(
                "the worker requires a cluster secret and this side has none ({SECRET_HOWTO})"
            ))
        }
        _ => {}
    }
    let worker_nonce = parse_nonce(&ch.nonce).map_err(|e| format!("bad challenge: {e}"))?;
    let t = transcript(&hello, ch.worker, &worker_nonce, &peer_nonce);
    let proof = Proof {
        proof: secret.map(|s| to_hex(&s.prove(TAG_PEER, t.bytes()))),
    };
    send_text(wr, &Frame::Proof(json(&proof)))?;
    let ack: HelloAck = read_answer(rd, "proof", |f| match f {
        Frame::HelloAck(t) => Some(t),
        _ => None,
    })?;
    if let Some(s) = secret {
        let ok = ack.worker == ch.worker
            && ack
                .proof
                .as_deref()
                .and_then(from_hex)
                .is_some_and(|p| s.verify(TAG_WORKER, t.bytes(), &p));
        if !ok {
            return Err(
                "the worker did not prove the cluster secret (another secret, or not this \
                 deployment's worker): refusing it"
                    .into(),
            );
        }
    }
    Ok(ack)
}

/// Starts a connection to the worker at `addr` on `stream`: with a CA bundle, the TLS
/// handshake first. Reads and writes keep `limit` (counted from now, the whole handshake)
/// until [`end_handshake`].
fn open_client(
    stream: &TcpStream,
    tls: Option<&TlsClient>,
    addr: &str,
    limit: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    stream
        .set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    match tls {
        Some(t) => tls::connect(stream, t, addr, limit),
        None => tls::plain(stream, limit).map_err(|e| e.to_string()),
    }
}

/// The handshake is over: no more deadlines on the connection.
fn end_handshake(stream: &TcpStream, rd: &mut ReadHalf) -> Result<(), String> {
    rd.end_handshake().map_err(|e| e.to_string())?;
    stream.set_write_timeout(None).map_err(|e| e.to_string())
}

/// How a connection carries frames (for logs and status reports).
fn transport_name(rd: &ReadHalf) -> &'static str {
    match rd {
        ReadHalf::Plain(_) => "tcp",
        ReadHalf::Tls(_) => "tls",
        #[cfg(target_os = "linux")]
        ReadHalf::Shm(_) => "shm",
    }
}

fn resolve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to nothing"),
        )
    })
}

/// A writable connection and the generation that tells it from its successors.
struct Conn {
    gen: u64,
    /// Unbuffered: frames go out with vectored writes straight from tensor memory (through
    /// TLS on a TLS connection).
    w: WriteHalf,
    /// The type hidden states are sent in on this connection.
    dtype: WireDtype,
    /// How frames travel: "tcp", "tls" or "shm".
    transport: &'static str,
}

impl Conn {
    fn send(&mut self, f: &Frame, hidden: usize) -> Result<(), WireError> {
        match &mut self.w {
            #[cfg(target_os = "linux")]
            WriteHalf::Shm(w) => crate::shm::send(w, f, hidden, self.dtype)?,
            w => write_frame_as(w, f, hidden, self.dtype)?,
        }
        self.w.flush()?;
        Ok(())
    }
    fn close(&self) {
        self.w.shutdown();
    }
}

fn send_on(
    slot: &Mutex<Option<Conn>>,
    f: &Frame,
    hidden: usize,
    who: impl Fn() -> String,
) -> Result<(), TransportError> {
    let mut g = slot
        .lock()
        .map_err(|_| TransportError::Disconnected(who()))?;
    let Some(c) = g.as_mut() else {
        return Err(TransportError::Disconnected(format!(
            "{} is not connected",
            who()
        )));
    };
    if let Err(e) = c.send(f, hidden) {
        // The reader sees the shutdown and reports the loss.
        c.close();
        *g = None;
        return Err(TransportError::Disconnected(format!("{}: {e}", who())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The replica's end
// ---------------------------------------------------------------------------------------

struct ReplicaShared {
    rank: u32,
    addrs: Vec<String>,
    id: Identity,
    opts: NetOptions,
    conns: Vec<Mutex<Option<Conn>>>,
    why_down: Vec<Mutex<String>>,
    gen: AtomicU64,
    stop: AtomicBool,
}

/// Attention replica `rank`'s connections to every expert worker.
pub struct TcpReplicaLink {
    shared: Arc<ReplicaShared>,
    rx: mpsc::Receiver<ToReplica>,
}

impl TcpReplicaLink {
    /// Starts connecting to `addrs` (one per expert worker) in the background; use
    /// [`ReplicaLink::ready`] or [`TcpReplicaLink::wait_ready`] to know when all are up.
    pub fn connect(rank: u32, addrs: Vec<String>, id: Identity, opts: NetOptions) -> Self {
        let n = addrs.len();
        let shared = Arc::new(ReplicaShared {
            rank,
            id,
            opts,
            conns: (0..n).map(|_| Mutex::new(None)).collect(),
            why_down: addrs
                .iter()
                .enumerate()
                .map(|(w, a)| Mutex::new(format!("expert worker {w} at {a}: not connected yet")))
                .collect(),
            addrs,
            gen: AtomicU64::new(1),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        for w in 0..n {
            let shared = shared.clone();
            let tx = tx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("m2n-w{w}"))
                .spawn(move || replica_conn_loop(&shared, w, tx));
        }
        Self { shared, rx }
    }

    /// Blocks until every worker is connected, or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ready() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Per worker: how frames travel ("tcp", "tls" or "shm"), `None` while not connected.
    pub fn transports(&self) -> Vec<Option<&'static str>> {
        self.shared
            .conns
            .iter()
            .map(|c| c.lock().ok().and_then(|g| g.as_ref().map(|c| c.transport)))
            .collect()
    }

    /// A probe that reports whether every worker is connected (for health checks).
    pub fn health_probe(&self) -> impl Fn() -> Result<(), String> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || replica_ready(&shared)
    }
}

fn replica_ready(s: &ReplicaShared) -> Result<(), String> {
    for (w, c) in s.conns.iter().enumerate() {
        if c.lock().map(|g| g.is_none()).unwrap_or(true) {
            return Err(s.why_down[w]
                .lock()
                .map(|g| g.clone())
                .unwrap_or_else(|_| format!("expert worker {w} is not connected")));
        }
    }
    Ok(())
}

fn set_down(s: &ReplicaShared, w: usize, why: String) {
    if let Ok(mut g) = s.why_down[w].lock() {
        *g = why;
    }
}

/// Connects to worker `w`, handshakes, reads frames until the connection breaks, and starts
/// again, until the link is dropped.
fn replica_conn_loop(s: &ReplicaShared, w: usize, tx: mpsc::Sender<ToReplica>) {
    let addr = &s.addrs[w];
    let mut backoff = Duration::from_millis(50);
    let mut logged = false;
    while !s.stop.load(Ordering::Relaxed) {
        let (stream, mut rd, wr) = match replica_handshake(s, w) {
            Ok(st) => st,
            Err(why) => {
                let why = format!("expert worker {w} at {addr}: {why}");
                if !logged {
                    tracing::warn!(replica = s.rank, "{why}; retrying");
                    logged = true;
                }
                set_down(s, w, why);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(s.opts.max_backoff);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        logged = false;
        let gen = s.gen.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = s.conns[w].lock() {
            *g = Some(Conn {
                gen,
                w: wr,
                dtype: s.opts.wire_dtype,
                transport: transport_name(&rd),
            });
        }
        tracing::info!(
            replica = s.rank,
            "connected to expert worker {w} at {addr} ({})",
            transport_name(&rd)
        );
        let mut r = BufReader::with_capacity(1 << 16, &mut rd);
        let why = loop {
            match read_frame_from(&mut r, s.id.hidden_size, s.opts.max_payload) {
                Ok(Frame::ToReplica(m)) => {
                    if let ToReplica::Combine(c) = &m {
                        if c.header.sender != w as u32 {
                            break format!(
                                "combine claims to come from worker {}",
                                c.header.sender
                            );
                        }
                    }
                    if tx.send(m).is_err() {
                        break "the replica is gone".into();
                    }
                }
                Ok(_) => break "unexpected message kind on a replica connection".into(),
                Err(WireError::Closed) => break "closed by the worker".into(),
                Err(e) => break e.to_string(),
            }
        };
        let _ = stream.shutdown(Shutdown::Both);
        if let Ok(mut g) = s.conns[w].lock() {
            if g.as_ref().is_some_and(|c| c.gen == gen) {
                *g = None;
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            break;
        }
        let why = format!("expert worker {w} at {addr}: {why}");
        tracing::warn!(replica = s.rank, "lost {why}");
        set_down(s, w, why.clone());
        let _ = tx.send(ToReplica::Lost {
            worker: w as u32,
            why,
        });
    }
}

/// Connects with the socket options set first: the receive buffer decides the window
/// scale offered in the SYN, so it must be asked before the connection exists.
fn connect_tuned(
    sa: &std::net::SocketAddr,
    timeout: Duration,
    buffer: usize,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(*sa), Type::STREAM, Some(Protocol::TCP))?;
    tune_socket((&sock).into(), buffer)?;
    sock.connect_timeout(&(*sa).into(), timeout)?;
    Ok(sock.into())
}

fn replica_handshake(
    s: &ReplicaShared,
    w: usize,
) -> Result<(TcpStream, ReadHalf, WriteHalf), String> {
    let sa = resolve(&s.addrs[w]).map_err(|e| e.to_string())?;
    let stream = connect_tuned(&sa, s.opts.handshake_timeout, s.opts.socket_buffer)
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut rd, mut wr) = open_client(
        &stream,
        s.opts.tls_client.as_ref(),
        &s.addrs[w],
        s.opts.handshake_timeout,
    )?;
    let offer = if s.opts.shared_memory && s.opts.tls_client.is_none() {
        crate::shm::offer(&stream, s.opts.shm_ring_bytes)
    } else {
        None
    };
    let hello = Hello {
        wire_version: WIRE_VERSION,
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        role: "replica".into(),
        rank: s.rank,
        identity: Some(s.id.clone()),
        wire_dtype: s.opts.wire_dtype,
        nonce: String::new(),
        authenticated: false,
        shm: offer.as_ref().map(|o| ShmOffer {
            path: o.path().into(),
            token: o.token().into(),
        }),
    };
    let ack = client_handshake(
        &mut rd,
        &mut wr,
        hello,
        s.opts.cluster_secret.as_ref(),
        Some(w as u32),
    )?;
    end_handshake(&stream, &mut rd)?;
    match (ack.shm, offer) {
        (false, _) => Ok((stream, rd, wr)),
        (true, Some(o)) => {
            let (rd, wr) = o
                .into_halves(&stream, s.opts.shm_lending)
                .map_err(|e| format!("shared memory: {e}"))?;
            Ok((stream, rd, wr))
        }
        (true, None) => Err("the worker switched to shared memory that was not offered".into()),
    }
}

impl ReplicaLink for TcpReplicaLink {
    fn num_workers(&self) -> usize {
        self.shared.addrs.len()
    }
    fn dispatch(&self, worker: u32, msg: DispatchMsg) -> Result<(), TransportError> {
        let w = worker as usize;
        let slot = self.shared.conns.get(w).ok_or_else(|| {
            TransportError::Disconnected(format!("expert worker {w} does not exist"))
        })?;
        send_on(
            slot,
            &Frame::ToWorker(ToWorker::Dispatch(msg)),
            self.shared.id.hidden_size,
            || format!("expert worker {w} at {}", self.shared.addrs[w]),
        )
    }
    fn control(&self, msg: ToWorker) -> Result<(), TransportError> {
        let slot = self
            .shared
            .conns
            .first()
            .ok_or_else(|| TransportError::Disconnected("no expert worker 0".into()))?;
        send_on(
            slot,
            &Frame::ToWorker(msg),
            self.shared.id.hidden_size,
            || format!("expert worker 0 at {}", self.shared.addrs[0]),
        )
    }
    fn recv(&self, timeout: Duration) -> Result<ToReplica, TransportError> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => TransportError::Timeout {
                what: "the expert workers".into(),
                secs: timeout.as_secs_f64(),
            },
            mpsc::RecvTimeoutError::Disconnected => {
                TransportError::Disconnected("every expert worker is gone".into())
            }
        })
    }
    fn ready(&self) -> Result<(), String> {
        replica_ready(&self.shared)
    }
}

impl Drop for TcpReplicaLink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for c in &self.shared.conns {
            if let Ok(mut g) = c.lock() {
                if let Some(c) = g.take() {
                    c.close();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The worker's end
// ---------------------------------------------------------------------------------------

struct WorkerShared {
    worker: u32,
    id: Identity,
    opts: NetOptions,
    conns: Vec<Mutex<Option<Conn>>>,
    /// Per replica rank: the peer's address and the transport, while connected.
    peers: Vec<Mutex<Option<(String, &'static str)>>>,
    gen: AtomicU64,
    status: Arc<Mutex<WorkerStatus>>,
    /// Connections accepted and not yet through the handshake.
    pending: AtomicUsize,
    /// Per replica rank: the dispatches received from it, over every connection.
    traffic: Vec<LinkTraffic>,
}

/// What a worker received from one replica rank, as the frames' headers said, since the
/// worker started: the observation behind `--wire-dtype` (tests and `tandem status` read it).
#[derive(Default)]
struct LinkTraffic {
    f32_dispatches: AtomicU64,
    bf16_dispatches: AtomicU64,
    /// Hidden-state rows of those dispatches.
    rows: AtomicU64,
    /// Their payload bytes (values and assignments).
    payload_bytes: AtomicU64,
}

impl LinkTraffic {
    fn count(&self, m: &crate::wire::MatrixMeta) {
        if m.rows == 0 {
            return; // an empty dispatch (a member with nothing scheduled) carries no values
        }
        match m.dtype {
            WireDtype::F32 => &self.f32_dispatches,
            WireDtype::Bf16 => &self.bf16_dispatches,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(m.rows as u64, Ordering::Relaxed);
        self.payload_bytes
            .fetch_add(m.payload_len, Ordering::Relaxed);
    }

    fn report(&self) -> TrafficReport {
        TrafficReport {
            f32_dispatches: self.f32_dispatches.load(Ordering::Relaxed),
            bf16_dispatches: self.bf16_dispatches.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            payload_bytes: self.payload_bytes.load(Ordering::Relaxed),
        }
    }
}

/// [`LinkTraffic`] as a status report shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// Dispatches with rows whose values crossed in f32 / in bf16.
    pub f32_dispatches: u64,
    pub bf16_dispatches: u64,
    /// Hidden-state rows in those dispatches.
    pub rows: u64,
    /// Their payload bytes: `rows * hidden * (4 or 2)` plus 12 bytes per assignment.
    pub payload_bytes: u64,
}

/// Counts a connection in [`WorkerShared::pending`] until dropped.
struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Expert worker `worker`'s end: accepts the replicas' connections on a listener.
pub struct TcpExpertLink {
    shared: Arc<WorkerShared>,
    rx: mpsc::Receiver<ToWorker>,
}

/// What a status query returns for a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub worker: u32,
    pub tandem_version: String,
    /// Per replica rank: the peer address when connected.
    pub replicas: Vec<Option<String>>,
    /// Per replica rank: how frames travel ("tcp", "tls" or "shm") when connected.
    #[serde(default)]
    pub transports: Vec<Option<String>>,
    /// Per replica rank: the dispatches received since the worker started.
    #[serde(default)]
    pub traffic: Vec<TrafficReport>,
    /// Shared-memory loans this worker's process published (combines lent) and read whole
    /// (dispatches lent by replicas), over every link ([`crate::shm::loans`]).
    #[serde(default)]
    pub loans_made: u64,
    #[serde(default)]
    pub loans_read: u64,
    pub status: serde_json::Value,
}

impl TcpExpertLink {
    /// Serves `n_replicas` replicas on `listener` from background threads.
    pub fn listen(
        listener: TcpListener,
        worker: u32,
        n_replicas: usize,
        id: Identity,
        opts: NetOptions,
        status: Arc<Mutex<WorkerStatus>>,
    ) -> Self {
        let shared = Arc::new(WorkerShared {
            worker,
            id,
            opts,
            conns: (0..n_replicas).map(|_| Mutex::new(None)).collect(),
            peers: (0..n_replicas).map(|_| Mutex::new(None)).collect(),
            gen: AtomicU64::new(1),
            status,
            pending: AtomicUsize::new(0),
            traffic: (0..n_replicas).map(|_| LinkTraffic::default()).collect(),
        });
        if let Err(e) = tune_socket((&listener).into(), shared.opts.socket_buffer) {
            tracing::warn!(worker, "cannot set the M2N listener's socket options: {e}");
        }
        if let Ok(a) = listener.local_addr() {
            if shared.opts.cluster_secret.is_none() && !a.ip().is_loopback() {
                tracing::warn!(
                    worker,
                    "expert worker {worker} listens on {a} without a cluster secret: anyone \
                     who can reach this port can join as an attention replica. Set one \
                     ({SECRET_HOWTO}) or listen on 127.0.0.1"
                );
            }
        }
        let (tx, rx) = mpsc::channel();
        {
            let shared = shared.clone();
            let _ = std::thread::Builder::new()
                .name(format!("m2n-accept{worker}"))
                .spawn(move || {
                    for stream in listener.incoming() {
                        let Ok(stream) = stream else { continue };
                        let max = shared.opts.max_pending_handshakes.max(1);
                        if shared.pending.fetch_add(1, Ordering::Relaxed) >= max {
                            shared.pending.fetch_sub(1, Ordering::Relaxed);
                            let peer = stream
                                .peer_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_else(|_| "?".into());
                            tracing::warn!(
                                worker,
                                "refusing {peer}: {max} connections are already in the handshake"
                            );
                            let _ = stream.shutdown(Shutdown::Both);
                            continue;
                        }
                        let mine = shared.clone();
                        let tx = tx.clone();
                        let spawned = std::thread::Builder::new()
                            .name("m2n-conn".into())
                            .spawn(move || worker_conn(&mine, stream, tx));
                        if spawned.is_err() {
                            // The connection is dropped with the closure; so is its count.
                            shared.pending.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                });
        }
        Self { shared, rx }
    }
}

/// The worker's side of the handshake, up to a checked proof: the hello and the worker's
/// own proof (with a secret) for the ack. `Err`: the reason the peer is refused.
fn worker_handshake(
    s: &WorkerShared,
    rd: &mut ReadHalf,
    wr: &mut WriteHalf,
) -> Result<(Hello, Option<String>), String> {
    let hello = match read_frame(rd, 0, 0) {
        Ok(Frame::Hello(t)) => {
            serde_json::from_str::<Hello>(&t).map_err(|e| format!("unreadable hello: {e}"))?
        }
        Ok(_) => return Err("the first message must be a hello".into()),
        // A TLS record (type handshake, version 3.x) where a frame's magic should be.
        Err(WireError::BadMagic(m)) if m & 0xffff == 0x0316 => {
            return Err(format!(
                "the peer speaks TLS but this worker has no TLS certificate ({}): give \
                 every expert worker one, or the peer no CA bundle",
                tls::SERVER_HOWTO
            ))
        }
        Err(e) => return Err(format!("handshake: {e}")),
    };
    if hello.wire_version != WIRE_VERSION {
        return Err(format!(
            "wire version {} (tandem {}), this worker speaks {WIRE_VERSION} (tandem {})",
            hello.wire_version,
            hello.tandem_version,
            env!("CARGO_PKG_VERSION")
        ));
    }
    let secret = s.opts.cluster_secret.as_ref();
    match (secret.is_some(), hello.authenticated) {
        (true, false) => {
            return Err(format!(
                "this worker requires the cluster secret and the peer has none ({SECRET_HOWTO})"
            ))
        }
        (false, true) => {
            return Err(
                "the peer holds a cluster secret but this worker has none: give every process \
                 of the deployment the same secret"
                    .into(),
            )
        }
        _ => {}
    }
    let peer_nonce = parse_nonce(&hello.nonce).map_err(|e| format!("bad hello: {e}"))?;
    let worker_nonce = nonce()?;
    let ch = Challenge {
        worker: s.worker,
        nonce: to_hex(&worker_nonce),
        authenticated: secret.is_some(),
    };
    send_text(wr, &Frame::Challenge(json(&ch)))?;
    let proof = match read_frame(rd, 0, 0) {
        Ok(Frame::Proof(t)) => {
            serde_json::from_str::<Proof>(&t).map_err(|e| format!("unreadable proof: {e}"))?
        }
        Ok(_) => return Err("the answer to the challenge must be a proof".into()),
        Err(e) => return Err(format!("handshake: {e}")),
    };
    let Some(secret) = secret else {
        return Ok((hello, None));
    };
    let t = transcript(&hello, s.worker, &worker_nonce, &peer_nonce);
    let ok = proof
        .proof
        .as_deref()
        .and_then(from_hex)
        .is_some_and(|p| secret.verify(TAG_PEER, t.bytes(), &p));
    if !ok {
        return Err(
            "authentication failed: the proof does not match this connection (another cluster \
             secret, or a replayed handshake)"
                .into(),
        );
    }
    Ok((hello, Some(to_hex(&secret.prove(TAG_WORKER, t.bytes())))))
}

/// What a status query gets: each replica's address and transport (one look at each entry,
/// so the two agree), the traffic counters, the loans and the worker's status.
fn status_report(s: &WorkerShared) -> WorkerReport {
    let (replicas, transports) = s
        .peers
        .iter()
        .map(|p| {
            let entry = p.lock().ok().and_then(|g| g.clone());
            let transport = entry.as_ref().map(|(_, t)| t.to_string());
            (entry.map(|(a, _)| a), transport)
        })
        .unzip();
    let (loans_made, loans_read) = crate::shm::loans();
    WorkerReport {
        worker: s.worker,
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        replicas,
        transports,
        traffic: s.traffic.iter().map(LinkTraffic::report).collect(),
        loans_made,
        loans_read,
        status: s
            .status
            .lock()
            .ok()
            .and_then(|g| serde_json::to_value(&*g).ok())
            .unwrap_or_default(),
    }
}

/// The rank of a replica's hello whose role, model, deployment and rank this worker takes;
/// `Err`: why it is refused.
fn replica_rank(s: &WorkerShared, hello: &Hello) -> Result<usize, String> {
    if hello.role != "replica" {
        return Err(format!("unknown role {:?}", hello.role));
    }
    match &hello.identity {
        Some(id) if *id == s.id => {}
        Some(id) if id.model_hash != s.id.model_hash || id.hidden_size != s.id.hidden_size => {
            return Err(format!(
                "model mismatch: the replica serves model {} (hidden {}), this worker {} (hidden {})",
                id.model_hash, id.hidden_size, s.id.model_hash, s.id.hidden_size
            ))
        }
        Some(id) => {
            return Err(format!(
                "deployment mismatch: the replica's deployment hash is {}, this worker's {}",
                id.deployment_hash, s.id.deployment_hash
            ))
        }
        None => return Err("the hello names no model".into()),
    }
    let rank = hello.rank as usize;
    if rank >= s.conns.len() {
        return Err(format!(
            "replica rank {rank}, but the deployment has {} replicas",
            s.conns.len()
        ));
    }
    Ok(rank)
}

/// Reads replica `rank`'s frames and hands them to the worker until the connection breaks,
/// a frame is malformed or claims another sender, or the worker stops; returns why.
fn read_replica_frames(
    s: &WorkerShared,
    rd: &mut ReadHalf,
    rank: usize,
    tx: &mpsc::Sender<ToWorker>,
) -> String {
    let mut r = BufReader::with_capacity(1 << 16, rd);
    loop {
        match read_frame_meta(&mut r, s.id.hidden_size, s.opts.max_payload) {
            Ok((Frame::ToWorker(m), meta)) => {
                if let Some(meta) = &meta {
                    s.traffic[rank].count(meta);
                }
                let sender = match &m {
                    ToWorker::Dispatch(d) => d.header.sender,
                    ToWorker::Join { replica } | ToWorker::Trouble { replica, .. } => *replica,
                    ToWorker::Gone { .. } => u32::MAX,
                };
                if sender != rank as u32 {
                    return format!("message claims to come from replica {sender}");
                }
                if tx.send(m).is_err() {
                    return "the worker stopped".into();
                }
            }
            Ok(_) => return "unexpected message kind on a worker connection".into(),
            Err(WireError::Closed) => return "closed by the replica".into(),
            Err(e) => return e.to_string(),
        }
    }
}

fn worker_conn(s: &WorkerShared, stream: TcpStream, tx: mpsc::Sender<ToWorker>) {
    let pending = PendingGuard(&s.pending);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    // Inherited from the listener where `listen` could set them; set again in case not.
    let _ = tune_socket((&stream).into(), s.opts.socket_buffer);
    let limit = s.opts.handshake_timeout;
    let _ = stream.set_write_timeout(Some(limit));
    let opened = match &s.opts.tls_server {
        Some(t) => tls::accept(&stream, t, limit),
        None => tls::plain(&stream, limit).map_err(|e| e.to_string()),
    };
    let (mut rd, mut wr) = match opened {
        Ok(h) => h,
        Err(why) => {
            tracing::warn!(worker = s.worker, "refusing {peer}: {why}");
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    let reject = |wr: &mut WriteHalf, why: String| {
        tracing::warn!(worker = s.worker, "refusing {peer}: {why}");
        let _ = write_frame(wr, &Frame::Reject(why), 0);
        let _ = wr.flush();
        wr.shutdown();
    };
    let (hello, proof) = match worker_handshake(s, &mut rd, &mut wr) {
        Ok(h) => h,
        Err(why) => return reject(&mut wr, why),
    };
    drop(pending);
    let ack = |epoch: u64, shm: bool| {
        Frame::HelloAck(json(&HelloAck {
            worker: s.worker,
            epoch,
            proof: proof.clone(),
            shm,
        }))
    };
    if hello.role == "status" {
        let _ = write_frame(&mut wr, &ack(0, false), 0);
        let _ = write_frame(&mut wr, &Frame::Status(json(&status_report(s))), 0);
        let _ = wr.flush();
        wr.shutdown();
        return;
    }
    let rank = match replica_rank(s, &hello) {
        Ok(rank) => rank,
        Err(why) => return reject(&mut wr, why),
    };
    // A replica on this host may offer shared memory; a refusal (logged) keeps TCP.
    let shm = match &hello.shm {
        Some(o) if s.opts.shared_memory && s.opts.tls_server.is_none() => {
            match crate::shm::accept(&o.path, &o.token, &stream, s.opts.shm_lending) {
                Ok(h) => Some(h),
                Err(why) => {
                    tracing::info!(
                        worker = s.worker,
                        "replica {} ({peer}) stays on TCP: {why}",
                        hello.rank
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let epoch = s.status.lock().map(|g| g.epoch).unwrap_or(0);
    let gen = s.gen.fetch_add(1, Ordering::Relaxed);
    {
        let Ok(mut g) = s.conns[rank].lock() else {
            return;
        };
        if let Some(old) = g.take() {
            // The replica restarted or reconnected: its old connection is stale.
            old.close();
            let _ = tx.send(ToWorker::Gone {
                replica: rank as u32,
            });
        }
        if send_text(&mut wr, &ack(epoch, shm.is_some())).is_err() {
            return;
        }
        // The ack went over the socket; from here on frames take the rings.
        if let Some((r, w)) = shm {
            rd = r;
            wr = w;
        }
        *g = Some(Conn {
            gen,
            w: wr,
            dtype: hello.wire_dtype,
            transport: transport_name(&rd),
        });
    }
    if end_handshake(&stream, &mut rd).is_err() {
        return;
    }
    let transport = transport_name(&rd);
    if let Ok(mut p) = s.peers[rank].lock() {
        *p = Some((peer.clone(), transport));
    }
    tracing::info!(
        worker = s.worker,
        "attention replica {rank} connected from {peer} (hidden states in {}, {}, {transport})",
        hello.wire_dtype.name(),
        if proof.is_some() {
            "authenticated"
        } else {
            "no cluster secret"
        },
    );
    let why = read_replica_frames(s, &mut rd, rank, &tx);
    let _ = stream.shutdown(Shutdown::Both);
    let mine = s.conns[rank]
        .lock()
        .map(|mut g| {
            let mine = g.as_ref().is_some_and(|c| c.gen == gen);
            if mine {
                *g = None;
            }
            mine
        })
        .unwrap_or(false);
    if mine {
        if let Ok(mut p) = s.peers[rank].lock() {
            *p = None;
        }
        tracing::warn!(
            worker = s.worker,
            "dropped the connection of attention replica {rank} ({peer}): {why}"
        );
        let _ = tx.send(ToWorker::Gone {
            replica: rank as u32,
        });
    }
}

impl ExpertLink for TcpExpertLink {
    fn num_replicas(&self) -> usize {
        self.shared.conns.len()
    }
    fn recv(&self) -> Result<Option<ToWorker>, TransportError> {
        Ok(self.rx.recv().ok())
    }
    fn send(&self, replica: u32, msg: ToReplica) -> Result<(), TransportError> {
        let r = replica as usize;
        let slot = self.shared.conns.get(r).ok_or_else(|| {
            TransportError::Disconnected(format!("attention replica {r} does not exist"))
        })?;
        send_on(
            slot,
            &Frame::ToReplica(msg),
            self.shared.id.hidden_size,
            || format!("attention replica {r}"),
        )
    }
}

/// Asks the worker at `addr` for its status (JSON). With a `secret`, the query proves it and
/// checks the worker's proof like a replica does; a worker with a secret answers no query
/// without it.
pub fn query_status(
    addr: &str,
    timeout: Duration,
    secret: Option<&ClusterSecret>,
) -> Result<WorkerReport, String> {
    query_status_with(addr, timeout, secret, None)
}

/// [`query_status`], over TLS when `tls` is given (a worker with a certificate answers only
/// over TLS).
pub fn query_status_with(
    addr: &str,
    timeout: Duration,
    secret: Option<&ClusterSecret>,
    tls: Option<&TlsClient>,
) -> Result<WorkerReport, String> {
    let sa = resolve(addr).map_err(|e| e.to_string())?;
    let stream = TcpStream::connect_timeout(&sa, timeout).map_err(|e| e.to_string())?;
    let (mut rd, mut wr) = open_client(&stream, tls, addr, timeout)?;
    let hello = Hello {
        wire_version: WIRE_VERSION,
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        role: "status".into(),
        rank: 0,
        identity: None,
        wire_dtype: WireDtype::F32,
        nonce: String::new(),
        authenticated: false,
        shm: None,
    };
    client_handshake(&mut rd, &mut wr, hello, secret, None)?;
    // The report follows the ack, within the same deadline.
    match read_frame(&mut rd, 0, 0) {
        Ok(Frame::Status(t)) => serde_json::from_str(&t).map_err(|e| e.to_string()),
        Ok(Frame::Reject(why)) => Err(why),
        Ok(_) => Err("unexpected answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs expert worker `rank` of `dep` on `listener` until the process stops: loads nothing
/// (the caller passes the model, typically loaded with only this worker's experts), answers
/// status queries, and starts over after a replica's protocol violation.
pub fn serve_expert(
    model: Arc<Model>,
    dep: &Deployment,
    rank: u32,
    listener: TcpListener,
    opts: NetOptions,
) -> Result<(), EngineError> {
    dep.validate_shape()
        .map_err(|e| EngineError::Deployment(e.to_string()))?;
    if rank >= dep.expert_workers {
        return Err(EngineError::Deployment(format!(
            "expert rank {rank}, but the deployment has {} expert workers",
            dep.expert_workers
        )));
    }
    let id = Identity::new(&model, dep)?;
    let placement = dep
        .placement_for(model.cfg.num_experts)
        .map_err(|e| EngineError::Deployment(e.to_string()))?;
    let status = Arc::new(Mutex::new(WorkerStatus::default()));
    let link = TcpExpertLink::listen(
        listener,
        rank,
        dep.attention_replicas as usize,
        id,
        opts,
        status.clone(),
    );
    // Worker 0's epochs must outrun those of any earlier incarnation: start from the clock.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let worker = ExpertWorker {
        id: rank,
        model,
        link: Box::new(link),
        micro_batches: dep.micro_batches,
        experts: placement.experts_of(rank),
        initial_epoch: epoch,
        recover: true,
        status,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(dep.threads_per_worker.max(1) as usize)
        .thread_name(move |i| format!("expert{rank}-{i}"))
        .build()
        .map_err(|e| EngineError::Spawn(e.to_string()))?;
    let stats = WorkerStats::default();
    pool.install(|| worker.run(&stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/sys/net/core/{name}` (0 where unreadable).
    fn core_sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn m2n_sockets_get_nodelay_and_the_buffers_asked_at_both_ends() {
        let buffer = 1 << 20;
        // Linux doubles what is asked (for its bookkeeping), capped at the `*_max` sysctl.
        let want_snd = 2 * buffer.min(core_sysctl("wmem_max"));
        let want_rcv = 2 * buffer.min(core_sysctl("rmem_max"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tune_socket((&listener).into(), buffer).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = connect_tuned(&addr, Duration::from_secs(5), buffer).unwrap();
        // What `listen` sets on the listener, the accepted socket inherits.
        let (accepted, _) = listener.accept().unwrap();
        for (end, s) in [("connecting", &client), ("accepted", &accepted)] {
            let r = socket2::SockRef::from(s);
            assert!(r.tcp_nodelay().unwrap(), "{end} socket without TCP_NODELAY");
            assert_eq!(r.send_buffer_size().unwrap(), want_snd, "{end} SO_SNDBUF");
            assert_eq!(r.recv_buffer_size().unwrap(), want_rcv, "{end} SO_RCVBUF");
        }
        // 0 leaves the OS's autotuned buffers: the receive buffer starts far below what was
        // asked above (the send buffer Linux sizes itself at connect, on loopback already
        // large, so only the receive side tells the two apart).
        let plain = connect_tuned(&addr, Duration::from_secs(5), 0).unwrap();
        let r = socket2::SockRef::from(&plain);
        assert!(r.tcp_nodelay().unwrap());
        assert!(r.recv_buffer_size().unwrap() < want_rcv);
        assert_eq!(NetOptions::default().socket_buffer, DEFAULT_SOCKET_BUFFER);
    }
}
