//! HPACK for a forwarder: header blocks are decoded with each connection's own dynamic table
//! (`decode`) and re-encoded field by field straight into the other connection's output,
//! never held as a header map. The encoder keeps no dynamic table: a field is fully indexed
//! when the static table has it whole, else a literal without indexing (with the name indexed
//! when the static table has the name), never Huffman-coded. On loopback or in a cluster the
//! few extra bytes per call cost less than a table's bookkeeping, and there is no encoder state
//! to keep in step with the peer.

use bytes::{BufMut, BytesMut};

mod decode;
mod huffman;

pub use decode::{Decoder, Indexing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("no table entry {0}")]
    Index(usize),
    #[error("integer too large")]
    Integer,
    #[error("invalid Huffman code")]
    Huffman,
    #[error("table size {0} above the announced limit")]
    TableSize(usize),
    #[error("table size update after a field")]
    SizeUpdatePlacement,
}

/// Static-table entries (RFC 7541 Appendix A) whose name and value a gRPC call sends as is.
fn whole_index(name: &[u8], value: &[u8]) -> Option<u8> {
    Some(match (name, value) {
        (b":method", b"GET") => 2,
        (b":method", b"POST") => 3,
        (b":path", b"/") => 4,
        (b":scheme", b"http") => 6,
        (b":scheme", b"https") => 7,
        (b":status", b"200") => 8,
        _ => return None,
    })
}

/// Static-table names gRPC calls use, with their first index.
fn name_index(name: &[u8]) -> Option<u8> {
    Some(match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-encoding" => 16,
        b"content-length" => 28,
        b"content-type" => 31,
        b"user-agent" => 58,
        _ => return None,
    })
}

/// An integer with an `n`-bit prefix whose other bits are `flags` (RFC 7541 §5.1).
fn put_integer(out: &mut BytesMut, flags: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_integer(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// One field, appended to a header block; a field that came "never indexed" goes on so.
pub fn encode_field(out: &mut BytesMut, name: &[u8], value: &[u8], indexing: Indexing) {
    let flags = match indexing {
        Indexing::Allowed => {
            if let Some(index) = whole_index(name, value) {
                out.put_u8(0x80 | index);
                return;
            }
            0x00
        }
        Indexing::Never => 0x10,
    };
    match name_index(name) {
        Some(index) => put_integer(out, flags, 4, index as usize),
        None => {
            out.put_u8(flags);
            put_string(out, name);
        }
    }
    put_string(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, Indexing)> {
        let mut fields = Vec::new();
        Decoder::default()
            .decode(block, |n, v, i| fields.push((n.to_vec(), v.to_vec(), i)))
            .unwrap();
        fields
    }

    /// Every third field as if it came "never indexed".
    fn indexing(n: usize) -> Indexing {
        if n % 3 == 2 {
            Indexing::Never
        } else {
            Indexing::Allowed
        }
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_fields() {
        let long = vec![b'v'; 300];
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/fanout.test.v1.Test/Unary"),
            (b":authority", b"app.shop:50051"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", b"200m"),
            (b"x-long", &long),
            (b":status", b"200"),
            (b":status", b"503"),
        ];
        let mut out = BytesMut::new();
        for (n, (name, value)) in fields.iter().enumerate() {
            encode_field(&mut out, name, value, indexing(n));
        }
        let decoded = decode(&out);
        let expected: Vec<(Vec<u8>, Vec<u8>, Indexing)> = fields
            .iter()
            .enumerate()
            .map(|(n, (name, value))| (name.to_vec(), value.to_vec(), indexing(n)))
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn integers_past_their_prefix_continue_in_seven_bit_groups() {
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = BytesMut::new();
        put_integer(&mut out, 0, 5, 1337);
        assert_eq!(&out[..], &[31, 154, 10]);
    }
}
