//! The registry boundary's one error enum and its code → status table.
//!
//! Every failure a registry route can answer with is one variant here; `code()` names the OCI
//! error code and `status()` the HTTP status, both from one table (`TABLE`). `Display` is plain
//! text for logs; the JSON envelope (`{"errors":[{code,message,detail}]}`, OCI distribution spec
//! "Error Codes") is built by `envelope()`. `UNAVAILABLE` is the code distribution and Docker
//! clients use for 503; the spec lists no code for "upstream unreachable".

use http::StatusCode;

/// A registry-route failure; each variant maps to one OCI error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The repository name is malformed.
    #[error("{0}")]
    NameInvalid(String),
    /// The repository, or the upstream registry named for it, is not known here.
    #[error("{0}")]
    NameUnknown(String),
    /// The manifest is not known upstream or here.
    #[error("{0}")]
    ManifestUnknown(String),
    /// The manifest (tag or body) is invalid.
    #[error("{0}")]
    ManifestInvalid(String),
    /// The blob is not known upstream or here.
    #[error("{0}")]
    BlobUnknown(String),
    /// The digest is malformed or unsupported.
    #[error("{0}")]
    DigestInvalid(String),
    /// The requested byte range cannot be served.
    #[error("{0}")]
    RangeInvalid(String),
    /// The operation is not offered by a pull-through cache.
    #[error("{0}")]
    Unsupported(String),
    /// The endpoint does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Authentication is required (or the credentials were refused).
    #[error("{0}")]
    Unauthorized(String),
    /// The upstream refused our credentials or the configured access.
    #[error("{0}")]
    Denied(String),
    /// The upstream asked us to slow down and nothing cached could answer.
    #[error("{0}")]
    TooManyRequests(String),
    /// The upstream is unreachable or failing and nothing cached could answer.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream answered with something that is not a valid registry response.
    #[error("{0}")]
    BadUpstream(String),
    /// A failure inside pullgate (storage, a bug).
    #[error("{0}")]
    Internal(String),
}

/// (variant tag, OCI code, HTTP status): the one table.
const TABLE: &[(&str, &str, u16)] = &[
    ("NameInvalid", "NAME_INVALID", 400),
    ("NameUnknown", "NAME_UNKNOWN", 404),
    ("ManifestUnknown", "MANIFEST_UNKNOWN", 404),
    ("ManifestInvalid", "MANIFEST_INVALID", 400),
    ("BlobUnknown", "BLOB_UNKNOWN", 404),
    ("DigestInvalid", "DIGEST_INVALID", 400),
    ("RangeInvalid", "SIZE_INVALID", 416),
    ("Unsupported", "UNSUPPORTED", 405),
    ("NotFound", "UNSUPPORTED", 404),
    ("Unauthorized", "UNAUTHORIZED", 401),
    ("Denied", "DENIED", 403),
    ("TooManyRequests", "TOOMANYREQUESTS", 429),
    ("Unavailable", "UNAVAILABLE", 503),
    ("BadUpstream", "UNAVAILABLE", 502),
    ("Internal", "UNKNOWN", 500),
];

impl RegistryError {
    fn tag(&self) -> &'static str {
        match self {
            RegistryError::NameInvalid(_) => "NameInvalid",
            RegistryError::NameUnknown(_) => "NameUnknown",
            RegistryError::ManifestUnknown(_) => "ManifestUnknown",
            RegistryError::ManifestInvalid(_) => "ManifestInvalid",
            RegistryError::BlobUnknown(_) => "BlobUnknown",
            RegistryError::DigestInvalid(_) => "DigestInvalid",
            RegistryError::RangeInvalid(_) => "RangeInvalid",
            RegistryError::Unsupported(_) => "Unsupported",
            RegistryError::NotFound(_) => "NotFound",
            RegistryError::Unauthorized(_) => "Unauthorized",
            RegistryError::Denied(_) => "Denied",
            RegistryError::TooManyRequests(_) => "TooManyRequests",
            RegistryError::Unavailable(_) => "Unavailable",
            RegistryError::BadUpstream(_) => "BadUpstream",
            RegistryError::Internal(_) => "Internal",
        }
    }

    fn row(&self) -> (&'static str, u16) {
        let tag = self.tag();
        TABLE
            .iter()
            .find(|(t, _, _)| *t == tag)
            .map(|(_, code, status)| (*code, *status))
            .unwrap_or(("UNKNOWN", 500))
    }

    /// The OCI error code.
    pub fn code(&self) -> &'static str {
        self.row().0
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.row().1).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The OCI JSON error envelope.
    pub fn envelope(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code(), "message": self.to_string(), "detail": null }]
        })
        .to_string()
    }
}

impl From<crate::core::registry::reference::ReferenceError> for RegistryError {
    fn from(e: crate::core::registry::reference::ReferenceError) -> Self {
        use crate::core::registry::reference::ReferenceError as R;
        match e {
            R::Name(_) => RegistryError::NameInvalid(e.to_string()),
            R::Tag(_) => RegistryError::ManifestInvalid(e.to_string()),
            R::Digest(_) => RegistryError::DigestInvalid(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_row() {
        let all = [
            RegistryError::NameInvalid(String::new()),
            RegistryError::NameUnknown(String::new()),
            RegistryError::ManifestUnknown(String::new()),
            RegistryError::ManifestInvalid(String::new()),
            RegistryError::BlobUnknown(String::new()),
            RegistryError::DigestInvalid(String::new()),
            RegistryError::RangeInvalid(String::new()),
            RegistryError::Unsupported(String::new()),
            RegistryError::NotFound(String::new()),
            RegistryError::Unauthorized(String::new()),
            RegistryError::Denied(String::new()),
            RegistryError::TooManyRequests(String::new()),
            RegistryError::Unavailable(String::new()),
            RegistryError::BadUpstream(String::new()),
            RegistryError::Internal(String::new()),
        ];
        for e in all {
            assert!(TABLE.iter().any(|(t, _, _)| *t == e.tag()), "{e:?}");
        }
    }

    #[test]
    fn error_mapping_gives_spec_codes_and_statuses() {
        let cases = [
            (
                RegistryError::Unsupported("push".into()),
                "UNSUPPORTED",
                405,
            ),
            (
                RegistryError::ManifestUnknown("x".into()),
                "MANIFEST_UNKNOWN",
                404,
            ),
            (
                RegistryError::Unavailable("down".into()),
                "UNAVAILABLE",
                503,
            ),
            (
                RegistryError::TooManyRequests("slow".into()),
                "TOOMANYREQUESTS",
                429,
            ),
            (
                RegistryError::DigestInvalid("d".into()),
                "DIGEST_INVALID",
                400,
            ),
            (RegistryError::RangeInvalid("r".into()), "SIZE_INVALID", 416),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.code(), code);
            assert_eq!(e.status().as_u16(), status);
        }
    }

    #[test]
    fn envelope_is_oci_json() {
        let v: serde_json::Value =
            serde_json::from_str(&RegistryError::BlobUnknown("no such blob".into()).envelope())
                .unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "no such blob");
    }
}
