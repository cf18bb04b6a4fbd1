//! Parity with Hugging Face transformers on the committed fixtures (fixtures/*, written by
//! scripts/gen_fixtures.py): greedy tokens equal, first-step logits within 1e-4 of their scale,
//! and our tokenizer's encoding equal to transformers'.

mod common;
use common::reran_with_exact_bf16;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tandem_model::generate::{argmax, greedy, SimpleBatch};
use tandem_model::{Model, Tokenizer};

#[derive(Deserialize)]
struct Prompt {
    text: Option<String>,
    ids: Vec<u32>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct Expected {
    prompts: Vec<Prompt>,
    first_logits: Vec<Vec<f32>>,
    greedy: Vec<Vec<u32>>,
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn load_expected(dir: &Path) -> Expected {
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("parse expected.json")
}

fn check_logits(name: &str, i: usize, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{name} prompt {i}: vocab size");
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "{name} prompt {i}: max |logit diff| {worst} > 1e-4 * {scale}"
    );
}

fn check_family(name: &str) {
    let dir = fixtures_root().join(name);
    let exp = load_expected(&dir);
    let model = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tok = Tokenizer::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (i, p) in exp.prompts.iter().enumerate() {
        if let Some(t) = &p.text {
            assert_eq!(
                tok.encode(t, p.add_special_tokens).unwrap(),
                p.ids,
                "{name} prompt {i}: tokenizer"
            );
        }
        let (toks, first) = greedy(&model, &p.ids, exp.greedy[i].len()).unwrap();
        check_logits(name, i, &first, &exp.first_logits[i]);
        assert_eq!(toks, exp.greedy[i], "{name} prompt {i}: greedy tokens");
    }
    // All prompts at once in one batch (mixed prefill lengths, then batched decode) must give
    // the same tokens as one at a time.
    let n = exp.greedy[0].len();
    let maxlen = exp.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) + n + 1;
    let mut b = SimpleBatch::new(&model, exp.prompts.len(), maxlen, 4);
    let mut next: Vec<Vec<u32>> = exp.prompts.iter().map(|p| p.ids.clone()).collect();
    let mut outs: Vec<Vec<u32>> = vec![vec![]; exp.prompts.len()];
    for _ in 0..n {
        let logits = b.step(&model, &next).unwrap();
        for (i, l) in logits.into_iter().enumerate() {
            let t = argmax(&l.expect("logits"));
            outs[i].push(t);
            next[i] = vec![t];
        }
    }
    assert_eq!(outs, exp.greedy, "{name}: batched greedy");
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral");
}
#[test]
fn qwen2_moe_bf16_matches_transformers() {
    // Held in bf16 (the checkpoint's type).
    if reran_with_exact_bf16("qwen2_moe_bf16_matches_transformers") {
        return;
    }
    check_family("qwen2_moe");
}
#[test]
fn qwen3_moe_sharded_matches_transformers() {
    check_family("qwen3_moe");
}
#[test]
fn olmoe_matches_transformers() {
    check_family("olmoe");
}
#[test]
fn dbrx_matches_transformers() {
    check_family("dbrx");
}
#[test]
fn glm4_moe_matches_transformers() {
    check_family("glm4_moe");
}
#[test]
fn deepseek_v2_mla_group_limited_yarn_matches_transformers() {
    check_family("deepseek_v2");
}
#[test]
fn deepseek_v3_mla_q_lora_noaux_tc_matches_transformers() {
    check_family("deepseek_v3");
}
#[test]
fn gpt_oss_sinks_sliding_window_yarn_matches_transformers() {
    check_family("gpt_oss");
}
#[test]
fn gpt_oss_mxfp4_experts_match_transformers() {
    // Held in bf16 (the checkpoint's type).
    if reran_with_exact_bf16("gpt_oss_mxfp4_experts_match_transformers") {
        return;
    }
    check_family("gpt_oss_mxfp4");
}
