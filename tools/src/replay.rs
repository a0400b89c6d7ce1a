//! `homelink replay`: every read model rebuilt from the log into a schema of
//! its own while the live one serves, compared, and switched in when equal
//! (`homelink_projector::replay`).

use clap::Args;
use homelink_events::Topics;
use homelink_kit::shutdown::CancellationToken;
use homelink_projector::replay::{self, Phase, Progress, ReplayConfig, Report};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The database of the read models (the live ones are in its `public` schema).
    #[arg(long, env = "HOMELINK_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    #[arg(long, env = "HOMELINK_KAFKA_BOOTSTRAP")]
    pub bootstrap: String,
    #[arg(long, env = "HOMELINK_TOPIC_PREFIX", default_value = "homelink.")]
    pub prefix: String,
    /// The schema to rebuild in (created; resumed when a replay was stopped there).
    #[arg(long, default_value = "homelink_replay")]
    pub schema: String,
    /// Switch the rebuilt read models in when every table matches the live one.
    #[arg(long)]
    pub switch: bool,
    /// Start from the log's start even when an earlier replay was stopped in `--schema`.
    #[arg(long)]
    pub fresh: bool,
    /// Most records per transaction.
    #[arg(long, default_value_t = 20_000)]
    pub batch_max: usize,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub retention: homelink_projector::RetentionArgs,
}

/// Runs a replay, progress on standard error, the comparison on standard
/// output; fails when a table differs.
pub async fn run(a: ReplayArgs) -> anyhow::Result<Report> {
    let mut cfg = ReplayConfig::new(&a.database_url, &a.bootstrap, Topics::new(&a.prefix));
    cfg.schema = a.schema.clone();
    cfg.switch = a.switch;
    cfg.fresh = a.fresh;
    cfg.batch_max = a.batch_max.max(1);
    cfg.retention = (&a.retention).into();
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
    }
    let report = replay::run(&cfg, show, &cancel).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&as_json(&report))?);
    } else {
        print_report(&report);
    }
    if !report.equal() {
        anyhow::bail!("the rebuilt read models differ from the live ones; nothing switched (the rebuild stays in schema {})", a.schema);
    }
    Ok(report)
}

fn show(p: &Progress) {
    let phase = match p.phase {
        Phase::Rebuilding => "rebuilding",
        Phase::Gated => "gate closed",
    };
    eprintln!(
        "[{:>7.1} s] {phase}: {} events applied, {:.0} events/s, {} records behind the live projector",
        p.elapsed.as_secs_f64(),
        p.applied,
        p.rate,
        p.behind
    );
}

fn print_report(r: &Report) {
    println!("{:<26} {:>12} {:>12}  {:<18} {:<18} match", "table", "live rows", "rebuilt", "live digest", "rebuilt digest");
    for t in &r.tables {
        println!(
            "{:<26} {:>12} {:>12}  {:<18} {:<18} {}",
            t.table,
            t.live.rows,
            t.rebuilt.rows,
            t.live.hash,
            t.rebuilt.hash,
            if t.equal() { "yes" } else { "NO" }
        );
    }
    let secs = r.elapsed.as_secs_f64();
    println!(
        "{} events in {secs:.1} s ({:.0} events/s); the live projector waited {:.2} s at the gate",
        r.applied,
        r.applied as f64 / secs.max(1e-9),
        r.gated.as_secs_f64()
    );
    match &r.replaced {
        Some(old) => println!("switched: the rebuilt read models serve now; the replaced ones are in schema {old} (DROP SCHEMA {old} CASCADE when no longer needed)"),
        None if r.equal() => println!("equal; not switched (--switch switches)"),
        None => println!("DIFFERENT: not switched"),
    }
}

fn as_json(r: &Report) -> serde_json::Value {
    serde_json::json!({
        "applied": r.applied,
        "seconds": r.elapsed.as_secs_f64(),
        "gatedSeconds": r.gated.as_secs_f64(),
        "equal": r.equal(),
        "replaced": r.replaced,
        "tables": r.tables.iter().map(|t| serde_json::json!({
            "table": t.table,
            "equal": t.equal(),
            "live": {"rows": t.live.rows, "digest": t.live.hash},
            "rebuilt": {"rows": t.rebuilt.rows, "digest": t.rebuilt.hash},
        })).collect::<Vec<_>>(),
    })
}
