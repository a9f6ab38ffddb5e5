//! [`SharedFills`]: the native host's [`FillCoordinator`]. Every worker thread's core instance
//! holds one clone; together they keep one process-wide map digest → the fill in flight, so
//! concurrent misses of one blob make one upstream transfer whichever threads they land on.
//!
//! The lead's thread publishes its fill's progress into a `tokio::sync::watch` channel (a
//! `Send` notification that works across runtimes); followers on other threads read the lead's
//! staged file through the blob store's staged-file registry ([`FsBlobStore::staged`]) and
//! wait on the channel. What followers serve is bounded by what the lead persisted, and the
//! core withholds the last 64 KiB until the lead reports the blob verified and committed.
//! Nothing here hashes, writes or decides what is valid: that stays in the core and the store.

use crate::core::error::RegistryError;
use crate::core::ports::{
    FillClaim, FillCoordinator, FillLease, FillProgress, FillWatch, TailReader,
};
use crate::core::registry::reference::Digest;
use crate::native::store::FsBlobStore;
use futures_util::future::LocalBoxFuture;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One fill in flight: who it is for, and its progress channel.
struct Entry {
    scope: String,
    progress: watch::Sender<FillProgress>,
}

type Map = Arc<Mutex<HashMap<String, Arc<Entry>>>>;

/// The process-wide fill registry (cheap to clone: clones share the map).
#[derive(Clone)]
pub struct SharedFills {
    map: Map,
    blobs: FsBlobStore,
}

impl SharedFills {
    /// A registry whose followers read staged writes from `blobs`.
    pub fn new(blobs: FsBlobStore) -> SharedFills {
        SharedFills {
            map: Arc::new(Mutex::new(HashMap::new())),
            blobs,
        }
    }

    /// Fills in flight (for shutdown logs and tests).
    pub fn in_flight(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

#[async_trait::async_trait(?Send)]
impl FillCoordinator for SharedFills {
    async fn claim(&self, digest: &Digest, scope: &str) -> FillClaim {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map (a panic while it was held) coordinates nothing: lead alone.
            return FillClaim::Lead(Box::new(Lease::detached()));
        };
        if let Some(entry) = map.get(digest.as_str()) {
            return FillClaim::Follow(Box::new(Watch {
                rx: RefCell::new(entry.progress.subscribe()),
                scope: entry.scope.clone(),
                digest: digest.clone(),
                blobs: self.blobs.clone(),
            }));
        }
        let (tx, _) = watch::channel(FillProgress::default());
        let entry = Arc::new(Entry {
            scope: scope.to_string(),
            progress: tx,
        });
        map.insert(digest.as_str().to_string(), entry.clone());
        FillClaim::Lead(Box::new(Lease {
            held: Some((self.map.clone(), digest.as_str().to_string(), entry)),
            ended: Cell::new(false),
        }))
    }
}

/// The lead's hold on a digest; released by an outcome or by being dropped.
struct Lease {
    held: Option<(Map, String, Arc<Entry>)>,
    ended: Cell<bool>,
}

impl Lease {
    fn detached() -> Lease {
        Lease {
            held: None,
            ended: Cell::new(true),
        }
    }

    /// Publishes `progress`; an outcome removes the digest from the map *after* publishing,
    /// so a follower that joined before sees the outcome, and a later claim leads anew.
    fn publish(&self, progress: FillProgress) {
        let Some((map, key, entry)) = &self.held else {
            return;
        };
        if self.ended.get() {
            return;
        }
        let end = progress.outcome.is_some();
        entry.progress.send_replace(progress);
        if end {
            self.ended.set(true);
            if let Ok(mut map) = map.lock() {
                if map.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                    map.remove(key);
                }
            }
        }
    }
}

impl FillLease for Lease {
    fn report(&self, progress: &FillProgress) {
        self.publish(progress.clone());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.ended.get() {
            return;
        }
        let mut last = self
            .held
            .as_ref()
            .map(|(_, _, e)| e.progress.borrow().clone())
            .unwrap_or_default();
        last.outcome = Some(Err(RegistryError::Unavailable(
            "the transfer this request joined stopped; retry".into(),
        )));
        self.publish(last);
    }
}

/// A follower's view: the progress channel and the staged file of the lead.
struct Watch {
    rx: RefCell<watch::Receiver<FillProgress>>,
    scope: String,
    digest: Digest,
    blobs: FsBlobStore,
}

impl FillWatch for Watch {
    fn progress(&self) -> FillProgress {
        self.rx.borrow_mut().borrow_and_update().clone()
    }

    fn changed(&self) -> LocalBoxFuture<'_, ()> {
        // A clone keeps the version last seen, so a change since `progress` resolves at once.
        let mut rx = self.rx.borrow().clone();
        Box::pin(async move {
            // Err: the lead's lease is gone, and it published an outcome before it went.
            let _ = rx.changed().await;
        })
    }

    fn scope(&self) -> &str {
        &self.scope
    }

    fn tail(&self) -> Option<Rc<dyn TailReader>> {
        self.blobs.staged(&self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        crate::core::registry::reference::parse_digest(&format!("sha256:{}", "ab".repeat(32)))
            .unwrap()
    }

    fn claim(fills: &SharedFills, d: &Digest, scope: &str) -> FillClaim {
        futures_util::FutureExt::now_or_never(fills.claim(d, scope)).expect("claims at once")
    }

    fn fills() -> (tempfile::TempDir, SharedFills) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobStore::open(dir.path(), 1 << 30).unwrap();
        (dir, SharedFills::new(blobs))
    }

    #[test]
    fn one_claim_leads_the_others_follow_until_the_outcome() {
        let (_dir, fills) = fills();
        let d = digest();
        let FillClaim::Lead(lease) = claim(&fills, &d, "up/a") else {
            panic!("the first claim leads")
        };
        let FillClaim::Follow(watch) = claim(&fills, &d, "up/b") else {
            panic!("a second claim follows")
        };
        assert_eq!(watch.scope(), "up/a");
        lease.report(&FillProgress {
            started: true,
            size: Some(10),
            persisted: 4,
            outcome: None,
        });
        assert_eq!(watch.progress().persisted, 4);
        lease.report(&FillProgress {
            started: true,
            size: Some(10),
            persisted: 10,
            outcome: Some(Ok(())),
        });
        assert_eq!(watch.progress().outcome, Some(Ok(())));
        assert_eq!(fills.in_flight(), 0);
        assert!(matches!(claim(&fills, &d, "up/a"), FillClaim::Lead(_)));
    }

    #[test]
    fn a_dropped_lead_fails_its_followers() {
        let (_dir, fills) = fills();
        let d = digest();
        let lease = claim(&fills, &d, "s");
        let FillClaim::Follow(watch) = claim(&fills, &d, "s") else {
            panic!("follows")
        };
        drop(lease);
        assert!(matches!(watch.progress().outcome, Some(Err(_))));
        assert_eq!(fills.in_flight(), 0);
    }
}
