//! The fanout proxy's config: one versioned schema, rendered by the webhook into the pod's
//! `fanout.dev/proxy-config` annotation and read by the proxy from the downward API file.
//!
//! # Layout
//! - [`ProxyConfig`] and friends (this file): the typed schema and its defaults. Serializing it
//!   gives the canonical JSON the webhook renders.
//! - `parse`: JSON text to [`ProxyConfig`], collecting every fault with its path in the document
//!   rather than stopping at the first, so a user fixes a config in one round.
//! - `reader`: the small field reader `parse` is built on.
//! - `discovery`: how an upstream finds its endpoints (DNS, SRV, static, the discovery
//!   server) and reading it.
//! - `duration`: `250ms` / `5s` durations.
//! - `names`: Kubernetes name rules (namespaces, Services, port names).
//! - `policy`: `fanout.dev/policy`, what a Service's owner sets that gRPC's service config has
//!   no place for (health checks, ejection, timeouts, balancer, a weighted split).
//! - `service_config`: gRPC's service config as a Service's owner declares it (timeouts,
//!   retries, `waitForReady`, throttling, balancing), and which method config a call gets.
#![forbid(unsafe_code)]

pub mod discovery;
pub mod duration;
pub mod names;
mod parse;
pub mod policy;
mod reader;
pub mod service_config;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

pub use discovery::{
    Discovery, DiscoveryServer, DnsDiscovery, EndpointsDiscovery, ServicePort, SrvDiscovery,
};
pub use parse::{ConfigError, Fault, Faults};

/// The schema version this crate reads and writes.
pub const CONFIG_VERSION: u32 = 1;
/// The admin port: health, metrics and endpoint state.
pub const ADMIN_PORT: u16 = 15020;
/// Retries keep at most this much of a request body; larger calls are never retried.
pub const MAX_RETRY_BUFFER_BYTES: u32 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyConfig {
    pub version: u32,
    pub admin: AdminConfig,
    pub drain: DrainConfig,
    /// May be empty when `grpc_health` is set: the proxy then only answers health checks.
    pub upstreams: Vec<UpstreamConfig>,
    /// `GET /grpc-health` on the admin port, answered from the pod's own `grpc.health.v1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_health: Option<GrpcHealth>,
    /// Where `endpoints` upstreams subscribe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_server: Option<DiscoveryServer>,
}

/// The pod's own gRPC server, asked `grpc.health.v1.Health/Check` on loopback for HTTP health
/// checkers (cloud load balancers) that cannot speak gRPC.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrpcHealth {
    /// The app's gRPC port on `127.0.0.1`.
    pub port: u16,
    /// The `service` asked about; empty: the whole server.
    pub service: String,
    /// How long one check may take.
    #[serde(serialize_with = "duration::serialize")]
    pub timeout: Duration,
    /// A check's answer is reused for this long, so frequent probes do not hammer the app.
    #[serde(serialize_with = "duration::serialize")]
    pub cache: Duration,
}

impl GrpcHealth {
    pub fn new(port: u16, service: impl Into<String>) -> Self {
        Self {
            port,
            service: service.into(),
            timeout: Duration::from_secs(1),
            cache: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)),
        }
    }
}

/// How the proxy stops on SIGTERM: it keeps serving until no stream was active for `quiet`, or
/// until `deadline` has passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainConfig {
    #[serde(serialize_with = "duration::serialize")]
    pub quiet: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub deadline: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(3),
            deadline: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpstreamConfig {
    /// Names the upstream in logs, metrics and errors (`app.shop`).
    pub name: String,
    /// Where the app connects (h2c), normally `127.0.0.1:15001`.
    pub listen: SocketAddr,
    pub discovery: Discovery,
    pub balancer: Balancer,
    pub timeouts: Timeouts,
    pub connections_per_endpoint: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    pub ejection: Ejection,
    pub retry: Retry,
    /// The upstream Service's gRPC service config (see [`service_config`]), as rendered at
    /// injection; with the discovery server, the Service's live one replaces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_config: Option<serde_json::Value>,
}

impl UpstreamConfig {
    /// An upstream with every setting at its default.
    pub fn new(name: impl Into<String>, listen: SocketAddr, discovery: Discovery) -> Self {
        Self {
            name: name.into(),
            listen,
            discovery,
            balancer: Balancer::default(),
            timeouts: Timeouts::default(),
            connections_per_endpoint: 1,
            health_check: None,
            ejection: Ejection::default(),
            retry: Retry::default(),
            service_config: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    /// Power of two choices over outstanding streams weighted by peak-EWMA latency.
    #[default]
    PeakEwma,
    RoundRobin,
    LeastRequest,
}

impl Balancer {
    pub const NAMES: [&'static str; 3] = ["peak_ewma", "round_robin", "least_request"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "peak_ewma" => Some(Self::PeakEwma),
            "round_robin" => Some(Self::RoundRobin),
            "least_request" => Some(Self::LeastRequest),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeouts {
    /// TCP connect plus HTTP/2 handshake to one endpoint.
    #[serde(serialize_with = "duration::serialize")]
    pub connect: Duration,
    /// Whole-call limit on top of the client's `grpc-timeout`; `None` for long streams.
    #[serde(
        serialize_with = "duration::serialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub request: Option<Duration>,
    /// A call with nothing moving either way (no message, no headers) for this long is ended;
    /// `None`: no limit.
    #[serde(
        serialize_with = "duration::serialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(250),
            request: None,
            idle: None,
        }
    }
}

/// Active `grpc.health.v1` checks; off unless present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthCheck {
    #[serde(serialize_with = "duration::serialize")]
    pub interval: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// The `service` field of the health request; empty asks about the whole server.
    pub service: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            service: String::new(),
        }
    }
}

/// Passive ejection of endpoints that keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ejection {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "duration::serialize")]
    pub base_time: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub max_time: Duration,
    /// Never eject more than this share of endpoints (the panic threshold).
    pub max_ejected_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_time: Duration::from_secs(5),
            max_time: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }
}

/// Retries of calls that provably were not processed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    pub enabled: bool,
    /// Retries may add at most this share of calls.
    pub budget_percent: u32,
    /// A call is retryable only while its whole body fits in this buffer.
    pub max_buffer_bytes: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            enabled: true,
            budget_percent: 20,
            max_buffer_bytes: 64 * 1024,
        }
    }
}

impl ProxyConfig {
    pub fn new(upstreams: Vec<UpstreamConfig>) -> Self {
        Self {
            version: CONFIG_VERSION,
            admin: AdminConfig::default(),
            drain: DrainConfig::default(),
            upstreams,
            grpc_health: None,
            discovery_server: None,
        }
    }

    /// Reads and validates a config document, reporting every fault.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        parse::parse(text)
    }

    /// The canonical compact JSON, as the webhook renders it into the pod annotation.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes: every field is plain data")
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serializes: every field is plain data")
    }
}
