//! The one dispatch every host calls: [`App::handle`] turns a request into a response using
//! the ports it was built with. It admits the caller (access), then hands the request to the
//! feature that owns its route family: token, admin, gateway, charts, or the registry
//! endpoints (manifests, blobs, tags). It is the only module that imports the features'
//! handlers; nothing in the core imports it.

use crate::core::access::caller::Caller;
use crate::core::access::gate;
pub use crate::core::access::limit::LoginLockouts;
use crate::core::body::{Body, CacheStatus, RequestInfo};
use crate::core::config::Settings;
pub use crate::core::context::GatewayShare;
use crate::core::context::{Ctx, Inner, ResponseNote};
use crate::core::error::RegistryError;
pub use crate::core::gateway::{warm, WarmReport, WarmStep};
use crate::core::http::{error_response, text};
use crate::core::metrics::{inc, Metrics};
use crate::core::ports::{ByteStream, Ports, Readiness};
use crate::core::registry::media::parse_accept;
use crate::core::registry::range::parse_range;
use crate::core::registry::route::{parse_route, Endpoint, Route};
use crate::core::registry::{blobs, manifests, tags};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use std::rc::Rc;

/// The core: one per host instance (per isolate, per process).
#[derive(Clone)]
pub struct App {
    inner: Rc<Inner>,
}

impl App {
    /// Builds the core over its settings and ports.
    pub fn new(settings: Settings, ports: Ports) -> App {
        App::sharing(settings, ports, &GatewayShare::default())
    }

    /// Builds the core sharing the gateway's exclusion (one outbox pass at a time, the
    /// run-record lock) with the other instances built with the same `share`: required when
    /// several instances serve one store (the native host's threads), or two passes could send
    /// a delivery twice and a stage result could be lost.
    pub fn sharing(settings: Settings, ports: Ports, share: &GatewayShare) -> App {
        let mut inner = Inner::new(settings, ports, internal_dispatch);
        inner.pumping = share.pumping.clone();
        inner.run_lock = share.run_lock.clone();
        App {
            inner: Rc::new(inner),
        }
    }

    /// Coalesces this instance's blob fills with other instances' through `coordinator`
    /// (the native host's threads share one); without it every fill is this instance's own.
    pub fn with_fill_coordinator(
        self,
        coordinator: Rc<dyn crate::core::ports::FillCoordinator>,
    ) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::registry::fill::FillPort>();
        *port.0.borrow_mut() = coordinator;
        self
    }

    /// Keeps the rate-limit buckets in `store` instead of this instance's memory, so limits
    /// hold across instances that share the store (Spin: one instance per request).
    pub fn with_rate_limits(self, store: Rc<dyn crate::core::ports::RateLimitStore>) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::access::limit::RateLimitPort>();
        *port.0.borrow_mut() = Some(store);
        self
    }

    /// Checks logins against `lockouts` instead of a table of this instance's own, so failed
    /// logins lock a client or a name out of every instance that shares it (native: the
    /// serving threads of one process).
    pub fn with_login_lockouts(self, lockouts: LoginLockouts) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::access::limit::LoginPort>();
        *port.0.borrow_mut() = lockouts;
        self
    }

    /// Coordinates this instance's tag revalidations with other instances' through `flights`
    /// (a Durable Object per tag on Workers), so a burst for a stale or missing tag makes one
    /// upstream request; without it every instance asks the upstream for itself.
    pub fn with_tag_flights(self, flights: Rc<dyn crate::core::ports::TagFlights>) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::registry::tag_flight::TagFlightPort>();
        *port.0.borrow_mut() = Some(flights);
        self
    }

    /// Shares upstream bearer tokens through `store` (besides this instance's memory), so a
    /// token fetched by one instance is reused by the others until it expires.
    pub fn with_token_store(self, store: Rc<dyn crate::core::ports::TokenStore>) -> App {
        self.inner.client.set_token_store(store);
        self
    }

    /// Runs the gateway's due deliveries once. Hosts call it from a timer (native), a cron
    /// trigger or queue consumer (Workers), or on requests (Spin); webhooks also start it.
    pub async fn pump_outbox(&self) -> crate::core::gateway::PumpReport {
        crate::core::gateway::pump(&self.inner).await
    }

    /// Hands the gateway's new deliveries to `queue` (Cloudflare Queues on Workers): its
    /// consumer attempts each through [`App::deliver_queued`], and the consumer of its
    /// dead-letter queue records dead letters through [`App::dead_letter_queued`]. The outbox
    /// pump stays the fallback for deliveries the queue did not take or did not settle.
    pub fn with_delivery_queue(self, queue: Rc<dyn crate::core::ports::DeliveryQueue>) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::gateway::state::QueuePort>();
        *port.0.borrow_mut() = Some(queue);
        self
    }

    /// Keeps the gateway's runs and dedup records in `store` (a Durable Object on Workers):
    /// strongly consistent, and its atomic create makes "this commit already started runs"
    /// hold across instances that share no lock. Without it they stay in the key-value port.
    pub fn with_record_store<S: crate::core::ports::RecordStore + 'static>(
        self,
        store: Rc<S>,
    ) -> App {
        let port = self
            .inner
            .slots
            .get::<crate::core::gateway::runstore::RecordPort>();
        *port.0.borrow_mut() = Some((store.clone(), store));
        self
    }

    /// Attempts the pending delivery `id` for a queue consumer and says what to do with its
    /// message; a store failure is an error (the consumer retries the message).
    pub async fn deliver_queued(
        &self,
        id: &str,
    ) -> Result<crate::core::ports::QueueVerdict, crate::core::ports::StoreError> {
        crate::core::gateway::queue::deliver(&self.inner, id).await
    }

    /// Records the pending delivery `id` as a dead letter (listed and replayed by the admin
    /// API) for the consumer of the dead-letter queue; `why` is kept when no attempt recorded
    /// an error. Ok(false) when nothing was pending under `id`.
    pub async fn dead_letter_queued(
        &self,
        id: &str,
        why: &str,
    ) -> Result<bool, crate::core::ports::StoreError> {
        crate::core::gateway::queue::dead_letter(&self.inner, id, why).await
    }

    /// When the next pending delivery is due (ms since the epoch), if any.
    pub async fn next_delivery_due(&self) -> Option<u64> {
        crate::core::gateway::next_due(&self.inner).await
    }

    /// Pulls `image` (the `platforms`' manifests, all when empty) through this instance's
    /// cache as an internal caller, reporting each step: the `warm` command over a local
    /// cache. The same walk as the gateway's `distribute` stage.
    pub async fn warm(
        &self,
        image: &str,
        platforms: &[String],
        progress: &mut dyn FnMut(WarmStep),
    ) -> Result<WarmReport, String> {
        crate::core::gateway::warm_local(&self.inner, image, platforms, progress).await
    }

    /// The counters.
    pub fn metrics(&self) -> Rc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The settings this instance runs on.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Handles one request without a body (every registry route); see [`App::handle_with_body`].
    pub async fn handle(&self, req: &Request<()>) -> Response<Body> {
        self.handle_with_body(req, futures_util::stream::empty().boxed_local())
            .await
    }

    /// Handles one request. Never fails: errors become OCI envelopes on registry routes and
    /// JSON errors on gateway routes. The body is read only by routes that take one (webhooks,
    /// stage results), and never past their cap. The response carries a [`RequestInfo`]
    /// extension for the host's log line.
    pub async fn handle_with_body(&self, req: &Request<()>, body: ByteStream) -> Response<Body> {
        inc(&self.inner.metrics.requests);
        crate::core::gateway::pump_if_idle(&self.inner);
        let caller = match gate::admit(&self.inner, req).await {
            Ok(c) => c,
            Err(resp) => return with_info(*resp, info("denied", None)),
        };
        match self.feature_route(req, body, &caller).await {
            Some(resp) => resp,
            None => self.registry_route(req, &caller).await,
        }
    }

    /// The routes outside the registry API: token, admin, gateway, charts (None when none of
    /// them owns the path; only the token and gateway routes read a body).
    async fn feature_route(
        &self,
        req: &Request<()>,
        body: ByteStream,
        caller: &Caller,
    ) -> Option<Response<Body>> {
        let who = || Some(caller.principal.name.clone());
        let path = req.uri().path();
        if path == "/token" {
            let resp = gate::token_endpoint(&self.inner, req, body).await;
            return Some(with_info(resp, info("token", who())));
        }
        if let Some(resp) = crate::core::admin::handle(&self.inner, req, caller).await {
            return Some(with_info(resp, info("admin", who())));
        }
        if let Some(resp) = crate::core::gateway::handle(&self.inner, req, body, caller).await {
            let route = if path.starts_with("/hooks/") {
                "hook"
            } else {
                "chain"
            };
            return Some(with_info(resp, info(route, who())));
        }
        if let Some(repo) = path
            .strip_prefix("/charts/")
            .and_then(|r| r.split('/').next())
        {
            if let Err(resp) = gate::authorize_pull(&self.inner, req, caller, "charts", repo) {
                return Some(with_info(*resp, info("helm", who())));
            }
        }
        crate::core::helm::handle(&self.inner, req)
            .await
            .map(|resp| {
                let outcome = resp
                    .extensions()
                    .get::<crate::core::helm::HelmOutcome>()
                    .cloned();
                let mut i = info("helm", who());
                if let Some(o) = outcome {
                    i.cache = o.cache;
                    i.error = o.error;
                }
                with_info(resp, i)
            })
    }

    /// The registry API: route, authorize the repository, serve.
    async fn registry_route(&self, req: &Request<()>, caller: &Caller) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let settings = &self.inner.settings;
        let route = parse_route(settings, req.method(), req.uri().path(), req.uri().query());
        let mut i = info("error", Some(caller.principal.name.clone()));
        if let Ok(r) = &route {
            i.route = r.endpoint.kind();
            i.upstream = r.upstream.map(|u| settings.upstreams[u].host.clone());
        }
        let allowed = match &route {
            Ok(r) => match (r.upstream, r.name.as_ref()) {
                (Some(u), Some(name)) => gate::authorize_pull(
                    &self.inner,
                    req,
                    caller,
                    &settings.upstreams[u].host,
                    name.as_str(),
                ),
                _ if r.endpoint == Endpoint::Base => gate::authorize_base(&self.inner, req, caller),
                _ => Ok(()),
            },
            Err(_) => Ok(()),
        };
        if let Err(resp) = allowed {
            return with_info(*resp, i);
        }
        let result = match route {
            Ok(r) => self.dispatch(req, r, head).await,
            Err(e) => Err(e),
        };
        let resp = match result {
            Ok((mut resp, cache)) => {
                i.cache = cache;
                i.error = resp.extensions_mut().remove::<ResponseNote>().map(|n| n.0);
                resp
            }
            Err(e) => {
                if matches!(
                    e,
                    RegistryError::Unavailable(_) | RegistryError::BadUpstream(_)
                ) {
                    inc(&self.inner.metrics.upstream_errors);
                    tracing::warn!(
                        route = i.route,
                        upstream = i.upstream.as_deref().unwrap_or("-"),
                        path = req.uri().path(),
                        error = %e,
                        "upstream failed"
                    );
                }
                i.error = Some(e.to_string());
                error_response(&e, head)
            }
        };
        with_info(resp, i)
    }

    async fn dispatch(
        &self,
        req: &Request<()>,
        route: Route,
        head: bool,
    ) -> Result<(Response<Body>, CacheStatus), RegistryError> {
        let plain = |r| Ok((r, CacheStatus::None));
        let (Some(index), Some(name)) = (route.upstream, route.name.as_ref()) else {
            return match route.endpoint {
                Endpoint::Health => plain(text(StatusCode::OK, "text/plain", "ok\n".into())),
                Endpoint::Ready => plain(match req.extensions().get::<Readiness>() {
                    Some(Readiness::NotReady(why)) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: {why}\n"),
                    ),
                    _ => text(StatusCode::OK, "text/plain", "ready\n".into()),
                }),
                Endpoint::Metrics => plain(text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.inner.metrics.render(),
                )),
                _ => plain(text(StatusCode::OK, "application/json", "{}".into())),
            };
        };
        let ctx = Ctx {
            inner: &self.inner,
            up: &self.inner.settings.upstreams[index],
            up_index: index,
            name,
            head,
        };
        match &route.endpoint {
            Endpoint::Manifest(reference) => {
                let accept: Vec<&str> = req
                    .headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                manifests::get(&ctx, reference, &parse_accept(&accept)).await
            }
            Endpoint::Blob(digest) => {
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_range);
                blobs::get(&ctx, digest, range).await
            }
            Endpoint::TagsList { n, last } => {
                tags::list(
                    &ctx,
                    *n,
                    last.as_deref(),
                    &route.client_name,
                    route.ns.as_deref(),
                )
                .await
            }
            _ => plain(text(StatusCode::OK, "application/json", "{}".into())),
        }
    }
}

/// The log-line facts of a request that carries no upstream or cache outcome (yet).
fn info(route: &'static str, identity: Option<String>) -> RequestInfo {
    RequestInfo {
        route,
        upstream: None,
        cache: CacheStatus::None,
        error: None,
        identity,
    }
}

fn with_info(mut resp: Response<Body>, info: RequestInfo) -> Response<Body> {
    resp.extensions_mut().insert(info);
    resp
}

/// The dispatch requests pullgate makes to itself go through (see `Inner::dispatch`).
fn internal_dispatch(
    inner: Rc<Inner>,
    req: Request<()>,
) -> LocalBoxFuture<'static, Response<Body>> {
    Box::pin(async move { App { inner }.handle(&req).await })
}
