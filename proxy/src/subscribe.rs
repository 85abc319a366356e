//! The `endpoints` source: a `Watch` stream from the discovery server, every snapshot applied
//! at once. While the server cannot be reached the last set stays; DNS takes over when no
//! server answered within `fallback_after` of start, when it has been away `stale_after`, or at
//! the next reconnect attempt (≤ 5 s) once no endpoint of the kept set is ready.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fanout_discovery::v1::discovery_client::DiscoveryClient as GrpcClient;
use fanout_discovery::v1::{Snapshot, WatchRequest, watch_request};
use fanout_proxy_config::{EndpointsDiscovery, ServicePort};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::discover::{DiscoveryClient, dns_loop};
use crate::split::SplitSpec;
use crate::upstream::Upstream;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a subscription the server refused for good is asked again (a chart change may
/// admit it).
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// The addresses to call: ready endpoints that are not terminating. When there are none, the
/// serving ones that are terminating (as kube-proxy does), so a Service whose every pod is
/// shutting down still answers until the last one goes.
pub fn addresses(snapshot: &Snapshot) -> Vec<SocketAddr> {
    let parse = |e: &fanout_discovery::v1::Endpoint| {
        let ip: IpAddr = e.ip.parse().ok()?;
        let port = u16::try_from(e.port).ok().filter(|&p| p > 0)?;
        Some(SocketAddr::new(ip, port))
    };
    let ready: Vec<SocketAddr> = snapshot
        .endpoints
        .iter()
        .filter(|e| e.ready && !e.terminating)
        .filter_map(parse)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    snapshot
        .endpoints
        .iter()
        .filter(|e| e.serving)
        .filter_map(parse)
        .collect()
}

/// The snapshot's weighted split, if it has one: the targets and each endpoint's Service.
pub fn split_of(snapshot: &Snapshot) -> Option<SplitSpec> {
    if snapshot.split.is_empty() {
        return None;
    }
    let service_of = snapshot
        .endpoints
        .iter()
        .filter_map(|e| {
            let ip: IpAddr = e.ip.parse().ok()?;
            let port = u16::try_from(e.port).ok()?;
            Some((SocketAddr::new(ip, port), e.service.clone()))
        })
        .collect();
    Some(SplitSpec {
        targets: snapshot
            .split
            .iter()
            .map(|t| (t.service.clone(), t.weight))
            .collect(),
        service_of,
    })
}

fn request(config: &EndpointsDiscovery) -> WatchRequest {
    let client = std::env::var("HOSTNAME").unwrap_or_default();
    WatchRequest {
        namespace: config.namespace.clone(),
        service: config.service.clone(),
        port: Some(match &config.port {
            ServicePort::Number(n) => watch_request::Port::PortNumber(u32::from(*n)),
            ServicePort::Name(name) => watch_request::Port::PortName(name.clone()),
        }),
        client,
    }
}

/// DNS discovery running in place of the server.
struct Fallback(Option<JoinHandle<()>>);

impl Fallback {
    fn start(&mut self, upstream: &Arc<Upstream>, config: &EndpointsDiscovery, why: &str) {
        if self.0.is_none() {
            tracing::warn!(upstream = %upstream.name, reason = why,
                "discovery server unavailable; finding endpoints through DNS");
            let (upstream, fallback) = (upstream.clone(), (*config.fallback).clone());
            self.0 = Some(tokio::spawn(
                async move { dns_loop(upstream, &fallback).await },
            ));
        }
    }

    fn stop(&mut self, upstream: &Upstream) {
        if let Some(task) = self.0.take() {
            task.abort();
            tracing::info!(upstream = %upstream.name, "discovery server back; DNS fallback stopped");
        }
    }
}

impl Drop for Fallback {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

pub async fn run(upstream: Arc<Upstream>, client: DiscoveryClient, config: EndpointsDiscovery) {
    let mut grpc = GrpcClient::new(client.channel.clone());
    let mut fallback = Fallback(None);
    let mut ever_answered = false;
    // Since when no stream has delivered; the fallback is measured from it.
    let mut away_since = Instant::now();
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        let bound = if ever_answered {
            config.stale_after
        } else {
            config.fallback_after
        };
        let fallback_due = away_since + bound;
        let opened = tokio::select! {
            opened = grpc.watch(request(&config)) => Some(opened),
            () = tokio::time::sleep_until(fallback_due), if fallback.0.is_none() => None,
        };
        let mut stream = match opened {
            None => {
                fallback.start(&upstream, &config, &last_error);
                continue;
            }
            Some(Ok(response)) => response.into_inner(),
            Some(Err(status)) => {
                last_error = format!("{}: {}", client.address, status.message());
                let refused = matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                );
                if refused {
                    // Refused for good (excluded namespace, malformed request): DNS serves the
                    // upstream at once, and the server is asked again only once a minute.
                    tracing::error!(upstream = %upstream.name, code = ?status.code(),
                        message = status.message(), "discovery server refused the subscription");
                    fallback.start(&upstream, &config, &last_error);
                    tokio::time::sleep(REFUSED_RETRY).await;
                    continue;
                }
                upstream.set_server_connected(false);
                // The last set is only worth keeping while some of it answers: after a rollout
                // with the server away, every kept endpoint is gone and DNS knows the new pods.
                let stranded = ever_answered && !upstream.has_ready_endpoint();
                if Instant::now() >= fallback_due || stranded {
                    fallback.start(&upstream, &config, &last_error);
                }
                sleep_with_jitter(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        // The server holds the first snapshot until its lists are in; the fallback clock runs on.
        let mut delivering = false;
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = tokio::time::sleep_until(fallback_due), if !delivering && fallback.0.is_none() => {
                    fallback.start(&upstream, &config, "no snapshot yet");
                    continue;
                }
            };
            match message {
                Ok(Some(snapshot)) => {
                    fallback.stop(&upstream);
                    apply(&upstream, &snapshot);
                    delivering = true;
                    ever_answered = true;
                    backoff = BACKOFF_MIN;
                }
                Ok(None) | Err(_) => {
                    last_error = match message {
                        Err(status) => format!("{}: {}", client.address, status.message()),
                        _ => format!("{}: stream ended", client.address),
                    };
                    tracing::info!(upstream = %upstream.name, error = %last_error,
                        "discovery stream ended; keeping the last endpoints and reconnecting");
                    break;
                }
            }
        }
        upstream.set_server_connected(false);
        if delivering {
            away_since = Instant::now();
        }
        sleep_with_jitter(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn apply(upstream: &Arc<Upstream>, snapshot: &Snapshot) {
    let service_config = snapshot
        .policy
        .as_ref()
        .map_or("", |p| p.service_config.as_str());
    // A rejected change is logged by the cell and shown in /endpoints and the metrics.
    let _ = upstream
        .service_config
        .update(&upstream.name, service_config);
    let policy = snapshot
        .policy
        .as_ref()
        .map_or("", |p| p.fanout_policy.as_str());
    let _ = upstream.policy.update(&upstream.name, policy);
    upstream.feed_rules();
    let addrs = addresses(snapshot);
    upstream.set_addresses(&addrs);
    upstream.set_split(split_of(snapshot));
    let error = addrs.is_empty().then(|| {
        if snapshot.reason.is_empty() {
            format!(
                "none of {} endpoints is ready or serving",
                snapshot.endpoints.len()
            )
        } else {
            snapshot.reason.clone()
        }
    });
    upstream.set_server_connected(true);
    upstream.discovery_answered("endpoints", error);
}

/// Reconnects of many proxies after a server restart spread over the backoff.
async fn sleep_with_jitter(backoff: Duration) {
    let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
    tokio::time::sleep(backoff + jitter).await;
}

#[cfg(test)]
mod tests {
    use fanout_discovery::v1::Endpoint;

    use super::*;

    fn endpoint(ip: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            port: 8080,
            ready,
            serving,
            terminating,
            ..Endpoint::default()
        }
    }

    #[test]
    fn ready_endpoints_are_called_and_terminating_ones_only_when_nothing_else_serves() {
        let mut snapshot = Snapshot {
            endpoints: vec![
                endpoint("10.0.0.1", true, true, false),
                endpoint("10.0.0.2", false, true, true),
                endpoint("10.0.0.3", false, false, false),
            ],
            ..Snapshot::default()
        };
        assert_eq!(addresses(&snapshot), ["10.0.0.1:8080".parse().unwrap()]);
        snapshot.endpoints.remove(0);
        assert_eq!(addresses(&snapshot), ["10.0.0.2:8080".parse().unwrap()]);
        snapshot.endpoints.remove(0);
        assert!(addresses(&snapshot).is_empty());
    }
}
