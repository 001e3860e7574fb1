//! Test-only fault hooks: the route frames between this node and chosen
//! peers are lost (and the retained frames from them), as a broken link or
//! a full queue would lose them, or
//! the ones this node sends them are late (in order), as on a slow link,
//! or the acknowledgements of their QoS 1/2 forwards are not sent (muted),
//! or their QoS 1/2 forwards are lost on arrival (their outbox resends
//! them); the peers stay members (heartbeats, session frames and, unless
//! dropped, forwards still flow). Off unless the node starts with
//! `KADMQ_FAULTS=1`; only then does the HTTP endpoint serve
//! `POST /api/v1/faults?cut=NAME`, `?delay=NAME&ms=N`, `?mute_acks=NAME`,
//! `?drop_forwards=NAME` and `?heal`.
//!
//! Job: the cut and delayed peers and the count of frames lost. Boundary:
//! the send and receive paths ask [`Faults::cuts`] and [`Faults::delays`];
//! nothing else changes.

use super::links::{self, Class, Sender};
use bytes::Bytes;
use kadmq_dht::core::NodeId;
use parking_lot::RwLock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a fault hook does to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Route frames to and from it are lost.
    Cut,
    /// Route frames to it leave this late.
    Delay(Duration),
    /// Its QoS 1/2 forwards are not acknowledged.
    MuteAcks,
    /// Its QoS 1/2 forwards are lost on arrival.
    DropForwards,
}

/// Frames for a delayed peer and when each may leave.
type DelayQueue = mpsc::UnboundedSender<(Instant, Bytes)>;

#[derive(Default)]
pub struct Faults {
    enabled: bool,
    /// Whether any peer is cut (the hot path reads only this).
    any: AtomicBool,
    cut: RwLock<HashSet<NodeId>>,
    muted: RwLock<HashSet<NodeId>>,
    dropping: RwLock<HashSet<NodeId>>,
    /// Per delayed peer: how late, and the queue of its sender task.
    delayed: RwLock<HashMap<NodeId, (Duration, DelayQueue)>>,
    /// Frames lost to a cut (both ways) or dropped forwards.
    pub dropped: AtomicU64,
}

impl Faults {
    /// Enabled by `KADMQ_FAULTS=1` in the node's environment.
    pub fn from_env() -> Faults {
        Faults { enabled: std::env::var("KADMQ_FAULTS").is_ok_and(|v| v == "1"), ..Faults::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether a route frame to or from `peer` is lost; counts it if so.
    pub fn cuts(&self, peer: NodeId) -> bool {
        if !self.any.load(Ordering::Relaxed) || !self.cut.read().contains(&peer) {
            return false;
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether the acknowledgements for `peer` (named only if a fault is
    /// on) are muted.
    pub fn mutes(&self, peer: impl FnOnce() -> NodeId) -> bool {
        self.any.load(Ordering::Relaxed) && self.muted.read().contains(&peer())
    }

    pub fn mute_acks(&self, peer: NodeId) {
        self.muted.write().insert(peer);
        self.any.store(true, Ordering::Relaxed);
    }

    /// Whether a QoS 1/2 forward from `peer` is lost; counts it if so.
    pub fn drops_forwards(&self, peer: NodeId) -> bool {
        if !self.any.load(Ordering::Relaxed) || !self.dropping.read().contains(&peer) {
            return false;
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn drop_forwards(&self, peer: NodeId) {
        self.dropping.write().insert(peer);
        self.any.store(true, Ordering::Relaxed);
    }

    pub fn cut(&self, peer: NodeId) {
        self.cut.write().insert(peer);
        self.any.store(true, Ordering::Relaxed);
    }

    /// Queues a route frame for `peer` to leave later if `peer` is
    /// delayed (then the caller does not send it).
    pub fn delays(&self, peer: NodeId, frame: &Bytes) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        match self.delayed.read().get(&peer) {
            Some((by, queue)) => queue.send((Instant::now() + *by, frame.clone())).is_ok(),
            None => false,
        }
    }

    /// Route frames for `peer` leave `by` late through `sender`, in order.
    pub fn delay(&self, peer: NodeId, by: Duration, sender: Sender) {
        let (queue, mut frames) = mpsc::unbounded_channel::<(Instant, Bytes)>();
        tokio::spawn(async move {
            while let Some((due, frame)) = frames.recv().await {
                tokio::time::sleep_until(due).await;
                sender.send(Class::Control, links::copy_of(&frame));
            }
        });
        self.delayed.write().insert(peer, (by, queue));
        self.any.store(true, Ordering::Relaxed);
    }

    /// Ends every cut and delay (frames already delayed still leave).
    pub fn heal(&self) {
        self.cut.write().clear();
        self.muted.write().clear();
        self.dropping.write().clear();
        self.delayed.write().clear();
        self.any.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cut_peers_lose_frames_until_healed() {
        let faults = Faults::default();
        assert!(!faults.cuts(NodeId(1)));
        faults.cut(NodeId(1));
        assert!(faults.cuts(NodeId(1)) && !faults.cuts(NodeId(2)));
        faults.heal();
        assert!(!faults.cuts(NodeId(1)));
        assert_eq!(faults.dropped.load(Ordering::Relaxed), 1);
        faults.drop_forwards(NodeId(2));
        assert!(faults.drops_forwards(NodeId(2)) && !faults.drops_forwards(NodeId(1)) && !faults.cuts(NodeId(2)));
        faults.heal();
        assert!(!faults.drops_forwards(NodeId(2)));
        assert_eq!(faults.dropped.load(Ordering::Relaxed), 2);
    }
}
