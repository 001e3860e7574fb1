//! What an operator can ask a node about the fleet: the members
//! (`/api/v1/cluster`, `kadmq cluster status`), where a topic routes
//! (`/api/v1/routes?topic=`). The figures are in [`super::metrics`].
//!
//! Job: read-only snapshots of the core and the driver, as serde types.
//! Boundary: no HTTP here (`crate::http` serves these).

use super::{node_id, Cluster};
use crate::broker::Stats;
use kadmq_dht::core::filter_trie::join_filter;
use kadmq_dht::core::{NodeId, Ownership};
use kadmq_dht::driver::MemberState;
use kadmq_dht::shard::publish_shards;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node answering.
    pub node: String,
    pub replication: usize,
    pub shard_depth: usize,
    /// Whether the node answering takes MQTT clients (false while it joins
    /// its fleet, see `crate::broker::admission`). Nodes older than this
    /// field took clients from the start.
    #[serde(default = "taken_from_the_start")]
    pub admitted: bool,
    pub members: Vec<MemberStatus>,
}

fn taken_from_the_start() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub peer_id: String,
    /// The routing core's id (16 hex digits).
    pub node_id: String,
    /// `alive`, `suspect` or `dead`.
    pub state: String,
    /// Whether this is the node answering.
    pub local: bool,
    pub addresses: Vec<String>,
    pub mqtt_listeners: Vec<String>,
    pub incarnation: u64,
    pub connections: u64,
    /// Route shards the member owns, and the route entries in them (its
    /// last heartbeat; live figures for the local node).
    pub shards: u64,
    pub entries: u64,
}

/// `GET /api/v1/routes?topic=`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutesReport {
    pub topic: String,
    /// The shards a publish to the topic consults.
    pub shards: Vec<ShardRoutes>,
    /// Names of the nodes the topic's subscribers are on, per what this
    /// node knows (complete when every shard's `source` is `owned` or `cached`).
    pub destinations: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardRoutes {
    /// The literal prefix naming the shard (`""` for the root shard).
    pub prefix: String,
    /// First 8 bytes of the shard key, in hex.
    pub key: String,
    pub owners: Vec<String>,
    /// `owned` (this node is an owner), `cached` (from a lookup), or
    /// `unknown` (not looked up here yet: ask an owner).
    pub source: String,
    pub filters: Vec<FilterRoute>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilterRoute {
    pub filter: String,
    /// Nodes with plain subscribers, and their subscriber counts.
    pub nodes: Vec<(String, u32)>,
    /// Shared groups: (group, nodes holding members).
    pub groups: Vec<(String, Vec<(String, u32)>)>,
}

impl Cluster {
    /// Every member this node knows of, itself included.
    pub async fn status(&self) -> ClusterStatus {
        let members = self.client.members().await.unwrap_or_default();
        let (replication, shard_depth, shards, entries) = self.with_core(|node| {
            (node.config().replication, node.config().shard_depth, node.shards_owned(), node.entries_owned())
        });
        let me = self.client.local_peer_id();
        let mut out: Vec<MemberStatus> = members
            .into_iter()
            .map(|m| {
                let local = m.peer_id == me;
                MemberStatus {
                    name: m.name,
                    node_id: node_id(&m.peer_id).to_string(),
                    peer_id: m.peer_id.to_string(),
                    state: match m.state {
                        MemberState::Alive => "alive",
                        MemberState::Suspect => "suspect",
                        MemberState::Dead => "dead",
                    }
                    .into(),
                    local,
                    addresses: m.listen_addrs.iter().map(|a| a.to_string()).collect(),
                    mqtt_listeners: m.mqtt_listeners,
                    incarnation: m.incarnation,
                    connections: m.load.connections,
                    shards: if local { shards as u64 } else { m.load.shards },
                    entries: if local { entries as u64 } else { m.load.entries },
                }
            })
            .collect();
        let mut admitted = true;
        if let Some(broker) = self.broker.upgrade() {
            for m in out.iter_mut().filter(|m| m.local) {
                m.connections = Stats::get(&broker.stats.clients_connected);
            }
            admitted = broker.admission.is_admitted();
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.peer_id.cmp(&b.peer_id)));
        ClusterStatus { node: self.name.clone(), replication, shard_depth, admitted, members: out }
    }

    /// Where a publish to `topic` goes, from this node's owned shards and
    /// route cache (no network round trip).
    pub async fn routes(&self, topic: &str) -> RoutesReport {
        let names: HashMap<NodeId, String> = self
            .client
            .members()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|m| (node_id(&m.peer_id), m.name))
            .collect();
        let name = |id: NodeId| names.get(&id).cloned().unwrap_or_else(|| id.to_string());
        let mut destinations = BTreeSet::new();
        let shards = self.with_core(|node| {
            let depth = node.config().shard_depth;
            publish_shards(topic, depth)
                .into_iter()
                .map(|(prefix, key)| {
                    let owners = node.membership().owners(&key, node.config().replication);
                    let (source, routes) = if let Some(shard) = node.owned_shard(&key) {
                        ("owned", Some(shard.routes()))
                    } else if owners.contains(&node.id()) {
                        ("owned", None)
                    } else if let Some(cached) = node.cache().peek(&key) {
                        ("cached", Some(&cached.routes))
                    } else {
                        ("unknown", None)
                    };
                    let mut filters = Vec::new();
                    if let Some(routes) = routes {
                        routes.match_topic(topic, |levels, hash, r| {
                            let nodes: Vec<(String, u32)> = r.nodes.iter().map(|(n, c)| (name(*n), *c)).collect();
                            destinations.extend(r.nodes.iter().map(|(n, _)| *n));
                            let groups = r
                                .groups
                                .iter()
                                .map(|(g, members)| {
                                    destinations.extend(members.iter().map(|(n, _)| *n));
                                    (g.to_string(), members.iter().map(|(n, c)| (name(*n), *c)).collect())
                                })
                                .collect();
                            filters.push(FilterRoute { filter: join_filter(levels, hash), nodes, groups });
                        });
                    }
                    ShardRoutes {
                        key: key.0[..8].iter().map(|b| format!("{b:02x}")).collect(),
                        prefix,
                        owners: owners.iter().map(|o| name(*o)).collect(),
                        source: source.into(),
                        filters,
                    }
                })
                .collect()
        });
        RoutesReport { topic: topic.into(), shards, destinations: destinations.into_iter().map(name).collect() }
    }
}
