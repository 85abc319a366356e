//! The HPACK decoder (RFC 7541 §3, §6): a header block in, each field handed to a callback as
//! slices of the block, of the dynamic table or of reused scratch buffers. Nothing is
//! allocated per field except the table's own copies of the fields it indexes.

use std::collections::VecDeque;

use super::DecodeError;
use super::huffman;

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The per-entry overhead the table size counts (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

struct Entry {
    /// Name then value, one allocation.
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }
    fn value(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// How a field may be indexed by whoever passes it on (RFC 7541 §7.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexing {
    Allowed,
    /// Sent "never indexed": a proxy must forward it so too.
    Never,
}

pub struct Decoder {
    /// Newest first.
    dynamic: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The most the peer may set `max_size` to: what we announced in SETTINGS.
    allowed_max: usize,
    name_scratch: Vec<u8>,
    value_scratch: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(4096)
    }
}

/// Where a string of the block is: in the block itself, or decoded into a scratch buffer.
#[derive(Clone, Copy)]
enum Str {
    Block(usize, usize),
    Scratch,
}

impl Decoder {
    /// A decoder for a connection on which we announced `SETTINGS_HEADER_TABLE_SIZE = allowed`.
    pub fn new(allowed: usize) -> Self {
        Self {
            dynamic: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed_max: allowed,
            name_scratch: Vec::new(),
            value_scratch: Vec::new(),
        }
    }

    /// Decodes a whole header block (HEADERS and its CONTINUATIONs joined), calling `field`
    /// for every field in order.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8], Indexing),
    ) -> Result<(), DecodeError> {
        let mut at = 0;
        let mut fields_seen = false;
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                let index = integer(block, &mut at, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value, Indexing::Allowed);
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                // A table size update may only open a block (RFC 7541 §4.2).
                if fields_seen {
                    return Err(DecodeError::SizeUpdatePlacement);
                }
                let size = integer(block, &mut at, 5)?;
                if size > self.allowed_max {
                    return Err(DecodeError::TableSize(size));
                }
                self.max_size = size;
                self.evict(0);
            } else {
                let (prefix, indexing, insert) = match first {
                    f if f & 0xc0 == 0x40 => (6, Indexing::Allowed, true),
                    f if f & 0xf0 == 0x10 => (4, Indexing::Never, false),
                    _ => (4, Indexing::Allowed, false),
                };
                let index = integer(block, &mut at, prefix)?;
                let name = if index == 0 {
                    Some(string(block, &mut at, &mut self.name_scratch)?)
                } else {
                    None
                };
                let value = string(block, &mut at, &mut self.value_scratch)?;
                let resolve = |s: Str, scratch: &[u8]| -> Vec<u8> {
                    match s {
                        Str::Block(from, to) => block[from..to].to_vec(),
                        Str::Scratch => scratch.to_vec(),
                    }
                };
                {
                    let name_bytes: &[u8] = match name {
                        Some(Str::Block(from, to)) => &block[from..to],
                        Some(Str::Scratch) => &self.name_scratch,
                        None => self.entry(index)?.0,
                    };
                    let value_bytes: &[u8] = match value {
                        Str::Block(from, to) => &block[from..to],
                        Str::Scratch => &self.value_scratch,
                    };
                    field(name_bytes, value_bytes, indexing);
                }
                if insert {
                    let mut bytes = match name {
                        Some(s) => resolve(s, &self.name_scratch),
                        None => self.entry(index)?.0.to_vec(),
                    };
                    let name_len = bytes.len();
                    bytes.extend_from_slice(&resolve(value, &self.value_scratch));
                    self.insert(Entry {
                        bytes: bytes.into_boxed_slice(),
                        name_len,
                    });
                }
                fields_seen = true;
            }
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError::Index(0)),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .dynamic
                .get(index - 62)
                .map(|e| (e.name(), e.value()))
                .ok_or(DecodeError::Index(index)),
        }
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        self.evict(size);
        // An entry larger than the whole table empties it and is not kept (RFC 7541 §4.4).
        if size <= self.max_size {
            self.size += size;
            self.dynamic.push_front(entry);
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.dynamic.pop_back() {
                Some(old) => self.size -= old.size(),
                None => break,
            }
        }
    }
}

/// An integer with an `prefix`-bit prefix at `block[*at]` (RFC 7541 §5.1).
fn integer(block: &[u8], at: &mut usize, prefix: u32) -> Result<usize, DecodeError> {
    let max = (1usize << prefix) - 1;
    let first = *block.get(*at).ok_or(DecodeError::Truncated)? as usize & max;
    *at += 1;
    if first < max {
        return Ok(first);
    }
    let mut value = max;
    let mut shift = 0;
    loop {
        let byte = *block.get(*at).ok_or(DecodeError::Truncated)?;
        *at += 1;
        // Anything past 2^28 is no header a peer may send us: refuse before it overflows.
        if shift > 21 {
            return Err(DecodeError::Integer);
        }
        value += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal at `block[*at]`: where it is in the block, or Huffman-decoded into
/// `scratch`.
fn string(block: &[u8], at: &mut usize, scratch: &mut Vec<u8>) -> Result<Str, DecodeError> {
    let huffman = *block.get(*at).ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let len = integer(block, at, 7)?;
    let from = *at;
    let to = from.checked_add(len).ok_or(DecodeError::Truncated)?;
    if to > block.len() {
        return Err(DecodeError::Truncated);
    }
    *at = to;
    if huffman {
        scratch.clear();
        huffman::decode(&block[from..to], scratch)?;
        Ok(Str::Scratch)
    } else {
        Ok(Str::Block(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(decoder: &mut Decoder, block: &[u8]) -> Vec<(String, String, Indexing)> {
        let mut fields = Vec::new();
        decoder
            .decode(block, |n, v, i| {
                fields.push((
                    String::from_utf8_lossy(n).into(),
                    String::from_utf8_lossy(v).into(),
                    i,
                ))
            })
            .unwrap();
        fields
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[(String, String, Indexing)]) -> Vec<(&str, &str)> {
        fields
            .iter()
            .map(|(n, v, _)| (n.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn the_rfc_request_examples_with_huffman_decode_in_sequence() {
        // RFC 7541 C.4.1–C.4.3: three requests on one connection, the table carried over.
        let mut decoder = Decoder::default();
        let first = all(
            &mut decoder,
            &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
        );
        assert_eq!(
            pairs(&first),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
        );
        let second = all(&mut decoder, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(
            second[3],
            (
                ":authority".into(),
                "www.example.com".into(),
                Indexing::Allowed
            )
        );
        assert_eq!(second[4].1, "no-cache");
        let third = all(
            &mut decoder,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(
            pairs(&third),
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ]
        );
        assert_eq!(decoder.size, 164);
    }

    #[test]
    fn a_small_table_evicts_the_oldest_entries() {
        // RFC 7541 C.5 with a 256-byte table: the third response evicts.
        let mut decoder = Decoder::new(256);
        all(
            &mut decoder,
            &hex(
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                 6c65 2e63 6f6d",
            ),
        );
        assert_eq!(decoder.size, 222);
        let second = all(&mut decoder, &hex("4803 3330 37c1 c0bf"));
        assert_eq!(second[0].1, "307");
        assert_eq!(second[3].1, "https://www.example.com");
        assert_eq!(decoder.size, 222);
        assert_eq!(decoder.dynamic.len(), 4);
    }

    proptest::proptest! {
        /// Whatever a peer sends as a header block, in any sequence on one connection, is
        /// decoded or refused: never a panic, and the table never exceeds its size.
        #[test]
        fn any_blocks_decode_or_are_refused(
            blocks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 1..8),
            table in 0usize..300,
        ) {
            let mut decoder = Decoder::new(table);
            for block in &blocks {
                let _ = decoder.decode(block, |_, _, _| {});
                proptest::prop_assert!(decoder.size <= decoder.max_size);
            }
        }

        /// Valid blocks with arbitrary names and values (literal, indexed and Huffman-free)
        /// come back as they were encoded.
        #[test]
        fn encoded_fields_come_back(
            fields in proptest::collection::vec(("[a-z-]{1,12}", "[ -~]{0,40}"), 0..12),
        ) {
            let mut block = bytes::BytesMut::new();
            for (name, value) in &fields {
                super::super::encode_field(&mut block, name.as_bytes(), value.as_bytes(), Indexing::Allowed);
            }
            let mut decoded = Vec::new();
            Decoder::default()
                .decode(&block, |n, v, _| decoded.push((n.to_vec(), v.to_vec())))
                .unwrap();
            let expected: Vec<(Vec<u8>, Vec<u8>)> = fields
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            proptest::prop_assert_eq!(decoded, expected);
        }
    }

    #[test]
    fn never_indexed_fields_are_marked_and_bad_blocks_refused() {
        let mut decoder = Decoder::default();
        // C.2.3: never indexed, literal name.
        let fields = all(
            &mut decoder,
            &hex("1008 7061 7373 776f 7264 0673 6563 7265 74"),
        );
        assert_eq!(
            fields,
            [("password".into(), "secret".into(), Indexing::Never)]
        );
        assert_eq!(decoder.dynamic.len(), 0);
        let refused = |block: &[u8]| Decoder::default().decode(block, |_, _, _| {}).unwrap_err();
        assert_eq!(refused(&[0x80]), DecodeError::Index(0));
        assert_eq!(refused(&[0xbe]), DecodeError::Index(62));
        assert_eq!(refused(&hex("4088 25a8")), DecodeError::Truncated);
        assert_eq!(refused(&hex("3fe2 1f")), DecodeError::TableSize(4097));
        assert_eq!(refused(&hex("82 20")), DecodeError::SizeUpdatePlacement);
        assert_eq!(refused(&hex("ff ff ff ff ff 7f")), DecodeError::Integer);
    }
}
