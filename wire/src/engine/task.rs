//! The task of one connection, a client's or an endpoint's: it reads the socket into the
//! thread's one read buffer, handles every whole frame where it is read (`on_frame`), flushes
//! every connection written to, keeps an endpoint's connection alive with PINGs, and when the
//! connection ends cancels (or retries) the streams it carried.

use std::io;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::time::{Instant, Sleep};

use super::conn::Role;
use super::report::ClientGot;
use super::{Conn, Forwarder, READ_CHUNK, Settings, control, held, policy, streams};
use crate::frame::{self, Head};

pub(super) async fn run(conn: Rc<Conn>, forwarder: Rc<Forwarder>) {
    // What was read and not yet a whole frame, until the next read completes it. The read
    // itself goes into the thread's one buffer: an idle connection holds no read buffer.
    let mut stash = BytesMut::new();
    let mut preface_seen = conn.role == Role::Upstream;
    let upstream = conn.role == Role::Upstream;
    // An endpoint's connection: the first PING's answer is due within the connect timeout,
    // then keepalives (`keepalive`).
    let keepalive = tokio::time::sleep(forwarder.settings().connect_timeout);
    tokio::pin!(keepalive);
    loop {
        // With output waiting, the socket's writability is what to wait for. The wake-up that
        // another task's flush leaves for this one is not: taken then, it would be taken again
        // after every failed write, and the task would spin without ever yielding to the
        // runtime's I/O driver, which alone can see the socket become writable again.
        let pending_out = !conn.out.borrow().is_empty();
        tokio::select! {
            biased;
            _ = conn.write_blocked.notified(), if !pending_out => {}
            ready = conn.io.writable(), if pending_out => if ready.is_err() { break },
            () = &mut keepalive, if upstream => {
                if !keepalive_due(&conn, &forwarder.settings(), keepalive.as_mut()) {
                    break;
                }
            }
            ready = conn.io.readable() => {
                if ready.is_err() {
                    break;
                }
                match read_frames(&conn, &forwarder, &mut stash, &mut preface_seen) {
                    Read::Frames => {}
                    Read::Nothing => continue,
                    Read::End => break,
                }
            }
        }
        forwarder.mark(&conn);
        forwarder.flush_dirty();
        if conn.closed.get() || conn.is_done() {
            break;
        }
    }
    conn.closed.set(true);
    conn.retired.notify_one();
    // A write of ours may have met an endpoint's reset before we read what it sent first: a
    // GOAWAY that names the streams it never processed, which can then go elsewhere.
    if upstream {
        while let Read::Frames = read_frames(&conn, &forwarder, &mut stash, &mut preface_seen) {}
    }
    held::forget(&forwarder, &conn);
    // Every stream of a lost connection is cancelled on its other side, unless its call's
    // retry policy sends it again (an endpoint lost before it answered: UNAVAILABLE).
    let routes = std::mem::take(&mut *conn.routes.borrow_mut());
    for (_, route) in routes {
        let retried = upstream
            && !route.headers_seen
            && policy::after_failure(
                &forwarder,
                (&route.peer, route.peer_stream),
                route.retry.as_deref(),
                (Some(14), fanout_balance::retry::Pushback::Absent),
                &conn,
                || policy::Fallback::Reset(frame::CANCEL),
            ) == policy::Outcome::Retried;
        if retried {
            streams::give_back(&forwarder, &route);
        } else {
            if upstream {
                let endpoint = route.account.as_ref().map(|a| a.endpoint_addr());
                let got = ClientGot::Reset(frame::CANCEL);
                let reason = "the connection to the endpoint was lost";
                forwarder.calls.observer.call_failed(endpoint, got, reason);
            }
            streams::reset_other_side(&forwarder, &route, frame::CANCEL);
        }
    }
    forwarder.mark(&conn);
    forwarder.flush_dirty();
}

/// What a read of a connection's socket came to.
enum Read {
    /// Frames were read and handled.
    Frames,
    /// Nothing to read now.
    Nothing,
    /// The connection ends: closed by the peer, failed, or a connection error of the peer's.
    End,
}

/// Reads what the socket holds and handles every whole frame; a frame's unread rest stays in
/// `stash` until the next read completes it.
fn read_frames(
    conn: &Rc<Conn>,
    forwarder: &Forwarder,
    stash: &mut BytesMut,
    preface_seen: &mut bool,
) -> Read {
    let mut read = forwarder.read.borrow_mut();
    read.clear();
    read.extend_from_slice(&std::mem::take(stash));
    if read.capacity() - read.len() < READ_CHUNK / 4 {
        read.reserve(READ_CHUNK);
    }
    match read_drained(&conn.io, &mut read) {
        Ok(0) => return Read::End,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *stash = BytesMut::from(&read[..]);
            return Read::Nothing;
        }
        Err(_) => return Read::End,
    }
    if !*preface_seen {
        if read.len() < frame::PREFACE.len() {
            *stash = BytesMut::from(&read[..]);
            return Read::Frames;
        }
        if &read[..frame::PREFACE.len()] != frame::PREFACE {
            go_away(conn, frame::PROTOCOL_ERROR);
            return Read::End;
        }
        read.advance(frame::PREFACE.len());
        *preface_seen = true;
    }
    while let Some(head) = Head::parse(&read) {
        if head.len > frame::DEFAULT_MAX_FRAME {
            go_away(conn, frame::FRAME_SIZE_ERROR);
            return Read::End;
        }
        if read.len() < frame::HEADER_LEN + head.len {
            break;
        }
        let payload = &read[frame::HEADER_LEN..frame::HEADER_LEN + head.len];
        if let Err(Fatal(code)) = on_frame(conn, forwarder, head, payload) {
            go_away(conn, code);
            return Read::End;
        }
        read.advance(frame::HEADER_LEN + head.len);
    }
    if !read.is_empty() {
        *stash = BytesMut::from(&read[..]);
    }
    Read::Frames
}

/// Reads what the socket holds into `read`'s spare room. A read that leaves room unfilled has
/// emptied the socket: its readiness is cleared then and there, which spares the read that
/// would only have said "nothing more" (one system call in two, as calls come one by one).
/// Sound because tokio clears readiness only if no new readiness event came since it was
/// taken (bytes that arrive after this read raise a new one), and never clears a peer's close
/// (a FIN that came with the last bytes is still seen: the next read returns 0).
fn read_drained(io: &tokio::net::TcpStream, read: &mut BytesMut) -> io::Result<usize> {
    let room = read.capacity() - read.len();
    let mut got = 0;
    let result = io.try_io(tokio::io::Interest::READABLE, || {
        got = io.try_read_buf(read)?;
        if got > 0 && got < room {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// The keepalive timer of an endpoint's connection fired: a PING is sent when the last was
/// answered an interval ago; `false` when the last is still unanswered (the endpoint is gone
/// without a FIN or RST, or never spoke HTTP/2), and the connection is dropped.
fn keepalive_due(conn: &Conn, settings: &Settings, timer: std::pin::Pin<&mut Sleep>) -> bool {
    if conn.awaiting_pong.get() {
        return false;
    }
    let now = Instant::now();
    let due = conn.last_pong.get() + settings.keepalive_interval;
    if now < due {
        timer.reset(due);
        return true;
    }
    frame::put_ping(&mut conn.out.borrow_mut());
    conn.awaiting_pong.set(true);
    timer.reset(now + settings.keepalive_timeout);
    true
}

/// Ends the connection with `code` (RFC 9113 §5.4.1).
fn go_away(conn: &Conn, code: u32) {
    let last = conn.routes.borrow().keys().copied().max().unwrap_or(0);
    frame::put_goaway(&mut conn.out.borrow_mut(), last, code);
}

/// A connection error: the connection ends with this code.
pub(super) struct Fatal(pub(super) u32);

fn on_frame(conn: &Rc<Conn>, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if !conn.settings_seen.replace(true) && head.kind != frame::SETTINGS {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    // Nothing may come between a HEADERS and the CONTINUATIONs of its block (§6.10).
    if let Some((stream, _, _)) = &*conn.partial.borrow()
        && (head.kind != frame::CONTINUATION || head.stream != *stream)
    {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    match head.kind {
        frame::DATA => streams::on_data(conn, fwd, head, payload),
        frame::HEADERS => streams::on_headers_frame(conn, fwd, head, payload),
        frame::CONTINUATION => streams::on_continuation(conn, fwd, head, payload),
        frame::PRIORITY => control::on_priority(head, payload),
        frame::RST_STREAM => control::on_rst_stream(conn, fwd, head, payload),
        frame::SETTINGS => control::on_settings(conn, fwd, head, payload),
        frame::PING => control::on_ping(conn, fwd, head, payload),
        frame::WINDOW_UPDATE => control::on_window_update(conn, fwd, head, payload),
        frame::GOAWAY => control::on_goaway(conn, fwd, head, payload),
        // Push was turned off in our SETTINGS, and clients never push.
        frame::PUSH_PROMISE => Err(Fatal(frame::PROTOCOL_ERROR)),
        // Unknown types are ignored, as the RFC asks (§4.1).
        _ => Ok(()),
    }
}
