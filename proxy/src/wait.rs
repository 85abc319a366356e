//! `fanout-proxy wait`: returns once the proxy answers `/live`, so a postStart hook holds the
//! app container back until the proxy is up.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
#[error("the proxy at {admin} was not live within {timeout:?}")]
pub struct NotLive {
    admin: SocketAddr,
    timeout: Duration,
}

async fn live(admin: SocketAddr) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = http::Request::get("/live")
            .header("host", admin.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().is_success())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

pub async fn until_live(admin: SocketAddr, timeout: Duration) -> Result<(), NotLive> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if live(admin).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(NotLive { admin, timeout })
}
