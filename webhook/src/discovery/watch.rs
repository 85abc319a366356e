//! One watch of every EndpointSlice and one of every Service, cluster-wide, feeding the hub.
//! Thousands of proxies share them: the API server sees one list and one watch per resource
//! per replica, however many proxies subscribe.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::catalog::Catalog;
use super::hub::Hub;
use super::report::ServiceEvents;
use crate::tls::error_chain;

/// Applies one resource's events to the catalog.
trait Feed: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: &'static str;
    fn apply(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)>;
    fn delete(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)>;
    fn replace(catalog: &mut Catalog, objects: &[Self]) -> Vec<(String, String)>;
    /// Seen in a list or a change: a chance to tell the object's owner something.
    fn observe(_object: &Self, _events: &Arc<ServiceEvents>) {}
}

impl Feed for Service {
    const KIND: &'static str = "Services";
    fn apply(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)> {
        catalog.apply_service(object).into_iter().collect()
    }
    fn delete(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)> {
        catalog.delete_service(object).into_iter().collect()
    }
    fn replace(catalog: &mut Catalog, objects: &[Self]) -> Vec<(String, String)> {
        catalog.replace_services(objects).into_iter().collect()
    }
    fn observe(object: &Self, events: &Arc<ServiceEvents>) {
        events.observe(object);
    }
}

impl Feed for EndpointSlice {
    const KIND: &'static str = "EndpointSlices";
    fn apply(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)> {
        catalog.apply_slice(object)
    }
    fn delete(catalog: &mut Catalog, object: &Self) -> Vec<(String, String)> {
        catalog.delete_slice(object).into_iter().collect()
    }
    fn replace(catalog: &mut Catalog, objects: &[Self]) -> Vec<(String, String)> {
        catalog.replace_slices(objects).into_iter().collect()
    }
}

/// Runs both watches for ever (the watcher re-lists and backs off by itself on errors); the hub
/// counts as synced once both first lists are in.
pub async fn run(client: Client, hub: Arc<Hub>) {
    let events = ServiceEvents::new(client.clone());
    let services_listed = Arc::new(AtomicBool::new(false));
    let slices_listed = Arc::new(AtomicBool::new(false));
    let synced = {
        let (hub, a, b) = (hub.clone(), services_listed.clone(), slices_listed.clone());
        move || {
            if a.load(Ordering::Relaxed) && b.load(Ordering::Relaxed) && !hub.is_synced() {
                tracing::info!(
                    services = hub.read(|c| c.service_count()),
                    endpoint_slices = hub.read(|c| c.slice_count()),
                    "discovery: Services and EndpointSlices listed"
                );
                hub.mark_synced();
            }
        }
    };
    tokio::join!(
        feed::<Service>(
            Api::all(client.clone()),
            hub.clone(),
            services_listed,
            &synced,
            &events,
        ),
        feed::<EndpointSlice>(
            Api::all(client),
            hub.clone(),
            slices_listed,
            &synced,
            &events
        ),
    );
}

async fn feed<K: Feed>(
    api: Api<K>,
    hub: Arc<Hub>,
    listed: Arc<AtomicBool>,
    synced: &(dyn Fn() + Send + Sync),
    owners: &Arc<ServiceEvents>,
) {
    let config = watcher::Config::default();
    let mut events = watcher::watcher(api, config)
        .default_backoff()
        .map_err(|e| error_chain(&e))
        .boxed();
    // A (re)list arrives as Init, InitApply…, InitDone: applied at once at InitDone, so
    // proxies never see a half-listed cluster.
    let mut buffer: Vec<K> = Vec::new();
    loop {
        match events.next().await {
            Some(Ok(Event::Init)) => buffer.clear(),
            Some(Ok(Event::InitApply(object))) => {
                K::observe(&object, owners);
                buffer.push(object);
            }
            Some(Ok(Event::InitDone)) => {
                let objects = std::mem::take(&mut buffer);
                hub.update(|catalog| K::replace(catalog, &objects));
                listed.store(true, Ordering::Relaxed);
                synced();
            }
            Some(Ok(Event::Apply(object))) => {
                K::observe(&object, owners);
                hub.update(|catalog| K::apply(catalog, &object));
            }
            Some(Ok(Event::Delete(object))) => hub.update(|catalog| K::delete(catalog, &object)),
            Some(Err(error)) => {
                tracing::warn!(kind = K::KIND, %error, "discovery: watch failed; retrying");
            }
            None => {
                tracing::error!(kind = K::KIND, "discovery: watch ended");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        }
    }
}
