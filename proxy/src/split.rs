//! A weighted split of an upstream over Services (a canary): the pure logic lives in
//! `fanout_balance::split`, shared with the wire data path; here, its report.

use serde_json::{Value, json};

pub use fanout_balance::split::{Split, SplitSpec};

/// For `/endpoints`: each Service, its weight and its endpoints (ready of all).
pub fn state_json<P, E>(split: &Split<P>) -> Value
where
    P: std::ops::Deref<Target = E> + Clone,
    E: fanout_balance::Candidate,
{
    let targets: Vec<Value> = split
        .targets()
        .map(|t| {
            json!({
                "service": t.service,
                "weight": t.weight,
                "endpoints": t.endpoints,
                "ready": t.ready,
            })
        })
        .collect();
    Value::Array(targets)
}
