//! Shared by the webhook's integration tests: the recorded fixtures, the Service catalogue they
//! were recorded against, and response decoding.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use fanout_webhook::admission::Admitter;
use fanout_webhook::lookup::{ServiceInfo, ServiceLookup, ServicePort, StaticLookup, TargetPort};
use fanout_webhook::metrics::Metrics;
use fanout_webhook::settings::Settings;
use serde_json::Value;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission")
}

/// `(name, review)` for every recorded AdmissionReview.
pub fn fixtures() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            (path.extension()? == "json").then(|| {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&path).unwrap();
                (name, serde_json::from_str(&text).unwrap())
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 7, "every recorded fixture is here");
    out
}

pub fn fixture(name: &str) -> Value {
    fixtures().into_iter().find(|(n, _)| n == name).unwrap().1
}

/// The cluster the fixtures stand in: `shop/app` is headless with port `grpc` = 50051;
/// `payments/billing` does not exist yet.
pub fn catalogue() -> StaticLookup {
    StaticLookup::default().with(
        "shop",
        "app",
        ServiceInfo {
            headless: true,
            cluster_ip: Some("None".into()),
            ports: vec![ServicePort {
                name: Some("grpc".into()),
                port: 50051,
                target: TargetPort::Same,
            }],
            service_config: None,
            policy: None,
        },
    )
}

/// Settings as on the recording API server (v1.28: no native sidecars by version).
pub fn settings() -> Settings {
    Settings {
        proxy_image: "fanout/fanout-proxy:test".into(),
        version: "test".into(),
        ..Settings::default()
    }
}

pub fn admitter_with(lookup: Arc<dyn ServiceLookup>) -> Admitter {
    Admitter {
        settings: settings(),
        lookup,
        metrics: Arc::new(Metrics::default()),
    }
}

pub fn admitter() -> Admitter {
    admitter_with(Arc::new(catalogue()))
}

/// The `response` of an AdmissionReview body, with the patch decoded.
pub struct Answer {
    pub response: Value,
    pub patch: Option<json_patch::Patch>,
}

impl Answer {
    pub fn parse(body: &[u8]) -> Self {
        let review: Value = serde_json::from_slice(body).expect("response is JSON");
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let response = review["response"].clone();
        let patch = response.get("patch").map(|p| {
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p.as_str().expect("patch is a base64 string"))
                .unwrap();
            serde_json::from_slice(&bytes).expect("patch is a JSON patch")
        });
        Self { response, patch }
    }

    pub fn allowed(&self) -> bool {
        self.response["allowed"] == true
    }

    pub fn warnings(&self) -> Vec<String> {
        self.response
            .get("warnings")
            .and_then(Value::as_array)
            .map(|w| w.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    /// The pod the API server would store: the request object with the patch applied.
    pub fn patched(&self, review: &Value) -> Value {
        let mut pod = review["request"]["object"].clone();
        if let Some(patch) = &self.patch {
            json_patch::patch(&mut pod, patch).expect("patch applies to the request object");
        }
        pod
    }
}
