//! Retries through the spike (issue 13's sprint, step 2), as a client sees them: an endpoint
//! that refuses a call unprocessed (REFUSED_STREAM, or a GOAWAY that names it) or answers it
//! with a Trailers-Only UNAVAILABLE does not fail the call: it opens again on another
//! endpoint. A request too large to keep, or refused again and again, goes to its client as
//! refused; retries add at most a fifth of the calls; with no endpoint at all a call fails at
//! once with UNAVAILABLE.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::{Backend, Behaviour};
use fanout_e2e::fleet::client;
use fanout_e2e::proxy::pod_ip;
use fanout_e2e::raw;
use fanout_e2e::resetting::spawn_resetting;
use fanout_wire::engine::{Settings, Upstream};
use fanout_wire::frame;
use tokio::sync::watch;

fn spike(set: watch::Receiver<Vec<SocketAddr>>) -> SocketAddr {
    spike_with(set, Settings::default())
}

fn spike_with(set: watch::Receiver<Vec<SocketAddr>>, settings: Settings) -> SocketAddr {
    fanout_wire::engine::spawn_on_loopback(Upstream::following(set, settings))
}

async fn healthy(n: usize) -> SocketAddr {
    Backend::new(format!("backend-{n}"), Behaviour::default())
        .spawn(SocketAddr::new(pod_ip(n), 0))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_with_refused_stream_is_answered_by_another_endpoint() {
    let (refusing, refused) =
        spawn_resetting(SocketAddr::new(pod_ip(0), 0), frame::REFUSED_STREAM).await;
    let (_set, watch) = watch::channel(vec![refusing, healthy(1).await]);
    let mut client = client(spike(watch)).await;
    let mut calls = 0;
    while refused.load(Ordering::SeqCst) < 5 {
        calls += 1;
        assert!(calls <= 300, "the refusing endpoint got no call in {calls}");
        let reply = client.unary(EchoRequest::default()).await;
        match reply {
            Ok(reply) => assert_eq!(reply.into_inner().backend, "backend-1"),
            Err(status) => panic!("call {calls} failed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_named_unprocessed_in_a_goaway_is_answered_by_another_endpoint() {
    // GOAWAY with last stream 0, then at once a reset: the spike may meet the reset on a write
    // before it reads the GOAWAY, and must still read it.
    let (leaving, turned_away) = raw::spawn_goaway_and_reset(SocketAddr::new(pod_ip(0), 0))
        .await
        .unwrap();
    let (_set, watch) = watch::channel(vec![leaving, healthy(1).await]);
    let mut client = client(spike(watch)).await;
    let mut calls = 0;
    while turned_away.load(Ordering::SeqCst) < 3 {
        calls += 1;
        assert!(calls <= 300, "the leaving endpoint got no call in {calls}");
        let body = EchoRequest {
            payload: vec![7; 1000],
            ..Default::default()
        };
        match client.unary(body).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert_eq!(reply.backend, "backend-1");
                assert_eq!(reply.payload, vec![7; 1000], "the body arrives whole");
            }
            Err(status) => panic!("call {calls} failed: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_to_keep_or_refused_again_and_again_is_refused_to_its_client() {
    let (a, refused_a) =
        spawn_resetting(SocketAddr::new(pod_ip(0), 0), frame::REFUSED_STREAM).await;
    let (b, refused_b) =
        spawn_resetting(SocketAddr::new(pod_ip(1), 0), frame::REFUSED_STREAM).await;
    let refused = || refused_a.load(Ordering::SeqCst) + refused_b.load(Ordering::SeqCst);
    let (_set, watch) = watch::channel(vec![a, b]);
    let mut client = client(spike(watch)).await;

    // Kept, but every endpoint refuses it: opened twice more (each time on the endpoint that
    // did not refuse it last), then refused.
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(refused(), 3, "{status:?}");

    // Past the 64 KiB kept for this (the endpoint refuses it once it has it all): refused at
    // the first refusal.
    let large = EchoRequest {
        payload: vec![1; 100 << 10],
        ..Default::default()
    };
    let status = client.unary(large).await.unwrap_err();
    assert_eq!(refused(), 4, "{status:?}");
}

fn failing(n: usize) -> Backend {
    let behaviour = Behaviour {
        fail_percent: 100,
        ..Behaviour::default()
    };
    Backend::new(format!("backend-{n}"), behaviour)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailers_only_unavailable_is_answered_by_another_endpoint() {
    let failing = failing(0);
    let stats = failing.stats();
    let failing = failing.spawn(SocketAddr::new(pod_ip(0), 0)).await.unwrap();
    let (_set, watch) = watch::channel(vec![failing, healthy(1).await]);
    let mut client = client(spike(watch)).await;
    // Fewer calls than the retry budget's reserve: each one the failing backend answers is
    // retried, however many it gets (the spike has no ejection yet to stop sending it calls).
    for call in 0..8 {
        let request = EchoRequest {
            payload: vec![3; 2000],
            ..Default::default()
        };
        match client.unary(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert_eq!(reply.backend, "backend-1");
                assert_eq!(reply.payload, vec![3; 2000]);
            }
            Err(status) => panic!("call {call} failed: {status:?}"),
        }
    }
    assert!(
        stats.calls.load(Ordering::SeqCst) > 0,
        "the failing backend got no call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_add_at_most_a_fifth_of_the_calls() {
    let (a, b) = (failing(0), failing(1));
    let (stats_a, stats_b) = (a.stats(), b.stats());
    let a = a.spawn(SocketAddr::new(pod_ip(0), 0)).await.unwrap();
    let b = b.spawn(SocketAddr::new(pod_ip(1), 0)).await.unwrap();
    let (_set, watch) = watch::channel(vec![a, b]);
    // Neither endpoint is ejected, so that every failed call has another endpoint to go to
    // and only the budget holds retries back.
    let settings = Settings {
        ejection: fanout_proxy_config::Ejection {
            consecutive_failures: u32::MAX,
            ..fanout_proxy_config::Ejection::default()
        },
        ..Settings::default()
    };
    let mut client = client(spike_with(watch, settings)).await;
    for _ in 0..200 {
        let status = client.unary(EchoRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let attempts = stats_a.calls.load(Ordering::SeqCst) + stats_b.calls.load(Ordering::SeqCst);
    // 200 calls, a fifth of them in retries, and the budget's reserve of 10.
    assert!(
        (211..=250).contains(&attempts),
        "{attempts} attempts for 200 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_endpoint_a_call_fails_at_once_with_unavailable() {
    let (_set, watch) = watch::channel(Vec::new());
    let mut client = client(spike(watch)).await;
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "fanout: no endpoint is ready");
}
