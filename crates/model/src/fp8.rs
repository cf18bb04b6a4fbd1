//! Hugging Face block-FP8 checkpoints (DeepSeek-V3/R1's own weights, the Qwen3 and GLM-4.5
//! "-FP8" releases): `config.json` has `quantization_config: {"quant_method": "fp8", "fmt":
//! "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}` (`fmt` is
//! sometimes left out), each quantized linear weight `W [out, in]` is stored as safetensors
//! dtype `F8_E4M3` (torch's `float8_e4m3fn`) with a companion `W_scale_inv` (`[ceil(out /
//! b0), ceil(in / b1)]`, f32 or bf16) and the real weight is `e4m3(W[r, c]) * scale_inv[r /
//! b0, c / b1]`. Embeddings, norms, routers and the LM head stay bf16 in those files; a
//! tensor is read by its dtype, so `modules_to_not_convert` needs no special handling.
//!
//! The weights are dequantized at load, one tensor at a time, into f32 and then packed in
//! the type asked for (bf16 under `--dtype auto`, see [`crate::weights::Weights::type_for`]).
//! Activations are not quantized (`activation_scheme` is only about the GPU kernels), so the
//! forward pass is the one of the dequantized model.

use crate::error::{ModelError, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

/// The largest finite e4m3fn value (`0x7e`): 1.75 * 2^8.
pub const E4M3_MAX: f32 = 448.0;

/// The block FP8 layout a checkpoint's `quantization_config` describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Config {
    /// `weight_block_size`: rows x columns of the weight one scale covers.
    pub block: [usize; 2],
}

impl Fp8Config {
    /// The block size transformers assumes when `weight_block_size` is absent.
    pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

    /// The FP8 layout of a `config.json` (`path` names it in errors): `None` unless
    /// `quantization_config.quant_method` is `"fp8"` (other methods, such as GPT-OSS's
    /// `mxfp4`, are their families' business).
    pub fn from_config(v: &Value, path: &Path) -> Result<Option<Self>> {
        let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some("fp8") {
            return Ok(None);
        }
        let unsupported = |msg: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            msg,
        };
        match q.get("fmt") {
            None | Some(Value::Null) => {}
            Some(Value::String(f)) if matches!(f.as_str(), "e4m3" | "float8_e4m3fn") => {}
            Some(Value::String(f)) if f.contains("e5m2") => {
                return Err(unsupported(format!(
                    "quantization_config.fmt {f:?}: FP8 e5m2 weights are not supported (only \
                     e4m3, torch.float8_e4m3fn, with block scales)"
                )))
            }
            Some(other) => {
                return Err(unsupported(format!(
                    "quantization_config.fmt {other}: unknown FP8 format (supported: \"e4m3\")"
                )))
            }
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => Self::DEFAULT_BLOCK,
            Some(b) => {
                let dims: Option<Vec<usize>> = b.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as usize))
                        .collect()
                });
                match dims.as_deref() {
                    Some(&[r, c]) if r > 0 && c > 0 && b.as_array().map(Vec::len) == Some(2) => {
                        [r, c]
                    }
                    _ => {
                        return Err(ModelError::Config {
                            path: path.to_path_buf(),
                            msg: format!(
                                "quantization_config.weight_block_size is {b}; it must be two \
                                 positive integers [rows, columns]"
                            ),
                        })
                    }
                }
            }
        };
        Ok(Some(Self { block }))
    }

    /// The shape of the scale grid of an `[out, inp]` weight.
    pub fn scale_shape(&self, out: usize, inp: usize) -> [usize; 2] {
        [out.div_ceil(self.block[0]), inp.div_ceil(self.block[1])]
    }
}

/// The value of one float8_e4m3fn byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
/// bits; exponent 0 is subnormal (`m / 8 * 2^-6`), `S.1111.111` (0x7f, 0xff) is NaN, and
/// there are no infinities (`0x7e` = 448 is the largest value).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let negative = b & 0x80 != 0;
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as u32;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // m * 2^-9, exact in f32
        f32::from_bits(((127 - 9) << 23) as u32) * man as f32
    } else {
        // (1 + m / 8) * 2^(e - 7): the f32 with exponent e - 7 and the top mantissa bits m
        f32::from_bits((((exp - 7 + 127) as u32) << 23) | (man << 20))
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// [`e4m3_to_f32`] of every byte.
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

/// Whether the e4m3fn byte `b` is NaN.
pub fn e4m3_is_nan(b: u8) -> bool {
    b & 0x7f == 0x7f
}

/// `[out, inp]` e4m3fn bytes times their block scales (`scales` row-major `[ceil(out / b0),
/// ceil(inp / b1)]`, already checked) as f32. Rows are done in parallel.
pub fn dequantize(
    bytes: &[u8],
    scales: &[f32],
    out: usize,
    inp: usize,
    block: [usize; 2],
) -> Vec<f32> {
    let lut = e4m3_table();
    let [b0, b1] = block;
    let sc = inp.div_ceil(b1);
    let mut v = vec![0f32; out * inp];
    if inp == 0 {
        return v;
    }
    v.par_chunks_mut(inp)
        .zip(bytes.par_chunks(inp))
        .enumerate()
        .for_each(|(r, (dst, src))| {
            let srow = &scales[(r / b0) * sc..(r / b0 + 1) * sc];
            for ((d, s), scale) in dst.chunks_mut(b1).zip(src.chunks(b1)).zip(srow) {
                for (d, &q) in d.iter_mut().zip(s) {
                    *d = lut[q as usize] * scale;
                }
            }
        });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an e4m3fn byte from its fields in f64 (the definition, written
    /// independently of the bit construction above).
    fn oracle(b: u8) -> Option<f64> {
        let s = if b >> 7 == 1 { -1.0 } else { 1.0 };
        let e = ((b >> 3) & 15) as i32;
        let m = (b & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        Some(if e == 0 {
            s * (m / 8.0) * 2f64.powi(-6)
        } else {
            s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        })
    }

    #[test]
    fn e4m3_matches_the_f64_definition() {
        for b in 0..=255u8 {
            let got = e4m3_to_f32(b);
            match oracle(b) {
                None => assert!(got.is_nan() && e4m3_is_nan(b), "byte {b:#04x}"),
                Some(x) => {
                    assert!(!e4m3_is_nan(b), "byte {b:#04x}");
                    assert_eq!(got as f64, x, "byte {b:#04x}");
                    assert_eq!(got.is_sign_negative(), b >= 0x80, "sign of byte {b:#04x}");
                    assert_eq!(e4m3_table()[b as usize].to_bits(), got.to_bits());
                }
            }
        }
        assert_eq!(e4m3_to_f32(0x7e), E4M3_MAX);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn dequantize_uses_the_block_of_each_element() {
        // 3 x 5 weight in blocks of [2, 3]: a 2 x 2 grid with partial blocks on both axes.
        let block = [2, 3];
        let (out, inp) = (3, 5);
        let bytes: Vec<u8> = (0..15u8).map(|i| 0x30 + i).collect(); // normal values
        let scales = [1.0f32, 2.0, 3.0, 5.0];
        let v = dequantize(&bytes, &scales, out, inp, block);
        for r in 0..out {
            for c in 0..inp {
                let want = oracle(bytes[r * inp + c]).unwrap() * scales[(r / 2) * 2 + c / 3] as f64;
                assert_eq!(v[r * inp + c] as f64, want, "({r}, {c})");
            }
        }
    }

    #[test]
    fn config_layouts() {
        let p = Path::new("config.json");
        let parse = |s: &str| Fp8Config::from_config(&serde_json::from_str(s).unwrap(), p);
        assert_eq!(parse(r#"{}"#).unwrap(), None);
        assert_eq!(
            parse(r#"{"quantization_config": {"quant_method": "mxfp4"}}"#).unwrap(),
            None
        );
        assert_eq!(
            parse(r#"{"quantization_config": {"quant_method": "fp8"}}"#).unwrap(),
            Some(Fp8Config { block: [128, 128] })
        );
        assert_eq!(
            parse(
                r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                    "weight_block_size": [16, 32]}}"#
            )
            .unwrap(),
            Some(Fp8Config { block: [16, 32] })
        );
        let e = parse(r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("e5m2") && e.contains("not supported"), "{e}");
        for bad in [
            "[0, 128]",
            "[128]",
            "[128, 128, 1]",
            "\"128\"",
            "[128.5, 128]",
        ] {
            let e = parse(&format!(
                r#"{{"quantization_config": {{"quant_method": "fp8", "weight_block_size": {bad}}}}}"#
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("weight_block_size"), "{bad}: {e}");
        }
    }
}
