//! Which household owns a device, and its kind: the bridge re-checks every
//! message against it, so a device that the broker let through cannot write
//! into another household's history.
//!
//! The registry is held in memory and kept current from the household
//! stream itself: [`Registry::load`] reads every registered device together
//! with how far the projection had applied the stream (one snapshot), and
//! [`follow`] continues the stream from there, applying registrations and
//! removals as they are appended — usually before the projector has. A
//! lookup therefore never goes to Postgres for a known device. Only a device
//! the registry does not know (registered a moment ago and not read yet, or
//! not registered at all) is looked up in the read model, at most every
//! [`MISS_TTL`] per device.

use homelink_events::Event;
use homelink_kit::reader::{Located, LogReader, Tp};
use homelink_kit::shutdown::CancellationToken;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// A known device's owner and kind.
pub use homelink_read_model::DeviceOwner as Owner;

/// How long a device found nowhere stays unknown before it is looked up again.
const MISS_TTL: Duration = Duration::from_secs(2);
/// Bounds the memory of lookups for devices that are not registered.
const MAX_MISSES: usize = 100_000;

#[derive(Default)]
struct State {
    known: HashMap<Uuid, Owner>,
    /// Devices the stream removed: a lookup that falls back to the read
    /// model (which may not have applied the removal yet) must not bring
    /// them back.
    removed: HashSet<Uuid>,
    /// Devices found nowhere, and when.
    misses: HashMap<Uuid, Instant>,
}

pub struct Registry {
    pool: PgPool,
    state: RwLock<State>,
}

impl Registry {
    /// The registry as the read model holds it, and where [`follow`] must
    /// continue the household stream (`topic`'s `partitions`) so that
    /// nothing is missed: the projection's own positions, read in the same
    /// snapshot.
    pub async fn load(pool: PgPool, topic: &str, partitions: &[Tp]) -> Result<(Self, Vec<(Tp, Option<i64>)>), sqlx::Error> {
        let snapshot = homelink_read_model::registry_snapshot(&pool, topic).await?;
        let at: HashMap<i32, i64> = snapshot.positions.into_iter().collect();
        let start = partitions.iter().map(|tp| (tp.clone(), at.get(&tp.1).copied())).collect();
        let state = State { known: snapshot.devices.into_iter().collect(), ..State::default() };
        tracing::info!(devices = state.known.len(), "registry loaded");
        Ok((Self { pool, state: RwLock::new(state) }, start))
    }

    /// The owner of `device`, `None` when it is not registered (or was removed:
    /// its certificate is revoked too, so this only matters for the moments
    /// before the broker closed its connection).
    pub async fn owner(&self, device: Uuid) -> Result<Option<Owner>, sqlx::Error> {
        {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            if let Some(o) = st.known.get(&device) {
                return Ok(Some(*o));
            }
            if st.removed.contains(&device) || st.misses.get(&device).is_some_and(|at| at.elapsed() < MISS_TTL) {
                return Ok(None);
            }
        }
        let found = homelink_read_model::device_owner(&self.pool, device).await?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        match found {
            // The stream may have removed it while the read model was read.
            Some(_) if st.removed.contains(&device) => Ok(None),
            Some(o) => {
                st.known.insert(device, o);
                st.misses.remove(&device);
                Ok(Some(o))
            }
            None => {
                if st.misses.len() >= MAX_MISSES {
                    st.misses.retain(|_, at| at.elapsed() < MISS_TTL);
                    if st.misses.len() >= MAX_MISSES {
                        st.misses.clear();
                    }
                }
                st.misses.insert(device, Instant::now());
                Ok(None)
            }
        }
    }

    /// Applies the registrations and removals among `events`, in log order.
    pub fn apply(&self, events: &[Located]) {
        let mut st = None;
        for l in events.iter().filter(|l| matches!(l.envelope.event_type.as_str(), "DeviceRegistered" | "DeviceRemoved")) {
            let (device, owner) = match l.envelope.event() {
                Ok(Event::DeviceRegistered(d)) => {
                    (d.device_id, Some(Owner { household_id: l.envelope.household_id, kind: d.kind, broker: d.broker.unwrap_or(0) }))
                }
                Ok(Event::DeviceRemoved(d)) => (d.device_id, None),
                _ => continue,
            };
            let st = st.get_or_insert_with(|| self.state.write().unwrap_or_else(|e| e.into_inner()));
            match owner {
                Some(o) => {
                    st.known.insert(device, o);
                    st.removed.remove(&device);
                    st.misses.remove(&device);
                }
                // A removal counts in the household that owns the device.
                None if st.known.get(&device).is_some_and(|o| o.household_id != l.envelope.household_id) => {}
                None => {
                    st.known.remove(&device);
                    st.removed.insert(device);
                }
            }
        }
    }

    /// Devices known (metrics, tests).
    pub fn len(&self) -> usize {
        self.state.read().unwrap_or_else(|e| e.into_inner()).known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Follows the household stream from where [`Registry::load`] left it
/// until `cancel`.
pub async fn follow(s: Arc<crate::Shared>, reader: LogReader, cancel: CancellationToken) {
    while let Some(batch) = reader.next(&cancel).await {
        s.registry.apply(&batch.events);
        reader.commit(&batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use homelink_events::event::{DeviceRegistered, DeviceRemoved};
    use homelink_events::{Actor, DeviceKind, Envelope};

    fn at(offset: i64, household: Uuid, event: &Event) -> Located {
        Located {
            topic: "households".into(),
            partition: 0,
            offset,
            envelope: Envelope::new(household, Actor::System("test".into()), event, Utc::now()),
        }
    }

    fn registered(device: Uuid) -> Event {
        Event::DeviceRegistered(DeviceRegistered {
            device_id: device,
            kind: DeviceKind::Lock,
            name: "Door".into(),
            room: None,
            room_id: None,
            serial: None,
            cert_serial: None,
            broker: Some(2),
            report_interval_secs: None,
        })
    }

    fn removed(device: Uuid) -> Event {
        Event::DeviceRemoved(DeviceRemoved { device_id: device, cert_serial: None, serial: None })
    }

    /// A registry whose database cannot be reached: a lookup that went
    /// there would fail, so an `Ok` answer came from memory.
    fn offline() -> Registry {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        Registry { pool, state: RwLock::new(State::default()) }
    }

    #[tokio::test]
    async fn registrations_and_removals_from_the_stream_answer_without_the_database() {
        let r = offline();
        let (home, other, lock) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        r.apply(&[at(0, home, &registered(lock))]);
        let owner = r.owner(lock).await.expect("from memory");
        assert_eq!(owner, Some(Owner { household_id: home, kind: DeviceKind::Lock, broker: 2 }));
        // Another household cannot remove it.
        r.apply(&[at(1, other, &removed(lock))]);
        assert_eq!(r.owner(lock).await.expect("from memory").map(|o| o.household_id), Some(home));
        // Its own household can; the answer is then "not registered", still without the database.
        r.apply(&[at(2, home, &removed(lock))]);
        assert_eq!(r.owner(lock).await.expect("from memory"), None);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn an_unknown_device_is_looked_up_in_the_read_model() {
        let r = offline();
        assert!(r.owner(Uuid::new_v4()).await.is_err(), "a device the stream has not named goes to the read model");
    }
}
