//! `homelink backup` and `homelink restore` (issue 18, item 4): the log and
//! what is not derived from it, in one archive with a manifest and
//! checksums, and back into an empty stack (README, "Backup and restore").
//!
//! The archive is a tar file:
//! - `manifest.json`: the format, the topic prefix and partitions, every
//!   file with its SHA-256, each partition's first offset, end and record
//!   count, each table's row count, and the read models' positions and
//!   digests at the moment of the backup (taken with the projector's gate
//!   closed), against which a restore checks what it rebuilt;
//! - `log/<topic>/<partition>.bin`: every record of every topic, in offset
//!   order, exactly as stored (key, value bytes, timestamp; framed below);
//! - `tables/<table>.csv`: the tables that are not derived from the log
//!   ([`TABLES`]), from one snapshot (`COPY … CSV HEADER`);
//! - `pki/…` and `secrets/…`: the files of those directories (the device CA
//!   with its key, the broker's certificate, the CRL; the broker passwords).
//!
//! A restore verifies every checksum before it changes anything, refuses a
//! stack that is not empty, appends the log to the same partitions in the
//! same order (offsets start again at 0: stored positions are translated),
//! loads the tables in one transaction, rebuilds the read models up to the
//! backup's positions, compares them with the manifest's digests, rebuilds
//! the rest and writes the PKI and secrets files.

use anyhow::{bail, ensure, Context};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::StreamExt;
use homelink_events::Topics;
use homelink_kit::reader::Tp;
use homelink_kit::shutdown::CancellationToken;
use homelink_projector::apply::GATE;
use homelink_projector::replay::{self, Digest};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::{Connection, PgConnection, Row};
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The tables that are not derived from the log: identity (accounts,
/// refresh tokens, signing keys, throttles), idempotency, device serial
/// claims and revocations, the command API's log positions, and the
/// automation engine's state (positions, timers, pauses, own commands).
pub const TABLES: [&str; 12] = [
    "identity_users",
    "identity_refresh_tokens",
    "identity_signing_keys",
    "identity_rate_limits",
    "idempotency_keys",
    "device_serial_claims",
    "device_kicks_confirmed",
    "desired_positions",
    "engine_offsets",
    "engine_timers",
    "engine_paused",
    "engine_sent",
];

/// Tables holding log positions `(topic, partition, <offset column>)`: a
/// restore renames their topics and moves their offsets with the log.
const POSITIONS: [(&str, &str); 2] = [("desired_positions", "\"offset\""), ("engine_offsets", "next_offset")];

const FORMAT: &str = "homelink-backup/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: String,
    pub created_at: DateTime<Utc>,
    pub topic_prefix: String,
    pub partitions: i32,
    pub log: Vec<LogFile>,
    pub tables: Vec<TableFile>,
    pub files: Vec<PlainFile>,
    pub read_models: ReadModels,
    pub note: String,
}

/// One partition's records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogFile {
    /// The topic without its prefix (`telemetry`).
    pub topic: String,
    pub partition: i32,
    /// The first offset backed up and the end (next offset).
    pub start: i64,
    pub end: i64,
    pub records: u64,
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableFile {
    pub table: String,
    pub rows: i64,
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlainFile {
    pub path: String,
    pub sha256: String,
}

/// The read models when the backup began: the projector's positions and
/// each table's digest there.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadModels {
    /// `(topic without prefix, partition, next offset)`.
    pub positions: Vec<(String, i32, i64)>,
    pub digests: Vec<TableDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableDigest {
    pub table: String,
    pub rows: i64,
    pub digest: String,
}

impl From<(String, Digest)> for TableDigest {
    fn from((table, d): (String, Digest)) -> Self {
        Self { table, rows: d.rows, digest: d.hash }
    }
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[arg(long, env = "HOMELINK_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
    pub bootstrap: String,
    #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
    pub prefix: String,
    /// The PKI directory (device CA certificate and key, broker certificate, CRL).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// The secrets directory (broker passwords).
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// The archive to write (a tar file).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The archive `homelink backup` wrote.
    #[arg(long)]
    pub archive: PathBuf,
    #[arg(long, env = "HOMELINK_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
    pub bootstrap: String,
    /// The prefix of the restored topics (the backup's own when absent).
    #[arg(long, env = "HOMELINK_TOPIC_PREFIX")]
    pub prefix: Option<String>,
    /// Copies of each partition of the created topics.
    #[arg(long, default_value_t = 1)]
    pub replication: i32,
    /// Where the PKI files go (left out when absent).
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Where the secrets files go (left out when absent).
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// How long the restored telemetry is kept, in hours (0: for ever).
    #[arg(long, env = "HOMELINK_TELEMETRY_RETENTION_HOURS", default_value_t = 168)]
    pub telemetry_retention_hours: u64,
    /// Print the outcome as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub retention: homelink_projector::RetentionArgs,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn create(path: &Path) -> anyhow::Result<Hashing<BufWriter<std::fs::File>>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(Hashing { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::new(), bytes: 0 })
}

fn finish(mut w: Hashing<BufWriter<std::fs::File>>) -> anyhow::Result<String> {
    w.flush()?;
    w.inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(hex(&w.hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let mut f = BufReader::new(std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// One record as framed in a log file: offset, timestamp (ms, -1 none),
/// key and value (length-prefixed, -1 for none), big-endian.
fn write_record(w: &mut impl Write, offset: i64, ts: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> std::io::Result<()> {
    w.write_all(&offset.to_be_bytes())?;
    w.write_all(&ts.to_be_bytes())?;
    for part in [key, value] {
        match part {
            Some(b) => {
                w.write_all(&(b.len() as i32).to_be_bytes())?;
                w.write_all(b)?;
            }
            None => w.write_all(&(-1i32).to_be_bytes())?,
        }
    }
    Ok(())
}

/// A record read back from a log file.
struct Framed {
    offset: i64,
    ts: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn read_record(r: &mut impl Read) -> anyhow::Result<Option<Framed>> {
    let mut b8 = [0u8; 8];
    match r.read_exact(&mut b8) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let offset = i64::from_be_bytes(b8);
    r.read_exact(&mut b8)?;
    let ts = i64::from_be_bytes(b8);
    let mut parts = [None, None];
    for p in &mut parts {
        let mut b4 = [0u8; 4];
        r.read_exact(&mut b4)?;
        let len = i32::from_be_bytes(b4);
        if len >= 0 {
            ensure!(len <= 64 << 20, "a record of {len} bytes: the log file is damaged");
            let mut v = vec![0u8; len as usize];
            r.read_exact(&mut v)?;
            *p = Some(v);
        }
    }
    let [key, value] = parts;
    Ok(Some(Framed { offset, ts, key, value }))
}

/// What a backup wrote.
pub struct BackupDone {
    pub manifest: Manifest,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Writes the archive; see the module documentation.
pub async fn backup(a: BackupArgs) -> anyhow::Result<BackupDone> {
    let started = Instant::now();
    let topics = Topics::new(&a.prefix);
    let staging = a.out.with_extension("partial.d");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let mut db = PgConnection::connect(&a.database_url).await.context("connecting to Postgres")?;

    // The read models' positions and digests, with the projector held at its gate.
    sqlx::query("SELECT pg_advisory_lock($1)").bind(GATE).execute(&mut db).await?;
    let read_models = read_models(&mut db, &a.prefix).await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(GATE).execute(&mut db).await?;
    let read_models = read_models?;

    // The tables from one snapshot, before the log's end is taken: every
    // position they hold is inside the backed-up log.
    let mut tables = Vec::new();
    let mut tx = db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    for table in TABLES {
        let present: bool =
            sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(format!("public.{table}")).fetch_one(&mut *tx).await?;
        if !present {
            // A deployment without that service (no automation engine, say).
            eprintln!("note: the database has no table {table} (its service never ran); not in the backup");
            continue;
        }
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut *tx).await?;
        let path = format!("tables/{table}.csv");
        let mut w = create(&staging.join(&path))?;
        {
            let mut out = tx.copy_out_raw(&format!("COPY {table} TO STDOUT WITH (FORMAT csv, HEADER)")).await?;
            while let Some(chunk) = out.next().await {
                w.write_all(&chunk?)?;
            }
        }
        tables.push(TableFile { table: table.to_owned(), rows, path, sha256: finish(w)? });
    }
    tx.commit().await?;

    // The log: every topic, every partition, from its first record to its end now.
    let names: Vec<String> = topics.all().to_vec();
    let parts = homelink_kit::reader::partitions(&a.bootstrap, &names).await?;
    let partitions = parts.iter().map(|(_, p)| p + 1).max().unwrap_or(0);
    let marks = replay::watermarks(&a.bootstrap, parts.clone()).await?;
    let bootstrap = a.bootstrap.clone();
    let (prefix, dir) = (a.prefix.clone(), staging.clone());
    let log = tokio::task::spawn_blocking(move || dump_log(&bootstrap, &prefix, &dir, &parts, &marks)).await??;

    let mut files = Vec::new();
    for (kind, src) in [("pki", &a.pki_dir), ("secrets", &a.secrets_dir)] {
        let Some(src) = src else { continue };
        for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{kind}/{name}");
            std::fs::create_dir_all(staging.join(kind))?;
            std::fs::copy(entry.path(), staging.join(&path))?;
            files.push(PlainFile { sha256: sha256_of(&staging.join(&path))?, path });
        }
    }

    let manifest = Manifest {
        format: FORMAT.into(),
        created_at: Utc::now(),
        topic_prefix: a.prefix.clone(),
        partitions,
        log,
        tables,
        files,
        read_models,
        note: "Holds the device CA's private key, the token signing keys and the broker passwords: keep it encrypted and \
               off the machines it restores. Restore with `homelink restore --archive FILE` into an empty stack."
            .into(),
    };
    std::fs::write(staging.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;

    // manifest.json first: a restore reads it before anything else.
    let partial = a.out.with_extension("partial");
    {
        let f = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
        tar.append_path_with_name(staging.join("manifest.json"), "manifest.json")?;
        let mut paths: Vec<&str> = manifest.log.iter().map(|l| l.path.as_str()).collect();
        paths.extend(manifest.tables.iter().map(|t| t.path.as_str()));
        paths.extend(manifest.files.iter().map(|f| f.path.as_str()));
        for p in paths {
            tar.append_path_with_name(staging.join(p), p)?;
        }
        let w = tar.into_inner()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&partial, &a.out)?;
    std::fs::remove_dir_all(&staging)?;
    let bytes = std::fs::metadata(&a.out)?.len();
    Ok(BackupDone { manifest, bytes, elapsed: started.elapsed() })
}

async fn read_models(db: &mut PgConnection, prefix: &str) -> anyhow::Result<ReadModels> {
    let rows = sqlx::query("SELECT topic, partition, next_offset FROM projector_offsets ORDER BY 1, 2").fetch_all(&mut *db).await?;
    let positions = rows
        .into_iter()
        .filter_map(|r| {
            let t: String = r.get(0);
            t.strip_prefix(prefix).map(|s| (s.to_owned(), r.get::<i32, _>(1), r.get::<i64, _>(2)))
        })
        .collect();
    let digests = replay::digests(db, "public").await?.into_iter().map(TableDigest::from).collect();
    Ok(ReadModels { positions, digests })
}

/// Copies every partition's records `[low, high)` into its log file.
fn dump_log(bootstrap: &str, prefix: &str, dir: &Path, parts: &[Tp], marks: &HashMap<Tp, (i64, i64)>) -> anyhow::Result<Vec<LogFile>> {
    let consumer: BaseConsumer = homelink_kit::kafka::client_config(bootstrap)
        .set("group.id", "homelink-backup")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    let mut out = Vec::new();
    for (topic, partition) in parts {
        let (low, high) = marks.get(&(topic.clone(), *partition)).copied().unwrap_or((0, 0));
        let short = topic.strip_prefix(prefix).unwrap_or(topic).to_owned();
        let path = format!("log/{short}/{partition}.bin");
        let mut w = create(&dir.join(&path))?;
        let mut records = 0u64;
        if high > low {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, *partition, Offset::Offset(low))?;
            consumer.assign(&tpl)?;
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut next = low;
            while next < high {
                ensure!(Instant::now() < deadline, "reading {topic}/{partition} stalled at offset {next} of {high}");
                let Some(m) = consumer.poll(Duration::from_secs(1)) else { continue };
                let m = m?;
                if m.offset() >= high {
                    break;
                }
                let ts = m.timestamp().to_millis().unwrap_or(-1);
                write_record(&mut w, m.offset(), ts, m.key(), m.payload())?;
                records += 1;
                next = m.offset() + 1;
            }
        }
        out.push(LogFile { topic: short, partition: *partition, start: low, end: high, records, path, sha256: finish(w)? });
    }
    Ok(out)
}

/// What a restore did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDone {
    pub records: u64,
    pub rows: i64,
    pub events_rebuilt: u64,
    /// Whether the read models could be compared: the backup holds every
    /// projected partition from offset 0 (retention trimmed none).
    pub compared: bool,
    /// Every read model rebuilt up to the backup's positions equals the
    /// manifest's digest (but `projector_offsets`: the positions themselves,
    /// reached by construction, under the restored prefix).
    pub read_models_equal: bool,
    pub differences: Vec<(TableDigest, TableDigest)>,
    pub seconds: f64,
}

/// Restores an archive into an empty stack; see the module documentation.
pub async fn restore(a: RestoreArgs) -> anyhow::Result<RestoreDone> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("homelink-restore-{}", uuid::Uuid::new_v4().simple()));
    let outcome = restore_from(&a, &dir, started).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

async fn restore_from(a: &RestoreArgs, dir: &Path, started: Instant) -> anyhow::Result<RestoreDone> {
    // Unpacked and checked before anything changes.
    let f = std::fs::File::open(&a.archive).with_context(|| format!("opening {}", a.archive.display()))?;
    tar::Archive::new(BufReader::new(f)).unpack(dir).context("unpacking the archive")?;
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).context("the archive has no manifest.json")?)?;
    ensure!(manifest.format == FORMAT, "archive format {:?}, this homelink reads {FORMAT:?}", manifest.format);
    let listed = manifest
        .log
        .iter()
        .map(|l| (&l.path, &l.sha256))
        .chain(manifest.tables.iter().map(|t| (&t.path, &t.sha256)))
        .chain(manifest.files.iter().map(|f| (&f.path, &f.sha256)));
    for (path, sum) in listed {
        ensure!(!path.contains("..") && !path.starts_with('/'), "the manifest names {path:?}");
        let got = sha256_of(&dir.join(path))?;
        ensure!(&got == sum, "{path}: checksum {got} where the manifest says {sum}: the archive is damaged");
    }
    let prefix = a.prefix.clone().unwrap_or_else(|| manifest.topic_prefix.clone());
    let topics = Topics::new(&prefix);

    // An empty stack: migrated, no rows, no records.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&a.database_url).await.context("connecting to Postgres")?;
    homelink_read_model::migrate(&pool).await?;
    homelink_command_api::migrate(&pool).await?;
    homelink_automation::migrate(&pool).await?;
    for table in TABLES.iter().chain(replay::READ_MODELS.iter()) {
        let any: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {table})")).fetch_one(&pool).await?;
        ensure!(!any, "table {table} is not empty: restore into an empty stack (a new database)");
    }
    let mut plan = homelink_kit::kafka::TopicPlan::new(manifest.partitions, a.replication);
    plan.telemetry_retention = Some(Duration::from_secs(a.telemetry_retention_hours * 3600)).filter(|d| !d.is_zero());
    homelink_kit::kafka::ensure_topics(&a.bootstrap, &topics, &plan).await?;
    let names: Vec<String> = topics.all().to_vec();
    let parts = homelink_kit::reader::partitions(&a.bootstrap, &names).await?;
    for l in &manifest.log {
        let tp = (format!("{prefix}{}", l.topic), l.partition);
        ensure!(parts.contains(&tp), "topic {} has no partition {}: the target's topics do not match the backup's", tp.0, tp.1);
    }
    let marks = replay::watermarks(&a.bootstrap, parts.clone()).await?;
    if let Some(((t, p), _)) = marks.iter().find(|(_, (_, high))| *high > 0) {
        bail!("{t}/{p} already holds records: restore into an empty stack (a new topic prefix or cluster)");
    }

    // The log, partition by partition, in order.
    let records = append_log(&a.bootstrap, &prefix, dir, &manifest.log).await?;

    // The tables, in one transaction, their log positions moved with the log.
    let mut db = PgConnection::connect(&a.database_url).await?;
    let mut tx = db.begin().await?;
    let mut rows = 0;
    for t in &manifest.tables {
        ensure!(TABLES.contains(&t.table.as_str()), "the archive holds an unknown table {}", t.table);
        let data = std::fs::read(dir.join(&t.path))?;
        let mut copy = tx.copy_in_raw(&format!("COPY {} FROM STDIN WITH (FORMAT csv, HEADER)", t.table)).await?;
        copy.send(data).await?;
        let n = copy.finish().await?;
        ensure!(n as i64 == t.rows, "{}: {n} rows loaded where the backup has {}", t.table, t.rows);
        rows += t.rows;
    }
    let (old, starts) = (manifest.topic_prefix.clone(), starts_of(&manifest));
    for (table, column) in POSITIONS {
        for ((short, partition), start) in &starts {
            sqlx::query(&format!(
                "UPDATE {table} SET topic = $1, {column} = GREATEST({column} - $2, 0) WHERE topic = $3 AND partition = $4"
            ))
            .bind(format!("{prefix}{short}"))
            .bind(start)
            .bind(format!("{old}{short}"))
            .bind(partition)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;

    // The read models: up to the backup's positions, compared, then the rest.
    let cancel = CancellationToken::new();
    let at_backup: HashMap<Tp, i64> = manifest
        .read_models
        .positions
        .iter()
        .map(|(short, p, n)| ((format!("{prefix}{short}"), *p), (n - starts.get(&(short.clone(), *p)).copied().unwrap_or(0)).max(0)))
        .collect();
    let show = |p: &replay::Progress| {
        eprintln!("[{:>7.1} s] rebuilding the read models: {} events, {:.0} events/s", p.elapsed.as_secs_f64(), p.applied, p.rate)
    };
    let mut events = replay::rebuild_to(pool.clone(), &a.bootstrap, &topics, Some(at_backup), show, &cancel).await?;
    let retention: homelink_projector::Retention = (&a.retention).into();
    retention.expire(&pool, false).await?;
    let rebuilt: Vec<TableDigest> = replay::digests(&mut db, "public").await?.into_iter().map(TableDigest::from).collect();
    let projected: Vec<String> = ["households", "telemetry", "commands", "audit"].iter().map(|t| t.to_string()).collect();
    let compared = manifest.log.iter().filter(|l| projected.contains(&l.topic)).all(|l| l.start == 0);
    let differences: Vec<(TableDigest, TableDigest)> = manifest
        .read_models
        .digests
        .iter()
        .filter(|want| compared && want.table != "projector_offsets")
        .filter_map(|want| {
            let got = rebuilt.iter().find(|g| g.table == want.table).cloned().unwrap_or(TableDigest {
                table: want.table.clone(),
                rows: 0,
                digest: "absent".into(),
            });
            (got != *want).then(|| (want.clone(), got))
        })
        .collect();
    events += replay::rebuild_to(pool.clone(), &a.bootstrap, &topics, None, show, &cancel).await?;

    for (kind, dest) in [("pki/", &a.pki_dir), ("secrets/", &a.secrets_dir)] {
        let Some(dest) = dest else { continue };
        std::fs::create_dir_all(dest)?;
        for f in manifest.files.iter().filter(|f| f.path.starts_with(kind)) {
            let target = dest.join(&f.path[kind.len()..]);
            if target.exists() {
                ensure!(sha256_of(&target)? == f.sha256, "{} exists with other content: not overwritten", target.display());
                continue;
            }
            std::fs::copy(dir.join(&f.path), &target)?;
            restrict(&target, kind == "secrets/" || f.path.ends_with(".key"))?;
        }
    }
    Ok(RestoreDone {
        records,
        rows,
        events_rebuilt: events,
        compared,
        read_models_equal: compared && differences.is_empty(),
        differences,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Private files (keys, passwords) readable by their owner only.
fn restrict(path: &Path, private: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(if private { 0o600 } else { 0o644 }))
}

/// Each backed-up partition's first offset, by `(topic without prefix, partition)`.
fn starts_of(m: &Manifest) -> HashMap<(String, i32), i64> {
    m.log.iter().map(|l| ((l.topic.clone(), l.partition), l.start)).collect()
}

/// Appends every log file to its topic and partition, in order, keeping
/// keys, values and timestamps; returns the records appended.
async fn append_log(bootstrap: &str, prefix: &str, dir: &Path, log: &[LogFile]) -> anyhow::Result<u64> {
    let producer: FutureProducer = homelink_kit::kafka::client_config(bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut total = 0;
    for l in log {
        let topic = format!("{prefix}{}", l.topic);
        let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(dir.join(&l.path))?);
        let mut pending = Vec::new();
        let mut n = 0u64;
        while let Some(rec) = read_record(&mut r)? {
            let _ = rec.offset;
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).partition(l.partition);
            if let Some(k) = &rec.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &rec.value {
                record = record.payload(v.as_slice());
            }
            if rec.ts >= 0 {
                record = record.timestamp(rec.ts);
            }
            pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
            n += 1;
            if pending.len() >= 50_000 {
                for d in pending.drain(..) {
                    d.await.map_err(|_| anyhow::anyhow!("the producer dropped a record"))?.map_err(|(e, _)| e)?;
                }
            }
        }
        for d in pending.drain(..) {
            d.await.map_err(|_| anyhow::anyhow!("the producer dropped a record"))?.map_err(|(e, _)| e)?;
        }
        ensure!(n == l.records, "{}: {n} records where the manifest says {}", l.path, l.records);
        total += n;
    }
    Ok(total)
}
