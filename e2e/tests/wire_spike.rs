//! Issue 13's measuring spike (`fanout-wire`) forwards real gRPC calls between tonic clients
//! and backends: what the benchmark measures is a data path that works, not one that only
//! moves bytes. Calls take turns over the endpoints; messages past every window cross under
//! flow control; streams in both directions, status codes with trailers, and cancellation
//! arrive as sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend::proto::{EchoRequest, StreamRequest};
use fanout_e2e::backend::{Backend, Behaviour, Stats};
use fanout_e2e::backend_process::{self, Implementation};
use fanout_e2e::proxy::pod_ip;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

/// `backends` tonic backends on 127.0.0.2…, the spike in front of them on a thread of its
/// own (it runs on one thread, as in the benchmark); the spike's address and the backends'
/// stats.
async fn setup(backends: usize) -> (SocketAddr, Vec<Arc<Stats>>) {
    let mut addrs = Vec::new();
    let mut stats = Vec::new();
    for n in 0..backends {
        let backend = Backend::new(format!("backend-{n}"), Behaviour::default());
        stats.push(backend.stats());
        addrs.push(backend.spawn(SocketAddr::new(pod_ip(n), 0)).await.unwrap());
    }
    (spike(addrs), stats)
}

/// The spike in front of `endpoints`, on a thread of its own; its address.
fn spike(addrs: Vec<SocketAddr>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let listen = listener.local_addr().unwrap();
    fanout_wire::engine::spawn_thread(listener, addrs);
    listen
}

async fn client(listen: SocketAddr) -> TestClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TestClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_take_turns_over_the_endpoints_and_arrive_unchanged() {
    let (listen, _) = setup(3).await;
    let client = client(listen).await;
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let mut client = client.clone();
        calls.spawn(async move {
            let mut backends = Vec::new();
            for i in 0..75u32 {
                let mut request = tonic::Request::new(EchoRequest {
                    payload: (worker * 1000 + i).to_be_bytes().to_vec(),
                    ..Default::default()
                });
                request
                    .metadata_mut()
                    .insert("x-echo-trace", format!("t-{worker}-{i}").parse().unwrap());
                let response = client.unary(request).await.unwrap();
                assert_eq!(
                    response.metadata().get("x-echo-trace").unwrap(),
                    &format!("t-{worker}-{i}")
                );
                let reply = response.into_inner();
                assert_eq!(reply.payload, (worker * 1000 + i).to_be_bytes().to_vec());
                backends.push(reply.backend);
            }
            backends
        });
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(backends) = calls.join_next().await {
        for backend in backends.unwrap() {
            *counts.entry(backend).or_insert(0) += 1;
        }
    }
    // fanout's balancer over 3 equal endpoints: each takes about a third of 300 calls.
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| (60..=140).contains(&n)),
        "{counts:?}"
    );

    let mut client = client;
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
    assert_eq!(status.message(), "conflict");
    assert_eq!(status.metadata().get("x-echo-retry-after").unwrap(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_larger_than_every_window_cross_whole() {
    let (listen, _) = setup(1).await;
    let mut client = client(listen).await;
    // 6 MiB each way: past the backend's and the client's stream windows and past the spike's
    // own connection window, so every direction waits for WINDOW_UPDATEs.
    let payload: Vec<u8> = (0..6u32 << 20).map(|i| (i % 251) as u8).collect();
    let reply = client
        .unary(EchoRequest {
            payload: payload.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.payload == payload, "a 6 MiB message arrives whole");

    // Several at once on one connection share its window.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = client.clone();
        calls.spawn(async move {
            client
                .unary(EchoRequest {
                    reply_bytes: 3 << 20,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().payload.len())
        });
    }
    while let Some(len) = calls.join_next().await {
        assert_eq!(len.unwrap().unwrap(), 3 << 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_flow_both_ways_and_a_cancel_reaches_the_backend() {
    let (listen, stats) = setup(1).await;
    let mut client = client(listen).await;
    fanout_e2e::streams_check::streams_arrive_whole_and_in_order(&mut client, 5_000).await;

    let mut stream = client
        .server_stream(StreamRequest {
            count: 100_000,
            interval_ms: 10,
            reply_bytes: 10,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats[0].cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_c_core_backends_answer_through_the_spike() {
    // C-core's HPACK (Huffman, its own table sizes) and its SETTINGS, not tonic's.
    let (port, _backends) =
        backend_process::on_pod_ips_as(Implementation::Grpcio, 3, |_| vec![]).await;
    let listen = spike((0..3).map(|n| SocketAddr::new(pod_ip(n), port)).collect());
    let mut client = client(listen).await;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..90 {
        // This backend answers with its name and a call number only.
        let reply = client
            .unary(EchoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(reply.seq >= 1);
        *counts.entry(reply.backend).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n >= 15), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_back_only_its_own_stream() {
    use bytes::BytesMut;
    use fanout_wire::frame;
    use fanout_wire::hpack::{self, Indexing};
    use tokio::io::AsyncWriteExt;

    let (listen, _) = setup(1).await;
    // A bare client that grants the largest windows there are, asks for 400 MiB of server
    // stream, and never reads: only its socket holds the spike back.
    let mut stalled = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut out = BytesMut::from(frame::PREFACE);
    frame::put_settings(
        &mut out,
        &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 0x7fff_ffff)],
    );
    frame::put_window_update(&mut out, 0, 0x7fff_ffff - 65_535);
    let at = frame::begin_frame(&mut out, frame::HEADERS, frame::END_HEADERS, 1);
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/fanout.test.v1.Test/ServerStream"),
        (":authority", "app"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack::encode_field(
            &mut out,
            name.as_bytes(),
            value.as_bytes(),
            Indexing::Allowed,
        );
    }
    frame::finish_frame(&mut out, at);
    let body = fanout_e2e::raw::frame(&StreamRequest {
        count: 25_600,
        interval_ms: 0,
        reply_bytes: 16 << 10,
    });
    frame::put_data(&mut out, 1, &body, true);
    let rss_before = rss_mib();
    stalled.write_all(&out).await.unwrap();

    // Meanwhile other clients are served as usual, and the spike does not buffer the stream
    // (the backend could send all of it in well under a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let grown = rss_mib() - rss_before;
    assert!(grown < 100, "the test process grew by {grown} MiB");
    let mut client = client(listen).await;
    for _ in 0..20 {
        let reply =
            tokio::time::timeout(Duration::from_secs(5), client.unary(EchoRequest::default()))
                .await
                .expect("a call beside a stalled client is answered within 5 s");
        reply.unwrap();
    }
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_while_their_data_waits_leave_the_endpoint_its_window() {
    use bytes::BytesMut;
    use fanout_wire::frame;
    use fanout_wire::hpack::{self, Indexing};
    use tokio::io::AsyncWriteExt;

    let (listen, _) = setup(1).await;
    // A bare client with HTTP/2's default windows (64 KiB) that asks for 1 MiB of server
    // stream, never reads it, and resets the stream: each time the spike holds most of a
    // stream window (1 MiB) of the endpoint's data for it, and drops it at the reset. Six of
    // them add up to more than the endpoint connection's whole window (4 MiB).
    let mut bare = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut out = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut out, &[]);
    bare.write_all(&out).await.unwrap();
    let body = fanout_e2e::raw::frame(&StreamRequest {
        count: 64,
        interval_ms: 0,
        reply_bytes: 16 << 10,
    });
    for stream in (1..=11).step_by(2) {
        let mut out = BytesMut::new();
        let at = frame::begin_frame(&mut out, frame::HEADERS, frame::END_HEADERS, stream);
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/fanout.test.v1.Test/ServerStream"),
            (":authority", "app"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            hpack::encode_field(
                &mut out,
                name.as_bytes(),
                value.as_bytes(),
                Indexing::Allowed,
            );
        }
        frame::finish_frame(&mut out, at);
        frame::put_data(&mut out, stream, &body, true);
        bare.write_all(&out).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut reset = BytesMut::new();
        frame::put_rst(&mut reset, stream, frame::CANCEL);
        bare.write_all(&reset).await.unwrap();
    }

    // The endpoint's connection still carries answers.
    let mut client = client(listen).await;
    for _ in 0..5 {
        let request = EchoRequest {
            reply_bytes: 256 << 10,
            ..Default::default()
        };
        let reply = tokio::time::timeout(Duration::from_secs(5), client.unary(request))
            .await
            .expect("an answer within 5 s after the resets");
        assert_eq!(reply.unwrap().into_inner().payload.len(), 256 << 10);
    }
    drop(bare);
}

/// This process's resident memory (spike, backends and clients alike), MiB.
fn rss_mib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}
