//! Bodies on the data path. Requests go upstream as received (boxed so one connection type also
//! carries the proxy's own requests). Responses come back through [`ResponseBody`], which ends
//! the stream's accounting when the stream ends however it ends, records its `grpc-status`, and
//! enforces the call's deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use prometheus_client::metrics::histogram::Histogram;

use crate::endpoint::Endpoint;
use crate::grpc;
use crate::metrics::Metrics;
use crate::upstream::{Activity, Upstream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// One stream's accounting: outstanding count, activity for drain, metrics on drop.
pub struct StreamGuard {
    pub endpoint: Arc<Endpoint>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub duration: Histogram,
    pub activity: Arc<Activity>,
    pub started: Instant,
    /// The call's grpc-status once known; `None` at drop means it ended without one.
    pub status: Option<u16>,
}

impl StreamGuard {
    pub fn new(
        endpoint: Arc<Endpoint>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        duration: Histogram,
        activity: Arc<Activity>,
    ) -> Self {
        endpoint.stream_started();
        activity.started();
        Self {
            endpoint,
            upstream,
            metrics,
            duration,
            activity,
            started: Instant::now(),
            status: None,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.endpoint.stream_ended();
        self.endpoint
            .count_request(self.status, &self.metrics, &self.upstream.name);
        self.duration.observe(self.started.elapsed().as_secs_f64());
        // A call the client cancelled says nothing about the endpoint.
        if self.status != Some(crate::grpc::CANCELLED) {
            self.upstream.record_outcome(&self.endpoint, self.status);
        }
        self.activity.ended();
    }
}

/// A response on its way to the client.
pub struct ResponseBody {
    inner: Option<Incoming>,
    guard: Option<StreamGuard>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Trailers to send in place of the rest of the stream (deadline passed).
    pending_trailers: Option<http::HeaderMap>,
}

impl Default for ResponseBody {
    /// An empty body: Trailers-Only answers made by the proxy.
    fn default() -> Self {
        Self {
            inner: None,
            guard: None,
            deadline: None,
            pending_trailers: None,
        }
    }
}

impl ResponseBody {
    pub fn proxied(inner: Incoming, guard: StreamGuard, deadline: Option<Instant>) -> Self {
        Self {
            inner: Some(inner),
            guard: Some(guard),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            pending_trailers: None,
        }
    }

    fn finish(&mut self, status: Option<u16>) {
        if let Some(mut guard) = self.guard.take() {
            guard.status = guard.status.or(status);
        }
        self.inner = None;
        self.deadline = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(trailers) = this.pending_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            // The client's deadline passed mid-stream: end the call as DEADLINE_EXCEEDED, which
            // also resets the upstream stream (CANCEL) as its body is dropped.
            this.finish(Some(grpc::DEADLINE_EXCEEDED));
            let trailers =
                grpc::status_headers(grpc::DEADLINE_EXCEEDED, "fanout: deadline exceeded");
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = grpc::status_of(trailers);
                    this.finish(status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.finish(None);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.finish(None);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending_trailers.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (RST_STREAM); the call was cancelled.
        if self.guard.is_some() {
            self.finish(Some(grpc::CANCELLED));
        }
    }
}
