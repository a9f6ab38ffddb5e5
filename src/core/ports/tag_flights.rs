//! Tag revalidations coordinated across core instances: the [`TagFlights`] port and the
//! pure rule ([`TagFlightBook`]) every coordinator applies.

use futures_util::future::LocalBoxFuture;

/// How a tag revalidation that ran elsewhere ended, as its lead hands it to the requests that
/// waited for it (see [`TagFlights`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagOutcome {
    /// The upstream resolved the tag to `digest`: its manifest is stored by digest (content
    /// addressed, so any instance can read it) and the lead wrote the tag record.
    Resolved {
        /// The manifest's digest (`sha256:…`).
        digest: String,
    },
    /// The upstream says the tag does not exist.
    NotFound,
    /// The upstream failed (the lead served a stale record or an error): a follower serves
    /// its own stale record if it may, and otherwise asks the upstream itself.
    Failed,
    /// No answer: the lead ended without one (dropped, its lease expired) or the coordinator
    /// failed. A follower asks the upstream itself.
    Unknown,
}

impl TagOutcome {
    /// The outcome as one line of text, as a coordinator passes it on.
    pub fn encode(&self) -> String {
        match self {
            TagOutcome::Resolved { digest } => format!("resolved {digest}"),
            TagOutcome::NotFound => "not_found".into(),
            TagOutcome::Failed => "failed".into(),
            TagOutcome::Unknown => "unknown".into(),
        }
    }

    /// Reads [`encode`](Self::encode)'s text; anything else is [`TagOutcome::Unknown`].
    pub fn decode(text: &str) -> TagOutcome {
        match text.trim().split_once(' ') {
            Some(("resolved", digest)) if !digest.is_empty() => TagOutcome::Resolved {
                digest: digest.to_string(),
            },
            _ => match text.trim() {
                "not_found" => TagOutcome::NotFound,
                "failed" => TagOutcome::Failed,
                _ => TagOutcome::Unknown,
            },
        }
    }
}

/// The answer to [`TagFlights::enter`].
pub enum TagFlight {
    /// Ask the upstream, then publish the outcome through the lease.
    Lead(Box<dyn TagLease>),
    /// Another request leads: this resolves with its outcome (or [`TagOutcome::Unknown`]
    /// when it ended without one).
    Follow(LocalBoxFuture<'static, TagOutcome>),
}

/// The lead's side of a coordinated tag revalidation.
pub trait TagLease {
    /// Hands `outcome` to the followers and ends the lead's hold on the tag.
    fn publish(self: Box<Self>, outcome: TagOutcome) -> LocalBoxFuture<'static, ()>;
}

/// Serialises the upstream revalidation (or first fetch) of one tag *across* core instances
/// (Workers isolates and locations, through a Durable Object per tag), so a burst of requests
/// for a stale or missing tag makes one upstream request wherever the requests land. Optional
/// (`App::with_tag_flights`): without one every instance asks the upstream for itself, as before.
///
/// The contract: `key` names (upstream, repository, accept class, tag). Of concurrent enters
/// on one key, one gets [`TagFlight::Lead`] while no unexpired lead holds the key; the others
/// [`TagFlight::Follow`] it. A lead holds the key until it publishes or its lease expires (the
/// store's lease, about twice the upstream timeout); a follower's future then resolves with the
/// published outcome, or with [`TagOutcome::Unknown`] at expiry, so a lead that dies releases
/// its followers. A coordinator that fails answers `Lead` with a lease that publishes nowhere
/// (the request then behaves as without coordination). [`TagFlightBook`] is the rule every
/// store applies.
pub trait TagFlights {
    /// Leads or follows the revalidation of the tag `key`.
    fn enter(&self, key: &str) -> LocalBoxFuture<'static, TagFlight>;
}

/// Tag flights of a host with nothing to coordinate with: every enter leads, and publishing
/// goes nowhere (the behaviour without the port).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTagFlights;

/// A lease that publishes nowhere (see [`NoTagFlights`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTagLease;

impl TagLease for NoTagLease {
    fn publish(self: Box<Self>, _: TagOutcome) -> LocalBoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

impl TagFlights for NoTagFlights {
    fn enter(&self, _: &str) -> LocalBoxFuture<'static, TagFlight> {
        Box::pin(std::future::ready(TagFlight::Lead(Box::new(NoTagLease))))
    }
}

/// What [`TagFlightBook::enter`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagEntry {
    /// Lead under this lease.
    Lead(u64),
    /// Follow the lead holding this lease.
    Follow(u64),
}

/// What [`TagFlightBook::poll`] says to a follower of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagPoll {
    /// The flight ended with this outcome.
    Done(TagOutcome),
    /// Still running: ask again when the lead publishes, or at this time (its expiry, ms).
    WaitUntil(u64),
}

/// The state of one tag's flights, kept by whatever coordinates them (a Durable Object per
/// tag, an in-memory double): who leads and until when, and the last few outcomes. Pure: the
/// caller supplies the time and wakes its waiters after [`publish`](Self::publish).
#[derive(Debug, Clone, Default)]
pub struct TagFlightBook {
    /// (lease, expiry ms) of the lead in flight.
    lead: Option<(u64, u64)>,
    /// Outcomes of recent leases, newest last (a follower may ask after a newer lead began).
    done: Vec<(u64, TagOutcome)>,
    /// The last lease issued.
    last_lease: u64,
}

/// How many outcomes a [`TagFlightBook`] keeps for late followers.
const KEPT_OUTCOMES: usize = 8;

impl TagFlightBook {
    /// Follows the lead in flight, or leads for `lease_ms` when there is none (or it expired).
    /// Leases grow from the time, so a coordinator that restarted does not reissue one soon.
    pub fn enter(&mut self, now_ms: u64, lease_ms: u64) -> TagEntry {
        if let Some((lease, expires)) = self.lead {
            if now_ms < expires {
                return TagEntry::Follow(lease);
            }
        }
        let lease = self
            .last_lease
            .saturating_add(1)
            .max(now_ms.saturating_mul(1000));
        self.last_lease = lease;
        self.lead = Some((lease, now_ms.saturating_add(lease_ms.max(1))));
        TagEntry::Lead(lease)
    }

    /// Records the outcome of `lease`; false when that lease no longer leads (it expired, and
    /// its followers were already told [`TagOutcome::Unknown`]).
    pub fn publish(&mut self, lease: u64, outcome: TagOutcome) -> bool {
        if self.lead.map(|(l, _)| l) != Some(lease) {
            return false;
        }
        self.lead = None;
        if self.done.len() >= KEPT_OUTCOMES {
            self.done.remove(0);
        }
        self.done.push((lease, outcome));
        true
    }

    /// Whether a lead holds the tag at `now_ms` (a book without one may be forgotten: a late
    /// follower of it is told [`TagOutcome::Unknown`]).
    pub fn in_flight(&self, now_ms: u64) -> bool {
        self.lead.is_some_and(|(_, expires)| now_ms < expires)
    }

    /// Where the flight of `lease` stands at `now_ms` for a follower.
    pub fn poll(&mut self, lease: u64, now_ms: u64) -> TagPoll {
        if let Some((_, outcome)) = self.done.iter().find(|(l, _)| *l == lease) {
            return TagPoll::Done(outcome.clone());
        }
        match self.lead {
            Some((l, expires)) if l == lease && now_ms < expires => TagPoll::WaitUntil(expires),
            Some((l, _)) if l == lease => {
                self.lead = None;
                TagPoll::Done(TagOutcome::Unknown)
            }
            _ => TagPoll::Done(TagOutcome::Unknown),
        }
    }
}
