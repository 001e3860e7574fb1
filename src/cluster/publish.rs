//! The publish path: a local publish routed through the core, and what
//! the core asks for carried out.
//!
//! Job: the broker's [`Fleet`] (subscription changes and publishes in, a
//! [`PublishRoute`] out), routing a publish from the memo or the core,
//! holding a publisher's later publishes behind one parked for a lookup
//! (per-publisher order), numbering QoS 1/2 forwards into the outbox, and
//! [`Cluster::execute`]: the core's actions for any event (frames and
//! forwards leave at once, local deliveries are handed back to the caller
//! to make once the state mutex is released). Boundary: the broker delivers
//! a decided publish itself; only deliveries the core makes later (a
//! lookup answered, a publisher released) go to
//! [`Broker::deliver`](crate::broker::Broker::deliver) from here.

use super::links::{self, Class};
use super::memo::{recipients, TopicRoute};
use super::metrics::bump;
use super::outbox;
use super::state::{RouteSettled, RouteWaiter, Routing, State};
use super::wire;
use super::Cluster;
use crate::broker::message::FleetId;
use crate::broker::message::Message;
use crate::broker::session::{Session, Subscription};
use crate::broker::{BoxFuture, Broker, ClaimGuard, Fleet, Presence, PublishRoute};
use crate::protocol::QoS;
use crate::storage::Storage;
use kadmq_dht::core::{Action, Event, ForwardRoute, NodeId, RouteTicket, SharedPick};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Fleet for Cluster {
    fn claim<'a>(&'a self, client_id: &'a str, clean_start: bool) -> BoxFuture<'a, ClaimGuard> {
        Box::pin(self.claim_session(client_id, clean_start))
    }

    fn presence(&self, client_id: &str, presence: Presence) {
        self.sessions.tell(client_id, presence);
    }

    fn message_id(&self) -> FleetId {
        (self.me.0, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn forwards_settled(&self, upto: u64) -> Option<BoxFuture<'static, ()>> {
        if self.forward_ack_window.is_zero() {
            self.unwritten.require(upto);
            return None;
        }
        Some(Box::pin(self.unwritten.settled(upto)?))
    }

    fn routes_settled(&self, filters: &[&str]) -> Option<BoxFuture<'static, ()>> {
        if self.subscribe_ack_timeout.is_zero() {
            return None;
        }
        let settled = {
            let mut st = self.state.lock();
            let mut tickets: Vec<RouteTicket> =
                filters.iter().filter_map(|f| st.node.ticket(f)).filter(|t| !st.node.settled(t)).collect();
            tickets.sort_unstable_by_key(|t| t.shard);
            tickets.dedup_by_key(|t| t.shard);
            if tickets.is_empty() {
                return None;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.route_waiters.push(RouteWaiter { tickets, tx: RouteSettled::new(tx) });
            rx
        };
        bump(&self.stats.subscribe_waits, 1);
        let timeout = self.subscribe_ack_timeout;
        let cluster = self.this.get().cloned();
        Some(Box::pin(async move {
            if tokio::time::timeout(timeout, settled).await.is_err() {
                // The routes keep being retried by the core; the SUBACK goes.
                if let Some(cluster) = cluster.and_then(|c| c.upgrade()) {
                    bump(&cluster.stats.subscribe_ack_timeouts, 1);
                }
            }
        }))
    }

    fn reroute_shared(&self, message: &Arc<Message>, group: &str, filter: &str) {
        let Some(broker) = self.broker.upgrade() else { return };
        let pick = SharedPick { group: group.to_string(), filter: filter.to_string() };
        let mut local = Vec::new();
        {
            let mut st = self.state.lock();
            self.route_again_for(&mut st, &broker.storage, message.clone(), vec![pick], &mut local);
        }
        deliver_all(&broker, local);
    }

    fn subscribed(&self, filter: &str, group: Option<&str>) {
        self.handle_local(Event::Subscribe { filter, group });
    }

    fn unsubscribed(&self, filter: &str, group: Option<&str>) {
        self.handle_local(Event::Unsubscribe { filter, group });
    }

    fn retained(&self, message: &Message) -> Option<BoxFuture<'static, ()>> {
        let broker = self.broker.upgrade()?;
        self.set_retained(&broker.storage, message, broker.now_ms(), self.subscribe_ack_timeout)
    }

    fn send_retained(&self, session: &Arc<Session>, filter: &str, subscription: &Subscription) {
        let Some(cluster) = self.this.get().and_then(|c| c.upgrade()) else { return };
        let Some(broker) = self.broker.upgrade() else { return };
        let (session, filter, subscription) = (session.clone(), filter.to_string(), subscription.clone());
        self.spawn(async move {
            let messages = cluster.clone().gather_retained(filter, broker.now_ms()).await;
            broker.queue_retained(&session, &subscription, messages);
        });
    }

    fn publish(&self, message: &Arc<Message>) -> PublishRoute {
        let Some(broker) = self.broker.upgrade() else { return PublishRoute::Decided { local: None, forwards: 0 } };
        let full = self.outbox_bytes.load(Ordering::Relaxed) >= self.outbox_max;
        // A publish that stays on this node needs no room in the outbox.
        if message.qos != QoS::AtMostOnce && full && !self.state.lock().node.stays_here(&message.topic, self.now()) {
            if self.stats.publishes_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max_mib = self.outbox_max >> 20,
                    "cluster outbox full: QoS 1/2 publishes are refused until other nodes acknowledge (counted in kadmq_cluster_publishes_refused_total; logged once)"
                );
            }
            return PublishRoute::Refused;
        }
        let none_held = self.publishers_held.load(Ordering::Acquire) == 0;
        if none_held {
            let routed = self.with_remembered_route(&message.topic, |route| {
                self.stats.topic_route_hits.add(1);
                self.publish_on(&broker.storage, message, route)
            });
            if let Some(routed) = routed {
                return routed;
            }
        }
        let id = self.publish_id(message);
        let mut local = Vec::new();
        let routed = {
            let mut st = self.state.lock();
            self.route(&mut st, &broker.storage, id, message.clone(), false, &mut local)
        };
        // This publish's own local part goes back to the broker when it is
        // decided; anything else (a publish released by this one) is
        // delivered here, now that the state mutex is released.
        let mut mine = None;
        for (delivered, route) in local {
            if routed.is_some() && mine.is_none() && Arc::ptr_eq(&delivered, message) {
                mine = Some(recipients(route));
            } else {
                broker.deliver(delivered, &recipients(route));
            }
        }
        match routed {
            Some(forwards) => PublishRoute::Decided { local: mine, forwards },
            None => PublishRoute::Pending,
        }
    }
}

impl Cluster {
    /// Publishes `message` along a remembered route: the core is not asked;
    /// a QoS 1/2 message is numbered and held in the outbox as in
    /// [`Cluster::execute`].
    fn publish_on(&self, storage: &Storage, message: &Arc<Message>, route: &TopicRoute) -> PublishRoute {
        if message.qos == QoS::AtMostOnce {
            // A QoS 0 forward's id is never looked at: no shared counter.
            for (_, sender, to) in &route.forwards {
                sender.send(Class::Droppable, |out| wire::write_forward(out, 0, None, message, to));
            }
        } else if !route.forwards.is_empty() {
            let id = self.publish_id(message);
            let now = self.now();
            let mut st = self.state.lock();
            let mut waiting = outbox::Waiting::with_capacity(route.forwards.len());
            for (node, sender, to) in &route.forwards {
                let sequence = st.outbox.assign(*node, id, now);
                waiting.push((*node, to.clone()));
                sender.send(Class::Resendable, |out| wire::write_forward(out, id, Some(sequence), message, to));
            }
            st.outbox.hold(storage, id, message.clone(), waiting, false);
        }
        self.stats.forwarded_out.add(route.forwards.len() as u64);
        PublishRoute::Decided { local: route.local.clone(), forwards: route.forwards.len() }
    }

    /// The id a local publish is routed and forwarded under: its fleet id's
    /// number (QoS 1/2), else the next one.
    fn publish_id(&self, message: &Message) -> u64 {
        match message.fleet_id {
            Some((_, id)) => id,
            None => self.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Queues for node `to` the frame `write` appends (see
    /// [`links::Sender::send`]); a node whose peer id is unknown is counted.
    /// Whether the frame was queued (not refused by the send budget, nor
    /// for a node without a link).
    pub(super) fn send_to(&self, st: &State, to: NodeId, class: Class, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        match st.peers.get(&to) {
            Some(peer) => self.links.sender(*peer).send(class, write),
            None => {
                bump(&self.stats.unroutable, 1);
                false
            }
        }
    }

    /// A subscribe or unsubscribe from a local session (the broker holds
    /// none of its locks: what it releases is delivered at once).
    fn handle_local(&self, event: Event<'_>) {
        let Some(broker) = self.broker.upgrade() else { return };
        let mut actions = Vec::new();
        let mut local = Vec::new();
        {
            let mut st = self.state.lock();
            if let Err(err) = self.core_event(&mut st, event, &mut actions) {
                // The broker validated the filter; what the core still refuses
                // passes the cluster's limits (topic levels): it stays local.
                // Client input, so one line, not one per subscription.
                if self.stats.local_refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(cause = %err, "routing core refused a local subscription (kept on this node only; further ones are counted, not logged)");
                }
            }
            self.execute(&mut st, &broker.storage, actions, None, &mut local);
        }
        deliver_all(&broker, local);
    }

    /// Routes local publish `id`. Returns the number of forwards once it is
    /// routed, `None` while a lookup is outstanding (a QoS 1/2 message is
    /// then persisted unrouted first). A publish of a publisher whose earlier
    /// publish waits for a lookup waits behind it: per-publisher order holds
    /// even when the later one needs no lookup.
    pub(super) fn route(
        &self,
        st: &mut State,
        storage: &Storage,
        id: u64,
        message: Arc<Message>,
        persisted: bool,
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
        let routed = self.route_now(st, storage, id, message, persisted, local);
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
        st.routing
            .insert(id, Routing { message: message.clone(), waiting: outbox::Waiting::new(), persisted, only: None });
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
            local.push((message, ForwardRoute::plain()));
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
    pub(super) fn execute(
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
        // Nodes a route frame to was lost to (told to the core at the end).
        let mut lost: Vec<NodeId> = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, frame } => {
                    if self.faults.cuts(to) {
                        lost.push(to);
                        continue;
                    }
                    let bytes = wire::encode_route(&frame);
                    if self.faults.delays(to, &bytes) {
                        continue;
                    }
                    if !self.send_to(st, to, Class::Control, links::copy_of(&bytes)) {
                        lost.push(to);
                    }
                }
                Action::Forward { to, msg, mut route } => {
                    let Some(pending) = st.routing.get_mut(&msg) else { continue };
                    if !keep_only(&mut route, pending.only.as_deref()) {
                        continue;
                    }
                    let sequence = (pending.message.qos != QoS::AtMostOnce).then(|| {
                        pending.waiting.push((to, route.clone()));
                        st.outbox.assign(to, msg, now)
                    });
                    let message = pending.message.clone();
                    self.stats.forwarded_out.add(1);
                    let class = if sequence.is_some() { Class::Resendable } else { Class::Droppable };
                    self.send_to(st, to, class, |out| wire::write_forward(out, msg, sequence, &message, &route));
                }
                Action::Deliver { msg, mut route } => {
                    let message = match forwarded {
                        Some(message) => Some(message.clone()),
                        None => match st.routing.get(&msg) {
                            Some(p) if keep_only(&mut route, p.only.as_deref()) => Some(p.message.clone()),
                            _ => None,
                        },
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
                            st.outbox.hold(storage, msg, pending.message, pending.waiting, pending.persisted);
                        } else if pending.persisted {
                            outbox::forget(storage, msg);
                        }
                    }
                    routed.push((msg, forwards));
                }
                Action::Split { prefix, .. } => {
                    // A few per fleet in its life: one line each is right.
                    tracing::info!(prefix = %prefix, "route shard split by the next topic level (cluster.split_entries)");
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
        lost.sort_unstable();
        lost.dedup();
        for to in lost {
            self.report_lost_frames(st, storage, to, local);
        }
        routed
    }

    /// Tells the core that route frames to `to` may be lost: it schedules
    /// a resync (the only action is its timer).
    pub(super) fn report_lost_frames(
        &self,
        st: &mut State,
        storage: &Storage,
        to: NodeId,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) {
        let mut actions = Vec::new();
        let _ = self.core_event(st, Event::FramesLost { to }, &mut actions);
        self.execute(st, storage, actions, None, local);
    }
}

/// Narrows `route` to the shared groups in `only` (when given, for a
/// message routed again for them); false when nothing is left to deliver.
fn keep_only(route: &mut ForwardRoute, only: Option<&[SharedPick]>) -> bool {
    if let Some(only) = only {
        route.plain = false;
        route.shared.retain(|pick| only.contains(pick));
    }
    !route.is_empty()
}

impl Cluster {
    /// Routes `message` again for one member of each of `groups` only (the
    /// node picked for them died holding it): a fresh publish id, through
    /// the core (a lookup if need be), the route not remembered.
    pub(super) fn route_again_for(
        &self,
        st: &mut State,
        storage: &Storage,
        message: Arc<Message>,
        groups: Vec<SharedPick>,
        local: &mut Vec<(Arc<Message>, ForwardRoute)>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let routing =
            Routing { message: message.clone(), waiting: outbox::Waiting::new(), persisted: false, only: Some(groups) };
        st.routing.insert(id, routing);
        let mut actions = Vec::new();
        if self.core_event(st, Event::Publish { topic: &message.topic, msg: id }, &mut actions).is_err() {
            st.routing.remove(&id);
            return;
        }
        self.execute(st, storage, actions, None, local);
    }
}

impl Cluster {
    /// Forwards `message` to each of `to` along `route`: numbered and held
    /// in the outbox as a publish is (written at the next flush, resent
    /// until acknowledged), under a fresh id.
    pub(super) fn forward_held(
        &self,
        st: &mut State,
        storage: &Storage,
        message: Arc<Message>,
        to: &[NodeId],
        route: &ForwardRoute,
    ) {
        if to.is_empty() {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let mut waiting = outbox::Waiting::with_capacity(to.len());
        for node in to {
            let sequence = st.outbox.assign(*node, id, now);
            waiting.push((*node, route.clone()));
            self.send_to(st, *node, Class::Resendable, |out| {
                wire::write_forward(out, id, Some(sequence), &message, route)
            });
        }
        st.outbox.hold(storage, id, message, waiting, false);
        self.stats.forwarded_out.add(to.len() as u64);
    }
}

/// Hands deliveries the core decided to the broker (no state mutex held).
pub(super) fn deliver_all(broker: &Broker, local: Vec<(Arc<Message>, ForwardRoute)>) {
    for (message, route) in local {
        broker.deliver(message, &recipients(route));
    }
}
