//! A bare HTTP/2 endpoint that resets every request it takes: a backend failing at the
//! HTTP/2 layer (refusing streams, or resetting them with an error), for retry tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, BytesMut};
use fanout_wire::frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A bare HTTP/2 server on `addr` that answers SETTINGS and PINGs as any server must, takes
/// every request whole (it grants 1 MiB windows) and resets it with RST_STREAM(`code`);
/// counts the requests it reset.
pub async fn spawn_resetting(addr: SocketAddr, code: u32) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut io, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut out = BytesMut::new();
                frame::put_settings(&mut out, &[(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)]);
                frame::put_window_update(&mut out, 0, 1 << 20);
                if io.write_all(&out).await.is_err() {
                    return;
                }
                let mut buf = BytesMut::new();
                let mut preface = false;
                loop {
                    match io.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if !preface {
                        if buf.len() < frame::PREFACE.len() {
                            continue;
                        }
                        buf.advance(frame::PREFACE.len());
                        preface = true;
                    }
                    let mut out = BytesMut::new();
                    while let Some(head) = frame::Head::parse(&buf) {
                        if buf.len() < frame::HEADER_LEN + head.len {
                            break;
                        }
                        let payload = buf[frame::HEADER_LEN..frame::HEADER_LEN + head.len].to_vec();
                        buf.advance(frame::HEADER_LEN + head.len);
                        let ack = head.flags & frame::ACK != 0;
                        match head.kind {
                            frame::SETTINGS if !ack => {
                                frame::put_head(&mut out, 0, frame::SETTINGS, frame::ACK, 0)
                            }
                            frame::PING if !ack => {
                                frame::put_head(&mut out, 8, frame::PING, frame::ACK, 0);
                                out.extend_from_slice(&payload);
                            }
                            frame::HEADERS | frame::DATA if head.flags & frame::END_STREAM != 0 => {
                                count.fetch_add(1, Ordering::SeqCst);
                                frame::put_rst(&mut out, head.stream, code);
                            }
                            _ => {}
                        }
                    }
                    if io.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, refused)
}
