//! `fanout-wire-spike --listen ADDR ENDPOINT...`: the measuring spike of `fanout-wire`, for
//! benchmarks only.

use std::net::SocketAddr;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(flag), Some(listen)) = (args.next(), args.next()) else {
        eprintln!("usage: fanout-wire-spike --listen ADDR ENDPOINT...");
        return ExitCode::FAILURE;
    };
    let listen: Result<SocketAddr, _> = listen.parse();
    let endpoints: Result<Vec<SocketAddr>, _> = args.map(|a| a.parse()).collect();
    let (Ok(listen), Ok(endpoints), "--listen") = (listen, endpoints, flag.as_str()) else {
        eprintln!("usage: fanout-wire-spike --listen ADDR ENDPOINT... (addresses as ip:port)");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fanout-wire-spike: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, fanout_wire::engine::serve(listen, &endpoints)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout-wire-spike: {e}");
            ExitCode::FAILURE
        }
    }
}
