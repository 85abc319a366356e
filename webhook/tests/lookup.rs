//! Service lookups through kube's real `Client` over a mocked Kubernetes API.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Answer, admitter_with, fixture};
use fanout_proxy_config::{Discovery, ProxyConfig};
use fanout_webhook::lookup::{KubeLookup, Lookup, ServiceLookup, TargetPort};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

fn status(code: u16, reason: &str) -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("{reason} (mock)"), "reason": reason, "code": code})
}

/// A Kubernetes API with a few Services; records the paths it was asked for.
fn mock_api(paths: Arc<Mutex<Vec<String>>>, delay: Duration) -> kube::Client {
    let service = tower::service_fn(move |request: Request<kube::client::Body>| {
        let paths = paths.clone();
        async move {
            tokio::time::sleep(delay).await;
            let path = request.uri().path().to_string();
            paths
                .lock()
                .unwrap()
                .push(format!("{} {path}", request.method()));
            let (code, body) = match path.as_str() {
                "/api/v1/namespaces/shop/services/app" => (
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "app", "namespace": "shop"},
                        "spec": {"clusterIP": "None", "ports": [
                            {"name": "grpc", "port": 50051, "targetPort": 8080, "protocol": "TCP"},
                            {"name": "admin", "port": 9000, "targetPort": "admin-port"}]}
                    }),
                ),
                "/api/v1/namespaces/shop/services/web" => (
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "web", "namespace": "shop"},
                        "spec": {"clusterIP": "10.96.3.4", "ports": [{"port": 80}]}
                    }),
                ),
                "/api/v1/namespaces/shop/services/tuned" => (
                    200,
                    headless_with_service_config(
                        "tuned",
                        r#"{"methodConfig": [{"name": [{"service": "shop.v1.Cart"}],
                            "timeout": "0.2s"}]}"#,
                        r#"{"request_timeout": "60s", "balancer": "least_request",
                            "health_check": {"interval": "5s", "timeout": "2s",
                                "healthy_threshold": 2, "unhealthy_threshold": 3},
                            "ejection": {"consecutive_failures": 7}}"#,
                    ),
                ),
                "/api/v1/namespaces/shop/services/rr" => (
                    200,
                    headless_with_service_config(
                        "rr",
                        r#"{"loadBalancingConfig": [{"pick_first": {}}, {"round_robin": {}}],
                            "healthCheckConfig": {"serviceName": "shop.v1.Cart"}}"#,
                        r#"{"health_check": {"interval": "10s"}}"#,
                    ),
                ),
                "/api/v1/namespaces/shop/services/broken" => (
                    200,
                    headless_with_service_config(
                        "broken",
                        r#"{"methodConfig": [{"timeout": "soon", "retryPolicy": {}}]}"#,
                        r#"{"balancer": "random"}"#,
                    ),
                ),
                p if p.starts_with("/api/v1/namespaces/locked/") => (403, status(403, "Forbidden")),
                _ => (404, status(404, "NotFound")),
            };
            let response = Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    kube::Client::new(service, "default")
}

fn headless_with_service_config(
    name: &str,
    service_config: &str,
    policy: &str,
) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop",
                     "annotations": {"fanout.dev/service-config": service_config,
                                     "fanout.dev/policy": policy}},
        "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 50051}]}
    })
}

/// The pod fixture naming `upstreams`, admitted: the answer and the proxy config rendered.
async fn admitted(
    admitter: &fanout_webhook::admission::Admitter,
    upstreams: &str,
) -> (Answer, ProxyConfig) {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/upstreams"] =
        json!(upstreams);
    let answer = Answer::parse(
        &admitter
            .review(&serde_json::to_vec(&review).unwrap())
            .await
            .unwrap(),
    );
    assert!(answer.allowed(), "{:?}", answer.response);
    let pod = answer.patched(&review);
    let config = ProxyConfig::from_json(
        pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    (answer, config)
}

#[tokio::test]
async fn lookups_read_services_from_the_api() {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let lookup = KubeLookup::new(
        mock_api(paths.clone(), Duration::ZERO),
        Duration::from_secs(2),
    );
    let Lookup::Found(app) = lookup.lookup("shop", "app").await else {
        panic!()
    };
    assert!(app.headless);
    assert_eq!(app.ports[0].target, TargetPort::Number(8080));
    assert_eq!(app.ports[1].target, TargetPort::Name("admin-port".into()));
    let Lookup::Found(web) = lookup.lookup("shop", "web").await else {
        panic!()
    };
    assert!(!web.headless);
    assert_eq!(lookup.lookup("shop", "ghost").await, Lookup::NotFound);
    assert!(
        matches!(lookup.lookup("locked", "x").await, Lookup::Failed(e) if e.contains("Forbidden"))
    );
    assert_eq!(
        *paths.lock().unwrap(),
        [
            "GET /api/v1/namespaces/shop/services/app",
            "GET /api/v1/namespaces/shop/services/web",
            "GET /api/v1/namespaces/shop/services/ghost",
            "GET /api/v1/namespaces/locked/services/x",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_api_is_a_failed_lookup_not_a_hung_admission() {
    let lookup = KubeLookup::new(
        mock_api(Arc::default(), Duration::from_secs(30)),
        Duration::from_secs(2),
    );
    assert!(
        matches!(lookup.lookup("shop", "app").await, Lookup::Failed(e) if e.contains("no answer within"))
    );
}

#[tokio::test]
async fn admission_renders_what_the_api_says() {
    let paths = Arc::new(Mutex::new(Vec::new()));
    let lookup = KubeLookup::new(
        mock_api(paths.clone(), Duration::ZERO),
        Duration::from_secs(2),
    );
    let admitter = admitter_with(Arc::new(lookup));
    let (answer, config) = admitted(
        &admitter,
        "app:grpc,web:80,ghost:7000,x.locked:1,spirit:grpc",
    )
    .await;
    let mut review = fixture("pod-generatename-no-volumes");
    let targets: Vec<(String, u16)> = config
        .upstreams
        .iter()
        .map(|u| match &u.discovery {
            Discovery::Dns(d) => (d.name.clone(), d.port),
            Discovery::Srv(s) => (s.name.clone(), 0),
            other => panic!("no discovery server configured, got {other:?}"),
        })
        .collect();
    assert_eq!(
        targets,
        [
            // The named Service port maps to the pods' targetPort.
            ("app.shop.svc.cluster.local".to_string(), 8080),
            ("web.shop.svc.cluster.local".to_string(), 80),
            ("ghost.shop.svc.cluster.local".to_string(), 7000),
            ("x.locked.svc.cluster.local".to_string(), 1),
            // A port name needs no lookup: SRV, which works once the Service exists.
            ("_grpc._tcp.spirit.shop.svc.cluster.local".to_string(), 0),
        ]
    );
    let warnings = answer.warnings();
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    assert!(warnings[3].contains("Service shop/spirit not found"));
    assert!(warnings[0].contains("Service shop/web is not headless (clusterIP 10.96.3.4)"));
    assert!(warnings[1].contains("Service shop/ghost not found"));
    assert!(warnings[2].contains("could not look up Service locked/x"));

    // A port name the Service does not have is denied, naming the annotation.
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/upstreams"] =
        json!("app:nope");
    let answer = Answer::parse(
        &admitter
            .review(&serde_json::to_vec(&review).unwrap())
            .await
            .unwrap(),
    );
    assert!(!answer.allowed());
    let message = answer.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "annotation fanout.dev/upstreams: Service shop/app has no port named \"nope\""
        ),
        "{message}"
    );
}

/// Without the discovery server the webhook is the only way a Service's service config reaches
/// its callers: a valid one is rendered into the proxy config; an invalid one is left out and
/// the caller's pod is admitted with a warning naming every fault (the owner's mistake must
/// not block the callers). Likewise `fanout.dev/policy`, whose settings replace the defaults.
#[tokio::test]
async fn admission_renders_the_service_s_service_config_and_warns_of_an_invalid_one() {
    let lookup = KubeLookup::new(
        mock_api(Arc::default(), Duration::ZERO),
        Duration::from_secs(2),
    );
    let admitter = admitter_with(Arc::new(lookup));
    let (answer, config) = admitted(&admitter, "tuned:grpc,broken:grpc,rr:grpc").await;
    assert_eq!(
        config.upstreams[0].service_config,
        Some(json!({"methodConfig": [{"name": [{"service": "shop.v1.Cart"}], "timeout": "0.2s"}]}))
    );
    assert_eq!(config.upstreams[1].service_config, None);
    let tuned = &config.upstreams[0];
    assert_eq!(tuned.timeouts.request, Some(Duration::from_secs(60)));
    assert_eq!(tuned.balancer, fanout_proxy_config::Balancer::LeastRequest);
    let check = tuned
        .health_check
        .as_ref()
        .expect("the policy's health check");
    assert_eq!(
        (
            check.interval,
            check.timeout,
            check.healthy_threshold,
            check.unhealthy_threshold
        ),
        (Duration::from_secs(5), Duration::from_secs(2), 2, 3)
    );
    assert_eq!(tuned.ejection.consecutive_failures, 7);
    // gRPC's own loadBalancingConfig and healthCheckConfig are rendered as settings.
    let rr = &config.upstreams[2];
    assert_eq!(rr.balancer, fanout_proxy_config::Balancer::RoundRobin);
    let check = rr.health_check.as_ref().unwrap();
    assert_eq!(
        (check.interval, check.service.as_str()),
        (Duration::from_secs(10), "shop.v1.Cart")
    );
    let broken = &config.upstreams[1];
    assert_eq!(broken.balancer, fanout_proxy_config::Balancer::PeakEwma);
    assert!(broken.health_check.is_none());
    let warnings = answer.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[1].contains(
            "Service shop/broken annotation fanout.dev/policy is invalid and not applied: \
             balancer: unknown balancer \"random\""
        ),
        "{warnings:?}"
    );
    for expected in [
        "Service shop/broken annotation fanout.dev/service-config is invalid and not applied",
        "methodConfig[0].timeout: \"soon\"",
        "methodConfig[0].retryPolicy.maxAttempts: is required",
    ] {
        assert!(
            warnings[0].contains(expected),
            "{expected:?} not in {warnings:?}"
        );
    }
}
