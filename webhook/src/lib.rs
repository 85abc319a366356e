//! The fanout admission webhook: injects the fanout proxy and its rendered config into pods of
//! opted-in namespaces.
//!
//! # Layout
//! - `annotations`: every name fanout reads and writes on pods.
//! - `upstreams`: the `fanout.dev/upstreams` grammar (pure).
//! - `quantity`: Kubernetes resource quantities, to check the proxy resource annotations.
//! - `settings`: what the chart decides for every pod (image, resources, native sidecars).
//! - `lookup`: Service lookups, the only Kubernetes API I/O of injection, behind a trait.
//! - `inject`: the decision and the JSON patch: `plan` (pure rules), `resolve` (upstream →
//!   DNS name and pod port), `container` (the proxy container and volume), `patch`.
//! - `admission`: AdmissionReview v1 in, AdmissionReview response out.
//! - `metrics`: Prometheus metrics of admissions.
//! - `server`: the HTTPS server (`fn app() -> Router` and the TLS accept loop).
//! - `tls`: the serving certificate, reloaded from disk when it changes.
//! - `autocert`: self-managed certificates: CA and serving cert in a Secret, `caBundle` patched.
//! - `discovery`: the discovery server: one watch of Services and EndpointSlices, served to
//!   every proxy as gRPC streams.
//! - `cli`: the `serve` and `inject` commands.
//! - `manifest`: offline injection of YAML manifests (`fanout-webhook inject`).
#![forbid(unsafe_code)]

pub mod admission;
pub mod annotations;
pub mod autocert;
pub mod cli;
pub mod discovery;
pub mod inject;
pub mod lookup;
pub mod manifest;
pub mod metrics;
pub mod quantity;
pub mod server;
pub mod settings;
pub mod tls;
pub mod upstreams;
