//! K-quant GGUF files: a tiny Mixtral-layout model quantized by llama.cpp's own quantizer
//! (`ggml_quantize_chunk`) in Q4_K_M's mix with Q5_K up-projection experts,
//! `fixtures/gguf/kquant-q4_k_m.gguf`, and gguf-py's dequantization of its tensors
//! (`kquant-reference.json`; both made by `scripts/gen_kquant_fixtures.py`). The model loads with its K-quant tensors resident as
//! they are (ranges of the mapped file) and generates the greedy tokens of the same file
//! dequantized to f32; every dequantized tensor equals gguf-py's, bit for bit.

use std::path::{Path, PathBuf};
use tandem_model::generate::greedy;
use tandem_model::kquant::KFormat;
use tandem_model::model::ExpertSelection;
use tandem_model::packed::PackedWeights;
use tandem_model::weights::{LinearType, Weights};
use tandem_model::{Model, WeightType};

fn gguf(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf")
        .join(name)
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(gguf("kquant-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fnv1a64(values: &[f32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in values {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The hub names that make up GGUF tensor `name`, in its order (stacked experts one after
/// the other); `None` for the q/k projections, whose rows loading reorders.
fn hub_names(name: &str, experts: usize) -> Option<Vec<String>> {
    match name {
        "output.weight" => return Some(vec!["lm_head.weight".into()]),
        "token_embd.weight" => return Some(vec!["model.embed_tokens.weight".into()]),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (l, rest) = rest.split_once('.')?;
    let p = format!("model.layers.{l}");
    let one = |s: &str| Some(vec![format!("{p}.{s}.weight")]);
    let exps = |w: &str| {
        Some(
            (0..experts)
                .map(|e| format!("{p}.block_sparse_moe.experts.{e}.{w}.weight"))
                .collect(),
        )
    };
    match rest {
        "attn_v.weight" => one("self_attn.v_proj"),
        "attn_output.weight" => one("self_attn.o_proj"),
        "ffn_gate_exps.weight" => exps("w1"),
        "ffn_up_exps.weight" => exps("w3"),
        "ffn_down_exps.weight" => exps("w2"),
        _ => None,
    }
}

#[test]
fn dequantized_k_quants_are_gguf_py_bit_for_bit() {
    let path = gguf("kquant-q4_k_m.gguf");
    let w = Weights::open(&path).unwrap();
    let cfg = tandem_model::ModelConfig::from_dir(&path).unwrap();
    let experts = cfg.num_experts;
    let r = reference();
    let mut types = std::collections::BTreeSet::new();
    let mut compared = 0;
    for (name, t) in r["tensors"].as_object().unwrap() {
        let ty = t["type"].as_str().unwrap();
        types.insert(ty.to_string());
        let Some(hubs) = hub_names(name, experts) else {
            continue;
        };
        let mut values = Vec::new();
        for hub in &hubs {
            assert_eq!(w.dtype_of(hub).as_deref(), Some(ty), "{hub}");
            let shape = w.shape_of(hub).unwrap();
            values.extend(w.get_vec(hub, &shape).unwrap());
        }
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        for (i, bits) in t["values"].as_object().unwrap() {
            let i: usize = i.parse().unwrap();
            let want = f32::from_bits(bits.as_u64().unwrap() as u32);
            assert_eq!(
                values[i].to_bits(),
                want.to_bits(),
                "{name} [{i}]: {} vs {want}",
                values[i]
            );
        }
        assert_eq!(
            format!("{:016x}", fnv1a64(&values)),
            t["fnv1a64"].as_str().unwrap(),
            "{name} ({ty}): dequantized values differ from gguf-py's"
        );
        compared += 1;
    }
    // Q4_K_M's mix with Q5_K up-projections: all three K-quants were compared.
    assert_eq!(
        types.iter().map(String::as_str).collect::<Vec<_>>(),
        ["Q4_K", "Q5_K", "Q6_K"]
    );
    assert!(compared >= 4, "only {compared} tensors compared");

    // MXFP4 blocks from gguf-py's quantizer, as raw blocks.
    let mx = &r["mxfp4"];
    let hex = mx["blocks_hex"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let want: Vec<u32> = serde_json::from_value(mx["values"].clone()).unwrap();
    let mut got = vec![0f32; 32];
    for (b, blk) in bytes.chunks_exact(KFormat::Mxfp4.block_bytes()).enumerate() {
        KFormat::Mxfp4.dequantize_block(blk, &mut got);
        for (l, v) in got.iter().enumerate() {
            assert_eq!(
                v.to_bits(),
                want[32 * b + l],
                "MXFP4 block {b} value {l}: {v}"
            );
        }
    }
    assert_eq!(bytes.len() / 17 * 32, want.len());
}

/// Every K-quant weight of the model, and whether it lies in the file's mapping.
fn k_weights(m: &Model) -> Vec<(String, &PackedWeights)> {
    let mut v = vec![
        ("embed".to_string(), &m.embed),
        ("lm_head".to_string(), &m.lm_head.w),
    ];
    for (l, layer) in m.layers.iter().enumerate() {
        v.push((format!("{l}.qkv"), &layer.attention.w.qkv.w));
        v.push((format!("{l}.o"), &layer.attention.w.o.w));
        for (e, mlp) in layer.experts.routed.iter().enumerate() {
            let mlp = mlp.as_ref().expect("all experts loaded");
            v.push((format!("{l}.expert{e}.gate_up"), &mlp.gate_up.w));
            v.push((format!("{l}.expert{e}.down"), &mlp.down.w));
        }
    }
    v.retain(|(_, w)| w.as_kquant().is_some());
    v
}

#[test]
fn q4_k_m_gguf_runs_in_its_own_types_like_f32() {
    let path = gguf("kquant-q4_k_m.gguf");
    let native = Model::load(&path).unwrap();
    let f32 = Model::load_typed(
        &path,
        &ExpertSelection::All,
        LinearType::Is(WeightType::F32),
    )
    .unwrap();
    // The K-quant tensors are held as they are: no f32 copy.
    let mem = native.weight_memory();
    eprintln!("resident by type: {:?}", mem.by_type);
    for ty in ["q4_k", "q5_k", "q6_k"] {
        assert!(
            mem.by_type.contains_key(ty),
            "no {ty} weight resident: {:?}",
            mem.by_type
        );
    }
    let ks = k_weights(&native);
    assert!(!ks.is_empty());
    // Gate and up of an expert stacked as two segments, not copied into one buffer.
    let mlp0 = native.layers[0].experts.routed[0].as_ref().unwrap();
    let kq = mlp0
        .gate_up
        .w
        .as_kquant()
        .expect("gate_up held in K-quant blocks");
    assert_eq!(kq.segments(), 2, "gate and up stacked without a copy");
    assert_eq!(kq.formats(), vec![(KFormat::Q4K, 256), (KFormat::Q5K, 256)]);
    // q, k (Q4_K) and v (Q6_K) in one stack, each in its own blocks.
    let qkv = native.layers[0].attention.w.qkv.w.as_kquant().unwrap();
    assert_eq!(
        qkv.formats(),
        vec![(KFormat::Q4K, 256 + 128), (KFormat::Q6K, 128)]
    );
    // A weight taken from the file is a range of its mapping, the blocks as the file has them.
    let w = Weights::open(&path).unwrap();
    let g = w.gguf().unwrap();
    let hub = "model.layers.0.block_sparse_moe.experts.1.w2.weight";
    let shape = w.shape_of(hub).unwrap();
    let p = w
        .packed(hub, shape[0], shape[1], tandem_model::weights::Role::Linear)
        .unwrap();
    let kq = p.as_kquant().expect("a K-quant expert");
    let (_, range) = g.tensor_range(hub, &shape).unwrap();
    let map = g.mapping();
    let at = map.as_ptr() as usize + range.start;
    assert_eq!(kq.row(0).as_ptr() as usize, at, "not read in place");
    assert_eq!(kq.row(0), &map[range.start..range.start + kq.row(0).len()]);
    // Same values as the f32 model (dequantized), weight by weight.
    let fs = {
        let mut v = vec![
            ("embed".to_string(), &f32.embed),
            ("lm_head".to_string(), &f32.lm_head.w),
        ];
        for (l, layer) in f32.layers.iter().enumerate() {
            v.push((format!("{l}.qkv"), &layer.attention.w.qkv.w));
            v.push((format!("{l}.o"), &layer.attention.w.o.w));
            for (e, mlp) in layer.experts.routed.iter().enumerate() {
                let mlp = mlp.as_ref().unwrap();
                v.push((format!("{l}.expert{e}.gate_up"), &mlp.gate_up.w));
                v.push((format!("{l}.expert{e}.down"), &mlp.down.w));
            }
        }
        v
    };
    for (name, k) in &ks {
        let (_, f) = fs.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(f.weight_type(), WeightType::F32);
        assert!(
            k.unpack() == f.unpack(),
            "{name}: values differ from the f32 load"
        );
    }
    // The same greedy tokens: teacher-forced on the f32 model's, each step's logits close to
    // f32's and the same argmax wherever f32's top-2 margin is wider than twice the largest
    // logit difference (the activations' 8-bit rounding moves logits by ~0.1 on this model:
    // a near tie may flip, a clear choice may not).
    let steps = 12;
    let mut compared = 0;
    for prompt in [
        vec![0u32, 17, 95, 301, 4],
        vec![0, 250, 251, 7, 7, 9, 480],
        vec![3, 9, 27, 81, 243],
    ] {
        let (tokens, _) = greedy(&f32, &prompt, steps).unwrap();
        for i in 0..steps {
            let ctx: Vec<u32> = prompt.iter().chain(&tokens[..i]).copied().collect();
            let (_, want) = greedy(&f32, &ctx, 1).unwrap();
            let (_, got) = greedy(&native, &ctx, 1).unwrap();
            let c = cosine(&want, &got);
            assert!(c >= 0.999, "prompt {prompt:?} step {i}: cosine {c}");
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if top2_margin(&want) > 2.0 * diff {
                assert_eq!(argmax(&got), tokens[i], "prompt {prompt:?} step {i}");
                compared += 1;
            }
        }
    }
    assert!(compared >= 3 * steps / 2, "only {compared} clear steps");
}

fn argmax(x: &[f32]) -> u32 {
    tandem_model::generate::argmax(x)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += *x as f64 * *x as f64;
        bb += *y as f64 * *y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-30)
}

fn top2_margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}
