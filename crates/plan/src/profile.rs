//! The measured-profile source of stage times: the file `tandem profile` will write.
//!
//! A profile holds the paper's linear fits, per tensor-parallel degree, and the measured
//! bandwidth-utilisation curve `Util(size)` of each side's network:
//!
//! ```toml
//! [profile]
//! format = 1
//! model = "mixtral-8x22b"
//! attention_hw = "H20"
//! expert_hw = "L40S"
//! source = "tandem profile, 2026-01-01"
//!
//! [[attention]]          # T_a = k1_s * b_a + k2_s, seconds per layer per micro-batch
//! tp = 2
//! context_tokens = 730   # context the fit was measured at
//! k1_s = 1.2e-6          # seconds per sequence
//! k2_s = 6.0e-5          # seconds
//! k_ctx_s = 2.0e-10      # optional: seconds per (sequence, cached token) away from 730
//!
//! [[head]]               # optional: once per decode step per micro-batch, outside the
//! tp = 2                 # layers (embedding, final norm, LM head, sampling)
//! k1_s = 4.0e-5          # seconds per sequence
//! k2_s = 2.0e-3          # seconds
//!
//! [[expert]]             # one expert with t > 0 tokens: k3_s * t + k4_s seconds
//! tp = 1
//! k3_s = 2.9e-6
//! k4_s = 3.1e-4
//! worker_overhead_s = 2.0e-5   # per worker per layer, optional
//!
//! [network.attention]    # one attention GPU's NIC
//! bandwidth_gbit_s = 200.0
//! util = [[4096.0, 0.05], [262144.0, 0.6], [4194304.0, 0.9]]   # [bytes, fraction]
//!
//! [network.expert]
//! bandwidth_gbit_s = 100.0
//! util = [[4096.0, 0.05], [262144.0, 0.6], [4194304.0, 0.9]]
//! ```
//!
//! Optional header fields: `moe_layers` (to amortise the `[[head]]` work over the layers in
//! [`StageModel::attention_s`]), `machine` and `settings` (provenance). `[network.loopback_tcp]`
//! (optional, same shape) records a TCP link measured beside the transport the engine uses.
//! On a CPU, `tp` is the number of threads of the worker's pool (the threads split every
//! GEMM as tensor parallelism splits it over GPUs).
//!
//! With `k_ctx_s`, attention at context `c` costs `k1_s b + k2_s + k_ctx_s b (c - context_tokens)`
//! (the KV read grows with the context); without it the fit nearest in context is used as is.
//!
//! The worker time for a list of per-expert token counts is the sum of the fits over its
//! experts that got tokens plus `worker_overhead_s`, so the paper's `T_e = k3 b_e + k4` is the
//! one-expert-per-worker case. [`Profile::from_stage_model`] writes the same file from any
//! stage model (e.g. the roofline), which is how the format is tested until real hardware
//! fills it. [`least_squares`] and [`NetworkFit::from_points`] turn `tandem profile`'s
//! measurements (`tandem_bench::profile`) into these fits.

use crate::closed_form::{self, TableUtil};
use crate::error::{read_file, PlanError, Result};
use crate::hardware::HardwareCatalog;
use crate::model::ModelShape;
use crate::perf::{fit_linear, Roofline, StageModel};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileHeader {
    pub format: u32,
    pub model: String,
    pub attention_hw: String,
    pub expert_hw: String,
    #[serde(default)]
    pub source: String,
    /// MoE layers of the model; with `[[head]]` fits, the head's work is spread over them in
    /// [`StageModel::attention_s`]. 0 = unknown.
    #[serde(default)]
    pub moe_layers: u32,
    /// Where it was measured (CPU model, cores), free-form.
    #[serde(default)]
    pub machine: String,
    /// How it was measured (threads, repetitions, grids), free-form.
    #[serde(default)]
    pub settings: String,
}

/// `T_a = k1_s * b_a + k2_s` at one TP degree and context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionFit {
    pub tp: u32,
    pub context_tokens: f64,
    /// Seconds per sequence.
    pub k1_s: f64,
    /// Seconds.
    pub k2_s: f64,
    /// Seconds per (sequence, cached token): the context-dependent part (KV reads), applied
    /// to the distance between the asked context and `context_tokens`. 0 = not measured.
    #[serde(default)]
    pub k_ctx_s: f64,
}

/// Per decode step and micro-batch, outside the layers: `k1_s * b + k2_s` seconds
/// (embedding, final norm, LM head, sampling).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadFit {
    pub tp: u32,
    /// Seconds per sequence.
    pub k1_s: f64,
    /// Seconds.
    pub k2_s: f64,
}

/// One expert at one TP degree: `k3_s * tokens + k4_s` when it gets tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertFit {
    pub tp: u32,
    /// Seconds per token.
    pub k3_s: f64,
    /// Seconds per expert that gets any token.
    pub k4_s: f64,
    /// Seconds per worker per layer (launches, reduce-scatter latency).
    #[serde(default)]
    pub worker_overhead_s: f64,
}

/// One side's network: line rate and measured `Util(size)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFit {
    /// Per GPU, Gbit/s.
    pub bandwidth_gbit_s: f64,
    /// `[message bytes, utilisation]`, sorted by size.
    pub util: Vec<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Networks {
    pub attention: NetworkFit,
    pub expert: NetworkFit,
    /// A loopback TCP link measured for reference (not used by the stage model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loopback_tcp: Option<NetworkFit>,
}

/// A measured performance profile (see the module docs for the file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub profile: ProfileHeader,
    pub attention: Vec<AttentionFit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head: Vec<HeadFit>,
    pub expert: Vec<ExpertFit>,
    pub network: Networks,
}

impl Profile {
    pub fn from_toml_str(text: &str, path: &str) -> Result<Self> {
        let p: Profile = toml::from_str(text).map_err(|e| PlanError::Profile {
            path: path.to_string(),
            msg: e.to_string(),
        })?;
        p.validate(path)?;
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::from_toml_str(&read_file(path)?, &path.display().to_string())
    }

    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| PlanError::Profile {
            path: "<serialise>".into(),
            msg: e.to_string(),
        })
    }

    fn validate(&self, path: &str) -> Result<()> {
        let bad = |msg: String| {
            Err(PlanError::Profile {
                path: path.to_string(),
                msg,
            })
        };
        if self.profile.format != 1 {
            return bad(format!(
                "format {} is not supported (1 is)",
                self.profile.format
            ));
        }
        if self.attention.is_empty() || self.expert.is_empty() {
            return bad("needs at least one [[attention]] and one [[expert]] fit".into());
        }
        for a in &self.attention {
            if a.tp == 0
                || a.k1_s < 0.0
                || a.k2_s < 0.0
                || a.k1_s + a.k2_s <= 0.0
                || (a.k1_s + a.k2_s).is_nan()
            {
                return bad(format!("attention fit for tp={} is not positive", a.tp));
            }
            if !(a.k_ctx_s >= 0.0 && a.k_ctx_s.is_finite()) {
                return bad(format!("attention k_ctx_s for tp={} must be >= 0", a.tp));
            }
        }
        for h in &self.head {
            if h.tp == 0 || !(h.k1_s >= 0.0 && h.k2_s >= 0.0) || !(h.k1_s + h.k2_s).is_finite() {
                return bad(format!("head fit for tp={} must be non-negative", h.tp));
            }
        }
        for e in &self.expert {
            if e.tp == 0
                || e.k3_s < 0.0
                || e.k4_s < 0.0
                || e.k3_s + e.k4_s <= 0.0
                || (e.k3_s + e.k4_s).is_nan()
            {
                return bad(format!("expert fit for tp={} is not positive", e.tp));
            }
        }
        let mut links = vec![
            ("attention", &self.network.attention),
            ("expert", &self.network.expert),
        ];
        if let Some(t) = &self.network.loopback_tcp {
            links.push(("loopback_tcp", t));
        }
        for (side, n) in links {
            if n.bandwidth_gbit_s.is_nan() || n.bandwidth_gbit_s <= 0.0 {
                return bad(format!("network.{side}.bandwidth_gbit_s must be positive"));
            }
            if n.util.windows(2).any(|w| w[0][0] >= w[1][0]) {
                return bad(format!("network.{side}.util must be sorted by size"));
            }
            if n.util
                .iter()
                .any(|p| !(p[0] > 0.0 && p[1] > 0.0 && p[1] <= 1.0))
            {
                return bad(format!(
                    "network.{side}.util needs positive sizes and utilisation in (0, 1]"
                ));
            }
        }
        Ok(())
    }

    /// `tandem plan profile-template`: the roofline of `model` on `attention_hw` and
    /// `expert_hw` at `context_tokens`, fitted at TP 1, 2, 4 and 8 (up to a node), as the TOML
    /// text of a profile file under a comment saying it is not measured.
    pub fn roofline_template(
        catalog: &HardwareCatalog,
        model: &ModelShape,
        attention_hw: &str,
        expert_hw: &str,
        context_tokens: f64,
    ) -> Result<String> {
        let ha = catalog.get(attention_hw)?;
        let he = catalog.get(expert_hw)?;
        let roof = Roofline::new(catalog, model, ha, he, context_tokens);
        let tps =
            |max: u32| -> Vec<u32> { [1, 2, 4, 8].into_iter().filter(|t| *t <= max).collect() };
        let p = Self::from_stage_model(
            &roof,
            &model.name,
            &ha.name,
            &he.name,
            &tps(ha.gpus_per_node),
            &tps(he.gpus_per_node),
            context_tokens,
            512.0,
        )?;
        Ok(format!(
            "# Performance profile fitted to the ROOFLINE (not measured). `tandem profile` will write\n# the same format from measurements on real hardware.\n{}",
            p.to_toml_string()?
        ))
    }

    /// Fits a profile to another stage model (e.g. the roofline) at the given TP degrees:
    /// the same file `tandem profile` writes from measurements.
    #[allow(clippy::too_many_arguments)]
    pub fn from_stage_model(
        sm: &dyn StageModel,
        model: &str,
        attention_hw: &str,
        expert_hw: &str,
        tps_a: &[u32],
        tps_e: &[u32],
        context_tokens: f64,
        b_max: f64,
    ) -> Result<Self> {
        let mut attention = Vec::new();
        let mut expert = Vec::new();
        for &ta in tps_a {
            let ((k1, k2), _) = fit_linear(sm, ta, 1, b_max)?;
            attention.push(AttentionFit {
                tp: ta,
                context_tokens,
                k1_s: k1.max(0.0),
                k2_s: k2.max(0.0),
                k_ctx_s: 0.0,
            });
        }
        for &te in tps_e {
            let (_, (k3, k4)) = fit_linear(sm, 1, te, b_max)?;
            let over = sm.expert_s(te, &[])?;
            expert.push(ExpertFit {
                tp: te,
                k3_s: k3.max(0.0),
                k4_s: (k4 - over).max(0.0),
                worker_overhead_s: over,
            });
        }
        let sizes = [1024.0, 16384.0, 131072.0, 1048576.0, 8388608.0, 67108864.0];
        let table = |f: &dyn Fn(f64) -> f64, gbit: f64| NetworkFit {
            bandwidth_gbit_s: gbit,
            util: sizes
                .iter()
                .map(|&s| [s, (s / (f(s) * gbit * 1e9 / 8.0)).min(1.0)])
                .collect(),
        };
        // The line rate is recovered from the largest message: Util there is the peak.
        let big = sizes[sizes.len() - 1];
        let gbit_a = big / sm.attention_link_s(big) * 8.0 / 1e9;
        let gbit_e = big / sm.expert_link_s(big) * 8.0 / 1e9;
        Ok(Self {
            profile: ProfileHeader {
                format: 1,
                model: model.to_string(),
                attention_hw: attention_hw.to_string(),
                expert_hw: expert_hw.to_string(),
                source: format!("fitted to {}", sm.describe()),
                moe_layers: 0,
                machine: String::new(),
                settings: String::new(),
            },
            attention,
            head: Vec::new(),
            expert,
            network: Networks {
                attention: table(&|s| sm.attention_link_s(s), gbit_a),
                expert: table(&|s| sm.expert_link_s(s), gbit_e),
                loopback_tcp: None,
            },
        })
    }
}

/// A [`StageModel`] backed by a [`Profile`].
#[derive(Debug, Clone)]
pub struct ProfileModel {
    pub profile: Profile,
    /// Context the planner asks about; the nearest measured context is used.
    pub context_tokens: f64,
    /// Bytes per hidden-state element on the wire.
    pub wire_elem_bytes: f64,
    util_a: TableUtil,
    util_e: TableUtil,
}

impl ProfileModel {
    pub fn new(profile: Profile, context_tokens: f64, wire_elem_bytes: f64) -> Self {
        let t = |n: &NetworkFit| TableUtil {
            points: n.util.iter().map(|p| (p[0], p[1])).collect(),
        };
        let util_a = t(&profile.network.attention);
        let util_e = t(&profile.network.expert);
        Self {
            profile,
            context_tokens,
            wire_elem_bytes,
            util_a,
            util_e,
        }
    }

    fn attention_fit_at(&self, tp: u32, context: f64) -> Result<&AttentionFit> {
        self.profile
            .attention
            .iter()
            .filter(|a| a.tp == tp)
            .min_by(|x, y| {
                let dx = (x.context_tokens - context).abs();
                let dy = (y.context_tokens - context).abs();
                dx.total_cmp(&dy)
            })
            .ok_or_else(|| PlanError::Profile {
                path: self.profile.profile.source.clone(),
                msg: format!("no attention fit for tp={tp}"),
            })
    }

    /// One layer's attention stage alone (no head work) for `b_a` sequences at `context`
    /// tokens, seconds.
    pub fn attention_layer_s(&self, tp_a: u32, b_a: f64, context: f64) -> Result<f64> {
        let f = self.attention_fit_at(tp_a, context)?;
        let t = f.k1_s * b_a + f.k2_s + f.k_ctx_s * b_a * (context - f.context_tokens);
        Ok(t.max(0.0))
    }

    /// The once-per-step work of one micro-batch of `b_a` sequences (0 without `[[head]]`
    /// fits), seconds.
    pub fn head_s(&self, tp_a: u32, b_a: f64) -> f64 {
        self.profile
            .head
            .iter()
            .find(|h| h.tp == tp_a)
            .map_or(0.0, |h| h.k1_s * b_a + h.k2_s)
    }

    /// Whether the profile has a `[[head]]` fit at `tp_a`.
    pub fn has_head(&self, tp_a: u32) -> bool {
        self.profile.head.iter().any(|h| h.tp == tp_a)
    }

    /// The expert fit at `tp`.
    pub fn expert_fit(&self, tp: u32) -> Result<&ExpertFit> {
        self.profile
            .expert
            .iter()
            .find(|e| e.tp == tp)
            .ok_or_else(|| PlanError::Profile {
                path: self.profile.profile.source.clone(),
                msg: format!("no expert fit for tp={tp}"),
            })
    }
}

impl StageModel for ProfileModel {
    fn attention_s(&self, tp_a: u32, b_a: f64) -> Result<f64> {
        let layer = self.attention_layer_s(tp_a, b_a, self.context_tokens)?;
        let layers = self.profile.profile.moe_layers;
        let head = if layers > 0 {
            self.head_s(tp_a, b_a) / layers as f64
        } else {
            0.0
        };
        Ok(layer + head)
    }

    fn expert_s(&self, tp_e: u32, tokens: &[f64]) -> Result<f64> {
        let f = self.expert_fit(tp_e)?;
        let busy: f64 = tokens
            .iter()
            .filter(|t| **t > 0.0)
            .map(|t| f.k3_s * t + f.k4_s)
            .sum();
        Ok(busy + f.worker_overhead_s)
    }

    fn expert_balanced_s(&self, tp_e: u32, count: u32, tokens: f64) -> Result<f64> {
        let f = self.expert_fit(tp_e)?;
        let one = if tokens > 0.0 {
            f.k3_s * tokens + f.k4_s
        } else {
            0.0
        };
        Ok(count as f64 * one + f.worker_overhead_s)
    }

    fn attention_link_s(&self, bytes: f64) -> f64 {
        let w = self.profile.network.attention.bandwidth_gbit_s * 1e9 / 8.0;
        closed_form::transfer_s(bytes, w, &self.util_a)
    }

    fn expert_link_s(&self, bytes: f64) -> f64 {
        let w = self.profile.network.expert.bandwidth_gbit_s * 1e9 / 8.0;
        closed_form::transfer_s(bytes, w, &self.util_e)
    }

    fn wire_elem_bytes(&self) -> f64 {
        self.wire_elem_bytes
    }

    fn attention_tps(&self) -> Option<Vec<u32>> {
        Some(self.profile.attention.iter().map(|a| a.tp).collect())
    }

    fn expert_tps(&self) -> Option<Vec<u32>> {
        Some(self.profile.expert.iter().map(|e| e.tp).collect())
    }

    fn describe(&self) -> String {
        format!(
            "profile ({}; {} attention / {} expert fits; {})",
            self.profile.profile.model,
            self.profile.attention.len(),
            self.profile.expert.len(),
            self.profile.profile.source
        )
    }
}

// ---------------------------------------------------------------------------------------
// Fitting measurements into the profile's lines (`tandem profile` measures, these fit).

/// Least squares `y = X beta` by the normal equations (Gaussian elimination with pivoting);
/// `xs[i]` is row i of X. Fails with fewer points than coefficients or a degenerate X.
pub fn least_squares(xs: &[Vec<f64>], ys: &[f64]) -> Result<Vec<f64>> {
    let k = xs.first().map_or(0, |r| r.len());
    if k == 0 || xs.len() < k {
        return Err(PlanError::Fit(format!(
            "need at least {k} points to fit {k} coefficients"
        )));
    }
    let mut a = vec![vec![0.0; k + 1]; k];
    for (row, y) in xs.iter().zip(ys) {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += row[i] * row[j];
            }
            a[i][k] += row[i] * y;
        }
    }
    for c in 0..k {
        let p = (c..k)
            .max_by(|x, y| a[*x][c].abs().total_cmp(&a[*y][c].abs()))
            .unwrap_or(c);
        a.swap(c, p);
        if a[c][c].abs() < 1e-300 {
            return Err(PlanError::Fit(
                "the fit is degenerate (measure more distinct points)".into(),
            ));
        }
        for r in 0..k {
            if r != c {
                let f = a[r][c] / a[c][c];
                let pivot = a[c].clone();
                for (x, p) in a[r][c..=k].iter_mut().zip(&pivot[c..=k]) {
                    *x -= f * p;
                }
            }
        }
    }
    Ok((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

/// Largest relative residual `|X beta - y| / y` of a fit.
pub fn max_rel_residual(xs: &[Vec<f64>], ys: &[f64], beta: &[f64]) -> f64 {
    xs.iter()
        .zip(ys)
        .map(|(r, y)| {
            let p: f64 = r.iter().zip(beta).map(|(x, b)| x * b).sum();
            ((p - y) / y).abs()
        })
        .fold(0.0, f64::max)
}

impl NetworkFit {
    /// `(size, one-way seconds)` points as a link: the line rate is the best `size / time`
    /// measured and `Util(size)` the fraction of it each size reaches, so that
    /// `size / (rate Util(size))` gives back the measured times.
    pub fn from_points(points: &[(usize, f64)]) -> Self {
        let rate = points
            .iter()
            .map(|(s, t)| *s as f64 / t.max(1e-12))
            .fold(0.0, f64::max);
        NetworkFit {
            bandwidth_gbit_s: rate * 8.0 / 1e9,
            util: points
                .iter()
                .map(|(s, t)| {
                    let u = (*s as f64 / t.max(1e-12) / rate).clamp(1e-9, 1.0);
                    [*s as f64, u]
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::HardwareCatalog;
    use crate::model::ModelCatalog;
    use crate::perf::Roofline;

    const DOC_EXAMPLE: &str = r#"
[profile]
format = 1
model = "mixtral-8x22b"
attention_hw = "H20"
expert_hw = "L40S"
source = "hand-written"

[[attention]]
tp = 2
context_tokens = 730
k1_s = 1.2e-6
k2_s = 6.0e-5

[[expert]]
tp = 1
k3_s = 2.9e-6
k4_s = 3.1e-4
worker_overhead_s = 2.0e-5

[network.attention]
bandwidth_gbit_s = 200.0
util = [[4096.0, 0.05], [262144.0, 0.6], [4194304.0, 0.9]]

[network.expert]
bandwidth_gbit_s = 100.0
util = [[4096.0, 0.05], [262144.0, 0.6], [4194304.0, 0.9]]
"#;

    #[test]
    fn documented_file_parses_and_prices_stages() {
        let p = Profile::from_toml_str(DOC_EXAMPLE, "doc").unwrap();
        let m = ProfileModel::new(p, 730.0, 2.0);
        assert!((m.attention_s(2, 100.0).unwrap() - (1.2e-4 + 6.0e-5)).abs() < 1e-15);
        assert!(m.attention_s(4, 100.0).is_err());
        // Paper form with one expert per worker: k3 b_e + k4 (+ overhead).
        let te = m.expert_s(1, &[50.0]).unwrap();
        assert!((te - (2.9e-6 * 50.0 + 3.1e-4 + 2e-5)).abs() < 1e-15);
        assert!(
            (m.expert_balanced_s(1, 2, 50.0).unwrap() - m.expert_s(1, &[50.0, 50.0]).unwrap())
                .abs()
                < 1e-15
        );
        // 262144 B at 25 GB/s * 0.6.
        assert!((m.attention_link_s(262144.0) - 262144.0 / (25e9 * 0.6)).abs() < 1e-12);
        assert_eq!(m.attention_tps(), Some(vec![2]));
    }

    #[test]
    fn measured_extensions_parse_and_price_context_and_head() {
        let text = DOC_EXAMPLE
            .replace(
                "source = \"hand-written\"",
                "source = \"hand-written\"\nmoe_layers = 4\nmachine = \"cpu\"",
            )
            .replace(
                "k2_s = 6.0e-5\n",
                "k2_s = 6.0e-5\nk_ctx_s = 1.0e-9\n\n[[head]]\ntp = 2\nk1_s = 4.0e-5\nk2_s = 2.0e-3\n",
            )
            + "\n[network.loopback_tcp]\nbandwidth_gbit_s = 10.0\nutil = [[4096.0, 0.1]]\n";
        let p = Profile::from_toml_str(&text, "ext").unwrap();
        assert_eq!(p.head.len(), 1);
        assert!(p.network.loopback_tcp.is_some());
        // Round trip keeps the new fields.
        let back = Profile::from_toml_str(&p.to_toml_string().unwrap(), "rt").unwrap();
        assert_eq!(back, p);
        let m = ProfileModel::new(p, 1730.0, 2.0);
        // 1000 tokens past the fit's context: + k_ctx * b * 1000.
        let layer = m.attention_layer_s(2, 100.0, 1730.0).unwrap();
        assert!((layer - (1.2e-4 + 6.0e-5 + 1e-9 * 100.0 * 1000.0)).abs() < 1e-15);
        // attention_s spreads the head over the 4 MoE layers.
        let head = 4.0e-5 * 100.0 + 2.0e-3;
        assert!((m.head_s(2, 100.0) - head).abs() < 1e-15);
        assert!((m.attention_s(2, 100.0).unwrap() - (layer + head / 4.0)).abs() < 1e-15);
        assert_eq!(m.head_s(1, 100.0), 0.0);
        let bad = text.replace("k_ctx_s = 1.0e-9", "k_ctx_s = -1.0");
        assert!(Profile::from_toml_str(&bad, "x")
            .unwrap_err()
            .to_string()
            .contains("k_ctx_s"));
    }

    #[test]
    fn rejects_bad_profiles() {
        let e = Profile::from_toml_str(&DOC_EXAMPLE.replace("format = 1", "format = 2"), "x")
            .unwrap_err();
        assert!(e.to_string().contains("format 2"), "{e}");
        let e = Profile::from_toml_str(
            &DOC_EXAMPLE.replace(
                "[[4096.0, 0.05], [262144.0, 0.6]",
                "[[262144.0, 0.6], [4096.0, 0.05]",
            ),
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("sorted"), "{e}");
        assert!(Profile::from_toml_str("[profile]\n", "x").is_err());
    }

    #[test]
    fn roofline_export_round_trips_and_tracks_the_roofline() {
        let c = HardwareCatalog::builtin().unwrap();
        let m = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        let r = Roofline::new(&c, &m, c.get("H20").unwrap(), c.get("L40S").unwrap(), 730.0);
        let p = Profile::from_stage_model(
            &r,
            "mixtral-8x22b",
            "H20",
            "L40S",
            &[1, 2, 4],
            &[1, 2],
            730.0,
            512.0,
        )
        .unwrap();
        let text = p.to_toml_string().unwrap();
        let back = Profile::from_toml_str(&text, "rt").unwrap();
        assert_eq!(back, p);
        let pm = ProfileModel::new(back, 730.0, 2.0);
        // Above the roofline ridge attention is linear in b_a, so the fit tracks it closely.
        for b in [128.0, 256.0, 512.0] {
            let (x, y) = (pm.attention_s(2, b).unwrap(), r.attention_s(2, b).unwrap());
            assert!((x - y).abs() / y < 0.05, "b={b}: {x} vs {y}");
        }
        // The network table reproduces the latency-bandwidth curve at its points.
        let s = 1048576.0;
        let (x, y) = (pm.expert_link_s(s), r.expert_link_s(s));
        assert!((x - y).abs() / y < 1e-6, "{x} vs {y}");
    }

    #[test]
    fn least_squares_recovers_a_plane() {
        // y = 2 + 3 a + 0.5 b, exactly.
        let xs: Vec<Vec<f64>> = [(1.0, 1.0), (2.0, 5.0), (4.0, 2.0), (8.0, 8.0)]
            .iter()
            .map(|(a, b)| vec![1.0, *a, *b])
            .collect();
        let ys: Vec<f64> = xs.iter().map(|r| 2.0 + 3.0 * r[1] + 0.5 * r[2]).collect();
        let beta = least_squares(&xs, &ys).unwrap();
        for (got, want) in beta.iter().zip([2.0, 3.0, 0.5]) {
            assert!((got - want).abs() < 1e-9, "{beta:?}");
        }
        assert!(max_rel_residual(&xs, &ys, &beta) < 1e-9);
        assert!(least_squares(&xs[..2], &ys[..2]).is_err());
        let same = vec![vec![1.0, 2.0]; 3];
        assert!(least_squares(&same, &[1.0, 1.0, 1.0]).is_err());
    }

    #[test]
    fn network_fit_gives_back_the_measured_times() {
        let pts = [(4096usize, 20e-6), (65536, 30e-6), (1 << 20, 200e-6)];
        let n = NetworkFit::from_points(&pts);
        let w = n.bandwidth_gbit_s * 1e9 / 8.0;
        for ((s, t), u) in pts.iter().zip(&n.util) {
            assert_eq!(u[0], *s as f64);
            assert!((*s as f64 / (w * u[1]) - t).abs() < 1e-12);
        }
        // The best rate is the largest message's here: utilisation 1 there.
        assert!((n.util[2][1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn roofline_template_is_a_profile_of_the_pair_marked_as_not_measured() {
        let c = HardwareCatalog::builtin().unwrap();
        let m = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
        let text = Profile::roofline_template(&c, &m, "H20", "L40S", 730.0).unwrap();
        assert!(text.starts_with("# Performance profile fitted to the ROOFLINE (not measured)."));
        let p = Profile::from_toml_str(&text, "template").unwrap();
        assert_eq!(p.profile.model, m.name);
        assert_eq!(p.profile.attention_hw, c.get("H20").unwrap().name);
        assert_eq!(p.profile.expert_hw, c.get("L40S").unwrap().name);
        let node = c.get("H20").unwrap().gpus_per_node;
        let tps: Vec<u32> = p.attention.iter().map(|f| f.tp).collect();
        let want: Vec<u32> = [1, 2, 4, 8].into_iter().filter(|t| *t <= node).collect();
        assert_eq!(tps, want);
        assert!(p.attention.iter().all(|f| f.context_tokens == 730.0));
        assert!(Profile::roofline_template(&c, &m, "no-such-gpu", "L40S", 730.0).is_err());
    }
}
