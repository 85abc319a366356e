//! What bounds retries: the upstream's retry budget, the Service's `retryThrottling`, and
//! the backoff between a policy's attempts — pure logic in `fanout_balance`, shared with the
//! wire data path.

pub use fanout_balance::budget::Budget;
pub use fanout_balance::retry::{Pushback, Throttle, Verdict, backoff, verdict};
