//! `tandem bench kernels` end to end on tiny sizes: its JSON report has every measurement,
//! each a positive, finite number. Timings are never compared.

mod common;

use common::{positive, report, tandem};

#[test]
fn kernels_report() {
    let out = tandem(&[
        "bench",
        "kernels",
        "--rows",
        "1,3",
        "--repeat",
        "1",
        "--context",
        "40",
        "--batches",
        "2,3",
        "--hidden",
        "64",
        "--ffn",
        "96",
        "--mem-mib",
        "4",
    ]);
    let v = report(&out);
    assert_eq!(v["bench"], "kernels");
    assert_eq!(v["threads"], 1);
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    let s = &v["settings"];
    assert_eq!(s["hidden"], 64);
    assert_eq!(s["ffn"], 96);
    assert_eq!(s["head_dim"], 4);
    positive(&v["memory_read_gbps"], "memory_read_gbps");

    let mm = v["matmul"].as_array().expect("matmul rows");
    // gate_up (n = 2 ffn, k = hidden) and down (n = hidden, k = ffn), each at rows 1 and 3.
    let shapes: Vec<(u64, u64, u64)> = mm
        .iter()
        .map(|r| {
            (
                r["n"].as_u64().unwrap(),
                r["k"].as_u64().unwrap(),
                r["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [(192, 64, 1), (192, 64, 3), (64, 96, 1), (64, 96, 3)]
    );
    for r in mm {
        for f in [
            "ms",
            "gbps",
            "gflops",
            "gemm_ms",
            "gemm_gflops",
            "speedup_vs_gemm",
        ] {
            positive(&r[f], &format!("matmul {f}"));
        }
    }

    let at = v["attention"].as_array().expect("attention rows");
    let cases: Vec<(&str, u64)> = at
        .iter()
        .map(|r| (r["case"].as_str().unwrap(), r["batch"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        cases,
        [
            ("distinct", 2),
            ("distinct", 3),
            ("shared_prefix", 2),
            ("shared_prefix", 3)
        ]
    );
    for r in at {
        assert_eq!(r["context"], 40);
        for f in ["ms", "us_per_seq", "kv_gbps"] {
            positive(&r[f], &format!("attention {f}"));
        }
    }
    // One progress line per measurement on stderr.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("bench kernels:"))
            .count(),
        1 + 4 + 4
    );
}

#[test]
fn bad_settings_are_refused() {
    let out = tandem(&["bench", "kernels", "--hidden", "60", "--mem-mib", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of"));
}
