//! What the chart (or the command line) decides for every injected pod.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

/// When the proxy runs as a native sidecar (an init container with `restartPolicy: Always`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NativeSidecarMode {
    /// Native where the cluster supports it: Kubernetes 1.29 or later (asked at start), or a pod
    /// that already carries a native sidecar (the API server accepted one, so it supports them).
    #[default]
    Auto,
    Always,
    Never,
}

impl FromStr for NativeSidecarMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "true" | "always" => Ok(Self::Always),
            "false" | "never" => Ok(Self::Never),
            other => Err(format!("{other:?} is not one of auto, true, false")),
        }
    }
}

impl fmt::Display for NativeSidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Always => "true",
            Self::Never => "false",
        })
    }
}

/// What the injected proxy's readiness probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// Whether the proxy can serve (`/ready/proxy`): config loaded, listeners bound, first
    /// discovery answer in or timed out. An upstream's outage does not make its callers
    /// NotReady too.
    #[default]
    Proxy,
    /// Also whether every upstream has a ready endpoint (`/ready`).
    Upstreams,
}

impl Readiness {
    /// The admin path the probe asks.
    pub fn path(self) -> &'static str {
        match self {
            Self::Proxy => "/ready/proxy",
            Self::Upstreams => "/ready",
        }
    }
}

impl FromStr for Readiness {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "proxy" => Ok(Self::Proxy),
            "upstreams" => Ok(Self::Upstreams),
            other => Err(format!("{other:?} is neither \"proxy\" nor \"upstreams\"")),
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Proxy => "proxy",
            Self::Upstreams => "upstreams",
        })
    }
}

/// Requests and limits of the proxy container; `None` leaves that one unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: Some("10m".into()),
            cpu_limit: None,
            memory_request: Some("16Mi".into()),
            memory_limit: Some("64Mi".into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_image: String,
    pub image_pull_policy: String,
    pub resources: ProxyResources,
    /// Appended to `<service>.<namespace>.svc.` for DNS discovery.
    pub cluster_domain: String,
    pub native_sidecar: NativeSidecarMode,
    /// Whether the cluster runs native sidecars; decided once at start for `Auto`.
    pub cluster_has_native_sidecars: bool,
    /// `FANOUT_LOG` of the proxy (a tracing filter such as `info` or `fanout_proxy=debug`);
    /// `None` keeps the proxy's default.
    pub proxy_log_level: Option<String>,
    /// The proxy's readiness probe, unless a pod's `fanout.dev/readiness` says otherwise.
    pub readiness: Readiness,
    /// Where proxies subscribe for endpoints; `None`: they use DNS alone.
    pub discovery: Option<DiscoveryTarget>,
    /// Written to `fanout.dev/injected`.
    pub version: String,
}

impl Default for Settings {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            proxy_image: format!("fanout/fanout-proxy:{version}"),
            image_pull_policy: "IfNotPresent".into(),
            resources: ProxyResources::default(),
            cluster_domain: "cluster.local".into(),
            native_sidecar: NativeSidecarMode::Auto,
            cluster_has_native_sidecars: false,
            proxy_log_level: None,
            readiness: Readiness::default(),
            discovery: None,
            version,
        }
    }
}

/// The discovery server as rendered into proxy configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryTarget {
    /// `host:port` the proxies dial; the host is a name the server's certificate carries.
    pub address: String,
    /// The CAs proxies trust for it, kept current by whoever manages the certificate.
    pub ca: SharedPem,
}

/// PEM text that a background task may replace while admissions read it.
#[derive(Clone, Default)]
pub struct SharedPem(Arc<RwLock<String>>);

impl SharedPem {
    pub fn new(pem: impl Into<String>) -> Self {
        Self(Arc::new(RwLock::new(pem.into())))
    }

    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the text; `true` when it changed.
    pub fn set(&self, pem: &str) -> bool {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if *current == pem {
            return false;
        }
        *current = pem.to_string();
        true
    }
}

impl PartialEq for SharedPem {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.get() == other.get()
    }
}

impl Eq for SharedPem {}

impl fmt::Debug for SharedPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedPem({} bytes)", self.get().len())
    }
}

/// Native sidecars arrived (beta, on by default) in Kubernetes 1.29.
pub fn version_has_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) => major > 1 || (major == 1 && minor >= 29),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_from_1_29() {
        assert!(!version_has_native_sidecars("1", "28"));
        assert!(version_has_native_sidecars("1", "29"));
        assert!(
            version_has_native_sidecars("1", "30+"),
            "GKE/EKS minor versions carry a '+'"
        );
        assert!(!version_has_native_sidecars("x", "y"));
    }

    #[test]
    fn readiness_parses_from_chart_values() {
        assert_eq!("proxy".parse(), Ok(Readiness::Proxy));
        assert_eq!("upstreams".parse(), Ok(Readiness::Upstreams));
        assert!("ready".parse::<Readiness>().is_err());
        assert_eq!(Readiness::default().path(), "/ready/proxy");
    }

    #[test]
    fn modes_parse_from_chart_values() {
        assert_eq!("auto".parse(), Ok(NativeSidecarMode::Auto));
        assert_eq!("true".parse(), Ok(NativeSidecarMode::Always));
        assert_eq!("false".parse(), Ok(NativeSidecarMode::Never));
        assert!("yes".parse::<NativeSidecarMode>().is_err());
    }
}
