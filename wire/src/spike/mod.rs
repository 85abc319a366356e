//! The measuring spike: a forwarder built the way issue 13's proposal describes, reduced to
//! what a benchmark exercises plus the protocol a real peer needs, to learn what such a data
//! path costs per call before building the real one.
//!
//! One thread; every connection is an `Rc` owned by one task that reads its socket and
//! forwards each frame at once into the other connection's output buffer (header blocks
//! re-encoded field by field, DATA copied under flow control, `flow.rs`); when a batch of reads
//! is done, every connection written to is flushed with one write, from the task that read,
//! without waking the other task.
//!
//! Left out on purpose (the real layer needs each): endpoint reconnects and health, any
//! balancer but round robin, deadlines, retries, metrics, limits on streams per endpoint,
//! header validation beyond HPACK.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::frame::{self, Head};
use crate::hpack;

mod flow;

use flow::Pending;

/// Stream ids are small, dense integers: one multiply spreads them over the table (SipHash,
/// the default, was a fifth of the spike's time).
#[derive(Default)]
struct StreamIdHasher(u64);

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

type Routes = HashMap<u32, Route, std::hash::BuildHasherDefault<StreamIdHasher>>;

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A client's connection to the proxy: streams are opened by the peer.
    Downstream,
    /// The proxy's connection to an endpoint: streams are opened by us.
    Upstream,
}

/// Where a stream of one connection continues on another.
struct Route {
    peer: Rc<Conn>,
    peer_stream: u32,
    /// The peer on this connection sent END_STREAM.
    ended: bool,
    /// Received on this stream, passed on, and not yet given back with a WINDOW_UPDATE.
    unacked: u32,
    /// What this connection's peer lets us send on the stream.
    send_window: i64,
    /// What waits for that window.
    pending: Pending,
}

pub struct Conn {
    role: Role,
    io: TcpStream,
    out: RefCell<BytesMut>,
    dirty: Cell<bool>,
    /// Asks the owning task to wait until its socket is writable and flush.
    write_blocked: Notify,
    decoder: RefCell<hpack::Decoder>,
    routes: RefCell<Routes>,
    next_stream: Cell<u32>,
    send_window: Cell<i64>,
    peer_initial_window: Cell<i64>,
    peer_max_frame: Cell<usize>,
    /// Streams with data waiting on the connection's send window.
    window_blocked: RefCell<Vec<u32>>,
    unacked: Cell<u32>,
    /// An endpoint that said GOAWAY takes no new streams.
    leaving: Cell<bool>,
    closed: Cell<bool>,
    /// A header block waiting for its CONTINUATION frames: stream, flags, fragments.
    partial: RefCell<Option<(u32, u8, BytesMut)>>,
}

impl Conn {
    fn new(role: Role, io: TcpStream) -> Rc<Conn> {
        let _ = io.set_nodelay(true);
        let mut out = BytesMut::with_capacity(16 * 1024);
        if role == Role::Upstream {
            out.extend_from_slice(frame::PREFACE);
        }
        frame::put_settings(
            &mut out,
            &[
                (0x2, 0), // ENABLE_PUSH
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, 10_000),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            ],
        );
        frame::put_window_update(
            &mut out,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
        Rc::new(Conn {
            role,
            io,
            out: RefCell::new(out),
            dirty: Cell::new(false),
            write_blocked: Notify::new(),
            decoder: RefCell::new(hpack::Decoder::default()),
            routes: RefCell::new(Routes::default()),
            next_stream: Cell::new(1),
            send_window: Cell::new(frame::DEFAULT_WINDOW),
            peer_initial_window: Cell::new(frame::DEFAULT_WINDOW),
            peer_max_frame: Cell::new(frame::DEFAULT_MAX_FRAME),
            window_blocked: RefCell::new(Vec::new()),
            unacked: Cell::new(0),
            leaving: Cell::new(false),
            closed: Cell::new(false),
            partial: RefCell::new(None),
        })
    }

    /// Writes what is queued; when the socket is full, the owning task takes over.
    fn flush(&self) {
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

pub struct Forwarder {
    endpoints: Vec<Rc<Conn>>,
    next: Cell<usize>,
    dirty: RefCell<Vec<Rc<Conn>>>,
}

impl Forwarder {
    fn mark(&self, conn: &Rc<Conn>) {
        if !conn.dirty.replace(true) {
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    fn flush_dirty(&self) {
        let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        for conn in dirty {
            conn.flush();
        }
    }

    fn pick(&self) -> Option<Rc<Conn>> {
        let n = self.endpoints.len();
        let start = self.next.get();
        self.next.set(start.wrapping_add(1));
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|c| !c.closed.get() && !c.leaving.get())
            .cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpikeError {
    #[error("cannot connect to endpoint {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Connects to every endpoint, then serves clients on `listen` until the task ends. Must run
/// inside a `LocalSet`.
pub async fn serve(listen: SocketAddr, endpoints: &[SocketAddr]) -> Result<(), SpikeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| SpikeError::Listen {
            addr: listen,
            source,
        })?;
    serve_on(listener, endpoints).await
}

/// As [`serve`], on a listener already bound.
pub async fn serve_on(listener: TcpListener, endpoints: &[SocketAddr]) -> Result<(), SpikeError> {
    let mut conns = Vec::new();
    for &addr in endpoints {
        let io = TcpStream::connect(addr)
            .await
            .map_err(|source| SpikeError::Connect { addr, source })?;
        conns.push(Conn::new(Role::Upstream, io));
    }
    let forwarder = Rc::new(Forwarder {
        endpoints: conns.clone(),
        next: Cell::new(0),
        dirty: RefCell::new(Vec::new()),
    });
    for conn in conns {
        conn.flush();
        tokio::task::spawn_local(run(conn, forwarder.clone()));
    }
    loop {
        let Ok((io, _)) = listener.accept().await else {
            continue;
        };
        let conn = Conn::new(Role::Downstream, io);
        conn.flush();
        tokio::task::spawn_local(run(conn, forwarder.clone()));
    }
}

async fn run(conn: Rc<Conn>, forwarder: Rc<Forwarder>) {
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let mut preface_seen = conn.role == Role::Upstream;
    'conn: loop {
        let pending_out = !conn.out.borrow().is_empty();
        tokio::select! {
            biased;
            _ = conn.write_blocked.notified() => {}
            ready = conn.io.writable(), if pending_out => if ready.is_err() { break },
            ready = conn.io.readable() => {
                if ready.is_err() {
                    break;
                }
                if read.capacity() - read.len() < READ_CHUNK / 4 {
                    read.reserve(READ_CHUNK);
                }
                match conn.io.try_read_buf(&mut read) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
                if !preface_seen {
                    if read.len() < frame::PREFACE.len() {
                        continue;
                    }
                    if &read[..frame::PREFACE.len()] != frame::PREFACE {
                        break;
                    }
                    read.advance(frame::PREFACE.len());
                    preface_seen = true;
                }
                while let Some(head) = Head::parse(&read) {
                    if head.len > frame::DEFAULT_MAX_FRAME {
                        go_away(&conn, frame::FRAME_SIZE_ERROR);
                        break 'conn;
                    }
                    if read.len() < frame::HEADER_LEN + head.len {
                        break;
                    }
                    let payload = &read[frame::HEADER_LEN..frame::HEADER_LEN + head.len];
                    if let Err(Fatal(code)) = on_frame(&conn, &forwarder, head, payload) {
                        go_away(&conn, code);
                        break 'conn;
                    }
                    read.advance(frame::HEADER_LEN + head.len);
                }
            }
        }
        forwarder.mark(&conn);
        forwarder.flush_dirty();
        if conn.closed.get() {
            break;
        }
    }
    conn.closed.set(true);
    // Every stream of a lost connection is cancelled on its other side.
    let routes = std::mem::take(&mut *conn.routes.borrow_mut());
    for (_, route) in routes {
        route.peer.routes.borrow_mut().remove(&route.peer_stream);
        frame::put_rst(
            &mut route.peer.out.borrow_mut(),
            route.peer_stream,
            frame::CANCEL,
        );
        forwarder.mark(&route.peer);
    }
    forwarder.mark(&conn);
    forwarder.flush_dirty();
}

/// Ends the connection with `code` (RFC 9113 §5.4.1).
fn go_away(conn: &Conn, code: u32) {
    let last = conn.routes.borrow().keys().copied().max().unwrap_or(0);
    frame::put_goaway(&mut conn.out.borrow_mut(), last, code);
}

/// A connection error: the connection ends with this code.
struct Fatal(u32);

fn on_frame(conn: &Rc<Conn>, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if let Some((stream, _, _)) = &*conn.partial.borrow()
        && (head.kind != frame::CONTINUATION || head.stream != *stream)
    {
        return Err(Fatal(frame::PROTOCOL_ERROR));
    }
    match head.kind {
        frame::DATA => on_data(conn, fwd, head, payload),
        frame::HEADERS => {
            let range = frame::strip(&head, payload).map_err(|_| Fatal(frame::PROTOCOL_ERROR))?;
            if head.has(frame::END_HEADERS) {
                on_headers(conn, fwd, head.stream, head.flags, &payload[range])
            } else {
                *conn.partial.borrow_mut() =
                    Some((head.stream, head.flags, BytesMut::from(&payload[range])));
                Ok(())
            }
        }
        frame::CONTINUATION => {
            let mut partial = conn.partial.borrow_mut();
            let Some((stream, flags, block)) = partial.as_mut() else {
                return Err(Fatal(frame::PROTOCOL_ERROR));
            };
            block.extend_from_slice(payload);
            if head.has(frame::END_HEADERS) {
                let (stream, flags, block) = (*stream, *flags, std::mem::take(block));
                *partial = None;
                drop(partial);
                return on_headers(conn, fwd, stream, flags, &block);
            }
            Ok(())
        }
        frame::RST_STREAM => {
            let route = conn.routes.borrow_mut().remove(&head.stream);
            if let Some(route) = route {
                route.peer.routes.borrow_mut().remove(&route.peer_stream);
                let code = match payload.try_into() {
                    Ok(code) => u32::from_be_bytes(code),
                    Err(_) => return Err(Fatal(frame::FRAME_SIZE_ERROR)),
                };
                frame::put_rst(&mut route.peer.out.borrow_mut(), route.peer_stream, code);
                fwd.mark(&route.peer);
            }
            Ok(())
        }
        frame::SETTINGS => on_settings(conn, fwd, head, payload),
        frame::PING => {
            if !head.has(frame::ACK) {
                let mut out = conn.out.borrow_mut();
                frame::put_head(&mut out, payload.len(), frame::PING, frame::ACK, 0);
                out.extend_from_slice(payload);
            }
            Ok(())
        }
        frame::WINDOW_UPDATE => {
            let increment = u32::from_be_bytes(
                payload
                    .try_into()
                    .map_err(|_| Fatal(frame::FRAME_SIZE_ERROR))?,
            ) & 0x7fff_ffff;
            if head.stream == 0 {
                conn.send_window
                    .set(conn.send_window.get() + increment as i64);
                flow::drain_blocked(fwd, conn);
            } else {
                if let Some(route) = conn.routes.borrow_mut().get_mut(&head.stream) {
                    route.send_window += increment as i64;
                }
                flow::drain(fwd, conn, head.stream);
            }
            Ok(())
        }
        frame::GOAWAY => {
            on_goaway(conn, fwd, payload);
            Ok(())
        }
        frame::PUSH_PROMISE => Err(Fatal(frame::PROTOCOL_ERROR)),
        // PRIORITY and unknown types are ignored, as the RFC asks.
        _ => Ok(()),
    }
}

fn on_settings(conn: &Rc<Conn>, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    if head.has(frame::ACK) {
        return Ok(());
    }
    if !payload.len().is_multiple_of(6) {
        return Err(Fatal(frame::FRAME_SIZE_ERROR));
    }
    let mut grew = false;
    for setting in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([setting[0], setting[1]]);
        let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
        match id {
            frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                if value > 0x7fff_ffff {
                    return Err(Fatal(frame::FLOW_CONTROL_ERROR));
                }
                let delta = value as i64 - conn.peer_initial_window.replace(value as i64);
                for route in conn.routes.borrow_mut().values_mut() {
                    route.send_window += delta;
                }
                grew |= delta > 0;
            }
            frame::SETTINGS_MAX_FRAME_SIZE => {
                if !(16_384..=16_777_215).contains(&value) {
                    return Err(Fatal(frame::PROTOCOL_ERROR));
                }
                conn.peer_max_frame.set(value as usize);
            }
            _ => {}
        }
    }
    frame::put_head(
        &mut conn.out.borrow_mut(),
        0,
        frame::SETTINGS,
        frame::ACK,
        0,
    );
    if grew {
        flow::drain_all(fwd, conn);
    }
    Ok(())
}

/// An endpoint that is leaving takes no new streams; those above its last processed stream
/// were never seen by it, and are refused to their clients (a client may retry them
/// anywhere). A client's GOAWAY ends its connection once its streams are done.
fn on_goaway(conn: &Rc<Conn>, fwd: &Forwarder, payload: &[u8]) {
    conn.leaving.set(true);
    let last = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_be_bytes(b) & 0x7fff_ffff);
    if conn.role == Role::Upstream {
        let refused: Vec<u32> = conn
            .routes
            .borrow()
            .keys()
            .copied()
            .filter(|&id| id > last)
            .collect();
        for id in refused {
            if let Some(route) = conn.routes.borrow_mut().remove(&id) {
                route.peer.routes.borrow_mut().remove(&route.peer_stream);
                frame::put_rst(
                    &mut route.peer.out.borrow_mut(),
                    route.peer_stream,
                    frame::REFUSED_STREAM,
                );
                fwd.mark(&route.peer);
            }
        }
    }
    if conn.routes.borrow().is_empty() {
        conn.closed.set(true);
    }
}

fn on_data(conn: &Rc<Conn>, fwd: &Forwarder, head: Head, payload: &[u8]) -> Result<(), Fatal> {
    let range = frame::strip(&head, payload).map_err(|_| Fatal(frame::PROTOCOL_ERROR))?;
    let data = &payload[range];
    // Padding is never passed on: its share of the window comes back at once.
    let padding = head.len - data.len();
    let end = head.has(frame::END_STREAM);
    let target = {
        let mut routes = conn.routes.borrow_mut();
        routes.get_mut(&head.stream).map(|route| {
            route.ended |= end;
            (route.peer.clone(), route.peer_stream)
        })
    };
    let Some((peer, peer_stream)) = target else {
        // A stream already gone: its bytes still count against the connection's window.
        flow::credit(fwd, conn, head.stream, head.len);
        return Ok(());
    };
    flow::credit(fwd, conn, head.stream, padding);
    flow::send_data(fwd, &peer, peer_stream, data, end);
    if end {
        end_if_done(conn, head.stream);
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
        .map(|r| (r.peer.clone(), r.peer_stream));
    let (peer, peer_stream, opening) = match known {
        Some((peer, peer_stream)) => (peer, peer_stream, false),
        None if conn.role == Role::Downstream && stream % 2 == 1 => {
            let Some(endpoint) = fwd.pick() else {
                frame::put_rst(&mut conn.out.borrow_mut(), stream, frame::REFUSED_STREAM);
                // The block must still be decoded: it changes the connection's table.
                return decode(conn, block, |_, _, _| {});
            };
            let upstream_stream = endpoint.next_stream.get();
            endpoint.next_stream.set(upstream_stream + 2);
            conn.routes
                .borrow_mut()
                .insert(stream, route(&endpoint, upstream_stream, conn));
            endpoint
                .routes
                .borrow_mut()
                .insert(upstream_stream, route(conn, stream, &endpoint));
            (endpoint, upstream_stream, true)
        }
        // Headers for a stream we do not know (reset meanwhile): decoded, dropped.
        None => return decode(conn, block, |_, _, _| {}),
    };
    let mut frames = BytesMut::new();
    let at = frame::begin_frame(
        &mut frames,
        frame::HEADERS,
        frame::END_HEADERS | (flags & frame::END_STREAM),
        peer_stream,
    );
    decode(conn, block, |name, value, indexing| {
        hpack::encode_field(&mut frames, name, value, indexing)
    })?;
    frame::finish_headers(&mut frames, at, peer.peer_max_frame.get());
    if opening {
        peer.out.borrow_mut().extend_from_slice(&frames);
        fwd.mark(&peer);
    } else {
        flow::send_trailers(fwd, &peer, peer_stream, frames);
    }
    if end {
        if let Some(route) = conn.routes.borrow_mut().get_mut(&stream) {
            route.ended = true;
        }
        end_if_done(conn, stream);
    }
    Ok(())
}

/// The route on `owner` for a stream that continues on `peer`'s `peer_stream`.
fn route(peer: &Rc<Conn>, peer_stream: u32, owner: &Conn) -> Route {
    Route {
        peer: peer.clone(),
        peer_stream,
        ended: false,
        unacked: 0,
        send_window: owner.peer_initial_window.get(),
        pending: Pending::default(),
    }
}

fn decode(
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
fn end_if_done(conn: &Conn, stream: u32) {
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
