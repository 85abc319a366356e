//! The Service's rules for calls through the spike (issue 13's sprint, step 2), as a client
//! sees them: the service config's method timeout ends a call with DEADLINE_EXCEEDED and a
//! change of it applies to the next call; the idle timeout ends a call with nothing moving
//! either way, and not one whose messages keep coming; a call that finds no endpoint ready
//! waits for one while an endpoint is still connecting, and a `waitForReady` method until its
//! deadline, its request body held meanwhile; a cancelled waiting call never reaches a backend;
//! a weighted split gives each Service its share, and a Service with no endpoint gives its
//! share away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::{EchoRequest, StatsRequest, StreamRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::fleet::client;
use fanout_e2e::proxy::{free_port, pod_ip};
use fanout_e2e::raw;
use fanout_proxy_config::service_config::ServiceConfig;
use fanout_wire::engine::{Settings, SplitSpec, Upstream};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tonic::Code;

const SERVICE: &str = "fanout.test.v1.Test";

fn service_config(config: Value) -> Option<Arc<ServiceConfig>> {
    Some(Arc::new(ServiceConfig::parse(&config.to_string()).unwrap()))
}

/// The spike on a thread of its own in front of `endpoints`, with the Service's service config
/// from `service_config`; its address.
fn spike(
    endpoints: Vec<SocketAddr>,
    service_config: watch::Receiver<Option<Arc<ServiceConfig>>>,
    settings: Settings,
) -> SocketAddr {
    let upstream = Upstream {
        endpoints: watch::channel(endpoints).1,
        service_config,
        split: watch::channel(None).1,
        settings: watch::channel(settings).1,
    };
    fanout_wire::engine::spawn_on_loopback(upstream)
}

async fn backend(n: usize, id: &str) -> (SocketAddr, Arc<Stats>) {
    let backend = Backend::new(id, Behaviour::default());
    let stats = backend.stats();
    let addr = backend.spawn(SocketAddr::new(pod_ip(n), 0)).await.unwrap();
    (addr, stats)
}

fn delayed(delay_ms: u32) -> EchoRequest {
    EchoRequest {
        delay_ms,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_method_timeout_of_the_service_config_ends_a_call_and_a_change_applies_at_once() {
    let (addr, stats) = backend(0, "backend-0").await;
    let config = json!({"methodConfig": [
        {"name": [{"service": SERVICE, "method": "Unary"}], "timeout": "0.2s"},
    ]});
    let (config_tx, config_rx) = watch::channel(service_config(config));
    let listen = spike(vec![addr], config_rx, Settings::default());
    let mut app = client(listen).await;

    let started = Instant::now();
    let status = app.unary(delayed(2_000)).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "fanout: deadline exceeded");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(1),
        "{took:?}"
    );
    stats.wait_for_cancellations(1).await;
    // The client's own deadline counts when it is sooner (a raw client: it has no timer of
    // its own, so the answer is the spike's).
    let started = Instant::now();
    let path = format!("/{SERVICE}/Unary");
    let answer = raw::unary(listen, &path, &delayed(2_000), &[("grpc-timeout", "100m")])
        .await
        .unwrap();
    assert_eq!(answer.grpc_status(), Some(4), "{}", answer.grpc_message());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(190),
        "{took:?}"
    );
    // A method the config does not name has no timeout.
    let mut streamed = app
        .server_stream(StreamRequest {
            count: 2,
            interval_ms: 300,
            reply_bytes: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    while streamed.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 2);

    // The Service's owner lengthens the timeout: the next call has the new one.
    config_tx
        .send(service_config(json!({"methodConfig": [
            {"name": [{"service": SERVICE}], "timeout": "5s"},
        ]})))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = app.unary(delayed(400)).await.unwrap().into_inner();
    assert_eq!(reply.backend, "backend-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_nothing_moving_for_the_idle_timeout_is_ended() {
    let (addr, stats) = backend(1, "backend-1").await;
    let settings = Settings {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Settings::default()
    };
    let listen = spike(vec![addr], watch::channel(None).1, settings);
    let mut app = client(listen).await;
    let stream = |interval_ms| StreamRequest {
        count: 4,
        interval_ms,
        reply_bytes: 1,
    };

    // Messages 150 ms apart, 600 ms in all: never idle for 300 ms.
    let mut lively = app.server_stream(stream(150)).await.unwrap().into_inner();
    let mut messages = 0;
    while lively.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 4);

    // Messages 700 ms apart: the answer's headers come at once, then nothing, and the call
    // ends 300 ms later, before the first message.
    let started = Instant::now();
    let mut sleepy = app.server_stream(stream(700)).await.unwrap().into_inner();
    let mut received = 0;
    let status = loop {
        match sleepy.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended without the idle timeout"),
            Err(status) => break status,
        }
    };
    let took = started.elapsed();
    assert_eq!(received, 0);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("idle timeout"),
        "{}",
        status.message()
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(690),
        "{took:?}"
    );
    stats.wait_for_cancellations(1).await;

    // Waiting for an answer counts as idle too.
    let started = Instant::now();
    let status = app.unary(delayed(2_000)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_holds_a_call_until_an_endpoint_is_up_or_its_deadline() {
    let port = free_port();
    let down = SocketAddr::new(pod_ip(2), port);
    let config = json!({"methodConfig": [
        {"name": [{"service": SERVICE, "method": "Unary"}], "waitForReady": true, "timeout": "0.3s"},
        {"name": [{"service": SERVICE, "method": "Stats"}], "waitForReady": true},
        {"name": [{"service": SERVICE, "method": "ServerStream"}], "waitForReady": true},
    ]});
    let listen = spike(
        vec![down],
        watch::channel(service_config(config)).1,
        Settings::default(),
    );
    let mut app = client(listen).await;

    // Nothing listens, and nothing is connecting: a method without waitForReady fails at once.
    let started = Instant::now();
    let status = app
        .client_stream(tokio_stream::iter(vec![delayed(0)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // The waiting method with the Service's 300 ms deadline: DEADLINE_EXCEEDED at it, as gRPC
    // clients end a waitForReady call that never found a ready endpoint.
    let started = Instant::now();
    let status = app.unary(delayed(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(1),
        "{took:?}"
    );

    // A waiting call the client gives up on is forgotten: it never reaches the backend.
    let mut cancelled = app.clone();
    let gave_up = tokio::spawn(async move {
        cancelled
            .server_stream(StreamRequest {
                count: 1,
                interval_ms: 0,
                reply_bytes: 1,
            })
            .await
    });
    // Without a deadline the call waits for the backend that comes up meanwhile.
    let mut waiting = app.clone();
    let call = tokio::spawn(async move { waiting.stats(StatsRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    gave_up.abort();
    assert!(
        !call.is_finished(),
        "the call did not wait: {:?}",
        call.await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listener = TcpListener::bind(down).await.unwrap();
    let late = Backend::new("late", Behaviour::default());
    let late_stats = late.stats();
    tokio::spawn(late.serve(listener, std::future::pending()));
    let stats = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the held call was answered once the endpoint came up")
        .unwrap()
        .unwrap()
        .into_inner();
    // The call given up while it waited never reached the backend (Stats counts no call).
    assert_eq!(stats.backend, "late");
    assert_eq!((stats.calls, stats.cancelled), (0, 0), "{stats:?}");
    // The waiting unary method, now that an endpoint is ready, goes through with its body.
    let request = EchoRequest {
        payload: vec![7; 40_000],
        ..Default::default()
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), app.unary(request))
        .await
        .expect("answered")
        .unwrap()
        .into_inner();
    assert_eq!(reply.backend, "late");
    assert_eq!(reply.payload.len(), 40_000);
    assert_eq!(late_stats.calls.load(Ordering::SeqCst), 1);
}

/// Stands in for an endpoint whose first connection takes `setup` to be ready: takes TCP
/// connections at once and only after `setup` relays them to `backend`. Its address, and
/// what is notified when it took a connection.
async fn slow_to_set_up(backend: SocketAddr, setup: Duration) -> (SocketAddr, Arc<Notify>) {
    let listener = TcpListener::bind(SocketAddr::new(pod_ip(4), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let connected = Arc::new(Notify::new());
    let notify = connected.clone();
    tokio::spawn(async move {
        while let Ok((mut accepted, _)) = listener.accept().await {
            notify.notify_one();
            tokio::spawn(async move {
                tokio::time::sleep(setup).await;
                let mut relayed = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut accepted, &mut relayed).await;
            });
        }
    });
    (addr, connected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_while_an_endpoint_is_still_connecting_and_its_body_follows() {
    let (addr, stats) = backend(3, "backend-3").await;
    let (set_tx, set_rx) = watch::channel(Vec::new());
    let settings = Settings {
        connect_timeout: Duration::from_secs(3),
        ..Settings::default()
    };
    let listen = fanout_wire::engine::spawn_on_loopback(Upstream::following(set_rx, settings));
    let mut app = client(listen).await;

    // The endpoint arrives once the spike serves, and is a second away from ready: the calls
    // made meanwhile wait for it instead of failing, their bodies with them.
    let (slow, connected) = slow_to_set_up(addr, Duration::from_secs(1)).await;
    set_tx.send(vec![slow]).unwrap();
    let started = Instant::now();
    // The spike has the endpoint and is connecting to it.
    connected.notified().await;
    let messages: Vec<EchoRequest> = (0..3)
        .map(|n| EchoRequest {
            payload: vec![n; 1_000],
            ..Default::default()
        })
        .collect();
    let mut other = app.clone();
    let both = async {
        tokio::join!(
            other.unary(EchoRequest {
                payload: vec![9; 20_000],
                ..Default::default()
            }),
            app.client_stream(tokio_stream::iter(messages)),
        )
    };
    let (unary, streamed) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("both calls answered");
    let took = started.elapsed();
    let unary = unary.unwrap().into_inner();
    assert_eq!(unary.backend, "backend-3");
    assert_eq!(unary.payload, vec![9; 20_000]);
    let streamed = streamed.unwrap().into_inner();
    assert_eq!(streamed.backend, "backend-3");
    assert_eq!((streamed.count, streamed.bytes), (3, 3_000), "{streamed:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert_eq!(stats.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_gives_each_service_its_share_and_a_service_gone_gives_its_share_away() {
    let mut stable = Vec::new();
    for n in [5, 6] {
        stable.push(backend(n, &format!("stable-{n}")).await.0);
    }
    let (canary, _) = backend(7, "canary").await;
    let spec = |stable_weight, canary_weight| {
        let mut service_of = std::collections::HashMap::new();
        for addr in &stable {
            service_of.insert(*addr, "shop/app".to_string());
        }
        service_of.insert(canary, "shop/app-canary".to_string());
        Some(SplitSpec {
            targets: vec![
                ("shop/app".into(), stable_weight),
                ("shop/app-canary".into(), canary_weight),
            ],
            service_of,
        })
    };
    let all: Vec<SocketAddr> = stable.iter().copied().chain([canary]).collect();
    let (set_tx, set_rx) = watch::channel(all);
    let (split_tx, split_rx) = watch::channel(spec(90, 10));
    let upstream = Upstream {
        endpoints: set_rx,
        service_config: watch::channel(None).1,
        split: split_rx,
        settings: watch::channel(Settings::default()).1,
    };
    let listen = fanout_wire::engine::spawn_on_loopback(upstream);
    let app = client(listen).await;
    let canary_share = |calls: usize| {
        let mut app = app.clone();
        async move {
            let mut to_canary = 0;
            for _ in 0..calls {
                let reply = app.unary(delayed(0)).await.unwrap().into_inner();
                to_canary += usize::from(reply.backend == "canary");
            }
            to_canary
        }
    };

    // 90 / 10 over 2,000 calls: the canary's count is binomial, 200 ± 13.4 (σ).
    let share = canary_share(2_000).await;
    assert!((150..=250).contains(&share), "canary: {share} of 2,000");

    // The owner moves the split to 50 / 50: it applies to the next calls.
    split_tx.send(spec(50, 50)).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let share = canary_share(1_000).await;
    assert!((430..=570).contains(&share), "canary: {share} of 1,000");

    // The canary's pod leaves: its share goes to the stable Service, and no call fails.
    set_tx.send(stable.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(canary_share(500).await, 0);
}

/// The upstream's settings are live too (the Service's `fanout.dev/policy` sets its request
/// and idle timeouts): a timeout set while the spike runs applies to the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_set_while_running_applies_to_the_next_call() {
    let (addr, _) = backend(8, "backend-8").await;
    let (settings_tx, settings_rx) = watch::channel(Settings::default());
    let upstream = Upstream {
        endpoints: watch::channel(vec![addr]).1,
        service_config: watch::channel(None).1,
        split: watch::channel(None).1,
        settings: settings_rx,
    };
    let listen = fanout_wire::engine::spawn_on_loopback(upstream);
    let mut app = client(listen).await;
    let reply = app.unary(delayed(300)).await.unwrap().into_inner();
    assert_eq!(reply.backend, "backend-8");

    settings_tx
        .send(Settings {
            call_timeout: Some(Duration::from_millis(100)),
            ..Settings::default()
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let status = app.unary(delayed(300)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(290));
}
