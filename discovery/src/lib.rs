//! fanout's discovery protocol (`proto/fanout_discovery.proto`), generated for tonic: the server
//! half runs in the webhook's Deployment, the client half in every proxy.
#![forbid(unsafe_code)]

pub mod codec;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("fanout.discovery.v1");
}

/// The discovery server's port, on the webhook's Service.
pub const DEFAULT_PORT: u16 = 15012;
