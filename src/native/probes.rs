//! Liveness, readiness and the drain on the native host.
//!
//! - `/livez` (and its alias `/healthz`) answers 200 while the process serves: the core answers
//!   it without asking the host.
//! - `/readyz`: the host puts a [`Readiness`] on the request ([`Probes::check`]) and the core
//!   answers 200 or 503 with it. Ready means the configuration loaded (the process would not
//!   serve otherwise), the data directory takes a probe write and delete, and no drain started.
//! - The drain: on SIGTERM/SIGINT, `/readyz` turns 503 at once ([`drain_signal`]); the listener
//!   keeps accepting for `[server] unready_delay` (default `0s`; a second signal cuts it short)
//!   so a load balancer polling `/readyz` can take the instance out first; then the listener
//!   closes and in-flight requests and fills get up to `[server] drain` / `--drain` (default
//!   `25s`, below Kubernetes' 30 s grace period) to finish.

use crate::core::config::{parse_duration_ms, ServerConfig};
use crate::core::ports::Readiness;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Default `drain`: below Kubernetes' default 30 s termination grace period.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(25);

/// The shutdown timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// After the signal: unready, still accepting, for this long.
    pub unready_delay: Duration,
    /// After the listener closes: the most in-flight work gets.
    pub drain: Duration,
}

impl Default for DrainPlan {
    fn default() -> Self {
        DrainPlan {
            unready_delay: Duration::ZERO,
            drain: DEFAULT_DRAIN,
        }
    }
}

impl DrainPlan {
    /// `[server] drain` and `unready_delay`; `--drain` (`flag`) wins over the file.
    pub fn parse(server: &ServerConfig, flag: Option<&str>) -> Result<DrainPlan, String> {
        let duration = |key: &str, value: Option<&str>, default: Duration| match value {
            None => Ok(default),
            Some(v) => parse_duration_ms(v)
                .map(Duration::from_millis)
                .map_err(|e| format!("server.{key}: {}", e.0)),
        };
        Ok(DrainPlan {
            unready_delay: duration(
                "unready_delay",
                server.unready_delay.as_deref(),
                Duration::ZERO,
            )?,
            drain: duration("drain", flag.or(server.drain.as_deref()), DEFAULT_DRAIN)?,
        })
    }
}

/// What `/readyz` looks at. Shared by every thread that serves (the drain flag is one).
pub struct Probes {
    data_dir: PathBuf,
    draining: AtomicBool,
    /// Numbers probe files, so overlapping probes never share one.
    next: AtomicU64,
    /// The last storage check and when it ran: reused for [`STORAGE_CHECK_EVERY`], so a flood
    /// of `/readyz` requests (the probe is answered before `[[network]]` rules see the request)
    /// costs at most one file write per interval.
    last: std::sync::Mutex<Option<(std::time::Instant, Readiness)>>,
    /// [`STORAGE_CHECK_EVERY`], or another interval in tests.
    every: std::time::Duration,
}

/// How long one storage check answers `/readyz` for.
const STORAGE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Probes {
    /// Probes for a host storing under `data_dir`.
    pub fn new(data_dir: &Path) -> Arc<Probes> {
        Probes::checking_every(data_dir, STORAGE_CHECK_EVERY)
    }

    /// Probes whose storage check answers for `every`.
    fn checking_every(data_dir: &Path, every: std::time::Duration) -> Arc<Probes> {
        Arc::new(Probes {
            data_dir: data_dir.to_path_buf(),
            draining: AtomicBool::new(false),
            next: AtomicU64::new(0),
            last: std::sync::Mutex::new(None),
            every,
        })
    }

    /// From now on `/readyz` answers 503.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Is a drain under way?
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Readiness now: not draining, and a probe file can be written and deleted under the
    /// data directory (checked at most once per [`STORAGE_CHECK_EVERY`]).
    pub async fn check(&self) -> Readiness {
        if self.is_draining() {
            return Readiness::NotReady("draining".into());
        }
        let now = std::time::Instant::now();
        if let Ok(last) = self.last.lock() {
            if let Some((at, readiness)) = last.as_ref() {
                if now.duration_since(*at) < self.every {
                    return readiness.clone();
                }
            }
        }
        let readiness = self.check_storage().await;
        if let Ok(mut last) = self.last.lock() {
            *last = Some((now, readiness.clone()));
        }
        readiness
    }

    /// Writes and deletes a probe file under the data directory.
    async fn check_storage(&self) -> Readiness {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let probe = self
            .data_dir
            .join(format!(".readyz-{}-{n}", std::process::id()));
        let written = tokio::fs::write(&probe, b"ready").await;
        let removed = match written {
            Ok(()) => tokio::fs::remove_file(&probe).await,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => Readiness::Ready,
            Err(e) => Readiness::NotReady(format!(
                "storage is not writable: {}: {}",
                self.data_dir.display(),
                e.kind()
            )),
        }
    }
}

/// Completes `unready_delay` after the first `signal()` does (or at the second one), having
/// turned `/readyz` unready at the first: the serve loop stops accepting when this completes.
pub async fn drain_signal<F, S>(signal: S, probes: Arc<Probes>, plan: DrainPlan)
where
    S: Fn() -> F,
    F: Future<Output = ()>,
{
    signal().await;
    // Listen for the second signal before anyone can see the drain (a probe answering 503 is
    // a client's cue that a second signal will be heard).
    let again = signal();
    tokio::pin!(again);
    let cut_short = futures_util::FutureExt::now_or_never(again.as_mut()).is_some();
    probes.start_drain();
    eprintln!(
        "pullgate draining: /readyz answers 503; closing the listener in {} ms, then up to {} ms for work in flight",
        plan.unready_delay.as_millis(),
        plan.drain.as_millis()
    );
    if !plan.unready_delay.is_zero() && !cut_short {
        tokio::select! {
            _ = tokio::time::sleep(plan.unready_delay) => {}
            _ = again => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn drain_defaults_to_25s_and_the_flag_wins() {
        let none = ServerConfig::default();
        assert_eq!(DrainPlan::parse(&none, None).unwrap(), DrainPlan::default());
        assert_eq!(DrainPlan::default().drain, Duration::from_secs(25));
        let file = ServerConfig {
            drain: Some("40s".into()),
            unready_delay: Some("5s".into()),
            ..ServerConfig::default()
        };
        let p = DrainPlan::parse(&file, None).unwrap();
        assert_eq!(p.drain, Duration::from_secs(40));
        assert_eq!(p.unready_delay, Duration::from_secs(5));
        let p = DrainPlan::parse(&file, Some("2s")).unwrap();
        assert_eq!(p.drain, Duration::from_secs(2));
        let e = DrainPlan::parse(&none, Some("soon")).unwrap_err();
        assert!(e.starts_with("server.drain:"), "{e}");
    }

    #[test]
    fn ready_until_the_drain_starts_and_the_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes::new(dir.path());
        rt().block_on(async {
            assert_eq!(probes.check().await, Readiness::Ready);
            assert_eq!(probes.check().await, Readiness::Ready);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            probes.start_drain();
            assert_eq!(probes.check().await, Readiness::NotReady("draining".into()));
        });
    }

    #[test]
    fn unwritable_storage_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes::new(&dir.path().join("gone"));
        let r = rt().block_on(probes.check());
        assert!(
            matches!(&r, Readiness::NotReady(m) if m.contains("storage is not writable")),
            "{r:?}"
        );
    }

    #[test]
    fn the_drain_signal_turns_unready_before_it_completes() {
        let dir = tempfile::tempdir().unwrap();
        let probes = Probes::new(dir.path());
        rt().block_on(async {
            let signals = Arc::new(tokio::sync::Semaphore::new(0));
            let plan = DrainPlan {
                // Only the second signal can end it within the test.
                unready_delay: Duration::from_secs(24 * 3600),
                drain: DEFAULT_DRAIN,
            };
            let signal = || {
                let signals = signals.clone();
                async move {
                    if let Ok(permit) = signals.acquire().await {
                        permit.forget();
                    }
                }
            };
            let drain = drain_signal(signal, probes.clone(), plan);
            tokio::pin!(drain);
            let mut poll = || futures_util::FutureExt::now_or_never(drain.as_mut()).is_some();
            // Not signalled: the future stays pending and readiness holds.
            assert!(!poll());
            assert!(!probes.is_draining());
            signals.add_permits(1);
            // Signalled once: unready at once, still pending (the listener stays open).
            assert!(!poll());
            assert!(probes.is_draining());
            signals.add_permits(1);
            // The second signal cuts the unready window short.
            assert!(poll());
        });
    }

    #[test]
    fn a_storage_check_answers_for_its_interval_then_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let cached = Probes::checking_every(&data, Duration::from_secs(3600));
        let fresh = Probes::checking_every(&data, Duration::ZERO);
        let rt = rt();
        assert_eq!(rt.block_on(cached.check()), Readiness::Ready);
        assert_eq!(rt.block_on(fresh.check()), Readiness::Ready);
        std::fs::remove_dir(&data).unwrap();
        // Within the interval no file is written: the last answer stands.
        assert_eq!(rt.block_on(cached.check()), Readiness::Ready);
        assert!(matches!(rt.block_on(fresh.check()), Readiness::NotReady(_)));
        // A drain is never cached.
        cached.start_drain();
        assert_eq!(
            rt.block_on(cached.check()),
            Readiness::NotReady("draining".into())
        );
    }
}
