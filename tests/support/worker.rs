//! pullgate's Cloudflare Workers host under `wrangler dev --local` (workerd with local KV and
//! R2), on 127.0.0.1 only.
//!
//! The worker is built once per test run, exactly as `wrangler.toml`'s `[build]` section says,
//! with the pinned tools from `scripts/worker-tools.sh` (a missing tool is a panic naming that
//! script). Each [`Worker`] then runs `wrangler dev` from its own temp dir, on a config derived
//! from the repository's `wrangler.toml` (same bindings; no `[build]`, since the bundle is
//! built; `PULLGATE_CONFIG` set by the test; secrets in `.dev.vars`), with its KV and R2 state
//! persisted in that dir, so a worker can be stopped and started again with the same cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::sha256_digest;
use super::http::RegistryClient;
use super::process::{free_port, run_bounded, wait_until_serving, ChildProcess};
use super::pullgate::Metrics;

/// How long building the worker may take on a cold machine (cargo, wasm-bindgen, wasm-opt).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long `wrangler dev` may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The environment of the pinned tools (`PATH`, `WASM_BINDGEN_BIN`, …), loaded once.
fn tools_env() -> &'static Vec<(String, String)> {
    static ENV: OnceLock<Result<Vec<(String, String)>, String>> = OnceLock::new();
    let loaded = ENV.get_or_init(|| {
        let script = repo_root().join("scripts/worker-tools.sh");
        let mut command = Command::new("bash");
        command.arg("-c").arg(format!(
            ". \"$(bash '{}' --check)\" && env -0",
            script.display()
        ));
        let output = run_bounded(command, Duration::from_secs(60))?;
        if !output.status.success() {
            return Err(format!(
                "the Workers tools are missing: run `bash scripts/worker-tools.sh` first \
                 (scripts/test.sh does).\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(output
            .stdout
            .split(|b| *b == 0)
            .filter_map(|pair| {
                let pair = String::from_utf8_lossy(pair);
                let (name, value) = pair.split_once('=')?;
                Some((name.to_string(), value.to_string()))
            })
            .collect())
    });
    match loaded {
        Ok(env) => env,
        Err(e) => panic!("{e}"),
    }
}

/// The built bundle's entry point; builds it (once per run) with `wrangler.toml`'s command.
fn built_bundle() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = repo_root();
        let text = std::fs::read_to_string(root.join("wrangler.toml"))
            .map_err(|e| format!("read wrangler.toml: {e}"))?;
        let config: toml::Table =
            toml::from_str(&text).map_err(|e| format!("parse wrangler.toml: {e}"))?;
        let build = config
            .get("build")
            .and_then(|b| b.as_table())
            .ok_or("wrangler.toml has no [build]")?;
        let command_line = build
            .get("command")
            .and_then(|c| c.as_str())
            .ok_or("wrangler.toml [build] has no command")?;
        let cwd = root.join(build.get("cwd").and_then(|c| c.as_str()).unwrap_or("."));
        let main = config
            .get("main")
            .and_then(|m| m.as_str())
            .ok_or("wrangler.toml has no main")?;
        let mut command = Command::new("sh");
        command.arg("-c").arg(command_line).current_dir(&cwd);
        for (name, value) in tools_env() {
            command.env(name, value);
        }
        let output = run_bounded(command, BUILD_TIMEOUT)?;
        if !output.status.success() {
            return Err(format!(
                "building the worker (`{command_line}` in {}) failed ({}):\n{}\n{}",
                cwd.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(root.join(main))
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The gzip-compressed size of the built bundle (its wasm and JavaScript files), the figure
/// Cloudflare's size limit applies to. Builds the bundle if needed.
pub fn bundle_gzip_size() -> (u64, u64) {
    use std::io::Write as _;
    let entry = built_bundle();
    // main is build/worker/shim.mjs; the wasm and its glue sit one level up.
    let dir = entry
        .parent()
        .and_then(Path::parent)
        .expect("bundle directory");
    let mut raw = 0u64;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    for name in ["index_bg.wasm", "index.js", "worker/shim.mjs"] {
        let bytes = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.join(name).display()));
        raw += bytes.len() as u64;
        encoder.write_all(&bytes).expect("gzip");
    }
    (raw, encoder.finish().expect("gzip").len() as u64)
}

/// The repository's `wrangler.toml` for a built bundle: `main` absolute, no `[build]`, and
/// `[vars]` holding only `PULLGATE_CONFIG`.
fn dev_config(bundle: &Path, pullgate_config: &str, without_queues: bool) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("wrangler.toml")).expect("read wrangler.toml");
    let mut out = String::new();
    let mut skipping = false;
    let mut in_multiline = false;
    for line in text.lines() {
        if in_multiline {
            in_multiline = !line.contains("'''");
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            skipping = trimmed == "[build]"
                || trimmed == "[vars]"
                || (without_queues && trimmed.starts_with("[[queues."));
        }
        if skipping {
            in_multiline = trimmed.matches("'''").count() == 1;
            continue;
        }
        if trimmed.starts_with("main =") {
            out.push_str(&format!("main = {:?}\n", bundle.display().to_string()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        !pullgate_config.contains("'''"),
        "config must not contain '''"
    );
    out.push_str(&format!(
        "\n[vars]\nPULLGATE_CONFIG = '''\n{pullgate_config}'''\n"
    ));
    out
}

/// `config` without the `[[durable_objects.bindings]]` sections whose `name` is in `names`.
fn drop_bindings(config: &str, names: &[String]) -> String {
    let lines: Vec<&str> = config.lines().collect();
    let mut out = String::new();
    let mut skipping = false;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            let named = lines[i + 1..]
                .iter()
                .take_while(|l| !l.trim().starts_with('['))
                .any(|l| names.iter().any(|n| l.trim() == format!("name = {n:?}")));
            skipping = trimmed == "[[durable_objects.bindings]]" && named;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    for name in names {
        assert!(
            !out.contains(&format!("name = {name:?}")),
            "binding {name} not removed"
        );
    }
    out
}

/// Options for starting a worker.
#[derive(Default)]
pub struct WorkerBuilder {
    config: String,
    secrets: Vec<(String, String)>,
    port: Option<u16>,
    without_queues: bool,
    without_bindings: Vec<String>,
}

impl WorkerBuilder {
    /// Listen on this port (from `free_port`) instead of a fresh one: for a configuration
    /// that must name the worker's own URL (`[auth] public_url`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Without `wrangler.toml`'s queues (`[[queues.producers]]`, `[[queues.consumers]]`): the
    /// gateway's outbox then runs on the pump alone, as a deployment without the bindings.
    pub fn without_queues(mut self) -> Self {
        self.without_queues = true;
        self
    }

    /// Without `wrangler.toml`'s Durable Object binding `name` (its class stays exported):
    /// as a deployment without that binding.
    pub fn without_binding(mut self, name: &str) -> Self {
        self.without_bindings.push(name.to_string());
        self
    }

    /// The `PULLGATE_CONFIG` TOML (the native host's configuration schema).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = toml.to_string();
        self
    }

    /// A Worker secret (`wrangler secret put NAME` in production; `.dev.vars` here).
    pub fn secret(mut self, name: &str, value: &str) -> Self {
        self.secrets.push((name.into(), value.into()));
        self
    }

    /// Builds the bundle if needed, starts `wrangler dev` and waits for `GET /healthz`
    /// (which answers with authentication on, unlike `/v2/`).
    pub fn start(self) -> Worker {
        let bundle = built_bundle();
        let dir = tempfile::Builder::new()
            .prefix("pullgate-worker-under-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(
            dir.path().join("wrangler.toml"),
            drop_bindings(
                &dev_config(&bundle, &self.config, self.without_queues),
                &self.without_bindings,
            ),
        )
        .expect("write wrangler.toml");
        let dev_vars: String = self
            .secrets
            .iter()
            .map(|(name, value)| format!("{name}={value:?}\n"))
            .collect();
        std::fs::write(dir.path().join(".dev.vars"), dev_vars).expect("write .dev.vars");
        let mut worker = Worker {
            dir,
            port: self.port.unwrap_or_else(free_port),
            process: None,
        };
        worker.start();
        worker
    }
}

/// A worker under `wrangler dev --local` (or a stopped one, keeping its state and port).
pub struct Worker {
    dir: TempDir,
    port: u16,
    process: Option<ChildProcess>,
}

impl Worker {
    /// Starts describing a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// An anonymous registry client for the worker.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), None)
    }

    /// Where workerd keeps the local KV and R2 data.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `wrangler dev` (again) on the same port and state, waiting for `GET /healthz`.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "worker already running");
        let home = self.dir.path().join("home");
        std::fs::create_dir_all(&home).expect("create home");
        let wrangler = tools_env()
            .iter()
            .find(|(name, _)| name == "WRANGLER_BIN")
            .map(|(_, path)| path.clone())
            .expect("scripts/worker-tools.sh exports WRANGLER_BIN");
        let mut command = Command::new(wrangler);
        for (name, value) in tools_env() {
            command.env(name, value);
        }
        command
            .current_dir(self.dir.path())
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("HOME", &home)
            .args(["dev", "--local", "--ip", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--inspector-port")
            .arg(free_port().to_string())
            .arg("--persist-to")
            .arg(self.state_dir());
        let mut process = ChildProcess::spawn("wrangler", command, self.dir.path());
        let url = format!("{}/healthz", self.url());
        wait_until_serving("the worker", &mut process, &url, READY_TIMEOUT);
        self.process = Some(process);
    }

    /// Stops `wrangler dev` and workerd (SIGTERM to their process group, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
    }

    /// Stops and starts again with the same KV and R2 state (a fresh isolate).
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Reads `GET /metrics` (per isolate: `wrangler dev` runs one).
    pub fn metrics(&self) -> Metrics {
        Metrics::fetch(&self.url())
    }

    /// Every file under the local KV/R2 state.
    fn state_files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut pending = vec![self.state_dir()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                    Ok(kind) if kind.is_file() => found.push(entry.path()),
                    _ => {}
                }
            }
        }
        found
    }

    /// Files of the local KV/R2 state holding bytes whose digest is `content_digest` (what a
    /// cache must never have kept).
    pub fn state_files_holding(&self, content_digest: &str) -> Vec<PathBuf> {
        self.state_files()
            .into_iter()
            .filter(|path| std::fs::read(path).is_ok_and(|b| sha256_digest(&b) == content_digest))
            .collect()
    }

    /// [`state_files_holding`](Self::state_files_holding) without the local R2 simulation's
    /// orphans: a put R2 refused (its SHA-256 check) may leave its bytes as a blob file
    /// (`r2/<bucket>/blobs/<id>`) that no object names. A file counts when it is not such a
    /// blob file, or when the simulation's metadata (every other file under `r2/`: its SQLite
    /// databases) names its id, i.e. an object holds it.
    pub fn stored_files_holding(&self, content_digest: &str) -> Vec<PathBuf> {
        let files = self.state_files_holding(content_digest);
        if !files.iter().any(|p| r2_blob_id(p).is_some()) {
            return files;
        }
        let metadata: Vec<u8> = self
            .state_files()
            .into_iter()
            .filter(|path| {
                r2_blob_id(path).is_none() && path.components().any(|c| c.as_os_str() == "r2")
            })
            .flat_map(|path| std::fs::read(path).unwrap_or_default())
            .collect();
        files
            .into_iter()
            .filter(|path| match r2_blob_id(path) {
                Some(id) => metadata.windows(id.len()).any(|w| w == id.as_bytes()),
                None => true,
            })
            .collect()
    }

    /// The worker's log (wrangler and workerd output), for assertions and failure messages.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stdout() + &p.log_tail())
            .unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The blob id of a file of the local R2 simulation's blob directory
/// (`…/r2/<bucket>/blobs/<id>`), None for any other file.
fn r2_blob_id(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let n = parts.len();
    (n >= 4 && parts[n - 4] == "r2" && parts[n - 2] == "blobs" && !parts[n - 1].is_empty())
        .then(|| parts[n - 1].clone())
}
