//! End-to-end tests of TLS on the native listener (issue #12): a CA and server certificates
//! made with `openssl` at test time ([`TestCa`]), skopeo and containerd pulling a verified
//! image with that CA and no insecure flag, HTTP/2 by ALPN, and certificate reloads (SIGHUP
//! and a file change) that reach new connections while an open one keeps being served.
//!
//! Every wait is bounded polling, never a sleep.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::containerd::Containerd;
use support::fixtures::{sha256_digest, Image};
use support::http::client_trusting;
use support::process::{poll_until, require_root, wait_for};
use support::pullgate::Pullgate;
use support::registry::Registry;
use support::skopeo::skopeo_copy_verified;
use support::tls_proxy::{toml_path, TestCa};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const BOUND: Duration = Duration::from_secs(60);

fn upstream() -> (Registry, Image) {
    let registry = Registry::start_plain();
    let image = Image::oci(31, &[8 << 10, 40 << 10]);
    registry.push_image("team/app", "v1", &image);
    (registry, image)
}

/// Pullgate serving TLS with `ca`'s server certificate, from files under `dir` that a test
/// may replace.
fn start(registry: &Registry, ca: &TestCa, dir: &Path) -> Pullgate {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(ca.server_cert(), &cert).expect("copy cert");
    std::fs::copy(ca.server_key(), &key).expect("copy key");
    Pullgate::builder()
        .config(&format!(
            "[tls]\ncert = {}\nkey = {}\n",
            toml_path(&cert),
            toml_path(&key)
        ))
        .upstream("reg.test", &registry.url())
        .tls_ca(&ca.ca_file())
        .start()
}

#[test]
fn skopeo_and_containerd_pull_a_verified_image_over_tls() {
    let (registry, image) = upstream();
    let ca = TestCa::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = start(&registry, &ca, dir.path());
    let reference = format!("{}/reg.test/team/app:v1", pg.host());
    skopeo_copy_verified(&reference, &ca.ca_file())
        .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_tail()))
        .verify_image(&image);
    // Verification is on: a client trusting another CA is refused.
    let stranger = TestCa::generate();
    assert!(
        skopeo_copy_verified(&reference, &stranger.ca_file()).is_err(),
        "skopeo accepted a certificate its CA did not sign"
    );

    require_root("containerd");
    let ctr = Containerd::start();
    let hosts = ctr.configure_tls_mirror("reg.test", &pg.host(), &ca.ca_file());
    ctr.pull("reg.test/team/app:v1", &hosts)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", ctr.log_tail(), pg.log_tail()));
    ctr.assert_pulled("reg.test/team/app:v1", image.digest(), &image);
}

#[test]
fn http2_is_negotiated_by_alpn_and_streams_a_blob_with_tls_from_the_environment() {
    let (registry, image) = upstream();
    let ca = TestCa::generate();
    // Configured through the environment this time, as PULLGATE_TLS_CERT / _KEY.
    let cert = ca.server_cert().display().to_string();
    let key = ca.server_key().display().to_string();
    let pg = Pullgate::builder()
        .env("PULLGATE_TLS_CERT", &cert)
        .env("PULLGATE_TLS_KEY", &key)
        .upstream("reg.test", &registry.url())
        .tls_ca(&ca.ca_file())
        .start();
    let blob = image.largest_layer();
    let url = format!("{}/v2/reg.test/team/app/blobs/{}", pg.url(), blob.digest);
    let h2 = client_trusting(&ca.ca_file());
    let r = h2.get(&url).send().expect("GET over TLS");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().expect("body")), blob.digest);
    // Again, from the cache, on the same HTTP/2 connection.
    let r = h2.get(&url).send().expect("GET over TLS");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(sha256_digest(&r.bytes().expect("body")), blob.digest);
    // A client that offers only HTTP/1.1 gets it.
    let pem = std::fs::read(ca.ca_file()).expect("read CA");
    let h1 = reqwest::blocking::Client::builder()
        .no_proxy()
        .http1_only()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA"))
        .build()
        .expect("client");
    let r = h1.get(&url).send().expect("GET over TLS");
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(sha256_digest(&r.bytes().expect("body")), blob.digest);
}

/// A TLS connection (HTTP/1.1, keep-alive) that trusts only `ca`.
struct RawTls(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl RawTls {
    fn connect(host: &str, ca: &Path) -> Result<RawTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
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
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(host).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(BOUND)).expect("timeout");
        let mut tls = RawTls(rustls::StreamOwned::new(conn, tcp));
        // Complete the handshake now, so a refused certificate is an error here.
        while tls.0.conn.is_handshaking() {
            tls.0
                .conn
                .complete_io(&mut tls.0.sock)
                .map_err(|e| e.to_string())?;
        }
        Ok(tls)
    }

    /// `GET /healthz` on this connection: the status.
    fn healthz(&mut self) -> u16 {
        self.0
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: pullgate\r\n\r\n")
            .expect("send");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.0.read_exact(&mut byte).expect("read a response head");
            head.push(byte[0]);
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
        self.0.read_exact(&mut body).expect("read the body");
        head.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Replaces `dir`'s cert.pem and key.pem with `ca`'s pair, each by a rename.
fn install(dir: &Path, cert: &Path, key: &Path) {
    for (from, name) in [(cert, "cert.pem"), (key, "key.pem")] {
        let tmp: PathBuf = dir.join(format!("{name}.new"));
        std::fs::copy(from, &tmp).expect("copy");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

fn new_connection_trusts(pg: &Pullgate, ca: &TestCa) -> bool {
    RawTls::connect(&pg.host(), &ca.ca_file()).is_ok_and(|mut c| c.healthz() == 200)
}

#[test]
fn a_replaced_certificate_reaches_new_connections_on_sighup_and_on_file_change() {
    let (registry, _) = upstream();
    let (first, second) = (TestCa::generate(), TestCa::generate());
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = start(&registry, &first, dir.path());
    let mut open = RawTls::connect(&pg.host(), &first.ca_file()).expect("connect");
    assert_eq!(open.healthz(), 200);
    assert!(!new_connection_trusts(&pg, &second));

    // SIGHUP after replacing the files: new connections get the new certificate.
    install(dir.path(), &second.server_cert(), &second.server_key());
    pg.signal(libc::SIGHUP);
    wait_for("the second certificate", BOUND, || {
        new_connection_trusts(&pg, &second).then_some(())
    });
    assert!(!new_connection_trusts(&pg, &first));
    // The connection opened before is still served.
    assert_eq!(open.healthz(), 200);

    // A key that does not fit keeps the certificate in use, and says why.
    std::fs::copy(first.server_key(), dir.path().join("key.pem")).expect("copy key");
    pg.signal(libc::SIGHUP);
    wait_for("the refused reload in the log", BOUND, || {
        pg.stderr()
            .contains("tls: keeping the previous certificate")
            .then_some(())
    });
    assert!(pg.stderr().contains("does not fit"), "{}", pg.stderr());
    assert!(new_connection_trusts(&pg, &second));

    // Fixing the files is enough: the change is noticed without a signal.
    install(dir.path(), &first.server_cert(), &first.server_key());
    assert!(
        poll_until(BOUND, || new_connection_trusts(&pg, &first)),
        "the changed files were not picked up\n{}",
        pg.log_tail()
    );
    assert_eq!(open.healthz(), 200);
}
