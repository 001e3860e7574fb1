//! The receiving side of QoS 1/2 forwarding (the sending side is
//! [`super::outbox`]).
//!
//! Job: accept a sender's forwards only in sequence (a forward after a gap
//! is dropped and comes again), acknowledge cumulatively, drop duplicates,
//! and follow the sender's `base` (what it gave up) and epoch (its run).
//! Boundary: bookkeeping only; the receive path acts on the [`Verdict`].

use super::outbox::Sequence;
use kadmq_dht::core::NodeId;
use std::collections::HashMap;

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
}
