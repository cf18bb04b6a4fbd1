//! `tandem launch`: every role of a deployment on this host as child processes of this
//! binary; the supervisor is `tandem_deploy::supervise`, the roles' flags are
//! `tandem_deploy::RoleArgs`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tandem_core::Deployment;
use tandem_deploy::Worker;

#[derive(Args)]
pub struct LaunchArgs {
    /// The deployment file; every worker in its `[addresses]` is started on this host.
    pub deployment: PathBuf,
    /// Checkpoint directory or llama.cpp GGUF file. Default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Start a worker again when it exits (it rejoins the running deployment).
    #[arg(long)]
    pub restart: bool,
    /// Seconds to wait for the workers to stop after Ctrl-C before killing them.
    #[arg(long, default_value_t = 10)]
    pub grace_s: u64,
    /// The cluster secret file, passed to every worker (see `serve --cluster-secret-file`;
    /// TANDEM_CLUSTER_SECRET and `[security]` reach them without it).
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS files, passed to every worker (see `serve --tls-cert`; the TANDEM_TLS_*
    /// variables and `[security]` reach them without these).
    #[command(flatten)]
    pub tls: tandem_deploy::TlsArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
}

pub fn launch(a: LaunchArgs) -> Result<()> {
    let dep = Deployment::load(&a.deployment)?;
    tandem_deploy::check_launch(&dep)?;
    let file = a.deployment.display().to_string();
    // A bad secret stops here, not in every child; the children read it again themselves.
    tandem_deploy::cluster_secret(a.cluster_secret_file.as_deref(), &dep)?;
    let secret_args = match &a.cluster_secret_file {
        Some(p) => vec![
            "--cluster-secret-file".to_string(),
            std::path::absolute(p)
                .with_context(|| format!("locating {}", p.display()))?
                .display()
                .to_string(),
        ],
        None => vec![],
    };
    // Bad TLS files stop here too (both sides' checks).
    a.tls.server(&dep)?;
    a.tls.client(&dep)?;
    let tls_args = a.tls.to_args()?;
    // Resolving here writes the demo model once rather than racing in every child.
    let src = crate::models::resolve(&a.model)?;
    a.weights.linear_type()?;
    let mut model_args = vec!["--model".to_string(), src.path().display().to_string()];
    model_args.extend(a.weights.to_args());
    let mut workers = Vec::new();
    for (role, n) in [
        ("expert", dep.expert_workers),
        ("attention", dep.attention_replicas),
    ] {
        for r in 0..n {
            let mut args = vec![
                "serve".to_string(),
                "--deployment".into(),
                file.clone(),
                "--role".into(),
                role.into(),
                "--rank".into(),
                r.to_string(),
            ];
            args.extend(model_args.iter().cloned());
            args.extend(secret_args.iter().cloned());
            args.extend(tls_args.iter().cloned());
            workers.push(Worker::new(format!("{role}{r}"), args));
        }
    }
    let stop = tandem_deploy::stop_on_signal()?;
    tandem_deploy::supervise(
        &mut workers,
        &stop,
        a.restart,
        Duration::from_secs(a.grace_s),
        || {
            tracing::info!(
                "deployment {file}: {} expert workers at {:?}, {} attention replicas serving HTTP at {:?}; Ctrl-C stops them all",
                dep.expert_workers,
                dep.addresses.expert,
                dep.attention_replicas,
                dep.addresses.attention
            );
        },
    )
}
