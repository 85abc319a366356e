//! A forwarding-specific HTTP/2 layer, the alternative to the `h2` crate proposed in issue 13:
//! frames are forwarded as they are read, header blocks re-encoded field by field, and no
//! request or response objects are built.
//!
//! `fanout-proxy run --data-path wire` carries its calls with this crate's engine; `h2` is
//! still the default until every suite, the cluster suite and the benchmarks agree
//! (`DESIGN.md`). The binary `fanout-wire-spike` runs the engine alone in front of a fixed
//! set of endpoints, for benchmarks.
//!
//! # Layout
//! - `frame`: the 9-byte frame header, padding, and writing frames into an output buffer.
//! - `hpack`: re-encoding decoded fields without a dynamic table.
//! - `engine`: the forwarder, one per thread; `engine::report`: what it tells the proxy.

#![forbid(unsafe_code)]

pub mod engine;
pub mod frame;
pub mod hpack;
