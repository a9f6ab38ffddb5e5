//! Per-worker batches of the two lines every request writes: its access line and its audit
//! record. A worker appends them to buffers of its own and hands each buffer to its writer
//! thread in one message: [`BATCH_PAUSE`] after the first line of a batch (a task of the
//! worker's waits that long), as soon as a buffer reaches [`FLUSH_AT`], before any other log
//! line of the worker (so a worker's lines keep their order), and when the worker ends.
//!
//! Per line, that is one append instead of an allocation and a message through a channel
//! shared by every worker (and the writer threads take a few large messages instead of one per
//! request). A line waits at most [`BATCH_PAUSE`] longer than it did; the writer threads
//! already batch with the same pause. Threads that are not workers (tests, the blocking
//! pool) batch nothing: their lines go out one by one, as before.

use super::audit::AuditSink;
use super::logging::BATCH_PAUSE;
use std::cell::RefCell;
use std::rc::Rc;

/// A buffer is handed to its writer at this size, without waiting for the pause.
pub const FLUSH_AT: usize = 32 << 10;

/// Which of the two lines.
#[derive(Clone, Copy)]
pub(crate) enum Line {
    Access,
    Audit,
}

struct Batch {
    access: Vec<u8>,
    audit: Vec<u8>,
    audit_lines: u64,
    /// A flush is due (the flusher was woken for the current batch).
    armed: bool,
    wake: Rc<tokio::sync::Notify>,
    sink: AuditSink,
}

impl Batch {
    fn flush(&mut self, kind: Line) {
        match kind {
            Line::Access => {
                if !self.access.is_empty() {
                    super::access_line::send(&self.access);
                    self.access.clear();
                }
            }
            Line::Audit => {
                if !self.audit.is_empty() {
                    let lines = std::mem::take(&mut self.audit_lines);
                    self.sink.send_lines(std::mem::take(&mut self.audit), lines);
                }
            }
        }
    }
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// This thread's batching, while it lives; dropping it hands over what is left.
pub(crate) struct Batching(());

/// Makes this thread (a worker) batch its lines; audit records go to `sink`. Spawn
/// [`flusher`] on the worker's `LocalSet`.
pub(crate) fn install(sink: AuditSink) -> Batching {
    BATCH.with(|b| {
        *b.borrow_mut() = Some(Batch {
            access: Vec::new(),
            audit: Vec::new(),
            audit_lines: 0,
            armed: false,
            wake: Rc::new(tokio::sync::Notify::new()),
            sink,
        });
    });
    Batching(())
}

impl Drop for Batching {
    fn drop(&mut self) {
        let taken = BATCH.try_with(|b| b.try_borrow_mut().ok().and_then(|mut b| b.take()));
        if let Ok(Some(mut b)) = taken {
            b.flush(Line::Access);
            b.flush(Line::Audit);
        }
    }
}

/// The task that hands this thread's batches over [`BATCH_PAUSE`] after their first line.
pub(crate) async fn flusher() {
    let Some(wake) = BATCH.with(|b| b.borrow().as_ref().map(|b| b.wake.clone())) else {
        return;
    };
    loop {
        wake.notified().await;
        tokio::time::sleep(BATCH_PAUSE).await;
        flush_all();
    }
}

fn flush_all() {
    with_batch(|b| {
        b.armed = false;
        b.flush(Line::Access);
        b.flush(Line::Audit);
    });
}

/// Hands over this thread's access lines now (before another log line of the thread).
pub(crate) fn flush_access() {
    with_batch(|b| b.flush(Line::Access));
}

/// `f` on this thread's batch; None when the thread batches nothing (or is ending, or is
/// inside another use of its batch).
fn with_batch<T>(f: impl FnOnce(&mut Batch) -> T) -> Option<T> {
    BATCH
        .try_with(|b| b.try_borrow_mut().ok()?.as_mut().map(f))
        .ok()
        .flatten()
}

/// Appends one line of `kind`, written by `write` (which must end it with a newline), to this
/// thread's batch; false, with nothing written, when this thread batches nothing.
pub(crate) fn append(kind: Line, write: impl FnOnce(&mut Vec<u8>)) -> bool {
    with_batch(|b| {
        let buf = match kind {
            Line::Access => &mut b.access,
            Line::Audit => {
                b.audit_lines += 1;
                &mut b.audit
            }
        };
        write(buf);
        if buf.len() >= FLUSH_AT {
            b.flush(kind);
        } else if !b.armed {
            b.armed = true;
            b.wake.notify_one();
        }
    })
    .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_records_reach_the_file_by_the_pause_when_full_and_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::open(&path).unwrap();
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let batching = install(sink.clone());
        local.block_on(&rt, async {
            tokio::task::spawn_local(flusher());
            assert!(append(Line::Audit, |b| b.extend_from_slice(b"{\"n\":1}\n")));
            sink.sync();
            assert_eq!(read(), "", "held for the pause");
            tokio::time::sleep(BATCH_PAUSE * 3).await;
            sink.sync();
            assert_eq!(read(), "{\"n\":1}\n", "handed over after the pause");
            // A full buffer goes at once.
            let big = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(FLUSH_AT));
            assert!(append(Line::Audit, |b| b.extend_from_slice(big.as_bytes())));
            sink.sync();
            assert_eq!(read().len(), 8 + big.len());
            assert!(append(Line::Audit, |b| b.extend_from_slice(b"{\"n\":3}\n")));
        });
        drop(batching);
        sink.sync();
        assert!(
            read().ends_with("{\"n\":3}\n"),
            "handed over when the worker ends"
        );
        // Not a worker any more: nothing is batched.
        assert!(!append(Line::Audit, |b| b.push(b'x')));
        sink.close();
    }
}
