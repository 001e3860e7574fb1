//! Owner side: the route entries of one shard this node owns.
//!
//! A [`RouteShard`] maps each filter of the shard to [`FilterRoutes`]: the
//! nodes holding non-shared subscribers (with their count) and, per shared
//! group, the nodes holding members. One entry per (filter, group, node), not
//! per client: clients stay on their node. It applies idempotent assertions
//! from subscriber nodes and returns the changes to push to watchers, and it
//! keeps an order-independent hash of its entries (whole shard and per
//! subscriber node) for anti-entropy, updated in O(1) per change.
//!
//! Boundary: data and bookkeeping only. Who owns what, timers and frames are
//! the [`Node`](super::node::Node)'s business.

use super::filter_trie::{join_filter, FilterTrie};
use super::frame::{RouteChange, RouteOp};
use super::id::{FastMap, NodeId, StableHasher};
use super::ownership::Owners;
use smallvec::SmallVec;
use std::collections::HashSet;

/// Subscribers per node, sorted by node.
pub type NodeCounts = SmallVec<[(NodeId, u32); 2]>;

/// The route entries of one filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterRoutes {
    /// Nodes with non-shared subscribers (count per node), sorted by node.
    pub nodes: NodeCounts,
    /// Shared groups, sorted by name: the nodes holding members of each.
    pub groups: Vec<(Box<str>, NodeCounts)>,
}

impl FilterRoutes {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.groups.is_empty()
    }

    /// Number of (group, node) entries.
    pub fn len(&self) -> usize {
        self.nodes.len() + self.groups.iter().map(|(_, n)| n.len()).sum::<usize>()
    }

    /// Sets `node`'s count (0 removes); returns the previous count (0 if none).
    pub fn set(&mut self, group: Option<&str>, node: NodeId, count: u32) -> u32 {
        let counts = match group {
            None => &mut self.nodes,
            Some(group) => match self.groups.binary_search_by(|(g, _)| (**g).cmp(group)) {
                Ok(i) => &mut self.groups[i].1,
                Err(_) if count == 0 => return 0,
                Err(i) => {
                    self.groups.insert(i, (group.into(), NodeCounts::new()));
                    &mut self.groups[i].1
                }
            },
        };
        let previous = match counts.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) if count == 0 => counts.remove(i).1,
            Ok(i) => std::mem::replace(&mut counts[i].1, count),
            Err(_) if count == 0 => 0,
            Err(i) => {
                counts.insert(i, (node, count));
                0
            }
        };
        if count == 0 {
            if let Some(group) = group {
                self.groups.retain(|(g, n)| &**g != group || !n.is_empty());
            }
        }
        previous
    }

    /// Visits every (group, node, count).
    pub fn for_each(&self, mut visit: impl FnMut(Option<&str>, NodeId, u32)) {
        for &(node, count) in &self.nodes {
            visit(None, node, count);
        }
        for (group, counts) in &self.groups {
            for &(node, count) in counts {
                visit(Some(group), node, count);
            }
        }
    }

    /// Removes every entry of `node`; returns the groups it was in (None =
    /// non-shared) with their counts.
    pub fn remove_node(&mut self, node: NodeId) -> SmallVec<[(Option<Box<str>>, u32); 2]> {
        let mut removed = SmallVec::new();
        if let Ok(i) = self.nodes.binary_search_by_key(&node, |&(n, _)| n) {
            removed.push((None, self.nodes.remove(i).1));
        }
        self.groups.retain_mut(|(group, counts)| {
            if let Ok(i) = counts.binary_search_by_key(&node, |&(n, _)| n) {
                removed.push((Some(group.clone()), counts.remove(i).1));
            }
            !counts.is_empty()
        });
        removed
    }
}

/// The anti-entropy hash of one entry. XOR-combined, so the shard hash is
/// independent of insertion order and updated in O(1).
pub fn entry_hash(node: NodeId, filter: &str, group: Option<&str>) -> u64 {
    let h = StableHasher::new().u64(node.0).bytes(filter.as_bytes());
    match group {
        None => h.bytes(b"").u64(0),
        Some(g) => h.bytes(g.as_bytes()).u64(1),
    }
    .finish()
}

/// What a shard holds about one subscriber node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSummary {
    pub entries: u32,
    pub hash: u64,
}

/// The entries of one owned shard, its watchers and its digest.
#[derive(Clone, Debug, Default)]
pub struct RouteShard {
    routes: FilterTrie<FilterRoutes>,
    by_node: FastMap<NodeId, NodeSummary>,
    hash: u64,
    entries: usize,
    /// Publishers caching this shard, sorted, with the lookup that registered each.
    watchers: Vec<(NodeId, u64)>,
    /// The shard's owners in the current membership view.
    pub(crate) owners: Owners,
    /// When this node stopped owning the shard, the time it lets it go.
    pub(crate) release_at: Option<u64>,
    /// Bumped by every batch of changes pushed to the watchers: a lookup
    /// answer carries it, each delta the next one.
    pub(crate) version: u64,
    /// When the watchers are told `version` after the last push.
    pub(crate) tail_at: Option<u64>,
    /// Per subscriber node, where its numbered assertions stand.
    assertions: FastMap<NodeId, AssertionSeq>,
    /// Hot-prefix split: filters whose literal prefix goes a level deeper
    /// than this shard's belong to the child shards (they leave this one as
    /// their nodes move them); publishers consult the child on their path.
    pub(crate) split: bool,
    /// The `split` the watchers were last told.
    pub(crate) split_pushed: bool,
    /// The size at which the shard was last found not worth splitting (no
    /// filter deeper than its prefix): looked at again when it doubles.
    pub(crate) unsplittable_at: usize,
    /// Per subscriber node sending a replacement in parts: the entries its
    /// parts named so far (the rest of its entries go with the last part).
    replacing: FastMap<NodeId, HashSet<EntryKey>>,
}

/// A (filter, shared group) entry of one node.
type EntryKey = (Box<str>, Option<Box<str>>);

/// Folded into [`RouteShard::replica_digest`] when the shard is split.
pub(crate) const SPLIT_MARK: u64 = 0x5b11_7ed0_c0ff_ee01;

/// Where one subscriber node's numbered assertions to this shard stand.
#[derive(Clone, Copy, Debug, Default)]
struct AssertionSeq {
    /// The last one applied in order.
    applied: u64,
    /// One went missing after `applied`; a replacement was asked for.
    gap: bool,
}

/// What to do about a numbered assertion ([`RouteShard::sequence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InOrder {
    /// Next in line (or a replacement): apply it and acknowledge `seq`.
    Next,
    /// One before it went missing: apply it (entries are absolute counts,
    /// so applying never hurts), do not acknowledge, and ask the node for a
    /// replacement if `ask` (once per gap).
    Gap { ask: bool },
}

impl RouteShard {
    pub fn new() -> RouteShard {
        RouteShard::default()
    }

    /// Number of (filter, group, node) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Nothing to keep: no entry, no watcher, not split (a split shard
    /// with no entry left still tells publishers to look deeper).
    pub fn is_idle(&self) -> bool {
        self.entries == 0 && self.watchers.is_empty() && !self.split
    }

    /// Number of distinct filters.
    pub fn filters(&self) -> usize {
        self.routes.len()
    }

    /// XOR of every entry's [`entry_hash`]; replicas that agree have equal hashes.
    pub fn digest(&self) -> u64 {
        self.hash
    }

    pub fn routes(&self) -> &FilterTrie<FilterRoutes> {
        &self.routes
    }

    /// What replicas compare in anti-entropy: the digest, and whether split.
    pub fn replica_digest(&self) -> u64 {
        self.hash ^ if self.split { SPLIT_MARK } else { 0 }
    }

    /// Where `node`'s numbered assertions stand: the last applied in order.
    pub fn applied_seq(&self, node: NodeId) -> u64 {
        self.assertions.get(&node).map_or(0, |a| a.applied)
    }

    /// Per subscriber node: its entries and their hash, sorted by node.
    pub fn node_digests(&self) -> Vec<(NodeId, u64)> {
        let mut items: Vec<(NodeId, u64)> = self.by_node.iter().map(|(&n, s)| (n, s.hash)).collect();
        items.sort_unstable();
        items
    }

    pub fn node_summary(&self, node: NodeId) -> NodeSummary {
        self.by_node.get(&node).copied().unwrap_or_default()
    }

    /// Subscriber nodes with entries here.
    pub fn subscriber_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.by_node.keys().copied()
    }

    /// Sets one entry; returns the change to push if anything changed.
    pub fn set(&mut self, node: NodeId, filter: &str, group: Option<&str>, count: u32) -> Option<RouteChange> {
        let previous = if count == 0 {
            let routes = self.routes.get_mut(filter)?;
            let previous = routes.set(group, node, 0);
            if routes.is_empty() {
                self.routes.remove(filter);
            }
            previous
        } else {
            self.routes.get_or_insert_with(filter, FilterRoutes::default).set(group, node, count)
        };
        if previous == count {
            return None;
        }
        if (previous == 0) != (count == 0) {
            self.account(node, entry_hash(node, filter, group), count != 0);
        }
        Some(RouteChange { filter: filter.to_string(), group: group.map(str::to_string), node, count })
    }

    fn account(&mut self, node: NodeId, hash: u64, added: bool) {
        self.hash ^= hash;
        let summary = self.by_node.entry(node).or_default();
        summary.hash ^= hash;
        if added {
            summary.entries += 1;
            self.entries += 1;
        } else {
            summary.entries -= 1;
            self.entries -= 1;
            if summary.entries == 0 {
                self.by_node.remove(&node);
            }
        }
    }

    /// Applies `node`'s assertion; with `replace`, entries of `node` absent
    /// from `ops` are removed. Returns the changes, for watchers.
    /// Forgets where `node`'s numbered assertions stand once it holds no
    /// entry here: its next run of assertions (a shard it subscribes to
    /// again) starts at 1.
    pub fn forget_order_if_empty(&mut self, node: NodeId) {
        if !self.by_node.contains_key(&node) {
            self.assertions.remove(&node);
        }
    }

    pub fn assert_from(&mut self, node: NodeId, replace: bool, ops: &[RouteOp]) -> Vec<RouteChange> {
        let mut changes = Vec::new();
        for op in ops {
            changes.extend(self.set(node, &op.filter, op.group.as_deref(), op.count));
        }
        if !replace {
            return changes;
        }
        let asserted: HashSet<(&str, Option<&str>)> =
            ops.iter().filter(|op| op.count > 0).map(|op| (op.filter.as_str(), op.group.as_deref())).collect();
        let stale = self.unasserted(node, asserted.len(), |filter, group| asserted.contains(&(filter, group)));
        for (filter, group) in stale {
            changes.extend(self.set(node, &filter, group.as_deref(), 0));
        }
        changes
    }

    /// Applies one part of `node`'s assertion. A replacement too large for
    /// one frame comes in parts: the first `replace`, every one but the last
    /// with `more`. Each part's entries are applied as they come (nothing
    /// the node still has disappears meanwhile); the node's entries that no
    /// part named go with the last part.
    pub fn assert_part(&mut self, node: NodeId, replace: bool, more: bool, ops: &[RouteOp]) -> Vec<RouteChange> {
        if replace && !more {
            self.replacing.remove(&node);
            return self.assert_from(node, true, ops);
        }
        if replace {
            self.replacing.insert(node, HashSet::new());
        }
        let mut changes = self.assert_from(node, false, ops);
        let Some(named) = self.replacing.get_mut(&node) else { return changes };
        for op in ops {
            let key = (Box::from(op.filter.as_str()), op.group.as_deref().map(Box::from));
            if op.count > 0 {
                named.insert(key);
            } else {
                named.remove(&key);
            }
        }
        if !more {
            let named = self.replacing.remove(&node).expect("replacing");
            let stale = self.unasserted(node, named.len(), |filter, group| {
                named.contains(&(Box::from(filter), group.map(Box::from)))
            });
            for (filter, group) in stale {
                changes.extend(self.set(node, &filter, group.as_deref(), 0));
            }
        }
        changes
    }

    /// Forgets a replacement in parts of `node` (a part went missing: the
    /// node is asked for a new one, and nothing is removed for this one).
    pub fn cancel_replacement(&mut self, node: NodeId) {
        self.replacing.remove(&node);
    }

    /// `node`'s entries here that `asserted` (of `count` entries, all
    /// present) does not name. If the node has no more than those, nothing
    /// is stale and the O(shard) scan is skipped (the usual re-assertion
    /// after a move, or a repair that finds nothing).
    fn unasserted(
        &self,
        node: NodeId,
        count: usize,
        asserted: impl Fn(&str, Option<&str>) -> bool,
    ) -> Vec<(String, Option<String>)> {
        let mut stale = Vec::new();
        if self.node_summary(node).entries as usize == count {
            return stale;
        }
        self.routes.for_each(|levels, hash, routes| {
            routes.for_each(|group, n, _| {
                if n == node {
                    let filter = join_filter(levels, hash);
                    if !asserted(&filter, group) {
                        stale.push((filter, group.map(str::to_string)));
                    }
                }
            })
        });
        stale
    }

    /// Places assertion `seq` of `node` in its order: a replacement
    /// (`replace`) starts a new order, anything else must come right after
    /// the last one applied.
    pub fn sequence(&mut self, node: NodeId, seq: u64, replace: bool) -> InOrder {
        let state = self.assertions.entry(node).or_default();
        if replace || (!state.gap && Some(seq) == state.applied.checked_add(1)) {
            *state = AssertionSeq { applied: seq, gap: false };
            return InOrder::Next;
        }
        let ask = !state.gap;
        state.gap = true;
        InOrder::Gap { ask }
    }

    /// Drops every entry of `node` (it died or its entries are stale).
    pub fn remove_node(&mut self, node: NodeId) -> Vec<RouteChange> {
        self.assertions.remove(&node);
        self.replacing.remove(&node);
        if !self.by_node.contains_key(&node) {
            return Vec::new();
        }
        let mut changes = Vec::new();
        let mut removed_hash = 0;
        self.routes.for_each(|levels, hash, routes| {
            routes.for_each(|group, n, _| {
                if n == node {
                    let filter = join_filter(levels, hash);
                    removed_hash ^= entry_hash(node, &filter, group);
                    changes.push(RouteChange { filter, group: group.map(str::to_string), node, count: 0 });
                }
            })
        });
        self.routes.retain(|routes| {
            routes.remove_node(node);
            !routes.is_empty()
        });
        self.hash ^= removed_hash;
        self.entries -= changes.len();
        self.by_node.remove(&node);
        changes
    }

    /// Every entry, for a lookup answer.
    pub fn entries(&self) -> Vec<RouteChange> {
        let mut out = Vec::with_capacity(self.entries);
        self.routes.for_each(|levels, hash, routes| {
            let filter = join_filter(levels, hash);
            routes.for_each(|group, node, count| {
                out.push(RouteChange { filter: filter.clone(), group: group.map(str::to_string), node, count })
            })
        });
        out
    }

    /// The asserted entries of `node` in this shard (anti-entropy tests).
    pub fn entries_of(&self, node: NodeId) -> Vec<RouteChange> {
        self.entries().into_iter().filter(|c| c.node == node).collect()
    }

    /// Watchers and the lookup request each registered with.
    pub fn watchers(&self) -> &[(NodeId, u64)] {
        &self.watchers
    }

    /// Registers (or re-registers, with a newer request) a watcher.
    pub fn watch(&mut self, node: NodeId, req: u64) {
        match self.watchers.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) => self.watchers[i].1 = req,
            Err(i) => self.watchers.insert(i, (node, req)),
        }
    }

    /// Removes the watch registered by `node`'s lookup `req` (not a newer one).
    pub fn unwatch(&mut self, node: NodeId, req: u64) -> bool {
        match self.watchers.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) if self.watchers[i].1 == req => {
                self.watchers.remove(i);
                true
            }
            _ => false,
        }
    }

    /// Keeps only watchers for which `keep` is true.
    pub fn retain_watchers(&mut self, mut keep: impl FnMut(NodeId) -> bool) {
        self.watchers.retain(|&(n, _)| keep(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(filter: &str, group: Option<&str>, count: u32) -> RouteOp {
        RouteOp { filter: filter.into(), group: group.map(Into::into), count }
    }

    #[test]
    fn assertions_are_idempotent_and_push_only_changes() {
        let mut shard = RouteShard::new();
        let ops = [op("a/+", None, 2), op("a/b", Some("g"), 1)];
        assert_eq!(shard.assert_from(NodeId(1), false, &ops).len(), 2);
        assert!(shard.assert_from(NodeId(1), false, &ops).is_empty(), "re-assertion changes nothing");
        assert_eq!(shard.len(), 2);
        assert_eq!(shard.filters(), 2);
        // A count change is pushed but is not a new entry.
        assert_eq!(shard.assert_from(NodeId(1), false, &[op("a/+", None, 3)]).len(), 1);
        assert_eq!(shard.len(), 2);
        shard.assert_from(NodeId(2), false, &[op("a/+", None, 1)]);
        assert_eq!(shard.routes().get("a/+").unwrap().nodes.as_slice(), &[(NodeId(1), 3), (NodeId(2), 1)]);
        assert_eq!(shard.node_summary(NodeId(1)).entries, 2);
    }

    #[test]
    fn replace_drops_what_was_not_asserted() {
        let mut shard = RouteShard::new();
        shard.assert_from(NodeId(1), false, &[op("a", None, 1), op("a/#", None, 1), op("a/x", Some("g"), 1)]);
        shard.assert_from(NodeId(2), false, &[op("a", None, 1)]);
        let changes = shard.assert_from(NodeId(1), true, &[op("a", None, 1)]);
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.count == 0));
        assert_eq!(shard.len(), 2);
        assert_eq!(shard.entries_of(NodeId(1)).len(), 1);
    }

    #[test]
    fn digest_depends_on_content_not_order() {
        let (mut a, mut b) = (RouteShard::new(), RouteShard::new());
        a.assert_from(NodeId(1), false, &[op("x", None, 1), op("y", Some("g"), 1)]);
        a.assert_from(NodeId(2), false, &[op("x", None, 5)]);
        b.assert_from(NodeId(2), false, &[op("x", None, 1)]);
        b.assert_from(NodeId(1), false, &[op("y", Some("g"), 4), op("x", None, 1)]);
        assert_eq!(a.digest(), b.digest(), "counts are hints, not part of the digest");
        assert_eq!(a.node_digests(), b.node_digests());
        b.set(NodeId(1), "z", None, 1);
        assert_ne!(a.digest(), b.digest());
        b.set(NodeId(1), "z", None, 0);
        assert_eq!(a.digest(), b.digest());
        // Group None and group "" are different entries.
        assert_ne!(entry_hash(NodeId(1), "x", None), entry_hash(NodeId(1), "x", Some("")));
    }

    #[test]
    fn removing_a_node_keeps_the_digest_consistent() {
        let mut shard = RouteShard::new();
        shard.assert_from(NodeId(1), false, &[op("x", None, 1), op("x", Some("g"), 1), op("y/#", None, 1)]);
        shard.assert_from(NodeId(2), false, &[op("x", None, 1)]);
        let removed = shard.remove_node(NodeId(1));
        assert_eq!(removed.len(), 3);
        let mut only_two = RouteShard::new();
        only_two.assert_from(NodeId(2), false, &[op("x", None, 1)]);
        assert_eq!(shard.digest(), only_two.digest());
        assert_eq!(shard.len(), 1);
        assert_eq!(shard.filters(), 1);
        assert!(shard.remove_node(NodeId(1)).is_empty());
    }
}
