//! `homelink`: developer CLI — PKI, topics, demo seeding, device simulator, benchmark, load generator.

use clap::{Parser, Subcommand};
use homelink_events::{DeviceKind, Topics};
use homelink_tools::endpoints::{Demo, Endpoints, MqttListener};
use homelink_tools::pki::{self, PkiDir};
use homelink_tools::seed::{self, SeededHousehold};
use homelink_tools::sim::{self, DeviceSpec, Target};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "HomeLink developer tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum HistoryCmd {
    /// Every event of a household from the log, in order, as JSON lines, CSV or Parquet (audited).
    Export(homelink_tools::history::ExportArgs),
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the development device CA and the broker's server certificate (once).
    PkiInit {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create the topics of a deployment (existing ones are left alone),
    /// after waiting for the cluster to answer with `--replication` brokers.
    Topics {
        #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
        bootstrap: String,
        #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
        prefix: String,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Copies of each partition (3 on a cluster; min.insync.replicas follows: 2 of 3).
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// How long telemetry is kept, in hours (0: for ever). The household
        /// stream, commands and audit are always kept for ever.
        #[arg(long, env = "HOMELINK_TELEMETRY_RETENTION_HOURS", default_value_t = 168)]
        telemetry_retention_hours: u64,
        /// How long to wait for the brokers to answer.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Wait until the Kafka cluster answers in the Kafka protocol with
    /// `--brokers` brokers (the broker's health check); fails after `--wait-secs`.
    KafkaReady {
        #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
        bootstrap: String,
        #[arg(long, default_value_t = 1)]
        brokers: usize,
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Seed the demo household (once) and write endpoints.json.
    DemoSeed {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
        bootstrap: String,
        #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
        prefix: String,
        #[arg(long)]
        command_api: String,
        #[arg(long)]
        query_api: String,
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
        #[arg(long)]
        prometheus: Option<String>,
        #[arg(long, default_value = "127.0.0.1")]
        mqtt_host: String,
        #[arg(long)]
        mqtt_port: u16,
    },
    /// Run the demo household's simulated devices.
    Simulate {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value_t = 5)]
        interval_secs: u64,
    },
    /// Measure the command round trip against a running stack.
    Bench {
        #[arg(long)]
        endpoints: PathBuf,
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Print only the machine-readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Measure the automation round trip against a running stack: a sensor's
    /// report → the automation's command received by a light.
    BenchAutomation {
        #[arg(long)]
        endpoints: PathBuf,
        #[arg(long, default_value_t = 300)]
        count: usize,
        /// Print only the machine-readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Load a running stack with real mTLS devices: provision (cached), connect, publish reports at a rate, measure.
    Load(LoadArgs),
    /// Rebuild every read model from the log into a schema of its own while
    /// the live one serves, compare them table by table, switch over when equal.
    Replay(homelink_tools::replay::ReplayArgs),
    /// Write the log (every topic), the tables not derived from it, the PKI
    /// and the secrets into one archive with a manifest and checksums.
    Backup(homelink_tools::backup::BackupArgs),
    /// Restore an archive of `homelink backup` into an empty stack (before its services start).
    Restore(homelink_tools::backup::RestoreArgs),
    /// Each read model's row count and content digest (what replay and restore compare).
    Digests {
        #[arg(long, env = "HOMELINK_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A household's history from the log (analysts).
    History {
        #[command(subcommand)]
        cmd: HistoryCmd,
    },
    /// Part of `homelink load` (started by it): connects one range of a
    /// fleet's households and publishes their share of the rate.
    #[command(hide = true)]
    LoadShard {
        #[arg(long)]
        fleet: PathBuf,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        ca_file: PathBuf,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        ramp_secs: f64,
        #[arg(long)]
        duration_secs: f64,
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The stack's endpoints.json; its folder is the stack's state folder (pid files, fleet cache).
    #[arg(long, default_value = ".state/dev/endpoints.json")]
    endpoints: PathBuf,
    #[arg(long, default_value_t = 100)]
    households: usize,
    #[arg(long, default_value_t = 10)]
    devices_per_household: usize,
    /// Reports per second, all devices together, after the ramp.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds from 0 to --rate.
    #[arg(long, default_value_t = 5)]
    ramp_secs: u64,
    /// Seconds at --rate after the ramp.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Households with a live GraphQL subscriber measuring report → subscription.
    #[arg(long, default_value_t = 4)]
    probes: usize,
    /// Commands per second to a probe light during the run (0: none).
    #[arg(long, default_value_t = 2.0)]
    commands_per_sec: f64,
    /// Seconds the stack's CPU at rest is measured first.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// Seconds to wait afterwards for every acknowledged report to be reflected.
    #[arg(long, default_value_t = 60)]
    settle_secs: u64,
    /// Provision a new fleet even if one of this shape is cached.
    #[arg(long)]
    fresh: bool,
    /// Provision with this existing installer account (signed in, not
    /// signed up); with --password-file.
    #[arg(long, requires = "password_file")]
    email: Option<String>,
    /// A file holding the --email account's password (a trailing newline
    /// trimmed).
    #[arg(long, requires = "email")]
    password_file: Option<PathBuf>,
    /// Also write the JSON summary here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Print only the JSON summary (no progress).
    #[arg(long)]
    json: bool,
    /// Runtime threads of the load generator (1: every connection on one thread, the cheapest per report).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Most devices one process connects (one process holds ~20,000
    /// descriptors here); the rest run in child processes.
    #[arg(long, default_value_t = 15_000)]
    devices_per_process: usize,
    /// Households provisioned at once (a household's devices register one after another).
    #[arg(long, default_value_t = 16)]
    provision_concurrency: usize,
    /// Device handshakes in progress at once, per process, while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// The reconnect storm: once connected, restart every broker of the
    /// stack and measure until every device is back.
    #[arg(long)]
    restart_brokers: bool,
}

/// The demo household: an owner, an adult and a child (through the API),
/// and one device of every kind.
async fn demo_household(command_api: &str, state_dir: &std::path::Path) -> anyhow::Result<SeededHousehold> {
    use homelink_tools::api;
    let http = reqwest::Client::new();
    // Development-only passwords, generated once and kept, so a re-seeded
    // demo (demo.json deleted) can sign in to accounts that already exist.
    let secrets = state_dir.join("secrets").join("demo-accounts.json");
    let mut passwords: std::collections::BTreeMap<String, String> =
        std::fs::read(&secrets).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut accounts = Vec::new();
    for who in ["owner", "adult", "child"] {
        let email = format!("{who}@demo.homelink.dev");
        let password = passwords.entry(email.clone()).or_insert_with(api::dev_password).clone();
        std::fs::create_dir_all(state_dir.join("secrets"))?;
        std::fs::write(&secrets, serde_json::to_vec_pretty(&passwords)?)?;
        let mut a = match api::sign_up(&http, command_api, &email, &password, &format!("Demo {who}")).await {
            Ok(a) => a,
            Err(_) => {
                let mut a = api::Account {
                    user_id: uuid::Uuid::nil(),
                    email: email.clone(),
                    password: password.clone(),
                    role: None,
                    access_token: String::new(),
                    refresh_token: String::new(),
                };
                api::sign_in(&http, command_api, &mut a)
                    .await
                    .map_err(|e| anyhow::anyhow!("{email} exists with another password ({e}); remove .state/dev to start over"))?;
                a
            }
        };
        a.role = Some(who.into());
        accounts.push(a);
    }
    let household = api::create_household(&http, command_api, &accounts[0], "Demo home").await?;
    for member in &accounts[1..] {
        api::add_member(&http, command_api, &accounts[0], household, member, member.role.as_deref().unwrap_or("child")).await?;
    }
    let devices = seed::register_devices(&http, command_api, &accounts[0], household, &seed::demo_devices()).await?;
    // "Good night": every light and plug off, the front door locked.
    let parts: Vec<serde_json::Value> = devices
        .iter()
        .filter_map(|d| match d.kind {
            DeviceKind::Light | DeviceKind::Plug => Some(serde_json::json!({"deviceId": d.id, "set": {"on": false}})),
            DeviceKind::Lock => Some(serde_json::json!({"deviceId": d.id, "set": {"locked": true}})),
            _ => None,
        })
        .collect();
    let parts = serde_json::Value::Array(parts);
    api::create_scene(&http, command_api, &accounts[0], household, "Good night", parts.clone(), true).await?;
    // "Away" (the same targets) when the last member leaves; the kitchen
    // sensor's motion after 19:00 turns the ceiling light on for 5 minutes.
    let away = api::create_scene(&http, command_api, &accounts[0], household, "Away", parts, false).await?;
    let leaving = serde_json::json!({
        "triggers": [{"type": "presence", "who": "last", "movement": "leave"}],
        "actions": [{"type": "scene", "sceneId": away}]
    });
    api::create_automation(&http, command_api, &accounts[0], household, "Leaving home", leaving).await?;
    let of = |name: &str| devices.iter().find(|d| d.name == name).map(|d| d.id);
    if let (Some(sensor), Some(light)) = (of("Back door contact"), of("Ceiling light")) {
        let night = serde_json::json!({
            "triggers": [{"type": "state", "deviceId": sensor, "capability": "motion", "to": true}],
            "conditions": [{"type": "time", "after": "19:00", "before": "06:00"}],
            "actions": [{"type": "command", "deviceId": light, "set": {"on": true}}, {"type": "delay", "secs": 300},
                        {"type": "command", "deviceId": light, "set": {"on": false}}],
            "mode": "restart"
        });
        api::create_automation(&http, command_api, &accounts[0], household, "Night motion light", night).await?;
    }
    Ok(SeededHousehold { household_id: household, name: "Demo home".into(), devices, accounts })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    homelink_kit::telemetry::init("warn");
    match Cli::parse().cmd {
        Cmd::PkiInit { dir } => {
            pki::init(&dir)?;
        }
        Cmd::KafkaReady { bootstrap, brokers, wait_secs } => {
            let n = homelink_kit::kafka::wait_for_brokers(&bootstrap, brokers, std::time::Duration::from_secs(wait_secs)).await?;
            println!("ready: {n} broker(s) answer at {bootstrap}");
        }
        Cmd::Topics { bootstrap, prefix, partitions, replication, telemetry_retention_hours, wait_secs } => {
            use homelink_kit::kafka::{ensure_topics, wait_for_brokers, TopicPlan};
            wait_for_brokers(&bootstrap, replication.max(1) as usize, std::time::Duration::from_secs(wait_secs)).await?;
            let mut plan = TopicPlan::new(partitions, replication);
            plan.telemetry_retention =
                (telemetry_retention_hours > 0).then(|| std::time::Duration::from_secs(telemetry_retention_hours * 3600));
            ensure_topics(&bootstrap, &Topics::new(prefix), &plan).await?;
        }
        Cmd::DemoSeed { state_dir, bootstrap, prefix, command_api, query_api, metrics, prometheus, mqtt_host, mqtt_port } => {
            let pki_dir = state_dir.join("pki");
            let demo_file = state_dir.join("demo.json");
            let existing: Option<SeededHousehold> = std::fs::read(&demo_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|h: &SeededHousehold| !h.accounts.is_empty());
            // A demo from before accounts existed is replaced by one with accounts.
            let home: SeededHousehold = if let Some(h) = existing {
                h
            } else {
                let h = demo_household(&command_api, &state_dir).await?;
                std::fs::write(&demo_file, serde_json::to_vec_pretty(&h)?)?;
                h
            };
            let ws = query_api.replacen("http", "ws", 1);
            let e = Endpoints {
                command_api,
                graphql: format!("{query_api}/graphql"),
                graphql_ws: format!("{ws}/graphql"),
                metrics,
                prometheus,
                mqtt_device: MqttListener {
                    host: mqtt_host,
                    port: mqtt_port,
                    ca_cert: PkiDir(pki_dir.clone()).ca_cert().display().to_string(),
                },
                kafka_bootstrap: bootstrap,
                topic_prefix: prefix,
                pki_dir: pki_dir.display().to_string(),
                demo: Demo {
                    household_id: home.household_id,
                    devices_file: demo_file.display().to_string(),
                    accounts: home.accounts.clone(),
                },
            };
            std::fs::write(state_dir.join("endpoints.json"), serde_json::to_vec_pretty(&e)?)?;
            let table: String = home
                .accounts
                .iter()
                .map(|a| format!("  {:6} {:28} password {}\n", a.role.as_deref().unwrap_or("-"), a.email, a.password))
                .collect();
            std::fs::write(state_dir.join("accounts.txt"), table)?;
        }
        Cmd::Simulate { state_dir, interval_secs } => {
            let e = Endpoints::load(&state_dir.join("endpoints.json"))?;
            let home: SeededHousehold = serde_json::from_slice(&std::fs::read(&e.demo.devices_file)?)?;
            let target = Target {
                host: e.mqtt_device.host.clone(),
                port: e.mqtt_device.port,
                ca_pem: std::fs::read_to_string(&e.mqtt_device.ca_cert)?,
            };
            // Devices connect once the registry knows them; earlier reports would be refused as unknown.
            let http = reqwest::Client::new();
            let mut owner = home.accounts.first().cloned().ok_or_else(|| anyhow::anyhow!("the demo has no accounts"))?;
            homelink_tools::api::sign_in(&http, &e.command_api, &mut owner).await?;
            for d in &home.devices {
                let q = "query($id: ID!) { device(id: $id) { id } }";
                for attempt in 0.. {
                    let r = homelink_tools::gql::query(&http, &e.graphql, &owner.access_token, q, serde_json::json!({"id": d.id})).await;
                    if r.is_ok_and(|v| !v["data"]["device"].is_null()) {
                        break;
                    }
                    anyhow::ensure!(attempt < 600, "device {} was not registered within 60 s", d.id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let cancel = homelink_kit::shutdown::on_signal();
            let mut tasks = Vec::new();
            for d in home.devices {
                let spec = DeviceSpec {
                    household_id: home.household_id,
                    device_id: d.id,
                    kind: d.kind,
                    cert_pem: d.cert_pem,
                    key_pem: d.key_pem,
                    interval: Some(Duration::from_secs(interval_secs.max(1))),
                    port: d.mqtt_port,
                };
                tasks.push(tokio::spawn(sim::run(spec, target.clone(), None, cancel.clone())));
            }
            eprintln!("simulating {} devices of household {}", tasks.len(), home.household_id);
            for t in tasks {
                let _ = t.await;
            }
        }
        Cmd::BenchAutomation { endpoints, count, json } => {
            let e = Endpoints::load(&endpoints)?;
            let s = homelink_tools::bench::automation(&e, count, !json).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let p = &s.trigger_to_command;
                println!("triggers: {}", s.triggers);
                println!(
                    "report published → automation's command received: p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                    p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
                );
            }
        }
        Cmd::Bench { endpoints, count, json } => {
            let e = Endpoints::load(&endpoints)?;
            let s = homelink_tools::bench::run(&e, count, !json).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("commands: {}", s.commands);
                for (name, p) in [
                    ("HTTP accepted (Kafka ack)", &s.http_accepted),
                    ("device received cmd", &s.device_received),
                    ("new state on subscription", &s.state_on_subscription),
                ] {
                    println!(
                        "{name:28} p50 {:7.2} ms  p95 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
                        p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
                    );
                }
                println!("{}", serde_json::to_string(&s)?);
            }
        }
        Cmd::Load(a) => load(a).await?,
        Cmd::Backup(a) => {
            let out = a.out.clone();
            let done = homelink_tools::backup::backup(a).await?;
            let records: u64 = done.manifest.log.iter().map(|l| l.records).sum();
            let rows: i64 = done.manifest.tables.iter().map(|t| t.rows).sum();
            let secs = done.elapsed.as_secs_f64();
            eprintln!(
                "backed up {records} records, {rows} rows, {} files into {} ({} bytes) in {secs:.1} s ({:.0} records/s)",
                done.manifest.files.len(),
                out.display(),
                done.bytes,
                records as f64 / secs.max(1e-9)
            );
        }
        Cmd::Restore(a) => {
            let json = a.json;
            let done = homelink_tools::backup::restore(a).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "restored {} records and {} rows; {} events rebuilt into the read models in {:.1} s",
                    done.records, done.rows, done.events_rebuilt, done.seconds
                );
                match (done.compared, done.read_models_equal) {
                    (true, true) => println!("the read models at the backup's positions equal the backup's digests"),
                    (false, _) => {
                        println!("the backup does not hold the whole log (telemetry trimmed by retention): read models not compared")
                    }
                    (true, false) => {
                        for (want, got) in &done.differences {
                            println!(
                                "DIFFERENT {}: backup {} rows {}, restored {} rows {}",
                                want.table, want.rows, want.digest, got.rows, got.digest
                            );
                        }
                    }
                }
                println!("now start the services (infra/dev up, or each service with this database and prefix)");
            }
            if done.compared && !done.read_models_equal {
                anyhow::bail!("the restored read models differ from the backup's");
            }
        }
        Cmd::Digests { database_url, json } => {
            use sqlx::Connection;
            let mut db = sqlx::PgConnection::connect(&database_url).await?;
            let digests = homelink_projector::replay::digests(&mut db, "public").await?;
            if json {
                let v: Vec<serde_json::Value> =
                    digests.iter().map(|(t, d)| serde_json::json!({"table": t, "rows": d.rows, "digest": d.hash})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (t, d) in digests {
                    println!("{t:<26} {:>12} {}", d.rows, d.hash);
                }
            }
        }
        Cmd::Replay(a) => {
            homelink_tools::replay::run(a).await?;
        }
        Cmd::History { cmd: HistoryCmd::Export(a) } => {
            let started = std::time::Instant::now();
            let done = homelink_tools::history::export(a).await?;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "exported {} events in {secs:.2} s ({:.0} events/s){}",
                done.records,
                done.records as f64 / secs.max(1e-9),
                if done.undecodable > 0 {
                    format!("; {} undecodable records of the household left out", done.undecodable)
                } else {
                    String::new()
                }
            );
        }
        Cmd::LoadShard { fleet, from, to, host, port, ca_file, rate, ramp_secs, duration_secs, connect_concurrency } => {
            let args = homelink_tools::load::shard::ShardArgs {
                fleet,
                from,
                to,
                host,
                port,
                ca_file,
                rate,
                ramp: Duration::from_secs_f64(ramp_secs.max(0.0)),
                duration: Duration::from_secs_f64(duration_secs.max(0.0)),
                connect_concurrency,
            };
            // Like the main process: every connection on one thread.
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                Ok(rt.block_on(homelink_tools::load::shard::serve(args))?)
            })
            .await??;
        }
    }
    Ok(())
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    use homelink_tools::load;
    let e = Endpoints::load(&a.endpoints)?;
    let state_dir = a.endpoints.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let mut o = load::Options::new(a.households, a.devices_per_household, a.rate);
    o.ramp = Duration::from_secs(a.ramp_secs);
    o.duration = Duration::from_secs(a.duration_secs);
    o.probes = a.probes;
    o.commands_per_sec = a.commands_per_sec;
    o.idle = Duration::from_secs(a.idle_secs);
    o.settle = Duration::from_secs(a.settle_secs);
    o.devices_per_process = a.devices_per_process.max(1);
    o.connect_concurrency = a.connect_concurrency.max(1);
    o.provision_concurrency = a.provision_concurrency.max(1);
    o.restart_brokers = a.restart_brokers;
    if let (Some(email), Some(file)) = (&a.email, &a.password_file) {
        o.installer = Some(load::fleet::Installer::with_password_file(email, file)?);
    }
    let cache = load::fleet::cache_path(&state_dir, a.households, a.devices_per_household);
    if a.fresh {
        let _ = std::fs::remove_file(&cache);
    }
    o.fleet_cache = Some(cache);
    o.state_dir = Some(state_dir);
    o.progress = !a.json;
    // One thread for every device connection: at these rates the cost is
    // in waking tasks, and waking them across threads costs more.
    let threads = a.threads;
    let s = tokio::task::spawn_blocking(move || -> anyhow::Result<load::Summary> {
        let rt = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
        };
        Ok(rt.block_on(load::run(&e, &o))?)
    })
    .await??;
    let text = serde_json::to_string_pretty(&s)?;
    if let Some(p) = &a.json_out {
        std::fs::write(p, &text)?;
    }
    if a.json {
        println!("{text}");
    } else {
        print_load(&s);
    }
    anyhow::ensure!(s.lossless(), "acknowledged reports were lost or went missing (see the summary)");
    Ok(())
}

fn print_load(s: &homelink_tools::load::Summary) {
    let p = |x: &Option<homelink_tools::bench::Percentiles>| match x {
        Some(p) => format!("p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms", p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms),
        None => "no samples".into(),
    };
    println!(
        "fleet: {} households, {} devices ({} connected in {:.1} s){}",
        s.households,
        s.devices,
        s.connected,
        s.connect_seconds,
        if s.fleet_reused { ", reused" } else { "" }
    );
    println!(
        "reports: offered {:.0}/s, achieved {:.0}/s over {:.0} s; published {}, acked {}, refused {}, not published {}",
        s.offered_rate, s.achieved_rate, s.steady_seconds, s.published, s.acked, s.refused, s.not_published
    );
    println!("PUBACK:                      {}", p(&s.puback));
    let r = &s.report_to_subscription;
    println!("report → subscription:       {}", p(&r.latency));
    println!("  probe reports {}: seen {}, coalesced {}, missing {}", r.reports, r.seen, r.coalesced, r.missing);
    let c = &s.command_round_trip;
    println!("command accepted (HTTP 202): {}", p(&c.accepted));
    println!("command at the device:       {}  ({}/{})", p(&c.device_received), c.received, c.sent);
    println!("max lag: {} records", s.lag.iter().map(|l| l.1).max().unwrap_or(0));
    println!("load processes: {}", s.load_processes);
    if let Some(m) = &s.memory {
        println!(
            "brokers + bridge memory: {:.1} MB → {:.1} MB with {} devices connected: {:.1} KB per device",
            m.before_mb, m.after_mb, m.connected, m.per_device_kb
        );
    }
    if let Some(r) = &s.reconnect {
        match r.all_back_seconds {
            Some(t) => println!("reconnect storm: {} brokers restarted, all {} devices back in {t:.1} s", r.brokers_restarted, r.devices),
            None => println!("reconnect storm: {} brokers restarted, not all {} devices back", r.brokers_restarted, r.devices),
        }
        for e in &r.errors {
            println!("  error: {e}");
        }
    }
    println!("{:16} {:>9} {:>10} {:>10} {:>9}", "process", "cpu s", "µs/report", "marginal", "peak MB");
    for pc in &s.processes {
        let m = pc.marginal_us_per_report.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into());
        let note = if pc.restarted { "  (restarted: the new process only)" } else { "" };
        println!("{:16} {:>9.2} {:>10.1} {:>10} {:>9.1}{note}", pc.name, pc.cpu_seconds, pc.cpu_us_per_report, m, pc.peak_rss_mb);
    }
    println!(
        "stack: {:.1} µs/report ({} marginal over rest)",
        s.stack_cpu_us_per_report,
        s.stack_marginal_us_per_report.map(|m| format!("{m:.1} µs")).unwrap_or_else(|| "-".into())
    );
    let v = &s.verification;
    println!("verification: {} devices checked, {} behind their last acknowledged report", v.devices_checked, v.devices_behind);
    for (d, have, want) in &v.examples {
        println!("  {d}: shadow seq {have} < acknowledged {want}");
    }
    for e in &v.errors {
        println!("  error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_takes_an_existing_installer_account() {
        let args = ["homelink", "load", "--email", "ops@example.com", "--password-file", "/run/secrets/installer"];
        let Cmd::Load(a) = Cli::try_parse_from(args).expect("parses").cmd else { panic!("not load") };
        assert_eq!(a.email.as_deref(), Some("ops@example.com"));
        assert_eq!(a.password_file.as_deref(), Some(std::path::Path::new("/run/secrets/installer")));
        // One without the other is refused.
        assert!(Cli::try_parse_from(["homelink", "load", "--email", "ops@example.com"]).is_err());
        assert!(Cli::try_parse_from(["homelink", "load", "--password-file", "/x"]).is_err());
    }
}
