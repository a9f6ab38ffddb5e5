//! Logins through the core's ports: a manual clock, in-memory stores, an upstream that must
//! never be called, and offload doubles that count password verifications (or hold them, to
//! have many logins in flight at once). What they pin down: limits and lockouts refuse before
//! any password check, on every route; the realm comes from the configuration only.

use crate::core::access::limit::LoginLockouts;
use crate::core::access::ClientAddr;
use crate::core::app::App;
use crate::core::body::Body;
use crate::core::config::{parse_config, ConfigError, Secret, SecretResolver};
use crate::core::ports::{ByteStream, Deferred, Offload, Ports, Upstream, UpstreamError};
use crate::testing::{FakeOffload, ManualClock, MemBlobStore, MemKv};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt as _;
use http::{Request, Response};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

// argon2id of "correct horse" (see the tests in `access/mod.rs`).
const HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$sDq4SJydHwxWnLTlXqq5ZzNDfmXrJUlaeTohxQaFrio";
const PASSWORD: &str = "correct horse";
const MANIFEST: &str = "/v2/up.test/library/app/manifests/v1";

/// An upstream no login test may reach.
#[derive(Default)]
struct NoUpstream(Cell<usize>);

#[async_trait::async_trait(?Send)]
impl Upstream for NoUpstream {
    async fn send(&self, _: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        self.0.set(self.0.get() + 1);
        Err(UpstreamError::Connect("not in this test".into()))
    }
}

struct NoDeferred;
impl Deferred for NoDeferred {
    fn spawn(&self, _work: LocalBoxFuture<'static, ()>) {}
}

struct Secrets;
impl SecretResolver for Secrets {
    fn resolve(&self, r: &str) -> Result<Secret, ConfigError> {
        match r {
            "env:KEY" => Ok(Secret::new("token-key".into())),
            "env:ROBOT" => Ok(Secret::new("robot-token".into())),
            _ => Err(ConfigError(format!("{r} unset"))),
        }
    }
}

/// Holds every job until released: logins stay in flight while others arrive.
#[derive(Default)]
struct HeldOffload {
    started: Cell<usize>,
    released: Rc<Cell<bool>>,
    wakers: Rc<RefCell<Vec<Waker>>>,
}

impl Offload for HeldOffload {
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()> {
        self.started.set(self.started.get() + 1);
        let (released, wakers) = (self.released.clone(), self.wakers.clone());
        Box::pin(async move {
            futures_util::future::poll_fn(|cx| {
                if released.get() {
                    Poll::Ready(())
                } else {
                    wakers.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            job();
        })
    }
}

struct Harness {
    app: App,
    clock: Rc<ManualClock>,
    upstream: Rc<NoUpstream>,
}

fn harness(extra: &str, offload: Rc<dyn Offload>) -> Harness {
    let text = format!(
        r#"
builtin_upstreams = false
[[upstream]]
host = "up.test"
url = "http://up.test"
default = true

[auth]
enabled = true
token_secret = "env:KEY"
public_url = "https://pg.example"

[[identity]]
name = "alice"
password_hash = "{HASH}"
groups = ["devs"]

[[identity]]
name = "robot"
token = "env:ROBOT"

[[access]]
who = ["group:devs", "robot"]
actions = ["pull"]

{extra}
"#
    );
    let settings = parse_config(&text)
        .expect("config")
        .resolve(&Secrets)
        .expect("settings");
    let clock = Rc::new(ManualClock::at(1_700_000_000_000));
    let upstream = Rc::new(NoUpstream::default());
    let ports = Ports {
        upstream: upstream.clone(),
        kv: Rc::new(MemKv::default()),
        blobs: Rc::new(MemBlobStore::default()),
        clock: clock.clone(),
        deferred: Rc::new(NoDeferred),
        offload,
    };
    Harness {
        app: App::new(settings, ports),
        clock,
        upstream,
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {v}")
}

fn request(path: &str, from: &str, authorization: Option<&str>) -> Request<()> {
    let mut b = Request::get(path);
    if let Some(a) = authorization {
        b = b.header("authorization", a);
    }
    let mut req = b.body(()).expect("request");
    let ip: IpAddr = from.parse().expect("ip");
    req.extensions_mut().insert(ClientAddr(ip));
    req
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    www_authenticate: Option<String>,
    body: String,
}

fn answer(resp: Response<Body>) -> Answer {
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, retry_after, www_authenticate) = (
        resp.status().as_u16(),
        header("retry-after"),
        header("www-authenticate"),
    );
    let body = match resp.into_body() {
        Body::Bytes(b) => String::from_utf8_lossy(&b).into_owned(),
        _ => String::new(),
    };
    Answer {
        status,
        retry_after,
        www_authenticate,
        body,
    }
}

impl Harness {
    /// One request, run to completion (the offload doubles here finish inline).
    fn send(&self, req: &Request<()>) -> Answer {
        answer(
            self.app
                .handle(req)
                .now_or_never()
                .expect("completes without waiting"),
        )
    }
}

#[test]
fn bad_logins_beyond_the_address_limit_get_429_before_any_password_check() {
    let offload = Rc::new(FakeOffload::default());
    let h = harness(
        "[rate_limit]\nper_ip = \"5/s\"\nburst = 5\nlogin_failures = 100\n",
        offload.clone(),
    );
    let bad = basic("alice", "wrong");
    let answers: Vec<Answer> = (0..20)
        .map(|_| h.send(&request(MANIFEST, "192.0.2.7", Some(&bad))))
        .collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [429; 15], "{statuses:?}");
    assert_eq!(offload.jobs(), 5, "refused logins cost no verification");
    let last = &answers[19];
    assert_eq!(last.retry_after.as_deref(), Some("1"));
    assert!(last.body.contains("TOOMANYREQUESTS"), "{}", last.body);
    // Every route family is behind the same per-address limit, before credentials.
    for path in [
        "/token",
        "/charts/stable/index.yaml",
        "/hooks/app",
        "/admin/stats",
    ] {
        let a = h.send(&request(path, "192.0.2.7", Some(&bad)));
        assert_eq!(a.status, 429, "{path}");
        assert!(a.retry_after.is_some(), "{path}");
    }
    assert_eq!(offload.jobs(), 5);
    // Probes are not limited; another address is not affected.
    assert_eq!(h.send(&request("/healthz", "192.0.2.7", None)).status, 200);
    assert_eq!(
        h.send(&request(MANIFEST, "192.0.2.8", Some(&bad))).status,
        401
    );
    assert_eq!(h.upstream.0.get(), 0);
}

#[test]
fn concurrent_bad_logins_check_no_more_than_the_failure_budget() {
    let offload = Rc::new(HeldOffload::default());
    let h = harness("", offload.clone());
    let bad = basic("alice", "wrong");
    let reqs: Vec<Request<()>> = (0..20)
        .map(|_| request(MANIFEST, "192.0.2.7", Some(&bad)))
        .collect();
    let mut inflight: Vec<Pin<Box<dyn Future<Output = Response<Body>> + '_>>> = reqs
        .iter()
        .map(|r| Box::pin(h.app.handle(r)) as Pin<Box<dyn Future<Output = _>>>)
        .collect();
    // Every login arrives before any check finished.
    let mut done: Vec<Option<Answer>> = inflight
        .iter_mut()
        .map(|f| f.as_mut().now_or_never().map(answer))
        .collect();
    assert_eq!(offload.started.get(), 5, "the default budget: 5 checks");
    let refused = done.iter().flatten().collect::<Vec<_>>();
    assert_eq!(refused.len(), 15);
    assert!(refused
        .iter()
        .all(|a| a.status == 429 && a.retry_after.is_some()));
    offload.released.set(true);
    for w in offload.wakers.borrow_mut().drain(..) {
        w.wake();
    }
    for (f, d) in inflight.iter_mut().zip(done.iter_mut()) {
        if d.is_none() {
            *d = Some(answer(f.as_mut().now_or_never().expect("released")));
        }
    }
    let unauthorized = done.iter().flatten().filter(|a| a.status == 401).count();
    assert_eq!(unauthorized, 5);
    // Five failures: the address and the name are locked now.
    let a = h.send(&request(MANIFEST, "192.0.2.7", Some(&bad)));
    assert_eq!((a.status, a.retry_after.as_deref()), (429, Some("1")));
    assert_eq!(offload.started.get(), 5);
}

#[test]
fn a_login_abandoned_mid_check_gives_its_slot_back() {
    let offload = Rc::new(HeldOffload::default());
    let h = harness("", offload.clone());
    let bad = basic("alice", "wrong");
    let reqs: Vec<Request<()>> = (0..5)
        .map(|_| request(MANIFEST, "192.0.2.7", Some(&bad)))
        .collect();
    let mut inflight: Vec<_> = reqs.iter().map(|r| Box::pin(h.app.handle(r))).collect();
    for f in &mut inflight {
        assert!(f.as_mut().now_or_never().is_none());
    }
    let next = request(MANIFEST, "192.0.2.7", Some(&bad));
    let mut sixth = Box::pin(h.app.handle(&next));
    assert!(
        sixth.as_mut().now_or_never().is_some(),
        "budget used: refused"
    );
    assert_eq!(offload.started.get(), 5);
    // The clients hang up: their futures are dropped mid-check.
    drop(inflight);
    let mut again = Box::pin(h.app.handle(&next));
    assert!(again.as_mut().now_or_never().is_none(), "checked this time");
    assert_eq!(offload.started.get(), 6);
}

#[test]
fn lockout_backs_off_per_address_and_per_name_and_a_success_resets_it() {
    let offload = Rc::new(FakeOffload::default());
    let h = harness(
        "[rate_limit]\nlogin_failures = 3\nlockout = \"2s\"\nmax_lockout = \"8s\"\n",
        offload.clone(),
    );
    let bad = basic("alice", "wrong");
    let good = basic("alice", PASSWORD);
    for _ in 0..3 {
        assert_eq!(
            h.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
            401
        );
    }
    let a = h.send(&request("/v2/", "192.0.2.7", Some(&good)));
    assert_eq!(
        (a.status, a.retry_after.as_deref()),
        (429, Some("2")),
        "locked: even the right password is not checked"
    );
    assert_eq!(offload.jobs(), 3);
    // A fourth failure after the lockout doubles it.
    h.clock.advance(2_000);
    assert_eq!(
        h.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
        401
    );
    let a = h.send(&request("/v2/", "192.0.2.7", Some(&bad)));
    assert_eq!(a.retry_after.as_deref(), Some("4"));
    // The name is locked from any address; another name from a fresh address is not.
    let a = h.send(&request("/v2/", "198.51.100.1", Some(&good)));
    assert_eq!(a.status, 429);
    let a = h.send(&request("/v2/", "198.51.100.1", Some(&basic("bob", "x"))));
    assert_eq!(a.status, 401);
    // Anonymous requests from the locked address still pass the gate.
    assert_eq!(h.send(&request("/v2/", "192.0.2.7", None)).status, 401);
    // After the lockout, a success clears the count.
    h.clock.advance(4_000);
    assert_eq!(
        h.send(&request("/v2/", "192.0.2.7", Some(&good))).status,
        200
    );
    for _ in 0..3 {
        assert_eq!(
            h.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
            401
        );
    }
    assert_eq!(
        h.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
        429
    );
}

#[test]
fn instances_sharing_a_lockout_table_lock_a_client_out_of_all_of_them() {
    // The native host's serving threads are instances sharing one table: failures counted on
    // one lock the address and the name out of the others. An instance with a table of its
    // own (the edge hosts') counts its own.
    let config = "[rate_limit]\nlogin_failures = 2\nlockout = \"2s\"\n";
    let offload = Rc::new(FakeOffload::default());
    let shared = LoginLockouts::default();
    let sharing = |h: Harness| Harness {
        app: h.app.with_login_lockouts(shared.clone()),
        ..h
    };
    let a = sharing(harness(config, offload.clone()));
    let b = sharing(harness(config, offload.clone()));
    let own = harness(config, offload.clone());
    let (bad, good) = (basic("alice", "wrong"), basic("alice", PASSWORD));
    assert_eq!(
        a.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
        401
    );
    assert_eq!(
        b.send(&request("/v2/", "192.0.2.7", Some(&bad))).status,
        401
    );
    for (h, from) in [(&a, "192.0.2.7"), (&b, "192.0.2.7"), (&b, "198.51.100.9")] {
        let locked = h.send(&request("/v2/", from, Some(&good)));
        assert_eq!(
            (locked.status, locked.retry_after.as_deref()),
            (429, Some("2")),
            "two failures across the sharing instances lock {from} and the name out of both"
        );
    }
    assert_eq!(
        own.send(&request("/v2/", "192.0.2.7", Some(&good))).status,
        200,
        "an instance with its own table saw no failure"
    );
    a.clock.advance(2_000);
    assert_eq!(
        a.send(&request("/v2/", "192.0.2.7", Some(&good))).status,
        200
    );
}

#[test]
fn the_token_endpoint_is_locked_out_too_and_answers_json() {
    let offload = Rc::new(FakeOffload::default());
    let h = harness("[rate_limit]\nlogin_failures = 2\n", offload.clone());
    let bad = basic("alice", "wrong");
    for _ in 0..2 {
        assert_eq!(
            h.send(&request("/token", "192.0.2.7", Some(&bad))).status,
            401
        );
    }
    let a = h.send(&request(
        "/token",
        "192.0.2.7",
        Some(&basic("alice", PASSWORD)),
    ));
    assert_eq!(a.status, 429);
    assert!(a.retry_after.is_some());
    assert!(a.body.contains("\"error\""), "{}", a.body);
    assert_eq!(offload.jobs(), 2);
    h.clock.advance(1_000);
    let a = h.send(&request(
        "/token",
        "192.0.2.7",
        Some(&basic("alice", PASSWORD)),
    ));
    assert_eq!(a.status, 200, "{}", a.body);
}

#[test]
fn known_unknown_and_token_only_names_each_cost_one_verification() {
    let offload = Rc::new(FakeOffload::default());
    let h = harness("[rate_limit]\nlogin_failures = 0\n", offload.clone());
    for (i, user) in ["alice", "nobody", "robot"].into_iter().enumerate() {
        let a = h.send(&request(MANIFEST, "192.0.2.7", Some(&basic(user, "wrong"))));
        assert_eq!(a.status, 401, "{user}");
        assert_eq!(offload.jobs(), i + 1, "{user}");
    }
    // Lockouts off: no 429 however many failures.
    for _ in 0..10 {
        let a = h.send(&request("/v2/", "192.0.2.7", Some(&basic("nobody", "x"))));
        assert_eq!(a.status, 401);
    }
}

#[test]
fn the_realm_comes_from_public_url_not_from_the_host_header() {
    let h = harness("", Rc::new(FakeOffload::default()));
    let mut req = request("/v2/", "192.0.2.7", None);
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static("attacker.example"));
    let a = h.send(&req);
    assert_eq!(a.status, 401);
    let challenge = a.www_authenticate.expect("a challenge");
    assert!(
        challenge.starts_with("Bearer realm=\"https://pg.example/token\""),
        "{challenge}"
    );
}
