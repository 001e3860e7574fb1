//! The oracle: one global table of every live subscription, the reference
//! the simulated fleet is compared with.
//!
//! It answers two questions. Which nodes should receive a publish (every
//! live node with a matching non-shared subscription, and exactly one
//! member of each matching shared group)? And what should each shard of the
//! route table hold (its entries and their anti-entropy digest, computed
//! with the core's own `entry_hash` so the two can be compared in O(1) per
//! replica)? Its matcher is its own, written from the MQTT rules and not
//! shared with the core: a reference that reused the code under test would
//! agree with its bugs.
//!
//! It also holds the rule that says which publishes the steady-state
//! figures may judge ([`DeliveryWindow`]): a publish is steady only if no
//! fault could have touched it between its publish and its last delivery.
//!
//! Which shard a filter belongs in follows the core's hot-prefix splits:
//! the fleet tells the oracle of each split the moment an owner makes it
//! ([`Oracle::split`]), and the truth of the filters that go deeper moves
//! to the child shards at once (the replicas follow as the subscriber nodes
//! move them, which the audits see as convergence).
//!
//! Boundary: truth only. It never routes, and it is updated by the fleet
//! the instant a subscription is made or its node dies.

use crate::engine::Millis;
use kadmq_dht::core::route_shard::entry_hash;
use kadmq_dht::core::NodeId;
use kadmq_dht::shard::{filter_prefix, literal_depth};
use kadmq_dht::ShardKey;
use rustc_hash::{FxHashMap, FxHashSet};

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct TrieNode {
    plus: u32,
    hash: u32,
    slot: u32,
}

#[derive(Default)]
struct Slot {
    filter: Box<str>,
    /// Nodes with non-shared subscriptions to this filter, their count and
    /// since when they have had one.
    plain: Vec<Entry>,
    /// Shared groups on this filter.
    shared: Vec<u32>,
}

struct Group {
    filter: Box<str>,
    group: Box<str>,
    members: Vec<Entry>,
}

/// (node, local subscribers, virtual time the entry appeared)
type Entry = (u32, u32, u64);

/// What a shard of the route table should hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardTruth {
    pub entries: u64,
    pub digest: u64,
}

/// Who should receive one publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// Nodes with a matching non-shared subscription, sorted.
    pub plain: Vec<u32>,
    /// Since when each of `plain` has had a matching subscription.
    pub plain_since: Vec<u64>,
    /// Matching shared groups with at least one member, sorted; each should
    /// get the message exactly once.
    pub shared: Vec<u32>,
    /// Since when each of `shared` has had a member.
    pub shared_since: Vec<u64>,
}

/// The span of virtual time in which a fault could still change what one
/// publish delivers: from its publish until every expected recipient had
/// it or, if some never did, until its last message settled.
///
/// A publish that was steady when made can still be caught by a fault that
/// starts while it is in flight (published at 19,995 ms, its lookup answer
/// back at 19,999 ms, its forward sent at 20,001 ms into a partition that
/// started at 20,000 ms). Such a loss belongs to the fault, so a
/// disturbance that starts inside the window makes the publish disturbed.
///
/// The end is observed, not a fixed bound. The network decides each
/// message's fate when it is sent and never delivers one later than the
/// latency distribution's maximum after it was sent (links stay FIFO, but
/// a link's clock is itself some earlier send plus at most that maximum),
/// so a publish's last forward lands at most one maximum one-way latency
/// after the publisher routed it. How long routing takes is not fixed: a
/// cache hit or an owned shard forwards at once, a miss costs a lookup round
/// trip, one per owner in turn while owners answer "warming", a silent
/// owner costs the lookup timeout and a lookup every owner refused is asked
/// again shortly. A fixed hop count (lookup, reply, forward: three maximum
/// latencies) would miss a fault that cuts a publish still routing after
/// that or, widened to cover the slowest routing, charge real steady losses
/// to unrelated later faults; the simulator sees every message of the
/// publish, so it uses when they actually settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryWindow {
    pub published: Millis,
    /// When the last expected recipient first got it; None if one never did.
    pub all_delivered: Option<Millis>,
    /// When its last message settled: the publisher had routed it and every
    /// forward it sent had arrived or been dropped. None: never routed
    /// (the window stays open to the end of the run).
    pub settled: Option<Millis>,
}

impl DeliveryWindow {
    /// The last instant of the window; None while it is open.
    pub fn end(&self) -> Option<Millis> {
        self.all_delivered.or(self.settled)
    }

    /// Does a disturbance that started at `start` fall inside the window?
    /// One that started in the very millisecond of the publish counts: it
    /// may have run first.
    pub fn overlaps(&self, start: Millis) -> bool {
        start >= self.published && self.end().is_none_or(|end| start <= end)
    }

    /// The first of `starts` (ascending) inside the window, by index.
    pub fn first_overlap(&self, starts: &[Millis]) -> Option<usize> {
        let i = starts.partition_point(|&s| s < self.published);
        starts.get(i).filter(|&&s| self.overlaps(s)).map(|_| i)
    }
}

#[derive(Default)]
struct Found {
    plain: Vec<(u32, u64)>,
    shared: Vec<(u32, u64)>,
}

/// The global subscription table.
pub struct Oracle {
    shard_depth: usize,
    nodes: Vec<TrieNode>,
    edges: FxHashMap<(u32, u32), u32>,
    symbols: FxHashMap<Box<str>, u32>,
    slots: Vec<Slot>,
    groups: Vec<Group>,
    group_ids: FxHashMap<(Box<str>, Box<str>), u32>,
    shards: FxHashMap<ShardKey, ShardTruth>,
    /// Split shards, and the slots (filters) that live in each shard.
    splits: FxHashSet<ShardKey>,
    homed: FxHashMap<ShardKey, Vec<u32>>,
    entries: u64,
}

impl Oracle {
    pub fn new(shard_depth: usize) -> Oracle {
        Oracle {
            shard_depth,
            nodes: vec![TrieNode { plus: NONE, hash: NONE, slot: NONE }],
            edges: FxHashMap::default(),
            symbols: FxHashMap::default(),
            slots: Vec::new(),
            groups: Vec::new(),
            group_ids: FxHashMap::default(),
            shards: FxHashMap::default(),
            splits: FxHashSet::default(),
            homed: FxHashMap::default(),
            entries: 0,
        }
    }

    /// The shard `filter` lives in, given the splits so far (the core's rule).
    fn home(&self, filter: &str) -> ShardKey {
        let literal = literal_depth(filter);
        let mut depth = literal.min(self.shard_depth);
        let mut key = ShardKey::of_prefix(filter_prefix(filter, depth));
        while depth < literal && self.splits.contains(&key) {
            depth += 1;
            key = ShardKey::of_prefix(filter_prefix(filter, depth));
        }
        key
    }

    /// Shard `key` split: its filters that go deeper belong to the child
    /// shards now. False if it had split before.
    pub fn split(&mut self, key: ShardKey) -> bool {
        if !self.splits.insert(key) {
            return false;
        }
        let slots = self.homed.remove(&key).unwrap_or_default();
        for slot in slots {
            let home = self.home(&self.slots[slot as usize].filter);
            if home != key {
                let (entries, digest) = self.slot_truth(slot);
                let old = self.shards.entry(key).or_default();
                old.entries -= entries;
                old.digest ^= digest;
                let new = self.shards.entry(home).or_default();
                new.entries += entries;
                new.digest ^= digest;
            }
            self.homed.entry(home).or_default().push(slot);
        }
        true
    }

    /// Split shards so far.
    pub fn splits(&self) -> usize {
        self.splits.len()
    }

    /// The entries of one filter (plain and shared) and their digest.
    fn slot_truth(&self, slot: u32) -> (u64, u64) {
        let s = &self.slots[slot as usize];
        let mut entries = s.plain.len() as u64;
        let mut digest = s.plain.iter().fold(0, |h, &(n, _, _)| h ^ entry_hash(NodeId(n as u64), &s.filter, None));
        for &g in &s.shared {
            let group = &self.groups[g as usize];
            entries += group.members.len() as u64;
            for &(n, _, _) in &group.members {
                digest ^= entry_hash(NodeId(n as u64), &s.filter, Some(&group.group));
            }
        }
        (entries, digest)
    }

    /// Distinct (filter, group, node) entries: the size of a fully
    /// replicated route table.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Every shard ever seen and what it should hold now (possibly nothing).
    pub fn shards(&self) -> impl Iterator<Item = (&ShardKey, &ShardTruth)> {
        self.shards.iter()
    }

    pub fn shard_count(&self) -> usize {
        self.shards.values().filter(|s| s.entries > 0).count()
    }

    fn new_node(&mut self) -> u32 {
        self.nodes.push(TrieNode { plus: NONE, hash: NONE, slot: NONE });
        (self.nodes.len() - 1) as u32
    }

    fn slot_of(&mut self, filter: &str) -> u32 {
        let mut at = 0u32;
        for level in filter.split('/') {
            at = match level {
                "+" => match self.nodes[at as usize].plus {
                    NONE => {
                        let n = self.new_node();
                        self.nodes[at as usize].plus = n;
                        n
                    }
                    n => n,
                },
                "#" => match self.nodes[at as usize].hash {
                    NONE => {
                        let n = self.new_node();
                        self.nodes[at as usize].hash = n;
                        n
                    }
                    n => n,
                },
                literal => {
                    let next = self.symbols.len() as u32;
                    let sym = *self.symbols.entry(literal.into()).or_insert(next);
                    match self.edges.get(&(at, sym)) {
                        Some(&n) => n,
                        None => {
                            let n = self.new_node();
                            self.edges.insert((at, sym), n);
                            n
                        }
                    }
                }
            };
        }
        if self.nodes[at as usize].slot == NONE {
            self.slots.push(Slot { filter: filter.into(), ..Slot::default() });
            let slot = (self.slots.len() - 1) as u32;
            self.nodes[at as usize].slot = slot;
            let home = self.home(filter);
            self.homed.entry(home).or_default().push(slot);
        }
        self.nodes[at as usize].slot
    }

    /// The id of a shared group on a filter, if anyone ever subscribed.
    pub fn group_id(&self, group: &str, filter: &str) -> Option<u32> {
        self.group_ids.get(&(Box::from(group), Box::from(filter))).copied()
    }

    pub fn group_name(&self, id: u32) -> (&str, &str) {
        let g = &self.groups[id as usize];
        (&g.group, &g.filter)
    }

    pub fn is_member(&self, id: u32, node: u32) -> bool {
        self.groups[id as usize].members.iter().any(|&(n, _, _)| n == node)
    }

    /// Adds `delta` (+1 or -1) local subscribers of `node` to (filter,
    /// group) at virtual time `now`. Returns true if the entry appeared or
    /// disappeared.
    pub fn change(&mut self, now: u64, node: u32, filter: &str, group: Option<&str>, delta: i64) -> bool {
        let slot = self.slot_of(filter) as usize;
        let counts = match group {
            None => &mut self.slots[slot].plain,
            Some(g) => {
                let key = (Box::from(g), Box::from(filter));
                let id = match self.group_ids.get(&key) {
                    Some(&id) => id,
                    None => {
                        let id = self.groups.len() as u32;
                        self.groups.push(Group { filter: filter.into(), group: g.into(), members: Vec::new() });
                        self.group_ids.insert(key, id);
                        self.slots[slot].shared.push(id);
                        id
                    }
                };
                &mut self.groups[id as usize].members
            }
        };
        let (before, after) = match counts.binary_search_by_key(&node, |&(n, _, _)| n) {
            Ok(i) => {
                let before = counts[i].1;
                let after = (before as i64 + delta).max(0) as u32;
                if after == 0 {
                    counts.remove(i);
                } else {
                    counts[i].1 = after;
                }
                (before, after)
            }
            Err(i) => {
                if delta > 0 {
                    counts.insert(i, (node, delta as u32, now));
                    (0, delta as u32)
                } else {
                    (0, 0)
                }
            }
        };
        let flipped = (before == 0) != (after == 0);
        if flipped {
            let key = self.home(filter);
            let truth = self.shards.entry(key).or_default();
            truth.digest ^= entry_hash(NodeId(node as u64), filter, group);
            if after > 0 {
                truth.entries += 1;
                self.entries += 1;
            } else {
                truth.entries -= 1;
                self.entries -= 1;
            }
        }
        flipped
    }

    /// Who should receive a publish to `topic` now.
    pub fn expected(&self, topic: &str) -> Expected {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut found = Found::default();
        let dollar = topic.starts_with('$');
        self.walk(0, &levels, 0, dollar, &mut found);
        // Oldest first per node: any matching subscription receives it.
        found.plain.sort_unstable();
        found.plain.dedup_by_key(|(n, _)| *n);
        found.shared.sort_unstable();
        found.shared.dedup_by_key(|(g, _)| *g);
        Expected {
            plain: found.plain.iter().map(|p| p.0).collect(),
            plain_since: found.plain.iter().map(|p| p.1).collect(),
            shared: found.shared.iter().map(|p| p.0).collect(),
            shared_since: found.shared.iter().map(|p| p.1).collect(),
        }
    }

    fn collect(&self, node: u32, out: &mut Found) {
        let slot = self.nodes[node as usize].slot;
        if slot == NONE {
            return;
        }
        let slot = &self.slots[slot as usize];
        out.plain.extend(slot.plain.iter().map(|&(n, _, since)| (n, since)));
        for &g in &slot.shared {
            if let Some(since) = self.groups[g as usize].members.iter().map(|m| m.2).min() {
                out.shared.push((g, since));
            }
        }
    }

    fn walk(&self, at: u32, levels: &[&str], i: usize, dollar: bool, out: &mut Found) {
        let node = self.nodes[at as usize];
        // `#` matches the parent level and everything below, but a `$`
        // topic matches no filter that starts with a wildcard.
        let wildcard_ok = !(dollar && i == 0);
        if node.hash != NONE && wildcard_ok {
            self.collect(node.hash, out);
        }
        if i == levels.len() {
            self.collect(at, out);
            return;
        }
        if node.plus != NONE && wildcard_ok {
            self.walk(node.plus, levels, i + 1, dollar, out);
        }
        if let Some(&sym) = self.symbols.get(levels[i]) {
            if let Some(&child) = self.edges.get(&(at, sym)) {
                self.walk(child, levels, i + 1, dollar, out);
            }
        }
    }

    /// What shard `key` should hold.
    pub fn shard(&self, key: &ShardKey) -> ShardTruth {
        self.shards.get(key).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dice::Dice;
    use kadmq_dht::filter_shard;

    /// The MQTT rules written out plainly, to check the trie against.
    fn plain_match(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let (f, t): (Vec<&str>, Vec<&str>) = (filter.split('/').collect(), topic.split('/').collect());
        for (i, level) in f.iter().enumerate() {
            if *level == "#" {
                return true;
            }
            match t.get(i) {
                Some(tl) if *level == "+" || level == tl => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    #[test]
    fn matching_follows_mqtt_rules() {
        let mut o = Oracle::new(1);
        let filters = ["a/b", "a/+", "a/#", "#", "+/b", "+", "a/b/c", "$SYS/#", "b/+/c"];
        for (i, f) in filters.iter().enumerate() {
            o.change(0, i as u32, f, None, 1);
        }
        let who = |t: &str| o.expected(t).plain;
        assert_eq!(who("a/b"), vec![0, 1, 2, 3, 4]);
        assert_eq!(who("a"), vec![2, 3, 5]);
        assert_eq!(who("$SYS/x"), vec![7]);
        assert_eq!(who("b/x/c"), vec![3, 8]);
    }

    #[test]
    fn trie_agrees_with_the_plain_rules() {
        let mut rng = Dice::seeded(5);
        let level = |rng: &mut Dice| *rng.choose(&["a", "b", "", "$x"]).expect("four levels");
        let mut o = Oracle::new(2);
        let mut filters = Vec::new();
        for node in 0..300u32 {
            let depth = rng.int(1..4usize);
            let mut f: Vec<&str> = (0..depth).map(|_| if rng.chance(0.3) { "+" } else { level(&mut rng) }).collect();
            if rng.chance(0.2) {
                f.push("#");
            }
            let f = f.join("/");
            o.change(0, node, &f, None, 1);
            filters.push(f);
        }
        for _ in 0..300 {
            let depth = rng.int(1..4usize);
            let topic = (0..depth).map(|_| level(&mut rng)).collect::<Vec<_>>().join("/");
            let want: Vec<u32> = (0..300u32).filter(|&n| plain_match(&filters[n as usize], &topic)).collect();
            assert_eq!(o.expected(&topic).plain, want, "topic {topic:?}");
        }
    }

    #[test]
    fn a_fault_that_cuts_a_publish_in_flight_makes_it_disturbed() {
        let partition = [20_000];
        // Published just before the split; its forward left after it.
        let cut = DeliveryWindow { published: 19_995, all_delivered: None, settled: Some(20_001) };
        assert_eq!(cut.first_overlap(&partition), Some(0));
        // Published as close, but every recipient had it before the split.
        let through = DeliveryWindow { published: 19_995, all_delivered: Some(19_999), settled: Some(20_003) };
        assert_eq!(through.first_overlap(&partition), None, "later stray forwards do not matter");
        // A loss with nothing in flight at the split stays a steady loss.
        let lost = DeliveryWindow { published: 19_990, all_delivered: None, settled: Some(19_993) };
        assert_eq!(lost.first_overlap(&partition), None);
        // Never routed: open until the run ends.
        let parked = DeliveryWindow { published: 10_000, all_delivered: None, settled: None };
        assert_eq!(parked.first_overlap(&[5_000, 30_000]), Some(1));
        // A fault that began before the publish is judged at publish time, not here.
        assert_eq!(cut.first_overlap(&[19_000]), None);
        assert!(cut.overlaps(19_995), "same millisecond as the publish");
    }

    #[test]
    fn counts_groups_and_shard_digests() {
        let mut o = Oracle::new(1);
        assert!(o.change(0, 1, "a/+", None, 1));
        assert!(!o.change(0, 1, "a/+", None, 1), "a second subscriber is not a new entry");
        assert!(o.change(0, 2, "a/+", Some("g"), 1));
        assert!(o.change(0, 3, "a/+", Some("g"), 1));
        let e = o.expected("a/x");
        assert_eq!(e.plain, vec![1]);
        let g = o.group_id("g", "a/+").unwrap();
        assert_eq!(e.shared, vec![g]);
        assert!(o.is_member(g, 3) && !o.is_member(g, 1));
        let shard = o.shard(&filter_shard("a/+", 1));
        assert_eq!(shard.entries, 3);
        assert_eq!(o.entries(), 3);
        o.change(0, 1, "a/+", None, -1);
        o.change(0, 1, "a/+", None, -1);
        o.change(0, 2, "a/+", Some("g"), -1);
        o.change(0, 3, "a/+", Some("g"), -1);
        assert_eq!(o.expected("a/x"), Expected::default());
        assert_eq!(o.shard(&filter_shard("a/+", 1)), ShardTruth::default(), "digest returns to 0");
    }

    #[test]
    fn a_split_moves_the_truth_of_deeper_filters_to_the_children() {
        let mut o = Oracle::new(1);
        o.change(0, 1, "d/x/t", None, 1);
        o.change(0, 2, "d/x/#", Some("g"), 1);
        o.change(0, 1, "d/y", None, 1);
        o.change(0, 3, "d/+/t", None, 1);
        let (parent, x, y) = (filter_shard("d", 1), ShardKey::of_prefix("d/x"), ShardKey::of_prefix("d/y"));
        assert_eq!(o.shard(&parent).entries, 4);
        assert!(o.split(parent));
        assert!(!o.split(parent), "once");
        assert_eq!(o.shard(&parent).entries, 1, "the wildcard at the split level stays");
        assert_eq!(o.shard(&x).entries, 2);
        assert_eq!(o.shard(&y).entries, 1);
        // The same digest as building the children from scratch.
        let mut fresh = Oracle::new(1);
        fresh.split(parent);
        fresh.change(0, 1, "d/x/t", None, 1);
        fresh.change(0, 2, "d/x/#", Some("g"), 1);
        assert_eq!(o.shard(&x), fresh.shard(&x));
        // A new filter goes to its child at once; one that leaves leaves it.
        o.change(0, 4, "d/x/u", None, 1);
        o.change(0, 1, "d/x/t", None, -1);
        assert_eq!(o.shard(&x).entries, 2);
        assert_eq!(o.shard(&parent).entries, 1);
    }
}
