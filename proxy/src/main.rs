use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fanout-proxy",
    version,
    about = "Spreads every gRPC call over all endpoints of an upstream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0, or one line per fault and exit 1.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { file } => match fanout_proxy::check::load(&file) {
            Ok(config) => {
                let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
                println!("{}: ok, upstreams {}", file.display(), names.join(", "));
                ExitCode::SUCCESS
            }
            Err(lines) => {
                for line in lines {
                    eprintln!("{line}");
                }
                ExitCode::FAILURE
            }
        },
    }
}
