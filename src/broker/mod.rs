//! The broker core shared by all connections: sessions, the subscription
//! trie, retained messages, wills and counters.
//!
//! Boundary: connections call [`Broker::connect`], [`Broker::publish`],
//! [`Broker::subscribe`]... with decoded packets' contents; the broker never
//! touches a socket. One PUBLISH: the trie is read-locked to collect the
//! matching sessions, then each session gets one delivery under its own
//! lock and its connection is woken.
//!
//! # Locks
//!
//! Taken in this order, never the other way: the fleet gate
//! (`fleet_gate`), then the fleet's own state (`crate::cluster`), then
//! `sessions` (the map), a session's lock, the subscription trie, the
//! retained tree, `fleet_changes`. Two exceptions keep the order safe:
//! [`Broker::deliver`] collects from the trie and releases it before it
//! takes any session lock (subscribe holds a session lock, then the trie);
//! and the fleet is told of subscription changes only after the session and
//! trie locks are released (`Broker::tell_fleet`): changes are queued in
//! `fleet_changes` while the trie lock orders them, and sent in that order
//! under `fleet_gate`, so the fleet may deliver while it handles them.

pub mod admission;
pub mod clock;
pub mod fleet;
pub mod limits;
pub mod message;
pub mod retained;
pub mod session;
pub mod sys;
#[cfg(test)]
mod tests;
pub mod trie;

use crate::config::MqttConfig;
use crate::protocol::{DisconnectReason, QoS, SubscriptionOptions};
use crate::storage::{Storage, StorageError, StoredSession};
use clock::{Clock, SystemClock};
pub use fleet::{BoxFuture, ClaimGuard, Fleet, Presence, PublishRoute, Recipients, ShareGroup};
use kadmq_dht::topic::{parse_shared, split_shared, valid_topic_filter};
use limits::{topic_limits, Limit, LimitHits};
use message::Message;
use parking_lot::{Mutex, RwLock};
use retained::RetainedTree;
use session::{
    Attachment, AttachmentHandle, Delivery, EndedSession, MovedSession, PendingWill, QueueLimits, Session, Subscription,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use trie::SubscriptionTrie;

/// A subscriber in the trie: client id, and the share group for `$share`.
type SubscriberKey = (Arc<str>, Option<Arc<str>>);

struct SubscriberEntry {
    session: Arc<Session>,
    options: SubscriptionOptions,
    identifier: Option<u32>,
    /// For shared subscriptions: the filter, which with the group names it.
    shared_filter: Option<Arc<str>>,
}

/// Topics that never leave the node: each node has its own `$SYS` tree.
pub fn node_local(topic_or_filter: &str) -> bool {
    topic_or_filter.starts_with("$SYS")
}

/// What [`Broker::publish_kept`] did with a message.
pub struct Published {
    /// Deliveries queued (1 when a fleet cannot tell yet).
    pub matched: usize,
    /// What a retained message's acknowledgement waits for.
    pub kept: Option<BoxFuture<'static, ()>>,
    /// The fleet could not keep it (full): not published at all.
    pub refused: bool,
    /// The fleet's number of a QoS 1/2 message forwarded to other nodes:
    /// the client's acknowledgement waits for
    /// [`Fleet::forwards_settled`] up to it.
    pub forwarded: Option<u64>,
}

/// Counters behind `$SYS` and the logs.
#[derive(Default)]
pub struct Stats {
    pub clients_connected: AtomicU64,
    pub clients_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub struct Broker {
    pub config: MqttConfig,
    pub storage: Storage,
    pub stats: Stats,
    /// Whether clients are let in yet (a node joining its fleet waits).
    pub admission: admission::Admission,
    /// Each time a client ran into one of its limits.
    pub limits: LimitHits,
    /// All the broker knows of time (see [`clock`]).
    clock: Arc<dyn Clock>,
    /// The clock's monotonic reading at open, for uptime.
    started: Duration,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    subscriptions: RwLock<SubscriptionTrie<SubscriberKey, SubscriberEntry>>,
    retained: RwLock<RetainedTree>,
    next_connection_id: AtomicU64,
    shared_cursor: AtomicUsize,
    fleet: OnceLock<Arc<dyn Fleet>>,
    /// Subscription changes not yet told to the fleet, in trie order.
    fleet_changes: Mutex<Vec<SubscriptionChange>>,
    /// Held while telling the fleet, so changes reach it in order.
    fleet_gate: Mutex<()>,
    /// Set while the node leaves its fleet: connections it closes publish
    /// their wills as any closed connection does (the sessions move on).
    leaving: AtomicBool,
}

/// A local subscription that began or ended, for the fleet.
struct SubscriptionChange {
    filter: Arc<str>,
    group: Option<Arc<str>>,
    began: bool,
}

/// Result of attaching a connection to a session.
pub struct Connected {
    pub session: Arc<Session>,
    pub session_present: bool,
    pub handle: AttachmentHandle,
}

/// How a connection ended, for will and session handling.
pub struct Departure {
    pub connection_id: u64,
    /// The will to publish: `None` after a normal DISCONNECT.
    pub will: Option<(Message, u32)>,
}

/// One filter of a SUBSCRIBE, after the protocol checks.
pub struct SubscribeRequest {
    pub filter: String,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

impl Broker {
    /// Opens the broker on a storage, restoring retained messages and
    /// persistent sessions (dropping those that expired while it was down).
    pub fn open(config: MqttConfig, storage: Storage) -> Result<Broker, StorageError> {
        Broker::open_with_clock(config, storage, Arc::new(SystemClock::new()))
    }

    /// [`Broker::open`] on the time `clock` gives (tests use a
    /// [`clock::ManualClock`]).
    pub fn open_with_clock(
        config: MqttConfig,
        storage: Storage,
        clock: Arc<dyn Clock>,
    ) -> Result<Broker, StorageError> {
        let broker = Broker {
            config,
            storage,
            stats: Stats::default(),
            admission: admission::Admission::default(),
            limits: LimitHits::new(clock.clone()),
            started: clock.monotonic(),
            clock,
            sessions: Mutex::new(HashMap::new()),
            subscriptions: RwLock::new(SubscriptionTrie::new()),
            retained: RwLock::new(RetainedTree::default()),
            next_connection_id: AtomicU64::new(1),
            shared_cursor: AtomicUsize::new(0),
            fleet: OnceLock::new(),
            fleet_changes: Mutex::new(Vec::new()),
            fleet_gate: Mutex::new(()),
            leaving: AtomicBool::new(false),
        };
        let now = broker.now_ms();
        {
            let mut retained = broker.retained.write();
            for message in broker.storage.retained()? {
                if message.is_expired(now) {
                    broker.storage.remove_retained(&message.topic)?;
                } else {
                    retained.insert(Arc::new(message));
                }
            }
        }
        for (client_id, stored) in broker.storage.sessions()? {
            let expired = stored
                .disconnected_at_ms
                .is_some_and(|at| expires_at(at, stored.expiry_interval).is_some_and(|end| end <= now));
            if expired || stored.expiry_interval == 0 {
                broker.storage.remove_session(&client_id)?;
                continue;
            }
            let deliveries = broker.storage.deliveries(&client_id)?;
            let client_id: Arc<str> = client_id.into();
            let session = Arc::new(Session::restore(client_id.clone(), stored, deliveries, now));
            {
                let st = session.lock();
                let mut trie = broker.subscriptions.write();
                for (filter, sub) in &st.subscriptions {
                    broker.index(&mut trie, &session, filter, sub);
                }
                session.save(&st, &broker.storage);
            }
            broker.sessions.lock().insert(client_id, session);
        }
        broker.storage.flush()?;
        Ok(broker)
    }

    /// Joins the broker to a fleet: every subscription from now on (and
    /// every one restored from storage) is announced to it, and publishes
    /// are routed through it. Call once, before clients connect.
    pub fn attach_fleet(&self, fleet: Arc<dyn Fleet>) {
        if self.fleet.set(fleet.clone()).is_err() {
            tracing::error!("a fleet is already attached");
            return;
        }
        let _gate = self.fleet_gate.lock();
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        for session in sessions {
            let filters: Vec<String> = session.lock().subscriptions.keys().cloned().collect();
            for filter in filters {
                let (filter, group) = split_shared(&filter);
                if !node_local(filter) {
                    fleet.subscribed(filter, group);
                }
            }
        }
    }

    /// Tells the fleet the subscription changes queued so far, in order.
    /// Call with no broker lock held (the fleet may deliver meanwhile).
    fn tell_fleet(&self) {
        let Some(fleet) = self.fleet.get() else { return };
        let _gate = self.fleet_gate.lock();
        let changes = std::mem::take(&mut *self.fleet_changes.lock());
        for change in changes {
            let group = change.group.as_deref();
            match change.began {
                true => fleet.subscribed(&change.filter, group),
                false => fleet.unsubscribed(&change.filter, group),
            }
        }
    }

    /// Wall-clock time in Unix milliseconds, as the broker's clock says:
    /// what connections stamp message expiry with.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// How long since the broker opened.
    pub fn uptime(&self) -> Duration {
        self.clock.monotonic().saturating_sub(self.started)
    }

    /// The fleet this node belongs to, if any.
    pub fn fleet(&self) -> Option<&Arc<dyn Fleet>> {
        self.fleet.get()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.read().len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Attaches a new connection to the session of `client_id`, taking it
    /// over from a connection that holds it, starting a new session when
    /// `clean_start` asks or none exists.
    pub async fn connect(&self, client_id: &str, clean_start: bool, expiry_interval: u32) -> Connected {
        let connection_id = self.next_connection_id();
        // In a fleet the session comes here first (or is discarded where it
        // was); the claim holds until this connection is attached.
        let _claim = match self.fleet.get() {
            Some(fleet) => Some(fleet.claim(client_id, clean_start).await),
            None => None,
        };
        loop {
            let existing = self.sessions.lock().get(client_id).cloned();
            let Some(session) = existing else {
                let session = Arc::new(Session::new(client_id.into(), expiry_interval));
                let (attachment, handle) = Attachment::new(connection_id);
                session.lock().connection = Some(attachment);
                {
                    let mut sessions = self.sessions.lock();
                    if sessions.contains_key(client_id) {
                        continue; // raced with another CONNECT for this id
                    }
                    sessions.insert(client_id.into(), session.clone());
                }
                self.save_session(&session);
                return Connected { session, session_present: false, handle };
            };
            // Decide under the session lock, act after releasing it.
            let step = {
                let mut st = session.lock();
                if st.ended {
                    Step::Retry
                } else if let Some(old) = st.connection.take() {
                    Step::TakeOver(old)
                } else {
                    let expired = st
                        .disconnected_at_ms
                        .and_then(|at| expires_at(at, st.expiry_interval))
                        .is_some_and(|end| end <= self.now_ms());
                    if clean_start || expired {
                        Step::Discard
                    } else {
                        // Resume: a will still waiting for its delay is cancelled.
                        st.pending_will = None;
                        if st.is_persistent() && expiry_interval == 0 {
                            // No longer persistent: a stale record must not
                            // bring it back after a restart.
                            if let Err(err) = self.storage.remove_session(client_id) {
                                tracing::error!(cause = %err, client_id, "could not remove session from storage");
                            }
                        }
                        st.expiry_interval = expiry_interval;
                        st.disconnected_at_ms = None;
                        let (attachment, handle) = Attachment::new(connection_id);
                        st.connection = Some(attachment);
                        session.save(&st, &self.storage);
                        Step::Resumed(handle)
                    }
                }
            };
            match step {
                // Another task is ending this session; let it finish.
                Step::Retry => tokio::task::yield_now().await,
                Step::TakeOver(old) => {
                    tracing::debug!(client_id, "session taken over");
                    old.take_over(DisconnectReason::SessionTakenOver, Duration::from_secs(5)).await;
                }
                Step::Discard => self.end_session(&session),
                Step::Resumed(handle) => return Connected { session, session_present: true, handle },
            }
        }
    }

    /// Detaches a connection from its session: schedules or publishes the
    /// will, and ends the session if it does not outlive the connection.
    pub fn disconnect(&self, session: &Arc<Session>, departure: Departure) {
        let mut st = session.lock();
        let attached = st.connection.as_ref().is_some_and(|a| a.connection_id == departure.connection_id);
        if attached {
            st.connection = None;
            st.disconnected_at_ms = Some(self.now_ms());
        }
        // A takeover detaches the old connection before it closes: an
        // expiry-0 session still ends with it, unless another took it.
        let ends = (attached || st.connection.is_none()) && !st.ended && !st.is_persistent();
        let mut publish_now = None;
        if let Some((will, delay)) = departure.will {
            let delay = delay.min(st.expiry_interval);
            if delay == 0 || ends {
                publish_now = Some(will);
            } else {
                st.pending_will = Some(PendingWill { at_ms: self.now_ms() + delay as u64 * 1000, message: will });
            }
        }
        if attached && !ends {
            session.save(&st, &self.storage);
        }
        let pending_will = st.pending_will.as_ref().map(|w| (w.at_ms, w.message.clone()));
        drop(st);
        if ends {
            self.end_session(session);
        } else if attached {
            self.tell_presence(&session.client_id, Presence::Disconnected { pending_will });
        }
        if let Some(will) = publish_now {
            self.publish(will);
        }
    }

    /// Changes the session expiry (MQTT 5 DISCONNECT may do so).
    pub fn set_expiry(&self, session: &Session, expiry_interval: u32) {
        let mut st = session.lock();
        st.expiry_interval = expiry_interval;
        session.save(&st, &self.storage);
    }

    fn save_session(&self, session: &Session) {
        let st = session.lock();
        session.save(&st, &self.storage);
    }

    /// Removes a session everywhere and publishes its pending will.
    fn end_session(&self, session: &Arc<Session>) {
        let EndedSession { pending_will, orphans, .. } = self.remove_session(session);
        self.tell_presence(&session.client_id, Presence::Ended);
        for orphan in orphans {
            self.reroute_shared(orphan);
        }
        if let Some(will) = pending_will {
            self.publish_will(will.message);
        }
    }

    /// Takes a session out of this node (storage, trie, map) and hands back
    /// what is left of it.
    fn remove_session(&self, session: &Arc<Session>) -> EndedSession {
        // Clean up storage and the trie while the session is still in the
        // map (marked ended): a CONNECT for the same client id waits for the
        // map entry to go, so it can never have its new record deleted or
        // its new subscriptions unindexed by this cleanup.
        let ended = session.end(&self.storage);
        {
            let mut trie = self.subscriptions.write();
            for filter in ended.subscriptions.keys() {
                self.unindex(&mut trie, session, filter);
            }
        }
        self.tell_fleet();
        let mut sessions = self.sessions.lock();
        if sessions.get(&session.client_id).is_some_and(|s| Arc::ptr_eq(s, session)) {
            sessions.remove(&session.client_id);
        }
        ended
    }

    fn tell_presence(&self, client_id: &str, presence: Presence) {
        if let Some(fleet) = self.fleet.get() {
            fleet.presence(client_id, presence);
        }
    }

    /// A client is connected here (after [`Broker::connect`]): the fleet's
    /// directory keeps its will, to publish it should this node die.
    pub fn announce_connected(&self, client_id: &str, will: Option<(Message, u32)>) {
        self.tell_presence(client_id, Presence::Connected { will });
    }

    /// Whether this node is leaving its fleet ([`Broker::start_leaving`]).
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// From now on connections closed by the server publish their wills as
    /// the protocol says (the node is leaving; its sessions move on).
    pub fn start_leaving(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// Client ids of every session held here.
    pub fn session_ids(&self) -> Vec<Arc<str>> {
        self.sessions.lock().keys().cloned().collect()
    }

    // ----- sessions moving between nodes (for the fleet) -------------------

    /// Takes a session away from this node for another one: its connection
    /// is closed (0x8E, the will as a takeover has it), then the session is
    /// handed back whole and removed here without its will. With
    /// `clean_start` the session ends here instead (its will is published
    /// as a single node would) and nothing is handed back.
    pub async fn export_session(&self, client_id: &str, clean_start: bool) -> Option<MovedSession> {
        let session = self.sessions.lock().get(client_id).cloned()?;
        let old = session.lock().connection.take();
        if let Some(old) = old {
            old.take_over(DisconnectReason::SessionTakenOver, Duration::from_secs(5)).await;
        }
        if session.lock().ended {
            return None;
        }
        if clean_start {
            self.end_session(&session);
            return None;
        }
        let moved = session.snapshot();
        self.remove_session(&session);
        Some(moved)
    }

    /// Another node prepares to take `client_id`'s session: from now on the
    /// session remembers which messages it was given, for that node to
    /// drop its own copies ([`MovedSession::seen`]).
    pub fn watch_move(&self, client_id: &str) {
        if let Some(session) = self.sessions.lock().get(client_id) {
            session.lock().moving.get_or_insert_with(Default::default);
        }
    }

    /// A session is coming here from another node: it is set up offline
    /// with `record`'s subscriptions (announced to the fleet, so what is
    /// published meanwhile is queued here) until [`Broker::absorb`] brings
    /// the rest. Nothing happens if a session of that id is here already.
    pub fn prepare_arrival(&self, client_id: &str, record: StoredSession) {
        if self.sessions.lock().contains_key(client_id) {
            return;
        }
        let session = Arc::new(Session::restore(client_id.into(), record, Vec::new(), self.now_ms()));
        {
            let st = session.lock();
            let mut trie = self.subscriptions.write();
            for (filter, sub) in &st.subscriptions {
                self.index(&mut trie, &session, filter, sub);
            }
            session.save(&st, &self.storage);
        }
        self.sessions.lock().entry(client_id.into()).or_insert(session);
        self.tell_fleet();
    }

    /// Takes in a session moved here (taken over from another node, handed
    /// over by a node that leaves, or adopted from a dead node's copy): its
    /// subscriptions are indexed, what it owes the client comes first, then
    /// anything queued for it here meanwhile that it did not bring.
    pub fn absorb(&self, client_id: &str, moved: MovedSession) {
        let session = {
            let mut sessions = self.sessions.lock();
            let session = sessions
                .entry(client_id.into())
                .or_insert_with(|| Arc::new(Session::new(client_id.into(), moved.session.expiry_interval)));
            session.clone()
        };
        {
            let before = session.absorb(moved, &self.storage);
            let st = session.lock();
            let mut trie = self.subscriptions.write();
            for filter in before.keys().filter(|f| !st.subscriptions.contains_key(*f)) {
                self.unindex(&mut trie, &session, filter);
            }
            for (filter, sub) in &st.subscriptions {
                self.index(&mut trie, &session, filter, sub);
            }
            session.save(&st, &self.storage);
        }
        self.tell_fleet();
    }

    /// The will waiting for its delay in `client_id`'s session (outer
    /// `None`: no session here).
    pub fn pending_will_of(&self, client_id: &str) -> Option<Option<(u64, Message)>> {
        let session = self.sessions.lock().get(client_id).cloned()?;
        let st = session.lock();
        Some(st.pending_will.as_ref().map(|w| (w.at_ms, w.message.clone())))
    }

    /// Publishes a will whose delay has passed: its Message Expiry Interval
    /// counts from now, the moment of publication (MQTT 5 §3.1.3.2.3).
    pub fn publish_will(&self, mut will: Message) {
        will.expires_at_ms = will.properties.message_expiry_interval.map(|s| self.now_ms() + s as u64 * 1000);
        self.publish(will);
    }

    /// Expires sessions and publishes delayed wills whose time has come.
    /// Called about once a second.
    pub fn sweep(&self) {
        let now = self.now_ms();
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        for session in sessions {
            let mut st = session.lock();
            if st.connection.is_some() {
                continue;
            }
            let expired =
                st.disconnected_at_ms.and_then(|at| expires_at(at, st.expiry_interval)).is_some_and(|end| end <= now);
            if expired {
                drop(st);
                tracing::debug!(client_id = %session.client_id, "session expired");
                self.end_session(&session);
                continue;
            }
            if st.pending_will.as_ref().is_some_and(|w| w.at_ms <= now) {
                let will = st.pending_will.take().expect("checked above");
                drop(st);
                self.publish_will(will.message);
                // Published: the directory must not keep it for a dead node.
                self.tell_presence(&session.client_id, Presence::Disconnected { pending_will: None });
            }
        }
        if let Err(err) = self.storage.flush() {
            tracing::error!(cause = %err, "storage flush failed");
        }
    }

    /// Routes a message to every matching session (in a fleet, through
    /// it); returns the number of deliveries queued, or 1 when a fleet
    /// cannot tell yet. A single node stores or clears a retained message
    /// first; a fleet keeps it at its owners, once routed.
    pub fn publish(&self, message: Message) -> usize {
        self.publish_kept(message).matched
    }

    /// [`Broker::publish`], with what a client's acknowledgement waits for
    /// or says: the fleet's owners keeping a retained message, the fleet
    /// refusing a QoS 1/2 message it cannot keep.
    pub fn publish_kept(&self, message: Message) -> Published {
        let Some(fleet) = self.fleet.get().filter(|_| !node_local(&message.topic)) else {
            if message.retain {
                self.retain(&message);
            }
            let matched = self.deliver(Arc::new(message), &Recipients::All);
            return Published { matched, kept: None, refused: false, forwarded: None };
        };
        let mut message = message;
        if message.qos != QoS::AtMostOnce && message.fleet_id.is_none() {
            message.fleet_id = Some(fleet.message_id());
        }
        let message = Arc::new(message);
        let (matched, forwards) = match fleet.publish(&message) {
            PublishRoute::Decided { local, forwards } => {
                (forwards + local.map_or(0, |recipients| self.deliver(message.clone(), &recipients)), forwards)
            }
            PublishRoute::Pending => (1, 0),
            // Counted by the fleet.
            PublishRoute::Refused => return Published { matched: 0, kept: None, refused: true, forwarded: None },
        };
        // The fleet keeps a retained message at the topic's owners.
        let kept = if message.retain { fleet.retained(&message) } else { None };
        let forwarded = message.fleet_id.filter(|_| forwards > 0).map(|(_, number)| number);
        Published { matched, kept, refused: false, forwarded }
    }

    /// Queues `message` for this node's matching sessions that
    /// `recipients` names. Returns the number of deliveries queued. The
    /// fleet calls this for messages from other nodes and for local
    /// publishes it routed late; take no broker lock around it.
    pub fn deliver(&self, message: Arc<Message>, recipients: &Recipients) -> usize {
        let plain = recipients.plain();
        let group_wanted = |group: &str, filter: &str| recipients.group(group, filter);
        let mut direct: Vec<(Arc<Session>, QoS, bool, Vec<u32>)> = Vec::new();
        type Member = (Arc<Session>, QoS, bool, Option<u32>);
        let mut groups: Vec<(Arc<str>, Arc<str>, Vec<Member>)> = Vec::new();
        let trie = self.subscriptions.read();
        trie.for_each_match(&message.topic, |(client_id, group), entry| {
            let qos = message.qos.min(entry.options.qos);
            let retain = message.retain && entry.options.retain_as_published;
            match (group, &entry.shared_filter) {
                (Some(group), Some(filter)) => {
                    if !group_wanted(group, filter) {
                        return;
                    }
                    let member = (entry.session.clone(), qos, retain, entry.identifier);
                    match groups.iter_mut().find(|(g, f, _)| g == group && f == filter) {
                        Some((_, _, members)) => members.push(member),
                        None => groups.push((group.clone(), filter.clone(), vec![member])),
                    }
                }
                _ => {
                    if !plain {
                        return;
                    }
                    if entry.options.no_local && message.origin.as_deref() == Some(&**client_id) {
                        return;
                    }
                    let ids = entry.identifier.into_iter().collect();
                    direct.push((entry.session.clone(), qos, retain, ids));
                }
            }
        });
        // One delivery per client for overlapping subscriptions: the highest
        // QoS, every subscription identifier.
        direct.sort_by_key(|(s, ..)| Arc::as_ptr(s));
        direct.dedup_by(|later, kept| {
            if !Arc::ptr_eq(&later.0, &kept.0) {
                return false;
            }
            kept.1 = kept.1.max(later.1);
            kept.2 |= later.2;
            kept.3.append(&mut later.3);
            true
        });
        // Session locks are taken only after the trie lock is released:
        // subscribe takes them in the other order.
        drop(trie);
        let shared: Vec<_> =
            groups.into_iter().map(|(group, filter, members)| (self.pick_member(members), group, filter)).collect();

        let mut queued = 0;
        let targets = direct
            .into_iter()
            .map(|(s, q, r, ids)| (s, q, r, ids, None))
            .chain(shared.into_iter().map(|((s, q, r, id), g, f)| (s, q, r, id.into_iter().collect(), Some((g, f)))));
        for (session, qos, retain, mut subscription_ids, shared) in targets {
            subscription_ids.sort_unstable();
            let delivery = Delivery { message: message.clone(), qos, retain, subscription_ids, seq: None, shared };
            match session.enqueue(delivery, &self.queue_limits(), &self.storage) {
                Ok(()) => queued += 1,
                Err(dropped) => self.count_dropped(&session, dropped),
            }
        }
        queued
    }

    /// Queues `message` for the sessions of `clients` held here whose
    /// plain (non-shared) subscriptions match it: once per session, at the
    /// highest QoS they ask, with their identifiers; not for a session that
    /// holds it already (by fleet id). Returns the deliveries queued.
    pub fn deliver_to_sessions(&self, message: &Arc<Message>, clients: &[Arc<str>]) -> usize {
        let mut queued = 0;
        for client in clients {
            let Some(session) = self.sessions.lock().get(client).cloned() else { continue };
            let wanted = {
                let st = session.lock();
                if message.fleet_id.is_some_and(|id| st.holds(id)) {
                    continue;
                }
                let mut wanted: Option<(QoS, bool, Vec<u32>)> = None;
                for (filter, sub) in &st.subscriptions {
                    if filter.starts_with("$share/") || !kadmq_dht::topic::matches(filter, &message.topic) {
                        continue;
                    }
                    if sub.options.no_local && message.origin.as_deref() == Some(&**client) {
                        continue;
                    }
                    let entry = wanted.get_or_insert((QoS::AtMostOnce, false, Vec::new()));
                    entry.0 = entry.0.max(message.qos.min(sub.options.qos));
                    entry.1 |= message.retain && sub.options.retain_as_published;
                    entry.2.extend(sub.identifier);
                }
                wanted
            };
            let Some((qos, retain, mut subscription_ids)) = wanted else { continue };
            subscription_ids.sort_unstable();
            let delivery =
                Delivery { message: message.clone(), qos, retain, subscription_ids, seq: None, shared: None };
            match session.enqueue(delivery, &self.queue_limits(), &self.storage) {
                Ok(()) => queued += 1,
                Err(dropped) => self.count_dropped(&session, dropped),
            }
        }
        queued
    }

    /// Gives a shared-subscription delivery whose session ended undelivered
    /// to another member of its group (MQTT 5 §4.8.2): one here, or else
    /// one on another node of the fleet.
    fn reroute_shared(&self, orphan: Delivery) {
        let Some((group, filter)) = orphan.shared else { return };
        let message = orphan.message;
        let mut members = Vec::new();
        self.subscriptions.read().for_each_match(&message.topic, |(_, g), entry| {
            if g.as_ref() == Some(&group) && entry.shared_filter.as_ref() == Some(&filter) {
                let retain = message.retain && entry.options.retain_as_published;
                members.push((entry.session.clone(), message.qos.min(entry.options.qos), retain, entry.identifier));
            }
        });
        if members.is_empty() {
            if let Some(fleet) = self.fleet.get() {
                fleet.reroute_shared(&message, &group, &filter);
            }
            return;
        }
        let (session, qos, retain, identifier) = self.pick_member(members);
        let subscription_ids = identifier.into_iter().collect();
        let delivery = Delivery { message, qos, retain, subscription_ids, seq: None, shared: Some((group, filter)) };
        if let Err(dropped) = session.enqueue(delivery, &self.queue_limits(), &self.storage) {
            self.count_dropped(&session, dropped);
        }
    }

    fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_messages: self.config.max_queued_messages,
            max_bytes: self.config.max_queued_bytes,
            qos0_offline: self.config.queue_qos0_offline,
        }
    }

    /// A full queue counts a dropped message and a limit hit; an offline or
    /// ended session is no loss (it asked for nothing more).
    fn count_dropped(&self, session: &Session, dropped: session::Dropped) {
        if let session::Dropped::QueueFull(limit) = dropped {
            Stats::add(&self.stats.messages_dropped, 1);
            self.limits.hit(limit, &session.client_id, "message dropped: the session's queue is full");
        }
    }

    /// Picks one member of a shared group: the next connected one in turn,
    /// or, when none is connected, the next one (its session queues).
    fn pick_member<T>(
        &self,
        mut members: Vec<(Arc<Session>, T, bool, Option<u32>)>,
    ) -> (Arc<Session>, T, bool, Option<u32>) {
        members.sort_by(|a, b| a.0.client_id.cmp(&b.0.client_id));
        let start = self.shared_cursor.fetch_add(1, Ordering::Relaxed) % members.len();
        let online = (0..members.len())
            .map(|i| (start + i) % members.len())
            .find(|&i| members[i].0.lock().connection.is_some())
            .unwrap_or(start);
        members.swap_remove(online)
    }

    /// Hands the retained messages this broker kept that the fleet keeps
    /// from now on (all but node-local ones) to the caller, and forgets
    /// them here (memory and storage): a node that joins a fleet.
    pub fn take_fleet_retained(&self) -> Vec<Message> {
        let mut tree = self.retained.write();
        // Storage holds every durable one (`$` topics too, which `#` does
        // not match); the tree may hold a newer one not flushed yet.
        let mut taken: HashMap<String, Message> = HashMap::new();
        for message in self.storage.retained().unwrap_or_default().into_iter().filter(|m| !node_local(&m.topic)) {
            taken.insert(message.topic.clone(), message);
        }
        for message in tree.matching("#") {
            if !node_local(&message.topic) {
                taken.insert(message.topic.clone(), (*message).clone());
            }
        }
        let taken: Vec<Message> = taken.into_values().collect();
        for message in &taken {
            tree.remove(&message.topic);
            if let Err(err) = self.storage.remove_retained(&message.topic) {
                tracing::error!(cause = %err, "could not move a retained message to the fleet");
            }
        }
        taken
    }

    /// Clears a retained message found expired, in memory and in storage.
    fn forget_expired_retained(&self, topic: &str, now: u64) {
        if self.retained.write().remove_expired(topic, now) {
            if let Err(err) = self.storage.remove_retained(topic) {
                tracing::error!(cause = %err, "could not clear an expired retained message");
            }
        }
    }

    fn retain(&self, message: &Message) {
        // `$SYS` is rebuilt from counters at start; no need to store it.
        let durable = !message.topic.starts_with("$SYS/");
        if message.payload.is_empty() {
            self.retained.write().remove(&message.topic);
            if durable {
                if let Err(err) = self.storage.remove_retained(&message.topic) {
                    tracing::error!(cause = %err, "could not clear a retained message");
                }
            }
            return;
        }
        let mut stored = message.clone();
        stored.origin = None;
        if durable {
            if let Err(err) = self.storage.put_retained(&stored) {
                tracing::error!(cause = %err, "could not store a retained message");
            }
        }
        self.retained.write().insert(Arc::new(stored));
    }

    /// Adds or replaces subscriptions; queues the retained messages each
    /// one asks for. Returns per filter the granted QoS or a reason code.
    pub fn subscribe(&self, session: &Arc<Session>, requests: Vec<SubscribeRequest>) -> Vec<u8> {
        let mut reasons = Vec::with_capacity(requests.len());
        let mut retained_for = Vec::new();
        let topics = topic_limits(&self.config);
        {
            let mut st = session.lock();
            let mut trie = self.subscriptions.write();
            for request in requests {
                let shared = match parse_shared(&request.filter) {
                    Ok(shared) => shared,
                    Err(_) => {
                        reasons.push(0x8F);
                        continue;
                    }
                };
                if shared.is_none() && !valid_topic_filter(&request.filter) {
                    reasons.push(0x8F);
                    continue;
                }
                let filter = shared.as_ref().map_or(request.filter.as_str(), |s| s.filter);
                if let Some(limit) = topics.exceeded_by(filter) {
                    self.limits.hit(limit.into(), &session.client_id, "SUBSCRIBE refused (0x8F)");
                    reasons.push(0x8F);
                    continue;
                }
                let existed = st.subscriptions.contains_key(&request.filter);
                if !existed && st.subscriptions.len() >= self.config.max_subscriptions_per_client {
                    self.limits.hit(Limit::Subscriptions, &session.client_id, "SUBSCRIBE refused (0x97)");
                    reasons.push(0x97); // Quota exceeded
                    continue;
                }
                let subscription = Subscription { options: request.options, identifier: request.identifier };
                st.subscriptions.insert(request.filter.clone(), subscription.clone());
                self.index(&mut trie, session, &request.filter, &subscription);
                reasons.push(request.options.qos as u8);
                let send_retained = match request.options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
                if send_retained && shared.is_none() {
                    retained_for.push((request.filter, subscription));
                }
            }
            session.save(&st, &self.storage);
        }
        self.tell_fleet();
        for (filter, subscription) in retained_for {
            match self.fleet.get().filter(|_| !node_local(&filter)) {
                // The fleet gathers them from the owners and queues them
                // through `queue_retained` when they come.
                Some(fleet) => fleet.send_retained(session, &filter, &subscription),
                None => {
                    let messages = self.retained.read().matching(&filter);
                    self.queue_retained(session, &subscription, messages);
                }
            }
        }
        reasons
    }

    /// Queues retained `messages` for a new subscription of `session`.
    pub fn queue_retained(&self, session: &Arc<Session>, subscription: &Subscription, messages: Vec<Arc<Message>>) {
        let now = self.now_ms();
        for message in messages {
            if message.is_expired(now) {
                if self.fleet.get().is_none() || node_local(&message.topic) {
                    self.forget_expired_retained(&message.topic, now);
                }
                continue;
            }
            let delivery = Delivery {
                qos: message.qos.min(subscription.options.qos),
                retain: true,
                subscription_ids: subscription.identifier.into_iter().collect(),
                message,
                seq: None,
                shared: None,
            };
            let limits = QueueLimits { qos0_offline: true, ..self.queue_limits() };
            if let Err(dropped) = session.enqueue(delivery, &limits, &self.storage) {
                self.count_dropped(session, dropped);
            }
        }
    }

    /// What a SUBACK for `filters` (as subscribed, `$share/…` included)
    /// with `reasons` waits for: the fleet's acknowledgement of the granted
    /// ones' routes, so a publish anywhere right after the SUBACK reaches
    /// them. `None` on a single node or when nothing is pending.
    pub fn routes_settled<'a>(
        &self,
        filters: impl IntoIterator<Item = &'a str>,
        reasons: &[u8],
    ) -> Option<BoxFuture<'static, ()>> {
        let fleet = self.fleet.get()?;
        let granted: Vec<&str> = filters
            .into_iter()
            .zip(reasons)
            .filter(|(_, reason)| **reason < 0x80)
            .map(|(filter, _)| split_shared(filter).0)
            .filter(|filter| !node_local(filter))
            .collect();
        if granted.is_empty() {
            return None;
        }
        fleet.routes_settled(&granted)
    }

    /// Removes subscriptions; per filter 0x00, 0x11 (no subscription
    /// existed) or 0x8F (over the topic limits, so it cannot exist).
    pub fn unsubscribe(&self, session: &Arc<Session>, filters: &[String]) -> Vec<u8> {
        let topics = topic_limits(&self.config);
        let mut st = session.lock();
        let mut trie = self.subscriptions.write();
        let reasons = filters
            .iter()
            .map(|filter| {
                let (bare, _) = split_shared(filter);
                if let Some(limit) = topics.exceeded_by(bare) {
                    self.limits.hit(limit.into(), &session.client_id, "UNSUBSCRIBE refused (0x8F)");
                    0x8F
                } else if st.subscriptions.remove(filter).is_some() {
                    self.unindex(&mut trie, session, filter);
                    0x00
                } else {
                    0x11
                }
            })
            .collect();
        drop(trie);
        session.save(&st, &self.storage);
        drop(st);
        self.tell_fleet();
        reasons
    }

    fn index(
        &self,
        trie: &mut SubscriptionTrie<SubscriberKey, SubscriberEntry>,
        session: &Arc<Session>,
        filter: &str,
        subscription: &Subscription,
    ) {
        let (trie_filter, group) = split_shared(filter);
        let group: Option<Arc<str>> = group.map(Arc::from);
        let entry = SubscriberEntry {
            session: session.clone(),
            options: subscription.options,
            identifier: subscription.identifier,
            shared_filter: group.as_ref().map(|_| Arc::from(trie_filter)),
        };
        let fresh = trie.insert(trie_filter, (session.client_id.clone(), group.clone()), entry).is_none();
        if fresh {
            self.queue_change(trie_filter, group, true);
        }
    }

    /// Queues a subscription change for [`Broker::tell_fleet`] (called
    /// under the trie's write lock, which orders the changes).
    fn queue_change(&self, filter: &str, group: Option<Arc<str>>, began: bool) {
        if self.fleet.get().is_some() && !node_local(filter) {
            self.fleet_changes.lock().push(SubscriptionChange { filter: filter.into(), group, began });
        }
    }

    fn unindex(&self, trie: &mut SubscriptionTrie<SubscriberKey, SubscriberEntry>, session: &Session, filter: &str) {
        let (trie_filter, group) = split_shared(filter);
        let group: Option<Arc<str>> = group.map(Arc::from);
        let removed = trie.remove(trie_filter, &(session.client_id.clone(), group.clone())).is_some();
        if removed {
            self.queue_change(trie_filter, group, false);
        }
    }

    /// Closes every connection (server shutting down) and waits for them.
    pub async fn kick_all(&self, reason: DisconnectReason) {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let mut waits = Vec::new();
        for session in sessions {
            if let Some(attachment) = session.lock().connection.take() {
                waits.push(attachment.take_over(reason, Duration::from_secs(2)));
            }
        }
        futures_util::future::join_all(waits).await;
    }
}

/// What `connect` does with an existing session.
enum Step {
    Retry,
    TakeOver(Attachment),
    Discard,
    Resumed(AttachmentHandle),
}

fn expires_at(disconnected_at_ms: u64, expiry_interval: u32) -> Option<u64> {
    (expiry_interval != session::NEVER_EXPIRES)
        .then(|| disconnected_at_ms.saturating_add(expiry_interval as u64 * 1000))
}
