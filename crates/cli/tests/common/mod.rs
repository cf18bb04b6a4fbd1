//! Helpers shared by the `tandem bench ...` end-to-end tests: run the binary, read its one JSON
//! report, check that a measurement is a positive number. (Each test binary uses some of them.)
#![allow(dead_code)]

use serde_json::Value;
use std::process::{Command, Output};

/// `tandem ARGS...`, its output.
pub fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("running tandem")
}

/// The JSON object a successful run printed on stdout (fails the test with its stderr if the
/// run failed).
pub fn report(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tandem failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// `v` as a finite number above zero (a timing or a rate; never compared with another).
pub fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}
