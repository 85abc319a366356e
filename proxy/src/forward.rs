//! The data path: one h2c listener per upstream; every stream is forwarded whole to one
//! endpoint — headers, data under HTTP/2 flow control, trailers, resets both ways.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::body::{ResponseBody, StreamGuard};
use crate::grpc;
use crate::metrics::Metrics;
use crate::upstream::{Activity, Upstream};
use prometheus_client::metrics::histogram::Histogram;

/// Added to the deadline passed upstream; see [`Forwarder::forward`].
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// What every stream of one upstream needs.
pub struct Forwarder {
    /// Swapped when a config reload changes the upstream; streams in flight keep the old one.
    upstream: RwLock<Arc<Upstream>>,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
    duration: Histogram,
}

/// Serves h2c on `listener` until the process ends.
pub async fn serve(listener: TcpListener, forwarder: Arc<Forwarder>) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(crate::endpoint::STREAM_WINDOW)
        .initial_connection_window_size(crate::endpoint::CONNECTION_WINDOW)
        .max_concurrent_streams(10_000)
        .keep_alive_interval(Duration::from_secs(20));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let forwarder = forwarder.clone();
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let forwarder = forwarder.clone();
                async move { Ok::<_, Infallible>(forwarder.forward(request).await) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
}

impl Forwarder {
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New streams go to `upstream` from now on.
    pub fn replace_upstream(&self, upstream: Arc<Upstream>) {
        *self.upstream.write().unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    pub fn new(upstream: Arc<Upstream>, metrics: Arc<Metrics>, activity: Arc<Activity>) -> Self {
        let duration = metrics.duration_histogram(&upstream.name);
        Self {
            upstream: RwLock::new(upstream),
            metrics,
            activity,
            duration,
        }
    }

    fn unavailable(&self, upstream: &Upstream, message: &str) -> Response<ResponseBody> {
        self.metrics.record_request(
            &upstream.name,
            "none",
            Some(grpc::UNAVAILABLE),
            Duration::ZERO,
        );
        grpc::trailers_only(grpc::UNAVAILABLE, message)
    }

    pub async fn forward(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let upstream = self.upstream();
        let arrived = Instant::now();
        // The client's deadline, capped by the upstream's own request timeout if it has one.
        let timeout = match (
            grpc::parse_timeout(request.headers()),
            upstream.config.timeouts.request,
        ) {
            (Some(client), Some(limit)) => Some(client.min(limit)),
            (client, limit) => client.or(limit),
        };
        let deadline = timeout.map(|t| arrived + t);
        let connect_wait = upstream.config.timeouts.connect;
        let wait = deadline.map_or(connect_wait, |d| {
            connect_wait.min(d.saturating_duration_since(arrived))
        });
        let Some(mut endpoint) = upstream.pick(wait).await else {
            let reason = upstream
                .not_ready_reason()
                .unwrap_or_else(|| "no endpoint is ready".into());
            return self.unavailable(
                &upstream,
                &format!("fanout: upstream {}: {reason}", upstream.name),
            );
        };

        let (mut parts, body) = request.into_parts();
        parts.uri = upstream_uri(&parts.uri, parts.headers.get(http::header::HOST));
        if let Some(deadline) = deadline {
            // The proxy enforces the deadline itself (and cancels upstream when it passes); the
            // backend gets a little longer so that the client reliably sees DEADLINE_EXCEEDED
            // rather than whatever a backend answers when its own timer fires at the same time.
            let upstream_timeout =
                deadline.saturating_duration_since(Instant::now()) + DEADLINE_SLACK;
            parts
                .headers
                .insert("grpc-timeout", grpc::format_timeout(upstream_timeout));
        }
        let mut request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());

        // A stream the connection never took (it was closing) provably was not processed: it
        // goes to another endpoint, once per endpoint, at most a few times.
        for attempt in 0..3 {
            let Some(mut sender) = endpoint.sender() else {
                match upstream.pick_other(&endpoint) {
                    Some(other) => {
                        endpoint = other;
                        continue;
                    }
                    None => break,
                }
            };
            let mut guard = StreamGuard::new(
                endpoint.clone(),
                upstream.clone(),
                self.metrics.clone(),
                self.duration.clone(),
                self.activity.clone(),
            );
            guard.started = arrived;
            let sent = Instant::now();
            let response = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, sender.try_send_request(request)).await
                    {
                        Ok(result) => result,
                        Err(_) => {
                            guard.status = Some(grpc::DEADLINE_EXCEEDED);
                            return grpc::trailers_only(
                                grpc::DEADLINE_EXCEEDED,
                                "fanout: deadline exceeded",
                            );
                        }
                    }
                }
                None => sender.try_send_request(request).await,
            };
            match response {
                Ok(response) => {
                    endpoint.observe_rtt(sent.elapsed());
                    let (parts, body) = response.into_parts();
                    // Trailers-Only: the status is in the headers and there is no body.
                    guard.status = grpc::status_of(&parts.headers);
                    return Response::from_parts(
                        parts,
                        ResponseBody::proxied(body, guard, deadline),
                    );
                }
                Err(mut error) => {
                    let message = format!(
                        "fanout: upstream {} endpoint {}: {}",
                        upstream.name,
                        endpoint.addr,
                        error.error()
                    );
                    match error.take_message() {
                        Some(unsent) if attempt < 2 => {
                            drop(guard);
                            self.metrics.record_retry(&upstream.name);
                            request = unsent;
                            if let Some(other) = upstream.pick_other(&endpoint) {
                                endpoint = other;
                            }
                        }
                        _ => {
                            guard.status = Some(grpc::UNAVAILABLE);
                            return grpc::trailers_only(grpc::UNAVAILABLE, &message);
                        }
                    }
                }
            }
        }
        self.unavailable(
            &upstream,
            &format!(
                "fanout: upstream {}: no endpoint took the call",
                upstream.name
            ),
        )
    }
}

/// An absolute URI for the upstream request: the path as sent, http, and the client's
/// authority (gRPC clients name the service they dial; backends may route on it).
fn upstream_uri(uri: &Uri, host: Option<&http::HeaderValue>) -> Uri {
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = host
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
            .or_else(|| Some(Authority::from_static("fanout")));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}
