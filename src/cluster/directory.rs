//! The session directory, owner side: what this node keeps of the
//! sessions whose key (`"client:" + client id`) it owns.
//!
//! Job: one [`Record`] per client (its home node, the version of the claim
//! that made it home, whether a client is connected, its will, a will
//! waiting for its delay, and a persistent session's subscriptions and
//! expiry), persisted in the data directory; claims answered (the primary
//! owner orders the CONNECTs of one client id fleet-wide); updates from a
//! session's home applied unless a newer claim superseded them; and, as the
//! session's standby, the copy of its deliveries. Boundary: no sends and no
//! broker calls; `sessions.rs` acts on what this says.

use super::sessions::Update;
use crate::broker::message::Message;
use crate::storage::{Storage, StoredSession};
use kadmq_dht::core::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// What the directory keeps of one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The node that holds the session (a `NodeId`).
    pub home: u64,
    /// The claim that made `home` the home; updates of older claims are stale.
    pub version: u64,
    /// A client is connected at `home`.
    pub connected: bool,
    /// The connected client's will and Will Delay Interval (s).
    pub will: Option<(Message, u32)>,
    /// A will waiting for its delay after the client went away (Unix ms when due).
    pub pending_will: Option<(u64, Message)>,
    /// A persistent session's record (subscriptions, expiry).
    pub session: Option<StoredSession>,
}

impl Record {
    fn new(home: NodeId, version: u64) -> Record {
        Record { home: home.0, version, connected: false, will: None, pending_will: None, session: None }
    }
}

#[derive(Default)]
pub struct Directory {
    records: HashMap<Arc<str>, Record>,
}

impl Directory {
    /// The records kept in `storage` (undecodable ones are dropped, logged).
    pub fn load(storage: &Storage) -> Directory {
        let mut directory = Directory::default();
        let rows = match storage.directory() {
            Ok(rows) => rows,
            Err(err) => {
                tracing::error!(cause = %err, "cannot read the session directory; starting without it");
                return directory;
            }
        };
        for (client, bytes) in rows {
            match rmp_serde::from_slice::<Record>(&bytes) {
                Ok(record) => {
                    directory.records.insert(client.into(), record);
                }
                Err(err) => tracing::warn!(%client, cause = %err, "undecodable session directory record dropped"),
            }
        }
        directory
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, client_id: &str) -> Option<&Record> {
        self.records.get(client_id)
    }

    /// `claimer` claims `client_id` (this node is its primary owner): the
    /// record now names it home under a new version. Returns that version
    /// and the record as it was.
    pub fn claim(
        &mut self,
        storage: &Storage,
        client_id: &str,
        claimer: NodeId,
        clean_start: bool,
    ) -> (u64, Option<Record>) {
        let previous = self.records.get(client_id).cloned();
        let version = previous.as_ref().map_or(0, |r| r.version).saturating_add(1);
        let mut record = Record::new(claimer, version);
        // Until the new home says more, what it takes over is what was
        // (nothing, for a clean start: the session is discarded).
        if let Some(previous) = previous.as_ref().filter(|_| !clean_start) {
            record.session = previous.session.clone();
        }
        record.connected = true;
        self.put(storage, client_id, record);
        (version, previous)
    }

    /// An update from `home` for `client_id` under claim `version`. Returns
    /// false when a newer claim made it stale (nothing changed).
    pub fn apply(&mut self, storage: &Storage, client_id: &str, home: NodeId, version: u64, update: Update) -> bool {
        // Older claims are stale; so is another home under the same version
        // (two owners ordered claims while the primary changed).
        let stale = |r: &Record| r.version > version || (r.version == version && r.home != home.0);
        if self.records.get(client_id).is_some_and(stale) {
            tracing::debug!(client_id, home = home.0, version, "stale session directory update ignored");
            return false;
        }
        // What only removes makes no record where there is none.
        let removes = matches!(update, Update::SessionGone | Update::Ended | Update::DeliveryDone { .. });
        if removes && !self.records.contains_key(client_id) {
            return false;
        }
        tracing::debug!(client_id, home = home.0, version, update = update.name(), "session directory update");
        let mut record = self.records.get(client_id).cloned().unwrap_or_else(|| Record::new(home, version));
        record.home = home.0;
        record.version = version;
        let result = match update {
            Update::Presence { connected, will, pending_will } => {
                record.connected = connected;
                record.will = will;
                record.pending_will = pending_will;
                Ok(())
            }
            Update::Session(session) => {
                record.session = Some(session);
                Ok(())
            }
            Update::SessionGone => {
                record.session = None;
                storage.replace_replicas(client_id, Some(home.0), &[])
            }
            Update::Delivery { seq, delivery } => storage.put_replica(client_id, home.0, seq, &delivery),
            Update::DeliveryDone { seq } => storage.remove_replica(client_id, home.0, seq),
            Update::Copy { deliveries, more: true, .. } => {
                deliveries.iter().try_for_each(|(seq, delivery)| storage.put_replica(client_id, home.0, *seq, delivery))
            }
            Update::Copy { deliveries, whole, more: false } => {
                // A home that took the session in whole: the copies other
                // homes left are void.
                let wiped = if whole { storage.replace_replicas(client_id, None, &[]) } else { Ok(()) };
                wiped.and_then(|()| storage.replace_replicas(client_id, Some(home.0), &deliveries))
            }
            Update::Ended => {
                self.forget(storage, client_id);
                return true;
            }
        };
        if let Err(err) = result {
            tracing::error!(cause = %err, client_id, "could not keep a session copy");
        }
        self.put(storage, client_id, record);
        true
    }

    /// `home` took `client_id`'s session from this node under claim
    /// `version`: the record, if it is not newer, names it.
    pub fn rehome(&mut self, storage: &Storage, client_id: &str, home: NodeId, version: u64) {
        let Some(record) = self.records.get(client_id).filter(|r| r.version <= version) else { return };
        let mut record = record.clone();
        (record.home, record.version) = (home.0, version);
        self.put(storage, client_id, record);
    }

    /// Forgets a client's record and the copy of its deliveries.
    pub fn forget(&mut self, storage: &Storage, client_id: &str) {
        self.records.remove(client_id);
        let removed = storage.remove_directory(client_id).and_then(|()| storage.replace_replicas(client_id, None, &[]));
        if let Err(err) = removed {
            tracing::error!(cause = %err, client_id, "could not forget a session directory record");
        }
    }

    /// The clients whose home is `node`.
    pub fn homed_at(&self, node: NodeId) -> Vec<(Arc<str>, Record)> {
        self.records.iter().filter(|(_, r)| r.home == node.0).map(|(c, r)| (c.clone(), r.clone())).collect()
    }

    fn put(&mut self, storage: &Storage, client_id: &str, record: Record) {
        let bytes = rmp_serde::to_vec_named(&record).expect("in-memory records always encode");
        if let Err(err) = storage.put_directory(client_id, &bytes) {
            tracing::error!(cause = %err, client_id, "could not persist a session directory record");
        }
        self.records.insert(client_id.into(), record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::session::NEVER_EXPIRES;

    fn stored() -> StoredSession {
        StoredSession {
            expiry_interval: NEVER_EXPIRES,
            subscriptions: Vec::new(),
            incoming_qos2: vec![],
            disconnected_at_ms: None,
        }
    }

    #[test]
    fn claims_are_ordered_and_stale_updates_refused() {
        let storage = Storage::in_memory();
        let mut dir = Directory::default();
        let (a, b) = (NodeId(1), NodeId(2));
        let (v1, before) = dir.claim(&storage, "c", a, false);
        assert_eq!((v1, before), (1, None));
        assert!(dir.apply(&storage, "c", a, v1, Update::Session(stored())));
        let (v2, before) = dir.claim(&storage, "c", b, false);
        assert_eq!(v2, 2);
        let before = before.expect("a's record");
        assert_eq!((before.home, before.version), (1, 1));
        assert!(before.session.is_some(), "the claimer learns the subscriptions it takes over");
        // a's session goes; its last words are stale and change nothing.
        assert!(!dir.apply(&storage, "c", a, v1, Update::Ended));
        assert_eq!(dir.get("c").map(|r| r.home), Some(2));
        assert!(dir.apply(&storage, "c", b, v2, Update::Ended));
        assert!(dir.get("c").is_none());
    }

    #[test]
    fn records_survive_a_restart_and_copies_are_kept() {
        let dir_path = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir_path.path()).unwrap();
        let mut dir = Directory::default();
        let (v, _) = dir.claim(&storage, "c", NodeId(7), false);
        let delivery = crate::storage::StoredDelivery {
            message: Message {
                topic: "t".into(),
                payload: bytes::Bytes::from_static(b"p"),
                qos: crate::protocol::QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                expires_at_ms: None,
                origin: None,
                fleet_id: Some((7, 1)),
            },
            qos: crate::protocol::QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
            packet_id: None,
            released: false,
        };
        dir.apply(&storage, "c", NodeId(7), v, Update::Delivery { seq: 3, delivery: delivery.clone() });
        dir.apply(&storage, "c", NodeId(7), v, Update::Delivery { seq: 4, delivery: delivery.clone() });
        dir.apply(&storage, "c", NodeId(7), v, Update::DeliveryDone { seq: 3 });
        storage.flush().unwrap();
        drop(storage);
        let storage = Storage::open(dir_path.path()).unwrap();
        let dir = Directory::load(&storage);
        assert_eq!(dir.get("c").map(|r| (r.home, r.version)), Some((7, 1)));
        assert_eq!(storage.replicas("c").unwrap(), vec![delivery]);
        assert_eq!(dir.homed_at(NodeId(7)).len(), 1);
    }
}
