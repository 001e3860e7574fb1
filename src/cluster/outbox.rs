//! QoS 1/2 messages forwarded to other nodes and not yet acknowledged.
//!
//! Job: remember each such message with the destinations still owing an
//! acknowledgement, persist it (so a publisher's PUBACK never promises
//! more than the disk holds), say which ones are due for a resend, and
//! forget each when its last destination acknowledges. Boundary: no I/O
//! besides [`Storage`]; the cluster task sends what [`Outbox::due`] returns.
//! The receiving side's duplicate filter is [`Dedup`].

use crate::broker::message::Message;
use crate::storage::Storage;
use kadmq_dht::core::{ForwardRoute, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

/// Resend a forward not acknowledged within this time.
pub const RESEND_AFTER_MS: u64 = 3_000;
/// Messages kept at most; beyond it the oldest are given up (and logged).
pub const CAPACITY: usize = 200_000;
/// How long a message waits for a destination node that is away (killed,
/// partitioned) to come back before it is given up.
pub const MAX_HOLD_MS: u64 = 3_600_000;

/// The persisted form of one entry. `waiting` empty with `routed` false:
/// the message was still being routed; route it again after a restart.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub message: Message,
    pub routed: bool,
    pub waiting: Vec<(u64, ForwardRoute)>,
}

pub struct Entry {
    pub message: Arc<Message>,
    pub waiting: Vec<(NodeId, ForwardRoute)>,
    sent_at_ms: u64,
    held_since_ms: u64,
}

#[derive(Default)]
pub struct Outbox {
    entries: BTreeMap<u64, Entry>,
    /// Messages given up because the outbox was full.
    pub dropped: u64,
    /// Forwards sent again after no acknowledgement.
    pub resent: u64,
}

impl Outbox {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Holds message `id`, sent at `now_ms` to `waiting`, until each of
    /// them acknowledges it. Persisted before returning.
    pub fn hold(
        &mut self,
        storage: &Storage,
        id: u64,
        message: Arc<Message>,
        waiting: Vec<(NodeId, ForwardRoute)>,
        now_ms: u64,
    ) {
        persist(storage, id, &message, true, &waiting);
        self.entries.insert(id, Entry { message, waiting, sent_at_ms: now_ms, held_since_ms: now_ms });
        while self.entries.len() > CAPACITY {
            let Some((old, entry)) = self.entries.pop_first() else { break };
            self.dropped += 1;
            tracing::warn!(id = old, topic = %entry.message.topic, "cluster outbox full: giving up an unacknowledged forward");
            forget(storage, old);
        }
    }

    /// Takes back an entry persisted by a previous run; it is due at once.
    pub fn restore(&mut self, id: u64, message: Arc<Message>, waiting: Vec<(NodeId, ForwardRoute)>) {
        self.entries.insert(id, Entry { message, waiting, sent_at_ms: 0, held_since_ms: 0 });
    }

    /// `from` acknowledged `ids`; entries with nobody left waiting are
    /// removed (memory and storage).
    pub fn ack(&mut self, storage: &Storage, from: NodeId, ids: &[u64]) {
        for id in ids {
            let Some(entry) = self.entries.get_mut(id) else { continue };
            entry.waiting.retain(|(node, _)| *node != from);
            if entry.waiting.is_empty() {
                self.entries.remove(id);
                forget(storage, *id);
            }
        }
    }

    /// Forwards due for a resend at `now_ms` to nodes `reachable` says
    /// are up; marks them sent. Messages held longer than [`MAX_HOLD_MS`]
    /// are given up (and logged).
    pub fn due(
        &mut self,
        storage: &Storage,
        now_ms: u64,
        reachable: impl Fn(NodeId) -> bool,
    ) -> Vec<(u64, Arc<Message>, NodeId, ForwardRoute)> {
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| now_ms.saturating_sub(e.held_since_ms) > MAX_HOLD_MS)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(entry) = self.entries.remove(&id) {
                self.dropped += 1;
                tracing::warn!(id, topic = %entry.message.topic, "cluster outbox: destination away for an hour, forward given up");
                forget(storage, id);
            }
        }
        let mut out = Vec::new();
        for (id, entry) in &mut self.entries {
            if now_ms < entry.sent_at_ms + RESEND_AFTER_MS {
                continue;
            }
            let before = out.len();
            for (node, route) in &entry.waiting {
                if reachable(*node) {
                    out.push((*id, entry.message.clone(), *node, route.clone()));
                }
            }
            if out.len() > before {
                entry.sent_at_ms = now_ms;
            }
        }
        self.resent += out.len() as u64;
        out
    }
}

/// Writes the record of message `id` (replacing an earlier one).
pub fn persist(storage: &Storage, id: u64, message: &Message, routed: bool, waiting: &[(NodeId, ForwardRoute)]) {
    let record = Record {
        message: message.clone(),
        routed,
        waiting: waiting.iter().map(|(node, route)| (node.0, route.clone())).collect(),
    };
    let bytes = rmp_serde::to_vec(&record).expect("in-memory records always encode");
    if let Err(err) = storage.put_outbox(id, &bytes) {
        tracing::error!(cause = %err, "could not persist a forwarded message");
    }
}

pub fn forget(storage: &Storage, id: u64) {
    if let Err(err) = storage.remove_outbox(id) {
        tracing::error!(cause = %err, "could not remove an acknowledged forward");
    }
}

/// The outbox records left by the previous run; undecodable ones are
/// logged and removed.
pub fn restore(storage: &Storage) -> Vec<(u64, Record)> {
    let rows = match storage.outbox() {
        Ok(rows) => rows,
        Err(err) => {
            tracing::error!(cause = %err, "could not read the cluster outbox");
            return Vec::new();
        }
    };
    rows.into_iter()
        .filter_map(|(id, bytes)| match rmp_serde::from_slice::<Record>(&bytes) {
            Ok(record) => Some((id, record)),
            Err(err) => {
                tracing::error!(id, cause = %err, "dropping an undecodable outbox record");
                forget(storage, id);
                None
            }
        })
        .collect()
}

/// Recently received QoS 1/2 forward ids of one sending node: a resent
/// forward that already arrived is acknowledged again but not delivered twice.
pub struct Dedup {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Dedup {
    pub fn new(capacity: usize) -> Dedup {
        Dedup { seen: HashSet::new(), order: VecDeque::new(), capacity }
    }

    /// Records `id`; false if it was seen already.
    pub fn first_time(&mut self, id: u64) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;

    fn message() -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"p"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at_ms: None,
            origin: None,
        })
    }

    fn route() -> ForwardRoute {
        ForwardRoute { plain: true, shared: Vec::new() }
    }

    #[test]
    fn held_until_every_destination_acks_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut outbox = Outbox::default();
        outbox.hold(&storage, 5, message(), vec![(NodeId(1), route()), (NodeId(2), route())], 0);
        outbox.ack(&storage, NodeId(1), &[5]);
        assert_eq!(outbox.len(), 1);
        let restored = restore(&storage);
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].0, 5);
        assert!(restored[0].1.routed);
        outbox.ack(&storage, NodeId(2), &[5, 99]);
        assert!(outbox.is_empty());
        assert!(restore(&storage).is_empty());
    }

    #[test]
    fn resends_only_after_the_timeout_and_only_to_reachable_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut outbox = Outbox::default();
        outbox.hold(&storage, 1, message(), vec![(NodeId(1), route()), (NodeId(2), route())], 1_000);
        assert!(outbox.due(&storage, 1_000 + RESEND_AFTER_MS - 1, |_| true).is_empty());
        let due = outbox.due(&storage, 1_000 + RESEND_AFTER_MS, |n| n == NodeId(2));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].2, NodeId(2));
        // Marked sent: not due again at once.
        assert!(outbox.due(&storage, 1_000 + RESEND_AFTER_MS + 1, |_| true).is_empty());
        // A destination away for longer than MAX_HOLD_MS: given up.
        assert!(outbox.due(&storage, 2_000 + MAX_HOLD_MS, |_| false).is_empty());
        assert!(outbox.is_empty());
        assert_eq!(outbox.dropped, 1);
        assert!(restore(&storage).is_empty());
    }

    #[test]
    fn dedup_remembers_a_bounded_window() {
        let mut dedup = Dedup::new(2);
        assert!(dedup.first_time(1));
        assert!(!dedup.first_time(1));
        assert!(dedup.first_time(2));
        assert!(dedup.first_time(3));
        assert!(dedup.first_time(1), "1 fell out of the window");
    }
}
