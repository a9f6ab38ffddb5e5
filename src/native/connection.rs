//! One accepted connection on a worker, from the socket to hyper: the optional PROXY protocol
//! header ([`proxy_protocol`](super::proxy_protocol)), the optional TLS handshake
//! ([`tls`](super::tls)) with HTTP/2 or HTTP/1.1 as ALPN chose, then the connection served
//! until it ends, overstays a timeout ([`listener::watchdog`]) or the worker drains.
//!
//! A plain listener without the PROXY protocol keeps the direct path: the socket straight into
//! hyper's HTTP/1.1 server. The handshake and the header read run here, in the connection's
//! own task on the worker that got it, never in the accept loop; both count against the
//! connection's `header_timeout` (its first request head is due within it of the accept).

use crate::core::forwarded::TrustedProxies;
use crate::native::listener::{self, ConnState, ServerLimits, WatchedIo};
use crate::native::{proxy_protocol, ConnContext};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How connections are received: set once per process.
#[derive(Clone)]
pub struct Front {
    /// TLS, when `[tls]` is set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// `[server] proxy_protocol`.
    pub proxy_protocol: bool,
    /// `trusted_proxies`: whose PROXY header is believed.
    pub trusted: TrustedProxies,
}

/// Runs hyper's HTTP/2 tasks on the worker's `LocalSet` (the core's futures are `!Send`).
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Serves `stream` from `peer`; `cx` makes the requests' shared context once the client's
/// address is known. Returns when the connection is done.
pub(crate) async fn serve(
    front: Rc<Front>,
    stream: TcpStream,
    peer: IpAddr,
    state: Rc<ConnState>,
    limits: ServerLimits,
    watcher: Watcher,
    cx: impl FnOnce(IpAddr) -> ConnContext,
) {
    let io = WatchedIo::new(stream, state.clone());
    let work = async move {
        if !front.proxy_protocol && front.tls.is_none() {
            let _ = http1(io, cx(peer), watcher).await;
            return;
        }
        let (io, addr) = if front.proxy_protocol {
            let trusted = front.trusted.is_trusted(peer);
            match proxy_protocol::read_header(io, peer, trusted).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::info!(peer = %peer, "connection closed: {e}");
                    return;
                }
            }
        } else {
            (proxy_protocol::Rewind::new(io, Vec::new()), peer)
        };
        let cx = cx(addr);
        let Some(acceptor) = front.tls.clone() else {
            let _ = http1(io, cx, watcher).await;
            return;
        };
        let tls = match acceptor.accept(io).await {
            Ok(tls) => tls,
            Err(e) => {
                tracing::info!("tls: handshake with {addr} failed: {e}");
                return;
            }
        };
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
        builder = match alpn.as_deref() {
            Some(b"h2") => builder.http2_only(),
            Some(_) => builder.http1_only(),
            // No ALPN: HTTP/2 with prior knowledge, or HTTP/1.1, by the first bytes.
            None => builder,
        };
        // One reference count per request (the context's own Arcs are shared across threads).
        let cx = Rc::new(cx);
        let service = hyper::service::service_fn(move |req| crate::native::handle(cx.clone(), req));
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        let _ = watcher.watch(conn.into_owned()).await;
    };
    // Dropping the connection closes it: when it has overstayed a timeout.
    tokio::select! {
        _ = work => {}
        _ = listener::watchdog(state, limits) => {}
    }
}

/// HTTP/1.1 on `io`.
async fn http1<I>(io: I, cx: ConnContext, watcher: Watcher) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    // One reference count per request (the context's own Arcs are shared across threads).
    let cx = Rc::new(cx);
    let service = hyper::service::service_fn(move |req| crate::native::handle(cx.clone(), req));
    let http =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    watcher.watch(http).await
}
