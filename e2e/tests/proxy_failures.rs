//! No failed calls through endpoint failures: graceful stops and rolling restarts, `kill -9`,
//! a backend failing half its calls, a slow backend, health checks; and `/ready` following the
//! upstream's health. Real `fanout-proxy` processes; backends as processes where a process
//! boundary matters (signals), in-process otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::{EchoRequest, StatsRequest};
use fanout_e2e::backend::{Backend, Behaviour, HealthSwitch};
use fanout_e2e::backend_process;
use fanout_e2e::bench::percentile;
use fanout_e2e::fleet::{
    EndpointView, Fleet, client, endpoint_states, proxy_over_dns, retry_counts, rolling_restart,
    wait_for_endpoints,
};
use fanout_e2e::open_load::{Load, LoadResult};
use fanout_e2e::proxy::{ProxyProcess, loopback_config, pod_ip, spawn_backends};
use fanout_e2e::raw;
use fanout_proxy_config::{Balancer, Discovery, HealthCheck};

async fn calls_served(addr: SocketAddr) -> u64 {
    let mut client = client(addr).await;
    client
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_calls() {
    let (port, mut backends) = backend_process::on_pod_ips(10, |_| vec![]).await;
    let fleet = proxy_over_dns(port, 10, |_| {}).await;
    let load = Load::start(fleet.local, 4, 300, 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    rolling_restart(&mut backends, &fleet.proxy, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let LoadResult {
        offered,
        failures,
        rate,
        ..
    } = load.stop().await;
    eprintln!(
        "rolling restart: {offered} calls at {rate:.0} calls/s, {} failed\n{}",
        failures.len(),
        retry_counts(&fleet.proxy).await
    );
    assert!(rate >= 200.0, "the load fell behind: {rate:.0} calls/s");
    assert!(failures.is_empty(), "calls failed: {failures:#?}");
    // Every backend, restarted, serves again.
    for backend in &backends {
        assert!(calls_served(backend.addr).await > 0, "{} idle", backend.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_fails_only_the_calls_in_flight_and_the_endpoint_returns() {
    // Calls take 20 ms, so the victim always has some in flight.
    let (port, mut backends) = backend_process::on_pod_ips(10, |_| vec!["--delay-ms", "20"]).await;
    let fleet = proxy_over_dns(port, 10, |_| {}).await;
    let load = Load::start(fleet.local, 4, 400, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim = &mut backends[3];
    let victim_addr = victim.addr.to_string();
    let view = |states: Vec<EndpointView>| {
        states
            .into_iter()
            .find(|e| e.address == victim_addr)
            .unwrap()
    };
    let before = view(endpoint_states(&fleet.proxy).await);
    victim.kill().await.unwrap();
    let killed = Instant::now();
    // Until the proxy has read the connection's end it cannot know, so the calls it starts on
    // the victim until then are in flight on it too: count them, and when it noticed.
    let (noticed, after) = loop {
        let now = view(endpoint_states(&fleet.proxy).await);
        if now.state != "ready" {
            break (Instant::now(), now);
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "kill unnoticed");
    };
    let in_flight = before.outstanding + (after.started - before.started);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let failures_after_kill = load.failures.lock().unwrap().len();

    // Back on the same address: the proxy reconnects and sends it calls again.
    victim.restart().await.unwrap();
    wait_for_endpoints(&fleet.proxy, "ready", 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let LoadResult {
        offered,
        failures,
        rate,
        ..
    } = load.stop().await;
    eprintln!(
        "kill -9: {offered} calls at {rate:.0} calls/s; {} in flight on the victim when killed, \
         {} more started before the proxy noticed ({:.1} ms), {} failed",
        before.outstanding,
        after.started - before.started,
        (noticed - killed).as_secs_f64() * 1000.0,
        failures.len()
    );
    assert!(rate >= 200.0, "{rate:.0} calls/s");
    assert_eq!(
        failures.len(),
        failures_after_kill,
        "failures after the restart"
    );
    assert!(
        failures.len() as u64 <= in_flight,
        "{} failed, {in_flight} were in flight: {failures:#?}",
        failures.len()
    );
    for failure in &failures {
        assert!(
            failure.started < noticed,
            "a call started after the proxy saw the kill failed: {failure:?}"
        );
    }
    assert!(
        calls_served(backends[3].addr).await > 0,
        "restarted victim got no calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_stopping_gracefully_under_load_fails_no_calls() {
    let (port, _) = spawn_backends(3, Behaviour::default()).await;
    // A fourth backend that will stop gracefully (GOAWAY) while calls flow.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind((pod_ip(3), port))
        .await
        .unwrap();
    let leaving = Backend::new("backend-3", Behaviour::default());
    let server = tokio::spawn(leaving.serve(listener, async {
        let _ = stop_rx.await;
    }));
    let fleet = proxy_over_dns(port, 4, |_| {}).await;
    let load = Load::start(fleet.local, 4, 200, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let LoadResult { ok, failures, .. } = load.stop().await;
    assert!(ok >= 200, "{ok} calls");
    assert!(
        failures.is_empty(),
        "calls failed while a backend stopped gracefully: {failures:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_followed_by_a_reset_still_retries_the_refused_call() {
    // A backend ending its connection in a hurry: GOAWAY (nothing processed) and at once a
    // reset. Its calls are provably unprocessed and go to the healthy backend. (Whether the
    // proxy reads the GOAWAY before a write of its own meets the reset is up to the scheduler;
    // the engine reads what the endpoint sent after its connection ended, so the GOAWAY counts
    // either way; the rolling restart test on a starved machine is where that race showed.)
    let (turned_away_addr, turned_away) =
        raw::spawn_goaway_and_reset(SocketAddr::new(pod_ip(0), 0))
            .await
            .unwrap();
    let healthy = Backend::new("backend-1", Behaviour::default());
    let healthy_addr = healthy.spawn(SocketAddr::new(pod_ip(1), 0)).await.unwrap();
    let (config, local) = loopback_config(
        Discovery::Static(vec![turned_away_addr, healthy_addr]),
        |u| u.balancer = Balancer::RoundRobin,
    );
    let _proxy = ProxyProcess::start(&config).await.unwrap();
    let mut client = client(local).await;
    let mut calls = 0;
    while turned_away.load(Ordering::SeqCst) < 3 {
        calls += 1;
        assert!(
            calls <= 200,
            "the proxy stopped sending calls to the resetting backend"
        );
        let reply = client.unary(EchoRequest::default()).await;
        match reply {
            Ok(reply) => assert_eq!(reply.into_inner().backend, "backend-1"),
            Err(status) => panic!("call {calls} failed: {status:?}"),
        }
    }
}

/// 3 healthy in-process backends and a fourth with `behaviour`; its stats.
async fn three_and_one(behaviour: Behaviour) -> (u16, Arc<fanout_e2e::backend::Stats>) {
    let (port, _) = spawn_backends(3, Behaviour::default()).await;
    let listener = tokio::net::TcpListener::bind((pod_ip(3), port))
        .await
        .unwrap();
    let odd = Backend::new("backend-3", behaviour);
    let stats = odd.stats();
    tokio::spawn(odd.serve(listener, std::future::pending()));
    (port, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_half_its_calls_is_ejected_and_retries_hide_it() {
    let (port, failing) = three_and_one(Behaviour {
        fail_percent: 50,
        ..Behaviour::default()
    })
    .await;
    let Fleet { proxy, local, .. } = proxy_over_dns(port, 4, |u| {
        u.ejection.consecutive_failures = 2;
        // Ejected for longer than the test can take, however slow the machine: the end
        // state checked below is still the ejection.
        u.ejection.base_time = Duration::from_secs(600);
        u.ejection.max_time = Duration::from_secs(600);
    })
    .await;

    let mut client = client(local).await;
    let mut failures = Vec::new();
    for _ in 0..2000 {
        if let Err(status) = client.unary(EchoRequest::default()).await {
            failures.push(status);
        }
    }
    // Its UNAVAILABLE answers are Trailers-Only (no message sent): retried on another
    // endpoint, so the client sees none of them.
    assert!(failures.is_empty(), "{failures:#?}");
    let share = failing.calls.load(Ordering::SeqCst) as f64 / 2000.0;
    eprintln!(
        "half failing: backend-3 took {:.2}% of 2000 calls, the client saw {} failures",
        share * 100.0,
        failures.len()
    );
    assert!(
        share < 0.05,
        "backend-3 took {:.1}% of calls",
        share * 100.0
    );
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    assert!(endpoints.contains("\"ejected\""), "{endpoints}");
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("fanout_proxy_endpoints{upstream=\"app.shop\",state=\"ejected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("fanout_proxy_retries_total{upstream=\"app.shop\",reason=\"unavailable\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_off_the_failing_backend_is_ejected_within_the_threshold() {
    let (port, _) = three_and_one(Behaviour {
        fail_percent: 100,
        ..Behaviour::default()
    })
    .await;
    // Kept whole: dropping the fleet would stop the proxy.
    let fleet = proxy_over_dns(port, 4, |u| {
        u.retry.enabled = false;
        u.ejection.consecutive_failures = 3;
        // Ejected for longer than the test can take, however slow the machine: the end
        // state checked below is still the ejection.
        u.ejection.base_time = Duration::from_secs(600);
        u.ejection.max_time = Duration::from_secs(600);
    })
    .await;
    let mut client = client(fleet.local).await;
    let mut failed = 0;
    for _ in 0..500 {
        if let Err(status) = client.unary(EchoRequest::default()).await {
            assert_eq!(status.code(), tonic::Code::Unavailable);
            failed += 1;
        }
    }
    // Its first three answers fail the calls; then it is out.
    assert_eq!(failed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_backend_gets_few_calls_and_p99_holds() {
    // Processes, so that the backends' latency is their own and not the test's scheduling.
    let (port, _backends) = backend_process::on_pod_ips(10, |n| {
        vec!["--delay-ms", if n == 9 { "100" } else { "10" }]
    })
    .await;
    let Fleet { local, proxy, .. } = proxy_over_dns(port, 10, |_| {}).await;

    let clients = futures::future::join_all((0..4).map(|_| client(local))).await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let mut client = clients[n % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..500 {
                let started = Instant::now();
                let reply = client.unary(EchoRequest::default()).await.unwrap();
                answers.push((reply.into_inner().backend, started.elapsed()));
            }
            answers
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let slow_calls = all.iter().filter(|(b, _)| b == "backend-9").count();
    let mut overall: Vec<Duration> = all.iter().map(|(_, l)| *l).collect();
    let mut fast: Vec<Duration> = all
        .iter()
        .filter(|(b, _)| b != "backend-9")
        .map(|(_, l)| *l)
        .collect();
    overall.sort();
    fast.sort();
    let (p99, fast_p99) = (percentile(&overall, 99.0), percentile(&fast, 99.0));
    let share = slow_calls as f64 / all.len() as f64;
    eprintln!(
        "slow backend: {:.2}% of {} calls; p99 {p99:?} overall, {fast_p99:?} on fast backends",
        share * 100.0,
        all.len()
    );
    assert!(share < 0.10, "the slow backend took {:.1}%", share * 100.0);
    assert!(
        p99.as_secs_f64() <= fast_p99.as_secs_f64() * 1.5,
        "p99 {p99:?} vs {fast_p99:?} on the fast backends; {}",
        proxy.admin_get("/endpoints").await.unwrap().1
    );
}

/// 4 in-process backends with switchable health, and a proxy checking them every 100 ms.
async fn health_checked() -> (
    Fleet,
    Vec<HealthSwitch>,
    Vec<Arc<fanout_e2e::backend::Stats>>,
) {
    let port = std::net::TcpListener::bind((pod_ip(0), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut switches, mut stats) = (Vec::new(), Vec::new());
    for n in 0..4 {
        let backend = Backend::new(format!("backend-{n}"), Behaviour::default());
        switches.push(backend.health());
        stats.push(backend.stats());
        let listener = tokio::net::TcpListener::bind((pod_ip(n), port))
            .await
            .unwrap();
        tokio::spawn(backend.serve(listener, std::future::pending()));
    }
    let fleet = proxy_over_dns(port, 4, |u| {
        u.health_check = Some(HealthCheck {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            service: String::new(),
        });
    })
    .await;
    (fleet, switches, stats)
}

async fn unary_calls(local: SocketAddr, count: usize) -> Result<(), tonic::Status> {
    let mut client = client(local).await;
    for _ in 0..count {
        client.unary(EchoRequest::default()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reporting_not_serving_gets_no_calls_until_serving_again() {
    let (fleet, switches, stats) = health_checked().await;
    switches[3].set_serving(false);
    wait_for_endpoints(&fleet.proxy, "unhealthy", 1).await;
    let before = stats[3].calls.load(Ordering::SeqCst);
    unary_calls(fleet.local, 400).await.unwrap();
    assert_eq!(
        stats[3].calls.load(Ordering::SeqCst),
        before,
        "a NOT_SERVING backend got calls"
    );

    switches[3].set_serving(true);
    wait_for_endpoints(&fleet.proxy, "ready", 4).await;
    unary_calls(fleet.local, 400).await.unwrap();
    assert!(stats[3].calls.load(Ordering::SeqCst) > before + 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_with_a_reason_while_no_endpoint_is_healthy_then_200() {
    let (fleet, switches, _) = health_checked().await;
    assert_eq!(fleet.proxy.admin_get("/ready").await.unwrap().0, 200);
    for switch in &switches {
        switch.set_serving(false);
    }
    wait_for_endpoints(&fleet.proxy, "unhealthy", 4).await;
    let (status, body) = fleet.proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503);
    let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        reason.to_string().contains("app.shop") && reason.to_string().contains("4 unhealthy"),
        "{body}"
    );
    let failed = unary_calls(fleet.local, 1).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable);
    assert!(failed.message().contains("app.shop"), "{failed:?}");

    switches[1].set_serving(true);
    wait_for_endpoints(&fleet.proxy, "ready", 1).await;
    assert_eq!(fleet.proxy.admin_get("/ready").await.unwrap().0, 200);
    unary_calls(fleet.local, 10).await.unwrap();
}
