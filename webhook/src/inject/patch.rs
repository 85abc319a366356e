//! The one JSON patch that injects the proxy. It is built against the pod exactly as the API
//! server sent it: arrays and maps that are absent (no `volumes`, no `annotations`, no
//! `initContainers`, no `env`) are added whole, present ones are appended to.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, EnvVar, Volume};
use serde_json::{Map, Value, json};

use crate::annotations::{INJECTED, PROXY_CONFIG};

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(ops: &mut Vec<PatchOperation>, tokens: &[&str], value: Value) {
    ops.push(PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    }));
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("k8s-openapi types serialize to JSON")
}

/// What goes into the pod.
pub struct PatchInput<'a> {
    pub config_json: String,
    pub version: &'a str,
    pub proxy: Container,
    pub volume: Volume,
    /// `(env name, value)` for each upstream, given to app containers that do not set it.
    pub env: Vec<(String, String)>,
    pub native: bool,
}

pub fn build(pod: &Value, input: PatchInput<'_>) -> Patch {
    let mut ops = Vec::new();
    let metadata = pod.get("metadata");
    let spec = pod.get("spec");

    let new_annotations = [
        (PROXY_CONFIG, Value::String(input.config_json)),
        (INJECTED, Value::String(input.version.to_string())),
    ];
    match metadata.map(|m| m.get("annotations")) {
        Some(Some(Value::Object(_))) => {
            for (key, value) in new_annotations {
                add(&mut ops, &["metadata", "annotations", key], value);
            }
        }
        Some(_) => {
            let map: Map<String, Value> = new_annotations
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            add(&mut ops, &["metadata", "annotations"], Value::Object(map));
        }
        None => {
            let map: Map<String, Value> = new_annotations
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            add(&mut ops, &["metadata"], json!({ "annotations": map }));
        }
    }

    // Env first: the container indices below are those of the pod as sent, before the proxy is
    // inserted in front of them.
    let mut env_lists = vec!["containers"];
    if input.native {
        // A native sidecar is up before later init containers run, so they can use it too.
        env_lists.push("initContainers");
    }
    for list in env_lists {
        let containers = spec.and_then(|s| s.get(list)).and_then(Value::as_array);
        for (index, container) in containers.into_iter().flatten().enumerate() {
            add_env(&mut ops, list, index, container, &input.env);
        }
    }

    let volume = to_value(&input.volume);
    match spec.and_then(|s| s.get("volumes")) {
        Some(Value::Array(_)) => add(&mut ops, &["spec", "volumes", "-"], volume),
        _ => add(&mut ops, &["spec", "volumes"], Value::Array(vec![volume])),
    }

    // First in its list: as a native sidecar it starts before every other init container; as a
    // plain container the kubelet starts it (and waits on its postStart hook) before the app.
    let list = if input.native {
        "initContainers"
    } else {
        "containers"
    };
    let proxy = to_value(&input.proxy);
    match spec.and_then(|s| s.get(list)) {
        Some(Value::Array(_)) => add(&mut ops, &["spec", list, "0"], proxy),
        _ => add(&mut ops, &["spec", list], Value::Array(vec![proxy])),
    }
    Patch(ops)
}

fn add_env(
    ops: &mut Vec<PatchOperation>,
    list: &str,
    index: usize,
    container: &Value,
    env: &[(String, String)],
) {
    let existing = container.get("env").and_then(Value::as_array);
    let is_set = |name: &str| {
        existing
            .into_iter()
            .flatten()
            .any(|e| e.get("name").and_then(Value::as_str) == Some(name))
    };
    let missing: Vec<Value> = env
        .iter()
        .filter(|(name, _)| !is_set(name))
        .map(|(name, value)| {
            to_value(&EnvVar {
                name: name.clone(),
                value: Some(value.clone()),
                value_from: None,
            })
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    let index = index.to_string();
    if existing.is_some() {
        for var in missing {
            add(ops, &["spec", list, &index, "env", "-"], var);
        }
    } else {
        add(ops, &["spec", list, &index, "env"], Value::Array(missing));
    }
}
