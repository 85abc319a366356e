//! Telling a Service's owner that its policy annotations do not parse, where the owner looks:
//! a Warning Event on the Service (`kubectl describe service` and `kubectl get events` show it).
//! The proxies keep the last valid policy and say so in their logs and metrics; this is the
//! one place the owner sees it without looking at a caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::service_config::ServiceConfig;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::catalog::ServiceKey;
use crate::annotations::{POLICY, SERVICE_CONFIG};

/// An Event's note is at most 1 kB.
const NOTE_LIMIT: usize = 1000;

/// The invalid policy annotations of `service`, each with its faults' lines.
pub fn faults(service: &Service) -> Vec<(&'static str, Vec<String>)> {
    let annotations = service.metadata.annotations.as_ref();
    let text = |name| annotations.and_then(|a| a.get(name)).map(String::as_str);
    let mut found = Vec::new();
    if let Some(text) = text(SERVICE_CONFIG)
        && let Err(faults) = ServiceConfig::parse(text)
    {
        found.push((SERVICE_CONFIG, faults.lines()));
    }
    if let Some(text) = text(POLICY)
        && let Err(faults) = Policy::parse(text)
    {
        found.push((POLICY, faults.lines()));
    }
    found
}

/// The Event's note for one invalid annotation, within the API's limit.
pub fn note(annotation: &str, faults: &[String]) -> String {
    let mut note = format!(
        "{annotation} is invalid and not applied; proxies keep the last valid one: {}",
        faults.join("; ")
    );
    if note.len() > NOTE_LIMIT {
        let mut end = NOTE_LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

pub struct ServiceEvents {
    recorder: Recorder,
    /// The annotations last reported per Service, so a re-list or an unrelated change of the
    /// Service does not report the same mistake again.
    reported: Mutex<HashMap<ServiceKey, String>>,
}

impl ServiceEvents {
    pub fn new(client: Client) -> Arc<Self> {
        let reporter = Reporter {
            controller: "fanout-discovery".into(),
            instance: std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client, reporter),
            reported: Mutex::default(),
        })
    }

    /// Reports the Service's invalid annotations, if they changed since the last report.
    pub fn observe(self: &Arc<Self>, service: &Service) {
        let key = (
            service.metadata.namespace.clone().unwrap_or_default(),
            service.metadata.name.clone().unwrap_or_default(),
        );
        let found = faults(service);
        let seen: String = found
            .iter()
            .map(|(annotation, faults)| format!("{annotation}: {}\n", faults.join("; ")))
            .collect();
        {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            if reported
                .get(&key)
                .map_or(seen.is_empty(), |last| *last == seen)
            {
                return;
            }
            if seen.is_empty() {
                reported.remove(&key);
                return;
            }
            reported.insert(key.clone(), seen);
        }
        let reference = service.object_ref(&());
        let events = self.clone();
        tokio::spawn(async move {
            for (annotation, faults) in found {
                let event = Event {
                    type_: EventType::Warning,
                    reason: if annotation == SERVICE_CONFIG {
                        "InvalidServiceConfig".into()
                    } else {
                        "InvalidPolicy".into()
                    },
                    note: Some(note(annotation, &faults)),
                    action: "Validate".into(),
                    secondary: None,
                };
                if let Err(error) = events.recorder.publish(&event, &reference).await {
                    tracing::warn!(namespace = %key.0, service = %key.1, %error,
                        "discovery: could not record an Event on the Service");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn invalid_annotations_are_found_with_every_fault_and_the_note_fits_an_event() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "app", "namespace": "shop", "annotations": {
                "fanout.dev/service-config": r#"{"methodConfig": [{"timeout": "soon"}]}"#,
                "fanout.dev/policy": r#"{"split": [{"service": "app", "weight": 90}]}"#,
                "unrelated": "x"}},
        }))
        .unwrap();
        let found = faults(&service);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "fanout.dev/service-config");
        assert!(
            found[0].1[0].starts_with("methodConfig[0].timeout: "),
            "{found:?}"
        );
        let long = vec!["é".repeat(800)];
        let note = note(POLICY, &long);
        assert!(
            note.len() <= NOTE_LIMIT && note.ends_with("..."),
            "{}",
            note.len()
        );
        assert!(note.starts_with("fanout.dev/policy is invalid and not applied"));
    }
}
