//! The CPU time and memory of every process of a running stack, read from
//! `/proc`: the services, the Kafka nodes and Mosquitto from their pid files, Postgres
//! as its postmaster and every backend under it, and the load generator itself.

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One named group of processes: a pid file (and, for Postgres, the children
/// of that process too).
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid_file: Option<PathBuf>,
    pub with_children: bool,
}

/// The stack's processes as `infra/dev` lays out a state folder.
pub fn stack_processes(state_dir: &Path) -> Vec<Watched> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir.join("run")) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pid")).collect();
        files.sort();
        for p in files {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(Watched { name, pid_file: Some(p), with_children: false });
        }
    }
    // Every broker: mqtt/ is the first, mqtt-1/, mqtt-2/, … the others.
    let mut brokers: Vec<(usize, PathBuf)> = std::fs::read_dir(state_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let i = if name == "mqtt" { 0 } else { name.strip_prefix("mqtt-")?.parse().ok()? };
                    Some((i, e.path().join("mosquitto.pid")))
                })
                .collect()
        })
        .unwrap_or_default();
    brokers.sort();
    for (i, pid_file) in brokers {
        let name = if i == 0 { "mosquitto".to_owned() } else { format!("mosquitto-{i}") };
        out.push(Watched { name, pid_file: Some(pid_file), with_children: false });
    }
    out.push(Watched { name: "postgres".into(), pid_file: Some(state_dir.join("pg").join("postmaster.pid")), with_children: true });
    out
}

/// The load generator's own process.
pub fn this_process() -> Watched {
    Watched { name: "load-generator".into(), pid_file: None, with_children: true }
}

fn read_pid(w: &Watched) -> Option<u32> {
    match &w.pid_file {
        None => Some(std::process::id()),
        Some(f) => std::fs::read_to_string(f).ok()?.lines().next()?.trim().parse().ok(),
    }
}

/// `(utime + stime, cutime + cstime, ppid)` in clock ticks.
fn stat(pid: u32) -> Option<(u64, u64, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    Some((n(11)? + n(12)?, n(13)? + n(14)?, n(1)? as u32))
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(_, _, ppid)| ppid == parent))
        .collect()
}

/// One reading of a group: CPU ticks so far (reaped children included) and resident memory.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    pid: u32,
    ticks: u64,
    rss_kb: u64,
}

fn read(w: &Watched) -> Option<Reading> {
    let pid = read_pid(w)?;
    let (own, reaped, _) = stat(pid)?;
    let mut r = Reading { pid, ticks: own, rss_kb: rss_kb(pid) };
    if w.with_children {
        r.ticks += reaped;
        for c in children_of(pid) {
            if let Some((t, _, _)) = stat(c) {
                r.ticks += t;
                r.rss_kb += rss_kb(c);
            }
        }
    }
    Some(r)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// Watches groups of processes: CPU between [`Meter::start`] and
/// [`Meter::stop`], peak memory over [`Meter::sample`] calls.
pub struct Meter {
    groups: Vec<Watched>,
    tick: f64,
    start: BTreeMap<String, Reading>,
    peak_rss_kb: BTreeMap<String, u64>,
}

/// What one group of processes spent.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessCost {
    pub name: String,
    pub cpu_seconds: f64,
    /// CPU per ingested report, all of it.
    pub cpu_us_per_report: f64,
    /// CPU per report beyond what the process spends at rest (its idle rate
    /// measured before the run, times the run's length).
    pub marginal_us_per_report: Option<f64>,
    pub peak_rss_mb: f64,
    /// The process was replaced during the run (crash, restart): its figures
    /// count only the new process, from its start.
    pub restarted: bool,
}

impl Meter {
    pub fn new(groups: Vec<Watched>) -> Self {
        Self { groups, tick: clock_ticks(), start: BTreeMap::new(), peak_rss_kb: BTreeMap::new() }
    }

    /// The names of the groups that have a running process.
    pub fn found(&self) -> Vec<String> {
        self.groups.iter().filter(|g| read(g).is_some()).map(|g| g.name.clone()).collect()
    }

    /// Resident memory of every group now, in KB.
    pub fn rss_kb_now(&self) -> BTreeMap<String, u64> {
        self.groups.iter().filter_map(|g| Some((g.name.clone(), read(g)?.rss_kb))).collect()
    }

    /// CPU seconds of every group so far.
    pub fn cpu_now(&self) -> BTreeMap<String, f64> {
        self.groups.iter().filter_map(|g| Some((g.name.clone(), read(g)?.ticks as f64 / self.tick))).collect()
    }

    pub fn start(&mut self) {
        self.start = self.groups.iter().filter_map(|g| Some((g.name.clone(), read(g)?))).collect();
        self.peak_rss_kb.clear();
        self.sample();
    }

    /// Records memory (call every second or so).
    pub fn sample(&mut self) {
        for g in &self.groups {
            if let Some(r) = read(g) {
                let p = self.peak_rss_kb.entry(g.name.clone()).or_default();
                *p = (*p).max(r.rss_kb);
            }
        }
    }

    /// What each group spent since [`Meter::start`], per report; `idle` are
    /// CPU seconds per second at rest (for the marginal figure).
    pub fn stop(&mut self, reports: u64, elapsed_secs: f64, idle: Option<&BTreeMap<String, f64>>) -> Vec<ProcessCost> {
        self.sample();
        let per = |s: f64| if reports == 0 { 0.0 } else { s * 1e6 / reports as f64 };
        let mut out = Vec::new();
        for g in &self.groups {
            let (Some(a), Some(b)) = (self.start.get(&g.name), read(g)) else { continue };
            let restarted = a.pid != b.pid;
            let since = if restarted { 0 } else { a.ticks };
            let cpu = b.ticks.saturating_sub(since) as f64 / self.tick;
            let marginal = idle.and_then(|i| i.get(&g.name)).map(|rate| per((cpu - rate * elapsed_secs).max(0.0)));
            out.push(ProcessCost {
                name: g.name.clone(),
                cpu_seconds: cpu,
                cpu_us_per_report: per(cpu),
                marginal_us_per_report: marginal,
                peak_rss_mb: self.peak_rss_kb.get(&g.name).copied().unwrap_or(0) as f64 / 1024.0,
                restarted,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut m = Meter::new(vec![this_process()]);
        assert_eq!(m.found(), vec!["load-generator".to_owned()]);
        m.start();
        // Burn a little CPU so the reading moves.
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let costs = m.stop(1000, 0.05, None);
        assert_eq!(costs.len(), 1);
        assert!(costs[0].peak_rss_mb > 0.0, "{costs:?}");
        assert!(costs[0].cpu_seconds >= 0.0);
    }

    #[test]
    fn stat_parses_names_with_spaces_and_parentheses() {
        // Our own stat line parses; its ppid is a live process.
        let (_, _, ppid) = stat(std::process::id()).expect("own stat");
        assert!(std::path::Path::new(&format!("/proc/{ppid}")).exists());
    }
}
