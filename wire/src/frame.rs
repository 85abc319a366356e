//! HTTP/2 frames (RFC 9113 §4, §6) as the forwarder reads and writes them: a 9-byte header
//! parsed in place, payloads left as slices of the read buffer, frames written straight into a
//! connection's output buffer.

use bytes::{BufMut, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
/// The largest frame payload every peer accepts until it says otherwise.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// What a peer's window is until its SETTINGS say otherwise.
pub const DEFAULT_WINDOW: i64 = 65_535;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
pub const INADEQUATE_SECURITY: u32 = 0xc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The header at the start of `buf`, if 9 bytes are there.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let b: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("padding longer than the frame")]
    Padding,
    #[error("frame too short for its type")]
    Short,
}

/// A HEADERS or DATA payload without its padding and priority fields.
pub fn strip(head: &Head, payload: &[u8]) -> Result<std::ops::Range<usize>, FrameError> {
    let mut start = 0;
    let mut end = payload.len();
    if head.has(PADDED) {
        let pad = *payload.first().ok_or(FrameError::Short)? as usize;
        start = 1;
        end = end.checked_sub(pad).ok_or(FrameError::Padding)?;
    }
    if head.kind == HEADERS && head.has(PRIORITY_FLAG) {
        start += 5;
    }
    if start > end {
        return Err(FrameError::Padding);
    }
    Ok(start..end)
}

pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// Starts a frame whose length is known only once its payload is written; returns where to
/// [`finish_frame`] it.
pub fn begin_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32) -> usize {
    let at = out.len();
    put_head(out, 0, kind, flags, stream);
    at
}

pub fn finish_frame(out: &mut BytesMut, at: usize) {
    let len = out.len() - at - HEADER_LEN;
    out[at..at + 3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
}

/// Finishes a HEADERS frame begun at `at` (with END_HEADERS set) whose block may be larger
/// than the peer's largest frame: then the block goes on in CONTINUATION frames, the last of
/// which carries END_HEADERS.
pub fn finish_headers(out: &mut BytesMut, at: usize, max_frame: usize) {
    let len = out.len() - at - HEADER_LEN;
    if len <= max_frame {
        finish_frame(out, at);
        return;
    }
    let block = out.split_off(at + HEADER_LEN);
    let flags = out[at + 4];
    let stream = u32::from_be_bytes([out[at + 5], out[at + 6], out[at + 7], out[at + 8]]);
    out.truncate(at);
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = HEADERS;
    let mut first_flags = flags & !END_HEADERS;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = first_flags | if last { END_HEADERS } else { 0 };
        put_head(out, chunk.len(), kind, flags, stream);
        out.extend_from_slice(chunk);
        kind = CONTINUATION;
        first_flags = 0;
    }
}

pub fn put_data(out: &mut BytesMut, stream: u32, payload: &[u8], end_stream: bool) {
    put_head(
        out,
        payload.len(),
        DATA,
        if end_stream { END_STREAM } else { 0 },
        stream,
    );
    out.extend_from_slice(payload);
}

pub fn put_rst(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

pub fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for &(id, value) in settings {
        out.put_u16(id);
        out.put_u32(value);
    }
}

/// A PING of ours (opaque data all zero: one is ever outstanding per connection).
pub fn put_ping(out: &mut BytesMut) {
    put_head(out, 8, PING, 0, 0);
    out.extend_from_slice(&[0; 8]);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32) {
    put_head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_frame_parses_back() {
        let mut out = BytesMut::new();
        put_data(&mut out, 7, b"hello", true);
        let head = Head::parse(&out).unwrap();
        assert_eq!(
            head,
            Head {
                len: 5,
                kind: DATA,
                flags: END_STREAM,
                stream: 7
            }
        );
        assert_eq!(&out[HEADER_LEN..], b"hello");
    }

    #[test]
    fn a_frame_begun_before_its_payload_gets_its_length() {
        let mut out = BytesMut::new();
        let at = begin_frame(&mut out, HEADERS, END_HEADERS, 3);
        out.extend_from_slice(&[0x82; 300]);
        finish_frame(&mut out, at);
        assert_eq!(Head::parse(&out).unwrap().len, 300);
    }

    #[test]
    fn a_header_block_past_the_largest_frame_goes_on_in_continuations() {
        let mut out = BytesMut::new();
        put_data(&mut out, 1, b"x", false);
        let at = begin_frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 5);
        out.extend((0..40_000u32).map(|i| i as u8));
        finish_headers(&mut out, at, DEFAULT_MAX_FRAME);
        let mut frames = Vec::new();
        let mut rest = &out[HEADER_LEN + 1..];
        let mut block = Vec::new();
        while let Some(head) = Head::parse(rest) {
            block.extend_from_slice(&rest[HEADER_LEN..HEADER_LEN + head.len]);
            frames.push((head.kind, head.flags, head.len, head.stream));
            rest = &rest[HEADER_LEN + head.len..];
        }
        assert_eq!(
            frames,
            [
                (HEADERS, END_STREAM, 16_384, 5),
                (CONTINUATION, 0, 16_384, 5),
                (CONTINUATION, END_HEADERS, 40_000 - 32_768, 5)
            ]
        );
        assert!(block.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn padding_and_priority_are_stripped_and_bad_padding_refused() {
        let head = Head {
            len: 10,
            kind: HEADERS,
            flags: PADDED | PRIORITY_FLAG | END_HEADERS,
            stream: 1,
        };
        // pad length 2, 5 priority bytes, 2 bytes of block, 2 of padding
        let payload = [2, 0, 0, 0, 0, 16, 0x82, 0x86, 0, 0];
        assert_eq!(strip(&head, &payload), Ok(6..8));
        let bad = [20, 0, 0];
        assert_eq!(strip(&head, &bad), Err(FrameError::Padding));
        assert_eq!(strip(&head, &[]), Err(FrameError::Short));
    }

    #[test]
    fn the_reserved_bit_of_the_stream_id_is_ignored() {
        let mut out = BytesMut::new();
        put_head(&mut out, 0, PING, 0, 0);
        out[5] |= 0x80;
        assert_eq!(Head::parse(&out).unwrap().stream, 0);
        assert_eq!(Head::parse(&out[..8]), None);
    }
}
