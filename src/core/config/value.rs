//! Configuration values every feature's schema uses: the error type, secrets and their
//! resolver, durations, sizes and host names. A leaf: it imports nothing from the core.

use std::fmt;

/// A configuration error, with the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// A secret value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a resolved value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    /// The value, for building an `Authorization` header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Turns a secret reference (`env:NAME`, a binding name, a variable) into its value.
pub trait SecretResolver {
    /// Resolves `reference`; the error names the reference, never a value.
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError>;
}

/// Parses a duration such as `90s`, `5m`, `2h`, `7d`, `250ms` or `0s` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| ConfigError(format!("duration {s:?} needs a unit (ms, s, m, h, d)")))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError(format!("duration {s:?} is not a number with a unit")))?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(ConfigError(format!(
                "duration {s:?}: unknown unit {unit:?}"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError(format!("duration {s:?} is too large")))
}

/// Parses a size such as `50GiB`, `512MiB`, `10GB` or `1024` (bytes).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError(format!("size {s:?} is not a number with a unit")))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => return Err(ConfigError(format!("size {s:?}: unknown unit {u:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| ConfigError(format!("size {s:?} is too large")))
}

/// `url` as it may be shown in an error or a log: everything between the scheme and the last
/// `@` replaced by `***`, so a credential written into a URL by mistake is never echoed, even
/// one holding `/`, `?` or `#`, or in text that does not parse as a URL (an `@` later in a
/// path hides a little more than it needs to).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    match (scheme, rest.rfind('@')) {
        (_, None) => url.to_string(),
        (Some(s), Some(at)) => format!("{s}://***{}", &rest[at..]),
        (None, Some(at)) => format!("***{}", &rest[at..]),
    }
}

/// Refuses a URL that carries a user name or password (`https://user:pw@host`): credentials
/// belong in the keys made for them, as `env:` or `file:` references, where they are never
/// logged. `what` names the key; the error shows the URL redacted.
pub fn refuse_credentials(what: &str, url: &url::Url) -> Result<(), ConfigError> {
    if url.username().is_empty() && url.password().is_none() {
        return Ok(());
    }
    Err(ConfigError(format!(
        "{what}: url {:?} carries a user name or password; put credentials in their own \
         keys (env: or file: references), never in the URL",
        redact_url(url.as_str())
    )))
}

/// Lowercases a registry host and drops a default port, so `Docker.IO:443` is `docker.io`.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().trim_end_matches('/').to_ascii_lowercase();
    h.strip_suffix(":443").map(str::to_string).unwrap_or(h)
}

/// Resolves a secret reference (`env:NAME`, a binding, a variable); a literal (no `:`) is
/// refused, so a password can never sit in the configuration text. `what` names the key.
pub fn secret_ref(
    resolver: &dyn SecretResolver,
    what: &str,
    reference: &str,
) -> Result<Secret, ConfigError> {
    if !reference.contains(':') {
        return Err(ConfigError(format!(
            "{what} must be a secret reference such as \"env:NAME\", not a literal"
        )));
    }
    resolver.resolve(reference)
}
