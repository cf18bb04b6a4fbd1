//! The paper's closed forms (section 4, equations 1-8 and BALANCE), as pure functions of
//! plain numbers so they can be checked against hand-computed cases.
//!
//! Units: every time is in seconds, every size in bytes unless the name says otherwise.

/// Ping-pong pipeline stage times of one micro-batch through one layer, seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// `T_a`: attention stage on one replica.
    pub t_a_s: f64,
    /// `T_e`: expert stage on one expert worker.
    pub t_e_s: f64,
    /// `T_c`: one-way communication (Eq. 6).
    pub t_c_s: f64,
}

impl StageTimes {
    /// `T_f = max(T_a, T_e)`.
    pub fn t_f_s(&self) -> f64 {
        self.t_a_s.max(self.t_e_s)
    }
}

/// Constraint 1 (`T_a ≈ T_e`) as a ratio: `max / min`, 1.0 when balanced.
pub fn imbalance_ratio(t: &StageTimes) -> f64 {
    let lo = t.t_a_s.min(t.t_e_s);
    if lo <= 0.0 {
        f64::INFINITY
    } else {
        t.t_f_s() / lo
    }
}

/// Constraint 2: `T_c < T_f`.
pub fn comm_hidden(t: &StageTimes) -> bool {
    t.t_c_s < t.t_f_s()
}

/// Constraint 3 rearranged: the fewest micro-batches that keep both sides busy,
/// `2 * (1 + T_c / T_f)` (a real number; round up for a count).
pub fn min_micro_batches(t: &StageTimes) -> f64 {
    2.0 * (1.0 + t.t_c_s / t.t_f_s())
}

/// Constraint 3: `m * T_f >= 2 * (T_f + T_c)`.
pub fn pipeline_fed(t: &StageTimes, m: u32) -> bool {
    m as f64 * t.t_f_s() >= 2.0 * (t.t_f_s() + t.t_c_s) * (1.0 - 1e-12)
}

/// Eq. 4: bounds on the time one micro-batch takes through `layers` layers, seconds:
/// `(T_a + T_e + 2 T_c) + m T_f (L - 1) <= T_iter <= m T_f L`.
pub fn iter_bounds_eq4(t: &StageTimes, m: u32, layers: u64) -> (f64, f64) {
    let tf = t.t_f_s();
    let l = layers as f64;
    let lo = (t.t_a_s + t.t_e_s + 2.0 * t.t_c_s) + m as f64 * tf * (l - 1.0);
    let hi = m as f64 * tf * l;
    (lo, hi)
}

/// Eq. 5: the whole global batch through one decode step from an empty pipeline, seconds:
/// `T_total = (T_a + T_e + 2 T_c) + T_f (m L - 1)`. Exact when constraint 3 holds.
pub fn total_eq5(t: &StageTimes, m: u32, layers: u64) -> f64 {
    (t.t_a_s + t.t_e_s + 2.0 * t.t_c_s) + t.t_f_s() * (m as f64 * layers as f64 - 1.0)
}

/// Time between tokens in steady state, seconds: each micro-batch visits each layer once per
/// period, the period being `m T_f` when the pipeline is fed (Eq. 4's upper bound) and the
/// round trip `T_a + T_e + 2 T_c` when it is not (m below constraint 3).
pub fn steady_tbt(t: &StageTimes, m: u32, layers: u64) -> f64 {
    let period = (m as f64 * t.t_f_s()).max(t.t_a_s + t.t_e_s + 2.0 * t.t_c_s);
    period * layers as f64
}

/// Throughput per unit cost, tokens/s per cost unit:
/// `(B / T_total) / (tp_a n_a Cost_a + tp_e E Cost_e)`; `workers` is `E` when each expert
/// worker holds one expert.
#[allow(clippy::too_many_arguments)]
pub fn throughput_per_cost(
    global_batch: f64,
    t_total_s: f64,
    tp_a: u32,
    n_a: u32,
    cost_a: f64,
    tp_e: u32,
    workers: u32,
    cost_e: f64,
) -> f64 {
    let cost = tp_a as f64 * n_a as f64 * cost_a + tp_e as f64 * workers as f64 * cost_e;
    (global_batch / t_total_s) / cost
}

/// Token conservation: tokens per expert per micro-batch, `b_e = b_a n_a K / E`.
pub fn tokens_per_expert(b_a: f64, n_a: u32, top_k: u64, experts: u64) -> f64 {
    b_a * n_a as f64 * top_k as f64 / experts as f64
}

/// BALANCE: with `T_a = k1 b_a + k2` and `T_e = k3 b_e + k4`, equal slopes after token
/// conservation give `n_a = k1 E / (k3 K)` (a real number; the planner tries the integers
/// around it).
pub fn balance(k1: f64, k3: f64, experts: u64, top_k: u64) -> f64 {
    k1 * experts as f64 / (k3 * top_k as f64)
}

/// Least-squares line through `(x, y)` points: returns `(slope, intercept)`.
pub fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 2 {
        return (0.0, points.first().map_or(0.0, |p| p.1));
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx == 0.0 {
        return (0.0, my);
    }
    let slope = sxy / sxx;
    (slope, my - slope * mx)
}

/// A bandwidth-utilisation curve `Util(size)`: the fraction of a link's rate a message of
/// `size` bytes achieves.
pub trait Util {
    fn util(&self, size_bytes: f64) -> f64;
}

/// Eq. 6, one side: seconds to move `size_bytes` at `w_bytes_s * Util(size)`.
pub fn transfer_s(size_bytes: f64, w_bytes_s: f64, util: &dyn Util) -> f64 {
    if size_bytes <= 0.0 {
        return 0.0;
    }
    size_bytes / (w_bytes_s * util.util(size_bytes).max(1e-9))
}

/// Eq. 6: `T_c = max( S_a / (W_a Util(S_a)), S_e / (W_e Util(S_e)) )` with
/// `S_a = b_a h K / tp_a` and `S_e = b_e h / tp_e` elements, times `elem_bytes`.
#[allow(clippy::too_many_arguments)]
pub fn comm_eq6(
    b_a: f64,
    b_e: f64,
    hidden: u64,
    top_k: u64,
    tp_a: u32,
    tp_e: u32,
    elem_bytes: f64,
    w_a_bytes_s: f64,
    util_a: &dyn Util,
    w_e_bytes_s: f64,
    util_e: &dyn Util,
) -> f64 {
    let s_a = b_a * hidden as f64 * top_k as f64 / tp_a as f64 * elem_bytes;
    let s_e = b_e * hidden as f64 / tp_e as f64 * elem_bytes;
    transfer_s(s_a, w_a_bytes_s, util_a).max(transfer_s(s_e, w_e_bytes_s, util_e))
}

/// Eq. 7: the SLO on time between tokens.
pub fn meets_slo(t_iter_s: f64, slo_s: f64) -> bool {
    t_iter_s <= slo_s
}

/// Eq. 8 (BF16): `4 m b_a s h L / g + 2 P_a < tp_a C_a`; `p_a` in parameters (elements),
/// `c_a_bytes` per GPU. Returns the bytes used on the left-hand side and whether it fits.
#[allow(clippy::too_many_arguments)]
pub fn attention_memory_eq8(
    m: u32,
    b_a: f64,
    seq_len: f64,
    hidden: u64,
    layers: u64,
    g: f64,
    p_a: f64,
    tp_a: u32,
    c_a_bytes: f64,
) -> (f64, bool) {
    let used = 4.0 * m as f64 * b_a * seq_len * hidden as f64 * layers as f64 / g + 2.0 * p_a;
    (used, used < tp_a as f64 * c_a_bytes)
}

/// A `Util(size)` of a latency-bandwidth link: `peak * s / (s + W * latency)`, so that
/// `s / (W Util(s)) = (s / W + latency) / peak`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyUtil {
    pub peak: f64,
    /// `W * latency`, bytes: the size at which half the peak is reached.
    pub half_size_bytes: f64,
}

impl Util for LatencyUtil {
    fn util(&self, size_bytes: f64) -> f64 {
        self.peak * size_bytes / (size_bytes + self.half_size_bytes)
    }
}

/// A measured `Util(size)` table, interpolated linearly in log(size); clamped at the ends.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TableUtil {
    /// `(message size in bytes, utilisation in (0, 1])`, sorted by size.
    pub points: Vec<(f64, f64)>,
}

impl Util for TableUtil {
    fn util(&self, size_bytes: f64) -> f64 {
        let p = &self.points;
        match p.len() {
            0 => 1.0,
            1 => p[0].1,
            _ => {
                if size_bytes <= p[0].0 {
                    return p[0].1;
                }
                for w in p.windows(2) {
                    let ((x0, y0), (x1, y1)) = (w[0], w[1]);
                    if size_bytes <= x1 {
                        let t = (size_bytes.ln() - x0.ln()) / (x1.ln() - x0.ln());
                        return y0 + t * (y1 - y0);
                    }
                }
                p[p.len() - 1].1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn st(a: f64, e: f64, c: f64) -> StageTimes {
        StageTimes {
            t_a_s: a,
            t_e_s: e,
            t_c_s: c,
        }
    }

    #[test]
    fn constraints_1_to_3() {
        // T_a = 2, T_e = 1.6, T_c = 0.5: T_f = 2, m >= 2 (1 + 0.25) = 2.5.
        let t = st(2.0, 1.6, 0.5);
        assert_eq!(t.t_f_s(), 2.0);
        assert!((imbalance_ratio(&t) - 1.25).abs() < EPS);
        assert!(comm_hidden(&t));
        assert!((min_micro_batches(&t) - 2.5).abs() < EPS);
        assert!(!pipeline_fed(&t, 2));
        assert!(pipeline_fed(&t, 3));
        // Fast communication (T_c < T_f / 2) needs 3; slow needs 4 (paper, section 4.1).
        assert_eq!(min_micro_batches(&st(1.0, 1.0, 0.49)).ceil(), 3.0);
        assert_eq!(min_micro_batches(&st(1.0, 1.0, 0.51)).ceil(), 4.0);
        assert!(!comm_hidden(&st(1.0, 1.0, 1.0)));
    }

    #[test]
    fn eq4_and_eq5_hand_computed() {
        // T_a = 3, T_e = 2, T_c = 1, m = 3, L = 4.
        let t = st(3.0, 2.0, 1.0);
        let (lo, hi) = iter_bounds_eq4(&t, 3, 4);
        // lo = (3 + 2 + 2) + 3 * 3 * 3 = 34; hi = 3 * 3 * 4 = 36.
        assert!((lo - 34.0).abs() < EPS && (hi - 36.0).abs() < EPS);
        // T_total = 7 + 3 * (12 - 1) = 40.
        assert!((total_eq5(&t, 3, 4) - 40.0).abs() < EPS);
        // Steady TBT: fed, so m T_f L = 36; with m = 1 the round trip 7 per layer -> 28.
        assert!((steady_tbt(&t, 3, 4) - 36.0).abs() < EPS);
        assert!((steady_tbt(&t, 1, 4) - 28.0).abs() < EPS);
        // Eq. 4 bounds contain the steady TBT whenever the pipeline is fed.
        assert!(lo <= steady_tbt(&t, 3, 4) && steady_tbt(&t, 3, 4) <= hi);
    }

    #[test]
    fn throughput_per_cost_hand_computed() {
        // B = 600 tokens in 0.1 s = 6000 tok/s; cost = 2*3*1.85 + 1*8*1.08 = 11.1 + 8.64.
        let v = throughput_per_cost(600.0, 0.1, 2, 3, 1.85, 1, 8, 1.08);
        assert!((v - 6000.0 / 19.74).abs() < 1e-9);
    }

    #[test]
    fn eq6_hand_computed() {
        struct Full;
        impl Util for Full {
            fn util(&self, _: f64) -> f64 {
                1.0
            }
        }
        // Mixtral, b_a = 128, tp_a = 2, K = 2: S_a = 128*6144*2/2*2 B = 1_572_864 B;
        // at 25 GB/s: 62.91 us. Expert side: b_e = 128 tokens, tp_e = 2: 786_432 B at
        // 12.5 GB/s: 62.91 us. Equal by construction.
        let tc = comm_eq6(128.0, 128.0, 6144, 2, 2, 2, 2.0, 25e9, &Full, 12.5e9, &Full);
        assert!((tc - 1_572_864.0 / 25e9).abs() < 1e-15);
        // The paper's per-connection size for this case: S_a / E = 196_608 B (~196 KB).
        assert_eq!(1_572_864.0 / 8.0, 196_608.0);
        // Util halves the rate at the half size: 1 MB at half size 1 MB -> twice as long.
        let u = LatencyUtil {
            peak: 1.0,
            half_size_bytes: 1e6,
        };
        assert!((transfer_s(1e6, 1e9, &u) - 2e-3).abs() < 1e-15);
        assert_eq!(transfer_s(0.0, 1e9, &u), 0.0);
    }

    #[test]
    fn eq8_hand_computed() {
        // Mixtral: m = 3, b_a = 100, s = 730, h = 6144, L = 56, g = 6, P_a = 5.3e9, tp_a = 2,
        // C_a = 80e9: KV = 4*3*100*730*6144*56/6 = 50_233_344_000 B; weights 10.6e9 B.
        let (used, ok) = attention_memory_eq8(3, 100.0, 730.0, 6144, 56, 6.0, 5.3e9, 2, 80e9);
        assert!((used - (50_233_344_000.0 + 10.6e9)).abs() < 1.0);
        assert!(ok);
        // b_a = 300: 150.7 GB of KV + 10.6 GB > 160 GB.
        let (_, ok) = attention_memory_eq8(3, 300.0, 730.0, 6144, 56, 6.0, 5.3e9, 2, 80e9);
        assert!(!ok);
    }

    #[test]
    fn balance_and_fit() {
        // k1 = 2 us/token, k3 = 1 us/token, E = 8, K = 2: n_a = 2 * 8 / 2 = 8.
        assert!((balance(2e-6, 1e-6, 8, 2) - 8.0).abs() < 1e-9);
        // Balance makes the slopes equal after token conservation: b_e = b_a n_a K / E.
        let (k1, k3) = (3e-6, 1.5e-6);
        let n_a = balance(k1, k3, 16, 4);
        let b_a = 100.0;
        let b_e = b_a * n_a * 4.0 / 16.0;
        assert!((k1 * b_a - k3 * b_e).abs() < 1e-12);
        let (s, i) = fit_line(&[(1.0, 5.0), (2.0, 7.0), (3.0, 9.0)]);
        assert!((s - 2.0).abs() < EPS && (i - 3.0).abs() < EPS);
        assert_eq!(tokens_per_expert(128.0, 4, 2, 8), 128.0);
    }

    #[test]
    fn table_util_interpolates_in_log_size() {
        let t = TableUtil {
            points: vec![(1e3, 0.1), (1e5, 0.5), (1e7, 0.9)],
        };
        assert_eq!(t.util(10.0), 0.1);
        assert!((t.util(1e4) - 0.3).abs() < 1e-12);
        assert!((t.util(1e6) - 0.7).abs() < 1e-12);
        assert_eq!(t.util(1e9), 0.9);
        assert!(meets_slo(0.15, 0.15) && !meets_slo(0.151, 0.15));
    }
}
