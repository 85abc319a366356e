//! The frames that carry calls: HEADERS (with CONTINUATION) and DATA, through the stream
//! states of RFC 9113 §5.1. A request opens a stream on an endpoint; response headers, data
//! and trailers come back the same way. Every header block is decoded once and re-encoded
//! into the other connection while its fields are checked (§8.2): a malformed message is
//! refused with RST_STREAM(PROTOCOL_ERROR) and is never passed on.

use std::rc::Rc;

use bytes::BytesMut;

use super::account::{self, CallAccount};
use super::deadline::{self, Deadline, Moved};
use super::fields::{Block, FieldCheck};
use super::flow::{self, Pending};
use super::open::{self, MethodRetry};
use super::policy::{self, Fallback, Outcome};
use super::replay::{self, Replay};
use super::report::CallGuard;
use super::{Conn, Fatal, Forwarder, Role, STREAM_WINDOW};
use crate::frame::{self, Head};
use crate::hpack;
use fanout_balance::retry::Pushback;

/// Where a stream of one connection continues on another.
pub struct Route {
    pub peer: Rc<Conn>,
    pub peer_stream: u32,
    /// The peer on this connection sent END_STREAM.
    pub ended: bool,
    /// The peer on this connection sent its (final) header block: what follows is trailers.
    pub headers_seen: bool,
    /// Received on this stream, passed on, and not yet given back with a WINDOW_UPDATE.
    pub unacked: u32,
    /// What the peer on this connection may still send us on the stream.
    pub recv_window: i64,
    /// What this connection's peer lets us send on the stream.
    pub send_window: i64,
    /// What waits for that window.
    pub pending: Pending,
    /// The call's bookkeeping, on its endpoint-side stream.
    pub account: Option<CallAccount>,
    /// The call's deadline, on its client-side stream.
    pub deadline: Option<Deadline>,
    /// The call's idle timer, on its client-side stream.
    pub idle: Option<Deadline>,
    /// The retry policy's per-attempt timer, on the client-side stream.
    pub attempt_timer: Option<Deadline>,
    /// Frames moved on the call, on both its streams, when it has an idle timeout.
    pub moved: Option<Moved>,
    /// The retry rules of the call's method, on both its streams.
    pub retry: Option<Rc<MethodRetry>>,
    /// The request kept whole until an endpoint answers it, on its client-side stream.
    pub replay: Option<Box<Replay>>,
    /// The call, on its client-side stream: it ends when this route is forgotten.
    pub call: Option<CallGuard>,
}

/// The route on `owner` for a stream that continues on `peer`'s `peer_stream`.
pub fn route(peer: &Rc<Conn>, peer_stream: u32, owner: &Conn, headers_seen: bool) -> Route {
    Route {
        peer: peer.clone(),
        peer_stream,
        ended: false,
        headers_seen,
        unacked: 0,
        recv_window: STREAM_WINDOW as i64,
        send_window: owner.peer_initial_window.get(),
        pending: Pending::default(),
        account: None,
        deadline: None,
        idle: None,
        attempt_timer: None,
        moved: None,
        retry: None,
        replay: None,
        call: None,
    }
}

/// A stream neither side has opened yet (§5.1 "idle"): frames other than HEADERS on it are a
/// connection error.
pub fn is_idle(conn: &Conn, stream: u32) -> bool {
    match conn.role {
        Role::Downstream => stream.is_multiple_of(2) || stream > conn.last_peer_stream.get(),
        Role::Upstream => stream.is_multiple_of(2) || stream >= conn.next_stream.get(),
    }
}

/// A stream error (§5.4.2): RST_STREAM with `code` here, and the stream it continues on
/// reset too.
pub fn reset_stream(conn: &Rc<Conn>, fwd: &Forwarder, stream: u32, code: u32) {
    frame::put_rst(&mut conn.out.borrow_mut(), stream, code);
    fwd.mark(conn);
    let route = conn.routes.borrow_mut().remove(&stream);
    if let Some(route) = route {
        let peer_code = if code == frame::CANCEL {
            frame::CANCEL
        } else {
            frame::INTERNAL_ERROR
        };
        reset_other_side(fwd, &route, peer_code);
    }
}

/// The stream `route` leads to, on the other connection, is forgotten and reset with `code`;
/// `route` itself was forgotten by the caller.
pub fn reset_other_side(fwd: &Forwarder, route: &Route, code: u32) {
    let mut other = route.peer.routes.borrow_mut().remove(&route.peer_stream);
    // Only an endpoint-side route keeps the call's account: this reset came from the client
    // (its reset, its connection lost), which counts as a cancel and not as the endpoint's
    // failure.
    if let Some(account) = other.as_mut().and_then(|o| o.account.as_mut()) {
        account.cancelled_by_client();
    }
    frame::put_rst(&mut route.peer.out.borrow_mut(), route.peer_stream, code);
    fwd.mark(&route.peer);
    give_back(fwd, route);
    if let Some(other) = &other {
        give_back(fwd, other);
    }
}

/// A forgotten route's data that never went: its sender's connection gets that window back.
/// Without it, every stream reset while its data waited for a slow reader would shrink the
/// sending connection's window for good, until the connection stalled for all its streams.
pub fn give_back(fwd: &Forwarder, forgotten: &Route) {
    let bytes = forgotten.pending.waiting_bytes();
    if bytes > 0 {
        flow::credit(fwd, &forgotten.peer, forgotten.peer_stream, bytes);
    }
}

/// The attempt on `conn`'s `stream` is over, its call gone elsewhere: forgotten (its account
/// counts `status`, if given), its request data still waiting for this endpoint credited to
/// the client (that data goes again as replayed), and the stream reset when `still_open` or
/// data of ours still waited on it.
pub fn forget_attempt(
    fwd: &Forwarder,
    conn: &Rc<Conn>,
    stream: u32,
    still_open: bool,
    status: Option<u16>,
) {
    let Some(mut attempt) = conn.routes.borrow_mut().remove(&stream) else {
        return;
    };
    if let Some(account) = &mut attempt.account {
        account.set_status(status);
    }
    give_back(fwd, &attempt);
    if still_open || !attempt.pending.is_empty() {
        frame::put_rst(&mut conn.out.borrow_mut(), stream, frame::CANCEL);
        fwd.mark(conn);
    }
}

pub fn on_headers_frame(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    if head.stream == 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let range = frame::strip(&head, payload).map_err(|_| Fatal(frame::PROTOCOL_ERROR))?;
    if head.has(frame::END_HEADERS) {
        on_headers(conn, fwd, head.stream, head.flags, &payload[range])
    } else {
        *conn.partial.borrow_mut() =
            Some((head.stream, head.flags, BytesMut::from(&payload[range])));
        Ok(())
    }
}

pub fn on_continuation(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    head: Head,
    payload: &[u8],
) -> Result<(), Fatal> {
    let mut partial = conn.partial.borrow_mut();
    let Some((stream, flags, block)) = partial.as_mut() else {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    };
    block.extend_from_slice(payload);
    // A block no decoder would accept is refused before it fills the memory.
    if block.len() > super::MAX_HEADER_BLOCK {
        return Err(Fatal(frame::ENHANCE_YOUR_CALM));
    }
    if head.has(frame::END_HEADERS) {
        let (stream, flags, block) = (*stream, *flags, std::mem::take(block));
        *partial = None;
        drop(partial);
        return on_headers(conn, fwd, stream, flags, &block);
    }
    Ok(())
}

fn on_headers(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    stream: u32,
    flags: u8,
    block: &[u8],
) -> Result<(), Fatal> {
    let end = flags & frame::END_STREAM != 0;
    let known = conn
        .routes
        .borrow()
        .get(&stream)
        .map(|r| (r.peer.clone(), r.peer_stream, r.ended, r.headers_seen));
    let Some((peer, peer_stream, ended, headers_seen)) = known else {
        return open::open(conn, fwd, stream, flags, block);
    };
    let kind = if headers_seen {
        Block::Trailers
    } else {
        Block::Response
    };
    let mut check = FieldCheck::new(kind);
    let mut status = None;
    let mut pushback = Pushback::Absent;
    let mut frames = BytesMut::with_capacity(open::HEADER_FRAMES_CAPACITY.max(2 * block.len()));
    let at = frame::begin_frame(
        &mut frames,
        frame::HEADERS,
        frame::END_HEADERS | (flags & frame::END_STREAM),
        peer_stream,
    );
    decode(conn, block, |name, value, indexing| {
        check.field(name, value);
        if name == b"grpc-status" {
            status = account::grpc_status(value);
        } else if name == b"grpc-retry-pushback-ms" {
            pushback = Pushback::parse(Some(value));
        }
        hpack::encode_field(&mut frames, name, value, indexing)
    })?;
    if ended {
        reset_stream(conn, fwd, stream, frame::STREAM_CLOSED);
        return Ok(());
    }
    // Trailers end the stream (§8.1).
    if !check.is_valid() || (kind == Block::Trailers && !end) {
        reset_stream(conn, fwd, stream, frame::PROTOCOL_ERROR);
        return Ok(());
    }
    frame::finish_headers(&mut frames, at, peer.peer_max_frame.get());
    let mut retry = None;
    if let Some(route) = conn.routes.borrow_mut().get_mut(&stream) {
        if conn.role == Role::Upstream && end {
            policy::answered(route.retry.as_deref(), status);
            retry = route.retry.clone();
        }
        if let Some(account) = &mut route.account {
            if kind == Block::Response && !check.informational {
                account.answered(&fwd.picker.clock());
            }
            account.set_status(status);
        }
        route.headers_seen |= !check.informational;
        deadline::moved(&route.moved);
        route.ended |= end;
    }
    // A Trailers-Only answer sent no message: the call's retry policy may send it again,
    // and without one a Trailers-Only UNAVAILABLE goes elsewhere.
    if conn.role == Role::Upstream
        && kind == Block::Response
        && end
        && let Some(code) = status.filter(|&code| code != 0)
    {
        let outcome = policy::after_failure(
            fwd,
            (&peer, peer_stream),
            retry.as_deref(),
            (Some(code), pushback),
            conn,
            || Fallback::Answer(frames.clone()),
        );
        match outcome {
            Outcome::Retried => {
                // A retry needs the whole request: our side had ended.
                forget_attempt(fwd, conn, stream, false, None);
                return Ok(());
            }
            Outcome::NoPolicy if code == 14 && replay::retry_unavailable(conn, fwd, stream) => {
                return Ok(());
            }
            Outcome::No | Outcome::NoPolicy => {}
        }
    }
    // The endpoint answers: the request is its now, and is no longer kept.
    if conn.role == Role::Upstream
        && let Some(client_route) = peer.routes.borrow_mut().get_mut(&peer_stream)
    {
        client_route.replay = None;
    }
    flow::send_trailers(fwd, &peer, peer_stream, frames);
    if end {
        end_if_done(conn, stream);
    }
    Ok(())
}

pub fn on_data(conn: &Rc<Conn>, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if head.stream == 0 {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let range = frame::strip(&head, payload).map_err(|_| Fatal(frame::PROTOCOL_ERROR))?;
    // The whole frame, padding included, counts against the windows (§6.9.1).
    let window = conn.recv_window.get() - head.len as i64;
    if window < 0 {
        return Err(Fatal(frame::FLOW_CONTROL_ERROR));
    }
    conn.recv_window.set(window);
    if is_idle(conn, head.stream) {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    let data = &payload[range];
    let padding = head.len - data.len();
    let end = head.has(frame::END_STREAM);
    enum Next {
        Forward(Rc<Conn>, u32),
        Gone,
        Reset(u32),
    }
    let next = {
        let mut routes = conn.routes.borrow_mut();
        match routes.get_mut(&head.stream) {
            None => Next::Gone,
            Some(route) if route.ended => Next::Reset(frame::STREAM_CLOSED),
            // DATA before the response's headers is a malformed response (§8.1).
            Some(route) if !route.headers_seen => Next::Reset(frame::PROTOCOL_ERROR),
            Some(route) => {
                route.recv_window -= head.len as i64;
                if route.recv_window < 0 {
                    Next::Reset(frame::FLOW_CONTROL_ERROR)
                } else {
                    route.ended = end;
                    deadline::moved(&route.moved);
                    // A request's body is kept while it may still have to go elsewhere.
                    if let Some(replay) = &mut route.replay
                        && !replay.keep(data, end)
                    {
                        route.replay = None;
                    }
                    Next::Forward(route.peer.clone(), route.peer_stream)
                }
            }
        }
    };
    match next {
        // A call held for an endpoint keeps its body (uncredited) until it opens.
        Next::Gone if super::held::on_data(fwd, conn, head.stream, data, end) => {
            flow::credit(fwd, conn, head.stream, padding);
        }
        // A stream already gone: its bytes still come back to the connection's window.
        Next::Gone => flow::credit(fwd, conn, head.stream, head.len),
        Next::Reset(code) => {
            flow::credit(fwd, conn, head.stream, head.len);
            reset_stream(conn, fwd, head.stream, code);
        }
        Next::Forward(peer, peer_stream) => {
            // Padding is never passed on: its share of the window comes back at once.
            flow::credit(fwd, conn, head.stream, padding);
            flow::send_data(fwd, &peer, peer_stream, data, end);
            if end {
                end_if_done(conn, head.stream);
            }
        }
    }
    Ok(())
}

pub fn decode(
    conn: &Conn,
    block: &[u8],
    field: impl FnMut(&[u8], &[u8], hpack::Indexing),
) -> Result<(), Fatal> {
    conn.decoder
        .borrow_mut()
        .decode(block, field)
        .map_err(|_| Fatal(frame::COMPRESSION_ERROR))
}

/// Forgets a stream once both its directions have ended and nothing waits to be sent on
/// either side.
pub fn end_if_done(conn: &Conn, stream: u32) {
    let mut routes = conn.routes.borrow_mut();
    let Some(route) = routes.get(&stream) else {
        return;
    };
    let peer = route.peer.clone();
    let peer_stream = route.peer_stream;
    let mut peer_routes = peer.routes.borrow_mut();
    let done = |r: &Route| r.ended && r.pending.is_empty();
    if done(route) && peer_routes.get(&peer_stream).is_some_and(done) {
        routes.remove(&stream);
        peer_routes.remove(&peer_stream);
    }
}
