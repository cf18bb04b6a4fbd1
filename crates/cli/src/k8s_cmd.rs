//! `tandem k8s` and `tandem plan --k8s`: flags for the Kubernetes manifests; the generator
//! is `tandem-k8s`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tandem_core::Deployment;
use tandem_k8s::{K8sOptions, ModelSource, ResourceOverrides};
use tandem_plan::HardwareCatalog;

/// What the manifests need beyond the deployment file.
#[derive(Debug, Args, Clone)]
pub struct K8sArgs {
    /// The model inside the container (`--model` of every pod): a path in the image, or in
    /// the --model-pvc volume.
    #[arg(long)]
    pub model_path: Option<String>,
    /// PersistentVolumeClaim holding the model (ReadOnlyMany across nodes), mounted
    /// read-only at --model-mount.
    #[arg(long)]
    pub model_pvc: Option<String>,
    #[arg(long, default_value = "/models")]
    pub model_mount: String,
    /// Container image with `tandem` on its PATH (see the Dockerfile).
    #[arg(long, default_value = "tandem:latest")]
    pub image: String,
    #[arg(long)]
    pub image_pull_policy: Option<String>,
    /// Prefix of every object's name.
    #[arg(long, default_value = "tandem")]
    pub name: String,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    #[arg(long, default_value_t = 9000)]
    pub m2n_port: u16,
    /// Secret with the API key under `api-key` (TANDEM_API_KEY of the replicas).
    #[arg(long)]
    pub api_key_secret: Option<String>,
    /// Secret with the M2N cluster secret under `cluster-secret` (TANDEM_CLUSTER_SECRET).
    #[arg(long)]
    pub cluster_secret: Option<String>,
    /// Add an Ingress for the API.
    #[arg(long)]
    pub ingress: bool,
    #[arg(long, requires = "ingress")]
    pub ingress_host: Option<String>,
    #[arg(long, requires = "ingress")]
    pub ingress_class: Option<String>,
    /// `serve --shutdown-grace-s` of the replicas; the pods' termination grace period
    /// covers it.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// CPU of an attention pod (a Kubernetes quantity; default: threads_per_worker + 1).
    #[arg(long)]
    pub attention_cpu: Option<String>,
    /// Memory of an attention pod (default: from the plan, else unset).
    #[arg(long)]
    pub attention_memory: Option<String>,
    /// CPU of an expert pod (default: threads_per_worker).
    #[arg(long)]
    pub expert_cpu: Option<String>,
    #[arg(long)]
    pub expert_memory: Option<String>,
    /// One more `tandem serve` argument for every pod (repeatable; e.g.
    /// `--serve-arg=--dtype --serve-arg=bf16`).
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
}

impl K8sArgs {
    fn options(&self) -> Result<K8sOptions> {
        let path = self
            .model_path
            .clone()
            .context("the manifests need --model-path (the model inside the container)")?;
        Ok(K8sOptions {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            cluster_domain: self.cluster_domain.clone(),
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            model: ModelSource {
                path,
                pvc: self.model_pvc.clone(),
                mount: self.model_mount.clone(),
            },
            http_port: self.http_port,
            m2n_port: self.m2n_port,
            api_key_secret: self.api_key_secret.clone(),
            cluster_secret: self.cluster_secret.clone(),
            ingress: self.ingress,
            ingress_host: self.ingress_host.clone(),
            ingress_class: self.ingress_class.clone(),
            shutdown_grace_s: self.shutdown_grace_s,
            attention_resources: ResourceOverrides {
                cpu: self.attention_cpu.clone(),
                memory: self.attention_memory.clone(),
            },
            expert_resources: ResourceOverrides {
                cpu: self.expert_cpu.clone(),
                memory: self.expert_memory.clone(),
            },
            extra_args: self.serve_arg.clone(),
        })
    }

    /// Writes the manifests of `dep` into `dir`.
    pub fn write(&self, dep: &Deployment, catalog: &HardwareCatalog, dir: &Path) -> Result<()> {
        let m = tandem_k8s::generate(dep, catalog, &self.options()?)
            .context("building the Kubernetes manifests")?;
        let files = m.write(dir)?;
        let d = dir.display();
        eprintln!(
            "wrote {} Kubernetes manifests to {d} (kubectl apply -k {d})",
            files.len()
        );
        Ok(())
    }
}

/// `tandem k8s`: manifests for a deployment file.
#[derive(Debug, Args)]
pub struct K8sCmdArgs {
    /// The deployment file (hand-written or from `tandem plan --out`); its `[addresses]` are
    /// replaced by the pods' DNS names.
    #[arg(long)]
    pub deployment: PathBuf,
    /// Output directory: one YAML file per object and a kustomization.yaml.
    #[arg(long)]
    pub out: PathBuf,
    /// Extra hardware catalog (TOML): devices or node labels of your pools.
    #[arg(long)]
    pub hw_catalog: Option<PathBuf>,
    #[command(flatten)]
    pub k8s: K8sArgs,
}

pub fn run(a: K8sCmdArgs) -> Result<()> {
    let dep = Deployment::load(&a.deployment)?;
    let cat = tandem_deploy::load_hw_catalog(a.hw_catalog.as_ref())?;
    a.k8s.write(&dep, &cat, &a.out)
}
