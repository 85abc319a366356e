//! The data path: `fanout-wire`'s engine serves an upstream's listener on threads of its own, while this proxy keeps what is not per call — discovery, active health checks,
//! the Service's live service config, policy and split, config reloads, the admin and the
//! drain. The seam is a few `watch`es the upstream feeds (the endpoints discovery found that
//! health checks let through, the service config, the split, the settings) and what the
//! engine reports back through [`Observer`]: calls for the drain and the metrics, retries,
//! and each endpoint's state for `/endpoints` and `/ready`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use fanout_balance::budget::Budget;
use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::service_config::ServiceConfig;
use fanout_proxy_config::{Balancer, UpstreamConfig};
use fanout_wire::engine::report::{ClientGot, EndpointReport, Observer};
use fanout_wire::engine::{self as wire, Settings, SharedThrottle, SplitSpec};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use crate::activity::Activity;
use crate::failure_log::Failure;
use crate::grpc;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// One upstream's engine: its threads, what feeds them, and where they report.
pub struct Engine {
    name: String,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    endpoints: watch::Sender<Vec<SocketAddr>>,
    service_config: watch::Sender<Option<Arc<ServiceConfig>>>,
    /// The service config last fed, so an unchanged one is not sent again.
    applied: Mutex<Option<Arc<ServiceConfig>>>,
    split: watch::Sender<Option<SplitSpec>>,
    settings: watch::Sender<Settings>,
    stop: watch::Sender<bool>,
    /// The reports of the upstream's endpoints, by address, for the engine to fill.
    reports: Mutex<HashMap<SocketAddr, Weak<EndpointReport>>>,
    /// The upstream feeding the engine now (a config reload replaces it), which knows why
    /// no endpoint is ready.
    upstream: Mutex<Weak<Upstream>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the wire engine of upstream {upstream}: {source}")]
pub struct StartError {
    upstream: String,
    #[source]
    source: std::io::Error,
}

impl Engine {
    /// Serves `listener` with `threads` engine threads for the upstream `config`.
    pub fn start(
        listener: tokio::net::TcpListener,
        config: &UpstreamConfig,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        threads: usize,
    ) -> Result<Arc<Engine>, StartError> {
        let failed = |source| StartError {
            upstream: config.name.clone(),
            source,
        };
        let listener = listener.into_std().map_err(failed)?;
        let (endpoints, endpoints_rx) = watch::channel(Vec::new());
        let (service_config, service_config_rx) = watch::channel(None);
        let (split, split_rx) = watch::channel(None);
        let (settings, settings_rx) = watch::channel(settings_of(config, None, None));
        let (stop, stop_rx) = watch::channel(false);
        let engine = Arc::new(Engine {
            name: config.name.clone(),
            metrics,
            activity,
            endpoints,
            service_config,
            applied: Mutex::new(None),
            split,
            settings,
            stop,
            reports: Mutex::new(HashMap::new()),
            upstream: Mutex::new(Weak::new()),
        });
        let upstream = wire::Upstream {
            endpoints: endpoints_rx,
            service_config: service_config_rx,
            split: split_rx,
            settings: settings_rx,
        };
        let budget = Arc::new(Budget::new(config.retry.budget_percent));
        let throttle = Arc::new(SharedThrottle::default());
        for number in 0..threads.max(1) {
            let thread = wire::Thread {
                observer: engine.clone(),
                number,
                budget: budget.clone(),
                throttle: throttle.clone(),
                stop: stop_rx.clone(),
            };
            let listener = listener.try_clone().map_err(failed)?;
            wire::spawn_engine_thread(listener, upstream.clone(), thread).map_err(failed)?;
        }
        Ok(engine)
    }

    /// `upstream` feeds the engine from now on.
    pub fn attach(&self, upstream: &Arc<Upstream>) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(upstream);
    }

    /// The upstream feeding the engine now.
    fn current(&self) -> Option<Arc<Upstream>> {
        self.upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    /// Stops taking clients; each thread ends once its calls ended.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// The report of the endpoint at `addr`, which the engine fills once it has the
    /// endpoint: the one it fills already when it has it (an upstream that replaced another
    /// on a config reload finds the engine's endpoints as they are).
    pub fn report_for(&self, addr: SocketAddr) -> Arc<EndpointReport> {
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(report) = reports.get(&addr).and_then(Weak::upgrade) {
            return report;
        }
        reports.retain(|_, r| r.strong_count() > 0);
        let report = Arc::new(EndpointReport::default());
        reports.insert(addr, Arc::downgrade(&report));
        report
    }

    /// The endpoints calls may go to.
    pub fn feed_endpoints(&self, addrs: Vec<SocketAddr>) {
        self.endpoints.send_if_modified(|current| {
            let changed = *current != addrs;
            *current = addrs;
            changed
        });
    }

    pub fn feed_split(&self, spec: Option<SplitSpec>) {
        self.split.send_if_modified(|current| {
            let changed = *current != spec;
            *current = spec;
            changed
        });
    }

    /// The Service's service config (`None`: none), and the settings the config file and
    /// the Service's policy make.
    pub fn feed_rules(
        &self,
        applied: Option<Arc<ServiceConfig>>,
        config: &UpstreamConfig,
        policy: Option<&Policy>,
    ) {
        let settings = settings_of(config, applied.as_deref(), policy);
        {
            let mut last = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            let same = match (&*last, &applied) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                let _ = self.service_config.send(applied.clone());
                *last = applied;
            }
        }
        self.settings.send_if_modified(|current| {
            let changed = *current != settings;
            *current = settings;
            changed
        });
    }
}

/// The balancer in force: the Service's policy's, else its service config's, else the config
/// file's (which the webhook rendered from them as they were when the pod was created).
pub fn balancer_of(
    config: &UpstreamConfig,
    service_config: Option<&ServiceConfig>,
    policy: Option<&Policy>,
) -> Balancer {
    policy
        .and_then(|p| p.balancer)
        .or(service_config.and_then(|s| s.balancer))
        .unwrap_or(config.balancer)
}

/// The engine's settings from the upstream's config and the Service's policy (which wins).
fn settings_of(
    config: &UpstreamConfig,
    service_config: Option<&ServiceConfig>,
    policy: Option<&Policy>,
) -> Settings {
    Settings {
        connect_timeout: config.timeouts.connect,
        call_timeout: policy
            .and_then(|p| p.request_timeout)
            .or(config.timeouts.request),
        idle_timeout: policy.and_then(|p| p.idle_timeout).or(config.timeouts.idle),
        ejection: policy.and_then(|p| p.ejection).unwrap_or(config.ejection),
        connections: config.connections_per_endpoint as usize,
        replay_limit: if config.retry.enabled {
            config.retry.max_buffer_bytes as usize
        } else {
            0
        },
        balancer: balancer_of(config, service_config, policy),
        ..Settings::default()
    }
}

impl Observer for Engine {
    fn call_started(&self) {
        self.activity.started();
    }

    fn call_ended(&self) {
        self.activity.ended();
    }

    fn duration(&self) -> Histogram {
        self.metrics.duration_histogram(&self.name)
    }

    fn requests(&self, endpoint: Option<SocketAddr>, status: Option<u16>) -> Counter {
        let endpoint = endpoint.map_or_else(|| "none".to_string(), |a| a.to_string());
        self.metrics.requests_counter(&self.name, &endpoint, status)
    }

    fn retried(&self, reason: &str) {
        self.metrics.record_retry(&self.name, reason);
    }

    fn retry_budget_exhausted(&self) {
        self.metrics.record_retry_refused(&self.name);
    }

    fn retry_throttled(&self) {
        self.metrics.record_retry_throttled(&self.name);
    }

    fn no_endpoint(&self, code: u16) -> String {
        let upstream = self.current();
        let reason = upstream
            .as_ref()
            .and_then(|u| u.not_ready_reason())
            .unwrap_or_else(|| "no endpoint is ready".into());
        if let Some(upstream) = &upstream {
            upstream
                .failures
                .failed(&self.name, None, Failure::Status(code), &reason);
        }
        grpc::percent_encode(&format!("fanout: upstream {}: {reason}", self.name))
    }

    fn call_failed(&self, endpoint: Option<SocketAddr>, got: ClientGot, reason: &str) {
        let failure = match got {
            ClientGot::Status(code) => Failure::Status(code),
            ClientGot::Reset(code) => Failure::Reset(h2::Reason::from(code)),
        };
        if let Some(upstream) = self.current() {
            upstream
                .failures
                .failed(&self.name, endpoint, failure, &reason);
        }
    }

    fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointReport> {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports
            .get(&addr)
            .and_then(Weak::upgrade)
            .unwrap_or_default()
    }
}
