//! When a call goes again, and where.
//!
//! Two kinds of retry, as gRPC separates them:
//! - **transparent**: the endpoint provably never processed the call (never sent, refused,
//!   above a GOAWAY's last stream); always safe, sent again at once to another endpoint.
//! - **by policy**: the Service's owner declared in its service config which status codes of
//!   a method are safe to retry, how often and with what backoff (gRFC A6). Without such a
//!   policy the proxy keeps its own rule: a Trailers-Only UNAVAILABLE goes again.
//!
//! Either way, only while the whole request body is kept, only before the response started
//! (a Trailers-Only answer or no answer yet), and only while the upstream's retry budget (and
//! the Service's `retryThrottling`) allows.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

pub(super) use fanout_balance::retry::policy_reason;
use fanout_balance::retry::{Attempt, Pushback, Verdict, verdict};
use h2::Reason;
use http::{HeaderMap, Response};
use tokio::time::Instant;

use super::{Call, poll_deadline};
use crate::endpoint::Endpoint;
use crate::failure_log::Failure;
use crate::grpc;

/// Attempts of one call at most when the endpoints never processed it: the first and two
/// transparent retries (or the policy's `maxAttempts`, if more).
const TRANSPARENT_ATTEMPTS: u32 = 3;

/// What the Service's retry policy says of a failed attempt.
pub(super) enum PolicyVerdict {
    /// No retry policy applies to this call: the proxy's own rules do.
    NoPolicy,
    /// Not retried: the client gets the failure.
    No,
    /// Retried after this backoff.
    After(Duration),
}

/// A retry the policy granted: what to wait, whom to avoid, and what the client gets if it
/// cannot be made after all.
pub(super) struct RetryAfter {
    pub delay: Duration,
    pub avoid: Arc<Endpoint>,
    /// The `fanout_proxy_retries` reason.
    pub reason: String,
    pub fallback: Fallback,
}

/// The failure of the last attempt, as the client gets it when no retry follows.
pub(super) enum Fallback {
    /// The endpoint's Trailers-Only answer, forwarded as it came.
    Answer(Response<()>),
    /// A status of the proxy's own.
    Status(u16, String),
    /// The endpoint's reset, passed on.
    Reset(Reason),
}

/// `grpc-retry-pushback-ms` of an answer.
pub(super) fn pushback_of(headers: &HeaderMap) -> Pushback {
    Pushback::parse(headers.get("grpc-retry-pushback-ms").map(|v| v.as_bytes()))
}

/// The status a gRPC client reports for a stream that failed before its answer (gRPC's
/// HTTP/2 mapping), so a policy's codes apply to resets and lost connections too.
pub(super) fn status_of_error(error: &h2::Error) -> u16 {
    match (error.is_reset(), error.reason()) {
        (true, Some(Reason::CANCEL)) => grpc::CANCELLED,
        (_, Some(Reason::REFUSED_STREAM)) => grpc::UNAVAILABLE,
        (true, Some(Reason::ENHANCE_YOUR_CALM)) => grpc::RESOURCE_EXHAUSTED,
        (true, Some(Reason::INADEQUATE_SECURITY)) => grpc::PERMISSION_DENIED,
        (true, Some(_)) => grpc::INTERNAL,
        // The connection went away under the stream.
        _ => grpc::UNAVAILABLE,
    }
}

impl Call<'_> {
    /// Another endpoint at once, for a call `endpoint` never processed, if it may go again
    /// (`whole_body`: only with the request body complete) and the budget allows.
    pub(super) fn retry_to(
        &self,
        endpoint: &Endpoint,
        whole_body: bool,
        reason: &str,
    ) -> Option<Arc<Endpoint>> {
        let limit = self
            .policy
            .as_ref()
            .and_then(|p| p.retry())
            .map_or(TRANSPARENT_ATTEMPTS, |r| {
                r.max_attempts.max(TRANSPARENT_ATTEMPTS)
            });
        if self.attempts >= limit
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

    /// Whether the Service's retry policy sends the call again after an attempt that ended
    /// with `status` before the response started (`None`: the per-attempt timeout passed,
    /// which gRPC retries whatever the codes), and after what backoff.
    pub(super) fn policy_verdict(&self, status: Option<u16>, pushback: Pushback) -> PolicyVerdict {
        let Some(policy) = self.policy.as_ref() else {
            return PolicyVerdict::NoPolicy;
        };
        if status == Some(grpc::OK) {
            if let Some(throttle) = policy.throttle() {
                throttle.succeeded();
            }
            return PolicyVerdict::No;
        }
        let Some(retry) = policy.retry() else {
            return PolicyVerdict::NoPolicy;
        };
        let attempt = Attempt {
            status,
            attempts: self.attempts,
            whole_body: self.source.is_complete(),
            pushback,
            deadline: self.head.deadline,
        };
        match verdict(retry, policy.throttle(), attempt) {
            Verdict::No => PolicyVerdict::No,
            Verdict::Throttled => {
                self.metrics.record_retry_throttled(&self.upstream.name);
                PolicyVerdict::No
            }
            Verdict::After(delay) => PolicyVerdict::After(delay),
        }
    }

    /// Waits out a policy retry's backoff, then picks an endpoint for it (another one when
    /// one is ready). `None`: the call was answered here — its fallback, the deadline, or the
    /// client left.
    pub(super) async fn retry_after(&mut self, retry: RetryAfter) -> Option<Arc<Endpoint>> {
        let mut backoff = Box::pin(tokio::time::sleep(retry.delay));
        let waited = poll_fn(|cx| {
            if self.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(false));
            }
            if poll_deadline(&mut self.deadline, cx) {
                return Poll::Ready(Err(true));
            }
            backoff.as_mut().poll(cx).map(Ok)
        })
        .await;
        match waited {
            Ok(()) => {}
            Err(false) => return None,
            Err(true) => {
                self.answer(grpc::DEADLINE_EXCEEDED, "fanout: deadline exceeded");
                return None;
            }
        }
        let next = match self.upstream.pick_other(&retry.avoid) {
            Some(next) => Some(next),
            None => {
                let connecting = Instant::now() + self.upstream.config.timeouts.connect;
                let until = self.head.deadline.map_or(connecting, |d| d.min(connecting));
                self.upstream.pick_until(Some(until)).await
            }
        };
        let next = match next {
            Some(next) if self.upstream.budget.try_withdraw() => next,
            Some(_) => {
                self.metrics.record_retry_refused(&self.upstream.name);
                self.give_up(&retry.avoid, retry.fallback, "the retry budget is spent");
                return None;
            }
            None => {
                self.give_up(&retry.avoid, retry.fallback, "no endpoint is ready");
                return None;
            }
        };
        self.metrics
            .record_retry(&self.upstream.name, &retry.reason);
        Some(next)
    }

    /// The client gets the last attempt's failure.
    fn give_up(&mut self, endpoint: &Endpoint, fallback: Fallback, why: &str) {
        match fallback {
            Fallback::Answer(response) => {
                let _ = self.respond.send_response(response, true);
            }
            Fallback::Status(code, message) => {
                self.log_failure(
                    Some(endpoint),
                    Failure::Status(code),
                    &format_args!("{message}; not retried: {why}"),
                );
                self.answer(code, &message);
            }
            Fallback::Reset(reason) => {
                self.log_failure(
                    Some(endpoint),
                    Failure::Reset(reason),
                    &format_args!("reset by the endpoint; not retried: {why}"),
                );
                self.respond.send_reset(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_stream_is_unavailable_and_retry_reasons_name_the_code() {
        let reset = |reason| h2::Error::from(reason);
        assert_eq!(
            status_of_error(&reset(Reason::REFUSED_STREAM)),
            grpc::UNAVAILABLE
        );
        assert_eq!(policy_reason(Some(grpc::UNAVAILABLE)), "policy:UNAVAILABLE");
        assert_eq!(policy_reason(None), "policy:per_attempt_timeout");
    }
}
