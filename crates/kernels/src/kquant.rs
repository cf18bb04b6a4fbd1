//! llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) and MXFP4, held in GGUF's own row-major blocks and
//! multiplied by integer kernels that read those blocks as they are.
//!
//! **Formats** (ggml's, byte for byte; `d`, `dmin` are f16):
//! - **Q4_K**, 144 bytes per 256 weights: `d`, `dmin`, 12 bytes of eight 6-bit scales `sc` and
//!   mins `m` (one pair per 32 weights, packed as ggml's `get_scale_min_k4` reads them), 128
//!   bytes of nibbles: bytes `32c..32c+32` hold weights `64c..64c+32` in their low nibbles and
//!   `64c+32..64c+64` in their high ones. Weight `= d*sc*q - dmin*m`.
//! - **Q5_K**, 176 bytes: as Q4_K plus 32 bytes `qh` between the scales and the nibbles; bit `j`
//!   of `qh[l]` is bit 4 of weight `32j + l`.
//! - **Q6_K**, 210 bytes: 128 bytes of low nibbles `ql`, 64 bytes of 2-bit highs `qh`, 16
//!   signed scales (one per 16 weights), `d` last. In each half `h` of 128 weights, weight
//!   `128h + 32s + l` takes `ql[64h + 32(s%2) + l] >> 4(s/2)` and `qh[32h + l] >> 2s`. Weight
//!   `= d * sc * (q - 32)`.
//! - **MXFP4** (ggml type 39), 17 bytes per 32 weights: one e8m0 exponent `e`, then 16 bytes of
//!   e2m1 codes, weight `l` in the low nibble of byte `l` and weight `l + 16` in its high one
//!   (not the even/odd pairs of the safetensors layout, see [`crate::quant::dequantize_mxfp4`]).
//!   Weight `= KV[code] * 2^(e - 128)` with `KV` the e2m1 values doubled (integers, |v| <= 12).
//!
//! **Storage.** A weight is one or more segments of whole rows, each an `Arc` to bytes (owned,
//! or the mapped GGUF file) and an offset: nothing is repacked, so a GGUF tensor costs no
//! memory beyond the file's pages, and stacking gate and up ([`KQuantWeights::concat`])
//! appends segments instead of copying.
//!
//! **The matmul** quantizes each input row once per call into Q8_K-style blocks of 256: an f32
//! scale `dx = max|x| / 127`, 256 signed bytes, and the sums of each 16 of them. A Q4/5/6_K
//! block against one such block is then, with `q` the unsigned codes and `s`, `mm` per-16
//! integer scales (Q4/5_K: `sc`, `m` of the 32 the 16 are in; Q6_K: `sc`, `32 sc`, `dmin = d`):
//! `dx * (d * sum_g s_g * sum_{i in g} q_i x_i - dmin * sum_g mm_g * bsum_g)`, two exact
//! integer sums per block. An MXFP4 block is `2^(e - 128) * dx * sum KV x` per 32 weights. The
//! scalar path computes exactly these sums and is the oracle of the SIMD ones: AVX2
//! (`maddubs` + `madd`) and AVX-512 with VNNI (`maddubs` + `vpdpwssd`; MXFP4: groups of 4
//! blocks, `vpdpbusd` of the code values + 12 against x in the nibbles' order, each sum
//! started at `-12 * sum x`; AVX512_VBMI byte permutes unpack the blocks where the CPU has
//! them). Tasks split the output rows (and row blocks of the input, with
//! [`crate::packed`]'s split); a task decodes a weight block once for up to 4 input rows.
//! The activation rounding is the one error beyond the weights': at most `dx / 2` per input,
//! so an output is within `sum_b dx_b / 2 * sum_{i in b} |w_i|` of the dequantized weights'
//! exact product (the bound the tests check).

use half::f16;
use std::ops::Range;
use std::sync::Arc;

/// Weights per K-quant super-block, and inputs per activation block.
pub const QK_K: usize = 256;
/// Weights per MXFP4 block.
pub const QK_MXFP4: usize = 32;
/// Input rows per row block of the task split.
const MCK: usize = 64;

/// The e2m1 values doubled, by code (ggml's `kvalues_mxfp4`).
pub const MXFP4_KV: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `MXFP4_KV + 12`: unsigned, as the AVX-512 kernel's `vpdpbusd` wants its weights.
const MXFP4_KV12: [u8; 16] = [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// A block format of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KFormat {
    Q4K,
    Q5K,
    Q6K,
    Mxfp4,
}

impl KFormat {
    pub const ALL: [KFormat; 4] = [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K, KFormat::Mxfp4];

    /// Weights per block.
    pub const fn block_values(self) -> usize {
        match self {
            KFormat::Mxfp4 => QK_MXFP4,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 144,
            KFormat::Q5K => 176,
            KFormat::Q6K => 210,
            KFormat::Mxfp4 => 17,
        }
    }

    /// ggml's type id (the GGUF tensor type).
    pub const fn ggml_type(self) -> u32 {
        match self {
            KFormat::Q4K => 12,
            KFormat::Q5K => 13,
            KFormat::Q6K => 14,
            KFormat::Mxfp4 => 39,
        }
    }

    /// The format of ggml type id `t` (a GGUF tensor's type field), if it is one of these.
    pub fn from_ggml_type(t: u32) -> Option<Self> {
        KFormat::ALL.into_iter().find(|f| f.ggml_type() == t)
    }

    pub fn name(self) -> &'static str {
        match self {
            KFormat::Q4K => "q4_k",
            KFormat::Q5K => "q5_k",
            KFormat::Q6K => "q6_k",
            KFormat::Mxfp4 => "mxfp4",
        }
    }

    /// Bytes of a row of `k` weights (the last block zero-padded when `k` is not whole
    /// blocks, which a GGUF file never needs).
    pub const fn row_bytes(self, k: usize) -> usize {
        k.div_ceil(self.block_values()) * self.block_bytes()
    }

    /// One block's weights, in exactly the f32 operations of gguf-py's numpy dequantizer
    /// (`out` is `block_values()` long).
    pub fn dequantize_block(self, blk: &[u8], out: &mut [f32]) {
        match self {
            KFormat::Q4K | KFormat::Q5K => {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let (qh, qs) = if self == KFormat::Q5K {
                    (&blk[16..48], &blk[48..176])
                } else {
                    (&blk[0..0], &blk[16..144])
                };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, scales);
                    let dl = d * sc as f32;
                    let ml = dmin * m as f32;
                    let (c, shift) = (j / 2, 4 * (j % 2));
                    for l in 0..32 {
                        let mut q = (qs[32 * c + l] >> shift) & 0x0f;
                        if !qh.is_empty() {
                            q |= ((qh[l] >> j) & 1) << 4;
                        }
                        out[32 * j + l] = dl * q as f32 - ml;
                    }
                }
            }
            KFormat::Q6K => {
                let d = f16_at(blk, 208);
                for (i, o) in out.iter_mut().enumerate().take(QK_K) {
                    let q = q6_code(blk, i) as i8 - 32;
                    let dl = d * (blk[192 + i / 16] as i8) as f32;
                    *o = dl * q as f32;
                }
            }
            KFormat::Mxfp4 => {
                let d = e8m0_half(blk[0]);
                for l in 0..16 {
                    out[l] = d * MXFP4_KV[(blk[1 + l] & 0x0f) as usize] as f32;
                    out[l + 16] = d * MXFP4_KV[(blk[1 + l] >> 4) as usize] as f32;
                }
            }
        }
    }

    /// Quantizes one block (`x` is `block_values()` long) into `blk`: a plain round-to-nearest
    /// of each (sub-)block against its range, not llama.cpp's error-minimising search (the
    /// formats, not this quantizer, are what GGUF files need; this serves `--quantization`
    /// and the tests).
    // Weight indices address the input and several packed fields at once.
    #[allow(clippy::needless_range_loop)]
    pub fn quantize_block(self, x: &[f32], blk: &mut [u8]) {
        blk.fill(0);
        match self {
            KFormat::Q4K | KFormat::Q5K => {
                let levels = if self == KFormat::Q5K { 31.0 } else { 15.0 };
                let mut scale = [0f32; 8];
                let mut min = [0f32; 8];
                for j in 0..8 {
                    let sub = &x[32 * j..32 * j + 32];
                    let lo = sub.iter().fold(0f32, |m, v| m.min(*v));
                    let hi = sub.iter().fold(lo, |m, v| m.max(*v));
                    scale[j] = (hi - lo) / levels;
                    min[j] = -lo;
                }
                let d = f16::from_f32(scale.iter().fold(0f32, |m, v| m.max(*v)) / 63.0);
                let dmin = f16::from_f32(min.iter().fold(0f32, |m, v| m.max(*v)) / 63.0);
                blk[0..2].copy_from_slice(&d.to_le_bytes());
                blk[2..4].copy_from_slice(&dmin.to_le_bytes());
                let six = |v: f32, unit: f32| -> u8 {
                    if unit > 0.0 && v > 0.0 {
                        ((v / unit).round() as i32).clamp(1, 63) as u8
                    } else {
                        0
                    }
                };
                let (d, dmin) = (d.to_f32(), dmin.to_f32());
                let q_at = if self == KFormat::Q5K { 48 } else { 16 };
                for j in 0..8 {
                    let (sc, m) = (six(scale[j], d), six(min[j], dmin));
                    // ggml's get_scale_min_k4, inverted.
                    if j < 4 {
                        blk[4 + j] |= sc;
                        blk[4 + j + 4] |= m;
                    } else {
                        blk[4 + j + 4] |= (sc & 0x0f) | ((m & 0x0f) << 4);
                        blk[4 + j - 4] |= (sc >> 4) << 6;
                        blk[4 + j] |= (m >> 4) << 6;
                    }
                    let (ds, dm) = (d * sc as f32, dmin * m as f32);
                    for l in 0..32 {
                        let q = if ds > 0.0 {
                            ((x[32 * j + l] + dm) / ds).round().clamp(0.0, levels) as u8
                        } else {
                            0
                        };
                        blk[q_at + 32 * (j / 2) + l] |= (q & 0x0f) << (4 * (j % 2));
                        if self == KFormat::Q5K {
                            blk[16 + l] |= (q >> 4) << j;
                        }
                    }
                }
            }
            KFormat::Q6K => {
                // Per 16 weights a signed scale that puts the largest magnitude at -32.
                let mut s = [0f32; 16];
                for (g, s) in s.iter_mut().enumerate() {
                    let sub = &x[16 * g..16 * g + 16];
                    let big = sub
                        .iter()
                        .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                    *s = big / -32.0;
                }
                let d = f16::from_f32(s.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
                blk[208..210].copy_from_slice(&d.to_le_bytes());
                let d = d.to_f32();
                for g in 0..16 {
                    let sc = if d > 0.0 {
                        ((s[g] / d).round() as i32).clamp(-128, 127) as i8
                    } else {
                        0
                    };
                    blk[192 + g] = sc as u8;
                    let ds = d * sc as f32;
                    for i in 16 * g..16 * g + 16 {
                        let q = if ds != 0.0 {
                            ((x[i] / ds).round() as i32).clamp(-32, 31)
                        } else {
                            0
                        };
                        let q = (q + 32) as u8;
                        let (h, r) = (i / 128, i % 128);
                        let (s, l) = (r / 32, r % 32);
                        blk[64 * h + 32 * (s % 2) + l] |= (q & 0x0f) << (4 * (s / 2));
                        blk[128 + 32 * h + l] |= (q >> 4) << (2 * s);
                    }
                }
            }
            KFormat::Mxfp4 => {
                // gguf-py's rule: the exponent that puts the largest magnitude in [4, 8)
                // halves of a step, then the nearest code (the first on a tie).
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = if amax > 0.0 {
                    (amax.log2().floor() as i32 - 2 + 127).clamp(0, 254) as u8
                } else {
                    0
                };
                blk[0] = e;
                let d = e8m0_half(e);
                let code = |v: f32| -> u8 {
                    let mut best = (f32::INFINITY, 0u8);
                    for (c, kv) in MXFP4_KV.iter().enumerate() {
                        let err = (d * *kv as f32 - v).abs();
                        if err < best.0 {
                            best = (err, c as u8);
                        }
                    }
                    best.1
                };
                for l in 0..16 {
                    blk[1 + l] = code(x[l]) | (code(x[l + 16]) << 4);
                }
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and min `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The unsigned 6-bit code (0..=63) of weight `i` of a Q6_K block.
fn q6_code(blk: &[u8], i: usize) -> u8 {
    let (h, r) = (i / 128, i % 128);
    let (s, l) = (r / 32, r % 32);
    let lo = (blk[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0f;
    let hi = (blk[128 + 32 * h + l] >> (2 * s)) & 3;
    lo | (hi << 4)
}

/// Half of an e8m0 scale: `2^(e - 128)`, exactly (ggml's `ggml_e8m0_to_fp32_half`).
pub fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000u32 << e)
    } else {
        f32::from_bits(((e - 1) as u32) << 23)
    }
}

/// A Q4/5/6_K block as the integer dot reads it: weight `i` is
/// `d * s[i / 16] * q[i] - dmin * mm[i / 16]`.
struct Decoded {
    q: [u8; QK_K],
    s: [i16; 16],
    mm: [i16; 16],
    d: f32,
    dmin: f32,
}

fn decode(format: KFormat, blk: &[u8]) -> Decoded {
    let mut out = Decoded {
        q: [0; QK_K],
        s: [0; 16],
        mm: [0; 16],
        d: 0.0,
        dmin: 0.0,
    };
    match format {
        KFormat::Q4K | KFormat::Q5K => {
            out.d = f16_at(blk, 0);
            out.dmin = f16_at(blk, 2);
            let five = format == KFormat::Q5K;
            let qs = if five { &blk[48..176] } else { &blk[16..144] };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &blk[4..16]);
                out.s[2 * j] = sc as i16;
                out.s[2 * j + 1] = sc as i16;
                out.mm[2 * j] = m as i16;
                out.mm[2 * j + 1] = m as i16;
                for l in 0..32 {
                    let mut q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
                    if five {
                        q |= ((blk[16 + l] >> j) & 1) << 4;
                    }
                    out.q[32 * j + l] = q;
                }
            }
        }
        KFormat::Q6K => {
            out.d = f16_at(blk, 208);
            out.dmin = out.d;
            for (i, q) in out.q.iter_mut().enumerate() {
                *q = q6_code(blk, i);
            }
            for g in 0..16 {
                let sc = blk[192 + g] as i8 as i16;
                out.s[g] = sc;
                out.mm[g] = 32 * sc;
            }
        }
        KFormat::Mxfp4 => unreachable!("MXFP4 blocks are read directly"),
    }
    out
}

/// Input rows quantized to Q8_K-style blocks of 256 (zero-padded past `k`): `q`
/// `[rows][kb * 256]`, `d` `[rows][kb]`, `bsums` (sums of each 16 `q`) `[rows][kb * 16]`.
pub(crate) struct KRows {
    q: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i16>,
    /// Sums of each 32 `q` (the pairs of `bsums`) `[rows][kb * 8]`: Q4_K's mins term.
    bsums32: Vec<i16>,
    kb: usize,
    /// For the AVX-512 MXFP4 kernel ([`KRows::with_mxfp4`]; empty otherwise): `q`,
    /// `[rows][kb * 256]`, each group of 4 blocks of 32 (128 values) stored as the first 16
    /// values of each block, then the last 16 of each (the order of the low and high nibbles
    /// of the 4 blocks' codes).
    mx: Vec<i8>,
    /// With `mx`: per group, `-12 *` the sum of the (low and high) 4 values of each of the 16
    /// dword lanes, `[rows][kb * 2][16]`: the kernel multiplies `code value + 12` (unsigned)
    /// and starts each lane's sum here.
    mx_corr: Vec<i32>,
}

/// `y` rounded to the nearest integer, ties to even (as ggml's `nearest_int`), for
/// `|y| < 2^22`: adding and removing 1.5 * 2^23 leaves the rounding to the FPU. Unlike
/// `f32::round` (a libm call on baseline x86-64) this vectorizes; input quantization of
/// every matmul call runs through it.
#[inline(always)]
fn round_even(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y + MAGIC) - MAGIC
}

impl KRows {
    pub(crate) fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let kb = k.div_ceil(QK_K);
        let mut q = vec![0i8; rows * kb * QK_K];
        let mut d = vec![0f32; rows * kb];
        let mut bsums = vec![0i16; rows * kb * 16];
        for t in 0..rows {
            let row = &x[t * k..(t + 1) * k];
            for b in 0..kb {
                let part = &row[b * QK_K..((b + 1) * QK_K).min(k)];
                let amax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = amax / 127.0;
                let id = if s != 0.0 { 1.0 / s } else { 0.0 };
                let at = (t * kb + b) * QK_K;
                for (o, v) in q[at..at + part.len()].iter_mut().zip(part) {
                    *o = round_even(v * id) as i8;
                }
                for g in 0..16 {
                    bsums[(t * kb + b) * 16 + g] = q[at + 16 * g..at + 16 * g + 16]
                        .iter()
                        .map(|v| *v as i16)
                        .sum();
                }
                d[t * kb + b] = s;
            }
        }
        let bsums32 = bsums.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        Self {
            q,
            d,
            bsums,
            bsums32,
            kb,
            mx: Vec::new(),
            mx_corr: Vec::new(),
        }
    }

    /// Adds the layout the AVX-512 MXFP4 kernel reads (see the fields `mx` and `mx_corr`).
    pub(crate) fn with_mxfp4(mut self) -> Self {
        let mut mx = vec![0i8; self.q.len()];
        let mut corr = vec![0i32; self.q.len() / 128 * 16];
        for ((src, dst), c) in self
            .q
            .chunks_exact(128)
            .zip(mx.chunks_exact_mut(128))
            .zip(corr.chunks_exact_mut(16))
        {
            for blk in 0..4 {
                dst[blk * 16..blk * 16 + 16].copy_from_slice(&src[blk * 32..blk * 32 + 16]);
                dst[64 + blk * 16..64 + blk * 16 + 16]
                    .copy_from_slice(&src[blk * 32 + 16..blk * 32 + 32]);
            }
            for (lane, c) in c.iter_mut().enumerate() {
                let sum: i32 = (0..4)
                    .map(|i| dst[lane * 4 + i] as i32 + dst[64 + lane * 4 + i] as i32)
                    .sum();
                *c = -12 * sum;
            }
        }
        self.mx = mx;
        self.mx_corr = corr;
        self
    }

    fn block(&self, t: usize, b: usize) -> &[i8] {
        let at = (t * self.kb + b) * QK_K;
        &self.q[at..at + QK_K]
    }

    fn scale(&self, t: usize, b: usize) -> f32 {
        self.d[t * self.kb + b]
    }

    fn bsums(&self, t: usize, b: usize) -> &[i16] {
        let at = (t * self.kb + b) * 16;
        &self.bsums[at..at + 16]
    }
}

/// Bytes a segment points into: owned, or a mapped file.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
struct Segment {
    bytes: SharedBytes,
    /// Offset of the segment's first row in `bytes`.
    start: usize,
    rows: usize,
    format: KFormat,
    row_bytes: usize,
}

impl Segment {
    fn data(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }
}

/// A `[n, k]` weight in [`KFormat`] blocks, row-major as GGUF stores them, in segments of
/// whole rows (see the module doc), each segment in one format: a stack of tensors of
/// different K-quants (Q4_K_M's Q4_K q/k and Q6_K v) is one weight. Cheap to clone (shared).
#[derive(Clone)]
pub struct KQuantWeights {
    n: usize,
    k: usize,
    segs: Vec<Segment>,
}

impl std::fmt::Debug for KQuantWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KQuantWeights<{}>[{}, {}] in {} segment(s)",
            self.segs
                .iter()
                .map(|s| s.format.name())
                .collect::<Vec<_>>()
                .join("+"),
            self.n,
            self.k,
            self.segs.len()
        )
    }
}

impl KQuantWeights {
    /// Rows `n` of `k` weights at `range` of `bytes` (a GGUF tensor's bytes in the mapped file,
    /// or owned ones): the blocks are used where they are. Errors when the range does not hold
    /// exactly `n` rows of whole blocks or lies outside `bytes`.
    pub fn from_shared(
        bytes: SharedBytes,
        range: Range<usize>,
        n: usize,
        k: usize,
        format: KFormat,
    ) -> Result<Self, String> {
        let bv = format.block_values();
        if !k.is_multiple_of(bv) {
            return Err(format!(
                "rows of {k} values are not whole {} blocks of {bv}",
                format.name()
            ));
        }
        let row_bytes = format.row_bytes(k);
        let len = (*bytes).as_ref().len();
        if range.end < range.start || range.end > len {
            return Err(format!(
                "bytes {range:?} lie outside the {len} bytes they are cut from"
            ));
        }
        if range.len() != n * row_bytes {
            return Err(format!(
                "{} bytes are not {n} rows of {k} {} values ({} bytes)",
                range.len(),
                format.name(),
                n * row_bytes
            ));
        }
        Ok(Self {
            n,
            k,
            segs: vec![Segment {
                bytes,
                start: range.start,
                rows: n,
                format,
                row_bytes,
            }],
        })
    }

    /// [`KQuantWeights::from_shared`] over owned bytes (all of them).
    pub fn from_bytes(bytes: Vec<u8>, n: usize, k: usize, format: KFormat) -> Result<Self, String> {
        let len = bytes.len();
        Self::from_shared(Arc::new(bytes), 0..len, n, k, format)
    }

    /// Quantizes a row-major `[n, k]` f32 weight (rows zero-padded to whole blocks) with
    /// [`KFormat::quantize_block`].
    pub fn quantize(w: &[f32], n: usize, k: usize, format: KFormat) -> Self {
        assert_eq!(w.len(), n * k, "w must be [n, k]");
        let (bv, bb) = (format.block_values(), format.block_bytes());
        let row_bytes = format.row_bytes(k);
        let mut bytes = vec![0u8; n * row_bytes];
        let mut x = vec![0f32; bv];
        for j in 0..n {
            for b in 0..k.div_ceil(bv) {
                let part = &w[j * k + b * bv..j * k + ((b + 1) * bv).min(k)];
                x.fill(0.0);
                x[..part.len()].copy_from_slice(part);
                let at = j * row_bytes + b * bb;
                format.quantize_block(&x, &mut bytes[at..at + bb]);
            }
        }
        Self {
            n,
            k,
            segs: vec![Segment {
                bytes: Arc::new(bytes),
                start: 0,
                rows: n,
                format,
                row_bytes,
            }],
        }
    }

    /// The format of the first rows (of every row unless [`KQuantWeights::formats`] lists
    /// several).
    pub fn format(&self) -> KFormat {
        self.segs.first().map_or(KFormat::Q4K, |s| s.format)
    }

    /// Each run of rows in one format: `(format, rows)`, in row order.
    pub fn formats(&self) -> Vec<(KFormat, usize)> {
        let mut out: Vec<(KFormat, usize)> = Vec::new();
        for s in &self.segs {
            match out.last_mut() {
                Some((f, rows)) if *f == s.format => *rows += s.rows,
                _ => out.push((s.format, s.rows)),
            }
        }
        out
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes of the blocks (owned or mapped).
    pub fn resident_bytes(&self) -> usize {
        self.segs.iter().map(|s| s.rows * s.row_bytes).sum()
    }

    /// The blocks of output row `j`.
    pub fn row(&self, j: usize) -> &[u8] {
        self.row_in_format(j).1
    }

    /// The format and blocks of output row `j`.
    fn row_in_format(&self, j: usize) -> (KFormat, &[u8]) {
        let mut r = j;
        for s in &self.segs {
            if r < s.rows {
                let at = s.start + r * s.row_bytes;
                return (s.format, &s.data()[at..at + s.row_bytes]);
            }
            r -= s.rows;
        }
        panic!("row {j} of {self:?}");
    }

    /// The runs of `cols` in one format.
    fn runs(&self, cols: Range<usize>) -> Vec<(KFormat, Range<usize>)> {
        let mut out = Vec::new();
        let mut at = 0;
        for (f, rows) in self.formats() {
            let (a, b) = (at.max(cols.start), (at + rows).min(cols.end));
            if a < b {
                out.push((f, a..b));
            }
            at += rows;
        }
        out
    }

    /// The stretches of `cols` that lie in one segment each, as `(j0, count, first,
    /// row_bytes)`: rows `j0..j0 + count`, row `j0 + i` at `first + i * row_bytes`. The kernels
    /// walk these once per tile instead of looking each row up. (A list, not a closure: a
    /// closure called from a kernel would be compiled without its target features.)
    fn stretches(&self, cols: Range<usize>) -> Vec<(usize, usize, *const u8, usize)> {
        let mut out = Vec::with_capacity(2);
        let mut at = 0;
        for s in &self.segs {
            let (a, b) = (at.max(cols.start), (at + s.rows).min(cols.end));
            if a < b {
                let first = s.data()[s.start + (a - at) * s.row_bytes..].as_ptr();
                out.push((a, b - a, first, s.row_bytes));
            }
            at += s.rows;
        }
        out
    }

    /// Output row `j`, dequantized, into `out` (`k` values).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        let (format, row) = self.row_in_format(j);
        let (bv, bb) = (format.block_values(), format.block_bytes());
        let mut v = vec![0f32; bv];
        for b in 0..self.k.div_ceil(bv) {
            format.dequantize_block(&row[b * bb..(b + 1) * bb], &mut v);
            let end = ((b + 1) * bv).min(self.k);
            out[b * bv..end].copy_from_slice(&v[..end - b * bv]);
        }
    }

    /// The row-major `[n, k]` weight, dequantized (gguf-py's values, bit for bit).
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.k;
        let mut w = vec![0f32; self.n * k];
        for j in 0..self.n {
            self.row_into(j, &mut w[j * k..(j + 1) * k]);
        }
        w
    }

    /// Whether both start on the same bytes (a tied LM head and embedding).
    pub fn shares(&self, other: &KQuantWeights) -> bool {
        match (self.segs.first(), other.segs.first()) {
            (Some(a), Some(b)) => {
                std::ptr::eq(a.data().as_ptr(), b.data().as_ptr()) && a.start == b.start
            }
            _ => false,
        }
    }

    /// How many segments the rows are in (1 for a tensor; more for a stack).
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// The weights of `parts` stacked along `n`: their segments one after the other, no byte
    /// copied. All must have the same `k`; formats may differ.
    pub fn concat(parts: &[&KQuantWeights]) -> Self {
        let k = parts.first().expect("at least one part").k;
        assert!(parts.iter().all(|p| p.k == k), "stacked weights need one k");
        Self {
            n: parts.iter().map(|p| p.n).sum(),
            k,
            segs: parts.iter().flat_map(|p| p.segs.iter().cloned()).collect(),
        }
    }

    /// The input rows quantized for this weight's kernels (with the MXFP4 layout when a segment
    /// is MXFP4).
    fn rows_for(&self, x: &[f32], rows: usize) -> KRows {
        let xq = KRows::new(x, rows, self.k);
        if self.segs.iter().any(|s| s.format == KFormat::Mxfp4) {
            xq.with_mxfp4()
        } else {
            xq
        }
    }

    /// `out[t, j] = sum_i x[t, i] * w[j, i]` for the columns `cols` (`PackedWeights::
    /// matmul_cols` checks its arguments and calls this). Runs on the current rayon pool.
    pub(crate) fn matmul_cols(&self, x: &[f32], rows: usize, cols: Range<usize>, out: &mut [f32]) {
        debug_assert!(cols.end <= self.n && out.len() == rows * self.n);
        let xq = self.rows_for(x, rows);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        crate::packed::for_each_tile(rows, MCK, cols, 8, |rows, cols| {
            // SAFETY: tasks write disjoint (row block, column range) tiles of `out`.
            unsafe { self.tile(&xq, rows, cols, out_ptr) };
        });
    }

    /// The whole product as one tile with the kernels of `simd` (which the CPU must support),
    /// on this thread: the tests' way to run every instruction set against the scalar path.
    pub fn matmul_with(&self, simd: crate::simd::Simd, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(
            simd <= crate::simd::detected_simd(),
            "{simd:?} not on this CPU"
        );
        assert_eq!(x.len(), rows * self.k, "x must be [rows, k]");
        assert_eq!(out.len(), rows * self.n, "out must be [rows, n]");
        let xq = self.rows_for(x, rows);
        // SAFETY: one tile covering the whole output; the CPU supports `simd` (checked).
        unsafe { self.tile_with(simd, &xq, 0..rows, 0..self.n, SyncPtr(out.as_mut_ptr())) }
    }

    /// # Safety
    /// No CPU feature is needed: the level is [`crate::simd()`]'s, which the CPU supports. `out`
    /// must point to this product's row-major output (`rows x n`), valid for writing every element
    /// of the tile, and no other thread may write those elements meanwhile (each task owns its
    /// tile).
    unsafe fn tile(&self, xq: &KRows, rows: Range<usize>, cols: Range<usize>, out: SyncPtr) {
        unsafe { self.tile_with(crate::simd::simd(), xq, rows, cols, out) }
    }

    /// # Safety
    /// `simd` must be a level the CPU supports (at most [`crate::simd::detected_simd`]). `out` must
    /// point to this product's row-major output (`rows x n`), valid for writing every element of
    /// the tile, and no other thread may write those elements meanwhile (each task owns its tile).
    unsafe fn tile_with(
        &self,
        simd: crate::simd::Simd,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: SyncPtr,
    ) {
        unsafe {
            #[cfg(target_arch = "x86_64")]
            {
                use crate::simd::Simd;
                if simd >= Simd::Avx512 && avx512::has_vnni() {
                    for (f, cols) in self.runs(cols) {
                        if f == KFormat::Mxfp4 && avx512::has_vbmi() {
                            avx512::tile_vbmi(self, xq, rows.clone(), cols, out.0);
                        } else {
                            avx512::tile(self, f, xq, rows.clone(), cols, out.0);
                        }
                    }
                    return;
                }
                if simd >= Simd::Avx2 {
                    for (f, cols) in self.runs(cols) {
                        avx2::tile(self, f, xq, rows.clone(), cols, out.0);
                    }
                    return;
                }
            }
            let _ = simd;
            self.tile_scalar(xq, rows, cols, out)
        }
    }

    /// The oracle of the SIMD paths, and the path of CPUs without them: the integer sums of
    /// the module doc, one output at a time.
    ///
    /// # Safety
    /// No CPU feature is needed. `out` must point to this product's row-major output (`rows x n`),
    /// valid for writing every element of the tile, and no other thread may write those elements
    /// meanwhile (each task owns its tile).
    unsafe fn tile_scalar(&self, xq: &KRows, rows: Range<usize>, cols: Range<usize>, out: SyncPtr) {
        unsafe {
            for j in cols {
                let (format, row) = self.row_in_format(j);
                let bb = format.block_bytes();
                for t in rows.clone() {
                    let mut acc = 0f32;
                    if format == KFormat::Mxfp4 {
                        for b in 0..self.k.div_ceil(QK_MXFP4) {
                            let blk = &row[b * bb..(b + 1) * bb];
                            let (xb, o) = (b / 8, (b % 8) * QK_MXFP4);
                            let x = &xq.block(t, xb)[o..o + QK_MXFP4];
                            let mut dot = 0i32;
                            for l in 0..16 {
                                dot += MXFP4_KV[(blk[1 + l] & 0x0f) as usize] as i32 * x[l] as i32;
                                dot +=
                                    MXFP4_KV[(blk[1 + l] >> 4) as usize] as i32 * x[l + 16] as i32;
                            }
                            acc += (e8m0_half(blk[0]) * xq.scale(t, xb)) * dot as f32;
                        }
                    } else {
                        for b in 0..self.k.div_ceil(QK_K) {
                            let dec = decode(format, &row[b * bb..(b + 1) * bb]);
                            let x = xq.block(t, b);
                            let mut isum = 0i32;
                            for g in 0..16 {
                                let dot: i32 = (16 * g..16 * g + 16)
                                    .map(|i| dec.q[i] as i32 * x[i] as i32)
                                    .sum();
                                isum += dec.s[g] as i32 * dot;
                            }
                            let msum: i32 = (0..16)
                                .map(|g| dec.mm[g] as i32 * xq.bsums(t, b)[g] as i32)
                                .sum();
                            let dx = xq.scale(t, b);
                            acc += (dec.d * dx) * isum as f32 - (dec.dmin * dx) * msum as f32;
                        }
                    }
                    *out.0.add(t * self.n + j) = acc;
                }
            }
        }
    }
}

use crate::SyncPtr;

/// The kernels' format parameter (a const generic).
const F_Q4K: u8 = 0;
const F_Q5K: u8 = 1;
const F_Q6K: u8 = 2;
/// Block bytes by the kernels' format parameter.
const F_BYTES: [usize; 3] = [
    KFormat::Q4K.block_bytes(),
    KFormat::Q5K.block_bytes(),
    KFormat::Q6K.block_bytes(),
];

/// AVX2: a weight block decoded to 8 vectors of 32 unsigned codes (weights in order) and 8
/// vectors of 16-bit scales laid out against `maddubs`'s pair sums; per input row
/// `maddubs(q, x)` then `madd` with the scales, summed over the block in 32-bit lanes (exact),
/// then scaled into f32 accumulators.
#[cfg(target_arch = "x86_64")]
// Row indices address several register arrays at once.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct Dec {
        pub q: [__m256i; 8],
        /// Lanes 0-7 scale weights 0-15 of the 32, lanes 8-15 weights 16-31.
        pub s: [__m256i; 8],
        pub mm: __m256i,
        pub d: f32,
        pub dmin: f32,
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `p` must be valid for reading every element the description above says is read
    /// through it.
    #[inline(always)]
    pub(super) unsafe fn decode<const F: u8>(p: *const u8) -> Dec {
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut q = [_mm256_setzero_si256(); 8];
            let mut s = [_mm256_setzero_si256(); 8];
            let mut mm = [0i16; 16];
            let blk = std::slice::from_raw_parts(p, F_BYTES[F as usize]);
            let (d, dmin);
            if F == F_Q6K {
                d = f16_at(blk, 208);
                dmin = d;
                let (ql, qh) = (p, p.add(128));
                let m3 = _mm256_set1_epi8(3);
                for h in 0..2 {
                    let a = _mm256_loadu_si256(ql.add(64 * h) as *const __m256i);
                    let b = _mm256_loadu_si256(ql.add(64 * h + 32) as *const __m256i);
                    let hh = _mm256_loadu_si256(qh.add(32 * h) as *const __m256i);
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(hh, m3), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 2), m3), 4);
                    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 4), m3), 4);
                    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hh, 6), m3), 4);
                    q[4 * h] = _mm256_or_si256(_mm256_and_si256(a, m4), h0);
                    q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b, m4), h1);
                    q[4 * h + 2] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), h2);
                    q[4 * h + 3] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4), h3);
                }
                for c in 0..8 {
                    let (a, b) = (blk[192 + 2 * c] as i8 as i16, blk[193 + 2 * c] as i8 as i16);
                    s[c] = _mm256_set_m128i(_mm_set1_epi16(b), _mm_set1_epi16(a));
                    mm[2 * c] = 32 * a;
                    mm[2 * c + 1] = 32 * b;
                }
            } else {
                d = f16_at(blk, 0);
                dmin = f16_at(blk, 2);
                let qs = p.add(if F == F_Q5K { 48 } else { 16 });
                for c in 0..4 {
                    let v = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                    q[2 * c] = _mm256_and_si256(v, m4);
                    q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                }
                if F == F_Q5K {
                    let one = _mm256_set1_epi8(1);
                    let mut hb = _mm256_loadu_si256(p.add(16) as *const __m256i);
                    for q in q.iter_mut() {
                        let bit = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
                        *q = _mm256_or_si256(*q, bit);
                        hb = _mm256_srli_epi16(hb, 1);
                    }
                }
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, &blk[4..16]);
                    s[j] = _mm256_set1_epi16(sc as i16);
                    mm[2 * j] = m as i16;
                    mm[2 * j + 1] = m as i16;
                }
            }
            Dec {
                q,
                s,
                mm: _mm256_loadu_si256(mm.as_ptr() as *const __m256i),
                d,
                dmin,
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`.
    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Output `j` for input rows `t0..t0 + R`.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `out` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    unsafe fn micro<const F: u8, const R: usize>(
        w: &KQuantWeights,
        xq: &KRows,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let row = w.row(j).as_ptr();
            let bb = F_BYTES[F as usize];
            let mut accd = [_mm256_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for b in 0..w.k.div_ceil(QK_K) {
                let dec = decode::<F>(row.add(b * bb));
                for r in 0..R {
                    let t = t0 + r;
                    let xp = xq.q.as_ptr().add((t * xq.kb + b) * QK_K);
                    let mut isum = _mm256_setzero_si256();
                    for c in 0..8 {
                        let xv = _mm256_loadu_si256(xp.add(32 * c) as *const __m256i);
                        let p = _mm256_maddubs_epi16(dec.q[c], xv);
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, dec.s[c]));
                    }
                    let bs = _mm256_loadu_si256(
                        xq.bsums.as_ptr().add((t * xq.kb + b) * 16) as *const __m256i
                    );
                    let msum = _mm256_madd_epi16(dec.mm, bs);
                    let dx = *xq.d.get_unchecked(t * xq.kb + b);
                    accd[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum),
                        _mm256_set1_ps(dec.d * dx),
                        accd[r],
                    );
                    accm[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(msum),
                        _mm256_set1_ps(dec.dmin * dx),
                        accm[r],
                    );
                }
            }
            for r in 0..R {
                *out.add((t0 + r) * w.n + j) = hsum(_mm256_sub_ps(accd[r], accm[r]));
            }
        }
    }

    /// One MXFP4 block's 32 weights as signed bytes, in order.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `p` must be valid for reading every element the description above says is read
    /// through it.
    #[inline(always)]
    pub(super) unsafe fn mx_weights(p: *const u8) -> __m256i {
        unsafe {
            let tbl = _mm_loadu_si128(MXFP4_KV.as_ptr() as *const __m128i);
            let m4 = _mm_set1_epi8(0x0f);
            let v = _mm_loadu_si128(p.add(1) as *const __m128i);
            let lo = _mm_shuffle_epi8(tbl, _mm_and_si128(v, m4));
            let hi = _mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(v, 4), m4));
            _mm256_set_m128i(hi, lo)
        }
    }

    /// MXFP4 output `j` for input rows `t0..t0 + R`; blocks `b0..` of the row (the AVX-512
    /// path hands its odd last block here, into `acc`).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `row` must be valid for reading every element the description above says is read
    /// through it.
    #[inline(always)]
    pub(super) unsafe fn mx_blocks<const R: usize>(
        row: *const u8,
        xq: &KRows,
        blocks: Range<usize>,
        t0: usize,
        acc: &mut [__m256; R],
    ) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            for b in blocks {
                let p = row.add(b * 17);
                let wv = mx_weights(p);
                let aw = _mm256_sign_epi8(wv, wv);
                let s = e8m0_half(*p);
                let (xb, o) = (b / 8, (b % 8) * QK_MXFP4);
                for r in 0..R {
                    let t = t0 + r;
                    let xp = xq.q.as_ptr().add((t * xq.kb + xb) * QK_K + o);
                    let xv = _mm256_loadu_si256(xp as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                    let dot = _mm256_madd_epi16(p16, ones);
                    let sc = _mm256_set1_ps(s * *xq.d.get_unchecked(t * xq.kb + xb));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[r]);
                }
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `out` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    unsafe fn mx_micro<const R: usize>(
        w: &KQuantWeights,
        xq: &KRows,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            mx_blocks::<R>(
                w.row(j).as_ptr(),
                xq,
                0..w.k.div_ceil(QK_MXFP4),
                t0,
                &mut acc,
            );
            for (r, a) in acc.iter().enumerate() {
                *out.add((t0 + r) * w.n + j) = hsum(*a);
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `out` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    unsafe fn tile_of<const F: u8>(
        w: &KQuantWeights,
        format: KFormat,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        unsafe {
            let mx = format == KFormat::Mxfp4;
            for j in cols {
                let mut t = rows.start;
                while t + 4 <= rows.end {
                    if mx {
                        mx_micro::<4>(w, xq, j, t, out);
                    } else {
                        micro::<F, 4>(w, xq, j, t, out);
                    }
                    t += 4;
                }
                match (rows.end - t, mx) {
                    (3, true) => mx_micro::<3>(w, xq, j, t, out),
                    (2, true) => mx_micro::<2>(w, xq, j, t, out),
                    (1, true) => mx_micro::<1>(w, xq, j, t, out),
                    (3, false) => micro::<F, 3>(w, xq, j, t, out),
                    (2, false) => micro::<F, 2>(w, xq, j, t, out),
                    (1, false) => micro::<F, 1>(w, xq, j, t, out),
                    _ => {}
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    /// Columns `cols`, all rows of the weight in `format`.
    ///
    /// # Safety
    /// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional
    /// extensions this module asks for) first. `out` must be valid for writing every element the
    /// description above says is written through it, and no other thread may access them meanwhile.
    pub(super) unsafe fn tile(
        w: &KQuantWeights,
        format: KFormat,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        unsafe {
            match format {
                KFormat::Q4K | KFormat::Mxfp4 => tile_of::<F_Q4K>(w, format, xq, rows, cols, out),
                KFormat::Q5K => tile_of::<F_Q5K>(w, format, xq, rows, cols, out),
                KFormat::Q6K => tile_of::<F_Q6K>(w, format, xq, rows, cols, out),
            }
        }
    }
}

/// AVX-512 with VNNI: the AVX2 decode's vectors joined in pairs (64 weights a register); per
/// input row `maddubs` then `vpdpwssd` with the scales (exact 32-bit sums). MXFP4: two blocks
/// a register, `vpdpbusd` of |w| against x with w's sign (`x` is within +-127, so negating it
/// cannot overflow).
#[cfg(target_arch = "x86_64")]
// Row indices address several register arrays at once.
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::avx2::{decode, hsum, mx_blocks};
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`.
    #[inline(always)]
    unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
        unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi) }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    unsafe fn micro<const F: u8, const R: usize>(
        w: &KQuantWeights,
        xq: &KRows,
        row: *const u8,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let bb = F_BYTES[F as usize];
            let mut accd = [_mm512_setzero_ps(); R];
            let mut accm = [_mm256_setzero_ps(); R];
            for b in 0..w.k.div_ceil(QK_K) {
                let dec = decode::<F>(row.add(b * bb));
                let mut q = [_mm512_setzero_si512(); 4];
                let mut s = [_mm512_setzero_si512(); 4];
                for c in 0..4 {
                    q[c] = join(dec.q[2 * c], dec.q[2 * c + 1]);
                    s[c] = join(dec.s[2 * c], dec.s[2 * c + 1]);
                }
                for r in 0..R {
                    let t = t0 + r;
                    let xp = xq.q.as_ptr().add((t * xq.kb + b) * QK_K);
                    let mut isum = _mm512_setzero_si512();
                    for c in 0..4 {
                        let xv = _mm512_loadu_si512(xp.add(64 * c) as *const _);
                        isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[c], xv), s[c]);
                    }
                    let bs = _mm256_loadu_si256(
                        xq.bsums.as_ptr().add((t * xq.kb + b) * 16) as *const __m256i
                    );
                    let msum = _mm256_madd_epi16(dec.mm, bs);
                    let dx = *xq.d.get_unchecked(t * xq.kb + b);
                    accd[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_set1_ps(dec.d * dx),
                        accd[r],
                    );
                    accm[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(msum),
                        _mm256_set1_ps(dec.dmin * dx),
                        accm[r],
                    );
                }
            }
            for r in 0..R {
                *out.add((t0 + r) * w.n + j) = _mm512_reduce_add_ps(accd[r]) - hsum(accm[r]);
            }
        }
    }

    /// `pshufb` indices that spread scale byte `a` over the 16 low and byte `b` over the 16
    /// high 16-bit lanes of a register (zero high bytes), from the 8 scale bytes in every
    /// 64-bit lane.
    const fn pick(a: u8, b: u8) -> [u8; 64] {
        let mut t = [0x80u8; 64];
        let mut i = 0;
        while i < 32 {
            t[2 * i] = if i < 16 { a } else { b };
            // Within each 128-bit lane pshufb indexes that lane: bytes 0-7 hold the scales.
            i += 1;
        }
        t
    }
    static PICK: [[u8; 64]; 4] = [pick(0, 1), pick(2, 3), pick(4, 5), pick(6, 7)];

    /// Q4_K's eight 6-bit scales and eight 6-bit mins (ggml's `get_scale_min_k4`), one byte
    /// each, from the block's 12 scale bytes at `p`.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `p` must be valid for reading every element the
    /// description above says is read through it.
    #[inline(always)]
    unsafe fn q4k_scales_mins(p: *const u8) -> (u64, u64) {
        unsafe {
            let s0 = std::ptr::read_unaligned(p as *const u32);
            let s1 = std::ptr::read_unaligned(p.add(4) as *const u32);
            let s2 = std::ptr::read_unaligned(p.add(8) as *const u32);
            let sc_hi = (s2 & 0x0f0f_0f0f) | ((s0 >> 2) & 0x3030_3030);
            let mn_hi = ((s2 >> 4) & 0x0f0f_0f0f) | ((s1 >> 2) & 0x3030_3030);
            (
                (s0 & 0x3f3f_3f3f) as u64 | (sc_hi as u64) << 32,
                (s1 & 0x3f3f_3f3f) as u64 | (mn_hi as u64) << 32,
            )
        }
    }

    /// Q4_K output `j` for input rows `t0..t0 + R`, 64 weights a register: the 32 bytes
    /// of nibbles of two sub-blocks broadcast to both halves and shifted by 0 / 4 per half
    /// (so weights stay in order), the per-32 scales spread by one `pshufb` each, the mins
    /// against the inputs' per-32 sums; `d`, `dmin` by F16C.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    unsafe fn q4k_micro<const R: usize>(
        w: &KQuantWeights,
        xq: &KRows,
        row: *const u8,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
            let pick = [
                _mm512_loadu_si512(PICK[0].as_ptr() as *const _),
                _mm512_loadu_si512(PICK[1].as_ptr() as *const _),
                _mm512_loadu_si512(PICK[2].as_ptr() as *const _),
                _mm512_loadu_si512(PICK[3].as_ptr() as *const _),
            ];
            let mut accd = [_mm512_setzero_ps(); R];
            let mut accm = [_mm_setzero_ps(); R];
            for b in 0..w.k.div_ceil(QK_K) {
                let p = row.add(b * 144);
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
                let d = _mm_cvtss_f32(dm);
                let dmin = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                let (sc, mn) = q4k_scales_mins(p.add(4));
                let scb = _mm512_set1_epi64(sc as i64);
                let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let mut q = [_mm512_setzero_si512(); 4];
                let mut s = [_mm512_setzero_si512(); 4];
                for c in 0..4 {
                    let v =
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16 + 32 * c) as *const _));
                    q[c] = _mm512_and_si512(_mm512_srlv_epi64(v, shift), m4);
                    s[c] = _mm512_shuffle_epi8(scb, pick[c]);
                }
                for r in 0..R {
                    let t = t0 + r;
                    let xp = xq.q.as_ptr().add((t * xq.kb + b) * QK_K);
                    let mut isum = _mm512_setzero_si512();
                    for c in 0..4 {
                        let xv = _mm512_loadu_si512(xp.add(64 * c) as *const _);
                        isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[c], xv), s[c]);
                    }
                    let bs =
                        _mm_loadu_si128(xq.bsums32.as_ptr().add((t * xq.kb + b) * 8) as *const _);
                    let msum = _mm_madd_epi16(mins, bs);
                    let dx = *xq.d.get_unchecked(t * xq.kb + b);
                    accd[r] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * dx), accd[r]);
                    accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(msum), _mm_set1_ps(dmin * dx), accm[r]);
                }
            }
            for r in 0..R {
                let m = _mm_add_ps(accm[r], _mm_movehl_ps(accm[r], accm[r]));
                let m = _mm_add_ss(m, _mm_movehdup_ps(m));
                *out.add((t0 + r) * w.n + j) = _mm512_reduce_add_ps(accd[r]) - _mm_cvtss_f32(m);
            }
        }
    }

    /// `vpermw` indices putting 16-bit lane `4v + L` of a register (a Q6_K scale) in every
    /// lane of 128-bit lane `L`.
    const fn spread(v: u16) -> [u16; 32] {
        let mut t = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = 4 * v + (i / 8) as u16;
            i += 1;
        }
        t
    }
    static SPREAD: [[u16; 32]; 4] = [spread(0), spread(1), spread(2), spread(3)];

    /// Q6_K output `j` for input rows `t0..t0 + R`, 64 weights a register in order: each
    /// half's 64 bytes of `ql` give weights 0-63 (low nibbles) and 64-127 (high), their two
    /// high bits moved to bits 4-5 from the half's 32 bytes of `qh`, broadcast and shifted
    /// per 256-bit half; the 16 signed scales widened once and spread by `vpermw`; the `-32`
    /// of every code folded into the integer sum through the inputs' per-16 sums.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    unsafe fn q6k_micro<const R: usize>(
        w: &KQuantWeights,
        xq: &KRows,
        row: *const u8,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let m30 = _mm512_set1_epi8(0x30);
            let up = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4);
            let down = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
            let spread = [
                _mm512_loadu_si512(SPREAD[0].as_ptr() as *const _),
                _mm512_loadu_si512(SPREAD[1].as_ptr() as *const _),
                _mm512_loadu_si512(SPREAD[2].as_ptr() as *const _),
                _mm512_loadu_si512(SPREAD[3].as_ptr() as *const _),
            ];
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..w.k.div_ceil(QK_K) {
                let p = row.add(b * 210);
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    p.add(208) as *const u16,
                ) as i32)));
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const _));
                let sc512 = _mm512_castsi256_si512(sc);
                let mut q = [_mm512_setzero_si512(); 4];
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(p.add(64 * h) as *const _);
                    let qh =
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * h) as *const _));
                    // x | (y & z): the nibbles with the high bits masked to 0x30.
                    q[2 * h] = _mm512_ternarylogic_epi32::<0xF8>(
                        _mm512_and_si512(ql, m4),
                        _mm512_sllv_epi64(qh, up),
                        m30,
                    );
                    q[2 * h + 1] = _mm512_ternarylogic_epi32::<0xF8>(
                        _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                        _mm512_srlv_epi64(qh, down),
                        m30,
                    );
                }
                let s = [
                    _mm512_permutexvar_epi16(spread[0], sc512),
                    _mm512_permutexvar_epi16(spread[1], sc512),
                    _mm512_permutexvar_epi16(spread[2], sc512),
                    _mm512_permutexvar_epi16(spread[3], sc512),
                ];
                for r in 0..R {
                    let t = t0 + r;
                    let xp = xq.q.as_ptr().add((t * xq.kb + b) * QK_K);
                    let mut isum = _mm512_setzero_si512();
                    for c in 0..4 {
                        let xv = _mm512_loadu_si512(xp.add(64 * c) as *const _);
                        isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[c], xv), s[c]);
                    }
                    let bs = _mm256_loadu_si256(
                        xq.bsums.as_ptr().add((t * xq.kb + b) * 16) as *const __m256i
                    );
                    let msum =
                        _mm512_castsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc, bs), 5));
                    let msum = _mm512_maskz_mov_epi32(0x00ff, msum);
                    let dx = *xq.d.get_unchecked(t * xq.kb + b);
                    acc[r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(_mm512_sub_epi32(isum, msum)),
                        _mm512_set1_ps(d * dx),
                        acc[r],
                    );
                }
            }
            for r in 0..R {
                *out.add((t0 + r) * w.n + j) = _mm512_reduce_add_ps(acc[r]);
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    /// A group of 4 MXFP4 blocks at `p` (68 bytes): their codes as values + 12 (unsigned),
    /// the low nibbles (codes 0-15 of each block) and the high ones (codes 16-31), block i's
    /// in dword lanes 4i..4i+3 of each, and the blocks' scales times two, 2^(e - 127), in the
    /// same lanes (vscalefps: exact for every e below 255).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw`. `p` must be valid for reading 68 bytes.
    unsafe fn mx_group(p: *const u8) -> (__m512i, __m512i, __m512) {
        unsafe {
            let v = _mm512_inserti32x4::<3>(
                _mm512_inserti32x4::<2>(
                    _mm512_inserti32x4::<1>(
                        _mm512_castsi128_si512(_mm_loadu_si128(p.add(1) as *const _)),
                        _mm_loadu_si128(p.add(18) as *const _),
                    ),
                    _mm_loadu_si128(p.add(35) as *const _),
                ),
                _mm_loadu_si128(p.add(52) as *const _),
            );
            let tbl = _mm512_broadcast_i32x4(_mm_loadu_si128(MXFP4_KV12.as_ptr() as *const _));
            let m4 = _mm512_set1_epi8(0x0f);
            let w_lo = _mm512_shuffle_epi8(tbl, _mm512_and_si512(v, m4));
            let w_hi = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            let e4 = (*p as u32)
                | (*p.add(17) as u32) << 8
                | (*p.add(34) as u32) << 16
                | (*p.add(51) as u32) << 24;
            let spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let e = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(e4 as i32), spread));
            let e = _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(127)));
            (w_lo, w_hi, _mm512_scalef_ps(_mm512_set1_ps(1.0), e))
        }
    }

    /// Byte i of the code bytes of a group: `1 + 17 * (i / 16) + i % 16` of the group, from
    /// the load at 0 below 64, else from the load at 4.
    const MX_CODES: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let at = 1 + 17 * (i / 16) + i % 16;
            t[i] = if at < 64 {
                at as u8
            } else {
                (64 + at - 4) as u8
            };
            i += 1;
        }
        t
    };

    /// Byte 2 of dword lane d (bits 16-23) gets the exponent of block d / 4, at 17 * (d / 4);
    /// shifted left by 7 it is the exponent field of an f32.
    const MX_EXPS: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut d = 0;
        while d < 16 {
            t[4 * d + 2] = (17 * (d / 4)) as u8;
            d += 1;
        }
        t
    };

    /// `MXFP4_KV12` by the low 6 bits of an index (what `vpermb` reads): the nibble above
    /// needs no masking.
    const MX_KV64: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            t[i] = MXFP4_KV12[i % 16];
            i += 1;
        }
        t
    };

    #[inline(always)]
    /// [`mx_group`] with AVX512_VBMI's byte permutes: one gathers the 64 code bytes from two
    /// loads, two look the values up (64-entry tables, so no nibble masks), one puts each
    /// exponent in its lanes' f32 exponent field. An exponent of 0 (a scale of 2^-127, whose
    /// weights are below 2^-123) gives a scale of 0 here.
    ///
    /// # Safety
    /// Only called, inlined, from [`tile_vbmi`]: the CPU supports
    /// `avx512f,avx512bw,avx512vbmi`. `p` must be valid for reading 68 bytes.
    unsafe fn mx_group_vbmi(p: *const u8) -> (__m512i, __m512i, __m512) {
        unsafe {
            let a = _mm512_loadu_si512(p as *const _);
            let b = _mm512_loadu_si512(p.add(4) as *const _);
            let codes = _mm512_loadu_si512(MX_CODES.as_ptr() as *const _);
            let exps = _mm512_loadu_si512(MX_EXPS.as_ptr() as *const _);
            let kv = _mm512_loadu_si512(MX_KV64.as_ptr() as *const _);
            let v = _mm512_permutex2var_epi8(a, codes, b);
            let w_lo = _mm512_permutexvar_epi8(v, kv);
            let w_hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), kv);
            let e = _mm512_maskz_permutexvar_epi8(0x4444_4444_4444_4444, exps, a);
            (w_lo, w_hi, _mm512_castsi512_ps(_mm512_slli_epi32(e, 7)))
        }
    }

    #[inline(always)]
    unsafe fn mx_micro<const R: usize, const V: bool>(
        w: &KQuantWeights,
        xq: &KRows,
        row: *const u8,
        j: usize,
        t0: usize,
        out: *mut f32,
    ) {
        unsafe {
            let nb = w.k.div_ceil(QK_MXFP4);
            // Whole groups of 4 blocks here; the last 1-3 blocks go to the AVX2 path below.
            let groups_end = nb & !3;
            let mut acc = [_mm512_setzero_ps(); R];
            let mut xb = 0;
            while xb * 8 < groups_end {
                // The blocks that share activation block `xb` (and its scale `dx`) are summed
                // with their own scales first, then scaled by `dx` once.
                let mut accb = [_mm512_setzero_ps(); R];
                let mut b = xb * 8;
                while b < ((xb + 1) * 8).min(groups_end) {
                    let p = row.add(b * 17);
                    // Each row's sum starts at -12 * its activations' sum (`mx_corr`), as the
                    // weights come as code values + 12.
                    let (w_lo, w_hi, sv) = if V { mx_group_vbmi(p) } else { mx_group(p) };
                    let o = (b % 8) * QK_MXFP4;
                    for r in 0..R {
                        let at = ((t0 + r) * xq.kb + xb) * QK_K + o;
                        let xp = xq.mx.as_ptr().add(at);
                        let x_lo = _mm512_loadu_si512(xp as *const _);
                        let x_hi = _mm512_loadu_si512(xp.add(64) as *const _);
                        let init = _mm512_loadu_si512(xq.mx_corr.as_ptr().add(at / 8) as *const _);
                        let dot =
                            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, w_lo, x_lo), w_hi, x_hi);
                        accb[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, accb[r]);
                    }
                    b += 4;
                }
                for r in 0..R {
                    // The block scales were 2^(e - 127): twice 2^(e - 128).
                    let dx = 0.5 * *xq.d.get_unchecked((t0 + r) * xq.kb + xb);
                    acc[r] = _mm512_fmadd_ps(accb[r], _mm512_set1_ps(dx), acc[r]);
                }
                xb += 1;
            }
            let mut tail = [_mm256_setzero_ps(); R];
            mx_blocks::<R>(row, xq, groups_end..nb, t0, &mut tail);
            for r in 0..R {
                *out.add((t0 + r) * w.n + j) = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]);
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    unsafe fn tile_of<const F: u8, const V: bool>(
        w: &KQuantWeights,
        format: KFormat,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        unsafe {
            for (j0, count, first, rb) in w.stretches(cols) {
                for i in 0..count {
                    let (j, row) = (j0 + i, first.add(i * rb));
                    let mut t = rows.start;
                    while t + 4 <= rows.end {
                        match format {
                            KFormat::Mxfp4 => mx_micro::<4, V>(w, xq, row, j, t, out),
                            KFormat::Q4K => q4k_micro::<4>(w, xq, row, j, t, out),
                            KFormat::Q6K => q6k_micro::<4>(w, xq, row, j, t, out),
                            KFormat::Q5K => micro::<F, 4>(w, xq, row, j, t, out),
                        }
                        t += 4;
                    }
                    match (rows.end - t, format) {
                        (0, _) => {}
                        (3, KFormat::Mxfp4) => mx_micro::<3, V>(w, xq, row, j, t, out),
                        (2, KFormat::Mxfp4) => mx_micro::<2, V>(w, xq, row, j, t, out),
                        (_, KFormat::Mxfp4) => mx_micro::<1, V>(w, xq, row, j, t, out),
                        (3, KFormat::Q4K) => q4k_micro::<3>(w, xq, row, j, t, out),
                        (2, KFormat::Q4K) => q4k_micro::<2>(w, xq, row, j, t, out),
                        (_, KFormat::Q4K) => q4k_micro::<1>(w, xq, row, j, t, out),
                        (3, KFormat::Q6K) => q6k_micro::<3>(w, xq, row, j, t, out),
                        (2, KFormat::Q6K) => q6k_micro::<2>(w, xq, row, j, t, out),
                        (_, KFormat::Q6K) => q6k_micro::<1>(w, xq, row, j, t, out),
                        (3, KFormat::Q5K) => micro::<F, 3>(w, xq, row, j, t, out),
                        (2, KFormat::Q5K) => micro::<F, 2>(w, xq, row, j, t, out),
                        (_, KFormat::Q5K) => micro::<F, 1>(w, xq, row, j, t, out),
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    /// Columns `cols`, all rows of the weight in `format`.
    ///
    /// # Safety
    /// The CPU must support `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`; callers check
    /// [`crate::simd()`] (and the optional extensions this module asks for) first. `out` must be
    /// valid for writing every element the description above says is written through it, and no
    /// other thread may access them meanwhile.
    pub(super) unsafe fn tile(
        w: &KQuantWeights,
        format: KFormat,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        unsafe {
            match format {
                KFormat::Q4K | KFormat::Mxfp4 => {
                    tile_of::<F_Q4K, false>(w, format, xq, rows, cols, out)
                }
                KFormat::Q5K => tile_of::<F_Q5K, false>(w, format, xq, rows, cols, out),
                KFormat::Q6K => tile_of::<F_Q6K, false>(w, format, xq, rows, cols, out),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma,f16c")]
    /// [`tile`] of an MXFP4 weight, its blocks unpacked with AVX512_VBMI's byte permutes.
    ///
    /// # Safety
    /// As [`tile`], and the CPU must support `avx512vbmi` too ([`has_vbmi`]).
    pub(super) unsafe fn tile_vbmi(
        w: &KQuantWeights,
        xq: &KRows,
        rows: Range<usize>,
        cols: Range<usize>,
        out: *mut f32,
    ) {
        unsafe { tile_of::<F_Q4K, true>(w, KFormat::Mxfp4, xq, rows, cols, out) }
    }

    /// The CPU has AVX512_VBMI (the MXFP4 unpacking of [`tile_vbmi`]).
    pub fn has_vbmi() -> bool {
        std::is_x86_feature_detected!("avx512vbmi")
    }

    /// The CPU has the 512-bit VNNI this module needs (on top of
    /// [`crate::simd::Simd::Avx512`]).
    pub fn has_vnni() -> bool {
        std::is_x86_feature_detected!("avx512vnni")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::tests::rnd_vec;
    use crate::simd::Simd;

    /// Random blocks with every bit pattern in the codes and scales, and f16 `d`/`dmin` of a
    /// sane size (MXFP4: exponents around 2^0).
    fn random_blocks(seed: &mut u64, format: KFormat, n: usize, k: usize) -> Vec<u8> {
        let bb = format.block_bytes();
        let nb = n * k / format.block_values();
        let mut out = Vec::with_capacity(nb * bb);
        for _ in 0..nb {
            let mut blk: Vec<u8> = (0..bb)
                .map(|_| {
                    *seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (*seed >> 33) as u8
                })
                .collect();
            let r = rnd_vec(seed, 2);
            let d = f16::from_f32(r[0] * 0.02).to_le_bytes();
            let dmin = f16::from_f32(r[1].abs() * 0.02).to_le_bytes();
            match format {
                KFormat::Q4K | KFormat::Q5K => {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&dmin);
                }
                KFormat::Q6K => blk[208..210].copy_from_slice(&d),
                KFormat::Mxfp4 => blk[0] = 120 + blk[0] % 12,
            }
            out.extend(blk);
        }
        out
    }

    /// The instruction sets this CPU can run, the scalar oracle first.
    use crate::simd::available_levels as levels;

    #[test]
    fn ggml_type_ids() {
        // ggml.h: GGML_TYPE_Q4_K = 12, Q5_K = 13, Q6_K = 14, MXFP4 = 39.
        let ids: Vec<u32> = KFormat::ALL.iter().map(|f| f.ggml_type()).collect();
        assert_eq!(ids, [12, 13, 14, 39]);
        for f in KFormat::ALL {
            assert_eq!(KFormat::from_ggml_type(f.ggml_type()), Some(f));
        }
        assert_eq!(KFormat::from_ggml_type(8), None);
    }

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        for e in 0..=255u8 {
            assert_eq!(e8m0_half(e) as f64, 2f64.powi(e as i32 - 128), "{e}");
        }
    }

    #[test]
    fn mxfp4_matches_the_safetensors_dequantizer() {
        // The same values in the two layouts: GGUF (l, l + 16 in one byte, scale first) and
        // the safetensors one (even/odd columns in one byte, scales apart).
        let mut seed = 3u64;
        let blk = random_blocks(&mut seed, KFormat::Mxfp4, 1, 32);
        let mut codes = [0u8; 32];
        for l in 0..16 {
            codes[l] = blk[1 + l] & 0x0f;
            codes[l + 16] = blk[1 + l] >> 4;
        }
        let st: Vec<u8> = (0..16)
            .map(|i| codes[2 * i] | (codes[2 * i + 1] << 4))
            .collect();
        // The safetensors scale is the exponent with bias 127 of the undoubled values.
        let want = crate::quant::dequantize_mxfp4(&st, &[blk[0]], 1, 32);
        let mut got = [0f32; 32];
        KFormat::Mxfp4.dequantize_block(&blk, &mut got);
        assert_eq!(got.to_vec(), want);
    }

    #[test]
    fn q4_k_block_of_known_values() {
        // d = 1, dmin = 0.5; sub-block j has scale j + 1 and min 2j (j >= 4 exercises the
        // split high bits); codes = l % 16 (low nibble), 15 - l % 16 (high).
        let mut blk = [0u8; 144];
        blk[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let sc: Vec<u8> = (0..8).map(|j| j as u8 + 1 + 16 * (j as u8 / 4)).collect();
        let m: Vec<u8> = (0..8).map(|j| 2 * j as u8 + 16 * (j as u8 / 4)).collect();
        for j in 0..8 {
            if j < 4 {
                blk[4 + j] = sc[j];
                blk[8 + j] = m[j];
            } else {
                blk[8 + j] = (sc[j] & 15) | ((m[j] & 15) << 4);
                blk[j] |= (sc[j] >> 4) << 6;
                blk[4 + j] |= (m[j] >> 4) << 6;
            }
        }
        for (l, b) in blk[16..].iter_mut().enumerate() {
            *b = (l % 16) as u8 | ((15 - (l % 16) as u8) << 4);
        }
        let mut out = [0f32; 256];
        KFormat::Q4K.dequantize_block(&blk, &mut out);
        for j in 0..8 {
            for l in 0..32 {
                let q = if j % 2 == 0 { l % 16 } else { 15 - l % 16 } as f32;
                let want = sc[j] as f32 * q - 0.5 * m[j] as f32;
                assert_eq!(out[32 * j + l], want, "sub-block {j} weight {l}");
            }
        }
    }

    #[test]
    fn quantize_dequantize_is_close() {
        let mut seed = 5u64;
        for format in KFormat::ALL {
            let (n, k) = (6, 512);
            let w = rnd_vec(&mut seed, n * k);
            let p = KQuantWeights::quantize(&w, n, k, format);
            let back = p.dequantize();
            // Values span at most 1: half a step of 4, 5 or 6 bits over that range (Q6_K:
            // 64 steps over twice the largest magnitude), plus the rounding of the 6/8-bit
            // scales and mins (at most half a step more); MXFP4: gguf-py's (the OCP) scale
            // puts the grid's top at 1.5 * 2^floor(log2 max|x|) and clips above it, up to
            // 0.5 * 2^-2 for |x| < 0.5 (more than half the grid's widest gap there).
            let tol = match format {
                KFormat::Q4K => 1.0 / 15.0,
                KFormat::Q5K => 1.0 / 31.0,
                KFormat::Q6K => 1.0 / 32.0,
                KFormat::Mxfp4 => 0.125,
            };
            for (i, (a, b)) in back.iter().zip(&w).enumerate() {
                assert!((a - b).abs() <= tol, "{format:?} [{i}]: {a} vs {b}");
            }
        }
    }

    /// The product within the activation-rounding bound of the module doc of the f64 product
    /// of the dequantized weights, plus f32 summation error.
    fn check(p: &KQuantWeights, x: &[f32], rows: usize, out: &[f32], what: &str) {
        let (n, k) = (p.n(), p.k());
        let w = p.dequantize();
        let xq = KRows::new(x, rows, k);
        for t in 0..rows {
            for j in 0..n {
                let (mut exact, mut bound, mut mag) = (0f64, 0f64, 0f64);
                for i in 0..k {
                    exact += x[t * k + i] as f64 * w[j * k + i] as f64;
                    mag += (x[t * k + i] as f64 * w[j * k + i] as f64).abs();
                }
                for b in 0..k.div_ceil(QK_K) {
                    let sum_w: f64 = (b * QK_K..((b + 1) * QK_K).min(k))
                        .map(|i| (w[j * k + i] as f64).abs())
                        .sum();
                    bound += xq.scale(t, b) as f64 * 0.5 * sum_w;
                }
                let got = out[t * n + j] as f64;
                // f32 rounding of the sums: a few ulps of the terms' magnitudes (Q4/5_K's
                // scale and min terms cancel, so of each of them, at most 2 * mag).
                let tol = bound * 1.001 + 1e-5 * (1.0 + 2.0 * mag);
                assert!(
                    (got - exact).abs() <= tol,
                    "{what}: [{t},{j}] {got} vs {exact} (bound {tol})"
                );
            }
        }
    }

    /// A SIMD result `got` against the scalar path's `want` for the same weight `p` and input:
    /// the same exact integer sums, so only the f32 scaling and summation order differ, by
    /// ulps of the terms' magnitudes.
    fn assert_close_to_scalar(p: &KQuantWeights, x: &[f32], got: &[f32], want: &[f32], what: &str) {
        let (n, k) = (p.n(), p.k());
        let w = p.dequantize();
        for t in 0..want.len() / n {
            for j in 0..n {
                let mag: f32 = (0..k).map(|i| (x[t * k + i] * w[j * k + i]).abs()).sum();
                let (a, b) = (got[t * n + j], want[t * n + j]);
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + 2.0 * mag),
                    "{what} [{t},{j}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        let mut seed = 1u64;
        for format in KFormat::ALL {
            for &rows in &[1, 2, 5, 16, 67] {
                for &(k, n) in &[(256, 8), (512, 9), (768, 33)] {
                    let x = rnd_vec(&mut seed, rows * k);
                    let raw = random_blocks(&mut seed, format, n, k);
                    let p = KQuantWeights::from_bytes(raw, n, k, format).unwrap();
                    for threads in [1, 3] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let mut o = vec![f32::NAN; rows * n];
                        pool.install(|| p.matmul_cols(&x, rows, 0..n, &mut o));
                        check(
                            &p,
                            &x,
                            rows,
                            &o,
                            &format!("{format:?} {rows}x{k}x{n}/{threads}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_matches_the_scalar_path() {
        let mut seed = 2u64;
        let levels = levels();
        eprintln!("instruction sets tested: {levels:?}");
        for format in KFormat::ALL {
            // MXFP4 rows need only be whole blocks of 32: odd block counts test the tail.
            let ks: &[usize] = if format == KFormat::Mxfp4 {
                &[32, 96, 256, 288, 1024]
            } else {
                &[256, 1024]
            };
            for &k in ks {
                for &(rows, n) in &[(1, 3), (1, 8), (3, 8), (4, 5), (7, 17), (9, 2)] {
                    let x = rnd_vec(&mut seed, rows * k);
                    let raw = random_blocks(&mut seed, format, n, k);
                    let p = KQuantWeights::from_bytes(raw, n, k, format).unwrap();
                    let mut want = vec![f32::NAN; rows * n];
                    p.matmul_with(Simd::Scalar, &x, rows, &mut want);
                    check(
                        &p,
                        &x,
                        rows,
                        &want,
                        &format!("scalar {format:?} {rows}x{k}x{n}"),
                    );
                    for &level in &levels[1..] {
                        let mut o = vec![f32::NAN; rows * n];
                        p.matmul_with(level, &x, rows, &mut o);
                        let what = format!("{level:?} {format:?} {rows}x{k}x{n}");
                        assert_close_to_scalar(&p, &x, &o, &want, &what);
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel makes MXFP4 scales with `vscalefps` rather than from bits: exponents
    /// at the ends of the range (subnormal 2^-128 and 2^-127, and large ones) must agree with
    /// the scalar path and the dequantized weights too, at a pair of blocks and an odd tail.
    #[test]
    fn mxfp4_scales_at_the_ends_of_the_exponent_range() {
        let mut seed = 5u64;
        let exps = [0u8, 1, 2, 3, 64, 127, 128, 129, 170, 200];
        for &(rows, n, k) in &[(1, 7, 320), (4, 5, 256), (3, 3, 96)] {
            let mut raw = random_blocks(&mut seed, KFormat::Mxfp4, n, k);
            for (i, blk) in raw.chunks_exact_mut(17).enumerate() {
                blk[0] = exps[i % exps.len()];
            }
            let p = KQuantWeights::from_bytes(raw, n, k, KFormat::Mxfp4).unwrap();
            // Activations of the size that keeps 2^72 * 12 * x finite in f32.
            let x = rnd_vec(&mut seed, rows * k);
            let mut want = vec![f32::NAN; rows * n];
            p.matmul_with(Simd::Scalar, &x, rows, &mut want);
            check(&p, &x, rows, &want, &format!("scalar {rows}x{k}x{n}"));
            for &level in &levels()[1..] {
                let mut o = vec![f32::NAN; rows * n];
                p.matmul_with(level, &x, rows, &mut o);
                let what = format!("{level:?} {rows}x{k}x{n}");
                check(&p, &x, rows, &o, &what);
                assert_close_to_scalar(&p, &x, &o, &want, &what);
            }
        }
    }

    /// The AVX-512 MXFP4 kernel unpacks its blocks two ways, with AVX512_VBMI byte permutes
    /// where the CPU has them and with inserts and nibble masks where it does not; `matmul`
    /// runs only one of them on a given machine, so both are run here against the scalar path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn mxfp4_avx512_unpacks_with_and_without_vbmi_alike() {
        if crate::simd::detected_simd() < Simd::Avx512 || !avx512::has_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: the MXFP4 AVX-512 kernel is not tested");
            return;
        }
        let mut seed = 11u64;
        for &(rows, n, k) in &[
            (1, 5, 128),
            (2, 3, 288),
            (4, 4, 1024),
            (5, 2, 2880),
            (7, 3, 96),
        ] {
            let x = rnd_vec(&mut seed, rows * k);
            let raw = random_blocks(&mut seed, KFormat::Mxfp4, n, k);
            let p = KQuantWeights::from_bytes(raw, n, k, KFormat::Mxfp4).unwrap();
            let mut want = vec![f32::NAN; rows * n];
            p.matmul_with(Simd::Scalar, &x, rows, &mut want);
            let xq = p.rows_for(&x, rows);
            let mut ways = vec![("plain", vec![f32::NAN; rows * n])];
            // SAFETY: the CPU has AVX-512 with VNNI (checked above); one tile covers `out`.
            unsafe {
                avx512::tile(
                    &p,
                    KFormat::Mxfp4,
                    &xq,
                    0..rows,
                    0..n,
                    ways[0].1.as_mut_ptr(),
                )
            };
            if avx512::has_vbmi() {
                let mut o = vec![f32::NAN; rows * n];
                // SAFETY: as above, and the CPU has AVX512_VBMI (checked).
                unsafe { avx512::tile_vbmi(&p, &xq, 0..rows, 0..n, o.as_mut_ptr()) };
                ways.push(("vbmi", o));
            } else {
                eprintln!("no AVX512_VBMI on this CPU: its MXFP4 unpacking is not tested");
            }
            for (way, o) in &ways {
                assert_close_to_scalar(&p, &x, o, &want, &format!("{way} {rows}x{k}x{n}"));
            }
        }
    }

    #[test]
    fn concat_appends_segments_without_copying() {
        let mut seed = 8u64;
        let k = 512;
        for (i, format) in KFormat::ALL.into_iter().enumerate() {
            // The last part in another format (Q4_K_M stacks Q4_K q/k with a Q6_K v).
            let other = KFormat::ALL[(i + 1) % 4];
            let parts: Vec<KQuantWeights> = [(5usize, format), (16, format), (3, other)]
                .iter()
                .map(|&(n, f)| {
                    KQuantWeights::from_bytes(random_blocks(&mut seed, f, n, k), n, k, f).unwrap()
                })
                .collect();
            let refs: Vec<&KQuantWeights> = parts.iter().collect();
            let c = KQuantWeights::concat(&refs);
            assert_eq!((c.n(), c.k(), c.segments()), (24, k, 3));
            assert_eq!(c.formats(), vec![(format, 21), (other, 3)]);
            let want: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            assert_eq!(c.dequantize(), want);
            // Row 5 is the second part's first row, at the same address.
            assert_eq!(c.row(5).as_ptr(), parts[1].row(0).as_ptr());
            let x = rnd_vec(&mut seed, 2 * k);
            for level in levels() {
                let mut o = vec![f32::NAN; 2 * 24];
                c.matmul_with(level, &x, 2, &mut o);
                check(
                    &c,
                    &x,
                    2,
                    &o,
                    &format!("{format:?}+{other:?} concat {level:?}"),
                );
            }
            let mut o = vec![f32::NAN; 2 * 24];
            c.matmul_cols(&x, 2, 0..24, &mut o);
            check(&c, &x, 2, &o, &format!("{format:?}+{other:?} concat"));
            // Column ranges that start inside a segment and cross into the next ones: the
            // kernels find each row's address from the range's first row.
            for cols in [3..22, 6..7, 20..24] {
                let mut p = vec![f32::NAN; 2 * 24];
                c.matmul_cols(&x, 2, cols.clone(), &mut p);
                for (i, (a, b)) in p.iter().zip(&o).enumerate() {
                    if cols.contains(&(i % 24)) {
                        assert_eq!(a, b, "{format:?}+{other:?} {cols:?} {i}");
                    } else {
                        assert!(a.is_nan(), "{cols:?}: column {} written", i % 24);
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_rows_of_partial_blocks_multiply_like_their_values() {
        // `pack_as` rows that are not whole blocks (zero-padded weights against zero-padded
        // inputs), at every instruction set.
        let mut seed = 12u64;
        for format in KFormat::ALL {
            for &(rows, k, n) in &[(3, 300, 7), (5, 40, 4), (1, 600, 9)] {
                let w = rnd_vec(&mut seed, n * k);
                let x = rnd_vec(&mut seed, rows * k);
                let p = KQuantWeights::quantize(&w, n, k, format);
                assert_eq!(p.resident_bytes(), n * format.row_bytes(k));
                for level in levels() {
                    let mut o = vec![f32::NAN; rows * n];
                    p.matmul_with(level, &x, rows, &mut o);
                    check(
                        &p,
                        &x,
                        rows,
                        &o,
                        &format!("{format:?} {rows}x{k}x{n} {level:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn column_ranges_write_only_their_columns() {
        let mut seed = 4u64;
        let (rows, k, n) = (3, 256, 40);
        let x = rnd_vec(&mut seed, rows * k);
        let p = KQuantWeights::from_bytes(
            random_blocks(&mut seed, KFormat::Q6K, n, k),
            n,
            k,
            KFormat::Q6K,
        )
        .unwrap();
        let mut full = vec![0f32; rows * n];
        p.matmul_cols(&x, rows, 0..n, &mut full);
        for cols in [0..16, 16..32, 32..n] {
            let mut o = vec![f32::NAN; rows * n];
            p.matmul_cols(&x, rows, cols.clone(), &mut o);
            for (i, (a, b)) in o.iter().zip(&full).enumerate() {
                if cols.contains(&(i % n)) {
                    assert_eq!(a, b, "{cols:?} {i}");
                } else {
                    assert!(a.is_nan(), "{cols:?}: column {} written", i % n);
                }
            }
        }
    }

    #[test]
    fn bad_ranges_are_errors() {
        let bytes: SharedBytes = Arc::new(vec![0u8; 144 * 4]);
        assert!(
            KQuantWeights::from_shared(bytes.clone(), 0..144 * 4, 2, 512, KFormat::Q4K).is_ok()
        );
        let e = KQuantWeights::from_shared(bytes.clone(), 0..144 * 3, 2, 512, KFormat::Q4K)
            .unwrap_err();
        assert!(e.contains("432 bytes") && e.contains("576"), "{e}");
        let e = KQuantWeights::from_shared(bytes.clone(), 144..144 * 5, 2, 512, KFormat::Q4K)
            .unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = KQuantWeights::from_shared(bytes, 0..144, 1, 100, KFormat::Q4K).unwrap_err();
        assert!(e.contains("not whole"), "{e}");
    }
}
