//! The native audit log: one JSON line per pull (manifest, blob, tag list, chart), webhook,
//! token request, admin action and refusal, appended to `<data_dir>/audit.log` (or the
//! configured `audit_log`; `-` for stderr). Records carry identity, client address,
//! repository, reference, digest, bytes and cache outcome; never a credential.
//!
//! Records are queued for a writer thread ([`AuditSink`]): a full queue drops records and
//! counts them rather than blocking a request, and SIGHUP reopens the file (rotation). The
//! writer paces itself like the log's ([`BATCH_PAUSE`]): a batch, then a pause.
//!
//! A record is serialized straight from [`Record`] (no intermediate `serde_json::Value`), its
//! keys in alphabetical order: the order a `Value` object (a `BTreeMap`) printed them in
//! before, which readers of existing files may rely on.

use crate::core::time::rfc3339;
use crate::native::logging::BATCH_PAUSE;
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Records queued for the writer thread; when it is full, new records are dropped and
/// counted ([`AuditSink::dropped`], `pullgate_audit_dropped_total`), never waited for.
pub const QUEUED_RECORDS: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    /// Wakes the writer to look at the reopen flag.
    Wake,
    /// Flush, then answer.
    Sync(std::sync::mpsc::Sender<()>),
    /// Flush and stop.
    Stop,
}

struct Shared {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
    reopen: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Where audit records go: a bounded queue in front of a writer thread, so a request never
/// waits on the disk. Clones share the queue (one per worker thread, one writer per
/// process). On SIGHUP ([`watch_hangup`](AuditSink::watch_hangup)) the writer reopens the
/// file by its path, so `logrotate`'s move-then-signal works without `copytruncate`.
#[derive(Clone)]
pub struct AuditSink {
    shared: Arc<Shared>,
}

/// The destination: a file opened for appending, or stderr (`-`).
enum Out {
    File(PathBuf, BufWriter<File>),
    Stderr(std::io::Stderr),
}

impl Out {
    fn open(path: &Path) -> Result<Out, String> {
        if path.as_os_str() == "-" {
            return Ok(Out::Stderr(std::io::stderr()));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("opening the audit log {}: {e}", path.display()))?;
        Ok(Out::File(path.to_path_buf(), BufWriter::new(file)))
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File(_, w) => w.write_all(line),
            // One write call per record, so lines never interleave with the log's.
            Out::Stderr(e) => e.write_all(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(_, w) => w.flush(),
            Out::Stderr(e) => e.flush(),
        }
    }

    /// Reopens the file by its path (after a rotation moved it away).
    fn reopen(&mut self) {
        let Out::File(path, w) = self else { return };
        let _ = w.flush();
        match Out::open(path) {
            Ok(fresh) => {
                *self = fresh;
                tracing::info!(path = %path_of(self), "audit log reopened");
            }
            Err(e) => tracing::warn!("{e}; still writing to the old file"),
        }
    }
}

fn path_of(out: &Out) -> String {
    match out {
        Out::File(p, _) => p.display().to_string(),
        Out::Stderr(_) => "-".into(),
    }
}

/// The writer thread: writes what is queued, flushes whenever the queue is empty, then
/// pauses `pause` before taking the next batch.
fn write_loop(mut out: Out, rx: Receiver<Msg>, reopen: Arc<AtomicBool>, pause: Duration) {
    let mut failed = false;
    let mut handle = |out: &mut Out, msg: Msg| -> bool {
        if reopen.swap(false, Ordering::AcqRel) {
            out.reopen();
        }
        match msg {
            Msg::Line(line) => match out.write(&line) {
                Ok(()) => failed = false,
                Err(e) if !failed => {
                    // Once per run of failures, not once per record.
                    failed = true;
                    tracing::warn!("audit log write failed: {e}");
                }
                Err(_) => {}
            },
            Msg::Wake => {}
            Msg::Sync(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
            Msg::Stop => return false,
        }
        true
    };
    while let Ok(msg) = rx.recv() {
        let mut go_on = handle(&mut out, msg);
        while go_on {
            match rx.try_recv() {
                Ok(msg) => go_on = handle(&mut out, msg),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let _ = out.flush();
        if !go_on {
            return;
        }
        std::thread::sleep(pause);
    }
    let _ = out.flush();
}

impl AuditSink {
    /// Opens `path` for appending (`-`: stderr) and starts the writer thread.
    pub fn open(path: &Path) -> Result<AuditSink, String> {
        let out = Out::open(path)?;
        let (tx, rx) = sync_channel(QUEUED_RECORDS);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        let writer = std::thread::Builder::new()
            .name("pullgate-audit".into())
            .spawn(move || write_loop(out, rx, flag, BATCH_PAUSE))
            .map_err(|e| format!("starting the audit log writer: {e}"))?;
        Ok(AuditSink {
            shared: Arc::new(Shared {
                tx,
                dropped: AtomicU64::new(0),
                reopen,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Queues one record (serialized as one line of JSON); drops (and counts) it when the
    /// queue is full.
    pub fn record<R: Serialize>(&self, record: &R) {
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        if serde_json::to_writer(&mut line, record).is_err() {
            // Only a record type that refuses to serialize gets here; none of ours does.
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        line.push(b'\n');
        match self.shared.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues one audit record: on a worker it joins the worker's batch, written by hand (see
    /// [`Record::write_json`]); elsewhere it goes alone, as [`AuditSink::record`] sends it.
    pub fn record_entry(&self, e: &Entry<'_>) {
        let record = to_record(e);
        let batched =
            super::line_batch::append(super::line_batch::Line::Audit, |out| record.write_json(out));
        if !batched {
            self.record(&record);
        }
    }

    /// Queues `n` whole records at once (a worker's batch); drops (and counts) them when the
    /// queue is full.
    pub(crate) fn send_lines(&self, batch: Vec<u8>, n: u64) {
        if self.shared.tx.try_send(Msg::Line(batch)).is_err() {
            self.shared.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Asks the writer to reopen the file before its next write.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // A full queue will wake the writer anyway; it checks the flag on every record.
        let _ = self.shared.tx.try_send(Msg::Wake);
    }

    /// Registers for SIGHUP now (call it on a runtime, before serving: an unhandled SIGHUP
    /// ends the process) and returns the task that reopens the file on each one. Other
    /// listeners for SIGHUP (TLS reload) get the signal too.
    pub fn watch_hangup(&self) -> Result<impl std::future::Future<Output = ()>, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;
        let sink = self.clone();
        Ok(async move {
            while hup.recv().await.is_some() {
                sink.reopen();
            }
        })
    }

    /// Waits until every record queued before this call is written and flushed.
    pub fn sync(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.shared.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Writes what is queued and stops the writer (at shutdown).
    pub fn close(&self) {
        let _ = self.shared.tx.send(Msg::Stop);
        let writer = self.shared.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.join();
        }
    }
}

/// Routes that produce audit records.
pub fn is_audited(route: &str) -> bool {
    matches!(
        route,
        "manifest" | "blob" | "tags" | "helm" | "hook" | "admin" | "chain" | "token" | "denied"
    )
}

/// (repository, reference) from a registry path.
pub fn repository_and_reference(path: &str) -> (Option<&str>, Option<&str>) {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (None, None);
    };
    for marker in ["/manifests/", "/blobs/"] {
        if let Some(i) = rest.rfind(marker) {
            return (Some(&rest[..i]), Some(&rest[i + marker.len()..]));
        }
    }
    (rest.strip_suffix("/tags/list"), None)
}

/// Room for a typical record, so serializing one allocates once.
const LINE_CAPACITY: usize = 384;

/// Facts for one record.
pub struct Entry<'a> {
    /// Wall-clock time (ms).
    pub now_ms: u64,
    /// Identity.
    pub identity: Option<&'a str>,
    /// Client address.
    pub ip: Option<std::net::IpAddr>,
    /// Method.
    pub method: &'a str,
    /// Path (no query: it may carry nothing secret, but keep records small).
    pub path: &'a str,
    /// Route kind.
    pub route: &'a str,
    /// Upstream.
    pub upstream: Option<&'a str>,
    /// Response status.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// Cache outcome.
    pub cache: &'a str,
    /// Digest served (manifest digest header, or the blob's).
    pub digest: Option<&'a str>,
    /// The body was cut short.
    pub aborted: bool,
}

/// One audit record as written: the JSON object's keys in alphabetical order (see the module
/// doc); absent values are `null`.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    aborted: bool,
    bytes: u64,
    cache: &'a str,
    digest: Option<&'a str>,
    identity: Option<&'a str>,
    /// Serialized with `Display` (`203.0.113.7`, `::1`).
    ip: Option<std::net::IpAddr>,
    method: &'a str,
    path: &'a str,
    reference: Option<&'a str>,
    repository: Option<&'a str>,
    route: &'a str,
    status: u16,
    #[serde(rename = "ts", serialize_with = "as_rfc3339")]
    now_ms: u64,
    upstream: Option<&'a str>,
}

fn as_rfc3339<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*ms))
}

impl Record<'_> {
    /// The record as one line of JSON, newline included: byte for byte what `serde_json`
    /// writes for it, without its run-time key escaping and field dispatch (every audited
    /// request writes one).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use super::access_line::{ip, itoa};
        fn string(out: &mut Vec<u8>, key: &[u8], v: &str) {
            out.extend_from_slice(key);
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        }
        fn opt(out: &mut Vec<u8>, key: &[u8], v: Option<&str>) {
            match v {
                Some(v) => string(out, key, v),
                None => {
                    out.extend_from_slice(key);
                    out.extend_from_slice(b"null");
                }
            }
        }
        out.extend_from_slice(b"{\"aborted\":");
        out.extend_from_slice(if self.aborted { b"true" } else { b"false" });
        out.extend_from_slice(b",\"bytes\":");
        out.extend_from_slice(itoa(self.bytes).as_ref());
        string(out, b",\"cache\":", self.cache);
        opt(out, b",\"digest\":", self.digest);
        opt(out, b",\"identity\":", self.identity);
        out.extend_from_slice(b",\"ip\":");
        match self.ip {
            Some(a) => {
                out.push(b'"');
                ip(out, a);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        string(out, b",\"method\":", self.method);
        string(out, b",\"path\":", self.path);
        opt(out, b",\"reference\":", self.reference);
        opt(out, b",\"repository\":", self.repository);
        string(out, b",\"route\":", self.route);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa(self.status.into()).as_ref());
        out.extend_from_slice(b",\"ts\":\"");
        out.extend_from_slice(&crate::core::time::rfc3339_millis(self.now_ms));
        out.push(b'"');
        opt(out, b",\"upstream\":", self.upstream);
        out.extend_from_slice(b"}\n");
    }
}

/// The record for an entry.
pub fn to_record<'a>(e: &Entry<'a>) -> Record<'a> {
    let (repository, reference) = repository_and_reference(e.path);
    Record {
        aborted: e.aborted,
        bytes: e.bytes,
        cache: e.cache,
        digest: e.digest,
        identity: e.identity,
        ip: e.ip,
        method: e.method,
        path: e.path,
        reference,
        repository,
        route: e.route,
        status: e.status,
        now_ms: e.now_ms,
        upstream: e.upstream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The record as it was built before [`Record`]: a `serde_json::Value` object.
    fn as_value(e: &Entry<'_>) -> serde_json::Value {
        let (repository, reference) = repository_and_reference(e.path);
        json!({
            "ts": rfc3339(e.now_ms),
            "identity": e.identity,
            "ip": e.ip.map(|i| i.to_string()),
            "method": e.method,
            "route": e.route,
            "path": e.path,
            "upstream": e.upstream,
            "repository": repository,
            "reference": reference,
            "digest": e.digest,
            "status": e.status,
            "bytes": e.bytes,
            "cache": e.cache,
            "aborted": e.aborted,
        })
    }

    #[test]
    fn records_are_byte_for_byte_what_the_json_value_printed() {
        let full = Entry {
            now_ms: 1_795_305_662_003,
            identity: Some("ci \"bot\"\n\u{1}é"),
            ip: Some("2001:db8::7".parse().unwrap()),
            method: "GET",
            path: "/v2/library/alpine/manifests/3.20",
            route: "manifest",
            upstream: Some("docker.io"),
            status: 200,
            bytes: 527,
            cache: "hit",
            digest: Some("sha256:ab"),
            aborted: true,
        };
        let bare = Entry {
            now_ms: 0,
            identity: None,
            ip: None,
            method: "POST",
            path: "/hooks/app\\x\t",
            route: "hook",
            upstream: None,
            status: 401,
            bytes: 0,
            cache: "-",
            digest: None,
            aborted: false,
        };
        let v4 = Entry {
            ip: Some("203.0.113.7".parse().unwrap()),
            path: "/v2/a/b/tags/list",
            ..bare
        };
        for e in [&full, &v4, &bare] {
            let line = serde_json::to_string(&to_record(e)).unwrap();
            assert_eq!(line, as_value(e).to_string());
            // The hand-written line is the same bytes, with its newline.
            let mut fast = Vec::new();
            to_record(e).write_json(&mut fast);
            assert_eq!(String::from_utf8(fast).unwrap(), format!("{line}\n"));
        }
        assert_eq!(
            serde_json::to_string(&to_record(&full)).unwrap(),
            "{\"aborted\":true,\"bytes\":527,\"cache\":\"hit\",\"digest\":\"sha256:ab\",\
             \"identity\":\"ci \\\"bot\\\"\\n\\u0001é\",\"ip\":\"2001:db8::7\",\"method\":\"GET\",\
             \"path\":\"/v2/library/alpine/manifests/3.20\",\"reference\":\"3.20\",\
             \"repository\":\"library/alpine\",\"route\":\"manifest\",\"status\":200,\
             \"ts\":\"2026-11-22T00:01:02.003Z\",\"upstream\":\"docker.io\"}"
        );
    }

    #[test]
    fn paths_split_into_repository_and_reference() {
        assert_eq!(
            repository_and_reference("/v2/library/alpine/manifests/3.20"),
            (Some("library/alpine"), Some("3.20"))
        );
        assert_eq!(
            repository_and_reference("/v2/ghcr.io/o/a/blobs/sha256:ab"),
            (Some("ghcr.io/o/a"), Some("sha256:ab"))
        );
        assert_eq!(
            repository_and_reference("/v2/x/tags/list"),
            (Some("x"), None)
        );
        assert_eq!(repository_and_reference("/hooks/app"), (None, None));
    }

    #[test]
    fn records_are_written_by_the_writer_and_the_file_is_reopened_after_a_move() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::open(&path).unwrap();
        sink.record(&json!({"n": 1}));
        let moved = dir.path().join("audit.log.1");
        // Flushes and stops the writer, so the first record is on disk before the move.
        let second = sink.clone();
        sink.close();
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "{\"n\":1}\n");
        // A closed writer drops (and counts) what comes after.
        second.record(&json!({"n": 2}));
        assert_eq!(second.dropped(), 1);

        let sink = AuditSink::open(&path).unwrap();
        sink.record(&json!({"n": 3}));
        sink.sync();
        let moved2 = dir.path().join("audit.log.2");
        std::fs::rename(&path, &moved2).unwrap();
        sink.reopen();
        sink.record(&json!({"n": 4}));
        sink.close();
        assert_eq!(std::fs::read_to_string(&moved2).unwrap(), "{\"n\":3}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":4}\n");
    }
}
