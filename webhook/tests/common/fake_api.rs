//! A Kubernetes API in memory for self-managed certificates: Secrets and
//! MutatingWebhookConfigurations with the server's write rules (create refuses an existing name,
//! replace refuses a stale `resourceVersion`, JSON patches with `test` operations), served to
//! kube's real `Client`. It records every write, and can hold the first reads of the Secret until
//! several replicas have all read, to make them race.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::Barrier;

pub const NAMESPACE: &str = "fanout-system";
pub const SECRET: &str = "fanout-webhook-certs";
pub const WEBHOOK: &str = "fanout";
const SECRETS: &str = "/api/v1/namespaces/fanout-system/secrets";
const WEBHOOKS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";

#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Value>,
    version: u64,
    /// `"<METHOD> <path> <status>"` of every write.
    writes: Vec<String>,
    /// Reads of the Secret still to hold at the barrier.
    held_reads: usize,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    barrier: Arc<Mutex<Option<Arc<Barrier>>>>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

impl FakeApi {
    /// An API holding the chart's webhook configuration: two webhooks, no caBundle yet.
    pub fn with_webhook_configuration() -> Self {
        let api = Self::default();
        let webhook = |name: &str| {
            json!({
                "name": name,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "clientConfig": {"service": {"name": "fanout-webhook", "namespace": NAMESPACE,
                                             "path": "/mutate", "port": 443}},
            })
        };
        api.put_object(
            &format!("{WEBHOOKS}/{WEBHOOK}"),
            json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": WEBHOOK, "uid": "0c6a2f7e-uid-of-the-configuration"},
                "webhooks": [webhook("pods.fanout.dev"), webhook("pods-again.fanout.dev")],
            }),
        );
        api
    }

    /// Stores `object` at `path` as if someone had written it before.
    pub fn put_object(&self, path: &str, mut object: Value) {
        let mut store = self.store.lock().unwrap();
        store.version += 1;
        object["metadata"]["resourceVersion"] = json!(store.version.to_string());
        store.objects.insert(path.to_string(), object);
    }

    /// Puts a Secret with `data` (values as text) in place.
    pub fn put_secret(&self, data: &BTreeMap<String, String>) {
        use base64::Engine;
        let data: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        self.put_object(
            &format!("{SECRETS}/{SECRET}"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": SECRET, "namespace": NAMESPACE},
                   "type": "kubernetes.io/tls", "data": data}),
        );
    }

    pub fn secret(&self) -> Option<Value> {
        self.object(&format!("{SECRETS}/{SECRET}"))
    }

    /// The Secret's data, decoded; panics when there is no Secret.
    pub fn secret_data(&self) -> BTreeMap<String, String> {
        use base64::Engine;
        let secret = self.secret().expect("the Secret exists");
        secret["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                (k.clone(), String::from_utf8(bytes).unwrap())
            })
            .collect()
    }

    pub fn webhook_configuration(&self) -> Value {
        self.object(&format!("{WEBHOOKS}/{WEBHOOK}")).unwrap()
    }

    fn object(&self, path: &str) -> Option<Value> {
        self.store.lock().unwrap().objects.get(path).cloned()
    }

    pub fn writes(&self) -> Vec<String> {
        self.store.lock().unwrap().writes.clone()
    }

    /// Holds the answers to the next `replicas` reads of the Secret until all of them have
    /// been read.
    pub fn race_next_reads(&self, replicas: usize) {
        self.store.lock().unwrap().held_reads = replicas;
        *self.barrier.lock().unwrap() = Some(Arc::new(Barrier::new(replicas)));
    }

    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let content_type = parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let (code, value) = api
                    .handle(&parts.method, parts.uri.path(), &content_type, &body)
                    .await;
                let response = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&value).unwrap())))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        kube::Client::new(service, NAMESPACE)
    }

    /// One request: (status code, JSON body). Also what an HTTP front end serves.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        if method == Method::GET && path == format!("{SECRETS}/{SECRET}") {
            let barrier = {
                let mut store = self.store.lock().unwrap();
                if store.held_reads > 0 {
                    store.held_reads -= 1;
                    self.barrier.lock().unwrap().clone()
                } else {
                    None
                }
            };
            // The read is answered as it arrives, and the answer held until every raced read
            // has one: holding the request instead let the first replica, released, create
            // the Secret before the second was read, which then found it (a flake, 2 runs).
            let answer = {
                let mut store = self.store.lock().unwrap();
                Self::apply(&mut store, method, path, content_type, body)
            };
            if let Some(barrier) = barrier {
                barrier.wait().await;
            }
            return answer;
        }
        let mut store = self.store.lock().unwrap();
        let (code, value) = Self::apply(&mut store, method, path, content_type, body);
        if method != Method::GET {
            store.writes.push(format!("{method} {path} {code}"));
        }
        (code, value)
    }

    fn apply(
        store: &mut Store,
        method: &Method,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let Ok(body_json) = (if body.is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_slice::<Value>(body)
        }) else {
            return status(400, "BadRequest", "body is not JSON");
        };
        match *method {
            Method::GET => match store.objects.get(path) {
                Some(object) => (200, object.clone()),
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            Method::POST if path == SECRETS => {
                let name = body_json["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{SECRETS}/{name}");
                if body_json["metadata"]["resourceVersion"].is_string() {
                    return status(
                        500,
                        "InternalError",
                        "resourceVersion should not be set on objects to be created",
                    );
                }
                if store.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("secrets \"{name}\" already exists"),
                    );
                }
                store.version += 1;
                let mut object = body_json;
                object["metadata"]["resourceVersion"] = json!(store.version.to_string());
                store.objects.insert(key, object.clone());
                (201, object)
            }
            Method::PUT => {
                let Some(stored) = store.objects.get(path) else {
                    return status(404, "NotFound", &format!("{path} not found"));
                };
                if body_json["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"]
                {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                store.version += 1;
                let mut object = body_json;
                object["metadata"]["resourceVersion"] = json!(store.version.to_string());
                store.objects.insert(path.to_string(), object.clone());
                (200, object)
            }
            Method::PATCH if content_type == "application/json-patch+json" => {
                let Some(stored) = store.objects.get(path).cloned() else {
                    return status(404, "NotFound", &format!("{path} not found"));
                };
                let Ok(patch) = serde_json::from_value::<json_patch::Patch>(body_json) else {
                    return status(400, "BadRequest", "not a JSON patch");
                };
                let mut object = stored;
                if let Err(e) = json_patch::patch(&mut object, &patch) {
                    return status(422, "Invalid", &e.to_string());
                }
                store.version += 1;
                object["metadata"]["resourceVersion"] = json!(store.version.to_string());
                store.objects.insert(path.to_string(), object.clone());
                (200, object)
            }
            _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}
