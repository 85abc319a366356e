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

/// A bare HTTP/2 server that ends every connection as a backend in a hurry to stop can: at the
/// first request's HEADERS it sends a PING and a GOAWAY whose last stream id is 0 (the request
/// was not processed, and may go elsewhere), then resets the connection at once, so the client
/// meets the reset while it still owes the PING's answer. Returns the address and a count of
/// the requests it turned away.
pub async fn spawn_goaway_and_reset(
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: usize = 24;
    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const PING: u8 = 6;
    const GOAWAY: u8 = 7;
    const ACK: u8 = 1;

    fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
        let len = len.to_be_bytes();
        let stream = stream.to_be_bytes();
        [
            len[1], len[2], len[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
        ]
    }

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let turned_away = std::sync::Arc::new(AtomicU64::new(0));
    let count = turned_away.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                if stream
                    .write_all(&frame_header(0, SETTINGS, 0, 0))
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = BytesMut::new();
                let mut at = PREFACE;
                loop {
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    while buf.len() >= at + 9 {
                        let head = &buf[at..at + 9];
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let (kind, flags) = (head[3], head[4]);
                        if buf.len() < at + 9 + len {
                            break;
                        }
                        at += 9 + len;
                        if kind == SETTINGS && flags & ACK == 0 {
                            let _ = stream.write_all(&frame_header(0, SETTINGS, ACK, 0)).await;
                        } else if kind == PING && flags & ACK == 0 && len == 8 {
                            // Answered as every HTTP/2 server must (the proxy PINGs a new
                            // connection before it sends calls on it).
                            let mut pong = BytesMut::new();
                            pong.put_slice(&frame_header(8, PING, ACK, 0));
                            pong.put_slice(&buf[at - 8..at]);
                            let _ = stream.write_all(&pong).await;
                        } else if kind == HEADERS {
                            count.fetch_add(1, Ordering::SeqCst);
                            let mut out = BytesMut::new();
                            out.put_slice(&frame_header(8, PING, 0, 0));
                            out.put_u64(0x66616e6f7574);
                            out.put_slice(&frame_header(8, GOAWAY, 0, 0));
                            out.put_u32(0); // last stream id: none processed
                            out.put_u32(0); // NO_ERROR
                            let _ = stream.write_all(&out).await;
                            // RST rather than FIN: the client's next write fails.
                            let _ = stream.set_zero_linger();
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok((addr, turned_away))
}

/// A `grpc.health.v1` server that answers every request with the status in `status` (1:
/// SERVING, 2: NOT_SERVING, ...) and counts the requests in `checks`.
pub struct HealthServer {
    pub addr: SocketAddr,
    pub status: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub checks: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

pub async fn spawn_health_server(addr: SocketAddr) -> std::io::Result<HealthServer> {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let server = HealthServer {
        addr: listener.local_addr()?,
        status: Arc::new(AtomicU64::new(1)),
        checks: Arc::new(AtomicU64::new(0)),
    };
    let (status, checks) = (server.status.clone(), server.checks.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (status, checks) = (status.clone(), checks.clone());
            let service = hyper::service::service_fn(move |_request| {
                checks.fetch_add(1, Ordering::SeqCst);
                let status = status.load(Ordering::SeqCst);
                let mut message = BytesMut::new();
                message.put_slice(&[0, 0, 0, 0, 2, 0x08]);
                message.put_u8(status as u8);
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(message.freeze())),
                    Ok(Frame::trailers(trailers)),
                ];
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(StreamBody::new(futures::stream::iter(frames)))
                    .expect("static response parts");
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(server)
}
