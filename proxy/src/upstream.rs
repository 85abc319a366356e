//! One upstream: discovery keeps its endpoint set current; each endpoint keeps its connection;
//! [`Upstream::pick`] chooses an endpoint for each stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fanout_proxy_config::UpstreamConfig;
use tokio::sync::Notify;
use tokio::time::Instant;

mod feed;
mod report;

use crate::balance::Picker;
use crate::discover::{self, DiscoveryClient};
use crate::endpoint::{Endpoint, Events};
use crate::engine::Engine;
use crate::failure_log::FailureLog;
use crate::latency::Clock;
use crate::retry::Budget;
use crate::service_config::{Live, ServiceConfigCell};
use crate::split::{Split, SplitSpec};
use fanout_proxy_config::Ejection;
use fanout_proxy_config::policy::Policy;

pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    picker: Picker,
    /// Caps retries at the configured share of calls.
    pub budget: Budget,
    /// Says why calls failed, a few lines a second at most.
    pub failures: FailureLog,
    /// An endpoint became ready or the set changed: wakes streams waiting for an endpoint.
    changed: Notify,
    resolve_now: Notify,
    /// Discovery has produced a first answer (or failed its first try).
    discovered: AtomicBool,
    last_discovery_error: Mutex<Option<String>>,
    /// Which source feeds the endpoint set now, for `/endpoints` and metrics.
    status: Mutex<DiscoveryStatus>,
    discovery_task: Mutex<Option<tokio::task::AbortHandle>>,
    started: Instant,
    /// The Service's own service config (from the discovery server): per-method timeouts,
    /// retry policies, waitForReady and retry throttling.
    pub service_config: ServiceConfigCell,
    /// The Service's `fanout.dev/policy` (from the discovery server): its request timeout and
    /// ejection act live; its split arrives resolved in the snapshots.
    pub policy: Live<Policy>,
    /// A weighted split over Services, when the discovery server delivers one.
    split_spec: Mutex<Option<SplitSpec>>,
    split: RwLock<Option<Arc<Split<Arc<Endpoint>>>>>,
    /// On the `wire` data path: the engine that carries the calls, which this upstream feeds.
    engine: Option<Arc<Engine>>,
    /// Replaced or removed by a config reload: it feeds the engine no more.
    stopped: AtomicBool,
}

/// The proxy counts as ready to serve once every upstream's discovery answered, or after this
/// long without an answer (a DNS server that never answers must not hold a pod back for ever;
/// calls then wait for endpoints or fail with a reason).
pub const FIRST_DISCOVERY_WAIT: Duration = Duration::from_secs(5);

/// Where the endpoint set comes from right now.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryStatus {
    /// `endpoints`, `dns`, `srv` or `static`: the source of the current set.
    pub source: &'static str,
    /// `endpoints` upstreams: whether a discovery server stream is delivering.
    pub server_connected: Option<bool>,
    /// Endpoint sets received from the source so far.
    pub updates: u64,
}

struct UpstreamEvents(std::sync::Weak<Upstream>);

impl Events for UpstreamEvents {
    fn changed(&self) {
        if let Some(upstream) = self.0.upgrade() {
            upstream.changed.notify_waiters();
            // A health verdict changed, maybe.
            upstream.feed_endpoints();
        }
    }

    fn connection_lost(&self) {
        if let Some(upstream) = self.0.upgrade() {
            upstream.resolve_now.notify_one();
        }
    }
}

impl Upstream {
    /// Starts discovery for `config`; endpoints connect as they are found. `endpoints`
    /// upstreams subscribe through `client`.
    pub fn start(config: UpstreamConfig, client: Option<DiscoveryClient>) -> Arc<Self> {
        Self::start_on(config, client, None)
    }

    /// As [`Upstream::start`]; with `engine`, the `wire` engine carries the calls and this
    /// upstream feeds it.
    pub fn start_on(
        config: UpstreamConfig,
        client: Option<DiscoveryClient>,
        engine: Option<Arc<Engine>>,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: config.name.as_str().into(),
            picker: Picker::new(config.balancer),
            budget: Budget::new(config.retry.budget_percent),
            failures: FailureLog::default(),
            config,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            changed: Notify::new(),
            resolve_now: Notify::new(),
            discovered: AtomicBool::new(false),
            last_discovery_error: Mutex::new(None),
            status: Mutex::new(DiscoveryStatus::default()),
            discovery_task: Mutex::new(None),
            started: Instant::now(),
            service_config: ServiceConfigCell::default(),
            policy: Live::default(),
            split_spec: Mutex::new(None),
            split: RwLock::new(None),
            engine,
            stopped: AtomicBool::new(false),
        });
        if let Some(rendered) = &upstream.config.service_config {
            // Checked when the config was read; a discovery server's live one replaces it.
            let _ = upstream
                .service_config
                .update(&upstream.name, &rendered.to_string());
        }
        if let Some(engine) = &upstream.engine {
            engine.attach(&upstream);
        }
        upstream.feed_rules();
        upstream.feed_endpoints();
        let task = tokio::spawn(discover::run(upstream.clone(), client));
        *upstream
            .discovery_task
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        upstream
    }

    /// Ends discovery and removes every endpoint; their connections close once their streams
    /// are done. For an upstream a config reload replaced or dropped.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(task) = self
            .discovery_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        for endpoint in self.endpoints().iter() {
            endpoint.remove();
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Replaces the endpoint set: new addresses connect, gone ones drain and close.
    pub fn set_addresses(self: &Arc<Self>, addrs: &[SocketAddr]) {
        let current = self.endpoints();
        let mut by_addr: HashMap<SocketAddr, Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e.clone())).collect();
        let mut next = Vec::with_capacity(addrs.len());
        let mut added = Vec::new();
        for addr in addrs {
            match by_addr.remove(addr) {
                Some(existing) => next.push(existing),
                None => {
                    let health_checked = self.config.health_check.is_some();
                    let endpoint = match &self.engine {
                        Some(engine) => {
                            Endpoint::engine_driven(*addr, health_checked, engine.report_for(*addr))
                        }
                        None => Endpoint::new(
                            *addr,
                            self.config.connections_per_endpoint as usize,
                            health_checked,
                        ),
                    };
                    added.push(endpoint.clone());
                    next.push(endpoint);
                }
            }
        }
        if added.is_empty() && by_addr.is_empty() {
            return;
        }
        for gone in by_addr.values() {
            gone.remove();
        }
        tracing::info!(upstream = %self.name, added = added.len(), removed = by_addr.len(),
            endpoints = next.len(), "endpoints changed");
        self.picker.set_endpoint_count(next.len());
        if let Ok(mut slot) = self.endpoints.write() {
            *slot = Arc::new(next);
        }
        self.regroup(
            self.split_spec
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref(),
        );
        let events: Arc<dyn Events> = Arc::new(UpstreamEvents(Arc::downgrade(self)));
        self.feed_endpoints();
        for endpoint in added {
            // On the `wire` path the endpoint's own connection only carries health checks.
            let own_connections = match endpoint.is_engine_driven() {
                true if self.config.health_check.is_none() => 0,
                _ => endpoint.pool_size(),
            };
            for slot in 0..own_connections {
                tokio::spawn(endpoint.clone().run(
                    slot,
                    self.config.timeouts.connect,
                    events.clone(),
                ));
            }
            if let Some(checks) = &self.config.health_check {
                tokio::spawn(crate::health::run(
                    endpoint.clone(),
                    checks.clone(),
                    events.clone(),
                ));
            }
        }
        self.changed.notify_waiters();
    }

    /// An endpoint for a new stream, waiting up to `wait` for one to become ready.
    pub async fn pick(&self, wait: Duration) -> Option<Arc<Endpoint>> {
        self.pick_until(Some(Instant::now() + wait)).await
    }

    /// A ready endpoint now, if there is one (with a split: of the Service drawn by weight).
    pub fn try_pick(&self) -> Option<Arc<Endpoint>> {
        let split = self.split.read().unwrap_or_else(|e| e.into_inner()).clone();
        match split {
            Some(split) => split.pick(|members| self.picker.pick(members)),
            None => self.picker.pick(&self.endpoints()),
        }
    }

    /// Applies a split (after [`Self::set_addresses`], whose endpoints it groups); `None`: no
    /// split.
    pub fn set_split(&self, spec: Option<SplitSpec>) {
        let mut current = self.split_spec.lock().unwrap_or_else(|e| e.into_inner());
        if *current != spec {
            tracing::info!(upstream = %self.name, split = ?spec.as_ref().map(|s| &s.targets),
                "split changed");
        }
        *current = spec;
        self.regroup(current.as_ref());
        if let Some(engine) = self.feeding() {
            engine.feed_split(current.clone());
        }
        self.changed.notify_waiters();
    }

    /// Groups the current endpoints by the split's Services. Endpoints the split does not
    /// know (DNS's, while the discovery server is away) are balanced as one set instead.
    fn regroup(&self, spec: Option<&SplitSpec>) {
        let split = spec
            .map(|spec| Split::new(spec, &self.endpoints(), |e| e.addr))
            .filter(Split::covers_any)
            .map(Arc::new);
        *self.split.write().unwrap_or_else(|e| e.into_inner()) = split;
    }

    /// An endpoint for a new stream, waiting until `deadline` (`None`: for as long as it
    /// takes) for one to become ready.
    pub async fn pick_until(&self, deadline: Option<Instant>) -> Option<Arc<Endpoint>> {
        loop {
            let changed = self.changed.notified();
            if let Some(endpoint) = self.try_pick() {
                return Some(endpoint);
            }
            match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, changed).await.ok()?,
                None => changed.await,
            }
        }
    }

    /// A call's whole-call limit and idle timeout: the Service's policy's, else the config's
    /// (one read of the policy per call).
    pub fn call_timeouts(&self) -> (Option<Duration>, Option<Duration>) {
        let live = self.policy.current();
        let live = live.as_deref();
        (
            live.and_then(|p| p.request_timeout)
                .or(self.config.timeouts.request),
            live.and_then(|p| p.idle_timeout)
                .or(self.config.timeouts.idle),
        )
    }

    /// The ejection rules: the Service's policy's, else the config's.
    fn ejection<'a>(&'a self, live: Option<&'a Policy>) -> &'a Ejection {
        live.and_then(|p| p.ejection.as_ref())
            .unwrap_or(&self.config.ejection)
    }

    /// Where the upstream is, in time and in calls, for aging latency samples.
    pub fn clock(&self) -> Clock {
        self.picker.clock()
    }

    /// Picks again, avoiding `avoid` when another endpoint is ready.
    pub fn pick_other(&self, avoid: &Endpoint) -> Option<Arc<Endpoint>> {
        let others: Vec<Arc<Endpoint>> = self
            .endpoints()
            .iter()
            .filter(|e| e.addr != avoid.addr)
            .cloned()
            .collect();
        self.picker.pick(&others)
    }

    /// Counts a finished call against `endpoint`, ejecting it when it keeps failing — but never
    /// more endpoints than `max_ejected_percent` allows (the panic threshold).
    pub fn record_outcome(self: &Arc<Self>, endpoint: &Endpoint, grpc_status: Option<u16>) {
        let live = self.policy.current();
        let policy = self.ejection(live.as_deref());
        if !endpoint.record_outcome(
            crate::eject::is_failure(grpc_status),
            policy.consecutive_failures,
        ) {
            return;
        }
        let endpoints = self.endpoints();
        let ejected = endpoints.iter().filter(|e| e.is_ejected()).count();
        if !crate::eject::may_eject(ejected, endpoints.len(), policy.max_ejected_percent) {
            tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr,
                "endpoint keeps failing, but ejecting it would pass max_ejected_percent");
            return;
        }
        let length = endpoint.eject(policy.base_time, policy.max_time);
        tracing::warn!(upstream = %self.name, endpoint = %endpoint.addr, ejected_for = ?length,
            "endpoint ejected after failed calls");
        self.changed.notify_waiters();
        // When it ends, calls waiting for a ready endpoint may take this one.
        let upstream = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(length).await;
            if let Some(upstream) = upstream.upgrade() {
                upstream.changed.notify_waiters();
            }
        });
    }

    /// A discovery source answered: `error` says why the answer holds no endpoints, if so.
    pub(crate) fn discovery_answered(&self, source: &'static str, error: Option<String>) {
        *self
            .last_discovery_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error;
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.source = source;
            status.updates += 1;
        }
        self.discovered.store(true, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Whether the discovery server's stream is delivering, for `/endpoints`.
    pub(crate) fn set_server_connected(&self, connected: bool) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .server_connected = Some(connected);
    }

    /// Waits until a connection to an endpoint was lost (discovery may want to ask again).
    pub(crate) async fn connection_lost(&self) {
        self.resolve_now.notified().await;
    }

    pub fn discovery_status(&self) -> DiscoveryStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Discovery has answered once (with endpoints, none, or an error), or has had long enough.
    pub fn first_discovery_settled(&self) -> bool {
        self.discovered.load(Ordering::Relaxed) || self.started.elapsed() >= FIRST_DISCOVERY_WAIT
    }

    pub fn has_ready_endpoint(&self) -> bool {
        self.endpoints().iter().any(|e| e.is_ready())
    }
}
