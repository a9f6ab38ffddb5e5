//! Outbound deliveries: persisted records (`outbox/pending/<id>`, `outbox/dead/<id>`), the
//! retry schedule (exponential backoff with jitter, bounded attempts, then a dead-letter
//! record), and building each target's HTTP request. Pure; the gateway module stores records
//! and sends requests through the ports.
//!
//! Records hold no secrets: tokens and signatures are added when a request is built, from the
//! configuration in force at that moment.

use crate::core::gateway::cdevent::{self, event_fields};
use crate::core::gateway::chain::Run;
use crate::core::gateway::config::{Target, TargetKind};
use crate::core::gateway::event::SourceEvent;
use crate::core::gateway::verify::sign_hex;
use crate::core::time::rfc3339;
use bytes::Bytes;
use http::{header, Method, Request};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Version of the delivery record format.
pub const DELIVERY_VERSION: u32 = 1;
pub use crate::core::gateway::keys::{DEAD, PENDING};

/// What a delivery does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeliveryKind {
    /// Ask a target to run a stage.
    Dispatch {
        /// Stage.
        stage: String,
        /// Target name.
        target: String,
    },
    /// Send a CDEvent to a cloudevents target.
    Event {
        /// Target name.
        target: String,
        /// CDEvents type.
        event_type: String,
        /// Stage, if any.
        stage: Option<String>,
    },
    /// Pre-warm the cache with the run's image (pullgate's own `distribute`).
    Prewarm {
        /// Stage.
        stage: String,
    },
}

/// A persisted delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Format version.
    pub v: u32,
    /// Stable id (also the CloudEvents `ce-id`).
    pub id: String,
    /// Run id.
    pub run: String,
    /// What to do.
    pub kind: DeliveryKind,
    /// Attempts made.
    pub attempts: u32,
    /// Not before (ms).
    pub next_ms: u64,
    /// Created (ms).
    pub created_ms: u64,
    /// Last failure.
    pub last_error: Option<String>,
}

impl Delivery {
    /// The stage this delivery belongs to, if any.
    pub fn stage(&self) -> Option<&str> {
        match &self.kind {
            DeliveryKind::Dispatch { stage, .. } | DeliveryKind::Prewarm { stage } => Some(stage),
            DeliveryKind::Event { stage, .. } => stage.as_deref(),
        }
    }
}

/// A stable id for a delivery of `what` in `run` (the same across retries and restarts).
pub fn delivery_id(run: &str, what: &str) -> String {
    hex::encode(&Sha256::digest(format!("{run}\0{what}").as_bytes())[..16])
}

/// The delay before attempt `attempt + 1`, after `attempt` failures: `base · 2^(attempt−1)`,
/// capped at `max`, with jitter in [½, 1) of that derived from the id (deterministic, so the
/// core needs no random source).
pub fn retry_delay_ms(attempt: u32, base_ms: u64, max_ms: u64, id: &str) -> u64 {
    let exp = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(max_ms)
        .max(1);
    let h = Sha256::digest(format!("{id}:{attempt}").as_bytes());
    let r = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    exp / 2 + r % (exp / 2).max(1)
}

/// What a stage's target is told about the run.
pub struct StageCall<'a> {
    /// The run.
    pub run: &'a Run,
    /// The stage.
    pub stage: &'a str,
    /// Delivery id.
    pub delivery: &'a str,
    /// Token the target uses to post the stage result back.
    pub run_token: &'a str,
    /// Where to post it.
    pub callback: String,
}

fn ref_name(e: &SourceEvent) -> String {
    match e {
        SourceEvent::Push { branch, .. } => branch.clone(),
        SourceEvent::Tag { tag, .. } => tag.clone(),
        SourceEvent::Artifact { .. } => String::new(),
    }
}

/// The stage payload every target kind carries (at most 10 top-level keys, GitHub's limit).
fn stage_payload(c: &StageCall<'_>) -> Value {
    let (repository, git_ref, commit) = event_fields(&c.run.event);
    json!({
        "run": c.run.id,
        "stage": c.stage,
        "repository": repository,
        "ref": git_ref,
        "commit": commit,
        "image": c.run.image,
        "digest": c.run.digest,
        "callback": c.callback,
        "token": c.run_token,
    })
}

fn base(method: Method, t: &Target) -> http::request::Builder {
    let b = Request::builder()
        .method(method)
        .uri(t.url.as_str())
        .header(header::USER_AGENT, crate::core::http::USER_AGENT);
    match &t.ca {
        Some(ca) => b.extension(ca.clone()),
        None => b,
    }
}

fn bearer(b: http::request::Builder, t: &Target) -> http::request::Builder {
    match &t.token {
        Some(tok) => b.header(header::AUTHORIZATION, format!("Bearer {}", tok.expose())),
        None => b,
    }
}

/// A payload value as text (workflow inputs and pipeline variables are strings; null is
/// empty).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The headers GitHub's REST API asks for.
fn github_api(t: &Target) -> http::request::Builder {
    bearer(base(Method::POST, t), t)
        .header(header::ACCEPT, "application/vnd.github+json")
        .header("x-github-api-version", "2022-11-28")
        .header(header::CONTENT_TYPE, "application/json")
}

/// Builds the request that asks `t` to run a stage.
pub fn dispatch_request(t: &Target, c: &StageCall<'_>) -> Result<Request<Bytes>, String> {
    let payload = stage_payload(c);
    let (b, body): (http::request::Builder, Vec<u8>) = match t.kind {
        TargetKind::GitHubDispatch => {
            let event_type: String = format!("pullgate-{}", c.stage).chars().take(100).collect();
            let body = json!({ "event_type": event_type, "client_payload": payload });
            (github_api(t), body.to_string().into_bytes())
        }
        TargetKind::GitHubWorkflow => {
            let git_ref = t.git_ref.clone().unwrap_or_else(|| ref_name(&c.run.event));
            let inputs: serde_json::Map<String, Value> = payload
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), Value::String(as_text(v))))
                .collect();
            let body = json!({ "ref": git_ref, "inputs": inputs });
            (github_api(t), body.to_string().into_bytes())
        }
        TargetKind::GitLabPipeline => {
            let git_ref = t.git_ref.clone().unwrap_or_else(|| ref_name(&c.run.event));
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("token", t.token.as_ref().map(|s| s.expose()).unwrap_or(""));
            form.append_pair("ref", &git_ref);
            for (k, v) in payload.as_object().into_iter().flatten() {
                let key = format!("variables[PULLGATE_{}]", k.to_ascii_uppercase());
                form.append_pair(&key, &as_text(v));
            }
            let b = base(Method::POST, t)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            (b, form.finish().into_bytes())
        }
        TargetKind::CloudEvents => {
            return event_request(
                t,
                c.run,
                c.delivery,
                crate::core::gateway::chain::cdevents::PIPELINERUN_QUEUED,
                Some(c.stage),
                Some(payload),
                0,
            );
        }
        TargetKind::Http => {
            let body =
                json!({ "type": "pullgate.stage", "delivery": c.delivery, "payload": payload })
                    .to_string()
                    .into_bytes();
            let key = t.secret.as_ref().map(|s| s.expose().as_bytes());
            let sig = sign_hex(key.unwrap_or(b""), &body);
            let b = base(Method::POST, t)
                .header(header::CONTENT_TYPE, "application/json")
                .header("x-pullgate-delivery", c.delivery)
                .header("x-pullgate-signature", format!("sha256={sig}"));
            (b, body)
        }
    };
    b.body(Bytes::from(body)).map_err(|e| e.to_string())
}

/// Builds a CloudEvents 1.0 binary-mode request carrying a CDEvent about `run` (its body:
/// [`cdevent::body`]; `extra` is the stage payload when the event asks for a stage).
pub fn event_request(
    t: &Target,
    run: &Run,
    delivery: &str,
    event_type: &str,
    stage: Option<&str>,
    extra: Option<Value>,
    now_ms: u64,
) -> Result<Request<Bytes>, String> {
    let source = format!("/pullgate/{}", run.webhook);
    let time = rfc3339(if now_ms == 0 { run.updated_ms } else { now_ms });
    let body = cdevent::body(run, delivery, event_type, stage, extra, &time);
    bearer(base(Method::POST, t), t)
        .header("ce-specversion", "1.0")
        .header("ce-id", delivery)
        .header("ce-source", source.as_str())
        .header("ce-type", event_type)
        .header("ce-time", time.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body.to_string()))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let d1 = retry_delay_ms(1, 2000, 600_000, "x");
        assert!((1000..2000).contains(&d1), "{d1}");
        let d3 = retry_delay_ms(3, 2000, 600_000, "x");
        assert!((4000..8000).contains(&d3), "{d3}");
        let d30 = retry_delay_ms(30, 2000, 600_000, "x");
        assert!((300_000..600_000).contains(&d30), "{d30}");
        assert_eq!(retry_delay_ms(3, 2000, 600_000, "x"), d3, "deterministic");
        assert_ne!(
            retry_delay_ms(3, 2000, 600_000, "y"),
            d3,
            "jittered per delivery"
        );
    }

    #[test]
    fn delivery_ids_are_stable() {
        assert_eq!(
            delivery_id("r", "dispatch/build/1"),
            delivery_id("r", "dispatch/build/1")
        );
        assert_ne!(
            delivery_id("r", "dispatch/build/1"),
            delivery_id("r", "dispatch/scan/1")
        );
        assert_eq!(delivery_id("r", "x").len(), 32);
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;
    use crate::core::config::Secret;
    use crate::core::gateway::chain::{RunStatus, RUN_VERSION};

    fn run() -> Run {
        Run {
            v: RUN_VERSION,
            id: "run1".into(),
            webhook: "app".into(),
            event: SourceEvent::Push {
                repository: "https://gitlab.com/acme/app.git".into(),
                git_ref: "refs/heads/main".into(),
                branch: "main".into(),
                commit: "abc".into(),
                author: "a".into(),
            },
            image: Some("reg.example/acme/app:main-abc".into()),
            digest: Some("sha256:00".into()),
            stages: vec![],
            current: None,
            status: RunStatus::Running,
            created_ms: 0,
            updated_ms: 0,
            timeline: vec![],
        }
    }

    fn target(kind: TargetKind, url: &str) -> Target {
        Target {
            name: "t".into(),
            kind,
            url: url::Url::parse(url).unwrap(),
            token: Some(Secret::new("tok".into())),
            secret: Some(Secret::new("key".into())),
            git_ref: None,
            ca: None,
        }
    }

    fn call(r: &Run) -> StageCall<'_> {
        StageCall {
            run: r,
            stage: "build",
            delivery: "d1",
            run_token: "rt",
            callback: "/chain/run1/build".into(),
        }
    }

    #[test]
    fn a_target_ca_file_travels_with_every_request_kind() {
        let r = run();
        let ca = crate::core::ports::TrustedCa("/ca.pem".into());
        for kind in [
            TargetKind::GitHubDispatch,
            TargetKind::GitLabPipeline,
            TargetKind::CloudEvents,
            TargetKind::Http,
        ] {
            let mut t = target(kind, "https://ci.corp.test/hook");
            let plain = dispatch_request(&t, &call(&r)).unwrap();
            assert!(plain
                .extensions()
                .get::<crate::core::ports::TrustedCa>()
                .is_none());
            t.ca = Some(ca.clone());
            let req = dispatch_request(&t, &call(&r)).unwrap();
            assert_eq!(req.extensions().get(), Some(&ca), "{kind:?}");
        }
    }

    #[test]
    fn gitlab_pipeline_trigger_is_a_form_with_token_ref_and_variables() {
        let r = run();
        let req = dispatch_request(
            &target(
                TargetKind::GitLabPipeline,
                "https://gitlab.com/api/v4/projects/7/trigger/pipeline",
            ),
            &call(&r),
        )
        .unwrap();
        assert_eq!(
            req.headers()["content-type"],
            "application/x-www-form-urlencoded"
        );
        let form: Vec<(String, String)> = url::form_urlencoded::parse(req.body())
            .into_owned()
            .collect();
        assert!(form.contains(&("token".into(), "tok".into())));
        assert!(form.contains(&("ref".into(), "main".into())));
        assert!(form.contains(&("variables[PULLGATE_RUN]".into(), "run1".into())));
        assert!(form.contains(&(
            "variables[PULLGATE_IMAGE]".into(),
            "reg.example/acme/app:main-abc".into()
        )));
    }

    #[test]
    fn github_workflow_dispatch_has_ref_and_string_inputs() {
        let r = run();
        let req = dispatch_request(
            &target(
                TargetKind::GitHubWorkflow,
                "https://api.github.com/repos/a/b/actions/workflows/ci.yml/dispatches",
            ),
            &call(&r),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(req.body()).unwrap();
        assert_eq!(v["ref"], "main");
        assert!(v["inputs"]
            .as_object()
            .unwrap()
            .values()
            .all(|x| x.is_string()));
        assert_eq!(req.headers()["authorization"], "Bearer tok");
    }

    #[test]
    fn cloudevents_are_binary_mode_cdevents() {
        let r = run();
        let req = event_request(
            &target(TargetKind::CloudEvents, "http://sink/"),
            &r,
            "d9",
            "dev.cdevents.artifact.published.0.2.0",
            Some("distribute"),
            None,
            1_795_305_600_000,
        )
        .unwrap();
        let h = req.headers();
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-id"], "d9");
        assert_eq!(h["ce-type"], "dev.cdevents.artifact.published.0.2.0");
        assert_eq!(h["ce-time"], "2026-11-22T00:00:00.000Z");
        let v: Value = serde_json::from_slice(req.body()).unwrap();
        assert_eq!(v["context"]["id"], "d9");
        assert_eq!(
            v["subject"]["id"],
            "pkg:oci/app@sha256%3A00?repository_url=reg.example/acme/app"
        );
        assert_eq!(v["subject"]["type"], "artifact");
    }

    #[test]
    fn http_target_signs_its_body() {
        let r = run();
        let req = dispatch_request(&target(TargetKind::Http, "http://hook/"), &call(&r)).unwrap();
        let sig = req.headers()["x-pullgate-signature"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(sig, format!("sha256={}", sign_hex(b"key", req.body())));
    }
}
