//! The broker in a fleet: the glue between the broker, the routing core
//! (`kadmq_dht::core`) and the libp2p driver (`kadmq_dht::driver`).
//!
//! Job: tell the core about this node's subscriptions and the live members,
//! route every publish through it, carry out what it asks (route frames and
//! forwarded messages to other nodes, deliveries to local sessions), and
//! make QoS 1/2 forwards safe: each is numbered per destination, held in a
//! persisted [`outbox`] until its destination nodes acknowledge it, resent
//! in order while they do not, and delivered in order and once at the
//! destination ([`outbox::Inbound`]).
//! Retained messages are copied to every node (each change is sent to the
//! live members, and a member that comes up gets every retained message of
//! each node); the route table is what is sharded.
//!
//! Boundary: the broker knows this module only as a [`Fleet`]; the core
//! never sees a socket. One mutex guards the core: publishing connections
//! take it briefly to route (a cached route needs no network), the cluster
//! task takes it for frames from other nodes, membership changes and the
//! core's timer. A topic published again while nothing that decides routes
//! changed (the core's *generation*, bumped by every event but publishes
//! and forwards) reuses the route computed the first time, without the
//! mutex ([`TopicRoute`]; not for `$share` routes, which pick per message).
//! Frames leave in the order they are queued, batched per destination
//! ([`links`]), so per-pair FIFO holds. A plain QoS 0 forward is delivered
//! without the mutex; local deliveries run after it is released.
//!
//! # Layout
//!
//! - [`wire`]: the envelope between brokers (route frame, forward, ack, batch).
//! - [`links`]: per-destination send queues, batched into driver frames.
//! - [`outbox`]: unacknowledged QoS 1/2 forwards; the receiver's duplicate filter.
//! - [`guard`]: peer input not applied (counted, logged once), frames of peers not yet members.
//! - [`status`]: `/api/v1/cluster`, `/api/v1/routes` and the cluster metrics.

pub mod counter;
pub mod guard;
pub mod links;
pub mod outbox;
pub mod status;
pub mod wire;

use crate::broker::message::Message;
use crate::broker::{Broker, Fleet};
use crate::config::ClusterSettings;
use crate::protocol::QoS;
use crate::storage::Storage;
use bytes::Bytes;
use counter::Counter;
use kadmq_dht::core::{self, Action, Event, ForwardRoute, Membership, Node, NodeId, OwnershipConfig};
use kadmq_dht::driver::{self, ClusterConfig, Multiaddr, PeerId};
use links::{Class, Links};
use outbox::{Inbound, Outbox, Verdict};
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use wire::Forward;
use wire::Wire;

/// Topics whose routes are remembered; past it the memo starts afresh.
const TOPIC_ROUTES: usize = 65_536;
/// Retained messages per frame when a member that came up gets all of them.
const RETAIN_CHUNK: usize = 256;
/// Driver events handled per lock of the core.
const EVENT_BATCH: usize = 512;
/// Batches of received messages waiting for the delivery stage.
const DELIVERY_QUEUE: usize = 64;
/// Outbox records of the previous run that were not routed yet are routed
/// again this long after start (so the node has heard of its peers).
const REPLAY_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: {0}")]
    Driver(#[from] driver::Error),
    #[error("cluster: invalid multiaddr {addr:?}: {cause}")]
    Multiaddr { addr: String, cause: String },
    #[error("cluster: no cluster key file configured (create one with `kadmq keygen`)")]
    NoKey,
}

/// Counters of the glue (the core keeps its own, see [`core::Counters`]).
#[derive(Default)]
pub struct ClusterStats {
    /// Messages sent to other nodes (one per destination node).
    pub forwarded_out: Counter,
    /// Messages received from other nodes.
    pub forwarded_in: Counter,
    /// Resent forwards that had already arrived (acknowledged, not delivered).
    pub duplicates: AtomicU64,
    /// QoS 1/2 forwards that arrived after a gap (dropped; resent in order).
    pub out_of_order: AtomicU64,
    /// Frames from other nodes that could not be decoded or carried
    /// invalid input, or came from peers that are not members: dropped
    /// unapplied, by reason.
    pub rejected: guard::Rejections,
    /// Frames for a node whose peer id is unknown (dropped).
    pub unroutable: AtomicU64,
    /// Route frames, acknowledgements and notices dropped: the node's send
    /// budget was spent.
    pub frames_dropped: AtomicU64,
    /// QoS 0 forwards dropped: past 7/8 of the send budget.
    pub forwards_dropped: AtomicU64,
    /// QoS 1/2 forwards not queued past 7/8 of the send budget (they stay
    /// in the outbox and are resent).
    pub forwards_deferred: AtomicU64,
    /// Local subscriptions and publishes the routing core refused (past
    /// the cluster's topic level limit): kept on this node.
    pub local_refused: AtomicU64,
    /// Publishes routed from the per-topic memo, without the core.
    pub topic_route_hits: Counter,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What a batch of driver events left to do once the state is released.
#[derive(Default)]
struct Received {
    local: Vec<(Arc<Message>, ForwardRoute)>,
    acks: HashMap<PeerId, (u64, u64)>,
}

/// A local publish being routed (waiting for a lookup) or just routed.
struct Routing {
    message: Arc<Message>,
    /// Destinations of its QoS 1/2 forwards.
    waiting: Vec<(NodeId, ForwardRoute)>,
    /// An outbox record (`routed: false`) was written while it waited.
    persisted: bool,
}

/// A publish in a publisher's queue (`State::held`): the one parked in the
/// core has no message here; the ones behind it have theirs, and whether it
/// was persisted unrouted.
type HeldPublish = (u64, Option<(Arc<Message>, bool)>);

struct State {
    node: Node,
    peers: HashMap<NodeId, PeerId>,
    /// The reverse of `peers`: a node id is a SHA-256 of the peer id,
    /// computed once per peer, not per frame.
    ids: HashMap<PeerId, NodeId>,
    incarnations: HashMap<NodeId, u64>,
    live: BTreeSet<NodeId>,
    routing: HashMap<u64, Routing>,
    outbox: Outbox,
    /// Unrouted outbox records of the previous run, routed again at [`REPLAY_AFTER`].
    replay: Vec<(u64, Message)>,
    inbound: Inbound,
    timer_at: Option<u64>,
    /// Per publisher with a publish parked in the core (waiting for a
    /// lookup): that publish's id first, then its later publishes, held
    /// back so that none overtakes it (message, persisted unrouted).
    held: HashMap<Arc<str>, VecDeque<HeldPublish>>,
    /// Members we had taken for dead, and how many more times (one per
    /// tick) to tell them: the notice is a frame, and frames right after a
    /// link comes back can be lost.
    rejoin_notices: HashMap<NodeId, u8>,
    /// Frames of peers whose record has not arrived (yet).
    strangers: guard::Strangers,
    /// Peers declared dead, and since when (their frames are dropped).
    dead: HashMap<PeerId, Instant>,
    /// Peers the driver refused (fleet settings differ): their frames are dropped.
    refused: HashMap<PeerId, Instant>,
    /// Dead peers whose address maps are pruned, and since when they are
    /// dead: their identity goes after [`IDENTITY_KEPT`] dead timeouts.
    gone: HashMap<NodeId, Instant>,
}

/// This node's part of the fleet. Create with [`start`].
pub struct Cluster {
    state: Mutex<State>,
    /// The broker's `mqtt.max_topic_levels`, also the routing core's and
    /// the wire decoder's: a fleet refuses what a node would.
    max_topic_levels: usize,
    /// Routes of topics published before, valid while `generation` holds.
    topic_routes: RwLock<ahash::AHashMap<Box<str>, Arc<TopicRoute>>>,
    /// Bumped (under the state mutex) by every core event that may change
    /// a route: anything but publishes and forwards.
    generation: AtomicU64,
    /// The id of the next local publish.
    next_id: AtomicU64,
    /// Publishers with publishes held back (`State::held`): while there are
    /// any, every publish takes the mutex, so none overtakes a held one.
    publishers_held: AtomicU64,
    broker: Weak<Broker>,
    client: driver::Client,
    links: Links,
    timer: Notify,
    started: Instant,
    me: NodeId,
    name: String,
    /// Where the members' addresses are remembered across restarts.
    peers_file: std::path::PathBuf,
    /// Peers that are members now (up, not dead): their frames are applied.
    /// Read per batch of frames, outside the state mutex.
    members: RwLock<std::collections::HashSet<PeerId>>,
    dead_timeout: Duration,
    /// What the peers file holds (as written last, or read at start).
    remembered: Mutex<Vec<String>>,
    pub stats: ClusterStats,
}

/// What the core decided for a topic, replayed for later publishes to it
/// while the core's generation is unchanged.
#[derive(Clone)]
struct TopicRoute {
    generation: u64,
    forwards: Vec<(NodeId, links::Sender, ForwardRoute)>,
    local: Option<ForwardRoute>,
}

thread_local! {
    /// Each publishing thread's copy of the topic routes it used: no lock
    /// and no shared reference count per publish. Valid for one cluster
    /// (its address) and one generation; emptied when either changes.
    static THREAD_ROUTES: std::cell::RefCell<ThreadRoutes> = std::cell::RefCell::default();
}

#[derive(Default)]
struct ThreadRoutes {
    cluster: usize,
    generation: u64,
    routes: ahash::AHashMap<Box<str>, TopicRoute>,
}

/// Everything [`start`] needs besides the settings.
pub struct StartContext<'a> {
    pub data_dir: &'a Path,
    pub broker: &'a Arc<Broker>,
    /// MQTT listener URLs announced to other nodes (e.g. `mqtt://10.0.0.5:1883`).
    pub mqtt_listeners: Vec<String>,
}

/// Joins the fleet: starts the libp2p driver and the cluster task, and
/// attaches the cluster to the broker (its restored subscriptions are
/// announced). Returns once the node listens.
pub async fn start(settings: &ClusterSettings, cx: StartContext<'_>) -> Result<Arc<Cluster>, ClusterError> {
    let key_dir = crate::cli::node_key_dir(cx.data_dir);
    let keypair = driver::load_or_generate_keypair(&key_dir)?;
    let key_file = settings.cluster_key_file.as_ref().ok_or(ClusterError::NoKey)?;
    let cluster_key = driver::read_cluster_key(key_file)?;
    let peer_id = keypair.public().to_peer_id();
    let name = settings.node_name.clone().unwrap_or_else(|| default_name(&peer_id));
    let mut config = ClusterConfig::new(name.clone(), keypair, cluster_key);
    config.fleet = driver::FleetSettings {
        replication: settings.replication as u32,
        shard_depth: settings.shard_depth as u32,
        frame_version: frame_version(),
    };
    config.listen_addrs = parse_addrs(&settings.p2p_listen)?;
    config.bootstrap = parse_addrs(&settings.bootstrap)?;
    // The members last seen: a node restarted without (or with a stale)
    // bootstrap address still finds its fleet.
    let peers_file = key_dir.join(PEERS_FILE);
    let known = known_peers(&peers_file, &peer_id);
    let remembered: Vec<String> = known.iter().map(|a| a.to_string()).collect();
    config.bootstrap.extend(known);
    config.mqtt_listeners = cx.mqtt_listeners;
    config.incarnation = driver::next_incarnation(&key_dir)?;
    config.dead_timeout = Duration::from_secs(settings.dead_timeout_secs);
    config.suspect_timeout = config.dead_timeout / 2;
    config.send_buffer = usize::try_from(settings.send_buffer_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    // Forward sequences restart with each run of this node.
    let epoch = config.incarnation;
    let (client, events, event_loop) = driver::start(config).await?;
    tokio::spawn(event_loop.run());

    let me = node_id(&peer_id);
    let core_config = core::Config {
        replication: settings.replication,
        shard_depth: settings.shard_depth,
        max_topic_levels: cx.broker.config.max_topic_levels,
        ..core::Config::default()
    };
    let mut node = Node::new(me, core_config.clone());
    let mut actions = Vec::new();
    let first_view = Arc::new(Membership::new(1, [me], OwnershipConfig::default()));
    node.handle(0, Event::Membership(first_view), &mut actions).expect("a membership event is always accepted");

    let storage = &cx.broker.storage;
    let mut outbox = Outbox::new(epoch);
    let mut replay = Vec::new();
    let mut next_id = cx.broker.now_ms() << 16;
    for (id, record) in outbox::restore(storage) {
        next_id = next_id.max(id + 1);
        if record.routed {
            let waiting = record.waiting.into_iter().map(|(n, r)| (NodeId(n), r)).collect();
            outbox.restore(id, Arc::new(record.message), waiting);
        } else {
            replay.push((id, record.message));
        }
    }
    if !outbox.is_empty() || !replay.is_empty() {
        tracing::info!(held = outbox.len(), unrouted = replay.len(), "cluster outbox restored");
    }

    let cluster = Arc::new(Cluster {
        state: Mutex::new(State::new(node, peer_id, outbox, replay)),
        max_topic_levels: core_config.max_topic_levels,
        publishers_held: AtomicU64::new(0),
        topic_routes: RwLock::new(ahash::AHashMap::new()),
        generation: AtomicU64::new(0),
        next_id: AtomicU64::new(next_id),
        broker: Arc::downgrade(cx.broker),
        client: client.clone(),
        links: Links::new(client.clone()),
        timer: Notify::new(),
        started: Instant::now(),
        me,
        name,
        peers_file,
        members: RwLock::new(std::collections::HashSet::new()),
        dead_timeout: Duration::from_secs(settings.dead_timeout_secs),
        remembered: Mutex::new(remembered),
        stats: ClusterStats::default(),
    });
    {
        let mut st = cluster.state.lock();
        let mut local = Vec::new();
        cluster.execute(&mut st, storage, actions, None, &mut local);
    }
    tokio::spawn(cluster.clone().run(events));
    cx.broker.attach_fleet(cluster.clone());
    for addr in client.listen_addrs().await? {
        tracing::info!(%addr, node = %cluster.name, "cluster listener ready");
    }
    Ok(cluster)
}

/// File in the node key directory listing the members' addresses.
const PEERS_FILE: &str = "peers";

/// The addresses in the peers file (other nodes only); none if it is
/// missing or unreadable (logged).
fn known_peers(path: &Path, me: &PeerId) -> Vec<Multiaddr> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            tracing::warn!(path = %path.display(), cause = %err, "cannot read the known peers");
            return Vec::new();
        }
    };
    let own = me.to_string();
    text.lines().filter(|line| !line.contains(&own)).filter_map(|line| line.trim().parse().ok()).collect()
}

/// Writes the peers file (atomically: a crash leaves the old one).
fn remember_peers(path: &Path, addrs: &[String]) {
    let tmp = path.with_extension("tmp");
    let text: String = addrs.iter().map(|a| format!("{a}\n")).collect();
    if let Err(err) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::warn!(path = %path.display(), cause = %err, "cannot remember the known peers");
    }
}

/// The frame version announced to peers: the envelope's ([`wire::VERSION`])
/// in the high half, the routing core's ([`core::frame::FRAME_VERSION`]) in
/// the low half; peers must speak both.
pub fn frame_version() -> u32 {
    u32::from(wire::VERSION) << 16 | u32::from(core::frame::FRAME_VERSION)
}

/// The routing core's id of a libp2p peer.
pub fn node_id(peer: &PeerId) -> NodeId {
    NodeId::from_peer_bytes(&peer.to_bytes())
}

fn default_name(peer: &PeerId) -> String {
    let text = peer.to_string();
    format!("kadmq-{}", &text[text.len().saturating_sub(6)..])
}

fn parse_addrs(addrs: &[String]) -> Result<Vec<Multiaddr>, ClusterError> {
    addrs
        .iter()
        .map(|addr| {
            addr.parse().map_err(|err: driver::multiaddr::Error| ClusterError::Multiaddr {
                addr: addr.clone(),
                cause: err.to_string(),
            })
        })
        .collect()
}

impl Fleet for Cluster {
    fn subscribed(&self, filter: &str, group: Option<&str>) {
        self.handle_local(Event::Subscribe { filter, group });
    }

    fn unsubscribed(&self, filter: &str, group: Option<&str>) {
        self.handle_local(Event::Unsubscribe { filter, group });
    }

    fn retained(&self, message: &Message) {
        let bytes = wire::encode_retain(&[message]);
        let st = self.state.lock();
        for node in st.live.iter().filter(|n| **n != self.me) {
            self.send(&st, *node, bytes.clone());
        }
    }

    fn publish(&self, message: Arc<Message>) -> Option<usize> {
        let Some(broker) = self.broker.upgrade() else { return Some(0) };
        let none_held = self.publishers_held.load(Ordering::Acquire) == 0;
        if none_held {
            let routed = self.with_remembered_route(&message.topic, |route| {
                self.stats.topic_route_hits.add(1);
                self.publish_on(&broker, message.clone(), route)
            });
            if routed.is_some() {
                return routed;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut local = Vec::new();
        let routed = {
            let mut st = self.state.lock();
            self.route(&mut st, &broker.storage, id, message.clone(), &mut local)
        };
        let queued: usize = local.into_iter().map(|(m, route)| broker.deliver(m, Some(&route))).sum();
        routed.map(|forwards| forwards + queued)
    }
}

/// Dead peers' identities (incarnation, inbound numbering) are kept this
/// many dead timeouts, as long as the driver keeps a dead member (so a late
/// record cannot bring it back): a member that returns within it is known
/// as one we took for dead (it gets the rejoin notice), and its QoS 1/2
/// forwards continue their numbering (no duplicate delivery).
const IDENTITY_KEPT: u32 = 10;

impl State {
    fn new(node: Node, peer_id: PeerId, outbox: Outbox, replay: Vec<(u64, Message)>) -> State {
        let me = node.id();
        State {
            node,
            peers: HashMap::from([(me, peer_id)]),
            ids: HashMap::from([(peer_id, me)]),
            incarnations: HashMap::new(),
            live: BTreeSet::from([me]),
            routing: HashMap::new(),
            outbox,
            replay,
            inbound: Inbound::default(),
            timer_at: None,
            held: HashMap::new(),
            rejoin_notices: HashMap::new(),
            strangers: guard::Strangers::default(),
            dead: HashMap::new(),
            refused: HashMap::new(),
            gone: HashMap::new(),
        }
    }

    /// Forgets the per-peer state of peers dead (or refused) for longer
    /// than `dead_timeout`: their address maps, rejoin notices and held
    /// frames; their identity after [`IDENTITY_KEPT`] dead timeouts.
    /// Returns the peers whose links and log state should go too.
    fn prune(&mut self, now: Instant, dead_timeout: Duration) -> Vec<PeerId> {
        let expired = |since: &Instant| now.saturating_duration_since(*since) > dead_timeout;
        let mut gone: Vec<PeerId> = self.dead.iter().filter(|(_, since)| expired(since)).map(|(p, _)| *p).collect();
        gone.extend(self.refused.iter().filter(|(_, since)| expired(since)).map(|(p, _)| *p));
        for peer in &gone {
            let since = self.dead.remove(peer).or(self.refused.remove(peer)).unwrap_or(now);
            self.strangers.take(peer);
            if let Some(id) = self.ids.remove(peer) {
                self.peers.remove(&id);
                self.rejoin_notices.remove(&id);
                self.gone.insert(id, since);
            }
        }
        let keep = dead_timeout * IDENTITY_KEPT;
        let (incarnations, inbound, live) = (&mut self.incarnations, &mut self.inbound, &self.live);
        self.gone.retain(|id, since| {
            // Back meanwhile (a member again): its identity is in use.
            if live.contains(id) {
                return false;
            }
            let keep = now.saturating_duration_since(*since) <= keep;
            if !keep {
                incarnations.remove(id);
                inbound.forget(*id);
            }
            keep
        });
        gone
    }

    /// The routing core's id of `peer`, remembered both ways.
    fn id_of(&mut self, peer: PeerId) -> NodeId {
        let id = *self.ids.entry(peer).or_insert_with(|| node_id(&peer));
        self.peers.entry(id).or_insert(peer);
        id
    }
}

impl Cluster {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The core's clock: milliseconds since this node started.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs `f` on the route remembered for `topic`, if nothing changed
    /// since: this thread's copy, else the shared one (copied for next time).
    fn with_remembered_route<T>(&self, topic: &str, f: impl FnOnce(&TopicRoute) -> T) -> Option<T> {
        let generation = self.generation.load(Ordering::Acquire);
        let me = self as *const Cluster as usize;
        THREAD_ROUTES.with_borrow_mut(|mine| {
            if mine.cluster != me || mine.generation != generation || mine.routes.len() >= TOPIC_ROUTES {
                mine.routes.clear();
                mine.cluster = me;
                mine.generation = generation;
            }
            if !mine.routes.contains_key(topic) {
                let shared = self.topic_routes.read().get(topic).filter(|r| r.generation == generation).cloned()?;
                mine.routes.insert(topic.into(), (*shared).clone());
            }
            mine.routes.get(topic).map(f)
        })
    }

    /// Publishes `message` along a remembered route: the core is not asked;
    /// a QoS 1/2 message is numbered and held in the outbox as in
    /// [`Cluster::execute`].
    fn publish_on(&self, broker: &Broker, message: Arc<Message>, route: &TopicRoute) -> usize {
        if message.qos == QoS::AtMostOnce {
            // A QoS 0 forward's id is never looked at: no shared counter.
            for (_, sender, to) in &route.forwards {
                self.push_via(sender, Class::Droppable, |out| wire::write_forward(out, 0, None, &message, to));
            }
        } else if !route.forwards.is_empty() {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let now = self.now();
            let mut st = self.state.lock();
            let mut waiting = Vec::with_capacity(route.forwards.len());
            for (node, sender, to) in &route.forwards {
                let sequence = st.outbox.assign(*node, id, now);
                waiting.push((*node, to.clone()));
                self.push_via(sender, Class::Resendable, |out| {
                    wire::write_forward(out, id, Some(sequence), &message, to)
                });
            }
            st.outbox.hold(&broker.storage, id, message.clone(), waiting, now);
        }
        self.stats.forwarded_out.add(route.forwards.len() as u64);
        let queued = route.local.as_ref().map_or(0, |local| broker.deliver(message, Some(local)));
        route.forwards.len() + queued
    }

    /// Remembers what the core decided for a publish to `topic` (`actions`,
    /// all of it, emitted at `generation`), unless it depends on the message
    /// (`$share` picks) or was not decided at once (a lookup).
    fn remember_route(&self, st: &State, topic: &str, id: u64, generation: u64, actions: &[Action]) {
        let mut route = TopicRoute { generation, forwards: Vec::new(), local: None };
        let mut routed = false;
        for action in actions {
            match action {
                Action::Forward { to, msg, route: to_route } if *msg == id && to_route.shared.is_empty() => {
                    let Some(peer) = st.peers.get(to) else { return };
                    route.forwards.push((*to, self.links.sender(*peer), to_route.clone()));
                }
                Action::Deliver { msg, route: local } if *msg == id && local.shared.is_empty() => {
                    route.local = Some(local.clone())
                }
                Action::Routed { msg, .. } if *msg == id => routed = true,
                _ => return,
            }
        }
        if !routed {
            return;
        }
        let mut routes = self.topic_routes.write();
        if routes.len() >= TOPIC_ROUTES {
            routes.clear();
        }
        routes.insert(topic.into(), Arc::new(route));
    }

    /// Hands `event` to the core; anything but a publish or a forward may
    /// change routes, so remembered topic routes are void from now on.
    fn core_event(&self, st: &mut State, event: Event<'_>, actions: &mut Vec<Action>) -> Result<(), core::CoreError> {
        if !matches!(event, Event::Publish { .. } | Event::Forwarded { .. }) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        st.node.handle(self.now(), event, actions)
    }

    /// Runs `f` on the core (read-only access for status and metrics).
    pub fn with_core<T>(&self, f: impl FnOnce(&Node) -> T) -> T {
        f(&self.state.lock().node)
    }

    /// A subscribe or unsubscribe from a local session.
    fn handle_local(&self, event: Event<'_>) {
        let Some(broker) = self.broker.upgrade() else { return };
        let mut actions = Vec::new();
        let mut st = self.state.lock();
        if let Err(err) = self.core_event(&mut st, event, &mut actions) {
            // The broker validated the filter; what the core still refuses
            // passes the cluster's limits (topic levels): it stays local.
            // Client input, so one line, not one per subscription.
            if self.stats.local_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(cause = %err, "routing core refused a local subscription (kept on this node only; further ones are counted, not logged)");
            }
        }
        let mut local = Vec::new();
        self.execute(&mut st, &broker.storage, actions, None, &mut local);
        drop(st);
        // The broker calls this holding its trie lock, which delivering
        // needs: deliver (publishes released by this change, if any) later.
        if !local.is_empty() {
            tokio::spawn(async move {
                for (message, route) in local {
                    broker.deliver(message, Some(&route));
                }
            });
        }
    }

    /// Routes local publish `id`. Returns the number of forwards once it is
    /// routed, `None` while a lookup is outstanding (a QoS 1/2 message is
    /// then persisted unrouted first). A publish of a publisher whose earlier
    /// publish waits for a lookup waits behind it: per-publisher order holds
    /// even when the later one needs no lookup.
    fn route(
        &self,
        st: &mut State,
        storage: &Storage,
        id: u64,
        message: Arc<Message>,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) -> Option<usize> {
        let origin = message.origin.clone();
        if let Some(queue) = origin.as_ref().and_then(|o| st.held.get_mut(o)) {
            let durable = message.qos != QoS::AtMostOnce;
            if durable {
                outbox::persist(storage, id, &message, false, &[]);
            }
            queue.push_back((id, Some((message, durable))));
            return None;
        }
        let routed = self.route_now(st, storage, id, message, false, local);
        if let (None, Some(origin)) = (routed, origin) {
            st.held.insert(origin, VecDeque::from([(id, None)]));
            self.publishers_held.fetch_add(1, Ordering::AcqRel);
        }
        routed
    }

    /// After publisher `origin`'s parked publish was routed (and taken off
    /// the front of its queue): routes its held publishes in order, until
    /// one parks in turn.
    fn release_held(
        &self,
        st: &mut State,
        storage: &Storage,
        origin: Arc<str>,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) {
        loop {
            let next = st.held.get_mut(&origin).and_then(|queue| queue.pop_front());
            let Some((id, Some((message, persisted)))) = next else {
                st.held.remove(&origin);
                self.publishers_held.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            if self.route_now(st, storage, id, message, persisted, local).is_none() {
                st.held.get_mut(&origin).expect("held").push_front((id, None));
                return;
            }
        }
    }

    fn route_now(
        &self,
        st: &mut State,
        storage: &Storage,
        id: u64,
        message: Arc<Message>,
        persisted: bool,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) -> Option<usize> {
        let durable = message.qos != QoS::AtMostOnce;
        st.routing.insert(id, Routing { message: message.clone(), waiting: Vec::new(), persisted });
        let mut actions = Vec::new();
        let generation = self.generation.load(Ordering::Acquire);
        if let Err(err) = self.core_event(st, Event::Publish { topic: &message.topic, msg: id }, &mut actions) {
            // The protocol layer validated the topic; what the core still
            // refuses passes the cluster's limits (topic levels): deliver
            // locally rather than lose it. One line, not one per publish.
            if self.stats.local_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(cause = %err, "routing core refused a publish; delivering locally only (further ones are counted, not logged)");
            }
            st.routing.remove(&id);
            local.push((message, ForwardRoute { plain: true, shared: Vec::new() }));
            return Some(0);
        }
        self.remember_route(st, &message.topic, id, generation, &actions);
        let routed = self.execute(st, storage, actions, None, local);
        match routed.iter().find(|(m, _)| *m == id) {
            Some((_, forwards)) => Some(*forwards as usize),
            None => {
                if durable && !persisted {
                    if let Some(pending) = st.routing.get_mut(&id) {
                        outbox::persist(storage, id, &message, false, &[]);
                        pending.persisted = true;
                    }
                }
                None
            }
        }
    }

    /// Carries out the core's actions: frames and forwards leave at once
    /// (in order), local deliveries are collected in `local` for after the
    /// lock. `forwarded` is the message when the actions answer an
    /// `Event::Forwarded`. Returns the publishes routed, with their forward counts.
    fn execute(
        &self,
        st: &mut State,
        storage: &Storage,
        actions: Vec<Action>,
        forwarded: Option<&Arc<Message>>,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) -> Vec<(u64, u32)> {
        let now = self.now();
        let mut routed = Vec::new();
        let mut released = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, frame } => self.send(st, to, wire::encode_route(&frame)),
                Action::Forward { to, msg, route } => {
                    let Some(pending) = st.routing.get_mut(&msg) else { continue };
                    let sequence = (pending.message.qos != QoS::AtMostOnce).then(|| {
                        pending.waiting.push((to, route.clone()));
                        st.outbox.assign(to, msg, now)
                    });
                    let message = pending.message.clone();
                    self.stats.forwarded_out.add(1);
                    let class = if sequence.is_some() { Class::Resendable } else { Class::Droppable };
                    self.send_with(st, to, class, |out| wire::write_forward(out, msg, sequence, &message, &route));
                }
                Action::Deliver { msg, route } => {
                    let message = match forwarded {
                        Some(message) => Some(message.clone()),
                        None => st.routing.get(&msg).map(|p| p.message.clone()),
                    };
                    if let Some(message) = message {
                        local.push((message, route));
                    }
                }
                Action::Routed { msg, forwards, .. } => {
                    if let Some(pending) = st.routing.remove(&msg) {
                        // A publisher's parked publish: its held ones may go.
                        if let Some(origin) = &pending.message.origin {
                            if let Some(queue) =
                                st.held.get_mut(origin).filter(|q| q.front().is_some_and(|f| f.0 == msg))
                            {
                                queue.pop_front();
                                released.push(origin.clone());
                            }
                        }
                        if !pending.waiting.is_empty() {
                            st.outbox.hold(storage, msg, pending.message, pending.waiting, now);
                        } else if pending.persisted {
                            outbox::forget(storage, msg);
                        }
                    }
                    routed.push((msg, forwards));
                }
                Action::ArmTimer { at } => {
                    st.timer_at = Some(at);
                    self.timer.notify_one();
                }
            }
        }
        for origin in released {
            self.release_held(st, storage, origin, local);
        }
        routed
    }

    fn send(&self, st: &State, to: NodeId, bytes: Bytes) {
        self.send_with(st, to, Class::Control, |out| out.extend_from_slice(&bytes));
    }

    /// Queues for node `to` the frame `write` appends.
    fn send_with(&self, st: &State, to: NodeId, class: Class, write: impl FnOnce(&mut Vec<u8>)) {
        match st.peers.get(&to) {
            Some(peer) => self.push_with(*peer, class, write),
            None => bump(&self.stats.unroutable, 1),
        }
    }

    fn push(&self, peer: PeerId, bytes: Bytes) {
        self.push_with(peer, Class::Control, |out| out.extend_from_slice(&bytes));
    }

    /// Queues the frame `write` appends for `peer`.
    fn push_with(&self, peer: PeerId, class: Class, write: impl FnOnce(&mut Vec<u8>)) {
        self.push_via(&self.links.sender(peer), class, write);
    }

    /// Queues a frame within the send budget; what finds no room is
    /// counted (and, for a QoS 1/2 forward, resent from the outbox later).
    fn push_via(&self, sender: &links::Sender, class: Class, write: impl FnOnce(&mut Vec<u8>)) {
        if !sender.push_with(class, write) {
            match class {
                Class::Control => bump(&self.stats.frames_dropped, 1),
                Class::Droppable => bump(&self.stats.forwards_dropped, 1),
                Class::Resendable => bump(&self.stats.forwards_deferred, 1),
            }
        }
    }

    /// The cluster task: driver events, the core's timer, and a 1 s tick
    /// for outbox resends, replays and the load in our heartbeats.
    async fn run(self: Arc<Self>, mut events: mpsc::Receiver<driver::Event>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        // Decoding and routing (here) and delivering (there) run side by
        // side, in order.
        let (delivery, mut delivered) = mpsc::channel::<Received>(DELIVERY_QUEUE);
        let stage = self.clone();
        tokio::spawn(async move {
            while let Some(received) = delivered.recv().await {
                stage.deliver_received(received);
            }
        });
        loop {
            let timer_at = self.state.lock().timer_at;
            let wake = timer_at.map(|at| tokio::time::Instant::from_std(self.started + Duration::from_millis(at)));
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = events.recv_many(&mut batch, EVENT_BATCH) => {
                    if received == 0 {
                        tracing::info!("cluster driver stopped");
                        return;
                    }
                    let received = self.on_events(batch.drain(..));
                    if delivery.send(received).await.is_err() {
                        return;
                    }
                }
                _ = timer => self.on_timer(),
                _ = self.timer.notified() => {}
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    fn on_timer(&self) {
        let Some(broker) = self.broker.upgrade() else { return };
        let mut local = Vec::new();
        {
            let mut st = self.state.lock();
            st.timer_at = None;
            let mut actions = Vec::new();
            let _ = self.core_event(&mut st, Event::Timer, &mut actions);
            self.execute(&mut st, &broker.storage, actions, None, &mut local);
        }
        for (message, route) in local {
            broker.deliver(message, Some(&route));
        }
    }

    /// Driver events, in order. The state mutex is taken at the first
    /// event that needs it and kept to the end of the batch; plain QoS 0
    /// forwards (the bulk under load) never need it.
    fn on_events(&self, events: impl Iterator<Item = driver::Event>) -> Received {
        let Some(broker) = self.broker.upgrade() else { return Received::default() };
        let storage = &broker.storage;
        let mut local = Vec::new();
        let mut acks: HashMap<PeerId, (u64, u64)> = HashMap::new();
        let mut guard: Option<MutexGuard<'_, State>> = None;
        for event in events {
            match event {
                driver::Event::Frame { from, bytes, held } => {
                    if self.members.read().contains(&from) {
                        self.on_frame(&mut guard, storage, from, bytes, &mut local, &mut acks);
                        // Dealt with: its receive budget goes back to the readers.
                        drop(held);
                    } else {
                        let st = guard.get_or_insert_with(|| self.state.lock());
                        self.stranger_frame(st, from, bytes);
                    }
                }
                driver::Event::MemberRefused { peer, reason } => {
                    let st = guard.get_or_insert_with(|| self.state.lock());
                    st.refused.insert(peer, Instant::now());
                    let held = st.strangers.take(&peer).len() as u64;
                    // The driver logged the one line about this peer.
                    tracing::debug!(%peer, %reason, "peer refused");
                    self.stats.rejected.add("mismatch", held.max(1));
                    // A member restarted with other settings: out at once.
                    self.members.write().remove(&peer);
                    let id = st.ids.get(&peer).copied();
                    if id.is_some_and(|id| st.live.remove(&id)) {
                        self.apply_membership(st, storage, &mut local);
                    }
                }
                driver::Event::MemberUp(member) => {
                    let st = guard.get_or_insert_with(|| self.state.lock());
                    st.dead.remove(&member.peer_id);
                    st.refused.remove(&member.peer_id);
                    self.members.write().insert(member.peer_id);
                    let id = st.id_of(member.peer_id);
                    let previous = st.incarnations.insert(id, member.incarnation);
                    let restarted = previous.is_some_and(|old| old < member.incarnation);
                    tracing::info!(node = %member.name, peer = %member.peer_id, restarted, "member up");
                    if restarted && st.live.remove(&id) {
                        // It lost its routing state: let the core drop
                        // what it knew of it, then see it join afresh.
                        self.apply_membership(st, storage, &mut local);
                    }
                    if st.live.insert(id) {
                        self.apply_membership(st, storage, &mut local);
                        if previous.is_some() && !restarted {
                            // We took it for dead, it was not: it must
                            // give us its routes again.
                            self.send(st, id, wire::encode_rejoined());
                            st.rejoin_notices.insert(id, 3);
                        }
                        // A member we did not route to may have missed
                        // retained messages set meanwhile: it gets ours.
                        self.send_retained(st, &broker, id);
                    }
                    // Its frames that came before its record, in order.
                    for bytes in st.strangers.take(&member.peer_id) {
                        self.on_frame(&mut guard, storage, member.peer_id, bytes, &mut local, &mut acks);
                    }
                }
                driver::Event::MemberSuspect(peer) => tracing::info!(%peer, "member suspect"),
                driver::Event::MemberDead(peer) => {
                    tracing::info!(%peer, "member dead");
                    let st = guard.get_or_insert_with(|| self.state.lock());
                    self.members.write().remove(&peer);
                    st.dead.insert(peer, Instant::now());
                    let id = st.id_of(peer);
                    if st.live.remove(&id) {
                        self.apply_membership(st, storage, &mut local);
                    }
                }
            }
        }
        drop(guard);
        Received { local, acks }
    }

    /// The second stage of receiving: delivers to the local sessions, then
    /// acknowledges QoS 1/2 forwards (what is acknowledged is queued for its
    /// sessions and on disk).
    fn deliver_received(&self, received: Received) {
        let Some(broker) = self.broker.upgrade() else { return };
        for (message, route) in received.local {
            broker.deliver(message, Some(&route));
        }
        if !received.acks.is_empty() {
            // What we acknowledge must survive a crash of this node.
            if let Err(err) = broker.storage.flush() {
                tracing::error!(cause = %err, "storage flush failed; forwards not acknowledged");
                return;
            }
            for (peer, (epoch, upto)) in received.acks {
                self.push(peer, wire::encode_ack(epoch, upto));
            }
        }
    }

    /// One frame (a batch, usually) of a member, decoded and carried out.
    fn on_frame<'a>(
        &'a self,
        guard: &mut Option<MutexGuard<'a, State>>,
        storage: &Storage,
        from: PeerId,
        bytes: Bytes,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
        acks: &mut HashMap<PeerId, (u64, u64)>,
    ) {
        let frames = match wire::unbatch(bytes) {
            Ok(frames) => frames,
            Err(err) => return self.bad_frame(from, &err),
        };
        for frame in frames {
            match wire::decode_within(&frame, self.max_topic_levels) {
                Ok(Wire::Forward(forward)) if forward.sequence.is_none() && forward.route.shared.is_empty() => {
                    // Nothing to number or pick: the broker matches the
                    // topic (checked by the decoder) against its sessions.
                    self.stats.forwarded_in.add(1);
                    let Forward { message, route, .. } = *forward;
                    local.push((Arc::new(message), route));
                }
                Ok(wire) => {
                    let st = guard.get_or_insert_with(|| self.state.lock());
                    self.on_wire(st, storage, from, wire, local, acks);
                }
                Err(err) => self.bad_frame(from, &err),
            }
        }
    }

    /// A frame of a peer that is not a member: held until its record
    /// arrives, unless it is dead, refused, or holds too much already.
    fn stranger_frame(&self, st: &mut State, from: PeerId, bytes: Bytes) {
        let frames = wire::unbatch(bytes.clone()).map_or(1, |f| f.len() as u64);
        if st.dead.contains_key(&from) {
            self.stats.rejected.reject(from, "dead_peer", frames, &"frames of a member declared dead");
        } else if st.refused.contains_key(&from) {
            // Logged once by the driver when it refused the peer.
            self.stats.rejected.add("mismatch", frames);
        } else if !st.strangers.hold(from, bytes, Instant::now()) {
            self.stats.rejected.reject(
                from,
                "not_member",
                frames,
                &"no node record from this peer; its held frames fill the bound",
            );
        }
    }

    fn bad_frame(&self, from: PeerId, err: &wire::WireError) {
        self.stats.rejected.reject(from, err.reason(), 1, err);
    }

    /// Counts the core's refusal of another node's input.
    fn core_refusal(&self, from: PeerId, result: Result<(), core::CoreError>) {
        if let Err(err @ core::CoreError::Rejected { reason, .. }) = result {
            self.stats.rejected.reject(from, reason.name(), 1, &err);
        }
    }

    /// One decoded frame from `from` that needs the state.
    fn on_wire(
        &self,
        st: &mut State,
        storage: &Storage,
        from: PeerId,
        wire: Wire,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
        acks: &mut HashMap<PeerId, (u64, u64)>,
    ) {
        let sender = st.id_of(from);
        let mut actions = Vec::new();
        match wire {
            Wire::Route(frame) => {
                let result = self.core_event(st, Event::Frame { from: sender, frame }, &mut actions);
                self.core_refusal(from, result);
                self.execute(st, storage, actions, None, local);
            }
            Wire::Forward(forward) => {
                let Forward { id, sequence, message, route } = *forward;
                if let Some(sequence) = sequence {
                    let verdict = st.inbound.accept(sender, sequence);
                    if let Some(ack) = st.inbound.ack_for(sender) {
                        acks.insert(from, ack);
                    }
                    match verdict {
                        Verdict::Deliver => {}
                        Verdict::Duplicate => {
                            bump(&self.stats.duplicates, 1);
                            return;
                        }
                        Verdict::Gap => {
                            bump(&self.stats.out_of_order, 1);
                            return;
                        }
                    }
                }
                self.stats.forwarded_in.add(1);
                let message = Arc::new(message);
                let event = Event::Forwarded { from: sender, topic: &message.topic, msg: id, route };
                let result = self.core_event(st, event, &mut actions);
                self.core_refusal(from, result);
                self.execute(st, storage, actions, Some(&message), local);
            }
            Wire::Ack { epoch, upto } => st.outbox.ack(storage, sender, epoch, upto, self.now()),
            Wire::Rejoined => {
                tracing::info!(peer = %from, "a member had taken this node for dead: routes asserted to it again");
                let _ = self.core_event(st, Event::Rejoined { from: sender }, &mut actions);
                self.execute(st, storage, actions, None, local);
            }
            Wire::Retain(messages) => {
                if let Some(broker) = self.broker.upgrade() {
                    for message in &messages {
                        broker.retain_from_fleet(message);
                    }
                }
            }
        }
    }

    /// Sends every retained message this node holds to `to`.
    fn send_retained(&self, st: &State, broker: &Broker, to: NodeId) {
        for chunk in broker.retained_messages().chunks(RETAIN_CHUNK) {
            let refs: Vec<&Message> = chunk.iter().map(|m| &**m).collect();
            self.send(st, to, wire::encode_retain(&refs));
        }
    }

    fn apply_membership(&self, st: &mut State, storage: &Storage, local: &mut Vec<(Arc<Message>, ForwardRoute)>) {
        let next = Arc::new(st.node.membership().next(st.live.iter().copied()));
        tracing::info!(members = next.len(), version = next.version(), "membership changed");
        let mut actions = Vec::new();
        let _ = self.core_event(st, Event::Membership(next), &mut actions);
        self.execute(st, storage, actions, None, local);
    }

    async fn on_tick(&self) {
        let Some(broker) = self.broker.upgrade() else { return };
        let now = self.now();
        let mut local = Vec::new();
        let load = {
            let mut st = self.state.lock();
            let st = &mut *st;
            let (live, peers) = (&st.live, &st.peers);
            for (sequence, id, message, to, route) in st.outbox.due(&broker.storage, now, |node| live.contains(&node)) {
                if let Some(peer) = peers.get(&to) {
                    self.push_with(*peer, Class::Resendable, |out| {
                        wire::write_forward(out, id, Some(sequence), &message, &route)
                    });
                }
            }
            st.rejoin_notices.retain(|node, left| {
                if let Some(peer) = peers.get(node) {
                    self.push(*peer, wire::encode_rejoined());
                }
                *left -= 1;
                *left > 0
            });
            let now_instant = Instant::now();
            for (peer, frames) in st.strangers.expire(now_instant, self.dead_timeout) {
                let why = "no node record from this peer within the dead timeout";
                self.stats.rejected.reject(peer, "not_member", frames, &why);
            }
            for peer in st.prune(now_instant, self.dead_timeout) {
                self.links.forget(&peer);
                self.stats.rejected.forget(&peer);
            }
            self.stats.rejected.sweep(now_instant);
            if self.started.elapsed() >= REPLAY_AFTER {
                for (id, message) in std::mem::take(&mut st.replay) {
                    self.route(st, &broker.storage, id, Arc::new(message), &mut local);
                }
            }
            driver::Load {
                connections: crate::broker::Stats::get(&broker.stats.clients_connected),
                shards: st.node.shards_owned() as u64,
                entries: st.node.entries_owned() as u64,
            }
        };
        for (message, route) in local {
            broker.deliver(message, Some(&route));
        }
        let _ = self.client.set_load(load).await;
        if self.started.elapsed().as_secs() % 10 == 5 {
            self.remember_members().await;
        }
    }

    /// Keeps the alive members' addresses in the peers file, when they changed.
    async fn remember_members(&self) {
        let Ok(members) = self.client.members().await else { return };
        let me = self.client.local_peer_id();
        let mut addrs: Vec<String> = members
            .iter()
            .filter(|m| m.peer_id != me && m.state == driver::MemberState::Alive)
            .flat_map(|m| {
                m.listen_addrs.iter().map(|a| a.clone().with(driver::multiaddr::Protocol::P2p(m.peer_id)).to_string())
            })
            .collect();
        addrs.sort();
        let mut remembered = self.remembered.lock();
        if addrs.is_empty() || *remembered == addrs {
            return;
        }
        remember_peers(&self.peers_file, &addrs);
        *remembered = addrs;
    }

    /// Leaves the fleet (other nodes mark this one dead at once).
    pub async fn shutdown(&self) {
        if let Err(err) = self.client.shutdown().await {
            tracing::debug!(cause = %err, "cluster driver already stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_state_of_long_dead_peers_is_pruned() {
        let me_peer = PeerId::random();
        let me = node_id(&me_peer);
        let mut st = State::new(Node::new(me, core::Config::default()), me_peer, Outbox::new(1), Vec::new());
        let t0 = Instant::now();
        let dead_timeout = Duration::from_secs(8);
        let peers: Vec<PeerId> = (0..50).map(|_| PeerId::random()).collect();
        for (i, peer) in peers.iter().enumerate() {
            let id = st.id_of(*peer);
            st.incarnations.insert(id, 1);
            st.rejoin_notices.insert(id, 3);
            st.inbound.accept(id, outbox::Sequence { epoch: 1, seq: 0, base: 0 });
            // The first 40 die at t0; the rest stay members.
            if i < 40 {
                st.dead.insert(*peer, t0);
            } else {
                st.live.insert(id);
            }
        }
        let stranger = PeerId::random();
        st.refused.insert(stranger, t0);
        let sizes = |st: &State| (st.peers.len(), st.ids.len(), st.incarnations.len(), st.inbound.len());
        assert_eq!(sizes(&st), (51, 51, 50, 50));

        assert!(st.prune(t0 + dead_timeout / 2, dead_timeout).is_empty(), "not dead long enough");
        let gone = st.prune(t0 + dead_timeout * 2, dead_timeout);
        assert_eq!(gone.len(), 41, "the dead and the refused");
        assert_eq!((st.peers.len(), st.ids.len(), st.rejoin_notices.len()), (11, 11, 10));
        assert!(st.dead.is_empty() && st.refused.is_empty());
        // Identities stay a while longer, then go too.
        assert_eq!((st.incarnations.len(), st.inbound.len()), (50, 50));
        st.prune(t0 + dead_timeout * (IDENTITY_KEPT + 1), dead_timeout);
        assert_eq!(sizes(&st), (11, 11, 10, 10));
        assert!(st.gone.is_empty());
        assert!(st.peers.contains_key(&me), "never itself");
    }
}
