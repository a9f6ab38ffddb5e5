//! Tag revalidations coordinated across core instances through the host's [`TagFlights`] port
//! (a Durable Object per tag on Workers): the instance's port, the lead's guard that always
//! publishes an outcome, and the outcome a lead's answer stands for. The manifest logic — what
//! a follower serves for an outcome — stays in `manifests`; this file decides nothing about
//! manifests and never talks to the upstream.
//!
//! Without a port (the default on every host but Workers) nothing here runs: each instance
//! asks the upstream for itself, as before.

use crate::core::body::{Body, CacheStatus};
use crate::core::context::Inner;
use crate::core::error::RegistryError;
use crate::core::ports::{Deferred, TagFlight, TagFlights, TagLease, TagOutcome};
use crate::core::registry::media::header as h;
use futures_util::future::LocalBoxFuture;
use http::Response;
use std::cell::RefCell;
use std::rc::Rc;

/// The instance's tag flights, when the host shares some (`App::with_tag_flights`).
#[derive(Default)]
pub(crate) struct TagFlightPort(pub RefCell<Option<Rc<dyn TagFlights>>>);

/// What an instance does about a tag that needs the upstream.
pub(crate) enum Entered {
    /// Ask the upstream; finish the guard with the answer.
    Lead(LeadGuard),
    /// Another instance asks: this resolves with its outcome.
    Follow(LocalBoxFuture<'static, TagOutcome>),
    /// No coordination (no port): ask the upstream.
    Alone,
}

/// Leads or follows the revalidation of tag record `key` through the instance's port.
pub(crate) async fn enter(inner: &Inner, key: &str) -> Entered {
    let port = inner.slots.get::<TagFlightPort>();
    let flights = port.0.borrow().clone();
    let Some(flights) = flights else {
        return Entered::Alone;
    };
    match flights.enter(key).await {
        TagFlight::Lead(lease) => Entered::Lead(LeadGuard {
            lease: Some(lease),
            deferred: inner.ports.deferred.clone(),
        }),
        TagFlight::Follow(wait) => Entered::Follow(wait),
    }
}

/// A lead's hold on a tag: [`finish`](Self::finish) publishes the outcome; dropping it
/// unfinished (the request was cancelled) publishes [`TagOutcome::Unknown`], so followers
/// never wait for a lead that is gone longer than it takes to tell them. Publishing runs as
/// deferred work: the lead's own answer does not wait for it.
pub(crate) struct LeadGuard {
    lease: Option<Box<dyn TagLease>>,
    deferred: Rc<dyn Deferred>,
}

impl LeadGuard {
    /// Publishes the outcome `answer` stands for.
    pub fn finish(mut self, answer: &Result<(Response<Body>, CacheStatus), RegistryError>) {
        if let Some(lease) = self.lease.take() {
            self.deferred.spawn(lease.publish(outcome_of(answer)));
        }
    }
}

impl Drop for LeadGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.deferred.spawn(lease.publish(TagOutcome::Unknown));
        }
    }
}

/// The outcome a lead's answer stands for: the digest it served (the manifest is stored by
/// digest and the tag record written), not found, or a failure (a stale answer is one).
pub(crate) fn outcome_of(
    answer: &Result<(Response<Body>, CacheStatus), RegistryError>,
) -> TagOutcome {
    match answer {
        Ok((_, CacheStatus::Stale)) => TagOutcome::Failed,
        Ok((resp, _)) => resp
            .headers()
            .get(h::CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .map_or(TagOutcome::Unknown, |d| TagOutcome::Resolved {
                digest: d.to_string(),
            }),
        Err(RegistryError::ManifestUnknown(_)) => TagOutcome::NotFound,
        Err(_) => TagOutcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ports::{TagEntry, TagFlightBook, TagPoll};
    use http::StatusCode;

    #[test]
    fn the_first_enter_leads_and_the_others_follow_until_it_publishes() {
        let mut book = TagFlightBook::default();
        let TagEntry::Lead(lease) = book.enter(1_000, 60_000) else {
            panic!("the first enter leads");
        };
        assert_eq!(book.enter(1_001, 60_000), TagEntry::Follow(lease));
        assert_eq!(book.poll(lease, 1_002), TagPoll::WaitUntil(61_000));
        let resolved = TagOutcome::Resolved {
            digest: "sha256:ab".into(),
        };
        assert!(book.publish(lease, resolved.clone()));
        assert_eq!(book.poll(lease, 1_003), TagPoll::Done(resolved.clone()));
        // The next enter leads again, under a new lease; the old outcome stays readable.
        let TagEntry::Lead(next) = book.enter(1_004, 60_000) else {
            panic!("leads after a publish");
        };
        assert!(next > lease);
        assert_eq!(book.poll(lease, 1_005), TagPoll::Done(resolved));
    }

    #[test]
    fn an_expired_lead_releases_its_followers_and_cannot_publish_late() {
        let mut book = TagFlightBook::default();
        let TagEntry::Lead(lease) = book.enter(1_000, 100) else {
            panic!("leads");
        };
        assert_eq!(book.poll(lease, 1_099), TagPoll::WaitUntil(1_100));
        assert_eq!(book.poll(lease, 1_100), TagPoll::Done(TagOutcome::Unknown));
        assert!(!book.publish(lease, TagOutcome::NotFound), "too late");
        // A new request at expiry leads instead of following the dead lead.
        assert!(matches!(book.enter(1_100, 100), TagEntry::Lead(l) if l != lease));
    }

    #[test]
    fn an_unknown_lease_is_told_unknown_and_leases_survive_a_restart() {
        let mut book = TagFlightBook::default();
        assert_eq!(book.poll(42, 5), TagPoll::Done(TagOutcome::Unknown));
        let TagEntry::Lead(before) = book.enter(2_000, 10) else {
            panic!("leads");
        };
        // A coordinator that lost its state issues leases from the clock, not from 1.
        let mut restarted = TagFlightBook::default();
        let TagEntry::Lead(after) = restarted.enter(2_001, 10) else {
            panic!("leads");
        };
        assert!(after > before);
    }

    #[test]
    fn outcomes_round_trip_as_text_and_garbage_is_unknown() {
        for o in [
            TagOutcome::Resolved {
                digest: "sha256:ab".into(),
            },
            TagOutcome::NotFound,
            TagOutcome::Failed,
            TagOutcome::Unknown,
        ] {
            assert_eq!(TagOutcome::decode(&o.encode()), o);
        }
        for garbage in ["", "resolved", "resolved ", "lead 4", "NOT_FOUND"] {
            assert_eq!(
                TagOutcome::decode(garbage),
                TagOutcome::Unknown,
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn only_recent_outcomes_are_kept() {
        let mut book = TagFlightBook::default();
        let mut leases = Vec::new();
        for i in 0..10u64 {
            let TagEntry::Lead(l) = book.enter(i, 10) else {
                panic!("leads");
            };
            assert!(book.publish(l, TagOutcome::NotFound));
            leases.push(l);
        }
        assert_eq!(book.poll(leases[0], 20), TagPoll::Done(TagOutcome::Unknown));
        assert_eq!(
            book.poll(leases[9], 20),
            TagPoll::Done(TagOutcome::NotFound)
        );
    }

    type Answer = Result<(Response<Body>, CacheStatus), RegistryError>;

    fn ok(status: CacheStatus, digest: Option<&str>) -> Answer {
        let mut b = Response::builder().status(StatusCode::OK);
        if let Some(d) = digest {
            b = b.header(h::CONTENT_DIGEST, d);
        }
        Ok((b.body(Body::Empty).unwrap(), status))
    }

    #[test]
    fn a_leads_answer_maps_to_its_outcome() {
        assert_eq!(
            outcome_of(&ok(CacheStatus::Miss, Some("sha256:aa"))),
            TagOutcome::Resolved {
                digest: "sha256:aa".into()
            }
        );
        assert_eq!(
            outcome_of(&ok(CacheStatus::Hit, Some("sha256:bb"))),
            TagOutcome::Resolved {
                digest: "sha256:bb".into()
            }
        );
        assert_eq!(
            outcome_of(&ok(CacheStatus::Stale, Some("sha256:cc"))),
            TagOutcome::Failed
        );
        assert_eq!(
            outcome_of(&ok(CacheStatus::Miss, None)),
            TagOutcome::Unknown
        );
        assert_eq!(
            outcome_of(&Err(RegistryError::ManifestUnknown("x".into()))),
            TagOutcome::NotFound
        );
        assert_eq!(
            outcome_of(&Err(RegistryError::Unavailable("x".into()))),
            TagOutcome::Failed
        );
    }
}
