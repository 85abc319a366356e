//! A bare HTTP/2 gRPC client: sends exactly the headers it is given and reports exactly the
//! header blocks and messages that come back, so tests see the proxy's own protocol behaviour
//! (tonic's client, for one, enforces `grpc-timeout` itself and reports CANCELLED).

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What came back for one call.
#[derive(Debug)]
pub struct RawResponse {
    pub headers: HeaderMap,
    pub messages: Vec<Bytes>,
    pub trailers: Option<HeaderMap>,
}

impl RawResponse {
    /// grpc-status from the trailers, or from the headers of a Trailers-Only answer.
    pub fn grpc_status(&self) -> Option<u16> {
        let block = self.trailers.as_ref().unwrap_or(&self.headers);
        block.get("grpc-status")?.to_str().ok()?.parse().ok()
    }

    pub fn grpc_message(&self) -> String {
        let block = self.trailers.as_ref().unwrap_or(&self.headers);
        block
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// Length-prefixed gRPC framing of one message.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

/// One unary call on a fresh HTTP/2 connection with `extra` headers.
pub async fn unary(
    addr: SocketAddr,
    path: &str,
    message: &impl prost::Message,
    extra: &[(&str, &str)],
) -> anyhow::Result<RawResponse> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(frame(message)))?)
        .await?;
    let (parts, mut body) = response.into_parts();
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let mut data = data.freeze();
    let mut messages = Vec::new();
    while data.remaining() >= 5 {
        data.advance(1);
        let len = data.get_u32() as usize;
        messages.push(data.split_to(len.min(data.len())));
    }
    Ok(RawResponse {
        headers: parts.headers,
        messages,
        trailers,
    })
}
