//! What an upstream says of itself: why it is not ready (`/ready`), its state as JSON
//! (`/endpoints`), and its endpoints by state (the `fanout_proxy_endpoints` gauge).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::Upstream;
use crate::endpoint::State;

impl Upstream {
    /// Why the upstream is not ready, for `/ready`.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.has_ready_endpoint() {
            return None;
        }
        let endpoints = self.endpoints();
        Some(if endpoints.is_empty() {
            match self
                .last_discovery_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
            {
                Some(error) => format!("no endpoints: {error}"),
                None if !self.discovered.load(Ordering::Relaxed) => "discovering endpoints".into(),
                None => "discovery found no endpoints".into(),
            }
        } else {
            let mut states: Vec<(&str, usize)> = Vec::new();
            for endpoint in endpoints.iter() {
                let state = endpoint.state(&endpoint.view()).as_str();
                match states.iter_mut().find(|(s, _)| *s == state) {
                    Some((_, n)) => *n += 1,
                    None => states.push((state, 1)),
                }
            }
            let states: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
            format!(
                "none of {} endpoints is ready ({})",
                endpoints.len(),
                states.join(", ")
            )
        })
    }

    pub fn state_json(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints()
            .iter()
            .map(|e| {
                let view = e.view();
                json!({
                    "address": e.label,
                    "state": e.state(&view).as_str(),
                    "outstanding": view.outstanding,
                    "started": view.started,
                    "connections": view.connections,
                    "rtt_ms": view.rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
                })
            })
            .collect();
        let status = self.discovery_status();
        json!({
            "name": &*self.name,
            "listen": self.config.listen.to_string(),
            "ready": self.has_ready_endpoint(),
            "balancer": self.balancer(),
            "discovery": {
                "configured": self.config.discovery.source(),
                "source": status.source,
                "server_connected": status.server_connected,
                "updates": status.updates,
            },
            "endpoints": endpoints,
            "service_config": self.service_config.state_json(),
            "policy": self.policy.state_json(),
            "split": self.split.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                .and_then(|spec| crate::split::state_json(spec, &self.endpoints())),
        })
    }

    /// Endpoint counts by state, for the `fanout_proxy_endpoints` gauge.
    pub fn state_counts(&self) -> HashMap<&'static str, i64> {
        let mut counts: HashMap<&'static str, i64> = [
            State::Ready,
            State::Connecting,
            State::Failing,
            State::Removed,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for endpoint in self.endpoints().iter() {
            *counts
                .entry(endpoint.state(&endpoint.view()).as_str())
                .or_default() += 1;
        }
        counts
    }
}
