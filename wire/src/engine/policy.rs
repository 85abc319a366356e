//! The Service's retry policy (gRFC A6) on the spike's calls, as fanout-proxy applies it: an
//! attempt that failed before its answer started — a Trailers-Only answer with one of the
//! method's retryable codes, the endpoint's reset, its connection lost — goes again after the
//! policy's backoff (or the server's pushback), to another endpoint when one is ready, while
//! the request is kept whole, within `maxAttempts`, the deadline, the Service's retry
//! throttle and the upstream's retry budget (`fanout_balance::retry` decides). Otherwise the
//! client gets the attempt's own failure. A call of a method the config names counts its OK
//! answer toward the throttle.

use std::rc::Rc;

use bytes::BytesMut;
use fanout_balance::retry::{Attempt, Pushback, Verdict, verdict};

use super::open::MethodRetry;
use super::{Conn, Forwarder, answer, held, streams};
use crate::frame;

/// What the client gets if the call does not go again.
pub enum Fallback {
    /// The endpoint's Trailers-Only answer, encoded for the client's stream.
    Answer(BytesMut),
    /// A reset of the client's stream with this code.
    Reset(u32),
    /// A status of the proxy's own: grpc-status and message.
    Status(&'static [u8], &'static [u8]),
}

/// What the client is told when the last attempt got no answer in time.
pub const ATTEMPT_TIMED_OUT: &[u8] =
    b"fanout: no answer within the retry policy's per-attempt timeout";

/// What the call's retry policy made of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call waits for its backoff, held (`held.rs`), and goes again.
    Retried,
    /// The policy does not retry it: the client gets the failure.
    No,
    /// No retry policy applies: the proxy's own rules do.
    NoPolicy,
}

/// A call with `retry` rules ended with `status`: an OK counts toward the retry throttle.
pub fn answered(retry: Option<&MethodRetry>, status: Option<u16>) {
    if status == Some(0)
        && let Some(throttle) = retry.and_then(|r| r.throttle.as_deref())
    {
        throttle.succeeded();
    }
}

/// gRPC's mapping of an endpoint's reset before any answer to the status its client reports
/// (so a policy's codes apply to resets too).
pub fn status_of_reset(code: u32) -> u16 {
    match code {
        frame::CANCEL => 1,
        frame::REFUSED_STREAM => 14,
        frame::ENHANCE_YOUR_CALM => 8,
        frame::INADEQUATE_SECURITY => 7,
        _ => 13,
    }
}

/// The attempt on `avoid` of `client`'s `stream` failed with `status` before its answer
/// started (`None`: no answer within the per-attempt timeout): the call's `retry` rules say
/// whether it goes again. On [`Outcome::Retried`] the
/// call is held for its backoff (with `fallback` for its client should no endpoint be ready
/// then), and the caller forgets the attempt.
pub fn after_failure(
    fwd: &Forwarder,
    (client, stream): (&Rc<Conn>, u32),
    retry: Option<&MethodRetry>,
    (status, pushback): (Option<u16>, Pushback),
    avoid: &Rc<Conn>,
    fallback: impl FnOnce() -> Fallback,
) -> Outcome {
    let Some(rules) = retry else {
        return Outcome::NoPolicy;
    };
    let Some(policy) = &rules.policy else {
        return Outcome::NoPolicy;
    };
    let attempt = {
        let routes = client.routes.borrow();
        let Some(route) = routes.get(&stream) else {
            return Outcome::No;
        };
        Attempt {
            status,
            attempts: route.replay.as_ref().map_or(1, |r| r.attempts()),
            // The request ended and every byte of it is kept.
            whole_body: route.ended && route.replay.is_some(),
            pushback,
            deadline: route.deadline.as_ref().map(|d| d.at()),
        }
    };
    let observer = &fwd.calls.observer;
    match verdict(policy, rules.throttle.as_deref(), attempt) {
        Verdict::No => Outcome::No,
        Verdict::Throttled => {
            observer.retry_throttled();
            Outcome::No
        }
        Verdict::After(_) if !fwd.budget.try_withdraw() => {
            observer.retry_budget_exhausted();
            Outcome::No
        }
        Verdict::After(delay) => {
            observer.retried(&fanout_balance::retry::policy_reason(status));
            held::retry_later(fwd, client, stream, delay, avoid, fallback());
            Outcome::Retried
        }
    }
}

/// The per-attempt timeout of `client`'s `stream` passed (`perAttemptRecvTimeout`): unless
/// the endpoint answered meanwhile, the attempt is cancelled, and the call goes again as its
/// policy says, or ends with DEADLINE_EXCEEDED.
pub fn attempt_timed_out(fwd: &Forwarder, client: &Rc<Conn>, stream: u32) {
    let (endpoint, endpoint_stream, retry) = {
        let routes = client.routes.borrow();
        let Some(route) = routes.get(&stream) else {
            return;
        };
        (route.peer.clone(), route.peer_stream, route.retry.clone())
    };
    let unanswered = endpoint
        .routes
        .borrow()
        .get(&endpoint_stream)
        .is_some_and(|attempt| !attempt.headers_seen);
    if !unanswered {
        return;
    }
    let outcome = after_failure(
        fwd,
        (client, stream),
        retry.as_deref(),
        (None, Pushback::Absent),
        &endpoint,
        || Fallback::Status(answer::DEADLINE_EXCEEDED, ATTEMPT_TIMED_OUT),
    );
    if outcome != Outcome::Retried {
        super::deadline::expire(fwd, client, stream, ATTEMPT_TIMED_OUT);
        return;
    }
    // The endpoint has not answered: its side of the stream is still open.
    streams::forget_attempt(fwd, &endpoint, endpoint_stream, true, Some(4));
}
