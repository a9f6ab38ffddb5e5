//! Token-bucket rate limits per key (identity or client IP), decided from the clock port's
//! time. Per core instance: on the edge hosts each isolate or instance counts on its own, so
//! limits there are approximate (documented in the README).

use std::collections::HashMap;

/// Most keys tracked; the stalest are dropped beyond it.
const MAX_KEYS: usize = 10_000;

/// A rate: `n` per `per_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests.
    pub n: u32,
    /// Per this many ms.
    pub per_ms: u64,
}

/// Parses `20/s`, `600/m`, `10000/h`.
pub fn parse_rate(s: &str) -> Option<Rate> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|&n| n > 0)?;
    let per_ms = match unit.trim() {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Rate { n, per_ms })
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Buckets by key.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: HashMap<String, Bucket>,
}

impl Limiter {
    /// Takes one token for `key`; Err(ms until one is available) when empty.
    pub fn take(&mut self, key: &str, rate: Rate, burst: u32, now_ms: u64) -> Result<(), u64> {
        let per_ms = f64::from(rate.n) / rate.per_ms as f64;
        let cap = f64::from(burst.max(1));
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(key) {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at_ms)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        let b = self.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: cap,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
        b.tokens = (b.tokens + elapsed * per_ms).min(cap);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / per_ms).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_with_time() {
        let rate = parse_rate("2/s").unwrap();
        let mut l = Limiter::default();
        assert!(l.take("a", rate, 2, 0).is_ok());
        assert!(l.take("a", rate, 2, 0).is_ok());
        let wait = l.take("a", rate, 2, 0).unwrap_err();
        assert_eq!(wait, 500);
        assert!(l.take("b", rate, 2, 0).is_ok(), "keys are separate");
        assert!(l.take("a", rate, 2, 499).is_err());
        assert!(l.take("a", rate, 2, 1000).is_ok());
        assert_eq!(
            parse_rate("600/m"),
            Some(Rate {
                n: 600,
                per_ms: 60_000
            })
        );
        assert!(parse_rate("0/s").is_none() && parse_rate("5/d").is_none());
    }
}
