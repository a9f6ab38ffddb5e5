//! pullgate's Spin component under `wasmtime serve`, on 127.0.0.1 only.
//!
//! No Spin runtime can be installed from the registries this project reaches, so the test
//! runs the component the way Spin does, minus Spin: wasmtime (Spin's engine and its
//! wasi:http implementation) serves it, one fresh instance per request like Spin, and Spin's
//! own interfaces (`fermyon:spin/key-value`, `fermyon:spin/variables`) come from the test-only
//! component in `tests/spin-shim`, plugged in with `wasm-tools compose`. The shim keeps the
//! key-value stores in files under a directory the test owns (preopened as `/kv`), opens only
//! the stores `spin.toml` lists, refuses keys over 256 bytes and values over 1 MB as Spin
//! documents, and reads variables from `SPIN_VARIABLE_<NAME>`.
//!
//! The component is built once per test run exactly as `spin.toml`'s build section says, with
//! the pinned tools from `scripts/spin-tools.sh` (a missing tool is a panic naming that
//! script).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use super::http::{loopback_client, RegistryClient};
use super::process::{free_port, run_bounded, wait_for, wait_until_serving, ChildProcess};
use super::pullgate::Metrics;

/// How long building the component and the shim may take on a cold machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long `wasmtime serve` may take to answer its first request (it compiles the component).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `WASMTIME_BIN`, `WASM_TOOLS_BIN` and `MOTO_SERVER_BIN`, loaded once.
pub struct Tools {
    pub wasmtime: PathBuf,
    pub wasm_tools: PathBuf,
    pub moto_server: PathBuf,
}

/// The pinned tools from `scripts/spin-tools.sh`.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    let loaded = TOOLS.get_or_init(|| {
        let script = repo_root().join("scripts/spin-tools.sh");
        let mut command = Command::new("bash");
        command.arg("-c").arg(format!(
            ". \"$(bash '{}' --check)\" && printf '%s\\n%s\\n%s\\n' \"$WASMTIME_BIN\" \"$WASM_TOOLS_BIN\" \"$MOTO_SERVER_BIN\"",
            script.display()
        ));
        let output = run_bounded(command, Duration::from_secs(60))?;
        if !output.status.success() {
            return Err(format!(
                "the Spin test tools are missing: run `bash scripts/spin-tools.sh` first \
                 (scripts/setup.sh does).\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let mut lines = text.lines();
        match (lines.next(), lines.next(), lines.next()) {
            (Some(w), Some(t), Some(m)) => Ok(Tools {
                wasmtime: PathBuf::from(w),
                wasm_tools: PathBuf::from(t),
                moto_server: PathBuf::from(m),
            }),
            _ => Err(format!("scripts/spin-tools.sh wrote no tool paths: {text:?}")),
        }
    });
    match loaded {
        Ok(tools) => tools,
        Err(e) => panic!("{e}"),
    }
}

/// `spin.toml`, parsed.
pub fn manifest() -> toml::Table {
    let text = std::fs::read_to_string(repo_root().join("spin.toml")).expect("read spin.toml");
    toml::from_str(&text).expect("parse spin.toml")
}

/// `[component.pullgate]` of `spin.toml`.
fn component_section() -> toml::Table {
    manifest()
        .get("component")
        .and_then(|c| c.get("pullgate"))
        .and_then(|c| c.as_table())
        .cloned()
        .expect("spin.toml has [component.pullgate]")
}

fn cargo_build(dir: &Path, command_line: &str, what: &str) -> Result<(), String> {
    let mut command = Command::new("sh");
    command.arg("-c").arg(command_line).current_dir(dir);
    // The tests' own cargo environment must not leak into a build of another workspace.
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_") && name != "CARGO_HOME" {
            command.env_remove(name);
        }
    }
    let output = run_bounded(command, BUILD_TIMEOUT)?;
    if !output.status.success() {
        return Err(format!(
            "building {what} (`{command_line}` in {}) failed ({}):\n{}\n{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// The pullgate component, built (once per run) with `spin.toml`'s build command.
pub fn built_component() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = repo_root();
        let component = component_section();
        let build = component
            .get("build")
            .and_then(|b| b.as_table())
            .ok_or("spin.toml has no [component.pullgate.build]")?;
        let command_line = build
            .get("command")
            .and_then(|c| c.as_str())
            .ok_or("spin.toml build has no command")?;
        let workdir = root.join(build.get("workdir").and_then(|w| w.as_str()).unwrap_or("."));
        cargo_build(&workdir, command_line, "the Spin component")?;
        let source = component
            .get("source")
            .and_then(|s| s.as_str())
            .ok_or("spin.toml component has no source")?;
        let path = root.join(source);
        if !path.is_file() {
            return Err(format!("the build did not produce {}", path.display()));
        }
        Ok(path)
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The component composed with the test-only key-value/variables shim, built once per run.
fn composed_component() -> PathBuf {
    static COMPOSED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let composed = COMPOSED.get_or_init(|| {
        let root = repo_root();
        let component = built_component();
        let shim_dir = root.join("tests/spin-shim");
        cargo_build(
            &shim_dir,
            "cargo build --release --target wasm32-wasip2",
            "the test-only Spin shim",
        )?;
        let out_dir = root.join("target/spin");
        // `wasm-tools compose` names instances after the file: it must be kebab case.
        let shim = out_dir.join("spin-shim.wasm");
        std::fs::copy(
            root.join("target/spin-shim/wasm32-wasip2/release/spin_shim.wasm"),
            &shim,
        )
        .map_err(|e| format!("copy the shim: {e}"))?;
        let out = out_dir.join("pullgate-with-shim.wasm");
        let mut command = Command::new(&tools().wasm_tools);
        command
            .arg("compose")
            .arg("-o")
            .arg(&out)
            .arg(&component)
            .arg("-d")
            .arg(&shim);
        let output = run_bounded(command, Duration::from_secs(120))?;
        if !output.status.success() {
            return Err(format!(
                "wasm-tools compose failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(out)
    });
    match composed {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// `wasm-tools component wit <path>`: the WIT text of a component or a WIT directory.
pub fn component_wit(path: &Path) -> String {
    let mut command = Command::new(&tools().wasm_tools);
    command.arg("component").arg("wit").arg(path);
    let output = run_bounded(command, Duration::from_secs(60)).expect("run wasm-tools");
    assert!(
        output.status.success(),
        "wasm-tools component wit {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Options for starting the component.
#[derive(Default)]
pub struct SpinAppBuilder {
    variables: Vec<(String, String)>,
    port: Option<u16>,
}

impl SpinAppBuilder {
    /// Listen on this port (from `free_port`) instead of a fresh one: for a configuration
    /// that must name the component's own URL (`[auth] public_url`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The `pullgate_config` variable (the native host's configuration schema).
    pub fn config(self, toml: &str) -> Self {
        self.variable("pullgate_config", toml)
    }

    /// The S3 blob store in `bucket` of `moto` (the `pullgate_s3_*` variables).
    pub fn s3(self, moto: &Moto, bucket: &str) -> Self {
        self.variable("pullgate_s3_endpoint", &moto.url())
            .variable("pullgate_s3_bucket", bucket)
            .variable("pullgate_s3_region", "us-east-1")
            .variable("pullgate_s3_access_key_id", MOTO_ACCESS_KEY_ID)
            .variable("pullgate_s3_secret_access_key", MOTO_SECRET_ACCESS_KEY)
    }

    /// A Spin variable; it must be declared in `spin.toml`'s `[component.pullgate.variables]`
    /// (the test fails otherwise: Spin would not hand it to the component).
    pub fn variable(mut self, name: &str, value: &str) -> Self {
        self.variables.push((name.into(), value.into()));
        self
    }

    /// Builds and composes the component if needed, starts `wasmtime serve`, waits for
    /// `GET /healthz` (which answers with authentication on, unlike `/v2/`).
    pub fn start(self) -> SpinApp {
        let declared = component_section()
            .get("variables")
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        for (name, _) in &self.variables {
            assert!(
                declared.contains_key(name),
                "variable {name} is not declared in spin.toml's [component.pullgate.variables]"
            );
        }
        let stores: Vec<String> = component_section()
            .get("key_value_stores")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let component = composed_component();
        let dir = tempfile::Builder::new()
            .prefix("pullgate-spin-under-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("kv")).expect("create kv dir");
        let mut app = SpinApp {
            dir,
            port: self.port.unwrap_or_else(free_port),
            component,
            variables: self.variables,
            stores: stores.join(","),
            process: None,
        };
        app.start();
        app
    }
}

/// The component under `wasmtime serve` (or a stopped one, keeping its stores and port).
pub struct SpinApp {
    dir: TempDir,
    port: u16,
    component: PathBuf,
    variables: Vec<(String, String)>,
    stores: String,
    process: Option<ChildProcess>,
}

impl SpinApp {
    /// Starts describing an app.
    pub fn builder() -> SpinAppBuilder {
        SpinAppBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// An anonymous registry client for the app.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), None)
    }

    fn kv_dir(&self) -> PathBuf {
        self.dir.path().join("kv")
    }

    /// Starts `wasmtime serve` (again) on the same port and stores, waiting for `GET /healthz`.
    pub fn start(&mut self) {
        assert!(self.process.is_none(), "app already running");
        let mut command = Command::new(&tools().wasmtime);
        command
            .current_dir(self.dir.path())
            .arg("serve")
            .arg("-S")
            .arg("cli")
            .arg("--addr")
            .arg(self.host())
            .arg("--dir")
            .arg(format!("{}::/kv", self.kv_dir().display()))
            .arg("--env")
            .arg(format!("SPIN_SHIM_KV_STORES={}", self.stores));
        for (name, value) in &self.variables {
            command.arg("--env").arg(format!(
                "SPIN_VARIABLE_{}={value}",
                name.to_ascii_uppercase()
            ));
        }
        command.arg(&self.component);
        let mut process = ChildProcess::spawn("wasmtime-serve", command, self.dir.path());
        let url = format!("{}/healthz", self.url());
        wait_until_serving("the Spin component", &mut process, &url, READY_TIMEOUT);
        self.process = Some(process);
    }

    /// Stops `wasmtime serve`.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
    }

    /// Stops and starts again with the same stores.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// Reads `GET /metrics` (of the one instance that serves that request: Spin keeps no
    /// instance between requests).
    pub fn metrics(&self) -> Metrics {
        Metrics::fetch(&self.url())
    }

    /// Every key in the key-value store `store`, decoded from the shim's file names.
    pub fn kv_keys(&self, store: &str) -> Vec<String> {
        let mut keys = Vec::new();
        collect_keys(&self.kv_dir().join(store), "", &mut keys);
        keys.sort();
        keys
    }

    /// The file the shim keeps `key` of store `store` in (the key in hex, in directories of
    /// 200 characters, the last with `.v`; see `tests/spin-shim`).
    fn kv_file(&self, store: &str, key: &str) -> PathBuf {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        let mut path = self.kv_dir().join(store);
        let parts: Vec<&str> = hex
            .as_bytes()
            .chunks(200)
            .map(|c| std::str::from_utf8(c).expect("hex"))
            .collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                path.push(format!("{part}.v"));
            } else {
                path.push(part);
            }
        }
        path
    }

    /// The raw value of `key` in store `store`, as the component wrote it.
    pub fn kv_get(&self, store: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.kv_file(store, key)).ok()
    }

    /// Writes `value` under `key` in store `store`, as another instance would (for a record
    /// a test plants, such as a dead instance's fill lease).
    pub fn kv_put(&self, store: &str, key: &str, value: &[u8]) {
        let path = self.kv_file(store, key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create kv dirs");
        std::fs::write(&path, value).expect("write kv value");
    }

    /// Keys of the key-value store that hold (or stage) bytes of `digest`. Link records
    /// (`link/<host>/<repository>/<digest>`) name the digest but hold none of its bytes: a
    /// manifest fetch links every layer it references before any of them is fetched, so a blob
    /// that was refused or never stored may still have one.
    pub fn blob_keys(&self, digest: &str) -> Vec<String> {
        let hex = digest.trim_start_matches("sha256:");
        self.kv_keys("default")
            .into_iter()
            .filter(|k| k.contains(hex) && !k.starts_with("link/"))
            .collect()
    }

    /// The component's log (guest stderr is prefixed by wasmtime with the request id).
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.stdout() + &p.log_tail())
            .unwrap_or_default()
    }
}

/// The access key id the tests give the S3 store (moto accepts any).
pub const MOTO_ACCESS_KEY_ID: &str = "AKIAPULLGATETEST";
/// The secret access key the tests give the S3 store; it must never reach the log.
pub const MOTO_SECRET_ACCESS_KEY: &str = "pullgate-test-secret-QeT4nG8v";

/// A local S3-compatible server: moto's `moto_server` (installed by `scripts/spin-tools.sh`)
/// on 127.0.0.1, in memory. The tests read the bucket with plain requests (moto does not
/// check signatures); the component signs its own.
pub struct Moto {
    port: u16,
    process: ChildProcess,
    _dir: TempDir,
}

impl Moto {
    /// Starts moto and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-moto-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let mut command = Command::new(&tools().moto_server);
        command
            .current_dir(dir.path())
            .arg("-H")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string());
        let mut process = ChildProcess::spawn("moto-server", command, dir.path());
        let client = loopback_client();
        let url = format!("http://127.0.0.1:{port}/");
        wait_for("moto_server to answer", Duration::from_secs(60), || {
            process.assert_running();
            client.get(&url).send().ok().map(|_| ())
        });
        let moto = Moto {
            port,
            process,
            _dir: dir,
        };
        let created = client
            .put(format!("{}/{bucket}", moto.url()))
            .send()
            .expect("create bucket");
        assert!(created.status().is_success(), "create bucket: {created:?}");
        moto
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get_text(&self, path_and_query: &str) -> String {
        let response = loopback_client()
            .get(format!("{}{path_and_query}", self.url()))
            .send()
            .expect("GET moto");
        assert!(
            response.status().is_success(),
            "{path_and_query}: {response:?}"
        );
        response.text().expect("moto body")
    }

    /// Every object key in `bucket` (ListObjectsV2).
    pub fn object_keys(&self, bucket: &str) -> Vec<String> {
        xml_values(
            &self.get_text(&format!("/{bucket}?list-type=2&max-keys=1000")),
            "Key",
        )
    }

    /// The keys of `bucket`'s incomplete multipart uploads (ListMultipartUploads).
    pub fn pending_uploads(&self, bucket: &str) -> Vec<String> {
        xml_values(&self.get_text(&format!("/{bucket}?uploads")), "Key")
    }

    /// An object's bytes, or None. moto refuses anonymous object reads (403) but checks no
    /// signature: the query has the shape of a presigned URL with a dummy signature.
    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let response = loopback_client()
            .get(format!(
                "{}/{bucket}/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=\
                 {MOTO_ACCESS_KEY_ID}%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=\
                 20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=00",
                self.url()
            ))
            .send()
            .expect("GET object");
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        assert!(response.status().is_success(), "GET {key}: {response:?}");
        Some(response.bytes().expect("object body").to_vec())
    }

    /// moto's log.
    pub fn log(&self) -> String {
        self.process.stdout() + &self.process.log_tail()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }
}

/// The texts of every `<tag>…</tag>` in `xml`.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split(&close).next().map(str::to_string))
        .collect()
}

fn collect_keys(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp") {
            continue;
        }
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_keys(&entry.path(), &format!("{prefix}{name}"), out);
        } else if let Some(last) = name.strip_suffix(".v") {
            let hex = format!("{prefix}{last}");
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect();
            out.push(String::from_utf8_lossy(&bytes).to_string());
        }
    }
}

impl Drop for SpinApp {
    fn drop(&mut self) {
        self.stop();
    }
}
