//! Block-quantized linear weights (q8_0, q4_0) packed for the CPU matmul, and the matmul that
//! reads them.
//!
//! The formats are llama.cpp's, block for block, so a GGUF tensor can be repacked without
//! requantizing: a block is 32 consecutive weights of one output row (`k` direction) and one
//! f16 scale `d`.
//! - **q8_0**: 32 signed bytes `q`, weight `= q * d`, `d = max|w| / 127`.
//! - **q4_0**: 16 bytes of nibbles, weight `j` in the low nibble of byte `j` and weight
//!   `j + 16` in its high nibble, weight `= (nibble - 8) * d`, `d = w_max / -8` where `w_max`
//!   is the weight of largest magnitude (with its sign). Chosen over q4_K for now because its
//!   blocks line up with the activation blocks below (one scale per 32 weights, no
//!   super-block mins), which keeps the fused kernel a small variation of q8_0's. GGUF's
//!   K-quants (q4_K, q5_K, q6_K) and MXFP4 are held in their own row-major blocks and have
//!   their own kernels in [`crate::kquant`].
//!
//! **Packing.** Outputs are cut into groups of [`G`] = 8 columns; a group stores, for each
//! block index `b` along `k`, one record: the 8 columns' f16 scales, then the 8 columns'
//! blocks (`[8][32]` bytes for q8_0, `[8][16]` for q4_0). A group's records are contiguous
//! in `b`, groups one after the other, so a task streams its weights in one sequential pass,
//! as the f32 panels do. `k` is padded to a multiple of 32 and `n` to a multiple of 8 with
//! zero blocks, which contribute nothing.
//!
//! **The matmul** quantizes each input row to q8_0 blocks (f32 scales) once per call and takes
//! integer dot products of 32 weights at a time (AVX2: `maddubs` + `madd`), scaled by the two
//! blocks' scales into f32 accumulators, as llama.cpp does. The activation rounding is the
//! one error beyond the weights' own: at most `d_x / 2` per input, so an output is off from
//! the dequantized weights' exact product by at most `sum_b d_x[b] / 2 * sum |w|` over the
//! blocks (the bound the tests check). The scalar path computes the same sums in the same
//! order of blocks and is the oracle of the SIMD one.

use crate::mem::HugeBuf;
use half::f16;
use std::sync::Arc;

/// Weights per block (along `k`).
pub const QK: usize = 32;
/// Output columns per group.
pub const G: usize = 8;
/// Rows per row block of the task split.
const MCQ: usize = 64;

/// A block-quantized format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
}

impl QuantFormat {
    /// Bytes of one block's weights (without its scale).
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => QK,
            QuantFormat::Q4_0 => QK / 2,
        }
    }

    /// Bytes of one group record: 8 f16 scales and 8 blocks.
    pub const fn record_bytes(self) -> usize {
        2 * G + G * self.block_bytes()
    }

    /// Bytes per block as stored in GGUF (scale + weights).
    pub const fn gguf_block_bytes(self) -> usize {
        2 + self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// Quantizes 32 weights into one block: the f16 scale and `block_bytes()` bytes.
    pub fn quantize_block(self, x: &[f32; QK], q: &mut [u8]) -> f16 {
        match self {
            QuantFormat::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                for (o, v) in q.iter_mut().zip(x) {
                    *o = (v * id).round() as i8 as u8;
                }
                f16::from_f32(d)
            }
            QuantFormat::Q4_0 => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let nib = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..QK / 2 {
                    q[j] = nib(x[j]) | (nib(x[j + QK / 2]) << 4);
                }
                f16::from_f32(d)
            }
        }
    }

    /// The 32 integer weights of a block (`q8_0`: the bytes; `q4_0`: nibble - 8).
    pub fn block_ints(self, q: &[u8]) -> [i8; QK] {
        let mut out = [0i8; QK];
        match self {
            QuantFormat::Q8_0 => {
                for (o, b) in out.iter_mut().zip(q) {
                    *o = *b as i8;
                }
            }
            QuantFormat::Q4_0 => {
                for j in 0..QK / 2 {
                    out[j] = (q[j] & 0x0f) as i8 - 8;
                    out[j + QK / 2] = (q[j] >> 4) as i8 - 8;
                }
            }
        }
        out
    }

    /// Dequantizes one block.
    pub fn dequantize_block(self, d: f16, q: &[u8]) -> [f32; QK] {
        let d = d.to_f32();
        self.block_ints(q).map(|v| v as f32 * d)
    }
}

/// A `[n, k]` weight in q8_0/q4_0 groups (see the module doc). Cheap to clone (shared).
#[derive(Clone)]
pub struct QuantWeights {
    bytes: Arc<HugeBuf<u8>>,
    format: QuantFormat,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for QuantWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantWeights<{}>[{}, {}]",
            self.format.name(),
            self.n,
            self.k
        )
    }
}

impl QuantWeights {
    /// Quantizes and packs a row-major `[n, k]` f32 weight.
    pub fn quantize(w: &[f32], n: usize, k: usize, format: QuantFormat) -> Self {
        assert_eq!(w.len(), n * k, "w must be [n, k]");
        let mut out = Self::zeroed(n, k, format);
        let kb = out.blocks_per_row();
        let bb = format.block_bytes();
        let mut q = vec![0u8; bb];
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            for b in 0..kb {
                let mut x = [0f32; QK];
                let part = &row[b * QK..((b + 1) * QK).min(k)];
                x[..part.len()].copy_from_slice(part);
                let d = format.quantize_block(&x, &mut q);
                out.set_block(j, b, d, &q);
            }
        }
        out
    }

    /// From blocks as GGUF stores them: row-major `[n][k / 32]` blocks of `f16 d` followed by
    /// the block's bytes. `k` must be a multiple of 32 (GGUF requires it).
    pub fn from_gguf_blocks(raw: &[u8], n: usize, k: usize, format: QuantFormat) -> Self {
        assert!(k.is_multiple_of(QK), "GGUF quantized rows are whole blocks");
        let kb = k / QK;
        let gb = format.gguf_block_bytes();
        assert_eq!(raw.len(), n * kb * gb, "raw must be [n][k/32] blocks");
        let mut out = Self::zeroed(n, k, format);
        for j in 0..n {
            for b in 0..kb {
                let blk = &raw[(j * kb + b) * gb..(j * kb + b + 1) * gb];
                let d = f16::from_le_bytes([blk[0], blk[1]]);
                out.set_block(j, b, d, &blk[2..]);
            }
        }
        out
    }

    fn zeroed(n: usize, k: usize, format: QuantFormat) -> Self {
        let groups = n.div_ceil(G);
        let kb = k.div_ceil(QK);
        Self {
            bytes: Arc::new(HugeBuf::zeroed(groups * kb * format.record_bytes())),
            format,
            n,
            k,
        }
    }

    fn blocks_per_row(&self) -> usize {
        self.k.div_ceil(QK)
    }

    fn record_offset(&self, group: usize, b: usize) -> usize {
        (group * self.blocks_per_row() + b) * self.format.record_bytes()
    }

    fn set_block(&mut self, j: usize, b: usize, d: f16, q: &[u8]) {
        let (g, c) = (j / G, j % G);
        let at = self.record_offset(g, b);
        let bb = self.format.block_bytes();
        let buf = Arc::get_mut(&mut self.bytes).expect("packing owns its buffer");
        buf[at + 2 * c..at + 2 * c + 2].copy_from_slice(&d.to_le_bytes());
        let q_at = at + 2 * G + c * bb;
        buf[q_at..q_at + bb].copy_from_slice(&q[..bb]);
    }

    /// Block `b` of output row `j`: its scale and bytes.
    fn block(&self, j: usize, b: usize) -> (f16, &[u8]) {
        let (g, c) = (j / G, j % G);
        let at = self.record_offset(g, b);
        let bb = self.format.block_bytes();
        let d = f16::from_le_bytes([self.bytes[at + 2 * c], self.bytes[at + 2 * c + 1]]);
        let q_at = at + 2 * G + c * bb;
        (d, &self.bytes[q_at..q_at + bb])
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (the padded records).
    pub fn resident_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Output row `j`, dequantized, into `out` (`k` values).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        for b in 0..self.blocks_per_row() {
            let (d, q) = self.block(j, b);
            let v = self.format.dequantize_block(d, q);
            let end = ((b + 1) * QK).min(self.k);
            out[b * QK..end].copy_from_slice(&v[..end - b * QK]);
        }
    }

    pub fn shares(&self, other: &QuantWeights) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes)
    }

    /// The row-major `[n, k]` weight, dequantized.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for j in 0..n {
            for b in 0..self.blocks_per_row() {
                let (d, q) = self.block(j, b);
                let v = self.format.dequantize_block(d, q);
                let end = ((b + 1) * QK).min(k);
                w[j * k + b * QK..j * k + end].copy_from_slice(&v[..end - b * QK]);
            }
        }
        w
    }

    /// The weights of `parts` stacked along `n`; all must have the same `k` and format. Blocks
    /// are moved as they are (no requantization).
    pub fn concat(parts: &[&QuantWeights]) -> Self {
        let first = parts.first().expect("at least one part");
        let (k, format) = (first.k, first.format);
        assert!(
            parts.iter().all(|p| p.k == k && p.format == format),
            "stacked weights need one k and one format"
        );
        let n = parts.iter().map(|p| p.n).sum();
        let mut out = Self::zeroed(n, k, format);
        let mut j0 = 0;
        for p in parts {
            for j in 0..p.n {
                for b in 0..p.blocks_per_row() {
                    let (d, q) = p.block(j, b);
                    let q = q.to_vec();
                    out.set_block(j0 + j, b, d, &q);
                }
            }
            j0 += p.n;
        }
        out
    }

    /// `out[t, j] = sum_i x[t, i] * w[j, i]` for the columns `cols` (`cols.start` a multiple
    /// of 8; `PackedWeights::matmul_cols` checks its arguments and calls this). Runs on the
    /// current rayon pool.
    pub(crate) fn matmul_cols(
        &self,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        debug_assert!(cols.start.is_multiple_of(G) && cols.end <= self.n);
        let xq = QuantRows::new(x, rows, self.k);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let col_end = cols.end;
        let groups = cols.start / G..cols.end.div_ceil(G);
        crate::packed::for_each_tile(rows, MCQ, groups, 2, |rows, groups| {
            // SAFETY: tasks write disjoint (row block, group range) tiles of `out`.
            unsafe { self.tile(&xq, rows, groups, col_end, out_ptr) };
        });
    }

    /// Rows `rows` x groups `groups` of the product (columns below `col_end`).
    ///
    /// # Safety
    /// No CPU feature is needed: the level is [`crate::simd()`]'s, which the CPU supports. `out`
    /// must point to this product's row-major output (`rows x n`), valid for writing every element
    /// of the tile, and no other thread may write those elements meanwhile (each task owns its
    /// tile).
    unsafe fn tile(
        &self,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: SyncPtr,
    ) {
        unsafe {
            #[cfg(target_arch = "x86_64")]
            {
                use crate::simd::Simd;
                let simd = crate::simd::simd();
                if simd >= Simd::Avx512 && avx512::has_vnni() {
                    return avx512::tile(self, xq, rows, groups, col_end, out.0);
                }
                if simd >= Simd::Avx2 {
                    if avx::has_vnni() {
                        return avx::tile_vnni(self, xq, rows, groups, col_end, out.0);
                    }
                    return avx::tile(self, xq, rows, groups, col_end, out.0);
                }
            }
            self.tile_scalar(xq, rows, groups, col_end, out)
        }
    }

    /// `tile` without SIMD: the oracle of the AVX2 path, and the path of CPUs without it.
    ///
    /// # Safety
    /// No CPU feature is needed. `out` must point to this product's row-major output (`rows x n`),
    /// valid for writing every element of the tile, and no other thread may write those elements
    /// meanwhile (each task owns its tile).
    unsafe fn tile_scalar(
        &self,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: SyncPtr,
    ) {
        unsafe {
            let kb = self.blocks_per_row();
            for j in groups.start * G..(groups.end * G).min(col_end) {
                for t in rows.clone() {
                    let mut acc = 0f32;
                    for b in 0..kb {
                        let (d, q) = self.block(j, b);
                        let w = self.format.block_ints(q);
                        let xb = xq.block(t, b);
                        let dot: i32 = w.iter().zip(xb).map(|(a, b)| *a as i32 * *b as i32).sum();
                        acc += dot as f32 * (d.to_f32() * xq.scale(t, b));
                    }
                    *out.0.add(t * self.n + j) = acc;
                }
            }
        }
    }
}

/// Input rows quantized to q8_0 blocks with f32 scales: `q` `[rows][kb * 32]`, `d`
/// `[rows][kb]`.
pub struct QuantRows {
    q: Vec<i8>,
    d: Vec<f32>,
    kb: usize,
}

impl QuantRows {
    pub fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let kb = k.div_ceil(QK);
        let mut q = vec![0i8; rows * kb * QK];
        let mut d = vec![0f32; rows * kb];
        for t in 0..rows {
            let row = &x[t * k..(t + 1) * k];
            for b in 0..kb {
                let part = &row[b * QK..((b + 1) * QK).min(k)];
                let amax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = amax / 127.0;
                let id = if s != 0.0 { 1.0 / s } else { 0.0 };
                let dst = &mut q[(t * kb + b) * QK..(t * kb + b) * QK + part.len()];
                for (o, v) in dst.iter_mut().zip(part) {
                    *o = (v * id).round() as i8;
                }
                d[t * kb + b] = s;
            }
        }
        Self { q, d, kb }
    }

    fn block(&self, t: usize, b: usize) -> &[i8] {
        let at = (t * self.kb + b) * QK;
        &self.q[at..at + QK]
    }

    fn scale(&self, t: usize, b: usize) -> f32 {
        self.d[t * self.kb + b]
    }
}

use crate::SyncPtr;

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{QuantFormat, QuantRows, QuantWeights, G, QK};
    use std::arch::x86_64::*;

    /// The 32 signed weights of a block at `p` (`Q4`: q4_0 nibbles, else q8_0 bytes).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma,f16c`. `p` must be valid for reading every element the description above says is
    /// read through it.
    #[inline(always)]
    unsafe fn load_block<const Q4: bool>(p: *const u8) -> __m256i {
        unsafe {
            if Q4 {
                let b = _mm_loadu_si128(p as *const __m128i);
                let m = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(b, m);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
                _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
            } else {
                _mm256_loadu_si256(p as *const __m256i)
            }
        }
    }

    /// Eight i32 partial sums of the 32 products `w * x` (both signed bytes, |w| <= 127), as
    /// f32: `|w| * (x with w's sign)` as unsigned x signed bytes, by `vpdpbusd` where the CPU
    /// has AVX-VNNI (`VNNI`), else `maddubs` then `madd` (no pair of products exceeds i16:
    /// 2 * 127 * 127 < 32767).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma,f16c`.
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(aw: __m256i, w: __m256i, x: __m256i) -> __m256 {
        unsafe {
            let sx = _mm256_sign_epi8(x, w);
            if VNNI {
                _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx))
            } else {
                let p16 = _mm256_maddubs_epi16(aw, sx);
                _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma,f16c`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// `R` rows x `C` columns (columns `c0..c0 + C` of group `g`) over every block: `R * C`
    /// accumulators (kept at most 8 so they stay in registers), each block's weights loaded
    /// once for the `R` rows and each row's block once for the `C` columns.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    // Row and column indices address several register arrays at once.
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma,f16c`. `out` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[allow(clippy::needless_range_loop)]
    unsafe fn micro<const Q4: bool, const VNNI: bool, const R: usize, const C: usize>(
        w: &QuantWeights,
        xq: &QuantRows,
        row: usize,
        g: usize,
        c0: usize,
        cols: usize,
        out: *mut f32,
    ) {
        unsafe {
            let bb = w.format.block_bytes();
            let kb = w.blocks_per_row();
            let rb = w.format.record_bytes();
            let base = w.bytes.as_ptr().add(w.record_offset(g, 0));
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            // Plain loops, not closures: a closure does not take this function's target features.
            let (mut xp, mut xd) = ([std::ptr::null::<i8>(); R], [std::ptr::null::<f32>(); R]);
            for r in 0..R {
                xp[r] = xq.q.as_ptr().add((row + r) * xq.kb * QK);
                xd[r] = xq.d.as_ptr().add((row + r) * xq.kb);
            }
            for b in 0..kb {
                let rec = base.add(b * rb);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec as *const __m128i));
                let mut xv = [_mm256_setzero_si256(); R];
                let mut xs = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    xv[r] = _mm256_loadu_si256(xp[r].add(b * QK) as *const __m256i);
                    xs[r] = _mm256_broadcast_ss(&*xd[r].add(b));
                }
                // Every lane of `dw` scaled by each row's scale: lane c0 + c is column c's.
                let mut sc = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    sc[r] = _mm256_mul_ps(dw, xs[r]);
                }
                for c in 0..C {
                    let wv = load_block::<Q4>(rec.add(2 * G + (c0 + c) * bb));
                    let aw = _mm256_sign_epi8(wv, wv);
                    let idx = _mm256_set1_epi32((c0 + c) as i32);
                    for r in 0..R {
                        let s = _mm256_permutevar8x32_ps(sc[r], idx);
                        acc[r][c] = _mm256_fmadd_ps(dot::<VNNI>(aw, wv, xv[r]), s, acc[r][c]);
                    }
                }
            }
            let valid = C.min(cols.saturating_sub(c0));
            for (r, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate().take(valid) {
                    *out.add((row + r) * w.n + g * G + c0 + c) = hsum(*a);
                }
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma,f16c`. `out` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    unsafe fn tile_of<const Q4: bool, const VNNI: bool>(
        w: &QuantWeights,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: *mut f32,
    ) {
        unsafe {
            for g in groups {
                // Valid columns of this group (the last one may be partial).
                let cols = (col_end - g * G).min(G);
                let mut t = rows.start;
                while t + 2 <= rows.end {
                    micro::<Q4, VNNI, 2, 4>(w, xq, t, g, 0, cols, out);
                    micro::<Q4, VNNI, 2, 4>(w, xq, t, g, 4, cols, out);
                    t += 2;
                }
                if t < rows.end {
                    micro::<Q4, VNNI, 1, 8>(w, xq, t, g, 0, cols, out);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx2,fma,f16c`; callers check [`crate::simd()`] (and the optional
    /// extensions this module asks for) first. `out` must be valid for writing every element the
    /// description above says is written through it, and no other thread may access them meanwhile.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile(
        w: &QuantWeights,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: *mut f32,
    ) {
        unsafe {
            match w.format {
                QuantFormat::Q8_0 => tile_of::<false, false>(w, xq, rows, groups, col_end, out),
                QuantFormat::Q4_0 => tile_of::<true, false>(w, xq, rows, groups, col_end, out),
            }
        }
    }

    /// [`tile`] with AVX-VNNI's `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU must support `avx2,fma,f16c,avxvnni`; callers check [`crate::simd()`] (and the
    /// optional extensions this module asks for) first. `out` must be valid for writing every
    /// element the description above says is written through it, and no other thread may access
    /// them meanwhile.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn tile_vnni(
        w: &QuantWeights,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: *mut f32,
    ) {
        unsafe {
            match w.format {
                QuantFormat::Q8_0 => tile_of::<false, true>(w, xq, rows, groups, col_end, out),
                QuantFormat::Q4_0 => tile_of::<true, true>(w, xq, rows, groups, col_end, out),
            }
        }
    }

    pub fn has_vnni() -> bool {
        std::is_x86_feature_detected!("avxvnni")
    }
}

/// AVX-512 with 512-bit VNNI: one `vpdpbusd` takes the blocks of two columns (64 bytes)
/// against the row's block, twice AVX2's work per instruction. `vpdpbusd` multiplies
/// unsigned by signed bytes; instead of moving signs per row (AVX2's `sign` trick), one side
/// is offset to unsigned and the offset's contribution, computed once and shared, starts the
/// accumulation:
/// - q8_0: the inputs as `x + 128` (unsigned), and `-128 * sum(w)` per lane computed once per
///   column pair and block, shared by every row;
/// - q4_0: the nibbles as they are (0..=15, unsigned), and `-8 * sum(x)` per lane computed
///   once per row and block, shared by every column.
///
/// The integer dot products are exact, so the results equal the scalar path's up to the
/// order of the f32 sums.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QuantFormat, QuantRows, QuantWeights, G, QK};
    use std::arch::x86_64::*;

    /// Column pairs per group.
    const PAIRS: usize = G / 2;

    /// The weights of columns `2p, 2p + 1` of a record (`p` the block of column `2p`).
    /// q8_0: `[col 2p: 32 | col 2p+1: 32]` bytes. q4_0: the low nibbles of both columns, then
    /// the high ones: `[lo 2p | lo 2p+1 | hi 2p | hi 2p+1]`, 16 each (weights 0-15, then
    /// 16-31 of each column).
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `p` must be valid for reading every element the
    /// description above says is read through it.
    #[inline(always)]
    unsafe fn load_pair<const Q4: bool>(p: *const u8) -> __m512i {
        unsafe {
            if Q4 {
                let v = _mm256_loadu_si256(p as *const __m256i);
                let m = _mm256_set1_epi8(0x0f);
                let lo = _mm256_and_si256(v, m);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            } else {
                _mm512_loadu_si512(p as *const _)
            }
        }
    }

    /// A row's block of 32 inputs laid out against [`load_pair`]'s bytes: q8_0 `[x | x]` as
    /// unsigned `x + 128`; q4_0 `[x0-15 | x0-15 | x16-31 | x16-31]`, signed.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `p` must be valid for reading every element the
    /// description above says is read through it.
    #[inline(always)]
    unsafe fn load_x<const Q4: bool>(p: *const i8) -> __m512i {
        unsafe {
            let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i));
            if Q4 {
                _mm512_shuffle_i64x2::<0b01_01_00_00>(b, b)
            } else {
                _mm512_xor_si512(b, _mm512_set1_epi8(-128))
            }
        }
    }

    /// The 32-bit lanes that hold column `2p`'s partial sums (the others hold `2p + 1`'s).
    const fn first_lanes<const Q4: bool>() -> __mmask16 {
        if Q4 {
            0x0F0F
        } else {
            0x00FF
        }
    }

    /// `R` rows x the whole group `g`: `R * 4` accumulators of 16 lanes.
    #[inline(always)]
    // Row and pair indices address several register arrays at once.
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[allow(clippy::needless_range_loop)]
    unsafe fn micro<const Q4: bool, const R: usize>(
        w: &QuantWeights,
        xq: &QuantRows,
        row: usize,
        g: usize,
        cols: usize,
        out: *mut f32,
    ) {
        unsafe {
            let bb = w.format.block_bytes();
            let kb = w.blocks_per_row();
            let rb = w.format.record_bytes();
            let base = w.bytes.as_ptr().add(w.record_offset(g, 0));
            let first = first_lanes::<Q4>();
            // Which scale each lane of pair p takes.
            let mut idx = [_mm512_setzero_si512(); PAIRS];
            for (p, idx) in idx.iter_mut().enumerate() {
                let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
                *idx = _mm512_mask_blend_epi32(first, _mm512_set1_epi32(b), _mm512_set1_epi32(a));
            }
            let mut acc = [[_mm512_setzero_ps(); PAIRS]; R];
            let (mut xp, mut xd) = ([std::ptr::null::<i8>(); R], [std::ptr::null::<f32>(); R]);
            for r in 0..R {
                xp[r] = xq.q.as_ptr().add((row + r) * xq.kb * QK);
                xd[r] = xq.d.as_ptr().add((row + r) * xq.kb);
            }
            let offset = _mm512_set1_epi8(if Q4 { 8 } else { -128 });
            for b in 0..kb {
                let rec = base.add(b * rb);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec as *const __m128i));
                let mut xv = [_mm512_setzero_si512(); R];
                let mut sc = [_mm512_setzero_ps(); R];
                // q4_0: -8 * sum(x) per lane, the start of every column's sum for the row.
                let mut xstart = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    xv[r] = load_x::<Q4>(xp[r].add(b * QK));
                    sc[r] = _mm512_castps256_ps512(_mm256_mul_ps(
                        dw,
                        _mm256_broadcast_ss(&*xd[r].add(b)),
                    ));
                    if Q4 {
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, xv[r]);
                        xstart[r] = _mm512_sub_epi32(_mm512_setzero_si512(), s);
                    }
                }
                for p in 0..PAIRS {
                    let wv = load_pair::<Q4>(rec.add(2 * G + 2 * p * bb));
                    // q8_0: -128 * sum(w) per lane, the start of every row's sum for the pair.
                    let wstart = if Q4 {
                        _mm512_setzero_si512()
                    } else {
                        let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, wv);
                        _mm512_sub_epi32(_mm512_setzero_si512(), s)
                    };
                    for r in 0..R {
                        let d = if Q4 {
                            _mm512_dpbusd_epi32(xstart[r], wv, xv[r])
                        } else {
                            _mm512_dpbusd_epi32(wstart, xv[r], wv)
                        };
                        let s = _mm512_permutexvar_ps(idx[p], sc[r]);
                        acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][p]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (p, a) in acc.iter().enumerate() {
                    for (h, mask) in [first, !first].into_iter().enumerate() {
                        let c = 2 * p + h;
                        if c < cols {
                            *out.add((row + r) * w.n + g * G + c) =
                                _mm512_mask_reduce_add_ps(mask, *a);
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`. `out` must be valid for writing every element
    /// the description above says is written through it, and no other thread may access them
    /// meanwhile.
    #[inline(always)]
    unsafe fn tile_of<const Q4: bool>(
        w: &QuantWeights,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: *mut f32,
    ) {
        unsafe {
            for g in groups {
                let cols = (col_end - g * G).min(G);
                let mut t = rows.start;
                while t + 4 <= rows.end {
                    micro::<Q4, 4>(w, xq, t, g, cols, out);
                    t += 4;
                }
                match rows.end - t {
                    3 => micro::<Q4, 3>(w, xq, t, g, cols, out),
                    2 => micro::<Q4, 2>(w, xq, t, g, cols, out),
                    1 => micro::<Q4, 1>(w, xq, t, g, cols, out),
                    _ => {}
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx512f,avx512bw,avx512vnni,avx2,fma,f16c`; callers check
    /// [`crate::simd()`] (and the optional extensions this module asks for) first. `out` must be
    /// valid for writing every element the description above says is written through it, and no
    /// other thread may access them meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile(
        w: &QuantWeights,
        xq: &QuantRows,
        rows: std::ops::Range<usize>,
        groups: std::ops::Range<usize>,
        col_end: usize,
        out: *mut f32,
    ) {
        unsafe {
            match w.format {
                QuantFormat::Q8_0 => tile_of::<false>(w, xq, rows, groups, col_end, out),
                QuantFormat::Q4_0 => tile_of::<true>(w, xq, rows, groups, col_end, out),
            }
        }
    }

    /// The CPU has the 512-bit VNNI this module needs (on top of [`crate::simd::Simd::Avx512`]).
    pub fn has_vnni() -> bool {
        std::is_x86_feature_detected!("avx512vnni")
    }
}

/// The 16 values of an MXFP4 (OCP microscaling) element: FP4 e2m1, sign in bit 3.
pub const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// MXFP4 to f32 (GPT-OSS's expert weights): `rows` rows of `cols` values stored as
/// `blocks` `[rows, cols / 32, 16]` bytes, two e2m1 values per byte (the even column in the
/// low nibble), and `scales` `[rows, cols / 32]`, one e8m0 exponent (bias 127) per 32 values:
/// `value = FP4_E2M1[nibble] * 2^(scale - 127)`. Returns `[rows, cols]` row-major.
pub fn dequantize_mxfp4(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let groups = cols / 32;
    assert_eq!(cols % 32, 0, "MXFP4 rows are whole blocks of 32");
    assert_eq!(blocks.len(), rows * groups * 16, "MXFP4 blocks");
    assert_eq!(scales.len(), rows * groups, "MXFP4 scales");
    let mut out = Vec::with_capacity(rows * cols);
    for (block, &e) in blocks.chunks_exact(16).zip(scales) {
        // 2^(e - 127) exactly (f64 holds every power of two an e8m0 scale names).
        let scale = 2f64.powi(e as i32 - 127);
        for &b in block {
            out.push((FP4_E2M1[(b & 0x0f) as usize] as f64 * scale) as f32);
            out.push((FP4_E2M1[(b >> 4) as usize] as f64 * scale) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_known_block() {
        // One row of 64 values = two blocks. Block 0, scale 2^(128 - 127) = 2: byte k holds
        // nibble k % 16 low (the even column) and 15 - k % 16 high (the odd column).
        // Block 1, scale 2^(125 - 127) = 1/4: every byte 0x7f (low 0xf = -6, high 0x7 = 6).
        let mut blocks: Vec<u8> = (0..16u8).map(|k| k | ((15 - k) << 4)).collect();
        blocks.extend([0x7fu8; 16]);
        let scales = [128u8, 125];
        let out = dequantize_mxfp4(&blocks, &scales, 1, 64);
        let lut = [
            0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
            -6.0,
        ];
        for k in 0..16 {
            assert_eq!(out[2 * k], lut[k] * 2.0, "column {}", 2 * k);
            assert_eq!(out[2 * k + 1], lut[15 - k] * 2.0, "column {}", 2 * k + 1);
        }
        for k in 0..16 {
            assert_eq!(out[32 + 2 * k], -1.5);
            assert_eq!(out[32 + 2 * k + 1], 1.5);
        }
        // Extreme exponents stay exact: 2^-127 (subnormal in f32) and 2^127.
        let out = dequantize_mxfp4(&[0x02u8; 16], &[0], 1, 32);
        assert_eq!(out[0], 2f32.powi(-127));
        assert_eq!(out[1], 0.0);
        let out = dequantize_mxfp4(&[0x0eu8; 16], &[254], 1, 32);
        assert_eq!(out[0], -4.0 * 2f32.powi(127));
        // Two rows: the second row's blocks and scale follow the first's.
        let out = dequantize_mxfp4(&[[0x22u8; 16], [0x44u8; 16]].concat(), &[127, 126], 2, 32);
        assert!(out[..32].iter().all(|x| *x == 1.0));
        assert!(out[32..].iter().all(|x| *x == 1.0));
    }
    use crate::packed::tests::rnd_vec;

    #[test]
    fn q8_0_block_of_known_values() {
        // max |w| = 12.7 -> d = 0.1; w = i * 0.1 for i in -16..16 -> q = i, exactly.
        let x: [f32; QK] = std::array::from_fn(|i| (i as f32 - 16.0) * 0.1);
        let mut xs = x;
        xs[31] = 12.7;
        let mut q = [0u8; QK];
        let d = QuantFormat::Q8_0.quantize_block(&xs, &mut q);
        assert_eq!(d, f16::from_f32(0.1));
        let ints = QuantFormat::Q8_0.block_ints(&q);
        for (i, q) in ints.iter().enumerate().take(31) {
            assert_eq!(*q as i32, i as i32 - 16, "{i}");
        }
        assert_eq!(ints[31], 127);
        let back = QuantFormat::Q8_0.dequantize_block(d, &q);
        for (a, b) in back.iter().zip(&xs) {
            assert!((a - b).abs() <= d.to_f32() * 0.5 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_0_block_of_known_values() {
        // The largest-magnitude weight is -8: d = -8 / -8 = 1, nibbles = w + 8.
        let x: [f32; QK] = std::array::from_fn(|i| (i % 16) as f32 - 8.0);
        let mut q = [0u8; QK / 2];
        let d = QuantFormat::Q4_0.quantize_block(&x, &mut q);
        assert_eq!(d.to_f32(), 1.0);
        // Byte j holds weight j (low) and weight j + 16 (high): both (j % 16).
        for (j, b) in q.iter().enumerate() {
            assert_eq!(*b, (j as u8) | ((j as u8) << 4), "{j}");
        }
        assert_eq!(QuantFormat::Q4_0.dequantize_block(d, &q), x);
    }

    #[test]
    fn quantize_dequantize_error_is_half_a_step() {
        let mut seed = 5;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &(n, k) in &[(1, 1), (9, 33), (16, 64), (17, 100)] {
                let w = rnd_vec(&mut seed, n * k);
                let p = QuantWeights::quantize(&w, n, k, format);
                let back = p.dequantize();
                for j in 0..n {
                    for b in 0..k.div_ceil(QK) {
                        let (d, _) = p.block(j, b);
                        let step = d.to_f32().abs();
                        for i in b * QK..((b + 1) * QK).min(k) {
                            let (a, e) = (back[j * k + i], w[j * k + i]);
                            // Half a step, plus the f16 rounding of d over up to 127 steps;
                            // q4_0's range is -8..=7 steps with the largest weight at -8, so
                            // weights of the other sign beyond 7.5 steps clamp to 7 (up to
                            // one step off).
                            let half = if format == QuantFormat::Q4_0 && e.abs() > 7.5 * step {
                                e.abs() - 7.0 * step
                            } else {
                                step * 0.5
                            };
                            assert!(
                                (a - e).abs() <= half + step * 127.0 * 1e-3,
                                "{format:?} {n}x{k} [{j},{i}]: {a} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gguf_blocks_round_trip() {
        let mut seed = 9;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let (n, k) = (11, 64);
            let w = rnd_vec(&mut seed, n * k);
            let p = QuantWeights::quantize(&w, n, k, format);
            let mut raw = Vec::new();
            for j in 0..n {
                for b in 0..k / QK {
                    let (d, q) = p.block(j, b);
                    raw.extend_from_slice(&d.to_le_bytes());
                    raw.extend_from_slice(q);
                }
            }
            let r = QuantWeights::from_gguf_blocks(&raw, n, k, format);
            assert_eq!(r.dequantize(), p.dequantize());
        }
    }

    /// Checks `out` against the dequantized weights' product in f64, within the activation
    /// rounding bound of the module doc.
    fn check(p: &QuantWeights, x: &[f32], rows: usize, out: &[f32], what: &str) {
        let (n, k) = (p.n(), p.k());
        let w = p.dequantize();
        let xq = QuantRows::new(x, rows, k);
        for t in 0..rows {
            for j in 0..n {
                let (mut exact, mut bound) = (0f64, 0f64);
                for i in 0..k {
                    exact += x[t * k + i] as f64 * w[j * k + i] as f64;
                }
                for b in 0..k.div_ceil(QK) {
                    let sum_w: f64 = (b * QK..((b + 1) * QK).min(k))
                        .map(|i| (w[j * k + i] as f64).abs())
                        .sum();
                    bound += xq.scale(t, b) as f64 * 0.5 * sum_w;
                }
                let got = out[t * n + j] as f64;
                let tol = bound * 1.001 + 1e-5 * (1.0 + exact.abs());
                assert!(
                    (got - exact).abs() <= tol,
                    "{what}: [{t},{j}] {got} vs {exact} (bound {tol})"
                );
            }
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        let mut seed = 1u64;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &rows in &[1, 2, 7, 16, 33, 128] {
                for &(k, n) in &[(32, 8), (37, 9), (64, 70), (300, 33), (1024, 24)] {
                    let x = rnd_vec(&mut seed, rows * k);
                    let w = rnd_vec(&mut seed, n * k);
                    let p = QuantWeights::quantize(&w, n, k, format);
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
    fn simd_path_matches_scalar_path() {
        let mut seed = 3u64;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &(rows, k, n) in &[
                (1, 96, 19),
                (3, 64, 16),
                (6, 33, 8),
                (7, 64, 24),
                (9, 256, 40),
                (13, 1024, 13),
            ] {
                let x = rnd_vec(&mut seed, rows * k);
                let w = rnd_vec(&mut seed, n * k);
                let p = QuantWeights::quantize(&w, n, k, format);
                let xq = QuantRows::new(&x, rows, k);
                let groups = 0..n.div_ceil(G);
                let mut b = vec![f32::NAN; rows * n];
                // SAFETY: one tile covering the whole output.
                unsafe { p.tile_scalar(&xq, 0..rows, groups.clone(), n, SyncPtr(b.as_mut_ptr())) };
                // Every SIMD path this CPU has: the dispatching one, and the others directly.
                let mut paths: Vec<(&str, Vec<f32>)> = vec![("dispatch", vec![f32::NAN; rows * n])];
                // SAFETY: as above.
                unsafe {
                    p.tile(
                        &xq,
                        0..rows,
                        groups.clone(),
                        n,
                        SyncPtr(paths[0].1.as_mut_ptr()),
                    )
                };
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    let mut o = vec![f32::NAN; rows * n];
                    // SAFETY: the CPU has AVX2/FMA/F16C (checked); one tile, whole output.
                    unsafe { avx::tile(&p, &xq, 0..rows, groups.clone(), n, o.as_mut_ptr()) };
                    paths.push(("avx2", o));
                    if avx::has_vnni() {
                        let mut o = vec![f32::NAN; rows * n];
                        // SAFETY: as above, and the CPU has AVX-VNNI.
                        unsafe {
                            avx::tile_vnni(&p, &xq, 0..rows, groups.clone(), n, o.as_mut_ptr())
                        };
                        paths.push(("avx-vnni", o));
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::detected_simd() >= crate::simd::Simd::Avx512 && avx512::has_vnni() {
                    let mut o = vec![f32::NAN; rows * n];
                    // SAFETY: the CPU has AVX-512 F/BW/VL and VNNI (checked); one tile.
                    unsafe { avx512::tile(&p, &xq, 0..rows, groups.clone(), n, o.as_mut_ptr()) };
                    paths.push(("avx512-vnni", o));
                }
                eprintln!(
                    "{format:?} {rows}x{k}x{n}: {:?}",
                    paths.iter().map(|p| p.0).collect::<Vec<_>>()
                );
                for (path, a) in &paths {
                    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
                        // Same integer dots and scales; only the f32 sums' order differs.
                        assert!(
                            (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                            "{path} {format:?} {rows}x{k}x{n} [{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn column_ranges_write_only_their_columns() {
        let mut seed = 4u64;
        let (rows, k, n) = (3, 64, 16 * 3 + 5);
        let x = rnd_vec(&mut seed, rows * k);
        let w = rnd_vec(&mut seed, n * k);
        let p = QuantWeights::quantize(&w, n, k, QuantFormat::Q8_0);
        let mut full = vec![0f32; rows * n];
        p.matmul_cols(&x, rows, 0..n, &mut full);
        for cols in [0..16, 16..48, 48..n] {
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
    fn concat_moves_blocks() {
        let mut seed = 8u64;
        let k = 40;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let ws: Vec<Vec<f32>> = [5usize, 16, 3]
                .iter()
                .map(|&n| rnd_vec(&mut seed, n * k))
                .collect();
            let parts: Vec<QuantWeights> = ws
                .iter()
                .map(|w| QuantWeights::quantize(w, w.len() / k, k, format))
                .collect();
            let refs: Vec<&QuantWeights> = parts.iter().collect();
            let c = QuantWeights::concat(&refs);
            let want: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            assert_eq!((c.n(), c.k()), (24, k));
            assert_eq!(c.dequantize(), want);
        }
    }
}
