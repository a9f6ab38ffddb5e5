//! What happens to a delivery once its target answered: delivered, retried at a later time
//! (exponential backoff with jitter, [`outbox::retry_delay_ms`]), or dead-lettered after the
//! configured attempts; and what that answer means for the run it belongs to. Pure: the pump
//! ([`super::pump`]) reads and writes the records around these decisions.

use crate::core::gateway::chain::{Action, Run};
use crate::core::gateway::config::GatewaySettings;
use crate::core::gateway::outbox::{self, Delivery, DeliveryKind};

/// The retry schedule of outbound deliveries (`[gateway] max_attempts`, `retry_base`,
/// `retry_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before the dead-letter record.
    pub max_attempts: u32,
    /// First retry delay, ms.
    pub base_ms: u64,
    /// Longest retry delay, ms.
    pub max_ms: u64,
}

impl RetryPolicy {
    /// The policy the gateway's settings configure.
    pub fn of(gw: &GatewaySettings) -> RetryPolicy {
        RetryPolicy {
            max_attempts: gw.max_attempts,
            base_ms: gw.retry_base_ms,
            max_ms: gw.retry_max_ms,
        }
    }
}

/// The outcome of one attempt at a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delivered: the pending record goes.
    Done {
        /// What the target said.
        detail: String,
    },
    /// Failed; attempt again at `at_ms`.
    Retry {
        /// Not before (ms).
        at_ms: u64,
        /// Why this attempt failed.
        error: String,
    },
    /// Failed for the last allowed time: the record moves to the dead-letter list.
    Dead {
        /// Why, for the run's timeline.
        reason: String,
        /// Why the last attempt failed.
        error: String,
    },
}

/// Settles `delivery` (as it was before this attempt) given the target's answer: `Ok(detail)`
/// when it was accepted, `Err(why)` otherwise.
pub fn settle(
    delivery: &Delivery,
    result: Result<String, String>,
    now: u64,
    policy: &RetryPolicy,
) -> Settlement {
    let error = match result {
        Ok(detail) => return Settlement::Done { detail },
        Err(e) => e,
    };
    let attempts = delivery.attempts + 1;
    if attempts >= policy.max_attempts {
        Settlement::Dead {
            reason: format!("delivery dead-lettered after {attempts} attempts: {error}"),
            error,
        }
    } else {
        let delay = outbox::retry_delay_ms(attempts, policy.base_ms, policy.max_ms, &delivery.id);
        Settlement::Retry {
            at_ms: now + delay,
            error,
        }
    }
}

impl Settlement {
    /// The delivery record after this attempt: one more attempt, its error, its next time.
    /// Unchanged when delivered (the record is removed).
    pub fn record(&self, delivery: &Delivery) -> Delivery {
        let mut d = delivery.clone();
        match self {
            Settlement::Done { .. } => {}
            Settlement::Retry { at_ms, error } => {
                d.attempts += 1;
                d.last_error = Some(error.clone());
                d.next_ms = *at_ms;
            }
            Settlement::Dead { error, .. } => {
                d.attempts += 1;
                d.last_error = Some(error.clone());
            }
        }
        d
    }

    /// Records this attempt on the run the delivery belongs to, and returns what the run does
    /// next. Events are not stage work: their fate never moves a stage. A delivered pre-warm
    /// finishes its stage; a delivered dispatch only notes the target accepted it (the stage
    /// finishes when its result is posted back); a dead-lettered stage delivery fails its stage.
    pub fn apply_to_run(&self, delivery: &Delivery, run: &mut Run, now: u64) -> Vec<Action> {
        let Some(stage) = delivery.stage() else {
            return Vec::new();
        };
        match (self, &delivery.kind) {
            (_, DeliveryKind::Event { .. }) => Vec::new(),
            (Settlement::Done { detail }, DeliveryKind::Prewarm { .. }) => run
                .complete(stage, true, Some(detail.clone()), now)
                .unwrap_or_default(),
            (Settlement::Done { .. }, _) => {
                run.attempted(stage, true, None, now);
                Vec::new()
            }
            (Settlement::Retry { error, .. }, _) => {
                run.attempted(stage, false, Some(error), now);
                Vec::new()
            }
            (Settlement::Dead { reason, error }, _) => {
                run.attempted(stage, false, Some(error), now);
                run.complete(stage, false, Some(reason.clone()), now)
                    .unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::gateway::chain::{RunStatus, StageStatus};
    use crate::core::gateway::config::{ChainConfig, RuleConfig, StageConfig};
    use crate::core::gateway::event::SourceEvent;
    use crate::core::gateway::outbox::DELIVERY_VERSION;
    use crate::core::ports::Clock;
    use crate::testing::ManualClock;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base_ms: 10_000,
        max_ms: 60_000,
    };

    fn delivery(kind: DeliveryKind, attempts: u32) -> Delivery {
        Delivery {
            v: DELIVERY_VERSION,
            id: "d1".into(),
            run: "r1".into(),
            kind,
            attempts,
            next_ms: 0,
            created_ms: 0,
            last_error: None,
        }
    }

    fn dispatch(attempts: u32) -> Delivery {
        delivery(
            DeliveryKind::Dispatch {
                stage: "build".into(),
                target: "ci".into(),
            },
            attempts,
        )
    }

    fn run() -> Run {
        let gw = GatewaySettings {
            chain: ChainConfig {
                stages: vec!["build".into(), "distribute".into()],
                ..Default::default()
            },
            stage_targets: vec![StageConfig {
                name: "build".into(),
                target: "ci".into(),
            }],
            ..Default::default()
        };
        let rule = RuleConfig {
            webhook: "app".into(),
            on: vec![],
            branches: vec![],
            tags: vec![],
            repositories: vec![],
            stage: None,
            target: None,
            image: Some("reg.test/acme/app:main".into()),
        };
        let ev = SourceEvent::Push {
            repository: "r".into(),
            git_ref: "refs/heads/main".into(),
            branch: "main".into(),
            commit: "c".into(),
            author: "a".into(),
        };
        let image = rule.image.clone();
        crate::core::gateway::chain::new_run("r1".into(), "app", &ev, &rule, image, &gw, 0).0
    }

    #[test]
    fn an_accepted_delivery_is_done() {
        let s = settle(
            &dispatch(0),
            Ok("target answered 200 OK".into()),
            5,
            &POLICY,
        );
        assert_eq!(
            s,
            Settlement::Done {
                detail: "target answered 200 OK".into()
            }
        );
        assert_eq!(s.record(&dispatch(0)), dispatch(0));
    }

    #[test]
    fn a_failure_retries_later_each_time_until_the_last_attempt_is_dead() {
        let clock = ManualClock::at(1_000_000);
        let now = clock.now_ms();
        let mut d = dispatch(0);
        let first = settle(&d, Err("503".into()), now, &POLICY);
        let Settlement::Retry { at_ms, .. } = first else {
            panic!("{first:?}");
        };
        assert!((now + 5_000..now + 10_000).contains(&at_ms), "{at_ms}");
        d = first.record(&d);
        assert_eq!((d.attempts, d.next_ms), (1, at_ms));
        assert_eq!(d.last_error.as_deref(), Some("503"));

        clock.advance(at_ms - now);
        let now = clock.now_ms();
        let second = settle(&d, Err("503".into()), now, &POLICY);
        let Settlement::Retry { at_ms, .. } = second else {
            panic!("{second:?}");
        };
        assert!(
            (now + 10_000..now + 20_000).contains(&at_ms),
            "backoff doubles: {at_ms}"
        );
        d = second.record(&d);

        let third = settle(&d, Err("timeout".into()), at_ms, &POLICY);
        assert_eq!(
            third,
            Settlement::Dead {
                reason: "delivery dead-lettered after 3 attempts: timeout".into(),
                error: "timeout".into()
            }
        );
        let d = third.record(&d);
        assert_eq!((d.attempts, d.last_error.as_deref()), (3, Some("timeout")));
    }

    #[test]
    fn a_policy_of_one_attempt_dead_letters_the_first_failure() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert!(matches!(
            settle(&dispatch(0), Err("x".into()), 0, &p),
            Settlement::Dead { .. }
        ));
    }

    #[test]
    fn a_dead_stage_delivery_fails_its_stage_and_the_run() {
        let mut r = run();
        let d = dispatch(2);
        let s = settle(&d, Err("503".into()), 9, &POLICY);
        let actions = s.apply_to_run(&d, &mut r, 9);
        assert_eq!(r.stages[0].status, StageStatus::Failed);
        assert_eq!(r.status, RunStatus::Failed);
        assert!(actions
            .iter()
            .all(|a| !matches!(a, Action::Dispatch { .. })));
    }

    #[test]
    fn a_retried_or_accepted_dispatch_leaves_its_stage_running() {
        let mut r = run();
        let d = dispatch(0);
        for s in [
            settle(&d, Err("503".into()), 1, &POLICY),
            settle(&d, Ok("200".into()), 2, &POLICY),
        ] {
            assert!(s.apply_to_run(&d, &mut r, 3).is_empty());
            assert_eq!(r.stages[0].status, StageStatus::Running);
        }
        assert_eq!(r.stages[0].attempts, 2);
    }

    #[test]
    fn a_delivered_prewarm_finishes_its_stage_and_events_never_move_a_stage() {
        let mut r = run();
        r.complete("build", true, None, 1).unwrap();
        assert_eq!(r.current_stage(), Some("distribute"));
        let event = delivery(
            DeliveryKind::Event {
                target: "sink".into(),
                event_type: "x".into(),
                stage: Some("distribute".into()),
            },
            7,
        );
        let dead = settle(&event, Err("503".into()), 2, &POLICY);
        assert!(dead.apply_to_run(&event, &mut r, 2).is_empty());
        assert_eq!(r.current_stage(), Some("distribute"));
        let warm = delivery(
            DeliveryKind::Prewarm {
                stage: "distribute".into(),
            },
            0,
        );
        let done = settle(&warm, Ok("pre-warmed".into()), 3, &POLICY);
        done.apply_to_run(&warm, &mut r, 3);
        assert_eq!(r.stages[1].status, StageStatus::Succeeded);
        assert_eq!(r.status, RunStatus::Succeeded);
    }
}
