//! The upstream transfer behind a blob fill: one GET, received and written to the store
//! concurrently (the writer gets everything received since its last write in one call, so
//! hashing and disk writes overlap with the network), with at most [`MAX_UNPERSISTED`] bytes
//! received but not yet written. The store's writer commits only when the sha256 matches.

use crate::core::context::Inner;
use crate::core::error::RegistryError;
use crate::core::http::status_failure;
use crate::core::metrics::{add, inc};
use crate::core::ports::{
    BlobWriter, ByteStream, CommitError, FillLease, FillProgress, FillWatch, HostFill,
    HostFillError, NativeFill, StoreError,
};
use crate::core::registry::fill::{follow, Fill, Phase, MAX_UNPERSISTED};
use crate::core::registry::fill_log::FillLog;
use crate::core::registry::links::{self, Via};
use crate::core::registry::reference::{Digest, Name};
use futures_util::future::join;
use futures_util::StreamExt;
use http::{header, Method, StatusCode};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Fetches the blob upstream into the store; the result is recorded in the fill. A verified
/// blob is linked to the repository it was fetched for before readers see the end (a failed
/// link write only costs that repository one `HEAD` later, so it is not an error).
///
/// `lease` tells other instances (threads) following this fill where it stands: the staged
/// write's progress as it is persisted, and the outcome once the blob is committed (or not).
pub(super) async fn drive(
    inner: Rc<Inner>,
    fill: Rc<Fill>,
    lease: Box<dyn FillLease>,
    (up, name, digest): (usize, Name, Digest),
) {
    let log = FillLog::begin(&inner, up, &name, &digest);
    let reporting = Reporting {
        fill: &fill,
        lease: &*lease,
        log: &log,
    };
    let result = transfer(&inner, &reporting, up, &name, &digest).await;
    log.end(fill.state.borrow().received, &result);
    if result.is_ok() {
        let host = &inner.settings.upstreams[up].host;
        let _ = links::record(&inner, host, &name, &[&digest], Via::Fetched).await;
    }
    let outcome = result.clone();
    fill.update(|s| {
        s.phase = match result {
            Ok(()) => Phase::Done,
            Err(e) => Phase::Failed(e),
        }
    });
    reporting.report(Some(outcome));
    inner.fills.borrow_mut().remove(digest.as_str());
}

/// Follows a fill another instance leads (see [`follow`]), then forgets it.
pub(super) async fn drive_follower(
    inner: Rc<Inner>,
    fill: Rc<Fill>,
    watch: Box<dyn FillWatch>,
    digest: Digest,
) {
    follow(&fill, watch).await;
    inner.fills.borrow_mut().remove(digest.as_str());
}

/// The local fill and the lease that mirrors it to other instances.
struct Reporting<'a> {
    fill: &'a Fill,
    lease: &'a dyn FillLease,
    log: &'a FillLog,
}

impl Reporting<'_> {
    /// Publishes the fill's state (and the outcome, at the end) through the lease.
    fn report(&self, outcome: Option<Result<(), RegistryError>>) {
        let progress = {
            let s = self.fill.state.borrow();
            FillProgress {
                started: !matches!(s.phase, Phase::Connecting) || outcome.is_some(),
                size: s.size,
                persisted: s.persisted,
                outcome,
            }
        };
        if progress.outcome.is_none() {
            self.log.progress(progress.persisted);
        }
        self.lease.report(&progress);
    }
}

async fn transfer(
    inner: &Rc<Inner>,
    reporting: &Reporting<'_>,
    up: usize,
    name: &Name,
    digest: &Digest,
) -> Result<(), RegistryError> {
    let fill = reporting.fill;
    let what = format!("blob {digest}");
    let (resp, size) = open_upstream(inner, up, name, digest, &what).await?;
    let body = match inner.ports.blobs.fill_from(digest, size, resp).await {
        NativeFill::Started(host) => return in_host(inner, reporting, host, size, &what).await,
        NativeFill::Declined(resp) => resp.into_body(),
    };
    let mut writer = inner
        .ports
        .blobs
        .create(digest, size)
        .await
        .map_err(internal)?;
    let tail = writer.tail();
    fill.update(|s| {
        s.phase = Phase::Streaming;
        s.size = size;
        s.tail = tail;
    });
    reporting.log.started(size);
    reporting.report(None);
    // The receiver and the writer run concurrently and meet in the fill's state.
    let received_all: RefCell<Option<Result<(), RegistryError>>> = RefCell::new(None);
    let write_failed: Cell<Option<RegistryError>> = Cell::new(None);
    let receiver = async {
        let result = receive(inner, fill, body, size, &write_failed, &what).await;
        *received_all.borrow_mut() = Some(result);
        fill.update(|_| {});
    };
    join(
        receiver,
        persist(reporting, &mut *writer, &received_all, &write_failed),
    )
    .await;
    let outcome = match (write_failed.take(), received_all.into_inner()) {
        (Some(e), _) => Err(e),
        (None, Some(r)) => r,
        (None, None) => Err(RegistryError::Internal(format!(
            "{what}: fill ended without a result"
        ))),
    };
    if let Err(e) = outcome {
        writer.abort().await;
        return Err(e);
    }
    match writer.commit().await {
        Ok(()) => Ok(()),
        Err(CommitError::DigestMismatch { actual }) => {
            inc(&inner.metrics.digest_mismatches);
            Err(RegistryError::BadUpstream(format!(
                "{what}: upstream bytes hash to {actual}; not cached"
            )))
        }
        Err(CommitError::Store(e)) => Err(internal(e)),
    }
}

/// A fill the host runs in its runtime: no byte passes through here. The fill carries the
/// host's handle (its readers take the live body or wait for the outcome); the outcome is the
/// platform's verdict on the bytes.
async fn in_host(
    inner: &Rc<Inner>,
    reporting: &Reporting<'_>,
    host: Rc<dyn HostFill>,
    size: Option<u64>,
    what: &str,
) -> Result<(), RegistryError> {
    let fill = reporting.fill;
    let outcome = host.outcome();
    fill.update(|s| {
        s.phase = Phase::Streaming;
        s.size = size;
        s.host = Some(host);
    });
    reporting.report(None);
    match outcome.await {
        Ok(()) => {
            let n = size.unwrap_or(0);
            add(&inner.metrics.bytes_fetched, n);
            fill.update(|s| {
                s.received = n;
                s.persisted = n;
                s.recent_start = n;
            });
            Ok(())
        }
        Err(HostFillError::DigestMismatch) => {
            inc(&inner.metrics.digest_mismatches);
            Err(RegistryError::BadUpstream(format!(
                "{what}: upstream bytes do not hash to the digest; not cached"
            )))
        }
        Err(HostFillError::Failed(e)) => Err(RegistryError::Unavailable(format!("{what}: {e}"))),
    }
}

fn internal(e: StoreError) -> RegistryError {
    RegistryError::Internal(e.to_string())
}

/// The upstream's GET of the blob: its response and announced length, or the error a reader
/// gets.
async fn open_upstream(
    inner: &Rc<Inner>,
    up: usize,
    name: &Name,
    digest: &Digest,
    what: &str,
) -> Result<(http::Response<ByteStream>, Option<u64>), RegistryError> {
    let spec = &inner.settings.upstreams[up];
    let path = format!("/v2/{name}/blobs/{digest}");
    let resp = inner
        .client
        .request(spec, Method::GET, &path, None, name.as_str(), true)
        .await
        .map_err(crate::core::registry::upstream::registry_error)?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            return Err(RegistryError::BlobUnknown(format!(
                "{what} is not known upstream"
            )))
        }
        s => return Err(status_failure(s, what)),
    }
    let size = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    Ok((resp, size))
}

/// Takes the upstream body into the fill, waiting while more than [`MAX_UNPERSISTED`] bytes
/// are not yet written; a body longer or shorter than its `Content-Length` is an error.
async fn receive(
    inner: &Rc<Inner>,
    fill: &Fill,
    mut body: ByteStream,
    size: Option<u64>,
    write_failed: &Cell<Option<RegistryError>>,
    what: &str,
) -> Result<(), RegistryError> {
    loop {
        loop {
            let seen = fill.version.get();
            let backlog = {
                let s = fill.state.borrow();
                s.received - s.persisted
            };
            if backlog <= MAX_UNPERSISTED {
                break;
            }
            if let Some(e) = write_failed.take() {
                return Err(e);
            }
            fill.changed(seen).await;
        }
        if let Some(e) = write_failed.take() {
            return Err(e);
        }
        let chunk = match body.next().await {
            None => break,
            Some(c) => {
                c.map_err(|e| RegistryError::Unavailable(format!("{what}: upstream body: {e}")))?
            }
        };
        let len = chunk.len() as u64;
        let total = fill.state.borrow().received + len;
        if size.is_some_and(|s| total > s) {
            return Err(RegistryError::BadUpstream(format!(
                "{what}: longer than its Content-Length"
            )));
        }
        add(&inner.metrics.bytes_fetched, len);
        fill.update(|s| {
            s.recent.push_back(chunk);
            s.received = total;
        });
    }
    let got = fill.state.borrow().received;
    if size.is_some_and(|s| got != s) {
        return Err(RegistryError::Unavailable(format!(
            "{what}: upstream body ended early"
        )));
    }
    Ok(())
}

/// Writes what the receiver took, everything since the last write in one call, until the
/// receiver is done (or failed); a failed write is handed to the receiver through
/// `write_failed`.
async fn persist(
    reporting: &Reporting<'_>,
    writer: &mut dyn BlobWriter,
    received_all: &RefCell<Option<Result<(), RegistryError>>>,
    write_failed: &Cell<Option<RegistryError>>,
) {
    let fill = reporting.fill;
    loop {
        let seen = fill.version.get();
        let (chunks, upto) = fill.state.borrow().unpersisted();
        if chunks.is_empty() {
            if received_all.borrow().is_some() {
                return;
            }
            fill.changed(seen).await;
            continue;
        }
        if let Err(e) = writer.write(chunks).await {
            write_failed.set(Some(internal(e)));
            fill.update(|_| {});
            return;
        }
        fill.update(|s| {
            s.persisted = upto;
            s.trim();
        });
        reporting.report(None);
        if received_all.borrow().as_ref().is_some_and(|r| r.is_err()) {
            return;
        }
    }
}
