//! The device bridge: MQTT ⇄ Kafka.
//!
//! Layout:
//! - [`ingest`]: device messages in — topic, owner and payload checks, append
//!   to the telemetry topic, PUBACK only after Kafka acknowledged.
//! - [`deliver`]: commands out — read from the commands topic through the
//!   shared log reader ([`homelink_kit::reader`]), published on the device's
//!   `cmd` topic, offsets committed once the MQTT broker acknowledged them.
//! - [`registry`]: who owns which device, in memory, kept current from the
//!   household stream.
//!
//! The bridge joins a shared subscription (`$share/<group>/…`), so several
//! bridges split the device traffic, and a Kafka consumer group, so they split
//! the commands.

pub mod deliver;
pub mod ingest;
pub mod registry;
pub mod schema;

use deliver::Deliverer;
use homelink_events::Topics;
use homelink_kit::kafka::{Appender, ProducerConfig};
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::reader::{LogReader, ReaderConfig, Start};
use homelink_kit::shutdown::CancellationToken;
use registry::Registry;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why the device bridge could not start, or stopped.
pub use homelink_kit::service::ServiceError as Error;

/// Bridge settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub kafka_bootstrap: String,
    pub topics: Topics,
    pub mqtt_host: String,
    /// The bridge listener of every broker, in the deployment's broker order
    /// (a device's registered `broker` indexes it): the bridge subscribes on
    /// each and sends a device's commands to the one it was assigned.
    pub mqtt_ports: Vec<u16>,
    pub mqtt_username: String,
    /// Never logged or printed (`Debug` redacts it).
    pub mqtt_password: secrecy::SecretString,
    /// Stable per bridge instance: the broker keeps its session (and the
    /// unacknowledged messages) across a restart under this id.
    pub client_id: String,
    /// Shared-subscription group: all bridges of a deployment use the same one.
    pub share_group: String,
    /// The public listener (ops routes).
    pub listen: String,
    /// Longest an empty fetch of the commands topic waits at the broker (a
    /// command ends the wait at once).
    pub command_fetch_wait: Duration,
    /// librdkafka's `linger.ms` for the telemetry appends.
    pub produce_linger: Duration,
    /// How often the expiry timer looks for commands past their expiry.
    pub expiry_every: Duration,
    /// A scene's or an automation's command delivered this long ago and not
    /// answered is published again (same `commandId`) while it lives, at
    /// most this often.
    pub resend_after: Duration,
    /// Requests each MQTT client queues while its broker is away; a command
    /// that finds the queue full is not published now (the catch-up path
    /// tries again) — no household waits behind another's.
    pub mqtt_queue: usize,
    /// Messages one device may send a second, and its burst: beyond them
    /// its messages are acknowledged and dropped (counted as
    /// `device_rate_limited`), so one device cannot flood the log.
    pub device_rate: (u32, u32),
}

impl Config {
    pub fn new(
        database_url: impl Into<String>,
        kafka_bootstrap: impl Into<String>,
        topics: Topics,
        mqtt_host: impl Into<String>,
        mqtt_port: u16,
    ) -> Self {
        Self {
            database_url: database_url.into(),
            kafka_bootstrap: kafka_bootstrap.into(),
            topics,
            mqtt_host: mqtt_host.into(),
            mqtt_ports: vec![mqtt_port],
            mqtt_username: "homelink-bridge".into(),
            mqtt_password: secrecy::SecretString::from(String::new()),
            client_id: "homelink-bridge-0".into(),
            share_group: "homelink-bridge".into(),
            listen: "127.0.0.1:0".into(),
            command_fetch_wait: Duration::from_millis(500),
            produce_linger: Duration::from_millis(5),
            expiry_every: Duration::from_secs(1),
            resend_after: Duration::from_secs(5),
            mqtt_queue: 8192,
            device_rate: (50, 500),
        }
    }
}

/// What the bridge's tasks share.
pub struct Shared {
    pub metrics: ServiceMetrics,
    pub topics: Topics,
    pub appender: Appender,
    pub registry: Registry,
    pub deliverer: Deliverer,
    /// The debounce of each device's offline-queue flush.
    pub flushes: deliver::Flushes,
    /// When an append last failed (a device's messages then keep their
    /// order through retries, `ingest.rs`).
    pub appends_failing: ingest::Failing,
    /// Each device's message rate ([`Config::device_rate`]).
    pub device_rate: governor::DefaultKeyedRateLimiter<uuid::Uuid>,
    /// The device-message JSON Schemas every message is checked against.
    pub schemas: schema::Schemas,
    /// Per broker: whether its subscription is granted.
    subscribed: Vec<AtomicBool>,
    /// Per broker: the clients it says are connected (its `$SYS` figure,
    /// devices plus the bridges' own connections).
    broker_clients: Vec<prometheus::IntGauge>,
    /// The read models (open commands, the expiry timer).
    pub pool: sqlx::PgPool,
    /// This `Shared` itself, for tasks spawned from a borrowed one.
    pub me: std::sync::Weak<Shared>,
    /// Cancelled when the bridge stops: appends still retrying give up.
    pub stopping: CancellationToken,
}

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shared: Arc<Shared>,
    /// One connection per broker, in the deployment's broker order.
    connections: Vec<(AsyncClient, EventLoop)>,
    commands: LogReader,
    /// The household stream, from where the registry's snapshot left it.
    households: LogReader,
    cfg: Config,
}

impl Application {
    pub async fn build(cfg: Config) -> Result<Self, Error> {
        let metrics = ServiceMetrics::new("bridge");
        // The series the dashboards and alert rules read, at 0 from the start (kit::metrics).
        metrics.touch(
            &["state", "ack", "status", "command_log", "command_resent", "command_queued"],
            &["telemetry", "cmd", "dead_letter", "command_expired", "command_resent", "command_retried", "command_revoked"],
            &[
                "kafka_produce",
                "dead_letter",
                "device_rate_limited",
                "rate_limited",
                "mqtt_connection",
                "command_publish",
                "unknown_device",
            ],
            &["report_appended", "command_publish", "tap_to_device"],
        );
        let broker_clients = {
            let gauge = prometheus::IntGaugeVec::new(
                prometheus::Opts::new("homelink_bridge_broker_clients_connected", "Clients an MQTT broker says are connected ($SYS)"),
                &["broker"],
            )
            .map_err(|e| Error::Service(format!("metrics: {e}")))?;
            metrics.registry.register(Box::new(gauge.clone())).map_err(|e| Error::Service(format!("metrics: {e}")))?;
            cfg.mqtt_ports.iter().map(|p| gauge.with_label_values(&[&format!("{}:{p}", cfg.mqtt_host)])).collect::<Vec<_>>()
        };
        let pool = homelink_kit::db::connect_with_retry(&cfg.database_url, 8, Duration::from_secs(30)).await?;
        let mut producer = ProducerConfig::new(&cfg.kafka_bootstrap);
        producer.linger = cfg.produce_linger;
        let appender = Appender::new(&producer)?;

        if cfg.mqtt_ports.is_empty() {
            return Err(Error::Service("mqtt: no MQTT broker configured".into()));
        }
        // The same client id on every broker: each keeps this bridge's session.
        let connections: Vec<(AsyncClient, EventLoop)> = cfg
            .mqtt_ports
            .iter()
            .map(|port| {
                let mut opts = MqttOptions::new(&cfg.client_id, &cfg.mqtt_host, *port);
                opts.set_credentials(&cfg.mqtt_username, secrecy::ExposeSecret::expose_secret(&cfg.mqtt_password))
                    .set_keep_alive(Duration::from_secs(10))
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(3600))
                    .set_manual_acks(true)
                    .set_receive_maximum(Some(4096))
                    .set_max_packet_size(Some(1 << 20));
                let mut net = rumqttc::NetworkOptions::new();
                net.set_tcp_nodelay(true);
                opts.set_network_options(net);
                AsyncClient::new(opts, cfg.mqtt_queue.max(1))
            })
            .collect();
        let clients: Vec<AsyncClient> = connections.iter().map(|(c, _)| c.clone()).collect();

        // Static membership: a bridge restarted under its id gets its
        // partitions back at once, without a rebalance.
        let commands = LogReader::new(
            &ReaderConfig {
                bootstrap: cfg.kafka_bootstrap.clone(),
                group: format!("{}-commands", cfg.share_group),
                fetch_wait: cfg.command_fetch_wait,
                batch_max: deliver::COMMAND_BATCH,
                gather: Duration::ZERO,
            },
            Start::Group { topics: vec![cfg.topics.commands()], instance: Some(cfg.client_id.clone()) },
            metrics.clone(),
        )?;

        // The registry in memory, then the household stream from the
        // projection's positions of the same snapshot (registry.rs).
        homelink_read_model::migrate(&pool).await?;
        let households_topic = cfg.topics.households();
        let parts = homelink_kit::reader::partitions(&cfg.kafka_bootstrap, std::slice::from_ref(&households_topic)).await?;
        let (registry, from) = Registry::load(pool.clone(), &households_topic, &parts).await?;
        let households = LogReader::new(
            &ReaderConfig {
                bootstrap: cfg.kafka_bootstrap.clone(),
                group: format!("{}-registry", cfg.share_group),
                fetch_wait: Duration::from_millis(500),
                batch_max: 512,
                gather: Duration::ZERO,
            },
            Start::Assigned(from),
            metrics.clone(),
        )?;

        let schemas = schema::Schemas::compile()?;
        let shared = Arc::new_cyclic(|me| Shared {
            pool: pool.clone(),
            me: me.clone(),
            schemas,
            metrics: metrics.clone(),
            topics: cfg.topics.clone(),
            appender,
            registry,
            deliverer: Deliverer::new(clients),
            flushes: deliver::Flushes::default(),
            appends_failing: ingest::Failing::default(),
            device_rate: governor::RateLimiter::keyed(
                governor::Quota::per_second(std::num::NonZeroU32::new(cfg.device_rate.0.max(1)).unwrap_or(std::num::NonZeroU32::MIN))
                    .allow_burst(std::num::NonZeroU32::new(cfg.device_rate.1.max(1)).unwrap_or(std::num::NonZeroU32::MIN)),
            ),
            subscribed: connections.iter().map(|_| AtomicBool::new(false)).collect(),
            broker_clients,
            stopping: CancellationToken::new(),
        });
        let s = shared.clone();
        let ready: homelink_kit::ops::ReadyCheck = Arc::new(move || {
            let s = s.clone();
            let pg = homelink_kit::ops::postgres_ready(pool.clone());
            Box::pin(async move {
                if let Some(i) = s.subscribed.iter().position(|b| !b.load(Ordering::Relaxed)) {
                    return Err(format!("mqtt: not subscribed at broker {i}"));
                }
                pg().await
            })
        });
        let router = homelink_kit::ops::router(metrics, ready);
        let listener = homelink_kit::ops::bind(&cfg.listen).await?;
        Ok(Self { listener, router, shared, connections, commands, households, cfg })
    }

    /// The listener's port (ops routes).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics(&self) -> ServiceMetrics {
        self.shared.metrics.clone()
    }

    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), Error> {
        // Unbounded on purpose: the connection's reader must never wait for
        // the pipeline, or the acknowledgements queued behind it would never
        // be sent and the bridge would stop for good (a full queue here, a
        // full request queue in the client: each waiting on the other). The
        // broker bounds what is unacknowledged (receive maximum).
        let (tx, rx) = mpsc::unbounded_channel();
        let stopping = (cancel.clone(), self.shared.stopping.clone());
        tokio::spawn(async move {
            stopping.0.cancelled().await;
            stopping.1.cancel();
        });
        let clients: Vec<AsyncClient> = self.connections.iter().map(|(c, _)| c.clone()).collect();
        let ingest = tokio::spawn(ingest::run(self.shared.clone(), clients.clone(), rx, cancel.clone()));
        let commands = tokio::spawn(deliver::consume_commands(self.shared.clone(), self.commands, cancel.clone()));
        let households = tokio::spawn(registry::follow(self.shared.clone(), self.households, cancel.clone()));
        let timer = tokio::spawn(deliver::expiry_timer(self.shared.clone(), self.cfg.expiry_every, self.cfg.resend_after, cancel.clone()));
        // Devices whose buckets are full again are forgotten: bounded memory.
        let (s, c) = (self.shared.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! { _ = c.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(60)) => {} }
                s.device_rate.retain_recent();
                s.device_rate.shrink_to_fit();
            }
        });
        let filters: Vec<String> =
            ["state", "ack", "status"].iter().map(|c| format!("$share/{}/home/+/device/+/{c}", self.cfg.share_group)).collect();
        let mqtt: Vec<_> = self
            .connections
            .into_iter()
            .enumerate()
            .map(|(i, (client, eventloop))| {
                tokio::spawn(poll_mqtt(i, eventloop, client, filters.clone(), tx.clone(), self.shared.clone(), cancel.clone()))
            })
            .collect();
        drop(tx);
        homelink_kit::ops::serve(self.listener, self.router, &self.shared.metrics, cancel.clone()).await?;
        let _ = ingest.await;
        let _ = commands.await;
        let _ = households.await;
        timer.abort();
        for c in &clients {
            let _ = c.disconnect().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(mqtt)).await;
        self.shared.appender.flush(Duration::from_secs(2));
        Ok(())
    }
}

/// Drives the connection to broker `broker`: reconnects, (re)subscribes on
/// every CONNACK, and forwards incoming publishes, tagged with the broker
/// that must get their PUBACK, to the ingest pipeline.
/// The broker's count of connected clients (Mosquitto `$SYS`).
const SYS_CLIENTS: &str = "$SYS/broker/clients/connected";

async fn poll_mqtt(
    broker: usize,
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    tx: mpsc::UnboundedSender<(usize, rumqttc::v5::mqttbytes::v5::Publish)>,
    s: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic.starts_with(b"$SYS/") => {
                // QoS 0: nothing to acknowledge.
                if let Some(n) = std::str::from_utf8(&p.payload).ok().and_then(|t| t.trim().parse::<i64>().ok()) {
                    s.broker_clients[broker].set(n);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send((broker, p)).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker, "connected to the MQTT broker");
                let client = client.clone();
                let filters = filters.clone();
                // One SUBSCRIBE for all filters, so its one SUBACK says whether the bridge is subscribed.
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe_many(filters.into_iter().map(|f| Filter::new(f, QoS::AtLeastOnce))).await {
                        tracing::warn!(error = %e, "subscribe failed");
                    }
                    // The broker's connected-clients figure for the dashboards
                    // (every `sys_interval`); its own SUBACK has one code (below).
                    if let Err(e) = client.subscribe(SYS_CLIENTS, QoS::AtMostOnce).await {
                        tracing::warn!(error = %e, "subscribe to $SYS failed");
                    }
                });
            }
            // The broker's acknowledgements of command publishes (deliver.rs).
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => s.deliverer.acks[broker].sent(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                s.deliverer.acks[broker].acked(ack.pkid, ack.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success)
            }
            // The $SYS subscription (one filter): a refusal costs the
            // connections panel, not the bridge's readiness.
            Ok(Event::Incoming(Packet::SubAck(ack))) if ack.return_codes.len() == 1 => {
                if !matches!(ack.return_codes[0], SubscribeReasonCode::Success(_)) {
                    tracing::warn!(broker, codes = ?ack.return_codes, "the broker refused {SYS_CLIENTS}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if !granted {
                    tracing::error!(broker, codes = ?ack.return_codes, "the broker refused a subscription");
                    s.metrics.errors.with_label_values(&["subscribe_refused"]).inc();
                }
                s.subscribed[broker].store(granted, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                s.subscribed[broker].store(false, Ordering::Relaxed);
                s.metrics.errors.with_label_values(&["mqtt_connection"]).inc();
                tracing::warn!(broker, error = %e, "mqtt connection error, reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}
