//! Real multi-process deployments on loopback: expert workers started as
//! `tandem serve --role expert` processes, attention replicas as
//! `tandem generate --role attention` processes. Greedy tokens must equal the in-process
//! engine's for every fixture family; a killed worker turns into an error (not a hang) and a
//! restarted one serves again; `tandem status` reports both states. TLS: a worker with its
//! certificate in the deployment's `[security]` table, replicas and status with the CA.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Free loopback ports (bound then released: a tiny race, fine on a test machine).
fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Kills its processes when dropped, so that a failing test leaves nothing behind.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_deployment(dir: &Path, n_a: u32, n_e: u32, m: u32) -> PathBuf {
    let ports = free_ports((n_a + n_e) as usize);
    let att: Vec<String> = ports[..n_a as usize]
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let exp: Vec<String> = ports[n_a as usize..]
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let text = format!(
        "attention_replicas = {n_a}\nexpert_workers = {n_e}\nmicro_batches = {m}\n\
         kv_block_size = 4\nnum_kv_blocks = 512\n\n[addresses]\nattention = [{}]\nexpert = [{}]\n",
        att.join(", "),
        exp.join(", ")
    );
    let path = dir.join("deployment.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn expert(model: &Path, dep: &Path, rank: u32) -> Child {
    Command::new(BIN)
        .args(["serve", "--deployment"])
        .arg(dep)
        .args(["--role", "expert", "--rank", &rank.to_string(), "--model"])
        .arg(model)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn generate_cmd(model: &Path, prompts: &[String], max_tokens: usize) -> Command {
    let mut c = Command::new(BIN);
    c.arg("generate").arg("--model").arg(model);
    for p in prompts {
        c.args(["--prompt-ids", p]);
    }
    c.args([
        "--max-tokens",
        &max_tokens.to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

fn token_ids(out: &Output) -> Vec<Vec<u64>> {
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect()
        })
        .collect()
}

fn prompts(vocab_hint: u32, n: usize, seed: u32) -> Vec<String> {
    (0..n as u32)
        .map(|i| {
            (0..3 + 2 * i)
                .map(|j| ((seed + i * 37 + j * 11 + 1) % vocab_hint).to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

fn multi_process_equals_in_process(family: &str) {
    let model = fixture(family);
    let tmp = tempdir(family);
    let dep = write_deployment(&tmp, 2, 2, 2);
    let _experts = Procs((0..2).map(|r| expert(&model, &dep, r)).collect());
    let ps = prompts(90, 6, 0);
    let n = 8;
    // Reference: the whole deployment in one process.
    let reference = token_ids(
        &generate_cmd(&model, &ps, n)
            .args(["--attention-replicas", "1", "--expert-workers", "0"])
            .output()
            .unwrap(),
    );
    // Two attention replica processes at once, each with half the prompts.
    let halves = [ps[..3].to_vec(), ps[3..].to_vec()];
    let children: Vec<Child> = (0..2)
        .map(|r| {
            generate_cmd(&model, &halves[r], n)
                .arg("--deployment")
                .arg(&dep)
                .args(["--role", "attention", "--rank", &r.to_string()])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut got = Vec::new();
    for c in children {
        got.extend(token_ids(&wait_bounded(c, Duration::from_secs(120))));
    }
    assert_eq!(got, reference, "{family}: multi-process vs in-process");
}

/// Waits for a child with a deadline (kills it and fails past it).
fn wait_bounded(mut c: Child, limit: Duration) -> Output {
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = c.try_wait() {
            return c.wait_with_output().unwrap();
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            panic!("a process hung for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-mp-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn multi_process_mixtral() {
    multi_process_equals_in_process("mixtral");
}
#[test]
fn multi_process_qwen2_moe() {
    multi_process_equals_in_process("qwen2_moe");
}
#[test]
fn multi_process_qwen3_moe() {
    multi_process_equals_in_process("qwen3_moe");
}
#[test]
fn multi_process_olmoe() {
    multi_process_equals_in_process("olmoe");
}
#[test]
fn multi_process_deepseek_v3() {
    multi_process_equals_in_process("deepseek_v3");
}
#[test]
fn multi_process_glm4_moe() {
    multi_process_equals_in_process("glm4_moe");
}
#[test]
fn multi_process_dbrx() {
    multi_process_equals_in_process("dbrx");
}
#[test]
fn multi_process_gpt_oss_mxfp4() {
    multi_process_equals_in_process("gpt_oss_mxfp4");
}

fn status_ok(dep: &Path) -> (bool, serde_json::Value) {
    let out = Command::new(BIN)
        .arg("status")
        .arg(dep)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.success(), v)
}

#[test]
fn a_killed_worker_fails_requests_and_a_restarted_one_rejoins() {
    let model = fixture("mixtral");
    let tmp = tempdir("kill");
    // One replica process, so that `status` has no HTTP server to ask: expert workers only.
    let dep = write_deployment(&tmp, 1, 2, 2);
    let text = std::fs::read_to_string(&dep).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("attention = ") {
                "attention = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&dep, text).unwrap();
    let mut procs = Procs((0..2).map(|r| expert(&model, &dep, r)).collect());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_ok(&dep).0 {
        assert!(Instant::now() < deadline, "workers never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, v) = status_ok(&dep);
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["expert_workers"].as_array().unwrap().len(), 2, "{v}");
    // A long generation, then worker 1 dies under it.
    let long = generate_cmd(&model, &prompts(90, 2, 5), 900)
        .arg("--deployment")
        .arg(&dep)
        .args([
            "--role",
            "attention",
            "--rank",
            "0",
            "--peer-timeout-s",
            "20",
            // Every dispatch lent where the kernel lets the worker read this process (not
            // under Yama ptrace_scope >= 1): the kill then lands on loans as well as copies.
            "--m2n-lend-min",
            "1",
        ])
        .spawn()
        .unwrap();
    // Kill worker 1 as soon as the replica is connected to it: the generation (500 tokens)
    // is then in flight or about to start; either way it must end with an error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = status_ok(&dep);
        if v["expert_workers"][1]["replicas_connected"].as_u64() == Some(1) {
            // Processes of one host: the link took the shared-memory rings, so the kill below
            // is seen through the socket kept for liveness, not through a broken data stream.
            assert_eq!(
                v["expert_workers"][1]["report"]["transports"][0], "shm",
                "{v}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never connected: {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    procs.0[1].kill().unwrap();
    let _ = procs.0[1].wait();
    let t = Instant::now();
    let out = wait_bounded(long, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the generation cannot succeed");
    assert!(err.contains("expert worker 1"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let (ok, v) = status_ok(&dep);
    assert!(!ok, "status must report the dead worker: {v}");
    assert_eq!(v["expert_workers"][1]["up"], false, "{v}");
    // Restart worker 1 alone: the deployment serves again.
    procs.0[1] = expert(&model, &dep, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_ok(&dep).0 {
        assert!(Instant::now() < deadline, "worker 1 never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = prompts(90, 2, 9);
    let reference = token_ids(
        &generate_cmd(&model, &ps, 6)
            .args(["--attention-replicas", "1", "--expert-workers", "0"])
            .output()
            .unwrap(),
    );
    let got = token_ids(&wait_bounded(
        generate_cmd(&model, &ps, 6)
            .arg("--deployment")
            .arg(&dep)
            .args(["--role", "attention", "--rank", "0"])
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    ));
    assert_eq!(got, reference);
}

/// Issue #17 with real processes: the worker takes its secret from the deployment's
/// `[security]` table (a path relative to the file), `tandem status` and replicas prove it;
/// `TANDEM_CLUSTER_SECRET` and `--cluster-secret-file` take precedence over the file, so a
/// wrong one there is refused even though the file's is right; the right one is served.
#[test]
fn a_cluster_secret_keeps_other_peers_out() {
    let model = fixture("mixtral");
    let tmp = tempdir("secret");
    let dep = write_deployment(&tmp, 1, 1, 2);
    let text = std::fs::read_to_string(&dep).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("attention = ") {
                "attention = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        &dep,
        format!("{text}\n[security]\ncluster_secret_file = \"cluster.secret\"\n"),
    )
    .unwrap();
    std::fs::write(
        tmp.join("cluster.secret"),
        "the-right-secret-0123456789abcdef\n",
    )
    .unwrap();
    let wrong = tmp.join("wrong.secret");
    std::fs::write(&wrong, "a-wrong-secret-0123456789abcdef\n").unwrap();
    let _procs = Procs(vec![expert(&model, &dep, 0)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_ok(&dep).0 {
        assert!(Instant::now() < deadline, "the worker never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The environment beats the file: a wrong secret there is refused.
    let out = Command::new(BIN)
        .arg("status")
        .arg(&dep)
        .env("RUST_LOG", "warn")
        .env("TANDEM_CLUSTER_SECRET", "not-the-secret-0123456789abcdef")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = v["expert_workers"][0]["error"].as_str().unwrap_or_default();
    assert!(e.contains("authentication failed"), "{v}");
    // So does the flag, for a replica: it never gets in, and says why.
    let ps = prompts(90, 2, 3);
    let out = wait_bounded(
        generate_cmd(&model, &ps, 4)
            .arg("--deployment")
            .arg(&dep)
            .args([
                "--role",
                "attention",
                "--rank",
                "0",
                "--peer-timeout-s",
                "3",
            ])
            .arg("--cluster-secret-file")
            .arg(&wrong)
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "a replica with the wrong secret was served"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    // An unreadable secret file stops a process at start-up, naming the file.
    let out = generate_cmd(&model, &ps, 4)
        .arg("--deployment")
        .arg(&dep)
        .args(["--role", "attention", "--rank", "0"])
        .arg("--cluster-secret-file")
        .arg(tmp.join("missing.secret"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.secret"), "{err}");
    // The right secret (from the deployment file): served, tokens as in-process.
    let reference = token_ids(
        &generate_cmd(&model, &ps, 4)
            .args(["--attention-replicas", "1", "--expert-workers", "0"])
            .output()
            .unwrap(),
    );
    let got = token_ids(&wait_bounded(
        generate_cmd(&model, &ps, 4)
            .arg("--deployment")
            .arg(&dep)
            .args(["--role", "attention", "--rank", "0"])
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    ));
    assert_eq!(got, reference);
}

/// A CA and a certificate for 127.0.0.1 signed by it, written to `dir` as `ca.pem`,
/// `worker.pem` and `worker.key`.
fn write_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("worker.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("worker.key"), key.serialize_pem()).unwrap();
}

/// TLS with real processes: the worker takes its certificate from `[security]` (paths
/// relative to the deployment file, no CA there, so no client certificates); `tandem status`
/// needs the CA (`TANDEM_TLS_CA`): without it, it stops before connecting and says so (the
/// file's certificate and key are there, a CA bundle is not); a replica with `--tls-ca` gets
/// the in-process tokens; a missing CA file stops a replica at start-up, naming the file.
#[test]
fn tls_between_processes() {
    let model = fixture("mixtral");
    let tmp = tempdir("tls");
    write_pki(&tmp);
    let dep = write_deployment(&tmp, 1, 1, 2);
    let text = std::fs::read_to_string(&dep).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("attention = ") {
                "attention = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        &dep,
        format!("{text}\n[security]\ntls_cert = \"worker.pem\"\ntls_key = \"worker.key\"\n"),
    )
    .unwrap();
    let _procs = Procs(vec![expert(&model, &dep, 0)]);
    let status = |ca: Option<&Path>| {
        let mut c = Command::new(BIN);
        c.arg("status").arg(&dep).env("RUST_LOG", "warn");
        if let Some(ca) = ca {
            c.env("TANDEM_TLS_CA", ca);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ca = tmp.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(Some(&ca)).0 {
        assert!(Instant::now() < deadline, "the worker never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, err) = status(None);
    assert!(!ok);
    assert!(err.contains("no CA bundle"), "{err}");
    let ps = prompts(90, 2, 5);
    let out = generate_cmd(&model, &ps, 4)
        .arg("--deployment")
        .arg(&dep)
        .args(["--role", "attention", "--rank", "0", "--tls-ca"])
        .arg(tmp.join("missing-ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing-ca.pem"), "{err}");
    let reference = token_ids(
        &generate_cmd(&model, &ps, 4)
            .args(["--attention-replicas", "1", "--expert-workers", "0"])
            .output()
            .unwrap(),
    );
    let got = token_ids(&wait_bounded(
        generate_cmd(&model, &ps, 4)
            .arg("--deployment")
            .arg(&dep)
            .args(["--role", "attention", "--rank", "0", "--tls-ca"])
            .arg(&ca)
            .spawn()
            .unwrap(),
        Duration::from_secs(60),
    ));
    assert_eq!(got, reference);
}

/// `tandem generate` gives transformers' greedy tokens (fixtures/*/expected.json) for the
/// newer families, colocated and disaggregated in one process (1 replica x 2 expert workers,
/// 2 micro-batches).
fn generate_equals_transformers(family: &str) {
    let model = fixture(family);
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("expected.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = exp["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let want: Vec<Vec<u64>> = serde_json::from_value(exp["greedy"].clone()).unwrap();
    let n = want[0].len();
    for shape in [
        &["--expert-workers", "0"][..],
        &["--expert-workers", "2", "--micro-batches", "2"][..],
    ] {
        let got = token_ids(
            &generate_cmd(&model, &prompts, n)
                .args(shape)
                .output()
                .unwrap(),
        );
        assert_eq!(
            got, want,
            "{family} {shape:?}: tandem generate vs transformers"
        );
    }
}

#[test]
fn generate_glm4_moe_equals_transformers() {
    generate_equals_transformers("glm4_moe");
}
#[test]
fn generate_deepseek_v2_equals_transformers() {
    generate_equals_transformers("deepseek_v2");
}
#[test]
fn generate_deepseek_v3_equals_transformers() {
    generate_equals_transformers("deepseek_v3");
}
#[test]
fn generate_gpt_oss_equals_transformers() {
    generate_equals_transformers("gpt_oss");
}
#[test]
fn generate_gpt_oss_mxfp4_equals_transformers() {
    generate_equals_transformers("gpt_oss_mxfp4");
}

/// The worker's own report of what crossed a real connection between two processes: with
/// `--m2n-lend-min 1` on both ends every matrix is lent over shared memory (the worker reads
/// the replica's dispatches as loans and lends its combines); with `--wire-dtype bf16` the
/// dispatches arrive in bf16. Tokens alone could not tell either apart from the plain path.
#[test]
fn loans_and_bf16_frames_are_observed_between_processes() {
    let model = fixture("mixtral");
    let tmp = tempdir("observe");
    let dep = write_deployment(&tmp, 1, 1, 2);
    let text = std::fs::read_to_string(&dep).unwrap();
    let text: Vec<&str> = text
        .lines()
        .map(|l| {
            if l.starts_with("attention = ") {
                "attention = []" // status asks the workers only
            } else {
                l
            }
        })
        .collect();
    std::fs::write(&dep, text.join("\n")).unwrap();
    let worker = Command::new(BIN)
        .args(["serve", "--deployment"])
        .arg(&dep)
        .args(["--role", "expert", "--rank", "0", "--m2n-lend-min", "1"])
        .arg("--model")
        .arg(&model)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _procs = Procs(vec![worker]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status_ok(&dep).0 {
        assert!(Instant::now() < deadline, "the worker never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = || status_ok(&dep).1["expert_workers"][0]["report"].clone();
    let ps = prompts(90, 2, 3);
    // `exact`: the tokens must be the colocated f32 reference's (bf16 on the wire rounds the
    // hidden states, which may change a greedy choice of these random weights).
    let run = |extra: &[&str], exact: bool| {
        let reference = token_ids(
            &generate_cmd(&model, &ps, 5)
                .args(["--attention-replicas", "1", "--expert-workers", "0"])
                .output()
                .unwrap(),
        );
        let got = token_ids(&wait_bounded(
            generate_cmd(&model, &ps, 5)
                .arg("--deployment")
                .arg(&dep)
                .args(["--role", "attention", "--rank", "0"])
                .args(extra)
                .spawn()
                .unwrap(),
            Duration::from_secs(60),
        ));
        assert_eq!(got.len(), reference.len(), "{extra:?}");
        if exact {
            assert_eq!(got, reference, "{extra:?}");
        }
    };

    // f32, every matrix lent.
    run(&["--m2n-lend-min", "1"], true);
    let r = report();
    let t = &r["traffic"][0];
    println!(
        "after the f32 run: traffic {t}, loans made {}, read {}",
        r["loans_made"], r["loans_read"]
    );
    assert!(t["f32_dispatches"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(t["bf16_dispatches"], 0, "{r}");
    assert_eq!(
        r["transports"][0],
        serde_json::Value::Null,
        "the replica left: {r}"
    );
    let (made, read) = (
        r["loans_made"].as_u64().unwrap(),
        r["loans_read"].as_u64().unwrap(),
    );
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if scope >= 1 {
        // process_vm_readv on a non-child needs ptrace rights: matrices went through the ring.
        println!(
            "loans NOT asserted: Yama ptrace_scope = {scope} forbids reading another process \
             (loans made {made}, read {read})"
        );
    } else {
        assert!(read > 0, "the worker read no loan from the replica: {r}");
        assert!(made > 0, "the worker lent no combine: {r}");
    }

    // bf16 on the wire: the new dispatches arrive in bf16, 2 bytes a value (bf16 matrices are
    // copied through the ring, never lent).
    let f32_before = t["f32_dispatches"].as_u64().unwrap();
    run(&["--wire-dtype", "bf16"], false);
    let r = report();
    let t = &r["traffic"][0];
    println!("after the bf16 run: traffic {t}");
    assert!(t["bf16_dispatches"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(t["f32_dispatches"].as_u64().unwrap(), f32_before, "{r}");
}
