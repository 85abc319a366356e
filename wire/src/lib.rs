//! A forwarding-specific HTTP/2 layer, the alternative to the `h2` crate proposed in issue 13:
//! frames are forwarded as they are read, header blocks re-encoded field by field, and no
//! request or response objects are built.
//!
//! Today this crate is a **measuring spike**, not fanout's data path: `fanout-proxy` still
//! runs on `h2`. The spike (`spike.rs`, binary `fanout-wire-spike`) forwards gRPC calls from
//! clients to a fixed set of endpoints, round robin, with none of the proxy's policy, so that
//! `fanout-bench` can put a number on the floor such a layer reaches.
//!
//! # Layout
//! - `frame`: the 9-byte frame header, padding, and writing frames into an output buffer.
//! - `hpack`: re-encoding decoded fields without a dynamic table.
//! - `spike`: the single-threaded forwarder.

#![forbid(unsafe_code)]

pub mod frame;
pub mod hpack;
pub mod spike;
