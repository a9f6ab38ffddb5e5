//! Chart files from their upstream URLs: the one gate every chart URL passes
//! ([`fetch_chart_url`]: the index's origin or the entry's `chart_hosts`, see
//! [`super::hosts`]), the fill that writes a chart into the blob store under the digest its
//! index lists ([`fill_chart`], committed only if the bytes hash to it), and the proof of
//! possession for a chart already stored for another repository ([`confirm_chart`], which
//! stores nothing). Bodies are read within [`MAX_CHART_SIZE`] and against their declared
//! length. Error text never carries what a mismatched answer contained (no digest of the
//! bytes that came back, no upstream body text).

use super::entry::ChartRef;
use super::hosts::{host_port, is_allowed_chart_url};
use super::store::{fetch_failure, get, header_string, internal, status_failure};
use super::{HelmError, HelmRepo};
use crate::core::context::Inner;
use crate::core::metrics::{add, inc};
use crate::core::ports::{ByteStream, CommitError};
use crate::core::registry::reference::Digest;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use url::Url;

/// Largest chart file accepted from an upstream.
pub const MAX_CHART_SIZE: u64 = 256 << 20;
/// Chart bytes gathered before one write to the blob store.
const WRITE_BATCH: usize = 1 << 20;

/// GETs a chart URL the index of `repo` chose: the one function every chart fetch goes
/// through. Refuses, before any request is made, a URL that is neither on the index's origin
/// nor on a host the `[[helm]]` entry lists in `chart_hosts`.
pub(crate) async fn fetch_chart_url(
    inner: &Inner,
    repo: &HelmRepo,
    chart: &ChartRef,
) -> Result<Response<ByteStream>, HelmError> {
    let what = format!("chart {}", chart.key);
    let url = Url::parse(&chart.url)
        .map_err(|_| HelmError::BadUpstream(format!("{what}: the index lists a malformed URL")))?;
    if !is_allowed_chart_url(&repo.url, &repo.chart_hosts, &url) {
        return Err(HelmError::BadUpstream(format!(
            "{what}: the index of chart repository {} points at host {}, which is neither the \
             index's own host nor listed in its chart_hosts; not fetched",
            repo.name,
            host_port(&url)
        )));
    }
    get(inner, repo, &url, &[])
        .await
        .map_err(|e| fetch_failure(&what, e))
}

/// A chart's upstream body, read within [`MAX_CHART_SIZE`] and checked against its declared
/// length at the end.
struct ChartBody<'a> {
    inner: &'a Inner,
    what: String,
    body: ByteStream,
    declared: Option<u64>,
    received: u64,
}

impl ChartBody<'_> {
    /// The next chunk; None at a complete end.
    async fn next(&mut self) -> Result<Option<Bytes>, HelmError> {
        let what = &self.what;
        match self.body.next().await {
            Some(c) => {
                let c =
                    c.map_err(|e| HelmError::Unavailable(format!("{what}: upstream body: {e}")))?;
                self.received += c.len() as u64;
                if self.received > MAX_CHART_SIZE {
                    return Err(HelmError::BadUpstream(format!(
                        "{what} is larger than {MAX_CHART_SIZE} bytes"
                    )));
                }
                add(&self.inner.metrics.bytes_fetched, c.len() as u64);
                Ok(Some(c))
            }
            None if self.declared.is_some_and(|n| n != self.received) => Err(
                HelmError::Unavailable(format!("{what}: upstream body ended early")),
            ),
            None => Ok(None),
        }
    }
}

/// Opens a chart's upstream body: the response must be a 200 within [`MAX_CHART_SIZE`].
async fn open_chart<'a>(
    inner: &'a Inner,
    repo: &HelmRepo,
    chart: &ChartRef,
) -> Result<ChartBody<'a>, HelmError> {
    let what = format!("chart {}", chart.key);
    let resp = fetch_chart_url(inner, repo, chart).await?;
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            return Err(HelmError::NotFound(format!(
            "{what} is listed in the index of chart repository {} but its upstream URL answered {}",
            repo.name,
            resp.status()
        )))
        }
        s => return Err(status_failure(s, &what)),
    }
    let declared = header_string(&resp, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_CHART_SIZE) {
        return Err(HelmError::BadUpstream(format!(
            "{what} is larger than {MAX_CHART_SIZE} bytes"
        )));
    }
    Ok(ChartBody {
        inner,
        what,
        body: resp.into_body(),
        declared,
        received: 0,
    })
}

/// The answer to bytes that do not hash to the digest the index lists (no digests in it).
fn mismatch(inner: &Inner, chart: &ChartRef) -> HelmError {
    inc(&inner.metrics.digest_mismatches);
    HelmError::BadUpstream(format!(
        "chart {}: chart bytes did not match the digest its index lists; not served",
        chart.key
    ))
}

/// Fetches a chart file from `repo`'s chart URL into the blob store under the digest the
/// index lists; the store commits it only if the bytes hash to that digest.
pub(crate) async fn fill_chart(
    inner: &Inner,
    repo: &HelmRepo,
    chart: &ChartRef,
) -> Result<(), HelmError> {
    let mut body = open_chart(inner, repo, chart).await?;
    let digest = Digest::from_sha256(&chart.digest);
    let mut writer = inner
        .ports
        .blobs
        .create(&digest, body.declared)
        .await
        .map_err(internal)?;
    let result: Result<(), HelmError> = async {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        while let Some(c) = body.next().await? {
            batched += c.len();
            batch.push(c);
            if batched >= WRITE_BATCH {
                batched = 0;
                writer
                    .write(std::mem::take(&mut batch))
                    .await
                    .map_err(internal)?;
            }
        }
        if !batch.is_empty() {
            writer.write(batch).await.map_err(internal)?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        writer.abort().await;
        return Err(e);
    }
    match writer.commit().await {
        Ok(()) => Ok(()),
        Err(CommitError::DigestMismatch { .. }) => Err(mismatch(inner, chart)),
        Err(CommitError::Store(e)) => Err(internal(e)),
    }
}

/// Proves that `repo`'s chart URL serves the bytes of a chart already stored (for another
/// repository or route): GETs it and hashes the answer, storing nothing.
pub(crate) async fn confirm_chart(
    inner: &Inner,
    repo: &HelmRepo,
    chart: &ChartRef,
) -> Result<(), HelmError> {
    let mut body = open_chart(inner, repo, chart).await?;
    let mut h = Sha256::new();
    while let Some(c) = body.next().await? {
        h.update(&c);
    }
    if <[u8; 32]>::from(h.finalize()) == chart.digest {
        Ok(())
    } else {
        Err(mismatch(inner, chart))
    }
}
