//! Ownership: which live nodes own a shard key.
//!
//! One trait, [`Ownership`], and two strategies so the simulator can compare
//! them (in the spirit of garage's replication parameters):
//! [`XorOwnership`] (Kademlia: the `r` nodes whose positions are closest to
//! the key by XOR) and [`RingOwnership`] (a consistent-hash ring with `V`
//! virtual points per node; the `r` distinct nodes met walking clockwise from
//! the key). Both are built once per membership version into sorted vectors,
//! so an `owners` call is a few binary searches and allocates nothing while
//! `r <= 4`. [`Membership`] bundles a live set, its version and its built
//! strategy; it is immutable and meant to be shared (`Arc`) by every node that
//! has the same view — the simulator builds one per change, not one per node.
//!
//! Why not the `hashring` crate: `HashRing::get_with_replicas` clones and
//! rotates the whole ring on every call (O(N·V) per lookup, far too slow for
//! millions of calls), returns repeated virtual points of the same node
//! instead of `r` distinct nodes, and returns `replicas + 1` entries. The ring
//! here is the same idea in 40 lines with the properties we need.
//!
//! Boundary: pure functions of (members, key, r). No liveness detection, no
//! I/O; the driver (gossip heartbeats) or the simulator decides who is live.

use super::id::{key_position, NodeId, StableHasher};
use crate::shard::ShardKey;
use smallvec::SmallVec;

/// The owners of one key, closest first. Inline up to 4 (R is 3 by default).
pub type Owners = SmallVec<[NodeId; 4]>;

/// A closeness strategy, built for one membership version.
pub trait Ownership {
    /// The `min(r, members)` owners of `key`, closest first, into `out`
    /// (cleared first). Deterministic: the same members, key and `r` give the
    /// same answer on every node.
    fn owners_into(&self, key: &ShardKey, r: usize, out: &mut Owners);

    /// [`Ownership::owners_into`] returning a fresh list.
    fn owners(&self, key: &ShardKey, r: usize) -> Owners {
        let mut out = Owners::new();
        self.owners_into(key, r, &mut out);
        out
    }
}

/// Which strategy a cluster uses (a config value; the simulator compares).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnershipConfig {
    /// Kademlia XOR distance between key and node positions.
    Xor,
    /// Consistent-hash ring with this many virtual points per node.
    Ring { vnodes: u32 },
}

/// The ring with 128 virtual points per node: in the simulator it balanced
/// entries best (max/mean 1.52 against 2.86 for XOR on 1,000 nodes) and moved
/// 0.99 x 1/N of the entries per join (docs/SIMULATION.md, "Ownership").
impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig::Ring { vnodes: 128 }
    }
}

/// Kademlia closeness: node positions sorted, searched as an implicit binary
/// trie (every node in the half whose next bit equals the key's bit is closer
/// than every node in the other half).
#[derive(Clone, Debug)]
pub struct XorOwnership {
    by_position: Vec<(u64, NodeId)>,
    index: BucketIndex,
}

impl XorOwnership {
    pub fn new(members: &[NodeId]) -> XorOwnership {
        let mut by_position: Vec<(u64, NodeId)> = members.iter().map(|&n| (n.position(), n)).collect();
        by_position.sort_unstable();
        by_position.dedup();
        let index = BucketIndex::new(&by_position);
        XorOwnership { by_position, index }
    }

    /// True if `joined`, added to a membership whose owners of `key` were
    /// `owners` (all of them, closest first), becomes one of the `r` owners.
    /// O(r): lets a node skip recomputing owners for keys a join does not
    /// touch.
    pub fn join_changes(key: &ShardKey, owners: &[NodeId], r: usize, joined: NodeId) -> bool {
        if owners.len() < r {
            return true;
        }
        let k = key_position(key);
        let farthest = owners[owners.len() - 1];
        (joined.position() ^ k) < (farthest.position() ^ k)
    }
}

/// The `r` XOR-closest positions to `key`: nodes sharing a longer prefix
/// with the key are strictly closer, and in sorted order the common prefix
/// length only falls moving away from the key's insertion point. So take
/// whole groups of equal prefix length outward from that point until there
/// are `r`, then order the (usually ~2r) candidates by distance.
fn collect_xor(sorted: &[(u64, NodeId)], index: &BucketIndex, key: u64, r: usize, out: &mut Owners) {
    let n = sorted.len();
    let (mut left, mut right) = (index.insertion_point(sorted, key), index.insertion_point(sorted, key));
    let cpl = |i: usize| (sorted[i].0 ^ key).leading_zeros() as i32;
    let mut candidates: SmallVec<[(u64, NodeId); 8]> = SmallVec::new();
    while candidates.len() < r && (left > 0 || right < n) {
        let level = (if left > 0 { cpl(left - 1) } else { -1 }).max(if right < n { cpl(right) } else { -1 });
        while left > 0 && cpl(left - 1) == level {
            left -= 1;
            candidates.push((sorted[left].0 ^ key, sorted[left].1));
        }
        while right < n && cpl(right) == level {
            candidates.push((sorted[right].0 ^ key, sorted[right].1));
            right += 1;
        }
    }
    candidates.sort_unstable_by_key(|&(d, _)| d);
    out.extend(candidates.iter().take(r).map(|&(_, node)| node));
}

/// Where a 64-bit position falls in a sorted vector, in one bucket probe and
/// a short binary search (positions are uniform hashes, so 2^16 buckets on
/// the top bits split 10^5..10^7 points into runs of a few hundred at most).
#[derive(Clone, Debug, Default)]
struct BucketIndex {
    /// `starts[b]`: the first point whose top 16 bits are >= b.
    starts: Vec<u32>,
}

impl BucketIndex {
    const BITS: u32 = 16;

    fn new(sorted: &[(u64, NodeId)]) -> BucketIndex {
        if sorted.len() < 1024 {
            return BucketIndex::default();
        }
        let buckets = 1usize << Self::BITS;
        let mut starts = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for b in 0..buckets as u64 {
            while i < sorted.len() && (sorted[i].0 >> (64 - Self::BITS)) < b {
                i += 1;
            }
            starts.push(i as u32);
        }
        starts.push(sorted.len() as u32);
        BucketIndex { starts }
    }

    /// The number of points below `key`.
    #[inline]
    fn insertion_point(&self, sorted: &[(u64, NodeId)], key: u64) -> usize {
        if self.starts.is_empty() {
            return sorted.partition_point(|&(p, _)| p < key);
        }
        let b = (key >> (64 - Self::BITS)) as usize;
        let (lo, hi) = (self.starts[b] as usize, self.starts[b + 1] as usize);
        lo + sorted[lo..hi].partition_point(|&(p, _)| p < key)
    }
}

impl Ownership for XorOwnership {
    fn owners_into(&self, key: &ShardKey, r: usize, out: &mut Owners) {
        out.clear();
        collect_xor(&self.by_position, &self.index, key_position(key), r, out);
    }
}

/// Consistent hashing: `vnodes` points per node on a 64-bit ring.
#[derive(Clone, Debug)]
pub struct RingOwnership {
    points: Vec<(u64, NodeId)>,
    index: BucketIndex,
    vnodes: u32,
    nodes: usize,
}

impl RingOwnership {
    pub fn new(members: &[NodeId], vnodes: u32) -> RingOwnership {
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(members.len() * vnodes as usize);
        for &node in members {
            points.extend(Self::points_of(node, vnodes));
        }
        points.sort_unstable();
        points.dedup();
        Self::from_points(points, vnodes)
    }

    /// The ring after `delta`, in linear time (a merge, not a sort): what a
    /// simulator with 10^4..10^5 nodes and 128 points each needs per change.
    pub fn with_delta(&self, delta: &MembershipDelta) -> RingOwnership {
        let mut added: Vec<(u64, NodeId)> = delta.added.iter().flat_map(|&n| Self::points_of(n, self.vnodes)).collect();
        added.sort_unstable();
        let mut points = Vec::with_capacity(self.points.len() + added.len());
        let mut new = added.into_iter().peekable();
        for &point in self.points.iter().filter(|(_, n)| !delta.removed.contains(n)) {
            while let Some(&a) = new.peek().filter(|a| **a < point) {
                points.push(a);
                new.next();
            }
            points.push(point);
        }
        points.extend(new);
        points.dedup();
        Self::from_points(points, self.vnodes)
    }

    fn points_of(node: NodeId, vnodes: u32) -> impl Iterator<Item = (u64, NodeId)> {
        (0..vnodes).map(move |v| (StableHasher::new().u64(node.0).u64(v as u64).finish(), node))
    }

    fn from_points(points: Vec<(u64, NodeId)>, vnodes: u32) -> RingOwnership {
        let mut distinct: Vec<NodeId> = points.iter().map(|&(_, n)| n).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let index = BucketIndex::new(&points);
        RingOwnership { points, index, vnodes, nodes: distinct.len() }
    }
}

impl Ownership for RingOwnership {
    fn owners_into(&self, key: &ShardKey, r: usize, out: &mut Owners) {
        out.clear();
        let wanted = r.min(self.nodes);
        if wanted == 0 {
            return;
        }
        let start = self.index.insertion_point(&self.points, key_position(key));
        let len = self.points.len();
        for i in 0..len {
            let node = self.points[(start + i) % len].1;
            if !out.contains(&node) {
                out.push(node);
                if out.len() == wanted {
                    return;
                }
            }
        }
    }
}

/// A built strategy (enum dispatch: no box, no vtable on the hot path).
#[derive(Clone, Debug)]
pub enum Placement {
    Xor(XorOwnership),
    Ring(RingOwnership),
}

impl Placement {
    pub fn new(config: OwnershipConfig, members: &[NodeId]) -> Placement {
        match config {
            OwnershipConfig::Xor => Placement::Xor(XorOwnership::new(members)),
            OwnershipConfig::Ring { vnodes } => Placement::Ring(RingOwnership::new(members, vnodes)),
        }
    }
}

impl Ownership for Placement {
    #[inline]
    fn owners_into(&self, key: &ShardKey, r: usize, out: &mut Owners) {
        match self {
            Placement::Xor(x) => x.owners_into(key, r, out),
            Placement::Ring(ring) => ring.owners_into(key, r, out),
        }
    }
}

/// Nodes that joined and left between two membership versions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipDelta {
    pub added: Vec<NodeId>,
    pub removed: Vec<NodeId>,
}

/// One view of the live fleet: a version, the members, and their built
/// ownership strategy. Immutable; share it with `Arc`.
#[derive(Clone, Debug)]
pub struct Membership {
    version: u64,
    config: OwnershipConfig,
    members: Vec<NodeId>,
    placement: Placement,
    /// The delta from `version - 1`, when built by [`Membership::next`].
    from_previous: Option<MembershipDelta>,
}

impl Membership {
    /// A view with the given live members (any order; duplicates ignored).
    pub fn new(version: u64, members: impl IntoIterator<Item = NodeId>, config: OwnershipConfig) -> Membership {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        let placement = Placement::new(config, &members);
        Membership { version, config, members, placement, from_previous: None }
    }

    /// The next version with `members`, remembering the delta so nodes that
    /// move from this version to the next skip an O(N) diff.
    pub fn next(&self, members: impl IntoIterator<Item = NodeId>) -> Membership {
        let mut members: Vec<NodeId> = members.into_iter().collect();
        members.sort_unstable();
        members.dedup();
        let delta = sorted_diff(&self.members, &members);
        let placement = match &self.placement {
            // A few changes to a big ring: merge instead of re-sorting.
            Placement::Ring(ring) if delta.added.len() + delta.removed.len() <= 16 => {
                Placement::Ring(ring.with_delta(&delta))
            }
            _ => Placement::new(self.config, &members),
        };
        Membership { version: self.version + 1, config: self.config, members, placement, from_previous: Some(delta) }
    }

    /// An empty view (a node before it learns of anyone, itself included).
    pub fn empty(config: OwnershipConfig) -> Membership {
        Membership::new(0, [], config)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn config(&self) -> OwnershipConfig {
        self.config
    }

    /// The live members, sorted by id.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    #[inline]
    pub fn contains(&self, node: NodeId) -> bool {
        self.members.binary_search(&node).is_ok()
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Who joined and who left since `older`.
    pub fn delta_since(&self, older: &Membership) -> MembershipDelta {
        match &self.from_previous {
            Some(delta) if older.version + 1 == self.version && older.config == self.config => delta.clone(),
            _ => sorted_diff(&older.members, &self.members),
        }
    }
}

impl Ownership for Membership {
    #[inline]
    fn owners_into(&self, key: &ShardKey, r: usize, out: &mut Owners) {
        self.placement.owners_into(key, r, out)
    }
}

fn sorted_diff(old: &[NodeId], new: &[NodeId]) -> MembershipDelta {
    let mut delta = MembershipDelta::default();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                delta.removed.push(*a);
                i += 1;
            }
            (Some(_), Some(b)) => {
                delta.added.push(*b);
                j += 1;
            }
            (Some(a), None) => {
                delta.removed.push(*a);
                i += 1;
            }
            (None, Some(b)) => {
                delta.added.push(*b);
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(ids: impl IntoIterator<Item = u64>) -> Vec<NodeId> {
        ids.into_iter().map(NodeId).collect()
    }

    fn brute_xor(members: &[NodeId], key: &ShardKey, r: usize) -> Vec<NodeId> {
        let k = key_position(key);
        let mut all = members.to_vec();
        all.sort_by_key(|n| n.position() ^ k);
        all.dedup();
        all.truncate(r);
        all
    }

    proptest! {
        #[test]
        fn xor_owners_are_the_r_closest(ids in proptest::collection::vec(any::<u64>(), 0..60), prefix in "[a-z]{0,6}", r in 1usize..6) {
            let members = nodes(ids);
            let key = ShardKey::of_prefix(&prefix);
            let xor = XorOwnership::new(&members);
            let got: Vec<NodeId> = xor.owners(&key, r).into_vec();
            prop_assert_eq!(got, brute_xor(&members, &key, r));
        }

        #[test]
        fn ring_owners_are_distinct_and_enough(ids in proptest::collection::vec(any::<u64>(), 0..40), prefix in "[a-z]{0,6}", r in 1usize..6, vnodes in 1u32..20) {
            let members = Membership::new(1, nodes(ids), OwnershipConfig::Ring { vnodes });
            let owners = members.owners(&ShardKey::of_prefix(&prefix), r);
            prop_assert_eq!(owners.len(), r.min(members.len()));
            let mut sorted = owners.to_vec();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), owners.len());
            prop_assert!(owners.iter().all(|n| members.contains(*n)));
        }

        /// A join moves only keys the joiner now owns, and the fast check
        /// agrees with recomputing.
        #[test]
        fn xor_join_check_agrees(ids in proptest::collection::vec(any::<u64>(), 1..40), joiner in any::<u64>(), prefix in "[a-z]{0,6}") {
            let before = Membership::new(1, nodes(ids.clone()), OwnershipConfig::Xor);
            prop_assume!(!before.contains(NodeId(joiner)));
            let after = before.next(nodes(ids).into_iter().chain([NodeId(joiner)]));
            let key = ShardKey::of_prefix(&prefix);
            let (old, new) = (before.owners(&key, 3), after.owners(&key, 3));
            let changed = old != new;
            prop_assert_eq!(changed, XorOwnership::join_changes(&key, &old, 3, NodeId(joiner)));
            if changed {
                prop_assert!(new.contains(&NodeId(joiner)));
            }
        }
    }

    #[test]
    fn an_incremental_ring_equals_a_rebuilt_one() {
        let config = OwnershipConfig::Ring { vnodes: 16 };
        let v1 = Membership::new(1, nodes(0..2_000), config);
        let v2 = v1.next(nodes((5..2_000).chain([7_000, 7_001])));
        let rebuilt = Membership::new(2, nodes((5..2_000).chain([7_000, 7_001])), config);
        for i in 0..2_000 {
            let key = ShardKey::of_prefix(&format!("k{i}"));
            assert_eq!(v2.owners(&key, 3), rebuilt.owners(&key, 3));
        }
    }

    #[test]
    fn bucket_index_agrees_with_binary_search() {
        let members = nodes(0..5_000);
        let xor = XorOwnership::new(&members);
        for i in 0..2_000 {
            let key = ShardKey::of_prefix(&format!("k{i}"));
            assert_eq!(xor.owners(&key, 3).into_vec(), brute_xor(&members, &key, 3));
        }
    }

    #[test]
    fn deltas_are_recorded_and_recomputed() {
        let v1 = Membership::new(1, nodes([1, 2, 3]), OwnershipConfig::Xor);
        let v2 = v1.next(nodes([2, 3, 4]));
        let expected = MembershipDelta { added: nodes([4]), removed: nodes([1]) };
        assert_eq!(v2.delta_since(&v1), expected);
        let v3 = v2.next(nodes([2, 5]));
        assert_eq!(v3.delta_since(&v1), MembershipDelta { added: nodes([5]), removed: nodes([1, 3]) });
    }

    #[test]
    fn both_strategies_spread_keys_over_nodes() {
        for config in [OwnershipConfig::Xor, OwnershipConfig::Ring { vnodes: 64 }] {
            let members = Membership::new(1, nodes(0..10), config);
            let mut counts = [0u32; 10];
            for i in 0..5_000 {
                for owner in members.owners(&ShardKey::of_prefix(&format!("t{i}")), 3) {
                    counts[owner.0 as usize] += 1;
                }
            }
            // Ideal: 1,500 each. XOR with 10 nodes is lumpy; accept 2.5x.
            assert!(counts.iter().all(|&c| c > 300 && c < 3_750), "{config:?} {counts:?}");
        }
    }
}
