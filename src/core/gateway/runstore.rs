//! Where the gateway keeps its runs and dedup records: run records (`run/<id>`), their
//! by-commit, by-image and by-source indexes, and the replay-protection records
//! (`dedup/`, `replay/`, `dedup-seen/`). A host with a [`RecordStore`] — strongly consistent,
//! with a create that is atomic across every instance (a Durable Object on Workers) — gets
//! them there; every other host keeps them in the key-value port, as before, where the
//! instance's run lock is what serialises them.
//!
//! The one decision that needs more than the lock of one instance is "has this source already
//! started runs?" ([`claim_source`]): with a record store the source guard is *claimed*
//! (created) before any run is started, so of two concurrent copies of a delivery in two
//! instances exactly one starts runs. Without one the guard is read under the instance's lock
//! and written after the runs, as it always was. Deliveries, dead letters and the due index
//! stay in the key-value port either way (the outbox pump lists them).

use crate::core::context::Inner;
use crate::core::ports::{KvStore, RecordStore, StoreError};
use std::cell::RefCell;
use std::rc::Rc;

/// How long a claimed source guard may stay without its runs before another delivery takes
/// it over (an instance cut off between the claim and the runs).
pub const CLAIM_STALE_MS: u64 = 60_000;
/// The value of a guard claimed while its runs are being started: `pending:<ms>`.
const PENDING_CLAIM: &str = "pending:";

/// The instance's record store, if its host has one (a typed slot on `Inner`): the same
/// object as a key-value store and as a record store.
#[derive(Default)]
pub(crate) struct RecordPort(pub RefCell<Option<Stores>>);

/// The record store as both of its traits (one object).
pub(crate) type Stores = (Rc<dyn KvStore>, Rc<dyn RecordStore>);

fn port(inner: &Inner) -> Option<Stores> {
    inner.slots.get::<RecordPort>().0.borrow().clone()
}

/// The store of runs and dedup records: the host's record store, else the key-value port.
pub(crate) fn runs(inner: &Inner) -> Rc<dyn KvStore> {
    match port(inner) {
        Some((kv, _)) => kv,
        None => inner.ports.kv.clone(),
    }
}

/// What [`claim_source`] found.
pub(crate) enum Claim {
    /// This delivery starts the source's runs; [`settle_source`] must follow.
    Won,
    /// Runs were started (or are being started) by another delivery: their ids, as far as
    /// known.
    Held(Vec<String>),
}

fn ids_of(raw: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(raw)
        .split(',')
        .filter(|s| !s.is_empty() && !s.starts_with(PENDING_CLAIM))
        .map(str::to_string)
        .collect()
}

/// The age of a pending claim, None for a guard that names runs.
fn pending_since(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw)
        .ok()?
        .strip_prefix(PENDING_CLAIM)?
        .parse()
        .ok()
}

/// Claims the source guard `key` for a delivery about to start runs. The caller holds the
/// instance's run lock.
pub(crate) async fn claim_source(inner: &Inner, key: &str) -> Result<Claim, StoreError> {
    let now = inner.ports.clock.now_ms();
    let Some((kv, records)) = port(inner) else {
        return Ok(match inner.ports.kv.get(key).await? {
            Some(raw) => Claim::Held(ids_of(&raw)),
            None => Claim::Won,
        });
    };
    let value = format!("{PENDING_CLAIM}{now}");
    if records.create(key, value.as_bytes()).await? {
        return Ok(Claim::Won);
    }
    let Some(raw) = kv.get(key).await? else {
        // Released between the create and the read: one more try.
        return Ok(match records.create(key, value.as_bytes()).await? {
            true => Claim::Won,
            false => Claim::Held(Vec::new()),
        });
    };
    match pending_since(&raw) {
        Some(at) if now.saturating_sub(at) >= CLAIM_STALE_MS => {
            kv.put(key, value.as_bytes()).await?;
            Ok(Claim::Won)
        }
        _ => Ok(Claim::Held(ids_of(&raw))),
    }
}

/// Ends a [`Claim::Won`]: the guard names the runs started, or is released when none were
/// (no rule matched, or starting them failed, so the sender's retry can start them).
pub(crate) async fn settle_source(
    inner: &Inner,
    key: &str,
    started: &Result<Vec<String>, StoreError>,
) -> Result<(), StoreError> {
    let kv = runs(inner);
    match started {
        Ok(ids) if !ids.is_empty() => kv.put(key, ids.join(",").as_bytes()).await,
        _ => match port(inner) {
            Some(_) => kv.delete(key).await,
            None => Ok(()),
        },
    }
}
