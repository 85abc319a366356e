//! Call timers (issue 13's sprint, step 2): a call ends with DEADLINE_EXCEEDED when its
//! deadline passes — the client's `grpc-timeout`, the upstream's own timeout or the Service's
//! timeout for the method, whichever is sooner — or when nothing moved either way for the
//! idle timeout, as fanout-proxy ends it. The endpoint's stream is cancelled, and the client
//! gets the status from the proxy itself: as a Trailers-Only answer when no response headers
//! went yet, else as trailers after what went. A call held for an endpoint (`held.rs`) ends
//! when it waited its limit.
//!
//! The endpoint is told the deadline too (`grpc-timeout`), a little later than ours, so that
//! the client reliably sees the proxy's DEADLINE_EXCEEDED rather than whatever a backend
//! answers when its own timer fires at the same moment.
//!
//! One ordered map per thread holds the calls' timers; a call's entry leaves it when the call
//! ends however it ends (a guard in its route), so the map holds the calls in flight with a
//! timer and no more, and one task sleeps until the earliest. The idle timer is not moved for
//! every frame: a frame counts itself on the call (one add), and the timer, when it fires,
//! only looks whether the count changed since it was set, and if so is set again.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::report::ClientGot;
use super::{Conn, Forwarder, answer, held, policy, streams};
use crate::frame;

/// Added to the deadline passed to the endpoint; see the module's doc.
pub const SLACK: Duration = Duration::from_millis(20);

pub const MESSAGE: &[u8] = b"fanout: deadline exceeded";

type Key = (Instant, u64);

/// What a timer ends when it fires.
pub enum Kind {
    /// The call's deadline.
    Deadline,
    /// The idle timeout, set when the call's frame count (`moved`) was `seen`.
    Idle {
        moved: Rc<Cell<u64>>,
        seen: u64,
        after: Duration,
    },
    /// A call held for an endpoint waited as long as it may.
    Held,
    /// The attempt in flight got no answer within the retry policy's per-attempt timeout.
    Attempt,
}

/// A timer's call (the client's connection and stream), and what ends when it fires.
type Timer = (Weak<Conn>, u32, Kind);

/// Frames moved on a call, either way, for its idle timer: shared by both of its routes.
pub type Moved = Rc<Cell<u64>>;

/// Counts a frame moved on a call that has an idle timeout.
pub fn moved(counter: &Option<Moved>) {
    if let Some(counter) = counter {
        counter.set(counter.get() + 1);
    }
}

/// The thread's call timers.
#[derive(Default)]
pub struct Deadlines {
    /// When → the client's connection and stream, and what ends then.
    calls: RefCell<BTreeMap<Key, Timer>>,
    next: Cell<u64>,
    /// Wakes the timer task when a deadline comes before all others.
    sooner: Notify,
}

/// A call's place in [`Deadlines`]; leaves it when dropped.
pub struct Deadline {
    key: Key,
    deadlines: Rc<Deadlines>,
}

impl Deadline {
    /// When it fires.
    pub fn at(&self) -> Instant {
        self.key.0
    }
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
    /// Ends `stream` of the client's `conn` at `at` as `kind` says, unless it ended before.
    pub fn insert(
        self: &Rc<Self>,
        at: Instant,
        conn: &Rc<Conn>,
        stream: u32,
        kind: Kind,
    ) -> Deadline {
        let key = (at, self.next.replace(self.next.get() + 1));
        let mut calls = self.calls.borrow_mut();
        let soonest = calls
            .first_key_value()
            .is_none_or(|(first, _)| key < *first);
        calls.insert(key, (Rc::downgrade(conn), stream, kind));
        if soonest {
            self.sooner.notify_one();
        }
        Deadline {
            key,
            deadlines: self.clone(),
        }
    }

    /// The calls whose deadline passed, taken out of the map.
    fn expired(&self, now: Instant) -> Vec<Timer> {
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
        let now = Instant::now();
        for (conn, stream, kind) in deadlines.expired(now) {
            let Some(conn) = conn.upgrade() else {
                continue;
            };
            match kind {
                Kind::Deadline => expire(&fwd, &conn, stream, MESSAGE),
                Kind::Idle { moved, seen, after } if moved.get() != seen => {
                    // Something moved since: the timer starts again from now.
                    let seen = moved.get();
                    let kind = Kind::Idle { moved, seen, after };
                    let timer = deadlines.insert(now + after, &conn, stream, kind);
                    if let Some(route) = conn.routes.borrow_mut().get_mut(&stream) {
                        route.idle = Some(timer);
                    }
                }
                Kind::Idle { after, .. } => {
                    let message = format!(
                        "fanout: nothing moved either way for {after:?} (the idle timeout)"
                    );
                    expire(&fwd, &conn, stream, message.as_bytes());
                }
                Kind::Held => held::expire(&fwd, &conn, stream),
                Kind::Attempt => policy::attempt_timed_out(&fwd, &conn, stream),
            }
        }
        fwd.flush_dirty();
    }
}

/// The deadline of the client's `stream` passed, or its idle timeout (or its last attempt's
/// per-attempt timeout): its endpoint stream is cancelled and the client answered
/// DEADLINE_EXCEEDED with `message`, unless the answer was complete already.
pub fn expire(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32, message: &[u8]) {
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
            let endpoint = upstream.account.as_ref().map(|a| a.endpoint_addr());
            let when = if upstream.headers_seen {
                "while the response streamed"
            } else {
                "before the endpoint answered"
            };
            let reason = format!("{} {when}", String::from_utf8_lossy(message));
            let got = ClientGot::Status(4);
            fwd.calls.observer.call_failed(endpoint, got, &reason);
            answer::put_status(
                &mut out,
                stream,
                !upstream.headers_seen,
                answer::DEADLINE_EXCEEDED,
                message,
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
