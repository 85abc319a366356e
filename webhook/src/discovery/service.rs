//! The `fanout.discovery.v1.Discovery` gRPC service: each `Watch` is a task that sends the
//! upstream's snapshot, then a new one whenever the catalog's view of it changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fanout_discovery::v1::discovery_server::Discovery;
use fanout_discovery::v1::{Snapshot, WatchRequest, watch_request};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::catalog::{ServiceKey, UpstreamKey};
use super::hub::Hub;
use crate::metrics::{Metrics, RefusedLabels};
use crate::server::Peer;
use crate::upstreams::{PortRef, is_dns_1035_label, is_dns_1123_label, is_port_name};

/// Bounds on what clients may hold open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Watches open at once on one connection (a proxy needs one per upstream).
    pub watches_per_connection: usize,
    /// Connections open at once, all clients together.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            watches_per_connection: 100,
            connections: 20_000,
        }
    }
}

#[derive(Clone)]
pub struct DiscoveryService {
    hub: Arc<Hub>,
    /// Namespaces whose Services are not served (the chart's excluded namespaces).
    excluded: Arc<Vec<String>>,
    limits: Limits,
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    metrics: Arc<Metrics>,
}

/// Counts a watch against its connection while it lives.
struct OpenWatch {
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    peer: Option<SocketAddr>,
    metrics: Arc<Metrics>,
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.metrics.discovery_watches.dec();
        let Some(peer) = self.peer else { return };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&peer);
            }
        }
    }
}

impl DiscoveryService {
    pub fn new(
        hub: Arc<Hub>,
        excluded: Vec<String>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            hub,
            excluded: Arc::new(excluded),
            limits,
            open: Arc::default(),
            metrics,
        }
    }

    fn refused(&self, status: Status) -> Status {
        let code = match status.code() {
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            _ => "other",
        };
        self.metrics
            .discovery_refused
            .get_or_create(&RefusedLabels { code })
            .inc();
        status
    }

    fn admit(&self, peer: Option<SocketAddr>) -> Result<OpenWatch, Status> {
        if let Some(peer) = peer {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(peer).or_default();
            if *n >= self.limits.watches_per_connection {
                return Err(Status::resource_exhausted(format!(
                    "at most {} watches per connection",
                    self.limits.watches_per_connection
                )));
            }
            *n += 1;
        }
        self.metrics.discovery_watches.inc();
        Ok(OpenWatch {
            open: self.open.clone(),
            peer,
            metrics: self.metrics.clone(),
        })
    }
}

/// The upstream a request names, or why the request is malformed.
pub fn upstream_of(request: &WatchRequest) -> Result<UpstreamKey, Status> {
    let mut faults = Vec::new();
    if !is_dns_1123_label(&request.namespace) {
        faults.push(format!(
            "namespace {:?} is not a namespace name",
            request.namespace
        ));
    }
    if !is_dns_1035_label(&request.service) {
        faults.push(format!(
            "service {:?} is not a Service name",
            request.service
        ));
    }
    let port = match &request.port {
        Some(watch_request::Port::PortNumber(n)) => match u16::try_from(*n) {
            Ok(n) if n > 0 => Some(PortRef::Number(n)),
            _ => {
                faults.push(format!("port {n} is not a port number (1-65535)"));
                None
            }
        },
        Some(watch_request::Port::PortName(name)) if is_port_name(name) => {
            Some(PortRef::Name(name.clone()))
        }
        Some(watch_request::Port::PortName(name)) => {
            faults.push(format!("port {name:?} is not a port name"));
            None
        }
        None => {
            faults.push("no port: give port_number or port_name".into());
            None
        }
    };
    match port {
        Some(port) if faults.is_empty() => Ok(UpstreamKey {
            service: (request.namespace.clone(), request.service.clone()),
            port,
        }),
        _ => Err(Status::invalid_argument(faults.join("; "))),
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = ReceiverStream<Result<Snapshot, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.extensions().get::<Peer>().map(|p| p.0);
        let request = request.into_inner();
        let upstream = upstream_of(&request).map_err(|s| self.refused(s))?;
        let namespace = &upstream.service.0;
        if self.excluded.iter().any(|n| n == namespace) {
            return Err(self.refused(Status::permission_denied(format!(
                "namespace {namespace} is excluded from fanout; its Services are not served"
            ))));
        }
        let open = self.admit(peer).map_err(|s| self.refused(s))?;
        tracing::debug!(client = %request.client, ?peer, namespace, service = %upstream.service.1,
            port = %upstream.port, "discovery: watch");
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(send_snapshots(self.hub.clone(), upstream, tx, open));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends the upstream's snapshot whenever it differs from the last one sent, until the client
/// goes away. A slow client only ever gets the newest state: changes made while a send waits
/// are folded into the next snapshot.
async fn send_snapshots(
    hub: Arc<Hub>,
    upstream: UpstreamKey,
    tx: mpsc::Sender<Result<Snapshot, Status>>,
    open: OpenWatch,
) {
    let mut changed = hub.subscribe(&upstream.service);
    // The Services a split sends calls to: their changes change this upstream too.
    let mut targets: Vec<(ServiceKey, watch::Receiver<u64>)> = Vec::new();
    // Before the first lists are in, the catalog is empty: answering then would take every
    // endpoint away from a proxy that reconnects to a replica just started.
    tokio::select! {
        () = hub.synced() => {}
        () = tx.closed() => return,
    }
    let mut last: Option<Snapshot> = None;
    let mut version = 0;
    loop {
        changed.borrow_and_update();
        let (snapshot, wanted) = hub.read(|catalog| {
            (
                catalog.snapshot(&upstream),
                catalog.split_targets(&upstream.service),
            )
        });
        if targets.iter().map(|(key, _)| key).ne(wanted.iter()) {
            targets = wanted
                .into_iter()
                .map(|key| {
                    let signal = hub.subscribe(&key);
                    (key, signal)
                })
                .collect();
        }
        for (_, signal) in &mut targets {
            signal.borrow_and_update();
        }
        if last.as_ref() != Some(&snapshot) {
            version += 1;
            let mut sent = snapshot.clone();
            sent.version = version;
            if tx.send(Ok(sent)).await.is_err() {
                return;
            }
            open.metrics.discovery_snapshots.inc();
            last = Some(snapshot);
        }
        let target_changed = async {
            if targets.is_empty() {
                return std::future::pending().await;
            }
            let signals = targets
                .iter_mut()
                .map(|(_, signal)| Box::pin(signal.changed()));
            let _ = futures::future::select_all(signals).await;
        };
        tokio::select! {
            result = changed.changed() => if result.is_err() { return },
            () = target_changed => {}
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(namespace: &str, service: &str, port: watch_request::Port) -> WatchRequest {
        WatchRequest {
            namespace: namespace.into(),
            service: service.into(),
            port: Some(port),
            client: String::new(),
        }
    }

    #[test]
    fn malformed_requests_are_invalid_arguments_naming_every_fault() {
        let status =
            upstream_of(&request("Shop", "", watch_request::Port::PortNumber(70000))).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "namespace \"Shop\" is not a namespace name; service \"\" is not a Service name; \
             port 70000 is not a port number (1-65535)"
        );
        let status = upstream_of(&request(
            "shop",
            "app",
            watch_request::Port::PortName("a-very-long-port-name".into()),
        ))
        .unwrap_err();
        assert!(
            status.message().contains("is not a port name"),
            "{status:?}"
        );
        let mut no_port = request("shop", "app", watch_request::Port::PortNumber(1));
        no_port.port = None;
        assert!(
            upstream_of(&no_port)
                .unwrap_err()
                .message()
                .contains("no port")
        );
    }

    #[test]
    fn well_formed_requests_name_the_upstream() {
        let key = upstream_of(&request(
            "shop",
            "app",
            watch_request::Port::PortName("grpc".into()),
        ))
        .unwrap();
        assert_eq!(key.service, ("shop".into(), "app".into()));
        assert_eq!(key.port, PortRef::Name("grpc".into()));
    }
}
