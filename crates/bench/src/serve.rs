//! `tandem bench serve`: a load generator for any OpenAI-compatible server, compatible with
//! `vllm bench serve` (same flag names, same summary block, same JSON key names).
//!
//! Every request streams (`stream: true`, `stream_options.include_usage`), and is timed on
//! the client:
//! - TTFT: from sending the request to the first SSE event that carries non-empty text
//!   (`choices[0].text`, or `choices[0].delta.content` / `reasoning_content` for chat);
//! - ITL: the gaps between successive non-empty text events (per event, so a server that
//!   sends several tokens per event shows fewer, longer gaps, as in vLLM);
//! - TPOT: `(e2el - ttft) / (output_tokens - 1)`, for requests with more than one token;
//! - E2EL: from sending the request to the end of the stream.
//!
//! Output token counts come from the final usage event (`completion_tokens`); a server that
//! sends none is counted one token per text event.
//!
//! Random prompts: the client has no tokenizer, so a prompt is a string of random common
//! English words. When the server answers `POST /tokenize` (`{"model", "prompt"}` ->
//! `{"count"}`, as tandem and vLLM do), the words per token are calibrated on two samples and
//! every prompt is then fitted to its target length with a few `/tokenize` round trips; the
//! prompt length recorded is the count the server measured. Without `/tokenize`, a prompt
//! gets one word per wanted token and its input length is taken from the server's usage
//! (`prompt_tokens`), falling back to that estimate.
//!
//! Arrivals follow a gamma process of rate `--request-rate` and shape `--burstiness` (1.0 =
//! Poisson), `inf` sends everything at once; `--max-concurrency` caps requests in flight
//! (arrivals queue on a semaphore, and the clock of a request starts when it is sent).
//! Before the run, the server is polled until it answers (`--ready-check-timeout-sec`) and
//! one test request must succeed.
//!
//! Structured output: `--json-schema FILE` asks every request for JSON valid against the
//! schema (chat: `response_format` `json_schema`, strict; completions: vLLM's
//! `structured_outputs.json`). `--compare-schema` measures what that costs, side by side in
//! one run: at each `--compare-concurrency`, rounds without and with the schema alternate
//! (A B A B, `--compare-rounds` pairs) on the same prompts and `max_tokens`; the report holds
//! each arm's output tokens/s, the ratio constrained / unconstrained, how the requests ended
//! (`stop` vs `length`: a schema may end a request before its `max_tokens`, which makes its
//! tokens/s less comparable), and the server's structured-output histograms (a token's mask
//! time, the step's wait for it, the commit; count, mean, p50, p99) scraped from `/metrics`
//! before and after each round.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::prom::{parse_histogram, Histogram, CONSTRAINT_HISTOGRAMS};
use crate::stats::percentile;
use crate::sysinfo::{unix_secs, utc_stamp};

/// The flags, boxed so that `BenchCmd` stays small.
#[derive(Args, Debug, Clone)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pub opts: Box<BenchServeOpts>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchServeOpts {
    /// Label recorded in the result (vLLM's `--backend`); `openai-chat` selects
    /// /v1/chat/completions when `--endpoint` is not given.
    #[arg(long, default_value = "openai")]
    pub backend: String,
    /// Server root, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT).
    #[arg(long)]
    pub base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API path: /v1/completions (default) or /v1/chat/completions (any path ending in
    /// chat/completions is sent chat requests).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Model id (default: the first id from GET /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Name sent in the requests' `model` field (default: `--model`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// `random` (default) or `custom` (default when `--dataset-path` is given).
    #[arg(long)]
    pub dataset_name: Option<String>,
    /// Prompts for `--dataset-name custom`: JSONL with a "prompt" field per line (optional
    /// "output_tokens"/"max_tokens"), or plain text, one prompt per non-empty line.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Prompt tokens per request (random dataset), before `--random-range-ratio`.
    #[arg(long, default_value_t = 128)]
    pub random_input_len: usize,
    /// Generated tokens per request (`max_tokens`, random dataset).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Tokens of one random prefix shared by all prompts (counted in the input length).
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,
    /// `max_tokens` for custom prompts that do not carry their own.
    #[arg(long, default_value_t = 256)]
    pub custom_output_len: usize,
    /// Keep the custom dataset's order (default: shuffled with `--seed`).
    #[arg(long)]
    pub disable_shuffle: bool,
    /// Requests per second (gamma/Poisson arrivals), or `inf` to send all at once.
    #[arg(long, default_value = "inf", value_parser = parse_rate)]
    pub request_rate: f64,
    /// Shape of the gamma arrival process: 1.0 = Poisson, lower = burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// At most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Send `ignore_eos: true`, so every request generates its `max_tokens`.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature sent with every request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<i64>,
    /// JSON object merged into every request body.
    #[arg(long)]
    pub extra_body: Option<String>,
    /// Seconds before one request counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Seconds to wait for the server to accept connections before the run.
    #[arg(long, default_value_t = 600.0)]
    pub ready_check_timeout_sec: f64,
    /// Comma-separated metrics to report: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl,e2el")]
    pub percentile_metrics: String,
    /// Comma-separated percentiles to report.
    #[arg(long, default_value = "90,99")]
    pub metric_percentiles: String,
    /// Do not draw the progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Write the result JSON (implied by `--result-filename`).
    #[arg(long)]
    pub save_result: bool,
    /// Also save the generated texts.
    #[arg(long)]
    pub save_detailed: bool,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    /// Default: {backend}-{rate}qps[-concurrency{C}]-{model}-{YYYYmmdd-HHMMSS}.json (UTC).
    #[arg(long)]
    pub result_filename: Option<String>,
    /// KEY=VALUE pairs added to the result JSON.
    #[arg(long, num_args = 1..)]
    pub metadata: Vec<String>,
    /// Do not call POST /tokenize to calibrate prompt lengths.
    #[arg(long)]
    pub no_tokenize: bool,
    /// Bearer token (default: the TANDEM_API_KEY, else the OPENAI_API_KEY environment
    /// variable).
    #[arg(long)]
    pub api_key: Option<String>,
    /// A JSON schema (file): every request asks for JSON valid against it (chat:
    /// `response_format: {type: json_schema, json_schema: {name: "bench", schema, strict:
    /// true}}`; completions: `structured_outputs: {json: schema}`).
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// Measure the cost of `--json-schema`: at each `--compare-concurrency`, rounds without
    /// and with the schema alternate on the same prompts and max_tokens; the JSON reports
    /// both output tokens/s, their ratio and the server's mask-time percentiles.
    #[arg(long, requires = "json_schema")]
    pub compare_schema: bool,
    /// `--compare-schema`: comma-separated client counts (max concurrency) to compare at.
    #[arg(long, default_value = "1,32")]
    pub compare_concurrency: String,
    /// `--compare-schema`: pairs of rounds (unconstrained, constrained) per client count.
    #[arg(long, default_value_t = 2)]
    pub compare_rounds: usize,
    /// `--compare-schema`: requests per client in one round (a round at C clients sends
    /// the first C x this many prompts; replaces `--num-prompts`).
    #[arg(long, default_value_t = 2)]
    pub compare_requests_per_client: usize,
}

fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "inf" || t == "infinity" {
        return Ok(f64::INFINITY);
    }
    match t.parse::<f64>() {
        Ok(r) if r > 0.0 => Ok(r),
        _ => Err(format!("expected a positive number or inf, got {s:?}")),
    }
}

pub fn run(a: BenchServeArgs) -> Result<()> {
    let a = *a.opts;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let result = rt.block_on(run_async(&a))?;
    if a.save_result || a.result_filename.is_some() {
        let path = result_path(&a, &result);
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("result saved to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiKind {
    Completions,
    Chat,
}

struct ReqCfg {
    url: String,
    kind: ApiKind,
    model: String,
    api_key: Option<String>,
    timeout: Duration,
    ignore_eos: bool,
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<i64>,
    extra_body: Map<String, Value>,
    /// `--json-schema`: the schema every request's output must match.
    schema: Option<Value>,
}

#[derive(Debug, Clone)]
struct SampleRequest {
    prompt: String,
    /// Prompt tokens, measured by /tokenize when `prompt_len_exact`, else estimated.
    prompt_len: usize,
    prompt_len_exact: bool,
    output_len: usize,
}

fn build_payload(cfg: &ReqCfg, req: &SampleRequest) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(cfg.model));
    match cfg.kind {
        ApiKind::Completions => {
            body.insert("prompt".into(), json!(req.prompt));
            body.insert("max_tokens".into(), json!(req.output_len));
        }
        ApiKind::Chat => {
            body.insert(
                "messages".into(),
                json!([{"role": "user", "content": req.prompt}]),
            );
            body.insert("max_completion_tokens".into(), json!(req.output_len));
        }
    }
    body.insert("temperature".into(), json!(cfg.temperature));
    if let Some(p) = cfg.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(k) = cfg.top_k {
        body.insert("top_k".into(), json!(k));
    }
    if cfg.ignore_eos {
        body.insert("ignore_eos".into(), json!(true));
    }
    if let Some(schema) = &cfg.schema {
        match cfg.kind {
            ApiKind::Chat => body.insert(
                "response_format".into(),
                json!({"type": "json_schema",
                       "json_schema": {"name": "bench", "schema": schema, "strict": true}}),
            ),
            ApiKind::Completions => {
                body.insert("structured_outputs".into(), json!({"json": schema}))
            }
        };
    }
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    for (k, v) in &cfg.extra_body {
        body.insert(k.clone(), v.clone());
    }
    Value::Object(body)
}

// ---------------------------------------------------------------------------------------
// SSE parsing

/// Incremental `text/event-stream` parser: feed it bytes, get back the `data` payloads of
/// the events completed so far (multi-line data joined with '\n', comments and other
/// fields ignored, CRLF accepted).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line(&line, &mut events);
        }
        events
    }

    /// End of stream: an unterminated last line and event still count.
    fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.buf.is_empty() {
            let mut line = std::mem::take(&mut self.buf);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.line(&line, &mut events);
        }
        self.line(&[], &mut events);
        events
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(self.data.join("\n"));
                self.data.clear();
            }
            return;
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&line[..], ""),
        };
        if field == "data" {
            self.data.push(value.to_string());
        }
    }
}

/// One SSE `data` payload of a completions or chat stream.
#[derive(Debug, PartialEq)]
enum StreamEvent {
    Done,
    Chunk {
        text: String,
        prompt_tokens: Option<usize>,
        completion_tokens: Option<usize>,
        /// `choices[0].finish_reason` when the event has one.
        finish_reason: Option<String>,
    },
}

fn parse_event(data: &str) -> Result<StreamEvent> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(StreamEvent::Done);
    }
    let v: Value = serde_json::from_str(data)
        .with_context(|| format!("malformed stream event: {}", truncate(data, 200)))?;
    if let Some(e) = v.get("error") {
        let msg = e
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string());
        bail!("error event in the stream: {msg}");
    }
    let mut text = String::new();
    let mut finish_reason = None;
    if let Some(c) = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    {
        finish_reason = c
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(t) = c.get("text").and_then(Value::as_str) {
            text.push_str(t);
        }
        if let Some(d) = c.get("delta") {
            for key in ["reasoning_content", "reasoning", "content"] {
                if let Some(t) = d.get(key).and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
        }
    }
    let usage = v.get("usage").filter(|u| !u.is_null());
    let count = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    };
    Ok(StreamEvent::Chunk {
        text,
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        finish_reason,
    })
}

/// What one streamed request produced, timed in seconds from its start.
#[derive(Debug, Default, Clone)]
struct StreamState {
    ttft: Option<f64>,
    last: f64,
    itl: Vec<f64>,
    text: String,
    text_events: usize,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
    finish_reason: Option<String>,
    done: bool,
}

impl StreamState {
    fn on_data(&mut self, data: &str, t: f64) -> Result<()> {
        match parse_event(data)? {
            StreamEvent::Done => self.done = true,
            StreamEvent::Chunk {
                text,
                prompt_tokens,
                completion_tokens,
                finish_reason,
            } => {
                if finish_reason.is_some() {
                    self.finish_reason = finish_reason;
                }
                if !text.is_empty() {
                    match self.ttft {
                        None => self.ttft = Some(t),
                        Some(_) => self.itl.push(t - self.last),
                    }
                    self.last = t;
                    self.text_events += 1;
                    self.text.push_str(&text);
                }
                if prompt_tokens.is_some() {
                    self.prompt_tokens = prompt_tokens;
                }
                if completion_tokens.is_some() {
                    self.completion_tokens = completion_tokens;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// One request

#[derive(Debug, Default, Clone)]
struct RequestOutput {
    success: bool,
    error: String,
    generated_text: String,
    prompt_len: usize,
    prompt_len_exact: bool,
    usage_prompt_tokens: Option<usize>,
    usage_completion_tokens: Option<usize>,
    /// The stream's `finish_reason` (`stop`, `length`, ...), when it sent one.
    finish_reason: Option<String>,
    text_events: usize,
    /// Seconds.
    ttft: f64,
    itl: Vec<f64>,
    latency: f64,
    /// Seconds from the benchmark's start to sending this request.
    start: f64,
}

impl RequestOutput {
    /// Prompt tokens: the /tokenize count when there was one, else the server's usage, else
    /// the estimate.
    fn input_len(&self) -> usize {
        if self.prompt_len_exact {
            self.prompt_len
        } else {
            self.usage_prompt_tokens.unwrap_or(self.prompt_len)
        }
    }

    /// Generated tokens: usage, else one per text event; 0 for a failed request.
    fn output_len(&self) -> usize {
        if !self.success {
            return 0;
        }
        self.usage_completion_tokens.unwrap_or(self.text_events)
    }
}

async fn send_request(
    client: &reqwest::Client,
    cfg: &ReqCfg,
    req: &SampleRequest,
    bench_start: Instant,
) -> RequestOutput {
    let st = Instant::now();
    let mut state = StreamState::default();
    let r = tokio::time::timeout(cfg.timeout, stream_one(client, cfg, req, st, &mut state)).await;
    let latency = st.elapsed().as_secs_f64();
    let mut out = RequestOutput {
        prompt_len: req.prompt_len,
        prompt_len_exact: req.prompt_len_exact,
        start: st.duration_since(bench_start).as_secs_f64(),
        latency,
        ..Default::default()
    };
    match r {
        Err(_) => out.error = format!("timed out after {:.1} s", cfg.timeout.as_secs_f64()),
        Ok(Err(e)) => out.error = format!("{e:#}"),
        Ok(Ok(())) => match state.ttft {
            None => out.error = "the stream carried no text".into(),
            Some(t) => {
                out.success = true;
                out.ttft = t;
            }
        },
    }
    out.itl = state.itl;
    out.generated_text = state.text;
    out.text_events = state.text_events;
    out.usage_prompt_tokens = state.prompt_tokens;
    out.usage_completion_tokens = state.completion_tokens;
    out.finish_reason = state.finish_reason;
    out
}

async fn stream_one(
    client: &reqwest::Client,
    cfg: &ReqCfg,
    req: &SampleRequest,
    st: Instant,
    state: &mut StreamState,
) -> Result<()> {
    let mut rb = client.post(&cfg.url).json(&build_payload(cfg, req));
    if let Some(k) = &cfg.api_key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.map_err(|e| anyhow!("sending: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {}", truncate(body.trim(), 500));
    }
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow!("reading the stream: {e}"))?;
        let t = st.elapsed().as_secs_f64();
        for data in parser.feed(&chunk) {
            state.on_data(&data, t)?;
        }
        if state.done {
            return Ok(());
        }
    }
    let t = st.elapsed().as_secs_f64();
    for data in parser.finish() {
        state.on_data(&data, t)?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

// ---------------------------------------------------------------------------------------
// Arrivals

/// Send times in seconds from the start: the first at 0, then gamma-distributed gaps of
/// mean 1/rate (shape `burstiness`, 1.0 = exponential, i.e. Poisson arrivals); all 0 when
/// the rate is infinite.
fn arrival_offsets(n: usize, rate: f64, burstiness: f64, rng: &mut StdRng) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut t = 0.0;
    for i in 0..n {
        if i > 0 && rate.is_finite() {
            t += sample_gamma(rng, burstiness, 1.0 / (rate * burstiness));
        }
        out.push(t);
    }
    out
}

fn sample_normal(rng: &mut StdRng) -> f64 {
    // Box-Muller.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gamma(shape, scale) by Marsaglia-Tsang (shape < 1 boosted by u^(1/shape)).
fn sample_gamma(rng: &mut StdRng, shape: f64, scale: f64) -> f64 {
    if (shape - 1.0).abs() < 1e-12 {
        return -(1.0 - rng.random::<f64>()).ln() * scale;
    }
    if shape < 1.0 {
        let u: f64 = 1.0 - rng.random::<f64>();
        return sample_gamma(rng, shape + 1.0, scale) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = sample_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = 1.0 - rng.random::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v * scale;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Datasets

/// Common English words, one token each in most BPE vocabularies.
const WORDS_TEXT: &str = "\
    the of and to in is that for it as was with be by on not he this are or his from at \
    which but have an had they you were their one all we can her has there been if more \
    when will would who so no time people year way day man thing woman life child world \
    school state family student group country problem hand part place case week company \
    system program question work number night point home water room mother area money \
    story fact month lot right study book eye job word business issue side kind head \
    house service friend father power hour game line end member law car city name team \
    minute idea kid body back parent face others level office door health person art \
    war history party result change morning reason research girl guy moment air teacher \
    force education good new first last long great little own other old big high \
    different small large next early young important few public bad same able make know \
    take see come think look want give use find tell ask seem feel try leave call river \
    stone light green";

static WORDS: std::sync::LazyLock<Vec<&str>> =
    std::sync::LazyLock::new(|| WORDS_TEXT.split_whitespace().collect());

fn random_words(rng: &mut StdRng, n: usize) -> Vec<&'static str> {
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect()
}

/// (input_len, output_len) per request, each uniform in [len * (1 - r), len * (1 + r)]
/// (truncated, as vLLM does), at least 1.
fn random_lengths(
    rng: &mut StdRng,
    n: usize,
    input_len: usize,
    output_len: usize,
    ratio: f64,
) -> Vec<(usize, usize)> {
    let range = |len: usize| {
        let lo = ((len as f64 * (1.0 - ratio)) as usize).max(1);
        let hi = ((len as f64 * (1.0 + ratio)) as usize).max(lo);
        (lo, hi)
    };
    let (il, ih) = range(input_len);
    let (ol, oh) = range(output_len);
    (0..n)
        .map(|_| (rng.random_range(il..=ih), rng.random_range(ol..=oh)))
        .collect()
}

/// Prompts (with an optional own output length) from JSONL (`{"prompt": ...}`) or plain
/// text lines.
fn parse_custom(text: &str) -> Result<Vec<(String, Option<usize>)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("line {}: bad JSON", i + 1))?;
            let prompt = v
                .get("prompt")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("line {}: no string \"prompt\" field", i + 1))?;
            let out_len = ["output_tokens", "max_tokens", "output_len"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_u64))
                .map(|n| n as usize);
            out.push((prompt.to_string(), out_len));
        } else {
            out.push((line.to_string(), None));
        }
    }
    Ok(out)
}

/// `POST /tokenize` client used to measure prompts.
#[derive(Clone)]
struct TokenCounter {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
}

impl TokenCounter {
    async fn count(&self, text: &str) -> Result<usize> {
        let mut rb = self
            .client
            .post(&self.url)
            .json(&json!({"model": self.model, "prompt": text}))
            .timeout(Duration::from_secs(60));
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = rb.send().await?;
        let status = resp.status();
        if !status.is_success() {
            bail!("HTTP {status}");
        }
        let v: Value = resp.json().await?;
        v.get("count")
            .and_then(Value::as_u64)
            .or_else(|| {
                v.get("tokens")
                    .and_then(Value::as_array)
                    .map(|t| t.len() as u64)
            })
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("no \"count\" in the /tokenize answer"))
    }
}

/// Tokens per word and fixed overhead (e.g. BOS) of the server's tokenizer on random words.
async fn calibrate(tc: &TokenCounter, rng: &mut StdRng) -> Result<(f64, f64)> {
    let a = random_words(rng, 200).join(" ");
    let b = random_words(rng, 1000).join(" ");
    let (ca, cb) = (tc.count(&a).await?, tc.count(&b).await?);
    let slope = (cb as f64 - ca as f64) / 800.0;
    if slope <= 0.0 {
        bail!("/tokenize counts do not grow with the text ({ca}, {cb})");
    }
    Ok((slope, ca as f64 - slope * 200.0))
}

/// Picks how many of `words` (after `prefix`) make a prompt of `target` tokens: a few
/// Newton steps on the calibrated slope; returns the text and its measured count.
async fn fit_prompt(
    tc: &TokenCounter,
    prefix: &str,
    prefix_tokens: f64,
    words: &[&str],
    target: usize,
    slope: f64,
    intercept: f64,
) -> Result<(String, usize)> {
    let make = |w: usize| {
        let body = words[..w].join(" ");
        if prefix.is_empty() {
            body
        } else {
            format!("{prefix} {body}")
        }
    };
    let guess = (target as f64 - intercept - prefix_tokens) / slope;
    let mut w = (guess.round().max(1.0) as usize).min(words.len());
    let mut best: Option<(usize, String, usize)> = None;
    let mut tried = Vec::new();
    for _ in 0..8 {
        tried.push(w);
        let text = make(w);
        let c = tc.count(&text).await?;
        let dist = c.abs_diff(target);
        if best.as_ref().is_none_or(|b| dist < b.0) {
            best = Some((dist, text, c));
        }
        if c == target {
            break;
        }
        let delta = target as f64 - c as f64;
        let mut step = (delta / slope).round() as i64;
        if step == 0 {
            step = delta.signum() as i64;
        }
        let next = (w as i64 + step).clamp(1, words.len() as i64) as usize;
        if tried.contains(&next) {
            break;
        }
        w = next;
    }
    let (_, text, c) = best.expect("at least one try");
    Ok((text, c))
}

async fn build_requests(
    a: &BenchServeOpts,
    tc: Option<&TokenCounter>,
    rng: &mut StdRng,
) -> Result<Vec<SampleRequest>> {
    let dataset = a.dataset_name.clone().unwrap_or_else(|| {
        if a.dataset_path.is_some() {
            "custom".into()
        } else {
            "random".into()
        }
    });
    match dataset.as_str() {
        "random" => build_random(a, tc, rng).await,
        "custom" => build_custom(a, tc, rng).await,
        other => bail!("unknown --dataset-name {other:?} (random or custom)"),
    }
}

async fn build_random(
    a: &BenchServeOpts,
    tc: Option<&TokenCounter>,
    rng: &mut StdRng,
) -> Result<Vec<SampleRequest>> {
    if !(0.0..1.0).contains(&a.random_range_ratio) {
        bail!("--random-range-ratio must be in [0, 1)");
    }
    let lens = random_lengths(
        rng,
        a.num_prompts,
        a.random_input_len,
        a.random_output_len,
        a.random_range_ratio,
    );
    let seeds: Vec<u64> = (0..a.num_prompts).map(|_| rng.random()).collect();
    let calib = match tc {
        Some(tc) => match calibrate(tc, rng).await {
            Ok(c) => Some((tc.clone(), c)),
            Err(e) => {
                eprintln!(
                    "note: POST /tokenize unavailable ({e:#}); random prompts use one word per \
                     token and input lengths come from the server's usage"
                );
                None
            }
        },
        None => None,
    };
    // The shared prefix, fitted on its own.
    let prefix = if a.random_prefix_len == 0 {
        String::new()
    } else {
        let words = random_words(rng, a.random_prefix_len * 4 + 16);
        match &calib {
            Some((tc, (s, i))) => {
                let target = a.random_prefix_len + i.round().max(0.0) as usize;
                fit_prompt(tc, "", 0.0, &words, target, *s, *i).await?.0
            }
            None => words[..a.random_prefix_len].join(" "),
        }
    };
    // Tokens the prefix adds inside a prompt (its count less the fixed overhead).
    let prefix_tokens = match (&calib, prefix.is_empty()) {
        (Some((tc, (_, i))), false) => tc.count(&prefix).await? as f64 - i,
        _ => 0.0,
    };
    let prefix = Arc::new(prefix);
    let jobs = lens.into_iter().zip(seeds).map(|((il, ol), seed)| {
        let calib = calib.clone();
        let prefix = prefix.clone();
        let target = il + a.random_prefix_len;
        async move {
            let mut r = StdRng::seed_from_u64(seed);
            let words = random_words(&mut r, target * 4 + 16);
            match calib {
                Some((tc, (s, i))) => {
                    // The server's count (special tokens included) is fitted to the target.
                    let (prompt, n) =
                        fit_prompt(&tc, &prefix, prefix_tokens, &words, target, s, i).await?;
                    Ok::<_, anyhow::Error>(SampleRequest {
                        prompt,
                        prompt_len: n,
                        prompt_len_exact: true,
                        output_len: ol,
                    })
                }
                None => {
                    let body = words[..il].join(" ");
                    let prompt = if prefix.is_empty() {
                        body
                    } else {
                        format!("{prefix} {body}")
                    };
                    Ok(SampleRequest {
                        prompt,
                        prompt_len: target,
                        prompt_len_exact: false,
                        output_len: ol,
                    })
                }
            }
        }
    });
    futures_util::stream::iter(jobs)
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn build_custom(
    a: &BenchServeOpts,
    tc: Option<&TokenCounter>,
    rng: &mut StdRng,
) -> Result<Vec<SampleRequest>> {
    let path = a
        .dataset_path
        .as_ref()
        .ok_or_else(|| anyhow!("--dataset-name custom needs --dataset-path"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut items = parse_custom(&text).with_context(|| format!("parsing {}", path.display()))?;
    if items.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    if !a.disable_shuffle {
        items.shuffle(rng);
    }
    let picked: Vec<(String, usize)> = (0..a.num_prompts)
        .map(|i| {
            let (p, o) = &items[i % items.len()];
            (p.clone(), o.unwrap_or(a.custom_output_len))
        })
        .collect();
    let mut tc = tc.cloned();
    if let Some(t) = &tc {
        if let Err(e) = t.count(&picked[0].0).await {
            eprintln!(
                "note: POST /tokenize unavailable ({e:#}); input lengths come from the \
                 server's usage"
            );
            tc = None;
        }
    }
    let jobs = picked.into_iter().map(|(prompt, output_len)| {
        let tc = tc.clone();
        async move {
            let (prompt_len, exact) = match tc {
                Some(tc) => (tc.count(&prompt).await?, true),
                None => (prompt.split_whitespace().count(), false),
            };
            Ok::<_, anyhow::Error>(SampleRequest {
                prompt,
                prompt_len,
                prompt_len_exact: exact,
                output_len,
            })
        }
    });
    futures_util::stream::iter(jobs)
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Metrics

#[derive(Debug, Clone, PartialEq)]
struct Stats {
    mean: f64,
    median: f64,
    std: f64,
    percentiles: Vec<(f64, f64)>,
}

/// Mean, median, population std and the given percentiles; all 0 for no values.
fn stats(values: &[f64], ps: &[f64]) -> Stats {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / n
    };
    let std = if v.is_empty() {
        0.0
    } else {
        (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt()
    };
    Stats {
        mean,
        median: percentile(&v, 50.0),
        std,
        percentiles: ps.iter().map(|&p| (p, percentile(&v, p))).collect(),
    }
}

#[derive(Debug)]
struct Metrics {
    completed: usize,
    failed: usize,
    total_input: usize,
    total_output: usize,
    request_throughput: f64,
    output_throughput: f64,
    total_token_throughput: f64,
    max_output_tokens_per_s: f64,
    max_concurrent_requests: usize,
    /// Milliseconds, successful requests only.
    ttfts_ms: Vec<f64>,
    tpots_ms: Vec<f64>,
    itls_ms: Vec<f64>,
    e2els_ms: Vec<f64>,
}

fn calculate_metrics(outputs: &[RequestOutput], duration: f64) -> Metrics {
    let mut m = Metrics {
        completed: 0,
        failed: 0,
        total_input: 0,
        total_output: 0,
        request_throughput: 0.0,
        output_throughput: 0.0,
        total_token_throughput: 0.0,
        max_output_tokens_per_s: 0.0,
        max_concurrent_requests: 0,
        ttfts_ms: vec![],
        tpots_ms: vec![],
        itls_ms: vec![],
        e2els_ms: vec![],
    };
    // Tokens per one-second bucket of the run, spread evenly over a request's text events.
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for o in outputs {
        if !o.success {
            m.failed += 1;
            continue;
        }
        m.completed += 1;
        let out_len = o.output_len();
        m.total_input += o.input_len();
        m.total_output += out_len;
        m.ttfts_ms.push(o.ttft * 1e3);
        m.e2els_ms.push(o.latency * 1e3);
        m.itls_ms.extend(o.itl.iter().map(|x| x * 1e3));
        if out_len > 1 {
            m.tpots_ms
                .push((o.latency - o.ttft) / (out_len - 1) as f64 * 1e3);
        }
        let per_event = out_len as f64 / (o.itl.len() + 1) as f64;
        let mut t = o.start + o.ttft;
        *buckets.entry(t.max(0.0) as u64).or_default() += per_event;
        for gap in &o.itl {
            t += gap;
            *buckets.entry(t.max(0.0) as u64).or_default() += per_event;
        }
    }
    m.max_output_tokens_per_s = buckets.values().copied().fold(0.0, f64::max);
    // Most requests in flight at once (ends before starts at equal times).
    let mut edges: Vec<(f64, i32)> = outputs
        .iter()
        .flat_map(|o| [(o.start, 1), (o.start + o.latency, -1)])
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut cur = 0i64;
    for (_, d) in edges {
        cur += d as i64;
        m.max_concurrent_requests = m.max_concurrent_requests.max(cur.max(0) as usize);
    }
    if duration > 0.0 {
        m.request_throughput = m.completed as f64 / duration;
        m.output_throughput = m.total_output as f64 / duration;
        m.total_token_throughput = (m.total_input + m.total_output) as f64 / duration;
    }
    m
}

const METRICS: [(&str, &str, &str); 4] = [
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
];

fn pct_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

fn metric_values<'a>(m: &'a Metrics, key: &str) -> &'a [f64] {
    match key {
        "ttft" => &m.ttfts_ms,
        "tpot" => &m.tpots_ms,
        "itl" => &m.itls_ms,
        _ => &m.e2els_ms,
    }
}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_ascii_lowercase())
        .filter(|x| !x.is_empty())
        .collect()
}

fn rate_str(rate: f64) -> String {
    if rate.is_finite() {
        format!("{rate:?}")
    } else {
        "inf".into()
    }
}

/// The summary block, laid out like vLLM's.
fn format_summary(
    m: &Metrics,
    duration: f64,
    max_concurrency: Option<usize>,
    selected: &[String],
    ps: &[f64],
) -> String {
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("{k:<40} {v:<10}\n"));
    let f2 = |x: f64| format!("{x:.2}");
    let mut out = format!("{:=^50}\n", " Serving Benchmark Result ");
    row("Successful requests:", m.completed.to_string());
    row("Failed requests:", m.failed.to_string());
    if let Some(c) = max_concurrency {
        row("Maximum request concurrency:", c.to_string());
    }
    row("Benchmark duration (s):", f2(duration));
    row("Total input tokens:", m.total_input.to_string());
    row("Total generated tokens:", m.total_output.to_string());
    row("Request throughput (req/s):", f2(m.request_throughput));
    row("Output token throughput (tok/s):", f2(m.output_throughput));
    row(
        "Peak output token throughput (tok/s):",
        f2(m.max_output_tokens_per_s),
    );
    row(
        "Peak concurrent requests:",
        f2(m.max_concurrent_requests as f64),
    );
    row(
        "Total Token throughput (tok/s):",
        f2(m.total_token_throughput),
    );
    for (key, short, title) in METRICS {
        if !selected.iter().any(|x| x == key) {
            continue;
        }
        let st = stats(metric_values(m, key), ps);
        s.push_str(&format!("{:-^50}\n", title));
        let mut row = |k: String, v: f64| s.push_str(&format!("{k:<40} {v:<10.2}\n"));
        row(format!("Mean {short} (ms):"), st.mean);
        row(format!("Median {short} (ms):"), st.median);
        for (p, v) in st.percentiles {
            row(format!("P{} {short} (ms):", pct_word(p)), v);
        }
    }
    out.push_str(&s);
    out.push_str(&"=".repeat(50));
    out.push('\n');
    out
}

#[allow(clippy::too_many_arguments)]
fn result_json(
    a: &BenchServeOpts,
    model_id: &str,
    outputs: &[RequestOutput],
    m: &Metrics,
    duration: f64,
    selected: &[String],
    ps: &[f64],
    date: &str,
) -> Result<Value> {
    let mut r = Map::new();
    r.insert("date".into(), json!(date));
    r.insert("backend".into(), json!(a.backend));
    r.insert("model_id".into(), json!(model_id));
    r.insert("tokenizer_id".into(), json!(model_id));
    r.insert("num_prompts".into(), json!(a.num_prompts));
    r.insert(
        "request_rate".into(),
        if a.request_rate.is_finite() {
            json!(a.request_rate)
        } else {
            json!("inf")
        },
    );
    r.insert("burstiness".into(), json!(a.burstiness));
    r.insert("max_concurrency".into(), json!(a.max_concurrency));
    r.insert("duration".into(), json!(duration));
    r.insert("completed".into(), json!(m.completed));
    r.insert("failed".into(), json!(m.failed));
    r.insert("total_input_tokens".into(), json!(m.total_input));
    r.insert("total_output_tokens".into(), json!(m.total_output));
    r.insert("request_throughput".into(), json!(m.request_throughput));
    r.insert("request_goodput".into(), Value::Null);
    r.insert("output_throughput".into(), json!(m.output_throughput));
    r.insert(
        "total_token_throughput".into(),
        json!(m.total_token_throughput),
    );
    r.insert(
        "max_output_tokens_per_s".into(),
        json!(m.max_output_tokens_per_s),
    );
    r.insert(
        "max_concurrent_requests".into(),
        json!(m.max_concurrent_requests),
    );
    r.insert(
        "input_lens".into(),
        json!(outputs.iter().map(|o| o.input_len()).collect::<Vec<_>>()),
    );
    r.insert(
        "output_lens".into(),
        json!(outputs.iter().map(|o| o.output_len()).collect::<Vec<_>>()),
    );
    r.insert(
        "ttfts".into(),
        json!(outputs.iter().map(|o| o.ttft).collect::<Vec<_>>()),
    );
    r.insert(
        "itls".into(),
        json!(outputs.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()),
    );
    r.insert(
        "errors".into(),
        json!(outputs.iter().map(|o| o.error.clone()).collect::<Vec<_>>()),
    );
    r.insert("finish_reasons".into(), json!(finish_counts(outputs)));
    if a.save_detailed {
        r.insert(
            "generated_texts".into(),
            json!(outputs
                .iter()
                .map(|o| o.generated_text.clone())
                .collect::<Vec<_>>()),
        );
    }
    for (key, _, _) in METRICS {
        if !selected.iter().any(|x| x == key) {
            continue;
        }
        let st = stats(metric_values(m, key), ps);
        r.insert(format!("mean_{key}_ms"), json!(st.mean));
        r.insert(format!("median_{key}_ms"), json!(st.median));
        r.insert(format!("std_{key}_ms"), json!(st.std));
        for (p, v) in st.percentiles {
            r.insert(format!("p{}_{key}_ms", pct_word(p)), json!(v));
        }
    }
    for kv in &a.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--metadata wants KEY=VALUE, got {kv:?}"))?;
        r.insert(k.to_string(), json!(v));
    }
    Ok(Value::Object(r))
}

/// How many successful requests ended with each `finish_reason` (`none` when the stream
/// sent none).
fn finish_counts(outputs: &[RequestOutput]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in outputs.iter().filter(|o| o.success) {
        *m.entry(o.finish_reason.clone().unwrap_or_else(|| "none".into()))
            .or_default() += 1;
    }
    m
}

fn result_path(a: &BenchServeOpts, result: &Value) -> PathBuf {
    let name = a.result_filename.clone().unwrap_or_else(|| {
        let model = result["model_id"].as_str().unwrap_or("model");
        let base = model.rsplit('/').next().unwrap_or(model);
        let conc = a
            .max_concurrency
            .map(|c| format!("-concurrency{c}"))
            .unwrap_or_default();
        format!(
            "{}-{}qps{conc}-{base}-{}.json",
            a.backend,
            rate_str(a.request_rate),
            result["date"].as_str().unwrap_or("")
        )
    });
    match &a.result_dir {
        Some(d) => d.join(name),
        None => Path::new(&name).to_path_buf(),
    }
}

// ---------------------------------------------------------------------------------------
// The run

/// Polls GET /v1/models until the server answers (any HTTP status) or the deadline passes;
/// returns the first model id when there is one.
async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let url = format!("{base}/v1/models");
    loop {
        let mut rb = client.get(&url).timeout(Duration::from_secs(30));
        if let Some(k) = api_key {
            rb = rb.bearer_auth(k);
        }
        match rb.send().await {
            Ok(resp) => {
                if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
                    bail!(
                        "GET {url} answered 401: the server needs an API key (--api-key or \
                         TANDEM_API_KEY) and {}",
                        if api_key.is_some() {
                            "this one is wrong"
                        } else {
                            "none was given"
                        }
                    );
                }
                if !resp.status().is_success() {
                    return Ok(None);
                }
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                return Ok(v["data"][0]["id"].as_str().map(str::to_string));
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    bail!("the server at {base} did not answer: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn progress(a: &BenchServeOpts, n: usize) -> ProgressBar {
    if a.disable_tqdm {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(n as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:40.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    }
}

/// Sends `requests` at their arrival `offsets` (seconds), at most `max_concurrency` in
/// flight; returns their outputs in order and the run's duration in seconds.
async fn run_requests(
    client: &reqwest::Client,
    cfg: &Arc<ReqCfg>,
    requests: &[SampleRequest],
    offsets: &[f64],
    max_concurrency: Option<usize>,
    pb: ProgressBar,
) -> (Vec<RequestOutput>, f64) {
    let sem = max_concurrency.map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(requests.len());
    for (req, off) in requests.iter().cloned().zip(offsets) {
        let at = start + Duration::from_secs_f64(*off);
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let (client, cfg, sem, pb) = (client.clone(), cfg.clone(), sem.clone(), pb.clone());
        handles.push(tokio::spawn(async move {
            let _permit = match sem {
                Some(s) => s.acquire_owned().await.ok(),
                None => None,
            };
            let out = send_request(&client, &cfg, &req, start).await;
            pb.inc(1);
            out
        }));
    }
    let mut outputs = Vec::with_capacity(handles.len());
    for (h, req) in handles.into_iter().zip(requests) {
        outputs.push(h.await.unwrap_or_else(|e| RequestOutput {
            error: format!("request task failed: {e}"),
            prompt_len: req.prompt_len,
            prompt_len_exact: req.prompt_len_exact,
            ..Default::default()
        }));
    }
    let duration = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    (outputs, duration)
}

/// One request before the benchmark (its failure stops it), then the run's settings.
async fn test_run(
    a: &BenchServeOpts,
    client: &reqwest::Client,
    cfg: &ReqCfg,
    first: &SampleRequest,
) -> Result<()> {
    eprintln!("starting the initial single-prompt test run...");
    let test = send_request(client, cfg, first, Instant::now()).await;
    if !test.success {
        bail!(
            "the initial test request to {} failed: {}",
            cfg.url,
            test.error
        );
    }
    eprintln!("test run completed; starting the benchmark");
    eprintln!("Traffic request rate: {}", rate_str(a.request_rate));
    eprintln!(
        "Burstiness factor: {:?}{}",
        a.burstiness,
        if a.burstiness == 1.0 {
            " (Poisson process)"
        } else {
            ""
        }
    );
    eprintln!(
        "Maximum request concurrency: {}",
        a.max_concurrency
            .map(|c| c.to_string())
            .unwrap_or_else(|| "None".into())
    );
    Ok(())
}

/// The failed requests' error messages with their counts (the first ten by text).
fn print_failures(outputs: &[RequestOutput], failed: usize) {
    if failed > 0 {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in outputs.iter().filter(|o| !o.success) {
            *counts.entry(o.error.as_str()).or_default() += 1;
        }
        eprintln!("{failed} request(s) failed:");
        for (e, n) in counts.iter().take(10) {
            eprintln!("  {n} x {}", truncate(e, 300));
        }
        if counts.len() > 10 {
            eprintln!("  ... and {} other error message(s)", counts.len() - 10);
        }
    }
}

/// The options of [`run_async`] checked and parsed before anything is sent.
struct Checked {
    selected: Vec<String>,
    ps: Vec<f64>,
    schema: Option<Value>,
    compare: Option<Vec<usize>>,
    extra_body: Map<String, Value>,
}

fn check_opts(a: &BenchServeOpts) -> Result<Checked> {
    if a.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    if a.burstiness <= 0.0 {
        bail!("--burstiness must be positive");
    }
    if a.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    let selected = parse_list(&a.percentile_metrics);
    for m in &selected {
        if !METRICS.iter().any(|(k, _, _)| k == m) {
            bail!("unknown metric {m:?} in --percentile-metrics (ttft, tpot, itl, e2el)");
        }
    }
    let ps = parse_list(&a.metric_percentiles)
        .iter()
        .map(|p| match p.parse::<f64>() {
            Ok(x) if (0.0..=100.0).contains(&x) => Ok(x),
            _ => Err(anyhow!("bad percentile {p:?} in --metric-percentiles")),
        })
        .collect::<Result<Vec<f64>>>()?;
    let schema = match &a.json_schema {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --json-schema {}", p.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("--json-schema {} is not JSON", p.display()))?;
            if !v.is_object() {
                bail!("--json-schema {} must hold a JSON object", p.display());
            }
            Some(v)
        }
    };
    let compare = if a.compare_schema {
        if a.compare_rounds == 0 || a.compare_requests_per_client == 0 {
            bail!("--compare-rounds and --compare-requests-per-client must be at least 1");
        }
        let cs = parse_list(&a.compare_concurrency)
            .iter()
            .map(|c| match c.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(anyhow!("bad client count {c:?} in --compare-concurrency")),
            })
            .collect::<Result<Vec<usize>>>()?;
        if cs.is_empty() {
            bail!("--compare-concurrency lists no client count");
        }
        Some(cs)
    } else {
        None
    };
    let extra_body = match &a.extra_body {
        None => Map::new(),
        Some(s) => match serde_json::from_str(s).context("--extra-body")? {
            Value::Object(m) => m,
            _ => bail!("--extra-body must be a JSON object"),
        },
    };
    Ok(Checked {
        selected,
        ps,
        schema,
        compare,
        extra_body,
    })
}

async fn run_async(a: &BenchServeOpts) -> Result<Value> {
    let Checked {
        selected,
        ps,
        schema,
        compare,
        extra_body,
    } = check_opts(a)?;
    let base = a
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{}:{}", a.host, a.port))
        .trim_end_matches('/')
        .to_string();
    let endpoint = a.endpoint.clone().unwrap_or_else(|| {
        if a.backend == "openai-chat" {
            "/v1/chat/completions".into()
        } else {
            "/v1/completions".into()
        }
    });
    let kind = if endpoint.trim_end_matches('/').ends_with("chat/completions") {
        ApiKind::Chat
    } else {
        ApiKind::Completions
    };
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("TANDEM_API_KEY").ok())
        .or_else(|| std::env::var("OPENAI_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(30))
        .build()?;

    let first_model = wait_ready(
        &client,
        &base,
        api_key.as_deref(),
        Duration::from_secs_f64(a.ready_check_timeout_sec.max(0.0)),
    )
    .await?;
    let model_id = match (&a.model, first_model) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m,
        (None, None) => bail!("GET {base}/v1/models listed no model: pass --model"),
    };
    let served = a.served_model_name.clone().unwrap_or(model_id.clone());
    let cfg = Arc::new(ReqCfg {
        url: format!("{base}{endpoint}"),
        kind,
        model: served.clone(),
        api_key: api_key.clone(),
        timeout: Duration::from_secs_f64(a.request_timeout.max(0.001)),
        ignore_eos: a.ignore_eos,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        extra_body,
        schema,
    });

    let mut rng = StdRng::seed_from_u64(a.seed);
    let tc = (!a.no_tokenize).then(|| TokenCounter {
        client: client.clone(),
        url: format!("{base}/tokenize"),
        model: served.clone(),
        api_key: api_key.clone(),
    });
    if let Some(cs) = &compare {
        let mut a = a.clone();
        a.num_prompts = cs.iter().max().copied().unwrap_or(1) * a.compare_requests_per_client;
        eprintln!("building {} prompts...", a.num_prompts);
        let requests = build_requests(&a, tc.as_ref(), &mut rng).await?;
        return run_compare(&a, &client, &base, &model_id, &cfg, cs, &requests, &mut rng).await;
    }
    eprintln!("building {} prompts...", a.num_prompts);
    let requests = build_requests(a, tc.as_ref(), &mut rng).await?;
    let offsets = arrival_offsets(requests.len(), a.request_rate, a.burstiness, &mut rng);

    test_run(a, &client, &cfg, &requests[0]).await?;

    let (outputs, duration) = run_requests(
        &client,
        &cfg,
        &requests,
        &offsets,
        a.max_concurrency,
        progress(a, requests.len()),
    )
    .await;

    let m = calculate_metrics(&outputs, duration);
    print_failures(&outputs, m.failed);
    print!(
        "{}",
        format_summary(&m, duration, a.max_concurrency, &selected, &ps)
    );
    let secs = unix_secs();
    result_json(
        a,
        &model_id,
        &outputs,
        &m,
        duration,
        &selected,
        &ps,
        &utc_stamp(secs),
    )
}

// ---------------------------------------------------------------------------------------
// --compare-schema

/// The text of `GET /metrics`, `None` when the server does not answer it.
async fn scrape(client: &reqwest::Client, base: &str, api_key: Option<&str>) -> Option<String> {
    let mut rb = client
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(30));
    if let Some(k) = api_key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

/// The constraint histograms of a scrape (empty ones where the page has none).
fn constraint_histograms(page: &str) -> [Histogram; 3] {
    CONSTRAINT_HISTOGRAMS.map(|n| parse_histogram(page, n).unwrap_or_default())
}

/// One arm (with or without the schema) over its rounds at one client count.
#[derive(Default)]
struct Arm {
    duration: f64,
    output_tokens: usize,
    completed: usize,
    failed: usize,
    finish: BTreeMap<String, usize>,
    /// The rounds' output tokens/s, in order.
    rates: Vec<f64>,
    /// The server's constraint histograms, summed over this arm's rounds.
    hist: [Histogram; 3],
}

impl Arm {
    /// Output tokens / seconds over all its rounds.
    fn throughput(&self) -> f64 {
        if self.duration > 0.0 {
            self.output_tokens as f64 / self.duration
        } else {
            0.0
        }
    }

    fn json(&self) -> Value {
        let mut hist = Map::new();
        for (n, h) in CONSTRAINT_HISTOGRAMS.iter().zip(&self.hist) {
            let key = n.trim_start_matches("tandem_constraint_");
            hist.insert(key.into(), h.summary());
        }
        json!({
            "output_throughput": self.throughput(),
            "round_output_throughputs": self.rates,
            "total_output_tokens": self.output_tokens,
            "duration": self.duration,
            "completed": self.completed,
            "failed": self.failed,
            "finish_reasons": self.finish,
            "constraint": hist,
        })
    }
}

/// `--compare-schema`: at each client count in `concurrency`, one warm-up round (with the
/// schema, not counted), then `--compare-rounds` pairs of rounds, unconstrained then
/// constrained, each sending the first `C x
/// --compare-requests-per-client` of `requests` (the same prompts and `max_tokens` in both
/// arms); `/metrics` is scraped around every round.
#[allow(clippy::too_many_arguments)]
async fn run_compare(
    a: &BenchServeOpts,
    client: &reqwest::Client,
    base: &str,
    model_id: &str,
    constrained: &Arc<ReqCfg>,
    concurrency: &[usize],
    requests: &[SampleRequest],
    rng: &mut StdRng,
) -> Result<Value> {
    let plain = unconstrained(constrained);
    compare_test_runs(client, [&plain, constrained], &requests[0]).await?;
    let mut comparisons = Vec::new();
    let mut summary = compare_summary_header();
    let mut missing_metrics = false;
    let ctx = CompareCtx {
        a,
        client,
        base,
        arms: [&plain, constrained],
    };
    for &c in concurrency {
        let (line, comparison) = compare_at(&ctx, c, requests, rng, &mut missing_metrics).await;
        summary.push_str(&line);
        comparisons.push(comparison);
    }
    summary.push_str("(mask and wait: milliseconds per constrained token, from /metrics)\n");
    summary.push_str(&"=".repeat(78));
    summary.push('\n');
    print!("{summary}");
    if missing_metrics {
        eprintln!("{base}/metrics did not answer: no mask-time percentiles (tandem serves them)");
    }
    compare_report(a, model_id, constrained, comparisons)
}

/// The request settings of `constrained` without its schema: the unconstrained arm.
fn unconstrained(constrained: &ReqCfg) -> Arc<ReqCfg> {
    Arc::new(ReqCfg {
        url: constrained.url.clone(),
        kind: constrained.kind,
        model: constrained.model.clone(),
        api_key: constrained.api_key.clone(),
        timeout: constrained.timeout,
        ignore_eos: constrained.ignore_eos,
        temperature: constrained.temperature,
        top_p: constrained.top_p,
        top_k: constrained.top_k,
        extra_body: constrained.extra_body.clone(),
        schema: None,
    })
}

/// One test request per arm; the first constrained one also makes the server build its
/// token trie, which no round should pay for.
async fn compare_test_runs(
    client: &reqwest::Client,
    arms: [&Arc<ReqCfg>; 2],
    first: &SampleRequest,
) -> Result<()> {
    eprintln!("starting the initial test runs (without and with the schema)...");
    for cfg in arms {
        let test = send_request(client, cfg, first, Instant::now()).await;
        if !test.success {
            bail!(
                "the initial test request to {} failed: {}",
                cfg.url,
                test.error
            );
        }
    }
    Ok(())
}

/// The title and column heads of the `--compare-schema` summary table.
fn compare_summary_header() -> String {
    format!(
        "{:=^78}\n{:>8} {:>16} {:>16} {:>7} {:>13} {:>13}\n",
        " Structured output cost (--compare-schema) ",
        "clients",
        "free tok/s",
        "schema tok/s",
        "ratio",
        "mask p50/p99",
        "wait p50/p99"
    )
}

/// What every round of a `--compare-schema` run shares: the options, the client, the
/// server's base URL, and the two arms (unconstrained, constrained).
struct CompareCtx<'a> {
    a: &'a BenchServeOpts,
    client: &'a reqwest::Client,
    base: &'a str,
    arms: [&'a Arc<ReqCfg>; 2],
}

/// The warm-up and measured rounds at `c` clients: the summary table's line and the
/// comparison's JSON. Sets `missing_metrics` when a `/metrics` scrape fails.
async fn compare_at(
    ctx: &CompareCtx<'_>,
    c: usize,
    requests: &[SampleRequest],
    rng: &mut StdRng,
    missing_metrics: &mut bool,
) -> (String, Value) {
    let (a, client) = (ctx.a, ctx.client);
    let n = (c * a.compare_requests_per_client).min(requests.len());
    let reqs = &requests[..n];
    let offsets = arrival_offsets(n, a.request_rate, a.burstiness, rng);
    // One round before the measured ones, not counted: the first round at a client count
    // pays for first touches (KV cache pages, buffers grown to the batch), which would
    // land on the first arm.
    let (warm, _) =
        run_requests(client, ctx.arms[1], reqs, &offsets, Some(c), progress(a, n)).await;
    let warm_failed = warm.iter().filter(|o| !o.success).count();
    eprintln!("clients {c}: warm-up round done ({warm_failed} failed)");
    let mut arms = [Arm::default(), Arm::default()];
    let mut rounds = Vec::new();
    for round in 0..a.compare_rounds {
        for (i, arm) in arms.iter_mut().enumerate() {
            let (detail, scraped) = compare_round(ctx, i, arm, c, round, reqs, &offsets).await;
            *missing_metrics |= !scraped;
            rounds.push(detail);
        }
    }
    let ratio = if arms[0].throughput() > 0.0 {
        arms[1].throughput() / arms[0].throughput()
    } else {
        0.0
    };
    let ms = |h: &Histogram, q: f64| {
        h.quantile(q)
            .map(|x| format!("{:.3}", x * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    let (mask, wait) = (&arms[1].hist[0], &arms[1].hist[1]);
    let line = format!(
        "{c:>8} {:>16.2} {:>16.2} {ratio:>7.3} {:>13} {:>13}\n",
        arms[0].throughput(),
        arms[1].throughput(),
        format!("{}/{}", ms(mask, 0.5), ms(mask, 0.99)),
        format!("{}/{}", ms(wait, 0.5), ms(wait, 0.99)),
    );
    let comparison = json!({
        "max_concurrency": c,
        "requests_per_round": n,
        "rounds": a.compare_rounds,
        "unconstrained": arms[0].json(),
        "constrained": arms[1].json(),
        "ratio": ratio,
        "round_details": rounds,
    });
    (line, comparison)
}

/// One measured round of arm `i` (0 unconstrained, 1 constrained) at `c` clients, between
/// two `/metrics` scrapes: adds it to `arm` and returns the round's JSON, and whether both
/// scrapes answered.
async fn compare_round(
    ctx: &CompareCtx<'_>,
    i: usize,
    arm: &mut Arm,
    c: usize,
    round: usize,
    reqs: &[SampleRequest],
    offsets: &[f64],
) -> (Value, bool) {
    let (a, client, base) = (ctx.a, ctx.client, ctx.base);
    let api_key = ctx.arms[1].api_key.as_deref();
    let n = reqs.len();
    let before = scrape(client, base, api_key).await;
    let (outputs, duration) =
        run_requests(client, ctx.arms[i], reqs, offsets, Some(c), progress(a, n)).await;
    let after = scrape(client, base, api_key).await;
    let m = calculate_metrics(&outputs, duration);
    let finish = finish_counts(&outputs);
    arm.duration += duration;
    arm.output_tokens += m.total_output;
    arm.completed += m.completed;
    arm.failed += m.failed;
    arm.rates.push(m.output_throughput);
    for (k, v) in &finish {
        *arm.finish.entry(k.clone()).or_default() += v;
    }
    let mut constrained_tokens = Value::Null;
    let mut scraped = true;
    match (before, after) {
        (Some(b), Some(af)) => {
            let (hb, ha) = (constraint_histograms(&b), constraint_histograms(&af));
            for (k, (x, y)) in hb.iter().zip(&ha).enumerate() {
                arm.hist[k].add(&y.since(x));
            }
            constrained_tokens = json!(ha[0].since(&hb[0]).count as u64);
        }
        _ => scraped = false,
    }
    let name = if i == 0 {
        "unconstrained"
    } else {
        "constrained"
    };
    eprintln!(
        "clients {c}, round {round}, {name}: {:.2} output tok/s, {} tokens in \
         {duration:.2} s, finished {finish:?}, {} failed",
        m.output_throughput, m.total_output, m.failed
    );
    let detail = json!({
        "round": round,
        "arm": name,
        "duration": duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_output_tokens": m.total_output,
        "output_throughput": m.output_throughput,
        "finish_reasons": finish,
        "median_ttft_ms": stats(&m.ttfts_ms, &[]).median,
        "mean_tpot_ms": stats(&m.tpots_ms, &[]).mean,
        "constrained_tokens": constrained_tokens,
    });
    (detail, scraped)
}

/// The `--compare-schema` result file: the run's settings, its comparisons, and the
/// `--metadata` pairs.
fn compare_report(
    a: &BenchServeOpts,
    model_id: &str,
    constrained: &ReqCfg,
    comparisons: Vec<Value>,
) -> Result<Value> {
    let mut r = Map::new();
    r.insert("date".into(), json!(utc_stamp(unix_secs())));
    r.insert("backend".into(), json!(a.backend));
    r.insert("model_id".into(), json!(model_id));
    r.insert("compare_schema".into(), json!(true));
    r.insert(
        "json_schema".into(),
        json!(a.json_schema.as_ref().map(|p| p.display().to_string())),
    );
    r.insert("schema".into(), json!(constrained.schema));
    r.insert("ignore_eos".into(), json!(a.ignore_eos));
    r.insert("temperature".into(), json!(a.temperature));
    r.insert(
        "request_rate".into(),
        if a.request_rate.is_finite() {
            json!(a.request_rate)
        } else {
            json!("inf")
        },
    );
    r.insert("comparisons".into(), Value::Array(comparisons));
    for kv in &a.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--metadata wants KEY=VALUE, got {kv:?}"))?;
        r.insert(k.to_string(), json!(v));
    }
    Ok(Value::Object(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: BenchServeArgs,
    }

    fn args(extra: &[&str]) -> BenchServeArgs {
        let mut v = vec!["bench-serve"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).expect("flags parse").a
    }

    #[test]
    fn rate_parsing() {
        assert_eq!(parse_rate("inf"), Ok(f64::INFINITY));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("x").is_err());
        let a = args(&["--request-rate", "inf", "--max-concurrency", "4"]).opts;
        assert!(a.request_rate.is_infinite());
        assert_eq!(a.max_concurrency, Some(4));
        assert_eq!(args(&[]).opts.random_input_len, 128);
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        let s = stats(&[4.0, 1.0, 3.0, 2.0], &[90.0, 99.0]);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.median, 2.5);
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.percentiles.len(), 2);
        assert_eq!(stats(&[], &[99.0]).mean, 0.0);
        assert_eq!(pct_word(99.0), "99");
        assert_eq!(pct_word(99.9), "99.9");
    }

    #[test]
    fn arrivals_are_poisson_with_the_right_rate() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(arrival_offsets(5, f64::INFINITY, 1.0, &mut rng)
            .iter()
            .all(|&t| t == 0.0));
        for burstiness in [1.0, 0.5, 3.0] {
            let mut rng = StdRng::seed_from_u64(7);
            let n = 20_000;
            let t = arrival_offsets(n, 10.0, burstiness, &mut rng);
            assert_eq!(t[0], 0.0);
            assert!(t.windows(2).all(|w| w[1] >= w[0]));
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let s = stats(&gaps, &[]);
            assert!((s.mean - 0.1).abs() < 0.005, "mean gap {}", s.mean);
            // Gamma(k, 1/(rate k)): variance = 1 / (rate^2 k).
            let want = 0.01 / burstiness;
            assert!(
                (s.std * s.std - want).abs() < want * 0.1,
                "var {}",
                s.std * s.std
            );
        }
        let a = arrival_offsets(10, 5.0, 1.0, &mut StdRng::seed_from_u64(3));
        let b = arrival_offsets(10, 5.0, 1.0, &mut StdRng::seed_from_u64(3));
        assert_eq!(a, b);
    }

    #[test]
    fn sse_parser_handles_splits_crlf_comments_and_multiline() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: {\"a\"").is_empty());
        assert_eq!(p.feed(b":1}\n\n"), vec!["{\"a\":1}"]);
        assert_eq!(
            p.feed(b": keep-alive\r\nevent: x\r\ndata:b\r\n\r\ndata: c\ndata: d\n\n"),
            vec!["b", "c\nd"]
        );
        assert!(p.feed(b"\n\n").is_empty());
        assert!(p.feed(b"data: [DONE]").is_empty());
        assert_eq!(p.finish(), vec!["[DONE]"]);
        // Multi-byte text split across reads.
        let ev = "data: {\"t\":\"héllo\"}\n\n".as_bytes();
        let (x, y) = ev.split_at(12);
        let mut p = SseParser::default();
        assert!(p.feed(x).is_empty());
        assert_eq!(p.feed(y), vec!["{\"t\":\"héllo\"}"]);
    }

    #[test]
    fn events_of_both_apis() {
        assert_eq!(parse_event("[DONE]").unwrap(), StreamEvent::Done);
        let c = parse_event(r#"{"choices":[{"index":0,"text":"hi"}]}"#).unwrap();
        assert_eq!(
            c,
            StreamEvent::Chunk {
                text: "hi".into(),
                prompt_tokens: None,
                completion_tokens: None,
                finish_reason: None
            }
        );
        let c = parse_event(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#);
        assert!(matches!(c.unwrap(), StreamEvent::Chunk { text, .. } if text.is_empty()));
        let c = parse_event(r#"{"choices":[{"delta":{"content":"yo"}}],"usage":null}"#);
        assert!(matches!(c.unwrap(), StreamEvent::Chunk { text, .. } if text == "yo"));
        let u = parse_event(
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            StreamEvent::Chunk {
                text: String::new(),
                prompt_tokens: Some(7),
                completion_tokens: Some(5),
                finish_reason: None
            }
        );
        let e = parse_event(r#"{"error":{"message":"boom","type":"x"}}"#).unwrap_err();
        assert!(format!("{e:#}").contains("boom"));
        assert!(parse_event("not json").is_err());
    }

    #[test]
    fn stream_state_times_first_text_and_gaps() {
        let mut s = StreamState::default();
        s.on_data(r#"{"choices":[{"text":""}]}"#, 0.01).unwrap();
        assert_eq!(s.ttft, None);
        s.on_data(r#"{"choices":[{"text":"a"}]}"#, 0.1).unwrap();
        s.on_data(r#"{"choices":[{"text":"b"}]}"#, 0.15).unwrap();
        s.on_data(r#"{"choices":[{"text":"c"}]}"#, 0.35).unwrap();
        s.on_data(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
            0.36,
        )
        .unwrap();
        s.on_data("[DONE]", 0.37).unwrap();
        assert_eq!(s.ttft, Some(0.1));
        assert_eq!(s.itl.len(), 2);
        assert!((s.itl[0] - 0.05).abs() < 1e-12 && (s.itl[1] - 0.2).abs() < 1e-12);
        assert_eq!(s.text, "abc");
        assert_eq!((s.text_events, s.completion_tokens), (3, Some(4)));
        assert!(s.done);
    }

    fn ok_output(
        start: f64,
        ttft: f64,
        itl: Vec<f64>,
        latency: f64,
        out: Option<usize>,
    ) -> RequestOutput {
        RequestOutput {
            success: true,
            prompt_len: 10,
            prompt_len_exact: true,
            usage_completion_tokens: out,
            text_events: itl.len() + 1,
            ttft,
            itl,
            latency,
            start,
            ..Default::default()
        }
    }

    #[test]
    fn metrics_aggregate_like_vllm() {
        let outputs = vec![
            ok_output(0.0, 0.1, vec![0.1, 0.1, 0.1], 0.4, Some(4)),
            // No usage: one token per text event (3).
            ok_output(0.0, 0.2, vec![0.2, 0.2], 0.6, None),
            // Usage overrides the event count; input from usage when not exact.
            RequestOutput {
                prompt_len_exact: false,
                usage_prompt_tokens: Some(30),
                ..ok_output(1.5, 0.3, vec![], 0.3, Some(1))
            },
            RequestOutput {
                error: "HTTP 500".into(),
                prompt_len: 10,
                start: 0.2,
                latency: 0.01,
                ..Default::default()
            },
        ];
        let m = calculate_metrics(&outputs, 2.0);
        assert_eq!((m.completed, m.failed), (3, 1));
        assert_eq!(m.total_input, 10 + 10 + 30);
        assert_eq!(m.total_output, 4 + 3 + 1);
        assert_eq!(m.request_throughput, 1.5);
        assert_eq!(m.output_throughput, 4.0);
        assert_eq!(m.total_token_throughput, 29.0);
        assert_eq!(m.ttfts_ms.len(), 3);
        assert_eq!(m.itls_ms.len(), 5);
        // TPOT only for >1 token: (0.4-0.1)/3 and (0.6-0.2)/2.
        assert_eq!(m.tpots_ms.len(), 2);
        assert!((m.tpots_ms[0] - 100.0).abs() < 1e-9);
        assert!((m.tpots_ms[1] - 200.0).abs() < 1e-9);
        assert_eq!(m.e2els_ms.len(), 3);
        // Two requests overlap at the start, the failed one joins them.
        assert_eq!(m.max_concurrent_requests, 3);
        // Second 0 holds all 7 tokens of the first two requests.
        assert!((m.max_output_tokens_per_s - 7.0).abs() < 1e-9);
        let outs: Vec<usize> = outputs.iter().map(|o| o.output_len()).collect();
        assert_eq!(outs, vec![4, 3, 1, 0]);

        let sel = parse_list("ttft,tpot,itl,e2el");
        let text = format_summary(&m, 2.0, Some(8), &sel, &[90.0, 99.0]);
        for line in [
            "============ Serving Benchmark Result ============",
            "Successful requests:                     3",
            "Failed requests:                         1",
            "Maximum request concurrency:             8",
            "Benchmark duration (s):                  2.00",
            "Total input tokens:                      50",
            "Total generated tokens:                  8",
            "Request throughput (req/s):              1.50",
            "Output token throughput (tok/s):         4.00",
            "Total Token throughput (tok/s):          29.00",
            "---------------Time to First Token----------------",
            "Mean TTFT (ms):                          200.00",
            "Median TTFT (ms):                        200.00",
            "P90 TTFT (ms):",
            "P99 TTFT (ms):",
            "-----Time per Output Token (excl. 1st token)------",
            "Mean TPOT (ms):                          150.00",
            "---------------Inter-token Latency----------------",
            "----------------End-to-end Latency----------------",
            "Mean E2EL (ms):",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with(&format!("{}\n", "=".repeat(50))));

        let a = args(&["--metadata", "gpu=none", "--max-concurrency", "8"]).opts;
        let r = result_json(&a, "org/m", &outputs, &m, 2.0, &sel, &[90.0, 99.0], "d").unwrap();
        for k in [
            "completed",
            "total_input_tokens",
            "total_output_tokens",
            "request_throughput",
            "output_throughput",
            "total_token_throughput",
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p90_ttft_ms",
            "p99_ttft_ms",
            "mean_tpot_ms",
            "p99_itl_ms",
            "p90_e2el_ms",
            "input_lens",
            "output_lens",
            "ttfts",
            "itls",
            "errors",
            "duration",
            "date",
            "backend",
            "model_id",
            "num_prompts",
            "request_rate",
            "max_concurrency",
        ] {
            assert!(r.get(k).is_some(), "missing key {k}");
        }
        assert_eq!(r["request_rate"], "inf");
        assert_eq!(r["gpu"], "none");
        assert_eq!(r["errors"][3], "HTTP 500");
        assert_eq!(r["output_lens"], json!([4, 3, 1, 0]));
        assert_eq!(r["input_lens"], json!([10, 10, 30, 10]));
        let p = result_path(&a, &r);
        assert_eq!(p, PathBuf::from("openai-infqps-concurrency8-m-d.json"));
    }

    #[test]
    fn datasets_and_payloads() {
        let items =
            parse_custom("{\"prompt\": \"a b\", \"max_tokens\": 5}\n\nplain line\n").unwrap();
        assert_eq!(
            items,
            vec![("a b".into(), Some(5)), ("plain line".into(), None)]
        );
        assert!(parse_custom("{\"text\": 1}").is_err());
        let mut rng = StdRng::seed_from_u64(0);
        let l = random_lengths(&mut rng, 100, 100, 50, 0.2);
        assert!(l
            .iter()
            .all(|&(i, o)| (80..=120).contains(&i) && (40..=60).contains(&o)));
        assert!(random_lengths(&mut rng, 5, 7, 3, 0.0)
            .iter()
            .all(|&x| x == (7, 3)));
        assert_eq!(random_words(&mut rng, 9).len(), 9);

        let mut cfg = ReqCfg {
            url: String::new(),
            kind: ApiKind::Completions,
            model: "m".into(),
            api_key: None,
            timeout: Duration::from_secs(1),
            ignore_eos: true,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            extra_body: serde_json::from_str(r#"{"min_tokens": 2}"#).unwrap(),
            schema: None,
        };
        let req = SampleRequest {
            prompt: "p".into(),
            prompt_len: 1,
            prompt_len_exact: false,
            output_len: 9,
        };
        let b = build_payload(&cfg, &req);
        assert_eq!(b["prompt"], "p");
        assert_eq!(b["max_tokens"], 9);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["min_tokens"], 2);
        cfg.kind = ApiKind::Chat;
        cfg.ignore_eos = false;
        let b = build_payload(&cfg, &req);
        assert_eq!(b["messages"][0]["content"], "p");
        assert_eq!(b["max_completion_tokens"], 9);
        assert!(b.get("ignore_eos").is_none() && b.get("prompt").is_none());
    }

    // ------------------------------------------------------------------------------
    // The whole client against a fake SSE server.

    type Bodies = Arc<Mutex<Vec<(String, Value)>>>;

    fn find(h: &[u8], n: &[u8]) -> Option<usize> {
        h.windows(n.len()).position(|w| w == n)
    }

    async fn respond(sock: &mut tokio::net::TcpStream, status: &str, body: &str) {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        let _ = sock.write_all(head.as_bytes()).await;
        let _ = sock.write_all(body.as_bytes()).await;
    }

    async fn fake_conn(mut sock: tokio::net::TcpStream, bodies: Bodies) {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let end = loop {
            match sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            match sock.read(&mut tmp).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
        let body: Value = serde_json::from_slice(&buf[end..end + len]).unwrap_or(Value::Null);
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        match path.as_str() {
            "/v1/models" => {
                respond(&mut sock, "200 OK", r#"{"data":[{"id":"org/fake-model"}]}"#).await
            }
            "/tokenize" => {
                // One token per word plus a BOS.
                let n = body["prompt"]
                    .as_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .count()
                    + 1;
                respond(&mut sock, "200 OK", &format!(r#"{{"count":{n}}}"#)).await
            }
            "/metrics" => {
                // Three tokens per structured request so far, each between 10 and 20 us in
                // all three histograms.
                let n = 3 * bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, b)| b.get("response_format").is_some())
                    .count();
                let mut page = String::from("# TYPE x counter\nx_total 1\n");
                for h in CONSTRAINT_HISTOGRAMS {
                    page.push_str(&format!(
                        "{h}_bucket{{le=\"0.00001\"}} 0\n{h}_bucket{{le=\"0.00002\"}} {n}\n\
                         {h}_bucket{{le=\"+Inf\"}} {n}\n{h}_sum {}\n{h}_count {n}\n",
                        n as f64 * 1.5e-5
                    ));
                }
                respond(&mut sock, "200 OK", &page).await
            }
            "/v1/completions" | "/v1/chat/completions" => {
                bodies.lock().unwrap().push((path.clone(), body.clone()));
                let prompt = body["prompt"]
                    .as_str()
                    .or(body["messages"][0]["content"].as_str())
                    .unwrap_or("");
                if prompt.contains("FAIL") {
                    let e = r#"{"error":{"message":"injected failure","type":"server_error"}}"#;
                    return respond(&mut sock, "500 Internal Server Error", e).await;
                }
                let chat = path.contains("chat");
                let ev = |t: &str| {
                    if chat {
                        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n")
                    } else {
                        format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"{t}\"}}]}}\n\n")
                    }
                };
                // Structured requests end with `stop`, the others with `length`.
                let reason = if body.get("response_format").is_some() {
                    "stop"
                } else {
                    "length"
                };
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                            Connection: close\r\n\r\n";
                let ms = |n| tokio::time::sleep(Duration::from_millis(n));
                let _ = sock.write_all(head.as_bytes()).await;
                // An empty first event (role / empty text) must not count as the first token.
                let _ = sock.write_all(ev("").as_bytes()).await;
                ms(30).await;
                let first = ev("Hel");
                let (x, y) = first.split_at(first.len() / 2);
                let _ = sock.write_all(x.as_bytes()).await;
                let _ = sock.flush().await;
                ms(5).await;
                let _ = sock.write_all(y.as_bytes()).await;
                ms(20).await;
                let _ = sock.write_all(ev("lo").as_bytes()).await;
                ms(20).await;
                let third = ev(" world").replace('\n', "\r\n");
                let _ = sock
                    .write_all(format!(": ping\r\n{third}").as_bytes())
                    .await;
                let fin = format!(
                    "data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n"
                );
                let _ = sock.write_all(fin.as_bytes()).await;
                if !chat {
                    let u = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\
                             \"completion_tokens\":5,\"total_tokens\":12}}\n\n";
                    let _ = sock.write_all(u.as_bytes()).await;
                }
                let _ = sock.write_all(b"data: [DONE]\n\n").await;
            }
            _ => {
                respond(
                    &mut sock,
                    "404 Not Found",
                    r#"{"error":{"message":"nope"}}"#,
                )
                .await
            }
        }
        let _ = sock.shutdown().await;
    }

    /// Starts the fake server on its own thread and runtime; returns its address.
    fn fake_server() -> (std::net::SocketAddr, Bodies) {
        let bodies: Bodies = Arc::default();
        let b2 = bodies.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(fake_conn(s, b2.clone()));
                }
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        (addr, bodies)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tandem-bench-serve-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn end_to_end_completions_against_a_fake_sse_server() {
        let (addr, bodies) = fake_server();
        let dir = temp_dir("completions");
        let data = dir.join("prompts.jsonl");
        std::fs::write(
            &data,
            "{\"prompt\": \"one two three\", \"max_tokens\": 6}\nfour five\n\
             {\"prompt\": \"please FAIL now\"}\nsix seven eight nine\n",
        )
        .unwrap();
        let base = format!("http://{addr}");
        let a = args(&[
            "--base-url",
            &base,
            "--dataset-name",
            "custom",
            "--dataset-path",
            data.to_str().unwrap(),
            "--disable-shuffle",
            "--num-prompts",
            "4",
            "--ignore-eos",
            "--disable-tqdm",
            "--request-timeout",
            "20",
            "--ready-check-timeout-sec",
            "5",
            "--save-result",
            "--result-dir",
            dir.to_str().unwrap(),
            "--result-filename",
            "out.json",
        ]);
        run(a).unwrap();
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out.json")).unwrap()).unwrap();
        assert_eq!(r["model_id"], "org/fake-model");
        assert_eq!(r["num_prompts"], 4);
        assert_eq!(r["completed"], 3);
        assert_eq!(r["failed"], 1);
        // Usage wins over the 3 text events.
        assert_eq!(r["output_lens"], json!([5, 5, 0, 5]));
        assert_eq!(r["total_output_tokens"], 15);
        // /tokenize counts (words + BOS).
        assert_eq!(r["input_lens"], json!([4, 3, 4, 5]));
        assert_eq!(r["total_input_tokens"], 12);
        let errors = r["errors"].as_array().unwrap();
        assert!(errors[2].as_str().unwrap().contains("HTTP 500"));
        assert!(errors[2].as_str().unwrap().contains("injected failure"));
        assert!([0, 1, 3].iter().all(|&i| errors[i] == ""));
        for i in [0, 1, 3] {
            let ttft = r["ttfts"][i].as_f64().unwrap();
            assert!((0.03..10.0).contains(&ttft), "ttft {ttft}");
            let itl = r["itls"][i].as_array().unwrap();
            assert_eq!(itl.len(), 2);
            assert!(itl.iter().all(|g| g.as_f64().unwrap() >= 0.015));
        }
        assert!(r["mean_ttft_ms"].as_f64().unwrap() >= 30.0);
        assert!(r["p99_itl_ms"].as_f64().unwrap() >= 15.0);
        // TPOT = (e2el - ttft) / 4 >= 40 ms / 4.
        assert!(r["mean_tpot_ms"].as_f64().unwrap() >= 10.0);
        assert!(r["mean_e2el_ms"].as_f64().unwrap() >= 70.0);
        assert!(r["duration"].as_f64().unwrap() > 0.0);
        assert_eq!(r["request_rate"], "inf");
        assert_eq!(r["finish_reasons"], json!({"length": 3}));
        // Test run + 4 requests, all streaming with usage and ignore_eos.
        let b = bodies.lock().unwrap();
        assert_eq!(b.len(), 5);
        for (path, body) in b.iter() {
            assert_eq!(path, "/v1/completions");
            assert_eq!(body["model"], "org/fake-model");
            assert_eq!(body["stream"], true);
            assert_eq!(body["stream_options"]["include_usage"], true);
            assert_eq!(body["ignore_eos"], true);
        }
        // Arrival order at the server is not fixed: find each prompt's body.
        let max_tokens = |prompt: &str| {
            b.iter()
                .find(|(_, body)| body["prompt"] == prompt)
                .map(|(_, body)| body["max_tokens"].clone())
        };
        assert_eq!(max_tokens("one two three"), Some(json!(6)));
        assert_eq!(max_tokens("four five"), Some(json!(256)));
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn end_to_end_chat_random_poisson_against_a_fake_sse_server() {
        let (addr, bodies) = fake_server();
        let dir = temp_dir("chat");
        let a = args(&[
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
            "--endpoint",
            "/v1/chat/completions",
            "--model",
            "mine",
            "--num-prompts",
            "4",
            "--random-input-len",
            "10",
            "--random-output-len",
            "3",
            "--request-rate",
            "200",
            "--max-concurrency",
            "2",
            "--disable-tqdm",
            "--request-timeout",
            "20",
            "--ready-check-timeout-sec",
            "5",
            "--result-dir",
            dir.to_str().unwrap(),
            "--result-filename",
            "chat.json",
        ]);
        run(a).unwrap();
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("chat.json")).unwrap()).unwrap();
        assert_eq!(r["model_id"], "mine");
        assert_eq!(r["completed"], 4);
        assert_eq!(r["failed"], 0);
        // No usage event: one token per text event.
        assert_eq!(r["output_lens"], json!([3, 3, 3, 3]));
        // Prompts fitted through /tokenize to exactly 10 tokens.
        assert_eq!(r["input_lens"], json!([10, 10, 10, 10]));
        assert_eq!(r["max_concurrency"], 2);
        assert!(r["max_concurrent_requests"].as_u64().unwrap() <= 2);
        assert_eq!(r["request_rate"], 200.0);
        let b = bodies.lock().unwrap();
        assert_eq!(b.len(), 5);
        for (path, body) in b.iter() {
            assert_eq!(path, "/v1/chat/completions");
            assert_eq!(body["model"], "mine");
            assert_eq!(body["max_completion_tokens"], 3);
            assert!(body.get("ignore_eos").is_none());
            let words = body["messages"][0]["content"].as_str().unwrap();
            assert_eq!(words.split_whitespace().count(), 9);
        }
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compare_schema_alternates_the_arms_on_the_same_prompts() {
        let (addr, bodies) = fake_server();
        let dir = temp_dir("compare");
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let schema_path = dir.join("schema.json");
        std::fs::write(&schema_path, schema.to_string()).unwrap();
        let a = args(&[
            "--base-url",
            &format!("http://{addr}"),
            "--endpoint",
            "/v1/chat/completions",
            "--random-input-len",
            "6",
            "--random-output-len",
            "3",
            "--ignore-eos",
            "--json-schema",
            schema_path.to_str().unwrap(),
            "--compare-schema",
            "--compare-concurrency",
            "1,2",
            "--compare-rounds",
            "2",
            "--compare-requests-per-client",
            "2",
            "--disable-tqdm",
            "--request-timeout",
            "20",
            "--ready-check-timeout-sec",
            "5",
            "--result-dir",
            dir.to_str().unwrap(),
            "--result-filename",
            "cmp.json",
        ]);
        run(a).unwrap();
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cmp.json")).unwrap()).unwrap();
        assert_eq!(r["compare_schema"], true);
        assert_eq!(r["schema"], schema);
        let b = bodies.lock().unwrap();
        // Two test requests, then per client count a warm-up round (with the schema) and 2
        // pairs of rounds of 2 x C requests.
        assert_eq!(b.len(), 2 + 2 * 5 + 4 * 5);
        let with: Vec<bool> = b
            .iter()
            .map(|(_, x)| x.get("response_format").is_some())
            .collect();
        let mut want = vec![false, true];
        for c in [1, 2] {
            want.extend(std::iter::repeat_n(true, 2 * c));
            for _ in 0..2 {
                want.extend(std::iter::repeat_n(false, 2 * c));
                want.extend(std::iter::repeat_n(true, 2 * c));
            }
        }
        assert_eq!(with, want);
        for (_, x) in b.iter().filter(|(_, x)| x.get("response_format").is_some()) {
            let rf = &x["response_format"];
            assert_eq!(rf["type"], "json_schema");
            assert_eq!(rf["json_schema"]["schema"], schema);
            assert_eq!(rf["json_schema"]["strict"], true);
        }
        // Each round of a client count sends the same prompts and max_tokens.
        let round = |from: usize, n: usize| {
            let mut v: Vec<String> = b[from..from + n]
                .iter()
                .map(|(_, x)| {
                    format!(
                        "{}|{}",
                        x["messages"][0]["content"], x["max_completion_tokens"]
                    )
                })
                .collect();
            v.sort();
            v
        };
        // c = 1: warm-up 2..4, A 4..6, B 6..8, A 8..10, B 10..12; c = 2 from 12: warm-up,
        // then A B A B of 4 each.
        for from in [4, 6, 8, 10] {
            assert_eq!(round(2, 2), round(from, 2));
        }
        for from in [16, 20, 24, 28] {
            assert_eq!(round(12, 4), round(from, 4));
        }
        drop(b);
        let cmp = r["comparisons"].as_array().unwrap();
        assert_eq!(cmp.len(), 2);
        for (c, x) in [1, 2].iter().zip(cmp) {
            assert_eq!(x["max_concurrency"], *c);
            assert_eq!(x["requests_per_round"], 2 * c);
            let (free, con) = (&x["unconstrained"], &x["constrained"]);
            // 2 rounds x 2C requests x 3 tokens each.
            assert_eq!(free["total_output_tokens"], 12 * c);
            assert_eq!(con["total_output_tokens"], 12 * c);
            assert_eq!(free["finish_reasons"], json!({"length": 4 * c}));
            assert_eq!(con["finish_reasons"], json!({"stop": 4 * c}));
            assert_eq!(
                free["round_output_throughputs"].as_array().unwrap().len(),
                2
            );
            let ratio = x["ratio"].as_f64().unwrap();
            let want = con["output_throughput"].as_f64().unwrap()
                / free["output_throughput"].as_f64().unwrap();
            assert!(ratio > 0.0 && (ratio - want).abs() < 1e-9, "{ratio} {want}");
            // The scraped histograms: only the constrained rounds add samples.
            assert_eq!(free["constraint"]["mask_seconds"]["count"], 0);
            assert!(free["constraint"]["mask_seconds"]["p50"].is_null());
            for h in ["mask_seconds", "mask_wait_seconds", "commit_seconds"] {
                let s = &con["constraint"][h];
                assert_eq!(s["count"], 12 * c, "{h}");
                let p50 = s["p50"].as_f64().unwrap();
                assert!((p50 - 1.5e-5).abs() < 1e-12, "{h} {p50}");
                assert!((s["mean"].as_f64().unwrap() - 1.5e-5).abs() < 1e-12);
            }
            let details = x["round_details"].as_array().unwrap();
            assert_eq!(details.len(), 4);
            assert_eq!(details[1]["arm"], "constrained");
            // The warm-up round's samples are not in the first round's.
            assert_eq!(details[1]["constrained_tokens"], 6 * c);
            assert_eq!(details[0]["constrained_tokens"], 0);
            assert_eq!(details[2]["constrained_tokens"], 0);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
