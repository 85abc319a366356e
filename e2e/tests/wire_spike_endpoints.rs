//! The spike's endpoint connections (issue 13's sprint, step 1), as a user of the proxy sees
//! them: an endpoint down at start is used once it listens; a graceful stop (GOAWAY) fails no
//! call and a `kill -9` fails only the calls in flight on it, and either endpoint serves again
//! once restarted; the endpoint set follows discovery; an endpoint that never answers is never
//! given a call, and one that stops answering is dropped by the keepalive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend_process::{self, BackendProcess};
use fanout_e2e::fleet::client;
use fanout_e2e::open_load::Load;
use fanout_e2e::proxy::pod_ip;
use fanout_wire::engine::{Settings, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tonic::transport::Channel;

/// The spike on a thread of its own, following `set`; its address.
fn spike(set: watch::Receiver<Vec<SocketAddr>>, settings: Settings) -> SocketAddr {
    fanout_wire::engine::spawn_on_loopback(Upstream::following(set, settings))
}

/// `calls` calls one after another: how many each backend answered, and the failures.
async fn answers(client: &TestClient<Channel>, calls: usize) -> (BTreeMap<String, usize>, usize) {
    let mut client = client.clone();
    let mut by_backend = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..calls {
        match client.unary(EchoRequest::default()).await {
            Ok(reply) => *by_backend.entry(reply.into_inner().backend).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by_backend, failed)
}

/// Calls until `backend` answers one, for at most `within`; how long it took.
async fn until_answered_by(
    client: &TestClient<Channel>,
    backend: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut client = client.clone();
    loop {
        if let Ok(reply) = client.unary(EchoRequest::default()).await
            && reply.into_inner().backend == backend
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{backend} got no call within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn addrs(backends: &[BackendProcess]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_down_at_start_takes_calls_once_it_listens() {
    let (port, mut backends) = backend_process::on_pod_ips(2, |_| vec![]).await;
    backends[1].kill().await.unwrap();
    let (_set, watch) = watch::channel(addrs(&backends));
    let client = client(spike(watch, Settings::default())).await;

    let (by_backend, failed) = answers(&client, 40).await;
    assert_eq!(failed, 0);
    assert_eq!(by_backend, BTreeMap::from([("backend-0".to_string(), 40)]));

    backends[1].restart().await.unwrap();
    // Its keeper retries with a backoff of at most 5 s (plus jitter).
    until_answered_by(&client, "backend-1", Duration::from_secs(10)).await;
    let (by_backend, failed) = answers(&client, 100).await;
    assert_eq!(failed, 0);
    assert!(
        by_backend.values().all(|&n| n >= 25),
        "{by_backend:?} on port {port}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_fails_no_call_and_the_endpoint_serves_again_after_its_restart() {
    // Calls take 20 ms, so the stopping backend has calls in flight when its GOAWAY comes.
    let (_, mut backends) = backend_process::on_pod_ips(3, |_| vec!["--delay-ms", "20"]).await;
    let (_set, watch) = watch::channel(addrs(&backends));
    let listen = spike(watch, Settings::default());
    let client = client(listen).await;
    let load = Load::start(listen, 4, 300, 0).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    backends[1].stop(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    backends[1].restart().await.unwrap();
    until_answered_by(&client, "backend-1", Duration::from_secs(10)).await;
    let result = load.stop().await;
    assert!(
        result.failures.is_empty(),
        "{} of {} calls failed through a graceful stop: {:?}",
        result.failures.len(),
        result.offered,
        &result.failures[..result.failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_fails_only_the_calls_in_flight_on_it() {
    let (_, mut backends) = backend_process::on_pod_ips(3, |_| vec!["--delay-ms", "20"]).await;
    let (_set, watch) = watch::channel(addrs(&backends));
    let listen = spike(watch, Settings::default());
    let client = client(listen).await;
    let load = Load::start(listen, 4, 300, 0).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    backends[1].kill().await.unwrap();
    let killed = Instant::now();
    // The kernel closes a killed process's connections at once: the spike reads the end
    // within a moment, and every call started after that goes to the two others.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures_then = load.failures.lock().unwrap().len();
    backends[1].restart().await.unwrap();
    until_answered_by(&client, "backend-1", Duration::from_secs(10)).await;
    let result = load.stop().await;

    // At 300 calls/s of 20 ms, about 6 are in flight and 2 on the victim; the spike may start
    // a few more there before it reads the connection's end.
    assert!(
        (1..=12).contains(&failures_then),
        "{failures_then} calls failed by the kill"
    );
    assert_eq!(
        result.failures.len(),
        failures_then,
        "failures after the kill was seen"
    );
    for failure in &result.failures {
        assert!(
            failure.started < killed + Duration::from_millis(250),
            "a call started {:?} after the kill failed: {failure:?}",
            failure.started.saturating_duration_since(killed)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_set_follows_discovery() {
    let (_, backends) = backend_process::on_pod_ips(3, |_| vec![]).await;
    let all = addrs(&backends);
    let (set, watch) = watch::channel(all[..2].to_vec());
    let client = client(spike(watch, Settings::default())).await;

    let (by_backend, failed) = answers(&client, 60).await;
    assert_eq!(failed, 0);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"]
    );

    // backend-0 leaves the set, backend-2 joins: new calls go to 1 and 2 only.
    set.send(all[1..].to_vec()).unwrap();
    until_answered_by(&client, "backend-2", Duration::from_secs(5)).await;
    let (by_backend, failed) = answers(&client, 60).await;
    assert_eq!(failed, 0);
    assert_eq!(
        by_backend.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"]
    );

    // An empty set: no endpoint, and the call fails at once rather than waiting.
    set.send(Vec::new()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (by_backend, failed) = answers(&client, 3).await;
    assert_eq!((by_backend.len(), failed), (0, 3));
}

/// A TCP listener on `addr` that speaks just enough HTTP/2 to look ready (SETTINGS, its ACK,
/// a PING ACK), or nothing at all, and then never another byte. Sends the time each accepted
/// connection ended.
async fn stand_in(
    addr: SocketAddr,
    answers_first_ping: bool,
) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (ended, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut io, _) = listener.accept().await.unwrap();
            let ended = ended.clone();
            tokio::spawn(async move {
                if answers_first_ping {
                    let mut hello = Vec::new();
                    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
                    hello.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]); // its ACK
                    hello.extend_from_slice(&[0, 0, 8, 6, 1, 0, 0, 0, 0]); // PING ACK
                    hello.extend_from_slice(&[0; 8]);
                    let _ = io.write_all(&hello).await;
                }
                let mut sink = [0u8; 4096];
                while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                let _ = ended.send(Instant::now());
            });
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_gets_no_call_and_one_that_stops_is_dropped() {
    let (port, backends) = backend_process::on_pod_ips(1, |_| vec![]).await;
    let silent = SocketAddr::new(pod_ip(1), port);
    let frozen = SocketAddr::new(pod_ip(2), port);
    let _silent_ends = stand_in(silent, false).await;
    let mut frozen_ends = stand_in(frozen, true).await;
    let settings = Settings {
        keepalive_interval: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let started = Instant::now();
    // Only the frozen stand-in's first connection: calls would hang on it until it is
    // dropped, so none are made until then.
    let (_set, watch) = watch::channel(vec![frozen]);
    let _spike = spike(watch, settings);
    let ended = tokio::time::timeout(Duration::from_secs(5), frozen_ends.recv())
        .await
        .expect("the frozen endpoint's connection is dropped by the keepalive")
        .unwrap();
    // Answered once, then silent: dropped a keepalive interval plus its timeout later.
    assert!(
        ended - started >= Duration::from_millis(500),
        "{:?}",
        ended - started
    );

    // The silent one is never ready: every call goes to the backend that answers.
    let (_set, watch) = watch::channel(vec![silent, backends[0].addr]);
    let client = client(spike(watch, settings)).await;
    let (by_backend, failed) = answers(&client, 50).await;
    assert_eq!(failed, 0);
    assert_eq!(by_backend, BTreeMap::from([("backend-0".to_string(), 50)]));
}

/// Passive ejection: an endpoint that fails three calls in a row is out of balancing for the
/// base time; back on probation, one more failure sends it out for twice as long. Its
/// failures are Trailers-Only UNAVAILABLE, which the spike sends elsewhere: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_keeps_failing_is_ejected_then_tried_once_on_probation() {
    use fanout_e2e::backend::{Backend, Behaviour};
    use std::sync::atomic::Ordering;

    let healthy = Backend::new("healthy", Behaviour::default())
        .spawn(SocketAddr::new(pod_ip(5), 0))
        .await
        .unwrap();
    let failing = Backend::new(
        "failing",
        Behaviour {
            fail_percent: 100,
            ..Behaviour::default()
        },
    );
    let failing_stats = failing.stats();
    let failing = failing.spawn(SocketAddr::new(pod_ip(6), 0)).await.unwrap();
    let settings = Settings {
        ejection: fanout_proxy_config::Ejection {
            consecutive_failures: 3,
            base_time: Duration::from_millis(600),
            ..fanout_proxy_config::Ejection::default()
        },
        ..Settings::default()
    };
    let (_set, set) = watch::channel(vec![healthy, failing]);
    let client = client(spike(set, settings)).await;

    let (by_backend, failed) = answers(&client, 60).await;
    assert_eq!(failed, 0);
    assert_eq!(by_backend.get("healthy"), Some(&60));
    assert_eq!(
        failing_stats.calls.load(Ordering::SeqCst),
        3,
        "three failures in a row, then ejected"
    );

    // The ejection ends: one call on probation fails, and it is out again (for 1.2 s).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, failed) = answers(&client, 60).await;
    assert_eq!(failed, 0);
    assert_eq!(failing_stats.calls.load(Ordering::SeqCst), 4);
}

/// A call the client cancels is not the endpoint's failure: streams given up on again and
/// again eject nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_by_their_client_eject_no_endpoint() {
    use fanout_e2e::backend::proto::StreamRequest;
    use fanout_e2e::backend::{Backend, Behaviour};

    let mut addrs = Vec::new();
    for n in [7, 8] {
        let backend = Backend::new(format!("backend-{n}"), Behaviour::default());
        addrs.push(backend.spawn(SocketAddr::new(pod_ip(n), 0)).await.unwrap());
    }
    let settings = Settings {
        ejection: fanout_proxy_config::Ejection {
            consecutive_failures: 2,
            base_time: Duration::from_secs(30),
            ..fanout_proxy_config::Ejection::default()
        },
        ..Settings::default()
    };
    let (_set, set) = watch::channel(addrs);
    let client = client(spike(set, settings)).await;
    for _ in 0..10 {
        let mut streaming = client.clone();
        let mut stream = streaming
            .server_stream(StreamRequest {
                count: 100,
                interval_ms: 50,
                reply_bytes: 1,
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap();
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (by_backend, failed) = answers(&client, 40).await;
    assert_eq!(failed, 0);
    assert_eq!(
        by_backend.len(),
        2,
        "an endpoint was ejected: {by_backend:?}"
    );
}
