//! `homelink`: developer CLI — PKI, topics, demo seeding, device simulator, benchmark.

use clap::{Parser, Subcommand};
use homelink_events::Topics;
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
enum Cmd {
    /// Create the development device CA and the broker's server certificate (once).
    PkiInit {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create the topics of a deployment (existing ones are left alone).
    Topics {
        #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
        bootstrap: String,
        #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
        prefix: String,
        #[arg(long, default_value_t = 6)]
        partitions: i32,
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
    Ok(SeededHousehold { household_id: household, name: "Demo home".into(), devices, accounts })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    homelink_kit::telemetry::init("warn");
    match Cli::parse().cmd {
        Cmd::PkiInit { dir } => {
            pki::init(&dir)?;
        }
        Cmd::Topics { bootstrap, prefix, partitions } => {
            homelink_kit::kafka::ensure_topics(&bootstrap, &Topics::new(prefix).all(), partitions).await?;
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
                };
                tasks.push(tokio::spawn(sim::run(spec, target.clone(), None, cancel.clone())));
            }
            eprintln!("simulating {} devices of household {}", tasks.len(), home.household_id);
            for t in tasks {
                let _ = t.await;
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
    }
    Ok(())
}
