//! The upstream Service's gRPC service config, applied by the proxy to every call: retry
//! policies (codes, attempts, per-attempt timeout), `retryThrottling`, `waitForReady`. Real
//! `fanout-proxy` processes with the config as the webhook renders it (`service_config` in the
//! upstream); the live path through the discovery server is in `discovery.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::{EchoRequest, StatsRequest, StreamRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::fleet::client;
use fanout_e2e::proxy::{ProxyProcess, free_port, loopback_config, pod_ip, spawn_backends};
use fanout_proxy_config::{Balancer, Discovery};
use serde_json::{Value, json};
use tonic::Code;

const UNARY: &str = "fanout.test.v1.Test";

fn addresses(port: u16, count: usize) -> Vec<SocketAddr> {
    (0..count)
        .map(|n| SocketAddr::new(pod_ip(n), port))
        .collect()
}

/// A proxy over `count` backends on `port`, with `service_config` rendered in.
async fn proxy_with(
    port: u16,
    count: usize,
    service_config: Value,
    tune: impl FnOnce(&mut fanout_proxy_config::UpstreamConfig),
) -> (ProxyProcess, SocketAddr) {
    let (config, local) = loopback_config(Discovery::Static(addresses(port, count)), |u| {
        u.service_config = Some(service_config);
        tune(u);
    });
    (ProxyProcess::start(&config).await.unwrap(), local)
}

fn retry_policy(max_attempts: u32, codes: Value) -> Value {
    json!({"methodConfig": [{
        "name": [{"service": UNARY}],
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.05s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": codes,
        }
    }]})
}

fn total_calls(stats: &[Arc<Stats>]) -> u64 {
    stats.iter().map(|s| s.calls.load(Ordering::SeqCst)).sum()
}

async fn metric(proxy: &ProxyProcess, prefix: &str) -> Option<u64> {
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The proof on loopback: backends answer UNAVAILABLE on 10 % of calls at random.
/// With `maxAttempts: 5` retrying UNAVAILABLE the client sees none of it; with `maxAttempts: 1`
/// (the owner's choice: no retries) about 10 % fail — the proxy's own UNAVAILABLE rule does
/// not step in: the policy decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_attempts_hide_a_ten_percent_failure_rate_and_one_attempt_shows_it() {
    let flaky = Behaviour {
        fail_percent: 10,
        ..Behaviour::default()
    };
    let (port, _) = spawn_backends(4, flaky).await;
    let calls = 1000;
    let mut failed = Vec::new();
    for max_attempts in [5, 1] {
        let (proxy, local) = proxy_with(
            port,
            4,
            retry_policy(max_attempts, json!(["UNAVAILABLE"])),
            |_| {},
        )
        .await;
        let mut app = client(local).await;
        let mut failures = 0;
        for _ in 0..calls {
            match app.unary(EchoRequest::default()).await {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    failures += 1;
                }
            }
        }
        let retried = metric(
            &proxy,
            "fanout_proxy_retries_total{upstream=\"app.shop\",reason=\"policy:UNAVAILABLE\"}",
        )
        .await;
        let own_rule = metric(
            &proxy,
            "fanout_proxy_retries_total{upstream=\"app.shop\",reason=\"unavailable\"}",
        )
        .await;
        eprintln!(
            "maxAttempts {max_attempts}: {failures} of {calls} failed, {retried:?} retried by policy"
        );
        assert_eq!(own_rule, None, "the proxy's own rule retried");
        if max_attempts == 5 {
            assert!(retried.is_some_and(|r| r >= 50), "{retried:?}");
        } else {
            assert_eq!(retried, None);
        }
        failed.push(failures);
    }
    assert_eq!(failed[0], 0, "with maxAttempts 5");
    assert!(
        (50..=160).contains(&failed[1]),
        "with maxAttempts 1: {} of {calls}",
        failed[1]
    );
}

/// Only the codes the owner named are retried, and no more attempts than `maxAttempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_codes_are_retried_up_to_max_attempts() {
    let (port, stats) = spawn_backends(2, Behaviour::default()).await;
    let aborted = || EchoRequest {
        fail_code: Code::Aborted as i32,
        fail_message: "try again".into(),
        ..Default::default()
    };
    let (_unnamed, local) =
        proxy_with(port, 2, retry_policy(5, json!(["UNAVAILABLE"])), |_| {}).await;
    let status = client(local).await.unary(aborted()).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(total_calls(&stats), 1, "ABORTED is not named: one attempt");

    let (named, local) = proxy_with(port, 2, retry_policy(3, json!(["ABORTED", 14])), |_| {}).await;
    let status = client(local).await.unary(aborted()).await.unwrap_err();
    // The last attempt's answer reaches the client as the backend sent it.
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "try again");
    assert_eq!(total_calls(&stats), 1 + 3, "three attempts");
    let (_, endpoints) = named.admin_get("/endpoints").await.unwrap();
    let endpoints: Value = serde_json::from_str(&endpoints).unwrap();
    assert_eq!(
        endpoints["upstreams"][0]["service_config"]["methods"][0]["retry"]["retryable_status_codes"],
        json!(["ABORTED", "UNAVAILABLE"]),
        "{endpoints:#}"
    );
}

/// A slow attempt is given up after `perAttemptRecvTimeout` and the call goes to another
/// endpoint: one backend of two answers after a second, yet every call ends well under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_slower_than_the_per_attempt_timeout_goes_to_another_endpoint() {
    let (port, _) = spawn_backends(1, Behaviour::default()).await;
    let listener = tokio::net::TcpListener::bind((pod_ip(1), port))
        .await
        .unwrap();
    let slow = Backend::new(
        "slow",
        Behaviour {
            delay: Duration::from_secs(1),
            ..Behaviour::default()
        },
    );
    let slow_stats = slow.stats();
    tokio::spawn(slow.serve(listener, std::future::pending()));
    let mut config = retry_policy(3, json!(["UNAVAILABLE"]));
    config["methodConfig"][0]["retryPolicy"]["perAttemptRecvTimeout"] = json!("0.1s");
    // Round robin: half the first attempts go to the slow one.
    let (proxy, local) = proxy_with(port, 2, config, |u| u.balancer = Balancer::RoundRobin).await;
    let mut app = client(local).await;
    for _ in 0..10 {
        let started = Instant::now();
        let reply = app
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.backend, "backend-0");
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(slow_stats.calls.load(Ordering::SeqCst) >= 3);
    let retried = metric(
        &proxy,
        "fanout_proxy_retries_total{upstream=\"app.shop\",reason=\"policy:per_attempt_timeout\"}",
    )
    .await;
    assert!(retried.is_some_and(|r| r >= 3), "{retried:?}");
}

/// `retryThrottling`: with every call failing, retries stop once the tokens fall to half of
/// `maxTokens` — 10 tokens: the first call makes its 5 attempts (10 → 5), every later call one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_throttling_stops_retries_when_half_the_tokens_are_gone() {
    let (port, stats) = spawn_backends(
        2,
        Behaviour {
            fail_percent: 100,
            ..Behaviour::default()
        },
    )
    .await;
    let mut config = retry_policy(5, json!(["UNAVAILABLE"]));
    config["retryThrottling"] = json!({"maxTokens": 10, "tokenRatio": 0.1});
    let (proxy, local) = proxy_with(port, 2, config, |u| {
        u.ejection.consecutive_failures = 1000;
        u.retry.budget_percent = 100;
    })
    .await;
    let mut app = client(local).await;
    for _ in 0..10 {
        let status = app.unary(EchoRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(total_calls(&stats), 5 + 9);
    let throttled = metric(
        &proxy,
        "fanout_proxy_retries_throttled_total{upstream=\"app.shop\"}",
    )
    .await;
    // Held back: the nine later calls (the first had used its attempts anyway).
    assert_eq!(throttled, Some(9));
}

/// `waitForReady`: a call to a method that declares it waits for an endpoint up to its
/// deadline (and succeeds once one is up); other methods fail at once, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_holds_a_call_until_an_endpoint_is_up_or_its_deadline() {
    let port = free_port();
    let config = json!({"methodConfig": [
        {"name": [{"service": UNARY, "method": "Unary"}], "waitForReady": true, "timeout": "0.3s"},
        {"name": [{"service": UNARY, "method": "Stats"}], "waitForReady": true},
    ]});
    let (_proxy, local) = proxy_with(port, 1, config, |_| {}).await;
    let mut app = client(local).await;

    // Nothing listens yet: a method without waitForReady fails at once.
    let started = Instant::now();
    let status = app
        .server_stream(StreamRequest {
            count: 1,
            interval_ms: 0,
            reply_bytes: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The waiting method with the Service's 300 ms deadline: DEADLINE_EXCEEDED at it, as gRPC
    // clients end a waitForReady call that never found a ready endpoint.
    let started = Instant::now();
    let status = app.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // Without a deadline it waits for the backend that comes up meanwhile.
    let mut waiting = app.clone();
    let call = tokio::spawn(async move { waiting.stats(StatsRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !call.is_finished(),
        "the call did not wait: {:?}",
        call.await
    );
    let listener = tokio::net::TcpListener::bind((pod_ip(0), port))
        .await
        .unwrap();
    let late = Backend::new("late", Behaviour::default());
    let late_stats = late.stats();
    tokio::spawn(late.serve(listener, std::future::pending()));
    call.await.unwrap().unwrap();
    // And the waiting unary method, now that an endpoint is ready, goes through.
    let reply = app
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.backend, "late");
    assert_eq!(late_stats.calls.load(Ordering::SeqCst), 1);
}

/// The idle timeout (`timeouts.idle`, or `idle_timeout` in the Service's `fanout.dev/policy`):
/// a call with nothing moving either way for that long ends with DEADLINE_EXCEEDED — waiting
/// for an answer counts — while a stream whose messages keep coming lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_nothing_moving_for_the_idle_timeout_is_ended() {
    let (port, _) = spawn_backends(1, Behaviour::default()).await;
    let (config, local) = loopback_config(Discovery::Static(addresses(port, 1)), |u| {
        u.timeouts.idle = Some(Duration::from_millis(300));
    });
    let _proxy = ProxyProcess::start(&config).await.unwrap();
    let mut app = client(local).await;
    let stream = |interval_ms| StreamRequest {
        count: 4,
        interval_ms,
        reply_bytes: 1,
    };

    // Messages 100 ms apart: 4 of them, never idle for 300 ms.
    let mut lively = app.server_stream(stream(100)).await.unwrap().into_inner();
    let mut messages = 0;
    while lively.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 4);

    // Messages 700 ms apart: the first comes (at once), then the call is ended at 300 ms.
    let started = Instant::now();
    let mut sleepy = app.server_stream(stream(700)).await.unwrap().into_inner();
    let mut received = 0;
    let status = loop {
        match sleepy.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream finished"),
            Err(status) => break status,
        }
    };
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("idle timeout"), "{status:?}");
    assert!(received <= 1, "{received} messages");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(690),
        "{took:?}"
    );

    // A unary call whose answer takes 1 s: waiting counts as idle.
    let started = Instant::now();
    let status = app
        .unary(EchoRequest {
            delay_ms: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(900),
        "{took:?}"
    );
}

/// A `waitForReady` call held while the only endpoint is ejected takes it as soon as the
/// ejection ends, not at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_ready_call_takes_an_endpoint_whose_ejection_ended() {
    let (port, stats) = spawn_backends(1, Behaviour::default()).await;
    let config = json!({"methodConfig": [
        {"name": [{"service": UNARY, "method": "Unary"}], "waitForReady": true, "timeout": "8s"},
    ]});
    let (proxy, local) = proxy_with(port, 1, config, |u| {
        u.retry.enabled = false;
        u.ejection.consecutive_failures = 1;
        u.ejection.max_ejected_percent = 100;
        u.ejection.base_time = Duration::from_secs(1);
        u.ejection.max_time = Duration::from_secs(1);
    })
    .await;
    let mut app = client(local).await;
    // Its failure ejects the only endpoint for a second.
    let failing = EchoRequest {
        fail_code: Code::Unavailable as i32,
        ..Default::default()
    };
    let status = app.unary(failing).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let ejected_at = Instant::now();
    loop {
        let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
        if endpoints.contains("\"ejected\"") {
            break;
        }
        assert!(ejected_at.elapsed() < Duration::from_secs(1), "{endpoints}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let reply = app.unary(EchoRequest::default()).await;
    let took = started.elapsed();
    reply.expect("answered once the ejection ended");
    // Held (the endpoint was out), and only until the ejection's end.
    assert!(took >= Duration::from_millis(300), "not held: {took:?}");
    assert!(took < Duration::from_secs(4), "held until {took:?}");
    assert_eq!(total_calls(&stats), 2);
}
