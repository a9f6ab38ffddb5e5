//! The gateway through its ports: in-memory stores, a manual clock, and a counting target
//! host ([`FakeTarget`]) that records every request and answers a scripted status, so each
//! delivery, retry, replay, callback and outbox behaviour is asserted by what reached the
//! targets. Deferred work is dropped: every outbox pass is started by the test.

use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::Body;
use pullgate::core::config::{parse_config, ConfigError, Secret, SecretResolver, Settings};
use pullgate::core::gateway::outbox::{DEAD, PENDING};
use pullgate::core::gateway::pump::{DUE, PER_TARGET};
use pullgate::core::gateway::{replay, PumpReport};
use pullgate::core::ports::{BodyError, ByteStream, Clock, KvStore, Ports};
use pullgate::testing::{DroppedDeferred, FakeTarget, ManualClock, MemBlobStore, MemKv};
use serde_json::{json, Value};
use sha2::Sha256;
use std::future::Future;
use std::rc::Rc;

const HOOK_SECRET: &str = "hook-secret";
const ADMIN: &str = "admin-token";
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

struct Secrets;
impl SecretResolver for Secrets {
    fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
        match r {
            "env:HOOK" => Ok(Secret::new(HOOK_SECRET.into())),
            "env:ADMIN" => Ok(Secret::new(ADMIN.into())),
            _ => Err(ConfigError(format!("{r} unset"))),
        }
    }
}

struct Harness {
    app: App,
    targets: Rc<FakeTarget>,
    clock: Rc<ManualClock>,
    kv: Rc<MemKv>,
    /// What a restarted instance would be built from.
    rebuild: (Settings, Ports),
}

/// A gateway with two targets (`a.test`, `b.test`), two attempts per delivery unless `extra`
/// (more `[gateway]` keys) says otherwise.
fn harness(extra: &str) -> Harness {
    let extra = if extra.contains("max_attempts") {
        extra.to_string()
    } else {
        format!("max_attempts = 2\n{extra}")
    };
    let config = parse_config(&format!(
        r#"
        builtin_upstreams = false
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true

        [gateway]
        admin_token = "env:ADMIN"
        {extra}

        [[webhook]]
        name = "app"
        provider = "github"
        secret = "env:HOOK"

        [[webhook]]
        name = "lab"
        provider = "gitlab"
        secret = "env:HOOK"

        [[target]]
        name = "a"
        kind = "http"
        url = "http://a.test/hook"
        secret = "env:HOOK"

        [[target]]
        name = "b"
        kind = "http"
        url = "http://b.test/hook"
        secret = "env:HOOK"

        [chain]
        stages = ["build", "scan", "sign"]

        [[stage]]
        name = "scan"
        target = "b"

        [[stage]]
        name = "sign"
        target = "b"

        [[rule]]
        webhook = "app"
        on = ["push"]
        branches = ["main"]
        stage = "build"
        target = "a"

        [[rule]]
        webhook = "app"
        on = ["push"]
        branches = ["b-*"]
        stage = "build"
        target = "b"

        [[rule]]
        webhook = "lab"
        on = ["push"]
        branches = ["main"]
        stage = "build"
        target = "a"
        "#
    ))
    .unwrap();
    let settings = config.resolve(&Secrets).unwrap();
    let targets = Rc::new(FakeTarget::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let kv = Rc::new(MemKv::default());
    let ports = Ports {
        upstream: targets.clone(),
        kv: kv.clone(),
        blobs: Rc::new(MemBlobStore::default()),
        clock: clock.clone(),
        deferred: Rc::new(DroppedDeferred),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(settings.clone(), ports.clone()),
        targets,
        clock,
        kv,
        rebuild: (settings, ports),
    }
}

fn run<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(f);
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push_body(branch: &str, commit: &str, before: &str) -> Vec<u8> {
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": before,
        "after": commit,
        "repository": { "clone_url": "https://github.com/acme/app.git" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes()
}

fn commit(n: u32) -> String {
    format!("{n:040x}")
}

fn one_shot(body: Vec<u8>) -> ByteStream {
    futures_util::stream::iter([Ok(Bytes::from(body))]).boxed_local()
}

async fn answer(resp: Response<Body>) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = match resp.into_body() {
        Body::Bytes(b) => b,
        Body::Empty => Bytes::new(),
        _ => panic!("gateway answers are small JSON bodies"),
    };
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

impl Harness {
    async fn github(&self, delivery: &str, body: &[u8]) -> (StatusCode, Value) {
        let req = Request::post("/hooks/app")
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign(body))
            .body(())
            .unwrap();
        answer(
            self.app
                .handle_with_body(&req, one_shot(body.to_vec()))
                .await,
        )
        .await
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let body = one_shot(body.to_string().into_bytes());
        answer(self.app.handle_with_body(&req, body).await).await
    }

    async fn pump(&self) -> PumpReport {
        self.app.pump_outbox().await
    }

    async fn run_json(&self, id: &str) -> Value {
        let (status, v) = self
            .call("GET", &format!("/chain/{id}"), ADMIN, json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    fn list(&self, prefix: &str) -> Vec<String> {
        futures_util::FutureExt::now_or_never(KvStore::list(self.kv.as_ref(), prefix, usize::MAX))
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    fn keys(&self, prefix: &str) -> usize {
        self.list(prefix).len()
    }

    /// A new instance over the same stores (a restart).
    fn restart(&mut self) {
        self.app = App::new(self.rebuild.0.clone(), self.rebuild.1.clone());
    }
}

/// The stage token a dispatch carried.
fn token_of(dispatch: &Value) -> String {
    dispatch["payload"]["token"].as_str().unwrap().to_string()
}

#[test]
fn replayed_github_push_with_a_new_delivery_id_dispatches_nothing() {
    run(async {
        let h = harness("");
        let body = push_body("main", &commit(1), &commit(0));
        let (status, v) = h.github("d-1", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::ACCEPTED, Some("accepted"))
        );
        h.pump().await;
        assert_eq!(h.targets.to("a.test").len(), 1);
        let pending = h.keys(PENDING);

        // A fresh delivery id does not make it new.
        let (status, v) = h.github("d-2", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{v}"
        );
        assert_eq!(h.keys(PENDING), pending, "nothing enqueued");
        h.pump().await;
        assert_eq!(h.targets.to("a.test").len(), 1, "nothing dispatched");

        // Long after the delivery-id window (72h), and after the body window (30d) was swept:
        // still a duplicate, by the commit's runs.
        h.clock.advance(73 * HOUR);
        h.pump().await;
        let (status, v) = h.github("d-3", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{v}"
        );
        h.clock.advance(31 * DAY);
        h.pump().await;
        assert_eq!(
            h.keys("replay/"),
            0,
            "the body record was swept after its window"
        );
        let (status, v) = h.github("d-4", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{v}"
        );
        assert!(v["runs"].as_array().is_some_and(|r| r.len() == 1), "{v}");
        h.pump().await;
        assert_eq!(h.targets.to("a.test").len(), 1, "nothing dispatched");
    });
}

#[test]
fn a_second_push_for_the_same_commit_starts_no_new_run() {
    run(async {
        let h = harness("");
        let first = push_body("main", &commit(7), &commit(6));
        let (_, v) = h.github("d-1", &first).await;
        assert_eq!(v["status"], "accepted");
        // Another body (the commit pushed again, from another base) is not a replay of the
        // first, but the commit already has its run.
        let again = push_body("main", &commit(7), &commit(5));
        let (status, v) = h.github("d-2", &again).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{v}"
        );
        // A new commit still starts a run.
        let next = push_body("main", &commit(8), &commit(7));
        let (status, v) = h.github("d-3", &next).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::ACCEPTED, Some("accepted"))
        );
        h.pump().await;
        assert_eq!(h.targets.to("a.test").len(), 2);
    });
}

#[test]
fn a_signed_timestamp_delivery_is_deduplicated_inside_its_window() {
    run(async {
        use base64::Engine as _;
        let h = harness("");
        let body = br#"{"object_kind":"push","ref":"refs/heads/main","checkout_sha":"abc","project":{"git_http_url":"https://gitlab.example/acme/app.git"}}"#;
        let lab = |id: &str, now_ms: u64| {
            let ts = (now_ms / 1000).to_string();
            let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
            mac.update(format!("{id}.{ts}.").as_bytes());
            mac.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            Request::post("/hooks/lab")
                .header("x-gitlab-event", "Push Hook")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts)
                .header("webhook-signature", format!("v1,{sig}"))
                .body(())
                .unwrap()
        };
        let now = h.clock.now_ms();
        let req = lab("msg_1", now);
        let (_, v) = answer(h.app.handle_with_body(&req, one_shot(body.to_vec())).await).await;
        assert_eq!(v["status"], "accepted");
        // The same signed delivery again, inside the tolerance: a duplicate.
        let (status, v) = answer(h.app.handle_with_body(&req, one_shot(body.to_vec())).await).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate"))
        );
        // After the tolerance its signature is stale: refused before any dedup question.
        h.clock.advance(10 * 60_000);
        let (status, _) = answer(h.app.handle_with_body(&req, one_shot(body.to_vec())).await).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    });
}

#[test]
fn a_stage_token_is_good_for_its_own_stage_and_attempt_only() {
    run(async {
        let h = harness("");
        h.targets.answer("a.test", 503);
        let body = push_body("main", &commit(1), &commit(0));
        let (_, v) = h.github("d-1", &body).await;
        let id = v["runs"][0].as_str().unwrap().to_string();
        // Two failed attempts: dead-lettered, the run failed.
        h.pump().await;
        h.clock.advance(HOUR);
        h.pump().await;
        assert_eq!(h.keys(DEAD), 1);
        let first = h.targets.to("a.test");
        assert_eq!(first.len(), 2);
        assert_eq!(
            token_of(&first[0]),
            token_of(&first[1]),
            "retries carry one token"
        );
        let old = token_of(&first[0]);

        // An admin replays the dead letter: build runs again, as attempt 2.
        h.targets.heal();
        let (status, dead) = h.call("GET", "/chain/dead-letters", ADMIN, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let dl = dead["dead_letters"][0]["id"].as_str().unwrap().to_string();
        let path = format!("/chain/dead-letters/{dl}/replay");
        assert_eq!(
            h.call("POST", &path, "nope", json!({})).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            h.call("POST", &path, ADMIN, json!({})).await.0,
            StatusCode::ACCEPTED
        );
        h.pump().await;
        let all = h.targets.to("a.test");
        assert_eq!(all.len(), 3, "the replay was delivered");
        let build = token_of(&all[2]);
        assert_ne!(build, old);

        let result = |digest: &str| json!({ "status": "succeeded", "digest": digest });
        let d1 = format!("sha256:{}", "1".repeat(64));
        let d2 = format!("sha256:{}", "2".repeat(64));
        let build_path = format!("/chain/{id}/build");
        let scan_path = format!("/chain/{id}/scan");
        // The first attempt's token is no longer good; the build token cannot post scan.
        let (status, _) = h.call("POST", &build_path, &old, result(&d1)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = h.call("POST", &scan_path, &build, result(&d1)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, v) = h.call("POST", &build_path, &build, result(&d1)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["digest"], d1.as_str());
        // Once build finished, the build token cannot post sign either, nor build again.
        let (status, _) = h
            .call("POST", &format!("/chain/{id}/sign"), &build, result(&d2))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = h.call("POST", &build_path, &build, result(&d2)).await;
        assert_eq!(status, StatusCode::CONFLICT);

        // scan's own token cannot replace the digest; it can post its result.
        h.pump().await;
        let scan = token_of(h.targets.to("b.test").last().unwrap());
        let (status, v) = h.call("POST", &scan_path, &scan, result(&d2)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        let (status, v) = h.call("POST", &scan_path, &scan, result(&d1)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(h.run_json(&id).await["digest"], d1.as_str());
        // Only an admin can change it.
        let digest_path = format!("/chain/{id}/digest");
        let (status, _) = h
            .call("PUT", &digest_path, &scan, json!({ "digest": d2 }))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, v) = h
            .call("PUT", &digest_path, ADMIN, json!({ "digest": d2 }))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(h.run_json(&id).await["digest"], d2.as_str());
    });
}

#[test]
fn backed_off_deliveries_to_one_target_do_not_starve_another() {
    run(async {
        let h = harness("");
        h.targets.answer("a.test", 503);
        for n in 1..=150 {
            let body = push_body("main", &commit(n), &commit(0));
            let (_, v) = h.github(&format!("a-{n}"), &body).await;
            assert_eq!(v["status"], "accepted");
        }
        // Each gets its first attempt, a bounded number per pass; then all are backed off.
        let mut passes = 0;
        while h.targets.to("a.test").len() < 150 {
            let r = h.pump().await;
            assert!(r.attempted as usize <= PER_TARGET, "{r:?}");
            passes += 1;
            assert!(
                passes <= 150 / PER_TARGET + 1,
                "every delivery gets its turn"
            );
        }
        assert_eq!(h.keys(PENDING), 150, "all 150 backed off, none dead");

        let b = push_body("b-1", &commit(999), &commit(0));
        let (_, v) = h.github("b-1", &b).await;
        assert_eq!(v["status"], "accepted");
        let r = h.pump().await;
        assert_eq!(r.delivered, 1, "{r:?}");
        assert_eq!(h.targets.to("b.test").len(), 1, "B went out at once");
        assert_eq!(h.targets.to("a.test").len(), 150, "A's are not due yet");

        // Now A's retries are all due, queued before B's next delivery: B still goes out in
        // the first pass, as one target takes at most PER_TARGET attempts of it.
        h.clock.advance(HOUR);
        let b2 = push_body("b-2", &commit(998), &commit(0));
        h.github("b-2", &b2).await;
        let r = h.pump().await;
        assert_eq!(h.targets.to("b.test").len(), 2, "{r:?}");
        assert_eq!(h.targets.to("a.test").len(), 150 + PER_TARGET);
        // The index holds one entry per pending record.
        assert_eq!(h.keys(DUE), h.keys(PENDING));
    });
}

#[test]
fn webhook_bodies_in_memory_are_capped_with_503_and_retry_after() {
    run(async {
        let h = harness("max_inflight_bodies = 2");
        // Two senders that never finish their bodies hold both slots.
        let req = Request::post("/hooks/app")
            .header("x-github-event", "push")
            .header("x-hub-signature-256", "sha256=00")
            .body(())
            .unwrap();
        let stalled = || futures_util::stream::pending::<Result<Bytes, BodyError>>().boxed_local();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut one = Box::pin(h.app.handle_with_body(&req, stalled()));
        let mut two = Box::pin(h.app.handle_with_body(&req, stalled()));
        assert!(one.as_mut().poll(&mut cx).is_pending());
        assert!(two.as_mut().poll(&mut cx).is_pending());
        let resp = h.app.handle_with_body(&req, stalled()).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["retry-after"], "1");
        // A slot frees when its request ends.
        drop(one);
        let body = push_body("main", &commit(1), &commit(0));
        let (status, _) = h.github("d-1", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        drop(two);
    });
}

#[test]
fn an_admin_replay_still_redelivers_for_a_commit_that_has_a_run() {
    run(async {
        let h = harness("");
        h.targets.answer("a.test", 503);
        let body = push_body("main", &commit(3), &commit(2));
        h.github("d-1", &body).await;
        h.pump().await;
        h.clock.advance(HOUR);
        h.pump().await;
        assert_eq!(h.keys(DEAD), 1);
        // The sender's own retry (or an attacker's replay) starts nothing.
        let (status, v) = h.github("d-2", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate"))
        );
        h.pump().await;
        assert_eq!(h.targets.to("a.test").len(), 2);
        // The admin's replay does.
        h.targets.heal();
        let (_, dead) = h.call("GET", "/chain/dead-letters", ADMIN, json!({})).await;
        let dl = dead["dead_letters"][0]["id"].as_str().unwrap().to_string();
        let path = format!("/chain/dead-letters/{dl}/replay");
        assert_eq!(
            h.call("POST", &path, ADMIN, json!({})).await.0,
            StatusCode::ACCEPTED
        );
        let r = h.pump().await;
        assert_eq!(r.delivered, 1, "{r:?}");
        assert_eq!(h.targets.to("a.test").len(), 3);
    });
}

#[test]
fn records_from_before_the_indexes_are_indexed_once_and_then_delivered_and_swept() {
    run(async {
        let mut h = harness("");
        let body = push_body("main", &commit(4), &commit(3));
        h.github("d-1", &body).await;
        // Make the store look like an older version's: no index entries, no marker, and a
        // delivery-id dedup record written the old way.
        for k in h.list(DUE).into_iter().chain(h.list(replay::SEEN)) {
            KvStore::delete(h.kv.as_ref(), &k).await.unwrap();
        }
        let kv: &dyn KvStore = h.kv.as_ref();
        let old = h.clock.now_ms().to_string();
        kv.put("dedup/app/0123", old.as_bytes()).await.unwrap();
        assert_eq!(h.keys(DUE), 0);
        h.restart();
        let r = h.pump().await;
        assert_eq!(r.delivered, 1, "the legacy pending record was found: {r:?}");
        assert_eq!(h.targets.to("a.test").len(), 1);
        assert_eq!(h.keys(PENDING), 0);
        assert_eq!(h.keys(DUE), 0);
        // The old dedup record leaves with its window.
        h.clock.advance(73 * HOUR);
        h.pump().await;
        assert_eq!(h.keys("dedup/"), 0);
    });
}

/// The run ids a webhook answer names.
fn runs_of(v: &Value) -> Vec<String> {
    v["runs"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_delivery_reaches_its_target_once() {
    run(async {
        let h = harness("");
        let body = push_body("main", &commit(1), &commit(0));
        let (status, v) = h.github("d-1", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        let run = runs_of(&v).pop().unwrap();
        let r = h.pump().await;
        assert_eq!((r.attempted, r.delivered, r.retrying, r.dead), (1, 1, 0, 0));
        let sent = h.targets.delivered();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].host, "a.test");
        assert!(sent[0].headers.contains_key("x-pullgate-signature"));
        let payload = &sent[0].json()["payload"];
        assert_eq!(
            (payload["run"].as_str(), payload["stage"].as_str()),
            (Some(run.as_str()), Some("build"))
        );
        // Nothing is left to send, however much later the next pass runs.
        assert_eq!((h.keys(PENDING), h.keys(DUE), h.keys(DEAD)), (0, 0, 0));
        assert_eq!(h.app.next_delivery_due().await, None);
        h.clock.advance(DAY);
        let r = h.pump().await;
        assert_eq!(r.attempted, 0, "{r:?}");
        assert_eq!(h.targets.count("a.test"), 1);
        assert_eq!(h.run_json(&run).await["stages"][0]["status"], "running");
    });
}

#[test]
fn a_failing_target_is_retried_with_backoff_and_dead_lettered_after_the_configured_attempts() {
    run(async {
        let h = harness("max_attempts = 3\nretry_base = \"10s\"\nretry_max = \"1m\"");
        h.targets.answer("a.test", 503);
        let body = push_body("main", &commit(1), &commit(0));
        let (_, v) = h.github("d-1", &body).await;
        let run = runs_of(&v).pop().unwrap();

        let r = h.pump().await;
        assert_eq!((r.attempted, r.retrying), (1, 1), "{r:?}");
        // The first retry waits base·[½, 1).
        let wait = h.app.next_delivery_due().await.unwrap() - h.clock.now_ms();
        assert!((5_000..10_000).contains(&wait), "{wait}");
        h.clock.advance(wait - 1);
        assert_eq!(h.pump().await.attempted, 0, "not due yet");
        assert_eq!(h.targets.count("a.test"), 1);
        h.clock.advance(1);
        let r = h.pump().await;
        assert_eq!((r.attempted, r.retrying), (1, 1), "{r:?}");
        assert_eq!(h.targets.count("a.test"), 2);
        // The second waits twice as long.
        let wait = h.app.next_delivery_due().await.unwrap() - h.clock.now_ms();
        assert!((10_000..20_000).contains(&wait), "{wait}");
        h.clock.advance(wait);
        let r = h.pump().await;
        assert_eq!((r.attempted, r.dead), (1, 1), "{r:?}");
        assert_eq!(h.targets.count("a.test"), 3);
        assert_eq!((h.keys(PENDING), h.keys(DUE), h.keys(DEAD)), (0, 0, 1));

        // Dead-lettered: never sent again, recorded for a person to inspect, the run failed.
        h.clock.advance(DAY);
        assert_eq!(h.pump().await.attempted, 0);
        assert_eq!(h.targets.count("a.test"), 3);
        let (_, dead) = h.call("GET", "/chain/dead-letters", ADMIN, json!({})).await;
        let letter = &dead["dead_letters"][0];
        assert_eq!(letter["attempts"], 3, "{dead}");
        assert_eq!(
            letter["last_error"],
            "target answered 503 Service Unavailable"
        );
        let v = h.run_json(&run).await;
        assert_eq!(v["status"], "failed", "{v}");
    });
}

#[test]
fn a_webhook_delivered_twice_starts_one_run_and_one_dispatch() {
    run(async {
        let h = harness("");
        let body = push_body("main", &commit(2), &commit(1));
        let (status, v) = h.github("d-1", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        // The sender retries the very same delivery.
        let (status, v) = h.github("d-1", &body).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{v}"
        );
        let r = h.pump().await;
        assert_eq!(r.delivered, 1, "{r:?}");
        assert_eq!(h.targets.count("a.test"), 1);
        assert_eq!(h.keys("run/"), 1);
    });
}

/// An upstream that holds every request until released, then hands it to the targets.
struct Held {
    targets: Rc<FakeTarget>,
    released: std::cell::Cell<bool>,
    waiting: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Held {
    fn release(&self) {
        self.released.set(true);
        self.waiting.borrow_mut().drain(..).for_each(|w| w.wake());
    }
}

#[async_trait::async_trait(?Send)]
impl pullgate::core::ports::Upstream for Held {
    async fn send(
        &self,
        req: Request<Bytes>,
    ) -> Result<Response<ByteStream>, pullgate::core::ports::UpstreamError> {
        futures_util::future::poll_fn(|cx| {
            if self.released.get() {
                std::task::Poll::Ready(())
            } else {
                self.waiting.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        self.targets.send(req).await
    }
}

#[test]
fn instances_sharing_a_gateway_share_never_run_two_outbox_passes_at_once() {
    use pullgate::core::app::GatewayShare;
    run(async {
        let h = harness("");
        let body = push_body("main", &commit(1), &commit(0));
        let (status, v) = h.github("d-1", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        // Two instances over one store (as the native host's threads are), one share; the
        // first one's delivery is held in flight.
        let (settings, ports) = h.rebuild.clone();
        let held = Rc::new(Held {
            targets: h.targets.clone(),
            released: Default::default(),
            waiting: Default::default(),
        });
        let share = GatewayShare::default();
        let first_ports = Ports {
            upstream: held.clone(),
            ..ports.clone()
        };
        let first = App::sharing(settings.clone(), first_ports, &share);
        let second = App::sharing(settings.clone(), ports.clone(), &share);
        let mut pass = Box::pin(first.pump_outbox());
        assert!(futures_util::FutureExt::now_or_never(&mut pass).is_none());
        // The other instance's pass sees one running and sends nothing.
        let r = second.pump_outbox().await;
        assert_eq!(r.attempted, 0, "{r:?}");
        assert_eq!(h.targets.count("a.test"), 0);
        // An instance with its own share would have sent the same delivery again: the share
        // is what prevents it.
        let unshared = App::new(settings, ports);
        let r = unshared.pump_outbox().await;
        assert_eq!(r.attempted, 1, "{r:?}");
        held.release();
        let r = pass.await;
        assert_eq!(r.attempted, 1, "{r:?}");
        assert_eq!(h.targets.count("a.test"), 2, "one from each share");
    });
}
