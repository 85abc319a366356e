//! The Service's retry policy through the spike (issue 13's sprint, step 2), as a client sees
//! it: with `maxAttempts: 5` retrying UNAVAILABLE a 10 % failure rate never reaches the client,
//! and with `maxAttempts: 1` it does (the proxy's own UNAVAILABLE rule does not step in: the
//! policy decides); only the named codes are retried, never more than `maxAttempts` times,
//! and the last attempt's answer reaches the client as the backend sent it; `retryThrottling`
//! stops retries once half its tokens are gone; an endpoint's reset before any answer is
//! retried when its mapped code is named.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fanout_e2e::backend::proto::{EchoRequest, StatsRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::fleet::client;
use fanout_e2e::proxy::pod_ip;
use fanout_e2e::resetting::spawn_resetting;
use fanout_proxy_config::service_config::ServiceConfig;
use fanout_wire::engine::{Settings, Upstream};
use fanout_wire::frame;
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::Code;

const SERVICE: &str = "fanout.test.v1.Test";

fn retry_policy(max_attempts: u32, codes: Value) -> Value {
    json!({"methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.05s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": codes,
        }
    }]})
}

/// The spike on a thread of its own in front of `endpoints`, with `config` as the Service's
/// service config; its address.
fn spike(endpoints: Vec<SocketAddr>, config: Value) -> SocketAddr {
    let config = ServiceConfig::parse(&config.to_string()).unwrap();
    let upstream = Upstream {
        endpoints: watch::channel(endpoints).1,
        service_config: watch::channel(Some(Arc::new(config))).1,
        split: watch::channel(None).1,
        settings: watch::channel(Settings::default()).1,
    };
    fanout_wire::engine::spawn_on_loopback(upstream)
}

/// `count` backends on pod IPs from `first`, behaving as `behaviour`: addresses and stats.
async fn backends(
    first: usize,
    count: usize,
    behaviour: Behaviour,
) -> (Vec<SocketAddr>, Vec<Arc<Stats>>) {
    let mut addrs = Vec::new();
    let mut stats = Vec::new();
    for n in first..first + count {
        let backend = Backend::new(format!("backend-{n}"), behaviour.clone());
        stats.push(backend.stats());
        addrs.push(backend.spawn(SocketAddr::new(pod_ip(n), 0)).await.unwrap());
    }
    (addrs, stats)
}

fn total_calls(stats: &[Arc<Stats>]) -> u64 {
    stats.iter().map(|s| s.calls.load(Ordering::SeqCst)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_attempts_hide_a_ten_percent_failure_rate_and_one_attempt_shows_it() {
    let flaky = Behaviour {
        fail_percent: 10,
        ..Behaviour::default()
    };
    let (addrs, stats) = backends(0, 4, flaky).await;
    let calls = 1000;
    let mut failed = Vec::new();
    for max_attempts in [5, 1] {
        let before = total_calls(&stats);
        let listen = spike(
            addrs.clone(),
            retry_policy(max_attempts, json!(["UNAVAILABLE"])),
        );
        let mut app = client(listen).await;
        let mut failures = 0;
        for _ in 0..calls {
            if let Err(status) = app.unary(EchoRequest::default()).await {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failures += 1;
            }
        }
        let attempts = total_calls(&stats) - before;
        eprintln!("maxAttempts {max_attempts}: {failures} of {calls} failed, {attempts} attempts");
        if max_attempts == 1 {
            assert_eq!(attempts, calls, "one attempt each: nothing retried");
        } else {
            assert!(attempts >= calls + 50, "{attempts} attempts");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_codes_are_retried_up_to_max_attempts() {
    let (addrs, stats) = backends(4, 2, Behaviour::default()).await;
    let aborted = || EchoRequest {
        fail_code: Code::Aborted as i32,
        fail_message: "try again".into(),
        ..Default::default()
    };
    let listen = spike(addrs.clone(), retry_policy(5, json!(["UNAVAILABLE"])));
    let status = client(listen).await.unary(aborted()).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(total_calls(&stats), 1, "ABORTED is not named: one attempt");

    let listen = spike(addrs, retry_policy(3, json!(["ABORTED", 14])));
    let status = client(listen).await.unary(aborted()).await.unwrap_err();
    // The last attempt's answer reaches the client as the backend sent it.
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "try again");
    assert_eq!(total_calls(&stats), 1 + 3, "three attempts");
    // Both endpoints had a turn: a retry goes elsewhere when it can.
    assert!(stats.iter().all(|s| s.calls.load(Ordering::SeqCst) >= 1));
}

/// `retryThrottling`: with every call failing, retries stop once the tokens fall to half of
/// `maxTokens` — 10 tokens: the first call makes its 5 attempts (10 → 5), every later call one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_throttling_stops_retries_when_half_the_tokens_are_gone() {
    let failing = Behaviour {
        fail_percent: 100,
        ..Behaviour::default()
    };
    let (addrs, stats) = backends(6, 2, failing).await;
    let mut config = retry_policy(5, json!(["UNAVAILABLE"]));
    config["retryThrottling"] = json!({"maxTokens": 10, "tokenRatio": 0.1});
    let mut app = client(spike(addrs, config)).await;
    for _ in 0..10 {
        let status = app.unary(EchoRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(total_calls(&stats), 5 + 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_any_answer_is_retried_when_its_code_is_named() {
    let (resetting, resets) =
        spawn_resetting(SocketAddr::new(pod_ip(8), 0), frame::INTERNAL_ERROR).await;
    let (healthy, stats) = backends(9, 1, Behaviour::default()).await;
    let endpoints = vec![resetting, healthy[0]];

    // INTERNAL named: every call is answered, by the healthy backend. (Ten calls: without
    // ejection the balancer keeps picking the endpoint that fails fast, and the retry budget
    // — a fifth of the calls and a reserve of ten — would run out over many more.)
    let mut app = client(spike(
        endpoints.clone(),
        retry_policy(3, json!(["INTERNAL"])),
    ))
    .await;
    for call in 0..10 {
        match app.unary(EchoRequest::default()).await {
            Ok(reply) => assert_eq!(reply.into_inner().backend, "backend-9"),
            Err(status) => panic!("call {call} failed: {status:?}"),
        }
    }
    let retried = resets.load(Ordering::SeqCst);
    assert!(retried >= 1, "the resetting endpoint got no call");
    assert_eq!(stats[0].calls.load(Ordering::SeqCst), 10);

    // Not named: the calls that met the reset fail with it.
    let mut app = client(spike(endpoints, retry_policy(3, json!(["UNAVAILABLE"])))).await;
    let mut failed = 0;
    for _ in 0..10 {
        if let Err(status) = app.unary(EchoRequest::default()).await {
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            failed += 1;
        }
    }
    assert!(failed >= 1, "no call met the reset");
    assert_eq!(resets.load(Ordering::SeqCst) - retried, failed);
}

/// `perAttemptRecvTimeout`: an attempt with no answer in time is cancelled and the call goes
/// again, to another endpoint when one is ready: one backend of two answers after a second,
/// yet every call ends well under it. With the slow one alone, the last attempt's timeout
/// ends the call with DEADLINE_EXCEEDED, long before the backend would have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_slower_than_the_per_attempt_timeout_goes_to_another_endpoint() {
    let slow = Behaviour {
        delay: std::time::Duration::from_secs(1),
        ..Behaviour::default()
    };
    let (slow_addr, slow_stats) = backends(10, 1, slow).await;
    let (fast_addr, _) = backends(11, 1, Behaviour::default()).await;
    let mut config = retry_policy(3, json!(["UNAVAILABLE"]));
    config["methodConfig"][0]["retryPolicy"]["perAttemptRecvTimeout"] = json!("0.1s");

    let mut app = client(spike(vec![slow_addr[0], fast_addr[0]], config.clone())).await;
    for _ in 0..10 {
        let started = std::time::Instant::now();
        let reply = app
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.backend, "backend-11");
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_millis(700), "{took:?}");
    }
    let slow_calls = slow_stats[0].calls.load(Ordering::SeqCst);
    assert!(slow_calls >= 1, "the slow endpoint got no call");
    slow_stats[0].wait_for_cancellations(slow_calls).await;

    let mut alone = client(spike(slow_addr, config)).await;
    let started = std::time::Instant::now();
    let status = alone.unary(EchoRequest::default()).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("per-attempt timeout"),
        "{status:?}"
    );
    // Three attempts of 100 ms, and two backoffs of at most 10 and 20 ms.
    assert!(
        took >= std::time::Duration::from_millis(300)
            && took < std::time::Duration::from_millis(800),
        "{took:?}"
    );
}

/// The server's `grpc-retry-pushback-ms` sets the wait before the retry, and a retry waits
/// out its wait even when an endpoint becomes ready meanwhile (its other endpoint, here,
/// 300 ms into a 600 ms pushback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_out_the_servers_pushback_even_when_an_endpoint_comes_up() {
    use std::time::{Duration, Instant};
    use tokio::net::{TcpListener, TcpStream};

    let pushing_back = Behaviour {
        fail_percent: 100,
        pushback: Some("600"),
        ..Behaviour::default()
    };
    let (failing, _) = backends(12, 1, pushing_back).await;
    let (healthy, _) = backends(13, 1, Behaviour::default()).await;
    // The healthy endpoint's first connection takes 300 ms to be ready (a relay that waits).
    let relay = TcpListener::bind(SocketAddr::new(pod_ip(14), 0))
        .await
        .unwrap();
    let slow = relay.local_addr().unwrap();
    let (accepted_tx, accepted) = tokio::sync::oneshot::channel::<Instant>();
    let backend = healthy[0];
    tokio::spawn(async move {
        let (mut accepted_conn, _) = relay.accept().await.unwrap();
        let _ = accepted_tx.send(Instant::now());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut relayed = TcpStream::connect(backend).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut accepted_conn, &mut relayed).await;
    });
    let config =
        ServiceConfig::parse(&retry_policy(2, json!(["UNAVAILABLE"])).to_string()).unwrap();
    let (set_tx, set_rx) = watch::channel(vec![failing[0]]);
    let upstream = Upstream {
        endpoints: set_rx,
        service_config: watch::channel(Some(Arc::new(config))).1,
        split: watch::channel(None).1,
        settings: watch::channel(Settings::default()).1,
    };
    let listen = fanout_wire::engine::spawn_on_loopback(upstream);
    let mut app = client(listen).await;
    // The spike serves this client (Stats never fails) before the endpoint set changes: it
    // takes clients only once its first endpoints settled, and must not wait for the new one.
    app.stats(StatsRequest {}).await.unwrap();

    set_tx.send(vec![failing[0], slow]).unwrap();
    let connecting_since = accepted.await.unwrap();
    let reply = app
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let took = connecting_since.elapsed();
    assert_eq!(reply.backend, "backend-13");
    assert!(took >= Duration::from_millis(590), "retried after {took:?}");
    assert!(
        took < Duration::from_millis(1_500),
        "retried after {took:?}"
    );
}
