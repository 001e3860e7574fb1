//! The glue's counters and the cluster's Prometheus figures.
//!
//! Job: count what the glue does and render it, with the core's counters
//! and the send budget's, as [`Figure`]s. Boundary: no HTTP
//! (`crate::http` serves them); counters only, no decisions.

use super::counter::Counter;
use super::guard;
use super::links::Class;
use super::Cluster;
use crate::metrics::Figure;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the glue (the core keeps its own, `kadmq_dht::core::Counters`).
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
    /// Local subscriptions and publishes the routing core refused (past
    /// the cluster's topic level limit): kept on this node.
    pub local_refused: AtomicU64,
    /// Publishes routed from the per-topic memo, without the core.
    pub topic_route_hits: Counter,
    /// QoS 2 messages of other nodes that came again (after a restart of
    /// either node, or sent back to a node taken for dead) and were not
    /// delivered again.
    pub qos2_duplicates: AtomicU64,
    /// QoS 1/2 publishes refused: the outbox was full.
    pub publishes_refused: AtomicU64,
    /// SUBACKs that waited for the route owners' acknowledgements.
    pub subscribe_waits: AtomicU64,
    /// SUBACKs sent when the wait timed out (the routes are still retried).
    pub subscribe_ack_timeouts: AtomicU64,
}

/// Adds `n` to a plain counter.
pub(super) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Cluster {
    /// The cluster's Prometheus figures.
    pub fn figures(&self) -> Vec<Figure> {
        let st = self.state.lock();
        let c = st.node.counters();
        let s = &self.stats;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let refused = self.links.refusals();
        let rounds = self.links.rounds();
        let retained = self.retained.figures();
        let figure = Figure::new;
        let mut figures = vec![
            figure(
                "kadmq_cluster_send_rounds_total",
                "counter",
                "Rounds of the per-node sender tasks: each hands the driver every batch of frames filled since the previous round.",
                get(&rounds.rounds),
            ),
            figure(
                "kadmq_cluster_send_round_frames_total",
                "counter",
                "Frames handed to the driver by those rounds (frames per round: how much the load batches).",
                get(&rounds.frames),
            ),
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
                "kadmq_cluster_subscribe_waits_total",
                "counter",
                "SUBACKs that waited for every owner to acknowledge the new routes.",
                get(&s.subscribe_waits),
            ),
            figure(
                "kadmq_cluster_subscribe_ack_timeouts_total",
                "counter",
                "SUBACKs sent when that wait timed out (the routes keep being retried).",
                get(&s.subscribe_ack_timeouts),
            ),
            figure(
                "kadmq_cluster_route_unsettled_shards",
                "gauge",
                "Shards of this node's subscriptions with a change some owner has not acknowledged.",
                st.node.unsettled_shards() as u64,
            ),
            figure(
                "kadmq_cluster_assertions_retried_total",
                "counter",
                "Route assertions sent again because an owner had not acknowledged them in time.",
                c.assertions_retried,
            ),
            figure(
                "kadmq_cluster_assertion_gaps_total",
                "counter",
                "Route assertions that came after a missing one (a replacement was asked for).",
                c.assertion_gaps,
            ),
            figure(
                "kadmq_cluster_route_cache_repairs_total",
                "counter",
                "Cached shards dropped because a delta went missing or the owner's version differed.",
                c.delta_gaps + c.watch_mismatches,
            ),
            figure(
                "kadmq_cluster_route_splits_total",
                "counter",
                "Owned route shards this node split by the next topic level (they passed cluster.split_entries).",
                c.splits,
            ),
            figure(
                "kadmq_cluster_route_splits_adopted_total",
                "counter",
                "Owned route shards this node learned are split from another node (a replica, a subscriber node).",
                c.splits_adopted,
            ),
            figure(
                "kadmq_cluster_route_filters_moved_total",
                "counter",
                "Local filters moved to a child shard after their shard split.",
                c.filters_moved,
            ),
            figure(
                "kadmq_cluster_route_resyncs_total",
                "counter",
                "Peers brought up to date (watched shard versions, unacknowledged assertions) after route frames to them were lost.",
                c.resyncs,
            ),
            figure(
                "kadmq_cluster_retained_messages",
                "gauge",
                "Retained messages this node keeps as an owner of their shards.",
                retained.0,
            ),
            figure(
                "kadmq_cluster_retained_tombstones",
                "gauge",
                "Cleared retained topics remembered (so a returning node cannot bring them back).",
                retained.1,
            ),
            figure(
                "kadmq_cluster_retained_bytes",
                "gauge",
                "Payload and topic bytes of the retained messages this node keeps.",
                retained.2,
            ),
            figure(
                "kadmq_cluster_retained_queries_total",
                "counter",
                "Retained lookups of new subscriptions (one per filter).",
                get(&self.retained.stats.queries),
            ),
            figure(
                "kadmq_cluster_retained_partial_total",
                "counter",
                "Retained lookups some asked node did not answer in full by the deadline.",
                get(&self.retained.stats.partial),
            ),
            figure(
                "kadmq_cluster_retained_stale_total",
                "counter",
                "Retained items refused because a newer version was held.",
                get(&self.retained.stats.stale),
            ),
            figure(
                "kadmq_cluster_retained_repaired_total",
                "counter",
                "Retained shards whose digest differed from another owner's (their items exchanged).",
                get(&self.retained.stats.repaired),
            ),
            figure(
                "kadmq_cluster_retained_unacknowledged_total",
                "counter",
                "Retained writes whose owners did not all confirm in time (the PUBACK went anyway).",
                get(&self.retained.stats.unacknowledged),
            ),
            figure(
                "kadmq_cluster_retained_handed_over_total",
                "counter",
                "Retained items sent to nodes that became owners of their shards.",
                get(&self.retained.stats.handed_over),
            ),
            figure(
                "kadmq_cluster_fault_frames_dropped_total",
                "counter",
                "Route frames and QoS 1/2 forwards lost to a test fault hook (always 0 unless KADMQ_FAULTS=1 and a cut or dropped forwards were asked for).",
                get(&self.faults.dropped),
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
                "kadmq_cluster_outbox_written_total",
                "counter",
                "QoS 1/2 forwards written to disk: not acknowledged within cluster.forward_ack_window_ms (or written at once: at shutdown, sent on for a dead node).",
                self.unwritten.written.load(Ordering::Relaxed),
            ),
            figure(
                "kadmq_cluster_outbox_spared_total",
                "counter",
                "QoS 1/2 forwards done before they had to be written (acknowledged, or their destination's part sent on): never written.",
                self.unwritten.spared.load(Ordering::Relaxed),
            ),
            figure(
                "kadmq_cluster_outbox_resent_total",
                "counter",
                "QoS 1/2 forwards sent again for lack of acknowledgement.",
                st.outbox.resent,
            ),
            figure(
                "kadmq_cluster_qos2_duplicates_total",
                "counter",
                "QoS 2 messages of other nodes that came again (after a restart of either node, or sent back to a node taken for dead), not delivered again.",
                get(&s.qos2_duplicates),
            ),
            figure(
                "kadmq_cluster_qos2_remembered",
                "gauge",
                "QoS 2 messages of other nodes remembered as delivered (cluster.qos2_dedupe_secs).",
                self.qos2_seen.lock().len() as u64,
            ),
            figure(
                "kadmq_cluster_outbox_bytes",
                "gauge",
                "Bytes of the QoS 1/2 forwards waiting for acknowledgement (bounded by cluster.outbox_max_mib).",
                self.outbox_bytes.load(Ordering::Relaxed),
            ),
            figure(
                "kadmq_cluster_publishes_refused_total",
                "counter",
                "QoS 1/2 publishes refused because the outbox was full (MQTT 5: reason 0x97).",
                get(&s.publishes_refused),
            ),
            figure(
                "kadmq_cluster_frames_dropped_total",
                "counter",
                "Route frames, acknowledgements and notices dropped: the node's send buffer was full.",
                refused.get(Class::Control),
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
                refused.get(Class::Resendable),
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
            value: refused.get(Class::Droppable),
            label: Some(("reason", "send_buffer")),
        });
        const REJECTED: &str = "Frames from other nodes dropped unapplied, by reason: not_member (no node record), dead_peer, mismatch (fleet settings differ: one per refusal of a peer, plus its frames that arrived), malformed, version, unknown_kind, invalid_topic, invalid_field, and the routing core's reasons (invalid_filter, too_deep, too_long, wrong_shard, invalid_group, too_many_items, unsorted, own_id).";
        // Every reason is listed, 0 or not, so a dashboard sees them all.
        let glue = ["not_member", "dead_peer", "mismatch", "malformed", "version", "unknown_kind", "invalid_topic"];
        let core_reasons = kadmq_dht::core::Rejected::ALL.map(|r| r.name());
        let mut rejected: std::collections::BTreeMap<&'static str, u64> =
            glue.into_iter().chain(["invalid_field"]).chain(core_reasons).map(|r| (r, 0)).collect();
        figures.extend(self.sessions.figures());
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
