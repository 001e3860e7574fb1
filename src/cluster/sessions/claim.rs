//! Claims and hand-overs: a client connects here and its session comes
//! here; another node claims a session held here and it goes there.

use super::*;

impl Cluster {
    // ----- claiming: a client connects here --------------------------------

    /// [`crate::broker::Fleet::claim`]: see the module docs.
    pub(in crate::cluster) async fn claim_session(&self, client_id: &str, clean_start: bool) -> ClaimGuard {
        let Some(this) = self.this() else { return Box::new(()) };
        let client: Arc<str> = client_id.into();
        this.sessions.claiming.lock().insert(client.clone(), 0);
        let guard = Claiming { cluster: this.clone(), client: client.clone() };
        let Some(broker) = self.broker.upgrade() else { return Box::new(guard) };
        let Some((version, previous)) = self.claim_at_owners(&broker, client_id, clean_start).await else {
            bump(&self.sessions.stats.claims_unanswered);
            return Box::new(guard);
        };
        self.sessions.homed.lock().insert(client.clone(), version);
        self.sessions.claiming.lock().insert(client.clone(), version);
        tracing::debug!(client_id, version, previous = ?previous.as_ref().map(|r| (r.home, r.version)), "session claimed");
        let Some(previous) = previous else { return Box::new(guard) };
        let home = NodeId(previous.home);
        if home == self.me {
            return Box::new(guard);
        }
        // The holder: the home, or when it is dead the node that adopted
        // its sessions (the client key's primary owner now).
        let source = if self.is_live(home) {
            home
        } else {
            match owners_of(&self.view(), self.replication, client_id).first() {
                Some(node) => *node,
                None => return Box::new(guard),
            }
        };
        if source == self.me {
            // This node keeps the dead home's copy: adopt it, unless the
            // session is to be discarded.
            let will_out = self.publish_lost_will(&broker, &previous, clean_start);
            match clean_start {
                true => self.sessions.directory.lock().forget(&broker.storage, client_id),
                false => {
                    if let Some(mut moved) = self.take_copy(&broker, client_id, &previous) {
                        if will_out {
                            moved.pending_will = None;
                        }
                        self.take_in(&broker, client_id, moved);
                        self.note_adopted(Some(&broker), home, client);
                    }
                }
            }
            return Box::new(guard);
        }
        if !clean_start {
            if let Some(record) = previous.session.clone() {
                self.send_session(source, &SessionFrame::Moving { client: client_id.to_string() });
                broker.prepare_arrival(client_id, record);
                tokio::time::sleep(ROUTE_SETTLE).await;
            }
        }
        let mut pulled = self.pull(source, client_id, version, clean_start).await;
        tracing::debug!(client_id, source = source.0, answered = pulled.is_some(), "session pulled");
        if pulled.is_none() {
            // The holder does not answer (dying, or paused): its standby
            // keeps a copy of the session; the connection it had is lost.
            bump(&self.sessions.stats.handovers_unanswered);
            let will_out = self.publish_lost_will(&broker, &previous, clean_start);
            let standby = owners_of(&self.view(), self.replication, client_id).into_iter().find(|o| *o != source);
            pulled = match standby {
                Some(standby) if standby == self.me => {
                    Some((!clean_start).then(|| self.take_copy(&broker, client_id, &previous)).flatten())
                }
                Some(standby) => self.pull(standby, client_id, version, clean_start).await,
                None => None,
            };
            if let Some(Some(moved)) = pulled.as_mut().filter(|_| will_out) {
                moved.pending_will = None;
            }
        }
        if let Some(Some(moved)) = pulled {
            tracing::debug!(client_id, deliveries = moved.deliveries.len(), "session taken in");
            self.take_in(&broker, client_id, moved);
        }
        if source != home || !self.is_live(home) {
            // Taken from a dead home's standby: what others held for that
            // home comes here, as for a session adopted.
            self.note_adopted(Some(&broker), home, client);
        }
        Box::new(guard)
    }

    /// The home of `previous` is dead (or does not answer) with a client
    /// connected: its will is published now, as one node does for a lost
    /// connection, when nothing would wait for it (no delay, a session that
    /// ends with the connection, or a clean start discarding it). Returns
    /// whether it was.
    fn publish_lost_will(&self, broker: &Broker, previous: &Record, clean_start: bool) -> bool {
        let Some((will, delay)) = previous.will.clone().filter(|_| previous.connected) else { return false };
        if !(clean_start || previous.session.is_none() || delay == 0) {
            return false;
        }
        bump(&self.sessions.stats.wills_of_dead);
        broker.publish_will(will);
        true
    }

    /// Claims `client_id` at its first directory owner that answers (this
    /// node itself, when it is one in turn). An owner whose view of the
    /// fleet changed just now defers (its records may not be repaired yet):
    /// the next one is asked, and if all defer, all again a moment later.
    /// `None` if none answers.
    async fn claim_at_owners(
        &self,
        broker: &Broker,
        client_id: &str,
        clean_start: bool,
    ) -> Option<(u64, Option<Record>)> {
        let deadline = Instant::now() + CLAIM_SETTLE * 2;
        loop {
            let mut deferred = false;
            let view = self.view();
            for owner in owners_of(&view, self.replication, client_id) {
                if owner == self.me {
                    // Alone, there is nobody to learn records from.
                    if self.sessions.settled() || view.len() == 1 {
                        let mut directory = self.sessions.directory.lock();
                        return Some(directory.claim(&broker.storage, client_id, self.me, clean_start));
                    }
                    deferred = true;
                    continue;
                }
                let client = client_id.to_string();
                let (req, mut answers) = self.ask(owner, |req| SessionFrame::Claim { req, client, clean_start });
                let answer = tokio::time::timeout(CLAIM_WAIT, answers.recv()).await;
                self.forget_request(req);
                match answer {
                    Ok(Some(SessionFrame::Claimed { version, previous, .. })) => return Some((version, previous)),
                    Ok(Some(SessionFrame::ClaimDeferred { .. })) => deferred = true,
                    _ => {}
                }
            }
            if !deferred || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Asks `source` for `client_id`'s session. `Some(None)`: nothing to
    /// take (none there, discarded, or a newer claim is under way);
    /// `None`: no answer in time.
    async fn pull(
        &self,
        source: NodeId,
        client_id: &str,
        version: u64,
        clean_start: bool,
    ) -> Option<Option<MovedSession>> {
        let client = client_id.to_string();
        let (req, mut answers) = self.ask(source, |req| SessionFrame::TakeOver { req, client, version, clean_start });
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        let mut moved: Option<MovedSession> = None;
        let result = loop {
            // A holder declared dead meanwhile will not answer: stop waiting.
            let slice = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            let frame = match tokio::time::timeout_at(slice, answers.recv()).await {
                Ok(frame) => frame,
                Err(_) if tokio::time::Instant::now() < deadline && self.is_live(source) => continue,
                Err(_) => None,
            };
            let Some(SessionFrame::Handover { part, last, .. }) = frame else {
                break None;
            };
            match part {
                Part::Session(session) => moved = Some(session),
                Part::More(more) => {
                    if let Some(moved) = &mut moved {
                        moved.deliveries.extend(more);
                    }
                }
                Part::Nothing | Part::Superseded => {}
            }
            if last {
                break Some(moved.take());
            }
        };
        self.forget_request(req);
        result
    }

    /// The copy this node keeps of a dead home's session (its standby),
    /// taken out of the directory's keeping: the record, its deliveries in
    /// order, and the will due after its delay if a client was connected.
    pub(in crate::cluster) fn take_copy(
        &self,
        broker: &Broker,
        client_id: &str,
        record: &Record,
    ) -> Option<MovedSession> {
        let now = broker.now_ms();
        let mut session = record.session.clone()?;
        let ended = session.disconnected_at_ms.is_some_and(|at| {
            session.expiry_interval != u32::MAX && at.saturating_add(session.expiry_interval as u64 * 1000) <= now
        });
        if ended {
            return None;
        }
        let pending_will = match (&record.will, record.connected) {
            (Some((will, delay)), true) => {
                Some((now.saturating_add(u64::from((*delay).min(session.expiry_interval)) * 1000), will.clone()))
            }
            _ => record.pending_will.clone(),
        };
        if record.connected || session.disconnected_at_ms.is_none() {
            session.disconnected_at_ms = Some(now);
        }
        tracing::debug!(client_id, "session copy taken");
        let mut deliveries = match broker.storage.replicas(client_id) {
            Ok(copies) => copies,
            Err(err) => {
                tracing::error!(cause = %err, client_id, "cannot read a session's copy; it resumes without its messages");
                Vec::new()
            }
        };
        // The copies of two homes (a move under way) may name one message twice.
        let mut kept = std::collections::HashSet::new();
        deliveries.retain(|d| d.message.fleet_id.is_none_or(|id| kept.insert(id)));
        if let Err(err) = broker.storage.replace_replicas(client_id, None, &[]) {
            tracing::error!(cause = %err, client_id, "cannot drop a session's copy");
        }
        Some(MovedSession { session, deliveries, pending_will, seen: Vec::new() })
    }

    // ----- handing over: another node claimed a session held here ---------

    /// A `TakeOver` from `to`: waits for a claim of the same id under way
    /// here to finish (or answers `Superseded` when it is the newer one),
    /// then hands the session over in parts.
    pub(in crate::cluster) async fn hand_over(
        self: Arc<Self>,
        to: NodeId,
        req: u64,
        client: String,
        version: u64,
        clean_start: bool,
    ) {
        let Some(broker) = self.broker.upgrade() else { return };
        // Within what the claimer waits (HANDOVER_WAIT): this, then up to
        // 5 s for the old connection to close.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let under_way = self.sessions.claiming.lock().get(client.as_str()).copied();
            match under_way {
                Some(mine) if mine > version => {
                    let frame = SessionFrame::Handover { req, part: Part::Superseded, last: true };
                    return self.send_session(to, &frame);
                }
                Some(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        let mut moved = broker.export_session(&client, clean_start).await;
        if moved.is_none() {
            // No session here: the copy this node keeps as the session's
            // standby, if any (its home is dead or does not answer), goes
            // to the claim that asks (the newest: the directory ordered it).
            let record = self.sessions.directory.lock().get(&client).cloned();
            if let Some(record) = record.filter(|r| r.version <= version) {
                match clean_start {
                    true => self.sessions.directory.lock().forget(&broker.storage, &client),
                    false => moved = self.take_copy(&broker, &client, &record),
                }
            }
        }
        {
            let mut homed = self.sessions.homed.lock();
            if homed.get(client.as_str()).is_some_and(|mine| *mine <= version) {
                homed.remove(client.as_str());
            }
        }
        // This node's own record (it may be an owner) names the claimer now,
        // even at the version it claimed itself (an adopter's local claim
        // and a claim another owner ordered can share a number).
        self.sessions.directory.lock().rehome(&broker.storage, &client, to, version);
        if moved.is_some() {
            bump(&self.sessions.stats.moved_out);
            let _ = self.sessions.told.send(Told::HandedOver(client.as_str().into()));
        }
        self.send_handover(to, req, moved);
    }

    fn send_handover(&self, to: NodeId, req: u64, moved: Option<MovedSession>) {
        let Some(mut moved) = moved else {
            return self.send_session(to, &SessionFrame::Handover { req, part: Part::Nothing, last: true });
        };
        let parts = in_parts(std::mem::take(&mut moved.deliveries), |d| &d.message);
        let count = parts.len();
        for (i, deliveries) in parts.into_iter().enumerate() {
            let part = match i {
                0 => Part::Session(MovedSession { deliveries, ..moved.clone() }),
                _ => Part::More(deliveries),
            };
            self.send_session(to, &SessionFrame::Handover { req, part, last: i + 1 == count });
        }
    }

    /// Takes `moved` in as `client_id`'s session here; its standby gets
    /// this node's whole copy (the one it kept of the previous home goes).
    pub(in crate::cluster) fn take_in(&self, broker: &Broker, client_id: &str, moved: MovedSession) {
        broker.absorb(client_id, moved);
        bump(&self.sessions.stats.moved_in);
        let _ = self.sessions.told.send(Told::TakenIn(client_id.into()));
    }
}
