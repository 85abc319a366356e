//! Moving one direction of a stream (DATA frames, then trailers or END_STREAM) from where it is
//! received to where it is sent, under HTTP/2 flow control on both sides, and keeping what was
//! read for a replay on another endpoint while it fits.
//!
//! Flow control: a chunk is read only once the sending side has capacity, and its window is
//! released on the receiving side as it is handed on; h2 buffers at most `max_send_buffer_size`
//! per stream beyond the peer's window. So a slow reader slows its writer down, end to end,
//! without the proxy holding more than a window per stream.

use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderMap;

#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The receiving side failed: reset by its peer, or its connection was lost.
    #[error("receiving: {0}")]
    Recv(#[source] h2::Error),
    /// The sending side failed, or its peer reset the stream.
    #[error("sending: {0}")]
    Send(#[source] h2::Error),
    /// The sending side's peer reset the stream with this reason.
    #[error("reset by the peer: {0}")]
    Reset(h2::Reason),
    /// The sending side was closed under us.
    #[error("the stream was closed")]
    Closed,
}

/// The receiving half of one direction, with what has been read so far kept (up to `limit`
/// bytes) so it can be sent again from the start.
pub struct Source {
    recv: RecvStream,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    limit: usize,
    /// More than `limit` was read: a replay is no longer possible.
    overflowed: bool,
    /// The receiving side has ended (END_STREAM seen).
    ended: bool,
    trailers: Option<HeaderMap>,
}

/// How far one sending side has got through a [`Source`].
#[derive(Debug, Default)]
pub struct Cursor {
    next: usize,
    pub done: bool,
    /// Frames sent so far (data and trailers): progress, for the idle timeout.
    pub sent: u64,
    /// A chunk has been sent: the next ones wait for send capacity.
    started: bool,
}

impl Cursor {
    /// For a stream whose HEADERS frame already ended it: nothing more to send.
    pub fn finished() -> Self {
        Self {
            next: 0,
            done: true,
            started: true,
            sent: 0,
        }
    }

    /// Waits until `send` may take another chunk, except for the first: that one is queued at
    /// once, so it leaves in the same write as the stream's HEADERS. (h2 assigns a new stream
    /// capacity only when its connection task runs, and that task would first flush the
    /// HEADERS alone: one more write, and one more wake-up of the peer, per call.) A chunk is
    /// at most one frame, so this holds at most a frame per stream beyond the window.
    fn poll_ready(
        &mut self,
        send: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        if !self.started {
            return Poll::Ready(Ok(()));
        }
        poll_send_capacity(send, cx)
    }
}

impl Source {
    pub fn new(recv: RecvStream, limit: usize) -> Self {
        let ended = recv.is_end_stream();
        Self {
            recv,
            kept: Vec::new(),
            kept_bytes: 0,
            limit,
            overflowed: false,
            ended,
            trailers: None,
        }
    }

    /// Everything read so far is kept: it can be sent again from the start.
    pub fn can_replay(&self) -> bool {
        !self.overflowed
    }

    /// The whole body has been read and is kept.
    pub fn is_complete(&self) -> bool {
        self.ended && !self.overflowed
    }

    /// Ended before any data: the HEADERS frame carries END_STREAM.
    pub fn is_empty_and_ended(&self) -> bool {
        self.ended && self.kept.is_empty() && self.trailers.is_none() && !self.overflowed
    }

    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// Forwards to `send` until everything is sent (`Ready(Ok)`) or nothing more can move now.
    pub fn poll_forward(
        &mut self,
        cursor: &mut Cursor,
        send: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PumpError>> {
        while !cursor.done {
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                return Poll::Ready(Err(reason.map_or_else(PumpError::Send, PumpError::Reset)));
            }
            if cursor.next < self.kept.len() {
                // Replaying what an earlier attempt sent.
                ready!(cursor.poll_ready(send, cx))?;
                let last = cursor.next + 1 == self.kept.len();
                let end = last && self.ended && self.trailers.is_none();
                let chunk = self.kept[cursor.next].clone();
                send.send_data(chunk, end).map_err(PumpError::Send)?;
                cursor.started = true;
                cursor.sent += 1;
                cursor.next += 1;
                cursor.done = end;
                continue;
            }
            if self.ended {
                match &self.trailers {
                    Some(trailers) => send
                        .send_trailers(trailers.clone())
                        .map_err(PumpError::Send)?,
                    None => send
                        .send_data(Bytes::new(), true)
                        .map_err(PumpError::Send)?,
                }
                cursor.sent += 1;
                cursor.done = true;
                continue;
            }
            ready!(cursor.poll_ready(send, cx))?;
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.ended = self.recv.is_end_stream();
                    self.keep(&chunk, cursor);
                    send.send_data(chunk, self.ended).map_err(PumpError::Send)?;
                    cursor.started = true;
                    cursor.sent += 1;
                    cursor.done = self.ended;
                }
                Some(Err(e)) => return Poll::Ready(Err(PumpError::Recv(e))),
                None => {
                    let trailers = ready!(self.recv.poll_trailers(cx)).map_err(PumpError::Recv)?;
                    self.trailers = trailers;
                    self.ended = true;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn keep(&mut self, chunk: &Bytes, cursor: &mut Cursor) {
        if self.overflowed {
            return;
        }
        if self.kept_bytes + chunk.len() > self.limit {
            self.overflowed = true;
            self.kept = Vec::new();
            cursor.next = 0;
            return;
        }
        self.kept_bytes += chunk.len();
        self.kept.push(chunk.clone());
        cursor.next = self.kept.len();
    }
}

/// Waits until `send` may take another chunk. Asking for one byte is enough: h2 takes the
/// whole chunk and sends it as the window allows, and stops granting capacity while a stream
/// has `max_send_buffer_size` queued.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), PumpError>> {
    if send.capacity() > 0 {
        return Poll::Ready(Ok(()));
    }
    send.reserve_capacity(1);
    loop {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(0)) => {}
            Some(Ok(_)) => return Poll::Ready(Ok(())),
            Some(Err(e)) => return Poll::Ready(Err(PumpError::Send(e))),
            None => return Poll::Ready(Err(PumpError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// A request stream as the proxy's server side receives it: a whole one-chunk body.
    async fn received_request(body: &'static [u8]) -> RecvStream {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (mut client, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((request, _respond))) = server.accept().await {
                let _ = requests_tx.send(request.into_body());
            }
        });
        let (_response, mut send) = client
            .send_request(http::Request::post("http://a/m").body(()).unwrap(), false)
            .unwrap();
        send.send_data(Bytes::from_static(body), true).unwrap();
        let mut recv = requests.recv().await.unwrap();
        // Until the whole body is buffered (the server task reads it).
        while recv.flow_control().used_capacity() < body.len() {
            tokio::task::yield_now().await;
        }
        std::mem::forget(client); // keeps the client connection's streams alive
        recv
    }

    /// The frames in `raw` after the client preface and SETTINGS: (type, flags, payload).
    async fn frames(raw: &mut DuplexStream, count: usize) -> Vec<(u8, u8, Vec<u8>)> {
        let mut preface = [0u8; 24];
        raw.read_exact(&mut preface).await.unwrap();
        let mut frames = Vec::new();
        while frames.len() < count {
            let mut head = [0u8; 9];
            raw.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            raw.read_exact(&mut payload).await.unwrap();
            // SETTINGS and WINDOW_UPDATE belong to the connection, not the stream.
            if head[3] != 0x4 && head[3] != 0x8 {
                frames.push((head[3], head[4], payload));
            }
        }
        frames
    }

    #[tokio::test]
    async fn a_stream_s_first_chunk_goes_out_with_its_headers_without_waiting_for_capacity() {
        let recv = received_request(b"hello").await;
        let (proxy_io, mut raw) = tokio::io::duplex(64 * 1024);
        let (mut upstream, connection) = h2::client::handshake(proxy_io).await.unwrap();
        let (_response, mut send) = upstream
            .send_request(http::Request::post("http://b/m").body(()).unwrap(), false)
            .unwrap();

        // The upstream connection has not run: the stream has no capacity assigned yet. The
        // whole body is queued behind the HEADERS all the same, in this one poll.
        let mut source = Source::new(recv, 0);
        let mut cursor = Cursor::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            source.poll_forward(&mut cursor, &mut send, &mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(cursor.done);

        tokio::spawn(connection);
        let frames = frames(&mut raw, 2).await;
        assert_eq!(frames[0].0, 0x1, "HEADERS first");
        let (kind, flags, payload) = &frames[1];
        assert_eq!(
            (*kind, *flags & 0x1),
            (0x0, 0x1),
            "then DATA with END_STREAM"
        );
        assert_eq!(payload, b"hello");
    }
}
