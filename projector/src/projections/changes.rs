//! The household change sequence: every shadow, registry and command change a batch
//! commits gets the next number of its household (`household_change_seqs`,
//! one upsert per batch), and is retained in `household_changes` (one
//! insert per batch) for subscribers that resume `after` a number. Gap-free
//! because the numbers are taken in the transaction that commits the
//! changes, by the projector's single writer.

use homelink_events::shadow::ShadowChanged;
use homelink_events::topics::{CommandChanged, RegistryChanged};
use serde_json::Value;
use sqlx::{Postgres, Row, Transaction};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

pub async fn sequence(
    tx: &mut Transaction<'_, Postgres>,
    shadows: &mut [ShadowChanged],
    registry: &mut [RegistryChanged],
    commands: &mut [CommandChanged],
) -> Result<(), sqlx::Error> {
    if shadows.is_empty() && registry.is_empty() && commands.is_empty() {
        return Ok(());
    }
    // Sorted: two writers (the applier, the stale sweep) lock the rows in
    // the same order, so they never deadlock.
    let mut counts: BTreeMap<Uuid, i64> = BTreeMap::new();
    for h in
        registry.iter().map(|r| r.household_id).chain(shadows.iter().map(|s| s.household_id)).chain(commands.iter().map(|c| c.household_id))
    {
        *counts.entry(h).or_default() += 1;
    }
    let (households, ns): (Vec<Uuid>, Vec<i64>) = counts.iter().map(|(h, n)| (*h, *n)).unzip();
    let rows = sqlx::query(
        r#"INSERT INTO household_change_seqs (household_id, last_seq)
           SELECT h, n FROM UNNEST($1::uuid[], $2::bigint[]) AS u(h, n)
           ON CONFLICT (household_id) DO UPDATE SET last_seq = household_change_seqs.last_seq + EXCLUDED.last_seq
           RETURNING household_id, last_seq"#,
    )
    .bind(&households)
    .bind(&ns)
    .fetch_all(&mut **tx)
    .await?;
    // The next number of each household: its new last one minus what this batch takes.
    let mut next: HashMap<Uuid, i64> = rows.iter().map(|r| (r.get::<Uuid, _>(0), r.get::<i64, _>(1))).collect();
    for (h, n) in &counts {
        if let Some(last) = next.get_mut(h) {
            *last -= n - 1;
        }
    }
    let mut take = |h: Uuid| {
        let seq = next.get_mut(&h).map(|s| {
            let v = *s;
            *s += 1;
            v
        });
        seq.unwrap_or(0).max(0) as u64
    };
    let (mut hs, mut seqs, mut kinds, mut bodies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in registry.iter_mut() {
        r.change_seq = take(r.household_id);
        hs.push(r.household_id);
        seqs.push(r.change_seq as i64);
        kinds.push("registry");
        bodies.push(serde_json::to_value(&*r).unwrap_or(Value::Null));
    }
    for s in shadows.iter_mut() {
        s.change_seq = take(s.household_id);
        hs.push(s.household_id);
        seqs.push(s.change_seq as i64);
        kinds.push("shadow");
        bodies.push(serde_json::to_value(&*s).unwrap_or(Value::Null));
    }
    for c in commands.iter_mut() {
        c.change_seq = take(c.household_id);
        hs.push(c.household_id);
        seqs.push(c.change_seq as i64);
        kinds.push("command");
        bodies.push(serde_json::to_value(&*c).unwrap_or(Value::Null));
    }
    sqlx::query(
        // `clock_timestamp()`, not the transaction's start: taken after the
        // numbers' row lock, so `at` grows with `change_seq` and the
        // retention (by `at`) never deletes a number and keeps an earlier one.
        r#"INSERT INTO household_changes (household_id, change_seq, kind, change, at)
           SELECT h, s, k, c, clock_timestamp() FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[]) AS u(h, s, k, c)
           ON CONFLICT DO NOTHING"#,
    )
    .bind(&hs)
    .bind(&seqs)
    .bind(&kinds)
    .bind(&bodies)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
