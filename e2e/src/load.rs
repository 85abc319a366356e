//! A gRPC load generator on bare HTTP/2: pre-encoded unary calls over a few connections, either
//! as fast as they are answered (saturation) or at a fixed rate, with latency measured from each
//! call's scheduled start (so a stall is not hidden by the calls it delays).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::backend::proto::EchoRequest;
use crate::raw::frame;

#[derive(Clone)]
pub struct Load {
    connections: Vec<SendRequest<Full<Bytes>>>,
    uri: http::Uri,
    body: Bytes,
    next: Arc<AtomicUsize>,
}

pub struct Outcome {
    pub calls: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Sorted.
    pub latencies: Vec<Duration>,
}

impl Load {
    /// One HTTP/2 connection to each address, `per_address` times over.
    pub async fn connect(addrs: &[SocketAddr], per_address: usize) -> anyhow::Result<Self> {
        let mut connections = Vec::new();
        for _ in 0..per_address {
            for addr in addrs {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                        .adaptive_window(true)
                        .handshake(TokioIo::new(stream))
                        .await?;
                tokio::spawn(connection);
                connections.push(sender);
            }
        }
        let uri: http::Uri = format!("http://{}/fanout.test.v1.Test/Unary", addrs[0]).parse()?;
        let body = frame(&EchoRequest {
            payload: vec![b'x'; 64],
            ..Default::default()
        });
        Ok(Self {
            connections,
            uri,
            body,
            next: Arc::default(),
        })
    }

    /// One call on the next connection; `true` if it ended with grpc-status 0.
    pub async fn call(&self) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let mut sender = self.connections[i].clone();
        let request = http::Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(self.body.clone()))
            .expect("static request parts");
        let Ok(response) = sender.send_request(request).await else {
            return false;
        };
        let (parts, mut body) = response.into_parts();
        let mut status = parts.headers.get("grpc-status").cloned();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(trailers) = frame.trailers_ref() {
                status = trailers.get("grpc-status").cloned();
            }
        }
        status.is_some_and(|s| s == "0")
    }

    /// `concurrency` calls in flight for `duration`.
    pub async fn saturate(&self, concurrency: usize, duration: Duration) -> Outcome {
        let started = Instant::now();
        let until = started + duration;
        let calls = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (load, calls, errors) = (self.clone(), calls.clone(), errors.clone());
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    if load.call().await {
                        calls.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    latencies.push(sent.elapsed());
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.unwrap_or_default());
        }
        latencies.sort();
        Outcome {
            calls: calls.load(Ordering::Relaxed),
            errors: errors.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            latencies,
        }
    }

    /// `rate` calls per second for `duration`, each started on schedule whatever the others do.
    pub async fn fixed_rate(&self, rate: u64, duration: Duration) -> Outcome {
        let started = Instant::now();
        let total = (rate as f64 * duration.as_secs_f64()) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        // The schedule is kept by a thread of its own: tokio's timer has a 1 ms grain, so a
        // call due mid-millisecond started up to 1 ms late, and how late depended on when the
        // runtime was last woken, by the answers of the very proxy being measured (the same
        // proxy measured 0.5 ms apart at p50 depending on when its answers came).
        let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
        let ticker = std::thread::spawn(move || {
            for n in 0..total {
                let scheduled = started + interval * n as u32;
                if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if due_tx.send(scheduled).is_err() {
                    break;
                }
            }
        });
        let mut calls = Vec::with_capacity(total as usize);
        while let Some(scheduled) = due_rx.recv().await {
            let load = self.clone();
            calls.push(tokio::spawn(async move {
                (load.call().await, scheduled.elapsed())
            }));
        }
        // It has sent its last call (the channel closed): joining does not block.
        let _ = ticker.join();
        let (mut ok, mut errors, mut latencies) = (0, 0, Vec::with_capacity(calls.len()));
        for call in calls {
            let (success, latency) = call.await.unwrap_or((false, Duration::ZERO));
            if success {
                ok += 1
            } else {
                errors += 1
            }
            latencies.push(latency);
        }
        latencies.sort();
        Outcome {
            calls: ok,
            errors,
            elapsed: started.elapsed(),
            latencies,
        }
    }
}
