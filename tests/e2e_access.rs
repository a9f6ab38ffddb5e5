//! End-to-end tests of access control on the mirror, through the native binary with real
//! clients on loopback: anonymous and authenticated `skopeo` pulls against allow and deny
//! rules, containerd with credentials, rate limits, a network allowlist that refuses before
//! any upstream call, the audit log, the admin API's purge, and logins under attack: a burst of
//! bad logins is throttled before any password check while `/healthz` keeps answering, and
//! unknown names cost the same verification as known ones (medians printed, not asserted).

// The harness is a host, not the core: it reads the real clock for its bounded waits.
#![allow(clippy::disallowed_methods)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

use support::containerd::Containerd;
use support::fixtures::Image;
use support::http::loopback_client;
use support::process::{free_port, poll_until};
use support::pullgate::{hash_password as hash, Pullgate};
use support::registry::Registry;
use support::skopeo::{skopeo_copy, skopeo_pull, Platforms};

const PASSWORD: &str = "correct horse battery staple";
const ROBOT_TOKEN: &str = "robot-token-never-logged-4f1c";
const TOKEN_SECRET: &str = "token-signing-key-for-tests";

/// Upstream with `library/public` (anonymous may pull) and `team/private` (alice only).
fn upstream() -> (Registry, Image, Image) {
    let registry = Registry::start_plain();
    let public = Image::oci(11, &[8 << 10, 40 << 10]);
    let private = Image::oci(12, &[8 << 10, 40 << 10]);
    registry.push_image("library/public", "v1", &public);
    registry.push_image("team/private", "v1", &private);
    (registry, public, private)
}

fn config(port: u16, extra: &str) -> String {
    format!(
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

[[identity]]
name = "robot"
token = "env:PG_ROBOT_TOKEN"
groups = ["ops"]

[[access]]
who = ["anonymous"]
upstreams = ["reg.test"]
repositories = ["library/*"]
actions = ["pull"]

[[access]]
who = ["group:devs"]
actions = ["pull"]

[[access]]
who = ["robot"]
actions = ["admin"]

{extra}
"#,
        hash = hash(PASSWORD)
    )
}

fn start(registry: &Registry, extra: &str) -> Pullgate {
    let port = free_port();
    Pullgate::builder()
        .port(port)
        .config(&config(port, extra))
        .upstream("reg.test", &registry.url())
        .env("PG_TOKEN_SECRET", TOKEN_SECRET)
        .env("PG_ROBOT_TOKEN", ROBOT_TOKEN)
        .start()
}

#[test]
fn skopeo_pulls_follow_the_allow_and_deny_rules() {
    let (registry, public, private) = upstream();
    let pg = start(&registry, "");
    let host = pg.host();

    // Anonymous: the public repository only.
    skopeo_pull(
        &format!("{host}/reg.test/library/public:v1"),
        Platforms::Host,
        None,
    )
    .verify_image(&public);
    let denied = skopeo_copy(
        &format!("{host}/reg.test/team/private:v1"),
        Platforms::Host,
        None,
    );
    assert!(denied.is_err(), "anonymous must not pull team/private");

    // alice logs in (the token flow) and may pull it; a wrong password may not.
    skopeo_pull(
        &format!("{host}/reg.test/team/private:v1"),
        Platforms::Host,
        Some(("alice", PASSWORD)),
    )
    .verify_image(&private);
    let wrong = skopeo_copy(
        &format!("{host}/reg.test/team/private:v1"),
        Platforms::Host,
        Some(("alice", "wrong")),
    );
    assert!(wrong.is_err());

    // The protocol underneath: /v2/ challenges, /token issues, the token opens the repository.
    let c = loopback_client();
    let r = c.get(format!("{}/v2/", pg.url())).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"{}/token\"", pg.url())),
        "the realm is public_url's: {challenge}"
    );
    let r = c
        .get(format!(
            "{}/v2/reg.test/team/private/manifests/v1",
            pg.url()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("scope=\"repository:reg.test/team/private:pull\""));
    let t: Value = serde_json::from_slice(
        &c.get(format!(
            "{}/token?service=pullgate&scope=repository:reg.test/team/private:pull",
            pg.url()
        ))
        .basic_auth("alice", Some(PASSWORD))
        .send()
        .unwrap()
        .bytes()
        .unwrap(),
    )
    .unwrap();
    let token = t["token"].as_str().unwrap();
    let r = c
        .get(format!(
            "{}/v2/reg.test/team/private/manifests/v1",
            pg.url()
        ))
        .bearer_auth(token)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The robot authenticates but has no pull rule: 403 DENIED in the OCI envelope.
    let r = c
        .get(format!(
            "{}/v2/reg.test/team/private/manifests/v1",
            pg.url()
        ))
        .bearer_auth(ROBOT_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(String::from_utf8_lossy(&r.bytes().unwrap()).contains("DENIED"));

    // The audit log has each case, and no secret.
    // (Its own thread writes it: wait until every case is there.)
    let complete = |records: &[Value]| {
        records.iter().any(|r| {
            r["identity"] == "alice"
                && r["route"] == "blob"
                && r["status"] == 200
                && r["digest"].is_string()
        }) && records.iter().any(|r| {
            r["identity"] == "anonymous"
                && r["repository"] == "reg.test/library/public"
                && r["route"] == "manifest"
        }) && records
            .iter()
            .any(|r| r["status"] == 401 && r["repository"] == "reg.test/team/private")
            && records.iter().any(|r| r["status"] == 403)
    };
    let read_records = || -> Vec<Value> {
        std::fs::read_to_string(pg.data_dir().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let written = poll_until(Duration::from_secs(30), || complete(&read_records()));
    let audit = std::fs::read_to_string(pg.data_dir().join("audit.log")).expect("audit.log");
    assert!(written, "the audit log lacks a case:\n{audit}");
    let records = read_records();
    assert!(records.iter().all(|r| r["ip"] == "127.0.0.1"));
    for secret in [PASSWORD, ROBOT_TOKEN, TOKEN_SECRET, token] {
        assert!(
            !audit.contains(secret),
            "a secret leaked into the audit log"
        );
        assert!(
            !pg.log_tail().contains(secret),
            "a secret leaked into the log"
        );
    }
}

#[test]
fn containerd_pulls_with_credentials() {
    support::process::require_root("containerd");
    let (registry, _, private) = upstream();
    let pg = start(&registry, "");
    let ctr = Containerd::start();
    let hosts = ctr.configure_mirror("reg.test", &pg.host());
    let hosts = hosts.display().to_string();
    let reference = "reg.test/team/private:v1";
    let anonymous = ctr.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        &hosts,
        "--snapshotter",
        "native",
        reference,
    ]);
    assert!(anonymous.is_err(), "anonymous containerd must be refused");
    let user = format!("alice:{PASSWORD}");
    ctr.ctr(&[
        "images",
        "pull",
        "--user",
        &user,
        "--hosts-dir",
        &hosts,
        "--snapshotter",
        "native",
        reference,
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_tail()));
    ctr.assert_pulled(reference, private.digest(), &private);
}

#[test]
fn rate_limited_client_gets_429_and_recovers() {
    let (registry, _, _) = upstream();
    let pg = start(&registry, "[rate_limit]\nper_ip = \"5/s\"\nburst = 5\n");
    let c = loopback_client();
    let url = format!("{}/v2/reg.test/library/public/manifests/v1", pg.url());
    let mut limited = None;
    for _ in 0..50 {
        let r = c.get(&url).send().unwrap();
        if r.status().as_u16() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = limited.expect("50 requests at once must hit a 5/s limit");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert!(String::from_utf8_lossy(&r.bytes().unwrap()).contains("TOOMANYREQUESTS"));
    assert!(poll_until(Duration::from_secs(10), || c
        .get(&url)
        .send()
        .unwrap()
        .status()
        .as_u16()
        == 200));
}

#[test]
fn denied_network_is_refused_before_any_upstream_call() {
    let (registry, _, _) = upstream();
    let pg = start(
        &registry,
        "[[network]]\nroutes = [\"registry\", \"admin\"]\nallow = [\"10.0.0.0/8\"]\n",
    );
    let before = registry.access_log().len();
    let r = loopback_client()
        .get(format!(
            "{}/v2/reg.test/library/public/manifests/v1",
            pg.url()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(String::from_utf8_lossy(&r.bytes().unwrap()).contains("DENIED"));
    assert_eq!(
        registry.access_log().len(),
        before,
        "{}",
        registry.access_log_summary()
    );
    // Health stays reachable for the operator's probes.
    assert_eq!(
        loopback_client()
            .get(format!("{}/healthz", pg.url()))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

#[test]
fn admin_purge_makes_the_next_pull_go_upstream() {
    let (registry, public, _) = upstream();
    let pg = start(&registry, "");
    let host = pg.host();
    let reference = format!("{host}/reg.test/library/public:v1");
    skopeo_pull(&reference, Platforms::Host, None).verify_image(&public);
    skopeo_pull(&reference, Platforms::Host, None);
    let manifest_gets = || registry.count_requests("GET", "/v2/library/public/manifests/");
    let before = manifest_gets();

    let c = loopback_client();
    // Only the admin action may purge.
    let r = c
        .post(format!(
            "{}/admin/purge?repository=reg.test/library/public",
            pg.url()
        ))
        .basic_auth("alice", Some(PASSWORD))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let stats: Value = serde_json::from_slice(
        &c.get(format!("{}/admin/stats", pg.url()))
            .bearer_auth(ROBOT_TOKEN)
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    assert!(
        stats["by_upstream"]["reg.test"]["hits"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert!(stats["blobs"]["count"].as_u64().unwrap() >= 3, "{stats}");
    let tags: Value = serde_json::from_slice(
        &c.get(format!(
            "{}/admin/tags?repository=reg.test/library/public",
            pg.url()
        ))
        .bearer_auth(ROBOT_TOKEN)
        .send()
        .unwrap()
        .bytes()
        .unwrap(),
    )
    .unwrap();
    assert_eq!(tags["tags"][0]["tag"], "v1", "{tags}");
    let r = c
        .post(format!(
            "{}/admin/purge?repository=reg.test/library/public",
            pg.url()
        ))
        .bearer_auth(ROBOT_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let purged: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    assert!(
        purged["purged"]["tag_records"].as_u64().unwrap() >= 1,
        "{purged}"
    );

    skopeo_pull(&reference, Platforms::Host, None).verify_image(&public);
    assert!(
        poll_until(Duration::from_secs(10), || manifest_gets() > before),
        "the pull after a purge must go upstream"
    );
    // A blob purged by digest is fetched again too.
    let layer = &public.layers[0].digest;
    let blob_gets = || registry.count_requests("GET", &format!("/blobs/{layer}"));
    let b0 = blob_gets();
    let r = c
        .post(format!("{}/admin/purge?digest={layer}", pg.url()))
        .bearer_auth(ROBOT_TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(pg
        .client()
        .get_blob("reg.test/library/public", layer)
        .is_complete_success());
    // The registry writes its access-log line after the response: wait for it (bounded).
    assert!(
        poll_until(Duration::from_secs(10), || blob_gets() == b0 + 1),
        "{}",
        registry.access_log_summary()
    );
}

const PASSWORD_CHECKS: &str = "pullgate_password_checks_total";
const PRIVATE_MANIFEST: &str = "/v2/reg.test/team/private/manifests/v1";

/// Sends `n` requests at once (threads released together), each with Basic `user:password`;
/// returns their statuses. Meanwhile the calling thread asks `/healthz` until the burst is
/// over (and at least once), asserting 200 each time; returns those latencies too.
fn burst_with_healthz(
    pg: &Pullgate,
    n: usize,
    user: &'static str,
    password: &'static str,
) -> (Vec<u16>, Vec<Duration>) {
    let url = format!("{}{PRIVATE_MANIFEST}", pg.url());
    let start = Arc::new(Barrier::new(n + 1));
    let over = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..n)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                let c = loopback_client();
                start.wait();
                c.get(&url)
                    .basic_auth(user, Some(password))
                    .send()
                    .expect("bad login answered")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let health = format!("{}/healthz", pg.url());
    let c = loopback_client();
    start.wait();
    let watcher = {
        let over = over.clone();
        std::thread::spawn(move || {
            let statuses: Vec<u16> = senders
                .into_iter()
                .map(|t| t.join().expect("sender"))
                .collect();
            over.store(true, Ordering::SeqCst);
            statuses
        })
    };
    let mut latencies = Vec::new();
    // Bounded: a burst that never ends fails the test at the sender's own timeout.
    while latencies.is_empty() || !over.load(Ordering::SeqCst) {
        let t = Instant::now();
        let r = c
            .get(&health)
            .send()
            .expect("/healthz answers during the burst");
        latencies.push(t.elapsed());
        assert_eq!(r.status().as_u16(), 200);
    }
    (watcher.join().expect("watcher"), latencies)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn twenty_concurrent_bad_logins_get_429_after_the_limit_and_healthz_keeps_answering() {
    let (registry, _, _) = upstream();
    let pg = start(&registry, "[rate_limit]\nper_ip = \"5/s\"\nburst = 5\n");
    let (statuses, latencies) = burst_with_healthz(&pg, 20, "alice", "wrong");
    let unauthorized = statuses.iter().filter(|&&s| s == 401).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    eprintln!(
        "burst of 20 bad logins: {unauthorized}x 401, {limited}x 429; /healthz {} times, \
         median {:?}, max {:?}",
        latencies.len(),
        median(latencies.clone()),
        latencies.iter().max()
    );
    assert_eq!(unauthorized + limited, 20, "{statuses:?}");
    assert!(limited >= 1, "20 at once against 5/s: {statuses:?}");
    // A refused login costs no password check: each check is one 401.
    assert_eq!(
        pg.metrics().total(PASSWORD_CHECKS) as usize,
        unauthorized,
        "{statuses:?}"
    );
    // Retry-After on registry routes, in the OCI envelope (the bucket may have refilled since
    // the burst; five failures lock the address at the latest).
    let c = loopback_client();
    let r = (0..20)
        .map(|_| {
            c.get(format!("{}{PRIVATE_MANIFEST}", pg.url()))
                .basic_auth("alice", Some("wrong"))
                .send()
                .unwrap()
        })
        .find(|r| r.status().as_u16() == 429)
        .expect("a 429 within 20 sequential bad logins");
    assert!(r.headers().contains_key("retry-after"));
    assert!(String::from_utf8_lossy(&r.bytes().unwrap()).contains("TOOMANYREQUESTS"));
}

#[test]
fn failed_logins_lock_out_across_both_workers() {
    let (registry, _, _) = upstream();
    let pg = start(
        &registry,
        "[server]\nworkers = 2\n[rate_limit]\nlogin_failures = 2\nlockout = \"60s\"\n",
    );
    // Each login on a new connection: the connections alternate between the two threads, so
    // per-thread lockout tables would let two failures through on each.
    let login = |password: &str| {
        loopback_client()
            .get(format!("{}/v2/", pg.url()))
            .header("connection", "close")
            .basic_auth("alice", Some(password))
            .send()
            .expect("GET /v2/")
            .status()
            .as_u16()
    };
    let answers: Vec<u16> = ["wrong", "wrong", "wrong", "wrong", PASSWORD]
        .iter()
        .map(|p| login(p))
        .collect();
    assert_eq!(answers, [401, 401, 429, 429, 429], "{}", pg.log_tail());
    assert_eq!(
        pg.metrics().total(PASSWORD_CHECKS) as usize,
        2,
        "locked logins are not checked"
    );
}

#[test]
fn unknown_names_cost_the_same_verification_as_known_ones() {
    let (registry, _, _) = upstream();
    // No lockouts, no limits: every login is checked, and timed.
    let pg = start(&registry, "[rate_limit]\nlogin_failures = 0\n");
    let c = loopback_client();
    let url = format!("{}{PRIVATE_MANIFEST}", pg.url());
    let time_login = |user: &str| {
        let t = Instant::now();
        let r = c.get(&url).basic_auth(user, Some("wrong")).send().unwrap();
        let took = t.elapsed();
        assert_eq!(r.status().as_u16(), 401, "{user}");
        took
    };
    // Warm up the connection pool and the allocator.
    time_login("alice");
    time_login("nobody");
    let (mut known, mut unknown, mut robot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..15 {
        known.push(time_login("alice"));
        unknown.push(time_login("nobody"));
        robot.push(time_login("robot"));
    }
    let (k, u, r) = (median(known), median(unknown), median(robot));
    eprintln!(
        "median bad-login time: known (argon2 identity) {k:?}, unknown name {u:?}, \
         token-only identity {r:?}; unknown/known = {:.2}",
        u.as_secs_f64() / k.as_secs_f64()
    );
    // The structural property (timing thresholds are not asserted): each login, whatever
    // the name, ran exactly one password verification.
    assert_eq!(pg.metrics().total(PASSWORD_CHECKS) as usize, 2 + 45);
}

#[test]
fn healthz_answers_while_many_password_checks_run() {
    let (registry, _, _) = upstream();
    // No lockouts, no limits: all 40 logins reach argon2, on the bounded blocking pool.
    let pg = start(&registry, "[rate_limit]\nlogin_failures = 0\n");
    let (statuses, latencies) = burst_with_healthz(&pg, 40, "nobody", "wrong");
    assert!(statuses.iter().all(|&s| s == 401), "{statuses:?}");
    assert_eq!(pg.metrics().total(PASSWORD_CHECKS) as usize, 40);
    eprintln!(
        "40 concurrent password checks: /healthz answered {} times, median {:?}, max {:?}",
        latencies.len(),
        median(latencies.clone()),
        latencies.iter().max()
    );
}
