//! The pod template of a role: the `tandem serve` command line, environment, resources,
//! placement, probes and volumes.

use crate::rank::{POD_INDEX_LABEL, RANK_ENV};
use crate::{
    role_labels, K8sError, K8sOptions, ResourceOverrides, Result, Role, API_KEY_ENV,
    API_KEY_SECRET_KEY, CLUSTER_SECRET_ENV, CLUSTER_SECRET_KEY, CONFIG_DIR, DEPLOYMENT_KEY,
    EXIT_MARGIN_S, PRESTOP_SLEEP_S,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretKeySelector, SecurityContext,
    SleepAction, TCPSocketAction, Toleration, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use tandem_core::Deployment;
use tandem_plan::hardware::Hardware;
use tandem_plan::HardwareCatalog;

/// The user the image runs as (the Dockerfile's `tandem` user).
pub const RUN_AS_USER: i64 = 10001;
/// Annotation carrying the hash of the deployment file.
pub const DEPLOYMENT_HASH_ANNOTATION: &str = "tandem.dev/deployment-hash";

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What one role's pods ask for: the plan's device and TP degree, else CPU only.
struct RoleHardware<'a> {
    hw: Option<&'a Hardware>,
    tp: u32,
    mem_bytes_per_device: Option<f64>,
}

fn role_hardware<'a>(
    d: &Deployment,
    catalog: &'a HardwareCatalog,
    role: Role,
) -> Result<RoleHardware<'a>> {
    let (name, tp, mem) = match role {
        Role::Attention => (
            &d.plan.attention_hw,
            d.plan.tp_attention,
            d.plan.attention_mem_bytes,
        ),
        Role::Expert => (&d.plan.expert_hw, d.plan.tp_expert, d.plan.expert_mem_bytes),
    };
    let hw = name.as_deref().map(|n| catalog.get(n)).transpose()?;
    Ok(RoleHardware {
        hw,
        tp: tp.unwrap_or(1).max(1),
        mem_bytes_per_device: mem.filter(|m| m.is_finite() && *m > 0.0),
    })
}

fn quantity(s: &str, what: &str) -> Result<Quantity> {
    // The shapes Kubernetes accepts: a decimal number with an optional SI or binary suffix.
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(num_end);
    let ok_suffix = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ]
    .contains(&suffix);
    if num.is_empty() || num.parse::<f64>().is_err() || !ok_suffix {
        return Err(K8sError::Invalid(format!(
            "{what} {s:?} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
        )));
    }
    Ok(Quantity(t.to_string()))
}

/// Requests = limits (Guaranteed QoS: whole cores stay the pod's under the static CPU
/// manager, which a worker pinning its threads wants).
fn resources(
    d: &Deployment,
    rh: &RoleHardware,
    role: Role,
    ov: &ResourceOverrides,
) -> Result<ResourceRequirements> {
    let mut r = BTreeMap::new();
    let cpu = match &ov.cpu {
        Some(c) => quantity(c, "cpu")?,
        // The worker's thread pool, plus one core for the HTTP server on a replica.
        None => {
            Quantity((d.threads_per_worker.max(1) + u32::from(role == Role::Attention)).to_string())
        }
    };
    r.insert("cpu".to_string(), cpu);
    let memory = match (&ov.memory, rh.mem_bytes_per_device) {
        (Some(m), _) => Some(quantity(m, "memory")?),
        // The planned weights + KV of every device of the pod (held in host memory by
        // today's CPU engine), 20% more for activations and the allocator, plus 1 GiB for
        // the process itself.
        (None, Some(b)) => Some(Quantity(format!(
            "{}Gi",
            (b * f64::from(rh.tp) * 1.2 / GIB + 1.0).ceil() as u64
        ))),
        (None, None) => None,
    };
    if let Some(m) = memory {
        r.insert("memory".to_string(), m);
    }
    if let Some(res) = rh
        .hw
        .and_then(|h| h.k8s.as_ref())
        .and_then(|k| k.resource.clone())
    {
        r.insert(res, Quantity(rh.tp.to_string()));
    }
    Ok(ResourceRequirements {
        requests: Some(r.clone()),
        limits: Some(r),
        ..ResourceRequirements::default()
    })
}

fn affinity(o: &K8sOptions, rh: &RoleHardware, role: Role) -> Affinity {
    let node_affinity = rh
        .hw
        .and_then(|h| h.k8s.as_ref())
        .filter(|k| !k.node_labels.is_empty())
        .map(|k| NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(
                        k.node_labels
                            .iter()
                            .map(|(key, values)| NodeSelectorRequirement {
                                key: key.clone(),
                                operator: "In".into(),
                                values: Some(values.clone()),
                            })
                            .collect(),
                    ),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        });
    // Workers of a role spread over nodes where they can: each wants a node's memory
    // bandwidth (and NICs) to itself.
    let spread = PodAntiAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(role_labels(o, role)),
                    ..LabelSelector::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            },
        }]),
        ..PodAntiAffinity::default()
    };
    Affinity {
        node_affinity,
        pod_anti_affinity: Some(spread),
        ..Affinity::default()
    }
}

fn tcp(port: &str) -> Option<TCPSocketAction> {
    Some(TCPSocketAction {
        port: IntOrString::String(port.into()),
        ..TCPSocketAction::default()
    })
}

/// Readiness, liveness and startup probes.
fn probes(role: Role) -> (Probe, Probe, Probe) {
    let port = match role {
        Role::Attention => "http",
        Role::Expert => "m2n",
    };
    let readiness = match role {
        // 503 while an expert worker is unreachable: the replica leaves the API Service
        // until the deployment serves again.
        Role::Attention => Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/health".into()),
                port: IntOrString::String(port.into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            timeout_seconds: Some(3),
            ..Probe::default()
        },
        Role::Expert => Probe {
            tcp_socket: tcp(port),
            period_seconds: Some(5),
            failure_threshold: Some(2),
            ..Probe::default()
        },
    };
    // Liveness asks only whether this process serves its port: a replica whose expert
    // worker is down is not restarted for it (it recovers by itself when the worker is back).
    let liveness = Probe {
        tcp_socket: tcp(port),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        timeout_seconds: Some(3),
        ..Probe::default()
    };
    // Loading a large checkpoint takes minutes: up to 20 minutes before liveness applies.
    let startup = Probe {
        tcp_socket: tcp(port),
        period_seconds: Some(10),
        failure_threshold: Some(120),
        ..Probe::default()
    };
    (readiness, liveness, startup)
}

/// `tandem serve` flags of a role's pods (after `tandem`).
pub fn serve_args(o: &K8sOptions, role: Role) -> Vec<String> {
    let mut a: Vec<String> = [
        "serve",
        "--deployment",
        &format!("{CONFIG_DIR}/{DEPLOYMENT_KEY}"),
        "--role",
        role.as_str(),
        "--rank-from-hostname",
        // Listen on every interface, on the port of this worker's own address.
        "--host",
        "0.0.0.0",
        "--model",
        &o.model.path,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if role == Role::Attention {
        a.extend(["--shutdown-grace-s".into(), o.shutdown_grace_s.to_string()]);
    }
    a.extend(o.extra_args.iter().cloned());
    a
}

fn env(o: &K8sOptions, role: Role) -> Vec<EnvVar> {
    let secret = |name: &str, secret: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let mut v = vec![
        EnvVar {
            name: RANK_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.labels['{POD_INDEX_LABEL}']"),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: "RUST_LOG".into(),
            value: Some("info".into()),
            ..EnvVar::default()
        },
    ];
    if let (Role::Attention, Some(s)) = (role, &o.api_key_secret) {
        v.push(secret(API_KEY_ENV, s, API_KEY_SECRET_KEY));
    }
    if let Some(s) = &o.cluster_secret {
        v.push(secret(CLUSTER_SECRET_ENV, s, CLUSTER_SECRET_KEY));
    }
    v
}

pub(crate) fn template(
    o: &K8sOptions,
    d: &Deployment,
    catalog: &HardwareCatalog,
    role: Role,
    config_name: &str,
    hash: u64,
) -> Result<PodTemplateSpec> {
    let rh = role_hardware(d, catalog, role)?;
    let ov = match role {
        Role::Attention => &o.attention_resources,
        Role::Expert => &o.expert_resources,
    };
    let (port_name, port) = match role {
        Role::Attention => ("http", o.http_port),
        Role::Expert => ("m2n", o.m2n_port),
    };
    let (readiness, liveness, startup) = probes(role);
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_name.into(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    if let Some(claim) = &o.model.pvc {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: o.model.mount.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    // GPU pools are usually tainted with their resource's name.
    let tolerations = rh
        .hw
        .and_then(|h| h.k8s.as_ref())
        .and_then(|k| k.resource.clone())
        .map(|r| {
            vec![Toleration {
                key: Some(r),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }]
        });
    let drain = o.shutdown_grace_s as i64 + EXIT_MARGIN_S;
    let (lifecycle, grace) = match role {
        // Serve on while the endpoint leaves the API Service, then drain.
        Role::Attention => (
            Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction {
                        seconds: PRESTOP_SLEEP_S,
                    }),
                    ..LifecycleHandler::default()
                }),
                ..Lifecycle::default()
            }),
            PRESTOP_SLEEP_S + drain,
        ),
        Role::Expert => (None, drain),
    };
    let container = Container {
        name: "tandem".into(),
        image: Some(o.image.clone()),
        image_pull_policy: o.image_pull_policy.clone(),
        command: Some(vec!["tandem".into()]),
        args: Some(serve_args(o, role)),
        env: Some(env(o, role)),
        ports: Some(vec![ContainerPort {
            name: Some(port_name.into()),
            container_port: port.into(),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources(d, &rh, role, ov)?),
        readiness_probe: Some(readiness),
        liveness_probe: Some(liveness),
        startup_probe: Some(startup),
        lifecycle,
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(role_labels(o, role)),
            annotations: Some(BTreeMap::from([(
                DEPLOYMENT_HASH_ANNOTATION.to_string(),
                format!("{hash:016x}"),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            affinity: Some(affinity(o, &rh, role)),
            tolerations,
            termination_grace_period_seconds: Some(grace),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    })
}
