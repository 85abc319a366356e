//! Traffic policy declared on the Service reaching running proxies through the discovery
//! server: a method timeout, a whole-call limit, a retry policy changed mid-load, a canary
//! split, the balancer; invalid edits logged, shown to the owner as an Event, and the last
//! valid policy kept.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::Behaviour;
use fanout_e2e::discovery_setup::{
    Setup, app_service, serve_app, subscribed_proxy_config, wait_for_addresses,
};
use fanout_e2e::fleet::client;
use fanout_e2e::kube_api::{SliceEndpoint, endpoint_slice, service};
use fanout_e2e::open_load::Load;
use fanout_e2e::proxy::{ProxyProcess, pod_ip, spawn_backends, spawn_backends_behaving};
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;

fn with_service_config(text: &str) -> serde_json::Value {
    let mut service = app_service();
    service["metadata"]["annotations"] = json!({"fanout.dev/service-config": text});
    service
}

fn retry_config(max_attempts: u32) -> String {
    json!({"methodConfig": [{"name": [{"service": "fanout.test.v1.Test"}],
        "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.01s",
            "maxBackoff": "0.05s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]})
    .to_string()
}

/// A proxy receiving a policy change mid-load. Backends fail 10 % of calls; under
/// `maxAttempts: 5` no call fails. The owner switches to `maxAttempts: 1` while calls flow:
/// from then on about 10 % fail, each with the backend's own `UNAVAILABLE`, and the switch
/// itself fails nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_changed_mid_load_applies_to_the_calls_after_it() {
    let setup = Setup::new().await;
    let flaky = Behaviour {
        fail_percent: 10,
        ..Behaviour::default()
    };
    let (port, _) = spawn_backends(4, flaky).await;
    setup.api.apply(with_service_config(&retry_config(5)));
    let (_server, _proxy, local) = serve_app(&setup, port, 4, None).await;

    let load = Load::start(local, 2, 300, 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let switched = Instant::now();
    setup.api.apply(with_service_config(&retry_config(1)));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let result = load.stop().await;
    let (before, after): (Vec<_>, Vec<_>) =
        result.failures.iter().partition(|f| f.started < switched);
    let share = after.len() as f64 * 100.0 / (result.rate * 4.0);
    eprintln!(
        "policy switched mid-load: {} calls at {:.0}/s, {} failed before the switch, {} after \
         ({share:.1} % of the calls after)",
        result.offered,
        result.rate,
        before.len(),
        after.len()
    );
    assert!(before.is_empty(), "failed under maxAttempts 5: {before:#?}");
    for failure in &after {
        assert_eq!(failure.status.code(), Code::Unavailable, "{failure:?}");
        assert!(
            failure.status.message().contains("fails on purpose"),
            "{failure:?}"
        );
    }
    assert!(
        (4.0..=18.0).contains(&share),
        "{share:.1} % failed after the switch"
    );
}

/// A method timeout declared on the Service (`fanout.dev/service-config`) reaches a running
/// proxy through the discovery server and ends that method's calls at its deadline; other
/// methods are not limited; a change that does not parse is logged with its path and leaves
/// the last valid config in force; removing the annotation lifts the limit. Then a whole-call
/// limit (`fanout.dev/policy` `request_timeout`) arrives the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_timeout_declared_on_the_service_reaches_running_proxies() {
    use fanout_e2e::backend::proto::{EchoRequest, StreamRequest};
    let setup = Setup::new().await;
    let (port, _stats) = spawn_backends(2, Behaviour::default()).await;
    let annotated = |service_config: Option<&str>| {
        let mut service = app_service();
        if let Some(text) = service_config {
            service["metadata"]["annotations"] = json!({"fanout.dev/service-config": text});
        }
        service
    };
    setup.api.apply(annotated(None));
    let log = setup.dir.path().join("proxy.log");
    let (_server, proxy, local) = serve_app(&setup, port, 2, Some(&log)).await;
    let mut app = client(local).await;
    let slow = || EchoRequest {
        delay_ms: 1000,
        ..Default::default()
    };
    // A call ended by the proxy at the Service's deadline, and how long it took.
    async fn ended_early(
        app: &mut fanout_e2e::backend::proto::test_client::TestClient<Channel>,
        request: EchoRequest,
    ) -> Duration {
        let started = Instant::now();
        let status = app.unary(request).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        started.elapsed()
    }

    app.unary(slow()).await.unwrap();

    setup.api.apply(annotated(Some(
        r#"{"methodConfig": [{"name": [{"service": "fanout.test.v1.Test", "method": "Unary"}],
            "timeout": "0.2s"}]}"#,
    )));
    // Live within a second, without a restart.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = ended_early(&mut app, slow()).await;
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_millis(800),
        "{took:?}"
    );
    // A server stream of 600 ms is another method: not limited.
    let mut stream = app
        .server_stream(StreamRequest {
            count: 2,
            interval_ms: 300,
            reply_bytes: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = 0;
    while stream.message().await.unwrap().is_some() {
        messages += 1;
    }
    assert_eq!(messages, 2);

    setup.api.apply(annotated(Some(
        r#"{"methodConfig": [{"timeout": "soon"}]}"#,
    )));
    tokio::time::sleep(Duration::from_secs(1)).await;
    ended_early(&mut app, slow()).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("methodConfig[0].timeout: \\\"soon\\\" is not a duration")
            && logged.contains("the last valid one stays in force"),
        "{logged}"
    );
    // The owner sees it on the Service: a Warning Event naming the fault.
    let events = setup.api.events();
    let event = events
        .iter()
        .find(|e| e["reason"] == "InvalidServiceConfig")
        .unwrap_or_else(|| panic!("no Event: {events:#?}"));
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "app");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("fanout.dev/service-config is invalid and not applied")
            && note.contains("methodConfig[0].timeout"),
        "{note}"
    );

    setup.api.apply(annotated(None));
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.unary(slow()).await.unwrap();

    // fanout.dev/policy's whole-call limit acts live too, on every method.
    let mut service = app_service();
    service["metadata"]["annotations"] =
        json!({"fanout.dev/policy": r#"{"request_timeout": "300ms"}"#});
    setup.api.apply(service);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let took = ended_early(&mut app, slow()).await;
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(900),
        "{took:?}"
    );
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    assert_eq!(
        endpoints["upstreams"][0]["policy"]["request_timeout_ms"], 300,
        "{endpoints:#}"
    );
}

/// A canary declared on the Service (`fanout.dev/policy` `split`): `app` 90, `app-canary` 10.
/// The proxy subscribed to `app` gets both Services' endpoints and sends the canary its share
/// of 10,000 calls within ±2 percentage points; when the canary's only pod leaves, `app`
/// takes every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_sends_the_canary_its_share() {
    use fanout_e2e::backend::proto::EchoRequest;
    let setup = Setup::new().await;
    let (port, stats) = spawn_backends(4, Behaviour::default()).await;
    let mut app = app_service();
    app["metadata"]["annotations"] = json!({"fanout.dev/policy":
        r#"{"split": [{"service": "app", "weight": 90}, {"service": "app-canary", "weight": 10}]}"#});
    setup.api.apply(app);
    setup.api.apply(service(
        "shop",
        "app-canary",
        false,
        &[("grpc", 80, json!("rpc"))],
    ));
    let stable: Vec<SliceEndpoint> = (0..3).map(|i| SliceEndpoint::ready(pod_ip(i))).collect();
    setup.api.apply(endpoint_slice(
        "shop",
        "app-1",
        "app",
        ("grpc", port),
        &stable,
    ));
    let canary_slice = |endpoints: &[SliceEndpoint]| {
        endpoint_slice(
            "shop",
            "app-canary-1",
            "app-canary",
            ("grpc", port),
            endpoints,
        )
    };
    setup
        .api
        .apply(canary_slice(&[SliceEndpoint::ready(pod_ip(3))]));
    let _server = setup.start_server(&[]);
    let (config, local) = subscribed_proxy_config(&setup);
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let mut expected: Vec<String> = (0..4).map(|i| format!("{}:{port}", pod_ip(i))).collect();
    expected.sort();
    wait_for_addresses(&proxy, &expected).await;

    let calls = 10_000;
    let callers = 4;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut app = client(local).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..calls / callers {
                app.unary(EchoRequest::default()).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let served: Vec<u64> = stats
        .iter()
        .map(|s| s.calls.load(Ordering::SeqCst))
        .collect();
    assert_eq!(served.iter().sum::<u64>(), calls);
    let canary_percent = served[3] as f64 * 100.0 / calls as f64;
    eprintln!("split 90/10: calls per backend {served:?}, canary {canary_percent:.2} %");
    assert!(
        (8.0..=12.0).contains(&canary_percent),
        "the canary took {canary_percent:.2} % of {calls} calls: {served:?}"
    );
    let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    assert_eq!(
        endpoints["upstreams"][0]["split"][1],
        json!({"service": "shop/app-canary", "weight": 10, "endpoints": 1, "ready": 1}),
        "{endpoints:#}"
    );

    // The canary's pod goes: every call to `app`, none failing.
    setup.api.apply(canary_slice(&[]));
    wait_for_addresses(&proxy, &expected[..3]).await;
    let before = stats[3].calls.load(Ordering::SeqCst);
    let mut app = client(local).await;
    for _ in 0..200 {
        app.unary(EchoRequest::default()).await.unwrap();
    }
    assert_eq!(stats[3].calls.load(Ordering::SeqCst), before);
}

/// The balancer a Service's owner names in `fanout.dev/policy` applies to running proxies'
/// next calls. Of two pods, one answers 20 ms late: under the default peak-EWMA the proxy
/// sends it few of 200 calls made one at a time; once the owner asks for `round_robin`, the
/// two take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_named_on_the_service_applies_to_the_next_calls() {
    use fanout_e2e::backend::proto::EchoRequest;
    let setup = Setup::new().await;
    let slow = Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    };
    let (port, stats) = spawn_backends_behaving(&[slow, Behaviour::default()], 0).await;
    setup.api.apply(app_service());
    let (_server, proxy, local) = serve_app(&setup, port, 2, None).await;
    let balancer = || async {
        let (_, endpoints) = proxy.admin_get("/endpoints").await.unwrap();
        let endpoints: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
        endpoints["upstreams"][0]["balancer"].clone()
    };
    assert_eq!(balancer().await, "peak_ewma");
    let mut app = client(local).await;
    let calls_per_backend = |stats: &[std::sync::Arc<fanout_e2e::backend::Stats>]| {
        stats
            .iter()
            .map(|s| s.calls.load(Ordering::SeqCst))
            .collect::<Vec<u64>>()
    };
    for _ in 0..200 {
        app.unary(EchoRequest::default()).await.unwrap();
    }
    let before = calls_per_backend(&stats);
    eprintln!("peak_ewma: calls per backend (slow, fast) {before:?}");
    assert!(before[0] < 50, "the slow pod took {before:?} of 200 calls");

    let mut app_service = app_service();
    app_service["metadata"]["annotations"] =
        json!({"fanout.dev/policy": r#"{"balancer": "round_robin"}"#});
    setup.api.apply(app_service);
    let deadline = Instant::now() + Duration::from_secs(10);
    while balancer().await != "round_robin" {
        assert!(
            Instant::now() < deadline,
            "the policy's balancer never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The engine takes the settings the proxy fed it a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..100 {
        app.unary(EchoRequest::default()).await.unwrap();
    }
    let after: Vec<u64> = calls_per_backend(&stats)
        .iter()
        .zip(&before)
        .map(|(now, then)| now - then)
        .collect();
    eprintln!("round_robin: calls per backend (slow, fast) {after:?}");
    assert!(
        after.iter().all(|n| (49..=51).contains(n)),
        "round robin gave {after:?} of 100 calls"
    );
}
