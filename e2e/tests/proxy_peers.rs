//! The proxy in front of a gRPC implementation other than tonic: gRPC C-core (Python grpcio),
//! stopped the way its users stop it, `server.stop(grace)`, one pod after another under load.
//!
//! What C-core sends when it stops (seen in the proxy's HTTP/2 frames): a first GOAWAY (last
//! stream id 2^31-1, "Server shutdown") and a PING; then, for a call it had received but not
//! yet handed to the application, a Trailers-Only answer `grpc-status: 1` (CANCELLED),
//! `grpc-message: CANCELLED`, and RST_STREAM(NO_ERROR) (grpc/grpc#41785: the pending call is
//! zombified and ends with absl's default CancelledError; grpc/grpc#41786 proposes UNAVAILABLE
//! instead, which the proxy would retry). The application never saw those calls, but nothing
//! on the wire proves it: the same answer is what a handler that was cancelled, or cancelled
//! itself, leaves behind, and the stream was accepted (it is below the final GOAWAY's last
//! stream id). So the proxy passes it on, as a gRPC client talking to the server directly would
//! get it, rather than retry a call that may have run. About one rolling restart in three
//! meets such a call; the test allows exactly that and no other failure.

use std::time::Duration;

use fanout_e2e::backend_process::{self, Implementation};
use fanout_e2e::fleet::{proxy_over_dns, retry_counts, rolling_restart};
use fanout_e2e::open_load::{Load, LoadResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_grpcio_backends_under_load_fails_no_calls() {
    let (port, mut backends) =
        backend_process::on_pod_ips_as(Implementation::Grpcio, 10, |_| vec!["--grace", "5"]).await;
    let fleet = proxy_over_dns(port, 10, |_| {}).await;
    let load = Load::start(fleet.local, 4, 300, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rolling_restart(&mut backends, &fleet.proxy, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let LoadResult {
        offered,
        failures,
        rate,
        ..
    } = load.stop().await;
    eprintln!(
        "grpcio rolling restart: {offered} calls at {rate:.0} calls/s, {} failed\n{}",
        failures.len(),
        retry_counts(&fleet.proxy).await
    );
    assert!(rate >= 200.0, "the load fell behind: {rate:.0} calls/s");
    let (pending_cancelled, other): (Vec<_>, Vec<_>) = failures.iter().partition(|f| {
        f.status.code() == tonic::Code::Cancelled && f.status.message() == "CANCELLED"
    });
    assert!(other.is_empty(), "calls failed: {other:#?}");
    eprintln!(
        "{} calls CANCELLED by C-core while it stopped",
        pending_cancelled.len()
    );
}
