//! Flow control (RFC 9113 §5.2) across the forwarder: DATA goes to a stream as far as the
//! receiving peer's stream and connection windows allow, and as far as the connection's
//! output buffer has room ([`MAX_OUT`]: a peer that grants huge windows but reads slowly is
//! held back by its socket), in frames no larger than the peer accepts. The rest waits on the
//! stream (trailers behind it) until a WINDOW_UPDATE, SETTINGS or a flush makes room. The
//! sender is given credit back only for what was passed on, so a slow reader holds its writer
//! back instead of filling the proxy's memory: what waits on a stream is bounded by the window
//! we gave the writer, what waits on a connection by `MAX_OUT`.

use std::rc::Rc;

use bytes::BytesMut;

use super::{CONNECTION_WINDOW, Conn, Forwarder, STREAM_WINDOW};

/// DATA is written into a connection's output buffer only while it holds less than this.
pub const MAX_OUT: usize = 256 * 1024;
use crate::frame;

/// What waits to be sent on one stream.
#[derive(Default)]
pub struct Pending {
    data: BytesMut,
    /// The DATA that ends the stream is among what waits.
    end: bool,
    /// Trailers (whole encoded frames) to send once the data is out.
    trailers: Option<BytesMut>,
    /// How many of the first bytes of `data` were credited to their sender already (a request
    /// opened again elsewhere, `replay.rs`): not credited again when they go.
    credited: usize,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && !self.end && self.trailers.is_none()
    }

    /// DATA bytes waiting that their sender was not yet credited for.
    pub fn waiting_bytes(&self) -> usize {
        self.data.len() - self.credited
    }

    /// `sent` bytes went from the front of what waits: those to credit their sender for.
    fn went(&mut self, sent: usize) -> usize {
        let credited = self.credited.min(sent);
        self.credited -= credited;
        sent - credited
    }
}

/// Sends `data` on `dest`'s `stream`, or as much of it as the windows allow and the rest
/// later; gives the source of the data its credit for what went.
pub fn send_data(fwd: &Forwarder, dest: &Rc<Conn>, stream: u32, data: &[u8], end: bool) {
    send(fwd, dest, stream, data, end, false);
}

/// As [`send_data`], for a new stream, with data its source was credited for already (a
/// request opened again on another endpoint): it is not credited again.
pub fn send_replayed(fwd: &Forwarder, dest: &Rc<Conn>, stream: u32, data: &[u8], end: bool) {
    send(fwd, dest, stream, data, end, true);
}

fn send(fwd: &Forwarder, dest: &Rc<Conn>, stream: u32, data: &[u8], end: bool, credited: bool) {
    let mut routes = dest.routes.borrow_mut();
    let Some(route) = routes.get_mut(&stream) else {
        return;
    };
    let source = (route.peer.clone(), route.peer_stream);
    let mut sent = 0;
    if route.pending.is_empty() {
        sent = write_allowed(dest, &mut route.send_window, stream, data, end);
        if sent < data.len() {
            route.pending.data.extend_from_slice(&data[sent..]);
            route.pending.end = end;
            if credited {
                route.pending.credited = data.len() - sent;
            }
            if connection_full(dest) {
                dest.blocked.borrow_mut().push(stream);
            }
        }
    } else {
        // Behind what already waits, in order (only a new stream's first data is replayed).
        route.pending.data.extend_from_slice(data);
        route.pending.end |= end;
    }
    drop(routes);
    fwd.mark(dest);
    if !credited {
        credit(fwd, &source.0, source.1, sent);
    }
}

/// Trailers (an encoded HEADERS frame and its CONTINUATIONs) for `stream`: sent now, or
/// queued behind the data still waiting.
pub fn send_trailers(fwd: &Forwarder, dest: &Rc<Conn>, stream: u32, frames: BytesMut) {
    let mut routes = dest.routes.borrow_mut();
    let Some(route) = routes.get_mut(&stream) else {
        return;
    };
    if route.pending.is_empty() {
        dest.out.borrow_mut().extend_from_slice(&frames);
    } else {
        route.pending.trailers = Some(frames);
    }
    drop(routes);
    fwd.mark(dest);
}

/// Writes DATA frames for as much of `data` as the stream's and the connection's windows
/// allow; returns how many bytes went. An empty DATA that only ends the stream always goes.
fn write_allowed(dest: &Conn, window: &mut i64, stream: u32, data: &[u8], end: bool) -> usize {
    let mut out = dest.out.borrow_mut();
    let max_frame = dest.peer_max_frame.get();
    let mut sent = 0;
    loop {
        let room = ((*window).min(dest.send_window.get()).max(0) as usize)
            .min(MAX_OUT.saturating_sub(out.len()));
        let n = room.min(data.len() - sent).min(max_frame);
        let last = sent + n == data.len();
        if n == 0 && !(last && end) {
            return sent;
        }
        frame::put_data(&mut out, stream, &data[sent..sent + n], end && last);
        *window -= n as i64;
        dest.send_window.set(dest.send_window.get() - n as i64);
        sent += n;
        if last {
            return sent;
        }
    }
}

/// Sends what waits on `stream` of `dest` as far as the windows now allow.
pub fn drain(fwd: &Forwarder, dest: &Rc<Conn>, stream: u32) {
    let mut routes = dest.routes.borrow_mut();
    let Some(route) = routes.get_mut(&stream) else {
        return;
    };
    if route.pending.is_empty() {
        return;
    }
    let mut data = std::mem::take(&mut route.pending.data);
    let end = route.pending.end;
    let sent = write_allowed(dest, &mut route.send_window, stream, &data, end);
    let to_credit = route.pending.went(sent);
    let source = (route.peer.clone(), route.peer_stream);
    if sent == data.len() {
        route.pending.end = false;
        if let Some(trailers) = route.pending.trailers.take() {
            dest.out.borrow_mut().extend_from_slice(&trailers);
        }
    } else {
        let _ = data.split_to(sent);
        route.pending.data = data;
        if connection_full(dest) {
            dest.blocked.borrow_mut().push(stream);
        }
    }
    let done = route.pending.is_empty();
    drop(routes);
    if sent > 0 || done {
        fwd.mark(dest);
    }
    credit(fwd, &source.0, source.1, to_credit);
    if done {
        super::streams::end_if_done(dest, stream);
    }
}

/// No DATA fits on the connection now: its window is spent or its output buffer is full.
fn connection_full(dest: &Conn) -> bool {
    dest.send_window.get() <= 0 || dest.out.borrow().len() >= MAX_OUT
}

/// The connection's window grew or its output drained: the streams that waited on it go on.
pub fn drain_blocked(fwd: &Forwarder, dest: &Rc<Conn>) {
    let blocked = std::mem::take(&mut *dest.blocked.borrow_mut());
    for stream in blocked {
        if connection_full(dest) {
            dest.blocked.borrow_mut().push(stream);
            continue;
        }
        drain(fwd, dest, stream);
    }
}

/// Every stream of `dest` with something waiting (after its peer enlarged all windows).
pub fn drain_all(fwd: &Forwarder, dest: &Rc<Conn>) {
    let waiting: Vec<u32> = dest
        .routes
        .borrow()
        .iter()
        .filter(|(_, r)| !r.pending.is_empty())
        .map(|(&id, _)| id)
        .collect();
    for stream in waiting {
        drain(fwd, dest, stream);
    }
}

/// `bytes` received on `source`'s `stream` were passed on (or thrown away): they are given
/// back to the sender once half a window has gathered.
pub fn credit(fwd: &Forwarder, source: &Rc<Conn>, stream: u32, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let bytes = bytes as u32;
    let conn_unacked = source.unacked.get() + bytes;
    let mut updated = false;
    if conn_unacked >= CONNECTION_WINDOW / 2 {
        frame::put_window_update(&mut source.out.borrow_mut(), 0, conn_unacked);
        source
            .recv_window
            .set(source.recv_window.get() + conn_unacked as i64);
        source.unacked.set(0);
        updated = true;
    } else {
        source.unacked.set(conn_unacked);
    }
    if let Some(route) = source.routes.borrow_mut().get_mut(&stream) {
        route.unacked += bytes;
        // A stream whose sender has ended needs no more window.
        if !route.ended && route.unacked >= STREAM_WINDOW / 2 {
            frame::put_window_update(&mut source.out.borrow_mut(), stream, route.unacked);
            route.recv_window += route.unacked as i64;
            route.unacked = 0;
            updated = true;
        }
    }
    if updated {
        fwd.mark(source);
    }
}
