//! A real server on 127.0.0.1:0 over the tiny Mixtral fixture (1 replica, 2 expert workers,
//! 2 micro-batches), and SSE helpers. Every wait is bounded.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::Deployment;
use tandem_engine::{Engine, EngineOptions};
use tandem_model::{Model, Tokenizer};
use tandem_server::{AppState, ServerOptions};

/// The bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral")
}

pub const MODEL: &str = "tiny-mixtral";

pub fn state(max_queue: usize, grace: Duration) -> AppState {
    state_with(ServerOptions {
        model_name: MODEL.into(),
        max_queue,
        shutdown_grace: grace,
        ..ServerOptions::default()
    })
}

/// The fixture engine behind a server with these options.
pub fn state_with(opts: ServerOptions) -> AppState {
    state_with_template(opts, None)
}

/// [`state_with`], with `template` as the tokenizer's chat template when given.
pub fn state_with_template(opts: ServerOptions, template: Option<&str>) -> AppState {
    let dir = fixture_dir();
    let model = Model::load(&dir).expect("fixture model loads");
    let mut tok = Tokenizer::load(&dir).expect("fixture tokenizer loads");
    if let Some(t) = template {
        tok.chat_template = Some(t.to_string());
    }
    let tok = Arc::new(tok);
    let deployment = Deployment {
        attention_replicas: 1,
        expert_workers: 2,
        micro_batches: 2,
        num_kv_blocks: 128,
        ..Deployment::default()
    };
    let engine = Engine::start(
        Arc::new(model),
        Some(tok.clone()),
        EngineOptions {
            deployment,
            peer_timeout: Duration::from_secs(20),
            ..EngineOptions::default()
        },
    )
    .expect("engine starts");
    AppState::new(Arc::new(engine), Some(tok), opts)
}

/// Options as [`TestServer::start`] uses them, to change a field or two.
pub fn test_options() -> ServerOptions {
    ServerOptions {
        model_name: MODEL.into(),
        max_queue: 64,
        shutdown_grace: Duration::from_secs(10),
        ..ServerOptions::default()
    }
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), tandem_server::ServeError>>>,
}

impl TestServer {
    pub async fn start(max_queue: usize) -> Self {
        Self::start_with(max_queue, Duration::from_secs(10)).await
    }

    pub async fn start_with(max_queue: usize, grace: Duration) -> Self {
        Self::start_state(state(max_queue, grace)).await
    }

    /// A server with these options (see [`test_options`]).
    pub async fn start_opts(opts: ServerOptions) -> Self {
        Self::start_state(state_with(opts)).await
    }

    /// A server whose tokenizer has `template` as its chat template.
    pub async fn start_template(opts: ServerOptions, template: &str) -> Self {
        Self::start_state(state_with_template(opts, Some(template))).await
    }

    async fn start_state(st: AppState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tandem_server::serve(listener, st, async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("client");
        Self {
            base: format!("http://{addr}"),
            client,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a JSON body; returns the status and the parsed JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn post_raw(&self, path: &str, body: String) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body read");
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("non-JSON body ({e}) with status {status}: {text}"));
        (status, v)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body read"))
    }

    /// Triggers the graceful shutdown and waits (bounded) for `serve` to return.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(WAIT, t).await;
            assert!(r.is_ok(), "server did not stop in time");
        }
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads a whole SSE stream: the JSON of every `data:` event, and whether `[DONE]` ended it.
pub async fn read_sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let text = tokio::time::timeout(WAIT, resp.text())
        .await
        .expect("stream finished in time")
        .expect("stream read");
    parse_sse(&text)
}

pub fn parse_sse(text: &str) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for block in text.split("\n\n") {
        let block = block.trim();
        if block.is_empty() {
            continue;
        }
        let data = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {block:?}"));
        assert!(!done, "event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("SSE data is JSON"));
        }
    }
    (events, done)
}

/// Asserts OpenAI's error shape and returns the message.
pub fn error_message(v: &Value) -> String {
    let e = &v["error"];
    assert!(e.is_object(), "not an error body: {v}");
    assert!(e["type"].is_string(), "error.type: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e["message"].as_str().expect("error.message").to_string()
}

/// Runs a test body under the global bound.
pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(240), f)
        .await
        .expect("test finished in time");
}
