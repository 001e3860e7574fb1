//! Tests of [`Node`]s talking to each other, through a tiny deterministic
//! in-memory network: it carries encoded frames and forwards between nodes
//! (FIFO per pair of nodes, interleaved across pairs by a seeded RNG), hands
//! out membership views and fires timers. It can lose route frames (at
//! random, or those a test picks); forwards are never lost (the glue's
//! outbox resends QoS 1/2 ones until acknowledged). It makes no routing decision; the
//! oracle it is checked against is one global table of subscriptions.

use super::*;
use crate::shard::ShardKey;
use crate::topic;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

enum Wire {
    Frame(Vec<u8>),
    Forward { msg: u64, route: ForwardRoute },
}

/// Picks route frames to lose: (from, to, frame) → lose it?
type LosePick = dyn FnMut(NodeId, NodeId, &Frame) -> bool;

struct Net {
    config: RoutingConfig,
    nodes: BTreeMap<NodeId, Node>,
    membership: Arc<Membership>,
    /// In flight, FIFO per (from, to).
    links: BTreeMap<(NodeId, NodeId), VecDeque<Wire>>,
    timers: BTreeMap<NodeId, u64>,
    now: u64,
    rng: StdRng,
    topics: BTreeMap<u64, String>,
    next_msg: u64,
    deliveries: Vec<(NodeId, u64, ForwardRoute)>,
    /// The oracle: every live node's subscriptions.
    oracle: BTreeMap<NodeId, BTreeMap<(String, Option<String>), u32>>,
    next_id: u64,
    /// Chance that a route frame is lost when sent.
    loss: f64,
    /// Route frames a test wants lost: (from, to, frame) → lose it?
    lose: Option<Box<LosePick>>,
    lost: u64,
    /// Shards split (each owner that split one counts).
    splits: u64,
    /// The largest encoded route frame sent.
    largest_frame: usize,
}

impl Net {
    fn new(seed: u64, config: RoutingConfig, ownership: OwnershipConfig, nodes: usize) -> Net {
        let mut net = Net {
            config,
            nodes: BTreeMap::new(),
            membership: Arc::new(Membership::empty(ownership)),
            links: BTreeMap::new(),
            timers: BTreeMap::new(),
            now: 0,
            rng: StdRng::seed_from_u64(seed),
            topics: BTreeMap::new(),
            next_msg: 0,
            deliveries: Vec::new(),
            oracle: BTreeMap::new(),
            next_id: 0,
            loss: 0.0,
            lose: None,
            lost: 0,
            splits: 0,
            largest_frame: 0,
        };
        let ids: Vec<NodeId> = (0..nodes).map(|_| net.fresh_id()).collect();
        for &id in &ids {
            net.nodes.insert(id, Node::with_ownership(id, net.config.clone(), ownership));
        }
        net.set_members(ids);
        net
    }

    fn fresh_id(&mut self) -> NodeId {
        self.next_id += 1;
        NodeId::from_peer_bytes(format!("peer-{}", self.next_id).as_bytes())
    }

    fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    fn set_members(&mut self, members: Vec<NodeId>) {
        self.set_members_except(members, &[]);
    }

    /// A membership change that the `late` nodes do not notice yet (they
    /// get it from [`Net::show_view`]).
    fn set_members_except(&mut self, members: Vec<NodeId>, late: &[NodeId]) {
        self.membership = Arc::new(self.membership.next(members));
        for id in self.ids() {
            if !late.contains(&id) {
                self.show_view(id);
            }
        }
    }

    fn show_view(&mut self, id: NodeId) {
        let view = self.membership.clone();
        self.handle(id, Event::Membership(view));
    }

    fn handle(&mut self, id: NodeId, event: Event<'_>) {
        let mut actions = Vec::new();
        let now = self.now;
        let Some(node) = self.nodes.get_mut(&id) else { return };
        node.handle(now, event, &mut actions).expect("valid input");
        for action in actions {
            match action {
                Action::Send { to, frame } => {
                    assert_ne!(to, id, "frames to self stay inside the core");
                    let picked = self.lose.as_mut().is_some_and(|lose| lose(id, to, &frame));
                    if picked || (self.loss > 0.0 && self.rng.gen_bool(self.loss)) {
                        self.lost += 1;
                        continue;
                    }
                    let bytes = encode(&frame);
                    self.largest_frame = self.largest_frame.max(bytes.len());
                    self.links.entry((id, to)).or_default().push_back(Wire::Frame(bytes));
                }
                Action::Forward { to, msg, route } => {
                    assert_ne!(to, id);
                    self.links.entry((id, to)).or_default().push_back(Wire::Forward { msg, route });
                }
                Action::Deliver { msg, route } => self.deliveries.push((id, msg, route)),
                Action::Routed { .. } => {}
                Action::Split { .. } => self.splits += 1,
                Action::ArmTimer { at } => {
                    self.timers.insert(id, at);
                }
            }
        }
    }

    /// Delivers one in-flight message from a random link; false if none.
    fn step(&mut self) -> bool {
        self.links.retain(|_, q| !q.is_empty());
        if self.links.is_empty() {
            return false;
        }
        let i = self.rng.gen_range(0..self.links.len());
        let (&(from, to), queue) = self.links.iter_mut().nth(i).expect("in range");
        let wire = queue.pop_front().expect("non-empty");
        if !self.nodes.contains_key(&to) {
            return true;
        }
        match wire {
            Wire::Frame(bytes) => {
                let frame = decode(&bytes).expect("decodes");
                self.handle(to, Event::Frame { from, frame });
            }
            Wire::Forward { msg, route } => {
                let topic = self.topics[&msg].clone();
                self.handle(to, Event::Forwarded { from, topic: &topic, msg, route });
            }
        }
        true
    }

    fn deliver_all(&mut self) {
        let mut steps = 0;
        while self.step() {
            steps += 1;
            assert!(steps < 5_000_000, "the network does not quiesce");
        }
    }

    /// Advances the clock by `ms`, firing timers and delivering everything.
    fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        loop {
            self.deliver_all();
            let next =
                self.timers.iter().filter(|(_, &at)| at <= end).min_by_key(|(_, &at)| at).map(|(&n, &at)| (n, at));
            let Some((id, at)) = next else { break };
            self.now = self.now.max(at);
            self.timers.remove(&id);
            self.handle(id, Event::Timer);
        }
        self.now = end;
        self.deliver_all();
    }

    /// Long enough for grace periods and two anti-entropy rounds.
    fn settle(&mut self) {
        let ms = self.config.handoff_grace_ms + 2 * self.config.anti_entropy_interval_ms + 10;
        self.run_for(ms);
    }

    fn subscribe(&mut self, id: NodeId, filter: &str, group: Option<&str>) {
        *self.oracle.entry(id).or_default().entry((filter.into(), group.map(Into::into))).or_default() += 1;
        self.handle(id, Event::Subscribe { filter, group });
    }

    fn unsubscribe(&mut self, id: NodeId, filter: &str, group: Option<&str>) {
        let subs = self.oracle.get_mut(&id).expect("has subscriptions");
        let key = (filter.to_string(), group.map(str::to_string));
        let count = subs.get_mut(&key).expect("subscribed");
        *count -= 1;
        if *count == 0 {
            subs.remove(&key);
        }
        self.handle(id, Event::Unsubscribe { filter, group });
    }

    fn join(&mut self) -> NodeId {
        let id = self.fresh_id();
        let ownership = self.membership.config();
        self.nodes.insert(id, Node::with_ownership(id, self.config.clone(), ownership));
        let mut members = self.membership.members().to_vec();
        members.push(id);
        self.set_members(members);
        id
    }

    /// Removes a node: `crash` also loses what it had in flight.
    fn remove(&mut self, id: NodeId, crash: bool) {
        self.nodes.remove(&id);
        self.timers.remove(&id);
        self.oracle.remove(&id);
        if crash {
            self.links.retain(|(from, _), _| *from != id);
        }
        let members = self.membership.members().iter().copied().filter(|n| *n != id).collect();
        self.set_members(members);
    }

    /// Publishes `topic` from `from`, runs the network, and returns who got it.
    fn publish(&mut self, from: NodeId, topic: &str) -> Vec<(NodeId, ForwardRoute)> {
        self.next_msg += 1;
        let msg = self.next_msg;
        self.topics.insert(msg, topic.to_string());
        self.handle(from, Event::Publish { topic, msg });
        self.deliver_all();
        let got = self.deliveries.iter().filter(|(_, m, _)| *m == msg).map(|(n, _, r)| (*n, r.clone())).collect();
        self.deliveries.retain(|(_, m, _)| *m != msg);
        got
    }

    /// Checks a publish's deliveries against the oracle.
    fn check(&self, topic: &str, got: &[(NodeId, ForwardRoute)]) -> Result<(), String> {
        let nodes: Vec<NodeId> = got.iter().map(|(n, _)| *n).collect();
        let distinct: BTreeSet<NodeId> = nodes.iter().copied().collect();
        if distinct.len() != nodes.len() {
            return Err(format!("{topic}: a node got it twice: {got:?}"));
        }
        let plain_expected: BTreeSet<NodeId> = self
            .oracle
            .iter()
            .filter(|(_, subs)| subs.keys().any(|(f, g)| g.is_none() && topic::matches(f, topic)))
            .map(|(n, _)| *n)
            .collect();
        let plain_got: BTreeSet<NodeId> = got.iter().filter(|(_, r)| r.plain).map(|(n, _)| *n).collect();
        if plain_expected != plain_got {
            return Err(format!("{topic}: plain delivery to {plain_got:?}, oracle says {plain_expected:?}"));
        }
        let mut groups: BTreeMap<(String, String), BTreeSet<NodeId>> = BTreeMap::new();
        for (node, subs) in &self.oracle {
            for (filter, group) in subs.keys() {
                if let Some(group) = group {
                    if topic::matches(filter, topic) {
                        groups.entry((group.clone(), filter.clone())).or_default().insert(*node);
                    }
                }
            }
        }
        let mut picked: BTreeMap<(String, String), Vec<NodeId>> = BTreeMap::new();
        for (node, route) in got {
            for pick in &route.shared {
                picked.entry((pick.group.clone(), pick.filter.clone())).or_default().push(*node);
            }
        }
        for (group, members) in &groups {
            match picked.get(group).map(Vec::as_slice) {
                Some([one]) if members.contains(one) => {}
                other => return Err(format!("{topic}: group {group:?} of {members:?} delivered to {other:?}")),
            }
        }
        if picked.keys().any(|g| !groups.contains_key(g)) {
            return Err(format!("{topic}: groups delivered {picked:?}, oracle has {groups:?}"));
        }
        Ok(())
    }

    /// The owners of the literal shard of `topic` in the current view.
    fn owners_of(&self, topic: &str) -> Vec<NodeId> {
        let prefix = topic.split('/').next().expect("one level at least");
        self.membership.owners(&ShardKey::of_prefix(prefix), self.config.replication).to_vec()
    }

    fn total_lookups(&self) -> u64 {
        self.nodes.values().map(|n| n.counters().lookups_sent).sum()
    }
}

fn test_config() -> RoutingConfig {
    RoutingConfig {
        replication: 3,
        shard_depth: 1,
        cache_capacity: 1_000,
        handoff_grace_ms: 500,
        handoff_warmup_ms: 300,
        lookup_timeout_ms: 200,
        anti_entropy_interval_ms: 1_000,
        ..RoutingConfig::default()
    }
}

#[test]
fn a_publish_reaches_subscribers_on_other_nodes_once() {
    let mut net = Net::new(1, test_config(), OwnershipConfig::Xor, 5);
    let ids = net.ids();
    net.subscribe(ids[1], "a/+", None);
    net.subscribe(ids[1], "a/b", None);
    net.subscribe(ids[2], "#", None);
    net.subscribe(ids[3], "x/y", None);
    net.settle();
    let got = net.publish(ids[0], "a/b");
    net.check("a/b", &got).unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    let got = net.publish(ids[1], "a/b");
    net.check("a/b", &got).unwrap();
    let got = net.publish(ids[4], "$SYS/x");
    assert!(got.is_empty(), "root wildcards do not match $ topics: {got:?}");
}

#[test]
fn concurrent_misses_share_one_lookup() {
    let mut net = Net::new(2, test_config(), OwnershipConfig::Xor, 5);
    let ids = net.ids();
    net.subscribe(ids[1], "s/+", None);
    net.settle();
    // A publisher that owns neither shard of "s/..." (root and "s").
    let owners_s = net.membership.owners(&ShardKey::of_prefix("s"), 3);
    let owners_root = net.membership.owners(&ShardKey::of_prefix(""), 3);
    let publisher = ids.iter().copied().find(|n| !owners_s.contains(n) && !owners_root.contains(n));
    let Some(publisher) = publisher else { return };
    let mut actions = Vec::new();
    let node = net.nodes.get_mut(&publisher).unwrap();
    for msg in 100..110 {
        node.handle(0, Event::Publish { topic: "s/x", msg }, &mut actions).unwrap();
    }
    let lookups = actions.iter().filter(|a| matches!(a, Action::Send { frame: Frame::Lookup { .. }, .. })).count();
    assert_eq!(lookups, 2, "one lookup per missing shard (root and \"s\"), not per publish");
    assert_eq!(node.parked(), 10);
    assert!(!actions.iter().any(|a| matches!(a, Action::Forward { .. })));
}

#[test]
fn shared_groups_get_each_message_once() {
    let mut net = Net::new(3, test_config(), OwnershipConfig::Xor, 5);
    let ids = net.ids();
    for &n in &ids[1..4] {
        net.subscribe(n, "jobs/+", Some("workers"));
    }
    net.subscribe(ids[4], "jobs/+", None);
    net.settle();
    let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
    for _ in 0..60 {
        let got = net.publish(ids[0], "jobs/run");
        net.check("jobs/run", &got).unwrap();
        for (n, route) in got {
            if !route.shared.is_empty() {
                *per_node.entry(n).or_default() += 1;
            }
        }
    }
    assert_eq!(per_node.values().sum::<u32>(), 60);
    assert_eq!(per_node.len(), 3, "spread over the members' nodes: {per_node:?}");
}

#[test]
fn steady_state_publishes_make_no_lookups() {
    let mut net = Net::new(4, test_config(), OwnershipConfig::Xor, 5);
    let ids = net.ids();
    for i in 0..20 {
        net.subscribe(ids[i % 5], &format!("t{i}/+"), None);
    }
    net.settle();
    for &p in &ids {
        for i in 0..20 {
            let topic = format!("t{i}/x");
            let got = net.publish(p, &topic);
            net.check(&topic, &got).unwrap();
        }
    }
    let warm = net.total_lookups();
    assert!(warm > 0);
    // Changes reach caches as pushed deltas, not as new lookups.
    net.subscribe(ids[0], "t3/x", None);
    net.unsubscribe(ids[3], "t3/+", None);
    net.deliver_all();
    for &p in &ids {
        for i in 0..20 {
            let topic = format!("t{i}/x");
            let got = net.publish(p, &topic);
            net.check(&topic, &got).unwrap();
        }
    }
    assert_eq!(net.total_lookups(), warm, "no lookup after warm-up");
    let hits: u64 = net.nodes.values().map(|n| n.counters().cache_hits + n.counters().owned_reads).sum();
    assert!(hits > 0);
}

/// The issue's balance check: 5 nodes, R = 3, 10,000 distinct filters.
#[test]
fn five_nodes_hold_three_fifths_each() {
    for ownership in [OwnershipConfig::Xor, OwnershipConfig::Ring { vnodes: 128 }] {
        let mut config = test_config();
        config.cache_capacity = 50_000;
        let mut net = Net::new(5, config, ownership, 5);
        let ids = net.ids();
        for i in 0..10_000 {
            net.subscribe(ids[0], &format!("f{i}/x"), None);
        }
        net.settle();
        let owned: Vec<usize> = ids.iter().map(|n| net.nodes[n].entries_owned()).collect();
        assert_eq!(owned.iter().sum::<usize>(), 30_000, "{ownership:?}: each entry on exactly R owners");
        let (lo, hi) = match ownership {
            OwnershipConfig::Xor => (3_500, 8_500),
            OwnershipConfig::Ring { .. } => (4_500, 7_500),
        };
        assert!(owned.iter().all(|&e| (lo..=hi).contains(&e)), "{ownership:?}: {owned:?}");
        eprintln!("{ownership:?}: entries per node {owned:?} (ideal 6000)");
        // Warm up one publisher, then publish again: no lookups.
        for i in 0..10_000 {
            net.publish(ids[1], &format!("f{i}/x"));
        }
        let warm = net.total_lookups();
        for i in (0..10_000).step_by(7) {
            let topic = format!("f{i}/x");
            let got = net.publish(ids[1], &topic);
            assert_eq!(got.len(), 1);
        }
        assert_eq!(net.total_lookups(), warm, "{ownership:?}");
    }
}

#[test]
fn a_crashed_nodes_entries_disappear_and_replicas_return_to_r() {
    let mut net = Net::new(6, test_config(), OwnershipConfig::Xor, 6);
    let ids = net.ids();
    for (i, &n) in ids.iter().enumerate() {
        net.subscribe(n, &format!("k{i}/#"), None);
        net.subscribe(n, "all/+", None);
    }
    net.settle();
    for &p in &ids {
        net.publish(p, "all/x");
    }
    let victim = ids[2];
    net.remove(victim, true);
    net.settle();
    let key = ShardKey::of_prefix("all");
    let holders: Vec<NodeId> =
        net.nodes.values().filter(|n| n.owned_shard(&key).is_some_and(|s| !s.is_empty())).map(|n| n.id()).collect();
    assert_eq!(holders.len(), 3, "back to R replicas");
    for n in net.nodes.values() {
        if let Some(shard) = n.owned_shard(&key) {
            assert!(shard.entries_of(victim).is_empty());
            assert_eq!(shard.len(), 5);
        }
    }
    for p in net.ids() {
        let got = net.publish(p, "all/x");
        net.check("all/x", &got).unwrap();
    }
}

#[test]
fn anti_entropy_repairs_a_replica_that_lost_entries() {
    let mut net = Net::new(7, test_config(), OwnershipConfig::Xor, 5);
    let ids = net.ids();
    net.subscribe(ids[0], "r/a", None);
    net.subscribe(ids[1], "r/+", Some("g"));
    net.settle();
    let key = ShardKey::of_prefix("r");
    let owners = net.membership.owners(&key, 3);
    // Corrupt one replica behind the protocol's back: it forgets node 0 and
    // invents an entry for node 1.
    let victim = owners[1];
    {
        let shard = net.nodes.get_mut(&victim).unwrap().owned.get_mut(&key).unwrap();
        shard.remove_node(ids[0]);
        shard.set(ids[1], "r/zzz", None, 1);
    }
    let repairs_before: u64 = net.nodes.values().map(|n| n.counters().repairs_requested).sum();
    net.settle();
    let repairs: u64 = net.nodes.values().map(|n| n.counters().repairs_requested).sum();
    assert!(repairs > repairs_before);
    let digests: BTreeSet<u64> = owners.iter().map(|o| net.nodes[o].owned_shard(&key).unwrap().digest()).collect();
    assert_eq!(digests.len(), 1, "replicas agree again");
    assert_eq!(net.nodes[&victim].owned_shard(&key).unwrap().len(), 2);
}

/// Every owner of `filter`'s shard holds `node`'s entry for it (count > 0).
fn owners_hold(net: &Net, node: NodeId, filter: &str) -> bool {
    let key = crate::shard::filter_shard(filter, net.config.shard_depth);
    let owners = net.membership.owners(&key, net.config.replication);
    owners.iter().all(|o| {
        net.nodes[o]
            .owned_shard(&key)
            .and_then(|s| s.routes().get(filter))
            .is_some_and(|r| r.nodes.iter().any(|&(n, c)| n == node && c > 0))
    })
}

#[test]
fn a_lost_assertion_is_sent_again_until_every_owner_acknowledged_it() {
    let mut net = Net::new(21, test_config(), OwnershipConfig::Xor, 4);
    let ids = net.ids();
    let subscriber = ids[0];
    // The first two assertions from the subscriber are lost on every link.
    let mut left = 2 * 3;
    net.lose = Some(Box::new(move |from, _, frame| {
        let lose = from == subscriber && matches!(frame, Frame::Assert { .. }) && left > 0;
        left -= lose as u32;
        lose
    }));
    net.subscribe(subscriber, "q/one", None);
    let ticket = net.nodes[&subscriber].ticket("q/one").expect("a shard");
    net.deliver_all();
    let owners = net.membership.owners(&ticket.shard, 3);
    let remote = owners.iter().any(|o| *o != subscriber);
    assert!(remote, "the test needs an owner other than the subscriber");
    assert!(!net.nodes[&subscriber].settled(&ticket), "nobody acknowledged a lost assertion");
    assert!(!owners_hold(&net, subscriber, "q/one"));
    net.run_for(test_config().assert_retry_ms + 1);
    assert!(net.nodes[&subscriber].counters().assertions_retried > 0);
    // The first retry was lost too (where it went to another node); the
    // next one, after the back-off, gets through.
    net.run_for(2 * test_config().assert_retry_ms + 1);
    assert!(owners_hold(&net, subscriber, "q/one"), "every owner has it after the retries");
    assert!(net.nodes[&subscriber].settled(&ticket));
    assert_eq!(net.nodes[&subscriber].unsettled_shards(), 0);
}

#[test]
fn a_missing_assertion_is_noticed_by_the_next_and_replaced() {
    let mut config = test_config();
    config.assert_retry_ms = 1_000_000; // only the gap can repair it here
    let mut net = Net::new(22, config, OwnershipConfig::Xor, 3);
    let ids = net.ids();
    let subscriber = ids[0];
    net.subscribe(subscriber, "g/a", None);
    net.settle();
    // Lose the next assertion of the shard, once per link.
    let mut lost = BTreeSet::new();
    net.lose = Some(Box::new(move |from, to, frame| {
        from == subscriber && matches!(frame, Frame::Assert { .. }) && lost.insert(to)
    }));
    net.subscribe(subscriber, "g/b", None);
    net.deliver_all();
    assert!(!owners_hold(&net, subscriber, "g/b"));
    net.subscribe(subscriber, "g/c", None);
    net.deliver_all();
    let gaps: u64 = net.nodes.values().map(|n| n.counters().assertion_gaps).sum();
    assert!(gaps > 0, "owners saw the gap");
    for filter in ["g/a", "g/b", "g/c"] {
        assert!(owners_hold(&net, subscriber, filter), "{filter} everywhere after the replacement");
    }
    let ticket = net.nodes[&subscriber].ticket("g/c").unwrap();
    assert!(net.nodes[&subscriber].settled(&ticket));
}

#[test]
fn a_lost_delta_is_noticed_by_the_next_one_or_the_watch_check() {
    let mut net = Net::new(23, test_config(), OwnershipConfig::Xor, 5);
    // A publisher that owns no copy of the shard reads it from its cache.
    let owners = net.owners_of("w/x");
    let publisher = *net.ids().iter().find(|n| !owners.contains(n)).unwrap();
    let ids: Vec<NodeId> = net.ids().into_iter().filter(|n| *n != publisher).collect();
    net.subscribe(ids[1], "w/x", None);
    net.settle();
    let got = net.publish(publisher, "w/x");
    net.check("w/x", &got).unwrap();
    let lookups = net.total_lookups();
    // Lose every delta to the publisher: the last one has no successor.
    net.lose = Some(Box::new(move |_, to, frame| to == publisher && matches!(frame, Frame::Delta { .. })));
    net.subscribe(ids[2], "w/x", None);
    net.deliver_all();
    let got = net.publish(publisher, "w/x");
    assert!(net.check("w/x", &got).is_err(), "the stale copy misses the new subscriber");
    net.lose = None;
    // The watch check of the next anti-entropy round finds the copy stale.
    net.run_for(2 * test_config().anti_entropy_interval_ms + 10);
    assert!(net.nodes[&publisher].counters().watch_mismatches > 0);
    let got = net.publish(publisher, "w/x");
    net.check("w/x", &got).unwrap();
    assert!(net.total_lookups() > lookups, "looked up again");

    // A lost delta followed by another: the gap is seen at once.
    let mut first = true;
    net.lose = Some(Box::new(move |_, to, frame| {
        let lose = to == publisher && matches!(frame, Frame::Delta { .. }) && first;
        first &= !lose;
        lose
    }));
    net.subscribe(ids[3], "w/x", None);
    net.deliver_all();
    net.lose = None;
    net.subscribe(ids[0], "w/x", None);
    net.deliver_all();
    assert!(net.nodes[&publisher].counters().delta_gaps > 0);
    let got = net.publish(publisher, "w/x");
    net.check("w/x", &got).unwrap();
}

#[test]
fn the_subscriber_check_repairs_an_owner_that_lost_its_entries() {
    // One replica: there is no other owner to compare with.
    let mut config = test_config();
    config.replication = 1;
    let mut net = Net::new(24, config, OwnershipConfig::Xor, 3);
    let ids = net.ids();
    let key = ShardKey::of_prefix("s");
    let owner = net.membership.owners(&key, 1)[0];
    let subscriber = *ids.iter().find(|n| **n != owner).unwrap();
    net.subscribe(subscriber, "s/a", None);
    net.subscribe(subscriber, "s/+", None);
    net.settle();
    net.nodes.get_mut(&owner).unwrap().owned.get_mut(&key).unwrap().remove_node(subscriber);
    assert!(!owners_hold(&net, subscriber, "s/a"));
    net.run_for(2 * test_config().anti_entropy_interval_ms + 10);
    assert!(owners_hold(&net, subscriber, "s/a") && owners_hold(&net, subscriber, "s/+"));
    assert!(net.nodes[&owner].counters().repairs_requested > 0);
}

#[test]
fn a_joining_node_takes_over_shards_and_old_owners_let_go() {
    let mut net = Net::new(8, test_config(), OwnershipConfig::Ring { vnodes: 16 }, 4);
    let ids = net.ids();
    for i in 0..300 {
        net.subscribe(ids[i % 4], &format!("m{i}"), None);
    }
    net.settle();
    let before: usize = net.nodes.values().map(|n| n.entries_held()).sum();
    assert_eq!(before, 900);
    let newcomer = net.join();
    // Right after the join, old owners still hold their shards (grace).
    net.deliver_all();
    assert!(net.nodes.values().map(|n| n.entries_held()).sum::<usize>() > 900);
    net.settle();
    assert_eq!(net.nodes.values().map(|n| n.entries_held()).sum::<usize>(), 900);
    let moved = net.nodes[&newcomer].entries_owned();
    // Ideal: 900 entries / 5 nodes = 180 move to the newcomer.
    assert!((100..300).contains(&moved), "moved {moved} of 900 to the newcomer (ideal 180)");
    for i in (0..300).step_by(13) {
        let topic = format!("m{i}");
        let got = net.publish(newcomer, &topic);
        net.check(&topic, &got).unwrap();
    }
}

/// Publishes every topic from every node but `except` and checks each
/// against the oracle.
fn every_publish_reaches_its_subscribers(net: &mut Net, topics: &[String], except: &[NodeId]) -> Result<(), String> {
    for publisher in net.ids().into_iter().filter(|n| !except.contains(n)) {
        for topic in topics {
            let got = net.publish(publisher, topic);
            net.check(topic, &got).map_err(|e| format!("from {publisher:?}: {e}"))?;
        }
    }
    Ok(())
}

/// A shard that passes `split_entries` while publishes flow splits by the
/// next level: every publish made at any point of the move (with frames
/// still in flight, timers firing in between) reaches exactly the nodes the
/// global table names; afterwards the filters sit in the child shards,
/// spread over their owners, and the parent holds none.
#[test]
fn a_hot_shard_splits_without_missing_a_publish() {
    let seeds: u64 = std::env::var("SPLIT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    for seed in 0..seeds {
        let mut config = test_config();
        // Passed between two flushes, so the split and the moves happen
        // while frames are in flight.
        config.split_entries = 42 + seed as usize % 6;
        let mut net = Net::new(300 + seed, config, OwnershipConfig::Xor, 5);
        let ids = net.ids();
        let topic = |i: usize| format!("dev/d{i}/t");
        let mut published: Vec<(u64, String)> = Vec::new();
        // Subscriptions made before the last time everything was delivered:
        // every publisher has heard of them. (One made since may not be in
        // a publisher's cached copy yet even once its owners acknowledged
        // it: a known race of any subscribe, split or not.)
        let mut flushed = 0;
        for i in 0..120 {
            net.subscribe(ids[i % ids.len()], &topic(i), None);
            // A wildcard at the split level: it stays in the parent.
            net.subscribe(ids[(i + 1) % ids.len()], "dev/+/t", None);
            net.unsubscribe(ids[(i + 1) % ids.len()], "dev/+/t", None);
            for _ in 0..net.rng.gen_range(0..30) {
                net.step();
            }
            // Publishes to devices made with frames in flight: the split
            // and the moves happen among them.
            let settled: Vec<usize> = (0..flushed).collect();
            for _ in 0..4 {
                if settled.is_empty() {
                    break;
                }
                let t = topic(settled[net.rng.gen_range(0..settled.len())]);
                let publisher = ids[net.rng.gen_range(0..ids.len())];
                net.next_msg += 1;
                net.topics.insert(net.next_msg, t.clone());
                net.handle(publisher, Event::Publish { topic: &t, msg: net.next_msg });
                published.push((net.next_msg, t));
                for _ in 0..net.rng.gen_range(0..8) {
                    net.step();
                }
            }
            // Now and then time passes: moves finish, tails go out. (Frames
            // do not wait across it: the warm-up covers their travel.)
            if i % 10 == 9 {
                net.run_for(100);
                flushed = i + 1;
            }
        }
        net.settle();
        for (msg, t) in &published {
            let got: Vec<(NodeId, ForwardRoute)> =
                net.deliveries.iter().filter(|(_, m, _)| m == msg).map(|(n, _, r)| (*n, r.clone())).collect();
            net.check(t, &got).unwrap_or_else(|e| panic!("seed {seed}, message {msg}: {e}"));
        }
        assert!(net.splits >= 1, "seed {seed}: the shard split");
        let parent = ShardKey::of_prefix("dev");
        for node in net.nodes.values() {
            assert_eq!(node.owned_shard(&parent).map_or(0, |s| s.len()), 0, "seed {seed}: the parent let go");
        }
        let owned: Vec<usize> = net.nodes.values().map(|n| n.entries_owned()).collect();
        let mean = owned.iter().sum::<usize>() as f64 / owned.len() as f64;
        let max = *owned.iter().max().expect("nodes") as f64;
        assert!(max <= 1.25 * mean, "seed {seed}: entries per node {owned:?}");
        // A node that publishes to one device caches only that device's path.
        let fresh = net.join();
        net.settle();
        let got = net.publish(fresh, &topic(7));
        net.check(&topic(7), &got).unwrap();
        assert!(
            net.nodes[&fresh].cache().entries() <= 1,
            "seed {seed}: {} cached",
            net.nodes[&fresh].cache().entries()
        );
    }
}

/// A node asked to re-assert a shard it holds nothing of (a repair) keeps
/// a record of that shard until the owners acknowledge; a filter it
/// subscribes meanwhile is its first there. When the shard splits, that
/// filter (a wildcard at the split level) stays in it.
#[test]
fn a_filter_that_stays_in_a_split_shard_is_not_withdrawn_from_it() {
    let mut config = test_config();
    config.split_entries = 20;
    let mut net = Net::new(77, config, OwnershipConfig::Xor, 5);
    let ids = net.ids();
    let owners = net.owners_of("dev/x");
    let node = *ids.iter().find(|n| !owners.contains(n)).expect("a node that owns no copy");
    let repair = Frame::Reassert { shards: vec![ShardKey::of_prefix("dev")] };
    net.handle(node, Event::Frame { from: owners[0], frame: repair });
    // Subscribed before the owners acknowledged the (empty) re-assertion.
    net.subscribe(node, "dev/+/t", None);
    for i in 0..30 {
        net.subscribe(ids[i % ids.len()], &format!("dev/d{i}/t"), None);
    }
    net.settle();
    assert!(net.splits >= 1, "the shard split");
    for publisher in net.ids() {
        for topic in ["dev/zz/t", "dev/d3/t"] {
            let got = net.publish(publisher, topic);
            net.check(topic, &got).unwrap();
        }
    }
}

/// A shard too large for one frame is answered, re-asserted to a new owner
/// and dropped (its node crashed) in parts, and arrives whole.
#[test]
fn a_large_shard_travels_in_parts_and_arrives_whole() {
    let mut config = test_config();
    config.split_entries = 0;
    config.frame_chunk_bytes = 300;
    let mut net = Net::new(41, config, OwnershipConfig::Xor, 5);
    let ids = net.ids();
    let owners = net.owners_of("big/x");
    let publisher = *ids.iter().find(|n| !owners.contains(n)).expect("a node that owns no copy");
    let (subscriber, other) = {
        let mut rest = ids.iter().copied().filter(|n| *n != publisher);
        (rest.next().expect("four others"), rest.next().expect("four others"))
    };
    for i in 0..300 {
        net.subscribe(subscriber, &format!("big/f{i}"), None);
    }
    for i in 0..100 {
        net.subscribe(other, &format!("big/g{i}"), Some("grp"));
    }
    net.settle();
    // The first part of the first answer to the publisher is lost: the
    // rest is no answer (the next owner is asked).
    let mut lost_one = false;
    net.lose = Some(Box::new(move |_, to, frame| {
        let first = !lost_one && to == publisher && matches!(frame, Frame::LookupReply { part: 0, more: true, .. });
        lost_one |= first;
        first
    }));
    let before = net.nodes[&publisher].counters().received(FrameKind::LookupReply);
    for topic in ["big/f17", "big/g5"] {
        let got = net.publish(publisher, topic);
        net.check(topic, &got).unwrap();
    }
    net.lose = None;
    assert_eq!(net.lost, 1, "a part was lost");
    let parts = net.nodes[&publisher].counters().received(FrameKind::LookupReply) - before;
    assert!(parts > 10, "400 entries in 300-byte parts: {parts} replies");
    assert_eq!(net.nodes[&publisher].cache().entries(), 400, "the answer arrived whole");
    // A new node takes over copies: the re-assertions to it come in parts.
    let fresh = net.join();
    net.settle();
    let key = ShardKey::of_prefix("big");
    for owner in net.owners_of("big/x") {
        assert_eq!(net.nodes[&owner].owned_shard(&key).map_or(0, |s| s.len()), 400, "{owner:?} holds it all");
    }
    assert!(net.nodes[&fresh].counters().received(FrameKind::Assert) > 10);
    // The crash of `other` removes 100 entries: deltas in parts.
    net.remove(other, true);
    net.settle();
    for topic in ["big/f3", "big/g5", "big/f299"] {
        let got = net.publish(publisher, topic);
        net.check(topic, &got).unwrap();
    }
    assert_eq!(net.nodes[&publisher].cache().entries(), 300);
    assert!(net.largest_frame < 1_000, "the largest route frame had {} bytes", net.largest_frame);
}

/// The subscriber has not noticed the change (its re-assertions to the new
/// owners are not even sent) while everyone else, new owners included,
/// already routes by the new view: new owners must defer to the owners of
/// longer standing rather than answer from their empty copies.
#[test]
fn a_new_owner_defers_to_older_owners_until_reassertions_arrive() {
    for seed in 0..8 {
        let mut net = Net::new(100 + seed, test_config(), OwnershipConfig::Xor, 5);
        let subscriber = net.ids()[0];
        let topics: Vec<String> = (0..40).map(|i| format!("t{i}/x")).collect();
        for topic in &topics {
            net.subscribe(subscriber, topic, None);
        }
        net.settle();
        every_publish_reaches_its_subscribers(&mut net, &topics, &[]).unwrap();

        // A node joins; the subscriber hears of it late.
        let joiner = net.fresh_id();
        net.nodes.insert(joiner, Node::with_ownership(joiner, net.config.clone(), OwnershipConfig::Xor));
        let mut members = net.membership.members().to_vec();
        members.push(joiner);
        net.set_members_except(members, &[subscriber]);
        let taken = topics.iter().filter(|t| net.owners_of(t).contains(&joiner)).count();
        assert!(taken > 0, "seed {seed}: the joiner owns none of the shards");
        every_publish_reaches_its_subscribers(&mut net, &topics, &[])
            .unwrap_or_else(|e| panic!("seed {seed}, join: {e}"));

        // An owner crashes; the subscriber hears of it late.
        net.show_view(subscriber);
        net.settle();
        let victim = net.ids().into_iter().find(|n| *n != subscriber && *n != joiner).unwrap();
        net.nodes.remove(&victim);
        net.timers.remove(&victim);
        net.links.retain(|(from, _), _| *from != victim);
        let members = net.membership.members().iter().copied().filter(|n| *n != victim).collect();
        net.set_members_except(members, &[subscriber]);
        // (The subscriber itself, still taking the victim for alive, may
        // wait for a lookup to time out: not a publisher here.)
        every_publish_reaches_its_subscribers(&mut net, &topics, &[subscriber])
            .unwrap_or_else(|e| panic!("seed {seed}, crash: {e}"));

        // Once it has caught up and the warm-up is over, the new owners
        // answer on their own: still every publish arrives.
        net.show_view(subscriber);
        net.settle();
        every_publish_reaches_its_subscribers(&mut net, &topics, &[]).unwrap();
    }
}

/// With one owner per shard, a joining node takes a shard over before it
/// has seen its own join: the publisher's only candidate says "not mine".
/// The lookup is asked again until views agree, instead of routing the
/// publish to nobody.
#[test]
fn a_lookup_nobody_answers_right_after_a_change_is_asked_again() {
    let mut config = test_config();
    config.replication = 1;
    let mut net = Net::new(7, config.clone(), OwnershipConfig::Xor, 4);
    let ids = net.ids();
    let subscriber = ids[0];
    let topics: Vec<String> = (0..60).map(|i| format!("r{i}/x")).collect();
    for topic in &topics {
        net.subscribe(subscriber, topic, None);
    }
    net.settle();
    let joiner = net.fresh_id();
    net.nodes.insert(joiner, Node::with_ownership(joiner, config, OwnershipConfig::Xor));
    let mut members = net.membership.members().to_vec();
    members.push(joiner);
    net.set_members_except(members, &[joiner]);
    // A topic the joiner now owns, published by a node that is neither.
    let topic = topics.iter().find(|t| net.owners_of(t) == vec![joiner]).expect("the joiner owns a shard").clone();
    let publisher = ids.iter().copied().find(|n| *n != subscriber).unwrap();
    net.next_msg += 1;
    let msg = net.next_msg;
    net.topics.insert(msg, topic.clone());
    net.handle(publisher, Event::Publish { topic: &topic, msg });
    net.deliver_all();
    assert!(net.deliveries.iter().all(|(_, m, _)| *m != msg), "not routed while the only owner says not mine");
    // The joiner hears of its join; the retried lookup finds the route.
    net.show_view(joiner);
    net.run_for(500);
    let got: Vec<NodeId> = net.deliveries.iter().filter(|(_, m, _)| *m == msg).map(|(n, _, _)| *n).collect();
    assert_eq!(got, vec![subscriber], "{topic} reaches its subscriber once views agree");
    assert_eq!(net.nodes[&publisher].counters().lookups_failed, 0);
}

#[test]
fn frames_round_trip_through_the_harness() {
    let mut net = Net::new(9, test_config(), OwnershipConfig::Xor, 3);
    let ids = net.ids();
    net.subscribe(ids[0], "w/#", Some("g"));
    net.settle();
    let sent: u64 = net.nodes.values().map(|n| FrameKind::ALL.iter().map(|k| n.counters().sent(*k)).sum::<u64>()).sum();
    let received: u64 =
        net.nodes.values().map(|n| FrameKind::ALL.iter().map(|k| n.counters().received(*k)).sum::<u64>()).sum();
    assert!(sent > 0);
    assert_eq!(sent, received, "every frame encoded, carried, decoded");
}

mod churn {
    use super::*;
    use proptest::prelude::*;

    // Shard depth 1: "a", "b" and "c" hold several filters each, some of
    // them deeper than one level, so a small `split_entries` splits them
    // (and their children) in the middle of the churn.
    const FILTERS: &[&str] = &[
        "a/b", "a/+", "a/#", "#", "+/b", "+", "b", "b/c/d", "b/+/d", "$SYS/x", "$SYS/#", "c/d", "+/+/d", "c/#",
        "a/b/c", "a/b/#", "a/c/+", "b/c/#", "b/d",
    ];
    const TOPICS: &[&str] = &["a/b", "a", "b", "b/c/d", "$SYS/x", "c/d", "x/b", "a/b/c", "c", "a/c/d", "b/d"];
    const GROUPS: &[Option<&str>] = &[None, None, Some("g1"), Some("g2")];

    #[derive(Clone, Debug)]
    enum Op {
        Subscribe {
            node: usize,
            filter: usize,
            group: usize,
        },
        Unsubscribe {
            node: usize,
            sub: usize,
        },
        Join,
        Leave {
            node: usize,
        },
        Crash {
            node: usize,
        },
        /// Deliver some messages now (interleaves protocol steps with events).
        Deliver {
            messages: usize,
        },
        Tick {
            ms: u64,
        },
        /// Publish without checking (warms caches; parks on lookups mid-churn).
        Publish {
            node: usize,
            topic: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<usize>(), 0..FILTERS.len(), 0..GROUPS.len())
                .prop_map(|(node, filter, group)| Op::Subscribe { node, filter, group }),
            3 => (any::<usize>(), any::<usize>()).prop_map(|(node, sub)| Op::Unsubscribe { node, sub }),
            1 => Just(Op::Join),
            1 => any::<usize>().prop_map(|node| Op::Leave { node }),
            1 => any::<usize>().prop_map(|node| Op::Crash { node }),
            3 => (0usize..30).prop_map(|messages| Op::Deliver { messages }),
            1 => (0u64..800).prop_map(|ms| Op::Tick { ms }),
            4 => (any::<usize>(), 0..TOPICS.len()).prop_map(|(node, topic)| Op::Publish { node, topic }),
        ]
    }

    fn apply(net: &mut Net, op: &Op) {
        let ids = net.ids();
        match *op {
            Op::Subscribe { node, filter, group } => {
                net.subscribe(ids[node % ids.len()], FILTERS[filter], GROUPS[group]);
            }
            Op::Unsubscribe { node, sub } => {
                let id = ids[node % ids.len()];
                let subs: Vec<(String, Option<String>)> =
                    net.oracle.get(&id).map(|s| s.keys().cloned().collect()).unwrap_or_default();
                if !subs.is_empty() {
                    let (filter, group) = subs[sub % subs.len()].clone();
                    net.unsubscribe(id, &filter, group.as_deref());
                }
            }
            Op::Join => {
                if ids.len() < 8 {
                    net.join();
                }
            }
            Op::Leave { node } | Op::Crash { node } => {
                if ids.len() > 1 {
                    net.remove(ids[node % ids.len()], matches!(op, Op::Crash { .. }));
                }
            }
            Op::Deliver { messages } => {
                for _ in 0..messages {
                    net.step();
                }
            }
            Op::Publish { node, topic } => {
                let id = ids[node % ids.len()];
                net.next_msg += 1;
                let msg = net.next_msg;
                net.topics.insert(msg, TOPICS[topic].to_string());
                net.handle(id, Event::Publish { topic: TOPICS[topic], msg });
            }
            Op::Tick { ms } => {
                // Time passes with messages in flight: fire due timers only.
                net.now += ms;
                let due: Vec<NodeId> = net.timers.iter().filter(|(_, &at)| at <= net.now).map(|(&n, _)| n).collect();
                for n in due {
                    net.timers.remove(&n);
                    net.handle(n, Event::Timer);
                }
            }
        }
    }

    proptest! {
        // 96 cases by default; PROPTEST_CASES=2000 for a longer hunt.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96),
            ..ProptestConfig::default()
        })]

        /// After any churn, once the network settles, every publish from
        /// every node reaches exactly the nodes the global table names.
        #[test]
        fn settled_cluster_delivers_exactly_what_the_oracle_says(
            seed in any::<u64>(),
            nodes in 1usize..6,
            replication in 1usize..4,
            ring in any::<bool>(),
            lossy in any::<bool>(),
            split_entries in prop_oneof![Just(0usize), 1usize..4],
            // Small enough that answers, re-assertions and deltas of a few
            // entries go in parts.
            chunk in prop_oneof![Just(super::node::DEFAULT_FRAME_CHUNK_BYTES), 20usize..120],
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut config = test_config();
            config.replication = replication;
            config.split_entries = split_entries;
            config.frame_chunk_bytes = chunk;
            let ownership = if ring { OwnershipConfig::Ring { vnodes: 8 } } else { OwnershipConfig::Xor };
            let mut net = Net::new(seed, config, ownership, nodes);
            // Lossy cases lose 5% of the route frames during the churn and
            // for a while after it; then the network is quiet and only the
            // nodes' own timers (retries, anti-entropy) repair what was lost.
            net.loss = if lossy { 0.05 } else { 0.0 };
            for op in &ops {
                apply(&mut net, op);
            }
            if lossy {
                net.run_for(5_000);
                net.loss = 0.0;
                // Retries back off to several seconds.
                net.run_for(40_000);
            }
            net.settle();
            net.deliveries.clear();
            for publisher in net.ids() {
                for topic in TOPICS {
                    let got = net.publish(publisher, topic);
                    if let Err(e) = net.check(topic, &got) {
                        return Err(TestCaseError::fail(format!("seed {seed}, from {publisher:?}: {e}")));
                    }
                }
            }
            // Publishing again makes no lookups: caches hold, deltas flow.
            let warm = net.total_lookups();
            for publisher in net.ids() {
                for topic in TOPICS {
                    let got = net.publish(publisher, topic);
                    prop_assert!(net.check(topic, &got).is_ok());
                }
            }
            prop_assert_eq!(net.total_lookups(), warm);
        }
    }
}

#[test]
fn owners_hold_each_nodes_subscriber_count() {
    let mut net = Net::new(11, test_config(), OwnershipConfig::Xor, 4);
    let ids = net.ids();
    let (a, b) = (ids[0], ids[1]);
    let counts = |net: &Net, filter: &str| -> Vec<Vec<(NodeId, u32)>> {
        let key = ShardKey::of_prefix(filter);
        let mut seen: Vec<Vec<(NodeId, u32)>> = net
            .nodes
            .values()
            .filter_map(|n| n.owned_shard(&key))
            .filter_map(|s| s.routes().get(filter).map(|r| r.nodes.to_vec()))
            .collect();
        seen.dedup();
        seen
    };
    for _ in 0..3 {
        net.subscribe(a, "cnt", None);
    }
    net.subscribe(b, "cnt", None);
    net.settle();
    let mut want = vec![(a, 3), (b, 1)];
    want.sort();
    assert_eq!(counts(&net, "cnt"), vec![want], "every owner agrees on the counts");
    net.unsubscribe(a, "cnt", None);
    net.settle();
    let mut want = vec![(a, 2), (b, 1)];
    want.sort();
    assert_eq!(counts(&net, "cnt"), vec![want]);
}
