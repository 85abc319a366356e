//! Both directions of one attempt at once: the rest of the request goes upstream while the
//! proxy waits for the answer's headers, and then while the answer streams to the client; the
//! client's reset, the deadline, the per-attempt timeout and the idle timeout end either wait.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::Response;
use tokio::time::{Instant, Sleep};

use super::Call;
use crate::pump::{Cursor, PumpError, Source};

/// What ended the wait for an upstream's response headers.
pub(super) enum Waited {
    Response(Result<Response<RecvStream>, h2::Error>),
    ClientGone,
    Expired(Expiry),
    /// The retry policy's per-attempt timeout passed before the endpoint answered.
    AttemptTimeout,
}

/// What ended a response on its way to the client.
pub(super) enum Streamed {
    Finished,
    ClientGone,
    Expired(Expiry),
    UpstreamFailed(h2::Error),
}

/// Which of the call's timers ended it: either way the client gets DEADLINE_EXCEEDED.
#[derive(Clone, Copy)]
pub(super) enum Expiry {
    Deadline,
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// A call's idle timeout: a timer pushed back whenever a frame moves either way.
pub(super) struct Idle {
    pub after: Duration,
    timer: Pin<Box<Sleep>>,
    /// Frames moved when last looked at.
    seen: u64,
}

impl Idle {
    pub fn new(after: Duration) -> Self {
        Self {
            after,
            timer: Box::pin(tokio::time::sleep(after)),
            seen: 0,
        }
    }

    /// Something moved that no count shows (the answer's headers).
    pub fn touch(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.after);
    }

    /// `moved`: frames sent either way so far in this attempt. `true` once nothing has moved
    /// for `after`.
    fn poll(&mut self, moved: u64, cx: &mut std::task::Context<'_>) -> bool {
        if moved != self.seen {
            self.seen = moved;
            self.timer.as_mut().reset(Instant::now() + self.after);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

pub(super) fn poll_deadline(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut std::task::Context<'_>,
) -> bool {
    deadline
        .as_mut()
        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
}

impl Call<'_> {
    /// Sends the request body while waiting for the response headers; stops at a client
    /// reset or the deadline.
    pub(super) async fn wait_response(
        &mut self,
        mut response: h2::client::ResponseFuture,
        cursor: &mut Cursor,
        upstream_send: &mut SendStream<Bytes>,
        attempt_timer: &mut Option<Pin<Box<Sleep>>>,
    ) -> Waited {
        poll_fn(|cx| {
            if self.respond.poll_reset(cx).is_ready() {
                return Poll::Ready(Waited::ClientGone);
            }
            if poll_deadline(&mut self.deadline, cx) {
                return Poll::Ready(Waited::Expired(Expiry::Deadline));
            }
            if poll_deadline(attempt_timer, cx) {
                return Poll::Ready(Waited::AttemptTimeout);
            }
            if let Poll::Ready(result) = Pin::new(&mut response).poll(cx) {
                return Poll::Ready(Waited::Response(result));
            }
            if !cursor.done {
                match self.source.poll_forward(cursor, upstream_send, cx) {
                    Poll::Ready(Err(PumpError::Recv(_))) => return Poll::Ready(Waited::ClientGone),
                    // The endpoint takes no more of the body; its answer will say why.
                    Poll::Ready(Err(_)) => cursor.done = true,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            if let Some(idle) = &mut self.idle
                && idle.poll(cursor.sent, cx)
            {
                return Poll::Ready(Waited::Expired(Expiry::Idle));
            }
            Poll::Pending
        })
        .await
    }

    /// Moves the response to the client while the rest of the request (client and bidi
    /// streaming) still goes upstream.
    pub(super) async fn stream_response(
        &mut self,
        answer: &mut Source,
        client_send: &mut SendStream<Bytes>,
        cursor: &mut Cursor,
        upstream_send: &mut SendStream<Bytes>,
    ) -> Streamed {
        let mut answer_cursor = Cursor::default();
        poll_fn(|cx| {
            if poll_deadline(&mut self.deadline, cx) {
                return Poll::Ready(Streamed::Expired(Expiry::Deadline));
            }
            match answer.poll_forward(&mut answer_cursor, client_send, cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Streamed::Finished),
                Poll::Ready(Err(PumpError::Recv(e))) => {
                    return Poll::Ready(Streamed::UpstreamFailed(e));
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Streamed::ClientGone),
                Poll::Pending => {}
            }
            if !cursor.done {
                match self.source.poll_forward(cursor, upstream_send, cx) {
                    Poll::Ready(Err(PumpError::Recv(_))) => {
                        return Poll::Ready(Streamed::ClientGone);
                    }
                    Poll::Ready(Err(_)) => cursor.done = true,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            if let Some(idle) = &mut self.idle
                && idle.poll(cursor.sent + answer_cursor.sent, cx)
            {
                return Poll::Ready(Streamed::Expired(Expiry::Idle));
            }
            Poll::Pending
        })
        .await
    }
}
