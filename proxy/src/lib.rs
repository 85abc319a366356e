//! The fanout proxy: spreads every gRPC call over all healthy endpoints of an upstream.
//!
//! # Layout
//! - `cli`: `run`, `check`, `wait`; start-up, and the SIGTERM drain.
//! - `check`: reading and validating the config file.
//! - `serving`: the upstreams being served, and applying a changed config file.
//! - `engine`: the data path: `fanout-wire`'s engine carries the calls, fed by the upstreams
//!   and reporting into the metrics, the drain and `/endpoints`.
//! - `activity`: streams in flight across the proxy, for the drain.
//! - `failure_log`: a rate-limited line for every call the proxy fails or sees reset.
//! - `grpc`: deadlines (`grpc-timeout`) and status answers the proxy makes itself.
//! - `service_config`: the upstream Service's gRPC service config as discovery delivers it.
//! - `upstream`: one upstream: discovery feeding its endpoint set, and through it the engine
//!   (`upstream/feed.rs`); what it reports of itself (`upstream/report.rs`).
//! - `endpoint`: one endpoint as the proxy sees it: discovered, health-checked, and how the
//!   engine reports it; its own HTTP/2 connection for active health checks.
//! - `health`: active `grpc.health.v1` checks.
//! - `grpc_health`: `GET /grpc-health`, the pod's own `grpc.health.v1` for HTTP health checkers.
//! - `split`: a weighted split of an upstream over Services (a canary), as `/endpoints` shows
//!   it.
//! - `discover`: an upstream's discovery: static, DNS (A/AAAA, SRV), or the discovery server.
//! - `subscribe`: the discovery server's stream of snapshots, with DNS as fallback.
//! - `dns`: the DNS client of discovery.
//! - `admin`: `/live`, `/ready`, `/metrics`, `/endpoints`, `POST /shutdown`.
//! - `metrics`: Prometheus metrics.
//! - `wait`: the postStart helper.
#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod check;
pub mod cli;
pub mod discover;
pub mod dns;
pub mod endpoint;
pub mod engine;
pub mod failure_log;
pub mod grpc;
pub mod grpc_health;
pub mod health;
pub mod metrics;
pub mod service_config;
pub mod serving;
pub mod split;
pub mod subscribe;
pub mod upstream;
pub mod wait;
