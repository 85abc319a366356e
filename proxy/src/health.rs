//! Active health checks: `grpc.health.v1.Health/Check` on each endpoint's own connection, every
//! `interval`, each within `timeout`. Only when the upstream's config asks for them.
//!
//! An endpoint starts unchecked and takes no calls until a first check passes (a pod that
//! reports NOT_SERVING while it warms up is never sent work); after that it needs
//! `unhealthy_threshold` failed checks in a row to leave and `healthy_threshold` passed checks in
//! a row to come back. A check passes only on SERVING: NOT_SERVING, SERVICE_UNKNOWN, an error
//! status (UNIMPLEMENTED: no health service), a reset or a timeout all fail it.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fanout_proxy_config::HealthCheck;
use h2::client::SendRequest;
use http::{Request, Uri};

use crate::endpoint::{Endpoint, Events};
use crate::grpc;

const PATH: &str = "/grpc.health.v1.Health/Check";
/// How often an endpoint without a connection is looked at again.
const WAIT_FOR_CONNECTION: Duration = Duration::from_millis(100);
/// A health answer is a few bytes; more than this is not one.
const MAX_ANSWER: usize = 4096;

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
pub const SERVING: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never checked yet.
    Unchecked,
    Healthy,
    Unhealthy,
}

/// The health of one endpoint as checks come in.
#[derive(Debug)]
pub struct Health {
    pub verdict: Verdict,
    passes: u32,
    failures: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            verdict: Verdict::Unchecked,
            passes: 0,
            failures: 0,
        }
    }
}

impl Health {
    /// Records a check; `true` when the verdict changed.
    pub fn record(&mut self, passed: bool, config: &HealthCheck) -> bool {
        if passed {
            self.passes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.passes = 0;
        }
        let next = match self.verdict {
            Verdict::Unchecked if passed => Verdict::Healthy,
            Verdict::Unchecked => Verdict::Unhealthy,
            Verdict::Healthy if self.failures >= config.unhealthy_threshold.max(1) => {
                Verdict::Unhealthy
            }
            Verdict::Unhealthy if self.passes >= config.healthy_threshold.max(1) => {
                Verdict::Healthy
            }
            same => same,
        };
        let changed = next != self.verdict;
        self.verdict = next;
        changed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/2: {0}")]
    Http2(#[source] h2::Error),
    #[error("answered grpc-status {0}")]
    Status(u16),
    #[error("answered without a grpc-status")]
    NoStatus,
    #[error("the answer is not a HealthCheckResponse")]
    Malformed,
}

/// Checks `endpoint` every `config.interval` until it is removed.
pub async fn run(endpoint: Arc<Endpoint>, config: HealthCheck, events: Arc<dyn Events>) {
    let uri: Uri = format!("http://{}{PATH}", endpoint.addr)
        .parse()
        .expect("an address and a path make a URI");
    let request = encode_request(&config.service);
    while !endpoint.is_removed() {
        let Some(sender) = endpoint.sender() else {
            tokio::time::sleep(WAIT_FOR_CONNECTION).await;
            continue;
        };
        let result = check(sender, uri.clone(), request.clone(), config.timeout).await;
        let passed = matches!(result, Ok(SERVING));
        if endpoint.record_health(passed, &config) {
            match &result {
                Ok(SERVING) => {
                    tracing::info!(endpoint = %endpoint.addr, "health check passes: serving")
                }
                Ok(status) => {
                    tracing::warn!(endpoint = %endpoint.addr, status, "health check fails: not serving")
                }
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.addr, error = %e, "health check fails")
                }
            }
            events.changed();
        }
        // Jitter, so the checks of many proxies do not arrive in step.
        let jitter = config.interval.mul_f64(fastrand::f64() * 0.1);
        tokio::time::sleep(config.interval + jitter).await;
    }
}

/// One check: the serving status the endpoint reports.
pub async fn check(
    mut sender: SendRequest<Bytes>,
    uri: Uri,
    body: Bytes,
    timeout: Duration,
) -> Result<u64, CheckError> {
    let attempt = async {
        let request = Request::post(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", grpc::format_timeout(timeout))
            .body(())
            .expect("static request parts");
        let (response, mut send) = sender
            .send_request(request, false)
            .map_err(CheckError::Http2)?;
        send.send_data(body, true).map_err(CheckError::Http2)?;
        let response = response.await.map_err(CheckError::Http2)?;
        let (parts, mut recv) = response.into_parts();
        if let Some(status) = grpc::status_of(&parts.headers) {
            // Trailers-Only: an error (UNIMPLEMENTED when there is no health service).
            return Err(if status == grpc::OK {
                CheckError::Malformed
            } else {
                CheckError::Status(status)
            });
        }
        let mut answer = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(CheckError::Http2)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if answer.len() + chunk.len() > MAX_ANSWER {
                return Err(CheckError::Malformed);
            }
            answer.extend_from_slice(&chunk);
        }
        let trailers = recv.trailers().await.map_err(CheckError::Http2)?;
        match trailers.as_ref().and_then(grpc::status_of) {
            Some(grpc::OK) => decode_status(answer.freeze()).ok_or(CheckError::Malformed),
            Some(status) => Err(CheckError::Status(status)),
            None => Err(CheckError::NoStatus),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
}

/// A gRPC-framed `HealthCheckRequest { service }`.
pub fn encode_request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0); // not compressed
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    framed.freeze()
}

/// The `status` of a gRPC-framed `HealthCheckResponse` (0, UNKNOWN, when absent).
pub fn decode_status(mut framed: Bytes) -> Option<u64> {
    if framed.remaining() < 5 || framed.get_u8() != 0 {
        return None;
    }
    let length = framed.get_u32() as usize;
    if framed.remaining() != length {
        return None;
    }
    let mut status = 0;
    while framed.has_remaining() {
        let key = get_varint(&mut framed)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut framed)?,
            // Unknown fields are skipped, as protobuf asks.
            (_, 0) => {
                get_varint(&mut framed)?;
            }
            (_, 1) if framed.remaining() >= 8 => framed.advance(8),
            (_, 2) => {
                let length = usize::try_from(get_varint(&mut framed)?).ok()?;
                if framed.remaining() < length {
                    return None;
                }
                framed.advance(length);
            }
            (_, 5) if framed.remaining() >= 4 => framed.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthCheck {
        HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthCheck::default()
        }
    }

    #[test]
    fn an_unchecked_endpoint_needs_one_pass() {
        let mut health = Health::default();
        assert!(health.record(true, &config()));
        assert_eq!(health.verdict, Verdict::Healthy);
        let mut health = Health::default();
        assert!(health.record(false, &config()));
        assert_eq!(health.verdict, Verdict::Unhealthy);
    }

    #[test]
    fn thresholds_are_consecutive_checks() {
        let mut health = Health::default();
        health.record(true, &config());
        // Two failures, a pass, two failures: never three in a row.
        for passed in [false, false, true, false, false] {
            assert!(!health.record(passed, &config()));
        }
        assert!(health.record(false, &config()));
        assert_eq!(health.verdict, Verdict::Unhealthy);
        assert!(!health.record(true, &config()));
        assert!(health.record(true, &config()));
        assert_eq!(health.verdict, Verdict::Healthy);
    }

    #[test]
    fn requests_and_answers_are_protobuf_in_grpc_frames() {
        assert_eq!(&encode_request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_request("shop")[..],
            &[0, 0, 0, 0, 6, 0x0a, 4, b's', b'h', b'o', b'p']
        );
        let serving = Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1]);
        assert_eq!(decode_status(serving), Some(SERVING));
        let not_serving = Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 2]);
        assert_eq!(decode_status(not_serving), Some(2));
        // An empty message is UNKNOWN; an unknown field is skipped.
        assert_eq!(decode_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Some(0));
        let with_extra = Bytes::from_static(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]);
        assert_eq!(decode_status(with_extra), Some(SERVING));
        // Truncated, compressed or over-long frames are not answers.
        assert_eq!(
            decode_status(Bytes::from_static(&[0, 0, 0, 0, 3, 0x08, 1])),
            None
        );
        assert_eq!(
            decode_status(Bytes::from_static(&[1, 0, 0, 0, 2, 0x08, 1])),
            None
        );
        assert_eq!(decode_status(Bytes::from_static(&[0, 0, 0])), None);
        assert_eq!(
            decode_status(Bytes::from_static(&[0, 0, 0, 0, 1, 0x08])),
            None
        );
    }
}
