//! Small measuring tools shared by the benchmarks.

use std::time::Duration;

/// Percentile (0–100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Counting from the state field (index 0 = field 3): utime = 11, stime = 12.
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

/// Seconds the threads of a process have spent runnable but not running, waiting in a run
/// queue for a CPU (the second field of `/proc/PID/task/*/schedstat`, nanoseconds). On a
/// machine the proxy shares with its clients and backends this, not its own work, is most of
/// what it adds to a call's time; 0 when unreadable.
pub fn cpu_wait_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let waited_ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    waited_ns as f64 / 1e9
}

fn clock_ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux configuration we run on.
    100.0
}

/// Resident memory of a process now and at its peak, in KiB (VmRSS, VmHWM).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The median of `values` (the upper one of an even count); `None` when there are none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// CPU seconds per 100k calls.
pub fn per_100k(cpu: Option<f64>, calls: u64) -> Option<f64> {
    cpu.map(|cpu| cpu * 100_000.0 / calls.max(1) as f64)
}

/// Runs `work` and returns its result with the CPU seconds `pid` spent meanwhile.
pub async fn with_cpu<T>(
    pid: Option<u32>,
    work: impl std::future::Future<Output = T>,
) -> (T, Option<f64>) {
    let (result, usage) = with_usage(pid, work).await;
    (result, usage.map(|u| u.cpu))
}

/// What a process spent during some work: CPU seconds, and seconds it waited for a CPU.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: f64,
    pub waited: f64,
}

/// As [`with_cpu`], with the time the process waited for a CPU too.
pub async fn with_usage<T>(
    pid: Option<u32>,
    work: impl std::future::Future<Output = T>,
) -> (T, Option<Usage>) {
    let before = pid.map(|pid| (cpu_seconds(pid), cpu_wait_seconds(pid)));
    let result = work.await;
    let spent = pid.zip(before).map(|(pid, (cpu, waited))| Usage {
        cpu: cpu_seconds(pid) - cpu,
        waited: cpu_wait_seconds(pid) - waited,
    });
    (result, spent)
}

/// Prints a results table and writes it to `out`.
pub fn publish(table: &str, out: &std::path::Path) -> std::io::Result<()> {
    print!("{table}");
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, table)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds(std::process::id()) > 0.0);
    }
}
