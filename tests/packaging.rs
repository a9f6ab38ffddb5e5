//! The packaging files stay true to the binary: the systemd unit verifies
//! (`systemd-analyze verify`), the Kubernetes manifests and the Helm chart (`helm lint`,
//! `helm template`) probe `/livez` and `/readyz`, give the pod more grace than pullgate's
//! drain, and carry a configuration that `pullgate check-config` accepts; the container image
//! is built from this tree with `scripts/image.sh` (buildah), exported, unpacked with `umoci`,
//! and its entrypoint, started as the image's user with the image's arguments and
//! environment, serves a verified pull. (These machines cannot start containers, so the
//! runtime's part — chroot, user, environment — is done by the test.)

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
        "COPY --chown=65532:65532 data/ /data/",
        "ENTRYPOINT [\"/usr/local/bin/pullgate\"]",
    ] {
        assert!(file.contains(line), "{line} missing");
    }
    // One stage on an empty base: nothing is pulled, no toolchain in the image.
    assert_eq!(file.matches("\nFROM ").count(), 1);
    assert!(file.contains("\nFROM scratch"));
    let script = read("scripts/image.sh");
    assert!(script.contains("check-config \"$root/pullgate.example.toml\""));
}

/// The image as a container runtime would start it, from its OCI runtime configuration
/// (`umoci unpack` writes the one a runtime would use): arguments, environment, user.
struct Unpacked {
    rootfs: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    uid: u64,
    gid: u64,
}

fn unpack(layout: &str, bundle: &Path) -> Unpacked {
    let mut command = Command::new("umoci");
    command.arg("unpack").arg("--image").arg(layout).arg(bundle);
    let (ok, text) = run(command);
    assert!(ok, "umoci unpack:\n{text}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let process = &config["process"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    Unpacked {
        rootfs: bundle.join(config["root"]["path"].as_str().unwrap_or("rootfs")),
        args: strings(&process["args"]),
        env: strings(&process["env"])
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
        uid: process["user"]["uid"].as_u64().unwrap(),
        gid: process["user"]["gid"].as_u64().unwrap(),
    }
}

fn on_path(tool: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{tool} is not on PATH: run scripts/setup.sh"))
}

/// The image is built from this tree by `scripts/image.sh` (the binary under test, its
/// libraries, on `FROM scratch`), exported as an OCI layout, unpacked, and its entrypoint is
/// started the way a runtime would: chrooted into the image's root filesystem, as the image's
/// user, with exactly the image's arguments and environment (only the listening port is
/// changed, as `-p` would). A client then pulls a verified image through it from a local
/// upstream registry.
#[test]
fn the_image_builds_and_its_unpacked_entrypoint_serves_a_verified_pull() {
    require_tool("buildah");
    require_tool("umoci");
    support::process::require_root("running the unpacked image as its user (chroot)");
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            work.path().join("root").display(),
            work.path().join("runroot").display()
        ),
    )
    .unwrap();
    let tag = "localhost/pullgate:suite";
    let mut build = Command::new("bash");
    build
        .arg(repo("scripts/image.sh"))
        .args(["--binary", BIN, "--tag", tag, "--builder", "buildah"])
        .env("CONTAINERS_STORAGE_CONF", &storage);
    let (ok, text) = run(build);
    assert!(ok, "scripts/image.sh:\n{text}");
    let layout = format!("oci:{}:suite", work.path().join("layout").display());
    let mut push = Command::new("buildah");
    push.args(["push", "--quiet", tag, &layout])
        .env("CONTAINERS_STORAGE_CONF", &storage);
    let (ok, text) = run(push);
    assert!(ok, "buildah push:\n{text}");

    // Small: the layer holds one stripped binary, its C library and CA roots.
    let blobs = work.path().join("layout/blobs/sha256");
    let image_bytes: u64 = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    eprintln!("image: {image_bytes} bytes compressed");

    let image = unpack(
        &format!("{}:suite", work.path().join("layout").display()),
        &work.path().join("bundle"),
    );
    assert_eq!(image.args, ["/usr/local/bin/pullgate", "serve"]);
    assert_eq!((image.uid, image.gid), (65532, 65532), "runs unprivileged");
    let env = |key: &str| {
        image
            .env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{key} not in the image's environment: {:?}", image.env))
    };
    assert_eq!(env("PULLGATE_LISTEN"), "0.0.0.0:5000");
    assert_eq!(env("PULLGATE_DATA_DIR"), "/data");
    let data = std::fs::metadata(image.rootfs.join("data")).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!((data.uid(), data.gid()), (65532, 65532), "/data writable");
    }

    let registry = support::registry::Registry::start_plain();
    let pushed = support::fixtures::Image::oci(77, &[300_000, 4096]);
    registry.push_image("library/app", "1", &pushed);

    let port = support::process::free_port();
    let mut serve = Command::new(on_path("chroot"));
    serve
        .env_clear()
        .arg(format!("--userspec={}:{}", image.uid, image.gid))
        .arg(&image.rootfs)
        .args(&image.args);
    for (key, value) in &image.env {
        let value = match key.as_str() {
            "PULLGATE_LISTEN" => format!("0.0.0.0:{port}"),
            _ => value.clone(),
        };
        serve.env(key, value);
    }
    // What an operator passes with `-e`: Docker Hub's place taken by the local upstream.
    serve.env("PULLGATE_UPSTREAM", format!("docker.io={}", registry.url()));
    let mut served = support::process::ChildProcess::spawn("pullgate-image", serve, work.path());
    support::process::wait_until_serving(
        "the image's entrypoint",
        &mut served,
        &format!("http://127.0.0.1:{port}/readyz"),
        Duration::from_secs(60),
    );
    let copied = support::skopeo::skopeo_pull(
        &format!("127.0.0.1:{port}/library/app:1"),
        support::skopeo::Platforms::Host,
        None,
    );
    copied.verify_image(&pushed);
    served.assert_running();
    // The cache landed on the volume, owned by the image's user.
    let blobs_dir = image.rootfs.join("data/blobs");
    assert!(blobs_dir.is_dir(), "{}", served.log_tail());
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&blobs_dir).unwrap().uid(), 65532);
    }
    served.terminate(Duration::from_secs(60));
}

/// The Helm chart passes the real `helm lint --strict` (both helm versions the suite
/// installs), and what `helm template` renders carries a configuration that `check-config`
/// accepts, the probes, the data volume and a grace period that outlasts the drain.
#[test]
fn the_helm_chart_lints_and_renders_a_checked_configuration() {
    let chart = repo("deploy/helm/pullgate");
    for version in support::charts::HELM_VERSIONS {
        let helm = support::charts::Helm::new(version);
        let chart = chart.to_string_lossy();
        let lint = helm.run(&["lint", "--strict", &chart]);
        assert!(
            lint.status.success(),
            "helm {version} lint:\n{}{}",
            String::from_utf8_lossy(&lint.stdout),
            String::from_utf8_lossy(&lint.stderr)
        );
        let rendered = helm.run(&[
            "template",
            "mirror",
            &chart,
            "--set",
            "secrets.dockerhub-token=t",
        ]);
        assert!(rendered.status.success(), "helm {version} template");
        let text = String::from_utf8_lossy(&rendered.stdout).into_owned();
        for needle in [
            "kind: Deployment",
            "kind: Service",
            "kind: PersistentVolumeClaim",
            "kind: ConfigMap",
            "kind: Secret",
            "path: /livez",
            "path: /readyz",
            "mountPath: /data",
            "mountPath: /run/secrets/pullgate",
            "runAsNonRoot: true",
        ] {
            assert!(
                text.contains(needle),
                "helm {version}: {needle} missing in\n{text}"
            );
        }
        let start = text.find("pullgate.toml: |").unwrap();
        let toml: String = text[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| l.strip_prefix("    ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pullgate.toml");
        std::fs::write(&path, &toml).unwrap();
        let mut command = Command::new(BIN);
        command.arg("check-config").arg(&path);
        let (ok, out) = run(command);
        assert!(
            ok,
            "check-config on the chart's configuration:\n{out}\n{toml}"
        );
        let grace: u64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
            .unwrap()
            .parse()
            .unwrap();
        let drain =
            seconds(&toml_value(&toml, "drain")) + seconds(&toml_value(&toml, "unready_delay"));
        assert!(grace > drain, "grace {grace}s <= drain {drain}s");
    }
}
