//! The upstreams being served, and config reloads: the downward API rewrites the config file
//! when the pod's annotation changes, and the proxy follows without a restart. Unchanged
//! upstreams are untouched; a changed one gets a fresh endpoint set while streams in flight
//! finish on the old one; a removed one stops listening.

use std::collections::HashMap;
use std::sync::Arc;

use fanout_proxy_config::{Discovery, ProxyConfig, UpstreamConfig};
use tokio::task::AbortHandle;

use crate::activity::Activity;
use crate::admin::Admin;
use crate::cli::{BindError, bind};
use crate::discover::DiscoveryClient;
use crate::engine::{DataPath, Engine, StartError};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::server;
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
    path: Path,
}

/// What serves an upstream's listener.
enum Path {
    H2 {
        forwarder: Arc<Forwarder>,
        listener: AbortHandle,
    },
    Wire {
        engine: Arc<Engine>,
        upstream: Arc<Upstream>,
    },
}

impl Path {
    fn upstream(&self) -> Arc<Upstream> {
        match self {
            Path::H2 { forwarder, .. } => forwarder.upstream(),
            Path::Wire { upstream, .. } => upstream.clone(),
        }
    }
}

/// How calls are carried: the data path, and its threads (`wire`: each upstream's engine
/// threads; `h2`: the runtime's, set by the caller).
#[derive(Debug, Clone, Copy)]
pub struct Carrying {
    pub data_path: DataPath,
    pub threads: usize,
}

pub struct Serving {
    entries: HashMap<String, Entry>,
    order: Vec<String>,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    discovery: Option<DiscoveryClient>,
    discovery_server: Option<fanout_proxy_config::DiscoveryServer>,
    carrying: Carrying,
}

impl Serving {
    /// Binds every listener first (a port in use stops the start, not half of it), then serves.
    pub async fn start(
        config: &ProxyConfig,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        carrying: Carrying,
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
            carrying,
        };
        for (upstream, listener) in config.upstreams.iter().zip(listeners) {
            serving.add(upstream.clone(), listener);
        }
        Ok(serving)
    }

    fn add(&mut self, config: UpstreamConfig, listener: tokio::net::TcpListener) {
        let path = match self.carrying.data_path {
            DataPath::H2 => self.serve_h2(&config, listener),
            DataPath::Wire => match self.serve_wire(&config, listener) {
                Ok(path) => path,
                Err(e) => {
                    tracing::error!(error = %e, "upstream not served");
                    return;
                }
            },
        };
        tracing::info!(upstream = %config.name, listen = %config.listen,
            data_path = ?self.carrying.data_path, "serving");
        self.order.push(config.name.clone());
        self.entries
            .insert(config.name.clone(), Entry { config, path });
    }

    fn serve_h2(&self, config: &UpstreamConfig, listener: tokio::net::TcpListener) -> Path {
        let upstream = Upstream::start(config.clone(), self.discovery.clone());
        let forwarder = Arc::new(Forwarder::new(
            upstream,
            self.metrics.clone(),
            self.activity.clone(),
        ));
        let listener = tokio::spawn(server::serve(listener, forwarder.clone())).abort_handle();
        Path::H2 {
            forwarder,
            listener,
        }
    }

    fn serve_wire(
        &self,
        config: &UpstreamConfig,
        listener: tokio::net::TcpListener,
    ) -> Result<Path, StartError> {
        let engine = Engine::start(
            listener,
            config,
            self.metrics.clone(),
            self.activity.clone(),
            self.carrying.threads,
        )?;
        let upstream =
            Upstream::start_on(config.clone(), self.discovery.clone(), Some(engine.clone()));
        Ok(Path::Wire { engine, upstream })
    }

    fn remove(&mut self, name: &str) {
        if let Some(entry) = self.entries.remove(name) {
            match &entry.path {
                Path::H2 { listener, .. } => listener.abort(),
                Path::Wire { engine, .. } => engine.stop(),
            }
            entry.path.upstream().stop();
            tracing::info!(upstream = name, "upstream removed");
        }
        self.order.retain(|n| n != name);
    }

    /// The upstreams in config order, for the admin server.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.order
            .iter()
            .filter_map(|n| self.entries.get(n))
            .map(|e| e.path.upstream())
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
                        let previous = entry.path.upstream();
                        match &mut entry.path {
                            Path::H2 { forwarder, .. } => {
                                forwarder.replace_upstream(Upstream::start(
                                    upstream.clone(),
                                    self.discovery.clone(),
                                ));
                                previous.stop();
                            }
                            Path::Wire {
                                engine,
                                upstream: current,
                            } => {
                                if old.balancer != upstream.balancer {
                                    tracing::warn!(upstream = %upstream.name,
                                        "balancer changed; on the wire data path it takes effect at the next start");
                                }
                                // The old one stops feeding the engine before the new one starts.
                                previous.stop();
                                *current = Upstream::start_on(
                                    upstream.clone(),
                                    self.discovery.clone(),
                                    Some(engine.clone()),
                                );
                            }
                        }
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
