//! Reading `retryPolicy` and `retryThrottling`, with gRPC's rules for each field.

use serde_json::Value;

use super::read::{either, finish, list_items, number_from_string, positive_duration, uint};
use super::{MAX_ATTEMPTS_CAP, RetryPolicy, RetryThrottling, STATUS_CODES};
use crate::reader::{self, Object};

pub(super) fn read_retry(
    path: &str,
    value: &Value,
    faults: &reader::Faults,
) -> Option<RetryPolicy> {
    let object = Object::new(path.to_string(), value, faults)?;
    let max_attempts = match either(&object, "maxAttempts", "max_attempts") {
        Some((key, v)) => match reader::check_uint(&number_from_string(v), 0, u64::MAX) {
            // gRPC requires 2 or more; fanout also takes 1, the owner's way to say "no
            // retries by policy" (only calls provably never processed are still sent again).
            Ok(n) if n >= 1 => Some(n.min(MAX_ATTEMPTS_CAP.into()) as u32),
            Ok(n) => {
                object.fault(key, format!("must be at least 1, got {n}"));
                None
            }
            Err(message) => {
                object.fault(key, message);
                None
            }
        },
        None => {
            object.fault("maxAttempts", "is required");
            None
        }
    };
    let duration = |camel, snake| match either(&object, camel, snake) {
        Some((key, v)) => positive_duration(&object, key, v),
        None => {
            object.fault(camel, "is required");
            None
        }
    };
    let initial_backoff = duration("initialBackoff", "initial_backoff");
    let max_backoff = duration("maxBackoff", "max_backoff");
    let backoff_multiplier = match either(&object, "backoffMultiplier", "backoff_multiplier") {
        Some((key, v)) => match v.as_f64() {
            Some(m) if m > 0.0 && m.is_finite() => Some(m),
            _ => {
                object.fault(key, format!("must be a number greater than 0, got {v}"));
                None
            }
        },
        None => {
            object.fault("backoffMultiplier", "is required");
            None
        }
    };
    let codes = match either(&object, "retryableStatusCodes", "retryable_status_codes") {
        Some((key, v)) => read_codes(&object, key, v),
        None => {
            object.fault("retryableStatusCodes", "is required");
            None
        }
    };
    let per_attempt_recv_timeout =
        either(&object, "perAttemptRecvTimeout", "per_attempt_recv_timeout")
            .and_then(|(key, v)| positive_duration(&object, key, v));
    finish(
        object,
        &[
            "maxAttempts",
            "max_attempts",
            "initialBackoff",
            "initial_backoff",
            "maxBackoff",
            "max_backoff",
            "backoffMultiplier",
            "backoff_multiplier",
            "retryableStatusCodes",
            "retryable_status_codes",
            "perAttemptRecvTimeout",
            "per_attempt_recv_timeout",
        ],
    );
    Some(RetryPolicy {
        max_attempts: max_attempts?,
        initial_backoff: initial_backoff?,
        max_backoff: max_backoff?,
        backoff_multiplier: backoff_multiplier?,
        retryable_status_codes: codes?,
        per_attempt_recv_timeout,
    })
}

/// Status codes by name (`"UNAVAILABLE"`) or number (14); at least one, never OK.
fn read_codes<'a>(object: &Object<'a>, key: &str, value: &'a Value) -> Option<Vec<u16>> {
    let items = list_items(object, key, value);
    if matches!(value, Value::Array(_)) && items.is_empty() {
        object.fault(key, "must name at least one status code");
        return None;
    }
    let mut codes = Vec::new();
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        let code = match item {
            Value::String(name) => STATUS_CODES.iter().position(|c| c == name),
            Value::Number(n) => n.as_u64().filter(|&n| n < 17).map(|n| n as usize),
            _ => None,
        };
        match code {
            Some(0) => {
                object.fault(&format!("{key}[{i}]"), "OK is not a failure to retry");
                valid = false;
            }
            Some(code) => codes.push(code as u16),
            None => {
                object.fault(
                    &format!("{key}[{i}]"),
                    format!("{item} is not a gRPC status code (e.g. \"UNAVAILABLE\" or 14)"),
                );
                valid = false;
            }
        }
    }
    codes.sort_unstable();
    codes.dedup();
    valid.then_some(codes)
}

pub(super) fn read_throttling(
    path: &str,
    value: &Value,
    faults: &reader::Faults,
) -> Option<RetryThrottling> {
    let object = Object::new(path.to_string(), value, faults)?;
    let max_tokens = match either(&object, "maxTokens", "max_tokens") {
        Some((key, v)) => uint(&object, key, v, 1, 1000).map(|n| n as u32),
        None => {
            object.fault("maxTokens", "is required");
            None
        }
    };
    let token_ratio = match either(&object, "tokenRatio", "token_ratio") {
        Some((key, v)) => match v.as_f64() {
            // gRPC keeps three decimals.
            Some(r) if r.is_finite() && (r * 1000.0).trunc() >= 1.0 => {
                Some((r * 1000.0).trunc() / 1000.0)
            }
            _ => {
                object.fault(key, format!("must be a number of at least 0.001, got {v}"));
                None
            }
        },
        None => {
            object.fault("tokenRatio", "is required");
            None
        }
    };
    finish(
        object,
        &["maxTokens", "max_tokens", "tokenRatio", "token_ratio"],
    );
    Some(RetryThrottling {
        max_tokens: max_tokens?,
        token_ratio: token_ratio?,
    })
}
