//! One upstream: discovery keeps its endpoint set current, health checks (when configured)
//! judge each endpoint, and what is left feeds the engine that carries the upstream's calls.

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

use crate::discover::{self, DiscoveryClient};
use crate::endpoint::{Endpoint, Events};
use crate::engine::Engine;
use crate::failure_log::FailureLog;
use crate::service_config::{Live, ServiceConfigCell};
use crate::split::SplitSpec;
use fanout_proxy_config::policy::Policy;

pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// Says why calls failed, a few lines a second at most.
    pub failures: FailureLog,
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
    split: Mutex<Option<SplitSpec>>,
    /// The engine that carries the calls, which this upstream feeds.
    engine: Arc<Engine>,
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
    /// Starts discovery for `config`, feeding `engine`, which carries the calls. `endpoints`
    /// upstreams subscribe through `client`.
    pub fn start(
        config: UpstreamConfig,
        client: Option<DiscoveryClient>,
        engine: Arc<Engine>,
    ) -> Arc<Self> {
        let upstream = Arc::new(Self {
            name: config.name.as_str().into(),
            failures: FailureLog::default(),
            config,
            endpoints: RwLock::new(Arc::new(Vec::new())),
            resolve_now: Notify::new(),
            discovered: AtomicBool::new(false),
            last_discovery_error: Mutex::new(None),
            status: Mutex::new(DiscoveryStatus::default()),
            discovery_task: Mutex::new(None),
            started: Instant::now(),
            service_config: ServiceConfigCell::default(),
            policy: Live::default(),
            split: Mutex::new(None),
            engine,
            stopped: AtomicBool::new(false),
        });
        if let Some(rendered) = &upstream.config.service_config {
            // Checked when the config was read; a discovery server's live one replaces it.
            let _ = upstream
                .service_config
                .update(&upstream.name, &rendered.to_string());
        }
        upstream.engine.attach(&upstream);
        upstream.feed_rules();
        upstream.feed_endpoints();
        let task = tokio::spawn(discover::run(upstream.clone(), client));
        *upstream
            .discovery_task
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        upstream
    }

    /// Ends discovery and removes every endpoint; it feeds the engine no more. For an upstream
    /// a config reload replaced or dropped.
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

    /// Replaces the endpoint set: the engine connects to new addresses and lets gone ones finish
    /// their calls.
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
                    let endpoint = Endpoint::new(
                        *addr,
                        self.config.health_check.is_some(),
                        self.engine.report_for(*addr),
                    );
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
        if let Ok(mut slot) = self.endpoints.write() {
            *slot = Arc::new(next);
        }
        self.feed_endpoints();
        let Some(checks) = &self.config.health_check else {
            return;
        };
        // Health checks go over each endpoint's own connection, beside the engine's.
        let events: Arc<dyn Events> = Arc::new(UpstreamEvents(Arc::downgrade(self)));
        for endpoint in added {
            tokio::spawn(
                endpoint
                    .clone()
                    .run(self.config.timeouts.connect, events.clone()),
            );
            tokio::spawn(crate::health::run(endpoint, checks.clone(), events.clone()));
        }
    }

    /// Applies a split (`None`: no split).
    pub fn set_split(&self, spec: Option<SplitSpec>) {
        let mut current = self.split.lock().unwrap_or_else(|e| e.into_inner());
        if *current != spec {
            tracing::info!(upstream = %self.name, split = ?spec.as_ref().map(|s| &s.targets),
                "split changed");
        }
        *current = spec;
        if let Some(engine) = self.feeding() {
            engine.feed_split(current.clone());
        }
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
