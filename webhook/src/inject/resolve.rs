//! From an upstream as written to how its proxy finds the endpoints, given what the Service
//! lookup found. Pure: problems that still leave a usable config become warnings; a port name the
//! Service lacks is a denial.
//!
//! With the discovery server the proxy subscribes to the Service and port as written and the
//! server resolves them live; the DNS rule below is its fallback, and the whole story without
//! the server: a port name (or a port that targets a container port by name) is an SRV lookup,
//! which Kubernetes DNS answers with each pod's own port; a number is an A/AAAA lookup dialled
//! on the pods' port.

use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::service_config::ServiceConfig;
use fanout_proxy_config::{Discovery, DnsDiscovery, ServicePort as ConfigPort, SrvDiscovery};

use crate::annotations::{POLICY, SERVICE_CONFIG, UPSTREAMS};
use crate::lookup::{Lookup, ServiceInfo, TargetPort};
use crate::upstreams::{PortRef, UpstreamRef};

/// An upstream ready to render.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUpstream {
    pub upstream: UpstreamRef,
    /// `service.namespace`
    pub name: String,
    pub namespace: String,
    /// DNS discovery: the proxy's only source without the discovery server, its fallback with.
    pub dns: Discovery,
    /// The Service's gRPC service config, when it has a valid one: rendered into the proxy
    /// config, so it applies without the discovery server too (which keeps it live).
    pub service_config: Option<serde_json::Value>,
    /// The service config's `loadBalancingConfig`, as fanout applies it.
    pub balancer: Option<fanout_proxy_config::Balancer>,
    /// The service config's `healthCheckConfig.serviceName`: what health checks ask about.
    pub health_check_service: Option<String>,
    /// The Service's `fanout.dev/policy`, when it has a valid one: its settings replace the
    /// chart's defaults in the rendered upstream.
    pub policy: Option<Policy>,
}

impl ResolvedUpstream {
    /// The port as the discovery server is asked for it.
    pub fn service_port(&self) -> ConfigPort {
        match &self.upstream.port {
            PortRef::Number(n) => ConfigPort::Number(*n),
            PortRef::Name(name) => ConfigPort::Name(name.clone()),
        }
    }
}

/// `discovery`: whether proxies get the discovery server (which balances any Service).
pub fn resolve(
    upstream: &UpstreamRef,
    pod_namespace: &str,
    cluster_domain: &str,
    lookup: &Lookup,
    discovery: bool,
    warnings: &mut Vec<String>,
) -> Result<ResolvedUpstream, String> {
    let namespace = upstream.namespace.as_deref().unwrap_or(pod_namespace);
    let service = format!("{namespace}/{}", upstream.service);
    let dns_name = format!("{}.{namespace}.svc.{cluster_domain}", upstream.service);
    let srv = |port_name: &str| {
        Discovery::Srv(SrvDiscovery::for_port(
            port_name,
            &upstream.service,
            namespace,
            cluster_domain,
        ))
    };
    let a = |port: u16| Discovery::Dns(DnsDiscovery::new(dns_name.clone(), port));
    let (service_config, policy) = match lookup {
        Lookup::Found(info) => (
            info.service_config
                .as_deref()
                .and_then(|text| checked_service_config(text, &service, warnings)),
            info.policy
                .as_deref()
                .and_then(|text| checked_policy(text, &service, warnings)),
        ),
        _ => (None, None),
    };
    let dns = match (lookup, &upstream.port) {
        (Lookup::Found(info), port) => {
            if !info.headless && !discovery {
                warnings.push(format!(
                    "fanout: Service {service} is not headless (clusterIP {}): without the \
                     discovery server calls cannot be spread; set clusterIP: None",
                    info.cluster_ip.as_deref().unwrap_or("unset")
                ));
            }
            dns_rule(info, port, &service, warnings, srv, a)?
        }
        (Lookup::NotFound, port) => {
            warnings.push(format!(
                "fanout: Service {service} not found; its pods are found once it exists"
            ));
            by_port(port, srv, a)
        }
        (Lookup::Failed(error), port) => {
            warnings.push(format!(
                "fanout: could not look up Service {service}, using port {port} as given: {error}"
            ));
            by_port(port, srv, a)
        }
        (Lookup::Skipped, port) => by_port(port, srv, a),
    };
    Ok(ResolvedUpstream {
        upstream: upstream.clone(),
        name: upstream.qualified_name(pod_namespace),
        namespace: namespace.to_string(),
        dns,
        // What the service config says of balancing and health checks is rendered as settings.
        balancer: service_config.as_ref().and_then(|(_, c)| c.balancer),
        health_check_service: service_config
            .as_ref()
            .and_then(|(_, c)| c.health_check_service.clone()),
        service_config: service_config.map(|(value, _)| value),
        policy,
    })
}

/// The Service's `fanout.dev/policy` if it is valid; as for the service config, an invalid one
/// is left out with a warning.
fn checked_policy(text: &str, service: &str, warnings: &mut Vec<String>) -> Option<Policy> {
    Policy::parse(text)
        .map_err(|faults| {
            warnings.push(format!(
                "fanout: Service {service} annotation {POLICY} is invalid and not applied: {}",
                faults.lines().join("; ")
            ));
        })
        .ok()
}

/// The Service's service config if it is valid, as written and as read. An invalid one is the Service owner's to fix,
/// not a reason to refuse the caller's pod: it is left out, and the warning (shown by
/// `kubectl` on the pod's create or apply) names every fault.
fn checked_service_config(
    text: &str,
    service: &str,
    warnings: &mut Vec<String>,
) -> Option<(serde_json::Value, ServiceConfig)> {
    match ServiceConfig::parse(text) {
        Ok(config) => Some((serde_json::from_str(text).ok()?, config)),
        Err(faults) => {
            warnings.push(format!(
                "fanout: Service {service} annotation {SERVICE_CONFIG} is invalid and not \
                 applied: {}",
                faults.lines().join("; ")
            ));
            None
        }
    }
}

/// Without a Service to read: a name is SRV, a number is dialled as given.
fn by_port(
    port: &PortRef,
    srv: impl Fn(&str) -> Discovery,
    a: impl Fn(u16) -> Discovery,
) -> Discovery {
    match port {
        PortRef::Number(n) => a(*n),
        PortRef::Name(name) => srv(name),
    }
}

/// The DNS discovery for the Service port the upstream names, dialling the pods' own port.
fn dns_rule(
    info: &ServiceInfo,
    port: &PortRef,
    service: &str,
    warnings: &mut Vec<String>,
    srv: impl Fn(&str) -> Discovery,
    a: impl Fn(u16) -> Discovery,
) -> Result<Discovery, String> {
    let found = info.ports.iter().find(|p| match port {
        PortRef::Number(n) => p.port == *n,
        PortRef::Name(name) => p.name.as_deref() == Some(name),
    });
    let Some(service_port) = found else {
        return match port {
            PortRef::Number(n) => {
                // Pods are dialled on their own port, which users often write.
                let is_target = info
                    .ports
                    .iter()
                    .any(|p| p.target == TargetPort::Number(*n));
                if !is_target {
                    warnings.push(format!(
                        "fanout: Service {service} has no port {n} ({}); dialling pods on {n}",
                        describe_ports(info)
                    ));
                }
                Ok(a(*n))
            }
            PortRef::Name(name) => Err(format!(
                "annotation {UPSTREAMS}: Service {service} has no port named {name:?} ({})",
                describe_ports(info)
            )),
        };
    };
    Ok(match (&service_port.target, &service_port.name) {
        (TargetPort::Same, _) => a(service_port.port),
        (TargetPort::Number(n), _) => a(*n),
        // A container port name can differ per pod: SRV answers carry each pod's own port.
        (TargetPort::Name(_), Some(name)) => srv(name),
        (TargetPort::Name(target), None) => {
            warnings.push(format!(
                "fanout: Service {service} port {} targets port name {target:?} but has no name \
                 (so no SRV record); without the discovery server pods are dialled on {}",
                service_port.port, service_port.port
            ));
            a(service_port.port)
        }
    })
}

fn describe_ports(info: &ServiceInfo) -> String {
    if info.ports.is_empty() {
        return "it has no ports".into();
    }
    let ports: Vec<String> = info
        .ports
        .iter()
        .map(|p| match &p.name {
            Some(name) => format!("{name}={}", p.port),
            None => p.port.to_string(),
        })
        .collect();
    format!("its ports: {}", ports.join(", "))
}

#[cfg(test)]
mod tests;
