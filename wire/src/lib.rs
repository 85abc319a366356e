//! A forwarding-specific HTTP/2 layer, which replaced the `h2` crate in fanout-proxy's data
//! path (issue 13): frames are forwarded as they are read, header blocks re-encoded field by
//! field, and no request or response objects are built.
//!
//! `fanout-proxy` carries every call with this crate's engine (`DESIGN.md`). The binary
//! `fanout-wire-spike` runs the engine alone in front of a fixed set of endpoints, for
//! benchmarks.
//!
//! # Layout
//! - `frame`: the 9-byte frame header, padding, and writing frames into an output buffer.
//! - `hpack`: re-encoding decoded fields without a dynamic table.
//! - `engine`: the forwarder, one per thread; `engine::report`: what it tells the proxy.

#![forbid(unsafe_code)]

pub mod engine;
pub mod frame;
pub mod hpack;
