//! Linear-layer weights packed for the CPU matmul, and the matmul that reads them.
//!
//! A PyTorch `Linear` weight is `[n, k]` (one row per output). The kernels here want the
//! transpose in narrow strips instead: the outputs are cut into panels of [`NR`] = 16 columns,
//! and each panel is stored k-major, one 64-byte cache line per `k` (`[k][16]`, the last panel
//! zero-padded). Then a step of the inner loop reads one line of weights, broadcasts one input
//! value per token row and does two 8-wide FMAs per row into `MR x 16` accumulators held in
//! registers (the usual register-blocked GEMM micro-kernel): no horizontal sums, every weight
//! loaded once per tile of up to [`MR`] rows, and the weights of a call stream through memory
//! in one sequential pass, prefetched a block ahead so the read overlaps the arithmetic.
//!
//! Packing happens once, at load; the packed copy replaces the `[n, k]` one, so it costs no
//! memory. The same code serves one token row (a memory-bound GEMV) and thousands (prefill),
//! blocking rows by [`MC`] and `k` by [`KC`] so the operands of the inner loops stay in cache.
//!
//! A weight can be held in any [`WeightType`]: bf16 panels have the same layout with 2-byte
//! values (a line is 32 bytes) and the same kernel, which widens a line to f32 in registers
//! (a bf16 is the top half of an f32); at the level with AVX512_BF16 ([`Simd::bf16_dot`])
//! the activations are rounded to bf16 instead and two lines (64 contiguous bytes) are one
//! `vdpbf16ps` operand after a word permutation (see `avx512bf16`); q8_0 and q4_0 weights are packed in groups of block-
//! quantized columns and multiplied by the kernels of [`crate::quant`]; K-quants and MXFP4
//! stay in GGUF's row-major blocks (a range of the mapped file) and are multiplied by the
//! kernels of [`crate::kquant`]. Activations are f32 for every type (rounded to bf16 inside
//! the bf16 product at that level).

use crate::kquant::{KFormat, KQuantWeights};
use crate::mem::{HugeBuf, Zeroable};
use crate::quant::{QuantFormat, QuantWeights};
use crate::simd::Simd;
use rayon::prelude::*;
use std::sync::Arc;

/// The type a linear layer's weights are held in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    Bf16,
    Q8_0,
    Q4_0,
    /// llama.cpp's K-quants and MXFP4, held in GGUF's own blocks ([`crate::kquant`]).
    Q4K,
    Q5K,
    Q6K,
    Mxfp4,
}

impl WeightType {
    pub const ALL: [WeightType; 4] = [
        WeightType::F32,
        WeightType::Bf16,
        WeightType::Q8_0,
        WeightType::Q4_0,
    ];

    /// The types of [`crate::kquant`]: a GGUF file's own (taken as they are under `--dtype
    /// auto`), also available to `pack_as` (a plain round-to-nearest quantizer).
    pub const KQUANTS: [WeightType; 4] = [
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
        WeightType::Mxfp4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::Bf16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4K => "q4_k",
            WeightType::Q5K => "q5_k",
            WeightType::Q6K => "q6_k",
            WeightType::Mxfp4 => "mxfp4",
        }
    }

    /// `f32`, `bf16`, `q8_0` (also `q8`), `q4_0` (also `q4`), `q4_k`, `q5_k`, `q6_k`,
    /// `mxfp4`, any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(WeightType::F32),
            "bf16" | "bfloat16" => Some(WeightType::Bf16),
            "q8_0" | "q8" => Some(WeightType::Q8_0),
            "q4_0" | "q4" => Some(WeightType::Q4_0),
            "q4_k" => Some(WeightType::Q4K),
            "q5_k" => Some(WeightType::Q5K),
            "q6_k" => Some(WeightType::Q6K),
            "mxfp4" => Some(WeightType::Mxfp4),
            _ => None,
        }
    }

    /// Bytes of an `[n, k]` weight in this type, by the format's definition (no padding).
    pub fn bytes(self, n: usize, k: usize) -> usize {
        match self {
            WeightType::F32 => n * k * 4,
            WeightType::Bf16 => n * k * 2,
            WeightType::Q8_0 | WeightType::Q4_0 => {
                let f = self.quant_format().expect("quantized");
                n * k.div_ceil(crate::quant::QK) * f.gguf_block_bytes()
            }
            _ => n * self.k_format().expect("a K-quant").row_bytes(k),
        }
    }

    /// The type of a [`KFormat`].
    pub fn from_k_format(f: KFormat) -> Self {
        match f {
            KFormat::Q4K => WeightType::Q4K,
            KFormat::Q5K => WeightType::Q5K,
            KFormat::Q6K => WeightType::Q6K,
            KFormat::Mxfp4 => WeightType::Mxfp4,
        }
    }

    /// The [`KFormat`] of a K-quant or MXFP4 type.
    pub fn k_format(self) -> Option<KFormat> {
        match self {
            WeightType::Q4K => Some(KFormat::Q4K),
            WeightType::Q5K => Some(KFormat::Q5K),
            WeightType::Q6K => Some(KFormat::Q6K),
            WeightType::Mxfp4 => Some(KFormat::Mxfp4),
            _ => None,
        }
    }

    fn quant_format(self) -> Option<QuantFormat> {
        match self {
            WeightType::Q8_0 => Some(QuantFormat::Q8_0),
            WeightType::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Output columns per panel: two AVX2 registers.
pub const NR: usize = 16;
/// Token rows per micro-tile (12 accumulator registers of the 16).
pub const MR: usize = 6;
/// `k` per block: a block of a panel is `KC` lines (16 KiB) and stays in L1 while every
/// micro-tile of the rows passes over it.
pub const KC: usize = 256;
/// Token rows per row block: the block's inputs (`MC x KC` floats, 96 KiB) stay in L2.
pub const MC: usize = 96;

/// One `k` step of one panel: the 16 weights of its 16 output columns.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; NR]);

// SAFETY: 16 f32s, no padding; zero bits are zeros.
unsafe impl Zeroable for Line {}

/// A [`Line`] in bf16 (the bits of each value), its columns stored in the order
/// [`BF16_SLOT`] gives so that widening to f32 is two interleaves with zero (see `load`).
#[derive(Clone, Copy, Default)]
#[repr(C, align(32))]
struct LineBf16([u16; NR]);

/// Where column `c` of a bf16 line is stored: interleaving the line with zeros takes words
/// 0-3 and 8-11 into the low result (`unpacklo` works per 128-bit lane) and words 4-7 and
/// 12-15 into the high one, so columns 0-7 are stored at words 0-3 and 8-11, columns 8-15 at
/// 4-7 and 12-15.
const BF16_SLOT: [usize; NR] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

// SAFETY: 16 u16s, no padding; zero bits are +0.0.
unsafe impl Zeroable for LineBf16 {}

/// What a panel line is made of.
trait PanelLine: Zeroable + Send + Sync + 'static {
    fn get(&self, c: usize) -> f32;
    fn set(&mut self, c: usize, v: f32);
    /// The line's 16 values as two vectors of 8 f32 (the caller enables AVX2).
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled. `p` must
    /// be valid for reading every element the description above says is read through it.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(p: *const Self) -> [std::arch::x86_64::__m256; 2];
    /// The line's 16 values as one vector, in column order (the caller enables AVX-512 F).
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled. `p` must
    /// be valid for reading every element the description above says is read through it.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load512(p: *const Self) -> std::arch::x86_64::__m512;
    /// Whether the one-row (GEMV) path runs faster with AVX-512 than with AVX2. Measured by
    /// `bench kernels`: yes for f32; for bf16 the 512-bit widening (a broadcast load and two
    /// shuffles per line) made the GEMV 2-5% slower, so bf16 keeps AVX2 there.
    const WIDE_GEMV: bool;
}

impl PanelLine for Line {
    const WIDE_GEMV: bool = true;
    fn get(&self, c: usize) -> f32 {
        self.0[c]
    }
    fn set(&mut self, c: usize, v: f32) {
        self.0[c] = v;
    }
    /// # Safety
    /// The caller enables AVX2. `p` must be valid for reading every element the description above
    /// says is read through it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        unsafe {
            use std::arch::x86_64::*;
            let f = p as *const f32;
            [_mm256_load_ps(f), _mm256_load_ps(f.add(8))]
        }
    }
    /// # Safety
    /// The caller enables AVX-512 F. `p` must be valid for reading every element the description
    /// above says is read through it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load512(p: *const Self) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_load_ps(p as *const f32) }
    }
}

impl PanelLine for LineBf16 {
    const WIDE_GEMV: bool = false;
    fn get(&self, c: usize) -> f32 {
        f32::from_bits((self.0[BF16_SLOT[c]] as u32) << 16)
    }
    fn set(&mut self, c: usize, v: f32) {
        self.0[BF16_SLOT[c]] = half::bf16::from_f32(v).to_bits();
    }
    /// A bf16 is the top 16 bits of the f32 it stands for: interleaving zeros below each
    /// value widens it, and [`BF16_SLOT`] puts the results in column order.
    ///
    /// # Safety
    /// The caller enables AVX2. `p` must be valid for reading every element the description above
    /// says is read through it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(p: *const Self) -> [std::arch::x86_64::__m256; 2] {
        unsafe {
            use std::arch::x86_64::*;
            let v = _mm256_load_si256(p as *const __m256i);
            let z = _mm256_setzero_si256();
            [
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)),
            ]
        }
    }
    /// The line loaded twice (`[v | v]`, a broadcast load), then interleaved with zeros per
    /// 128-bit lane: the low words in lanes 0-1 (columns 0-7, see [`BF16_SLOT`]) and the
    /// high words in lanes 2-3 (columns 8-15), already in column order.
    ///
    /// # Safety
    /// The caller enables AVX-512 F. `p` must be valid for reading every element the description
    /// above says is read through it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load512(p: *const Self) -> std::arch::x86_64::__m512 {
        unsafe {
            use std::arch::x86_64::*;
            let v = _mm512_broadcast_i64x4(_mm256_load_si256(p as *const __m256i));
            let z = _mm512_setzero_si512();
            let lo = _mm512_unpacklo_epi16(z, v);
            _mm512_castsi512_ps(_mm512_mask_unpackhi_epi16(lo, 0xFFFF_0000, z, v))
        }
    }
}

/// The panels of one weight, in f32 or bf16.
#[derive(Clone)]
struct Panels<L: PanelLine> {
    lines: Arc<HugeBuf<L>>,
    n: usize,
    k: usize,
}

#[derive(Clone)]
enum Store {
    F32(Panels<Line>),
    Bf16(Panels<LineBf16>),
    Quant(QuantWeights),
    K(KQuantWeights),
}

/// A `[n, k]` weight in panels of its [`WeightType`] (see the module doc). Cheap to clone
/// (shared).
#[derive(Clone)]
pub struct PackedWeights {
    store: Store,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeights<{}>[{}, {}]",
            self.weight_type(),
            self.n,
            self.k
        )
    }
}

impl<L: PanelLine> Panels<L> {
    fn pack(w: &[f32], n: usize, k: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut buf = HugeBuf::<L>::zeroed(panels * k);
        for (p, panel) in buf.chunks_exact_mut(k.max(1)).enumerate().take(panels) {
            for c in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + c) * k..(p * NR + c + 1) * k];
                for (line, v) in panel.iter_mut().zip(row) {
                    line.set(c, *v);
                }
            }
        }
        Self {
            lines: Arc::new(buf),
            n,
            k,
        }
    }

    fn row_into(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        let panel = &self.lines[(j / NR) * k..(j / NR + 1) * k];
        for (v, line) in out.iter_mut().zip(panel) {
            *v = line.get(j % NR);
        }
    }

    fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (r, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            let panel = &self.lines[(r / NR) * k..(r / NR + 1) * k];
            for (v, line) in row.iter_mut().zip(panel) {
                *v = line.get(r % NR);
            }
        }
        w
    }

    /// `None` where a part but the last has a ragged last panel (the caller repacks).
    fn concat(parts: &[&Panels<L>]) -> Option<Self> {
        let k = parts.first().map_or(0, |p| p.k);
        if !parts.iter().rev().skip(1).all(|p| p.n % NR == 0) {
            return None;
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let mut buf = HugeBuf::<L>::zeroed(n.div_ceil(NR) * k);
        let mut at = 0;
        for p in parts {
            buf[at..at + p.lines.len()].copy_from_slice(&p.lines);
            at += p.lines.len();
        }
        Some(Self {
            lines: Arc::new(buf),
            n,
            k,
        })
    }
}

impl PackedWeights {
    /// Packs a row-major `[n, k]` weight in f32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_as(w, n, k, WeightType::F32)
    }

    /// Packs (converts, quantizes) a row-major `[n, k]` f32 weight into `ty`.
    pub fn pack_as(w: &[f32], n: usize, k: usize, ty: WeightType) -> Self {
        assert_eq!(w.len(), n * k, "w must be [n, k]");
        let store = match ty {
            WeightType::F32 => Store::F32(Panels::pack(w, n, k)),
            WeightType::Bf16 => Store::Bf16(Panels::pack(w, n, k)),
            WeightType::Q8_0 | WeightType::Q4_0 => {
                let f = ty.quant_format().expect("quantized");
                Store::Quant(QuantWeights::quantize(w, n, k, f))
            }
            _ => {
                let f = ty.k_format().expect("a K-quant");
                Store::K(KQuantWeights::quantize(w, n, k, f))
            }
        };
        Self { store, n, k }
    }

    /// An already quantized weight.
    pub fn from_quant(q: QuantWeights) -> Self {
        let (n, k) = (q.n(), q.k());
        Self {
            store: Store::Quant(q),
            n,
            k,
        }
    }

    /// A weight in K-quant or MXFP4 blocks (a GGUF tensor's, as they are).
    pub fn from_kquant(q: KQuantWeights) -> Self {
        let (n, k) = (q.n(), q.k());
        Self {
            store: Store::K(q),
            n,
            k,
        }
    }

    /// The K-quant or MXFP4 blocks, if that is how the weight is held.
    pub fn as_kquant(&self) -> Option<&KQuantWeights> {
        match &self.store {
            Store::K(q) => Some(q),
            _ => None,
        }
    }

    pub fn weight_type(&self) -> WeightType {
        match &self.store {
            Store::F32(_) => WeightType::F32,
            Store::Bf16(_) => WeightType::Bf16,
            Store::Quant(q) => match q.format() {
                QuantFormat::Q8_0 => WeightType::Q8_0,
                QuantFormat::Q4_0 => WeightType::Q4_0,
            },
            Store::K(q) => WeightType::from_k_format(q.format()),
        }
    }

    /// Bytes held in memory (panels padded to whole panels or groups).
    pub fn resident_bytes(&self) -> usize {
        match &self.store {
            Store::F32(p) => p.lines.len() * std::mem::size_of::<Line>(),
            Store::Bf16(p) => p.lines.len() * std::mem::size_of::<LineBf16>(),
            Store::Quant(q) => q.resident_bytes(),
            Store::K(q) => q.resident_bytes(),
        }
    }

    /// Bytes of the weight by its type's definition (what a pass reads, without padding).
    pub fn weight_bytes(&self) -> usize {
        self.bytes_by_type().iter().map(|(_, b)| b).sum()
    }

    /// [`PackedWeights::weight_bytes`] by type: one entry, or one per format of a stack of
    /// K-quants of different formats.
    pub fn bytes_by_type(&self) -> Vec<(WeightType, usize)> {
        match &self.store {
            Store::K(q) => q
                .formats()
                .into_iter()
                .map(|(f, rows)| {
                    let ty = WeightType::from_k_format(f);
                    (ty, ty.bytes(rows, self.k))
                })
                .collect(),
            _ => vec![(self.weight_type(), self.weight_type().bytes(self.n, self.k))],
        }
    }

    /// The weights of `parts` stacked along `n` (their outputs one after the other); all must
    /// have the same `k`. Parts of different types are held in f32, except K-quants, which
    /// stack as they are whatever their formats. Panels and blocks are copied as they are where they
    /// line up (`n` of every part but the last a multiple of 16, as in practice); otherwise
    /// f32/bf16 parts are unpacked and the stack packed again (exact for both).
    pub fn concat(parts: &[&PackedWeights]) -> Self {
        let k = parts.first().map_or(0, |p| p.k);
        let ty = parts.first().map_or(WeightType::F32, |p| p.weight_type());
        assert!(parts.iter().all(|p| p.k == k), "stacked weights need one k");
        let n: usize = parts.iter().map(|p| p.n).sum();
        // A GGUF mixes types within a stack (Q4_K_M: Q4_K q/k, Q6_K v): K-quant parts keep
        // their blocks, one segment each; any other mix is held in f32 (exact for all).
        if parts.iter().all(|p| p.as_kquant().is_some()) {
            let qs: Vec<_> = parts.iter().filter_map(|p| p.as_kquant()).collect();
            return Self::from_kquant(KQuantWeights::concat(&qs));
        }
        if parts.iter().any(|p| p.weight_type() != ty) {
            let w: Vec<f32> = parts.iter().flat_map(|p| p.unpack()).collect();
            return Self::pack_as(&w, n, k, WeightType::F32);
        }
        let repack = || {
            let w: Vec<f32> = parts.iter().flat_map(|p| p.unpack()).collect();
            Self::pack_as(&w, n, k, ty)
        };
        // The parts' panels of one line type, which `ty` (checked above) says they all have.
        fn panels<'a, L: PanelLine>(
            parts: &[&'a PackedWeights],
            pick: impl Fn(&'a Store) -> Option<&'a Panels<L>>,
        ) -> Vec<&'a Panels<L>> {
            parts
                .iter()
                .map(|p| pick(&p.store).expect("checked above"))
                .collect()
        }
        let store = match ty {
            WeightType::F32 => Panels::concat(&panels(parts, |s| match s {
                Store::F32(x) => Some(x),
                _ => None,
            }))
            .map(Store::F32),
            WeightType::Bf16 => Panels::concat(&panels(parts, |s| match s {
                Store::Bf16(x) => Some(x),
                _ => None,
            }))
            .map(Store::Bf16),
            WeightType::Q8_0 | WeightType::Q4_0 => {
                let qs: Vec<_> = parts
                    .iter()
                    .map(|p| match &p.store {
                        Store::Quant(q) => q,
                        _ => unreachable!("checked above"),
                    })
                    .collect();
                Some(Store::Quant(QuantWeights::concat(&qs)))
            }
            _ => unreachable!("K-quant stacks are made above"),
        };
        let Some(store) = store else {
            return repack();
        };
        Self { store, n, k }
    }

    /// Output row `j` of the weight (a row of the original `[n, k]`; an embedding lookup),
    /// into `out` (`k` values).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        assert!(j < self.n && out.len() == self.k, "row {j} of {:?}", self);
        match &self.store {
            Store::F32(p) => p.row_into(j, out),
            Store::Bf16(p) => p.row_into(j, out),
            Store::Quant(q) => q.row_into(j, out),
            Store::K(q) => q.row_into(j, out),
        }
    }

    /// Whether `self` and `other` are the same buffer (a tied LM head and embedding).
    pub fn shares(&self, other: &PackedWeights) -> bool {
        match (&self.store, &other.store) {
            (Store::F32(a), Store::F32(b)) => Arc::ptr_eq(&a.lines, &b.lines),
            (Store::Bf16(a), Store::Bf16(b)) => Arc::ptr_eq(&a.lines, &b.lines),
            (Store::Quant(a), Store::Quant(b)) => a.shares(b),
            (Store::K(a), Store::K(b)) => a.shares(b),
            _ => false,
        }
    }

    /// The row-major `[n, k]` weight back (dequantized for q8_0/q4_0).
    pub fn unpack(&self) -> Vec<f32> {
        match &self.store {
            Store::F32(p) => p.unpack(),
            Store::Bf16(p) => p.unpack(),
            Store::Quant(q) => q.dequantize(),
            Store::K(q) => q.dequantize(),
        }
    }

    /// Output columns (rows of the original weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input columns.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `out[t, j] = sum_i x[t, i] * w[j, i]`: x `[rows, k]`, out `[rows, n]`, row-major. Runs
    /// on the current rayon pool, its tasks splitting the panels (and row blocks).
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.matmul_cols(x, rows, 0..self.n, out);
    }

    /// [`PackedWeights::matmul`] for the output columns `cols` only (the others of `out` are
    /// left as they are): a large product (an LM head) computed in parts, with other work
    /// between them. `cols.start` must be a multiple of [`NR`], and `cols.end` too unless it
    /// is `n`.
    ///
    /// bf16 weights at a level with [`Simd::bf16_dot`] (AVX512_BF16) multiply the activations
    /// rounded to bf16 (to nearest, ties to even, as llama.cpp does), the products exact and
    /// summed in f32: with `vdpbf16ps` from [`BF16_DOT_MIN_ROWS`] rows on, and below that with
    /// the widening kernel on the same rounded activations, so that every row's result is the
    /// same function of that row whatever rows share its call (up to the order of f32 sums).
    /// At the other levels bf16 products are exact.
    pub fn matmul_cols(
        &self,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        self.matmul_cols_at(crate::simd::simd(), x, rows, cols, out)
    }

    /// [`PackedWeights::matmul_cols`] with the f32 and bf16 kernels of `level` (at most what the
    /// CPU has); the quantized types run at [`crate::simd()`]'s.
    fn matmul_cols_at(
        &self,
        level: Simd,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), rows * k, "x must be [rows, k]");
        assert_eq!(out.len(), rows * n, "out must be [rows, n]");
        assert!(
            cols.start.is_multiple_of(NR)
                && (cols.end.is_multiple_of(NR) || cols.end == n)
                && cols.end <= n,
            "columns {cols:?} do not start and end on panels of {NR} (n = {n})"
        );
        if rows == 0 || cols.is_empty() {
            return;
        }
        if k == 0 {
            for row in out.chunks_exact_mut(n) {
                row[cols.clone()].fill(0.0);
            }
            return;
        }
        match &self.store {
            Store::F32(p) => p.matmul_cols(level, x, rows, cols, out),
            Store::Bf16(p) => p.matmul_cols_bf16(level, x, rows, cols, out),
            Store::Quant(q) => q.matmul_cols(x, rows, cols, out),
            Store::K(q) => q.matmul_cols(x, rows, cols, out),
        }
    }

    /// The whole product as one tile with the kernels of `simd`, on this thread (tests:
    /// every instruction set against the scalar oracle).
    #[cfg(test)]
    fn matmul_with(&self, simd: Simd, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(simd <= crate::simd::detected_simd());
        assert_eq!(out.len(), rows * self.n);
        let tile = Tile {
            rows: 0..rows,
            panels: 0..self.n.div_ceil(NR),
        };
        let out = SyncPtr(out.as_mut_ptr());
        if let Store::Bf16(p) = &self.store {
            if let Some(input) = Bf16Input::prepare(simd, x, rows, self.k) {
                // SAFETY: one tile covering the whole output; the CPU supports `simd`, which
                // has AVX512_BF16 (`prepare` said so).
                unsafe { p.tile_bf16_dot(&input, tile, out) };
                return;
            }
        }
        let a = pack_rows(x, rows, self.k);
        // SAFETY: one tile covering the whole output; the CPU supports `simd`.
        unsafe {
            match &self.store {
                Store::F32(p) => p.tile_with(simd, x, &a, tile, out),
                Store::Bf16(p) => p.tile_with(simd, x, &a, tile, out),
                Store::Quant(_) | Store::K(_) => unreachable!("quant has its own kernels"),
            }
        }
    }

    /// [`PackedWeights::matmul`] with the f32 and bf16 kernels of `level`, on the current
    /// rayon pool (tests: a level other than the process's).
    #[cfg(test)]
    fn matmul_at(&self, level: Simd, x: &[f32], rows: usize, out: &mut [f32]) {
        assert!(level <= crate::simd::detected_simd());
        self.matmul_cols_at(level, x, rows, 0..self.n, out);
    }
}

impl<L: PanelLine> Panels<L> {
    /// The product with the weights widened to f32 (exact products), with the kernels of
    /// `level` (at most what the CPU has).
    fn matmul_cols(
        &self,
        level: Simd,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        assert!(level <= crate::simd::detected_simd());
        let a = pack_rows(x, rows, self.k);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let panels = cols.start / NR..cols.end.div_ceil(NR);
        // At least 4 panels (64 columns) a task, so its stream of weights is long enough to
        // prefetch.
        for_each_tile(rows, MC, panels, 4, |rows, panels| {
            // SAFETY: tasks write disjoint (row block, panel range) tiles of `out`; the CPU
            // supports `level` (asserted above).
            unsafe { self.tile_with(level, x, &a, Tile { rows, panels }, out_ptr) };
        });
    }

    /// `tile` with the kernels of `simd` (which the CPU must support).
    ///
    /// # Safety
    /// `simd` must be a level the CPU supports (at most [`crate::simd::detected_simd`]). `out` must
    /// point to this product's row-major output (`rows x n`), valid for writing every element of
    /// the tile, and no other thread may write those elements meanwhile (each task owns its tile).
    unsafe fn tile_with(&self, simd: Simd, x: &[f32], a: &[f32], tile: Tile, out: SyncPtr) {
        unsafe {
            #[cfg(target_arch = "x86_64")]
            match simd {
                Simd::Avx512 | Simd::Avx512Bf16 => {
                    return avx512::tile(&self.lines, self.n, self.k, a, tile, out.0);
                }
                Simd::Avx2 => return avx::tile(&self.lines, self.n, self.k, a, tile, out.0),
                Simd::Scalar => {}
            }
            let _ = (a, simd);
            self.tile_scalar(x, tile, out)
        }
    }

    /// `tile` without SIMD: the oracle of the AVX2 path and the path of CPUs without AVX2/FMA.
    ///
    /// # Safety
    /// No CPU feature is needed. `out` must point to this product's row-major output (`rows x n`),
    /// valid for writing every element of the tile, and no other thread may write those elements
    /// meanwhile (each task owns its tile).
    unsafe fn tile_scalar(&self, x: &[f32], tile: Tile, out: SyncPtr) {
        unsafe {
            let (n, k) = (self.n, self.k);
            for p in tile.panels {
                let panel = &self.lines[p * k..(p + 1) * k];
                for t in tile.rows.clone() {
                    let xr = &x[t * k..(t + 1) * k];
                    let mut acc = [0f32; NR];
                    for (xv, line) in xr.iter().zip(panel) {
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a += xv * line.get(c);
                        }
                    }
                    for (c, a) in acc.iter().enumerate().take(n - p * NR) {
                        *out.0.add(t * n + p * NR + c) = *a;
                    }
                }
            }
        }
    }
}

/// Rows from which bf16 weights take `vdpbf16ps` at a level with [`Simd::bf16_dot`]; fewer
/// rows (memory-bound: the GEMV, and micro-tiles of 2-3 rows) take the widening kernel on the
/// same bf16-rounded activations. Measured with `bench kernels --weight-types bf16` on the demo
/// model's shapes (one thread, AMD EPYC with AVX512_BF16): at 2 rows `vdpbf16ps` was slower
/// (1024x2048: 0.18-0.20 ms against 0.14), at 3 level, at 4 level or faster (4096x1024: 0.28
/// against 0.38-0.41 ms), at 6 rows and more faster (8 rows: 0.38 against 0.75 ms, 2x).
pub const BF16_DOT_MIN_ROWS: usize = 4;

/// The activations of a bf16 product at a level with [`Simd::bf16_dot`], rounded to bf16.
enum Bf16Input {
    /// Fewer than [`BF16_DOT_MIN_ROWS`] rows: the rounded values as f32 (`x`) and in the
    /// layout of [`pack_rows`] (`a`), for the widening kernel.
    Rounded { x: Vec<f32>, a: Vec<f32> },
    /// The layout of [`pack_pairs`], for `vdpbf16ps`.
    Pairs(Vec<u32>),
}

impl Bf16Input {
    /// `None` where `level` multiplies bf16 weights exactly (no AVX512_BF16).
    fn prepare(level: Simd, x: &[f32], rows: usize, k: usize) -> Option<Self> {
        if !level.bf16_dot() {
            return None;
        }
        if rows >= BF16_DOT_MIN_ROWS {
            return Some(Bf16Input::Pairs(pack_pairs(level, x, rows, k)));
        }
        let mut bits = vec![0u16; x.len()];
        round_bf16(level, x, &mut bits);
        let x: Vec<f32> = bits
            .iter()
            .map(|b| f32::from_bits((*b as u32) << 16))
            .collect();
        let a = pack_rows(&x, rows, k);
        Some(Bf16Input::Rounded { x, a })
    }
}

impl Panels<LineBf16> {
    /// [`Panels::matmul_cols`], except at a level with [`Simd::bf16_dot`]: there the
    /// activations are rounded to bf16 (see [`PackedWeights::matmul_cols`]).
    fn matmul_cols_bf16(
        &self,
        level: Simd,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        assert!(level <= crate::simd::detected_simd());
        let Some(input) = Bf16Input::prepare(level, x, rows, self.k) else {
            return self.matmul_cols(level, x, rows, cols, out);
        };
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let panels = cols.start / NR..cols.end.div_ceil(NR);
        for_each_tile(rows, MC, panels, 4, |rows, panels| {
            // SAFETY: tasks write disjoint (row block, panel range) tiles of `out`; `level`,
            // which the CPU supports (asserted above), has AVX512_BF16 (`prepare` said so).
            unsafe { self.tile_bf16_dot(&input, Tile { rows, panels }, out_ptr) };
        });
    }

    /// A tile of the product on activations rounded to bf16.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL and AVX512_BF16 (`input` is only made at a level
    /// with them). `out` must point to this product's row-major output (`rows x n`), valid for
    /// writing every element of the tile, and no other thread may write those elements
    /// meanwhile (each task owns its tile).
    unsafe fn tile_bf16_dot(&self, input: &Bf16Input, tile: Tile, out: SyncPtr) {
        unsafe {
            #[cfg(target_arch = "x86_64")]
            match input {
                Bf16Input::Rounded { x, a } => self.tile_with(Simd::Avx512, x, a, tile, out),
                Bf16Input::Pairs(pairs) => {
                    avx512bf16::tile(&self.lines, self.n, self.k, pairs, tile, out.0)
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (input, tile, out);
        }
    }
}

/// `x` rounded to bf16, the bits of each value in `out`: to nearest, ties to even, NaN kept
/// (quiet), exactly as `half::bf16::from_f32`; 16 values at a time with AVX-512 at a level
/// that has it.
fn round_bf16(level: Simd, x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level >= Simd::Avx512 {
        // SAFETY: the level, at most what the CPU has, includes AVX-512 F/BW.
        done = unsafe { avx512bf16::round(x, out) };
    }
    let _ = level;
    for (o, v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = half::bf16::from_f32(*v).to_bits();
    }
}

/// The input rows rounded to bf16 for `vdpbf16ps`: consecutive `k` in pairs, `(x[2q],
/// x[2q + 1])` as one u32 (the first in the low half; an odd `k`'s last pair padded with
/// zero), in micro-tiles of [`MR`] rows stored pair-major (`[k / 2][R]`) at the offset
/// `t0 * ceil(k / 2)` of their first row `t0`, as [`pack_rows`] does with single values.
fn pack_pairs(level: Simd, x: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut a = vec![0u32; rows * kp];
    let mut row = vec![0u16; 2 * kp];
    for t0 in (0..rows).step_by(MR) {
        let r = MR.min(rows - t0);
        let dst = &mut a[t0 * kp..(t0 + r) * kp];
        for i in 0..r {
            round_bf16(level, &x[(t0 + i) * k..(t0 + i + 1) * k], &mut row[..k]);
            for (q, pair) in row.chunks_exact(2).enumerate() {
                dst[q * r + i] = pair[0] as u32 | (pair[1] as u32) << 16;
            }
        }
    }
    a
}

/// Calls `tile(rows, units)` for every tile of a product with `rows` token rows and the
/// column units `units` (panels or quantized groups), on the current rayon pool: row blocks
/// of `row_block` rows, unit ranges of about four tasks per thread over the whole call (at
/// least `min_units` units, at most 64).
pub(crate) fn for_each_tile(
    rows: usize,
    row_block: usize,
    units: std::ops::Range<usize>,
    min_units: usize,
    tile: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let count = units.len();
    if rows == 0 || count == 0 {
        return;
    }
    let row_blocks = rows.div_ceil(row_block);
    let threads = rayon::current_num_threads().max(1);
    let per_task = (count * row_blocks)
        .div_ceil(threads * 4)
        .clamp(min_units, 64)
        .min(count);
    let chunks = count.div_ceil(per_task);
    let run = |task: usize| {
        let (rb, chunk) = (task / chunks, task % chunks);
        let r0 = rb * row_block;
        let u0 = units.start + chunk * per_task;
        tile(
            r0..(r0 + row_block).min(rows),
            u0..(u0 + per_task).min(units.end),
        );
    };
    let tasks = row_blocks * chunks;
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// The input rows in micro-tiles of [`MR`] rows, each tile stored k-major (`[k][R]`, R its
/// rows) at the offset of its first row: the micro-kernel then reads one contiguous stream
/// instead of R rows `k` floats apart (rows exactly 4 KiB apart share L1 sets, with each other
/// and with the weights).
fn pack_rows(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut a = vec![0f32; rows * k];
    for t0 in (0..rows).step_by(MR) {
        let r = MR.min(rows - t0);
        let dst = &mut a[t0 * k..(t0 + r) * k];
        for i in 0..r {
            for (kk, v) in x[(t0 + i) * k..(t0 + i + 1) * k].iter().enumerate() {
                dst[kk * r + i] = *v;
            }
        }
    }
    a
}

#[derive(Clone)]
struct Tile {
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
}

use crate::SyncPtr;

/// Where a micro-tile reads, writes and prefetches.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Micro<L> {
    /// The tile's inputs at the block's first `k`, `[kc][R]` (see `pack_rows`).
    a: *const f32,
    /// First line of the panel block.
    b: *const L,
    kc: usize,
    /// First output of the tile's first row; rows are `ldc` apart.
    c: *mut f32,
    ldc: usize,
    /// Valid columns of the panel (16 but for the last panel).
    cols: usize,
    /// Add to `c` instead of overwriting it (every `k` block but the first).
    accumulate: bool,
    /// Prefetch `pf_lines` lines from `pf`, one every `pf_every` steps.
    pf: *const L,
    pf_lines: usize,
    pf_every: usize,
}

/// The two inner loops of the matmul for one instruction set: a micro-tile of up to [`MR`]
/// rows over one panel block, and one token row over `P` whole panels. [`drive`] walks a
/// tile with them; each set's `tile` compiles `drive` with its own target features.
#[cfg(target_arch = "x86_64")]
trait Kernel {
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled. `m`'s
    /// pointers must cover the panel rows, inputs and outputs its fields describe.
    unsafe fn micro_rows<L: PanelLine>(rows: usize, m: Micro<L>);
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled. `a` must
    /// be valid for reading every element the description above says is read through it.
    unsafe fn gemv<L: PanelLine, const P: usize>(
        a: *const f32,
        k: usize,
        bs: [*const L; P],
        cs: [*mut f32; P],
        cols: [usize; P],
    );
}

/// For each panel, for each `k` block, every micro-tile of the rows. The micro-tiles of a
/// block together prefetch the next block (the next `KC` lines: blocks and panels are
/// contiguous), so the tile's weights stream from memory while it computes. One token row
/// takes the GEMV path instead: `P` sequential streams of weights keep more memory reads in
/// flight than one (the hardware prefetcher follows each). Inlined into the callers, which
/// enable the instruction set `K` needs.
///
/// # Safety
/// The CPU must support the instruction set of the `Ops`/`Kernel` implementation it is instantiated
/// with (none for the scalar one). `out` must be valid for writing every element the description
/// above says is written through it, and no other thread may access them meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn drive<L: PanelLine, K: Kernel>(
    lines: &[L],
    n: usize,
    k: usize,
    a: &[f32],
    tile: Tile,
    out: *mut f32,
) {
    unsafe {
        let rows = tile.rows.len();
        let micro_tiles = rows.div_ceil(MR);
        let end = lines.as_ptr().add(tile.panels.end * k);
        if rows == 1 {
            let row = tile.rows.start;
            let a = a.as_ptr().add(row * k);
            let c = out.add(row * n);
            let lines = lines.as_ptr();
            let at = |p: usize| (lines.add(p * k), c.add(p * NR), NR.min(n - p * NR));
            let mut p = tile.panels.start;
            while p + 4 <= tile.panels.end {
                let parts: [_; 4] = std::array::from_fn(|j| at(p + j));
                K::gemv::<L, 4>(
                    a,
                    k,
                    parts.map(|q| q.0),
                    parts.map(|q| q.1),
                    parts.map(|q| q.2),
                );
                p += 4;
            }
            while p < tile.panels.end {
                let q = at(p);
                K::gemv::<L, 1>(a, k, [q.0], [q.1], [q.2]);
                p += 1;
            }
            return;
        }
        for p in tile.panels {
            let cols = NR.min(n - p * NR);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let b = lines.as_ptr().add(p * k + k0);
                let next = b.add(kc);
                let ahead = (end.offset_from(next).max(0) as usize).min(KC);
                let mut t = 0;
                for j in 0..micro_tiles {
                    let r = MR.min(rows - t);
                    let (lo, hi) = (ahead * j / micro_tiles, ahead * (j + 1) / micro_tiles);
                    let pf_lines = hi - lo;
                    let row = tile.rows.start + t;
                    K::micro_rows(
                        r,
                        Micro {
                            a: a.as_ptr().add(row * k + k0 * r),
                            b,
                            kc,
                            c: out.add(row * n + p * NR),
                            ldc: n,
                            cols,
                            accumulate: k0 > 0,
                            pf: next.add(lo),
                            pf_lines,
                            pf_every: (kc / pf_lines.max(1)).max(1),
                        },
                    );
                    t += r;
                }
                k0 += kc;
            }
        }
    }
}

/// AVX2 + FMA: a line is two 8-wide vectors, a row of a micro-tile two accumulators.
#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Kernel, Micro, PanelLine, Tile, MR, NR};
    use std::arch::x86_64::*;

    pub struct Avx2;

    /// `R` rows (1..=MR) of one panel block: `R x 16` accumulators. With fewer than 3 rows
    /// the FMA chains would wait on each other, so `k` is unrolled by `U` with separate
    /// accumulators, summed at the end.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `m`'s pointers must cover the panel rows, inputs and outputs its fields
    /// describe.
    #[inline(always)]
    unsafe fn micro<L: PanelLine, const R: usize, const U: usize>(m: Micro<L>) {
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
            let (mut next_pf, mut pf_done) = (0usize, 0usize);
            let mut kk = 0;
            while kk + U <= m.kc {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let [b0, b1] = L::load(m.b.add(kk + u));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_broadcast_ss(&*m.a.add((kk + u) * R + r));
                        acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                    }
                }
                while kk >= next_pf && pf_done < m.pf_lines {
                    _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                    pf_done += 1;
                    next_pf += m.pf_every;
                }
                kk += U;
            }
            while kk < m.kc {
                let [b0, b1] = L::load(m.b.add(kk));
                for (r, acc) in acc[0].iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*m.a.add(kk * R + r));
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
                kk += 1;
            }
            while pf_done < m.pf_lines {
                _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                pf_done += 1;
            }
            let (first, rest) = acc.split_at_mut(1);
            for other in rest.iter() {
                for (a, o) in first[0].iter_mut().zip(other) {
                    a[0] = _mm256_add_ps(a[0], o[0]);
                    a[1] = _mm256_add_ps(a[1], o[1]);
                }
            }
            for (r, acc) in acc[0].iter().enumerate() {
                let c = m.c.add(r * m.ldc);
                if m.cols == NR {
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if m.accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c.add(8)));
                    }
                    _mm256_storeu_ps(c, v0);
                    _mm256_storeu_ps(c.add(8), v1);
                } else {
                    let mut tmp = [0f32; NR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
                    for (j, v) in tmp.iter().enumerate().take(m.cols) {
                        if m.accumulate {
                            *c.add(j) += v;
                        } else {
                            *c.add(j) = *v;
                        }
                    }
                }
            }
        }
    }

    impl Kernel for Avx2 {
        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx2,fma`. `m`'s pointers must cover the panel rows, inputs and outputs its
        /// fields describe.
        #[inline(always)]
        unsafe fn micro_rows<L: PanelLine>(rows: usize, m: Micro<L>) {
            unsafe {
                match rows {
                    1 => micro::<L, 1, 4>(m),
                    2 => micro::<L, 2, 2>(m),
                    3 => micro::<L, 3, 1>(m),
                    4 => micro::<L, 4, 1>(m),
                    5 => micro::<L, 5, 1>(m),
                    _ => micro::<L, MR, 1>(m),
                }
            }
        }

        /// `2P` independent FMA chains; memory-bound, no software prefetch, no `k` blocking.
        ///
        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx2,fma`. `a` must be valid for reading every element the description above
        /// says is read through it.
        #[inline(always)]
        unsafe fn gemv<L: PanelLine, const P: usize>(
            a: *const f32,
            k: usize,
            bs: [*const L; P],
            cs: [*mut f32; P],
            cols: [usize; P],
        ) {
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; P];
                for kk in 0..k {
                    let av = _mm256_broadcast_ss(&*a.add(kk));
                    for p in 0..P {
                        let [b0, b1] = L::load(bs[p].add(kk));
                        acc[p][0] = _mm256_fmadd_ps(av, b0, acc[p][0]);
                        acc[p][1] = _mm256_fmadd_ps(av, b1, acc[p][1]);
                    }
                }
                for p in 0..P {
                    let mut tmp = [0f32; NR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[p][0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[p][1]);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), cs[p], cols[p]);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional
    /// extensions this module asks for) first. `out` must be valid for writing every element the
    /// description above says is written through it, and no other thread may access them meanwhile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<L: PanelLine>(
        lines: &[L],
        n: usize,
        k: usize,
        a: &[f32],
        tile: Tile,
        out: *mut f32,
    ) {
        unsafe { super::drive::<L, Avx2>(lines, n, k, a, tile, out) }
    }
}

/// AVX-512: a line is one 16-wide vector, a row of a micro-tile one accumulator, so a step
/// takes half the instructions of AVX2 and twice the accumulators fit in the 32 registers;
/// partial panels store through a mask.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Kernel, Micro, PanelLine, Tile, MR, NR};
    use std::arch::x86_64::*;

    pub struct Avx512;

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vl,avx2,fma`. `c` must be valid for writing every element the
    /// description above says is written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    pub(super) unsafe fn store(c: *mut f32, v: __m512, cols: usize, accumulate: bool) {
        unsafe {
            if cols == NR {
                let v = if accumulate {
                    _mm512_add_ps(v, _mm512_loadu_ps(c))
                } else {
                    v
                };
                _mm512_storeu_ps(c, v);
            } else {
                let mask: __mmask16 = ((1u32 << cols) - 1) as __mmask16;
                let v = if accumulate {
                    _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, c))
                } else {
                    v
                };
                _mm512_mask_storeu_ps(c, mask, v);
            }
        }
    }

    /// `R` rows (1..=MR) of one panel block, `k` unrolled by `U` with separate accumulators
    /// (at least 8 independent FMA chains hide the FMA latency on two ports).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vl,avx2,fma`. `m`'s pointers must cover the panel rows, inputs and
    /// outputs its fields describe.
    #[inline(always)]
    unsafe fn micro<L: PanelLine, const R: usize, const U: usize>(m: Micro<L>) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); R]; U];
            let (mut next_pf, mut pf_done) = (0usize, 0usize);
            let mut kk = 0;
            while kk + U <= m.kc {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let b = L::load512(m.b.add(kk + u));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*m.a.add((kk + u) * R + r));
                        *acc = _mm512_fmadd_ps(av, b, *acc);
                    }
                }
                while kk >= next_pf && pf_done < m.pf_lines {
                    _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                    pf_done += 1;
                    next_pf += m.pf_every;
                }
                kk += U;
            }
            while kk < m.kc {
                let b = L::load512(m.b.add(kk));
                for (r, acc) in acc[0].iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*m.a.add(kk * R + r));
                    *acc = _mm512_fmadd_ps(av, b, *acc);
                }
                kk += 1;
            }
            while pf_done < m.pf_lines {
                _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                pf_done += 1;
            }
            let (first, rest) = acc.split_at_mut(1);
            for other in rest.iter() {
                for (a, o) in first[0].iter_mut().zip(other) {
                    *a = _mm512_add_ps(*a, *o);
                }
            }
            for (r, acc) in acc[0].iter().enumerate() {
                store(m.c.add(r * m.ldc), *acc, m.cols, m.accumulate);
            }
        }
    }

    impl Kernel for Avx512 {
        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx512f,avx512bw,avx512vl,avx2,fma`. `m`'s pointers must cover the panel rows,
        /// inputs and outputs its fields describe.
        #[inline(always)]
        unsafe fn micro_rows<L: PanelLine>(rows: usize, m: Micro<L>) {
            unsafe {
                match rows {
                    1 => micro::<L, 1, 8>(m),
                    2 => micro::<L, 2, 4>(m),
                    3 => micro::<L, 3, 2>(m),
                    4 => micro::<L, 4, 2>(m),
                    5 => micro::<L, 5, 2>(m),
                    _ => micro::<L, MR, 2>(m),
                }
            }
        }

        /// `2P` independent FMA chains (`k` unrolled by two); memory-bound.
        ///
        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx512f,avx512bw,avx512vl,avx2,fma`. `a` must be valid for reading every
        /// element the description above says is read through it.
        #[inline(always)]
        unsafe fn gemv<L: PanelLine, const P: usize>(
            a: *const f32,
            k: usize,
            bs: [*const L; P],
            cs: [*mut f32; P],
            cols: [usize; P],
        ) {
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); P]; 2];
                let mut kk = 0;
                while kk + 2 <= k {
                    for (u, acc) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.add(kk + u));
                        for p in 0..P {
                            acc[p] = _mm512_fmadd_ps(av, L::load512(bs[p].add(kk + u)), acc[p]);
                        }
                    }
                    kk += 2;
                }
                if kk < k {
                    let av = _mm512_set1_ps(*a.add(kk));
                    for p in 0..P {
                        acc[0][p] = _mm512_fmadd_ps(av, L::load512(bs[p].add(kk)), acc[0][p]);
                    }
                }
                for p in 0..P {
                    store(cs[p], _mm512_add_ps(acc[0][p], acc[1][p]), cols[p], false);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx512f,avx512bw,avx512vl,avx2,fma`; callers check [`crate::simd()`]
    /// (and the optional extensions this module asks for) first. `out` must be valid for writing
    /// every element the description above says is written through it, and no other thread may
    /// access them meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub unsafe fn tile<L: PanelLine>(
        lines: &[L],
        n: usize,
        k: usize,
        a: &[f32],
        tile: Tile,
        out: *mut f32,
    ) {
        unsafe {
            if tile.rows.len() == 1 && !L::WIDE_GEMV {
                return super::drive::<L, super::avx::Avx2>(lines, n, k, a, tile, out);
            }
            super::drive::<L, Avx512>(lines, n, k, a, tile, out)
        }
    }
}

/// AVX512_BF16: a pair of consecutive lines of a bf16 panel (64 contiguous bytes) becomes,
/// through one word permutation, 16 dwords `(w[k][c], w[k + 1][c])` in column order, and
/// `vdpbf16ps` adds `w[k][c] x[k] + w[k + 1][c] x[k + 1]` to column `c`'s f32 accumulator
/// for one row, the row's activation pair broadcast (see `pack_pairs`): twice the products of
/// an f32 FMA per instruction, and no widening.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::{LineBf16, Tile, BF16_SLOT, KC, MR, NR};
    use std::arch::x86_64::*;

    /// Word `i` of the permuted pair: the low word of dword `c` is column `c` of the first
    /// line (stored at word `BF16_SLOT[c]`), the high word column `c` of the second (the same
    /// slot, 16 words on).
    const PAIR_INDEX: [u16; 2 * NR] = {
        let mut ix = [0u16; 2 * NR];
        let mut c = 0;
        while c < NR {
            ix[2 * c] = BF16_SLOT[c] as u16;
            ix[2 * c + 1] = (NR + BF16_SLOT[c]) as u16;
            c += 1;
        }
        ix
    };

    /// Where a micro-tile reads, writes and prefetches (`super::Micro` with activation pairs).
    #[derive(Clone, Copy)]
    struct Micro {
        /// The tile's activation pairs at the block's first `k`, `[kc / 2][R]`.
        a: *const u32,
        /// First line of the panel block (its first `k` is even: blocks are `KC` long).
        b: *const LineBf16,
        /// Lines of the block; an odd count only in a panel's last block of an odd `k`.
        kc: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
        pf: *const LineBf16,
        pf_lines: usize,
        pf_every: usize,
    }

    /// The pair of lines `kk`, `kk + 1` of the block as `vdpbf16ps` wants them.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points. `b.add(kk)`
    /// and the next line must be readable.
    #[inline(always)]
    unsafe fn pair(b: *const LineBf16, kk: usize, idx: __m512i) -> __m512bh {
        unsafe {
            let v = _mm512_loadu_si512(b.add(kk) as *const __m512i);
            std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(idx, v))
        }
    }

    /// `R` rows (1..=MR) of one panel block, `k` pairs unrolled by `U` with separate
    /// accumulators.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
    /// supports `avx512f,avx512bw,avx512vl,avx512bf16`. `m`'s pointers must cover the panel
    /// lines, activation pairs and outputs its fields describe.
    #[inline(always)]
    unsafe fn micro<const R: usize, const U: usize>(m: Micro, idx: __m512i) {
        unsafe {
            let bcast = |q: usize, r: usize| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *m.a.add(q * R + r) as i32
                ))
            };
            let mut acc = [[_mm512_setzero_ps(); R]; U];
            let (mut next_pf, mut pf_done) = (0usize, 0usize);
            let pairs = m.kc / 2;
            let mut q = 0;
            while q + U <= pairs {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let w = pair(m.b, 2 * (q + u), idx);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_dpbf16_ps(*acc, w, bcast(q + u, r));
                    }
                }
                // One prefetch a cache line (two lines of 32 bytes).
                while 2 * q >= next_pf && pf_done < m.pf_lines {
                    _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                    pf_done += 2;
                    next_pf += 2 * m.pf_every;
                }
                q += U;
            }
            while q < pairs {
                let w = pair(m.b, 2 * q, idx);
                for (r, acc) in acc[0].iter_mut().enumerate() {
                    *acc = _mm512_dpbf16_ps(*acc, w, bcast(q, r));
                }
                q += 1;
            }
            if m.kc % 2 == 1 {
                // The last line alone (the next one is another panel's, or past the end):
                // paired with zeros, as its activation is (see `pack_pairs`).
                let v =
                    _mm512_zextsi256_si512(_mm256_loadu_si256(m.b.add(2 * q) as *const __m256i));
                let w = std::mem::transmute::<__m512i, __m512bh>(_mm512_permutexvar_epi16(idx, v));
                for (r, acc) in acc[0].iter_mut().enumerate() {
                    *acc = _mm512_dpbf16_ps(*acc, w, bcast(q, r));
                }
            }
            while pf_done < m.pf_lines {
                _mm_prefetch::<_MM_HINT_T1>(m.pf.add(pf_done) as *const i8);
                pf_done += 2;
            }
            let (first, rest) = acc.split_at_mut(1);
            for other in rest.iter() {
                for (a, o) in first[0].iter_mut().zip(other) {
                    *a = _mm512_add_ps(*a, *o);
                }
            }
            for (r, acc) in acc[0].iter().enumerate() {
                super::avx512::store(m.c.add(r * m.ldc), *acc, m.cols, m.accumulate);
            }
        }
    }

    /// Rows `tile.rows`, panels `tile.panels` of the product of a bf16 weight and activation
    /// pairs laid out by `pack_pairs`: `drive`'s walk (panels, `k` blocks, micro-tiles, the
    /// next block prefetched) with `vdpbf16ps` micro-tiles, one-row tiles included.
    ///
    /// # Safety
    /// The CPU must support `avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma`; callers check
    /// [`crate::simd()`] first. `pairs` must be `pack_pairs` of this product's rows; `out` must be
    /// valid for writing every element of the tile (row-major `rows x n`), and no other thread
    /// may access them meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub unsafe fn tile(
        lines: &[LineBf16],
        n: usize,
        k: usize,
        pairs: &[u32],
        tile: Tile,
        out: *mut f32,
    ) {
        unsafe {
            let idx = _mm512_loadu_si512(PAIR_INDEX.as_ptr() as *const __m512i);
            let kp = k.div_ceil(2);
            let rows = tile.rows.len();
            let micro_tiles = rows.div_ceil(MR);
            let end = lines.as_ptr().add(tile.panels.end * k);
            for p in tile.panels {
                let cols = NR.min(n - p * NR);
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    let b = lines.as_ptr().add(p * k + k0);
                    let next = b.add(kc);
                    let ahead = (end.offset_from(next).max(0) as usize).min(KC);
                    let mut t = 0;
                    for j in 0..micro_tiles {
                        let r = MR.min(rows - t);
                        let (lo, hi) = (ahead * j / micro_tiles, ahead * (j + 1) / micro_tiles);
                        let pf_lines = hi - lo;
                        let row = tile.rows.start + t;
                        let m = Micro {
                            a: pairs.as_ptr().add(row * kp + k0 / 2 * r),
                            b,
                            kc,
                            c: out.add(row * n + p * NR),
                            ldc: n,
                            cols,
                            accumulate: k0 > 0,
                            pf: next.add(lo),
                            pf_lines,
                            pf_every: (kc / pf_lines.max(1)).max(1),
                        };
                        match r {
                            1 => micro::<1, 4>(m, idx),
                            2 => micro::<2, 4>(m, idx),
                            3 => micro::<3, 2>(m, idx),
                            4 => micro::<4, 2>(m, idx),
                            5 => micro::<5, 2>(m, idx),
                            _ => micro::<MR, 2>(m, idx),
                        }
                        t += r;
                    }
                    k0 += kc;
                }
            }
        }
    }

    /// The first `len / 16 * 16` values of [`super::round_bf16`]; returns how many.
    ///
    /// # Safety
    /// The CPU must support `avx512f,avx512bw`; callers check the level first.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn round(x: &[f32], out: &mut [u16]) -> usize {
        unsafe {
            let n = x.len().min(out.len()) / 16 * 16;
            let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
            let inf = _mm512_set1_epi32(0x7F80_0000);
            let half_ulp = _mm512_set1_epi32(0x7FFF);
            let one = _mm512_set1_epi32(1);
            let quiet = _mm512_set1_epi32(0x0040);
            let mut i = 0;
            while i < n {
                let v = _mm512_loadu_si512(x.as_ptr().add(i) as *const __m512i);
                let nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(v, abs_mask), inf);
                let hi = _mm512_srli_epi32::<16>(v);
                // Adding 0x7FFF plus the kept value's lowest bit carries into the kept half
                // exactly when the dropped half is above one half, or equal with an odd kept
                // value: ties to even.
                let up = _mm512_add_epi32(_mm512_add_epi32(v, half_ulp), _mm512_and_si512(hi, one));
                let r = _mm512_mask_mov_epi32(
                    _mm512_srli_epi32::<16>(up),
                    nan,
                    _mm512_or_si512(hi, quiet),
                );
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(i) as *mut __m256i,
                    _mm512_cvtepi32_epi16(r),
                );
                i += 16;
            }
            n
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(x: &[f32], t: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    s += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                o[i * n + j] = s as f32;
            }
        }
        o
    }

    /// Reproducible values in [-0.5, 0.5) (an LCG), for the kernel tests here and in `quant`.
    pub(crate) fn rnd_vec(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn pack_unpack_round_trips() {
        let mut seed = 7;
        // The last is over mem::HUGE_PAGE_MIN_BYTES: a mapped buffer.
        for &(n, k) in &[(1, 1), (16, 3), (17, 5), (40, 300), (5, 0), (1030, 520)] {
            let w = rnd_vec(&mut seed, n * k);
            let p = PackedWeights::pack(&w, n, k);
            assert_eq!((p.n(), p.k()), (n, k));
            assert_eq!(p.unpack(), w, "{n}x{k}");
        }
    }

    #[test]
    fn matches_naive_on_odd_shapes() {
        let mut seed = 1u64;
        for &(t, k, n) in &[
            (1, 8, 4),
            (1, 37, 9),
            (1, 600, 70),
            (2, 24, 5),
            (3, 64, 33),
            (4, 40, 2),
            (5, 13, 70),
            (6, 300, 16),
            (7, 41, 11),
            (9, 100, 3),
            (13, 257, 48),
            (17, 256, 130),
            (64, 520, 66),
            // Several row blocks, a partial last one, k blocks with a short last block.
            (MC + 5, KC + 3, 35),
            (2 * MC + 1, 17, 5),
            // A mapped (huge-page) buffer.
            (3, 520, 1030),
        ] {
            let x = rnd_vec(&mut seed, t * k);
            let w = rnd_vec(&mut seed, n * k);
            let r = naive(&x, t, k, &w, n);
            let p = PackedWeights::pack(&w, n, k);
            // One thread, and three (tasks split the panels and row blocks).
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut o = vec![f32::NAN; t * n];
                pool.install(|| p.matmul(&x, t, &mut o));
                for (a, b) in o.iter().zip(&r) {
                    assert!(
                        (a - b).abs() < 1e-4 * (k as f32).sqrt().max(1.0),
                        "{t}x{k}x{n} on {threads}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn column_ranges_write_only_their_columns() {
        let mut seed = 7u64;
        for &(t, k, n) in &[(1, 40, 70), (7, 300, 70), (64, 33, 16 * 9 + 5)] {
            let x = rnd_vec(&mut seed, t * k);
            let w = rnd_vec(&mut seed, n * k);
            let r = naive(&x, t, k, &w, n);
            let p = PackedWeights::pack(&w, n, k);
            // Panel-aligned parts that cover the matrix, the last one partial.
            let cuts: Vec<usize> = (0..n).step_by(2 * NR).chain([n]).collect();
            for part in cuts.windows(2) {
                let cols = part[0]..part[1];
                let mut o = vec![f32::NAN; t * n];
                p.matmul_cols(&x, t, cols.clone(), &mut o);
                for (i, (a, b)) in o.iter().zip(&r).enumerate() {
                    if cols.contains(&(i % n)) {
                        assert!((a - b).abs() < 1e-4 * (k as f32).sqrt(), "{t}x{k}x{n} {i}");
                    } else {
                        assert!(a.is_nan(), "{t}x{k}x{n}: column {} written", i % n);
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "panels")]
    fn column_ranges_must_start_on_a_panel() {
        let p = PackedWeights::pack(&[0.0; 40 * 2], 40, 2);
        p.matmul_cols(&[0.0; 2], 1, 3..16, &mut [0.0; 40]);
    }

    #[test]
    fn concat_stacks_outputs() {
        let mut seed = 11;
        let k = 7;
        // Whole panels (copied) and a ragged first part (repacked).
        for ns in [[16usize, 32, 5], [5, 16, 3]] {
            let ws: Vec<Vec<f32>> = ns.iter().map(|&n| rnd_vec(&mut seed, n * k)).collect();
            let parts: Vec<PackedWeights> = ns
                .iter()
                .zip(&ws)
                .map(|(&n, w)| PackedWeights::pack(w, n, k))
                .collect();
            let refs: Vec<&PackedWeights> = parts.iter().collect();
            let c = PackedWeights::concat(&refs);
            assert_eq!((c.n(), c.k()), (ns.iter().sum::<usize>(), k));
            assert_eq!(c.unpack(), ws.concat(), "{ns:?}");
        }
    }

    /// The instruction sets this CPU can run, the scalar oracle first.
    use crate::simd::available_levels as levels;

    #[test]
    fn scalar_path_matches_naive() {
        let mut seed = 3u64;
        let (t, k, n) = (5, 33, 37);
        let x = rnd_vec(&mut seed, t * k);
        let w = rnd_vec(&mut seed, n * k);
        let r = naive(&x, t, k, &w, n);
        let p = PackedWeights::pack(&w, n, k);
        let mut o = vec![f32::NAN; t * n];
        p.matmul_with(Simd::Scalar, &x, t, &mut o);
        for (a, b) in o.iter().zip(&r) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    /// The levels at which `ty`'s products are exact (bf16 rounds its activations at a level
    /// with `bf16_dot`; the tests of that path are the `bf16_dot_*` ones).
    fn exact_levels(ty: WeightType) -> Vec<Simd> {
        levels()
            .into_iter()
            .filter(|l| ty != WeightType::Bf16 || !l.bf16_dot())
            .collect()
    }

    /// Every instruction set the CPU has (AVX2, AVX-512) against the scalar path, for both
    /// panel types, every micro-tile height, the GEMV path, partial panels and `k` blocks.
    /// bf16 at the levels where its products are exact (see `exact_levels`).
    #[test]
    fn every_instruction_set_matches_the_scalar_path() {
        let mut seed = 5u64;
        let levels = levels();
        eprintln!("instruction sets tested: {levels:?}");
        for ty in [WeightType::F32, WeightType::Bf16] {
            let levels = exact_levels(ty);
            for t in [1, 2, 3, 4, 5, 6, 7, 13, 33] {
                for &(k, n) in &[(1, 3), (37, 9), (2 * KC + 5, 70), (64, 16 * 5)] {
                    let x = rnd_vec(&mut seed, t * k);
                    let w = rnd_vec(&mut seed, n * k);
                    let p = PackedWeights::pack_as(&w, n, k, ty);
                    let mut want = vec![f32::NAN; t * n];
                    p.matmul_with(Simd::Scalar, &x, t, &mut want);
                    for &level in &levels[1..] {
                        let mut o = vec![f32::NAN; t * n];
                        p.matmul_with(level, &x, t, &mut o);
                        for (i, (a, b)) in o.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * (k as f32).sqrt(),
                                "{ty} {level:?} {t}x{k}x{n} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_holds_the_rounded_weights() {
        let mut seed = 13u64;
        let (n, k) = (21, 37);
        let w = rnd_vec(&mut seed, n * k);
        let p = PackedWeights::pack_as(&w, n, k, WeightType::Bf16);
        let want: Vec<f32> = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(p.unpack(), want);
        assert_eq!(p.weight_bytes(), n * k * 2);
    }

    /// f32 and bf16 against the f64 product of the weights they hold (exact for both), at the
    /// row counts of decode and prefill, on odd shapes: only f32 summation error remains.
    /// bf16 at the levels where its products are exact (the process's level if it is one, the
    /// highest such level otherwise; see `exact_levels`).
    #[test]
    fn f32_and_bf16_match_their_weights_in_f64() {
        let mut seed = 21u64;
        for ty in [WeightType::F32, WeightType::Bf16] {
            let levels = exact_levels(ty);
            let top = *levels
                .iter()
                .filter(|l| **l <= crate::simd())
                .max()
                .unwrap();
            for &t in &[1, 2, 7, 16, 33, 128] {
                for &(k, n) in &[(37, 9), (300, 33), (KC + 3, 70)] {
                    let x = rnd_vec(&mut seed, t * k);
                    let w = rnd_vec(&mut seed, n * k);
                    let p = PackedWeights::pack_as(&w, n, k, ty);
                    let r = naive(&x, t, k, &p.unpack(), n);
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let mut o = vec![f32::NAN; t * n];
                        pool.install(|| p.matmul_at(top, &x, t, &mut o));
                        for (a, b) in o.iter().zip(&r) {
                            assert!(
                                (a - b).abs() < 1e-5 * (k as f32).sqrt(),
                                "{ty} {t}x{k}x{n}/{threads}: {a} vs {b}"
                            );
                        }
                    }
                    // Every instruction set, the scalar oracle included.
                    for &level in &levels {
                        let mut o = vec![f32::NAN; t * n];
                        p.matmul_with(level, &x, t, &mut o);
                        for (a, b) in o.iter().zip(&r) {
                            assert!(
                                (a - b).abs() < 1e-5 * (k as f32).sqrt(),
                                "{ty} {level:?} {t}x{k}x{n}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn concat_keeps_the_weight_type() {
        let mut seed = 17u64;
        let k = 40;
        // K-quants too: rows of 40 padded to one block, stacked as segments.
        for ty in WeightType::ALL.into_iter().chain(WeightType::KQUANTS) {
            for ns in [[16usize, 32, 5], [5, 16, 3]] {
                let parts: Vec<PackedWeights> = ns
                    .iter()
                    .map(|&n| PackedWeights::pack_as(&rnd_vec(&mut seed, n * k), n, k, ty))
                    .collect();
                let refs: Vec<&PackedWeights> = parts.iter().collect();
                let c = PackedWeights::concat(&refs);
                assert_eq!(c.weight_type(), ty);
                let want: Vec<f32> = parts.iter().flat_map(|p| p.unpack()).collect();
                assert_eq!(c.unpack(), want, "{ty} {ns:?}");
            }
        }
    }

    #[test]
    fn weight_types_parse_and_size() {
        for ty in WeightType::ALL {
            assert_eq!(WeightType::parse(ty.name()), Some(ty));
        }
        assert_eq!(WeightType::parse("Q8"), Some(WeightType::Q8_0));
        for ty in WeightType::KQUANTS {
            assert_eq!(WeightType::parse(ty.name()), Some(ty));
        }
        assert_eq!(WeightType::parse("Q5_K"), Some(WeightType::Q5K));
        assert_eq!(WeightType::parse("q3_k"), None);
        // 512 weights a row: two K-quant blocks (144, 176, 210 bytes) or 16 MXFP4 ones (17).
        assert_eq!(WeightType::Q4K.bytes(3, 512), 3 * 2 * 144);
        assert_eq!(WeightType::Q5K.bytes(3, 512), 3 * 2 * 176);
        assert_eq!(WeightType::Q6K.bytes(3, 512), 3 * 2 * 210);
        assert_eq!(WeightType::Mxfp4.bytes(3, 512), 3 * 16 * 17);
        // 64 weights a row: two blocks of 34 (q8_0) or 18 (q4_0) bytes.
        assert_eq!(WeightType::Q8_0.bytes(3, 64), 3 * 2 * 34);
        assert_eq!(WeightType::Q4_0.bytes(3, 64), 3 * 2 * 18);
        // Resident bytes are within 5% of those for a layer-sized weight.
        for ty in WeightType::ALL {
            let (n, k) = (512, 1024);
            let p = PackedWeights::pack_as(&vec![0.5; n * k], n, k, ty);
            let (held, own) = (p.resident_bytes() as f64, p.weight_bytes() as f64);
            assert!(held >= own && held <= own * 1.05, "{ty}: {held} vs {own}");
        }
    }

    /// `round_bf16` is `half::bf16::from_f32` bit for bit at every level: ties to even both
    /// ways, carries into the exponent and to infinity, NaNs kept quiet, subnormals, zeros.
    #[test]
    fn bf16_rounding_is_halfs_at_every_level() {
        let mut seed = 29u64;
        let mut bits: Vec<u32> = vec![
            0x0000_0000,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000, // zeros, infinities
            0x7F80_0001,
            0x7FC0_0000,
            0xFFFF_FFFF,
            0x7FBF_FFFF, // NaNs (signalling too)
            0x3F80_8000,
            0x3F81_8000,
            0xBF80_8000,
            0xBF81_8000, // ties: to even, down and up
            0x3F80_8001,
            0x3F80_7FFF,
            0x3FFF_FFFF,
            0x3FFF_8000, // above, below, exponent carry
            0x7F7F_FFFF,
            0x7F7F_8000,
            0x7F7E_8000,
            0xFF7F_FFFF, // to infinity, ties at the top
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x807F_FFFF, // subnormals
        ];
        for _ in 0..4000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bits.push((seed >> 32) as u32);
        }
        let x: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let want: Vec<u16> = x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        for level in levels() {
            // Every length and offset: the SIMD body and the scalar tail.
            for skip in [0, 1, 7] {
                let mut got = vec![0u16; x.len() - skip];
                round_bf16(level, &x[skip..], &mut got);
                for (i, (g, w)) in got.iter().zip(&want[skip..]).enumerate() {
                    assert_eq!(g, w, "{level:?} {:#010x}", bits[skip + i]);
                }
            }
        }
    }

    /// The level with `vdpbf16ps`, if this CPU has it (the `bf16_dot_*` tests need it: they
    /// say so, and pass, where it is missing).
    fn dot_level() -> Option<Simd> {
        let l = levels().into_iter().find(|l| l.bf16_dot());
        if l.is_none() {
            eprintln!("no AVX512_BF16 on this CPU: the bf16 dot-product path is not tested");
        }
        l
    }

    /// Shapes for the bf16 dot path: odd and even `k` (an odd last pair), one `k` block and
    /// three with a short odd last one, `n` a multiple of 16 and not, one and several row
    /// blocks ([`MC`]); rows 1 (the rounded GEMV), 2 and 3 (the rounded widening micro-tiles,
    /// below [`BF16_DOT_MIN_ROWS`]), 4..=9 (`vdpbf16ps`: every micro-tile height, 1-3 as
    /// the partial last micro-tile of 7-9 rows), 13, 33, and a second row block of 7.
    const DOT_SHAPES: [(usize, usize); 6] = [
        (1, 3),
        (37, 9),
        (64, 16 * 5),
        (2 * KC + 5, 70),
        (KC, 33),
        (300, 17),
    ];
    const DOT_ROWS: [usize; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 33, MC + 7];
    const _: () = assert!(
        BF16_DOT_MIN_ROWS <= 4,
        "DOT_ROWS' partial micro-tiles need it"
    );

    /// `out[t, j]` with the activations rounded to bf16 first (`half`) and each pair of
    /// exact products `w[j, 2q] x[2q] + w[j, 2q + 1] x[2q + 1]` added in f32, `k` in order:
    /// what `vdpbf16ps` computes; with `sum |w x|` of each output, the scale of its error.
    fn rounded_pairs_reference(
        x: &[f32],
        t: usize,
        k: usize,
        w: &[f32],
        n: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let xr: Vec<f32> = x
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        let (mut o, mut mag) = (vec![0f32; t * n], vec![0f32; t * n]);
        for i in 0..t {
            for j in 0..n {
                let (xi, wj) = (&xr[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                let (mut s, mut m) = (0f32, 0f32);
                for (xp, wp) in xi.chunks(2).zip(wj.chunks(2)) {
                    let p: f32 = xp.iter().zip(wp).map(|(a, b)| a * b).sum();
                    s += p;
                    m += xp.iter().zip(wp).map(|(a, b)| (a * b).abs()).sum::<f32>();
                }
                o[i * n + j] = s;
                mag[i * n + j] = m;
            }
        }
        (o, mag)
    }

    /// The dot path computes exactly what it is meant to: the activations rounded to bf16 to
    /// nearest-even, paired `(k, k + 1)` with the right weights in the right columns, products
    /// summed in f32. Against `rounded_pairs_reference` within `1e-5 * sum |w x|` (the two
    /// differ only in the order of f32 sums, a few units of 2^-24 relative): one tile on this
    /// thread, and through `matmul_at` on one and three threads. Rounding toward zero, not
    /// rounding, or a pair matched with the wrong activation or column is off by up to 2^-8
    /// (not rounding, truncating: 2^-7) of each product, far outside; the test checks that its
    /// own tolerance can tell (the unrounded product must fall outside it somewhere).
    #[test]
    fn bf16_dot_matches_the_rounded_scalar_reference() {
        let Some(dot) = dot_level() else { return };
        let mut seed = 31u64;
        for &(k, n) in &DOT_SHAPES {
            for &t in &DOT_ROWS {
                let x = rnd_vec(&mut seed, t * k);
                let w = rnd_vec(&mut seed, n * k);
                let p = PackedWeights::pack_as(&w, n, k, WeightType::Bf16);
                let held = p.unpack();
                let (want, mag) = rounded_pairs_reference(&x, t, k, &held, n);
                let tol = |i: usize| 1e-5 * mag[i] + 1e-30;
                let mut got = vec![vec![f32::NAN; t * n]; 3];
                p.matmul_with(dot, &x, t, &mut got[0]);
                for (threads, o) in [1, 3].into_iter().zip(&mut got[1..]) {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| p.matmul_at(dot, &x, t, o));
                }
                for (run, o) in got.iter().enumerate() {
                    for (i, (a, b)) in o.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol(i),
                            "{t}x{k}x{n} run {run} [{i}]: {a} vs {b} (tol {})",
                            tol(i)
                        );
                    }
                }
                if k >= 37 {
                    let exact = naive(&x, t, k, &held, n);
                    assert!(
                        exact
                            .iter()
                            .zip(&want)
                            .enumerate()
                            .any(|(i, (a, b))| (a - b).abs() > tol(i)),
                        "{t}x{k}x{n}: the tolerance cannot tell rounded from unrounded inputs"
                    );
                }
            }
        }
    }

    /// Every level, the dot path included, and the process's own `matmul` (column ranges too)
    /// against the f64 product of the held bf16 weights and the unrounded activations:
    /// `|out - exact| <= c * 2^-8 * sum_k |w_jk x_k|` with `c = 1.1`. Rounding an activation to
    /// bf16 (8 significant bits, to nearest) moves it by at most 2^-8 of itself, so each
    /// product by at most 2^-8 of `|w x|` (the weights are held exactly and a product of two
    /// bf16 is exact in f32): 2^-8 of `sum |w x|` in all. The f32 sums add at most about
    /// `k * 2^-24` of `sum |w x|`, under 0.01 * 2^-8 for these `k` (at most 517); the other
    /// 0.09 is margin. Truncating instead of rounding can reach 2^-7 (caught here only
    /// sometimes; `bf16_dot_matches_the_rounded_scalar_reference` always).
    #[test]
    fn bf16_dot_is_within_the_bf16_rounding_of_the_f32_product() {
        let mut seed = 37u64;
        let bound = 1.1 * 2f32.powi(-8);
        for &(k, n) in &DOT_SHAPES {
            for &t in &DOT_ROWS {
                let x = rnd_vec(&mut seed, t * k);
                let w = rnd_vec(&mut seed, n * k);
                let p = PackedWeights::pack_as(&w, n, k, WeightType::Bf16);
                let held = p.unpack();
                let exact = naive(&x, t, k, &held, n);
                let mag: Vec<f32> = (0..t * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        (0..k).map(|l| (x[r * k + l] * held[j * k + l]).abs()).sum()
                    })
                    .collect();
                let check = |what: &str, o: &[f32], cols: std::ops::Range<usize>| {
                    for (i, (a, b)) in o.iter().zip(&exact).enumerate() {
                        if cols.contains(&(i % n)) {
                            assert!(
                                (a - b).abs() <= bound * mag[i] + 1e-30,
                                "{what} {t}x{k}x{n} [{i}]: {a} vs {b}"
                            );
                        } else {
                            assert!(a.is_nan(), "{what} {t}x{k}x{n}: column {} written", i % n);
                        }
                    }
                };
                for level in levels() {
                    let mut o = vec![f32::NAN; t * n];
                    p.matmul_with(level, &x, t, &mut o);
                    check(level.name(), &o, 0..n);
                }
                let mut o = vec![f32::NAN; t * n];
                p.matmul(&x, t, &mut o);
                check("matmul", &o, 0..n);
                if n > 2 * NR {
                    let mut o = vec![f32::NAN; t * n];
                    p.matmul_cols(&x, t, NR..n, &mut o);
                    check("matmul_cols", &o, NR..n);
                }
            }
        }
    }

    /// At the dot level a row's result is the same function of the row whatever rows share
    /// its call (the engine's batches differ from step to step): each row of a batch of `t`
    /// against the row alone (the rounded GEMV) and in a batch of two, within
    /// `1e-5 * sum |w x|` (the order of f32 sums). Without rounding at one row, the row alone
    /// would differ by up to 2^-8 of each product.
    #[test]
    fn bf16_dot_rows_do_not_depend_on_their_batch() {
        let Some(dot) = dot_level() else { return };
        let mut seed = 41u64;
        for &(k, n) in &DOT_SHAPES {
            let t = 9;
            let x = rnd_vec(&mut seed, t * k);
            let w = rnd_vec(&mut seed, n * k);
            let p = PackedWeights::pack_as(&w, n, k, WeightType::Bf16);
            let (_, mag) = rounded_pairs_reference(&x, t, k, &p.unpack(), n);
            let mut batch = vec![f32::NAN; t * n];
            p.matmul_at(dot, &x, t, &mut batch);
            for r in 0..t {
                let row = &x[r * k..(r + 1) * k];
                let mut alone = vec![f32::NAN; n];
                p.matmul_at(dot, row, 1, &mut alone);
                let pair = [row, &x[((r + 1) % t) * k..][..k]].concat();
                let mut two = vec![f32::NAN; 2 * n];
                p.matmul_at(dot, &pair, 2, &mut two);
                for j in 0..n {
                    let (b, tol) = (batch[r * n + j], 1e-5 * mag[r * n + j] + 1e-30);
                    assert!((alone[j] - b).abs() <= tol, "{k}x{n} row {r} [{j}] alone");
                    assert!((two[j] - b).abs() <= tol, "{k}x{n} row {r} [{j}] in two");
                }
            }
        }
    }

    #[test]
    fn empty_k_gives_zeros() {
        let p = PackedWeights::pack(&[], 3, 0);
        let mut o = vec![f32::NAN; 6];
        p.matmul(&[], 2, &mut o);
        assert_eq!(o, vec![0.0; 6]);
    }
}
