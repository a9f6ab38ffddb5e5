//! [`BlockingOffload`]: the native host's [`Offload`] port. Password verification (argon2,
//! about 23 ms of CPU and 19 MiB of memory each in a release build) runs on tokio's blocking
//! pool, never on the event-loop thread, so `/healthz` and cache hits keep answering during a
//! burst of logins. A semaphore bounds the jobs running at once (one fewer than the cores, at
//! least one), which also bounds their memory; jobs beyond it wait their turn without holding
//! a thread.

use crate::core::ports::Offload;
use futures_util::future::LocalBoxFuture;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Blocking-pool offload with a bound on concurrent jobs; clones share the bound (one per
/// worker thread, one bound per process).
#[derive(Clone)]
pub struct BlockingOffload {
    permits: Arc<Semaphore>,
}

impl BlockingOffload {
    /// At most `max` jobs at once (at least one).
    pub fn new(max: usize) -> Self {
        BlockingOffload {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// One fewer than the machine's cores, at least one: the event loop keeps a core.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores.saturating_sub(1))
    }
}

impl Offload for BlockingOffload {
    fn run(&self, job: Box<dyn FnOnce() + Send>) -> LocalBoxFuture<'static, ()> {
        let permits = self.permits.clone();
        Box::pin(async move {
            // The semaphore is never closed; a closed one would leave the job unrun, which
            // the caller sees as no result.
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            // A panicking job leaves no result; the caller treats that as a failed check.
            let _ = tokio::task::spawn_blocking(job).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ports::offload;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn jobs_run_off_the_calling_thread_and_never_more_than_the_bound_at_once() {
        let o = Arc::new(BlockingOffload::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let caller = std::thread::current().id();
        let local = tokio::task::LocalSet::new();
        let results = local
            .run_until(async {
                let jobs = (0..8).map(|i| {
                    let (o, running, peak) = (o.clone(), running.clone(), peak.clone());
                    async move {
                        offload(&*o, move || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            // Hold the slot long enough for others to try to enter.
                            std::thread::sleep(std::time::Duration::from_millis(5));
                            running.fetch_sub(1, Ordering::SeqCst);
                            (i, std::thread::current().id())
                        })
                        .await
                    }
                });
                futures_util::future::join_all(jobs).await
            })
            .await;
        assert_eq!(results.len(), 8);
        for (i, r) in results.into_iter().enumerate() {
            let (n, thread) = r.expect("job ran");
            assert_eq!(n, i);
            assert_ne!(thread, caller, "argon2 must not run on the event loop");
        }
        assert!(peak.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test]
    async fn a_panicking_job_is_no_result_not_a_crash() {
        let o = BlockingOffload::new(1);
        let r: Result<u8, _> = offload(&o, || panic!("boom")).await;
        assert!(r.is_err());
    }
}
