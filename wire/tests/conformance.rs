//! What the forwarder answers a client that breaks HTTP/2's rules (RFC 9113), seen on the
//! wire by a bare frame-level client: connection errors end with GOAWAY and the code the RFC
//! names, stream errors reset only their stream and the connection goes on, and unknown
//! frame types are ignored. No endpoint is needed for any of this, so the forwarder has none
//! (a valid request is then answered UNAVAILABLE at once, as a Trailers-Only response).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use fanout_wire::frame::{self, Head};
use fanout_wire::hpack::{self, Indexing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A forwarder with no endpoints, on a thread of its own.
fn forwarder() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    fanout_wire::engine::spawn_thread(listener, Vec::new());
    addr
}

struct Client {
    io: TcpStream,
    read: BytesMut,
}

/// What the forwarder did about what the client sent.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    GoAway(u32),
    Reset {
        stream: u32,
        code: u32,
    },
    PingAck([u8; 8]),
    /// A response header block that ends its stream, and the grpc-status in it.
    Status {
        stream: u32,
        grpc_status: Option<String>,
    },
}

impl Client {
    /// Connected, with the preface and an empty SETTINGS sent.
    async fn connect(addr: SocketAddr) -> Client {
        let mut client = Client::raw(addr).await;
        let mut out = BytesMut::from(frame::PREFACE);
        frame::put_settings(&mut out, &[]);
        client.send(&out).await;
        client
    }

    async fn raw(addr: SocketAddr) -> Client {
        Client {
            io: TcpStream::connect(addr).await.unwrap(),
            read: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn send_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.try_send_frame(kind, flags, stream, payload)
            .await
            .unwrap();
    }

    /// As `send_frame`; the forwarder may have closed the connection already.
    async fn try_send_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        frame::put_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        self.io.write_all(&out).await
    }

    /// The next frame from the forwarder; `None` once it closed the connection.
    async fn frame(&mut self) -> Option<(Head, Vec<u8>)> {
        loop {
            if let Some(head) = Head::parse(&self.read)
                && self.read.len() >= frame::HEADER_LEN + head.len
            {
                let frame = self.read.split_to(frame::HEADER_LEN + head.len);
                return Some((head, frame[frame::HEADER_LEN..].to_vec()));
            }
            let read =
                tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.read))
                    .await
                    .expect("the forwarder answered within 5 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The forwarder's next GOAWAY, RST_STREAM, PING ack or stream-ending response (its
    /// SETTINGS, their ack and WINDOW_UPDATEs are skipped).
    async fn answer(&mut self) -> Answer {
        loop {
            let (head, payload) = self.frame().await.expect("an answer before the close");
            let word = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
            match head.kind {
                frame::GOAWAY => return Answer::GoAway(word(4)),
                frame::RST_STREAM => {
                    return Answer::Reset {
                        stream: head.stream,
                        code: word(0),
                    };
                }
                frame::PING if head.has(frame::ACK) => {
                    return Answer::PingAck(payload.try_into().unwrap());
                }
                // The forwarder's own answers index nothing: a fresh decoder reads them.
                frame::HEADERS if head.has(frame::END_STREAM) => {
                    let mut grpc_status = None;
                    hpack::Decoder::default()
                        .decode(&payload, |name, value, _| {
                            if name == b"grpc-status" {
                                grpc_status = Some(String::from_utf8_lossy(value).into_owned());
                            }
                        })
                        .unwrap();
                    return Answer::Status {
                        stream: head.stream,
                        grpc_status,
                    };
                }
                _ => {}
            }
        }
    }

    /// The connection ended with GOAWAY(`code`) and was closed.
    async fn expect_goaway(&mut self, code: u32) {
        assert_eq!(self.answer().await, Answer::GoAway(code));
        while self.frame().await.is_some() {}
    }

    /// The connection is still up: a PING is answered.
    async fn expect_alive(&mut self) {
        self.send_frame(frame::PING, 0, 0, b"alive!!!").await;
        assert_eq!(self.answer().await, Answer::PingAck(*b"alive!!!"));
    }
}

/// A header block of `fields`, as a client's encoder might send it.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for (name, value) in fields {
        hpack::encode_field(
            &mut out,
            name.as_bytes(),
            value.as_bytes(),
            Indexing::Allowed,
        );
    }
    out.to_vec()
}

fn request(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/fanout.test.v1.Test/Unary"),
        (":authority", "app"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    fields.extend_from_slice(extra);
    block(&fields)
}

const HEADERS_END: u8 = frame::END_HEADERS | frame::END_STREAM;

#[tokio::test]
async fn a_bad_preface_or_a_first_frame_that_is_not_settings_ends_the_connection() {
    let addr = forwarder();
    let mut client = Client::raw(addr).await;
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    client.expect_goaway(frame::PROTOCOL_ERROR).await;

    let mut client = Client::raw(addr).await;
    client.send(frame::PREFACE).await;
    client.send_frame(frame::PING, 0, 0, &[0; 8]).await;
    client.expect_goaway(frame::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn control_frames_of_the_wrong_size_or_on_the_wrong_stream_end_the_connection() {
    let addr = forwarder();
    let cases: [(u8, u8, u32, Vec<u8>, u32); 14] = [
        (frame::PING, 0, 0, vec![0; 7], frame::FRAME_SIZE_ERROR),
        (frame::PING, 0, 1, vec![0; 8], frame::PROTOCOL_ERROR),
        (
            frame::SETTINGS,
            frame::ACK,
            0,
            vec![0; 6],
            frame::FRAME_SIZE_ERROR,
        ),
        (frame::SETTINGS, 0, 0, vec![0; 5], frame::FRAME_SIZE_ERROR),
        (frame::SETTINGS, 0, 1, vec![], frame::PROTOCOL_ERROR),
        (
            frame::SETTINGS,
            0,
            0,
            vec![0, 2, 0, 0, 0, 2],
            frame::PROTOCOL_ERROR,
        ),
        (
            frame::SETTINGS,
            0,
            0,
            vec![0, 4, 0x80, 0, 0, 0],
            frame::FLOW_CONTROL_ERROR,
        ),
        (
            frame::SETTINGS,
            0,
            0,
            vec![0, 5, 0, 0, 0, 100],
            frame::PROTOCOL_ERROR,
        ),
        (
            frame::WINDOW_UPDATE,
            0,
            0,
            vec![0, 0, 0, 0],
            frame::PROTOCOL_ERROR,
        ),
        (
            frame::WINDOW_UPDATE,
            0,
            0,
            vec![0, 0, 1],
            frame::FRAME_SIZE_ERROR,
        ),
        (
            frame::RST_STREAM,
            0,
            0,
            vec![0, 0, 0, 8],
            frame::PROTOCOL_ERROR,
        ),
        (
            frame::RST_STREAM,
            0,
            7,
            vec![0, 0, 0, 8],
            frame::PROTOCOL_ERROR,
        ),
        (frame::GOAWAY, 0, 0, vec![0; 7], frame::FRAME_SIZE_ERROR),
        (
            frame::PUSH_PROMISE,
            frame::END_HEADERS,
            1,
            vec![0, 0, 0, 2],
            frame::PROTOCOL_ERROR,
        ),
    ];
    for (kind, flags, stream, payload, code) in cases {
        let mut client = Client::connect(addr).await;
        client.send_frame(kind, flags, stream, &payload).await;
        client.expect_goaway(code).await;
    }
}

#[tokio::test]
async fn the_connection_window_cannot_be_grown_past_its_limit() {
    let addr = forwarder();
    let mut client = Client::connect(addr).await;
    let most = 0x7fff_ffffu32.to_be_bytes();
    client.send_frame(frame::WINDOW_UPDATE, 0, 0, &most).await;
    client.expect_goaway(frame::FLOW_CONTROL_ERROR).await;
}

#[tokio::test]
async fn frames_larger_than_announced_and_data_outside_a_stream_end_the_connection() {
    let addr = forwarder();
    let mut client = Client::connect(addr).await;
    client
        .send_frame(frame::DATA, 0, 1, &vec![0; frame::DEFAULT_MAX_FRAME + 1])
        .await;
    client.expect_goaway(frame::FRAME_SIZE_ERROR).await;

    for stream in [0, 1, 2] {
        let mut client = Client::connect(addr).await;
        client.send_frame(frame::DATA, 0, stream, b"x").await;
        client.expect_goaway(frame::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn header_blocks_must_be_whole_decodable_and_on_client_streams() {
    let addr = forwarder();
    // Another frame between HEADERS and its CONTINUATION.
    let mut client = Client::connect(addr).await;
    client
        .send_frame(frame::HEADERS, frame::END_STREAM, 1, &request(&[]))
        .await;
    client.send_frame(frame::PING, 0, 0, &[0; 8]).await;
    client.expect_goaway(frame::PROTOCOL_ERROR).await;

    // A CONTINUATION with no HEADERS before it.
    let mut client = Client::connect(addr).await;
    client
        .send_frame(frame::CONTINUATION, frame::END_HEADERS, 1, &request(&[]))
        .await;
    client.expect_goaway(frame::PROTOCOL_ERROR).await;

    // An index past both tables.
    let mut client = Client::connect(addr).await;
    client
        .send_frame(frame::HEADERS, HEADERS_END, 1, &[0x80 | 70])
        .await;
    client.expect_goaway(frame::COMPRESSION_ERROR).await;

    // Stream 0, and an even (server-initiated) stream.
    for stream in [0, 2] {
        let mut client = Client::connect(addr).await;
        client
            .send_frame(frame::HEADERS, HEADERS_END, stream, &request(&[]))
            .await;
        client.expect_goaway(frame::PROTOCOL_ERROR).await;
    }
}

#[tokio::test]
async fn a_malformed_request_resets_its_stream_only() {
    let addr = forwarder();
    let mut client = Client::connect(addr).await;
    let malformed = [
        request(&[("X-Upper", "1")]),
        request(&[("connection", "keep-alive")]),
        request(&[("transfer-encoding", "chunked")]),
        request(&[("te", "gzip")]),
        request(&[(":status", "200")]),
        block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "app"),
        ]),
        block(&[
            (":method", "POST"),
            ("content-type", "application/grpc"),
            (":scheme", "http"),
            (":path", "/a/b"),
        ]),
        block(&[
            (":method", "POST"),
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/a/b"),
        ]),
    ];
    for (n, block) in malformed.iter().enumerate() {
        let stream = 1 + 2 * n as u32;
        client
            .send_frame(frame::HEADERS, HEADERS_END, stream, block)
            .await;
        assert_eq!(
            client.answer().await,
            Answer::Reset {
                stream,
                code: frame::PROTOCOL_ERROR
            },
            "block {n}"
        );
    }
    client.expect_alive().await;

    // A valid request, split over CONTINUATIONs, with no endpoint to go to.
    let valid = request(&[("x-long", &"v".repeat(100))]);
    let stream = 1 + 2 * malformed.len() as u32;
    let (first, rest) = valid.split_at(20);
    client
        .send_frame(frame::HEADERS, frame::END_STREAM, stream, first)
        .await;
    client
        .send_frame(frame::CONTINUATION, frame::END_HEADERS, stream, rest)
        .await;
    assert_eq!(
        client.answer().await,
        Answer::Status {
            stream,
            grpc_status: Some("14".into())
        }
    );
    client.expect_alive().await;
}

#[tokio::test]
async fn unknown_frame_types_and_priorities_are_ignored_and_pings_answered() {
    let addr = forwarder();
    let mut client = Client::connect(addr).await;
    client.send_frame(0xfa, 0xff, 0, b"whatever").await;
    client.send_frame(0xfa, 0, 9, b"").await;
    client
        .send_frame(frame::PRIORITY, 0, 3, &[0, 0, 0, 1, 16])
        .await;
    let mut payload = BytesMut::new();
    payload.put_u64(0x0102_0304_0506_0708);
    client.send_frame(frame::PING, 0, 0, &payload).await;
    assert_eq!(
        client.answer().await,
        Answer::PingAck([1, 2, 3, 4, 5, 6, 7, 8])
    );
    client.expect_alive().await;
}

/// Whatever frames a client sends after a valid start, the forwarder goes on serving: a new
/// connection's PING is still answered (a panic would have ended its thread).
#[test]
fn garbage_frames_never_bring_the_forwarder_down() {
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A panic in a connection's task ends only that task: count them where they happen.
    static SPIKE_PANICS: AtomicUsize = AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(fanout_wire::engine::THREAD_NAME) {
            SPIKE_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        default_hook(info);
    }));
    let addr = forwarder();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let frames = prop::collection::vec(
        (
            0u8..12,
            any::<u8>(),
            0u32..8,
            prop::collection::vec(any::<u8>(), 0..40),
        ),
        1..12,
    );
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(128);
    let config = ProptestConfig::with_cases(cases);
    proptest!(config, |(frames in frames)| {
        runtime.block_on(async {
            let mut client = Client::connect(addr).await;
            for (kind, flags, stream, payload) in &frames {
                if client.try_send_frame(*kind, *flags, *stream, payload).await.is_err() {
                    break;
                }
            }
            let mut fresh = Client::connect(addr).await;
            fresh.expect_alive().await;
        });
        prop_assert_eq!(SPIKE_PANICS.load(Ordering::SeqCst), 0);
    });
}
