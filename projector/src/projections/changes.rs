//! The household change sequence: every shadow, registry and command change a batch
//! commits gets the next number of its household (`household_change_seqs`),
//! and is retained in `household_changes` for subscribers that resume
//! `after` a number — both in one statement per batch. Gap-free because the
//! numbers are taken in the transaction that commits the changes, by the
//! projector's single writer.

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
    // The changes in the order they take their numbers: registry, shadows, commands.
    let (mut hs, mut kinds, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
    let mut push = |h: Uuid, kind: &'static str, body: Value| {
        hs.push(h);
        kinds.push(kind);
        bodies.push(body);
    };
    for r in registry.iter() {
        push(r.household_id, "registry", serde_json::to_value(r).unwrap_or(Value::Null));
    }
    for c in shadows.iter() {
        push(c.household_id, "shadow", serde_json::to_value(c).unwrap_or(Value::Null));
    }
    for c in commands.iter() {
        push(c.household_id, "command", serde_json::to_value(c).unwrap_or(Value::Null));
    }
    // Sorted: two writers (the applier, the stale sweep) lock the rows in
    // the same order, so they never deadlock.
    let mut counts: BTreeMap<Uuid, i64> = BTreeMap::new();
    for h in &hs {
        *counts.entry(*h).or_default() += 1;
    }
    let (households, ns): (Vec<Uuid>, Vec<i64>) = counts.iter().map(|(h, n)| (*h, *n)).unzip();
    // The i-th change of a household in the batch takes its new last
    // number minus its count plus i; the stored body carries it as
    // `changeSeq`. `clock_timestamp()`, not the transaction's start: taken
    // after the numbers' row lock (a change's row comes out of `seqs`), so
    // `at` grows with `change_seq` and the retention (by `at`) never
    // deletes a number and keeps an earlier one.
    let rows = sqlx::query(
        r#"WITH seqs AS (
             INSERT INTO household_change_seqs (household_id, last_seq)
             SELECT h, n FROM UNNEST($1::uuid[], $2::bigint[]) AS u(h, n)
             ON CONFLICT (household_id) DO UPDATE SET last_seq = household_change_seqs.last_seq + EXCLUDED.last_seq
             RETURNING household_id, last_seq),
           numbered AS (
             SELECT c.h, c.k, c.c, s.last_seq - n.n + row_number() OVER (PARTITION BY c.h ORDER BY c.i) AS seq
             FROM UNNEST($3::uuid[], $4::text[], $5::jsonb[]) WITH ORDINALITY AS c(h, k, c, i)
             JOIN seqs s ON s.household_id = c.h
             JOIN UNNEST($1::uuid[], $2::bigint[]) AS n(h, n) ON n.h = c.h),
           stored AS (
             INSERT INTO household_changes (household_id, change_seq, kind, change, at)
             SELECT h, seq, k, jsonb_set(c, '{changeSeq}', to_jsonb(seq)), clock_timestamp() FROM numbered
             ON CONFLICT DO NOTHING)
           SELECT household_id, last_seq FROM seqs"#,
    )
    .bind(&households)
    .bind(&ns)
    .bind(&hs)
    .bind(&kinds)
    .bind(&bodies)
    .fetch_all(&mut **tx)
    .await?;
    // The same numbers here, for the notifications.
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
    for r in registry.iter_mut() {
        r.change_seq = take(r.household_id);
    }
    for c in shadows.iter_mut() {
        c.change_seq = take(c.household_id);
    }
    for c in commands.iter_mut() {
        c.change_seq = take(c.household_id);
    }
    Ok(())
}
