//! Read your writes: a read given a consistency token (`homelink_kit::consistency`)
//! waits, bounded, until the read models show what the token's write did.
//!
//! Nobody can make everyone else wait (issue 15, defect 6): a token is
//! checked before any wait — signed by command-api, the reader's own, of a
//! household the reader belongs to — so no token names what will never
//! come; a read whose write is already visible takes no waiting place at
//! all; the places are shared fairly (per user, per household, in all); and
//! waiters sleep until the projector announces a committed batch
//! ([`APPLIED_CHANNEL`](homelink_events::topics::APPLIED_CHANNEL)), one
//! notification waking them all, instead of polling.

use crate::errors::codes;
use axum::http::StatusCode;
use homelink_kit::auth::Verifier;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

/// How long a read given a consistency token waits for the read models.
pub const CONSISTENCY_WAIT: Duration = Duration::from_secs(2);
/// Reads waiting at once, per process.
pub const MAX_WAITS: usize = 64;
/// … per user, and per household.
pub const MAX_WAITS_PER_USER: usize = 4;
pub const MAX_WAITS_PER_HOUSEHOLD: usize = 8;
/// A waiter looks again this often even without a notification (one lost
/// with a LISTEN connection).
const RECHECK: Duration = Duration::from_millis(250);

/// Why a read could not honour a consistency token.
#[derive(Debug, PartialEq, Eq)]
pub enum NotConsistent {
    /// Not a token command-api signed for this reader and a household of theirs.
    Invalid,
    /// The read models did not show it within [`CONSISTENCY_WAIT`].
    Timeout,
    /// Too many reads of this user, household or process wait already.
    Busy,
    Unavailable,
}

/// The waiting places in use.
#[derive(Default)]
pub struct Waits {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    users: HashMap<Uuid, usize>,
    households: HashMap<Uuid, usize>,
}

/// A waiting place; dropping it gives it back.
pub struct Place<'a> {
    waits: &'a Waits,
    user: Uuid,
    household: Uuid,
}

impl Waits {
    /// A place for `user` reading `household`, if every limit allows.
    pub fn take(&self, user: Uuid, household: Uuid) -> Option<Place<'_>> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (u, h) = (c.users.get(&user).copied().unwrap_or(0), c.households.get(&household).copied().unwrap_or(0));
        if c.total >= MAX_WAITS || u >= MAX_WAITS_PER_USER || h >= MAX_WAITS_PER_HOUSEHOLD {
            return None;
        }
        c.total += 1;
        *c.users.entry(user).or_default() += 1;
        *c.households.entry(household).or_default() += 1;
        Some(Place { waits: self, user, household })
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut guard = self.waits.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = &mut *guard;
        c.total = c.total.saturating_sub(1);
        for (map, key) in [(&mut c.users, self.user), (&mut c.households, self.household)] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

/// What a waiter needs.
#[derive(Clone)]
pub struct Consistency {
    pub pool: PgPool,
    pub verifier: Verifier,
    pub waits: Arc<Waits>,
    /// Woken once per batch the projector commits.
    pub applied: Arc<Notify>,
}

impl Consistency {
    /// Waits, bounded, until the read models show `token`'s write, for `viewer`.
    pub async fn wait(&self, viewer: Uuid, token: &str) -> Result<(), NotConsistent> {
        let (writer, claims) = self.verifier.verify_consistency(token.trim()).map_err(|_| NotConsistent::Invalid)?;
        if writer != viewer {
            return Err(NotConsistent::Invalid);
        }
        match homelink_read_model::role_in(&self.pool, claims.h, viewer).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(NotConsistent::Invalid),
            Err(_) => return Err(NotConsistent::Unavailable),
        }
        let deadline = tokio::time::Instant::now() + CONSISTENCY_WAIT;
        let mut place = None;
        loop {
            // Registered before the check, so a batch committed meanwhile still wakes it.
            let woken = self.applied.notified();
            if self.shown(&claims).await? {
                return Ok(());
            }
            if place.is_none() {
                place = Some(self.waits.take(viewer, claims.h).ok_or(NotConsistent::Busy)?);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(NotConsistent::Timeout);
            }
            let _ = tokio::time::timeout(RECHECK.min(deadline - now), woken).await;
        }
    }

    /// Whether the read models show the token's write: the household at its
    /// version, every command requested.
    async fn shown(&self, c: &homelink_kit::consistency::Claims) -> Result<bool, NotConsistent> {
        homelink_read_model::write_shown(&self.pool, c.h, c.v.map(|v| i64::try_from(v).unwrap_or(i64::MAX)), &c.c)
            .await
            .map_err(|_| NotConsistent::Unavailable)
    }
}

pub fn consistency_error(e: &NotConsistent) -> (StatusCode, &'static str, String) {
    match e {
        NotConsistent::Invalid => {
            (StatusCode::BAD_REQUEST, codes::BAD_REQUEST, "not a consistency token of yours for a household of yours".into())
        }
        NotConsistent::Timeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            codes::CONSISTENCY_TIMEOUT,
            format!("the read models did not reach the consistency token within {} s; retry", CONSISTENCY_WAIT.as_secs()),
        ),
        NotConsistent::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, "the read models are unavailable".into()),
        NotConsistent::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            codes::CONSISTENCY_TIMEOUT,
            "too many of your reads are waiting for consistency tokens; retry".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_cannot_take_every_place() {
        let w = Waits::default();
        let (a, b, h) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(9));
        let mine: Vec<Place> = (0..MAX_WAITS_PER_USER).filter_map(|_| w.take(a, h)).collect();
        assert_eq!(mine.len(), MAX_WAITS_PER_USER);
        assert!(w.take(a, Uuid::from_u128(10)).is_none(), "a user's places are spent in any household");
        assert!(w.take(b, h).is_some(), "another member still waits");
        drop(mine);
        assert!(w.take(a, h).is_some(), "places come back");
    }

    #[test]
    fn one_household_cannot_take_every_place() {
        let w = Waits::default();
        let h = Uuid::from_u128(9);
        let places: Vec<Place> = (0..100u128).filter_map(|u| w.take(Uuid::from_u128(u), h)).collect();
        assert_eq!(places.len(), MAX_WAITS_PER_HOUSEHOLD);
        assert!(w.take(Uuid::from_u128(500), Uuid::from_u128(10)).is_some());
    }
}
