//! Automation runs' traces: the engine's decisions folded into
//! `automation_runs`, one row per run (and its breaker's pauses into
//! `automations.paused_at`), idempotent (a repeated event changes
//! nothing: a step is added once, by its number).

use homelink_events::Event;
use homelink_kit::reader::Located;
use serde_json::json;
use sqlx::{Postgres, Transaction};

pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)]) -> Result<(), sqlx::Error> {
    for (l, ev) in work {
        let env = &l.envelope;
        match ev {
            Event::AutomationTriggered(t) => {
                let finished = matches!(t.outcome.as_str(), "conditions" | "skipped" | "stopped" | "missed").then_some(env.occurred_at);
                sqlx::query(
                    "INSERT INTO automation_runs (run_id, automation_id, household_id, started_at, trigger, cause, what, conditions, outcome,
                                                  reason, finished_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (run_id) DO NOTHING",
                )
                .bind(t.run_id)
                .bind(t.automation_id)
                .bind(env.household_id)
                .bind(env.occurred_at)
                .bind(t.trigger as i32)
                .bind(t.cause)
                .bind(&t.what)
                .bind(serde_json::to_value(&t.conditions).unwrap_or_default())
                .bind(&t.outcome)
                .bind(&t.reason)
                .bind(finished)
                .execute(&mut **tx)
                .await?;
            }
            Event::AutomationRunStepped(s) => {
                let step = json!({"step": s.step, "outcome": s.outcome, "commands": s.commands, "detail": s.detail, "at": env.occurred_at});
                sqlx::query(
                    "UPDATE automation_runs SET steps = steps || jsonb_build_array($2::jsonb)
                      WHERE run_id = $1 AND NOT steps @> jsonb_build_array(jsonb_build_object('step', $3::int, 'outcome', $4::text))",
                )
                .bind(s.run_id)
                .bind(step)
                .bind(s.step as i32)
                .bind(&s.outcome)
                .execute(&mut **tx)
                .await?;
            }
            Event::AutomationRunFinished(f) => {
                sqlx::query(
                    "UPDATE automation_runs SET outcome = $2, reason = $3, finished_at = $4 WHERE run_id = $1 AND finished_at IS NULL",
                )
                .bind(f.run_id)
                .bind(&f.outcome)
                .bind(&f.reason)
                .bind(env.occurred_at)
                .execute(&mut **tx)
                .await?;
            }
            Event::AutomationPaused(p) => {
                sqlx::query("UPDATE automations SET paused_at = $2, paused_reason = $3 WHERE automation_id = $1")
                    .bind(p.automation_id)
                    .bind(env.occurred_at)
                    .bind(&p.reason)
                    .execute(&mut **tx)
                    .await?;
            }
            Event::AutomationResumed(r) => {
                sqlx::query("UPDATE automations SET paused_at = NULL, paused_reason = NULL WHERE automation_id = $1 AND paused_at <= $2")
                    .bind(r.automation_id)
                    .bind(env.occurred_at)
                    .execute(&mut **tx)
                    .await?;
            }
            _ => {}
        }
    }
    Ok(())
}
