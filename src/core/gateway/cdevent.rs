//! The CDEvents bodies pullgate emits (spec v0.4.1, the `*.0.2.0` event types of
//! [`crate::core::gateway::chain::cdevents`]). Pure.
//!
//! The spec's JSON schemas close every object (`additionalProperties: false`): `context` takes
//! only its own fields, `subject` needs `id`, `type` and `content`, and `subject.content`
//! takes only the fields defined for the event type. So each body carries:
//! - `subject.type`: the event's subject (`change`, `build`, `artifact`, `service`,
//!   `pipelineRun`);
//! - `subject.content`: only the schema's fields — `change.merged`: `repository.id`;
//!   `build.finished`: `artifactId`; `service.deployed`: `environment.id` (the stage) and
//!   `artifactId`; `pipelinerun.*`: `pipelineName` (the stage, or the webhook for the whole
//!   run), and `outcome`/`errors` once finished; `build.queued` and `artifact.published`:
//!   nothing. An artifact's subject `id` is its purl.
//! - `customData` (`application/json`): pullgate's own fields, which the schemas do not
//!   define — `run`, `stage`, `repository`, `ref`, `commit`, `image`, `digest`, `status`,
//!   `artifactId` and, on a stage dispatched to a cloudevents target, `stageCall`.

use crate::core::gateway::chain::{cdevents, Run, RunStatus, StageStatus};
use crate::core::gateway::event::SourceEvent;
use serde_json::{json, Map, Value};

/// CDEvents spec version of the bodies.
pub const SPEC_VERSION: &str = "0.4.1";

/// The `subject.type` of an event type (`dev.cdevents.<subject>.<predicate>.<version>`).
pub fn subject_type(event_type: &str) -> &str {
    match event_type {
        cdevents::CHANGE_MERGED => "change",
        cdevents::BUILD_QUEUED | cdevents::BUILD_FINISHED => "build",
        cdevents::ARTIFACT_PUBLISHED => "artifact",
        cdevents::SERVICE_DEPLOYED => "service",
        cdevents::PIPELINERUN_QUEUED | cdevents::PIPELINERUN_FINISHED => "pipelineRun",
        // Not one pullgate emits: the subject is the type's second component.
        other => other.split('.').nth(2).unwrap_or("unknown"),
    }
}

/// The (repository, ref, commit) of a run's source event.
pub(crate) fn event_fields(e: &SourceEvent) -> (String, String, String) {
    match e {
        SourceEvent::Push {
            repository,
            git_ref,
            commit,
            ..
        }
        | SourceEvent::Tag {
            repository,
            git_ref,
            commit,
            ..
        } => (repository.clone(), git_ref.clone(), commit.clone()),
        SourceEvent::Artifact {
            repository, digest, ..
        } => (repository.clone(), String::new(), digest.clone()),
    }
}

/// The run's image as a purl (`pkg:oci/<name>@<digest>?repository_url=<repo>`), once its
/// digest is known.
pub fn artifact_id(run: &Run) -> Option<String> {
    let digest = run.digest.as_deref()?;
    let (repo_url, name) = match run
        .image
        .as_deref()
        .and_then(|i| i.rsplit_once(':'))
        .map(|(r, _)| r)
    {
        Some(r) => (r.to_string(), r.rsplit('/').next().unwrap_or(r).to_string()),
        None => (String::new(), String::new()),
    };
    Some(format!(
        "pkg:oci/{name}@{}?repository_url={repo_url}",
        digest.replace(':', "%3A")
    ))
}

/// pullgate's own fields about the run, for `customData`.
fn custom_data(run: &Run, stage: Option<&str>, stage_call: Option<Value>) -> Value {
    let (repository, git_ref, commit) = event_fields(&run.event);
    let mut data = json!({
        "run": run.id,
        "stage": stage,
        "repository": repository,
        "ref": git_ref,
        "commit": commit,
        "image": run.image,
        "digest": run.digest,
        "status": run.status,
    });
    if let Some(purl) = artifact_id(run) {
        data["artifactId"] = Value::String(purl);
    }
    if let Some(x) = stage_call {
        data["stageCall"] = x;
    }
    data
}

/// `subject.content` for `event_type`: only the fields its schema defines.
fn content(run: &Run, event_type: &str, stage: Option<&str>) -> Value {
    let mut c = Map::new();
    let purl = artifact_id(run);
    match event_type {
        cdevents::CHANGE_MERGED => {
            let (repository, _, _) = event_fields(&run.event);
            if !repository.is_empty() {
                c.insert("repository".into(), json!({ "id": repository }));
            }
        }
        cdevents::BUILD_FINISHED => {
            if let Some(p) = purl {
                c.insert("artifactId".into(), Value::String(p));
            }
        }
        cdevents::SERVICE_DEPLOYED => {
            let environment = stage.unwrap_or(run.webhook.as_str());
            c.insert("environment".into(), json!({ "id": environment }));
            // Required and non-empty: the image by name when its digest is not known.
            let artifact = purl
                .or_else(|| run.image.clone())
                .unwrap_or_else(|| run.id.clone());
            c.insert("artifactId".into(), Value::String(artifact));
        }
        cdevents::PIPELINERUN_QUEUED => {
            let name = stage.unwrap_or(run.webhook.as_str());
            c.insert("pipelineName".into(), Value::String(name.to_string()));
        }
        cdevents::PIPELINERUN_FINISHED => {
            let name = stage.unwrap_or(run.webhook.as_str());
            c.insert("pipelineName".into(), Value::String(name.to_string()));
            let outcome = match run.status {
                RunStatus::Succeeded => "success",
                RunStatus::Failed => "failure",
                RunStatus::Running => "running",
            };
            c.insert("outcome".into(), Value::String(outcome.into()));
            if let Some(err) = run
                .stages
                .iter()
                .find(|s| s.status == StageStatus::Failed)
                .and_then(|s| s.detail.clone())
            {
                c.insert("errors".into(), Value::String(err));
            }
        }
        _ => {}
    }
    Value::Object(c)
}

/// The CDEvent about `run` (and `stage`), with id `delivery`, at `time` (RFC 3339).
/// `stage_call` is the stage payload when the event asks a cloudevents target to run a stage.
pub fn body(
    run: &Run,
    delivery: &str,
    event_type: &str,
    stage: Option<&str>,
    stage_call: Option<Value>,
    time: &str,
) -> Value {
    let source = format!("/pullgate/{}", run.webhook);
    let subject_id = match (event_type, artifact_id(run), stage) {
        (cdevents::ARTIFACT_PUBLISHED, Some(purl), _) => purl,
        (_, _, Some(s)) => format!("{}/{s}", run.id),
        (_, _, None) => run.id.clone(),
    };
    json!({
        "context": {
            "version": SPEC_VERSION,
            "id": delivery,
            "source": source,
            "type": event_type,
            "timestamp": time,
        },
        "subject": {
            "id": subject_id,
            "source": source,
            "type": subject_type(event_type),
            "content": content(run, event_type, stage),
        },
        "customData": custom_data(run, stage, stage_call),
        "customDataContentType": "application/json",
    })
}

#[cfg(test)]
mod tests {
    //! Every emitted event against the required and allowed fields of its CDEvents v0.4.1
    //! schema, hand-encoded from `schemas/<type>.json` of cdevents/spec at tag v0.4.1.

    use super::*;
    use crate::core::config::Secret;
    use crate::core::gateway::chain::{StageState, RUN_VERSION};
    use crate::core::gateway::config::{Target, TargetKind};
    use crate::core::gateway::outbox::{dispatch_request, event_request, StageCall};

    /// A `subject.content` field's schema.
    #[derive(Clone, Copy)]
    enum Field {
        /// `{"type": "string"}`, with `minLength: 1` when `non_empty`.
        Str { non_empty: bool },
        /// A closed object of string fields (`repository`, `environment`, `sbom`).
        Obj {
            required: &'static [&'static str],
            allowed: &'static [&'static str],
        },
    }

    struct Schema {
        event_type: &'static str,
        subject_type: &'static str,
        content: &'static [(&'static str, Field)],
        required: &'static [&'static str],
    }

    const STR: Field = Field::Str { non_empty: false };
    const NON_EMPTY: Field = Field::Str { non_empty: true };
    const ID_SOURCE: Field = Field::Obj {
        required: &["id"],
        allowed: &["id", "source"],
    };

    const SCHEMAS: &[Schema] = &[
        Schema {
            event_type: "dev.cdevents.change.merged.0.2.0",
            subject_type: "change",
            content: &[("repository", ID_SOURCE)],
            required: &[],
        },
        Schema {
            event_type: "dev.cdevents.build.queued.0.2.0",
            subject_type: "build",
            content: &[],
            required: &[],
        },
        Schema {
            event_type: "dev.cdevents.build.finished.0.2.0",
            subject_type: "build",
            content: &[("artifactId", STR)],
            required: &[],
        },
        Schema {
            event_type: "dev.cdevents.artifact.published.0.2.0",
            subject_type: "artifact",
            content: &[
                (
                    "sbom",
                    Field::Obj {
                        required: &["uri"],
                        allowed: &["uri"],
                    },
                ),
                ("user", NON_EMPTY),
            ],
            required: &[],
        },
        Schema {
            event_type: "dev.cdevents.service.deployed.0.2.0",
            subject_type: "service",
            content: &[("environment", ID_SOURCE), ("artifactId", NON_EMPTY)],
            required: &["environment", "artifactId"],
        },
        Schema {
            event_type: "dev.cdevents.pipelinerun.queued.0.2.0",
            subject_type: "pipelineRun",
            content: &[("pipelineName", STR), ("url", STR)],
            required: &[],
        },
        Schema {
            event_type: "dev.cdevents.pipelinerun.finished.0.2.0",
            subject_type: "pipelineRun",
            content: &[
                ("pipelineName", STR),
                ("url", STR),
                ("outcome", STR),
                ("errors", STR),
            ],
            required: &[],
        },
    ];

    const CONTEXT_REQUIRED: &[&str] = &["version", "id", "source", "type", "timestamp"];
    const CONTEXT_ALLOWED: &[&str] = &[
        "version",
        "id",
        "source",
        "type",
        "timestamp",
        "schemaUri",
        "chainId",
        "links",
    ];
    const SUBJECT_REQUIRED: &[&str] = &["id", "type", "content"];
    const SUBJECT_ALLOWED: &[&str] = &["id", "source", "type", "content"];
    const TOP_REQUIRED: &[&str] = &["context", "subject"];
    const TOP_ALLOWED: &[&str] = &["context", "subject", "customData", "customDataContentType"];

    fn non_empty_str(v: &Value) -> bool {
        v.as_str().is_some_and(|s| !s.is_empty())
    }

    /// The object's keys are among `allowed` and include `required`.
    fn closed(what: &str, v: &Value, required: &[&str], allowed: &[&str]) -> Result<(), String> {
        let o = v.as_object().ok_or(format!("{what} is not an object"))?;
        if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("{what}.{k} is not allowed"));
        }
        if let Some(k) = required.iter().find(|k| !o.contains_key(**k)) {
            return Err(format!("{what}.{k} is required"));
        }
        Ok(())
    }

    /// Checks a body against its event type's schema.
    fn validate(body: &Value) -> Result<(), String> {
        closed("event", body, TOP_REQUIRED, TOP_ALLOWED)?;
        let ctx = &body["context"];
        closed("context", ctx, CONTEXT_REQUIRED, CONTEXT_ALLOWED)?;
        for k in ["version", "id", "source"] {
            if !non_empty_str(&ctx[k]) {
                return Err(format!("context.{k} must be a non-empty string"));
            }
        }
        let ts = ctx["timestamp"].as_str().unwrap_or("");
        if ts.len() != 24 || &ts[10..11] != "T" || !ts.ends_with('Z') {
            return Err(format!("context.timestamp {ts:?} is not a date-time"));
        }
        let event_type = ctx["type"].as_str().unwrap_or("");
        let schema = SCHEMAS
            .iter()
            .find(|s| s.event_type == event_type)
            .ok_or(format!("no schema for {event_type:?}"))?;
        let subject = &body["subject"];
        closed("subject", subject, SUBJECT_REQUIRED, SUBJECT_ALLOWED)?;
        if !non_empty_str(&subject["id"]) || !non_empty_str(&subject["source"]) {
            return Err("subject.id and subject.source must be non-empty strings".into());
        }
        if subject["type"] != schema.subject_type {
            return Err(format!("subject.type must be {:?}", schema.subject_type));
        }
        let allowed: Vec<&str> = schema.content.iter().map(|(k, _)| *k).collect();
        let content = &subject["content"];
        closed("subject.content", content, schema.required, &allowed)?;
        for (k, field) in schema.content {
            let Some(v) = content.get(*k) else { continue };
            let ok = match field {
                Field::Str { non_empty } => v.is_string() && (!non_empty || non_empty_str(v)),
                Field::Obj { required, allowed } => {
                    closed(k, v, required, allowed)?;
                    v.as_object().is_some_and(|o| o.values().all(non_empty_str))
                }
            };
            if !ok {
                return Err(format!("subject.content.{k} has the wrong shape: {v}"));
            }
        }
        match body.get("customData") {
            None | Some(Value::Object(_)) | Some(Value::String(_)) => {}
            Some(v) => return Err(format!("customData must be an object or a string: {v}")),
        }
        if body
            .get("customDataContentType")
            .is_some_and(|v| !v.is_string())
        {
            return Err("customDataContentType must be a string".into());
        }
        Ok(())
    }

    /// The event types `chain::cdevents` declares, read from its source so a new one cannot
    /// be added without its schema here.
    fn declared_types() -> Vec<String> {
        include_str!("chain.rs")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|t| t.starts_with("dev.cdevents."))
            .map(str::to_string)
            .collect()
    }

    fn runs() -> Vec<Run> {
        let stage = |name: &str, status: StageStatus, detail: Option<&str>| StageState {
            name: name.into(),
            target: None,
            status,
            attempts: 1,
            attempt: 1,
            started_ms: Some(0),
            finished_ms: None,
            detail: detail.map(str::to_string),
        };
        let built = Run {
            v: RUN_VERSION,
            id: "run1".into(),
            webhook: "app".into(),
            event: SourceEvent::Push {
                repository: "https://github.com/acme/app.git".into(),
                git_ref: "refs/heads/main".into(),
                branch: "main".into(),
                commit: "abc".into(),
                author: "a".into(),
            },
            image: Some("reg.example/acme/app:main-abc".into()),
            digest: Some(format!("sha256:{}", "0".repeat(64))),
            stages: vec![stage("build", StageStatus::Succeeded, Some("ok"))],
            current: None,
            status: RunStatus::Succeeded,
            created_ms: 0,
            updated_ms: 1_795_305_600_000,
            timeline: vec![],
        };
        let failed = Run {
            image: None,
            digest: None,
            stages: vec![stage(
                "build",
                StageStatus::Failed,
                Some("target answered 503"),
            )],
            status: RunStatus::Failed,
            ..built.clone()
        };
        let artifact = Run {
            event: SourceEvent::Artifact {
                registry: String::new(),
                repository: "acme/app".into(),
                tag: None,
                digest: format!("sha256:{}", "1".repeat(64)),
                media_type: String::new(),
            },
            status: RunStatus::Running,
            ..failed.clone()
        };
        vec![built, failed, artifact]
    }

    fn sink() -> Target {
        Target {
            name: "events".into(),
            kind: TargetKind::CloudEvents,
            url: url::Url::parse("http://sink.test/events").unwrap(),
            token: Some(Secret::new("tok".into())),
            secret: None,
            git_ref: None,
            ca: None,
        }
    }

    #[test]
    fn every_emitted_event_type_validates_against_its_schema() {
        let types = declared_types();
        assert_eq!(types.len(), SCHEMAS.len(), "{types:?}");
        for run in runs() {
            for t in &types {
                for stage in [None, Some("build"), Some("deploy-prod")] {
                    let req = event_request(&sink(), &run, "d1", t, stage, None, 0).unwrap();
                    assert_eq!(req.headers()["ce-type"], t.as_str());
                    let body: Value = serde_json::from_slice(req.body()).unwrap();
                    if let Err(e) = validate(&body) {
                        panic!("{t} ({stage:?}, run {:?}): {e}\n{body:#}", run.status);
                    }
                }
            }
        }
    }

    #[test]
    fn a_stage_dispatched_to_a_cloudevents_target_validates_and_carries_the_call() {
        let run = runs().remove(0);
        let call = StageCall {
            run: &run,
            stage: "scan",
            delivery: "d2",
            run_token: "rt",
            callback: "/chain/run1/scan".into(),
        };
        let req = dispatch_request(&sink(), &call).unwrap();
        let body: Value = serde_json::from_slice(req.body()).unwrap();
        validate(&body).unwrap();
        assert_eq!(body["subject"]["type"], "pipelineRun");
        assert_eq!(body["subject"]["content"]["pipelineName"], "scan");
        assert_eq!(body["customData"]["stageCall"]["token"], "rt");
    }

    #[test]
    fn fields_the_schemas_do_not_define_are_in_custom_data() {
        let run = runs().remove(0);
        let body = super::body(
            &run,
            "d1",
            cdevents::ARTIFACT_PUBLISHED,
            Some("distribute"),
            None,
            "t",
        );
        let purl = format!(
            "pkg:oci/app@sha256%3A{}?repository_url=reg.example/acme/app",
            "0".repeat(64)
        );
        assert_eq!(
            body["subject"]["id"],
            purl.as_str(),
            "an artifact is named by its purl"
        );
        assert_eq!(body["subject"]["content"], json!({}));
        let data = &body["customData"];
        assert_eq!(data["image"], "reg.example/acme/app:main-abc");
        assert_eq!(data["artifactId"], purl.as_str());
        assert_eq!(
            (data["run"].as_str(), data["stage"].as_str()),
            (Some("run1"), Some("distribute"))
        );
        assert_eq!(body["customDataContentType"], "application/json");
    }

    #[test]
    fn the_validator_refuses_what_a_strict_consumer_refuses() {
        let run = runs().remove(0);
        let good = super::body(
            &run,
            "d1",
            cdevents::BUILD_QUEUED,
            None,
            None,
            "2026-11-22T00:00:00.000Z",
        );
        validate(&good).unwrap();
        let mut extra = good.clone();
        extra["subject"]["content"]["run"] = json!("run1");
        assert!(validate(&extra).is_err());
        let mut no_type = good.clone();
        no_type["subject"].as_object_mut().unwrap().remove("type");
        assert!(validate(&no_type).is_err());
        let mut deployed = super::body(
            &run,
            "d1",
            cdevents::SERVICE_DEPLOYED,
            None,
            None,
            "2026-11-22T00:00:00.000Z",
        );
        validate(&deployed).unwrap();
        deployed["subject"]["content"]
            .as_object_mut()
            .unwrap()
            .remove("environment");
        assert!(validate(&deployed).is_err());
    }
}
