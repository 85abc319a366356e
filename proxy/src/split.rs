//! A weighted split of an upstream over Services (a canary), as the discovery server delivers
//! it and the engine applies it (`fanout_balance::split`); here, its report.

use std::sync::Arc;

use serde_json::{Value, json};

pub use fanout_balance::split::SplitSpec;

use crate::endpoint::Endpoint;

/// For `/endpoints`: each Service, its weight and its endpoints (ready of all); `None` when
/// none of `endpoints` belongs to the split's Services (DNS's, while the discovery server is
/// away), which the engine then balances as one set.
pub fn state_json(spec: &SplitSpec, endpoints: &[Arc<Endpoint>]) -> Option<Value> {
    let members = |service: &String| -> Vec<&Arc<Endpoint>> {
        endpoints
            .iter()
            .filter(|e| spec.service_of.get(&e.addr) == Some(service))
            .collect()
    };
    let mut covered = false;
    let targets: Vec<Value> = spec
        .targets
        .iter()
        .map(|(service, weight)| {
            let members = members(service);
            covered |= !members.is_empty();
            json!({
                "service": service,
                "weight": weight,
                "endpoints": members.len(),
                "ready": members.iter().filter(|e| e.is_ready()).count(),
            })
        })
        .collect();
    covered.then_some(Value::Array(targets))
}
