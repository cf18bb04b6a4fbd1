//! The generated objects for a homogeneous CPU plan, a heterogeneous H20 + L40S GPU plan and
//! a hand-written deployment file: names, the ConfigMap's addresses against the headless
//! Services' pod names, ranks, resources, node placement, probes, secrets, update order, and
//! the YAML files read back into the same typed objects.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::path::Path;
use tandem_core::Deployment;
use tandem_k8s::rank::rank_from_hostname;
use tandem_k8s::{generate, K8sOptions, Manifests, RoleObjects};
use tandem_plan::deploy::to_deployment;
use tandem_plan::planner::Layout;
use tandem_plan::{plan, HardwareCatalog, ModelCatalog, ModelShape, PerfSource, PlanRequest};

fn pod_spec(s: &StatefulSet) -> &PodSpec {
    s.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn container(s: &StatefulSet) -> &Container {
    &pod_spec(s).containers[0]
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.as_ref().unwrap().iter().find(|e| e.name == name)
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap()
}

fn flag(c: &Container, f: &str) -> Option<String> {
    let a = args(c);
    a.iter().position(|x| x == f).map(|i| a[i + 1].clone())
}

fn requests(c: &Container) -> BTreeMap<String, String> {
    let r = c.resources.as_ref().unwrap();
    assert_eq!(r.requests, r.limits, "requests = limits (Guaranteed QoS)");
    r.requests
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// The `In` values of the required node affinity, by label.
fn node_pool(s: &StatefulSet) -> BTreeMap<String, Vec<String>> {
    let Some(na) = pod_spec(s)
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
    else {
        return BTreeMap::new();
    };
    let terms = &na
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(terms.len(), 1);
    terms[0]
        .match_expressions
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.operator, "In");
            (r.key.clone(), r.values.clone().unwrap())
        })
        .collect()
}

/// Checks every property that holds for any generated deployment; returns the deployment
/// file the ConfigMap holds.
fn check_common(m: &Manifests, o: &K8sOptions) -> Deployment {
    let cm = &m.config_map;
    let text = &cm.data.as_ref().unwrap()[tandem_k8s::DEPLOYMENT_KEY];
    let d = Deployment::from_toml_str(text, "configmap").unwrap();
    assert_eq!(d, m.deployment);
    for r in [
        Role {
            objects: &m.attention,
            role: "attention",
            n: d.attention_replicas,
            port_name: "http",
            port: o.http_port,
            addrs: &d.addresses.attention,
        },
        Role {
            objects: &m.expert,
            role: "expert",
            n: d.expert_workers,
            port_name: "m2n",
            port: o.m2n_port,
            addrs: &d.addresses.expert,
        },
    ] {
        let name = check_role_objects(&r, o);
        check_role_container(&r, o, cm, &name);
    }
    check_attention_and_secrets(m, o);
    assert_yaml_round_trips(m);
    d
}

/// One role's objects and what the deployment file says of that role.
struct Role<'a> {
    objects: &'a RoleObjects,
    role: &'a str,
    n: u32,
    port_name: &'a str,
    port: u16,
    addrs: &'a Vec<String>,
}

/// The role's StatefulSet (name, namespace, replicas, rolling updates one pod at a time), its
/// headless Service and PodDisruptionBudget, and the ConfigMap's addresses as the pods' DNS
/// names; returns the StatefulSet's name.
fn check_role_objects(r: &Role, o: &K8sOptions) -> String {
    let Role {
        objects,
        role,
        n,
        port,
        addrs,
        ..
    } = *r;
    let RoleObjects {
        stateful_set: sts,
        headless,
        pdb,
    } = objects;
    let name = sts.metadata.name.clone().unwrap();
    assert_eq!(name, format!("{}-{role}", o.name));
    assert_eq!(
        sts.metadata.namespace.as_deref(),
        Some(o.namespace.as_str())
    );
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(n as i32));
    // The headless Service governs the StatefulSet and selects exactly its pods.
    let svc_name = spec.service_name.clone().unwrap();
    assert_eq!(headless.metadata.name.as_deref(), Some(svc_name.as_str()));
    let hs = headless.spec.as_ref().unwrap();
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(hs.selector.as_ref(), Some(&pod_labels));
    assert_eq!(spec.selector.match_labels.as_ref(), Some(&pod_labels));
    assert_eq!(
        pdb.spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()
            .match_labels,
        Some(pod_labels.clone())
    );
    assert_eq!(
        pdb.spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    // The ConfigMap's addresses are the pods' DNS names: <pod>.<service>.<ns>.svc.<domain>.
    let expect: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{name}-{i}.{svc_name}.{}.svc.{}:{port}",
                o.namespace, o.cluster_domain
            )
        })
        .collect();
    assert_eq!(addrs, &expect, "{role}");
    // Rolling updates one pod at a time.
    let us = spec.update_strategy.as_ref().unwrap();
    assert_eq!(us.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        us.rolling_update.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    name
}

/// The role's container: its port and the headless Service's target port, the rank taken
/// from the pod's name and index, the flags, the mounted deployment file and the probes.
fn check_role_container(r: &Role, o: &K8sOptions, cm: &ConfigMap, name: &str) {
    let Role {
        objects,
        role,
        n,
        port_name,
        port,
        ..
    } = *r;
    let sts = &objects.stateful_set;
    let hs = objects.headless.spec.as_ref().unwrap();
    let c = container(sts);
    let cport = &c.ports.as_ref().unwrap()[0];
    assert_eq!(cport.name.as_deref(), Some(port_name));
    assert_eq!(cport.container_port, i32::from(port));
    assert_eq!(
        hs.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::String(port_name.into()))
    );
    // Ranks: each pod's name ends in its ordinal, and the env carries the pod index.
    assert_eq!(flag(c, "--role").as_deref(), Some(role));
    assert!(args(c).contains(&"--rank-from-hostname".to_string()));
    assert!(!args(c).contains(&"--rank".to_string()));
    for i in 0..n {
        assert_eq!(rank_from_hostname(&format!("{name}-{i}")).unwrap(), i);
    }
    let rank = env(c, "TANDEM_RANK").unwrap();
    assert_eq!(
        rank.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    assert_eq!(
        flag(c, "--deployment").as_deref(),
        Some("/etc/tandem/deployment.toml")
    );
    assert_eq!(flag(c, "--model").as_deref(), Some(o.model.path.as_str()));
    assert_eq!(c.image.as_deref(), Some(o.image.as_str()));
    // The deployment file is mounted where --deployment points.
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.mount_path == "/etc/tandem")
        .unwrap();
    let vol = pod_spec(sts)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        vol.config_map.as_ref().unwrap().name,
        cm.metadata.name.clone().unwrap()
    );
    // Probes.
    let ready = c.readiness_probe.as_ref().unwrap();
    let live = c.liveness_probe.as_ref().unwrap();
    match role {
        "attention" => {
            let h = ready.http_get.as_ref().unwrap();
            assert_eq!(h.path.as_deref(), Some("/health"));
            assert_eq!(h.port, IntOrString::String("http".into()));
        }
        _ => {
            assert_eq!(
                ready.tcp_socket.as_ref().unwrap().port,
                IntOrString::String("m2n".into())
            );
        }
    }
    assert_eq!(
        live.tcp_socket.as_ref().unwrap().port,
        IntOrString::String(port_name.into())
    );
}

/// The attention pods' termination grace and API Service, and the secrets only where asked
/// for (workers never get the API key).
fn check_attention_and_secrets(m: &Manifests, o: &K8sOptions) {
    // Termination grace: the drain (--shutdown-grace-s) fits in it.
    let a = container(&m.attention.stateful_set);
    assert_eq!(
        flag(a, "--shutdown-grace-s"),
        Some(o.shutdown_grace_s.to_string())
    );
    assert_eq!(
        pod_spec(&m.attention.stateful_set).termination_grace_period_seconds,
        Some(o.shutdown_grace_s as i64 + 10)
    );
    // The API Service selects the attention pods.
    let api = m.api_service.spec.as_ref().unwrap();
    assert_eq!(api.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        api.selector,
        m.attention
            .stateful_set
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
    );
    // Secrets only when asked for.
    let e = container(&m.expert.stateful_set);
    match &o.api_key_secret {
        Some(s) => {
            let r = env(a, "TANDEM_API_KEY")
                .unwrap()
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .clone()
                .unwrap();
            assert_eq!((r.name.as_str(), r.key.as_str()), (s.as_str(), "api-key"));
        }
        None => assert!(env(a, "TANDEM_API_KEY").is_none()),
    }
    assert!(env(e, "TANDEM_API_KEY").is_none(), "workers serve no API");
    for c in [a, e] {
        match &o.cluster_secret {
            Some(s) => {
                let r = env(c, "TANDEM_CLUSTER_SECRET")
                    .unwrap()
                    .value_from
                    .as_ref()
                    .unwrap()
                    .secret_key_ref
                    .clone()
                    .unwrap();
                assert_eq!(
                    (r.name.as_str(), r.key.as_str()),
                    (s.as_str(), "cluster-secret")
                );
            }
            None => assert!(env(c, "TANDEM_CLUSTER_SECRET").is_none()),
        }
    }
}

/// Every YAML file parses back into the object it was written from, and the kustomization
/// lists every file.
fn assert_yaml_round_trips(m: &Manifests) {
    let dir = std::env::temp_dir().join(format!(
        "tandem-k8s-test-{}-{}",
        std::process::id(),
        m.attention.stateful_set.metadata.name.clone().unwrap()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let files = m.write(&dir).unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.last().map(String::as_str), Some("kustomization.yaml"));
    let k: serde_yaml::Value = serde_yaml::from_str(&read("kustomization.yaml")).unwrap();
    let listed: Vec<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, names[..names.len() - 1].to_vec());
    let name = m.attention.stateful_set.metadata.name.clone().unwrap();
    let base = name.trim_end_matches("-attention").to_string();
    let cm: ConfigMap =
        serde_yaml::from_str(&read(&format!("configmap-{base}-deployment.yaml"))).unwrap();
    assert_eq!(cm, m.config_map);
    for (role, r) in [("attention", &m.attention), ("expert", &m.expert)] {
        let s: StatefulSet =
            serde_yaml::from_str(&read(&format!("statefulset-{base}-{role}.yaml"))).unwrap();
        assert_eq!(s, r.stateful_set);
        let h: Service =
            serde_yaml::from_str(&read(&format!("service-{base}-{role}.yaml"))).unwrap();
        assert_eq!(h, r.headless);
        let p: PodDisruptionBudget =
            serde_yaml::from_str(&read(&format!("poddisruptionbudget-{base}-{role}.yaml")))
                .unwrap();
        assert_eq!(p, r.pdb);
        let raw: serde_yaml::Value =
            serde_yaml::from_str(&read(&format!("statefulset-{base}-{role}.yaml"))).unwrap();
        assert_eq!(raw["apiVersion"].as_str(), Some("apps/v1"));
        assert_eq!(raw["kind"].as_str(), Some("StatefulSet"));
    }
    let api: Service = serde_yaml::from_str(&read(&format!("service-{base}.yaml"))).unwrap();
    assert_eq!(api, m.api_service);
    match &m.ingress {
        Some(i) => {
            let got: Ingress =
                serde_yaml::from_str(&read(&format!("ingress-{base}.yaml"))).unwrap();
            assert_eq!(&got, i);
        }
        None => assert!(!Path::new(&dir.join(format!("ingress-{base}.yaml"))).exists()),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heterogeneous_h20_l40s_plan() {
    let cat = HardwareCatalog::builtin().unwrap();
    let model = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
    let mut req = PlanRequest::new(model, "H20", "L40S");
    req.max_replicas = 12;
    let rep = plan(&req, &cat, PerfSource::Roofline).unwrap();
    let best = rep.best().unwrap();
    assert_eq!(best.layout, Layout::Disaggregated);
    let dep = to_deployment(best);
    let mut o = K8sOptions::new("/models/mixtral-8x22b");
    o.name = "mx".into();
    o.namespace = "llm".into();
    o.image = "registry.example/tandem:1.0".into();
    o.model.pvc = Some("mixtral-weights".into());
    o.cluster_secret = Some("tandem-m2n".into());
    let m = generate(&dep, &cat, &o).unwrap();
    let d = check_common(&m, &o);
    assert_eq!(d.attention_replicas, best.n_a);
    assert_eq!(d.expert_workers, best.expert_workers);
    assert_eq!(d.micro_batches, best.micro_batches);
    assert_eq!(
        d.addresses.expert[0],
        "mx-expert-0.mx-expert.llm.svc.cluster.local:9000"
    );
    let (a, e) = (&m.attention.stateful_set, &m.expert.stateful_set);
    // H20 pods on the H20 pool, L40S pods on the L40S pool, each with its TP degree of GPUs.
    assert_eq!(
        node_pool(a),
        BTreeMap::from([(
            "nvidia.com/gpu.product".to_string(),
            vec!["NVIDIA-H20".to_string()]
        )])
    );
    assert_eq!(
        node_pool(e),
        BTreeMap::from([(
            "nvidia.com/gpu.product".to_string(),
            vec!["NVIDIA-L40S".to_string()]
        )])
    );
    let (ra, re) = (requests(container(a)), requests(container(e)));
    assert_eq!(ra["nvidia.com/gpu"], best.tp_a.to_string());
    assert_eq!(re["nvidia.com/gpu"], best.tp_e.to_string());
    // Memory: the planned bytes of every device of the pod, with headroom.
    let gib = |s: &str| s.trim_end_matches("Gi").parse::<f64>().unwrap() * (1u64 << 30) as f64;
    let planned_a = best.attention_mem_used_bytes * f64::from(best.tp_a);
    assert!(
        gib(&ra["memory"]) >= planned_a * 1.2,
        "{ra:?} vs {planned_a}"
    );
    assert!(gib(&ra["memory"]) <= planned_a * 1.2 + 3.0 * (1u64 << 30) as f64);
    let planned_e = best.expert_mem_used_bytes * f64::from(best.tp_e);
    assert!(
        gib(&re["memory"]) >= planned_e * 1.2,
        "{re:?} vs {planned_e}"
    );
    // GPU pools' taint is tolerated.
    for s in [a, e] {
        let t = &pod_spec(s).tolerations.as_ref().unwrap()[0];
        assert_eq!(t.key.as_deref(), Some("nvidia.com/gpu"));
    }
    // The model comes from the PVC, read-only, mounted where --model points.
    for s in [a, e] {
        let vol = pod_spec(s)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.persistent_volume_claim.is_some())
            .unwrap();
        let pvc = vol.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(pvc.claim_name, "mixtral-weights");
        assert_eq!(pvc.read_only, Some(true));
        let mount = container(s)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == vol.name)
            .unwrap();
        assert_eq!(mount.mount_path, "/models");
    }
    assert!(m.ingress.is_none());
}

#[test]
fn homogeneous_cpu_plan() {
    let cat = HardwareCatalog::builtin().unwrap();
    let cfg = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral/config.json"),
    )
    .unwrap();
    let model = ModelShape::from_hf_config(&cfg, "mixtral-fixture").unwrap();
    let mut req = PlanRequest::new(model, "cpu", "cpu");
    req.objective = tandem_plan::Objective::PerGpu;
    req.max_replicas = 4;
    let rep = plan(&req, &cat, PerfSource::Roofline).unwrap();
    let best = rep.best().expect("a disaggregated CPU plan");
    assert_eq!(best.layout, Layout::Disaggregated);
    let dep = to_deployment(best);
    let mut o = K8sOptions::new("/opt/models/mixtral");
    o.api_key_secret = Some("tandem-api".into());
    o.shutdown_grace_s = 45;
    let m = generate(&dep, &cat, &o).unwrap();
    check_common(&m, &o);
    let (a, e) = (&m.attention.stateful_set, &m.expert.stateful_set);
    // CPU devices: no GPUs, no node pool, no taint to tolerate, the thread pool as cores.
    for (s, extra) in [(a, 1), (e, 0)] {
        let r = requests(container(s));
        assert!(!r.contains_key("nvidia.com/gpu"), "{r:?}");
        assert_eq!(r["cpu"], (dep.threads_per_worker + extra).to_string());
        assert!(r["memory"].ends_with("Gi"), "{r:?}");
        assert!(node_pool(s).is_empty());
        assert!(pod_spec(s).tolerations.is_none());
        // The model is in the image: no volume but the config and /tmp.
        assert_eq!(pod_spec(s).volumes.as_ref().unwrap().len(), 2);
    }
    assert_eq!(
        pod_spec(a).termination_grace_period_seconds,
        Some(45 + 5 + 5)
    );
}

#[test]
fn hand_written_deployment_file() {
    let cat = HardwareCatalog::builtin().unwrap();
    let dep = Deployment::from_toml_str(
        "attention_replicas = 2\nexpert_workers = 3\nmicro_batches = 2\nthreads_per_worker = 4\n\
         [addresses]\nattention = [\"10.0.0.1:8000\", \"10.0.0.2:8000\"]\n\
         expert = [\"10.0.0.3:9000\", \"10.0.0.4:9000\", \"10.0.0.5:9000\"]\n",
        "hand.toml",
    )
    .unwrap();
    let mut o = K8sOptions::new("/models/demo");
    o.name = "demo".into();
    o.http_port = 8080;
    o.m2n_port = 7000;
    o.cluster_domain = "k8s.internal".into();
    o.api_key_secret = Some("demo-api".into());
    o.cluster_secret = Some("demo-m2n".into());
    o.ingress = true;
    o.ingress_host = Some("llm.example.com".into());
    o.ingress_class = Some("nginx".into());
    o.expert_resources.memory = Some("12Gi".into());
    o.attention_resources.cpu = Some("6".into());
    o.extra_args = vec!["--wire-dtype".into(), "bf16".into()];
    let m = generate(&dep, &cat, &o).unwrap();
    let d = check_common(&m, &o);
    // The hand-written addresses are replaced by the pods' names; the shape is kept.
    assert_eq!(d.attention_replicas, 2);
    assert_eq!(d.expert_workers, 3);
    assert_eq!(d.micro_batches, 2);
    assert_eq!(
        d.addresses.attention,
        vec![
            "demo-attention-0.demo-attention.default.svc.k8s.internal:8080",
            "demo-attention-1.demo-attention.default.svc.k8s.internal:8080"
        ]
    );
    let (a, e) = (&m.attention.stateful_set, &m.expert.stateful_set);
    let (ra, re) = (requests(container(a)), requests(container(e)));
    assert_eq!(ra, BTreeMap::from([("cpu".to_string(), "6".to_string())]));
    assert_eq!(
        re,
        BTreeMap::from([
            ("cpu".to_string(), "4".to_string()),
            ("memory".to_string(), "12Gi".to_string())
        ])
    );
    assert!(node_pool(a).is_empty() && node_pool(e).is_empty());
    for s in [a, e] {
        let args = args(container(s));
        assert_eq!(args[args.len() - 2..], ["--wire-dtype", "bf16"]);
    }
    let ing = m.ingress.as_ref().unwrap().spec.as_ref().unwrap();
    assert_eq!(ing.ingress_class_name.as_deref(), Some("nginx"));
    let rule = &ing.rules.as_ref().unwrap()[0];
    assert_eq!(rule.host.as_deref(), Some("llm.example.com"));
    let backend = rule.http.as_ref().unwrap().paths[0]
        .backend
        .service
        .as_ref()
        .unwrap();
    assert_eq!(backend.name, m.api_service.metadata.name.clone().unwrap());
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let cat = HardwareCatalog::builtin().unwrap();
    let o = K8sOptions::new("/models/x");
    let colocated = Deployment {
        expert_workers: 0,
        ..Deployment::default()
    };
    let e = generate(&colocated, &cat, &o).unwrap_err().to_string();
    assert!(e.contains("colocated"), "{e}");
    let dep = Deployment::default();
    let mut bad = o.clone();
    bad.name = "Tandem_1".into();
    assert!(generate(&dep, &cat, &bad)
        .unwrap_err()
        .to_string()
        .contains("name"));
    let mut bad = o.clone();
    bad.model.pvc = Some("weights".into());
    bad.model.path = "/data/x".into();
    let e = generate(&dep, &cat, &bad).unwrap_err().to_string();
    assert!(e.contains("not inside"), "{e}");
    let mut bad = o.clone();
    bad.expert_resources.memory = Some("lots".into());
    let e = generate(&dep, &cat, &bad).unwrap_err().to_string();
    assert!(e.contains("quantity"), "{e}");
    let mut unknown = dep.clone();
    unknown.plan.attention_hw = Some("TPU-v9".into());
    let e = generate(&unknown, &cat, &o).unwrap_err().to_string();
    assert!(e.contains("TPU-v9"), "{e}");
}
