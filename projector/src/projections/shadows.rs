//! `device_shadows`: each device's twin — reported and desired state,
//! per-property metadata, battery, presence and versions — folded with
//! [`Shadow::apply_twin`]; announces every committed change on
//! `homelink_shadow_changed` and returns the commands a report confirmed.
//!
//! The single writer keeps the shadows it wrote or read in a
//! [`ShadowCache`] (bounded; filled from Postgres on a miss), so a batch of
//! reports from devices seen before is folded and written without reading
//! their rows back. The cache holds only committed state: a batch's shadows
//! enter it after its COMMIT, and any failed transaction empties it (its
//! COMMIT may have landed although the client saw an error).

use chrono::{DateTime, SubsecRound, Utc};
use homelink_events::shadow::{Shadow, ShadowChanged, Trail, DEFAULT_REPORT_INTERVAL_SECS};
use homelink_events::Event;
use homelink_kit::reader::Located;
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::{Postgres, Transaction};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// Most shadows the single writer keeps in memory (≈ 1–2 KB each): the
/// devices reporting at the seed's operating point (100,000 online) fit.
pub const SHADOW_CACHE_MAX: usize = 200_000;

/// The committed shadows of the devices the projector saw last, with their
/// report intervals; see the module documentation.
pub struct ShadowCache {
    entries: HashMap<Uuid, (Shadow, u32)>,
    max: usize,
}

impl ShadowCache {
    pub fn new(max: usize) -> Self {
        Self { entries: HashMap::new(), max }
    }

    /// Forgets everything (after a failed transaction).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Takes in the shadows of a committed batch.
    pub fn commit(&mut self, staged: Staged) {
        for device in staged.unwritten {
            self.entries.remove(&device);
        }
        for (device, shadow, interval) in staged.written {
            self.entries.insert(device, (shadow, interval));
        }
        if self.entries.len() > self.max {
            // Arbitrary victims (hash order) down to three quarters: cheap,
            // and a victim costs one row in the next batch's read.
            let excess = self.entries.len() - self.max * 3 / 4;
            let victims: Vec<Uuid> = self.entries.keys().take(excess).copied().collect();
            for v in victims {
                self.entries.remove(&v);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Folds the events in log order with [`Shadow::apply_twin`] onto the
/// shadows the batch touches (from `cache`, the others read in one
/// statement), and writes the changed ones back in one statement. Returns
/// one change per changed shadow, the commands confirmed with the time of
/// the report that confirmed them, and the shadows for the cache once the
/// transaction commits.
pub async fn apply(tx: &mut Transaction<'_, Postgres>, work: &[(&Located, Event)], cache: &ShadowCache) -> Result<Applied, sqlx::Error> {
    let touched: HashSet<Uuid> = work.iter().filter(|(_, e)| touches(e)).filter_map(|(_, e)| e.device_id()).collect();
    if touched.is_empty() {
        return Ok(Applied::default());
    }
    let mut current: HashMap<Uuid, Shadow> = HashMap::with_capacity(touched.len());
    let mut intervals: HashMap<Uuid, u32> = HashMap::with_capacity(touched.len());
    let mut missing = Vec::new();
    for device in touched {
        match cache.entries.get(&device) {
            Some((shadow, interval)) => {
                current.insert(device, shadow.clone());
                intervals.insert(device, *interval);
            }
            None => missing.push(device),
        }
    }
    // Debug builds (every test) check each cached shadow against its row.
    let diverged = if cfg!(debug_assertions) { diverged(tx, &mut current).await? } else { 0 };
    // The others with their report interval, and their shadow if they have one.
    let rows = if missing.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT u.id, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen, s.status_offset, s.property_seq, s.battery_seq,
                s.desired, s.metadata, d.report_interval_secs, s.device_id IS NOT NULL, s.twin
         FROM UNNEST($1::uuid[]) AS u(id) LEFT JOIN device_shadows s ON s.device_id = u.id LEFT JOIN devices d ON d.device_id = u.id",
        )
        .bind(&missing)
        .fetch_all(&mut **tx)
        .await?
    };
    for r in rows {
        let id: Uuid = r.get(0);
        if let Some(i) = r.get::<Option<i32>, _>(12) {
            intervals.insert(id, i.max(1) as u32);
        }
        if !r.get::<bool, _>(13) {
            continue;
        }
        current.insert(id, shadow_of(&r));
    }
    let mut changed: HashMap<Uuid, Uuid> = HashMap::new(); // device -> household
    let mut confirmed = Vec::new();
    // What each device reported before the batch, and every value each property took in it.
    let mut trails: HashMap<Uuid, (Map<String, Value>, Trail)> = HashMap::new();
    // Shadows whose twin facts changed but nothing shown: stored, not announced.
    let mut facts_only: HashMap<Uuid, Uuid> = HashMap::new();
    for (l, ev) in work {
        let Some(device) = ev.device_id() else {
            continue;
        };
        if !touches(ev) {
            continue;
        }
        let shadow = current.entry(device).or_default();
        let (_, trail) = trails.entry(device).or_insert_with(|| {
            let mut t = Trail::default();
            t.note(&shadow.reported);
            (shadow.reported.clone(), t)
        });
        // At the precision Postgres keeps (µs): a shadow read back from its
        // row compares equal to the one folded in memory, so a record read
        // again (a producer's retry, in another batch) changes nothing.
        let applied = shadow.apply_twin(ev, l.envelope.occurred_at.trunc_subsecs(6), l.offset);
        trail.note(&shadow.reported);
        if applied.changed {
            changed.insert(device, l.envelope.household_id);
        } else if applied.facts_changed {
            facts_only.insert(device, l.envelope.household_id);
        }
        confirmed.extend(applied.confirmed);
    }
    // The cache holds exactly what is stored: the shadows written, each
    // with its report interval (a report ahead of its registration has
    // none yet, and is not cached). A shadow the fold touched but did not
    // write (a no-op, whose in-memory copy may still differ in what is not
    // shown, such as the position of the last status) leaves the cache.
    let staged = |mut current: HashMap<Uuid, Shadow>| -> Staged {
        let mut staged = Staged::default();
        for (device, shadow) in current.drain() {
            match intervals.get(&device) {
                Some(i) if changed.contains_key(&device) || facts_only.contains_key(&device) => staged.written.push((device, shadow, *i)),
                _ => staged.unwritten.push(device),
            }
        }
        staged
    };
    if changed.is_empty() && facts_only.is_empty() {
        return Ok(Applied { notes: Vec::new(), confirmed, staged: staged(current), diverged });
    }
    let mut cols = ShadowColumns::default();
    for (device, household) in facts_only.iter().filter(|(d, _)| !changed.contains_key(*d)) {
        cols.push(*device, *household, &current[device]);
    }
    let mut notes = Vec::with_capacity(changed.len());
    for (device, household) in &changed {
        let s = &current[device];
        cols.push(*device, *household, s);
        let mut change = ShadowChanged::new(*household, *device, s);
        change.report_interval_secs = intervals.get(device).copied().unwrap_or(DEFAULT_REPORT_INTERVAL_SECS);
        if let Some((before, trail)) = trails.get(device) {
            change.transitions = trail.transitions(before);
        }
        notes.push(change);
    }
    sqlx::query(
        r#"INSERT INTO device_shadows (device_id, household_id, reported, seq, version, battery, online, last_seen, status_offset,
                                      property_seq, battery_seq, desired, metadata, twin, updated_at)
           SELECT d, h, r, s, v, b, o, l, so, ps, bs, de, md, tw, now()
           FROM UNNEST($1::uuid[], $2::uuid[], $3::jsonb[], $4::bigint[], $5::bigint[], $6::smallint[], $7::bool[], $8::timestamptz[],
                       $9::bigint[], $10::jsonb[], $11::bigint[], $12::jsonb[], $13::jsonb[], $14::jsonb[])
             AS u(d, h, r, s, v, b, o, l, so, ps, bs, de, md, tw)
           ON CONFLICT (device_id) DO UPDATE SET
             reported = EXCLUDED.reported, seq = EXCLUDED.seq, version = EXCLUDED.version, battery = EXCLUDED.battery,
             online = EXCLUDED.online, last_seen = EXCLUDED.last_seen, status_offset = EXCLUDED.status_offset,
             property_seq = EXCLUDED.property_seq, battery_seq = EXCLUDED.battery_seq,
             desired = EXCLUDED.desired, metadata = EXCLUDED.metadata, twin = EXCLUDED.twin, updated_at = now()"#,
    )
    .bind(&cols.device)
    .bind(&cols.household)
    .bind(&cols.reported)
    .bind(&cols.seq)
    .bind(&cols.version)
    .bind(&cols.battery)
    .bind(&cols.online)
    .bind(&cols.last_seen)
    .bind(&cols.status_offset)
    .bind(&cols.property_seq)
    .bind(&cols.battery_seq)
    .bind(&cols.desired)
    .bind(&cols.metadata)
    .bind(&cols.twin)
    .execute(&mut **tx)
    .await?;
    Ok(Applied { notes, confirmed, staged: staged(current), diverged })
}

/// A shadow from a row whose columns 1–11 are `reported, seq, version,
/// battery, online, last_seen, status_offset, property_seq, battery_seq,
/// desired, metadata`, and column 14 (if any) its twin's facts.
pub fn shadow_of(r: &sqlx::postgres::PgRow) -> Shadow {
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    Shadow {
        reported: object(r.get(1)),
        seq: r.get::<Option<i64>, _>(2).unwrap_or(0).max(0) as u64,
        version: r.get::<Option<i64>, _>(3).unwrap_or(0).max(0) as u64,
        battery: r.get::<Option<i16>, _>(4).map(|b| b as u8),
        online: r.get::<Option<bool>, _>(5).unwrap_or(false),
        last_seen: r.get(6),
        status_offset: r.get::<Option<i64>, _>(7).unwrap_or(-1),
        property_seq: r.get::<Option<Value>, _>(8).and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        battery_seq: r.get::<Option<i64>, _>(9).unwrap_or(0).max(0) as u64,
        desired: object(r.get(10)),
        metadata: r.get::<Option<Value>, _>(11).and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        twin: r.try_get::<Option<Value>, _>(14).ok().flatten().and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
    }
}

/// Whether an event changes a shadow.
fn touches(e: &Event) -> bool {
    matches!(
        e,
        Event::DeviceStateReported(_)
            | Event::DeviceStatusChanged(_)
            | Event::DeviceCommandRequested(_)
            | Event::DeviceCommandExpired(_)
            | Event::DeviceCommandRevoked(_)
            | Event::DeviceCommandAcked(_)
    )
}

/// What a batch did to the shadows.
#[derive(Default)]
pub struct Applied {
    /// One change per changed shadow (its change sequence number still 0).
    pub notes: Vec<ShadowChanged>,
    /// Commands now confirmed, with the time of the report that completed each.
    pub confirmed: Vec<(Uuid, DateTime<Utc>)>,
    /// The touched shadows, for [`ShadowCache::commit`].
    pub staged: Staged,
    /// Cached shadows that differed from their rows (checked in debug
    /// builds only; always 0 unless the cache is wrong).
    pub diverged: u64,
}

/// Compares the cached shadows in `current` with their rows; replaces any
/// that differ with the stored one, and says how many did.
async fn diverged(tx: &mut Transaction<'_, Postgres>, current: &mut HashMap<Uuid, Shadow>) -> Result<u64, sqlx::Error> {
    let ids: Vec<Uuid> = current.keys().copied().collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT u.id, s.reported, s.seq, s.version, s.battery, s.online, s.last_seen, s.status_offset, s.property_seq, s.battery_seq,
                s.desired, s.metadata, NULL, s.device_id IS NOT NULL, s.twin
         FROM UNNEST($1::uuid[]) AS u(id) LEFT JOIN device_shadows s ON s.device_id = u.id",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut n = 0;
    for r in rows {
        let id: Uuid = r.get(0);
        let stored = if r.get::<bool, _>(13) { shadow_of(&r) } else { Shadow::default() };
        if current.get(&id) != Some(&stored) {
            tracing::error!(device = %id, cached = ?current.get(&id), ?stored, "the shadow cache differs from the stored shadow");
            current.insert(id, stored);
            n += 1;
        }
    }
    Ok(n)
}

/// What a batch leaves for the shadow cache.
#[derive(Default)]
pub struct Staged {
    /// The shadows written, with their report intervals.
    pub written: Vec<(Uuid, Shadow, u32)>,
    /// Devices touched but not written (or without an interval).
    pub unwritten: Vec<Uuid>,
}

#[derive(Default)]
struct ShadowColumns {
    device: Vec<Uuid>,
    household: Vec<Uuid>,
    reported: Vec<Value>,
    seq: Vec<i64>,
    version: Vec<i64>,
    battery: Vec<Option<i16>>,
    online: Vec<bool>,
    last_seen: Vec<Option<DateTime<Utc>>>,
    status_offset: Vec<i64>,
    property_seq: Vec<Value>,
    battery_seq: Vec<i64>,
    desired: Vec<Value>,
    metadata: Vec<Value>,
    twin: Vec<Value>,
}

impl ShadowColumns {
    fn push(&mut self, device: Uuid, household: Uuid, s: &Shadow) {
        self.device.push(device);
        self.household.push(household);
        self.reported.push(Value::Object(s.reported.clone()));
        // `seq` fits an i64: the MQTT edge refuses larger ones and the
        // applier dead-letters any that reach it another way (`unstorable`).
        self.seq.push(i64::try_from(s.seq).unwrap_or(i64::MAX));
        self.version.push(s.version as i64);
        self.battery.push(s.battery.map(i16::from));
        self.online.push(s.online);
        self.last_seen.push(s.last_seen);
        self.status_offset.push(s.status_offset);
        self.property_seq.push(serde_json::to_value(&s.property_seq).unwrap_or_default());
        self.battery_seq.push(i64::try_from(s.battery_seq).unwrap_or(i64::MAX));
        self.desired.push(Value::Object(s.desired.clone()));
        self.metadata.push(serde_json::to_value(&s.metadata).unwrap_or_default());
        self.twin.push(serde_json::to_value(&s.twin).unwrap_or_default());
    }
}
