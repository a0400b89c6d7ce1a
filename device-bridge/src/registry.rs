//! Which household owns a device, and its kind: read from the registry read
//! model, cached. The bridge re-checks every message against it, so a device
//! that the broker let through cannot write into another household's history.

use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A known device's owner and kind.
pub use homelink_read_model::DeviceOwner as Owner;

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
        let owner = homelink_read_model::device_owner(&self.pool, device).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(device, (owner, Instant::now()));
        Ok(owner)
    }
}
