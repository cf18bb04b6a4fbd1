//! The statistics every report uses, so that two reports never compute a p99 differently.

/// The `p`-th percentile (0..=100) of `sorted` (ascending) by linear interpolation between
/// the closest ranks, numpy's default method: the value at fractional index
/// `p / 100 * (n - 1)`, interpolated between the two values around it. So p0 is the minimum,
/// p100 the maximum and p50 of an even count the mean of the two middle values. `p` outside
/// 0..=100 is clamped; no values give 0.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (idx.floor() as usize, idx.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (idx - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_between_closest_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 50.0), 2.5);
        // index 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 4.0);
        // index 0.25 * 4 = 1: exactly the second value.
        assert_eq!(percentile(&[10.0, 20.0, 30.0, 40.0, 50.0], 25.0), 20.0);
        assert_eq!(percentile(&[10.0, 20.0, 30.0, 40.0, 50.0], 50.0), 30.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(percentile(&v, 150.0), 4.0);
        assert_eq!(percentile(&v, -5.0), 1.0);
    }
}
