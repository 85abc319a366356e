//! The bits of gRPC-over-HTTP/2 the proxy must understand: deadlines and status answers.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode};

/// gRPC status codes the proxy produces or counts.
pub const OK: u16 = 0;
pub const CANCELLED: u16 = 1;
pub const DEADLINE_EXCEEDED: u16 = 4;
pub const PERMISSION_DENIED: u16 = 7;
pub const RESOURCE_EXHAUSTED: u16 = 8;
pub const INTERNAL: u16 = 13;
pub const UNAVAILABLE: u16 = 14;

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `timeout`, in the finest unit that fits in 8 digits.
pub fn format_timeout(timeout: Duration) -> HeaderValue {
    let millis = timeout.as_millis();
    let text = if millis < 100_000_000 {
        format!("{}m", millis.max(1))
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&text).expect("digits and a unit are a valid header value")
}

/// The `grpc-status` of a header block (trailers, or the headers of a Trailers-Only answer).
pub fn status_of(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Percent-encodes a grpc-message as the protocol asks.
fn encode_message(message: &str) -> HeaderValue {
    HeaderValue::from_str(&percent_encode(message))
        .unwrap_or_else(|_| HeaderValue::from_static("fanout"))
}

/// A grpc-message's text as it goes on the wire: printable ASCII but `%` as is, the rest
/// percent-encoded.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn status_headers(code: u16, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from(code));
    headers.insert("grpc-message", encode_message(message));
    headers
}

/// A Trailers-Only answer: HTTP 200 whose only header block carries the status.
pub fn trailers_only<B: Default>(code: u16, message: &str) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.extend(status_headers(code, message));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_str(value).unwrap());
        parse_timeout(&headers)
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("250000u"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(timeout("5x"), None);
        assert_eq!(timeout("m"), None);
    }

    #[test]
    fn formats_grpc_timeouts() {
        assert_eq!(format_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(format_timeout(Duration::ZERO), "1m");
        assert_eq!(format_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no endpoint: 50%"), "no endpoint: 50%25");
        assert_eq!(encode_message("é"), "%C3%A9");
    }
}
