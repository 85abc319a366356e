//! The discovery server: one watch of the cluster's Services and EndpointSlices, served to every
//! proxy as gRPC server streams (`fanout.discovery.v1.Discovery/Watch`), over TLS with the
//! webhook's certificate, on its own port of the webhook's Service.
//!
//! - `catalog`: Services and slices boiled down, and one upstream's snapshot (pure).
//! - `hub`: the catalog shared by the watch and the subscriptions, with a signal per Service.
//! - `watch`: the two Kubernetes watches feeding the hub.
//! - `report`: a Warning Event on a Service whose policy annotations do not parse.
//! - `service`: the gRPC service, its limits and its answers to malformed requests.

pub mod catalog;
pub mod hub;
pub mod report;
pub mod service;
pub mod watch;

use fanout_discovery::v1::discovery_server::DiscoveryServer;

pub use hub::Hub;
pub use service::{DiscoveryService, Limits};

/// The router that serves the discovery service (gRPC over HTTP/2).
pub fn app(service: DiscoveryService) -> axum::Router {
    tonic::service::Routes::new(DiscoveryServer::new(service))
        .prepare()
        .into_axum_router()
}
