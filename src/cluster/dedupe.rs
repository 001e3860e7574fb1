//! The receiving side of QoS 1/2 forwarding (the sending side is
//! [`super::outbox`]).
//!
//! Job: accept a sender's forwards only in sequence (a forward after a gap
//! is dropped and comes again), acknowledge cumulatively, drop duplicates,
//! and follow the sender's `base` and epoch (its run) — [`Inbound`], in
//! memory, for one run of each side. Across a restart of either side the
//! numbering starts over, so QoS 2 messages are also remembered by their
//! fleet id, persisted in the same batch as their delivery ([`Qos2Seen`]):
//! a QoS 2 message resent after a restart is acknowledged, not delivered
//! again.
//! Boundary: bookkeeping only; the receive path acts on the [`Verdict`].

use super::outbox::Sequence;
use kadmq_dht::core::NodeId;
use std::collections::{BTreeSet, HashMap};

/// What a receiver does with a sequenced forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next in sequence: deliver it.
    Deliver,
    /// Already delivered: acknowledge again, do not deliver.
    Duplicate,
    /// Something before it is missing: drop it; the sender resends in order.
    Gap,
}

/// The receiving side: per sending node, the next `seq` expected.
#[derive(Default)]
pub struct Inbound {
    expected: HashMap<NodeId, (u64, u64)>,
}

impl Inbound {
    /// Forgets what was received from `from` (gone for good).
    pub fn forget(&mut self, from: NodeId) {
        self.expected.remove(&from);
    }

    /// Sending nodes tracked.
    pub fn len(&self) -> usize {
        self.expected.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expected.is_empty()
    }

    /// Judges a forward from `from`; after `Deliver` or `Duplicate`, the
    /// acknowledgement to send is [`Inbound::ack_for`].
    pub fn accept(&mut self, from: NodeId, s: Sequence) -> Verdict {
        let (epoch, expected) = self.expected.entry(from).or_insert((s.epoch, s.base));
        if *epoch != s.epoch {
            // The sender restarted: a new numbering.
            (*epoch, *expected) = (s.epoch, s.base);
        }
        // The sender gave up what lies below `base`: skip ahead.
        *expected = (*expected).max(s.base);
        if s.seq < *expected {
            Verdict::Duplicate
        } else if s.seq > *expected {
            Verdict::Gap
        } else {
            *expected += 1;
            Verdict::Deliver
        }
    }

    /// (epoch, last `seq` received in order) from `from`, if any.
    pub fn ack_for(&self, from: NodeId) -> Option<(u64, u64)> {
        let (epoch, expected) = self.expected.get(&from)?;
        expected.checked_sub(1).map(|upto| (*epoch, upto))
    }
}

/// The QoS 2 messages of other nodes delivered here (their fleet ids,
/// when), kept `keep_ms` (`cluster.qos2_dedupe_secs`); the same set is in
/// the storage's `fleet_seen` tree.
pub struct Qos2Seen {
    at: HashMap<(u64, u64), u64>,
    by_time: BTreeSet<(u64, (u64, u64))>,
    keep_ms: u64,
}

impl Qos2Seen {
    pub fn new(keep_ms: u64, seen: Vec<((u64, u64), u64)>) -> Qos2Seen {
        let mut set = Qos2Seen { at: HashMap::new(), by_time: BTreeSet::new(), keep_ms };
        for (id, at) in seen {
            set.insert(id, at);
        }
        set
    }

    /// Records `id` at `now_ms`; false if it was delivered before.
    pub fn insert(&mut self, id: (u64, u64), now_ms: u64) -> bool {
        if self.at.contains_key(&id) {
            return false;
        }
        self.at.insert(id, now_ms);
        self.by_time.insert((now_ms, id));
        true
    }

    /// Forgets a record whose delivery was not stored after all.
    pub fn remove(&mut self, id: (u64, u64)) {
        if let Some(at) = self.at.remove(&id) {
            self.by_time.remove(&(at, id));
        }
    }

    /// Takes out the records older than the keep time at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(u64, u64)> {
        let mut gone = Vec::new();
        while let Some(&(at, id)) = self.by_time.first() {
            if at.saturating_add(self.keep_ms) > now_ms {
                break;
            }
            self.by_time.pop_first();
            self.at.remove(&id);
            gone.push(id);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_delivers_in_order_once() {
        let mut inbound = Inbound::default();
        let from = NodeId(9);
        let s = |seq, base| Sequence { epoch: 1, seq, base };
        // A stale frame from after a link drop arrives first: wait for 0.
        assert_eq!(inbound.accept(from, s(3, 0)), Verdict::Gap);
        assert_eq!(inbound.ack_for(from), None);
        assert_eq!(inbound.accept(from, s(0, 0)), Verdict::Deliver);
        assert_eq!(inbound.accept(from, s(1, 0)), Verdict::Deliver);
        assert_eq!(inbound.accept(from, s(1, 0)), Verdict::Duplicate);
        assert_eq!(inbound.ack_for(from), Some((1, 1)));
        // The sender gave up 2: base 3 lets 3 through.
        assert_eq!(inbound.accept(from, s(3, 3)), Verdict::Deliver);
        // The sender restarted: a new epoch starts from its base.
        assert_eq!(inbound.accept(from, Sequence { epoch: 2, seq: 0, base: 0 }), Verdict::Deliver);
        assert_eq!(inbound.ack_for(from), Some((2, 0)));
    }

    #[test]
    fn qos2_messages_are_delivered_once_until_forgotten() {
        let mut seen = Qos2Seen::new(1_000, vec![((7, 1), 100)]);
        assert!(!seen.insert((7, 1), 200), "restored from storage");
        assert!(seen.insert((7, 2), 200));
        assert!(!seen.insert((7, 2), 300));
        assert_eq!(seen.expire(1_099), vec![]);
        assert_eq!(seen.expire(1_200), vec![(7, 1), (7, 2)]);
        assert!(seen.is_empty() && seen.insert((7, 1), 1_300), "forgotten after the keep time");
        seen.remove((7, 1));
        assert_eq!(seen.len(), 0);
    }
}
