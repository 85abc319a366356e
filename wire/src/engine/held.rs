//! Calls held for an endpoint, as fanout-proxy holds them. A call that finds no endpoint
//! ready waits: a `waitForReady` method until its deadline (then DEADLINE_EXCEEDED, as gRPC
//! clients end such a call), any other while an endpoint is still making its first
//! connection, up to the connect timeout (then UNAVAILABLE). With no endpoint on the way it is
//! answered UNAVAILABLE at once. The call opens on the first endpoint that becomes ready.
//!
//! Meanwhile the request's body is held without crediting the client, so the stream's window
//! bounds what one held call keeps. The client may cancel a held call; its connection ending
//! forgets its held calls.
//!
//! A call that waits out a retry policy's backoff (`policy.rs`) is held the same way: when
//! the backoff ends it opens on another endpoint, or on the same one if no other is ready, or
//! its client gets the failed attempt's answer when none is.

use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::BytesMut;

use super::deadline::{self, Deadline, Kind};
use super::open::{self, Opening};
use super::policy::Fallback;
use super::{Conn, Forwarder, STREAM_WINDOW, answer, streams};
use crate::frame;

/// A call waiting for an endpoint.
pub struct Held {
    conn: Weak<Conn>,
    stream: u32,
    opening: Opening,
    /// The request's body as it came meanwhile, and whether it ended.
    body: BytesMut,
    body_end: bool,
    wait_for_ready: bool,
    /// Ends the wait; none for a `waitForReady` call without a deadline.
    _timer: Option<Deadline>,
    /// A retry's backoff: the attempt's endpoint, and what the client gets if no endpoint is
    /// ready when it ends.
    retry: Option<(Weak<Conn>, Fallback)>,
}

impl Held {
    /// Bytes of its body the client was not credited for yet.
    fn uncredited(&self) -> usize {
        if self.opening.replayed {
            0
        } else {
            self.body.len()
        }
    }
}

/// No endpoint is ready for the client's new `stream`: it waits if it may, else is answered
/// UNAVAILABLE at once.
pub fn hold(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32, opening: Opening, wait_for_ready: bool) {
    let connecting = fwd.endpoints.borrow().iter().any(|e| !e.is_settled());
    let until = if wait_for_ready {
        opening.deadline
    } else if connecting {
        let limit = opening.arrived + fwd.settings().connect_timeout;
        Some(
            opening
                .deadline
                .map_or(limit, |deadline| deadline.min(limit)),
        )
    } else {
        let message = fwd.calls.no_endpoint(answer::UNAVAILABLE);
        answer::end_call(conn, stream, opening.end, answer::UNAVAILABLE, &message);
        return;
    };
    let timer = until.map(|at| fwd.deadlines.insert(at, conn, stream, Kind::Held));
    conn.held.set(conn.held.get() + 1);
    fwd.held.borrow_mut().push(Held {
        conn: Rc::downgrade(conn),
        stream,
        body_end: false,
        opening,
        body: BytesMut::new(),
        wait_for_ready,
        _timer: timer,
        retry: None,
    });
}

/// The call of `client`'s `stream` goes again after `delay` (a retry policy's backoff), to an
/// endpoint other than `avoid`'s when one is ready; its route is forgotten meanwhile. It must
/// be kept whole (`replay.rs`) and its request ended.
pub fn retry_later(
    fwd: &Forwarder,
    client: &Rc<Conn>,
    stream: u32,
    delay: Duration,
    avoid: &Rc<Conn>,
    fallback: Fallback,
) {
    // `after_failure` found the request kept whole on this route.
    let Some(mut route) = client.routes.borrow_mut().remove(&stream) else {
        return;
    };
    let Some(replay) = route.replay.take() else {
        client.routes.borrow_mut().insert(stream, route);
        return;
    };
    // Whatever of the answer waited for the client (nothing, before a Trailers-Only answer)
    // is dropped with the attempt.
    streams::give_back(fwd, &route);
    let (frames, body, body_end, reopens, arrived) = replay.into_parts();
    let opening = Opening {
        frames,
        // The request ended in its headers when no DATA ended it.
        end: !body_end,
        arrived,
        deadline: route.deadline.as_ref().map(|d| d.at()),
        idle: fwd.settings().idle_timeout,
        retry: route.retry.take(),
        reopens: reopens + 1,
        replayed: true,
        call: route.call.take(),
    };
    let at = tokio::time::Instant::now() + delay;
    let timer = fwd.deadlines.insert(at, client, stream, Kind::Held);
    client.held.set(client.held.get() + 1);
    fwd.held.borrow_mut().push(Held {
        conn: Rc::downgrade(client),
        stream,
        opening,
        // Credited when it first went: sent again as credited (`flow::send_replayed`).
        body,
        body_end,
        wait_for_ready: false,
        _timer: Some(timer),
        retry: Some((Rc::downgrade(avoid), fallback)),
    });
}

impl Held {
    /// It is `conn`'s `stream`.
    fn is(&self, conn: &Rc<Conn>, stream: u32) -> bool {
        self.stream == stream && std::ptr::eq(self.conn.as_ptr(), Rc::as_ptr(conn))
    }
}

/// Takes the held call of `conn`'s `stream` out of the waiting calls.
fn take(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32) -> Option<Held> {
    let mut held = fwd.held.borrow_mut();
    let at = held.iter().position(|h| h.is(conn, stream))?;
    conn.held.set(conn.held.get() - 1);
    Some(held.swap_remove(at))
}

/// DATA on a stream with no route: kept if it is a held call's (`true`), with the stream
/// error the RFC asks for when it breaks the stream's state or window.
pub fn on_data(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32, data: &[u8], end: bool) -> bool {
    if conn.held.get() == 0 {
        return false;
    }
    let fault = {
        let mut held = fwd.held.borrow_mut();
        let Some(call) = held.iter_mut().find(|h| h.is(conn, stream)) else {
            return false;
        };
        if call.body_end || call.opening.end {
            Some(frame::STREAM_CLOSED)
        } else if call.body.len() + data.len() > STREAM_WINDOW as usize {
            Some(frame::FLOW_CONTROL_ERROR)
        } else {
            call.body.extend_from_slice(data);
            call.body_end = end;
            None
        }
    };
    if let Some(code) = fault {
        reset(fwd, conn, stream, code);
    }
    true
}

/// Forgets the held call of `conn`'s `stream`, if there is one, and resets it with `code`.
pub fn reset(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32, code: u32) {
    if let Some(call) = take(fwd, conn, stream) {
        // What it held was never credited: the connection gets that window back.
        super::flow::credit(fwd, conn, stream, call.uncredited());
        frame::put_rst(&mut conn.out.borrow_mut(), stream, code);
        fwd.mark(conn);
    }
}

/// The client reset `stream`: if it was held, it waits no more.
pub fn cancel(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32) {
    if let Some(call) = take(fwd, conn, stream) {
        super::flow::credit(fwd, conn, stream, call.uncredited());
    }
}

/// The held call of `conn`'s `stream` waited as long as it may.
pub fn expire(fwd: &Forwarder, conn: &Rc<Conn>, stream: u32) {
    let Some(mut call) = take(fwd, conn, stream) else {
        return;
    };
    if let Some((avoid, fallback)) = call.retry.take() {
        retry_now(fwd, conn, call, &avoid, fallback);
        return;
    }
    super::flow::credit(fwd, conn, stream, call.uncredited());
    if call.wait_for_ready {
        // As gRPC clients end a waitForReady call that found no endpoint within its deadline.
        fwd.calls.no_endpoint(answer::DEADLINE_EXCEEDED);
        answer::end_call(
            conn,
            stream,
            call.body_end,
            answer::DEADLINE_EXCEEDED,
            deadline::MESSAGE,
        );
    } else {
        let message = fwd.calls.no_endpoint(answer::UNAVAILABLE);
        answer::end_call(conn, stream, call.body_end, answer::UNAVAILABLE, &message);
    }
    fwd.mark(conn);
}

/// `conn` ended: its held calls go with it.
pub fn forget(fwd: &Forwarder, conn: &Rc<Conn>) {
    if conn.held.get() > 0 {
        fwd.held
            .borrow_mut()
            .retain(|h| !std::ptr::eq(h.conn.as_ptr(), Rc::as_ptr(conn)));
        conn.held.set(0);
    }
}

/// An endpoint became ready: the held calls open, while one is ready.
pub fn open_waiting(fwd: &Forwarder) {
    if fwd.held.borrow().is_empty() {
        return;
    }
    let waiting = std::mem::take(&mut *fwd.held.borrow_mut());
    let mut still = Vec::new();
    for call in waiting {
        let Some(conn) = call.conn.upgrade() else {
            continue;
        };
        // A retry waits out its backoff, endpoint ready or not.
        if call.retry.is_some() {
            still.push(call);
            continue;
        }
        let picked = fwd.pick();
        let Some((picked, endpoint)) = picked.and_then(|p| Some((p.clone(), p.ready_conn()?)))
        else {
            still.push(call);
            continue;
        };
        conn.held.set(conn.held.get() - 1);
        let clock = fwd.picker.clock();
        let Held {
            stream,
            opening,
            body,
            body_end,
            ..
        } = call;
        open::open_on(
            fwd,
            &conn,
            stream,
            (picked, &endpoint),
            opening,
            (&body, body_end),
            &clock,
        );
        fwd.mark(&conn);
    }
    fwd.held.borrow_mut().extend(still);
}

/// A retry's backoff ended: the call opens on an endpoint other than `avoid` if one is ready,
/// else on any ready one, else its client gets `fallback`.
fn retry_now(fwd: &Forwarder, conn: &Rc<Conn>, call: Held, avoid: &Weak<Conn>, fallback: Fallback) {
    let others: Vec<_> = fwd
        .endpoints
        .borrow()
        .iter()
        .filter(|e| {
            e.ready_conn()
                .is_some_and(|c| !std::ptr::eq(Rc::as_ptr(&c), avoid.as_ptr()))
        })
        .cloned()
        .collect();
    let picked = fwd.picker.pick(&others).or_else(|| fwd.pick());
    let Some((picked, endpoint)) = picked.and_then(|p| Some((p.clone(), p.ready_conn()?))) else {
        match fallback {
            Fallback::Answer(frames) => conn.out.borrow_mut().extend_from_slice(&frames),
            Fallback::Reset(code) => frame::put_rst(&mut conn.out.borrow_mut(), call.stream, code),
            Fallback::Status(code, message) => {
                answer::end_call(conn, call.stream, true, code, message)
            }
        }
        fwd.mark(conn);
        return;
    };
    let clock = fwd.picker.clock();
    open::open_on(
        fwd,
        conn,
        call.stream,
        (picked, &endpoint),
        call.opening,
        (&call.body, call.body_end),
        &clock,
    );
    fwd.mark(conn);
}
