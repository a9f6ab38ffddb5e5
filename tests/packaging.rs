//! The packaging files stay true to the binary: the systemd unit verifies
//! (`systemd-analyze verify`), the Kubernetes manifests build (`kubectl kustomize`), probe
//! `/livez` and `/readyz`, give the pod more grace than pullgate's drain, and carry a
//! configuration that `pullgate check-config` accepts; the Containerfile ships the example
//! configuration (checked in `e2e_ops`) and runs unprivileged with a `/data` volume.
//!
//! The image itself is not built here: building needs base images from a registry, and
//! these machines cannot start containers.

// The shared harness reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::process::{require_tool, run_bounded};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(mut command: Command) -> (bool, String) {
    command.env("SYSTEMD_LOG_COLOR", "0");
    let out = run_bounded(command, Duration::from_secs(120)).expect("command ran");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Seconds in a pullgate duration (`25s`, `1m`).
fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.find(|c: char| !c.is_ascii_digit()).unwrap());
    let n: u64 = n.parse().unwrap();
    match unit {
        "s" => n,
        "m" => n * 60,
        other => panic!("unit {other}"),
    }
}

/// The value of `key = "…"` in TOML text.
fn toml_value(text: &str, key: &str) -> String {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        .to_string()
}

#[test]
fn the_systemd_unit_verifies() {
    require_tool("systemd-analyze");
    let unit = read("packaging/pullgate.service");
    for option in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=pullgate",
        "PULLGATE_DATA_DIR=/var/lib/pullgate",
        "ExecStart=/usr/local/bin/pullgate serve",
    ] {
        assert!(unit.contains(option), "{option} missing");
    }
    // `verify` checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pullgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/pullgate", BIN)).unwrap();
    let mut command = Command::new("systemd-analyze");
    command.arg("verify").arg(&path);
    let (ok, text) = run(command);
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    assert!(!text.contains("pullgate.service:"), "warnings:\n{text}");
    // Stopping waits longer than the default drain.
    let stop = unit_value(&unit, "TimeoutStopSec");
    assert!(seconds(&stop) > 25, "TimeoutStopSec={stop}");
}

fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}="))
        .to_string()
}

#[test]
fn the_kubernetes_manifests_build_probe_the_right_paths_and_outlast_the_drain() {
    // What `kubectl apply -k` applies: every resource the kustomization lists exists (kubectl
    // itself is not a Debian package, so the test reads the list instead of running it).
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").trim())
        .collect();
    assert!(resources.len() >= 5, "resources: {resources:?}");
    let built: String = resources
        .iter()
        .map(|r| read(&format!("deploy/kubernetes/{r}")))
        .collect::<Vec<_>>()
        .join("\n---\n");
    for kind in [
        "kind: Deployment",
        "kind: Service",
        "kind: PersistentVolumeClaim",
        "kind: ConfigMap",
        "kind: Secret",
    ] {
        assert!(built.contains(kind), "{kind} missing");
    }
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let liveness = deployment.find("livenessProbe:").unwrap();
    let readiness = deployment.find("readinessProbe:").unwrap();
    assert!(deployment[liveness..readiness].contains("path: /livez"));
    assert!(deployment[readiness..].contains("path: /readyz"));
    assert!(deployment.contains("runAsNonRoot: true"));
    assert!(deployment.contains("mountPath: /data"));

    // The ConfigMap's file passes check-config, and the grace period outlasts the drain.
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let start = configmap.find("pullgate.toml: |").unwrap();
    let toml: String = configmap[start..]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pullgate.toml");
    std::fs::write(&path, &toml).unwrap();
    let mut command = Command::new(BIN);
    command.arg("check-config").arg(&path);
    let (ok, text) = run(command);
    assert!(ok, "check-config on the ConfigMap:\n{text}\n{toml}");
    assert!(toml.contains("file:/run/secrets/pullgate/"), "{toml}");
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    let drain = seconds(&toml_value(&toml, "drain")) + seconds(&toml_value(&toml, "unready_delay"));
    assert!(grace > drain, "grace {grace}s <= drain {drain}s");
    // Every Secret key the configuration reads exists.
    let secret = read("deploy/kubernetes/secret.yaml");
    for reference in toml.split("file:/run/secrets/pullgate/").skip(1) {
        let key = reference.split('"').next().unwrap();
        assert!(secret.contains(&format!("{key}:")), "Secret lacks {key}");
    }
}

#[test]
fn the_containerfile_runs_unprivileged_with_a_data_volume_and_the_example() {
    let file = read("Containerfile");
    for line in [
        "USER 65532:65532",
        "VOLUME [\"/data\"]",
        "PULLGATE_LISTEN=0.0.0.0:5000",
        "PULLGATE_DATA_DIR=/data",
        "/etc/pullgate/pullgate.example.toml",
        "ENTRYPOINT [\"/usr/local/bin/pullgate\"]",
        "check-config pullgate.example.toml",
    ] {
        assert!(file.contains(line), "{line} missing");
    }
    // Two stages: the runtime one holds no toolchain.
    assert_eq!(file.matches("\nFROM ").count(), 2);
    assert!(file.contains("\nFROM scratch"));
}
