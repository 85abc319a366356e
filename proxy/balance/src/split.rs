//! A weighted split of an upstream over Services (a canary: `app` 90, `app-canary` 10), as
//! the discovery server delivers it: each call first draws a Service by weight, then the
//! balancer picks among that Service's endpoints. A Service with no ready endpoint gives its
//! share to the others, so a canary that is down costs no calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;

use crate::Candidate;

/// What the snapshot says: the targets with their weights, and which Service each endpoint
/// address belongs to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SplitSpec {
    pub targets: Vec<(String, u32)>,
    pub service_of: HashMap<SocketAddr, String>,
}

struct Target<P> {
    service: String,
    weight: u32,
    members: Vec<P>,
}

/// One Service of a split as it stands, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState<'a> {
    pub service: &'a str,
    pub weight: u32,
    pub endpoints: usize,
    pub ready: usize,
}

/// The spec applied to the upstream's current endpoints (`P`: a shared endpoint, `Arc` or
/// `Rc`, as the data path holds them).
pub struct Split<P> {
    targets: Vec<Target<P>>,
}

impl<P, E> Split<P>
where
    P: Deref<Target = E> + Clone,
    E: Candidate,
{
    /// `addr_of`: an endpoint's address (its key in `spec.service_of`).
    pub fn new(spec: &SplitSpec, endpoints: &[P], addr_of: impl Fn(&E) -> SocketAddr) -> Self {
        let mut targets: Vec<Target<P>> = spec
            .targets
            .iter()
            .map(|(service, weight)| Target {
                service: service.clone(),
                weight: *weight,
                members: Vec::new(),
            })
            .collect();
        for endpoint in endpoints {
            let Some(service) = spec.service_of.get(&addr_of(endpoint)) else {
                continue;
            };
            if let Some(target) = targets.iter_mut().find(|t| &t.service == service) {
                target.members.push(endpoint.clone());
            }
        }
        Self { targets }
    }

    /// Whether any endpoint belongs to one of its Services (none: the endpoints came from
    /// somewhere else, such as DNS while the discovery server is away).
    pub fn covers_any(&self) -> bool {
        self.targets.iter().any(|t| !t.members.is_empty())
    }

    /// Draws a Service by weight among those `pick` finds an endpoint in, and returns that
    /// endpoint: a Service where `pick` finds none is left out and the draw made again over the
    /// rest.
    pub fn pick(&self, pick: impl Fn(&[P]) -> Option<P>) -> Option<P> {
        let mut left_out = 0u64;
        let eligible = |i: usize, t: &Target<P>, left_out: u64| {
            t.weight > 0 && !t.members.is_empty() && (i >= 64 || left_out & (1 << i) == 0)
        };
        loop {
            let total: u32 = self
                .targets
                .iter()
                .enumerate()
                .filter(|(i, t)| eligible(*i, t, left_out))
                .map(|(_, t)| t.weight)
                .sum();
            if total == 0 {
                return None;
            }
            let mut draw = fastrand::u32(0..total);
            let (i, target) = self
                .targets
                .iter()
                .enumerate()
                .filter(|(i, t)| eligible(*i, t, left_out))
                .find(|(_, t)| {
                    if draw < t.weight {
                        return true;
                    }
                    draw -= t.weight;
                    false
                })?;
            if let Some(endpoint) = pick(&target.members) {
                return Some(endpoint);
            }
            if i >= 64 {
                // Beyond what the mask tracks (splits that long are not sensible): give up.
                return None;
            }
            left_out |= 1 << i;
        }
    }

    /// Each Service, its weight and its endpoints (ready of all).
    pub fn targets(&self) -> impl Iterator<Item = TargetState<'_>> {
        self.targets.iter().map(|t| TargetState {
            service: &t.service,
            weight: t.weight,
            endpoints: t.members.len(),
            ready: t.members.iter().filter(|e| e.is_ready()).count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::latency::Clock;

    struct Fake {
        addr: SocketAddr,
        ready: AtomicBool,
    }

    impl Candidate for Fake {
        fn is_ready(&self) -> bool {
            self.ready.load(Ordering::Relaxed)
        }
        fn outstanding(&self) -> usize {
            0
        }
        fn latency(&self, _: &Clock) -> Option<f64> {
            None
        }
        fn last_pick(&self) -> u64 {
            0
        }
        fn set_last_pick(&self, _: u64) {}
    }

    fn fakes(count: usize, first: u8) -> Vec<Arc<Fake>> {
        (0..count)
            .map(|i| {
                Arc::new(Fake {
                    addr: SocketAddr::from(([10, 0, first, i as u8], 80)),
                    ready: AtomicBool::new(true),
                })
            })
            .collect()
    }

    fn any_ready(members: &[Arc<Fake>]) -> Option<Arc<Fake>> {
        members.iter().find(|e| e.is_ready()).cloned()
    }

    #[test]
    fn calls_follow_the_weights_and_a_service_without_ready_endpoints_gives_its_share_away() {
        let stable = fakes(3, 0);
        let canary = fakes(1, 1);
        let mut spec = SplitSpec {
            targets: vec![("shop/app".into(), 90), ("shop/app-canary".into(), 10)],
            ..SplitSpec::default()
        };
        for e in &stable {
            spec.service_of.insert(e.addr, "shop/app".into());
        }
        spec.service_of
            .insert(canary[0].addr, "shop/app-canary".into());
        let all: Vec<Arc<Fake>> = stable.iter().chain(&canary).cloned().collect();
        let split = Split::new(&spec, &all, |e| e.addr);
        let to_canary = |split: &Split<Arc<Fake>>| {
            (0..10_000)
                .filter(|_| split.pick(any_ready).unwrap().addr == canary[0].addr)
                .count()
        };
        let share = to_canary(&split);
        assert!((800..=1200).contains(&share), "{share} of 10,000");
        canary[0].ready.store(false, Ordering::Relaxed);
        assert_eq!(to_canary(&split), 0);
        for e in &stable {
            e.ready.store(false, Ordering::Relaxed);
        }
        assert!(split.pick(any_ready).is_none());
        let state: Vec<TargetState> = split.targets().collect();
        assert_eq!(state[1].service, "shop/app-canary");
        assert_eq!(state[1].weight, 10);
        assert_eq!((state[0].endpoints, state[0].ready), (3, 0));
    }
}
