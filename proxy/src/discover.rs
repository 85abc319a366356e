//! Keeping an upstream's endpoint set current from its configured source: a fixed list, DNS
//! (A/AAAA or SRV), or the discovery server (see `subscribe`) with DNS as its fallback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fanout_proxy_config::{Discovery, DiscoveryServer};
use tokio::time::Instant;

use crate::dns;
use crate::subscribe;
use crate::upstream::Upstream;

/// The discovery server's channel, shared by every upstream of the proxy (one HTTP/2
/// connection, one stream per upstream).
#[derive(Clone)]
pub struct DiscoveryClient {
    pub channel: tonic::transport::Channel,
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("discovery server address {0:?} is not host:port")]
    Address(String),
    #[error("discovery server {address}: {source}")]
    Tls {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

impl DiscoveryClient {
    /// A channel that connects on first use and again after it breaks; no I/O here.
    pub fn new(server: &DiscoveryServer) -> Result<Self, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
        let address = server.address.clone();
        let host = fanout_proxy_config::discovery::server_host(&address)
            .map_err(|_| ClientError::Address(address.clone()))?
            .to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&server.ca))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|_| ClientError::Address(address.clone()))?
            .tls_config(tls)
            .map_err(|source| ClientError::Tls {
                address: address.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(2))
            // A server that vanished without a FIN is noticed within ~40 s, not hours.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            channel: endpoint.connect_lazy(),
            address,
        })
    }
}

/// Runs the upstream's discovery for as long as the upstream lives.
pub async fn run(upstream: Arc<Upstream>, client: Option<DiscoveryClient>) {
    match upstream.config.discovery.clone() {
        Discovery::Static(addrs) => {
            upstream.set_addresses(&addrs);
            upstream.discovery_answered("static", None);
        }
        Discovery::Endpoints(config) => match client {
            Some(client) => subscribe::run(upstream, client, config).await,
            None => {
                // The config reader refuses this; a fallback keeps the upstream alive anyway.
                tracing::error!(upstream = %upstream.name,
                    "endpoints discovery without a discovery server; using DNS");
                dns_loop(upstream, &config.fallback).await;
            }
        },
        other => dns_loop(upstream, &other).await,
    }
}

/// What one DNS lookup found.
enum Found {
    Addresses(Vec<SocketAddr>),
    Nothing(String),
    Failed(String),
}

async fn lookup(discovery: &Discovery, nameservers: &[SocketAddr], timeout: Duration) -> Found {
    match discovery {
        Discovery::Dns(dns) => match dns::resolve(&dns.name, nameservers, timeout).await {
            Ok(dns::Answer::Found(ips)) => Found::Addresses(
                ips.into_iter()
                    .map(|ip| SocketAddr::new(ip, dns.port))
                    .collect(),
            ),
            Ok(dns::Answer::NotFound) => {
                Found::Nothing(format!("{} has no A or AAAA records", dns.name))
            }
            Err(e) => Found::Failed(e.to_string()),
        },
        Discovery::Srv(srv) => match dns::resolve_srv(&srv.name, nameservers, timeout).await {
            Ok(addrs) if addrs.is_empty() => {
                Found::Nothing(format!("{} has no SRV records with addresses", srv.name))
            }
            Ok(addrs) => Found::Addresses(addrs),
            Err(e) => Found::Failed(e.to_string()),
        },
        Discovery::Static(_) | Discovery::Endpoints(_) => {
            Found::Failed("not a DNS discovery".into())
        }
    }
}

/// Asks DNS every `refresh`, at once (at most every 200 ms) when a connection was lost, and
/// quickly (backoff from 100 ms up to `refresh`) while it has never answered or answers no
/// address: a new Service's first pods should not wait a whole refresh.
pub async fn dns_loop(upstream: Arc<Upstream>, discovery: &Discovery) {
    let (configured, refresh, source) = match discovery {
        Discovery::Dns(d) => (&d.nameservers, d.refresh, "dns"),
        Discovery::Srv(s) => (&s.nameservers, s.refresh, "srv"),
        Discovery::Static(_) | Discovery::Endpoints(_) => return,
    };
    let nameservers = if configured.is_empty() {
        dns::system_nameservers()
    } else {
        configured.clone()
    };
    let query_timeout = refresh.clamp(Duration::from_millis(200), Duration::from_secs(2));
    let min_interval = Duration::from_millis(200).min(refresh);
    let quick_start = Duration::from_millis(100).min(refresh);
    let mut quick = quick_start;
    let mut has_addresses = false;
    loop {
        let started = Instant::now();
        let (error, wait) = match lookup(discovery, &nameservers, query_timeout).await {
            Found::Addresses(addrs) => {
                upstream.set_addresses(&addrs);
                has_addresses = true;
                quick = quick_start;
                (None, refresh)
            }
            Found::Nothing(reason) => {
                upstream.set_addresses(&[]);
                has_addresses = false;
                (Some(reason), quick)
            }
            Found::Failed(error) => {
                // Keep the last good set: a DNS outage must not take the endpoints away.
                tracing::warn!(upstream = %upstream.name, %error,
                    "DNS lookup failed; keeping the last endpoints");
                (Some(error), if has_addresses { refresh } else { quick })
            }
        };
        if wait == quick {
            quick = (quick * 2).min(refresh);
        }
        upstream.discovery_answered(source, error);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = upstream.connection_lost() => {
                tokio::time::sleep_until(started + min_interval).await;
            }
        }
    }
}
