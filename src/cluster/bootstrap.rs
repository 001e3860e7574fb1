//! Joining the fleet: from the settings to a running cluster.
//!
//! Job: the node key and the cluster key, the settings turned into the
//! driver's and the routing core's configuration, the peers file (the
//! members' addresses, remembered across restarts so a node restarted
//! without a bootstrap address finds its fleet), the outbox of the last
//! run, and the tasks [`start`] puts in the server's task set. Boundary:
//! runs once at start (and the peers file once in a while); routing is in
//! the other rooms.

use super::directory::Directory;
use super::outbox::{self, Outbox};
use super::sessions::Sessions;
use super::state::State;
use super::wire;
use super::{Cluster, ClusterError, ClusterStats};
use crate::broker::Broker;
use crate::config::ClusterSettings;
use kadmq_dht::core::{self, Event, Membership, Node, NodeId, OwnershipConfig};
use kadmq_dht::driver::{self, DriverConfig, Multiaddr, PeerId};
use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Everything [`start`] needs besides the settings.
pub struct StartContext<'a> {
    pub data_dir: &'a Path,
    pub broker: &'a Arc<Broker>,
    /// MQTT listener URLs announced to other nodes (e.g. `mqtt://10.0.0.5:1883`).
    pub mqtt_listeners: Vec<String>,
    /// The server's task set: the driver's event loop, the cluster task and
    /// the directory task run in it, so they stop with the server.
    pub tasks: &'a mut JoinSet<()>,
}

/// Joins the fleet: starts the libp2p driver and the cluster task (in
/// `cx.tasks`), and attaches the cluster to the broker (its restored
/// subscriptions are announced). Returns once the node listens.
pub async fn start(settings: &ClusterSettings, cx: StartContext<'_>) -> Result<Arc<Cluster>, ClusterError> {
    let key_dir = crate::cli::node_key_dir(cx.data_dir);
    let keypair = driver::load_or_generate_keypair(&key_dir)?;
    let key_file = settings.cluster_key_file.as_ref().ok_or(ClusterError::NoKey)?;
    let cluster_key = driver::read_cluster_key(key_file)?;
    let peer_id = keypair.public().to_peer_id();
    let name = settings.node_name.clone().unwrap_or_else(|| default_name(&peer_id));
    let mut config = DriverConfig::new(name.clone(), keypair, cluster_key);
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
    cx.tasks.spawn(event_loop.run());

    let me = node_id(&peer_id);
    let core_config = core::RoutingConfig {
        replication: settings.replication,
        shard_depth: settings.shard_depth,
        max_topic_levels: cx.broker.config.max_topic_levels,
        anti_entropy_interval_ms: settings.route_check_secs.saturating_mul(1000),
        split_entries: settings.split_entries,
        ..core::RoutingConfig::default()
    };
    let mut node = Node::new(me, core_config.clone());
    let mut actions = Vec::new();
    let first_view = Arc::new(Membership::new(1, [me], OwnershipConfig::default()));
    if let Err(err) = node.handle(0, Event::Membership(first_view), &mut actions) {
        // A membership event is always accepted; should that change, the
        // node still starts (alone until the driver reports members).
        tracing::error!(cause = %err, "routing core refused the first membership view");
    }

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

    let outbox_bytes = outbox.bytes();
    let unwritten = outbox.unwritten();
    let writer = unwritten.clone();
    let forward_ack_window = Duration::from_millis(settings.forward_ack_window_ms);
    if storage.before_flush(Box::new(move |storage| writer.write_all(storage))) {
        outbox.defer_writes(forward_ack_window);
    } else {
        tracing::warn!("storage flush hook already set; forwarded messages are written one by one");
    }
    let qos2_seen = super::dedupe::Qos2Seen::new(settings.qos2_dedupe_secs.saturating_mul(1000), storage.seen()?);
    let (sessions, session_changes) = Sessions::new(Directory::load(storage));
    let retained = super::retained::FleetRetainedStore::open(
        storage,
        settings.retained_tombstone_secs,
        settings.retained_check_secs,
    )?;
    let cluster = Arc::new(Cluster {
        state: Mutex::new(State::new(node, peer_id, outbox, replay)),
        max_topic_levels: core_config.max_topic_levels,
        publishers_held: AtomicU64::new(0),
        topic_routes: RwLock::new(ahash::AHashMap::new()),
        generation: AtomicU64::new(0),
        next_id: AtomicU64::new(next_id),
        broker: Arc::downgrade(cx.broker),
        client: client.clone(),
        links: super::links::Links::new(client.clone()),
        timer: Notify::new(),
        started: Instant::now(),
        me,
        name,
        peers_file,
        members: RwLock::new(std::collections::HashSet::new()),
        dead_timeout: Duration::from_secs(settings.dead_timeout_secs),
        subscribe_ack_timeout: Duration::from_millis(settings.subscribe_ack_timeout_ms),
        outbox_bytes,
        unwritten,
        forward_ack_window,
        outbox_max: settings.outbox_max_mib.saturating_mul(1 << 20),
        remembered: Mutex::new(remembered),
        stats: ClusterStats::default(),
        replication: settings.replication,
        sessions,
        retained,
        qos2_seen: Mutex::new(qos2_seen),
        faults: super::faults::Faults::from_env(),
        this: std::sync::OnceLock::new(),
    });
    let _ = cluster.this.set(Arc::downgrade(&cluster));
    if !storage.set_mirror(cluster.sessions.mirror()) {
        tracing::error!("storage already mirrored; sessions are not copied to their standby");
    }
    {
        let mut st = cluster.state.lock();
        let mut local = Vec::new();
        cluster.execute(&mut st, storage, actions, None, &mut local);
    }
    cx.tasks.spawn(cluster.clone().run(events));
    cx.tasks.spawn(cluster.clone().directory_task(session_changes));
    // Retained messages kept before this node was in a fleet join the
    // fleet's (at version 0: any write made in the fleet is newer).
    let local = cx.broker.take_fleet_retained();
    if !local.is_empty() {
        tracing::info!(messages = local.len(), "retained messages of this node handed to the fleet's store");
        cluster.adopt_local_retained(storage, local);
    }
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

impl Cluster {
    /// Keeps the alive members' addresses in the peers file, when they changed.
    pub(super) async fn remember_members(&self) {
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
}
