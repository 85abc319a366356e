//! The upstream Service's gRPC service config, as the discovery server delivers it (the
//! `fanout.dev/service-config` annotation, verbatim): kept parsed for the calls, replaced when
//! the annotation changes, and kept as it was when a change does not parse — the owner's
//! mistake is logged with every fault's path, and calls go on under the last valid config.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fanout_proxy_config::service_config::ServiceConfig;

#[derive(Default)]
pub struct ServiceConfigCell {
    /// The annotation last seen, so an unchanged one is not parsed (or reported) again.
    text: Mutex<String>,
    current: RwLock<Option<Arc<ServiceConfig>>>,
}

impl ServiceConfigCell {
    /// Applies the annotation's text (empty: the Service has none). `false` when it did not
    /// parse and the previous config stays in force.
    pub fn update(&self, upstream: &str, text: &str) -> bool {
        {
            let mut last = self.text.lock().unwrap_or_else(|e| e.into_inner());
            if *last == text {
                return true;
            }
            text.clone_into(&mut last);
        }
        let parsed = if text.trim().is_empty() {
            None
        } else {
            match ServiceConfig::parse(text) {
                Ok(config) => Some(Arc::new(config)),
                Err(faults) => {
                    let faults = faults.lines();
                    tracing::warn!(upstream, faults = %faults.join("; "),
                        "the Service's fanout.dev/service-config is invalid; the last valid one stays in force");
                    return false;
                }
            }
        };
        tracing::info!(
            upstream,
            present = parsed.is_some(),
            "service config applied"
        );
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = parsed;
        true
    }

    /// The `timeout` of the method config that applies to a call to `path`.
    pub fn timeout(&self, path: &str) -> Option<Duration> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref()?.method(path)?.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_that_does_not_parse_leaves_the_last_valid_config_in_force() {
        let cell = ServiceConfigCell::default();
        assert_eq!(cell.timeout("/a.B/C"), None);
        let valid = r#"{"methodConfig": [{"name": [{"service": "a.B"}], "timeout": "0.2s"}]}"#;
        assert!(cell.update("app", valid));
        assert_eq!(cell.timeout("/a.B/C"), Some(Duration::from_millis(200)));
        assert_eq!(cell.timeout("/x.Y/C"), None);
        assert!(!cell.update("app", r#"{"methodConfig": [{"timeout": "soon"}]}"#));
        assert_eq!(cell.timeout("/a.B/C"), Some(Duration::from_millis(200)));
        assert!(cell.update("app", ""));
        assert_eq!(cell.timeout("/a.B/C"), None);
    }
}
