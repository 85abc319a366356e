//! Deadlines through the spike (issue 13's sprint, step 2's first part), as a client sees
//! them: a call past its deadline ends with the proxy's own DEADLINE_EXCEEDED, soon after the
//! deadline and not when the backend would have answered, and the backend's call is
//! cancelled; a stream past its deadline gets the status after the messages that went; the
//! upstream's own timeout applies when the client sets none, and the sooner of the two wins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend::proto::{EchoRequest, StreamRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::proxy::pod_ip;
use fanout_e2e::raw;
use fanout_wire::engine::{Settings, Upstream};
use tokio_stream::StreamExt;
use tonic::Code;

const UNARY: &str = "/fanout.test.v1.Test/Unary";

/// One tonic backend and the spike in front of it with `settings`: the spike's address and
/// the backend's stats.
async fn setup(settings: Settings) -> (SocketAddr, Arc<Stats>) {
    let backend = Backend::new("backend-0", Behaviour::default());
    let stats = backend.stats();
    let addr = backend.spawn(SocketAddr::new(pod_ip(0), 0)).await.unwrap();
    let (_, set) = tokio::sync::watch::channel(vec![addr]);
    let listen = fanout_wire::engine::spawn_on_loopback(Upstream::following(set, settings));
    (listen, stats)
}

/// A unary call the backend answers after `delay_ms`, with `headers`: its status, message,
/// and how long it took.
async fn slow_call(
    listen: SocketAddr,
    delay_ms: u32,
    headers: &[(&str, &str)],
) -> (Option<u16>, String, Duration) {
    let started = Instant::now();
    let request = EchoRequest {
        delay_ms,
        ..Default::default()
    };
    let response = raw::unary(listen, UNARY, &request, headers).await.unwrap();
    (
        response.grpc_status(),
        response.grpc_message(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_deadline_exceeded_and_the_backend_cancelled() {
    let (listen, stats) = setup(Settings::default()).await;
    let (status, message, took) = slow_call(listen, 2_000, &[("grpc-timeout", "200m")]).await;
    assert_eq!(status, Some(4), "DEADLINE_EXCEEDED: {message}");
    assert_eq!(message, "fanout: deadline exceeded");
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    stats.wait_for_cancellations(1).await;

    // Within its deadline, a call is untouched.
    let (status, message, _) = slow_call(listen, 50, &[("grpc-timeout", "5S")]).await;
    assert_eq!(status, Some(0), "{message}");
    // A deadline the spike cannot read is passed on as it came, and not enforced.
    let (status, message, _) = slow_call(listen, 50, &[("grpc-timeout", "soon")]).await;
    assert_eq!(status, Some(0), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_deadline_gets_the_status_after_the_messages_that_went() {
    let (listen, stats) = setup(Settings::default()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = TestClient::new(channel);
    let mut request = tonic::Request::new(StreamRequest {
        count: 20,
        interval_ms: 100,
        reply_bytes: 10,
    });
    // tonic only sends the deadline; it is the spike that enforces it.
    request.set_timeout(Duration::from_millis(450));
    let started = Instant::now();
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let mut received = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status after {received} messages"),
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(status.message(), "fanout: deadline exceeded");
    assert!(
        (2..=5).contains(&received),
        "{received} messages before the deadline"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    stats.wait_for_cancellations(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_timeout_applies_and_the_sooner_deadline_wins() {
    let settings = Settings {
        call_timeout: Some(Duration::from_millis(300)),
        ..Settings::default()
    };
    let (listen, stats) = setup(settings).await;
    let (status, message, took) = slow_call(listen, 2_000, &[]).await;
    assert_eq!(
        (status, message.as_str()),
        (Some(4), "fanout: deadline exceeded")
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(1),
        "{took:?}"
    );

    // The client's deadline is sooner: it ends the call.
    let (status, _, took) = slow_call(listen, 2_000, &[("grpc-timeout", "100m")]).await;
    assert_eq!(status, Some(4));
    assert!(took < Duration::from_millis(300), "{took:?}");
    // The upstream's is sooner than the client's 10 s.
    let (status, _, took) = slow_call(listen, 2_000, &[("grpc-timeout", "10S")]).await;
    assert_eq!(status, Some(4));
    assert!(took < Duration::from_secs(1), "{took:?}");
    stats.wait_for_cancellations(3).await;

    // A call within both is untouched.
    let (status, message, _) = slow_call(listen, 20, &[]).await;
    assert_eq!(status, Some(0), "{message}");
}
