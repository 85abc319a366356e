//! The retry budget: retries may add at most `budget_percent` of the calls, so a failing
//! upstream sees a bounded extra load rather than a retry storm. A token bucket counted in
//! calls: every call deposits `budget_percent / 100` of a retry, every retry spends one. A
//! small reserve lets a quiet proxy retry its first failures; the bucket is capped so a long
//! healthy spell cannot fund a long storm later.

use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

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
