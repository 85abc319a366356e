//! `fanout-certs --out DIR --dns NAME... --ip IP...`: a CA and a serving certificate for local
//! runs and tests (`make certs`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fanout_certs::{Ca, write_bundle};

#[derive(Parser)]
#[command(
    version,
    about = "Write ca.crt, tls.crt and tls.key for the fanout webhook"
)]
struct Args {
    /// Directory to write ca.crt, tls.crt and tls.key into.
    #[arg(long)]
    out: PathBuf,
    /// DNS names for the serving certificate.
    #[arg(long = "dns", num_args = 1..)]
    dns: Vec<String>,
    /// IP addresses for the serving certificate.
    #[arg(long = "ip", num_args = 1..)]
    ip: Vec<IpAddr>,
    /// Validity of the serving certificate in days.
    #[arg(long, default_value_t = 365)]
    days: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.dns.is_empty() && args.ip.is_empty() {
        anyhow::bail!("give at least one --dns NAME or --ip IP");
    }
    let ca = Ca::generate("fanout webhook CA", fanout_certs::CA_VALIDITY)?;
    let serving = ca.issue_serving(&args.dns, &args.ip, Duration::from_secs(args.days * 86_400))?;
    write_bundle(&args.out, &ca, &serving)?;
    println!("wrote ca.crt, tls.crt, tls.key to {}", args.out.display());
    Ok(())
}
