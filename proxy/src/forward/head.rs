//! The request head of a call, kept to open the stream again on another endpoint, and the
//! URI and deadline it goes upstream with.

use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Request, Uri};
use tokio::time::Instant;

use crate::grpc;

/// Added to the deadline passed upstream; see [`Head::request`].
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// The request head, kept to open the stream again on another endpoint.
pub(super) struct Head {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub deadline: Option<Instant>,
}

impl Head {
    pub fn request(&self) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        if let Some(deadline) = self.deadline {
            // The proxy enforces the deadline itself (and cancels upstream when it passes); the
            // backend gets a little longer so that the client reliably sees DEADLINE_EXCEEDED
            // rather than whatever a backend answers when its own timer fires at the same time.
            let remaining = deadline.saturating_duration_since(Instant::now()) + DEADLINE_SLACK;
            request
                .headers_mut()
                .insert("grpc-timeout", grpc::format_timeout(remaining));
        }
        request
    }
}

/// An absolute URI for the upstream request: the path as sent, http, and the client's
/// authority (gRPC clients name the service they dial; backends may route on it).
pub(super) fn upstream_uri(uri: &Uri, host: Option<&http::HeaderValue>) -> Uri {
    if uri.scheme() == Some(&Scheme::HTTP) && uri.authority().is_some() {
        return uri.clone();
    }
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    if parts.authority.is_none() {
        parts.authority = host
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
            .or_else(|| Some(Authority::from_static("fanout")));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}
