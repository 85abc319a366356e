//! `fanout-webhook serve --cert-mode auto`, configured as the chart configures it, against a
//! Kubernetes API reached through a kubeconfig: it creates its certificate Secret, sets the
//! caBundle, answers reviews to a client that trusts only that caBundle, and serves a certificate
//! another replica renewed without a restart.

#[path = "../../webhook/tests/common/fake_api.rs"]
#[allow(dead_code)]
mod fake_api;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use base64::Engine;
use fake_api::{FakeApi, NAMESPACE, SECRET, WEBHOOK};
use fanout_e2e::fixtures;
use fanout_e2e::https::Connection;
use fanout_e2e::webhook::{WebhookProcess, kubeconfig};

/// The name the API server dials for the chart's Service.
const DIALED: &str = "fanout-webhook.fanout-system.svc";

/// `api` over plain HTTP on loopback.
async fn serve(api: FakeApi) -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: axum::http::HeaderMap, body: Bytes| {
            let api = api.clone();
            async move {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let (code, value) = api.handle(&method, uri.path(), &content_type, &body).await;
                (StatusCode::from_u16(code).unwrap(), axum::Json(value))
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The environment the chart gives the webhook, for an API reached through `kubeconfig`.
fn chart_env(kubeconfig: &str) -> Vec<(&str, &str)> {
    vec![
        ("KUBECONFIG", kubeconfig),
        ("FANOUT_CERT_MODE", "auto"),
        ("FANOUT_NAMESPACE", NAMESPACE),
        ("FANOUT_SERVICE", "fanout-webhook"),
        ("FANOUT_CERT_SECRET", SECRET),
        ("FANOUT_WEBHOOK_CONFIGURATION", WEBHOOK),
        ("FANOUT_CERT_CHECK_INTERVAL", "200ms"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_certificates_are_created_trusted_and_renewed_without_a_restart() {
    let api = FakeApi::with_webhook_configuration();
    let addr = serve(api.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), addr);
    let mut webhook = WebhookProcess::start_with(&[], &chart_env(&config)).unwrap();

    // By the time it listens, the Secret holds its certificate and every webhook trusts the CA.
    let data = api.secret_data();
    let ca_bundle = api.webhook_configuration()["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap())
        .expect("caBundle set");
    assert_eq!(ca_bundle, data["ca.crt"].as_bytes());

    // A client that trusts only the caBundle, dialling the Service name, gets answers.
    let mut connection = Connection::open(webhook.addr, DIALED, &ca_bundle)
        .await
        .unwrap();
    let (_, review) = &fixtures::reviews()[0];
    let (status, body) = connection.post("/mutate", review.clone()).await.unwrap();
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    let first_cert = connection.server_cert.clone();

    // Another replica renews the serving certificate under the same CA; this one serves it
    // within a few check intervals, without restarting.
    let ca = fanout_certs::Ca::from_pem(&data["ca.crt"], &data["ca.key"]).unwrap();
    let names = fanout_certs::service_dns_names("fanout-webhook", NAMESPACE, "cluster.local");
    let renewed = ca
        .issue_serving(&names, &[], Duration::from_secs(365 * 86400))
        .unwrap();
    let mut updated = data.clone();
    updated.insert("tls.crt".into(), renewed.cert_pem.clone());
    updated.insert("tls.key".into(), renewed.key_pem);
    api.put_secret(&updated);
    let pid = webhook.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = Connection::open(webhook.addr, DIALED, &ca_bundle)
            .await
            .unwrap();
        if fresh.server_cert != first_cert {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(webhook.is_running());
    assert_eq!(webhook.pid(), pid);
    // It did not write over the other replica's certificate.
    assert_eq!(api.secret_data()["tls.crt"], renewed.cert_pem);
}

/// Helm creates the webhook configuration after the Deployment: a webhook that starts first
/// writes nothing, waits, and serves once the configuration is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_starting_before_its_configuration_waits_for_it() {
    let api = FakeApi::default();
    let addr = serve(api.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(dir.path(), addr);
    let starting =
        tokio::task::spawn_blocking(move || WebhookProcess::start_with(&[], &chart_env(&config)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !starting.is_finished(),
        "it served without a certificate in place"
    );
    assert!(api.secret().is_none(), "it wrote a Secret with no owner");

    let configuration = FakeApi::with_webhook_configuration().webhook_configuration();
    api.put_object(
        &format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK}"),
        configuration,
    );
    let webhook = starting
        .await
        .unwrap()
        .expect("it started once the configuration existed");
    let ca_bundle = api.secret_data()["ca.crt"].clone();
    let mut connection = Connection::open(webhook.addr, DIALED, ca_bundle.as_bytes())
        .await
        .unwrap();
    let (_, review) = &fixtures::reviews()[0];
    assert_eq!(
        connection.post("/mutate", review.clone()).await.unwrap().0,
        200
    );
}
