fn main() -> std::process::ExitCode {
    fanout_proxy::cli::main()
}
