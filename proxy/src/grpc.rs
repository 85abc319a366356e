//! The bits of gRPC-over-HTTP/2 the proxy's own calls use (health checks) and the status
//! messages it words.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// The gRPC status of a call that succeeded.
pub const OK: u16 = 0;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_grpc_timeouts() {
        assert_eq!(format_timeout(Duration::from_millis(250)), "250m");
        assert_eq!(format_timeout(Duration::ZERO), "1m");
        assert_eq!(format_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("no endpoint: 50%"), "no endpoint: 50%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
