//! The injected `fanout-proxy` container and its config volume.

use std::collections::BTreeMap;

use fanout_proxy_config::ADMIN_PORT;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EnvVar,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::annotations::{
    ADMIN_PORT_NAME, CONFIG_DIR, CONFIG_FILE, CONFIG_VOLUME, PROXY_CONFIG, PROXY_CONTAINER,
    PROXY_CPU_LIMIT, PROXY_CPU_REQUEST, PROXY_MEMORY_LIMIT, PROXY_MEMORY_REQUEST, PROXY_UID,
};
use crate::quantity;
use crate::settings::{ProxyResources, Readiness, Settings};

/// The chart's resources with the pod's annotation overrides, each checked.
pub fn resources(
    defaults: &ProxyResources,
    annotations: &BTreeMap<String, String>,
) -> Result<ProxyResources, Vec<String>> {
    let mut faults = Vec::new();
    let mut pick = |key: &str, default: &Option<String>| match annotations.get(key) {
        None => default.clone(),
        Some(value) => match quantity::parse(value.trim()) {
            Ok(_) => Some(value.trim().to_string()),
            Err(message) => {
                faults.push(format!("annotation {key}: {message}"));
                None
            }
        },
    };
    let resources = ProxyResources {
        cpu_request: pick(PROXY_CPU_REQUEST, &defaults.cpu_request),
        cpu_limit: pick(PROXY_CPU_LIMIT, &defaults.cpu_limit),
        memory_request: pick(PROXY_MEMORY_REQUEST, &defaults.memory_request),
        memory_limit: pick(PROXY_MEMORY_LIMIT, &defaults.memory_limit),
    };
    for (request, limit, what) in [
        (&resources.cpu_request, &resources.cpu_limit, "cpu"),
        (&resources.memory_request, &resources.memory_limit, "memory"),
    ] {
        if let (Some(r), Some(l)) = (request, limit)
            && let (Ok(rv), Ok(lv)) = (quantity::parse(r), quantity::parse(l))
            && rv > lv
        {
            faults.push(format!(
                "annotation fanout.dev/proxy-{what}-request: {r} exceeds the proxy {what} limit \
                 {l} (fanout.dev/proxy-{what}-limit raises it)"
            ));
        }
    }
    if faults.is_empty() {
        Ok(resources)
    } else {
        Err(faults)
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// Passes every rule of Pod Security "restricted" on its own, whatever the pod sets.
pub fn security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(PROXY_UID),
        run_as_group: Some(PROXY_UID),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

pub fn proxy_container(
    settings: &Settings,
    resources: &ProxyResources,
    native: bool,
    readiness: Readiness,
) -> Container {
    let quantities = |pairs: [(&str, &Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), Quantity(v))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        args: Some(vec!["run".into(), "--config".into(), CONFIG_FILE.into()]),
        env: settings.proxy_log_level.as_ref().map(|level| {
            vec![EnvVar {
                name: "FANOUT_LOG".into(),
                value: Some(level.clone()),
                ..Default::default()
            }]
        }),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: ADMIN_PORT.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        liveness_probe: Some(http_probe("/live", 10, 3)),
        readiness_probe: Some(http_probe(readiness.path(), 5, 2)),
        // A native sidecar's startup probe holds back the next containers until the proxy is live.
        startup_probe: native.then(|| Probe {
            initial_delay_seconds: None,
            ..http_probe("/live", 1, 60)
        }),
        // Without native sidecars, the kubelet starts containers in order and waits for each
        // postStart hook, so the app starts only after this returns.
        lifecycle: (!native).then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "fanout-proxy".into(),
                        "wait".into(),
                        "--timeout".into(),
                        "60s".into(),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        restart_policy: native.then(|| "Always".into()),
        resources: Some(ResourceRequirements {
            requests: quantities([
                ("cpu", &resources.cpu_request),
                ("memory", &resources.memory_request),
            ]),
            limits: quantities([
                ("cpu", &resources.cpu_limit),
                ("memory", &resources.memory_limit),
            ]),
            ..Default::default()
        }),
        security_context: Some(security_context()),
        volume_mounts: Some(vec![VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The downward API projects the rendered config annotation to `config.json`, and rewrites the
/// file when the annotation changes.
pub fn config_volume() -> Volume {
    Volume {
        name: CONFIG_VOLUME.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            default_mode: Some(0o444),
            items: Some(vec![DownwardAPIVolumeFile {
                path: "config.json".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{PROXY_CONFIG}']"),
                    api_version: Some("v1".into()),
                }),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_override_chart_defaults() {
        let r = resources(
            &ProxyResources::default(),
            &annotations(&[(PROXY_CPU_LIMIT, "500m"), (PROXY_MEMORY_REQUEST, "32Mi")]),
        )
        .unwrap();
        assert_eq!(r.cpu_request.as_deref(), Some("10m"));
        assert_eq!(r.cpu_limit.as_deref(), Some("500m"));
        assert_eq!(r.memory_request.as_deref(), Some("32Mi"));
        assert_eq!(r.memory_limit.as_deref(), Some("64Mi"));
    }

    #[test]
    fn bad_resource_annotations_are_named() {
        let faults = resources(
            &ProxyResources::default(),
            &annotations(&[(PROXY_CPU_REQUEST, "lots"), (PROXY_MEMORY_REQUEST, "128Mi")]),
        )
        .unwrap_err();
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert!(faults[0].starts_with("annotation fanout.dev/proxy-cpu-request: \"lots\""));
        assert!(
            faults[1].contains("128Mi exceeds the proxy memory limit 64Mi"),
            "{faults:?}"
        );
    }
}
