//! `fanout.dev/policy` on an upstream's Service: what its owner decides that gRPC's service
//! config has no place for — active health checks, ejection, a whole-call and an idle timeout,
//! the balancer, and a weighted split over Services (a canary). The same field names and
//! rules as the proxy config's own (`health_check`, `ejection`, `balancer`), so a setting reads
//! the same wherever it is written.

use std::time::Duration;

use serde_json::Value;

use crate::names::{is_dns_1035_label, is_dns_1123_label};
use crate::parse::{Faults, read_document, read_ejection, read_health_check};
use crate::reader::{self, Object};
use crate::{Balancer, Ejection, HealthCheck};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub health_check: Option<HealthCheck>,
    pub ejection: Option<Ejection>,
    /// A limit on every call, on top of the client's deadline.
    pub request_timeout: Option<Duration>,
    /// A call (a stream) with nothing sent either way for this long is ended.
    pub idle_timeout: Option<Duration>,
    pub balancer: Option<Balancer>,
    /// Calls split over these Services by weight; empty: no split.
    pub split: Vec<WeightedService>,
}

/// `service` is a Service name, or `name.namespace` for one in another namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedService {
    pub service: String,
    pub weight: u32,
}

/// A split's weights add up to at most this (weights are parts of it, like percentages).
pub const MAX_TOTAL_WEIGHT: u64 = 10_000;

impl Policy {
    /// Every fault with its path, e.g. `split[1].weight: must be 0..=10000, got -1`.
    pub fn parse(text: &str) -> Result<Self, Faults> {
        read_document(text, read_policy)
    }
}

fn read_policy(value: &Value, faults: &reader::Faults) -> Option<Policy> {
    let top = Object::new(String::new(), value, faults)?;
    let policy = Policy {
        health_check: top.object("health_check").map(read_health_check),
        ejection: top.object("ejection").map(read_ejection),
        request_timeout: top.opt_duration("request_timeout", Duration::from_millis(1)),
        idle_timeout: top.opt_duration("idle_timeout", Duration::from_millis(1)),
        balancer: top.string("balancer").and_then(|name| {
            let balancer = Balancer::from_name(name);
            if balancer.is_none() {
                top.fault(
                    "balancer",
                    format!(
                        "unknown balancer {name:?}; use one of {}",
                        Balancer::NAMES.join(", ")
                    ),
                );
            }
            balancer
        }),
        split: read_split(&top),
    };
    top.finish();
    Some(policy)
}

fn read_split(top: &Object<'_>) -> Vec<WeightedService> {
    let Some(value) = top.get("split") else {
        return Vec::new();
    };
    let Value::Array(items) = value else {
        top.fault(
            "split",
            format!("must be a list, got {}", reader::kind(value)),
        );
        return Vec::new();
    };
    let mut split: Vec<WeightedService> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(entry) = Object::new(top.field_path(&format!("split[{i}]")), item, top.faults())
        else {
            continue;
        };
        let service = entry.required_string("service");
        if let Some(service) = service {
            let (name, namespace) = service.split_once('.').unwrap_or((service, ""));
            if !is_dns_1035_label(name) || !(namespace.is_empty() || is_dns_1123_label(namespace)) {
                entry.fault(
                    "service",
                    format!("{service:?} is not a Service name or name.namespace"),
                );
            } else if split.iter().any(|s| s.service == service) {
                entry.fault("service", format!("{service:?} is already in the split"));
            }
        }
        let weight = entry.required("weight").and_then(|v| {
            reader::check_uint(v, 0, MAX_TOTAL_WEIGHT)
                .map_err(|m| entry.fault("weight", m))
                .ok()
        });
        entry.finish();
        if let (Some(service), Some(weight)) = (service, weight) {
            split.push(WeightedService {
                service: service.to_string(),
                weight: weight as u32,
            });
        }
    }
    let total: u64 = split.iter().map(|s| u64::from(s.weight)).sum();
    if !items.is_empty() && split.len() == items.len() {
        if total == 0 {
            top.fault(
                "split",
                "the weights add up to 0: no Service would get a call",
            );
        } else if total > MAX_TOTAL_WEIGHT {
            top.fault(
                "split",
                format!("the weights add up to {total}, more than {MAX_TOTAL_WEIGHT}"),
            );
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(json: &str) -> Vec<String> {
        Policy::parse(json).unwrap_err().lines()
    }

    /// The App Mesh settings this project grew from, as a policy.
    #[test]
    fn reads_a_whole_policy() {
        let policy = Policy::parse(
            r#"{"health_check": {"interval": "5s", "timeout": "2s", "healthy_threshold": 2,
                  "unhealthy_threshold": 3},
                "ejection": {"consecutive_failures": 3, "base_time": "10s", "max_time": "60s"},
                "request_timeout": "60s", "idle_timeout": "60s", "balancer": "least_request",
                "split": [{"service": "app", "weight": 90},
                          {"service": "app-canary.shop", "weight": 10}]}"#,
        )
        .unwrap();
        let check = policy.health_check.unwrap();
        assert_eq!(
            (
                check.interval,
                check.timeout,
                check.healthy_threshold,
                check.unhealthy_threshold
            ),
            (Duration::from_secs(5), Duration::from_secs(2), 2, 3)
        );
        assert_eq!(policy.ejection.unwrap().consecutive_failures, 3);
        assert_eq!(policy.request_timeout, Some(Duration::from_secs(60)));
        assert_eq!(policy.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(policy.balancer, Some(Balancer::LeastRequest));
        assert_eq!(
            policy.split,
            [
                WeightedService {
                    service: "app".into(),
                    weight: 90
                },
                WeightedService {
                    service: "app-canary.shop".into(),
                    weight: 10
                }
            ]
        );
        assert_eq!(Policy::parse("{}").unwrap(), Policy::default());
    }

    #[test]
    fn every_fault_is_named_by_its_path() {
        assert_eq!(
            faults(
                r#"{"health_check": {"interval": "1s", "timeout": "2s"},
                    "idle_timeout": "soon", "balancer": "fastest",
                    "split": [{"service": "App", "weight": 1}, {"service": "b", "weight": -1},
                              {"service": "c"}, {"service": "c", "weight": 1, "extra": 0}],
                    "retries": 5}"#
            ),
            [
                "health_check.timeout: must not exceed interval (2s > 1s)",
                "idle_timeout: \"soon\" is not a duration; write e.g. \"250ms\" or \"5s\"",
                "balancer: unknown balancer \"fastest\"; use one of peak_ewma, round_robin, least_request",
                "split[0].service: \"App\" is not a Service name or name.namespace",
                "split[1].weight: must be a whole number 0..=10000, got -1",
                "split[2].weight: is required",
                "split[3].extra: unknown field",
                "retries: unknown field",
            ]
        );
        assert_eq!(
            faults(r#"{"split": [{"service": "a", "weight": 0}, {"service": "a", "weight": 0}]}"#),
            [
                "split[1].service: \"a\" is already in the split",
                "split: the weights add up to 0: no Service would get a call",
            ]
        );
        assert_eq!(
            faults(
                r#"{"split": [{"service": "a", "weight": 9000}, {"service": "b", "weight": 1001}]}"#
            ),
            ["split: the weights add up to 10001, more than 10000"]
        );
    }
}
