//! HTTP `Range` for blobs: one range, `bytes=a-b`, `a-` or `-n` (RFC 9110 §14; the OCI spec
//! asks registries to support single ranges so clients can resume). Pure.

/// A parsed single byte range, before the blob's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` (inclusive) or `a-` (to the end).
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: Option<u64>,
    },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// What to do with a range against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve `[start, end]` inclusive with 206.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// 416: nothing of the blob lies in the range.
    Unsatisfiable,
}

/// Parses a `Range` header. Anything we do not serve as a single range (several ranges, other
/// units, garbage) is `None`, and the whole blob is answered with 200, which RFC 9110 allows.
pub fn parse_range(header: &str) -> Option<ByteRange> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        return Some(ByteRange::Suffix(n));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        let e: u64 = b.parse().ok()?;
        if e < start {
            return None;
        }
        Some(e)
    };
    Some(ByteRange::From { start, end })
}

impl ByteRange {
    /// Resolves against the blob size.
    pub fn resolve(self, size: u64) -> RangeOutcome {
        match self {
            ByteRange::From { start, .. } if start >= size => RangeOutcome::Unsatisfiable,
            ByteRange::From { start, end } => RangeOutcome::Partial {
                start,
                end: end.map_or(size - 1, |e| e.min(size - 1)),
            },
            ByteRange::Suffix(0) => RangeOutcome::Unsatisfiable,
            ByteRange::Suffix(_) if size == 0 => RangeOutcome::Unsatisfiable,
            ByteRange::Suffix(n) => RangeOutcome::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_parsing_table() {
        assert_eq!(
            parse_range("bytes=0-99"),
            Some(ByteRange::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            parse_range("bytes=100-"),
            Some(ByteRange::From {
                start: 100,
                end: None
            })
        );
        assert_eq!(parse_range("bytes=-5"), Some(ByteRange::Suffix(5)));
        for bad in [
            "bytes=5-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=a-b",
            "",
            "bytes=-",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn range_resolution_table() {
        use RangeOutcome::*;
        let r = |s: &str| parse_range(s).unwrap();
        assert_eq!(r("bytes=0-99").resolve(1000), Partial { start: 0, end: 99 });
        assert_eq!(
            r("bytes=990-2000").resolve(1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=500-").resolve(1000),
            Partial {
                start: 500,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=-10").resolve(1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=-5000").resolve(1000),
            Partial { start: 0, end: 999 }
        );
        assert_eq!(r("bytes=1000-").resolve(1000), Unsatisfiable);
        assert_eq!(r("bytes=-0").resolve(1000), Unsatisfiable);
        assert_eq!(r("bytes=0-").resolve(0), Unsatisfiable);
    }
}
