//! Chain runs: one record per matched event, walking the configured stages
//! (build → scan → sign → distribute → deploy …). Pure state transitions; the gateway module
//! persists runs and turns the returned [`Action`]s into outbox deliveries.
//!
//! A stage is *running* once its target was asked to act; it finishes only on evidence: a
//! registry notification for the run's image (for `build`), a result posted back to
//! `POST /chain/<run>/<stage>`, or pullgate's own pre-warm (for `distribute` without a target).
//! A stage with no target (other than `distribute`) is skipped. A failed stage stops the run.

use crate::core::gateway::config::{GatewaySettings, RuleConfig};
use crate::core::gateway::event::SourceEvent;
use serde::{Deserialize, Serialize};

/// Version of the run record format.
pub const RUN_VERSION: u32 = 1;
/// pullgate's own stage.
pub const DISTRIBUTE: &str = "distribute";
/// Most timeline entries kept per run.
const MAX_TIMELINE: usize = 200;

/// A stage's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Not reached yet.
    Pending,
    /// Asked to act; waiting for evidence.
    Running,
    /// Done.
    Succeeded,
    /// Failed: the run stopped here.
    Failed,
    /// Not run (before the rule's starting stage, or no target).
    Skipped,
}

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageState {
    /// Stage name.
    pub name: String,
    /// Target that runs it, if any.
    pub target: Option<String>,
    /// State.
    pub status: StageStatus,
    /// Delivery attempts made for it.
    pub attempts: u32,
    /// Which execution of the stage this is: 1 when first dispatched, one more each time an
    /// admin replays it. Its callback token is bound to this number (not to delivery retries,
    /// which carry the same token).
    #[serde(default)]
    pub attempt: u32,
    /// When it started (ms).
    pub started_ms: Option<u64>,
    /// When it finished (ms).
    pub finished_ms: Option<u64>,
    /// Result detail.
    pub detail: Option<String>,
}

/// A run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// In progress.
    Running,
    /// Every stage succeeded or was skipped.
    Succeeded,
    /// A stage failed.
    Failed,
}

/// A timeline entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When (ms).
    pub at_ms: u64,
    /// Stage, if any.
    pub stage: Option<String>,
    /// What happened.
    pub message: String,
}

/// A chain run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Format version.
    pub v: u32,
    /// Stable id.
    pub id: String,
    /// Webhook that started it.
    pub webhook: String,
    /// The event.
    pub event: SourceEvent,
    /// Image the run builds (rendered from the rule).
    pub image: Option<String>,
    /// Digest of the built image, once known.
    pub digest: Option<String>,
    /// Stages in order.
    pub stages: Vec<StageState>,
    /// Index of the current stage.
    pub current: Option<usize>,
    /// State.
    pub status: RunStatus,
    /// Created (ms).
    pub created_ms: u64,
    /// Last change (ms).
    pub updated_ms: u64,
    /// What happened, in order.
    pub timeline: Vec<Entry>,
}

/// What the gateway must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask `target` to run `stage`.
    Dispatch {
        /// Stage.
        stage: String,
        /// Target name.
        target: String,
    },
    /// Pre-warm the cache with the run's image, then finish `stage`.
    Prewarm {
        /// Stage.
        stage: String,
    },
    /// Emit a CDEvent of this type about `stage` (to `[chain] events`).
    Emit {
        /// CDEvents type.
        event_type: &'static str,
        /// Stage, if any.
        stage: Option<String>,
    },
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The stage is not the one running.
    #[error("stage {0:?} is not the running stage of this run")]
    NotRunning(String),
    /// The run is over.
    #[error("the run has already finished")]
    Finished,
}

/// CDEvents types pullgate emits.
pub mod cdevents {
    /// The run started from a source change.
    pub const CHANGE_MERGED: &str = "dev.cdevents.change.merged.0.2.0";
    /// The build stage was dispatched.
    pub const BUILD_QUEUED: &str = "dev.cdevents.build.queued.0.2.0";
    /// The build stage finished.
    pub const BUILD_FINISHED: &str = "dev.cdevents.build.finished.0.2.0";
    /// `distribute` pre-warmed the image.
    pub const ARTIFACT_PUBLISHED: &str = "dev.cdevents.artifact.published.0.2.0";
    /// A `deploy*` stage succeeded.
    pub const SERVICE_DEPLOYED: &str = "dev.cdevents.service.deployed.0.2.0";
    /// Any other stage was dispatched.
    pub const PIPELINERUN_QUEUED: &str = "dev.cdevents.pipelinerun.queued.0.2.0";
    /// The run finished (succeeded or failed).
    pub const PIPELINERUN_FINISHED: &str = "dev.cdevents.pipelinerun.finished.0.2.0";
}

impl Run {
    /// Adds a timeline entry.
    pub(crate) fn note(&mut self, now: u64, stage: Option<&str>, message: impl Into<String>) {
        self.updated_ms = now;
        self.timeline.push(Entry {
            at_ms: now,
            stage: stage.map(str::to_string),
            message: message.into(),
        });
        if self.timeline.len() > MAX_TIMELINE {
            self.timeline.remove(0);
        }
    }

    /// The running stage's name.
    pub fn current_stage(&self) -> Option<&str> {
        self.current.map(|i| self.stages[i].name.as_str())
    }

    /// Starts the current stage, skipping target-less ones, and returns what to do.
    fn start_current(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(i) = self.current {
            let st = &mut self.stages[i];
            st.started_ms = Some(now);
            let name = st.name.clone();
            match st.target.clone() {
                Some(target) => {
                    st.status = StageStatus::Running;
                    st.attempt += 1;
                    self.note(now, Some(&name), format!("dispatching to target {target}"));
                    let event_type = if name == "build" {
                        cdevents::BUILD_QUEUED
                    } else {
                        cdevents::PIPELINERUN_QUEUED
                    };
                    actions.push(Action::Emit {
                        event_type,
                        stage: Some(name.clone()),
                    });
                    actions.push(Action::Dispatch {
                        stage: name,
                        target,
                    });
                    return actions;
                }
                None if name == DISTRIBUTE => {
                    st.status = StageStatus::Running;
                    st.attempt += 1;
                    self.note(now, Some(&name), "pre-warming the edge cache");
                    actions.push(Action::Prewarm { stage: name });
                    return actions;
                }
                None => {
                    st.status = StageStatus::Skipped;
                    st.finished_ms = Some(now);
                    self.note(now, Some(&name), "skipped: no target configured");
                    self.current = (i + 1 < self.stages.len()).then_some(i + 1);
                }
            }
        }
        self.status = RunStatus::Succeeded;
        self.note(now, None, "run succeeded");
        actions.push(Action::Emit {
            event_type: cdevents::PIPELINERUN_FINISHED,
            stage: None,
        });
        actions
    }

    /// Records a stage result. Success moves to the next stage; failure stops the run.
    pub fn complete(
        &mut self,
        stage: &str,
        success: bool,
        detail: Option<String>,
        now: u64,
    ) -> Result<Vec<Action>, ChainError> {
        if self.status != RunStatus::Running {
            return Err(ChainError::Finished);
        }
        let i = self
            .current
            .filter(|&i| self.stages[i].name == stage)
            .ok_or_else(|| ChainError::NotRunning(stage.to_string()))?;
        let st = &mut self.stages[i];
        st.finished_ms = Some(now);
        st.detail = detail.clone();
        let mut actions = Vec::new();
        if success {
            st.status = StageStatus::Succeeded;
            self.note(
                now,
                Some(stage),
                format!(
                    "succeeded{}",
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            );
            if stage == "build" {
                actions.push(Action::Emit {
                    event_type: cdevents::BUILD_FINISHED,
                    stage: Some(stage.into()),
                });
            } else if stage == DISTRIBUTE {
                actions.push(Action::Emit {
                    event_type: cdevents::ARTIFACT_PUBLISHED,
                    stage: Some(stage.into()),
                });
            } else if stage.starts_with("deploy") {
                actions.push(Action::Emit {
                    event_type: cdevents::SERVICE_DEPLOYED,
                    stage: Some(stage.into()),
                });
            }
            self.current = (i + 1 < self.stages.len()).then_some(i + 1);
            actions.extend(self.start_current(now));
        } else {
            st.status = StageStatus::Failed;
            self.status = RunStatus::Failed;
            self.current = None;
            self.note(
                now,
                Some(stage),
                format!(
                    "failed{}; run stopped",
                    detail.map(|d| format!(": {d}")).unwrap_or_default()
                ),
            );
            actions.push(Action::Emit {
                event_type: cdevents::PIPELINERUN_FINISHED,
                stage: Some(stage.into()),
            });
        }
        Ok(actions)
    }

    /// Re-opens a stage whose delivery was dead-lettered and is being replayed.
    pub fn reopen(&mut self, stage: &str, now: u64) {
        if let Some(i) = self.stages.iter().position(|s| s.name == stage) {
            if self.stages[i].status == StageStatus::Failed {
                self.stages[i].status = StageStatus::Running;
                self.stages[i].attempt += 1;
                self.stages[i].finished_ms = None;
                self.current = Some(i);
                self.status = RunStatus::Running;
                self.note(now, Some(stage), "replayed from the dead-letter list");
            }
        }
    }

    /// The current execution number of `stage` (0 when it never ran).
    pub fn stage_attempt(&self, stage: &str) -> Option<u32> {
        self.stages
            .iter()
            .find(|s| s.name == stage)
            .map(|s| s.attempt)
    }

    /// Whether a result posted for `stage` may set the run's digest to `digest`. The digest
    /// is the `build` stage's output: its result (or the registry's notification) sets it, and
    /// once `build` has finished no later stage can change it (only an admin can). A run
    /// whose `build` never ran (no such stage, or skipped) takes the first digest reported.
    pub fn may_set_digest(&self, stage: &str, digest: &str) -> bool {
        if self.digest.as_deref() == Some(digest) || stage == "build" {
            return true;
        }
        let build_ran = self.stages.iter().any(|s| {
            s.name == "build"
                && matches!(
                    s.status,
                    StageStatus::Running | StageStatus::Succeeded | StageStatus::Failed
                )
        });
        !build_ran && self.digest.is_none()
    }

    /// Counts a delivery attempt for a stage.
    pub fn attempted(&mut self, stage: &str, ok: bool, error: Option<&str>, now: u64) {
        if let Some(st) = self.stages.iter_mut().find(|s| s.name == stage) {
            st.attempts += 1;
            let n = st.attempts;
            let msg = match (ok, error) {
                (true, _) => format!("target accepted the request (attempt {n})"),
                (false, Some(e)) => format!("delivery attempt {n} failed: {e}"),
                (false, None) => format!("delivery attempt {n} failed"),
            };
            self.note(now, Some(stage), msg);
        }
    }
}

/// Creates a run for `event` matched by `rule`, started at the rule's stage; returns the run
/// and the first actions.
pub fn new_run(
    id: String,
    webhook: &str,
    event: &SourceEvent,
    rule: &RuleConfig,
    image: Option<String>,
    gw: &GatewaySettings,
    now: u64,
) -> (Run, Vec<Action>) {
    let names: Vec<String> = if gw.chain.stages.is_empty() {
        vec![rule.stage.clone().unwrap_or_else(|| "build".into())]
    } else {
        gw.chain.stages.clone()
    };
    let start = rule
        .stage
        .as_ref()
        .and_then(|s| names.iter().position(|n| n == s))
        .unwrap_or(0);
    let stages = names
        .iter()
        .enumerate()
        .map(|(i, name)| StageState {
            name: name.clone(),
            target: if i == start {
                rule.target
                    .clone()
                    .or_else(|| gw.stage_target(name).map(str::to_string))
            } else {
                gw.stage_target(name).map(str::to_string)
            },
            status: if i < start {
                StageStatus::Skipped
            } else {
                StageStatus::Pending
            },
            attempts: 0,
            attempt: 0,
            started_ms: None,
            finished_ms: None,
            detail: None,
        })
        .collect();
    let mut run = Run {
        v: RUN_VERSION,
        id,
        webhook: webhook.to_string(),
        event: event.clone(),
        image,
        digest: None,
        stages,
        current: Some(start),
        status: RunStatus::Running,
        created_ms: now,
        updated_ms: now,
        timeline: Vec::new(),
    };
    run.note(now, None, format!("started by a {} event", event.kind()));
    let mut actions = vec![Action::Emit {
        event_type: cdevents::CHANGE_MERGED,
        stage: None,
    }];
    actions.extend(run.start_current(now));
    (run, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::gateway::config::StageConfig;

    fn gw(stages: &[&str], targets: &[(&str, &str)]) -> GatewaySettings {
        GatewaySettings {
            chain: crate::core::gateway::config::ChainConfig {
                stages: stages.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            stage_targets: targets
                .iter()
                .map(|(n, t)| StageConfig {
                    name: n.to_string(),
                    target: t.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn rule(stage: Option<&str>, target: Option<&str>) -> RuleConfig {
        RuleConfig {
            webhook: "app".into(),
            on: vec![],
            branches: vec![],
            tags: vec![],
            repositories: vec![],
            stage: stage.map(Into::into),
            target: target.map(Into::into),
            image: None,
        }
    }

    fn ev() -> SourceEvent {
        SourceEvent::Push {
            repository: "r".into(),
            git_ref: "refs/heads/main".into(),
            branch: "main".into(),
            commit: "c".into(),
            author: "a".into(),
        }
    }

    #[test]
    fn a_run_walks_its_stages_on_evidence() {
        let g = gw(
            &["build", "scan", "sign", "distribute", "deploy-prod"],
            &[("scan", "trivy"), ("deploy-prod", "cd")],
        );
        let (mut run, actions) = new_run(
            "r1".into(),
            "app",
            &ev(),
            &rule(Some("build"), Some("ci")),
            Some("img:1".into()),
            &g,
            10,
        );
        assert!(actions.contains(&Action::Dispatch {
            stage: "build".into(),
            target: "ci".into()
        }));
        assert_eq!(run.current_stage(), Some("build"));
        let a = run.complete("build", true, None, 20).unwrap();
        assert!(a.contains(&Action::Dispatch {
            stage: "scan".into(),
            target: "trivy".into()
        }));
        assert!(a.contains(&Action::Emit {
            event_type: cdevents::BUILD_FINISHED,
            stage: Some("build".into())
        }));
        // sign has no target: skipped; distribute is pullgate's own.
        let a = run.complete("scan", true, None, 30).unwrap();
        assert_eq!(run.stages[2].status, StageStatus::Skipped);
        assert!(a.contains(&Action::Prewarm {
            stage: "distribute".into()
        }));
        assert_eq!(
            run.complete("build", true, None, 31),
            Err(ChainError::NotRunning("build".into()))
        );
        let a = run.complete("distribute", true, None, 40).unwrap();
        assert!(a.contains(&Action::Emit {
            event_type: cdevents::ARTIFACT_PUBLISHED,
            stage: Some("distribute".into())
        }));
        let a = run.complete("deploy-prod", true, None, 50).unwrap();
        assert!(a.contains(&Action::Emit {
            event_type: cdevents::SERVICE_DEPLOYED,
            stage: Some("deploy-prod".into())
        }));
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(
            run.complete("deploy-prod", true, None, 60),
            Err(ChainError::Finished)
        );
    }

    #[test]
    fn a_failed_stage_stops_the_run_and_replay_reopens_it() {
        let g = gw(
            &["build", "scan", "deploy"],
            &[("scan", "trivy"), ("deploy", "cd")],
        );
        let (mut run, _) = new_run(
            "r".into(),
            "app",
            &ev(),
            &rule(Some("scan"), None),
            None,
            &g,
            0,
        );
        assert_eq!(run.stages[0].status, StageStatus::Skipped);
        assert_eq!(run.current_stage(), Some("scan"));
        run.complete("scan", false, Some("2 critical vulnerabilities".into()), 5)
            .unwrap();
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.current, None);
        assert_eq!(run.stage_attempt("scan"), Some(1));
        run.reopen("scan", 6);
        assert_eq!(
            (run.status, run.current_stage()),
            (RunStatus::Running, Some("scan"))
        );
        assert_eq!(
            run.stage_attempt("scan"),
            Some(2),
            "a replay is a new attempt"
        );
        assert_eq!(run.stage_attempt("deploy"), Some(0), "never ran");
    }

    #[test]
    fn the_digest_is_fixed_once_build_has_finished() {
        let g = gw(
            &["build", "scan", "sign"],
            &[("scan", "trivy"), ("sign", "cosign")],
        );
        let (mut run, _) = new_run(
            "r".into(),
            "app",
            &ev(),
            &rule(Some("build"), Some("ci")),
            None,
            &g,
            0,
        );
        assert!(run.may_set_digest("build", "sha256:aa"));
        run.digest = Some("sha256:aa".into());
        run.complete("build", true, None, 1).unwrap();
        assert!(!run.may_set_digest("scan", "sha256:bb"));
        assert!(
            run.may_set_digest("scan", "sha256:aa"),
            "repeating it is fine"
        );
        run.complete("scan", true, None, 2).unwrap();
        assert!(!run.may_set_digest("sign", "sha256:bb"));
        // A run that starts after build takes the first digest reported, then keeps it.
        let (mut late, _) = new_run(
            "r2".into(),
            "app",
            &ev(),
            &rule(Some("scan"), None),
            None,
            &g,
            0,
        );
        assert!(late.may_set_digest("scan", "sha256:cc"));
        late.digest = Some("sha256:cc".into());
        assert!(!late.may_set_digest("sign", "sha256:dd"));
    }
}
