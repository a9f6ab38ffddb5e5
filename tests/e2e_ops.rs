//! End-to-end tests of what an operator touches (issue #12): `check-config` and the exit codes,
//! `PULLGATE_*` environment variables, secrets from files, the probes and the drain, and a
//! private upstream behind an internal CA (`ca_file`).
//!
//! Each test starts the real binary itself (it needs the process id to signal it while it
//! keeps running) in its own process group, killed when the test ends. Every wait is bounded
//! polling; the drain is observed by its order (unready, still accepting, exits on a second
//! signal), never by timing.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::fixtures::Image;
use support::http::{loopback_client, RegistryClient};
use support::process::{free_port, poll_until, run_bounded, wait_for};
use support::registry::Registry;
use support::tls_proxy::{toml_path, TestCa, TlsProxy};

const BOUND: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pullgate.example.toml")
}

/// `pullgate ARGS…` to completion: (exit status, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(BIN);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = run_bounded(command, BOUND).expect("pullgate ran");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `pullgate serve` started by the test, killed with its group when dropped.
struct Served {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Served {
    /// Starts `pullgate serve` configured only through `PULLGATE_*` variables (and `extra`),
    /// with `config` as the file `PULLGATE_CONFIG` names; waits for `/livez`.
    fn start(config: &str, extra: &[(&str, &str)]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("pullgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let port = free_port();
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env("PULLGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("PULLGATE_DATA_DIR", dir.path().join("data"))
            .env("PULLGATE_CONFIG", &config_path)
            // No test reaches Docker Hub: the default upstream is a closed port.
            .env(
                "PULLGATE_UPSTREAM",
                format!("docker.io=http://127.0.0.1:{}", free_port()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log"))
            .process_group(0);
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn pullgate");
        let mut served = Served { child, port, dir };
        let url = served.url("/livez");
        let client = loopback_client();
        wait_for("pullgate to answer /livez", BOUND, || {
            if let Ok(Some(status)) = served.child.try_wait() {
                panic!("pullgate exited ({status}):\n{}", served.log());
            }
            client
                .get(&url)
                .send()
                .ok()
                .filter(|r| r.status().is_success())
        });
        served
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn status(&self, path: &str) -> (u16, String) {
        let r = loopback_client()
            .get(self.url(path))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        let status = r.status().as_u16();
        (status, r.text().unwrap_or_default())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the process we spawned.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        let exited = poll_until(BOUND, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        assert!(exited, "pullgate did not exit:\n{}", self.log());
        status.expect("exit status")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

#[test]
fn check_config_accepts_the_example_and_reports_every_problem_with_its_line() {
    let example = example_config();
    let (status, stdout, stderr) = run(&["check-config", &example.to_string_lossy()], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[cache]\ntag_tll = \"5m\"\n\n[[upstream]]\nhost = \"a.example\"\nurl = \"https://a.example\"\n\n[[upstream]]\nhost = \"b.example\"\nurl = \"ftp://b.example\"\n",
    )
    .expect("write");
    let bad = bad.to_string_lossy().into_owned();
    let (status, _, stderr) = run(&["check-config", &bad], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{bad}:2:1: cache.tag_tll: unknown field `tag_tll`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{bad}:10:1: upstream[1].url:")),
        "{stderr}"
    );
    // The file can come from PULLGATE_CONFIG too.
    let (status, _, stderr) = run(&["check-config"], &[("PULLGATE_CONFIG", &bad)]);
    assert_eq!(status.code(), Some(1), "{stderr}");

    // A usage error is clap's 2; a runtime failure is 1.
    let (status, _, _) = run(&["serve", "--no-such-flag"], &[]);
    assert_eq!(status.code(), Some(2));
    let (status, _, stderr) = run(&["serve", "--listen", "127.0.0.1:1", "--config", &bad], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
}

/// The flags come from `PULLGATE_*`, and upstream credentials from a secret file (with the
/// trailing newline `echo` leaves): a token-auth upstream serves the pull.
#[test]
fn environment_variables_and_file_secrets_configure_serve() {
    let secured = Registry::start_with_token_auth("e2e-user", "e2e-password");
    let image = Image::oci(41, &[2048]);
    secured.push_image("team/app", "1", &image);
    let secrets = tempfile::tempdir().expect("tempdir");
    let password = secrets.path().join("password");
    std::fs::write(&password, "e2e-password\n").expect("write secret");
    let config = format!(
        "[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\nusername = \"env:PULLGATE_E2E_USER\"\npassword = \"file:{}\"\nauth_hosts = [\"{}\"]\n",
        secured.url(),
        password.display(),
        secured.token_server().authority()
    );
    let served = Served::start(&config, &[("PULLGATE_E2E_USER", "e2e-user")]);
    let client = RegistryClient::new(&served.url(""), None);
    let manifest = client.get_manifest("private.test/team/app", "1");
    assert_eq!(manifest.status, 200, "{}", served.log());
    assert_eq!(manifest.header("docker-content-digest"), image.digest());

    // A missing secret file stops the start, naming the reference and not leaking anything.
    let missing = config.replace(&password.display().to_string(), "/nonexistent/secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pullgate.toml");
    std::fs::write(&path, missing).expect("write");
    let (status, _, stderr) = run(
        &["serve", "--listen", "127.0.0.1:1"],
        &[
            ("PULLGATE_CONFIG", &path.to_string_lossy()),
            ("PULLGATE_E2E_USER", "e2e-user"),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("file:/nonexistent/secret") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

/// `/livez` and `/healthz` answer while serving; `/readyz` follows storage and, on SIGTERM,
/// turns 503 while the listener still accepts (`unready_delay`); a second SIGTERM ends the
/// window and the process exits cleanly.
#[test]
fn readiness_follows_storage_and_turns_off_before_the_listener_closes() {
    let served = Served::start(
        "[server]\nunready_delay = \"10m\"\ndrain = \"5s\"\n",
        &[("PULLGATE_DRAIN", "20s")],
    );
    let mut served = served;
    assert_eq!(served.status("/livez").0, 200);
    assert_eq!(served.status("/healthz").0, 200);
    assert_eq!(served.status("/readyz"), (200, "ready\n".into()));
    let post = loopback_client()
        .post(served.url("/readyz"))
        .send()
        .expect("POST /readyz");
    assert_eq!(post.status().as_u16(), 405);

    // Storage that cannot take a write is not ready; the process still lives.
    let data = served.data_dir();
    let moved = served.dir.path().join("data-moved");
    std::fs::rename(&data, &moved).expect("move the data dir away");
    // (One storage check answers for a second: poll.)
    let unwritable = poll_until(BOUND, || served.status("/readyz").0 == 503);
    assert!(unwritable, "/readyz stayed ready:\n{}", served.log());
    let (_, body) = served.status("/readyz");
    assert!(body.contains("storage is not writable"), "{body}");
    assert_eq!(served.status("/livez").0, 200);
    std::fs::rename(&moved, &data).expect("move the data dir back");
    let writable = poll_until(BOUND, || served.status("/readyz").0 == 200);
    assert!(writable, "/readyz stayed unready:\n{}", served.log());

    served.signal(libc::SIGTERM);
    let unready = poll_until(BOUND, || served.status("/readyz").0 == 503);
    assert!(unready, "/readyz never turned 503:\n{}", served.log());
    // New connections are still served during the window.
    assert_eq!(served.status("/livez").0, 200);
    assert_eq!(served.status("/readyz").1, "not ready: draining\n");
    served.signal(libc::SIGTERM);
    let status = served.wait_exit();
    assert!(status.success(), "{status}\n{}", served.log());
    let log = served.log();
    assert!(log.contains("up to 20000 ms"), "--drain wins: {log}");
}

/// A private registry behind a certificate from an openssl-made CA: with `ca_file` the pull
/// works; without it the upstream is unreachable and the error says why.
#[test]
fn a_private_upstream_with_an_internal_ca_works_through_ca_file() {
    let registry = Registry::start_plain();
    let image = Image::oci(42, &[4096, 1024]);
    registry.push_image("team/app", "1", &image);
    let ca = TestCa::generate();
    let proxy = TlsProxy::start(&ca, &registry.host());

    let with_ca = format!(
        "[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\nca_file = {}\n",
        proxy.url(),
        toml_path(&ca.ca_file())
    );
    let served = Served::start(&with_ca, &[]);
    let client = RegistryClient::new(&served.url(""), None);
    let manifest = client.get_manifest("private.test/team/app", "1");
    assert_eq!(manifest.status, 200, "{}", served.log());
    assert_eq!(manifest.header("docker-content-digest"), image.digest());
    for layer in &image.layers {
        let blob = client.get_blob("private.test/team/app", &layer.digest);
        assert_eq!(blob.status, 200, "{}", served.log());
        assert_eq!(blob.body, layer.bytes);
    }
    drop(served);

    let without = format!(
        "[[upstream]]\nhost = \"private.test\"\nurl = \"{}\"\n",
        proxy.url()
    );
    let served = Served::start(&without, &[]);
    let client = RegistryClient::new(&served.url(""), None);
    let refused = client.get_manifest("private.test/team/app", "1");
    assert_eq!(refused.status, 503, "{}", served.log());
    let body = String::from_utf8_lossy(&refused.body).into_owned();
    assert!(
        body.contains("invalid peer certificate: UnknownIssuer"),
        "the failure should say the certificate's issuer is unknown: {body}"
    );

    // A ca_file that holds no certificate stops the start, naming the file.
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let path = dir.path().join("pullgate.toml");
    std::fs::write(
        &path,
        with_ca.replace(&toml_path(&ca.ca_file()), &toml_path(&junk)),
    )
    .expect("write");
    let (status, _, stderr) = run(
        &["serve", "--listen", &format!("127.0.0.1:{}", free_port())],
        &[("PULLGATE_CONFIG", &path.to_string_lossy())],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ca_file") && stderr.contains("junk.pem"),
        "{stderr}"
    );
}
