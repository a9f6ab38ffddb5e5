//! Keeping each request's Rust code inside that request's I/O context.
//!
//! workerd runs a request's JavaScript in that request's I/O context, and an I/O object
//! (a stream, a pending fetch) may only be used from the context that created it. Rust wakers
//! break this: when a blob fill running for request A wakes a reader of request B (a
//! coalesced miss), the waker schedules B's task from A's context, so B's code — and every
//! promise and stream it creates — would run in A's context, and die with A.
//!
//! [`Gated`] fixes that for a future or stream owned by one request: it polls its inner value
//! with a waker that resolves a JavaScript promise created in the owner's context, and only
//! when the wake comes from the owner itself (or from a JavaScript callback, which runs in the
//! context of the promise that fired it). A wake from another request's code is dropped, and
//! the owner instead polls again on a timer of its own ([`POLL_INTERVAL`]). Resolving the
//! promise across requests is not an option: workerd cancels a request as hung when nothing in
//! its own context is pending, and it runs such continuations unreliably once the resolving
//! request is gone.

use futures_util::Stream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use worker::js_sys::{Function, Promise};
use worker::wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;
use worker::Delay;

/// How often a waiting future or stream polls on its own, at the latest: the delay with which
/// a coalesced reader sees bytes that another request's fill received.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

thread_local! {
    /// The resolve functions of the open gates, by gate id (a waker must be `Send`, a
    /// JavaScript function is not; wasm32 here is single-threaded).
    static GATES: RefCell<HashMap<u64, Function>> = RefCell::new(HashMap::new());
    static NEXT_GATE: Cell<u64> = const { Cell::new(0) };
    /// The owner whose gated code is running right now, if any.
    static RUNNING: Cell<Option<u64>> = const { Cell::new(None) };
}

/// A waker that opens one gate (by id) of one owner, when called from that owner's context.
struct GateWaker {
    gate: u64,
    owner: u64,
}

impl Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if RUNNING.get().is_some_and(|running| running != self.owner) {
            // Another request's code: the owner's timer will poll instead.
            return;
        }
        if let Some(resolve) = GATES.with(|g| g.borrow_mut().remove(&self.gate)) {
            let _ = resolve.call0(&JsValue::UNDEFINED);
        }
    }
}

/// A promise in the current context, and the waker that resolves it.
fn open_gate(owner: u64) -> (u64, JsFuture, Waker) {
    let id = NEXT_GATE.with(|n| {
        let id = n.get();
        n.set(id.wrapping_add(1));
        id
    });
    let promise = Promise::new(&mut |resolve, _reject| {
        GATES.with(|g| g.borrow_mut().insert(id, resolve));
    });
    let waker = Waker::from(Arc::new(GateWaker { gate: id, owner }));
    (id, JsFuture::from(promise), waker)
}

fn close_gate(id: u64) {
    GATES.with(|g| g.borrow_mut().remove(&id));
}

/// A future or stream of one request (`owner`), polled only from that request's context.
pub struct Gated<T> {
    inner: Pin<Box<T>>,
    owner: u64,
    /// The gate the inner value waits behind (and its keepalive timer), if it is waiting.
    gate: Option<(u64, JsFuture, Pin<Box<Delay>>)>,
}

impl<T> Gated<T> {
    /// Wraps `inner`, owned by the request numbered `owner`.
    pub fn new(owner: u64, inner: T) -> Gated<T> {
        Gated {
            inner: Box::pin(inner),
            owner,
            gate: None,
        }
    }

    /// Polls `step` with a gate waker, waiting behind the gate first if one is closed.
    fn drive<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut step: impl FnMut(Pin<&mut T>, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        loop {
            if let Some((id, gate, timer)) = self.gate.as_mut() {
                let opened = Pin::new(gate).poll(cx).is_ready();
                if !opened && timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                close_gate(*id);
                self.gate = None;
            }
            let (id, gate, waker) = open_gate(self.owner);
            let outer = RUNNING.replace(Some(self.owner));
            let polled = step(self.inner.as_mut(), &mut Context::from_waker(&waker));
            RUNNING.set(outer);
            match polled {
                Poll::Ready(out) => {
                    close_gate(id);
                    return Poll::Ready(out);
                }
                Poll::Pending => self.gate = Some((id, gate, Box::pin(Delay::from(POLL_INTERVAL)))),
            }
        }
    }
}

impl<T> Drop for Gated<T> {
    fn drop(&mut self) {
        if let Some((id, _, _)) = self.gate.take() {
            close_gate(id);
        }
    }
}

impl<T: Future> Future for Gated<T> {
    type Output = T::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Output> {
        self.drive(cx, |inner, cx| inner.poll(cx))
    }
}

impl<T: Stream> Stream for Gated<T> {
    type Item = T::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T::Item>> {
        self.drive(cx, |inner, cx| inner.poll_next(cx))
    }
}
