//! The receive path: what other nodes send, decoded and applied.
//!
//! Job: take a batch of driver events (frames, membership changes), apply
//! each frame of a member (route frames to the core, forwards through the
//! inbound filter to local delivery, acknowledgements to the outbox,
//! retained copies to the broker), hold or refuse the frames of peers that
//! are not members, and hand what is left to do once the state mutex is
//! released to the delivery stage ([`Cluster::deliver_received`], run by
//! the cluster task right after): local deliveries, then acknowledgements. Boundary: membership events go to
//! `membership.rs`; deliveries reach the broker through
//! [`Broker::deliver`](crate::broker::Broker::deliver) only, in the delivery
//! stage.

use super::dedupe::Verdict;
use super::directory::Record;
use super::links::{self, Class};
use super::memo::recipients;
use super::metrics::bump;
use super::state::State;
use super::wire::{self, Forward, Wire};
use super::Cluster;
use crate::broker::message::Message;
use crate::broker::Broker;
use crate::storage::Storage;
use kadmq_dht::core::{self, Event, ForwardRoute, NodeId};
use kadmq_dht::driver::{self, PeerId};
use parking_lot::MutexGuard;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// What a batch of driver events left to do once the state is released.
#[derive(Default)]
pub(super) struct Received {
    pub local: Vec<(Arc<Message>, ForwardRoute)>,
    /// Per sending peer, the acknowledgement to send: (epoch, upto).
    pub acks: HashMap<PeerId, (u64, u64)>,
    /// Nodes declared dead, and the sessions of theirs this node now acts for.
    pub dead_nodes: Vec<NodeId>,
    pub dead_sessions: Vec<(Arc<str>, Record)>,
    /// Messages held for a node declared dead, for its adopted sessions.
    pub sent_on: Vec<(NodeId, Vec<Arc<Message>>)>,
}

impl Received {
    /// Nothing to deliver, acknowledge or adopt.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.acks.is_empty() && self.dead_nodes.is_empty() && self.sent_on.is_empty()
    }
}

/// A batch of driver events being handled: the state mutex, taken at the
/// first event that needs it and kept to the end of the batch, and what
/// the batch leaves to do.
pub(super) struct Batch<'a> {
    cluster: &'a Cluster,
    guard: Option<MutexGuard<'a, State>>,
    pub storage: &'a Storage,
    pub received: Received,
}

impl<'a> Batch<'a> {
    /// The state, locked from now to the end of the batch.
    pub fn state(&mut self) -> &mut State {
        self.parts().0
    }

    /// The state (locked as by [`Batch::state`]) and what is left to do.
    pub fn parts(&mut self) -> (&mut State, &mut Received) {
        let cluster = self.cluster;
        (self.guard.get_or_insert_with(|| cluster.state.lock()), &mut self.received)
    }
}

impl Cluster {
    /// Driver events, in order. Plain QoS 0 forwards (the bulk under load)
    /// never need the state mutex.
    pub(super) fn on_events(&self, events: impl Iterator<Item = driver::Event>) -> Received {
        let Some(broker) = self.broker.upgrade() else { return Received::default() };
        let mut batch = Batch { cluster: self, guard: None, storage: &broker.storage, received: Received::default() };
        for event in events {
            match event {
                driver::Event::Frame { from, bytes, held } => {
                    if self.members.read().contains(&from) {
                        self.on_frame(&mut batch, from, bytes);
                        // Dealt with: its receive budget goes back to the readers.
                        drop(held);
                    } else {
                        self.stranger_frame(batch.state(), from, bytes);
                    }
                }
                driver::Event::MemberRefused { peer, reason } => self.member_refused(&mut batch, peer, &reason),
                driver::Event::MemberUp(member) => self.member_up(&mut batch, member),
                driver::Event::MemberSuspect(peer) => tracing::info!(%peer, "member suspect"),
                driver::Event::MemberDead(peer) => self.member_dead(&mut batch, peer),
                driver::Event::FramesLost { peer } => self.frames_lost(&mut batch, peer),
            }
        }
        batch.received
    }

    /// Route frames to a member may be lost (its link broke): the core
    /// brings it up to date shortly.
    fn frames_lost(&self, batch: &mut Batch<'_>, peer: PeerId) {
        if !self.members.read().contains(&peer) {
            return;
        }
        let storage = batch.storage;
        let (st, Received { local, .. }) = batch.parts();
        let to = st.id_of(peer);
        self.report_lost_frames(st, storage, to, local);
    }

    /// The delivery stage: delivers to the local sessions, then
    /// acknowledges QoS 1/2 forwards (what is acknowledged is queued for its
    /// sessions and on disk).
    pub(super) fn deliver_received(&self, received: Received) {
        let Some(broker) = self.broker.upgrade() else { return };
        let stored = self.deliver_once(&broker, received.local);
        if !received.dead_nodes.is_empty() {
            self.adopt(&broker, &received.dead_nodes, received.dead_sessions);
        }
        for (dead, messages) in received.sent_on {
            self.deliver_sent_on(&broker, dead, messages);
        }
        if !stored {
            // A QoS 2 delivery was not stored: nothing of this batch is
            // acknowledged; the senders resend, and it is delivered then.
            return;
        }
        if !received.acks.is_empty() {
            // What we acknowledge must survive a crash of this node,
            // including what we sent on (held in our outbox).
            self.unwritten.require_all();
            if let Err(err) = broker.storage.flush() {
                tracing::error!(cause = %err, "storage flush failed; forwards not acknowledged");
                return;
            }
            for (peer, (epoch, upto)) in received.acks {
                if self.faults.mutes(|| super::node_id(&peer)) {
                    continue;
                }
                let ack = wire::encode_ack(epoch, upto);
                self.links.sender(peer).send(Class::Control, links::copy_of(&ack));
            }
        }
    }

    /// Delivers what arrived; a QoS 2 message of another node only if it
    /// was not delivered here before (a resend after a restart of either
    /// node), its record written in the same batch as its deliveries.
    /// Returns false if such a batch could not be stored.
    fn deliver_once(&self, broker: &Broker, local: Vec<(Arc<Message>, ForwardRoute)>) -> bool {
        let now = broker.now_ms();
        let mut stored = true;
        for (message, route) in local {
            let qos2 = message.qos == crate::protocol::QoS::ExactlyOnce;
            let Some(id) = message.fleet_id.filter(|(origin, _)| qos2 && *origin != self.me.0) else {
                broker.deliver(message, &recipients(route));
                continue;
            };
            if !self.qos2_seen.lock().insert(id, now) {
                bump(&self.stats.qos2_duplicates, 1);
                continue;
            }
            let record = broker.storage.seen_write(id.0, id.1, now);
            if let Err(err) = broker.storage.in_batch(vec![record], || broker.deliver(message, &recipients(route))) {
                self.qos2_seen.lock().remove(id);
                stored = false;
                tracing::error!(cause = %err, "could not store a QoS 2 delivery; it is not acknowledged");
            }
        }
        stored
    }

    /// One frame (a batch, usually) of a member, decoded and carried out.
    pub(super) fn on_frame(&self, batch: &mut Batch<'_>, from: PeerId, bytes: bytes::Bytes) {
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
                    batch.received.local.push((Arc::new(message), route));
                }
                Ok(wire) => self.on_wire(batch, from, wire),
                Err(err) => self.bad_frame(from, &err),
            }
        }
    }

    /// A frame of a peer that is not a member: held until its record
    /// arrives, unless it is dead, refused, or holds too much already.
    fn stranger_frame(&self, st: &mut State, from: PeerId, bytes: bytes::Bytes) {
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
    fn on_wire(&self, batch: &mut Batch<'_>, from: PeerId, wire: Wire) {
        let storage = batch.storage;
        let (st, received) = batch.parts();
        let Received { local, acks, .. } = received;
        let sender = st.id_of(from);
        let mut actions = Vec::new();
        match wire {
            Wire::Route(_) | Wire::Retained(_) if self.faults.cuts(sender) => {}
            Wire::Forward(forward) if forward.sequence.is_some() && self.faults.drops_forwards(sender) => {}
            Wire::Route(frame) => {
                let result = self.core_event(st, Event::Frame { from: sender, frame }, &mut actions);
                self.core_refusal(from, result);
                self.execute(st, storage, actions, None, local);
            }
            Wire::Forward(forward) => 'forward: {
                let Forward { id, sequence, message, route } = *forward;
                if let Some(sequence) = sequence {
                    let verdict = st.inbound.accept(sender, sequence);
                    let ack = st.inbound.ack_for(sender);
                    match verdict {
                        Verdict::Deliver => {}
                        Verdict::Duplicate => bump(&self.stats.duplicates, 1),
                        Verdict::Gap => bump(&self.stats.out_of_order, 1),
                    }
                    if let Some(ack) = ack {
                        acks.insert(from, ack);
                    }
                    if verdict != Verdict::Deliver {
                        break 'forward;
                    }
                }
                self.stats.forwarded_in.add(1);
                let mut message = message;
                // A copy sent on came with the fleet id it was first
                // delivered under; any other is known by its sender's.
                if message.qos != crate::protocol::QoS::AtMostOnce && route.sent_on.is_none() {
                    message.fleet_id = Some((sender.0, id));
                }
                let message = Arc::new(message);
                if let Some(dead) = route.sent_on {
                    self.sent_on_arrived(st, storage, dead, message, received);
                    break 'forward;
                }
                if route.shared.is_empty() {
                    // Nothing for the core to pick: as for QoS 0, the broker
                    // matches the topic against its sessions.
                    local.push((message, route));
                    break 'forward;
                }
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
            Wire::Session(frame) => {
                if let Some(broker) = self.broker.upgrade() {
                    self.on_session_frame(st, &broker, sender, *frame);
                }
            }
            Wire::Retained(frame) => self.on_retain_frame(st, storage, sender, *frame),
        }
    }
}
