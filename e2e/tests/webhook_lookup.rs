//! `fanout-webhook serve` with Service lookups, against a fake Kubernetes API reached through
//! a kubeconfig, as `kubectl` and the in-cluster client reach a real one: the API server
//! version decides native sidecars, and Services decide ports.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use base64::Engine;
use fanout_certs::{Ca, service_dns_names, write_bundle};
use fanout_e2e::fixtures;
use fanout_e2e::https::Connection;
use fanout_e2e::webhook::{WebhookProcess, kubeconfig};
use serde_json::{Value, json};

type Seen = Arc<Mutex<Vec<String>>>;

/// A Kubernetes API on loopback: version `1.<minor>`, one headless Service `shop/app`.
async fn fake_api(minor: &'static str, seen: Seen) -> std::net::SocketAddr {
    async fn version(State((minor, seen)): State<(&'static str, Seen)>) -> Json<Value> {
        seen.lock().unwrap().push("/version".into());
        Json(
            json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.0"),
            "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""}),
        )
    }
    async fn service(
        State((_, seen)): State<(&'static str, Seen)>,
        Path((namespace, name)): Path<(String, String)>,
    ) -> (StatusCode, Json<Value>) {
        seen.lock().unwrap().push(format!("{namespace}/{name}"));
        if (namespace.as_str(), name.as_str()) == ("shop", "app") {
            return (
                StatusCode::OK,
                Json(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "app", "namespace": "shop"},
                    "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 50051, "targetPort": 8080}]}
                })),
            );
        }
        (
            StatusCode::NOT_FOUND,
            Json(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
            ),
        )
    }
    let app = axum::Router::new()
        .route("/version", get(version))
        .route(
            "/api/v1/namespaces/{namespace}/services/{name}",
            get(service),
        )
        .with_state((minor, seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Needs a multi-thread runtime: `WebhookProcess::start` blocks while the webhook asks the fake
/// API, which runs on this runtime, its version.
async fn start(minor: &'static str) -> (WebhookProcess, Connection, Seen, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("ca", Duration::from_secs(3600)).unwrap();
    let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    write_bundle(
        dir.path(),
        &ca,
        &ca.issue_serving(&names, &[ip], Duration::from_secs(3600))
            .unwrap(),
    )
    .unwrap();
    let seen = Seen::default();
    let api = fake_api(minor, seen.clone()).await;
    let config = kubeconfig(dir.path(), api);
    let server = WebhookProcess::start(dir.path(), &[], &[("KUBECONFIG", &config)]).unwrap();
    let conn = Connection::open(
        server.addr,
        "fanout-webhook.fanout-system.svc",
        ca.cert_pem().as_bytes(),
    )
    .await
    .unwrap();
    (server, conn, seen, dir)
}

async fn patched_pod(conn: &mut Connection, fixture: &str) -> (Value, Value) {
    let body = fixtures::reviews()
        .into_iter()
        .find(|(n, _)| n == fixture)
        .unwrap()
        .1;
    let request: Value = serde_json::from_slice(&body).unwrap();
    let (status, response) = conn.post("/mutate?timeout=5s", body).await.unwrap();
    assert_eq!(status, 200);
    let response: Value = serde_json::from_slice(&response).unwrap();
    let response = response["response"].clone();
    assert_eq!(response["allowed"], true, "{response}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    (pod, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_1_29_gets_native_sidecars_and_named_ports_resolve() {
    let (_server, mut conn, seen, _dir) = start("29").await;
    let (pod, _) = patched_pod(&mut conn, "pod-generatename-no-volumes").await;
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "fanout-proxy");
    assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");

    let (pod, response) = patched_pod(&mut conn, "pod-restricted-namespace").await;
    assert!(response.get("warnings").is_none(), "{response}");
    let config = pod["metadata"]["annotations"]["fanout.dev/proxy-config"]
        .as_str()
        .unwrap();
    let config = fanout_proxy_config::ProxyConfig::from_json(config).unwrap();
    let fanout_proxy_config::Discovery::Dns(dns) = &config.upstreams[0].discovery else {
        panic!()
    };
    // Service port "grpc" is 50051 on the Service, 8080 on the pods the proxy dials.
    assert_eq!(dns.port, 8080);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], "/version", "asked once at start: {seen:?}");
    assert!(seen.contains(&"shop/app".to_string()), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_1_28_gets_a_first_container_and_missing_services_warn() {
    let (_server, mut conn, _seen, _dir) = start("28").await;
    let (pod, response) = patched_pod(&mut conn, "pod-native-sidecar-two-upstreams").await;
    // This pod already runs a native sidecar, which shows the cluster supports them.
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "fanout-proxy");
    let warnings = response["warnings"].as_array().unwrap();
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("payments/billing not found"),
        "{warnings:?}"
    );

    let (pod, _) = patched_pod(&mut conn, "pod-generatename-no-volumes").await;
    assert_eq!(pod["spec"]["containers"][0]["name"], "fanout-proxy");
    assert!(pod["spec"]["containers"][0]["lifecycle"]["postStart"].is_object());
}
