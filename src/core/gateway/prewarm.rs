//! pullgate's own `distribute` stage: pulling a run's image through the cache (index, the
//! configured platforms' manifests, configs and layers) by calling the core's own dispatch as
//! an internal caller, so the first regional pull is warm. No upstream I/O of its own.

use crate::core::app::App;
use crate::core::body::Body;
use crate::core::context::Inner;
use crate::core::registry::media::DEFAULT_ACCEPT;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, StatusCode};
use serde_json::Value;
use std::rc::Rc;

async fn drain(app: &App, path: &str, accept: Option<&str>) -> Result<(u64, Bytes), String> {
    let mut b = Request::builder().method(Method::GET).uri(path);
    if let Some(a) = accept {
        b = b.header(header::ACCEPT, a);
    }
    let mut req = b.body(()).map_err(|e| e.to_string())?;
    req.extensions_mut()
        .insert(crate::core::access::caller::InternalCall);
    // Boxed: pre-warming goes back through App::handle, which can reach the pump again.
    let resp = Box::pin(app.handle(&req)).await;
    let status = resp.status();
    if status != StatusCode::OK {
        return Err(format!("GET {path}: {status}"));
    }
    match resp.into_body() {
        Body::Bytes(b) => Ok((b.len() as u64, b)),
        Body::Empty => Ok((0, Bytes::new())),
        Body::Host(_) => Ok((0, Bytes::new())),
        Body::Stream(mut s) => {
            let mut n = 0u64;
            while let Some(c) = s.next().await {
                n += c.map_err(|e| format!("GET {path}: {e}"))?.len() as u64;
            }
            Ok((n, Bytes::new()))
        }
    }
}

/// Pulls `image` through the cache: the index, the configured platforms' manifests, their
/// configs and layers; so the first regional pull is warm.
pub(super) async fn prewarm(inner: &Rc<Inner>, image: &str) -> Result<String, String> {
    let app = App::from_inner(inner.clone());
    let (name, reference) = match image.rsplit_once('@') {
        Some((n, d)) => (n, d),
        None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((n, t)) => (n, t),
            None => (image, "latest"),
        },
    };
    let base = format!("/v2/{name}");
    let (_, top) = drain(
        &app,
        &format!("{base}/manifests/{reference}"),
        Some(DEFAULT_ACCEPT),
    )
    .await?;
    let top: Value =
        serde_json::from_slice(&top).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let platforms = &inner.settings.gateway.chain.platforms;
    let mut manifests = Vec::new();
    if let Some(children) = top.get("manifests").and_then(|m| m.as_array()) {
        for c in children {
            let plat = format!(
                "{}/{}",
                c.pointer("/platform/os")
                    .and_then(|v| v.as_str())
                    .unwrap_or(""),
                c.pointer("/platform/architecture")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
            );
            if !platforms.is_empty() && !platforms.contains(&plat) {
                continue;
            }
            let d = c
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or("index entry without a digest")?;
            let (_, m) =
                drain(&app, &format!("{base}/manifests/{d}"), Some(DEFAULT_ACCEPT)).await?;
            manifests.push(serde_json::from_slice::<Value>(&m).map_err(|e| e.to_string())?);
        }
    } else {
        manifests.push(top);
    }
    let (mut blobs, mut bytes) = (0u32, 0u64);
    for m in &manifests {
        let config = m.pointer("/config/digest").and_then(|d| d.as_str());
        let layers = m
            .get("layers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("digest").and_then(|d| d.as_str()));
        for d in config.into_iter().chain(layers) {
            let (n, _) = drain(&app, &format!("{base}/blobs/{d}"), None).await?;
            blobs += 1;
            bytes += n;
        }
    }
    Ok(format!(
        "pre-warmed {} manifest(s) and {blobs} blob(s), {bytes} bytes",
        manifests.len()
    ))
}
