//! `fanout-webhook serve` as a child process on a loopback port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::bins;

pub struct WebhookProcess {
    child: Child,
    pub addr: SocketAddr,
    /// Log lines after start, for assertions.
    pub logs: mpsc::Receiver<String>,
}

impl WebhookProcess {
    /// Starts the server on `127.0.0.1:0` with the cert files in `certs` (tls.crt, tls.key) and
    /// extra `args`; returns once it listens.
    pub fn start(certs: &Path, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let (cert, key) = (certs.join("tls.crt"), certs.join("tls.key"));
        let mut all = vec!["--tls-cert", cert.to_str().unwrap_or_default()];
        all.extend(["--tls-key", key.to_str().unwrap_or_default()]);
        all.extend(args);
        Self::start_with(&all, envs)
    }

    /// Starts `serve` on `127.0.0.1:0` with `args` and `envs` only (e.g. `--cert-mode auto`);
    /// returns once it listens.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = Command::new(bins::path("fanout-webhook", "fanout-webhook"));
        command
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("KUBECONFIG")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    anyhow::bail!("webhook did not start; it said:\n{}", seen.join("\n"));
                }
            };
            if line.contains("serving admission reviews") {
                let log: serde_json::Value = serde_json::from_str(&line)?;
                let addr = log["listen"].as_str().unwrap_or_default().parse()?;
                return Ok(Self {
                    child,
                    addr,
                    logs: rx,
                });
            }
            seen.push(line);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it was not restarted or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory of the process now and at its peak, in KiB (VmRSS, VmHWM).
    pub fn rss_kib(&self) -> (u64, u64) {
        crate::bench::rss_kib(self.pid())
    }
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubeconfig in `dir` for a plain-HTTP API at `api`, as a client outside the cluster uses.
pub fn kubeconfig(dir: &Path, api: SocketAddr) -> String {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{api}\"}}\n\
             users:\n- name: fake\n  user: {{token: fake}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        ),
    )
    .expect("writing the kubeconfig");
    path.display().to_string()
}

/// The server name the API server dials the webhook by (its certificates name it).
pub const SERVER_NAME: &str = "fanout-webhook.fanout-system.svc";

/// Posts the recorded AdmissionReview `fixture` to the webhook at `addr` (trusting `ca_pem`), as
/// the API server does, and returns the pod as it would store it after the patch. Panics unless
/// the pod was allowed with a JSON patch.
pub async fn admitted_pod(addr: SocketAddr, ca_pem: &str, fixture: &str) -> serde_json::Value {
    use base64::Engine;
    let body = crate::fixtures::reviews()
        .into_iter()
        .find(|(name, _)| name == fixture)
        .map(|(_, body)| body)
        .unwrap_or_else(|| panic!("no fixture {fixture}"));
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut conn = crate::https::Connection::open(addr, SERVER_NAME, ca_pem.as_bytes())
        .await
        .unwrap();
    let (status, response) = conn.post("/mutate?timeout=5s", body).await.unwrap();
    assert_eq!(status, 200);
    let review: serde_json::Value = serde_json::from_slice(&response).unwrap();
    assert_eq!(review["response"]["allowed"], true, "{review}");
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(review["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}
