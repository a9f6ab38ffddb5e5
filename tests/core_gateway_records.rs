//! The gateway's runs and dedup records in a host's record store ([`RecordStore`], a Durable
//! Object on Workers) rather than the key-value port: two core instances that share no lock
//! (two isolates) take the same webhook at the same moment, and the store's atomic create is
//! what makes one of them start runs. Every store operation yields once, so the two requests
//! interleave at each of them, as requests in two isolates would.

use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Request, Response, StatusCode};
use pullgate::core::app::App;
use pullgate::core::body::Body;
use pullgate::core::config::{parse_config, ConfigError, Secret, SecretResolver, Settings};
use pullgate::core::ports::{ByteStream, KvStore, Ports, RecordStore, StoreError};
use pullgate::testing::{DroppedDeferred, FakeTarget, ManualClock, MemBlobStore, MemKv};
use serde_json::{json, Value};
use sha2::Sha256;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

const HOOK_SECRET: &str = "hook-secret";

struct Secrets;
impl SecretResolver for Secrets {
    fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
        match r {
            "env:HOOK" => Ok(Secret::new(HOOK_SECRET.into())),
            _ => Err(ConfigError(format!("{r} unset"))),
        }
    }
}

/// Returns Pending once, so whatever else is being polled runs before the caller continues.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A key-value store whose every operation yields first (a store across the network).
#[derive(Default)]
struct YieldingKv(MemKv);

#[async_trait::async_trait(?Send)]
impl KvStore for YieldingKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        YieldOnce(false).await;
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        YieldOnce(false).await;
        self.0.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        YieldOnce(false).await;
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        YieldOnce(false).await;
        self.0.list(prefix, limit).await
    }
}

/// A record store in memory whose create is atomic (as a Durable Object's is): the check and
/// the write happen in one step after the yield.
#[derive(Default)]
struct MemRecords(RefCell<BTreeMap<String, Vec<u8>>>);

#[async_trait::async_trait(?Send)]
impl KvStore for MemRecords {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        YieldOnce(false).await;
        Ok(self.0.borrow().get(key).cloned())
    }
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        YieldOnce(false).await;
        self.0.borrow_mut().insert(key.into(), value.to_vec());
        Ok(())
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        YieldOnce(false).await;
        self.0.borrow_mut().remove(key);
        Ok(())
    }
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        YieldOnce(false).await;
        Ok(self
            .0
            .borrow()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }
}

#[async_trait::async_trait(?Send)]
impl RecordStore for MemRecords {
    async fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        YieldOnce(false).await;
        let mut map = self.0.borrow_mut();
        if map.contains_key(key) {
            return Ok(false);
        }
        map.insert(key.into(), value.to_vec());
        Ok(true)
    }
}

fn settings() -> Settings {
    parse_config(
        r#"
        builtin_upstreams = false
        [[upstream]]
        host = "up.test"
        url = "http://up.test"
        default = true

        [gateway]
        admin_token = "env:HOOK"

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
    .unwrap()
    .resolve(&Secrets)
    .unwrap()
}

fn run<F: Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(f);
}

/// A signed GitHub push of commit 1 to `main` with delivery id `delivery`.
async fn push(app: &App, delivery: &str) -> (StatusCode, Value) {
    let body = json!({
        "ref": "refs/heads/main",
        "before": format!("{:040x}", 0),
        "after": format!("{:040x}", 1),
        "repository": { "clone_url": "https://github.com/acme/app.git" },
        "pusher": { "name": "ana" },
    })
    .to_string()
    .into_bytes();
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let req = Request::post("/hooks/app")
        .header("x-github-event", "push")
        .header("x-github-delivery", delivery)
        .header(
            "x-hub-signature-256",
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
        )
        .body(())
        .unwrap();
    let stream: ByteStream = futures_util::stream::iter([Ok(Bytes::from(body))]).boxed_local();
    answer(app.handle_with_body(&req, stream).await).await
}

async fn answer(resp: Response<Body>) -> (StatusCode, Value) {
    let status = resp.status();
    let Body::Bytes(b) = resp.into_body() else {
        panic!("gateway answers are small JSON bodies")
    };
    (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// Two instances sharing no lock, over one key-value store and (when `records` is given) one
/// record store, take two copies of one push (a sender's redelivery, with a new delivery id)
/// at the same moment. The runs started and the dispatches sent.
async fn race(records: Option<Rc<MemRecords>>) -> (Vec<StatusCode>, usize, usize) {
    let kv = Rc::new(YieldingKv::default());
    let targets = Rc::new(FakeTarget::default());
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let instance = || {
        let ports = Ports {
            upstream: targets.clone(),
            kv: kv.clone(),
            blobs: Rc::new(MemBlobStore::default()),
            clock: clock.clone(),
            deferred: Rc::new(DroppedDeferred),
            offload: Rc::new(pullgate::core::ports::InlineOffload),
        };
        let app = App::new(settings(), ports);
        match &records {
            Some(r) => app.with_record_store(r.clone()),
            None => app,
        }
    };
    let (a, b) = (instance(), instance());
    let ((sa, va), (sb, vb)) = futures_util::future::join(push(&a, "d-1"), push(&b, "d-2")).await;
    let started = [&va, &vb]
        .iter()
        .filter(|v| v["status"] == "accepted")
        .map(|v| v["runs"].as_array().map_or(0, Vec::len))
        .sum();
    a.pump_outbox().await;
    b.pump_outbox().await;
    (vec![sa, sb], started, targets.count("a.test"))
}

#[test]
fn two_instances_taking_one_webhook_at_once_start_one_run_through_the_record_store() {
    run(async {
        let records = Rc::new(MemRecords::default());
        let (statuses, started, dispatched) = race(Some(records.clone())).await;
        assert_eq!(started, 1, "{statuses:?}");
        assert_eq!(dispatched, 1);
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(sorted, vec![StatusCode::OK, StatusCode::ACCEPTED]);
        // The run and its guard are in the record store.
        let keys: Vec<String> = records.0.borrow().keys().cloned().collect();
        assert_eq!(
            keys.iter().filter(|k| k.starts_with("run/")).count(),
            1,
            "{keys:?}"
        );
        assert!(
            keys.iter().any(|k| k.starts_with("run-by-source/")),
            "{keys:?}"
        );

        // The control: the same race over the key-value port alone starts two runs (the
        // instances' locks are their own), so the record store is what held it.
        let (statuses, started, dispatched) = race(None).await;
        assert_eq!((started, dispatched), (2, 2), "{statuses:?}");
    });
}

#[test]
fn a_source_claimed_by_an_instance_cut_off_before_its_runs_is_taken_over_after_a_minute() {
    run(async {
        let records = Rc::new(MemRecords::default());
        let clock = Rc::new(ManualClock::at(1_700_000_000_000));
        let targets = Rc::new(FakeTarget::default());
        let ports = Ports {
            upstream: targets.clone(),
            kv: Rc::new(MemKv::default()),
            blobs: Rc::new(MemBlobStore::default()),
            clock: clock.clone(),
            deferred: Rc::new(DroppedDeferred),
            offload: Rc::new(pullgate::core::ports::InlineOffload),
        };
        let app = App::new(settings(), ports).with_record_store(records.clone());
        // A claim left behind by an instance that never started its runs.
        let (status, v) = push(&app, "d-1").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        let guard = records
            .0
            .borrow()
            .keys()
            .find(|k| k.starts_with("run-by-source/"))
            .cloned()
            .unwrap();
        let run_id = v["runs"][0].as_str().unwrap().to_string();
        records.0.borrow_mut().clear();
        let claim = format!("pending:{}", 1_700_000_000_000u64);
        records
            .0
            .borrow_mut()
            .insert(guard.clone(), claim.into_bytes());

        // Within the minute: a duplicate (the claimant may still be starting them).
        let (status, v) = push(&app, "d-2").await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "duplicate", "{v}");
        // After it: taken over, runs start (the body's replay record from d-2 forgotten, so
        // only the guard decides).
        clock.advance(60_000);
        records.0.borrow_mut().retain(|k, _| *k == guard);
        let (status, v) = push(&app, "d-3").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        assert_ne!(v["runs"][0], run_id.as_str(), "a run of this delivery");
        let stored = records.0.borrow().get(&guard).cloned().unwrap();
        assert_eq!(
            String::from_utf8(stored).unwrap(),
            v["runs"][0].as_str().unwrap()
        );
    });
}
