//! What the discovery server knows of the cluster: Services and EndpointSlices boiled down to
//! what a proxy needs, and the snapshot of one upstream computed from them. Pure: the watch
//! feeds it, tests drive it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use fanout_discovery::v1::{Endpoint, Policy, Snapshot, SplitTarget};
use fanout_proxy_config::policy::Policy as FanoutPolicy;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::lookup::{ServiceInfo, TargetPort};
use crate::upstreams::PortRef;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `(namespace, name)` of a Service.
pub type ServiceKey = (String, String);

#[derive(Debug, Clone, PartialEq)]
struct ServiceEntry {
    /// With the policy annotations' texts, passed to proxies verbatim.
    info: ServiceInfo,
    /// The weighted split its `fanout.dev/policy` declares (the last valid one when a change
    /// does not parse: the proxies keep theirs too); empty: none.
    split: Vec<(ServiceKey, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
struct SliceEntry {
    service: String,
    /// `(name, port)`; unnamed ports have the name `""`, as in the Service.
    ports: Vec<(String, u16)>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Default)]
pub struct Catalog {
    services: HashMap<ServiceKey, ServiceEntry>,
    /// By `(namespace, slice name)`.
    slices: HashMap<ServiceKey, SliceEntry>,
    /// Slice names of each Service.
    slices_of: HashMap<ServiceKey, BTreeSet<String>>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ServiceKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// `previous`: what was stored for the Service, whose split stays when the policy is invalid.
fn service_entry(service: &Service, previous: Option<&ServiceEntry>) -> ServiceEntry {
    let info = ServiceInfo::from_service(service);
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let split = match info
        .policy
        .as_deref()
        .filter(|text| !text.trim().is_empty())
    {
        None => Vec::new(),
        Some(text) => match FanoutPolicy::parse(text) {
            Ok(policy) => policy
                .split
                .iter()
                .map(|target| {
                    let key = match target.service.split_once('.') {
                        Some((name, namespace)) => (namespace.to_string(), name.to_string()),
                        None => (namespace.clone(), target.service.clone()),
                    };
                    (key, target.weight)
                })
                .collect(),
            Err(_) => previous.map(|p| p.split.clone()).unwrap_or_default(),
        },
    };
    ServiceEntry { info, split }
}

fn slice_entry(slice: &EndpointSlice) -> Option<SliceEntry> {
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    // FQDN slices (no IPs to dial) carry nothing a proxy can use.
    if slice.address_type == "FQDN" {
        return None;
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok().filter(|&n| n > 0)?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // Kubernetes' documented defaults: unknown readiness is ready; serving follows ready.
        let ready = conditions.ready.unwrap_or(true);
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.as_ref())
            .map(|name| format!("{namespace}/{name}"))
            .unwrap_or_default();
        for address in &endpoint.addresses {
            let Ok(ip) = address.parse::<IpAddr>() else {
                continue;
            };
            endpoints.push(Endpoint {
                ip: ip.to_string(),
                port: 0,
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                zone: endpoint.zone.clone().unwrap_or_default(),
                node: endpoint.node_name.clone().unwrap_or_default(),
                pod: pod.clone(),
                service: String::new(),
            });
        }
    }
    Some(SliceEntry {
        service,
        ports,
        endpoints,
    })
}

/// The upstream a proxy asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub service: ServiceKey,
    pub port: PortRef,
}

impl Catalog {
    /// Stores a Service; returns it when what proxies see of it changed.
    pub fn apply_service(&mut self, service: &Service) -> Option<ServiceKey> {
        let key = key_of(&service.metadata);
        let entry = service_entry(service, self.services.get(&key));
        if self.services.get(&key) == Some(&entry) {
            return None;
        }
        self.services.insert(key.clone(), entry);
        Some(key)
    }

    pub fn delete_service(&mut self, service: &Service) -> Option<ServiceKey> {
        let key = key_of(&service.metadata);
        self.services.remove(&key).map(|_| key)
    }

    /// Stores a slice; returns the Services whose endpoints changed (two when its label moved).
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<ServiceKey> {
        let (namespace, name) = key_of(&slice.metadata);
        let Some(entry) = slice_entry(slice) else {
            return self.remove_slice(&namespace, &name).into_iter().collect();
        };
        let slice_key = (namespace.clone(), name.clone());
        if self.slices.get(&slice_key) == Some(&entry) {
            return Vec::new();
        }
        let mut changed = Vec::new();
        if let Some(old) = self.slices.get(&slice_key)
            && old.service != entry.service
        {
            changed.extend(self.remove_slice(&namespace, &name));
        }
        let service = (namespace, entry.service.clone());
        self.slices_of
            .entry(service.clone())
            .or_default()
            .insert(name);
        self.slices.insert(slice_key, entry);
        changed.push(service);
        changed
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> Option<ServiceKey> {
        let (namespace, name) = key_of(&slice.metadata);
        self.remove_slice(&namespace, &name)
    }

    fn remove_slice(&mut self, namespace: &str, name: &str) -> Option<ServiceKey> {
        let entry = self
            .slices
            .remove(&(namespace.to_string(), name.to_string()))?;
        let service = (namespace.to_string(), entry.service);
        if let Some(names) = self.slices_of.get_mut(&service) {
            names.remove(name);
            if names.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        Some(service)
    }

    /// Replaces every Service (a fresh list); returns the Services that changed.
    pub fn replace_services(&mut self, services: &[Service]) -> BTreeSet<ServiceKey> {
        let next: HashMap<ServiceKey, ServiceEntry> = services
            .iter()
            .map(|s| {
                let key = key_of(&s.metadata);
                let entry = service_entry(s, self.services.get(&key));
                (key, entry)
            })
            .collect();
        let mut changed: BTreeSet<ServiceKey> = self
            .services
            .iter()
            .filter(|(k, v)| next.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        changed.extend(
            next.iter()
                .filter(|(k, v)| self.services.get(*k) != Some(*v))
                .map(|(k, _)| k.clone()),
        );
        self.services = next;
        changed
    }

    /// Replaces every slice (a fresh list); returns the Services whose endpoints changed.
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) -> BTreeSet<ServiceKey> {
        let before: BTreeMap<ServiceKey, Vec<SliceEntry>> = self.grouped();
        self.slices.clear();
        self.slices_of.clear();
        for slice in slices {
            self.apply_slice(slice);
        }
        let after = self.grouped();
        before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .cloned()
            .collect()
    }

    fn grouped(&self) -> BTreeMap<ServiceKey, Vec<SliceEntry>> {
        self.slices_of
            .iter()
            .map(|(service, names)| {
                let slices = names
                    .iter()
                    .filter_map(|n| self.slices.get(&(service.0.clone(), n.clone())).cloned())
                    .collect();
                (service.clone(), slices)
            })
            .collect()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// The Services whose endpoints the upstream of `service` shows besides its own: the
    /// targets of its split. A subscription listens to their changes too.
    pub fn split_targets(&self, service: &ServiceKey) -> Vec<ServiceKey> {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|entry| entry.split.iter())
            .map(|(target, _)| target.clone())
            .filter(|target| target != service)
            .collect()
    }

    /// The upstream as a proxy should see it now (`version` left 0 for the caller to set).
    /// With a split, the endpoints of every target Service (the same port, by name or number),
    /// each tagged with its Service.
    pub fn snapshot(&self, upstream: &UpstreamKey) -> Snapshot {
        let not_found = |reason: String| Snapshot {
            reason,
            ..Snapshot::default()
        };
        let Some(service) = self.services.get(&upstream.service) else {
            let (namespace, name) = &upstream.service;
            return not_found(format!("Service {namespace}/{name} not found"));
        };
        if service.split.is_empty() {
            return match self.endpoints_of(&upstream.service, &upstream.port) {
                Ok(endpoints) => Self::found(&upstream.service, service, endpoints, Vec::new()),
                Err(reason) => not_found(reason),
            };
        }
        let mut endpoints = Vec::new();
        let mut reasons = Vec::new();
        let mut split = Vec::new();
        for (target, weight) in &service.split {
            let name = format!("{}/{}", target.0, target.1);
            match self.endpoints_of(target, &upstream.port) {
                Ok(found) if found.is_empty() => {
                    reasons.push(format!("Service {name} has no endpoints"));
                }
                Ok(found) => endpoints.extend(found.into_iter().map(|mut e| {
                    e.service.clone_from(&name);
                    e
                })),
                Err(reason) => reasons.push(reason),
            }
            split.push(SplitTarget {
                service: name,
                weight: *weight,
            });
        }
        let mut snapshot = Self::found(&upstream.service, service, endpoints, split);
        // Said even when other targets have endpoints: a canary that is not there is news.
        snapshot.reason = reasons.join("; ");
        snapshot
    }

    fn found(
        key: &ServiceKey,
        service: &ServiceEntry,
        endpoints: Vec<Endpoint>,
        split: Vec<SplitTarget>,
    ) -> Snapshot {
        let reason = if endpoints.is_empty() {
            let (namespace, name) = key;
            format!("Service {namespace}/{name} has no endpoints")
        } else {
            String::new()
        };
        Snapshot {
            version: 0,
            service_found: true,
            endpoints,
            reason,
            policy: Some(Policy {
                service_config: service.info.service_config.clone().unwrap_or_default(),
                fanout_policy: service.info.policy.clone().unwrap_or_default(),
            }),
            split,
        }
    }

    /// Every endpoint of one Service port; `Err`: the Service or the port does not exist.
    fn endpoints_of(&self, key: &ServiceKey, port: &PortRef) -> Result<Vec<Endpoint>, String> {
        let (namespace, name) = key;
        let Some(service) = self.services.get(key) else {
            return Err(format!("Service {namespace}/{name} not found"));
        };
        let ports = &service.info.ports;
        // The slice port to read: by the Service port's name ("" when unnamed), or, for a number
        // that is only a target port, by the pods' port number.
        enum Wanted {
            Name(String),
            PodPort(u16),
        }
        let wanted = match port {
            PortRef::Name(want) => match ports.iter().find(|p| p.name.as_deref() == Some(want)) {
                Some(_) => Wanted::Name(want.clone()),
                None => {
                    return Err(format!(
                        "Service {namespace}/{name} has no port named {want:?}"
                    ));
                }
            },
            PortRef::Number(n) => {
                let by_port = ports.iter().find(|p| p.port == *n);
                let by_target = ports.iter().find(|p| p.target == TargetPort::Number(*n));
                match by_port.or(by_target) {
                    Some(p) => Wanted::Name(p.name.clone().unwrap_or_default()),
                    None => Wanted::PodPort(*n),
                }
            }
        };
        let mut endpoints: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
        for slice_name in self.slices_of.get(key).into_iter().flatten() {
            let Some(slice) = self.slices.get(&(namespace.clone(), slice_name.clone())) else {
                continue;
            };
            let port = slice
                .ports
                .iter()
                .find(|(port_name, port)| match &wanted {
                    Wanted::Name(want) => port_name == want,
                    Wanted::PodPort(n) => port == n,
                })
                .map(|(_, port)| *port);
            let Some(port) = port else { continue };
            for endpoint in &slice.endpoints {
                let Ok(ip) = endpoint.ip.parse::<IpAddr>() else {
                    continue;
                };
                // An address can sit in two slices while the controller moves it: the most
                // favourable conditions win.
                let merged = endpoints.entry((ip, port)).or_insert_with(|| Endpoint {
                    port: u32::from(port),
                    ready: false,
                    serving: false,
                    terminating: true,
                    ..endpoint.clone()
                });
                merged.ready |= endpoint.ready;
                merged.serving |= endpoint.serving;
                merged.terminating &= endpoint.terminating;
            }
        }
        Ok(endpoints.into_values().collect())
    }
}

#[cfg(test)]
mod tests;
