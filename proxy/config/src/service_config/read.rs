//! Reading a service config document: its fields in either spelling, its durations and
//! numbers as proto JSON writes them, every fault with its path.

use std::time::Duration;

use serde_json::Value;

use super::retry::{read_retry, read_throttling};
use super::{MethodConfig, MethodName, POLICIES, ServiceConfig, index_names};
use crate::Balancer;
use crate::reader::{self, Object};

/// A field by its lowerCamelCase or its snake_case name (proto JSON accepts both).
pub(super) fn either<'a>(
    object: &Object<'a>,
    camel: &'a str,
    snake: &'a str,
) -> Option<(&'a str, &'a Value)> {
    if camel == snake {
        return object.get(camel).map(|v| (camel, v));
    }
    match (object.get(camel), object.get(snake)) {
        (Some(_), Some(_)) => {
            object.fault(snake, format!("given twice, also as {camel}"));
            None
        }
        (Some(v), None) => Some((camel, v)),
        (None, Some(v)) => Some((snake, v)),
        (None, None) => None,
    }
}

/// A field that must be given, in either spelling, read by `read`; absent, it is a fault under
/// its lowerCamelCase name.
pub(super) fn required<'a, T>(
    object: &Object<'a>,
    camel: &'a str,
    snake: &'a str,
    read: impl FnOnce(&'a str, &'a Value) -> Option<T>,
) -> Option<T> {
    match either(object, camel, snake) {
        Some((key, value)) => read(key, value),
        None => {
            object.fault(camel, "is required");
            None
        }
    }
}

/// Reports unknown fields, with a hint when one differs from a known name only in case (Go's
/// JSON decoder accepts `MaxAttempts`; gRPC's C core and Java do not).
pub(super) fn finish(object: Object<'_>, known: &[&str]) {
    for key in object.keys() {
        if !known.contains(&key)
            && let Some(name) = known.iter().find(|k| k.eq_ignore_ascii_case(key))
        {
            object.fault(key, format!("unknown field; it is spelled {name}"));
            object.get(key); // reported here, not again as merely unknown
        }
    }
    object.finish();
}

pub(super) fn read_config(value: &Value, faults: &reader::Faults) -> Option<ServiceConfig> {
    let top = Object::new(String::new(), value, faults)?;
    let mut config = ServiceConfig::default();
    if let Some((key, list)) = either(&top, "methodConfig", "method_config") {
        for (i, item) in list_items(&top, key, list).iter().enumerate() {
            let path = format!("{key}[{i}]");
            if let Some(method) = read_method(&path, item, faults) {
                config.methods.push(method);
            }
        }
    }
    if let Some((key, value)) = either(&top, "retryThrottling", "retry_throttling") {
        config.retry_throttling = read_throttling(&top.field_path(key), value, faults);
    }
    config.balancer = read_balancer(&top);
    if let Some((key, value)) = either(&top, "healthCheckConfig", "health_check_config")
        && let Some(health) = Object::new(top.field_path(key), value, faults)
    {
        config.health_check_service = either(&health, "serviceName", "service_name")
            .and_then(|(key, v)| string(&health, key, v));
        finish(health, &["serviceName", "service_name"]);
    }
    finish(
        top,
        &[
            "methodConfig",
            "method_config",
            "retryThrottling",
            "retry_throttling",
            "loadBalancingConfig",
            "load_balancing_config",
            "loadBalancingPolicy",
            "load_balancing_policy",
            "healthCheckConfig",
            "health_check_config",
        ],
    );
    index_names(&mut config, faults);
    Some(config)
}

pub(super) fn list_items<'a>(object: &Object<'a>, key: &str, value: &'a Value) -> &'a [Value] {
    match value {
        Value::Array(items) => items,
        other => {
            object.fault(key, format!("must be a list, got {}", reader::kind(other)));
            &[]
        }
    }
}

fn string<'a>(object: &Object<'a>, key: &str, value: &'a Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        other => {
            object.fault(
                key,
                format!("must be a string, got {}", reader::kind(other)),
            );
            None
        }
    }
}

fn read_method(path: &str, value: &Value, faults: &reader::Faults) -> Option<MethodConfig> {
    let object = Object::new(path.to_string(), value, faults)?;
    let mut method = MethodConfig::default();
    if let Some(list) = object.get("name") {
        for (j, item) in list_items(&object, "name", list).iter().enumerate() {
            if let Some(name) = read_name(&format!("{path}.name[{j}]"), item, faults) {
                method.names.push(name);
            }
        }
    }
    method.wait_for_ready = match either(&object, "waitForReady", "wait_for_ready") {
        Some((_, Value::Bool(b))) => Some(*b),
        Some((key, other)) => {
            object.fault(
                key,
                format!("must be true or false, got {}", reader::kind(other)),
            );
            None
        }
        None => None,
    };
    if let Some((key, v)) = either(&object, "timeout", "timeout") {
        method.timeout = positive_duration(&object, key, v);
    }
    if let Some((key, v)) = either(
        &object,
        "maxRequestMessageBytes",
        "max_request_message_bytes",
    ) {
        method.max_request_bytes = uint(&object, key, v, 0, u32::MAX.into()).map(|n| n as u32);
    }
    if let Some((key, v)) = either(
        &object,
        "maxResponseMessageBytes",
        "max_response_message_bytes",
    ) {
        method.max_response_bytes = uint(&object, key, v, 0, u32::MAX.into()).map(|n| n as u32);
    }
    if let Some((key, v)) = either(&object, "retryPolicy", "retry_policy") {
        method.retry = read_retry(&object.field_path(key), v, faults);
    }
    if let Some((key, _)) = either(&object, "hedgingPolicy", "hedging_policy") {
        object.fault(
            key,
            "fanout does not hedge calls (send copies before an answer); use retryPolicy",
        );
    }
    finish(
        object,
        &[
            "name",
            "waitForReady",
            "wait_for_ready",
            "timeout",
            "maxRequestMessageBytes",
            "max_request_message_bytes",
            "maxResponseMessageBytes",
            "max_response_message_bytes",
            "retryPolicy",
            "retry_policy",
            "hedgingPolicy",
            "hedging_policy",
        ],
    );
    Some(method)
}

fn read_name(path: &str, value: &Value, faults: &reader::Faults) -> Option<MethodName> {
    let object = Object::new(path.to_string(), value, faults)?;
    let service = object
        .get("service")
        .and_then(|v| string(&object, "service", v))
        .unwrap_or_default();
    let method = object
        .get("method")
        .and_then(|v| string(&object, "method", v))
        .unwrap_or_default();
    let valid = if service.is_empty() && !method.is_empty() {
        object.fault(
            "method",
            "needs a service: a method name alone matches nothing",
        );
        false
    } else {
        true
    };
    finish(object, &["service", "method"]);
    valid.then_some(MethodName { service, method })
}

/// The first policy of `loadBalancingConfig` fanout applies (gRPC's rule: the first one the
/// client knows), else the deprecated `loadBalancingPolicy`.
fn read_balancer(top: &Object<'_>) -> Option<Balancer> {
    let known = || {
        POLICIES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((key, list)) = either(top, "loadBalancingConfig", "load_balancing_config") {
        let items = list_items(top, key, list);
        let mut names = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Object(map) if map.len() == 1 => {
                    let name = map.keys().next().map(String::as_str).unwrap_or_default();
                    if let Some((_, balancer)) = POLICIES.iter().find(|(n, _)| *n == name) {
                        return Some(*balancer);
                    }
                    names.push(name);
                }
                _ => top.fault(
                    &format!("{key}[{i}]"),
                    "must be an object with exactly one policy name",
                ),
            }
        }
        if !names.is_empty() {
            top.fault(
                key,
                format!("fanout applies none of {names:?}; it knows {}", known()),
            );
        }
        return None;
    }
    match either(top, "loadBalancingPolicy", "load_balancing_policy") {
        Some((key, Value::String(name))) => {
            let lower = name.to_ascii_lowercase();
            match POLICIES.iter().find(|(n, _)| *n == lower) {
                Some((_, balancer)) => Some(*balancer),
                None => {
                    top.fault(
                        key,
                        format!("fanout does not apply {name:?}; it knows {}", known()),
                    );
                    None
                }
            }
        }
        Some((key, other)) => {
            top.fault(
                key,
                format!("must be a string, got {}", reader::kind(other)),
            );
            None
        }
        None => None,
    }
}

/// A proto JSON integer may be written as a string.
pub(super) fn number_from_string(value: &Value) -> Value {
    match value {
        Value::String(s) => s
            .parse::<u64>()
            .map(Value::from)
            .unwrap_or_else(|_| value.clone()),
        other => other.clone(),
    }
}

pub(super) fn uint(
    object: &Object<'_>,
    key: &str,
    value: &Value,
    min: u64,
    max: u64,
) -> Option<u64> {
    reader::check_uint(&number_from_string(value), min, max)
        .map_err(|message| object.fault(key, message))
        .ok()
}

pub(super) fn positive_duration(object: &Object<'_>, key: &str, value: &Value) -> Option<Duration> {
    let parsed = match value {
        Value::String(text) => proto_duration(text),
        other => Err(format!(
            "must be a duration string such as \"1.5s\", got {}",
            reader::kind(other)
        )),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            object.fault(key, "must be greater than 0s");
            None
        }
        Err(message) => {
            object.fault(key, message);
            None
        }
    }
}

/// A proto JSON duration: seconds with up to nine decimals and an `s`, e.g. `"0.25s"`.
pub fn proto_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as \"1.5s\" (seconds, then s)");
    let number = text.strip_suffix('s').ok_or_else(bad)?;
    if number.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 9
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || (number.contains('.') && fraction.is_empty())
    {
        return Err(bad());
    }
    let seconds: u64 = whole.parse().map_err(|_| bad())?;
    let nanos: u32 = format!("{fraction:0<9}").parse().map_err(|_| bad())?;
    Ok(Duration::new(seconds, nanos))
}
