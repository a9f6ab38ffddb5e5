//! TLS on the native listener (`[tls] cert`/`key`, `--tls-cert`/`--tls-key`): rustls with the
//! ring provider, HTTP/2 and HTTP/1.1 offered by ALPN, and a certificate that can be replaced
//! while serving.
//!
//! One [`CertSlot`] holds the current certificate and key; every worker's acceptor resolves
//! through it at each handshake, so a replaced pair reaches new connections at once and never
//! touches established ones. [`watch`] replaces it on SIGHUP (its own signal stream: other
//! parts of the host may listen for SIGHUP too) and when either file's modification time or
//! size changes (checked every [`POLL_EVERY`]). A pair that does not load (unreadable, not PEM,
//! a key that does not match the certificate) keeps the previous one and logs why; the next
//! change tries again.
//!
//! Handshakes run in each connection's own task on the worker that got the connection, never
//! in the accept loop, and are bounded by the listener's `header_timeout` (the connection's
//! first request head is due within it of the accept, handshake included).

use crate::core::config::TlsConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often the certificate and key files are checked for a change.
pub const POLL_EVERY: Duration = Duration::from_secs(5);

/// ALPN protocol ids, in the server's order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where the certificate chain and key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The flags (each wins over its key in `[tls]`), then the file; both or neither.
    pub fn resolve(
        cert_flag: Option<&Path>,
        key_flag: Option<&Path>,
        config: &TlsConfig,
    ) -> Result<Option<TlsFiles>, String> {
        let cert = cert_flag
            .map(Path::to_path_buf)
            .or_else(|| config.cert.as_ref().map(PathBuf::from));
        let key = key_flag
            .map(Path::to_path_buf)
            .or_else(|| config.key.as_ref().map(PathBuf::from));
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key))
                if !cert.as_os_str().is_empty() && !key.as_os_str().is_empty() =>
            {
                Ok(Some(TlsFiles { cert, key }))
            }
            (Some(_), Some(_)) => {
                Err("configuration: tls.cert and tls.key must not be empty".into())
            }
            (Some(_), None) => {
                Err("configuration: tls.cert is set without tls.key (--tls-key)".into())
            }
            (None, Some(_)) => {
                Err("configuration: tls.key is set without tls.cert (--tls-cert)".into())
            }
        }
    }

    /// The files' modification times and sizes: what [`watch`] compares.
    fn stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let one = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        [one(&self.cert), one(&self.key)]
    }
}

/// `check-config`'s view of `[tls]`: the key path at fault and the problem. The files are not
/// read (the check runs where they are not).
pub fn check_config(config: &TlsConfig) -> Vec<(&'static str, String)> {
    let empty = |v: &Option<String>| v.as_deref().is_some_and(str::is_empty);
    let mut problems = Vec::new();
    if empty(&config.cert) {
        problems.push(("tls.cert", "must name a PEM certificate file".to_string()));
    }
    if empty(&config.key) {
        problems.push(("tls.key", "must name a PEM private key file".to_string()));
    }
    match (&config.cert, &config.key) {
        (Some(_), None) => problems.push(("tls", "cert is set without key".to_string())),
        (None, Some(_)) => problems.push(("tls", "key is set without cert".to_string())),
        _ => {}
    }
    problems
}

/// The crypto provider: ring, as the upstream client uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key. The error names the file at fault and
/// never holds key material.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert_pem = std::fs::read(&files.cert)
        .map_err(|e| format!("reading tls.cert {}: {e}", files.cert.display()))?;
    let key_pem = std::fs::read(&files.key)
        .map_err(|e| format!("reading tls.key {}: {e}", files.key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "tls.cert {}: not a PEM certificate chain: {e}",
                files.cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "tls.cert {}: holds no certificate",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        format!(
            "tls.key {}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        format!(
            "tls.key {} does not fit tls.cert {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    // `from_der` lets an undecidable comparison pass; a decided mismatch is an error above.
    Ok(certified)
}

/// The certificate every handshake presents; replaced whole by [`watch`].
#[derive(Debug)]
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    /// A slot holding `first`.
    pub fn new(first: CertifiedKey) -> Arc<CertSlot> {
        Arc::new(CertSlot(RwLock::new(Arc::new(first))))
    }

    fn set(&self, next: CertifiedKey) {
        if let Ok(mut current) = self.0.write() {
            *current = Arc::new(next);
        }
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

/// The listener's TLS: what the workers accept with, and what [`watch`] reloads.
#[derive(Clone)]
pub struct ListenerTls {
    /// Handshakes with the slot's current certificate.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The current certificate.
    pub slot: Arc<CertSlot>,
    /// Where it comes from.
    pub files: TlsFiles,
    /// The files' stamp taken before the current pair was read.
    loaded: [Option<(SystemTime, u64)>; 2],
}

impl ListenerTls {
    /// Loads `files` (an error stops the start) and builds the server configuration: TLS 1.2
    /// and 1.3, no client certificates, ALPN `h2` then `http/1.1`.
    pub fn start(files: TlsFiles) -> Result<ListenerTls, String> {
        // Stamp first: a change while the files are read is then seen as a change.
        let loaded = files.stamp();
        let slot = CertSlot::new(load(&files)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(ListenerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            slot,
            files,
            loaded,
        })
    }
}

/// Reloads the certificate on SIGHUP and whenever its files change, until the runtime stops.
/// Call it inside the runtime: the SIGHUP handler is installed before this returns, so a
/// SIGHUP from then on reloads (and never falls to the default action, which ends the
/// process).
pub fn watch(tls: ListenerTls) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(unix)]
    if let Err(e) = &hangup {
        tracing::warn!("tls: no SIGHUP reloads ({e}); file changes still reload");
    }
    #[cfg(unix)]
    let hangup = hangup.ok();
    reload_loop(
        tls,
        #[cfg(unix)]
        hangup,
    )
}

async fn reload_loop(
    tls: ListenerTls,
    #[cfg(unix)] mut hangup: Option<tokio::signal::unix::Signal>,
) {
    let mut seen = tls.loaded;
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<Option<()>>();
        let why = tokio::select! {
            _ = signalled => "SIGHUP",
            _ = poll.tick() => {
                let now = tls.files.stamp();
                if now == seen {
                    continue;
                }
                "a file change"
            }
        };
        // Read the stamp before the files: a change while they are read is seen next time.
        seen = tls.files.stamp();
        let files = tls.files.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&files))
            .await
            .unwrap_or_else(|e| Err(format!("loading the certificate: {e}")));
        match loaded {
            Ok(next) => {
                tls.slot.set(next);
                tracing::info!(
                    "tls: reloaded cert={} key={} after {why}",
                    tls.files.cert.display(),
                    tls.files.key.display()
                );
            }
            Err(e) => tracing::error!("tls: keeping the previous certificate after {why}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn flags_win_and_cert_and_key_go_together() {
        let config = TlsConfig {
            cert: Some("/file.pem".into()),
            key: Some("/file.key".into()),
        };
        let got = TlsFiles::resolve(Some(Path::new("/flag.pem")), None, &config).unwrap();
        assert_eq!(
            got,
            Some(TlsFiles {
                cert: "/flag.pem".into(),
                key: "/file.key".into()
            })
        );
        assert_eq!(
            TlsFiles::resolve(None, None, &TlsConfig::default()),
            Ok(None)
        );
        let e =
            TlsFiles::resolve(Some(Path::new("/c.pem")), None, &TlsConfig::default()).unwrap_err();
        assert!(e.contains("without tls.key"), "{e}");
        let only_key = TlsConfig {
            cert: None,
            key: Some("k".into()),
        };
        assert!(TlsFiles::resolve(None, None, &only_key).is_err());
        assert_eq!(check_config(&only_key).len(), 1);
        assert_eq!(check_config(&config), vec![]);
        let empty = TlsConfig {
            cert: Some(String::new()),
            key: Some("k".into()),
        };
        assert_eq!(check_config(&empty)[0].0, "tls.cert");
    }

    #[test]
    fn a_pair_loads_and_a_mismatched_or_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        assert!(load(&a).is_ok());
        let mixed = TlsFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = load(&mixed).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: a.key.clone(),
        };
        assert!(load(&missing).unwrap_err().contains("nope.pem"));
        let swapped = TlsFiles {
            cert: a.key.clone(),
            key: a.cert.clone(),
        };
        let e = load(&swapped).unwrap_err();
        assert!(e.contains("tls.cert") && !e.contains("PRIVATE"), "{e}");
        assert!(ListenerTls::start(a).is_ok());
    }
}
