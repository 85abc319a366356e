//! The upstream Service's policy annotations as the discovery server delivers them
//! (`fanout.dev/service-config` and `fanout.dev/policy`, verbatim): kept parsed for the calls,
//! replaced when an annotation changes, and kept as it was when a change does not parse — the
//! owner's mistake is logged with every fault's path, shown in `/endpoints` and the metrics,
//! and calls go on under the last valid one.

use std::sync::{Arc, Mutex, RwLock};

use fanout_proxy_config::Faults;
use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::service_config::{MethodConfig, STATUS_CODES, ServiceConfig};
use serde_json::{Value, json};

/// A document a Service annotation holds.
pub trait Annotation: Sized {
    const NAME: &'static str;
    fn parse(text: &str) -> Result<Self, Faults>;
}

impl Annotation for ServiceConfig {
    const NAME: &'static str = "fanout.dev/service-config";
    fn parse(text: &str) -> Result<Self, Faults> {
        ServiceConfig::parse(text)
    }
}

impl Annotation for Policy {
    const NAME: &'static str = "fanout.dev/policy";
    fn parse(text: &str) -> Result<Self, Faults> {
        Policy::parse(text)
    }
}

/// What [`ServiceConfigCell::update`] did with a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Unchanged,
    Applied,
    /// It did not parse; the last valid config stays in force.
    Rejected,
}

/// One annotation of the Service, live.
pub struct Live<T> {
    /// The annotation last seen, so an unchanged one is not parsed (or reported) again.
    text: Mutex<String>,
    current: RwLock<Option<Arc<T>>>,
    /// The faults of the last text seen, when it did not parse.
    rejected: Mutex<Option<Vec<String>>>,
}

impl<T> Default for Live<T> {
    fn default() -> Self {
        Self {
            text: Mutex::default(),
            current: RwLock::new(None),
            rejected: Mutex::default(),
        }
    }
}

pub type ServiceConfigCell = Live<ServiceConfig>;

impl<T: Annotation> Live<T> {
    /// Applies the annotation's text (empty: the Service has none).
    pub fn update(&self, upstream: &str, text: &str) -> Update {
        {
            let mut last = self.text.lock().unwrap_or_else(|e| e.into_inner());
            if *last == text {
                return Update::Unchanged;
            }
            text.clone_into(&mut last);
        }
        let parsed = if text.trim().is_empty() {
            None
        } else {
            match T::parse(text) {
                Ok(parsed) => Some(Arc::new(parsed)),
                Err(faults) => {
                    let faults = faults.lines();
                    tracing::warn!(upstream, annotation = T::NAME, faults = %faults.join("; "),
                        "the Service's annotation is invalid; the last valid one stays in force");
                    *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(faults);
                    return Update::Rejected;
                }
            }
        };
        tracing::info!(
            upstream,
            annotation = T::NAME,
            present = parsed.is_some(),
            "Service annotation applied"
        );
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = parsed;
        Update::Applied
    }

    /// What is in force.
    pub fn current(&self) -> Option<Arc<T>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the latest text did not parse (and an older one, or none, is in force).
    pub fn is_rejected(&self) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// The faults of a rejected change, for `/endpoints`.
    fn rejected_json(&self) -> Value {
        json!(
            self.rejected
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        )
    }
}

impl Live<Policy> {
    /// For `/endpoints`: the settings in force that act live (the rest were rendered at
    /// injection), and a rejected change's faults.
    pub fn state_json(&self) -> Value {
        let current = self.current();
        json!({
            "present": current.is_some(),
            "request_timeout_ms": current.as_ref().and_then(|p| p.request_timeout)
                .map(|t| t.as_millis() as u64),
            "idle_timeout_ms": current.as_ref().and_then(|p| p.idle_timeout)
                .map(|t| t.as_millis() as u64),
            "ejection": current.as_ref().and_then(|p| p.ejection.as_ref())
                .map(|e| json!({"consecutive_failures": e.consecutive_failures})),
            "rejected_change": self.rejected_json(),
        })
    }
}

impl Live<ServiceConfig> {
    /// What is in force, for `/endpoints`: each method config's names, timeout, waitForReady
    /// and retry policy (its retryable codes by name: retrying anything but a call that never
    /// reached a backend is the Service owner's choice, and shown as such), and the faults of
    /// a rejected change.
    pub fn state_json(&self) -> Value {
        let current = self.current();
        let methods: Vec<Value> = current
            .iter()
            .flat_map(|config| config.methods.iter())
            .map(method_json)
            .collect();
        json!({
            "present": current.is_some(),
            "methods": methods,
            "retry_throttling": current.as_ref().and_then(|c| c.retry_throttling.as_ref())
                .map(|t| json!({"max_tokens": t.max_tokens, "token_ratio": t.token_ratio})),
            "rejected_change": self.rejected_json(),
        })
    }
}

fn method_json(method: &MethodConfig) -> Value {
    let names: Vec<String> = method
        .names
        .iter()
        .map(|n| match (n.service.as_str(), n.method.as_str()) {
            ("", _) => "*".to_string(),
            (service, "") => format!("{service}/*"),
            (service, method) => format!("{service}/{method}"),
        })
        .collect();
    json!({
        "names": names,
        "timeout_ms": method.timeout.map(|t| t.as_millis() as u64),
        "wait_for_ready": method.wait_for_ready,
        "retry": method.retry.as_ref().map(|r| json!({
            "max_attempts": r.max_attempts,
            "initial_backoff_ms": r.initial_backoff.as_millis() as u64,
            "max_backoff_ms": r.max_backoff.as_millis() as u64,
            "backoff_multiplier": r.backoff_multiplier,
            "retryable_status_codes": r.retryable_status_codes.iter()
                .map(|c| STATUS_CODES[usize::from(*c)]).collect::<Vec<_>>(),
            "per_attempt_timeout_ms": r.per_attempt_recv_timeout.map(|t| t.as_millis() as u64),
        })),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timeout(cell: &ServiceConfigCell, path: &str) -> Option<Duration> {
        let config = cell.current()?;
        config.methods[config.method_index(path)?].timeout
    }

    #[test]
    fn a_change_that_does_not_parse_leaves_the_last_valid_config_in_force() {
        let cell = ServiceConfigCell::default();
        assert_eq!(timeout(&cell, "/a.B/C"), None);
        let valid = r#"{"methodConfig": [{"name": [{"service": "a.B"}], "timeout": "0.2s"}]}"#;
        assert_eq!(cell.update("app", valid), Update::Applied);
        assert_eq!(cell.update("app", valid), Update::Unchanged);
        assert_eq!(timeout(&cell, "/a.B/C"), Some(Duration::from_millis(200)));
        assert_eq!(timeout(&cell, "/x.Y/C"), None);
        let invalid = r#"{"methodConfig": [{"timeout": "soon"}]}"#;
        assert_eq!(cell.update("app", invalid), Update::Rejected);
        assert_eq!(timeout(&cell, "/a.B/C"), Some(Duration::from_millis(200)));
        let state = cell.state_json();
        assert_eq!(state["methods"][0]["timeout_ms"], 200);
        let faults = state["rejected_change"].to_string();
        assert!(faults.contains("methodConfig[0].timeout"), "{faults}");
        assert_eq!(cell.update("app", ""), Update::Applied);
        assert_eq!(timeout(&cell, "/a.B/C"), None);
        assert_eq!(cell.state_json()["rejected_change"], Value::Null);
    }

    #[test]
    fn endpoints_shows_which_status_codes_the_owner_chose_to_retry() {
        let cell = ServiceConfigCell::default();
        let text = r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 5,
            "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", 10]}}]}"#;
        assert_eq!(cell.update("app", text), Update::Applied);
        let retry = &cell.state_json()["methods"][0]["retry"];
        assert_eq!(
            retry["retryable_status_codes"],
            json!(["ABORTED", "UNAVAILABLE"])
        );
        assert_eq!(retry["max_attempts"], 5);
        let config = cell.current().unwrap();
        let method = config.method_index("/any.S/M").unwrap();
        assert_eq!(
            config.methods[method].retry.as_ref().unwrap().max_attempts,
            5
        );
    }
}
