//! The `fanout-webhook` command line: `serve` and `inject`.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admission::Admitter;
use crate::autocert::{self, api::CertApi};
use crate::discovery::{self, DiscoveryService, Hub, Limits};
use crate::lookup::{KubeLookup, NoLookup, ServiceLookup};
use crate::metrics::Metrics;
use crate::settings::{
    DiscoveryTarget, NativeSidecarMode, ProxyResources, Readiness, Settings, SharedPem,
    version_has_native_sidecars,
};
use crate::tls::{ReloadingCert, error_chain, install_provider};
use crate::{manifest, quantity, server};
use fanout_proxy_config::discovery::{holds_certificate, server_host};

#[derive(Parser)]
#[command(
    name = "fanout-webhook",
    version,
    about = "Injects the fanout gRPC balancing proxy into pods"
)]
struct Cli {
    /// Log format; default json when stderr is not a terminal.
    #[arg(long, global = true, env = "FANOUT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve admission reviews over HTTPS.
    Serve(Box<ServeArgs>),
    /// Inject manifests offline: YAML in, YAML out.
    Inject(Box<InjectArgs>),
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, env = "FANOUT_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// files: serve --tls-cert/--tls-key, reloaded when they change (cert-manager, your own
    /// Secret). auto: keep a CA and serving certificate in a Secret and the caBundle current.
    #[arg(long, env = "FANOUT_CERT_MODE", default_value = "files")]
    cert_mode: CertMode,
    #[arg(long, env = "FANOUT_TLS_CERT", required_if_eq("cert_mode", "files"))]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "FANOUT_TLS_KEY", required_if_eq("cert_mode", "files"))]
    tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "FANOUT_CERT_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    cert_reload_interval: Duration,
    #[command(flatten)]
    auto: AutoCertArgs,
    #[command(flatten)]
    discovery: DiscoveryArgs,
    #[command(flatten)]
    settings: SettingsArgs,
}

/// The discovery server (`serve`), on its own port with the webhook's certificate.
#[derive(Args)]
struct DiscoveryArgs {
    /// Serve discovery here (e.g. 0.0.0.0:15012); unset: no discovery server.
    #[arg(long, env = "FANOUT_DISCOVERY_LISTEN")]
    discovery_listen: Option<SocketAddr>,
    /// Namespaces whose Services are not served (comma-separated).
    #[arg(
        long,
        env = "FANOUT_DISCOVERY_EXCLUDE_NAMESPACES",
        value_delimiter = ','
    )]
    discovery_exclude_namespaces: Vec<String>,
    #[arg(long, env = "FANOUT_DISCOVERY_MAX_CONNECTIONS", default_value_t = Limits::default().connections)]
    discovery_max_connections: usize,
    #[arg(long, env = "FANOUT_DISCOVERY_MAX_WATCHES_PER_CONNECTION", default_value_t = Limits::default().watches_per_connection)]
    discovery_max_watches_per_connection: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CertMode {
    Files,
    Auto,
}

/// Where self-managed certificates live and whom they serve (`--cert-mode auto`).
#[derive(Args)]
struct AutoCertArgs {
    /// The webhook's namespace (the chart passes the pod's own).
    #[arg(long, env = "FANOUT_NAMESPACE", required_if_eq("cert_mode", "auto"))]
    namespace: Option<String>,
    /// The Service the API server dials; the certificate names it.
    #[arg(long, env = "FANOUT_SERVICE", required_if_eq("cert_mode", "auto"))]
    service: Option<String>,
    /// The Secret holding ca.crt, ca.key, tls.crt and tls.key.
    #[arg(long, env = "FANOUT_CERT_SECRET", required_if_eq("cert_mode", "auto"))]
    cert_secret: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(
        long,
        env = "FANOUT_WEBHOOK_CONFIGURATION",
        required_if_eq("cert_mode", "auto")
    )]
    webhook_configuration: Option<String>,
    /// How often the Secret and caBundle are checked.
    #[arg(long, env = "FANOUT_CERT_CHECK_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    cert_check_interval: Duration,
}

#[derive(Args)]
struct InjectArgs {
    /// Manifest file; - for standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    file: String,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Args)]
struct SettingsArgs {
    /// Make no Kubernetes API calls: ports are used as given, names as headless DNS.
    #[arg(long, env = "FANOUT_NO_LOOKUP")]
    no_lookup: bool,
    #[arg(long, env = "FANOUT_PROXY_IMAGE")]
    proxy_image: Option<String>,
    #[arg(
        long,
        env = "FANOUT_PROXY_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    proxy_image_pull_policy: String,
    /// Empty leaves it unset.
    #[arg(long, env = "FANOUT_PROXY_CPU_REQUEST", default_value = "10m")]
    proxy_cpu_request: String,
    #[arg(long, env = "FANOUT_PROXY_CPU_LIMIT", default_value = "")]
    proxy_cpu_limit: String,
    #[arg(long, env = "FANOUT_PROXY_MEMORY_REQUEST", default_value = "16Mi")]
    proxy_memory_request: String,
    #[arg(long, env = "FANOUT_PROXY_MEMORY_LIMIT", default_value = "64Mi")]
    proxy_memory_limit: String,
    #[arg(long, env = "FANOUT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// auto: native sidecars on Kubernetes ≥ 1.29 or where the pod already uses one.
    #[arg(long, env = "FANOUT_NATIVE_SIDECAR", default_value = "auto")]
    native_sidecar: NativeSidecarMode,
    /// FANOUT_LOG of injected proxies (e.g. info, debug, fanout_proxy=debug); empty: their default.
    #[arg(long, env = "FANOUT_PROXY_LOG_LEVEL", default_value = "")]
    proxy_log_level: String,
    /// The proxy's readiness probe: proxy (whether it can serve) or upstreams (and whether
    /// every upstream has a ready endpoint); pods override it with fanout.dev/readiness.
    #[arg(long, env = "FANOUT_PROXY_READINESS", default_value = "proxy")]
    proxy_readiness: Readiness,
    /// The discovery server proxies subscribe to (host:port, a name its certificate carries);
    /// empty: proxies find endpoints through DNS alone.
    #[arg(long, env = "FANOUT_DISCOVERY_ADDRESS", default_value = "")]
    discovery_address: String,
    /// PEM CAs the proxies trust for the discovery server. `serve` defaults to the CA of its own
    /// certificate (the self-managed Secret's ca.crt, or ca.crt beside --tls-cert).
    #[arg(
        long,
        env = "FANOUT_DISCOVERY_CA_FILE",
        conflicts_with = "discovery_ca"
    )]
    discovery_ca_file: Option<PathBuf>,
    /// The same as PEM text (the chart passes a Secret's caBundle this way).
    #[arg(long, env = "FANOUT_DISCOVERY_CA")]
    discovery_ca: Option<String>,
    /// Bound on each Service lookup.
    #[arg(long, env = "FANOUT_LOOKUP_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    lookup_timeout: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    fanout_proxy_config::duration::parse(text)
}

impl SettingsArgs {
    /// The settings, and the lookup to use; asks the API server its version for `auto`.
    async fn build(&self) -> anyhow::Result<(Settings, Arc<dyn ServiceLookup>)> {
        let mut faults = Vec::new();
        let mut quantity = |flag: &str, value: &str| -> Option<String> {
            let value = value.trim();
            if value.is_empty() {
                return None;
            }
            if let Err(message) = quantity::parse(value) {
                faults.push(format!("--{flag}: {message}"));
            }
            Some(value.to_string())
        };
        let resources = ProxyResources {
            cpu_request: quantity("proxy-cpu-request", &self.proxy_cpu_request),
            cpu_limit: quantity("proxy-cpu-limit", &self.proxy_cpu_limit),
            memory_request: quantity("proxy-memory-request", &self.proxy_memory_request),
            memory_limit: quantity("proxy-memory-limit", &self.proxy_memory_limit),
        };
        let proxy_log_level =
            Some(self.proxy_log_level.trim().to_string()).filter(|level| !level.is_empty());
        if let Some(level) = &proxy_log_level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            faults.push(format!(
                "--proxy-log-level: {level:?} is not a log filter: {e}"
            ));
        }
        let discovery_address = self.discovery_address.trim();
        let discovery = if discovery_address.is_empty() {
            None
        } else {
            let checked = |pem: String, source: String| {
                if holds_certificate(&pem) {
                    Ok(pem)
                } else {
                    Err(format!("{source} holds no PEM certificate"))
                }
            };
            let ca = match (&self.discovery_ca_file, &self.discovery_ca) {
                (Some(path), _) => {
                    let source = format!("--discovery-ca-file: {}", path.display());
                    std::fs::read_to_string(path)
                        .map_err(|e| format!("{source}: {e}"))
                        .and_then(|pem| checked(pem, source))
                }
                (None, Some(pem)) => checked(pem.clone(), "--discovery-ca:".into()),
                (None, None) => Ok(String::new()),
            };
            let ca = ca.unwrap_or_else(|fault| {
                faults.push(fault);
                String::new()
            });
            if let Err(fault) = server_host(discovery_address) {
                faults.push(format!("--discovery-address: {fault}"));
            }
            Some(DiscoveryTarget {
                address: discovery_address.to_string(),
                ca: SharedPem::new(ca),
            })
        };
        if !faults.is_empty() {
            bail!("{}", faults.join("\n"));
        }
        let mut settings = Settings {
            resources,
            image_pull_policy: self.proxy_image_pull_policy.clone(),
            cluster_domain: self.cluster_domain.trim_matches('.').to_string(),
            native_sidecar: self.native_sidecar,
            proxy_log_level,
            readiness: self.proxy_readiness,
            discovery,
            ..Settings::default()
        };
        if let Some(image) = &self.proxy_image {
            settings.proxy_image = image.clone();
        }
        if self.no_lookup {
            return Ok((settings, Arc::new(NoLookup)));
        }
        let client = kube::Client::try_default().await.context(
            "no Kubernetes API to look Services up (give --no-lookup to inject without one)",
        )?;
        if settings.native_sidecar == NativeSidecarMode::Auto {
            match client.apiserver_version().await {
                Ok(info) => {
                    settings.cluster_has_native_sidecars =
                        version_has_native_sidecars(&info.major, &info.minor);
                    tracing::info!(version = %info.git_version,
                        native_sidecars = settings.cluster_has_native_sidecars, "API server version");
                }
                Err(e) => tracing::warn!(error = %error_chain(&e),
                    "could not ask the API server its version; assuming no native sidecars"),
            }
        }
        Ok((
            settings,
            Arc::new(KubeLookup::new(client, self.lookup_timeout)),
        ))
    }
}

fn init_logging(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FANOUT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    install_provider();
    // Two workers match the small CPU request a webhook gets; more threads would only add RSS.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => {
            init_logging(cli.log_format);
            runtime.block_on(serve(*args))
        }
        Command::Inject(args) => {
            init_logging(Some(cli.log_format.unwrap_or(LogFormat::Text)));
            runtime.block_on(inject(*args))
        }
    }
}

/// The certificate to serve, kept current in the background.
async fn serving_cert(
    args: &ServeArgs,
    cluster_domain: &str,
) -> anyhow::Result<Arc<ReloadingCert>> {
    if args.cert_mode == CertMode::Files {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!("--tls-cert and --tls-key are required with --cert-mode files");
        };
        let cert = Arc::new(
            ReloadingCert::load(cert.clone(), key.clone())
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
        );
        tokio::spawn(cert.clone().watch(args.cert_reload_interval));
        return Ok(cert);
    }
    let auto = &args.auto;
    let (Some(namespace), Some(service), Some(secret), Some(webhook)) = (
        &auto.namespace,
        &auto.service,
        &auto.cert_secret,
        &auto.webhook_configuration,
    ) else {
        bail!(
            "--cert-mode auto needs --namespace, --service, --cert-secret and --webhook-configuration"
        );
    };
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API for self-managed certificates")?;
    let api = || CertApi::new(client.clone(), namespace, secret, webhook);
    let names = fanout_certs::service_dns_names(service, namespace, cluster_domain);
    let cert = autocert::start(&api(), &names).await;
    tokio::spawn(autocert::keep_current(
        api(),
        names,
        cert.clone(),
        auto.cert_check_interval,
    ));
    Ok(cert)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (mut settings, lookup) = args.settings.build().await?;
    let cert = serving_cert(&args, &settings.cluster_domain).await?;
    if let Some(target) = &mut settings.discovery
        && target.ca.get().is_empty()
    {
        // Shared, not copied: renewals reach the next rendered config.
        target.ca = cert.ca.clone();
    }
    let tls = cert
        .server_config()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.send_replace(true);
    });
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let metrics = Arc::new(Metrics::default());
    let discovery_server = match args.discovery.discovery_listen {
        Some(addr) => {
            let server = serve_discovery(
                &args.discovery,
                addr,
                tls.clone(),
                shutdown(),
                metrics.clone(),
            )
            .await?;
            Some(tokio::spawn(server))
        }
        None => None,
    };
    tracing::info!(listen = %listener.local_addr()?, image = %settings.proxy_image,
        native_sidecar = %settings.native_sidecar,
        discovery = settings.discovery.as_ref().map(|d| d.address.as_str()).unwrap_or("off"),
        "serving admission reviews");
    let admitter = Arc::new(Admitter {
        settings,
        lookup,
        metrics,
    });
    server::serve(
        listener,
        tls,
        server::app(admitter),
        shutdown(),
        Duration::from_secs(10),
        10_000,
    )
    .await;
    if let Some(discovery) = discovery_server {
        let _ = discovery.await;
    }
    Ok(())
}

/// Binds the discovery port and starts the watches; the returned future serves until
/// `shutdown`.
async fn serve_discovery(
    args: &DiscoveryArgs,
    addr: SocketAddr,
    mut tls: rustls::ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    metrics: Arc<Metrics>,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let client = kube::Client::try_default()
        .await
        .context("the discovery server needs the Kubernetes API")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for discovery"))?;
    // gRPC is HTTP/2 only.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let hub = Hub::new();
    tokio::spawn(discovery::watch::run(client, hub.clone()));
    {
        let (hub, metrics) = (hub.clone(), metrics.clone());
        tokio::spawn(async move {
            hub.synced().await;
            metrics.discovery_synced.set(1);
        });
    }
    let limits = Limits {
        watches_per_connection: args.discovery_max_watches_per_connection.max(1),
        connections: args.discovery_max_connections.max(1),
    };
    let excluded: Vec<String> = args
        .discovery_exclude_namespaces
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    tracing::info!(listen = %listener.local_addr()?, ?excluded, "serving discovery");
    let service = DiscoveryService::new(hub, excluded, limits, metrics);
    Ok(server::serve(
        listener,
        tls,
        discovery::app(service),
        shutdown,
        Duration::from_secs(1),
        limits.connections,
    ))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let (settings, lookup) = args.settings.build().await?;
    let input = if args.file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let (output, reports) =
        manifest::inject_yaml(&input, &args.namespace, &settings, lookup.as_ref())
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    for report in reports {
        eprintln!("{}: {}", report.object, report.result);
    }
    print!("{output}");
    Ok(())
}
