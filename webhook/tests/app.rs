//! The router driven with `oneshot`: status codes and bodies a client (the API server) sees.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Answer, admitter, fixture};
use fanout_webhook::admission::Admitter;
use fanout_webhook::server::{BODY_LIMIT, app};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

async fn post(body: impl Into<Body>) -> (StatusCode, Vec<u8>) {
    post_to(admitter(), body).await
}

async fn post_to(admitter: Admitter, body: impl Into<Body>) -> (StatusCode, Vec<u8>) {
    let app = app(Arc::new(admitter));
    let request = Request::post("/mutate?timeout=5s")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[tokio::test]
async fn fixture_review_is_answered_with_a_patch() {
    let review = fixture("pod-generatename-no-volumes");
    let (status, body) = post(serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let answer = Answer::parse(&body);
    assert!(answer.allowed());
    assert!(answer.patch.is_some());
}

#[tokio::test]
async fn bodies_that_are_not_reviews_get_400_with_a_message() {
    for (body, expected) in [
        ("", "body is not an AdmissionReview"),
        ("{", "body is not an AdmissionReview"),
        ("[1,2]", "body is not an AdmissionReview"),
        (
            r#"{"apiVersion":"v1","kind":"Pod"}"#,
            "expected apiVersion admission.k8s.io/v1",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
            "expected apiVersion",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "has no request",
        ),
    ] {
        let (status, response) = post(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            text(&response).contains(expected),
            "{body}: {}",
            text(&response)
        );
    }
}

#[tokio::test]
async fn a_pod_object_that_is_not_a_pod_is_400() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["spec"]["containers"] = json!("not a list");
    let (status, body) = post(serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text(&body).contains("request.object is not a valid Pod"),
        "{}",
        text(&body)
    );
}

#[tokio::test]
async fn reviews_of_other_kinds_and_operations_are_allowed_unchanged() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
    assert!(answer.allowed() && answer.patch.is_none());

    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["operation"] = json!("UPDATE");
    let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
    assert!(answer.allowed() && answer.patch.is_none());
}

#[tokio::test]
async fn malformed_annotation_is_denied_naming_it() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/upstreams"] =
        json!("app:0,billing.payments");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/proxy-memory-limit"] =
        json!("lots");
    let (status, body) = post(serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a denial is a normal review response"
    );
    let answer = Answer::parse(&body);
    assert!(!answer.allowed());
    assert!(answer.patch.is_none());
    assert_eq!(answer.response["uid"], review["request"]["uid"]);
    assert_eq!(answer.response["status"]["code"], 400);
    let message = answer.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("annotation fanout.dev/upstreams is invalid"),
        "{message}"
    );
    assert!(
        message.contains("\"app:0\": 0 is out of range 1-65535"),
        "{message}"
    );
    assert!(
        message.contains("\"billing.payments\" has no port"),
        "{message}"
    );
    assert!(
        message.contains("annotation fanout.dev/proxy-memory-limit: \"lots\""),
        "{message}"
    );
}

#[tokio::test]
async fn one_service_named_twice_is_denied_rather_than_a_config_the_proxy_refuses() {
    let mut review = fixture("pod-generatename-no-volumes");
    let namespace = review["request"]["namespace"].as_str().unwrap().to_string();
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/upstreams"] =
        json!(format!("app:50051,app.{namespace}:9000"));
    let (_, body) = post(serde_json::to_vec(&review).unwrap()).await;
    let answer = Answer::parse(&body);
    assert!(!answer.allowed());
    let message = answer.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "\"app:50051\" and \"app.{namespace}:9000\" both name Service app.{namespace}"
        )),
        "{message}"
    );
}

#[tokio::test]
async fn bad_opt_out_and_native_sidecar_values_are_denied() {
    for (key, value) in [
        ("fanout.dev/inject", "no"),
        ("fanout.dev/native-sidecar", "yes"),
        ("fanout.dev/health-check", "http"),
        ("fanout.dev/health-check", "grpc:"),
        ("fanout.dev/health-check", "grpc:shop v1"),
    ] {
        let mut review = fixture("pod-generatename-no-volumes");
        review["request"]["object"]["metadata"]["annotations"][key] = json!(value);
        let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
        assert!(!answer.allowed(), "{key}={value}");
        let message = answer.response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("annotation {key}: \"{value}\"")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn native_sidecar_annotation_overrides_the_cluster() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/native-sidecar"] =
        json!("true");
    let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
    let pod = answer.patched(&review);
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "fanout-proxy");
    assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");

    let mut review = fixture("pod-native-sidecar-two-upstreams");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/native-sidecar"] =
        json!("false");
    let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
    let pod = answer.patched(&review);
    assert_eq!(pod["spec"]["containers"][0]["name"], "fanout-proxy");
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "log-shipper");
}

#[tokio::test]
async fn health_check_annotation_turns_on_checks_for_every_upstream() {
    // The config the proxy will read: the patched pod's annotation, as the downward API
    // projects it.
    fn rendered(pod: &serde_json::Value) -> fanout_proxy_config::ProxyConfig {
        let text = pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
            .as_str()
            .unwrap();
        fanout_proxy_config::ProxyConfig::from_json(text).unwrap()
    }
    let mut review = fixture("pod-native-sidecar-two-upstreams");
    review["request"]["object"]["metadata"]["annotations"]["fanout.dev/health-check"] =
        json!("grpc:shop.v1.Cart");
    let pod = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1).patched(&review);
    let config = rendered(&pod);
    assert_eq!(config.upstreams.len(), 2);
    for upstream in &config.upstreams {
        let check = upstream.health_check.as_ref().expect("health checks on");
        assert_eq!(check.service, "shop.v1.Cart");
    }

    for value in ["grpc", "disabled"] {
        review["request"]["object"]["metadata"]["annotations"]["fanout.dev/health-check"] =
            json!(value);
        let pod =
            Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1).patched(&review);
        let config = rendered(&pod);
        let services: Vec<Option<&str>> = config
            .upstreams
            .iter()
            .map(|u| u.health_check.as_ref().map(|c| c.service.as_str()))
            .collect();
        let expected = if value == "grpc" { Some("") } else { None };
        assert_eq!(services, [expected, expected], "{value}");
    }
}

#[tokio::test]
async fn the_proxy_log_level_setting_reaches_the_proxy_and_only_the_proxy() {
    let review = fixture("pod-generatename-no-volumes");
    let body = serde_json::to_vec(&review).unwrap();
    let mut admitter = admitter();
    admitter.settings.proxy_log_level = Some("fanout_proxy=debug".into());
    let pod = Answer::parse(&post_to(admitter, body.clone()).await.1).patched(&review);
    assert_eq!(pod["spec"]["containers"][0]["name"], "fanout-proxy");
    assert_eq!(
        pod["spec"]["containers"][0]["env"],
        json!([{"name": "FANOUT_LOG", "value": "fanout_proxy=debug"}])
    );
    assert!(
        !pod["spec"]["containers"][1]["env"]
            .to_string()
            .contains("FANOUT_LOG")
    );
    // Unset, the proxy keeps its own default.
    let pod = Answer::parse(&post(body).await.1).patched(&review);
    assert!(pod["spec"]["containers"][0].get("env").is_none());
}

#[tokio::test]
async fn app_env_already_set_is_kept() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["spec"]["containers"][0]["env"] =
        json!([{"name": "FANOUT_UPSTREAM_APP", "value": "mine:1"}]);
    let pod = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1).patched(&review);
    assert_eq!(
        pod["spec"]["containers"][1]["env"],
        json!([{"name": "FANOUT_UPSTREAM_APP", "value": "mine:1"}])
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let (status, _) = post(vec![b' '; BODY_LIMIT + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let app = app(Arc::new(admitter()));
    for path in ["/healthz", "/readyz"] {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let review = serde_json::to_vec(&fixture("pod-generatename-no-volumes")).unwrap();
    let request = Request::post("/mutate").body(Body::from(review)).unwrap();
    app.clone().oneshot(request).await.unwrap();
    let response = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let body = text(&response.into_body().collect().await.unwrap().to_bytes());
    assert!(
        body.contains("fanout_webhook_admissions_total{result=\"injected\",reason=\"injected\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("fanout_webhook_admission_duration_seconds_count 1"),
        "{body}"
    );
}

#[tokio::test]
async fn clashes_with_what_fanout_injects_are_denied() {
    let mut review = fixture("pod-generatename-no-volumes");
    review["request"]["object"]["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": 15020, "protocol": "TCP"}]);
    review["request"]["object"]["spec"]["volumes"] =
        json!([{"name": "fanout-config", "emptyDir": {}}]);
    let answer = Answer::parse(&post(serde_json::to_vec(&review).unwrap()).await.1);
    assert!(!answer.allowed());
    let message = answer.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("container \"gateway\" declares port 15020"),
        "{message}"
    );
    assert!(
        message.contains("already has a volume named \"fanout-config\""),
        "{message}"
    );
}
