//! Open-loop load for failure tests: calls started on a clock at a fixed rate, whatever the
//! machine's speed (a slow machine holds more calls in flight, it does not offer fewer), and
//! every call's outcome.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::proto::{EchoRequest, StreamRequest};
use crate::fleet::client;

/// A failed call: when it started and ended, and the status the client got.
#[derive(Debug)]
pub struct Failure {
    pub started: Instant,
    #[allow(dead_code, reason = "shown through Debug when a test fails")]
    pub status: tonic::Status,
}

/// Continuous open-loop load on the proxy: `rate` calls a second, started on a clock whatever
/// the machine's speed (a slow machine holds more calls in flight, it does not offer fewer);
/// every `stream_every`-th call (none if 0) a server stream (5 messages, 10 ms apart), the
/// others unary, spread over `connections` HTTP/2 connections.
pub struct Load {
    running: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<Failure>>>,
    driver: tokio::task::JoinHandle<(u64, Duration)>,
}

/// What a load run did: calls offered and succeeded, the failures, calls offered per second.
pub struct LoadResult {
    pub offered: u64,
    pub ok: u64,
    pub failures: Vec<Failure>,
    pub rate: f64,
}

impl Load {
    pub async fn start(
        local: SocketAddr,
        connections: usize,
        rate: u32,
        stream_every: u64,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let clients = futures::future::join_all((0..connections).map(|_| client(local))).await;
        let driver = {
            let (running, ok, failures) = (running.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut calls = tokio::task::JoinSet::new();
                // A missed tick is made up at once (the default burst behaviour), so the
                // calls offered keep to the rate even when this task is scheduled late.
                let mut clock = tokio::time::interval(Duration::from_secs(1) / rate);
                let mut offered = 0u64;
                while running.load(Ordering::Relaxed) {
                    clock.tick().await;
                    let mut client = clients[offered as usize % connections].clone();
                    let streaming = stream_every != 0 && offered % stream_every == stream_every - 1;
                    let (ok, failures) = (ok.clone(), failures.clone());
                    calls.spawn(async move {
                        let started = Instant::now();
                        let result = if streaming {
                            server_stream(&mut client).await
                        } else {
                            client
                                .unary(EchoRequest {
                                    delay_ms: 2,
                                    ..Default::default()
                                })
                                .await
                                .map(|_| ())
                        };
                        match result {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(status) => {
                                failures.lock().unwrap().push(Failure { started, status })
                            }
                        }
                    });
                    offered += 1;
                    while let Some(done) = calls.try_join_next() {
                        done.unwrap();
                    }
                }
                let offering = started.elapsed();
                while let Some(done) = calls.join_next().await {
                    done.unwrap();
                }
                (offered, offering)
            })
        };
        Self {
            running,
            ok,
            failures,
            driver,
        }
    }

    /// Stops offering calls, waits for those in flight, and tells what happened.
    pub async fn stop(self) -> LoadResult {
        self.running.store(false, Ordering::Relaxed);
        let (offered, offering) = self.driver.await.unwrap();
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        let ok = self.ok.load(Ordering::Relaxed);
        assert_eq!(
            ok + failures.len() as u64,
            offered,
            "every call offered ends, in success or failure"
        );
        LoadResult {
            offered,
            ok,
            failures,
            rate: offered as f64 / offering.as_secs_f64(),
        }
    }
}

async fn server_stream(
    client: &mut crate::backend::proto::test_client::TestClient<tonic::transport::Channel>,
) -> Result<(), tonic::Status> {
    let mut stream = client
        .server_stream(StreamRequest {
            count: 5,
            interval_ms: 10,
            reply_bytes: 16,
        })
        .await?
        .into_inner();
    let mut messages = 0;
    while let Some(message) = stream.message().await? {
        let _ = message;
        messages += 1;
    }
    if messages == 5 {
        Ok(())
    } else {
        Err(tonic::Status::data_loss(format!(
            "{messages} of 5 messages"
        )))
    }
}
