//! `GET /grpc-health`: the pod's own gRPC server's `grpc.health.v1` for HTTP health checkers.
//! Cloud L7 load balancers (GKE Ingress, AWS ALB) health-check pods over HTTP; a gRPC server
//! answers only `grpc.health.v1.Health/Check`. The proxy asks the app on loopback and answers
//! 200 for SERVING and 503 with the reason otherwise.
//!
//! A check is bounded by a timeout, and its answer is reused for a short while: however many
//! checkers probe however often, the app sees at most one check per `cache` period (concurrent
//! probes wait for the one check in progress). The HTTP/2 connection to the app is kept and
//! made again when it fails.

use std::time::Duration;

use bytes::Bytes;
use fanout_proxy_config::GrpcHealth;
use h2::client::SendRequest;
use http::{StatusCode, Uri};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::health::{self, CheckError};

/// One answer to a health checker.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("cannot connect to 127.0.0.1:{port}: {source}")]
    Connect {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with 127.0.0.1:{port}: {source}")]
    Handshake {
        port: u16,
        #[source]
        source: h2::Error,
    },
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Check(#[from] CheckError),
}

struct State {
    sender: Option<SendRequest<Bytes>>,
    last: Option<(Instant, Answer)>,
}

pub struct AppHealth {
    config: GrpcHealth,
    uri: Uri,
    request: Bytes,
    /// Held across a check: probes that arrive meanwhile wait and take its answer.
    state: Mutex<State>,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus` names.
fn status_name(status: u64) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown status",
    }
}

impl AppHealth {
    pub fn new(config: GrpcHealth) -> Self {
        let uri = format!(
            "http://127.0.0.1:{}/grpc.health.v1.Health/Check",
            config.port
        )
        .parse()
        .expect("a port and a path make a URI");
        let request = health::encode_request(&config.service);
        Self {
            config,
            uri,
            request,
            state: Mutex::new(State {
                sender: None,
                last: None,
            }),
        }
    }

    /// The app's health, from the cache when fresh enough.
    pub async fn answer(&self) -> Answer {
        let mut state = self.state.lock().await;
        if let Some((at, answer)) = &state.last
            && at.elapsed() < self.config.cache
        {
            return answer.clone();
        }
        let result = self.ask(&mut state).await;
        let service = &self.config.service;
        let answer = match result {
            Ok(health::SERVING) => Answer {
                status: StatusCode::OK,
                body: json!({"status": "SERVING", "service": service}),
            },
            Ok(status) => Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: json!({"status": status_name(status), "service": service,
                    "reason": format!("grpc.health.v1 on 127.0.0.1:{} reports {}",
                        self.config.port, status_name(status))}),
            },
            Err(e) => {
                // The connection may be what failed: make a new one next time.
                state.sender = None;
                Answer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: json!({"status": "UNREACHABLE", "service": service,
                        "reason": format!("grpc.health.v1 on 127.0.0.1:{}: {e}",
                            self.config.port)}),
                }
            }
        };
        if answer.status != StatusCode::OK {
            tracing::debug!(answer = %answer.body, "grpc-health: not serving");
        }
        state.last = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn ask(&self, state: &mut State) -> Result<u64, AskError> {
        let started = Instant::now();
        // A connection the app closed (a restart) is made again rather than failing a probe.
        if let Some(sender) = state.sender.as_mut()
            && !crate::endpoint::usable(sender)
        {
            state.sender = None;
        }
        let sender = match state.sender.clone() {
            Some(sender) => sender,
            None => {
                let sender = tokio::time::timeout(self.config.timeout, self.connect())
                    .await
                    .map_err(|_| AskError::Timeout(self.config.timeout))??;
                state.sender = Some(sender.clone());
                sender
            }
        };
        let left = self.config.timeout.saturating_sub(started.elapsed());
        Ok(health::check(sender, self.uri.clone(), self.request.clone(), left).await?)
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, AskError> {
        let port = self.config.port;
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|source| AskError::Connect { port, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = h2::client::handshake(stream)
            .await
            .map_err(|source| AskError::Handshake { port, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "grpc-health connection ended");
            }
        });
        Ok(sender)
    }
}
