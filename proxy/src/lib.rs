//! The fanout proxy: spreads every gRPC call over all healthy endpoints of an upstream.
//!
//! # Layout
//! - `cli`: `run`, `check`, `wait`; start-up, and the SIGTERM drain.
//! - `check`: reading and validating the config file.
//! - `serving`: the upstreams being served (by the data path chosen), and applying a changed
//!   config file.
//! - `engine`: the `wire` data path (the default): `fanout-wire`'s engine fed by the upstreams
//!   and reporting into the metrics, the drain and `/endpoints`.
//! - The `h2` data path (`--data-path h2`, the former one): `server`, the h2c listener of
//!   each upstream; `forward`, one call: pick, open upstream, move both ways, deadline,
//!   retries; `pump`, one direction of a stream under flow control, kept for replay.
//! - `retry`: the retry budget, retry throttling, and backoff.
//! - `accounting`: per-call and per-attempt bookkeeping (drain, metrics, ejection).
//! - `activity`: streams in flight across the proxy, for the drain.
//! - `failure_log`: a rate-limited line for every call the proxy fails or sees reset.
//! - `grpc`: deadlines (`grpc-timeout`) and status answers the proxy makes itself.
//! - `service_config`: the upstream Service's gRPC service config as discovery delivers it.
//! - `upstream`: one upstream: discovery feeding its endpoint set; picking an endpoint; what
//!   it reports of itself (`upstream/report.rs`).
//! - `endpoint`: one endpoint's HTTP/2 connection (reconnect with backoff) and load.
//! - `conn_io`: an endpoint connection's bytes, read to the end after a write fails.
//! - `eject`: passive ejection of endpoints that keep failing.
//! - `health`: active `grpc.health.v1` checks.
//! - `grpc_health`: `GET /grpc-health`, the pod's own `grpc.health.v1` for HTTP health checkers.
//! - `balance` (crate `fanout-balance`): P2C over peak-EWMA cost (default), least-request,
//!   round robin; `latency`: each endpoint's latency estimate.
//! - `split`: a weighted split of an upstream over Services (a canary).
//! - `discover`: an upstream's discovery: static, DNS (A/AAAA, SRV), or the discovery server.
//! - `subscribe`: the discovery server's stream of snapshots, with DNS as fallback.
//! - `dns`: the DNS client of discovery.
//! - `admin`: `/live`, `/ready`, `/metrics`, `/endpoints`, `POST /shutdown`.
//! - `metrics`: Prometheus metrics.
//! - `wait`: the postStart helper.
#![forbid(unsafe_code)]

pub use fanout_balance as balance;
pub use fanout_balance::latency;

pub mod accounting;
pub mod activity;
pub mod admin;
pub mod check;
pub mod cli;
pub mod conn_io;
pub mod discover;
pub mod dns;
pub mod eject;
pub mod endpoint;
pub mod engine;
pub mod failure_log;
pub mod forward;
pub mod grpc;
pub mod grpc_health;
pub mod health;
pub mod metrics;
pub mod pump;
pub mod retry;
pub mod server;
pub mod service_config;
pub mod serving;
pub mod split;
pub mod subscribe;
pub mod upstream;
pub mod wait;
