use super::*;
use crate::lookup::ServicePort;
use crate::upstreams;

fn one(value: &str) -> UpstreamRef {
    upstreams::parse(value, &[]).unwrap().remove(0)
}

fn service(headless: bool, ports: Vec<ServicePort>) -> Lookup {
    Lookup::Found(ServiceInfo {
        headless,
        cluster_ip: Some(if headless { "None" } else { "10.96.0.10" }.into()),
        ports,
        service_config: None,
        policy: None,
    })
}

fn port(name: &str, port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target,
    }
}

fn run(
    value: &str,
    lookup: &Lookup,
    discovery: bool,
) -> (Result<ResolvedUpstream, String>, Vec<String>) {
    let mut warnings = Vec::new();
    let result = resolve(
        &one(value),
        "shop",
        "cluster.local",
        lookup,
        discovery,
        &mut warnings,
    );
    (result, warnings)
}

fn a(name: &str, port: u16) -> Discovery {
    Discovery::Dns(DnsDiscovery::new(name, port))
}

fn srv(name: &str) -> Discovery {
    Discovery::Srv(SrvDiscovery {
        name: name.into(),
        nameservers: Vec::new(),
        refresh: std::time::Duration::from_secs(5),
    })
}

#[test]
fn a_port_name_resolves_to_the_pods_port() {
    let lookup = service(true, vec![port("grpc", 80, TargetPort::Number(50051))]);
    let (resolved, warnings) = run("app.payments:grpc", &lookup, false);
    let resolved = resolved.unwrap();
    assert_eq!(resolved.dns, a("app.payments.svc.cluster.local", 50051));
    assert_eq!(resolved.name, "app.payments");
    assert_eq!(resolved.namespace, "payments");
    assert_eq!(resolved.service_port(), ConfigPort::Name("grpc".into()));
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn port_names_need_no_lookup() {
    for lookup in [
        Lookup::Skipped,
        Lookup::NotFound,
        Lookup::Failed("timeout".into()),
    ] {
        let (resolved, _) = run("app:grpc", &lookup, false);
        assert_eq!(
            resolved.unwrap().dns,
            srv("_grpc._tcp.app.shop.svc.cluster.local"),
            "{lookup:?}"
        );
    }
}

#[test]
fn numeric_ports_dial_the_pods_port() {
    let lookup = service(true, vec![port("grpc", 80, TargetPort::Number(50051))]);
    assert_eq!(
        run("app:80", &lookup, false).0.unwrap().dns,
        a("app.shop.svc.cluster.local", 50051)
    );
    let (resolved, warnings) = run("app:50051", &lookup, false);
    assert_eq!(
        resolved.unwrap().dns,
        a("app.shop.svc.cluster.local", 50051)
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let (resolved, warnings) = run("app:9", &lookup, false);
    assert_eq!(resolved.unwrap().dns, a("app.shop.svc.cluster.local", 9));
    assert!(
        warnings[0].contains("has no port 9 (its ports: grpc=80)"),
        "{warnings:?}"
    );
}

#[test]
fn a_numeric_port_that_targets_a_container_port_name_uses_srv() {
    let lookup = service(true, vec![port("grpc", 80, TargetPort::Name("rpc".into()))]);
    for upstream in ["app:80", "app:grpc"] {
        let (resolved, warnings) = run(upstream, &lookup, false);
        assert_eq!(
            resolved.unwrap().dns,
            srv("_grpc._tcp.app.shop.svc.cluster.local")
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }
    let unnamed = service(
        true,
        vec![ServicePort {
            name: None,
            port: 80,
            target: TargetPort::Name("rpc".into()),
        }],
    );
    let (resolved, warnings) = run("app:80", &unnamed, false);
    assert_eq!(resolved.unwrap().dns, a("app.shop.svc.cluster.local", 80));
    assert!(
        warnings[0].contains("has no name (so no SRV record)"),
        "{warnings:?}"
    );
}

#[test]
fn a_cluster_ip_service_is_a_warning_only_without_the_discovery_server() {
    let lookup = service(false, vec![port("grpc", 50051, TargetPort::Same)]);
    let (resolved, warnings) = run("app:grpc", &lookup, false);
    assert!(resolved.is_ok());
    assert!(
        warnings[0].contains("not headless (clusterIP 10.96.0.10)"),
        "{warnings:?}"
    );
    let (resolved, warnings) = run("app:grpc", &lookup, true);
    assert!(resolved.is_ok());
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn problems_that_leave_a_usable_config_are_warnings() {
    let (resolved, warnings) = run("app:50051", &Lookup::NotFound, true);
    assert_eq!(
        resolved.unwrap().dns,
        a("app.shop.svc.cluster.local", 50051)
    );
    assert!(
        warnings[0].contains("Service shop/app not found"),
        "{warnings:?}"
    );
    let (_, warnings) = run("app:1", &Lookup::Failed("forbidden".into()), false);
    assert!(
        warnings[0]
            .contains("could not look up Service shop/app, using port 1 as given: forbidden"),
        "{warnings:?}"
    );
}

#[test]
fn a_port_name_the_service_lacks_is_denied() {
    let lookup = service(true, vec![port("http", 80, TargetPort::Same)]);
    let err = run("app:grpc", &lookup, true).0.unwrap_err();
    assert!(
        err.starts_with("annotation fanout.dev/upstreams: Service shop/app has no port named \"grpc\" (its ports: http=80)"),
        "{err}"
    );
}
