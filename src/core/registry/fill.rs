//! One blob fill's shared state and its readers: the upstream transfer (`transfer.rs`) feeds
//! a [`Fill`]; every requester entitled to it reads the growing blob through [`fill_stream`]:
//! the newest bytes straight from the chunks in memory (a bounded window), older ones back
//! from the staged write. Readers never get the last [`HOLDBACK`] bytes (of the blob, and of
//! their range) before the digest is verified. This file does no IO of its own besides the
//! reads of the staged or committed blob, and imports no request context.

use crate::core::error::RegistryError;
use crate::core::ports::{
    BlobStore, BodyError, ByteStream, FillCoordinator, FillWatch, HostFill, LocalFills, TailReader,
};
use crate::core::registry::reference::{Digest, Name};
use bytes::Bytes;
use futures_util::future::poll_fn;
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Bytes withheld from readers until the digest is verified.
pub const HOLDBACK: u64 = 64 * 1024;
/// Largest read from the staged write.
pub const CHUNK: usize = 512 * 1024;
/// Written bytes kept in memory for readers that keep up.
pub const WINDOW: u64 = 4 << 20;
/// Most bytes received but not yet written before the receiver waits.
pub const MAX_UNPERSISTED: u64 = 16 << 20;
/// Where a fill is.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    Connecting,
    Streaming,
    Done,
    Failed(RegistryError),
}

pub(crate) struct FillState {
    pub phase: Phase,
    pub size: Option<u64>,
    /// Bytes taken from the upstream.
    pub received: u64,
    /// Bytes the writer has written (readable through `tail`).
    pub persisted: u64,
    /// The newest chunks, in order; `recent_start` is the offset of the first.
    pub recent: VecDeque<Bytes>,
    pub recent_start: u64,
    pub tail: Option<Rc<dyn TailReader>>,
    /// Set when the host fills the blob in its runtime ([`HostFill`]): no byte passes through
    /// this fill; one client takes the host's live body, the others wait for the outcome and
    /// read the store.
    pub host: Option<Rc<dyn HostFill>>,
}

impl FillState {
    /// The chunks not yet written, and the offset they reach.
    pub fn unpersisted(&self) -> (Vec<Bytes>, u64) {
        let mut off = self.recent_start;
        let mut out = Vec::new();
        for c in &self.recent {
            if off >= self.persisted {
                out.push(c.clone());
            }
            off += c.len() as u64;
        }
        (out, off)
    }

    /// Drops written chunks beyond the window.
    pub fn trim(&mut self) {
        while let Some(front) = self.recent.front() {
            let len = front.len() as u64;
            let in_memory = self.received - self.recent_start;
            if self.recent_start + len > self.persisted || in_memory - len < WINDOW {
                break;
            }
            self.recent.pop_front();
            self.recent_start += len;
        }
    }

    /// Bytes at `pos` (up to `limit`) from memory, if they are there.
    fn in_memory(&self, pos: u64, limit: u64) -> Option<Bytes> {
        if pos < self.recent_start {
            return None;
        }
        let mut off = self.recent_start;
        for c in &self.recent {
            let end = off + c.len() as u64;
            if pos < end {
                let from = (pos - off) as usize;
                let to = (limit.min(end) - off) as usize;
                return Some(c.slice(from..to));
            }
            off = end;
        }
        None
    }
}

/// One upstream transfer of one digest, shared by every reader entitled to it.
pub(crate) struct Fill {
    /// The upstream (index) and repository the transfer is made for.
    up: usize,
    name: Name,
    pub state: RefCell<FillState>,
    pub version: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Fill {
    pub fn new(up: usize, name: Name) -> Rc<Fill> {
        Rc::new(Fill {
            up,
            name,
            state: RefCell::new(FillState {
                phase: Phase::Connecting,
                size: None,
                received: 0,
                persisted: 0,
                recent: VecDeque::new(),
                recent_start: 0,
                tail: None,
                host: None,
            }),
            version: Cell::new(0),
            wakers: RefCell::new(Vec::new()),
        })
    }

    /// Was this fill started for the request's own repository? Then the upstream's answer to
    /// the fill's GET is the entitlement.
    pub fn is_for(&self, up: usize, name: &Name) -> bool {
        self.up == up && self.name == *name
    }

    pub fn update(&self, f: impl FnOnce(&mut FillState)) {
        f(&mut self.state.borrow_mut());
        self.version.set(self.version.get() + 1);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once the state changed after `seen`.
    pub async fn changed(&self, seen: u64) {
        poll_fn(|cx| {
            if self.version.get() != seen {
                Poll::Ready(())
            } else {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until the fill ended: `Ok` once the blob is verified and committed.
    pub async fn wait_done(&self) -> Result<(), RegistryError> {
        loop {
            let seen = self.version.get();
            match &self.state.borrow().phase {
                Phase::Done => return Ok(()),
                Phase::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            self.changed(seen).await;
        }
    }

    /// Waits until the upstream answered (or the fill failed).
    pub async fn wait_started(&self) -> Result<(), RegistryError> {
        loop {
            let seen = self.version.get();
            match &self.state.borrow().phase {
                Phase::Connecting => {}
                Phase::Failed(e) => return Err(e.clone()),
                _ => return Ok(()),
            }
            self.changed(seen).await;
        }
    }
}

/// The instance's [`FillCoordinator`], kept in a typed slot: hosts with several instances in
/// one process set it (`App::with_fill_coordinator`); the default, [`LocalFills`], leads
/// every claim.
pub(crate) struct FillPort(pub RefCell<Rc<dyn FillCoordinator>>);

impl Default for FillPort {
    fn default() -> Self {
        FillPort(RefCell::new(Rc::new(LocalFills)))
    }
}

/// Mirrors another instance's fill into the local `fill` until it ends: its readers then read
/// the lead's staged write (only what the lead persisted), and still get the last
/// [`HOLDBACK`] bytes only once the lead reports the blob verified and committed.
pub(crate) async fn follow(fill: &Fill, watch: Box<dyn FillWatch>) {
    loop {
        let p = watch.progress();
        let tail = match fill.state.borrow().tail.is_none() && p.started {
            true => watch.tail(),
            false => None,
        };
        fill.update(|s| {
            if tail.is_some() {
                s.tail = tail;
            }
            if p.started {
                s.size = p.size;
                if matches!(s.phase, Phase::Connecting) {
                    s.phase = Phase::Streaming;
                }
            }
            // Nothing is held in memory here: every byte comes from the staged write.
            s.persisted = p.persisted;
            s.received = p.persisted;
            s.recent_start = p.persisted;
            match &p.outcome {
                Some(Ok(())) => s.phase = Phase::Done,
                Some(Err(e)) => s.phase = Phase::Failed(e.clone()),
                None => {}
            }
        });
        if p.outcome.is_some() {
            return;
        }
        watch.changed().await;
    }
}

/// What a reader does next.
enum Step {
    Chunk(Bytes),
    ReadStaged(Rc<dyn TailReader>, u64, usize),
    ReadCommitted(u64),
    Fail(String),
    End,
    Wait(u64),
}

/// Where a fill reader gets its next bytes.
enum ReadState {
    /// From the fill, at this offset.
    Fill(u64),
    /// From the committed blob (a store without a tail reader, reader behind the window).
    Store(ByteStream),
}

/// A stream of bytes `[start, end)` of a fill as it grows (`end` None: to the end). Bytes come
/// from memory when the reader keeps up, from the staged write when it falls behind, or, for
/// a store that cannot read a write in progress, from the committed blob once it is verified.
pub(crate) fn fill_stream(
    fill: Rc<Fill>,
    blobs: Rc<dyn BlobStore>,
    digest: Digest,
    start: u64,
    end: Option<u64>,
) -> ByteStream {
    futures_util::stream::unfold(Some(ReadState::Fill(start)), move |state| {
        let fill = fill.clone();
        let blobs = blobs.clone();
        let digest = digest.clone();
        async move {
            let pos = match state? {
                ReadState::Store(mut s) => {
                    return s.next().await.map(|item| {
                        let next = item.is_ok().then_some(ReadState::Store(s));
                        (item, next)
                    });
                }
                ReadState::Fill(pos) => pos,
            };
            loop {
                let step = {
                    let s = fill.state.borrow();
                    let (limit, finished) = match &s.phase {
                        Phase::Failed(e) => (0, Err(e.to_string())),
                        Phase::Done => (s.received, Ok(true)),
                        // Unverified: hold back the fill's newest bytes, and the last bytes
                        // of this response, so it cannot complete before the digest checks.
                        _ => {
                            let own = end.map_or(u64::MAX, |e| e.saturating_sub(HOLDBACK));
                            (s.received.saturating_sub(HOLDBACK).min(own), Ok(false))
                        }
                    };
                    let limit = end.map_or(limit, |e| e.min(limit));
                    match finished {
                        Err(e) => Step::Fail(e),
                        Ok(done) if pos < limit => match (s.in_memory(pos, limit), &s.tail) {
                            (Some(b), _) => Step::Chunk(b),
                            (None, Some(tail)) => {
                                let upto = limit.min(s.recent_start).min(s.persisted);
                                Step::ReadStaged(
                                    tail.clone(),
                                    pos,
                                    (upto - pos).min(CHUNK as u64) as usize,
                                )
                            }
                            (None, None) if done => Step::ReadCommitted(limit),
                            (None, None) => Step::Wait(fill.version.get()),
                        },
                        Ok(true) => Step::End,
                        Ok(false) => Step::Wait(fill.version.get()),
                    }
                };
                return match step {
                    Step::Chunk(b) => {
                        let next = pos + b.len() as u64;
                        Some((Ok(b), Some(ReadState::Fill(next))))
                    }
                    Step::ReadStaged(tail, at, want) => match tail.read_at(at, want).await {
                        Ok(b) if !b.is_empty() => {
                            let next = at + b.len() as u64;
                            Some((Ok(b), Some(ReadState::Fill(next))))
                        }
                        Ok(_) => Some((
                            Err(BodyError("staged blob shorter than written".into())),
                            None,
                        )),
                        Err(e) => Some((Err(BodyError(e.to_string())), None)),
                    },
                    Step::ReadCommitted(limit) => match blobs.read(&digest, pos, limit).await {
                        Ok(Some(mut s)) => s.next().await.map(|item| {
                            let next = item.is_ok().then_some(ReadState::Store(s));
                            (item, next)
                        }),
                        Ok(None) => Some((
                            Err(BodyError(format!("blob {digest} vanished after its fill"))),
                            None,
                        )),
                        Err(e) => Some((Err(BodyError(e.to_string())), None)),
                    },
                    Step::Fail(e) => Some((Err(BodyError(e)), None)),
                    Step::End => None,
                    Step::Wait(seen) => {
                        fill.changed(seen).await;
                        continue;
                    }
                };
            }
        }
    })
    .boxed_local()
}
