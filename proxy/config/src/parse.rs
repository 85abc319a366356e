//! JSON text to [`ProxyConfig`], with every fault reported with its path.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::discovery::{read_discovery, read_discovery_server};
use crate::reader::{self, Object, check_uint, kind, parse_socket_addr};
use crate::{
    AdminConfig, Balancer, CONFIG_VERSION, Discovery, DrainConfig, Ejection, GrpcHealth,
    HealthCheck, MAX_RETRY_BUFFER_BYTES, ProxyConfig, Retry, Timeouts, UpstreamConfig,
};

/// One problem in a config document, at a path such as `upstreams[0].discovery.dns.port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every fault of a document; displays as one line per fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Faults(pub Vec<Fault>);

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fault) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{fault}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    Invalid(Faults),
}

impl Faults {
    /// One line per fault.
    pub fn lines(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl ConfigError {
    /// One line per fault, as printed at start and by `fanout-proxy check`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Json(e) => vec![format!("not valid JSON: {e}")],
            ConfigError::Invalid(faults) => faults.lines(),
        }
    }
}

/// A JSON document read by `read`, with every fault it recorded (text that is not JSON is one
/// fault): for the annotations a Service's owner writes.
pub(crate) fn read_document<T>(
    text: &str,
    read: impl FnOnce(&Value, &reader::Faults) -> Option<T>,
) -> Result<T, Faults> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Faults(vec![Fault {
            path: String::new(),
            message: format!("not JSON: {e}"),
        }])
    })?;
    let faults = reader::Faults::default();
    let document = read(&value, &faults);
    let faults = faults.into_vec();
    match document {
        Some(document) if faults.is_empty() => Ok(document),
        _ => Err(Faults(faults)),
    }
}

pub(crate) fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(ConfigError::Json)?;
    let faults = reader::Faults::default();
    let config = read_config(&value, &faults);
    let faults = faults.into_vec();
    match config {
        Some(config) if faults.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid(Faults(faults))),
    }
}

fn read_config(value: &Value, faults: &reader::Faults) -> Option<ProxyConfig> {
    let root = Object::new(String::new(), value, faults)?;
    let version = root.required("version").and_then(|v| match v.as_u64() {
        Some(n) if n == u64::from(CONFIG_VERSION) => Some(CONFIG_VERSION),
        _ => {
            root.fault(
                "version",
                format!("this proxy reads config version {CONFIG_VERSION}, got {v}"),
            );
            None
        }
    });
    let admin = match root.object("admin") {
        None => AdminConfig::default(),
        Some(obj) => {
            let admin = AdminConfig {
                listen: obj.socket_addr_or("listen", AdminConfig::default().listen),
            };
            obj.finish();
            admin
        }
    };
    let drain = match root.object("drain") {
        None => DrainConfig::default(),
        Some(obj) => {
            let default = DrainConfig::default();
            let drain = DrainConfig {
                quiet: obj.duration_or("quiet", default.quiet, Duration::ZERO),
                deadline: obj.duration_or("deadline", default.deadline, Duration::ZERO),
            };
            obj.finish();
            drain
        }
    };
    let grpc_health = root.object("grpc_health").and_then(read_grpc_health);
    let discovery_server = root
        .object("discovery_server")
        .and_then(read_discovery_server);
    let upstreams = read_upstreams(&root, root.get("grpc_health").is_some());
    let server_given = root.get("discovery_server").is_some();
    root.finish();
    if let Some(upstreams) = &upstreams {
        check_listeners(upstreams, &admin, faults);
        for (i, upstream) in upstreams.iter().enumerate() {
            if matches!(upstream.discovery, Discovery::Endpoints(_)) && !server_given {
                faults.add(
                    &format!("upstreams[{i}].discovery.endpoints"),
                    "needs \"discovery_server\" {address, ca} at the top level",
                );
            }
        }
    }
    Some(ProxyConfig {
        version: version?,
        admin,
        drain,
        upstreams: upstreams?,
        grpc_health,
        discovery_server,
    })
}

/// `upstreams` may be empty (or absent) only for a proxy that answers `grpc_health` alone.
fn read_upstreams(root: &Object<'_>, health_only: bool) -> Option<Vec<UpstreamConfig>> {
    let list = if health_only {
        match root.get("upstreams") {
            Some(list) => list,
            None => return Some(Vec::new()),
        }
    } else {
        root.required("upstreams")?
    };
    let Value::Array(items) = list else {
        root.fault("upstreams", format!("must be a list, got {}", kind(list)));
        return None;
    };
    if items.is_empty() && !health_only {
        root.fault(
            "upstreams",
            "must list at least one upstream (or set grpc_health)",
        );
        return None;
    }
    let mut upstreams = Vec::with_capacity(items.len());
    let mut complete = true;
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", root.field_path("upstreams"));
        match Object::new(path, item, root.faults()).and_then(read_upstream) {
            Some(upstream) => upstreams.push(upstream),
            None => complete = false,
        }
    }
    complete.then_some(upstreams)
}

fn read_upstream(obj: Object<'_>) -> Option<UpstreamConfig> {
    let name = obj.required_string("name").and_then(|name| {
        if name.trim().is_empty() {
            obj.fault("name", "must not be empty");
            None
        } else {
            Some(name.to_string())
        }
    });
    let listen = obj.required_string("listen").and_then(|text| {
        parse_socket_addr(text, None)
            .map_err(|m| obj.fault("listen", m))
            .ok()
    });
    if let Some(addr) = listen.filter(|a| a.port() == 0) {
        obj.fault("listen", format!("{addr} needs a fixed port, not 0"));
    }
    let discovery = obj
        .required("discovery")
        .and_then(|_| obj.object("discovery").and_then(read_discovery));
    let balancer = match obj.string("balancer") {
        None => Some(Balancer::default()),
        Some(name) => Balancer::from_name(name).or_else(|| {
            obj.fault(
                "balancer",
                format!(
                    "unknown balancer {name:?}; use one of {}",
                    Balancer::NAMES.join(", ")
                ),
            );
            None
        }),
    };
    let timeouts = match obj.object("timeouts") {
        None => Timeouts::default(),
        Some(t) => {
            let timeouts = Timeouts {
                connect: t.duration_or(
                    "connect",
                    Timeouts::default().connect,
                    Duration::from_millis(1),
                ),
                request: t.opt_duration("request", Duration::from_millis(1)),
                idle: t.opt_duration("idle", Duration::from_millis(1)),
            };
            t.finish();
            timeouts
        }
    };
    let connections_per_endpoint = obj.uint_or("connections_per_endpoint", 1, 1, 16) as u32;
    let health_check = obj.object("health_check").map(read_health_check);
    let ejection = obj
        .object("ejection")
        .map(read_ejection)
        .unwrap_or_default();
    let retry = obj.object("retry").map(read_retry).unwrap_or_default();
    let service_config = obj
        .get("service_config")
        .and_then(|value| read_service_config(&obj, value));
    obj.finish();
    Some(UpstreamConfig {
        name: name?,
        listen: listen?,
        discovery: discovery?,
        balancer: balancer?,
        timeouts,
        connections_per_endpoint,
        health_check,
        ejection,
        retry,
        service_config,
    })
}

/// A gRPC service config, as an object or as the JSON text of one (the Service annotation's
/// value, copied): its faults keep their paths below `service_config`.
fn read_service_config(obj: &Object<'_>, value: &Value) -> Option<Value> {
    let path = obj.field_path("service_config");
    let document = match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(document) => document,
            Err(e) => {
                obj.fault("service_config", format!("not JSON: {e}"));
                return None;
            }
        },
        other => other.clone(),
    };
    match crate::service_config::ServiceConfig::parse(&document.to_string()) {
        Ok(_) => Some(document),
        Err(faults) => {
            for fault in faults.0 {
                let at = if fault.path.is_empty() {
                    path.clone()
                } else {
                    format!("{path}.{}", fault.path)
                };
                obj.faults().add(&at, fault.message);
            }
            None
        }
    }
}

pub(crate) fn read_health_check(obj: Object<'_>) -> HealthCheck {
    let d = HealthCheck::default();
    let check = HealthCheck {
        interval: obj.duration_or("interval", d.interval, Duration::from_millis(10)),
        timeout: obj.duration_or("timeout", d.timeout, Duration::from_millis(1)),
        healthy_threshold: obj.uint_or("healthy_threshold", d.healthy_threshold.into(), 1, 100)
            as u32,
        unhealthy_threshold: obj.uint_or(
            "unhealthy_threshold",
            d.unhealthy_threshold.into(),
            1,
            100,
        ) as u32,
        service: obj.string("service").unwrap_or_default().to_string(),
    };
    if check.timeout > check.interval {
        obj.fault(
            "timeout",
            format!(
                "must not exceed interval ({} > {})",
                crate::duration::format(check.timeout),
                crate::duration::format(check.interval)
            ),
        );
    }
    obj.finish();
    check
}

fn read_grpc_health(obj: Object<'_>) -> Option<GrpcHealth> {
    let port = obj.required("port").and_then(|v| {
        check_uint(v, 1, 65535)
            .map_err(|m| obj.fault("port", m))
            .ok()
    });
    let d = GrpcHealth::new(0, "");
    let service = obj.string("service").unwrap_or_default().to_string();
    let timeout = obj.duration_or("timeout", d.timeout, Duration::from_millis(1));
    let cache = obj.duration_or("cache", d.cache, Duration::ZERO);
    obj.finish();
    Some(GrpcHealth {
        port: port? as u16,
        service,
        timeout,
        cache,
    })
}

pub(crate) fn read_ejection(obj: Object<'_>) -> Ejection {
    let d = Ejection::default();
    let ejection = Ejection {
        consecutive_failures: obj.uint_or(
            "consecutive_failures",
            d.consecutive_failures.into(),
            1,
            1000,
        ) as u32,
        base_time: obj.duration_or("base_time", d.base_time, Duration::from_millis(1)),
        max_time: obj.duration_or("max_time", d.max_time, Duration::from_millis(1)),
        max_ejected_percent: obj.uint_or(
            "max_ejected_percent",
            d.max_ejected_percent.into(),
            0,
            100,
        ) as u32,
    };
    if ejection.base_time > ejection.max_time {
        obj.fault("max_time", "must not be shorter than base_time");
    }
    obj.finish();
    ejection
}

fn read_retry(obj: Object<'_>) -> Retry {
    let d = Retry::default();
    let retry = Retry {
        enabled: obj.bool_or("enabled", d.enabled),
        budget_percent: obj.uint_or("budget_percent", d.budget_percent.into(), 0, 100) as u32,
        max_buffer_bytes: obj.uint_or(
            "max_buffer_bytes",
            d.max_buffer_bytes.into(),
            0,
            MAX_RETRY_BUFFER_BYTES.into(),
        ) as u32,
    };
    obj.finish();
    retry
}

/// Names and listen addresses must be unique, and no listener may take the admin port.
fn check_listeners(upstreams: &[UpstreamConfig], admin: &AdminConfig, faults: &reader::Faults) {
    let mut names = HashMap::new();
    let mut listens = HashMap::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        if let Some(first) = names.insert(upstream.name.as_str(), i) {
            faults.add(
                &format!("upstreams[{i}].name"),
                format!("{:?} is also the name of upstreams[{first}]", upstream.name),
            );
        }
        if let Some(first) = listens.insert(upstream.listen, i) {
            faults.add(
                &format!("upstreams[{i}].listen"),
                format!(
                    "{} is also the listen address of upstreams[{first}]",
                    upstream.listen
                ),
            );
        }
        if upstream.listen.port() == admin.listen.port()
            && (admin.listen.ip().is_unspecified() || admin.listen.ip() == upstream.listen.ip())
        {
            faults.add(
                &format!("upstreams[{i}].listen"),
                format!(
                    "{} clashes with the admin listener {}",
                    upstream.listen, admin.listen
                ),
            );
        }
    }
}
