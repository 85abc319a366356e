//! Answers the proxy makes itself, in place of an endpoint's: a gRPC status on a client's
//! stream, as a Trailers-Only answer when no response headers went yet, else as the trailers
//! that end the answer.

use bytes::BytesMut;

use crate::frame;
use crate::hpack::{self, Indexing};

/// gRPC status codes the spike answers with.
pub const DEADLINE_EXCEEDED: &[u8] = b"4";
pub const UNAVAILABLE: &[u8] = b"14";

/// `code` and `message` on `stream`, ending it: a whole Trailers-Only answer when
/// `headers_first`, else the trailers of an answer whose headers went.
pub fn put_status(
    out: &mut BytesMut,
    stream: u32,
    headers_first: bool,
    code: &[u8],
    message: &[u8],
    max_frame: usize,
) {
    let flags = frame::END_HEADERS | frame::END_STREAM;
    let at = frame::begin_frame(out, frame::HEADERS, flags, stream);
    if headers_first {
        hpack::encode_field(out, b":status", b"200", Indexing::Allowed);
        hpack::encode_field(out, b"content-type", b"application/grpc", Indexing::Allowed);
    }
    hpack::encode_field(out, b"grpc-status", code, Indexing::Allowed);
    hpack::encode_field(out, b"grpc-message", message, Indexing::Allowed);
    frame::finish_headers(out, at, max_frame);
}

/// Ends the client's `stream` with a Trailers-Only `code` and `message`; a client still
/// sending is told it may stop (RFC 9113 §8.1).
pub fn end_call(conn: &super::Conn, stream: u32, request_ended: bool, code: &[u8], message: &[u8]) {
    let mut out = conn.out.borrow_mut();
    put_status(
        &mut out,
        stream,
        true,
        code,
        message,
        conn.peer_max_frame.get(),
    );
    if !request_ended {
        frame::put_rst(&mut out, stream, frame::NO_ERROR);
    }
}
