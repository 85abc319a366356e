fn main() -> std::process::ExitCode {
    match fanout_webhook::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout-webhook: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
