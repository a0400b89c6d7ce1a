//! The test stack: real Postgres, real Apache Kafka (KRaft), real
//! Mosquitto, started by `infra/dev test`, which passes their addresses in
//! `HOMELINK_TEST_*` variables. Each test gets a fresh database and a fresh
//! topic prefix, and runs the services in-process on port 0.
#![allow(dead_code)]

pub mod raw;

use homelink_events::{DeviceKind, Topics};
use homelink_kit::kafka::{Appender, ProducerConfig};
use homelink_kit::shutdown::CancellationToken;
use homelink_tools::api::Account;
use homelink_tools::pki::PkiDir;
use homelink_tools::seed::{self, SeededHousehold};
use homelink_tools::sim::{DeviceSpec, Target};
use serde_json::Value;
use std::future::Future;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Addresses of the real components.
#[derive(Debug, Clone)]
pub struct Env {
    pub admin_db_url: String,
    pub kafka: String,
    /// How many Kafka brokers answer at `kafka`, and the replication factor
    /// a deployment's topics get ([`Env::on_kafka`]).
    pub kafka_nodes: (usize, i32),
    pub mqtt_host: String,
    /// Broker 0 (every deployment's first broker).
    pub device_port: u16,
    pub bridge_port: u16,
    /// Every broker of the test stack (`infra/dev test` runs two), in order.
    pub device_ports: Vec<u16>,
    pub bridge_ports: Vec<u16>,
    pub pid_files: Vec<std::path::PathBuf>,
    /// Whether a deployment uses every broker ([`Env::all_brokers`]).
    pub use_all_brokers: bool,
    /// Whether a deployment runs its bridge as a process ([`Env::bridge_as_process`]).
    pub bridge_as_process: bool,
    /// query-api's change buffer per household ([`Env::hub_buffer`]; `None`: its default).
    pub hub_buffer: Option<usize>,
    /// command-api's wait for the read model to apply a household write ([`Env::apply_wait`]).
    pub apply_wait: Option<Duration>,
    /// The bridge's MQTT request queue per broker ([`Env::bridge_queue`]).
    pub bridge_queue: Option<usize>,
    /// The bridge's per-device message rate and burst ([`Env::device_rate`]).
    pub device_rate: Option<(u32, u32)>,
    pub bridge_password: String,
    pub pki: PkiDir,
    pub bin_dir: std::path::PathBuf,
}

fn ports(list: &str) -> Vec<u16> {
    list.split(',').map(|p| p.trim().parse().expect("port")).collect()
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with `infra/dev test`, which starts Postgres, Kafka and Mosquitto for them")
    })
}

impl Env {
    pub fn from_env() -> Self {
        Self {
            admin_db_url: var("HOMELINK_TEST_DATABASE_URL"),
            kafka: var("HOMELINK_TEST_KAFKA"),
            kafka_nodes: (1, 1),
            mqtt_host: var("HOMELINK_TEST_MQTT_HOST"),
            device_port: var("HOMELINK_TEST_MQTT_DEVICE_PORT").parse().expect("port"),
            bridge_port: var("HOMELINK_TEST_MQTT_BRIDGE_PORT").parse().expect("port"),
            device_ports: ports(&var("HOMELINK_TEST_MQTT_DEVICE_PORTS")),
            bridge_ports: ports(&var("HOMELINK_TEST_MQTT_BRIDGE_PORTS")),
            pid_files: var("HOMELINK_TEST_MQTT_PID_FILES").split(',').map(Into::into).collect(),
            use_all_brokers: false,
            bridge_as_process: false,
            hub_buffer: None,
            apply_wait: None,
            bridge_queue: None,
            device_rate: None,
            bridge_password: var("HOMELINK_TEST_MQTT_BRIDGE_PASSWORD"),
            pki: PkiDir(var("HOMELINK_TEST_PKI_DIR").into()),
            bin_dir: std::env::var("HOMELINK_TEST_BIN_DIR")
                .map(Into::into)
                .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")),
        }
    }

    /// A fresh, empty database; returns its URL.
    pub async fn fresh_database(&self) -> String {
        let name = format!("t_{}", Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&self.admin_db_url).await.expect("admin connection");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let base = self.admin_db_url.rsplit_once('/').expect("url with a database").0;
        format!("{base}/{name}")
    }

    /// The deployment uses `kafka` (a private broker or cluster) instead of
    /// the test stack's.
    pub fn on_kafka(mut self, kafka: &PrivateKafka) -> Self {
        self.kafka = kafka.bootstrap();
        self.kafka_nodes = (kafka.nodes.len(), kafka.replication());
        self
    }

    /// The same components, with the services using every broker (by
    /// default a deployment uses the first only).
    pub fn all_brokers(mut self) -> Self {
        self.use_all_brokers = true;
        self
    }

    /// The same components, with query-api's per-household change buffer
    /// this small (a lagging subscriber is easy to make).
    pub fn hub_buffer(mut self, n: usize) -> Self {
        self.hub_buffer = Some(n);
        self
    }

    /// The same components, with command-api waiting only this long for the
    /// read model to apply a household write before it answers.
    pub fn apply_wait(mut self, d: Duration) -> Self {
        self.apply_wait = Some(d);
        self
    }

    /// The same components, with the (in-process) bridge queueing only this
    /// many MQTT requests per broker while a broker is away.
    pub fn bridge_queue(mut self, n: usize) -> Self {
        self.bridge_queue = Some(n);
        self
    }

    /// The same components, with the (in-process) bridge accepting only this
    /// many messages a second from one device, and this burst.
    pub fn device_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.device_rate = Some((per_second, burst));
        self
    }

    /// The same components, with the deployment's bridge run as the
    /// `homelink-device-bridge` binary ([`Stack::bridge_process`]).
    pub fn bridge_as_process(mut self) -> Self {
        self.bridge_as_process = true;
        self
    }

    /// The brokers a deployment on this environment uses: `(device port, bridge port)`.
    pub fn brokers(&self) -> (Vec<u16>, Vec<u16>) {
        if self.use_all_brokers {
            (self.device_ports.clone(), self.bridge_ports.clone())
        } else {
            (vec![self.device_port], vec![self.bridge_port])
        }
    }

    pub fn target(&self) -> Target {
        Target {
            host: self.mqtt_host.clone(),
            port: self.device_port,
            ca_pem: std::fs::read_to_string(self.pki.ca_cert()).expect("CA certificate"),
        }
    }
}

/// One isolated HomeLink deployment.
pub struct Stack {
    pub env: Env,
    pub topics: Topics,
    pub db_url: String,
    pub pool: sqlx::PgPool,
    pub appender: Appender,
    pub http: reqwest::Client,
    pub cancel: CancellationToken,
    pub projector_port: u16,
    pub query_port: u16,
    pub bridge_port: u16,
    pub command_port: u16,
    pub share_group: String,
    /// The bridge's process, when the environment asked for one.
    pub bridge_process: Option<BridgeProcess>,
}

/// Starts a device bridge in `share_group` (its own client id); returns its port.
pub async fn spawn_bridge(env: &Env, topics: &Topics, db_url: &str, share_group: &str, cancel: &CancellationToken) -> u16 {
    let mut bc = homelink_device_bridge::Config::new(db_url, &env.kafka, topics.clone(), &env.mqtt_host, env.bridge_port);
    bc.mqtt_ports = env.brokers().1;
    bc.mqtt_password = env.bridge_password.clone().into();
    bc.share_group = share_group.to_owned();
    bc.client_id = format!("bridge-{}", Uuid::new_v4().simple());
    if let Some(n) = env.bridge_queue {
        bc.mqtt_queue = n;
    }
    if let Some(r) = env.device_rate {
        bc.device_rate = r;
    }
    let bridge = homelink_device_bridge::Application::build(bc).await.expect("bridge");
    let port = bridge.port();
    tokio::spawn(bridge.run_until_stopped(cancel.clone()));
    port
}

/// A fresh prefix and database with the topics created.
pub async fn isolated() -> (Env, Topics, String) {
    isolated_on(Env::from_env()).await
}

/// Like [`isolated`] on the components `env` names.
pub async fn isolated_on(env: Env) -> (Env, Topics, String) {
    let topics = Topics::new(format!("t{}.", Uuid::new_v4().simple()));
    let (nodes, replication) = env.kafka_nodes;
    homelink_kit::kafka::wait_for_brokers(&env.kafka, nodes, Duration::from_secs(90)).await.expect("kafka answers");
    homelink_kit::kafka::ensure_topics(&env.kafka, &topics, &homelink_kit::kafka::TopicPlan::new(2, replication))
        .await
        .expect("create topics");
    let db_url = env.fresh_database().await;
    (env, topics, db_url)
}

impl Stack {
    /// Every service, wired together as the run command wires them.
    pub async fn start() -> Self {
        Self::start_on(Env::from_env()).await
    }

    /// A deployment on the components `env` names (a private Kafka, say).
    pub async fn start_on(env: Env) -> Self {
        Self::start_with(env, None).await
    }

    /// A deployment on every broker of the test stack that revokes removed
    /// devices there. Only one test may use it: the brokers have one
    /// revocation list.
    pub async fn start_revoking() -> Self {
        let env = Env::from_env().all_brokers();
        let dir = std::path::PathBuf::from(var("HOMELINK_TEST_MQTT_DIR"));
        let admins = env
            .bridge_ports
            .iter()
            .map(|port| homelink_command_api::revocation::BrokerAdmin {
                host: env.mqtt_host.clone(),
                port: *port,
                username: "homelink-admin".into(),
                password: var("HOMELINK_TEST_MQTT_ADMIN_PASSWORD").into(),
            })
            .collect();
        let mut revocation = homelink_command_api::revocation::RevocationConfig::new(dir.join("crl.pem"), env.pid_files.clone(), admins);
        revocation.every = Duration::from_secs(1);
        Self::start_with(env, Some(revocation)).await
    }

    /// A deployment whose devices are spread over every broker of the test stack.
    pub async fn start_on_all_brokers() -> Self {
        Self::start_on(Env::from_env().all_brokers()).await
    }

    /// A deployment whose command-api has these identity limits.
    pub async fn start_with_identity(identity: homelink_command_api::auth::IdentityLimits) -> Self {
        Self::start_full(Env::from_env(), None, Some(identity)).await
    }

    async fn start_with(env: Env, revocation: Option<homelink_command_api::revocation::RevocationConfig>) -> Self {
        Self::start_full(env, revocation, None).await
    }

    async fn start_full(
        env: Env,
        revocation: Option<homelink_command_api::revocation::RevocationConfig>,
        identity: Option<homelink_command_api::auth::IdentityLimits>,
    ) -> Self {
        let (env, topics, db_url) = isolated_on(env).await;
        Self::start_services(env, topics, db_url, revocation, identity).await
    }

    /// Every service on a database and topic prefix that exist already (a
    /// restored stack).
    pub async fn start_existing(env: Env, topics: Topics, db_url: String) -> Self {
        Self::start_services(env, topics, db_url, None, None).await
    }

    async fn start_services(
        env: Env,
        topics: Topics,
        db_url: String,
        revocation: Option<homelink_command_api::revocation::RevocationConfig>,
        identity: Option<homelink_command_api::auth::IdentityLimits>,
    ) -> Self {
        let cancel = CancellationToken::new();

        let pc = homelink_projector::Config::new(&db_url, &env.kafka, topics.clone());
        let projector = homelink_projector::Application::build(pc).await.expect("projector");
        let projector_port = projector.port();
        tokio::spawn(projector.run_until_stopped(cancel.clone()));

        // Each test is its own deployment: its own shared-subscription group.
        let share_group = format!("hl-{}", Uuid::new_v4().simple());
        let (bridge_port, bridge_process) = if env.bridge_as_process {
            let port = free_port();
            let ports: Vec<String> = env.brokers().1.iter().map(u16::to_string).collect();
            let args = [
                ("--database-url", db_url.clone()),
                ("--kafka-bootstrap", env.kafka.clone()),
                ("--topic-prefix", topics.prefix().to_owned()),
                ("--mqtt-host", env.mqtt_host.clone()),
                ("--mqtt-port", ports.join(",")),
                ("--client-id", format!("bridge-{}", Uuid::new_v4().simple())),
                ("--share-group", share_group.clone()),
                ("--listen", format!("127.0.0.1:{port}")),
                ("--command-fetch-wait-ms", "200".to_owned()),
            ];
            let mut p = BridgeProcess {
                child: None,
                args: args.into_iter().flat_map(|(k, v)| [k.to_owned(), v]).collect(),
                envs: vec![("HOMELINK_MQTT_BRIDGE_PASSWORD".into(), env.bridge_password.clone())],
                bin: env.bin_dir.join("homelink-device-bridge"),
            };
            p.restart();
            (port, Some(p))
        } else {
            (spawn_bridge(&env, &topics, &db_url, &share_group, &cancel).await, None)
        };

        let mut cc = homelink_command_api::Config::new(&db_url, &env.kafka, topics.clone());
        cc.tokens.key_refresh = Duration::from_millis(200);
        cc.devices = Some(homelink_command_api::devices::DeviceConfig {
            ca_cert: env.pki.ca_cert(),
            ca_key: env.pki.ca_key(),
            mqtt_host: env.mqtt_host.clone(),
            mqtt_ports: env.brokers().0,
        });
        cc.revocation = revocation;
        if let Some(d) = env.apply_wait {
            cc.apply_wait = d;
        }
        cc.identity = identity.unwrap_or_else(|| homelink_command_api::auth::IdentityLimits {
            // Tests sign up many accounts from one address.
            sign_ups_per_address_per_hour: 100_000,
            ..Default::default()
        });
        cc.tokens.publish_delay = Duration::from_secs(1);
        let command = homelink_command_api::Application::build(cc).await.expect("command-api");
        let command_port = command.port();
        tokio::spawn(command.run_until_stopped(cancel.clone()));

        let mut qc = homelink_query_api::Config::new(&db_url, format!("http://127.0.0.1:{command_port}/.well-known/jwks.json"));
        qc.jwks_refresh = Duration::from_millis(200);
        // Every past household folded is stored as a snapshot, so tests use them.
        qc.log = homelink_query_api::dry_run::Log { bootstrap: env.kafka.clone(), topics: topics.clone(), snapshot_every: 0 };
        if let Some(n) = env.hub_buffer {
            qc.subscriptions.buffer = n;
        }
        let query = homelink_query_api::Application::build(qc).await.expect("query-api");
        let query_port = query.port();
        tokio::spawn(query.run_until_stopped(cancel.clone()));

        let stack = Self {
            pool: sqlx::PgPool::connect(&db_url).await.expect("pool"),
            appender: Appender::new(&ProducerConfig::new(&env.kafka)).expect("producer"),
            http: reqwest::Client::new(),
            env,
            topics,
            db_url,
            cancel,
            projector_port,
            query_port,
            bridge_port,
            command_port,
            share_group,
            bridge_process,
        };
        for port in [projector_port, query_port, bridge_port, command_port] {
            let url = format!("http://127.0.0.1:{port}/readyz");
            let http = stack.http.clone();
            eventually(Duration::from_secs(30), &format!("{url} ready"), || {
                let (http, url) = (http.clone(), url.clone());
                async move { http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
            })
            .await;
        }
        stack
    }

    pub fn graphql_url(&self) -> String {
        format!("http://127.0.0.1:{}/graphql", self.query_port)
    }

    pub fn graphql_ws(&self) -> String {
        format!("ws://127.0.0.1:{}/graphql", self.query_port)
    }

    pub fn command_url(&self, household: Uuid, device: Uuid) -> String {
        format!("http://127.0.0.1:{}/v1/households/{household}/devices/{device}/commands", self.command_port)
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.command_port)
    }

    /// A device command request on behalf of the household's owner.
    pub fn command(&self, home: &SeededHousehold, device: Uuid) -> reqwest::RequestBuilder {
        self.http.post(self.command_url(home.household_id, device)).bearer_auth(&home.accounts[0].access_token)
    }

    pub async fn gql(&self, token: &str, query: &str, variables: Value) -> Value {
        homelink_tools::gql::query(&self.http, &self.graphql_url(), token, query, variables).await.expect("graphql request")
    }

    /// The household's last change number.
    pub async fn last_change(&self, household: Uuid) -> i64 {
        sqlx::query_scalar("SELECT COALESCE((SELECT last_seq FROM household_change_seqs WHERE household_id = $1), 0)")
            .bind(household)
            .fetch_one(&self.pool)
            .await
            .expect("last change")
    }

    /// A household subscription that misses nothing from now on. graphql-ws
    /// does not confirm a `subscribe`, so a change committed right after it
    /// may reach the server before the subscription is admitted; resumed
    /// `after` the household's last change, it is replayed instead. `query`
    /// declares `$h: ID!` and `$after: Int` and passes both; `variables`
    /// gets them.
    pub async fn subscribe_from_now(
        &self,
        token: &str,
        query: &str,
        mut variables: Value,
        household: Uuid,
    ) -> homelink_tools::gql::Subscription {
        assert!(query.contains("$after: Int"), "the query resumes after a change number: {query}");
        let after = self.last_change(household).await;
        variables["h"] = serde_json::json!(household);
        variables["after"] = serde_json::json!(after);
        homelink_tools::gql::Subscription::start(&self.graphql_ws(), token, query, variables).await.expect("subscribe")
    }

    /// A new signed-up account.
    pub async fn account(&self, name: &str) -> Account {
        let email = format!("{name}-{}@test.homelink.dev", Uuid::new_v4().simple());
        homelink_tools::api::sign_up(&self.http, &self.api(), &email, "correct horse battery", name).await.expect("sign-up")
    }

    /// Seeds a household owned by a new account (`accounts[0]`, signed in)
    /// and waits until its devices are in the registry.
    pub async fn seed(&self, devices: &[(DeviceKind, &str, &str)]) -> SeededHousehold {
        let owner = self.account("owner").await;
        let mut home = seed::household(&self.http, &self.api(), &owner, "Test home", devices).await.expect("seed");
        home.accounts.push(owner);
        let (pool, h) = (self.pool.clone(), home.household_id);
        eventually(Duration::from_secs(30), "household projected", || {
            let pool = pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM household_members WHERE household_id = $1")
                    .bind(h)
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (n == 1).then_some(())
            }
        })
        .await;
        let ids: Vec<Uuid> = home.devices.iter().map(|d| d.id).collect();
        let pool = self.pool.clone();
        eventually(Duration::from_secs(30), "devices registered", || {
            let (pool, ids) = (pool.clone(), ids.clone());
            async move {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM devices WHERE device_id = ANY($1)").bind(&ids).fetch_one(&pool).await.ok()?;
                (n == ids.len() as i64).then_some(())
            }
        })
        .await;
        home
    }

    /// A household owned by a new account with one member per entry of
    /// `roles` (invited and accepted through the API) and `devices`.
    /// `home.accounts` is the owner followed by the members, in order.
    pub async fn household_with(&self, roles: &[&str], devices: &[(DeviceKind, &str, &str)]) -> SeededHousehold {
        let mut home = self.seed(devices).await;
        for role in roles {
            let mut m = self.account(role).await;
            homelink_tools::api::add_member(&self.http, &self.api(), &home.accounts[0], home.household_id, &m, role)
                .await
                .expect("add member");
            m.role = Some((*role).to_owned());
            home.accounts.push(m);
        }
        home
    }

    /// One call to the command API, as `token` (anonymous without); its
    /// status and JSON body (`null` when it has none).
    pub async fn call(&self, token: Option<&str>, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.api()));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Starts the automation engine on this deployment (in this process,
    /// stopped with the stack); it decides from the log's end at this moment.
    /// Returns its port once it is ready.
    pub async fn start_automation(&self) -> u16 {
        let mut cfg = homelink_automation::Config::new(&self.db_url, &self.env.kafka, self.topics.clone());
        cfg.tick = Duration::from_millis(100);
        let app = homelink_automation::Application::build(cfg).await.expect("automation engine");
        let port = app.port();
        tokio::spawn(app.run_until_stopped(self.cancel.clone()));
        let (http, url) = (self.http.clone(), format!("http://127.0.0.1:{port}/readyz"));
        eventually(Duration::from_secs(30), "the automation engine ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move { http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        port
    }

    /// Waits until exactly `n` events of `event_type` were applied (the
    /// per-household counts make a double application visible).
    pub async fn wait_applied(&self, event_type: &str, n: i64, timeout: Duration) {
        let pool = self.pool.clone();
        eventually(timeout, &format!("{n} {event_type} applied"), || async {
            let got: Option<i64> = sqlx::query_scalar("SELECT sum(applied)::bigint FROM household_event_counts WHERE event_type = $1")
                .bind(event_type)
                .fetch_one(&pool)
                .await
                .ok()
                .flatten();
            (got == Some(n)).then_some(())
        })
        .await;
    }

    /// The projector's shadow cache held exactly what is stored for every
    /// shadow it served (debug builds check each hit against its row).
    pub async fn assert_shadow_cache_sound(&self) {
        let n = self.metric(self.projector_port, "homelink_projector_errors_total{kind=\"shadow_cache_diverged\"}").await;
        assert_eq!(n, 0.0, "cached shadows differed from their rows (the projector's log says which)");
    }

    /// A metric line's value from a service's `/metrics`, 0 when absent.
    pub async fn metric(&self, port: u16, series: &str) -> f64 {
        let text =
            self.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.expect("metrics").text().await.expect("metrics body");
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn spec(home: &SeededHousehold, index: usize, interval: Option<Duration>) -> DeviceSpec {
    home.spec(index, interval)
}

/// Waits until every device of the household shows online.
pub async fn all_online(stack: &Stack, token: &str, household: Uuid) {
    let q = "query($h: ID!) { household(id: $h) { devices { nodes { shadow { online } } } } }";
    eventually(Duration::from_secs(30), "every device online", || async {
        let r = stack.gql(token, q, serde_json::json!({"h": household})).await;
        let nodes = r["data"]["household"]["devices"]["nodes"].as_array()?.clone();
        nodes.iter().all(|n| n["shadow"]["online"] == true).then_some(())
    })
    .await;
}

/// Waits until the device's shadow reports `value` for `capability`.
pub async fn reported(stack: &Stack, device: Uuid, capability: &str, value: Value) {
    eventually(Duration::from_secs(30), &format!("{capability} = {value} projected"), || async {
        let c: Option<Value> = sqlx::query_scalar("SELECT reported->$2 FROM device_shadows WHERE device_id = $1")
            .bind(device)
            .bind(capability)
            .fetch_one(&stack.pool)
            .await
            .ok()?;
        (c.as_ref() == Some(&value)).then_some(())
    })
    .await;
}

/// Polls `f` until it yields a value or `timeout` passes (then fails the test
/// naming `what`). Waiting is not a timing assertion: the deadline is generous.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the next subscription payload matching `pred`.
pub async fn next_matching(sub: &mut homelink_tools::gql::Subscription, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let v = sub.next().await.expect("subscription payload");
            if pred(&v) {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting on the subscription for: {what}"))
}

/// Connects as the device (its own certificate) and publishes `payload` on `topic`; waits for the PUBACK.
pub async fn publish_as(stack: &Stack, spec: &homelink_tools::sim::DeviceSpec, topic: String, payload: Vec<u8>) {
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(homelink_tools::sim::mqtt_options(spec, &stack.env.target()), 10);
    let mut sent = false;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) if !sent => {
                    sent = true;
                    client.publish(topic.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload.clone()).await.expect("publish");
                }
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    })
    .await
    .expect("puback");
    let _ = client.disconnect().await;
}

pub fn state(seq: u64, brightness: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"v": 1, "seq": seq, "state": {"brightness": brightness}})).expect("json")
}

pub fn light_and_sensor() -> Vec<(DeviceKind, &'static str, &'static str)> {
    vec![(DeviceKind::Light, "Lamp", "Living room"), (DeviceKind::Sensor, "Climate", "Bedroom")]
}

/// A connected device client that counts the PUBACKs it gets.
pub async fn counting_connection(
    opts: rumqttc::v5::MqttOptions,
    capacity: usize,
) -> (rumqttc::v5::AsyncClient, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(opts, capacity);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let connected = std::sync::Arc::new(tokio::sync::Notify::new());
    let (a, c) = (acked.clone(), connected.clone());
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            match e {
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_)) => c.notify_one(),
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) => {
                    a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), connected.notified()).await.expect("device connected");
    (client, acked)
}

/// An Apache Kafka of a test's own (one node, or a KRaft cluster of
/// several), for tests that stop brokers; the shared one serves every other
/// test. Each node runs `infra/kafka/node` (the script `infra/dev` runs) on
/// ports and a folder of its own.
pub struct PrivateKafka {
    nodes: Vec<KafkaNode>,
    voters: String,
    cluster_id: String,
    dir: std::path::PathBuf,
}

struct KafkaNode {
    id: usize,
    port: u16,
    controller_port: u16,
    child: Option<std::process::Child>,
}

impl PrivateKafka {
    /// One node.
    pub fn start() -> Self {
        Self::cluster(1)
    }

    /// `n` nodes, each broker and controller (KRaft); with three or more,
    /// topics get three copies and `min.insync.replicas` 2.
    pub fn cluster(n: usize) -> Self {
        use base64::Engine as _;
        let dir = std::env::temp_dir().join(format!("homelink-kafka-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("kafka folder");
        let nodes: Vec<KafkaNode> =
            (1..=n).map(|id| KafkaNode { id, port: free_port(), controller_port: free_port(), child: None }).collect();
        let voters = nodes.iter().map(|k| format!("{}@127.0.0.1:{}", k.id, k.controller_port)).collect::<Vec<_>>().join(",");
        // Like Kafka's own ids, never one starting with '-' (a command line takes it for an option).
        let cluster_id = std::iter::repeat_with(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Uuid::new_v4().as_bytes()))
            .find(|c| !c.starts_with('-'))
            .expect("an id");
        let mut k = Self { nodes, voters, cluster_id, dir };
        k.restart();
        k
    }

    pub fn bootstrap(&self) -> String {
        self.nodes.iter().map(|k| format!("127.0.0.1:{}", k.port)).collect::<Vec<_>>().join(",")
    }

    /// The replication a topic on this cluster gets.
    pub fn replication(&self) -> i32 {
        if self.nodes.len() >= 3 {
            3
        } else {
            1
        }
    }

    /// Starts every node that is not running, on its port and log (after [`Self::kill`]).
    pub fn restart(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.start_node(i);
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_node(i);
        }
    }

    /// Waits until node `i` answers on its port. A JVM on a busy 2-core
    /// machine may take a while; a node that exited says why (its log)
    /// instead of a bare timeout.
    fn wait_node(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let k = &mut self.nodes[i];
        while std::net::TcpStream::connect(("127.0.0.1", k.port)).is_err() {
            let exited = k.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.join(format!("node-{}.log", k.id))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("kafka node {} did not open port {} (exit: {exited:?}); its log ends:\n{}", k.id, k.port, tail.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node `i` (0-based) again after [`Self::kill_node`].
    pub fn restart_node(&mut self, i: usize) {
        self.start_node(i);
        self.wait_node(i);
    }

    fn start_node(&mut self, i: usize) {
        let script = var("HOMELINK_TEST_KAFKA_NODE");
        let k = &mut self.nodes[i];
        let node_dir = self.dir.join(format!("node-{}", k.id));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("node-{}.log", k.id))).expect("log");
        let child = std::process::Command::new(script)
            .args([
                node_dir.to_str().expect("utf-8 path"),
                &k.id.to_string(),
                &k.port.to_string(),
                &k.controller_port.to_string(),
                &self.voters,
                &self.cluster_id,
            ])
            .env("HOMELINK_BROKER_HEAP", "256m")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a Kafka node (infra/dev test fetches Kafka)");
        k.child = Some(child);
    }

    /// The node (0-based) leading `topic`'s `partition`, asked in the Kafka protocol.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<usize> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = homelink_kit::kafka::client_config(&self.bootstrap()).create().ok()?;
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
        let leader = md.topics().iter().find(|t| t.name() == topic)?.partitions().iter().find(|p| p.id() == partition)?.leader();
        self.nodes.iter().position(|k| k.id as i32 == leader)
    }

    /// How many replicas of `topic`'s `partition` are in sync, asked in the Kafka protocol.
    pub fn in_sync(&self, topic: &str, partition: i32) -> Option<usize> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = homelink_kit::kafka::client_config(&self.bootstrap()).create().ok()?;
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
        Some(md.topics().iter().find(|t| t.name() == topic)?.partitions().iter().find(|p| p.id() == partition)?.isr().len())
    }

    /// SIGSTOP: every node stalls (a slow broker) without losing anything.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        for k in &self.nodes {
            let pid = k.child.as_ref().expect("broker running").id().to_string();
            let ok = std::process::Command::new("kill").args([sig, &pid]).status().expect("kill").success();
            assert!(ok, "kill {sig} {pid}");
        }
    }

    /// SIGKILL of every node, as a crash would.
    pub fn kill(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }

    /// SIGKILL of node `i` (0-based).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Mosquitto of a test's own, configured like the test stack's (same
/// certificates, ACL and bridge password) on ports of its own, so a test
/// may stop it without disturbing the others.
pub struct PrivateBroker {
    child: Option<std::process::Child>,
    pub device_port: u16,
    pub bridge_port: u16,
    dir: std::path::PathBuf,
}

/// A free port for a child process to bind, outside the kernel's ephemeral
/// range (32768–60999): a port the kernel hands out for `:0` binds (every
/// in-process service) could be taken before the child binds it.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let port = rng.random_range(10_000..20_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl PrivateBroker {
    pub fn start() -> Self {
        let shared = std::path::PathBuf::from(var("HOMELINK_TEST_MQTT_DIR"));
        let dir = std::env::temp_dir().join(format!("homelink-mqtt-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).expect("broker folder");
        let (device_port, bridge_port) = (free_port(), free_port());
        let conf = std::fs::read_to_string(shared.join("mosquitto.conf")).expect("the test broker's configuration");
        let mut listeners = [device_port, bridge_port].into_iter();
        let mut out = String::new();
        for line in conf.lines() {
            let key = line.split_whitespace().next().unwrap_or("");
            let line = match key {
                "pid_file" => format!("pid_file {}", dir.join("mosquitto.pid").display()),
                "persistence_location" => format!("persistence_location {}/", dir.join("data").display()),
                "log_dest" => format!("log_dest file {}", dir.join("mosquitto.log").display()),
                "plugin_opt_config_file" => {
                    std::fs::copy(shared.join("dynsec.json"), dir.join("dynsec.json")).expect("dynsec copy");
                    format!("plugin_opt_config_file {}", dir.join("dynsec.json").display())
                }
                "listener" => format!("listener {} 127.0.0.1", listeners.next().expect("two listeners")),
                _ => line.to_owned(),
            };
            out.push_str(&line);
            out.push('\n');
        }
        std::fs::write(dir.join("mosquitto.conf"), out).expect("broker configuration");
        // Mosquitto drops root privileges to its own user, which must write here.
        if std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
            let _ = std::process::Command::new("chown").args(["-R", "mosquitto"]).arg(&dir).status();
        }
        let mut b = Self { child: None, device_port, bridge_port, dir };
        b.restart();
        b
    }

    /// Starts the broker (again) on the same ports and persistence.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.device_port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not open its port");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGTERM: it saves its persistence file, as a restart would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The device bridge as its own process (the `homelink-device-bridge`
/// binary), so a test can `kill -9` it and start it again with the same
/// client id, share group and ports.
pub struct BridgeProcess {
    child: Option<std::process::Child>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    bin: std::path::PathBuf,
}

impl BridgeProcess {
    /// A service binary (`bin`) to run with `args` and `envs`; not started yet.
    pub fn new(bin: std::path::PathBuf, args: Vec<String>, envs: Vec<(String, String)>) -> Self {
        Self { child: None, args, envs, bin }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stops reading, its sockets stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`BridgeProcess::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = std::process::Command::new("kill").args([sig, &c.id().to_string()]).status().is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} the bridge");
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new(&self.bin)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("HOMELINK_TEST_BRIDGE_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .expect("start the device bridge binary (built by `cargo build --workspace`)");
        self.child = Some(child);
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
