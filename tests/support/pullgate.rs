//! The `pullgate` binary under test, driven through its command line:
//! `pullgate serve --listen 127.0.0.1:PORT --data-dir DIR --upstream HOST=URL… [--config FILE]`.
//!
//! A [`Pullgate`] owns its data dir, so it can be stopped (SIGTERM, which must end the
//! process gracefully) and started again on the same port with the same cache. Readiness is
//! `GET /healthz` answering 200; `/metrics` is read as Prometheus text and summed by name.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::sha256_digest;
use super::http::{loopback_client, RegistryClient};
use super::process::{free_port, wait_until_serving, ChildProcess};

/// Counter names pullgate exports (contract with `src/`).
pub mod metric {
    pub const CACHE_HITS: &str = "pullgate_cache_hits_total";
    pub const CACHE_MISSES: &str = "pullgate_cache_misses_total";
    pub const STALE_SERVED: &str = "pullgate_stale_served_total";
    pub const UPSTREAM_REQUESTS: &str = "pullgate_upstream_requests_total";
    pub const UPSTREAM_ERRORS: &str = "pullgate_upstream_errors_total";
    pub const COALESCED_WAITS: &str = "pullgate_coalesced_waits_total";
    pub const BYTES_SERVED: &str = "pullgate_bytes_served_total";
    pub const BYTES_FETCHED: &str = "pullgate_bytes_fetched_total";
}

/// How long pullgate may take to exit after SIGTERM.
const GRACEFUL_EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Options for starting pullgate.
#[derive(Default)]
pub struct PullgateBuilder {
    upstreams: Vec<(String, String)>,
    config: Option<String>,
    env: Vec<(String, String)>,
    fd_limit: Option<u64>,
    port: Option<u16>,
    tls_ca: Option<PathBuf>,
}

impl PullgateBuilder {
    /// Pullgate serves TLS (its `[tls]` or `PULLGATE_TLS_*` set by the caller) with a
    /// certificate `ca` signed: readiness and [`Pullgate::url`] use `https://`, trusting `ca`.
    pub fn tls_ca(mut self, ca: &Path) -> Self {
        self.tls_ca = Some(ca.to_path_buf());
        self
    }

    /// Runs the process with `RLIMIT_NOFILE` lowered to `limit` (fd exhaustion tests).
    pub fn fd_limit(mut self, limit: u64) -> Self {
        self.fd_limit = Some(limit);
        self
    }

    /// Listen on this port (from [`free_port`]) instead of a fresh one: for a configuration
    /// that must name pullgate's own URL (`[auth] public_url`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `--upstream HOST=URL` (`docker.io=…` replaces the Docker Hub default). Without one for
    /// `docker.io`, the harness points docker.io at a closed loopback port, so that no test
    /// can ever reach Docker Hub.
    pub fn upstream(mut self, host: &str, url: &str) -> Self {
        self.upstreams.push((host.into(), url.into()));
        self
    }

    /// A TOML config file passed with `--config`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// An environment variable for the process (e.g. upstream credentials).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Starts pullgate and waits for `/healthz`.
    pub fn start(self) -> Pullgate {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-under-test-")
            .tempdir()
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let config_path = self.config.map(|toml| {
            let path = dir.path().join("pullgate.toml");
            std::fs::write(&path, toml).expect("write pullgate config");
            path
        });
        let mut upstreams = self.upstreams;
        if !upstreams.iter().any(|(host, _)| host == "docker.io") {
            // Tests never reach the internet: the default upstream becomes a closed loopback port.
            upstreams.push((
                "docker.io".into(),
                format!("http://127.0.0.1:{}", free_port()),
            ));
        }
        let mut pullgate = Pullgate {
            dir,
            data_dir,
            port: self.port.unwrap_or_else(free_port),
            upstreams,
            config_path,
            env: self.env,
            fd_limit: self.fd_limit,
            tls_ca: self.tls_ca,
            process: None,
        };
        pullgate.start();
        pullgate
    }
}

/// A pullgate process (or a stopped one, keeping its data dir and port).
pub struct Pullgate {
    dir: TempDir,
    data_dir: PathBuf,
    port: u16,
    upstreams: Vec<(String, String)>,
    config_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    fd_limit: Option<u64>,
    tls_ca: Option<PathBuf>,
    process: Option<ChildProcess>,
}

impl Pullgate {
    /// Starts describing a pullgate.
    pub fn builder() -> PullgateBuilder {
        PullgateBuilder::default()
    }

    /// `127.0.0.1:PORT`, the registry host clients put in references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` with [`PullgateBuilder::tls_ca`]).
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    /// Sends `signal` to the process (SIGHUP: reload the TLS certificate).
    pub fn signal(&self, signal: libc::c_int) {
        self.process
            .as_ref()
            .expect("pullgate is not running")
            .signal(signal);
    }

    /// An anonymous registry client for pullgate.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), None)
    }

    /// The cache directory given with `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the process (again) on the same port and data dir, waiting for `GET /healthz`.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "pullgate already running");
        let mut command = Command::new(env!("CARGO_BIN_EXE_pullgate"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.host())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "1");
        for (host, url) in &self.upstreams {
            command.arg("--upstream").arg(format!("{host}={url}"));
        }
        if let Some(path) = &self.config_path {
            command.arg("--config").arg(path);
        }
        for (name, value) in &self.env {
            command.env(name, value);
        }
        if let Some(limit) = self.fd_limit {
            // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut process = ChildProcess::spawn("pullgate", command, self.dir.path());
        let url = format!("{}/healthz", self.url());
        match &self.tls_ca {
            None => wait_until_serving("pullgate", &mut process, &url, Duration::from_secs(30)),
            Some(ca) => {
                let client = super::http::client_trusting(ca);
                super::process::wait_for(
                    &format!("pullgate on {url}"),
                    Duration::from_secs(30),
                    || {
                        process.assert_running();
                        client
                            .get(&url)
                            .send()
                            .ok()
                            .filter(|r| r.status().is_success())
                            .map(|_| ())
                    },
                );
            }
        }
        self.process = Some(process);
    }

    /// Sends SIGTERM and waits for the process to exit; panics if it does not exit in time.
    /// Returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut process = self.process.take().expect("pullgate is not running");
        match process.terminate(GRACEFUL_EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "pullgate did not exit within {GRACEFUL_EXIT_TIMEOUT:?} of SIGTERM\n{}",
                process.log_tail()
            ),
        }
    }

    /// Kills the process with SIGKILL (no graceful shutdown: a crash or power loss), keeping
    /// the data dir and port for [`Pullgate::start`].
    pub fn kill(&mut self) {
        let mut process = self.process.take().expect("pullgate is not running");
        process.kill();
    }

    /// Stops gracefully (asserting a successful exit) and starts again with the same data.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "pullgate exited with {status} after SIGTERM; a graceful exit is status 0"
        );
        self.start();
    }

    /// Reads `GET /metrics`.
    pub fn metrics(&self) -> Metrics {
        Metrics::fetch(&self.url())
    }

    /// Every regular file under the data dir.
    pub fn data_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![self.data_dir.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => pending.push(path),
                    Ok(kind) if kind.is_file() => files.push(path),
                    _ => {}
                }
            }
        }
        files
    }

    /// Files in the data dir named after `digest`'s hex or holding bytes whose digest is
    /// `content_digest` (the bytes a cache must never have kept).
    pub fn files_holding(&self, digest: &str, content_digest: &str) -> Vec<PathBuf> {
        let hex = digest.trim_start_matches("sha256:");
        self.data_files()
            .into_iter()
            .filter(|path| {
                let named = path.to_string_lossy().contains(hex);
                let small = std::fs::metadata(path)
                    .map(|m| m.len() < 64 << 20)
                    .unwrap_or(false);
                let holds = small
                    && std::fs::read(path)
                        .is_ok_and(|bytes| sha256_digest(&bytes) == content_digest);
                named || holds
            })
            .collect()
    }

    /// Everything the process wrote to stderr so far (its request and diagnostic log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pullgate.stderr.log")).unwrap_or_default()
    }

    /// The process's logs, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(ChildProcess::log_tail)
            .unwrap_or_default()
    }
}

/// `pullgate hash-password`: the PHC string of `password`, for `[[identity]] password_hash`.
pub fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pullgate hash-password");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write password");
    let out = child.wait_with_output().expect("hash-password output");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// A parsed Prometheus text exposition.
#[derive(Clone, Debug)]
pub struct Metrics {
    samples: Vec<(String, f64)>,
    text: String,
}

impl Metrics {
    /// Parses `name{labels} value [timestamp]` lines, ignoring comments.
    /// Reads and parses `GET <base>/metrics`.
    pub fn fetch(base: &str) -> Self {
        let response = loopback_client()
            .get(format!("{base}/metrics"))
            .send()
            .expect("GET /metrics");
        assert!(
            response.status().is_success(),
            "GET /metrics answered {}",
            response.status()
        );
        Metrics::parse(&response.text().expect("metrics body"))
    }

    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| {
                let (name, rest) = match line.find('{') {
                    Some(open) => (&line[..open], &line[line.rfind('}')? + 1..]),
                    None => line.split_once(char::is_whitespace)?,
                };
                let value = rest.split_whitespace().next()?.parse().ok()?;
                Some((name.trim().to_string(), value))
            })
            .collect();
        Metrics {
            samples,
            text: text.to_string(),
        }
    }

    /// The sum of every sample of `name`, across all label sets (0 when absent).
    pub fn total(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(sample, _)| sample == name)
            .map(|(_, value)| value)
            .sum()
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(sample, _)| sample == name)
    }

    /// The raw text, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }
}
