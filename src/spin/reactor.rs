//! The Spin host's executor: runs one request's futures to completion on WASI pollables, and
//! the deferred-work queue that keeps a cache fill going after its client's response ended.
//!
//! spin-sdk's own `run` polls with a waker that does nothing and sleeps on pollables whenever
//! the future is pending, so a future woken by another future of the same request (a blob
//! reader woken by the fill it joined — the core does that) would sleep until some unrelated
//! pollable fired, or trip its "no pollables" assertion. [`block_on`] uses a real waker: a
//! wake-up from inside the request polls again at once, and only when nothing was woken does
//! it block in `wasi:io/poll.poll` on the pollables that pending futures registered.
//!
//! Pollables are children of the streams and futures they watch and must be dropped before
//! them, so the registry holds them weakly: a waiting future owns its pollable, and dropping
//! the future drops it.

use crate::core::ports::Deferred;
use futures_util::future::{poll_fn, LocalBoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use wasi::io::poll::Pollable;

thread_local! {
    /// Pollables that pending futures wait on, with the waker to call when one is ready.
    static WAITING: RefCell<Vec<(Weak<Pollable>, Waker)>> = const { RefCell::new(Vec::new()) };
    /// Work handed to [`SpinDeferred`] and not yet picked up by [`run_with_deferred`].
    static SPAWNED: RefCell<Vec<LocalBoxFuture<'static, ()>>> = const { RefCell::new(Vec::new()) };
    /// Wakes the deferred-work driver when work is spawned.
    static DRIVER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Sets a flag; [`block_on`] polls again while it is set.
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The executor gave up: nothing can make progress (a future is pending with nothing woken
/// and no pollable to wait on).
#[derive(Debug)]
pub struct Stalled;

/// Runs `future` to completion on this thread, blocking on WASI pollables while it waits.
pub fn block_on<T>(future: impl Future<Output = T>) -> Result<T, Stalled> {
    let flag = Arc::new(Flag(AtomicBool::new(true)));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if flag.0.swap(false, Ordering::SeqCst) {
            if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
                return Ok(v);
            }
            continue;
        }
        let entries: Vec<(Rc<Pollable>, Waker)> = WAITING
            .with(|w| std::mem::take(&mut *w.borrow_mut()))
            .into_iter()
            .filter_map(|(p, w)| p.upgrade().map(|p| (p, w)))
            .collect();
        if entries.is_empty() {
            return Err(Stalled);
        }
        let list: Vec<&Pollable> = entries.iter().map(|(p, _)| p.as_ref()).collect();
        let ready = wasi::io::poll::poll(&list);
        let mut keep = Vec::new();
        for (i, (p, w)) in entries.into_iter().enumerate() {
            if ready.contains(&(i as u32)) {
                w.wake();
            } else {
                keep.push((Rc::downgrade(&p), w));
            }
        }
        WAITING.with(|w| w.borrow_mut().extend(keep));
    }
}

fn register(pollable: &Rc<Pollable>, waker: &Waker) {
    WAITING.with(|w| {
        let mut w = w.borrow_mut();
        let weak = Rc::downgrade(pollable);
        match w.iter_mut().find(|(p, _)| p.ptr_eq(&weak)) {
            Some(entry) => entry.1 = waker.clone(),
            None => w.push((weak, waker.clone())),
        }
    });
}

/// Resolves when `pollable` is ready (and drops it then).
pub async fn ready(pollable: Pollable) {
    let pollable = Rc::new(pollable);
    poll_fn(|cx| {
        if pollable.ready() {
            Poll::Ready(())
        } else {
            register(&pollable, cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// Resolves after `ms` milliseconds (a `wasi:clocks/monotonic-clock` pollable): the host's
/// own waits, such as a fill follower polling its lead's lease.
pub async fn sleep_ms(ms: u64) {
    ready(wasi::clocks::monotonic_clock::subscribe_duration(
        ms.saturating_mul(1_000_000),
    ))
    .await
}

/// The deferred-work port on Spin: work joins the current request's [`run_with_deferred`],
/// which keeps the handler (and so the instance) alive until it finishes. Spin has no
/// background tasks beyond the handler: nothing runs after the handler returns.
pub struct SpinDeferred;

impl Deferred for SpinDeferred {
    fn spawn(&self, work: LocalBoxFuture<'static, ()>) {
        SPAWNED.with(|s| s.borrow_mut().push(work));
        if let Some(w) = DRIVER.with(|d| d.borrow().clone()) {
            w.wake();
        }
    }
}

/// Runs `main` (the request: respond, stream the body) together with every piece of deferred
/// work spawned meanwhile, and returns once all of them are done.
pub async fn run_with_deferred<T>(main: impl Future<Output = T>) -> T {
    let done: Cell<bool> = Cell::new(false);
    let mut running: FuturesUnordered<LocalBoxFuture<'static, ()>> = FuturesUnordered::new();
    let main = async {
        let out = main.await;
        done.set(true);
        out
    };
    let driver = poll_fn(|cx| {
        DRIVER.with(|d| *d.borrow_mut() = Some(cx.waker().clone()));
        loop {
            let spawned = SPAWNED.with(|s| std::mem::take(&mut *s.borrow_mut()));
            let fresh = !spawned.is_empty();
            running.extend(spawned);
            match running.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) if fresh => continue,
                Poll::Ready(None) => {
                    let more = SPAWNED.with(|s| !s.borrow().is_empty());
                    if more {
                        continue;
                    }
                    return if done.get() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    };
                }
                Poll::Pending => {
                    let more = SPAWNED.with(|s| !s.borrow().is_empty());
                    if more {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    });
    let (out, ()) = futures_util::future::join(main, driver).await;
    DRIVER.with(|d| *d.borrow_mut() = None);
    out
}
