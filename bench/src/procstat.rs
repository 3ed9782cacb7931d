//! CPU time and memory from `/proc`: a process tree's CPU seconds and RSS,
//! the system's busy time per CPU. The compare runner samples these before
//! and after each run; the clients report their own CPU with [`self_cpu`].
//!
//! A process tree's CPU is the sum over its live members of
//! utime + stime + cutime + cstime. A child that exits between two samples
//! and is reaped moves its time into its parent's cutime/cstime, so the
//! difference of two samples still counts it (websockify forks a process per
//! connection; nginx and haproxy keep workers).

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, almost always 100).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name, which may itself
/// contain spaces and parentheses (so split after the last ')').
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    Some(
        text[close + 1..]
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// Parent pid and CPU ticks (utime + stime + cutime + cstime) of one process.
/// Field numbers of proc(5), counted from `state` (field 3) at index 0.
fn ppid_and_ticks(pid: u32) -> Option<(u32, u64)> {
    let f = stat_fields(pid)?;
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = num(11)? + num(12)? + num(13)? + num(14)?;
    Some((ppid, ticks))
}

/// Every live pid with its parent.
fn all_parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = ppid_and_ticks(pid) {
                map.insert(pid, ppid);
            }
        }
    }
    map
}

/// `roots` and all their descendants that are alive now.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let parents = all_parents();
    let mut members: Vec<u32> = roots
        .iter()
        .copied()
        .filter(|p| parents.contains_key(p))
        .collect();
    let mut i = 0;
    while i < members.len() {
        let parent = members[i];
        for (&pid, &ppid) in &parents {
            if ppid == parent && !members.contains(&pid) {
                members.push(pid);
            }
        }
        i += 1;
    }
    members
}

/// CPU seconds used so far by the trees under `roots` (see the module doc).
pub fn tree_cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = tree(roots)
        .into_iter()
        .filter_map(|p| ppid_and_ticks(p).map(|(_, t)| t))
        .sum();
    ticks as f64 / clock_ticks()
}

/// Resident memory of the trees under `roots`, KiB (VmRSS summed).
pub fn tree_rss_kib(roots: &[u32]) -> u64 {
    tree(roots).into_iter().filter_map(rss_kib).sum()
}

/// Proportional memory of the trees under `roots`, KiB: each process's PSS
/// (`/proc/<pid>/smaps_rollup`), which splits pages shared between
/// processes (forked children, shared libraries) among them, so a process
/// per session is not charged the parent's pages again. Falls back to
/// VmRSS where smaps_rollup is missing (kernels before 4.14).
pub fn tree_pss_kib(roots: &[u32]) -> u64 {
    tree(roots)
        .into_iter()
        .filter_map(|p| pss_kib(p).or_else(|| rss_kib(p)))
        .sum()
}

/// PSS of one process, KiB.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// VmRSS of one process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds this process has used (utime + stime; children excluded).
pub fn self_cpu() -> f64 {
    let f = stat_fields(std::process::id()).unwrap_or_default();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (num(11) + num(12)) as f64 / clock_ticks()
}

/// Busy and total seconds of each CPU, from one read of `/proc/stat`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// Index = CPU number: (busy, total) seconds since boot.
    pub per_cpu: Vec<(f64, f64)>,
}

impl CpuTimes {
    pub fn now() -> Self {
        fs::read_to_string("/proc/stat")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// Parses `/proc/stat`: busy = user + nice + system + irq + softirq +
    /// steal; total adds idle and iowait. Guest time is already in user.
    pub fn parse(text: &str) -> Self {
        let mut per_cpu = Vec::new();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let Some(name) = parts.next() else { continue };
            let Some(n) = name.strip_prefix("cpu").filter(|n| !n.is_empty()) else {
                continue;
            };
            let Ok(index) = n.parse::<usize>() else {
                continue;
            };
            let v: Vec<u64> = parts.filter_map(|x| x.parse().ok()).collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
            let total = busy + at(3) + at(4);
            if per_cpu.len() <= index {
                per_cpu.resize(index + 1, (0.0, 0.0));
            }
            let t = clock_ticks();
            per_cpu[index] = (busy as f64 / t, total as f64 / t);
        }
        Self { per_cpu }
    }

    /// Busy seconds between `earlier` and `self` over all CPUs.
    pub fn busy_since(&self, earlier: &Self) -> f64 {
        self.busy_on_since(earlier, None)
    }

    /// Busy seconds between `earlier` and `self` on `cpus` (all if None).
    pub fn busy_on_since(&self, earlier: &Self, cpus: Option<&[usize]>) -> f64 {
        self.per_cpu
            .iter()
            .enumerate()
            .filter(|(i, _)| cpus.is_none_or(|c| c.contains(i)))
            .map(|(i, (busy, _))| busy - earlier.per_cpu.get(i).map_or(0.0, |e| e.0))
            .sum()
    }

    /// Busy fraction (0..=1 per CPU, averaged) on `cpus` between two reads.
    pub fn utilisation_since(&self, earlier: &Self, cpus: Option<&[usize]>) -> f64 {
        let mut busy = 0.0;
        let mut total = 0.0;
        for (i, (b, t)) in self.per_cpu.iter().enumerate() {
            if cpus.is_some_and(|c| !c.contains(&i)) {
                continue;
            }
            let (eb, et) = earlier.per_cpu.get(i).copied().unwrap_or((0.0, 0.0));
            busy += b - eb;
            total += t - et;
        }
        if total > 0.0 { busy / total } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_become_busy_and_total_per_cpu() {
        let t = clock_ticks();
        let text = "cpu  10 0 10 100 0 0 0 0 0 0\n\
                    cpu0 4 1 2 50 3 1 1 0 0 0\n\
                    cpu1 6 0 8 50 0 0 0 0 0 0\nintr 1 2 3\n";
        let c = CpuTimes::parse(text);
        assert_eq!(c.per_cpu.len(), 2);
        assert_eq!(c.per_cpu[0], (9.0 / t, 62.0 / t));
        assert_eq!(c.per_cpu[1], (14.0 / t, 64.0 / t));
        let zero = CpuTimes::parse("cpu0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0\n");
        assert!((c.busy_since(&zero) - 23.0 / t).abs() < 1e-9);
        assert!((c.busy_on_since(&zero, Some(&[1])) - 14.0 / t).abs() < 1e-9);
        assert!((c.utilisation_since(&zero, Some(&[1])) - 14.0 / 64.0).abs() < 1e-9);
    }

    #[test]
    fn own_process_tree_has_cpu_and_memory() {
        let me = std::process::id();
        // Burn a little CPU so the counters are non-zero at 100 Hz.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 42);
        assert!(tree(&[me]).contains(&me));
        assert!(tree_rss_kib(&[me]) > 0);
        assert!(tree_pss_kib(&[me]) > 0);
        assert!(pss_kib(me).unwrap() <= rss_kib(me).unwrap());
        assert!(tree_cpu_seconds(&[me]) > 0.0);
        assert!(self_cpu() > 0.0);
        assert!(tree(&[u32::MAX]).is_empty());
    }
}
