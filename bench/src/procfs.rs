//! What the kernel says about the contenders: CPU time and memory of a
//! server's whole process tree (LiteLLM runs workers as children), and CPU
//! steal of the machine, which on a shared VM explains most tail latency.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `utime`/`stime` in /proc/PID/stat. Linux has
/// reported 100 to user space on every mainstream architecture for decades.
const TICKS_PER_SECOND: f64 = 100.0;

/// `pid` and every process descended from it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent_of: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) {
                parent_of.insert(p, pp);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&(_, &pp)| pp == cur)
                .map(|(&p, _)| p),
        );
        i += 1;
    }
    out
}

/// The fields of /proc/PID/stat after the command name (which may hold
/// spaces): index 0 is the state, 1 the parent, 11 utime, 12 stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds used so far by `pids`.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| {
            let t = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / TICKS_PER_SECOND
        })
        .sum()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Resident memory of `pids` now, in MiB.
pub fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| status_kib(p, "VmRSS:")).sum::<u64>() as f64 / 1024.0
}

/// The most each of `pids` was ever resident, summed, in MiB.
pub fn peak_rss_mib(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| status_kib(p, "VmHWM:")).sum::<u64>() as f64 / 1024.0
}

/// The machine's CPU counters: (steal, total) in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTicks {
    steal: u64,
    total: u64,
}

impl CpuTicks {
    pub fn now() -> Self {
        let Ok(s) = fs::read_to_string("/proc/stat") else {
            return Self::default();
        };
        let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
            return Self::default();
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already inside user and nice).
        Self {
            steal: v.get(7).copied().unwrap_or(0),
            total: v.iter().take(8).sum(),
        }
    }

    /// Percent of all CPU time the host took from this VM since `earlier`.
    pub fn steal_percent_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.steal.saturating_sub(earlier.steal) as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(rss_mib(&[me]) > 0.0);
        assert!(peak_rss_mib(&[me]) >= rss_mib(&[me]) - 1.0);
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(&[me]) > 0.0);
        let a = CpuTicks::now();
        let b = CpuTicks::now();
        assert!(b.steal_percent_since(&a) >= 0.0);
    }
}
