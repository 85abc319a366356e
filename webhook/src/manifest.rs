//! Offline injection of manifests (`fanout-webhook inject`), like `linkerd inject`: pods and the
//! pod templates of workloads get exactly the patch the admission server would give them.

use serde_json::{Value, json};

use crate::inject::{self, Outcome};
use crate::lookup::ServiceLookup;
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML")]
    Yaml {
        index: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{object}: {message}")]
    Denied { object: String, message: String },
    #[error("{object}: {source}")]
    NotAPod {
        object: String,
        #[source]
        source: inject::NotAPod,
    },
    #[error("{object}: the injection patch did not apply")]
    Patch {
        object: String,
        #[source]
        source: json_patch::PatchError,
    },
}

/// What happened to one object, for the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub object: String,
    pub result: String,
}

/// Where a kind keeps its pod template.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let name = doc
        .pointer("/metadata/name")
        .or_else(|| doc.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{}/{name}", kind.to_lowercase())
}

/// Injects every pod and pod template in a multi-document YAML stream; other kinds pass
/// through. `namespace` stands in for objects that name none.
pub async fn inject_yaml(
    input: &str,
    namespace: &str,
    settings: &Settings,
    lookup: &dyn ServiceLookup,
) -> Result<(String, Vec<Report>), ManifestError> {
    let mut output = String::new();
    let mut reports = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(input).enumerate() {
        let mut doc: Value = serde::Deserialize::deserialize(document)
            .map_err(|source| ManifestError::Yaml { index, source })?;
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, namespace, settings, lookup, &mut reports).await?;
        if !output.is_empty() {
            output.push_str("---\n");
        }
        output.push_str(
            &serde_norway::to_string(&doc)
                .map_err(|source| ManifestError::Yaml { index, source })?,
        );
    }
    Ok((output, reports))
}

async fn inject_object(
    doc: &mut Value,
    default_namespace: &str,
    settings: &Settings,
    lookup: &dyn ServiceLookup,
    reports: &mut Vec<Report>,
) -> Result<(), ManifestError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" {
        if let Some(Value::Array(items)) = doc.get_mut("items") {
            for item in items {
                Box::pin(inject_object(
                    item,
                    default_namespace,
                    settings,
                    lookup,
                    reports,
                ))
                .await?;
            }
        }
        return Ok(());
    }
    let object = describe(doc);
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(());
    };
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(default_namespace)
        .to_string();
    let Some(template) = doc.pointer_mut(pointer) else {
        reports.push(Report {
            object,
            result: "skipped: no pod template".into(),
        });
        return Ok(());
    };
    // A template is a pod without its identity; inject it as one.
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    let outcome = inject::inject(&pod, &namespace, settings, lookup)
        .await
        .map_err(|source| ManifestError::NotAPod {
            object: object.clone(),
            source,
        })?;
    let result = match outcome {
        Outcome::Skipped(reason) => format!("skipped: {}", reason.describe()),
        Outcome::Denied(denial) => {
            return Err(ManifestError::Denied {
                object,
                message: denial.message,
            });
        }
        Outcome::Injected(injection) => {
            json_patch::patch(&mut pod, &injection.patch).map_err(|source| {
                ManifestError::Patch {
                    object: object.clone(),
                    source,
                }
            })?;
            if let Value::Object(template) = template {
                for key in ["metadata", "spec"] {
                    if let Some(value) = pod.get_mut(key) {
                        template.insert(key.to_string(), value.take());
                    }
                }
            }
            let names: Vec<&str> = injection
                .config
                .upstreams
                .iter()
                .map(|u| u.name.as_str())
                .collect();
            let mut result = format!("injected, upstreams {}", names.join(", "));
            for warning in injection.warnings {
                result.push_str(&format!("\n  warning: {warning}"));
            }
            result
        }
    };
    reports.push(Report { object, result });
    Ok(())
}
