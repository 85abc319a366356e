//! The bytes of an endpoint connection, read to the end even after a write has failed.
//!
//! An endpoint that closes a connection sends GOAWAY with the last stream it processed, and the
//! streams above it are safe to retry elsewhere. But if the proxy writes (a PING answer, a window
//! update, a request's data) after the endpoint closed and before it has read that GOAWAY, the
//! write fails with EPIPE or ECONNRESET, h2 ends the connection on that error, and every open
//! stream fails with "broken pipe", the refused ones included. A slow or busy proxy loses that
//! race often: a rolling restart then fails calls that never reached a backend. (grpc-go reads
//! on a goroutine of its own and does not lose the frame.)
//!
//! So a write that fails because the peer is gone is reported as done, later ones too (nothing
//! written now could arrive anyway), and the read side goes on: h2 sees the GOAWAY and the
//! connection's end, in the order the endpoint sent them. A write fails this way only on a
//! connection the peer has reset, and a reset connection always reads to its end, so the read
//! side ends it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug)]
pub struct ReadPastWriteErrors<T> {
    inner: T,
    write_failed: Option<io::ErrorKind>,
}

impl<T> ReadPastWriteErrors<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            write_failed: None,
        }
    }

    /// A write error that is the peer's end, not ours, is held back (the write reported `done`)
    /// until everything the peer sent has been read.
    fn absorb<R>(&mut self, result: io::Result<R>, done: R) -> io::Result<R> {
        match result {
            Err(e) if is_peer_gone(e.kind()) => {
                self.write_failed = Some(e.kind());
                Ok(done)
            }
            other => other,
        }
    }
}

fn is_peer_gone(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadPastWriteErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Pending here does not mean nothing is left: the runtime may not have seen the reset
        // make the socket readable yet. It will (a reset socket always reads, to its end).
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadPastWriteErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf));
        Poll::Ready(this.absorb(result, buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(len));
        }
        let result = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs));
        Poll::Ready(this.absorb(result, len))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        let result = std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx));
        Poll::Ready(this.absorb(result, ()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_the_peer_sent_before_it_reset_is_read_after_a_failed_write() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut peer, _) = accepted.unwrap();
        let mut stream = ReadPastWriteErrors::new(client.unwrap());
        // The peer's last words, then a reset (unread data makes close send RST).
        stream.write_all(b"unread").await.unwrap();
        peer.write_all(b"GOAWAY").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        peer.set_zero_linger().unwrap();
        drop(peer);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;

        // Writes to the reset connection fail underneath, and are reported done.
        for _ in 0..3 {
            stream.write_all(b"PING ack").await.unwrap();
        }
        assert_eq!(stream.write_failed, Some(io::ErrorKind::ConnectionReset));
        // What the peer sent is still read; then the connection's end.
        let mut read = [0u8; 6];
        stream.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"GOAWAY");
        let end = stream.read(&mut read).await;
        assert!(end.is_err() || end.unwrap() == 0);
    }

    #[tokio::test]
    async fn other_write_errors_are_not_held_back() {
        let mut stream = ReadPastWriteErrors::new(denied_writer());
        let error = stream.write_all(b"x").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(stream.write_failed, None);
    }

    /// A writer whose every write fails with an error that is not the peer's end.
    fn denied_writer() -> impl AsyncRead + AsyncWrite + Unpin {
        struct Denied;
        impl AsyncRead for Denied {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        impl AsyncWrite for Denied {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &[u8],
            ) -> Poll<io::Result<usize>> {
                Poll::Ready(Err(io::ErrorKind::PermissionDenied.into()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        Denied
    }
}
