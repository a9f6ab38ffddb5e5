//! The globs features match names with. A leaf.
//!
//! - [`glob_match`]: `*` matches any run of characters, `/` included; `?` one character. Access
//!   rules (upstreams, repositories) and gateway rules over repositories and images use it.
//! - [`path_glob_match`]: `*` stops at `/` and `**` crosses it, as in GitHub Actions branch and
//!   tag filters (which users copy into `[[rule]] branches`/`tags`); `?` is one character other
//!   than `/` (not GitHub's "zero or one of the preceding character").

/// Glob match where `*` matches any run of characters (including `/`) and `?` one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Path-glob match: `*` matches any run of characters except `/`, `**` any run including `/`,
/// `?` one character other than `/`; everything else matches itself.
pub fn path_glob_match(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Lit(char),
        One,
        Star,
        DoubleStar,
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '*' if chars.peek() == Some(&'*') => {
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                Tok::DoubleStar
            }
            '*' => Tok::Star,
            '?' => Tok::One,
            c => Tok::Lit(c),
        });
    }
    let t: Vec<char> = text.chars().collect();
    // can[j]: the tokens so far match t[..j]. One row per token: O(pattern × text).
    let mut can = vec![false; t.len() + 1];
    can[0] = true;
    for tok in toks {
        let mut next = vec![false; t.len() + 1];
        for j in 0..=t.len() {
            next[j] = match tok {
                Tok::Lit(c) => j > 0 && can[j - 1] && t[j - 1] == c,
                Tok::One => j > 0 && can[j - 1] && t[j - 1] != '/',
                Tok::Star => can[j] || (j > 0 && next[j - 1] && t[j - 1] != '/'),
                Tok::DoubleStar => can[j] || (j > 0 && next[j - 1]),
            };
        }
        can = next;
    }
    can[t.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_question_mark() {
        assert!(glob_match("*", ""));
        assert!(glob_match("library/*", "library/alpine"));
        assert!(glob_match("a*/b", "ax/y/b"));
        assert!(glob_match("v?.*", "v1.2"));
        assert!(!glob_match("v?.*", "v12"));
        assert!(!glob_match("main", "mainline"));
    }

    #[test]
    fn path_globs_stop_at_slash_unless_doubled() {
        for (p, t, m) in [
            ("main", "main", true),
            ("main", "mainline", false),
            ("release/*", "release/1.2", true),
            ("release/*", "release/1.2/hotfix", false),
            ("release/**", "release/1.2/hotfix", true),
            ("release/**", "release/", true),
            ("*", "feature/x", false),
            ("*", "main", true),
            ("**", "feature/x/y", true),
            ("feature/**/done", "feature/a/b/done", true),
            ("feature/*/done", "feature/a/b/done", false),
            ("v*", "v1.0.0", true),
            ("v?", "v1", true),
            ("v?", "v/", false),
            ("v?", "v10", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("**/main", "x/y/main", true),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(path_glob_match(p, t), m, "{p} {t}");
        }
    }
}
