//! The injection decision and the patch: pod + settings (+ Service lookups) → outcome.
//!
//! [`plan`] is pure: the opt-out and skip rules, and every annotation checked at once.
//! [`inject`] adds the Service lookups (the only I/O, behind [`ServiceLookup`]) and builds the
//! patch. The admission server and `fanout-webhook inject` both call [`inject`].

pub mod container;
pub mod patch;
pub mod resolve;

use std::collections::BTreeMap;
use std::fmt;

use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::{
    ADMIN_PORT, Discovery, DiscoveryServer, EndpointsDiscovery, GrpcHealth, HealthCheck,
    ProxyConfig, UpstreamConfig,
};
use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::annotations::{
    CONFIG_VOLUME, GRPC_HEALTH, HEALTH_CHECK, INJECT, INJECTED, NATIVE_SIDECAR, PROXY_CONTAINER,
    READINESS, UPSTREAMS,
};
use crate::lookup::ServiceLookup;
use crate::settings::{NativeSidecarMode, ProxyResources, Readiness, Settings};
use crate::upstreams::{self, UpstreamRef};
use resolve::ResolvedUpstream;

/// Why a pod is allowed unchanged; the `reason` label of the admission metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    OptedOut,
    OptedOutByLabel,
    HostNetwork,
    NoUpstreams,
    AlreadyInjected,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OptedOut => "opted-out",
            Self::OptedOutByLabel => "opted-out-label",
            Self::HostNetwork => "host-network",
            Self::NoUpstreams => "no-upstreams",
            Self::AlreadyInjected => "already-injected",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::OptedOut => "pod annotation fanout.dev/inject is \"disabled\"",
            Self::OptedOutByLabel => "pod label fanout.dev/inject is \"disabled\"",
            Self::HostNetwork => "pod uses hostNetwork; the proxy's ports would clash on the node",
            Self::NoUpstreams => {
                "pod has neither a fanout.dev/upstreams nor a fanout.dev/grpc-health annotation"
            }
            Self::AlreadyInjected => "pod already has the fanout proxy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    InvalidAnnotation,
    UnresolvedPort,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidAnnotation => "invalid-annotation",
            Self::UnresolvedPort => "unresolved-port",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    pub message: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What injection decided for a pod.
#[derive(Debug, Clone)]
pub enum Outcome {
    Skipped(SkipReason),
    Denied(Denial),
    Injected(Box<Injection>),
}

#[derive(Debug, Clone)]
pub struct Injection {
    pub patch: Patch,
    /// Shown by kubectl as admission warnings.
    pub warnings: Vec<String>,
    pub config: ProxyConfig,
    pub native_sidecar: bool,
}

/// Everything about a pod that passed the checks, before Services are looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub upstreams: Vec<UpstreamRef>,
    pub resources: ProxyResources,
    pub native_sidecar: bool,
    /// Active health checks for every upstream, when the pod asks for them.
    pub health_check: Option<HealthCheck>,
    /// What the proxy's readiness probe asks.
    pub readiness: Readiness,
    /// `GET /grpc-health` from the app's own `grpc.health.v1`, when the pod asks for it.
    pub grpc_health: Option<GrpcHealth>,
}

#[derive(Debug, thiserror::Error)]
#[error("request.object is not a valid Pod: {0}")]
pub struct NotAPod(#[source] serde_json::Error);

/// Why [`plan`] stopped short of injecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInjected {
    Skipped(SkipReason),
    Denied(Denial),
}

impl From<NotInjected> for Outcome {
    fn from(not: NotInjected) -> Self {
        match not {
            NotInjected::Skipped(reason) => Outcome::Skipped(reason),
            NotInjected::Denied(denial) => Outcome::Denied(denial),
        }
    }
}

/// The pure first step: skip rules, then every annotation checked, all faults in one denial.
pub fn plan(pod: &Pod, settings: &Settings) -> Result<Plan, NotInjected> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let spec = pod.spec.clone().unwrap_or_default();
    let init_containers = spec.init_containers.clone().unwrap_or_default();

    let has_proxy = spec
        .containers
        .iter()
        .chain(&init_containers)
        .any(|c| c.name == PROXY_CONTAINER);
    if has_proxy || annotations.contains_key(INJECTED) {
        return Err(NotInjected::Skipped(SkipReason::AlreadyInjected));
    }
    match annotations.get(INJECT).map(|v| v.trim()) {
        Some("disabled") => return Err(NotInjected::Skipped(SkipReason::OptedOut)),
        None | Some("enabled") => {}
        Some(other) => {
            return Err(invalid(vec![format!(
                "annotation {INJECT}: {other:?} is neither \"enabled\" nor \"disabled\""
            )]));
        }
    }
    if labels.get(INJECT).map(String::as_str) == Some("disabled") {
        return Err(NotInjected::Skipped(SkipReason::OptedOutByLabel));
    }
    if spec.host_network == Some(true) {
        return Err(NotInjected::Skipped(SkipReason::HostNetwork));
    }
    let upstreams_value = annotations.get(UPSTREAMS);
    let grpc_health_value = annotations.get(GRPC_HEALTH);
    if upstreams_value.is_none() && grpc_health_value.is_none() {
        return Err(NotInjected::Skipped(SkipReason::NoUpstreams));
    }

    let mut faults = Vec::new();
    let taken_ports: Vec<(String, u16)> = spec
        .containers
        .iter()
        .chain(&init_containers)
        .flat_map(|c| {
            c.ports.iter().flatten().filter_map(|p| {
                u16::try_from(p.container_port)
                    .ok()
                    .map(|port| (c.name.clone(), port))
            })
        })
        .collect();
    if let Some((container, _)) = taken_ports.iter().find(|(_, p)| *p == ADMIN_PORT) {
        faults.push(format!(
            "container {container:?} declares port {ADMIN_PORT}, the fanout proxy's admin port; \
             opt the pod out with {INJECT}: disabled"
        ));
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == CONFIG_VOLUME)
    {
        faults.push(format!(
            "the pod already has a volume named {CONFIG_VOLUME:?}, which fanout injects"
        ));
    }
    let upstreams = match upstreams_value {
        Some(value) => upstreams::parse(value, &taken_ports)
            .map_err(|e| faults.push(e.to_string()))
            .ok(),
        None => Some(Vec::new()),
    };
    let resources = container::resources(&settings.resources, annotations)
        .map_err(|f| faults.extend(f))
        .ok();
    let native_sidecar = match annotations.get(NATIVE_SIDECAR).map(|v| v.trim()) {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            faults.push(format!(
                "annotation {NATIVE_SIDECAR}: {other:?} is neither \"true\" nor \"false\""
            ));
            false
        }
        None => match settings.native_sidecar {
            NativeSidecarMode::Always => true,
            NativeSidecarMode::Never => false,
            // A pod that already has a native sidecar was accepted by this API server, which
            // proves the cluster runs them.
            NativeSidecarMode::Auto => {
                settings.cluster_has_native_sidecars
                    || init_containers
                        .iter()
                        .any(|c| c.restart_policy.as_deref() == Some("Always"))
            }
        },
    };
    let health_check = annotations
        .get(HEALTH_CHECK)
        .and_then(|value| parse_health_check(value).map_err(|f| faults.push(f)).ok())
        .flatten();
    let readiness = match annotations.get(READINESS) {
        None => settings.readiness,
        Some(value) => value.parse().unwrap_or_else(|e| {
            faults.push(format!("annotation {READINESS}: {e}"));
            settings.readiness
        }),
    };
    let grpc_health = grpc_health_value
        .and_then(|value| parse_grpc_health(value).map_err(|f| faults.push(f)).ok());
    if let (Some(health), Some(upstreams)) = (&grpc_health, &upstreams)
        && let Some(clash) = upstreams.iter().find(|u| u.local_port == health.port)
    {
        faults.push(format!(
            "annotation {GRPC_HEALTH}: port {} is where the proxy listens for upstream {:?}, not \
             the app's gRPC port",
            health.port, clash.text
        ));
    }
    match (upstreams, resources) {
        (Some(upstreams), Some(resources)) if faults.is_empty() => Ok(Plan {
            upstreams,
            resources,
            native_sidecar,
            health_check,
            readiness,
            grpc_health,
        }),
        _ => Err(invalid(faults)),
    }
}

/// A `grpc.health.v1` service name: a gRPC service's full name (`shop.v1.Cart`).
fn is_service_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `fanout.dev/grpc-health`: `<port>` or `<port>/<service>`, the app's gRPC port on loopback
/// and the `grpc.health.v1` service to ask about (the whole server when absent).
fn parse_grpc_health(value: &str) -> Result<GrpcHealth, String> {
    let value = value.trim();
    let (port, service) = value.split_once('/').unwrap_or((value, ""));
    let fault = |why: &str| {
        format!("annotation {GRPC_HEALTH}: {value:?} is not <port>[/<service>] ({why})")
    };
    let port: u16 = match port.parse() {
        Ok(port) if port > 0 => port,
        _ => return Err(fault("the port is a number from 1 to 65535")),
    };
    if port == ADMIN_PORT {
        return Err(fault("15020 is the proxy's own admin port"));
    }
    if value.contains('/') && !is_service_name(service) {
        return Err(fault(
            "a service name is letters, digits, '.', '_' and '-', as in grpc.health.v1",
        ));
    }
    Ok(GrpcHealth::new(port, service))
}

/// `fanout.dev/health-check`: `grpc` (the whole server), `grpc:<service>`, or `disabled`.
fn parse_health_check(value: &str) -> Result<Option<HealthCheck>, String> {
    let value = value.trim();
    let service = match value.split_once(':') {
        _ if value == "disabled" => return Ok(None),
        None if value == "grpc" => "",
        Some(("grpc", service)) if is_service_name(service) => service,
        _ => {
            return Err(format!(
                "annotation {HEALTH_CHECK}: {value:?} is not \"grpc\", \"grpc:<service>\" or \"disabled\""
            ));
        }
    };
    Ok(Some(HealthCheck {
        service: service.to_string(),
        ..HealthCheck::default()
    }))
}

fn invalid(faults: Vec<String>) -> NotInjected {
    NotInjected::Denied(Denial {
        reason: DenyReason::InvalidAnnotation,
        message: format!("fanout: {}", faults.join("; ")),
    })
}

/// The proxy config for resolved upstreams, as rendered into the pod annotation.
/// With a discovery server every upstream subscribes to it and keeps DNS as its fallback.
pub fn render_config(
    resolved: &[ResolvedUpstream],
    health_check: Option<&HealthCheck>,
    grpc_health: Option<&GrpcHealth>,
    discovery: Option<&DiscoveryServer>,
) -> ProxyConfig {
    let mut config = ProxyConfig::new(
        resolved
            .iter()
            .map(|r| {
                let source = match discovery {
                    Some(_) => Discovery::Endpoints(EndpointsDiscovery::new(
                        r.namespace.clone(),
                        r.upstream.service.clone(),
                        r.service_port(),
                        r.dns.clone(),
                    )),
                    None => r.dns.clone(),
                };
                let mut upstream = UpstreamConfig::new(
                    r.name.clone(),
                    std::net::SocketAddr::from(([127, 0, 0, 1], r.upstream.local_port)),
                    source,
                );
                upstream.service_config = r.service_config.clone();
                if let Some(balancer) = r.balancer {
                    upstream.balancer = balancer;
                }
                if let Some(policy) = &r.policy {
                    apply_policy(&mut upstream, policy);
                }
                // The owner's healthCheckConfig names what the owner's checks ask about.
                if let (Some(check), Some(service)) =
                    (&mut upstream.health_check, &r.health_check_service)
                    && check.service.is_empty()
                {
                    check.service.clone_from(service);
                }
                // The caller's own fanout.dev/health-check, when it asks for checks, wins.
                if let Some(check) = health_check {
                    upstream.health_check = Some(check.clone());
                }
                upstream
            })
            .collect(),
    );
    config.grpc_health = grpc_health.cloned();
    if !resolved.is_empty() {
        config.discovery_server = discovery.cloned();
    }
    config
}

/// The Service owner's `fanout.dev/policy` over the chart's defaults.
fn apply_policy(upstream: &mut UpstreamConfig, policy: &Policy) {
    if let Some(check) = &policy.health_check {
        upstream.health_check = Some(check.clone());
    }
    if let Some(ejection) = &policy.ejection {
        upstream.ejection = *ejection;
    }
    if let Some(timeout) = policy.request_timeout {
        upstream.timeouts.request = Some(timeout);
    }
    if let Some(timeout) = policy.idle_timeout {
        upstream.timeouts.idle = Some(timeout);
    }
    if let Some(balancer) = policy.balancer {
        upstream.balancer = balancer;
    }
}

/// The whole decision for one pod object as the API server sent it.
pub async fn inject(
    raw_pod: &Value,
    namespace: &str,
    settings: &Settings,
    lookup: &dyn ServiceLookup,
) -> Result<Outcome, NotAPod> {
    let pod: Pod = serde_json::from_value(raw_pod.clone()).map_err(NotAPod)?;
    let plan = match plan(&pod, settings) {
        Ok(plan) => plan,
        Err(not) => return Ok(not.into()),
    };

    let lookups = futures::future::join_all(
        plan.upstreams
            .iter()
            .map(|u| lookup.lookup(u.namespace.as_deref().unwrap_or(namespace), &u.service)),
    )
    .await;
    let mut warnings = Vec::new();
    let discovery = settings.discovery.as_ref().and_then(|target| {
        let ca = target.ca.get();
        if ca.is_empty() {
            warnings.push(
                "fanout: the discovery server's CA is not known yet; the proxy uses DNS".into(),
            );
            return None;
        }
        Some(DiscoveryServer {
            address: target.address.clone(),
            ca,
        })
    });
    let mut resolved = Vec::with_capacity(plan.upstreams.len());
    let mut faults = Vec::new();
    for (upstream, found) in plan.upstreams.iter().zip(&lookups) {
        match resolve::resolve(
            upstream,
            namespace,
            &settings.cluster_domain,
            found,
            discovery.is_some(),
            &mut warnings,
        ) {
            Ok(r) => resolved.push(r),
            Err(fault) => faults.push(fault),
        }
    }
    if !faults.is_empty() {
        return Ok(Outcome::Denied(Denial {
            reason: DenyReason::UnresolvedPort,
            message: format!("fanout: {}", faults.join("; ")),
        }));
    }
    // `app` and `app.shop` in namespace shop are one upstream twice: the proxy would refuse
    // the config, so the pod would never start.
    for (i, r) in resolved.iter().enumerate() {
        if let Some(first) = resolved[..i].iter().find(|other| other.name == r.name) {
            return Ok(Outcome::Denied(Denial {
                reason: DenyReason::InvalidAnnotation,
                message: format!(
                    "fanout: annotation {UPSTREAMS}: {:?} and {:?} both name Service {}; list \
                     it once",
                    first.upstream.text, r.upstream.text, r.name
                ),
            }));
        }
    }

    if let Some(health) = &plan.grpc_health {
        let declared = pod.spec.iter().flat_map(|spec| {
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
        });
        if !declared
            .into_iter()
            .any(|p| p.container_port == i32::from(health.port))
        {
            warnings.push(format!(
                "fanout: annotation {GRPC_HEALTH} names port {}, which no container declares; \
                 the proxy asks 127.0.0.1:{} all the same",
                health.port, health.port
            ));
        }
    }
    let config = render_config(
        &resolved,
        plan.health_check.as_ref(),
        plan.grpc_health.as_ref(),
        discovery.as_ref(),
    );
    let patch = patch::build(
        raw_pod,
        patch::PatchInput {
            config_json: config.to_json(),
            version: &settings.version,
            proxy: container::proxy_container(
                settings,
                &plan.resources,
                plan.native_sidecar,
                plan.readiness,
            ),
            volume: container::config_volume(),
            env: resolved
                .iter()
                .map(|r| {
                    (
                        r.upstream.env_name(),
                        format!("127.0.0.1:{}", r.upstream.local_port),
                    )
                })
                .collect(),
            native: plan.native_sidecar,
        },
    );
    Ok(Outcome::Injected(Box::new(Injection {
        patch,
        warnings,
        config,
        native_sidecar: plan.native_sidecar,
    })))
}
