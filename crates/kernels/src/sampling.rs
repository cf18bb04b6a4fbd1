//! The sampler's one hot loop: the softmax denominator over a whole vocabulary of logits.
//! The sampling policy itself (temperature, top-k/p, penalties) is `tandem-sched`'s.

/// `sum(exp(l - max))` over `logits` (all `<= max`; `-inf` terms give 0). The exponentials
/// are evaluated in f32 by `exp_le0` over 8-wide lanes that the compiler vectorises (AVX2
/// when [`crate::simd()`] is `avx2` or above), summed in f32 over short runs and in f64
/// across them: a relative error of a few 1e-7 per term and about 1e-6 on the sum, against ~25 ns per term for f64
/// `exp`, which made sampling a 32k vocabulary cost 0.25 ms a row.
pub fn sum_exp(logits: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd() >= crate::Simd::Avx2 {
            // SAFETY: the level, at most what the CPU has, includes AVX2 and FMA.
            return unsafe { sum_exp_avx2(logits, max) };
        }
    }
    sum_exp_lanes(logits, max)
}

/// # Safety
/// The CPU must support `avx2,fma`; callers check [`crate::simd()`] (and the optional extensions
/// this module asks for) first.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(logits: &[f32], max: f32) -> f64 {
    sum_exp_lanes(logits, max)
}

#[inline(always)]
fn sum_exp_lanes(logits: &[f32], max: f32) -> f64 {
    let mut total = 0f64;
    for run in logits.chunks(256) {
        let mut acc = [0f32; 8];
        let mut it = run.chunks_exact(8);
        for c in &mut it {
            for j in 0..8 {
                acc[j] += exp_le0(c[j] - max);
            }
        }
        for (j, &l) in it.remainder().iter().enumerate() {
            acc[j] += exp_le0(l - max);
        }
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    total
}

/// `exp(x)` for `x <= 0` (`-inf` and anything below -87 give ~0): `2^n * e^r` with `n` the
/// nearest integer to `x / ln 2` and `|r| <= ln 2 / 2`, `e^r` by its degree-7 Taylor polynomial
/// (truncation error < 1e-8 relative). Branch-free so that it vectorises.
#[inline(always)]
fn exp_le0(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_matches_f64_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -(i as f32) * 0.000_5; // 0 .. -100
            let want = f64::from(x).exp();
            let got = f64::from(super::exp_le0(x));
            if want > 1e-37 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert!(got < 2e-37, "exp({x}) = {got}");
            }
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(super::exp_le0(f32::NEG_INFINITY), super::exp_le0(-87.0));
        assert!(super::exp_le0(f32::NEG_INFINITY) < 2e-38);
    }

    #[test]
    fn sum_exp_matches_the_f64_sum() {
        let mut x = 0x1234_5678_u64;
        for n in [1usize, 7, 8, 255, 256, 257, 32_000] {
            let logits: Vec<f32> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % 97 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        (x % 20_000) as f32 * 0.001 - 12.0
                    }
                })
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: f64 = logits
                .iter()
                .map(|&l| (f64::from(l) - f64::from(max)).exp())
                .sum();
            let got = super::sum_exp(&logits, max);
            assert!((got - want).abs() <= want * 2e-6, "n={n}: {got} vs {want}");
        }
    }
}
