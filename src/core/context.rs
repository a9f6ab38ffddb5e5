//! The shared state of one core instance ([`Inner`]) and what a registry handler works on
//! ([`Ctx`]). Every feature takes these; this file imports no handler, so features depend on
//! it and never on `app`.

use crate::core::access::limit::Limiter;
use crate::core::body::Body;
use crate::core::config::{Settings, UpstreamSpec};
use crate::core::gateway::state::GatewayState;
use crate::core::metrics::Metrics;
use crate::core::ports::Ports;
use crate::core::registry::fill::Fill;
use crate::core::registry::reference::Name;
use crate::core::registry::upstream::UpstreamClient;
use crate::core::registry::warm_tags::WarmTags;
use futures_util::future::LocalBoxFuture;
use http::{Request, Response};
use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Shared state of one core instance.
pub(crate) struct Inner {
    pub settings: Settings,
    pub ports: Ports,
    pub client: UpstreamClient,
    pub metrics: Rc<Metrics>,
    /// Blob fills in flight, by digest: concurrent misses join one upstream transfer.
    pub fills: RefCell<HashMap<String, Rc<Fill>>>,
    /// Warm tag answers kept decoded (used only over a store with a write generation).
    pub warm_tags: WarmTags,
    /// Per-instance state a feature owns (one value per type, made on first use), so this
    /// file need not know the feature's types: chart work in flight lives here.
    pub slots: Slots,
    /// A gateway outbox pass is running (one at a time across the instances that share it,
    /// see [`GatewayShare`]).
    pub pumping: Arc<AtomicBool>,
    /// When a request last started an outbox pass (ms).
    pub last_pump_ms: Cell<u64>,
    /// Rate-limit buckets.
    pub limiter: RefCell<Limiter>,
    /// Held across every read-modify-write of a gateway run record, so a stage result posted
    /// while the pump records a delivery attempt is never overwritten by a stale copy.
    /// Shared like `pumping` (a host running several instances over one store shares both).
    pub run_lock: Arc<futures_util::lock::Mutex<()>>,
    /// The gateway's in-memory state (webhook bodies held, index checks).
    pub gateway: GatewayState,
    /// The core's own dispatch, for requests pullgate makes to itself (the gateway's
    /// pre-warm pulls through the cache); set by `app`, so no feature imports it.
    pub dispatch: Dispatch,
}

/// A request handled by the whole core, as `App::handle` would.
pub(crate) type Dispatch = fn(Rc<Inner>, Request<()>) -> LocalBoxFuture<'static, Response<Body>>;

impl Inner {
    /// A fresh instance over its settings and ports.
    pub fn new(settings: Settings, ports: Ports, dispatch: Dispatch) -> Inner {
        let metrics = Rc::new(Metrics::default());
        let client =
            UpstreamClient::new(ports.upstream.clone(), ports.clock.clone(), metrics.clone())
                .with_outbound(settings.outbound.clone());
        Inner {
            settings,
            ports,
            client,
            metrics,
            fills: RefCell::new(HashMap::new()),
            warm_tags: WarmTags::default(),
            slots: Slots::default(),
            pumping: Arc::new(AtomicBool::new(false)),
            last_pump_ms: Cell::new(0),
            limiter: RefCell::new(Default::default()),
            run_lock: Arc::new(futures_util::lock::Mutex::new(())),
            gateway: Default::default(),
            dispatch,
        }
    }
}

/// A problem that did not change the answer (a best-effort write that failed), carried on a
/// handler's response into the `RequestInfo` error field for the host's log line.
#[derive(Debug, Clone)]
pub(crate) struct ResponseNote(pub String);

/// What a registry request handler works on.
pub(crate) struct Ctx<'a> {
    pub inner: &'a Rc<Inner>,
    pub up: &'a UpstreamSpec,
    pub up_index: usize,
    pub name: &'a Name,
    pub head: bool,
}

/// One value per type, created with `Default` on first use: state a feature keeps on the
/// instance without the context importing the feature.
#[derive(Default)]
pub(crate) struct Slots(RefCell<HashMap<TypeId, Rc<dyn Any>>>);

impl Slots {
    /// The instance's `T`, made on first use.
    pub fn get<T: Default + 'static>(&self) -> Rc<T> {
        let id = TypeId::of::<T>();
        if let Some(v) = self.0.borrow().get(&id) {
            if let Ok(t) = v.clone().downcast::<T>() {
                return t;
            }
        }
        let t = Rc::new(T::default());
        self.0.borrow_mut().insert(id, t.clone());
        t
    }
}

/// The gateway's cross-instance exclusion: one outbox pass at a time, and every
/// read-modify-write of a run record under one lock. A host that runs several core instances
/// over one store (the native host's threads) gives them all the same share; `Send`, so it
/// crosses threads.
#[derive(Clone, Default)]
pub struct GatewayShare {
    pub(crate) pumping: Arc<AtomicBool>,
    pub(crate) run_lock: Arc<futures_util::lock::Mutex<()>>,
}
