//! The discovery server as the chart runs it, for the suites that need one: a stand-in
//! Kubernetes API, the server's certificate, `fanout-webhook serve --discovery-listen` on a
//! fixed port, and proxies subscribed to it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fanout_certs::{Ca, service_dns_names, write_bundle};
use fanout_discovery::v1::discovery_client::DiscoveryClient;
use fanout_proxy_config::{
    Discovery, DiscoveryServer, DnsDiscovery, EndpointsDiscovery, ProxyConfig, ServicePort,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::fleet::endpoint_states;
use crate::kube_api::{KubeApi, SliceEndpoint, endpoint_slice, service};
use crate::proxy::{ProxyProcess, free_port, loopback_config, pod_ip};
use crate::webhook::{WebhookProcess, kubeconfig};

/// The stand-in API, a serving certificate for 127.0.0.1 and a fixed discovery port, so a
/// restarted server is found where the proxies look.
pub struct Setup {
    pub api: KubeApi,
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub port: u16,
}

impl Setup {
    pub async fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("discovery test CA", Duration::from_secs(3600)).unwrap();
        let names = service_dns_names("fanout-webhook", "fanout-system", "cluster.local");
        let serving = ca
            .issue_serving(
                &names,
                &["127.0.0.1".parse().unwrap()],
                Duration::from_secs(3600),
            )
            .unwrap();
        write_bundle(dir.path(), &ca, &serving).unwrap();
        Self {
            api: KubeApi::start().await,
            ca_pem: ca.cert_pem().to_string(),
            dir,
            port: free_port(),
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `fanout-webhook serve` with the discovery server on, rendering it into configs.
    pub fn start_server(&self, extra: &[&str]) -> WebhookProcess {
        let config = kubeconfig(self.dir.path(), self.api.addr);
        let address = self.address();
        let mut args = vec![
            "--no-lookup",
            "--discovery-listen",
            &address,
            "--discovery-address",
            &address,
            "--discovery-exclude-namespaces",
            "kube-system,fanout-system",
        ];
        args.extend(extra);
        WebhookProcess::start(self.dir.path(), &args, &[("KUBECONFIG", &config)]).unwrap()
    }

    pub fn discovery_server(&self) -> DiscoveryServer {
        DiscoveryServer {
            address: self.address(),
            ca: self.ca_pem.clone(),
        }
    }

    /// One HTTP/2 connection to the server, as one proxy holds.
    pub async fn connect(&self) -> DiscoveryClient<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("127.0.0.1");
        let channel = Endpoint::from_shared(format!("https://{}", self.address()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        DiscoveryClient::new(channel)
    }
}

/// The Service `shop/app`: the port most charts write, a name targeting the container port by
/// name.
pub fn app_service() -> Value {
    service("shop", "app", false, &[("grpc", 80, json!("rpc"))])
}

/// A proxy whose one upstream subscribes to shop/app, with DNS (that never answers) as fallback.
pub fn subscribed_proxy_config(setup: &Setup) -> (ProxyConfig, SocketAddr) {
    let fallback = Discovery::Dns(DnsDiscovery {
        nameservers: vec!["127.0.0.1:9".parse().unwrap()],
        ..DnsDiscovery::new("app.shop.svc.cluster.local", 1)
    });
    let (mut config, local) = loopback_config(
        Discovery::Endpoints(EndpointsDiscovery::new(
            "shop",
            "app",
            ServicePort::Name("grpc".into()),
            fallback,
        )),
        |_| {},
    );
    config.discovery_server = Some(setup.discovery_server());
    (config, local)
}

/// Waits until the proxy's endpoint set is `expected` (sorted).
pub async fn wait_for_addresses(proxy: &ProxyProcess, expected: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen: Vec<String> = endpoint_states(proxy)
            .await
            .into_iter()
            .map(|e| e.address)
            .collect();
        seen.sort();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `shop/app`'s EndpointSlice listing `count` backends on 127.0.0.2… at `port`, the server
/// started, and a proxy subscribed (logging into `log`, if given) that has them all: the
/// server (keep it), the proxy, and the app's address of the upstream.
pub async fn serve_app(
    setup: &Setup,
    port: u16,
    count: usize,
    log: Option<&std::path::Path>,
) -> (WebhookProcess, ProxyProcess, SocketAddr) {
    let endpoints: Vec<SliceEndpoint> = (0..count)
        .map(|i| SliceEndpoint::ready(pod_ip(i)))
        .collect();
    setup.api.apply(endpoint_slice(
        "shop",
        "app-1",
        "app",
        ("grpc", port),
        &endpoints,
    ));
    let server = setup.start_server(&[]);
    let (config, local) = subscribed_proxy_config(setup);
    let proxy = match log {
        Some(log) => ProxyProcess::start_logged(&config, log).await,
        None => ProxyProcess::start(&config).await,
    }
    .unwrap();
    let mut expected: Vec<String> = (0..count)
        .map(|i| format!("{}:{port}", pod_ip(i)))
        .collect();
    expected.sort();
    wait_for_addresses(&proxy, &expected).await;
    (server, proxy, local)
}
