//! The upstream's endpoints, each with one connection kept up: the set follows discovery (a
//! `watch` of addresses), an endpoint new in it gets a keeper task, one gone from it takes no
//! new calls and its connection closes once its streams are done.
//!
//! The keeper connects with a timeout, and the connection takes calls once the endpoint has
//! answered a first PING: it has then accepted the connection and read our preface, so the
//! first call's answer measures the call and not the connection's setup (a latency sample that
//! included it would make a new endpoint look slow). A connection that ends, or that the
//! endpoint leaves with GOAWAY, is replaced at once if it had served, or after a backoff
//! (50 ms doubling to 5 s, with jitter) if it never became ready, as fanout-proxy's endpoint
//! task does. A keepalive PING every interval finds a pod that vanished without a FIN or RST;
//! that task lives in the connection's own loop (`super::task::run`).

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use fanout_balance::Candidate;
use fanout_balance::eject::{self, Ejection};
use fanout_balance::latency::{Clock, Latency};
use fanout_balance::split::SplitSpec;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::report::EndpointReport;
use super::{Conn, Forwarder, Role};
use crate::frame;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Timeouts of the endpoint connections; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// A TCP connect, and the endpoint's answer to the first PING, each get this long.
    pub connect_timeout: Duration,
    /// A keepalive PING after this long since the last one was answered…
    pub keepalive_interval: Duration,
    /// …and the connection is dropped if its answer takes longer than this.
    pub keepalive_timeout: Duration,
    /// The upstream's timeout for a call, when the client's deadline is later or absent.
    pub call_timeout: Option<Duration>,
    /// A call with nothing moving either way for this long ends (DEADLINE_EXCEEDED).
    pub idle_timeout: Option<Duration>,
    /// Passive ejection of endpoints that keep failing calls.
    pub ejection: fanout_proxy_config::Ejection,
    /// Connections kept to each endpoint (by each engine thread); taken when the endpoint
    /// joins the set.
    pub connections: usize,
    /// The largest request body kept for sending a request again; 0: no retries at all.
    pub replay_limit: usize,
    /// How each call's endpoint is picked.
    pub balancer: fanout_proxy_config::Balancer,
}

impl Default for Settings {
    /// fanout-proxy's values (and no timeout of the upstream's own).
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            call_timeout: None,
            idle_timeout: None,
            ejection: fanout_proxy_config::Ejection::default(),
            connections: 1,
            replay_limit: super::replay::LIMIT,
            balancer: fanout_proxy_config::Balancer::default(),
        }
    }
}

/// One endpoint as the balancer sees it.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Its connections by slot, each from its connect until it ends or leaves; one takes
    /// calls once ready.
    conns: RefCell<Vec<Option<Rc<Conn>>>>,
    /// The slot the next call starts looking at, so calls take the pool's connections in turn.
    next_conn: Cell<usize>,
    /// Gone from the endpoint set: its keeper stops.
    removed: Cell<bool>,
    /// A connection of its failed, or never became ready: it is not worth waiting for.
    failed_once: Cell<bool>,
    /// Wakes the keeper when the endpoint is removed.
    wake: Notify,
    pub(super) outstanding: Cell<usize>,
    pub(super) latency: RefCell<Latency>,
    last_pick: Cell<u64>,
    /// Attempts started here.
    pub(super) started: Cell<u64>,
    /// Calls ended here, by grpc-status (`None`: no status, the stream was reset).
    counters: RefCell<Vec<(Option<u16>, Counter)>>,
    /// Where its state is copied for the proxy (`report.rs`), and what was copied last.
    pub(super) report: Arc<EndpointReport>,
    pub(super) published: Cell<Option<super::report::View>>,
    /// Its failures in a row, and whether (and how long) it is out of balancing.
    ejection: RefCell<Ejection>,
    /// Set while an ejection may be running, so picks skip the clock otherwise.
    maybe_ejected: Cell<bool>,
    /// Its forwarder, which weighs an ejection against the whole set.
    upstream: Weak<Forwarder>,
}

impl Endpoint {
    fn new(
        addr: SocketAddr,
        pool: usize,
        report: Arc<EndpointReport>,
        upstream: Weak<Forwarder>,
    ) -> Rc<Endpoint> {
        Rc::new(Endpoint {
            addr,
            conns: RefCell::new(vec![None; pool.max(1)]),
            next_conn: Cell::new(0),
            removed: Cell::new(false),
            failed_once: Cell::new(false),
            wake: Notify::new(),
            outstanding: Cell::new(0),
            latency: RefCell::new(Latency::new(Instant::now())),
            last_pick: Cell::new(0),
            started: Cell::new(0),
            counters: RefCell::new(Vec::new()),
            report,
            published: Cell::new(None),
            ejection: RefCell::new(Ejection::default()),
            maybe_ejected: Cell::new(false),
            upstream,
        })
    }

    pub fn is_ejected(&self) -> bool {
        if !self.maybe_ejected.get() {
            return false;
        }
        let ejected = self.ejection.borrow().is_ejected(Instant::now());
        self.maybe_ejected.set(ejected);
        ejected
    }

    /// A call here ended with `status` at `now`: an endpoint that keeps failing is taken out
    /// of balancing for a while, unless too many are out already (the panic threshold).
    pub(super) fn record_outcome(&self, status: Option<u16>, now: Instant) {
        let Some(fwd) = self.upstream.upgrade() else {
            return;
        };
        let config = fwd.settings().ejection;
        let failed = eject::is_failure(status);
        if !self
            .ejection
            .borrow_mut()
            .record(failed, config.consecutive_failures, now)
        {
            return;
        }
        let endpoints = fwd.endpoints.borrow();
        let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
        if eject::may_eject(ejected, endpoints.len(), config.max_ejected_percent) {
            let length = self
                .ejection
                .borrow_mut()
                .eject(config.base_time, config.max_time, now);
            self.maybe_ejected.set(true);
            fwd.report_now.notify_one();
            // When it ends, calls held for a ready endpoint may take this one.
            let upstream = self.upstream.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(length).await;
                if let Some(fwd) = upstream.upgrade() {
                    fwd.report_now.notify_one();
                    super::held::open_waiting(&fwd);
                    fwd.flush_dirty();
                }
            });
        }
    }

    /// Its first connection became ready, or one failed.
    pub fn is_settled(&self) -> bool {
        self.failed_once.get() || self.ready_conn().is_some()
    }

    /// The connection to open a call on, when one is ready: the pool's in turn.
    pub fn ready_conn(&self) -> Option<Rc<Conn>> {
        let conns = self.conns.borrow();
        if let [only] = conns.as_slice() {
            return only.as_ref().filter(|c| c.takes_calls()).cloned();
        }
        let start = self.next_conn.get();
        self.next_conn.set(start.wrapping_add(1));
        (0..conns.len()).find_map(|i| {
            conns[(start + i) % conns.len()]
                .as_ref()
                .filter(|c| c.takes_calls())
                .cloned()
        })
    }

    /// Connections of its pool taking calls.
    pub fn ready_connections(&self) -> usize {
        let conns = self.conns.borrow();
        conns.iter().flatten().filter(|c| c.takes_calls()).count()
    }

    /// A connection of it failed, or never became ready.
    pub fn has_failed(&self) -> bool {
        self.failed_once.get()
    }

    pub(super) fn count(&self, status: Option<u16>) {
        super::report::count_in(&self.counters, status, || {
            let fwd = self.upstream.upgrade()?;
            Some(fwd.calls.observer.requests(Some(self.addr), status))
        });
    }
}

impl Candidate for Endpoint {
    fn is_ready(&self) -> bool {
        let conns = self.conns.borrow();
        conns.iter().flatten().any(|c| c.takes_calls()) && !self.is_ejected()
    }
    fn outstanding(&self) -> usize {
        self.outstanding.get()
    }
    fn latency(&self, clock: &Clock) -> Option<f64> {
        self.latency.borrow().balancing(clock)
    }
    fn last_pick(&self) -> u64 {
        self.last_pick.get()
    }
    fn set_last_pick(&self, pick: u64) {
        self.last_pick.set(pick);
    }
}

/// Keeps the forwarder's endpoints equal to the latest set, until its sender is gone (the
/// last set then stays).
pub async fn follow(mut set: watch::Receiver<Vec<SocketAddr>>, fwd: Rc<Forwarder>) {
    loop {
        let addrs: HashSet<SocketAddr> = set.borrow_and_update().iter().copied().collect();
        update(&fwd, &addrs);
        if set.changed().await.is_err() {
            return;
        }
    }
}

fn update(fwd: &Rc<Forwarder>, addrs: &HashSet<SocketAddr>) {
    let mut endpoints = fwd.endpoints.borrow_mut();
    let mut known = HashSet::with_capacity(endpoints.len());
    endpoints.retain(|endpoint| {
        let kept = addrs.contains(&endpoint.addr);
        if kept {
            known.insert(endpoint.addr);
        } else {
            endpoint.removed.set(true);
            // Every keeper of its pool waits on it.
            endpoint.wake.notify_waiters();
            endpoint.report.forget(fwd.thread);
        }
        kept
    });
    for &addr in addrs.difference(&known) {
        let report = fwd.calls.observer.endpoint(addr);
        let pool = fwd.settings().connections;
        let endpoint = Endpoint::new(addr, pool, report, Rc::downgrade(fwd));
        endpoints.push(endpoint.clone());
        for slot in 0..pool.max(1) {
            tokio::task::spawn_local(keep_connected(endpoint.clone(), slot, fwd.clone()));
        }
    }
    fwd.picker.set_endpoint_count(endpoints.len());
    drop(endpoints);
    fwd.regroup();
}

/// Keeps the forwarder's split equal to the latest spec, until its sender is gone.
pub async fn follow_split(mut spec: watch::Receiver<Option<SplitSpec>>, fwd: Rc<Forwarder>) {
    loop {
        let current = spec.borrow_and_update().clone();
        *fwd.split_spec.borrow_mut() = current;
        fwd.regroup();
        if spec.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the connection of `slot` of `endpoint`'s pool up until the endpoint is removed.
async fn keep_connected(endpoint: Rc<Endpoint>, slot: usize, fwd: Rc<Forwarder>) {
    let settings = fwd.settings();
    let mut backoff = BACKOFF_MIN;
    while !endpoint.removed.get() {
        let connect =
            tokio::time::timeout(settings.connect_timeout, TcpStream::connect(endpoint.addr));
        let connected = tokio::select! {
            connected = connect => connected,
            () = endpoint.wake.notified() => continue,
        };
        if let Ok(Ok(io)) = connected {
            let conn = Conn::new(Role::Upstream, io);
            conn.flush();
            endpoint.conns.borrow_mut()[slot] = Some(conn.clone());
            tokio::task::spawn_local(super::task::run(conn.clone(), fwd.clone()));
            tokio::select! {
                () = conn.retired.notified() => {}
                () = endpoint.wake.notified() => {}
            }
            endpoint.conns.borrow_mut()[slot].take();
            fwd.report_now.notify_one();
            if endpoint.removed.get() {
                leave(&conn, &fwd);
                return;
            }
            if conn.ready.get() {
                // It served: a pod restarting, or a connection its server ended. Its
                // replacement is wanted at once.
                backoff = BACKOFF_MIN;
                continue;
            }
        }
        if !endpoint.failed_once.replace(true) {
            fwd.endpoint_settled.notify_waiters();
            fwd.report_now.notify_one();
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            () = endpoint.wake.notified() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// We leave `conn` (its endpoint was removed): GOAWAY, no new streams, and it closes once its
/// streams are done.
fn leave(conn: &Rc<Conn>, fwd: &Forwarder) {
    if !conn.leaving.replace(true) {
        frame::put_goaway(&mut conn.out.borrow_mut(), 0, frame::NO_ERROR);
    }
    fwd.mark(conn);
    fwd.flush_dirty();
    // Its task checks whether it is done.
    conn.write_blocked.notify_one();
}
