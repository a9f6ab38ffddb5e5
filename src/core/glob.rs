//! The one glob every feature matches names with (access rules over upstreams and
//! repositories, gateway rules over branches and images). A leaf.

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
}
