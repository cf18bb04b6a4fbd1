//! tandem-server: the OpenAI-compatible HTTP frontend.
//!
//! [`router`] builds the axum app over an [`AppState`] (the engine, its tokenizer, the served
//! model name and the admission limit); [`serve`] runs it on a listener until a shutdown
//! signal, then drains in-flight requests for a bounded time and stops the engine.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both stream over SSE),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text), `POST /tokenize`,
//! `POST /detokenize`. Bodies are parsed by hand (bytes -> serde_json) so that every client
//! mistake is a 4xx in OpenAI's error shape; see [`error`] and [`protocol`].
//!
//! Admission control: every engine request (a prompt times `n`) takes a permit of a
//! semaphore of `max_queue` permits for its whole life; a request that cannot get all of its
//! permits at once is answered 503 with `Retry-After`. A request's permits and engine
//! requests live in a guard that aborts unfinished engine requests when it is dropped, so a
//! client that disconnects (a dropped SSE body, or a cancelled non-streaming request) frees
//! its KV blocks.
//!
//! Access and limits ([`auth`], [`limits`]): with an API key set, every route except
//! `/health` and `/metrics` needs `Authorization: Bearer KEY` (401 otherwise); operator
//! limits on the body size (413), prompt tokens, `max_tokens` and `n` (400) and requests in
//! flight per client address (429 + `Retry-After`) are checked before a request reaches the
//! engine.
//!
//! Owns: HTTP, the OpenAI shapes and their validation. May not compute anything of the model:
//! every request goes through [`tandem_engine::Engine`].

pub mod auth;
pub mod chat_out;
pub mod error;
mod generate;
pub mod limits;
pub mod metrics_export;
pub mod protocol;
mod routes;
pub mod structured;

use axum::routing::{get, post};
use axum::Router;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::Engine;
use tandem_model::Tokenizer;
use tokio::sync::Semaphore;

pub use auth::{ApiKey, ApiKeyError};
pub use error::ApiError;
pub use limits::LimitError;
pub use metrics_export::{install_metrics, pending_histogram_samples, upkeeps_run, UPKEEP_EVERY};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The name clients pass as `model` (and `/v1/models` lists).
    pub model_name: String,
    /// Most engine requests in flight plus waiting; beyond it requests get 503.
    pub max_queue: usize,
    /// How long a shutdown waits for in-flight requests before dropping them.
    pub shutdown_grace: Duration,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// When set, every route but `/health` and `/metrics` needs `Authorization: Bearer KEY`.
    pub api_key: Option<ApiKey>,
    /// Most prompt tokens of one prompt (400 beyond; the model's context is checked too).
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` / `max_completion_tokens` (400 beyond); also the cap of a chat
    /// request that gives none.
    pub max_tokens: usize,
    /// Largest `n` (400 beyond).
    pub max_n: usize,
    /// Most requests in flight from one client IP address (429 beyond); 0 = no limit (for
    /// a server behind a proxy, where every request comes from the proxy's address).
    pub max_concurrent_per_ip: usize,
    /// The tool-call format to parse (`serve --tool-call-parser`, one of
    /// [`chat_out::ToolFormat::NAMES`]); `None`: detected from the chat template.
    pub tool_call_parser: Option<String>,
    /// Whether `<think>...</think>` is split off into `reasoning_content`
    /// (`serve --reasoning-parser`); `None`: when the chat template mentions `<think>`.
    pub reasoning: Option<bool>,
}

/// A [`ServerOptions`] value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option} must be at least 1")]
pub struct OptionsError {
    pub option: &'static str,
}

impl ServerOptions {
    /// Checks the limits (all but `max_concurrent_per_ip` must be at least 1).
    pub fn validate(&self) -> Result<(), OptionsError> {
        for (option, v) in [
            ("max_queue", self.max_queue),
            ("max_body_bytes", self.max_body_bytes),
            ("max_prompt_tokens", self.max_prompt_tokens),
            ("max_tokens", self.max_tokens),
            ("max_n", self.max_n),
        ] {
            if v == 0 {
                return Err(OptionsError { option });
            }
        }
        Ok(())
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            model_name: "tandem".into(),
            max_queue: 256,
            shutdown_grace: Duration::from_secs(30),
            max_body_bytes: 16 << 20,
            api_key: None,
            max_prompt_tokens: 32768,
            max_tokens: 32768,
            max_n: protocol::MAX_CHOICES,
            max_concurrent_per_ip: 128,
            tool_call_parser: None,
            reasoning: None,
        }
    }
}

/// What every handler shares.
pub struct Shared {
    pub engine: Arc<Engine>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub opts: ServerOptions,
    pub(crate) admission: Arc<Semaphore>,
    pub(crate) per_ip: limits::PerIp,
    pub(crate) created: u64,
    pub(crate) next_id: AtomicU64,
    pub(crate) prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The structured-output compiler, built at the first request that needs it.
    pub(crate) grammars: std::sync::OnceLock<Result<Arc<tandem_engine::Grammars>, String>>,
}

/// The router's state (cheap to clone).
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl Shared {
    /// The structured-output compiler over this model's tokenizer (built once).
    pub(crate) fn grammars(&self) -> Result<Arc<tandem_engine::Grammars>, ApiError> {
        let g = self.grammars.get_or_init(|| {
            let tok = self
                .tokenizer
                .as_deref()
                .ok_or("this model has no tokenizer")?;
            tandem_engine::Grammars::new(tok, self.engine.eos_token_ids(), self.engine.vocab_size())
                .map(Arc::new)
        });
        g.clone()
            .map_err(|e| ApiError::bad_request(format!("structured output is not available: {e}")))
    }
}

impl AppState {
    /// Wraps an engine; installs the process-wide Prometheus recorder if it is not yet.
    pub fn new(
        engine: Arc<Engine>,
        tokenizer: Option<Arc<Tokenizer>>,
        opts: ServerOptions,
    ) -> Self {
        let max_queue = opts.max_queue.max(1);
        Self(Arc::new(Shared {
            engine,
            tokenizer,
            admission: Arc::new(Semaphore::new(max_queue)),
            per_ip: limits::PerIp::default(),
            opts: ServerOptions { max_queue, ..opts },
            created: generate::unix_now(),
            next_id: AtomicU64::new(0),
            prometheus: install_metrics(),
            grammars: std::sync::OnceLock::new(),
        }))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.0.engine
    }
}

/// The axum app. Per-address limits need the peer address: serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does); without it,
/// only the per-address limit is skipped.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::gate,
        ))
        .layer(axum::middleware::from_fn(routes::track))
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting, lets
/// in-flight requests finish for up to `opts.shutdown_grace` (the rest are dropped, which
/// aborts their engine requests), and shuts the engine down.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let grace = state.0.opts.shutdown_grace;
    let engine = state.0.engine.clone();
    let app = router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = tx.send(());
    });
    let deadline = async move {
        if rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let res = tokio::select! {
        r = server.into_future() => r,
        _ = deadline => {
            tracing::warn!("in-flight requests still running after {grace:?}: dropping them");
            Ok(())
        }
    };
    // Joining the engine's threads blocks: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    res.map_err(ServeError::from)
}
