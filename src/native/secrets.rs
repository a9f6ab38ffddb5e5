//! The native [`SecretResolver`]: `env:NAME` reads the process environment, `file:/path` reads
//! a file (Docker and Kubernetes mount secrets as files, e.g. `file:/run/secrets/hub_token`).
//!
//! A file's content is the secret with one trailing newline (`\n` or `\r\n`) removed, since
//! `echo value > file` and most secret tooling add one; any other whitespace is kept. Errors name
//! the reference (the variable or the path) and the reason, never the content.

use crate::core::config::{ConfigError, Secret, SecretResolver};
use std::path::Path;

/// Resolves `env:NAME` and `file:/path` references on the native host.
pub struct HostSecrets;

impl SecretResolver for HostSecrets {
    fn resolve(&self, reference: &str) -> Result<Secret, ConfigError> {
        if let Some(name) = reference.strip_prefix("env:") {
            return std::env::var(name).map(Secret::new).map_err(|_| {
                ConfigError(format!(
                    "environment variable {name} (a secret reference) is not set"
                ))
            });
        }
        if let Some(path) = reference.strip_prefix("file:") {
            return read_secret_file(Path::new(path))
                .map_err(|why| ConfigError(format!("secret reference {reference:?}: {why}")));
        }
        Err(ConfigError(format!(
            "secret reference {reference:?}: the native host reads env:NAME or file:/path"
        )))
    }
}

/// Is `reference` one this host can resolve (the form only; nothing is read)?
pub fn is_well_formed(reference: &str) -> bool {
    match reference.split_once(':') {
        Some(("env", name)) => !name.is_empty(),
        Some(("file", path)) => !path.is_empty(),
        _ => false,
    }
}

/// The secret in `path`, without one trailing newline; the reason it cannot be read otherwise
/// (never the content).
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    if path.as_os_str().is_empty() {
        return Err("the path is empty".into());
    }
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the file does not exist".to_string(),
        std::io::ErrorKind::PermissionDenied => "the file cannot be read (permission)".to_string(),
        _ => format!("reading the file: {}", e.kind()),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_string())?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(Secret::new(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        format!("file:{}", path.display())
    }

    #[test]
    fn a_file_reference_reads_the_file_without_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        for (content, want) in [
            (&b"hunter2\n"[..], "hunter2"),
            (b"hunter2\r\n", "hunter2"),
            (b"hunter2", "hunter2"),
            (b"hunter2\n\n", "hunter2\n"),
            (b" spaced \n", " spaced "),
        ] {
            let r = write(&dir, "s", content);
            assert_eq!(HostSecrets.resolve(&r).unwrap().expose(), want);
        }
    }

    #[test]
    fn file_errors_name_the_reference_and_never_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("file:{}", dir.path().join("nope").display());
        let e = HostSecrets.resolve(&missing).unwrap_err().to_string();
        assert!(e.contains(&missing) && e.contains("does not exist"), "{e}");
        let empty = write(&dir, "empty", b"\n");
        let e = HostSecrets.resolve(&empty).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let binary = write(&dir, "bin", b"hunter2\xff\xfe");
        let e = HostSecrets.resolve(&binary).unwrap_err().to_string();
        assert!(e.contains("UTF-8") && !e.contains("hunter2"), "{e}");
        let e = HostSecrets
            .resolve(&format!("file:{}", dir.path().display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading the file"), "{e}");
    }

    #[test]
    fn env_references_and_unknown_schemes() {
        let e = HostSecrets
            .resolve("env:PULLGATE_TEST_SURELY_UNSET_VARIABLE")
            .unwrap_err()
            .to_string();
        assert!(e.contains("PULLGATE_TEST_SURELY_UNSET_VARIABLE"), "{e}");
        // PATH is set wherever the tests run.
        assert!(HostSecrets.resolve("env:PATH").is_ok());
        let e = HostSecrets.resolve("vault:x").unwrap_err().to_string();
        assert!(e.contains("env:NAME or file:/path"), "{e}");
        assert!(is_well_formed("env:A") && is_well_formed("file:/run/secrets/a"));
        assert!(!is_well_formed("env:") && !is_well_formed("vault:x") && !is_well_formed("x"));
    }
}
