//! Call deadlines (issue 13's sprint, step 2's first part): a call ends with
//! DEADLINE_EXCEEDED when its deadline passes, the client's `grpc-timeout` or the upstream's
//! own timeout, whichever is sooner, as fanout-proxy ends it. The endpoint's stream is
//! cancelled, and the client gets the status from the proxy itself: as a Trailers-Only answer
//! when no response headers went yet, else as trailers after what went.
//!
//! The endpoint is told the deadline too (`grpc-timeout`), a little later than ours, so that
//! the client reliably sees the proxy's DEADLINE_EXCEEDED rather than whatever a backend
//! answers when its own timer fires at the same moment.
//!
//! One ordered map per thread holds the calls' deadlines; a call's entry leaves it when the
//! call ends however it ends (a guard in its route), so the map holds the calls in flight with
//! a deadline and no more, and one task sleeps until the earliest.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Conn, Forwarder, answer, streams};
use crate::frame;

/// Added to the deadline passed to the endpoint; see the module's doc.
pub const SLACK: Duration = Duration::from_millis(20);

const MESSAGE: &[u8] = b"fanout: deadline exceeded";

type Key = (Instant, u64);

/// The thread's call deadlines.
#[derive(Default)]
pub struct Deadlines {
    /// Deadline → the client's connection and stream.
    calls: RefCell<BTreeMap<Key, (Weak<Conn>, u32)>>,
    next: Cell<u64>,
    /// Wakes the timer task when a deadline comes before all others.
    sooner: Notify,
}

/// A call's place in [`Deadlines`]; leaves it when dropped.
pub struct Deadline {
    key: Key,
    deadlines: Rc<Deadlines>,
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // Absent when it fired: it was taken out then.
        if let Ok(mut calls) = self.deadlines.calls.try_borrow_mut() {
            calls.remove(&self.key);
        }
    }
}

impl Deadlines {
    /// Ends `stream` of the client's `conn` at `at`, unless it ended before.
    pub fn insert(self: &Rc<Self>, at: Instant, conn: &Rc<Conn>, stream: u32) -> Deadline {
        let key = (at, self.next.replace(self.next.get() + 1));
        let mut calls = self.calls.borrow_mut();
        let soonest = calls
            .first_key_value()
            .is_none_or(|(first, _)| key < *first);
        calls.insert(key, (Rc::downgrade(conn), stream));
        if soonest {
            self.sooner.notify_one();
        }
        Deadline {
            key,
            deadlines: self.clone(),
        }
    }

    /// The calls whose deadline passed, taken out of the map.
    fn expired(&self, now: Instant) -> Vec<(Weak<Conn>, u32)> {
        let mut calls = self.calls.borrow_mut();
        let mut expired = Vec::new();
        while let Some(entry) = calls.first_entry() {
            if entry.key().0 > now {
                break;
            }
            expired.push(entry.remove());
        }
        expired
    }

    fn soonest(&self) -> Option<Instant> {
        self.calls.borrow().first_key_value().map(|(key, _)| key.0)
    }
}

/// The thread's timer: ends calls as their deadlines pass.
pub async fn run(fwd: Rc<Forwarder>) {
    let deadlines = fwd.deadlines.clone();
    loop {
        let sooner = deadlines.sooner.notified();
        match deadlines.soonest() {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = sooner => continue,
                }
            }
            None => {
                sooner.await;
                continue;
            }
        }
        for (conn, stream) in deadlines.expired(Instant::now()) {
            if let Some(conn) = conn.upgrade() {
                expire(&fwd, &conn, stream);
            }
        }
        fwd.flush_dirty();
    }
}

/// The deadline of the client's `stream` passed: its endpoint stream is cancelled and the
/// client answered DEADLINE_EXCEEDED, unless the answer was complete already.
fn expire(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32) {
    let Some(route) = conn.routes.borrow_mut().remove(&stream) else {
        return;
    };
    let upstream = route.peer.routes.borrow_mut().remove(&route.peer_stream);
    // What waited for the client's window is dropped with the route: the status goes now, in
    // place of the rest of the answer.
    streams::give_back(fwd, &route);
    if let Some(upstream) = &upstream {
        streams::give_back(fwd, upstream);
    }
    let mut out = conn.out.borrow_mut();
    match upstream {
        // The endpoint's answer is all here; only the client is still sending.
        Some(upstream) if upstream.ended => {
            frame::put_rst(&mut out, stream, frame::NO_ERROR);
        }
        None => {
            frame::put_rst(&mut out, stream, frame::NO_ERROR);
        }
        Some(mut upstream) => {
            frame::put_rst(
                &mut route.peer.out.borrow_mut(),
                route.peer_stream,
                frame::CANCEL,
            );
            fwd.mark(&route.peer);
            if let Some(account) = &mut upstream.account {
                account.set_status(Some(4));
            }
            answer::put_status(
                &mut out,
                stream,
                !upstream.headers_seen,
                answer::DEADLINE_EXCEEDED,
                MESSAGE,
                conn.peer_max_frame.get(),
            );
            if !route.ended {
                // The client may stop sending (RFC 9113 §8.1).
                frame::put_rst(&mut out, stream, frame::NO_ERROR);
            }
        }
    }
    drop(out);
    fwd.mark(conn);
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(value.checked_mul(3600)?),
        b"M" => Duration::from_secs(value.checked_mul(60)?),
        b"S" => Duration::from_secs(value),
        b"m" => Duration::from_millis(value),
        b"u" => Duration::from_micros(value),
        b"n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `timeout`, in the finest unit that fits in 8 digits.
pub fn format_timeout(timeout: Duration) -> String {
    let millis = timeout.as_millis();
    if millis < 100_000_000 {
        format!("{}m", millis.max(1))
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_refuse_the_rest() {
        assert_eq!(parse_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout(b"1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b"m"[..],
            b"100",
            b"123456789m",
            b"1x",
            b"-1S",
            b"+1S",
            b"1.5S",
            b"",
        ] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(format_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(format_timeout(Duration::from_millis(1234)), "1234m");
        assert_eq!(format_timeout(Duration::from_secs(200_000)), "200000S");
    }
}
