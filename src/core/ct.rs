//! Constant-time comparison of secrets (tokens, MACs): the time an answer takes never tells
//! how much of a guess was right. A leaf.

use subtle::ConstantTimeEq;

/// Are `a` and `b` equal? Constant time in their contents (the length is not secret).
pub fn bytes_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Are two tokens equal? See [`bytes_match`].
pub fn tokens_match(a: &str, b: &str) -> bool {
    bytes_match(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_same_length_and_bytes() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
        assert!(bytes_match(b"", b""));
    }
}
