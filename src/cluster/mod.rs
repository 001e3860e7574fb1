//! The broker in a fleet: the glue between the broker, the routing core
//! (`kadmq_dht::core`) and the libp2p driver (`kadmq_dht::driver`).
//!
//! Job: tell the core about this node's subscriptions and the live members,
//! route every publish through it, carry out what it asks (route frames and
//! forwarded messages to other nodes, deliveries to local sessions), and
//! make QoS 1/2 forwards safe: each is numbered per destination, held in a
//! persisted [`outbox`] until its destination nodes acknowledge it, resent
//! in order while they do not, and delivered in order and once at the
//! destination ([`dedupe`]).
//! Sessions follow their clients: a directory sharded like the routes
//! says which node holds each session, a CONNECT anywhere takes it there,
//! a dead node's sessions are adopted and its clients' wills published
//! ([`sessions`], [`directory`]). Retained messages live with their
//! topic's shard owners, versioned, and a subscribe gathers them
//! ([`retained`]).
//!
//! Boundary: the broker knows this module only as a
//! [`Fleet`](crate::broker::Fleet) (`publish.rs`): a publish comes in and a
//! [`PublishRoute`](crate::broker::PublishRoute) goes back, and the broker
//! delivers locally itself. Messages from other nodes, and local publishes
//! routed after a lookup, reach local sessions through
//! [`Broker::deliver`](crate::broker::Broker::deliver) only, with no lock of
//! this module held. The core never sees a socket.
//!
//! # Rooms
//!
//! | file | job |
//! |---|---|
//! | `bootstrap.rs` | [`start`]: keys, settings → driver and core config, the peers file, the outbox of the last run |
//! | `publish.rs` | the publish path: the `Fleet` impl, routing through the core, held publishers, carrying out the core's actions |
//! | `memo.rs` | the per-topic route memo (publishes that skip the core) |
//! | `receive.rs` | the receive path: driver frames, decoded and applied; the delivery stage |
//! | `membership.rs` | members up, dead and refused; rejoin notices; retained sync to a member that came up; what was held for a dead member sent on; pruning the dead |
//! | [`sessions`] | sessions following their clients: claims, hand-overs, copies to the standby, adoption of a dead node's sessions and wills, leaving |
//! | [`retained`] | retained messages at their shards' owners: versions, tombstones, scatter-gather, hand-overs |
//! | [`directory`] | the session directory records this node keeps as an owner, and the standby's copies |
//! | `task.rs` | the cluster task: driver events, the core's timer, the 1 s tick |
//! | `state.rs` | what the state mutex guards |
//! | [`links`] | per-destination send queues (the one send API: [`links::Sender::send`]) |
//! | [`outbox`] | unacknowledged QoS 1/2 forwards |
//! | [`dedupe`] | the receiver's in-order, once-only filter of QoS 1/2 forwards |
//! | [`wire`] | the envelope between brokers |
//! | [`faults`] | test-only fault hooks: route frames to chosen peers lost |
//! | [`guard`] | peer input not applied (counted, logged once), frames of peers not yet members |
//! | [`metrics`] | the glue's counters and the cluster's Prometheus figures |
//! | [`status`] | `/api/v1/cluster`, `/api/v1/routes` |
//!
//! # Locks
//!
//! One mutex guards the state (`state.rs`) and the core: publishing
//! connections take it briefly to route (a cached route needs no network),
//! the cluster task takes it for frames from other nodes, membership changes
//! and the core's timer. A topic published again while nothing that decides
//! routes changed (the core's *generation*, bumped by every event but
//! publishes and forwards) reuses the route computed the first time, without
//! the mutex (`memo.rs`; not for `$share` routes, which pick per message).
//! Frames leave in the order they are queued, batched per destination
//! ([`links`]: a send queue's lock is taken under the state mutex, never the
//! other way), so per-pair FIFO holds. A plain QoS 0 forward is delivered
//! without the mutex; local deliveries run after it is released (the broker's
//! locks come after this module's in the order written in `crate::broker`).
//! The leaf locks added for retained messages and the outbox are taken
//! under the state mutex or alone, never one inside another: the retained
//! store, its `writes` and `requests` maps, `qos2_seen`, the sessions'
//! `adopted` map, the outbox's `Unwritten` (also taken by the storage's
//! flush, under its `flushing` lock, which nothing here holds).

mod bootstrap;
pub mod counter;
pub mod dedupe;
pub mod directory;
pub mod faults;
pub mod guard;
pub mod links;
mod membership;
mod memo;
pub mod metrics;
pub mod outbox;
mod publish;
mod receive;
pub mod retained;
pub mod retained_item;
pub mod sessions;
mod state;
pub mod status;
mod task;
pub mod wire;

pub use bootstrap::{frame_version, node_id, start, StartContext};
pub use metrics::ClusterStats;

use crate::broker::Broker;
use kadmq_dht::core::{self, Event, Node, NodeId};
use kadmq_dht::driver;
use links::Links;
use memo::TopicRoute;
use parking_lot::{Mutex, RwLock};
use state::State;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: {0}")]
    Driver(#[from] driver::Error),
    #[error("cluster: invalid multiaddr {addr:?}: {cause}")]
    Multiaddr { addr: String, cause: String },
    #[error("cluster: no cluster key file configured (create one with `kadmq keygen`)")]
    NoKey,
    #[error("cluster: {0}")]
    Storage(#[from] crate::storage::StorageError),
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
    /// Wakes the cluster task when the core armed its timer.
    timer: Notify,
    started: Instant,
    me: NodeId,
    name: String,
    /// Where the members' addresses are remembered across restarts.
    peers_file: PathBuf,
    /// Peers that are members now (up, not dead): their frames are applied.
    /// Read per batch of frames, outside the state mutex.
    members: RwLock<HashSet<driver::PeerId>>,
    dead_timeout: Duration,
    /// The outbox's bytes ([`outbox::Outbox::bytes`]) and their bound: QoS
    /// 1/2 publishes are refused while it is reached.
    outbox_bytes: Arc<AtomicU64>,
    /// The outbox's records not written yet, and how long a client's
    /// acknowledgement waits for their destinations' before they are.
    unwritten: Arc<outbox::Unwritten>,
    forward_ack_window: Duration,
    outbox_max: u64,
    /// How long a SUBACK waits for the route owners ([`Cluster::routes_settled`]).
    subscribe_ack_timeout: Duration,
    /// What the peers file holds (as written last, or read at start).
    remembered: Mutex<Vec<String>>,
    pub stats: ClusterStats,
    /// The fleet's replication factor R (route shards, session directory).
    replication: usize,
    /// Sessions following their clients ([`sessions`]).
    sessions: sessions::Sessions,
    /// QoS 2 messages of other nodes delivered here ([`dedupe::Qos2Seen`]).
    qos2_seen: Mutex<dedupe::Qos2Seen>,
    /// The fleet's retained messages this node keeps ([`retained`]).
    retained: retained::FleetRetainedStore,
    /// Test-only fault hooks ([`faults`]).
    pub faults: faults::Faults,
    /// This cluster, for the tasks it starts itself.
    this: std::sync::OnceLock<Weak<Cluster>>,
}

impl Cluster {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The core's clock: milliseconds since this node started.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Hands `event` to the core; anything but a publish or a forward may
    /// change routes, so remembered topic routes are void from now on.
    fn core_event(
        &self,
        st: &mut State,
        event: Event<'_>,
        actions: &mut Vec<core::Action>,
    ) -> Result<(), core::CoreError> {
        // A lost frame changes no route (it schedules a resync).
        if !matches!(event, Event::Publish { .. } | Event::Forwarded { .. } | Event::FramesLost { .. }) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        let result = st.node.handle(self.now(), event, actions);
        if !st.route_waiters.is_empty() {
            let node = &st.node;
            st.route_waiters.retain_mut(|waiter| {
                waiter.tickets.retain(|t| !node.settled(t));
                let done = waiter.tickets.is_empty() || waiter.tx.is_closed();
                if done {
                    if let Some(tx) = waiter.tx.take() {
                        let _ = tx.send(());
                    }
                }
                !done
            });
        }
        result
    }

    /// Fault hook ([`faults`]): on the member named `peer`, or heal every
    /// fault (`peer: None`).
    pub async fn fault(&self, peer: Option<&str>, fault: faults::Fault) -> Result<(), String> {
        if !self.faults.enabled() {
            return Err("fault hooks are off (start the node with KADMQ_FAULTS=1)".into());
        }
        let Some(peer) = peer else {
            self.faults.heal();
            return Ok(());
        };
        let members = self.client.members().await.unwrap_or_default();
        let member = members.iter().find(|m| m.name == peer).ok_or_else(|| format!("no member named {peer:?}"))?;
        let node = node_id(&member.peer_id);
        match fault {
            faults::Fault::Cut => self.faults.cut(node),
            faults::Fault::Delay(by) => self.faults.delay(node, by, self.links.sender(member.peer_id)),
            faults::Fault::MuteAcks => self.faults.mute_acks(node),
            faults::Fault::DropForwards => self.faults.drop_forwards(node),
        }
        Ok(())
    }

    /// Runs `f` on the core (read-only access for status and metrics).
    pub fn with_core<T>(&self, f: impl FnOnce(&Node) -> T) -> T {
        f(&self.state.lock().node)
    }

    /// Leaves the fleet (other nodes mark this one dead at once). The
    /// cluster's tasks end with the driver: the cluster task when the
    /// driver's events stop (with the last batch delivered), the send
    /// queues' tasks as they are closed here.
    pub async fn shutdown(&self) {
        // The storage's sync at shutdown writes every forward still held.
        self.unwritten.require_all();
        if let Err(err) = self.client.shutdown().await {
            tracing::debug!(cause = %err, "cluster driver already stopped");
        }
        self.links.close_all();
    }
}
