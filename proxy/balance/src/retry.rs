//! What a retry by the Service's policy may do (gRFC A6), shared by every data path: the
//! Service's `retryThrottling`, the backoff between a policy's attempts, the server's
//! pushback, and the verdict on one failed attempt.

use std::sync::Mutex;
use std::time::Duration;

use fanout_proxy_config::service_config::{RetryPolicy, RetryThrottling, STATUS_CODES};
use tokio::time::Instant;

/// gRPC's retry throttling (gRFC A6), per upstream: the tokens start at `maxTokens`; a call
/// answered with one of its method's retryable codes takes one, an OK call gives back
/// `tokenRatio`; while the tokens are at or below half of `maxTokens`, no call is retried.
/// Counted in thousandths, as gRPC does, so the arithmetic is exact.
#[derive(Debug)]
pub struct Throttle {
    max_milli: u64,
    ratio_milli: u64,
    tokens_milli: Mutex<u64>,
}

impl Throttle {
    pub fn new(config: &RetryThrottling) -> Self {
        let max_milli = u64::from(config.max_tokens) * 1000;
        Self {
            max_milli,
            ratio_milli: (config.token_ratio * 1000.0).round() as u64,
            tokens_milli: Mutex::new(max_milli),
        }
    }

    /// A call was answered with a retryable code; `true` while retries are still allowed.
    pub fn failed(&self) -> bool {
        let mut tokens = self.tokens_milli.lock().unwrap_or_else(|e| e.into_inner());
        *tokens = tokens.saturating_sub(1000);
        *tokens > self.max_milli / 2
    }

    /// A call ended OK.
    pub fn succeeded(&self) {
        let mut tokens = self.tokens_milli.lock().unwrap_or_else(|e| e.into_inner());
        *tokens = (*tokens + self.ratio_milli).min(self.max_milli);
    }
}

/// How long to wait before attempt `attempt` (2 for the first retry): uniformly random up to
/// `initialBackoff × backoffMultiplier^(attempt − 2)`, capped at `maxBackoff` (gRFC A6). The
/// jitter keeps the callers of one failing backend from coming back all at once.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(2).min(64) as i32;
    let ceiling = policy.initial_backoff.as_secs_f64() * policy.backoff_multiplier.powi(exponent);
    let ceiling = ceiling.min(policy.max_backoff.as_secs_f64());
    if !ceiling.is_finite() || ceiling <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(ceiling * fastrand::f64())
}

/// `grpc-retry-pushback-ms`: the server's say on when (or whether) to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    Absent,
    /// Not a non-negative integer: the server asks not to retry.
    Stop,
    Wait(Duration),
}

impl Pushback {
    /// The header's value, if the answer had one.
    pub fn parse(value: Option<&[u8]>) -> Self {
        match value {
            None => Self::Absent,
            Some(value) => std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(Self::Stop, |ms| Self::Wait(Duration::from_millis(ms))),
        }
    }
}

/// What the Service's retry policy says of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not retried: the client gets the failure.
    No,
    /// Not retried because the throttle holds retries back (counted apart).
    Throttled,
    /// Retried after this backoff.
    After(Duration),
}

/// One attempt of a call, as the verdict weighs it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Its grpc-status (a reset or lost connection mapped as gRPC clients map it); `None`:
    /// the per-attempt timeout passed, which gRPC retries whatever the codes.
    pub status: Option<u16>,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// The whole request body is at hand to send again.
    pub whole_body: bool,
    pub pushback: Pushback,
    pub deadline: Option<Instant>,
}

/// Whether `policy` sends a call again after `attempt` failed before its response started,
/// and after what backoff. Every retryable failure counts against the throttle, retried or
/// not; an OK answer is counted by the caller ([`Throttle::succeeded`]).
pub fn verdict(policy: &RetryPolicy, throttle: Option<&Throttle>, attempt: Attempt) -> Verdict {
    if attempt
        .status
        .is_some_and(|code| policy.retryable_status_codes.binary_search(&code).is_err())
    {
        return Verdict::No;
    }
    let throttled = throttle.is_some_and(|t| !t.failed());
    if attempt.attempts >= policy.max_attempts || !attempt.whole_body {
        return Verdict::No;
    }
    if throttled {
        return Verdict::Throttled;
    }
    let delay = match attempt.pushback {
        Pushback::Stop => return Verdict::No,
        Pushback::Wait(delay) => delay,
        Pushback::Absent => backoff(policy, attempt.attempts + 1),
    };
    // A retry that could not start before the deadline would only turn the endpoint's
    // answer into DEADLINE_EXCEEDED: the client learns more from the answer itself.
    if attempt
        .deadline
        .is_some_and(|deadline| Instant::now() + delay >= deadline)
    {
        return Verdict::No;
    }
    Verdict::After(delay)
}

/// The `fanout_proxy_retries` reason of a retry by the Service's policy: the code it
/// retried (`policy:UNAVAILABLE`), or `policy:per_attempt_timeout` for an attempt without one.
pub fn policy_reason(status: Option<u16>) -> String {
    match status.and_then(|code| STATUS_CODES.get(usize::from(code))) {
        Some(name) => format!("policy:{name}"),
        None => "policy:per_attempt_timeout".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64, multiplier: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            backoff_multiplier: multiplier,
            retryable_status_codes: vec![14],
            per_attempt_recv_timeout: None,
        }
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling_capped_at_max_backoff() {
        let policy = policy(100, 300, 2.0);
        for (attempt, ceiling_ms) in [(2, 100), (3, 200), (4, 300), (5, 300), (40, 300)] {
            let waits: Vec<Duration> = (0..2000).map(|_| backoff(&policy, attempt)).collect();
            let ceiling = Duration::from_millis(ceiling_ms);
            assert!(waits.iter().all(|w| *w <= ceiling), "attempt {attempt}");
            // Spread over the whole range, not pinned to the ceiling.
            let low = waits.iter().filter(|w| **w < ceiling / 4).count();
            let high = waits.iter().filter(|w| **w > ceiling * 3 / 4).count();
            assert!(
                low > 300 && high > 300,
                "attempt {attempt}: {low} low, {high} high"
            );
        }
    }

    /// gRFC A6: a non-negative integer is the wait before the next attempt; anything else
    /// present means "do not retry".
    #[test]
    fn pushback_is_a_wait_or_a_stop() {
        assert_eq!(Pushback::parse(None), Pushback::Absent);
        assert_eq!(
            Pushback::parse(Some(b"250")),
            Pushback::Wait(Duration::from_millis(250))
        );
        assert_eq!(Pushback::parse(Some(b"0")), Pushback::Wait(Duration::ZERO));
        for stop in [&b"-1"[..], b"soon", b"1.5", b""] {
            assert_eq!(Pushback::parse(Some(stop)), Pushback::Stop, "{stop:?}");
        }
    }

    #[test]
    fn the_verdict_retries_only_named_codes_within_attempts_deadline_and_pushback() {
        let policy = policy(10, 50, 2.0);
        let attempt = Attempt {
            status: Some(14),
            attempts: 1,
            whole_body: true,
            pushback: Pushback::Absent,
            deadline: None,
        };
        assert!(
            matches!(verdict(&policy, None, attempt), Verdict::After(d) if d <= Duration::from_millis(10))
        );
        let not_named = Attempt {
            status: Some(13),
            ..attempt
        };
        assert_eq!(verdict(&policy, None, not_named), Verdict::No);
        let last = Attempt {
            attempts: 5,
            ..attempt
        };
        assert_eq!(verdict(&policy, None, last), Verdict::No);
        let partial = Attempt {
            whole_body: false,
            ..attempt
        };
        assert_eq!(verdict(&policy, None, partial), Verdict::No);
        let stop = Attempt {
            pushback: Pushback::Stop,
            ..attempt
        };
        assert_eq!(verdict(&policy, None, stop), Verdict::No);
        let wait = Duration::from_millis(70);
        let pushed = Attempt {
            pushback: Pushback::Wait(wait),
            ..attempt
        };
        assert_eq!(verdict(&policy, None, pushed), Verdict::After(wait));
        let soon = Instant::now() + Duration::from_millis(5);
        let late = Attempt {
            pushback: Pushback::Wait(wait),
            deadline: Some(soon),
            ..attempt
        };
        assert_eq!(verdict(&policy, None, late), Verdict::No);
        // The per-attempt timeout is retried whatever the codes.
        let timed_out = Attempt {
            status: None,
            ..attempt
        };
        assert!(matches!(
            verdict(&policy, None, timed_out),
            Verdict::After(_)
        ));
        let throttle = Throttle::new(&RetryThrottling {
            max_tokens: 2,
            token_ratio: 0.1,
        });
        assert_eq!(
            verdict(&policy, Some(&throttle), attempt),
            Verdict::Throttled
        );
    }

    #[test]
    fn throttling_stops_retries_at_half_the_tokens_and_successes_restore_them() {
        let throttle = Throttle::new(&RetryThrottling {
            max_tokens: 10,
            token_ratio: 0.5,
        });
        // 10 → 9 … 6 still allow retries; 5 is half: throttled.
        assert!((0..4).all(|_| throttle.failed()));
        assert!(!throttle.failed());
        // Three successes give back 1.5 tokens: 6.5, and the next failure leaves 5.5 > 5.
        for _ in 0..3 {
            throttle.succeeded();
        }
        assert!(throttle.failed());
        assert!(!throttle.failed());
        let throttle = Throttle::new(&RetryThrottling {
            max_tokens: 10,
            token_ratio: 0.1,
        });
        for _ in 0..5 {
            throttle.failed();
        }
        // Five failures: 5 tokens, at half.
        assert!(!throttle.failed());
        for _ in 0..1000 {
            throttle.succeeded();
        }
        // Capped at maxTokens: exactly four more failures are allowed after a long good spell.
        assert_eq!((0..10).take_while(|_| throttle.failed()).count(), 4);
    }
}
