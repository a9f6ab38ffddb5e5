//! The one dispatch every host calls: [`App::handle`] turns a request into a response using
//! the ports it was built with. It routes, validates, and hands each endpoint to its module
//! (`manifests`, `blobs`, `tags`); it builds every error as the OCI envelope.

use crate::core::access::gate;
use crate::core::blobs::{self, Fill};
use crate::core::body::{Body, CacheStatus, RequestInfo};
use crate::core::config::{Settings, UpstreamSpec};
use crate::core::error::RegistryError;
use crate::core::manifests;
use crate::core::media::{header as h, parse_accept};
use crate::core::metrics::{inc, Metrics};
use crate::core::ports::{ByteStream, Ports};
use crate::core::range::parse_range;
use crate::core::reference::Name;
use crate::core::route::{parse_route, Endpoint, Route};
use crate::core::tags;
use crate::core::upstream::UpstreamClient;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Shared state of one core instance.
pub(crate) struct Inner {
    pub settings: Settings,
    pub ports: Ports,
    pub client: UpstreamClient,
    pub metrics: Rc<Metrics>,
    /// Blob fills in flight, by digest: concurrent misses join one upstream transfer.
    pub fills: RefCell<HashMap<String, Rc<Fill>>>,
    /// Chart repository work in flight (index revalidations, chart fills), shared by
    /// concurrent identical misses.
    pub helm: crate::core::helm::flight::InFlight,
    /// A gateway outbox pass is running (one at a time per instance).
    pub pumping: Cell<bool>,
    /// When a request last started an outbox pass (ms).
    pub last_pump_ms: Cell<u64>,
    /// Rate-limit buckets.
    pub limiter: RefCell<crate::core::access::limit::Limiter>,
    /// Held across every read-modify-write of a gateway run record, so a stage result posted
    /// while the pump records a delivery attempt is never overwritten by a stale copy.
    pub run_lock: futures_util::lock::Mutex<()>,
    /// The gateway's in-memory state (webhook bodies held, index checks).
    pub gateway: crate::core::gateway::state::GatewayState,
}

/// A problem that did not change the answer (a best-effort write that failed), carried on a
/// handler's response into the [`RequestInfo`] error field for the host's log line.
#[derive(Debug, Clone)]
pub(crate) struct ResponseNote(pub String);

/// What a request handler works on.
pub(crate) struct Ctx<'a> {
    pub inner: &'a Rc<Inner>,
    pub up: &'a UpstreamSpec,
    pub up_index: usize,
    pub name: &'a Name,
    pub head: bool,
}

/// The core: one per host instance (per isolate, per process).
#[derive(Clone)]
pub struct App {
    inner: Rc<Inner>,
}

/// Builds a response with the registry API version header.
pub(crate) fn response(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(h::API_VERSION, h::API_VERSION_VALUE)
}

/// The OCI error envelope for `e` (headers only for HEAD).
pub(crate) fn error_response(e: &RegistryError, head: bool) -> Response<Body> {
    let body = e.envelope();
    let len = body.len();
    response(e.status())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .body(if head {
            Body::Empty
        } else {
            Body::Bytes(body.into())
        })
        .unwrap_or_else(|_| Response::new(Body::Empty))
}

/// A JSON response (the non-registry routes: gateway, admin, token, charts).
pub(crate) fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    text(status, "application/json", v.to_string())
}

/// `{"error": msg}` with `status`.
pub(crate) fn json_error(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": msg.into() }))
}

fn text(status: StatusCode, content_type: &str, text: String) -> Response<Body> {
    let len = text.len();
    response(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(Body::Bytes(text.into()))
        .unwrap_or_else(|_| Response::new(Body::Empty))
}

impl App {
    /// Builds the core over its settings and ports.
    pub fn new(settings: Settings, ports: Ports) -> App {
        let metrics = Rc::new(Metrics::default());
        let client =
            UpstreamClient::new(ports.upstream.clone(), ports.clock.clone(), metrics.clone())
                .with_outbound(settings.outbound.clone());
        App {
            inner: Rc::new(Inner {
                settings,
                ports,
                client,
                metrics,
                fills: RefCell::new(HashMap::new()),
                helm: Default::default(),
                pumping: Cell::new(false),
                last_pump_ms: Cell::new(0),
                limiter: RefCell::new(Default::default()),
                run_lock: futures_util::lock::Mutex::new(()),
                gateway: Default::default(),
            }),
        }
    }

    pub(crate) fn from_inner(inner: Rc<Inner>) -> App {
        App { inner }
    }

    /// Runs the gateway's due deliveries once. Hosts call it from a timer (native), a cron
    /// trigger or queue consumer (Workers), or on requests (Spin); webhooks also start it.
    pub async fn pump_outbox(&self) -> crate::core::gateway::PumpReport {
        crate::core::gateway::pump(&self.inner).await
    }

    /// When the next pending delivery is due (ms since the epoch), if any.
    pub async fn next_delivery_due(&self) -> Option<u64> {
        crate::core::gateway::next_due(&self.inner).await
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
        let info = |route: &'static str, identity: Option<String>| RequestInfo {
            route,
            upstream: None,
            cache: CacheStatus::None,
            error: None,
            identity,
        };
        let caller = match gate::admit(&self.inner, req).await {
            Ok(c) => c,
            Err(resp) => {
                let mut resp = *resp;
                resp.extensions_mut().insert(info("denied", None));
                return resp;
            }
        };
        let who = Some(caller.principal.name.clone());
        let path = req.uri().path();
        if path == "/token" {
            let mut resp = gate::token_endpoint(&self.inner, req, body).await;
            resp.extensions_mut().insert(info("token", who));
            return resp;
        }
        if let Some(mut resp) = crate::core::admin::handle(&self.inner, req, &caller).await {
            resp.extensions_mut().insert(info("admin", who));
            return resp;
        }
        if let Some(mut resp) = crate::core::gateway::handle(&self.inner, req, body, &caller).await
        {
            let route = if path.starts_with("/hooks/") {
                "hook"
            } else {
                "chain"
            };
            resp.extensions_mut().insert(info(route, who));
            return resp;
        }
        if let Some(repo) = path
            .strip_prefix("/charts/")
            .and_then(|r| r.split('/').next())
        {
            if let Err(resp) = gate::authorize_pull(&self.inner, req, &caller, "charts", repo) {
                let mut resp = *resp;
                resp.extensions_mut().insert(info("helm", who));
                return resp;
            }
        }
        if let Some(mut resp) = crate::core::helm::handle(&self.inner, req).await {
            let outcome = resp
                .extensions()
                .get::<crate::core::helm::HelmOutcome>()
                .cloned();
            let mut i = info("helm", who);
            if let Some(o) = outcome {
                i.cache = o.cache;
                i.error = o.error;
            }
            resp.extensions_mut().insert(i);
            return resp;
        }
        let head = req.method() == Method::HEAD;
        let route = parse_route(
            &self.inner.settings,
            req.method(),
            req.uri().path(),
            req.uri().query(),
        );
        let (route_kind, upstream) = match &route {
            Ok(r) => (
                r.endpoint.kind(),
                r.upstream
                    .map(|i| self.inner.settings.upstreams[i].host.clone()),
            ),
            Err(_) => ("error", None),
        };
        let gate_result = match &route {
            Ok(r) => match (r.upstream, r.name.as_ref()) {
                (Some(i), Some(name)) => gate::authorize_pull(
                    &self.inner,
                    req,
                    &caller,
                    &self.inner.settings.upstreams[i].host,
                    name.as_str(),
                ),
                _ if r.endpoint == Endpoint::Base => {
                    gate::authorize_base(&self.inner, req, &caller)
                }
                _ => Ok(()),
            },
            Err(_) => Ok(()),
        };
        if let Err(resp) = gate_result {
            let mut resp = *resp;
            resp.extensions_mut().insert(RequestInfo {
                route: route_kind,
                upstream,
                cache: CacheStatus::None,
                error: None,
                identity: who,
            });
            return resp;
        }
        let result = match route {
            Ok(r) => self.dispatch(req, r, head).await,
            Err(e) => Err(e),
        };
        let (mut resp, cache, error) = match result {
            Ok((mut resp, cache)) => {
                let note = resp.extensions_mut().remove::<ResponseNote>().map(|n| n.0);
                (resp, cache, note)
            }
            Err(e) => {
                if matches!(
                    e,
                    RegistryError::Unavailable(_) | RegistryError::BadUpstream(_)
                ) {
                    inc(&self.inner.metrics.upstream_errors);
                }
                (
                    error_response(&e, head),
                    CacheStatus::None,
                    Some(e.to_string()),
                )
            }
        };
        resp.extensions_mut().insert(RequestInfo {
            route: route_kind,
            upstream,
            cache,
            error,
            identity: who,
        });
        resp
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

/// Sets a header from a string, skipping values that are not valid header text.
pub(crate) fn set_header(resp: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}
