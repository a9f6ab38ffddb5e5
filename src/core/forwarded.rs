//! The client's address behind trusted proxies: `trusted_proxies` and `forwarded_header` from
//! the configuration, and the one rule every host applies to a request's `X-Forwarded-For` or
//! `Forwarded` (RFC 7239 §5.2, `for=`) header. Pure: the host passes the address it can vouch
//! for (the socket's peer, or what a trusted PROXY protocol header said) and the headers.
//!
//! The rule: the header is read only when that address is a trusted proxy. Its hops are then
//! walked from the right (the hop the nearest proxy appended) past every address that is itself
//! a trusted proxy; the first one that is not is the client. Everything left of it was written
//! by the client or by proxies nobody vouched for, and is ignored. A hop that is not an address
//! (`unknown`, an obfuscated `_name`, garbage) ends the walk: the last trusted hop (the peer
//! itself when it is the first) is the client, because nothing further left can be believed.
//!
//! Only one header is read, the one the proxies write ([`ForwardedHeader`]): a proxy appends
//! to its own header and passes the other through untouched, so a client could otherwise put
//! any address in the other one.

use crate::core::cidr::{parse_cidr, Cidr};
use http::HeaderMap;
use std::net::{IpAddr, SocketAddr};

/// Which header trusted proxies write the client's address into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, Envoy, Traefik, cloud load
    /// balancers). The default.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

/// `trusted_proxies` and `forwarded_header`, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// Peers whose forwarding headers (and PROXY protocol headers) are believed.
    pub nets: Vec<Cidr>,
    /// The header they write.
    pub header: ForwardedHeader,
}

/// Parses the configuration values; an error names the entry at fault.
pub fn parse_trusted_proxies(
    nets: &[String],
    header: Option<&str>,
) -> Result<TrustedProxies, String> {
    let nets = nets
        .iter()
        .map(|n| {
            parse_cidr(n).ok_or_else(|| format!("trusted_proxies: {n:?} is not an address or CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let header = match header.map(str::to_ascii_lowercase).as_deref() {
        None | Some("x-forwarded-for") => ForwardedHeader::XForwardedFor,
        Some("forwarded") => ForwardedHeader::Forwarded,
        Some(other) => {
            return Err(format!(
                "forwarded_header {other:?}: expected \"x-forwarded-for\" or \"forwarded\""
            ))
        }
    };
    Ok(TrustedProxies { nets, header })
}

impl TrustedProxies {
    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request that reached the host from `peer`.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let name = match self.header {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        };
        // Several header lines form one list, in order (RFC 9110 §5.3).
        let mut hops: Vec<Option<IpAddr>> = Vec::new();
        for value in headers.get_all(name) {
            let Ok(value) = value.to_str() else {
                hops.push(None);
                continue;
            };
            match self.header {
                ForwardedHeader::XForwardedFor => {
                    hops.extend(value.split(',').map(|h| parse_node(h.trim())))
                }
                ForwardedHeader::Forwarded => hops.extend(forwarded_for(value)),
            }
        }
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(*ip) => client = *ip,
                Some(ip) => return *ip,
                None => return client,
            }
        }
        client
    }
}

/// The `for=` node of each element of one `Forwarded` value (`None` for an element without
/// one, or whose node is not an address).
fn forwarded_for(value: &str) -> Vec<Option<IpAddr>> {
    split_outside_quotes(value, ',')
        .into_iter()
        .filter(|element| !element.trim().is_empty())
        .map(|element| {
            split_outside_quotes(element, ';')
                .into_iter()
                .find_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| unquote(value.trim()))
                })
                .and_then(|node| parse_node(&node))
        })
        .collect()
}

/// Splits at `sep` where it is not inside a quoted string.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token or a quoted string's content (RFC 9110 §5.6.4).
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if !escaped && c == '\\' {
                    escaped = true;
                } else {
                    out.push(c);
                    escaped = false;
                }
            }
            out
        }
        None => v.to_string(),
    }
}

/// A node: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = node.strip_prefix('[')?;
    let (ip, rest) = inner.split_once(']')?;
    let port_ok = rest.is_empty()
        || rest.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
    port_ok.then(|| ip.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn xff(trusted: &[&str]) -> TrustedProxies {
        let nets: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
        parse_trusted_proxies(&nets, None).unwrap()
    }

    #[test]
    fn x_forwarded_for_takes_the_rightmost_untrusted_hop() {
        let t = xff(&["10.0.0.0/8", "127.0.0.1"]);
        let peer = ip("127.0.0.1");
        let table: &[(&[&str], &str)] = &[
            (&[], "127.0.0.1"),
            (&["203.0.113.7"], "203.0.113.7"),
            // The client wrote the left part; the proxy appended the real address.
            (&["198.51.100.2, 203.0.113.7"], "203.0.113.7"),
            // Trusted hops on the right are skipped.
            (&["203.0.113.7, 10.1.1.1, 10.2.2.2"], "203.0.113.7"),
            // Several lines form one list.
            (&["198.51.100.2", "203.0.113.7, 10.1.1.1"], "203.0.113.7"),
            // Every hop trusted: the leftmost.
            (&["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
            // Ports and brackets.
            (&["203.0.113.7:5555"], "203.0.113.7"),
            (&["[2001:db8::7]:80"], "2001:db8::7"),
            (&["2001:db8::7"], "2001:db8::7"),
            // A hop that is not an address stops the walk at the last trusted one.
            (&["203.0.113.7, unknown"], "127.0.0.1"),
            (&["203.0.113.7, garbage, 10.1.1.1"], "10.1.1.1"),
        ];
        for (values, want) in table {
            let got = t.client_addr(peer, &headers("x-forwarded-for", values));
            assert_eq!(got, ip(want), "{values:?}");
        }
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let t = xff(&["127.0.0.1"]);
        let h = headers("x-forwarded-for", &["203.0.113.7"]);
        assert_eq!(t.client_addr(ip("127.0.0.2"), &h), ip("127.0.0.2"));
        assert_eq!(xff(&[]).client_addr(ip("127.0.0.1"), &h), ip("127.0.0.1"));
        // IPv4-mapped peers match IPv4 networks.
        assert_eq!(t.client_addr(ip("::ffff:127.0.0.1"), &h), ip("203.0.113.7"));
    }

    #[test]
    fn only_the_configured_header_is_read() {
        let t = xff(&["127.0.0.1"]);
        let forged = headers("forwarded", &["for=198.51.100.2"]);
        assert_eq!(t.client_addr(ip("127.0.0.1"), &forged), ip("127.0.0.1"));
        let f = parse_trusted_proxies(&["127.0.0.1".into()], Some("Forwarded")).unwrap();
        let forged = headers("x-forwarded-for", &["198.51.100.2"]);
        assert_eq!(f.client_addr(ip("127.0.0.1"), &forged), ip("127.0.0.1"));
    }

    #[test]
    fn forwarded_for_nodes_are_parsed_per_rfc_7239() {
        let t = parse_trusted_proxies(
            &["127.0.0.1".into(), "10.0.0.0/8".into()],
            Some("forwarded"),
        )
        .unwrap();
        let peer = ip("127.0.0.1");
        let table: &[(&[&str], &str)] = &[
            (&["for=203.0.113.7"], "203.0.113.7"),
            (&["For=\"203.0.113.7:4711\";proto=https"], "203.0.113.7"),
            (&["for=\"[2001:db8:cafe::17]:4711\""], "2001:db8:cafe::17"),
            (
                &["for=\"[2001:db8:cafe::17]\", for=10.0.0.9"],
                "2001:db8:cafe::17",
            ),
            (
                &["for=198.51.100.2, for=203.0.113.7;by=10.0.0.1"],
                "203.0.113.7",
            ),
            (&["for=198.51.100.2", "for=203.0.113.7"], "203.0.113.7"),
            (&["proto=https;for=203.0.113.7;host=\"a,b\""], "203.0.113.7"),
            (&["for=203.0.113.7, for=unknown"], "127.0.0.1"),
            (&["for=203.0.113.7, for=_hidden, for=10.0.0.3"], "10.0.0.3"),
            (&["for=203.0.113.7, proto=https"], "127.0.0.1"),
        ];
        for (values, want) in table {
            let got = t.client_addr(peer, &headers("forwarded", values));
            assert_eq!(got, ip(want), "{values:?}");
        }
    }

    #[test]
    fn configuration_errors_name_the_value() {
        let e = parse_trusted_proxies(&["10.0.0.0/8".into(), "nope".into()], None).unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        let e = parse_trusted_proxies(&[], Some("x-real-ip")).unwrap_err();
        assert!(e.contains("x-real-ip"), "{e}");
        assert_eq!(
            parse_trusted_proxies(&[], None).unwrap(),
            TrustedProxies::default()
        );
    }
}
