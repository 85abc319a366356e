//! The measuring spike: a forwarder built the way issue 13's proposal describes, reduced to
//! what a benchmark exercises plus the protocol a real peer needs, to learn what such a data
//! path costs per call before building the real one.
//!
//! One thread; every connection (`conn.rs`) is an `Rc` owned by one task that reads its socket
//! and forwards each frame at once into the other connection's output buffer (header blocks
//! re-encoded field by field, DATA copied under flow control, `flow.rs`); when a batch of
//! reads is done, every connection written to is flushed with one write, from the task that
//! read, without waking the other task.
//!
//! Protocol checks follow RFC 9113: frames of the wrong size or on the wrong stream end the
//! connection with GOAWAY and the RFC's code (`control.rs`), stream state errors and malformed
//! messages (`fields.rs`) reset their stream (`streams.rs`), both flow-control windows are
//! kept both ways (`flow.rs`).
//!
//! Every call also gets the bookkeeping fanout gives it (`account.rs`): fanout's balancer
//! picks the endpoint, and the call is counted and timed as fanout's metrics do.
//!
//! The endpoints follow a set of addresses, each with one connection kept up (`endpoint.rs`):
//! the first step of the sprint that would make this the real data path (`DESIGN.md`).
//!
//! The call layer of that sprint, so far: a new request takes the rules that apply to it
//! (`open.rs`: the Service's method timeout and `waitForReady`, the upstream's timeouts);
//! calls end at their deadline or idle timeout (`deadline.rs`); a call with no endpoint ready
//! waits for one (`held.rs`); a request an endpoint did not process opens again elsewhere
//! (`replay.rs`).
//!
//! Left out on purpose (the real layer needs each): health checks, ejection, the Service's
//! retry policy, the split, the admin endpoint, limits on streams per endpoint.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use fanout_balance::Picker;
use fanout_proxy_config::Balancer;
use fanout_proxy_config::service_config::ServiceConfig;

use bytes::{Buf, BytesMut};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};

use crate::frame::{self, Head};

mod account;
mod answer;
mod conn;
mod control;
mod deadline;
mod endpoint;
mod fields;
mod flow;
mod held;
mod open;
mod policy;
mod replay;
mod streams;

use endpoint::Endpoint;
pub use endpoint::Settings;

pub use conn::Conn;
use conn::Role;

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
const READ_CHUNK: usize = 64 * 1024;
/// Streams a client may have open at once (our SETTINGS_MAX_CONCURRENT_STREAMS).
const MAX_STREAMS: u32 = 10_000;
/// The largest header block taken in (HEADERS and CONTINUATIONs together).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Retries may add this share of the calls (fanout's default `retry.budget_percent`).
const RETRY_BUDGET_PERCENT: u32 = 20;

pub struct Forwarder {
    /// The one read buffer of the thread (see `run`).
    read: RefCell<BytesMut>,
    endpoints: RefCell<Vec<Rc<Endpoint>>>,
    picker: Picker,
    dirty: RefCell<Vec<Rc<Conn>>>,
    settings: Settings,
    /// The upstream's call durations, shared by its endpoints.
    duration: prometheus_client::metrics::histogram::Histogram,
    /// Woken when an endpoint's first connection became ready or failed.
    endpoint_settled: Notify,
    deadlines: Rc<deadline::Deadlines>,
    /// Retries may add at most a fifth of the calls.
    budget: fanout_balance::budget::Budget,
    /// The Service's service config, this thread's copy (`open::follow`).
    service_config: RefCell<Option<Rc<open::ServiceRules>>>,
    /// Calls waiting for an endpoint to become ready.
    held: RefCell<Vec<held::Held>>,
}

impl Forwarder {
    fn mark(&self, conn: &Rc<Conn>) {
        if !conn.dirty.replace(true) {
            self.dirty.borrow_mut().push(conn.clone());
        }
    }

    /// Flushes every connection written to; one whose output drained below half its bound
    /// takes on the streams that waited for room, which may write (and credit) again.
    fn flush_dirty(&self) {
        loop {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            if dirty.is_empty() {
                return;
            }
            for conn in dirty {
                conn.flush();
                // Its last stream may have ended from the other side: its task closes it.
                if conn.is_done() {
                    conn.write_blocked.notify_one();
                }
                let room = conn.out.borrow().len() < flow::MAX_OUT / 2;
                if room && !conn.blocked.borrow().is_empty() {
                    flow::drain_blocked(self, &conn);
                }
            }
        }
    }

    fn pick(&self) -> Option<Rc<Endpoint>> {
        self.picker.pick(&self.endpoints.borrow())
    }

    /// Until every endpoint's first connection became ready or failed.
    async fn endpoints_settled(&self) {
        loop {
            let woken = self.endpoint_settled.notified();
            let settled = {
                let endpoints = self.endpoints.borrow();
                !endpoints.is_empty() && endpoints.iter().all(|e| e.is_settled())
            };
            if settled {
                return;
            }
            woken.await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpikeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Serves clients on `listen` in front of `endpoints` until the task ends. Must run inside a
/// `LocalSet`.
pub async fn serve(listen: SocketAddr, endpoints: &[SocketAddr]) -> Result<(), SpikeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| SpikeError::Listen {
            addr: listen,
            source,
        })?;
    let (_keep, set) = watch::channel(endpoints.to_vec());
    serve_on(listener, Upstream::following(set, Settings::default())).await;
    Ok(())
}

/// What the spike serves: an upstream's live endpoint set and its Service's live service
/// config, and its settings.
pub struct Upstream {
    pub endpoints: watch::Receiver<Vec<SocketAddr>>,
    pub service_config: watch::Receiver<Option<Arc<ServiceConfig>>>,
    pub settings: Settings,
}

impl Upstream {
    /// The endpoints of `set`, with no service config.
    pub fn following(set: watch::Receiver<Vec<SocketAddr>>, settings: Settings) -> Self {
        Upstream {
            endpoints: set,
            service_config: watch::channel(None).1,
            settings,
        }
    }
}

/// Serves clients on a listener already bound, in front of `upstream` as it changes.
/// Clients are taken once every endpoint's first connection is ready or has failed (or after
/// the connect timeout), so the first calls neither fail nor all go to the endpoint that
/// happened to connect first while the others are still connecting.
pub async fn serve_on(listener: TcpListener, upstream: Upstream) {
    let Upstream {
        endpoints: set,
        service_config,
        settings,
    } = upstream;
    let forwarder = Rc::new(Forwarder {
        endpoints: RefCell::new(Vec::new()),
        picker: Picker::new(Balancer::PeakEwma),
        dirty: RefCell::new(Vec::new()),
        read: RefCell::new(BytesMut::with_capacity(READ_CHUNK)),
        settings,
        duration: account::duration_histogram(),
        endpoint_settled: Notify::new(),
        deadlines: Rc::default(),
        budget: fanout_balance::budget::Budget::new(RETRY_BUDGET_PERCENT),
        service_config: RefCell::new(None),
        held: RefCell::new(Vec::new()),
    });
    tokio::task::spawn_local(open::follow(service_config, forwarder.clone()));
    tokio::task::spawn_local(deadline::run(forwarder.clone()));
    let any_wanted = !set.borrow().is_empty();
    tokio::task::spawn_local(endpoint::follow(set, forwarder.clone()));
    if any_wanted {
        let settled = forwarder.endpoints_settled();
        let _ = tokio::time::timeout(settings.connect_timeout, settled).await;
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

/// Runs the spike on a thread of its own (a one-thread runtime), in front of `endpoints`,
/// serving `listener` (non-blocking); for tests, which run it beside their own runtime.
pub fn spawn_thread(listener: std::net::TcpListener, endpoints: Vec<SocketAddr>) {
    spawn_thread_following(listener, watch::channel(endpoints).1, Settings::default());
}

/// As [`spawn_thread`], in front of the endpoints of `set` as it changes.
pub fn spawn_thread_following(
    listener: std::net::TcpListener,
    set: watch::Receiver<Vec<SocketAddr>>,
    settings: Settings,
) {
    spawn_thread_serving(listener, Upstream::following(set, settings));
}

/// As [`spawn_thread`], in front of `upstream`.
pub fn spawn_thread_serving(listener: std::net::TcpListener, upstream: Upstream) {
    let thread = std::thread::Builder::new().name(THREAD_NAME.into());
    let spawned = thread.spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a one-thread runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let listener = TcpListener::from_std(listener).expect("a non-blocking listener");
            serve_on(listener, upstream).await
        })
    });
    spawned.expect("a thread for the spike");
}

/// The name of the thread [`spawn_thread`] starts, for tests that watch it for panics.
pub const THREAD_NAME: &str = "fanout-wire-spike";

async fn run(conn: Rc<Conn>, forwarder: Rc<Forwarder>) {
    // What was read and not yet a whole frame, until the next read completes it. The read
    // itself goes into the thread's one buffer: an idle connection holds no read buffer.
    let mut stash = BytesMut::new();
    let mut preface_seen = conn.role == Role::Upstream;
    let upstream = conn.role == Role::Upstream;
    // An endpoint's connection: the first PING's answer is due within the connect timeout,
    // then keepalives (`keepalive`).
    let keepalive = tokio::time::sleep(forwarder.settings.connect_timeout);
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
                if !keepalive_due(&conn, &forwarder.settings, keepalive.as_mut()) {
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
                (14, fanout_balance::retry::Pushback::Absent),
                &conn,
                || policy::Fallback::Reset(frame::CANCEL),
            ) == policy::Outcome::Retried;
        if retried {
            streams::give_back(&forwarder, &route);
        } else {
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
    match conn.io.try_read_buf(&mut *read) {
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
struct Fatal(u32);

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
