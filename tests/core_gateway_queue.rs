//! The gateway's outbox on a host queue ([`DeliveryQueue`], Cloudflare Queues on Workers),
//! through in-memory ports: a [`RecordingQueue`] stands in for the queue (it records what was
//! sent, and the test plays its consumer by calling `deliver_queued` / `dead_letter_queued`),
//! a manual clock and a counting target. What reached the target and what the queue was asked
//! to do are the assertions.

use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::Body;
use pullgate::core::config::{parse_config, ConfigError, Secret, SecretResolver};
use pullgate::core::gateway::outbox::{DEAD, PENDING};
use pullgate::core::gateway::pump::DUE;
use pullgate::core::ports::{
    ByteStream, Clock, DeliveryQueue, KvStore, Ports, QueueVerdict, StoreError,
};
use pullgate::testing::{DroppedDeferred, FakeTarget, ManualClock, MemBlobStore, MemKv};
use serde_json::{json, Value};
use sha2::Sha256;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

const HOOK_SECRET: &str = "hook-secret";
const ADMIN: &str = "admin-token";
/// `QUEUE_LEASE_MS`: how long the pump leaves a delivery to the queue past its due time.
const LEASE: u64 = 15 * 60 * 1000;

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

/// A queue that records each message (delivery id, delay) and can be told to refuse them.
#[derive(Default)]
struct RecordingQueue {
    sent: RefCell<Vec<(String, u64)>>,
    refuse: Cell<bool>,
}

#[async_trait::async_trait(?Send)]
impl DeliveryQueue for RecordingQueue {
    async fn send(&self, id: &str, delay_ms: u64) -> Result<(), StoreError> {
        if self.refuse.get() {
            return Err(StoreError("queue unavailable".into()));
        }
        self.sent.borrow_mut().push((id.to_string(), delay_ms));
        Ok(())
    }
}

struct Harness {
    app: App,
    targets: Rc<FakeTarget>,
    clock: Rc<ManualClock>,
    kv: Rc<MemKv>,
    queue: Rc<RecordingQueue>,
}

/// A gateway with one target (`a.test`), a one-stage chain, three attempts per delivery
/// (10 s base, 1 min cap), and a queue.
fn harness() -> Harness {
    let config = parse_config(
        r#"
        builtin_upstreams = false
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true

        [gateway]
        admin_token = "env:ADMIN"
        max_attempts = 3
        retry_base = "10s"
        retry_max = "1m"

        [[webhook]]
        name = "app"
        provider = "github"
        secret = "env:HOOK"

        [[target]]
        name = "a"
        kind = "http"
        url = "http://a.test/hook"
        secret = "env:HOOK"

        [chain]
        stages = ["build"]

        [[rule]]
        webhook = "app"
        on = ["push"]
        branches = ["main"]
        stage = "build"
        target = "a"
        "#,
    )
    .unwrap();
    let settings = config.resolve(&Secrets).unwrap();
    let targets = Rc::new(FakeTarget::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let kv = Rc::new(MemKv::default());
    let queue = Rc::new(RecordingQueue::default());
    let ports = Ports {
        upstream: targets.clone(),
        kv: kv.clone(),
        blobs: Rc::new(MemBlobStore::default()),
        clock: clock.clone(),
        deferred: Rc::new(DroppedDeferred),
        offload: Rc::new(pullgate::core::ports::InlineOffload),
    };
    Harness {
        app: App::new(settings, ports).with_delivery_queue(queue.clone()),
        targets,
        clock,
        kv,
        queue,
    }
}

fn run<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(f);
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
    /// Delivers a signed GitHub push for `main` at commit `n`; the ids of the runs it started.
    async fn push(&self, delivery: &str, n: u32) -> Vec<String> {
        let body = json!({
            "ref": "refs/heads/main",
            "before": format!("{:040x}", n - 1),
            "after": format!("{n:040x}"),
            "repository": { "clone_url": "https://github.com/acme/app.git" },
            "pusher": { "name": "ana" },
        })
        .to_string()
        .into_bytes();
        let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
        mac.update(&body);
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let req = Request::post("/hooks/app")
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sig)
            .body(())
            .unwrap();
        let (status, v) = answer(self.app.handle_with_body(&req, one_shot(body)).await).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect()
    }

    async fn admin(&self, method: &str, path: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(())
            .unwrap();
        answer(self.app.handle(&req).await).await
    }

    fn keys(&self, prefix: &str) -> usize {
        futures_util::FutureExt::now_or_never(KvStore::list(self.kv.as_ref(), prefix, usize::MAX))
            .and_then(Result::ok)
            .unwrap_or_default()
            .len()
    }

    /// The messages the queue was sent, in order.
    fn sent(&self) -> Vec<(String, u64)> {
        self.queue.sent.borrow().clone()
    }
}

#[test]
fn a_new_delivery_goes_to_the_queue_and_the_pump_leaves_it_to_the_queue() {
    run(async {
        let h = harness();
        h.push("d-1", 1).await;
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1, 0, "due at once");
        // Leased: the pump sends nothing, even well past the due time.
        h.clock.advance(LEASE - 1);
        assert_eq!(h.app.pump_outbox().await.attempted, 0);
        assert_eq!(h.targets.count("a.test"), 0);

        // The consumer's attempt delivers it; the message is acknowledged, nothing is left.
        let verdict = h.app.deliver_queued(&sent[0].0).await.unwrap();
        assert_eq!(verdict, QueueVerdict::Ack);
        assert_eq!(h.targets.count("a.test"), 1);
        assert_eq!((h.keys(PENDING), h.keys(DUE), h.keys(DEAD)), (0, 0, 0));
        // A duplicate message (at-least-once queues) finds nothing pending and sends nothing.
        assert_eq!(
            h.app.deliver_queued(&sent[0].0).await.unwrap(),
            QueueVerdict::Ack
        );
        h.clock.advance(LEASE);
        assert_eq!(h.app.pump_outbox().await.attempted, 0);
        assert_eq!(h.targets.count("a.test"), 1);
    });
}

#[test]
fn a_failing_queued_delivery_retries_with_backoff_then_is_dead_lettered_and_replayed() {
    run(async {
        let h = harness();
        h.targets.answer("a.test", 503);
        let run_id = h.push("d-1", 1).await.pop().unwrap();
        let id = h.sent()[0].0.clone();

        // Attempt 1 fails: retry after base·[½, 1).
        let QueueVerdict::Retry { delay_ms } = h.app.deliver_queued(&id).await.unwrap() else {
            panic!("not a retry")
        };
        assert!((5_000..10_000).contains(&delay_ms), "{delay_ms}");
        // A message back early (a queue that capped the delay) waits for the rest.
        assert_eq!(
            h.app.deliver_queued(&id).await.unwrap(),
            QueueVerdict::Retry { delay_ms }
        );
        assert_eq!(h.targets.count("a.test"), 1);
        h.clock.advance(delay_ms);
        // Attempt 2: twice the delay.
        let QueueVerdict::Retry { delay_ms } = h.app.deliver_queued(&id).await.unwrap() else {
            panic!("not a retry")
        };
        assert!((10_000..20_000).contains(&delay_ms), "{delay_ms}");
        h.clock.advance(delay_ms);
        // Attempt 3 was the last allowed: off to the dead-letter queue.
        let verdict = h.app.deliver_queued(&id).await.unwrap();
        assert_eq!(
            verdict,
            QueueVerdict::DeadLetter {
                error: "target answered 503 Service Unavailable".into()
            }
        );
        assert_eq!(h.targets.count("a.test"), 3);
        assert_eq!(
            h.keys(DEAD),
            0,
            "the dead-letter queue's consumer writes it"
        );

        // The dead-letter queue's consumer records it: listed by the admin API, the run failed.
        assert!(h.app.dead_letter_queued(&id, "unused").await.unwrap());
        assert_eq!((h.keys(PENDING), h.keys(DUE), h.keys(DEAD)), (0, 0, 1));
        let (_, dead) = h.admin("GET", "/chain/dead-letters").await;
        let letter = &dead["dead_letters"][0];
        assert_eq!(letter["id"], id.as_str(), "{dead}");
        assert_eq!(letter["attempts"], 3, "{dead}");
        let (_, v) = h.admin("GET", &format!("/chain/{run_id}")).await;
        assert_eq!(v["status"], "failed", "{v}");
        // Once only: a second dead-letter message changes nothing.
        assert!(!h.app.dead_letter_queued(&id, "again").await.unwrap());

        // An admin replay hands it to the queue again; with the target up it is delivered once.
        h.targets.heal();
        let (status, v) = h
            .admin("POST", &format!("/chain/dead-letters/{id}/replay"))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        assert_eq!(h.sent().len(), 2);
        assert_eq!(h.sent()[1], (id.clone(), 0));
        assert_eq!(h.app.deliver_queued(&id).await.unwrap(), QueueVerdict::Ack);
        assert_eq!(h.targets.count("a.test"), 4);
        assert_eq!((h.keys(PENDING), h.keys(DUE), h.keys(DEAD)), (0, 0, 0));
        let (_, v) = h.admin("GET", &format!("/chain/{run_id}")).await;
        assert_eq!(v["stages"][0]["status"], "running", "reopened: {v}");
    });
}

#[test]
fn the_dead_letter_queue_records_a_delivery_the_queue_gave_up_on() {
    run(async {
        // The queue's own max_retries can run out before max_attempts: the message reaches
        // the dead-letter queue after retries only, and is recorded all the same.
        let h = harness();
        h.targets.answer("a.test", 503);
        let run_id = h.push("d-1", 1).await.pop().unwrap();
        let id = h.sent()[0].0.clone();
        assert!(matches!(
            h.app.deliver_queued(&id).await.unwrap(),
            QueueVerdict::Retry { .. }
        ));
        assert!(h
            .app
            .dead_letter_queued(&id, "the queue gave up")
            .await
            .unwrap());
        let (_, dead) = h.admin("GET", "/chain/dead-letters").await;
        let letter = &dead["dead_letters"][0];
        assert_eq!(letter["attempts"], 1, "{dead}");
        assert_eq!(
            letter["last_error"],
            "target answered 503 Service Unavailable"
        );
        let (_, v) = h.admin("GET", &format!("/chain/{run_id}")).await;
        assert_eq!(v["status"], "failed", "{v}");
    });
}

#[test]
fn a_delivery_the_queue_refused_or_never_settled_is_sent_by_the_pump() {
    run(async {
        let h = harness();
        // Refused: due for the pump at once.
        h.queue.refuse.set(true);
        h.push("d-1", 1).await;
        assert_eq!(h.app.pump_outbox().await.delivered, 1);
        assert_eq!(h.targets.count("a.test"), 1);

        // Taken but never handed back (a lost message): the pump sends it after the lease.
        h.queue.refuse.set(false);
        h.push("d-2", 2).await;
        assert_eq!(h.sent().len(), 1);
        h.clock.advance(LEASE - 1);
        assert_eq!(h.app.pump_outbox().await.attempted, 0);
        h.clock.advance(1);
        assert_eq!(h.app.pump_outbox().await.delivered, 1);
        assert_eq!(h.targets.count("a.test"), 2);
        assert_eq!((h.keys(PENDING), h.keys(DUE)), (0, 0));
    });
}

#[test]
fn without_a_queue_the_pump_sends_as_before() {
    run(async {
        let h = harness();
        let plain = App::new(h.app.settings().clone(), {
            Ports {
                upstream: h.targets.clone(),
                kv: h.kv.clone(),
                blobs: Rc::new(MemBlobStore::default()),
                clock: h.clock.clone(),
                deferred: Rc::new(DroppedDeferred),
                offload: Rc::new(pullgate::core::ports::InlineOffload),
            }
        });
        let h = Harness { app: plain, ..h };
        h.push("d-1", 1).await;
        assert!(h.sent().is_empty());
        assert_eq!(h.app.pump_outbox().await.delivered, 1);
        assert_eq!(h.targets.count("a.test"), 1);
        assert_eq!(h.clock.now_ms(), 1_700_000_000_000);
    });
}
