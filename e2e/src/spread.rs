//! How calls spread over backends: unary calls over a few connections, the backend of each in
//! the order they were answered, and the fewest calls each backend answered in any window.

use std::collections::BTreeMap;

use futures::StreamExt;
use tonic::transport::Channel;

use crate::backend::proto::EchoRequest;
use crate::backend::proto::test_client::TestClient;

/// `total` unary calls spread over `clients` (one HTTP/2 connection each), `in_flight` at a
/// time on each: the answering backend of each call, or its status code, in the order the
/// calls finished.
pub async fn answers(
    clients: &[TestClient<Channel>],
    total: usize,
    in_flight: usize,
) -> Vec<Result<String, String>> {
    paced_answers(clients, total, in_flight, 0).await
}

/// As [`answers`], starting at most `rate` calls a second in all (0: as fast as answered), so
/// a load can span a rollout.
pub async fn paced_answers(
    clients: &[TestClient<Channel>],
    total: usize,
    in_flight: usize,
    rate: u32,
) -> Vec<Result<String, String>> {
    paced_timed_answers(clients, total, in_flight, rate)
        .await
        .into_iter()
        .map(|(answer, _)| answer)
        .collect()
}

/// As [`paced_answers`], with how long each call took (from its start to its answer).
pub async fn paced_timed_answers(
    clients: &[TestClient<Channel>],
    total: usize,
    in_flight: usize,
    rate: u32,
) -> Vec<(Result<String, String>, std::time::Duration)> {
    let per_client = total / clients.len();
    let pace = (rate > 0).then(|| {
        let interval = std::time::Duration::from_secs(1) * clients.len() as u32 / rate;
        interval.max(std::time::Duration::from_micros(1))
    });
    let streams = clients.iter().enumerate().map(|(i, client)| {
        let count = per_client + usize::from(i < total % clients.len());
        let client = client.clone();
        let clock =
            pace.map(|p| std::sync::Arc::new(tokio::sync::Mutex::new(tokio::time::interval(p))));
        futures::stream::iter(0..count)
            .map(move |_| {
                let mut client = client.clone();
                let clock = clock.clone();
                async move {
                    if let Some(clock) = clock {
                        clock.lock().await.tick().await;
                    }
                    let started = std::time::Instant::now();
                    let answer = client
                        .unary(EchoRequest::default())
                        .await
                        .map(|reply| reply.into_inner().backend)
                        .map_err(|status| format!("{:?}", status.code()));
                    (answer, started.elapsed())
                }
            })
            .buffer_unordered(in_flight.max(1))
    });
    futures::stream::select_all(streams).collect().await
}

/// For each of `backends`, the fewest calls it answered in any window of `window` consecutive
/// answers of `order` (sliding by a tenth of a window); empty when there are fewer answers than
/// a window.
pub fn window_minimum<'a>(
    order: &[String],
    backends: impl IntoIterator<Item = &'a String>,
    window: usize,
) -> BTreeMap<String, usize> {
    worst_windows(order, backends, window)
        .into_iter()
        .map(|(backend, (fewest, _))| (backend, fewest))
        .collect()
}

/// As [`window_minimum`], with where each backend's worst window starts (the index of its first
/// answer in `order`, the first such window): tells a cold start from a later dip.
pub fn worst_windows<'a>(
    order: &[String],
    backends: impl IntoIterator<Item = &'a String>,
    window: usize,
) -> BTreeMap<String, (usize, usize)> {
    let mut worst: BTreeMap<String, (usize, usize)> = backends
        .into_iter()
        .map(|b| (b.clone(), (usize::MAX, 0)))
        .collect();
    if window == 0 || order.len() < window {
        return BTreeMap::new();
    }
    let mut start = 0;
    while start + window <= order.len() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for backend in &order[start..start + window] {
            *counts.entry(backend.as_str()).or_default() += 1;
        }
        for (backend, (fewest, at)) in worst.iter_mut() {
            let count = counts.get(backend.as_str()).copied().unwrap_or(0);
            if count < *fewest {
                (*fewest, *at) = (count, start);
            }
        }
        start += (window / 10).max(1);
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fewest_in_any_window() {
        let order: Vec<String> = "aabbaabbaabbbbbbbbbb".chars().map(String::from).collect();
        let backends = ["a".to_string(), "b".to_string(), "c".to_string()];
        let least = window_minimum(&order, &backends, 10);
        // Windows start at 0, 1, ..., 10: the first has 4 b, the last is all b.
        assert_eq!(least["a"], 0);
        assert_eq!(least["b"], 4);
        assert_eq!(least["c"], 0, "a backend that never answered has 0");
        assert!(window_minimum(&order[..5], &backends, 10).is_empty());
        let worst = worst_windows(&order, &backends, 10);
        // a is absent from the last window (from answer 10 on), b fewest in the first.
        assert_eq!(worst["a"], (0, 10));
        assert_eq!(worst["b"], (4, 0));
    }
}
