//! A client's new request (HEADERS on a stream it opens): its header block checked and
//! re-encoded once, the rules that apply to it taken on the way — the deadline (the client's
//! `grpc-timeout`, the upstream's timeout or the Service's timeout for the method, the
//! soonest), the idle timeout, `waitForReady` — an endpoint picked and the stream opened on
//! it. With no endpoint ready the call is held (`held.rs`) or answered at once.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fanout_balance::latency::Clock;
use fanout_balance::retry::Throttle;
use fanout_proxy_config::service_config::{RetryPolicy, ServiceConfig};
use tokio::sync::watch;
use tokio::time::Instant;

use super::account::CallAccount;
use super::deadline::{self, Kind};
use super::endpoint::Endpoint;
use super::fields::{Block, FieldCheck};
use super::replay::{self, Replay};
use super::report::CallGuard;
use super::streams::{decode, is_idle, route};
use super::{Conn, Fatal, Forwarder, MAX_STREAMS, Role, flow, held};
use crate::frame;
use crate::hpack;

/// Room for a header block's frames as re-encoded (fields written out without a table):
/// enough for a usual gRPC request or answer, so that the buffer does not grow field by field.
pub const HEADER_FRAMES_CAPACITY: usize = 512;

/// A request ready to open on an endpoint.
pub struct Opening {
    /// Its HEADERS and CONTINUATION frames, whole; the stream id is written when it opens.
    pub frames: BytesMut,
    /// The request ended with its headers.
    pub end: bool,
    pub arrived: Instant,
    pub deadline: Option<Instant>,
    pub idle: Option<Duration>,
    /// The retry rules of its method.
    pub retry: Option<Rc<MethodRetry>>,
    /// Times it was opened before (on other endpoints).
    pub reopens: u8,
    /// Its body went to an endpoint before, and was credited to the client then.
    pub replayed: bool,
    /// The call, counted from its arrival until it ends.
    pub call: Option<CallGuard>,
}

/// The Service's service config as this thread applies it: each method's retry rules built
/// once, and the retry throttle (shared by the upstream's threads), whose tokens start afresh
/// with every new config.
pub struct ServiceRules {
    config: Arc<ServiceConfig>,
    /// By the index of the method's config.
    retries: Vec<Option<Rc<MethodRetry>>>,
}

/// A method's retry policy and the Service's retry throttle, held by each of its calls: a
/// config change mid-call does not change the rules under it.
pub struct MethodRetry {
    pub policy: Option<RetryPolicy>,
    pub throttle: Option<Arc<Throttle>>,
}

/// The Service's retry throttle, one for all the threads of an upstream, as gRFC A6 keeps one
/// per channel: the first thread to apply a service config makes it, the others find it.
#[derive(Default)]
pub struct SharedThrottle {
    /// The config it was made for (alive while any thread applies it), and the throttle.
    current: std::sync::Mutex<Option<(std::sync::Weak<ServiceConfig>, Arc<Throttle>)>>,
}

impl SharedThrottle {
    /// The throttle of `config`, if it sets `retryThrottling`.
    pub fn of(&self, config: &Arc<ServiceConfig>) -> Option<Arc<Throttle>> {
        let settings = config.retry_throttling.as_ref()?;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, throttle)) = &*current
            && seen
                .upgrade()
                .is_some_and(|seen| Arc::ptr_eq(&seen, config))
        {
            return Some(throttle.clone());
        }
        let throttle = Arc::new(Throttle::new(settings));
        *current = Some((Arc::downgrade(config), throttle.clone()));
        Some(throttle)
    }
}

impl ServiceRules {
    fn new(config: Arc<ServiceConfig>, shared: &SharedThrottle) -> Self {
        let throttle = shared.of(&config);
        let retries = config
            .methods
            .iter()
            .map(|method| {
                let policy = method.retry.clone();
                (policy.is_some() || throttle.is_some()).then(|| {
                    Rc::new(MethodRetry {
                        policy,
                        throttle: throttle.clone(),
                    })
                })
            })
            .collect();
        ServiceRules { config, retries }
    }
}

/// What the Service's service config says of one method.
#[derive(Default)]
struct MethodRules {
    timeout: Option<Duration>,
    wait_for_ready: bool,
    retry: Option<Rc<MethodRetry>>,
}

impl MethodRules {
    fn of(rules: &ServiceRules, path: &[u8]) -> Self {
        let index = std::str::from_utf8(path)
            .ok()
            .and_then(|path| rules.config.method_index(path));
        let Some(index) = index else {
            return Self::default();
        };
        let method = &rules.config.methods[index];
        MethodRules {
            timeout: method.timeout,
            wait_for_ready: method.wait_for_ready == Some(true),
            retry: rules.retries[index].clone(),
        }
    }
}

/// Keeps the thread's copy of the Service's service config equal to the latest, until its
/// sender is gone (the last one then stays).
pub async fn follow(
    mut service_config: watch::Receiver<Option<Arc<ServiceConfig>>>,
    fwd: Rc<Forwarder>,
) {
    loop {
        let current = service_config.borrow_and_update().clone();
        *fwd.service_config.borrow_mut() =
            current.map(|c| Rc::new(ServiceRules::new(c, &fwd.throttle)));
        if service_config.changed().await.is_err() {
            return;
        }
    }
}

/// HEADERS on a stream this connection has no route for: a client's new request, or (on an
/// endpoint's connection) a stream reset meanwhile.
pub fn open(
    conn: &Rc<Conn>,
    fwd: &Forwarder,
    stream: u32,
    flags: u8,
    block: &[u8],
) -> Result<(), Fatal> {
    if conn.role == Role::Upstream
        || stream.is_multiple_of(2)
        || stream <= conn.last_peer_stream.get()
    {
        // Only clients open streams, with ever larger odd ids (§5.1.1); a stream we reset
        // may still get headers, which are decoded (they change the table) and dropped.
        if is_idle(conn, stream) || (conn.role == Role::Downstream && stream.is_multiple_of(2)) {
            return Err(Fatal(frame::PROTOCOL_ERROR));
        }
        decode(conn, block, |_, _, _| {})?;
        // Trailers of a request held for an endpoint (gRPC clients send none): it was not
        // processed, and the client may send it again.
        held::reset(fwd, conn, stream, frame::REFUSED_STREAM);
        return Ok(());
    }
    conn.last_peer_stream.set(stream);
    let end = flags & frame::END_STREAM != 0;
    let mut check = FieldCheck::new(Block::Request);
    // Sized for a usual request's fields re-encoded without a table: no growth per call.
    let mut frames = BytesMut::with_capacity(HEADER_FRAMES_CAPACITY.max(2 * block.len()));
    // The endpoint's stream id is known only once an endpoint is picked: written then.
    let at = frame::begin_frame(
        &mut frames,
        frame::HEADERS,
        frame::END_HEADERS | (flags & frame::END_STREAM),
        0,
    );
    let mut client_timeout = None;
    let mut method = MethodRules::default();
    {
        let service_config = fwd.service_config.borrow();
        decode(conn, block, |name, value, indexing| {
            check.field(name, value);
            if name == b":path"
                && let Some(config) = service_config.as_deref()
            {
                method = MethodRules::of(config, value);
            }
            if name == b"grpc-timeout"
                && let Some(timeout) = deadline::parse_timeout(value)
            {
                // Passed on below, once the deadline is known.
                client_timeout = Some(timeout);
                return;
            }
            hpack::encode_field(&mut frames, name, value, indexing)
        })?;
    }
    let timeout = [client_timeout, fwd.settings().call_timeout, method.timeout]
        .into_iter()
        .flatten()
        .min();
    if let Some(timeout) = timeout {
        let passed_on = deadline::format_timeout(timeout + deadline::SLACK);
        hpack::encode_field(
            &mut frames,
            b"grpc-timeout",
            passed_on.as_bytes(),
            hpack::Indexing::Allowed,
        );
    }
    let refuse = |code| {
        frame::put_rst(&mut conn.out.borrow_mut(), stream, code);
        Ok(())
    };
    if !check.is_valid() {
        return refuse(frame::PROTOCOL_ERROR);
    }
    if conn.routes.borrow().len() >= MAX_STREAMS as usize || conn.leaving.get() {
        return refuse(frame::REFUSED_STREAM);
    }
    // Every peer takes frames of the default size: the request can go to any endpoint as is.
    frame::finish_headers(&mut frames, at, frame::DEFAULT_MAX_FRAME);
    fwd.budget.deposit();
    let clock = fwd.picker.clock();
    let opening = Opening {
        frames,
        end,
        arrived: clock.now,
        deadline: timeout.map(|timeout| clock.now + timeout),
        idle: fwd.settings().idle_timeout,
        retry: method.retry,
        reopens: 0,
        replayed: false,
        call: Some(CallGuard::start(&fwd.calls, clock.now)),
    };
    let Some(picked) = fwd.pick() else {
        held::hold(fwd, conn, stream, opening, method.wait_for_ready);
        return Ok(());
    };
    let Some(endpoint) = picked.ready_conn() else {
        return refuse(frame::REFUSED_STREAM);
    };
    open_on(
        fwd,
        conn,
        stream,
        (picked, &endpoint),
        opening,
        (&[], false),
        &clock,
    );
    Ok(())
}

/// Opens the client's `stream` on `endpoint` (the connection of the endpoint picked):
/// `body`, a body held while the call waited (credited to the client only if it went before,
/// [`Opening::replayed`]), goes after the headers, and `true` in it ends the request.
pub fn open_on(
    fwd: &Forwarder,
    conn: &Rc<Conn>,
    stream: u32,
    (picked, endpoint): (Rc<Endpoint>, &Rc<Conn>),
    opening: Opening,
    (body, body_end): (&[u8], bool),
    clock: &Clock,
) {
    let Opening {
        mut frames,
        end,
        arrived,
        deadline,
        idle,
        retry,
        reopens,
        replayed,
        call,
    } = opening;
    let upstream_stream = endpoint.next_stream.get();
    endpoint.next_stream.set(upstream_stream + 2);
    replay::set_stream(&mut frames, upstream_stream);
    let mut downstream = route(endpoint, upstream_stream, conn, true);
    downstream.call = call;
    downstream.ended = end || body_end;
    if !replayed {
        // Held and not credited yet: the client's window for the stream is that much less.
        downstream.recv_window -= body.len() as i64;
    }
    downstream.deadline = deadline.map(|at| fwd.deadlines.insert(at, conn, stream, Kind::Deadline));
    let mut upstream = route(conn, stream, endpoint, false);
    if let Some(after) = idle {
        let moved = Rc::new(Cell::new(0));
        let kind = Kind::Idle {
            moved: moved.clone(),
            seen: 0,
            after,
        };
        downstream.idle = Some(fwd.deadlines.insert(clock.now + after, conn, stream, kind));
        upstream.moved = Some(moved.clone());
        downstream.moved = Some(moved);
    }
    upstream.account = Some(CallAccount::start(picked, clock));
    downstream.attempt_timer = attempt_timer(fwd, conn, stream, retry.as_deref(), clock.now);
    upstream.retry = retry.clone();
    downstream.retry = retry;
    endpoint.out.borrow_mut().extend_from_slice(&frames);
    let limit = fwd.settings().replay_limit;
    if let Some(mut replay) = Replay::new(frames, arrived, reopens, limit)
        && replay.keep(body, body_end)
    {
        downstream.replay = Some(replay);
    }
    conn.routes.borrow_mut().insert(stream, downstream);
    endpoint
        .routes
        .borrow_mut()
        .insert(upstream_stream, upstream);
    fwd.mark(endpoint);
    if body.is_empty() && !body_end {
        return;
    }
    if replayed {
        flow::send_replayed(fwd, endpoint, upstream_stream, body, body_end);
    } else {
        flow::send_data(fwd, endpoint, upstream_stream, body, body_end);
    }
}

/// The per-attempt timer of an attempt opened at `now`, if the call's retry policy sets one.
pub fn attempt_timer(
    fwd: &Forwarder,
    conn: &Rc<Conn>,
    stream: u32,
    retry: Option<&MethodRetry>,
    now: Instant,
) -> Option<super::deadline::Deadline> {
    let timeout = retry?.policy.as_ref()?.per_attempt_recv_timeout?;
    Some(
        fwd.deadlines
            .insert(now + timeout, conn, stream, Kind::Attempt),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_tokens: u32) -> Arc<ServiceConfig> {
        let text =
            format!(r#"{{"retryThrottling": {{"maxTokens": {max_tokens}, "tokenRatio": 0.1}}}}"#);
        Arc::new(ServiceConfig::parse(&text).expect("a valid service config"))
    }

    #[test]
    fn threads_applying_one_config_share_its_throttle_and_a_new_config_starts_afresh() {
        let shared = SharedThrottle::default();
        let first = config(10);
        let a = shared.of(&first).unwrap();
        let b = shared.of(&first).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "two threads, one throttle");
        // Spent by one thread (10 tokens, 4 failures: 6 left), the other's failure is the
        // one that leaves half or less: retries stop for both.
        for _ in 0..4 {
            assert!(a.failed());
        }
        assert!(!b.failed());
        let next = config(10);
        let c = shared.of(&next).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "a new config, new tokens");
        assert!(c.failed());
        let none = Arc::new(ServiceConfig::parse("{}").unwrap());
        assert!(shared.of(&none).is_none());
    }
}
