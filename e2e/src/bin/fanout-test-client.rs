//! `fanout-test-client [--target ADDR] --calls N`: the gateway of the cluster suite. Waits until a
//! call through `--target` (default: `$FANOUT_UPSTREAM_BACKEND`, what the webhook sets) succeeds,
//! then makes N unary calls over one HTTP/2 connection, as a gRPC client pod does, and prints one
//! JSON line: calls answered per backend id, and failures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fanout_e2e::backend::proto::EchoRequest;
use fanout_e2e::backend::proto::test_client::TestClient;

#[derive(Parser)]
#[command(name = "fanout-test-client")]
struct Args {
    #[arg(long, env = "FANOUT_UPSTREAM_BACKEND")]
    target: String,
    #[arg(long, default_value_t = 1000)]
    calls: u32,
    /// How long to wait for the first successful call.
    #[arg(long, default_value_t = 60)]
    wait_seconds: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut client = loop {
        let attempt = async {
            let mut client = TestClient::connect(format!("http://{}", args.target)).await?;
            client.unary(EchoRequest::default()).await?;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(client) => break client,
            Err(e) if started.elapsed() < Duration::from_secs(args.wait_seconds) => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context(format!("no call through {} succeeded", args.target)),
        }
    };
    let mut backends: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..args.calls {
        match client.unary(EchoRequest::default()).await {
            Ok(reply) => *backends.entry(reply.into_inner().backend).or_default() += 1,
            Err(status) => *failures.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"target": args.target, "backends": backends, "failures": failures})
    );
    Ok(())
}
