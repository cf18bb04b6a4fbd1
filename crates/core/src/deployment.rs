//! The deployment shape: how many attention replicas and expert workers, where each expert
//! lives, how many micro-batches, and the batch limits. Read from and written to TOML; the
//! planner writes it, the engine and the launcher read it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("cannot read deployment file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse deployment file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid deployment: {0}")]
    Invalid(String),
}

/// Where each routed expert lives. `workers[e]` lists the expert workers holding expert `e`
/// (the same placement for every layer). More than one worker means the expert is replicated
/// and its tokens are split between the copies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertPlacement {
    pub workers: Vec<Vec<u32>>,
}

impl ExpertPlacement {
    /// Contiguous ranges: expert `e` goes to worker `e * n / num_experts`.
    pub fn contiguous(num_experts: usize, num_workers: usize) -> Self {
        let n = num_workers.max(1);
        let workers = (0..num_experts)
            .map(|e| vec![(e * n / num_experts.max(1)) as u32])
            .collect();
        Self { workers }
    }

    /// Experts held by `worker` (in expert order).
    pub fn experts_of(&self, worker: u32) -> Vec<u32> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, ws)| ws.contains(&worker))
            .map(|(e, _)| e as u32)
            .collect()
    }
}

/// Optional addresses of every worker, for multi-process deployments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Addresses {
    #[serde(default)]
    pub attention: Vec<String>,
    #[serde(default)]
    pub expert: Vec<String>,
}

impl Addresses {
    /// Replaces every address equal to the `FROM` of a pair by its `TO` (`--address-map`:
    /// the names a Kubernetes deployment file lists, run elsewhere, e.g. on loopback in a
    /// test); returns how many addresses changed.
    pub fn remap(&mut self, map: &[(String, String)]) -> usize {
        let mut n = 0;
        for a in self.attention.iter_mut().chain(self.expert.iter_mut()) {
            if let Some((_, to)) = map.iter().find(|(from, _)| from == a) {
                *a = to.clone();
                n += 1;
            }
        }
        n
    }
}

/// `FROM=TO`, two `HOST:PORT` addresses (`--address-map`).
pub fn parse_address_pair(s: &str) -> Result<(String, String), DeploymentError> {
    let bad =
        || DeploymentError::Invalid(format!("address map {s:?} is not FROM=TO, two HOST:PORT"));
    let (from, to) = s.split_once('=').ok_or_else(bad)?;
    for a in [from, to] {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
            _ => return Err(bad()),
        }
    }
    Ok((from.to_string(), to.to_string()))
}

/// Free-form provenance written by the planner (hardware, TP degrees, predicted numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PlanInfo {
    #[serde(default)]
    pub attention_hw: Option<String>,
    #[serde(default)]
    pub expert_hw: Option<String>,
    #[serde(default)]
    pub tp_attention: Option<u32>,
    #[serde(default)]
    pub tp_expert: Option<u32>,
    #[serde(default)]
    pub global_batch: Option<u32>,
    #[serde(default)]
    pub predicted_tokens_per_s: Option<f64>,
    #[serde(default)]
    pub predicted_tbt_ms: Option<f64>,
    /// Planned bytes in use per attention device (weights + KV), which sizes the pods'
    /// memory on Kubernetes.
    #[serde(default)]
    pub attention_mem_bytes: Option<f64>,
    /// Planned bytes in use per expert device.
    #[serde(default)]
    pub expert_mem_bytes: Option<f64>,
}

/// `[security]`: how the deployment's processes authenticate each other on M2N.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// A file holding the cluster secret every process proves in the M2N handshake (one
    /// trailing newline is dropped). Relative paths are relative to the deployment file's
    /// directory ([`Deployment::load`] makes them absolute). `--cluster-secret-file` and
    /// `TANDEM_CLUSTER_SECRET` take precedence over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS on M2N (expert workers): the PEM certificate chain (leaf first) a worker presents.
    /// With `tls_key`, the worker accepts only TLS. `--tls-cert` and `TANDEM_TLS_CERT` take
    /// precedence. Relative to the deployment file like `cluster_secret_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert` (`--tls-key`, `TANDEM_TLS_KEY` take precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The PEM CA bundle that workers' certificates are checked against: with it, replicas
    /// and `tandem status` connect only with TLS; on an expert worker, it requires client
    /// certificates signed by it (mutual TLS). `--tls-ca`, `TANDEM_TLS_CA` take precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
}

impl Security {
    fn is_empty(&self) -> bool {
        self.cluster_secret_file.is_none()
            && self.tls_cert.is_none()
            && self.tls_key.is_none()
            && self.tls_ca.is_none()
    }
}

/// The most attention replicas one deployment can have: the M2N protocol carries the
/// members of an iteration as a [`crate::Members`] set.
pub const MAX_ATTENTION_REPLICAS: u32 = crate::Members::CAPACITY as u32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// `n_a`: attention replicas.
    #[serde(default = "one")]
    pub attention_replicas: u32,
    /// `N`: expert workers. 0 means colocated: the replica runs its own experts.
    #[serde(default = "one")]
    pub expert_workers: u32,
    /// `m`: micro-batches per iteration. A deployment file without it runs 1; shape flags
    /// without it run [`default_micro_batches`].
    #[serde(default = "one")]
    pub micro_batches: u32,
    /// Expert placement; contiguous ranges when absent.
    #[serde(default)]
    pub placement: Option<ExpertPlacement>,
    /// Per replica: most sequences in one iteration.
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: u32,
    /// Per replica: most tokens (prefill + decode) in one iteration.
    #[serde(default = "default_max_num_batched_tokens")]
    pub max_num_batched_tokens: u32,
    /// Tokens per KV block.
    #[serde(default = "default_block_size")]
    pub kv_block_size: u32,
    /// Per replica: KV blocks. 0 lets the engine size it from `kv_cache_bytes`.
    #[serde(default)]
    pub num_kv_blocks: u32,
    /// Threads per worker (one rayon pool each).
    #[serde(default = "one")]
    pub threads_per_worker: u32,
    /// Pin worker pools to cores (replicas first, then expert workers, round-robin).
    #[serde(default)]
    pub pin_cores: bool,
    #[serde(default)]
    pub addresses: Addresses,
    #[serde(default)]
    pub plan: PlanInfo,
    #[serde(default, skip_serializing_if = "Security::is_empty")]
    pub security: Security,
}

fn one() -> u32 {
    1
}
fn default_max_num_seqs() -> u32 {
    256
}
fn default_max_num_batched_tokens() -> u32 {
    2048
}
fn default_block_size() -> u32 {
    16
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            attention_replicas: 1,
            expert_workers: 1,
            micro_batches: 1,
            placement: None,
            max_num_seqs: default_max_num_seqs(),
            max_num_batched_tokens: default_max_num_batched_tokens(),
            kv_block_size: default_block_size(),
            num_kv_blocks: 0,
            threads_per_worker: 1,
            pin_cores: false,
            addresses: Addresses::default(),
            plan: PlanInfo::default(),
            security: Security::default(),
        }
    }
}

/// The micro-batches a shape given by flags runs when they name none (`tandem generate`,
/// `serve`, `bench engine` and the default one-host shape all ask here): disaggregated
/// (`expert_workers > 0`) keeps a batch in flight by ping-ponging two micro-batches;
/// colocated has nothing to overlap and runs one.
pub fn default_micro_batches(expert_workers: u32) -> u32 {
    if expert_workers > 0 {
        2
    } else {
        1
    }
}

impl Deployment {
    pub fn from_toml_str(s: &str, path: &str) -> Result<Self, DeploymentError> {
        let d: Deployment = toml::from_str(s).map_err(|source| DeploymentError::Parse {
            path: path.to_string(),
            source,
        })?;
        d.validate_shape()?;
        Ok(d)
    }

    /// Reads and checks a deployment file; the relative paths of `[security]` are made
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, DeploymentError> {
        let s = std::fs::read_to_string(path).map_err(|source| DeploymentError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut d = Self::from_toml_str(&s, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let sec = &mut d.security;
        for f in [
            &mut sec.cluster_secret_file,
            &mut sec.tls_cert,
            &mut sec.tls_key,
            &mut sec.tls_ca,
        ]
        .into_iter()
        .flatten()
        {
            if f.is_relative() {
                *f = dir.join(&*f);
            }
        }
        Ok(d)
    }

    pub fn to_toml_string(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks that need no model.
    pub fn validate_shape(&self) -> Result<(), DeploymentError> {
        let bad = |m: &str| Err(DeploymentError::Invalid(m.to_string()));
        if self.attention_replicas == 0 {
            return bad("attention_replicas must be at least 1");
        }
        if self.attention_replicas > MAX_ATTENTION_REPLICAS {
            return Err(DeploymentError::Invalid(format!(
                "attention_replicas = {}: at most {MAX_ATTENTION_REPLICAS} are supported (the \
                 M2N protocol keeps the members of an iteration in a 64-bit set)",
                self.attention_replicas
            )));
        }
        if self.micro_batches == 0 {
            return bad("micro_batches must be at least 1");
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return bad("max_num_seqs and max_num_batched_tokens must be positive");
        }
        if self.kv_block_size == 0 {
            return bad("kv_block_size must be positive");
        }
        if let Some(p) = &self.placement {
            for (e, ws) in p.workers.iter().enumerate() {
                if ws.is_empty() {
                    return Err(DeploymentError::Invalid(format!(
                        "expert {e} is placed on no worker"
                    )));
                }
                if let Some(w) = ws.iter().find(|w| **w >= self.expert_workers) {
                    return Err(DeploymentError::Invalid(format!(
                        "expert {e} is placed on worker {w}, but there are only {} expert workers",
                        self.expert_workers
                    )));
                }
            }
        }
        Ok(())
    }

    /// The placement for a model with `num_experts` routed experts, checked against it.
    pub fn placement_for(&self, num_experts: usize) -> Result<ExpertPlacement, DeploymentError> {
        match &self.placement {
            None => Ok(ExpertPlacement::contiguous(
                num_experts,
                self.expert_workers.max(1) as usize,
            )),
            Some(p) if p.workers.len() != num_experts => Err(DeploymentError::Invalid(format!(
                "placement lists {} experts but the model has {num_experts}",
                p.workers.len()
            ))),
            Some(p) => Ok(p.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_replicas_than_the_member_set_holds_are_refused() {
        let mut d = Deployment {
            attention_replicas: MAX_ATTENTION_REPLICAS,
            ..Deployment::default()
        };
        d.validate_shape().unwrap();
        d.attention_replicas = MAX_ATTENTION_REPLICAS + 1;
        let e = d.validate_shape().unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
    }

    #[test]
    fn round_trip_and_defaults() {
        let d =
            Deployment::from_toml_str("attention_replicas = 2\nmicro_batches = 3\n", "t").unwrap();
        assert_eq!(d.attention_replicas, 2);
        assert_eq!(d.expert_workers, 1);
        assert_eq!(d.micro_batches, 3);
        let back = Deployment::from_toml_str(&d.to_toml_string(), "t").unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Deployment::from_toml_str("micro_batches = 0", "t").is_err());
        assert!(Deployment::from_toml_str("bogus = 1", "t").is_err());
        let e = Deployment::from_toml_str(
            "expert_workers = 2\n[placement]\nworkers = [[0], [2]]\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("worker 2"), "{e}");
    }

    #[test]
    fn address_maps_replace_whole_addresses() {
        let mut a = Addresses {
            attention: vec!["t-attention-0.t-attention:8000".into()],
            expert: vec![
                "t-expert-0.t-expert:9000".into(),
                "t-expert-1.t-expert:9000".into(),
            ],
        };
        let map = vec![
            parse_address_pair("t-expert-1.t-expert:9000=127.0.0.1:4001").unwrap(),
            parse_address_pair("t-attention-0.t-attention:8000=127.0.0.1:4002").unwrap(),
        ];
        assert_eq!(a.remap(&map), 2);
        assert_eq!(a.attention, vec!["127.0.0.1:4002"]);
        assert_eq!(a.expert, vec!["t-expert-0.t-expert:9000", "127.0.0.1:4001"]);
        for bad in ["a:1", "a:1=b", "=b:2", "a:x=b:2", "a:1=:2"] {
            assert!(parse_address_pair(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn security_table_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("tandem-dep-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("dep.toml");
        std::fs::write(
            &p,
            "[security]\ncluster_secret_file = \"keys/secret\"\ntls_cert = \"tls/w.pem\"\n\
             tls_key = \"/etc/tls/w.key\"\ntls_ca = \"ca.pem\"\n",
        )
        .unwrap();
        let d = Deployment::load(&p).unwrap();
        assert_eq!(
            d.security.cluster_secret_file,
            Some(dir.join("keys/secret"))
        );
        assert_eq!(d.security.tls_cert, Some(dir.join("tls/w.pem")));
        assert_eq!(d.security.tls_key, Some(PathBuf::from("/etc/tls/w.key")));
        assert_eq!(d.security.tls_ca, Some(dir.join("ca.pem")));
        std::fs::write(
            &p,
            "[security]\ncluster_secret_file = \"/etc/tandem/secret\"\n",
        )
        .unwrap();
        let d = Deployment::load(&p).unwrap();
        assert_eq!(
            d.security.cluster_secret_file,
            Some(PathBuf::from("/etc/tandem/secret"))
        );
        // Unknown keys in the table are refused like everywhere else in the file.
        let e = Deployment::from_toml_str("[security]\ncluster_secret = \"x\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("cluster_secret"), "{e}");
        // Without the table nothing is written back.
        assert!(!Deployment::default().to_toml_string().contains("security"));
        let back = Deployment::from_toml_str(&d.to_toml_string(), "t").unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn contiguous_placement() {
        let p = ExpertPlacement::contiguous(8, 3);
        assert_eq!(p.experts_of(0), vec![0, 1, 2]);
        assert_eq!(p.experts_of(1), vec![3, 4, 5]);
        assert_eq!(p.experts_of(2), vec![6, 7]);
    }
}
