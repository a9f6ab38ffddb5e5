//! One shape for the three hosts under test, so a scenario is written once
//! ([`super::scenarios`]) and run on each: the native binary ([`Pullgate`]), the Workers
//! host under `wrangler dev` ([`Worker`]) and the Spin component under `wasmtime serve`
//! ([`SpinApp`]).
//!
//! A scenario describes the configuration it needs as a [`HostConfig`] (upstreams on loopback,
//! extra TOML, secrets by name); each host turns that into its own way of being configured
//! (`--config`/`--upstream` and the environment; `PULLGATE_CONFIG` and `.dev.vars`; the
//! `pullgate_config` variable and Spin variables). What a host cannot do the same way is a
//! constant or an `Option` on [`Host`], never a silent skip: Spin runs each request in a fresh
//! instance, so nothing in memory (coalescing, token reuse, metrics) spans requests there.

use std::path::PathBuf;

use super::fixtures::sha256_digest;
use super::http::RegistryClient;
use super::process::free_port;
use super::pullgate::{Metrics, Pullgate};
use super::spin::SpinApp;
use super::worker::Worker;

/// One `[[upstream]]` table of a [`HostConfig`].
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    pub host: String,
    pub url: String,
    /// More `key = value` lines of the table (credentials, `auth_hosts`).
    pub extra: String,
}

/// What a scenario asks of the host: upstreams, extra configuration, secrets, a fixed port.
#[derive(Clone, Debug, Default)]
pub struct HostConfig {
    upstreams: Vec<UpstreamSpec>,
    toml: String,
    secrets: Vec<(String, String)>,
    port: Option<u16>,
}

impl HostConfig {
    /// An `[[upstream]]` table `host = … url = …`. Without one for `docker.io`, every host
    /// points docker.io at a closed loopback port: no test ever reaches Docker Hub.
    pub fn upstream(mut self, host: &str, url: &str) -> Self {
        self.upstreams.push(UpstreamSpec {
            host: host.into(),
            url: url.into(),
            extra: String::new(),
        });
        self
    }

    /// An `[[upstream]]` table with more lines (credentials, `auth_hosts`).
    pub fn upstream_with(mut self, host: &str, url: &str, extra: &str) -> Self {
        self.upstreams.push(UpstreamSpec {
            host: host.into(),
            url: url.into(),
            extra: extra.into(),
        });
        self
    }

    /// TOML put before the upstream tables (`[cache]`, `[auth]`, `[[access]]` …).
    pub fn toml(mut self, toml: &str) -> Self {
        self.toml.push_str(toml);
        self.toml.push('\n');
        self
    }

    /// A secret the configuration references through [`Host::secret_reference`]; `name` is
    /// lower case (a Spin variable declared in `spin.toml`; `NAME` in the environment or as a
    /// Worker secret).
    pub fn secret(mut self, name: &str, value: &str) -> Self {
        self.secrets.push((name.into(), value.into()));
        self
    }

    /// Listen on this port (from [`free_port`]): for a configuration that names the host's
    /// own URL (`[auth] public_url`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The whole configuration file. With `closed_docker_io`, a `docker.io` upstream at a
    /// closed loopback port is added unless one is named.
    pub fn to_toml(&self, closed_docker_io: bool) -> String {
        let mut out = format!("{}\n", self.toml);
        if closed_docker_io && !self.upstreams.iter().any(|u| u.host == "docker.io") {
            out.push_str(&format!(
                "[[upstream]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:{}\"\n\n",
                free_port()
            ));
        }
        for u in &self.upstreams {
            out.push_str(&format!(
                "[[upstream]]\nhost = \"{}\"\nurl = \"{}\"\n{}\n",
                u.host, u.url, u.extra
            ));
        }
        out
    }
}

/// A pullgate host under test, started on 127.0.0.1.
pub trait Host: Sized {
    /// The host's name in failure messages.
    const NAME: &'static str;
    /// Whether memory outlives a request: false on Spin (a fresh instance per request), where
    /// concurrent misses are not coalesced and tokens are fetched per request.
    const SHARES_MEMORY: bool;
    /// Layer sizes (bytes before tar+gzip) of the multi-layer fixture, chosen to cross this
    /// host's storage boundaries (R2's 8 MiB multipart part; Spin's key-value chunks).
    const LAYER_SIZES: &'static [usize];
    /// Whether `pullgate_bytes_served_total` counts response bytes: only the native host
    /// counts them (it sees every body leave); the others export the counter at 0.
    const COUNTS_BYTES_SERVED: bool;

    /// Starts the host with `config` and waits until it answers.
    fn start(config: HostConfig) -> Self;
    /// `127.0.0.1:PORT`, the registry host clients put in references.
    fn host(&self) -> String;
    /// `http://127.0.0.1:PORT`.
    fn url(&self) -> String {
        format!("http://{}", self.host())
    }
    /// An anonymous registry client.
    fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), None)
    }
    /// Stops and starts again on the same port with the same storage.
    fn restart(&mut self);
    /// `GET /metrics`, or None where the counters do not span requests (Spin).
    fn metrics(&self) -> Option<Metrics>;
    /// The host's log so far, for assertions and failure messages.
    fn log(&self) -> String;
    /// How a configuration names the secret `name` set with [`HostConfig::secret`]
    /// (`env:NAME` on the native and Workers hosts).
    fn secret_reference(name: &str) -> String {
        format!("env:{}", name.to_ascii_uppercase())
    }
    /// What of the blob `digest` stays in the host's storage: entries named after it or
    /// holding bytes whose digest is `content_digest` (what a cache must never keep of a
    /// corrupted transfer).
    fn traces_of(&self, digest: &str, content_digest: &str) -> Vec<String>;
    /// Whether the blob `digest` is stored, or None where the harness cannot see the storage
    /// layout (workerd's local R2 keeps multipart objects as parts).
    fn has_blob(&self, digest: &str) -> Option<bool>;
}

fn display(paths: Vec<PathBuf>) -> Vec<String> {
    paths.into_iter().map(|p| p.display().to_string()).collect()
}

impl Host for Pullgate {
    const NAME: &'static str = "native";
    const SHARES_MEMORY: bool = true;
    const LAYER_SIZES: &'static [usize] = &[4 << 10, 300 << 10, 3 << 20];
    const COUNTS_BYTES_SERVED: bool = true;

    fn start(config: HostConfig) -> Self {
        let mut builder = Pullgate::builder().config(&config.to_toml(false));
        // The flags repeat the tables' URLs; they also tell the builder whether docker.io is
        // named (if not, it points docker.io at a closed port).
        for u in &config.upstreams {
            builder = builder.upstream(&u.host, &u.url);
        }
        for (name, value) in &config.secrets {
            builder = builder.env(&name.to_ascii_uppercase(), value);
        }
        if let Some(port) = config.port {
            builder = builder.port(port);
        }
        builder.start()
    }
    fn host(&self) -> String {
        Pullgate::host(self)
    }
    fn restart(&mut self) {
        Pullgate::restart(self)
    }
    fn metrics(&self) -> Option<Metrics> {
        Some(Pullgate::metrics(self))
    }
    fn log(&self) -> String {
        self.stderr()
    }
    fn traces_of(&self, digest: &str, content_digest: &str) -> Vec<String> {
        display(self.files_holding(digest, content_digest))
    }
    fn has_blob(&self, digest: &str) -> Option<bool> {
        let hex = digest.trim_start_matches("sha256:");
        Some(self.data_files().iter().any(|path| {
            path.file_name().is_some_and(|name| name == hex)
                && std::fs::read(path).is_ok_and(|bytes| sha256_digest(&bytes) == digest)
        }))
    }
}

impl Host for Worker {
    const NAME: &'static str = "worker";
    const SHARES_MEMORY: bool = true;
    /// The largest is bigger than the R2 writer's 8 MiB part, so it is stored as a multipart
    /// upload; the others by a single verified put.
    const LAYER_SIZES: &'static [usize] = &[4 << 10, 300 << 10, 12 << 20];
    const COUNTS_BYTES_SERVED: bool = false;

    fn start(config: HostConfig) -> Self {
        let mut builder = Worker::builder().config(&config.to_toml(true));
        for (name, value) in &config.secrets {
            builder = builder.secret(&name.to_ascii_uppercase(), value);
        }
        if let Some(port) = config.port {
            builder = builder.port(port);
        }
        builder.start()
    }
    fn host(&self) -> String {
        Worker::host(self)
    }
    fn restart(&mut self) {
        Worker::restart(self)
    }
    fn metrics(&self) -> Option<Metrics> {
        // Per isolate: `wrangler dev` runs one.
        Some(Worker::metrics(self))
    }
    fn log(&self) -> String {
        Worker::log(self)
    }
    fn traces_of(&self, _digest: &str, content_digest: &str) -> Vec<String> {
        display(self.stored_files_holding(content_digest))
    }
    fn has_blob(&self, _digest: &str) -> Option<bool> {
        None
    }
}

impl Host for SpinApp {
    const NAME: &'static str = "spin";
    const SHARES_MEMORY: bool = false;
    /// One layer within a key-value chunk, one spanning four chunks.
    const LAYER_SIZES: &'static [usize] = &[64 << 10, 3 << 20];
    const COUNTS_BYTES_SERVED: bool = false;

    fn start(config: HostConfig) -> Self {
        let mut builder = SpinApp::builder().config(&config.to_toml(true));
        for (name, value) in &config.secrets {
            builder = builder.variable(name, value);
        }
        if let Some(port) = config.port {
            builder = builder.port(port);
        }
        builder.start()
    }
    fn host(&self) -> String {
        SpinApp::host(self)
    }
    fn restart(&mut self) {
        SpinApp::restart(self)
    }
    fn metrics(&self) -> Option<Metrics> {
        None
    }
    fn log(&self) -> String {
        SpinApp::log(self)
    }
    /// Secrets are Spin variables (declared in `spin.toml`), named `variable:name`.
    fn secret_reference(name: &str) -> String {
        format!("variable:{name}")
    }
    fn traces_of(&self, digest: &str, content_digest: &str) -> Vec<String> {
        let mut found = self.blob_keys(digest);
        let bad = content_digest.trim_start_matches("sha256:");
        for key in self.kv_keys("default") {
            if key.contains(bad) && !found.contains(&key) {
                found.push(key);
            }
        }
        found
    }
    fn has_blob(&self, digest: &str) -> Option<bool> {
        let hex = digest.trim_start_matches("sha256:");
        Some(self.kv_keys("default").contains(&format!("~blob/{hex}")))
    }
}
