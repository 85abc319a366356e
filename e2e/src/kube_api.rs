//! A stand-in Kubernetes API on loopback for the discovery server: list and watch of Services
//! and EndpointSlices as the API server serves them (a list carries the collection's
//! `resourceVersion`; a watch from it streams one JSON event per line), plus `/version`. Tests
//! change objects while watches are open and count the requests the server makes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn of(object: &Value) -> Self {
        match object["kind"].as_str() {
            Some("Service") => Self::Service,
            Some("EndpointSlice") => Self::EndpointSlice,
            other => panic!("the stand-in API holds Services and EndpointSlices, not {other:?}"),
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Service => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

#[derive(Default)]
struct Store {
    version: u64,
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (resourceVersion, kind, event type, object).
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// `LIST services`, `WATCH endpointslices`, …
    requests: Vec<String>,
    /// Events created (`events.k8s.io/v1`), as posted.
    events: Vec<Value>,
}

#[derive(Clone)]
pub struct KubeApi {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    changed: Arc<watch::Sender<u64>>,
}

fn key(kind: Kind, object: &Value) -> (String, String, String) {
    (
        format!("{kind:?}"),
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .into(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .into(),
    )
}

#[derive(serde::Deserialize)]
struct Params {
    watch: Option<bool>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
}

impl KubeApi {
    pub async fn start() -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        let changed = Arc::new(watch::channel(0).0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = Self {
            addr: listener.local_addr().unwrap(),
            store,
            changed,
        };
        let version = || async {
            axum::Json(json!({"major": "1", "minor": "28", "gitVersion": "v1.28.0",
                "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "",
                "compiler": "", "platform": ""}))
        };
        let app =
            axum::Router::new()
                .route("/version", get(version))
                .route(
                    "/api/v1/services",
                    get(|s: State<KubeApi>, q: Query<Params>| async move {
                        s.0.serve(Kind::Service, q.0)
                    }),
                )
                .route(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    get(|s: State<KubeApi>, q: Query<Params>| async move {
                        s.0.serve(Kind::EndpointSlice, q.0)
                    }),
                )
                .route(
                    "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
                    post(
                        |s: State<KubeApi>, _: Path<String>, body: axum::Json<Value>| async move {
                            let mut event = body.0;
                            let mut store = s.0.store.lock().unwrap();
                            store.version += 1;
                            event["metadata"]["resourceVersion"] = json!(store.version.to_string());
                            store.events.push(event.clone());
                            (StatusCode::CREATED, axum::Json(event))
                        },
                    ),
                )
                .with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        api
    }

    /// Creates or replaces an object (a Service or an EndpointSlice, by its `kind`).
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object);
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        object["apiVersion"] = json!(kind.api_version());
        let event = match store.objects.insert(key(kind, &object), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        store.log.push((version, kind, event, object));
        drop(store);
        self.changed.send_replace(version);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.store.lock().unwrap();
        let key = (format!("{kind:?}"), namespace.to_string(), name.to_string());
        let Some(mut object) = store.objects.remove(&key) else {
            return;
        };
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        store.log.push((version, kind, "DELETED", object));
        drop(store);
        self.changed.send_replace(version);
    }

    /// The requests served so far, as `LIST services` or `WATCH endpointslices`.
    /// The Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.store.lock().unwrap().events.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }

    fn serve(&self, kind: Kind, params: Params) -> Response {
        let resource = match kind {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
        };
        let mut store = self.store.lock().unwrap();
        if params.watch != Some(true) {
            store.requests.push(format!("LIST {resource}"));
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((k, _, _), _)| *k == format!("{kind:?}"))
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": store.version.to_string()}, "items": items});
            return axum::Json(list).into_response();
        }
        store.requests.push(format!("WATCH {resource}"));
        let from: u64 = params
            .resource_version
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        drop(store);
        let (store, changed) = (self.store.clone(), self.changed.subscribe());
        // One line per event after `from`, then every later one, for as long as the client reads.
        let events = futures::stream::unfold(
            (from, store, changed),
            move |(mut seen, store, mut changed)| async move {
                loop {
                    let lines: Vec<u8> = {
                        let store = store.lock().unwrap();
                        let mut lines = Vec::new();
                        for (version, k, event, object) in &store.log {
                            if *version > seen && *k == kind {
                                lines.extend(
                                    serde_json::to_vec(&json!({"type": event, "object": object}))
                                        .unwrap(),
                                );
                                lines.push(b'\n');
                            }
                        }
                        seen = store.version;
                        lines
                    };
                    if !lines.is_empty() {
                        return Some((
                            Ok::<_, Infallible>(Bytes::from(lines)),
                            (seen, store, changed),
                        ));
                    }
                    if changed.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        (StatusCode::OK, Body::from_stream(events)).into_response()
    }
}

/// A Service with `ports` as `(name, port, targetPort)`; `headless` sets `clusterIP: None`.
pub fn service(namespace: &str, name: &str, headless: bool, ports: &[(&str, u16, Value)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port_name, port, target)| {
            json!({"name": port_name, "port": port, "targetPort": target, "protocol": "TCP"})
        })
        .collect();
    json!({
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": if headless { "None" } else { "10.96.0.10" }, "ports": ports},
    })
}

/// One endpoint of a slice: its address and conditions.
#[derive(Clone, Debug)]
pub struct SliceEndpoint {
    pub ip: String,
    pub ready: bool,
    pub terminating: bool,
}

impl SliceEndpoint {
    pub fn ready(ip: impl ToString) -> Self {
        Self {
            ip: ip.to_string(),
            ready: true,
            terminating: false,
        }
    }
}

/// An EndpointSlice of `service` with one port `(name, port)`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    port: (&str, u16),
    endpoints: &[SliceEndpoint],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({"addresses": [e.ip], "conditions": {"ready": e.ready,
                "serving": e.ready || e.terminating, "terminating": e.terminating}})
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}
