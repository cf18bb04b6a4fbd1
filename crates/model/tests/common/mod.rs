//! Helpers shared by this crate's integration tests.

/// Some checks hold only where bf16 products are exact: the greedy tokens and logits of a
/// bf16 model against transformers' within 1e-4, bf16's cosine bounds against f32, token
/// equality across batches. At `tandem_kernels`' AVX512_BF16 level (`Simd::bf16_dot`) bf16
/// weights multiply activations rounded to bf16 (tested against its own oracle in
/// `tandem-kernels`, and against f32 by `weight_types`' `bf16_dot_tracks_f32_on_every_family`),
/// so there the test named `test` reruns in a child process capped to `avx512`, exact bf16:
/// true when it did so (and the child passed), false when the test runs here.
#[allow(dead_code)] // not every test file that includes this module calls it
pub fn reran_with_exact_bf16(test: &str) -> bool {
    if !tandem_model::simd::simd().bf16_dot() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("TANDEM_SIMD", "avx512")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} at avx512: {text}"
    );
    true
}
