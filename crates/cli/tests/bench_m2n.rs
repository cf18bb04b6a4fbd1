//! `tandem bench m2n` end to end: a tiny exchange between real processes, its JSON report
//! and every round accounted for. Timings are never asserted on.

mod common;

use common::{report, tandem};
use serde_json::Value;

fn bench(extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "bench",
        "m2n",
        "--senders",
        "2",
        "--receivers",
        "2",
        "--bytes",
        "4096",
        "--hidden",
        "256",
        "--iters",
        "6",
        "--warmup",
        "2",
        "--timeout-s",
        "120",
    ];
    args.extend_from_slice(extra);
    tandem(&args)
}

fn check(v: &Value, baseline: &str) {
    let c = &v["config"];
    assert_eq!(v["bench"], "m2n");
    assert_eq!(c["senders"], 2);
    assert_eq!(c["receivers"], 2);
    assert_eq!(c["bytes_per_message"], 4096);
    assert_eq!(c["iters"], 6);
    assert_eq!(c["baseline"], baseline);
    assert!(c["machine"]["cores"].as_u64().unwrap() >= 1);
    // Every sender finished every timed round.
    assert_eq!(v["rounds_expected"], 12);
    assert_eq!(v["rounds_completed"], 12);
    let senders = v["per_sender"].as_array().unwrap();
    assert_eq!(senders.len(), 2);
    for s in senders {
        assert_eq!(s["rounds"], 6);
    }
    for k in ["p50", "p99", "mean", "min", "max"] {
        assert!(v["latency_us"][k].as_f64().unwrap() > 0.0, "latency_us.{k}");
    }
    let t = &v["throughput"];
    assert_eq!(t["bytes_per_round"], 2 * 2 * 2 * 4096);
    assert!(t["bytes_per_s"].as_f64().unwrap() > 0.0);
    assert!(t["rounds_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["spread"]["p50_us_max"].as_f64().is_some());
}

#[test]
fn m2n_over_tandem_tcp() {
    let v = report(&bench(&[]));
    check(&v, "none (tandem M2N)");
    assert_eq!(v["config"]["hidden"], 256);
    assert_eq!(v["config"]["rows_per_message"], 4);
}

#[test]
fn m2n_with_bf16_on_the_wire() {
    let v = report(&bench(&["--wire-dtype", "bf16"]));
    check(&v, "none (tandem M2N)");
    assert_eq!(v["config"]["wire_dtype"], "bf16");
    let (s, w) = (
        v["config"]["bytes_per_message"].as_u64().unwrap(),
        v["config"]["wire_bytes_per_message"].as_u64().unwrap(),
    );
    assert_eq!(w * 2, s);
}

/// Over TLS: every round arrives (the receivers present the harness's certificate, the
/// senders check it; a failed handshake would fail the run).
#[test]
fn m2n_over_tls() {
    let v = report(&bench(&["--tls"]));
    check(&v, "none (tandem M2N)");
    assert_eq!(v["config"]["tls"], true);
    assert!(v["config"]["transport"]["transport"]
        .as_str()
        .unwrap()
        .contains("TLS"));
}

#[test]
fn bad_sizes_are_refused() {
    // Not a whole number of rows.
    let out = tandem(&["bench", "m2n", "--bytes", "1000", "--hidden", "256"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4*hidden"));
}

#[cfg(not(feature = "mpi"))]
#[test]
fn mpi_baseline_needs_the_feature() {
    let out = bench(&["--baseline", "mpi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features mpi"));
}

#[cfg(feature = "mpi")]
#[test]
fn m2n_over_mpi_alltoallv() {
    for transport in ["tcp", "shm"] {
        let v = report(&bench(&[
            "--baseline",
            "mpi",
            "--mpi-transport",
            transport,
            "--mpi-yield-when-idle",
            "1",
        ]));
        check(&v, "mpi");
        assert_eq!(v["config"]["transport"]["mpi_transport"], transport);
    }
}
