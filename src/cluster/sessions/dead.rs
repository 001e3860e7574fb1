//! A node declared dead: its clients' sessions adopted (from the copy
//! this node keeps as their standby) or their wills published, and what
//! other nodes held for it given to the sessions adopted here.

use super::*;

impl Cluster {
    // ----- a node declared dead --------------------------------------------

    /// The records of `dead`'s clients this node now acts for (it is their
    /// primary owner in the view without `dead`).
    pub(in crate::cluster) fn sessions_of_dead(
        &self,
        st: &crate::cluster::state::State,
        dead: NodeId,
    ) -> Vec<(Arc<str>, Record)> {
        let view = st.node.membership();
        let mut records = self.sessions.directory.lock().homed_at(dead);
        records.retain(|(client, _)| owners_of(view, self.replication, client).first() == Some(&self.me));
        records
    }

    /// Takes in the sessions of dead nodes `dead_nodes` this node acts for:
    /// persistent ones are adopted (from the copy, if this node is their
    /// standby; the will due after its delay), the wills of the others
    /// published now; then what was sent on for those nodes goes to them.
    pub(in crate::cluster) fn adopt(
        &self,
        broker: &Broker,
        dead_nodes: &[NodeId],
        dead_sessions: Vec<(Arc<str>, Record)>,
    ) {
        let any = !dead_sessions.is_empty();
        let adopted_before = self.sessions.stats.adopted.load(Ordering::Relaxed);
        let wills_before = self.sessions.stats.wills_of_dead.load(Ordering::Relaxed);
        for (client, record) in dead_sessions {
            let dead = NodeId(record.home);
            // Claimed elsewhere since the record was read (the client
            // reconnected): not this node's to adopt any more.
            let current = self.sessions.directory.lock().get(&client).map(|r| (r.home, r.version));
            if current != Some((record.home, record.version)) {
                continue;
            }
            let (version, _) = self.sessions.directory.lock().claim(&broker.storage, &client, self.me, false);
            self.sessions.homed.lock().insert(client.clone(), version);
            match self.take_copy(broker, &client, &record) {
                Some(moved) => {
                    tracing::debug!(%client, "session of a dead node adopted");
                    self.take_in(broker, &client, moved);
                    self.note_adopted(None, dead, client.clone());
                    bump(&self.sessions.stats.adopted);
                    self.tell_offline(&client);
                }
                None => {
                    let will = match (record.connected, record.will, record.pending_will) {
                        (true, Some((will, _)), _) => Some(will),
                        (false, _, Some((_, will))) => Some(will),
                        _ => None,
                    };
                    if let Some(will) = will {
                        tracing::debug!(%client, "will of a dead node's client published");
                        bump(&self.sessions.stats.wills_of_dead);
                        broker.publish_will(will);
                    }
                    self.sessions.tell(&client, Presence::Ended);
                }
            }
        }
        let (adopted, wills) = (adopted_before, wills_before);
        let adopted = self.sessions.stats.adopted.load(Ordering::Relaxed) - adopted;
        let wills = self.sessions.stats.wills_of_dead.load(Ordering::Relaxed) - wills;
        if any {
            // One line per batch of deaths, not one per client.
            tracing::info!(
                nodes = dead_nodes.len(),
                adopted,
                wills,
                "sessions of dead nodes adopted, wills of their clients published"
            );
        }
        // What others held for those nodes and sent on before this node
        // had declared them dead.
        for dead in dead_nodes.iter().copied() {
            self.sessions.adopted.lock().entry(dead).or_insert_with(|| (Instant::now(), Vec::new(), false)).2 = true;
            let waiting = self.sessions.sent_on_waiting.lock().remove(&dead);
            if let Some((_, messages)) = waiting {
                self.deliver_sent_on(broker, dead, messages);
            }
        }
    }

    /// Notes that `client`'s session came here from dead node `dead`'s
    /// keeping; messages sent on for `dead` that waited are given out now
    /// (outside `adopt`, which does so once for all it adopted).
    pub(in crate::cluster) fn note_adopted(&self, broker: Option<&Broker>, dead: NodeId, client: Arc<str>) {
        let entry = (Instant::now(), Vec::new(), false);
        self.sessions.adopted.lock().entry(dead).or_insert(entry).1.push(client.clone());
        if let Some(broker) = broker {
            // For this session only: the rest wait for `adopt`.
            let waiting = self.sessions.sent_on_waiting.lock().get(&dead).map(|(_, m)| m.clone());
            for message in waiting.unwrap_or_default() {
                broker.deliver_to_sessions(&message, std::slice::from_ref(&client));
            }
        }
    }

    /// Messages another node (or this one) held for `dead`, for the sessions
    /// this node adopted from it (matched against their subscriptions; a
    /// copy a session already holds is skipped). Kept for later, bounded,
    /// while `dead` is not dead here yet.
    pub(in crate::cluster) fn deliver_sent_on(&self, broker: &Broker, dead: NodeId, messages: Vec<Arc<Message>>) {
        let (clients, adopt_ran) = {
            let mut adopted = self.sessions.adopted.lock();
            adopted.retain(|_, (since, ..)| since.elapsed() < ADOPTED_KEPT);
            adopted.get(&dead).map(|(_, clients, ran)| (clients.clone(), *ran)).unwrap_or_default()
        };
        let dead_here = !self.is_live(dead);
        if dead_here && !clients.is_empty() {
            let queued: usize = messages.iter().map(|m| broker.deliver_to_sessions(m, &clients)).sum();
            self.sessions.stats.sent_on_delivered.fetch_add(queued as u64, Ordering::Relaxed);
        }
        // Not dead here yet, or `adopt` has not run for it yet (the cluster
        // task runs ahead of this stage): kept for `adopt`, a while.
        if !(dead_here && adopt_ran) {
            let mut waiting = self.sessions.sent_on_waiting.lock();
            let mut dropped = 0;
            waiting.retain(|_, (since, held)| {
                let keep = since.elapsed() < SENT_ON_KEPT;
                dropped += if keep { 0 } else { held.len() };
                keep
            });
            let (since, held) = waiting.entry(dead).or_insert_with(|| (Instant::now(), Vec::new()));
            *since = Instant::now();
            let room = SENT_ON_WAITING.saturating_sub(held.len());
            dropped += messages.len().saturating_sub(room);
            held.extend(messages.into_iter().take(room));
            drop(waiting);
            if dropped > 0 && self.sessions.stats.sent_on_dropped.fetch_add(dropped as u64, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    dropped,
                    "messages held for a dead node could not wait for this node to adopt its sessions (counted in kadmq_cluster_sent_on_dropped_total; logged once)"
                );
            }
        }
    }
}
