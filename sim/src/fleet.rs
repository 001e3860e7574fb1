//! The simulated fleet: the routing core of `kadmq-dht`, one [`Node`] per
//! virtual member, driven through its events on the virtual network and
//! clock, with the workload and faults of a scenario.
//!
//! This is the adapter between the core and the simulator. It turns the
//! core's [`Action`]s into timed network events (`Send` → a frame arriving
//! later, `Forward` → a forwarded publish arriving later, `ArmTimer` → a
//! timer event, `Deliver` → a delivery checked against the oracle) and
//! feeds arrivals back as [`Event`]s. Liveness is decided here, as the
//! driver's gossip does in a real fleet: a crash is noticed `detect_ms`
//! later, and each node learns of a new membership view after its own
//! gossip delay, so views differ between nodes for a while, as they do.
//!
//! Boundary: no routing decision is made here. Which owners hold a shard,
//! what a publisher asks and whom it forwards to all come from the core.

use crate::dice::Dice;
use crate::engine::{EventQueue, Millis};
use crate::network::{Fate, Network, FORWARD, KINDS};
use crate::oracle::{DeliveryWindow, Expected, Oracle};
use crate::scenario::Scenario;
use crate::workload::{Subscription, Workload};
use kadmq_dht::core::Ownership as _;
use kadmq_dht::core::{
    encode, Action, Counters, Event, ForwardRoute, Frame, Membership, Node, NodeId, OwnershipConfig, RoutingConfig,
};
use kadmq_dht::ShardKey;
use std::sync::Arc;

/// Something that happens at a virtual instant.
enum SimEvent {
    Frame { from: u32, to: u32, frame: Frame },
    Forward { from: u32, to: u32, msg: u64, route: ForwardRoute },
    Timer { node: u32, at: Millis },
    View { node: u32, view: Arc<Membership> },
    Subscribe { node: u32, sub: Subscription },
    Publish,
    Join,
    Leave,
    Crash,
    CrashNoticed { node: u32, record: usize },
    PartitionStart { index: usize },
    PartitionNoticed,
    Heal,
    Audit,
}

/// What disturbed the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Disturbance {
    Bootstrap,
    Join,
    Leave,
    Crash,
    Partition,
    Heal,
}

impl Disturbance {
    pub const ALL: [Disturbance; 6] = [
        Disturbance::Bootstrap,
        Disturbance::Join,
        Disturbance::Leave,
        Disturbance::Crash,
        Disturbance::Partition,
        Disturbance::Heal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Disturbance::Bootstrap => "bootstrap",
            Disturbance::Join => "join",
            Disturbance::Leave => "leave",
            Disturbance::Crash => "crash",
            Disturbance::Partition => "partition",
            Disturbance::Heal => "heal",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One disturbance and when the fleet had converged again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DisturbanceRecord {
    pub kind: Disturbance,
    pub at_ms: Millis,
    /// Live nodes (in the view) when it happened.
    pub nodes: usize,
    /// Entries of the full table when it happened.
    pub entries: u64,
    /// First audit at which the fleet had converged again (None: never
    /// within the run). For a join, leave or crash: every owner of the
    /// shards whose owners it changed held exactly the oracle's entries
    /// (a crash counts from the crash, so detection time is included). For
    /// the bootstrap, a partition or a heal (and for everything still open
    /// then): the whole table agreed with the oracle, every node had the
    /// current view and no partition was in force.
    pub converged_at_ms: Option<Millis>,
}

/// One publish and what became of it.
pub struct MsgRecord {
    pub topic: Box<str>,
    pub at: Millis,
    /// No disturbance was open when it was published, and none started
    /// within its delivery window ([`DeliveryWindow`]).
    pub steady: bool,
    /// The latest disturbance not yet converged when it was published or,
    /// for one published in steady state, the first that started within
    /// its delivery window.
    pub cause: Option<Disturbance>,
    pub expected: Expected,
    /// Deliveries per expected plain node (same order as `expected.plain`).
    pub plain_got: Vec<u8>,
    pub shared_got: Vec<u8>,
    /// Deliveries to nodes or groups the oracle did not expect.
    pub unexpected: u32,
    /// When the publisher finished routing it (None: never, e.g. it died
    /// with the publish parked on a lookup).
    pub routed_at: Option<Millis>,
    /// When the last forward it sent arrived or was dropped.
    pub last_forward_at: Millis,
    /// When an expected node or group last got its first copy.
    pub last_first_delivery_at: Millis,
}

impl MsgRecord {
    /// Did every expected node and group get it?
    pub fn complete(&self) -> bool {
        self.plain_got.iter().chain(&self.shared_got).all(|&got| got > 0)
    }

    /// The span in which a fault could still have changed its deliveries.
    pub fn window(&self) -> DeliveryWindow {
        DeliveryWindow {
            published: self.at,
            all_delivered: self.complete().then_some(self.last_first_delivery_at),
            settled: self.routed_at.map(|at| at.max(self.last_forward_at)),
        }
    }
}

/// One audit of the route table against the oracle.
#[derive(Clone, Copy, Debug)]
pub struct AuditPoint {
    pub at: Millis,
    /// Replicas (shard × owner) that hold exactly the oracle's entries.
    pub replicas_ok: u64,
    pub replicas: u64,
    /// Shards in publishers' route caches whose entry count differs from
    /// the oracle's (stale copies), and all cached shards.
    pub cached_stale: u64,
    pub cached: u64,
    /// No disturbance was open after this audit.
    pub steady: bool,
    pub live_nodes: usize,
}

/// Per sample bucket (by send time): wire messages and bytes per kind.
#[derive(Clone, Debug, Default)]
pub struct WireBucket {
    pub messages: [u64; KINDS],
    pub bytes: [u64; KINDS],
}

/// Per live node at the end of the run.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeGauges {
    pub entries_owned: usize,
    pub shards_owned: usize,
    pub cache_entries: usize,
    pub local_filters: usize,
}

/// Everything a run observed; [`crate::report`] turns it into figures.
pub struct Outcome {
    pub scenario: Scenario,
    pub end_ms: Millis,
    pub msgs: Vec<MsgRecord>,
    pub audits: Vec<AuditPoint>,
    pub disturbances: Vec<DisturbanceRecord>,
    pub wire: Vec<WireBucket>,
    /// Entries in `Assert { replace: true }` frames sent, by the kind of the
    /// last disturbance before them (rebalancing after it).
    pub moved: [u64; 6],
    /// Non-replacing assert frames and deltas, i.e. traffic caused by
    /// subscription changes, and the subscription operations made.
    pub subscribe_ops: u64,
    pub subscriptions_skipped: u64,
    pub counters: Counters,
    pub gauges: Vec<NodeGauges>,
    pub full_table_entries: u64,
    pub shards: usize,
    pub net_lost: u64,
    pub net_cut: u64,
    pub net_to_dead: u64,
    pub events: u64,
    pub nodes_created: usize,
    pub live_nodes: usize,
    pub core_errors: u64,
}

/// What a disturbance must see consistent to count as converged.
enum Scope {
    /// The whole table, every view delivered, no partition.
    Global,
    /// A crash not yet noticed: its moved shards are not known yet.
    Pending,
    /// The shards whose owners the change moved.
    Shards(Vec<ShardKey>),
}

struct SimNode {
    /// None once the node is gone (its counters are folded into `retired`).
    core: Option<Node>,
    /// Running: processes events.
    alive: bool,
    /// In the fleet's membership view (a crashed node stays in it until noticed).
    in_view: bool,
    timer_at: Option<Millis>,
    /// Latest scheduled view delivery: views reach a node in order.
    view_at: Millis,
    subs: Vec<Subscription>,
}

/// A simulation in progress.
pub struct Simulation {
    scenario: Scenario,
    queue: EventQueue<SimEvent>,
    net: Network,
    rng: Dice,
    workload: Workload,
    core_config: RoutingConfig,
    ownership: OwnershipConfig,
    nodes: Vec<SimNode>,
    /// Live node indices, ascending (for uniform picks).
    live: Vec<u32>,
    /// One view per partition group (one when whole).
    views: Vec<Arc<Membership>>,
    /// The whole fleet's view (every in-view node), what owners should be.
    truth_view: Arc<Membership>,
    next_version: u64,
    split_views: bool,
    pending_views: u64,
    oracle: Oracle,
    msgs: Vec<MsgRecord>,
    audits: Vec<AuditPoint>,
    disturbances: Vec<DisturbanceRecord>,
    open: Vec<usize>,
    /// Per disturbance record: what must be consistent for it to converge.
    scopes: Vec<Scope>,
    last_disturbance: Disturbance,
    wire: Vec<WireBucket>,
    moved: [u64; 6],
    subscribe_ops: u64,
    subscriptions_skipped: u64,
    retired: Counters,
    actions: Vec<Action>,
    end_ms: Millis,
    core_errors: u64,
}

impl Simulation {
    /// Builds the initial fleet (every node with the same first view) and
    /// schedules the whole workload.
    pub fn new(scenario: Scenario) -> Simulation {
        let mut seeder = Dice::seeded(scenario.seed);
        let net_rng = Dice::seeded(seeder.next_u64());
        let rng = Dice::seeded(seeder.next_u64());
        let core_config = scenario.fleet.core_config();
        let ownership = scenario.fleet.ownership_config();
        let n = scenario.fleet.nodes;
        let view = Arc::new(Membership::new(1, (0..n as u64).map(NodeId), ownership));
        let end_ms = scenario.duration_ms + scenario.report.drain_ms;
        let mut sim = Simulation {
            queue: EventQueue::new(),
            net: Network::new(scenario.network.clone(), net_rng),
            rng,
            workload: Workload::new(&scenario.topics, &scenario.subscriptions),
            oracle: Oracle::new(scenario.fleet.shard_depth),
            core_config,
            ownership,
            nodes: Vec::with_capacity(n),
            live: (0..n as u32).collect(),
            views: vec![view.clone()],
            truth_view: view.clone(),
            next_version: 2,
            split_views: false,
            pending_views: 0,
            msgs: Vec::with_capacity(scenario.publishes.count),
            audits: Vec::new(),
            disturbances: Vec::new(),
            open: Vec::new(),
            scopes: Vec::new(),
            last_disturbance: Disturbance::Bootstrap,
            wire: Vec::new(),
            moved: [0; 6],
            subscribe_ops: 0,
            subscriptions_skipped: 0,
            retired: Counters::default(),
            actions: Vec::new(),
            end_ms,
            core_errors: 0,
            scenario,
        };
        for i in 0..n {
            sim.nodes.push(sim.new_node(i as u32));
            sim.drive(i as u32, Event::Membership(view.clone()));
        }
        sim.disturb(Disturbance::Bootstrap);
        sim.schedule_workload();
        sim
    }

    fn new_node(&self, index: u32) -> SimNode {
        SimNode {
            core: Some(Node::with_ownership(NodeId(index as u64), self.core_config.clone(), self.ownership)),
            alive: true,
            in_view: true,
            timer_at: None,
            view_at: 0,
            subs: Vec::new(),
        }
    }

    fn schedule_workload(&mut self) {
        let s = self.scenario.clone();
        let n = s.fleet.nodes as u32;
        let window = |rng: &mut Dice, start: Millis, end: Millis| {
            if end > start {
                rng.int(start..end)
            } else {
                start
            }
        };
        for _ in 0..s.subscriptions.count {
            let at = window(&mut self.rng, s.subscriptions.start_ms, s.subscriptions.end_ms);
            let node = self.rng.int(0..n);
            let sub = self.workload.subscription(&mut self.rng);
            self.queue.schedule(at, SimEvent::Subscribe { node, sub });
        }
        for _ in 0..s.publishes.count {
            let at = window(&mut self.rng, s.publishes.start_ms, s.publishes.end_ms);
            self.queue.schedule(at, SimEvent::Publish);
        }
        let count = |fraction: f64| (fraction * s.fleet.nodes as f64).round() as usize;
        for (fraction, make) in [
            (s.churn.join, (|| SimEvent::Join) as fn() -> SimEvent),
            (s.churn.leave, || SimEvent::Leave),
            (s.churn.crash, || SimEvent::Crash),
        ] {
            for _ in 0..count(fraction) {
                let at = window(&mut self.rng, s.churn.start_ms, s.churn.end_ms);
                self.queue.schedule(at, make());
            }
        }
        for (index, p) in s.partitions.iter().enumerate() {
            self.queue.schedule(p.at_ms, SimEvent::PartitionStart { index });
            self.queue.schedule(p.heal_ms, SimEvent::Heal);
        }
        let mut t = 0;
        while t <= self.end_ms {
            self.queue.schedule(t, SimEvent::Audit);
            t += s.report.audit_ms;
        }
    }

    pub fn now(&self) -> Millis {
        self.queue.now()
    }

    pub fn end_ms(&self) -> Millis {
        self.end_ms
    }

    /// Live nodes right now.
    pub fn live_nodes(&self) -> usize {
        self.live.len()
    }

    /// Processes events up to virtual time `until` (inclusive); returns
    /// false once the run is over.
    pub fn run_until(&mut self, until: Millis) -> bool {
        let until = until.min(self.end_ms);
        while let Some(at) = self.queue.peek_time() {
            if at > until {
                return true;
            }
            let (_, event) = self.queue.pop().expect("peeked");
            self.step(event);
        }
        false
    }

    /// Runs to the end and returns what was observed.
    pub fn run(mut self) -> Outcome {
        self.run_until(self.end_ms);
        self.finish()
    }

    fn step(&mut self, event: SimEvent) {
        let now = self.queue.now();
        match event {
            SimEvent::Frame { from, to, frame } => {
                if !self.nodes[to as usize].alive {
                    self.net.counters.to_dead += 1;
                    return;
                }
                self.drive(to, Event::Frame { from: NodeId(from as u64), frame });
            }
            SimEvent::Forward { from, to, msg, route } => {
                if !self.nodes[to as usize].alive {
                    self.net.counters.to_dead += 1;
                    return;
                }
                let node = &mut self.nodes[to as usize];
                let topic = &self.msgs[msg as usize].topic;
                let event = Event::Forwarded { from: NodeId(from as u64), topic, msg, route };
                let mut actions = std::mem::take(&mut self.actions);
                let core = node.core.as_mut().expect("alive nodes have a core");
                if core.handle(now, event, &mut actions).is_err() {
                    self.core_errors += 1;
                }
                self.dispatch(to, &mut actions);
                self.actions = actions;
            }
            SimEvent::Timer { node, at } => {
                let n = &mut self.nodes[node as usize];
                if n.alive && n.timer_at == Some(at) {
                    n.timer_at = None;
                    self.drive(node, Event::Timer);
                }
            }
            SimEvent::View { node, view } => {
                self.pending_views -= 1;
                if self.nodes[node as usize].alive {
                    self.drive(node, Event::Membership(view));
                }
            }
            SimEvent::Subscribe { node, sub } => self.subscribe(node, sub),
            SimEvent::Publish => self.publish(),
            SimEvent::Join => self.join(),
            SimEvent::Leave => self.depart(false),
            SimEvent::Crash => self.depart(true),
            SimEvent::CrashNoticed { node, record } => {
                self.nodes[node as usize].in_view = false;
                self.publish_views(Some(record));
            }
            SimEvent::PartitionStart { index } => self.partition(index),
            SimEvent::PartitionNoticed => {
                if self.net.is_partitioned() && !self.split_views {
                    self.split_views = true;
                    self.publish_views(None);
                }
            }
            SimEvent::Heal => {
                if self.net.is_partitioned() {
                    self.net.heal();
                    self.disturb(Disturbance::Heal);
                    if self.split_views {
                        self.split_views = false;
                        self.publish_views(None);
                    }
                }
            }
            SimEvent::Audit => self.audit(),
        }
    }

    /// Hands one event to a node's core and carries out its actions.
    fn drive(&mut self, index: u32, event: Event<'_>) {
        let now = self.queue.now();
        let mut actions = std::mem::take(&mut self.actions);
        let core = self.nodes[index as usize].core.as_mut().expect("driven nodes have a core");
        if core.handle(now, event, &mut actions).is_err() {
            self.core_errors += 1;
        }
        self.dispatch(index, &mut actions);
        self.actions = actions;
    }

    fn wire_bucket(&mut self) -> &mut WireBucket {
        let b = (self.queue.now() / self.scenario.report.sample_ms) as usize;
        if self.wire.len() <= b {
            self.wire.resize_with(b + 1, WireBucket::default);
        }
        &mut self.wire[b]
    }

    fn dispatch(&mut self, from: u32, actions: &mut Vec<Action>) {
        let now = self.queue.now();
        for action in actions.drain(..) {
            match action {
                Action::Send { to, frame } => {
                    let kind =
                        kadmq_dht::core::FrameKind::ALL.iter().position(|k| *k == frame.kind()).expect("listed kind");
                    let bytes = encode(&frame).len();
                    if let Frame::Assert { replace, ops, .. } = &frame {
                        if *replace {
                            self.moved[self.last_disturbance.index()] += ops.len() as u64;
                        }
                    }
                    let bucket = self.wire_bucket();
                    bucket.messages[kind] += 1;
                    bucket.bytes[kind] += bytes as u64;
                    let to = to.0 as u32;
                    if let Fate::Arrives(at) = self.net.send(now, from, to, kind, bytes) {
                        self.queue.schedule(at, SimEvent::Frame { from, to, frame });
                    }
                }
                Action::Forward { to, msg, route } => {
                    // Wire estimate: topic, payload, the route and ~16 bytes of framing.
                    let topic = self.msgs[msg as usize].topic.len();
                    let picks: usize = route.shared.iter().map(|p| p.group.len() + p.filter.len() + 4).sum();
                    let bytes = 16 + topic + self.scenario.network.payload_bytes + 2 + picks;
                    let bucket = self.wire_bucket();
                    bucket.messages[FORWARD] += 1;
                    bucket.bytes[FORWARD] += bytes as u64;
                    let to = to.0 as u32;
                    let fate = self.net.send(now, from, to, FORWARD, bytes);
                    let settles = if let Fate::Arrives(at) = fate { at } else { now };
                    let record = &mut self.msgs[msg as usize];
                    record.last_forward_at = record.last_forward_at.max(settles);
                    if let Fate::Arrives(at) = fate {
                        self.queue.schedule(at, SimEvent::Forward { from, to, msg, route });
                    }
                }
                Action::Deliver { msg, route } => self.delivered(from, msg, &route),
                Action::Routed { msg, .. } => self.msgs[msg as usize].routed_at = Some(now),
                Action::Split { shard, .. } => {
                    self.oracle.split(shard);
                }
                Action::ArmTimer { at } => {
                    self.nodes[from as usize].timer_at = Some(at);
                    self.queue.schedule(at, SimEvent::Timer { node: from, at });
                }
            }
        }
    }

    fn delivered(&mut self, node: u32, msg: u64, route: &ForwardRoute) {
        let now = self.queue.now();
        let record = &mut self.msgs[msg as usize];
        if route.plain {
            match record.expected.plain.binary_search(&node) {
                Ok(i) => copy_arrived(&mut record.plain_got[i], &mut record.last_first_delivery_at, now),
                Err(_) => record.unexpected += 1,
            }
        }
        for pick in &route.shared {
            let hit = self
                .oracle
                .group_id(&pick.group, &pick.filter)
                .filter(|&g| self.oracle.is_member(g, node))
                .and_then(|g| record.expected.shared.binary_search(&g).ok());
            match hit {
                Some(i) => copy_arrived(&mut record.shared_got[i], &mut record.last_first_delivery_at, now),
                None => record.unexpected += 1,
            }
        }
    }

    // ----- workload -----------------------------------------------------------

    fn subscribe(&mut self, node: u32, sub: Subscription) {
        if !self.nodes[node as usize].alive {
            self.subscriptions_skipped += 1;
            return;
        }
        self.subscribe_ops += 1;
        self.oracle.change(self.queue.now(), node, &sub.filter, sub.group.as_deref(), 1);
        let event = Event::Subscribe { filter: &sub.filter, group: sub.group.as_deref() };
        // `sub` is borrowed by the event; drive inline to keep it alive.
        let now = self.queue.now();
        let mut actions = std::mem::take(&mut self.actions);
        let core = self.nodes[node as usize].core.as_mut().expect("alive");
        if core.handle(now, event, &mut actions).is_err() {
            self.core_errors += 1;
        }
        self.dispatch(node, &mut actions);
        self.actions = actions;
        self.nodes[node as usize].subs.push(sub);
    }

    fn publish(&mut self) {
        if self.live.is_empty() {
            return;
        }
        let node = *self.rng.choose(&self.live).expect("live is not empty");
        let topic: Box<str> = self.workload.topic(&mut self.rng).into();
        let expected = self.oracle.expected(&topic);
        let msg = self.msgs.len() as u64;
        let now = self.queue.now();
        self.msgs.push(MsgRecord {
            at: now,
            // Provisional: `classify_in_flight` also looks at what started later.
            steady: self.open.is_empty(),
            cause: self.open.last().map(|&i| self.disturbances[i].kind),
            plain_got: vec![0; expected.plain.len()],
            shared_got: vec![0; expected.shared.len()],
            expected,
            unexpected: 0,
            topic: topic.clone(),
            routed_at: None,
            last_forward_at: now,
            last_first_delivery_at: now,
        });
        self.drive(node, Event::Publish { topic: &topic, msg });
    }

    /// Fewest nodes churn may leave: R, and at least 2.
    fn min_live(&self) -> usize {
        self.scenario.fleet.replication.max(2)
    }

    fn join(&mut self) {
        let index = self.nodes.len() as u32;
        let node = self.new_node(index);
        self.nodes.push(node);
        self.live.push(index);
        let record = self.disturb(Disturbance::Join);
        self.publish_views(Some(record));
        let per_join = self
            .scenario
            .subscriptions
            .per_join
            .unwrap_or(self.scenario.subscriptions.count / self.scenario.fleet.nodes.max(1));
        let now = self.queue.now();
        for _ in 0..per_join {
            // After the joiner has its view (delivered at once, see publish_views).
            let at = now + 1 + self.rng.int(0..2_000);
            let sub = self.workload.subscription(&mut self.rng);
            self.queue.schedule(at, SimEvent::Subscribe { node: index, sub });
        }
    }

    /// A graceful leave (announced at once) or a crash (noticed later).
    fn depart(&mut self, crash: bool) {
        if self.live.len() <= self.min_live() {
            return;
        }
        let pick = self.rng.int(0..self.live.len());
        let index = self.live.remove(pick);
        let node = &mut self.nodes[index as usize];
        node.alive = false;
        node.timer_at = None;
        let now = self.queue.now();
        let core = node.core.take().expect("live nodes have a core");
        add_counters(&mut self.retired, core.counters());
        drop(core);
        for sub in std::mem::take(&mut self.nodes[index as usize].subs) {
            self.oracle.change(now, index, &sub.filter, sub.group.as_deref(), -1);
        }
        if crash {
            let record = self.disturb(Disturbance::Crash);
            self.queue.after(self.scenario.network.detect_ms, SimEvent::CrashNoticed { node: index, record });
        } else {
            self.nodes[index as usize].in_view = false;
            let record = self.disturb(Disturbance::Leave);
            self.publish_views(Some(record));
        }
    }

    fn partition(&mut self, index: usize) {
        if self.net.is_partitioned() {
            return;
        }
        let groups = self.scenario.partitions[index].groups.clone();
        let total: f64 = groups.iter().sum();
        let mut order = self.live.clone();
        self.rng.shuffle(&mut order);
        let mut group = vec![0u16; self.nodes.len()];
        let mut start = 0usize;
        let mut acc = 0.0;
        for (g, share) in groups.iter().enumerate() {
            acc += share / total;
            let end = if g + 1 == groups.len() { order.len() } else { (acc * order.len() as f64).round() as usize };
            for &n in &order[start..end.max(start)] {
                group[n as usize] = g as u16;
            }
            start = end.max(start);
        }
        self.net.partition(group);
        self.disturb(Disturbance::Partition);
        self.queue.after(self.scenario.network.detect_ms, SimEvent::PartitionNoticed);
    }

    // ----- membership -----------------------------------------------------------

    /// Rebuilds the views (one per partition group once the split is
    /// noticed) and sends each changed view to its live nodes, each after
    /// its own gossip delay. With `record`, the shards whose owners the
    /// change moves become that disturbance's scope (see [`Scope`]).
    fn publish_views(&mut self, record: Option<usize>) {
        let groups = if self.split_views {
            self.live.iter().map(|&n| self.net.group_of(n)).max().unwrap_or(0) as usize + 1
        } else {
            1
        };
        let mut members: Vec<Vec<NodeId>> = vec![Vec::new(); groups];
        for (i, node) in self.nodes.iter().enumerate() {
            if node.in_view {
                let g = if self.split_views { self.net.group_of(i as u32) as usize } else { 0 };
                members[g].push(NodeId(i as u64));
            }
        }
        let fresh = groups != self.views.len();
        let mut changed = vec![false; groups];
        let mut views = Vec::with_capacity(groups);
        for (g, m) in members.into_iter().enumerate() {
            if !fresh && self.views[g].members() == m.as_slice() {
                views.push(self.views[g].clone());
                continue;
            }
            changed[g] = true;
            let view = if fresh {
                self.next_version += 1;
                Membership::new(self.next_version, m, self.ownership)
            } else {
                // Consecutive versions carry their delta: nodes skip an O(N) diff.
                self.views[g].next(m)
            };
            self.next_version = self.next_version.max(view.version() + 1);
            views.push(Arc::new(view));
        }
        self.views = views;
        let old_truth = self.truth_view.clone();
        self.truth_view = if groups == 1 {
            self.views[0].clone()
        } else {
            let all = self.nodes.iter().enumerate().filter(|(_, n)| n.in_view).map(|(i, _)| NodeId(i as u64));
            Arc::new(Membership::new(0, all, self.ownership))
        };
        if let Some(i) = record {
            if groups == 1 {
                let r = self.scenario.fleet.replication;
                let mut moved: Vec<ShardKey> = self
                    .oracle
                    .shards()
                    .filter(|(key, _)| old_truth.owners(key, r) != self.truth_view.owners(key, r))
                    .map(|(key, _)| *key)
                    .collect();
                moved.sort_unstable();
                self.scopes[i] = Scope::Shards(moved);
            } else {
                self.scopes[i] = Scope::Global;
            }
        }
        let now = self.queue.now();
        let spread = self.scenario.network.gossip_spread_ms;
        for idx in 0..self.live.len() {
            let n = self.live[idx];
            let g = if self.split_views { self.net.group_of(n) as usize } else { 0 };
            if !changed[g] || !self.nodes[n as usize].in_view {
                continue;
            }
            let view = self.views[g].clone();
            // A node that has no view yet (a joiner) learns its own at once.
            let delay = if self.nodes[n as usize].view_at == 0 && n as usize >= self.scenario.fleet.nodes {
                0
            } else {
                self.net.latency() + self.net.jitter(spread)
            };
            let at = (now + delay).max(self.nodes[n as usize].view_at);
            self.nodes[n as usize].view_at = at.max(1);
            self.pending_views += 1;
            self.queue.schedule(at, SimEvent::View { node: n, view });
        }
    }

    // ----- observation ------------------------------------------------------------

    fn disturb(&mut self, kind: Disturbance) -> usize {
        self.last_disturbance = kind;
        self.disturbances.push(DisturbanceRecord {
            kind,
            at_ms: self.queue.now(),
            nodes: self.live.len(),
            entries: self.oracle.entries(),
            converged_at_ms: None,
        });
        self.open.push(self.disturbances.len() - 1);
        self.scopes.push(match kind {
            Disturbance::Join | Disturbance::Leave | Disturbance::Crash => Scope::Pending,
            _ => Scope::Global,
        });
        self.disturbances.len() - 1
    }

    /// Compares every replica of every shard with the oracle; closes the
    /// open disturbances when all agree and every node has the current view.
    fn audit(&mut self) {
        let r = self.scenario.fleet.replication;
        let (mut ok, mut total) = (0u64, 0u64);
        let mut owners = Default::default();
        for (key, truth) in self.oracle.shards() {
            kadmq_dht::core::Ownership::owners_into(&*self.truth_view, key, r, &mut owners);
            for owner in owners.iter() {
                let node = &self.nodes[owner.0 as usize];
                let held = node.core.as_ref().and_then(|c| c.owned_shard(key));
                let held_entries = held.map_or(0, |s| s.len() as u64);
                if truth.entries == 0 && held_entries == 0 {
                    continue;
                }
                total += 1;
                // A crashed node not yet noticed is an owner that holds nothing.
                let good =
                    node.alive && held.is_some_and(|s| held_entries == truth.entries && s.digest() == truth.digest);
                ok += good as u64;
            }
        }
        let (mut cached, mut cached_stale) = (0u64, 0u64);
        for &i in &self.live {
            let cache = self.nodes[i as usize].core.as_ref().expect("live").cache();
            for (key, ..) in cache.sources() {
                cached += 1;
                let len = cache.peek(&key).map_or(0, |s| s.len() as u64);
                cached_stale += (len != self.oracle.shard(&key).entries) as u64;
            }
        }
        let now = self.queue.now();
        self.audits.push(AuditPoint {
            at: now,
            replicas_ok: ok,
            replicas: total,
            cached_stale,
            cached,
            steady: false,
            live_nodes: self.live.len(),
        });
        let clean = ok == total && self.pending_views == 0 && !self.net.is_partitioned();
        if clean && !self.open.is_empty() {
            for i in self.open.drain(..) {
                self.disturbances[i].converged_at_ms = Some(now);
            }
        }
        // A join, leave or noticed crash has converged once the shards it
        // moved are right at every owner, whatever else is still moving.
        let mut open = std::mem::take(&mut self.open);
        open.retain(|&i| {
            let Scope::Shards(keys) = &self.scopes[i] else { return true };
            if keys.iter().all(|key| self.shard_consistent(key)) {
                self.disturbances[i].converged_at_ms = Some(now);
                return false;
            }
            true
        });
        self.open = open;
        let steady = self.open.is_empty();
        self.audits.last_mut().expect("pushed").steady = steady;
    }

    /// Does every owner of `key` (in the whole fleet's view) hold exactly
    /// the oracle's entries?
    fn shard_consistent(&self, key: &ShardKey) -> bool {
        let truth = self.oracle.shard(key);
        let owners = self.truth_view.owners(key, self.scenario.fleet.replication);
        owners.iter().all(|owner| {
            let node = &self.nodes[owner.0 as usize];
            let held = node.core.as_ref().and_then(|c| c.owned_shard(key));
            match held {
                Some(s) => node.alive && s.len() as u64 == truth.entries && s.digest() == truth.digest,
                None => truth.entries == 0,
            }
        })
    }

    /// Makes disturbed every publish that was steady when made but still in
    /// flight when a disturbance started (see [`DeliveryWindow`]), and
    /// charges it to that disturbance. Run at the end, when every window
    /// that will close has closed.
    fn classify_in_flight(&mut self) {
        // Disturbances are recorded as they happen, so in time order.
        let starts: Vec<Millis> = self.disturbances.iter().map(|d| d.at_ms).collect();
        for m in self.msgs.iter_mut().filter(|m| m.steady) {
            if let Some(i) = m.window().first_overlap(&starts) {
                m.steady = false;
                m.cause = Some(self.disturbances[i].kind);
            }
        }
    }

    /// Stops and gathers what was observed.
    pub fn finish(mut self) -> Outcome {
        self.classify_in_flight();
        let mut counters = self.retired.clone();
        let mut gauges = Vec::with_capacity(self.live.len());
        for &i in &self.live {
            let core = self.nodes[i as usize].core.as_ref().expect("live");
            add_counters(&mut counters, core.counters());
            gauges.push(NodeGauges {
                entries_owned: core.entries_owned(),
                shards_owned: core.shards_owned(),
                cache_entries: core.cache().entries(),
                local_filters: core.local_filters(),
            });
        }
        // Close the wire series at the run's end.
        let _ = self.wire_bucket();
        Outcome {
            end_ms: self.end_ms,
            full_table_entries: self.oracle.entries(),
            shards: self.oracle.shard_count(),
            msgs: std::mem::take(&mut self.msgs),
            audits: std::mem::take(&mut self.audits),
            disturbances: std::mem::take(&mut self.disturbances),
            wire: std::mem::take(&mut self.wire),
            moved: self.moved,
            subscribe_ops: self.subscribe_ops,
            subscriptions_skipped: self.subscriptions_skipped,
            counters,
            gauges,
            net_lost: self.net.counters.lost,
            net_cut: self.net.counters.cut,
            net_to_dead: self.net.counters.to_dead,
            events: self.queue.processed(),
            nodes_created: self.nodes.len(),
            live_nodes: self.live.len(),
            core_errors: self.core_errors,
            scenario: self.scenario,
        }
    }
}

/// Adds one node's counters to a sum.
pub fn add_counters(sum: &mut Counters, c: &Counters) {
    sum.publishes += c.publishes;
    sum.cache_hits += c.cache_hits;
    sum.cache_misses += c.cache_misses;
    sum.owned_reads += c.owned_reads;
    sum.lookups_sent += c.lookups_sent;
    sum.lookup_retries += c.lookup_retries;
    sum.lookups_failed += c.lookups_failed;
    sum.publishes_parked += c.publishes_parked;
    sum.forwards_sent += c.forwards_sent;
    sum.local_deliveries += c.local_deliveries;
    sum.forwards_received += c.forwards_received;
    sum.forwards_stale += c.forwards_stale;
    sum.cache_evictions += c.cache_evictions;
    sum.cache_invalidations += c.cache_invalidations;
    sum.reassertions += c.reassertions;
    sum.repairs_requested += c.repairs_requested;
    sum.shards_released += c.shards_released;
    sum.entries_dropped += c.entries_dropped;
    sum.assertions_retried += c.assertions_retried;
    sum.assertion_gaps += c.assertion_gaps;
    sum.delta_gaps += c.delta_gaps;
    sum.watch_mismatches += c.watch_mismatches;
    sum.resyncs += c.resyncs;
    sum.splits += c.splits;
    sum.splits_adopted += c.splits_adopted;
    sum.filters_moved += c.filters_moved;
    for i in 0..sum.frames_sent.len() {
        sum.frames_sent[i] += c.frames_sent[i];
        sum.frames_received[i] += c.frames_received[i];
    }
    for i in 0..sum.frames_rejected.len() {
        sum.frames_rejected[i] += c.frames_rejected[i];
    }
}

/// Counts one copy for an expected recipient; the first one moves the
/// publish's `last_first_delivery_at` to `now`.
fn copy_arrived(got: &mut u8, last_first_delivery_at: &mut Millis, now: Millis) {
    if *got == 0 {
        *last_first_delivery_at = now;
    }
    *got = got.saturating_add(1);
}
