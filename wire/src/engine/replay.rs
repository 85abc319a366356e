//! Retries where the request provably was not processed (issue 13's sprint, step 2), as
//! fanout-proxy makes them: an endpoint that refuses a stream with REFUSED_STREAM, or names it
//! unprocessed in a GOAWAY, has not acted on it (RFC 9113 §8.7), and a Trailers-Only
//! UNAVAILABLE answer sent no response message (gRPC's retry design allows its retry). The
//! request then opens again on another endpoint instead of failing. For that, a request is
//! kept whole (its header frames as sent, and its body while it fits in [`LIMIT`]) until its
//! endpoint answers; a request past the limit, opened again [`MAX_REOPENS`] times, with no
//! other endpoint ready, or past the retry budget (a fifth of the calls) goes to its client as
//! the endpoint answered it.

use std::rc::Rc;

use bytes::BytesMut;
use tokio::time::Instant;

use super::account::CallAccount;
use super::flow;
use super::streams::{self, Route};
use super::{Conn, Forwarder};
use crate::frame;

/// The largest request body kept for opening the request again, by default.
pub const LIMIT: usize = 64 * 1024;
/// How often one request may be opened again.
const MAX_REOPENS: u8 = 2;

/// A request kept whole while no endpoint has answered it.
pub struct Replay {
    /// Its HEADERS and CONTINUATION frames as sent (the stream id is rewritten for the next).
    headers: BytesMut,
    /// The body passed on so far.
    body: BytesMut,
    /// The body's last DATA ended the request.
    end: bool,
    reopens: u8,
    /// When the call arrived, for its duration.
    arrived: Instant,
    /// The largest body kept.
    limit: usize,
}

impl Replay {
    /// A request kept with up to `limit` bytes of body; none when `limit` is 0 (no retries).
    pub fn new(
        headers: BytesMut,
        arrived: Instant,
        reopens: u8,
        limit: usize,
    ) -> Option<Box<Replay>> {
        (limit > 0).then(|| {
            Box::new(Replay {
                headers,
                body: BytesMut::new(),
                end: false,
                reopens,
                arrived,
                limit,
            })
        })
    }

    /// The request as kept: header frames, body, whether the body ended it, its reopens and
    /// arrival.
    pub fn into_parts(self) -> (BytesMut, BytesMut, bool, u8, Instant) {
        (
            self.headers,
            self.body,
            self.end,
            self.reopens,
            self.arrived,
        )
    }

    /// Attempts of the request so far, the one in flight included.
    pub fn attempts(&self) -> u32 {
        u32::from(self.reopens) + 1
    }

    /// Keeps a piece of the body; `false` once the body is past the limit (the request can no
    /// longer be opened again).
    pub fn keep(&mut self, data: &[u8], end: bool) -> bool {
        if self.body.len() + data.len() > self.limit {
            return false;
        }
        self.body.extend_from_slice(data);
        self.end |= end;
        true
    }
}

/// An endpoint refused the stream of `forgotten` (its endpoint-side route, forgotten on the
/// endpoint's connection) without processing it: the request opens again elsewhere when it
/// can, else the client's stream is reset with REFUSED_STREAM.
pub fn refused(fwd: &Forwarder, refused_by: &Rc<Conn>, forgotten: Route, reason: &str) {
    if reopen(
        fwd,
        &forgotten.peer,
        forgotten.peer_stream,
        refused_by,
        reason,
    ) {
        // Its client's data that waited for the refusing endpoint's window was kept in the
        // replay: credited now, it is not credited again when it goes (`send_replayed`).
        streams::give_back(fwd, &forgotten);
    } else {
        streams::reset_other_side(fwd, &forgotten, frame::REFUSED_STREAM);
    }
}

/// The endpoint `conn` answered `stream` with a Trailers-Only UNAVAILABLE: the request opens
/// again elsewhere if it can (`replay.rs`), and this attempt is forgotten; `false` when it
/// cannot, and the answer goes to the client.
pub fn retry_unavailable(conn: &Rc<Conn>, fwd: &Forwarder, stream: u32) -> bool {
    let Some((client, client_stream)) = conn
        .routes
        .borrow()
        .get(&stream)
        .map(|r| (r.peer.clone(), r.peer_stream))
    else {
        return false;
    };
    let request_ended = client
        .routes
        .borrow()
        .get(&client_stream)
        .is_some_and(|r| r.ended);
    if !reopen(fwd, &client, client_stream, conn, "unavailable") {
        return false;
    }
    streams::forget_attempt(fwd, conn, stream, !request_ended, None);
    true
}

/// Opens `client`'s `stream` again on an endpoint other than `avoid`'s; `false` when the
/// request was not kept whole, was opened again too often, the budget is spent, or no other
/// endpoint is ready. A retry made is reported with `reason`.
pub fn reopen(
    fwd: &Forwarder,
    client: &Rc<Conn>,
    stream: u32,
    avoid: &Rc<Conn>,
    reason: &str,
) -> bool {
    let mut routes = client.routes.borrow_mut();
    let Some(route) = routes.get_mut(&stream) else {
        return false;
    };
    let Some(mut replay) = route.replay.take() else {
        return false;
    };
    if replay.reopens >= MAX_REOPENS {
        return false;
    }
    let others: Vec<_> = fwd
        .endpoints
        .borrow()
        .iter()
        .filter(|e| e.ready_conn().is_some_and(|c| !Rc::ptr_eq(&c, avoid)))
        .cloned()
        .collect();
    let Some(picked) = fwd.picker.pick(&others) else {
        return false;
    };
    let Some(endpoint) = picked.ready_conn() else {
        return false;
    };
    if !fwd.budget.try_withdraw() {
        fwd.calls.observer.retry_budget_exhausted();
        return false;
    }
    fwd.calls.observer.retried(reason);
    let endpoint_stream = endpoint.next_stream.get();
    endpoint.next_stream.set(endpoint_stream + 2);
    set_stream(&mut replay.headers, endpoint_stream);
    route.peer = endpoint.clone();
    route.peer_stream = endpoint_stream;
    // A new attempt: its own per-attempt time.
    route.attempt_timer =
        super::open::attempt_timer(fwd, client, stream, route.retry.as_deref(), Instant::now());
    let mut upstream = streams::route(client, stream, &endpoint, false);
    upstream.moved = route.moved.clone();
    upstream.retry = route.retry.clone();
    let clock = fwd.picker.clock();
    upstream.account = Some(CallAccount::start(picked, &clock));
    endpoint
        .routes
        .borrow_mut()
        .insert(endpoint_stream, upstream);
    endpoint.out.borrow_mut().extend_from_slice(&replay.headers);
    fwd.mark(&endpoint);
    replay.reopens += 1;
    // A request without a body ended in its HEADERS, which went as they came.
    if !replay.body.is_empty() || replay.end {
        flow::send_replayed(fwd, &endpoint, endpoint_stream, &replay.body, replay.end);
    }
    route.replay = Some(replay);
    true
}

/// Writes `stream` into every frame of `frames`.
pub fn set_stream(frames: &mut BytesMut, stream: u32) {
    let mut at = 0;
    while at + frame::HEADER_LEN <= frames.len() {
        let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
        frames[at + 5..at + 9].copy_from_slice(&stream.to_be_bytes());
        at += frame::HEADER_LEN + len;
    }
}
