//! `ReqwestUpstream`: the upstream HTTP port over reqwest (rustls). Redirects are *not*
//! followed here (the core follows them without `Authorization`). A request times out if the
//! connection or the response headers take longer than the configured upstream timeout, or if
//! a body goes silent for that long.
//!
//! Requests whose URL the upstream chose (redirects, token realms, chart URLs — the core marks
//! them with [`ChosenByUpstream`] after checking literal addresses and well-known names) go
//! through a second client whose resolver ([`FilteringResolver`]) checks every address a name
//! resolves to against the outbound policy and hands reqwest only the allowed ones. The check
//! is on what is dialled, so a name pointing at an internal address, or re-pointed there
//! between a check and the connection (DNS rebinding), is refused. Its connections are pooled
//! apart from the operator-configured upstreams'.
//!
//! TLS trusts the system store (rustls-native-certs: `/etc/ssl/certs`, `SSL_CERT_FILE`,
//! `SSL_CERT_DIR`) and the bundled web roots. A request carrying a [`TrustedCa`] (the
//! `ca_file` of its `[[upstream]]`, `[[helm]]` or `[[target]]` entry) goes through a client that
//! also trusts that file's certificates: one client per distinct CA file (and per resolver), built
//! on first use or by [`ReqwestUpstream::load_cas`] at startup, so a bad file fails the start.
//!
//! # Limitations
//! - With `HTTP_PROXY`/`HTTPS_PROXY` set, the proxy resolves upstream-chosen names, not
//!   pullgate: the filtering resolver then sees only the proxy's own name, which must itself
//!   pass the policy (allow its network in `[outbound] allow` when it is internal).

use crate::core::config::Settings;
use crate::core::outbound::{ChosenByUpstream, OutboundPolicy, Refused};
use crate::core::ports::{BodyError, ByteStream, TrustedCa, Upstream, UpstreamError};
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The upstream port over reqwest.
pub struct ReqwestUpstream {
    client: reqwest::Client,
    /// For requests marked [`ChosenByUpstream`]: resolves through [`FilteringResolver`].
    chosen: reqwest::Client,
    /// The policy the filtering resolver applies (the one the marked requests carry).
    policy: Arc<RwLock<Arc<OutboundPolicy>>>,
    timeout: Duration,
    /// Clients that also trust a `ca_file`, by (file, filtering resolver or not).
    with_ca: Mutex<HashMap<(TrustedCa, bool), reqwest::Client>>,
}

/// The certificates of a `ca_file` (PEM, one or more); why not, naming the file.
pub fn load_ca(path: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {path}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca_file {path}: not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err(format!("ca_file {path}: holds no PEM certificate"));
    }
    Ok(certs)
}

/// Every distinct `ca_file` of the configuration: upstreams, Helm repositories, targets.
pub fn ca_files(settings: &Settings) -> Vec<TrustedCa> {
    let mut all: Vec<TrustedCa> = Vec::new();
    let found = settings
        .upstreams
        .iter()
        .filter_map(|u| u.ca.as_ref())
        .chain(settings.helm.iter().filter_map(|h| h.ca.as_ref()))
        .chain(
            settings
                .gateway
                .targets
                .iter()
                .filter_map(|t| t.ca.as_ref()),
        );
    for ca in found {
        if !all.contains(ca) {
            all.push(ca.clone());
        }
    }
    all
}

/// A resolver that drops every resolved address the outbound policy refuses, and fails when
/// none is left.
pub struct FilteringResolver {
    policy: Arc<RwLock<Arc<OutboundPolicy>>>,
}

/// A name resolved only to refused addresses.
#[derive(Debug)]
struct ResolveRefused(Refused);

impl std::fmt::Display for ResolveRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ResolveRefused {}

fn read_policy(slot: &RwLock<Arc<OutboundPolicy>>) -> Arc<OutboundPolicy> {
    match slot.read() {
        Ok(p) => p.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

impl FilteringResolver {
    /// Keeps the addresses of `addrs` that `policy` allows for `name`; the refusal of the last
    /// refused address when none is left.
    fn filter(
        policy: &OutboundPolicy,
        name: &str,
        addrs: impl Iterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        let mut allowed = Vec::new();
        let mut refused = None;
        for a in addrs {
            match policy.check_resolved(name, a.ip()) {
                Ok(()) => allowed.push(a),
                Err(r) => refused = Some(r),
            }
        }
        match (allowed.is_empty(), refused) {
            (true, Some(r)) => Err(r),
            _ => Ok(allowed),
        }
    }
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = read_policy(&self.policy);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed = FilteringResolver::filter(&policy, &host, addrs).map_err(
                |r| -> Box<dyn std::error::Error + Send + Sync> { Box::new(ResolveRefused(r)) },
            )?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl ReqwestUpstream {
    /// A client with the given timeout.
    pub fn new(timeout: Duration) -> Result<ReqwestUpstream, String> {
        let policy = Arc::new(RwLock::new(Arc::new(OutboundPolicy::default())));
        Ok(ReqwestUpstream {
            client: Self::build(timeout, None, &[])?,
            chosen: Self::build(timeout, Some(&policy), &[])?,
            policy,
            timeout,
            with_ca: Mutex::new(HashMap::new()),
        })
    }

    /// A reqwest client: the filtering resolver when `policy` is given, and `extra` roots.
    fn build(
        timeout: Duration,
        policy: Option<&Arc<RwLock<Arc<OutboundPolicy>>>>,
        extra: &[reqwest::Certificate],
    ) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(policy) = policy {
            b = b.dns_resolver(Arc::new(FilteringResolver {
                policy: policy.clone(),
            }));
        }
        for cert in extra {
            b = b.add_root_certificate(cert.clone());
        }
        b.build()
            .map_err(|e| format!("building the HTTP client: {e}"))
    }

    /// Reads every `ca_file` now and builds its clients, so a missing or malformed file stops
    /// the start instead of failing pulls later.
    pub fn load_cas(&self, cas: &[TrustedCa]) -> Result<(), String> {
        for ca in cas {
            self.ca_client(ca, false)?;
            self.ca_client(ca, true)?;
        }
        Ok(())
    }

    /// The client trusting `ca` too (with the filtering resolver when `chosen`), built once.
    fn ca_client(&self, ca: &TrustedCa, chosen: bool) -> Result<reqwest::Client, String> {
        let key = (ca.clone(), chosen);
        let mut clients = match self.with_ca.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let certs = load_ca(&ca.0)?;
        let policy = chosen.then_some(&self.policy);
        let client = Self::build(self.timeout, policy, &certs)?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The client for a request: the filtering one, with the marker's policy in force, when
    /// the upstream chose the URL; one that also trusts the request's `ca_file` when it has one.
    fn client_for(
        &self,
        marker: Option<&ChosenByUpstream>,
        ca: Option<&TrustedCa>,
    ) -> Result<reqwest::Client, UpstreamError> {
        if let Some(ChosenByUpstream(wanted)) = marker {
            if !Arc::ptr_eq(&read_policy(&self.policy), wanted) {
                match self.policy.write() {
                    Ok(mut p) => *p = wanted.clone(),
                    Err(poisoned) => *poisoned.into_inner() = wanted.clone(),
                }
            }
        }
        match (ca, marker.is_some()) {
            (Some(ca), chosen) => self.ca_client(ca, chosen).map_err(UpstreamError::Connect),
            (None, true) => Ok(self.chosen.clone()),
            (None, false) => Ok(self.client.clone()),
        }
    }
}

fn classify(e: reqwest::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<ResolveRefused>() {
            return UpstreamError::Refused(r.to_string());
        }
        source = s.source();
    }
    // reqwest's messages carry the URL, which holds no secret (tokens travel in headers).
    let (timeout, connect) = (e.is_timeout(), e.is_connect());
    // The causes say what failed (a refused connection, an unknown certificate issuer).
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    if timeout {
        UpstreamError::Timeout(msg)
    } else if connect {
        UpstreamError::Connect(msg)
    } else {
        UpstreamError::Other(msg)
    }
}

#[async_trait::async_trait(?Send)]
impl Upstream for ReqwestUpstream {
    async fn send(
        &self,
        request: Request<bytes::Bytes>,
    ) -> Result<Response<ByteStream>, UpstreamError> {
        let (parts, body) = request.into_parts();
        let url = parts.uri.to_string();
        let client = self.client_for(
            parts.extensions.get::<ChosenByUpstream>(),
            parts.extensions.get::<TrustedCa>(),
        )?;
        let mut req = client.request(parts.method, url).headers(parts.headers);
        if !body.is_empty() {
            req = req.body(body);
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| UpstreamError::Timeout("no response headers in time".into()))?
            .map_err(classify)?;
        let mut out = Response::builder().status(resp.status());
        if let Some(h) = out.headers_mut() {
            *h = resp.headers().clone();
        }
        let body: ByteStream = resp
            .bytes_stream()
            .map_err(|e| BodyError(e.without_url().to_string()))
            .boxed_local();
        out.body(body)
            .map_err(|e| UpstreamError::Other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::io::{Read, Write};

    fn policy(allow: &[&str]) -> Arc<OutboundPolicy> {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        Arc::new(OutboundPolicy::new(&allow).unwrap())
    }

    #[test]
    fn resolved_addresses_are_filtered_by_the_policy() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let p = policy(&[]);
        let mixed = [addr("10.0.0.1:0"), addr("93.184.216.34:0")];
        assert_eq!(
            FilteringResolver::filter(&p, "cdn.example", mixed.into_iter()).unwrap(),
            vec![addr("93.184.216.34:0")]
        );
        let internal = [addr("127.0.0.1:0"), addr("[::1]:0")];
        let r = FilteringResolver::filter(&p, "rebind.example", internal.into_iter()).unwrap_err();
        assert_eq!(r.class.to_string(), "loopback");
        let p = policy(&["rebind.example"]);
        assert_eq!(
            FilteringResolver::filter(&p, "rebind.example", internal.into_iter())
                .unwrap()
                .len(),
            2
        );
    }

    /// A one-shot HTTP server on 127.0.0.1 answering 200 "ok"; how many requests it got.
    fn serve_once() -> (u16, std::thread::JoinHandle<usize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return 0;
            };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                return 0;
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
            1
        });
        (port, handle)
    }

    async fn get(
        up: &ReqwestUpstream,
        url: &str,
        marker: Option<Arc<OutboundPolicy>>,
    ) -> Result<u16, UpstreamError> {
        let mut b = Request::builder().uri(url);
        if let Some(p) = marker {
            b = b.extension(ChosenByUpstream(p));
        }
        let resp = up.send(b.body(Bytes::new()).unwrap()).await?;
        Ok(resp.status().as_u16())
    }

    /// `localhost` resolves to loopback here: an upstream-chosen request to it is refused by
    /// the resolver before any connection, while an unmarked (configured) one goes through,
    /// and an allow entry lets the marked one through too.
    #[test]
    fn a_name_resolving_to_loopback_is_refused_only_when_the_upstream_chose_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = ReqwestUpstream::new(Duration::from_secs(20)).unwrap();
            let (port, server) = serve_once();
            let url = format!("http://localhost:{port}/x");
            let e = get(&up, &url, Some(policy(&[]))).await.unwrap_err();
            assert!(
                matches!(&e, UpstreamError::Refused(m) if m.contains("loopback") && !m.contains("127.0.0.1")),
                "{e:?}"
            );
            assert_eq!(get(&up, &url, None).await.unwrap(), 200);
            assert_eq!(server.join().unwrap(), 1);

            let (port, server) = serve_once();
            let url = format!("http://localhost:{port}/x");
            assert_eq!(
                get(&up, &url, Some(policy(&["127.0.0.0/8", "::1"]))).await.unwrap(),
                200
            );
            assert_eq!(server.join().unwrap(), 1);
        });
    }
}
