//! A private containerd daemon and its `ctr` client, for pulling through a `hosts.toml`
//! mirror the way Kubernetes nodes do.
//!
//! The daemon runs as root with root, state, sockets and config under one temp dir (so
//! several can run at once and none touches the system's containerd), with the CRI plugin
//! and the snapshotters that need special filesystems disabled. Pulls use the `native`
//! snapshotter, which works on any filesystem, and so still unpack every layer (containerd
//! then checks each layer's `diff_id` against the config).
//!
//! A `hosts.toml` with a `[host."http://127.0.0.1:PORT"]` mirror makes containerd send every
//! request to that mirror with `?ns=<registry host>` appended. Its `server` is a closed
//! loopback port, so a failing mirror can never send containerd anywhere else.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::{sha256_digest, Blob, Image};
use super::process::{free_port, require_root, require_tool, run_bounded, wait_for, ChildProcess};

/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "pullgate-test";

/// Plugins that cannot work (or are not wanted) in a test sandbox.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// A running containerd; killed (with its shims, if any) when dropped.
pub struct Containerd {
    dir: TempDir,
    socket: PathBuf,
    process: ChildProcess,
}

impl Containerd {
    /// Starts containerd under a fresh temp dir and waits until `ctr version` answers.
    pub fn start() -> Self {
        require_tool("containerd");
        require_tool("ctr");
        require_root("containerd");
        let dir = tempfile::Builder::new()
            .prefix("pullgate-containerd-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("containerd.sock");
        let disabled = DISABLED_PLUGINS
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [{disabled}]\n\
             [grpc]\n  address = \"{socket}\"\n\
             [ttrpc]\n  address = \"{socket}.ttrpc\"\n\
             [debug]\n  level = \"info\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{root}/opt\"\n",
            root = root.display(),
            state = state.display(),
            socket = socket.display(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let mut command = Command::new("containerd");
        command.arg("--config").arg(&config_path);
        let mut process = ChildProcess::spawn("containerd", command, dir.path());
        wait_for(
            "containerd to answer `ctr version`",
            Duration::from_secs(30),
            || {
                process.assert_running();
                let ready = socket.exists()
                    && run_bounded(ctr_command(&socket, &["version"]), Duration::from_secs(10))
                        .is_ok_and(|out| out.status.success());
                ready.then_some(())
            },
        );
        Containerd {
            dir,
            socket,
            process,
        }
    }

    /// Runs `ctr --address SOCK --namespace pullgate-test ARGS…`; `Err` carries its output.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let output = run_bounded(ctr_command(&self.socket, args), Duration::from_secs(180))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "ctr {args:?} failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Writes `<hosts dir>/<registry_host>/hosts.toml` sending `registry_host` to the mirror
    /// at `mirror` (`127.0.0.1:PORT`, plain HTTP), and returns the hosts dir.
    pub fn configure_mirror(&self, registry_host: &str, mirror: &str) -> PathBuf {
        let hosts_dir = self.dir.path().join("hosts.d");
        let host_dir = hosts_dir.join(registry_host);
        std::fs::create_dir_all(&host_dir).expect("create hosts dir");
        let hosts_toml = format!(
            "# Fallback: a closed loopback port, so nothing ever leaves the machine.\n\
             server = \"http://127.0.0.1:{closed}\"\n\n\
             [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            closed = free_port(),
        );
        std::fs::write(host_dir.join("hosts.toml"), hosts_toml).expect("write hosts.toml");
        hosts_dir
    }

    /// Like [`Containerd::configure_mirror`], with the mirror at `https://{mirror}` verified
    /// against `ca` (hosts.toml `ca = …`; no `skip_verify`).
    pub fn configure_tls_mirror(&self, registry_host: &str, mirror: &str, ca: &Path) -> PathBuf {
        let hosts_dir = self.dir.path().join("hosts.d");
        let host_dir = hosts_dir.join(registry_host);
        std::fs::create_dir_all(&host_dir).expect("create hosts dir");
        let hosts_toml = format!(
            "server = \"http://127.0.0.1:{closed}\"\n\n\
             [host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = {ca:?}\n",
            closed = free_port(),
            ca = ca.display().to_string(),
        );
        std::fs::write(host_dir.join("hosts.toml"), hosts_toml).expect("write hosts.toml");
        hosts_dir
    }

    /// `ctr images pull --hosts-dir … <reference>` for the host platform, unpacking with the
    /// native snapshotter.
    pub fn pull(&self, reference: &str, hosts_dir: &Path) -> Result<String, String> {
        let hosts_dir = hosts_dir.display().to_string();
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            reference,
        ])
    }

    /// The target digest of an image containerd has, as `ctr images ls` shows it.
    pub fn image_digest(&self, reference: &str) -> Option<String> {
        let listing = self.ctr(&["images", "ls"]).ok()?;
        listing.lines().skip(1).find_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            (columns.first() == Some(&reference))
                .then(|| columns.get(2).map(|d| d.to_string()))
                .flatten()
        })
    }

    /// Digests in containerd's content store, from `ctr content ls`.
    pub fn content_digests(&self) -> BTreeSet<String> {
        let listing = self.ctr(&["content", "ls", "-q"]).expect("ctr content ls");
        listing
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Panics unless containerd stored `blob` with exactly the right bytes.
    pub fn assert_stored(&self, blob: &Blob) {
        let path = self
            .dir
            .path()
            .join("root/io.containerd.content.v1.content/blobs/sha256")
            .join(blob.hex());
        let bytes = std::fs::read(&path).unwrap_or_else(|_| {
            panic!(
                "containerd did not store {} ({})",
                blob.digest, blob.media_type
            )
        });
        assert_eq!(
            sha256_digest(&bytes),
            blob.digest,
            "containerd stored wrong bytes for {}",
            blob.digest
        );
    }

    /// Panics unless `reference` resolved to `manifest_digest` and containerd holds `image`'s
    /// manifest, config and every layer, byte for byte.
    pub fn assert_pulled(&self, reference: &str, manifest_digest: &str, image: &Image) {
        assert_eq!(
            self.image_digest(reference).as_deref(),
            Some(manifest_digest),
            "ctr images ls for {reference}"
        );
        let listed = self.content_digests();
        for blob in std::iter::once(&image.manifest).chain(image.blobs()) {
            assert!(
                listed.contains(&blob.digest),
                "ctr content ls lacks {}",
                blob.digest
            );
            self.assert_stored(blob);
        }
    }

    /// The daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

fn ctr_command(socket: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("ctr");
    command
        .arg("--address")
        .arg(socket)
        .arg("--namespace")
        .arg(NAMESPACE)
        .args(args);
    command
}
