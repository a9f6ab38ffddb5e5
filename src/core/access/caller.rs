//! Who is calling and what they may do: the [`Principal`] the gate authenticated, the
//! [`Caller`] every feature receives, and the authorization decisions over the `[[access]]`
//! rules. The one access module other features import.

use crate::core::access::config::AccessSettings;
use crate::core::access::token;
use crate::core::context::Inner;
use crate::core::ct::tokens_match;
use crate::core::glob::glob_match;
use crate::core::http::bearer;
use http::HeaderMap;
use std::net::IpAddr;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity name, or `anonymous`.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Scopes carried by a pullgate token (canonical names and actions).
    pub grants: Option<Vec<token::Grant>>,
}

impl Principal {
    /// The anonymous principal.
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            groups: vec![],
            grants: None,
        }
    }
    /// True for the anonymous principal.
    pub fn is_anonymous(&self) -> bool {
        self.name == "anonymous"
    }
}

/// Who is calling, after the gate.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The principal.
    pub principal: Principal,
    /// The client address, when the host knows it.
    pub ip: Option<IpAddr>,
    /// pullgate itself (the gateway's pre-warm), not a client.
    pub internal: bool,
}

/// Marks a request pullgate makes to itself (pre-warming through the cache). Only in-process
/// code can put a Rust type in a request's extensions, so no client can claim it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InternalCall;

fn who_matches(who: &str, p: &Principal) -> bool {
    match who {
        "anonymous" => p.is_anonymous(),
        "*" => !p.is_anonymous(),
        w => match w.strip_prefix("group:") {
            Some(g) => p.groups.iter().any(|x| x == g),
            None => !p.is_anonymous() && w == p.name,
        },
    }
}

/// May `p` do `action` on `upstream`/`repository` under the rules?
pub fn is_allowed(
    s: &AccessSettings,
    p: &Principal,
    action: &str,
    upstream: &str,
    repository: &str,
) -> bool {
    s.rules.iter().any(|r| {
        r.actions.iter().any(|a| a == action)
            && r.who.iter().any(|w| who_matches(w, p))
            && r.upstreams.iter().any(|g| glob_match(g, upstream))
            && r.repositories.iter().any(|g| glob_match(g, repository))
    })
}

/// Does `p`'s token grant `action` on the canonical `name`?
pub fn token_grants(p: &Principal, name: &str, action: &str) -> bool {
    p.grants.as_ref().is_some_and(|g| {
        g.iter()
            .any(|g| g.name == name && g.actions.iter().any(|a| a == action))
    })
}

/// May the caller do `action` (`admin`, or `trigger`) on the admin routes?
pub(crate) fn may_administer(inner: &Inner, caller: &Caller, action: &str) -> bool {
    let s = &inner.settings.access;
    let p = &caller.principal;
    !p.is_anonymous() && (is_allowed(s, p, "admin", "*", "*") || is_allowed(s, p, action, "*", "*"))
}

/// May the request administer: it carries the gateway admin token, or its caller may `admin`?
pub(crate) fn is_admin(inner: &Inner, headers: &HeaderMap, caller: &Caller) -> bool {
    let token = inner.settings.gateway.admin_token.as_ref();
    token.is_some_and(|t| bearer(headers).is_some_and(|given| tokens_match(given, t.expose())))
        || may_administer(inner, caller, "admin")
}
