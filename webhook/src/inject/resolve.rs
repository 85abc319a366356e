//! From an upstream as written to the DNS name and pod port the proxy dials, given what the
//! Service lookup found. Pure: problems that still leave a usable config become warnings; a port
//! name that cannot be resolved is a denial.

use crate::annotations::UPSTREAMS;
use crate::lookup::{Lookup, ServiceInfo, TargetPort};
use crate::upstreams::{PortRef, UpstreamRef};

/// An upstream ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUpstream {
    pub upstream: UpstreamRef,
    /// `service.namespace`
    pub name: String,
    pub dns_name: String,
    /// The port on the pods, which a headless Service's DNS answers point at.
    pub port: u16,
}

pub fn resolve(
    upstream: &UpstreamRef,
    pod_namespace: &str,
    cluster_domain: &str,
    lookup: &Lookup,
    warnings: &mut Vec<String>,
) -> Result<ResolvedUpstream, String> {
    let namespace = upstream.namespace.as_deref().unwrap_or(pod_namespace);
    let service = format!("{namespace}/{}", upstream.service);
    let port = match (lookup, &upstream.port) {
        (Lookup::Found(info), port) => {
            if !info.headless {
                warnings.push(format!(
                    "fanout: Service {service} is not headless (clusterIP {}): calls cannot be \
                     spread; set clusterIP: None",
                    info.cluster_ip.as_deref().unwrap_or("unset")
                ));
            }
            pod_port(info, port, &service, warnings)?
        }
        (Lookup::NotFound, PortRef::Number(n)) => {
            warnings.push(format!(
                "fanout: Service {service} not found; its pods are found through DNS once it exists"
            ));
            *n
        }
        (Lookup::Failed(error), PortRef::Number(n)) => {
            warnings.push(format!(
                "fanout: could not look up Service {service}, using port {n}: {error}"
            ));
            *n
        }
        (Lookup::Skipped, PortRef::Number(n)) => *n,
        (Lookup::NotFound, PortRef::Name(name)) => {
            return Err(format!(
                "annotation {UPSTREAMS}: {:?} names port {name:?}, but Service {service} was not \
                 found to resolve it; create the Service first or give the port number",
                upstream.text
            ));
        }
        (Lookup::Failed(error), PortRef::Name(name)) => {
            return Err(format!(
                "annotation {UPSTREAMS}: {:?} names port {name:?}, but Service {service} could \
                 not be looked up ({error}); give the port number",
                upstream.text
            ));
        }
        (Lookup::Skipped, PortRef::Name(name)) => {
            return Err(format!(
                "annotation {UPSTREAMS}: {:?} names port {name:?}, which needs a Service lookup; \
                 give the port number",
                upstream.text
            ));
        }
    };
    Ok(ResolvedUpstream {
        upstream: upstream.clone(),
        name: upstream.qualified_name(pod_namespace),
        dns_name: format!("{}.{namespace}.svc.{cluster_domain}", upstream.service),
        port,
    })
}

/// The Service port the upstream names, mapped to the port its pods listen on.
fn pod_port(
    info: &ServiceInfo,
    port: &PortRef,
    service: &str,
    warnings: &mut Vec<String>,
) -> Result<u16, String> {
    let found = info.ports.iter().find(|p| match port {
        PortRef::Number(n) => p.port == *n,
        PortRef::Name(name) => p.name.as_deref() == Some(name),
    });
    let Some(service_port) = found else {
        return match port {
            PortRef::Number(n) => {
                // Headless Services are dialled on the pods' own port, which users often write.
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
                Ok(*n)
            }
            PortRef::Name(name) => Err(format!(
                "annotation {UPSTREAMS}: Service {service} has no port named {name:?} ({})",
                describe_ports(info)
            )),
        };
    };
    Ok(match &service_port.target {
        TargetPort::Same => service_port.port,
        TargetPort::Number(n) => *n,
        TargetPort::Name(target) => {
            warnings.push(format!(
                "fanout: Service {service} port {} targets port name {target:?}; dialling pods on \
                 {}, set a numeric targetPort",
                service_port.port, service_port.port
            ));
            service_port.port
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
mod tests {
    use super::*;
    use crate::lookup::ServicePort;
    use crate::upstreams;

    fn one(value: &str) -> UpstreamRef {
        upstreams::parse(value, &[]).unwrap().remove(0)
    }

    fn headless(ports: Vec<ServicePort>) -> Lookup {
        Lookup::Found(ServiceInfo {
            headless: true,
            cluster_ip: Some("None".into()),
            ports,
        })
    }

    fn port(name: &str, port: u16, target: TargetPort) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target,
        }
    }

    fn run(value: &str, lookup: &Lookup) -> (Result<ResolvedUpstream, String>, Vec<String>) {
        let mut warnings = Vec::new();
        let result = resolve(&one(value), "shop", "cluster.local", lookup, &mut warnings);
        (result, warnings)
    }

    #[test]
    fn named_port_resolves_to_the_pods_port() {
        let lookup = headless(vec![port("grpc", 80, TargetPort::Number(50051))]);
        let (resolved, warnings) = run("app.payments:grpc", &lookup);
        let resolved = resolved.unwrap();
        assert_eq!(resolved.port, 50051);
        assert_eq!(resolved.dns_name, "app.payments.svc.cluster.local");
        assert_eq!(resolved.name, "app.payments");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn numeric_service_port_maps_to_target_and_pod_port_is_accepted() {
        let lookup = headless(vec![port("grpc", 80, TargetPort::Number(50051))]);
        assert_eq!(run("app:80", &lookup).0.unwrap().port, 50051);
        let (resolved, warnings) = run("app:50051", &lookup);
        assert_eq!(resolved.unwrap().port, 50051);
        assert!(warnings.is_empty(), "{warnings:?}");
        let (resolved, warnings) = run("app:9", &lookup);
        assert_eq!(resolved.unwrap().port, 9);
        assert!(
            warnings[0].contains("has no port 9 (its ports: grpc=80)"),
            "{warnings:?}"
        );
    }

    #[test]
    fn problems_that_leave_a_usable_config_are_warnings() {
        let (resolved, warnings) = run("app:50051", &Lookup::NotFound);
        assert_eq!(resolved.unwrap().port, 50051);
        assert!(
            warnings[0].contains("Service shop/app not found"),
            "{warnings:?}"
        );

        let clusterip = Lookup::Found(ServiceInfo {
            headless: false,
            cluster_ip: Some("10.96.0.10".into()),
            ports: vec![port("grpc", 50051, TargetPort::Same)],
        });
        let (resolved, warnings) = run("app:grpc", &clusterip);
        assert_eq!(resolved.unwrap().port, 50051);
        assert!(
            warnings[0].contains("not headless (clusterIP 10.96.0.10)"),
            "{warnings:?}"
        );

        let (_, warnings) = run("app:1", &Lookup::Failed("forbidden".into()));
        assert!(
            warnings[0].contains("could not look up Service shop/app, using port 1: forbidden")
        );
    }

    #[test]
    fn unresolvable_port_names_are_denied() {
        for lookup in [
            Lookup::NotFound,
            Lookup::Skipped,
            Lookup::Failed("timeout".into()),
        ] {
            let err = run("app:grpc", &lookup).0.unwrap_err();
            assert!(
                err.starts_with("annotation fanout.dev/upstreams: \"app:grpc\""),
                "{err}"
            );
        }
        let lookup = headless(vec![port("http", 80, TargetPort::Same)]);
        let err = run("app:grpc", &lookup).0.unwrap_err();
        assert!(
            err.contains("has no port named \"grpc\" (its ports: http=80)"),
            "{err}"
        );
    }
}
