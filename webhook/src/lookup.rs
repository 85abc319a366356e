//! Looking up the Services that upstreams name. The only Kubernetes API I/O of injection lives
//! here, behind [`ServiceLookup`], so everything else is pure and tests use [`StaticLookup`].

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The parts of a Service that injection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `clusterIP: None`: DNS returns every ready pod IP.
    pub headless: bool,
    pub cluster_ip: Option<String>,
    pub ports: Vec<ServicePort>,
    /// The `fanout.dev/service-config` annotation's text, if it has one.
    pub service_config: Option<String>,
    /// The `fanout.dev/policy` annotation's text, if it has one.
    pub policy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
}

/// Where traffic for a Service port lands on the pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// No targetPort: the same as the Service port.
    Same,
    Number(u16),
    /// A container port name, which differs per pod and cannot be resolved from the Service.
    Name(String),
}

/// The outcome of one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(ServiceInfo),
    NotFound,
    /// The API could not be asked (unreachable, forbidden, timed out).
    Failed(String),
    /// Lookups are off (`--no-lookup`).
    Skipped,
}

pub trait ServiceLookup: Send + Sync {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Lookup>;
}

impl ServiceInfo {
    pub fn from_service(service: &Service) -> Self {
        let spec = service.spec.clone().unwrap_or_default();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match p.target_port {
                    None => TargetPort::Same,
                    Some(IntOrString::Int(n)) => u16::try_from(n)
                        .map(TargetPort::Number)
                        .unwrap_or(TargetPort::Same),
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(s),
                    },
                };
                Some(ServicePort {
                    name: p.name,
                    port,
                    target,
                })
            })
            .collect();
        let annotation = |name: &str| {
            service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(name))
                .cloned()
        };
        Self {
            headless: spec.cluster_ip.as_deref() == Some("None"),
            cluster_ip: spec.cluster_ip,
            ports,
            service_config: annotation(crate::annotations::SERVICE_CONFIG),
            policy: annotation(crate::annotations::POLICY),
        }
    }
}

/// No API calls: every lookup is [`Lookup::Skipped`].
pub struct NoLookup;

impl ServiceLookup for NoLookup {
    fn lookup<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Lookup> {
        Box::pin(async { Lookup::Skipped })
    }
}

/// A fixed catalogue of Services, keyed by `(namespace, name)`; anything else is not found.
#[derive(Default)]
pub struct StaticLookup(pub HashMap<(String, String), ServiceInfo>);

impl StaticLookup {
    pub fn with(mut self, namespace: &str, name: &str, info: ServiceInfo) -> Self {
        self.0.insert((namespace.into(), name.into()), info);
        self
    }
}

impl ServiceLookup for StaticLookup {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Lookup> {
        let found = self
            .0
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(async move { found.map(Lookup::Found).unwrap_or(Lookup::NotFound) })
    }
}

/// Services from the Kubernetes API, each call bounded by `timeout` so a slow API server never
/// holds an admission past its deadline.
pub struct KubeLookup {
    client: kube::Client,
    timeout: Duration,
}

impl KubeLookup {
    pub fn new(client: kube::Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }
}

impl ServiceLookup for KubeLookup {
    fn lookup<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, Lookup> {
        Box::pin(async move {
            let api = kube::Api::<Service>::namespaced(self.client.clone(), namespace);
            match tokio::time::timeout(self.timeout, api.get_opt(name)).await {
                Ok(Ok(Some(service))) => Lookup::Found(ServiceInfo::from_service(&service)),
                Ok(Ok(None)) => Lookup::NotFound,
                Ok(Err(e)) => Lookup::Failed(e.to_string()),
                Err(_) => Lookup::Failed(format!("no answer within {:?}", self.timeout)),
            }
        })
    }
}
