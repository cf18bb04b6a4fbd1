//! Building blocks shared by every family: linear layers, RMSNorm / LayerNorm, rotary
//! embeddings, the SwiGLU expert. Activations cross function boundaries as candle tensors
//! `[T, D]` (T tokens, row-major, f32); inner loops work on the raw slices.

use crate::error::{ModelError, Result};
use crate::packed::{PackedWeights, WeightType};
use candle_core::{Device, Storage, Tensor};

/// Runs `f` on the contiguous f32 data of `t`.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let s = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&s[start..start + layout.shape().elem_count()]))
        }
        #[allow(unreachable_patterns)]
        _ => Err(ModelError::Input("expected a CPU f32 tensor".into())),
    }
}

/// A copy of the data of `t` as a `Vec<f32>`.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_slice(t, |s| s.to_vec())
}

/// `[rows, cols]` tensor from a vector.
pub fn from_vec(v: Vec<f32>, rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

/// A PyTorch-style linear layer: `y = x W^T + b`, W `[out, in]`, held packed for the matmul
/// kernel (`packed`), which serves every row count: one decode token up to a prefill chunk.
#[derive(Clone)]
pub struct Linear {
    pub w: PackedWeights,
    pub b: Option<Vec<f32>>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl Linear {
    /// From a `[out, in]` f32 weight (packed here; the tensor is not kept).
    pub fn new(w: Tensor, b: Option<Vec<f32>>) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        let w = with_slice(&w, |s| PackedWeights::pack(s, out_dim, in_dim))?;
        Ok(Self::from_packed(w, b))
    }

    /// From a row-major `[out, in]` weight, held in `ty`.
    pub fn from_f32(
        w: &[f32],
        out: usize,
        inp: usize,
        b: Option<Vec<f32>>,
        ty: WeightType,
    ) -> Self {
        Self::from_packed(PackedWeights::pack_as(w, out, inp, ty), b)
    }

    pub fn from_packed(w: PackedWeights, b: Option<Vec<f32>>) -> Self {
        let (out_dim, in_dim) = (w.n(), w.k());
        Self {
            w,
            b,
            out_dim,
            in_dim,
        }
    }

    /// Stacks the rows of several linears that read the same input (q, k, v; gate, up).
    pub fn concat(parts: &[Linear]) -> Result<Self> {
        let in_dim = parts.first().map_or(0, |p| p.in_dim);
        if parts.iter().any(|p| p.in_dim != in_dim) {
            return Err(ModelError::Input(
                "concatenated linears must have the same input size".into(),
            ));
        }
        let out_dim = parts.iter().map(|p| p.out_dim).sum();
        let ws: Vec<&PackedWeights> = parts.iter().map(|p| &p.w).collect();
        let w = PackedWeights::concat(&ws);
        let b = if parts.iter().any(|p| p.b.is_some()) {
            let mut b = Vec::new();
            for p in parts {
                match &p.b {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.extend(std::iter::repeat_n(0.0, p.out_dim)),
                }
            }
            Some(b)
        } else {
            None
        };
        Ok(Self {
            w,
            b,
            out_dim,
            in_dim,
        })
    }

    /// Bytes of weights read by one forward pass (in the weight's type).
    pub fn weight_bytes(&self) -> usize {
        self.w.weight_bytes()
    }

    /// Bytes the weight holds in memory (padded panels or groups).
    pub fn resident_bytes(&self) -> usize {
        self.w.resident_bytes()
    }

    pub fn weight_type(&self) -> WeightType {
        self.w.weight_type()
    }

    /// x `[T, in]` -> `[T, out]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let mut out = vec![0f32; rows * self.out_dim];
        self.w.matmul(x, rows, &mut out);
        if let Some(b) = &self.b {
            for row in out.chunks_exact_mut(self.out_dim) {
                for (o, bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            }
        }
        Ok(out)
    }

    /// [`Linear::forward`] for the output columns `cols` only, into `out` (`[T, out]`; the
    /// other columns are left as they are). See [`PackedWeights::matmul_cols`] for the
    /// alignment `cols` needs.
    pub fn forward_cols(
        &self,
        x: &[f32],
        rows: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        self.w.matmul_cols(x, rows, cols.clone(), out);
        if let Some(b) = &self.b {
            for row in out.chunks_exact_mut(self.out_dim) {
                for (o, bb) in row[cols.clone()].iter_mut().zip(&b[cols.clone()]) {
                    *o += bb;
                }
            }
        }
    }

    /// The product without the bias through candle's GEMM on the unpacked weight: the test
    /// oracle of `forward`, and the baseline of `tandem bench kernels`.
    pub fn forward_gemm(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward_gemm_with(&self.weight_tensor()?, x, rows)
    }

    /// `forward_gemm` with the weight already unpacked (see [`Linear::weight_tensor`]).
    pub fn forward_gemm_with(&self, w: &Tensor, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let xt = Tensor::from_slice(x, (rows, self.in_dim), &Device::Cpu)?;
        let y = xt.matmul(&w.t()?)?;
        to_vec(&y)
    }

    /// The weight as a `[out, in]` tensor (a copy).
    pub fn weight_tensor(&self) -> Result<Tensor> {
        from_vec(self.w.unpack(), self.out_dim, self.in_dim)
    }
}

/// Normalisation over the last dimension of each row.
#[derive(Clone)]
pub enum Norm {
    /// `x / sqrt(mean(x^2) + eps) * w` (Llama, Mixtral, Qwen, OLMoE).
    Rms { w: Vec<f32>, eps: f32 },
    /// `(x - mean) / sqrt(var + eps) * w`, no bias (DBRX).
    Layer { w: Vec<f32>, eps: f32 },
}

impl Norm {
    pub fn dim(&self) -> usize {
        match self {
            Norm::Rms { w, .. } | Norm::Layer { w, .. } => w.len(),
        }
    }

    /// Normalises every `dim()`-sized row of `x` in place.
    pub fn apply_inplace(&self, x: &mut [f32]) {
        match self {
            Norm::Rms { w, eps } => {
                for row in x.chunks_exact_mut(w.len()) {
                    let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
                    let r = 1.0 / (ms + eps).sqrt();
                    for (v, g) in row.iter_mut().zip(w) {
                        *v = *v * r * g;
                    }
                }
            }
            Norm::Layer { w, eps } => {
                let n = w.len() as f32;
                for row in x.chunks_exact_mut(w.len()) {
                    let mean: f32 = row.iter().sum::<f32>() / n;
                    let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                    let r = 1.0 / (var + eps).sqrt();
                    for (v, g) in row.iter_mut().zip(w) {
                        *v = (*v - mean) * r * g;
                    }
                }
            }
        }
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.apply_inplace(&mut y);
        y
    }
}

/// Rotary position embedding. Each head of `head_dim` values has its first `rot` dimensions
/// rotated (all of them unless the family has a partial rotary factor), either as the two
/// halves of those dimensions (GPT-NeoX "rotate half", most families) or as adjacent pairs
/// (DeepSeek). Angles are computed in f32 the way transformers computes them, with YaRN's
/// frequencies and cos/sin factor where configured.
#[derive(Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
    rot: usize,
    interleaved: bool,
    /// cos/sin are multiplied by this (YaRN's attention factor; 1 otherwise).
    scale: f32,
    /// cos/sin for positions below `table_len`, `[pos, rot/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    table_len: usize,
}

/// The shape of a [`Rope`]: see there.
#[derive(Debug, Clone, Copy)]
pub struct RopeSpec<'a> {
    pub head_dim: usize,
    pub rot: usize,
    pub theta: f64,
    pub yarn: Option<&'a crate::config::Yarn>,
    pub interleaved: bool,
    pub max_pos: usize,
}

/// transformers' YaRN frequencies: interpolated by `factor` below the correction range,
/// extrapolated above it, a linear ramp in between.
fn yarn_inv_freq(y: &crate::config::Yarn, rot: usize, theta: f64) -> Vec<f32> {
    let dim = rot as f64;
    let corr = |rotations: f64| {
        dim * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
            .ln()
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..rot / 2)
        .map(|i| {
            let pos_freq = (theta as f32).powf((2 * i) as f32 / rot as f32);
            let extra = 1.0 / pos_freq;
            let inter = 1.0 / (y.factor as f32 * pos_freq);
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extra_w = 1.0 - ramp;
            inter * (1.0 - extra_w) + extra * extra_w
        })
        .collect()
}

impl Rope {
    /// Full rotation of every head, rotate-half layout, no scaling.
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> Self {
        Self::with(RopeSpec {
            head_dim,
            rot: head_dim,
            theta,
            yarn: None,
            interleaved: false,
            max_pos,
        })
    }

    /// The rope of a standard (non-MLA) attention layer of `cfg`.
    pub fn for_config(cfg: &crate::config::ModelConfig) -> Self {
        Self::with(RopeSpec {
            head_dim: cfg.head_dim,
            rot: cfg.rotary_dim,
            theta: cfg.rope_theta,
            yarn: cfg.yarn.as_ref(),
            interleaved: cfg.rope_interleaved,
            max_pos: cfg.max_position_embeddings,
        })
    }

    pub fn with(spec: RopeSpec) -> Self {
        let rot = spec.rot.min(spec.head_dim);
        let half = rot / 2;
        let (inv_freq, scale) = match spec.yarn {
            Some(y) => (yarn_inv_freq(y, rot, spec.theta), y.cos_sin_factor() as f32),
            None => (
                (0..half)
                    .map(|i| 1.0 / (spec.theta as f32).powf((2 * i) as f32 / rot as f32))
                    .collect(),
                1.0,
            ),
        };
        let table_len = spec.max_pos.min(16384);
        let mut cos = Vec::with_capacity(table_len * half);
        let mut sin = Vec::with_capacity(table_len * half);
        for p in 0..table_len {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * scale);
                sin.push(a.sin() * scale);
            }
        }
        Self {
            inv_freq,
            head_dim: spec.head_dim,
            rot,
            interleaved: spec.interleaved,
            scale,
            cos,
            sin,
            table_len,
        }
    }

    /// Rotates every head of one token's `[heads * head_dim]` vector at position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.rot / 2;
        let mut cs_buf;
        let (cos, sin): (&[f32], &[f32]) = if pos < self.table_len {
            (
                &self.cos[pos * half..(pos + 1) * half],
                &self.sin[pos * half..(pos + 1) * half],
            )
        } else {
            cs_buf = (Vec::with_capacity(half), Vec::with_capacity(half));
            for f in &self.inv_freq {
                let a = pos as f32 * f;
                cs_buf.0.push(a.cos() * self.scale);
                cs_buf.1.push(a.sin() * self.scale);
            }
            (&cs_buf.0, &cs_buf.1)
        };
        for head in x.chunks_exact_mut(self.head_dim) {
            if self.interleaved {
                for (i, pair) in head[..self.rot].chunks_exact_mut(2).enumerate() {
                    let (x1, x2) = (pair[0], pair[1]);
                    pair[0] = x1 * cos[i] - x2 * sin[i];
                    pair[1] = x2 * cos[i] + x1 * sin[i];
                }
            } else {
                let (a, b) = head[..self.rot].split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

pub use tandem_kernels::simd::silu;

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// GPT-OSS's clamped SwiGLU, element by element: `gate` clamped above at `limit`, `up` to
/// `[-limit, limit]`, then `(up + 1) * (gate * sigmoid(alpha * gate))` (transformers'
/// `GptOssExperts._apply_gate`, in its order of operations).
pub fn clamped_swiglu(gate: &[f32], up: &[f32], out: &mut [f32], alpha: f32, limit: f32) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.min(limit);
        let u = u.clamp(-limit, limit);
        *o = (u + 1.0) * (g * sigmoid(g * alpha));
    }
}

/// A gated FFN (SwiGLU): `down(act(gate(x), up(x)))` with `act` = `silu(gate) * up` unless
/// the family says otherwise ([`ExpertAct`](crate::config::ExpertAct)), gate and up stacked
/// as one `[2F, D]` matrix so the input is read once.
#[derive(Clone)]
pub struct GatedMlp {
    pub gate_up: Linear,
    pub down: Linear,
    pub inter: usize,
    pub act: crate::config::ExpertAct,
}

impl GatedMlp {
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Result<Self> {
        let inter = gate.out_dim;
        Ok(Self {
            gate_up: Linear::concat(&[gate, up])?,
            down,
            inter,
            act: Default::default(),
        })
    }

    /// The same FFN with the activation `act`.
    pub fn with_act(mut self, act: crate::config::ExpertAct) -> Self {
        self.act = act;
        self
    }

    /// x `[T, D]` -> `[T, D]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let gu = self.gate_up.forward(x, rows)?; // [T, 2F]
        let f = self.inter;
        let mut act = vec![0f32; rows * f];
        for (row, a) in gu.chunks_exact(2 * f).zip(act.chunks_exact_mut(f.max(1))) {
            let (g, u) = row.split_at(f);
            match self.act {
                crate::config::ExpertAct::Silu => tandem_kernels::simd::silu_mul(g, u, a),
                crate::config::ExpertAct::ClampedSwiglu { alpha, limit } => {
                    clamped_swiglu(g, u, a, alpha, limit)
                }
            }
        }
        self.down.forward(&act, rows)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate_up.weight_bytes() + self.down.weight_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_and_gemm_paths_agree() {
        let (o, i) = (37, 29);
        let w: Vec<f32> = (0..o * i)
            .map(|k| ((k * 7919) % 101) as f32 / 101.0 - 0.5)
            .collect();
        let lin = Linear::new(from_vec(w, o, i).unwrap(), Some(vec![0.25; o])).unwrap();
        for rows in [1, 3, 30, 128, 129, 300] {
            let x: Vec<f32> = (0..rows * i)
                .map(|k| ((k * 31) % 17) as f32 / 17.0)
                .collect();
            let a = lin.forward(&x, rows).unwrap();
            let mut b = lin.forward_gemm(&x, rows).unwrap();
            for row in b.chunks_exact_mut(o) {
                row.iter_mut().for_each(|v| *v += 0.25);
            }
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn clamped_swiglu_by_hand() {
        // alpha 1.702, limit 7 (GPT-OSS): (up + 1) * gate * sigmoid(alpha * gate), the gate
        // clamped above at 7, up to [-7, 7].
        let gate = [0.5f32, 10.0, -3.0, 2.0, -20.0];
        let up = [1.0f32, 0.25, 9.0, -8.0, 0.0];
        let mut out = [0f32; 5];
        clamped_swiglu(&gate, &up, &mut out, 1.702, 7.0);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = [
            2.0 * 0.5 * sig(0.851),        // no clamp: 0.70078
            1.25 * 7.0 * sig(1.702 * 7.0), // gate clamped to 7
            8.0 * -3.0 * sig(-5.106),      // up clamped to 7
            -6.0 * 2.0 * sig(3.404),       // up clamped to -7
            1.0 * -20.0 * sig(-34.04),     // the gate is not clamped below
        ];
        for (i, (a, b)) in out.iter().zip(want).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-6 * b.abs().max(1.0),
                "{i}: {a} vs {b}"
            );
        }
        assert!((out[0] - 0.700_777).abs() < 1e-5, "{}", out[0]);
        assert!((out[1] - 8.75).abs() < 1e-4, "{}", out[1]);
        // Through a GatedMlp with identity projections, the activation is what comes out.
        let eye = |n: usize| -> Vec<f32> {
            (0..n * n)
                .map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 })
                .collect()
        };
        let ty = WeightType::F32;
        let mlp = GatedMlp::new(
            Linear::from_f32(&eye(5), 5, 5, None, ty),
            Linear::from_f32(&eye(5), 5, 5, Some(vec![0.0, 0.0, 9.0, -8.0, 0.0]), ty),
            Linear::from_f32(&eye(5), 5, 5, None, ty),
        )
        .unwrap()
        .with_act(crate::config::ExpertAct::ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0,
        });
        let y = mlp.forward(&[0.5, 10.0, -3.0, 2.0, -20.0], 1).unwrap();
        // gate = x, up = x + bias
        let mut want = [0f32; 5];
        clamped_swiglu(&gate, &[0.5, 10.0, 6.0, -6.0, -20.0], &mut want, 1.702, 7.0);
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn rope_table_and_direct_agree() {
        let r = Rope::new(8, 10000.0, 4);
        let mut a = vec![1.0f32; 16];
        let mut b = a.clone();
        r.apply(&mut a, 3);
        let r2 = Rope::new(8, 10000.0, 1);
        r2.apply(&mut b, 3);
        assert_eq!(a, b);
        // position 0 is the identity
        let mut c = vec![0.5f32; 8];
        r.apply(&mut c, 0);
        assert_eq!(c, vec![0.5f32; 8]);
    }
}
