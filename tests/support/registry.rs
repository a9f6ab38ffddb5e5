//! Debian's `docker-registry` (CNCF distribution 2.8) as a real upstream on loopback.
//!
//! Each [`Registry`] owns a temp dir with its `config.yml`, filesystem storage and logs, and
//! listens on its own 127.0.0.1 port. It can be stopped and started again on the same port
//! and storage (the "upstream is down" tests), can require bearer tokens from a
//! [`TokenServer`], and exposes its storage so a test can corrupt a blob in place. Its access
//! log (stdout, one combined-log line per request) tells a test what a client really asked
//! the upstream.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::{Image, Index};
use super::http::{loopback_client, RegistryClient};
use super::process::{free_port, require_tool, wait_for, ChildProcess};
use super::token_server::TokenServer;

/// The registry binary shipped by Debian's `docker-registry` package.
pub const REGISTRY_BINARY: &str = "docker-registry";
/// The `service` (token audience) a token-auth registry expects.
pub const TOKEN_SERVICE: &str = "pullgate-test-registry";
/// The `issuer` a token-auth registry trusts.
pub const TOKEN_ISSUER: &str = "pullgate-test-token-issuer";

/// A running (or stopped) docker-registry.
pub struct Registry {
    dir: TempDir,
    port: u16,
    token_server: Option<TokenServer>,
    credentials: Option<(String, String)>,
    /// (endpoint URL, Authorization value) for push notifications.
    notify: Option<(String, String)>,
    process: Option<ChildProcess>,
}

/// One line of the registry's access log.
#[derive(Clone, Debug)]
pub struct AccessLogEntry {
    pub method: String,
    /// Path and query, as requested.
    pub target: String,
    pub status: u16,
}

/// A blob whose bytes on the registry's disk were damaged; [`CorruptedBlob::restore`] puts
/// the original bytes back.
pub struct CorruptedBlob {
    path: PathBuf,
    original: Vec<u8>,
    /// Digest of the damaged bytes (what a cache must never store).
    pub corrupted_digest: String,
}

impl CorruptedBlob {
    /// Writes the original bytes back (as a new file, so a read still in flight keeps the
    /// damaged bytes it started with).
    pub fn restore(&self) {
        replace_file(&self.path, &self.original);
    }
}

impl Registry {
    /// An anonymous, read-write registry.
    pub fn start_plain() -> Self {
        Registry::start_with(None)
    }

    /// A registry that requires bearer tokens from a fresh [`TokenServer`], which gives them
    /// only to `username`/`password`.
    /// A plain registry on `port` that sends push notifications (distribution's envelope) to
    /// `url` with `Authorization: <authorization>`.
    pub fn start_with_notifications_on(port: u16, url: &str, authorization: &str) -> Self {
        require_tool(REGISTRY_BINARY);
        let dir = tempfile::Builder::new()
            .prefix("pullgate-registry-")
            .tempdir()
            .expect("tempdir");
        let mut registry = Registry {
            port,
            dir,
            token_server: None,
            credentials: None,
            notify: Some((url.into(), authorization.into())),
            process: None,
        };
        registry.write_config();
        registry.start();
        registry
    }

    pub fn start_with_token_auth(username: &str, password: &str) -> Self {
        let token_server = TokenServer::start(TOKEN_ISSUER, TOKEN_SERVICE, username, password);
        let mut registry = Registry::start_with(Some(token_server));
        registry.credentials = Some((username.into(), password.into()));
        registry
    }

    fn start_with(token_server: Option<TokenServer>) -> Self {
        require_tool(REGISTRY_BINARY);
        let dir = tempfile::Builder::new()
            .prefix("pullgate-registry-")
            .tempdir()
            .expect("tempdir");
        let mut registry = Registry {
            port: free_port(),
            dir,
            token_server,
            credentials: None,
            notify: None,
            process: None,
        };
        registry.write_config();
        registry.start();
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The token server, when this registry requires tokens.
    pub fn token_server(&self) -> &TokenServer {
        self.token_server
            .as_ref()
            .expect("registry was started without token auth")
    }

    /// The credentials the token server accepts, when this registry requires tokens.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// A client that can push to and pull from this registry (doing the token dance).
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), self.credentials())
    }

    /// Pushes `image` as `repo:tag`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) {
        self.client().push_image(repo, tag, image);
    }

    /// Pushes `index` and its children as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Index) {
        self.client().push_index(repo, tag, index);
    }

    /// Starts (or restarts) the process on the same port and storage, and waits until
    /// `GET /v2/` answers.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "registry already running");
        let mut command = Command::new(REGISTRY_BINARY);
        command.arg("serve").arg(self.dir.path().join("config.yml"));
        let mut process = ChildProcess::spawn("docker-registry", command, self.dir.path());
        let client = loopback_client();
        let url = format!("{}/v2/", self.url());
        wait_for(
            "docker-registry to answer GET /v2/",
            Duration::from_secs(20),
            || {
                process.assert_running();
                let status = client.get(&url).send().ok()?.status();
                // 401 is the ready answer of a token-auth registry.
                (status.is_success() || status.as_u16() == 401).then_some(())
            },
        );
        self.process = Some(process);
    }

    /// Stops the process (SIGTERM, then SIGKILL); storage and port stay reserved for
    /// [`Registry::start`].
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
        // The port must really be closed before a test relies on the upstream being down.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_for(
            "docker-registry port to close",
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// The requests the registry has logged so far (across restarts).
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        // The registry writes a request's line after it has sent the response, so a client
        // can finish first: read once the log has stopped growing (bounded, about 2 s at most).
        let path = self.dir.path().join("docker-registry.stdout.log");
        let len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut last = len();
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            let now = len();
            if now == last {
                break;
            }
            last = now;
        }
        let stdout = std::fs::read_to_string(&path).unwrap_or_default();
        stdout.lines().filter_map(parse_access_log_line).collect()
    }

    /// The last 40 logged requests, one per line, for failure messages.
    pub fn access_log_summary(&self) -> String {
        let log = self.access_log();
        let start = log.len().saturating_sub(40);
        log[start..]
            .iter()
            .map(|e| format!("{} {} -> {}", e.method, e.target, e.status))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many logged requests had `method` and a target containing `needle`.
    pub fn count_requests(&self, method: &str, needle: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|entry| entry.method == method && entry.target.contains(needle))
            .count()
    }

    /// How many blob GETs and HEADs the registry has served (any status).
    pub fn blob_requests(&self) -> usize {
        self.access_log()
            .iter()
            .filter(|entry| entry.target.contains("/blobs/sha256:"))
            .count()
    }

    /// How many manifest and blob requests (any method, any status) the registry has served;
    /// `GET /v2/` probes and uploads are not counted.
    pub fn content_requests(&self) -> usize {
        self.access_log()
            .iter()
            .filter(|entry| {
                matches!(entry.method.as_str(), "GET" | "HEAD")
                    && (entry.target.contains("/manifests/")
                        || entry.target.contains("/blobs/sha256:"))
            })
            .count()
    }

    /// Where distribution's filesystem driver keeps the bytes of `digest`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage_dir().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Damages the stored bytes of `digest` in place, keeping the length, so the registry
    /// serves wrong bytes with the right `Content-Length` (the registry does not re-hash on
    /// reads). The damage sits past the middle, after a client has already received data.
    pub fn corrupt_blob(&self, digest: &str) -> CorruptedBlob {
        let path = self.blob_path(digest);
        let original =
            std::fs::read(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
        let mut damaged = original.clone();
        let start = damaged.len() * 3 / 4;
        for byte in damaged.iter_mut().skip(start).take(64) {
            *byte ^= 0xff;
        }
        assert_ne!(damaged, original);
        replace_file(&path, &damaged);
        CorruptedBlob {
            path,
            original,
            corrupted_digest: super::fixtures::sha256_digest(&damaged),
        }
    }

    fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn write_config(&self) {
        let auth = match &self.token_server {
            None => String::new(),
            Some(tokens) => {
                let bundle = self.dir.path().join("token-root.pem");
                std::fs::write(&bundle, tokens.root_cert_pem()).expect("write root cert bundle");
                format!(
                    "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    tokens.realm(),
                    bundle.display()
                )
            }
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: pullgate-test-secret\n\
             health:\n  storagedriver:\n    enabled: false\n\
             {auth}{notify}",
            notify = match &self.notify {
                None => String::new(),
                Some((url, authorization)) => format!(
                    "notifications:\n  endpoints:\n    - name: pullgate\n      url: {url}\n      headers:\n        Authorization: [\"{authorization}\"]\n      timeout: 2s\n      threshold: 10\n      backoff: 1s\n"
                ),
            },
            storage = self.storage_dir().display(),
            port = self.port,
        );
        std::fs::write(self.dir.path().join("config.yml"), config).expect("write config.yml");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}

/// Replaces `path` by a new file with `bytes` (write + rename).
fn replace_file(path: &std::path::Path, bytes: &[u8]) {
    let staging = path.with_extension("pullgate-test-staging");
    std::fs::write(&staging, bytes).expect("write staging file");
    std::fs::rename(&staging, path).expect("rename staging file over blob");
}

/// `127.0.0.1 - - [date] "GET /v2/x/blobs/sha256:… HTTP/1.1" 200 123 "" "agent"`.
fn parse_access_log_line(line: &str) -> Option<AccessLogEntry> {
    let start = line.find('"')?;
    let request_and_rest = &line[start + 1..];
    let end = request_and_rest.find('"')?;
    let mut request = request_and_rest[..end].split_whitespace();
    let (method, target) = (request.next()?.to_string(), request.next()?.to_string());
    let status = request_and_rest[end + 1..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(AccessLogEntry {
        method,
        target,
        status,
    })
}
