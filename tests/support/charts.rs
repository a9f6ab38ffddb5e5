//! Classic Helm chart repositories on loopback, for `tests/e2e_helm.rs`.
//!
//! - [`ChartServer`]: a static HTTP file server on 127.0.0.1 (threads over `std::net`) that
//!   serves a directory the way GitHub Pages or S3 serve a chart repository: `ETag` with
//!   `If-None-Match` → 304, `Content-Length`, 404 for missing files, optional redirects. It
//!   logs every request (the ground truth of what reached the upstream) and can be stopped
//!   and started again on the same port and files.
//! - [`chart_tgz`]: a real chart archive (`Chart.yaml`, `values.yaml`, a template) in a
//!   deterministic gzip tar, so its sha256 is stable.
//! - [`Helm`]: the `helm` 3 and 4 binaries installed by `scripts/helm-setup.sh`, each run
//!   with its own empty config, cache and data homes.
//! - [`write_large_index`]: an index in `helm repo index`'s exact layout, of any size.
//! - [`index_digests`]: (file name, digest) pairs read from an index, for assertions.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use super::fixtures::sha256_digest;
use super::process::free_port;

/// One request the chart server answered.
#[derive(Clone, Debug)]
pub struct Served {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub status: u16,
    /// The request carried `If-None-Match`.
    pub conditional: bool,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Served>>,
    redirects: Mutex<HashMap<String, String>>,
}

/// A static chart repository server on 127.0.0.1.
pub struct ChartServer {
    dir: TempDir,
    port: u16,
    shared: Arc<Shared>,
    running: Option<(Arc<AtomicBool>, thread::JoinHandle<()>)>,
}

impl ChartServer {
    /// An empty repository, listening.
    pub fn start() -> ChartServer {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-charts-")
            .tempdir()
            .expect("tempdir");
        let mut s = ChartServer {
            dir,
            port: free_port(),
            shared: Arc::default(),
            running: None,
        };
        s.resume();
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory served at `/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file to serve at `/<path>` (replacing it atomically).
    pub fn put(&self, path: &str, bytes: &[u8]) {
        let dest = self.dir.path().join(path);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        let tmp = dest.with_extension("tmp-write");
        std::fs::write(&tmp, bytes).expect("write served file");
        std::fs::rename(&tmp, &dest).expect("rename served file");
    }

    /// The bytes served at `/<path>`.
    pub fn get(&self, path: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(path)).expect("read served file")
    }

    /// Answers `/<from>` with `302 Location: <to>`.
    pub fn redirect(&self, from: &str, to: &str) {
        self.shared
            .redirects
            .lock()
            .unwrap()
            .insert(format!("/{from}"), to.to_string());
    }

    /// Every request answered so far.
    pub fn log(&self) -> Vec<Served> {
        self.shared.log.lock().unwrap().clone()
    }

    /// How many requests for `/<path>` were answered (any method, any status).
    pub fn requests(&self, path: &str) -> usize {
        let want = format!("/{path}");
        self.log().iter().filter(|s| s.path == want).count()
    }

    /// The log as text, for failure messages.
    pub fn log_summary(&self) -> String {
        self.log()
            .iter()
            .map(|s| format!("{} {} -> {}", s.method, s.path, s.status))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops listening; the port is closed when this returns.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            thread.join().expect("chart server thread");
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "chart server port still open after stop"
        );
    }

    /// Listens again on the same port, serving the same files.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "chart server already running");
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind chart server");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (root, shared, flag) = (
            self.dir.path().to_path_buf(),
            self.shared.clone(),
            stop.clone(),
        );
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (root, shared) = (root.clone(), shared.clone());
                        thread::spawn(move || serve(stream, &root, &shared));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.running = Some((stop, thread));
    }
}

impl Drop for ChartServer {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, root: &Path, shared: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let mut if_none_match = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("if-none-match") {
                if_none_match = Some(value.trim().to_string());
            }
        }
    }
    let path = target.split('?').next().unwrap_or("/").to_string();
    let redirect = shared.redirects.lock().unwrap().get(&path).cloned();
    let file = root.join(path.trim_start_matches('/'));
    let (status, headers, body): (u16, Vec<String>, Vec<u8>) = if let Some(to) = redirect {
        (302, vec![format!("Location: {to}")], Vec::new())
    } else if path.contains("..") || !file.is_file() {
        (404, vec![], b"not found\n".to_vec())
    } else {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let etag = format!("\"{}\"", &sha256_digest(&bytes)[7..23]);
        if if_none_match.as_deref() == Some(etag.as_str()) {
            (304, vec![format!("ETag: {etag}")], Vec::new())
        } else {
            (200, vec![format!("ETag: {etag}")], bytes)
        }
    };
    shared.log.lock().unwrap().push(Served {
        method: method.clone(),
        path,
        status,
        conditional: if_none_match.is_some(),
    });
    let reason = match status {
        200 => "OK",
        302 => "Found",
        304 => "Not Modified",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    if status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" && status != 304 {
        let _ = stream.write_all(&body);
    }
    let _ = stream.flush();
    // Drain what the client may still send, so closing does not reset the connection.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 1024];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = reader.get_mut().read(&mut sink);
}

/// A real chart archive: `<name>/Chart.yaml`, `values.yaml`, `templates/configmap.yaml`,
/// and `padding` bytes of extra data, deterministic for the same arguments.
pub fn chart_tgz(name: &str, version: &str, padding: usize) -> Vec<u8> {
    let chart_yaml = format!(
        "apiVersion: v2\nname: {name}\nversion: {version}\nappVersion: \"{version}\"\ndescription: A test chart for pullgate\ntype: application\n"
    );
    let values = format!("message: hello from {name} {version}\n");
    let template = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  message: {{ .Values.message | quote }}\n";
    let filler: Vec<u8> = (0..padding)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (format!("{name}/Chart.yaml"), chart_yaml.into_bytes()),
        (format!("{name}/values.yaml"), values.into_bytes()),
        (
            format!("{name}/templates/configmap.yaml"),
            template.as_bytes().to_vec(),
        ),
    ];
    if padding > 0 {
        files.push((format!("{name}/files/padding.bin"), filler));
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        tar.append_data(&mut header, &path, bytes.as_slice())
            .expect("append to chart tar");
    }
    tar.into_inner()
        .expect("finish chart tar")
        .finish()
        .expect("finish chart gzip")
}

/// (file name of the first URL, digest) of every chart version in an index, read the simple
/// way (this is a test oracle, not the code under test): `digest:` and `- <url>` lines.
pub fn index_digests(index: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut digest: Option<String> = None;
    let mut in_urls = false;
    for line in index.lines() {
        let t = line.trim();
        if let Some(d) = t.strip_prefix("digest: ") {
            digest = Some(d.trim_matches('"').to_string());
            in_urls = false;
        } else if t == "urls:" {
            in_urls = true;
        } else if in_urls && t.starts_with("- ") {
            let url = t[2..].trim_matches('"');
            let file = url.rsplit('/').next().unwrap_or(url).to_string();
            if let Some(d) = digest.clone() {
                out.push((file, d));
            }
            in_urls = false;
        } else if t.starts_with("- ") && line.starts_with("  - ") {
            digest = None;
            in_urls = false;
        } else if !t.starts_with("- ") {
            in_urls = false;
        }
    }
    out
}

/// The URL items of an index (`- <url>` lines under `urls:`), in order.
pub fn index_urls(index: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_urls = false;
    for line in index.lines() {
        let t = line.trim();
        if t == "urls:" {
            in_urls = true;
        } else if in_urls && t.starts_with("- ") {
            out.push(t[2..].trim_matches('"').to_string());
        } else {
            in_urls = false;
        }
    }
    out
}

/// Writes an index of about `target_bytes` in `helm repo index`'s layout (go-yaml v2: sorted
/// keys, unindented sequences), with `filler_charts` generated chart names of many versions,
/// then the `real` charts (name, version, digest, url). Returns the number of entries.
pub fn write_large_index(
    path: &Path,
    target_bytes: usize,
    base_url: &str,
    real: &[(&str, &str, &str, &str)],
) -> usize {
    let file = std::fs::File::create(path).expect("create large index");
    let mut w = std::io::BufWriter::new(file);
    let mut written = 0usize;
    let mut entries = 0usize;
    let put = |w: &mut std::io::BufWriter<std::fs::File>, s: &str| {
        w.write_all(s.as_bytes()).expect("write large index");
        s.len()
    };
    written += put(&mut w, "apiVersion: v1\nentries:\n");
    let mut chart = 0usize;
    while written < target_bytes {
        let name = format!("generated-chart-{chart:05}");
        written += put(&mut w, &format!("  {name}:\n"));
        for v in 0..200 {
            let version = format!("1.{}.{v}", chart % 7);
            let digest = sha256_digest(format!("{name}-{version}").as_bytes());
            let entry = format!(
                "  - annotations:\n      category: Infrastructure\n      licenses: Apache-2.0\n    apiVersion: v2\n    appVersion: {version}\n    created: \"2024-05-01T10:00:{:02}.123456789Z\"\n    dependencies:\n    - name: common\n      repository: oci://registry.example/charts\n      tags:\n      - bitnami-common\n      version: 2.x.x\n    description: |-\n      Chart {name} packages an application for Kubernetes, with a description long\n      enough to look like the ones large public repositories publish.\n      urls:\n      - this line is description text, not a URL\n    digest: {}\n    home: https://example.com/charts/{name}\n    icon: https://example.com/icons/{name}.svg\n    keywords:\n    - generated\n    - test\n    maintainers:\n    - name: Pullgate Tests\n      url: https://example.com/maintainers\n    name: {name}\n    sources:\n    - https://example.com/src/{name}\n    urls:\n    - {base_url}/{name}-{version}.tgz\n    version: {version}\n",
                v % 60,
                &digest[7..],
            );
            written += put(&mut w, &entry);
            entries += 1;
        }
        chart += 1;
    }
    for (name, version, digest, url) in real {
        put(
            &mut w,
            &format!(
                "  {name}:\n  - apiVersion: v2\n    appVersion: {version}\n    created: \"2024-05-01T10:00:00Z\"\n    description: A real chart at the end of a large index\n    digest: {}\n    name: {name}\n    urls:\n    - {url}\n    version: {version}\n",
                digest.trim_start_matches("sha256:")
            ),
        );
        entries += 1;
    }
    put(&mut w, "generated: \"2024-05-01T10:00:00.000000000Z\"\n");
    w.flush().expect("flush large index");
    entries
}

/// A `helm` binary with its own empty homes.
pub struct Helm {
    bin: PathBuf,
    home: TempDir,
    /// `3.17.2` or `4.1.4`.
    pub version: &'static str,
}

/// The helm versions `scripts/helm-setup.sh` installs.
pub const HELM_VERSIONS: [&str; 2] = ["3.17.2", "4.1.4"];

impl Helm {
    /// The installed helm `version` (one of [`HELM_VERSIONS`]); panics naming the setup
    /// script when it is missing.
    pub fn new(version: &'static str) -> Helm {
        let tools = std::env::var_os("PULLGATE_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/pullgate-tools")
            });
        let bin = tools.join(format!("helm-{version}")).join("helm");
        assert!(
            bin.is_file(),
            "helm {version} is not installed at {}: run scripts/helm-setup.sh first",
            bin.display()
        );
        let home = tempfile::Builder::new()
            .prefix("pullgate-helm-home-")
            .tempdir()
            .expect("tempdir");
        Helm { bin, home, version }
    }

    /// A working directory inside this helm's home.
    pub fn work_dir(&self, name: &str) -> PathBuf {
        let d = self.home.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// Runs helm with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        let h = self.home.path();
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("HOME", h)
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_DATA_HOME", h.join("data"))
            .env("HELM_REGISTRY_CONFIG", h.join("registry.json"))
            .env("HELM_REPOSITORY_CONFIG", h.join("repositories.yaml"))
            .env("HELM_REPOSITORY_CACHE", h.join("repository-cache"))
            .env("NO_PROXY", "*");
        for v in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "KUBECONFIG",
        ] {
            c.env_remove(v);
        }
        c.output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.bin.display()))
    }

    /// Runs helm and returns its stdout; panics with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "helm {} {args:?} failed ({}):\n{}\n{}",
            self.version,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The pid of the `pullgate serve` process listening on `host` (`127.0.0.1:PORT`).
pub fn pullgate_pid(host: &str) -> u32 {
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_pullgate = args
            .first()
            .is_some_and(|a| a.ends_with(b"/pullgate") || *a == b"pullgate");
        if is_pullgate
            && args
                .windows(2)
                .any(|w| w[0] == b"--listen" && w[1] == host.as_bytes())
        {
            return pid;
        }
    }
    panic!("no pullgate process listening on {host}");
}

/// `VmHWM` (peak resident set) of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// Resets a process's `VmHWM` to its current resident set (Linux `clear_refs` 5).
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
}

/// `VmRSS` of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:") * 1024
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}
