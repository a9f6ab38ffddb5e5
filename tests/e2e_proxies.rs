//! End-to-end tests of client addresses behind proxies (issue #12): `trusted_proxies` with
//! `X-Forwarded-For` / `Forwarded`, and the PROXY protocol (v1 and v2, also before a TLS
//! handshake). A "proxy" is a client socket bound to 127.0.0.2, listed in `trusted_proxies`;
//! 127.0.0.1 is a peer nobody listed. `[[network]]` rules, the `per_ip` rate limit, the
//! audit log and the access log must see the forwarded address from the proxy, and the
//! socket's address from anyone else.
//!
//! One worker thread, so the per-address buckets are exact. Every wait is a socket read with
//! a bound or bounded polling, never a sleep.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use support::process::wait_for;
use support::pullgate::Pullgate;
use support::tls_proxy::{toml_path, TestCa};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const BOUND: Duration = Duration::from_secs(30);
const PROXY: &str = "127.0.0.2";

/// Allowed on registry routes: 198.51.100.0/24 and 127.0.0.1 (not 127.0.0.2, the proxy, nor
/// 203.0.113.7); three requests per address.
fn config(top: &str, server: &str) -> String {
    format!(
        "trusted_proxies = [\"{PROXY}\"]\n{top}\n\
         [server]\nworkers = 1\n{server}\n\
         [[network]]\nroutes = [\"registry\"]\nallow = [\"198.51.100.0/24\", \"127.0.0.1\"]\n\n\
         [rate_limit]\nper_ip = \"1/h\"\nburst = 3\n"
    )
}

/// A TCP connection to pullgate from `from`.
fn connect_from(pg: &Pullgate, from: &str) -> TcpStream {
    let socket = std::net::TcpListener::bind((from, 0)).map(drop);
    assert!(socket.is_ok(), "{from} is not usable on this machine");
    let local: SocketAddr = format!("{from}:0").parse().expect("address");
    let target: SocketAddr = pg.host().parse().expect("pullgate address");
    let s = bind_connect(local, target);
    s.set_read_timeout(Some(BOUND)).expect("read timeout");
    s
}

/// `connect(2)` from a chosen local address (std has no bind-before-connect).
fn bind_connect(local: SocketAddr, target: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(local).expect("bind the client socket");
        socket.connect(target).await.expect("connect to pullgate")
    });
    let stream = stream.into_std().expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
}

/// Sends `GET /v2/` with `headers` on `s`; the status, or `None` if the server closed.
fn get_v2(s: &mut (impl Read + Write), headers: &str) -> Option<u16> {
    s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: pullgate\r\n{headers}\r\n").as_bytes())
        .ok()?;
    read_status(s)
}

fn read_status(s: &mut impl Read) -> Option<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a response: {e}"),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok())
}

/// One request on a fresh connection from `from`.
fn status_from(pg: &Pullgate, from: &str, headers: &str) -> u16 {
    get_v2(&mut connect_from(pg, from), headers).expect("an answer")
}

fn audit_ips(pg: &Pullgate) -> Vec<String> {
    std::fs::read_to_string(pg.data_dir().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["ip"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn x_forwarded_for_is_believed_from_a_trusted_proxy_only() {
    let pg = Pullgate::builder().config(&config("", "")).start();
    let xff = |v: &str| format!("X-Forwarded-For: {v}\r\n");
    // From the proxy: the network rule acts on the forwarded address.
    assert_eq!(status_from(&pg, PROXY, &xff("203.0.113.7")), 403);
    assert_eq!(status_from(&pg, PROXY, &xff("198.51.100.2")), 200);
    // The rightmost hop is the one the proxy wrote; what the client wrote left of it is not.
    assert_eq!(
        status_from(&pg, PROXY, &xff("198.51.100.2, 203.0.113.7")),
        403
    );
    assert_eq!(
        status_from(&pg, PROXY, &xff("203.0.113.7, 198.51.100.2")),
        200
    );
    // The proxy's own requests are its own (127.0.0.2 is not allowed).
    assert_eq!(status_from(&pg, PROXY, ""), 403);
    // The rate limit keys on the forwarded address: 198.51.100.2 has used two of its three…
    let mut keep_alive = connect_from(&pg, PROXY);
    assert_eq!(get_v2(&mut keep_alive, &xff("198.51.100.2")), Some(200));
    assert_eq!(get_v2(&mut keep_alive, &xff("198.51.100.2")), Some(429));
    // …and a neighbour behind the same proxy, on the same connection, has its own.
    assert_eq!(get_v2(&mut keep_alive, &xff("198.51.100.3")), Some(200));

    // From a peer nobody listed, the header is ignored: the rule and the limit act on
    // 127.0.0.1, which is allowed, whatever address the header claims.
    assert_eq!(status_from(&pg, "127.0.0.1", &xff("203.0.113.7")), 200);
    assert_eq!(status_from(&pg, "127.0.0.1", &xff("198.51.100.4")), 200);
    assert_eq!(status_from(&pg, "127.0.0.1", &xff("198.51.100.5")), 200);
    assert_eq!(status_from(&pg, "127.0.0.1", &xff("198.51.100.6")), 429);

    // The audit log records refusals with the address the rules saw.
    let ips = wait_for("audited refusals", BOUND, || {
        let ips = audit_ips(&pg);
        (ips.len() >= 5).then_some(ips)
    });
    assert!(ips.iter().any(|ip| ip == "203.0.113.7"), "{ips:?}");
    assert!(ips.iter().any(|ip| ip == "198.51.100.2"), "{ips:?}");
    assert!(ips.iter().any(|ip| ip == "127.0.0.1"), "{ips:?}");
    assert!(!ips.iter().any(|ip| ip == "198.51.100.6"), "{ips:?}");
    // So does the access log (written by its own thread: wait for the line).
    let log = wait_for("the refusal in the access log", BOUND, || {
        let log = pg.stderr();
        log.lines()
            .any(|l| l.contains("status=403") && l.contains("client=203.0.113.7"))
            .then_some(log)
    });
    assert!(!log.contains("client=198.51.100.6"), "{log}");
}

#[test]
fn forwarded_is_read_instead_when_configured() {
    let pg = Pullgate::builder()
        .config(&config("forwarded_header = \"forwarded\"", ""))
        .start();
    let fwd = |v: &str| format!("Forwarded: {v}\r\n");
    assert_eq!(status_from(&pg, PROXY, &fwd("for=203.0.113.7")), 403);
    assert_eq!(
        status_from(&pg, PROXY, &fwd("for=\"198.51.100.2:4711\";proto=https")),
        200
    );
    assert_eq!(
        status_from(&pg, PROXY, &fwd("for=198.51.100.2, for=203.0.113.7")),
        403
    );
    // X-Forwarded-For is then the client's to write, and ignored.
    assert_eq!(
        status_from(&pg, PROXY, "X-Forwarded-For: 198.51.100.2\r\n"),
        403
    );
    assert_eq!(status_from(&pg, "127.0.0.1", &fwd("for=203.0.113.7")), 200);
}

fn v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 40000 5000\r\n").into_bytes()
}

fn v2(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x13, 0x88]);
    h
}

/// A connection from `from` that starts with `header`.
fn with_header(pg: &Pullgate, from: &str, header: &[u8]) -> TcpStream {
    let mut s = connect_from(pg, from);
    s.write_all(header).expect("send the PROXY header");
    s
}

#[test]
fn proxy_protocol_headers_are_believed_from_a_trusted_proxy_only() {
    let pg = Pullgate::builder()
        .config(&config("", "proxy_protocol = true"))
        .start();
    for header in [v1("203.0.113.7"), v2([203, 0, 113, 7])] {
        let mut s = with_header(&pg, PROXY, &header);
        assert_eq!(get_v2(&mut s, ""), Some(403));
        // Every request on the connection is the header's client.
        assert_eq!(get_v2(&mut s, ""), Some(403));
    }
    for header in [v1("198.51.100.2"), v2([198, 51, 100, 2])] {
        assert_eq!(get_v2(&mut with_header(&pg, PROXY, &header), ""), Some(200));
    }
    // 198.51.100.2 has used two of its three; the limit follows the header's address.
    let mut s = with_header(&pg, PROXY, &v1("198.51.100.2"));
    assert_eq!(get_v2(&mut s, ""), Some(200));
    assert_eq!(get_v2(&mut s, ""), Some(429));
    assert_eq!(
        get_v2(&mut with_header(&pg, PROXY, &v2([198, 51, 100, 3])), ""),
        Some(200)
    );
    // A trusted proxy may connect without a header (its own checks): its own address.
    assert_eq!(status_from(&pg, PROXY, ""), 403);
    // From a peer nobody listed, a header closes the connection unanswered…
    for header in [v1("198.51.100.9"), v2([198, 51, 100, 9])] {
        let mut s = with_header(&pg, "127.0.0.1", &header);
        assert_eq!(get_v2(&mut s, ""), None);
    }
    // …and without one it is served as itself.
    assert_eq!(status_from(&pg, "127.0.0.1", ""), 200);
    let log = wait_for(
        "the closed connection and the client in the log",
        BOUND,
        || {
            let log = pg.stderr();
            (log.contains("a PROXY protocol header from untrusted peer 127.0.0.1")
                && log.contains("client=203.0.113.7"))
            .then_some(log)
        },
    );
    drop(log);
}

#[test]
fn a_proxy_protocol_header_precedes_the_tls_handshake() {
    let ca = TestCa::generate();
    let pg = Pullgate::builder()
        .config(&format!(
            "{}\n[tls]\ncert = {}\nkey = {}\n",
            config("", "proxy_protocol = true"),
            toml_path(&ca.server_cert()),
            toml_path(&ca.server_key())
        ))
        .tls_ca(&ca.ca_file())
        .start();
    let tls = |header: &[u8]| {
        let tcp = with_header(&pg, PROXY, header);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca.ca_file()).expect("read CA") {
            roots.add(cert.expect("CA cert")).expect("add CA");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        rustls::StreamOwned::new(conn, tcp)
    };
    assert_eq!(get_v2(&mut tls(&v2([203, 0, 113, 7])), ""), Some(403));
    assert_eq!(get_v2(&mut tls(&v1("198.51.100.2")), ""), Some(200));
}
