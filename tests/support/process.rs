//! Child processes and waiting, for the end-to-end harness.
//!
//! Every server the tests start (docker-registry, containerd, pullgate) runs in its own process
//! group, logs to files in a temp dir, and is killed with its whole group when its
//! [`ChildProcess`] is dropped, so a failing test leaves nothing behind. Waiting is always
//! bounded polling of a real condition ([`wait_for`]); nothing sleeps for a fixed time hoping a
//! server is up. When a test panics, the dropped processes print the tail of their logs.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How much of a log to show when a process misbehaves.
const LOG_TAIL_BYTES: usize = 6_000;

/// Panics with a pointer to `scripts/setup.sh` unless `tool` is on `PATH`.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not on PATH: run scripts/setup.sh first (it installs docker-registry, skopeo and containerd)");
}

/// Panics unless the tests run as root (containerd needs it; CI runs as root).
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{why} needs root (CI runs as root); rerun the tests as root"
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `probe` until it returns `Some`, backing off from 10 ms to 200 ms; panics naming
/// `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Waits until `url` answers 2xx, panicking early (with its log) if `process` exits; `what`
/// names the server in the timeout message.
pub fn wait_until_serving(what: &str, process: &mut ChildProcess, url: &str, timeout: Duration) {
    let client = super::http::loopback_client();
    wait_for(&format!("{what} to answer 200 on {url}"), timeout, || {
        process.assert_running();
        client
            .get(url)
            .send()
            .ok()
            .filter(|response| response.status().is_success())
            .map(|_| ())
    });
}

/// Polls `condition` like [`wait_for`] and returns whether it became true within `timeout`.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A server process that is killed, with its process group, when dropped.
pub struct ChildProcess {
    name: String,
    child: std::process::Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    reaped: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `command` in a new process group, appending its stdout and stderr to
    /// `<log_dir>/<name>.stdout.log` and `<log_dir>/<name>.stderr.log`.
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Self {
        let stdout_path = log_dir.join(format!("{name}.stdout.log"));
        let stderr_path = log_dir.join(format!("{name}.stderr.log"));
        command
            .stdin(Stdio::null())
            .stdout(append_to(&stdout_path))
            .stderr(append_to(&stderr_path))
            .process_group(0);
        clear_proxy_env(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {name} ({command:?}): {err}"));
        ChildProcess {
            name: name.to_string(),
            child,
            stdout_path,
            stderr_path,
            reaped: None,
        }
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait().expect("try_wait");
        }
        self.reaped
    }

    /// Panics with the process's logs if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!(
                "{} exited unexpectedly ({status})\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// Sends SIGTERM to the process group and waits up to `timeout` for the process to exit.
    /// Returns `None` (after killing the group) if it did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Some(status);
        }
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status() {
                // Children of the leader (if any) go too.
                self.signal_group(libc::SIGKILL);
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Kills the process group with SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
        if self.reaped.is_none() {
            self.reaped = self.child.wait().ok();
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// The last few KiB of stdout and stderr, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- {name} stdout ({out}) ---\n{}\n--- {name} stderr ({err}) ---\n{}",
            tail(&self.stdout_path),
            tail(&self.stderr_path),
            name = self.name,
            out = self.stdout_path.display(),
            err = self.stderr_path.display(),
        )
    }

    /// Sends `signal` to the process itself (not its group), e.g. SIGHUP to reload.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the process we spawned.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    fn signal_group(&self, signal: libc::c_int) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the group we created in `spawn`.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        self.kill();
    }
}

/// Runs `command` to completion in its own process group, killing the group and returning an
/// error after `timeout`. Output is captured through files (no pipe can fill up and block).
pub fn run_bounded(mut command: Command, timeout: Duration) -> Result<Output, String> {
    let scratch = tempfile::tempdir().expect("tempdir");
    let out_path = scratch.path().join("stdout");
    let err_path = scratch.path().join("stderr");
    command
        .stdin(Stdio::null())
        .stdout(append_to(&out_path))
        .stderr(append_to(&err_path))
        .process_group(0);
    clear_proxy_env(&mut command);
    let description = format!("{command:?}");
    let mut child = command
        .spawn()
        .map_err(|err| format!("spawn {description}: {err}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|err| err.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: signals the process group created above.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
            return Err(format!(
                "{description} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                tail(&out_path),
                tail(&err_path)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    })
}

/// The tests talk to loopback only; make sure no inherited proxy setting reroutes a client.
fn clear_proxy_env(command: &mut Command) {
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
}

fn append_to(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|err| panic!("open {}: {err}", path.display()))
}

fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
