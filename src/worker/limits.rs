//! Rate-limit buckets that hold across isolates and locations: [`RateLimits`] is a Durable
//! Object class, one object per bucket, and [`DoRateLimits`] is the core's [`RateLimitStore`]
//! over the namespace binding `PULLGATE_LIMITS`. Without the binding each isolate keeps its own
//! buckets in memory (an attacker spread over isolates gets more requests).
//!
//! An object's name is a hash of the bucket key (`ip:…`, `id:…`), so neither client addresses
//! nor identity names appear in object names or logs. The object keeps one record in its
//! storage — the bucket's tokens and when they were computed — and applies the core's refill
//! rule ([`BucketState::take`]) to it on every take, with the object's own clock.
//!
//! # Accuracy
//! Exact per key: a Durable Object runs one event at a time across storage operations (the
//! input gate), and a take reads the record, applies the rule and writes it back with no other
//! await in between, so concurrent takes of one bucket, from any isolate or location, are
//! serialised as if one process counted them. Every bucket uses one clock (the object's), so
//! isolates' clock differences do not matter. A take that cannot reach the object admits the
//! request (the core fails open) and is logged without the key.
//!
//! # Limitations
//! - Each limited request makes one subrequest per bucket it is checked against (per address,
//!   and per identity once authenticated) to wherever the object lives — usually near where that
//!   client was first seen: a round trip added to every request when `[rate_limit]` is on.
//! - Login lockouts stay per isolate.

use crate::core::app::App;
use crate::core::ports::{BucketLimit, BucketState, BucketTake, RateLimitStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::rc::Rc;
// The `#[durable_object]` expansion names `wasm_bindgen` unqualified.
use worker::wasm_bindgen;
use worker::{
    durable_object, DurableObject, Env, Method, ObjectNamespace, Request, RequestInit, Response,
    State,
};

/// The Durable Object namespace binding.
pub const LIMITS_BINDING: &str = "PULLGATE_LIMITS";
/// The URL the port's requests to an object carry (never leaves the runtime).
const OBJECT_URL: &str = "https://rate-limits.pullgate.internal/take";
/// The storage key of an object's one bucket.
const BUCKET_KEY: &str = "bucket";

/// A take: the bucket's limit.
#[derive(Debug, Serialize, Deserialize)]
struct Take {
    n: u32,
    per_ms: u64,
    burst: u32,
}

/// The object's answer: a token was taken, or when the next one is due.
#[derive(Debug, Serialize, Deserialize)]
struct Taken {
    taken: bool,
    #[serde(default)]
    retry_after_ms: u64,
}

/// The stored bucket.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// Format version.
    v: u32,
    tokens: f64,
    at_ms: u64,
}

/// One rate-limit bucket (a Durable Object class; `wrangler.toml` binds it as
/// `PULLGATE_LIMITS`, SQLite-backed).
#[durable_object]
pub struct RateLimits {
    state: State,
}

impl RateLimits {
    async fn take(&self, take: Take) -> worker::Result<Taken> {
        let limit = BucketLimit {
            n: take.n,
            per_ms: take.per_ms,
            burst: take.burst,
        };
        let storage = self.state.storage();
        // No await but storage between the read and the write: atomic (the input gate).
        let now = worker::js_sys::Date::now() as u64;
        let mut bucket = storage
            .get::<Record>(BUCKET_KEY)
            .await?
            .filter(|r| r.v == 1 && r.tokens.is_finite())
            .map(|r| BucketState {
                tokens: r.tokens,
                at_ms: r.at_ms,
            })
            .unwrap_or_else(|| BucketState::full(limit, now));
        let outcome = bucket.take(limit, now);
        let record = Record {
            v: 1,
            tokens: bucket.tokens,
            at_ms: bucket.at_ms,
        };
        storage.put(BUCKET_KEY, record).await?;
        Ok(match outcome {
            BucketTake::Taken => Taken {
                taken: true,
                retry_after_ms: 0,
            },
            BucketTake::Empty { retry_after_ms } => Taken {
                taken: false,
                retry_after_ms,
            },
        })
    }
}

impl DurableObject for RateLimits {
    fn new(state: State, _env: Env) -> Self {
        RateLimits { state }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let take: Take = match req.json().await {
            Ok(t) => t,
            Err(e) => return Response::error(format!("not a bucket take: {e}"), 400),
        };
        match self.take(take).await {
            Ok(taken) => Response::from_json(&taken),
            Err(e) => Response::error(format!("bucket storage: {e}"), 500),
        }
    }
}

/// The object name of bucket `key`: a hash, so no address or identity is in it.
fn object_name(key: &str) -> String {
    format!(
        "rate/{}",
        hex::encode(&Sha256::digest(key.as_bytes())[..16])
    )
}

/// The core's rate-limit buckets in `PULLGATE_LIMITS` objects.
pub struct DoRateLimits {
    namespace: ObjectNamespace,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("Durable Object {LIMITS_BINDING} take: {e}"))
}

impl DoRateLimits {
    async fn call(&self, key: &str, limit: BucketLimit) -> Result<Taken, StoreError> {
        let take = Take {
            n: limit.n,
            per_ms: limit.per_ms,
            burst: limit.burst,
        };
        let body = serde_json::to_string(&take).map_err(err)?;
        let stub = self.namespace.get_by_name(&object_name(key)).map_err(err)?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post)
            .with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
        let req = Request::new_with_init(OBJECT_URL, &init).map_err(err)?;
        let mut resp = stub.fetch_with_request(req).await.map_err(err)?;
        if resp.status_code() != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Err(err(format!("{}: {text}", resp.status_code())));
        }
        resp.json::<Taken>().await.map_err(err)
    }
}

#[async_trait::async_trait(?Send)]
impl RateLimitStore for DoRateLimits {
    async fn take(
        &self,
        key: &str,
        limit: BucketLimit,
        _now_ms: u64,
    ) -> Result<BucketTake, StoreError> {
        match self.call(key, limit).await {
            Ok(Taken { taken: true, .. }) => Ok(BucketTake::Taken),
            Ok(Taken { retry_after_ms, .. }) => Ok(BucketTake::Empty { retry_after_ms }),
            Err(e) => {
                tracing::warn!(error = %e, "rate limit not applied (admitted)");
                Err(e)
            }
        }
    }
}

/// `app` keeping its rate-limit buckets in `PULLGATE_LIMITS` objects when the worker has the
/// binding; `app` as it was otherwise (per-isolate buckets).
pub(crate) fn attach(app: App, env: &Env) -> App {
    match env.durable_object(LIMITS_BINDING) {
        Ok(namespace) => app.with_rate_limits(Rc::new(DoRateLimits { namespace })),
        Err(_) => app,
    }
}
