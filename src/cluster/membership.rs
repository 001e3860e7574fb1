//! Membership: the live set the core routes over, kept in step with the
//! driver's failure detector.
//!
//! Job: a member up (new, restarted with a higher incarnation, or back
//! after we took it for dead: then it gets the rejoin notice until it
//! answers), dead, or refused (fleet settings differ); the core's new
//! membership view after each change; every retained message of this node
//! to a member that comes up; and, each tick, the rejoin notices and the
//! pruning of long-dead peers' state. Boundary: the driver decides who is
//! alive; this room only follows it.

use super::links::{self, Class};
use super::metrics::bump;
use super::receive::{Batch, Received};
use super::state::State;
use super::wire;
use super::Cluster;
use crate::broker::message::Message;
use crate::storage::Storage;
use kadmq_dht::core::{Event, ForwardRoute, NodeId};
use kadmq_dht::driver::{self, PeerId};
use std::sync::Arc;
use std::time::Instant;

/// Ticks a member we took for dead is told to assert its routes again: the
/// notice is a frame, and frames right after a link comes back can be lost.
const REJOIN_NOTICES: u8 = 3;

impl Cluster {
    /// The driver refused `peer` (a member restarted with other settings):
    /// out at once, its held frames dropped.
    pub(super) fn member_refused(&self, batch: &mut Batch<'_>, peer: PeerId, reason: &str) {
        let storage = batch.storage;
        let (st, received) = batch.parts();
        st.refused.insert(peer, Instant::now());
        let held = st.strangers.take(&peer).len() as u64;
        // The driver logged the one line about this peer.
        tracing::debug!(%peer, %reason, "peer refused");
        self.stats.rejected.add("mismatch", held.max(1));
        self.members.write().remove(&peer);
        let id = st.ids.get(&peer).copied();
        if id.is_some_and(|id| st.live.remove(&id)) {
            self.apply_membership(st, storage, &mut received.local);
        }
    }

    pub(super) fn member_up(&self, batch: &mut Batch<'_>, member: driver::Member) {
        let storage = batch.storage;
        let (st, received) = batch.parts();
        st.dead.remove(&member.peer_id);
        st.refused.remove(&member.peer_id);
        self.members.write().insert(member.peer_id);
        let id = st.id_of(member.peer_id);
        let previous = st.incarnations.insert(id, member.incarnation);
        let restarted = previous.is_some_and(|old| old < member.incarnation);
        tracing::info!(node = %member.name, peer = %member.peer_id, restarted, "member up");
        if restarted && st.live.remove(&id) {
            // It lost its routing state: let the core drop what it knew of
            // it, then see it join afresh.
            self.apply_membership(st, storage, &mut received.local);
        }
        if st.live.insert(id) {
            self.apply_membership(st, storage, &mut received.local);
            if previous.is_some() && !restarted {
                // We took it for dead, it was not: it must give us its
                // routes again.
                let notice = wire::encode_rejoined();
                self.send_to(st, id, Class::Control, links::copy_of(&notice));
                st.rejoin_notices.insert(id, REJOIN_NOTICES);
            }
        }
        // Its frames that came before its record, in order.
        let held = st.strangers.take(&member.peer_id);
        for bytes in held {
            self.on_frame(batch, member.peer_id, bytes);
        }
    }

    pub(super) fn member_dead(&self, batch: &mut Batch<'_>, peer: PeerId) {
        tracing::info!(%peer, "member dead");
        let storage = batch.storage;
        let (st, received) = batch.parts();
        self.members.write().remove(&peer);
        st.dead.insert(peer, Instant::now());
        let id = st.id_of(peer);
        if st.live.remove(&id) {
            self.apply_membership(st, storage, &mut received.local);
            // Its clients' sessions and wills: this node acts for some.
            received.dead_sessions.extend(self.sessions_of_dead(st, id));
            received.dead_nodes.push(id);
        }
        // Sent on first, its new forwards made due, and only then taken
        // out: a flush meanwhile (a publisher's PUBACK waiting for the
        // dead node) finds either the old record or the new ones due.
        let held = st.outbox.part_for(id);
        if !held.is_empty() {
            self.send_on_held(st, storage, id, held, received);
            self.unwritten.require_all();
        }
        st.outbox.take_destination(storage, id);
    }

    /// What this node held for `dead` (forwarded, unacknowledged), sent
    /// elsewhere: the messages for its sessions to this node and to every
    /// other member, as forwards flagged "sent on for `dead`" that the
    /// outbox holds like any other (persisted, resent until acknowledged);
    /// each shared group it was picked for is routed again. One this node
    /// only relayed to `dead` (sent on by another node, which sent it to
    /// every member) goes to this node's adopted sessions only.
    fn send_on_held(
        &self,
        st: &mut State,
        storage: &Storage,
        dead: NodeId,
        held: Vec<(Arc<Message>, ForwardRoute)>,
        received: &mut Received,
    ) {
        let mut for_sessions = Vec::new();
        let mut relayed = Vec::new();
        for (message, route) in held {
            if route.sent_on == Some(dead) {
                relayed.push(message);
                continue;
            }
            if route.plain {
                for_sessions.push(message.clone());
            }
            if !route.shared.is_empty() {
                self.route_again_for(st, storage, message, route.shared, &mut received.local);
            }
        }
        if !for_sessions.is_empty() {
            tracing::info!(
                messages = for_sessions.len(),
                "messages held for a dead node sent on to whoever adopts its sessions"
            );
        }
        let others: Vec<NodeId> = st.live.iter().copied().filter(|n| *n != self.me).collect();
        let route = ForwardRoute { sent_on: Some(dead), ..ForwardRoute::plain() };
        for message in &for_sessions {
            self.forward_held(st, storage, message.clone(), &others, &route);
        }
        for_sessions.extend(relayed);
        if !for_sessions.is_empty() {
            received.sent_on.push((dead, for_sessions));
        }
    }

    /// A message another node held for `dead` and sent on (see
    /// [`Cluster::send_on_held`]): for this node's own sessions if it is
    /// `dead` (taken for dead, wrongly); forwarded to `dead` if it is alive
    /// here (the sender took it for dead first, or wrongly: its sessions
    /// are still there); else for the sessions adopted here from it, if
    /// this node knew it.
    pub(super) fn sent_on_arrived(
        &self,
        st: &mut State,
        storage: &Storage,
        dead: NodeId,
        message: Arc<Message>,
        received: &mut Received,
    ) {
        if dead == self.me {
            received.local.push((message, ForwardRoute::plain()));
        } else if st.live.contains(&dead) {
            let route = ForwardRoute { sent_on: Some(dead), ..ForwardRoute::plain() };
            self.forward_held(st, storage, message, &[dead], &route);
            bump(&self.sessions.stats.sent_on_relayed, 1);
        } else if self.never_knew(st, dead) {
            bump(&self.sessions.stats.sent_on_unknown, 1);
        } else {
            match received.sent_on.last_mut() {
                Some((node, messages)) if *node == dead => messages.push(message),
                _ => received.sent_on.push((dead, vec![message])),
            }
        }
    }

    /// Whether `node` was never known here (or forgotten long ago, or
    /// before this node restarted) and is not about to be (no frames of it
    /// wait for its record): none of its sessions was adopted here, and
    /// none will be. (The adopted sessions' lock is a leaf.)
    fn never_knew(&self, st: &State, node: NodeId) -> bool {
        !st.peers.contains_key(&node)
            && !st.gone.contains_key(&node)
            && !self.sessions.adopted_from(node)
            && !st.strangers.held_peers().any(|peer| super::node_id(peer) == node)
    }

    /// Gives the core the membership view of the live set.
    fn apply_membership(&self, st: &mut State, storage: &Storage, local: &mut Vec<(Arc<Message>, ForwardRoute)>) {
        let current = st.node.membership().clone();
        let next = Arc::new(current.next(st.live.iter().copied()));
        tracing::info!(members = next.len(), version = next.version(), "membership changed");
        if next.members().iter().any(|m| !current.contains(*m)) {
            // A node that joined may now own directory keys it has no record of.
            self.sessions.membership_changed();
        }
        let mut actions = Vec::new();
        let _ = self.core_event(st, Event::Membership(next.clone()), &mut actions);
        self.execute(st, storage, actions, None, local);
        let now_ms = self.broker.upgrade().map_or(0, |b| b.now_ms());
        self.retained_membership_changed(st, &current, &next, now_ms);
    }

    /// Once a tick: the rejoin notices still due, frames of peers whose
    /// record never came, and the state of peers dead for long.
    pub(super) fn membership_tick(&self, st: &mut State) {
        let peers = &st.peers;
        let notice = wire::encode_rejoined();
        st.rejoin_notices.retain(|node, left| {
            if let Some(peer) = peers.get(node) {
                self.links.sender(*peer).send(Class::Control, links::copy_of(&notice));
            }
            *left -= 1;
            *left > 0
        });
        let now = Instant::now();
        for (peer, frames) in st.strangers.expire(now, self.dead_timeout) {
            let why = "no node record from this peer within the dead timeout";
            self.stats.rejected.reject(peer, "not_member", frames, &why);
        }
        for peer in st.prune(now, self.dead_timeout) {
            self.links.forget(&peer);
            self.stats.rejected.forget(&peer);
        }
        self.stats.rejected.sweep(now);
    }
}
