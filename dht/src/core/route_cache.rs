//! Publisher side: the route cache.
//!
//! Per shard key, either the shard's entries as one owner sent them (that
//! owner, the *source*, pushes deltas to us as a watcher) or a pending lookup
//! that publishes wait on (single flight: one request per shard however many
//! publishes want it). Bounded by entries, least recently used shard out
//! first; the caller unregisters the evicted shard's watch.
//!
//! Boundary: bookkeeping only. Choosing which owner to ask, timeouts and
//! frames belong to the [`Node`](super::node::Node).

use super::filter_trie::FilterTrie;
use super::frame::RouteChange;
use super::id::{FastMap, NodeId};
use super::route_shard::FilterRoutes;
use crate::shard::ShardKey;
use smallvec::SmallVec;
use std::collections::BTreeMap;

/// A shard dropped from the cache: (key, source, watch request).
pub type Evicted = (ShardKey, NodeId, u64);

/// A cached shard.
#[derive(Clone, Debug)]
pub struct CachedShard {
    pub routes: FilterTrie<FilterRoutes>,
    /// The owner that answered and pushes deltas.
    pub source: NodeId,
    /// The lookup that registered our watch at `source`.
    pub req: u64,
    /// The source's version of the shard this copy is at: its lookup
    /// answer's, then each delta's.
    pub version: u64,
    /// The shard is split: a publish also consults the child on its path.
    pub split: bool,
    entries: usize,
    last_used: u64,
}

impl CachedShard {
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Cache weight: an empty shard still costs a slot.
    fn weight(&self) -> usize {
        self.entries.max(1)
    }

    fn apply(&mut self, change: &RouteChange) {
        let before = if change.count == 0 {
            let Some(routes) = self.routes.get_mut(&change.filter) else { return };
            let before = routes.set(change.group.as_deref(), change.node, 0);
            if routes.is_empty() {
                self.routes.remove(&change.filter);
            }
            before
        } else {
            self.routes.get_or_insert_with(&change.filter, FilterRoutes::default).set(
                change.group.as_deref(),
                change.node,
                change.count,
            )
        };
        match (before == 0, change.count == 0) {
            (true, false) => self.entries += 1,
            (false, true) => self.entries -= 1,
            _ => {}
        }
    }
}

/// A lookup in flight, and the parked publishes waiting on it.
#[derive(Clone, Debug)]
pub struct PendingLookup {
    pub req: u64,
    /// The owner asked last.
    pub asked: NodeId,
    /// Owners asked so far (the next try asks another).
    pub tried: SmallVec<[NodeId; 4]>,
    pub deadline: u64,
    /// Opaque ids of the parked publishes (the node's parking slots).
    pub waiters: SmallVec<[u32; 4]>,
    /// The best answer so far from an owner still warming up (it watches
    /// the shard for us): used if no owner of longer standing answers.
    pub warming: Option<Warming>,
    /// The entries of the asked owner's answer so far, while it comes in
    /// parts (`LookupReply { more: true }`).
    pub partial: Vec<RouteChange>,
    /// Parts of it received in order (`u32::MAX`: one went missing).
    pub parts: u32,
}

/// An answer from an owner still warming up, kept current by its deltas.
#[derive(Clone, Debug)]
pub struct Warming {
    pub source: NodeId,
    /// The owner's version of the entries (see [`CachedShard::version`]).
    pub version: u64,
    pub entries: Vec<RouteChange>,
    pub split: bool,
}

impl PendingLookup {
    /// The kept warming answer, if `from` gave it to request `req`.
    pub fn warming_answer(&mut self, from: NodeId, req: u64) -> Option<&mut Warming> {
        match &mut self.warming {
            Some(warming) if self.req == req && warming.source == from => Some(warming),
            _ => None,
        }
    }
}

/// What became of a pushed delta ([`RouteCache::apply`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; these shards were evicted to make room.
    Yes(Vec<Evicted>),
    /// The cached copy is not at the version before the delta (one went
    /// missing): it was dropped; look the shard up again.
    Gap,
    /// Not cached from that owner under that lookup.
    NotCached,
}

/// A bounded route cache with single-flight misses.
#[derive(Clone, Debug)]
pub struct RouteCache {
    ready: FastMap<ShardKey, CachedShard>,
    pending: FastMap<ShardKey, PendingLookup>,
    lru: BTreeMap<u64, ShardKey>,
    tick: u64,
    weight: usize,
    capacity: usize,
}

impl RouteCache {
    /// A cache holding about `capacity` entries (the most recent shard is
    /// kept even if it alone is larger).
    pub fn new(capacity: usize) -> RouteCache {
        RouteCache {
            ready: FastMap::default(),
            pending: FastMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            weight: 0,
            capacity: capacity.max(1),
        }
    }

    /// Cached shards.
    pub fn shards(&self) -> usize {
        self.ready.len()
    }

    /// Cached entries.
    pub fn entries(&self) -> usize {
        self.ready.values().map(|s| s.entries).sum()
    }

    pub fn contains(&self, key: &ShardKey) -> bool {
        self.ready.contains_key(key)
    }

    /// The cached shard, marked as recently used.
    pub fn get(&mut self, key: &ShardKey) -> Option<&CachedShard> {
        let shard = self.ready.get_mut(key)?;
        self.lru.remove(&shard.last_used);
        self.tick += 1;
        shard.last_used = self.tick;
        self.lru.insert(self.tick, *key);
        Some(shard)
    }

    /// The cached shard, without touching recency.
    pub fn peek(&self, key: &ShardKey) -> Option<&CachedShard> {
        self.ready.get(key)
    }

    pub fn pending(&self, key: &ShardKey) -> Option<&PendingLookup> {
        self.pending.get(key)
    }

    pub fn pending_mut(&mut self, key: &ShardKey) -> Option<&mut PendingLookup> {
        self.pending.get_mut(key)
    }

    pub fn pending_keys(&self) -> impl Iterator<Item = (&ShardKey, &PendingLookup)> {
        self.pending.iter()
    }

    pub fn start(&mut self, key: ShardKey, lookup: PendingLookup) {
        self.pending.insert(key, lookup);
    }

    pub fn take_pending(&mut self, key: &ShardKey) -> Option<PendingLookup> {
        self.pending.remove(key)
    }

    /// Caches the answer to lookup `req` from `source`. Returns the shards
    /// evicted to make room, as (key, source, req), to unwatch.
    pub fn insert(
        &mut self,
        key: ShardKey,
        source: NodeId,
        req: u64,
        version: u64,
        entries: &[RouteChange],
        split: bool,
    ) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&key) {
            evicted.push((key, old.source, old.req));
        }
        let mut shard =
            CachedShard { routes: FilterTrie::new(), source, req, version, split, entries: 0, last_used: 0 };
        for change in entries.iter().filter(|c| c.count > 0) {
            shard.apply(change);
        }
        self.tick += 1;
        shard.last_used = self.tick;
        self.lru.insert(self.tick, key);
        self.weight += shard.weight();
        self.ready.insert(key, shard);
        self.evict_beyond_capacity(&key, &mut evicted);
        evicted
    }

    /// Applies a delta pushed by `from` for our lookup `req` that makes the
    /// source's copy `version`: [`Applied::NotCached`] if we do not cache the
    /// shard from that watch (the caller should unwatch), [`Applied::Gap`]
    /// (the copy is dropped) if a delta before it went missing. `split` is
    /// the shard's split flag as of `version`.
    pub fn apply(
        &mut self,
        key: &ShardKey,
        from: NodeId,
        req: u64,
        version: u64,
        changes: &[RouteChange],
        split: bool,
    ) -> Applied {
        let Some(shard) = self.ready.get_mut(key).filter(|s| s.source == from && s.req == req) else {
            return Applied::NotCached;
        };
        if shard.version.checked_add(1) != Some(version) {
            self.remove(key);
            return Applied::Gap;
        }
        shard.version = version;
        shard.split = split;
        let before = shard.weight();
        for change in changes {
            shard.apply(change);
        }
        self.weight = self.weight + shard.weight() - before;
        let mut evicted = Vec::new();
        self.evict_beyond_capacity(key, &mut evicted);
        Applied::Yes(evicted)
    }

    pub fn remove(&mut self, key: &ShardKey) -> Option<CachedShard> {
        let shard = self.ready.remove(key)?;
        self.lru.remove(&shard.last_used);
        self.weight -= shard.weight();
        Some(shard)
    }

    /// Keys, sources and watch requests of the cached shards.
    pub fn sources(&self) -> impl Iterator<Item = Evicted> + '_ {
        self.ready.iter().map(|(k, s)| (*k, s.source, s.req))
    }

    fn evict_beyond_capacity(&mut self, keep: &ShardKey, evicted: &mut Vec<Evicted>) {
        while self.weight > self.capacity {
            let Some((&tick, &key)) = self.lru.iter().find(|(_, k)| *k != keep) else { break };
            self.lru.remove(&tick);
            let shard = self.ready.remove(&key).expect("lru and map agree");
            self.weight -= shard.weight();
            evicted.push((key, shard.source, shard.req));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(filter: &str, node: u64, count: u32) -> RouteChange {
        RouteChange { filter: filter.into(), group: None, node: NodeId(node), count }
    }

    #[test]
    fn deltas_apply_only_from_the_source() {
        let mut cache = RouteCache::new(100);
        let key = ShardKey::of_prefix("a");
        cache.insert(key, NodeId(9), 1, 4, &[change("a/b", 1, 1)], false);
        assert_eq!(cache.entries(), 1);
        assert_eq!(cache.apply(&key, NodeId(8), 1, 5, &[change("a/c", 2, 1)], false), Applied::NotCached);
        assert_eq!(
            cache.apply(&key, NodeId(9), 0, 5, &[change("a/c", 2, 1)], false),
            Applied::NotCached,
            "an older watch"
        );
        let both = [change("a/c", 2, 1), change("a/b", 1, 0)];
        assert_eq!(cache.apply(&key, NodeId(9), 1, 5, &both, false), Applied::Yes(Vec::new()));
        let shard = cache.get(&key).unwrap();
        assert!(shard.routes.get("a/b").is_none());
        assert_eq!(shard.routes.get("a/c").unwrap().nodes.as_slice(), &[(NodeId(2), 1)]);
        assert_eq!(shard.len(), 1);
        assert_eq!(shard.version, 5);
    }

    #[test]
    fn a_missed_delta_drops_the_copy() {
        let mut cache = RouteCache::new(100);
        let key = ShardKey::of_prefix("a");
        cache.insert(key, NodeId(9), 1, 4, &[change("a/b", 1, 1)], false);
        assert_eq!(cache.apply(&key, NodeId(9), 1, 6, &[change("a/c", 2, 1)], false), Applied::Gap, "5 went missing");
        assert!(!cache.contains(&key));
        assert_eq!(cache.entries(), 0);
        cache.insert(key, NodeId(9), 2, 6, &[], false);
        assert_eq!(cache.apply(&key, NodeId(9), 2, 6, &[], false), Applied::Gap, "a repeated version is no successor");
    }

    #[test]
    fn least_recently_used_shards_go_first() {
        let mut cache = RouteCache::new(3);
        let keys: Vec<ShardKey> = (0..4).map(|i| ShardKey::of_prefix(&format!("k{i}"))).collect();
        for (i, key) in keys[..3].iter().enumerate() {
            assert!(cache.insert(*key, NodeId(i as u64), 7, 0, &[change("x", 1, 1)], false).is_empty());
        }
        cache.get(&keys[0]);
        let evicted = cache.insert(keys[3], NodeId(3), 7, 0, &[change("x", 1, 1)], false);
        assert_eq!(evicted, vec![(keys[1], NodeId(1), 7)]);
        assert!(cache.contains(&keys[0]) && !cache.contains(&keys[1]));
        // A shard larger than the whole cache stays, alone.
        let big: Vec<RouteChange> = (0..10).map(|n| change("y", n, 1)).collect();
        let evicted = cache.insert(keys[1], NodeId(1), 8, 0, &big, false);
        assert_eq!(evicted.len(), 3);
        assert_eq!(cache.shards(), 1);
    }
}
