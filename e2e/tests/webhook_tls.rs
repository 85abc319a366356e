//! `fanout-webhook serve` as the API server meets it: HTTPS with a certificate from
//! `fanout-certs`, every recorded review answered, the certificate rotated without a restart.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use fanout_certs::{Ca, service_dns_names, write_bundle};
use fanout_e2e::fixtures;
use fanout_e2e::https::Connection;
use fanout_e2e::webhook::WebhookProcess;
use serde_json::Value;

const SERVER_NAME: &str = "fanout-webhook.fanout-system.svc";

/// Writes a fresh CA and serving cert into `dir`; returns the CA PEM.
fn issue(dir: &Path, ca_name: &str) -> Vec<u8> {
    let ca = Ca::generate(ca_name, Duration::from_secs(3600)).unwrap();
    let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let serving = ca
        .issue_serving(&names, &[ip], Duration::from_secs(3600))
        .unwrap();
    write_bundle(dir, &ca, &serving).unwrap();
    ca.cert_pem().as_bytes().to_vec()
}

fn decode_patch(response: &Value) -> Option<json_patch::Patch> {
    let text = response["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn serves_every_fixture_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = issue(dir.path(), "ca-1");
    let server = WebhookProcess::start(
        dir.path(),
        &["--no-lookup", "--proxy-image", "fanout/fanout-proxy:e2e"],
        &[],
    )
    .unwrap();
    let mut conn = Connection::open(server.addr, SERVER_NAME, &ca)
        .await
        .unwrap();

    let mut injected = Vec::new();
    for (name, body) in fixtures::reviews() {
        let request: Value = serde_json::from_slice(&body).unwrap();
        // The API server appends the webhook timeout as a query parameter.
        let (status, response) = conn.post("/mutate?timeout=5s", body).await.unwrap();
        assert_eq!(
            status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&response)
        );
        let review: Value = serde_json::from_slice(&response).unwrap();
        let response = &review["response"];
        assert_eq!(response["uid"], request["request"]["uid"], "{name}");
        assert_eq!(response["allowed"], true, "{name}: {response}");
        if let Some(patch) = decode_patch(response) {
            let mut pod = request["request"]["object"].clone();
            json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            let config = pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
                .as_str()
                .unwrap();
            let config = fanout_proxy_config::ProxyConfig::from_json(config).unwrap();
            if name == "pod-restricted-namespace" {
                // Its upstream names port "grpc": with --no-lookup, an SRV lookup.
                match &config.upstreams[0].discovery {
                    fanout_proxy_config::Discovery::Srv(srv) => {
                        assert_eq!(srv.name, "_grpc._tcp.app.shop.svc.cluster.local")
                    }
                    other => panic!("{name}: {other:?}"),
                }
            }
            injected.push(name);
        }
    }
    assert_eq!(
        injected,
        [
            "pod-dry-run",
            "pod-generatename-no-volumes",
            "pod-native-sidecar-two-upstreams",
            "pod-restricted-namespace"
        ]
    );

    let (status, metrics) = conn.request("GET", "/metrics", Vec::new()).await.unwrap();
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .contains("fanout_webhook_admissions_total{result=\"injected\",reason=\"injected\"} 4"),
        "{metrics}"
    );
    let (status, _) = conn.post("/mutate", b"not json".to_vec()).await.unwrap();
    assert_eq!(status, 400);
}

#[tokio::test]
async fn plain_http_and_untrusted_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _ca = issue(dir.path(), "ca-1");
    let server = WebhookProcess::start(dir.path(), &["--no-lookup"], &[]).unwrap();
    let other_ca = Ca::generate("someone else", Duration::from_secs(60)).unwrap();
    assert!(
        Connection::open(server.addr, SERVER_NAME, other_ca.cert_pem().as_bytes())
            .await
            .is_err()
    );
    // Speaking plain HTTP to it gets no HTTP answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[tokio::test]
async fn rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca_1 = issue(dir.path(), "ca-1");
    let mut server = WebhookProcess::start(
        dir.path(),
        &["--no-lookup", "--cert-reload-interval", "100ms"],
        &[],
    )
    .unwrap();
    let pid = server.pid();
    let mut old = Connection::open(server.addr, SERVER_NAME, &ca_1)
        .await
        .unwrap();
    let (_, review) = &fixtures::reviews()[0];
    assert_eq!(old.post("/mutate", review.clone()).await.unwrap().0, 200);

    // Rotate: a new CA and serving cert written over the files, as a Secret update does.
    let ca_2 = issue(dir.path(), "ca-2");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        match Connection::open(server.addr, SERVER_NAME, &ca_2).await {
            Ok(conn) => break conn,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("new certificate never served: {e}"),
        }
    };
    assert_ne!(fresh.server_cert, old.server_cert);
    assert_eq!(fresh.post("/mutate", review.clone()).await.unwrap().0, 200);
    // Same process, and the connection opened before the rotation still works.
    assert!(server.is_running());
    assert_eq!(server.pid(), pid);
    assert_eq!(old.post("/mutate", review.clone()).await.unwrap().0, 200);
    // Clients that trust only the old CA are now refused.
    assert!(
        Connection::open(server.addr, SERVER_NAME, &ca_1)
            .await
            .is_err()
    );

    // A broken file (half-written) keeps the current certificate.
    std::fs::write(
        dir.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nbroken",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut again = Connection::open(server.addr, SERVER_NAME, &ca_2)
        .await
        .unwrap();
    assert_eq!(again.post("/mutate", review.clone()).await.unwrap().0, 200);
}

#[tokio::test]
async fn refuses_to_start_without_a_usable_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "nothing").unwrap();
    std::fs::write(dir.path().join("tls.key"), "nothing").unwrap();
    let err = WebhookProcess::start(dir.path(), &["--no-lookup"], &[])
        .err()
        .expect("must not start");
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
}
