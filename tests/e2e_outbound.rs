//! End-to-end tests of the outbound address policy through the native binary, on loopback:
//! an upstream configured as `http://localhost:<port>` (trusted as written) redirects its blob
//! GET to `http://127.0.0.2:<port>/…` — a loopback address the operator never configured. The
//! redirect is refused with a clear 502 and the internal server is never asked, unless
//! `[outbound] allow` lists the network.
//!
//! The upstream and the internal server are tiny scripted HTTP/1.1 servers on threads of this
//! test (one request per connection, `Connection: close`), counting what they are asked.

// The harness is a host, not the core: it reads the real clock for its bounded waits.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use support::fixtures::sha256_digest;
use support::http::loopback_client;
use support::pullgate::Pullgate;

/// What a scripted server answers for a request path: (status, headers, body).
type Script = dyn Fn(&str) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + Sync;

/// A scripted HTTP server on `ip`; remembers every request line it got.
struct ScriptedServer {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ScriptedServer {
    fn start(ip: &str, script: Arc<Script>) -> ScriptedServer {
        let listener = TcpListener::bind((ip, 0)).expect("bind scripted server");
        let port = listener.local_addr().expect("local addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, script) = (seen.clone(), script.clone());
                std::thread::spawn(move || answer(stream, &seen, &*script));
            }
        });
        ScriptedServer { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests lock").clone()
    }
}

fn answer(stream: TcpStream, seen: &Mutex<Vec<String>>, script: &Script) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let request_line = request_line.trim_end().to_string();
    seen.lock()
        .expect("requests lock")
        .push(request_line.clone());
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let (status, headers, body) = script(path);
    let mut out = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(out.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
    let _ = stream.flush();
}

/// The blob the internal server holds (100 KiB, deterministic).
fn secret_blob() -> Vec<u8> {
    (0..100 * 1024u32).map(|i| (i % 251) as u8 ^ 0x5a).collect()
}

/// An internal server on 127.0.0.2 holding the blob, and an upstream on 127.0.0.1 (reached as
/// `localhost`) whose blob GETs redirect there.
fn servers(blob: &[u8]) -> (ScriptedServer, ScriptedServer) {
    let bytes = blob.to_vec();
    let internal = ScriptedServer::start(
        "127.0.0.2",
        Arc::new(move |path: &str| {
            if path.starts_with("/internal/") {
                (200, vec![], bytes.clone())
            } else {
                (404, vec![], Vec::new())
            }
        }),
    );
    let internal_port = internal.port;
    let upstream = ScriptedServer::start(
        "127.0.0.1",
        Arc::new(move |path: &str| {
            if path == "/v2/" {
                (200, vec![], b"{}".to_vec())
            } else if let Some(i) = path.find("/blobs/") {
                let digest = &path[i + "/blobs/".len()..];
                let location = format!("http://127.0.0.2:{internal_port}/internal/{digest}");
                (307, vec![("location".into(), location)], Vec::new())
            } else {
                (404, vec![], Vec::new())
            }
        }),
    );
    (internal, upstream)
}

fn config(upstream: &ScriptedServer, extra: &str) -> String {
    format!(
        "[[upstream]]\nhost = \"up.test\"\nurl = \"http://localhost:{}\"\n{extra}",
        upstream.port
    )
}

#[test]
fn redirect_to_an_unconfigured_loopback_address_is_refused_and_no_byte_reaches_the_client() {
    let blob = secret_blob();
    let digest = sha256_digest(&blob);
    let (internal, upstream) = servers(&blob);
    let pullgate = Pullgate::builder().config(&config(&upstream, "")).start();

    let resp = loopback_client()
        .get(format!("{}/v2/up.test/app/blobs/{digest}", pullgate.url()))
        .send()
        .expect("blob request");
    let status = resp.status().as_u16();
    let body = resp.bytes().expect("error body").to_vec();
    let text = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains("refused address (loopback)") && text.contains("[outbound] allow"),
        "{text}"
    );
    assert!(text.contains("\"errors\""), "OCI envelope: {text}");
    assert!(
        !body.windows(64).any(|w| blob.windows(64).next() == Some(w)),
        "bytes of the refused answer reached the client"
    );
    assert!(
        !text.contains(digest.trim_start_matches("sha256:")),
        "the message names the digest: {text}"
    );
    assert!(
        upstream
            .requests()
            .iter()
            .any(|r| r.contains(&format!("/blobs/{digest}"))),
        "the upstream was asked: {:?}",
        upstream.requests()
    );
    assert_eq!(
        internal.requests(),
        Vec::<String>::new(),
        "the refused address was dialled"
    );

    // Asked again: still refused (nothing was cached), still never dialled.
    let again = loopback_client()
        .get(format!("{}/v2/up.test/app/blobs/{digest}", pullgate.url()))
        .send()
        .expect("blob request");
    assert_eq!(again.status().as_u16(), 502);
    assert!(internal.requests().is_empty());
}

#[test]
fn redirect_to_loopback_is_followed_when_outbound_allow_lists_it() {
    let blob = secret_blob();
    let digest = sha256_digest(&blob);
    let (internal, upstream) = servers(&blob);
    let pullgate = Pullgate::builder()
        .config(&config(
            &upstream,
            "[outbound]\nallow = [\"127.0.0.0/8\"]\n",
        ))
        .start();

    let resp = loopback_client()
        .get(format!("{}/v2/up.test/app/blobs/{digest}", pullgate.url()))
        .send()
        .expect("blob request");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.bytes().expect("blob body").to_vec();
    assert_eq!(sha256_digest(&body), digest);
    assert_eq!(internal.requests().len(), 1, "{:?}", internal.requests());
}
