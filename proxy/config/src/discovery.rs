//! How an upstream finds its endpoints, and where the discovery server is: the types and their
//! reading from JSON.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::duration;
use crate::names::{is_dns_1035_label, is_dns_1123_label, is_port_name};
use crate::reader::{Object, check_uint, kind, parse_socket_addr};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// A and AAAA records of a name, dialled on one port.
    Dns(DnsDiscovery),
    /// SRV records of a named Service port: each target on its own port.
    Srv(SrvDiscovery),
    Static(Vec<SocketAddr>),
    /// The discovery server's snapshots of a Service (EndpointSlices), with DNS as fallback.
    Endpoints(EndpointsDiscovery),
}

impl Discovery {
    /// `dns`, `srv`, `static` or `endpoints`: names the source in `/endpoints` and metrics.
    pub fn source(&self) -> &'static str {
        match self {
            Self::Dns(_) => "dns",
            Self::Srv(_) => "srv",
            Self::Static(_) => "static",
            Self::Endpoints(_) => "endpoints",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DnsDiscovery {
    /// Resolved for A and AAAA records; absolute (no search domains are applied).
    pub name: String,
    pub port: u16,
    /// Empty: the system resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    #[serde(serialize_with = "duration::serialize")]
    pub refresh: Duration,
}

impl DnsDiscovery {
    pub fn new(name: impl Into<String>, port: u16) -> Self {
        Self {
            name: name.into(),
            port,
            nameservers: Vec::new(),
            refresh: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SrvDiscovery {
    /// `_<port name>._tcp.<service>.<namespace>.svc.<domain>`, taken as absolute.
    pub name: String,
    /// Empty: the system resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    #[serde(serialize_with = "duration::serialize")]
    pub refresh: Duration,
}

impl SrvDiscovery {
    /// The SRV name Kubernetes DNS serves for a named port of a Service.
    pub fn for_port(port_name: &str, service: &str, namespace: &str, domain: &str) -> Self {
        Self {
            name: format!("_{port_name}._tcp.{service}.{namespace}.svc.{domain}"),
            nameservers: Vec::new(),
            refresh: Duration::from_secs(5),
        }
    }
}

/// A Service port, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl Serialize for ServicePort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Number(n) => s.serialize_u16(*n),
            Self::Name(name) => s.serialize_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointsDiscovery {
    pub namespace: String,
    pub service: String,
    pub port: ServicePort,
    /// Used while no discovery server has answered: at start for `fallback_after`, or when the
    /// server has been away for `stale_after`.
    pub fallback: Box<Discovery>,
    #[serde(serialize_with = "duration::serialize")]
    pub fallback_after: Duration,
    #[serde(serialize_with = "duration::serialize")]
    pub stale_after: Duration,
}

impl EndpointsDiscovery {
    pub fn new(
        namespace: impl Into<String>,
        service: impl Into<String>,
        port: ServicePort,
        fallback: Discovery,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
            port,
            fallback: Box::new(fallback),
            fallback_after: Duration::from_secs(3),
            stale_after: Duration::from_secs(60),
        }
    }
}

/// The discovery server every `endpoints` upstream subscribes to, and the CAs that may sign its
/// certificate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiscoveryServer {
    /// `host:port`, e.g. `fanout-webhook.fanout-system.svc:15012`; the host is also the name
    /// its certificate must carry.
    pub address: String,
    /// PEM bundle of trusted CAs.
    pub ca: String,
}

pub(crate) fn read_discovery(obj: Object<'_>) -> Option<Discovery> {
    const KINDS: [&str; 4] = ["dns", "srv", "static", "endpoints"];
    let present: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| obj.get(k).is_some())
        .collect();
    let discovery = match present.as_slice() {
        [] => {
            obj.faults().add(
                &obj.path,
                "needs one of \"dns\" {name, port}, \"srv\" {name}, \"static\" [addresses] or \
                 \"endpoints\" {namespace, service, port, fallback}",
            );
            None
        }
        ["dns"] => obj.object("dns").and_then(read_dns).map(Discovery::Dns),
        ["srv"] => obj.object("srv").and_then(read_srv).map(Discovery::Srv),
        ["static"] => read_static(&obj, obj.get("static")?).map(Discovery::Static),
        ["endpoints"] => obj
            .object("endpoints")
            .and_then(read_endpoints)
            .map(Discovery::Endpoints),
        several => {
            obj.faults().add(
                &obj.path,
                format!("set one of {}, not several", several.join(", ")),
            );
            None
        }
    };
    obj.finish();
    discovery
}

fn read_nameservers(obj: &Object<'_>) -> Vec<SocketAddr> {
    let mut nameservers = Vec::new();
    match obj.get("nameservers") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{}[{i}]", obj.field_path("nameservers"));
                match item.as_str().map(|s| parse_socket_addr(s, Some(53))) {
                    Some(Ok(addr)) => nameservers.push(addr),
                    Some(Err(m)) => obj.faults().add(&path, m),
                    None => obj
                        .faults()
                        .add(&path, format!("must be a string, got {}", kind(item))),
                }
            }
        }
        Some(other) => obj.fault(
            "nameservers",
            format!("must be a list, got {}", kind(other)),
        ),
    }
    nameservers
}

fn read_name(obj: &Object<'_>) -> Option<String> {
    obj.required_string("name").and_then(|name| {
        check_dns_name(name)
            .map_err(|m| obj.fault("name", m))
            .ok()
            .map(|()| name.to_string())
    })
}

fn read_refresh(obj: &Object<'_>) -> Duration {
    obj.duration_or(
        "refresh",
        Duration::from_secs(5),
        Duration::from_millis(100),
    )
}

fn read_dns(obj: Object<'_>) -> Option<DnsDiscovery> {
    let name = read_name(&obj);
    let port = obj.required("port").and_then(|v| {
        check_uint(v, 1, 65535)
            .map_err(|m| obj.fault("port", m))
            .ok()
            .map(|p| p as u16)
    });
    let nameservers = read_nameservers(&obj);
    let refresh = read_refresh(&obj);
    obj.finish();
    Some(DnsDiscovery {
        name: name?,
        port: port?,
        nameservers,
        refresh,
    })
}

fn read_srv(obj: Object<'_>) -> Option<SrvDiscovery> {
    let name = read_name(&obj);
    let nameservers = read_nameservers(&obj);
    let refresh = read_refresh(&obj);
    obj.finish();
    Some(SrvDiscovery {
        name: name?,
        nameservers,
        refresh,
    })
}

fn read_static(obj: &Object<'_>, list: &Value) -> Option<Vec<SocketAddr>> {
    let Value::Array(items) = list else {
        obj.fault(
            "static",
            format!("must be a list of ip:port, got {}", kind(list)),
        );
        return None;
    };
    if items.is_empty() {
        obj.fault("static", "must list at least one ip:port");
        return None;
    }
    let mut addrs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", obj.field_path("static"));
        let parsed = match item.as_str() {
            Some(text) => parse_socket_addr(text, None),
            None => Err(format!("must be a string, got {}", kind(item))),
        };
        match parsed {
            Ok(addr) if addrs.contains(&addr) => {
                obj.faults().add(&path, format!("{addr} is listed twice"))
            }
            Ok(addr) => addrs.push(addr),
            Err(m) => obj.faults().add(&path, m),
        }
    }
    (addrs.len() == items.len()).then_some(addrs)
}

fn read_endpoints(obj: Object<'_>) -> Option<EndpointsDiscovery> {
    let label = |key: &'static str| {
        obj.required_string(key).and_then(|value| {
            let valid = match key {
                "service" => is_dns_1035_label(value),
                _ => is_dns_1123_label(value),
            };
            if valid {
                Some(value.to_string())
            } else {
                obj.fault(
                    key,
                    format!("{value:?} is not a Kubernetes name (a DNS label)"),
                );
                None
            }
        })
    };
    let namespace = label("namespace");
    let service = label("service");
    let port = obj.required("port").and_then(|value| match value {
        Value::String(name) if is_port_name(name) => Some(ServicePort::Name(name.clone())),
        Value::String(name) => {
            obj.fault("port", format!("{name:?} is not a port name"));
            None
        }
        other => check_uint(other, 1, 65535)
            .map_err(|m| obj.fault("port", m.replacen("must be ", "must be a port name or ", 1)))
            .ok()
            .map(|n| ServicePort::Number(n as u16)),
    });
    let fallback = obj.required("fallback").and_then(|_| {
        let fallback = obj.object("fallback").and_then(read_discovery)?;
        match fallback {
            Discovery::Dns(_) | Discovery::Srv(_) => Some(fallback),
            other => {
                obj.fault(
                    "fallback",
                    format!("must be \"dns\" or \"srv\", not {:?}", other.source()),
                );
                None
            }
        }
    });
    let fallback_after = obj.duration_or(
        "fallback_after",
        Duration::from_secs(3),
        Duration::from_millis(100),
    );
    let stale_after = obj.duration_or("stale_after", Duration::from_secs(60), Duration::ZERO);
    obj.finish();
    Some(EndpointsDiscovery {
        namespace: namespace?,
        service: service?,
        port: port?,
        fallback: Box::new(fallback?),
        fallback_after,
        stale_after,
    })
}

/// The host of a discovery server address `host:port` (an IPv6 literal without its brackets):
/// also the name the server's certificate must carry.
pub fn server_host(address: &str) -> Result<&str, String> {
    address
        .rsplit_once(':')
        .and_then(|(host, port)| {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let valid = port.parse::<u16>().is_ok_and(|p| p > 0)
                && (check_dns_name(host).is_ok() || host.parse::<std::net::IpAddr>().is_ok());
            valid.then_some(host)
        })
        .ok_or_else(|| {
            format!(
                "{address:?} is not host:port (e.g. \"fanout-webhook.fanout-system.svc:15012\")"
            )
        })
}

/// Whether `pem` holds at least one PEM certificate.
pub fn holds_certificate(pem: &str) -> bool {
    pem.contains("-----BEGIN CERTIFICATE-----")
}

pub(crate) fn read_discovery_server(obj: Object<'_>) -> Option<DiscoveryServer> {
    let address = obj.required_string("address").and_then(|address| {
        server_host(address)
            .map_err(|m| obj.fault("address", m))
            .ok()
            .map(|_| address.to_string())
    });
    let ca = obj.required_string("ca").and_then(|ca| {
        if holds_certificate(ca) {
            Some(ca.to_string())
        } else {
            obj.fault(
                "ca",
                "must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
            );
            None
        }
    });
    obj.finish();
    Some(DiscoveryServer {
        address: address?,
        ca: ca?,
    })
}

/// A DNS name as resolvers accept it: dot-separated labels of letters, digits and `-`.
pub(crate) fn check_dns_name(name: &str) -> Result<(), String> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(format!("{name:?} is not a DNS name (1 to 253 characters)"));
    }
    for label in trimmed.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!("{name:?} is not a DNS name (bad label {label:?})"));
        }
    }
    Ok(())
}
