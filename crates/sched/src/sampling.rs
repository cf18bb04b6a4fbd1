//! Sampling parameters (OpenAI / vLLM names and defaults) and the token sampler.
//!
//! # Order of operations in [`Sampler::sample`]
//! 1. NaN logits become `-inf`, `+inf` becomes `f32::MAX`.
//! 2. While fewer than `min_tokens` tokens have been generated, the EOS ids (unless
//!    `ignore_eos`) and `stop_token_ids` are masked to `-inf`.
//! 3. Penalties, in place: `repetition_penalty` (Hugging Face: for every distinct token of
//!    prompt + output, a positive logit is divided by it, a negative one multiplied), then
//!    `frequency_penalty * count + presence_penalty * [count > 0]` is subtracted (OpenAI: counts
//!    over output tokens only).
//! 4. Log-probabilities are taken here: `log_softmax` of the penalised logits, *before*
//!    temperature, top-k, min-p and top-p. So a logprob describes the model (as penalised),
//!    not the sampling knobs, and it is the same whatever the temperature (vLLM's default
//!    "raw logprobs" convention, and what makes greedy logprobs meaningful).
//! 5. Greedy (`temperature < 1e-5` or `top_k == 1`): argmax, lowest token id on ties; no
//!    random number is drawn.
//! 6. Otherwise: divide by the temperature, keep the `top_k` largest, drop tokens whose
//!    probability is below `min_p` times the largest one, keep the smallest set of most likely
//!    tokens whose mass reaches `top_p`, and draw one token from what is left with exactly one
//!    uniform number from the request's [`RequestRng`].
//!
//! Because every request owns its RNG and draws from it only when it samples, the same seed
//! gives the same tokens whatever else is in the batch (given the same logits).

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// Below this temperature sampling is greedy (vLLM's `_SAMPLING_EPS`).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Most top-N logprobs a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// Per-request sampling and stopping parameters. Deserialises from an OpenAI-style JSON body
/// with every field optional; `stop` accepts a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Completions wanted. The scheduler runs one sequence per request; a frontend that
    /// supports `n > 1` fans the request out into `n` sequences.
    pub n: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 or -1 = off.
    pub top_k: i32,
    /// Drop tokens whose probability is below `min_p` times the top one, in [0, 1]; 0 = off.
    pub min_p: f32,
    /// Seed of the request's RNG; `None` draws a random one.
    pub seed: Option<u64>,
    /// Hugging Face repetition penalty over prompt + output tokens, > 0; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over output tokens, in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over output tokens, in [-2, 2].
    pub frequency_penalty: f32,
    /// Most tokens to generate; `None` = until the context is full.
    pub max_tokens: Option<usize>,
    /// EOS and stop tokens are ignored (and masked) until this many tokens exist.
    pub min_tokens: usize,
    /// Token ids that end generation (the token is kept in the output ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation (see [`crate::StopMatcher`]).
    #[serde(deserialize_with = "one_or_many")]
    pub stop: Vec<String>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// Return this many top logprobs per token (the chosen token's logprob is always
    /// returned). At most [`MAX_LOGPROBS`].
    pub logprobs: Option<usize>,
    /// Keep the matched stop string in the output text.
    pub include_stop_str_in_output: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: None,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            include_stop_str_in_output: false,
        }
    }
}

/// An out-of-range sampling parameter.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingParamsError {
    #[error("n must be at least 1")]
    ZeroN,
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("top_k must be -1, 0 (off) or a positive count, got {0}")]
    TopK(i32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")]
    MinTokensAboveMax {
        min_tokens: usize,
        max_tokens: usize,
    },
    #[error("stop strings must not be empty")]
    EmptyStop,
    #[error("logprobs must be at most {max}, got {requested}")]
    TooManyLogprobs { requested: usize, max: usize },
}

impl SamplingParamsError {
    /// The request field (OpenAI / vLLM name, as in [`SamplingParams`]) this error concerns,
    /// for an API error's `param`.
    pub fn param(&self) -> &'static str {
        match self {
            Self::ZeroN => "n",
            Self::Temperature(_) => "temperature",
            Self::TopP(_) => "top_p",
            Self::TopK(_) => "top_k",
            Self::MinP(_) => "min_p",
            Self::RepetitionPenalty(_) => "repetition_penalty",
            Self::PresencePenalty(_) => "presence_penalty",
            Self::FrequencyPenalty(_) => "frequency_penalty",
            Self::ZeroMaxTokens => "max_tokens",
            // The bound that is too large is the one to change.
            Self::MinTokensAboveMax { .. } => "min_tokens",
            Self::EmptyStop => "stop",
            Self::TooManyLogprobs { .. } => "logprobs",
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with otherwise default parameters.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        use SamplingParamsError as E;
        if self.n == 0 {
            return Err(E::ZeroN);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(E::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(E::TopP(self.top_p));
        }
        if self.top_k < -1 {
            return Err(E::TopK(self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(E::MinP(self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(E::RepetitionPenalty(self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(E::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(E::FrequencyPenalty(self.frequency_penalty));
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens == 0 {
                return Err(E::ZeroMaxTokens);
            }
            if self.min_tokens > max_tokens {
                return Err(E::MinTokensAboveMax {
                    min_tokens: self.min_tokens,
                    max_tokens,
                });
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(E::EmptyStop);
        }
        if let Some(requested) = self.logprobs {
            if requested > MAX_LOGPROBS {
                return Err(E::TooManyLogprobs {
                    requested,
                    max: MAX_LOGPROBS,
                });
            }
        }
        Ok(())
    }
}

/// `"stop": "x"`, `"stop": ["x", "y"]` and `"stop": null` all deserialise.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// A request's own random stream: ChaCha8 seeded from the request's seed.
#[derive(Debug, Clone)]
pub struct RequestRng {
    seed: u64,
    rng: ChaCha8Rng,
}

impl RequestRng {
    /// A stream determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A stream with a random seed (see [`RequestRng::seed`] to log it).
    pub fn from_entropy() -> Self {
        Self::new(rand::random())
    }

    /// `params.seed`, or a random seed when it has none.
    pub fn for_params(params: &SamplingParams) -> Self {
        params.seed.map_or_else(Self::from_entropy, Self::new)
    }

    /// The seed this stream started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` (after penalties, before temperature/top-k/top-p/min-p).
    pub logprob: f32,
    /// The `params.logprobs` most likely tokens and their logprobs, most likely first (ties:
    /// lower id first); empty when `logprobs` is `None`.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Why no token could be sampled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SampleError {
    #[error("empty logits")]
    EmptyLogits,
    #[error("no token has a finite logit (all masked or NaN)")]
    NoFiniteLogit,
}

/// Turns one row of logits into a token. Holds the model's EOS ids (needed to mask them
/// before `min_tokens`).
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    eos_token_ids: Vec<u32>,
}

impl Sampler {
    pub fn new(eos_token_ids: Vec<u32>) -> Self {
        Self { eos_token_ids }
    }

    /// The EOS ids this sampler masks before `min_tokens`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Samples the next token from `logits` (`[vocab]`, modified in place: masks and
    /// penalties are applied to it). See the module docs for the order of operations.
    pub fn sample(
        &self,
        logits: &mut [f32],
        params: &SamplingParams,
        prompt_ids: &[u32],
        output_ids: &[u32],
        rng: &mut RequestRng,
    ) -> Result<Sampled, SampleError> {
        if logits.is_empty() {
            return Err(SampleError::EmptyLogits);
        }
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            } else if *l == f32::INFINITY {
                *l = f32::MAX;
            }
        }
        if output_ids.len() < params.min_tokens {
            let eos = if params.ignore_eos {
                &[][..]
            } else {
                &self.eos_token_ids[..]
            };
            for &t in eos.iter().chain(&params.stop_token_ids) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        apply_penalties(logits, params, prompt_ids, output_ids);

        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SampleError::NoFiniteLogit);
        }
        let sum = tandem_kernels::sampling::sum_exp(logits, max);
        let lse = f64::from(max) + sum.ln();
        let logprob_of = |l: f32| (f64::from(l) - lse) as f32;

        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            sample_filtered(logits, max, params, rng)
        };
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob_of(l));
        let top_logprobs = match params.logprobs {
            Some(n) if n > 0 => top_n(logits, n)
                .into_iter()
                .map(|t| {
                    (
                        t,
                        logits
                            .get(t as usize)
                            .map_or(f32::NEG_INFINITY, |&l| logprob_of(l)),
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(Sampled {
            token,
            logprob,
            top_logprobs,
        })
    }
}

/// Repetition (HF, prompt + output), then frequency and presence (OpenAI, output) penalties.
/// Token ids outside the vocabulary are ignored.
fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt_ids: &[u32],
    output_ids: &[u32],
) {
    let rp = params.repetition_penalty;
    if rp != 1.0 {
        let seen: HashSet<u32> = prompt_ids.iter().chain(output_ids).copied().collect();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
    }
    let (fp, pp) = (params.frequency_penalty, params.presence_penalty);
    if fp != 0.0 || pp != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output_ids {
            *counts.entry(t).or_insert(0) += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= fp * c as f32 + pp;
            }
        }
    }
}

/// Index of the largest logit, lowest index on ties.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// "More likely first, then lower id" order on `(id, logit)` pairs.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` most likely token ids, most likely first, lower id first on ties; only tokens with
/// a finite logit.
fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    let mut cand: Vec<(u32, f32)> = finite_candidates(logits);
    if n < cand.len() {
        cand.select_nth_unstable_by(n - 1, by_logit_desc);
        cand.truncate(n);
    }
    cand.sort_unstable_by(by_logit_desc);
    cand.into_iter().map(|c| c.0).collect()
}

fn finite_candidates(logits: &[f32]) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect()
}

/// Temperature, top-k, min-p, top-p, then one draw. `max` is the largest logit (finite).
fn sample_filtered(logits: &[f32], max: f32, params: &SamplingParams, rng: &mut RequestRng) -> u32 {
    let mut cand = finite_candidates(logits);
    if params.top_k > 0 {
        let k = params.top_k as usize;
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_logit_desc);
            cand.truncate(k);
        }
    }
    // Unnormalised probabilities relative to the top token (which has weight 1).
    let t = f64::from(params.temperature);
    let mut weighted: Vec<(u32, f64)> = cand
        .iter()
        .map(|&(id, l)| (id, ((f64::from(l) - f64::from(max)) / t).exp()))
        .collect();
    if params.min_p > 0.0 {
        let min_p = f64::from(params.min_p);
        weighted.retain(|&(_, w)| w >= min_p);
    }
    if params.top_p < 1.0 {
        weighted.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = weighted.iter().map(|w| w.1).sum();
        let target = f64::from(params.top_p) * total;
        let mut cum = 0.0;
        let mut keep = weighted.len();
        for (i, w) in weighted.iter().enumerate() {
            cum += w.1;
            if cum >= target {
                keep = i + 1;
                break;
            }
        }
        weighted.truncate(keep.max(1));
    }
    let total: f64 = weighted.iter().map(|w| w.1).sum();
    let u = rng.next_f64() * total;
    let mut cum = 0.0;
    for &(id, w) in &weighted {
        cum += w;
        if u < cum {
            return id;
        }
    }
    // Rounding left `u` at the very top: the last kept token (there is always one, the max).
    weighted.last().map_or_else(|| argmax(logits), |w| w.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        logits: &[f32],
        params: &SamplingParams,
        prompt: &[u32],
        output: &[u32],
        rng: &mut RequestRng,
    ) -> Sampled {
        let mut l = logits.to_vec();
        match Sampler::new(vec![]).sample(&mut l, params, prompt, output, rng) {
            Ok(s) => s,
            Err(e) => unreachable!("sampling failed: {e}"),
        }
    }

    fn counts(logits: &[f32], params: &SamplingParams, draws: usize, seed: u64) -> Vec<usize> {
        let mut rng = RequestRng::new(seed);
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[sample(logits, params, &[], &[], &mut rng).token as usize] += 1;
        }
        c
    }

    const LOGITS: [f32; 6] = [1.0, 3.0, 2.5, -1.0, 3.0, 0.0];

    #[test]
    fn defaults_and_json() -> Result<(), serde_json::Error> {
        let p: SamplingParams = serde_json::from_str("{}")?;
        assert_eq!(p, SamplingParams::default());
        assert_eq!(p.validate(), Ok(()));
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0, "stop": "\n", "top_k": -1, "seed": 7}"#)?;
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert!(p.is_greedy());
        assert_eq!(p.seed, Some(7));
        let p: SamplingParams = serde_json::from_str(r#"{"stop": ["a", "b"], "max_tokens": 5}"#)?;
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.max_tokens, Some(5));
        let p: SamplingParams = serde_json::from_str(r#"{"stop": null}"#)?;
        assert!(p.stop.is_empty());
        Ok(())
    }

    #[test]
    fn validate_rejects_out_of_range() {
        use SamplingParamsError as E;
        let d = SamplingParams::default;
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                E::Temperature(-0.1),
            ),
            (SamplingParams { top_p: 0.0, ..d() }, E::TopP(0.0)),
            (SamplingParams { top_p: 1.5, ..d() }, E::TopP(1.5)),
            (SamplingParams { top_k: -2, ..d() }, E::TopK(-2)),
            (SamplingParams { min_p: 1.5, ..d() }, E::MinP(1.5)),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                E::RepetitionPenalty(0.0),
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..d()
                },
                E::PresencePenalty(2.5),
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..d()
                },
                E::FrequencyPenalty(-3.0),
            ),
            (
                SamplingParams {
                    max_tokens: Some(0),
                    ..d()
                },
                E::ZeroMaxTokens,
            ),
            (
                SamplingParams {
                    max_tokens: Some(2),
                    min_tokens: 3,
                    ..d()
                },
                E::MinTokensAboveMax {
                    min_tokens: 3,
                    max_tokens: 2,
                },
            ),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..d()
                },
                E::EmptyStop,
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..d()
                },
                E::TooManyLogprobs {
                    requested: 21,
                    max: MAX_LOGPROBS,
                },
            ),
            (SamplingParams { n: 0, ..d() }, E::ZeroN),
        ];
        for (p, want) in cases {
            assert_eq!(p.validate(), Err(want));
        }
        assert!(SamplingParams {
            temperature: f32::NAN,
            ..d()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: f32::NAN,
            ..d()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn each_error_names_its_request_field() {
        use SamplingParamsError as E;
        // The names clients send (OpenAI / vLLM request fields).
        let cases = [
            (E::ZeroN, "n"),
            (E::Temperature(-1.0), "temperature"),
            (E::TopP(2.0), "top_p"),
            (E::TopK(-2), "top_k"),
            (E::MinP(2.0), "min_p"),
            (E::RepetitionPenalty(0.0), "repetition_penalty"),
            (E::PresencePenalty(3.0), "presence_penalty"),
            (E::FrequencyPenalty(3.0), "frequency_penalty"),
            (E::ZeroMaxTokens, "max_tokens"),
            (
                E::MinTokensAboveMax {
                    min_tokens: 3,
                    max_tokens: 2,
                },
                "min_tokens",
            ),
            (E::EmptyStop, "stop"),
            (
                E::TooManyLogprobs {
                    requested: 21,
                    max: MAX_LOGPROBS,
                },
                "logprobs",
            ),
        ];
        for (e, want) in &cases {
            assert_eq!(e.param(), *want, "{e:?}");
            // No wildcard: a new variant does not compile here until it is added to `cases`.
            match e {
                E::ZeroN
                | E::Temperature(_)
                | E::TopP(_)
                | E::TopK(_)
                | E::MinP(_)
                | E::RepetitionPenalty(_)
                | E::PresencePenalty(_)
                | E::FrequencyPenalty(_)
                | E::ZeroMaxTokens
                | E::MinTokensAboveMax { .. }
                | E::EmptyStop
                | E::TooManyLogprobs { .. } => {}
            }
        }
        assert_eq!(cases.len(), 12, "one case per variant");
    }

    #[test]
    fn greedy_is_argmax_lowest_index() {
        let mut rng = RequestRng::new(0);
        let s = sample(&LOGITS, &SamplingParams::greedy(), &[], &[], &mut rng);
        assert_eq!(s.token, 1); // 1 and 4 tie at 3.0
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let k1 = SamplingParams {
            top_k: 1,
            ..SamplingParams::default()
        };
        let p0 = SamplingParams {
            top_p: 1e-6,
            ..SamplingParams::default()
        };
        let mut rng = RequestRng::new(3);
        for _ in 0..200 {
            assert_eq!(sample(&LOGITS, &k1, &[], &[], &mut rng).token, 1);
            assert_eq!(sample(&LOGITS, &p0, &[], &[], &mut rng).token, 1);
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let p = SamplingParams {
            top_k: 3,
            temperature: 5.0,
            ..SamplingParams::default()
        };
        let c = counts(&LOGITS, &p, 3000, 11);
        // Top 3: ids 1, 4 (3.0) and 2 (2.5).
        assert_eq!(c[0] + c[3] + c[5], 0);
        assert!(c[1] > 0 && c[2] > 0 && c[4] > 0);
    }

    #[test]
    fn top_p_restricts_support() {
        // probs ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps the first two.
        let logits = [2.0, 1.0, 0.0];
        let p = SamplingParams {
            top_p: 0.8,
            ..SamplingParams::default()
        };
        let c = counts(&logits, &p, 3000, 5);
        assert_eq!(c[2], 0);
        assert!(c[0] > c[1] && c[1] > 0);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Relative probs: 1, e^-1 = 0.37, e^-3 = 0.05. min_p 0.1 drops the last.
        let logits = [3.0, 2.0, 0.0];
        let p = SamplingParams {
            min_p: 0.1,
            ..SamplingParams::default()
        };
        let c = counts(&logits, &p, 3000, 9);
        assert_eq!(c[2], 0);
        assert!(c[1] > 0);
        let c = counts(&logits, &SamplingParams::default(), 3000, 9);
        assert!(c[2] > 0);
    }

    #[test]
    fn distribution_matches_softmax() {
        // Fixed seed: deterministic, so this cannot flake. 20_000 draws give a standard error
        // below 0.004 per probability; the tolerance is 0.02.
        let logits = [0.5f32, 1.5, -0.5, 1.0];
        let t = 0.8f32;
        let p = SamplingParams {
            temperature: t,
            ..SamplingParams::default()
        };
        let draws = 20_000;
        let c = counts(&logits, &p, draws, 1234);
        let z: f64 = logits.iter().map(|&l| f64::from(l / t).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let want = f64::from(l / t).exp() / z;
            let got = c[i] as f64 / draws as f64;
            assert!((got - want).abs() < 0.02, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn seeded_runs_are_reproducible() {
        let p = SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        };
        let run = |interleave: bool| {
            let mut rng = RequestRng::for_params(&p);
            let mut other = RequestRng::new(7);
            (0..50)
                .map(|_| {
                    if interleave {
                        // Another request in the same batch draws from its own stream.
                        sample(&LOGITS, &SamplingParams::default(), &[], &[], &mut other);
                    }
                    sample(&LOGITS, &p, &[], &[], &mut rng).token
                })
                .collect::<Vec<_>>()
        };
        let a = run(false);
        assert_eq!(a, run(true));
        assert!(a.iter().any(|&t| t != a[0]), "not a constant stream");
        assert_eq!(RequestRng::for_params(&p).seed(), 42);
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        let logits = [2.0, -2.0, 2.0, -2.0];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut l = logits.to_vec();
        let s = Sampler::new(vec![]);
        let r = s.sample(&mut l, &p, &[0, 0], &[1, 99], &mut RequestRng::new(0));
        assert!(r.is_ok());
        // Seen tokens 0 (positive: halved) and 1 (negative: doubled); 99 is out of vocab.
        assert_eq!(l, vec![1.0, -4.0, 2.0, -2.0]);
        assert_eq!(r.map(|r| r.token), Ok(2));
    }

    #[test]
    fn frequency_and_presence_penalties_openai_semantics() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..SamplingParams::greedy()
        };
        let mut l = vec![5.0, 5.0, 5.0];
        let r = Sampler::new(vec![]).sample(
            &mut l,
            &p,
            &[2, 2, 2],
            &[0, 0, 0, 1],
            &mut RequestRng::new(0),
        );
        // Token 0: 5 - 0.5*3 - 1; token 1: 5 - 0.5 - 1; the prompt's token 2 is not penalised.
        assert_eq!(l, vec![2.5, 3.5, 5.0]);
        assert_eq!(r.map(|r| r.token), Ok(2));
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_ids() {
        let sampler = Sampler::new(vec![0]);
        let logits = [9.0, 1.0, 8.0, 2.0];
        let p = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![2],
            ..SamplingParams::greedy()
        };
        let mut rng = RequestRng::new(0);
        let mut l = logits.to_vec();
        assert_eq!(
            sampler
                .sample(&mut l, &p, &[], &[5], &mut rng)
                .map(|s| s.token),
            Ok(3)
        );
        let mut l = logits.to_vec();
        assert_eq!(
            sampler
                .sample(&mut l, &p, &[], &[5, 5], &mut rng)
                .map(|s| s.token),
            Ok(0)
        );
        let ignore = SamplingParams {
            ignore_eos: true,
            ..p
        };
        let mut l = logits.to_vec();
        assert_eq!(
            sampler
                .sample(&mut l, &ignore, &[], &[], &mut rng)
                .map(|s| s.token),
            Ok(0)
        );
    }

    #[test]
    fn logprobs_are_before_temperature() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let want: Vec<f32> = logits.iter().map(|l| l - z.ln()).collect();
        for temperature in [0.0, 0.3, 2.0] {
            let p = SamplingParams {
                temperature,
                logprobs: Some(2),
                ..SamplingParams::default()
            };
            let s = sample(&logits, &p, &[], &[], &mut RequestRng::new(1));
            assert!((s.logprob - want[s.token as usize]).abs() < 1e-5);
            assert_eq!(s.top_logprobs.len(), 2);
            assert_eq!(s.top_logprobs[0].0, 2);
            assert_eq!(s.top_logprobs[1].0, 1);
            assert!((s.top_logprobs[0].1 - want[2]).abs() < 1e-5);
        }
        let s = sample(
            &logits,
            &SamplingParams::greedy(),
            &[],
            &[],
            &mut RequestRng::new(1),
        );
        assert!(s.top_logprobs.is_empty());
    }

    #[test]
    fn bad_logits_are_errors_not_panics() {
        let s = Sampler::new(vec![]);
        let p = SamplingParams::default();
        let mut rng = RequestRng::new(0);
        assert_eq!(
            s.sample(&mut [], &p, &[], &[], &mut rng),
            Err(SampleError::EmptyLogits)
        );
        let mut l = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(
            s.sample(&mut l, &p, &[], &[], &mut rng),
            Err(SampleError::NoFiniteLogit)
        );
        // NaN is treated as masked, +inf as the largest value.
        let mut l = [f32::NAN, 0.0, f32::INFINITY];
        assert_eq!(
            s.sample(&mut l, &p, &[], &[], &mut rng).map(|s| s.token),
            Ok(2)
        );
    }
}
