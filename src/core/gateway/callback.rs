//! Stage results posted back by the systems a run dispatched to (`POST /chain/<run>/<stage>`),
//! and the admin's digest override (`PUT /chain/<run>/digest`).
//!
//! A target is given a token for one execution of one stage: [`stage_token`] over (run,
//! stage, attempt) keyed by `[gateway] run_secret`. It is accepted only for that stage while
//! that execution is current, so a build job cannot post `scan` or `sign`, nor a result for an
//! earlier or later attempt. An admin (the admin token, or an identity allowed the `admin`
//! action) may post any stage's result. The run's digest is the `build` stage's output: once
//! `build` has finished, a result carrying another digest is refused (409) and only the admin
//! route changes it ([`Run::may_set_digest`]).

use crate::core::access::caller::{is_admin, Caller};
use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::ct::tokens_match;
use crate::core::gateway::chain::{ChainError, Run};
use crate::core::gateway::records::{enqueue, load_run, save_run};
use crate::core::gateway::verify::stage_token;
use crate::core::gateway::{internal, spawn_pump};
use crate::core::http::bearer;
use crate::core::http::{json_error as error, json_response};
use crate::core::http::{read_capped, ReadError};
use crate::core::ports::ByteStream;
use crate::core::registry::reference::parse_digest;
use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;
use std::rc::Rc;

/// Largest stage-result body read.
const MAX_RESULT_BODY: usize = 64 * 1024;

/// The token a target gets for the current execution of `stage` of `run` (None without a
/// `run_secret`, when no callback can be accepted anyway).
pub(crate) fn token_for(inner: &Inner, run: &Run, stage: &str) -> Option<String> {
    let key = inner.settings.gateway.run_secret.as_ref()?;
    let attempt = run.stage_attempt(stage)?;
    Some(stage_token(
        key.expose().as_bytes(),
        &run.id,
        stage,
        attempt,
    ))
}

fn run_json(run: &Run) -> Response<Body> {
    json_response(
        StatusCode::OK,
        serde_json::to_value(run).unwrap_or(Value::Null),
    )
}

/// A refusal: status and message.
type Refusal = (StatusCode, String);

fn refused((status, msg): Refusal) -> Response<Body> {
    error(status, msg)
}

async fn read_json(body: ByteStream) -> Result<Value, Refusal> {
    let body = match read_capped(body, MAX_RESULT_BODY).await {
        Ok(b) => b,
        Err(ReadError::TooLarge(_)) => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "result body too large".into(),
            ))
        }
        Err(ReadError::Failed(e)) => return Err((StatusCode::BAD_REQUEST, e)),
    };
    serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body must be JSON: {e}")))
}

fn digest_of(v: &Value) -> Result<Option<String>, Refusal> {
    match v.get("digest") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(d)) => parse_digest(d)
            .map(|d| Some(d.as_str().to_string()))
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("digest: {e}"))),
        Some(_) => Err((StatusCode::BAD_REQUEST, "digest must be a string".into())),
    }
}

/// What a stage result says.
struct StageResult {
    success: bool,
    digest: Option<String>,
    detail: Option<String>,
}

/// Reads `{"status": "succeeded"|"failed", "digest"?, "detail"?}`.
fn parse_result(v: &Value) -> Result<StageResult, Refusal> {
    let success = match v.get("status").and_then(|s| s.as_str()) {
        Some("succeeded") | Some("success") => true,
        Some("failed") | Some("failure") => false,
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "result needs \"status\": \"succeeded\" or \"failed\"".into(),
            ))
        }
    };
    let digest = digest_of(v)?;
    let detail = v
        .get("detail")
        .and_then(|d| d.as_str())
        .map(|d| d.chars().take(500).collect());
    Ok(StageResult {
        success,
        digest,
        detail,
    })
}

/// Checks the stage token of a non-admin caller: the attempt it was issued for, or the
/// refusal to send. An unknown run and a wrong token answer alike: run ids are not confirmed
/// to callers without a token.
async fn authorize_stage(
    inner: &Inner,
    run_id: &str,
    stage: &str,
    headers: &HeaderMap,
) -> Result<Option<u32>, Box<Response<Body>>> {
    if inner.settings.gateway.run_secret.is_none() {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "stage results are disabled: set [gateway] run_secret or admin_token",
        )));
    }
    let run = load_run(inner, run_id)
        .await
        .map_err(|e| Box::new(internal(e)))?;
    let expected = run.as_ref().and_then(|r| token_for(inner, r, stage));
    match (bearer(headers), expected) {
        (Some(given), Some(exp)) if tokens_match(given, &exp) => {
            Ok(run.as_ref().and_then(|r| r.stage_attempt(stage)))
        }
        _ => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "the token for this stage's current attempt is required",
        ))),
    }
}

/// `POST /chain/<run>/<stage>`: a stage's result.
pub(crate) async fn stage_result(
    inner: &Rc<Inner>,
    run_id: &str,
    stage: &str,
    headers: &HeaderMap,
    body: ByteStream,
    caller: &Caller,
) -> Response<Body> {
    let admin = is_admin(inner, headers, caller);
    // The attempt the token was issued for; checked again under the lock.
    let attempt = if admin {
        None
    } else {
        match authorize_stage(inner, run_id, stage, headers).await {
            Ok(a) => a,
            Err(refusal) => return *refusal,
        }
    };
    let result = match read_json(body).await.and_then(|v| parse_result(&v)) {
        Ok(r) => r,
        Err(r) => return refused(r),
    };
    let StageResult {
        success,
        digest,
        detail,
    } = result;
    let _guard = inner.run_lock.lock().await;
    let mut run = match load_run(inner, run_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no run {run_id:?}")),
        Err(e) => return internal(e),
    };
    if attempt.is_some() && run.stage_attempt(stage) != attempt {
        return error(
            StatusCode::CONFLICT,
            "the stage was replayed since this token was issued",
        );
    }
    if let Some(d) = &digest {
        if !admin && !run.may_set_digest(stage, d) {
            return error(
                StatusCode::CONFLICT,
                "the run's digest is fixed once build has finished; only an admin can change it",
            );
        }
    }
    let now = inner.ports.clock.now_ms();
    let actions = match run.complete(stage, success, detail, now) {
        Ok(a) => a,
        Err(e @ ChainError::NotRunning(_)) | Err(e @ ChainError::Finished) => {
            return error(StatusCode::CONFLICT, e.to_string())
        }
    };
    if let Some(d) = digest {
        run.digest = Some(d);
    }
    if let Err(e) = async {
        save_run(inner, &run).await?;
        enqueue(inner, &run, actions).await
    }
    .await
    {
        return internal(e);
    }
    spawn_pump(inner);
    run_json(&run)
}

/// `PUT /chain/<run>/digest` (admin): sets the run's digest, whatever its stages say.
pub(crate) async fn set_digest(
    inner: &Rc<Inner>,
    run_id: &str,
    body: ByteStream,
) -> Response<Body> {
    let v = match read_json(body).await {
        Ok(v) => v,
        Err(r) => return refused(r),
    };
    let digest = match digest_of(&v) {
        Ok(Some(d)) => d,
        Ok(None) => return error(StatusCode::BAD_REQUEST, "body needs \"digest\""),
        Err(r) => return refused(r),
    };
    let _guard = inner.run_lock.lock().await;
    let mut run = match load_run(inner, run_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no run {run_id:?}")),
        Err(e) => return internal(e),
    };
    let now = inner.ports.clock.now_ms();
    run.note(now, None, format!("digest set to {digest} by an admin"));
    run.digest = Some(digest);
    if let Err(e) = save_run(inner, &run).await {
        return internal(e);
    }
    run_json(&run)
}
