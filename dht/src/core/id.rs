//! Node identities and the small, deterministic hashes the core uses.
//!
//! A [`NodeId`] is a `u64`: cheap to copy, hash, store and put on the wire.
//! Its *position* in the key space is a bijective mix of that number, so any
//! assignment of ids (the driver's hashed peer ids, the simulator's counters)
//! spreads evenly over the space. Everything here is deterministic across
//! processes and machines: owners on different hosts must agree on digests
//! and on the shared-subscription pick, so no `RandomState` anywhere.
//!
//! Boundary: no knowledge of libp2p. The driver maps a `PeerId` to a
//! `NodeId` with [`NodeId::from_peer_bytes`] (SHA-256 of `PeerId::to_bytes()`,
//! first 8 bytes) and keeps the reverse map itself.

use crate::shard::ShardKey;
use sha2::{Digest, Sha256};
use std::fmt;

/// A cluster member. Compact on purpose: the simulator holds millions of
/// them (route entries, owner lists, watcher lists).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The id of a libp2p peer: the first 8 bytes (big-endian) of
    /// SHA-256(`"node:"` + the peer id bytes). With 100,000 nodes the chance
    /// of a collision is about 3e-10.
    pub fn from_peer_bytes(peer_id: &[u8]) -> NodeId {
        let mut hasher = Sha256::new();
        hasher.update(b"node:");
        hasher.update(peer_id);
        let digest = hasher.finalize();
        NodeId(u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")))
    }

    /// Where the node sits in the 64-bit key space (the top 64 bits of the
    /// 256-bit Kademlia space). A bijection of the id, so distinct nodes have
    /// distinct positions and XOR distances never tie.
    #[inline]
    pub fn position(self) -> u64 {
        mix64(self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{:x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A shard key's position in the same 64-bit space as [`NodeId::position`]:
/// its first 8 bytes. The key is already a SHA-256 output.
#[inline]
pub fn key_position(key: &ShardKey) -> u64 {
    u64::from_be_bytes(key.0[..8].try_into().expect("8 bytes"))
}

/// splitmix64's finalizer: a fast bijective mix of 64 bits.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A 64-bit hash of byte strings, stable across processes and versions
/// (FNV-1a, then [`mix64`] to spread the low-entropy FNV output).
#[derive(Clone, Copy)]
pub struct StableHasher(u64);

impl StableHasher {
    pub fn new() -> StableHasher {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }

    #[inline]
    pub fn bytes(mut self, bytes: &[u8]) -> StableHasher {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A terminator so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        self
    }

    #[inline]
    pub fn u64(self, v: u64) -> StableHasher {
        self.bytes(&v.to_le_bytes())
    }

    #[inline]
    pub fn finish(self) -> u64 {
        mix64(self.0)
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher::new()
    }
}

/// Hash maps keyed by [`ShardKey`] or [`NodeId`]: FxHash, no random seed,
/// so iteration order (and with it the order of emitted actions) is a pure
/// function of the inputs, as the simulator's determinism needs.
pub type FastMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_map_to_stable_ids() {
        let a = NodeId::from_peer_bytes(b"12D3KooWexample");
        assert_eq!(a, NodeId::from_peer_bytes(b"12D3KooWexample"));
        assert_ne!(a, NodeId::from_peer_bytes(b"12D3KooWexamplf"));
    }

    #[test]
    fn positions_of_sequential_ids_spread() {
        // The simulator may number nodes 0..n; their positions must not bunch.
        let mut top_bits = [0u32; 16];
        for i in 0..16_000u64 {
            top_bits[(NodeId(i).position() >> 60) as usize] += 1;
        }
        assert!(top_bits.iter().all(|&c| (800..1200).contains(&c)), "{top_bits:?}");
    }

    #[test]
    fn stable_hash_separates_fields() {
        let ab_c = StableHasher::new().bytes(b"ab").bytes(b"c").finish();
        let a_bc = StableHasher::new().bytes(b"a").bytes(b"bc").finish();
        assert_ne!(ab_c, a_bc);
        assert_eq!(ab_c, StableHasher::new().bytes(b"ab").bytes(b"c").finish());
    }
}
