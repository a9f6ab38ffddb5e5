//! Time formatting from the core's clock (milliseconds since the epoch; the core never reads
//! the wall clock itself, see the `Clock` port). A leaf.

/// Formats ms since the epoch as RFC 3339 UTC (`2026-11-22T00:01:02.003Z`).
pub fn rfc3339(ms: u64) -> String {
    let mut out = [0u8; 24];
    let n = write_rfc3339(&mut out, ms / 1000, ms % 1000, 3);
    String::from_utf8_lossy(&out[..n]).into_owned()
}

/// [`rfc3339`] as ASCII bytes, without allocating.
pub fn rfc3339_millis(ms: u64) -> [u8; 24] {
    let mut out = [0u8; 24];
    write_rfc3339(&mut out, ms / 1000, ms % 1000, 3);
    out
}

/// Formats µs since the epoch as RFC 3339 UTC with microseconds
/// (`2026-11-22T00:01:02.003004Z`, the log lines' timestamps), as ASCII bytes.
pub fn rfc3339_micros(us: u64) -> [u8; 27] {
    let mut out = [0u8; 27];
    write_rfc3339(&mut out, us / 1_000_000, us % 1_000_000, 6);
    out
}

/// Writes `secs` since the epoch, then `.` and `frac` in `digits` digits, then `Z`, into
/// `out` (at least 21 + `digits` bytes, for years up to 9999); the bytes written. Digit by
/// digit rather than through `format!`: it runs for every request's audit record and log line.
fn write_rfc3339(out: &mut [u8], secs: u64, frac: u64, digits: usize) -> usize {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let mut at = 0;
    let mut put = |value: u64, width: usize, then: u8| {
        let mut v = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out[at + width] = then;
        at += width + 1;
    };
    put(y.clamp(0, 9999) as u64, 4, b'-');
    put(m as u64, 2, b'-');
    put(d as u64, 2, b'T');
    put(rem / 3600, 2, b':');
    put(rem % 3600 / 60, 2, b':');
    put(rem % 60, 2, b'.');
    put(frac, digits, b'Z');
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            &rfc3339_millis(1_795_305_662_003),
            rfc3339(1_795_305_662_003).as_bytes()
        );
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_305_662_003), "2026-11-22T00:01:02.003Z");
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            &rfc3339_micros(1_795_305_662_003_004),
            b"2026-11-22T00:01:02.003004Z"
        );
        assert_eq!(&rfc3339_micros(0), b"1970-01-01T00:00:00.000000Z");
    }
}
