//! `tandem bench engine` end to end on the tiny Mixtral fixture: one JSON report with a run
//! per shape, each with its decode phase; with two micro-batches the replica pipelines across
//! iterations (`overlapped_steps`), with one it cannot. Timings are only checked to be
//! positive numbers, never compared.

mod common;

use common::{positive, report, tandem};
use std::path::PathBuf;

#[test]
fn engine_report_has_every_shape_and_its_decode_phase() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral");
    let model = model.to_str().expect("a UTF-8 path");
    let v = report(&tandem(&[
        "bench",
        "engine",
        "--model",
        model,
        "--requests",
        "6",
        "--input-len",
        "8",
        "--output-len",
        "6",
        "--attention-replicas",
        "1",
        "--expert-workers",
        "1",
        "--sweep-micro-batches",
        "1,2",
        "--with-colocated",
    ]));
    let runs = v["runs"].as_array().expect("runs");
    let shapes: Vec<&str> = runs.iter().map(|r| r["shape"].as_str().unwrap()).collect();
    // The colocated shape gives its one replica every core of this machine (the bench runs
    // here, as this test does).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(
        shapes,
        [
            "n_a=1 N=1 m=1".to_string(),
            "n_a=1 N=1 m=2".to_string(),
            format!("colocated x{cores} threads"),
        ]
    );
    assert_eq!(runs[2]["threads_total"], cores);
    for r in runs {
        let shape = r["shape"].as_str().unwrap();
        assert_eq!(r["output_tokens"], 36, "{shape}: 6 requests x 6 tokens");
        positive(&r["output_tokens_per_s"], shape);
        positive(&r["iterations"], &format!("{shape} iterations"));
        // The replica's LM head and sampling time, over the whole timed run.
        let rep = &r["workers"][0];
        assert_eq!(rep["role"], "attention", "{shape}");
        positive(&rep["lm_head_s"], &format!("{shape} lm head"));
        positive(&rep["sample_s"], &format!("{shape} sampling"));
        let overlapped = r["overlapped_steps"].as_u64().expect("overlapped_steps");
        if r["micro_batches"] == 2 && r["expert_workers"] == 1 {
            assert!(overlapped > 0, "{shape}: no step overlapped another");
        } else {
            assert_eq!(overlapped, 0, "{shape}");
        }
        // The decode phase starts when the bench thread sees the last first token; on a model
        // this small the engine may be done by then, so only its shape is checked.
        let d = &r["decode"];
        positive(&d["output_tokens_per_s"], &format!("{shape} decode"));
        for key in ["lm_head_ms_per_iteration", "sample_ms_per_iteration"] {
            assert!(d.get(key).is_some(), "{shape}: decode has no {key}");
        }
        assert!(d["overlapped_steps"].as_u64().is_some(), "{shape}");
    }
}
