//! `tandem bench m2n`: one MoE layer's M-to-N exchange (a dispatch from every sender to every
//! receiver, then a combine back), measured between separate processes.
//!
//! Ours runs M sender and N receiver child processes of this binary connected by the real
//! M2N transport (`tandem_engine::net`: `TcpReplicaLink` / `TcpExpertLink` over loopback).
//! `--baseline mpi` runs the same exchange across M+N MPI ranks under `mpirun`, each round
//! being two `MPI_Alltoallv` calls: an all-to-all collective spans every rank, so for an
//! M-to-N pattern the senders pass zero counts to senders and the receivers zero counts to
//! receivers (dispatch), and the other way round (combine).
//!
//! Definitions (the same for both sides):
//! - `--bytes S` is the size of one message: what one sender dispatches to one receiver, and
//!   what one receiver sends back to one sender, per round (the paper's "256 KB messages").
//! - A sender's round runs from the start of its first dispatch to the arrival of its last
//!   combine. Latencies are those of every sender's timed rounds (warmup excluded); their
//!   percentiles interpolate between closest ranks (`crate::stats::percentile`, as in every
//!   report).
//! - Throughput: bytes moved by the timed rounds (2*M*N*S per round, both directions) over
//!   the span from the earliest sender's first timed round to the latest sender's last.
//!
//! `--tls` runs ours over TLS (rustls, `tandem_engine::tls`): the harness makes a throwaway
//! CA and a certificate for 127.0.0.1 with rcgen, the receivers present it and the senders
//! check it, as a deployment with `--tls-cert/--tls-key/--tls-ca` would.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stats::percentile;
use crate::sysinfo::unix_ns;
use tandem_engine::wire::WireDtype;

/// Prefix of the line a peer prints on stdout with its raw measurements.
const RESULT_PREFIX: &str = "M2N_RESULT ";
/// Prefix of the line a receiver prints once it listens.
const PORT_PREFIX: &str = "M2N_PORT ";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// MPI_Alltoallv across the same M+N processes (needs `--features mpi`).
    Mpi,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MpiTransport {
    /// OpenMPI's ob1 PML with the TCP BTL on loopback only: the same wire as ours.
    Tcp,
    /// OpenMPI's ob1 PML with the shared-memory BTL (vader): what MPI picks on one host.
    Shm,
}

/// How ours moves the messages between processes of this host.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OurTransport {
    /// What a deployment does: shared-memory rings between processes of one host, TCP
    /// otherwise (and with TLS).
    Auto,
    /// TCP loopback only (the shared-memory offer is never made).
    Tcp,
}

#[derive(Args, Clone)]
pub struct M2nArgs {
    /// M: sender processes (the attention side).
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// N: receiver processes (the expert side).
    #[arg(long, default_value_t = 4)]
    pub receivers: usize,
    /// Bytes of one message (one sender to one receiver, and back), a multiple of 4*hidden.
    #[arg(long, default_value_t = 256 * 1024)]
    pub bytes: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Untimed rounds first.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// f32 values per row (messages are [bytes/(4*hidden), hidden] tensors).
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// Run the same exchange with a baseline instead of the tandem transport.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// MPI only: which OpenMPI transport carries the messages.
    #[arg(long, value_enum, default_value_t = MpiTransport::Tcp)]
    pub mpi_transport: MpiTransport,
    /// MPI only: OpenMPI's mpi_yield_when_idle (1: waiting ranks yield the CPU instead of
    /// spinning); default: OpenMPI's own choice.
    #[arg(long)]
    pub mpi_yield_when_idle: Option<u8>,
    /// MPI only: the mpirun to use.
    #[arg(long, default_value = "mpirun")]
    pub mpirun: String,
    /// Give up (and stop every child) after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// How the senders put the hidden states on the wire (ours only): `f32`, or `bf16` (half
    /// the wire bytes of each message; `--bytes` stays the f32 size of the activations).
    #[arg(long, default_value = "f32", value_parser = parse_wire_dtype)]
    pub wire_dtype: WireDtype,
    /// Ours over TLS (a throwaway certificate made by the harness), to measure its cost.
    #[arg(long)]
    pub tls: bool,
    /// Ours: `auto` (shared memory between these processes, as a deployment on one host
    /// does) or `tcp` (loopback sockets only).
    #[arg(long, value_enum, default_value_t = OurTransport::Auto)]
    pub transport: OurTransport,
    /// Ours over TCP: SO_SNDBUF and SO_RCVBUF of every socket in bytes (0: the OS's
    /// autotuning, what tandem did before; default: the engine's, `NetOptions::socket_buffer`).
    #[arg(long, default_value_t = tandem_engine::net::DEFAULT_SOCKET_BUFFER)]
    pub socket_buffer: usize,
}

fn parse_wire_dtype(s: &str) -> Result<WireDtype, String> {
    WireDtype::parse(s).ok_or_else(|| format!("unknown wire dtype {s:?} (f32 or bf16)"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Sender,
    Receiver,
}

/// A child process of `tandem bench m2n` (not for direct use).
#[derive(Args, Clone)]
pub struct M2nPeerArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    #[arg(long)]
    pub rank: u32,
    #[arg(long)]
    pub senders: usize,
    #[arg(long)]
    pub receivers: usize,
    #[arg(long)]
    pub bytes: usize,
    #[arg(long)]
    pub iters: usize,
    #[arg(long)]
    pub warmup: usize,
    #[arg(long)]
    pub hidden: usize,
    /// Senders: the receivers' addresses, in receiver order.
    #[arg(long, value_delimiter = ',')]
    pub connect: Vec<String>,
    #[arg(long, default_value = "f32", value_parser = parse_wire_dtype)]
    pub wire_dtype: WireDtype,
    /// TLS: the directory with the harness's `ca.pem`, `cert.pem` and `key.pem`.
    #[arg(long)]
    pub tls_dir: Option<std::path::PathBuf>,
    #[arg(long, value_enum, default_value_t = OurTransport::Auto)]
    pub transport: OurTransport,
    #[arg(long, default_value_t = tandem_engine::net::DEFAULT_SOCKET_BUFFER)]
    pub socket_buffer: usize,
}

/// A throwaway PKI for `--tls`: a CA and a certificate for 127.0.0.1 signed by it, in a
/// temporary directory removed on drop.
struct BenchPki {
    dir: std::path::PathBuf,
}

impl BenchPki {
    fn new() -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("tandem-bench-m2n-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tandem bench m2n CA");
        let ca = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &ca, &ca_key)?;
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
        ] {
            std::fs::write(dir.join(name), text)
                .with_context(|| format!("writing {}", dir.join(name).display()))?;
        }
        Ok(Self { dir })
    }
}

impl Drop for BenchPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One MPI rank of `tandem bench m2n --baseline mpi` (started by mpirun, not for direct use).
#[derive(Args, Clone)]
pub struct M2nMpiRankArgs {
    #[arg(long)]
    pub senders: usize,
    #[arg(long)]
    pub receivers: usize,
    #[arg(long)]
    pub bytes: usize,
    #[arg(long)]
    pub iters: usize,
    #[arg(long)]
    pub warmup: usize,
}

/// What one sender measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SenderReport {
    pub rank: u32,
    /// Wall clock at the start of the first timed round, ns since the Unix epoch.
    pub start_unix_ns: u64,
    /// Wall clock at the end of the last timed round.
    pub end_unix_ns: u64,
    /// Every timed round, ns.
    pub round_ns: Vec<u64>,
    /// Ours: how each of this sender's links carried the messages ("tcp", "tls", "shm").
    #[serde(default)]
    pub transports: Vec<String>,
    /// Ours over shared memory: the dispatches this sender lent (read once by the receiver,
    /// straight from its memory) and the combines it read the same way.
    #[serde(default)]
    pub loans: (u64, u64),
}

fn check_shape(m: usize, n: usize, bytes: usize, hidden: usize, iters: usize) -> Result<usize> {
    if m == 0 || n == 0 {
        bail!("--senders and --receivers must be at least 1");
    }
    if m > 64 {
        bail!("at most 64 senders (the dispatch member mask is 64 bits)");
    }
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    if hidden == 0 || bytes == 0 || !bytes.is_multiple_of(4 * hidden) {
        bail!(
            "--bytes {bytes} must be a positive multiple of 4*hidden = {} (rows of {hidden} f32)",
            4 * hidden
        );
    }
    if bytes
        .checked_mul(m.max(n))
        .is_none_or(|t| t > i32::MAX as usize)
    {
        bail!("--bytes x max(M, N) must stay under 2 GiB (MPI counts are 32-bit)");
    }
    Ok(bytes / (4 * hidden))
}

pub fn run(a: M2nArgs) -> Result<()> {
    if a.baseline.is_some() && a.wire_dtype != WireDtype::F32 {
        bail!("--wire-dtype is tandem's option; the MPI baseline moves bytes as they are");
    }
    if a.baseline.is_some() && a.tls {
        bail!("--tls is tandem's option; the MPI baseline has no TLS");
    }
    if a.baseline.is_some() && a.transport != OurTransport::Auto {
        bail!("--transport is tandem's option; use --mpi-transport for the MPI baseline");
    }
    let hidden = if a.baseline.is_some() { 1 } else { a.hidden };
    let rows = check_shape(a.senders, a.receivers, a.bytes, hidden, a.iters)?;
    let started = Instant::now();
    let (reports, extra) = match a.baseline {
        None => (
            run_ours(&a)?,
            json!({"transport": match (a.tls, a.transport) {
                (true, _) => "tandem M2N over TLS (rustls, ring) over TCP loopback (tandem_engine::net)",
                (false, OurTransport::Tcp) => "tandem M2N over TCP loopback (tandem_engine::net)",
                (false, OurTransport::Auto) => "tandem M2N, auto: shared-memory rings between processes of this host, the TCP loopback socket kept for liveness (tandem_engine::net, tandem_engine::shm)",
            }, "our_transport": a.transport, "socket_buffer": a.socket_buffer}),
        ),
        Some(Baseline::Mpi) => run_mpi(&a)?,
    };
    let out = summarize(&a, rows, reports, extra, started.elapsed())?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Waits for every child, killing them all if one fails or the deadline passes.
struct Children {
    procs: Vec<(String, Child)>,
}

impl Children {
    fn kill_all(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn spawn_peer(exe: &std::path::Path, args: &[String]) -> Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "m2n-peer"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "error");
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Reads a child's stdout on a thread; the lines come back through the channel.
fn read_lines(child: &mut Child, name: String) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let _ = std::thread::Builder::new()
            .name(format!("stdout-{name}"))
            .spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
    }
    rx
}

fn run_ours(a: &M2nArgs) -> Result<Vec<SenderReport>> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let pki = a.tls.then(BenchPki::new).transpose()?;
    let common = |role: &str, rank: usize| -> Vec<String> {
        let tls = pki
            .iter()
            .flat_map(|p| ["--tls-dir".to_string(), p.dir.display().to_string()]);
        vec![
            "--role".into(),
            role.into(),
            "--rank".into(),
            rank.to_string(),
            "--senders".into(),
            a.senders.to_string(),
            "--receivers".into(),
            a.receivers.to_string(),
            "--bytes".into(),
            a.bytes.to_string(),
            "--iters".into(),
            a.iters.to_string(),
            "--warmup".into(),
            a.warmup.to_string(),
            "--hidden".into(),
            a.hidden.to_string(),
            "--wire-dtype".into(),
            a.wire_dtype.name().into(),
            "--transport".into(),
            match a.transport {
                OurTransport::Auto => "auto",
                OurTransport::Tcp => "tcp",
            }
            .into(),
            "--socket-buffer".into(),
            a.socket_buffer.to_string(),
        ]
        .into_iter()
        .chain(tls)
        .collect()
    };
    eprintln!(
        "bench m2n: M={} N={} {} B/message, {} rounds (+{} warmup), tandem {}; starting {} receivers",
        a.senders,
        a.receivers,
        a.bytes,
        a.iters,
        a.warmup,
        if a.tls { "TLS over TCP" } else { "TCP" },
        a.receivers
    );
    let mut kids = Children { procs: Vec::new() };
    let mut addrs = Vec::new();
    for r in 0..a.receivers {
        let mut c = spawn_peer(&exe, &common("receiver", r))?;
        let lines = read_lines(&mut c, format!("r{r}"));
        kids.procs.push((format!("receiver {r}"), c));
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left.min(Duration::from_secs(60)))
            .map_err(|_| anyhow!("receiver {r} did not report its port"))?;
        let port = line
            .strip_prefix(PORT_PREFIX)
            .ok_or_else(|| anyhow!("receiver {r} said {line:?} instead of its port"))?;
        addrs.push(format!("127.0.0.1:{}", port.trim()));
    }
    eprintln!(
        "bench m2n: receivers on {}; starting {} senders",
        addrs.join(","),
        a.senders
    );
    let mut outs = Vec::new();
    for s in 0..a.senders {
        let mut args = common("sender", s);
        args.push("--connect".into());
        args.push(addrs.join(","));
        let mut c = spawn_peer(&exe, &args)?;
        outs.push(read_lines(&mut c, format!("s{s}")));
        kids.procs.push((format!("sender {s}"), c));
    }
    // Wait for every child to exit successfully.
    loop {
        let mut running = 0;
        for (name, c) in &mut kids.procs {
            match c.try_wait()? {
                Some(st) if !st.success() => {
                    let name = name.clone();
                    kids.kill_all();
                    bail!("{name} failed ({st})");
                }
                Some(_) => {}
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        if Instant::now() >= deadline {
            kids.kill_all();
            bail!(
                "timed out after {}s ({running} processes still running)",
                a.timeout_s
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut reports = Vec::new();
    for (s, rx) in outs.iter().enumerate() {
        let rep = rx
            .try_iter()
            .find_map(|l| l.strip_prefix(RESULT_PREFIX).map(str::to_string))
            .ok_or_else(|| anyhow!("sender {s} reported no result"))?;
        reports.push(serde_json::from_str(&rep).context("reading a sender's result")?);
    }
    Ok(reports)
}

/// Entry point of the child processes.
pub fn peer(a: M2nPeerArgs) -> Result<()> {
    use tandem_engine::net::{Identity, NetOptions};
    let rows = check_shape(a.senders, a.receivers, a.bytes, a.hidden, a.iters)?;
    let id = Identity {
        model_hash: "bench-m2n".into(),
        deployment_hash: format!("m2n-{}x{}", a.senders, a.receivers),
        hidden_size: a.hidden,
    };
    let mut opts = NetOptions {
        wire_dtype: a.wire_dtype,
        shared_memory: a.transport == OurTransport::Auto,
        socket_buffer: a.socket_buffer,
        ..NetOptions::default()
    };
    if let Some(d) = &a.tls_dir {
        match a.role {
            Role::Receiver => {
                opts.tls_server = Some(tandem_engine::tls::TlsServer::from_pem_files(
                    &d.join("cert.pem"),
                    &d.join("key.pem"),
                    None,
                )?)
            }
            Role::Sender => {
                opts.tls_client = Some(tandem_engine::tls::TlsClient::from_pem_files(
                    &d.join("ca.pem"),
                    None,
                )?)
            }
        }
    }
    match a.role {
        Role::Receiver => receiver(&a, rows, id, opts),
        Role::Sender => sender(&a, rows, id, opts),
    }
}

/// The header of every message of round `iteration` from `sender` (one layer, one
/// micro-batch, epoch 1).
fn bench_slot(iteration: u64, sender: u32) -> tandem_engine::transport::SlotHeader {
    tandem_engine::transport::SlotHeader {
        epoch: 1,
        slot: tandem_core::Slot::new(iteration, 0, 0),
        sender,
    }
}

/// A `[rows, hidden]` message with non-zero, non-uniform contents, so that no page is
/// shared or skipped.
fn bench_payload(rows: usize, hidden: usize, seed: u32) -> Result<candle_core::Tensor> {
    let v: Vec<f32> = (0..rows * hidden)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-9)
        .collect();
    Ok(tandem_model::layers::from_vec(v, rows, hidden)?)
}

/// A receiver (expert worker): once all M dispatches of a round are in, one combine back to
/// every sender; ends when every sender has gone after the last round.
fn receiver(
    a: &M2nPeerArgs,
    rows: usize,
    id: tandem_engine::net::Identity,
    opts: tandem_engine::net::NetOptions,
) -> Result<()> {
    use std::sync::{Arc, Mutex};
    use tandem_engine::net::TcpExpertLink;
    use tandem_engine::transport::{CombineMsg, ExpertLink, ToReplica, ToWorker};
    let total = a.warmup + a.iters;
    let m = a.senders;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let status = Arc::new(Mutex::new(
        tandem_engine::expert_worker::WorkerStatus::default(),
    ));
    let link = TcpExpertLink::listen(listener, a.rank, m, id, opts, status);
    println!("{PORT_PREFIX}{port}");
    let y = bench_payload(rows, a.hidden, 0x5151 + a.rank)?;
    // Dispatches received per round (a sender can be one round ahead of another).
    let mut got: std::collections::BTreeMap<u64, usize> = Default::default();
    let mut done = 0usize;
    let mut gone = 0usize;
    while gone < m {
        let msg = link
            .recv()?
            .ok_or_else(|| anyhow!("receiver {}: link closed", a.rank))?;
        match msg {
            ToWorker::Dispatch(d) => {
                let it = d.header.slot.iteration;
                if d.header.sender as usize >= m || it as usize >= total {
                    bail!("receiver {}: unexpected dispatch {:?}", a.rank, d.header);
                }
                let c = got.entry(it).or_default();
                *c += 1;
                if *c == m {
                    got.remove(&it);
                    for s in 0..m as u32 {
                        link.send(
                            s,
                            ToReplica::Combine(CombineMsg {
                                header: bench_slot(it, a.rank),
                                y: y.clone(),
                                next_members: None,
                            }),
                        )?;
                    }
                    done += 1;
                }
            }
            ToWorker::Gone { replica } => {
                if done < total {
                    bail!(
                        "receiver {}: sender {replica} went away after {done} of {total} rounds",
                        a.rank
                    );
                }
                gone += 1;
            }
            ToWorker::Join { .. } | ToWorker::Trouble { .. } => {
                bail!("receiver {}: unexpected control message", a.rank)
            }
        }
    }
    Ok(())
}

/// A sender (attention replica): every round, one dispatch to each receiver, then waits for
/// all N combines; prints its round times.
fn sender(
    a: &M2nPeerArgs,
    rows: usize,
    id: tandem_engine::net::Identity,
    opts: tandem_engine::net::NetOptions,
) -> Result<()> {
    use tandem_core::Members;
    use tandem_engine::net::TcpReplicaLink;
    use tandem_engine::transport::{DispatchMsg, ReplicaLink, ToReplica};
    let total = a.warmup + a.iters;
    let members = Members::first(a.senders);
    let n = a.connect.len();
    if n != a.receivers {
        bail!(
            "sender {}: {n} addresses for {} receivers",
            a.rank,
            a.receivers
        );
    }
    let link = TcpReplicaLink::connect(a.rank, a.connect.clone(), id, opts);
    link.wait_ready(Duration::from_secs(60))
        .map_err(|e| anyhow!("sender {}: {e}", a.rank))?;
    let transports = link
        .transports()
        .iter()
        .map(|t| t.unwrap_or("down").to_string())
        .collect();
    let x = bench_payload(rows, a.hidden, a.rank)?;
    let mut round_ns = Vec::with_capacity(a.iters);
    let mut start_unix_ns = 0;
    let mut seen = vec![false; n];
    for it in 0..total {
        if it == a.warmup {
            start_unix_ns = unix_ns();
        }
        let t0 = Instant::now();
        for w in 0..n as u32 {
            link.dispatch(
                w,
                DispatchMsg {
                    header: bench_slot(it as u64, a.rank),
                    members,
                    more: it + 1 < total,
                    x: x.clone(),
                    assignments: Vec::new(),
                },
            )?;
        }
        seen.iter_mut().for_each(|s| *s = false);
        let mut left = n;
        while left > 0 {
            match link.recv(Duration::from_secs(60))? {
                ToReplica::Combine(c) => {
                    let w = c.header.sender as usize;
                    if c.header.slot.iteration != it as u64 || w >= n || seen[w] {
                        bail!("sender {}: unexpected combine {:?}", a.rank, c.header);
                    }
                    seen[w] = true;
                    left -= 1;
                }
                ToReplica::Lost { worker, why } => {
                    bail!("sender {}: lost receiver {worker}: {why}", a.rank)
                }
                ToReplica::Welcome { .. } | ToReplica::Reset { .. } => {
                    bail!("sender {}: unexpected control message", a.rank)
                }
            }
        }
        if it >= a.warmup {
            round_ns.push(t0.elapsed().as_nanos() as u64);
        }
        if a.rank == 0 && total >= 10 && (it + 1) % (total / 5).max(1) == 0 {
            eprintln!("bench m2n: sender 0 finished round {} of {total}", it + 1);
        }
    }
    let rep = SenderReport {
        rank: a.rank,
        start_unix_ns,
        end_unix_ns: unix_ns(),
        round_ns,
        transports,
        loans: tandem_engine::shm::loans(),
    };
    println!("{RESULT_PREFIX}{}", serde_json::to_string(&rep)?);
    Ok(())
}

fn run_mpi(a: &M2nArgs) -> Result<(Vec<SenderReport>, serde_json::Value)> {
    if !cfg!(feature = "mpi") {
        bail!(
            "this tandem was built without MPI: rebuild with `cargo build --release -p tandem-cli \
             --features mpi` (needs libopenmpi-dev, openmpi-bin and libclang-dev) to use \
             --baseline mpi"
        );
    }
    let exe = std::env::current_exe().context("finding this binary")?;
    let np = a.senders + a.receivers;
    let mut args: Vec<String> = vec![
        "--allow-run-as-root".into(),
        "--oversubscribe".into(),
        "--bind-to".into(),
        "none".into(),
        "-n".into(),
        np.to_string(),
        "--mca".into(),
        "pml".into(),
        "ob1".into(),
    ];
    let btl: &[&str] = match a.mpi_transport {
        MpiTransport::Tcp => &[
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "lo",
        ],
        MpiTransport::Shm => &["--mca", "btl", "vader,self"],
    };
    args.extend(btl.iter().map(|s| s.to_string()));
    if let Some(y) = a.mpi_yield_when_idle {
        args.extend(["--mca".into(), "mpi_yield_when_idle".into(), y.to_string()]);
    }
    let mpirun_opts = args.join(" ");
    args.push(exe.display().to_string());
    args.extend(
        [
            "bench",
            "m2n-mpi-rank",
            "--senders",
            &a.senders.to_string(),
            "--receivers",
            &a.receivers.to_string(),
            "--bytes",
            &a.bytes.to_string(),
            "--iters",
            &a.iters.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ]
        .map(String::from),
    );
    eprintln!(
        "bench m2n: M={} N={} {} B/message, {} rounds (+{} warmup), MPI_Alltoallv; {} {}",
        a.senders,
        a.receivers,
        a.bytes,
        a.iters,
        a.warmup,
        a.mpirun,
        args.join(" ")
    );
    let mut child = Command::new(&a.mpirun)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} (install openmpi-bin)", a.mpirun))?;
    let mut out = String::new();
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mpirun timed out after {}s", a.timeout_s);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    if !status.success() {
        bail!("mpirun failed ({status})");
    }
    let mut reports = Vec::new();
    let mut info = json!({});
    for line in out.lines() {
        if let Some(r) = line.strip_prefix(RESULT_PREFIX) {
            let v: serde_json::Value = serde_json::from_str(r)?;
            reports = serde_json::from_value(v["senders"].clone())?;
            info = v["mpi"].clone();
        }
    }
    if reports.is_empty() {
        bail!("rank 0 printed no result");
    }
    let extra = json!({
        "transport": "MPI_Alltoallv x2 per round across all M+N ranks",
        "mpi_transport": a.mpi_transport,
        "mpi_yield_when_idle": a.mpi_yield_when_idle,
        "mpirun_options": mpirun_opts,
        "mpi": info,
    });
    Ok((reports, extra))
}

#[cfg(not(feature = "mpi"))]
pub fn mpi_rank(_: M2nMpiRankArgs) -> Result<()> {
    bail!("this tandem was built without MPI: rebuild with `--features mpi`")
}

/// One rank under mpirun: ranks 0..M are senders, M..M+N receivers.
#[cfg(feature = "mpi")]
pub fn mpi_rank(a: M2nMpiRankArgs) -> Result<()> {
    use mpi::datatype::{Partition, PartitionMut};
    use mpi::traits::*;
    use mpi::Count;
    check_shape(a.senders, a.receivers, a.bytes, 1, a.iters)?;
    let universe = mpi::initialize().ok_or_else(|| anyhow!("MPI is already initialised"))?;
    let world = universe.world();
    let (m, n) = (a.senders, a.receivers);
    let size = world.size() as usize;
    if size != m + n {
        bail!("{size} MPI ranks, but M+N = {}", m + n);
    }
    let rank = world.rank() as usize;
    let sender = rank < m;
    let s = a.bytes as Count;
    // Counts and displacements of one side of a collective: `s` bytes for each rank in
    // `peers`, none for the others.
    let layout = |peers: std::ops::Range<usize>| -> (Vec<Count>, Vec<Count>) {
        let mut counts = vec![0 as Count; size];
        let mut displs = vec![0 as Count; size];
        for (k, p) in peers.enumerate() {
            counts[p] = s;
            displs[p] = k as Count * s;
        }
        (counts, displs)
    };
    let none = (vec![0 as Count; size], vec![0 as Count; size]);
    let (to_recv, from_send) = (layout(m..m + n), layout(0..m));
    // Dispatch: senders -> receivers. Combine: receivers -> senders.
    let (d_send, d_recv, c_send, c_recv) = if sender {
        (&to_recv, &none, &none, &to_recv)
    } else {
        (&none, &from_send, &from_send, &none)
    };
    let fill = |len: usize, seed: usize| -> Vec<u8> {
        (0..len)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) >> 3) as u8)
            .collect()
    };
    let peers = if sender { n } else { m };
    let out_d = if sender {
        fill(peers * a.bytes, rank)
    } else {
        vec![0u8; 1]
    };
    let mut in_d = if sender {
        vec![0u8; 1]
    } else {
        fill(peers * a.bytes, 0)
    };
    let out_c = if sender {
        vec![0u8; 1]
    } else {
        fill(peers * a.bytes, rank)
    };
    let mut in_c = if sender {
        fill(peers * a.bytes, 0)
    } else {
        vec![0u8; 1]
    };
    let total = a.warmup + a.iters;
    let mut round_ns = Vec::with_capacity(a.iters);
    let mut start_unix_ns = 0;
    for it in 0..total {
        if it == a.warmup {
            start_unix_ns = unix_ns();
        }
        let t0 = Instant::now();
        world.all_to_all_varcount_into(
            &Partition::new(&out_d[..], &d_send.0[..], &d_send.1[..]),
            &mut PartitionMut::new(&mut in_d[..], &d_recv.0[..], &d_recv.1[..]),
        );
        world.all_to_all_varcount_into(
            &Partition::new(&out_c[..], &c_send.0[..], &c_send.1[..]),
            &mut PartitionMut::new(&mut in_c[..], &c_recv.0[..], &c_recv.1[..]),
        );
        if it >= a.warmup {
            round_ns.push(t0.elapsed().as_nanos() as u64);
        }
        if rank == 0 && total >= 10 && (it + 1) % (total / 5).max(1) == 0 {
            eprintln!("bench m2n: MPI rank 0 finished round {} of {total}", it + 1);
        }
    }
    let end_unix_ns = unix_ns();
    // Every rank contributes [start, end, rounds...]; rank 0 keeps the senders'.
    let mut mine = vec![start_unix_ns, end_unix_ns];
    mine.extend_from_slice(&round_ns);
    let root = world.process_at_rank(0);
    if rank == 0 {
        let mut all = vec![0u64; mine.len() * size];
        root.gather_into_root(&mine[..], &mut all[..]);
        let senders: Vec<SenderReport> = all
            .chunks_exact(mine.len())
            .take(m)
            .enumerate()
            .map(|(r, c)| SenderReport {
                rank: r as u32,
                start_unix_ns: c[0],
                end_unix_ns: c[1],
                round_ns: c[2..].to_vec(),
                transports: Vec::new(),
                loans: (0, 0),
            })
            .collect();
        let (maj, min) = mpi::environment::version();
        let lib = mpi::environment::library_version().unwrap_or_default();
        let out = json!({
            "senders": senders,
            "mpi": {
                "standard": format!("{maj}.{min}"),
                "library": lib.lines().next().unwrap_or_default().trim(),
                "processor": mpi::environment::processor_name().unwrap_or_default(),
            },
        });
        println!("{RESULT_PREFIX}{out}");
    } else {
        root.gather_into(&mine[..]);
    }
    Ok(())
}

fn stats(v: &[u64]) -> serde_json::Value {
    let mut us: Vec<f64> = v.iter().map(|&x| x as f64 / 1e3).collect();
    us.sort_by(|a, b| a.total_cmp(b));
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    json!({
        "p50": percentile(&us, 50.0),
        "p99": percentile(&us, 99.0),
        "mean": mean,
        "min": us.first().copied().unwrap_or(0.0),
        "max": us.last().copied().unwrap_or(0.0),
    })
}

fn summarize(
    a: &M2nArgs,
    rows: usize,
    reports: Vec<SenderReport>,
    transport: serde_json::Value,
    elapsed: Duration,
) -> Result<serde_json::Value> {
    let (m, n, s) = (a.senders, a.receivers, a.bytes);
    if reports.len() != m {
        bail!("{} sender reports for {m} senders", reports.len());
    }
    let completed: usize = reports.iter().map(|r| r.round_ns.len()).sum();
    let all: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.round_ns.iter().copied())
        .collect();
    let start = reports.iter().map(|r| r.start_unix_ns).min().unwrap_or(0);
    let end = reports.iter().map(|r| r.end_unix_ns).max().unwrap_or(0);
    let span_s = end.saturating_sub(start) as f64 / 1e9;
    let per_round = 2 * m * n * s;
    let moved = per_round as f64 * a.iters as f64;
    let bps = if span_s > 0.0 { moved / span_s } else { 0.0 };
    let per_sender: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let st = stats(&r.round_ns);
            json!({"rank": r.rank, "rounds": r.round_ns.len(), "p50_us": st["p50"],
                   "p99_us": st["p99"], "mean_us": st["mean"]})
        })
        .collect();
    let p50s: Vec<f64> = per_sender
        .iter()
        .filter_map(|v| v["p50_us"].as_f64())
        .collect();
    let lo = p50s.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = p50s.iter().copied().fold(0.0, f64::max);
    let machine = crate::sysinfo::machine_info();
    let cores = machine["cores"].as_u64().unwrap_or(1) as f64;
    // Ours: how many sender-receiver links each transport carried (checked, not assumed).
    let mut links = std::collections::BTreeMap::<String, usize>::new();
    for t in reports.iter().flat_map(|r| r.transports.iter()) {
        *links.entry(t.clone()).or_default() += 1;
    }
    Ok(json!({
        "bench": "m2n",
        "config": {
            "senders": m,
            "receivers": n,
            "bytes_per_message": s,
            "wire_dtype": a.wire_dtype.name(),
            "tls": a.tls,
            "wire_bytes_per_message": s as u64 / 4 * a.wire_dtype.bytes(),
            "hidden": if a.baseline.is_some() { serde_json::Value::Null } else { json!(a.hidden) },
            "rows_per_message": if a.baseline.is_some() { serde_json::Value::Null } else { json!(rows) },
            "iters": a.iters,
            "warmup": a.warmup,
            "baseline": match a.baseline { None => "none (tandem M2N)", Some(Baseline::Mpi) => "mpi" },
            "transport": transport,
            "links_by_transport": links,
            "senders_loans_made_read": reports.iter().fold((0, 0), |a, r| (a.0 + r.loans.0, a.1 + r.loans.1)),
            "processes": m + n,
            "processes_per_core": (m + n) as f64 / cores,
            "machine": machine,
        },
        "definitions": {
            "message": "bytes_per_message from one sender to one receiver (dispatch) and back (combine), every round",
            "round": "one sender: start of its first dispatch to arrival of its last combine; warmup rounds excluded",
            "throughput": "bytes moved in the timed rounds (2*M*N*bytes_per_message per round, both directions) / wall time from the earliest sender's first timed round to the latest sender's last",
        },
        "rounds_expected": m * a.iters,
        "rounds_completed": completed,
        "latency_us": stats(&all),
        "throughput": {
            "bytes_per_round": per_round,
            "span_s": span_s,
            "bytes_per_s": bps,
            "gbit_per_s": bps * 8.0 / 1e9,
            "rounds_per_s": if span_s > 0.0 { a.iters as f64 / span_s } else { 0.0 },
        },
        "per_sender": per_sender,
        "spread": {
            "p50_us_min": lo,
            "p50_us_max": hi,
            "p50_max_over_min": if lo > 0.0 { hi / lo } else { 0.0 },
        },
        "wall_s": elapsed.as_secs_f64(),
    }))
}
