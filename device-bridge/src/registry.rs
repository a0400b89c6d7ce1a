//! Which household owns a device, and its kind: read from the registry read
//! model, cached. The bridge re-checks every message against it, so a device
//! that the broker let through cannot write into another household's history.

use homelink_events::DeviceKind;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A known device's owner and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub household_id: Uuid,
    pub kind: DeviceKind,
}

const HIT_TTL: Duration = Duration::from_secs(60);
/// Short, so a device registered a moment ago is recognised quickly.
const MISS_TTL: Duration = Duration::from_secs(2);
const MAX_ENTRIES: usize = 1_000_000;

pub struct Registry {
    pool: PgPool,
    cache: Mutex<HashMap<Uuid, (Option<Owner>, Instant)>>,
}

impl Registry {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, cache: Mutex::new(HashMap::new()) }
    }

    /// The owner of `device`, `None` when it is not registered (or was removed:
    /// its certificate is revoked too, so this only matters for the moments
    /// before the broker closed its connection).
    pub async fn owner(&self, device: Uuid) -> Result<Option<Owner>, sqlx::Error> {
        if let Some((hit, at)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&device) {
            let ttl = if hit.is_some() { HIT_TTL } else { MISS_TTL };
            if at.elapsed() < ttl {
                return Ok(*hit);
            }
        }
        let row = sqlx::query("SELECT household_id, kind FROM devices WHERE device_id = $1 AND removed_at IS NULL")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        let owner = row.and_then(|r| {
            let kind: String = r.get(1);
            kind.parse().ok().map(|kind| Owner { household_id: r.get(0), kind })
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(device, (owner, Instant::now()));
        Ok(owner)
    }
}
