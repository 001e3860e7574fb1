//! One client's session: its subscriptions, the messages owed to it (queued,
//! or sent and awaiting acknowledgement) and the QoS 2 ids it has sent us.
//!
//! A session outlives connections. The router appends deliveries under the
//! session's lock and wakes the attached connection, which takes what its
//! inflight window allows. Persistent sessions mirror every QoS 1/2 delivery
//! into storage so a restart loses nothing that was acknowledged upstream.

use super::limits::Limit;
use super::message::{FleetId, Message};
use crate::protocol::{
    self, DisconnectReason, Packet, PubAck, Publish, PublishProperties, QoS, SubscriptionOptions, Version,
};
use crate::storage::{Storage, StoredDelivery, StoredSession, StoredSubscription};
use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{oneshot, Notify};

/// A session as it moves between nodes: its record, what is owed to the
/// client (inflight first, with packet ids, then the queue, in order) and a
/// will waiting for its delay (Unix milliseconds when due).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MovedSession {
    pub session: StoredSession,
    pub deliveries: Vec<StoredDelivery>,
    pub pending_will: Option<(u64, Message)>,
    /// Fleet ids of messages the session was given while it was being
    /// moved, delivered or not: the node it moves to drops its own copies.
    #[serde(default)]
    pub seen: Vec<FleetId>,
}

/// Most fleet ids a session being moved remembers (see `SessionState::moving`).
const MOVING_SEEN_MAX: usize = 65_536;

/// Session expiry that never ends (3.1.1 persistent sessions).
pub const NEVER_EXPIRES: u32 = u32::MAX;

pub struct Session {
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// Wakes the attached connection when deliveries are queued.
    wake: Notify,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// A message on its way to this session's client.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Key of the stored copy, for persistent sessions and QoS > 0.
    pub seq: Option<u64>,
    /// Share group and filter when routed through a shared subscription:
    /// if this session ends first, another member gets the message.
    pub shared: Option<(Arc<str>, Arc<str>)>,
}

struct Inflight {
    delivery: Delivery,
    /// QoS 2: PUBREC came and PUBREL was sent; waiting for PUBCOMP.
    released: bool,
}

/// The connection attached to a session. Taking it over means sending on
/// `kick` and waiting for `gone` to close.
pub struct Attachment {
    pub connection_id: u64,
    kick: oneshot::Sender<DisconnectReason>,
    gone: oneshot::Receiver<()>,
}

/// What the connection task keeps: it learns of a takeover on `kicked` and
/// signals that it is done by dropping `_gone`.
pub struct AttachmentHandle {
    pub connection_id: u64,
    pub kicked: oneshot::Receiver<DisconnectReason>,
    pub gone: oneshot::Sender<()>,
}

impl Attachment {
    pub fn new(connection_id: u64) -> (Attachment, AttachmentHandle) {
        let (kick, kicked) = oneshot::channel();
        let (gone_tx, gone) = oneshot::channel();
        (Attachment { connection_id, kick, gone }, AttachmentHandle { connection_id, kicked, gone: gone_tx })
    }

    /// Asks the attached connection to close and waits until it has.
    pub async fn take_over(self, reason: DisconnectReason, wait: std::time::Duration) {
        let _ = self.kick.send(reason);
        let _ = tokio::time::timeout(wait, self.gone).await;
    }
}

pub struct PendingWill {
    pub at_ms: u64,
    pub message: Message,
}

pub struct SessionState {
    /// Seconds the session lives after its connection closes; 0 = ends with it.
    pub expiry_interval: u32,
    pub subscriptions: HashMap<String, Subscription>,
    queue: Queue,
    inflight: BTreeMap<u16, Inflight>,
    next_packet_id: u16,
    next_seq: u64,
    pub incoming_qos2: HashSet<u16>,
    pub connection: Option<Attachment>,
    pub disconnected_at_ms: Option<u64>,
    pub pending_will: Option<PendingWill>,
    /// Set when the session was discarded; late deliveries are dropped.
    pub ended: bool,
    /// While another node prepares to take the session over: the fleet ids
    /// of the messages queued here since, which that node also got and
    /// must not deliver again (they go with the session).
    pub moving: Option<HashSet<FleetId>>,
    /// What the attached client accepts (from its CONNECT).
    pub client_limits: ClientLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub version: Version,
    pub receive_maximum: u16,
    pub maximum_packet_size: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits { version: Version::V5, receive_maximum: u16::MAX, maximum_packet_size: protocol::MAX_PACKET_SIZE }
    }
}

/// Why a delivery was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    SessionEnded,
    /// The queue holds as many messages ([`Limit::QueuedMessages`]) or
    /// bytes ([`Limit::QueuedBytes`]) as it may.
    QueueFull(Limit),
    Offline,
}

/// How much a session's queue may hold, and whether offline persistent
/// sessions queue QoS 0.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub qos0_offline: bool,
}

/// Deliveries waiting to be sent, with the bytes they hold.
#[derive(Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    fn push_back(&mut self, delivery: Delivery) {
        self.bytes += delivery.queued_bytes();
        self.items.push_back(delivery);
    }

    fn push_front(&mut self, delivery: Delivery) {
        self.bytes += delivery.queued_bytes();
        self.items.push_front(delivery);
    }

    fn pop_front(&mut self) -> Option<Delivery> {
        let delivery = self.items.pop_front()?;
        self.bytes -= delivery.queued_bytes();
        Some(delivery)
    }

    fn take_all(&mut self) -> VecDeque<Delivery> {
        self.bytes = 0;
        std::mem::take(&mut self.items)
    }
}

impl Delivery {
    /// The delivery as storage and other nodes keep it.
    fn to_stored(&self, packet_id: Option<u16>, released: bool) -> StoredDelivery {
        StoredDelivery {
            message: (*self.message).clone(),
            qos: self.qos,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
            packet_id,
            released,
        }
    }

    /// What this delivery counts against [`QueueLimits::max_bytes`]: its
    /// topic and payload (the message itself may be shared with others).
    fn queued_bytes(&self) -> usize {
        self.message.topic.len() + self.message.payload.len()
    }
}

impl SessionState {
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    pub fn to_stored(&self) -> StoredSession {
        let mut subscriptions: Vec<StoredSubscription> = self
            .subscriptions
            .iter()
            .map(|(filter, s)| StoredSubscription {
                filter: filter.clone(),
                options: s.options,
                identifier: s.identifier,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        let mut incoming_qos2: Vec<u16> = self.incoming_qos2.iter().copied().collect();
        incoming_qos2.sort_unstable();
        StoredSession {
            expiry_interval: self.expiry_interval,
            subscriptions,
            incoming_qos2,
            disconnected_at_ms: self.disconnected_at_ms,
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    fn store_delivery(
        &self,
        client_id: &str,
        delivery: &Delivery,
        packet_id: Option<u16>,
        released: bool,
        storage: &Storage,
    ) {
        let Some(seq) = delivery.seq else { return };
        let stored = delivery.to_stored(packet_id, released);
        if let Err(err) = storage.put_delivery(client_id, seq, &stored) {
            tracing::error!(cause = %err, client_id, "could not persist a delivery");
        }
    }

    fn forget_delivery(&self, client_id: &str, delivery: &Delivery, storage: &Storage) {
        if let Some(seq) = delivery.seq {
            if let Err(err) = storage.remove_delivery(client_id, seq) {
                tracing::error!(cause = %err, client_id, "could not remove a delivery");
            }
        }
    }

    /// Whether the message named `id` is owed to the client (queued or inflight).
    pub fn holds(&self, id: FleetId) -> bool {
        let named = |d: &Delivery| d.message.fleet_id == Some(id);
        self.queue.items.iter().any(named) || self.inflight.values().any(|i| named(&i.delivery))
    }

    /// Takes the record part of a stored or moved session.
    fn take_record(&mut self, stored: StoredSession) {
        self.expiry_interval = stored.expiry_interval;
        self.subscriptions = stored
            .subscriptions
            .into_iter()
            .map(|s| (s.filter, Subscription { options: s.options, identifier: s.identifier }))
            .collect();
        self.incoming_qos2 = stored.incoming_qos2.into_iter().collect();
        self.disconnected_at_ms = stored.disconnected_at_ms;
    }

    /// Takes a delivery owed to the client into the inflight window (it has
    /// a packet id) or the queue. Restored from storage it keeps its `seq`;
    /// moved here it gets the next one and is stored (persistent sessions).
    fn take_delivery(&mut self, client_id: &str, seq: Option<u64>, d: StoredDelivery, storage: Option<&Storage>) {
        let seq = match seq {
            Some(seq) => Some(seq),
            None if self.is_persistent() && d.qos != QoS::AtMostOnce => Some(self.next_seq),
            None => None,
        };
        if let Some(seq) = seq {
            self.next_seq = self.next_seq.max(seq + 1);
        }
        let (packet_id, released) = (d.packet_id, d.released);
        let delivery = Delivery {
            message: Arc::new(d.message),
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.subscription_ids,
            seq,
            shared: None,
        };
        let packet_id = packet_id.filter(|id| !self.inflight.contains_key(id));
        if let Some(storage) = storage {
            self.store_delivery(client_id, &delivery, packet_id, released, storage);
        }
        match packet_id {
            Some(id) => {
                self.inflight.insert(id, Inflight { delivery, released });
                self.next_packet_id = self.next_packet_id.max(id.wrapping_add(1)).max(1);
            }
            None => self.queue.push_back(delivery),
        }
    }

    fn free_packet_id(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

impl Session {
    pub fn new(client_id: Arc<str>, expiry_interval: u32) -> Session {
        Session {
            client_id,
            state: Mutex::new(SessionState {
                expiry_interval,
                subscriptions: HashMap::new(),
                queue: Queue::default(),
                inflight: BTreeMap::new(),
                next_packet_id: 1,
                next_seq: 1,
                incoming_qos2: HashSet::new(),
                connection: None,
                disconnected_at_ms: None,
                pending_will: None,
                ended: false,
                moving: None,
                client_limits: ClientLimits::default(),
            }),
            wake: Notify::new(),
        }
    }

    /// Rebuilds a persistent session from storage (offline, with its queue;
    /// deliveries that had been sent are sent again, with DUP, on resume).
    /// A record without a disconnect time counts as disconnected at `now_ms`.
    pub fn restore(
        client_id: Arc<str>,
        stored: StoredSession,
        deliveries: Vec<(u64, StoredDelivery)>,
        now_ms: u64,
    ) -> Session {
        let session = Session::new(client_id, stored.expiry_interval);
        {
            let mut st = session.state.lock();
            st.take_record(stored);
            st.disconnected_at_ms = Some(st.disconnected_at_ms.unwrap_or(now_ms));
            for (seq, d) in deliveries {
                st.take_delivery(&session.client_id, Some(seq), d, None);
            }
        }
        session
    }

    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock()
    }

    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Persists the session record if the session is persistent.
    pub fn save(&self, st: &SessionState, storage: &Storage) {
        if st.is_persistent() && !st.ended {
            if let Err(err) = storage.put_session(&self.client_id, &st.to_stored()) {
                tracing::error!(cause = %err, client_id = %self.client_id, "could not persist session");
            }
        }
    }

    /// Queues a message for the client. Offline sessions keep QoS 1/2 (and
    /// QoS 0 when `limits.qos0_offline`); every session holds at most
    /// `limits.max_messages` messages and `limits.max_bytes` bytes waiting.
    pub fn enqueue(&self, mut delivery: Delivery, limits: &QueueLimits, storage: &Storage) -> Result<(), Dropped> {
        let mut st = self.state.lock();
        if st.ended {
            return Err(Dropped::SessionEnded);
        }
        let online = st.connection.is_some();
        if !online && (!st.is_persistent() || (delivery.qos == QoS::AtMostOnce && !limits.qos0_offline)) {
            return Err(Dropped::Offline);
        }
        if st.queue.len() >= limits.max_messages {
            return Err(Dropped::QueueFull(Limit::QueuedMessages));
        }
        // An empty queue takes one message of any size (the packet size
        // already bounds it), so a large message is not refused forever.
        if st.queue.len() > 0 && st.queue.bytes + delivery.queued_bytes() > limits.max_bytes {
            return Err(Dropped::QueueFull(Limit::QueuedBytes));
        }
        if let (Some(seen), Some(id)) = (&mut st.moving, delivery.message.fleet_id) {
            // Bounded: a move never finished must not grow it for ever.
            if seen.len() < MOVING_SEEN_MAX {
                seen.insert(id);
            }
        }
        if st.is_persistent() && delivery.qos != QoS::AtMostOnce {
            delivery.seq = Some(st.next_seq);
            st.next_seq += 1;
            st.store_delivery(&self.client_id, &delivery, None, false, storage);
        }
        st.queue.push_back(delivery);
        drop(st);
        if online {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves deliveries from the queue into the inflight window and returns
    /// them as PUBLISH packets, at most `batch`. Expired messages and
    /// messages larger than the client accepts are dropped (the latter as
    /// MQTT 5 requires); expiry is judged at `now` (Unix milliseconds).
    /// Returns whether more are ready, and how many were dropped.
    pub fn take_ready(&self, batch: usize, out: &mut Vec<Publish>, storage: &Storage, now: u64) -> (bool, usize) {
        let mut st = self.state.lock();
        let limits = st.client_limits;
        let mut dropped = 0;
        let mut taken = 0;
        while taken < batch {
            let Some(front) = st.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= limits.receive_maximum as usize {
                break;
            }
            let delivery = st.queue.pop_front().expect("front exists");
            if delivery.message.is_expired(now) {
                st.forget_delivery(&self.client_id, &delivery, storage);
                dropped += 1;
                continue;
            }
            let packet_id = if delivery.qos == QoS::AtMostOnce {
                None
            } else {
                match st.free_packet_id() {
                    Some(id) => Some(id),
                    None => {
                        st.queue.push_front(delivery);
                        break;
                    }
                }
            };
            let publish = to_publish(&delivery, packet_id, false, now);
            if limits.maximum_packet_size < protocol::MAX_PACKET_SIZE {
                let packet = Packet::Publish(publish);
                let too_large = protocol::encoded_len(&packet, limits.version) > limits.maximum_packet_size;
                let Packet::Publish(publish) = packet else { unreachable!("wrapped just above") };
                if too_large {
                    st.forget_delivery(&self.client_id, &delivery, storage);
                    dropped += 1;
                    continue;
                }
                out.push(publish);
            } else {
                out.push(publish);
            }
            if let Some(id) = packet_id {
                st.store_delivery(&self.client_id, &delivery, Some(id), false, storage);
                st.inflight.insert(id, Inflight { delivery, released: false });
            }
            taken += 1;
        }
        let more = st
            .queue
            .front()
            .is_some_and(|d| d.qos == QoS::AtMostOnce || st.inflight.len() < limits.receive_maximum as usize);
        (more, dropped)
    }

    /// What must be sent again when a client resumes the session: PUBLISH
    /// with DUP for unacknowledged messages, PUBREL for released QoS 2.
    /// Message expiry intervals are what is left at `now` (Unix milliseconds).
    pub fn resend_inflight(&self, now: u64) -> Vec<Packet> {
        let st = self.state.lock();
        st.inflight
            .iter()
            .map(|(&id, inflight)| {
                if inflight.released {
                    Packet::PubRel(PubAck::new(id))
                } else {
                    Packet::Publish(to_publish(&inflight.delivery, Some(id), true, now))
                }
            })
            .collect()
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client: the message is done.
    pub fn complete(&self, packet_id: u16, storage: &Storage) -> bool {
        let mut st = self.state.lock();
        match st.inflight.remove(&packet_id) {
            Some(inflight) => {
                st.forget_delivery(&self.client_id, &inflight.delivery, storage);
                drop(st);
                true
            }
            None => false,
        }
    }

    /// PUBREC from the client: returns whether the id was awaiting it (the
    /// caller answers PUBREL either way, as the spec asks). A PUBREC with an
    /// error reason ends the exchange.
    pub fn received(&self, packet_id: u16, reason: u8, storage: &Storage) -> bool {
        let mut st = self.state.lock();
        if reason >= 0x80 {
            if let Some(inflight) = st.inflight.remove(&packet_id) {
                st.forget_delivery(&self.client_id, &inflight.delivery, storage);
            }
            return false;
        }
        let Some(inflight) = st.inflight.get_mut(&packet_id) else { return false };
        inflight.released = true;
        let delivery = inflight.delivery.clone();
        st.store_delivery(&self.client_id, &delivery, Some(packet_id), true, storage);
        true
    }

    /// Everything the session holds, to move it to another node: its
    /// record, its inflight messages (with their packet ids) then its
    /// queue, in order, and a will waiting for its delay.
    pub fn snapshot(&self) -> MovedSession {
        let st = self.state.lock();
        let inflight = st.inflight.iter().map(|(&id, i)| i.delivery.to_stored(Some(id), i.released));
        let queued = st.queue.items.iter().map(|d| d.to_stored(None, false));
        MovedSession {
            session: st.to_stored(),
            deliveries: inflight.chain(queued).collect(),
            pending_will: st.pending_will.as_ref().map(|w| (w.at_ms, w.message.clone())),
            seen: st.moving.iter().flatten().copied().collect(),
        }
    }

    /// Takes in a session moved here from another node: its record, its
    /// inflight messages (same packet ids, same QoS 2 state) and queue, then
    /// what this node queued for it meanwhile, less the copies the moved
    /// session brought or saw (the same [`Message::fleet_id`]). Returns the
    /// subscriptions it had here before, for the broker to re-index.
    pub fn absorb(&self, moved: MovedSession, storage: &Storage) -> HashMap<String, Subscription> {
        let mut st = self.state.lock();
        let mut here: Vec<Delivery> = std::mem::take(&mut st.inflight).into_values().map(|i| i.delivery).collect();
        here.extend(st.queue.take_all());
        for delivery in &here {
            st.forget_delivery(&self.client_id, delivery, storage);
        }
        let mut brought: HashSet<FleetId> = moved.deliveries.iter().filter_map(|d| d.message.fleet_id).collect();
        brought.extend(moved.seen);
        let before = std::mem::take(&mut st.subscriptions);
        st.take_record(moved.session);
        st.pending_will = moved.pending_will.map(|(at_ms, message)| PendingWill { at_ms, message });
        for stored in moved.deliveries {
            st.take_delivery(&self.client_id, None, stored, Some(storage));
        }
        for mut delivery in here {
            if delivery.message.fleet_id.is_some_and(|id| brought.contains(&id)) {
                continue;
            }
            delivery.seq = None;
            let stored = delivery.to_stored(None, false);
            st.take_delivery(&self.client_id, None, stored, Some(storage));
        }
        before
    }

    /// Drops everything owed to the client (session discarded) and hands
    /// back what the broker must still clean up or publish.
    pub fn end(&self, storage: &Storage) -> EndedSession {
        let mut st = self.state.lock();
        st.ended = true;
        // Not yet received by the client (QoS 2 after PUBREC was received).
        let mut orphans: Vec<Delivery> = st.queue.take_all().into_iter().filter(|d| d.shared.is_some()).collect();
        orphans.extend(
            std::mem::take(&mut st.inflight)
                .into_values()
                .filter(|i| !i.released && i.delivery.shared.is_some())
                .map(|i| i.delivery),
        );
        let ended = EndedSession {
            subscriptions: std::mem::take(&mut st.subscriptions),
            pending_will: st.pending_will.take(),
            orphans,
        };
        drop(st);
        if let Err(err) = storage.remove_session(&self.client_id) {
            tracing::error!(cause = %err, client_id = %self.client_id, "could not remove session from storage");
        }
        ended
    }
}

/// What is left of a session that ended.
pub struct EndedSession {
    pub subscriptions: HashMap<String, Subscription>,
    pub pending_will: Option<PendingWill>,
    /// Shared-subscription deliveries the client never got, to re-route.
    pub orphans: Vec<Delivery>,
}

fn to_publish(delivery: &Delivery, packet_id: Option<u16>, dup: bool, now: u64) -> Publish {
    let mut message_properties = delivery.message.properties.clone();
    if let Some(remaining) = delivery.message.remaining_secs(now) {
        message_properties.message_expiry_interval = Some(remaining.max(1));
    }
    Publish {
        dup,
        qos: delivery.qos,
        retain: delivery.retain,
        topic: delivery.message.topic.clone(),
        packet_id,
        payload: delivery.message.payload.clone(),
        properties: PublishProperties {
            message: message_properties,
            topic_alias: None,
            subscription_identifiers: delivery.subscription_ids.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageProperties;
    use bytes::Bytes;

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from_static(b"p"),
                qos,
                retain: false,
                properties: MessageProperties::default(),
                expires_at_ms: None,
                origin: None,
                fleet_id: None,
            }),
            qos,
            retain: false,
            subscription_ids: vec![],
            seq: None,
            shared: None,
        }
    }

    fn messages(max_messages: usize) -> QueueLimits {
        QueueLimits { max_messages, max_bytes: usize::MAX, qos0_offline: false }
    }

    /// The time the tests run at (Unix milliseconds).
    const NOW: u64 = 1_000_000;

    #[test]
    fn inflight_window_honours_receive_maximum() {
        let storage = Storage::in_memory();
        let session = Session::new("c".into(), 0);
        let (attachment, _handle) = Attachment::new(1);
        {
            let mut st = session.lock();
            st.connection = Some(attachment);
            st.client_limits.receive_maximum = 2;
        }
        for _ in 0..5 {
            session.enqueue(delivery(QoS::AtLeastOnce), &messages(100), &storage).unwrap();
        }
        let mut out = Vec::new();
        let (more, _) = session.take_ready(100, &mut out, &storage, NOW);
        assert_eq!(out.len(), 2);
        assert!(!more);
        assert!(session.complete(out[0].packet_id.unwrap(), &storage));
        out.clear();
        session.take_ready(100, &mut out, &storage, NOW);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn offline_persistent_session_queues_and_bounds() {
        let storage = Storage::in_memory();
        let session = Session::new("c".into(), 60);
        assert_eq!(session.enqueue(delivery(QoS::AtMostOnce), &messages(2), &storage), Err(Dropped::Offline));
        session.enqueue(delivery(QoS::AtLeastOnce), &messages(2), &storage).unwrap();
        session.enqueue(delivery(QoS::ExactlyOnce), &messages(2), &storage).unwrap();
        assert_eq!(
            session.enqueue(delivery(QoS::AtLeastOnce), &messages(2), &storage),
            Err(Dropped::QueueFull(Limit::QueuedMessages))
        );
        assert_eq!(storage.deliveries("c").unwrap().len(), 2);
    }

    #[test]
    fn queued_bytes_are_bounded_and_given_back() {
        let storage = Storage::in_memory();
        let session = Session::new("c".into(), 60);
        // Each test delivery holds 2 bytes (topic "t", payload "p").
        let limits = QueueLimits { max_messages: 100, max_bytes: 5, qos0_offline: false };
        session.enqueue(delivery(QoS::AtLeastOnce), &limits, &storage).unwrap();
        session.enqueue(delivery(QoS::AtLeastOnce), &limits, &storage).unwrap();
        assert_eq!(session.lock().queued_bytes(), 4);
        let full = session.enqueue(delivery(QoS::AtLeastOnce), &limits, &storage);
        assert_eq!(full, Err(Dropped::QueueFull(Limit::QueuedBytes)));
        // Sending gives the bytes back.
        session.lock().connection = Some(Attachment::new(1).0);
        let mut out = Vec::new();
        session.take_ready(1, &mut out, &storage, NOW);
        assert_eq!(session.lock().queued_bytes(), 2);
        session.enqueue(delivery(QoS::AtLeastOnce), &limits, &storage).unwrap();
        // An empty queue takes one message of any size.
        let tight = QueueLimits { max_bytes: 1, ..limits };
        let empty = Session::new("d".into(), 60);
        empty.enqueue(delivery(QoS::AtLeastOnce), &tight, &storage).unwrap();
        assert_eq!(
            empty.enqueue(delivery(QoS::AtLeastOnce), &tight, &storage),
            Err(Dropped::QueueFull(Limit::QueuedBytes))
        );
    }

    #[test]
    fn restore_resends_inflight_with_dup() {
        let storage = Storage::in_memory();
        let session = Session::new("c".into(), 60);
        session.lock().connection = Some(Attachment::new(1).0);
        session.enqueue(delivery(QoS::AtLeastOnce), &messages(10), &storage).unwrap();
        session.enqueue(delivery(QoS::ExactlyOnce), &messages(10), &storage).unwrap();
        let mut out = Vec::new();
        session.take_ready(10, &mut out, &storage, NOW);
        assert!(session.received(out[1].packet_id.unwrap(), 0, &storage));

        let stored = session.lock().to_stored();
        let restored = Session::restore("c".into(), stored, storage.deliveries("c").unwrap(), NOW);
        let resend = restored.resend_inflight(NOW);
        assert_eq!(resend.len(), 2);
        assert!(matches!(&resend[0], Packet::Publish(p) if p.dup && p.packet_id == out[0].packet_id));
        assert!(matches!(&resend[1], Packet::PubRel(a) if Some(a.packet_id) == out[1].packet_id));
    }

    #[test]
    fn a_moved_session_keeps_its_packet_ids_and_drops_the_copies_it_brought_or_saw() {
        let storage = Storage::in_memory();
        let named = |qos: QoS, id: u64| {
            let mut d = delivery(qos);
            Arc::make_mut(&mut d.message).fleet_id = Some((9, id));
            d
        };
        // The node it leaves: one QoS 2 message sent (PUBREC in), one queued.
        let leaving = Session::new("c".into(), 60);
        leaving.lock().connection = Some(Attachment::new(1).0);
        leaving.enqueue(named(QoS::ExactlyOnce, 1), &messages(10), &storage).unwrap();
        let mut sent = Vec::new();
        leaving.take_ready(1, &mut sent, &storage, NOW);
        assert!(leaving.received(sent[0].packet_id.unwrap(), 0, &storage));
        leaving.enqueue(named(QoS::AtLeastOnce, 2), &messages(10), &storage).unwrap();
        leaving.lock().moving = Some(HashSet::from([(9, 3)])); // given, and acknowledged, during the move
        let moved = leaving.snapshot();
        assert_eq!(moved.deliveries.len(), 2);
        assert_eq!(moved.seen, vec![(9, 3)]);

        // The node it reaches (its own storage) queued copies of 2 and 3,
        // and a new 4, meanwhile.
        let storage = Storage::in_memory();
        let arriving = Session::new("c".into(), 60);
        for id in [2, 3, 4] {
            arriving.enqueue(named(QoS::AtLeastOnce, id), &messages(10), &storage).unwrap();
        }
        arriving.absorb(moved, &storage);
        let resend = arriving.resend_inflight(NOW);
        assert!(
            matches!(&resend[..], [Packet::PubRel(a)] if Some(a.packet_id) == sent[0].packet_id),
            "the QoS 2 exchange goes on under its packet id: {resend:?}"
        );
        arriving.lock().connection = Some(Attachment::new(2).0);
        let mut out = Vec::new();
        arriving.take_ready(10, &mut out, &storage, NOW);
        assert_eq!(out.len(), 2, "message 2 (brought) and 4 (new); 3 was seen: {out:?}");
        let st = arriving.lock();
        let fleet_ids: Vec<_> = st.inflight.values().filter_map(|i| i.delivery.message.fleet_id).collect();
        assert!(fleet_ids.contains(&(9, 2)) && fleet_ids.contains(&(9, 4)) && !fleet_ids.contains(&(9, 3)));
        drop(st);
        assert_eq!(storage.deliveries("c").unwrap().len(), 3, "persisted: the released QoS 2 and the two sent");
    }

    #[test]
    fn expiry_is_judged_at_the_now_given() {
        let storage = Storage::in_memory();
        let session = Session::new("c".into(), 60);
        session.lock().connection = Some(Attachment::new(1).0);
        let expiring = |at: u64| {
            let mut d = delivery(QoS::AtLeastOnce);
            Arc::make_mut(&mut d.message).expires_at_ms = Some(at);
            d
        };
        session.enqueue(expiring(NOW + 10_000), &messages(10), &storage).unwrap();
        session.enqueue(expiring(NOW + 2_000), &messages(10), &storage).unwrap();
        let mut out = Vec::new();
        let (_, dropped) = session.take_ready(10, &mut out, &storage, NOW + 5_000);
        assert_eq!((out.len(), dropped), (1, 1), "the message that expired at +2 s is dropped at +5 s");
        assert_eq!(out[0].properties.message.message_expiry_interval, Some(5));
        // Resent later, it carries what is left then.
        let resend = session.resend_inflight(NOW + 8_500);
        assert!(matches!(&resend[0], Packet::Publish(p) if p.properties.message.message_expiry_interval == Some(2)));
        assert_eq!(storage.deliveries("c").unwrap().len(), 1, "the dropped one is forgotten in storage too");
    }
}
