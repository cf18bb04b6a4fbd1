//! Small-batch matrix kernels for the decode path.
//!
//! Decode multiplies a handful of token rows by large weight matrices: the work is bounded by
//! reading the weights once. `matmul_wt` streams each weight row once for a tile of tokens and
//! keeps the tokens in cache, with AVX2/FMA where the CPU has it. Larger batches go to candle's
//! GEMM (see `layers::Linear`). Both paths are tested against each other.

use rayon::prelude::*;

/// `out[t, n] = sum_k x[t, k] * w[n, k]`: x is `[tokens, k]`, w is `[n, k]` (the layout of a
/// PyTorch `Linear` weight), out is `[tokens, n]`; all row-major.
pub fn matmul_wt(x: &[f32], tokens: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), tokens * k, "x must be [tokens, k]");
    assert_eq!(w.len(), n * k, "w must be [n, k]");
    assert_eq!(out.len(), tokens * n, "out must be [tokens, n]");
    if tokens == 0 || n == 0 {
        return;
    }
    // Rows of w per parallel task: big enough to amortise scheduling, small enough to balance.
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = (n / (threads * 4)).clamp(16, 1024).next_multiple_of(4);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(rows_per_task);
    let run = |task: usize| {
        let r0 = task * rows_per_task;
        let r1 = (r0 + rows_per_task).min(n);
        // SAFETY: tasks write disjoint column ranges [r0, r1) of `out`.
        unsafe { block(x, tokens, k, w, n, r0, r1, out_ptr) };
    };
    if threads == 1 || tasks == 1 {
        (0..tasks).for_each(run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Sum of `x`, reading it at full memory speed (AVX2 where available): the bandwidth probe of
/// `tandem bench decode`.
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { avx::sum(x) };
        }
    }
    x.iter().sum()
}

/// `exp` of 8 lanes (Cephes' single-precision polynomial after reducing by powers of two;
/// within 2 ulp of `f32::exp` on `[-87, 88]`, inputs below flush to about 1e-38, not 0).
///
/// # Safety
/// The CPU must support AVX2 and FMA; the caller enables them (`#[target_feature]`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn avx_exp(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
    // n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for precision).
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n through the exponent bits.
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

#[derive(Copy, Clone)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
    tokens: usize,
    k: usize,
    w: &[f32],
    n: usize,
    r0: usize,
    r1: usize,
    out: SyncPtr,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return avx::block(x, tokens, k, w, n, r0, r1, out.0);
        }
    }
    for r in r0..r1 {
        let wr = &w[r * k..(r + 1) * k];
        for t in 0..tokens {
            let xr = &x[t * k..(t + 1) * k];
            *out.0.add(t * n + r) = dot_scalar(xr, wr);
        }
    }
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn sum(x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let n32 = x.len() / 32 * 32;
        let p = x.as_ptr();
        let mut i = 0;
        while i < n32 {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(i + 8 * j)));
            }
            i += 32;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        for v in &x[n32..] {
            s += v;
        }
        s
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(s)
    }

    /// `R` weight rows times `T` token rows, accumulating in `R * T` AVX registers. Meanwhile
    /// it prefetches `pf_lines` cache lines from `pf`, spread evenly over the loop.
    #[inline(always)]
    unsafe fn micro<const R: usize, const T: usize>(
        xs: [*const f32; T],
        ws: [*const f32; R],
        k: usize,
        pf: *const f32,
        pf_lines: usize,
    ) -> [[f32; T]; R] {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let k8 = k / 8 * 8;
        let steps = (k8 / 8).max(1);
        // Bresenham-style: `debt` grows by pf_lines per step; one line per `steps` of it.
        let (mut debt, mut line) = (0usize, 0usize);
        let mut i = 0;
        while i < k8 {
            debt += pf_lines;
            while debt >= steps {
                _mm_prefetch::<_MM_HINT_T0>(pf.add(line * 16) as *const i8);
                line += 1;
                debt -= steps;
            }
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xv[t] = _mm256_loadu_ps(xs[t].add(i));
            }
            for r in 0..R {
                let wv = _mm256_loadu_ps(ws[r].add(i));
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            i += 8;
        }
        let mut res = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let mut s = hsum(acc[r][t]);
                for j in k8..k {
                    s += *ws[r].add(j) * *xs[t].add(j);
                }
                res[r][t] = s;
            }
        }
        res
    }

    /// Where `tile` writes and what it prefetches.
    #[derive(Clone, Copy)]
    struct Pass {
        out: *mut f32,
        pf: *const f32,
        pf_lines: usize,
    }

    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
        n: usize,
        r: usize,
        t0: usize,
        p: Pass,
    ) {
        let xs: [*const f32; T] = std::array::from_fn(|j| x.as_ptr().add((t0 + j) * k));
        let ws: [*const f32; R] = std::array::from_fn(|j| w.as_ptr().add((r + j) * k));
        let res = micro::<R, T>(xs, ws, k, p.pf, p.pf_lines);
        for (j, row) in res.iter().enumerate() {
            for (tt, v) in row.iter().enumerate() {
                *p.out.add((t0 + tt) * n + r + j) = *v;
            }
        }
    }

    /// Every token against weight rows `r..r + R`, in token tiles of `T` (then 2, then 1).
    /// The tiles together prefetch the next group's rows, so reading the weights from memory
    /// overlaps the arithmetic instead of adding to it; the group's own rows stay in L1 while
    /// the tiles pass over them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<const R: usize, const T: usize>(
        x: &[f32],
        tokens: usize,
        k: usize,
        w: &[f32],
        n: usize,
        r: usize,
        out: *mut f32,
        prefetch: bool,
    ) {
        let rem = tokens % T;
        let tiles = tokens / T + rem / 2 + rem % 2;
        let (start, end) = ((r + R) * k, ((r + 2 * R) * k).min(n * k));
        let lines = if prefetch && end > start {
            (end - start).div_ceil(16)
        } else {
            0
        };
        let pf = w.as_ptr().add(start.min(n * k));
        let mut done = 0;
        let pass = |j: usize| {
            let from = lines * j / tiles;
            let to = lines * (j + 1) / tiles;
            Pass {
                out,
                pf: pf.add(from * 16),
                pf_lines: to - from,
            }
        };
        let mut t = 0;
        while t + T <= tokens {
            tile::<R, T>(x, k, w, n, r, t, pass(done));
            done += 1;
            t += T;
        }
        while t + 2 <= tokens {
            tile::<R, 2>(x, k, w, n, r, t, pass(done));
            done += 1;
            t += 2;
        }
        if t < tokens {
            tile::<R, 1>(x, k, w, n, r, t, pass(done));
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block(
        x: &[f32],
        tokens: usize,
        k: usize,
        w: &[f32],
        n: usize,
        r0: usize,
        r1: usize,
        out: *mut f32,
    ) {
        let mut r = r0;
        if tokens == 1 {
            // Pure streaming: 4 rows at a time, the hardware prefetcher keeps up by itself.
            while r + 4 <= r1 {
                group::<4, 1>(x, tokens, k, w, n, r, out, false);
                r += 4;
            }
        } else if tokens <= SMALL_TILE_TOKENS {
            // 2 rows x 4 tokens: 8 accumulators, 6 loads per 8 FMAs.
            while r + 2 <= r1 {
                group::<2, 4>(x, tokens, k, w, n, r, out, true);
                r += 2;
            }
        } else {
            // 4 rows x 3 tokens: 12 accumulators, 7 loads per 12 FMAs.
            while r + 4 <= r1 {
                group::<4, 3>(x, tokens, k, w, n, r, out, true);
                r += 4;
            }
        }
        while r < r1 {
            group::<1, 1>(x, tokens, k, w, n, r, out, false);
            r += 1;
        }
    }

    /// Up to this many tokens the 2x4 tile wins, above it the 4x3 (measured with
    /// `tandem bench kernels`).
    const SMALL_TILE_TOKENS: usize = 16;
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn matches_naive_on_odd_shapes() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(t, k, n) in &[
            (1, 8, 4),
            (1, 37, 9),
            (3, 64, 33),
            (5, 13, 70),
            (9, 100, 3),
            (17, 256, 130),
            // Every tile shape and remainder: 2x4 up to 16 tokens, 4x3 above; rows not a
            // multiple of the tile; prefetch reaching the end of w.
            (2, 24, 5),
            (4, 40, 2),
            (7, 41, 11),
            (16, 64, 6),
            (18, 72, 13),
            (19, 33, 7),
            (20, 96, 4),
            (33, 130, 9),
            (64, 64, 66),
            (131, 17, 5),
        ] {
            let x: Vec<f32> = (0..t * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let r = naive(&x, t, k, &w, n);
            // One thread, and three (tasks split the rows of w).
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut o = vec![f32::NAN; t * n];
                pool.install(|| matmul_wt(&x, t, k, &w, n, &mut o));
                for (a, b) in o.iter().zip(&r) {
                    assert!((a - b).abs() < 1e-4, "{t}x{k}x{n} on {threads}: {a} vs {b}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_exp_matches_std() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp8(x: &[f32; 8]) -> [f32; 8] {
            use std::arch::x86_64::*;
            let mut o = [0f32; 8];
            _mm256_storeu_ps(o.as_mut_ptr(), avx_exp(_mm256_loadu_ps(x.as_ptr())));
            o
        }
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.0137);
            // SAFETY: the features were detected above.
            let got = unsafe { exp8(&xs) };
            for (a, v) in xs.iter().zip(got) {
                let want = (*a as f64).exp();
                assert!(
                    ((v as f64 - want) / want).abs() < 4e-7,
                    "exp({a}) = {v}, want {want}"
                );
            }
            x += 0.37;
        }
        // Far below the range: a tiny non-negative number, never NaN or infinite.
        // SAFETY: as above.
        let tiny = unsafe {
            exp8(&[
                -1e4,
                -200.0,
                -88.0,
                -100.0,
                f32::NEG_INFINITY,
                0.0,
                1.0,
                -1.0,
            ])
        };
        assert!(
            tiny[..5].iter().all(|v| (0.0..1e-37).contains(v)),
            "{tiny:?}"
        );
        assert_eq!(tiny[5], 1.0);
    }
}
