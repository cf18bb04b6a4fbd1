//! `tandem serve`: loads a model, starts the engine and runs the OpenAI-compatible server
//! (the logic lives in tandem-server).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_deploy::Role;
use tandem_server::{ApiKey, AppState, ServerOptions};

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (Hugging Face layout) or llama.cpp GGUF file (`*.gguf`: weights,
    /// config and tokenizer from the one file). Default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Default 127.0.0.1, or the host of this replica's `[addresses] attention` entry.
    #[arg(long)]
    pub host: Option<String>,
    /// Default 8000, or the port of this replica's `[addresses] attention` entry.
    #[arg(long)]
    pub port: Option<u16>,
    /// The name clients pass as `model`. Default: the checkpoint directory's name
    /// (a GGUF file's name without `.gguf`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most requests (sequences) in flight plus waiting; beyond it requests get 503.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Seconds a shutdown waits for in-flight requests.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Require `Authorization: Bearer KEY` on every route but /health and /metrics (401
    /// otherwise). Default: the TANDEM_API_KEY environment variable. A command line is
    /// visible to other users of the host: prefer --api-key-file or the variable.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (a mounted secret; one trailing newline is dropped).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = ServerOptions::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Most tokens in one prompt (400 beyond; the model's context length applies as well).
    #[arg(long, default_value_t = ServerOptions::default().max_prompt_tokens)]
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for (400 beyond);
    /// a chat request without one stops there.
    #[arg(long, default_value_t = ServerOptions::default().max_tokens)]
    pub max_tokens: usize,
    /// Largest `n` (choices per prompt) a request may ask for (400 beyond).
    #[arg(long, default_value_t = ServerOptions::default().max_n)]
    pub max_n: usize,
    /// Most requests in flight from one client IP address (429 + Retry-After beyond); 0 = no
    /// limit (behind a proxy every request comes from the proxy's address).
    #[arg(long, default_value_t = ServerOptions::default().max_concurrent_per_ip)]
    pub max_concurrent_per_ip: usize,
    /// The tool-call format to parse from chat output: hermes (Qwen, Hermes), mistral,
    /// deepseek_v3, glm45 or harmony (GPT-OSS). Default: detected from the chat template.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(tandem_server::chat_out::ToolFormat::NAMES))]
    pub tool_call_parser: Option<String>,
    /// Split `<think>...</think>` off into `reasoning_content` (on / off). Default: when the
    /// chat template mentions `<think>`.
    #[arg(long, value_parser = ["on", "off"])]
    pub reasoning_parser: Option<String>,
    #[command(flatten)]
    pub shape: tandem_deploy::ShapeArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
    #[command(flatten)]
    pub role: tandem_deploy::RoleArgs,
}

pub fn run(mut a: ServeArgs) -> Result<()> {
    // The key and the limits are checked before anything is loaded: a bad one stops here.
    let opts = if a.role.role == Some(Role::Expert) {
        ServerOptions::default()
    } else {
        let opts = ServerOptions {
            max_queue: a.max_queue,
            shutdown_grace: Duration::from_secs(a.shutdown_grace_s),
            max_body_bytes: a.max_body_bytes,
            api_key: api_key(&a)?,
            max_prompt_tokens: a.max_prompt_tokens,
            max_tokens: a.max_tokens,
            max_n: a.max_n,
            max_concurrent_per_ip: a.max_concurrent_per_ip,
            tool_call_parser: a.tool_call_parser.clone(),
            reasoning: a.reasoning_parser.as_deref().map(|r| r == "on"),
            ..ServerOptions::default()
        };
        opts.validate().context("checking the serve limits")?;
        opts
    };
    let src = crate::models::resolve(&a.model)?;
    let ty = a.weights.linear_type()?;
    let mut deployment = a.shape.deployment_or_default(a.role.role.is_some(), &src)?;
    a.role.resolve(&mut deployment)?;
    if a.role.role == Some(Role::Expert) {
        return tandem_deploy::serve_expert_role(
            &src,
            &deployment,
            &a.role,
            a.host.as_deref(),
            a.port,
            ty,
        );
    }
    let name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| src.name().unwrap_or_else(|| "tandem".into()));
    // An attention replica of a multi-process deployment serves HTTP where the file says.
    let (mut host, mut port) = ("127.0.0.1".to_string(), 8000u16);
    if a.role.role == Some(Role::Attention) {
        if let Some(addr) = deployment.addresses.attention.get(a.role.rank as usize) {
            let (h, p) = addr
                .rsplit_once(':')
                .with_context(|| format!("attention address {addr:?} is not HOST:PORT"))?;
            host = h.to_string();
            port = p
                .parse()
                .with_context(|| format!("attention address {addr:?} is not HOST:PORT"))?;
        }
    }
    let host = a.host.clone().unwrap_or(host);
    let port = a.port.unwrap_or(port);
    let opts = ServerOptions {
        model_name: name.clone(),
        ..opts
    };
    let (engine, tok) = tandem_deploy::start_engine(&src, deployment.clone(), &a.role, ty)?;
    let state = AppState::new(Arc::new(engine), tok, opts.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = format!("{host}:{port}");
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(
            "serving {name} on http://{local} (replicas {}, expert workers {}, micro-batches {}, max_model_len {})",
            deployment.attention_replicas,
            deployment.expert_workers,
            deployment.micro_batches,
            state.engine().max_model_len()
        );
        if opts.api_key.is_some() {
            tracing::info!(
                "an API key is required (Authorization: Bearer) on every route but /health and /metrics"
            );
        } else {
            tracing::warn!(
                "no API key is set (--api-key, --api-key-file, TANDEM_API_KEY): every route is open to anyone who can reach {local}"
            );
        }
        tracing::info!(
            "limits: body {} bytes, prompt {} tokens, max_tokens {}, n {}, in flight per client address {}",
            opts.max_body_bytes,
            opts.max_prompt_tokens,
            opts.max_tokens,
            opts.max_n,
            match opts.max_concurrent_per_ip {
                0 => "unlimited".to_string(),
                n => n.to_string(),
            }
        );
        tandem_server::serve(listener, state, tandem_deploy::shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// The API key: --api-key, else --api-key-file, else TANDEM_API_KEY; none when none is
/// given. An empty key or an unreadable file is an error, not an open server.
fn api_key(a: &ServeArgs) -> Result<Option<ApiKey>> {
    if let Some(k) = &a.api_key {
        return Ok(Some(ApiKey::new(k, "--api-key")?));
    }
    if let Some(path) = &a.api_key_file {
        return Ok(Some(ApiKey::from_file(path)?));
    }
    match std::env::var("TANDEM_API_KEY") {
        Ok(k) => Ok(Some(ApiKey::new(&k, "TANDEM_API_KEY")?)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("the TANDEM_API_KEY environment variable is not UTF-8")
        }
    }
}
