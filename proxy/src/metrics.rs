//! Prometheus metrics of the proxy.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub upstream: String,
    pub endpoint: String,
    /// The call's grpc-status, or `none` when it ended without one (reset, proxy error).
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub upstream: String,
    /// `unsent`, `refused` (REFUSED_STREAM), `goaway` (above the GOAWAY last stream id),
    /// `unavailable` (a Trailers-Only UNAVAILABLE, the proxy's own rule); by the Service's
    /// retry policy: `policy:<CODE>` (e.g. `policy:UNAVAILABLE`) or `policy:per_attempt_timeout`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnotationLabels {
    pub upstream: String,
    /// `fanout.dev/service-config` or `fanout.dev/policy`.
    pub annotation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub upstream: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoverySourceLabels {
    pub upstream: String,
    /// `endpoints`, `dns`, `srv` or `static`.
    pub source: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<UpstreamLabels, Histogram>,
    pub endpoints: Family<EndpointStateLabels, Gauge>,
    pub discovery_source: Family<DiscoverySourceLabels, Gauge>,
    retries: Family<RetryLabels, Counter>,
    retries_refused: Family<UpstreamLabels, Counter>,
    retries_throttled: Family<UpstreamLabels, Counter>,
    pub annotation_rejected: Family<AnnotationLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "fanout_proxy_requests",
            "Calls forwarded, by endpoint and grpc-status",
            requests.clone(),
        );
        let duration = Family::<UpstreamLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "fanout_proxy_request_duration_seconds",
            "Time from a call's arrival to its end",
            duration.clone(),
        );
        let endpoints = Family::<EndpointStateLabels, Gauge>::default();
        registry.register(
            "fanout_proxy_endpoints",
            "Endpoints of each upstream by state",
            endpoints.clone(),
        );
        let discovery_source = Family::<DiscoverySourceLabels, Gauge>::default();
        registry.register(
            "fanout_proxy_discovery_source",
            "1 for the source the upstream's endpoint set comes from now (endpoints: the \
             discovery server; dns or srv: DNS, configured or as the server's fallback)",
            discovery_source.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "fanout_proxy_retries",
            "Calls sent again to another endpoint, by why",
            retries.clone(),
        );
        let retries_refused = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "fanout_proxy_retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            retries_refused.clone(),
        );
        let retries_throttled = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "fanout_proxy_retries_throttled",
            "Retries not made because the Service's retryThrottling held them back",
            retries_throttled.clone(),
        );
        let annotation_rejected = Family::<AnnotationLabels, Gauge>::default();
        registry.register(
            "fanout_proxy_service_annotation_rejected",
            "1 while the upstream Service's latest fanout.dev/service-config or fanout.dev/policy \
             is invalid (the last valid one stays in force; /endpoints names the faults)",
            annotation_rejected.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            endpoints,
            discovery_source,
            retries,
            retries_refused,
            retries_throttled,
            annotation_rejected,
        }
    }
}

impl Metrics {
    /// The counter of calls to `endpoint` that ended with `status`; endpoints keep it, so the
    /// per-call path builds no label sets.
    pub fn requests_counter(&self, upstream: &str, endpoint: &str, status: Option<u16>) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_string(),
                endpoint: endpoint.to_string(),
                grpc_status: status.map_or_else(|| "none".to_string(), |s| s.to_string()),
            })
            .clone()
    }

    pub fn duration_histogram(&self, upstream: &str) -> Histogram {
        self.duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone()
    }

    pub fn record_retry(&self, upstream: &str, reason: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                upstream: upstream.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn record_retry_refused(&self, upstream: &str) {
        self.retries_refused
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    pub fn record_retry_throttled(&self, upstream: &str) {
        self.retries_throttled
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
