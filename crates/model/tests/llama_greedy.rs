//! A Q4_K_M file quantized by llama.cpp's own `llama-quantize` generates llama.cpp's greedy
//! tokens: `fixtures/gguf/mixtral-q4_k_m.gguf` (a tiny random Mixtral, Q4_K and Q6_K tensors in
//! llama.cpp's Q4_K_M mix) and `mixtral-q4_k_m.llama_greedy.json` (the prompt's ids from
//! llama.cpp's tokenizer and the 16 tokens libllama's argmax loop chose, with its top-2
//! margins), both made by `scripts/gen_llama_greedy_fixture.py`.
//!
//! The two implementations do not compute the same sums in the same order: llama.cpp keeps
//! the KV cache in f16 and quantizes every activation to Q8_K blocks for its K-quant dot
//! products; tandem keeps the cache in f32 and its own 8-bit activation blocks. So a near tie
//! could flip; this file's 16 steps all have a margin of at least 0.07 in llama.cpp, wider
//! than those differences, and all 16 tokens must agree. The check runs at every SIMD level
//! the CPU has (`TANDEM_SIMD`, read once per process, so each level in a child process).

use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_model::generate::{argmax, greedy};
use tandem_model::kernels::{available_levels, simd};
use tandem_model::{Model, Tokenizer};

/// Tokens that must equal llama.cpp's, from the first.
const AGREE: usize = 16;

fn gguf(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn top2(x: &[f32]) -> (u32, f32) {
    let best = argmax(x);
    let second = x
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u32 != best)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    (best, x[best as usize] - second)
}

/// The greedy tokens at the level this process runs with, against llama.cpp's.
#[test]
fn q4_k_m_greedy_agrees_with_llama_cpp() {
    let path = gguf("mixtral-q4_k_m.gguf");
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf("mixtral-q4_k_m.llama_greedy.json")).unwrap(),
    )
    .unwrap();
    let prompt = ids(&exp, "prompt_ids");
    let want = ids(&exp, "greedy");
    assert!(want.len() >= AGREE);

    // The file's tokenizer gives llama.cpp's ids for the prompt (BOS included).
    let tok = Tokenizer::load(&path).unwrap();
    let text = exp["prompt"].as_str().unwrap();
    assert_eq!(tok.encode(text, true).unwrap(), prompt, "tokenizer");

    let model = Model::load(&path).unwrap();
    // The weights run in the file's own K-quant types, not an f32 copy: only the routers
    // (F32 in the file) are f32.
    let mem = model.weight_memory();
    for ty in ["q4_k", "q6_k"] {
        assert!(mem.by_type.contains_key(ty), "no {ty}: {:?}", mem.by_type);
    }
    let c = &model.cfg;
    let routers = c.num_layers * c.num_experts * c.hidden_size * 4;
    assert_eq!(mem.by_type.get("f32"), Some(&routers), "{:?}", mem.by_type);
    assert_eq!(mem.by_type.len(), 3, "{:?}", mem.by_type);

    // Teacher-forced on llama.cpp's tokens, so that every step is compared even after a
    // disagreement; the report gives tandem's own top-2 margin where they differ.
    let mut agree = None;
    let mut report = Vec::new();
    for (i, &w) in want.iter().enumerate() {
        let ctx: Vec<u32> = prompt.iter().chain(&want[..i]).copied().collect();
        let (_, logits) = greedy(&model, &ctx, 1).unwrap();
        let (got, margin) = top2(&logits);
        let gap = logits[got as usize] - logits[w as usize];
        report.push(format!(
            "step {i}: llama.cpp {w}, tandem {got} (margin {margin:.4}, llama.cpp's token {gap:.4} below)"
        ));
        if got != w && agree.is_none() {
            agree = Some(i);
        }
    }
    let agree = agree.unwrap_or(want.len());
    eprintln!(
        "simd={} agreement {agree}/{}\n{}",
        simd().name(),
        want.len(),
        report.join("\n")
    );
    // The free-running loop (the KV cache path without teacher forcing) gives the same tokens.
    let (free, _) = greedy(&model, &prompt, AGREE).unwrap();
    assert_eq!(free[..AGREE], want[..AGREE], "free-running greedy");
    assert!(
        agree >= AGREE,
        "only the first {agree} tokens agree with llama.cpp (simd {}):\n{}",
        simd().name(),
        report.join("\n")
    );
}

/// The same at every SIMD level of this CPU: the test above in a child process per level.
#[test]
fn q4_k_m_greedy_agrees_with_llama_cpp_at_every_simd_level() {
    if std::env::var_os("TANDEM_SIMD").is_some() {
        return; // a child, or a run pinned to one level by the caller
    }
    let exe = std::env::current_exe().unwrap();
    for level in available_levels() {
        let out = Command::new(&exe)
            .args(["--exact", "q4_k_m_greedy_agrees_with_llama_cpp", "--nocapture"])
            .env("TANDEM_SIMD", level.name())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let text = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "{}: {text}", level.name());
        assert!(
            err.contains(&format!("simd={} agreement", level.name())),
            "{}: the child did not run at that level: {text}",
            level.name()
        );
        assert!(text.contains("1 passed"), "{}: {text}", level.name());
    }
}
