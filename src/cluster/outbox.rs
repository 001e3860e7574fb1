//! Reliable, ordered QoS 1/2 forwarding between nodes over links that may
//! drop frames (the driver is at-most-once across link drops).
//!
//! Job: on the sending side, the [`Outbox`]: number each QoS 1/2 forward
//! per destination node (`seq`, within this run's `epoch`), hold the
//! message (persisted, so a PUBACK never promises more than the disk
//! holds) until every destination acknowledges it, and resend a
//! destination's unacknowledged forwards in order when it is silent
//! (go-back-N). The receiving side is [`super::dedupe`]. Each forward
//! carries the sender's lowest unacknowledged `seq` for the destination
//! (`base`), so a receiver that restarted is never left waiting for what
//! will not come.
//!
//! Nothing is given up for a destination that is alive, however long it
//! takes; a destination declared dead has its part taken out
//! ([`Outbox::take_destination`]; its numbering goes on) and sent on to
//! whoever adopts its sessions, held here again as forwards to the other
//! members ([`ForwardRoute::sent_on`]). The outbox is bounded in bytes
//! (`cluster.outbox_max_mib`): once full, new QoS 1/2 publishes are
//! refused (the publisher is told, MQTT 5 reason 0x97) rather than
//! acknowledged and then lost; what is sent on counts, but is never
//! refused (it was acknowledged already).
//!
//! Group commit: a held message is written to the storage only when the
//! storage next flushes ([`Unwritten`], run by the flush before anything is
//! acknowledged to a client), all unwritten ones in one batch; one that
//! every destination acknowledged before that is never written at all.
//! The removal of a written one, once acknowledged, goes in the next batch
//! too (a crash before it resends the message after the restart: QoS 1
//! allows that, and the destination drops a QoS 2 one it delivered).
//!
//! Boundary: no network; [`Storage`] only. The cluster task sends what
//! [`Outbox::due`] returns and feeds acknowledgements to [`Outbox::ack`].

use crate::broker::message::Message;
use crate::storage::Storage;
use ahash::AHashMap;
use fresh::FreshRecords;
use kadmq_dht::core::{ForwardRoute, NodeId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

mod fresh;

/// Resend a destination's forwards when none was acknowledged for this long.
pub const RESEND_AFTER_MS: u64 = 3_000;
/// Forwards resent to one destination per resend round.
pub const RESEND_BATCH: usize = 4_096;

/// Where a QoS 1/2 forward stands in its sender's sequence to one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// The sender's run (its incarnation): sequences restart with it.
    pub epoch: u64,
    pub seq: u64,
    /// The sender's lowest unacknowledged `seq` for this destination.
    pub base: u64,
}

/// The persisted form of one held message. `waiting` empty with `routed`
/// false: the message was still being routed; route it again after a restart.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub message: Message,
    pub routed: bool,
    pub waiting: Vec<(u64, ForwardRoute)>,
}

struct Held {
    message: Arc<Message>,
    /// Destinations that have not acknowledged yet.
    waiting: Waiting,
}

/// What a held message counts against the bound: its payload, topic and
/// properties, and a record's overhead.
fn size_of(message: &Message) -> u64 {
    let p = &message.properties;
    let strings = p.content_type.iter().chain(&p.response_topic).map(String::len).sum::<usize>();
    let user: usize = p.user_properties.iter().map(|u| u.0.len() + u.1.len()).sum();
    let properties = strings + user + p.correlation_data.as_ref().map_or(0, |d| d.len());
    (message.payload.len() + message.topic.len() + properties + 64) as u64
}

/// The numbering towards one destination node.
#[derive(Default)]
struct Destination {
    next_seq: u64,
    /// The message ids of the unacknowledged forwards, in order: their
    /// sequence numbers run without a gap from [`Destination::base`] (only
    /// acknowledgements take them out, and from the front).
    unacked: VecDeque<u64>,
    /// When the oldest unacknowledged forward was last (re)sent.
    sent_at_ms: u64,
}

impl Destination {
    /// The lowest unacknowledged sequence number (the next one if none).
    fn base(&self) -> u64 {
        self.next_seq - self.unacked.len() as u64
    }

    /// Takes out every forward up to sequence number `upto`, in order.
    fn acknowledge(&mut self, upto: u64) -> std::collections::vec_deque::Drain<'_, u64> {
        let count = upto.saturating_add(1).saturating_sub(self.base()).min(self.unacked.len() as u64);
        self.unacked.drain(..count as usize)
    }
}

/// Held messages not written to the storage yet (see the module docs).
/// Its lock is a leaf: taken under the state mutex (holding, acknowledging)
/// and by the storage's flush, never the other way.
#[derive(Default)]
pub struct Unwritten {
    pending: Mutex<Pending>,
    /// Fresh records written, and acknowledged before they were (never written).
    pub written: AtomicU64,
    pub spared: AtomicU64,
}

/// What the next flushes write: fresh records once due, rewrites of
/// records written before, and removals of records written.
#[derive(Default)]
struct Pending {
    /// Never written yet, by id (in the order they were held).
    fresh: FreshRecords<Fresh>,
    /// Written before, with fewer destinations now: rewritten at the next flush.
    rewrites: BTreeMap<u64, (Arc<Message>, Waiting)>,
    removed: Vec<u64>,
    /// Fresh records up to this id are written at the next flush, however
    /// young ([`Unwritten::require`]).
    due: u64,
    /// How long a fresh record may wait for its acknowledgements before a
    /// flush writes it anyway.
    window: Duration,
    /// Who waits for every fresh record up to an id to go
    /// ([`Unwritten::settled`]), by that id: woken when the oldest fresh
    /// record left is past it, and only then (not on every change).
    waiters: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Pending {
    /// Whether no fresh record up to id `upto` is left.
    fn settled(&self, upto: u64) -> bool {
        self.fresh.first().is_none_or(|first| first > upto)
    }

    /// Wakes the waiters whose records all went.
    fn wake_settled(&mut self) {
        let first = self.fresh.first().unwrap_or(u64::MAX);
        let waiting = self.waiters.split_off(&first);
        for waiter in std::mem::replace(&mut self.waiters, waiting).into_values().flatten() {
            let _ = waiter.send(());
        }
    }
}

struct Fresh {
    message: Arc<Message>,
    waiting: Waiting,
    held_at: Instant,
}

/// The destinations a held message waits for, and what each delivers:
/// usually one, kept inline (no allocation of its own).
pub type Waiting = SmallVec<[(NodeId, ForwardRoute); 1]>;

impl Unwritten {
    /// Writes in one batch the removals, the rewrites and the fresh records
    /// that are due: required ([`Unwritten::require`]) or held for the
    /// window (the storage's flush calls this before it persists). The lock
    /// is held until the batch is in: an acknowledgement meanwhile finds
    /// the record written and removes it after, not before.
    /// On an error nothing is taken: the records stay for the next flush,
    /// and the flush fails, so nothing is acknowledged on them.
    pub fn write_all(&self, storage: &Storage) -> crate::storage::Result<()> {
        let mut pending = self.pending.lock();
        let now = Instant::now();
        let due = pending.due;
        let window = pending.window;
        let fresh: Vec<(u64, Vec<u8>)> = pending
            .fresh
            .iter()
            .take_while(|(id, record)| *id <= due || now.duration_since(record.held_at) >= window)
            .map(|(id, record)| (id, record_bytes(&record.message, true, &record.waiting)))
            .collect();
        if fresh.is_empty() && pending.rewrites.is_empty() && pending.removed.is_empty() {
            return Ok(());
        }
        let mut writes: Vec<_> = pending.removed.iter().map(|id| storage.outbox_removal(*id)).collect();
        writes.extend(
            pending
                .rewrites
                .iter()
                .map(|(id, (message, waiting))| storage.outbox_write(*id, &record_bytes(message, true, waiting))),
        );
        writes.extend(fresh.iter().map(|(id, record)| storage.outbox_write(*id, record)));
        storage.commit(writes)?;
        pending.removed.clear();
        pending.rewrites.clear();
        for (id, _) in &fresh {
            pending.fresh.remove(*id);
        }
        if !fresh.is_empty() {
            pending.wake_settled();
        }
        drop(pending);
        self.written.fetch_add(fresh.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the records up to id `upto` due: the next flush writes them.
    pub fn require(&self, upto: u64) {
        let mut pending = self.pending.lock();
        pending.due = pending.due.max(upto);
    }

    /// Makes every record held so far due.
    pub fn require_all(&self) {
        let mut pending = self.pending.lock();
        if let Some(newest) = pending.fresh.last() {
            pending.due = pending.due.max(newest);
        }
    }

    /// Resolves once every record up to id `upto` has been acknowledged by
    /// its destinations or written, or else once the window passed (the
    /// records, held before this was called, are then past it: the next
    /// flush writes them). `None` when none is unwritten. A client's
    /// PUBACK waits for this, then for a flush.
    pub fn settled(self: &Arc<Self>, upto: u64) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let (window, settled) = {
            let mut pending = self.pending.lock();
            if pending.settled(upto) {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            pending.waiters.entry(upto).or_default().push(tx);
            (pending.window, rx)
        };
        let this = self.clone();
        Some(async move {
            if tokio::time::timeout(window, settled).await.is_err() {
                // Past the window: the next flush writes every record up to
                // `upto`, also one held after a newer one (ids are taken
                // before the records are held, on several threads).
                this.require(upto);
            }
        })
    }

    /// Wakes who waits for records that went meanwhile.
    fn wake_settled(&self) {
        self.pending.lock().wake_settled();
    }

    /// Records, rewrites and removals waiting for a flush.
    pub fn len(&self) -> usize {
        let pending = self.pending.lock();
        pending.fresh.len() + pending.rewrites.len() + pending.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sending side. See the module docs.
pub struct Outbox {
    epoch: u64,
    destinations: HashMap<NodeId, Destination>,
    held: AHashMap<u64, Held>,
    /// Bytes held (see [`size_of`]), shared with the publish path, which
    /// reads it without the state mutex.
    bytes: Arc<AtomicU64>,
    unwritten: Arc<Unwritten>,
    /// Whether the storage's flush writes `unwritten` ([`Outbox::defer_writes`]);
    /// if not, every record is written at once.
    deferred: bool,
    /// Forwards sent again after no acknowledgement.
    pub resent: u64,
}

impl Outbox {
    pub fn new(epoch: u64) -> Outbox {
        Outbox {
            epoch,
            destinations: HashMap::new(),
            held: AHashMap::new(),
            bytes: Arc::new(AtomicU64::new(0)),
            unwritten: Arc::new(Unwritten::default()),
            deferred: false,
            resent: 0,
        }
    }

    /// What the storage's flush writes first ([`Storage::before_flush`]).
    pub fn unwritten(&self) -> Arc<Unwritten> {
        self.unwritten.clone()
    }

    /// Records are written at the storage's flush from now on (the caller
    /// made the flush run [`Unwritten::write_all`]), once they have waited
    /// `window` for their acknowledgements or are required sooner.
    pub fn defer_writes(&mut self, window: Duration) {
        self.deferred = true;
        self.unwritten.pending.lock().window = window;
    }

    /// Writes the record of `id` now if it is on disk already, else (still
    /// unwritten) updates it for the next flush.
    fn update(&mut self, storage: &Storage, id: u64) {
        let Some(held) = self.held.get(&id) else { return };
        if !self.deferred {
            return persist(storage, id, &held.message, true, &held.waiting);
        }
        let mut pending = self.unwritten.pending.lock();
        match pending.fresh.get_mut(id) {
            Some(fresh) => fresh.waiting = held.waiting.clone(),
            None => {
                pending.rewrites.insert(id, (held.message.clone(), held.waiting.clone()));
            }
        }
    }

    /// The bytes held, as a gauge the publish path can read at any time.
    pub fn bytes(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    fn insert(&mut self, id: u64, held: Held) {
        self.bytes.fetch_add(size_of(&held.message), Ordering::Relaxed);
        if let Some(old) = self.held.insert(id, held) {
            self.bytes.fetch_sub(size_of(&old.message), Ordering::Relaxed);
        }
    }

    /// Forgets the messages `ids` (done with), under one lock of the
    /// unwritten records; the messages are dropped after it is released.
    fn remove_all(&mut self, storage: &Storage, ids: impl IntoIterator<Item = u64>) {
        let mut gone = Vec::new();
        let mut pending = self.unwritten.pending.lock();
        for id in ids {
            if let Some(held) = self.held.remove(&id) {
                self.bytes.fetch_sub(size_of(&held.message), Ordering::Relaxed);
                gone.push(held);
            }
            pending.rewrites.remove(&id);
            // Never written: nothing to delete.
            if let Some(fresh) = pending.fresh.remove(id) {
                self.unwritten.spared.fetch_add(1, Ordering::Relaxed);
                gone.push(Held { message: fresh.message, waiting: fresh.waiting });
            } else if self.deferred {
                pending.removed.push(id);
            } else {
                forget(storage, id);
            }
        }
        drop(pending);
        drop(gone);
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// What `dead` has not acknowledged, and what each delivers there, in
    /// order (left in the outbox: see [`Outbox::take_destination`]).
    pub fn part_for(&self, dead: NodeId) -> Vec<(Arc<Message>, ForwardRoute)> {
        let Some(link) = self.destinations.get(&dead) else { return Vec::new() };
        link.unacked
            .iter()
            .filter_map(|id| {
                let held = self.held.get(id)?;
                let (_, route) = held.waiting.iter().find(|(node, _)| *node == dead)?;
                Some((held.message.clone(), route.clone()))
            })
            .collect()
    }

    /// Numbers the next forward of message `id` to `to`, sent at `now_ms`.
    pub fn assign(&mut self, to: NodeId, id: u64, now_ms: u64) -> Sequence {
        let link = self.destinations.entry(to).or_default();
        let seq = link.next_seq;
        link.next_seq += 1;
        if link.unacked.is_empty() {
            link.sent_at_ms = now_ms;
        }
        link.unacked.push_back(id);
        Sequence { epoch: self.epoch, seq, base: link.base() }
    }

    /// Holds message `id`, forwarded (numbered with [`Outbox::assign`]) to
    /// `waiting`, until each acknowledges it. Written at the storage's next
    /// flush (`on_disk`: its record was written before, unrouted, and is
    /// rewritten now).
    pub fn hold(&mut self, storage: &Storage, id: u64, message: Arc<Message>, waiting: Waiting, on_disk: bool) {
        if on_disk || !self.deferred {
            persist(storage, id, &message, true, &waiting);
        } else {
            let fresh = Fresh { message: message.clone(), waiting: waiting.clone(), held_at: Instant::now() };
            self.unwritten.pending.lock().fresh.insert(id, fresh);
        }
        self.insert(id, Held { message, waiting });
    }

    /// Takes back a message persisted by a previous run: numbered afresh
    /// in this run's epoch, due for sending at once.
    pub fn restore(&mut self, id: u64, message: Arc<Message>, waiting: Waiting) {
        for (node, _) in &waiting {
            self.assign(*node, id, 0);
        }
        self.insert(id, Held { message, waiting });
    }

    /// `from` acknowledged every forward of `epoch` up to `upto`.
    pub fn ack(&mut self, storage: &Storage, from: NodeId, epoch: u64, upto: u64, now_ms: u64) {
        if epoch != self.epoch {
            return; // for a previous run of this node
        }
        let Some(link) = self.destinations.get_mut(&from) else { return };
        let acked: Vec<u64> = link.acknowledge(upto).collect();
        if !acked.is_empty() {
            link.sent_at_ms = now_ms;
        }
        let mut done = Vec::with_capacity(acked.len());
        for id in acked {
            let Some(held) = self.held.get_mut(&id) else { continue };
            held.waiting.retain(|(node, _)| *node != from);
            if held.waiting.is_empty() {
                done.push(id);
            } else {
                self.update(storage, id);
            }
        }
        self.remove_all(storage, done);
        self.unwritten.wake_settled();
    }

    /// Forwards to resend at `now_ms`: for each destination `reachable`
    /// says is up and that acknowledged nothing for [`RESEND_AFTER_MS`],
    /// its unacknowledged forwards in order (at most [`RESEND_BATCH`]).
    pub fn due(
        &mut self,
        now_ms: u64,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Vec<(Sequence, u64, Arc<Message>, NodeId, ForwardRoute)> {
        let mut out = Vec::new();
        for (node, link) in &mut self.destinations {
            if link.unacked.is_empty() || now_ms < link.sent_at_ms + RESEND_AFTER_MS || !reachable(*node) {
                continue;
            }
            link.sent_at_ms = now_ms;
            let base = link.base();
            for (seq, id) in (base..).zip(link.unacked.iter().take(RESEND_BATCH)) {
                let Some(held) = self.held.get(id) else { continue };
                let Some((_, route)) = held.waiting.iter().find(|(n, _)| n == node) else { continue };
                let sequence = Sequence { epoch: self.epoch, seq, base };
                out.push((sequence, *id, held.message.clone(), *node, route.clone()));
            }
        }
        self.resent += out.len() as u64;
        out
    }

    /// `dead` will never acknowledge: takes its part out of every held
    /// message (a message no other node waits for is forgotten; the caller
    /// sent on what [`Outbox::part_for`] gave first). Its numbering goes on
    /// where it stood, and is kept for this run (a few bytes per node ever
    /// known): should `dead` come back without a restart, however late,
    /// its duplicate filter takes what follows as new, not as what it saw.
    pub fn take_destination(&mut self, storage: &Storage, dead: NodeId) {
        let Some(link) = self.destinations.get_mut(&dead) else { return };
        let unacked = std::mem::take(&mut link.unacked);
        let mut done = Vec::new();
        for id in unacked {
            let Some(held) = self.held.get_mut(&id) else { continue };
            let Some(at) = held.waiting.iter().position(|(node, _)| *node == dead) else { continue };
            held.waiting.remove(at);
            if held.waiting.is_empty() {
                done.push(id);
            } else {
                self.update(storage, id);
            }
        }
        self.remove_all(storage, done);
        self.unwritten.wake_settled();
    }
}

/// [`Record`] borrowed: encodes the same, without copying the message.
#[derive(Serialize)]
struct RecordRef<'a> {
    message: &'a Message,
    routed: bool,
    waiting: Vec<(u64, &'a ForwardRoute)>,
}

fn record_bytes(message: &Message, routed: bool, waiting: &[(NodeId, ForwardRoute)]) -> Vec<u8> {
    let record = RecordRef { message, routed, waiting: waiting.iter().map(|(node, route)| (node.0, route)).collect() };
    rmp_serde::to_vec(&record).expect("in-memory records always encode")
}

/// Writes the record of message `id` (replacing an earlier one).
pub fn persist(storage: &Storage, id: u64, message: &Message, routed: bool, waiting: &[(NodeId, ForwardRoute)]) {
    let bytes = record_bytes(message, routed, waiting);
    if let Err(err) = storage.put_outbox(id, &bytes) {
        tracing::error!(cause = %err, "could not persist a forwarded message");
    }
}

pub fn forget(storage: &Storage, id: u64) {
    if let Err(err) = storage.remove_outbox(id) {
        tracing::error!(cause = %err, "could not remove an acknowledged forward");
    }
}

/// The outbox records left by the previous run; undecodable ones are
/// logged and removed.
pub fn restore(storage: &Storage) -> Vec<(u64, Record)> {
    let rows = match storage.outbox() {
        Ok(rows) => rows,
        Err(err) => {
            tracing::error!(cause = %err, "could not read the cluster outbox");
            return Vec::new();
        }
    };
    rows.into_iter()
        .filter_map(|(id, bytes)| match rmp_serde::from_slice::<Record>(&bytes) {
            Ok(record) => Some((id, record)),
            Err(err) => {
                tracing::error!(id, cause = %err, "dropping an undecodable outbox record");
                forget(storage, id);
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;

    fn message() -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"p"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at_ms: None,
            origin: None,
            fleet_id: None,
        })
    }

    fn route() -> ForwardRoute {
        ForwardRoute::plain()
    }

    fn forward(outbox: &mut Outbox, storage: &Storage, id: u64, to: &[NodeId], now: u64) -> Vec<Sequence> {
        let seqs = to.iter().map(|n| outbox.assign(*n, id, now)).collect();
        outbox.hold(storage, id, message(), to.iter().map(|n| (*n, route())).collect(), false);
        seqs
    }

    /// An outbox whose records wait `window` for the storage's flush.
    fn deferred(window: Duration) -> (Storage, Outbox, Arc<Unwritten>) {
        let mut outbox = Outbox::new(1);
        outbox.defer_writes(window);
        let unwritten = outbox.unwritten();
        (Storage::in_memory(), outbox, unwritten)
    }

    #[test]
    fn looking_at_a_dead_destinations_part_leaves_it_in_the_outbox() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(1);
        forward(&mut outbox, &storage, 1, &[NodeId(1), NodeId(2)], 0);
        assert_eq!(outbox.part_for(NodeId(2)).len(), 1);
        assert_eq!(outbox.part_for(NodeId(2)).len(), 1, "looking leaves it in the outbox");
        assert!(outbox.part_for(NodeId(3)).is_empty());
        outbox.take_destination(&storage, NodeId(2));
        assert!(outbox.part_for(NodeId(2)).is_empty());
        assert_eq!(outbox.len(), 1, "still waiting for node 1");
    }

    #[test]
    fn a_dead_destinations_part_is_taken_out() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(7);
        let (a, dead) = (NodeId(1), NodeId(2));
        forward(&mut outbox, &storage, 10, &[a, dead], 0);
        forward(&mut outbox, &storage, 11, &[dead], 0);
        forward(&mut outbox, &storage, 12, &[a], 0);
        let part: Vec<_> = outbox.part_for(dead).iter().map(|(m, _)| m.clone()).collect();
        assert_eq!(part.len(), 2, "messages 10 and 11, in order");
        outbox.take_destination(&storage, dead);
        assert_eq!(outbox.len(), 2, "11 waited for the dead node only: forgotten");
        assert_eq!(storage.outbox().unwrap().len(), 2);
        assert!(outbox.part_for(dead).is_empty(), "nothing left for it");
        // The rest is acknowledged as before.
        outbox.ack(&storage, a, 7, 1, 0);
        assert!(outbox.is_empty());
    }

    /// A node taken for dead that was not (and did not restart) goes on
    /// from the numbers it saw: what is forwarded to it next is new to its
    /// duplicate filter, and its acknowledgement releases it.
    #[test]
    fn a_destination_back_from_the_dead_goes_on_numbering_where_it_stood() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(7);
        let node = NodeId(2);
        forward(&mut outbox, &storage, 10, &[node], 0);
        forward(&mut outbox, &storage, 11, &[node], 0);
        outbox.take_destination(&storage, node);
        assert!(outbox.is_empty());
        let seqs = forward(&mut outbox, &storage, 12, &[node], 0);
        assert_eq!(seqs, [Sequence { epoch: 7, seq: 2, base: 2 }], "after 0 and 1, with nothing before it waiting");
        // Its filter saw 0 and 1 (delivered them, unacknowledged):
        // it accepts 2 and acknowledges up to it.
        let mut inbound = crate::cluster::dedupe::Inbound::default();
        for s in 0..2 {
            inbound.accept(node, Sequence { epoch: 7, seq: s, base: 0 });
        }
        assert_eq!(inbound.accept(node, seqs[0]), crate::cluster::dedupe::Verdict::Deliver);
        outbox.ack(&storage, node, 7, 2, 0);
        assert!(outbox.is_empty(), "12 acknowledged, not taken for an old number");
    }

    #[test]
    fn held_until_every_destination_acks_and_survives_a_restart() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(7);
        let seqs = forward(&mut outbox, &storage, 5, &[NodeId(1), NodeId(2)], 0);
        assert_eq!(seqs[0], Sequence { epoch: 7, seq: 0, base: 0 });
        outbox.ack(&storage, NodeId(1), 7, 0, 1);
        assert_eq!(outbox.len(), 1);
        let restored = restore(&storage);
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].0, 5);
        assert_eq!(restored[0].1.waiting.len(), 1, "the record follows partial acknowledgements");
        outbox.ack(&storage, NodeId(2), 6, 0, 1);
        assert_eq!(outbox.len(), 1, "an ack for another epoch is ignored");
        outbox.ack(&storage, NodeId(2), 7, 0, 1);
        assert!(outbox.is_empty());
        assert!(restore(&storage).is_empty());
    }

    #[test]
    fn resends_in_order_after_silence_only_to_reachable_nodes() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(1);
        for id in 10..13 {
            forward(&mut outbox, &storage, id, &[NodeId(1), NodeId(2)], 1_000);
        }
        outbox.ack(&storage, NodeId(2), 1, 0, 1_000);
        assert!(outbox.due(1_000 + RESEND_AFTER_MS - 1, |_| true).is_empty());
        let due = outbox.due(1_000 + RESEND_AFTER_MS, |n| n == NodeId(2));
        let seqs: Vec<(u64, u64, u64)> = due.iter().map(|(s, id, _, _, _)| (s.seq, s.base, *id)).collect();
        assert_eq!(seqs, vec![(1, 1, 11), (2, 1, 12)]);
        assert!(outbox.due(1_000 + RESEND_AFTER_MS + 1, |_| false).is_empty());
        // A destination away for days that is still alive: nothing given up.
        let days = 1_000 + 3 * 86_400_000;
        assert_eq!(outbox.due(days, |_| true).len(), 5, "both destinations' forwards, again");
        assert_eq!(outbox.len(), 3);
        assert_eq!(restore(&storage).len(), 3);
    }

    #[test]
    fn a_record_is_written_at_the_flush_unless_acknowledged_before() {
        let (storage, mut outbox, unwritten) = deferred(Duration::ZERO);
        forward(&mut outbox, &storage, 1, &[NodeId(1)], 0);
        forward(&mut outbox, &storage, 2, &[NodeId(1), NodeId(2)], 0);
        assert!(storage.outbox().unwrap().is_empty(), "nothing written before the flush");
        outbox.ack(&storage, NodeId(1), 1, 0, 0);
        assert_eq!(unwritten.len(), 1, "1 was acknowledged first: never written");
        unwritten.write_all(&storage).unwrap();
        let rows = restore(&storage);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, 2);
        outbox.ack(&storage, NodeId(1), 1, 1, 0);
        unwritten.write_all(&storage).unwrap();
        assert_eq!(restore(&storage)[0].1.waiting.len(), 1, "a written record follows partial acks");
        outbox.ack(&storage, NodeId(2), 1, 0, 0);
        assert_eq!(storage.outbox().unwrap().len(), 1, "its removal waits for the next flush");
        unwritten.write_all(&storage).unwrap();
        assert!(storage.outbox().unwrap().is_empty() && unwritten.is_empty());
    }

    #[test]
    fn a_young_record_waits_for_its_window_unless_required() {
        let (storage, mut outbox, unwritten) = deferred(Duration::from_secs(3600));
        for id in 1..=3 {
            forward(&mut outbox, &storage, id, &[NodeId(1)], 0);
        }
        unwritten.write_all(&storage).unwrap();
        assert!(storage.outbox().unwrap().is_empty(), "young and not required: not written");
        unwritten.require(2);
        unwritten.write_all(&storage).unwrap();
        let written: Vec<u64> = restore(&storage).into_iter().map(|(id, _)| id).collect();
        assert_eq!(written, vec![1, 2], "required up to 2");
        outbox.ack(&storage, NodeId(1), 1, 2, 0);
        unwritten.write_all(&storage).unwrap();
        assert!(storage.outbox().unwrap().is_empty(), "1 and 2 removed; 3 acknowledged before it was written");
        assert!(unwritten.is_empty());
    }

    #[tokio::test]
    async fn settled_resolves_on_the_acknowledgement() {
        let (storage, mut outbox, unwritten) = deferred(Duration::from_secs(3600));
        assert!(unwritten.settled(1).is_none(), "nothing held");
        forward(&mut outbox, &storage, 1, &[NodeId(1)], 0);
        forward(&mut outbox, &storage, 2, &[NodeId(1)], 0);
        let settled = unwritten.settled(1).expect("1 is unwritten");
        let waiter = tokio::spawn(settled);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "1 is not acknowledged yet");
        outbox.ack(&storage, NodeId(1), 1, 0, 0);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("settled on the ack").unwrap();
        unwritten.write_all(&storage).unwrap();
        assert!(storage.outbox().unwrap().is_empty(), "1 never written, 2 not due");
    }

    #[tokio::test]
    async fn a_waiter_wakes_once_its_own_records_went_not_before() {
        let (storage, mut outbox, unwritten) = deferred(Duration::from_secs(3600));
        for id in 1..=3 {
            forward(&mut outbox, &storage, id, &[NodeId(id)], 0);
        }
        let first = tokio::spawn(unwritten.settled(1).expect("1 is unwritten"));
        let third = tokio::spawn(unwritten.settled(3).expect("3 is unwritten"));
        // 3 and 2 go, 1 is left: nobody is done (3 waits for 1 and 2 too).
        outbox.ack(&storage, NodeId(3), 1, 3, 0);
        outbox.ack(&storage, NodeId(2), 1, 2, 0);
        tokio::task::yield_now().await;
        assert!(!first.is_finished() && !third.is_finished());
        outbox.ack(&storage, NodeId(1), 1, 1, 0);
        let both = async { (first.await.unwrap(), third.await.unwrap()) };
        tokio::time::timeout(Duration::from_secs(10), both).await.expect("both settled on the last ack");
        // Written rather than acknowledged: the flush wakes too.
        forward(&mut outbox, &storage, 4, &[NodeId(1)], 0);
        let fourth = tokio::spawn(unwritten.settled(4).expect("4 is unwritten"));
        unwritten.require(4);
        unwritten.write_all(&storage).unwrap();
        tokio::time::timeout(Duration::from_secs(10), fourth).await.expect("settled on the write").unwrap();
    }

    #[tokio::test]
    async fn past_the_window_every_record_up_to_the_id_is_written_whatever_its_age() {
        // Ids are taken before records are held: 1 may be held after 2.
        let (storage, mut outbox, unwritten) = deferred(Duration::from_millis(40));
        forward(&mut outbox, &storage, 2, &[NodeId(1)], 0);
        let waiting = tokio::spawn(unwritten.settled(2).expect("2 is unwritten"));
        tokio::time::sleep(Duration::from_millis(15)).await;
        forward(&mut outbox, &storage, 1, &[NodeId(1)], 0);
        waiting.await.unwrap();
        unwritten.write_all(&storage).unwrap();
        let mut written: Vec<u64> = restore(&storage).into_iter().map(|(id, _)| id).collect();
        written.sort();
        assert_eq!(written, [1, 2], "the younger record 1 does not keep 2 from being written");
    }

    #[tokio::test]
    async fn past_the_window_settled_makes_the_records_due() {
        let (storage, mut outbox, unwritten) = deferred(Duration::from_millis(20));
        forward(&mut outbox, &storage, 1, &[NodeId(1)], 0);
        unwritten.settled(1).expect("1 is unwritten").await;
        unwritten.write_all(&storage).unwrap();
        assert_eq!(restore(&storage).len(), 1, "not acknowledged within the window: written");
        assert!(unwritten.settled(1).is_none());
    }

    #[test]
    fn the_bound_counts_bytes_held_until_acknowledged() {
        let storage = Storage::in_memory();
        let mut outbox = Outbox::new(1);
        let bytes = outbox.bytes();
        forward(&mut outbox, &storage, 1, &[NodeId(1), NodeId(2)], 0);
        forward(&mut outbox, &storage, 2, &[NodeId(1)], 0);
        let one = size_of(&message());
        assert_eq!(bytes.load(Ordering::Relaxed), 2 * one);
        outbox.ack(&storage, NodeId(1), 1, 1, 0);
        assert_eq!(bytes.load(Ordering::Relaxed), one, "message 2 is done; 1 waits for node 2");
        outbox.take_destination(&storage, NodeId(2));
        assert_eq!(bytes.load(Ordering::Relaxed), 0);
        assert!(outbox.is_empty());
    }
}
