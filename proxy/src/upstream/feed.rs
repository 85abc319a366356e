//! What an upstream gives the engine that carries its calls (`crate::engine`): the
//! endpoints calls may go to, the Service's service config, and the settings its policy
//! changes. A replaced upstream gives nothing more.

use std::sync::atomic::Ordering;

use super::Upstream;
use crate::engine::{Engine, balancer_of};
use fanout_proxy_config::Balancer;

impl Upstream {
    /// The engine, while this upstream feeds it.
    pub(super) fn feeding(&self) -> Option<&Engine> {
        (!self.stopped.load(Ordering::Relaxed)).then_some(&*self.engine)
    }

    /// Gives the engine the endpoints calls may go to: those discovery found, less those
    /// active health checks hold out.
    pub(crate) fn feed_endpoints(&self) {
        if let Some(engine) = self.feeding() {
            let addrs = self
                .endpoints()
                .iter()
                .filter(|e| !e.is_removed() && e.is_healthy())
                .map(|e| e.addr)
                .collect();
            engine.feed_endpoints(addrs);
        }
    }

    /// The balancer in force (`/endpoints`).
    pub(crate) fn balancer(&self) -> Balancer {
        let policy = self.policy.current();
        let service_config = self.service_config.current();
        balancer_of(&self.config, service_config.as_deref(), policy.as_deref())
    }

    /// Gives the engine the Service's service config and the settings its policy changes.
    pub(crate) fn feed_rules(&self) {
        if let Some(engine) = self.feeding() {
            let policy = self.policy.current();
            engine.feed_rules(
                self.service_config.current(),
                &self.config,
                policy.as_deref(),
            );
        }
    }
}
