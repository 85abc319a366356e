//! The `fanout.dev/upstreams` grammar:
//! `<service>[.<namespace>]:<port>[=<local port>]`, comma-separated, where `<port>` is a number or
//! a Service port name. Parsing is pure and reports every fault of the value at once.

use std::collections::HashMap;
use std::fmt;

use fanout_proxy_config::ADMIN_PORT;

use crate::annotations::{ENV_PREFIX, FIRST_LOCAL_PORT, UPSTREAMS};

pub use fanout_proxy_config::names::{is_dns_1035_label, is_dns_1123_label, is_port_name};

/// The Service port an upstream names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(name) => f.write_str(name),
        }
    }
}

/// One parsed entry of the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRef {
    /// The entry as written, for messages.
    pub text: String,
    pub service: String,
    /// As written; `None` means the pod's own namespace.
    pub namespace: Option<String>,
    pub port: PortRef,
    pub local_port: u16,
}

impl UpstreamRef {
    /// `FANOUT_UPSTREAM_<SERVICE>[_<NAMESPACE>]`: upper-cased, other characters `_`.
    pub fn env_name(&self) -> String {
        let upper = |part: &str| -> String {
            part.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        let mut name = format!("{ENV_PREFIX}{}", upper(&self.service));
        if let Some(ns) = &self.namespace {
            name.push('_');
            name.push_str(&upper(ns));
        }
        name
    }

    /// The upstream's name in the proxy config, metrics and logs: `service.namespace`.
    pub fn qualified_name(&self, pod_namespace: &str) -> String {
        format!(
            "{}.{}",
            self.service,
            self.namespace.as_deref().unwrap_or(pod_namespace)
        )
    }
}

/// Everything wrong with one annotation value; displays as one message naming the annotation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {UPSTREAMS} is invalid: {}", .faults.join("; "))]
pub struct UpstreamsError {
    pub faults: Vec<String>,
}

/// Parses the annotation value. `taken_ports` are ports the pod's containers already declare,
/// which a local port must not reuse (they share one network namespace).
pub fn parse(
    value: &str,
    taken_ports: &[(String, u16)],
) -> Result<Vec<UpstreamRef>, UpstreamsError> {
    let mut faults = Vec::new();
    let mut upstreams: Vec<UpstreamRef> = Vec::new();
    if value.trim().is_empty() {
        faults.push(
            "it is empty; list upstreams as <service>[.<namespace>]:<port>, e.g. \"app:50051\""
                .into(),
        );
    } else {
        for (index, raw) in value.split(',').enumerate() {
            match parse_entry(raw.trim(), index) {
                Ok(upstream) => upstreams.push(upstream),
                Err(fault) => faults.push(format!("entry {} {fault}", index + 1)),
            }
        }
    }
    check_clashes(&upstreams, taken_ports, &mut faults);
    if faults.is_empty() {
        Ok(upstreams)
    } else {
        Err(UpstreamsError { faults })
    }
}

fn parse_entry(entry: &str, index: usize) -> Result<UpstreamRef, String> {
    if entry.is_empty() {
        return Err("is empty (a stray comma?)".into());
    }
    let quoted = format!("{entry:?}");
    let (target, local) = match entry.split_once('=') {
        Some((target, local)) => (target.trim(), Some(local.trim())),
        None => (entry, None),
    };
    let Some((host, port)) = target.rsplit_once(':') else {
        return Err(format!(
            "{quoted} has no port; write <service>[.<namespace>]:<port>"
        ));
    };
    let (service, namespace) = match host.split_once('.') {
        Some((service, namespace)) => (service, Some(namespace)),
        None => (host, None),
    };
    if !is_dns_1035_label(service) {
        return Err(format!(
            "{quoted}: {service:?} is not a Service name (lowercase letters, digits and '-', \
             starting with a letter, at most 63)"
        ));
    }
    if let Some(namespace) = namespace {
        if namespace.contains('.') {
            return Err(format!(
                "{quoted}: write <service>.<namespace>, not a longer DNS name (the cluster domain \
                 is added by fanout)"
            ));
        }
        if !is_dns_1123_label(namespace) {
            return Err(format!(
                "{quoted}: {namespace:?} is not a namespace name (lowercase letters, digits and \
                 '-', at most 63)"
            ));
        }
    }
    let port = parse_port_ref(port).map_err(|m| format!("{quoted}: {m}"))?;
    let local_port = match local {
        None => FIRST_LOCAL_PORT
            .checked_add(index as u16)
            .filter(|_| index < 1000)
            .ok_or_else(|| format!("{quoted}: too many upstreams for default local ports"))?,
        Some(text) => parse_number_port(text).map_err(|m| format!("{quoted}: local port {m}"))?,
    };
    if local_port < 1024 {
        return Err(format!(
            "{quoted}: local port {local_port} is privileged; the proxy runs as non-root, use 1024 \
             or above"
        ));
    }
    Ok(UpstreamRef {
        text: entry.to_string(),
        service: service.to_string(),
        namespace: namespace.map(str::to_string),
        port,
        local_port,
    })
}

fn parse_port_ref(text: &str) -> Result<PortRef, String> {
    if text.is_empty() {
        return Err("the port is empty".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_number_port(text).map(PortRef::Number);
    }
    if is_port_name(text) {
        Ok(PortRef::Name(text.to_string()))
    } else {
        Err(format!(
            "{text:?} is neither a port number (1-65535) nor a port name (lowercase letters, \
             digits and '-', at most 15)"
        ))
    }
}

fn parse_number_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a number 1-65535"));
    }
    match text.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("{text} is out of range 1-65535")),
    }
}

fn check_clashes(
    upstreams: &[UpstreamRef],
    taken_ports: &[(String, u16)],
    faults: &mut Vec<String>,
) {
    let mut by_port: HashMap<u16, &UpstreamRef> = HashMap::new();
    let mut by_env: HashMap<String, &UpstreamRef> = HashMap::new();
    for upstream in upstreams {
        let port = upstream.local_port;
        if port == ADMIN_PORT {
            faults.push(format!(
                "{:?} takes local port {port}, the proxy's admin port; choose another with =<port>",
                upstream.text
            ));
        }
        if let Some(first) = by_port.insert(port, upstream) {
            faults.push(format!(
                "{:?} and {:?} both use local port {port}; give one another with =<port>",
                first.text, upstream.text
            ));
        }
        if let Some((container, _)) = taken_ports.iter().find(|(_, p)| *p == port) {
            faults.push(format!(
                "{:?} takes local port {port}, which container {container:?} already declares; \
                 choose another with =<port>",
                upstream.text
            ));
        }
        if let Some(first) = by_env.insert(upstream.env_name(), upstream) {
            faults.push(format!(
                "{:?} and {:?} are the same upstream (both would set {})",
                first.text,
                upstream.text,
                upstream.env_name()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(value: &str) -> Vec<UpstreamRef> {
        parse(value, &[]).unwrap_or_else(|e| panic!("{value:?}: {e}"))
    }

    #[test]
    fn parses_the_grammar() {
        let ups = ok("app:50051, billing.payments:grpc=16000,cache:7000");
        assert_eq!(ups.len(), 3);
        assert_eq!(ups[0].service, "app");
        assert_eq!(ups[0].namespace, None);
        assert_eq!(ups[0].port, PortRef::Number(50051));
        assert_eq!(ups[0].local_port, 15001);
        assert_eq!(ups[1].namespace.as_deref(), Some("payments"));
        assert_eq!(ups[1].port, PortRef::Name("grpc".into()));
        assert_eq!(ups[1].local_port, 16000);
        assert_eq!(ups[2].local_port, 15003, "defaults follow list order");
        assert_eq!(ups[1].env_name(), "FANOUT_UPSTREAM_BILLING_PAYMENTS");
        assert_eq!(ok("my-app:1")[0].env_name(), "FANOUT_UPSTREAM_MY_APP");
        assert_eq!(ups[0].qualified_name("shop"), "app.shop");
    }

    /// Each malformed value is denied with a message naming the annotation and the fault.
    #[test]
    fn malformed_values_are_denied_with_actionable_messages() {
        let cases: &[(&str, &str)] = &[
            ("", "it is empty"),
            ("   ", "it is empty"),
            ("app:50051,", "entry 2 is empty (a stray comma?)"),
            (",app:50051", "entry 1 is empty"),
            ("app:1,,b:2", "entry 2 is empty"),
            ("app", "\"app\" has no port"),
            ("app:", "the port is empty"),
            ("app:0", "0 is out of range 1-65535"),
            ("app:65536", "65536 is out of range 1-65535"),
            ("app:99999999999", "out of range 1-65535"),
            ("app:-1", "\"-1\" is neither a port number"),
            ("app:GRPC", "\"GRPC\" is neither a port number"),
            ("app:my--port", "neither a port number"),
            ("App:50051", "\"App\" is not a Service name"),
            ("1app:50051", "\"1app\" is not a Service name"),
            (":50051", "\"\" is not a Service name"),
            ("app.Shop:1", "\"Shop\" is not a namespace name"),
            ("app.shop.svc.cluster.local:1", "not a longer DNS name"),
            ("app:1=0", "local port 0 is out of range 1-65535"),
            ("app:1=70000", "local port 70000 is out of range"),
            ("app:1=abc", "local port \"abc\" is not a number"),
            ("app:1=80", "local port 80 is privileged"),
            ("app:1=15020", "the proxy's admin port"),
            (
                "a:1=16000,b:2=16000",
                "\"a:1=16000\" and \"b:2=16000\" both use local port 16000",
            ),
            ("a:1=15002,b:2", "both use local port 15002"),
            (
                "app:1,app:2",
                "are the same upstream (both would set FANOUT_UPSTREAM_APP)",
            ),
        ];
        for (value, expected) in cases {
            let err = parse(value, &[]).expect_err(value).to_string();
            assert!(
                err.starts_with("annotation fanout.dev/upstreams is invalid: "),
                "{err}"
            );
            assert!(
                err.contains(expected),
                "{value:?}: {err:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn every_fault_is_listed() {
        let err = parse("app:0,,b", &[]).unwrap_err();
        assert_eq!(err.faults.len(), 3, "{err}");
    }

    #[test]
    fn local_ports_must_not_clash_with_container_ports() {
        let err = parse("app:50051", &[("gateway".into(), 15001)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("container \"gateway\" already declares"),
            "{err}"
        );
    }

    #[test]
    fn twenty_upstreams_reach_the_admin_port() {
        let value: Vec<String> = (0..20).map(|i| format!("s{i}:1")).collect();
        let err = parse(&value.join(","), &[]).unwrap_err();
        assert!(err.to_string().contains("admin port"), "{err}");
    }
}
