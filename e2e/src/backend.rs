//! The test gRPC backend (tonic): every kind of call, its id in every reply, delays and errors on
//! request, `grpc.health.v1`, and counts of what it saw (calls, cancellations).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub mod proto {
    tonic::include_proto!("fanout.test.v1");
}

use proto::test_server::{Test, TestServer};
use proto::{EchoReply, EchoRequest, StatsReply, StatsRequest, StreamRequest};

/// How a backend behaves, beyond what each request asks.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Added to every call.
    pub delay: Duration,
    /// Share of unary calls (0–100) answered UNAVAILABLE, in trailers.
    pub fail_percent: u32,
    /// The first this many calls (of the backend's life) wait `slow_first_delay` more: a cold
    /// pod warming up.
    pub slow_first_calls: u64,
    pub slow_first_delay: Duration,
    /// Sent with every failure as `grpc-retry-pushback-ms`: when (or whether) to retry.
    pub pushback: Option<&'static str>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub cancelled: AtomicU64,
    pub deadline_exceeded: AtomicU64,
}

impl Stats {
    /// Until `count` calls of this backend were cancelled (the client or the proxy reset
    /// them); panics after 5 s.
    pub async fn wait_for_cancellations(&self, count: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.cancelled.load(Ordering::SeqCst) < count {
            assert!(
                std::time::Instant::now() < deadline,
                "the backend's call was not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Clone)]
pub struct Backend {
    id: String,
    behaviour: Behaviour,
    stats: Arc<Stats>,
    seq: Arc<AtomicU64>,
    /// Calls answered so far, for `slow_first_calls`.
    answered: Arc<AtomicU64>,
    serving: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Turns what a backend's `grpc.health.v1` service reports (for the server and for the test
/// service) between SERVING and NOT_SERVING while it runs.
#[derive(Clone)]
pub struct HealthSwitch(Arc<tokio::sync::watch::Sender<bool>>);

impl HealthSwitch {
    pub fn set_serving(&self, serving: bool) {
        self.0.send_replace(serving);
    }
}

/// Counts a call as cancelled if it is dropped before it finished (the client reset it).
struct CallGuard {
    stats: Arc<Stats>,
    finished: bool,
}

impl CallGuard {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.calls.fetch_add(1, Ordering::SeqCst);
        Self {
            stats: stats.clone(),
            finished: false,
        }
    }

    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Metadata keys starting with `x-echo-` come back: in the response headers of a unary call
/// that succeeds, in the trailers of one that fails.
fn echo_metadata<T>(request: &Request<T>, response: &mut tonic::metadata::MetadataMap) {
    for key_value in request.metadata().iter() {
        if let tonic::metadata::KeyAndValueRef::Ascii(key, value) = key_value
            && key.as_str().starts_with("x-echo-")
        {
            response.insert(key.clone(), value.clone());
        }
    }
}

impl Backend {
    pub fn new(id: impl Into<String>, behaviour: Behaviour) -> Self {
        Self {
            id: id.into(),
            behaviour,
            stats: Arc::default(),
            seq: Arc::default(),
            answered: Arc::default(),
            serving: Arc::new(tokio::sync::watch::channel(true).0),
        }
    }

    pub fn health(&self) -> HealthSwitch {
        HealthSwitch(self.serving.clone())
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn reply(&self, payload: Vec<u8>) -> EchoReply {
        EchoReply {
            backend: self.id.clone(),
            payload,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            count: 0,
            bytes: 0,
        }
    }

    async fn answer(&self, message: EchoRequest) -> Result<EchoReply, Status> {
        let mut delay = self.behaviour.delay + Duration::from_millis(message.delay_ms.into());
        if self.behaviour.slow_first_calls > 0
            && self.answered.fetch_add(1, Ordering::Relaxed) < self.behaviour.slow_first_calls
        {
            delay += self.behaviour.slow_first_delay;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if message.fail_code != 0 {
            return Err(Status::new(message.fail_code.into(), message.fail_message));
        }
        if self.behaviour.fail_percent > 0 && fastrand::u32(0..100) < self.behaviour.fail_percent {
            let mut status = Status::unavailable(format!("{} fails on purpose", self.id));
            if let Some(pushback) = self.behaviour.pushback {
                status.metadata_mut().insert(
                    "grpc-retry-pushback-ms",
                    tonic::metadata::MetadataValue::from_static(pushback),
                );
            }
            return Err(status);
        }
        let payload = if message.reply_bytes > 0 {
            vec![b'r'; message.reply_bytes as usize]
        } else {
            message.payload
        };
        Ok(self.reply(payload))
    }

    /// A tonic server for this backend (with `grpc.health.v1`) until `shutdown` resolves; a
    /// graceful stop sends GOAWAY and lets calls in flight finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_all(vec![listener], shutdown).await
    }

    /// [`Backend::serve`] on several listeners at once: one backend behind many endpoints (the
    /// benchmark's 1,000 endpoints are 10 processes on 100 ports each).
    pub async fn serve_all(
        self,
        listeners: Vec<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut serving = self.serving.subscribe();
        tokio::spawn(async move {
            loop {
                let status = if *serving.borrow_and_update() {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health.set_service_status("", status).await;
                health
                    .set_service_status(
                        <TestServer<Backend> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                if serving.changed().await.is_err() {
                    return;
                }
            }
        });
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(
                TestServer::new(self)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(
                // TCP_NODELAY, as gRPC servers set it (grpc-go, grpc-java): without it a
                // reply's HEADERS, DATA and trailers, written apart, wait on delayed ACKs.
                futures::stream::select_all(
                    listeners
                        .into_iter()
                        .map(tokio_stream::wrappers::TcpListenerStream::new),
                )
                .map(|stream| {
                    if let Ok(stream) = &stream {
                        let _ = stream.set_nodelay(true);
                    }
                    stream
                }),
                shutdown,
            )
            .await
    }

    /// Starts serving on `addr` in this runtime; returns the bound address.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(self.serve(listener, std::future::pending()));
        Ok(addr)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Test for Backend {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let mut headers = tonic::metadata::MetadataMap::new();
        echo_metadata(&request, &mut headers);
        let result = self.answer(request.into_inner()).await;
        guard.finish();
        match result {
            Ok(reply) => {
                let mut response = Response::new(reply);
                *response.metadata_mut() = headers;
                Ok(response)
            }
            // A failed call echoes the metadata in its trailers, beside grpc-status (and its
            // pushback, if it has one).
            Err(status) => {
                let mut metadata = headers;
                if let Some(pushback) = status.metadata().get("grpc-retry-pushback-ms") {
                    metadata.insert("grpc-retry-pushback-ms", pushback.clone());
                }
                Err(Status::with_metadata(
                    status.code(),
                    status.message(),
                    metadata,
                ))
            }
        }
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let message = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let backend = self.clone();
        tokio::spawn(async move {
            for _ in 0..message.count {
                if message.interval_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(message.interval_ms.into())).await;
                }
                let reply = backend.reply(vec![b's'; message.reply_bytes as usize]);
                if tx.send(Ok(reply)).await.is_err() {
                    return; // the client went away: the guard counts a cancellation
                }
            }
            guard.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let mut stream = request.into_inner();
        let (mut count, mut bytes) = (0u64, 0u64);
        while let Some(message) = stream.next().await {
            let message = message?;
            count += 1;
            bytes += message.payload.len() as u64;
        }
        guard.finish();
        let mut reply = self.reply(Vec::new());
        reply.count = count;
        reply.bytes = bytes;
        Ok(Response::new(reply))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let mut stream = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let backend = self.clone();
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let reply = match message {
                    Ok(message) => backend.answer(message).await,
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
            guard.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        Ok(Response::new(StatsReply {
            backend: self.id.clone(),
            calls: self.stats.calls.load(Ordering::SeqCst),
            cancelled: self.stats.cancelled.load(Ordering::SeqCst),
            deadline_exceeded: self.stats.deadline_exceeded.load(Ordering::SeqCst),
        }))
    }
}
