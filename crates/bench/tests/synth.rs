//! `tandem synth-gguf`: the tensors of the real-size plans (names, shapes, types), and small
//! synthetic files of every architecture that tandem loads and generates from, with the
//! weights' spread and the tokenizer checked.

use std::path::PathBuf;

use tandem_bench::synth::{self, Arch, MlaSpec, Spec, SynthType, TensorPlan};
use tandem_model::gguf_format::GgmlType;
use tandem_model::tokenizer::ChatMessage;
use tandem_model::weights::Weights;
use tandem_model::{Model, Tokenizer};

fn find<'a>(p: &'a [TensorPlan], name: &str) -> &'a TensorPlan {
    p.iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name} in the plan"))
}

fn bytes(p: &[TensorPlan]) -> u64 {
    p.iter()
        .map(|t| {
            t.ty.bytes_for(t.shape.iter().map(|d| *d as u64).product())
                .unwrap()
        })
        .sum()
}

#[test]
fn qwen3_30b_a3b_q4_k_m_has_the_published_shapes_and_llama_cpp_mix() {
    let s = synth::spec("qwen3-30b-a3b").unwrap();
    let p = synth::plan(&s, SynthType::Q4KM);
    // 3 whole-model tensors + 12 per layer (2 norms, q/k/v/o, q/k norms, router, 3 experts).
    assert_eq!(p.len(), 3 + 48 * 12);
    let t = find(&p, "blk.47.ffn_gate_exps.weight");
    assert_eq!(t.shape, vec![128, 768, 2048]);
    assert_eq!(t.ty, GgmlType::Q4_K);
    assert_eq!(
        find(&p, "blk.0.ffn_down_exps.weight").shape,
        vec![128, 2048, 768]
    );
    // use_more_bits: the first eighth of the layers and every third after it get Q6_K.
    assert_eq!(find(&p, "blk.0.ffn_down_exps.weight").ty, GgmlType::Q6_K);
    assert_eq!(find(&p, "blk.6.attn_v.weight").ty, GgmlType::Q4_K);
    assert_eq!(find(&p, "blk.8.attn_v.weight").ty, GgmlType::Q6_K);
    assert_eq!(find(&p, "blk.0.attn_q.weight").shape, vec![32 * 128, 2048]);
    assert_eq!(find(&p, "blk.0.attn_k.weight").shape, vec![4 * 128, 2048]);
    assert_eq!(find(&p, "blk.0.attn_k_norm.weight").shape, vec![128]);
    assert_eq!(find(&p, "blk.0.ffn_gate_inp.weight").ty, GgmlType::F32);
    assert_eq!(find(&p, "output.weight").ty, GgmlType::Q6_K);
    assert_eq!(find(&p, "token_embd.weight").shape, vec![151936, 2048]);
    // Qwen3-30B-A3B at Q4_K_M is about 17-18.5 GB.
    let gb = bytes(&p) as f64 / 1e9;
    assert!((16.0..19.0).contains(&gb), "{gb} GB");
}

#[test]
fn gpt_oss_20b_mxfp4_has_mxfp4_experts_biases_and_sinks() {
    let s = synth::spec("gpt-oss-20b").unwrap();
    assert_eq!((s.layers, s.experts, s.top_k, s.hidden), (24, 32, 4, 2880));
    assert_eq!(
        (s.heads, s.kv_heads, s.head_dim, s.vocab),
        (64, 8, 64, 201088)
    );
    assert_eq!(s.sliding_window, Some(128));
    let p = synth::plan(&s, SynthType::Mxfp4);
    let t = find(&p, "blk.3.ffn_up_exps.weight");
    assert_eq!(
        (t.shape.clone(), t.ty),
        (vec![32, 2880, 2880], GgmlType::MXFP4)
    );
    assert_eq!(find(&p, "blk.3.ffn_up_exps.bias").shape, vec![32, 2880]);
    assert_eq!(find(&p, "blk.3.attn_sinks.weight").shape, vec![64]);
    assert_eq!(find(&p, "blk.3.attn_q.weight").ty, GgmlType::Q8_0);
    assert_eq!(
        find(&p, "blk.3.post_attention_norm.weight").ty,
        GgmlType::F32
    );
    // About 12-13 GB (the hub's MXFP4 file is 12.8 GB with BF16 attention).
    let gb = bytes(&p) as f64 / 1e9;
    assert!((11.0..14.0).contains(&gb), "{gb} GB");
    // Q4_K_M cannot hold 2880-wide rows in K-quant blocks: they fall back to Q8_0.
    let k = synth::plan(&s, SynthType::Q4KM);
    assert_eq!(find(&k, "blk.0.attn_q.weight").ty, GgmlType::Q8_0);
    assert_eq!(find(&k, "blk.0.attn_output.weight").ty, GgmlType::Q4_K);
}

#[test]
fn deepseek_v2_lite_and_mixtral_shapes_come_from_the_plan_catalog() {
    let s = synth::spec("deepseek-v2-lite").unwrap();
    assert_eq!(
        (s.layers, s.dense_layers, s.experts, s.top_k),
        (27, 1, 64, 6)
    );
    assert_eq!(
        (s.expert_ff, s.shared_experts, s.dense_ff),
        (1408, 2, 10944)
    );
    let p = synth::plan(&s, SynthType::Q8_0);
    assert_eq!(find(&p, "blk.0.ffn_down.weight").shape, vec![2048, 10944]);
    assert_eq!(find(&p, "blk.1.attn_k_b.weight").shape, vec![16, 512, 128]);
    assert_eq!(find(&p, "blk.1.attn_v_b.weight").shape, vec![16, 128, 512]);
    assert_eq!(
        find(&p, "blk.1.attn_kv_a_mqa.weight").shape,
        vec![576, 2048]
    );
    assert_eq!(
        find(&p, "blk.1.ffn_gate_shexp.weight").shape,
        vec![2816, 2048]
    );
    assert!(p.iter().all(|t| t.name != "blk.0.ffn_gate_inp.weight"));
    let m = synth::spec("mixtral-8x7b").unwrap();
    let p = synth::plan(&m, SynthType::Q4_0);
    assert_eq!(
        find(&p, "blk.31.ffn_up_exps.weight").shape,
        vec![8, 14336, 4096]
    );
    assert_eq!(find(&p, "blk.31.ffn_up_exps.weight").ty, GgmlType::Q4_0);
    assert!(synth::spec("no-such-model").is_err());
}

/// A small model of architecture `name` (its real spec's metadata, small widths).
fn tiny(name: &str) -> Spec {
    let mut s = synth::spec(name).unwrap();
    s.hidden = 256;
    s.layers = 2;
    s.heads = 4;
    s.kv_heads = 2;
    s.head_dim = 64;
    s.vocab = 1024;
    s.experts = 8;
    s.top_k = 2;
    s.expert_ff = 256;
    s.dense_ff = 512;
    s.context = 4096;
    if s.arch == Arch::Deepseek2 {
        s.dense_layers = 1;
        s.shared_experts = 1;
        s.kv_heads = 4;
        s.mla = Some(MlaSpec {
            kv_lora_rank: 128,
            rope_dim: 32,
            nope_dim: 64,
            v_dim: 64,
        });
        s.head_dim = 96;
    }
    s
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-synth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes `spec` in `ty`, checks every tensor the file holds against the plan, loads it in
/// tandem and generates 4 tokens.
fn write_load_generate(spec: &Spec, ty: SynthType) {
    let path = tmp(&format!("{}-{ty:?}.gguf", spec.name));
    synth::write(spec, ty, &path, 7).unwrap();
    let w = Weights::open(&path).unwrap();
    let g = w.gguf().expect("a GGUF file");
    let plan = synth::plan(spec, ty);
    assert_eq!(g.content().tensors.len(), plan.len());
    for t in &plan {
        let info = g
            .content()
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} not in the file", t.name));
        assert_eq!(info.shape(), t.shape, "{}", t.name);
        assert_eq!(info.ggml_type, t.ty, "{}", t.name);
    }
    let tok = Tokenizer::from_gguf(g).unwrap();
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
    let prompt = tok
        .apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let (out, logits) = tandem_model::generate::greedy(&model, &ids, 4).unwrap();
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|t| (*t as usize) < spec.vocab));
    assert!(
        logits.iter().all(|x| x.is_finite()),
        "{}: logits",
        spec.name
    );
    // Random weights: the logits are spread, not all equal.
    let (lo, hi) = logits
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    assert!(hi - lo > 1e-3, "{}: logits {lo}..{hi}", spec.name);
    std::fs::remove_file(&path).ok();
}

#[test]
fn small_qwen3moe_q4_k_m_loads_and_generates() {
    write_load_generate(&tiny("qwen3-30b-a3b"), SynthType::Q4KM);
}

#[test]
fn small_qwen3moe_q4_0_and_q8_0_load_and_generate() {
    let s = tiny("qwen3-30b-a3b");
    write_load_generate(&s, SynthType::Q4_0);
    write_load_generate(&s, SynthType::Q8_0);
}

#[test]
fn small_gpt_oss_mxfp4_loads_and_generates() {
    write_load_generate(&tiny("gpt-oss-20b"), SynthType::Mxfp4);
}

#[test]
fn small_deepseek2_q8_0_loads_and_generates() {
    write_load_generate(&tiny("deepseek-v2-lite"), SynthType::Q8_0);
}

#[test]
fn small_mixtral_q4_k_m_loads_and_generates() {
    write_load_generate(&tiny("mixtral-8x7b"), SynthType::Q4KM);
}

/// The weights as tandem dequantizes them have mean ~0 and standard deviation
/// ~1/sqrt(fan_in) in every type the generator writes (the scales are right).
#[test]
fn random_blocks_have_the_intended_spread_in_every_type() {
    let mut s = tiny("qwen3-30b-a3b");
    s.hidden = 512;
    s.expert_ff = 512;
    let mut seen = std::collections::BTreeSet::<String>::new();
    for ty in [
        SynthType::Q4KM,
        SynthType::Q4_0,
        SynthType::Q8_0,
        SynthType::Mxfp4,
    ] {
        let path = tmp(&format!("spread-{ty:?}.gguf"));
        synth::write(&s, ty, &path, 3).unwrap();
        let w = Weights::open(&path).unwrap();
        let g = w.gguf().unwrap();
        // o_proj: fan-in heads * head_dim = 256 (Q5_K under q4_k_m: 8 experts); an expert's
        // gate: fan-in 512 (Q4_K under q4_k_m, MXFP4 under mxfp4); lm_head (Q6_K under
        // q4_k_m and q4_0).
        for hub in [
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.mlp.experts.3.gate_proj.weight",
            "lm_head.weight",
        ] {
            let shape = g.shape_of(hub).unwrap_or_else(|| panic!("no {hub}"));
            let fan_in = if hub.contains("o_proj") { 256.0 } else { 512.0 };
            let v = g.get_vec(hub, &shape).unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
            let std = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let want = 1.0 / f64::sqrt(fan_in);
            seen.insert(g.dtype_of(hub).unwrap_or_default());
            eprintln!(
                "{ty:?} {hub} {:?}: mean {mean:.5} std {std:.5} want {want:.5}",
                g.dtype_of(hub)
            );
            assert!(mean.abs() < 0.1 * want, "{ty:?} {hub}: mean {mean}");
            assert!(
                (0.7 * want..1.4 * want).contains(&std),
                "{ty:?} {hub}: std {std}, want {want}"
            );
        }
        std::fs::remove_file(&path).ok();
    }
    // Every type the generator writes was checked.
    for t in ["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4"] {
        assert!(seen.contains(t), "{t} not checked: {seen:?}");
    }
}

#[test]
fn the_tokenizer_uses_its_merges_and_round_trips() {
    let path = tmp("tok.gguf");
    synth::write(&tiny("qwen3-30b-a3b"), SynthType::Q8_0, &path, 1).unwrap();
    let w = Weights::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(w.gguf().unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 1024);
    // Words of the text the merges were learned on are a few tokens each.
    let english = "The capital of France is Paris.";
    let ids = tok.encode(english, false).unwrap();
    assert!(
        ids.len() <= 12,
        "{} ids for {} bytes: the merges are not applied",
        ids.len(),
        english.len()
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), english);
    // Any text round-trips through the byte-level tokens.
    let text = "Ünïcode ✓ 2026\n\ttabs, <b>tags</b>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(tok.eos_token_id(), Some(im_end));
    assert_eq!(tok.encode("<|im_start|>", false).unwrap().len(), 1);
    std::fs::remove_file(&path).ok();
}

#[test]
fn gpt_oss_20b_mxfp4_memory_estimate_counts_the_experts_at_their_file_size() {
    // GPT-OSS-20B as the hub ships it (experts in MXFP4, ggml type 39): the check before
    // loading counts every tensor in the file's own type (the experts used in place, not
    // rebuilt in f32, which once made this file "need 75.2 GiB"), plus the largest tensor
    // once in f32 (the embedding, converted while loading). The file's data is a hole: only
    // its header is written.
    use tandem_model::model::{check_fits, estimate_resident_bytes, ExpertSelection};
    use tandem_model::weights::LinearType;
    use tandem_model::ModelConfig;
    let s = synth::spec("gpt-oss-20b").unwrap();
    let path = tmp("gpt-oss-20b-hollow.gguf");
    let len = synth::write_hollow(&s, SynthType::Mxfp4, &path).unwrap();
    let p = synth::plan(&s, SynthType::Mxfp4);
    assert!(len > bytes(&p), "{len} bytes for {} of tensors", bytes(&p));
    let w = Weights::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(w.gguf().unwrap()).unwrap();
    let est = |sel: &ExpertSelection| estimate_resident_bytes(&cfg, &w, sel, LinearType::Auto);
    let all = est(&ExpertSelection::All);
    let experts: Vec<TensorPlan> = p
        .iter()
        .filter(|t| t.name.contains("_exps.weight"))
        .cloned()
        .collect();
    assert!(experts.iter().all(|t| t.ty == GgmlType::MXFP4));
    assert_eq!(experts.len(), 3 * 24);
    assert_eq!(all - est(&ExpertSelection::None), bytes(&experts));
    let embed_f32 = 4 * (s.vocab * s.hidden) as u64;
    assert_eq!(all, bytes(&p) + embed_f32);
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    assert!((12.0..14.0).contains(&gib(all)), "{:.1} GiB", gib(all));
    // Fits in 14 GiB under `auto`; in 12 GiB it does not, and the error says how much it needs.
    check_fits(
        &cfg,
        &w,
        &path,
        &ExpertSelection::All,
        LinearType::Auto,
        14 << 30,
    )
    .unwrap();
    let err = check_fits(
        &cfg,
        &w,
        &path,
        &ExpertSelection::All,
        LinearType::Auto,
        12 << 30,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&tandem_model::mem::gib(all)), "{err}");
    std::fs::remove_file(&path).ok();
}
