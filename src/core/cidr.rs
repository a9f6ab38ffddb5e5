//! CIDR network rules: `10.0.0.0/8`, `2001:db8::/32`, or a bare address. Pure.

use std::net::IpAddr;

/// A parsed network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Parses `a.b.c.d/n`, `x::/n` or a bare address.
pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (a, p) = match s.trim().split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s.trim(), None),
    };
    let addr: IpAddr = a.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match p {
        Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
        None => max,
    };
    Some(Cidr { addr, prefix })
}

impl Cidr {
    /// Does the network contain `ip`? IPv4-mapped IPv6 addresses match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_table() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")));
        assert!(parse_cidr("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!parse_cidr("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(parse_cidr("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(parse_cidr("2001:db8::/32")
            .unwrap()
            .contains(ip("2001:db8::1")));
        assert!(!parse_cidr("2001:db8::/32")
            .unwrap()
            .contains(ip("2001:db9::1")));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nope").is_none());
    }
}
