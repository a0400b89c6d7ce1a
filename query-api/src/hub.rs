//! Fan-out of committed changes to subscribers, per household.
//!
//! One Postgres `LISTEN` per query-api process receives every shadow and
//! membership change the projector committed; each household has its own
//! broadcast channel, so an event of household B is never even offered to a
//! subscription of household A. [`authorized_changes`] is what one
//! subscription sees: it re-checks the viewer's role whenever their
//! membership changes (and after a lost LISTEN connection), narrows what it
//! delivers on a demotion and ends on a removal.
//!
//! Bounded: a subscription is admitted only after the viewer's role was
//! checked, within a cap per connection and per user ([`Ticket`]), and a
//! household's channel is dropped with its last subscriber, so the hub holds
//! only households someone is watching.

use crate::errors::{codes, error};
use crate::types::{DeviceChange, HouseholdChange};
use async_graphql::futures_util::Stream;
use homelink_events::household::Action;
use homelink_events::shadow::{notification_lines, NotificationLine, ShadowChanged};
use homelink_events::topics::{
    CommandChanged, MembershipChanged, RegistryChanged, COMMAND_CHANGED_CHANNEL, MEMBERSHIP_CHANGED_CHANNEL, REGISTRY_CHANGED_CHANNEL,
    SHADOW_CHANGED_CHANNEL,
};
use homelink_events::{DeviceKind, Role};
use homelink_kit::metrics::ServiceMetrics;
use homelink_kit::shutdown::CancellationToken;
use homelink_read_model::{changes, registry, role_in};
use prometheus::IntGauge;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use uuid::Uuid;

/// Changes a slow subscriber may fall behind by before it catches up from
/// the retained changes.
const PER_HOUSEHOLD_BUFFER: usize = 256;

/// What a household's subscribers are told.
#[derive(Debug, Clone)]
pub enum HubEvent {
    Shadow(Arc<ShadowChanged>),
    /// A device or room was added, changed or removed.
    Registry(Arc<RegistryChanged>),
    /// A command's lifecycle moved.
    Command(Arc<CommandChanged>),
    /// This user's membership changed: re-check their role.
    Membership(Uuid),
    /// Notifications may have been lost: re-check every role.
    Recheck,
}

/// How many subscriptions one WebSocket connection, and one user across
/// this process's connections, may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionLimits {
    pub per_connection: usize,
    pub per_user: usize,
    /// Changes a slow subscriber may fall behind by before it reads the rest
    /// from the retained changes.
    pub buffer: usize,
}

impl Default for SubscriptionLimits {
    fn default() -> Self {
        Self { per_connection: 32, per_user: 128, buffer: PER_HOUSEHOLD_BUFFER }
    }
}

/// The subscriptions a WebSocket connection holds (its connection data).
#[derive(Debug, Default)]
pub struct ConnectionSubscriptions(AtomicUsize);

pub struct Hub {
    /// Woken at every batch the projector commits (consistency waits).
    pub applied: Arc<tokio::sync::Notify>,
    households: Mutex<HashMap<Uuid, broadcast::Sender<HubEvent>>>,
    per_user: Mutex<HashMap<Uuid, usize>>,
    limits: SubscriptionLimits,
    channels: IntGauge,
    active: IntGauge,
}

/// An admitted subscription; dropping it gives its places back and drops the
/// household's channel if nobody else watches it.
pub struct Ticket {
    hub: Arc<Hub>,
    household: Uuid,
    user: Uuid,
    connection: Arc<ConnectionSubscriptions>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.connection.0.fetch_sub(1, Ordering::SeqCst);
        {
            let mut users = self.hub.per_user.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = users.get_mut(&self.user) {
                *n -= 1;
                if *n == 0 {
                    users.remove(&self.user);
                }
            }
        }
        self.hub.active.dec();
        self.hub.forget_if_idle(self.household);
    }
}

/// Why a subscription was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("at most {0} subscriptions per connection")]
    Connection(usize),
    #[error("at most {0} subscriptions per user")]
    User(usize),
}

impl Hub {
    /// A hub whose gauges (`homelink_query_api_hub_households`,
    /// `homelink_query_api_subscriptions_active`) are in `metrics`.
    pub fn new(limits: SubscriptionLimits, metrics: &ServiceMetrics) -> Self {
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(format!("homelink_query_api_{name}"), help).expect("valid metric");
            metrics.registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        Self {
            applied: Arc::default(),
            households: Mutex::default(),
            per_user: Mutex::default(),
            limits,
            channels: gauge("hub_households", "Households with a change channel (someone subscribed)"),
            active: gauge("subscriptions_active", "Open subscriptions"),
        }
    }

    /// Admits one more subscription of `user` on `connection` for
    /// `household`, within the caps. Call after the role check.
    pub fn admit(self: &Arc<Self>, household: Uuid, user: Uuid, connection: Arc<ConnectionSubscriptions>) -> Result<Ticket, Refused> {
        if connection.0.fetch_add(1, Ordering::SeqCst) >= self.limits.per_connection {
            connection.0.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Connection(self.limits.per_connection));
        }
        {
            let mut users = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
            let n = users.entry(user).or_default();
            if *n >= self.limits.per_user {
                drop(users);
                connection.0.fetch_sub(1, Ordering::SeqCst);
                return Err(Refused::User(self.limits.per_user));
            }
            *n += 1;
        }
        self.active.inc();
        Ok(Ticket { hub: self.clone(), household, user, connection })
    }

    /// The household's change channel (an admitted subscription's).
    pub fn subscribe(&self, ticket: &Ticket) -> broadcast::Receiver<HubEvent> {
        let mut h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        let rx = h.entry(ticket.household).or_insert_with(|| broadcast::channel(self.limits.buffer.max(1)).0).subscribe();
        self.channels.set(h.len() as i64);
        rx
    }

    fn forget_if_idle(&self, household: Uuid) {
        let mut h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        if h.get(&household).is_some_and(|tx| tx.receiver_count() == 0) {
            h.remove(&household);
        }
        self.channels.set(h.len() as i64);
    }

    /// Delivers to the household's subscribers; forgets households nobody watches.
    pub fn publish(&self, change: ShadowChanged) {
        self.send(change.household_id, HubEvent::Shadow(Arc::new(change)));
    }

    /// Whether anyone on this process subscribes to `household`.
    fn watched(&self, household: Uuid) -> bool {
        self.households.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&household)
    }

    /// A batch of committed shadow changes: those of households nobody here
    /// watches are skipped unparsed; a change too large for a notification
    /// is read from its table.
    async fn on_shadow_notification(&self, pool: &PgPool, payload: &str, metrics: &ServiceMetrics) {
        let received = metrics.messages_in.with_label_values(&["shadow_changed"]);
        for line in notification_lines(payload) {
            let change = match line {
                Ok(NotificationLine::Change { household_id, json }) => {
                    received.inc();
                    if !self.watched(household_id) {
                        continue;
                    }
                    match serde_json::from_str::<ShadowChanged>(json) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable shadow change");
                            metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                            continue;
                        }
                    }
                }
                Ok(NotificationLine::Refetch { household_id, device_id, change_seq }) => {
                    received.inc();
                    if !self.watched(household_id) {
                        continue;
                    }
                    match read_changes(pool, household_id, change_seq.saturating_sub(1), change_seq).await {
                        Ok(mut found) => match found.pop() {
                            Some(HubEvent::Shadow(c)) => Arc::unwrap_or_clone(c),
                            _ => continue,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, %device_id, "reading a changed shadow failed");
                            metrics.errors.with_label_values(&["shadow_refetch"]).inc();
                            continue;
                        }
                    }
                }
                Err(line) => {
                    tracing::warn!(line = %line.chars().take(200).collect::<String>(), "undecodable notification line");
                    metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                    continue;
                }
            };
            // Bridge receipt (last_seen) to fan-out: the state-push latency operators watch.
            if let Some(seen) = change.last_seen {
                let age = (chrono::Utc::now() - seen).num_microseconds().unwrap_or(0).max(0);
                metrics.latency.with_label_values(&["report_to_fanout"]).observe(age as f64 / 1e6);
            }
            self.publish(change);
        }
    }

    fn send(&self, household: Uuid, ev: HubEvent) {
        let mut h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = h.get(&household) {
            if tx.send(ev).is_err() {
                h.remove(&household);
                self.channels.set(h.len() as i64);
            }
        }
    }

    fn recheck_all(&self) {
        let h = self.households.lock().unwrap_or_else(|e| e.into_inner());
        for tx in h.values() {
            let _ = tx.send(HubEvent::Recheck);
        }
    }

    /// Listens for the projector's notifications until cancelled, reconnecting on errors.
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        metrics: ServiceMetrics,
        ready: Arc<std::sync::atomic::AtomicBool>,
        cancel: CancellationToken,
    ) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed");
                    metrics.errors.with_label_values(&["listen"]).inc();
                    tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => continue }
                }
            };
            if let Err(e) = listener
                .listen_all([
                    SHADOW_CHANGED_CHANNEL,
                    MEMBERSHIP_CHANGED_CHANNEL,
                    REGISTRY_CHANGED_CHANNEL,
                    COMMAND_CHANGED_CHANNEL,
                    homelink_events::topics::APPLIED_CHANNEL,
                ])
                .await
            {
                tracing::warn!(error = %e, "LISTEN failed");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(Duration::from_millis(500)) => continue }
            }
            ready.store(true, std::sync::atomic::Ordering::Relaxed);
            // Whatever happened while not listening: make subscriptions re-check.
            self.recheck_all();
            loop {
                let n = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match n {
                    Ok(Some(n)) if n.channel() == homelink_events::topics::APPLIED_CHANNEL => self.applied.notify_waiters(),
                    Ok(Some(n)) if n.channel() == MEMBERSHIP_CHANGED_CHANNEL => {
                        match serde_json::from_str::<MembershipChanged>(n.payload()) {
                            Ok(m) => {
                                metrics.messages_in.with_label_values(&["membership_changed"]).inc();
                                self.send(m.household_id, HubEvent::Membership(m.user_id));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable notification");
                                metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                            }
                        }
                    }
                    Ok(Some(n)) if n.channel() == REGISTRY_CHANGED_CHANNEL => match serde_json::from_str::<RegistryChanged>(n.payload()) {
                        Ok(r) => {
                            metrics.messages_in.with_label_values(&["registry_changed"]).inc();
                            self.send(r.household_id, HubEvent::Registry(Arc::new(r)));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable notification");
                            metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                        }
                    },
                    Ok(Some(n)) if n.channel() == COMMAND_CHANGED_CHANNEL => match serde_json::from_str::<CommandChanged>(n.payload()) {
                        Ok(c) => {
                            metrics.messages_in.with_label_values(&["command_changed"]).inc();
                            self.send(c.household_id, HubEvent::Command(Arc::new(c)));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable notification");
                            metrics.errors.with_label_values(&["undecodable_notification"]).inc();
                        }
                    },
                    Ok(Some(n)) => self.on_shadow_notification(&pool, n.payload(), &metrics).await,
                    // The connection was lost and re-established: notifications in between are gone.
                    Ok(None) => {
                        metrics.errors.with_label_values(&["listen_reconnect"]).inc();
                        self.applied.notify_waiters();
                        self.recheck_all();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection lost");
                        ready.store(false, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
}

/// What a subscription may deliver next.
pub enum Visible {
    Shadow(Arc<ShadowChanged>),
    Registry(Arc<RegistryChanged>),
    Command(Arc<CommandChanged>),
    /// The viewer was removed from the household.
    Removed,
    /// Changes to catch up with are no longer retained.
    TooOld,
}

/// One subscriber's view of a household: its role, kept current, and what
/// that role may see.
pub struct Watch {
    // Dropped before the ticket, so the ticket sees the channel's last receiver gone.
    rx: BroadcastStream<HubEvent>,
    _ticket: Ticket,
    pool: PgPool,
    household: Uuid,
    user: Uuid,
    role: Role,
    kinds: HashMap<Uuid, DeviceKind>,
    ended: bool,
    /// The household change sequence number of the last change this
    /// subscription has passed (delivered, or not visible to the viewer).
    last_seq: u64,
    /// Changes up to this number are read from the retained ones before the
    /// live channel (a resume, a gap, a lagged receiver).
    target: u64,
    /// Retained changes read, not passed yet.
    replay: VecDeque<HubEvent>,
}

/// An admitted subscription's receiver and ticket; fields drop in order, so
/// the receiver is gone when the ticket looks whether anyone still listens.
struct Admitted {
    rx: broadcast::Receiver<HubEvent>,
    ticket: Ticket,
}

/// Most retained changes read at once.
const REPLAY_PAGE: i64 = 500;

/// Why a subscription cannot start where it was asked to.
#[derive(Debug)]
pub enum ResumeError {
    /// Some changes after `after` are no longer retained: refetch, then subscribe.
    TooOld,
    /// `after` is beyond the household's last change.
    InTheFuture,
    Unavailable(sqlx::Error),
}

impl Watch {
    /// A subscriber's view from now on, or — with `after` — from the change
    /// after that one: the retained changes first, then live ones, with no
    /// gap and no duplicate. Call after subscribing to the channel, so no
    /// change committed meanwhile is missed.
    pub async fn start(
        rx: broadcast::Receiver<HubEvent>,
        ticket: Ticket,
        pool: PgPool,
        user: Uuid,
        role: Role,
        after: Option<u64>,
    ) -> Result<Self, ResumeError> {
        // Held together so that every early return drops the receiver before
        // the ticket (parameters drop in reverse order: the ticket would go
        // first, see a receiver left, and keep the channel for ever).
        let held = Admitted { rx, ticket };
        let household = held.ticket.household;
        let last = last_change(&pool, household).await.map_err(ResumeError::Unavailable)?;
        let from = match after {
            None => last,
            Some(a) if a > last => return Err(ResumeError::InTheFuture),
            Some(a) if a == last => a,
            Some(a) => {
                let first = changes::first_after(&pool, household, a as i64).await.map_err(ResumeError::Unavailable)?;
                if first != Some(a as i64 + 1) {
                    return Err(ResumeError::TooOld);
                }
                // Nothing from before the viewer joined: a new member resumes
                // from a refetch, not from the household's history.
                let before_joining =
                    changes::before_joining(&pool, household, a as i64 + 1, user).await.map_err(ResumeError::Unavailable)?;
                if before_joining {
                    return Err(ResumeError::TooOld);
                }
                a
            }
        };
        let Admitted { rx, ticket } = held;
        Ok(Self {
            rx: BroadcastStream::new(rx),
            _ticket: ticket,
            pool,
            household,
            user,
            role,
            kinds: HashMap::new(),
            ended: false,
            last_seq: from,
            target: last,
            replay: VecDeque::new(),
        })
    }

    /// The next change in sequence: a retained one while catching up, else
    /// a live one. `Err` when the changes to catch up with are no longer retained.
    async fn next_in_sequence(&mut self) -> Option<Result<HubEvent, ResumeError>> {
        loop {
            if let Some(ev) = self.replay.pop_front() {
                return Some(Ok(ev));
            }
            if self.last_seq < self.target {
                let upto = self.target.min(self.last_seq + REPLAY_PAGE as u64);
                match read_changes(&self.pool, self.household, self.last_seq, upto).await {
                    // Every number of the page, in order: a hole means changes are gone.
                    Ok(found)
                        if !found.is_empty() && found.iter().map(change_seq).eq(self.last_seq + 1..=self.last_seq + found.len() as u64) =>
                    {
                        self.replay = found.into();
                        continue;
                    }
                    Ok(found) => {
                        tracing::warn!(
                            household = %self.household,
                            after = self.last_seq,
                            upto,
                            found = ?found.iter().map(change_seq).collect::<Vec<_>>(),
                            "retained changes missing: the subscription ends with RESUME_TOO_OLD"
                        );
                        return Some(Err(ResumeError::TooOld));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading retained changes failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let ev = match self.rx.next().await? {
                Ok(ev) => ev,
                // This subscriber fell behind and missed changes: they are
                // read from the retained ones; a membership change may be
                // among them.
                Err(_) => HubEvent::Recheck,
            };
            match &ev {
                HubEvent::Shadow(_) | HubEvent::Registry(_) | HubEvent::Command(_) => {
                    let seq = change_seq(&ev);
                    if seq <= self.last_seq {
                        continue; // passed already (replayed)
                    }
                    if seq > self.last_seq + 1 {
                        // A gap: the missing ones and this one come from the retained changes.
                        self.target = self.target.max(seq);
                        continue;
                    }
                    return Some(Ok(ev));
                }
                HubEvent::Recheck => {
                    // Notifications may have been lost: catch up to the last committed change.
                    if let Ok(last) = last_change(&self.pool, self.household).await {
                        self.target = self.target.max(last);
                    }
                    return Some(Ok(ev));
                }
                HubEvent::Membership(_) => return Some(Ok(ev)),
            }
        }
    }

    async fn kind_of(&mut self, device: Uuid) -> Option<DeviceKind> {
        if let Some(k) = self.kinds.get(&device) {
            return Some(*k);
        }
        let k: Option<DeviceKind> = registry::device_kind(&self.pool, self.household, device).await.ok().flatten();
        if let Some(k) = k {
            self.kinds.insert(device, k);
        }
        k
    }

    async fn may_see(&mut self, device: Option<Uuid>) -> bool {
        match device {
            None => true,
            Some(d) => match self.kind_of(d).await {
                Some(k) => self.role.allows(&Action::SeeDevice(k)),
                None => false,
            },
        }
    }

    /// Re-reads the role; `false` when the viewer is no longer a member.
    async fn recheck(&mut self) -> bool {
        match role_in(&self.pool, self.household, self.user).await {
            Ok(Some(r)) => {
                self.role = r;
                true
            }
            Ok(None) => false,
            // Postgres unreachable: keep the last known role; the next change re-checks.
            Err(_) => true,
        }
    }

    /// The next change the viewer may see (registry changes only when
    /// `registry`), `Removed` once when they leave, then `None`.
    pub async fn next(&mut self, registry: bool) -> Option<Visible> {
        if self.ended {
            return None;
        }
        loop {
            let ev = match self.next_in_sequence().await? {
                Ok(ev) => ev,
                Err(_) => {
                    self.ended = true;
                    return Some(Visible::TooOld);
                }
            };
            if let HubEvent::Shadow(_) | HubEvent::Registry(_) | HubEvent::Command(_) = &ev {
                self.last_seq = change_seq(&ev);
            }
            let recheck = match ev {
                HubEvent::Shadow(c) => {
                    if self.may_see(Some(c.device_id)).await {
                        return Some(Visible::Shadow(c));
                    }
                    false
                }
                HubEvent::Registry(r) if registry => {
                    if self.may_see(r.device_id).await {
                        return Some(Visible::Registry(r));
                    }
                    false
                }
                HubEvent::Registry(_) => false,
                HubEvent::Command(c) if registry => {
                    if self.may_see(Some(c.device_id)).await {
                        return Some(Visible::Command(c));
                    }
                    false
                }
                HubEvent::Command(_) => false,
                HubEvent::Membership(u) => u == self.user,
                HubEvent::Recheck => true,
            };
            if recheck && !self.recheck().await {
                self.ended = true;
                return Some(Visible::Removed);
            }
        }
    }
}

fn removed() -> async_graphql::Error {
    error(codes::FORBIDDEN, "you are no longer a member of this household")
}

pub fn too_old() -> async_graphql::Error {
    error(codes::RESUME_TOO_OLD, "changes after `after` are no longer retained: read the state again, then subscribe")
}

fn change_seq(ev: &HubEvent) -> u64 {
    match ev {
        HubEvent::Shadow(c) => c.change_seq,
        HubEvent::Registry(r) => r.change_seq,
        HubEvent::Command(c) => c.change_seq,
        _ => 0,
    }
}

/// The number of the household's last committed change (0: none yet).
async fn last_change(pool: &PgPool, household: Uuid) -> Result<u64, sqlx::Error> {
    let last = changes::last_seq(pool, household).await?;
    Ok(last.unwrap_or(0).max(0) as u64)
}

/// The retained changes of `household` numbered `after + 1 ..= upto`, in order.
async fn read_changes(pool: &PgPool, household: Uuid, after: u64, upto: u64) -> Result<Vec<HubEvent>, sqlx::Error> {
    let rows = changes::between(pool, household, after as i64, upto as i64).await?;
    Ok(rows
        .into_iter()
        .filter_map(|changes::ChangeRow { kind, change }| match kind.as_str() {
            "shadow" => serde_json::from_value::<ShadowChanged>(change).ok().map(|c| HubEvent::Shadow(Arc::new(c))),
            "registry" => serde_json::from_value::<RegistryChanged>(change).ok().map(|r| HubEvent::Registry(Arc::new(r))),
            "command" => serde_json::from_value::<CommandChanged>(change).ok().map(|c| HubEvent::Command(Arc::new(c))),
            _ => None,
        })
        .collect())
}

/// The shadow changes of `household` that `user` (now `role`) may see, until
/// they are removed from it.
pub fn authorized_changes(watch: Watch) -> impl Stream<Item = async_graphql::Result<DeviceChange>> {
    futures::stream::unfold(watch, |mut w| async move {
        match w.next(false).await? {
            Visible::Shadow(c) => Some((Ok(DeviceChange::from(c.as_ref())), w)),
            Visible::Registry(_) | Visible::Command(_) => None,
            Visible::Removed => Some((Err(removed()), w)),
            Visible::TooOld => Some((Err(too_old()), w)),
        }
    })
}

/// Shadow and registry changes of `household`, for the household subscription.
pub fn authorized_household_changes(watch: Watch) -> impl Stream<Item = async_graphql::Result<HouseholdChange>> {
    futures::stream::unfold(watch, |mut w| async move {
        match w.next(true).await? {
            Visible::Shadow(c) => Some((Ok(HouseholdChange::from_shadow(c.as_ref())), w)),
            Visible::Registry(r) => Some((Ok(HouseholdChange::from_registry(r.as_ref())), w)),
            Visible::Command(c) => Some((Ok(HouseholdChange::from_command(c.as_ref())), w)),
            Visible::Removed => Some((Err(removed()), w)),
            Visible::TooOld => Some((Err(too_old()), w)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscription whose start fails (the database is unreachable) leaves
    /// no channel behind (seen in the suite: the gauge stuck at 1 after a
    /// start that found the pool busy).
    #[tokio::test]
    async fn a_failed_start_leaves_no_channel() {
        let metrics = ServiceMetrics::new("hub_test");
        let hub = Arc::new(Hub::new(SubscriptionLimits::default(), &metrics));
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let ticket = hub.admit(Uuid::new_v4(), Uuid::new_v4(), Arc::default()).expect("admitted");
        let rx = hub.subscribe(&ticket);
        assert_eq!(hub.channels.get(), 1);
        let started = Watch::start(rx, ticket, pool, Uuid::new_v4(), Role::Owner, None).await;
        assert!(matches!(started, Err(ResumeError::Unavailable(_))));
        assert_eq!(hub.channels.get(), 0, "the channel went with its only subscriber");
        assert_eq!(hub.active.get(), 0);
    }
}
