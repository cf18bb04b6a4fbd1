//! tandem's GGUF reader and writer (`gguf_format`): every metadata type round-trips, every
//! hostile or broken header is an error that names the key or tensor and the numbers (never a
//! panic or a huge allocation), types tandem lists but does not load (MXFP4, IQ*) are named,
//! the byte ranges handed to zero-copy loaders are the tensors' bytes, and a model that will
//! not fit in memory is refused before loading.

use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tandem_model::gguf::GgufFile;
use tandem_model::gguf_format::{Content, GgmlType, GgufError, GgufWriter, Value};
use tandem_model::model::{estimate_resident_bytes, ExpertSelection};
use tandem_model::weights::{LinearType, Weights};
use tandem_model::{Model, ModelConfig, ModelError, WeightType};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn gguf(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

/// Deterministic pseudo-random bytes.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-7)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX - 3)),
        ("t.i64", Value::I64(i64::MIN + 5)),
        ("t.f32", Value::F32(-1.5e-5)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.bool", Value::Bool(true)),
        ("t.false", Value::Bool(false)),
        ("t.string", Value::String("héllo \u{1F600} ▁world".into())),
        ("t.empty", Value::String(String::new())),
        (
            "t.strings",
            Value::Array(vec![Value::String("a b".into()), Value::String("".into())]),
        ),
        (
            "t.i32s",
            Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)]),
        ),
        (
            "t.nested",
            Value::Array(vec![
                Value::Array(vec![Value::F32(1.0), Value::F32(2.0)]),
                Value::Array(vec![Value::F32(3.0)]),
            ]),
        ),
        ("t.empty_array", Value::Array(vec![])),
    ]
}

/// (name, type, shape) of the tensors of the round-trip file.
fn tensor_specs() -> Vec<(&'static str, GgmlType, Vec<usize>)> {
    vec![
        ("a.f32", GgmlType::F32, vec![3, 5]),
        ("b.q8_0", GgmlType::Q8_0, vec![2, 64]),
        ("c.mxfp4", GgmlType::MXFP4, vec![4, 2, 64]),
        ("d.iq2_xxs", GgmlType::IQ2_XXS, vec![1, 256]),
        ("e.bf16", GgmlType::BF16, vec![7]),
        ("f.q4_k", GgmlType::Q4_K, vec![2, 1, 1, 512]),
    ]
}

fn size_of(ty: GgmlType, shape: &[usize]) -> usize {
    shape.iter().product::<usize>() / ty.block_size() * ty.type_size()
}

#[test]
fn every_metadata_type_and_tensor_round_trips() {
    for (version, alignment) in [(3u32, None), (2, Some(64u32)), (3, Some(1))] {
        let mut w = GgufWriter::new();
        w.version(version);
        if let Some(a) = alignment {
            w.alignment(a);
        }
        for (k, v) in every_value() {
            w.meta(k, v);
        }
        let mut datas = Vec::new();
        for (i, (name, ty, shape)) in tensor_specs().into_iter().enumerate() {
            let data = noise(size_of(ty, &shape), i as u64);
            datas.push(data.clone());
            w.tensor(name, ty, &shape, data).unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let c = Content::read(&bytes).unwrap();
        assert_eq!(c.version, version);
        let a = alignment.map_or(32, |a| a as u64);
        assert_eq!(c.alignment, a);
        assert_eq!(c.data_offset % a, 0);
        let mut want: Vec<(String, Value)> = alignment
            .map(|a| vec![("general.alignment".to_string(), Value::U32(a))])
            .unwrap_or_default();
        want.extend(every_value().into_iter().map(|(k, v)| (k.to_string(), v)));
        assert_eq!(c.metadata, want, "v{version}");
        for (k, v) in &want {
            assert_eq!(c.get(k), Some(v));
        }
        assert_eq!(c.tensors.len(), datas.len());
        for ((t, (name, ty, shape)), data) in c.tensors.iter().zip(tensor_specs()).zip(&datas) {
            assert_eq!((t.name.as_str(), t.ggml_type, t.shape()), (name, ty, shape));
            assert_eq!(t.offset % a, 0, "{name}");
            assert_eq!(&bytes[c.data_range(t)], &data[..], "{name} data");
            assert_eq!(c.tensor(name), Some(t));
        }
    }
}

#[test]
fn streamed_tensors_write_the_same_file() {
    let data = noise(size_of(GgmlType::Q6_K, &[3, 256]), 9);
    let mut a = GgufWriter::new();
    a.meta("k", Value::U32(1));
    a.tensor("t", GgmlType::Q6_K, &[3, 256], data.clone())
        .unwrap();
    let mut b = GgufWriter::new();
    b.meta("k", Value::U32(1));
    let d2 = data.clone();
    b.tensor_with("t", GgmlType::Q6_K, &[3, 256], move |w| w.write_all(&d2))
        .unwrap();
    assert_eq!(a.to_bytes().unwrap(), b.to_bytes().unwrap());
    // A fill that writes the wrong number of bytes is an error, not a bad file.
    let mut c = GgufWriter::new();
    c.tensor_with("t", GgmlType::Q6_K, &[3, 256], |w| w.write_all(&[0; 10]))
        .unwrap();
    let e = c.to_bytes().unwrap_err();
    assert!(e.to_string().contains("10 bytes"), "{e}");
    // So is a tensor whose bytes do not match its type and shape.
    let mut d = GgufWriter::new();
    let e = d
        .tensor("t", GgmlType::Q8_0, &[2, 32], vec![0; 35])
        .err()
        .unwrap();
    assert!(e.to_string().contains("68"), "{e}");
    assert!(d
        .tensor("r", GgmlType::Q8_0, &[2, 33], vec![0; 68])
        .is_err());
}

fn corrupt_msg(bytes: &[u8]) -> String {
    match Content::read(bytes) {
        Err(GgufError::Corrupt(m)) => m,
        Err(e) => panic!("not Corrupt: {e:?}"),
        Ok(_) => panic!("a bad file was read"),
    }
}

fn unsupported_msg(bytes: &[u8]) -> String {
    match Content::read(bytes) {
        Err(GgufError::Unsupported(m)) => m,
        Err(e) => panic!("not Unsupported: {e:?}"),
        Ok(_) => panic!("a bad file was read"),
    }
}

fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in: {msg}");
    }
}

/// A header start: magic, version, tensor and metadata counts.
fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()));
    w.meta("x", Value::Array(vec![Value::U32(1), Value::U32(2)]));
    w.tensor("a", GgmlType::Q8_0, &[2, 32], noise(68, 1))
        .unwrap();
    w.tensor("b", GgmlType::F32, &[3], noise(12, 2)).unwrap();
    w.to_bytes().unwrap()
}

/// The file offset of tensor `name`'s data-offset field in `bytes`.
fn offset_field(bytes: &[u8], name: &str, n_dims: usize) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    at + key.len() + 4 + 8 * n_dims + 4
}

#[test]
fn bad_headers_are_named_errors() {
    has(&corrupt_msg(b"GGUX\x03\0\0\0"), &["not a GGUF file"]);
    has(&corrupt_msg(b"GG"), &["truncated", "magic"]);
    has(&unsupported_msg(&header(1, 0, 0)), &["version 1"]);
    has(&unsupported_msg(&header(4, 0, 0)), &["version 4"]);
    // A big-endian v3 file: its version reads as 0x03000000.
    let mut be = b"GGUF".to_vec();
    be.extend_from_slice(&3u32.to_be_bytes());
    be.extend_from_slice(&[0; 16]);
    has(&unsupported_msg(&be), &["big-endian"]);
    // Counts far beyond the file.
    has(
        &corrupt_msg(&header(3, 1 << 60, 0)),
        &["1152921504606846976 tensors", "bytes are left"],
    );
    has(
        &corrupt_msg(&header(3, 0, u64::MAX)),
        &["18446744073709551615 metadata pairs"],
    );
    // A key 2^63 bytes long.
    let mut b = header(3, 0, 1);
    b.extend_from_slice(&(1u64 << 63).to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    has(
        &corrupt_msg(&b),
        &["metadata key 0", "9223372036854775808 bytes long"],
    );
    // An array of 2^62 u32s.
    let mut b = header(3, 0, 1);
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(b"arr");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    has(&corrupt_msg(&b), &["arr", "4611686018427387904", "U32"]);
    // An array of 2^62 strings whose first length is 2^63.
    let mut b = header(3, 0, 1);
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(b"arr");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(1u64 << 63).to_le_bytes());
    has(&corrupt_msg(&b), &["arr[0]", "9223372036854775808"]);
    // Unknown value types, bad bools, deep nesting, duplicate keys, bad alignment.
    let one = |key: &str, ty: u32, value: &[u8]| {
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(value);
        b
    };
    has(
        &corrupt_msg(&one("k", 13, &[0; 8])),
        &["k", "value type 13"],
    );
    has(
        &corrupt_msg(&one("flag", 7, &[2])),
        &["flag", "bool value 2"],
    );
    let mut deep = Vec::new();
    for _ in 0..20 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    deep.extend_from_slice(&[0; 16]);
    has(
        &corrupt_msg(&one("deep", 9, &deep)),
        &["deep", "nested more than 8"],
    );
    let mut w = GgufWriter::new();
    w.meta_unchecked("k", Value::U8(1))
        .meta_unchecked("k", Value::U8(2));
    has(&corrupt_msg(&w.to_bytes().unwrap()), &["k", "twice"]);
    for bad in [Value::U32(3), Value::U32(0), Value::U64(32)] {
        let mut w = GgufWriter::new();
        w.meta("general.alignment", bad.clone());
        has(&corrupt_msg(&w.to_bytes().unwrap()), &["general.alignment"]);
    }
    // Invalid UTF-8 in a key.
    let mut b = header(3, 0, 1);
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xfe]);
    b.extend_from_slice(&[0; 8]);
    has(&corrupt_msg(&b), &["metadata key 0", "UTF-8"]);
}

#[test]
fn bad_tensor_infos_are_named_errors() {
    let file = |f: &dyn Fn(&mut GgufWriter)| {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        f(&mut w);
        w.to_bytes().unwrap()
    };
    has(
        &corrupt_msg(&file(&|w| {
            w.tensor_unchecked("five", 0, &[1, 1, 1, 1, 1], vec![0; 4]);
        })),
        &["tensor five", "5 dimensions", "at most 4"],
    );
    has(
        &corrupt_msg(&file(&|w| {
            w.tensor_unchecked("zero", 0, &[4, 0], vec![]);
        })),
        &["tensor zero", "dimension 1 is 0"],
    );
    has(
        &corrupt_msg(&file(&|w| {
            w.tensor_unchecked("huge", 0, &[1 << 32, 1 << 32], vec![]);
        })),
        &["tensor huge", "4294967296", "2^63"],
    );
    for id in [4u32, 33, 43, 1000] {
        has(
            &unsupported_msg(&file(&|w| {
                w.tensor_unchecked("odd", id, &[32], vec![0; 32]);
            })),
            &["tensor odd", &format!("ggml type {id}")],
        );
    }
    has(
        &corrupt_msg(&file(&|w| {
            w.tensor_unchecked("rows", GgmlType::Q4_K.id(), &[100, 2], vec![0; 288]);
        })),
        &["tensor rows", "rows of 100 values", "Q4_K", "256"],
    );
    has(
        &corrupt_msg(&file(&|w| {
            w.tensor_unchecked("twice", 0, &[2], vec![0; 8]);
            w.tensor_unchecked("twice", 0, &[2], vec![0; 8]);
        })),
        &["tensor twice", "twice"],
    );
    // A data offset off the alignment.
    let mut b = small_file();
    let at = offset_field(&b, "b", 1);
    let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    b[at..at + 8].copy_from_slice(&(off + 4).to_le_bytes());
    has(
        &corrupt_msg(&b),
        &["tensor b", &format!("offset {}", off + 4), "alignment 32"],
    );
    // An offset pointing far past the end.
    b[at..at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    has(&corrupt_msg(&b), &["tensor b", "overflow"]);
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    has(
        &corrupt_msg(&b),
        &["truncated", "tensor b", "bytes missing"],
    );
}

#[test]
fn truncated_data_says_how_many_bytes_are_missing() {
    let b = small_file();
    let c = Content::read(&b).unwrap();
    let t = c.tensor("b").unwrap();
    let end = c.data_range(t).end;
    assert_eq!(end, b.len());
    let m = corrupt_msg(&b[..end - 5]);
    has(
        &m,
        &[
            "truncated",
            "tensor b",
            &format!("{}..{end}", end - 12),
            &format!("has {} bytes", end - 5),
            "(5 bytes missing)",
        ],
    );
}

#[test]
fn no_prefix_or_corruption_of_a_file_panics() {
    for name in ["mixtral-q8_0.gguf", "olmoe-f32.gguf"] {
        let good = std::fs::read(gguf(name)).unwrap();
        let c = Content::read(&good).unwrap();
        // Every cut in the header, and some in the data, is an error.
        let header_end = c.data_offset as usize;
        for cut in (0..header_end).step_by(7).chain([header_end - 1]) {
            assert!(Content::read(&good[..cut]).is_err(), "{name} cut at {cut}");
        }
        assert!(Content::read(&good[..good.len() - 1]).is_err());
        // Flipped bytes in the header: an error or a header, never a panic.
        let mut s = 1u64;
        for i in 0..3000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut bad = good[..header_end.min(good.len())].to_vec();
            bad.extend_from_slice(&good[header_end..]);
            for k in 0..(1 + i % 4) {
                let at = ((s >> 17) as usize + k * 131) % header_end;
                bad[at] ^= (s >> (8 * (k + 1))) as u8 | 1;
            }
            let _ = Content::read(&bad);
        }
    }
}

/// A tensor's type, shape and bytes.
type Parts = (GgmlType, Vec<usize>, Vec<u8>);

/// `src` rewritten with the tensors `change` changes (name, type, shape, bytes).
fn rewrite(src: &Path, dst: &Path, change: &dyn Fn(&str, Parts) -> Parts) {
    let bytes = std::fs::read(src).unwrap();
    let c = Content::read(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &c.metadata {
        w.meta(k, v.clone());
    }
    for t in &c.tensors {
        let (ty, shape, b) = change(
            &t.name,
            (t.ggml_type, t.shape(), bytes[c.data_range(t)].to_vec()),
        );
        w.tensor(&t.name, ty, &shape, b).unwrap();
    }
    w.write_file(dst).unwrap();
}

#[test]
fn mxfp4_files_load_and_iq_files_read_and_loading_names_the_type() {
    let tmp = tempfile::tempdir().unwrap();
    for (ty, target) in [
        (GgmlType::MXFP4, "blk.0.ffn_gate_exps.weight"),
        (GgmlType::IQ4_NL, "blk.1.attn_output.weight"),
    ] {
        let path = tmp
            .path()
            .join(format!("{}.gguf", ty.name().to_lowercase()));
        rewrite(&gguf("mixtral-f32.gguf"), &path, &|name, (t, shape, b)| {
            if name == target {
                let n: usize = shape.iter().product();
                (ty, shape, noise(n / ty.block_size() * ty.type_size(), 3))
            } else {
                (t, shape, b)
            }
        });
        let bytes = std::fs::read(&path).unwrap();
        let c = Content::read(&bytes).unwrap();
        assert_eq!(c.tensor(target).unwrap().ggml_type, ty);
        let g = GgufFile::open(&path).unwrap();
        if ty == GgmlType::MXFP4 {
            // MXFP4 has kernels (`kquant`): it loads, held in its own blocks.
            Model::load(&path).unwrap();
            let hub = g
                .names()
                .find(|n| g.dtype_of(n).as_deref() == Some("MXFP4"))
                .expect("a hub name of that type")
                .to_string();
            assert_eq!(g.own_type(&hub), tandem_model::WeightType::Mxfp4);
        } else {
            let err = match Model::load(&path) {
                Ok(_) => panic!("{ty} loaded"),
                Err(e) => e,
            };
            assert!(matches!(err, ModelError::WrongDtype { .. }), "{err:?}");
            let msg = err.to_string();
            has(
                &msg,
                &[target, ty.name(), "supported: F32", "Q6_K", "MXFP4"],
            );
        }
        let hub = g
            .names()
            .find(|n| g.dtype_of(n).as_deref() == Some(ty.name()))
            .expect("a hub name of that type")
            .to_string();
        // Its bytes are still reachable for a loader that knows the type.
        let shape = g.shape_of(&hub).unwrap();
        let (t, range) = g.tensor_range(&hub, &shape).unwrap();
        assert_eq!(t, ty);
        assert_eq!(
            range.len(),
            ty.bytes_for(shape.iter().product::<usize>() as u64)
                .unwrap() as usize
        );
    }
}

#[test]
fn a_256_block_iq_tensor_is_listed_and_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("iq2.gguf");
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("qwen3moe".into()));
    w.tensor("output.weight", GgmlType::IQ2_XXS, &[2, 256], noise(132, 5))
        .unwrap();
    w.write_file(&path).unwrap();
    let weights = Weights::open(&path).unwrap();
    assert_eq!(
        weights.dtype_of("lm_head.weight").as_deref(),
        Some("IQ2_XXS")
    );
    let err = weights.get_vec("lm_head.weight", &[2, 256]).unwrap_err();
    assert!(matches!(err, ModelError::WrongDtype { .. }), "{err:?}");
    has(
        &err.to_string(),
        &["output.weight", "IQ2_XXS", "supported: F32"],
    );
}

#[test]
fn tensor_ranges_are_the_tensors_bytes() {
    let g = GgufFile::open(&gguf("mixtral-q8_0.gguf")).unwrap();
    let map = g.mapping().clone();
    let mut checked = 0;
    let mut names: Vec<String> = g.names().map(String::from).collect();
    names.sort();
    for hub in &names {
        let shape = g.shape_of(hub).unwrap();
        let raw = g.raw(hub, &shape).unwrap();
        match g.tensor_range(hub, &shape) {
            Ok((ty, r)) => {
                assert_eq!(ty, raw.dtype, "{hub}");
                assert_eq!(&map[r], &raw.bytes[..], "{hub}");
                checked += 1;
            }
            Err(e) => {
                // Only llama's permuted q/k rows have no range.
                assert!(
                    hub.ends_with("q_proj.weight") || hub.ends_with("k_proj.weight"),
                    "{hub}: {e}"
                );
                assert!(e.to_string().contains("permuted"), "{e}");
            }
        }
    }
    // Experts are slices of the stacked tensors, one after the other.
    let e = |i: usize| {
        g.tensor_range(
            &format!("model.layers.1.block_sparse_moe.experts.{i}.w2.weight"),
            &[64, 128],
        )
        .unwrap()
        .1
    };
    assert_eq!(e(0).end, e(1).start);
    assert_eq!(e(3).len(), 64 * 128 / 32 * 34);
    assert!(checked > 40, "{checked}");
    let err = g
        .tensor_range("model.layers.0.self_attn.v_proj.weight", &[1, 1])
        .unwrap_err();
    assert!(matches!(err, ModelError::WrongShape { .. }), "{err:?}");
}

#[test]
fn own_q8_0_and_q4_0_dequantization_is_candles() {
    // Random blocks with finite scales, decoded by tandem and by candle (the oracle).
    let tmp = tempfile::tempdir().unwrap();
    let (rows, cols) = (6usize, 96usize);
    for (ty, cty) in [
        (GgmlType::Q8_0, GgmlDType::Q8_0),
        (GgmlType::Q4_0, GgmlDType::Q4_0),
    ] {
        let mut b = noise(rows * cols / 32 * ty.type_size(), 11);
        for blk in b.chunks_exact_mut(ty.type_size()) {
            let d = half::f16::from_f32((blk[0] as f32 - 128.0) / 512.0);
            blk[..2].copy_from_slice(&d.to_le_bytes());
        }
        let want: Vec<f32> = ggml_file::qtensor_from_ggml(cty, &b, vec![rows, cols], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let path = tmp.path().join(format!("{ty}.gguf"));
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("qwen3moe".into()));
        w.tensor("output.weight", ty, &[rows, cols], b).unwrap();
        w.write_file(&path).unwrap();
        let weights = Weights::open(&path).unwrap();
        let got = weights.get_vec("lm_head.weight", &[rows, cols]).unwrap();
        assert_eq!(got, want, "{ty}");
        assert!(got.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn a_model_that_will_not_fit_is_refused_before_loading() {
    let path = gguf("mixtral-f32.gguf");
    let w = Weights::open(&path).unwrap();
    let cfg = ModelConfig::from_gguf(w.gguf().unwrap()).unwrap();
    let est = |sel: &ExpertSelection, t: LinearType| estimate_resident_bytes(&cfg, &w, sel, t);
    let all = ExpertSelection::All;
    let f32 = est(&all, LinearType::Is(WeightType::F32));
    let q8 = est(&all, LinearType::Is(WeightType::Q8_0));
    let q4 = est(&all, LinearType::Is(WeightType::Q4_0));
    assert_eq!(est(&all, LinearType::Auto), f32);
    assert!(q4 < q8 && q8 < f32, "{q4} {q8} {f32}");
    let none = est(&ExpertSelection::None, LinearType::Is(WeightType::F32));
    let two = est(
        &ExpertSelection::Only(vec![0, 5]),
        LinearType::Is(WeightType::F32),
    );
    assert!(none < two && two < f32, "{none} {two} {f32}");
    // The estimate covers what loading holds, without doubling it.
    let m = Model::load(&path).unwrap();
    let mut held = m.embed.weight_bytes() + m.lm_head.w.weight_bytes();
    for l in &m.layers {
        held += l.attention.w.qkv.w.weight_bytes() + l.attention.w.o.w.weight_bytes();
        for e in l.experts.routed.iter().flatten() {
            held += e.gate_up.w.weight_bytes() + e.down.w.weight_bytes();
        }
    }
    assert!(
        f32 >= held as u64 && f32 < 2 * held as u64,
        "{f32} vs {held}"
    );

    // Too little for f32, enough for q4_0: refused, naming both numbers and q4_0.
    let budget = (q4 + q8) / 2;
    let err = match Model::load_within(&path, &all, LinearType::Is(WeightType::F32), Some(budget)) {
        Ok(_) => panic!("loaded over budget"),
        Err(e) => e,
    };
    match &err {
        ModelError::TooLarge {
            needed, available, ..
        } => assert_eq!((*needed, *available), (f32, budget)),
        e => panic!("{e:?}"),
    }
    let msg = err.to_string();
    has(
        &msg,
        &[
            "mixtral-f32.gguf",
            "will not fit",
            "as f32",
            &tandem_model::mem::gib(f32),
            &tandem_model::mem::gib(budget),
            "--quantization q4_0",
        ],
    );
    assert!(!msg.contains("q8_0"), "q8_0 does not fit: {msg}");
    // Nothing fits: the smallest type is named.
    let err = Model::load_within(&path, &all, LinearType::Auto, Some(1000))
        .err()
        .unwrap();
    has(&err.to_string(), &["even as q4_0", "more memory"]);
    // Enough memory, or none given: it loads.
    assert!(Model::load_within(&path, &all, LinearType::Is(WeightType::Q4_0), Some(q4)).is_ok());
    assert!(Model::load_within(&path, &all, LinearType::Auto, None).is_ok());
    // A safetensors checkpoint is estimated the same way.
    let dir = fixtures().join("mixtral");
    let sw = Weights::open(&dir).unwrap();
    let scfg = ModelConfig::from_dir(&dir).unwrap();
    assert_eq!(
        estimate_resident_bytes(&scfg, &sw, &all, LinearType::Is(WeightType::Q8_0)),
        q8
    );
    let err = Model::load_within(&dir, &all, LinearType::Auto, Some(q8))
        .err()
        .unwrap();
    has(
        &err.to_string(),
        &["--quantization q8_0", "--quantization q4_0"],
    );
}
