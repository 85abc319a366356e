//! `fanout-test-backend` (or a peer implementation, such as the grpcio backend) as a child
//! process, for what only a process can show: a graceful stop on SIGTERM, a `kill -9`, a
//! restart on the same address.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bins;
use crate::proxy::pod_ip;

pub struct BackendProcess {
    pub addr: SocketAddr,
    pub id: String,
    /// The program and its first arguments; `--listen`, `--id` and `args` follow.
    program: Vec<std::ffi::OsString>,
    args: Vec<String>,
    child: Option<Child>,
}

impl BackendProcess {
    /// Starts `fanout-test-backend --listen addr --id id` with `args`; returns once it listens.
    pub async fn start(addr: SocketAddr, id: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_as(Implementation::Tonic.program()?, addr, id, args).await
    }

    async fn start_as(
        program: Vec<std::ffi::OsString>,
        addr: SocketAddr,
        id: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut backend = Self {
            addr,
            id: id.to_string(),
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        backend.restart().await?;
        Ok(backend)
    }

    /// Starts the process again (after a stop or a kill) on the same address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is still running", self.id);
        let child = Command::new(&self.program[0])
            .args(&self.program[1..])
            .args(["--listen", &self.addr.to_string(), "--id", &self.id])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                anyhow::bail!("{} exited at start: {status}", self.id);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("{} did not listen on {} within 10s", self.id, self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then waits for the graceful stop (GOAWAY, calls in flight finish); its exit
    /// code.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(pid) = self.pid() else {
            return Ok(None);
        };
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        self.wait_exit(timeout).await
    }

    /// `kill -9`: the process vanishes with its calls, as a node failing would take a pod.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            child.kill()?;
        }
        self.wait_exit(Duration::from_secs(5)).await.map(|_| ())
    }

    async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Which gRPC server a backend process runs.
#[derive(Debug, Clone, Copy)]
pub enum Implementation {
    /// `fanout-test-backend` (tonic, Rust).
    Tonic,
    /// `e2e/peers/grpcio_backend.py` (gRPC C-core through Python grpcio): the test service's
    /// unary call only.
    Grpcio,
}

impl Implementation {
    fn program(self) -> anyhow::Result<Vec<std::ffi::OsString>> {
        match self {
            Implementation::Tonic => Ok(vec![
                bins::path("fanout-e2e", "fanout-test-backend").into_os_string(),
            ]),
            Implementation::Grpcio => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/grpcio_backend.py");
                let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
                let check = Command::new(&python).args(["-c", "import grpc"]).output()?;
                anyhow::ensure!(
                    check.status.success(),
                    "{python} cannot import grpc: `pip install grpcio` (make python-deps does)"
                );
                Ok(vec![python.into(), script.into()])
            }
        }
    }
}

/// `count` backend processes `backend-0`… on 127.0.0.2… sharing one port, as the pods of one
/// Service do; backend `n` gets `args(n)`.
pub async fn on_pod_ips(
    count: usize,
    args: impl Fn(usize) -> Vec<&'static str>,
) -> (u16, Vec<BackendProcess>) {
    on_pod_ips_as(Implementation::Tonic, count, args).await
}

/// As [`on_pod_ips`], running `implementation`.
pub async fn on_pod_ips_as(
    implementation: Implementation,
    count: usize,
    args: impl Fn(usize) -> Vec<&'static str>,
) -> (u16, Vec<BackendProcess>) {
    let program = implementation
        .program()
        .expect("the backend program runs here");
    let port = std::net::TcpListener::bind((pod_ip(0), 0))
        .and_then(|l| l.local_addr())
        .expect("a free port on the first pod address")
        .port();
    let mut backends = Vec::new();
    for n in 0..count {
        let addr = SocketAddr::new(pod_ip(n), port);
        backends.push(
            BackendProcess::start_as(program.clone(), addr, &format!("backend-{n}"), &args(n))
                .await
                .expect("backend process starts"),
        );
    }
    (port, backends)
}
