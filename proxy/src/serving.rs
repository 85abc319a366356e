//! The upstreams being served, and config reloads: the downward API rewrites the config file
//! when the pod's annotation changes, and the proxy follows without a restart. Unchanged
//! upstreams are untouched; a changed one gets a fresh endpoint set while streams in flight
//! finish on the old one; a removed one stops listening.
//!
//! Each upstream's engine keeps its listener and threads across reloads that keep its
//! `listen`: the upstream that replaces another feeds the same engine.

use std::collections::HashMap;
use std::sync::Arc;

use fanout_proxy_config::{Discovery, ProxyConfig, UpstreamConfig};

use crate::activity::Activity;
use crate::admin::Admin;
use crate::cli::{BindError, bind};
use crate::discover::DiscoveryClient;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// The discovery server's client, made once for the config that names it.
fn discovery_client(config: &ProxyConfig) -> Option<DiscoveryClient> {
    let server = config.discovery_server.as_ref()?;
    match DiscoveryClient::new(server) {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::error!(error = %e, "discovery server unusable; upstreams use DNS");
            None
        }
    }
}

struct Entry {
    config: UpstreamConfig,
    /// Carries the calls of the listener; the upstream feeds it.
    engine: Arc<Engine>,
    upstream: Arc<Upstream>,
}

pub struct Serving {
    entries: HashMap<String, Entry>,
    order: Vec<String>,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    discovery: Option<DiscoveryClient>,
    discovery_server: Option<fanout_proxy_config::DiscoveryServer>,
    /// Engine threads per upstream.
    threads: usize,
}

impl Serving {
    /// Binds every listener first (a port in use stops the start, not half of it), then serves.
    pub async fn start(
        config: &ProxyConfig,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        threads: usize,
    ) -> Result<Self, BindError> {
        let mut listeners = Vec::new();
        for upstream in &config.upstreams {
            listeners.push(bind(upstream.listen, &format!("upstream {}", upstream.name)).await?);
        }
        let mut serving = Self {
            entries: HashMap::new(),
            order: Vec::new(),
            metrics,
            activity,
            discovery: discovery_client(config),
            discovery_server: config.discovery_server.clone(),
            threads,
        };
        for (upstream, listener) in config.upstreams.iter().zip(listeners) {
            serving.add(upstream.clone(), listener);
        }
        Ok(serving)
    }

    fn add(&mut self, config: UpstreamConfig, listener: tokio::net::TcpListener) {
        let engine = match Engine::start(
            listener,
            &config,
            self.metrics.clone(),
            self.activity.clone(),
            self.threads,
        ) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::error!(error = %e, "upstream not served");
                return;
            }
        };
        let upstream = Upstream::start(config.clone(), self.discovery.clone(), engine.clone());
        tracing::info!(upstream = %config.name, listen = %config.listen,
            threads = self.threads.max(1), "serving");
        self.order.push(config.name.clone());
        self.entries.insert(
            config.name.clone(),
            Entry {
                config,
                engine,
                upstream,
            },
        );
    }

    fn remove(&mut self, name: &str) {
        if let Some(entry) = self.entries.remove(name) {
            entry.engine.stop();
            entry.upstream.stop();
            tracing::info!(upstream = name, "upstream removed");
        }
        self.order.retain(|n| n != name);
    }

    /// The upstreams in config order, for the admin server.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.order
            .iter()
            .filter_map(|n| self.entries.get(n))
            .map(|e| e.upstream.clone())
            .collect()
    }

    /// Moves to `config`. A listener that cannot be bound leaves that upstream as it was.
    pub async fn apply(&mut self, config: &ProxyConfig) {
        // A new discovery server (address or CA) restarts the upstreams that subscribe to it.
        let server_changed = config.discovery_server != self.discovery_server;
        if server_changed {
            self.discovery = discovery_client(config);
            self.discovery_server = config.discovery_server.clone();
        }
        let wanted: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        for name in self.order.clone() {
            if !wanted.contains(&name.as_str()) {
                self.remove(&name);
            }
        }
        for upstream in &config.upstreams {
            let current = self.entries.get(&upstream.name).map(|e| e.config.clone());
            match current {
                Some(old)
                    if old == *upstream
                        && !(server_changed
                            && matches!(upstream.discovery, Discovery::Endpoints(_))) => {}
                Some(old) if old.listen == upstream.listen => {
                    if let Some(entry) = self.entries.get_mut(&upstream.name) {
                        // The old one stops feeding the engine before the new one starts.
                        entry.upstream.stop();
                        entry.upstream = Upstream::start(
                            upstream.clone(),
                            self.discovery.clone(),
                            entry.engine.clone(),
                        );
                        entry.config = upstream.clone();
                    }
                    tracing::info!(upstream = %upstream.name, "upstream reconfigured");
                }
                _ => match bind(upstream.listen, &format!("upstream {}", upstream.name)).await {
                    Ok(listener) => {
                        self.remove(&upstream.name);
                        self.add(upstream.clone(), listener);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "config change not applied to this upstream")
                    }
                },
            }
        }
        self.order
            .sort_by_key(|n| wanted.iter().position(|w| w == n));
    }

    pub fn publish(&self, admin: &Admin) {
        *admin.upstreams.write().unwrap_or_else(|e| e.into_inner()) = self.upstreams();
    }
}
