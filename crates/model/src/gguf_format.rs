//! The GGUF container format, read and written by tandem itself: the ggml tensor types
//! llama.cpp writes ([`GgmlType`], with their block sizes), the header reader ([`Content`])
//! and a writer ([`GgufWriter`]).
//!
//! A GGUF file is, little-endian: the magic `GGUF`, a `u32` version (2 or 3 are read; 1 and
//! big-endian files are refused), `u64` tensor and metadata counts, the metadata (`key`,
//! `u32` value type, value; strings are a `u64` length and UTF-8 bytes, arrays an item type,
//! a `u64` count and the items), the tensor infos (name, `u32` dimension count, `u64`
//! dimensions innermost first, `u32` ggml type, `u64` offset into the data section), padding
//! to `general.alignment` (32 when absent), and the tensor data.
//!
//! The reader treats the file as hostile: every count and length is checked against the bytes
//! left before anything is allocated, arithmetic is checked, and each tensor's data must lie
//! in the file (whole blocks per row, offsets aligned). Every error names the key or tensor and
//! the numbers.

use std::collections::HashMap;
use std::io::Write;

/// A ggml tensor type, by the id llama.cpp writes in GGUF files (ggml.h's `ggml_type`).
/// Ids that ggml removed (4, 5, 31-33, 36-38) are not types.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
}

/// Values per block of the K-quants and most IQ types.
const QK_K: usize = 256;

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 35] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
    ];

    /// The id in a GGUF tensor info.
    pub const fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
            Q2_0 => 42,
        }
    }

    /// The type with GGUF id `id`, if ggml has one.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// llama.cpp's name (gguf-py's `GGMLQuantizationType`): "Q4_K", "MXFP4", ...
    pub const fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
            Q2_0 => "Q2_0",
        }
    }

    /// The type named `name` (llama.cpp's spelling, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Values per block (1 for the plain types).
    pub const fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 | Q2_0 => 64,
            Q1_0 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block (ggml.c's `type_size`, gguf-py's `GGML_QUANT_SIZES`).
    pub const fn type_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            F64 | I64 => 8,
            I8 => 1,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 2 + 2 + 32,
            Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Q4_K => 2 + 2 + QK_K / 2 + 12,
            Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Q8_K => 4 + QK_K + QK_K / 8,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ4_NL => 2 + 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + 4 * 13,
            TQ2_0 => 2 + 64,
            MXFP4 => 1 + 16,
            NVFP4 => 4 + 32,
            Q1_0 => 2 + 16,
            Q2_0 => 2 + 16,
        }
    }

    /// Bytes of `n` values (a whole number of blocks), or `None` when `n` is not whole
    /// blocks or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a metadata value (GGUF's `gguf_type` ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// The fewest bytes one value of this type takes in a file.
    fn min_bytes(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value. The variants and the `to_*` accessors are those of candle's
/// `gguf_file::Value`, so code written against it switches by changing the import.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

/// A metadata value of another type than the one asked for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("metadata value {found} is not {wanted}")]
pub struct ValueError {
    pub wanted: &'static str,
    pub found: String,
}

fn not<T>(wanted: &'static str, v: &Value) -> Result<T, ValueError> {
    let mut found = match v {
        Value::Array(a) => format!("an array of {} items", a.len()),
        v => format!("{v:?}"),
    };
    if found.chars().count() > 80 {
        found = found.chars().take(77).chain("...".chars()).collect();
    }
    Err(ValueError { wanted, found })
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
        }
    }

    pub fn to_u8(&self) -> Result<u8, ValueError> {
        match self {
            Value::U8(v) => Ok(*v),
            v => not("a u8", v),
        }
    }

    pub fn to_i8(&self) -> Result<i8, ValueError> {
        match self {
            Value::I8(v) => Ok(*v),
            v => not("an i8", v),
        }
    }

    pub fn to_u16(&self) -> Result<u16, ValueError> {
        match self {
            Value::U16(v) => Ok(*v),
            v => not("a u16", v),
        }
    }

    pub fn to_i16(&self) -> Result<i16, ValueError> {
        match self {
            Value::I16(v) => Ok(*v),
            v => not("an i16", v),
        }
    }

    pub fn to_u32(&self) -> Result<u32, ValueError> {
        match self {
            Value::U32(v) => Ok(*v),
            v => not("a u32", v),
        }
    }

    pub fn to_i32(&self) -> Result<i32, ValueError> {
        match self {
            Value::I32(v) => Ok(*v),
            v => not("an i32", v),
        }
    }

    /// A u64, or an unsigned integer or bool widened to one (as candle's does).
    pub fn to_u64(&self) -> Result<u64, ValueError> {
        match self {
            Value::U64(v) => Ok(*v),
            Value::U8(v) => Ok(*v as u64),
            Value::U16(v) => Ok(*v as u64),
            Value::U32(v) => Ok(*v as u64),
            Value::Bool(v) => Ok(*v as u64),
            v => not("a u64 or an unsigned integer", v),
        }
    }

    pub fn to_i64(&self) -> Result<i64, ValueError> {
        match self {
            Value::I64(v) => Ok(*v),
            v => not("an i64", v),
        }
    }

    pub fn to_f32(&self) -> Result<f32, ValueError> {
        match self {
            Value::F32(v) => Ok(*v),
            v => not("an f32", v),
        }
    }

    pub fn to_f64(&self) -> Result<f64, ValueError> {
        match self {
            Value::F64(v) => Ok(*v),
            v => not("an f64", v),
        }
    }

    pub fn to_bool(&self) -> Result<bool, ValueError> {
        match self {
            Value::Bool(v) => Ok(*v),
            v => not("a bool", v),
        }
    }

    pub fn to_vec(&self) -> Result<&Vec<Value>, ValueError> {
        match self {
            Value::Array(v) => Ok(v),
            v => not("an array", v),
        }
    }

    #[allow(clippy::inherent_to_string)]
    pub fn to_string(&self) -> Result<&String, ValueError> {
        match self {
            Value::String(v) => Ok(v),
            v => not("a string", v),
        }
    }
}

/// Why a GGUF file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// The bytes are not a valid GGUF file (truncated, inconsistent, hostile).
    #[error("{0}")]
    Corrupt(String),
    /// A valid file this reader does not read: GGUF v1, a big-endian file, a newer version,
    /// a tensor type id ggml does not have.
    #[error("{0}")]
    Unsupported(String),
}

type R<T> = Result<T, GgufError>;

fn corrupt<T>(msg: String) -> R<T> {
    Err(GgufError::Corrupt(msg))
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// As in the file: innermost (the row) first.
    pub dims: Vec<u64>,
    /// From the start of the data section.
    pub offset: u64,
    /// Bytes of the data.
    pub size: u64,
}

impl TensorInfo {
    /// The shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|d| *d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The header of a GGUF file: metadata, tensor infos and where the data starts.
#[derive(Clone, Debug)]
pub struct Content {
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, 32 when absent.
    pub alignment: u64,
    /// The absolute file offset of the data section.
    pub data_offset: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// The alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nested deeper than this are refused (the recursion is bounded).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// `n` bytes, or a "truncated" error saying what was being read.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> R<&'a [u8]> {
        if n > self.left() {
            return corrupt(format!(
                "file is truncated: {} needs {n} bytes at offset {} but only {} are left \
                 ({} bytes missing)",
                what(),
                self.pos,
                self.left(),
                n - self.left()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> R<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> R<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> R<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> R<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.left() {
            return corrupt(format!(
                "file is truncated or corrupt: {} is {len} bytes long but only {} bytes are left",
                what(),
                self.left()
            ));
        }
        let b = self.take(len, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => corrupt(format!("{} is not UTF-8: {e}", what())),
        }
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> R<Value> {
        let what = || format!("the value of {key}");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return corrupt(format!("metadata {key}: bool value {b} is not 0 or 1")),
            },
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return corrupt(format!(
                        "metadata {key}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                    ));
                }
                let id = self.u32(&|| format!("the item type of {key}"))?;
                let item = ValueType::from_id(id).ok_or_else(|| {
                    GgufError::Corrupt(format!("metadata {key}: unknown array item type {id}"))
                })?;
                let n = self.u64(&|| format!("the length of {key}"))?;
                let need = n.checked_mul(item.min_bytes());
                if need.is_none_or(|need| need > self.left()) {
                    return corrupt(format!(
                        "file is truncated or corrupt: metadata {key} is an array of {n} \
                         {item:?} items (at least {} bytes) but only {} bytes are left",
                        need.map_or("2^64".to_string(), |b| b.to_string()),
                        self.left()
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let key = format!("{key}[{i}]");
                    v.push(self.value(item, &key, depth + 1)?);
                }
                Value::Array(v)
            }
        })
    }
}

/// The steps of [`Content::read`], in file order.
impl Cursor<'_> {
    /// The magic and the version (2 or 3, little-endian).
    fn version(&mut self) -> R<u32> {
        let magic = self.array::<4>(&|| "the magic".to_string())?;
        if &magic != b"GGUF" {
            return corrupt(format!(
                "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
            ));
        }
        let version = self.u32(&|| "the version".to_string())?;
        if version != 0 && version & 0xffff == 0 {
            return Err(GgufError::Unsupported(format!(
                "the version reads as {version:#x}: a big-endian GGUF file, which is not \
                 supported (convert it on a little-endian machine)"
            )));
        }
        match version {
            2 | 3 => Ok(version),
            1 => Err(GgufError::Unsupported(
                "GGUF version 1 is not supported (re-convert the model with a recent \
                 llama.cpp)"
                    .into(),
            )),
            v => Err(GgufError::Unsupported(format!(
                "GGUF version {v} is not supported (versions 2 and 3 are)"
            ))),
        }
    }

    /// The tensor and metadata counts, checked against the bytes left.
    fn counts(&mut self) -> R<(u64, u64)> {
        let n_tensors = self.u64(&|| "the tensor count".to_string())?;
        let n_kv = self.u64(&|| "the metadata count".to_string())?;
        // Each metadata pair is at least a key length, a type and one byte; each tensor info a
        // name length, a dimension count, a type and an offset.
        for (n, min, what) in [(n_kv, 13u64, "metadata pairs"), (n_tensors, 24, "tensors")] {
            if n.checked_mul(min).is_none_or(|b| b > self.left()) {
                return corrupt(format!(
                    "file is truncated or corrupt: the header lists {n} {what} (at least {min} \
                     bytes each) but only {} bytes are left",
                    self.left()
                ));
            }
        }
        Ok((n_tensors, n_kv))
    }

    /// `n_kv` metadata pairs, in file order, and the index of their keys.
    fn metadata(&mut self, n_kv: u64) -> R<MetadataAndIndex> {
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = self.string(&|| format!("metadata key {i}"))?;
            let id = self.u32(&|| format!("the type of metadata {key}"))?;
            let ty = ValueType::from_id(id).ok_or_else(|| {
                GgufError::Corrupt(format!("metadata {key}: unknown value type {id}"))
            })?;
            let v = self.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return corrupt(format!("metadata key {key} appears twice"));
            }
            metadata.push((key, v));
        }
        Ok((metadata, meta_index))
    }

    /// `n_tensors` tensor infos, in file order, and the index of their names.
    fn tensor_infos(&mut self, n_tensors: u64, alignment: u64) -> R<TensorsAndIndex> {
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = self.string(&|| format!("tensor name {i}"))?;
            if tensor_index.contains_key(&name) {
                return corrupt(format!("tensor {name} appears twice"));
            }
            let t = self.tensor_info(name, alignment)?;
            tensor_index.insert(t.name.clone(), tensors.len());
            tensors.push(t);
        }
        Ok((tensors, tensor_index))
    }

    /// The rest of the info of the tensor `name` (read already): dimensions, type, offset.
    fn tensor_info(&mut self, name: String, alignment: u64) -> R<TensorInfo> {
        let dims = self.dims(&name)?;
        let n = dims
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| {
                GgufError::Corrupt(format!(
                    "tensor {name}: dimensions {dims:?} hold more than 2^63 values"
                ))
            })?;
        let id = self.u32(&|| format!("the type of tensor {name}"))?;
        let ggml_type = GgmlType::from_id(id).ok_or_else(|| {
            GgufError::Unsupported(format!(
                "tensor {name} has ggml type {id}, which is not a type this reader knows \
                 (a newer llama.cpp, or a removed type)"
            ))
        })?;
        let row = dims.first().copied().unwrap_or(1);
        let bs = ggml_type.block_size() as u64;
        if !row.is_multiple_of(bs) {
            return corrupt(format!(
                "tensor {name}: rows of {row} values are not whole {ggml_type} blocks of {bs}"
            ));
        }
        let size = ggml_type.bytes_for(n).ok_or_else(|| {
            GgufError::Corrupt(format!(
                "tensor {name}: {n} {ggml_type} values overflow a 64-bit size"
            ))
        })?;
        let offset = self.u64(&|| format!("the data offset of tensor {name}"))?;
        if !offset.is_multiple_of(alignment) {
            return corrupt(format!(
                "tensor {name}: data offset {offset} is not a multiple of the alignment \
                 {alignment}"
            ));
        }
        Ok(TensorInfo {
            name,
            ggml_type,
            dims,
            offset,
            size,
        })
    }

    /// The dimension count and the dimensions of the tensor `name`, none of them 0.
    fn dims(&mut self, name: &str) -> R<Vec<u64>> {
        let n_dims = self.u32(&|| format!("the dimension count of tensor {name}"))?;
        if n_dims as usize > MAX_DIMS {
            return corrupt(format!(
                "tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for j in 0..n_dims {
            let d = self.u64(&|| format!("dimension {j} of tensor {name}"))?;
            if d == 0 {
                return corrupt(format!("tensor {name}: dimension {j} is 0"));
            }
            dims.push(d);
        }
        Ok(dims)
    }
}

/// The metadata pairs in file order and the index of their keys.
type MetadataAndIndex = (Vec<(String, Value)>, HashMap<String, usize>);
/// The tensor infos in file order and the index of their names.
type TensorsAndIndex = (Vec<TensorInfo>, HashMap<String, usize>);

/// `general.alignment`: a u32 power of two, [`DEFAULT_ALIGNMENT`] when absent.
fn alignment_of(value: Option<&Value>) -> R<u64> {
    match value {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => Ok(*a as u64),
        Some(v) => corrupt(format!(
            "general.alignment must be a u32 power of two, not {v:?}"
        )),
    }
}

/// Checks that every tensor's data, from `data_offset`, lies in a file of `file_len` bytes.
fn check_tensor_data(tensors: &[TensorInfo], data_offset: u64, file_len: u64) -> R<()> {
    for t in tensors {
        let range = data_offset
            .checked_add(t.offset)
            .and_then(|s| Some((s, s.checked_add(t.size)?)));
        let Some((start, end)) = range else {
            return corrupt(format!(
                "tensor {}: offset {} + {} bytes overflow",
                t.name, t.offset, t.size
            ));
        };
        if end > file_len {
            return corrupt(format!(
                "file is truncated: tensor {} needs bytes {start}..{end} but the file has \
                 {file_len} bytes ({} bytes missing)",
                t.name,
                end - file_len
            ));
        }
    }
    Ok(())
}

impl Content {
    /// Reads the header of the GGUF file `buf` (the whole file) and checks that every
    /// tensor's data lies in it.
    pub fn read(buf: &[u8]) -> R<Self> {
        let mut c = Cursor { buf, pos: 0 };
        let version = c.version()?;
        let (n_tensors, n_kv) = c.counts()?;
        let (metadata, meta_index) = c.metadata(n_kv)?;
        let alignment = alignment_of(meta_index.get("general.alignment").map(|i| &metadata[*i].1))?;
        let (tensors, tensor_index) = c.tensor_infos(n_tensors, alignment)?;
        let header_end = c.pos as u64;
        let data_offset = header_end
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| GgufError::Corrupt("the data offset overflows".into()))?;
        check_tensor_data(&tensors, data_offset, buf.len() as u64)?;
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            meta_index,
            tensor_index,
        })
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|i| &self.metadata[*i].1)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|i| &self.tensors[*i])
    }

    /// The absolute byte range of the tensor's data in the file (checked at read to lie in it).
    pub fn data_range(&self, t: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.data_offset + t.offset) as usize;
        start..start + t.size as usize
    }
}

type Fill<'a> = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + 'a>;

enum Data<'a> {
    Bytes(Vec<u8>),
    Fill(Fill<'a>),
}

struct WTensor<'a> {
    name: String,
    type_id: u32,
    dims: Vec<u64>,
    size: u64,
    data: Data<'a>,
}

/// Writes a GGUF file (version 3 unless told otherwise): metadata of any type, tensors as raw
/// bytes of a type and shape, each tensor's data aligned. Files it writes read back with
/// [`Content::read`]; the `*_unchecked` methods write what the reader refuses (for tests).
pub struct GgufWriter<'a> {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<WTensor<'a>>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// The version number written (2 and 3 have the same layout).
    pub fn version(&mut self, v: u32) -> &mut Self {
        self.version = v;
        self
    }

    /// Aligns the data to `a` bytes (a power of two) and records it as `general.alignment`.
    pub fn alignment(&mut self, a: u32) -> &mut Self {
        assert!(a.is_power_of_two(), "alignment {a} is not a power of two");
        self.alignment = a as u64;
        self.meta("general.alignment", Value::U32(a))
    }

    /// Sets metadata `key` (replacing an earlier value).
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.metadata.push((key.to_string(), v)),
        }
        self
    }

    /// Adds metadata `key` even if it is already there (a duplicate key, for tests).
    pub fn meta_unchecked(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    fn size_of(ty: GgmlType, name: &str, shape: &[usize]) -> std::io::Result<u64> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        if shape.len() > MAX_DIMS || shape.contains(&0) {
            return Err(bad(format!("tensor {name}: shape {shape:?}")));
        }
        let n = shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d as u64))
            .ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
        let row = shape.last().copied().unwrap_or(1) as u64;
        if !row.is_multiple_of(ty.block_size() as u64) {
            return Err(bad(format!(
                "tensor {name}: rows of {row} values are not whole {ty} blocks"
            )));
        }
        ty.bytes_for(n)
            .ok_or_else(|| bad(format!("tensor {name}: size overflows")))
    }

    /// Adds tensor `name` of type `ty` and `shape` (PyTorch order) holding `bytes`, which
    /// must be its exact size.
    pub fn tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> std::io::Result<&mut Self> {
        let size = Self::size_of(ty, name, shape)?;
        if bytes.len() as u64 != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "tensor {name}: {} bytes given, {ty} {shape:?} is {size}",
                    bytes.len()
                ),
            ));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("tensor {name} added twice"),
            ));
        }
        self.push(name, ty.id(), shape, size, Data::Bytes(bytes));
        Ok(self)
    }

    /// Adds tensor `name` whose data `fill` writes when the file is written (it must write
    /// exactly the tensor's size): a large model is written without holding it in memory.
    pub fn tensor_with(
        &mut self,
        name: &str,
        ty: GgmlType,
        shape: &[usize],
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + 'a,
    ) -> std::io::Result<&mut Self> {
        let size = Self::size_of(ty, name, shape)?;
        self.push(name, ty.id(), shape, size, Data::Fill(Box::new(fill)));
        Ok(self)
    }

    /// Adds a tensor as given: any type id, any dimensions (GGUF order, innermost first),
    /// any bytes, whose size the header will say is `bytes.len()`' (for tests of bad files).
    pub fn tensor_unchecked(
        &mut self,
        name: &str,
        type_id: u32,
        dims: &[u64],
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(WTensor {
            name: name.to_string(),
            type_id,
            dims: dims.to_vec(),
            size: bytes.len() as u64,
            data: Data::Bytes(bytes),
        });
        self
    }

    fn push(&mut self, name: &str, type_id: u32, shape: &[usize], size: u64, data: Data<'a>) {
        self.tensors.push(WTensor {
            name: name.to_string(),
            type_id,
            dims: shape.iter().rev().map(|d| *d as u64).collect(),
            size,
            data,
        });
    }

    /// Writes the file to `w`.
    pub fn write(self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut head = b"GGUF".to_vec();
        head.extend_from_slice(&self.version.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut head, k);
            head.extend_from_slice(&v.value_type().id().to_le_bytes());
            write_value(&mut head, v);
        }
        let a = self.alignment;
        let up = |x: u64| x.div_ceil(a) * a;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.type_id.to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = up(offset + t.size);
        }
        let data_start = up(head.len() as u64);
        head.resize(data_start as usize, 0);
        w.write_all(&head)?;
        let mut pos = 0u64; // within the data section
        for (t, off) in self.tensors.into_iter().zip(offsets) {
            w.write_all(&vec![0u8; (off - pos) as usize])?;
            match t.data {
                Data::Bytes(b) => w.write_all(&b)?,
                Data::Fill(f) => {
                    let mut counted = Counted { w, n: 0 };
                    f(&mut counted)?;
                    if counted.n != t.size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "tensor {}: the fill wrote {} bytes, not {}",
                                t.name, counted.n, t.size
                            ),
                        ));
                    }
                }
            }
            pos = off + t.size;
        }
        Ok(())
    }

    /// The file as bytes.
    pub fn to_bytes(self) -> std::io::Result<Vec<u8>> {
        let mut v = Vec::new();
        self.write(&mut v)?;
        Ok(v)
    }

    /// Writes the file to `path` (buffered).
    pub fn write_file(self, path: &std::path::Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.write(&mut f)?;
        f.flush()
    }
}

struct Counted<'w> {
    w: &'w mut dyn Write,
    n: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            // An empty array's item type is not recorded in the value: u8 is written.
            let ty = items.first().map_or(ValueType::U8, |i| i.value_type());
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                write_value(out, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_names_and_sizes_are_llama_cpps() {
        // gguf-py's GGML_QUANT_SIZES, written out: (id, name, block size, bytes per block).
        let want: [(u32, &str, usize, usize); 35] = [
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (3, "Q4_1", 32, 20),
            (6, "Q5_0", 32, 22),
            (7, "Q5_1", 32, 24),
            (8, "Q8_0", 32, 34),
            (9, "Q8_1", 32, 36),
            (10, "Q2_K", 256, 84),
            (11, "Q3_K", 256, 110),
            (12, "Q4_K", 256, 144),
            (13, "Q5_K", 256, 176),
            (14, "Q6_K", 256, 210),
            (15, "Q8_K", 256, 292),
            (16, "IQ2_XXS", 256, 66),
            (17, "IQ2_XS", 256, 74),
            (18, "IQ3_XXS", 256, 98),
            (19, "IQ1_S", 256, 50),
            (20, "IQ4_NL", 32, 18),
            (21, "IQ3_S", 256, 110),
            (22, "IQ2_S", 256, 82),
            (23, "IQ4_XS", 256, 136),
            (24, "I8", 1, 1),
            (25, "I16", 1, 2),
            (26, "I32", 1, 4),
            (27, "I64", 1, 8),
            (28, "F64", 1, 8),
            (29, "IQ1_M", 256, 56),
            (30, "BF16", 1, 2),
            (34, "TQ1_0", 256, 54),
            (35, "TQ2_0", 256, 66),
            (39, "MXFP4", 32, 17),
            (40, "NVFP4", 64, 36),
            (41, "Q1_0", 128, 18),
            (42, "Q2_0", 64, 18),
        ];
        for (id, name, bs, ts) in want {
            let t = GgmlType::from_id(id).unwrap_or_else(|| panic!("id {id}"));
            assert_eq!(
                (t.id(), t.name(), t.block_size(), t.type_size()),
                (id, name, bs, ts)
            );
            assert_eq!(GgmlType::from_name(&name.to_lowercase()), Some(t));
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None, "{removed}");
        }
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
    }

    #[test]
    fn value_accessors_match_candles() {
        assert_eq!(Value::U32(7).to_u64(), Ok(7));
        assert_eq!(Value::Bool(true).to_u64(), Ok(1));
        assert!(Value::I32(7).to_u64().is_err());
        assert_eq!(
            Value::String("a".into()).to_string().map(|s| s.as_str()),
            Ok("a")
        );
        let e = Value::F32(1.0).to_u32().unwrap_err();
        assert!(e.to_string().contains("F32(1.0)"), "{e}");
        let e = Value::Array(vec![Value::U8(0); 1000]).to_u64().unwrap_err();
        assert!(e.to_string().contains("an array of 1000 items"), "{e}");
        // `?` works in functions returning the crate's errors, as with candle's Value.
        let f = || -> crate::Result<u64> { Ok(Value::I8(1).to_u64()?) };
        assert!(matches!(f(), Err(crate::ModelError::Metadata(_))));
    }
}
