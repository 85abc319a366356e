//! The admin server on `0.0.0.0:15020`: `/live`; `/ready/proxy` (the proxy can serve: what
//! the injected readiness probe asks by default); `/ready` (and every upstream has a ready
//! endpoint); `/grpc-health` (the pod's own gRPC server, for HTTP health checkers);
//! `/metrics`; `/endpoints`; and `POST /shutdown` from loopback peers only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::grpc_health::AppHealth;
use crate::metrics::{AnnotationLabels, DiscoverySourceLabels, EndpointStateLabels, Metrics};
use crate::service_config::Annotation;
use crate::upstream::Upstream;
use fanout_proxy_config::policy::Policy;
use fanout_proxy_config::service_config::ServiceConfig;

pub struct Admin {
    /// Replaced when a config reload changes the upstreams.
    pub upstreams: RwLock<Vec<Arc<Upstream>>>,
    pub metrics: Arc<Metrics>,
    /// Notified by `POST /shutdown`.
    pub shutdown: Arc<Notify>,
    /// `GET /grpc-health`, when the config asks for it; replaced by a config reload.
    pub grpc_health: RwLock<Option<Arc<AppHealth>>>,
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

/// 200 when nothing is `not_ready`, else 503 with the reasons as JSON.
fn readiness(not_ready: Vec<serde_json::Value>) -> Response<Full<Bytes>> {
    if not_ready.is_empty() {
        reply(StatusCode::OK, "application/json", "{\"ready\":true}\n")
    } else {
        let body = serde_json::to_vec(&json!({"ready": false, "not_ready": not_ready}))
            .unwrap_or_default();
        reply(StatusCode::SERVICE_UNAVAILABLE, "application/json", body)
    }
}

impl Admin {
    fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn handle(
        &self,
        request: &Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n"),
            (&Method::GET, "/ready") => self.ready(),
            (&Method::GET, "/ready/proxy") => self.proxy_ready(),
            (&Method::GET, "/grpc-health") => self.grpc_health().await,
            (&Method::GET, "/metrics") => {
                self.update_gauges();
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.encode(),
                )
            }
            (&Method::GET, "/endpoints") => {
                let upstreams: Vec<_> = self.upstreams().iter().map(|u| u.state_json()).collect();
                let body = serde_json::to_vec_pretty(&json!({ "upstreams": upstreams }))
                    .unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            (&Method::POST, "/shutdown") if peer.ip().is_loopback() => {
                tracing::info!(%peer, "shutdown requested");
                self.shutdown.notify_one();
                reply(StatusCode::ACCEPTED, "text/plain", "draining\n")
            }
            (_, "/shutdown") => reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "only POST from loopback\n",
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }

    /// 200 once the proxy can serve: its config is loaded and its listeners bound (it would not
    /// answer otherwise), and every upstream's discovery has answered once or had long enough.
    /// A pod's readiness says whether it can serve, not whether its upstreams are up: an
    /// outage of an upstream must not make its callers NotReady too.
    fn proxy_ready(&self) -> Response<Full<Bytes>> {
        let waiting: Vec<_> = self
            .upstreams()
            .iter()
            .filter(|u| !u.first_discovery_settled())
            .map(
                |u| json!({"upstream": &*u.name, "reason": "waiting for a first discovery answer"}),
            )
            .collect();
        readiness(waiting)
    }

    async fn grpc_health(&self) -> Response<Full<Bytes>> {
        let health = self
            .grpc_health
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match health {
            Some(health) => {
                let answer = health.answer().await;
                let mut body = serde_json::to_vec(&answer.body).unwrap_or_default();
                body.push(b'\n');
                reply(answer.status, "application/json", body)
            }
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "grpc-health is not configured (pod annotation fanout.dev/grpc-health)\n",
            ),
        }
    }

    /// 200 when every upstream has a ready endpoint, else 503 with the reasons as JSON.
    fn ready(&self) -> Response<Full<Bytes>> {
        let not_ready: Vec<_> = self
            .upstreams()
            .iter()
            .filter_map(|u| {
                u.not_ready_reason()
                    .map(|reason| json!({"upstream": &*u.name, "reason": reason}))
            })
            .collect();
        readiness(not_ready)
    }

    fn update_gauges(&self) {
        for upstream in &self.upstreams() {
            let status = upstream.discovery_status();
            for source in ["endpoints", "dns", "srv", "static"] {
                self.metrics
                    .discovery_source
                    .get_or_create(&DiscoverySourceLabels {
                        upstream: upstream.name.to_string(),
                        source,
                    })
                    .set(i64::from(status.source == source));
            }
            for (annotation, rejected) in [
                (ServiceConfig::NAME, upstream.service_config.is_rejected()),
                (Policy::NAME, upstream.policy.is_rejected()),
            ] {
                self.metrics
                    .annotation_rejected
                    .get_or_create(&AnnotationLabels {
                        upstream: upstream.name.to_string(),
                        annotation,
                    })
                    .set(i64::from(rejected));
            }
            for (state, count) in upstream.state_counts() {
                self.metrics
                    .endpoints
                    .get_or_create(&EndpointStateLabels {
                        upstream: upstream.name.to_string(),
                        state,
                    })
                    .set(count);
            }
        }
    }
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(&request, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
