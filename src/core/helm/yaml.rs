//! A lexer for one line of the block-style YAML that Helm writes for `index.yaml`: what kind
//! of line it is ([`classify`]), a mapping key and where its value starts, one-line scalars
//! (plain, single- or double-quoted), flow lists of scalars, and the formatting of a scalar
//! written back ([`yaml_scalar`]). It reads one line at a time and keeps no state; the
//! structure of the document (which line belongs to which chart entry) is the rewriter's
//! ([`super::rewrite`]). What it does not support — anchors, aliases, tags, block scalars,
//! nested flow collections, a scalar spanning lines — is an error message naming what was
//! found, never the text (see the rewriter's module doc for why).
//!
//! Spec: YAML 1.2 (<https://yaml.org/spec/1.2.2/>), only the subset go-yaml emits for
//! Helm's `repo.IndexFile`.

/// One line, with its indentation removed.
pub(super) enum LineKind<'a> {
    /// Empty, or only a comment.
    Blank,
    /// `---` at column 0.
    DocStart,
    /// `...` at column 0.
    DocEnd,
    /// `%…` at column 0.
    Directive,
    /// `- …`; the item's content starts this many bytes into the trimmed line.
    Seq(usize),
    /// `key: value`; the value starts this many bytes into the trimmed line.
    Key(String, usize),
    /// Anything else (the trimmed line).
    Other(&'a str),
}

/// Parses a YAML key at the start of `s`: (key, offset of the value).
fn parse_key(s: &str) -> Option<(String, usize)> {
    let b = s.as_bytes();
    let (key, after) = match b.first()? {
        b'"' | b'\'' => {
            let (v, end) = parse_quoted(s).ok()?;
            (v, end)
        }
        b'[' | b'{' | b'&' | b'*' | b'!' | b'|' | b'>' | b'%' | b'@' | b'`' | b'#' => return None,
        b'?' if b.get(1).is_none_or(|c| *c == b' ') => return None,
        _ => {
            let mut pos = None;
            for (i, c) in b.iter().enumerate() {
                if *c == b':' && b.get(i + 1).is_none_or(|n| *n == b' ') {
                    pos = Some(i);
                    break;
                }
                if *c == b'#' && i > 0 && b[i - 1] == b' ' {
                    return None;
                }
            }
            let p = pos?;
            (s[..p].trim_end().to_string(), p)
        }
    };
    if b.get(after) != Some(&b':') || b.get(after + 1).is_some_and(|c| *c != b' ') {
        return None;
    }
    let mut v = after + 1;
    while b.get(v) == Some(&b' ') {
        v += 1;
    }
    Some((key, v))
}

/// Parses a quoted scalar at the start of `s`: (value, offset just past the closing quote).
pub(super) fn parse_quoted(s: &str) -> Result<(String, usize), String> {
    let mut chars = s.char_indices();
    let quote = match chars.next() {
        Some((_, q @ ('"' | '\''))) => q,
        _ => return Err("not a quoted scalar".into()),
    };
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == quote {
            if quote == '\'' && s[i + 1..].starts_with('\'') {
                chars.next();
                out.push('\'');
                continue;
            }
            return Ok((out, i + 1));
        }
        if c == '\\' && quote == '"' {
            let (_, e) = chars.next().ok_or("unterminated escape")?;
            let hex = |n: usize, chars: &mut std::str::CharIndices<'_>| {
                let h: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                u32::from_str_radix(&h, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| "a malformed \\x, \\u or \\U escape".to_string())
            };
            out.push(match e {
                '"' => '"',
                '\\' => '\\',
                '/' => '/',
                ' ' => ' ',
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                '0' => '\0',
                'x' => hex(2, &mut chars)?,
                'u' => hex(4, &mut chars)?,
                'U' => hex(8, &mut chars)?,
                _ => return Err("an unsupported escape".into()),
            });
            continue;
        }
        out.push(c);
    }
    Err("quoted scalar does not end on its line".into())
}

/// Parses a one-line scalar value (plain or quoted); None for an empty value.
pub(super) fn parse_scalar(s: &str) -> Result<Option<String>, String> {
    let t = s.trim();
    match t.as_bytes().first() {
        None | Some(b'#') => Ok(None),
        Some(b'"' | b'\'') => {
            let (v, end) = parse_quoted(t)?;
            let rest = t[end..].trim_start();
            if !rest.is_empty() && !rest.starts_with('#') {
                return Err("text after a quoted scalar".into());
            }
            Ok(Some(v))
        }
        Some(b'&' | b'*' | b'!') => Err("anchors, aliases and tags are not supported here".into()),
        Some(b'|' | b'>') => Err("a block scalar is not supported here".into()),
        Some(b'{' | b'[' | b'@' | b'`' | b'%') => {
            Err("a value starting with a reserved character".into())
        }
        Some(_) => {
            let end = t.find(" #").unwrap_or(t.len());
            Ok(Some(t[..end].trim_end().to_string()))
        }
    }
}

/// Parses a flow list of scalars `[a, "b"]` at the start of `s`: (items, offset past `]`).
pub(super) fn parse_flow_list(s: &str) -> Result<(Vec<String>, usize), String> {
    let b = s.as_bytes();
    if b.first() != Some(&b'[') {
        return Err("not a flow list".into());
    }
    let mut items = Vec::new();
    let mut i = 1;
    loop {
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        match b.get(i) {
            None => return Err("flow list does not end on its line".into()),
            Some(b']') => return Ok((items, i + 1)),
            Some(b'"' | b'\'') => {
                let (v, end) = parse_quoted(&s[i..])?;
                items.push(v);
                i += end;
            }
            Some(b'[' | b'{' | b'&' | b'*' | b'!') => {
                return Err("nested flow collections, anchors and tags are not supported".into())
            }
            Some(_) => {
                let end = s[i..]
                    .find([',', ']'])
                    .ok_or("flow list does not end on its line")?;
                items.push(s[i..i + end].trim().to_string());
                i += end;
            }
        }
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Ok((items, i + 1)),
            _ => return Err("malformed flow list".into()),
        }
    }
}

/// Formats a scalar for YAML: plain when that is unambiguous, double-quoted otherwise.
pub fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'/'
                        | b'%'
                        | b'+'
                        | b':'
                        | b'@'
                        | b'?'
                        | b'&'
                        | b'='
                        | b';'
                )
        })
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && !s.contains(": ")
        && !s.ends_with(':');
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Classifies a line whose indentation (`indent` spaces) is removed (`rest`).
pub(super) fn classify(rest: &str, indent: usize) -> LineKind<'_> {
    if rest.is_empty() || rest.starts_with('#') {
        return LineKind::Blank;
    }
    if indent == 0 {
        if rest == "---" || rest.starts_with("--- ") {
            return LineKind::DocStart;
        }
        if rest == "..." || rest.starts_with("... ") {
            return LineKind::DocEnd;
        }
        if rest.starts_with('%') {
            return LineKind::Directive;
        }
    }
    if rest == "-" || rest.starts_with("- ") {
        let after = 1 + rest[1..].bytes().take_while(|b| *b == b' ').count();
        return LineKind::Seq(after);
    }
    match parse_key(rest) {
        Some((k, v)) => LineKind::Key(k, v),
        None => LineKind::Other(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(yaml_scalar("app-1.0.0.tgz"), "app-1.0.0.tgz");
        assert_eq!(
            yaml_scalar("https://a.example/x?y=1"),
            "https://a.example/x?y=1"
        );
        assert_eq!(yaml_scalar("a b"), "\"a b\"");
        assert_eq!(yaml_scalar("#x"), "\"#x\"");
        assert_eq!(parse_quoted("'it''s' x").unwrap(), ("it's".to_string(), 7));
        assert_eq!(parse_quoted(r#""a\"b\u0041""#).unwrap().0, "a\"bA");
    }
}
