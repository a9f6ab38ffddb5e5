//! A scripted upstream registry on 127.0.0.1 that misbehaves on request: it serves the
//! manifests and blobs of generated images ([`super::fixtures`]) over plain HTTP/1.1 (one
//! request per connection, `Connection: close`), and a test switches it between healthy and
//! one [`Fault`] at a time while pullgate talks to it.
//!
//! What it can do that docker-registry cannot: refuse connections on its own port (stopped,
//! then started again on the same port), reset a connection mid-blob, answer 5xx or 429 with
//! `Retry-After`, answer slowly (in small steps, or not at all until told to), send a blob's
//! length with the wrong bytes, loop redirects, redirect elsewhere, and stall half-way through
//! a blob so a test can act while a fill is under way. Every request it sees is logged, so a
//! test can assert that a blob was fetched again rather than served from a cache that kept
//! unverified bytes.
//!
//! A stall never blocks forever: it ends when the test changes the fault, stops the server,
//! or after [`STALL_LIMIT`]. Tests wait on [`FaultyUpstream::wait_for_stalls`] (bounded
//! polling of a counter), never on time passing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::fixtures::{Blob, Image};
use super::process::poll_until;

/// The longest any scripted stall holds a connection.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Which requests a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Manifests, blobs and tag lists (not `GET /v2/`).
    All,
    /// Blob requests only.
    Blobs,
    /// Manifest requests only.
    Manifests,
}

/// How the upstream misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Serves everything correctly.
    Healthy,
    /// Answers with this status, these headers and a small text body.
    Status(u16, Vec<(String, String)>, Scope),
    /// Sends a blob's headers and the first `1/denominator` of its bytes, then resets the
    /// connection (RST, not FIN).
    ResetMidBlob { denominator: u64 },
    /// Sends a blob with the right length and digest headers but bytes that do not match.
    WrongBytes,
    /// Answers after `delay`, then sends the body in `pieces` separated by `delay` each.
    Slow {
        delay: Duration,
        pieces: u64,
        scope: Scope,
    },
    /// Accepts the request and sends nothing until the fault changes.
    StallBeforeHeaders(Scope),
    /// Holds the request until the fault changes, then answers it as a healthy upstream would
    /// (so a test can make concurrent requests overlap and count them).
    HoldBeforeHeaders(Scope),
    /// Sends a blob's headers and half its bytes, then sends nothing until the fault changes;
    /// then it closes the connection without the rest.
    StallMidBlob,
    /// Sends a blob's headers and half its bytes, then sends nothing until the fault changes;
    /// then it sends the rest: a transfer that stays in flight until the test lets it finish.
    PauseMidBlob,
    /// Redirects every blob request to `/redirect/<n+1>/...` on itself, forever.
    RedirectLoop,
    /// Redirects every blob request to `<location>` (the blob's path is appended).
    RedirectTo(String),
}

/// One request the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
}

struct State {
    fault: Fault,
    /// Bumped on every fault change: stalls end when it moves.
    generation: u64,
    /// Connections currently held by a stall.
    stalled: usize,
    seen: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    manifests: Mutex<HashMap<String, Blob>>,
    blobs: Mutex<HashMap<String, Blob>>,
    stopping: AtomicBool,
}

/// The scripted upstream; stopped (listener closed, stalls released) when dropped.
pub struct FaultyUpstream {
    ip: String,
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultyUpstream {
    /// Starts a healthy upstream on a free port of 127.0.0.1.
    pub fn start() -> Self {
        FaultyUpstream::start_on("127.0.0.1")
    }

    /// Starts a healthy upstream on a free port of `ip` (any 127.x.y.z works on Linux).
    pub fn start_on(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind faulty upstream");
        let port = listener.local_addr().expect("local addr").port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                fault: Fault::Healthy,
                generation: 0,
                stalled: 0,
                seen: Vec::new(),
            }),
            changed: Condvar::new(),
            manifests: Mutex::new(HashMap::new()),
            blobs: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let mut up = FaultyUpstream {
            ip: ip.to_string(),
            port,
            shared,
            acceptor: None,
        };
        up.spawn_acceptor(listener);
        up
    }

    /// `http://IP:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// The port it listens on (also while stopped: [`FaultyUpstream::restart`] reuses it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves `image` as `<repo>:<tag>` (and by digest).
    pub fn add_image(&self, repo: &str, tag: &str, image: &Image) {
        let mut manifests = self.shared.manifests.lock().expect("lock");
        manifests.insert(format!("{repo}:{tag}"), image.manifest.clone());
        manifests.insert(
            format!("{repo}:{}", image.manifest.digest),
            image.manifest.clone(),
        );
        let mut blobs = self.shared.blobs.lock().expect("lock");
        for blob in image.blobs() {
            blobs.insert(format!("{repo}@{}", blob.digest), blob.clone());
        }
    }

    /// Switches to `fault` (ending any stall in progress).
    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.shared.state.lock().expect("lock");
        state.fault = fault;
        state.generation += 1;
        self.shared.changed.notify_all();
    }

    /// Back to serving everything correctly.
    pub fn heal(&self) {
        self.set_fault(Fault::Healthy);
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.state.lock().expect("lock").seen.clone()
    }

    /// How many `method` requests had a path containing `needle`.
    pub fn count(&self, method: &str, needle: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path.contains(needle))
            .count()
    }

    /// Waits (bounded) until at least `n` connections are held by a stall.
    pub fn wait_for_stalls(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || {
            self.shared.state.lock().expect("lock").stalled >= n
        })
    }

    /// Closes the listener: connections are refused until [`FaultyUpstream::restart`].
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.set_fault(self.current_fault()); // release stalls
                                              // Wake the blocking accept so the thread drops the listener.
        let _ = TcpStream::connect((self.ip.as_str(), self.port));
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        assert!(self.acceptor.is_none(), "faulty upstream already running");
        let listener = TcpListener::bind((self.ip.as_str(), self.port)).expect("rebind same port");
        self.shared.stopping.store(false, Ordering::SeqCst);
        self.spawn_acceptor(listener);
    }

    fn current_fault(&self) -> Fault {
        self.shared.state.lock().expect("lock").fault.clone()
    }

    fn spawn_acceptor(&mut self, listener: TcpListener) {
        let shared = Arc::clone(&self.shared);
        self.acceptor = Some(thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let _ = handle(&shared, stream);
                });
            }
        }));
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop();
        }
    }
}

/// Reads the request head; returns (method, path without query).
fn read_request(stream: &TcpStream) -> std::io::Result<(String, String)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    Ok((method, path))
}

fn head(status: u16, headers: &[(String, String)], length: usize) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        302 => "Found",
        307 => "Temporary Redirect",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ));
    out.into_bytes()
}

fn respond(
    stream: &mut TcpStream,
    method: &str,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    stream.write_all(&head(status, headers, body.len()))?;
    if method != "HEAD" {
        stream.write_all(body)?;
    }
    stream.flush()
}

/// Closes with RST: SO_LINGER on with a zero timeout, then close.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

enum What {
    Base,
    Manifest(String),
    Blob(String),
    Other,
}

fn classify(path: &str) -> What {
    if path == "/v2/" || path == "/v2" {
        return What::Base;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return What::Other;
    };
    if let Some(i) = rest.rfind("/manifests/") {
        return What::Manifest(format!("{}:{}", &rest[..i], &rest[i + 11..]));
    }
    if let Some(i) = rest.rfind("/blobs/") {
        return What::Blob(format!("{}@{}", &rest[..i], &rest[i + 7..]));
    }
    What::Other
}

fn in_scope(scope: Scope, what: &What) -> bool {
    match (scope, what) {
        (_, What::Base) | (_, What::Other) => false,
        (Scope::All, _) => true,
        (Scope::Blobs, What::Blob(_)) => true,
        (Scope::Manifests, What::Manifest(_)) => true,
        _ => false,
    }
}

/// Holds the connection until the fault changes, the server stops, or [`STALL_LIMIT`].
fn stall(shared: &Shared) {
    let mut state = shared.state.lock().expect("lock");
    let generation = state.generation;
    state.stalled += 1;
    let deadline = Instant::now() + STALL_LIMIT;
    while state.generation == generation
        && !shared.stopping.load(Ordering::SeqCst)
        && Instant::now() < deadline
    {
        state = shared
            .changed
            .wait_timeout(state, Duration::from_millis(200))
            .expect("wait")
            .0;
    }
    state.stalled -= 1;
}

fn handle(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let (method, path) = read_request(&stream)?;
    if method.is_empty() {
        return Ok(()); // the wake-up connection of `stop`
    }
    let fault = {
        let mut state = shared.state.lock().expect("lock");
        state.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
        });
        state.fault.clone()
    };
    // `/redirect/<n>/v2/...` is hop n of a redirect loop: still the same request underneath.
    let (hop, inner_path) = match path
        .strip_prefix("/redirect/")
        .and_then(|r| r.split_once('/'))
    {
        Some((n, rest)) => (n.parse::<u64>().unwrap_or(0), format!("/{rest}")),
        None => (0, path.clone()),
    };
    let what = classify(&inner_path);
    let json = |s: &str| vec![("Content-Type".to_string(), s.to_string())];
    let registry_headers = vec![(
        "Docker-Distribution-API-Version".to_string(),
        "registry/2.0".to_string(),
    )];

    match (&fault, &what) {
        (Fault::Status(code, headers, scope), w) if in_scope(*scope, w) => {
            let mut all = headers.clone();
            all.extend(json("text/plain"));
            return respond(&mut stream, &method, *code, &all, b"scripted failure\n");
        }
        (Fault::StallBeforeHeaders(scope), w) if in_scope(*scope, w) => {
            stall(shared);
            return Ok(());
        }
        (Fault::HoldBeforeHeaders(scope), w) if in_scope(*scope, w) => stall(shared),
        (Fault::RedirectLoop, What::Blob(_)) => {
            let location = format!("/redirect/{}{inner_path}", hop + 1);
            return respond(
                &mut stream,
                &method,
                302,
                &[("Location".to_string(), location)],
                b"",
            );
        }
        (Fault::RedirectTo(base), What::Blob(_)) => {
            let location = format!("{}{inner_path}", base.trim_end_matches('/'));
            return respond(
                &mut stream,
                &method,
                307,
                &[("Location".to_string(), location)],
                b"",
            );
        }
        _ => {}
    }

    let (blob, is_blob) = match &what {
        What::Base => {
            return respond(&mut stream, &method, 200, &registry_headers, b"{}");
        }
        What::Manifest(key) => (
            shared.manifests.lock().expect("lock").get(key).cloned(),
            false,
        ),
        What::Blob(key) => (shared.blobs.lock().expect("lock").get(key).cloned(), true),
        What::Other => (None, false),
    };
    let Some(blob) = blob else {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}"#;
        return respond(&mut stream, &method, 404, &json("application/json"), body);
    };
    let mut headers = registry_headers;
    headers.push(("Docker-Content-Digest".to_string(), blob.digest.clone()));
    headers.push((
        "Content-Type".to_string(),
        if is_blob {
            "application/octet-stream".to_string()
        } else {
            blob.media_type.clone()
        },
    ));
    let body = &blob.bytes;
    match &fault {
        Fault::ResetMidBlob { denominator } if is_blob && method == "GET" => {
            stream.write_all(&head(200, &headers, body.len()))?;
            let cut = (body.len() as u64 / (*denominator).max(1)) as usize;
            stream.write_all(&body[..cut])?;
            stream.flush()?;
            reset(stream);
            Ok(())
        }
        Fault::WrongBytes if is_blob && method == "GET" => {
            let mut wrong = body.clone();
            let mid = wrong.len() / 2;
            wrong[mid] ^= 0xff;
            respond(&mut stream, &method, 200, &headers, &wrong)
        }
        Fault::StallMidBlob if is_blob && method == "GET" => {
            stream.write_all(&head(200, &headers, body.len()))?;
            stream.write_all(&body[..body.len() / 2])?;
            stream.flush()?;
            stall(shared);
            let _ = stream.shutdown(Shutdown::Both);
            Ok(())
        }
        Fault::PauseMidBlob if is_blob && method == "GET" => {
            stream.write_all(&head(200, &headers, body.len()))?;
            let half = body.len() / 2;
            stream.write_all(&body[..half])?;
            stream.flush()?;
            stall(shared);
            stream.write_all(&body[half..])?;
            stream.flush()
        }
        Fault::Slow {
            delay,
            pieces,
            scope,
        } if in_scope(*scope, &what) => {
            thread::sleep(*delay);
            stream.write_all(&head(200, &headers, body.len()))?;
            if method != "HEAD" {
                let step = body.len().div_ceil((*pieces).max(1) as usize).max(1);
                for piece in body.chunks(step) {
                    stream.write_all(piece)?;
                    stream.flush()?;
                    thread::sleep(*delay);
                }
            }
            stream.flush()
        }
        _ => respond(&mut stream, &method, 200, &headers, body),
    }
}

/// `n` concurrent `GET`s of `url` (a manifest, `Accept: accept`) while `up` holds every
/// manifest request before its headers; once `ready()` says the burst has lined up (polled up
/// to `wait`), `up` lets them all go. Each answer's status and `Docker-Content-Digest`.
/// Panics, with `log()`, when the burst never lined up.
pub fn held_manifest_burst(
    up: &FaultyUpstream,
    url: &str,
    (n, accept, wait): (usize, &str, Duration),
    ready: impl Fn() -> bool,
    log: impl Fn() -> String,
) -> Vec<(u16, String)> {
    up.set_fault(Fault::HoldBeforeHeaders(Scope::Manifests));
    thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    let response = super::http::loopback_client()
                        .get(url)
                        .header("accept", accept)
                        .send()
                        .expect("GET manifest");
                    let digest = response
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    (response.status().as_u16(), digest)
                })
            })
            .collect();
        let arrived = poll_until(wait, &ready);
        up.heal();
        let answers: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        assert!(arrived, "the burst never lined up:\n{}", log());
        answers
    })
}
