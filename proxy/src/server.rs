//! The listener of an upstream: h2c (prior knowledge, as gRPC clients speak it) on loopback;
//! every stream accepted is forwarded by its own task.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::net::{TcpListener, TcpStream};

use crate::endpoint::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::forward::Forwarder;

/// Streams one client connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// Serves h2c on `listener` until the task is aborted; connections already accepted go on.
pub async fn serve(listener: TcpListener, forwarder: Arc<Forwarder>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors, typically: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let forwarder = forwarder.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, forwarder).await {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
}

async fn serve_connection(stream: TcpStream, forwarder: Arc<Forwarder>) -> Result<(), h2::Error> {
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake(stream)
        .await?;
    // The connection's streams run inside this task rather than a task each: no spawn per
    // call, and a stream woken by its upstream is polled without a trip through the scheduler.
    // Accepting also drives the connection: its frames are read and written in here.
    let mut calls = FuturesUnordered::new();
    let result = loop {
        tokio::select! {
            biased;
            Some(()) = calls.next(), if !calls.is_empty() => {}
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => calls.push(forwarder.forward(request, respond)),
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            },
        }
    };
    // The client stopped opening streams (GOAWAY) or the connection failed: the calls under
    // way still end, and are counted, as their streams do.
    while calls.next().await.is_some() {}
    result
}
