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
/// The origin of the port's requests to an object (never leaves the runtime).
const OBJECT_ORIGIN: &str = "https://rate-limits.pullgate.internal";
/// The storage key of an object's one bucket.
const BUCKET_KEY: &str = "bucket";

/// A take's request path: the bucket's limit (`/take?n=&per_ms=&burst=`). The object answers
/// `taken` or `empty <ms until the next token>`.
fn take_path(limit: BucketLimit) -> String {
    format!(
        "/take?n={}&per_ms={}&burst={}",
        limit.n, limit.per_ms, limit.burst
    )
}

/// Reads a take's limit from its URL.
fn parse_take(url: &worker::Url) -> Option<BucketLimit> {
    let get = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    Some(BucketLimit {
        n: u32::try_from(get("n")?).ok()?,
        per_ms: get("per_ms")?,
        burst: u32::try_from(get("burst")?).ok()?,
    })
}

/// The stored bucket as text: `v1 <tokens> <at_ms>`.
fn encode_bucket(b: &BucketState) -> String {
    format!("v1 {} {}", b.tokens, b.at_ms)
}

/// Reads [`encode_bucket`]'s text; None for anything else (a full bucket then).
fn decode_bucket(text: &str) -> Option<BucketState> {
    let mut parts = text.split(' ');
    if parts.next()? != "v1" {
        return None;
    }
    let tokens: f64 = parts.next()?.parse().ok()?;
    let at_ms: u64 = parts.next()?.parse().ok()?;
    tokens.is_finite().then_some(BucketState { tokens, at_ms })
}

/// One rate-limit bucket (a Durable Object class; `wrangler.toml` binds it as
/// `PULLGATE_LIMITS`, SQLite-backed).
#[durable_object]
pub struct RateLimits {
    state: State,
}

impl RateLimits {
    /// Takes a token under `limit`; the answer's text.
    async fn take(&self, limit: BucketLimit) -> worker::Result<String> {
        let storage = self.state.storage();
        // No await but storage between the read and the write: atomic (the input gate).
        let now = worker::js_sys::Date::now() as u64;
        let mut bucket = storage
            .get::<String>(BUCKET_KEY)
            .await?
            .and_then(|text| decode_bucket(&text))
            .unwrap_or_else(|| BucketState::full(limit, now));
        let outcome = bucket.take(limit, now);
        storage.put(BUCKET_KEY, encode_bucket(&bucket)).await?;
        Ok(match outcome {
            BucketTake::Taken => "taken".into(),
            BucketTake::Empty { retry_after_ms } => format!("empty {retry_after_ms}"),
        })
    }
}

impl DurableObject for RateLimits {
    fn new(state: State, _env: Env) -> Self {
        RateLimits { state }
    }

    async fn fetch(&self, req: Request) -> worker::Result<Response> {
        let Some(limit) = parse_take(&req.url()?) else {
            return Response::error("not a bucket take", 400);
        };
        match self.take(limit).await {
            Ok(answer) => Response::ok(answer),
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
    async fn call(&self, key: &str, limit: BucketLimit) -> Result<BucketTake, StoreError> {
        let stub = self.namespace.get_by_name(&object_name(key)).map_err(err)?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post);
        let url = format!("{OBJECT_ORIGIN}{}", take_path(limit));
        let req = Request::new_with_init(&url, &init).map_err(err)?;
        let mut resp = stub.fetch_with_request(req).await.map_err(err)?;
        let text = resp.text().await.unwrap_or_default();
        if resp.status_code() != 200 {
            return Err(err(format!("{}: {text}", resp.status_code())));
        }
        match text.split_once(' ') {
            None if text == "taken" => Ok(BucketTake::Taken),
            Some(("empty", ms)) => ms
                .parse()
                .map(|retry_after_ms| BucketTake::Empty { retry_after_ms })
                .map_err(err),
            _ => Err(err(format!("unexpected answer {text:?}"))),
        }
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
        self.call(key, limit).await.inspect_err(|e| {
            tracing::warn!(error = %e, "rate limit not applied (admitted)");
        })
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
