//! The choice of instruction set every kernel of this crate runs with ([`simd`], made once
//! per process), and small vectorised helpers of the decode path: a bandwidth probe, the
//! gated activation and `exp` on 8 lanes. The matmul lives in `packed`.

use std::sync::OnceLock;

/// The widest vector instructions the matmul kernels use, chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain Rust: the oracle of the others, and the path of CPUs without AVX2.
    Scalar,
    /// AVX2 + FMA + F16C (AVX-VNNI for the quantized kernels where present).
    Avx2,
    /// AVX-512 F/BW/VL (512-bit VNNI for the quantized kernels where present).
    Avx512,
    /// [`Simd::Avx512`] plus AVX512_BF16: bf16 weights are multiplied with `vdpbf16ps`, their
    /// activations rounded to bf16 first (as llama.cpp does), at every row count so that a
    /// row's result does not depend on the rows that share its batch (see
    /// `packed::PackedWeights::matmul_cols`). The one level whose results differ from the
    /// others' by more than the order of f32 sums, and only for bf16 weights; every other
    /// kernel runs as at [`Simd::Avx512`]. `TANDEM_SIMD=avx512` keeps bf16 exact.
    Avx512Bf16,
}

impl Simd {
    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
            Simd::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether bf16 weights multiply activations rounded to bf16 (`vdpbf16ps`) at this level,
    /// rather than the exact f32 products of the levels below.
    pub fn bf16_dot(self) -> bool {
        self >= Simd::Avx512Bf16
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Simd::Scalar),
            "avx2" => Some(Simd::Avx2),
            "avx512" => Some(Simd::Avx512),
            "avx512bf16" | "avx512_bf16" => Some(Simd::Avx512Bf16),
            _ => None,
        }
    }
}

/// The widest level this CPU supports.
pub fn detected_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl");
        if avx2 && avx512 && std::is_x86_feature_detected!("avx512bf16") {
            return Simd::Avx512Bf16;
        }
        if avx2 && avx512 {
            return Simd::Avx512;
        }
        if avx2 {
            return Simd::Avx2;
        }
    }
    Simd::Scalar
}

/// Every level this CPU can run, the scalar oracle first: the levels the kernel tests compare
/// against each other on this machine.
pub fn available_levels() -> Vec<Simd> {
    [Simd::Scalar, Simd::Avx2, Simd::Avx512, Simd::Avx512Bf16]
        .into_iter()
        .filter(|l| *l <= detected_simd())
        .collect()
}

/// One line saying which instruction-set levels (AVX512_BF16 is the level `avx512bf16`; and
/// which of the levels' optional extensions)
/// the kernel tests exercise on this machine, and which they cannot: printed by the test
/// suite so that a run on a CPU without AVX-512 is visible as such.
pub fn coverage_report() -> String {
    let levels: Vec<&str> = available_levels().iter().map(|l| l.name()).collect();
    let mut missing: Vec<&str> = [Simd::Avx2, Simd::Avx512, Simd::Avx512Bf16]
        .into_iter()
        .filter(|l| *l > detected_simd())
        .map(|l| l.name())
        .collect();
    let mut extras = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (name, has) in [
        ("avx512_vnni", std::is_x86_feature_detected!("avx512vnni")),
        ("avx_vnni", std::is_x86_feature_detected!("avxvnni")),
    ] {
        if has {
            extras.push(name);
        } else {
            missing.push(name);
        }
    }
    format!(
        "kernel tests cover: {} (extensions: {}); not on this CPU, so not covered: {}",
        levels.join(", "),
        if extras.is_empty() {
            "none".to_string()
        } else {
            extras.join(", ")
        },
        if missing.is_empty() {
            "nothing".to_string()
        } else {
            missing.join(", ")
        },
    )
}

/// The level the kernels run with: [`detected_simd`], capped by the environment variable
/// `TANDEM_SIMD` (`scalar`, `avx2`, `avx512` or `avx512bf16`) so the paths can be compared on one machine.
/// A value above what the CPU has, or one not understood, is ignored with a warning.
pub fn simd() -> Simd {
    static LEVEL: OnceLock<Simd> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detected_simd();
        match std::env::var("TANDEM_SIMD") {
            Err(_) => detected,
            Ok(v) => match Simd::parse(&v) {
                Some(cap) if cap <= detected => cap,
                _ => {
                    tracing::warn!(
                        "TANDEM_SIMD={v:?} ignored: the CPU supports up to {}",
                        detected.name()
                    );
                    detected
                }
            },
        }
    })
}

/// Sum of `x`, reading it at full memory speed (AVX2 where available): the bandwidth probe of
/// `tandem bench decode`. AVX2 when [`simd`] is `avx2` or above.
pub fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd() >= Simd::Avx2 {
            // SAFETY: the level, at most what the CPU has, includes AVX2.
            return unsafe { avx::sum(x) };
        }
    }
    x.iter().sum()
}

/// `silu(x) = x / (1 + e^-x)`: the scalar activation, the oracle of [`silu_mul`]'s SIMD lanes.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[i] = silu(g[i]) * u[i]` (`silu(x) = x / (1 + e^-x)`), the gated MLP's activation: 8
/// lanes at a time with [`avx_exp`] when [`simd`] is `avx2` or above.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && g.len() == out.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if simd() >= Simd::Avx2 {
            // SAFETY: the level, at most what the CPU has, includes AVX2 and FMA.
            done = unsafe { avx::silu_mul(g, u, out) };
        }
    }
    for ((o, g), u) in out[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
        *o = silu(*g) * u;
    }
}

/// `exp` of 8 lanes (Cephes' single-precision polynomial after reducing by powers of two;
/// within 2 ulp of `f32::exp` on `[-87, 88]`, inputs below flush to about 1e-38, not 0).
///
/// # Safety
/// The CPU must support AVX2 and FMA; the caller enables them (`#[target_feature]`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn avx_exp(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    unsafe {
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
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// The first `len / 8 * 8` elements of [`super::silu_mul`]; returns how many.
    ///
    /// # Safety
    /// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional
    /// extensions this module asks for) first.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
        unsafe {
            let n = g.len().min(u.len()).min(out.len()) / 8 * 8;
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i < n {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let uv = _mm256_loadu_ps(u.as_ptr().add(i));
                let e = super::avx_exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, uv));
                i += 8;
            }
            n
        }
    }

    /// # Safety
    /// The CPU must support `avx2`; callers check [`crate::simd()`] (and the optional extensions
    /// this module asks for) first.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sum(x: &[f32]) -> f32 {
        unsafe {
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
    }

    /// # Safety
    /// Only called, inlined, from this module's `#[target_feature]` entry points: the CPU supports
    /// `avx2,fma`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_hadd_ps(s, s);
            let s = _mm_hadd_ps(s, s);
            _mm_cvtss_f32(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_matches_the_scalar_formula() {
        // Lengths with and without a tail; values over the whole range, extremes included.
        for len in [0, 1, 7, 8, 9, 64, 101] {
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.4)
                .chain([-120.0, -88.0, 0.0, 88.5, 200.0])
                .collect();
            let u: Vec<f32> = g.iter().map(|x| 1.5 - x * 0.01).collect();
            let mut out = vec![f32::NAN; g.len()];
            silu_mul(&g, &u, &mut out);
            for ((o, g), u) in out.iter().zip(&g).zip(&u) {
                let want = (*g as f64) / (1.0 + (-(*g as f64)).exp()) * (*u as f64);
                assert!(
                    (*o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6),
                    "silu({g}) * {u} = {o}, want {want}"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_exp_matches_std() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        /// # Safety
        /// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional
        /// extensions this module asks for) first.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp8(x: &[f32; 8]) -> [f32; 8] {
            unsafe {
                use std::arch::x86_64::*;
                let mut o = [0f32; 8];
                _mm256_storeu_ps(o.as_mut_ptr(), avx_exp(_mm256_loadu_ps(x.as_ptr())));
                o
            }
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
