//! One call: an endpoint is picked, the stream is opened on it and both directions are moved
//! (headers, data under flow control, trailers, resets); deadlines are enforced; a call that
//! provably was not processed, or that got a Trailers-Only UNAVAILABLE, goes to another
//! endpoint while its whole request body is still at hand.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, Response, Uri};
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::{Instant, Sleep};

use crate::accounting::{AttemptGuard, CallGuard, Outcome};
use crate::endpoint::Endpoint;
use crate::failure_log::Failure;
use crate::grpc;
use crate::metrics::Metrics;
use crate::pump::{Cursor, PumpError, Source};
use crate::upstream::{Activity, Upstream};

/// Added to the deadline passed upstream; see [`Head::request`].
const DEADLINE_SLACK: Duration = Duration::from_millis(20);
/// Attempts of one call at most: the first and two retries.
const MAX_ATTEMPTS: u32 = 3;

/// What every stream of one upstream needs.
pub struct Forwarder {
    /// Swapped when a config reload changes the upstream; streams in flight keep the old one.
    upstream: RwLock<Arc<Upstream>>,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
    duration: Histogram,
}

impl Forwarder {
    pub fn new(upstream: Arc<Upstream>, metrics: Arc<Metrics>, activity: Arc<Activity>) -> Self {
        let duration = metrics.duration_histogram(&upstream.name);
        Self {
            upstream: RwLock::new(upstream),
            metrics,
            activity,
            duration,
        }
    }

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

    /// Forwards one stream from a client, start to end.
    pub async fn forward(&self, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
        let guard = CallGuard::new(self.activity.clone(), self.duration.clone());
        let upstream = self.upstream();
        upstream.budget.deposit();
        let (parts, body) = request.into_parts();
        // The client's deadline, capped by the upstream's own request timeout and by the
        // Service's service config for this method, whichever are set.
        let timeout = [
            grpc::parse_timeout(&parts.headers),
            upstream.config.timeouts.request,
            upstream.service_config.timeout(parts.uri.path()),
        ]
        .into_iter()
        .flatten()
        .min();
        let deadline = timeout.map(|t| guard.arrived + t);
        let retry = &upstream.config.retry;
        let keep = if retry.enabled {
            retry.max_buffer_bytes as usize
        } else {
            0
        };
        let mut call = Call {
            metrics: &self.metrics,
            head: Head {
                method: parts.method,
                uri: upstream_uri(&parts.uri, parts.headers.get(http::header::HOST)),
                headers: parts.headers,
                deadline,
            },
            source: Source::new(body, keep),
            respond,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            attempts: 0,
            upstream,
        };
        call.run(guard.arrived).await;
    }
}

/// The request head, kept to open the stream again on another endpoint.
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    deadline: Option<Instant>,
}

impl Head {
    fn request(&self) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        if let Some(deadline) = self.deadline {
            // The proxy enforces the deadline itself (and cancels upstream when it passes); the
            // backend gets a little longer so that the client reliably sees DEADLINE_EXCEEDED
            // rather than whatever a backend answers when its own timer fires at the same time.
            let remaining = deadline.saturating_duration_since(Instant::now()) + DEADLINE_SLACK;
            request
                .headers_mut()
                .insert("grpc-timeout", grpc::format_timeout(remaining));
        }
        request
    }
}

struct Call<'a> {
    metrics: &'a Arc<Metrics>,
    upstream: Arc<Upstream>,
    head: Head,
    /// The client's request body; kept while it fits, for retries.
    source: Source,
    respond: SendResponse<Bytes>,
    deadline: Option<Pin<Box<Sleep>>>,
    attempts: u32,
}

/// What ended the wait for an upstream's response headers.
enum Waited {
    Response(Result<Response<RecvStream>, h2::Error>),
    ClientGone,
    Deadline,
}

/// What ended a response on its way to the client.
enum Streamed {
    Finished,
    ClientGone,
    Deadline,
    UpstreamFailed(h2::Error),
}

enum Next {
    Done,
    Retry(Arc<Endpoint>),
}

fn poll_deadline(deadline: &mut Option<Pin<Box<Sleep>>>, cx: &mut std::task::Context<'_>) -> bool {
    deadline
        .as_mut()
        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
}

impl Call<'_> {
    async fn run(&mut self, arrived: Instant) {
        let connect_wait = self.upstream.config.timeouts.connect;
        let wait = self.head.deadline.map_or(connect_wait, |d| {
            connect_wait.min(d.saturating_duration_since(arrived))
        });
        let Some(mut endpoint) = self.upstream.pick(wait).await else {
            let reason = self
                .upstream
                .not_ready_reason()
                .unwrap_or_else(|| "no endpoint is ready".into());
            self.metrics
                .record_request(&self.upstream.name, "none", Some(grpc::UNAVAILABLE));
            let message = format!("fanout: upstream {}: {reason}", self.upstream.name);
            self.log_failure(None, Failure::Status(grpc::UNAVAILABLE), &reason);
            self.answer(grpc::UNAVAILABLE, &message);
            return;
        };
        loop {
            match self.attempt(&endpoint).await {
                Next::Done => return,
                Next::Retry(next) => endpoint = next,
            }
        }
    }

    /// Logs a failed call (rate-limited): `reason` is formatted only when the line is written.
    fn log_failure(
        &self,
        endpoint: Option<&Endpoint>,
        failure: Failure,
        reason: &dyn std::fmt::Display,
    ) {
        self.upstream.failures.failed(
            &self.upstream.name,
            endpoint.map(|e| e.addr),
            failure,
            reason,
        );
    }

    /// Answers the client with a Trailers-Only status of the proxy's own.
    fn answer(&mut self, code: u16, message: &str) {
        let _ = self
            .respond
            .send_response(grpc::trailers_only(code, message), true);
    }

    /// Another endpoint for this call, if it may be retried (`whole_body`: only with the
    /// request body complete) and the budget allows.
    fn retry_to(
        &self,
        endpoint: &Endpoint,
        whole_body: bool,
        reason: &str,
    ) -> Option<Arc<Endpoint>> {
        if self.attempts >= MAX_ATTEMPTS
            || !self.source.can_replay()
            || (whole_body && !self.source.is_complete())
        {
            return None;
        }
        let other = self.upstream.pick_other(endpoint)?;
        if !self.upstream.budget.try_withdraw() {
            self.metrics.record_retry_refused(&self.upstream.name);
            return None;
        }
        self.metrics.record_retry(&self.upstream.name, reason);
        Some(other)
    }

    async fn attempt(&mut self, endpoint: &Arc<Endpoint>) -> Next {
        self.attempts += 1;
        let mut guard = AttemptGuard::new(
            endpoint.clone(),
            self.upstream.clone(),
            self.metrics.clone(),
        );
        // Messages are built only when a call fails: nothing on the path of one that works.
        let failed = |name: &str, error: &dyn std::fmt::Display| {
            format!(
                "fanout: upstream {name} endpoint {}: {error}",
                endpoint.addr
            )
        };
        let opened = match endpoint.sender() {
            Some(mut sender) => sender
                .send_request(self.head.request(), self.source.is_empty_and_ended())
                .map_err(|e| failed(&self.upstream.name, &e)),
            None => Err(failed(&self.upstream.name, &"not connected")),
        };
        let (response, mut upstream_send) = match opened {
            Ok(opened) => opened,
            Err(message) => {
                // Never sent: the connection was closing or gone.
                guard.outcome = Outcome::Unprocessed;
                if let Some(next) = self.retry_to(endpoint, false, "unsent") {
                    return Next::Retry(next);
                }
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::UNAVAILABLE),
                    &format_args!("not sent ({message}), and no retry left"),
                );
                self.answer(grpc::UNAVAILABLE, &message);
                return Next::Done;
            }
        };
        guard.sent();
        let mut cursor = if self.source.is_empty_and_ended() {
            Cursor::finished()
        } else {
            Cursor::default()
        };

        let waited = self
            .wait_response(response, &mut cursor, &mut upstream_send)
            .await;
        let response = match waited {
            Waited::Response(Ok(response)) => response,
            Waited::Response(Err(e)) => {
                if is_unprocessed(&e) {
                    guard.outcome = Outcome::Unprocessed;
                    let reason = if e.is_go_away() { "goaway" } else { "refused" };
                    if let Some(next) = self.retry_to(endpoint, false, reason) {
                        return Next::Retry(next);
                    }
                    self.log_failure(
                        Some(endpoint),
                        Failure::Status(grpc::UNAVAILABLE),
                        &format_args!("unprocessed ({e}), and no retry left"),
                    );
                    self.answer(grpc::UNAVAILABLE, &failed(&self.upstream.name, &e));
                } else if let (true, Some(reason)) = (e.is_reset(), e.reason()) {
                    guard.set_status(None);
                    self.log_failure(
                        Some(endpoint),
                        Failure::Reset(reason),
                        &format_args!("reset by the endpoint before its answer: {e}"),
                    );
                    self.respond.send_reset(reason);
                } else {
                    guard.set_status(None);
                    self.log_failure(
                        Some(endpoint),
                        Failure::Status(grpc::UNAVAILABLE),
                        &format_args!("before its answer: {e}"),
                    );
                    self.answer(grpc::UNAVAILABLE, &failed(&self.upstream.name, &e));
                }
                return Next::Done;
            }
            Waited::ClientGone => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::CANCELLED));
                return Next::Done;
            }
            Waited::Deadline => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::DEADLINE_EXCEEDED));
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::DEADLINE_EXCEEDED),
                    &"the deadline passed before the endpoint answered",
                );
                self.answer(grpc::DEADLINE_EXCEEDED, "fanout: deadline exceeded");
                return Next::Done;
            }
        };
        guard.answered();
        let (parts, upstream_recv) = response.into_parts();
        if upstream_recv.is_end_stream() {
            // Trailers-Only: the status is in the headers, and no message was sent.
            let status = grpc::status_of(&parts.headers);
            guard.set_status(status);
            if status == Some(grpc::UNAVAILABLE)
                && let Some(next) = self.retry_to(endpoint, true, "unavailable")
            {
                return Next::Retry(next);
            }
            let _ = self
                .respond
                .send_response(Response::from_parts(parts, ()), true);
            return Next::Done;
        }
        let Ok(mut client_send) = self
            .respond
            .send_response(Response::from_parts(parts, ()), false)
        else {
            upstream_send.send_reset(Reason::CANCEL);
            guard.set_status(Some(grpc::CANCELLED));
            return Next::Done;
        };

        let mut answer = Source::new(upstream_recv, 0);
        let streamed = self
            .stream_response(
                &mut answer,
                &mut client_send,
                &mut cursor,
                &mut upstream_send,
            )
            .await;
        match streamed {
            Streamed::Finished => guard.set_status(answer.trailers().and_then(grpc::status_of)),
            Streamed::ClientGone => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::CANCELLED));
            }
            Streamed::Deadline => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::DEADLINE_EXCEEDED));
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::DEADLINE_EXCEEDED),
                    &"the deadline passed while the response streamed",
                );
                let _ = client_send.send_trailers(grpc::status_headers(
                    grpc::DEADLINE_EXCEEDED,
                    "fanout: deadline exceeded",
                ));
            }
            Streamed::UpstreamFailed(e) => {
                guard.set_status(None);
                match (e.is_reset(), e.reason()) {
                    (true, Some(reason)) => {
                        self.log_failure(
                            Some(endpoint),
                            Failure::Reset(reason),
                            &format_args!("reset while the response streamed: {e}"),
                        );
                        client_send.send_reset(reason)
                    }
                    _ => {
                        self.log_failure(
                            Some(endpoint),
                            Failure::Status(grpc::UNAVAILABLE),
                            &format_args!("lost while the response streamed: {e}"),
                        );
                        let _ = client_send.send_trailers(grpc::status_headers(
                            grpc::UNAVAILABLE,
                            &failed(&self.upstream.name, &e),
                        ));
                    }
                }
            }
        }
        Next::Done
    }

    /// Sends the request body while waiting for the response headers; stops at a client
    /// reset or the deadline.
    async fn wait_response(
        &mut self,
        mut response: h2::client::ResponseFuture,
        cursor: &mut Cursor,
        upstream_send: &mut SendStream<Bytes>,
    ) -> Waited {
        poll_fn(|cx| {
            if self.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(Waited::ClientGone);
            }
            if poll_deadline(&mut self.deadline, cx) {
                return Poll::Ready(Waited::Deadline);
            }
            if let Poll::Ready(result) = Pin::new(&mut response).poll(cx) {
                return Poll::Ready(Waited::Response(result));
            }
            if !cursor.done {
                match self.source.poll_forward(cursor, upstream_send, cx) {
                    Poll::Ready(Err(PumpError::Recv(_))) => return Poll::Ready(Waited::ClientGone),
                    // The endpoint takes no more of the body; its answer will say why.
                    Poll::Ready(Err(_)) => cursor.done = true,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Moves the response to the client while the rest of the request (client and bidi
    /// streaming) still goes upstream.
    async fn stream_response(
        &mut self,
        answer: &mut Source,
        client_send: &mut SendStream<Bytes>,
        cursor: &mut Cursor,
        upstream_send: &mut SendStream<Bytes>,
    ) -> Streamed {
        let mut answer_cursor = Cursor::default();
        poll_fn(|cx| {
            if poll_deadline(&mut self.deadline, cx) {
                return Poll::Ready(Streamed::Deadline);
            }
            match answer.poll_forward(&mut answer_cursor, client_send, cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Streamed::Finished),
                Poll::Ready(Err(PumpError::Recv(e))) => {
                    return Poll::Ready(Streamed::UpstreamFailed(e));
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Streamed::ClientGone),
                Poll::Pending => {}
            }
            if !cursor.done {
                match self.source.poll_forward(cursor, upstream_send, cx) {
                    Poll::Ready(Err(PumpError::Recv(_))) => {
                        return Poll::Ready(Streamed::ClientGone);
                    }
                    Poll::Ready(Err(_)) => cursor.done = true,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// The endpoint provably did not process the stream: it refused it (REFUSED_STREAM), or it
/// was above the last stream id of the endpoint's GOAWAY.
fn is_unprocessed(error: &h2::Error) -> bool {
    error.is_remote()
        && (error.is_go_away()
            || (error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM)))
}

/// An absolute URI for the upstream request: the path as sent, http, and the client's
/// authority (gRPC clients name the service they dial; backends may route on it).
fn upstream_uri(uri: &Uri, host: Option<&http::HeaderValue>) -> Uri {
    if uri.scheme() == Some(&Scheme::HTTP) && uri.authority().is_some() {
        return uri.clone();
    }
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
