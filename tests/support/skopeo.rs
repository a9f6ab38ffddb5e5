//! `skopeo copy docker://… dir:…` as a real registry client, and verification of what it
//! wrote: the manifest bytes are exactly the fixture's, and every blob file hashes to the
//! digest it is named after.
//!
//! skopeo runs hermetically: its own policy (accept anything), an empty registries.conf (no
//! mirrors or short-name aliases), no stored credentials, plain HTTP allowed with
//! `--src-tls-verify=false`, and `--preserve-digests` so it never rewrites a manifest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::{sha256_digest, Image, Index, Platform};
use super::process::{require_tool, run_bounded};

/// Which images of a multi-platform reference to copy.
#[derive(Clone, Debug)]
pub enum Platforms {
    /// skopeo's default: the host's platform (or the only image).
    Host,
    /// `--all`: the index and every child.
    All,
    /// `--override-os/--override-arch`.
    Only(Platform),
}

/// A `dir:` copy made by skopeo; removed when dropped.
pub struct CopiedImage {
    _root: TempDir,
    path: PathBuf,
}

impl CopiedImage {
    /// The directory skopeo wrote.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The top-level `manifest.json` bytes (the index when copied with `--all`).
    pub fn manifest(&self) -> Vec<u8> {
        std::fs::read(self.path.join("manifest.json")).expect("read manifest.json")
    }

    /// Every file in the copy except `manifest.json` and `version`.
    pub fn content_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .expect("read copy dir")
            .map(|entry| entry.expect("dir entry").path())
            .filter(|path| {
                !matches!(
                    path.file_name().and_then(|n| n.to_str()),
                    Some("manifest.json" | "version")
                )
            })
            .collect();
        files.sort();
        files
    }

    /// Panics unless every content file hashes to the digest in its name
    /// (`<hex>` for blobs, `<hex>.manifest.json` for child manifests).
    pub fn verify_every_file_digest(&self) {
        let files = self.content_files();
        assert!(
            !files.is_empty(),
            "skopeo copied no blobs into {}",
            self.path().display()
        );
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 file name");
            let hex = name.strip_suffix(".manifest.json").unwrap_or(name);
            let bytes = std::fs::read(&path).expect("read copied file");
            assert_eq!(
                sha256_digest(&bytes),
                format!("sha256:{hex}"),
                "copied file {name} does not match its digest"
            );
        }
    }

    /// Panics unless the copy is exactly `image`: same manifest bytes, every blob present with
    /// the right bytes, nothing else.
    pub fn verify_image(&self, image: &Image) {
        self.verify_every_file_digest();
        assert_eq!(
            sha256_digest(&self.manifest()),
            image.manifest.digest,
            "manifest.json differs from the pushed manifest:\n{}",
            String::from_utf8_lossy(&self.manifest())
        );
        for blob in image.blobs() {
            let bytes = std::fs::read(self.path().join(blob.hex())).unwrap_or_else(|_| {
                panic!(
                    "blob {} ({}) missing from the copy",
                    blob.digest, blob.media_type
                )
            });
            assert_eq!(bytes, blob.bytes, "blob {} differs", blob.digest);
        }
        assert_eq!(
            self.content_files().len(),
            image.blobs().len(),
            "unexpected extra files in the copy"
        );
    }

    /// Panics unless the copy (made with [`Platforms::All`]) is exactly `index` and all of its
    /// children.
    pub fn verify_index(&self, index: &Index) {
        self.verify_every_file_digest();
        assert_eq!(
            sha256_digest(&self.manifest()),
            index.index.digest,
            "manifest.json differs from the pushed index"
        );
        for child in &index.children {
            let manifest = std::fs::read(
                self.path()
                    .join(format!("{}.manifest.json", child.manifest.hex())),
            )
            .unwrap_or_else(|_| {
                panic!(
                    "child manifest {} missing from the copy",
                    child.manifest.digest
                )
            });
            assert_eq!(
                manifest, child.manifest.bytes,
                "child manifest {} differs",
                child.manifest.digest
            );
            for blob in child.blobs() {
                let bytes = std::fs::read(self.path().join(blob.hex())).unwrap_or_else(|_| {
                    panic!(
                        "blob {} of {:?} missing from the copy",
                        blob.digest, child.platform
                    )
                });
                assert_eq!(bytes, blob.bytes, "blob {} differs", blob.digest);
            }
        }
    }
}

/// Copies `docker://<reference>` (e.g. `127.0.0.1:5000/team/app:1`) into a fresh `dir:`.
/// `credentials` are sent to the registry (and its token realm); without them skopeo sends
/// none. Returns skopeo's stderr on failure.
pub fn skopeo_copy(
    reference: &str,
    platforms: Platforms,
    credentials: Option<(&str, &str)>,
) -> Result<CopiedImage, String> {
    skopeo_copy_from(reference, platforms, credentials, None)
}

/// [`skopeo_copy`] over verified TLS: `--src-cert-dir` holding `ca` (as `ca.crt`), and no
/// insecure flag.
pub fn skopeo_copy_verified(reference: &str, ca: &Path) -> Result<CopiedImage, String> {
    skopeo_copy_from(reference, Platforms::Host, None, Some(ca))
}

fn skopeo_copy_from(
    reference: &str,
    platforms: Platforms,
    credentials: Option<(&str, &str)>,
    ca: Option<&Path>,
) -> Result<CopiedImage, String> {
    require_tool("skopeo");
    let dir = tempfile::Builder::new()
        .prefix("pullgate-skopeo-")
        .tempdir()
        .expect("tempdir");
    let config_dir = tempfile::Builder::new()
        .prefix("pullgate-skopeo-conf-")
        .tempdir()
        .expect("tempdir");
    let policy = config_dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("write policy");
    let registries_conf = config_dir.path().join("registries.conf");
    std::fs::write(&registries_conf, "").expect("write registries.conf");
    let destination = dir.path().join("image");

    let mut command = Command::new("skopeo");
    command
        .env("CONTAINERS_REGISTRIES_CONF", &registries_conf)
        .env("REGISTRY_AUTH_FILE", config_dir.path().join("auth.json"))
        .arg("--policy")
        .arg(&policy)
        .arg("copy")
        .arg("--preserve-digests")
        .arg("--retry-times=0");
    match ca {
        None => command.arg("--src-tls-verify=false"),
        Some(ca) => {
            let certs = config_dir.path().join("certs");
            std::fs::create_dir_all(&certs).expect("create the cert dir");
            std::fs::copy(ca, certs.join("ca.crt")).expect("copy the CA");
            command.arg("--src-cert-dir").arg(certs)
        }
    };
    match credentials {
        Some((user, password)) => command.arg(format!("--src-creds={user}:{password}")),
        None => command.arg("--src-no-creds"),
    };
    match &platforms {
        Platforms::Host => {}
        Platforms::All => {
            command.arg("--all");
        }
        Platforms::Only(platform) => {
            command
                .arg(format!("--override-os={}", platform.os))
                .arg(format!("--override-arch={}", platform.architecture));
        }
    }
    command
        .arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", destination.display()));

    let output = run_bounded(command, Duration::from_secs(120))?;
    if !output.status.success() {
        return Err(format!(
            "skopeo copy {reference} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(CopiedImage {
        _root: dir,
        path: destination,
    })
}

/// [`skopeo_copy`] that must succeed.
pub fn skopeo_pull(
    reference: &str,
    platforms: Platforms,
    credentials: Option<(&str, &str)>,
) -> CopiedImage {
    skopeo_copy(reference, platforms, credentials).unwrap_or_else(|err| panic!("{err}"))
}
