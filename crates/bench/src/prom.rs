//! Prometheus histograms read from a `/metrics` text page: `bench serve --compare-schema`
//! scrapes the server's structured-output histograms before and after each round and reports
//! the percentiles of the difference.

use serde_json::{json, Value};

/// The server's structured-output cost histograms (tandem-engine `constraint.rs`).
pub const CONSTRAINT_HISTOGRAMS: [&str; 3] = [
    "tandem_constraint_mask_seconds",
    "tandem_constraint_mask_wait_seconds",
    "tandem_constraint_commit_seconds",
];

/// One histogram: cumulative counts per upper bound (`le`, ascending, `+Inf` last as
/// infinity), the sum and the count. Series of several label sets are added together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

fn parse_le(labels: &str) -> Option<f64> {
    let i = labels.find("le=\"")? + 4;
    let v = &labels[i..];
    let v = &v[..v.find('"')?];
    match v {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => v.parse().ok(),
    }
}

/// The value at the end of a sample line (`name{labels} value [timestamp]`).
fn sample_value(rest: &str) -> Option<f64> {
    let after = match rest.rfind('}') {
        Some(i) => &rest[i + 1..],
        None => rest,
    };
    after.split_whitespace().next()?.parse().ok()
}

/// `name`'s histogram in the text `page`, `None` when the page has none of its samples.
pub fn parse_histogram(page: &str, name: &str) -> Option<Histogram> {
    let mut h = Histogram::default();
    let mut seen = false;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if let Some(r) = rest.strip_prefix("_bucket{") {
            let (Some(le), Some(v)) = (parse_le(r), sample_value(r)) else {
                continue;
            };
            match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += v,
                None => h.buckets.push((le, v)),
            }
            seen = true;
        } else if let Some(r) = rest.strip_prefix("_sum") {
            if r.starts_with(' ') || r.starts_with('{') {
                h.sum += sample_value(r).unwrap_or(0.0);
                seen = true;
            }
        } else if let Some(r) = rest.strip_prefix("_count") {
            if r.starts_with(' ') || r.starts_with('{') {
                h.count += sample_value(r).unwrap_or(0.0);
                seen = true;
            }
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    seen.then_some(h)
}

impl Histogram {
    /// The samples recorded between `before` and `self` (bucket by bucket; a bucket
    /// `before` lacks counts from 0).
    pub fn since(&self, before: &Histogram) -> Histogram {
        let prior = |le: f64| {
            before
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, (c - prior(le)).max(0.0)))
                .collect(),
            sum: self.sum - before.sum,
            count: (self.count - before.count).max(0.0),
        }
    }

    /// Adds `other`'s samples (same buckets expected; a missing one is added).
    pub fn add(&mut self, other: &Histogram) {
        for &(le, c) in &other.buckets {
            match self.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, x)) => *x += c,
                None => self.buckets.push((le, c)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.sum += other.sum;
        self.count += other.count;
    }

    /// The `q` quantile (0..=1) as Prometheus' `histogram_quantile` estimates it: linear
    /// inside the bucket the rank falls in (from 0 for the first bucket); the largest finite
    /// bound when it falls in `+Inf`. `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map_or(self.count, |b| b.1);
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= rank && c > below {
                if le.is_infinite() {
                    return Some(lo);
                }
                return Some(lo + (le - lo) * (rank - below) / (c - below));
            }
            if le.is_finite() {
                lo = le;
            }
            below = c;
        }
        Some(lo)
    }

    /// `{count, mean, p50, p99}` (seconds; null without samples).
    pub fn summary(&self) -> Value {
        let mean = (self.count > 0.0).then(|| self.sum / self.count);
        json!({
            "count": self.count as u64,
            "mean": mean,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# TYPE tandem_constraint_mask_seconds histogram
tandem_constraint_mask_seconds_bucket{le=\"0.00001\"} 10
tandem_constraint_mask_seconds_bucket{le=\"0.00002\"} 60
tandem_constraint_mask_seconds_bucket{le=\"0.00005\"} 90
tandem_constraint_mask_seconds_bucket{le=\"+Inf\"} 100
tandem_constraint_mask_seconds_sum 0.003
tandem_constraint_mask_seconds_count 100
tandem_constraint_mask_seconds_total_other 5
tandem_other_seconds_count 7
";

    #[test]
    fn parses_buckets_sum_and_count_of_one_name() {
        let h = parse_histogram(PAGE, "tandem_constraint_mask_seconds").unwrap();
        assert_eq!(
            h.buckets,
            vec![
                (1e-5, 10.0),
                (2e-5, 60.0),
                (5e-5, 90.0),
                (f64::INFINITY, 100.0)
            ]
        );
        assert_eq!((h.sum, h.count), (0.003, 100.0));
        assert!(parse_histogram(PAGE, "tandem_constraint_commit_seconds").is_none());
    }

    /// Against a direct computation on the bucket edges: rank 50 of 100 lies 40/50 of the
    /// way into (10 us, 20 us]; rank 99 lies in +Inf, so the largest finite bound.
    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        let h = parse_histogram(PAGE, "tandem_constraint_mask_seconds").unwrap();
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - (1e-5 + 1e-5 * 40.0 / 50.0)).abs() < 1e-12, "{p50}");
        let p05 = h.quantile(0.05).unwrap();
        assert!((p05 - 0.5e-5).abs() < 1e-12, "{p05}");
        let p85 = h.quantile(0.85).unwrap();
        assert!((p85 - (2e-5 + 3e-5 * 25.0 / 30.0)).abs() < 1e-12, "{p85}");
        assert_eq!(h.quantile(0.99), Some(5e-5));
        assert_eq!(Histogram::default().quantile(0.5), None);
        let s = h.summary();
        assert_eq!(s["count"], 100);
        assert!((s["mean"].as_f64().unwrap() - 3e-5).abs() < 1e-12);
    }

    #[test]
    fn difference_and_sum_of_scrapes() {
        let after = parse_histogram(PAGE, "tandem_constraint_mask_seconds").unwrap();
        let before = Histogram {
            buckets: vec![
                (1e-5, 10.0),
                (2e-5, 20.0),
                (5e-5, 20.0),
                (f64::INFINITY, 20.0),
            ],
            sum: 0.001,
            count: 20.0,
        };
        let d = after.since(&before);
        assert_eq!(
            d.buckets,
            vec![
                (1e-5, 0.0),
                (2e-5, 40.0),
                (5e-5, 70.0),
                (f64::INFINITY, 80.0)
            ]
        );
        assert_eq!(d.count, 80.0);
        assert!((d.sum - 0.002).abs() < 1e-12);
        // Every new sample is above 10 us: the median is inside (10, 20] us.
        let p50 = d.quantile(0.5).unwrap();
        assert!(p50 > 1e-5 && p50 <= 2e-5, "{p50}");
        let mut total = before.clone();
        total.add(&d);
        assert_eq!(total.buckets, after.buckets);
        assert_eq!(total.count, after.count);
        // Before anything was recorded: the difference is everything.
        assert_eq!(after.since(&Histogram::default()), after);
    }
}
