//! What bounds retries: the upstream's retry budget (`fanout_balance::budget`, shared with
//! the wire data path), the Service's `retryThrottling`, and the backoff between a policy's
//! attempts.

use std::sync::Mutex;
use std::time::Duration;

pub use fanout_balance::budget::Budget;

use fanout_proxy_config::service_config::{RetryPolicy, RetryThrottling};

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
