//! End-to-end tests of the build-trigger gateway through the native `pullgate` binary, on
//! loopback: signed webhooks in, a recording HTTP receiver standing in for the build systems
//! and event sinks, Debian's `docker-registry` sending real push notifications, and `skopeo`
//! pushing the image. Retries, dead letters, replay and a restart in the middle of retries.

// The harness is a host, not the core: it reads the real clock for its bounded waits.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::blocking::Response;
use serde_json::{json, Value};
use sha2::Sha256;

use support::fixtures::Image;
use support::http::{loopback_client, RegistryClient};
use support::process::{poll_until, run_bounded};
use support::pullgate::Pullgate;
use support::receiver::Receiver;
use support::registry::Registry;

const SECRET: &str = "webhook-secret-for-tests";
const ADMIN: &str = "admin-token-for-tests";
const GH_TOKEN: &str = "ghp_test_token_never_logged";
const WAIT: Duration = Duration::from_secs(30);

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push_body(branch: &str, commit: &str) -> Vec<u8> {
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000001",
        "after": commit,
        "repository": { "clone_url": "https://github.com/acme/app.git", "full_name": "acme/app" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes()
}

fn github(
    pg: &Pullgate,
    event: &str,
    delivery: &str,
    body: &[u8],
    signature: Option<&str>,
) -> Response {
    let mut req = loopback_client()
        .post(format!("{}/hooks/app", pg.url()))
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(sig) = signature {
        req = req.header("x-hub-signature-256", sig);
    }
    req.send().expect("POST /hooks/app")
}

fn json_of(resp: Response) -> Value {
    let bytes = resp.bytes().expect("body");
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
}

fn admin_get(pg: &Pullgate, path: &str) -> Value {
    let resp = loopback_client()
        .get(format!("{}{path}", pg.url()))
        .bearer_auth(ADMIN)
        .send()
        .expect("admin GET");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    json_of(resp)
}

fn admin_post(pg: &Pullgate, path: &str) -> Value {
    let resp = loopback_client()
        .post(format!("{}{path}", pg.url()))
        .bearer_auth(ADMIN)
        .send()
        .expect("admin POST");
    assert!(resp.status().is_success(), "POST {path}: {}", resp.status());
    json_of(resp)
}

/// Runs the outbox now (deterministic, instead of waiting for the timer).
fn pump(pg: &Pullgate) -> Value {
    admin_post(pg, "/chain/outbox/pump")
}

fn config(receiver: &Receiver, extra: &str) -> String {
    format!(
        r#"
[gateway]
admin_token = "env:PG_ADMIN"
retry_base = "50ms"
retry_max = "200ms"
max_attempts = 3

[[webhook]]
name = "app"
provider = "github"
secret = "env:PG_HOOK_SECRET"

[[target]]
name = "ci"
kind = "github-dispatch"
url = "{r}/repos/acme/app/dispatches"
token = "env:PG_GH_TOKEN"

[[target]]
name = "signed"
kind = "http"
url = "{r}/signed"
secret = "env:PG_HOOK_SECRET"

[[rule]]
webhook = "app"
on = ["push", "tag"]
branches = ["main", "release/*"]
tags = ["v*"]
stage = "build"
target = "ci"
image = "registry.example.com/acme/app:{{branch}}-{{short_sha}}"

{extra}
"#,
        r = receiver.url()
    )
}

fn start(receiver: &Receiver, extra: &str) -> Pullgate {
    Pullgate::builder()
        .config(&config(receiver, extra))
        .env("PG_ADMIN", ADMIN)
        .env("PG_HOOK_SECRET", SECRET)
        .env("PG_GH_TOKEN", GH_TOKEN)
        .start()
}

#[test]
fn signed_github_push_dispatches_exactly_once() {
    let receiver = Receiver::start();
    let pg = start(
        &receiver,
        "[chain]\nstages = [\"build\", \"sign\", \"deploy\"]\n[[stage]]\nname = \"deploy\"\ntarget = \"signed\"\n",
    );
    let body = push_body("main", "0123456789abcdef0123456789abcdef01234567");

    // Refusals first: nothing may reach the receiver.
    assert_eq!(
        github(&pg, "push", "d-0", &body, None).status().as_u16(),
        401,
        "missing signature"
    );
    assert_eq!(
        github(&pg, "push", "d-0", &body, Some(&sign(b"other body")))
            .status()
            .as_u16(),
        401,
        "tampered"
    );
    let bad_json = b"{not json";
    assert_eq!(
        github(&pg, "push", "d-0", bad_json, Some(&sign(bad_json)))
            .status()
            .as_u16(),
        400
    );
    let ping = br#"{"zen":"Design for failure."}"#;
    let r = github(&pg, "ping", "d-ping", ping, Some(&sign(ping)));
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(json_of(r)["status"], "ignored");

    // The push.
    let r = github(&pg, "push", "d-1", &body, Some(&sign(&body)));
    assert_eq!(r.status().as_u16(), 202);
    let reply: Value = json_of(r);
    assert_eq!(reply["status"], "accepted", "{reply}");
    let run_id = reply["runs"][0].as_str().expect("a run").to_string();
    assert!(poll_until(WAIT, || !receiver
        .requests_to("/repos/acme/app/dispatches")
        .is_empty()));

    // The same delivery again, and a push to an unmatched branch: no more dispatches.
    let r = github(&pg, "push", "d-1", &body, Some(&sign(&body)));
    assert_eq!(json_of(r)["status"], "duplicate");
    let other = push_body("feature/x", "1111111111111111111111111111111111111111");
    let r = github(&pg, "push", "d-2", &other, Some(&sign(&other)));
    assert_eq!(json_of(r)["reason"], "no rule matched");
    pump(&pg);
    let dispatches = receiver.requests_to("/repos/acme/app/dispatches");
    assert_eq!(dispatches.len(), 1, "{dispatches:?}");

    // Its shape: repository_dispatch with at most 10 top-level client_payload keys.
    let d = &dispatches[0];
    assert_eq!(d.method, "POST");
    assert_eq!(d.header("authorization"), format!("Bearer {GH_TOKEN}"));
    assert_eq!(d.header("accept"), "application/vnd.github+json");
    let v = d.json();
    assert_eq!(v["event_type"], "pullgate-build");
    let p = &v["client_payload"];
    assert!(p.as_object().unwrap().len() <= 10);
    assert_eq!(p["run"], run_id.as_str());
    assert_eq!(p["commit"], "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(p["ref"], "refs/heads/main");
    assert_eq!(p["image"], "registry.example.com/acme/app:main-0123456");
    let token = p["token"].as_str().unwrap().to_string();
    assert!(p["callback"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/chain/{run_id}/build")));

    // The build system posts its result back with its stage's token; a wrong token is refused,
    // and so is the build token for another stage.
    let post = |token: &str, stage: &str, status: &str| {
        loopback_client()
            .post(format!("{}/chain/{run_id}/{stage}", pg.url()))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(json!({ "status": status, "detail": "ok" }).to_string())
            .send()
            .unwrap()
    };
    assert_eq!(post("wrong", "build", "succeeded").status().as_u16(), 401);
    assert_eq!(
        post(&token, "deploy", "succeeded").status().as_u16(),
        401,
        "the build token is not deploy's"
    );
    assert_eq!(post(&token, "build", "succeeded").status().as_u16(), 200);
    let run = admin_get(&pg, &format!("/chain/{run_id}"));
    assert_eq!(run["stages"][0]["status"], "succeeded");
    assert_eq!(run["stages"][1]["status"], "skipped", "sign has no target");
    assert_eq!(run["stages"][2]["status"], "running");
    // deploy goes to the signed `http` target: the receiver can verify pullgate.
    assert!(poll_until(WAIT, || !receiver
        .requests_to("/signed")
        .is_empty()));
    let d = &receiver.requests_to("/signed")[0];
    assert_eq!(d.header("x-pullgate-signature"), sign(&d.body));
    assert_eq!(d.json()["payload"]["stage"], "deploy");
    let deploy_token = d.json()["payload"]["token"].as_str().unwrap().to_string();
    assert_ne!(deploy_token, token);
    assert_eq!(post(&token, "deploy", "succeeded").status().as_u16(), 401);
    assert_eq!(
        post(&deploy_token, "deploy", "succeeded").status().as_u16(),
        200
    );
    let run = admin_get(&pg, &format!("/chain/{run_id}"));
    assert_eq!(run["status"], "succeeded");
    // Runs are listed by repository and commit.
    let listed = admin_get(&pg, "/chain?repository=https://github.com/acme/app.git&commit=0123456789abcdef0123456789abcdef01234567");
    assert_eq!(listed["runs"][0]["id"], run_id.as_str());
    // Admin routes need the admin token.
    let r = loopback_client()
        .get(format!("{}/chain/{run_id}", pg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // No secret in the log.
    let log = pg.log_tail();
    assert!(
        !log.contains(GH_TOKEN) && !log.contains(SECRET) && !log.contains(ADMIN),
        "{log}"
    );
}

#[test]
fn replayed_signed_push_with_a_new_delivery_id_reaches_no_receiver() {
    let receiver = Receiver::start();
    let pg = start(&receiver, "[chain]\nstages = [\"build\"]\n");
    let body = push_body("main", "6666666666666666666666666666666666666666");
    let sig = sign(&body);
    let r = github(&pg, "push", "d-original", &body, Some(&sig));
    assert_eq!(json_of(r)["status"], "accepted");
    assert!(poll_until(WAIT, || !receiver
        .requests_to("/repos/acme/app/dispatches")
        .is_empty()));
    // An attacker who captured the delivery replays it: the signature still matches (it
    // covers the body only), the delivery id is new.
    for n in 0..3 {
        let r = github(&pg, "push", &format!("d-replay-{n}"), &body, Some(&sig));
        assert_eq!(r.status().as_u16(), 200, "duplicates answer 2xx");
        assert_eq!(json_of(r)["status"], "duplicate");
    }
    pump(&pg);
    assert_eq!(
        receiver.requests_to("/repos/acme/app/dispatches").len(),
        1,
        "the receiver got nothing new"
    );
    assert_eq!(receiver.requests().len(), 1);
}

#[test]
fn oversized_webhook_is_refused_with_413() {
    let receiver = Receiver::start();
    let pg = start(&receiver, "[chain]\nstages = [\"build\"]\n");
    let big = vec![b' '; 26 << 20];
    // Refused from its Content-Length, before the body is read, while the sender is still
    // writing: the sender must read the 413, not a broken pipe or a reset (`github` panics on
    // a transport error). Several times, as a lost answer was a race.
    for _ in 0..3 {
        let r = github(&pg, "push", "big", &big, Some("sha256=00"));
        assert_eq!(r.status().as_u16(), 413);
        assert_eq!(
            r.headers().get("connection").and_then(|v| v.to_str().ok()),
            Some("close")
        );
    }
}

#[test]
fn failing_receiver_gets_the_event_on_the_third_attempt() {
    let receiver = Receiver::start();
    receiver.fail_next(2);
    let pg = start(&receiver, "[chain]\nstages = [\"build\"]\n");
    let body = push_body("release/1.2", "2222222222222222222222222222222222222222");
    let r = github(&pg, "push", "d-retry", &body, Some(&sign(&body)));
    let run_id = json_of(r)["runs"][0].as_str().unwrap().to_string();
    assert!(poll_until(WAIT, || receiver
        .requests_to("/repos/acme/app/dispatches")
        .len()
        >= 3));
    let got = receiver.requests_to("/repos/acme/app/dispatches");
    assert_eq!(
        got.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![503, 503, 200]
    );
    assert!(
        got.windows(2).all(|w| w[0].body == w[1].body),
        "the same delivery each time"
    );
    // The receiver answered the third attempt before the pass that sent it recorded it (and
    // a pump request returns at once while a pass runs): wait for the record, bounded.
    assert!(
        poll_until(WAIT, || admin_get(&pg, &format!("/chain/{run_id}"))
            ["stages"][0]["attempts"]
            == 3),
        "{}",
        admin_get(&pg, &format!("/chain/{run_id}"))
    );
    pump(&pg);
    assert_eq!(
        receiver.requests_to("/repos/acme/app/dispatches").len(),
        3,
        "nothing after success"
    );
    let run = admin_get(&pg, &format!("/chain/{run_id}"));
    assert_eq!(run["stages"][0]["attempts"], 3);
    assert_eq!(
        run["stages"][0]["status"], "running",
        "accepted by the target, awaiting its result"
    );
}

#[test]
fn never_succeeding_receiver_ends_in_dead_letters_and_replay_delivers() {
    let receiver = Receiver::start();
    receiver.fail_next(u32::MAX);
    let pg = start(&receiver, "[chain]\nstages = [\"build\"]\n");
    let body = push_body("main", "3333333333333333333333333333333333333333");
    let r = github(&pg, "push", "d-dead", &body, Some(&sign(&body)));
    let run_id = json_of(r)["runs"][0].as_str().unwrap().to_string();
    assert!(poll_until(WAIT, || admin_get(&pg, "/chain/dead-letters")
        ["dead_letters"]
        .as_array()
        .is_some_and(|a| !a.is_empty())));
    assert_eq!(
        receiver.requests_to("/repos/acme/app/dispatches").len(),
        3,
        "max_attempts"
    );
    // The pass records the dead letter, then the run's failure: wait for both, bounded.
    assert!(
        poll_until(WAIT, || admin_get(&pg, &format!("/chain/{run_id}"))
            ["status"]
            == "failed"),
        "{}",
        admin_get(&pg, &format!("/chain/{run_id}"))
    );
    let dead = admin_get(&pg, "/chain/dead-letters");
    let id = dead["dead_letters"][0]["id"].as_str().unwrap().to_string();
    assert!(dead["dead_letters"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("503"));

    receiver.fail_next(0);
    admin_post(&pg, &format!("/chain/dead-letters/{id}/replay"));
    assert!(poll_until(WAIT, || receiver
        .requests_to("/repos/acme/app/dispatches")
        .iter()
        .any(|r| r.status == 200)));
    assert!(admin_get(&pg, "/chain/dead-letters")["dead_letters"]
        .as_array()
        .unwrap()
        .is_empty());
    let run = admin_get(&pg, &format!("/chain/{run_id}"));
    assert_eq!(run["status"], "running");
}

#[test]
fn a_pending_delivery_survives_a_restart() {
    let receiver = Receiver::start();
    receiver.fail_next(u32::MAX);
    // Slow retries, many attempts: the delivery is still pending when pullgate stops.
    let mut pg = Pullgate::builder()
        .config(
            &config(&receiver, "[chain]\nstages = [\"build\"]\n")
                .replace("retry_base = \"50ms\"", "retry_base = \"1s\"")
                .replace("retry_max = \"200ms\"", "retry_max = \"1s\"")
                .replace("max_attempts = 3", "max_attempts = 50"),
        )
        .env("PG_ADMIN", ADMIN)
        .env("PG_HOOK_SECRET", SECRET)
        .env("PG_GH_TOKEN", GH_TOKEN)
        .start();
    let body = push_body("main", "4444444444444444444444444444444444444444");
    let r = github(&pg, "push", "d-restart", &body, Some(&sign(&body)));
    assert_eq!(r.status().as_u16(), 202);
    assert!(poll_until(WAIT, || !receiver
        .requests_to("/repos/acme/app/dispatches")
        .is_empty()));
    pg.stop();
    receiver.fail_next(0);
    pg.start();
    assert!(poll_until(WAIT, || receiver
        .requests_to("/repos/acme/app/dispatches")
        .iter()
        .any(|r| r.status == 200)));
}

#[test]
fn registry_push_advances_build_prewarms_the_cache_and_publishes() {
    let receiver = Receiver::start();
    // The registry notifies pullgate; pullgate listens on a port we learn after it starts, so
    // start pullgate first with the upstream's port reserved.
    let reg_port = support::process::free_port();
    let reg_url = format!("http://127.0.0.1:{reg_port}");
    // With authentication on, the token realm is public_url's: pullgate's own address.
    let pg_port = support::process::free_port();
    let extra = format!(
        r#"
[[webhook]]
name = "registry"
provider = "distribution"
secret = "env:PG_REGISTRY_AUTH"

[[target]]
name = "events"
kind = "cloudevents"
url = "{r}/events"

[chain]
stages = ["build", "distribute"]
events = "events"

# The mirror requires authentication: pre-warming is pullgate's own pull and must not need it.
[auth]
enabled = true
token_secret = "env:PG_HOOK_SECRET"
public_url = "http://127.0.0.1:{pg_port}"

[[identity]]
name = "puller"
token = "env:PG_PULLER_TOKEN"

[[access]]
who = ["puller"]
actions = ["pull"]
"#,
        r = receiver.url()
    );
    let cfg = config(&receiver, &extra).replace(
        "image = \"registry.example.com/acme/app:{branch}-{short_sha}\"",
        "image = \"reg.test/acme/app:{branch}-{short_sha}\"",
    );
    let pg = Pullgate::builder()
        .port(pg_port)
        .config(&cfg)
        .upstream("reg.test", &reg_url)
        .env("PG_ADMIN", ADMIN)
        .env("PG_HOOK_SECRET", SECRET)
        .env("PG_GH_TOKEN", GH_TOKEN)
        .env("PG_REGISTRY_AUTH", "Bearer registry-notification-secret")
        .env("PG_PULLER_TOKEN", "puller-token")
        .start();
    let registry = Registry::start_with_notifications_on(
        reg_port,
        &format!("{}/hooks/registry", pg.url()),
        "Bearer registry-notification-secret",
    );

    let commit = "5555555555555555555555555555555555555555";
    let body = push_body("main", commit);
    let r = github(&pg, "push", "d-reg", &body, Some(&sign(&body)));
    let run_id = json_of(r)["runs"][0].as_str().unwrap().to_string();
    assert!(poll_until(WAIT, || !receiver
        .requests_to("/repos/acme/app/dispatches")
        .is_empty()));

    // "CI" builds and pushes the image with skopeo.
    let image = Image::oci(77, &[16 << 10, 200 << 10]);
    registry.push_image("staging/app", "built", &image);
    let tag = format!("main-{}", &commit[..7]);
    let out = run_bounded(
        {
            let mut c = std::process::Command::new("skopeo");
            c.args([
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                &format!("docker://{}/staging/app:built", registry.host()),
                &format!("docker://{}/acme/app:{tag}", registry.host()),
            ]);
            c
        },
        Duration::from_secs(120),
    )
    .expect("skopeo copy");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The notification finishes build; distribute pre-warms; artifact.published goes out.
    assert!(
        poll_until(WAIT, || admin_get(&pg, &format!("/chain/{run_id}"))
            ["status"]
            == "succeeded"),
        "{}",
        admin_get(&pg, &format!("/chain/{run_id}"))
    );
    let run = admin_get(&pg, &format!("/chain/{run_id}"));
    assert_eq!(run["digest"], image.digest());
    assert_eq!(run["stages"][1]["status"], "succeeded");
    // pullgate fetched every layer from the upstream before any client pulled through it.
    for blob in image.blobs() {
        assert!(
            registry.count_requests("GET", &format!("/v2/acme/app/blobs/{}", blob.digest)) >= 1,
            "{}",
            registry.access_log_summary()
        );
    }
    assert!(poll_until(WAIT, || receiver
        .requests_to("/events")
        .iter()
        .any(
            |r| r.header("ce-type") == "dev.cdevents.artifact.published.0.2.0"
        )));
    let published: Vec<_> = receiver
        .requests_to("/events")
        .into_iter()
        .filter(|r| r.header("ce-type") == "dev.cdevents.artifact.published.0.2.0")
        .collect();
    let e = &published[0];
    assert_eq!(e.header("ce-specversion"), "1.0");
    assert!(!e.header("ce-id").is_empty());
    let v = e.json();
    // CDEvents v0.4 closes subject.content: pullgate's own fields are in customData, and an
    // artifact's subject id is its purl.
    assert_eq!(v["subject"]["type"], "artifact");
    assert_eq!(v["customData"]["image"], format!("reg.test/acme/app:{tag}"));
    assert!(v["subject"]["id"]
        .as_str()
        .unwrap()
        .starts_with("pkg:oci/app@sha256%3A"));
    // A warm pull now costs the upstream no blob transfer.
    let before = registry.blob_requests();
    let client = RegistryClient::new(&pg.url(), Some(("puller", "puller-token")));
    assert!(
        !pg.client()
            .get_blob("reg.test/acme/app", &image.blobs()[0].digest)
            .is_complete_success(),
        "anonymous is refused"
    );
    for blob in image.blobs() {
        let got = client.get_blob("reg.test/acme/app", &blob.digest);
        assert!(got.is_complete_success());
    }
    assert_eq!(registry.blob_requests(), before);
}
