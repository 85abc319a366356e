//! What bounds retries: the upstream's retry budget, the Service's `retryThrottling`, and the
//! backoff between a policy's attempts.
//!
//! The budget: retries may add at most `budget_percent` of the calls, so a failing upstream
//! sees a bounded extra load rather than a retry storm. A token bucket counted in calls: every
//! call deposits `budget_percent / 100` of a retry, every retry spends one. A small reserve
//! lets a quiet proxy retry its first failures; the bucket is capped so a long healthy spell
//! cannot fund a long storm later.

use std::sync::Mutex;
use std::time::Duration;

use fanout_proxy_config::service_config::{RetryPolicy, RetryThrottling};

/// Retries available before any call has paid for them.
const RESERVE: f64 = 10.0;
/// Most retries the bucket holds.
const CAP: f64 = 100.0;

#[derive(Debug)]
pub struct Budget {
    per_call: f64,
    tokens: Mutex<f64>,
}

impl Budget {
    pub fn new(budget_percent: u32) -> Self {
        Self {
            per_call: f64::from(budget_percent) / 100.0,
            tokens: Mutex::new(if budget_percent == 0 { 0.0 } else { RESERVE }),
        }
    }

    /// A call arrived.
    pub fn deposit(&self) {
        if let Ok(mut tokens) = self.tokens.lock() {
            *tokens = (*tokens + self.per_call).min(CAP);
        }
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        let Ok(mut tokens) = self.tokens.lock() else {
            return false;
        };
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

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

    #[test]
    fn retries_are_capped_at_the_budget_share_of_calls() {
        let budget = Budget::new(20);
        // The reserve goes first.
        let reserve = (0..1000).take_while(|_| budget.try_withdraw()).count();
        assert_eq!(reserve, 10);
        // Then 400 calls pay for 80 retries, and no more.
        for _ in 0..400 {
            budget.deposit();
        }
        let paid = (0..1000).take_while(|_| budget.try_withdraw()).count();
        assert!((79..=80).contains(&paid), "{paid}");
    }

    #[test]
    fn a_long_healthy_spell_does_not_fund_a_storm() {
        let budget = Budget::new(20);
        for _ in 0..1_000_000 {
            budget.deposit();
        }
        assert_eq!((0..1000).take_while(|_| budget.try_withdraw()).count(), 100);
    }

    #[test]
    fn a_zero_budget_never_retries() {
        let budget = Budget::new(0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(!budget.try_withdraw());
    }
}
