//! The processes a benchmark run puts side by side: 10 test backends, and the proxies in front
//! of them (fanout, HAProxy, nginx), each a child process whose CPU and memory we can read.
//!
//! Every proxy gets one thread (HAProxy `nbthread 1`, nginx one worker, fanout's default), as a
//! sidecar would: the comparison is per CPU second, not per machine.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fanout_e2e::backend::proto::StatsRequest;
use fanout_e2e::backend::proto::test_client::TestClient;
use fanout_e2e::backend_process::BackendProcess;
use fanout_e2e::proxy::{ProxyProcess, free_port, pod_ip};
use fanout_proxy_config::{Discovery, ProxyConfig, UpstreamConfig};

pub const BACKENDS: usize = 10;

/// Child processes killed when dropped.
pub struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Backends {
    _processes: Vec<BackendProcess>,
    pub addrs: Vec<SocketAddr>,
}

impl Backends {
    /// 10 `fanout-test-backend` processes on 127.0.0.2–11, one port.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind((pod_ip(0), 0))?
            .local_addr()?
            .port();
        let mut processes = Vec::new();
        for n in 0..BACKENDS {
            let addr = SocketAddr::new(pod_ip(n), port);
            processes.push(BackendProcess::start(addr, &format!("backend-{n}"), &[]).await?);
        }
        let addrs = processes.iter().map(|p| p.addr).collect();
        Ok(Self {
            _processes: processes,
            addrs,
        })
    }

    /// Calls each backend has served so far, in address order.
    pub async fn calls(&self) -> anyhow::Result<Vec<u64>> {
        let mut calls = Vec::new();
        for addr in &self.addrs {
            let mut client = TestClient::connect(format!("http://{addr}")).await?;
            calls.push(client.stats(StatsRequest {}).await?.into_inner().calls);
        }
        Ok(calls)
    }
}

async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("{what} did not listen on {addr} within 10s")
}

/// Waits until the proxy has a connection up to every one of its `endpoints` (it opens them
/// in the background).
async fn wait_connected(proxy: &ProxyProcess, endpoints: usize) -> anyhow::Result<()> {
    for _ in 0..600 {
        let (_, body) = proxy.admin_get("/endpoints").await?;
        if body.matches("\"state\": \"ready\"").count() == endpoints {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the proxy did not connect to its {endpoints} endpoints within 30s")
}

/// A proxy under test: where clients connect, and the process to measure.
pub struct Peer {
    pub name: &'static str,
    pub listen: SocketAddr,
    pub pid: u32,
    /// The process (killed on drop) and its config directory.
    _owned: Box<dyn std::any::Any + Send>,
}

impl Peer {
    /// fanout-proxy as it runs by default.
    pub async fn fanout(backends: &[SocketAddr]) -> anyhow::Result<Self> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut config = ProxyConfig::new(vec![UpstreamConfig::new(
            "app.bench",
            listen,
            Discovery::Static(backends.to_vec()),
        )]);
        config.admin.listen = format!("127.0.0.1:{}", free_port()).parse()?;
        let proxy = ProxyProcess::start(&config).await?;
        wait_connected(&proxy, backends.len()).await?;
        Ok(Self {
            name: "fanout",
            listen,
            pid: proxy.pid(),
            _owned: Box::new(proxy),
        })
    }

    /// `fanout-wire`'s engine alone (binary `fanout-wire-spike`) in front of a fixed set of
    /// endpoints, without the proxy around it: what the data path costs by itself.
    pub async fn wire_spike(backends: &[SocketAddr]) -> anyhow::Result<Self> {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let dir = tempfile::tempdir()?;
        let program = fanout_e2e::bins::path("fanout-wire", "fanout-wire-spike");
        let child = spawn(
            Command::new(program)
                .arg("--listen")
                .arg(listen.to_string())
                .args(backends.iter().map(SocketAddr::to_string)),
            &dir,
        )?;
        Self::other("wire spike", listen, child, dir).await
    }

    /// HAProxy with HTTP/2 on both sides and `balance roundrobin`; `None` when not installed.
    pub async fn haproxy(backends: &[SocketAddr]) -> anyhow::Result<Option<Self>> {
        if !installed("haproxy", "-v") {
            return Ok(None);
        }
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, haproxy_config(listen, backends))?;
        let child = spawn(
            Command::new("haproxy").arg("-db").arg("-f").arg(&config),
            &dir,
        )?;
        Self::other("HAProxy", listen, child, dir).await.map(Some)
    }

    /// nginx with `grpc_pass` to an upstream of the backends; `None` when not installed.
    pub async fn nginx(backends: &[SocketAddr]) -> anyhow::Result<Option<Self>> {
        if !installed("nginx", "-v") {
            return Ok(None);
        }
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, nginx_config(listen, backends, dir.path()))?;
        let child = spawn(
            Command::new("nginx")
                .arg("-c")
                .arg(&config)
                .arg("-p")
                .arg(dir.path()),
            &dir,
        )?;
        Self::other("nginx", listen, child, dir).await.map(Some)
    }

    async fn other(
        name: &'static str,
        listen: SocketAddr,
        child: Child,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let pid = child.id();
        let children = Children(vec![child]);
        if let Err(error) = wait_listening(listen, name).await {
            let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
            anyhow::bail!("{error}: {}", stderr.trim());
        }
        Ok(Self {
            name,
            listen,
            pid,
            _owned: Box::new((children, dir)),
        })
    }
}

/// Starts a peer in the foreground, its stderr kept in `dir` for when it fails to start.
fn spawn(command: &mut Command, dir: &tempfile::TempDir) -> anyhow::Result<Child> {
    Ok(command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log"))?)
        .spawn()?)
}

fn installed(program: &str, version_flag: &str) -> bool {
    Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut config = String::from(
        "global\n  nbthread 1\n  maxconn 4000\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 1h\n  timeout server 1h\n",
    );
    config.push_str(&format!(
        "frontend grpc\n  bind {listen} proto h2\n  default_backend app\n\
         backend app\n  balance roundrobin\n"
    ));
    for (n, addr) in backends.iter().enumerate() {
        config.push_str(&format!("  server b{n} {addr} proto h2\n"));
    }
    config
}

pub fn nginx_config(listen: SocketAddr, backends: &[SocketAddr], dir: &Path) -> String {
    let servers: String = backends
        .iter()
        .map(|addr| format!("    server {addr};\n"))
        .collect();
    let dir = dir.display();
    // One worker without a master, so the measured pid is the one doing the work. nginx closes
    // a connection after `keepalive_requests` calls (1,000 by default), which would look like
    // failures to a load generator holding 4 connections: raised on both sides.
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log crit;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n\
         proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
         uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
         keepalive_requests 10000000;\n  keepalive_timeout 1h;\n\
         upstream app {{\n{servers}    keepalive 64;\n    keepalive_requests 10000000;\n  }}\n\
         server {{\n    listen {listen} http2;\n    http2_max_concurrent_streams 1024;\n\
         location / {{ grpc_pass grpc://app; }}\n  }}\n}}\n"
    )
}
