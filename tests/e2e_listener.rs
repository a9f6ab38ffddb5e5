//! End-to-end tests of the native listener's connection discipline (issue #9, items 6 and 7),
//! over raw TCP against the real binary: a half-sent request is closed within the header
//! timeout, an idle keep-alive connection within the idle timeout, the connection cap holds
//! new connections back until one closes, fd exhaustion neither spins nor floods the log and
//! the server recovers, and an early answer reaches a sender that is still writing.
//!
//! No upstream or client tools are needed. Timeouts under test are configured short (1 s);
//! every wait is bounded polling or a socket read with a generous bound, never a sleep.

// The harness is a host, not the core: it reads the real clock (bounds on waits).
#![allow(clippy::disallowed_methods)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::process::{poll_until, wait_for};
use support::pullgate::Pullgate;

/// Far longer than any configured timeout here: reaching it means the server never acted.
const BOUND: Duration = Duration::from_secs(30);

fn connect(pg: &Pullgate) -> TcpStream {
    let s = TcpStream::connect(pg.host()).expect("connect to pullgate");
    s.set_read_timeout(Some(BOUND)).expect("read timeout");
    s
}

/// Reads until the server closes the connection; panics if it is still open after [`BOUND`].
/// Returns what was read before the close.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection is still open after {BOUND:?}")
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Reads one response (head and a `Content-Length` body); returns (status, head).
fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("reading a response head");
        assert!(n > 0, "closed before a response head: {got:?}");
        got.push(buf[0]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("reading a response body");
    (status, head)
}

fn get_healthz(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: pullgate\r\n\r\n")
        .expect("send a request");
    read_response(s).0
}

fn has_connection_close(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
        })
    })
}

#[test]
fn half_sent_request_is_closed_within_the_header_timeout() {
    let pg = Pullgate::builder()
        .config("[server]\nheader_timeout = \"1s\"\nidle_timeout = \"1h\"\n")
        .start();
    // A request line and part of the headers, and then nothing.
    let mut half = connect(&pg);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: pull")
        .expect("send half a request");
    // A connection that never sends a byte is held to the same limit.
    let mut silent = connect(&pg);
    assert!(
        read_until_closed(&mut half).is_empty(),
        "no answer, just closed"
    );
    assert!(read_until_closed(&mut silent).is_empty());
    // Whole requests are still served.
    assert_eq!(get_healthz(&mut connect(&pg)), 200);
}

#[test]
fn trickled_request_body_is_given_up_after_the_body_timeout() {
    let pg = Pullgate::builder()
        .config(
            "[server]\nbody_timeout = \"1s\"\nidle_timeout = \"1h\"\n\n\
             [[webhook]]\nname = \"app\"\nprovider = \"github\"\nsecret = \"env:PG_HOOK_SECRET\"\n",
        )
        .env("PG_HOOK_SECRET", "s3cret")
        .start();
    // A webhook announcing 100 kB and sending a few bytes, then nothing (a slow-body attack
    // sends a byte every few seconds; nothing is the limit of that).
    let mut slow = connect(&pg);
    slow.write_all(
        b"POST /hooks/app HTTP/1.1\r\nHost: pullgate\r\nContent-Type: application/json\r\n\
          X-GitHub-Event: push\r\nX-GitHub-Delivery: 1\r\nContent-Length: 100000\r\n\r\n{\"ref\"",
    )
    .expect("send a slow request");
    let (status, _) = read_response(&mut slow);
    assert!(
        (400..500).contains(&status),
        "a stalled body gets a client error, not {status}"
    );
    read_until_closed(&mut slow);
    // Others are served meanwhile and after.
    assert_eq!(get_healthz(&mut connect(&pg)), 200);
}

#[test]
fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let pg = Pullgate::builder()
        .config("[server]\nidle_timeout = \"1s\"\n")
        .start();
    let mut s = connect(&pg);
    // Keep-alive works: two requests on one connection.
    assert_eq!(get_healthz(&mut s), 200);
    assert_eq!(get_healthz(&mut s), 200);
    // Then nothing: the server closes it.
    assert!(read_until_closed(&mut s).is_empty());
}

#[test]
fn connection_cap_holds_new_connections_until_one_closes() {
    let pg = Pullgate::builder()
        .config("[server]\nmax_connections = 2\nidle_timeout = \"1h\"\n")
        .start();
    let mut a = connect(&pg);
    let mut b = connect(&pg);
    assert_eq!(get_healthz(&mut a), 200);
    assert_eq!(get_healthz(&mut b), 200);
    // A third connection is held in the backlog: its request is not answered…
    let mut c = connect(&pg);
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: pullgate\r\n\r\n")
        .expect("send a request");
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match c.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a connection over the cap was served: {other:?}"),
    }
    // …until one of the two closes.
    drop(a);
    c.set_read_timeout(Some(BOUND)).expect("read timeout");
    assert_eq!(read_response(&mut c).0, 200);
    assert_eq!(get_healthz(&mut b), 200);
}

/// The messages of the accept reports (a log line is `time LEVEL target: message`).
fn accept_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once(": ").map(|(_, message)| message))
        .filter(|m| m.starts_with("accept "))
        .map(str::to_string)
        .collect()
}

#[test]
fn fd_exhaustion_backs_off_with_a_rate_limited_log_and_recovers() {
    let pg = Pullgate::builder()
        .config("[server]\nheader_timeout = \"1h\"\nidle_timeout = \"1h\"\n")
        .fd_limit(64)
        .start();
    // More silent connections than the process has descriptors: accept starts failing.
    let held: Vec<TcpStream> = (0..100).map(|_| connect(&pg)).collect();
    wait_for("an accept failure in the log", BOUND, || {
        (!accept_lines(&pg.stderr()).is_empty()).then_some(())
    });
    // Keep the descriptors exhausted until the next report: one line for many failures.
    let lines = wait_for("a second accept report", BOUND, || {
        let lines = accept_lines(&pg.stderr());
        (lines.len() >= 2).then_some(lines)
    });
    assert!(
        lines[0].contains("(1 times since the last report)"),
        "{lines:?}"
    );
    let retries: u64 = lines[1]
        .split('(')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", lines[1]));
    // Backing off from 10 ms to 1 s, one report interval holds a handful of retries; a
    // retry loop without back-off would make millions.
    assert!((1..100).contains(&retries), "{lines:?}");
    // Freeing the descriptors lets the server serve again.
    drop(held);
    assert!(
        poll_until(BOUND, || TcpStream::connect(pg.host())
            .ok()
            .and_then(|mut s| {
                s.set_read_timeout(Some(BOUND)).ok()?;
                Some(get_healthz(&mut s) == 200)
            })
            .unwrap_or(false)),
        "pullgate did not recover\n{}",
        pg.log_tail()
    );
    let lines = accept_lines(&pg.stderr());
    assert!(lines.len() <= 4, "{lines:?}");
}

#[test]
fn early_answer_reaches_a_sender_that_is_still_writing() {
    let pg = Pullgate::builder().start();
    // A push to a pull-through cache is refused before its body is read. The body is far
    // larger than the socket buffers, so the sender is still writing when the answer comes.
    let len: usize = 32 << 20;
    let mut s = connect(&pg);
    s.write_all(
        format!(
            "POST /v2/library/app/blobs/uploads/ HTTP/1.1\r\nHost: pullgate\r\nContent-Length: {len}\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("send the head");
    let mut writer = s.try_clone().expect("clone the socket");
    let sending = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..len / chunk.len() {
            writer.write_all(&chunk)?;
        }
        Ok::<_, std::io::Error>(())
    });
    let (status, head) = read_response(&mut s);
    assert_eq!(status, 405, "{head}");
    assert!(has_connection_close(&head), "{head}");
    sending
        .join()
        .expect("sender thread")
        .expect("the whole body was taken, no broken pipe or reset");
    // And then the connection closes cleanly.
    assert!(read_until_closed(&mut s).is_empty());
}

#[test]
fn metrics_report_what_the_store_holds_on_disk() {
    let pg = Pullgate::builder().start();
    let m = pg.metrics();
    for name in ["pullgate_store_bytes", "pullgate_store_blobs"] {
        assert!(m.has(name), "{name} missing:\n{}", m.text());
    }
    // redb's file exists from the start, so metadata is never reported as 0 bytes.
    assert!(
        m.text().lines().any(|l| l
            .strip_prefix("pullgate_store_bytes{kind=\"metadata\"} ")
            .is_some_and(|v| v.trim().parse::<u64>().is_ok_and(|n| n > 0))),
        "{}",
        m.text()
    );
    // The core's counters are still there.
    assert!(m.has("pullgate_requests_total"), "{}", m.text());
}
