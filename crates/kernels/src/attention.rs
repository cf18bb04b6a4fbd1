//! The paged attention kernel: causal grouped-query attention of a batch's query rows over
//! keys and values read in place from a paged cache through each sequence's block table
//! (token at position `p` in block `block_table[p / bs]`, offset `p % bs`), with GPT-OSS's
//! sliding window and sinks. The cache itself, and the batch layout it is indexed with, are
//! the model's (`tandem-model`'s `kv.rs`); this module sees them as slices.

use crate::simd::Simd;
use rayon::prelude::*;

/// Head counts of a paged attention call: `heads` query heads share `kv_heads` key/value
/// heads (grouped-query attention), `head_dim` values each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What [`paged_attention`] adds to plain causal attention (GPT-OSS); the default is
/// neither.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttnExtras<'a> {
    /// Sliding window: a row at position `p` sees the positions `p + 1 - window ..= p` only.
    /// The cache keeps every position (the block tables still cover the whole sequence): keys
    /// older than the window are masked here, their blocks are not freed.
    pub window: Option<usize>,
    /// Attention sinks, `[heads]`: head `h`'s softmax has `exp(sinks[h])` added to its
    /// denominator (a learned logit of a position that contributes no value).
    pub sinks: Option<&'a [f32]>,
}

/// One cache layer's keys and values, `[slots, kv_heads * head_dim]` each (slot = block *
/// block size + offset).
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// One sequence of the batch: its rows follow the previous sequence's in the queries; they
/// are the positions `start_pos..start_pos + num_tokens`, and `block_table` holds every
/// position up to the last.
#[derive(Clone, Copy, Debug)]
pub struct PagedSeq<'a> {
    pub start_pos: usize,
    pub num_tokens: usize,
    pub block_table: &'a [u32],
}

/// Shapes that do not fit together (the message names the numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnError(pub String);

impl std::fmt::Display for AttnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AttnError {}

/// Causal attention of every row of `q` (`[T, heads * head_dim]`, rows in `seqs` order) over
/// its sequence's cached positions `0..=pos`, reading the keys and values of `kv` in place
/// through the block tables (block size `bs`), with `extras`' window and sinks. Returns
/// `[T, heads * head_dim]`.
///
/// Work is split over (sequence, KV head, tile of query rows) with rayon, so it runs on the
/// calling worker's pool; the inner loops use AVX2/FMA when `simd` is [`Simd::Avx2`] or
/// above (pass [`crate::simd()`]), the scalar oracle otherwise.
///
/// # Panics
/// If `simd` is above what the CPU supports ([`crate::simd::detected_simd`]).
pub fn paged_attention(
    q: &[f32],
    seqs: &[PagedSeq],
    kv: PagedKv,
    bs: usize,
    dims: AttnDims,
    extras: AttnExtras,
    simd: Simd,
) -> Result<Vec<f32>, AttnError> {
    assert!(simd <= crate::simd::detected_simd());
    #[cfg(target_arch = "x86_64")]
    {
        if simd >= Simd::Avx2 {
            return attention_with(q, seqs, kv, bs, dims, extras, |t| {
                // SAFETY: the level, checked against the CPU above, includes AVX2 and FMA.
                unsafe { avx::task(t) }
            });
        }
    }
    attention_with(q, seqs, kv, bs, dims, extras, |t| {
        // SAFETY: Scalar needs no CPU feature.
        unsafe { task_impl::<Scalar>(t) }
    })
}

/// Query rows of one sequence that one parallel task attends together: every row in the tile
/// reads each key and value row once for all the query heads of its KV group.
const ROW_TILE: usize = 8;

/// One parallel task: query rows `j0..j1` of sequence `seq`, KV heads `g..g1`.
#[derive(Clone, Copy)]
struct Task<'a> {
    q: &'a [f32],
    kv: PagedKv<'a>,
    table: &'a [u32],
    bs: usize,
    dims: AttnDims,
    /// Batch row of the sequence's first new token.
    row0: usize,
    start_pos: usize,
    j0: usize,
    j1: usize,
    /// KV heads `g..g1` (a decode row takes several: each position's row is then read
    /// contiguously; prefill tiles take one).
    g: usize,
    g1: usize,
    /// Sliding window (`usize::MAX`: none).
    window: usize,
    /// Attention sinks of every query head.
    sinks: Option<&'a [f32]>,
}

impl Task<'_> {
    /// The task's queries `[rows j0..j1, query heads of KV heads g..g1, head_dim]`, times
    /// `1 / sqrt(head_dim)`.
    fn scaled_queries(&self) -> Vec<f32> {
        let AttnDims {
            heads: hq,
            kv_heads: hk,
            head_dim: dh,
        } = self.dims;
        let width = (self.g1 - self.g) * (hq / hk) * dh;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut qs = Vec::with_capacity((self.j1 - self.j0) * width);
        for r in self.j0..self.j1 {
            let src = (self.row0 + r) * hq * dh + self.g * (hq / hk) * dh;
            qs.extend(self.q[src..src + width].iter().map(|v| v * scale));
        }
        qs
    }
}

fn attention_with(
    q: &[f32],
    seqs: &[PagedSeq],
    kv: PagedKv,
    bs: usize,
    dims: AttnDims,
    extras: AttnExtras,
    run: impl Fn(&Task) -> Vec<f32> + Sync,
) -> Result<Vec<f32>, AttnError> {
    let AttnDims {
        heads: hq,
        kv_heads: hk,
        head_dim: dh,
    } = dims;
    if hk == 0 || hq % hk != 0 || bs == 0 {
        return Err(AttnError(format!(
            "attention with {hq} heads, {hk} KV heads, block size {bs}"
        )));
    }
    if extras.window == Some(0) {
        return Err(AttnError("a sliding window of 0 positions".into()));
    }
    if let Some(s) = extras.sinks.filter(|s| s.len() != hq) {
        return Err(AttnError(format!(
            "{} attention sinks for {hq} heads",
            s.len()
        )));
    }
    let t: usize = seqs.iter().map(|s| s.num_tokens).sum();
    let (qd, kd) = (hq * dh, hk * dh);
    if q.len() != t * qd {
        return Err(AttnError(format!(
            "queries have {} values, layout says {t} rows of {qd}",
            q.len()
        )));
    }
    let slots = kv.k.len().min(kv.v.len()) / kd.max(1);
    let threads = rayon::current_num_threads().max(1);
    let mut tasks = Vec::new();
    let mut row0 = 0;
    for s in seqs {
        let len = s.start_pos + s.num_tokens;
        let blocks = len.div_ceil(bs);
        if s.block_table.len() < blocks {
            return Err(AttnError(format!(
                "position {} has no KV block (block table has {} blocks of {bs})",
                len - 1,
                s.block_table.len()
            )));
        }
        if let Some(b) = s.block_table[..blocks]
            .iter()
            .find(|b| (**b as usize + 1) * bs > slots)
        {
            return Err(AttnError(format!("KV block {b} is outside the cache")));
        }
        let tile = if s.num_tokens == 1 { 1 } else { ROW_TILE };
        // A decode row takes KV heads in as few ranges as keep every thread busy.
        let per_task = if s.num_tokens == 1 {
            hk.div_ceil((2 * threads).div_ceil(seqs.len()).min(hk))
        } else {
            1
        };
        for j0 in (0..s.num_tokens).step_by(tile) {
            for g in (0..hk).step_by(per_task) {
                tasks.push(Task {
                    q,
                    kv,
                    table: s.block_table,
                    bs,
                    dims,
                    row0,
                    start_pos: s.start_pos,
                    j0,
                    j1: (j0 + tile).min(s.num_tokens),
                    g,
                    g1: (g + per_task).min(hk),
                    window: extras.window.unwrap_or(usize::MAX),
                    sinks: extras.sinks,
                });
            }
        }
        row0 += s.num_tokens;
    }
    let parts: Vec<Vec<f32>> = if rayon::current_num_threads() > 1 {
        tasks.par_iter().map(&run).collect()
    } else {
        tasks.iter().map(&run).collect()
    };
    let group = hq / hk;
    let mut out = vec![0f32; t * qd];
    for (task, part) in tasks.iter().zip(parts) {
        let width = (task.g1 - task.g) * group * dh;
        for (r, src) in part.chunks_exact(width).enumerate() {
            let row = task.row0 + task.j0 + r;
            let dst = row * qd + task.g * group * dh;
            out[dst..dst + width].copy_from_slice(src);
        }
    }
    Ok(out)
}

/// The three inner loops of attention; `Scalar` and (on x86_64) `avx::Avx` implement them.
trait Ops {
    /// `sum a[i] * b[i]`.
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `acc[i] += x * v[i]`.
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled.
    unsafe fn axpy(acc: &mut [f32], x: f32, v: &[f32]);
    /// `s[i] = exp(s[i] - max)`; returns the sum.
    ///
    /// # Safety
    /// The CPU must support the instruction set of the implementation (none for the scalar one);
    /// implementations compiled for a set are only called from functions with it enabled.
    unsafe fn exp_sum(s: &mut [f32], max: f32) -> f32;
}

struct Scalar;

impl Ops for Scalar {
    /// # Safety
    /// None for this implementation: the scalar loops need no CPU feature (the trait's methods are
    /// `unsafe` for the SIMD ones).
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let n8 = a.len() / 8 * 8;
        for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
            for j in 0..8 {
                acc[j] += ca[j] * cb[j];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for i in n8..a.len() {
            s += a[i] * b[i];
        }
        s
    }
    /// # Safety
    /// None for this implementation: the scalar loops need no CPU feature (the trait's methods are
    /// `unsafe` for the SIMD ones).
    #[inline(always)]
    unsafe fn axpy(acc: &mut [f32], x: f32, v: &[f32]) {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += x * b;
        }
    }
    /// # Safety
    /// None for this implementation: the scalar loops need no CPU feature (the trait's methods are
    /// `unsafe` for the SIMD ones).
    #[inline(always)]
    unsafe fn exp_sum(s: &mut [f32], max: f32) -> f32 {
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }
}

/// One task: scores of every (row, head of the group) against the positions it sees, softmax,
/// then the weighted sum of values. Output `[rows, KV heads g..g1, group, head_dim]`.
///
/// # Safety
/// The CPU must support the instruction set of the `Ops`/`Kernel` implementation it is instantiated
/// with (none for the scalar one). `t` must come from `attention_with`, which checked every block
/// of the table against the cache's size.
#[inline(always)]
unsafe fn task_impl<O: Ops>(t: &Task) -> Vec<f32> {
    unsafe {
        if t.g1 == t.g + 1 {
            return group_impl::<O>(t);
        }
        // Several KV heads: only for single rows, so the parts simply follow each other.
        debug_assert_eq!(t.j1 - t.j0, 1);
        let mut out = Vec::new();
        for g in t.g..t.g1 {
            out.extend(group_impl::<O>(&Task { g, g1: g + 1, ..*t }));
        }
        out
    }
}

/// `task_impl` for one KV head.
///
/// # Safety
/// The CPU must support the instruction set of the `Ops`/`Kernel` implementation it is instantiated
/// with (none for the scalar one). `t` must come from `attention_with`, which checked every block
/// of the table against the cache's size.
#[inline(always)]
unsafe fn group_impl<O: Ops>(t: &Task) -> Vec<f32> {
    unsafe {
        let AttnDims {
            heads: hq,
            kv_heads: hk,
            head_dim: dh,
        } = t.dims;
        let group = hq / hk;
        let kd = hk * dh;
        let rows = t.j1 - t.j0;
        let nq = rows * group;
        // Position of the tile's first row; row r sees positions 0..=pos0 + r (the last `window`
        // of them with a sliding window, so no row sees a position before `plo`).
        let pos0 = t.start_pos + t.j0;
        let npos = pos0 + rows;
        let plo = (pos0 + 1).saturating_sub(t.window);
        let qs = t.scaled_queries();
        // Scores of the positions `plo..npos` (`w` per query).
        let w = npos - plo;
        let mut scores = vec![0f32; nq * w];
        let kv_row = |slot: usize| slot * kd + t.g * dh;
        let blocks = t.table[..npos.div_ceil(t.bs)].iter().enumerate();
        for (b, &blk) in blocks.clone().skip(plo / t.bs) {
            let p0 = b * t.bs;
            for p in p0.max(plo)..(p0 + t.bs).min(npos) {
                let at = kv_row(blk as usize * t.bs + p - p0);
                let k = &t.kv.k[at..at + dh];
                for i in p.saturating_sub(pos0) * group..nq {
                    scores[i * w + p - plo] = O::dot(&qs[i * dh..(i + 1) * dh], k);
                }
            }
        }
        let mut inv = vec![0f32; nq];
        for (i, inv) in inv.iter_mut().enumerate() {
            let len = pos0 + i / group + 1;
            let lo = len.saturating_sub(t.window);
            let row = &mut scores[i * w..i * w + len - plo];
            // Positions an earlier row of the tile saw but this one does not: weight 0.
            row[..lo - plo].fill(0.0);
            let sink = t.sinks.map(|s| s[t.g * group + i % group]);
            *inv = 1.0 / softmax_in_place::<O>(&mut row[lo - plo..], sink);
        }
        let mut out = vec![0f32; nq * dh];
        for (b, &blk) in blocks.skip(plo / t.bs) {
            let p0 = b * t.bs;
            for p in p0.max(plo)..(p0 + t.bs).min(npos) {
                let at = kv_row(blk as usize * t.bs + p - p0);
                let v = &t.kv.v[at..at + dh];
                for i in p.saturating_sub(pos0) * group..nq {
                    O::axpy(&mut out[i * dh..(i + 1) * dh], scores[i * w + p - plo], v);
                }
            }
        }
        for (o, s) in out.chunks_exact_mut(dh).zip(&inv) {
            o.iter_mut().for_each(|x| *x *= s);
        }
        out
    }
}

/// `s[i] = exp(s[i] - m)` with `m` the largest of the scores and the sink; returns the
/// softmax's denominator (the sink's `exp(sink - m)` included).
///
/// # Safety
/// The CPU must support the instruction set of the `Ops`/`Kernel` implementation it is instantiated
/// with (none for the scalar one).
#[inline(always)]
unsafe fn softmax_in_place<O: Ops>(s: &mut [f32], sink: Option<f32>) -> f32 {
    unsafe {
        let mut max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if let Some(k) = sink {
            max = max.max(k);
        }
        let sum = O::exp_sum(s, max);
        match sink {
            Some(k) => sum + (k - max).exp(),
            None => sum,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{softmax_in_place, task_impl, AttnDims, Ops, Task};
    use crate::simd::avx_exp;
    use std::arch::x86_64::*;

    pub struct Avx;

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_hadd_ps(s, s);
            _mm_cvtss_f32(_mm_hadd_ps(s, s))
        }
    }

    impl Ops for Avx {
        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx2,fma`.
        #[inline(always)]
        unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            unsafe {
                let n = a.len().min(b.len());
                let (pa, pb) = (a.as_ptr(), b.as_ptr());
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut i = 0;
                while i + 16 <= n {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc0,
                    );
                    acc1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i + 8)),
                        _mm256_loadu_ps(pb.add(i + 8)),
                        acc1,
                    );
                    i += 16;
                }
                if i + 8 <= n {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(i)),
                        _mm256_loadu_ps(pb.add(i)),
                        acc0,
                    );
                    i += 8;
                }
                let mut s = hsum(_mm256_add_ps(acc0, acc1));
                while i < n {
                    s += *pa.add(i) * *pb.add(i);
                    i += 1;
                }
                s
            }
        }

        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx2,fma`.
        #[inline(always)]
        unsafe fn axpy(acc: &mut [f32], x: f32, v: &[f32]) {
            unsafe {
                let n = acc.len().min(v.len());
                let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr());
                let xv = _mm256_set1_ps(x);
                let mut i = 0;
                while i + 8 <= n {
                    let a = _mm256_loadu_ps(pa.add(i));
                    _mm256_storeu_ps(
                        pa.add(i),
                        _mm256_fmadd_ps(xv, _mm256_loadu_ps(pv.add(i)), a),
                    );
                    i += 8;
                }
                while i < n {
                    *pa.add(i) += x * *pv.add(i);
                    i += 1;
                }
            }
        }

        /// # Safety
        /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU
        /// supports `avx2,fma`.
        #[inline(always)]
        unsafe fn exp_sum(s: &mut [f32], max: f32) -> f32 {
            unsafe {
                let n = s.len();
                let p = s.as_mut_ptr();
                let m = _mm256_set1_ps(max);
                let mut sum = _mm256_setzero_ps();
                let mut i = 0;
                while i + 8 <= n {
                    let e = avx_exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
                    _mm256_storeu_ps(p.add(i), e);
                    sum = _mm256_add_ps(sum, e);
                    i += 8;
                }
                let mut total = hsum(sum);
                if i < n {
                    // The tail through the same approximation, padded with exp(-inf) = 0.
                    let mut buf = [f32::NEG_INFINITY; 8];
                    buf[..n - i].copy_from_slice(&s[i..]);
                    let e = avx_exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m));
                    _mm256_storeu_ps(buf.as_mut_ptr(), e);
                    s[i..].copy_from_slice(&buf[..n - i]);
                    total += buf[..n - i].iter().sum::<f32>();
                }
                total
            }
        }
    }

    /// # Safety
    /// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional
    /// extensions this module asks for) first. `t` must come from `attention_with`, which checked
    /// every block of the table against the cache's size.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn task(t: &Task) -> Vec<f32> {
        unsafe {
            if t.dims.head_dim.is_multiple_of(8) {
                rows(t)
            } else {
                task_impl::<Avx>(t)
            }
        }
    }

    /// How many positions ahead the decode kernel prefetches keys and values.
    const AHEAD: usize = 32;

    /// Eight vectors to the vector of their eight sums.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`.
    #[inline(always)]
    unsafe fn reduce8(a: &[__m256; 8]) -> __m256 {
        unsafe {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            // [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of the low and high halves, then a4..a7.
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            _mm256_add_ps(
                _mm256_permute2f128_ps(u0, u1, 0x20),
                _mm256_permute2f128_ps(u0, u1, 0x31),
            )
        }
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `p` must be valid for reading every element the description above says is read
    /// through it.
    #[inline(always)]
    unsafe fn prefetch_row(p: *const f32, len: usize) {
        unsafe {
            let mut c = 0;
            while c < len {
                _mm_prefetch::<_MM_HINT_T0>(p.add(c) as *const i8);
                c += 16;
            }
        }
    }

    /// Query rows `j0..j1` (every query head of KV heads `g..g1`) against the cached
    /// positions each row sees, reading each position's keys and values of those heads as
    /// one contiguous run: scores eight positions at a time with the sums reduced together,
    /// keys and values prefetched `AHEAD` positions on, the weighted sum of values accumulated
    /// in registers over chunks of eight positions that stay in L1. Row `r` sees positions
    /// `0..=start + r`; later positions get weight 0. Output `[rows, heads, head_dim]`.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `t` must come from `attention_with`, which checked every block of the table
    /// against the cache's size.
    #[inline(always)]
    unsafe fn rows(t: &Task) -> Vec<f32> {
        unsafe {
            let AttnDims {
                heads: hq,
                kv_heads: hk,
                head_dim: dh,
            } = t.dims;
            let group = hq / hk;
            let kd = hk * dh;
            let heads = (t.g1 - t.g) * group; // query heads of this task
            let nrows = t.j1 - t.j0;
            let nq = nrows * heads; // queries, row-major: query i is row i / heads
            let pos0 = t.start_pos + t.j0;
            let npos = pos0 + nrows;
            // With a sliding window no row sees a position before `plo`: the chunks of eight
            // positions start at `ps`, the chunk holding it.
            let plo = (pos0 + 1).saturating_sub(t.window);
            let ps = plo / 8 * 8;
            let qs = t.scaled_queries();
            // Offset of the first key of head g of every position from `ps` on (`offs[p - ps]`;
            // block table resolved once; the caller checked that it covers npos and stays inside
            // the cache).
            let mut offs = Vec::with_capacity(npos - ps);
            for (b, &blk) in t.table[..npos.div_ceil(t.bs)]
                .iter()
                .enumerate()
                .skip(ps / t.bs)
            {
                let first = blk as usize * t.bs;
                for i in ps.max(b * t.bs) - b * t.bs..t.bs.min(npos - b * t.bs) {
                    offs.push((first + i) * kd + t.g * dh);
                }
            }
            let run = (t.g1 - t.g) * dh; // contiguous floats per position
            let (kb, vb) = (t.kv.k.as_ptr(), t.kv.v.as_ptr());
            // Scores per query of the positions from `ps` on (`p - ps`), padded to whole vectors.
            let npad = (npos - ps).next_multiple_of(8);
            let mut scores = vec![0f32; nq * npad];
            let mut p = ps;
            while p < npos {
                let n = (npos - p).min(8);
                let kp: [*const f32; 8] =
                    std::array::from_fn(|j| kb.add(offs[p - ps + j.min(n - 1)]));
                for &off in offs.iter().skip(p - ps + AHEAD).take(8) {
                    prefetch_row(kb.add(off), run);
                }
                // Rows that see none of these positions skip them.
                let first_row = p.saturating_sub(pos0);
                for i in first_row * heads..nq {
                    let h = i % heads;
                    // Query head h reads the keys of KV head g + h / group.
                    let ko = (h / group) * dh;
                    let qh = qs.as_ptr().add(i * dh);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    let mut c = 0;
                    while c < dh {
                        let qv = _mm256_loadu_ps(qh.add(c));
                        for j in 0..8 {
                            acc[j] =
                                _mm256_fmadd_ps(_mm256_loadu_ps(kp[j].add(ko + c)), qv, acc[j]);
                        }
                        c += 8;
                    }
                    _mm256_storeu_ps(scores.as_mut_ptr().add(i * npad + p - ps), reduce8(&acc));
                }
                p += 8;
            }
            let mut inv = vec![0f32; nq];
            for (i, inv) in inv.iter_mut().enumerate() {
                let seen = pos0 + i / heads + 1;
                let lo = seen.saturating_sub(t.window);
                let row = &mut scores[i * npad..(i + 1) * npad];
                // Positions of the first chunk before this row's window: weight 0.
                row[..lo - ps].iter_mut().for_each(|v| *v = 0.0);
                let sink = t.sinks.map(|s| s[t.g * group + i % heads]);
                *inv = 1.0 / softmax_in_place::<Avx>(&mut row[lo - ps..seen - ps], sink);
                row[seen - ps..].iter_mut().for_each(|v| *v = 0.0);
            }
            let mut out = vec![0f32; nq * dh];
            let mut p = ps;
            while p < npos {
                let n = (npos - p).min(8);
                for &off in offs.iter().skip(p - ps + AHEAD).take(8) {
                    prefetch_row(vb.add(off), run);
                }
                let o = &offs[p - ps..p - ps + n];
                let first_row = p.saturating_sub(pos0);
                for i in first_row * heads..nq {
                    let s = scores.as_ptr().add(i * npad + p - ps);
                    let vo = vb.add(((i % heads) / group) * dh);
                    let mut c0 = 0;
                    while c0 < dh {
                        let dst = out.as_mut_ptr().add(i * dh + c0);
                        let v = vo.add(c0);
                        match (dh - c0).min(64) / 8 {
                            8 => pv::<8>(s, o, v, dst),
                            7 => pv::<7>(s, o, v, dst),
                            6 => pv::<6>(s, o, v, dst),
                            5 => pv::<5>(s, o, v, dst),
                            4 => pv::<4>(s, o, v, dst),
                            3 => pv::<3>(s, o, v, dst),
                            2 => pv::<2>(s, o, v, dst),
                            _ => pv::<1>(s, o, v, dst),
                        }
                        c0 += 64;
                    }
                }
                p += 8;
            }
            for (row, inv) in out.chunks_exact_mut(dh).zip(&inv) {
                row.iter_mut().for_each(|x| *x *= inv);
            }
            out
        }
    }

    /// `o[..8W] += sum_j s[j] * v[offs[j]..][..8W]` over the positions of one chunk, the sum
    /// in `W` registers.
    ///
    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`. `s` must be valid for reading every element the description above says is read
    /// through it. `v` must be valid for reading every element the description above says is read
    /// through it. `o` must be valid for writing every element the description above says is
    /// written through it, and no other thread may access them meanwhile.
    #[inline(always)]
    unsafe fn pv<const W: usize>(s: *const f32, offs: &[usize], v: *const f32, o: *mut f32) {
        unsafe {
            let mut acc: [__m256; W] = std::array::from_fn(|c| _mm256_loadu_ps(o.add(c * 8)));
            for (j, &off) in offs.iter().enumerate() {
                let w = _mm256_set1_ps(*s.add(j));
                let vp = v.add(off);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp.add(c * 8)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(c * 8), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_levels;

    fn rnd(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Attention written out in f64, position by position: the oracle.
    fn naive(
        q: &[f32],
        seqs: &[PagedSeq],
        kv: PagedKv,
        bs: usize,
        d: AttnDims,
        extras: AttnExtras,
    ) -> Vec<f32> {
        let (hq, hk, dh) = (d.heads, d.kv_heads, d.head_dim);
        let mut out = Vec::new();
        let mut row = 0;
        for s in seqs {
            for j in 0..s.num_tokens {
                let pos = s.start_pos + j;
                let lo = (pos + 1).saturating_sub(extras.window.unwrap_or(usize::MAX));
                for h in 0..hq {
                    let g = h / (hq / hk);
                    let qh = &q[(row * hq + h) * dh..][..dh];
                    let at = |p: usize| {
                        let slot = s.block_table[p / bs] as usize * bs + p % bs;
                        slot * hk * dh + g * dh
                    };
                    let scores: Vec<f64> = (lo..=pos)
                        .map(|p| {
                            let k = &kv.k[at(p)..][..dh];
                            let dot: f64 =
                                qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                            dot / (dh as f64).sqrt()
                        })
                        .collect();
                    let sink = extras.sinks.map(|s| s[h] as f64);
                    let m = scores.iter().copied().chain(sink).fold(f64::MIN, f64::max);
                    let denom: f64 = scores.iter().map(|x| (x - m).exp()).sum::<f64>()
                        + sink.map_or(0.0, |k| (k - m).exp());
                    for c in 0..dh {
                        let v: f64 = (lo..=pos)
                            .zip(&scores)
                            .map(|(p, x)| (x - m).exp() * kv.v[at(p) + c] as f64)
                            .sum();
                        out.push((v / denom) as f32);
                    }
                }
                row += 1;
            }
        }
        out
    }

    #[test]
    fn every_level_matches_the_f64_oracle() {
        let (bs, blocks) = (4, 12);
        let dims = AttnDims {
            heads: 4,
            kv_heads: 2,
            head_dim: 12,
        };
        let kd = dims.kv_heads * dims.head_dim;
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let k = rnd(bs * blocks * kd, &mut seed);
        let v = rnd(bs * blocks * kd, &mut seed);
        let kv = PagedKv { k: &k, v: &v };
        // A prefill of 11 rows after 3 cached positions, a decode row at position 9, blocks out
        // of order.
        let (t0, t1) = ([7u32, 2, 0, 9], [5u32, 1, 11]);
        let seqs = [
            PagedSeq {
                start_pos: 3,
                num_tokens: 11,
                block_table: &t0,
            },
            PagedSeq {
                start_pos: 9,
                num_tokens: 1,
                block_table: &t1,
            },
        ];
        let q = rnd(12 * dims.heads * dims.head_dim, &mut seed);
        let sinks = [0.5f32, -1.0, 2.0, 0.0];
        for extras in [
            AttnExtras::default(),
            AttnExtras {
                window: Some(5),
                sinks: Some(&sinks),
            },
        ] {
            let want = naive(&q, &seqs, kv, bs, dims, extras);
            for level in available_levels() {
                let got = paged_attention(&q, &seqs, kv, bs, dims, extras, level).unwrap();
                assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{level:?} {extras:?} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors_naming_the_numbers() {
        let dims = AttnDims {
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
        };
        let kv = PagedKv { k: &[], v: &[] };
        let err = paged_attention(&[], &[], kv, 4, dims, AttnExtras::default(), Simd::Scalar);
        assert_eq!(
            err.unwrap_err().0,
            "attention with 3 heads, 2 KV heads, block size 4"
        );
        let dims = AttnDims {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let table = [3u32];
        let seqs = [PagedSeq {
            start_pos: 0,
            num_tokens: 1,
            block_table: &table,
        }];
        let k = vec![0f32; 8 * 4];
        let kv = PagedKv { k: &k, v: &k };
        let err = paged_attention(
            &[0.0; 8],
            &seqs,
            kv,
            4,
            dims,
            AttnExtras::default(),
            Simd::Scalar,
        );
        assert_eq!(err.unwrap_err().0, "KV block 3 is outside the cache");
    }
}
