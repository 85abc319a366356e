//! `fanout-test-backend --listen ADDR --id NAME`: the tonic test backend as a process. SIGTERM
//! stops it gracefully (GOAWAY, calls in flight finish).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fanout_e2e::backend::{Backend, Behaviour};

#[derive(Parser)]
#[command(name = "fanout-test-backend")]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    id: String,
    /// Also listen on the next N-1 ports of the same address: one backend behind N endpoints.
    #[arg(long, default_value_t = 1)]
    ports: u16,
    /// Delay added to every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Share of unary calls (0-100) answered UNAVAILABLE.
    #[arg(long, default_value_t = 0)]
    fail_percent: u32,
    /// The first N calls wait --slow-first-delay-ms more (a cold pod).
    #[arg(long, default_value_t = 0)]
    slow_first_calls: u64,
    #[arg(long, default_value_t = 0)]
    slow_first_delay_ms: u64,
    /// grpc.health.v1 reports NOT_SERVING for this long after the start, then SERVING.
    #[arg(long, default_value_t = 0)]
    not_serving_for_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = Backend::new(
        args.id.clone(),
        Behaviour {
            delay: Duration::from_millis(args.delay_ms),
            fail_percent: args.fail_percent,
            slow_first_calls: args.slow_first_calls,
            slow_first_delay: Duration::from_millis(args.slow_first_delay_ms),
            pushback: None,
        },
    );
    if args.not_serving_for_ms > 0 {
        let health = backend.health();
        health.set_serving(false);
        let serving_after = Duration::from_millis(args.not_serving_for_ms);
        tokio::spawn(async move {
            tokio::time::sleep(serving_after).await;
            eprintln!("fanout-test-backend: now SERVING");
            health.set_serving(true);
        });
    }
    let mut listeners = Vec::new();
    for n in 0..args.ports.max(1) {
        let port = args.listen.port().checked_add(n).ok_or_else(|| {
            anyhow::anyhow!(
                "--ports {} from port {} passes 65535",
                args.ports,
                args.listen.port()
            )
        })?;
        listeners
            .push(tokio::net::TcpListener::bind(SocketAddr::new(args.listen.ip(), port)).await?);
    }
    eprintln!(
        "fanout-test-backend {} listening on {} ({} ports)",
        args.id,
        listeners[0].local_addr()?,
        listeners.len()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    backend
        .serve_all(listeners, async move {
            term.recv().await;
        })
        .await?;
    Ok(())
}
