//! Which instruction-set levels the kernel tests covered on this machine. The SIMD kernels
//! are tested against their scalar oracle at every level the CPU has (`packed.rs`, `quant.rs`
//! unit tests); a level the CPU lacks is silently skipped there, so this test says, in the
//! test output itself (written past the harness's capture), what was and was not covered.

use std::io::Write;
use tandem_kernels::simd::{available_levels, coverage_report, detected_simd, simd, Simd};

#[test]
fn instruction_set_levels_covered_on_this_machine() {
    let report = coverage_report();
    // Raw stderr, not eprintln!: the harness captures the print macros of passing tests.
    let _ = writeln!(std::io::stderr().lock(), "\n    {report}\n");
    let levels = available_levels();
    assert_eq!(
        levels.first(),
        Some(&Simd::Scalar),
        "the oracle is always covered"
    );
    assert_eq!(levels.last(), Some(&detected_simd()));
    assert!(
        simd() <= detected_simd(),
        "TANDEM_SIMD cannot raise the level"
    );
    for l in &levels {
        assert!(report.contains(l.name()), "{report}");
    }
    // /proc/cpuinfo agrees with the detection (Linux): AVX-512 is reported as covered exactly
    // when the CPU lists avx512f, avx512bw and avx512vl.
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(flags) = info.lines().find(|l| l.starts_with("flags")) {
            let has = |f: &str| flags.split_whitespace().any(|w| w == f);
            let avx512 = has("avx512f") && has("avx512bw") && has("avx512vl");
            assert_eq!(
                levels.contains(&Simd::Avx512),
                avx512 && has("avx2"),
                "{flags}"
            );
            // The bf16 dot-product level exactly when the CPU also lists avx512_bf16.
            assert_eq!(
                levels.contains(&Simd::Avx512Bf16),
                avx512 && has("avx2") && has("avx512_bf16"),
                "{flags}"
            );
        }
    }
}
