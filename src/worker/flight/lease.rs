//! The lease of one digest's fill as the [`BlobFlights`](super::BlobFlights) object keeps it,
//! and the object's wire protocol: a pure state machine (no IO; the time is an argument) and
//! the encoding of its operations and answers, so both are unit-tested natively.
//! `tests/e2e_worker_flight.rs` includes this file by path, which is why it names nothing else
//! of the crate.
//!
//! The rules:
//! - A claim leads when no lease is held, or when the held one ran out (its lead died): the
//!   new lease gets a fresh id and lasts `lease_ms`. Otherwise the claim follows the holder.
//! - Only the holder's reports count; each one renews the lease. A report of a lease that ran
//!   out or was taken over changes nothing (its followers have already given up on it).
//! - A release by the holder ends the lease; the next claim leads again.
//! - Every change a follower must see (a new lease, a new size or start, the end) moves the
//!   `version` on, so a follower's wait answers when the version differs from the one it saw,
//!   or when the lease it follows is no longer live.
//!
//! On the wire, operations and answers are form-encoded pairs (`op=claim&scope=…`): the
//! `url` crate's encoder is in the bundle anyway, where a JSON derive per type would add to
//! the worker's size.

use std::borrow::Cow;
use url::form_urlencoded;

/// The lease in force: who leads the fill, for what, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lead {
    /// The lease's id (the lead's proof in reports and the release).
    pub id: u64,
    /// What the lead fetches for (`<upstream>/<repository>`).
    pub scope: String,
    /// The upstream answered.
    pub started: bool,
    /// The blob's size, when the upstream announced it.
    pub size: Option<u64>,
    /// How long the lease lasts after each report (ms).
    pub lease_ms: u64,
    /// When it runs out unless renewed (ms since the epoch).
    pub expires_ms: u64,
}

/// The object's answer to every operation: the lease as the caller should see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// This caller leads (an answer to its claim).
    pub lead: bool,
    /// The lease the caller holds or follows.
    pub id: u64,
    /// That lease is still held (not released, not run out, not taken over).
    pub live: bool,
    /// What the lead fetches for.
    pub scope: String,
    /// The upstream answered.
    pub started: bool,
    /// The blob's size, when announced.
    pub size: Option<u64>,
    /// The object's change counter (what a follower's next wait names as seen).
    pub version: u64,
    /// When the lease runs out unless renewed (ms), while live.
    pub expires_ms: u64,
}

/// One digest's fills: the lease in force, if any.
#[derive(Debug, Default)]
pub struct Flight {
    lead: Option<Lead>,
    last_id: u64,
    version: u64,
}

impl Flight {
    /// The change counter.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn live(&self, now_ms: u64) -> Option<&Lead> {
        self.lead.as_ref().filter(|l| l.expires_ms > now_ms)
    }

    fn view_of(&self, l: &Lead, lead: bool) -> View {
        View {
            lead,
            id: l.id,
            live: true,
            scope: l.scope.clone(),
            started: l.started,
            size: l.size,
            version: self.version,
            expires_ms: l.expires_ms,
        }
    }

    /// Leads (a new lease for `scope`, lasting `lease_ms`) or follows the live lease.
    pub fn claim(&mut self, scope: &str, lease_ms: u64, now_ms: u64) -> View {
        if let Some(l) = self.live(now_ms) {
            return self.view_of(l, false);
        }
        // Ids start from the clock, so a lease granted before the object restarted (its memory
        // lost) never matches one granted after.
        let id = self
            .last_id
            .saturating_add(1)
            .max(now_ms.saturating_mul(1024));
        self.last_id = id;
        self.version += 1;
        let l = Lead {
            id,
            scope: scope.to_string(),
            started: false,
            size: None,
            lease_ms,
            expires_ms: now_ms.saturating_add(lease_ms),
        };
        let view = self.view_of(&l, true);
        self.lead = Some(l);
        view
    }

    /// The holder of lease `id` reports its progress (and so renews the lease).
    pub fn report(&mut self, id: u64, started: bool, size: Option<u64>, now_ms: u64) -> View {
        let mut changed = false;
        if let Some(l) = self
            .lead
            .as_mut()
            .filter(|l| l.id == id && l.expires_ms > now_ms)
        {
            l.expires_ms = now_ms.saturating_add(l.lease_ms);
            changed = (l.started, l.size) != (started, size);
            l.started = started;
            l.size = size;
        }
        if changed {
            self.version += 1;
        }
        self.view(id, now_ms)
    }

    /// The holder of lease `id` ends it (its fill committed the blob, or failed).
    pub fn release(&mut self, id: u64, now_ms: u64) -> View {
        if self.lead.as_ref().is_some_and(|l| l.id == id) {
            self.lead = None;
            self.version += 1;
        }
        self.view(id, now_ms)
    }

    /// Lease `id` as it stands.
    pub fn view(&self, id: u64, now_ms: u64) -> View {
        match self.live(now_ms).filter(|l| l.id == id) {
            Some(l) => self.view_of(l, false),
            None => View {
                id,
                version: self.version,
                ..View::default()
            },
        }
    }

    /// Whether a follower of lease `id` that last saw `seen` is to be answered now: the lease
    /// changed or is no longer live.
    pub fn settled(&self, id: u64, seen: u64, now_ms: u64) -> bool {
        let v = self.view(id, now_ms);
        !v.live || v.version != seen
    }
}

/// One operation on a digest's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Lead or follow; a new lease lasts `lease_ms`.
    Claim { scope: String, lease_ms: u64 },
    /// The lead's progress (renews the lease).
    Report {
        id: u64,
        started: bool,
        size: Option<u64>,
    },
    /// The lead's fill ended.
    Release { id: u64 },
    /// A follower's long poll: answer once lease `id` differs from version `seen`.
    Wait { id: u64, seen: u64 },
}

/// Form-encoded pairs, read by name.
struct Pairs<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Pairs<'a> {
    fn parse(text: &'a str) -> Pairs<'a> {
        Pairs(form_urlencoded::parse(text.as_bytes()).collect())
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    fn num(&self, name: &str) -> Option<u64> {
        self.str(name)?.parse().ok()
    }

    fn flag(&self, name: &str) -> bool {
        self.str(name) == Some("1")
    }
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

impl Op {
    /// The operation's wire form.
    pub fn encode(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        match self {
            Op::Claim { scope, lease_ms } => out
                .append_pair("op", "claim")
                .append_pair("scope", scope)
                .append_pair("lease_ms", &lease_ms.to_string()),
            Op::Report { id, started, size } => {
                out.append_pair("op", "report")
                    .append_pair("id", &id.to_string())
                    .append_pair("started", flag(*started));
                if let Some(n) = size {
                    out.append_pair("size", &n.to_string());
                }
                &mut out
            }
            Op::Release { id } => out
                .append_pair("op", "release")
                .append_pair("id", &id.to_string()),
            Op::Wait { id, seen } => out
                .append_pair("op", "wait")
                .append_pair("id", &id.to_string())
                .append_pair("seen", &seen.to_string()),
        };
        out.finish()
    }

    /// Reads an operation's wire form; None when it is not one.
    pub fn decode(text: &str) -> Option<Op> {
        let p = Pairs::parse(text);
        Some(match p.str("op")? {
            "claim" => Op::Claim {
                scope: p.str("scope")?.to_string(),
                lease_ms: p.num("lease_ms")?,
            },
            "report" => Op::Report {
                id: p.num("id")?,
                started: p.flag("started"),
                size: p.num("size"),
            },
            "release" => Op::Release { id: p.num("id")? },
            "wait" => Op::Wait {
                id: p.num("id")?,
                seen: p.num("seen")?,
            },
            _ => return None,
        })
    }
}

impl View {
    /// The answer's wire form.
    pub fn encode(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        out.append_pair("lead", flag(self.lead))
            .append_pair("id", &self.id.to_string())
            .append_pair("live", flag(self.live))
            .append_pair("scope", &self.scope)
            .append_pair("started", flag(self.started))
            .append_pair("version", &self.version.to_string())
            .append_pair("expires_ms", &self.expires_ms.to_string());
        if let Some(n) = self.size {
            out.append_pair("size", &n.to_string());
        }
        out.finish()
    }

    /// Reads an answer's wire form; None when it is not one.
    pub fn decode(text: &str) -> Option<View> {
        let p = Pairs::parse(text);
        Some(View {
            lead: p.flag("lead"),
            id: p.num("id")?,
            live: p.flag("live"),
            scope: p.str("scope").unwrap_or_default().to_string(),
            started: p.flag("started"),
            size: p.num("size"),
            version: p.num("version")?,
            expires_ms: p.num("expires_ms").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 60_000;
    const T0: u64 = 1_800_000_000_000;

    #[test]
    fn the_first_claim_leads_and_the_others_follow_it() {
        let mut f = Flight::default();
        let lead = f.claim("up/a", LEASE, T0);
        assert!(lead.lead && lead.live);
        let follow = f.claim("up/b", LEASE, T0 + 1);
        assert!(!follow.lead && follow.live);
        assert_eq!((follow.id, follow.scope.as_str()), (lead.id, "up/a"));
        assert!(!f.settled(lead.id, follow.version, T0 + 2));
    }

    #[test]
    fn a_report_moves_followers_on_and_renews_the_lease() {
        let mut f = Flight::default();
        let lead = f.claim("s", LEASE, T0);
        let seen = f.claim("s", LEASE, T0).version;
        let v = f.report(lead.id, true, Some(42), T0 + LEASE - 1);
        assert!(v.live && v.started && v.size == Some(42));
        assert!(f.settled(lead.id, seen, T0 + LEASE - 1));
        // Renewed: still held after the first term.
        assert!(f.view(lead.id, T0 + LEASE + 10).live);
        // A renewal that changes nothing wakes no one.
        let seen = f.version();
        f.report(lead.id, true, Some(42), T0 + LEASE);
        assert!(!f.settled(lead.id, seen, T0 + LEASE));
    }

    #[test]
    fn a_release_ends_the_lease_and_the_next_claim_leads() {
        let mut f = Flight::default();
        let lead = f.claim("s", LEASE, T0);
        let seen = f.claim("s", LEASE, T0).version;
        assert!(!f.release(lead.id, T0 + 5).live);
        assert!(f.settled(lead.id, seen, T0 + 5));
        let next = f.claim("s", LEASE, T0 + 6);
        assert!(next.lead && next.id != lead.id);
        // The old lead's late reports and release touch nothing.
        f.report(lead.id, true, Some(1), T0 + 7);
        f.release(lead.id, T0 + 7);
        assert!(f.view(next.id, T0 + 8).live);
        assert!(!f.view(next.id, T0 + 8).started);
    }

    #[test]
    fn a_lease_that_ran_out_is_taken_over_and_its_lead_ignored() {
        let mut f = Flight::default();
        let dead = f.claim("s", LEASE, T0);
        let seen = f.version();
        // Its followers are answered once it ran out, with no change of version.
        assert!(!f.settled(dead.id, seen, T0 + LEASE - 1));
        assert!(f.settled(dead.id, seen, T0 + LEASE));
        let next = f.claim("s", LEASE, T0 + LEASE);
        assert!(next.lead && next.id != dead.id);
        assert!(!f.report(dead.id, true, Some(9), T0 + LEASE + 1).live);
        assert!(f.view(next.id, T0 + LEASE + 1).live);
    }

    #[test]
    fn ids_granted_after_a_restart_never_match_earlier_ones() {
        let mut before = Flight::default();
        let old = before.claim("s", LEASE, T0);
        let mut after = Flight::default();
        let new = after.claim("s", LEASE, T0 + 1);
        assert!(new.id > old.id);
        assert!(!after.release(old.id, T0 + 2).live);
        assert!(after.view(new.id, T0 + 2).live);
    }

    #[test]
    fn operations_and_answers_survive_their_wire_form() {
        let ops = [
            Op::Claim {
                scope: "reg.test/team/app & co=1".into(),
                lease_ms: LEASE,
            },
            Op::Report {
                id: 7,
                started: true,
                size: Some(8 << 20),
            },
            Op::Report {
                id: 7,
                started: false,
                size: None,
            },
            Op::Release { id: u64::MAX },
            Op::Wait { id: 3, seen: 9 },
        ];
        for op in ops {
            assert_eq!(Op::decode(&op.encode()), Some(op));
        }
        let mut f = Flight::default();
        let lead = f.claim("up/a=b&c", LEASE, T0);
        let reported = f.report(lead.id, true, Some(42), T0 + 1);
        for v in [lead, reported, f.view(1, T0)] {
            assert_eq!(View::decode(&v.encode()), Some(v));
        }
        assert_eq!(Op::decode("op=steal&id=1"), None);
        assert_eq!(Op::decode("op=wait&id=1"), None);
        assert_eq!(View::decode("not an answer"), None);
    }
}
