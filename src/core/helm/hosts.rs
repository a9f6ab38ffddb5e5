//! Which hosts a chart URL from an index may point at. Pure.
//!
//! An index is upstream content: whoever publishes it chooses the chart URLs pullgate then
//! fetches. Those URLs must stay on the index's own origin (host and port of the `[[helm]]`
//! `url`), or on a host the operator listed in that entry's `chart_hosts` (for repositories
//! whose files live elsewhere, such as chart-releaser indexes on GitHub Pages pointing at
//! `github.com` release downloads). Anything else is refused before a request is made.
//!
//! Host and port are compared, not the scheme: `cdn.example.com` allows that host on the
//! default port of the chart URL's scheme (80 for http, 443 for https); `cdn.example.com:8443`
//! allows exactly that port. Host names compare as the URL standard normalises them
//! (lower case, IDNA); IP literals compare as addresses (`[::1]` for IPv6).
//!
//! Redirects the allowed host answers with are followed (GitHub release downloads redirect to
//! a storage host); where they may lead is the outbound address policy's concern, applied in
//! the fetch itself.

use url::{Host, Url};

/// One `chart_hosts` entry: a host, and a port or none (the scheme's default port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartHost {
    /// The host, normalised.
    pub host: Host<String>,
    /// An explicit port; None means the default port of the chart URL's scheme.
    pub port: Option<u16>,
}

/// Parses a `chart_hosts` entry: `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn parse_chart_host(s: &str) -> Result<ChartHost, String> {
    let bad = |why: &str| format!("chart_hosts entry {s:?}: {why}");
    if s.contains(['/', '@', '?', '#']) || s.contains(char::is_whitespace) {
        return Err(bad("write a host or host:port, not a URL"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (format!("[{v6}]"), port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("no host"));
    }
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| bad("the port must be 0-65535"))
        })
        .transpose()?;
    let host = Host::parse(&host).map_err(|e| bad(&e.to_string()))?;
    Ok(ChartHost { host, port })
}

/// Whether `url` (a chart URL from the index of the repository at `base`) is on the index's
/// origin or on one of `allowed`.
pub fn is_allowed_chart_url(base: &Url, allowed: &[ChartHost], url: &Url) -> bool {
    let Some(host) = url.host().map(|h| h.to_owned()) else {
        return false;
    };
    if base.host().map(|h| h.to_owned()).as_ref() == Some(&host)
        && base.port_or_known_default() == url.port_or_known_default()
    {
        return true;
    }
    allowed.iter().any(|a| {
        a.host == host
            && match a.port {
                Some(p) => url.port_or_known_default() == Some(p),
                None => url.port().is_none(),
            }
    })
}

/// `host[:port]` of `url`, for error messages (no path or query: those may carry signed
/// tokens).
pub fn host_port(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => "(no host)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &[&str]) -> Vec<ChartHost> {
        list.iter().map(|h| parse_chart_host(h).unwrap()).collect()
    }

    #[test]
    fn chart_hosts_entries_parse_or_are_refused() {
        assert_eq!(
            parse_chart_host("CDN.Example.com").unwrap(),
            ChartHost {
                host: Host::Domain("cdn.example.com".into()),
                port: None
            }
        );
        assert_eq!(
            parse_chart_host("cdn.example:8443").unwrap().port,
            Some(8443)
        );
        assert_eq!(
            parse_chart_host("[::1]:9").unwrap(),
            ChartHost {
                host: Host::Ipv6(std::net::Ipv6Addr::LOCALHOST),
                port: Some(9)
            }
        );
        assert!(matches!(
            parse_chart_host("10.0.0.1").unwrap().host,
            Host::Ipv4(_)
        ));
        for bad in [
            "",
            "https://cdn.example",
            "cdn.example/path",
            "cdn.example:",
            "cdn.example:99999",
            "::1",
            "[::1",
            "[::1]x",
            "user@cdn.example",
            "a b",
        ] {
            assert!(parse_chart_host(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn chart_urls_stay_on_the_index_origin_or_listed_hosts() {
        let base = Url::parse("https://charts.example/stable/").unwrap();
        let listed = hosts(&["cdn.example", "files.example:8443", "[::1]:9000"]);
        let cases = [
            ("https://charts.example/stable/a-1.tgz", true),
            ("https://charts.example:443/other/a-1.tgz", true),
            ("https://CHARTS.example/a-1.tgz", true),
            ("http://charts.example/a-1.tgz", false), // port 80, not the index's 443
            ("https://charts.example:8443/a-1.tgz", false),
            ("https://cdn.example/a-1.tgz", true),
            ("http://cdn.example/a-1.tgz", true),
            ("https://cdn.example:444/a-1.tgz", false),
            ("https://files.example:8443/a-1.tgz", true),
            ("https://files.example/a-1.tgz", false),
            ("http://[::1]:9000/a-1.tgz", true),
            ("http://127.0.0.1:9000/a-1.tgz", false),
            ("https://evil.example/a-1.tgz", false),
            ("https://sub.cdn.example/a-1.tgz", false),
            ("https://cdn.example.evil/a-1.tgz", false),
        ];
        for (url, want) in cases {
            let u = Url::parse(url).unwrap();
            assert_eq!(is_allowed_chart_url(&base, &listed, &u), want, "{url}");
        }
        let plain = Url::parse("http://127.0.0.1:8080/").unwrap();
        assert!(is_allowed_chart_url(
            &plain,
            &[],
            &Url::parse("http://127.0.0.1:8080/x/a.tgz").unwrap()
        ));
        assert!(!is_allowed_chart_url(
            &plain,
            &[],
            &Url::parse("http://127.0.0.1:8081/a.tgz").unwrap()
        ));
    }

    #[test]
    fn error_text_names_only_host_and_port() {
        let u = Url::parse("https://cdn.example:8443/a.tgz?sig=secret").unwrap();
        assert_eq!(host_port(&u), "cdn.example:8443");
        assert_eq!(
            host_port(&Url::parse("https://cdn.example/a.tgz").unwrap()),
            "cdn.example"
        );
    }
}
