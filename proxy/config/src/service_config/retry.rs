//! Reading `retryPolicy` and `retryThrottling`, with gRPC's rules for each field.

use serde_json::Value;

use super::read::{
    either, finish, list_items, number_from_string, positive_duration, required, uint,
};
use super::{MAX_ATTEMPTS_CAP, RetryPolicy, RetryThrottling, STATUS_CODES};
use crate::reader::{self, Object};

pub(super) fn read_retry(
    path: &str,
    value: &Value,
    faults: &reader::Faults,
) -> Option<RetryPolicy> {
    let object = Object::new(path.to_string(), value, faults)?;
    let max_attempts = required(&object, "maxAttempts", "max_attempts", |key, v| {
        match reader::check_uint(&number_from_string(v), 0, u64::MAX) {
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
        }
    });
    let duration = |key, v| positive_duration(&object, key, v);
    let initial_backoff = required(&object, "initialBackoff", "initial_backoff", duration);
    let max_backoff = required(&object, "maxBackoff", "max_backoff", duration);
    let backoff_multiplier = required(
        &object,
        "backoffMultiplier",
        "backoff_multiplier",
        |key, v| {
            let multiplier = v.as_f64().filter(|m| *m > 0.0 && m.is_finite());
            if multiplier.is_none() {
                object.fault(key, format!("must be a number greater than 0, got {v}"));
            }
            multiplier
        },
    );
    let codes = required(
        &object,
        "retryableStatusCodes",
        "retryable_status_codes",
        |key, v| read_codes(&object, key, v),
    );
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
    let max_tokens = required(&object, "maxTokens", "max_tokens", |key, v| {
        uint(&object, key, v, 1, 1000).map(|n| n as u32)
    });
    let token_ratio = required(&object, "tokenRatio", "token_ratio", |key, v| {
        // gRPC keeps three decimals.
        let ratio = v
            .as_f64()
            .filter(|r| r.is_finite())
            .map(|r| (r * 1000.0).trunc() / 1000.0)
            .filter(|r| *r >= 0.001);
        if ratio.is_none() {
            object.fault(key, format!("must be a number of at least 0.001, got {v}"));
        }
        ratio
    });
    finish(
        object,
        &["maxTokens", "max_tokens", "tokenRatio", "token_ratio"],
    );
    Some(RetryThrottling {
        max_tokens: max_tokens?,
        token_ratio: token_ratio?,
    })
}
