//! The engine: fanout-proxy's data path, one forwarder per thread, built the way issue 13's
//! proposal describes (`DESIGN.md`).
//!
//! One thread; every connection (`conn.rs`) is an `Rc` owned by one task (`task.rs`) that
//! reads its socket and forwards each frame at once into the other connection's output buffer
//! (header blocks re-encoded field by field, DATA copied under flow control, `flow.rs`); when
//! a batch of reads is done, every connection written to is flushed with one write, from the
//! task that read, without waking the other task.
//!
//! Protocol checks follow RFC 9113: frames of the wrong size or on the wrong stream end the
//! connection with GOAWAY and the RFC's code (`control.rs`), stream state errors and malformed
//! messages (`fields.rs`) reset their stream (`streams.rs`), both flow-control windows are
//! kept both ways (`flow.rs`).
//!
//! Every call gets fanout's bookkeeping (`account.rs`): fanout's balancer picks the endpoint,
//! its load and latency estimate are kept, and the call is counted and timed; what leaves the
//! thread goes through `report.rs` (the proxy's metrics, drain and `/endpoints`).
//!
//! The endpoints follow a live set of addresses, each with a pool of connections kept up and
//! passive ejection (`endpoint.rs`). A new request takes the rules that apply to it
//! (`open.rs`: the Service's method timeout, `waitForReady` and retry policy, the upstream's
//! timeouts); calls end at their deadline or idle timeout (`deadline.rs`); a call with no
//! endpoint ready waits for one (`held.rs`); a request an endpoint did not process opens
//! again elsewhere (`replay.rs`), and one that failed goes again as the Service's retry
//! policy says (`policy.rs`). A weighted split over Services (a canary) draws the Service
//! before the balancer picks.
//!
//! Not here, by design: discovery, active health checks and the admin endpoint stay in
//! fanout-proxy, which feeds the engine ([`Upstream`]) and reads its reports.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use fanout_balance::Picker;
use fanout_balance::budget::Budget;
use fanout_balance::split::Split;
use fanout_proxy_config::service_config::ServiceConfig;

use bytes::BytesMut;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

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
pub mod report;
mod streams;
mod task;

use task::Fatal;

use endpoint::Endpoint;
pub use endpoint::Settings;
pub use fanout_balance::split::SplitSpec;
pub use open::SharedThrottle;

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
    /// The latest settings (the Service's policy changes some of them live).
    settings: Cell<Settings>,
    /// This thread's calls, and whom they are reported to.
    calls: Rc<report::Calls>,
    /// This thread's number among the engine's threads (for the endpoints' reports).
    thread: usize,
    /// Woken when an endpoint's first connection became ready or failed.
    endpoint_settled: Notify,
    /// An endpoint's state changed in a way `/ready` shows: reported at once, not at the
    /// next period (`report.rs`).
    report_now: Notify,
    deadlines: Rc<deadline::Deadlines>,
    /// Retries may add at most a share of the calls (shared by the engine's threads).
    budget: Arc<Budget>,
    /// The Service's retry throttle, shared with the upstream's other threads.
    throttle: Arc<SharedThrottle>,
    /// The Service's service config, this thread's copy (`open::follow`).
    service_config: RefCell<Option<Rc<open::ServiceRules>>>,
    /// Calls waiting for an endpoint to become ready.
    held: RefCell<Vec<held::Held>>,
    /// The upstream's weighted split over Services, as given and as applied to the endpoints.
    split_spec: RefCell<Option<SplitSpec>>,
    split: RefCell<Option<Split<Rc<Endpoint>>>>,
}

impl Forwarder {
    fn settings(&self) -> Settings {
        self.settings.get()
    }

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

    /// A ready endpoint for a new call: with a split, of the Service drawn by weight.
    fn pick(&self) -> Option<Rc<Endpoint>> {
        if let Some(split) = &*self.split.borrow() {
            return split.pick(|members| self.picker.pick(members));
        }
        self.picker.pick(&self.endpoints.borrow())
    }

    /// Groups the endpoints by the split's Services; endpoints the split does not know are
    /// balanced as one set instead.
    fn regroup(&self) {
        let split = self
            .split_spec
            .borrow()
            .as_ref()
            .map(|spec| Split::new(spec, &self.endpoints.borrow(), |e: &Endpoint| e.addr));
        *self.split.borrow_mut() = split.filter(Split::covers_any);
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

/// What the engine serves, each part live: an upstream's endpoint set, its Service's service
/// config and weighted split, and its settings.
#[derive(Clone)]
pub struct Upstream {
    pub endpoints: watch::Receiver<Vec<SocketAddr>>,
    pub service_config: watch::Receiver<Option<Arc<ServiceConfig>>>,
    pub split: watch::Receiver<Option<SplitSpec>>,
    pub settings: watch::Receiver<Settings>,
}

impl Upstream {
    /// The endpoints of `set`, with no service config.
    pub fn following(set: watch::Receiver<Vec<SocketAddr>>, settings: Settings) -> Self {
        Upstream {
            endpoints: set,
            service_config: watch::channel(None).1,
            split: watch::channel(None).1,
            settings: watch::channel(settings).1,
        }
    }
}

/// How one engine thread runs beside the others: whom it reports to, its number, what the
/// threads share, and when it stops.
#[derive(Clone)]
pub struct Thread {
    pub observer: Arc<dyn report::Observer>,
    pub number: usize,
    /// The retry budget of the upstream, over all its threads.
    pub budget: Arc<Budget>,
    /// The Service's retry throttle, over all the upstream's threads.
    pub throttle: Arc<SharedThrottle>,
    /// `true`: stop taking clients, and end once the calls under way ended.
    pub stop: watch::Receiver<bool>,
}

impl Default for Thread {
    /// Nobody observes, one thread, fanout's default budget, never stopped.
    fn default() -> Self {
        Thread {
            observer: Arc::new(report::Unobserved::default()),
            number: 0,
            budget: Arc::new(Budget::new(RETRY_BUDGET_PERCENT)),
            throttle: Arc::default(),
            stop: watch::channel(false).1,
        }
    }
}

/// Serves clients on a listener already bound, in front of `upstream` as it changes.
/// Clients are taken once every endpoint's first connection is ready or has failed (or after
/// the connect timeout), so the first calls neither fail nor all go to the endpoint that
/// happened to connect first while the others are still connecting.
pub async fn serve_on(listener: TcpListener, upstream: Upstream) {
    serve_thread(listener, upstream, Thread::default()).await
}

/// As [`serve_on`], as one of the engine's threads; returns once stopped and its calls ended.
pub async fn serve_thread(listener: TcpListener, upstream: Upstream, thread: Thread) {
    let Upstream {
        endpoints: set,
        service_config,
        split,
        settings: live_settings,
    } = upstream;
    let Thread {
        observer,
        number,
        budget,
        throttle,
        mut stop,
    } = thread;
    let settings = *live_settings.borrow();
    let forwarder = Rc::new(Forwarder {
        endpoints: RefCell::new(Vec::new()),
        picker: Picker::new(settings.balancer),
        dirty: RefCell::new(Vec::new()),
        read: RefCell::new(BytesMut::with_capacity(READ_CHUNK)),
        settings: Cell::new(settings),
        calls: report::Calls::new(observer),
        thread: number,
        endpoint_settled: Notify::new(),
        report_now: Notify::new(),
        deadlines: Rc::default(),
        budget,
        throttle,
        service_config: RefCell::new(None),
        held: RefCell::new(Vec::new()),
        split_spec: RefCell::new(None),
        split: RefCell::new(None),
    });
    tokio::task::spawn_local(report::publish(forwarder.clone()));
    tokio::task::spawn_local(endpoint::follow_split(split, forwarder.clone()));
    tokio::task::spawn_local(follow_settings(live_settings, forwarder.clone()));
    tokio::task::spawn_local(open::follow(service_config, forwarder.clone()));
    tokio::task::spawn_local(deadline::run(forwarder.clone()));
    let any_wanted = !set.borrow().is_empty();
    tokio::task::spawn_local(endpoint::follow(set, forwarder.clone()));
    if any_wanted {
        let settled = forwarder.endpoints_settled();
        let _ = tokio::time::timeout(settings.connect_timeout, settled).await;
    }
    let mut stoppable = true;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = stop.changed(), if stoppable => {
                match changed {
                    Ok(()) if *stop.borrow_and_update() => break,
                    Ok(()) => {}
                    // Nobody can stop it any more.
                    Err(_) => stoppable = false,
                }
                continue;
            }
        };
        let Ok((io, _)) = accepted else {
            // Out of file descriptors, typically: back off rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let conn = Conn::new(Role::Downstream, io);
        conn.flush();
        tokio::task::spawn_local(task::run(conn, forwarder.clone()));
    }
    drop(listener);
    forwarder.calls.idle().await;
}

/// Keeps the forwarder's settings equal to the latest, until their sender is gone. A call
/// takes its timeouts when it opens; connections take theirs when they connect; the next
/// pick, the balancer.
async fn follow_settings(mut settings: watch::Receiver<Settings>, fwd: Rc<Forwarder>) {
    while settings.changed().await.is_ok() {
        let settings = *settings.borrow_and_update();
        fwd.picker.set_kind(settings.balancer);
        fwd.settings.set(settings);
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

/// As [`spawn_thread_serving`], on a port of 127.0.0.1 it picks: that address.
pub fn spawn_on_loopback(upstream: Upstream) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let addr = listener.local_addr().expect("its address");
    spawn_thread_serving(listener, upstream);
    addr
}

/// As [`spawn_thread`], in front of `upstream`.
pub fn spawn_thread_serving(listener: std::net::TcpListener, upstream: Upstream) {
    spawn_engine_thread(listener, upstream, Thread::default()).expect("a thread for the engine");
}

/// Runs one engine thread (a one-thread runtime of its own) serving `listener`
/// (non-blocking; the threads of one upstream each take a clone of it) in front of
/// `upstream`, until `thread.stop` and its calls ended.
pub fn spawn_engine_thread(
    listener: std::net::TcpListener,
    upstream: Upstream,
    thread: Thread,
) -> io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve_thread(listener, upstream, thread).await,
                    // Only outside a runtime, which this is not.
                    Err(e) => eprintln!("fanout-wire: the listener cannot be served: {e}"),
                }
            })
        })
}

/// The name of the thread [`spawn_thread`] starts, for tests that watch it for panics.
pub const THREAD_NAME: &str = "fanout-wire-spike";
