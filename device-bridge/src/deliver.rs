//! Kafka → device. Requested commands are read from the commands topic
//! through the shared log reader (a consumer group: the bridges split the
//! partitions; Apache Kafka answers the fetch as soon as the command is
//! appended, so this is also the fast path) and end in
//! [`Deliverer::deliver`], which skips expired and already-published commands
//! and publishes the `cmd` message (QoS 1). The offline queue
//! ([`flush_open`]) sends a device's open commands again when it comes online.
//!
//! At least once: a command counts as sent only when its broker acknowledged
//! the publish (PUBACK, matched to the publish by packet id in
//! [`PubAcks`]), and a batch's offsets are committed only once every command
//! in it was acknowledged. A bridge that dies between its publish and the
//! broker's PUBACK has committed nothing past the command, so its successor
//! publishes it again. Devices ignore a `commandId` they have handled, so the
//! effect is once.

use crate::Shared;
use chrono::Utc;
use futures::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use homelink_events::event::{DeviceCommandDelivered, DeviceCommandExpired, DeviceCommandRequested, DeviceCommandRevoked};
use homelink_events::protocol::{device_topic, Channel, CmdMsg, PROTOCOL_VERSION};
use homelink_events::{Actor, Envelope, Event};
use homelink_kit::reader::{LogBatch, LogReader};
use homelink_kit::shutdown::CancellationToken;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;
use uuid::Uuid;

const REMEMBERED: usize = 100_000;

/// Longest the command consumer waits for a command's PUBACK before it
/// publishes the command again (devices ignore a `commandId` they handled).
const PUBACK_WAIT: Duration = Duration::from_secs(30);

/// Most commands read from the log in one batch (published together, their
/// PUBACKs awaited together, their offsets committed together).
pub const COMMAND_BATCH: usize = 512;

/// How often the command consumer's lag metrics are published.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Resolves once the broker acknowledged the publish: `Ok(true)` when it
/// had a subscriber for it (the device is connected), `Ok(false)` when it
/// had none (PUBACK "no matching subscribers": the device is offline and the
/// command waits for it to come online); `Err`: it never will be
/// acknowledged, the publish failed before it left.
pub type Acked = SharedFuture<BoxFuture<'static, Result<bool, ()>>>;

/// The PUBACKs of one broker connection, matched to the publishes that wait
/// for them. The bridge publishes nothing but commands, so its outgoing
/// publishes leave in the order they were queued: each new packet id the
/// connection reports sending belongs to the oldest queued waiter; a packet
/// id seen again is a retransmission after a reconnect.
#[derive(Default)]
pub struct PubAcks {
    queued: Mutex<VecDeque<oneshot::Sender<bool>>>,
    sent: Mutex<HashMap<u16, oneshot::Sender<bool>>>,
}

impl PubAcks {
    /// Called by the connection: a publish left with `pkid`.
    pub fn sent(&self, pkid: u16) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.contains_key(&pkid) {
            return;
        }
        if let Some(w) = self.queued.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
            sent.insert(pkid, w);
        }
    }

    /// Called by the connection: the broker acknowledged `pkid`, and
    /// whether a subscriber matched.
    pub fn acked(&self, pkid: u16, matched: bool) {
        if let Some(w) = self.sent.lock().unwrap_or_else(|e| e.into_inner()).remove(&pkid) {
            let _ = w.send(matched);
        }
    }

    /// Queues a waiter and, in the same critical section, the publish
    /// itself (`publish` must not block): the two queues always agree, and
    /// no cancelled caller can leave a waiter without its publish. A refused
    /// publish takes its waiter back.
    fn publish_with<E>(&self, publish: impl FnOnce() -> Result<(), E>) -> Result<oneshot::Receiver<bool>, E> {
        let (tx, rx) = oneshot::channel();
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        publish()?;
        queued.push_back(tx);
        Ok(rx)
    }
}

/// Publishes commands to devices, each once per bridge while its
/// acknowledgement is known or pending.
pub struct Deliverer {
    /// One per broker, in the deployment's broker order.
    clients: Vec<AsyncClient>,
    /// The PUBACK waiters of each broker connection.
    pub acks: Vec<PubAcks>,
    seen: Mutex<(HashMap<Uuid, Acked>, VecDeque<Uuid>)>,
}

/// What became of a command.
#[derive(Clone)]
pub enum Delivery {
    /// Published now; resolves at its PUBACK.
    Published(Acked),
    /// Published before (read again, or sent by the offline queue); resolves at that PUBACK.
    Duplicate(Acked),
    Expired,
    NotACommand,
}

impl Deliverer {
    pub fn new(clients: Vec<AsyncClient>) -> Self {
        Self { acks: clients.iter().map(|_| PubAcks::default()).collect(), clients, seen: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    fn remember(&self, id: Uuid, acked: Acked) {
        let mut g = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *g;
        if map.insert(id, acked).is_none() {
            order.push_back(id);
        }
        if order.len() > REMEMBERED {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Forgets a command whose publish failed, so the next delivery publishes it again.
    pub(crate) fn forget(&self, id: Uuid) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).0.remove(&id);
    }

    /// Queues one publish on broker `b` without waiting (a full client
    /// queue is an error: the caller tries again later, and no household
    /// waits behind another's); resolves at its PUBACK.
    fn publish_on(&self, b: usize, topic: String, body: Vec<u8>) -> Result<oneshot::Receiver<bool>, String> {
        self.acks[b].publish_with(|| self.clients[b].try_publish(topic, QoS::AtLeastOnce, false, body).map_err(|e| e.to_string()))
    }

    /// Publishes the command in `envelope` on the device's broker (`None`,
    /// or a broker this bridge does not know: on every broker; a broker
    /// where the device is not connected drops it) unless it expired or
    /// went out already.
    pub async fn deliver(&self, envelope: &Envelope, broker: Option<u16>) -> Result<Delivery, String> {
        let Ok(Event::DeviceCommandRequested(DeviceCommandRequested { command_id, device_id, set, expires_at, .. })) = envelope.event()
        else {
            return Ok(Delivery::NotACommand);
        };
        if expires_at <= Utc::now() {
            return Ok(Delivery::Expired);
        }
        let earlier = self.seen.lock().unwrap_or_else(|e| e.into_inner()).0.get(&command_id).cloned();
        // One that found no subscriber (the device was offline) goes out again.
        if let Some(acked) = earlier.filter(|a| a.peek() != Some(&Ok(false))) {
            return Ok(Delivery::Duplicate(acked));
        }
        let msg = CmdMsg { v: PROTOCOL_VERSION, command_id, set, expires_at };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        let topic = device_topic(envelope.household_id, device_id, Channel::Cmd);
        let brokers: Vec<usize> = match broker.map(usize::from).filter(|b| *b < self.clients.len()) {
            Some(b) => vec![b],
            None => (0..self.clients.len()).collect(),
        };
        let mut waits = Vec::with_capacity(brokers.len());
        for b in brokers {
            match self.publish_on(b, topic.clone(), body.clone()) {
                Ok(rx) => waits.push(rx),
                Err(e) => {
                    self.forget(command_id);
                    return Err(e);
                }
            }
        }
        let acked: Acked = async move {
            let mut matched = false;
            for w in waits {
                matched |= w.await.map_err(|_| ())?;
            }
            Ok(matched)
        }
        .boxed()
        .shared();
        self.remember(command_id, acked.clone());
        Ok(Delivery::Published(acked))
    }
}

/// Whether `command` was sent to `device`: published by this bridge
/// lately, or known to the read model. A failed lookup says yes (an ack is
/// never lost to a hiccup).
pub(crate) async fn knows_command(s: &Shared, command: Uuid, device: Uuid) -> bool {
    if s.deliverer.seen.lock().unwrap_or_else(|e| e.into_inner()).0.contains_key(&command) {
        return true;
    }
    !matches!(homelink_read_model::commands::is_known(&s.pool, command, device).await, Ok(false))
}

/// Delivers one envelope and counts the outcome under `path`; returns the
/// PUBACK to wait for (`None`: nothing was or will be published).
pub(crate) async fn deliver_counted(s: &Shared, envelope: &Envelope, path: &str) -> Option<Acked> {
    s.metrics.messages_in.with_label_values(&[path]).inc();
    let started = std::time::Instant::now();
    let (broker, kind) = match envelope.event() {
        Ok(Event::DeviceCommandRequested(c)) => match s.registry.owner(c.device_id).await {
            Ok(Some(owner)) => (Some(owner.broker), Some(owner.kind)),
            Ok(None) => (None, None),
            Err(e) => {
                tracing::warn!(error = %e, "registry lookup for a command failed; publishing on every broker");
                (None, None)
            }
        },
        _ => (None, None),
    };
    if let (Ok(Event::DeviceCommandRequested(c)), Some(kind)) = (envelope.event(), kind) {
        match still_allowed(s, envelope, &c, kind).await {
            Some(true) => {}
            Some(false) => return None,
            // Not known now: not sent, and the command consumer tries again.
            None => return Some(async { Err(()) }.boxed().shared()),
        }
    }
    match s.deliverer.deliver(envelope, broker).await {
        Ok(Delivery::Published(acked)) => {
            s.metrics.messages_out.with_label_values(&["cmd"]).inc();
            s.metrics.latency.with_label_values(&["command_publish"]).observe(started.elapsed().as_secs_f64());
            // Tap → device (the SLO): from the command's recording to its
            // publish to the device's broker, first deliveries only.
            if path == "command_log" {
                let age = (chrono::Utc::now() - envelope.occurred_at).to_std().unwrap_or_default();
                s.metrics.latency.with_label_values(&["tap_to_device"]).observe(age.as_secs_f64());
            }
            if let (Some(s), Ok(Event::DeviceCommandRequested(c))) = (s.me.upgrade(), envelope.event()) {
                tokio::spawn(record_delivery(s, envelope.household_id, c.command_id, c.device_id, acked.clone()));
            }
            Some(acked)
        }
        Ok(Delivery::Duplicate(acked)) => {
            s.metrics.errors.with_label_values(&["command_duplicate"]).inc();
            Some(acked)
        }
        Ok(Delivery::Expired) => {
            s.metrics.errors.with_label_values(&["command_expired"]).inc();
            None
        }
        Ok(Delivery::NotACommand) => {
            s.metrics.errors.with_label_values(&["not_a_command"]).inc();
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "publishing a command failed; the command consumer tries again");
            s.metrics.errors.with_label_values(&["command_publish"]).inc();
            Some(async { Err(()) }.boxed().shared())
        }
    }
}

/// Authorizes a user's command again at the moment it would be sent, against
/// the household as it is now: a sender removed or demoted since gets the
/// command revoked (`DeviceCommandRevoked`, it ends `rejected`) instead of
/// published (`Some(false)`). `None`: the lookup failed, so it is not sent
/// now (the command consumer tries again, as does the device's next flush).
async fn still_allowed(s: &Shared, envelope: &Envelope, c: &DeviceCommandRequested, kind: homelink_events::DeviceKind) -> Option<bool> {
    let Actor::User(sender) = &envelope.actor else {
        return Some(true);
    };
    let Ok(user) = sender.parse::<Uuid>() else {
        return Some(false);
    };
    let role = match homelink_read_model::role_in(&s.pool, envelope.household_id, user).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "reading a command's sender's role failed; not sending it now");
            s.metrics.errors.with_label_values(&["sender_role"]).inc();
            return None;
        }
    };
    let Some(reason) = homelink_events::household::revocation_reason(role, kind, &c.set) else {
        return Some(true);
    };
    tracing::info!(command = %c.command_id, %reason, "a command's sender may no longer send it: revoked");
    s.metrics.errors.with_label_values(&["command_revoked"]).inc();
    let ev = Event::DeviceCommandRevoked(DeviceCommandRevoked {
        command_id: c.command_id,
        device_id: c.device_id,
        sender: sender.clone(),
        reason,
    });
    let revoked =
        Envelope::new(envelope.household_id, Actor::System("device-bridge".into()), &ev, Utc::now()).with_correlation(c.command_id);
    append_to(s, s.topics.commands(), revoked).await;
    Some(false)
}

/// Appends `DeviceCommandDelivered` once the broker took the command for a
/// connected device. A command that found no subscriber stays open: it goes
/// out when the device comes online ([`flush_open`]).
async fn record_delivery(s: Arc<Shared>, household: Uuid, command_id: Uuid, device_id: Uuid, acked: Acked) {
    match acked.await {
        Ok(true) => {
            let ev = Event::DeviceCommandDelivered(DeviceCommandDelivered { command_id, device_id });
            let envelope = Envelope::new(household, Actor::System("device-bridge".into()), &ev, Utc::now()).with_correlation(command_id);
            append_to(&s, s.topics.telemetry(), envelope).await;
        }
        Ok(false) => s.metrics.errors.with_label_values(&["command_no_subscriber"]).inc(),
        Err(()) => {}
    }
}

/// Appends a bridge event to `topic` with the one retry policy
/// ([`homelink_kit::kafka::Backoff`]), until it lands or the bridge stops.
async fn append_to(s: &Shared, topic: String, envelope: Envelope) {
    s.appender
        .append_all_landed(&topic, std::slice::from_ref(&envelope), &s.stopping, |e| {
            tracing::warn!(error = %e, event = %envelope.event_type, "append failed, retrying");
            s.metrics.errors.with_label_values(&["kafka_produce"]).inc();
        })
        .await;
}

/// Longest a device's offline queue waits to be flushed again after a flush:
/// a device that says `online` in a loop costs one flush per window.
const FLUSH_WINDOW: Duration = Duration::from_secs(2);

/// Most open commands one flush sends: the newest. Supersession already
/// leaves at most one open command per set of capabilities (a light has
/// three writable ones); this bounds whatever is left.
const FLUSH_LIMIT: i64 = 16;

/// The debounce of each device's flush: when it last ran, or that one is
/// scheduled.
#[derive(Default)]
pub struct Flushes(Mutex<HashMap<Uuid, FlushState>>, std::sync::atomic::AtomicUsize);

#[derive(Clone, Copy)]
enum FlushState {
    Ran(std::time::Instant),
    Scheduled,
}

/// Flushes the device's offline queue now, or once its window is over if it
/// flushed less than [`FLUSH_WINDOW`] ago (at most one scheduled per device).
pub(crate) fn request_flush(s: Arc<Shared>, household: Uuid, device: Uuid) {
    let now = std::time::Instant::now();
    let delay = {
        let mut m = s.flushes.0.lock().unwrap_or_else(|e| e.into_inner());
        // Swept when it doubled since the last sweep: amortized O(1) even
        // when a reconnect storm flushes 100,000 devices within the window.
        let sweep_at = s.flushes.1.load(std::sync::atomic::Ordering::Relaxed).max(100_000);
        if m.len() > sweep_at {
            m.retain(|_, st| !matches!(st, FlushState::Ran(at) if at.elapsed() > FLUSH_WINDOW));
            s.flushes.1.store(m.len() * 2, std::sync::atomic::Ordering::Relaxed);
        }
        match m.get(&device).copied() {
            Some(FlushState::Scheduled) => {
                s.metrics.errors.with_label_values(&["flush_debounced"]).inc();
                return;
            }
            Some(FlushState::Ran(at)) if now.duration_since(at) < FLUSH_WINDOW => {
                m.insert(device, FlushState::Scheduled);
                s.metrics.errors.with_label_values(&["flush_debounced"]).inc();
                Some(FLUSH_WINDOW - now.duration_since(at))
            }
            _ => {
                m.insert(device, FlushState::Ran(now));
                None
            }
        }
    };
    tokio::spawn(async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
            s.flushes.0.lock().unwrap_or_else(|e| e.into_inner()).insert(device, FlushState::Ran(std::time::Instant::now()));
        }
        flush_open(s, household, device).await;
    });
}

/// The offline queue: a device came online, so the commands still open for
/// it (requested or queued, not superseded, not expired; the newest
/// [`FLUSH_LIMIT`]) go out now, oldest first, on its broker.
pub(crate) async fn flush_open(s: Arc<Shared>, household: Uuid, device: Uuid) {
    let rows = match homelink_read_model::commands::open_for_device(&s.pool, household, device, FLUSH_LIMIT).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, %device, "reading a device's open commands failed");
            s.metrics.errors.with_label_values(&["open_commands"]).inc();
            return;
        }
    };
    for c in rows {
        // The sender's identity goes with it: it is authorized again before it is sent.
        let Some(envelope) = request_again(c, true) else { continue };
        deliver_counted(&s, &envelope, "command_queued").await;
    }
}

/// The expiry timer: every second, commands past `expiresAt` without an
/// ack get `DeviceCommandExpired` — and so do those acked `ok` whose values
/// were never reported (their status stays `ok`; their values stop being
/// desired). Durable because it reads what is open
/// from the read model, not from memory: a bridge restarted after a crash
/// expires what came due meanwhile. Bridges take turns through an advisory
/// lock; an expiry recorded twice is harmless (the status only moves forward).
/// The same timer resends what scenes and automations sent and nobody
/// answered ([`resend_unanswered`]).
pub(crate) async fn expiry_timer(s: Arc<Shared>, every: Duration, resend_after: Duration, cancel: CancellationToken) {
    let mut recent: HashMap<Uuid, std::time::Instant> = HashMap::new();
    let mut resent: HashMap<Uuid, std::time::Instant> = HashMap::new();
    let mut retried: HashMap<Uuid, std::time::Instant> = HashMap::new();
    loop {
        tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(every) => {} }
        recent.retain(|_, at| at.elapsed() < Duration::from_secs(30));
        let skip: Vec<Uuid> = recent.keys().copied().collect();
        match due(&s, &skip).await {
            Ok(due) => {
                for (command_id, household, device_id, expires_at) in due {
                    recent.insert(command_id, std::time::Instant::now());
                    let ev = Event::DeviceCommandExpired(DeviceCommandExpired { command_id, device_id, expires_at });
                    let envelope =
                        Envelope::new(household, Actor::System("device-bridge".into()), &ev, Utc::now()).with_correlation(command_id);
                    append_to(&s, s.topics.telemetry(), envelope).await;
                    s.metrics.messages_out.with_label_values(&["command_expired"]).inc();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading due commands failed");
                s.metrics.errors.with_label_values(&["expiry_timer"]).inc();
            }
        }
        if let Err(e) = resend_unanswered(&s, resend_after, &mut resent).await {
            tracing::warn!(error = %e, "reading unanswered commands failed");
            s.metrics.errors.with_label_values(&["resend_timer"]).inc();
        }
        if let Err(e) = retry_unconfirmed(&s, resend_after, &mut retried).await {
            tracing::warn!(error = %e, "reading unconfirmed commands failed");
            s.metrics.errors.with_label_values(&["resend_timer"]).inc();
        }
    }
}

/// A scene's or an automation's command (one with a cause) that reached
/// its device (`delivered`) and got no answer within `after` is published
/// again with the same `commandId` while it lives, at most every `after`:
/// a scene never leaves a device behind because one message was lost
/// (devices ignore a `commandId` they handled, so the effect is once). What
/// still gets no answer expires and is named in the activation's progress.
/// A member's own tap is not resent (they see it pending and can tap again).
async fn resend_unanswered(s: &Arc<Shared>, after: Duration, resent: &mut HashMap<Uuid, std::time::Instant>) -> Result<(), sqlx::Error> {
    resent.retain(|_, at| at.elapsed() < after);
    let skip: Vec<Uuid> = resent.keys().copied().collect();
    let Some(rows) = homelink_read_model::commands::unanswered(&s.pool, after, &skip).await? else { return Ok(()) };
    for c in rows {
        let (command_id, device_id) = (c.command_id, c.device_id);
        let Some(envelope) = request_again(c, false) else { continue };
        resent.insert(command_id, std::time::Instant::now());
        tracing::info!(command = %command_id, device = %device_id, "a scene's or automation's command got no answer: published again");
        s.deliverer.forget(command_id);
        if deliver_counted(s, &envelope, "command_resent").await.is_some() {
            s.metrics.messages_out.with_label_values(&["command_resent"]).inc();
        }
    }
    Ok(())
}

/// A scene's or an automation's command that its device acked `ok` but
/// whose reports did not show the values within `after` (it reported
/// something else, or nothing) is sent again as a new command
/// ([`homelink_events::command::retry_id`]: the same values, expiry, sender
/// and cause), since a device ignores a `commandId` it handled. It goes out
/// like every command (authorized again at the bridge) and supersedes the
/// old one; it is retried the same way while the command lives, and a device
/// that still does not take its part is named in the activation's progress.
async fn retry_unconfirmed(s: &Arc<Shared>, after: Duration, retried: &mut HashMap<Uuid, std::time::Instant>) -> Result<(), sqlx::Error> {
    retried.retain(|_, at| at.elapsed() < Duration::from_secs(60));
    let skip: Vec<Uuid> = retried.keys().copied().collect();
    let Some(rows) = homelink_read_model::commands::unconfirmed(&s.pool, after, &skip).await? else { return Ok(()) };
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = rows.iter().map(|c| homelink_events::command::retry_id(c.command_id)).collect();
    // Appended already, not applied yet (the old one is not superseded yet).
    let known: HashSet<Uuid> = homelink_read_model::commands::known(&s.pool, &ids).await?.into_iter().collect();
    for c in rows {
        retried.insert(c.command_id, std::time::Instant::now());
        let id = homelink_events::command::retry_id(c.command_id);
        let (Some(cause), Some(actor)) = (c.caused_by, c.actor.and_then(|a| serde_json::from_value::<Actor>(a).ok())) else { continue };
        if known.contains(&id) {
            continue;
        }
        tracing::info!(command = %c.command_id, retry = %id, device = %c.device_id, "a scene's or automation's command was acked but not confirmed: sent again as a new command");
        let ev = Event::DeviceCommandRequested(DeviceCommandRequested {
            command_id: id,
            device_id: c.device_id,
            set: c.set,
            expires_at: c.expires_at,
            queued: false,
        });
        let mut envelope = Envelope::new(c.household_id, actor, &ev, Utc::now()).with_causation(cause);
        envelope.event_id = Uuid::new_v5(&id, b"homelink:requested");
        append_to(s, s.topics.commands(), envelope).await;
        s.metrics.messages_out.with_label_values(&["command_retried"]).inc();
    }
    Ok(())
}

/// Open commands past their expiry, if this bridge holds the timer's lock;
/// not those in `skip` (expired a moment ago, not applied yet), so a lagging
/// projector never starves the rest.
async fn due(s: &Shared, skip: &[Uuid]) -> Result<Vec<(Uuid, Uuid, Uuid, chrono::DateTime<Utc>)>, sqlx::Error> {
    Ok(homelink_read_model::commands::due_for_expiry(&s.pool, skip).await?.unwrap_or_default())
}

/// A stored command's request again, as its sender sent it (`None`: its
/// sender is not known, so it cannot be authorized again).
fn request_again(c: homelink_read_model::commands::StoredCommand, queued: bool) -> Option<Envelope> {
    let actor = c.actor.and_then(|a| serde_json::from_value::<Actor>(a).ok())?;
    let ev = Event::DeviceCommandRequested(DeviceCommandRequested {
        command_id: c.command_id,
        device_id: c.device_id,
        set: c.set,
        expires_at: c.expires_at,
        queued,
    });
    Some(Envelope::new(c.household_id, actor, &ev, c.requested_at.unwrap_or_else(Utc::now)))
}

/// The commands of `events` that need not go out any more: the read model
/// says they were delivered or ended (superseded, expired, acked) meanwhile
/// — a bridge reading the log again after a restart. A command the read
/// model does not know yet goes out; so does every one when the lookup fails
/// (at least once). One query per batch.
async fn closed(s: &Shared, events: &[&Envelope]) -> HashSet<Uuid> {
    let ids: Vec<Uuid> = events
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::DeviceCommandRequested(c)) => Some(c.command_id),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return HashSet::new();
    }
    match homelink_read_model::commands::delivered_or_ended(&s.pool, &ids).await {
        Ok(r) => r.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading commands' status failed; sending them");
            s.metrics.errors.with_label_values(&["command_status"]).inc();
            HashSet::new()
        }
    }
}

/// The command consumer: reads the commands topic in batches, publishes
/// each command in log order, waits for every PUBACK of the batch together,
/// and commits the batch's offsets only then. A command whose publish
/// failed or was not acknowledged within [`PUBACK_WAIT`] is published again
/// (with backoff) before the batch is committed; one the read model says is
/// closed meanwhile is not.
pub(crate) async fn consume_commands(s: Arc<Shared>, reader: LogReader, cancel: CancellationToken) {
    let lag = reader.report_lag(LAG_EVERY, cancel.clone());
    while let Some(batch) = reader.next(&cancel).await {
        if batch.is_empty() {
            continue;
        }
        if !deliver_batch(&s, &batch, &cancel).await {
            break;
        }
        reader.commit(&batch);
    }
    lag.abort();
}

/// Delivers a batch until every command in it was acknowledged by its
/// broker or needs no delivery; `false` when cancelled first.
async fn deliver_batch(s: &Shared, batch: &LogBatch, cancel: &CancellationToken) -> bool {
    for u in &batch.undecodable {
        tracing::warn!(topic = %u.topic, partition = u.partition, offset = u.offset, "undecodable command record skipped");
    }
    let mut pending: Vec<&Envelope> = batch.events.iter().map(|l| &l.envelope).collect();
    let mut backoff = Duration::from_millis(200);
    loop {
        let closed = closed(s, &pending).await;
        let mut waits = Vec::with_capacity(pending.len());
        for env in pending {
            if let Ok(Event::DeviceCommandRequested(c)) = env.event() {
                if closed.contains(&c.command_id) {
                    s.metrics.errors.with_label_values(&["command_closed"]).inc();
                    continue;
                }
            }
            if let Some(acked) = deliver_counted(s, env, "command_log").await {
                waits.push(async move { (env, tokio::time::timeout(PUBACK_WAIT, acked).await.unwrap_or(Err(()))) });
            }
        }
        let outcomes = tokio::select! {
            _ = cancel.cancelled() => return false,
            o = futures::future::join_all(waits) => o,
        };
        // Never left, or never acknowledged: publish again.
        pending = outcomes.into_iter().filter(|(_, r)| r.is_err()).map(|(env, _)| env).collect();
        if pending.is_empty() {
            return true;
        }
        for env in &pending {
            if let Ok(Event::DeviceCommandRequested(c)) = env.event() {
                s.deliverer.forget(c.command_id);
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_puback_resolves_the_publish_that_left_with_its_packet_id() {
        let acks = PubAcks::default();
        let ok = || Ok::<(), ()>(());
        let (mut first, mut second) = (acks.publish_with(ok).unwrap(), acks.publish_with(ok).unwrap());
        acks.sent(7);
        acks.sent(8);
        // A retransmission after a reconnect keeps its packet id: still the first publish.
        acks.sent(7);
        acks.acked(8, true);
        assert!(second.try_recv().is_ok(), "the second publish is acknowledged");
        assert!(first.try_recv().is_err(), "the first is not, yet");
        acks.acked(9, true);
        assert!(first.try_recv().is_err(), "an unknown packet id acknowledges nothing");
        acks.acked(7, true);
        assert!(first.try_recv().is_ok());
        // A packet id used again after its PUBACK belongs to the next publish.
        let mut third = acks.publish_with(ok).unwrap();
        acks.sent(7);
        acks.acked(7, true);
        assert!(third.try_recv().is_ok());
    }

    #[test]
    fn a_refused_publish_leaves_no_waiter_behind_to_take_the_next_puback() {
        let acks = PubAcks::default();
        assert!(acks.publish_with(|| Err::<(), _>("queue full")).is_err());
        let mut next = acks.publish_with(|| Ok::<(), ()>(())).unwrap();
        acks.sent(1);
        acks.acked(1, true);
        assert_eq!(next.try_recv(), Ok(true), "the PUBACK belongs to the publish that left");
    }
}
