//! The one write path every household command takes (households, members,
//! the registry): [`AppState::write_household`].
//!
//! **Consistency**: a household's commands are
//! serialized by a Postgres advisory lock on the household id, held from the
//! decision until the projector applied the new event. Under the lock the
//! writer first waits until the read model covers the household's whole Kafka
//! partition (high watermark), then loads the aggregate, decides with the pure
//! [`Household::apply`], appends with `seq = version + 1`, and waits for the
//! read model to show that version. Two concurrent commands thus decide one
//! after the other against the state the first produced; the loser gets 409.
//! Should an event still be decided on a stale version (an append whose 503
//! answer raced with its late arrival), the projector's fold refuses it by its
//! `seq`, the same way on every rebuild.
//!
//! Authorization is checked twice: against the state before the lock (404 for
//! a non-member, exactly as for a household that does not exist; 403 for a
//! role that may not), and again by the decision under the lock, where a
//! change made meanwhile (you were demoted) is a 409.

use crate::audit::audit_denied;
use crate::caller::Requester;
use crate::problem::ApiError;
use crate::AppState;
use chrono::Utc;
use homelink_events::household::{Action, Household, Violation};
use homelink_events::{Envelope, Event, Role};
use homelink_read_model::load_household;
use sqlx::PgConnection;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The outcome of a household write.
pub struct Written {
    pub version: u64,
}

/// A household command: the rule before the lock, and the decision under it.
pub struct HouseholdCommand<'a> {
    pub household: Uuid,
    pub action: &'static str,
    pub target: Option<String>,
    /// The invitation the decision needs to see, if any.
    pub invitation: Option<Uuid>,
    /// Who may even try: `None` = any member; `Some(a)` = roles allowing `a`.
    /// Non-members get 404 unless `open_to_non_members`.
    pub requires: Option<Action<'a>>,
    pub open_to_non_members: bool,
}

fn conflict(v: &Violation) -> ApiError {
    let slug = match v {
        // A device or room the household does not have: like any missing resource.
        Violation::UnknownDevice | Violation::UnknownRoom => return ApiError::NotFound,
        Violation::DeviceRemoved => "device-removed",
        Violation::DeviceExists => "device-exists",
        Violation::RoomNameTaken => "room-name-taken",
        Violation::UnknownScene => return ApiError::NotFound,
        Violation::SceneExists => "scene-exists",
        Violation::SceneNameTaken => "scene-name-taken",
        Violation::InvalidScene(homelink_events::scene::TargetFault::Invalid { path, reason }) => {
            return ApiError::InvalidAt(path.clone(), reason.clone())
        }
        Violation::InvalidScene(homelink_events::scene::TargetFault::Unfit { path, reason }) => {
            return ApiError::UnfitAt(path.clone(), reason.clone())
        }
        Violation::UnknownAutomation => return ApiError::NotFound,
        Violation::AutomationExists => "automation-exists",
        Violation::AutomationNameTaken => "automation-name-taken",
        Violation::InvalidAutomation(f) => {
            let path = format!("/definition{}", f.path);
            return if f.unfit { ApiError::UnfitAt(path, f.reason.clone()) } else { ApiError::InvalidAt(path, f.reason.clone()) };
        }
        Violation::UnknownTimeZone(_) => return ApiError::InvalidAt("/timeZone".into(), v.to_string()),
        Violation::LastOwner => "last-owner",
        Violation::StaleVersion { .. } => "stale-version",
        Violation::NotAMember => "not-a-member",
        Violation::AlreadyMember => "already-member",
        Violation::UnknownInvitation => "unknown-invitation",
        Violation::InvitationUsed => "invitation-used",
        Violation::InvitationExpired => "invitation-expired",
        Violation::SameRole => "same-role",
        Violation::AlreadyExists | Violation::NoHousehold => "conflict",
    };
    ApiError::Conflict(slug, v.to_string())
}

/// Longest a household write waits for its turn (the in-process stripe,
/// then the advisory lock).
const LOCK_WAIT: Duration = Duration::from_secs(20);

/// In-process lock stripes for household writes.
pub const HOUSEHOLD_STRIPES: usize = 256;

/// Advisory-lock key of a household.
fn lock_key(h: Uuid) -> i64 {
    homelink_read_model::locks::Lock::Household(h).key()
}

impl AppState {
    /// Runs one household command; `decide` turns the fresh aggregate into the event.
    pub async fn write_household(
        &self,
        who: &Requester,
        cmd: HouseholdCommand<'_>,
        decide: impl FnOnce(&Household, Option<Role>) -> Result<Event, Violation>,
    ) -> Result<Written, ApiError> {
        let h = cmd.household;
        // 1. Before the lock: existence, membership and role.
        self.authorize_household(who, &cmd).await?;

        // 2. Under the lock: catch up, decide, append, wait until applied. The
        // in-process stripe lock queues this instance's requests without each
        // holding a Postgres connection; the advisory lock serializes instances.
        // Both waits are bounded, so a queued write never outlives its
        // idempotency claim's lease: it answers 503 with nothing appended.
        let stripe = &self.household_stripes[(lock_key(h) as u64 % HOUSEHOLD_STRIPES as u64) as usize];
        let _local = tokio::time::timeout(LOCK_WAIT, stripe.lock()).await.map_err(|_| {
            self.metrics.errors.with_label_values(&["household_lock_wait"]).inc();
            ApiError::Unavailable(format!("household {h} is busy; try again"))
        })?;
        let mut tx = self.pool.begin().await.map_err(ApiError::db)?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{}ms'", LOCK_WAIT.as_millis())).execute(&mut *tx).await.map_err(ApiError::db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lock_key(h)).execute(&mut *tx).await.map_err(ApiError::db)?;
        self.wait_caught_up(&mut tx, h).await?;
        let current = load_household(&mut tx, h, cmd.invitation).await.map_err(ApiError::db)?;
        let role_now = current.role_of(who.user);
        let allowed_now = match (role_now, cmd.requires.as_ref()) {
            (None, _) => cmd.open_to_non_members,
            (Some(r), Some(a)) => r.allows(a),
            (Some(_), None) => true,
        };
        let now = Utc::now();
        let decided = if allowed_now {
            decide(&current, role_now).and_then(|ev| {
                let next = current.version + 1;
                let he = ev.household_event().ok_or(Violation::NoHousehold)?;
                current.clone().apply(&he, Some(next), now).map(|_| ev)
            })
        } else {
            Err(Violation::NotAMember)
        };
        let event = match decided {
            Ok(ev) => ev,
            Err(v) => {
                let e = if allowed_now {
                    conflict(&v)
                } else {
                    ApiError::Conflict("role-changed", "your role in the household changed meanwhile".into())
                };
                audit_denied(self, who, h, role_now, cmd.action, cmd.target, &e);
                return Err(e);
            }
        };
        let version = current.version + 1;
        let env = Envelope::new(h, who.actor(), &event, now).with_seq(version).with_meta(who.meta(role_now));
        self.append_and_apply(&mut tx, &self.topics.households(), env, h, version).await?;
        tx.commit().await.map_err(ApiError::db)?;
        Ok(Written { version })
    }

    /// The check before the lock: 404 for a household that does not exist or
    /// a non-member (unless the command is open to them), 403 for a role that
    /// may not. Refusals on an existing household are audited; ids that do
    /// not exist leave no trace. Callers with side effects of their own (a
    /// serial claim) run it before them.
    pub async fn authorize_household(&self, who: &Requester, cmd: &HouseholdCommand<'_>) -> Result<(), ApiError> {
        let h = cmd.household;
        let mut conn = self.pool.acquire().await.map_err(ApiError::db)?;
        let before = load_household(&mut conn, h, None).await.map_err(ApiError::db)?;
        drop(conn);
        let role = before.role_of(who.user);
        let refused = if !before.exists || (role.is_none() && !cmd.open_to_non_members) {
            Some(ApiError::NotFound)
        } else if let (Some(r), Some(a)) = (role, cmd.requires.as_ref()) {
            (!r.allows(a)).then(|| ApiError::Forbidden(format!("a member with role {r} may not do this")))
        } else {
            None
        };
        match refused {
            Some(e) => {
                if before.exists {
                    audit_denied(self, who, h, role, cmd.action, cmd.target.clone(), &e);
                }
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Appends a household event and waits until
    /// the read model shows `version`, so the caller reads their own write
    /// and the change is in effect for authorization (a demoted member's
    /// next command sees the new role).
    ///
    /// Once Kafka acknowledged the append the write has happened, whatever
    /// the read model does: after `apply_wait` it answers its result anyway
    /// (counted as `read_model_behind`), so an `Idempotency-Key` retry gets
    /// that result and never a second effect. The next write of the
    /// household waits for the read model to catch up before it decides.
    pub async fn append_and_apply(&self, db: &mut PgConnection, topic: &str, env: Envelope, h: Uuid, version: u64) -> Result<(), ApiError> {
        self.append(topic, &env).await?;
        let deadline = Instant::now() + self.apply_wait;
        let mut pause = Duration::from_millis(2);
        loop {
            let v = homelink_read_model::household_version(&mut *db, h).await.map_err(ApiError::db)?;
            if v.is_some_and(|v| v >= version as i64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.metrics.errors.with_label_values(&["read_model_behind"]).inc();
                tracing::warn!(%h, version, "a household write is in the log but not applied yet; answering its result");
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Appends and waits for Kafka's delivery report, however long librdkafka
    /// takes to know (its delivery timeout); the client's answer is bounded
    /// by the write layer instead (idempotency.rs), so the outcome is never
    /// cut off while still unknown.
    /// The position goes into the write's consistency token.
    pub async fn append(&self, topic: &str, env: &Envelope) -> Result<homelink_kit::kafka::Position, ApiError> {
        let pos = self.appender.append(topic, env).await.map_err(|e| {
            self.metrics.errors.with_label_values(&["kafka_produce"]).inc();
            ApiError::InDoubt(format!("kafka: {e}"))
        })?;
        crate::idempotency::wrote(topic == self.topics.households(), env);
        Ok(pos)
    }

    /// Appends several envelopes in this order (librdkafka keeps the order of
    /// what is queued for a partition, and they share the household's key)
    /// and waits for every acknowledgement.
    pub async fn append_all(&self, topic: &str, envelopes: &[Envelope]) -> Result<(), ApiError> {
        let failed = |e: homelink_kit::Error| {
            self.metrics.errors.with_label_values(&["kafka_produce"]).inc();
            ApiError::InDoubt(format!("kafka: {e}"))
        };
        let mut acks = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let ack = self.appender.enqueue(topic, env).map_err(failed)?;
            crate::idempotency::wrote(topic == self.topics.households(), env);
            acks.push(ack);
        }
        for ack in futures::future::join_all(acks).await {
            ack.map_err(failed)?;
        }
        Ok(())
    }

    /// Waits until the read model applied every record of the household's
    /// partition that Kafka acknowledged (up to the high watermark).
    async fn wait_caught_up(&self, db: &mut PgConnection, h: Uuid) -> Result<(), ApiError> {
        let topic = self.topics.households();
        let partition = homelink_read_model::household_partition(&mut *db, h).await.map_err(ApiError::db)?;
        let Some(partition) = partition else {
            return Ok(());
        };
        let high = self
            .appender
            .high_watermark(&topic, partition, self.append_timeout)
            .await
            .map_err(|e| ApiError::Unavailable(format!("kafka watermark: {e}")))?;
        let deadline = Instant::now() + self.append_timeout;
        loop {
            if homelink_read_model::applied_through(&mut *db, &topic, partition, high).await.map_err(ApiError::db)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.metrics.errors.with_label_values(&["read_model_behind"]).inc();
                return Err(ApiError::Unavailable(format!("read model behind the log (partition {partition} below {high})")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
