//! One `info` line for each call the proxy fails itself (no endpoint, deadline, a connection
//! lost) or sees reset, naming the upstream, the endpoint, what the client got and why, so a
//! user can see why a call failed. Rate-limited per upstream: a failing upstream under load
//! would otherwise write a line per call; the lines left out are counted and reported.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most this many lines per upstream in each period.
const LINES_PER_PERIOD: u32 = 10;
const PERIOD: Duration = Duration::from_secs(1);

/// What the client got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A gRPC status the proxy answered itself.
    Status(u16),
    /// The stream was reset with this HTTP/2 error code.
    Reset(h2::Reason),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "grpc-status {code}"),
            Failure::Reset(reason) => write!(f, "RST_STREAM {reason:?}"),
        }
    }
}

struct Period {
    started: Instant,
    logged: u32,
    left_out: u64,
}

pub struct FailureLog {
    period: Mutex<Period>,
}

impl Default for FailureLog {
    fn default() -> Self {
        Self {
            period: Mutex::new(Period {
                started: Instant::now(),
                logged: 0,
                left_out: 0,
            }),
        }
    }
}

impl FailureLog {
    /// Whether a line may be written now; reports the lines left out of the last period.
    fn admit(&self, upstream: &str) -> bool {
        let Ok(mut period) = self.period.lock() else {
            return false;
        };
        let now = Instant::now();
        if now.saturating_duration_since(period.started) >= PERIOD {
            if period.left_out > 0 {
                tracing::info!(
                    upstream,
                    left_out = period.left_out,
                    "more calls failed than were logged (at most {LINES_PER_PERIOD} lines a second)"
                );
            }
            *period = Period {
                started: now,
                logged: 0,
                left_out: 0,
            };
        }
        if period.logged < LINES_PER_PERIOD {
            period.logged += 1;
            true
        } else {
            period.left_out += 1;
            false
        }
    }

    /// Logs a failed call, unless this upstream has logged enough this second.
    pub fn failed(
        &self,
        upstream: &str,
        endpoint: Option<SocketAddr>,
        failure: Failure,
        reason: &dyn fmt::Display,
    ) {
        if !self.admit(upstream) {
            return;
        }
        let endpoint = endpoint.map_or_else(|| "none".to_string(), |e| e.to_string());
        tracing::info!(upstream, endpoint, client_got = %failure, reason = %reason, "call failed");
    }

    #[cfg(test)]
    fn left_out(&self) -> u64 {
        self.period.lock().map(|p| p.left_out).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_ten_lines_a_second_per_upstream() {
        let log = FailureLog::default();
        let admitted = (0..25).filter(|_| log.admit("app.shop")).count();
        assert_eq!(admitted, 10);
        assert_eq!(log.left_out(), 15);
        tokio::time::advance(PERIOD).await;
        assert!(log.admit("app.shop"), "a new second, new lines");
        assert_eq!(log.left_out(), 0);
    }
}
