//! GGUF files made by llama.cpp's own converter from the fixtures (`fixtures/gguf/`, see
//! `fixtures/README.md`) against the safetensors checkpoints they were made from: the same
//! config, the same weights (f32 exactly; q8_0 block for block against tandem's own q8_0), the
//! same greedy tokens and the same tokenizer. Then the error paths: a truncated file, a tensor
//! type tandem does not read, and K-quant tensors dequantized.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tandem_model::generate::greedy;
use tandem_model::model::ExpertSelection;
use tandem_model::packed::PackedWeights;
use tandem_model::weights::{LinearType, Weights};
use tandem_model::{Model, ModelConfig, ModelError, Tokenizer, WeightType};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn gguf(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

struct Prompt {
    text: String,
    ids: Vec<u32>,
    add_special_tokens: bool,
}

struct Expected {
    prompts: Vec<Prompt>,
    greedy: Vec<Vec<u32>>,
}

fn expected(dir: &Path) -> Expected {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Expected {
        prompts: v["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Prompt {
                text: p["text"].as_str().unwrap().to_string(),
                ids: serde_json::from_value(p["ids"].clone()).unwrap(),
                add_special_tokens: p["add_special_tokens"].as_bool().unwrap_or(true),
            })
            .collect(),
        greedy: serde_json::from_value(v["greedy"].clone()).unwrap(),
    }
}

/// Every packed weight of a model, named, in a fixed order.
fn weights_of(m: &Model) -> Vec<(String, &PackedWeights)> {
    let mut v = vec![
        ("embed".to_string(), &m.embed),
        ("lm_head".to_string(), &m.lm_head.w),
    ];
    for (l, layer) in m.layers.iter().enumerate() {
        let a = &layer.attention.w;
        v.push((format!("{l}.qkv"), &a.qkv.w));
        v.push((format!("{l}.o"), &a.o.w));
        if let Some(r) = &a.router {
            v.push((format!("{l}.router"), &r.w));
        }
        for (e, mlp) in layer.experts.routed.iter().enumerate() {
            let mlp = mlp.as_ref().expect("all experts loaded");
            v.push((format!("{l}.expert{e}.gate_up"), &mlp.gate_up.w));
            v.push((format!("{l}.expert{e}.down"), &mlp.down.w));
        }
    }
    v
}

fn assert_same_weights(a: &Model, b: &Model, what: &str) {
    let (wa, wb) = (weights_of(a), weights_of(b));
    assert_eq!(wa.len(), wb.len(), "{what}: weight count");
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        assert_eq!(x.weight_type(), y.weight_type(), "{what}: {name} type");
        assert_eq!((x.n(), x.k()), (y.n(), y.k()), "{what}: {name} shape");
        assert!(x.unpack() == y.unpack(), "{what}: {name} values differ");
    }
}

fn check_tokens(gguf_model: &Model, reference: &Model, exp: &Expected, what: &str) {
    for (i, p) in exp.prompts.iter().enumerate() {
        let n = exp.greedy[i].len();
        let (ours, our_logits) = greedy(gguf_model, &p.ids, n).unwrap();
        let (theirs, their_logits) = greedy(reference, &p.ids, n).unwrap();
        assert_eq!(
            ours, theirs,
            "{what} prompt {i}: greedy tokens vs safetensors"
        );
        assert!(
            our_logits == their_logits,
            "{what} prompt {i}: first logits differ from safetensors'"
        );
    }
}

#[test]
fn mixtral_gguf_config_is_the_checkpoint_config() {
    let from_gguf = ModelConfig::from_dir(&gguf("mixtral-f32.gguf")).unwrap();
    let from_dir = ModelConfig::from_dir(&fixtures().join("mixtral")).unwrap();
    assert_eq!(
        serde_json::to_value(&from_gguf).unwrap(),
        serde_json::to_value(&from_dir).unwrap()
    );
}

#[test]
fn mixtral_f32_gguf_gives_the_checkpoint_tokens() {
    let dir = fixtures().join("mixtral");
    let exp = expected(&dir);
    let reference = Model::load(&dir).unwrap();
    let model = Model::load(&gguf("mixtral-f32.gguf")).unwrap();
    assert_eq!(model.weight_type(), WeightType::F32);
    // Same values, so llama.cpp's q/k row permutation was undone exactly.
    assert_same_weights(&model, &reference, "f32");
    check_tokens(&model, &reference, &exp, "f32");
    for (i, p) in exp.prompts.iter().enumerate() {
        let (toks, _) = greedy(&model, &p.ids, exp.greedy[i].len()).unwrap();
        assert_eq!(toks, exp.greedy[i], "f32 prompt {i}: transformers' tokens");
    }
}

#[test]
fn mixtral_q8_0_gguf_is_tandem_q8_0_block_for_block() {
    let dir = fixtures().join("mixtral");
    let exp = expected(&dir);
    let reference = Model::load_typed(
        &dir,
        &ExpertSelection::All,
        LinearType::Is(WeightType::Q8_0),
    )
    .unwrap();
    // Under `auto` the file's q8_0 blocks are kept as they are.
    let model = Model::load(&gguf("mixtral-q8_0.gguf")).unwrap();
    assert_eq!(model.weight_type(), WeightType::Q8_0);
    assert_same_weights(&model, &reference, "q8_0");
    check_tokens(&model, &reference, &exp, "q8_0");
    // Asking for q8_0 explicitly takes the same path.
    let again = Model::load_typed(
        &gguf("mixtral-q8_0.gguf"),
        &ExpertSelection::All,
        LinearType::Is(WeightType::Q8_0),
    )
    .unwrap();
    assert_same_weights(&again, &reference, "q8_0 asked for");
    // Another type dequantizes the blocks: f32 holds exactly the q8_0 values.
    let f32 = Model::load_typed(
        &gguf("mixtral-q8_0.gguf"),
        &ExpertSelection::All,
        LinearType::Is(WeightType::F32),
    )
    .unwrap();
    assert_eq!(f32.weight_type(), WeightType::F32);
    for ((name, x), (_, y)) in weights_of(&f32).iter().zip(&weights_of(&model)) {
        assert!(
            x.unpack() == y.unpack(),
            "q8_0 -> f32: {name} values differ"
        );
    }
}

#[test]
fn expert_selection_loads_only_those_experts_from_gguf() {
    let m = Model::load_with(
        &gguf("mixtral-q8_0.gguf"),
        &ExpertSelection::Only(vec![1, 6]),
    )
    .unwrap();
    for layer in &m.layers {
        let loaded: Vec<usize> = (0..8)
            .filter(|e| layer.experts.routed[*e].is_some())
            .collect();
        assert_eq!(loaded, vec![1, 6]);
    }
}

#[test]
fn gguf_tokenizer_is_the_checkpoint_tokenizer() {
    let dir = fixtures().join("mixtral");
    let exp = expected(&dir);
    let hub = Tokenizer::load(&dir).unwrap();
    for file in ["mixtral-f32.gguf", "mixtral-q8_0.gguf"] {
        let path = gguf(file);
        assert!(Tokenizer::exists_at(&path));
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!(tok.vocab_size(), hub.vocab_size(), "{file}");
        for (i, p) in exp.prompts.iter().enumerate() {
            let ids = tok.encode(&p.text, p.add_special_tokens).unwrap();
            assert_eq!(ids, p.ids, "{file} prompt {i}: expected.json ids");
            assert_eq!(
                ids,
                hub.encode(&p.text, p.add_special_tokens).unwrap(),
                "{file} prompt {i}"
            );
            let all: Vec<u32> = ids.iter().chain(&exp.greedy[i]).copied().collect();
            for skip in [false, true] {
                assert_eq!(
                    tok.decode(&all, skip).unwrap(),
                    hub.decode(&all, skip).unwrap(),
                    "{file} prompt {i}: decode (skip special {skip})"
                );
            }
        }
        assert_eq!(tok.bos_token, hub.bos_token, "{file}");
        assert_eq!(tok.eos_token, hub.eos_token, "{file}");
        assert_eq!(tok.eos_token_id(), Some(1), "{file}");
        assert_eq!(tok.chat_template, hub.chat_template, "{file}");
        let msgs = [tandem_model::tokenizer::ChatMessage {
            role: "user".into(),
            content: "What is a mixture of experts?".into(),
        }];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            hub.apply_chat_template(&msgs, true).unwrap()
        );
    }
}

/// Rewrites `src` with candle's writer, replacing the tensors `replace` names.
fn rewrite(src: &Path, dst: &Path, replace: &dyn Fn(&str, QTensor) -> QTensor) {
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, QTensor)> = names
        .iter()
        .map(|n| {
            let t = content.tensor(&mut f, n, &Device::Cpu).unwrap();
            (n.as_str(), replace(n, t))
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &metadata, &refs).unwrap();
}

#[test]
fn rewritten_gguf_loads_the_same() {
    // The writer used by the error tests below keeps a valid file valid.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("copy.gguf");
    rewrite(&gguf("mixtral-f32.gguf"), &path, &|_, t| t);
    let a = Model::load(&path).unwrap();
    let b = Model::load(&gguf("mixtral-f32.gguf")).unwrap();
    assert_same_weights(&a, &b, "rewritten");
}

#[test]
fn unsupported_tensor_type_names_the_tensor_and_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q4_1.gguf");
    rewrite(&gguf("mixtral-f32.gguf"), &path, &|n, t| {
        if n == "blk.1.attn_v.weight" {
            let x = t.dequantize(&Device::Cpu).unwrap();
            QTensor::quantize(&x, GgmlDType::Q4_1).unwrap()
        } else {
            t
        }
    });
    let err = match Model::load(&path) {
        Ok(_) => panic!("a Q4_1 tensor loaded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, ModelError::WrongDtype { .. }), "{err:?}");
    for part in ["blk.1.attn_v.weight", "Q4_1", "q4_1.gguf"] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
}

#[test]
fn truncated_gguf_names_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("mixtral-q8_0.gguf")).unwrap();
    // Cut in the tensor data: the tensor that no longer fits is named.
    let path = tmp.path().join("cut.gguf");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    for err in [
        Model::load(&path).err().expect("a truncated file loaded"),
        Weights::open(&path).err().expect("a truncated file opened"),
    ] {
        let msg = err.to_string();
        assert!(
            matches!(&err, ModelError::CorruptFile { path: p, .. } if p == &path),
            "{err:?}"
        );
        assert!(
            msg.contains("truncated") && msg.contains("tensor "),
            "{msg}"
        );
    }
    // Cut in the header (the tokenizer's strings): the file is named.
    let path = tmp.path().join("header.gguf");
    std::fs::write(&path, &bytes[..2000]).unwrap();
    let err = ModelConfig::from_dir(&path).expect_err("a cut header parsed");
    assert!(
        matches!(&err, ModelError::CorruptFile { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert!(Tokenizer::load(&path).is_err());
    // A missing file is an I/O error naming it.
    let missing = tmp.path().join("missing.gguf");
    let err = Model::load(&missing).err().expect("a missing file loaded");
    assert!(
        matches!(&err, ModelError::Io { path: p, .. } if p == &missing),
        "{err:?}"
    );
}

#[test]
fn k_quants_are_dequantized() {
    // Q4_K, Q5_K and Q6_K blocks are 256 values wide, wider than the fixtures' rows: a file with
    // one such embedding table checks the mapping and dequantization, against candle's own.
    let tmp = tempfile::tempdir().unwrap();
    let (v, d) = (4usize, 512usize);
    let x: Vec<f32> = (0..v * d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let t = Tensor::from_vec(x.clone(), (v, d), &Device::Cpu).unwrap();
    for (dtype, name, tol, ty) in [
        (GgmlDType::Q4K, "Q4_K", 0.2f32, WeightType::Q4K),
        (GgmlDType::Q5K, "Q5_K", 0.1, WeightType::Q5K),
        (GgmlDType::Q6K, "Q6_K", 0.05, WeightType::Q6K),
    ] {
        let q = QTensor::quantize(&t, dtype).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let path = tmp.path().join(format!("{name}.gguf"));
        let arch = Value::String("llama".into());
        let mut out = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut out,
            &[("general.architecture", &arch)],
            &[("token_embd.weight", &q)],
        )
        .unwrap();
        drop(out);
        let w = Weights::open(&path).unwrap();
        assert_eq!(
            w.dtype_of("model.embed_tokens.weight").as_deref(),
            Some(name)
        );
        let got = w.get_vec("model.embed_tokens.weight", &[v, d]).unwrap();
        assert_eq!(got, want, "{name}");
        let err = got
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < tol, "{name}: max error {err}");
        // Held in its own blocks under `auto` (the kernels of `kquant`).
        let p = w
            .packed(
                "model.embed_tokens.weight",
                v,
                d,
                tandem_model::weights::Role::Embedding,
            )
            .unwrap();
        assert_eq!(p.weight_type(), ty);
        assert!(p.unpack() == want);
        // A wrong shape names the tensor and the file.
        let err = w.get_vec("model.embed_tokens.weight", &[d, v]).unwrap_err();
        assert!(matches!(err, ModelError::WrongShape { .. }), "{err:?}");
        assert!(err.to_string().contains("token_embd.weight"), "{err}");
    }
}

/// Another family's f32 GGUF against its checkpoint: config, weights, tokens, tokenizer.
fn check_f32_family(family: &str) {
    let dir = fixtures().join(family);
    let path = gguf(&format!("{family}-f32.gguf"));
    let exp = expected(&dir);
    let mut ours = serde_json::to_value(ModelConfig::from_dir(&path).unwrap()).unwrap();
    let theirs = serde_json::to_value(ModelConfig::from_dir(&dir).unwrap()).unwrap();
    // The olmoe fixture's config.json says `bos_token_id: null`; the converter records the
    // tokenizer's BOS (0) instead. Nothing reads it at run time.
    if theirs["bos_token_id"].is_null() {
        assert_eq!(ours["bos_token_id"], 0, "{family}");
        ours["bos_token_id"] = serde_json::Value::Null;
    }
    assert_eq!(ours, theirs, "{family}: config");
    let reference =
        Model::load_typed(&dir, &ExpertSelection::All, LinearType::Is(WeightType::F32)).unwrap();
    let model = Model::load(&path).unwrap();
    assert_same_weights(&model, &reference, family);
    check_tokens(&model, &reference, &exp, family);
    let tok = Tokenizer::load(&path).unwrap();
    for (i, p) in exp.prompts.iter().enumerate() {
        assert_eq!(
            tok.encode(&p.text, p.add_special_tokens).unwrap(),
            p.ids,
            "{family} prompt {i}: tokenizer"
        );
        let (toks, _) = greedy(&model, &p.ids, exp.greedy[i].len()).unwrap();
        assert_eq!(
            toks, exp.greedy[i],
            "{family} prompt {i}: transformers' tokens"
        );
    }
}

#[test]
fn olmoe_f32_gguf_gives_the_checkpoint_tokens() {
    check_f32_family("olmoe");
}

#[test]
fn qwen2_moe_f32_gguf_gives_the_checkpoint_tokens() {
    // The checkpoint is bf16; the converter writes its values exactly as f32.
    check_f32_family("qwen2_moe");
}
