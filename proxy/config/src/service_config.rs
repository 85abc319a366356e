//! gRPC's service config (the JSON form of `grpc.service_config.ServiceConfig`), as a Service's
//! owner declares it in the `fanout.dev/service-config` annotation: per-method timeouts, retry
//! policies and `waitForReady`, retry throttling, and the balancing policy.
//!
//! Read the way gRPC's own clients read it: field names in lowerCamelCase or the proto's
//! snake_case, durations as proto JSON (`"1.5s"`), status codes by name or number, the method
//! config that names the call's method first, then its service, then the default. One
//! deliberate difference: `maxAttempts: 1` is taken (as "no retries by policy"; gRPC refuses
//! the whole config), so an owner can switch retries off without deleting the policy. Stricter in
//! one way: an unknown field is a fault with its path (a typo such as `MaxAttempts` is not
//! silently ignored), and so is a field fanout cannot honour (`hedgingPolicy`), so nobody
//! believes a policy applies that does not.

use std::collections::HashMap;
use std::time::Duration;

use crate::Balancer;
use crate::parse::{Faults, read_document};
use crate::reader;

mod read;
mod retry;

pub use read::proto_duration;

/// gRPC caps `maxAttempts` at 5 (larger values are taken as 5, not refused).
pub const MAX_ATTEMPTS_CAP: u32 = 5;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceConfig {
    /// In document order.
    pub methods: Vec<MethodConfig>,
    pub retry_throttling: Option<RetryThrottling>,
    /// The first policy in `loadBalancingConfig` fanout applies (or `loadBalancingPolicy`).
    pub balancer: Option<Balancer>,
    /// `healthCheckConfig.serviceName`: the `grpc.health.v1` service to ask.
    pub health_check_service: Option<String>,
    /// Which method config applies to which name: service, then method ("" for every one).
    index: HashMap<String, HashMap<String, usize>>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MethodConfig {
    pub names: Vec<MethodName>,
    pub wait_for_ready: Option<bool>,
    pub timeout: Option<Duration>,
    pub max_request_bytes: Option<u32>,
    pub max_response_bytes: Option<u32>,
    pub retry: Option<RetryPolicy>,
}

/// `service` empty: every service (then `method` is empty too); `method` empty: every method
/// of `service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MethodName {
    pub service: String,
    pub method: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// 1..=5, the first attempt included; 1: no retries by policy (gRPC itself refuses 1).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
    /// gRPC status codes, sorted.
    pub retryable_status_codes: Vec<u16>,
    pub per_attempt_recv_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryThrottling {
    /// 1..=1000.
    pub max_tokens: u32,
    /// Tokens a success gives back; > 0, three decimals.
    pub token_ratio: f64,
}

/// gRPC status codes by their canonical names.
pub const STATUS_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The `loadBalancingConfig` policies fanout applies, and what it applies them as.
const POLICIES: [(&str, Balancer); 2] = [
    ("round_robin", Balancer::RoundRobin),
    ("least_request_experimental", Balancer::LeastRequest),
];

impl ServiceConfig {
    /// Every fault in the document, each with its path (e.g.
    /// `methodConfig[0].retryPolicy.maxAttempts: must be at least 1, got 0`).
    pub fn parse(text: &str) -> Result<Self, Faults> {
        read_document(text, read::read_config)
    }

    /// The method config for a call to `path` (`/package.Service/Method`): the one naming the
    /// method, else the one naming its service, else the default one.
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        self.methods.get(self.method_index(path)?)
    }

    /// Where in [`Self::methods`] the method config for `path` is (see [`Self::method`]).
    pub fn method_index(&self, path: &str) -> Option<usize> {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        // Looked up by &str: no allocation on a call's path.
        let find = |service: &str, method: &str| self.index.get(service)?.get(method).copied();
        (!service.is_empty())
            .then(|| find(service, method).or_else(|| find(service, "")))
            .flatten()
            .or_else(|| find("", ""))
    }
}

/// Each name maps to one method config; a name given twice is a fault (gRPC refuses it too).
fn index_names(config: &mut ServiceConfig, faults: &reader::Faults) {
    let mut index: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for (i, method) in config.methods.iter().enumerate() {
        for (j, name) in method.names.iter().enumerate() {
            let methods = index.entry(name.service.clone()).or_default();
            if let Some(&first) = methods.get(&name.method) {
                faults.add(
                    &format!("methodConfig[{i}].name[{j}]"),
                    format!(
                        "{} is already named by methodConfig[{first}]",
                        describe(name)
                    ),
                );
            } else {
                methods.insert(name.method.clone(), i);
            }
        }
    }
    config.index = index;
}

fn describe(name: &MethodName) -> String {
    match (name.service.as_str(), name.method.as_str()) {
        ("", _) => "the default (no service)".into(),
        (service, "") => format!("service {service:?}"),
        (service, method) => format!("{service}/{method}"),
    }
}

#[cfg(test)]
mod tests;
