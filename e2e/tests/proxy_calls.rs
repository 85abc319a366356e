//! Every kind of gRPC call through the proxy arrives as the client and backend sent it:
//! messages, metadata, status codes, trailers, cancellation and deadlines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend::proto::{EchoRequest, StreamRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::proxy::{ProxyProcess, loopback_config, pod_ip};
use fanout_e2e::raw;
use fanout_proxy_config::{Discovery, UpstreamConfig};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// One backend on 127.0.0.2 behind a proxy with static discovery, and a tonic client.
async fn setup() -> (ProxyProcess, TestClient<Channel>, Arc<Stats>) {
    let (proxy, local, stats) = setup_raw().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{local}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = TestClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    (proxy, client, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_with_large_messages_and_metadata() {
    let (_proxy, mut client, _) = setup().await;
    let payload = vec![7u8; 3 << 20];
    let mut request = tonic::Request::new(EchoRequest {
        payload: payload.clone(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-echo-trace", "abc-123".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-other", "dropped-by-backend".parse().unwrap());
    let response = client.unary(request).await.unwrap();
    assert_eq!(response.metadata().get("x-echo-trace").unwrap(), "abc-123");
    let reply = response.into_inner();
    assert_eq!(reply.backend, "backend-0");
    assert_eq!(reply.payload, payload, "a 3 MiB message arrives whole");

    let reply = client
        .unary(EchoRequest {
            reply_bytes: 2 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload.len(), 2 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_codes_and_messages_arrive_unchanged() {
    let (_proxy, mut client, _) = setup().await;
    // Trailers carry more than the status: metadata set by the backend arrives with them.
    let mut request = tonic::Request::new(EchoRequest {
        fail_code: Code::Aborted as i32,
        fail_message: "conflict".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-echo-retry-after", "3".parse().unwrap());
    let status = client.unary(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.metadata().get("x-echo-retry-after").unwrap(), "3");

    for (code, message) in [
        (Code::NotFound, "no such thing"),
        (Code::PermissionDenied, "nope: ünïcödé % sign"),
        (Code::Unavailable, "busy"),
        (Code::Internal, "boom"),
        (Code::FailedPrecondition, ""),
    ] {
        let status = client
            .unary(EchoRequest {
                fail_code: code as i32,
                fail_message: message.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code);
        assert_eq!(status.message(), message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_client_streaming_and_bidi() {
    let (_proxy, mut client, _) = setup().await;
    // 10,000 messages each way on the bidirectional stream.
    fanout_e2e::streams_check::streams_arrive_whole_and_in_order(&mut client, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_is_cancelled_at_the_backend() {
    let (_proxy, mut client, stats) = setup().await;
    let call = tokio::spawn(async move {
        client
            .server_stream(StreamRequest {
                count: 100_000,
                interval_ms: 10,
                reply_bytes: 10,
            })
            .await
            .map(|r| r.into_inner())
    });
    let mut stream = call.await.unwrap().unwrap();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream); // the client resets the stream
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One backend on 127.0.0.2 behind a proxy with static discovery; the proxy's listener.
async fn setup_raw() -> (ProxyProcess, SocketAddr, Arc<Stats>) {
    start_with(|_| {}).await
}

/// As [`setup_raw`], with the upstream's config adjusted by `tune`.
async fn start_with(
    tune: impl FnOnce(&mut UpstreamConfig),
) -> (ProxyProcess, SocketAddr, Arc<Stats>) {
    let backend = Backend::new("backend-0", Behaviour::default());
    let stats = backend.stats();
    let addr = backend.spawn(SocketAddr::new(pod_ip(0), 0)).await.unwrap();
    let (config, local) = loopback_config(Discovery::Static(vec![addr]), tune);
    (ProxyProcess::start(&config).await.unwrap(), local, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_deadline_exceeded() {
    let (_proxy, local, stats) = setup_raw().await;
    let started = Instant::now();
    let request = EchoRequest {
        delay_ms: 2_000,
        ..Default::default()
    };
    let response = raw::unary(
        local,
        "/fanout.test.v1.Test/Unary",
        &request,
        &[("grpc-timeout", "200m")],
    )
    .await
    .unwrap();
    assert_eq!(
        response.grpc_status(),
        Some(4),
        "DEADLINE_EXCEEDED: {response:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    stats.wait_for_cancellations(1).await;

    // Within its deadline, a call is untouched.
    let response = raw::unary(
        local,
        "/fanout.test.v1.Test/Unary",
        &EchoRequest::default(),
        &[("grpc-timeout", "5S")],
    )
    .await
    .unwrap();
    assert_eq!(response.grpc_status(), Some(0), "{response:?}");
    assert_eq!(response.messages.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_mid_stream_ends_the_stream_and_the_backend_call() {
    let (_proxy, mut client, stats) = setup().await;
    let mut request = tonic::Request::new(StreamRequest {
        count: 1000,
        interval_ms: 20,
        reply_bytes: 1,
    });
    request
        .metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let mut received = 0;
    let status = loop {
        match stream.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("stream ended without a status"),
        }
    };
    assert!(received > 0);
    // tonic's client enforces grpc-timeout too and reports its own timer as CANCELLED
    // "Timeout expired"; the proxy's answer is DEADLINE_EXCEEDED (checked with the raw client).
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    stats.wait_for_cancellations(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_in_trailers_after_messages_arrives_unchanged() {
    let (_proxy, mut client, _) = setup().await;
    let messages = vec![
        EchoRequest::default(),
        EchoRequest::default(),
        EchoRequest {
            fail_code: Code::FailedPrecondition as i32,
            fail_message: "late: 100%".into(),
            ..Default::default()
        },
    ];
    let mut replies = client
        .bidi(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replies.next().await.unwrap().unwrap().backend, "backend-0");
    assert_eq!(replies.next().await.unwrap().unwrap().backend, "backend-0");
    let status = replies.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "late: 100%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_request_timeout_caps_calls_without_a_deadline() {
    let (_proxy, local, _) =
        start_with(|upstream| upstream.timeouts.request = Some(Duration::from_millis(200))).await;
    let slow = EchoRequest {
        delay_ms: 2_000,
        ..Default::default()
    };
    let response = raw::unary(local, "/fanout.test.v1.Test/Unary", &slow, &[])
        .await
        .unwrap();
    assert_eq!(response.grpc_status(), Some(4), "{response:?}");
    let fast = EchoRequest::default();
    let response = raw::unary(local, "/fanout.test.v1.Test/Unary", &fast, &[])
        .await
        .unwrap();
    assert_eq!(response.grpc_status(), Some(0), "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_can_have_a_pool_of_connections() {
    let (proxy, local, _) = start_with(|upstream| upstream.connections_per_endpoint = 3).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = proxy.admin_get("/endpoints").await.unwrap();
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        if state["upstreams"][0]["endpoints"][0]["connections"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool never reached 3 connections: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..30 {
        let response = raw::unary(
            local,
            "/fanout.test.v1.Test/Unary",
            &EchoRequest::default(),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(response.grpc_status(), Some(0));
    }
}
