//! pullgate's own registry tokens: `pg1.<base64url claims>.<base64url HMAC-SHA256>`, issued by
//! `GET /token` after checking credentials, short-lived, carrying the granted scopes. Pure.
//! Only pullgate reads them, so a compact HMAC format serves better than a JWT library.

use crate::core::ct::bytes_match;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// One granted scope: `repository:<name>:<actions>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Canonical `<upstream host>/<repository>`.
    pub name: String,
    /// Actions granted.
    pub actions: Vec<String>,
}

/// Token claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Identity (`anonymous` when none).
    pub sub: String,
    /// Expiry (ms since the epoch).
    pub exp: u64,
    /// Grants.
    pub access: Vec<Grant>,
}

fn mac(key: &[u8], data: &[u8]) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(b"pullgate-token\0");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// Signs claims.
pub fn sign(key: &[u8], claims: &Claims) -> String {
    let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
    let sig = B64.encode(mac(key, body.as_bytes()));
    format!("pg1.{body}.{sig}")
}

/// Verifies a token and its expiry; None when forged, malformed or expired.
pub fn verify(key: &[u8], token: &str, now_ms: u64) -> Option<Claims> {
    let rest = token.strip_prefix("pg1.")?;
    let (body, sig) = rest.split_once('.')?;
    let given = B64.decode(sig).ok()?;
    let want = mac(key, body.as_bytes());
    if !bytes_match(&given, &want) {
        return None;
    }
    let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
    (claims.exp > now_ms).then_some(claims)
}

/// Parses a requested scope `repository:<name>:<a,b>`.
pub fn parse_scope(s: &str) -> Option<(String, Vec<String>)> {
    let rest = s.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        name.to_string(),
        actions.split(',').map(str::to_string).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_forgery_and_expiry() {
        let c = Claims {
            sub: "alice".into(),
            exp: 1000,
            access: vec![Grant {
                kind: "repository".into(),
                name: "docker.io/library/alpine".into(),
                actions: vec!["pull".into()],
            }],
        };
        let t = sign(b"k", &c);
        assert_eq!(verify(b"k", &t, 999), Some(c.clone()));
        assert_eq!(verify(b"k", &t, 1000), None, "expired");
        assert_eq!(verify(b"other", &t, 0), None, "wrong key");
        let forged = t.replace("pg1.", "pg1.x");
        assert_eq!(verify(b"k", &forged, 0), None);
        assert_eq!(verify(b"k", "garbage", 0), None);
        assert_eq!(
            parse_scope("repository:ghcr.io/o/app:pull,push"),
            Some(("ghcr.io/o/app".into(), vec!["pull".into(), "push".into()]))
        );
        assert_eq!(parse_scope("registry:catalog:*"), None);
    }
}
