//! The outbound address policy: which URLs pullgate may request when the *upstream* chose
//! them — redirect `Location`s, Bearer token realms, chart URLs listed in a Helm index — so
//! that an upstream (or whoever controls its answers) cannot make pullgate fetch an internal
//! address (server-side request forgery). Pure and table-tested; the callers are
//! `upstream` (redirects and realms) and `helm::store::get` (chart URLs and their redirects).
//!
//! The rule:
//! - A URL on an origin the operator configured *for the request at hand* is trusted as
//!   written and not checked: the upstream's own origin (scheme-normalised host and port) for
//!   its redirects, that or one of its `auth_hosts` for its token realm, and a Helm entry's
//!   index origin or `chart_hosts` for its charts. The caller decides (`trusted` in
//!   [`guard`]); the whole configuration is never one trusted set, because then any upstream
//!   could send pullgate to a gateway target, another upstream, or another port of its own
//!   host.
//! - Any other URL is refused when it is a literal address in a refused class (loopback,
//!   link-local, private, carrier-grade NAT, unique-local, unspecified, multicast, broadcast,
//!   a cloud metadata endpoint — also in IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6
//!   forms) or a name that is one by definition (`localhost`, `*.localhost`,
//!   `metadata.google.internal`, `metadata`, `instance-data`), unless `[outbound] allow` lists
//!   a network (CIDR) containing the address or the name itself (`*.example.internal` matches
//!   subdomains).
//! - Any other *name* passes here, and the request carries a [`ChosenByUpstream`] marker in
//!   its extensions: a host that resolves names itself (native) checks every resolved address
//!   with [`OutboundPolicy::check_resolved`] before connecting. Hosts whose platform resolves
//!   names (Workers, Spin) cannot, and say so in their `# Limitations`.
//!
//! Refusal messages name the class, never the address a name resolved to (that would make
//! pullgate a DNS oracle) and never anything of an answer.

use crate::core::cidr::{parse_cidr, Cidr};
use crate::core::config::value::ConfigError;
use crate::core::ports::UpstreamError;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use url::{Host, Url};

/// `[outbound]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Networks (`10.0.0.0/8`, `fd00::/8`, a bare address) and host names (`registry.internal`,
    /// `*.corp.internal`) that upstream-chosen URLs may reach although they are internal.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1, `localhost`.
    Loopback,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 10/8, 172.16/12, 192.168/16 (and the deprecated fec0::/10).
    Private,
    /// 100.64.0.0/10.
    CarrierGradeNat,
    /// fc00::/7.
    UniqueLocal,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 169.254.169.254, fd00:ec2::254, 100.100.100.200, `metadata.google.internal`, …
    Metadata,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Loopback => "loopback",
            AddressClass::LinkLocal => "link-local",
            AddressClass::Private => "private",
            AddressClass::CarrierGradeNat => "carrier-grade NAT",
            AddressClass::UniqueLocal => "unique-local",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Metadata => "cloud metadata",
        })
    }
}

/// What chose the URL being requested; words the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A redirect's `Location`.
    Redirect,
    /// A Bearer challenge's `realm`.
    TokenRealm,
    /// A chart URL from a Helm index.
    ChartUrl,
    /// A name resolved by the host (the class is of the resolved address).
    Resolved,
}

/// A refused outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What chose the URL.
    pub purpose: Purpose,
    /// Why.
    pub class: AddressClass,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.purpose {
            Purpose::Redirect => "upstream redirected to a refused address",
            Purpose::TokenRealm => "upstream's token realm is a refused address",
            Purpose::ChartUrl => "chart index points at a refused address",
            Purpose::Resolved => "a host chosen by the upstream resolves only to refused addresses",
        };
        write!(f, "{what} ({}); allow it with [outbound] allow", self.class)
    }
}

impl From<Refused> for UpstreamError {
    fn from(r: Refused) -> UpstreamError {
        UpstreamError::Refused(r.to_string())
    }
}

/// What [`OutboundPolicy::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The operator configured this host: trusted as written.
    Configured,
    /// A literal address that is public, or an address or name `[outbound] allow` lists.
    Allowed,
    /// A name: the host must check the addresses it resolves to before connecting.
    CheckResolved,
}

/// The request extension marking a request whose URL the upstream chose (not a configured
/// host). A host that resolves names itself checks each resolved address against the policy.
#[derive(Debug, Clone)]
pub struct ChosenByUpstream(pub Arc<OutboundPolicy>);

/// The resolved `[outbound]` policy. Which configured origins a request trusts is decided
/// per request by its caller (the upstream it belongs to, a Helm entry's index and
/// `chart_hosts`), never from the whole configuration: a host configured for one purpose (a
/// gateway target, another upstream) is not a place every upstream may send pullgate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allow_nets: Vec<Cidr>,
    /// Lowercase names without a trailing dot; `*.x` is kept as `.x` (a suffix).
    allow_names: Vec<String>,
}

/// Lowercases a host and drops a trailing dot and IPv6 brackets.
fn norm(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl OutboundPolicy {
    /// Builds the policy from `[outbound] allow`.
    pub fn new(allow: &[String]) -> Result<OutboundPolicy, ConfigError> {
        let mut p = OutboundPolicy::default();
        for entry in allow {
            let e = entry.trim();
            if e.contains('/') || e.parse::<IpAddr>().is_ok() {
                let net = parse_cidr(e).ok_or_else(|| {
                    ConfigError(format!(
                        "[outbound] allow: {entry:?} is not a valid network"
                    ))
                })?;
                p.allow_nets.push(net);
            } else if let Some(suffix) = e.strip_prefix("*.") {
                p.allow_names.push(format!(".{}", norm(suffix)));
            } else if !e.is_empty()
                && e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                p.allow_names.push(norm(e));
            } else {
                return Err(ConfigError(format!(
                    "[outbound] allow: {entry:?} is neither a network (CIDR) nor a host name"
                )));
            }
        }
        Ok(p)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.allow_nets.iter().any(|n| n.contains(ip))
    }

    fn allows_name(&self, name: &str) -> bool {
        let name = norm(name);
        self.allow_names.iter().any(|a| {
            if a.starts_with('.') {
                name.ends_with(a.as_str())
            } else {
                *a == name
            }
        })
    }

    /// Decides whether `url`, chosen by the upstream for `purpose`, may be requested.
    pub fn check(&self, purpose: Purpose, url: &Url) -> Result<Verdict, Refused> {
        let refused = |class| Refused { purpose, class };
        match url.host() {
            None => Err(refused(AddressClass::Unspecified)),
            Some(Host::Domain(d)) => {
                if self.allows_name(d) {
                    return Ok(Verdict::Allowed);
                }
                match classify_name(d) {
                    Some(class) => Err(refused(class)),
                    None => Ok(Verdict::CheckResolved),
                }
            }
            Some(Host::Ipv4(v4)) => self.check_ip(purpose, IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => self.check_ip(purpose, IpAddr::V6(v6)),
        }
    }

    fn check_ip(&self, purpose: Purpose, ip: IpAddr) -> Result<Verdict, Refused> {
        if self.allows_ip(ip) {
            return Ok(Verdict::Allowed);
        }
        match classify_ip(ip) {
            Some(class) => Err(Refused { purpose, class }),
            None => Ok(Verdict::Allowed),
        }
    }

    /// Checks one address that `name` (an upstream-chosen host) resolved to, before a host
    /// connects to it: allowed when the name is allowed, when `[outbound] allow` holds the
    /// address, or when the address is in no refused class.
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), Refused> {
        if self.allows_name(name) || self.allows_ip(ip) {
            return Ok(());
        }
        match classify_ip(ip) {
            Some(class) => Err(Refused {
                purpose: Purpose::Resolved,
                class,
            }),
            None => Ok(()),
        }
    }
}

/// Resolves `[outbound]`.
pub fn resolve(cfg: &OutboundConfig) -> Result<Arc<OutboundPolicy>, ConfigError> {
    Ok(Arc::new(OutboundPolicy::new(&cfg.allow)?))
}

/// Are `a` and `b` on the same origin as far as dialling goes: the same host (case and a
/// trailing dot aside) and the same port, default ports normalised per scheme?
pub fn same_origin(a: &Url, b: &Url) -> bool {
    match (a.host_str(), b.host_str()) {
        (Some(x), Some(y)) => {
            norm(x) == norm(y) && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

/// The refused class of a name that is internal by definition, if any.
pub fn classify_name(name: &str) -> Option<AddressClass> {
    let n = norm(name);
    if n == "localhost" || n.ends_with(".localhost") {
        return Some(AddressClass::Loopback);
    }
    if matches!(
        n.as_str(),
        "metadata" | "metadata.google.internal" | "instance-data" | "instance-data.ec2.internal"
    ) {
        return Some(AddressClass::Metadata);
    }
    None
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let o = ip.octets();
    if matches!(o, [169, 254, 169, 254] | [100, 100, 100, 200]) {
        return Some(AddressClass::Metadata);
    }
    Some(match o {
        [127, ..] => AddressClass::Loopback,
        [0, ..] => AddressClass::Unspecified,
        [169, 254, ..] => AddressClass::LinkLocal,
        [10, ..] | [192, 168, ..] => AddressClass::Private,
        [172, b, ..] if (16..32).contains(&b) => AddressClass::Private,
        [100, b, ..] if (64..128).contains(&b) => AddressClass::CarrierGradeNat,
        [255, 255, 255, 255] => AddressClass::Broadcast,
        [a, ..] if (224..240).contains(&a) => AddressClass::Multicast,
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address carries (mapped `::ffff:a.b.c.d`, compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:AABB:CCDD::`), if any.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && u32::from(tail) > 1 {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let s = ip.segments();
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some(AddressClass::Metadata);
    }
    Some(if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] & 0xffc0 == 0xfec0 {
        AddressClass::Private
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddressClass::UniqueLocal
    } else if s[0] & 0xff00 == 0xff00 {
        AddressClass::Multicast
    } else {
        return None;
    })
}

/// The refused class of an address, if any.
pub fn classify_ip(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Checks `url` (chosen by the upstream for `purpose`) and marks the request with
/// [`ChosenByUpstream`], unless `trusted`: the caller found `url` on an origin the operator
/// configured for this very request (its upstream's own origin, one of its `auth_hosts` for a
/// realm, a Helm entry's index origin or `chart_hosts`). The one call the request builders
/// that follow upstream-chosen URLs make.
pub fn guard(
    policy: &Arc<OutboundPolicy>,
    purpose: Purpose,
    url: &Url,
    trusted: bool,
    builder: http::request::Builder,
) -> Result<http::request::Builder, UpstreamError> {
    if trusted {
        return Ok(builder);
    }
    match policy.check(purpose, url)? {
        Verdict::Configured => Ok(builder),
        Verdict::Allowed | Verdict::CheckResolved => {
            Ok(builder.extension(ChosenByUpstream(policy.clone())))
        }
    }
}

/// [`guard`] for a fetch that starts at `start` and follows redirects: the first hop is a
/// chart URL from an index (or the configured index URL itself), the others are redirects.
pub fn guard_hop(
    policy: &Arc<OutboundPolicy>,
    start: &Url,
    current: &Url,
    trusted: bool,
    builder: http::request::Builder,
) -> Result<http::request::Builder, UpstreamError> {
    let purpose = if current == start {
        Purpose::ChartUrl
    } else {
        Purpose::Redirect
    };
    guard(policy, purpose, current, trusted, builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> OutboundPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        OutboundPolicy::new(&allow).unwrap()
    }

    fn check(p: &OutboundPolicy, url: &str) -> Result<Verdict, AddressClass> {
        p.check(Purpose::Redirect, &Url::parse(url).unwrap())
            .map_err(|r| r.class)
    }

    #[test]
    fn address_classes_table() {
        use AddressClass::*;
        let table: &[(&str, Option<AddressClass>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.2", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("172.15.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(CarrierGradeNat)),
            ("100.127.255.254", Some(CarrierGradeNat)),
            ("100.128.0.1", None),
            ("fc00::1", Some(UniqueLocal)),
            ("fdff::1", Some(UniqueLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("169.254.169.254", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
            ("fd00:ec2::254", Some(Metadata)),
            // IPv6 forms carrying an IPv4 address.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(Metadata)),
            ("::127.0.0.1", Some(Loopback)),
            ("::10.1.2.3", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(Metadata)),
            ("2002:c0a8:0101::1", Some(Private)),
            ("::ffff:8.8.8.8", None),
            // Public.
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("2606:4700::1111", None),
            ("2001:db8::1", None),
        ];
        for (ip, want) in table {
            assert_eq!(classify_ip(ip.parse().unwrap()), *want, "classify_ip({ip})");
        }
    }

    #[test]
    fn names_that_are_internal_by_definition() {
        assert_eq!(classify_name("localhost"), Some(AddressClass::Loopback));
        assert_eq!(classify_name("LocalHost."), Some(AddressClass::Loopback));
        assert_eq!(classify_name("a.b.localhost"), Some(AddressClass::Loopback));
        assert_eq!(
            classify_name("metadata.google.internal"),
            Some(AddressClass::Metadata)
        );
        assert_eq!(classify_name("metadata"), Some(AddressClass::Metadata));
        assert_eq!(classify_name("notlocalhost.example"), None);
        assert_eq!(classify_name("cdn.example"), None);
    }

    #[test]
    fn urls_chosen_by_the_upstream_table() {
        let p = policy(&[]);
        use AddressClass::*;
        use Verdict::*;
        let table: &[(&str, Result<Verdict, AddressClass>)] = &[
            ("https://cdn.example/x", Ok(CheckResolved)),
            ("https://registry.example:8443/x", Ok(CheckResolved)),
            ("http://127.0.0.1:9999/x", Err(Loopback)),
            ("http://[::1]:9/x", Err(Loopback)),
            ("http://127.0.0.2/x", Err(Loopback)),
            ("http://localhost:5000/x", Err(Loopback)),
            ("http://x.localhost/", Err(Loopback)),
            ("http://169.254.169.254/latest/meta-data/", Err(Metadata)),
            ("http://metadata.google.internal/", Err(Metadata)),
            ("http://10.0.0.1/token", Err(Private)),
            ("http://[fd00:ec2::254]/", Err(Metadata)),
            ("http://[::ffff:7f00:2]/", Err(Loopback)),
            ("http://[fe80::1]/", Err(LinkLocal)),
            ("http://8.8.8.8/", Ok(Allowed)),
            // Other spellings of an IPv4 address are parsed as one by the URL parser.
            ("http://2130706434/", Err(Loopback)),
            ("http://0x7f.0.0.2/", Err(Loopback)),
            ("http://0177.0.0.2/", Err(Loopback)),
        ];
        for (url, want) in table {
            assert_eq!(check(&p, url), *want, "{url}");
        }
    }

    #[test]
    fn allow_lists_networks_and_names() {
        let p = policy(&[
            "127.0.0.0/8",
            "10.1.0.0/16",
            "fd00::/8",
            "registry.internal",
            "*.corp.internal",
        ]);
        assert_eq!(check(&p, "http://127.0.0.2/x"), Ok(Verdict::Allowed));
        assert_eq!(check(&p, "http://10.1.2.3/x"), Ok(Verdict::Allowed));
        assert_eq!(check(&p, "http://10.2.0.1/x"), Err(AddressClass::Private));
        assert_eq!(check(&p, "http://[fd00:ec2::254]/"), Ok(Verdict::Allowed));
        assert_eq!(
            check(&p, "http://registry.internal/x"),
            Ok(Verdict::Allowed)
        );
        assert_eq!(check(&p, "http://a.corp.internal/x"), Ok(Verdict::Allowed));
        assert_eq!(
            check(&p, "http://corp.internal/x"),
            Ok(Verdict::CheckResolved)
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Resolved addresses: an allowed name may resolve anywhere; others must not be
        // internal unless their network is allowed.
        assert!(p
            .check_resolved("registry.internal", ip("10.9.9.9"))
            .is_ok());
        assert!(p
            .check_resolved("x.corp.internal", ip("192.168.0.1"))
            .is_ok());
        assert!(p.check_resolved("cdn.example", ip("10.1.0.7")).is_ok());
        assert_eq!(
            p.check_resolved("cdn.example", ip("192.168.0.1"))
                .unwrap_err()
                .class,
            AddressClass::Private
        );
        assert!(p.check_resolved("cdn.example", ip("93.184.216.34")).is_ok());
    }

    #[test]
    fn bad_allow_entries_are_config_errors() {
        for bad in ["10.0.0.0/33", "not a host", "http://x", ""] {
            assert!(OutboundPolicy::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refusals_name_the_class_and_the_way_out_and_nothing_else() {
        let p = Arc::new(policy(&[]));
        let url = Url::parse("http://127.0.0.2:8080/v2/secret").unwrap();
        let e = guard(&p, Purpose::Redirect, &url, false, http::Request::builder()).unwrap_err();
        assert_eq!(
            e,
            UpstreamError::Refused(
                "upstream redirected to a refused address (loopback); allow it with [outbound] allow"
                    .into()
            )
        );
        // A name passes with the marker; a trusted (configured) origin passes without it.
        let p = Arc::new(policy(&[]));
        let b = guard(
            &p,
            Purpose::TokenRealm,
            &Url::parse("https://auth.example/t").unwrap(),
            false,
            http::Request::builder(),
        )
        .unwrap();
        let req = b.body(()).unwrap();
        assert!(req.extensions().get::<ChosenByUpstream>().is_some());
        let b = guard(
            &p,
            Purpose::TokenRealm,
            &Url::parse("https://up.example/t").unwrap(),
            true,
            http::Request::builder(),
        )
        .unwrap();
        assert!(b
            .body(())
            .unwrap()
            .extensions()
            .get::<ChosenByUpstream>()
            .is_none());
    }

    #[test]
    fn chart_fetches_word_the_first_hop_as_a_chart_url_and_later_ones_as_redirects() {
        let p = Arc::new(policy(&[]));
        let start = Url::parse("http://169.254.169.254/latest/x.tgz").unwrap();
        let e = guard_hop(&p, &start, &start, false, http::Request::builder()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "chart index points at a refused address (cloud metadata); allow it with [outbound] allow"
        );
        let start = Url::parse("http://charts.example/x.tgz").unwrap();
        assert!(guard_hop(&p, &start, &start, true, http::Request::builder()).is_ok());
        let next = Url::parse("http://10.0.0.9/x.tgz").unwrap();
        let e = guard_hop(&p, &start, &next, false, http::Request::builder()).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("upstream redirected to a refused address (private)"));
    }

    #[test]
    fn only_the_requests_own_origin_is_trusted() {
        let up = Url::parse("http://localhost:17000/v2/").unwrap();
        let same = |u: &str| same_origin(&up, &Url::parse(u).unwrap());
        assert!(same("http://localhost:17000/v2/x/blobs/y"));
        assert!(same("http://LOCALHOST.:17000/elsewhere"));
        // Another port of the same host, or another host, is not the same origin.
        assert!(!same("http://localhost:18084/a"));
        assert!(!same("http://127.0.0.1:17000/a"));
        let tls = Url::parse("https://registry.example/v2/").unwrap();
        assert!(same_origin(
            &tls,
            &Url::parse("https://registry.example:443/x").unwrap()
        ));
        assert!(!same_origin(
            &tls,
            &Url::parse("http://registry.example/x").unwrap()
        ));
    }

    #[test]
    fn outbound_allow_is_resolved_from_the_configuration() {
        struct NoSecrets;
        impl crate::core::config::SecretResolver for NoSecrets {
            fn resolve(&self, r: &str) -> Result<crate::core::config::Secret, ConfigError> {
                Err(ConfigError(format!("{r} unset")))
            }
        }
        let c = crate::core::config::parse_config(
            r#"
            builtin_upstreams = false
            [[upstream]]
            host = "reg.test"
            url = "http://10.0.0.5:5000"
            default = true
            [outbound]
            allow = ["192.168.0.0/16"]
            "#,
        )
        .unwrap();
        let s = c.resolve(&NoSecrets).unwrap();
        let p = &s.outbound;
        assert_eq!(check(p, "http://192.168.1.1/x"), Ok(Verdict::Allowed));
        // A configured upstream's host is no exemption for URLs other requests were sent to.
        assert_eq!(
            check(p, "http://10.0.0.5:5000/x"),
            Err(AddressClass::Private)
        );
        let bad =
            crate::core::config::parse_config("[outbound]\nallow = [\"10.0.0.0/40\"]").unwrap();
        let e = bad.resolve(&NoSecrets).unwrap_err().to_string();
        assert!(e.contains("[outbound] allow"), "{e}");
    }
}
