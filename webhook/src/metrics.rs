//! Prometheus metrics of the webhook.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped`, `denied` or `error`.
    pub result: &'static str,
    /// Why: the skip or deny reason, `injected`, or the kind of error.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// The gRPC status code name: `invalid_argument`, `permission_denied`,
    /// `resource_exhausted`.
    pub code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    admissions: Family<AdmissionLabels, Counter>,
    duration: Histogram,
    /// Discovery watches open now.
    pub discovery_watches: Gauge,
    /// Snapshots sent to proxies.
    pub discovery_snapshots: Counter,
    pub discovery_refused: Family<RefusedLabels, Counter>,
    /// 1 once the first lists of Services and EndpointSlices are in.
    pub discovery_synced: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "fanout_webhook_admissions",
            "Admission reviews answered, by result and reason",
            admissions.clone(),
        );
        // 100µs to ~3s: admissions are sub-millisecond unless a Service lookup is slow.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.0001, 2.0, 15,
        ));
        registry.register(
            "fanout_webhook_admission_duration_seconds",
            "Time to answer one admission review, lookups included",
            duration.clone(),
        );
        let discovery_watches = Gauge::default();
        registry.register(
            "fanout_webhook_discovery_watches",
            "Discovery watches (one per proxy upstream) open on this replica",
            discovery_watches.clone(),
        );
        let discovery_snapshots = Counter::default();
        registry.register(
            "fanout_webhook_discovery_snapshots",
            "Upstream snapshots sent to proxies",
            discovery_snapshots.clone(),
        );
        let discovery_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "fanout_webhook_discovery_refused",
            "Watches refused, by gRPC status",
            discovery_refused.clone(),
        );
        let discovery_synced = Gauge::default();
        registry.register(
            "fanout_webhook_discovery_synced",
            "1 once this replica has listed Services and EndpointSlices",
            discovery_synced.clone(),
        );
        Self {
            registry,
            admissions,
            duration,
            discovery_watches,
            discovery_snapshots,
            discovery_refused,
            discovery_synced,
        }
    }
}

impl Metrics {
    pub fn record(&self, result: &'static str, reason: &'static str, elapsed: Duration) {
        self.admissions
            .get_or_create(&AdmissionLabels { result, reason })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
