//! What a call leaves behind however it ends: the drain's activity count and the duration
//! histogram per call; per attempt on an endpoint, its outstanding count, the requests counter
//! and the outcome that drives ejection. Guards, so an early return or a dropped task still
//! counts.

use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use crate::activity::Activity;
use crate::endpoint::Endpoint;
use crate::grpc;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// One call from arrival to its end.
pub struct CallGuard {
    activity: Arc<Activity>,
    duration: Histogram,
    pub arrived: Instant,
}

impl CallGuard {
    pub fn new(activity: Arc<Activity>, duration: Histogram) -> Self {
        activity.started();
        Self {
            activity,
            duration,
            arrived: Instant::now(),
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.duration.observe(self.arrived.elapsed().as_secs_f64());
        self.activity.ended();
    }
}

/// How an attempt on one endpoint ended, as far as that endpoint is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call ended with this grpc-status, or without one (`None`: reset, connection lost).
    Status(Option<u16>),
    /// The endpoint provably did not process the stream (refused, above GOAWAY, never sent):
    /// neither counted nor held against it.
    Unprocessed,
}

/// One attempt of a call on one endpoint.
pub struct AttemptGuard {
    pub endpoint: Arc<Endpoint>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    pub outcome: Outcome,
    /// When the request went out, while it waits for its response headers.
    awaiting_since: Option<Instant>,
}

impl AttemptGuard {
    pub fn new(endpoint: Arc<Endpoint>, upstream: Arc<Upstream>, metrics: Arc<Metrics>) -> Self {
        endpoint.stream_started();
        Self {
            endpoint,
            upstream,
            metrics,
            outcome: Outcome::Status(None),
            awaiting_since: None,
        }
    }

    /// The request went out; it waits for its response headers.
    pub fn sent(&mut self) {
        let clock = self.upstream.clock();
        self.endpoint.request_sent(&clock);
        self.awaiting_since = Some(clock.now);
    }

    /// Its response headers came: the time since it was sent is a latency sample.
    pub fn answered(&mut self) {
        if let Some(sent) = self.awaiting_since.take() {
            let clock = self.upstream.clock();
            self.endpoint
                .request_answered(clock.now.saturating_duration_since(sent), &clock);
        }
    }

    pub fn set_status(&mut self, status: Option<u16>) {
        self.outcome = Outcome::Status(status);
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        self.endpoint.stream_ended();
        if self.awaiting_since.is_some() {
            self.endpoint.request_abandoned();
        }
        let Outcome::Status(status) = self.outcome else {
            return;
        };
        self.endpoint
            .count_request(status, &self.metrics, &self.upstream.name);
        // A call the client cancelled says nothing about the endpoint.
        if status != Some(grpc::CANCELLED) {
            self.upstream.record_outcome(&self.endpoint, status);
        }
    }
}
