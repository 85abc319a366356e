use std::net::SocketAddr;
use std::time::Duration;

use fanout_proxy_config::{
    Balancer, ConfigError, Discovery, DiscoveryServer, DnsDiscovery, EndpointsDiscovery,
    HealthCheck, ProxyConfig, ServicePort, SrvDiscovery, UpstreamConfig,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn sample() -> ProxyConfig {
    let mut dns = DnsDiscovery::new("app.shop.svc.cluster.local", 50051);
    dns.nameservers = vec![addr("127.0.0.53:5353")];
    let mut a = UpstreamConfig::new("app.shop", addr("127.0.0.1:15001"), Discovery::Dns(dns));
    a.health_check = Some(HealthCheck::default());
    a.timeouts.request = Some(Duration::from_secs(30));
    a.timeouts.idle = Some(Duration::from_secs(60));
    let mut b = UpstreamConfig::new(
        "billing",
        addr("127.0.0.1:15002"),
        Discovery::Static(vec![addr("127.0.0.2:9000"), addr("[::1]:9000")]),
    );
    b.balancer = Balancer::RoundRobin;
    b.service_config = Some(serde_json::json!({
        "methodConfig": [{"name": [{"service": "billing.v1.Billing"}], "timeout": "0.5s"}]
    }));
    ProxyConfig::new(vec![a, b])
}

#[test]
fn rendered_config_reads_back_identically() {
    let config = sample();
    assert_eq!(ProxyConfig::from_json(&config.to_json()).unwrap(), config);
    assert_eq!(
        ProxyConfig::from_json(&config.to_json_pretty()).unwrap(),
        config
    );
}

/// The Service annotation's text, copied into the config as a string, reads as the object would.
#[test]
fn a_service_config_given_as_text_reads_as_the_object() {
    let text = r#"{"version":1,"upstreams":[{"name":"a","listen":"127.0.0.1:15001",
        "discovery":{"static":["127.0.0.2:1"]},
        "service_config":"{\"methodConfig\":[{\"name\":[{}],\"timeout\":\"1s\"}]}"}]}"#;
    let config = ProxyConfig::from_json(text).unwrap();
    assert_eq!(
        config.upstreams[0].service_config,
        Some(serde_json::json!({"methodConfig": [{"name": [{}], "timeout": "1s"}]}))
    );
    let text = text.replace("1s", "1 s");
    let got = lines(&text);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with("upstreams[0].service_config.methodConfig[0].timeout: "),
        "{got:#?}"
    );
}

#[test]
fn minimal_config_takes_defaults() {
    let text = r#"{"version":1,"upstreams":[{"name":"a","listen":"127.0.0.1:15001",
        "discovery":{"dns":{"name":"a.default.svc.cluster.local","port":50051}}}]}"#;
    let config = ProxyConfig::from_json(text).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.balancer, Balancer::PeakEwma);
    assert_eq!(upstream.timeouts.connect, Duration::from_millis(250));
    assert_eq!(upstream.retry.budget_percent, 20);
    assert_eq!(upstream.retry.max_buffer_bytes, 64 * 1024);
    assert!(upstream.health_check.is_none());
    assert_eq!(config.admin.listen, addr("0.0.0.0:15020"));
}

fn lines(text: &str) -> Vec<String> {
    match ProxyConfig::from_json(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.lines(),
    }
}

#[test]
fn every_fault_is_reported_with_its_path() {
    let text = r#"{
        "version": 2,
        "admin": {"listen": "nowhere"},
        "upstreams": [
            {"name": "a", "listen": "127.0.0.1:15001", "balancer": "random",
             "discovery": {"dns": {"name": "bad..name", "port": 0, "refresh": "5"}},
             "retry": {"budget_percent": 101}, "timeouts": {"conect": "1s"}},
            {"name": "a", "listen": "127.0.0.1:15020", "discovery": {"static": []},
             "service_config": {"methodConfig": [{"timeout": "soon"}]}},
            {"listen": "127.0.0.1:15003", "discovery": {"static": ["1.2.3.4"]}}
        ],
        "extra": true
    }"#;
    let got = lines(text);
    let expected = [
        "version: this proxy reads config version 1, got 2",
        "admin.listen: \"nowhere\" is not an ip:port address (e.g. \"127.0.0.1:15001\")",
        "upstreams[0].discovery.dns.name: \"bad..name\" is not a DNS name (bad label \"\")",
        "upstreams[0].discovery.dns.port: must be 1..=65535, got 0",
        "upstreams[0].discovery.dns.refresh: \"5\" has a number without a unit (ms, s, m, h)",
        "upstreams[0].balancer: unknown balancer \"random\"; use one of peak_ewma, round_robin, least_request",
        "upstreams[0].timeouts.conect: unknown field",
        "upstreams[0].retry.budget_percent: must be 0..=100, got 101",
        "upstreams[1].discovery.static: must list at least one ip:port",
        "upstreams[1].service_config.methodConfig[0].timeout: \"soon\" is not a duration such as \"1.5s\" (seconds, then s)",
        "upstreams[2].name: is required",
        "upstreams[2].discovery.static[0]: \"1.2.3.4\" is not an ip:port address (e.g. \"127.0.0.1:15001\")",
        "extra: unknown field",
    ];
    for line in expected {
        assert!(
            got.contains(&line.to_string()),
            "missing {line:?} in {got:#?}"
        );
    }
    assert_eq!(got.len(), expected.len(), "{got:#?}");
}

#[test]
fn clashing_listeners_and_names_are_faults() {
    let text = r#"{"version":1,"upstreams":[
        {"name":"a","listen":"127.0.0.1:15001","discovery":{"static":["127.0.0.2:1"]}},
        {"name":"a","listen":"127.0.0.1:15001","discovery":{"static":["127.0.0.2:1"]}},
        {"name":"b","listen":"127.0.0.1:15020","discovery":{"static":["127.0.0.2:1"]}}]}"#;
    assert_eq!(
        lines(text),
        [
            "upstreams[1].name: \"a\" is also the name of upstreams[0]",
            "upstreams[1].listen: 127.0.0.1:15001 is also the listen address of upstreams[0]",
            "upstreams[2].listen: 127.0.0.1:15020 clashes with the admin listener 0.0.0.0:15020",
        ]
    );
}

#[test]
fn not_json_and_wrong_shapes_are_one_line_each() {
    assert!(lines("{").join("\n").starts_with("not valid JSON"));
    assert_eq!(lines("[]"), ["must be an object, got a list"]);
    assert_eq!(
        lines(r#"{"version":1,"upstreams":{}}"#),
        ["upstreams: must be a list, got an object"]
    );
    assert_eq!(
        lines(r#"{"version":1,"upstreams":[{"name":"a","listen":"127.0.0.1:1","discovery":{}}]}"#),
        [
            "upstreams[0].discovery: needs one of \"dns\" {name, port}, \"srv\" {name}, \"static\" \
         [addresses] or \"endpoints\" {namespace, service, port, fallback}"
        ]
    );
    assert!(matches!(
        ProxyConfig::from_json("1"),
        Err(ConfigError::Invalid(_))
    ));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Any text, and any truncation of a valid config, gives a config or faults, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = ProxyConfig::from_json(&text);
        }

        #[test]
        fn truncated_config_never_panics(cut in 0usize..2000) {
            let text = sample().to_json_pretty();
            let cut = cut.min(text.len());
            let _ = ProxyConfig::from_json(&text[..cut]);
        }
    }
}

#[test]
fn a_health_only_config_needs_no_upstreams() {
    let text = r#"{"version":1,"grpc_health":{"port":50051}}"#;
    let config = ProxyConfig::from_json(text).unwrap();
    assert!(config.upstreams.is_empty());
    let health = config.grpc_health.clone().unwrap();
    assert_eq!(health.port, 50051);
    assert_eq!(health.service, "");
    assert_eq!(health.timeout, Duration::from_secs(1));
    assert_eq!(health.cache, Duration::from_secs(1));
    // What the webhook renders reads back.
    let mut rendered = ProxyConfig::new(Vec::new());
    rendered.grpc_health = Some(fanout_proxy_config::GrpcHealth::new(8080, "shop.Cart"));
    assert_eq!(
        ProxyConfig::from_json(&rendered.to_json()).unwrap(),
        rendered
    );
}

#[test]
fn grpc_health_faults_are_named_and_upstreams_are_still_required_without_it() {
    assert_eq!(
        lines(r#"{"version":1,"upstreams":[]}"#),
        ["upstreams: must list at least one upstream (or set grpc_health)"]
    );
    let faults =
        lines(r#"{"version":1,"grpc_health":{"port":70000,"timeout":"soon","colour":"red"}}"#);
    assert_eq!(faults.len(), 3, "{faults:?}");
    assert!(faults[0].starts_with("grpc_health.port:"), "{faults:?}");
    assert!(faults[1].starts_with("grpc_health.timeout:"), "{faults:?}");
    assert!(faults[2].starts_with("grpc_health.colour:"), "{faults:?}");
}

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

#[test]
fn endpoints_and_srv_discovery_read_back_identically() {
    let mut config = ProxyConfig::new(vec![
        UpstreamConfig::new(
            "app.shop",
            addr("127.0.0.1:15001"),
            Discovery::Endpoints(EndpointsDiscovery::new(
                "shop",
                "app",
                ServicePort::Name("grpc".into()),
                Discovery::Srv(SrvDiscovery::for_port(
                    "grpc",
                    "app",
                    "shop",
                    "cluster.local",
                )),
            )),
        ),
        UpstreamConfig::new(
            "billing.payments",
            addr("127.0.0.1:15002"),
            Discovery::Endpoints(EndpointsDiscovery::new(
                "payments",
                "billing",
                ServicePort::Number(9000),
                Discovery::Dns(DnsDiscovery::new(
                    "billing.payments.svc.cluster.local",
                    9000,
                )),
            )),
        ),
    ]);
    config.discovery_server = Some(DiscoveryServer {
        address: "fanout-webhook.fanout-system.svc:15012".into(),
        ca: CA.into(),
    });
    let json = config.to_json();
    assert!(
        json.contains(r#""port":"grpc""#) && json.contains(r#""port":9000"#),
        "{json}"
    );
    assert!(
        json.contains(r#""srv":{"name":"_grpc._tcp.app.shop.svc.cluster.local""#),
        "{json}"
    );
    assert_eq!(ProxyConfig::from_json(&json).unwrap(), config);
}

#[test]
fn endpoints_discovery_faults_are_named() {
    let upstream = |discovery: &str| {
        format!(
            r#"{{"version":1,"upstreams":[{{"name":"a","listen":"127.0.0.1:1","discovery":{discovery}}}]}}"#
        )
    };
    assert_eq!(
        lines(&upstream(
            r#"{"endpoints":{"namespace":"Shop","service":"app","port":"Not_A_Port","fallback":{"static":["127.0.0.1:2"]}}}"#
        )),
        [
            "upstreams[0].discovery.endpoints.namespace: \"Shop\" is not a Kubernetes name (a DNS label)",
            "upstreams[0].discovery.endpoints.port: \"Not_A_Port\" is not a port name",
            "upstreams[0].discovery.endpoints.fallback: must be \"dns\" or \"srv\", not \"static\"",
        ]
    );
    assert_eq!(
        lines(&upstream(
            r#"{"endpoints":{"namespace":"shop","service":"app","port":0,"fallback":{"dns":{"name":"app","port":1}}}}"#
        )),
        ["upstreams[0].discovery.endpoints.port: must be a port name or 1..=65535, got 0"]
    );
    assert_eq!(
        lines(&upstream(
            r#"{"endpoints":{"namespace":"shop","service":"app","port":"grpc","fallback":{"dns":{"name":"app","port":1}}}}"#
        )),
        [
            "upstreams[0].discovery.endpoints: needs \"discovery_server\" {address, ca} at the top level"
        ]
    );
    let text = r#"{"version":1,"discovery_server":{"address":"no-port","ca":"x"},
        "upstreams":[{"name":"a","listen":"127.0.0.1:1","discovery":{"srv":{"name":"bad name"},"dns":{"name":"a","port":1}}}]}"#;
    assert_eq!(
        lines(text),
        [
            "discovery_server.address: \"no-port\" is not host:port (e.g. \"fanout-webhook.fanout-system.svc:15012\")",
            "discovery_server.ca: must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
            "upstreams[0].discovery: set one of dns, srv, not several",
        ]
    );
}

mod fuzz_service_annotations {
    use fanout_proxy_config::policy::Policy;
    use fanout_proxy_config::service_config::ServiceConfig;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn service_config() -> Value {
        json!({
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": "shop.v1.Cart"},
            "methodConfig": [{
                "name": [{"service": "shop.v1.Cart", "method": "Get"}, {}],
                "waitForReady": true, "timeout": "1.5s",
                "maxRequestMessageBytes": 1024, "maxResponseMessageBytes": "2048",
                "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 10],
                    "perAttemptRecvTimeout": "0.5s"}}],
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
        })
    }

    fn policy() -> Value {
        json!({"request_timeout": "60s", "idle_timeout": "60s", "balancer": "round_robin",
            "health_check": {"interval": "5s", "timeout": "2s", "healthy_threshold": 2,
                "unhealthy_threshold": 3, "service": "x"},
            "ejection": {"consecutive_failures": 5, "base_time": "5s", "max_time": "60s",
                "max_ejected_percent": 50},
            "split": [{"service": "app", "weight": 90}, {"service": "app-canary.shop", "weight": 10}]})
    }

    /// Values a careless or hostile owner might write anywhere.
    fn odd_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            Just(json!(u64::MAX)),
            Just(json!(1e308)),
            Just(json!(-0.0)),
            ".{0,12}".prop_map(Value::from),
            prop_oneof![
                Just("99999999999999999999s"),
                Just("-1s"),
                Just("1e9s"),
                Just("0s"),
                Just("315576000001s"),
                Just("0.0000000001s"),
                Just("1.s"),
                Just(".5s"),
                Just("18446744073709551616"),
                Just("NaN"),
                Just("UNAVAILABLE")
            ]
            .prop_map(Value::from),
            Just(json!([])),
            Just(json!({})),
        ]
    }

    /// Every leaf path of `value` (object keys and list indexes).
    fn paths(value: &Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let mut next = at.clone();
                    next.push(k.clone());
                    paths(v, next, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let mut next = at.clone();
                    next.push(i.to_string());
                    paths(v, next, out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    fn replace(value: &mut Value, path: &[String], with: Value) {
        let mut target = value;
        for key in path {
            target = match target {
                Value::Object(map) => map.get_mut(key).unwrap(),
                Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
                _ => unreachable!(),
            };
        }
        *target = with;
    }

    proptest! {
        // Any value at any place of a full service config or policy, and any truncation of
        // one, gives the document or its faults: never a panic.
        #[test]
        fn odd_values_anywhere_never_panic(pick in any::<prop::sample::Index>(), with in odd_value(), which in any::<bool>()) {
            let mut document = if which { service_config() } else { policy() };
            let mut all = Vec::new();
            paths(&document, Vec::new(), &mut all);
            replace(&mut document, &all[pick.index(all.len())], with);
            let text = document.to_string();
            let _ = ServiceConfig::parse(&text);
            let _ = Policy::parse(&text);
        }

        #[test]
        fn truncated_annotations_never_panic(cut in 0usize..1000) {
            for text in [service_config().to_string(), policy().to_string()] {
                let cut = cut.min(text.len());
                let _ = ServiceConfig::parse(&text[..cut]);
                let _ = Policy::parse(&text[..cut]);
            }
        }
    }

    #[test]
    fn the_documents_fuzzed_are_valid_to_begin_with() {
        ServiceConfig::parse(&service_config().to_string()).unwrap();
        Policy::parse(&policy().to_string()).unwrap();
    }
}
