//! `homelink history export`: a household's history from the log as JSON
//! lines, CSV or Parquet. Two ways in, both audited:
//! - as the household's owner, through the command API
//!   (`GET /v1/households/{h}/history`, paged; the API checks the role and
//!   records every page in the audit log);
//! - as an operator with access to the log (`--bootstrap`, `--operator NAME`):
//!   read straight from Kafka, then a `HistoryExported` event naming the
//!   operator is appended to the audit topic.

use anyhow::{bail, Context};
use arrow_array::builder::{Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt16Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Utc};
use homelink_events::event::HistoryExported;
use homelink_events::{Actor, Envelope, Event, Topics};
use homelink_kit::history::{self, Record, Scan};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line (the API's record shape).
    Jsonl,
    /// A header row, then one row per event; the payload as JSON text.
    Csv,
    /// Apache Parquet with a typed schema (snappy-compressed).
    Parquet,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The household to export.
    #[arg(long)]
    pub household: Uuid,
    /// Events that occurred at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Events that occurred at or before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Only the events about this device.
    #[arg(long)]
    pub device: Option<Uuid>,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Where to write (standard output when absent; Parquet needs a file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// As the owner: the command API's base URL.
    #[arg(long, env = "HOMELINK_API")]
    pub api: Option<String>,
    /// As the owner: an access token (sign in at POST /v1/auth/sign-in).
    #[arg(long, env = "HOMELINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// As an operator: the Kafka bootstrap servers.
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// As an operator: the deployment's topic prefix.
    #[arg(long, default_value = "homelink.")]
    pub prefix: String,
    /// As an operator: who you are, recorded in the household's audit log.
    #[arg(long)]
    pub operator: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Exported {
    pub records: u64,
    /// Records of the household the log holds but that could not be decoded (left out).
    pub undecodable: u64,
}

pub async fn export(a: ExportArgs) -> anyhow::Result<Exported> {
    if let (Some(s), Some(u)) = (a.since, a.until) {
        if u < s {
            bail!("--until is before --since");
        }
    }
    let mut sink = Sink::open(a.format, a.out.as_deref())?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {human_pos} events ({per_sec}) {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    if a.out.is_none() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let done = match (&a.token, &a.operator) {
        (Some(token), _) => {
            let api = a.api.as_deref().context("--api (the command API's URL) is needed with --token")?;
            from_api(api, token, &a, &mut sink, &bar).await?
        }
        (None, Some(operator)) => {
            let bootstrap = a.bootstrap.as_deref().context("--bootstrap is needed with --operator")?;
            from_log(bootstrap, operator, &a, &mut sink, &bar).await?
        }
        (None, None) => bail!("say who exports: --token (an owner's access token, with --api) or --operator NAME (with --bootstrap)"),
    };
    sink.finish()?;
    bar.finish_and_clear();
    Ok(done)
}

async fn from_api(api: &str, token: &str, a: &ExportArgs, sink: &mut Sink, bar: &indicatif::ProgressBar) -> anyhow::Result<Exported> {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/households/{}/history", api.trim_end_matches('/'), a.household);
    let mut after: Option<String> = None;
    let mut done = Exported::default();
    loop {
        let mut q: Vec<(&str, String)> = vec![("limit", history_page().to_string())];
        if let Some(s) = a.since {
            q.push(("since", s.to_rfc3339()));
        }
        if let Some(u) = a.until {
            q.push(("until", u.to_rfc3339()));
        }
        if let Some(d) = a.device {
            q.push(("device", d.to_string()));
        }
        if let Some(c) = &after {
            q.push(("after", c.clone()));
        }
        let r = http.get(&url).bearer_auth(token).query(&q).send().await.context("the command API")?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.context("the command API's answer")?;
        if !status.is_success() {
            bail!("the command API answered {status}: {}", body["detail"].as_str().or(body["title"].as_str()).unwrap_or("(no detail)"));
        }
        for rec in body["records"].as_array().context("records")? {
            let rec: Record = serde_json::from_value(rec.clone()).context("a history record")?;
            sink.write(&rec)?;
            done.records += 1;
            bar.inc(1);
        }
        match body["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return Ok(done),
        }
    }
}

/// Records asked for per page (the API's most).
fn history_page() -> usize {
    5000
}

async fn from_log(
    bootstrap: &str,
    operator: &str,
    a: &ExportArgs,
    sink: &mut Sink,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Exported> {
    let topics = Topics::new(a.prefix.clone());
    let scan = Scan {
        bootstrap: bootstrap.to_owned(),
        topics: history::topics(&topics),
        household: a.household,
        since: a.since,
        until: a.until,
        device: a.device,
        after: None,
    };
    let mut failed: Option<anyhow::Error> = None;
    let mut n = 0u64;
    let scanned = history::scan(&scan, usize::MAX, |e, _| match sink.write(&Record::from(e)) {
        Ok(()) => {
            n += 1;
            bar.inc(1);
            true
        }
        Err(err) => {
            failed = Some(err);
            false
        }
    })
    .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    // Recorded after the read, with what was read: the household's owner
    // sees in the audit log that an operator exported it.
    let appender = homelink_kit::kafka::Appender::new(&homelink_kit::kafka::ProducerConfig::new(bootstrap))?;
    let ev =
        Event::HistoryExported(HistoryExported { since: a.since, until: a.until, device: a.device, via: "operator".into(), records: n });
    let env = Envelope::new(a.household, Actor::System(format!("operator:{operator}")), &ev, Utc::now());
    appender.append(&topics.audit(), &env).await.context("recording the export in the audit log")?;
    Ok(Exported { records: n, undecodable: scanned.undecodable })
}

/// Where records go.
pub enum Sink {
    Jsonl(Box<dyn Write>),
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    Parquet(Box<ParquetSink>),
}

fn output(out: Option<&std::path::Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    })
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 15] = [
    "topic",
    "partition",
    "offset",
    "event_id",
    "occurred_at",
    "type",
    "v",
    "actor_kind",
    "actor_id",
    "stream",
    "seq",
    "causation_id",
    "correlation_id",
    "device_id",
    "payload",
];

fn actor_parts(a: &Actor) -> (&'static str, String) {
    match a {
        Actor::User(u) => ("user", u.clone()),
        Actor::Device(d) => ("device", d.to_string()),
        Actor::System(s) => ("system", s.clone()),
    }
}

impl Sink {
    pub fn open(format: Format, out: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Ok(match format {
            Format::Jsonl => Sink::Jsonl(output(out)?),
            Format::Csv => {
                let mut w = csv::Writer::from_writer(output(out)?);
                w.write_record(CSV_COLUMNS)?;
                Sink::Csv(Box::new(w))
            }
            Format::Parquet => {
                let path = out.context("Parquet is written to a file: give --out")?;
                Sink::Parquet(Box::new(ParquetSink::create(path)?))
            }
        })
    }

    pub fn write(&mut self, r: &Record) -> anyhow::Result<()> {
        match self {
            Sink::Jsonl(w) => {
                serde_json::to_writer(&mut *w, r)?;
                w.write_all(b"\n")?;
            }
            Sink::Csv(w) => {
                let (kind, id) = actor_parts(&r.actor);
                let opt = |u: Option<Uuid>| u.map(|u| u.to_string()).unwrap_or_default();
                w.write_record([
                    r.topic.clone(),
                    r.partition.to_string(),
                    r.offset.to_string(),
                    r.event_id.to_string(),
                    r.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    r.event_type.clone(),
                    r.v.to_string(),
                    kind.to_owned(),
                    id,
                    r.stream.clone(),
                    r.seq.map(|s| s.to_string()).unwrap_or_default(),
                    opt(r.causation_id),
                    opt(r.correlation_id),
                    opt(r.device_id),
                    r.payload.to_string(),
                ])?;
            }
            Sink::Parquet(p) => p.push(r)?,
        }
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Jsonl(mut w) => w.flush()?,
            Sink::Csv(mut w) => w.flush()?,
            Sink::Parquet(p) => p.close()?,
        }
        Ok(())
    }
}

/// Rows per Parquet row group batch.
const BATCH: usize = 8192;

/// The Parquet schema of an export: one column per record field, typed
/// (times as UTC microseconds, ids as text, the payload as JSON text).
pub fn parquet_schema() -> SchemaRef {
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("occurred_at", utc, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("v", DataType::UInt16, false),
        Field::new("actor_kind", DataType::Utf8, false),
        Field::new("actor_id", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, true),
        Field::new("causation_id", DataType::Utf8, true),
        Field::new("correlation_id", DataType::Utf8, true),
        Field::new("device_id", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, false),
    ]))
}

pub struct ParquetSink {
    writer: parquet::arrow::ArrowWriter<std::fs::File>,
    schema: SchemaRef,
    rows: Vec<Record>,
}

impl ParquetSink {
    fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_created_by("homelink history export".into())
            .build();
        let schema = parquet_schema();
        let writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        Ok(Self { writer, schema, rows: Vec::with_capacity(BATCH) })
    }

    fn push(&mut self, r: &Record) -> anyhow::Result<()> {
        self.rows.push(r.clone());
        if self.rows.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let text = |f: &dyn Fn(&Record) -> String| {
            let mut b = StringBuilder::new();
            for r in &rows {
                b.append_value(f(r));
            }
            Arc::new(b.finish()) as ArrayRef
        };
        let id = |f: &dyn Fn(&Record) -> Option<Uuid>| {
            let mut b = StringBuilder::new();
            for r in &rows {
                b.append_option(f(r).map(|u| u.to_string()));
            }
            Arc::new(b.finish()) as ArrayRef
        };
        let mut partition = Int32Builder::new();
        let mut offset = Int64Builder::new();
        let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut v = UInt16Builder::new();
        let mut seq = UInt64Builder::new();
        for r in &rows {
            partition.append_value(r.partition);
            offset.append_value(r.offset);
            at.append_value(r.occurred_at.timestamp_micros());
            v.append_value(r.v);
            seq.append_option(r.seq);
        }
        let columns: Vec<ArrayRef> = vec![
            text(&|r| r.topic.clone()),
            Arc::new(partition.finish()),
            Arc::new(offset.finish()),
            text(&|r| r.event_id.to_string()),
            Arc::new(at.finish()),
            text(&|r| r.event_type.clone()),
            Arc::new(v.finish()),
            text(&|r| actor_parts(&r.actor).0.to_owned()),
            text(&|r| actor_parts(&r.actor).1),
            text(&|r| r.stream.clone()),
            Arc::new(seq.finish()),
            id(&|r| r.causation_id),
            id(&|r| r.correlation_id),
            id(&|r| r.device_id),
            text(&|r| r.payload.to_string()),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    fn close(mut self) -> anyhow::Result<()> {
        self.flush()?;
        self.writer.close()?;
        Ok(())
    }
}
