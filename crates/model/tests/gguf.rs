//! GGUF files made by llama.cpp's own converter from the fixtures (`fixtures/gguf/`, see
//! `fixtures/README.md`) against the safetensors checkpoints they were made from: the same
//! config, the same weights (f32 exactly; q8_0 block for block against tandem's own q8_0), the
//! same greedy tokens and the same tokenizer. Then the error paths: a truncated file, a tensor
//! type tandem does not read, and K-quant tensors dequantized.

// candle quantizes test tensors into blocks (an independent encoder); reading is ours.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tandem_model::generate::greedy;
use tandem_model::gguf_format::{Content, GgmlType, GgufWriter, Value};
use tandem_model::kquant::KFormat;
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
    let from_gguf = ModelConfig::from_dir(gguf("mixtral-f32.gguf")).unwrap();
    let from_dir = ModelConfig::from_dir(fixtures().join("mixtral")).unwrap();
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
    let model = Model::load(gguf("mixtral-f32.gguf")).unwrap();
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
    let model = Model::load(gguf("mixtral-q8_0.gguf")).unwrap();
    assert_eq!(model.weight_type(), WeightType::Q8_0);
    assert_same_weights(&model, &reference, "q8_0");
    check_tokens(&model, &reference, &exp, "q8_0");
    // Asking for q8_0 explicitly takes the same path.
    let again = Model::load_typed(
        gguf("mixtral-q8_0.gguf"),
        &ExpertSelection::All,
        LinearType::Is(WeightType::Q8_0),
    )
    .unwrap();
    assert_same_weights(&again, &reference, "q8_0 asked for");
    // Another type dequantizes the blocks: f32 holds exactly the q8_0 values.
    let f32 = Model::load_typed(
        gguf("mixtral-q8_0.gguf"),
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
        gguf("mixtral-q8_0.gguf"),
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

/// A tensor of a GGUF file: name, type, shape (PyTorch order), bytes.
type Tensorish = (String, GgmlType, Vec<usize>, Vec<u8>);

/// Rewrites `src` with tandem's writer, replacing the tensors `replace` changes.
fn rewrite(src: &Path, dst: &Path, replace: &dyn Fn(Tensorish) -> Tensorish) {
    let bytes = std::fs::read(src).unwrap();
    let content = Content::read(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &content.metadata {
        w.meta(k, v.clone());
    }
    for t in &content.tensors {
        let data = bytes[content.data_range(t)].to_vec();
        let (name, ty, shape, data) = replace((t.name.clone(), t.ggml_type, t.shape(), data));
        w.tensor(&name, ty, &shape, data).unwrap();
    }
    w.write_file(dst).unwrap();
}

/// `x` (`[rows, cols]`) quantized by candle to `ty`: the bytes of its blocks.
fn quantize(x: &[f32], rows: usize, cols: usize, ty: GgmlDType) -> Vec<u8> {
    let t = Tensor::from_vec(x.to_vec(), (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, ty).unwrap().data().unwrap().to_vec()
}

#[test]
fn rewritten_gguf_loads_the_same() {
    // The writer used by the error tests below keeps a valid file valid.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("copy.gguf");
    rewrite(&gguf("mixtral-f32.gguf"), &path, &|t| t);
    let a = Model::load(&path).unwrap();
    let b = Model::load(gguf("mixtral-f32.gguf")).unwrap();
    assert_same_weights(&a, &b, "rewritten");
}

#[test]
fn unsupported_tensor_type_names_the_tensor_and_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("iq4_nl.gguf");
    rewrite(&gguf("mixtral-f32.gguf"), &path, &|(n, ty, shape, b)| {
        if n == "blk.1.attn_v.weight" {
            // An IQ4_NL tensor: listed by the reader, not loaded.
            assert_eq!(ty, GgmlType::F32);
            let blocks = b.len() / 4 / 32 * GgmlType::IQ4_NL.type_size();
            (n, GgmlType::IQ4_NL, shape, vec![0x11; blocks])
        } else {
            (n, ty, shape, b)
        }
    });
    let err = match Model::load(&path) {
        Ok(_) => panic!("an IQ4_NL tensor loaded"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, ModelError::WrongDtype { .. }), "{err:?}");
    for part in [
        "blk.1.attn_v.weight",
        "IQ4_NL",
        "iq4_nl.gguf",
        "Q4_K, Q5_K, Q6_K",
    ] {
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
    for (dtype, ours, name, tol, ty) in [
        (
            GgmlDType::Q4K,
            GgmlType::Q4_K,
            "Q4_K",
            0.2f32,
            WeightType::Q4K,
        ),
        (
            GgmlDType::Q6K,
            GgmlType::Q6_K,
            "Q6_K",
            0.05,
            WeightType::Q6K,
        ),
        (GgmlDType::Q5K, GgmlType::Q5_K, "Q5_K", 0.1, WeightType::Q5K),
        (GgmlDType::Q2K, GgmlType::Q2_K, "Q2_K", 1.0, WeightType::F32),
        (GgmlDType::Q3K, GgmlType::Q3_K, "Q3_K", 0.5, WeightType::F32),
        (
            GgmlDType::Q4_1,
            GgmlType::Q4_1,
            "Q4_1",
            0.2,
            WeightType::F32,
        ),
        (
            GgmlDType::Q5_0,
            GgmlType::Q5_0,
            "Q5_0",
            0.2,
            WeightType::F32,
        ),
        (
            GgmlDType::Q5_1,
            GgmlType::Q5_1,
            "Q5_1",
            0.2,
            WeightType::F32,
        ),
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
        let mut gw = GgufWriter::new();
        gw.meta("general.architecture", Value::String("llama".into()));
        gw.tensor(
            "token_embd.weight",
            ours,
            &[v, d],
            quantize(&x, v, d, dtype),
        )
        .unwrap();
        gw.write_file(&path).unwrap();
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

// ---- deepseek2, glm4moe, gpt-oss, dbrx (`gguf_arch.rs`) ----

fn norm_values(n: &tandem_model::layers::Norm) -> Vec<f32> {
    match n {
        tandem_model::layers::Norm::Rms { w, eps }
        | tandem_model::layers::Norm::Layer { w, eps } => w.iter().copied().chain([*eps]).collect(),
    }
}

fn linear_values(l: &tandem_model::layers::Linear) -> Vec<f32> {
    let mut v = l.w.unpack();
    v.extend(l.b.iter().flatten());
    v
}

/// Every weight of a model as f32 values, named: linear weights and their biases, norms,
/// routers and their correction biases, sinks, MLA's parts, routed, shared and dense MLPs.
fn all_weights(m: &Model) -> Vec<(String, Vec<f32>)> {
    let mut v = vec![
        ("embed".to_string(), m.embed.unpack()),
        ("lm_head".to_string(), linear_values(&m.lm_head)),
        ("final_norm".to_string(), norm_values(&m.final_norm)),
    ];
    for (l, layer) in m.layers.iter().enumerate() {
        let a = &layer.attention.w;
        let mut put = |name: &str, x: Vec<f32>| v.push((format!("{l}.{name}"), x));
        put("input_norm", norm_values(&a.input_norm));
        put("post_norm", norm_values(&a.post_norm));
        put("qkv", linear_values(&a.qkv));
        put("o", linear_values(&a.o));
        for (name, n) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(n) = n {
                put(name, norm_values(n));
            }
        }
        if let Some(r) = &a.router {
            put("router", linear_values(r));
        }
        if let Some(b) = &a.router_bias {
            put("router_bias", b.clone());
        }
        if let Some(s) = &a.sinks {
            put("sinks", s.clone());
        }
        if let Some(mla) = &a.mla {
            put("kv_a_norm", norm_values(&mla.kv_a_norm));
            put("kv_b", linear_values(&mla.kv_b));
            put("kv_b_rows", mla.kv_b_rows.clone());
            put("mla_scale", vec![mla.scale]);
            if let Some(n) = &mla.q_a_norm {
                put("q_a_norm", norm_values(n));
            }
            if let Some(q) = &mla.q_b {
                put("q_b", linear_values(q));
            }
        }
        let x = &layer.experts;
        if let Some(g) = x.shared.as_ref().and_then(|s| s.gate.as_ref()) {
            v.push((format!("{l}.shared_gate"), linear_values(g)));
        }
        let mut mlp = |name: String, m: &tandem_model::layers::GatedMlp| {
            v.push((format!("{l}.{name}.gate_up"), linear_values(&m.gate_up)));
            v.push((format!("{l}.{name}.down"), linear_values(&m.down)));
        };
        // (a dense layer has no routed experts)
        for (e, r) in x.routed.iter().enumerate() {
            if let Some(r) = r {
                mlp(format!("expert{e}"), r);
            }
        }
        if let Some(s) = &x.shared {
            mlp("shared".into(), &s.mlp);
        }
        if let Some(d) = &x.dense {
            mlp("dense".into(), d);
        }
    }
    v
}

fn assert_same_model(a: &Model, b: &Model, what: &str) {
    let (wa, wb) = (all_weights(a), all_weights(b));
    let names = |w: &[(String, Vec<f32>)]| w.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&wa), names(&wb), "{what}: the weights present");
    for ((name, x), (_, y)) in wa.iter().zip(&wb) {
        assert_eq!(x.len(), y.len(), "{what}: {name} size");
        assert!(x == y, "{what}: {name} values differ");
    }
}

/// A copy of the fixture `family` with its config.json changed by `patch`.
fn patched_fixture(family: &str, patch: &dyn Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixtures().join(family)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tmp.path().join(f.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    patch(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tmp
}

fn config_value(path: &Path) -> serde_json::Value {
    serde_json::to_value(ModelConfig::from_dir(path).unwrap()).unwrap()
}

/// The GGUF file of `family` against the checkpoint `reference` it stands for: the same
/// config, every weight the same, the same greedy tokens and first logits as tandem on the
/// checkpoint, `greedy` (transformers' tokens), and the prompts' ids from its tokenizer.
fn check_arch(family: &str, reference: &Path, greedy_want: &[Vec<u32>]) {
    let path = gguf(&format!("{family}-f32.gguf"));
    let exp = expected(&fixtures().join(family));
    assert_eq!(
        config_value(&path),
        config_value(reference),
        "{family}: config"
    );
    let theirs = Model::load_typed(
        reference,
        &ExpertSelection::All,
        LinearType::Is(WeightType::F32),
    )
    .unwrap();
    let model = Model::load(&path).unwrap();
    assert_eq!(model.weight_type(), WeightType::F32, "{family}");
    assert_same_model(&model, &theirs, family);
    check_tokens(&model, &theirs, &exp, family);
    let tok = Tokenizer::load(&path).unwrap();
    for (i, p) in exp.prompts.iter().enumerate() {
        assert_eq!(
            tok.encode(&p.text, p.add_special_tokens).unwrap(),
            p.ids,
            "{family} prompt {i}: tokenizer"
        );
        let (toks, _) = greedy(&model, &p.ids, greedy_want[i].len()).unwrap();
        assert_eq!(
            toks, greedy_want[i],
            "{family} prompt {i}: transformers' tokens"
        );
    }
}

/// transformers' tokens for the checkpoint a GGUF file stands for where it differs from the
/// fixture (`scripts/gguf_expected.py`).
fn gguf_expected(family: &str) -> Vec<Vec<u32>> {
    let path = gguf(&format!("{family}.expected.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::from_value(v["greedy"].clone()).unwrap()
}

#[test]
fn dbrx_f32_gguf_gives_the_checkpoint_tokens() {
    // Fused Wqkv with clip_qkv, experts [E, F, D] and ffn_down_exps transposed back into w2.
    let dir = fixtures().join("dbrx");
    check_arch("dbrx", &dir, &expected(&dir).greedy);
}

#[test]
fn deepseek_v3_f32_gguf_gives_the_checkpoint_tokens() {
    // MLA with q LoRA, kv_b_proj rebuilt from attn_k_b / attn_v_b, sigmoid noaux_tc routing
    // with exp_probs_b, YaRN, shared expert, dense layer 0.
    let dir = fixtures().join("deepseek_v3");
    check_arch("deepseek_v3", &dir, &expected(&dir).greedy);
}

#[test]
fn glm4_moe_f32_gguf_gives_the_checkpoint_tokens() {
    // Partial rotary (rope.dimension_count 16 of 32), q/k/v biases, q/k norms, noaux_tc over
    // groups, the nextn layer counted in block_count.
    let dir = fixtures().join("glm4_moe");
    check_arch("glm4_moe", &dir, &expected(&dir).greedy);
}

#[test]
fn deepseek_v2_f32_gguf_is_the_checkpoint_with_mscale_as_llama_cpp_reads_it() {
    // The converter writes YaRN's mscale_all_dim (as yarn_log_multiplier) but not mscale;
    // llama.cpp takes mscale = mscale_all_dim (0.8) where the fixture says 1.0. Everything else
    // (MLA without q LoRA, softmax group_limited_greedy, 2 shared experts) is the checkpoint's.
    let gguf_cfg = config_value(&gguf("deepseek_v2-f32.gguf"));
    let mut fixture_cfg = config_value(&fixtures().join("deepseek_v2"));
    assert_eq!(fixture_cfg["yarn"]["mscale"], 1.0);
    assert_eq!(gguf_cfg["yarn"]["mscale"], 0.8);
    fixture_cfg["yarn"]["mscale"] = 0.8.into();
    assert_eq!(gguf_cfg, fixture_cfg, "deepseek_v2: config but for mscale");
    let reference = patched_fixture("deepseek_v2", &|c| {
        c["rope_parameters"]["mscale"] = c["rope_parameters"]["mscale_all_dim"].clone();
    });
    check_arch(
        "deepseek_v2",
        reference.path(),
        &gguf_expected("deepseek_v2"),
    );
}

#[test]
fn gpt_oss_f32_gguf_is_the_checkpoint_with_llama_cpp_swiglu() {
    // The converter does not write swiglu_alpha / swiglu_limit; llama.cpp uses 1.702 and 7.0
    // (the released models'), the fixture 1.5 and 1.5. Everything else (sinks, sliding
    // layers, gate/up interleaved back, down transposed back, biases, YaRN) is the
    // checkpoint's.
    let gguf_cfg = config_value(&gguf("gpt_oss-f32.gguf"));
    let mut fixture_cfg = config_value(&fixtures().join("gpt_oss"));
    assert_eq!(
        gguf_cfg["expert_act"],
        serde_json::json!({"ClampedSwiglu": {"alpha": 1.702f32, "limit": 7.0}})
    );
    fixture_cfg["expert_act"] = gguf_cfg["expert_act"].clone();
    assert_eq!(
        gguf_cfg, fixture_cfg,
        "gpt_oss: config but for the SwiGLU constants"
    );
    let reference = patched_fixture("gpt_oss", &|c| {
        c["swiglu_alpha"] = 1.702.into();
        c["swiglu_limit"] = 7.0.into();
    });
    check_arch("gpt_oss", reference.path(), &gguf_expected("gpt_oss"));
}

/// A GGUF file's metadata, in order.
type Metadata = Vec<(String, Value)>;

/// Rewrites `src` with its metadata changed by `edit` (the tensors as they are).
fn rewrite_meta(src: &Path, dst: &Path, edit: &dyn Fn(&mut Metadata)) {
    let bytes = std::fs::read(src).unwrap();
    let content = Content::read(&bytes).unwrap();
    let mut metadata: Metadata = content.metadata.clone();
    edit(&mut metadata);
    let mut w = GgufWriter::new();
    for (k, v) in &metadata {
        w.meta(k, v.clone());
    }
    for t in &content.tensors {
        let data = bytes[content.data_range(t)].to_vec();
        w.tensor(&t.name, t.ggml_type, &t.shape(), data).unwrap();
    }
    w.write_file(dst).unwrap();
}

fn set(m: &mut Metadata, key: &str, v: Option<Value>) {
    m.retain(|(k, _)| k != key);
    if let Some(v) = v {
        m.push((key.to_string(), v));
    }
}

#[test]
fn unserved_gguf_architecture_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("grok.gguf");
    rewrite_meta(&gguf("mixtral-f32.gguf"), &path, &|m| {
        set(
            m,
            "general.architecture",
            Some(Value::String("grok".into())),
        )
    });
    let err = Model::load(&path).err().expect("a grok file loaded");
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    for part in ["\"grok\"", "deepseek2", "glm4moe", "gpt-oss", "dbrx"] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
}

#[test]
fn wrong_metadata_of_the_new_architectures_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        // an unknown gating function
        (
            "deepseek_v3",
            "deepseek2.expert_gating_func",
            Some(Value::U32(3)),
            "deepseek2.expert_gating_func = 3",
        ),
        // softmax routing with a routing-correction bias
        (
            "deepseek_v3",
            "deepseek2.expert_gating_func",
            Some(Value::U32(1)),
            "exp_probs_b",
        ),
        // one of the two MLA head sizes
        (
            "deepseek_v2",
            "deepseek2.attention.value_length_mla",
            None,
            "deepseek2.attention.value_length_mla is missing",
        ),
        // the latent's width disagrees with kv_lora_rank + rope
        (
            "deepseek_v2",
            "deepseek2.attention.key_length",
            Some(Value::U32(41)),
            "deepseek2.attention.key_length = 41",
        ),
        // wider than a head
        (
            "glm4_moe",
            "glm4moe.rope.dimension_count",
            Some(Value::U32(40)),
            "glm4moe.rope.dimension_count = 40",
        ),
        // more nextn layers than blocks
        (
            "glm4_moe",
            "glm4moe.nextn_predict_layers",
            Some(Value::U32(4)),
            "glm4moe.nextn_predict_layers",
        ),
        // sliding layers without a window
        (
            "gpt_oss",
            "gpt-oss.attention.sliding_window",
            None,
            "gpt-oss.attention.sliding_window",
        ),
        // a YaRN file without its factor
        (
            "gpt_oss",
            "gpt-oss.rope.scaling.factor",
            None,
            "gpt-oss.rope.scaling.factor",
        ),
        (
            "dbrx",
            "dbrx.expert_used_count",
            None,
            "dbrx.expert_used_count is missing",
        ),
        // groups without the number of groups kept
        (
            "deepseek_v3",
            "deepseek2.expert_group_used_count",
            None,
            "deepseek2.expert_group_used_count is missing",
        ),
    ];
    for (i, (family, key, value, want)) in cases.into_iter().enumerate() {
        let path = tmp.path().join(format!("{i}.gguf"));
        rewrite_meta(&gguf(&format!("{family}-f32.gguf")), &path, &|m| {
            set(m, key, value.clone())
        });
        let err = ModelConfig::from_dir(&path)
            .expect_err(&format!("{family} without a valid {key} parsed"));
        let msg = err.to_string();
        assert!(msg.contains(want), "{family} {key}: {want:?} not in: {msg}");
        assert!(
            msg.contains(&format!("{i}.gguf")),
            "{family} {key}: the file is not named: {msg}"
        );
    }
}

#[test]
fn gpt_oss_mxfp4_gguf_gives_the_checkpoint_tokens() {
    // The converter keeps the experts' MXFP4 blocks (ggml type 39: gate and up split from
    // gate_up_proj's rows, scales moved into the blocks) and writes the rest as f32 (the
    // checkpoint's bf16 values exactly). As for gpt_oss, swiglu_limit is llama.cpp's 7.0 (the
    // fixture's 1.5 is not in the file).
    let path = gguf("gpt_oss_mxfp4.gguf");
    let exp = expected(&fixtures().join("gpt_oss_mxfp4"));
    let reference = patched_fixture("gpt_oss_mxfp4", &|c| {
        c["swiglu_limit"] = 7.0.into();
    });
    assert_eq!(
        config_value(&path),
        config_value(reference.path()),
        "config"
    );
    let f32 = |p: &Path| {
        Model::load_typed(p, &ExpertSelection::All, LinearType::Is(WeightType::F32)).unwrap()
    };
    let (model, theirs) = (f32(&path), f32(reference.path()));
    assert_same_model(&model, &theirs, "gpt_oss_mxfp4");
    check_tokens(&model, &theirs, &exp, "gpt_oss_mxfp4");
    let want = gguf_expected("gpt_oss_mxfp4");
    for (i, p) in exp.prompts.iter().enumerate() {
        let (toks, _) = greedy(&model, &p.ids, want[i].len()).unwrap();
        assert_eq!(
            toks, want[i],
            "gpt_oss_mxfp4 prompt {i}: transformers' tokens"
        );
    }
}

#[test]
fn quantized_tensors_that_are_rebuilt_are_dequantized_first() {
    // GPT-OSS's experts in Q8_0 (as in a requantized file): gate and up interleaved back and
    // down transposed back from the dequantized blocks; the oracle is candle's dequantization
    // of the same tensors, cut per expert by hand.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("experts-q8_0.gguf");
    rewrite(&gguf("gpt_oss-f32.gguf"), &path, &|(n, ty, shape, data)| {
        if n.ends_with("_exps.weight") {
            assert_eq!(ty, GgmlType::F32, "{n}");
            let x: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let cols = *shape.last().unwrap();
            let q = quantize(&x, x.len() / cols, cols, GgmlDType::Q8_0);
            (n, GgmlType::Q8_0, shape, q)
        } else {
            (n, ty, shape, data)
        }
    });
    let model = Model::load_typed(
        &path,
        &ExpertSelection::All,
        LinearType::Is(WeightType::F32),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let content = Content::read(&bytes).unwrap();
    let dequant = |name: &str| -> Vec<f32> {
        let t = content.tensor(name).unwrap();
        assert_eq!(t.ggml_type, GgmlType::Q8_0, "{name}");
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &bytes[content.data_range(t)],
            t.shape(),
            &Device::Cpu,
        )
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
    };
    let (d, ff) = (64usize, 64usize);
    for (l, layer) in model.layers.iter().enumerate() {
        let gate = dequant(&format!("blk.{l}.ffn_gate_exps.weight")); // [E, F, D]
        let up = dequant(&format!("blk.{l}.ffn_up_exps.weight")); // [E, F, D]
        let down = dequant(&format!("blk.{l}.ffn_down_exps.weight")); // [E, D, F]
        let n = ff * d;
        for (e, mlp) in layer.experts.routed.iter().enumerate() {
            let mlp = mlp.as_ref().unwrap();
            let want: Vec<f32> = gate[e * n..(e + 1) * n]
                .iter()
                .chain(&up[e * n..(e + 1) * n])
                .copied()
                .collect();
            assert!(
                mlp.gate_up.w.unpack() == want,
                "layer {l} expert {e}: gate/up"
            );
            assert!(
                mlp.down.w.unpack() == down[e * n..(e + 1) * n],
                "layer {l} expert {e}: down"
            );
        }
    }
}

#[test]
fn deepseek2_file_made_before_the_kv_b_split_loads_the_same() {
    // llama.cpp's converter wrote MLA's kv_b_proj whole (`attn_kv_b`) and the real head sizes
    // in key_length / value_length before it split it into attn_k_b / attn_v_b and added the
    // *_mla keys; such files are still common. Rebuild one from the deepseek_v2 file.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("old.gguf");
    let dir = fixtures().join("deepseek_v2");
    let hub = Weights::open(&dir).unwrap();
    let (h, nope, v, r, rope) = (4usize, 16usize, 12usize, 32usize, 8usize);
    let src = gguf("deepseek_v2-f32.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let content = Content::read(&bytes).unwrap();
    let mut metadata: Metadata = content.metadata.clone();
    set(&mut metadata, "deepseek2.attention.key_length_mla", None);
    set(&mut metadata, "deepseek2.attention.value_length_mla", None);
    set(
        &mut metadata,
        "deepseek2.attention.key_length",
        Some(Value::U32((nope + rope) as u32)),
    );
    set(
        &mut metadata,
        "deepseek2.attention.value_length",
        Some(Value::U32(v as u32)),
    );
    let mut w = GgufWriter::new();
    for (k, val) in &metadata {
        w.meta(k, val.clone());
    }
    for t in &content.tensors {
        if t.name.contains(".attn_k_b.") || t.name.contains(".attn_v_b.") {
            continue;
        }
        let data = bytes[content.data_range(t)].to_vec();
        w.tensor(&t.name, t.ggml_type, &t.shape(), data).unwrap();
    }
    for l in 0..3 {
        let kv_b = hub
            .get_vec(
                &format!("model.layers.{l}.self_attn.kv_b_proj.weight"),
                &[h * (nope + v), r],
            )
            .unwrap();
        let data: Vec<u8> = kv_b.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.tensor(
            &format!("blk.{l}.attn_kv_b.weight"),
            GgmlType::F32,
            &[h * (nope + v), r],
            data,
        )
        .unwrap();
    }
    w.write_file(&path).unwrap();
    assert_eq!(config_value(&path), config_value(&src));
    let old = Model::load(&path).unwrap();
    let new = Model::load(&src).unwrap();
    assert_same_model(&old, &new, "attn_kv_b vs attn_k_b + attn_v_b");
}

/// F16, BF16 and Q4_0 tensors in a file (llama.cpp's converter writes the fixtures in F32 and
/// Q8_0 only): the mixtral file rewritten with `attn_output` in F16, the experts' `down` in
/// BF16 and `output` in Q4_0 (blocks by candle's quantizer). Each loads under `auto` as its
/// values: F16 widened to f32 exactly, BF16 kept as bf16, Q4_0 kept in its blocks, equal to
/// candle's dequantization of them; everything else as the F32 file.
#[test]
fn f16_bf16_and_q4_0_tensors_in_a_file_load_as_their_values() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mixed.gguf");
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    rewrite(&gguf("mixtral-f32.gguf"), &path, &|(n, ty, shape, data)| {
        if ty != GgmlType::F32 {
            return (n, ty, shape, data);
        }
        let x = f32s(&data);
        if n.ends_with(".attn_output.weight") {
            let b = x
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            (n, GgmlType::F16, shape, b)
        } else if n.ends_with(".ffn_down_exps.weight") {
            let b = x
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            (n, GgmlType::BF16, shape, b)
        } else if n == "output.weight" {
            let cols = *shape.last().unwrap();
            let q = quantize(&x, x.len() / cols, cols, GgmlDType::Q4_0);
            (n, GgmlType::Q4_0, shape, q)
        } else {
            (n, ty, shape, data)
        }
    });
    let mixed = Model::load(&path).unwrap();
    let f32_model = Model::load(gguf("mixtral-f32.gguf")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let content = Content::read(&bytes).unwrap();
    let (mut f16s, mut bf16s, mut q4s) = (0, 0, 0);
    for ((name, got), (_, want)) in weights_of(&mixed).into_iter().zip(weights_of(&f32_model)) {
        let w = want.unpack();
        let g = got.unpack();
        if name.ends_with(".o") {
            f16s += 1;
            assert_eq!(got.weight_type(), WeightType::F32, "{name}");
            let r: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            assert!(g == r, "{name}: not the f16 values");
        } else if name.ends_with(".down") {
            bf16s += 1;
            assert_eq!(got.weight_type(), WeightType::Bf16, "{name}");
            let r: Vec<f32> = w
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect();
            assert!(g == r, "{name}: not the bf16 values");
        } else if name == "lm_head" {
            q4s += 1;
            assert_eq!(got.weight_type(), WeightType::Q4_0, "{name}");
            let t = content.tensor("output.weight").unwrap();
            assert_eq!(t.ggml_type, GgmlType::Q4_0);
            let r: Vec<f32> = candle_core::quantized::ggml_file::qtensor_from_ggml(
                GgmlDType::Q4_0,
                &bytes[content.data_range(t)],
                t.shape(),
                &Device::Cpu,
            )
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
            assert!(
                g == r,
                "{name}: not candle's dequantization of the Q4_0 blocks"
            );
            assert!(g != w, "{name}: Q4_0 cannot be exact on these weights");
        } else {
            assert!(g == w, "{name}: changed");
        }
    }
    assert!(f16s > 0 && bf16s > 0 && q4s == 1, "{f16s} {bf16s} {q4s}");
}

/// `qwen3moe` (its own routing branch: top-k renormalised by default, per-head q/k norms,
/// `head_dim` apart from hidden / heads). llama.cpp's converter refuses the qwen3_moe
/// fixture (its dense layer 1 has no `qwen3moe` tensor name), so this file is written here,
/// in the converter's names and metadata keys, from the checkpoint's tensors: the routed
/// layers' experts stacked `[E, F, D]`, the dense layer as `ffn_gate`/`ffn_up`/`ffn_down`.
/// The config, every weight and the greedy tokens of transformers (`expected.json`) must
/// come out of it.
#[test]
fn qwen3moe_gguf_written_in_llama_cpp_names_gives_the_checkpoint_tokens() {
    let dir = fixtures().join("qwen3_moe");
    let hub = Weights::open(&dir).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let w = qwen3moe_gguf(&hub);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen3moe-f32.gguf");
    w.write_file(&path).unwrap();
    let ours = serde_json::to_value(ModelConfig::from_dir(&path).unwrap()).unwrap();
    assert_eq!(ours, serde_json::to_value(&cfg).unwrap(), "config");
    let reference =
        Model::load_typed(&dir, &ExpertSelection::All, LinearType::Is(WeightType::F32)).unwrap();
    let model = Model::load(&path).unwrap();
    assert_same_model(&model, &reference, "qwen3moe");
    let exp = expected(&dir);
    check_tokens(&model, &reference, &exp, "qwen3moe");
    for (i, p) in exp.prompts.iter().enumerate() {
        let (toks, _) = greedy(&model, &p.ids, exp.greedy[i].len()).unwrap();
        assert_eq!(
            toks, exp.greedy[i],
            "qwen3moe prompt {i}: transformers' tokens"
        );
    }
}

/// The qwen3_moe fixture's sizes: hidden, heads, kv heads, head_dim, experts, expert ff,
/// dense ff, layers, vocab.
const Q3M: Q3mDims = Q3mDims {
    d: 64,
    heads: 4,
    kv: 2,
    hd: 32,
    experts: 8,
    moe_ff: 32,
    ff: 96,
    layers: 3,
    vocab: 512,
};

struct Q3mDims {
    d: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    experts: usize,
    moe_ff: usize,
    ff: usize,
    layers: usize,
    vocab: usize,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Copies the checkpoint tensor `hub_name` into the file as the f32 tensor `name`.
fn put_f32(w: &mut GgufWriter, hub: &Weights, name: &str, hub_name: &str, shape: &[usize]) {
    let v = hub.get_vec(hub_name, shape).unwrap();
    w.tensor(name, GgmlType::F32, shape, f32_bytes(&v)).unwrap();
}

/// The qwen3_moe checkpoint as llama.cpp's converter would name it: metadata, embeddings,
/// final norm and head, then every layer.
fn qwen3moe_gguf(hub: &Weights) -> GgufWriter<'static> {
    let Q3mDims { d, vocab, .. } = Q3M;
    let mut w = GgufWriter::new();
    qwen3moe_meta(&mut w);
    put_f32(
        &mut w,
        hub,
        "token_embd.weight",
        "model.embed_tokens.weight",
        &[vocab, d],
    );
    put_f32(&mut w, hub, "output_norm.weight", "model.norm.weight", &[d]);
    put_f32(&mut w, hub, "output.weight", "lm_head.weight", &[vocab, d]);
    for l in 0..Q3M.layers {
        qwen3moe_layer(&mut w, hub, l);
    }
    w
}

/// The `qwen3moe.*` metadata keys and the bos/eos ids.
fn qwen3moe_meta(w: &mut GgufWriter) {
    let Q3mDims {
        d,
        heads,
        kv,
        hd,
        experts,
        moe_ff,
        ff,
        layers,
        ..
    } = Q3M;
    let a = "qwen3moe";
    w.meta("general.architecture", Value::String(a.into()));
    for (k, v) in [
        ("block_count", layers),
        ("context_length", 512),
        ("embedding_length", d),
        ("feed_forward_length", ff),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv),
        ("attention.key_length", hd),
        ("attention.value_length", hd),
        ("rope.dimension_count", hd),
        ("expert_count", experts),
        ("expert_used_count", 2),
        ("expert_feed_forward_length", moe_ff),
    ] {
        w.meta(&format!("{a}.{k}"), Value::U32(v as u32));
    }
    w.meta(&format!("{a}.rope.freq_base"), Value::F32(1e6));
    w.meta(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-6),
    );
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(0));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(1));
}

/// Layer `l`: norms and attention (with per-head q/k norms), then the dense MLP for layer 1
/// or the router and the experts stacked `[E, F, D]` for the routed layers.
fn qwen3moe_layer(w: &mut GgufWriter, hub: &Weights, l: usize) {
    let Q3mDims {
        d,
        heads,
        kv,
        hd,
        experts,
        moe_ff,
        ff,
        ..
    } = Q3M;
    let p = format!("model.layers.{l}");
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_norm.weight"),
        &format!("{p}.input_layernorm.weight"),
        &[d],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.ffn_norm.weight"),
        &format!("{p}.post_attention_layernorm.weight"),
        &[d],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_q.weight"),
        &format!("{p}.self_attn.q_proj.weight"),
        &[heads * hd, d],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_k.weight"),
        &format!("{p}.self_attn.k_proj.weight"),
        &[kv * hd, d],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_v.weight"),
        &format!("{p}.self_attn.v_proj.weight"),
        &[kv * hd, d],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_output.weight"),
        &format!("{p}.self_attn.o_proj.weight"),
        &[d, heads * hd],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_q_norm.weight"),
        &format!("{p}.self_attn.q_norm.weight"),
        &[hd],
    );
    put_f32(
        w,
        hub,
        &format!("blk.{l}.attn_k_norm.weight"),
        &format!("{p}.self_attn.k_norm.weight"),
        &[hd],
    );
    if l == 1 {
        put_f32(
            w,
            hub,
            &format!("blk.{l}.ffn_gate.weight"),
            &format!("{p}.mlp.gate_proj.weight"),
            &[ff, d],
        );
        put_f32(
            w,
            hub,
            &format!("blk.{l}.ffn_up.weight"),
            &format!("{p}.mlp.up_proj.weight"),
            &[ff, d],
        );
        put_f32(
            w,
            hub,
            &format!("blk.{l}.ffn_down.weight"),
            &format!("{p}.mlp.down_proj.weight"),
            &[d, ff],
        );
        return;
    }
    put_f32(
        w,
        hub,
        &format!("blk.{l}.ffn_gate_inp.weight"),
        &format!("{p}.mlp.gate.weight"),
        &[experts, d],
    );
    for (gg, which, shape) in [
        ("ffn_gate_exps", "gate_proj", [moe_ff, d]),
        ("ffn_up_exps", "up_proj", [moe_ff, d]),
        ("ffn_down_exps", "down_proj", [d, moe_ff]),
    ] {
        let mut all = Vec::new();
        for e in 0..experts {
            all.extend(
                hub.get_vec(&format!("{p}.mlp.experts.{e}.{which}.weight"), &shape)
                    .unwrap(),
            );
        }
        w.tensor(
            &format!("blk.{l}.{gg}.weight"),
            GgmlType::F32,
            &[experts, shape[0], shape[1]],
            f32_bytes(&all),
        )
        .unwrap();
    }
}

/// The bytes of every `blk.*.ffn_*_exps.*` tensor of a GGUF file (weights and biases).
fn expert_tensor_bytes(path: &Path, weights_only: bool) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let content = Content::read(&bytes).unwrap();
    content
        .tensors
        .iter()
        .filter(|t| t.name.contains("_exps.") && (!weights_only || t.name.ends_with(".weight")))
        .map(|t| content.data_range(t).len())
        .sum()
}

#[test]
fn gpt_oss_mxfp4_gguf_experts_are_held_as_mxfp4_in_the_mapped_file() {
    // As the hub ships GPT-OSS: the experts' MXFP4 blocks (ggml type 39) used where the file
    // is mapped, gate and up as two segments of one stack, no f32 copy.
    let path = gguf("gpt_oss_mxfp4.gguf");
    let w = Weights::open(&path).unwrap();
    let g = w.gguf().unwrap();
    let cfg = ModelConfig::from_gguf(g).unwrap();
    let model = Model::from_weights(cfg.clone(), &w, &path, &ExpertSelection::All).unwrap();
    let (d, f) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let map = g.mapping();
    let content = g.content();
    let mut experts = 0;
    for (l, layer) in model.layers.iter().enumerate() {
        for (e, mlp) in layer.experts.routed.iter().enumerate() {
            let mlp = mlp.as_ref().unwrap();
            assert_eq!(mlp.gate_up.weight_type(), WeightType::Mxfp4, "{l}.{e}");
            assert_eq!(mlp.down.weight_type(), WeightType::Mxfp4, "{l}.{e}");
            let gu = mlp.gate_up.w.as_kquant().expect("gate_up in MXFP4 blocks");
            let dn = mlp.down.w.as_kquant().expect("down in MXFP4 blocks");
            assert_eq!(
                gu.segments(),
                2,
                "{l}.{e}: gate and up stacked without a copy"
            );
            assert_eq!(gu.formats(), vec![(KFormat::Mxfp4, 2 * f)]);
            assert_eq!(dn.formats(), vec![(KFormat::Mxfp4, d)]);
            // Row 0 of gate, up and down: expert e's first row of the stacked tensor, in place.
            for (tensor, kq, row) in [
                ("ffn_gate_exps", gu, 0),
                ("ffn_up_exps", gu, f),
                ("ffn_down_exps", dn, 0),
            ] {
                let t = content.tensor(&format!("blk.{l}.{tensor}.weight")).unwrap();
                assert_eq!(t.ggml_type, GgmlType::MXFP4);
                let range = content.data_range(t);
                let per_expert = range.len() / cfg.num_experts;
                let at = range.start + e * per_expert;
                let got = kq.row(row);
                assert_eq!(
                    got.as_ptr() as usize,
                    map.as_ptr() as usize + at,
                    "{l}.{e} {tensor}: not read in place"
                );
                assert_eq!(got, &map[at..at + got.len()]);
            }
            experts += 1;
        }
    }
    assert_eq!(experts, cfg.num_layers * cfg.num_experts);
    // The weights' accounting: the experts are exactly the file's MXFP4 bytes.
    let mem = model.weight_memory();
    assert_eq!(
        mem.by_type.get("mxfp4").copied(),
        Some(expert_tensor_bytes(&path, true)),
        "{:?}",
        mem.by_type
    );
    // The values are the f32 load's (which the test above checks against transformers).
    let f32 = Model::load_typed(
        &path,
        &ExpertSelection::All,
        LinearType::Is(WeightType::F32),
    )
    .unwrap();
    for ((name, x), (_, y)) in weights_of(&model).iter().zip(&weights_of(&f32)) {
        assert!(
            x.unpack() == y.unpack(),
            "{name}: values differ from the f32 load"
        );
    }
    // And it runs: each step's logits (teacher-forced on the f32 model's tokens) close to the
    // f32 model's (cosine >= 0.999 but where a near tie among this tiny model's router logits
    // picks another expert: measured 0.9996 or more on 35 of 36 steps, 0.976 on one), the same
    // argmax where f32's choice is clear (the MXFP4 kernels round the activations to 8 bits).
    let exp = expected(&fixtures().join("gpt_oss_mxfp4"));
    let (mut clear, mut close, mut steps_run) = (0, 0, 0);
    for p in &exp.prompts {
        let steps = 6;
        let (tokens, _) = greedy(&f32, &p.ids, steps).unwrap();
        for i in 0..steps {
            let ctx: Vec<u32> = p.ids.iter().chain(&tokens[..i]).copied().collect();
            let (_, want) = greedy(&f32, &ctx, 1).unwrap();
            let (_, got) = greedy(&model, &ctx, 1).unwrap();
            let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
            let mut diff = 0f32;
            for (a, b) in want.iter().zip(&got) {
                ab += *a as f64 * *b as f64;
                aa += *a as f64 * *a as f64;
                bb += *b as f64 * *b as f64;
                diff = diff.max((a - b).abs());
            }
            let cos = ab / (aa.sqrt() * bb.sqrt()).max(1e-30);
            assert!(cos >= 0.95, "{:?} step {i}: cosine {cos}", p.text);
            close += usize::from(cos >= 0.999);
            steps_run += 1;
            let mut sorted = want.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * diff {
                assert_eq!(
                    tandem_model::generate::argmax(&got),
                    tokens[i],
                    "{:?} step {i}",
                    p.text
                );
                clear += 1;
            }
        }
    }
    assert!(clear >= exp.prompts.len() * 3, "only {clear} clear steps");
    assert!(
        close * 10 >= steps_run * 9,
        "{close} of {steps_run} steps close to f32"
    );
}

#[test]
fn gpt_oss_mxfp4_gguf_memory_estimate_counts_experts_at_their_file_size() {
    // `check_fits` decides from this estimate: the MXFP4 experts count as their blocks in the
    // file (not rebuilt in f32), the selected experts' share of them. (The small `[E, F]`
    // biases count whole whatever the selection, as the loader reads them.)
    use tandem_model::model::estimate_resident_bytes;
    let path = gguf("gpt_oss_mxfp4.gguf");
    let w = Weights::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(w.gguf().unwrap()).unwrap();
    let est = |sel: &ExpertSelection| estimate_resident_bytes(&cfg, &w, sel, LinearType::Auto);
    let (all, none) = (est(&ExpertSelection::All), est(&ExpertSelection::None));
    assert_eq!(
        (all - none) as usize,
        expert_tensor_bytes(&path, true),
        "the experts' part of the estimate"
    );
    // Half the experts: half of them.
    let half: Vec<u32> = (0..cfg.num_experts as u32 / 2).collect();
    assert_eq!(
        (est(&ExpertSelection::Only(half)) - none) as usize,
        expert_tensor_bytes(&path, true) / 2
    );
}
