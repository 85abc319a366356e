//! One HTTP/2 connection, a client's or an endpoint's: its socket and output buffer, its
//! stream routes, and the protocol state both directions need (windows, settings, PINGs,
//! GOAWAY).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::streams::Route;
use super::{CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW};
use crate::frame;
use crate::hpack;

/// Stream ids are small, dense integers: one multiply spreads them over the table (SipHash,
/// the default, was a fifth of the spike's time).
#[derive(Default)]
pub(super) struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, id: u32) {
        self.0 = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(super) type Routes = HashMap<u32, Route, std::hash::BuildHasherDefault<StreamIdHasher>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// A client's connection to the proxy: streams are opened by the peer.
    Downstream,
    /// The proxy's connection to an endpoint: streams are opened by us.
    Upstream,
}

pub struct Conn {
    pub(super) role: Role,
    pub(super) io: TcpStream,
    pub(super) out: RefCell<BytesMut>,
    pub(super) dirty: Cell<bool>,
    /// Asks the owning task to wait until its socket is writable and flush.
    pub(super) write_blocked: Notify,
    pub(super) decoder: RefCell<hpack::Decoder>,
    pub(super) routes: RefCell<Routes>,
    pub(super) next_stream: Cell<u32>,
    /// The highest stream id the peer has opened (a client's connection).
    pub(super) last_peer_stream: Cell<u32>,
    /// What the peer may still send us on the connection.
    pub(super) recv_window: Cell<i64>,
    /// The peer's first frame was its SETTINGS, as it must be (§3.4).
    pub(super) settings_seen: Cell<bool>,
    pub(super) send_window: Cell<i64>,
    pub(super) peer_initial_window: Cell<i64>,
    pub(super) peer_max_frame: Cell<usize>,
    /// Streams with data waiting on the connection: its send window or its output buffer.
    pub(super) blocked: RefCell<Vec<u32>>,
    pub(super) unacked: Cell<u32>,
    /// GOAWAY was sent or received: no new streams, and the connection ends once its streams
    /// are done.
    pub(super) leaving: Cell<bool>,
    /// An endpoint's connection: the endpoint answered our first PING.
    pub(super) ready: Cell<bool>,
    /// A PING of ours is unanswered.
    pub(super) awaiting_pong: Cell<bool>,
    /// When our last PING was answered (or the connection made).
    pub(super) last_pong: Cell<Instant>,
    /// Tells an endpoint's keeper that this connection takes no more calls: it ended, or the
    /// endpoint is leaving it.
    pub(super) retired: Notify,
    pub(super) closed: Cell<bool>,
    /// Calls of this client held for an endpoint (`held.rs`).
    pub(super) held: Cell<u32>,
    /// A header block waiting for its CONTINUATION frames: stream, flags, fragments.
    pub(super) partial: RefCell<Option<(u32, u8, BytesMut)>>,
}

impl Conn {
    pub(super) fn new(role: Role, io: TcpStream) -> Rc<Conn> {
        let _ = io.set_nodelay(true);
        let mut out = BytesMut::with_capacity(16 * 1024);
        if role == Role::Upstream {
            out.extend_from_slice(frame::PREFACE);
        }
        frame::put_settings(
            &mut out,
            &[
                (0x2, 0), // ENABLE_PUSH
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            ],
        );
        frame::put_window_update(
            &mut out,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        // An endpoint takes calls once it has answered this.
        let awaiting_pong = role == Role::Upstream;
        if awaiting_pong {
            frame::put_ping(&mut out);
        }
        Rc::new(Conn {
            role,
            io,
            out: RefCell::new(out),
            dirty: Cell::new(false),
            write_blocked: Notify::new(),
            decoder: RefCell::new(hpack::Decoder::default()),
            routes: RefCell::new(Routes::default()),
            next_stream: Cell::new(1),
            last_peer_stream: Cell::new(0),
            recv_window: Cell::new(CONNECTION_WINDOW as i64),
            settings_seen: Cell::new(false),
            send_window: Cell::new(frame::DEFAULT_WINDOW),
            peer_initial_window: Cell::new(frame::DEFAULT_WINDOW),
            peer_max_frame: Cell::new(frame::DEFAULT_MAX_FRAME),
            blocked: RefCell::new(Vec::new()),
            unacked: Cell::new(0),
            leaving: Cell::new(false),
            ready: Cell::new(false),
            awaiting_pong: Cell::new(awaiting_pong),
            last_pong: Cell::new(Instant::now()),
            retired: Notify::new(),
            closed: Cell::new(false),
            held: Cell::new(0),
            partial: RefCell::new(None),
        })
    }

    /// An endpoint's connection that may take a new call.
    pub(super) fn takes_calls(&self) -> bool {
        self.ready.get() && !self.leaving.get() && !self.closed.get()
    }

    /// Left, and no stream is open any more: time to close.
    pub(super) fn is_done(&self) -> bool {
        self.leaving.get() && self.routes.borrow().is_empty() && self.held.get() == 0
    }

    /// Writes what is queued; when the socket is full, the owning task takes over.
    pub(super) fn flush(&self) {
        self.dirty.set(false);
        let mut out = self.out.borrow_mut();
        while !out.is_empty() {
            match self.io.try_write(&out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked.notify_one();
                    return;
                }
                Err(_) => {
                    out.clear();
                    self.closed.set(true);
                    return;
                }
            }
        }
    }
}
