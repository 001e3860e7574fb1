//! The routing state machine of one cluster member.
//!
//! [`Node::handle`] takes an [`Event`] and the current time and appends
//! [`Action`]s for its caller (the libp2p driver or the simulator) to carry
//! out. It plays three roles at once:
//!
//! - **subscriber node**: keeps its local filters (the truth: filter → local
//!   subscriber count, per shared group) and asserts one entry per filter to
//!   the `R` owners of the filter's shard, on 0↔1 transitions; re-asserts a
//!   shard in full to owners that are new after a membership change, and on
//!   request after replicas disagree.
//! - **owner**: holds [`RouteShard`]s, answers lookups, registers watchers
//!   and pushes them deltas; drops the entries of dead nodes; releases shards
//!   it no longer owns after a grace period; runs anti-entropy with the other
//!   owners of each shard (digest per shard → per-node digests → the
//!   subscriber node re-asserts).
//! - **publisher**: routes a publish through the [`RouteCache`] (a shard it
//!   owns itself is read directly), asks one owner on a miss (single flight,
//!   publishes park until the answer), matches the topic and forwards once per
//!   destination node with what it matched; `$share` groups get exactly one
//!   node per message, picked by a hash of (message, group, filter) so every
//!   publisher with the same view picks the same node.
//! - **hot-prefix splits** (all three roles; see the module docs of
//!   `core`): an owner splits a shard past `split_entries`, subscriber nodes
//!   move their deeper filters to the child shards, publishers follow the
//!   split flag down their topic's path.
//!
//! Boundary: no sockets, no clock, no randomness: time comes in with each
//! event, and everything else is a function of the events. Liveness (who is
//! in the [`Membership`]) is decided outside.

use super::filter_trie::{join_filter, FilterTrie};
use super::frame::{ForwardRoute, Frame, FrameKind, LookupAnswer, RouteChange, RouteOp, SharedPick, FRAME_KINDS};
use super::id::{FastMap, NodeId, StableHasher};
use super::ownership::{Membership, Owners, Ownership, OwnershipConfig, XorOwnership};
use super::route_cache::{Applied, Evicted, PendingLookup, RouteCache, Warming};
use super::route_shard::{entry_hash, FilterRoutes, InOrder, RouteShard, SPLIT_MARK};
use crate::shard::{filter_prefix, literal_depth, publish_shards, ShardKey, DEFAULT_SHARD_DEPTH};
use crate::topic::{valid_share_group, valid_topic_filter, valid_topic_name, TopicLimit, TopicLimits, MAX_TOPIC_LEN};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// How long a lookup that no owner answered waits before asking them all
/// again, while views are still converging after a membership change.
const LOOKUP_RETRY_MS: u64 = 100;

/// The longest wait between two retries of an unacknowledged assertion
/// (they back off from [`RoutingConfig::assert_retry_ms`] to this).
const MAX_ASSERT_RETRY_MS: u64 = 30_000;
/// The longest wait between resyncs of a node that frames keep being lost
/// to ([`Event::FramesLost`]; the wait doubles from `assert_retry_ms`).
const MAX_RESYNC_MS: u64 = 4_000;
/// Most unacknowledged assertions remembered per (shard, owner); older
/// ones are forgotten (a later acknowledgement covers them).
const MAX_UNACKED: usize = 256;

/// Default of [`RoutingConfig::frame_chunk_bytes`]: 1 MiB.
pub const DEFAULT_FRAME_CHUNK_BYTES: usize = 1 << 20;
/// Default of [`RoutingConfig::split_entries`].
pub const DEFAULT_SPLIT_ENTRIES: usize = 4_096;
/// Default of [`RoutingConfig::max_topic_levels`].
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = crate::topic::DEFAULT_MAX_LEVELS;
/// Most items (ops, changes, digests, shards) one frame may carry. A frame
/// is at most 16 MiB, so this only bites on frames of tiny items; it bounds
/// the work one frame can ask for.
pub const MAX_FRAME_ITEMS: usize = 1 << 20;
/// Items per frame of per-shard items ([`Frame::WatchState`],
/// [`Frame::Digest`], [`Frame::OwnDigests`], [`Frame::WatchCheck`],
/// [`Frame::Reassert`]): a shard key is encoded as 32 integers, 55-85 bytes
/// an item, ~0.5 MiB a frame.
const WATCH_STATE_ITEMS: usize = 8_192;

/// The routing core's settings, shared by the whole fleet (every node must
/// agree on `replication`, `shard_depth` and the ownership strategy).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RoutingConfig {
    /// Owners per shard (R).
    pub replication: usize,
    /// Literal prefix levels that name a shard.
    pub shard_depth: usize,
    /// Route cache bound, in entries.
    pub cache_capacity: usize,
    /// How long a node keeps serving a shard it no longer owns.
    pub handoff_grace_ms: u64,
    /// How long after a membership change a node that became an owner of a
    /// shard defers to the owners of longer standing (answers lookups with
    /// [`LookupAnswer::Warming`], looks up rather than reading its own copy).
    /// It should cover the spread between nodes noticing the same change
    /// plus the re-assertions' travel time.
    pub handoff_warmup_ms: u64,
    /// How long to wait for a lookup answer before asking the next owner.
    pub lookup_timeout_ms: u64,
    /// Period of the anti-entropy round (0 = off): replicas compare their
    /// digests, subscriber nodes check their own entries at the owners, and
    /// publishers check the versions of the shards they cache.
    pub anti_entropy_interval_ms: u64,
    /// How long an owner has to acknowledge an assertion before it is sent
    /// again (as a replacement); doubled per retry up to 30 s.
    pub assert_retry_ms: u64,
    /// Most levels a topic filter or topic may have, here or in a frame
    /// from another node.
    pub max_topic_levels: usize,
    /// Entries at which an owner splits a shard by the next topic level
    /// (0 = never): a hot prefix (`devices/eu/…`) spreads over the child
    /// shards' owners instead of sitting on R nodes.
    pub split_entries: usize,
    /// Bytes of entries (or operations) one frame carries at most: a
    /// lookup answer, an assertion or a delta that would be larger goes in
    /// parts (a frame is at most 16 MiB). A replacement's parts are applied
    /// as one (what no part named goes with the last); an incremental
    /// assertion's parts one by one.
    pub frame_chunk_bytes: usize,
}

impl RoutingConfig {
    /// The level and length limits a topic or filter is checked against;
    /// the length is MQTT's, the levels this fleet's.
    pub fn topic_limits(&self) -> TopicLimits {
        TopicLimits { max_levels: self.max_topic_levels, max_len: MAX_TOPIC_LEN }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            replication: 3,
            shard_depth: DEFAULT_SHARD_DEPTH,
            cache_capacity: 100_000,
            handoff_grace_ms: 10_000,
            handoff_warmup_ms: 3_000,
            lookup_timeout_ms: 2_000,
            anti_entropy_interval_ms: 30_000,
            assert_retry_ms: 1_000,
            max_topic_levels: DEFAULT_MAX_TOPIC_LEVELS,
            split_entries: DEFAULT_SPLIT_ENTRIES,
            frame_chunk_bytes: DEFAULT_FRAME_CHUNK_BYTES,
        }
    }
}

/// An input to the core.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    /// The live set changed (or this is the first view). Share one `Arc`
    /// between nodes with the same view: it holds the precomputed placement.
    Membership(Arc<Membership>),
    /// A local client subscribed; `group` is `Some` for `$share/group/filter`
    /// (pass the filter without the `$share/group/` part).
    Subscribe { filter: &'a str, group: Option<&'a str> },
    /// A local client unsubscribed (or its session ended).
    Unsubscribe { filter: &'a str, group: Option<&'a str> },
    /// A local client published; `msg` is the caller's handle for the
    /// message (the payload never enters the core).
    Publish { topic: &'a str, msg: u64 },
    /// A route frame from another node.
    Frame { from: NodeId, frame: Frame },
    /// Another node's [`Action::Forward`] arrived here.
    Forwarded { from: NodeId, topic: &'a str, msg: u64, route: ForwardRoute },
    /// The timer armed by [`Action::ArmTimer`] went off (early or extra
    /// calls are harmless).
    Timer,
    /// Node `from` took this node for dead while it was alive (a false
    /// suspicion, a pause) and now sees it again: it dropped this node's
    /// entries and watches. Re-assert every entry of the shards it owns,
    /// and forget the routes cached from it (the next publish looks up and
    /// watches again).
    Rejoined { from: NodeId },
    /// Route frames sent to `to` may not have arrived: a write to it
    /// failed, its link closed, or a queue refused a frame. A lost delta
    /// with no later one shows no gap at the watcher, and an assertion's
    /// retry may have backed off far; so `assert_retry_ms` later (once,
    /// however many losses come meanwhile) `to` is told the version of
    /// every shard it watches here ([`Frame::WatchState`]: it drops a copy
    /// that missed a delta) and this node's unacknowledged assertions to it
    /// are sent again. A loss the sender cannot see is left to anti-entropy.
    FramesLost { to: NodeId },
}

/// An output of the core, for the caller to carry out in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a route frame to a node (never to this node itself).
    Send { to: NodeId, frame: Frame },
    /// Send publish `msg` (topic + payload, kept by the caller) to node `to`,
    /// with `route` telling it what to deliver. Exactly one per destination
    /// node per publish.
    Forward { to: NodeId, msg: u64, route: ForwardRoute },
    /// Deliver `msg` to local subscribers as `route` says (for a local
    /// publish, or for a forward that still matches here).
    Deliver { msg: u64, route: ForwardRoute },
    /// Routing of publish `msg` is complete: `forwards` Forward actions and
    /// `local` Deliver were emitted for it (a QoS 1/2 publisher waits for
    /// that many acknowledgements).
    Routed { msg: u64, forwards: u32, local: bool },
    /// This node split shard `shard` (literal prefix `prefix`) because it
    /// passed [`RoutingConfig::split_entries`]. For the record (a log line,
    /// a count); nothing to carry out.
    Split { shard: ShardKey, prefix: String },
    /// Call `handle(Event::Timer)` at `at` (ms). Replaces any earlier-armed
    /// time: the core only emits this when its next deadline moves earlier,
    /// and re-arms after each timer event.
    ArmTimer { at: u64 },
}

/// Rejected inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    /// A frame or forward from another node that was not applied.
    #[error("input from node {from} rejected: {reason}")]
    Rejected { from: NodeId, reason: Rejected },
}

/// Why a frame (or forward) from another node was dropped unapplied.
/// Another node's input is checked as a client's would be: a bug or a
/// misconfiguration there must not corrupt this node's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejected {
    /// Not a valid MQTT topic filter (or topic, for a forward).
    #[error("invalid topic filter or topic")]
    InvalidFilter,
    /// More levels than `max_topic_levels`.
    #[error("too many topic levels")]
    TooDeep,
    /// Longer than 65,535 bytes.
    #[error("string too long")]
    TooLong,
    /// A filter carried for a shard that is not its shard.
    #[error("filter not in the frame's shard")]
    WrongShard,
    /// An empty shared-subscription group, or one with `/`, `+`, `#` or NUL.
    #[error("invalid shared subscription group")]
    InvalidGroup,
    /// More than [`MAX_FRAME_ITEMS`] items.
    #[error("too many items")]
    TooManyItems,
    /// A node list not in strictly ascending order.
    #[error("node digests not sorted")]
    Unsorted,
    /// A frame that claims to come from this node itself.
    #[error("sender has this node's id")]
    OwnId,
}

impl Rejected {
    pub const ALL: [Rejected; 8] = [
        Rejected::InvalidFilter,
        Rejected::TooDeep,
        Rejected::TooLong,
        Rejected::WrongShard,
        Rejected::InvalidGroup,
        Rejected::TooManyItems,
        Rejected::Unsorted,
        Rejected::OwnId,
    ];

    /// A metric label.
    pub fn name(self) -> &'static str {
        match self {
            Rejected::InvalidFilter => "invalid_filter",
            Rejected::TooDeep => "too_deep",
            Rejected::TooLong => "too_long",
            Rejected::WrongShard => "wrong_shard",
            Rejected::InvalidGroup => "invalid_group",
            Rejected::TooManyItems => "too_many_items",
            Rejected::Unsorted => "unsorted",
            Rejected::OwnId => "own_id",
        }
    }

    fn index(self) -> usize {
        Rejected::ALL.iter().position(|r| *r == self).expect("listed")
    }
}

/// Monotonic counters (the driver exports them as metrics; the simulator
/// sums them). Gauges are methods on [`Node`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub publishes: u64,
    /// Shards answered from the route cache.
    pub cache_hits: u64,
    /// Shards not cached when a publish needed them (each starts or joins a lookup).
    pub cache_misses: u64,
    /// Shards answered from this node's own owned shard.
    pub owned_reads: u64,
    /// Lookup frames sent, retries included.
    pub lookups_sent: u64,
    pub lookup_retries: u64,
    /// Lookups abandoned after every owner was tried; the publish went on without that shard.
    pub lookups_failed: u64,
    /// Publishes that waited for a lookup.
    pub publishes_parked: u64,
    pub forwards_sent: u64,
    pub local_deliveries: u64,
    pub forwards_received: u64,
    /// Forwards that matched nothing here any more (stale routes).
    pub forwards_stale: u64,
    pub cache_evictions: u64,
    /// Cached shards dropped because their source died, moved or released them.
    pub cache_invalidations: u64,
    /// Full re-assertions of a shard sent (rebalancing and repairs).
    pub reassertions: u64,
    /// Re-assertions requested from subscriber nodes by anti-entropy.
    pub repairs_requested: u64,
    pub shards_released: u64,
    /// Entries dropped because their node left the membership.
    pub entries_dropped: u64,
    /// Replacement assertions sent because an owner had not acknowledged
    /// in time (a frame lost, a slow or cut link).
    pub assertions_retried: u64,
    /// Owner side: numbered assertions that came after a missing one (a
    /// replacement was asked for).
    pub assertion_gaps: u64,
    /// Cached shards dropped because a delta went missing.
    pub delta_gaps: u64,
    /// Cached shards dropped because the owner's version or watch differed
    /// at a watch check.
    pub watch_mismatches: u64,
    /// Nodes brought up to date after frames to them were lost
    /// ([`Event::FramesLost`]).
    pub resyncs: u64,
    /// Owned shards this node split (passed `split_entries`).
    pub splits: u64,
    /// Owned shards this node learned are split from another node (or
    /// from its own subscriptions, as a new owner).
    pub splits_adopted: u64,
    /// Local filters moved to a child shard after their shard split
    /// (counted when the move starts).
    pub filters_moved: u64,
    /// Frames sent, by [`FrameKind`] (index: position in [`FrameKind::ALL`]).
    pub frames_sent: [u64; FRAME_KINDS],
    pub frames_received: [u64; FRAME_KINDS],
    /// Frames and forwards from other nodes dropped unapplied, by
    /// [`Rejected`] (index: position in [`Rejected::ALL`]).
    pub frames_rejected: [u64; 8],
}

impl Counters {
    pub fn rejected(&self, reason: Rejected) -> u64 {
        self.frames_rejected[reason.index()]
    }

    pub fn sent(&self, kind: FrameKind) -> u64 {
        self.frames_sent[kind_index(kind)]
    }

    pub fn received(&self, kind: FrameKind) -> u64 {
        self.frames_received[kind_index(kind)]
    }
}

fn kind_index(kind: FrameKind) -> usize {
    FrameKind::ALL.iter().position(|k| *k == kind).expect("listed")
}

/// Local subscribers of one filter on this node.
#[derive(Clone, Debug, Default)]
struct LocalCounts {
    plain: u32,
    groups: SmallVec<[(Box<str>, u32); 1]>,
}

impl LocalCounts {
    fn get(&self, group: Option<&str>) -> u32 {
        match group {
            None => self.plain,
            Some(g) => self.groups.iter().find(|(n, _)| &**n == g).map_or(0, |(_, c)| *c),
        }
    }

    fn is_empty(&self) -> bool {
        self.plain == 0 && self.groups.is_empty()
    }
}

/// This node's filters in one shard, the shard's owners in the current
/// view, and where the assertions to each owner stand. Kept while an owner
/// has not acknowledged the last change, even once no filter is left, and
/// for good once it is known split (it carries the split to new owners).
#[derive(Clone, Debug, Default)]
struct LocalShard {
    filters: BTreeSet<Box<str>>,
    /// Levels of the shard's literal prefix.
    depth: usize,
    /// The shard is split: deeper filters live in the child shards. Kept
    /// (and re-asserted to new owners) while the node lives, so a split
    /// outlives the owners that made it.
    split: bool,
    /// Filters moved to a child shard that still wait to leave this one:
    /// they do once the child's owners acknowledged them (the ticket).
    moving: Vec<(Box<str>, RouteTicket)>,
    owners: Owners,
    /// Bumped by every change of this node's entries here; what a
    /// [`RouteTicket`] waits for.
    stamp: u64,
    /// Per owner: the numbered assertions sent and acknowledged.
    links: SmallVec<[OwnerLink; 3]>,
    /// When unacknowledged assertions are sent again, and the wait after that.
    retry_at: Option<u64>,
    retry_ms: u64,
}

impl LocalShard {
    fn link(&self, owner: NodeId) -> Option<&OwnerLink> {
        self.links.iter().find(|l| l.owner == owner)
    }

    /// Every current owner acknowledged every change.
    fn all_acked(&self) -> bool {
        self.owners.iter().all(|&o| self.link(o).is_some_and(|l| l.acked >= self.stamp))
    }
}

/// The assertions of one shard to one of its owners.
#[derive(Clone, Debug)]
struct OwnerLink {
    owner: NodeId,
    /// The last number used (0: nothing sent yet; the next is 1, which an
    /// owner holding nothing of ours takes as next in line).
    seq: u64,
    /// The newest stamp the owner acknowledged.
    acked: u64,
    /// (number, stamp) of each assertion not yet acknowledged, oldest first.
    unacked: VecDeque<(u64, u64)>,
    /// The first number sent saying the shard is split: an owner that
    /// acknowledges it or a later one without the split missed it.
    split_from: Option<u64>,
}

/// A point in this node's subscription changes of one shard: settled once
/// every owner of the shard acknowledged it ([`Node::settled`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTicket {
    pub shard: ShardKey,
    stamp: u64,
}

/// A publish waiting for lookups.
#[derive(Debug)]
#[cfg_attr(feature = "fuzzing", derive(Clone))]
struct Parked {
    topic: Box<str>,
    msg: u64,
    matched: Vec<(NodeId, Option<SharedPick>)>,
    waiting: u32,
    /// The deepest shard on the topic's path that is awaited and may be
    /// split (its levels): if its answer says split, the child is next.
    tip: Option<(ShardKey, usize)>,
}

/// One cluster member's routing core.
///
/// With the `fuzzing` feature it is `Clone`, so a fuzz target can set a
/// node up once and start every run from a copy.
#[derive(Debug)]
#[cfg_attr(feature = "fuzzing", derive(Clone))]
pub struct Node {
    id: NodeId,
    config: RoutingConfig,
    membership: Arc<Membership>,
    /// The view before the latest burst of membership changes (changes less
    /// than `handoff_warmup_ms` apart form one burst), and when the last
    /// change came: a shard this node owns now but did not own in
    /// `baseline` is warming up until `view_changed_at + handoff_warmup_ms`.
    baseline: Arc<Membership>,
    view_changed_at: Option<u64>,
    local: FilterTrie<LocalCounts>,
    local_shards: FastMap<ShardKey, LocalShard>,
    pub(super) owned: FastMap<ShardKey, RouteShard>,
    cache: RouteCache,
    parked: Vec<Option<Parked>>,
    free_slots: Vec<u32>,
    next_req: u64,
    releases: BTreeSet<(u64, ShardKey)>,
    lookup_deadlines: BTreeSet<(u64, ShardKey)>,
    /// When a local shard's unacknowledged assertions are sent again.
    assert_retries: BTreeSet<(u64, ShardKey)>,
    /// When a split local shard's moved filters are checked for leaving it.
    moves: BTreeSet<(u64, ShardKey)>,
    /// When an owned shard's watchers are told the version of its last push.
    tails: BTreeSet<(u64, ShardKey)>,
    /// Nodes that frames were lost to, and when they are brought up to
    /// date ([`Event::FramesLost`]); one entry per node.
    resyncs: BTreeSet<(u64, NodeId)>,
    /// Per node resynced while no frame came back from it: the wait before
    /// its next resync (doubled by each, up to [`MAX_RESYNC_MS`]; gone
    /// with its next frame).
    resync_waits: FastMap<NodeId, u64>,
    next_anti_entropy: Option<u64>,
    armed: Option<u64>,
    inbox: VecDeque<Frame>,
    counters: Counters,
}

impl Node {
    /// A node with an empty view; feed it [`Event::Membership`] first.
    pub fn new(id: NodeId, config: RoutingConfig) -> Node {
        Node::with_ownership(id, config, OwnershipConfig::default())
    }

    /// As [`Node::new`], with the strategy of the initial empty view.
    pub fn with_ownership(id: NodeId, config: RoutingConfig, ownership: OwnershipConfig) -> Node {
        let cache = RouteCache::new(config.cache_capacity);
        let empty = Arc::new(Membership::empty(ownership));
        Node {
            id,
            config,
            membership: empty.clone(),
            baseline: empty,
            view_changed_at: None,
            local: FilterTrie::new(),
            local_shards: FastMap::default(),
            owned: FastMap::default(),
            cache,
            parked: Vec::new(),
            free_slots: Vec::new(),
            next_req: 0,
            releases: BTreeSet::new(),
            lookup_deadlines: BTreeSet::new(),
            assert_retries: BTreeSet::new(),
            moves: BTreeSet::new(),
            tails: BTreeSet::new(),
            resyncs: BTreeSet::new(),
            resync_waits: FastMap::default(),
            next_anti_entropy: None,
            armed: None,
            inbox: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Entries in the shards this node currently owns.
    pub fn entries_owned(&self) -> usize {
        self.owned.values().filter(|s| s.release_at.is_none()).map(|s| s.len()).sum()
    }

    /// Entries held, shards in their grace period included.
    pub fn entries_held(&self) -> usize {
        self.owned.values().map(|s| s.len()).sum()
    }

    /// Shards this node currently owns and holds state for.
    pub fn shards_owned(&self) -> usize {
        self.owned.values().filter(|s| s.release_at.is_none()).count()
    }

    pub fn owned_shard(&self, key: &ShardKey) -> Option<&RouteShard> {
        self.owned.get(key)
    }

    pub fn cache(&self) -> &RouteCache {
        &self.cache
    }

    /// Whether a publish to `topic` at `now` would be decided at once and
    /// forwarded to no other node: every shard it reads is known here
    /// (owned or cached) and names no other live node, shared groups
    /// included. Changes nothing (no counter, no cache order); a caller
    /// that must not forward (a full outbox) asks this first.
    pub fn stays_here(&self, topic: &str, now: u64) -> bool {
        if self.check_topic(topic).is_err() {
            return false;
        }
        let elsewhere = |routes: &FilterTrie<FilterRoutes>| {
            let mut found = false;
            routes.match_topic(topic, |_, _, r| {
                let other = |n: NodeId| n != self.id && self.membership.contains(n);
                found |= r.nodes.iter().any(|(n, _)| other(*n))
                    || r.groups.iter().any(|(_, members)| members.iter().any(|(n, _)| other(*n)));
            });
            found
        };
        // Per shard: stays here (`Some(split)`) or not (`None`).
        let stays = |key: &ShardKey| {
            let own_copy = self.reads_own_copy(key, now);
            if let Some(shard) = self.owned.get(key).filter(|s| own_copy && s.release_at.is_none()) {
                (!elsewhere(shard.routes())).then_some(shard.split)
            } else if let Some(shard) = self.cache.peek(key) {
                (!elsewhere(&shard.routes)).then_some(shard.split)
            } else {
                own_copy.then_some(false)
            }
        };
        let mut tip_split = false;
        let shards = publish_shards(topic, self.config.shard_depth);
        let tip = self.splittable_tip(topic, &shards);
        for (_, key) in shards {
            let Some(split) = stays(&key) else { return false };
            tip_split |= split && tip.is_some_and(|(k, _)| k == key);
        }
        let Some((_, mut depth)) = tip else { return true };
        while tip_split && depth < literal_depth(topic) {
            depth += 1;
            match stays(&ShardKey::of_prefix(filter_prefix(topic, depth))) {
                Some(split) => tip_split = split,
                None => return false,
            }
        }
        true
    }

    /// The deepest shard a publish to `topic` consults before any split,
    /// if a split could take it deeper (it is at the shard depth, not the
    /// root, and the topic goes on): the last of its `shards`
    /// ([`publish_shards`]), whose key is hashed already.
    fn splittable_tip(&self, topic: &str, shards: &[(String, ShardKey)]) -> Option<(ShardKey, usize)> {
        let depth = self.config.shard_depth;
        let (prefix, key) = shards.last()?;
        (literal_depth(topic) > depth && !prefix.is_empty()).then_some((*key, depth))
    }

    /// Distinct local filters (shared or not).
    pub fn local_filters(&self) -> usize {
        self.local.len()
    }

    /// Where this node's subscription changes in `filter`'s shard stand
    /// now: take it right after [`Event::Subscribe`], then wait for
    /// [`Node::settled`]. `None` when the filter names no shard here.
    pub fn ticket(&self, filter: &str) -> Option<RouteTicket> {
        let (shard, _) = self.home_of(filter);
        self.local_shards.get(&shard).map(|s| RouteTicket { shard, stamp: s.stamp })
    }

    /// The shards `filter` passes through as far as this node knows the
    /// splits: the shard of its literal prefix at the shard depth, then one
    /// level deeper for each split shard on its way. The last is where it
    /// lives now (its home); the others may still hold it while it moves.
    fn chain_of(&self, filter: &str) -> SmallVec<[(ShardKey, usize); 2]> {
        let literal = literal_depth(filter);
        let mut depth = literal.min(self.config.shard_depth);
        let mut chain: SmallVec<[(ShardKey, usize); 2]> = SmallVec::new();
        chain.push((ShardKey::of_prefix(filter_prefix(filter, depth)), depth));
        while depth < literal && self.local_shards.get(&chain[chain.len() - 1].0).is_some_and(|s| s.split) {
            depth += 1;
            chain.push((ShardKey::of_prefix(filter_prefix(filter, depth)), depth));
        }
        chain
    }

    /// Where `filter` lives now: its shard and that shard's levels.
    fn home_of(&self, filter: &str) -> (ShardKey, usize) {
        *self.chain_of(filter).last().expect("a chain has its first shard")
    }

    /// Whether every current owner of the ticket's shard acknowledged the
    /// changes up to it (an owner that is new since has acknowledged the
    /// re-assertion that brought it everything).
    pub fn settled(&self, ticket: &RouteTicket) -> bool {
        self.local_shards
            .get(&ticket.shard)
            .is_none_or(|s| s.owners.iter().all(|&o| s.link(o).is_some_and(|l| l.acked >= ticket.stamp)))
    }

    /// Local shards with a change some owner has not acknowledged yet.
    pub fn unsettled_shards(&self) -> usize {
        self.local_shards.values().filter(|s| !s.all_acked()).count()
    }

    /// Publishes waiting for lookups.
    pub fn parked(&self) -> usize {
        self.parked.len() - self.free_slots.len()
    }

    /// The earliest time the core wants [`Event::Timer`].
    pub fn next_deadline(&self) -> Option<u64> {
        [
            self.releases.first().map(|e| e.0),
            self.lookup_deadlines.first().map(|e| e.0),
            self.assert_retries.first().map(|e| e.0),
            self.moves.first().map(|e| e.0),
            self.tails.first().map(|e| e.0),
            self.resyncs.first().map(|e| e.0),
            self.next_anti_entropy,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Handles one event at time `now` (ms), appending actions to `out`.
    pub fn handle(&mut self, now: u64, event: Event<'_>, out: &mut Vec<Action>) -> Result<(), CoreError> {
        let result = match event {
            Event::Membership(membership) => {
                self.on_membership(now, membership, out);
                Ok(())
            }
            Event::Subscribe { filter, group } => self.subscribe(now, filter, group, out),
            Event::Unsubscribe { filter, group } => self.unsubscribe(now, filter, group, out),
            Event::Publish { topic, msg } => self.publish(now, topic, msg, out),
            Event::Frame { from, frame } => {
                self.counters.frames_received[kind_index(frame.kind())] += 1;
                if !self.resync_waits.is_empty() {
                    // It hears us again, or soon will: resync it promptly next time.
                    self.resync_waits.remove(&from);
                }
                match self.check_frame(from, &frame) {
                    Ok(()) => {
                        self.on_frame(now, from, frame, out);
                        Ok(())
                    }
                    Err(reason) => Err(self.reject(from, reason)),
                }
            }
            Event::Forwarded { from, topic, msg, route } => match self.check_forwarded(from, topic, &route) {
                Ok(()) => {
                    self.on_forwarded(topic, msg, route, out);
                    Ok(())
                }
                Err(reason) => Err(self.reject(from, reason)),
            },
            Event::Timer => {
                self.armed = None;
                self.on_timer(now, out);
                Ok(())
            }
            Event::Rejoined { from } => {
                self.on_rejoined(now, from, out);
                Ok(())
            }
            Event::FramesLost { to } => {
                self.on_frames_lost(now, to);
                Ok(())
            }
        };
        // Frames this node sent to itself (it owns shards it subscribes to).
        while let Some(frame) = self.inbox.pop_front() {
            self.on_frame(now, self.id, frame, out);
        }
        self.rearm(out);
        result
    }

    fn rearm(&mut self, out: &mut Vec<Action>) {
        if let Some(at) = self.next_deadline() {
            if self.armed.is_none_or(|armed| at < armed) {
                self.armed = Some(at);
                out.push(Action::ArmTimer { at });
            }
        }
    }

    fn send(&mut self, to: NodeId, frame: Frame, out: &mut Vec<Action>) {
        if to == self.id {
            self.inbox.push_back(frame);
        } else {
            self.counters.frames_sent[kind_index(frame.kind())] += 1;
            out.push(Action::Send { to, frame });
        }
    }

    /// Whether this node became an owner of `key` so recently that the
    /// subscriber nodes' re-assertions may not all have arrived.
    fn warming(&self, key: &ShardKey, now: u64) -> bool {
        self.view_settling(now) && !self.baseline.owners(key, self.config.replication).contains(&self.id)
    }

    /// Whether the last membership change is recent enough that other
    /// nodes may not have seen it yet (`handoff_warmup_ms`).
    fn view_settling(&self, now: u64) -> bool {
        self.view_changed_at.is_some_and(|at| now < at + self.config.handoff_warmup_ms)
    }

    /// Whether a publish may read this node's own copy of `key`: it owns the
    /// shard and is not warming up, or no other owner could do better.
    fn reads_own_copy(&self, key: &ShardKey, now: u64) -> bool {
        let owners = self.owners(key);
        owners.contains(&self.id) && (owners.len() == 1 || !self.warming(key, now))
    }

    fn owners(&self, key: &ShardKey) -> Owners {
        self.membership.owners(key, self.config.replication)
    }

    // ----- subscriber side -------------------------------------------------

    fn subscribe(
        &mut self,
        now: u64,
        filter: &str,
        group: Option<&str>,
        out: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        // Owners would refuse what they cannot take from us.
        if self.check_filter(filter).is_err() || group.is_some_and(|g| check_group(g).is_err()) {
            return Err(CoreError::InvalidFilter(filter.to_string()));
        }
        let counts = self.local.get_or_insert_with(filter, LocalCounts::default);
        let count = match group {
            None => {
                counts.plain += 1;
                counts.plain
            }
            Some(g) => match counts.groups.iter_mut().find(|(n, _)| &**n == g) {
                Some((_, c)) => {
                    *c += 1;
                    *c
                }
                None => {
                    counts.groups.push((g.into(), 1));
                    1
                }
            },
        };
        let (key, depth) = self.home_of(filter);
        self.local_shard_mut(key, Some(depth)).filters.insert(filter.into());
        // Owners hold the subscriber count per node (one entry per filter,
        // whatever the count): every change of it is asserted.
        let op = RouteOp { filter: filter.to_string(), group: group.map(str::to_string), count };
        self.assert_ops(now, key, vec![op], out);
        Ok(())
    }

    /// The local shard `key`, made if new; `depth`, its prefix's levels,
    /// when the caller knows them (one made for an empty re-assertion does
    /// not: it learns them with its first filter).
    fn local_shard_mut(&mut self, key: ShardKey, depth: Option<usize>) -> &mut LocalShard {
        if !self.local_shards.contains_key(&key) {
            let owners = self.owners(&key);
            let retry_ms = self.config.assert_retry_ms;
            self.local_shards.insert(key, LocalShard { owners, retry_ms, ..LocalShard::default() });
        }
        let shard = self.local_shards.get_mut(&key).expect("made");
        if let Some(depth) = depth {
            shard.depth = depth;
        }
        shard
    }

    fn unsubscribe(
        &mut self,
        now: u64,
        filter: &str,
        group: Option<&str>,
        out: &mut Vec<Action>,
    ) -> Result<(), CoreError> {
        let not_subscribed = || CoreError::NotSubscribed(filter.to_string());
        let counts = self.local.get_mut(filter).ok_or_else(not_subscribed)?;
        let left = match group {
            None if counts.plain > 0 => {
                counts.plain -= 1;
                counts.plain
            }
            None => return Err(not_subscribed()),
            Some(g) => {
                let i = counts.groups.iter().position(|(n, _)| &**n == g).ok_or_else(not_subscribed)?;
                counts.groups[i].1 -= 1;
                let left = counts.groups[i].1;
                if left == 0 {
                    counts.groups.remove(i);
                }
                left
            }
        };
        let gone = left == 0 && counts.is_empty();
        if gone {
            self.local.remove(filter);
        }
        // Its home, and a shard it is moving out of (a split) that still holds it.
        let chain = self.chain_of(filter);
        let home = chain[chain.len() - 1].0;
        let op = RouteOp { filter: filter.to_string(), group: group.map(str::to_string), count: left };
        for (key, _) in chain {
            let Some(shard) = self.local_shards.get_mut(&key) else { continue };
            if !shard.filters.contains(filter) && key != home {
                continue;
            }
            if gone {
                shard.filters.remove(filter);
            }
            self.assert_ops(now, key, vec![op.clone()], out);
        }
        Ok(())
    }

    /// Asserts changed entries of shard `key` to its owners, as the next
    /// numbered assertion to each. (An owner that still numbers an earlier
    /// run of this node's assertions sees a gap and asks for a replacement.)
    fn assert_ops(&mut self, now: u64, key: ShardKey, ops: Vec<RouteOp>, out: &mut Vec<Action>) {
        let Some(shard) = self.local_shards.get_mut(&key) else { return };
        shard.stamp += 1;
        for owner in shard.owners.clone() {
            self.send_assertion(now, key, owner, false, ops.clone(), out);
        }
    }

    /// Shard `key` is split (an owner said so): its filters that go deeper
    /// are asserted to their child shards now, and leave it once the
    /// children's owners acknowledged them and views had time to agree
    /// (`handoff_warmup_ms`): until then a publisher that has not heard of
    /// the split still finds them here.
    fn move_to_children(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        let Some(shard) = self.local_shards.get_mut(&key).filter(|s| !s.split) else { return };
        shard.split = true;
        let depth = shard.depth;
        let movers: Vec<Box<str>> = shard.filters.iter().filter(|f| literal_depth(f) > depth).cloned().collect();
        // Every owner of the shard hears of the split from us too (one may
        // have missed it: it owned the shard before the split with others).
        self.assert_ops(now, key, Vec::new(), out);
        let mut by_home: BTreeMap<ShardKey, Vec<Box<str>>> = BTreeMap::new();
        for filter in movers {
            let (home, home_depth) = self.home_of(&filter);
            if home == key {
                continue;
            }
            self.local_shard_mut(home, Some(home_depth)).filters.insert(filter.clone());
            by_home.entry(home).or_default().push(filter);
        }
        let mut moving = Vec::new();
        for (home, filters) in by_home {
            let ops = filters.iter().flat_map(|f| self.ops_of(f)).collect();
            self.assert_ops(now, home, ops, out);
            let ticket = RouteTicket { shard: home, stamp: self.local_shards[&home].stamp };
            moving.extend(filters.into_iter().map(|f| (f, ticket)));
        }
        if moving.is_empty() {
            return;
        }
        self.counters.filters_moved += moving.len() as u64;
        self.local_shards.get_mut(&key).expect("the split shard").moving.extend(moving);
        self.moves.insert((now + self.config.handoff_warmup_ms, key));
    }

    /// Withdraws from split shard `key` the moved filters their child
    /// shard's owners have acknowledged; looks again later for the rest.
    fn finish_moves(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        let Some(shard) = self.local_shards.get_mut(&key) else { return };
        let moving = std::mem::take(&mut shard.moving);
        let (done, waiting): (Vec<_>, Vec<_>) = moving.into_iter().partition(|(_, ticket)| self.settled(ticket));
        let shard = self.local_shards.get_mut(&key).expect("still here");
        let left: Vec<Box<str>> = done.into_iter().map(|(f, _)| f).filter(|f| shard.filters.remove(f)).collect();
        let waits = !waiting.is_empty();
        shard.moving = waiting;
        let ops: Vec<RouteOp> = left.iter().flat_map(|f| self.ops_of(f)).map(|op| RouteOp { count: 0, ..op }).collect();
        if !ops.is_empty() {
            self.assert_ops(now, key, ops, out);
        }
        if waits {
            self.moves.insert((now + self.config.assert_retry_ms, key));
        }
    }

    /// Numbers and sends one assertion of shard `key` to `owner`, remembers
    /// it until acknowledged, and arms the retry.
    fn send_assertion(
        &mut self,
        now: u64,
        key: ShardKey,
        owner: NodeId,
        replace: bool,
        ops: Vec<RouteOp>,
        out: &mut Vec<Action>,
    ) {
        let chunk = self.config.frame_chunk_bytes;
        let Some(shard) = self.local_shards.get_mut(&key) else { return };
        let stamp = shard.stamp;
        let split = shard.split;
        let link = match shard.links.iter().position(|l| l.owner == owner) {
            Some(i) => &mut shard.links[i],
            None => {
                shard.links.push(OwnerLink { owner, seq: 0, acked: 0, unacked: VecDeque::new(), split_from: None });
                shard.links.last_mut().expect("pushed")
            }
        };
        if replace {
            // A replacement covers everything before it.
            link.unacked.clear();
        }
        // Too large for one frame: in parts, numbered one after the other;
        // only the last one's acknowledgement settles the change.
        let parts = chunked(ops, op_bytes, chunk);
        let last = parts.len() - 1;
        let mut frames = Vec::with_capacity(parts.len());
        if split && link.split_from.is_none() {
            link.split_from = Some(link.seq + 1);
        }
        for (i, part) in parts.into_iter().enumerate() {
            link.seq += 1;
            if link.unacked.len() >= MAX_UNACKED {
                link.unacked.pop_front();
            }
            link.unacked.push_back((link.seq, if i == last { stamp } else { link.acked }));
            let (first, more) = (i == 0, i < last);
            let frame = Frame::Assert {
                shard: key,
                seq: link.seq,
                replace: replace && first,
                ops: part,
                split,
                more: replace && more,
            };
            frames.push(frame);
        }
        if shard.retry_at.is_none() {
            let at = now + shard.retry_ms;
            shard.retry_at = Some(at);
            self.assert_retries.insert((at, key));
        }
        for frame in frames {
            self.send(owner, frame, out);
        }
    }

    /// An owner acknowledged assertions of `key` up to `seq` (0: none, it
    /// only tells that the shard is `split`).
    fn on_acked(&mut self, now: u64, from: NodeId, key: ShardKey, seq: u64, split: bool, out: &mut Vec<Action>) {
        if split {
            self.move_to_children(now, key, out);
        } else if self.local_shards.get(&key).is_some_and(|s| {
            let told = s.link(from).and_then(|l| l.split_from).is_some_and(|first| seq >= first);
            s.split && s.owners.contains(&from) && told
        }) {
            // An owner that acknowledged the split without taking it on
            // (it lost it since): our entries and the split, again. (Acks
            // of assertions sent before this node knew are not that.)
            self.reassert(now, key, &[from], out);
        }
        let Some(shard) = self.local_shards.get_mut(&key) else { return };
        let Some(link) = shard.links.iter_mut().find(|l| l.owner == from) else { return };
        while let Some(&(number, stamp)) = link.unacked.front() {
            if number > seq {
                break;
            }
            link.acked = link.acked.max(stamp);
            link.unacked.pop_front();
        }
        if shard.all_acked() {
            shard.retry_ms = self.config.assert_retry_ms;
        }
        self.forget_if_settled(key);
    }

    /// Drops the local shard of `key` once it has no filter left and every
    /// owner acknowledged that (a split one stays: it carries the split).
    fn forget_if_settled(&mut self, key: ShardKey) {
        if let Some(shard) =
            self.local_shards.get_mut(&key).filter(|s| s.split && s.filters.is_empty() && s.all_acked())
        {
            // Kept for the split; the owners forgot our numbering with our
            // last entry, so the next assertion is number 1 again.
            for link in &mut shard.links {
                link.seq = 0;
                link.split_from = None;
            }
            return;
        }
        if self.local_shards.get(&key).is_some_and(|s| s.filters.is_empty() && s.all_acked() && !s.split) {
            self.local_shards.remove(&key);
        }
    }

    /// Sends the unacknowledged assertions of `key` again, as a
    /// replacement, to each owner that has not acknowledged them.
    fn retry_assertions(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        let Some(shard) = self.local_shards.get_mut(&key) else { return };
        shard.retry_at = None;
        let owners = &shard.owners;
        let laggards: Owners = shard
            .links
            .iter()
            .filter(|l| !l.unacked.is_empty() && owners.contains(&l.owner))
            .map(|l| l.owner)
            .collect();
        if laggards.is_empty() {
            shard.retry_ms = self.config.assert_retry_ms;
            return;
        }
        shard.retry_ms = (shard.retry_ms * 2).clamp(1, MAX_ASSERT_RETRY_MS);
        self.counters.assertions_retried += laggards.len() as u64;
        self.reassert(now, key, &laggards, out);
    }

    /// All of this node's entries in shard `key`.
    fn local_ops(&self, key: &ShardKey) -> Vec<RouteOp> {
        let Some(shard) = self.local_shards.get(key) else { return Vec::new() };
        shard.filters.iter().flat_map(|filter| self.ops_of(filter)).collect()
    }

    /// This node's entries of one filter (plain and per shared group).
    fn ops_of(&self, filter: &str) -> Vec<RouteOp> {
        let Some(counts) = self.local.get(filter) else { return Vec::new() };
        let plain =
            (counts.plain > 0).then(|| RouteOp { filter: filter.to_string(), group: None, count: counts.plain });
        let groups = counts.groups.iter().map(|(group, count)| RouteOp {
            filter: filter.to_string(),
            group: Some(group.to_string()),
            count: *count,
        });
        plain.into_iter().chain(groups).collect()
    }

    /// The hash an owner keeps of this node's entries in shard `key`
    /// ([`RouteShard::node_summary`]), from the local truth.
    /// With the split mark if this node knows the shard is split, so an
    /// owner that does not (or that knows and this node does not) is
    /// repaired by anti-entropy.
    fn own_digest(&self, key: &ShardKey) -> u64 {
        let hash = self.local_ops(key).iter().fold(0, |h, op| h ^ entry_hash(self.id, &op.filter, op.group.as_deref()));
        hash ^ split_mark(self.local_shards.get(key).is_some_and(|s| s.split))
    }

    fn on_rejoined(&mut self, now: u64, from: NodeId, out: &mut Vec<Action>) {
        let keys: Vec<ShardKey> =
            self.local_shards.iter().filter(|(_, s)| s.owners.contains(&from)).map(|(k, _)| *k).collect();
        for key in keys {
            self.reassert(now, key, &[from], out);
        }
        let stale: Vec<ShardKey> = self.cache.sources().filter(|(_, source, _)| *source == from).map(|e| e.0).collect();
        for key in stale {
            self.cache.remove(&key);
            self.counters.cache_invalidations += 1;
        }
    }

    /// Sends every entry of shard `key` to the owners `to`, as a replacement.
    fn reassert(&mut self, now: u64, key: ShardKey, to: &[NodeId], out: &mut Vec<Action>) {
        if to.is_empty() {
            return;
        }
        // Nothing here any more: the (empty) replacement is tracked until
        // acknowledged like any other. (Its depth matters only to a shard
        // with filters.)
        self.local_shard_mut(key, None);
        let ops = self.local_ops(&key);
        for &owner in to {
            self.counters.reassertions += 1;
            self.send_assertion(now, key, owner, true, ops.clone(), out);
        }
    }

    // ----- membership --------------------------------------------------------

    fn on_membership(&mut self, now: u64, membership: Arc<Membership>, out: &mut Vec<Action>) {
        let old = std::mem::replace(&mut self.membership, membership);
        if !self.view_settling(now) {
            self.baseline = old.clone();
        }
        self.view_changed_at = Some(now);
        let delta = self.membership.delta_since(&old);
        let strategy_changed = old.config() != self.membership.config();
        let r = self.config.replication;
        let xor = matches!(self.membership.config(), OwnershipConfig::Xor);
        // Could `delta` change the owners of a key whose owners were `owners`?
        // A leave matters only if the leaver owned it; a join (XOR) only if
        // the joiner is closer than the farthest owner.
        let may_change = |key: &ShardKey, owners: &[NodeId]| {
            strategy_changed
                || delta.removed.iter().any(|n| owners.contains(n))
                || delta.added.iter().any(|&n| !xor || XorOwnership::join_changes(key, owners, r, n))
        };

        // Subscriber side: re-assert to owners that are new for a shard.
        let mut reasserts: Vec<(ShardKey, Owners)> = Vec::new();
        for (key, shard) in self.local_shards.iter_mut() {
            if !may_change(key, &shard.owners) {
                continue;
            }
            let owners = self.membership.owners(key, r);
            let fresh: Owners = owners.iter().copied().filter(|o| !shard.owners.contains(o)).collect();
            shard.links.retain(|l| owners.contains(&l.owner));
            shard.owners = owners;
            if !fresh.is_empty() {
                reasserts.push((*key, fresh));
            }
        }
        reasserts.sort_unstable_by_key(|(k, _)| *k);
        for (key, to) in reasserts {
            self.reassert(now, key, &to, out);
        }
        // A split this node knows of in a shard it owns (and missed as an
        // owner, say while it was one of several).
        let mut known: Vec<ShardKey> = self
            .local_shards
            .iter()
            .filter(|(k, s)| s.split && s.owners.contains(&self.id) && self.owned.get(*k).is_none_or(|o| !o.split))
            .map(|(k, _)| *k)
            .collect();
        known.sort_unstable();
        for key in known {
            self.adopt_split(now, key, out);
        }
        // Shards emptied here whose only laggard was an owner that left.
        let mut settled: Vec<ShardKey> =
            self.local_shards.iter().filter(|(_, s)| s.filters.is_empty() && s.all_acked()).map(|(k, _)| *k).collect();
        settled.sort_unstable();
        for key in settled {
            self.forget_if_settled(key);
        }

        // Owner side: drop the dead, then find out what we still own.
        let mut pushes: Vec<(ShardKey, Vec<RouteChange>)> = Vec::new();
        let mut regained: Vec<ShardKey> = Vec::new();
        for (key, shard) in self.owned.iter_mut() {
            let mut changes = Vec::new();
            for &dead in &delta.removed {
                changes.extend(shard.remove_node(dead));
            }
            self.counters.entries_dropped += changes.len() as u64;
            shard.retain_watchers(|w| !delta.removed.contains(&w));
            if may_change(key, &shard.owners) {
                shard.owners = self.membership.owners(key, r);
            }
            if shard.owners.contains(&self.id) {
                if shard.release_at.take().is_some() {
                    regained.push(*key);
                }
            } else if shard.release_at.is_none() {
                let at = now + self.config.handoff_grace_ms;
                shard.release_at = Some(at);
                self.releases.insert((at, *key));
            }
            if !changes.is_empty() {
                pushes.push((*key, changes));
            }
        }
        pushes.sort_unstable_by_key(|(k, _)| *k);
        for (key, changes) in pushes {
            self.push_changes(now, key, changes, out);
        }
        // A shard owned again before its grace ended missed this node's own
        // changes meanwhile (they went to the owners of the time): its own
        // entries come from the local truth again.
        regained.sort_unstable();
        for key in regained {
            let ops = self.local_ops(&key);
            let changes = self.owned.get_mut(&key).expect("owned").assert_from(self.id, true, &ops);
            self.push_changes(now, key, changes, out);
        }

        // Publisher side: forget shards whose source died or no longer owns them.
        let mut stale: Vec<(ShardKey, NodeId, u64)> = Vec::new();
        for (key, source, req) in self.cache.sources() {
            let changed = strategy_changed || !delta.added.is_empty() || !delta.removed.is_empty();
            if delta.removed.contains(&source) || (changed && !self.owners(&key).contains(&source)) {
                stale.push((key, source, req));
            }
        }
        stale.sort_unstable();
        for (key, source, req) in stale {
            self.cache.remove(&key);
            self.counters.cache_invalidations += 1;
            if self.membership.contains(source) {
                self.send(source, Frame::Unwatch { shard: key, req }, out);
            }
        }
        // Lookups waiting on a node that died: ask someone else now.
        let mut retry: Vec<ShardKey> =
            self.cache.pending_keys().filter(|(_, p)| delta.removed.contains(&p.asked)).map(|(k, _)| *k).collect();
        retry.sort_unstable();
        for key in retry {
            self.try_next_owner(now, key, out);
        }

        if self.next_anti_entropy.is_none() && self.config.anti_entropy_interval_ms > 0 {
            // Stagger the rounds of different nodes.
            let interval = self.config.anti_entropy_interval_ms;
            self.next_anti_entropy = Some(now + 1 + StableHasher::new().u64(self.id.0).finish() % interval);
        }
        self.drop_idle_owned();
    }

    /// Forgets owned shards with no entries, no watchers and no pending release.
    fn drop_idle_owned(&mut self) {
        self.owned.retain(|_, s| !s.is_idle());
    }

    // ----- publisher side ----------------------------------------------------

    fn publish(&mut self, now: u64, topic: &str, msg: u64, out: &mut Vec<Action>) -> Result<(), CoreError> {
        if self.check_topic(topic).is_err() {
            return Err(CoreError::InvalidTopic(topic.to_string()));
        }
        self.counters.publishes += 1;
        let shards = publish_shards(topic, self.config.shard_depth);
        let tip = self.splittable_tip(topic, &shards);
        let mut keys: SmallVec<[ShardKey; 4]> = shards.into_iter().map(|(_, k)| k).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut matched = Vec::new();
        let mut missing: SmallVec<[ShardKey; 4]> = SmallVec::new();
        let mut parked_tip = None;
        for key in keys {
            match self.consult(now, &key, topic, msg, &mut matched) {
                Some(true) if tip.is_some_and(|(k, _)| k == key) => {
                    parked_tip = self.consult_children(now, tip.expect("tip"), topic, msg, &mut matched);
                    missing.extend(parked_tip.map(|(k, _)| k));
                }
                Some(_) => {}
                None => {
                    missing.push(key);
                    if tip.is_some_and(|(k, _)| k == key) {
                        parked_tip = tip;
                    }
                }
            }
        }
        if missing.is_empty() {
            self.finish(topic, msg, matched, out);
            return Ok(());
        }
        self.counters.publishes_parked += 1;
        let waiting = missing.len() as u32;
        let parked = Parked { topic: topic.into(), msg, matched, waiting, tip: parked_tip };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.parked[slot as usize] = Some(parked);
                slot
            }
            None => {
                self.parked.push(Some(parked));
                (self.parked.len() - 1) as u32
            }
        };
        for key in missing {
            self.await_lookup(now, key, slot, out);
        }
        Ok(())
    }

    /// Routes of shard `key` for a publish to `topic`, from this node's own
    /// copy or the cache, into `matched`: `Some(split)`, or `None` if the
    /// shard is not known here (a lookup is needed).
    fn consult(
        &mut self,
        now: u64,
        key: &ShardKey,
        topic: &str,
        msg: u64,
        matched: &mut Vec<(NodeId, Option<SharedPick>)>,
    ) -> Option<bool> {
        let own_copy = self.reads_own_copy(key, now);
        if let Some(shard) = self.owned.get(key).filter(|s| own_copy && s.release_at.is_none()) {
            self.counters.owned_reads += 1;
            collect(shard.routes(), topic, msg, self.id, &self.membership, matched);
            Some(shard.split)
        } else if let Some(shard) = self.cache.get(key) {
            self.counters.cache_hits += 1;
            collect(&shard.routes, topic, msg, self.id, &self.membership, matched);
            Some(shard.split)
        } else if own_copy {
            // We own it and hold nothing: nobody subscribes there.
            self.counters.owned_reads += 1;
            Some(false)
        } else {
            self.counters.cache_misses += 1;
            None
        }
    }

    /// Below split shard `parent` (of that many levels) on `topic`'s path:
    /// consults each child while the one above is split. Returns the first
    /// child not known here (to look up; it is the new tip), if any.
    fn consult_children(
        &mut self,
        now: u64,
        parent: (ShardKey, usize),
        topic: &str,
        msg: u64,
        matched: &mut Vec<(NodeId, Option<SharedPick>)>,
    ) -> Option<(ShardKey, usize)> {
        let mut depth = parent.1;
        while depth < literal_depth(topic) {
            depth += 1;
            let key = ShardKey::of_prefix(filter_prefix(topic, depth));
            match self.consult(now, &key, topic, msg, matched) {
                Some(true) => {}
                Some(false) => return None,
                None => return Some((key, depth)),
            }
        }
        None
    }

    /// Parks publish `slot` on the lookup of `key`, starting it if none is
    /// in flight.
    fn await_lookup(&mut self, now: u64, key: ShardKey, slot: u32, out: &mut Vec<Action>) {
        if let Some(pending) = self.cache.pending_mut(&key) {
            pending.waiters.push(slot);
            return;
        }
        self.next_req += 1;
        let lookup = PendingLookup {
            req: self.next_req,
            asked: self.id,
            tried: SmallVec::new(),
            deadline: now,
            waiters: smallvec::smallvec![slot],
            warming: None,
            partial: Vec::new(),
            parts: 0,
        };
        self.cache.start(key, lookup);
        self.try_next_owner(now, key, out);
    }

    /// Sends the pending lookup of `key` to an owner not yet tried, or gives
    /// up and lets its publishes go on without the shard.
    fn try_next_owner(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        let owners = self.owners(&key);
        let settling = self.view_settling(now);
        let Some(pending) = self.cache.pending_mut(&key) else { return };
        let candidates: Owners = owners.iter().copied().filter(|o| *o != self.id).collect();
        // Spread publishers over the replicas: each starts at its own offset.
        let start = if candidates.is_empty() {
            0
        } else {
            (StableHasher::new().u64(self.id.0).bytes(&key.0).finish() % candidates.len() as u64) as usize
        };
        let next = (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .find(|c| !pending.tried.contains(c));
        match next {
            Some(owner) => {
                if !pending.tried.is_empty() {
                    self.counters.lookup_retries += 1;
                }
                pending.tried.push(owner);
                pending.asked = owner;
                pending.partial.clear();
                pending.parts = 0;
                pending.deadline = now + self.config.lookup_timeout_ms;
                let req = pending.req;
                self.lookup_deadlines.insert((pending.deadline, key));
                self.counters.lookups_sent += 1;
                self.send(owner, Frame::Lookup { shard: key, req }, out);
            }
            // Every owner said "not mine" (or did not answer) moments after a
            // membership change: views are still converging (an owner that
            // has not seen the change yet). Ask them all again shortly
            // rather than route without the shard.
            None if settling && pending.warming.as_ref().is_none_or(|w| !owners.contains(&w.source)) => {
                // A new request id: an answer to the old one, still on its
                // way, must not be taken for (or unwatch) the new one.
                self.next_req += 1;
                let old_req = std::mem::replace(&mut pending.req, self.next_req);
                let stale = pending.warming.take().map(|w| w.source);
                pending.tried.clear();
                pending.asked = self.id;
                pending.partial.clear();
                pending.parts = 0;
                pending.deadline = now + LOOKUP_RETRY_MS;
                self.lookup_deadlines.insert((pending.deadline, key));
                self.counters.lookup_retries += 1;
                if let Some(source) = stale.filter(|s| self.membership.contains(*s)) {
                    self.send(source, Frame::Unwatch { shard: key, req: old_req }, out);
                }
            }
            None => {
                let pending = self.cache.take_pending(&key).expect("pending");
                match pending.warming {
                    // Only owners still warming up answered: their entries
                    // (and their watch) are the best there is, while that
                    // owner still is one.
                    Some(w) if owners.contains(&w.source) => {
                        let evicted = self.cache.insert(key, w.source, pending.req, w.version, &w.entries, w.split);
                        self.unwatch_evicted(evicted, out);
                    }
                    Some(w) => {
                        if self.membership.contains(w.source) {
                            self.send(w.source, Frame::Unwatch { shard: key, req: pending.req }, out);
                        }
                        self.counters.lookups_failed += 1;
                    }
                    None => self.counters.lookups_failed += 1,
                }
                self.resolve_waiters(now, &key, pending.waiters, out);
            }
        }
    }

    /// Matches each waiting publish against the shard now cached for `key`
    /// (if any) and finishes those that wait for nothing else.
    fn resolve_waiters(&mut self, now: u64, key: &ShardKey, waiters: SmallVec<[u32; 4]>, out: &mut Vec<Action>) {
        for slot in waiters {
            let Some(mut parked) = self.parked[slot as usize].take() else { continue };
            let mut split = false;
            if let Some(shard) = self.cache.peek(key) {
                collect(&shard.routes, &parked.topic, parked.msg, self.id, &self.membership, &mut parked.matched);
                split = shard.split;
            } else if let Some(shard) = self.owned.get(key).filter(|s| s.release_at.is_none()) {
                // No other owner answered; our own copy, warming or not.
                collect(shard.routes(), &parked.topic, parked.msg, self.id, &self.membership, &mut parked.matched);
                split = shard.split;
            }
            parked.waiting -= 1;
            if let Some(tip) = parked.tip.filter(|(k, _)| k == key) {
                parked.tip = None;
                if split {
                    let (topic, msg) = (parked.topic.clone(), parked.msg);
                    parked.tip = self.consult_children(now, tip, &topic, msg, &mut parked.matched);
                    if let Some((child, _)) = parked.tip {
                        parked.waiting += 1;
                        self.parked[slot as usize] = Some(parked);
                        self.await_lookup(now, child, slot, out);
                        continue;
                    }
                }
            }
            if parked.waiting == 0 {
                self.free_slots.push(slot);
                self.finish(&parked.topic, parked.msg, parked.matched, out);
            } else {
                self.parked[slot as usize] = Some(parked);
            }
        }
    }

    /// Emits one forward per destination node and the local delivery.
    fn finish(&mut self, topic: &str, msg: u64, mut matched: Vec<(NodeId, Option<SharedPick>)>, out: &mut Vec<Action>) {
        matched.sort_unstable();
        matched.dedup();
        let mut local = ForwardRoute::default();
        self.local.match_topic(topic, |_, _, counts| local.plain |= counts.plain > 0);
        let mut forwards = 0;
        let mut i = 0;
        while i < matched.len() {
            let node = matched[i].0;
            let mut route = ForwardRoute::default();
            while i < matched.len() && matched[i].0 == node {
                match matched[i].1.take() {
                    None => route.plain = true,
                    Some(pick) => route.shared.push(pick),
                }
                i += 1;
            }
            if node == self.id {
                // Only shared picks land here (plain local matches come from
                // the local filters, the truth); keep those still subscribed.
                for pick in route.shared {
                    if self.local.get(&pick.filter).is_some_and(|c| c.get(Some(&pick.group)) > 0) {
                        local.shared.push(pick);
                    }
                }
            } else {
                forwards += 1;
                out.push(Action::Forward { to: node, msg, route });
            }
        }
        self.counters.forwards_sent += forwards as u64;
        let delivered = !local.is_empty();
        if delivered {
            self.counters.local_deliveries += 1;
            out.push(Action::Deliver { msg, route: local });
        }
        out.push(Action::Routed { msg, forwards, local: delivered });
    }

    fn on_forwarded(&mut self, topic: &str, msg: u64, route: ForwardRoute, out: &mut Vec<Action>) {
        self.counters.forwards_received += 1;
        let mut local = ForwardRoute::default();
        if route.plain {
            self.local.match_topic(topic, |_, _, counts| local.plain |= counts.plain > 0);
        }
        for pick in route.shared {
            let member = self.local.get(&pick.filter).is_some_and(|c| c.get(Some(&pick.group)) > 0);
            if member && crate::topic::matches(&pick.filter, topic) {
                local.shared.push(pick);
            }
        }
        if local.is_empty() {
            self.counters.forwards_stale += 1;
        } else {
            self.counters.local_deliveries += 1;
            out.push(Action::Deliver { msg, route: local });
        }
    }

    // ----- checks on other nodes' input ---------------------------------------

    fn reject(&mut self, from: NodeId, reason: Rejected) -> CoreError {
        self.counters.frames_rejected[reason.index()] += 1;
        CoreError::Rejected { from, reason }
    }

    fn check_levels(&self, text: &str) -> Result<(), Rejected> {
        match self.config.topic_limits().exceeded_by(text) {
            Some(TopicLimit::Length) => Err(Rejected::TooLong),
            Some(TopicLimit::Levels) => Err(Rejected::TooDeep),
            None => Ok(()),
        }
    }

    fn check_filter(&self, filter: &str) -> Result<(), Rejected> {
        self.check_levels(filter)?;
        if !valid_topic_filter(filter) {
            return Err(Rejected::InvalidFilter);
        }
        Ok(())
    }

    fn check_topic(&self, topic: &str) -> Result<(), Rejected> {
        self.check_levels(topic)?;
        if !valid_topic_name(topic) {
            return Err(Rejected::InvalidFilter);
        }
        Ok(())
    }

    /// Filters (and groups) another node says live in shard `key`. Every
    /// filter of a shard has the same literal prefix (another prefix has
    /// another hash), so one hash per prefix seen, not one per filter.
    fn check_entries<'a>(
        &self,
        key: &ShardKey,
        entries: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<(), Rejected> {
        // The prefix (and its levels) found to name `key`.
        let mut verified: Option<(&str, usize)> = None;
        let depth = self.config.shard_depth;
        for (filter, group) in entries {
            self.check_filter(filter)?;
            if let Some(group) = group {
                check_group(group)?;
            }
            let literal = literal_depth(filter);
            let same = verified.is_some_and(|(prefix, d)| {
                (literal.min(depth)..=literal).contains(&d) && filter_prefix(filter, d) == prefix
            });
            if !same {
                let d = home_depth(filter, key, depth).ok_or(Rejected::WrongShard)?;
                verified = Some((filter_prefix(filter, d), d));
            }
        }
        Ok(())
    }

    /// Everything a frame carries, before any of it is applied: a frame is
    /// taken whole or not at all.
    fn check_frame(&self, from: NodeId, frame: &Frame) -> Result<(), Rejected> {
        if from == self.id {
            return Err(Rejected::OwnId);
        }
        let items = |n: usize| if n > MAX_FRAME_ITEMS { Err(Rejected::TooManyItems) } else { Ok(()) };
        let changes = |key: &ShardKey, changes: &[RouteChange]| {
            items(changes.len())?;
            self.check_entries(key, changes.iter().map(|c| (c.filter.as_str(), c.group.as_deref())))
        };
        match frame {
            Frame::Assert { shard, ops, .. } => {
                items(ops.len())?;
                self.check_entries(shard, ops.iter().map(|op| (op.filter.as_str(), op.group.as_deref())))
            }
            Frame::LookupReply {
                shard,
                answer: LookupAnswer::Entries(entries) | LookupAnswer::Warming(entries),
                ..
            } => changes(shard, entries),
            Frame::Delta { shard, changes: list, .. } => changes(shard, list),
            Frame::OwnDigests { items: list } => items(list.len()),
            Frame::WatchCheck { items: list } => items(list.len()),
            Frame::WatchState { items: list } => items(list.len()),
            Frame::Digest { items: list } => items(list.len()),
            Frame::NodeDigests { items: list, .. } => {
                items(list.len())?;
                if list.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return Err(Rejected::Unsorted);
                }
                Ok(())
            }
            Frame::Reassert { shards } => items(shards.len()),
            Frame::Lookup { .. }
            | Frame::LookupReply { answer: LookupAnswer::NotOwner, .. }
            | Frame::Unwatch { .. }
            | Frame::Acked { .. }
            | Frame::Released { .. } => Ok(()),
        }
    }

    fn check_forwarded(&self, from: NodeId, topic: &str, route: &ForwardRoute) -> Result<(), Rejected> {
        if from == self.id {
            return Err(Rejected::OwnId);
        }
        self.check_topic(topic)?;
        if route.shared.len() > MAX_FRAME_ITEMS {
            return Err(Rejected::TooManyItems);
        }
        for pick in &route.shared {
            self.check_filter(&pick.filter)?;
            check_group(&pick.group)?;
        }
        Ok(())
    }

    // ----- frames --------------------------------------------------------------

    fn on_frame(&mut self, now: u64, from: NodeId, frame: Frame, out: &mut Vec<Action>) {
        match frame {
            Frame::Assert { shard: key, seq, replace, ops, split, more } => {
                self.on_assert(now, from, key, Assertion { seq, replace, ops: &ops, split, more }, out)
            }
            Frame::Acked { shard: key, seq, split } => self.on_acked(now, from, key, seq, split, out),
            Frame::Lookup { shard: key, req } => {
                let owner = self.owned.get(&key).map(|s| s.release_at.is_none());
                let entries = match owner {
                    Some(true) => {
                        let shard = self.owned.get_mut(&key).expect("owned");
                        shard.watch(from, req);
                        Some(shard.entries())
                    }
                    None if self.owners(&key).contains(&self.id) => {
                        let mut shard = RouteShard::new();
                        shard.owners = self.owners(&key);
                        // Split, if this node's own filters say so.
                        shard.split = self.local_shards.get(&key).is_some_and(|s| s.split);
                        shard.split_pushed = shard.split;
                        shard.watch(from, req);
                        self.owned.insert(key, shard);
                        Some(Vec::new())
                    }
                    _ => None,
                };
                let (version, split) = self.owned.get(&key).map_or((0, false), |s| (s.version, s.split));
                let Some(entries) = entries else {
                    let answer = LookupAnswer::NotOwner;
                    let frame = Frame::LookupReply { shard: key, req, version, answer, split, part: 0, more: false };
                    self.send(from, frame, out);
                    return;
                };
                let warming = self.warming(&key, now);
                let parts = chunked(entries, change_bytes, self.config.frame_chunk_bytes);
                let last = parts.len() - 1;
                for (i, part) in parts.into_iter().enumerate() {
                    let answer = if warming { LookupAnswer::Warming(part) } else { LookupAnswer::Entries(part) };
                    let (part, more) = (i as u32, i < last);
                    self.send(from, Frame::LookupReply { shard: key, req, version, answer, split, part, more }, out);
                }
            }
            Frame::LookupReply { shard: key, req, version, answer, split, part, more } => {
                self.on_lookup_reply(now, from, key, Reply { req, version, answer, split, part, more }, out)
            }
            Frame::Unwatch { shard: key, req } => {
                if let Some(shard) = self.owned.get_mut(&key) {
                    shard.unwatch(from, req);
                    if shard.is_idle() && shard.release_at.is_none() {
                        self.owned.remove(&key);
                    }
                }
            }
            Frame::Delta { shard: key, req, version, changes, split } => {
                match self.cache.apply(&key, from, req, version, &changes, split) {
                    Applied::Yes(evicted) => self.unwatch_evicted(evicted, out),
                    Applied::Gap => {
                        // The next publish looks the shard up afresh.
                        self.counters.delta_gaps += 1;
                        self.counters.cache_invalidations += 1;
                        self.send(from, Frame::Unwatch { shard: key, req }, out);
                    }
                    // A warming owner's answer kept while the lookup goes on:
                    // it is watched already, keep it current.
                    Applied::NotCached => {
                        match self.cache.pending_mut(&key).and_then(|p| p.warming_answer(from, req)) {
                            Some(warming) if warming.version.checked_add(1) == Some(version) => {
                                warming.version = version;
                                warming.split = split;
                                apply_changes(&mut warming.entries, &changes);
                            }
                            Some(_) => {
                                self.counters.delta_gaps += 1;
                                self.cache.pending_mut(&key).expect("pending").warming = None;
                                self.send(from, Frame::Unwatch { shard: key, req }, out);
                            }
                            None => self.send(from, Frame::Unwatch { shard: key, req }, out),
                        }
                    }
                }
            }
            Frame::Released { shard: key } => {
                if self.cache.peek(&key).is_some_and(|s| s.source == from) {
                    self.cache.remove(&key);
                    self.counters.cache_invalidations += 1;
                }
            }
            Frame::Digest { items } => {
                for (key, hash) in items {
                    let mine = match self.owned.get(&key) {
                        Some(s) if s.release_at.is_none() => s.replica_digest(),
                        Some(_) => continue,
                        None if self.owners(&key).contains(&self.id) => RouteShard::new().replica_digest(),
                        None => continue,
                    };
                    let unsplit = self.owned.get(&key).is_none_or(|s| !s.split);
                    if unsplit && hash == mine ^ SPLIT_MARK {
                        // The other replica split it; this one missed that.
                        self.adopt_split(now, key, out);
                    } else if mine != hash {
                        let items = self.owned.get(&key).map(|s| s.node_digests()).unwrap_or_default();
                        self.send(from, Frame::NodeDigests { shard: key, items }, out);
                    }
                }
            }
            Frame::NodeDigests { shard: key, items } => self.on_node_digests(now, key, items, out),
            Frame::Reassert { mut shards } => {
                // One re-assertion per shard, however often it is named.
                shards.sort_unstable();
                shards.dedup();
                for key in shards {
                    let owners = self.owners(&key);
                    // Only for a shard we hold something of, or that the
                    // asker owns (a stale entry of ours to clear there).
                    if self.local_shards.contains_key(&key) || owners.contains(&from) {
                        self.reassert(now, key, &owners, out);
                    }
                }
            }
            Frame::OwnDigests { items } => {
                let mut differ = Vec::new();
                for (key, hash) in items {
                    let mine = match self.owned.get(&key) {
                        Some(s) if s.release_at.is_none() => s.node_summary(from).hash ^ split_mark(s.split),
                        Some(_) => continue,
                        None if self.owners(&key).contains(&self.id) => 0,
                        None => continue,
                    };
                    if mine != hash {
                        differ.push(key);
                    }
                }
                self.counters.repairs_requested += differ.len() as u64;
                for part in differ.chunks(WATCH_STATE_ITEMS) {
                    self.send(from, Frame::Reassert { shards: part.to_vec() }, out);
                }
            }
            Frame::WatchCheck { items } => {
                let mut differ = Vec::new();
                for (key, req, version) in items {
                    match self.owned.get(&key) {
                        Some(s) if s.watchers().contains(&(from, req)) => {
                            if s.version != version {
                                differ.push((key, req, Some(s.version)));
                            }
                        }
                        _ => differ.push((key, req, None)),
                    }
                }
                for part in differ.chunks(WATCH_STATE_ITEMS) {
                    self.send(from, Frame::WatchState { items: part.to_vec() }, out);
                }
            }
            Frame::WatchState { items } => {
                for (key, req, version) in items {
                    let Some(cached) = self.cache.peek(&key).filter(|c| c.source == from && c.req == req) else {
                        continue;
                    };
                    // Deltas sent before this answer came before it: a copy
                    // at another version missed one.
                    if version == Some(cached.version) {
                        continue;
                    }
                    self.cache.remove(&key);
                    self.counters.watch_mismatches += 1;
                    self.counters.cache_invalidations += 1;
                    if version.is_some() {
                        self.send(from, Frame::Unwatch { shard: key, req }, out);
                    }
                }
            }
        }
    }

    fn on_assert(&mut self, now: u64, from: NodeId, key: ShardKey, assertion: Assertion<'_>, out: &mut Vec<Action>) {
        let Assertion { seq, replace, ops, split, more } = assertion;
        if !self.owned.contains_key(&key) {
            if !split && !more && ops.iter().all(|op| op.count == 0) {
                // Nothing is held here for anyone: already so.
                self.send(from, Frame::Acked { shard: key, seq, split: false }, out);
                return;
            }
            let mut shard = RouteShard::new();
            shard.owners = self.owners(&key);
            if !shard.owners.contains(&self.id) {
                // The sender's view differs from ours; keep it for the grace
                // period in case ours is the stale one.
                let at = now + self.config.handoff_grace_ms;
                shard.release_at = Some(at);
                self.releases.insert((at, key));
            }
            self.owned.insert(key, shard);
        }
        let shard = self.owned.get_mut(&key).expect("present");
        let adopted = split && !shard.split;
        if adopted {
            shard.split = true;
            self.counters.splits_adopted += 1;
        }
        let order = shard.sequence(from, seq, replace);
        if order != InOrder::Next {
            // A part of a replacement may be what went missing.
            shard.cancel_replacement(from);
        }
        let changes = shard.assert_part(from, replace, more, ops);
        if order == InOrder::Next {
            shard.forget_order_if_empty(from);
        }
        // The split, if new here, goes to the watchers with these changes.
        self.push_changes(now, key, changes, out);
        if adopted {
            self.tell_subscribers_split(key, out);
        } else {
            self.maybe_split(now, key, out);
        }
        // Acknowledged once applied and pushed to the watchers.
        let split = self.owned.get(&key).is_some_and(|s| s.split);
        match order {
            InOrder::Next => self.send(from, Frame::Acked { shard: key, seq, split }, out),
            InOrder::Gap { ask } => {
                self.counters.assertion_gaps += 1;
                if ask {
                    self.send(from, Frame::Reassert { shards: vec![key] }, out);
                }
            }
        }
    }

    /// Splits owned shard `key` if it has passed `split_entries`, sits at
    /// the shard depth or deeper (not the root), and holds filters that go
    /// deeper than its prefix (otherwise a split would move nothing; it is
    /// looked at again once the shard doubles).
    fn maybe_split(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        let threshold = self.config.split_entries;
        let Some(shard) = self.owned.get_mut(&key) else { return };
        if threshold == 0
            || shard.split
            || shard.release_at.is_some()
            || shard.len() < threshold
            || shard.len() < shard.unsplittable_at.saturating_mul(2)
        {
            return;
        }
        let placed = shard_prefix(shard, &key, self.config.shard_depth);
        let deeper = |depth: usize| {
            let mut any = false;
            shard.routes().for_each_filter(|filter, _| any |= literal_depth(filter) > depth);
            any
        };
        let prefix = match placed {
            Some((prefix, depth)) if depth >= self.config.shard_depth && !prefix.is_empty() && deeper(depth) => prefix,
            _ => {
                shard.unsplittable_at = shard.len();
                return;
            }
        };
        shard.split = true;
        self.counters.splits += 1;
        // The other replicas hear of it now rather than at the next round.
        let digest = shard.replica_digest();
        let others: Owners = shard.owners.iter().copied().filter(|o| *o != self.id).collect();
        out.push(Action::Split { shard: key, prefix });
        for owner in others {
            self.send(owner, Frame::Digest { items: vec![(key, digest)] }, out);
        }
        self.push_changes(now, key, Vec::new(), out);
        self.tell_subscribers_split(key, out);
    }

    /// A replica of shard `key` is split (its digest says so): so is ours.
    fn adopt_split(&mut self, now: u64, key: ShardKey, out: &mut Vec<Action>) {
        if !self.owned.contains_key(&key) {
            let mut shard = RouteShard::new();
            shard.owners = self.owners(&key);
            self.owned.insert(key, shard);
        }
        let shard = self.owned.get_mut(&key).expect("present");
        if shard.split {
            return;
        }
        shard.split = true;
        self.counters.splits_adopted += 1;
        self.push_changes(now, key, Vec::new(), out);
        self.tell_subscribers_split(key, out);
    }

    /// Tells every node with entries in split shard `key` to move its
    /// deeper filters to the child shards: an acknowledgement of nothing
    /// (number 0) that says split.
    fn tell_subscribers_split(&mut self, key: ShardKey, out: &mut Vec<Action>) {
        let Some(shard) = self.owned.get(&key) else { return };
        let mut nodes: Vec<NodeId> = shard.subscriber_nodes().collect();
        nodes.sort_unstable();
        for node in nodes {
            if node == self.id || self.membership.contains(node) {
                self.send(node, Frame::Acked { shard: key, seq: 0, split: true }, out);
            }
        }
    }

    fn on_lookup_reply(&mut self, now: u64, from: NodeId, key: ShardKey, reply: Reply, out: &mut Vec<Action>) {
        let Reply { req, version, answer, split, part, more } = reply;
        let current = self.cache.pending(&key).is_some_and(|p| p.req == req && p.asked == from);
        // An answer in parts: the entries wait for the last one; with a part
        // missing it is no answer (a lost route frame).
        let warming_answer = matches!(answer, LookupAnswer::Warming(_));
        let answer = match answer {
            LookupAnswer::Entries(entries) | LookupAnswer::Warming(entries) if current => {
                let pending = self.cache.pending_mut(&key).expect("pending");
                let whole = pending.parts != u32::MAX && pending.parts == part;
                pending.parts = if whole { part.saturating_add(1) } else { u32::MAX };
                pending.partial.extend(entries);
                if more {
                    return;
                }
                let entries = std::mem::take(&mut pending.partial);
                pending.parts = 0;
                if !whole {
                    self.send(from, Frame::Unwatch { shard: key, req }, out);
                    LookupAnswer::NotOwner
                } else if warming_answer {
                    LookupAnswer::Warming(entries)
                } else {
                    LookupAnswer::Entries(entries)
                }
            }
            _ if more => return,
            answer => answer,
        };
        // An answer from a node our view says no longer owns the shard would
        // go stale silently (its owners assert elsewhere): ask a current owner.
        let answer = match answer {
            LookupAnswer::Entries(_) | LookupAnswer::Warming(_) if current && !self.owners(&key).contains(&from) => {
                self.send(from, Frame::Unwatch { shard: key, req }, out);
                LookupAnswer::NotOwner
            }
            answer => answer,
        };
        match answer {
            LookupAnswer::Entries(entries) if current => {
                let pending = self.cache.take_pending(&key).expect("pending");
                if let Some(warming) = pending.warming {
                    self.send(warming.source, Frame::Unwatch { shard: key, req }, out);
                }
                let evicted = self.cache.insert(key, from, req, version, &entries, split);
                self.unwatch_evicted(evicted, out);
                self.resolve_waiters(now, &key, pending.waiters, out);
            }
            LookupAnswer::Warming(entries) if current => {
                // Keep the fuller of the warming answers (and its watch) in
                // case no owner of longer standing answers; ask the next.
                let pending = self.cache.pending_mut(&key).expect("pending");
                let keep = pending.warming.as_ref().is_none_or(|kept| entries.len() > kept.entries.len());
                let dropped = if keep {
                    pending.warming.replace(Warming { source: from, version, entries, split }).map(|w| w.source)
                } else {
                    Some(from)
                };
                if let Some(node) = dropped {
                    self.send(node, Frame::Unwatch { shard: key, req }, out);
                }
                self.try_next_owner(now, key, out);
            }
            LookupAnswer::Entries(_) | LookupAnswer::Warming(_) => {
                // A late answer: it registered a watch we do not need.
                self.send(from, Frame::Unwatch { shard: key, req }, out);
            }
            LookupAnswer::NotOwner if current => self.try_next_owner(now, key, out),
            LookupAnswer::NotOwner => {}
        }
    }

    fn unwatch_evicted(&mut self, evicted: Vec<Evicted>, out: &mut Vec<Action>) {
        for (key, source, req) in evicted {
            self.counters.cache_evictions += 1;
            self.send(source, Frame::Unwatch { shard: key, req }, out);
        }
    }

    fn on_node_digests(&mut self, now: u64, key: ShardKey, theirs: Vec<(NodeId, u64)>, out: &mut Vec<Action>) {
        let mine = self.owned.get(&key).map(|s| s.node_digests()).unwrap_or_default();
        let (mut i, mut j) = (0, 0);
        let mut differ = Vec::new();
        while i < mine.len() || j < theirs.len() {
            match (mine.get(i), theirs.get(j)) {
                (Some(a), Some(b)) if a.0 == b.0 => {
                    if a.1 != b.1 {
                        differ.push(a.0);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.0 < b.0 => {
                    differ.push(a.0);
                    i += 1;
                }
                (Some(a), None) => {
                    differ.push(a.0);
                    i += 1;
                }
                (_, Some(b)) => {
                    differ.push(b.0);
                    j += 1;
                }
                (None, None) => unreachable!(),
            }
        }
        for node in differ {
            if node == self.id {
                let owners = self.owners(&key);
                self.reassert(now, key, &owners, out);
            } else if self.membership.contains(node) {
                self.counters.repairs_requested += 1;
                self.send(node, Frame::Reassert { shards: vec![key] }, out);
            } else if let Some(shard) = self.owned.get_mut(&key) {
                let changes = shard.remove_node(node);
                self.counters.entries_dropped += changes.len() as u64;
                self.push_changes(now, key, changes, out);
            }
        }
    }

    // ----- timers ----------------------------------------------------------------

    fn on_timer(&mut self, now: u64, out: &mut Vec<Action>) {
        // Lookups that timed out: ask the next owner.
        while let Some(&(at, key)) = self.lookup_deadlines.first() {
            if at > now {
                break;
            }
            self.lookup_deadlines.pop_first();
            if self.cache.pending(&key).is_some_and(|p| p.deadline == at) {
                self.try_next_owner(now, key, out);
            }
        }
        // Assertions not acknowledged in time: send them again.
        while let Some(&(at, key)) = self.assert_retries.first() {
            if at > now {
                break;
            }
            self.assert_retries.pop_first();
            if self.local_shards.get(&key).is_some_and(|s| s.retry_at == Some(at)) {
                self.retry_assertions(now, key, out);
            }
        }
        // Split shards whose moved filters may leave them now.
        while let Some(&(at, key)) = self.moves.first() {
            if at > now {
                break;
            }
            self.moves.pop_first();
            self.finish_moves(now, key, out);
        }
        // Watchers of shards pushed to a while ago: the version they should be at.
        let mut tails: BTreeMap<NodeId, Vec<(ShardKey, u64, Option<u64>)>> = BTreeMap::new();
        while let Some(&(at, key)) = self.tails.first() {
            if at > now {
                break;
            }
            self.tails.pop_first();
            let Some(shard) = self.owned.get_mut(&key).filter(|s| s.tail_at == Some(at)) else { continue };
            shard.tail_at = None;
            for &(watcher, req) in shard.watchers() {
                tails.entry(watcher).or_default().push((key, req, Some(shard.version)));
            }
        }
        for (watcher, items) in tails {
            self.send(watcher, Frame::WatchState { items }, out);
        }
        // Nodes that frames were lost to.
        while let Some(&(at, peer)) = self.resyncs.first() {
            if at > now {
                break;
            }
            self.resyncs.pop_first();
            self.resync(now, peer, out);
        }
        // Shards whose grace period ended.
        while let Some(&(at, key)) = self.releases.first() {
            if at > now {
                break;
            }
            self.releases.pop_first();
            if self.owned.get(&key).is_some_and(|s| s.release_at == Some(at)) {
                let shard = self.owned.remove(&key).expect("owned");
                self.counters.shards_released += 1;
                for &(w, _) in shard.watchers() {
                    self.send(w, Frame::Released { shard: key }, out);
                }
            }
        }
        if self.next_anti_entropy.is_some_and(|at| at <= now) {
            self.next_anti_entropy = Some(now + self.config.anti_entropy_interval_ms);
            self.anti_entropy_round(now, out);
        }
    }

    /// Sends each other owner of each shard we own our digest of it, and
    /// sweeps entries and watchers of nodes no longer live.
    fn anti_entropy_round(&mut self, now: u64, out: &mut Vec<Action>) {
        let mut digests: BTreeMap<NodeId, Vec<(ShardKey, u64)>> = BTreeMap::new();
        let mut pushes = Vec::new();
        for (key, shard) in self.owned.iter_mut() {
            if shard.release_at.is_some() {
                continue;
            }
            shard.retain_watchers(|w| self.membership.contains(w));
            let mut dead: Vec<NodeId> = shard.subscriber_nodes().filter(|n| !self.membership.contains(*n)).collect();
            dead.sort_unstable();
            let mut changes = Vec::new();
            for node in dead {
                changes.extend(shard.remove_node(node));
            }
            if !changes.is_empty() {
                self.counters.entries_dropped += changes.len() as u64;
                pushes.push((*key, changes));
            }
            for &peer in &shard.owners {
                if peer != self.id {
                    digests.entry(peer).or_default().push((*key, shard.replica_digest()));
                }
            }
        }
        pushes.sort_unstable_by_key(|(k, _)| *k);
        for (key, changes) in pushes {
            self.push_changes(now, key, changes, out);
        }
        for (peer, mut items) in digests {
            items.sort_unstable();
            for part in items.chunks(WATCH_STATE_ITEMS) {
                self.send(peer, Frame::Digest { items: part.to_vec() }, out);
            }
        }
        self.drop_idle_owned();
        self.check_own_entries(out);
        self.check_watches(out);
    }

    /// Subscriber side of anti-entropy: sends each owner the hash of this
    /// node's own entries in each shard it owns (the truth against its
    /// copy). Only shards with every change acknowledged: one in flight
    /// would differ for no fault.
    fn check_own_entries(&mut self, out: &mut Vec<Action>) {
        let mut per_owner: BTreeMap<NodeId, Vec<(ShardKey, u64)>> = BTreeMap::new();
        for (key, shard) in &self.local_shards {
            if !shard.all_acked() {
                continue;
            }
            let digest = self.own_digest(key);
            for &owner in shard.owners.iter().filter(|o| **o != self.id) {
                per_owner.entry(owner).or_default().push((*key, digest));
            }
        }
        for (owner, mut items) in per_owner {
            items.sort_unstable();
            for part in items.chunks(WATCH_STATE_ITEMS) {
                self.send(owner, Frame::OwnDigests { items: part.to_vec() }, out);
            }
        }
    }

    /// Publisher side of anti-entropy: asks each owner it caches shards
    /// from whether its copies are current (a last delta can go missing
    /// with no later one to show the gap; a watch can be lost).
    fn check_watches(&mut self, out: &mut Vec<Action>) {
        let mut per_source: BTreeMap<NodeId, Vec<(ShardKey, u64, u64)>> = BTreeMap::new();
        for (key, source, req) in self.cache.sources() {
            if self.membership.contains(source) {
                let version = self.cache.peek(&key).map_or(0, |c| c.version);
                per_source.entry(source).or_default().push((key, req, version));
            }
        }
        for (source, mut items) in per_source {
            items.sort_unstable();
            for part in items.chunks(WATCH_STATE_ITEMS) {
                self.send(source, Frame::WatchCheck { items: part.to_vec() }, out);
            }
        }
    }

    /// Schedules the resync of `to` ([`Event::FramesLost`]) unless one is
    /// due already.
    fn on_frames_lost(&mut self, now: u64, to: NodeId) {
        if to == self.id || !self.membership.contains(to) || self.resyncs.iter().any(|(_, n)| *n == to) {
            return;
        }
        let wait = self.resync_waits.get(&to).copied().unwrap_or(self.config.assert_retry_ms);
        self.resyncs.insert((now + wait, to));
    }

    /// Brings `peer` up to date after frames to it were lost: the version
    /// of each shard it watches here, and this node's unacknowledged
    /// assertions to it again.
    fn resync(&mut self, now: u64, peer: NodeId, out: &mut Vec<Action>) {
        if !self.membership.contains(peer) {
            return;
        }
        self.counters.resyncs += 1;
        // Should these frames be lost too (the link is still down), the next
        // resync waits longer.
        let wait = self.resync_waits.get(&peer).copied().unwrap_or(self.config.assert_retry_ms);
        self.resync_waits.insert(peer, (wait * 2).clamp(1, MAX_RESYNC_MS));
        let mut versions: Vec<(ShardKey, u64, Option<u64>)> = Vec::new();
        for (key, shard) in &self.owned {
            let watches = shard.watchers().iter().filter(|(w, _)| *w == peer);
            versions.extend(watches.map(|&(_, req)| (*key, req, Some(shard.version))));
        }
        versions.sort_unstable();
        for items in versions.chunks(WATCH_STATE_ITEMS) {
            self.send(peer, Frame::WatchState { items: items.to_vec() }, out);
        }
        let mut unacked: Vec<ShardKey> = self
            .local_shards
            .iter()
            .filter(|(_, s)| s.owners.contains(&peer) && s.link(peer).is_some_and(|l| !l.unacked.is_empty()))
            .map(|(k, _)| *k)
            .collect();
        unacked.sort_unstable();
        self.counters.assertions_retried += unacked.len() as u64;
        for key in unacked {
            self.reassert(now, key, &[peer], out);
        }
    }

    /// Pushes owner-side changes of shard `key` to its watchers.
    /// A delta can be lost with no later one to show the gap: a while after
    /// the last push, the watchers are told the version they should be at
    /// (the tail; [`Frame::WatchState`]), and drop a copy that is not.
    /// A split not yet told goes with them (alone, if there are none).
    fn push_changes(&mut self, now: u64, key: ShardKey, changes: Vec<RouteChange>, out: &mut Vec<Action>) {
        let Some(shard) = self.owned.get_mut(&key) else { return };
        if changes.is_empty() && shard.split == shard.split_pushed {
            return;
        }
        shard.split_pushed = shard.split;
        let split = shard.split;
        // Too many for one frame: one delta per part, each the next version.
        let parts = chunked(changes, change_bytes, self.config.frame_chunk_bytes);
        let first = shard.version + 1;
        shard.version += parts.len() as u64;
        let watchers = shard.watchers().to_vec();
        if !watchers.is_empty() && shard.tail_at.is_none() {
            let at = now + self.config.assert_retry_ms;
            shard.tail_at = Some(at);
            self.tails.insert((at, key));
        }
        for (i, changes) in parts.into_iter().enumerate() {
            let version = first + i as u64;
            for &(w, req) in &watchers {
                self.send(w, Frame::Delta { shard: key, req, version, changes: changes.clone(), split }, out);
            }
        }
    }
}

/// One numbered assertion, as [`Frame::Assert`] carries it.
struct Assertion<'a> {
    seq: u64,
    replace: bool,
    ops: &'a [RouteOp],
    split: bool,
    more: bool,
}

/// A lookup answer, as [`Frame::LookupReply`] carries it.
struct Reply {
    req: u64,
    version: u64,
    answer: LookupAnswer,
    split: bool,
    part: u32,
    more: bool,
}

/// Splits `items` into runs of at most `limit` bytes (as `size` counts
/// them; a larger item has a run of its own), in order: at least one run.
fn chunked<T>(items: Vec<T>, size: impl Fn(&T) -> usize, limit: usize) -> Vec<Vec<T>> {
    let mut runs = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        let run = runs.last_mut().expect("a run");
        if bytes + n > limit && !run.is_empty() {
            runs.push(Vec::new());
            bytes = 0;
        }
        bytes += n;
        runs.last_mut().expect("a run").push(item);
    }
    runs
}

/// About what a [`RouteOp`] takes in a frame.
fn op_bytes(op: &RouteOp) -> usize {
    op.filter.len() + op.group.as_ref().map_or(0, String::len) + 12
}

/// About what a [`RouteChange`] takes in a frame.
fn change_bytes(change: &RouteChange) -> usize {
    change.filter.len() + change.group.as_ref().map_or(0, String::len) + 24
}

/// What a split flag adds to a digest.
fn split_mark(split: bool) -> u64 {
    if split {
        SPLIT_MARK
    } else {
        0
    }
}

/// The literal prefix of owned shard `key` and its levels, found from one
/// of its filters (every filter of a shard starts with its prefix);
/// `None` for a shard with no filter.
fn shard_prefix(shard: &RouteShard, key: &ShardKey, shard_depth: usize) -> Option<(String, usize)> {
    let mut found = None;
    shard.routes().for_each_filter(|filter, _| {
        if found.is_none() {
            found = home_depth(filter, key, shard_depth).map(|d| (filter_prefix(filter, d).to_string(), d));
        }
    });
    found
}

/// The levels of `filter`'s literal prefix that name shard `key`, if `key`
/// is one of the shards the filter may live in: the shard of its literal
/// prefix at the shard depth, or one deeper (after splits), down to its
/// whole literal prefix.
fn home_depth(filter: &str, key: &ShardKey, shard_depth: usize) -> Option<usize> {
    let literal = literal_depth(filter);
    (literal.min(shard_depth)..=literal).find(|&d| ShardKey::of_prefix(filter_prefix(filter, d)) == *key)
}

/// A shared-subscription group name: non-empty, at most 65,535 bytes, no
/// `/`, `+`, `#` or NUL (MQTT 5 4.8.2).
fn check_group(group: &str) -> Result<(), Rejected> {
    if group.len() > MAX_TOPIC_LEN {
        return Err(Rejected::TooLong);
    }
    if !valid_share_group(group) {
        return Err(Rejected::InvalidGroup);
    }
    Ok(())
}

/// Adds to `matched` the destinations `routes` gives for `topic`: every live
/// node with a non-shared match (other than `me`: local matches come from
/// the local filters), and one node per matching shared group.
/// Applies pushed changes to a list of entries (count 0 removes one).
fn apply_changes(entries: &mut Vec<RouteChange>, changes: &[RouteChange]) {
    for change in changes {
        let same = |e: &RouteChange| e.filter == change.filter && e.group == change.group && e.node == change.node;
        entries.retain(|e| !same(e));
        if change.count > 0 {
            entries.push(change.clone());
        }
    }
}

fn collect(
    routes: &FilterTrie<FilterRoutes>,
    topic: &str,
    msg: u64,
    me: NodeId,
    membership: &Membership,
    matched: &mut Vec<(NodeId, Option<SharedPick>)>,
) {
    routes.match_topic(topic, |levels, hash, filter_routes| {
        for &(node, _) in &filter_routes.nodes {
            if node != me && membership.contains(node) {
                matched.push((node, None));
            }
        }
        if filter_routes.groups.is_empty() {
            return;
        }
        let filter = join_filter(levels, hash);
        for (group, counts) in &filter_routes.groups {
            let h = StableHasher::new().u64(msg).bytes(group.as_bytes()).bytes(filter.as_bytes()).finish();
            if let Some(pick) = pick_by_members(counts, h, |n| n == me || membership.contains(n)) {
                matched.push((pick, Some(SharedPick { group: group.to_string(), filter: filter.clone() })));
            }
        }
    });
}

/// One node of a shared group for a message whose hash is `h`, with a
/// chance in proportion to the members it holds (its count): messages are
/// spread over the group's members, not its nodes. Only nodes `live` says
/// are live; `None` if there is none.
fn pick_by_members(counts: &[(NodeId, u32)], h: u64, live: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    let weight = |count: u32| u64::from(count.max(1));
    let total: u64 = counts.iter().filter(|&&(n, _)| live(n)).map(|&(_, c)| weight(c)).sum();
    if total == 0 {
        return None;
    }
    let mut at = h % total;
    for &(node, count) in counts.iter().filter(|&&(n, _)| live(n)) {
        if at < weight(count) {
            return Some(node);
        }
        at -= weight(count);
    }
    None
}

#[cfg(test)]
mod tests {
    //! Checks on other nodes' input: each reason, and that nothing of a
    //! rejected frame is applied; the shared group pick.
    use super::*;

    const ME: NodeId = NodeId(1);
    const PEER: NodeId = NodeId(2);

    #[test]
    fn shared_messages_are_spread_by_members_not_nodes() {
        // Three members on node 7, one on node 8; node 9 is not live.
        let counts = [(NodeId(7), 3), (NodeId(8), 1), (NodeId(9), 5)];
        let live = |n: NodeId| n != NodeId(9);
        let mut per_node = std::collections::HashMap::new();
        for msg in 0..4_000u64 {
            let h = StableHasher::new().u64(msg).bytes(b"g").bytes(b"a/+").finish();
            *per_node.entry(pick_by_members(&counts, h, live).unwrap()).or_insert(0) += 1;
        }
        let (seven, eight) = (per_node[&NodeId(7)], per_node[&NodeId(8)]);
        assert_eq!(seven + eight, 4_000, "never the node that is not live: {per_node:?}");
        assert!((2_800..=3_200).contains(&seven), "node 7 holds 3 of 4 members: {per_node:?}");
        assert_eq!(pick_by_members(&counts, 1, |_| false), None);
    }

    fn node() -> Node {
        let mut node = Node::new(ME, RoutingConfig::default());
        let view = Arc::new(Membership::new(1, [ME, PEER], OwnershipConfig::Xor));
        node.handle(0, Event::Membership(view), &mut Vec::new()).unwrap();
        node
    }

    fn assert_frame(filter: &str, group: Option<&str>, shard: ShardKey) -> Frame {
        let op = RouteOp { filter: filter.into(), group: group.map(Into::into), count: 1 };
        Frame::Assert { shard, seq: 1, replace: false, ops: vec![op], split: false, more: false }
    }

    fn shard(filter: &str) -> ShardKey {
        crate::shard::filter_shard(filter, DEFAULT_SHARD_DEPTH)
    }

    /// Feeds `frame` from PEER; returns the rejection, if any, after
    /// checking that a rejected frame left no entry and sent nothing.
    fn feed(node: &mut Node, from: NodeId, frame: Frame) -> Option<Rejected> {
        let before = node.entries_held();
        let rejected: u64 = node.counters().frames_rejected.iter().sum();
        let mut out = Vec::new();
        match node.handle(10, Event::Frame { from, frame }, &mut out) {
            Ok(()) => None,
            Err(CoreError::Rejected { from: f, reason }) => {
                assert_eq!(f, from);
                assert_eq!(node.entries_held(), before, "a rejected frame changed the table");
                assert!(!out.iter().any(|a| matches!(a, Action::Send { .. })), "a rejected frame was answered");
                assert_eq!(node.counters().frames_rejected.iter().sum::<u64>(), rejected + 1);
                assert!(node.counters().rejected(reason) >= 1);
                Some(reason)
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_publish_stays_here_only_when_no_other_node_matches() {
        let mut n = node();
        let now = 1_000_000;
        n.handle(now, Event::Subscribe { filter: "mine/x", group: None }, &mut Vec::new()).unwrap();
        assert!(n.stays_here("mine/x", now));
        assert!(n.stays_here("nobody/x", now), "no subscriber anywhere");
        assert!(!n.stays_here("bad/+", now), "not a topic name");
        assert_eq!(feed(&mut n, PEER, assert_frame("mine/+", None, shard("mine/+"))), None);
        assert!(!n.stays_here("mine/x", now), "PEER subscribes too");
        assert_eq!(feed(&mut n, PEER, assert_frame("other/#", Some("g"), shard("other/#"))), None);
        assert!(!n.stays_here("other/y", now), "a shared group member on PEER");
        // Asked, the core changed nothing: the same publish routes as before.
        let mut out = Vec::new();
        n.handle(now, Event::Publish { topic: "mine/x", msg: 1 }, &mut out).unwrap();
        assert!(out.iter().any(|a| matches!(a, Action::Forward { to, .. } if *to == PEER)));
    }

    /// ME and PEER, one owner per shard; a filter of a shard `owner` owns.
    fn sole_owners() -> (Node, impl Fn(NodeId) -> String) {
        let config = RoutingConfig { replication: 1, ..RoutingConfig::default() };
        let mut node = Node::new(ME, config);
        let view = Arc::new(Membership::new(1, [ME, PEER], OwnershipConfig::Xor));
        node.handle(0, Event::Membership(view.clone()), &mut Vec::new()).unwrap();
        let filter_of = move |owner: NodeId| {
            (0..).map(|i| format!("t{i}/x")).find(|f| view.owners(&shard(f), 1).as_slice() == [owner]).unwrap()
        };
        (node, filter_of)
    }

    fn sent_to(out: &[Action], to: NodeId) -> Vec<&Frame> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send { to: t, frame } if *t == to => Some(frame),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_that_route_frames_were_lost_to_is_brought_up_to_date() {
        let (mut n, filter_of) = sole_owners();
        let (mine, theirs) = (filter_of(ME), filter_of(PEER));
        let retry = n.config().assert_retry_ms;
        // PEER watches a shard ME owns; ME subscribes to one PEER owns.
        let mut t = 10_000;
        let mut out = Vec::new();
        n.handle(t, Event::Frame { from: PEER, frame: Frame::Lookup { shard: shard(&mine), req: 7 } }, &mut out)
            .unwrap();
        n.handle(t, Event::Subscribe { filter: &theirs, group: None }, &mut out).unwrap();
        // A change PEER misses: the delta, and a retry later the tail.
        n.handle(t, Event::Subscribe { filter: &mine, group: None }, &mut out).unwrap();
        assert!(sent_to(&out, PEER).iter().any(|f| matches!(f, Frame::Delta { .. })));
        t += retry;
        out.clear();
        n.handle(t, Event::Timer, &mut out).unwrap();
        let tail = sent_to(&out, PEER).iter().any(|f| matches!(f, Frame::WatchState { .. }));
        assert!(tail, "the tail: {out:?}");
        // Both lost; so is every frame sent while the link is down. One
        // resync however many losses are reported before it is due.
        n.handle(t, Event::FramesLost { to: PEER }, &mut Vec::new()).unwrap();
        n.handle(t + 10, Event::FramesLost { to: PEER }, &mut Vec::new()).unwrap();
        out.clear();
        n.handle(t + retry - 1, Event::Timer, &mut out).unwrap();
        assert!(sent_to(&out, PEER).is_empty(), "not before the resync: {out:?}");
        out.clear();
        n.handle(t + retry, Event::Timer, &mut out).unwrap();
        let frames = sent_to(&out, PEER);
        let version = n.owned_shard(&shard(&mine)).unwrap().version;
        let told = frames.iter().any(
            |f| matches!(f, Frame::WatchState { items } if items.as_slice() == [(shard(&mine), 7, Some(version))]),
        );
        assert!(told, "PEER hears the version of the shard it watches: {frames:?}");
        let asserted = frames
            .iter()
            .any(|f| matches!(f, Frame::Assert { shard: k, replace: true, ops, .. } if *k == shard(&theirs) && ops.len() == 1));
        assert!(asserted, "the unacknowledged assertion goes again: {frames:?}");
        assert_eq!(n.counters().resyncs, 1);
        out.clear();
        n.handle(t + 2 * retry, Event::Timer, &mut out).unwrap();
        assert!(!sent_to(&out, PEER).iter().any(|f| matches!(f, Frame::WatchState { .. })), "once: {out:?}");
        // Lost again with no word from PEER: the next resync waits twice as
        // long; a frame from PEER brings the wait back.
        t += 2 * retry;
        n.handle(t, Event::FramesLost { to: PEER }, &mut Vec::new()).unwrap();
        assert_eq!(n.resyncs.first(), Some(&(t + 2 * retry, PEER)));
        n.handle(t + 2 * retry, Event::Timer, &mut Vec::new()).unwrap();
        let ack = Frame::LookupReply {
            shard: shard(&theirs),
            req: 99,
            version: 0,
            answer: LookupAnswer::NotOwner,
            split: false,
            part: 0,
            more: false,
        };
        n.handle(t + 2 * retry, Event::Frame { from: PEER, frame: ack }, &mut Vec::new()).unwrap();
        n.handle(t + 2 * retry, Event::FramesLost { to: PEER }, &mut Vec::new()).unwrap();
        assert_eq!(n.resyncs.first(), Some(&(t + 3 * retry, PEER)));
        // A node that is not a member is not resynced.
        n.handle(t, Event::FramesLost { to: NodeId(99) }, &mut Vec::new()).unwrap();
        assert!(n.resyncs.iter().all(|(_, node)| *node == PEER));
    }

    #[test]
    fn a_valid_assert_is_applied() {
        let mut n = node();
        assert_eq!(feed(&mut n, PEER, assert_frame("a/b/c", None, shard("a/b/c"))), None);
        assert_eq!(n.entries_held(), 1);
        assert_eq!(feed(&mut n, PEER, assert_frame("a/b/+", Some("g"), shard("a/b/+"))), None);
        assert_eq!(n.entries_held(), 2);
    }

    #[test]
    fn invalid_filters_are_rejected() {
        for bad in ["", "a/#/b", "a+/b", "a/b#", "a\0b"] {
            let mut n = node();
            assert_eq!(
                feed(&mut n, PEER, assert_frame(bad, None, shard(bad))),
                Some(Rejected::InvalidFilter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_filter_in_another_shard_is_rejected() {
        let mut n = node();
        assert_eq!(feed(&mut n, PEER, assert_frame("a/b/c", None, shard("x/y"))), Some(Rejected::WrongShard));
        // One bad op spoils the whole frame: nothing of it is applied.
        let ops = vec![
            RouteOp { filter: "a/b/c".into(), group: None, count: 1 },
            RouteOp { filter: "x/y".into(), group: None, count: 1 },
        ];
        let mut n = node();
        let frame = Frame::Assert { shard: shard("a/b/c"), seq: 1, replace: true, ops, split: false, more: false };
        assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::WrongShard));
        assert_eq!(n.entries_held(), 0);
    }

    #[test]
    fn over_deep_and_over_long_filters_are_rejected() {
        let mut n = node();
        let deep = vec!["l"; DEFAULT_MAX_TOPIC_LEVELS + 1].join("/");
        assert_eq!(feed(&mut n, PEER, assert_frame(&deep, None, shard(&deep))), Some(Rejected::TooDeep));
        let just = vec!["l"; DEFAULT_MAX_TOPIC_LEVELS].join("/");
        assert_eq!(feed(&mut n, PEER, assert_frame(&just, None, shard(&just))), None);
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(feed(&mut n, PEER, assert_frame(&long, None, shard(&long))), Some(Rejected::TooLong));
        // The limit is the node's own setting.
        let mut strict = Node::new(ME, RoutingConfig { max_topic_levels: 2, ..RoutingConfig::default() });
        let view = Arc::new(Membership::new(1, [ME, PEER], OwnershipConfig::Xor));
        strict.handle(0, Event::Membership(view), &mut Vec::new()).unwrap();
        assert_eq!(feed(&mut strict, PEER, assert_frame("a/b/c", None, shard("a/b/c"))), Some(Rejected::TooDeep));
        // Local subscriptions obey the same limit (owners would refuse them).
        let err = strict.handle(1, Event::Subscribe { filter: "a/b/c", group: None }, &mut Vec::new());
        assert!(matches!(err, Err(CoreError::InvalidFilter(_))));
    }

    #[test]
    fn invalid_groups_are_rejected() {
        for bad in ["", "g/h", "g+", "#", "g\0"] {
            let mut n = node();
            let frame = assert_frame("a/b", Some(bad), shard("a/b"));
            assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::InvalidGroup), "{bad:?}");
        }
    }

    #[test]
    fn deltas_and_lookup_answers_are_checked_too() {
        let mut n = node();
        let bad = RouteChange { filter: "a/b".into(), group: None, node: PEER, count: 1 };
        let frame = Frame::Delta { shard: shard("q/r"), req: 1, version: 1, changes: vec![bad.clone()], split: false };
        assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::WrongShard));
        let frame = Frame::LookupReply {
            shard: shard("q/r"),
            req: 1,
            version: 0,
            answer: LookupAnswer::Warming(vec![bad]),
            split: false,
            part: 0,
            more: false,
        };
        assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::WrongShard));
        assert_eq!(n.cache().entries(), 0);
    }

    #[test]
    fn item_counts_order_and_sender_ids_are_checked() {
        let mut n = node();
        let frame = Frame::Reassert { shards: vec![shard("a"); MAX_FRAME_ITEMS + 1] };
        assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::TooManyItems));
        let frame = Frame::NodeDigests { shard: shard("a"), items: vec![(NodeId(5), 1), (NodeId(3), 2)] };
        assert_eq!(feed(&mut n, PEER, frame), Some(Rejected::Unsorted));
        assert_eq!(feed(&mut n, ME, assert_frame("a", None, shard("a"))), Some(Rejected::OwnId));
    }

    #[test]
    fn a_reassert_naming_a_shard_many_times_reasserts_it_once() {
        let mut n = node();
        n.handle(1, Event::Subscribe { filter: "a/b", group: None }, &mut Vec::new()).unwrap();
        let mut out = Vec::new();
        let frame = Frame::Reassert { shards: vec![shard("a/b"); 1000] };
        n.handle(2, Event::Frame { from: PEER, frame }, &mut out).unwrap();
        let sends = out.iter().filter(|a| matches!(a, Action::Send { .. })).count();
        assert_eq!(sends, 1, "one re-assertion to the one other owner");
    }

    #[test]
    fn forwards_with_bad_topics_or_picks_are_rejected() {
        let mut n = node();
        let deep = vec!["t"; DEFAULT_MAX_TOPIC_LEVELS + 1].join("/");
        for (topic, route, reason) in [
            ("a/+", ForwardRoute::plain(), Rejected::InvalidFilter),
            (deep.as_str(), ForwardRoute::plain(), Rejected::TooDeep),
            (
                "a/b",
                ForwardRoute {
                    shared: vec![SharedPick { group: "g/x".into(), filter: "a/+".into() }],
                    ..ForwardRoute::default()
                },
                Rejected::InvalidGroup,
            ),
        ] {
            let mut out = Vec::new();
            let got = n.handle(3, Event::Forwarded { from: PEER, topic, msg: 1, route }, &mut out);
            assert_eq!(got, Err(CoreError::Rejected { from: PEER, reason }));
            assert!(out.iter().all(|a| !matches!(a, Action::Deliver { .. })));
        }
    }
}
