//! The gateway's runs and dedup records in a Durable Object: [`GatewayRecords`] is the object
//! (its storage is the records, keyed as the core keys them), and [`DoRecords`] is the core's
//! [`RecordStore`] port over the namespace binding `PULLGATE_RECORDS`. With the binding, run
//! records, their indexes and the replay-protection records live in the object instead of KV
//! (see `core::gateway::runstore`); deliveries, dead letters and the due index stay in KV.
//!
//! One object for the whole gateway (named [`OBJECT_NAME`]), not one per run: the decision that
//! must be atomic — has this commit already started runs? — is taken before a run (and so its
//! id) exists, and the replay records are keyed by body, not by run. A single object serialises
//! every read and write of them, in every isolate and location, and is strongly consistent
//! (KV takes up to 60 s to show a write elsewhere). The load is small: a few storage
//! operations per webhook, delivery attempt and stage result, far below what one object
//! serves. Its create is atomic because the object runs one request at a time across storage
//! operations (the input gate), and the check and the write have no other await between them.
//!
//! The port speaks a small JSON protocol over the object's `fetch` (values in hex, keys as
//! they are); it is internal to this worker, never reachable from outside it.
//!
//! # Limitations
//! - A run record read-modify-write (a stage result posted while a delivery attempt is being
//!   recorded) is still serialised by the isolate's lock only: two isolates updating one run
//!   at the same moment can lose one update (which the pump's retry or the target's next
//!   result repairs). Starting runs — the dedup decision — is atomic across isolates.
//! - Every record operation is a subrequest to the object (counted in the request's
//!   subrequest limit), and the object lives in one location: a webhook far from it pays the
//!   round trips.

use crate::core::app::App;
use crate::core::ports::{KvStore, RecordStore, StoreError};
use serde::{Deserialize, Serialize};
use std::rc::Rc;
// The `#[durable_object]` expansion names `wasm_bindgen` unqualified.
use worker::wasm_bindgen;
use worker::{
    durable_object, DurableObject, Env, ListOptions, Method, ObjectNamespace, Request, RequestInit,
    Response, State,
};

/// The Durable Object namespace binding.
pub const RECORDS_BINDING: &str = "PULLGATE_RECORDS";
/// The name of the gateway's one object.
pub const OBJECT_NAME: &str = "gateway";
/// The URL the port's requests to the object carry (never leaves the runtime).
const OBJECT_URL: &str = "https://gateway-records.pullgate.internal/op";

/// One operation on the records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Get { key: String },
    Put { key: String, value: String },
    Delete { key: String },
    List { prefix: String, limit: usize },
    Create { key: String, value: String },
}

/// The object's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    created: bool,
}

/// The gateway's records (a Durable Object class; `wrangler.toml` binds it as
/// `PULLGATE_RECORDS`, SQLite-backed).
#[durable_object]
pub struct GatewayRecords {
    state: State,
}

impl GatewayRecords {
    async fn apply(&self, op: Op) -> worker::Result<Reply> {
        let storage = self.state.storage();
        let mut reply = Reply::default();
        match op {
            Op::Get { key } => reply.value = storage.get::<String>(&key).await?,
            Op::Put { key, value } => storage.put(&key, value).await?,
            Op::Delete { key } => {
                storage.delete(&key).await?;
            }
            Op::List { prefix, limit } => {
                let map = storage
                    .list_with_options(ListOptions::new().prefix(&prefix).limit(limit))
                    .await?;
                for key in map.keys() {
                    if let Some(k) = key.ok().and_then(|k| k.as_string()) {
                        reply.keys.push(k);
                    }
                }
            }
            Op::Create { key, value } => {
                // No await but storage between the check and the write: atomic.
                if storage.get::<String>(&key).await?.is_none() {
                    storage.put(&key, value).await?;
                    reply.created = true;
                }
            }
        }
        Ok(reply)
    }
}

impl DurableObject for GatewayRecords {
    fn new(state: State, _env: Env) -> Self {
        GatewayRecords { state }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let op: Op = match req.json().await {
            Ok(op) => op,
            Err(e) => return Response::error(format!("not a records operation: {e}"), 400),
        };
        match self.apply(op).await {
            Ok(reply) => Response::from_json(&reply),
            Err(e) => Response::error(format!("records storage: {e}"), 500),
        }
    }
}

/// The core's record store over the gateway's object.
pub struct DoRecords {
    namespace: ObjectNamespace,
}

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("Durable Object {RECORDS_BINDING} {what}: {e}"))
}

impl DoRecords {
    async fn call(&self, op: &Op) -> Result<Reply, StoreError> {
        let what = match op {
            Op::Get { .. } => "get",
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::List { .. } => "list",
            Op::Create { .. } => "create",
        };
        let body = serde_json::to_string(op).map_err(|e| err(what, e))?;
        let stub = self
            .namespace
            .get_by_name(OBJECT_NAME)
            .map_err(|e| err(what, e))?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post)
            .with_body(Some(worker::wasm_bindgen::JsValue::from_str(&body)));
        let req = Request::new_with_init(OBJECT_URL, &init).map_err(|e| err(what, e))?;
        let mut resp = stub
            .fetch_with_request(req)
            .await
            .map_err(|e| err(what, e))?;
        if resp.status_code() != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Err(err(what, format!("{}: {text}", resp.status_code())));
        }
        resp.json::<Reply>().await.map_err(|e| err(what, e))
    }
}

#[async_trait::async_trait(?Send)]
impl KvStore for DoRecords {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let reply = self.call(&Op::Get { key: key.into() }).await?;
        reply
            .value
            .map(|v| hex::decode(v).map_err(|e| err("get", e)))
            .transpose()
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call(&Op::Put {
            key: key.into(),
            value: hex::encode(value),
        })
        .await
        .map(|_| ())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call(&Op::Delete { key: key.into() }).await.map(|_| ())
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .call(&Op::List {
                prefix: prefix.into(),
                limit,
            })
            .await?
            .keys)
    }
}

#[async_trait::async_trait(?Send)]
impl RecordStore for DoRecords {
    async fn create(&self, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .call(&Op::Create {
                key: key.into(),
                value: hex::encode(value),
            })
            .await?
            .created)
    }
}

/// `app` keeping its runs and dedup records in the gateway's object when the worker has the
/// namespace binding; `app` as it was otherwise (they stay in KV).
pub(crate) fn attach(app: App, env: &Env) -> App {
    match env.durable_object(RECORDS_BINDING) {
        Ok(namespace) => app.with_record_store(Rc::new(DoRecords { namespace })),
        Err(_) => app,
    }
}
