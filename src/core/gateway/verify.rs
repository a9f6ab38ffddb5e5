//! Verifying webhook senders: pure functions over the raw body bytes and the headers, run
//! before any JSON parsing, comparing in constant time (`subtle`). Each provider's scheme is
//! documented by the provider; the test vectors below are taken from that documentation.

use crate::core::ct::bytes_match;
use crate::core::gateway::config::Provider;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery was not accepted as authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The header that carries the signature is absent.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// The signature or token does not match.
    #[error("signature does not match")]
    Mismatch,
    /// The signature header is malformed.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// A signed timestamp is outside the tolerance.
    #[error("signed timestamp is outside the accepted window")]
    Stale,
}

fn header<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    h.get(name)
        .ok_or(VerifyError::Missing(name))?
        .to_str()
        .map_err(|_| VerifyError::Malformed(name))
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // new_from_slice accepts any key length for HMAC.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    parts.iter().for_each(|p| mac.update(p));
    mac.finalize().into_bytes().to_vec()
}

/// Checks a hex HMAC-SHA256 of the body, with an optional `sha256=` prefix required.
fn verify_hex_hmac(
    secret: &[u8],
    body: &[u8],
    value: &str,
    prefix: Option<&str>,
    name: &'static str,
) -> Result<(), VerifyError> {
    let hex_part = match prefix {
        Some(p) => value
            .trim()
            .strip_prefix(p)
            .ok_or(VerifyError::Malformed(name))?,
        None => value.trim(),
    };
    let given = hex::decode(hex_part).map_err(|_| VerifyError::Malformed(name))?;
    if bytes_match(&given, &hmac_sha256(secret, &[body])) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// Standard Webhooks (GitLab's signed form): `webhook-signature: v1,<base64>` (several may be
/// listed, space-separated) over `{id}.{timestamp}.{body}`; a `whsec_` secret is base64.
fn verify_standard_webhook(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: u64,
    tolerance_ms: u64,
) -> Result<(), VerifyError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = header(headers, "webhook-id")?;
    let ts = header(headers, "webhook-timestamp")?;
    let sigs = header(headers, "webhook-signature")?;
    let ts_s: u64 = ts
        .trim()
        .parse()
        .map_err(|_| VerifyError::Malformed("webhook-timestamp"))?;
    let ts_ms = ts_s.saturating_mul(1000);
    if ts_ms.abs_diff(now_ms) > tolerance_ms {
        return Err(VerifyError::Stale);
    }
    let key = match secret.strip_prefix("whsec_") {
        Some(k) => b64
            .decode(k)
            .map_err(|_| VerifyError::Malformed("secret"))?,
        None => secret.as_bytes().to_vec(),
    };
    let expected = hmac_sha256(
        &key,
        &[id.as_bytes(), b".", ts.trim().as_bytes(), b".", body],
    );
    for sig in sigs.split_whitespace() {
        if let Some(v) = sig.strip_prefix("v1,") {
            if let Ok(given) = b64.decode(v) {
                if bytes_match(&given, &expected) {
                    return Ok(());
                }
            }
        }
    }
    Err(VerifyError::Mismatch)
}

/// Verifies a delivery for `provider` with `secret` (and, for `distribution`, the configured
/// header name). `now_ms` and `tolerance_ms` apply to signed timestamps.
pub fn verify_delivery(
    provider: Provider,
    secret: &str,
    header_name: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_ms: u64,
    tolerance_ms: u64,
) -> Result<(), VerifyError> {
    let key = secret.as_bytes();
    match provider {
        Provider::GitHub => {
            let v = header(headers, "x-hub-signature-256")?;
            verify_hex_hmac(key, body, v, Some("sha256="), "x-hub-signature-256")
        }
        Provider::Gitea | Provider::Forgejo => {
            let v = headers
                .get("x-forgejo-signature")
                .or_else(|| headers.get("x-gitea-signature"))
                .ok_or(VerifyError::Missing("x-gitea-signature"))?
                .to_str()
                .map_err(|_| VerifyError::Malformed("x-gitea-signature"))?;
            verify_hex_hmac(key, body, v, None, "x-gitea-signature")
        }
        Provider::GitLab => {
            if signs_timestamp(provider, headers) {
                verify_standard_webhook(secret, headers, body, now_ms, tolerance_ms)
            } else {
                let token = header(headers, "x-gitlab-token")?;
                if bytes_match(token.as_bytes(), key) {
                    Ok(())
                } else {
                    Err(VerifyError::Mismatch)
                }
            }
        }
        Provider::Bitbucket => {
            let v = header(headers, "x-hub-signature")?;
            verify_hex_hmac(key, body, v, Some("sha256="), "x-hub-signature")
        }
        Provider::GenericHmac => {
            let v = header(headers, "x-signature")?;
            verify_hex_hmac(key, body, v, Some("sha256="), "x-signature")
        }
        Provider::Distribution | Provider::Harbor => {
            let name = if provider == Provider::Harbor {
                "authorization"
            } else {
                header_name
            };
            let v = headers
                .get(name)
                .ok_or(VerifyError::Missing("authorization"))?
                .as_bytes();
            if bytes_match(v, key) {
                Ok(())
            } else {
                Err(VerifyError::Mismatch)
            }
        }
    }
}

/// The HMAC-SHA256 hex signature pullgate puts on its own `http` deliveries.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    hex::encode(hmac_sha256(secret, &[body]))
}

/// The callback token for one execution of one stage of one run: keyed by the gateway's
/// `run_secret`, so it cannot be guessed, and bound to all three, so a build job's token
/// cannot post another stage's result, or a result for an earlier or later attempt.
pub fn stage_token(key: &[u8], run: &str, stage: &str, attempt: u32) -> String {
    hex::encode(hmac_sha256(
        key,
        &[
            b"pullgate-stage-token\0",
            run.as_bytes(),
            b"\0",
            stage.as_bytes(),
            b"\0",
            attempt.to_string().as_bytes(),
        ],
    ))
}

/// True when `provider` signs a timestamp on this delivery (GitLab's Standard Webhooks form):
/// its replay window is the timestamp tolerance. Every other sender can be replayed for as
/// long as its secret is valid, so dedup falls back to the body's hash.
pub fn signs_timestamp(provider: Provider, headers: &HeaderMap) -> bool {
    provider == Provider::GitLab && headers.contains_key("webhook-signature")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ct::tokens_match;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    // GitHub's documented example ("Validating webhook deliveries").
    const GH_SECRET: &str = "It's a Secret to Everybody";
    const GH_BODY: &[u8] = b"Hello, World!";
    const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn check(p: Provider, secret: &str, h: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        verify_delivery(
            p,
            secret,
            "authorization",
            h,
            body,
            1_614_265_330_000,
            300_000,
        )
    }

    #[test]
    fn github_vector_from_the_docs() {
        let h = headers(&[("x-hub-signature-256", GH_SIG)]);
        assert_eq!(check(Provider::GitHub, GH_SECRET, &h, GH_BODY), Ok(()));
        assert_eq!(
            check(Provider::GitHub, GH_SECRET, &h, b"Hello, World?"),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(Provider::GitHub, "wrong", &h, GH_BODY),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(Provider::GitHub, GH_SECRET, &HeaderMap::new(), GH_BODY),
            Err(VerifyError::Missing("x-hub-signature-256"))
        );
        let bad = headers(&[("x-hub-signature-256", "sha1=abc")]);
        assert!(matches!(
            check(Provider::GitHub, GH_SECRET, &bad, GH_BODY),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn gitea_forgejo_bitbucket_generic_use_the_same_hmac() {
        let hex_sig = GH_SIG.trim_start_matches("sha256=");
        assert_eq!(
            check(
                Provider::Gitea,
                GH_SECRET,
                &headers(&[("x-gitea-signature", hex_sig)]),
                GH_BODY
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Provider::Forgejo,
                GH_SECRET,
                &headers(&[("x-forgejo-signature", hex_sig)]),
                GH_BODY
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Provider::Bitbucket,
                GH_SECRET,
                &headers(&[("x-hub-signature", GH_SIG)]),
                GH_BODY
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Provider::GenericHmac,
                GH_SECRET,
                &headers(&[("x-signature", GH_SIG)]),
                GH_BODY
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Provider::Gitea,
                GH_SECRET,
                &headers(&[("x-gitea-signature", hex_sig)]),
                b"tampered"
            ),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn gitlab_token_and_standard_webhooks_vector() {
        let h = headers(&[("x-gitlab-token", "tok")]);
        assert_eq!(check(Provider::GitLab, "tok", &h, b"{}"), Ok(()));
        assert_eq!(
            check(Provider::GitLab, "tok2", &h, b"{}"),
            Err(VerifyError::Mismatch)
        );
        // The Standard Webhooks specification's example.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ]);
        assert_eq!(check(Provider::GitLab, secret, &h, body), Ok(()));
        assert_eq!(
            check(Provider::GitLab, secret, &h, b"{}"),
            Err(VerifyError::Mismatch)
        );
        // Ten minutes later the same delivery is stale.
        assert_eq!(
            verify_delivery(
                Provider::GitLab,
                secret,
                "",
                &h,
                body,
                1_614_265_930_000,
                300_000
            ),
            Err(VerifyError::Stale)
        );
    }

    #[test]
    fn registry_notifications_compare_the_configured_header() {
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(
            check(Provider::Distribution, "Bearer abc", &h, b"{}"),
            Ok(())
        );
        assert_eq!(check(Provider::Harbor, "Bearer abc", &h, b"{}"), Ok(()));
        assert_eq!(
            check(Provider::Harbor, "Bearer abd", &h, b"{}"),
            Err(VerifyError::Mismatch)
        );
        let h = headers(&[("x-registry-token", "s")]);
        assert_eq!(
            verify_delivery(
                Provider::Distribution,
                "s",
                "x-registry-token",
                &h,
                b"",
                0,
                0
            ),
            Ok(())
        );
    }

    #[test]
    fn stage_tokens_are_keyed_and_bound_to_run_stage_and_attempt() {
        let a = stage_token(b"k1", "run-1", "build", 1);
        assert_eq!(a.len(), 64);
        assert_ne!(a, stage_token(b"k2", "run-1", "build", 1));
        assert_ne!(a, stage_token(b"k1", "run-2", "build", 1));
        assert_ne!(a, stage_token(b"k1", "run-1", "scan", 1));
        assert_ne!(a, stage_token(b"k1", "run-1", "build", 2));
        // The separators keep the parts apart: ("run-1", "build1") is another input.
        assert_ne!(
            stage_token(b"k1", "run-1", "build1", 1),
            stage_token(b"k1", "run-1", "build", 11)
        );
        assert!(tokens_match(&a, &stage_token(b"k1", "run-1", "build", 1)));
    }
}
