//! What an operator can ask a node about the fleet: the members
//! (`/api/v1/cluster`, `kadmq cluster status`), where a topic routes
//! (`/api/v1/routes?topic=`) and the cluster's Prometheus figures.
//!
//! Job: read-only snapshots of the core and the driver, as serde types.
//! Boundary: no HTTP here (`crate::http` serves these).

use super::{node_id, Cluster};
use crate::broker::Stats;
use kadmq_dht::core::topic::join_filter;
use kadmq_dht::core::{NodeId, Ownership};
use kadmq_dht::driver::MemberState;
use kadmq_dht::shard::publish_shards;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node answering.
    pub node: String,
    pub replication: usize,
    pub shard_depth: usize,
    pub members: Vec<MemberStatus>,
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

/// One Prometheus figure.
pub struct Figure {
    pub name: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
    pub value: u64,
    /// One label (name, value) for a series of a labelled metric.
    pub label: Option<(&'static str, &'static str)>,
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
        if let Some(broker) = self.broker.upgrade() {
            for m in out.iter_mut().filter(|m| m.local) {
                m.connections = Stats::get(&broker.stats.clients_connected);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.peer_id.cmp(&b.peer_id)));
        ClusterStatus { node: self.name.clone(), replication, shard_depth, members: out }
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

    /// The cluster's Prometheus figures.
    pub fn figures(&self) -> Vec<Figure> {
        let st = self.state.lock();
        let c = st.node.counters();
        let s = &self.stats;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let figure = |name, kind, help, value| Figure { name, kind, help, value, label: None };
        let mut figures = vec![
            figure(
                "kadmq_cluster_members",
                "gauge",
                "Live members this node routes over (itself included).",
                st.live.len() as u64,
            ),
            figure(
                "kadmq_cluster_forwarded_total",
                "counter",
                "Messages forwarded to other nodes (one per destination node).",
                s.forwarded_out.get(),
            ),
            figure(
                "kadmq_cluster_received_total",
                "counter",
                "Messages received from other nodes.",
                s.forwarded_in.get(),
            ),
            figure(
                "kadmq_cluster_duplicates_total",
                "counter",
                "Resent forwards that had already arrived (not delivered again).",
                get(&s.duplicates),
            ),
            figure(
                "kadmq_cluster_route_cache_hits_total",
                "counter",
                "Publishes whose shard routes were in the route cache.",
                c.cache_hits,
            ),
            figure(
                "kadmq_cluster_topic_route_hits_total",
                "counter",
                "Publishes routed as an earlier publish to the same topic, without the routing core (nothing that decides routes changed since).",
                s.topic_route_hits.get(),
            ),
            figure(
                "kadmq_cluster_route_cache_misses_total",
                "counter",
                "Publishes that needed a shard not in the route cache.",
                c.cache_misses,
            ),
            figure(
                "kadmq_cluster_remote_lookups_total",
                "counter",
                "Route lookups sent to shard owners.",
                c.lookups_sent,
            ),
            figure(
                "kadmq_cluster_lookups_failed_total",
                "counter",
                "Route lookups no owner answered.",
                c.lookups_failed,
            ),
            figure(
                "kadmq_cluster_owned_reads_total",
                "counter",
                "Publishes routed from a shard this node owns.",
                c.owned_reads,
            ),
            figure(
                "kadmq_cluster_shards_owned",
                "gauge",
                "Route shards this node owns.",
                st.node.shards_owned() as u64,
            ),
            figure(
                "kadmq_cluster_shard_entries_owned",
                "gauge",
                "Route entries in the shards this node owns.",
                st.node.entries_owned() as u64,
            ),
            figure(
                "kadmq_cluster_route_cache_entries",
                "gauge",
                "Route entries in the route cache.",
                st.node.cache().entries() as u64,
            ),
            figure(
                "kadmq_cluster_local_filters",
                "gauge",
                "Distinct filters this node's sessions subscribe to.",
                st.node.local_filters() as u64,
            ),
            figure(
                "kadmq_cluster_publishes_waiting",
                "gauge",
                "Local publishes waiting for a route lookup, or held behind their publisher's earlier one.",
                (st.node.parked() + st.held.values().map(|q| q.len().saturating_sub(1)).sum::<usize>()) as u64,
            ),
            figure(
                "kadmq_cluster_outbox_messages",
                "gauge",
                "QoS 1/2 forwards waiting for acknowledgement.",
                st.outbox.len() as u64,
            ),
            figure(
                "kadmq_cluster_outbox_resent_total",
                "counter",
                "QoS 1/2 forwards sent again for lack of acknowledgement.",
                st.outbox.resent,
            ),
            figure(
                "kadmq_cluster_outbox_dropped_total",
                "counter",
                "QoS 1/2 forwards given up because the outbox was full.",
                st.outbox.dropped,
            ),
            figure(
                "kadmq_cluster_frames_dropped_total",
                "counter",
                "Route frames, acknowledgements and notices dropped: the node's send buffer was full.",
                get(&s.frames_dropped),
            ),
            figure(
                "kadmq_cluster_peer_queues",
                "gauge",
                "Send queues (and sender tasks) this node keeps for other nodes; those of nodes dead longer than the dead timeout are dropped.",
                self.links.len() as u64,
            ),
            figure(
                "kadmq_cluster_peers_known",
                "gauge",
                "Peers whose addresses this node keeps (itself included); dead ones go after the dead timeout.",
                st.peers.len() as u64,
            ),
            figure(
                "kadmq_cluster_held_frame_bytes",
                "gauge",
                "Bytes of frames held for peers whose node record has not arrived yet.",
                st.strangers.bytes() as u64,
            ),
            figure(
                "kadmq_cluster_local_refused_total",
                "counter",
                "Local subscriptions and publishes the routing core refused (more topic levels than the cluster's limit, 128): kept on this node.",
                get(&s.local_refused),
            ),
            figure(
                "kadmq_cluster_forwards_deferred_total",
                "counter",
                "QoS 1/2 forwards not queued past 7/8 of the send buffer (resent from the outbox).",
                get(&s.forwards_deferred),
            ),
            figure(
                "kadmq_cluster_send_buffer_bytes",
                "gauge",
                "Bytes held for other nodes (queued or being written), within cluster.send_buffer_mib.",
                self.client.send_budget().used() as u64,
            ),
        ];
        figures.push(Figure {
            name: "kadmq_cluster_forwards_dropped_total",
            kind: "counter",
            help: "QoS 0 forwards dropped, by reason (send_buffer: past 7/8 of the node's send buffer).",
            value: get(&s.forwards_dropped),
            label: Some(("reason", "send_buffer")),
        });
        const REJECTED: &str = "Frames from other nodes dropped unapplied, by reason: not_member (no node record), dead_peer, mismatch (fleet settings differ: one per refusal of a peer, plus its frames that arrived), malformed, version, unknown_kind, invalid_topic, invalid_field, and the routing core's reasons (invalid_filter, too_deep, too_long, wrong_shard, invalid_group, too_many_items, unsorted, own_id).";
        // Every reason is listed, 0 or not, so a dashboard sees them all.
        let glue = ["not_member", "dead_peer", "mismatch", "malformed", "version", "unknown_kind", "invalid_topic"];
        let core_reasons = kadmq_dht::core::Rejected::ALL.map(|r| r.name());
        let mut rejected: std::collections::BTreeMap<&'static str, u64> =
            glue.into_iter().chain(["invalid_field"]).chain(core_reasons).map(|r| (r, 0)).collect();
        rejected.extend(s.rejected.counts());
        for (reason, value) in rejected {
            figures.push(Figure {
                name: "kadmq_cluster_frames_rejected_total",
                kind: "counter",
                help: REJECTED,
                value,
                label: Some(("reason", reason)),
            });
        }
        figures
    }
}
