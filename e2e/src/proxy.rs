//! `fanout-proxy run` as a child process, and the loopback fleet it balances over: test
//! backends on 127.0.0.2, 127.0.0.3, … (stand-ins for pod IPs) behind the test DNS server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fanout_proxy_config::{Discovery, ProxyConfig, UpstreamConfig};

use crate::backend::{Backend, Behaviour, Stats};
use crate::bins;

/// A free TCP port on 127.0.0.1 (released for the caller to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A config with one upstream `app.shop` listening on a free loopback port and the admin on
/// another; `tune` adjusts the upstream. Also returns the upstream's listen address.
pub fn loopback_config(
    discovery: Discovery,
    tune: impl FnOnce(&mut UpstreamConfig),
) -> (ProxyConfig, SocketAddr) {
    let local = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut upstream = UpstreamConfig::new("app.shop", local, discovery);
    tune(&mut upstream);
    let mut config = ProxyConfig::new(vec![upstream]);
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    (config, local)
}

/// `127.0.0.{n + 2}`: pod stand-ins start at 127.0.0.2.
pub fn pod_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n as u8))
}

/// `count` in-process backends `backend-0`… on 127.0.0.2… sharing one port, as the pods of one
/// Service do.
pub async fn spawn_backends(
    count: usize,
    behaviour: Behaviour,
) -> (u16, Vec<std::sync::Arc<Stats>>) {
    spawn_backends_on(count, 0, behaviour).await
}

/// As [`spawn_backends`], on `port` if it is free on every address (0: any port).
pub async fn spawn_backends_on(
    count: usize,
    port: u16,
    behaviour: Behaviour,
) -> (u16, Vec<std::sync::Arc<Stats>>) {
    spawn_backends_behaving(&vec![behaviour; count], port).await
}

/// As [`spawn_backends_on`], `backend-n` behaving as `behaviours[n]`.
pub async fn spawn_backends_behaving(
    behaviours: &[Behaviour],
    port: u16,
) -> (u16, Vec<std::sync::Arc<Stats>>) {
    let count = behaviours.len();
    let mut wanted = port;
    'attempt: for _ in 0..20 {
        let Ok(first) = tokio::net::TcpListener::bind((pod_ip(0), wanted)).await else {
            wanted = 0;
            continue;
        };
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for n in 1..count {
            match tokio::net::TcpListener::bind((pod_ip(n), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => {
                    wanted = 0;
                    continue 'attempt;
                }
            }
        }
        let mut stats = Vec::new();
        for (n, listener) in listeners.into_iter().enumerate() {
            let backend = Backend::new(format!("backend-{n}"), behaviours[n].clone());
            stats.push(backend.stats());
            tokio::spawn(backend.serve(listener, std::future::pending()));
        }
        return (port, stats);
    }
    panic!("no port free on every backend address");
}

/// `config` written to a file of its own under the temporary directory.
fn config_file(config: &ProxyConfig) -> std::io::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "fanout-proxy-{}-{}.json",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, config.to_json_pretty())?;
    Ok(path)
}

pub struct ProxyProcess {
    child: Child,
    pub admin: SocketAddr,
    _config: tempfile_path::TempPath,
}

mod tempfile_path {
    use std::path::PathBuf;

    /// A file removed on drop.
    pub struct TempPath(pub PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl ProxyProcess {
    /// Runs the proxy with `config` and waits until its admin endpoint is live.
    pub async fn start(config: &ProxyConfig) -> anyhow::Result<Self> {
        Self::start_file(config_file(config)?, config.admin.listen).await
    }

    /// Runs the proxy with `config` logging at `info` (JSON lines) into `log`.
    pub async fn start_logged(config: &ProxyConfig, log: &std::path::Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let path = config_file(config)?;
        Self::spawn(path, config.admin.listen, "info".into(), Stdio::from(file)).await
    }

    pub async fn start_file(path: PathBuf, admin: SocketAddr) -> anyhow::Result<Self> {
        let level = std::env::var("FANOUT_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(path, admin, level, Stdio::inherit()).await
    }

    /// Runs the proxy with `config` and these environment variables set (its flags' `FANOUT_*`).
    pub async fn start_with_env(
        config: &ProxyConfig,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let level = std::env::var("FANOUT_LOG").unwrap_or_else(|_| "warn".into());
        let path = config_file(config)?;
        let mut command = Self::command(path.clone(), level, Stdio::inherit());
        command.envs(env.iter().copied());
        Self::wait_live(command, path, config.admin.listen).await
    }

    async fn spawn(
        path: PathBuf,
        admin: SocketAddr,
        level: String,
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let command = Self::command(path.clone(), level, stderr);
        Self::wait_live(command, path, admin).await
    }

    /// `fanout-proxy run` with the config file at `path`.
    fn command(path: PathBuf, level: String, stderr: Stdio) -> Command {
        let mut command = Command::new(bins::path("fanout-proxy", "fanout-proxy"));
        command
            .args(["run", "--config"])
            .arg(&path)
            .env("FANOUT_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr);
        command
    }

    async fn wait_live(
        mut command: Command,
        path: PathBuf,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        let child = command.spawn()?;
        let mut proxy = Self {
            child,
            admin,
            _config: tempfile_path::TempPath(path),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = proxy.admin_get("/live").await {
                return Ok(proxy);
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                anyhow::bail!("fanout-proxy exited at start: {status}");
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "fanout-proxy not live within 20s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `GET path` on the admin port answers 200, up to `timeout`: `start` returns
    /// once the proxy is live, and its first endpoint connections may still be opening then.
    pub async fn wait_ok(&self, path: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.admin_get(path).await.map(|(status, _)| status);
            if let Ok(200) = status {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{path} not 200 within {timeout:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET` on the admin port: status and body.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        admin_request(self.admin, "GET", path).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn rss_kib(&self) -> (u64, u64) {
        crate::bench::rss_kib(self.pid())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request to an admin port.
pub async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
