//! Telling the directory: the task that tells each client's owners
//! what its home did, copies deliveries to the standby, and repairs
//! records after a membership change.

use super::*;

impl Cluster {
    // ----- telling the directory -------------------------------------------

    /// The directory task: tells each client's directory owners what its
    /// home did (in order), copies deliveries to its standby, and after a
    /// membership change tells new owners and standbys what they lack.
    pub(in crate::cluster) async fn directory_task(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<Told>) {
        let mut known = Known::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                n = changes.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    let view = self.view();
                    for change in batch.drain(..) {
                        self.tell_change(&view, &mut known, change);
                    }
                }
                _ = tick.tick() => {
                    let view = self.view();
                    if view.version() != known.view {
                        known.view = view.version();
                        self.tell_again(&view, &mut known);
                    }
                }
            }
        }
    }

    fn tell_change(&self, view: &Membership, known: &mut Known, change: Told) {
        let (client, update, to_all) = match change {
            Told::Stored(Mirrored::Session(client, session)) => {
                known.entry(&client).session = Some(session.clone());
                (client, Update::Session(session), true)
            }
            Told::Stored(Mirrored::SessionRemoved(client)) => {
                if let Some(k) = known.clients.get_mut(&client) {
                    k.session = None;
                }
                (client, Update::SessionGone, true)
            }
            Told::TakenIn(client) => {
                let version = self.sessions.version_of(&client);
                if let Some(standby) = owners_of(view, self.replication, &client).into_iter().find(|o| *o != self.me) {
                    known.standbys.insert(client.clone(), standby);
                    self.send_copy(&client, version, standby, true);
                }
                return;
            }
            Told::HandedOver(client) => {
                known.clients.remove(&client);
                known.standbys.remove(&client);
                return;
            }
            Told::Stored(Mirrored::Delivery(client, seq, delivery)) => {
                (client, Update::Delivery { seq, delivery: *delivery }, false)
            }
            Told::Stored(Mirrored::DeliveryRemoved(client, seq)) => (client, Update::DeliveryDone { seq }, false),
            Told::Presence(client, presence) => {
                let update = match presence {
                    Presence::Connected { will } => Update::Presence { connected: true, will, pending_will: None },
                    Presence::Disconnected { pending_will } => {
                        Update::Presence { connected: false, will: None, pending_will }
                    }
                    Presence::Ended => Update::Ended,
                };
                match &update {
                    Update::Ended => {
                        known.clients.remove(&client);
                        known.standbys.remove(&client);
                    }
                    _ => known.entry(&client).presence = Some(update.clone()),
                }
                (client, update, true)
            }
        };
        let version = self.sessions.version_of(&client);
        if matches!(update, Update::Ended) {
            let mut homed = self.sessions.homed.lock();
            if homed.get(&client) == Some(&version) {
                homed.remove(&client);
            }
        }
        let owners = owners_of(view, self.replication, &client);
        match to_all {
            true => {
                for owner in &owners {
                    self.tell_owner(*owner, &client, version, update.clone());
                }
            }
            false => {
                let standby = owners.iter().copied().find(|o| *o != self.me);
                if let Some(standby) = standby {
                    if known.standbys.get(&client) != Some(&standby) {
                        known.standbys.insert(client.clone(), standby);
                        // A new standby gets the whole copy first.
                        self.send_copy(&client, version, standby, false);
                    } else {
                        self.tell_owner(standby, &client, version, update);
                    }
                }
            }
        }
    }

    /// After a membership change: each session's record to its owners
    /// (some may be new), its copy to a new standby.
    fn tell_again(&self, view: &Membership, known: &mut Known) {
        let clients: Vec<Arc<str>> = known.clients.keys().cloned().collect();
        for client in clients {
            let version = self.sessions.version_of(&client);
            let owners = owners_of(view, self.replication, &client);
            let entry = known.entry(&client).clone();
            for owner in &owners {
                if let Some(session) = &entry.session {
                    self.tell_owner(*owner, &client, version, Update::Session(session.clone()));
                }
                if let Some(presence) = &entry.presence {
                    self.tell_owner(*owner, &client, version, presence.clone());
                }
            }
            let standby = owners.iter().copied().find(|o| *o != self.me);
            match standby {
                Some(standby) if entry.session.is_some() && known.standbys.get(&client) != Some(&standby) => {
                    known.standbys.insert(client.clone(), standby);
                    self.send_copy(&client, version, standby, false);
                }
                _ => {}
            }
        }
    }

    /// Sends `standby` this home's whole copy of `client`'s deliveries
    /// (`whole`: the session was taken in here, other homes' copies go).
    fn send_copy(&self, client: &str, version: u64, standby: NodeId, whole: bool) {
        let Some(broker) = self.broker.upgrade() else { return };
        match broker.storage.deliveries(client) {
            Ok(deliveries) => {
                for (i, deliveries) in in_parts(deliveries, |(_, d)| &d.message).into_iter().enumerate() {
                    let (whole, more) = (whole && i == 0, i > 0);
                    self.tell_owner(standby, client, version, Update::Copy { deliveries, whole, more });
                }
            }
            Err(err) => tracing::error!(cause = %err, client, "cannot read a session's deliveries for its standby"),
        }
    }

    fn tell_owner(&self, owner: NodeId, client: &str, version: u64, update: Update) {
        if owner == self.me {
            if let Some(broker) = self.broker.upgrade() {
                self.sessions.directory.lock().apply(&broker.storage, client, self.me, version, update);
            }
            return;
        }
        self.send_session(owner, &SessionFrame::Directory { client: client.to_string(), version, update });
    }
}

/// What the directory task has told of the sessions homed here.
#[derive(Default)]
struct Known {
    clients: HashMap<Arc<str>, KnownSession>,
    standbys: HashMap<Arc<str>, NodeId>,
    view: u64,
}

#[derive(Default, Clone)]
struct KnownSession {
    presence: Option<Update>,
    session: Option<StoredSession>,
}

impl Known {
    fn entry(&mut self, client: &Arc<str>) -> &mut KnownSession {
        self.clients.entry(client.clone()).or_default()
    }
}
