//! Chaos under load: 32 streaming clients against a real 2-replica, 2-worker multi-process
//! deployment (`tandem serve --role expert|attention`) while a seeded driver, at random
//! moments, kill -9s and restarts expert workers, SIGSTOPs one for longer than the peer
//! timeout then SIGCONTs it, restarts an attention replica, and resets every connection of a
//! TCP proxy between the replicas and expert worker 1.
//!
//! Every request must end (completed, or an error) within the peer timeout + 5 s of its last
//! byte; a completed one must carry the greedy text of a colocated reference; afterwards both
//! replicas are healthy, a final wave completes with the right text, and `/metrics` shows no
//! KV block used and an empty queue.
//!
//! `chaos_each_fault_once` (in the default run, so in CI) injects each of the four fault kinds
//! once, in a seeded order; `chaos_under_load` (opt-in, `--ignored`) draws faults for
//! `TANDEM_CHAOS_SECS` (default 30) and can add a soak: `TANDEM_CHAOS_SOAK_SECS` seconds of
//! steady load after the faults, with the resident memory (VmRSS) of every process before and
//! after. `TANDEM_CHAOS_SEED` replays either run (the seed is printed).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tandem");
const PEER_TIMEOUT_S: u64 = 3;
/// A request that receives nothing for this long after its last byte hangs.
const HANG: Duration = Duration::from_secs(PEER_TIMEOUT_S + 5);
const CLIENTS: usize = 32;
const MAX_TOKENS: usize = 24;
const N_PROMPTS: usize = 8;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral")
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// xorshift64*: a reproducible run from its printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The processes of the deployment, by slot (experts 0..2, then replicas 0..2); killed (and
/// continued, if stopped) when dropped so that a failing test leaves nothing behind.
struct Cluster {
    model: PathBuf,
    dep: PathBuf,
    /// `--address-map` for the replicas: expert worker 1's address to the proxy.
    map: String,
    http: Vec<u16>,
    procs: Mutex<Vec<Child>>,
}

impl Cluster {
    fn spawn(&self, slot: usize) -> Child {
        let mut c = Command::new(BIN);
        c.args(["serve", "--deployment"]).arg(&self.dep);
        if slot < 2 {
            c.args(["--role", "expert", "--rank", &slot.to_string()]);
        } else {
            c.args(["--role", "attention", "--rank", &(slot - 2).to_string()])
                .args(["--address-map", &self.map])
                .args(["--peer-timeout-s", &PEER_TIMEOUT_S.to_string()]);
        }
        // Expert 0 and replica 0 lend every matrix over shared memory (where the kernel lets
        // the peer read them), the others only the large ones (none, at this model's size):
        // faults hit loans and ring copies alike.
        if slot.is_multiple_of(2) {
            c.args(["--m2n-lend-min", "1"]);
        }
        c.arg("--model")
            .arg(&self.model)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(slot))
            .spawn()
            .unwrap()
    }

    /// Each process's stderr (warnings and errors), appended across restarts, in the
    /// deployment's directory: printed with the test's path when it fails.
    fn log(&self, slot: usize) -> std::fs::File {
        let name = ["expert0", "expert1", "replica0", "replica1"][slot];
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dep.with_file_name(format!("{name}.log")))
            .unwrap()
    }

    fn restart(&self, slot: usize) {
        let mut p = self.procs.lock().unwrap();
        let _ = p[slot].kill(); // SIGKILL
        let _ = p[slot].wait();
        p[slot] = self.spawn(slot);
    }

    fn pid(&self, slot: usize) -> u32 {
        self.procs.lock().unwrap()[slot].id()
    }

    fn signal(&self, slot: usize, sig: &str) {
        let pid = self.pid(slot);
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    fn rss_kib(&self) -> Vec<u64> {
        (0..4)
            .map(|s| {
                let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid(s)))
                    .unwrap_or_default();
                st.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.procs.get_mut().unwrap().iter_mut() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy between the replicas and expert worker 1

struct Proxy {
    conns: Arc<Mutex<Vec<TcpStream>>>,
    resets: AtomicU64,
}

impl Proxy {
    fn start(listener: TcpListener, target: String) -> Arc<Self> {
        let p = Arc::new(Proxy {
            conns: Arc::new(Mutex::new(Vec::new())),
            resets: AtomicU64::new(0),
        });
        let conns = p.conns.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue; // the worker is down: the replica sees a closed connection
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                {
                    let mut c = conns.lock().unwrap();
                    c.push(inbound.try_clone().unwrap());
                    c.push(outbound.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        p
    }

    /// Drops every connection, both directions at once (`set_linger(Some(0))` for a real RST
    /// is unstable in std; the replica sees its connection end mid-stream either way).
    fn reset_all(&self) {
        let mut c = self.conns.lock().unwrap();
        for s in c.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.resets.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The whole text (the concatenated `text` of the chunks) and `[DONE]`.
    Completed(String),
    Error(String),
    Hang(String),
}

/// One request: the raw response, or how it ended. A read blocking for [`HANG`] after the last
/// byte is a hang.
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, Vec<u8>), Outcome> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| Outcome::Error(format!("connect: {e}")))?;
    s.set_read_timeout(Some(HANG)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| Outcome::Error(format!("send: {e}")))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Outcome::Hang(format!(
                    "nothing for {HANG:?} after {} bytes: {}",
                    raw.len(),
                    String::from_utf8_lossy(&raw)
                )));
            }
            Err(e) => return Err(Outcome::Error(format!("read: {e}"))),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let Some(end) = text.find("\r\n\r\n") else {
        return Err(Outcome::Error(format!("no response head: {text}")));
    };
    let head = &text[..end];
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| Outcome::Error("truncated chunked body".into()))?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&b[..nl]).ok()?;
        let n = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        b = &b[nl + 2..];
        if n == 0 {
            return Some(out);
        }
        if b.len() < n + 2 {
            return None;
        }
        out.extend_from_slice(&b[..n]);
        b = &b[n + 2..];
    }
}

fn stream_request(prompt: &[u32]) -> String {
    serde_json::json!({
        "model": "mixtral", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": true, "stream": true,
    })
    .to_string()
}

/// A streaming greedy completion of `prompt` on the replica at `port`.
fn complete(port: u16, prompt: &[u32]) -> Outcome {
    let (status, body) = match http(port, "POST", "/v1/completions", &stream_request(prompt)) {
        Ok(r) => r,
        Err(o) => return o,
    };
    let body = String::from_utf8_lossy(&body);
    if status != 200 {
        return Outcome::Error(format!("HTTP {status}: {body}"));
    }
    let mut text = String::new();
    let mut done = false;
    let mut finished = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return Outcome::Error(format!("bad chunk {data}: {e}")),
        };
        if v.get("error").is_some() {
            return Outcome::Error(format!("in stream: {data}"));
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            text.push_str(c["text"].as_str().unwrap_or_default());
            finished |= c["finish_reason"].is_string();
        }
    }
    if done && finished {
        Outcome::Completed(text)
    } else {
        Outcome::Error(format!("stream ended early: {body}"))
    }
}

fn health(port: u16) -> bool {
    matches!(http(port, "GET", "/health", ""), Ok((200, _)))
}

fn wait_healthy(ports: &[u16], limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ports.iter().all(|&p| health(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Sum over the series of `name` in a replica's `/metrics`.
fn metric(port: u16, name: &str) -> f64 {
    let (status, body) = http(port, "GET", "/metrics", "").expect("metrics");
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    let mut found = false;
    let mut sum = 0.0;
    for l in body.lines() {
        let series = l.split([' ', '{']).next().unwrap_or_default();
        if series == name {
            found = true;
            sum += l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        }
    }
    assert!(found, "{name} not in /metrics:\n{body}");
    sum
}

fn prompts() -> Vec<Vec<u32>> {
    (0..N_PROMPTS as u32)
        .map(|i| (0..3 + 2 * i).map(|j| (i * 37 + j * 11 + 1) % 90).collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    errored: AtomicU64,
    hangs: Mutex<Vec<String>>,
    wrong: Mutex<Vec<String>>,
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn record(&self, o: Outcome, want: &str, what: String) {
        match o {
            Outcome::Completed(t) if t == want => {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Completed(t) => self
                .wrong
                .lock()
                .unwrap()
                .push(format!("{what}: {t:?}, want {want:?}")),
            Outcome::Error(e) => {
                self.errored.fetch_add(1, Ordering::Relaxed);
                // Group by the start of the message (without numbers) for the report.
                let key: String = e
                    .chars()
                    .take(200)
                    .filter(|c| !c.is_ascii_digit())
                    .collect();
                *self.errors.lock().unwrap().entry(key).or_default() += 1;
            }
            Outcome::Hang(h) => self.hangs.lock().unwrap().push(format!("{what}: {h}")),
        }
    }
}

/// `CLIENTS` threads sending requests round-robin over the replicas until `stop`.
fn load(
    ports: Vec<u16>,
    ps: Arc<Vec<Vec<u32>>>,
    want: Arc<Vec<String>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|c| {
            let (ports, ps, want, tally, stop) = (
                ports.clone(),
                ps.clone(),
                want.clone(),
                tally.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let port = ports[i % ports.len()];
                    let k = i % ps.len();
                    let o = complete(port, &ps[k]);
                    let failed = !matches!(o, Outcome::Completed(_));
                    tally.record(
                        o,
                        &want[k],
                        format!("client {c} replica :{port} prompt {k}"),
                    );
                    if failed {
                        // A down replica answers at once: do not spin.
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    i += 1;
                }
            })
        })
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Which faults a run injects, and when.
#[derive(Clone, Copy, Debug)]
enum Schedule {
    /// Each of the four kinds exactly once, in an order drawn from the seed: every kind is
    /// exercised in a run short enough for CI.
    EachKindOnce,
    /// Kinds drawn from the seed until the fault phase's time is up.
    Random { fault_secs: u64 },
}

fn seed_from_env_or_clock() -> u64 {
    env_u64("TANDEM_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    })
}

/// The short run CI makes on every submission: each fault kind once (kill -9 and restart of
/// an expert worker, SIGSTOP past the peer timeout, restart of an attention replica, a reset
/// of every proxied connection), under the 32 streaming clients, then the final wave and the
/// leak checks. About a minute on 2 cores.
#[test]
fn chaos_each_fault_once() {
    run(Schedule::EachKindOnce, None, seed_from_env_or_clock());
}

/// The long run and the soak, opt-in:
/// `TANDEM_CHAOS_SECS=120 cargo test -p tandem-cli --test chaos -- --ignored --nocapture`;
/// add `TANDEM_CHAOS_SOAK_SECS=600` for a 10-minute soak with resident memory checked.
#[test]
#[ignore = "minutes long; CI runs chaos_each_fault_once (run with --ignored, see the doc)"]
fn chaos_under_load() {
    let fault_secs = env_u64("TANDEM_CHAOS_SECS").unwrap_or(30);
    run(
        Schedule::Random { fault_secs },
        env_u64("TANDEM_CHAOS_SOAK_SECS"),
        seed_from_env_or_clock(),
    );
}

fn run(schedule: Schedule, soak_secs: Option<u64>, seed: u64) {
    println!("chaos: seed {seed} (TANDEM_CHAOS_SEED={seed} replays the fault schedule), {schedule:?}, soak {soak_secs:?} s");
    let mut rng = Rng(seed);
    let model = fixture();
    let tmp = std::env::temp_dir().join(format!("tandem-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let ps = Arc::new(prompts());
    let want = Arc::new(colocated_reference(&model, &ps));
    let (cluster, proxy) = start_deployment(model, &tmp);
    let http_ports = cluster.http.clone();

    // Load and faults.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(
        http_ports.clone(),
        ps.clone(),
        want.clone(),
        tally.clone(),
        stop.clone(),
    );
    let t0 = Instant::now();
    let faults = inject_faults(schedule, &mut rng, &cluster, &proxy, t0);
    let fault_phase = t0.elapsed();
    println!("chaos: faults over after {:.1}s", fault_phase.as_secs_f64());
    assert!(
        wait_healthy(&http_ports, Duration::from_secs(60)),
        "a replica did not come back healthy"
    );

    // Optional soak: steady load, resident memory before and after.
    let mut rss = None;
    if let Some(secs) = soak_secs {
        std::thread::sleep(Duration::from_secs(5));
        let before = cluster.rss_kib();
        std::thread::sleep(Duration::from_secs(secs));
        rss = Some((before, cluster.rss_kib()));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    // The final wave: every request completes with the reference text.
    assert!(wait_healthy(&http_ports, Duration::from_secs(30)));
    let final_tally = final_wave(&http_ports, &ps, &want);

    // Nothing left behind once the streams are over.
    std::thread::sleep(Duration::from_millis(500));
    let blocks: f64 = http_ports
        .iter()
        .map(|&p| metric(p, "tandem_kv_blocks_used"))
        .sum();
    let queue: f64 = http_ports
        .iter()
        .map(|&p| metric(p, "tandem_queue_running") + metric(p, "tandem_queue_waiting"))
        .sum();

    println!(
        "\nchaos under load: seed {seed}, {schedule:?}, {} faults in {:.1} s \
         ({} proxy resets), {CLIENTS} streaming clients, {MAX_TOKENS} tokens each, \
         peer timeout {PEER_TIMEOUT_S} s",
        faults.len(),
        fault_phase.as_secs_f64(),
        proxy.resets.load(Ordering::Relaxed)
    );
    print_tallies(&tally, &final_tally, soak_secs.is_some());
    println!("process logs: {}", tmp.display());
    println!("afterwards: tandem_kv_blocks_used {blocks}, tandem_queue_running+waiting {queue}");
    print_errors(&tally, &final_tally);
    if let Some((before, after)) = &rss {
        println!("VmRSS kB (expert 0, expert 1, replica 0, replica 1): before soak {before:?}, after {after:?}");
    }
    check_afterwards(&tally, &final_tally, blocks, queue, rss);
}

/// The same streaming requests against a colocated `tandem serve`: the text every
/// completed request of the deployment must carry.
fn colocated_reference(model: &Path, ps: &[Vec<u32>]) -> Vec<String> {
    let ref_port = free_ports(1)[0];
    let mut colocated = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(model)
        .args(["--attention-replicas", "1", "--expert-workers", "0"])
        .args(["--port", &ref_port.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ok = wait_healthy(&[ref_port], Duration::from_secs(60));
    let want: Vec<String> = ps
        .iter()
        .map(|p| match complete(ref_port, p) {
            Outcome::Completed(t) => t,
            o => panic!("colocated reference: {o:?}"),
        })
        .collect();
    let _ = colocated.kill();
    let _ = colocated.wait();
    assert!(ok, "the colocated server never came up");
    assert!(want.iter().all(|t| !t.is_empty()), "{want:?}");
    want
}

/// The 2-replica, 2-worker deployment, written to `tmp/deployment.toml`, with expert worker
/// 1 reached through the proxy; returns once both replicas are healthy.
fn start_deployment(model: PathBuf, tmp: &Path) -> (Arc<Cluster>, Arc<Proxy>) {
    let ports = free_ports(4);
    let (http_ports, exp_ports) = (ports[..2].to_vec(), ports[2..].to_vec());
    let text = format!(
        "attention_replicas = 2\nexpert_workers = 2\nmicro_batches = 2\n\
         kv_block_size = 4\nnum_kv_blocks = 512\n\n[addresses]\n\
         attention = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
         expert = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        http_ports[0], http_ports[1], exp_ports[0], exp_ports[1]
    );
    let dep = tmp.join("deployment.toml");
    std::fs::write(&dep, text).unwrap();
    let proxy_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap().to_string();
    let proxy = Proxy::start(proxy_listener, format!("127.0.0.1:{}", exp_ports[1]));
    let cluster = Arc::new(Cluster {
        model,
        dep,
        map: format!("127.0.0.1:{}={proxy_addr}", exp_ports[1]),
        http: http_ports.clone(),
        procs: Mutex::new(vec![]),
    });
    {
        let procs: Vec<Child> = (0..4).map(|s| cluster.spawn(s)).collect();
        *cluster.procs.lock().unwrap() = procs;
    }
    assert!(
        wait_healthy(&http_ports, Duration::from_secs(60)),
        "the deployment never came up"
    );
    (cluster, proxy)
}

/// The faults of `schedule`, each printed and listed with the moment (since `t0`) it began;
/// between two, the deployment may come back (bounded) and a random moment passes.
fn inject_faults(
    schedule: Schedule,
    rng: &mut Rng,
    cluster: &Cluster,
    proxy: &Proxy,
    t0: Instant,
) -> Vec<String> {
    let mut faults: Vec<String> = Vec::new();
    // EachKindOnce: the four kinds in a seeded order (Fisher-Yates).
    let mut order = [0u64, 1, 2, 3];
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next_once = order.iter();
    std::thread::sleep(rng.millis(500, 2000));
    loop {
        let kind = match schedule {
            Schedule::EachKindOnce => match next_once.next() {
                Some(&k) => k,
                None => break,
            },
            Schedule::Random { fault_secs } => {
                if t0.elapsed() >= Duration::from_secs(fault_secs) {
                    break;
                }
                rng.below(4)
            }
        };
        let at = t0.elapsed().as_secs_f64();
        let f = match kind {
            0 => {
                let r = rng.below(2) as usize;
                cluster.restart(r);
                format!("{at:.1}s kill -9 + restart expert {r}")
            }
            1 => {
                let r = rng.below(2) as usize;
                let d = Duration::from_secs(PEER_TIMEOUT_S) + rng.millis(500, 2500);
                cluster.signal(r, "-STOP");
                std::thread::sleep(d);
                cluster.signal(r, "-CONT");
                format!("{at:.1}s SIGSTOP expert {r} for {:.1}s", d.as_secs_f64())
            }
            2 => {
                let r = rng.below(2) as usize;
                cluster.restart(2 + r);
                format!("{at:.1}s kill -9 + restart attention replica {r}")
            }
            _ => {
                proxy.reset_all();
                format!("{at:.1}s proxy resets every connection to expert 1")
            }
        };
        println!("chaos: {f}");
        faults.push(f);
        // Let the deployment come back (bounded) so that requests also complete between
        // faults, then wait a random moment.
        wait_healthy(&cluster.http, Duration::from_secs(30));
        std::thread::sleep(rng.millis(300, 3000));
    }
    faults
}

/// One request per client after the faults, half to each replica, each tallied against the
/// reference text.
fn final_wave(http_ports: &[u16], ps: &Arc<Vec<Vec<u32>>>, want: &Arc<Vec<String>>) -> Arc<Tally> {
    let final_tally = Arc::new(Tally::default());
    let wave: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (ports, ps, want, t) = (
                http_ports.to_vec(),
                ps.clone(),
                want.clone(),
                final_tally.clone(),
            );
            std::thread::spawn(move || {
                let k = c % ps.len();
                let o = complete(ports[c % 2], &ps[k]);
                t.record(o, &want[k], format!("final wave client {c}"));
            })
        })
        .collect();
    for w in wave {
        w.join().unwrap();
    }

    final_tally
}

/// The table of outcomes under faults (and soak) and in the final wave.
fn print_tallies(tally: &Tally, final_tally: &Tally, soaked: bool) {
    println!("| phase | completed | errored | hangs | wrong tokens |");
    println!("|---|---|---|---|---|");
    println!(
        "| under faults{} | {} | {} | {} | {} |",
        if soaked { " + soak" } else { "" },
        tally.completed.load(Ordering::Relaxed),
        tally.errored.load(Ordering::Relaxed),
        tally.hangs.lock().unwrap().len(),
        tally.wrong.lock().unwrap().len()
    );
    println!(
        "| final wave | {} | {} | {} | {} |",
        final_tally.completed.load(Ordering::Relaxed),
        final_tally.errored.load(Ordering::Relaxed),
        final_tally.hangs.lock().unwrap().len(),
        final_tally.wrong.lock().unwrap().len()
    );
}

fn print_errors(tally: &Tally, final_tally: &Tally) {
    println!("errors by kind:");
    for (k, n) in tally.errors.lock().unwrap().iter() {
        println!("  {n:6} {k}");
    }
    for (k, n) in final_tally.errors.lock().unwrap().iter() {
        println!("  final wave {n:6} {k}");
    }
}

/// No hang and no wrong token in either phase, the whole final wave completed, something
/// completed under faults, no KV block or queued request left, and (after a soak) resident
/// memory within bounds.
fn check_afterwards(
    tally: &Tally,
    final_tally: &Tally,
    blocks: f64,
    queue: f64,
    rss: Option<(Vec<u64>, Vec<u64>)>,
) {
    let hangs = tally.hangs.lock().unwrap().clone();
    let wrong = tally.wrong.lock().unwrap().clone();
    let f_hangs = final_tally.hangs.lock().unwrap().clone();
    let f_wrong = final_tally.wrong.lock().unwrap().clone();
    let f_done = final_tally.completed.load(Ordering::Relaxed);
    assert!(hangs.is_empty(), "hangs: {hangs:#?}");
    assert!(wrong.is_empty(), "wrong tokens: {wrong:#?}");
    assert!(f_hangs.is_empty(), "final wave hangs: {f_hangs:#?}");
    assert!(f_wrong.is_empty(), "final wave wrong tokens: {f_wrong:#?}");
    assert_eq!(
        f_done,
        CLIENTS as u64,
        "the final wave must complete: {:?}",
        final_tally.errors.lock().unwrap()
    );
    assert!(
        tally.completed.load(Ordering::Relaxed) > 0,
        "nothing completed"
    );
    assert_eq!(blocks, 0.0, "KV blocks leaked");
    assert_eq!(queue, 0.0, "requests left in the queue");
    if let Some((before, after)) = rss {
        for (b, a) in before.iter().zip(&after) {
            // Generous: allocator noise and caches, not a leak per request.
            assert!(
                *a <= b + b / 4 + 32 * 1024,
                "resident memory grew: {before:?} -> {after:?}"
            );
        }
    }
}
