//! Shards: one process holds at most ~20,000 descriptors here (components.md),
//! so a fleet larger than `--devices-per-process` is connected by several
//! processes. The first households stay in the main process (the probes are
//! among them); each further range runs in a child `homelink load-shard`,
//! which connects its devices, publishes its share of the rate on the main
//! process's signal, and reports on stdout, one JSON line at a time:
//!
//! - `{"t":"progress","connected":…,"published":…,"notPublished":…,"acked":…,"refused":…}` every 500 ms;
//! - `{"t":"done",…,"ackedSeqs":[[household, device, seq],…],"pubackUs":[…]}` once its run drained.
//!
//! The main process writes `go` on the child's stdin to start the schedule;
//! closing stdin stops the child.

use super::devices::{self, Acks, Device};
use super::fleet::{Fleet, FleetHousehold};
use crate::sim::Target;
use homelink_kit::shutdown::CancellationToken;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Household ranges `[from, to)`, each with at most `per_process` devices
/// (a household is never split; one larger than that gets a range alone).
pub fn split(households: &[FleetHousehold], per_process: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut from, mut n) = (0, 0);
    for (i, h) in households.iter().enumerate() {
        if n > 0 && n + h.devices.len() > per_process {
            out.push((from, i));
            (from, n) = (i, 0);
        }
        n += h.devices.len();
    }
    if from < households.len() {
        out.push((from, households.len()));
    }
    out
}

/// What a shard process is told.
#[derive(Debug, Clone)]
pub struct ShardArgs {
    pub fleet: PathBuf,
    pub from: usize,
    pub to: usize,
    pub host: String,
    pub port: u16,
    pub ca_file: PathBuf,
    pub rate: f64,
    pub ramp: Duration,
    pub duration: Duration,
    pub connect_concurrency: usize,
}

impl ShardArgs {
    fn to_args(&self) -> Vec<String> {
        vec![
            "load-shard".into(),
            "--fleet".into(),
            self.fleet.display().to_string(),
            "--from".into(),
            self.from.to_string(),
            "--to".into(),
            self.to.to_string(),
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--ca-file".into(),
            self.ca_file.display().to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--ramp-secs".into(),
            self.ramp.as_secs_f64().to_string(),
            "--duration-secs".into(),
            self.duration.as_secs_f64().to_string(),
            "--connect-concurrency".into(),
            self.connect_concurrency.to_string(),
        ]
    }
}

/// One line of a shard's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub t: String,
    pub connected: u64,
    pub published: u64,
    pub not_published: u64,
    pub acked: u64,
    pub refused: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked_seqs: Vec<(Uuid, Uuid, u64)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub puback_us: Vec<u32>,
}

/// The child side: `homelink load-shard`.
pub async fn serve(a: ShardArgs) -> crate::Result<()> {
    let fleet: Fleet = serde_json::from_slice(&std::fs::read(&a.fleet)?)?;
    let homes = fleet.households.get(a.from..a.to.min(fleet.households.len())).unwrap_or_default();
    let target = Target { host: a.host.clone(), port: a.port, ca_pem: std::fs::read_to_string(&a.ca_file)? };
    let cancel = CancellationToken::new();
    let acks = Arc::new(Acks::default());
    let handshakes = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let devs: Vec<Arc<Device>> = homes
        .iter()
        .flat_map(|h| h.devices.iter().map(move |d| (h.id, d)))
        .map(|(h, d)| devices::spawn(d, h, false, &target, acks.clone(), handshakes.clone(), cancel.clone()))
        .collect();
    let counters = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let line = |t: &str| Line {
        t: t.into(),
        connected: devs.iter().filter(|d| d.connected.load(Ordering::Relaxed)).count() as u64,
        published: counters.0.load(Ordering::Relaxed),
        not_published: counters.1.load(Ordering::Relaxed),
        acked: acks.count.load(Ordering::Relaxed),
        refused: acks.refused.load(Ordering::Relaxed),
        ..Default::default()
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let mut out = tokio::io::stdout();
    // Until `go` (or the end of stdin): progress lines.
    loop {
        tokio::select! {
            _ = every.tick() => emit(&mut out, &line("progress")).await?,
            l = stdin.next_line() => match l? {
                Some(l) if l.trim() == "go" => break,
                Some(_) => {}
                None => return Ok(()),
            },
        }
    }
    let mut o = super::Options::new(1, 1, a.rate);
    (o.ramp, o.duration) = (a.ramp, a.duration);
    let schedule = super::publish_schedule(&devs, &o, &counters, |_| {});
    tokio::pin!(schedule);
    loop {
        tokio::select! {
            _ = &mut schedule => break,
            _ = every.tick() => emit(&mut out, &line("progress")).await?,
        }
    }
    // Drain: every publish answered (or 15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while acks.count.load(Ordering::Relaxed) + acks.refused.load(Ordering::Relaxed) < counters.0.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut done = line("done");
    done.acked_seqs = devs.iter().map(|d| (d.household_id, d.id, d.acked_seq.load(Ordering::Relaxed))).collect();
    // Each connection hands over its PUBACK samples when it stops.
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let samples = std::mem::take(&mut *acks.samples_us.lock().unwrap_or_else(|e| e.into_inner()));
    // At most 50,000 samples per shard, evenly thinned.
    let step = samples.len().div_ceil(50_000).max(1);
    done.puback_us = samples.into_iter().step_by(step).collect();
    emit(&mut out, &done).await?;
    Ok(())
}

async fn emit(out: &mut tokio::io::Stdout, line: &Line) -> crate::Result<()> {
    let mut b = serde_json::to_vec(line)?;
    b.push(b'\n');
    out.write_all(&b).await?;
    out.flush().await?;
    Ok(())
}

/// The main process's handle on a running shard.
pub struct Shard {
    pub range: (usize, usize),
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    latest: Arc<Mutex<Line>>,
    done: Arc<Mutex<Option<Line>>>,
}

impl Shard {
    /// Starts `homelink load-shard` for `args` (`exe`: the `homelink`
    /// executable; `None`: this one).
    pub fn spawn(exe: Option<&std::path::Path>, args: &ShardArgs) -> crate::Result<Self> {
        let exe = match exe {
            Some(e) => e.to_path_buf(),
            None => std::env::current_exe()?,
        };
        let mut child = tokio::process::Command::new(exe)
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| crate::Error::Protocol("shard without stdout".into()))?;
        let (latest, done): (Arc<Mutex<Line>>, Arc<Mutex<Option<Line>>>) = Default::default();
        let (l, d) = (latest.clone(), done.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let Ok(line) = serde_json::from_str::<Line>(&text) else { continue };
                if line.t == "done" {
                    *d.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
                } else {
                    *l.lock().unwrap_or_else(|e| e.into_inner()) = line;
                }
            }
        });
        Ok(Self { range: (args.from, args.to), stdin: child.stdin.take(), child, latest, done })
    }

    /// The latest progress line.
    pub fn latest(&self) -> Line {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the shard's schedule.
    pub async fn go(&mut self) -> crate::Result<()> {
        if let Some(s) = self.stdin.as_mut() {
            s.write_all(b"go\n").await?;
            s.flush().await?;
        }
        Ok(())
    }

    /// Waits for the shard's final report (`None` if it ended without one by `deadline`).
    pub async fn finish(&mut self, deadline: Instant) -> Option<Line> {
        loop {
            if let Some(l) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Some(l);
            }
            if Instant::now() >= deadline || self.child.try_wait().ok().flatten().is_some() {
                // One last look: the line may have landed just now.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Closes its stdin (it stops) and waits briefly for it to exit.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn homes(sizes: &[usize]) -> Vec<FleetHousehold> {
        sizes.iter().map(|n| FleetHousehold { id: Uuid::new_v4(), devices: (0..*n).map(|_| dummy()).collect() }).collect()
    }

    fn dummy() -> super::super::fleet::FleetDevice {
        super::super::fleet::FleetDevice {
            id: Uuid::new_v4(),
            kind: homelink_events::DeviceKind::Light,
            cert_pem: String::new(),
            key_pem: String::new(),
            port: None,
        }
    }

    #[test]
    fn ranges_hold_whole_households_within_the_limit() {
        assert_eq!(split(&homes(&[2, 2, 2, 2, 2]), 4), vec![(0, 2), (2, 4), (4, 5)]);
        assert_eq!(split(&homes(&[2, 2, 2]), 100), vec![(0, 3)]);
        // A household larger than the limit is a range of its own.
        assert_eq!(split(&homes(&[1, 7, 1]), 4), vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(split(&homes(&[]), 4), Vec::<(usize, usize)>::new());
    }
}
