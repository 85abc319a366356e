//! AdmissionReview v1 in, AdmissionReview v1 out. Anything that is not a review is a
//! [`BadReview`] (HTTP 400); a review of anything but a pod CREATE is allowed unchanged.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::inject::{self, Outcome};
use crate::lookup::ServiceLookup;
use crate::metrics::Metrics;
use crate::settings::Settings;

const API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: GroupVersionKind,
    namespace: Option<String>,
    name: Option<String>,
    operation: Option<String>,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewResponse {
    api_version: &'static str,
    kind: &'static str,
    response: Response,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Base64 of the JSON patch, as Kubernetes encodes `[]byte`.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
}

#[derive(Serialize)]
struct Status {
    code: u16,
    message: String,
    reason: &'static str,
}

/// The request body is not an AdmissionReview v1 the webhook can answer.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("body is not an AdmissionReview: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("expected apiVersion {API_VERSION} kind AdmissionReview, got {0}")]
    WrongType(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview for a pod CREATE has no request.object")]
    NoObject,
    #[error(transparent)]
    NotAPod(#[from] inject::NotAPod),
}

impl BadReview {
    fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) | Self::WrongType(_) | Self::NoRequest => "bad-review",
            Self::NoObject | Self::NotAPod(_) => "bad-pod",
        }
    }
}

/// Answers reviews; shared by every connection.
pub struct Admitter {
    pub settings: Settings,
    pub lookup: Arc<dyn ServiceLookup>,
    pub metrics: Arc<Metrics>,
}

impl Admitter {
    /// The response body for a request body.
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, BadReview> {
        let started = Instant::now();
        let result = self.answer(body).await;
        let (result_label, reason) = match &result {
            Ok((_, labels)) => *labels,
            Err(e) => ("error", e.reason()),
        };
        self.metrics.record(result_label, reason, started.elapsed());
        result.map(|(response, _)| {
            serde_json::to_vec(&ReviewResponse {
                api_version: API_VERSION,
                kind: "AdmissionReview",
                response,
            })
            .expect("responses are plain data")
        })
    }

    async fn answer(
        &self,
        body: &[u8],
    ) -> Result<(Response, (&'static str, &'static str)), BadReview> {
        let review: Review = serde_json::from_slice(body).map_err(BadReview::NotJson)?;
        let (api_version, kind) = (
            review.api_version.unwrap_or_default(),
            review.kind.unwrap_or_default(),
        );
        if api_version != API_VERSION || kind != "AdmissionReview" {
            return Err(BadReview::WrongType(format!("{api_version:?} {kind:?}")));
        }
        let request = review.request.ok_or(BadReview::NoRequest)?;
        let allow = |uid: String| Response {
            uid,
            allowed: true,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
            status: None,
        };
        if !request.kind.group.is_empty() || request.kind.kind != "Pod" {
            return Ok((allow(request.uid), ("skipped", "not-a-pod")));
        }
        if request.operation.as_deref() != Some("CREATE") {
            return Ok((allow(request.uid), ("skipped", "not-create")));
        }
        let object = request.object.ok_or(BadReview::NoObject)?;
        let namespace = request
            .namespace
            .as_deref()
            .or_else(|| {
                object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
            })
            .unwrap_or("default")
            .to_string();
        let pod_name = request
            .name
            .or_else(|| {
                object
                    .pointer("/metadata/generateName")
                    .and_then(Value::as_str)
                    .map(|g| format!("{g}*"))
            })
            .unwrap_or_default();
        let outcome =
            inject::inject(&object, &namespace, &self.settings, self.lookup.as_ref()).await?;
        Ok(match outcome {
            Outcome::Skipped(reason) => {
                tracing::info!(uid = %request.uid, %namespace, pod = %pod_name,
                    reason = reason.as_str(), "not injected: {}", reason.describe());
                (allow(request.uid), ("skipped", reason.as_str()))
            }
            Outcome::Denied(denial) => {
                tracing::info!(uid = %request.uid, %namespace, pod = %pod_name,
                    reason = denial.reason.as_str(), "denied: {}", denial.message);
                let response = Response {
                    allowed: false,
                    status: Some(Status {
                        code: 400,
                        message: denial.message,
                        reason: "BadRequest",
                    }),
                    ..allow(request.uid)
                };
                (response, ("denied", denial.reason.as_str()))
            }
            Outcome::Injected(injection) => {
                let patch = serde_json::to_vec(&injection.patch).expect("patches are plain data");
                tracing::info!(uid = %request.uid, %namespace, pod = %pod_name,
                    upstreams = injection.config.upstreams.len(),
                    native_sidecar = injection.native_sidecar,
                    warnings = injection.warnings.len(), "injected");
                let response = Response {
                    patch_type: Some("JSONPatch"),
                    patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
                    warnings: injection.warnings,
                    ..allow(request.uid)
                };
                (response, ("injected", "injected"))
            }
        })
    }
}
