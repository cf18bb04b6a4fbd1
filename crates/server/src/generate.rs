//! Drives engine requests for one HTTP request: admission, fan-out (`n` choices per prompt),
//! the abort-on-drop guard, and OpenAI's response and SSE chunk shapes.

use crate::chat_out::{tool_call_json, ChatSplitter, Piece, ToolFormat};
use crate::error::ApiError;
use crate::metrics_export::record_seconds;
use crate::Shared;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SelectAll, StreamExt};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tandem_core::RequestId;
use tandem_engine::{Engine, RequestOutput};
use tandem_model::Tokenizer;
use tandem_sched::{FinishReason, SamplingParams, TokenConstraint};
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Completion,
    Chat,
}

/// One validated generation request.
pub(crate) struct Job {
    pub api: Api,
    pub prompts: Vec<Vec<u32>>,
    /// `n` = choices per prompt.
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Return logprobs (the top-N count is `params.logprobs`).
    pub logprobs: bool,
    pub arrival: Instant,
    /// One constraint per engine request (prompt-major, then choice), or none.
    pub constraints: Vec<Box<dyn TokenConstraint>>,
    /// Chat: how to split the output into reasoning, content and tool calls.
    pub chat: Option<ChatOpts>,
}

/// How a chat choice's text is split (see [`crate::chat_out`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChatOpts {
    pub think: bool,
    pub open_think: bool,
    pub tools: Option<ToolFormat>,
    /// `parallel_tool_calls: false` keeps the first call only.
    pub parallel: bool,
}

impl ChatOpts {
    fn splitter(&self) -> ChatSplitter {
        ChatSplitter::new(self.think, self.open_think, self.tools)
    }
}

/// Holds a request's admission permits and aborts its unfinished engine requests when
/// dropped (client gone, error, shutdown).
struct Guard {
    engine: Arc<Engine>,
    ids: Vec<Option<RequestId>>,
    _permit: OwnedSemaphorePermit,
}

impl Guard {
    fn done(&mut self, idx: usize) {
        if let Some(slot) = self.ids.get_mut(idx) {
            *slot = None;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for id in self.ids.iter().flatten() {
            tracing::debug!(request = id.0, "aborting (client gone or request failed)");
            metrics::counter!("tandem_requests_aborted_total").increment(1);
            let _ = self.engine.abort(*id);
        }
    }
}

type Events = SelectAll<Pin<Box<dyn futures_util::Stream<Item = (usize, RequestOutput)> + Send>>>;

#[derive(Debug, Clone)]
struct TokLp {
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<TokLp>,
    finish: Option<&'static str>,
    completion_tokens: usize,
    last_token: Option<Instant>,
    /// Characters of text (in token strings) before the next logprob, for `text_offset`.
    offset: usize,
    /// Chat: the streamed split into reasoning, content and tool calls.
    split: Option<ChatSplitter>,
}

/// What one engine event changed.
struct Delta {
    text: String,
    logprobs: Vec<TokLp>,
    finish: Option<Result<&'static str, ApiError>>,
}

impl Choice {
    fn apply(&mut self, o: RequestOutput, arrival: Instant) -> Delta {
        let now = Instant::now();
        let mut lps = Vec::new();
        if let Some(t) = o.token {
            match self.last_token {
                None => record_seconds(
                    "tandem_time_to_first_token_seconds",
                    now.duration_since(arrival).as_secs_f64(),
                ),
                Some(prev) => record_seconds(
                    "tandem_inter_token_latency_seconds",
                    now.duration_since(prev).as_secs_f64(),
                ),
            }
            self.last_token = Some(now);
            lps.push(TokLp {
                token: t,
                logprob: o.logprob.unwrap_or(f32::NAN),
                top: o.top_logprobs,
            });
        }
        self.text.push_str(&o.text);
        self.logprobs.extend(lps.iter().cloned());
        let finish = o.finish.map(|f| {
            record_seconds(
                "tandem_e2e_request_latency_seconds",
                now.duration_since(arrival).as_secs_f64(),
            );
            metrics::counter!("tandem_generation_tokens_total")
                .increment(f.completion_tokens as u64);
            self.completion_tokens = f.completion_tokens;
            let r = match f.reason {
                FinishReason::Stop => Ok("stop"),
                FinishReason::Length => Ok("length"),
                FinishReason::Abort => Err(ApiError::unavailable("the request was aborted")),
                FinishReason::Error(m) => {
                    Err(ApiError::internal(format!("generation failed: {m}")))
                }
            };
            if let Ok(s) = &r {
                self.finish = Some(s);
            }
            r
        });
        Delta {
            text: o.text,
            logprobs: lps,
            finish,
        }
    }
}

fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("<{id}>"))
}

fn num(x: f32) -> Value {
    serde_json::Number::from_f64(f64::from(x)).map_or(Value::Null, Value::Number)
}

/// Completions' legacy logprobs object; `offset` is the running `text_offset`.
fn completion_logprobs(lps: &[TokLp], tok: Option<&Tokenizer>, offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for lp in lps {
        let s = token_text(tok, lp.token);
        offsets.push(*offset);
        *offset += s.len();
        tokens.push(Value::String(s));
        token_logprobs.push(num(lp.logprob));
        let mut m = Map::new();
        // Most likely first: when two tokens decode to the same text, the likelier one stays.
        for (t, l) in &lp.top {
            m.entry(token_text(tok, *t)).or_insert_with(|| num(*l));
        }
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// Chat's logprobs object.
fn chat_logprobs(lps: &[TokLp], tok: Option<&Tokenizer>) -> Value {
    let entry = |t: u32, l: f32| {
        let s = token_text(tok, t);
        let bytes: Vec<u8> = s.as_bytes().to_vec();
        json!({"token": s, "logprob": num(l), "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = entry(lp.token, lp.logprob);
            let top: Vec<Value> = lp.top.iter().map(|(t, l)| entry(*t, *l)).collect();
            e["top_logprobs"] = Value::Array(top);
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    logprobs: bool,
    include_usage: bool,
    arrival: Instant,
    tok: Option<Arc<Tokenizer>>,
    chat: Option<ChatOpts>,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    fn usage(&self, choices: &[Choice]) -> Value {
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

/// Admits `job`, starts its engine requests and answers (JSON or an SSE stream).
pub(crate) async fn run(state: &Arc<Shared>, job: Job) -> Result<Response, ApiError> {
    let n = job.params.n.max(1);
    let total = job.prompts.len() * n;
    if total > state.opts.max_queue {
        return Err(ApiError::bad_param(
            "n",
            format!(
                "the request asks for {total} sequences; this server admits at most {} at once",
                state.opts.max_queue
            ),
        ));
    }
    // A deployment that cannot serve (a worker failed or is unreachable) says so at once.
    if let Some(why) = state.engine.failure() {
        metrics::counter!("tandem_requests_rejected_total").increment(1);
        return Err(ApiError::unavailable(format!(
            "the deployment cannot serve right now: {why}"
        )));
    }
    let permits = u32::try_from(total).map_err(|_| ApiError::bad_param("n", "too many choices"))?;
    let permit = state
        .admission
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            metrics::counter!("tandem_requests_rejected_total").increment(1);
            ApiError::overloaded(format!(
                "the server is at capacity ({} requests in flight or waiting); retry later",
                state.opts.max_queue
            ))
        })?;
    let mut guard = Guard {
        engine: state.engine.clone(),
        ids: Vec::with_capacity(total),
        _permit: permit,
    };
    let mut events: Events = SelectAll::new();
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    let mut constraints = job.constraints.into_iter();
    for p in &job.prompts {
        for i in 0..n {
            let mut params = job.params.clone();
            params.n = 1;
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            let h = state
                .engine
                .add_constrained(p.clone(), params, constraints.next())?;
            let idx = guard.ids.len();
            guard.ids.push(Some(h.id));
            events.push(Box::pin(
                UnboundedReceiverStream::new(h.rx).map(move |o| (idx, o)),
            ));
        }
    }
    metrics::counter!("tandem_prompt_tokens_total").increment(prompt_tokens as u64);
    let prefix = match job.api {
        Api::Completion => "cmpl",
        Api::Chat => "chatcmpl",
    };
    let seq = state.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        api: job.api,
        id: format!("{prefix}-{:x}{seq:08x}", state.created),
        created: unix_now(),
        model: state.opts.model_name.clone(),
        prompt_tokens,
        logprobs: job.logprobs,
        include_usage: job.include_usage,
        arrival: job.arrival,
        tok: state.tokenizer.clone(),
        chat: job.chat,
    };
    let choices: Vec<Choice> = (0..total)
        .map(|_| Choice {
            split: job.chat.map(|c| c.splitter()),
            ..Choice::default()
        })
        .collect();
    if job.stream {
        Ok(stream_response(Streamer::new(meta, events, guard, choices)))
    } else {
        collect(meta, events, guard, choices).await
    }
}

async fn collect(
    meta: Meta,
    mut events: Events,
    mut guard: Guard,
    mut choices: Vec<Choice>,
) -> Result<Response, ApiError> {
    let mut left = choices.len();
    while left > 0 {
        let Some((idx, out)) = events.next().await else {
            return Err(ApiError::unavailable(
                "the engine stopped before the request finished",
            ));
        };
        let Some(c) = choices.get_mut(idx) else {
            continue;
        };
        if let Some(f) = c.apply(out, meta.arrival).finish {
            f?;
            guard.done(idx);
            left -= 1;
        }
    }
    let tok = meta.tok.as_deref();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = if meta.logprobs {
                match meta.api {
                    Api::Completion => completion_logprobs(&c.logprobs, tok, &mut 0),
                    Api::Chat => chat_logprobs(&c.logprobs, tok),
                }
            } else {
                Value::Null
            };
            match meta.api {
                Api::Completion => json!({
                    "index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish,
                }),
                Api::Chat => {
                    let (message, finish) = chat_message(&meta, i, c);
                    json!({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
                }
            }
        })
        .collect();
    let mut body = meta.envelope(false, out);
    body["usage"] = meta.usage(&choices);
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response())
}

/// The id of call `k` of choice `i` (unique in the response).
fn call_id(meta: &Meta, i: usize, k: usize) -> String {
    format!("call_{}_{i}_{k}", meta.id.trim_start_matches("chatcmpl-"))
}

/// A non-streamed chat choice's message and finish reason.
fn chat_message(meta: &Meta, i: usize, c: &Choice) -> (Value, Option<&'static str>) {
    let Some(opts) = meta.chat else {
        return (json!({"role": "assistant", "content": c.text}), c.finish);
    };
    let mut p = opts.splitter().split_all(&c.text);
    if !opts.parallel {
        p.calls.truncate(1);
    }
    let mut m = json!({"role": "assistant", "content": p.content});
    if !p.reasoning.is_empty() {
        m["reasoning_content"] = Value::String(p.reasoning);
    }
    let mut finish = c.finish;
    if !p.calls.is_empty() {
        if p.content.is_empty() {
            m["content"] = Value::Null;
        }
        let calls: Vec<Value> = p
            .calls
            .iter()
            .enumerate()
            .map(|(k, (name, args))| tool_call_json(&call_id(meta, i, k), name, args))
            .collect();
        m["tool_calls"] = Value::Array(calls);
        if finish == Some("stop") {
            finish = Some("tool_calls");
        }
    }
    (m, finish)
}

/// The SSE body's state: pending chunks, the merged engine events, the guard (dropped with
/// the body when the client disconnects, which aborts the engine requests).
struct Streamer {
    meta: Meta,
    events: Events,
    guard: Guard,
    choices: Vec<Choice>,
    left: usize,
    pending: VecDeque<Bytes>,
    done: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Streamer {
    fn new(meta: Meta, events: Events, guard: Guard, choices: Vec<Choice>) -> Self {
        let mut s = Self {
            left: choices.len(),
            meta,
            events,
            guard,
            choices,
            pending: VecDeque::new(),
            done: false,
        };
        if s.meta.api == Api::Chat {
            for i in 0..s.choices.len() {
                let c = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": null, "finish_reason": null});
                let chunk = s.meta.envelope(true, vec![c]);
                s.pending.push_back(sse(&chunk));
            }
        }
        s
    }

    fn fail(&mut self, e: ApiError) {
        self.pending.push_back(sse(&e.body()));
        self.pending
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }

    fn on_event(&mut self, idx: usize, out: RequestOutput) {
        let arrival = self.meta.arrival;
        let Some(c) = self.choices.get_mut(idx) else {
            return;
        };
        let d = c.apply(out, arrival);
        let tok = self.meta.tok.as_deref();
        let lp = if self.meta.logprobs && !d.logprobs.is_empty() {
            match self.meta.api {
                Api::Completion => completion_logprobs(&d.logprobs, tok, &mut c.offset),
                Api::Chat => chat_logprobs(&d.logprobs, tok),
            }
        } else {
            Value::Null
        };
        let mut finish = match d.finish {
            Some(Err(e)) => return self.fail(e),
            Some(Ok(f)) => Some(f),
            None => None,
        };
        if self.meta.api == Api::Chat {
            if let (Some(sp), Some(opts)) = (c.split.as_mut(), self.meta.chat) {
                let mut deltas: Vec<Value> = Vec::new();
                let piece = |p: Piece| match p {
                    Piece::Content(t) => json!({"content": t}),
                    Piece::Reasoning(t) => json!({"reasoning_content": t}),
                };
                deltas.extend(sp.push(&d.text).into_iter().map(piece));
                if finish.is_some() {
                    let (rest, mut calls) = sp.finish();
                    deltas.extend(rest.into_iter().map(piece));
                    if !opts.parallel {
                        calls.truncate(1);
                    }
                    for (k, (name, args)) in calls.iter().enumerate() {
                        // The id, type and name first, then the arguments.
                        deltas.push(
                            json!({"tool_calls": [{"index": k, "id": call_id(&self.meta, idx, k),
                            "type": "function", "function": {"name": name, "arguments": ""}}]}),
                        );
                        deltas.push(
                            json!({"tool_calls": [{"index": k, "function": {"arguments": args}}]}),
                        );
                    }
                    if !calls.is_empty() && finish == Some("stop") {
                        finish = Some("tool_calls");
                    }
                }
                if deltas.is_empty() && (!lp.is_null() || finish.is_some()) {
                    deltas.push(json!({}));
                }
                let last = deltas.len().saturating_sub(1);
                let mut lp = Some(lp);
                for (j, delta) in deltas.into_iter().enumerate() {
                    let f = if j == last { finish } else { None };
                    let lp = if j == 0 {
                        lp.take().unwrap_or(Value::Null)
                    } else {
                        Value::Null
                    };
                    let choice =
                        json!({"index": idx, "delta": delta, "logprobs": lp, "finish_reason": f});
                    let chunk = self.meta.envelope(true, vec![choice]);
                    self.pending.push_back(sse(&chunk));
                }
                self.after_event(idx, finish.is_some());
                return;
            }
        }
        if !d.text.is_empty() || !lp.is_null() || finish.is_some() {
            let choice = match self.meta.api {
                Api::Completion => json!({
                    "index": idx, "text": d.text, "logprobs": lp, "finish_reason": finish,
                }),
                Api::Chat => {
                    let delta = if d.text.is_empty() {
                        json!({})
                    } else {
                        json!({"content": d.text})
                    };
                    json!({"index": idx, "delta": delta, "logprobs": lp, "finish_reason": finish})
                }
            };
            let chunk = self.meta.envelope(true, vec![choice]);
            self.pending.push_back(sse(&chunk));
        }
        self.after_event(idx, finish.is_some());
    }

    /// Counts a finished choice; after the last, the usage chunk and `[DONE]`.
    fn after_event(&mut self, idx: usize, finished: bool) {
        if finished {
            self.guard.done(idx);
            self.left -= 1;
            if self.left == 0 {
                if self.meta.include_usage {
                    let mut chunk = self.meta.envelope(true, vec![]);
                    chunk["usage"] = self.meta.usage(&self.choices);
                    self.pending.push_back(sse(&chunk));
                }
                self.pending
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.done = true;
            }
        }
    }
}

fn stream_response(s: Streamer) -> Response {
    let body = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(b) = s.pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(b), s));
            }
            if s.done {
                return None;
            }
            match s.events.next().await {
                Some((idx, out)) => s.on_event(idx, out),
                None => s.fail(ApiError::unavailable(
                    "the engine stopped before the request finished",
                )),
            }
        }
    });
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
