//! A test-only stand-in for the two Spin host interfaces pullgate imports, so the pullgate
//! component can run under `wasmtime serve` (which provides WASI and wasi:http, but not Spin's
//! own interfaces). It behaves the way `spin up` does locally, limits included:
//!
//! - `fermyon:spin/key-value@2.0.0`: a store opens only if its label is listed in
//!   `SPIN_SHIM_KV_STORES` (comma-separated, like a component's `key_value_stores`; otherwise
//!   `access-denied`). Values persist across requests and instances, one file per key under
//!   `/kv/<label>/` (a preopened directory), written atomically (temp file, rename). Keys over
//!   256 bytes and values over 1 MB are refused with an error, as Spin documents those limits:
//!   a component that works here stays within them.
//! - `fermyon:spin/variables@2.0.0`: a variable `name` is read from the environment variable
//!   `SPIN_VARIABLE_NAME` (Spin's environment-variable provider); names must be lowercase
//!   letters, digits and underscores, starting with a letter.

use std::cell::RefCell;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

wit_bindgen::generate!({
    world: "shim",
    path: "wit",
});

use exports::fermyon::spin::key_value::{Error as KvError, Guest as KvGuest, GuestStore};
use exports::fermyon::spin::variables::{Error as VarError, Guest as VarGuest};

/// Where the stores live (a preopened directory).
const ROOT: &str = "/kv";
/// Spin's documented key limit.
const MAX_KEY: usize = 256;
/// Spin's documented value limit (1 MB).
const MAX_VALUE: usize = 1_000_000;
/// Hex characters per path segment (a file name stays under 255 bytes).
const SEGMENT: usize = 200;

struct Shim;

/// An open store: its directory.
struct Store {
    dir: PathBuf,
    /// A counter for temp file names.
    writes: RefCell<u64>,
}

fn other(e: impl std::fmt::Display) -> KvError {
    KvError::Other(e.to_string())
}

/// `key` → its file: the key in hex, split into directories of [`SEGMENT`] characters, the last
/// one with a `.v` suffix.
fn key_path(dir: &Path, key: &str) -> PathBuf {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    let mut path = dir.to_path_buf();
    let parts: Vec<&str> = hex
        .as_bytes()
        .chunks(SEGMENT)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            path.push(format!("{part}.v"));
        } else {
            path.push(part);
        }
    }
    if parts.is_empty() {
        path.push(".v");
    }
    path
}

fn decode(hex: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), KvError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(other(e)),
    };
    for entry in entries {
        let entry = entry.map_err(other)?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp") {
            continue;
        }
        let kind = entry.file_type().map_err(other)?;
        if kind.is_dir() {
            walk(&entry.path(), &format!("{prefix}{name}"), out)?;
        } else if let Some(last) = name.strip_suffix(".v") {
            if let Some(key) = decode(&format!("{prefix}{last}")) {
                out.push(key);
            }
        }
    }
    Ok(())
}

impl GuestStore for Store {
    fn open(label: String) -> Result<exports::fermyon::spin::key_value::Store, KvError> {
        let allowed = std::env::var("SPIN_SHIM_KV_STORES").unwrap_or_else(|_| "default".into());
        if !allowed.split(',').any(|l| l.trim() == label) {
            return Err(KvError::AccessDenied);
        }
        let dir = Path::new(ROOT).join(&label);
        fs::create_dir_all(&dir).map_err(other)?;
        Ok(exports::fermyon::spin::key_value::Store::new(Store {
            dir,
            writes: RefCell::new(0),
        }))
    }

    fn get(&self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        match fs::read(key_path(&self.dir, &key)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(other(e)),
        }
    }

    fn set(&self, key: String, value: Vec<u8>) -> Result<(), KvError> {
        if key.len() > MAX_KEY {
            return Err(other(format!(
                "key of {} bytes is over Spin's {MAX_KEY}-byte limit",
                key.len()
            )));
        }
        if value.len() > MAX_VALUE {
            return Err(other(format!(
                "value of {} bytes is over Spin's {MAX_VALUE}-byte limit",
                value.len()
            )));
        }
        let path = key_path(&self.dir, &key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(other)?;
        }
        let n = {
            let mut w = self.writes.borrow_mut();
            *w += 1;
            *w
        };
        let seed = std::collections::hash_map::RandomState::new();
        let tmp = self.dir.join(format!(
            ".tmp-{n}-{}",
            std::hash::BuildHasher::hash_one(&seed, &key)
        ));
        let mut file = fs::File::create(&tmp).map_err(other)?;
        file.write_all(&value).map_err(other)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(other)
    }

    fn delete(&self, key: String) -> Result<(), KvError> {
        match fs::remove_file(key_path(&self.dir, &key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(other(e)),
        }
    }

    fn exists(&self, key: String) -> Result<bool, KvError> {
        Ok(key_path(&self.dir, &key).exists())
    }

    fn get_keys(&self) -> Result<Vec<String>, KvError> {
        let mut out = Vec::new();
        walk(&self.dir, "", &mut out)?;
        Ok(out)
    }
}

impl KvGuest for Shim {
    type Store = Store;
}

impl VarGuest for Shim {
    fn get(name: String) -> Result<String, VarError> {
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(VarError::InvalidName(name));
        }
        std::env::var(format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase()))
            .map_err(|_| VarError::Undefined(format!("no variable for {name:?}")))
    }
}

export!(Shim);
