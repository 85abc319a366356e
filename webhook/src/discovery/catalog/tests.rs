use serde_json::json;

use super::*;

fn service(namespace: &str, name: &str, ports: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {"fanout.dev/service-config": "{\"methodConfig\":[]}"}},
        "spec": {"clusterIP": "10.96.0.7", "ports": ports},
    }))
    .unwrap()
}

/// `(ip, ready, serving, terminating)`
type Conditions<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

/// A slice of `service` with `endpoints`.
fn slice(
    name: &str,
    service: &str,
    ports: serde_json::Value,
    endpoints: &[Conditions<'_>],
) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (ip, ready, serving, terminating))| {
            json!({"addresses": [ip], "zone": "zone-a", "nodeName": "node-1",
                   "targetRef": {"kind": "Pod", "name": format!("{service}-{i}")},
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn key(port: PortRef) -> UpstreamKey {
    UpstreamKey {
        service: ("shop".into(), "app".into()),
        port,
    }
}

fn addresses(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.ip, e.port))
        .collect()
}

#[test]
fn a_port_name_reaches_each_pods_own_port_even_when_pods_differ() {
    let mut catalog = Catalog::default();
    catalog.apply_service(&service(
        "shop",
        "app",
        json!([{"name": "grpc", "port": 80, "targetPort": "rpc"}, {"name": "metrics", "port": 9090}]),
    ));
    // Old pods name port 8080 "rpc", new pods 9000: the controller puts them in two slices.
    catalog.apply_slice(&slice(
        "app-old",
        "app",
        json!([{"name": "grpc", "port": 8080}, {"name": "metrics", "port": 9090}]),
        &[("10.0.0.1", Some(true), None, None)],
    ));
    catalog.apply_slice(&slice(
        "app-new",
        "app",
        json!([{"name": "grpc", "port": 9000}]),
        &[("10.0.0.2", Some(true), None, None)],
    ));
    let by_name = catalog.snapshot(&key(PortRef::Name("grpc".into())));
    assert_eq!(addresses(&by_name), ["10.0.0.1:8080", "10.0.0.2:9000"]);
    assert!(by_name.service_found);
    assert_eq!(
        by_name.policy.unwrap().service_config,
        "{\"methodConfig\":[]}"
    );
    // The Service port by number, and a pod port written as a number, end up the same.
    assert_eq!(
        addresses(&catalog.snapshot(&key(PortRef::Number(80)))),
        ["10.0.0.1:8080", "10.0.0.2:9000"]
    );
    assert_eq!(
        addresses(&catalog.snapshot(&key(PortRef::Number(9000)))),
        ["10.0.0.2:9000"]
    );
    let endpoint = &by_name.endpoints[0];
    assert_eq!(
        (
            endpoint.zone.as_str(),
            endpoint.node.as_str(),
            endpoint.pod.as_str()
        ),
        ("zone-a", "node-1", "shop/app-0")
    );
}

#[test]
fn conditions_take_kubernetes_defaults_and_merge_across_slices() {
    let mut catalog = Catalog::default();
    catalog.apply_service(&service("shop", "app", json!([{"port": 50051}])));
    catalog.apply_slice(&slice(
        "app-a",
        "app",
        json!([{"port": 50051}]),
        &[
            ("10.0.0.1", None, None, None),
            ("10.0.0.2", Some(false), Some(true), Some(true)),
            ("10.0.0.3", Some(false), None, None),
        ],
    ));
    // 10.0.0.3 also sits, ready, in a second slice while the controller moves it.
    catalog.apply_slice(&slice(
        "app-b",
        "app",
        json!([{"port": 50051}]),
        &[("10.0.0.3", Some(true), None, None)],
    ));
    let snapshot = catalog.snapshot(&key(PortRef::Number(50051)));
    let conditions: Vec<(bool, bool, bool)> = snapshot
        .endpoints
        .iter()
        .map(|e| (e.ready, e.serving, e.terminating))
        .collect();
    assert_eq!(
        conditions,
        [
            (true, true, false),
            (false, true, true),
            (true, true, false)
        ]
    );
}

#[test]
fn changes_are_reported_for_the_services_they_touch() {
    let mut catalog = Catalog::default();
    let svc = service("shop", "app", json!([{"name": "grpc", "port": 50051}]));
    assert_eq!(
        catalog.apply_service(&svc),
        Some(("shop".into(), "app".into()))
    );
    assert_eq!(catalog.apply_service(&svc), None, "unchanged");
    let a = slice(
        "s1",
        "app",
        json!([{"name": "grpc", "port": 50051}]),
        &[("10.0.0.1", None, None, None)],
    );
    assert_eq!(
        catalog.apply_slice(&a),
        [("shop".to_string(), "app".to_string())]
    );
    assert!(catalog.apply_slice(&a).is_empty(), "unchanged");
    // The slice's label moves to another Service: both change.
    let moved = slice(
        "s1",
        "other",
        json!([{"name": "grpc", "port": 50051}]),
        &[("10.0.0.1", None, None, None)],
    );
    assert_eq!(
        catalog.apply_slice(&moved),
        [
            ("shop".to_string(), "app".to_string()),
            ("shop".to_string(), "other".to_string())
        ]
    );
    assert!(
        catalog
            .snapshot(&key(PortRef::Name("grpc".into())))
            .endpoints
            .is_empty()
    );
    assert_eq!(
        catalog.delete_slice(&moved),
        Some(("shop".into(), "other".into()))
    );
    // A relist: only what differs is reported.
    let b = slice(
        "s2",
        "app",
        json!([{"name": "grpc", "port": 50051}]),
        &[("10.0.0.2", None, None, None)],
    );
    catalog.apply_slice(&b);
    let changed = catalog.replace_slices(std::slice::from_ref(&b));
    assert!(changed.is_empty(), "{changed:?}");
    let changed = catalog.replace_slices(&[]);
    assert_eq!(
        changed.into_iter().collect::<Vec<_>>(),
        [("shop".to_string(), "app".to_string())]
    );
}

#[test]
fn missing_services_and_ports_say_why() {
    let mut catalog = Catalog::default();
    let snapshot = catalog.snapshot(&key(PortRef::Name("grpc".into())));
    assert!(!snapshot.service_found);
    assert_eq!(snapshot.reason, "Service shop/app not found");
    catalog.apply_service(&service(
        "shop",
        "app",
        json!([{"name": "http", "port": 80}]),
    ));
    let snapshot = catalog.snapshot(&key(PortRef::Name("grpc".into())));
    assert_eq!(
        snapshot.reason,
        "Service shop/app has no port named \"grpc\""
    );
    let snapshot = catalog.snapshot(&key(PortRef::Name("http".into())));
    assert!(snapshot.service_found);
    assert_eq!(snapshot.reason, "Service shop/app has no endpoints");
}

/// A split on `app` (90 to itself, 10 to `app-canary`): its snapshot holds both Services'
/// endpoints, each tagged, and the weights; `app-canary`'s changes are `app`'s too. An invalid
/// policy edit keeps the last valid split.
#[test]
fn a_split_shows_every_target_s_endpoints_tagged_with_their_service() {
    let mut catalog = Catalog::default();
    let with_policy = |name: &str, policy: &str| {
        let mut service = service("shop", name, json!([{"name": "grpc", "port": 80}]));
        service
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("fanout.dev/policy".into(), policy.into());
        service
    };
    let split =
        r#"{"split": [{"service": "app", "weight": 90}, {"service": "app-canary", "weight": 10}]}"#;
    catalog.apply_service(&with_policy("app", split));
    catalog.apply_service(&service(
        "shop",
        "app-canary",
        json!([{"name": "grpc", "port": 80}]),
    ));
    catalog.apply_slice(&slice(
        "app-1",
        "app",
        json!([{"name": "grpc", "port": 8080}]),
        &[
            ("10.0.0.1", Some(true), None, None),
            ("10.0.0.2", Some(true), None, None),
        ],
    ));
    let upstream = key(PortRef::Name("grpc".into()));
    let snapshot = catalog.snapshot(&upstream);
    assert_eq!(
        snapshot.reason, "Service shop/app-canary has no endpoints",
        "the missing canary is said"
    );
    assert_eq!(
        catalog.split_targets(&upstream.service),
        [("shop".to_string(), "app-canary".to_string())]
    );
    catalog.apply_slice(&slice(
        "app-canary-1",
        "app-canary",
        json!([{"name": "grpc", "port": 9090}]),
        &[("10.0.1.1", Some(true), None, None)],
    ));
    let snapshot = catalog.snapshot(&upstream);
    let tagged: Vec<(String, String)> = snapshot
        .endpoints
        .iter()
        .map(|e| (format!("{}:{}", e.ip, e.port), e.service.clone()))
        .collect();
    assert_eq!(
        tagged,
        [
            ("10.0.0.1:8080".to_string(), "shop/app".to_string()),
            ("10.0.0.2:8080".to_string(), "shop/app".to_string()),
            ("10.0.1.1:9090".to_string(), "shop/app-canary".to_string()),
        ]
    );
    let weights: Vec<(String, u32)> = snapshot
        .split
        .iter()
        .map(|t| (t.service.clone(), t.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("shop/app".to_string(), 90),
            ("shop/app-canary".to_string(), 10)
        ]
    );
    assert_eq!(snapshot.reason, "");

    // An edit that does not parse: the proxies keep their last valid policy, so does the split.
    catalog.apply_service(&with_policy("app", r#"{"split": [{"service": "app"}]}"#));
    assert_eq!(catalog.snapshot(&upstream).split.len(), 2);
    // Removed: the Service's own endpoints again, untagged.
    catalog.apply_service(&with_policy("app", "{}"));
    let snapshot = catalog.snapshot(&upstream);
    assert!(snapshot.split.is_empty());
    assert_eq!(addresses(&snapshot), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    assert!(snapshot.endpoints.iter().all(|e| e.service.is_empty()));
}
