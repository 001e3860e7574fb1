//! What this node does with input from peers that it will not apply.
//!
//! Job: count every frame that is dropped unapplied, by reason
//! (`kadmq_cluster_frames_rejected_total{reason}`), and log it once per
//! peer and reason (then at most once a minute, with the number dropped
//! since): a misbehaving or misconfigured peer under load must not turn
//! into a log line per frame. And hold the frames of peers whose node
//! record has not arrived yet ([`Strangers`]): the record and the first
//! frames race each other, so the frames wait (bounded per peer and in
//! total) and are replayed when the peer becomes a member, or dropped
//! after the dead timeout.
//!
//! Boundary: no decoding and no routing; the cluster task decides what is
//! rejected and calls in here.

use bytes::Bytes;
use kadmq_dht::driver::PeerId;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Bytes of frames held for one peer that is not a member yet.
pub const STRANGER_BYTES: usize = 4 << 20;
/// Bytes of frames held for all such peers together.
pub const STRANGERS_BYTES: usize = 16 << 20;
/// After the first log line for a (peer, reason), the next comes no sooner.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Frames dropped unapplied: counts per reason, and the log-once bookkeeping.
#[derive(Default)]
pub struct Rejections {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    logged: Mutex<HashMap<(PeerId, &'static str), Logged>>,
}

struct Logged {
    at: Instant,
    since: u64,
}

impl Rejections {
    /// Counts `n` frames of `peer` dropped for `reason`; logs the first of
    /// a (peer, reason) and then at most one line a minute.
    pub fn reject(&self, peer: PeerId, reason: &'static str, n: u64, detail: &dyn std::fmt::Display) {
        *self.counts.lock().entry(reason).or_default() += n;
        let now = Instant::now();
        let mut logged = self.logged.lock();
        match logged.get_mut(&(peer, reason)) {
            None => {
                logged.insert((peer, reason), Logged { at: now, since: 0 });
                tracing::warn!(%peer, reason, %detail, "frames from this peer dropped unapplied (logged once per peer and reason; counted in kadmq_cluster_frames_rejected_total)");
            }
            Some(entry) if now.duration_since(entry.at) >= LOG_EVERY => {
                let dropped = entry.since + n;
                *entry = Logged { at: now, since: 0 };
                tracing::warn!(%peer, reason, %detail, dropped, "still dropping frames from this peer");
            }
            Some(entry) => entry.since += n,
        }
    }

    /// Counts `n` frames dropped for `reason` without a log line (the
    /// cause was logged elsewhere, e.g. the driver's refusal of a peer).
    pub fn add(&self, reason: &'static str, n: u64) {
        *self.counts.lock().entry(reason).or_default() += n;
    }

    /// Frames dropped for `reason` so far.
    pub fn count(&self, reason: &str) -> u64 {
        self.counts.lock().get(reason).copied().unwrap_or(0)
    }

    /// Every reason seen so far, with its count.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.counts.lock().iter().map(|(r, n)| (*r, *n)).collect()
    }

    /// Forgets the log state of a peer gone for good.
    pub fn forget(&self, peer: &PeerId) {
        self.logged.lock().retain(|(p, _), _| p != peer);
    }

    /// Forgets log state not refreshed for ten minutes (peers that never
    /// became members and went away).
    pub fn sweep(&self, now: Instant) {
        self.logged.lock().retain(|_, l| now.saturating_duration_since(l.at) < LOG_EVERY * 10);
    }

    /// (peer, reason) pairs with log state, for tests of the pruning.
    pub fn tracked(&self) -> usize {
        self.logged.lock().len()
    }
}

/// Frames of peers not (yet) members, held until their record arrives.
#[derive(Default)]
pub struct Strangers {
    peers: HashMap<PeerId, Held>,
    bytes: usize,
}

struct Held {
    frames: Vec<Bytes>,
    bytes: usize,
    since: Instant,
}

impl Strangers {
    /// Holds a frame of `peer`; false (the frame is not held) when that
    /// would pass the bound for the peer or for all of them.
    pub fn hold(&mut self, peer: PeerId, frame: Bytes, now: Instant) -> bool {
        let len = frame.len();
        let mine = self.peers.get(&peer).map_or(0, |h| h.bytes);
        if mine + len > STRANGER_BYTES || self.bytes + len > STRANGERS_BYTES {
            return false;
        }
        let held = self.peers.entry(peer).or_insert_with(|| Held { frames: Vec::new(), bytes: 0, since: now });
        held.bytes += len;
        self.bytes += len;
        held.frames.push(frame);
        true
    }

    /// The peers whose frames are held.
    pub fn held_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.keys()
    }

    /// The frames held for `peer`, oldest first (it became a member).
    pub fn take(&mut self, peer: &PeerId) -> Vec<Bytes> {
        match self.peers.remove(peer) {
            Some(held) => {
                self.bytes -= held.bytes;
                held.frames
            }
            None => Vec::new(),
        }
    }

    /// Drops the frames of peers that stayed strangers for `after`;
    /// returns each such peer with the number of frames dropped.
    pub fn expire(&mut self, now: Instant, after: Duration) -> Vec<(PeerId, u64)> {
        let mut expired = Vec::new();
        let bytes = &mut self.bytes;
        self.peers.retain(|peer, held| {
            let keep = now.saturating_duration_since(held.since) < after;
            if !keep {
                *bytes -= held.bytes;
                expired.push((*peer, held.frames.len() as u64));
            }
            keep
        });
        expired
    }

    /// Peers with frames held.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Bytes held for all of them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_are_bounded_per_peer_and_in_total_and_expire() {
        let mut s = Strangers::default();
        let t0 = Instant::now();
        let frame = Bytes::from(vec![0u8; 1 << 20]);
        let a = PeerId::random();
        for _ in 0..4 {
            assert!(s.hold(a, frame.clone(), t0));
        }
        assert!(!s.hold(a, Bytes::from_static(b"x"), t0), "per-peer bound");
        let others: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for p in &others[..3] {
            for _ in 0..4 {
                assert!(s.hold(*p, frame.clone(), t0));
            }
        }
        assert_eq!(s.bytes(), STRANGERS_BYTES);
        assert!(!s.hold(others[3], Bytes::from_static(b"x"), t0), "total bound");
        assert_eq!(s.peers(), 4, "a refused frame leaves no entry behind");
        assert_eq!(s.take(&a).len(), 4);
        assert!(s.hold(others[3], Bytes::from_static(b"x"), t0 + Duration::from_secs(5)), "room again");
        let expired = s.expire(t0 + Duration::from_secs(10), Duration::from_secs(10));
        assert_eq!(expired.len(), 3);
        assert!(expired.iter().all(|(_, n)| *n == 4));
        assert_eq!((s.peers(), s.bytes()), (1, 1));
    }

    #[test]
    fn rejections_count_every_frame_and_log_state_is_per_peer_and_reason() {
        let r = Rejections::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        for _ in 0..1000 {
            r.reject(a, "not_member", 1, &"x");
        }
        r.reject(a, "invalid_topic", 2, &"x");
        r.reject(b, "not_member", 1, &"x");
        assert_eq!(r.count("not_member"), 1001);
        assert_eq!(r.count("invalid_topic"), 2);
        assert_eq!(r.tracked(), 3);
        r.forget(&a);
        assert_eq!(r.tracked(), 1);
        r.sweep(Instant::now() + LOG_EVERY * 10);
        assert_eq!(r.tracked(), 0);
        assert_eq!(r.count("not_member"), 1001, "counts stay");
    }
}
