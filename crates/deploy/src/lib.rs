//! tandem-deploy: the processes of a multi-process deployment. One process per role
//! (`--role attention|expert --rank I`: [`start_engine`], [`run_expert`]), the supervisor
//! behind `tandem launch` ([`supervise`]: every role of a deployment on this host as child
//! processes, restarted or stopped together) and `tandem status` ([`status`]: every worker's
//! health), with the flags they share (role, rank, TLS, cluster secret) as clap argument
//! groups the CLI flattens into its commands, as `tandem-bench` does for its own.
//!
//! Owns: loading a model for a role, the M2N link and TLS/secret set-up from flags,
//! environment and deployment file, child-process supervision, the checks `tandem launch`
//! makes of a deployment file, and loading the planner's inputs named on a command line
//! (hardware catalog, model shape, profile). May not touch: HTTP serving
//! (`tandem-server`), the engine's scheduling (`tandem-engine`), argument wiring of the
//! `tandem` binary (`tandem-cli`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::Deployment;
use tandem_engine::auth::{ClusterSecret, SECRET_ENV};
use tandem_engine::net::{query_status_with, serve_expert, Identity, NetOptions, TcpReplicaLink};
use tandem_engine::tls::{TlsClient, TlsServer, CA_ENV, CERT_ENV, KEY_ENV};
use tandem_engine::wire::WireDtype;
use tandem_engine::{Engine, EngineOptions};
use tandem_model::weights::LinearType;
use tandem_model::{ExpertSelection, Model, ModelSource, Tokenizer};
use tandem_sched::{FinishReason, SamplingParams};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Attention,
    Expert,
}

/// Which worker of a multi-process deployment this process runs.
#[derive(Args, Clone, Debug)]
pub struct RoleArgs {
    /// Run one worker of the `--deployment` file (whose `[addresses]` list every worker)
    /// instead of the whole deployment in this process.
    #[arg(long, value_enum, requires = "deployment")]
    pub role: Option<Role>,
    /// The worker's index among its role (default: from --rank-from-hostname, else the
    /// TANDEM_RANK environment variable, else 0).
    #[arg(
        long = "rank",
        value_name = "RANK",
        conflicts_with = "rank_from_hostname"
    )]
    pub rank_flag: Option<u32>,
    /// Take the rank from the trailing `-N` of the host name (a StatefulSet pod's ordinal;
    /// checked against TANDEM_RANK when that is set).
    #[arg(long, requires = "role")]
    pub rank_from_hostname: bool,
    /// Use TO wherever the deployment file lists the address FROM (HOST:PORT each;
    /// repeatable): run a Kubernetes deployment file's pods elsewhere, e.g. on loopback.
    #[arg(long, value_name = "FROM=TO", value_parser = parse_address_pair)]
    pub address_map: Vec<(String, String)>,
    /// The rank, set by [`RoleArgs::resolve`].
    #[arg(skip)]
    pub rank: u32,
    /// Seconds a replica waits for the expert workers before failing its requests.
    #[arg(long, default_value_t = 60)]
    pub peer_timeout_s: u64,
    /// How an attention replica sends hidden states to the expert workers over TCP (they
    /// answer in the same type): `f32` (exact) or `bf16` (half the bytes, each value rounded
    /// to bf16).
    #[arg(long, default_value = "f32", value_parser = parse_wire_dtype)]
    pub wire_dtype: WireDtype,
    /// A file holding the deployment's cluster secret, which every process proves in the M2N
    /// handshake (one trailing newline is dropped). Default: the TANDEM_CLUSTER_SECRET
    /// environment variable (the secret itself), else `[security] cluster_secret_file` of
    /// the deployment file. Without one, M2N is unauthenticated and an expert worker
    /// listens on 127.0.0.1 unless given `--host` or a non-loopback address in the file.
    #[arg(long, requires = "role")]
    pub cluster_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How an attention replica and an expert worker on the same host move hidden states:
    /// `auto` (shared-memory rings, the M2N socket kept to tell that the peer is alive; TCP
    /// between hosts and with TLS) or `tcp` (always the socket). A link uses shared memory
    /// only when both ends allow it.
    #[arg(long, value_enum, default_value_t = M2nTransport::Auto)]
    pub m2n_transport: M2nTransport,
    /// Over shared memory, hidden-state matrices of at least this many bytes are lent: the
    /// peer copies them once, straight from this process's memory, instead of through the
    /// ring (where the kernel lets it; see docs/m2n.md). `off`: never.
    #[arg(long, value_name = "BYTES", default_value = "65536", value_parser = parse_lend_min)]
    pub m2n_lend_min: usize,
}

/// `--m2n-lend-min`: bytes, or `off`.
fn parse_lend_min(s: &str) -> Result<usize, String> {
    if s == "off" {
        return Ok(usize::MAX);
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither a number of bytes nor `off`"))
}

/// `--m2n-transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum M2nTransport {
    #[default]
    Auto,
    Tcp,
}

/// TLS on the M2N links (see docs/security.md "TLS"). Each file is taken from its flag, else
/// its environment variable, else `[security]` of the deployment file.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first). An expert worker with `--tls-cert` and `--tls-key`
    /// accepts only TLS; on an attention replica (or `status`) they are its client certificate
    /// for workers that require one. Default: TANDEM_TLS_CERT, else `[security] tls_cert`.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`. Default: TANDEM_TLS_KEY, else `[security] tls_key`.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle. An attention replica (or `status`) with one connects only with TLS and
    /// checks each worker's certificate against it, for the host of the worker's address; an
    /// expert worker with one requires client certificates signed by it (mutual TLS).
    /// Default: TANDEM_TLS_CA, else `[security] tls_ca`.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

/// One TLS file: the flag, else the environment variable `env`, else the deployment file's.
fn tls_file(flag: &Option<PathBuf>, env: &str, file: &Option<PathBuf>) -> Option<PathBuf> {
    flag.clone()
        .or_else(|| {
            std::env::var_os(env)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| file.clone())
}

impl TlsArgs {
    /// The three files in force (flag > environment > deployment file).
    fn files(&self, dep: &Deployment) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
        let sec = &dep.security;
        (
            tls_file(&self.tls_cert, CERT_ENV, &sec.tls_cert),
            tls_file(&self.tls_key, KEY_ENV, &sec.tls_key),
            tls_file(&self.tls_ca, CA_ENV, &sec.tls_ca),
        )
    }

    /// The certificate and key, both or neither.
    fn identity(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<(PathBuf, PathBuf)>> {
        match (cert, key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (Some(c), None) => bail!(
                "TLS: a certificate ({}) but no key (--tls-key, {KEY_ENV} or [security] tls_key)",
                c.display()
            ),
            (None, Some(k)) => bail!(
                "TLS: a key ({}) but no certificate (--tls-cert, {CERT_ENV} or [security] \
                 tls_cert)",
                k.display()
            ),
            (None, None) => Ok(None),
        }
    }

    /// An expert worker's TLS: `None` without a certificate. Logs what is in force.
    pub fn server(&self, dep: &Deployment) -> Result<Option<TlsServer>> {
        let (cert, key, ca) = self.files(dep);
        let Some((cert, key)) = Self::identity(cert, key)? else {
            if let Some(ca) = ca {
                bail!(
                    "TLS: a CA bundle ({}) but no certificate: an expert worker needs \
                     --tls-cert and --tls-key for TLS (the CA bundle then makes it require \
                     client certificates)",
                    ca.display()
                );
            }
            tracing::info!("M2N: no TLS (plaintext TCP)");
            return Ok(None);
        };
        let t = TlsServer::from_pem_files(&cert, &key, ca.as_deref())?;
        match &ca {
            Some(ca) => tracing::info!(
                "M2N: TLS only, certificate {}, client certificates required (CA {})",
                cert.display(),
                ca.display()
            ),
            None => tracing::info!("M2N: TLS only, certificate {}", cert.display()),
        }
        Ok(Some(t))
    }

    /// A replica's (or status query's) TLS: `None` without a CA bundle. Logs what is in force.
    pub fn client(&self, dep: &Deployment) -> Result<Option<TlsClient>> {
        let (cert, key, ca) = self.files(dep);
        let id = Self::identity(cert, key)?;
        let Some(ca) = ca else {
            if let Some((c, _)) = id {
                bail!(
                    "TLS: a client certificate ({}) but no CA bundle to check the expert \
                     workers with (--tls-ca, {CA_ENV} or [security] tls_ca)",
                    c.display()
                );
            }
            tracing::info!("M2N: no TLS (plaintext TCP)");
            return Ok(None);
        };
        let t =
            TlsClient::from_pem_files(&ca, id.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))?;
        tracing::info!(
            "M2N: TLS only, expert workers checked against CA {}{}",
            ca.display(),
            match &id {
                Some((c, _)) => format!(", client certificate {}", c.display()),
                None => String::new(),
            }
        );
        Ok(Some(t))
    }

    /// The flags again, absolute, for child processes.
    pub fn to_args(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for (flag, p) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(p) = p {
                v.push(flag.to_string());
                v.push(
                    std::path::absolute(p)
                        .with_context(|| format!("locating {}", p.display()))?
                        .display()
                        .to_string(),
                );
            }
        }
        Ok(v)
    }
}

/// The cluster secret of this process: `flag` (`--cluster-secret-file`), else
/// `TANDEM_CLUSTER_SECRET`, else the deployment file's `[security] cluster_secret_file`.
/// Logs where it came from (never the secret).
pub fn cluster_secret(flag: Option<&Path>, dep: &Deployment) -> Result<Option<ClusterSecret>> {
    let env = match std::env::var(SECRET_ENV) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => bail!("{SECRET_ENV} is not UTF-8"),
    };
    match ClusterSecret::resolve(flag, env, dep.security.cluster_secret_file.as_deref())? {
        Some((secret, source)) => {
            tracing::info!("M2N: peers authenticate with the cluster secret from {source}");
            Ok(Some(secret))
        }
        None => {
            tracing::info!(
                "M2N: no cluster secret (--cluster-secret-file, {SECRET_ENV} or [security] \
                 cluster_secret_file): peers are not authenticated"
            );
            Ok(None)
        }
    }
}

fn parse_address_pair(s: &str) -> Result<(String, String), String> {
    tandem_core::deployment::parse_address_pair(s).map_err(|e| e.to_string())
}

impl RoleArgs {
    /// Resolves the rank (`--rank`, `--rank-from-hostname`, `TANDEM_RANK`) and applies
    /// `--address-map` to the deployment; every FROM must be one of its addresses.
    pub fn resolve(&mut self, dep: &mut Deployment) -> Result<()> {
        let a = &dep.addresses;
        if let Some((from, _)) = self
            .address_map
            .iter()
            .find(|(f, _)| !a.attention.iter().chain(&a.expert).any(|x| x == f))
        {
            bail!("--address-map {from}: the deployment lists no such address");
        }
        dep.addresses.remap(&self.address_map);
        if self.role.is_some() {
            let host = self
                .rank_from_hostname
                .then(tandem_k8s::rank::hostname)
                .flatten();
            let env = std::env::var(tandem_k8s::rank::RANK_ENV).ok();
            self.rank =
                tandem_k8s::rank::resolve_rank(self.rank_flag, self.rank_from_hostname, host, env)?;
        }
        Ok(())
    }
}

fn parse_wire_dtype(s: &str) -> Result<WireDtype, String> {
    WireDtype::parse(s).ok_or_else(|| format!("unknown wire dtype {s:?} (f32 or bf16)"))
}

pub fn check_addresses(dep: &Deployment) -> Result<()> {
    if dep.expert_workers == 0 {
        bail!("a multi-process deployment needs expert_workers >= 1 (0 means colocated)");
    }
    if dep.addresses.expert.len() != dep.expert_workers as usize {
        bail!(
            "the deployment has {} expert workers but [addresses] expert lists {} addresses",
            dep.expert_workers,
            dep.addresses.expert.len()
        );
    }
    Ok(())
}

/// What `tandem launch` needs of a deployment before it starts a child: a valid shape, one
/// address per expert worker and one HTTP address per attention replica.
pub fn check_launch(dep: &Deployment) -> Result<()> {
    dep.validate_shape()?;
    check_addresses(dep)?;
    if dep.addresses.attention.len() != dep.attention_replicas as usize {
        bail!(
            "the deployment has {} attention replicas but [addresses] attention lists {} (their HTTP addresses)",
            dep.attention_replicas,
            dep.addresses.attention.len()
        );
    }
    Ok(())
}

/// The built-in hardware catalog, with the entries of `extra` (a TOML file) merged in.
pub fn load_hw_catalog(extra: Option<&PathBuf>) -> Result<tandem_plan::HardwareCatalog> {
    let mut c =
        tandem_plan::HardwareCatalog::builtin().context("loading the built-in hardware catalog")?;
    if let Some(p) = extra {
        c.merge_file(p)
            .with_context(|| format!("loading hardware catalog {}", p.display()))?;
    }
    Ok(c)
}

/// The planner's shape of a model: a catalog name, a `config.json` (or its directory), or a
/// GGUF file (its metadata as the `config.json` it stands for).
pub fn resolve_model_shape(name_or_path: &str) -> Result<tandem_plan::ModelShape> {
    let src = ModelSource::of_path(Path::new(name_or_path));
    if let Some(p) = src.gguf().filter(|p| p.is_file()) {
        let g = tandem_model::gguf::GgufFile::open(p)?;
        let cfg = g.config_json()?;
        return Ok(tandem_plan::ModelShape::from_hf_config(
            &cfg.to_string(),
            name_or_path,
        )?);
    }
    Ok(tandem_plan::ModelCatalog::builtin()?.resolve(name_or_path)?)
}

/// The measured performance profile at `path`, if one is given.
pub fn load_profile(path: Option<&PathBuf>) -> Result<Option<tandem_plan::Profile>> {
    path.map(|p| {
        tandem_plan::Profile::load(p).with_context(|| format!("loading profile {}", p.display()))
    })
    .transpose()
}

/// Loads the model (the attention side without routed experts) and starts an engine: the
/// whole deployment in this process, or attention replica `rank` talking TCP to the expert
/// workers.
pub fn start_engine(
    src: &ModelSource,
    dep: Deployment,
    role: &RoleArgs,
    ty: LinearType,
) -> Result<(Engine, Option<Arc<Tokenizer>>)> {
    let tok = if src.has_tokenizer() {
        Some(Arc::new(Tokenizer::load(src.clone())?))
    } else {
        None
    };
    let load = |sel: &ExpertSelection| {
        let t = Instant::now();
        let model = Model::load_typed(src.clone(), sel, ty)
            .with_context(|| format!("loading {}", src.path().display()))?;
        tracing::info!(
            "loaded {} in {:.1}s: weights {}; {}",
            src.path().display(),
            t.elapsed().as_secs_f64(),
            model.weight_memory().describe(),
            tandem_model::KvCache::describe_per_token(&model.cfg)
        );
        anyhow::Ok(model)
    };
    let opts = EngineOptions {
        deployment: dep.clone(),
        peer_timeout: Duration::from_secs(role.peer_timeout_s.max(1)),
        ..EngineOptions::default()
    };
    match role.role {
        None => {
            if role.wire_dtype != WireDtype::F32 {
                bail!(
                    "--wire-dtype applies to the TCP links of --role attention; in-process \
                     workers pass hidden states in memory"
                );
            }
            let t = &role.tls;
            if t.tls_cert.is_some() || t.tls_key.is_some() || t.tls_ca.is_some() {
                bail!(
                    "--tls-cert, --tls-key and --tls-ca apply to the TCP links of a \
                     multi-process deployment (--role); in-process workers use none"
                );
            }
            let model = Arc::new(load(&ExpertSelection::All)?);
            Ok((Engine::start(model, tok.clone(), opts)?, tok))
        }
        Some(Role::Attention) => {
            check_addresses(&dep)?;
            let secret = cluster_secret(role.cluster_secret_file.as_deref(), &dep)?;
            let tls = role.tls.client(&dep)?;
            let model = Arc::new(load(&ExpertSelection::None)?);
            let link = TcpReplicaLink::connect(
                role.rank,
                dep.addresses.expert.clone(),
                Identity::new(&model, &dep)?,
                NetOptions {
                    wire_dtype: role.wire_dtype,
                    cluster_secret: secret,
                    tls_client: tls,
                    shared_memory: role.m2n_transport == M2nTransport::Auto,
                    shm_lending: tandem_engine::shm::Lending {
                        min: role.m2n_lend_min,
                        ..Default::default()
                    },
                    ..NetOptions::default()
                },
            );
            let probe = link.health_probe();
            let engine = Engine::start_remote(model, tok.clone(), opts, role.rank, Box::new(link))?;
            engine.set_health_probe(Box::new(probe));
            Ok((engine, tok))
        }
        Some(Role::Expert) => bail!("this command runs an attention replica, not an expert worker"),
    }
}

/// Runs expert worker `rank` of `dep` until the process is stopped, on `listen` (default:
/// its `[addresses] expert` entry), with `opts` (the cluster secret it proves, TLS, whether
/// it takes shared-memory offers).
pub fn run_expert(
    src: &ModelSource,
    dep: &Deployment,
    rank: u32,
    listen: Option<String>,
    opts: NetOptions,
    ty: LinearType,
) -> Result<()> {
    check_addresses(dep)?;
    let Some(addr) = listen.or_else(|| dep.addresses.expert.get(rank as usize).cloned()) else {
        bail!(
            "expert rank {rank}, but the deployment lists {} expert addresses",
            dep.addresses.expert.len()
        );
    };
    let cfg = tandem_model::ModelConfig::from_dir(src.clone())?;
    let placement = dep.placement_for(cfg.num_experts)?;
    let mine = placement.experts_of(rank);
    let t = Instant::now();
    let model = Model::load_typed(src.clone(), &ExpertSelection::Only(mine.clone()), ty)
        .with_context(|| format!("loading {}", src.path().display()))?;
    let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    tracing::info!(
        "expert worker {rank} listening on {} with experts {mine:?} (loaded in {:.1}s; weights {})",
        listener.local_addr()?,
        t.elapsed().as_secs_f64(),
        model.weight_memory().describe()
    );
    serve_expert(Arc::new(model), dep, rank, listener, opts)?;
    Ok(())
}

/// Runs expert worker `role.rank` of `dep` (the `serve --role expert` process): its cluster
/// secret, TLS and M2N transport from `role`, listening where [`expert_listen_address`] says
/// with `--host`/`--port` (`host`, `port`).
pub fn serve_expert_role(
    src: &ModelSource,
    dep: &Deployment,
    role: &RoleArgs,
    host: Option<&str>,
    port: Option<u16>,
    ty: LinearType,
) -> Result<()> {
    let secret = cluster_secret(role.cluster_secret_file.as_deref(), dep)?;
    let listen = expert_listen_address(
        host,
        port,
        dep.addresses.expert.get(role.rank as usize),
        secret.is_some(),
    )?;
    let opts = NetOptions {
        cluster_secret: secret,
        tls_server: role.tls.server(dep)?,
        shared_memory: role.m2n_transport == M2nTransport::Auto,
        shm_lending: tandem_engine::shm::Lending {
            min: role.m2n_lend_min,
            ..Default::default()
        },
        ..Default::default()
    };
    run_expert(src, dep, role.rank, listen, opts, ty)
}

/// Where an expert worker listens. Neither `--host` nor `--port`: its `[addresses] expert`
/// entry as written (`None` here). Otherwise `--host` (default: 0.0.0.0 with a cluster
/// secret, 127.0.0.1 without: an unauthenticated worker is not exposed unless asked for) on
/// `--port` (default: the port of its `[addresses]` entry, else any free port).
pub fn expert_listen_address(
    host: Option<&str>,
    port: Option<u16>,
    entry: Option<&String>,
    has_secret: bool,
) -> Result<Option<String>> {
    if host.is_none() && port.is_none() {
        return Ok(None);
    }
    let host = host.unwrap_or(if has_secret { "0.0.0.0" } else { "127.0.0.1" });
    let port = match (port, entry) {
        (Some(p), _) => p,
        (None, Some(e)) => e
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .with_context(|| format!("expert address {e:?} is not HOST:PORT"))?,
        (None, None) => 0,
    };
    Ok(Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }))
}

// -----------------------------------------------------------------------------------------
// The shape flags and batched generation
// -----------------------------------------------------------------------------------------

/// The deployment shape flags shared by `generate`, `serve` and the benchmarks: one
/// resolution for all of them ([`ShapeArgs::deployment_or_default`]).
#[derive(Args, Clone, Debug)]
pub struct ShapeArgs {
    /// Deployment file (TOML); the flags below override it.
    #[arg(long)]
    pub deployment: Option<PathBuf>,
    /// Attention replicas (n_a).
    #[arg(long)]
    pub attention_replicas: Option<u32>,
    /// Expert workers (N); 0 = colocated (each replica runs its own experts).
    #[arg(long)]
    pub expert_workers: Option<u32>,
    /// Micro-batches per iteration (m).
    #[arg(long)]
    pub micro_batches: Option<u32>,
    /// Threads per worker.
    #[arg(long)]
    pub threads_per_worker: Option<u32>,
    /// Pin workers to cores (replicas first, then expert workers).
    #[arg(long)]
    pub pin_cores: bool,
}

impl ShapeArgs {
    /// Whether any shape flag or a deployment file was given.
    pub fn is_explicit(&self) -> bool {
        self.deployment.is_some()
            || self.attention_replicas.is_some()
            || self.expert_workers.is_some()
            || self.micro_batches.is_some()
            || self.threads_per_worker.is_some()
            || self.pin_cores
    }

    /// The deployment the flags describe; with none at all (and no role), the default shape
    /// for this host and `model` (`tandem_plan::default_shape`: from this
    /// machine's cached `tandem profile` of the model if there is one, else the one-host
    /// rule), logged with its reason.
    pub fn deployment_or_default(&self, has_role: bool, model: &ModelSource) -> Result<Deployment> {
        let model = model.path();
        use tandem_plan::default_shape as ds;
        if self.is_explicit() || has_role {
            return self.deployment();
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cached = ds::profile_cache_path(&tandem_model::demo::cache_root(), model);
        let from_profile = || -> Result<ds::DefaultShape, String> {
            let profile = tandem_plan::Profile::load(&cached).map_err(|e| e.to_string())?;
            let shape =
                tandem_plan::model::ModelShape::from_path(model).map_err(|e| e.to_string())?;
            let machine = tandem_core::machine::machine_line(cores);
            ds::from_profile(&profile, &shape, cores, &machine)
        };
        let s = if cached.exists() {
            match from_profile() {
                Ok(s) => s,
                Err(why) => {
                    tracing::warn!("not using the profile {}: {why}", cached.display());
                    ds::default_shape(cores)
                }
            }
        } else {
            ds::default_shape(cores)
        };
        tracing::info!("shape: {}", s.reason);
        Ok(s.deployment)
    }

    pub fn deployment(&self) -> Result<Deployment> {
        let mut d = match &self.deployment {
            Some(p) => Deployment::load(p)?,
            None => Deployment::default(),
        };
        if let Some(v) = self.attention_replicas {
            d.attention_replicas = v;
        }
        if let Some(v) = self.expert_workers {
            d.expert_workers = v;
        }
        match self.micro_batches {
            Some(v) => d.micro_batches = v,
            // Flags that leave `m` open (no file to take it from) get the one default.
            None if self.deployment.is_none() && self.is_explicit() => {
                d.micro_batches = tandem_core::default_micro_batches(d.expert_workers)
            }
            None => {}
        }
        if let Some(v) = self.threads_per_worker {
            d.threads_per_worker = v;
        }
        if self.pin_cores {
            d.pin_cores = true;
        }
        d.validate_shape()?;
        Ok(d)
    }
}

/// Runs every prompt through the engine (prompts spread over the replicas) and returns the
/// generated token ids per prompt, in prompt order.
pub fn generate(
    engine: &Engine,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<(Vec<u32>, String)>> {
    let handles = prompts
        .iter()
        .map(|p| engine.add_request(p.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        let mut rx = h.rx;
        let (mut toks, mut text) = (Vec::new(), String::new());
        while let Some(o) = rx.blocking_recv() {
            toks.extend(o.token);
            text.push_str(&o.text);
            if let Some(f) = o.finish {
                if let FinishReason::Error(e) = f.reason {
                    bail!("request {} failed: {e}", h.id.0);
                }
                break;
            }
        }
        outs.push((toks, text));
    }
    Ok(outs)
}

// -----------------------------------------------------------------------------------------
// tandem launch: the supervisor
// -----------------------------------------------------------------------------------------

/// One child process of [`supervise`]: the `tandem` binary run with `args`.
pub struct Worker {
    pub name: String,
    pub args: Vec<String>,
    child: Option<Child>,
}

impl Worker {
    pub fn new(name: String, args: Vec<String>) -> Self {
        Self {
            name,
            args,
            child: None,
        }
    }
}

fn spawn_worker(w: &mut Worker) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tandem binary")?;
    let mut child = Command::new(exe)
        .args(&w.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", w.name))?;
    for (pipe, is_err) in [
        (
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            false,
        ),
        (
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            true,
        ),
    ] {
        let Some(pipe) = pipe else { continue };
        let name = w.name.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if is_err {
                    eprintln!("[{name}] {line}");
                } else {
                    println!("[{name}] {line}");
                }
            }
        });
    }
    tracing::info!("started {} (pid {})", w.name, child.id());
    w.child = Some(child);
    Ok(())
}

fn terminate(child: &mut Child) {
    // SIGTERM lets the server drain; `kill` is only the fallback below.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// Starts every worker (this executable, with its arguments; their output prefixed with
/// their name), starts one again when it exits if `restart` (it rejoins the running
/// deployment), and when `stop` is set or every worker has exited sends them SIGTERM, waits
/// up to `grace` and kills what is left. An error when a worker exited on its own without
/// `restart`.
pub fn supervise(
    workers: &mut [Worker],
    stop: &AtomicBool,
    restart: bool,
    grace: Duration,
    started: impl FnOnce(),
) -> Result<()> {
    for w in workers.iter_mut() {
        spawn_worker(w)?;
    }
    started();
    let mut failed = false;
    while !stop.load(Ordering::Relaxed) {
        let mut alive = 0;
        for w in workers.iter_mut() {
            let Some(c) = w.child.as_mut() else { continue };
            match c.try_wait() {
                Ok(None) => alive += 1,
                Ok(Some(st)) => {
                    tracing::error!("{} exited: {st}", w.name);
                    w.child = None;
                    if restart {
                        std::thread::sleep(Duration::from_millis(500));
                        spawn_worker(w)?;
                        alive += 1;
                    } else {
                        failed = true;
                    }
                }
                Err(e) => tracing::error!("{}: {e}", w.name),
            }
        }
        if alive == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    tracing::info!("stopping every worker");
    for w in workers.iter_mut() {
        if let Some(c) = w.child.as_mut() {
            terminate(c);
        }
    }
    let deadline = Instant::now() + grace;
    for w in workers.iter_mut() {
        if let Some(c) = w.child.as_mut() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !matches!(c.try_wait(), Ok(Some(_))) {
                tracing::warn!("{} did not stop in time: killing it", w.name);
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
    if failed {
        bail!("a worker exited on its own (use --restart to start it again)");
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// A flag set on Ctrl-C or SIGTERM (watched from a thread of its own).
pub fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(shutdown_signal());
        flag.store(true, Ordering::Relaxed);
    });
    Ok(stop)
}

// -----------------------------------------------------------------------------------------
// tandem status
// -----------------------------------------------------------------------------------------

#[derive(Args)]
pub struct StatusArgs {
    /// The deployment file.
    pub deployment: PathBuf,
    /// Seconds to wait for each worker.
    #[arg(long, default_value_t = 3)]
    pub timeout_s: u64,
    /// The cluster secret file (default: TANDEM_CLUSTER_SECRET, else the deployment's
    /// `[security]`): workers with a secret answer only queries that prove it.
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS: `--tls-ca` to query workers that have a certificate (`--tls-cert`/`--tls-key`:
    /// a client certificate for workers that require one).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Prints every worker's state as JSON; fails when one is unreachable or unhealthy.
pub fn status(a: StatusArgs) -> Result<()> {
    let dep = Deployment::load(&a.deployment)?;
    let secret = cluster_secret(a.cluster_secret_file.as_deref(), &dep)?;
    let tls = a.tls.client(&dep)?;
    let timeout = Duration::from_secs(a.timeout_s.max(1));
    let mut healthy = true;
    let mut experts = Vec::new();
    for (w, addr) in dep.addresses.expert.iter().enumerate() {
        experts.push(
            match query_status_with(addr, timeout, secret.as_ref(), tls.as_ref()) {
                Ok(r) => {
                    let connected = r.replicas.iter().filter(|p| p.is_some()).count();
                    serde_json::json!({"worker": w, "address": addr, "up": true,
                    "replicas_connected": connected, "report": r})
                }
                Err(e) => {
                    healthy = false;
                    serde_json::json!({"worker": w, "address": addr, "up": false, "error": e})
                }
            },
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    let mut replicas = Vec::new();
    for (r, addr) in dep.addresses.attention.iter().enumerate() {
        let url = format!("http://{addr}/health");
        let res = rt.block_on(async {
            let resp = client.get(&url).send().await?;
            let code = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Ok::<_, reqwest::Error>((code, body))
        });
        replicas.push(match res {
            Ok((code, body)) => {
                healthy &= code == 200;
                serde_json::json!({"replica": r, "address": addr, "up": code == 200,
                    "http_status": code, "body": body})
            }
            Err(e) => {
                healthy = false;
                serde_json::json!({"replica": r, "address": addr, "up": false,
                    "error": e.to_string()})
            }
        });
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "deployment": a.deployment.display().to_string(),
            "healthy": healthy,
            "expert_workers": experts,
            "attention_replicas": replicas,
        }))?
    );
    if !healthy {
        bail!("some workers are down or unhealthy");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TlsArgs;
    use std::path::PathBuf;
    use tandem_core::Deployment;

    fn dep(cert: Option<&str>, key: Option<&str>, ca: Option<&str>) -> Deployment {
        let mut d = Deployment::default();
        d.security.tls_cert = cert.map(PathBuf::from);
        d.security.tls_key = key.map(PathBuf::from);
        d.security.tls_ca = ca.map(PathBuf::from);
        d
    }

    /// A flag beats the deployment file, file by file (the environment variables sit
    /// between them; this test leaves the process environment alone).
    #[test]
    fn tls_files_come_from_the_flag_else_the_deployment_file() {
        let a = TlsArgs {
            tls_ca: Some("/flag/ca.pem".into()),
            ..TlsArgs::default()
        };
        let (cert, key, ca) = a.files(&dep(Some("/dep/w.pem"), Some("/dep/w.key"), None));
        if std::env::var_os(super::CERT_ENV).is_none() {
            assert_eq!(cert, Some(PathBuf::from("/dep/w.pem")));
        }
        if std::env::var_os(super::KEY_ENV).is_none() {
            assert_eq!(key, Some(PathBuf::from("/dep/w.key")));
        }
        assert_eq!(ca, Some(PathBuf::from("/flag/ca.pem")));
    }

    #[test]
    fn half_a_tls_set_up_is_refused_with_what_is_missing() {
        if [super::CERT_ENV, super::KEY_ENV, super::CA_ENV]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            return; // the environment would fill in what this test leaves out
        }
        let none = TlsArgs::default();
        let e = none
            .server(&dep(Some("/x/w.pem"), None, None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/w.pem") && e.contains("no key"), "{e}");
        let e = none
            .server(&dep(None, None, Some("/x/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/ca.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = none
            .client(&dep(Some("/x/w.pem"), Some("/x/w.key"), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CA bundle"), "{e}");
        let e = none
            .client(&dep(None, None, Some("/x/missing-ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/missing-ca.pem"), "{e}");
        // Nothing configured: plaintext on both sides.
        assert!(none.server(&dep(None, None, None)).unwrap().is_none());
        assert!(none.client(&dep(None, None, None)).unwrap().is_none());
    }

    /// `tandem launch` refuses a deployment file without one HTTP address per attention
    /// replica, naming both counts, and accepts it once the address is there.
    #[test]
    fn launch_wants_an_http_address_per_attention_replica() {
        let mut d = Deployment::default();
        d.addresses.expert = vec!["127.0.0.1:7100".into()];
        let e = super::check_launch(&d).unwrap_err().to_string();
        assert!(
            e.contains("1 attention replicas") && e.contains("attention lists 0"),
            "{e}"
        );
        d.addresses.attention = vec!["127.0.0.1:8100".into()];
        super::check_launch(&d).unwrap();
    }
}

#[cfg(test)]
mod listen_tests {
    use super::expert_listen_address;

    #[test]
    fn expert_listen_address_rule() {
        let entry = "10.0.0.3:9000".to_string();
        // Nothing given: the deployment's entry as written.
        assert_eq!(
            expert_listen_address(None, None, Some(&entry), false).unwrap(),
            None
        );
        // A port alone: loopback without a secret, every interface with one.
        assert_eq!(
            expert_listen_address(None, Some(7000), Some(&entry), false).unwrap(),
            Some("127.0.0.1:7000".into())
        );
        assert_eq!(
            expert_listen_address(None, Some(7000), Some(&entry), true).unwrap(),
            Some("0.0.0.0:7000".into())
        );
        // A host alone keeps the deployment's port.
        assert_eq!(
            expert_listen_address(Some("0.0.0.0"), None, Some(&entry), false).unwrap(),
            Some("0.0.0.0:9000".into())
        );
        assert_eq!(
            expert_listen_address(Some("::1"), None, None, false).unwrap(),
            Some("[::1]:0".into())
        );
        let bad = "nowhere".to_string();
        assert!(expert_listen_address(Some("127.0.0.1"), None, Some(&bad), false).is_err());
    }
}
