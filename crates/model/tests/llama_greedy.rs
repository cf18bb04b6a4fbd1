//! A Q4_K_M file quantized by llama.cpp's own `llama-quantize` generates llama.cpp's greedy
//! tokens: `fixtures/gguf/mixtral-q4_k_m.gguf` (a tiny random Mixtral, Q4_K and Q6_K tensors in
//! llama.cpp's Q4_K_M mix) and `mixtral-q4_k_m.llama_greedy.json` (the prompt's ids from
//! llama.cpp's tokenizer, and the 16 tokens libllama's argmax loop chose with the logits of
//! every step), both made by `scripts/gen_llama_greedy_fixture.py`.
//!
//! llama.cpp ran twice on the file. With its defaults (f16 KV cache, flash attention) its
//! logits differ from tandem's (f32 cache) by up to 0.24 (4.3% of that step's largest
//! |logit|), but its 16 tokens, whose top-2 margins are all above 0.07, are the same. In its `exact` mode (f32
//! KV cache, no flash attention) the only rounding the two do differently is gone: both
//! quantize a K-quant product's input to 8-bit blocks of 256 the same way and their integer
//! dots are exact, so tandem's logits equal llama.cpp's to f32 precision (measured: 4e-6).
//! The check runs at every SIMD level the CPU has (`TANDEM_SIMD`, read once per process, so
//! each level in a child process).

use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_kernels::simd::{available_levels, simd};
use tandem_model::generate::{argmax, greedy, SimpleBatch};
use tandem_model::{Model, Tokenizer};

/// Tokens that must equal llama.cpp's, from the first (all it generated).
const AGREE: usize = 16;
/// Largest logit difference from llama.cpp's `exact` run, relative to its largest |logit|
/// (measured: 5e-7, f32 rounding of sums taken in another order).
const EXACT_REL: f32 = 2e-5;
/// The same for llama.cpp's default run (f16 cache and flash attention; measured: 0.043).
const DEFAULT_REL: f32 = 0.1;

fn gguf(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("an array of logit rows")
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
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

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Tandem's logits at each step of `tokens` after `prompt`, through the KV cache: the prefill's
/// last row, then one decode step per token (llama.cpp's sequence, so that every step is
/// compared even after a disagreement).
fn teacher_forced(model: &Model, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut b = SimpleBatch::new(model, 1, prompt.len() + tokens.len() + 1, 16);
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for &t in tokens {
        out.push(b.step(model, &[next]).unwrap().pop().flatten().unwrap());
        next = vec![t];
    }
    out
}

/// The greedy tokens and logits at the level this process runs with, against llama.cpp's.
#[test]
fn q4_k_m_greedy_agrees_with_llama_cpp() {
    let path = gguf("mixtral-q4_k_m.gguf");
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf("mixtral-q4_k_m.llama_greedy.json")).unwrap(),
    )
    .unwrap();
    let prompt = ids(&exp["prompt_ids"]);
    let want = ids(&exp["default"]["greedy"]);
    assert!(want.len() >= AGREE);
    assert_eq!(ids(&exp["exact"]["greedy"]), want, "the fixture's two runs");

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

    let ours = teacher_forced(&model, &prompt, &want);
    let mut agree = None;
    let mut report = Vec::new();
    let mut worst = [0f32; 2];
    for (m, mode) in ["exact", "default"].into_iter().enumerate() {
        let theirs = rows(&exp[mode]["logits"]);
        assert_eq!(theirs.len(), want.len(), "{mode}");
        for (a, b) in ours.iter().zip(&theirs) {
            let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
            worst[m] = worst[m].max(max_abs_diff(a, b) / scale);
        }
    }
    for (i, (&w, logits)) in want.iter().zip(&ours).enumerate() {
        let (got, margin) = top2(logits);
        report.push(format!(
            "step {i}: llama.cpp {w}, tandem {got} (tandem's top-2 margin {margin:.4}, \
             llama.cpp's token {:.4} below)",
            logits[got as usize] - logits[w as usize]
        ));
        if got != w && agree.is_none() {
            agree = Some(i);
        }
    }
    let agree = agree.unwrap_or(want.len());
    eprintln!(
        "simd={} agreement {agree}/{}; largest logit difference / largest |logit|: \
         {:.2e} from llama.cpp exact, {:.2e} from its defaults\n{}",
        simd().name(),
        want.len(),
        worst[0],
        worst[1],
        report.join("\n")
    );
    assert!(
        agree >= AGREE,
        "only the first {agree} tokens agree with llama.cpp (simd {}):\n{}",
        simd().name(),
        report.join("\n")
    );
    assert!(worst[0] <= EXACT_REL, "exact: {:e}", worst[0]);
    assert!(worst[1] <= DEFAULT_REL, "default: {:e}", worst[1]);
    // The free-running loop gives the same tokens.
    let (free, _) = greedy(&model, &prompt, AGREE).unwrap();
    assert_eq!(free[..AGREE], want[..AGREE], "free-running greedy");
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
            .args([
                "--exact",
                "q4_k_m_greedy_agrees_with_llama_cpp",
                "--nocapture",
            ])
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
