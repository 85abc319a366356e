//! Kubernetes name rules that the config, the webhook and the discovery server all check.

/// RFC 1123 label, as namespace names must be.
pub fn is_dns_1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1035 label, as Service names must be: also starts with a letter.
pub fn is_dns_1035_label(s: &str) -> bool {
    is_dns_1123_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

/// IANA service name, as Kubernetes port names must be.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
