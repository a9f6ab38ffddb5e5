//! Scripted doubles for driving [`App`](crate::core::app::App) through its ports: an upstream
//! that answers from a closure ([`FakeUpstream`]), a key-value store whose writes can be made
//! to fail ([`FlakyKv`]), secrets from a table ([`FakeSecrets`]), and the request/response
//! helpers every core test needs ([`request`], [`collect`]). The pieces that need tokio
//! (spawning on a `LocalSet`, yielding between body chunks, gating a body) come with the
//! `test-utils` feature, which brings tokio; the rest builds in any `cfg(test)`.

use crate::core::body::{Body, CacheStatus, RequestInfo};
use crate::core::config::{ConfigError, Secret, SecretResolver};
use crate::core::ports::{BodyError, ByteStream, KvStore, StoreError, Upstream, UpstreamError};
use crate::testing::MemKv;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use std::cell::RefCell;

/// How a [`FakeUpstream`] answers a request.
pub type Responder = Box<dyn Fn(&Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError>>;

/// An [`Upstream`] that answers every request with a closure (usually a scripted registry's
/// `respond`, which records the call).
pub struct FakeUpstream(Responder);

impl FakeUpstream {
    /// An upstream answering with `respond`.
    pub fn new(
        respond: impl Fn(&Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> + 'static,
    ) -> Self {
        FakeUpstream(Box::new(respond))
    }
}

#[async_trait::async_trait(?Send)]
impl Upstream for FakeUpstream {
    async fn send(&self, request: Request<Bytes>) -> Result<Response<ByteStream>, UpstreamError> {
        (self.0)(&request)
    }
}

/// A [`MemKv`] whose writes under a prefix can be made to fail, like a KV that refuses more
/// than one write per second per key.
#[derive(Default)]
pub struct FlakyKv {
    inner: MemKv,
    fail_prefix: RefCell<Option<String>>,
}

impl FlakyKv {
    /// Writes under `prefix` fail from now on (`None`: none fail).
    pub fn fail_writes_under(&self, prefix: Option<&str>) {
        *self.fail_prefix.borrow_mut() = prefix.map(str::to_string);
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for FlakyKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if let Some(p) = self.fail_prefix.borrow().as_deref() {
            if key.starts_with(p) {
                return Err(StoreError("one write per second per key".into()));
            }
        }
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix, limit).await
    }
    fn generation(&self) -> Option<u64> {
        self.inner.generation()
    }
}

/// Secrets from a table of `reference → value`; any other reference is unset.
#[derive(Default)]
pub struct FakeSecrets(Vec<(String, String)>);

impl FakeSecrets {
    /// Resolves each `(reference, value)` pair, e.g. `("env:U", "user")`.
    pub fn with(pairs: &[(&str, &str)]) -> Self {
        FakeSecrets(
            pairs
                .iter()
                .map(|(r, v)| (r.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl SecretResolver for FakeSecrets {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        self.0
            .iter()
            .find(|(r, _)| r == reference)
            .map(|(_, v)| Secret::new(v.clone()))
            .ok_or_else(|| ConfigError(format!("{reference} unset")))
    }
}

/// A request for `App::handle`.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    match b.body(()) {
        Ok(r) => r,
        Err(e) => panic!("request {method} {path}: {e}"),
    }
}

/// A response read to its end (or to the body error that ended it).
pub struct Collected {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Result<Bytes, BodyError>,
    /// What the core recorded about the request (cache outcome, error note).
    pub info: Option<RequestInfo>,
}

impl Collected {
    /// How the cache answered (`None` when the core recorded nothing).
    pub fn cache(&self) -> CacheStatus {
        self.info
            .as_ref()
            .map(|i| i.cache)
            .unwrap_or(CacheStatus::None)
    }

    /// The body as text (empty after a body error): error envelopes, for `contains` checks.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).to_string()
    }
}

/// Reads a core response to its end. In-memory stores never make host bodies.
pub async fn collect(resp: Response<Body>) -> Collected {
    let info = resp.extensions().get::<RequestInfo>().cloned();
    let (parts, body) = resp.into_parts();
    let body = match body {
        Body::Empty => Ok(Bytes::new()),
        Body::Bytes(b) => Ok(b),
        Body::Host(_) => panic!("in-memory stores never make host bodies"),
        Body::Stream(mut s) => {
            let mut out = Vec::new();
            let mut res = Ok(());
            while let Some(c) = s.next().await {
                match c {
                    Ok(c) => out.extend_from_slice(&c),
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            res.map(|()| Bytes::from(out))
        }
    };
    Collected {
        status: parts.status,
        headers: parts.headers,
        body,
        info,
    }
}

#[cfg(feature = "test-utils")]
pub use self::local::{chunked_response, run_local, SpawnLocal};

#[cfg(feature = "test-utils")]
mod local {
    use crate::core::ports::{BodyError, ByteStream, Deferred};
    use bytes::Bytes;
    use futures_util::future::LocalBoxFuture;
    use futures_util::StreamExt;
    use http::Response;
    use std::cell::Cell;
    use std::rc::Rc;
    use tokio::sync::Notify;

    /// [`Deferred`] work spawned on the current `LocalSet` (see [`run_local`]).
    pub struct SpawnLocal;

    impl Deferred for SpawnLocal {
        fn spawn(&self, work: LocalBoxFuture<'static, ()>) {
            tokio::task::spawn_local(work);
        }
    }

    /// Runs `f` to completion on a current-thread runtime inside a `LocalSet` (core futures
    /// are `!Send`).
    pub fn run_local<F: std::future::Future<Output = ()>>(f: F) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("tokio runtime: {e}"),
        };
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    /// A response whose body arrives in 4 KiB chunks with a yield between them, so concurrent
    /// requests really overlap with a transfer in flight. With a gate, the body stops after its
    /// first half (setting the flag while it waits) until the gate is notified.
    pub fn chunked_response(
        status: u16,
        headers: &[(&str, &str)],
        body: Bytes,
        gate: Option<(Rc<Notify>, Rc<Cell<bool>>)>,
    ) -> Response<ByteStream> {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let half = body.len() / 2;
        let chunks: Vec<(usize, Bytes)> = (0..body.len())
            .step_by(4096)
            .map(|i| (i, body.slice(i..(i + 4096).min(body.len()))))
            .collect();
        let stream = futures_util::stream::iter(chunks)
            .then(move |(at, c)| {
                let gate = gate.clone();
                async move {
                    if let Some((g, flag)) = gate.filter(|_| at >= half && at < half + 4096) {
                        flag.set(true);
                        g.notified().await;
                        flag.set(false);
                    }
                    tokio::task::yield_now().await;
                    Ok::<_, BodyError>(c)
                }
            })
            .boxed_local();
        match b.body(stream) {
            Ok(r) => r,
            Err(e) => panic!("response: {e}"),
        }
    }
}
