//! What the proxy's probes and health endpoints become in the stored pod: the readiness the
//! chart or `fanout.dev/readiness` chooses, and `fanout.dev/grpc-health` (with or without
//! upstreams), all through the admission endpoint on a recorded review.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use common::{Answer, admitter_with, catalogue, fixture};
use fanout_webhook::admission::Admitter;
use fanout_webhook::server::app;
use fanout_webhook::settings::Readiness;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The recorded gateway pod with `annotations` instead of its own.
fn review(annotations: Value) -> Value {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["metadata"]["annotations"] = annotations;
    review
}

async fn admit(admitter: Admitter, review: &Value) -> Answer {
    let request = Request::post("/mutate?timeout=5s")
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(review).unwrap()))
        .unwrap();
    let response = app(Arc::new(admitter)).oneshot(request).await.unwrap();
    Answer::parse(&response.into_body().collect().await.unwrap().to_bytes())
}

fn admitter() -> Admitter {
    admitter_with(Arc::new(catalogue()))
}

/// The admitter of a chart installed with `proxy.readiness` set to `readiness`.
fn admitter_with_readiness(readiness: Readiness) -> Admitter {
    let mut admitter = admitter();
    admitter.settings.readiness = readiness;
    admitter
}

/// The path the stored pod's proxy readiness probe asks.
fn readiness_path(pod: &Value) -> &Value {
    &proxy(pod)["readinessProbe"]["httpGet"]["path"]
}

fn proxy(pod: &Value) -> &Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            pod["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .find(|c| c["name"] == "fanout-proxy")
        .expect("the proxy is injected")
}

fn rendered_config(pod: &Value) -> Value {
    serde_json::from_str(
        pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

fn denial(answer: &Answer) -> String {
    assert!(!answer.allowed(), "allowed: {}", answer.response);
    answer.response["status"]["message"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_readiness_probe_asks_whether_the_proxy_can_serve_unless_told_otherwise() {
    let default = review(json!({"fanout.dev/upstreams": "app:50051"}));
    let answer = admit(admitter(), &default).await;
    let pod = answer.patched(&default);
    assert_eq!(readiness_path(&pod), "/ready/proxy");
    assert_eq!(proxy(&pod)["livenessProbe"]["httpGet"]["path"], "/live");

    let upstreams = review(json!({"fanout.dev/upstreams": "app:50051",
        "fanout.dev/readiness": "upstreams"}));
    let answer = admit(admitter(), &upstreams).await;
    assert_eq!(readiness_path(&answer.patched(&upstreams)), "/ready");

    // The chart's value sets the default; a pod's annotation still wins.
    let answer = admit(admitter_with_readiness(Readiness::Upstreams), &default).await;
    assert_eq!(readiness_path(&answer.patched(&default)), "/ready");
    let by_pod = review(json!({"fanout.dev/upstreams": "app:50051",
        "fanout.dev/readiness": "proxy"}));
    let answer = admit(admitter_with_readiness(Readiness::Upstreams), &by_pod).await;
    assert_eq!(readiness_path(&answer.patched(&by_pod)), "/ready/proxy");

    let bad = review(json!({"fanout.dev/upstreams": "app:50051",
        "fanout.dev/readiness": "always"}));
    let message = denial(&admit(admitter(), &bad).await);
    assert!(
        message.contains("annotation fanout.dev/readiness: \"always\""),
        "{message}"
    );
}

#[tokio::test]
async fn a_pod_with_only_grpc_health_gets_a_proxy_without_upstreams() {
    let health_only = review(json!({"fanout.dev/grpc-health": "8080/shop.Cart"}));
    let answer = admit(admitter(), &health_only).await;
    assert!(answer.allowed());
    assert!(answer.warnings().is_empty(), "{:?}", answer.warnings());
    let pod = answer.patched(&health_only);
    let config = rendered_config(&pod);
    assert_eq!(config["upstreams"], json!([]));
    assert_eq!(
        config["grpc_health"],
        json!({"port": 8080, "service": "shop.Cart", "timeout": "1s", "cache": "1s"})
    );
    assert_eq!(proxy(&pod)["ports"][0]["containerPort"], 15020);
    // No upstream, so no FANOUT_UPSTREAM_* address for the app.
    let app = &pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gateway")
        .unwrap();
    assert!(
        !app["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"].as_str().unwrap().starts_with("FANOUT_UPSTREAM_")),
        "{app}"
    );

    // With upstreams too, both are rendered; a port no container declares is a warning.
    let both = review(json!({"fanout.dev/upstreams": "app:50051",
        "fanout.dev/grpc-health": "50051"}));
    let answer = admit(admitter(), &both).await;
    let config = rendered_config(&answer.patched(&both));
    assert_eq!(config["upstreams"].as_array().unwrap().len(), 1);
    assert_eq!(config["grpc_health"]["port"], 50051);
    assert_eq!(config["grpc_health"]["service"], "");
    assert!(
        answer
            .warnings()
            .iter()
            .any(|w| w.contains("fanout.dev/grpc-health names port 50051, which no container")),
        "{:?}",
        answer.warnings()
    );
}

#[tokio::test]
async fn malformed_grpc_health_annotations_are_denied_by_name() {
    for (value, why) in [
        ("grpc", "the port is a number"),
        ("0", "the port is a number"),
        ("70000", "the port is a number"),
        ("15020", "admin port"),
        ("8080/", "a service name"),
        ("8080/shop cart", "a service name"),
    ] {
        let bad = review(json!({"fanout.dev/grpc-health": value}));
        let message = denial(&admit(admitter(), &bad).await);
        assert!(
            message.contains(&format!("annotation fanout.dev/grpc-health: {value:?}"))
                && message.contains(why),
            "{value}: {message}"
        );
    }
    let clash = review(json!({"fanout.dev/upstreams": "app:50051",
        "fanout.dev/grpc-health": "15001"}));
    let message = denial(&admit(admitter(), &clash).await);
    assert!(
        message.contains("port 15001 is where the proxy listens for upstream \"app:50051\""),
        "{message}"
    );
}
