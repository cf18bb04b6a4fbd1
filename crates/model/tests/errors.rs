//! Error paths of checkpoint loading. Each test copies a committed fixture (fixtures/*) into a
//! temporary directory, breaks one thing, and checks that loading fails with the right
//! [`ModelError`] variant and a message that names the culprit (tensor, file, config key,
//! model_type).
//!
//! Safetensors files are read and rewritten by hand here (8-byte little-endian header length,
//! JSON header with dtype / shape / data_offsets, then the data), so a test can drop a tensor
//! or change its recorded shape or dtype while keeping the file otherwise valid.

use serde_json::{json, Map, Value};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use tandem_model::model::ExpertSelection;
use tandem_model::weights::Weights;
use tandem_model::{Model, ModelConfig, ModelError, Tokenizer};
use tempfile::TempDir;

const FAMILIES: [&str; 5] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// A private copy of `fixtures/{name}`.
fn copy_fixture(name: &str) -> TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(fixture(name)).expect("read fixture dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), tmp.path().join(e.file_name())).expect("copy fixture file");
        }
    }
    tmp
}

/// The error `Model::load` returns (panics if the load succeeds).
fn load_err(dir: &Path) -> ModelError {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded, but it should not have", dir.display()),
        Err(e) => e,
    }
}

fn config_err(dir: &Path) -> ModelError {
    match ModelConfig::from_dir(dir) {
        Ok(c) => panic!(
            "config of {} parsed ({c:?}), expected an error",
            dir.display()
        ),
        Err(e) => e,
    }
}

fn weights_err(dir: &Path) -> ModelError {
    match Weights::open(dir) {
        Ok(_) => panic!("weights of {} opened, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn tokenizer_err(dir: &Path) -> ModelError {
    match Tokenizer::load(dir) {
        Ok(_) => panic!("tokenizer of {} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(err: &ModelError, needles: &[&str]) {
    let msg = err.to_string();
    for n in needles {
        assert!(
            msg.contains(n),
            "error message {msg:?} does not mention {n:?}"
        );
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// config.json editing

fn read_config(dir: &Path) -> Map<String, Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read config.json");
    match serde_json::from_str(&text).expect("parse config.json") {
        Value::Object(m) => m,
        other => panic!("config.json is not an object: {other}"),
    }
}

fn write_config(dir: &Path, cfg: &Map<String, Value>) {
    let text = serde_json::to_string_pretty(cfg).expect("serialise config");
    std::fs::write(dir.join("config.json"), text).expect("write config.json");
}

/// A copy of fixture `name` with its config.json changed by `edit`.
fn with_config(name: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> TempDir {
    let tmp = copy_fixture(name);
    let mut cfg = read_config(tmp.path());
    edit(&mut cfg);
    write_config(tmp.path(), &cfg);
    tmp
}

/// Checks a `Config` error from both `ModelConfig::from_dir` and `Model::load`, and that its
/// message names config.json and every needle.
fn expect_config_error(dir: &Path, needles: &[&str]) -> String {
    let path = dir.join("config.json");
    for err in [config_err(dir), load_err(dir)] {
        match &err {
            ModelError::Config { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected ModelError::Config, got {other:?}"),
        }
        assert_mentions(&err, &[&show(&path)]);
        assert_mentions(&err, needles);
    }
    config_err(dir).to_string()
}

fn expect_unsupported(dir: &Path, needles: &[&str]) {
    let path = dir.join("config.json");
    for err in [config_err(dir), load_err(dir)] {
        match &err {
            ModelError::Unsupported { path: p, .. } => assert_eq!(p, &path),
            other => panic!("expected ModelError::Unsupported, got {other:?}"),
        }
        assert_mentions(&err, &[&show(&path)]);
        assert_mentions(&err, needles);
    }
}

// ---------------------------------------------------------------------------------------------
// Safetensors, by hand

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

#[derive(Clone, Debug)]
struct SafeFile {
    metadata: Option<Value>,
    /// In data-offset order.
    tensors: Vec<Entry>,
}

impl SafeFile {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("read safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + n]).expect("parse safetensors header");
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let offs: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            tensors.push((
                offs[0],
                Entry {
                    name,
                    dtype: info["dtype"].as_str().unwrap().to_string(),
                    shape: serde_json::from_value(info["shape"].clone()).unwrap(),
                    data: data[offs[0]..offs[1]].to_vec(),
                },
            ));
        }
        tensors.sort_by_key(|(start, _)| *start);
        Self {
            metadata,
            tensors: tensors.into_iter().map(|(_, e)| e).collect(),
        }
    }

    /// The file's bytes: header length, header padded with spaces to 8 bytes, data.
    fn to_bytes(&self) -> Vec<u8> {
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            let start = data.len();
            data.extend_from_slice(&t.data);
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("write safetensors");
    }

    fn remove(&mut self, name: &str) -> Entry {
        let i = self
            .tensors
            .iter()
            .position(|t| t.name == name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"));
        self.tensors.remove(i)
    }

    fn entry(&mut self, name: &str) -> &mut Entry {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
}

/// Rewrites `dir/file` after `edit`.
fn edit_safetensors(dir: &Path, file: &str, edit: impl FnOnce(&mut SafeFile)) {
    let path = dir.join(file);
    let mut f = SafeFile::read(&path);
    edit(&mut f);
    f.write(&path);
}

/// The shard that qwen3_moe's index assigns `tensor` to.
fn shard_of(dir: &Path, tensor: &str) -> String {
    let text = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["weight_map"][tensor]
        .as_str()
        .unwrap_or_else(|| panic!("index has no {tensor}"))
        .to_string()
}

fn expect_corrupt(dir: &Path, file: &Path, needles: &[&str]) -> String {
    for err in [weights_err(dir), load_err(dir)] {
        match &err {
            ModelError::CorruptFile { path, .. } => assert_eq!(path, file),
            other => panic!("expected ModelError::CorruptFile, got {other:?}"),
        }
        assert_mentions(&err, &[&show(file)]);
        assert_mentions(&err, needles);
    }
    weights_err(dir).to_string()
}

// =============================================================================================
// Sanity: the fixtures load, also after a round trip through the writer above.

#[test]
fn good_fixtures_load() {
    for name in FAMILIES {
        let dir = fixture(name);
        let cfg = ModelConfig::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.family.name(), name);
        Weights::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let m = Model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.layers.len(), cfg.num_layers);
        Tokenizer::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn rewritten_safetensors_still_load() {
    // The hand-written writer must produce files the loader accepts, else every test below
    // could pass for the wrong reason.
    for (name, file) in [
        ("mixtral", "model.safetensors"),
        ("qwen2_moe", "model.safetensors"),
        ("qwen3_moe", "model-00003-of-00004.safetensors"),
    ] {
        let tmp = copy_fixture(name);
        edit_safetensors(tmp.path(), file, |_| {});
        let reread = SafeFile::read(&tmp.path().join(file));
        let orig = SafeFile::read(&fixture(name).join(file));
        assert_eq!(reread.tensors.len(), orig.tensors.len());
        Model::load(tmp.path()).unwrap_or_else(|e| panic!("{name} after rewrite: {e}"));
    }
}

// =============================================================================================
// config.json

#[test]
fn config_invalid_json() {
    let tmp = copy_fixture("mixtral");
    std::fs::write(
        tmp.path().join("config.json"),
        "{\"model_type\": \"mixtral\", \"hidden_size\": 64,",
    )
    .unwrap();
    expect_config_error(tmp.path(), &[]);
}

#[test]
fn config_not_an_object() {
    let tmp = copy_fixture("mixtral");
    std::fs::write(tmp.path().join("config.json"), "[1, 2, 3]").unwrap();
    expect_config_error(tmp.path(), &["model_type"]);
}

#[test]
fn config_missing_model_type() {
    let tmp = with_config("mixtral", |c| {
        c.remove("model_type");
    });
    expect_config_error(tmp.path(), &["model_type"]);
}

#[test]
fn config_model_type_not_a_string() {
    let tmp = with_config("olmoe", |c| {
        c.insert("model_type".into(), json!(42));
    });
    expect_config_error(tmp.path(), &["model_type"]);
}

#[test]
fn config_missing_required_key_names_it() {
    for (name, key) in [
        ("mixtral", "hidden_size"),
        ("mixtral", "num_attention_heads"),
        ("qwen2_moe", "shared_expert_intermediate_size"),
        ("qwen3_moe", "moe_intermediate_size"),
        ("qwen3_moe", "num_experts_per_tok"),
        ("olmoe", "intermediate_size"),
        ("dbrx", "d_model"),
        ("dbrx", "ffn_config"),
    ] {
        let tmp = with_config(name, |c| {
            assert!(c.remove(key).is_some(), "{name} config has no {key}");
        });
        expect_config_error(tmp.path(), &[key]);
    }
    // A required key of a nested DBRX section.
    let tmp = with_config("dbrx", |c| {
        c["ffn_config"]
            .as_object_mut()
            .unwrap()
            .remove("moe_num_experts");
    });
    expect_config_error(tmp.path(), &["moe_num_experts"]);
}

#[test]
fn config_missing_expert_count() {
    for (name, keys) in [
        ("mixtral", &["num_local_experts", "num_experts"]),
        ("qwen3_moe", &["num_experts", "num_local_experts"]),
    ] {
        let tmp = with_config(name, |c| {
            for k in keys {
                c.remove(*k);
            }
        });
        expect_config_error(tmp.path(), keys);
    }
}

#[test]
fn config_heads_not_multiple_of_kv_heads() {
    let tmp = with_config("mixtral", |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    expect_config_error(
        tmp.path(),
        &["num_attention_heads", "num_key_value_heads", "(4)", "(3)"],
    );
    // DBRX spells it kv_n_heads inside attn_config; the check is the same.
    let tmp = with_config("dbrx", |c| {
        c["attn_config"]["kv_n_heads"] = json!(3);
    });
    expect_config_error(tmp.path(), &["(4)", "(3)"]);
}

#[test]
fn config_top_k_exceeds_experts() {
    let tmp = with_config("mixtral", |c| {
        c.insert("num_experts_per_tok".into(), json!(9));
    });
    expect_config_error(tmp.path(), &["num_experts_per_tok", "(9)", "(8)"]);
    let tmp = with_config("dbrx", |c| {
        c["ffn_config"]["moe_top_k"] = json!(9);
    });
    expect_config_error(tmp.path(), &["(9)", "(8)"]);
}

#[test]
fn config_zero_sizes_are_refused() {
    for (key, named) in [
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_key_value_heads", "num_key_value_heads"),
        ("num_experts_per_tok", "num_experts_per_tok"),
        ("vocab_size", "vocab_size"),
    ] {
        let tmp = with_config("mixtral", |c| {
            c.insert(key.into(), json!(0));
        });
        expect_config_error(tmp.path(), &[named, "positive"]);
    }
}

#[test]
fn config_odd_head_dim() {
    let tmp = with_config("qwen3_moe", |c| {
        c.insert("head_dim".into(), json!(33));
    });
    expect_config_error(tmp.path(), &["head_dim"]);
}

#[test]
fn unknown_family_is_named() {
    let tmp = with_config("mixtral", |c| {
        c.insert("model_type".into(), json!("llama4_moe_xyz"));
    });
    for err in [config_err(tmp.path()), load_err(tmp.path())] {
        match &err {
            ModelError::UnknownFamily(t) => assert_eq!(t, "llama4_moe_xyz"),
            other => panic!("expected ModelError::UnknownFamily, got {other:?}"),
        }
        assert_mentions(&err, &["llama4_moe_xyz", "mixtral", "dbrx"]);
    }
}

// =============================================================================================
// Unsupported options

#[test]
fn rope_yarn_v4_layout_is_unsupported() {
    for name in FAMILIES {
        let tmp = with_config(name, |c| {
            c.insert(
                "rope_scaling".into(),
                json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
            );
        });
        expect_unsupported(tmp.path(), &["yarn", "rope_scaling"]);
    }
    // transformers 4.4x also writes `rope_type` inside `rope_scaling`.
    let tmp = with_config("qwen2_moe", |c| {
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "linear", "factor": 2.0}),
        );
    });
    expect_unsupported(tmp.path(), &["linear", "rope_scaling"]);
}

#[test]
fn rope_yarn_v5_layout_is_unsupported() {
    for name in FAMILIES {
        let tmp = with_config(name, |c| {
            c.insert(
                "rope_parameters".into(),
                json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
            );
        });
        expect_unsupported(tmp.path(), &["yarn", "rope_parameters"]);
    }
    // DBRX keeps its rope settings inside attn_config.
    let tmp = with_config("dbrx", |c| {
        c["attn_config"]["rope_parameters"] =
            json!({"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0});
    });
    expect_unsupported(tmp.path(), &["yarn", "rope_parameters"]);
}

#[test]
fn rope_default_type_is_accepted() {
    let tmp = with_config("mixtral", |c| {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 12345.0}),
        );
    });
    let cfg = ModelConfig::from_dir(tmp.path()).unwrap();
    assert_eq!(cfg.rope_theta, 12345.0);
}

#[test]
fn sliding_window_is_unsupported() {
    let tmp = with_config("mixtral", |c| {
        c.insert("sliding_window".into(), json!(4096));
    });
    expect_unsupported(tmp.path(), &["sliding_window", "4096"]);
    for name in ["qwen2_moe", "qwen3_moe"] {
        let tmp = with_config(name, |c| {
            c.insert("use_sliding_window".into(), json!(true));
        });
        expect_unsupported(tmp.path(), &["use_sliding_window"]);
    }
}

#[test]
fn non_silu_activation_is_unsupported() {
    for name in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let tmp = with_config(name, |c| {
            c.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
        });
        expect_unsupported(tmp.path(), &["gelu_pytorch_tanh", "silu"]);
    }
    let tmp = with_config("dbrx", |c| {
        c["ffn_config"]["ffn_act_fn"] = json!({"name": "gelu"});
    });
    expect_unsupported(tmp.path(), &["\"gelu\"", "silu"]);
}

// =============================================================================================
// Missing files

#[test]
fn missing_config_json() {
    let tmp = copy_fixture("qwen2_moe");
    let path = tmp.path().join("config.json");
    std::fs::remove_file(&path).unwrap();
    for err in [config_err(tmp.path()), load_err(tmp.path())] {
        match &err {
            ModelError::Io { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.kind(), ErrorKind::NotFound);
            }
            other => panic!("expected ModelError::Io, got {other:?}"),
        }
        assert_mentions(&err, &[&show(&path)]);
    }
}

#[test]
fn missing_tokenizer_json() {
    let tmp = copy_fixture("mixtral");
    let path = tmp.path().join("tokenizer.json");
    std::fs::remove_file(&path).unwrap();
    let err = tokenizer_err(tmp.path());
    match &err {
        ModelError::Tokenizer { path: p, .. } => assert_eq!(p, &path),
        ModelError::Io { path: p, .. } => assert_eq!(p, &path),
        other => panic!("expected ModelError::Tokenizer or Io, got {other:?}"),
    }
    assert_mentions(&err, &[&show(&path)]);
}

#[test]
fn corrupt_tokenizer_files() {
    let tmp = copy_fixture("olmoe");
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, "{\"version\": \"1.0\", \"model\": ").unwrap();
    let err = tokenizer_err(tmp.path());
    assert!(
        matches!(&err, ModelError::Tokenizer { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert_mentions(&err, &[&show(&path)]);

    let tmp = copy_fixture("olmoe");
    let path = tmp.path().join("tokenizer_config.json");
    std::fs::write(&path, "{ not json").unwrap();
    let err = tokenizer_err(tmp.path());
    assert!(
        matches!(&err, ModelError::Tokenizer { path: p, .. } if p == &path),
        "{err:?}"
    );
    assert_mentions(&err, &[&show(&path)]);
}

#[test]
fn no_safetensors_files() {
    let tmp = copy_fixture("mixtral");
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    for err in [weights_err(tmp.path()), load_err(tmp.path())] {
        assert!(matches!(&err, ModelError::Io { .. }), "{err:?}");
        assert_mentions(&err, &[&show(&tmp.path().join("model.safetensors"))]);
    }
}

#[test]
fn index_names_a_missing_shard() {
    let tmp = copy_fixture("qwen3_moe");
    let index = tmp.path().join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["weight_map"]["model.layers.2.mlp.gate.weight"] = json!("model-00005-of-00004.safetensors");
    std::fs::write(&index, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let missing = tmp.path().join("model-00005-of-00004.safetensors");
    for err in [weights_err(tmp.path()), load_err(tmp.path())] {
        match &err {
            ModelError::Io { path, source } => {
                assert_eq!(path, &missing);
                assert_eq!(source.kind(), ErrorKind::NotFound);
            }
            other => panic!("expected ModelError::Io, got {other:?}"),
        }
        assert_mentions(&err, &[&show(&missing)]);
    }
    // Deleting a real shard is the same failure.
    let tmp = copy_fixture("qwen3_moe");
    let shard = tmp.path().join("model-00003-of-00004.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let err = load_err(tmp.path());
    assert!(
        matches!(&err, ModelError::Io { path, .. } if path == &shard),
        "{err:?}"
    );
    assert_mentions(&err, &[&show(&shard)]);
}

#[test]
fn corrupt_index_json() {
    let index_name = "model.safetensors.index.json";
    for (text, needle) in [
        ("{\"weight_map\": {", ""),
        ("{\"metadata\": {}}", "weight_map"),
        ("{\"weight_map\": {\"lm_head.weight\": 3}}", "weight_map"),
    ] {
        let tmp = copy_fixture("qwen3_moe");
        let index = tmp.path().join(index_name);
        std::fs::write(&index, text).unwrap();
        expect_corrupt(tmp.path(), &index, &[needle]);
    }
}

// =============================================================================================
// Tensors

#[test]
fn missing_tensor_is_named() {
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.7.w2.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let tmp = copy_fixture("mixtral");
        edit_safetensors(tmp.path(), "model.safetensors", |f| {
            f.remove(name);
        });
        let err = load_err(tmp.path());
        match &err {
            ModelError::MissingTensor { name: n, files } => {
                assert_eq!(n, name);
                assert!(files.contains(&show(&tmp.path().join("model.safetensors"))));
            }
            other => panic!("{name}: expected ModelError::MissingTensor, got {other:?}"),
        }
        assert_mentions(&err, &[name, "model.safetensors"]);
    }
}

#[test]
fn missing_tensor_in_other_families() {
    for (family, name) in [
        ("qwen2_moe", "model.layers.0.self_attn.q_proj.bias"),
        ("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight"),
        ("olmoe", "model.layers.0.self_attn.q_norm.weight"),
        ("dbrx", "transformer.blocks.1.ffn.experts.mlp.v1"),
        (
            "dbrx",
            "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight",
        ),
        (
            "glm4_moe",
            "model.layers.1.mlp.gate.e_score_correction_bias",
        ),
        (
            "glm4_moe",
            "model.layers.2.mlp.shared_experts.up_proj.weight",
        ),
        ("deepseek_v2", "model.layers.0.self_attn.kv_b_proj.weight"),
        (
            "deepseek_v3",
            "model.layers.1.self_attn.q_a_layernorm.weight",
        ),
        (
            "deepseek_v3",
            "model.layers.2.mlp.gate.e_score_correction_bias",
        ),
    ] {
        let tmp = copy_fixture(family);
        edit_safetensors(tmp.path(), "model.safetensors", |f| {
            f.remove(name);
        });
        let err = load_err(tmp.path());
        assert!(
            matches!(&err, ModelError::MissingTensor { name: n, .. } if n == name),
            "{family}/{name}: {err:?}"
        );
        assert_mentions(&err, &[name]);
    }
}

#[test]
fn missing_tensor_in_sharded_checkpoint() {
    let name = "model.layers.2.mlp.experts.3.up_proj.weight";
    let tmp = copy_fixture("qwen3_moe");
    let shard = shard_of(tmp.path(), name);
    edit_safetensors(tmp.path(), &shard, |f| {
        f.remove(name);
    });
    let err = load_err(tmp.path());
    match &err {
        ModelError::MissingTensor { name: n, files } => {
            assert_eq!(n, name);
            for i in 1..=4 {
                let p = tmp
                    .path()
                    .join(format!("model-0000{i}-of-00004.safetensors"));
                assert!(files.contains(&show(&p)), "{files} lacks {}", p.display());
            }
        }
        other => panic!("expected ModelError::MissingTensor, got {other:?}"),
    }
    assert_mentions(&err, &[name, &shard]);
}

#[test]
fn missing_expert_only_matters_when_selected() {
    let name = "model.layers.1.block_sparse_moe.experts.7.w1.weight";
    let tmp = copy_fixture("mixtral");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.remove(name);
    });
    Model::load_with(tmp.path(), &ExpertSelection::Only(vec![0, 3]))
        .unwrap_or_else(|e| panic!("experts 0 and 3 are all there: {e}"));
    Model::load_with(tmp.path(), &ExpertSelection::None)
        .unwrap_or_else(|e| panic!("no experts selected: {e}"));
    let err = match Model::load_with(tmp.path(), &ExpertSelection::Only(vec![7])) {
        Ok(_) => panic!("expert 7 has no w1"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, ModelError::MissingTensor { name: n, .. } if n == name),
        "{err:?}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let name = "model.layers.0.self_attn.o_proj.weight";
    let tmp = copy_fixture("mixtral");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        let e = f.entry(name);
        assert_eq!(e.shape, [64, 64]);
        e.shape = vec![32, 128];
    });
    let file = tmp.path().join("model.safetensors");
    let err = load_err(tmp.path());
    match &err {
        ModelError::WrongShape {
            name: n,
            path,
            found,
            expected,
        } => {
            assert_eq!(n, name);
            assert_eq!(path, &file);
            assert_eq!(found, &[32, 128]);
            assert_eq!(expected, &[64, 64]);
        }
        other => panic!("expected ModelError::WrongShape, got {other:?}"),
    }
    assert_mentions(&err, &[name, &show(&file), "[32, 128]", "[64, 64]"]);
}

#[test]
fn wrong_shape_bf16_and_sharded() {
    // bf16 on disk (qwen2_moe): the router transposed.
    let name = "model.layers.1.mlp.gate.weight";
    let tmp = copy_fixture("qwen2_moe");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        let e = f.entry(name);
        assert_eq!(e.dtype, "BF16");
        assert_eq!(e.shape, [8, 64]);
        e.shape = vec![64, 8];
    });
    let err = load_err(tmp.path());
    assert!(
        matches!(&err, ModelError::WrongShape { name: n, found, expected, .. }
            if n == name && found == &[64, 8] && expected == &[8, 64]),
        "{err:?}"
    );
    assert_mentions(&err, &[name, "model.safetensors", "[64, 8]", "[8, 64]"]);

    // In a shard: the error names the shard, not the index.
    let name = "model.layers.1.mlp.down_proj.weight";
    let tmp = copy_fixture("qwen3_moe");
    let shard = shard_of(tmp.path(), name);
    edit_safetensors(tmp.path(), &shard, |f| {
        let e = f.entry(name);
        assert_eq!(e.shape, [64, 96]);
        e.shape = vec![96, 64];
    });
    let err = load_err(tmp.path());
    match &err {
        ModelError::WrongShape { name: n, path, .. } => {
            assert_eq!(n, name);
            assert_eq!(path, &tmp.path().join(&shard));
        }
        other => panic!("expected ModelError::WrongShape, got {other:?}"),
    }
    assert_mentions(&err, &[name, &shard, "[96, 64]", "[64, 96]"]);
}

#[test]
fn unsupported_dtype_is_named() {
    // Same byte size, so the file stays valid: only the dtype is wrong.
    for (name, from, to) in [
        ("model.norm.weight", "F32", "I32"),
        ("model.layers.1.self_attn.v_proj.weight", "F32", "U32"),
    ] {
        let tmp = copy_fixture("mixtral");
        edit_safetensors(tmp.path(), "model.safetensors", |f| {
            let e = f.entry(name);
            assert_eq!(e.dtype, from);
            e.dtype = to.into();
        });
        let file = tmp.path().join("model.safetensors");
        let err = load_err(tmp.path());
        match &err {
            ModelError::WrongDtype {
                name: n,
                path,
                dtype,
            } => {
                assert_eq!(n, name);
                assert_eq!(path, &file);
                assert_eq!(dtype, to);
            }
            other => panic!("{name}: expected ModelError::WrongDtype, got {other:?}"),
        }
        assert_mentions(&err, &[name, &show(&file), to]);
    }
    // BF16 -> I16 in the bf16 checkpoint.
    let name = "model.layers.0.mlp.shared_expert.up_proj.weight";
    let tmp = copy_fixture("qwen2_moe");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry(name).dtype = "I16".into();
    });
    let err = load_err(tmp.path());
    assert!(
        matches!(&err, ModelError::WrongDtype { name: n, dtype, .. } if n == name && dtype == "I16"),
        "{err:?}"
    );
}

// =============================================================================================
// GPT-OSS

#[test]
fn gpt_oss_fixtures_load() {
    for name in ["gpt_oss", "gpt_oss_mxfp4"] {
        let cfg = ModelConfig::from_dir(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.family.name(), "gpt_oss");
        let w = cfg.sliding_window.as_ref().expect("sliding layers");
        assert_eq!(w.window, 6);
        assert_eq!(w.layers, [true, false, true, false]);
        assert!(cfg.yarn.is_some(), "{name}: yarn");
        Model::load(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn gpt_oss_missing_mxfp4_scales_name_the_tensor() {
    for name in [
        "model.layers.1.mlp.experts.down_proj_scales",
        "model.layers.0.mlp.experts.gate_up_proj_scales",
        "model.layers.3.mlp.experts.down_proj_blocks",
    ] {
        let tmp = copy_fixture("gpt_oss_mxfp4");
        edit_safetensors(tmp.path(), "model.safetensors", |f| {
            f.remove(name);
        });
        let err = load_err(tmp.path());
        assert!(
            matches!(&err, ModelError::MissingTensor { name: n, .. } if n == name),
            "{name}: {err:?}"
        );
        assert_mentions(&err, &[name]);
    }
}

#[test]
fn gpt_oss_mxfp4_blocks_of_the_wrong_dtype_or_shape_are_named() {
    let name = "model.layers.2.mlp.experts.gate_up_proj_scales";
    let tmp = copy_fixture("gpt_oss_mxfp4");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry(name).dtype = "I8".into();
    });
    let err = load_err(tmp.path());
    assert!(
        matches!(&err, ModelError::WrongDtype { name: n, .. } if n == name),
        "{err:?}"
    );
    assert_mentions(&err, &[name, "U8"]);
    // [8, 128, 2, 16] blocks read as [8, 128, 4, 8]: same bytes, wrong shape.
    let name = "model.layers.0.mlp.experts.gate_up_proj_blocks";
    let tmp = copy_fixture("gpt_oss_mxfp4");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry(name).shape = vec![8, 128, 4, 8];
    });
    let err = load_err(tmp.path());
    assert!(
        matches!(&err, ModelError::WrongShape { name: n, .. } if n == name),
        "{err:?}"
    );
}

#[test]
fn gpt_oss_missing_sinks_and_biases_are_named() {
    for name in [
        "model.layers.0.self_attn.sinks",
        "model.layers.1.self_attn.o_proj.bias",
        "model.layers.2.mlp.router.bias",
        "model.layers.3.mlp.experts.gate_up_proj_bias",
        "model.layers.0.mlp.experts.down_proj",
    ] {
        let tmp = copy_fixture("gpt_oss");
        edit_safetensors(tmp.path(), "model.safetensors", |f| {
            f.remove(name);
        });
        let err = load_err(tmp.path());
        assert!(
            matches!(&err, ModelError::MissingTensor { name: n, .. } if n == name),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn gpt_oss_config_errors_name_the_field() {
    let tmp = with_config("gpt_oss", |c| {
        c.insert(
            "layer_types".into(),
            json!([
                "sliding_attention",
                "full_attention",
                "chunked_attention",
                "full_attention"
            ]),
        );
    });
    expect_unsupported(tmp.path(), &["layer_types[2]", "chunked_attention"]);
    let tmp = with_config("gpt_oss", |c| {
        c.insert("layer_types".into(), json!(["full_attention"]));
    });
    expect_config_error(tmp.path(), &["layer_types", "1 entries for 4 layers"]);
    let tmp = with_config("gpt_oss", |c| {
        c.insert("sliding_window".into(), Value::Null);
    });
    expect_config_error(tmp.path(), &["sliding_window"]);
    let tmp = with_config("gpt_oss", |c| {
        c.insert("sliding_window".into(), json!(0));
    });
    expect_config_error(tmp.path(), &["sliding_window"]);
    let tmp = with_config("gpt_oss", |c| {
        c.insert("swiglu_limit".into(), json!("seven"));
    });
    expect_config_error(tmp.path(), &["swiglu_limit"]);
    let tmp = with_config("gpt_oss_mxfp4", |c| {
        c.insert("quantization_config".into(), json!({"quant_method": "fp8"}));
    });
    expect_unsupported(tmp.path(), &["quant_method", "fp8", "mxfp4"]);
    let tmp = with_config("gpt_oss", |c| {
        c.remove("num_experts_per_tok");
    });
    expect_config_error(tmp.path(), &["num_experts_per_tok", "experts_per_token"]);
    // Every layer full: no window needed.
    let tmp = with_config("gpt_oss", |c| {
        c.insert(
            "layer_types".into(),
            json!([
                "full_attention",
                "full_attention",
                "full_attention",
                "full_attention"
            ]),
        );
        c.insert("sliding_window".into(), Value::Null);
    });
    let cfg = ModelConfig::from_dir(tmp.path()).unwrap();
    assert!(cfg.sliding_window.is_none());
}

#[test]
fn truncated_file() {
    for cut in [1usize, 100, 40_000] {
        let tmp = copy_fixture("mixtral");
        let file = tmp.path().join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - cut]).unwrap();
        expect_corrupt(tmp.path(), &file, &["truncated"]);
    }
    // A truncated shard of a sharded checkpoint names that shard.
    let tmp = copy_fixture("qwen3_moe");
    let file = tmp.path().join("model-00002-of-00004.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    expect_corrupt(tmp.path(), &file, &["truncated"]);
}

#[test]
fn trailing_bytes() {
    let tmp = copy_fixture("olmoe");
    let file = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&file, &bytes).unwrap();
    expect_corrupt(tmp.path(), &file, &["trailing"]);
}

#[test]
fn garbage_header() {
    let tmp = copy_fixture("mixtral");
    let file = tmp.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (i, b) in bytes[8..8 + n].iter_mut().enumerate() {
        *b = b"garbage!"[i % 8];
    }
    std::fs::write(&file, &bytes).unwrap();
    expect_corrupt(tmp.path(), &file, &["header"]);
}

#[test]
fn invalid_header_length_and_tiny_files() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("empty", vec![]),
        ("shorter than the length field", vec![1, 2, 3]),
        ("absurd header length", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("header longer than the file", {
            let mut b = 1000u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"{\"__metadata__\": {}}");
            b
        }),
    ];
    for (what, bytes) in cases {
        let tmp = copy_fixture("mixtral");
        let file = tmp.path().join("model.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let err = weights_err(tmp.path());
        assert!(
            matches!(&err, ModelError::CorruptFile { path, .. } if path == &file),
            "{what}: {err:?}"
        );
        assert_mentions(&err, &[&show(&file)]);
    }
}

#[test]
fn header_with_bad_offsets() {
    // Data offsets that overlap another tensor's.
    let tmp = copy_fixture("mixtral");
    let file = tmp.path().join("model.safetensors");
    let mut bytes = SafeFile::read(&file).to_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["model.embed_tokens.weight"]["data_offsets"] = json!([0, 131072]);
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(n, b' ');
    assert_eq!(h.len(), n, "new header must fit in the old one");
    bytes[8..8 + n].copy_from_slice(&h);
    std::fs::write(&file, &bytes).unwrap();
    expect_corrupt(tmp.path(), &file, &[]);
}

#[test]
fn header_shape_disagrees_with_data_size() {
    // The header says [64, 65] but the data holds [64, 64]: the file is corrupt (not a
    // WrongShape, which is about a well-formed tensor of the wrong size).
    let tmp = copy_fixture("mixtral");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry("model.layers.0.self_attn.o_proj.weight").shape = vec![64, 65];
    });
    let file = tmp.path().join("model.safetensors");
    expect_corrupt(tmp.path(), &file, &[]);
}

// Regression (was a bug): weights.rs maps safetensors' `TensorInvalidInfo` to "invalid shape, data
// type, or offset for tensor", which does not say which tensor. Remove the #[ignore] once the
// message names it (fixed).
#[test]

fn header_shape_disagrees_with_data_size_names_tensor() {
    let name = "model.layers.0.self_attn.o_proj.weight";
    let tmp = copy_fixture("mixtral");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry(name).shape = vec![64, 65];
    });
    let file = tmp.path().join("model.safetensors");
    expect_corrupt(tmp.path(), &file, &[name]);
}

// Regression (was a bug): a file cut inside its header gives "invalid header length" (safetensors'
// `InvalidHeaderLength`), which does not say the file is truncated.
#[test]

fn truncated_inside_header_says_truncated() {
    let tmp = copy_fixture("mixtral");
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..3000]).unwrap();
    expect_corrupt(tmp.path(), &file, &["truncated"]);
}

// Regression (was a bug): `ParseCx::typed` (config.rs) passes serde's message through, and
// `serde_json::from_value` does not say which field failed: `"hidden_size": "64"` gives
// "invalid type: string \"64\", expected usize".
#[test]

fn config_value_of_wrong_type_names_key() {
    for (name, key, value) in [
        ("mixtral", "hidden_size", json!("64")),
        ("qwen3_moe", "num_experts_per_tok", json!(-2)),
        ("olmoe", "num_hidden_layers", json!(2.5)),
    ] {
        let tmp = with_config(name, |c| {
            c.insert(key.into(), value);
        });
        expect_config_error(tmp.path(), &[key]);
    }
    let tmp = with_config("dbrx", |c| {
        c["ffn_config"]["moe_top_k"] = json!("four");
    });
    expect_config_error(tmp.path(), &["moe_top_k"]);
}

// Regression (was a bug): absurd sizes in config.json abort the whole process (allocation failure,
// SIGABRT) instead of returning an error: `vec![false; num_hidden_layers]` in the family
// parsers, `Rope::new` sized by `head_dim` before any tensor shape is checked, and
// `(0..num_experts).collect()` / `vec![None; num_experts]` in `Model::from_weights`. While the
// bug was there, running this test killed the test binary.
#[test]

fn absurd_config_sizes_are_errors_not_aborts() {
    const HUGE: u64 = 1_000_000_000_000;
    for (name, key) in [
        ("mixtral", "num_hidden_layers"),
        ("qwen3_moe", "num_hidden_layers"),
        ("mixtral", "num_local_experts"),
        ("qwen3_moe", "head_dim"),
    ] {
        let tmp = with_config(name, |c| {
            c.insert(key.into(), json!(HUGE));
        });
        // A Config error or a shape error against the checkpoint are both fine; an abort is not.
        let err = load_err(tmp.path());
        assert!(
            matches!(
                err,
                ModelError::Config { .. }
                    | ModelError::WrongShape { .. }
                    | ModelError::MissingTensor { .. }
            ),
            "{name} {key}={HUGE}: {err:?}"
        );
    }
}

#[test]
fn unknown_dtype_string() {
    let tmp = copy_fixture("mixtral");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.entry("model.norm.weight").dtype = "Q4_K".into();
    });
    let file = tmp.path().join("model.safetensors");
    expect_corrupt(tmp.path(), &file, &["Q4_K"]);
}

// =============================================================================================
// DeepSeek and GLM-4.5

#[test]
fn deepseek_unknown_topk_method_is_named() {
    let tmp = with_config("deepseek_v2", |c| {
        c.insert("topk_method".into(), json!("noaux_tc"));
    });
    expect_unsupported(
        tmp.path(),
        &["topk_method", "noaux_tc", "group_limited_greedy"],
    );
    let tmp = with_config("deepseek_v3", |c| {
        c.insert("topk_method".into(), json!("greedy_v9"));
    });
    expect_unsupported(tmp.path(), &["topk_method", "greedy_v9", "noaux_tc"]);
    let tmp = with_config("deepseek_v3", |c| {
        c.insert("scoring_func".into(), json!("softmax"));
    });
    expect_unsupported(tmp.path(), &["scoring_func", "softmax"]);
}

#[test]
fn grouped_routing_settings_are_checked() {
    // 8 experts do not split into 3 groups.
    let tmp = with_config("deepseek_v3", |c| {
        c.insert("n_group".into(), json!(3));
    });
    expect_config_error(tmp.path(), &["n_group (3)", "8"]);
    let tmp = with_config("glm4_moe", |c| {
        c.insert("topk_group".into(), json!(5));
    });
    expect_config_error(tmp.path(), &["topk_group (5)"]);
    // noaux_tc ranks groups by their two best experts.
    let tmp = with_config("deepseek_v3", |c| {
        c.insert("n_group".into(), json!(8));
        c.insert("topk_group".into(), json!(4));
    });
    expect_config_error(tmp.path(), &["n_group (8)", "two best"]);
    let tmp = with_config("deepseek_v2", |c| {
        c.remove("n_group");
    });
    expect_config_error(tmp.path(), &["group_limited_greedy", "n_group"]);
}

#[test]
fn deepseek_missing_mla_key_is_named() {
    let tmp = with_config("deepseek_v3", |c| {
        c.remove("kv_lora_rank");
    });
    expect_config_error(tmp.path(), &["kv_lora_rank"]);
}

#[test]
fn rope_types_other_than_yarn_are_refused_for_deepseek() {
    let tmp = with_config("deepseek_v2", |c| {
        c.insert(
            "rope_parameters".into(),
            json!({"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}),
        );
    });
    expect_unsupported(tmp.path(), &["longrope", "rope_parameters"]);
}

/// MLA's cache holds the latent and the rotary key per token and layer, nothing else.
#[test]
fn mla_cache_holds_only_the_latent() {
    for name in ["deepseek_v2", "deepseek_v3"] {
        let cfg = ModelConfig::from_dir(fixture(name)).unwrap();
        let m = cfg.mla.expect("MLA");
        assert_eq!((m.kv_lora_rank, m.qk_rope_head_dim), (32, 8));
        assert_eq!(cfg.kv_cache_widths(), (32 + 8, 0));
        assert_eq!(
            tandem_model::KvCache::bytes_per_token(&cfg),
            (32 + 8) * cfg.num_layers * 4
        );
        let kv = tandem_model::KvCache::new(&cfg, 4, 3);
        for l in &kv.layers {
            assert_eq!(l.k.len(), 3 * 4 * (32 + 8));
            assert_eq!(l.v.len(), 0);
        }
        // The same heads with full keys and values would take (nope + rope + v) * heads per
        // side: 4 * (16 + 8) + 4 * 12 = 144 floats, against 40.
        let full = cfg.num_heads * (m.qk_head_dim() + m.v_head_dim);
        assert_eq!(full, 144);
    }
}

/// A DeepSeek-V3 checkpoint with its multi-token-prediction layer (stored as the layer after
/// the last, `model.layers.{num_hidden_layers}.*`) loads and computes what the checkpoint
/// without it computes: the extra tensors are not read.
#[test]
fn deepseek_mtp_layer_tensors_are_skipped() {
    let tmp = copy_fixture("deepseek_v3");
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        for name in [
            "model.layers.3.eh_proj.weight",
            "model.layers.3.enorm.weight",
            "model.layers.3.self_attn.kv_b_proj.weight",
        ] {
            f.tensors.push(Entry {
                name: name.into(),
                dtype: "F32".into(),
                shape: vec![2, 2],
                data: vec![0; 16],
            });
        }
    });
    let with_mtp = Model::load(tmp.path()).expect("loads with the MTP tensors present");
    let plain = Model::load(fixture("deepseek_v3")).unwrap();
    let ids = [5u32, 17, 300];
    let a = tandem_model::generate::greedy(&with_mtp, &ids, 4).unwrap();
    let b = tandem_model::generate::greedy(&plain, &ids, 4).unwrap();
    assert_eq!(a, b);
}
