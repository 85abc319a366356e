//! The fanout proxy: spreads every gRPC call over all healthy endpoints of an upstream.
//!
//! # Layout
//! - `check`: reading and validating the config file (`fanout-proxy check`).
//!
//! The balancing data path (`run`) and the start-up probe (`wait`) come with the proxy issue;
//! this crate so far holds what the webhook's rendered configs are checked with.
#![forbid(unsafe_code)]

pub mod check;
