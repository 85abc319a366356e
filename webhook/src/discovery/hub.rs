//! The catalog shared by the watch (one writer) and every subscription (many readers), with a
//! change signal per Service so a change wakes only the subscriptions it concerns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use super::catalog::{Catalog, ServiceKey};

#[derive(Default)]
pub struct Hub {
    catalog: RwLock<Catalog>,
    /// A counter per Service someone subscribed to, bumped on every change of it.
    topics: Mutex<HashMap<ServiceKey, watch::Sender<u64>>>,
    /// Both lists are in: until then a subscription would see an empty cluster.
    synced: watch::Sender<bool>,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reads the catalog.
    pub fn read<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.catalog.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes the catalog, then wakes the subscriptions of the Services `f` says changed.
    pub fn update<I>(&self, f: impl FnOnce(&mut Catalog) -> I)
    where
        I: IntoIterator<Item = ServiceKey>,
    {
        let changed: Vec<ServiceKey> = {
            let mut catalog = self.catalog.write().unwrap_or_else(|e| e.into_inner());
            f(&mut catalog).into_iter().collect()
        };
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        for key in changed {
            if let Some(topic) = topics.get(&key) {
                topic.send_modify(|n| *n += 1);
            }
        }
    }

    /// A signal that changes whenever the Service does.
    pub fn subscribe(&self, key: &ServiceKey) -> watch::Receiver<u64> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        // Forget topics nobody listens to any more, so the map follows the live subscriptions.
        if topics.len() > 64 && topics.len().is_power_of_two() {
            topics.retain(|_, topic| topic.receiver_count() > 0);
        }
        topics
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until both lists are in.
    pub async fn synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }
}
