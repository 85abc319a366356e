//! Helpers for fanout's end-to-end suites and benchmarks: find and start the real binaries, and
//! talk to them over loopback the way their real clients do.
//!
//! # Layout
//! - `backend`: the tonic test backend (every call kind, its id in replies, delays, errors).
//! - `backend_process`: the test backend as a process (graceful stop, `kill -9`, restart).
//! - `discovery_setup`: the discovery server against the stand-in API, and proxies subscribed.
//! - `dns`: a test DNS server whose records tests change.
//! - `fleet`: a proxy over backends named by the test DNS server, and what tests ask of it.
//! - `bench`: percentiles and process CPU for the benchmarks.
//! - `bins`: paths of the workspace binaries, built on first use.
//! - `https`: a keep-alive HTTPS client that trusts one CA (as the API server trusts `caBundle`).
//! - `kube_api`: a stand-in Kubernetes API: list and watch of Services and EndpointSlices.
//! - `load`: a bare HTTP/2 gRPC load generator (saturation and fixed rate).
//! - `open_load`: calls at a fixed rate for failure tests, and every call's outcome.
//! - `proxy`: a `fanout-proxy run` process, and backends on 127.0.0.2… for it to balance.
//! - `raw`: a bare HTTP/2 gRPC client that reports exactly what came back.
//! - `resetting`: a bare HTTP/2 endpoint that resets every request.
//! - `spread`: calls over a few connections, and how they spread over backends in windows.
//! - `streams_check`: the stream checks the proxy and its engine alone must pass.
//! - `webhook`: a `fanout-webhook serve` process on a loopback port.
//! - `fixtures`: the recorded AdmissionReviews kept with the webhook's tests.
#![forbid(unsafe_code)]

pub mod backend;
pub mod backend_process;
pub mod bench;
pub mod bins;
pub mod discovery_setup;
pub mod dns;
pub mod fixtures;
pub mod fleet;
pub mod https;
pub mod kube_api;
pub mod load;
pub mod open_load;
pub mod proxy;
pub mod raw;
pub mod resetting;
pub mod spread;
pub mod streams_check;
pub mod webhook;
