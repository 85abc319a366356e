//! One call: an endpoint is picked, the stream is opened on it and both directions are moved
//! (headers, data under flow control, trailers, resets); deadlines are enforced; a call that
//! provably was not processed, or that failed in a way its Service's retry policy (or, without
//! one, the proxy's own rule) retries, goes again while its whole request body is at hand
//! (`retry.rs`).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::Poll;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{Request, Response};
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::{Instant, Sleep};

use crate::accounting::{AttemptGuard, CallGuard, Outcome};
use crate::activity::Activity;
use crate::endpoint::Endpoint;
use crate::failure_log::Failure;
use crate::grpc;
use crate::metrics::Metrics;
use crate::pump::{Cursor, Source};
use crate::service_config::CallPolicy;
use crate::upstream::Upstream;

mod both_ways;
mod head;
mod retry;

use both_ways::{Expiry, Idle, Streamed, Waited, poll_deadline};
use fanout_balance::retry::Pushback;
use head::{Head, upstream_uri};
use retry::{Fallback, PolicyVerdict, RetryAfter, pushback_of};

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
        let policy = upstream.service_config.for_call(parts.uri.path());
        let method = policy.as_ref().map(CallPolicy::method);
        let wait_for_ready = method.and_then(|m| m.wait_for_ready) == Some(true);
        let (request_timeout, idle_timeout) = upstream.call_timeouts();
        // The client's deadline, capped by the upstream's own request timeout and by the
        // Service's service config for this method, whichever are set.
        let timeout = [
            grpc::parse_timeout(&parts.headers),
            request_timeout,
            method.and_then(|m| m.timeout),
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
            policy,
            wait_for_ready,
            idle: idle_timeout.map(Idle::new),
        };
        call.run(guard.arrived).await;
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
    /// The Service's method config for this call, if it declares one.
    policy: Option<CallPolicy>,
    /// Hold the call while no endpoint is ready, up to its deadline (`waitForReady`).
    wait_for_ready: bool,
    /// Ends the call when nothing moves either way for this long.
    idle: Option<Idle>,
}

enum Next {
    Done,
    /// Sent again at once: the endpoint provably never processed it.
    Retry(Arc<Endpoint>),
    /// Sent again by the Service's retry policy, after its backoff.
    RetryAfter(RetryAfter),
}

impl Call<'_> {
    async fn run(&mut self, arrived: Instant) {
        let mut endpoint = match self.upstream.try_pick() {
            Some(endpoint) => endpoint,
            None => match self.wait_for_endpoint(arrived).await {
                Some(endpoint) => endpoint,
                None => return,
            },
        };
        loop {
            match self.attempt(&endpoint).await {
                Next::Done => return,
                Next::Retry(next) => endpoint = next,
                Next::RetryAfter(retry) => match self.retry_after(retry).await {
                    Some(next) => endpoint = next,
                    None => return,
                },
            }
        }
    }

    /// No endpoint is ready: waits for one — while endpoints connect (up to the connect
    /// timeout), or for a `waitForReady` method until the call's deadline — and answers the
    /// client itself when none comes or the client gives up.
    async fn wait_for_endpoint(&mut self, arrived: Instant) -> Option<Arc<Endpoint>> {
        let connecting = arrived + self.upstream.config.timeouts.connect;
        let until = match (self.wait_for_ready, self.head.deadline) {
            (true, deadline) => deadline,
            (false, Some(deadline)) => Some(deadline.min(connecting)),
            (false, None) => Some(connecting),
        };
        let upstream = self.upstream.clone();
        let mut pick = std::pin::pin!(upstream.pick_until(until));
        let picked = poll_fn(|cx| {
            if self.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(()));
            }
            pick.as_mut().poll(cx).map(Ok)
        })
        .await;
        let reason = match picked {
            Ok(Some(endpoint)) => return Some(endpoint),
            Err(()) => {
                self.metrics
                    .record_request(&self.upstream.name, "none", Some(grpc::CANCELLED));
                return None;
            }
            Ok(None) => self
                .upstream
                .not_ready_reason()
                .unwrap_or_else(|| "no endpoint is ready".into()),
        };
        // A waitForReady call waited its whole deadline: gRPC clients end it so too.
        let code = if self.wait_for_ready {
            grpc::DEADLINE_EXCEEDED
        } else {
            grpc::UNAVAILABLE
        };
        self.metrics
            .record_request(&self.upstream.name, "none", Some(code));
        let message = format!("fanout: upstream {}: {reason}", self.upstream.name);
        self.log_failure(None, Failure::Status(code), &reason);
        self.answer(code, &message);
        None
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

    /// What the client is told when one of the call's timers ended it.
    fn expiry_message(&self, expiry: Expiry) -> String {
        match expiry {
            Expiry::Deadline => "fanout: deadline exceeded".into(),
            Expiry::Idle => {
                let after = self.idle.as_ref().map(|i| i.after).unwrap_or_default();
                format!(
                    "fanout: upstream {}: nothing moved either way for {after:?} (the idle timeout)",
                    self.upstream.name
                )
            }
        }
    }

    /// Answers the client with a Trailers-Only status of the proxy's own.
    fn answer(&mut self, code: u16, message: &str) {
        let _ = self
            .respond
            .send_response(grpc::trailers_only(code, message), true);
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

        let mut attempt_timer = self
            .policy
            .as_ref()
            .and_then(|p| p.retry()?.per_attempt_recv_timeout)
            .map(|t| Box::pin(tokio::time::sleep(t)));
        let waited = self
            .wait_response(
                response,
                &mut cursor,
                &mut upstream_send,
                &mut attempt_timer,
            )
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
                    return Next::Done;
                }
                guard.set_status(None);
                let fallback = match (e.is_reset(), e.reason()) {
                    (true, Some(reason)) => Fallback::Reset(reason),
                    _ => Fallback::Status(grpc::UNAVAILABLE, failed(&self.upstream.name, &e)),
                };
                match self.policy_verdict(Some(retry::status_of_error(&e)), Pushback::Absent) {
                    PolicyVerdict::After(delay) => {
                        return Next::RetryAfter(RetryAfter {
                            delay,
                            avoid: endpoint.clone(),
                            reason: retry::policy_reason(Some(retry::status_of_error(&e))),
                            fallback,
                        });
                    }
                    PolicyVerdict::No | PolicyVerdict::NoPolicy => {}
                }
                if let Fallback::Reset(reason) = fallback {
                    self.log_failure(
                        Some(endpoint),
                        Failure::Reset(reason),
                        &format_args!("reset by the endpoint before its answer: {e}"),
                    );
                    self.respond.send_reset(reason);
                } else {
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
            Waited::Expired(expiry) => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::DEADLINE_EXCEEDED));
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::DEADLINE_EXCEEDED),
                    &format_args!("{} before the endpoint answered", expiry_cause(expiry)),
                );
                let message = self.expiry_message(expiry);
                self.answer(grpc::DEADLINE_EXCEEDED, &message);
                return Next::Done;
            }
            Waited::AttemptTimeout => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::DEADLINE_EXCEEDED));
                let message = failed(
                    &self.upstream.name,
                    &"no answer within the retry policy's per-attempt timeout",
                );
                if let PolicyVerdict::After(delay) = self.policy_verdict(None, Pushback::Absent) {
                    return Next::RetryAfter(RetryAfter {
                        delay,
                        avoid: endpoint.clone(),
                        reason: retry::policy_reason(None),
                        fallback: Fallback::Status(grpc::DEADLINE_EXCEEDED, message),
                    });
                }
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::DEADLINE_EXCEEDED),
                    &"no answer within the per-attempt timeout, and no retry left",
                );
                self.answer(grpc::DEADLINE_EXCEEDED, &message);
                return Next::Done;
            }
        };
        guard.answered();
        if let Some(idle) = &mut self.idle {
            idle.touch();
        }
        let (parts, upstream_recv) = response.into_parts();
        if upstream_recv.is_end_stream() {
            // Trailers-Only: the status is in the headers, and no message was sent.
            let status = grpc::status_of(&parts.headers);
            guard.set_status(status);
            match self.policy_verdict(status, pushback_of(&parts.headers)) {
                PolicyVerdict::After(delay) => {
                    return Next::RetryAfter(RetryAfter {
                        delay,
                        avoid: endpoint.clone(),
                        reason: retry::policy_reason(status),
                        fallback: Fallback::Answer(Response::from_parts(parts, ())),
                    });
                }
                PolicyVerdict::No => {}
                // Without a policy, the proxy's own rule: an UNAVAILABLE before any message.
                PolicyVerdict::NoPolicy => {
                    if status == Some(grpc::UNAVAILABLE)
                        && let Some(next) = self.retry_to(endpoint, true, "unavailable")
                    {
                        return Next::Retry(next);
                    }
                }
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
            Streamed::Finished => {
                let status = answer.trailers().and_then(grpc::status_of);
                if status == Some(grpc::OK)
                    && let Some(throttle) = self.policy.as_ref().and_then(CallPolicy::throttle)
                {
                    throttle.succeeded();
                }
                guard.set_status(status)
            }
            Streamed::ClientGone => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::CANCELLED));
            }
            Streamed::Expired(expiry) => {
                upstream_send.send_reset(Reason::CANCEL);
                guard.set_status(Some(grpc::DEADLINE_EXCEEDED));
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(grpc::DEADLINE_EXCEEDED),
                    &format_args!("{} while the response streamed", expiry_cause(expiry)),
                );
                let message = self.expiry_message(expiry);
                let _ = client_send
                    .send_trailers(grpc::status_headers(grpc::DEADLINE_EXCEEDED, &message));
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
}

/// Why the call ended, for the failure log.
fn expiry_cause(expiry: Expiry) -> &'static str {
    match expiry {
        Expiry::Deadline => "the deadline passed",
        Expiry::Idle => "nothing moved either way for the idle timeout",
    }
}

/// The endpoint provably did not process the stream: it refused it (REFUSED_STREAM), or it
/// was above the last stream id of the endpoint's GOAWAY.
fn is_unprocessed(error: &h2::Error) -> bool {
    error.is_remote()
        && (error.is_go_away()
            || (error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM)))
}
