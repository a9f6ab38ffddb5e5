//! Coalescing: one upstream exchange for any number of concurrent identical misses.
//!
//! Two kinds of work are shared while in flight, each in its own map on the core instance
//! (the core is single-threaded per instance, so a `RefCell` suffices; there is no global
//! map across instances):
//!
//! - **Index revalidations**, keyed by repository and the conditional request they make (the
//!   previous record's digest and validators): N requests for a cold or stale index send one
//!   GET and all get the record it produced.
//! - **Chart obtains**, keyed by (repository, digest): a fill from the repository's chart URL
//!   when the bytes are not stored, or a proof of possession ([`chart_fill::confirm_chart`]) when
//!   they are stored for someone else; either ends in a holding for that repository. The key
//!   holds the repository, so a request joins only work done for its own repository — never a
//!   fill another repository's index started (that would hand it bytes it is not entitled to).
//!
//! A flight runs on the deferred port as well as in its requesters, so it completes when every
//! requester has gone; it removes itself from its map when it ends, whatever the outcome, so
//! a failure is not remembered (the next request tries again).

use super::chart_fill;
use super::entry::ChartRef;
use super::store::{self, Fetch, IndexRecord, Revalidated};
use super::{holdings, HelmError, HelmRepo};
use crate::core::context::Inner;
use crate::core::metrics::inc;
use futures_util::future::{LocalBoxFuture, Shared};
use futures_util::FutureExt;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

type Flight<T> = Shared<LocalBoxFuture<'static, T>>;
type Map<T> = RefCell<HashMap<String, Flight<T>>>;

/// The chart repository work in flight on one core instance.
#[derive(Default)]
pub(crate) struct InFlight {
    indexes: Map<Result<Revalidated, Fetch>>,
    charts: Map<Result<(), HelmError>>,
}

/// Joins the flight under `key` (counting a coalesced wait), or starts `work` as one. Returns
/// the flight and whether it was joined (true) or started (false).
fn join_or_start<T: Clone + 'static>(
    inner: &Rc<Inner>,
    map: fn(&InFlight) -> &Map<T>,
    key: String,
    work: impl FnOnce() -> LocalBoxFuture<'static, T>,
) -> (Flight<T>, bool) {
    if let Some(f) = map(&inner.slots.get::<InFlight>()).borrow().get(&key) {
        inc(&inner.metrics.coalesced_waits);
        return (f.clone(), true);
    }
    let work = work();
    let owner = inner.clone();
    let k = key.clone();
    let flight = async move {
        let out = work.await;
        map(&owner.slots.get::<InFlight>()).borrow_mut().remove(&k);
        out
    }
    .boxed_local()
    .shared();
    map(&inner.slots.get::<InFlight>())
        .borrow_mut()
        .insert(key, flight.clone());
    inner
        .ports
        .deferred
        .spawn(flight.clone().map(|_| ()).boxed_local());
    (flight, false)
}

/// [`store::revalidate`], shared by every concurrent request that would send the same
/// request for `repo`'s index. The bool says whether another request's fetch was joined.
pub(crate) async fn revalidate(
    inner: &Rc<Inner>,
    repo: &HelmRepo,
    prev: Option<IndexRecord>,
) -> (Result<Revalidated, Fetch>, bool) {
    let key = match &prev {
        None => repo.name.clone(),
        Some(p) => format!(
            "{}\n{}\n{}\n{}",
            repo.name,
            p.digest,
            p.etag.as_deref().unwrap_or(""),
            p.last_modified.as_deref().unwrap_or("")
        ),
    };
    let (flight, joined) = join_or_start(
        inner,
        |f| &f.indexes,
        key,
        || {
            let (inner, repo) = (inner.clone(), repo.clone());
            async move { store::revalidate(&inner, &repo, prev).await }.boxed_local()
        },
    );
    (flight.await, joined)
}

/// Makes `repo` hold `chart`: fills it from `repo`'s chart URL, or, when the bytes are stored
/// already, proves `repo`'s upstream has them; then records the holding. Shared by every
/// concurrent request for the same (repository, digest). The bool says whether it was joined.
pub(crate) async fn obtain(
    inner: &Rc<Inner>,
    repo: &HelmRepo,
    chart: &ChartRef,
) -> (Result<(), HelmError>, bool) {
    let digest = chart.digest_string();
    let key = format!("{}\n{digest}", repo.name);
    let (flight, joined) = join_or_start(
        inner,
        |f| &f.charts,
        key,
        || {
            let (inner, repo, chart) = (inner.clone(), repo.clone(), chart.clone());
            async move {
                let stored = inner
                    .ports
                    .blobs
                    .stat(&crate::core::registry::reference::Digest::from_sha256(
                        &chart.digest,
                    ))
                    .await
                    .map_err(|e| HelmError::Internal(e.to_string()))?
                    .is_some();
                if stored {
                    chart_fill::confirm_chart(&inner, &repo, &chart).await?;
                } else {
                    chart_fill::fill_chart(&inner, &repo, &chart).await?;
                }
                // Best effort: this request has its proof either way; without the record the
                // next one proves again.
                let _ = holdings::record(&inner, &repo, &digest).await;
                Ok(())
            }
            .boxed_local()
        },
    );
    (flight.await, joined)
}
