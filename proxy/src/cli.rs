//! `fanout-proxy run --config FILE`, `fanout-proxy check FILE`, `fanout-proxy wait`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::{Parser, Subcommand};
use fanout_proxy_config::ProxyConfig;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::activity::Activity;
use crate::admin::{self, Admin};
use crate::grpc_health::AppHealth;
use crate::metrics::Metrics;
use crate::serving::Serving;
use crate::{check, wait};

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
    /// Run the proxy.
    Run {
        #[arg(
            long,
            env = "FANOUT_PROXY_CONFIG",
            default_value = "/etc/fanout/config.json"
        )]
        config: PathBuf,
        /// Engine threads per upstream, which carry its calls (discovery, health checks and
        /// the admin run on one more). One is the most efficient per call and enough for a
        /// sidecar's share of a node; more raise the ceiling at saturation.
        #[arg(long, env = "FANOUT_PROXY_THREADS", default_value_t = 1)]
        threads: usize,
    },
    /// Validate a config file: exit 0, or one line per fault and exit 1.
    Check { file: PathBuf },
    /// Return once the proxy's admin endpoint answers `/live` (for a postStart hook).
    Wait {
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: SocketAddr,
        #[arg(long, default_value = "60s", value_parser = fanout_proxy_config::duration::parse)]
        timeout: Duration,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FANOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

pub fn main() -> ExitCode {
    // The discovery server's TLS: ring, installed once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Command::Check { file } => match check::load(&file) {
            Ok(config) => {
                let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
                let upstreams = if names.is_empty() {
                    "no upstreams".to_string()
                } else {
                    format!("upstreams {}", names.join(", "))
                };
                let health = config
                    .grpc_health
                    .map(|h| format!("; grpc-health of 127.0.0.1:{}", h.port))
                    .unwrap_or_default();
                println!("{}: ok, {upstreams}{health}", file.display());
                ExitCode::SUCCESS
            }
            Err(lines) => fail(lines),
        },
        Command::Wait { admin, timeout } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime.map(|rt| rt.block_on(wait::until_live(admin, timeout))) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => fail(vec![format!("fanout-proxy wait: {e}")]),
                Err(e) => fail(vec![format!("fanout-proxy wait: {e}")]),
            }
        }
        Command::Run { config, threads } => {
            let config_lines = check::load(&config);
            let loaded = match config_lines {
                Ok(loaded) => loaded,
                Err(lines) => return fail(lines),
            };
            init_logging();
            // The engine has threads of its own; this runtime only runs discovery, health
            // checks and the admin.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime.map(|rt| rt.block_on(run(config, loaded, threads))) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => fail(vec![format!("fanout-proxy: {e}")]),
                Err(e) => fail(vec![format!("fanout-proxy: {e}")]),
            }
        }
    }
}

fn fail(lines: Vec<String>) -> ExitCode {
    for line in lines {
        eprintln!("{line}");
    }
    ExitCode::FAILURE
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    addr: SocketAddr,
    what: String,
    #[source]
    source: std::io::Error,
}

pub(crate) async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        addr,
        what: what.to_string(),
        source,
    })
}

/// Serves until SIGTERM or `POST /shutdown`, then drains; follows changes of the config file.
pub async fn run(path: PathBuf, mut config: ProxyConfig, threads: usize) -> Result<(), BindError> {
    let metrics = Arc::new(Metrics::default());
    let activity = Arc::new(Activity::default());
    let shutdown = Arc::new(Notify::new());
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let mut serving = Serving::start(&config, metrics.clone(), activity.clone(), threads).await?;
    let admin = Arc::new(Admin {
        upstreams: RwLock::new(serving.upstreams()),
        metrics,
        shutdown: shutdown.clone(),
        grpc_health: RwLock::new(
            config
                .grpc_health
                .clone()
                .map(|h| Arc::new(AppHealth::new(h))),
        ),
    });
    tracing::info!(listen = %config.admin.listen, "admin serving");
    tokio::spawn(admin::serve(admin_listener, admin.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| BindError {
            addr: config.admin.listen,
            what: "SIGTERM handler".into(),
            source,
        })?;
    let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut poll = tokio::time::interval(RELOAD_POLL);
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt: draining"); break }
            () = shutdown.notified() => { tracing::info!("shutdown requested: draining"); break }
            _ = poll.tick() => {
                let Ok(text) = std::fs::read_to_string(&path) else { continue };
                if text == last_text {
                    continue;
                }
                last_text = text;
                match ProxyConfig::from_json(&last_text) {
                    Ok(new) => {
                        if new.admin.listen != config.admin.listen {
                            tracing::warn!("admin.listen changed; it takes effect at the next start");
                        }
                        tracing::info!("config changed; applying");
                        serving.apply(&new).await;
                        serving.publish(&admin);
                        if new.grpc_health != config.grpc_health {
                            *admin.grpc_health.write().unwrap_or_else(|e| e.into_inner()) =
                                new.grpc_health.clone().map(|h| Arc::new(AppHealth::new(h)));
                        }
                        config = new;
                    }
                    Err(e) => {
                        for line in e.lines() {
                            tracing::warn!(fault = %line, "changed config refused; keeping the running one");
                        }
                    }
                }
            }
        }
    }
    drain(&activity, config.drain.quiet, config.drain.deadline).await;
    Ok(())
}

/// How often the config file is checked. The kubelet rewrites downward API files within
/// about a minute of an annotation change, so a second is plenty.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// Keeps serving (new connections too) until no stream was active for `quiet`, or `deadline`.
async fn drain(activity: &Activity, quiet: Duration, deadline: Duration) {
    let started = Instant::now();
    loop {
        if activity.idle_for() >= quiet {
            tracing::info!(waited = ?started.elapsed(), "drained: no active streams");
            return;
        }
        if started.elapsed() >= deadline {
            tracing::warn!(active = activity.active(), "drain deadline passed; exiting");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
