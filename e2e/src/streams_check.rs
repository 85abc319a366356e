//! The stream checks the proxy and its engine alone must pass, shared by their suites: a
//! server stream, a client stream and a bidirectional stream through whatever `client` is
//! connected to arrive whole and in order.

use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::backend::proto::test_client::TestClient;
use crate::backend::proto::{EchoRequest, StreamRequest};

/// 1,000 server-stream replies, 500 client-stream messages, and `bidi` messages each way on
/// one stream, interleaved under flow control; panics on the first difference.
pub async fn streams_arrive_whole_and_in_order(client: &mut TestClient<Channel>, bidi: u32) {
    let replies: Vec<_> = client
        .server_stream(StreamRequest {
            count: 1000,
            interval_ms: 0,
            reply_bytes: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(replies.len(), 1000);

    let messages = (0..500).map(|i| EchoRequest {
        payload: vec![1; i],
        ..Default::default()
    });
    let reply = client
        .client_stream(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.count, 500);
    assert_eq!(reply.bytes, (0..500u64).sum::<u64>());

    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let sender = tokio::spawn(async move {
        for i in 0..bidi {
            let message = EchoRequest {
                payload: i.to_be_bytes().to_vec(),
                ..Default::default()
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut replies = client
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u32;
    while let Some(reply) = replies.next().await {
        assert_eq!(
            reply.unwrap().payload,
            n.to_be_bytes().to_vec(),
            "in order, unchanged"
        );
        n += 1;
    }
    sender.await.unwrap();
    assert_eq!(n, bidi);
}
