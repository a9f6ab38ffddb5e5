//! End-to-end: cached content is served per repository (issue 9, item 1), through the native
//! binary with auth on, Debian's `docker-registry` as the upstream and real `skopeo` pulls.
//!
//! Anonymous callers may pull only `reg.test/library/*`; alice may pull everything. After
//! alice pulled `team/private`, the attack from the issue — asking for the private digests
//! under the public repository's name — must not return the private bytes, whether the blob is
//! committed or still filling. A gating TCP proxy between pullgate and the registry holds a
//! blob transfer half-way, so "still filling" is a state the test controls rather than a race.
//! A second private repository that shares a layer is served from the cache without a second
//! blob GET at the upstream (the registry's access log is the ground truth).

// The harness is a host, not the core: it reads the real clock for its bounded waits.
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::json;

use support::fixtures::{sha256_digest, Blob, Image, OCI_MANIFEST};
use support::http::{loopback_client, RegistryClient};
use support::process::poll_until;
use support::pullgate::{hash_password as hash, Pullgate};
use support::registry::Registry;
use support::skopeo::{skopeo_pull, Platforms};

const PASSWORD: &str = "correct horse battery staple";
const TOKEN_SECRET: &str = "token-signing-key-for-links-tests";
/// Bytes a held connection still passes after the hold starts.
const HOLD_AFTER: usize = 1 << 20;

#[derive(Default)]
struct GateState {
    held: bool,
    /// Bumped each time a hold starts, so each connection counts from then.
    epoch: u64,
    /// Connections currently waiting at the gate.
    waiting: usize,
}

/// A loopback TCP proxy to the registry that, while held, lets each connection pass at most
/// [`HOLD_AFTER`] more response bytes and then waits until released.
struct GatedProxy {
    port: u16,
    gate: Arc<(Mutex<GateState>, Condvar)>,
}

impl GatedProxy {
    fn start(target: String) -> GatedProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let gate: Arc<(Mutex<GateState>, Condvar)> = Arc::default();
        let g = gate.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let g = g.clone();
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || pipe(c2, s2));
                std::thread::spawn(move || pipe_gated(server, client, g));
            }
        });
        GatedProxy { port, gate }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn hold(&self) {
        let mut s = self.gate.0.lock().expect("lock");
        s.held = true;
        s.epoch += 1;
    }

    fn release(&self) {
        self.gate.0.lock().expect("lock").held = false;
        self.gate.1.notify_all();
    }

    fn waiting(&self) -> usize {
        self.gate.0.lock().expect("lock").waiting
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn pipe_gated(mut from: TcpStream, mut to: TcpStream, gate: Arc<(Mutex<GateState>, Condvar)>) {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut epoch, mut passed) = (0u64, 0usize);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let allowed = {
                let (lock, cvar) = &*gate;
                let mut s = lock.lock().expect("lock");
                if s.held && s.epoch != epoch {
                    epoch = s.epoch;
                    passed = 0;
                }
                if s.held && passed >= HOLD_AFTER {
                    s.waiting += 1;
                    while s.held {
                        s = cvar.wait(s).expect("wait");
                    }
                    s.waiting -= 1;
                }
                if s.held {
                    (HOLD_AFTER - passed).min(chunk.len())
                } else {
                    chunk.len()
                }
            };
            if to.write_all(&chunk[..allowed]).is_err() {
                return;
            }
            passed += allowed;
            chunk = &chunk[allowed..];
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn start(upstream_url: &str) -> Pullgate {
    // The realm clients follow is <public_url>/token: pullgate's own address.
    let port = support::process::free_port();
    let config = format!(
        r#"
[auth]
enabled = true
token_secret = "env:PG_TOKEN_SECRET"
token_ttl = "5m"
public_url = "http://127.0.0.1:{port}"

[[identity]]
name = "alice"
password_hash = "{hash}"
groups = ["devs"]

[[access]]
who = ["anonymous"]
upstreams = ["reg.test"]
repositories = ["library/*"]
actions = ["pull"]

[[access]]
who = ["group:devs"]
actions = ["pull"]
"#,
        hash = hash(PASSWORD)
    );
    Pullgate::builder()
        .port(port)
        .config(&config)
        .upstream("reg.test", upstream_url)
        .env("PG_TOKEN_SECRET", TOKEN_SECRET)
        .start()
}

/// An image in another repository that shares `base`'s layers but has its own config (so its
/// own manifest digest).
fn sharing_layers(base: &Image, label: &str) -> Image {
    let mut config: serde_json::Value =
        serde_json::from_slice(&base.config.bytes).expect("config json");
    config["config"]["Labels"]["pullgate.test.copy"] = json!(label);
    let config = Blob::new(
        &base.config.media_type,
        serde_json::to_vec(&config).expect("config"),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": base.layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(
        OCI_MANIFEST,
        serde_json::to_vec_pretty(&manifest).expect("manifest"),
    );
    Image {
        manifest,
        config,
        layers: base.layers.clone(),
        platform: base.platform.clone(),
    }
}

/// The attacker's requests: the private digests under the public repository's name, with an
/// anonymous token that really opens `library/public`. Each must be a 404 with the OCI code
/// and none of the private bytes.
fn assert_refused(anonymous: &RegistryClient, private: &Blob, manifest: Option<&Blob>) {
    let got = anonymous.get_blob("reg.test/library/public", &private.digest);
    assert_eq!(
        (got.status.as_u16(), got.error_code().as_deref()),
        (404, Some("BLOB_UNKNOWN")),
        "blob {} to anonymous",
        private.digest
    );
    assert!(
        got.body.len() < 1024 && sha256_digest(&got.body) != private.digest,
        "private blob bytes leaked"
    );
    if let Some(m) = manifest {
        let got = anonymous.get_manifest("reg.test/library/public", &m.digest);
        assert_eq!(
            (got.status.as_u16(), got.error_code().as_deref()),
            (404, Some("MANIFEST_UNKNOWN")),
            "manifest {} to anonymous",
            m.digest
        );
        assert!(
            !String::from_utf8_lossy(&got.body).contains("schemaVersion"),
            "private manifest bytes leaked"
        );
    }
}

/// An anonymous pullgate token for `library/public`.
fn anonymous_token(pg: &Pullgate) -> String {
    let t: serde_json::Value = serde_json::from_slice(
        &loopback_client()
            .get(format!(
                "{}/token?service=pullgate&scope=repository:reg.test/library/public:pull",
                pg.url()
            ))
            .send()
            .expect("token")
            .bytes()
            .expect("token body"),
    )
    .expect("token json");
    t["token"].as_str().expect("token").to_string()
}

#[test]
fn private_content_is_not_served_under_a_public_name_committed_or_filling() {
    let registry = Registry::start_plain();
    let proxy = GatedProxy::start(registry.host());
    let public = Image::oci(21, &[8 << 10]);
    let private = Image::oci(22, &[8 << 10, 40 << 10]);
    let large = Blob::new(
        "application/octet-stream",
        (0..6u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    );
    registry.push_image("library/public", "v1", &public);
    registry.push_image("team/private", "v1", &private);
    registry.client().push_blob("team/private", &large);
    let pg = start(&proxy.url());
    let host = pg.host();
    let anonymous = RegistryClient::new(&pg.url(), None);

    // The rules themselves: anonymous may pull the public image, not the private one.
    skopeo_pull(
        &format!("{host}/reg.test/library/public:v1"),
        Platforms::Host,
        None,
    )
    .verify_image(&public);
    let direct = anonymous.get_manifest("reg.test/team/private", "v1");
    assert!(
        matches!(direct.status.as_u16(), 401 | 403),
        "{}",
        direct.status
    );

    // alice pulls the private image: now every blob and the manifest are cached.
    skopeo_pull(
        &format!("{host}/reg.test/team/private:v1"),
        Platforms::Host,
        Some(("alice", PASSWORD)),
    )
    .verify_image(&private);
    let blob_gets = registry.count_requests("GET", "/blobs/sha256:");

    // Committed: the attack gets 404s and no bytes.
    for blob in private.blobs() {
        assert_refused(&anonymous, blob, None);
    }
    assert_refused(&anonymous, private.largest_layer(), Some(&private.manifest));
    assert_eq!(
        registry.count_requests("GET", "/blobs/sha256:"),
        blob_gets,
        "the refusals transferred nothing:\n{}",
        registry.access_log_summary()
    );
    assert!(registry.count_requests("HEAD", "/v2/library/public/blobs/") >= 1);

    // Filling: alice's transfer of a large private blob is held half-way at the proxy.
    proxy.hold();
    let alice_get = {
        let url = pg.url();
        let digest = large.digest.clone();
        std::thread::spawn(move || {
            RegistryClient::new(&url, Some(("alice", PASSWORD)))
                .get_blob("reg.test/team/private", &digest)
        })
    };
    assert!(
        poll_until(Duration::from_secs(30), || proxy.waiting() > 0),
        "the private blob transfer never reached the gate"
    );
    assert_refused(&anonymous, &large, None);
    let token = format!("Bearer {}", anonymous_token(&pg));
    let head = anonymous.raw(
        reqwest::Method::HEAD,
        &format!("/v2/reg.test/library/public/blobs/{}", large.digest),
        &[("authorization", &token)],
        Vec::new(),
    );
    assert_eq!(head.status.as_u16(), 404);
    assert!(proxy.waiting() > 0, "the fill was still running");
    proxy.release();
    let got = alice_get.join().expect("alice's GET");
    assert!(got.is_complete_success(), "{:?}", got.status);
    assert_eq!(sha256_digest(&got.body), large.digest);
    // Committed now, and still refused.
    assert_refused(&anonymous, &large, None);
}

#[test]
fn a_second_repository_sharing_a_layer_is_served_from_the_cache_without_a_second_transfer() {
    let registry = Registry::start_plain();
    let private = Image::oci(31, &[8 << 10, 300 << 10]);
    let shared = sharing_layers(&private, "copy");
    registry.push_image("team/private", "v1", &private);
    registry.push_image("team/shared", "v1", &shared);
    let pg = start(&registry.url());
    let host = pg.host();

    skopeo_pull(
        &format!("{host}/reg.test/team/private:v1"),
        Platforms::Host,
        Some(("alice", PASSWORD)),
    )
    .verify_image(&private);
    skopeo_pull(
        &format!("{host}/reg.test/team/shared:v1"),
        Platforms::Host,
        Some(("alice", PASSWORD)),
    )
    .verify_image(&shared);

    let log = registry.access_log_summary();
    for layer in &private.layers {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", layer.digest)),
            1,
            "layer {} transferred more than once:\n{log}",
            layer.digest
        );
        assert_eq!(
            registry.count_requests("GET", &format!("/v2/team/shared/blobs/{}", layer.digest)),
            0,
            "{log}"
        );
        // The shared repository's manifest vouched for its layers: not even a HEAD.
        assert_eq!(
            registry.count_requests("HEAD", &format!("/v2/team/shared/blobs/{}", layer.digest)),
            0,
            "{log}"
        );
    }
    // Its own config is its own transfer.
    assert_eq!(
        registry.count_requests(
            "GET",
            &format!("/v2/team/shared/blobs/{}", shared.config.digest)
        ),
        1,
        "{log}"
    );
}
