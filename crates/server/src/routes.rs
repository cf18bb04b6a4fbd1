//! The HTTP handlers. Each reads its body by hand (see [`crate::protocol::parse_body`]) so that
//! every client mistake is a 4xx in OpenAI's shape.

use crate::chat_out::ToolFormat;
use crate::error::ApiError;
use crate::generate::{self, Api, ChatOpts, Job};
use crate::limits::{Held, LimitError};
use crate::protocol::{
    chat_messages, parse_body, ChatRequest, CompletionRequest, DetokenizeRequest, Prompt,
    TokenizeRequest,
};
use crate::structured::{self, ToolChoice};
use crate::{AppState, Shared};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tandem_engine::constraint::TopLevelGrammar;
use tandem_engine::{Grammars, Reasoning};
use tandem_model::Tokenizer;
use tandem_sched::TokenConstraint;

/// Most calls a forced (`tool_choice: "required"`) answer may hold with
/// `parallel_tool_calls` on: the constraint allows this many, so it always ends.
const MAX_FORCED_CALLS: usize = 4;

fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        v.to_string(),
    )
        .into_response()
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn read_body(s: &Shared, req: Request) -> Result<Bytes, ApiError> {
    let limit = s.opts.max_body_bytes;
    // A declared length over the limit is refused before anything is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(LimitError::BodyTooLarge { limit }.into());
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            // The only error besides the limit is a broken client connection.
            if is_length_limit(&e) {
                LimitError::BodyTooLarge { limit }.into()
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })
}

/// Whether reading a body failed on its length limit (http-body-util's typed error, found
/// anywhere in the error's source chain).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn check_model(s: &Shared, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Ok(()),
        Some(m) if m == s.opts.model_name => Ok(()),
        Some(m) => Err(ApiError::model_not_found(m)),
    }
}

fn tokenizer(s: &Shared) -> Result<&Tokenizer, ApiError> {
    s.tokenizer.as_deref().ok_or_else(|| {
        ApiError::bad_request("this model has no tokenizer: send the prompt as token ids")
    })
}

fn encode(s: &Shared, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    tokenizer(s)?
        .encode(text, add_special)
        .map_err(|e| ApiError::bad_param("prompt", format!("cannot tokenize the prompt: {e}")))
}

fn render_chat(
    s: &Shared,
    msgs: &[crate::protocol::InMessage],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let text = render_chat_text(s, msgs, None, add_generation_prompt, &Default::default())?;
    encode(s, &text, false)
}

/// The chat template over `msgs` (with `tools` and extra variables), as text.
fn render_chat_text(
    s: &Shared,
    msgs: &[crate::protocol::InMessage],
    tools: Option<&Value>,
    add_generation_prompt: bool,
    kwargs: &serde_json::Map<String, Value>,
) -> Result<String, ApiError> {
    let msgs = Value::Array(chat_messages(msgs)?);
    tokenizer(s)?
        .render_chat(&msgs, tools, add_generation_prompt, kwargs)
        .map_err(|e| ApiError::bad_param("messages", format!("{e}")))
}

/// The tool-call format of this model: `serve --tool-call-parser`, else the template's.
fn tool_format(s: &Shared) -> Option<ToolFormat> {
    match &s.opts.tool_call_parser {
        Some(n) => ToolFormat::from_name(n),
        None => s
            .tokenizer
            .as_deref()
            .and_then(|t| t.chat_template.as_deref())
            .and_then(ToolFormat::detect),
    }
}

/// Whether this model reasons in `<think>...</think>` first.
fn thinks(s: &Shared) -> bool {
    s.opts.reasoning.unwrap_or_else(|| {
        s.tokenizer
            .as_deref()
            .and_then(|t| t.chat_template.as_deref())
            .is_some_and(|t| t.contains("<think>"))
    })
}

/// `count` constraints from `grammar` (a bad grammar or schema is a 400 naming `param`).
fn constraints(
    s: &Shared,
    grammar: Option<TopLevelGrammar>,
    count: usize,
    min_tokens: usize,
    param: &str,
) -> Result<Vec<Box<dyn TokenConstraint>>, ApiError> {
    let Some(g) = grammar else {
        return Ok(Vec::new());
    };
    if min_tokens > 0 {
        // The constraint may allow nothing but EOS, which min_tokens would forbid.
        return Err(ApiError::bad_param(
            "min_tokens",
            format!("min_tokens cannot be combined with {param}"),
        ));
    }
    let grammars = s.grammars()?;
    (0..count)
        .map(|_| {
            grammars
                .compile_grammar(g.clone())
                .map_err(|e| ApiError::bad_param(param, format!("invalid {param}: {e}")))
        })
        .collect()
}

/// The operator's cap on `max_tokens` (`param` names the field the client used).
fn check_max_tokens(
    s: &Shared,
    param: &'static str,
    requested: Option<usize>,
) -> Result<(), ApiError> {
    let limit = s.opts.max_tokens;
    match requested {
        Some(r) if r > limit => Err(LimitError::MaxTokens {
            param,
            requested: r,
            limit,
        }
        .into()),
        _ => Ok(()),
    }
}

/// Prompt and context checks before anything reaches the engine: the operator's prompt
/// limit (`param` names the field the prompt came from), then the model's context.
fn check_lengths(
    s: &Shared,
    param: &'static str,
    prompts: &[Vec<u32>],
    max_tokens: Option<usize>,
) -> Result<(), ApiError> {
    let ctx = s.engine.max_model_len();
    if prompts.is_empty() {
        return Err(ApiError::bad_param(param, "the prompt list is empty"));
    }
    for p in prompts {
        if p.is_empty() {
            return Err(ApiError::bad_param(param, "the prompt is empty"));
        }
        if p.len() > s.opts.max_prompt_tokens {
            return Err(LimitError::PromptTooLong {
                param,
                tokens: p.len(),
                limit: s.opts.max_prompt_tokens,
            }
            .into());
        }
        if p.len() >= ctx {
            return Err(ApiError::bad_param(
                param,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt has {} tokens.",
                    p.len()
                ),
            ));
        }
        if let Some(m) = max_tokens {
            if p.len().saturating_add(m) > ctx {
                return Err(ApiError::bad_param(
                    "max_tokens",
                    format!(
                        "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the prompt, {m} for the completion).",
                        p.len().saturating_add(m),
                        p.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub(crate) async fn completions(State(st): State<AppState>, req: Request) -> Response {
    respond(completions_inner(&st.0, req).await)
}

async fn completions_inner(s: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let bytes = read_body(s, req).await?;
    let r: CompletionRequest = parse_body(&bytes)?;
    check_model(s, r.model.as_deref())?;
    r.check_unsupported()?;
    let sampling = r.sampling();
    // OpenAI's default for the legacy completions endpoint.
    let max_tokens = r.max_tokens.unwrap_or(16).min(s.opts.max_tokens);
    let params = sampling.to_params(Some(max_tokens), r.logprobs, r.best_of, s.opts.max_n)?;
    let prompts = match &r.prompt {
        Prompt::Text(t) => vec![encode(s, t, true)?],
        Prompt::Texts(v) => v
            .iter()
            .map(|t| encode(s, t, true))
            .collect::<Result<_, _>>()?,
        Prompt::Ids(v) => vec![v.clone()],
        Prompt::IdLists(v) => v.clone(),
    };
    // The model's context first (the more telling reason when both apply), then the cap.
    check_lengths(s, "prompt", &prompts, params.max_tokens)?;
    check_max_tokens(s, "max_tokens", r.max_tokens)?;
    let stream = r.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, r.stream_options.as_ref())?;
    let grammar = match &r.structured_outputs {
        Some(v) => {
            structured::structured_outputs(v)?.map(|spec| Grammars::grammar(&spec, Reasoning::None))
        }
        None => None,
    };
    let constraints = constraints(
        s,
        grammar,
        prompts.len() * params.n.max(1),
        params.min_tokens,
        "structured_outputs",
    )?;
    generate::run(
        s,
        Job {
            api: Api::Completion,
            prompts,
            params,
            stream,
            include_usage,
            logprobs: r.logprobs.is_some(),
            arrival,
            constraints,
            chat: None,
        },
    )
    .await
}

fn stream_usage(
    stream: bool,
    opts: Option<&crate::protocol::StreamOptions>,
) -> Result<bool, ApiError> {
    match opts {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::bad_param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        )),
        Some(o) => Ok(o.include_usage.unwrap_or(false)),
    }
}

pub(crate) async fn chat_completions(State(st): State<AppState>, req: Request) -> Response {
    respond(chat_inner(&st.0, req).await)
}

async fn chat_inner(s: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let bytes = read_body(s, req).await?;
    let r: ChatRequest = parse_body(&bytes)?;
    check_model(s, r.model.as_deref())?;
    r.check_unsupported()?;
    let logprobs = if r.logprobs == Some(true) {
        Some(r.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let (param, max_tokens) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let mut params = r
        .sampling()
        .to_params(max_tokens, logprobs, None, s.opts.max_n)
        .map_err(|mut e| {
            // `to_params` names completions' fields; name the one this chat request sent.
            e.param = match e.param.as_deref() {
                Some("max_tokens") => Some(param.to_string()),
                Some("logprobs") => Some("top_logprobs".to_string()),
                other => other.map(str::to_string),
            };
            e
        })?;
    // Tools and structured output, checked before anything is rendered.
    let tools = structured::tools(r.tools.as_deref().unwrap_or(&[]))?;
    let choice = structured::tool_choice(r.tool_choice.as_ref(), &tools)?;
    let (spec, spec_param) = match (&r.response_format, &r.structured_outputs) {
        (Some(a), Some(b)) if !a.is_null() && !b.is_null() => {
            return Err(ApiError::bad_param(
                "structured_outputs",
                "give response_format or structured_outputs, not both",
            ))
        }
        (Some(a), _) if !a.is_null() => (structured::response_format(a)?, "response_format"),
        (_, Some(b)) => (structured::structured_outputs(b)?, "structured_outputs"),
        _ => (None, "response_format"),
    };
    let format = tool_format(s);
    let think = thinks(s);
    let mut kwargs = r.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(e) = &r.reasoning_effort {
        kwargs.insert("reasoning_effort".into(), Value::String(e.clone()));
    }
    // tool_choice "none": the model is not shown the tools.
    let tools_value = match (&r.tools, &choice) {
        (Some(t), c) if !t.is_empty() && *c != ToolChoice::None => Some(Value::Array(t.clone())),
        _ => None,
    };
    let text = render_chat_text(
        s,
        &r.messages,
        tools_value.as_ref(),
        r.add_generation_prompt.unwrap_or(true),
        &kwargs,
    )?;
    let open_think = think && text.trim_end().ends_with("<think>");
    let reasoning = match (think, open_think) {
        (false, _) => Reasoning::None,
        (true, true) => Reasoning::Open,
        (true, false) => Reasoning::Optional,
    };
    let parallel = r.parallel_tool_calls.unwrap_or(true);
    let (grammar, grammar_param) = match &choice {
        ToolChoice::Required | ToolChoice::Named(_) => {
            if spec.is_some() {
                return Err(ApiError::bad_param(
                    spec_param,
                    "a tool_choice that forces a call cannot be combined with structured output",
                ));
            }
            let f = format.ok_or_else(|| {
                ApiError::bad_param(
                    "tool_choice",
                    "this model's chat template has no known tool-call format (serve --tool-call-parser sets one)",
                )
            })?;
            let (sel, max_calls): (Vec<&structured::Tool>, usize) = match &choice {
                ToolChoice::Named(n) => (tools.iter().filter(|t| &t.name == n).collect(), 1),
                _ => (
                    tools.iter().collect(),
                    if parallel { MAX_FORCED_CALLS } else { 1 },
                ),
            };
            let (body, rules) = structured::tool_call_lark(f, &sel, max_calls)?;
            (Some(Grammars::lark(&body, &rules, reasoning)), "tools")
        }
        _ => (spec.map(|sp| Grammars::grammar(&sp, reasoning)), spec_param),
    };
    let chat = ChatOpts {
        think,
        open_think,
        tools: match choice {
            ToolChoice::None => None,
            _ => format,
        },
        parallel,
    };
    let prompt = encode(s, &text, false)?;
    // Without max_tokens a chat runs to the end of the context, or to the operator's cap
    // when that comes first.
    let room = s.engine.max_model_len().saturating_sub(prompt.len());
    if params.max_tokens.is_none() && s.opts.max_tokens < room {
        params.max_tokens = Some(s.opts.max_tokens);
    }
    let prompts = vec![prompt];
    check_lengths(s, "messages", &prompts, params.max_tokens)?;
    check_max_tokens(s, param, max_tokens)?;
    let stream = r.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, r.stream_options.as_ref())?;
    let constraints = constraints(
        s,
        grammar,
        params.n.max(1),
        params.min_tokens,
        grammar_param,
    )?;
    generate::run(
        s,
        Job {
            api: Api::Chat,
            prompts,
            params,
            stream,
            include_usage,
            logprobs: logprobs.is_some(),
            arrival,
            constraints,
            chat: Some(chat),
        },
    )
    .await
}

pub(crate) async fn tokenize(State(st): State<AppState>, req: Request) -> Response {
    respond(tokenize_inner(&st.0, req).await)
}

async fn tokenize_inner(s: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let bytes = read_body(s, req).await?;
    let r: TokenizeRequest = parse_body(&bytes)?;
    check_model(s, r.model.as_deref())?;
    let tokens = match (&r.prompt, &r.messages) {
        (Some(p), None) => encode(s, p, r.add_special_tokens.unwrap_or(true))?,
        (None, Some(m)) => render_chat(s, m, r.add_generation_prompt.unwrap_or(true))?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"prompt\" and \"messages\"",
            ))
        }
    };
    Ok(json_response(&json!({
        "tokens": tokens,
        "count": tokens.len(),
        "max_model_len": s.engine.max_model_len(),
    })))
}

pub(crate) async fn detokenize(State(st): State<AppState>, req: Request) -> Response {
    respond(detokenize_inner(&st.0, req).await)
}

async fn detokenize_inner(s: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let bytes = read_body(s, req).await?;
    let r: DetokenizeRequest = parse_body(&bytes)?;
    check_model(s, r.model.as_deref())?;
    let tk = tokenizer(s)?;
    let vocab = tk.vocab_size();
    if let Some(bad) = r.tokens.iter().find(|t| **t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let prompt = tk
        .decode(&r.tokens, false)
        .map_err(|e| ApiError::bad_param("tokens", format!("cannot decode: {e}")))?;
    Ok(json_response(&json!({ "prompt": prompt })))
}

pub(crate) async fn models(State(st): State<AppState>) -> Response {
    let s = &st.0;
    json_response(&json!({
        "object": "list",
        "data": [{
            "id": s.opts.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "tandem",
            "max_model_len": s.engine.max_model_len(),
        }],
    }))
}

pub(crate) async fn health(State(st): State<AppState>) -> Response {
    match st.0.engine.failure() {
        None => json_response(&json!({"status": "ok"})),
        Some(why) => {
            let mut r = json_response(&json!({"status": "error", "message": why}));
            *r.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    }
}

pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    let s = &st.0;
    let stats = s.engine.stats();
    let in_flight = s.opts.max_queue - s.admission.available_permits().min(s.opts.max_queue);
    let mut text = String::new();
    if let Some(h) = &s.prometheus {
        metrics::gauge!("tandem_requests_in_flight").set(in_flight as f64);
        metrics::gauge!("tandem_engine_iterations").set(stats.iterations as f64);
        for w in &stats.workers {
            metrics::gauge!("tandem_worker_busy_fraction", "role" => w.role, "id" => w.id.to_string())
                .set(w.busy_fraction);
        }
        crate::metrics_export::run_upkeep(h);
        text = h.render();
    } else {
        // Another recorder owns the process: render what the server knows itself.
        text.push_str(&format!("tandem_requests_in_flight {in_flight}\n"));
        text.push_str(&format!("tandem_engine_iterations {}\n", stats.iterations));
        for w in &stats.workers {
            text.push_str(&format!(
                "tandem_worker_busy_fraction{{role=\"{}\",id=\"{}\"}} {}\n",
                w.role, w.id, w.busy_fraction
            ));
        }
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

pub(crate) async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

pub(crate) async fn method_not_allowed(req: Request) -> Response {
    let mut e = ApiError::not_found(format!(
        "method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.into_response()
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        _ => "other",
    }
}

/// Routes open without a key and outside the per-address limit: probes and scrapers.
fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/metrics")
}

/// Access and per-address admission, before any handler: the API key (401), then a slot of
/// the client address's in-flight requests (429 + `Retry-After`), held by the response body
/// until it is finished or dropped.
pub(crate) async fn gate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if is_open(req.uri().path()) {
        return next.run(req).await;
    }
    let s = &st.0;
    if let Some(key) = &s.opts.api_key {
        if let Err(e) = key.check(req.headers()) {
            metrics::counter!("tandem_requests_unauthorized_total").increment(1);
            return e.into_response();
        }
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let slot = match peer.map(|ip| s.per_ip.acquire(ip, s.opts.max_concurrent_per_ip)) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(slot))) => Some(slot),
        Some(Err(e)) => {
            metrics::counter!("tandem_requests_rejected_total").increment(1);
            return ApiError::from(e).into_response();
        }
    };
    let resp = next.run(req).await;
    match slot {
        None => resp,
        Some(slot) => resp.map(|b| Held::wrap(b, slot)),
    }
}

/// Counts requests by endpoint and status.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let ep = endpoint_label(req.uri().path());
    let resp = next.run(req).await;
    metrics::counter!("tandem_http_requests_total", "endpoint" => ep,
        "status" => resp.status().as_u16().to_string())
    .increment(1);
    resp
}
