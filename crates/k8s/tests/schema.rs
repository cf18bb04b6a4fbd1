//! Every generated file against the Kubernetes OpenAPI schema of the version the objects are
//! typed for (1.33), strictly (no unknown field), with `kubernetes-validate` (PyPI; its
//! schemas ship inside the package, so nothing is fetched here). The executable is
//! `TANDEM_K8S_VALIDATE` (default: `kubernetes-validate` on the PATH; `.ci/run` installs it
//! in its venv). Without it the test is skipped, except under `CI=true`, where it fails.

use std::process::Command;
use tandem_k8s::{generate, K8sOptions};
use tandem_plan::deploy::to_deployment;
use tandem_plan::{plan, HardwareCatalog, ModelCatalog, PerfSource, PlanRequest};

#[test]
fn generated_files_pass_the_kubernetes_schema() {
    let exe = std::env::var("TANDEM_K8S_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let works = Command::new(&exe)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        let why =
            format!("{exe} is not installed or does not run (pip install kubernetes-validate)");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let cat = HardwareCatalog::builtin().unwrap();
    let model = ModelCatalog::builtin().unwrap().resolve("mixtral").unwrap();
    let mut req = PlanRequest::new(model, "H20", "L40S");
    req.max_replicas = 12;
    let rep = plan(&req, &cat, PerfSource::Roofline).unwrap();
    let dep = to_deployment(rep.best().unwrap());
    // Every optional object and field present.
    let mut o = K8sOptions::new("/models/mixtral");
    o.model.pvc = Some("weights".into());
    o.api_key_secret = Some("api".into());
    o.cluster_secret = Some("m2n".into());
    o.ingress = true;
    o.ingress_host = Some("llm.example.com".into());
    o.ingress_class = Some("nginx".into());
    o.image_pull_policy = Some("IfNotPresent".into());
    let m = generate(&dep, &cat, &o).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-k8s-schema-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files: Vec<_> = m
        .write(&dir)
        .unwrap()
        .into_iter()
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(files.len(), 9);
    let out = Command::new(&exe)
        .args(["--kubernetes-version", "1.33.0", "--strict"])
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // One "passed" line per file: the tool really read each of them.
    assert_eq!(text.matches("passed").count(), files.len(), "{text}");
    // And it does refuse: the first file with a field the schema does not have fails, with a
    // non-zero exit status (a validator that passes everything would make the above vacuous).
    let bad = dir.join("bad.yaml");
    let mut yaml = std::fs::read_to_string(&files[0]).unwrap();
    yaml.push_str("notAField: 1\n");
    std::fs::write(&bad, yaml).unwrap();
    let out = Command::new(&exe)
        .args(["--kubernetes-version", "1.33.0", "--strict"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an unknown field passed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
