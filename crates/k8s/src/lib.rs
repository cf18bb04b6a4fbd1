//! Kubernetes manifests for a multi-process tandem deployment.
//!
//! From a deployment file (hand-written or written by the planner) and the hardware catalog,
//! [`generate`] builds typed Kubernetes objects (`k8s-openapi`, so every field is checked
//! against the API schema at compile time):
//!
//! * per role (attention replicas, expert workers) a StatefulSet with a headless Service of
//!   the same name, so worker `i` is `<name>-<role>-<i>.<name>-<role>.<ns>.svc.<domain>`, and
//!   a PodDisruptionBudget;
//! * a ConfigMap holding the deployment file whose `[addresses]` are those names;
//! * a ClusterIP Service for the OpenAI API in front of the attention replicas, and an
//!   optional Ingress.
//!
//! Each pod finds its rank from its own name (`--rank-from-hostname`) and, as a cross-check,
//! from the pod-index label (`TANDEM_RANK`, see [`rank`]). [`Manifests::write`] writes one
//! YAML file per object and a `kustomization.yaml` listing them (`kubectl apply -k DIR`).
//!
//! Owns: the manifests as typed objects and their YAML. May not talk to a cluster (it writes
//! files; `kubectl` applies them) nor depend on the runtime crates.

mod pod;
pub mod rank;

pub use k8s_openapi;
pub use serde_yaml;

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, ServiceBackendPort,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tandem_core::Deployment;
use tandem_plan::HardwareCatalog;

/// Where the ConfigMap's deployment file is mounted in every pod.
pub const CONFIG_DIR: &str = "/etc/tandem";
/// The deployment file's name in the ConfigMap (and in [`CONFIG_DIR`]).
pub const DEPLOYMENT_KEY: &str = "deployment.toml";
/// The key of the API key in the operator's Secret (`--api-key-secret`).
pub const API_KEY_SECRET_KEY: &str = "api-key";
/// The key of the M2N cluster secret in the operator's Secret (`--cluster-secret`).
pub const CLUSTER_SECRET_KEY: &str = "cluster-secret";
/// Environment variable of the API key (read by `tandem serve`).
pub const API_KEY_ENV: &str = "TANDEM_API_KEY";
/// Environment variable of the M2N cluster secret.
pub const CLUSTER_SECRET_ENV: &str = "TANDEM_CLUSTER_SECRET";
/// Seconds an attention pod keeps serving after it is told to stop, before the server drains:
/// the time for its endpoint to leave the API Service everywhere.
pub const PRESTOP_SLEEP_S: i64 = 5;
/// Seconds the kubelet allows beyond the drain (`--shutdown-grace-s`) before SIGKILL.
pub const EXIT_MARGIN_S: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Rank(String),
    #[error("hardware: {0}")]
    Hardware(#[from] tandem_plan::PlanError),
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, K8sError>;

/// The two roles, each a StatefulSet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Attention,
    Expert,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Attention => "attention",
            Role::Expert => "expert",
        }
    }
}

/// Where the pods find the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    /// The checkpoint directory (or GGUF file) inside the container: `--model` of every pod.
    pub path: String,
    /// A PersistentVolumeClaim holding the model, mounted read-only at `mount`; none: the
    /// path is in the image.
    pub pvc: Option<String>,
    pub mount: String,
}

/// CPU and memory of one role's pods, replacing what the plan says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceOverrides {
    /// A Kubernetes quantity: `4`, `3500m`.
    pub cpu: Option<String>,
    /// A Kubernetes quantity: `16Gi`.
    pub memory: Option<String>,
}

/// Everything the manifests need beyond the deployment file.
#[derive(Debug, Clone)]
pub struct K8sOptions {
    /// Prefix of every object's name (`<name>-attention`, `<name>-expert`, ...).
    pub name: String,
    pub namespace: String,
    /// DNS domain of the cluster (`cluster.local`).
    pub cluster_domain: String,
    /// Container image with `tandem` on its PATH (the repository's Dockerfile).
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub model: ModelSource,
    /// Port of the OpenAI API on every attention replica.
    pub http_port: u16,
    /// Port expert workers listen on for M2N.
    pub m2n_port: u16,
    /// Secret holding the API key under [`API_KEY_SECRET_KEY`]; none: an open API.
    pub api_key_secret: Option<String>,
    /// Secret holding the M2N cluster secret under [`CLUSTER_SECRET_KEY`].
    pub cluster_secret: Option<String>,
    /// An Ingress for the API, with this host (None: any host) ...
    pub ingress: bool,
    pub ingress_host: Option<String>,
    pub ingress_class: Option<String>,
    /// `serve --shutdown-grace-s`: seconds a stopping replica drains its requests.
    pub shutdown_grace_s: u64,
    pub attention_resources: ResourceOverrides,
    pub expert_resources: ResourceOverrides,
    /// More `tandem serve` flags for every pod (`--dtype bf16`, `--wire-dtype bf16`, ...).
    pub extra_args: Vec<String>,
}

impl K8sOptions {
    /// The defaults for a model at `model_path` inside the image.
    pub fn new(model_path: &str) -> Self {
        Self {
            name: "tandem".into(),
            namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
            image: "tandem:latest".into(),
            image_pull_policy: None,
            model: ModelSource {
                path: model_path.into(),
                pvc: None,
                mount: "/models".into(),
            },
            http_port: 8000,
            m2n_port: 9000,
            api_key_secret: None,
            cluster_secret: None,
            ingress: false,
            ingress_host: None,
            ingress_class: None,
            shutdown_grace_s: 30,
            attention_resources: ResourceOverrides::default(),
            expert_resources: ResourceOverrides::default(),
            extra_args: Vec::new(),
        }
    }

    /// The StatefulSet (and headless Service) of a role.
    pub fn role_name(&self, role: Role) -> String {
        format!("{}-{}", self.name, role.as_str())
    }

    /// Stable DNS name (with port) of worker `i` of a role.
    pub fn worker_address(&self, role: Role, i: u32) -> String {
        let sts = self.role_name(role);
        let port = match role {
            Role::Attention => self.http_port,
            Role::Expert => self.m2n_port,
        };
        format!(
            "{sts}-{i}.{sts}.{}.svc.{}:{port}",
            self.namespace, self.cluster_domain
        )
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(K8sError::Invalid(m));
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && s.as_bytes()[0].is_ascii_lowercase()
                && !s.ends_with('-')
        };
        // StatefulSet pods carry a controller-revision-hash label of <sts>-<10 chars>, which
        // must fit a 63-character label value: the StatefulSet name stays under 52.
        if !label_ok(&self.name) || self.name.len() > 40 {
            return bad(format!(
                "name {:?}: lower-case letters, digits and '-', starting with a letter, at most 40 characters",
                self.name
            ));
        }
        if !label_ok(&self.namespace) || self.namespace.len() > 63 {
            return bad(format!("namespace {:?} is not a DNS label", self.namespace));
        }
        if self.image.trim().is_empty() {
            return bad("--image is empty".into());
        }
        if self.http_port == 0 || self.m2n_port == 0 {
            return bad("ports must be positive".into());
        }
        if self.model.path.trim().is_empty() {
            return bad("the model path is empty".into());
        }
        if self.model.pvc.is_some() {
            let m = self.model.mount.trim_end_matches('/');
            if !(self.model.path == m || self.model.path.starts_with(&format!("{m}/"))) {
                return bad(format!(
                    "the model path {:?} is not inside the volume mounted at {:?}",
                    self.model.path, self.model.mount
                ));
            }
        }
        if self.ingress_host.is_some() && !self.ingress {
            return bad("an ingress host without an Ingress".into());
        }
        Ok(())
    }
}

/// One role's objects.
#[derive(Debug, Clone)]
pub struct RoleObjects {
    pub stateful_set: StatefulSet,
    /// Headless: gives every pod of the StatefulSet its DNS name.
    pub headless: Service,
    pub pdb: PodDisruptionBudget,
}

/// Every object of a deployment.
#[derive(Debug, Clone)]
pub struct Manifests {
    /// The deployment file the pods read (addresses = the pods' DNS names).
    pub deployment: Deployment,
    pub config_map: ConfigMap,
    pub attention: RoleObjects,
    pub expert: RoleObjects,
    /// ClusterIP Service of the OpenAI API over every attention replica.
    pub api_service: Service,
    pub ingress: Option<Ingress>,
}

/// `app.kubernetes.io` labels of a role's pods (also their selector).
pub fn role_labels(o: &K8sOptions, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "tandem".to_string()),
        ("app.kubernetes.io/instance".to_string(), o.name.clone()),
        (
            "app.kubernetes.io/component".to_string(),
            role.as_str().to_string(),
        ),
    ])
}

fn meta(o: &K8sOptions, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(o.namespace.clone()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

/// Builds every object for `dep` (disaggregated: `expert_workers >= 1`). Hardware names in
/// `dep.plan` are looked up in `catalog` for node placement and devices per pod.
pub fn generate(dep: &Deployment, catalog: &HardwareCatalog, o: &K8sOptions) -> Result<Manifests> {
    o.validate()?;
    dep.validate_shape()
        .map_err(|e| K8sError::Invalid(e.to_string()))?;
    if dep.expert_workers == 0 {
        return Err(K8sError::Invalid(
            "this deployment is colocated (expert_workers = 0): it runs as one `tandem serve` \
             process per replica, not as separate roles; the Kubernetes manifests are for \
             disaggregated deployments"
                .into(),
        ));
    }
    let mut d = dep.clone();
    d.addresses.attention = (0..d.attention_replicas)
        .map(|i| o.worker_address(Role::Attention, i))
        .collect();
    d.addresses.expert = (0..d.expert_workers)
        .map(|i| o.worker_address(Role::Expert, i))
        .collect();
    let toml_text = d.to_toml_string();
    let config_name = format!("{}-deployment", o.name);
    let mut cm_labels = role_labels(o, Role::Attention);
    cm_labels.remove("app.kubernetes.io/component");
    let config_map = ConfigMap {
        metadata: meta(o, config_name.clone(), cm_labels.clone()),
        data: Some(BTreeMap::from([(
            DEPLOYMENT_KEY.to_string(),
            toml_text.clone(),
        )])),
        ..ConfigMap::default()
    };
    let hash = fnv64(toml_text.as_bytes());
    let attention = role_objects(o, &d, catalog, Role::Attention, &config_name, hash)?;
    let expert = role_objects(o, &d, catalog, Role::Expert, &config_name, hash)?;
    let api_service = Service {
        metadata: meta(o, o.name.clone(), cm_labels),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(role_labels(o, Role::Attention)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: o.http_port.into(),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let ingress = o.ingress.then(|| api_ingress(o));
    Ok(Manifests {
        deployment: d,
        config_map,
        attention,
        expert,
        api_service,
        ingress,
    })
}

fn role_objects(
    o: &K8sOptions,
    d: &Deployment,
    catalog: &HardwareCatalog,
    role: Role,
    config_name: &str,
    hash: u64,
) -> Result<RoleObjects> {
    let name = o.role_name(role);
    let labels = role_labels(o, role);
    let (replicas, port_name, port) = match role {
        Role::Attention => (d.attention_replicas, "http", o.http_port),
        Role::Expert => (d.expert_workers, "m2n", o.m2n_port),
    };
    let headless = Service {
        metadata: meta(o, name.clone(), labels.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Workers reach each other by name while they start (an expert worker is only
            // ready once it listens; a replica connects as soon as it can resolve it).
            publish_not_ready_addresses: Some(true),
            selector: Some(labels.clone()),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port: port.into(),
                target_port: Some(IntOrString::String(port_name.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let template = pod::template(o, d, catalog, role, config_name, hash)?;
    let stateful_set = StatefulSet {
        metadata: meta(o, name.clone(), labels.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(name.clone()),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            // Start every worker at once: the M2N protocol takes workers in any order.
            pod_management_policy: Some("Parallel".into()),
            // Updates replace one pod at a time, highest ordinal first: expert worker 0 (the
            // membership coordinator) last, once every other worker runs the new revision.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    max_unavailable: Some(IntOrString::Int(1)),
                    partition: Some(0),
                }),
            }),
            // An expert worker counts as available only after the replicas had time to
            // reconnect and rejoin (a new epoch), so the next one is not taken before.
            min_ready_seconds: Some(match role {
                Role::Attention => 0,
                Role::Expert => 10,
            }),
            template,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: meta(o, name, labels.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    Ok(RoleObjects {
        stateful_set,
        headless,
        pdb,
    })
}

fn api_ingress(o: &K8sOptions) -> Ingress {
    let mut labels = role_labels(o, Role::Attention);
    labels.remove("app.kubernetes.io/component");
    Ingress {
        metadata: meta(o, o.name.clone(), labels),
        spec: Some(IngressSpec {
            ingress_class_name: o.ingress_class.clone(),
            rules: Some(vec![IngressRule {
                host: o.ingress_host.clone(),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: o.name.clone(),
                                port: Some(ServiceBackendPort {
                                    name: Some("http".into()),
                                    number: None,
                                }),
                            }),
                            ..IngressBackend::default()
                        },
                    }],
                }),
            }]),
            ..IngressSpec::default()
        }),
        ..Ingress::default()
    }
}

/// FNV-1a, 64 bits: the pods' annotation of the deployment file, so that a changed file rolls
/// the StatefulSets (a ConfigMap change alone restarts nothing).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Serialize)]
struct Kustomization<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    resources: Vec<String>,
}

fn yaml_file<T: Serialize>(kind: &str, obj: &T, name: &str) -> Result<(String, String)> {
    let body = serde_yaml::to_string(obj)?;
    Ok((
        format!("{}-{name}.yaml", kind.to_ascii_lowercase()),
        format!("# Generated by `tandem k8s` (or `tandem plan --k8s`).\n{body}"),
    ))
}

impl Manifests {
    /// (file name, YAML) of every object, then `kustomization.yaml` listing them.
    pub fn files(&self) -> Result<Vec<(String, String)>> {
        let n = |m: &ObjectMeta| m.name.clone().unwrap_or_default();
        let mut v = vec![yaml_file(
            "ConfigMap",
            &self.config_map,
            &n(&self.config_map.metadata),
        )?];
        for r in [&self.expert, &self.attention] {
            let name = n(&r.stateful_set.metadata);
            v.push(yaml_file("Service", &r.headless, &name)?);
            v.push(yaml_file("StatefulSet", &r.stateful_set, &name)?);
            v.push(yaml_file("PodDisruptionBudget", &r.pdb, &name)?);
        }
        v.push(yaml_file(
            "Service",
            &self.api_service,
            &n(&self.api_service.metadata),
        )?);
        if let Some(i) = &self.ingress {
            v.push(yaml_file("Ingress", i, &n(&i.metadata))?);
        }
        let k = Kustomization {
            api_version: "kustomize.config.k8s.io/v1beta1",
            kind: "Kustomization",
            resources: v.iter().map(|(f, _)| f.clone()).collect(),
        };
        v.push((
            "kustomization.yaml".into(),
            format!(
                "# Generated by `tandem k8s`: kubectl apply -k <this directory>\n{}",
                serde_yaml::to_string(&k)?
            ),
        ));
        Ok(v)
    }

    /// Writes [`Manifests::files`] into `dir` (created if missing); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| K8sError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut out = Vec::new();
        for (f, text) in self.files()? {
            let p = dir.join(f);
            std::fs::write(&p, text).map_err(io(&p))?;
            out.push(p);
        }
        Ok(out)
    }
}
