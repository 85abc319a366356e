//! h2load (nghttp2), an independent load generator beside ours: so that no figure in the bench
//! depends on our own client alone. Saturation (`-m` streams per connection, as fast as they
//! are answered) and fixed rate (`--rps`, per-call times from `--log-file`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use fanout_e2e::backend::proto::EchoRequest;

/// One h2load run against `target`.
pub struct H2load {
    pub calls: u64,
    /// Calls that did not get HTTP 200 (h2load cannot see grpc-status).
    pub errors: u64,
    pub elapsed: Duration,
    /// Sorted; only for fixed-rate runs (from `--log-file`).
    pub latencies: Vec<Duration>,
}

impl H2load {
    pub fn installed() -> bool {
        Command::new("h2load")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `connections` × `streams` calls in flight for `seconds`.
    pub fn saturate(
        target: SocketAddr,
        connections: usize,
        streams: usize,
        seconds: u64,
    ) -> anyhow::Result<Self> {
        run(
            target,
            &[
                "-c",
                &connections.to_string(),
                "-m",
                &streams.to_string(),
                "-D",
                &seconds.to_string(),
            ],
            None,
        )
    }

    /// `rate` calls per second spread over `connections` (each may hold 8 in flight, so a slow
    /// answer does not hold the next calls back), with every call's time.
    pub fn fixed_rate(
        target: SocketAddr,
        connections: usize,
        rate: u64,
        seconds: u64,
    ) -> anyhow::Result<Self> {
        let log = scratch("log");
        let per_connection = rate as f64 / connections as f64;
        let result = run(
            target,
            &[
                "-c",
                &connections.to_string(),
                "-m",
                "8",
                "--rps",
                &format!("{per_connection:.3}"),
                "-D",
                &seconds.to_string(),
            ],
            Some(&log),
        );
        let _ = std::fs::remove_file(&log);
        result
    }
}

fn scratch(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fanout-bench-h2load-{}.{what}", std::process::id()))
}

fn run(target: SocketAddr, args: &[&str], log: Option<&PathBuf>) -> anyhow::Result<H2load> {
    let body = scratch("body");
    std::fs::write(
        &body,
        fanout_e2e::raw::frame(&EchoRequest {
            payload: vec![b'x'; 64],
            ..Default::default()
        }),
    )?;
    let mut command = Command::new("h2load");
    command.args(args).arg("-d").arg(&body).args([
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
    ]);
    if let Some(log) = log {
        command.arg("--log-file").arg(log);
    }
    let output = command
        .arg(format!("http://{target}/fanout.test.v1.Test/Unary"))
        .output();
    let _ = std::fs::remove_file(&body);
    let output = output?;
    let text = String::from_utf8_lossy(&output.stdout);
    let summary = parse_summary(&text)
        .ok_or_else(|| anyhow::anyhow!("h2load printed no summary: {}", text.trim()))?;
    let mut latencies = Vec::new();
    if let Some(log) = log {
        latencies = parse_log(&std::fs::read_to_string(log)?);
        latencies.sort();
    }
    Ok(H2load {
        latencies,
        ..summary
    })
}

/// "finished in 5.00s, …" and "requests: N total, … S succeeded, F failed, E errored, …".
fn parse_summary(text: &str) -> Option<H2load> {
    let finished = text.lines().find(|l| l.starts_with("finished in"))?;
    let seconds: f64 = finished
        .strip_prefix("finished in ")?
        .split(',')
        .next()?
        .trim()
        .strip_suffix('s')?
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let count = |what: &str| -> Option<u64> {
        requests
            .split(',')
            .find(|part| part.trim().ends_with(what))?
            .split_whitespace()
            .find_map(|word| word.parse().ok())
    };
    let succeeded = count("succeeded")?;
    let status = text.lines().find(|l| l.starts_with("status codes:"));
    // "status codes: N 2xx, …": a 200 with a failed grpc-status still counts as succeeded.
    let non_2xx = status.map_or(0, |line| {
        line.split(',')
            .filter(|part| !part.contains("2xx"))
            .filter_map(|part| part.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
            .sum()
    });
    Some(H2load {
        calls: succeeded.saturating_sub(non_2xx),
        errors: count("failed")? + count("errored")? + count("timeout")? + non_2xx,
        elapsed: Duration::from_secs_f64(seconds),
        latencies: Vec::new(),
    })
}

/// `--log-file` rows: start (µs since the epoch), HTTP status, µs to the end of the response.
fn parse_log(text: &str) -> Vec<Duration> {
    text.lines()
        .filter_map(|line| {
            let mut columns = line.split('\t');
            let status = columns.nth(1)?;
            let micros: u64 = columns.next()?.trim().parse().ok()?;
            (status == "200").then(|| Duration::from_micros(micros))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2loads_summary_and_log() {
        let text = "finished in 5.00s, 4991.20 req/s, 537.38KB/s\n\
            requests: 24960 total, 24960 started, 24958 done, 24950 succeeded, 8 failed, 2 errored, 0 timeout\n\
            status codes: 24950 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let run = parse_summary(text).unwrap();
        assert_eq!((run.calls, run.errors), (24950, 10));
        assert_eq!(run.elapsed, Duration::from_secs(5));
        let log =
            parse_log("1764590000000000\t200\t312\n1764590000000100\t503\t90\n1764\t200\t1250\n");
        assert_eq!(
            log,
            [Duration::from_micros(312), Duration::from_micros(1250)]
        );
    }
}
