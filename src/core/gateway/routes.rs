//! The `/chain…` routes: listing and reading runs, dead letters and their replay, an outbox
//! pass on demand (admin), stage results and the digest override (see [`super::callback`]).

use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::ct::tokens_match;
use crate::core::gateway::config::GatewaySettings;
use crate::core::gateway::keys::{commit_index, repository_prefix};
use crate::core::gateway::outbox::DEAD;
use crate::core::gateway::records::{load_delivery, load_run, save_run};
use crate::core::gateway::{callback, internal, pump, spawn_pump};
use crate::core::http::{bearer, json_error as error, json_response, query_param};
use crate::core::ports::{ByteStream, StoreError};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::rc::Rc;

/// Routes `/chain/<rest>`: stage results with their run token, everything else as an admin.
pub(super) async fn chain_route(
    inner: &Rc<Inner>,
    req: &Request<()>,
    rest: &str,
    body: ByteStream,
    caller: &crate::core::access::caller::Caller,
) -> Response<Body> {
    let gw = &inner.settings.gateway;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let m = req.method();
    // Stage results authenticate with the run's own token; everything else is admin.
    if let ([run_id, stage], true) = (parts.as_slice(), *m == Method::POST) {
        if *run_id != "dead-letters" && *run_id != "outbox" {
            return callback::stage_result(inner, run_id, stage, req.headers(), body, caller).await;
        }
    }
    // Replays and pumps are the `trigger` action; reading runs is `admin`.
    let action = if *m == Method::POST {
        "trigger"
    } else {
        "admin"
    };
    if let Some(refusal) = refuse_non_admin(gw, req.headers()) {
        if !crate::core::access::caller::may_administer(inner, caller, action) {
            return refusal;
        }
    }
    match (m.clone(), parts.as_slice()) {
        (Method::GET, []) => list_runs(inner, req.uri().query()).await,
        (Method::GET, ["dead-letters"]) => dead_letters(inner).await,
        (Method::POST, ["dead-letters", id, "replay"]) => replay_dead_letter(inner, id).await,
        (Method::PUT, [id, "digest"]) => callback::set_digest(inner, id, body).await,
        (Method::POST, ["outbox", "pump"]) => {
            let report = pump::pump(inner).await;
            json_response(
                StatusCode::OK,
                serde_json::to_value(report).unwrap_or(Value::Null),
            )
        }
        (Method::GET, [id]) => match load_run(inner, id).await {
            Ok(Some(run)) => json_response(
                StatusCode::OK,
                serde_json::to_value(&run).unwrap_or(Value::Null),
            ),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no run {id:?}")),
            Err(e) => internal(e),
        },
        _ => error(StatusCode::NOT_FOUND, "no such chain route"),
    }
}

/// `GET /chain?repository=<url>[&commit=<sha>]`: a repository's (or commit's) runs.
async fn list_runs(inner: &Inner, query: Option<&str>) -> Response<Body> {
    let Some(repo) = query_param(query, "repository") else {
        return error(
            StatusCode::BAD_REQUEST,
            "list runs with ?repository=<url>[&commit=<sha>]",
        );
    };
    let prefix = match query_param(query, "commit") {
        Some(c) => commit_index(&repo, &c),
        None => repository_prefix(&repo),
    };
    let keys = match crate::core::gateway::runstore::runs(inner)
        .list(&prefix, 200)
        .await
    {
        Ok(k) => k,
        Err(e) => return internal(e),
    };
    let mut runs = Vec::new();
    for k in keys {
        let id = k.rsplit('/').next().unwrap_or("");
        if let Ok(Some(run)) = load_run(inner, id).await {
            runs.push(json!({ "id": run.id, "status": run.status, "stage": run.current_stage(), "image": run.image, "event": run.event, "created_ms": run.created_ms }));
        }
    }
    json_response(StatusCode::OK, json!({ "runs": runs }))
}

/// `GET /chain/dead-letters`.
async fn dead_letters(inner: &Inner) -> Response<Body> {
    match inner.ports.kv.list(DEAD, 500).await {
        Ok(keys) => {
            let mut out = Vec::new();
            for k in keys {
                if let Ok(Some(d)) = load_delivery(inner, &k).await {
                    out.push(d);
                }
            }
            json_response(StatusCode::OK, json!({ "dead_letters": out }))
        }
        Err(e) => internal(e),
    }
}

/// `POST /chain/dead-letters/<id>/replay`: the dead letter becomes pending again, its stage
/// reopened, and leased to the host's queue when it has one.
async fn replay_dead_letter(inner: &Rc<Inner>, id: &str) -> Response<Body> {
    let key = format!("{DEAD}{id}");
    let mut d = match load_delivery(inner, &key).await {
        Ok(Some(d)) => d,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no dead letter {id:?}")),
        Err(e) => return internal(e),
    };
    let now = inner.ports.clock.now_ms();
    d.attempts = 0;
    d.next_ms = now;
    d.last_error = None;
    let r = async {
        crate::core::gateway::records::save_pending(inner, &d, None).await?;
        inner.ports.kv.delete(&key).await?;
        let _guard = inner.run_lock.lock().await;
        if let (Some(stage), Some(mut run)) = (d.stage(), load_run(inner, &d.run).await?) {
            run.reopen(stage, now);
            save_run(inner, &run).await?;
        }
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = r {
        return internal(e);
    }
    // After the stage reopened: a queue's consumer may attempt it at once.
    crate::core::gateway::records::hand_off(inner, &d).await;
    spawn_pump(inner);
    json_response(
        StatusCode::ACCEPTED,
        json!({ "status": "replaying", "delivery": d.id }),
    )
}

/// None when the request carries the admin token; otherwise the refusal to send.
pub(super) fn refuse_non_admin(gw: &GatewaySettings, h: &HeaderMap) -> Option<Response<Body>> {
    let Some(token) = &gw.admin_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin routes are disabled: set [gateway] admin_token",
        ));
    };
    match bearer(h) {
        Some(given) if tokens_match(given, token.expose()) => None,
        _ => Some(error(StatusCode::UNAUTHORIZED, "admin token required")),
    }
}
