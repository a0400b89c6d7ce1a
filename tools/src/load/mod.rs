//! `homelink load`: the load generator. It provisions a fleet of households
//! and devices through the public API (cached for reruns), connects every
//! device over mutual TLS as a real device does, publishes state reports at a
//! total rate with a ramp, and measures from outside:
//!
//! - offered vs acknowledged rate and PUBACK latency;
//! - report → subscription latency from probe devices, with a live
//!   `graphql-transport-ws` subscriber per probe household, and whether any
//!   change never reached the subscriber (missing) or was overtaken by a
//!   later one (coalesced);
//! - the command round trip (HTTP accepted → device received) under the load;
//! - the projector's consumer lag over time;
//! - CPU seconds and peak memory of every process of the stack, per report,
//!   also beyond each process's cost at rest (measured before the run);
//! - at the end, that every acknowledged report is reflected: each device's
//!   shadow `seq` is at least its last acknowledged `seq`.
//!
//! Its own cost is part of the summary (`load-generator`).

pub mod devices;
pub mod fleet;
pub mod procs;
pub mod shard;

use crate::bench::Percentiles;
use crate::endpoints::Endpoints;
use crate::gql::Subscription;
use crate::sim::{self, DeviceSpec, Observed, Target};
use devices::{Acks, Device};
use homelink_kit::shutdown::CancellationToken;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use uuid::Uuid;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub households: usize,
    pub devices_per_household: usize,
    /// Reports per second, all devices together, after the ramp.
    pub rate: f64,
    /// From 0 to `rate`, linearly.
    pub ramp: Duration,
    /// At `rate`, after the ramp.
    pub duration: Duration,
    /// Households with a live subscriber measuring report → subscription.
    pub probes: usize,
    /// Commands per second to the command probe during the run (0: none).
    pub commands_per_sec: f64,
    /// How long the stack's CPU at rest is measured before the run.
    pub idle: Duration,
    /// How long to wait after the run for every report to be reflected.
    pub settle: Duration,
    pub provision_concurrency: usize,
    pub connect_concurrency: usize,
    /// Where the fleet is cached (`None`: always provision).
    pub fleet_cache: Option<PathBuf>,
    /// An existing installer account to provision with (`None`: sign up a new one).
    pub installer: Option<fleet::Installer>,
    /// The stack's state folder, for its pid files (`None`: only this process is measured).
    pub state_dir: Option<PathBuf>,
    pub progress: bool,
    /// Most devices one process connects (one holds ~20,000 descriptors
    /// here); a larger fleet runs the rest in `homelink load-shard` children.
    pub devices_per_process: usize,
    /// The reconnect storm: once connected, restart every broker of the
    /// stack (`state_dir`) and measure how long until every device is back.
    pub restart_brokers: bool,
    /// The `homelink` executable that runs shards (`None`: this executable).
    pub shard_exe: Option<PathBuf>,
}

impl Options {
    pub fn new(households: usize, devices_per_household: usize, rate: f64) -> Self {
        Self {
            households,
            devices_per_household,
            rate,
            ramp: Duration::from_secs(5),
            duration: Duration::from_secs(30),
            probes: 4,
            commands_per_sec: 2.0,
            idle: Duration::from_secs(3),
            settle: Duration::from_secs(60),
            provision_concurrency: 16,
            connect_concurrency: 64,
            fleet_cache: None,
            installer: None,
            state_dir: None,
            progress: false,
            devices_per_process: 15_000,
            restart_brokers: false,
            shard_exe: None,
        }
    }

    /// Reports due `t` after the start.
    fn due(&self, t: f64) -> f64 {
        let ramp = self.ramp.as_secs_f64();
        let end = ramp + self.duration.as_secs_f64();
        let t = t.min(end);
        if t < ramp {
            self.rate * t * t / (2.0 * ramp)
        } else {
            self.rate * ramp / 2.0 + self.rate * (t - ramp)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub households: usize,
    pub devices: usize,
    pub fleet_reused: bool,
    pub connected: usize,
    pub connect_seconds: f64,
    pub offered_rate: f64,
    pub ramp_seconds: f64,
    pub steady_seconds: f64,
    /// Reports handed to the device connections.
    pub published: u64,
    /// Reports the schedule wanted but a connection was down or full.
    pub not_published: u64,
    /// Reports the broker acknowledged with Success.
    pub acked: u64,
    pub refused: u64,
    /// Acknowledged reports per second over the steady phase.
    pub achieved_rate: f64,
    pub puback: Option<Percentiles>,
    pub report_to_subscription: ProbeSummary,
    pub command_round_trip: CommandSummary,
    /// `[seconds since the start, records]`, the projector's consumer lag.
    pub lag: Vec<(f64, i64)>,
    pub processes: Vec<procs::ProcessCost>,
    /// CPU per report of every stack process together (the load generator excluded).
    pub stack_cpu_us_per_report: f64,
    pub stack_marginal_us_per_report: Option<f64>,
    pub verification: Verification,
    /// Processes that held the fleet's connections (this one and its shards).
    pub load_processes: usize,
    /// Brokers' and bridge's memory before and after the fleet connected.
    pub memory: Option<MemorySummary>,
    /// The reconnect storm, when asked for.
    pub reconnect: Option<ReconnectSummary>,
    /// A resumed subscription's replay, when there were probe households.
    pub catch_up: Option<CatchUpSummary>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemorySummary {
    /// Every broker and the device bridge together, before any fleet device connected.
    pub before_mb: f64,
    pub after_mb: f64,
    pub connected: usize,
    /// `(after - before) / connected`.
    pub per_device_kb: f64,
    /// The same per process (MB before → after).
    pub by_process: BTreeMap<String, (f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReconnectSummary {
    pub devices: usize,
    pub brokers_restarted: usize,
    /// From the restart until every device was connected again (`None`: not within the limit).
    pub all_back_seconds: Option<f64>,
    /// `[seconds since the restart, devices connected]`.
    pub timeline: Vec<(f64, u64)>,
    pub errors: Vec<String>,
}

/// The command lifecycle (issue 11), read back with `command(id)` after the
/// run: how long each step took after `requestedAt`.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LifecycleSummary {
    pub commands: usize,
    /// Final statuses and how many ended in each.
    pub statuses: BTreeMap<String, usize>,
    pub requested_to_delivered: Option<Percentiles>,
    pub requested_to_acked: Option<Percentiles>,
    pub requested_to_confirmed: Option<Percentiles>,
}

/// A subscription resumed `after: 0` on a probe household once the run is
/// over: how fast it replays the retained changes.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CatchUpSummary {
    pub changes: usize,
    pub seconds: f64,
    pub changes_per_sec: f64,
    /// Whether the `changeSeq`s came 1, 2, 3, … without a gap.
    pub gap_free: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSummary {
    pub probes: usize,
    /// Acknowledged reports of probe devices.
    pub reports: usize,
    /// Seen on the subscription with their own `seq`.
    pub seen: usize,
    /// Never seen, but a later report of the same device was: overtaken.
    pub coalesced: usize,
    /// Never seen, and nothing later either.
    pub missing: usize,
    pub latency: Option<Percentiles>,
    pub subscription_errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct CommandSummary {
    pub sent: usize,
    pub received: usize,
    pub accepted: Option<Percentiles>,
    pub device_received: Option<Percentiles>,
    pub errors: Vec<String>,
    /// Every step of the probe commands' lives, from their server-side times.
    pub lifecycle: Option<LifecycleSummary>,
}

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub devices_checked: usize,
    /// Devices whose shadow is behind their last acknowledged report.
    pub devices_behind: usize,
    /// Up to ten of them: `(device, shadow seq, acknowledged seq)`.
    pub examples: Vec<(Uuid, i64, u64)>,
    pub errors: Vec<String>,
}

impl Summary {
    /// Nothing acknowledged was lost and nothing went silently missing.
    pub fn lossless(&self) -> bool {
        self.verification.devices_behind == 0 && self.verification.errors.is_empty() && self.report_to_subscription.missing == 0
    }
}

fn percentiles_us(mut us: Vec<u32>) -> Option<Percentiles> {
    if us.is_empty() {
        return None;
    }
    let mut d: Vec<Duration> = us.drain(..).map(|u| Duration::from_micros(u as u64)).collect();
    Some(Percentiles::of(&mut d))
}

fn percentiles(mut d: Vec<Duration>) -> Option<Percentiles> {
    (!d.is_empty()).then(|| Percentiles::of(&mut d))
}

fn bar(progress: bool, len: u64, template: &str) -> ProgressBar {
    let b = if progress { ProgressBar::new(len) } else { ProgressBar::hidden() };
    b.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    b
}

/// Runs the load against the stack of `endpoints`.
pub async fn run(endpoints: &Endpoints, o: &Options) -> crate::Result<Summary> {
    if o.households == 0 || o.devices_per_household == 0 || o.rate <= 0.0 {
        return Err(crate::Error::Protocol("households, devices per household and rate must be positive".into()));
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let api = endpoints.command_api.as_str();
    let (fleet, reused) = fleet::load_or_provision(
        &http,
        api,
        o.fleet_cache.as_deref(),
        o.installer.as_ref(),
        o.households,
        o.devices_per_household,
        o.provision_concurrency,
        o.progress,
    )
    .await?;
    let target = Target {
        host: endpoints.mqtt_device.host.clone(),
        port: endpoints.mqtt_device.port,
        ca_pem: std::fs::read_to_string(&endpoints.mqtt_device.ca_cert)?,
    };
    let cancel = CancellationToken::new();
    let _stop_all = cancel.clone().drop_guard();
    // Access tokens live 5 minutes, runs longer: signed in again every 2.
    let fresh = Token::keep(http.clone(), api.to_owned(), fleet.account.clone(), cancel.clone());

    // The stack's processes, measured from before the fleet connects.
    let mut groups = o.state_dir.as_deref().map(procs::stack_processes).unwrap_or_default();
    groups.push(procs::this_process());
    let mut meter = procs::Meter::new(groups);
    let rss_before = meter.rss_kb_now();

    // Connect the fleet: the first households here, the rest in shard processes.
    let total_devices = fleet.devices();
    let ranges = shard::split(&fleet.households, o.devices_per_process.max(1));
    let local_end = ranges.first().map(|r| r.1).unwrap_or(0);
    let mut shards = Vec::new();
    if ranges.len() > 1 {
        let fleet_file = match &o.fleet_cache {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!("homelink-fleet-{}.json", Uuid::new_v4().simple()));
                fleet::write_private(&p, &serde_json::to_vec(&fleet)?)?;
                p
            }
        };
        for (from, to) in &ranges[1..] {
            let n: usize = fleet.households[*from..*to].iter().map(|h| h.devices.len()).sum();
            shards.push(shard::Shard::spawn(
                o.shard_exe.as_deref(),
                &shard::ShardArgs {
                    fleet: fleet_file.clone(),
                    from: *from,
                    to: *to,
                    host: target.host.clone(),
                    port: target.port,
                    ca_file: endpoints.mqtt_device.ca_cert.clone().into(),
                    rate: o.rate * n as f64 / total_devices as f64,
                    ramp: o.ramp,
                    duration: o.duration,
                    connect_concurrency: o.connect_concurrency,
                },
            )?);
        }
    }
    let acks = Arc::new(Acks::default());
    let handshakes = Arc::new(Semaphore::new(o.connect_concurrency.max(1)));
    let probes = o.probes.min(local_end);
    let started = Instant::now();
    let mut devs: Vec<Arc<Device>> = Vec::with_capacity(total_devices);
    for (i, h) in fleet.households[..local_end].iter().enumerate() {
        for (j, d) in h.devices.iter().enumerate() {
            devs.push(devices::spawn(d, h.id, i < probes && j == 0, &target, acks.clone(), handshakes.clone(), cancel.clone()));
        }
    }
    let connected_now = |devs: &[Arc<Device>], shards: &[shard::Shard]| {
        devs.iter().filter(|d| d.connected.load(Ordering::Relaxed)).count()
            + shards.iter().map(|s| s.latest().connected as usize).sum::<usize>()
    };
    let b = bar(o.progress, total_devices as u64, "connecting {bar:40} {pos}/{len} devices ({elapsed})");
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(total_devices as u64 * 5);
    let connected = loop {
        let n = connected_now(&devs, &shards);
        b.set_position(n as u64);
        if n == total_devices || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    b.finish_and_clear();
    let connect_seconds = started.elapsed().as_secs_f64();
    if connected == 0 {
        return Err(crate::Error::Protocol("no device could connect".into()));
    }
    // Let the connections settle (online statuses, broker bookkeeping) before reading memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let memory = Some(memory_summary(&rss_before, &meter.rss_kb_now(), connected));

    let reconnect = if o.restart_brokers {
        let r = storm(o, total_devices, || connected_now(&devs, &shards)).await;
        // Said at once: the run after it may still fail.
        eprintln!("reconnect storm: {} brokers restarted, every device back after {:?} s", r.brokers_restarted, r.all_back_seconds);
        Some(r)
    } else {
        None
    };

    // Probe subscribers: `(device, seq) → when it arrived`.
    let seen: Arc<Mutex<HashMap<Uuid, HashMap<u64, Instant>>>> = Arc::default();
    let sub_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    for h in fleet.households.iter().take(probes) {
        let probe_device = h.devices[0].id;
        // A fresh token: connecting a large fleet outlasts one.
        let mut sub = Subscription::start(
            &endpoints.graphql_ws,
            &fresh.get(),
            "subscription($h: ID!) { deviceChanges(householdId: $h) { deviceId shadow { seq } } }",
            json!({"h": h.id}),
        )
        .await?;
        let (seen, errors, cancel) = (seen.clone(), sub_errors.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let next = tokio::select! { _ = cancel.cancelled() => return, n = sub.next() => n };
                match next {
                    Ok(d) => {
                        let at = Instant::now();
                        let c = &d["deviceChanges"];
                        if c["deviceId"].as_str().and_then(|s| s.parse::<Uuid>().ok()) != Some(probe_device) {
                            continue;
                        }
                        if let Some(seq) = c["shadow"]["seq"].as_u64() {
                            seen.lock().unwrap_or_else(|e| e.into_inner()).entry(probe_device).or_default().entry(seq).or_insert(at);
                        }
                    }
                    Err(e) => {
                        errors.lock().unwrap_or_else(|e| e.into_inner()).push(e.to_string());
                        return;
                    }
                }
            }
        });
    }

    // The command probe: a simulated light that answers commands.
    let (obs_tx, obs_rx) = mpsc::unbounded_channel();
    if o.commands_per_sec > 0.0 {
        let light = &fleet.command_probe.devices[0];
        let spec = DeviceSpec {
            household_id: fleet.command_probe.id,
            device_id: light.id,
            kind: light.kind,
            cert_pem: light.cert_pem.clone(),
            key_pem: light.key_pem.clone(),
            interval: None,
            port: light.port,
        };
        tokio::spawn(sim::run(spec, target.clone(), Some(obs_tx), cancel.clone()));
    }

    // The stack at rest.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = if o.idle > Duration::ZERO {
        let (a, t) = (meter.cpu_now(), Instant::now());
        tokio::time::sleep(o.idle).await;
        let (b, secs) = (meter.cpu_now(), t.elapsed().as_secs_f64());
        Some(b.iter().filter_map(|(k, v)| Some((k.clone(), (v - a.get(k)?) / secs))).collect::<BTreeMap<_, _>>())
    } else {
        None
    };

    // The run.
    let run_stop = CancellationToken::new();
    let commands = tokio::spawn(command_loop(
        http.clone(),
        endpoints.graphql.clone(),
        format!("{api}/v1/households/{}/devices/{}/commands", fleet.command_probe.id, fleet.command_probe.devices[0].id),
        fresh.clone(),
        o.commands_per_sec,
        obs_rx,
        run_stop.clone(),
    ));
    let lag: Arc<Mutex<Vec<(f64, i64)>>> = Arc::default();
    meter.start();
    let t0 = Instant::now();
    let lag_task = tokio::spawn(sample_lag(http.clone(), endpoints.metrics.clone(), t0, lag.clone(), cancel.clone()));
    let total = o.ramp + o.duration;
    let b = bar(o.progress, total.as_secs(), "load {bar:30} {pos}/{len} s  {msg}");
    for s in &mut shards {
        s.go().await?;
    }
    let acked_all = |shards: &[shard::Shard]| acks.count.load(Ordering::Relaxed) + shards.iter().map(|s| s.latest().acked).sum::<u64>();
    let mut steady_from: Option<(Instant, u64)> = None;
    let mut last_acked = 0u64;
    // This process's share of the rate; the shards publish theirs.
    let mut local = o.clone();
    local.rate = o.rate * devs.len() as f64 / total_devices as f64;
    let counters = (std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0));
    publish_schedule(&devs, &local, &counters, |second| {
        if steady_from.is_none() && Duration::from_secs(second) >= o.ramp {
            steady_from = Some((Instant::now(), acked_all(&shards)));
        }
        meter.sample();
        let a = acked_all(&shards);
        let l = lag.lock().unwrap_or_else(|e| e.into_inner()).last().map(|x| x.1).unwrap_or(0);
        b.set_position(second);
        let t = second as f64;
        b.set_message(format!("{:>6.0}/s offered  {:>6}/s acked  lag {l}", o.rate.min(o.due(t) - o.due(t - 1.0)), a - last_acked));
        last_acked = a;
    })
    .await;
    b.finish_and_clear();
    run_stop.cancel();
    let steady_to = (Instant::now(), acked_all(&shards));
    let (mut published, mut not_published) = (counters.0.load(Ordering::Relaxed), counters.1.load(Ordering::Relaxed));

    // Drain: every publish answered, then every acknowledged report reflected.
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while acks.count.load(Ordering::Relaxed) + acks.refused.load(Ordering::Relaxed) < published && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acked = acks.count.load(Ordering::Relaxed);
    let mut refused = acks.refused.load(Ordering::Relaxed);
    let mut acked_seqs: Vec<(Uuid, Uuid, u64)> = devs.iter().map(|d| (d.household_id, d.id, d.acked_seq.load(Ordering::Relaxed))).collect();
    let mut shard_samples = Vec::new();
    let mut shard_errors = Vec::new();
    for s in &mut shards {
        match s.finish(Instant::now() + Duration::from_secs(60)).await {
            Some(done) => {
                published += done.published;
                not_published += done.not_published;
                acked += done.acked;
                refused += done.refused;
                acked_seqs.extend(done.acked_seqs);
                shard_samples.extend(done.puback_us);
            }
            None => shard_errors.push(format!("the shard of households {:?} ended without its report", s.range)),
        }
    }
    let load_processes = 1 + shards.len();
    for s in shards {
        s.stop().await;
    }
    let mut verification = verify(&http, &endpoints.graphql, &fresh, &acked_seqs, Instant::now() + o.settle).await;
    verification.errors.extend(shard_errors);
    let elapsed = t0.elapsed().as_secs_f64();
    let processes = meter.stop(acked, elapsed, idle.as_ref());
    lag_task.abort();
    let command_round_trip = commands.await.unwrap_or_default();
    let catch_up = match fleet.households.first().filter(|_| probes > 0) {
        Some(h) => Some(replay(&endpoints.graphql_ws, &fresh.get(), h.id).await),
        None => None,
    };

    // Probe analysis.
    let mut report_to_subscription =
        ProbeSummary { probes, subscription_errors: sub_errors.lock().unwrap_or_else(|e| e.into_inner()).clone(), ..Default::default() };
    let mut lat = Vec::new();
    {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        for d in devs.iter().filter(|d| d.probe_sent.is_some()) {
            let acked_seq = d.acked_seq.load(Ordering::Relaxed);
            let sent = d.probe_sent.as_ref().map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default();
            let got = seen.get(&d.id).cloned().unwrap_or_default();
            let latest_seen = got.keys().max().copied().unwrap_or(0);
            for (seq, at) in sent.into_iter().filter(|(s, _)| *s <= acked_seq) {
                report_to_subscription.reports += 1;
                match got.get(&seq) {
                    Some(arrived) => {
                        report_to_subscription.seen += 1;
                        lat.push(arrived.saturating_duration_since(at));
                    }
                    None if latest_seen > seq => report_to_subscription.coalesced += 1,
                    None => report_to_subscription.missing += 1,
                }
            }
        }
    }
    report_to_subscription.latency = percentiles(lat);

    let stack: Vec<&procs::ProcessCost> = processes.iter().filter(|p| p.name != "load-generator").collect();
    let stack_cpu_us_per_report = stack.iter().map(|p| p.cpu_us_per_report).sum();
    let stack_marginal_us_per_report = idle.as_ref().map(|_| stack.iter().filter_map(|p| p.marginal_us_per_report).sum());
    let (achieved_rate, steady_seconds) = match (steady_from, steady_to) {
        (Some((a, na)), (b, nb)) if b > a => ((nb - na) as f64 / (b - a).as_secs_f64(), (b - a).as_secs_f64()),
        _ => (0.0, 0.0),
    };
    // Each connection hands over its PUBACK samples when it stops.
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut samples = std::mem::take(&mut *acks.samples_us.lock().unwrap_or_else(|e| e.into_inner()));
    samples.extend(shard_samples);
    let lag = lag.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Summary {
        households: fleet.households.len(),
        devices: total_devices,
        fleet_reused: reused,
        connected,
        connect_seconds,
        offered_rate: o.rate,
        ramp_seconds: o.ramp.as_secs_f64(),
        steady_seconds,
        published,
        not_published,
        acked,
        refused,
        achieved_rate,
        puback: percentiles_us(samples),
        report_to_subscription,
        command_round_trip,
        lag,
        processes,
        stack_cpu_us_per_report,
        stack_marginal_us_per_report,
        verification,
        load_processes,
        memory,
        reconnect,
        catch_up,
    })
}

/// Resumes a household subscription `after: 0` and reads until it has been
/// quiet for 2 s: the retained changes replayed, and their rate.
async fn replay(ws: &str, token: &str, household: Uuid) -> CatchUpSummary {
    let mut out = CatchUpSummary { gap_free: true, ..Default::default() };
    let query = "subscription($h: ID!) { householdChanges(householdId: $h, after: 0) { changeSeq } }";
    let mut sub = match Subscription::start(ws, token, query, json!({"h": household})).await {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let (mut first, mut last) = (None, Instant::now());
    let mut expected = 1;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            Ok(Ok(v)) => {
                last = Instant::now();
                first.get_or_insert(last);
                out.changes += 1;
                let seq = v["householdChanges"]["changeSeq"].as_u64().unwrap_or(0);
                out.gap_free &= seq == expected;
                expected = seq + 1;
            }
            Ok(Err(e)) => {
                out.errors.push(e.to_string());
                break;
            }
            Err(_) => break,
        }
    }
    out.seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    out.changes_per_sec = if out.seconds > 0.0 { out.changes as f64 / out.seconds } else { 0.0 };
    out
}

/// Reads every probe command back (`command(id)`) and measures each step
/// after its request.
async fn lifecycle(http: &reqwest::Client, graphql: &str, token: &str, ids: &[Uuid]) -> LifecycleSummary {
    let mut out = LifecycleSummary { commands: ids.len(), ..Default::default() };
    let (mut delivered, mut acked, mut confirmed) = (Vec::new(), Vec::new(), Vec::new());
    let q = "query($id: ID!) { command(id: $id) { status requestedAt deliveredAt ackedAt confirmedAt } }";
    let at = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok());
    for id in ids {
        let Ok(r) = crate::gql::query(http, graphql, token, q, json!({"id": id})).await else { continue };
        let c = &r["data"]["command"];
        *out.statuses.entry(c["status"].as_str().unwrap_or("unknown").to_owned()).or_default() += 1;
        let Some(requested) = at(&c["requestedAt"]) else { continue };
        for (field, into) in [("deliveredAt", &mut delivered), ("ackedAt", &mut acked), ("confirmedAt", &mut confirmed)] {
            if let Some(t) = at(&c[field]) {
                into.push((t - requested).to_std().unwrap_or_default());
            }
        }
    }
    out.requested_to_delivered = percentiles(delivered);
    out.requested_to_acked = percentiles(acked);
    out.requested_to_confirmed = percentiles(confirmed);
    out
}

/// Publishes over `devs` at `o.rate` along `o`'s ramp and duration, round
/// robin; `counters` = (published, not published: every connection down or
/// full); calls `every_second` once a second with the seconds elapsed.
pub(crate) async fn publish_schedule(
    devs: &[Arc<Device>],
    o: &Options,
    counters: &(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
    mut every_second: impl FnMut(u64),
) {
    let total = o.ramp + o.duration;
    let t0 = Instant::now();
    let (mut published, mut not_published) = (0u64, 0u64);
    let mut next_device = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_second = 0u64;
    loop {
        tick.tick().await;
        let t = t0.elapsed();
        if t >= total {
            break;
        }
        let due = o.due(t.as_secs_f64()) as u64;
        let mut misses = 0usize;
        while !devs.is_empty() && published + not_published < due {
            let d = &devs[next_device % devs.len()];
            next_device = next_device.wrapping_add(1);
            if d.publish_next() {
                published += 1;
                misses = 0;
            } else {
                misses += 1;
                if misses >= devs.len() {
                    // Every connection is down or full: this report is not offered to any.
                    not_published += 1;
                    misses = 0;
                }
            }
        }
        counters.0.store(published, Ordering::Relaxed);
        counters.1.store(not_published, Ordering::Relaxed);
        if t.as_secs() > last_second {
            last_second = t.as_secs();
            every_second(last_second);
        }
    }
}

fn memory_summary(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, connected: usize) -> MemorySummary {
    let mut m = MemorySummary { connected, ..Default::default() };
    for (name, a) in after.iter().filter(|(n, _)| n.starts_with("mosquitto") || *n == "device-bridge") {
        let b = before.get(name).copied().unwrap_or(0);
        m.by_process.insert(name.clone(), (b as f64 / 1024.0, *a as f64 / 1024.0));
        m.before_mb += b as f64 / 1024.0;
        m.after_mb += *a as f64 / 1024.0;
    }
    if connected > 0 {
        m.per_device_kb = (m.after_mb - m.before_mb).max(0.0) * 1024.0 / connected as f64;
    }
    m
}

/// The reconnect storm: restarts every broker of the stack at once and
/// waits until `connected()` is back at `devices` (at most 5 minutes).
async fn storm(o: &Options, devices: usize, connected: impl Fn() -> usize) -> ReconnectSummary {
    let mut r = ReconnectSummary { devices, ..Default::default() };
    let Some(state) = o.state_dir.as_deref() else {
        r.errors.push("no state folder: the brokers are unknown".into());
        return r;
    };
    let brokers: Vec<PathBuf> = procs::stack_processes(state)
        .into_iter()
        .filter(|w| w.name.starts_with("mosquitto"))
        .filter_map(|w| w.pid_file.and_then(|p| p.parent().map(|d| d.to_path_buf())))
        .collect();
    let t0 = Instant::now();
    // All at once, as a power cut of the broker host would.
    let restarts = futures::future::join_all(brokers.iter().map(|dir| restart_broker(dir))).await;
    for (dir, done) in brokers.iter().zip(restarts) {
        match done {
            Ok(()) => r.brokers_restarted += 1,
            Err(e) => r.errors.push(format!("{}: {e}", dir.display())),
        }
    }
    let deadline = t0 + Duration::from_secs(300);
    // First every connection must notice its broker went away.
    let mut seen_drop = false;
    loop {
        let n = connected();
        let at = t0.elapsed().as_secs_f64();
        r.timeline.push((at, n as u64));
        seen_drop |= n < devices;
        if seen_drop && n >= devices {
            r.all_back_seconds = Some(at);
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    r
}

/// Stops the broker of `dir` (its `mosquitto.pid`), then starts it again
/// with its `mosquitto.conf` (as `infra/dev` laid them out).
async fn restart_broker(dir: &std::path::Path) -> std::io::Result<()> {
    let pid_file = dir.join("mosquitto.pid");
    let pid = std::fs::read_to_string(&pid_file)?.trim().to_owned();
    tokio::process::Command::new("kill").arg(&pid).status().await?;
    let gone = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::process::Command::new("mosquitto").arg("-c").arg(dir.join("mosquitto.conf")).arg("-d").status().await?;
    if !status.success() {
        return Err(std::io::Error::other(format!("mosquitto -c {}/mosquitto.conf -d: {status}", dir.display())));
    }
    Ok(())
}

/// Sends commands to the command probe at `per_sec` until stopped; measures
/// HTTP accepted and device received.
async fn command_loop(
    http: reqwest::Client,
    graphql: String,
    url: String,
    token: Token,
    per_sec: f64,
    mut observed: mpsc::UnboundedReceiver<Observed>,
    stop: CancellationToken,
) -> CommandSummary {
    let mut out = CommandSummary::default();
    if per_sec <= 0.0 {
        return out;
    }
    let (mut accepted, mut received, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    // A stall (an outage, a slow answer) is not made up for with a burst:
    // the probe would only hit the device's rate limit.
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0u64;
    loop {
        tokio::select! { _ = stop.cancelled() => break, _ = every.tick() => {} }
        i += 1;
        let t0 = Instant::now();
        let r = http.post(&url).bearer_auth(token.get()).json(&json!({"set": {"brightness": 1 + i % 100}})).send().await;
        out.sent += 1;
        let id = match r {
            Ok(r) if r.status().as_u16() == 202 => {
                accepted.push(t0.elapsed());
                r.json::<serde_json::Value>().await.ok().and_then(|v| v["commandId"].as_str().and_then(|s| s.parse::<Uuid>().ok()))
            }
            Ok(r) => {
                out.errors.push(format!("command answered {}", r.status()));
                // Rate-limited: wait as told before the next one.
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
                if let Some(secs) = wait.filter(|_| r.status().as_u16() == 429) {
                    tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(secs.min(60))) => {} }
                }
                None
            }
            Err(e) => {
                out.errors.push(format!("command failed: {e}"));
                None
            }
        };
        let Some(id) = id else { continue };
        ids.push(id);
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(o) = observed.recv().await {
                if let Observed::Command { command_id, at, .. } = o {
                    if command_id == id {
                        return Some(at);
                    }
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(at)) => {
                out.received += 1;
                received.push(at.saturating_duration_since(t0));
            }
            _ => out.errors.push(format!("command {id} did not reach the device within 5 s")),
        }
    }
    out.errors.truncate(20);
    out.accepted = percentiles(accepted);
    out.device_received = percentiles(received);
    // The last steps (ack, the confirming report) land a moment after the device got it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    out.lifecycle = Some(lifecycle(&http, &graphql, &token.get(), &ids).await);
    out
}

/// An access token kept fresh by signing in again every two minutes (they
/// live five), for runs longer than a token.
#[derive(Clone)]
pub(crate) struct Token(Arc<std::sync::RwLock<String>>);

impl Token {
    pub(crate) fn keep(http: reqwest::Client, api: String, account: crate::api::Account, cancel: CancellationToken) -> Self {
        let t = Token(Arc::new(std::sync::RwLock::new(account.access_token.clone())));
        let keeper = t.clone();
        tokio::spawn(async move {
            let mut account = account;
            loop {
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(120)) => {} }
                match crate::api::sign_in(&http, &api, &mut account).await {
                    Ok(()) => *keeper.0.write().unwrap_or_else(|e| e.into_inner()) = account.access_token.clone(),
                    Err(e) => tracing::warn!(error = %e, "signing in again failed; keeping the old token"),
                }
            }
        });
        t
    }

    pub(crate) fn get(&self) -> String {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Samples the projector's consumer lag (sum over partitions) every second.
async fn sample_lag(http: reqwest::Client, urls: Vec<String>, t0: Instant, into: Arc<Mutex<Vec<(f64, i64)>>>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! { _ = cancel.cancelled() => return, _ = every.tick() => {} }
        let mut total = None;
        for u in &urls {
            let Ok(r) = http.get(u).timeout(Duration::from_secs(1)).send().await else { continue };
            let Ok(text) = r.text().await else { continue };
            for line in text.lines().filter(|l| l.starts_with("homelink_projector_consumer_lag_records")) {
                if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    *total.get_or_insert(0i64) += v as i64;
                }
            }
        }
        if let Some(l) = total {
            into.lock().unwrap_or_else(|e| e.into_inner()).push((t0.elapsed().as_secs_f64(), l));
        }
    }
}

/// Checks, through GraphQL, that every device's shadow reflects its last
/// acknowledged report, waiting until `deadline` for stragglers.
/// `devs` are `(household, device, last acknowledged seq)`.
async fn verify(http: &reqwest::Client, graphql: &str, token: &Token, devs: &[(Uuid, Uuid, u64)], deadline: Instant) -> Verification {
    let mut v = Verification { devices_checked: devs.len(), ..Default::default() };
    let mut households: BTreeMap<Uuid, Vec<&(Uuid, Uuid, u64)>> = BTreeMap::new();
    for d in devs {
        households.entry(d.0).or_default().push(d);
    }
    let q = "query($h: ID!, $after: String) { household(id: $h) { devices(first: 200, after: $after) { edges { cursor node { id shadow { seq } } } } } }";
    loop {
        let mut behind = Vec::new();
        let mut errors = Vec::new();
        let mut next = BTreeMap::new();
        for (h, ds) in &households {
            let mut seqs: HashMap<Uuid, i64> = HashMap::new();
            let mut after: Option<String> = None;
            let mut failed = false;
            loop {
                let r = crate::gql::query(http, graphql, &token.get(), q, json!({"h": h, "after": after})).await;
                let edges = match r {
                    Ok(v) => match v["data"]["household"]["devices"]["edges"].as_array() {
                        Some(edges) => Some(edges.clone()),
                        // An error is not a device behind: say what the server said.
                        None => {
                            errors.push(format!("household {h}: no devices in the answer: {}", v["errors"]));
                            None
                        }
                    },
                    Err(e) => {
                        errors.push(format!("household {h}: {e}"));
                        None
                    }
                };
                let Some(edges) = edges else {
                    failed = true;
                    break;
                };
                for e in &edges {
                    if let Some(id) = e["node"]["id"].as_str().and_then(|s| s.parse().ok()) {
                        seqs.insert(id, e["node"]["shadow"]["seq"].as_i64().unwrap_or(0));
                    }
                }
                after = edges.last().and_then(|e| e["cursor"].as_str().map(str::to_owned));
                if edges.len() < 200 {
                    break;
                }
            }
            if failed {
                // Asked again next round; not counted as behind.
                next.insert(*h, ds.clone());
                continue;
            }
            let mut lagging = Vec::new();
            for d in ds {
                let (_, id, want) = **d;
                let have = seqs.get(&id).copied().unwrap_or(0);
                if want > 0 && (have < 0 || (have as u64) < want) {
                    behind.push((id, have, want));
                    lagging.push(*d);
                }
            }
            if !lagging.is_empty() {
                next.insert(*h, lagging);
            }
        }
        if (behind.is_empty() && errors.is_empty()) || Instant::now() >= deadline {
            v.devices_behind = behind.len();
            v.examples = behind.into_iter().take(10).collect();
            v.errors = errors.into_iter().take(10).collect();
            return v;
        }
        households = next;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_ramps_then_holds() {
        let mut o = Options::new(1, 1, 1000.0);
        o.ramp = Duration::from_secs(10);
        o.duration = Duration::from_secs(20);
        assert_eq!(o.due(0.0), 0.0);
        assert!((o.due(10.0) - 5_000.0).abs() < 1e-6);
        assert!((o.due(30.0) - 25_000.0).abs() < 1e-6);
        assert!((o.due(99.0) - 25_000.0).abs() < 1e-6, "nothing after the end");
        o.ramp = Duration::ZERO;
        assert!((o.due(1.0) - 1000.0).abs() < 1e-6);
    }
}
