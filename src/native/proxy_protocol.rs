//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) on the native listener, with
//! `[server] proxy_protocol = true`: a load balancer in front that passes TCP through puts the
//! client's address in a header before the connection's first byte.
//!
//! The header is believed only from `trusted_proxies`. From them it is optional (a health
//! check may connect without one); from any other peer a connection that starts with one is
//! closed, since anyone could write it. A `LOCAL` (v2) or `UNKNOWN` (v1) header, sent by the
//! proxy for its own checks, leaves the peer's address. Whatever follows the header (a TLS
//! ClientHello, a request) is handed on untouched through [`Rewind`].
//!
//! [`parse`] is pure and decides from a prefix of the stream; [`read_header`] does the IO.
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The v1 signature.
const V1: &[u8] = b"PROXY ";
/// The v2 signature.
const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most this long, CRLF included.
const V1_MAX: usize = 107;
/// The longest v2 header accepted (addresses and TLVs): far beyond what proxies send.
const V2_MAX: usize = 16 + 4096;

/// What a prefix of a connection's bytes says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes to decide.
    Incomplete,
    /// The connection does not start with a PROXY header.
    NotProxy,
    /// A header of `len` bytes naming the client (`None`: the proxy speaks for itself).
    Header { len: usize, client: Option<IpAddr> },
    /// A PROXY signature followed by something malformed.
    Invalid(String),
}

/// Decides from the first bytes of a connection.
pub fn parse(buf: &[u8]) -> Parsed {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    match (starts(V1), starts(V2)) {
        (false, false) => Parsed::NotProxy,
        (true, _) if buf.len() >= V1.len() => parse_v1(buf),
        (_, true) if buf.len() >= V2.len() => parse_v2(buf),
        _ => Parsed::Incomplete,
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("a v1 header without CRLF within 107 bytes".into())
        } else {
            Parsed::Incomplete
        };
    };
    if end + 2 > V1_MAX {
        return Parsed::Invalid("a v1 header longer than 107 bytes".into());
    }
    let Ok(line) = std::str::from_utf8(&buf[V1.len()..end]) else {
        return Parsed::Invalid("a v1 header that is not ASCII".into());
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match fields.as_slice() {
        ["UNKNOWN", ..] => Parsed::Header { len, client: None },
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let addr = |s: &str| match s.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => Some(ip),
                _ => None,
            };
            let port = |s: &str| s.parse::<u16>().is_ok();
            match (addr(src), addr(dst), port(sport), port(dport)) {
                (Some(src), Some(_), true, true) => Parsed::Header {
                    len,
                    client: Some(src),
                },
                _ => Parsed::Invalid(format!("a malformed v1 header {line:?}")),
            }
        }
        _ => Parsed::Invalid(format!("a malformed v1 header {line:?}")),
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 {
        return Parsed::Invalid(format!("a v2 header of version {version}"));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + body;
    if len > V2_MAX {
        return Parsed::Invalid(format!("a v2 header of {len} bytes"));
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let addresses = &buf[16..len];
    match command {
        // LOCAL: the proxy's own connection (a health check).
        0x0 => Parsed::Header { len, client: None },
        0x1 => match buf[13] >> 4 {
            // AF_UNSPEC: no address to believe.
            0x0 => Parsed::Header { len, client: None },
            0x1 if addresses.len() >= 12 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(&addresses[..4]);
                Parsed::Header {
                    len,
                    client: Some(IpAddr::V4(Ipv4Addr::from(a))),
                }
            }
            0x2 if addresses.len() >= 36 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&addresses[..16]);
                Parsed::Header {
                    len,
                    client: Some(IpAddr::V6(Ipv6Addr::from(a))),
                }
            }
            // AF_UNIX: not an IP client.
            0x3 => Parsed::Header { len, client: None },
            _ => Parsed::Invalid("a v2 header with a short or unknown address block".into()),
        },
        other => Parsed::Invalid(format!("a v2 header with command {other}")),
    }
}

/// Reads a PROXY header, if the connection starts with one, and returns the stream (the bytes
/// read past the header put back) with the client's address: the header's from a trusted
/// peer, else `peer`. An error (a header from an untrusted peer, a malformed one, a peer that
/// closed first) means: close the connection.
pub async fn read_header<S: AsyncRead + Unpin>(
    mut io: S,
    peer: IpAddr,
    trusted: bool,
) -> Result<(Rewind<S>, IpAddr), String> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 512];
    loop {
        match parse(&buf) {
            Parsed::NotProxy => return Ok((Rewind::new(io, buf), peer)),
            Parsed::Incomplete => {}
            // A signature from a peer nobody vouched for.
            _ if !trusted => {
                return Err(format!(
                    "a PROXY protocol header from untrusted peer {peer}"
                ))
            }
            Parsed::Header { len, client } => {
                let rest = buf.split_off(len);
                return Ok((Rewind::new(io, rest), client.unwrap_or(peer)));
            }
            Parsed::Invalid(e) => return Err(format!("PROXY protocol from {peer}: {e}")),
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading from {peer}: {e}"))?;
        if n == 0 {
            return Err(format!("{peer} closed before a request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream that first yields bytes already read from it.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, preceded by `prefix`.
    pub fn new(inner: S, prefix: Vec<u8>) -> Rewind<S> {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 5000\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Parsed::Header {
                len: 45,
                client: Some(ip("203.0.113.7"))
            }
        );
        let h6 = b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n";
        assert_eq!(
            parse(h6),
            Parsed::Header {
                len: h6.len(),
                client: Some(ip("2001:db8::7"))
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                client: None
            }
        );
        for prefix in [&b""[..], b"P", b"PROX", b"PROXY TCP4 1.2.3.4"] {
            assert_eq!(parse(prefix), Parsed::Incomplete, "{prefix:?}");
        }
        for bad in [
            &b"PROXY TCP4 2001:db8::7 127.0.0.1 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY HTTP\r\n",
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{bad:?}");
        }
        assert!(matches!(parse(&[b'X'; 200]), Parsed::NotProxy));
        let mut long = b"PROXY ".to_vec();
        long.extend_from_slice(&[b'1'; 120]);
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_headers() {
        let mut a4 = vec![203, 0, 113, 7, 127, 0, 0, 1];
        a4.extend_from_slice(&[0xc7, 0x38, 0x13, 0x88]);
        let h = v2(1, 0x11, &a4);
        assert_eq!(
            parse(&h),
            Parsed::Header {
                len: 28,
                client: Some(ip("203.0.113.7"))
            }
        );
        assert_eq!(parse(&h[..20]), Parsed::Incomplete);
        let mut a6 = ip_bytes("2001:db8::7");
        a6.extend_from_slice(&ip_bytes("::1"));
        a6.extend_from_slice(&[0, 1, 0, 2]);
        // With a TLV after the addresses.
        a6.extend_from_slice(&[0x04, 0, 1, 0]);
        let h = v2(1, 0x21, &a6);
        assert_eq!(
            parse(&h),
            Parsed::Header {
                len: h.len(),
                client: Some(ip("2001:db8::7"))
            }
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[])),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
        assert!(matches!(parse(&v2(1, 0x11, &[1, 2])), Parsed::Invalid(_)));
        assert!(matches!(parse(&v2(5, 0x11, &a4)), Parsed::Invalid(_)));
        let mut v3 = v2(1, 0x11, &a4);
        v3[12] = 0x31;
        assert!(matches!(parse(&v3), Parsed::Invalid(_)));
        // TLS and HTTP/2's preface are not headers.
        assert_eq!(parse(&[0x16, 3, 1]), Parsed::NotProxy);
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Parsed::NotProxy);
        assert_eq!(parse(b"\r\n\r\nGET"), Parsed::NotProxy);
    }

    fn ip_bytes(s: &str) -> Vec<u8> {
        match ip(s) {
            IpAddr::V6(v6) => v6.octets().to_vec(),
            IpAddr::V4(v4) => v4.octets().to_vec(),
        }
    }

    async fn read_all(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_header_is_taken_and_the_rest_handed_on() {
        let peer = ip("127.0.0.1");
        let stream: &[u8] = b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n";
        let (rest, client) = read_header(stream, peer, true).await.unwrap();
        assert_eq!(client, ip("203.0.113.7"));
        assert_eq!(read_all(rest).await, b"GET / HTTP/1.1\r\n\r\n");
        // No header: everything is handed on, from a trusted peer or not.
        for trusted in [true, false] {
            let plain: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
            let (rest, client) = read_header(plain, peer, trusted).await.unwrap();
            assert_eq!(client, peer);
            assert_eq!(read_all(rest).await, plain);
        }
        // From an untrusted peer a header closes the connection.
        let e = read_header(stream, peer, false).await.err().unwrap();
        assert!(e.contains("untrusted"), "{e}");
        let local = v2(0, 0, &[]);
        assert!(read_header(&local[..], peer, false).await.is_err());
        let (_, client) = read_header(&local[..], peer, true).await.unwrap();
        assert_eq!(client, peer);
        // A peer that stops halfway.
        assert!(read_header(&b"PROXY TCP4"[..], peer, true).await.is_err());
    }
}
