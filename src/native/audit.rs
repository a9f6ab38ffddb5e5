//! The native audit log: one JSON line per pull (manifest, blob, tag list, chart), webhook,
//! token request, admin action and refusal, appended to `<data_dir>/audit.log` (or the
//! configured `audit_log`; `-` for stderr). Records carry identity, client address,
//! repository, reference, digest, bytes and cache outcome; never a credential.

use crate::core::time::rfc3339;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::Write;
use std::path::Path;

/// Where audit records go.
pub struct AuditSink {
    out: RefCell<Box<dyn Write>>,
}

impl AuditSink {
    /// Opens `path` for appending (`-`: stderr).
    pub fn open(path: &Path) -> Result<AuditSink, String> {
        let out: Box<dyn Write> = if path.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("opening the audit log {}: {e}", path.display()))?,
            )
        };
        Ok(AuditSink {
            out: RefCell::new(out),
        })
    }

    /// Writes one record as a line (one write call, so lines never interleave).
    pub fn record(&self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        if let Err(e) = self.out.borrow_mut().write_all(line.as_bytes()) {
            eprintln!("audit log write failed: {e}");
        }
    }
}

/// Routes that produce audit records.
pub fn is_audited(route: &str) -> bool {
    matches!(
        route,
        "manifest" | "blob" | "tags" | "helm" | "hook" | "admin" | "chain" | "token" | "denied"
    )
}

/// (repository, reference) from a registry path.
pub fn repository_and_reference(path: &str) -> (Option<&str>, Option<&str>) {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (None, None);
    };
    for marker in ["/manifests/", "/blobs/"] {
        if let Some(i) = rest.rfind(marker) {
            return (Some(&rest[..i]), Some(&rest[i + marker.len()..]));
        }
    }
    (rest.strip_suffix("/tags/list"), None)
}

/// Facts for one record.
pub struct Entry<'a> {
    /// Wall-clock time (ms).
    pub now_ms: u64,
    /// Identity.
    pub identity: Option<&'a str>,
    /// Client address.
    pub ip: Option<String>,
    /// Method.
    pub method: &'a str,
    /// Path (no query: it may carry nothing secret, but keep records small).
    pub path: &'a str,
    /// Route kind.
    pub route: &'a str,
    /// Upstream.
    pub upstream: Option<&'a str>,
    /// Response status.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// Cache outcome.
    pub cache: &'a str,
    /// Digest served (manifest digest header, or the blob's).
    pub digest: Option<&'a str>,
    /// The body was cut short.
    pub aborted: bool,
}

/// The JSON record for an entry.
pub fn to_json(e: &Entry<'_>) -> Value {
    let (repository, reference) = repository_and_reference(e.path);
    json!({
        "ts": rfc3339(e.now_ms),
        "identity": e.identity,
        "ip": e.ip,
        "method": e.method,
        "route": e.route,
        "path": e.path,
        "upstream": e.upstream,
        "repository": repository,
        "reference": reference,
        "digest": e.digest,
        "status": e.status,
        "bytes": e.bytes,
        "cache": e.cache,
        "aborted": e.aborted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_repository_and_reference() {
        assert_eq!(
            repository_and_reference("/v2/library/alpine/manifests/3.20"),
            (Some("library/alpine"), Some("3.20"))
        );
        assert_eq!(
            repository_and_reference("/v2/ghcr.io/o/a/blobs/sha256:ab"),
            (Some("ghcr.io/o/a"), Some("sha256:ab"))
        );
        assert_eq!(
            repository_and_reference("/v2/x/tags/list"),
            (Some("x"), None)
        );
        assert_eq!(repository_and_reference("/hooks/app"), (None, None));
    }
}
