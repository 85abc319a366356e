//! Passive ejection: an endpoint that keeps failing calls is taken out of balancing for a
//! while, longer each time; when it comes back it is on probation, and one failure sends it out
//! again.

//!
//! Pure logic, shared by every data path; the data path records outcomes and asks.

use std::time::Duration;

use tokio::time::Instant;

/// Calls ending like this count against an endpoint: no status (reset, or the connection went
/// away under the call), UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED.
pub fn is_failure(grpc_status: Option<u16>) -> bool {
    match grpc_status {
        None => true,
        Some(code) => matches!(code, 14 | 13 | 4),
    }
}

/// Whether one more endpoint may be ejected when `ejected` of `total` are already out: never
/// more than `max_percent` of them (the panic threshold: past it, a failing set is still
/// better used than left empty).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected + 1) * 100 <= total * max_percent as usize
}

#[derive(Debug, Default)]
pub struct Ejection {
    consecutive_failures: u32,
    until: Option<Instant>,
    /// Ejections since the endpoint last proved healthy; doubles the next ejection's length.
    times: u32,
    probation: bool,
}

impl Ejection {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// Records a call's outcome; `true` when the endpoint should now be ejected.
    pub fn record(&mut self, failed: bool, threshold: u32, now: Instant) -> bool {
        if self.until.is_some_and(|until| now >= until) {
            self.until = None;
            self.probation = true;
        }
        if self.is_ejected(now) {
            return false;
        }
        if !failed {
            self.consecutive_failures = 0;
            if self.probation {
                self.probation = false;
                self.times = 0;
            }
            return false;
        }
        self.consecutive_failures += 1;
        self.probation || self.consecutive_failures >= threshold
    }

    /// Ejects for `base × 2^(ejections so far)`, at most `max`; returns how long.
    pub fn eject(&mut self, base: Duration, max: Duration, now: Instant) -> Duration {
        let length = base.saturating_mul(1 << self.times.min(16)).min(max);
        self.until = Some(now + length);
        self.times += 1;
        self.consecutive_failures = 0;
        self.probation = false;
        length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_then_probation() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(60);
        let now = Instant::now();
        let mut e = Ejection::default();
        assert!(!e.record(true, 3, now));
        assert!(!e.record(false, 3, now), "a success resets the count");
        assert!(!e.record(true, 3, now));
        assert!(!e.record(true, 3, now));
        assert!(e.record(true, 3, now));
        assert_eq!(e.eject(base, max, now), base);
        assert!(e.is_ejected(now + Duration::from_secs(4)));
        // Back on probation: one failure sends it out again, for twice as long.
        let back = now + base;
        assert!(!e.is_ejected(back));
        assert!(e.record(true, 3, back));
        assert_eq!(e.eject(base, max, back), base * 2);
        // A success on probation clears the history.
        let back = back + base * 2;
        assert!(!e.record(false, 3, back));
        assert!(!e.record(true, 3, back));
    }

    #[test]
    fn at_most_the_panic_threshold_is_ejected() {
        assert!(may_eject(0, 2, 50));
        assert!(!may_eject(1, 2, 50));
        assert!(!may_eject(0, 1, 50), "the only endpoint stays");
        assert!(may_eject(4, 10, 50));
        assert!(!may_eject(5, 10, 50));
        assert!(may_eject(0, 1, 100));
    }

    #[test]
    fn failures_are_resets_unavailable_internal_and_deadlines() {
        assert!(is_failure(None));
        assert!(is_failure(Some(14)));
        assert!(is_failure(Some(13)));
        assert!(is_failure(Some(4)));
        assert!(!is_failure(Some(0)));
        assert!(
            !is_failure(Some(5)),
            "NOT_FOUND is an answer, not a failing endpoint"
        );
        assert!(!is_failure(Some(1)), "the client cancelled");
    }
}
