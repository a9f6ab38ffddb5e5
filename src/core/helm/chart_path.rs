//! The path codec of chart files: how a chart's path under `/charts/<repo>/` is written into
//! the rewritten index (percent-encoded), read back from a request or an upstream URL's file
//! name (percent-decoded), and which decoded paths are acceptable at all.
//!
//! Both directions go through the `percent-encoding` crate (the one `url` uses). The encode
//! set is pullgate's own and fixed, because paths it wrote are stored in cached indexes and
//! must keep naming the same chart files: ASCII letters and digits, `-`, `.`, `_`, `~`, `+`
//! and `/` stay as they are, every other byte (of the UTF-8 text) becomes `%XX` with
//! upper-case hex. Decoding is strict where the crate is lenient: a `%` not followed by two
//! hex digits makes the whole path malformed (never passed through as text), as does a
//! result that is not UTF-8. Must not: know where chart files are stored or fetched from.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// Bytes percent-encoded in a chart path: all but ASCII alphanumerics and `-._~+/`.
const CHART_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'+')
    .remove(b'/');

/// Decodes `%XX` escapes; None for a malformed escape or a non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<String> {
    crate::core::http::percent_decode_strict(s)
}

/// Percent-encodes a chart path for the index: unreserved characters, `+` and `/` stay.
pub fn percent_encode_path(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, CHART_PATH).to_string()
}

/// Is `s` a safe path under `/charts/<repo>/`: segments without control characters,
/// backslashes, `.` or `..`, and not `index.yaml`.
pub fn is_chart_path(s: &str) -> bool {
    !s.is_empty()
        && s != "index.yaml"
        && s.len() <= 512
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.chars().any(|c| c.is_control() || c == '\\')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written encoder this module replaced, kept as the reference the stored
    /// indexes were written with.
    fn reference_encode(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    #[test]
    fn encoding_keeps_the_stored_form() {
        assert_eq!(percent_encode_path("c d+1.tgz"), "c%20d+1.tgz");
        assert_eq!(
            percent_encode_path("0f1e2d3c4b5a6978/a-1.tgz"),
            "0f1e2d3c4b5a6978/a-1.tgz"
        );
        assert_eq!(percent_encode_path("a~b_c.tgz"), "a~b_c.tgz");
        assert_eq!(
            percent_encode_path("ä#?%:@!*'(),;=&$[]\"<>\\^`{|}\t.tgz"),
            "%C3%A4%23%3F%25%3A%40%21%2A%27%28%29%2C%3B%3D%26%24%5B%5D%22%3C%3E%5C%5E%60%7B%7C%7D%09.tgz"
        );
        // Every single character of the first 1,024 code points, as the old encoder wrote it.
        for c in (0u32..1024).filter_map(char::from_u32) {
            let s = format!("x{c}y");
            assert_eq!(percent_encode_path(&s), reference_encode(&s), "{c:?}");
        }
    }

    #[test]
    fn decoding_round_trips_and_refuses_malformed_escapes() {
        assert_eq!(percent_decode("c%20d+1.tgz").as_deref(), Some("c d+1.tgz"));
        assert_eq!(percent_decode("a%2fb%2Fc").as_deref(), Some("a/b/c"));
        assert_eq!(percent_decode("plain.tgz").as_deref(), Some("plain.tgz"));
        for bad in ["%zz", "%", "a%2", "%+5", "%-1", "%c3", "%ff.tgz"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
        for c in (0u32..1024).filter_map(char::from_u32) {
            let s = format!("x{c}y/z");
            assert_eq!(
                percent_decode(&percent_encode_path(&s)).as_deref(),
                Some(&*s)
            );
        }
    }

    #[test]
    fn chart_paths() {
        assert!(is_chart_path("a/b.tgz"));
        assert!(!is_chart_path("../b.tgz"));
        assert!(!is_chart_path("index.yaml"));
        assert!(!is_chart_path("a//b"));
        assert!(!is_chart_path("a\\b"));
        assert!(!is_chart_path(&"a".repeat(513)));
    }
}
