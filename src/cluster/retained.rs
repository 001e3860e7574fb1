//! Retained messages at their shards' owners.
//!
//! Job: a retained topic lives in the route shard its first `shard_depth`
//! levels name, kept by that shard's R owners (the same ownership ring as
//! the routes), in memory and in the data directory (fjall tree
//! `fleet_retained`); no node holds more than the shards it owns. Every
//! write carries a version: a hybrid logical clock (wall ms << 16 | a
//! counter, never behind any version seen) and the writing node, and the
//! newer version wins everywhere, so a replica that was away and comes back
//! with old values cannot bring them back. A clear is a tombstone with a
//! version, kept `cluster.retained_tombstone_secs` (longer than a node is
//! expected to be away).
//!
//! - **Set / clear:** the publishing node sends the versioned item to the
//!   topic's owners ([`RetainFrame::Put`]); the client's PUBACK waits until
//!   they have stored it (bounded by `cluster.subscribe_ack_timeout_ms`,
//!   counted past it). An owner that is none in its own view relays the
//!   write to the owners in its view (the writer's view may lag).
//! - **Subscribe:** a filter whose literal prefix reaches `shard_depth`
//!   asks the owners of its one shard, any other filter every member
//!   (scatter-gather, in parallel, with a deadline); each answers what it
//!   holds of the shards it owns, tombstones included, chunked by bytes;
//!   the asker keeps the newest version per topic, so each retained message
//!   comes once and a stale replica is outvoted. Answers missing at the
//!   deadline are counted (partial).
//! - **Ownership changes:** on every membership change a node sends what it
//!   holds of each shard to the owners that are new for it (chunked by
//!   bytes, paced by the send budget), and lets go of the shards it no
//!   longer owns after a grace period.
//! - **Anti-entropy:** every `cluster.retained_check_secs` each owner sends
//!   the other owners a hash per shard of what it holds; where the hashes
//!   differ, the receiver sends its items back, so owners converge on the
//!   newest version of every topic (a write or a hand-over lost on the way
//!   is repaired).
//!
//! Boundary: the broker keeps node-local retained messages (`$SYS`) itself
//! and asks this module for the fleet's through its [`Fleet`] doorway.
//!
//! [`Fleet`]: crate::broker::Fleet

use super::links::{self, Class};
use super::metrics::bump;
use super::retained_item::{FleetRetained, Packed};
use super::state::State;
use super::wire;
use super::Cluster;
use crate::broker::message::Message;
use crate::broker::retained::{Retained, RetainedTree};
use crate::broker::BoxFuture;
use crate::storage::{Storage, StorageError};
use kadmq_dht::core::{Membership, NodeId, Ownership};
use kadmq_dht::shard::{filter_prefix, filter_shard, ShardKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most bytes of items one frame carries (frames may be 16 MiB).
const CHUNK_BYTES: usize = 1 << 20;
/// How long a subscribe waits for the owners' answers.
const QUERY_DEADLINE: Duration = Duration::from_secs(2);
/// How long a node keeps (and hands over) a shard it no longer owns.
const RELEASE_GRACE_MS: u64 = 30_000;
/// How long a hand-over chunk waits for room in a full send queue.
const HANDOVER_PATIENCE: Duration = Duration::from_secs(30);

/// Retained traffic between nodes (`wire`'s RETAINED kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RetainFrame {
    /// Newer versions of topics (a write, a hand-over): apply each that is
    /// newer than what is held. A write (`relay`) that reaches a node not
    /// an owner in its view is relayed once to the owners in its view: the
    /// writer's view may lag and miss an owner.
    /// With `ack`, each receiver answers [`RetainFrame::Stored`] once it
    /// has applied the items (written to its store, flushed with its next
    /// flush; also when it held a newer version, which wins).
    Put { items: Vec<FleetRetained>, relay: bool, ack: Option<u64> },
    /// The items of put `req` are kept here.
    Stored { req: u64 },
    /// Owner → the other owners, every `cluster.retained_check_secs`: my
    /// hash of what I hold of each shard we both own. A receiver whose
    /// hash differs (0: it holds nothing there) sends back what it holds
    /// of that shard and, unless this is a `reply`, its own hashes of those
    /// shards, to which the first sends its items: both sides end with the
    /// newest version of every topic of the shard, and a write lost on the
    /// way to one owner reaches it from another.
    Digests { items: Vec<(ShardKey, u64)>, reply: bool },
    /// What do you hold of the shards you own that matches `filter`?
    Query { req: u64, filter: String },
    /// One chunk of the answer to query `req`; `last` ends it.
    Answer { req: u64, items: Vec<FleetRetained>, last: bool },
}

impl RetainFrame {
    /// The items it carries (for the wire checks).
    pub fn items(&self) -> &[FleetRetained] {
        match self {
            RetainFrame::Put { items, .. } | RetainFrame::Answer { items, .. } => items,
            RetainFrame::Query { .. } | RetainFrame::Stored { .. } | RetainFrame::Digests { .. } => &[],
        }
    }
}

/// One held topic, as the fleet store's tree keeps it.
struct Held {
    /// Its version, topic and message (or tombstone), in one allocation.
    packed: Packed,
    /// Set while this node no longer owns the topic's shard: when it goes.
    release_at_ms: Option<NonZeroU64>,
}

impl Retained for Held {
    fn topic(&self) -> &str {
        self.packed.topic()
    }
}

impl Held {
    fn item(&self) -> FleetRetained {
        self.packed.item()
    }
}

/// The topics this node keeps, live and cleared, in one tree (no second
/// index: the tree is the map from topic to version).
#[derive(Default)]
struct Store {
    held: RetainedTree<Held>,
    /// Tombstones by the time they were cleared, for purging.
    tombstones: BTreeSet<(u64, Box<str>)>,
    /// Live messages with a Message Expiry Interval, by when they expire.
    expiring: BTreeSet<(u64, Box<str>)>,
    /// Payload and topic bytes of the live messages.
    bytes: u64,
}

impl Store {
    /// Takes `item` if it is newer than what is held; returns the packed
    /// form it keeps (to store) if it did.
    fn apply(&mut self, item: &FleetRetained) -> Option<&Packed> {
        // Checked before packing: a stale copy is not packed at all.
        self.is_newer(&item.topic, item.version()).then(|| self.replace(Packed::pack(item)))
    }

    /// Takes `packed` if it is newer than what is held.
    fn keep(&mut self, packed: Packed) -> Option<&Packed> {
        self.is_newer(packed.topic(), packed.version()).then(|| self.replace(packed))
    }

    /// Whether `version` of `topic` is newer than what is held of it.
    fn is_newer(&self, topic: &str, version: (u64, u64)) -> bool {
        self.held.get(topic).is_none_or(|held| held.packed.version() < version)
    }

    /// Holds `packed` in place of what is held of its topic.
    fn replace(&mut self, packed: Packed) -> &Packed {
        let topic = packed.topic();
        self.forget(topic);
        if packed.is_cleared() {
            self.tombstones.insert((packed.cleared_at_ms(), topic.into()));
        } else {
            let (bytes, expiry) = packed.size_and_expiry();
            self.bytes += bytes;
            if let Some(at) = expiry {
                self.expiring.insert((at, topic.into()));
            }
        }
        &self.held.insert(Held { packed, release_at_ms: None }).packed
    }

    /// Drops `topic` from memory (not from disk).
    fn forget(&mut self, topic: &str) -> Option<Held> {
        let held = self.held.remove(topic)?;
        if held.packed.is_cleared() {
            self.tombstones.remove(&(held.packed.cleared_at_ms(), topic.into()));
        } else {
            let (bytes, expiry) = held.packed.size_and_expiry();
            self.bytes -= bytes;
            if let Some(at) = expiry {
                self.expiring.remove(&(at, topic.into()));
            }
        }
        Some(held)
    }

    /// Live messages held.
    fn live(&self) -> usize {
        self.held.len().saturating_sub(self.tombstones.len())
    }

    /// What matches `filter` (live and cleared) among `owned` topics.
    fn matching(&self, filter: &str, owned: impl Fn(&str) -> bool) -> Vec<FleetRetained> {
        self.held.matching_refs(filter).into_iter().filter(|h| owned(h.topic())).map(Held::item).collect()
    }
}

/// When a shard no longer owned at `now_ms` goes.
fn release_at(now_ms: u64) -> NonZeroU64 {
    NonZeroU64::new(now_ms.saturating_add(RELEASE_GRACE_MS)).expect("past the grace")
}

/// Splits `items` into chunks of about [`CHUNK_BYTES`] (one, empty, for
/// none: an answer's last chunk).
fn chunks(items: Vec<FleetRetained>) -> Vec<Vec<FleetRetained>> {
    let mut items = items.into_iter().peekable();
    let mut out = vec![next_chunk(&mut items)];
    while items.peek().is_some() {
        out.push(next_chunk(&mut items));
    }
    out
}

/// The next chunk of about [`CHUNK_BYTES`] from `items` (at least one item
/// if any is left), made as it is sent: a hand-over of a million topics
/// never exists in the open form all at once.
fn next_chunk(items: &mut std::iter::Peekable<impl Iterator<Item = FleetRetained>>) -> Vec<FleetRetained> {
    let mut chunk = Vec::new();
    let mut size = 0;
    while let Some(item) = items.peek() {
        let bytes = item.topic.len() + 64 + item.message.as_ref().map_or(0, |m| m.payload.len() + m.topic.len());
        let full = chunk.len() >= wire::MAX_RETAINED_ITEMS || size + bytes > CHUNK_BYTES;
        if full && !chunk.is_empty() {
            break;
        }
        size += bytes;
        chunk.extend(items.next());
    }
    chunk
}

#[derive(Default)]
pub struct RetainedStats {
    /// Retained queries of subscribes (one per filter).
    pub queries: AtomicU64,
    /// Queries some asked node did not answer in full by the deadline.
    pub partial: AtomicU64,
    /// Items refused because a newer version was held (a stale replica).
    pub stale: AtomicU64,
    /// Items sent to new owners on membership changes.
    pub handed_over: AtomicU64,
    /// Writes whose owners did not all answer in time (the PUBACK went).
    pub unacknowledged: AtomicU64,
    /// Shards sent to another owner because their digests differed.
    pub repaired: AtomicU64,
    /// Tombstones purged after the tombstone time.
    pub purged: AtomicU64,
}

/// A request under way: the nodes still to answer, and where the answers go.
type Asked<T = mpsc::UnboundedSender<RetainFrame>> = (HashSet<NodeId>, T);

/// This node's part of the fleet's retained messages (in [`Cluster`]).
pub struct FleetRetainedStore {
    store: Mutex<Store>,
    /// The last version this node made or saw.
    hlc: AtomicU64,
    requests: Mutex<HashMap<u64, Asked>>,
    /// Writes waiting for their owners.
    writes: Mutex<HashMap<u64, Asked<Option<oneshot::Sender<()>>>>>,
    next_request: AtomicU64,
    tombstone_ms: u64,
    /// Period of the owners' digest exchange, and when it is due next.
    check_ms: u64,
    next_check_ms: AtomicU64,
    pub stats: RetainedStats,
}

impl FleetRetainedStore {
    /// The store with what `storage` holds.
    pub fn open(
        storage: &Storage,
        tombstone_secs: u64,
        check_secs: u64,
    ) -> Result<FleetRetainedStore, crate::storage::StorageError> {
        let mut store = Store::default();
        let mut hlc = 0;
        storage.for_each_fleet_retained(|topic, record| {
            let packed = Packed::from_stored(topic, record)
                .map_err(|detail| StorageError::Record { keyspace: "fleet_retained", detail })?;
            hlc = hlc.max(packed.hlc());
            store.keep(packed);
            Ok(())
        })?;
        Ok(FleetRetainedStore {
            store: Mutex::new(store),
            hlc: AtomicU64::new(hlc),
            requests: Mutex::new(HashMap::new()),
            writes: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            tombstone_ms: tombstone_secs.saturating_mul(1000),
            check_ms: check_secs.saturating_mul(1000),
            next_check_ms: AtomicU64::new(0),
            stats: RetainedStats::default(),
        })
    }

    /// The next version: after every one made or seen, and not behind the
    /// wall clock.
    fn tick(&self, now_ms: u64) -> u64 {
        let wall = now_ms << 16;
        let mut last = self.hlc.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last.saturating_add(1));
            match self.hlc.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn witness(&self, hlc: u64) {
        self.hlc.fetch_max(hlc, Ordering::AcqRel);
    }

    /// Live retained messages held, tombstones held, live bytes.
    pub fn figures(&self) -> (u64, u64, u64) {
        let store = self.store.lock();
        (store.live() as u64, store.tombstones.len() as u64, store.bytes)
    }

    /// Once a tick: expired messages become tombstones (at their version,
    /// so an older copy elsewhere cannot come back), shards let go after
    /// their grace, tombstones past the tombstone time purged (memory and
    /// disk).
    pub fn sweep(&self, storage: &Storage, now_ms: u64) {
        let mut store = self.store.lock();
        while store.expiring.first().is_some_and(|(at, _)| *at <= now_ms) {
            let (at, topic) = store.expiring.pop_first().expect("a first");
            let Some(held) = store.forget(&topic) else { continue };
            let cleared = FleetRetained {
                topic: topic.to_string(),
                hlc: held.packed.hlc(),
                origin: held.packed.origin(),
                message: None,
                cleared_at_ms: at,
            };
            let packed = Packed::pack(&cleared);
            if let Err(err) = storage.put_fleet_retained(&topic, packed.as_bytes()) {
                tracing::error!(cause = %err, "could not store an expired retained message's tombstone");
            }
            store.replace(packed);
        }
        let released: Vec<Box<str>> = store
            .held
            .values()
            .filter(|h| h.release_at_ms.is_some_and(|at| at.get() <= now_ms))
            .map(|h| h.topic().into())
            .collect();
        let mut purged = Vec::new();
        while let Some((at, topic)) = store.tombstones.first().cloned() {
            if at.saturating_add(self.tombstone_ms) > now_ms {
                break;
            }
            purged.push(topic);
            store.tombstones.pop_first();
        }
        bump(&self.stats.purged, purged.len() as u64);
        for topic in released.iter().chain(&purged) {
            store.forget(topic);
            if let Err(err) = storage.remove_fleet_retained(topic) {
                tracing::error!(cause = %err, "could not drop a retained message");
            }
        }
    }

    /// Applies items from a peer (or this node), persisting what is newer.
    fn apply_all(&self, storage: &Storage, items: &[FleetRetained]) {
        let mut store = self.store.lock();
        for item in items {
            self.witness(item.hlc);
            if let Some(packed) = store.apply(item) {
                if let Err(err) = storage.put_fleet_retained(&item.topic, packed.as_bytes()) {
                    tracing::error!(cause = %err, "could not store a retained message");
                }
            } else {
                bump(&self.stats.stale, 1);
            }
        }
    }
}

impl Cluster {
    fn shard_of(&self, topic: &str, st: &State) -> ShardKey {
        filter_shard(topic, st.node.config().shard_depth)
    }

    /// A local publish set (non-empty payload) or cleared `message`'s
    /// topic: the versioned item goes to the topic's owners. The future
    /// resolves once they all stored it, or after `wait` (`None`: no other
    /// owner to wait for, or no wait asked).
    pub(super) fn set_retained(
        &self,
        storage: &Storage,
        message: &Message,
        now_ms: u64,
        wait: Duration,
    ) -> Option<BoxFuture<'static, ()>> {
        let retained = &self.retained;
        let hlc = retained.tick(now_ms);
        let cleared = message.payload.is_empty();
        let item = FleetRetained {
            topic: message.topic.clone(),
            hlc,
            origin: self.me.0,
            message: (!cleared).then(|| message.clone()),
            cleared_at_ms: if cleared { now_ms } else { 0 },
        };
        let st = self.state.lock();
        let owners = st.node.membership().owners(&self.shard_of(&message.topic, &st), self.replication);
        if owners.is_empty() || owners.contains(&self.me) {
            retained.apply_all(storage, std::slice::from_ref(&item));
        }
        let others: HashSet<NodeId> = owners.iter().copied().filter(|o| *o != self.me).collect();
        let (ack, stored) = if others.is_empty() || wait.is_zero() {
            (None, None)
        } else {
            let req = retained.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            retained.writes.lock().insert(req, (others.clone(), Some(tx)));
            (Some(req), Some((req, rx)))
        };
        let frame = wire::encode_retained(&RetainFrame::Put { items: vec![item], relay: true, ack });
        for owner in &others {
            self.send_to(&st, *owner, Class::Control, links::copy_of(&frame));
        }
        let (req, stored) = stored?;
        // The waiter goes however the future ends: resolved, timed out, or
        // dropped unpolled (a QoS 0 publish, a will, a closed connection).
        struct Waiter(Option<Arc<Cluster>>, u64);
        impl Drop for Waiter {
            fn drop(&mut self) {
                if let Some(cluster) = &self.0 {
                    cluster.retained.writes.lock().remove(&self.1);
                }
            }
        }
        let waiter = Waiter(self.this.get().and_then(|c| c.upgrade()), req);
        Some(Box::pin(async move {
            if tokio::time::timeout(wait, stored).await.is_err() {
                if let Some(cluster) = &waiter.0 {
                    bump(&cluster.retained.stats.unacknowledged, 1);
                }
            }
            drop(waiter);
        }))
    }

    /// The fleet's retained messages matching `filter`, newest version of
    /// each topic, gathered from the owners (see the module docs).
    pub(super) async fn gather_retained(self: Arc<Self>, filter: String, now_ms: u64) -> Vec<Arc<Message>> {
        let retained = &self.retained;
        bump(&retained.stats.queries, 1);
        let (mine, asked, mut answers, req) = {
            let st = self.state.lock();
            let depth = st.node.config().shard_depth;
            let membership = st.node.membership().clone();
            // A filter without wildcards, or whose literal prefix names a
            // shard, matches topics of that one shard only.
            let literal = filter_prefix(&filter, depth);
            let wildcard = filter.split('/').any(|l| l == "+" || l == "#");
            let one_shard = !wildcard || (!literal.is_empty() && literal.split('/').count() >= depth);
            let asked: HashSet<NodeId> = if one_shard {
                membership.owners(&filter_shard(&filter, depth), self.replication).iter().copied().collect()
            } else {
                membership.members().iter().copied().collect()
            };
            let mine = asked.contains(&self.me) || asked.is_empty();
            let others: HashSet<NodeId> = asked.iter().copied().filter(|n| *n != self.me).collect();
            let req = retained.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            retained.requests.lock().insert(req, (others.clone(), tx));
            let frame = wire::encode_retained(&RetainFrame::Query { req, filter: filter.clone() });
            for node in &others {
                self.send_to(&st, *node, Class::Control, links::copy_of(&frame));
            }
            (mine.then(|| self.owned_matching(&st, &membership, &filter)), others, rx, req)
        };
        let mut newest: HashMap<String, FleetRetained> = HashMap::new();
        let mut keep = |items: Vec<FleetRetained>| {
            for item in items {
                match newest.get(&item.topic) {
                    Some(held) if held.version() >= item.version() => {}
                    _ => {
                        newest.insert(item.topic.clone(), item);
                    }
                }
            }
        };
        keep(mine.unwrap_or_default());
        let mut waiting = asked.len();
        let deadline = tokio::time::Instant::now() + QUERY_DEADLINE;
        while waiting > 0 {
            match tokio::time::timeout_at(deadline, answers.recv()).await {
                Ok(Some(RetainFrame::Answer { items, last, .. })) => {
                    keep(items);
                    waiting -= last as usize;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        retained.requests.lock().remove(&req);
        if waiting > 0 {
            bump(&retained.stats.partial, 1);
        }
        let mut out: Vec<Arc<Message>> = newest
            .into_values()
            .filter_map(|item| {
                let mut message = item.message?;
                message.topic = item.topic;
                (!message.is_expired(now_ms)).then(|| Arc::new(message))
            })
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// What this node holds matching `filter` in the shards it owns.
    fn owned_matching(&self, st: &State, membership: &Membership, filter: &str) -> Vec<FleetRetained> {
        let depth = st.node.config().shard_depth;
        let owned = |topic: &str| {
            let owners = membership.owners(&filter_shard(topic, depth), self.replication);
            owners.is_empty() || owners.contains(&self.me)
        };
        self.retained.store.lock().matching(filter, owned)
    }

    /// A retained frame from `from`.
    pub(super) fn on_retain_frame(&self, st: &State, storage: &Storage, from: NodeId, frame: RetainFrame) {
        match frame {
            RetainFrame::Digests { items, reply } => {
                let membership = st.node.membership().clone();
                let mut mine = self.retained_by_shard(st, &membership);
                let owns = |key: &ShardKey| membership.owners(key, self.replication).contains(&self.me);
                let mut topics = Vec::new();
                let mut answer = Vec::new();
                for (key, theirs) in items {
                    if !owns(&key) {
                        continue;
                    }
                    let (digest, held) = mine.remove(&key).unwrap_or_default();
                    if digest != theirs {
                        topics.extend(held);
                        answer.push((key, digest));
                    }
                }
                if answer.is_empty() {
                    return;
                }
                bump(&self.retained.stats.repaired, answer.len() as u64);
                let store = self.retained.store.lock();
                let items: Vec<FleetRetained> =
                    topics.iter().filter_map(|t| store.held.get(t).map(Held::item)).collect();
                drop(store);
                if !items.is_empty() {
                    for items in chunks(items) {
                        let frame = wire::encode_retained(&RetainFrame::Put { items, relay: false, ack: None });
                        self.send_to(st, from, Class::Control, links::copy_of(&frame));
                    }
                }
                if !reply {
                    let frame = wire::encode_retained(&RetainFrame::Digests { items: answer, reply: true });
                    self.send_to(st, from, Class::Control, links::copy_of(&frame));
                }
            }
            RetainFrame::Stored { req } => {
                let mut writes = self.retained.writes.lock();
                if let Some((waiting, done)) = writes.get_mut(&req) {
                    waiting.remove(&from);
                    if waiting.is_empty() {
                        if let Some(done) = done.take() {
                            let _ = done.send(());
                        }
                        writes.remove(&req);
                    }
                }
            }
            RetainFrame::Put { items, relay, ack } => {
                self.retained.apply_all(storage, &items);
                if let Some(req) = ack {
                    let frame = wire::encode_retained(&RetainFrame::Stored { req });
                    self.send_to(st, from, Class::Control, links::copy_of(&frame));
                }
                // The sender's view may differ: what is not ours goes after
                // the grace (unless our view changes to own it), and a write
                // goes on to the owners in our view.
                let depth = st.node.config().shard_depth;
                let membership = st.node.membership();
                let now_ms = self.broker.upgrade().map_or(0, |b| b.now_ms());
                let mut relayed: HashMap<NodeId, Vec<FleetRetained>> = HashMap::new();
                let mut store = self.retained.store.lock();
                for item in items {
                    let owners = membership.owners(&filter_shard(&item.topic, depth), self.replication);
                    if owners.is_empty() || owners.contains(&self.me) {
                        continue;
                    }
                    if let Some(held) = store.held.get_mut(&item.topic) {
                        held.release_at_ms.get_or_insert(release_at(now_ms));
                    }
                    if relay {
                        for owner in owners.iter().filter(|o| **o != from) {
                            relayed.entry(*owner).or_default().push(item.clone());
                        }
                    }
                }
                drop(store);
                for (owner, items) in relayed {
                    let frame = wire::encode_retained(&RetainFrame::Put { items, relay: false, ack: None });
                    self.send_to(st, owner, Class::Control, links::copy_of(&frame));
                }
            }
            RetainFrame::Query { req, filter } => {
                let membership = st.node.membership().clone();
                let items = self.owned_matching(st, &membership, &filter);
                let chunks = chunks(items);
                let last = chunks.len() - 1;
                for (i, items) in chunks.into_iter().enumerate() {
                    let frame = wire::encode_retained(&RetainFrame::Answer { req, items, last: i == last });
                    self.send_to(st, from, Class::Control, links::copy_of(&frame));
                }
            }
            answer @ RetainFrame::Answer { .. } => {
                let RetainFrame::Answer { req, .. } = &answer else { unreachable!() };
                let requests = self.retained.requests.lock();
                if let Some((asked, answers)) = requests.get(req).filter(|(asked, _)| asked.contains(&from)) {
                    debug_assert!(!asked.is_empty());
                    let _ = answers.send(answer);
                }
            }
        }
    }

    /// After a membership change from `before` to `after`: what this node
    /// holds of each shard goes to the owners new for it; shards no longer
    /// owned are let go after [`RELEASE_GRACE_MS`] (owned again: kept).
    pub(super) fn retained_membership_changed(&self, st: &State, before: &Membership, after: &Membership, now_ms: u64) {
        let depth = st.node.config().shard_depth;
        let r = self.replication;
        let mut per_node: HashMap<NodeId, Vec<Packed>> = HashMap::new();
        {
            let mut store = self.retained.store.lock();
            let mut owners_of: HashMap<ShardKey, (Vec<NodeId>, bool)> = HashMap::new();
            store.held.for_each_mut(|held| {
                let key = filter_shard(held.topic(), depth);
                let (fresh, owned) = owners_of.entry(key).or_insert_with(|| {
                    let old = before.owners(&key, r);
                    let new = after.owners(&key, r);
                    let fresh = new.iter().copied().filter(|n| !old.contains(n) && *n != self.me).collect();
                    (fresh, new.contains(&self.me) || new.is_empty())
                });
                for node in fresh.iter() {
                    per_node.entry(*node).or_default().push(held.packed.clone());
                }
                match (*owned, held.release_at_ms) {
                    (true, _) => held.release_at_ms = None,
                    (false, None) => held.release_at_ms = Some(release_at(now_ms)),
                    (false, Some(_)) => {}
                }
            });
        }
        for (node, items) in per_node {
            bump(&self.retained.stats.handed_over, items.len() as u64);
            let Some(peer) = st.peers.get(&node).copied() else { continue };
            let sender = self.links.sender(peer);
            // Paced by the send budget (below the share kept for control
            // frames), so a large hand-over neither floods nor is cut; each
            // chunk is opened and encoded as its turn comes.
            self.spawn(async move {
                let mut items = items.iter().map(Packed::item).peekable();
                while items.peek().is_some() {
                    let items = next_chunk(&mut items);
                    let frame = wire::encode_retained(&RetainFrame::Put { items, relay: false, ack: None });
                    let deadline = tokio::time::Instant::now() + HANDOVER_PATIENCE;
                    while !sender.send(Class::Resendable, links::copy_of(&frame)) {
                        if tokio::time::Instant::now() >= deadline {
                            tracing::warn!("retained hand-over stopped: the send queue stayed full");
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
    }

    /// What this node holds of each shard it owns: the shard's digest (a
    /// hash of each topic's version, order-free) and its topics.
    fn retained_by_shard(&self, st: &State, membership: &Membership) -> HashMap<ShardKey, (u64, Vec<Box<str>>)> {
        let depth = st.node.config().shard_depth;
        let store = self.retained.store.lock();
        let mut owned: HashMap<ShardKey, bool> = HashMap::new();
        let mut shards: HashMap<ShardKey, (u64, Vec<Box<str>>)> = HashMap::new();
        for held in store.held.values() {
            let topic = held.topic();
            let key = filter_shard(topic, depth);
            let mine =
                *owned.entry(key).or_insert_with(|| membership.owners(&key, self.replication).contains(&self.me));
            if !mine {
                continue;
            }
            let hash = kadmq_dht::core::id::StableHasher::new()
                .bytes(topic.as_bytes())
                .u64(held.packed.hlc())
                .u64(held.packed.origin())
                .finish();
            let shard = shards.entry(key).or_default();
            shard.0 ^= hash;
            shard.1.push(topic.into());
        }
        shards
    }

    /// Once every `retained_check_secs`: each other owner of the shards
    /// this node holds gets its digests ([`RetainFrame::Digests`]).
    pub(super) fn retained_check(&self, st: &State, now_ms: u64) {
        let retained = &self.retained;
        if retained.check_ms == 0 || now_ms < retained.next_check_ms.load(Ordering::Relaxed) {
            return;
        }
        retained.next_check_ms.store(now_ms + retained.check_ms, Ordering::Relaxed);
        let membership = st.node.membership().clone();
        let mut per_owner: HashMap<NodeId, Vec<(ShardKey, u64)>> = HashMap::new();
        for (key, (digest, _)) in self.retained_by_shard(st, &membership) {
            for owner in membership.owners(&key, self.replication).iter().filter(|o| **o != self.me) {
                per_owner.entry(*owner).or_default().push((key, digest));
            }
        }
        for (owner, items) in per_owner {
            for items in items.chunks(wire::MAX_RETAINED_ITEMS) {
                let frame = wire::encode_retained(&RetainFrame::Digests { items: items.to_vec(), reply: false });
                self.send_to(st, owner, Class::Control, links::copy_of(&frame));
            }
        }
    }

    /// Moves what the broker kept before this node was in a fleet (its
    /// `retained` tree) into the fleet's store, at version 0: any write
    /// made in the fleet is newer.
    pub(super) fn adopt_local_retained(&self, storage: &Storage, messages: Vec<Message>) {
        let items: Vec<FleetRetained> = messages
            .into_iter()
            .map(|message| FleetRetained {
                topic: message.topic.clone(),
                hlc: 0,
                origin: self.me.0,
                message: Some(message),
                cleared_at_ms: 0,
            })
            .collect();
        self.retained.apply_all(storage, &items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(topic: &str, hlc: u64, payload: Option<&str>) -> FleetRetained {
        FleetRetained {
            topic: topic.into(),
            hlc,
            origin: 1,
            message: payload.map(|p| Message {
                topic: topic.into(),
                payload: p.to_string().into(),
                qos: crate::protocol::QoS::AtMostOnce,
                retain: true,
                properties: Default::default(),
                expires_at_ms: None,
                origin: None,
                fleet_id: None,
            }),
            cleared_at_ms: if payload.is_none() { hlc } else { 0 },
        }
    }

    #[test]
    fn the_newest_version_wins_and_a_tombstone_outvotes_an_old_value() {
        let mut store = Store::default();
        assert!(store.apply(&item("a/b", 5, Some("new"))).is_some());
        assert!(store.apply(&item("a/b", 3, Some("old"))).is_none(), "an older version is refused");
        assert_eq!(store.matching("a/+", |_| true)[0].message.as_ref().unwrap().payload, "new");
        assert!(store.apply(&item("a/b", 7, None)).is_some(), "cleared later");
        assert_eq!(store.live(), 0);
        assert!(store.apply(&item("a/b", 6, Some("stale"))).is_none(), "the tombstone keeps the stale value out");
        let all = store.matching("#", |_| true);
        assert_eq!(all.len(), 1);
        assert!(all[0].message.is_none() && all[0].hlc == 7, "queries see tombstones: {all:?}");
        assert_eq!(store.bytes, 0);
        assert!(store.apply(&item("a/b", 8, Some("again"))).is_some());
        assert_eq!(store.tombstones.len(), 0);
        assert_eq!(store.bytes, ("again".len() + "a/b".len()) as u64);
    }

    #[test]
    fn expiring_messages_are_indexed_until_replaced() {
        let mut store = Store::default();
        let mut expiring = item("e/x", 5, Some("soon"));
        expiring.message.as_mut().unwrap().expires_at_ms = Some(1_000);
        assert!(store.apply(&expiring).is_some());
        assert_eq!(store.expiring.len(), 1);
        assert!(store.apply(&item("e/x", 6, Some("forever"))).is_some());
        assert!(store.expiring.is_empty(), "the newer value does not expire");
    }

    #[test]
    fn chunks_stay_under_the_byte_bound() {
        let big = "x".repeat(300 << 10);
        let items: Vec<FleetRetained> = (0..10).map(|i| item(&format!("t/{i}"), i, Some(&big))).collect();
        let chunks = chunks(items);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 10);
        assert!(chunks.iter().all(|c| c.len() <= 4));
        assert_eq!(super::chunks(Vec::new()).len(), 1, "an empty answer is one (last) chunk");
    }

    #[test]
    fn a_reopened_store_holds_what_it_stored_and_reads_older_records() {
        let storage = Storage::in_memory();
        let store = FleetRetainedStore::open(&storage, 60, 30).unwrap();
        store.apply_all(&storage, &[item("a/b", 5, Some("kept")), item("a/c", 6, None)]);
        let older = item("a/d", 7 << 16, Some("from an older version"));
        storage.put_fleet_retained("a/d", &rmp_serde::to_vec_named(&older).unwrap()).unwrap();
        let reopened = FleetRetainedStore::open(&storage, 60, 30).unwrap();
        assert_eq!(reopened.figures(), (2, 1, ("kept".len() + 3 + "from an older version".len() + 3) as u64));
        assert!(reopened.tick(0) > 7 << 16, "the clock starts past every stored version");
        let all = reopened.store.lock().matching("#", |_| true);
        let mut topics: Vec<&str> = all.iter().map(|i| i.topic.as_str()).collect();
        topics.sort();
        assert_eq!(topics, ["a/b", "a/c", "a/d"]);

        storage.put_fleet_retained("a/e", b"\xc1 damaged").unwrap();
        let err = FleetRetainedStore::open(&storage, 60, 30).err().expect("a damaged record is refused");
        assert!(err.to_string().contains("fleet_retained"), "{err}");
    }

    #[test]
    fn an_expired_message_becomes_a_tombstone_that_is_purged_after_the_tombstone_time() {
        let storage = Storage::in_memory();
        let store = FleetRetainedStore::open(&storage, 60, 30).unwrap();
        // An expiry makes it the fully encoded kind (not payload only).
        let mut expiring = item("e/x", 5, Some("soon"));
        expiring.message.as_mut().unwrap().expires_at_ms = Some(1_000);
        store.apply_all(&storage, &[expiring, item("e/y", 6, Some("stays"))]);
        let live_bytes = ("stays".len() + 3) as u64;
        store.sweep(&storage, 999);
        assert_eq!(store.figures(), (2, 0, live_bytes + 4 + 3), "not yet");
        store.sweep(&storage, 1_000);
        assert_eq!(store.figures(), (1, 1, live_bytes), "expired: a tombstone at its version");
        let reopened = FleetRetainedStore::open(&storage, 60, 30).unwrap();
        assert_eq!(reopened.figures(), (1, 1, live_bytes), "the tombstone is what is on disk");
        let kept = store.store.lock().matching("e/x", |_| true);
        assert!(kept.len() == 1 && kept[0].message.is_none() && kept[0].hlc == 5, "{kept:?}");
        store.apply_all(&storage, &[item("e/x", 4, Some("older copy"))]);
        assert_eq!(store.figures().0, 1, "an older copy cannot come back");
        store.sweep(&storage, 1_000 + 60_000 - 1);
        assert_eq!(store.figures().1, 1, "kept for the tombstone time");
        store.sweep(&storage, 1_000 + 60_000);
        assert_eq!(store.figures(), (1, 0, live_bytes), "purged");
        assert_eq!(store.stats.purged.load(Ordering::Relaxed), 1);
        let reopened = FleetRetainedStore::open(&storage, 60, 30).unwrap();
        assert_eq!(reopened.figures(), (1, 0, live_bytes), "and gone from disk");
    }

    #[test]
    fn the_clock_never_goes_back() {
        let store = FleetRetainedStore::open(&Storage::in_memory(), 60, 30).unwrap();
        let a = store.tick(1_000);
        store.witness(5_000 << 16);
        let b = store.tick(1_000);
        assert!(b > a && b > 5_000 << 16);
        assert!(store.tick(10_000) >= 10_000 << 16);
    }
}
