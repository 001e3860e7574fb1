//! Shard keys: which shard of the route table a topic filter lives in.
//!
//! A filter's shard is named by its literal prefix: its first `depth`
//! levels, stopping at the first wildcard. A filter that starts with a
//! wildcard has the empty prefix (the root shard). The key is the SHA-256 of
//! the prefix, a 256-bit Kademlia key. A publish to topic `T` may match
//! filters in the shards of `T`'s prefixes of length `0..=depth`.

use crate::topic::levels;
use sha2::{Digest, Sha256};
use std::fmt;

/// Levels of literal prefix that name a shard, unless configured otherwise.
/// Two, from the simulator: on a skewed topic tree depth 1 put 47x the mean
/// number of entries on the busiest node and left two thirds of the nodes
/// idle; depth 2 brought that to 2.4x with none idle (docs/SIMULATION.md).
pub const DEFAULT_SHARD_DEPTH: usize = 2;

/// A 256-bit shard key in the Kademlia key space.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ShardKey(pub [u8; 32]);

impl ShardKey {
    /// The key of a literal prefix (levels joined with `/`; "" = root).
    pub fn of_prefix(prefix: &str) -> ShardKey {
        // Domain-separate from other keys in the same DHT (session directory).
        let mut hasher = Sha256::new();
        hasher.update(b"route:");
        hasher.update(prefix.as_bytes());
        ShardKey(hasher.finalize().into())
    }

    /// The session directory key of an MQTT client id.
    pub fn of_client(client_id: &str) -> ShardKey {
        let mut hasher = Sha256::new();
        hasher.update(b"client:");
        hasher.update(client_id.as_bytes());
        ShardKey(hasher.finalize().into())
    }

    /// Kademlia XOR distance to another key.
    pub fn distance(&self, other: &ShardKey) -> [u8; 32] {
        std::array::from_fn(|i| self.0[i] ^ other.0[i])
    }
}

impl fmt::Debug for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardKey(")?;
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The literal prefix of `filter` that names its shard.
pub fn filter_prefix(filter: &str, depth: usize) -> &str {
    let mut end = 0;
    for (taken, level) in levels(filter).enumerate() {
        if taken == depth || level == "+" || level == "#" {
            break;
        }
        end = if taken == 0 { level.len() } else { end + 1 + level.len() };
    }
    // A filter that stops at a wildcard or the depth at level 0 is the root.
    &filter[..end.min(filter.len())]
}

/// Levels of `filter` before its first wildcard (every level of a topic).
pub fn literal_depth(filter: &str) -> usize {
    levels(filter).take_while(|level| *level != "+" && *level != "#").count()
}

/// The shard of a topic filter, before any hot-prefix split (a split moves
/// it a level deeper: see the routing core's `node` module).
pub fn filter_shard(filter: &str, depth: usize) -> ShardKey {
    ShardKey::of_prefix(filter_prefix(filter, depth))
}

/// The shards a publish to `topic` must consult: one per prefix length
/// `0..=depth` (fewer when the topic has fewer levels). Topics starting with
/// `$` skip the root shard: root filters start with a wildcard and never
/// match them.
pub fn publish_shards(topic: &str, depth: usize) -> Vec<(String, ShardKey)> {
    let mut shards = Vec::with_capacity(depth + 1);
    if !topic.starts_with('$') {
        shards.push((String::new(), ShardKey::of_prefix("")));
    }
    let mut prefix = String::new();
    for (i, level) in levels(topic).take(depth).enumerate() {
        if i > 0 {
            prefix.push('/');
        }
        prefix.push_str(level);
        shards.push((prefix.clone(), ShardKey::of_prefix(&prefix)));
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_stop_at_depth_and_wildcards() {
        assert_eq!(filter_prefix("a/b/c", 1), "a");
        assert_eq!(filter_prefix("a/b/c", 2), "a/b");
        assert_eq!(filter_prefix("a/+/c", 2), "a");
        assert_eq!(filter_prefix("+/b", 2), "");
        assert_eq!(filter_prefix("#", 1), "");
        assert_eq!(filter_prefix("a", 3), "a");
        assert_eq!(filter_prefix("/x", 1), "");
        assert_eq!(filter_prefix("a/#", 3), "a");
        assert_eq!(literal_depth("a/b/c"), 3);
        assert_eq!(literal_depth("a/+/c"), 1);
        assert_eq!(literal_depth("#"), 0);
        assert_eq!(literal_depth("/x"), 2);
    }

    #[test]
    fn dollar_topics_skip_the_root_shard() {
        let shards = publish_shards("$SYS/uptime", 1);
        assert_eq!(shards.len(), 1);
        assert_eq!(shards[0].0, "$SYS");
        assert_eq!(publish_shards("a/b", 2).len(), 3);
        assert_eq!(publish_shards("a", 2).len(), 2);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just(String::new())]
    }

    proptest! {
        /// Every filter that matches a topic lives in one of the topic's
        /// publish shards: the sharding never hides a match.
        #[test]
        fn a_matching_filter_is_in_a_publish_shard(
            topic in proptest::collection::vec(level(), 1..5),
            filter in proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..5),
            hash in any::<bool>(),
            depth in 1usize..4,
        ) {
            let topic = topic.join("/");
            let mut filter = filter;
            if hash { filter.push("#".into()); }
            let filter = filter.join("/");
            if crate::topic::matches(&filter, &topic) {
                let key = filter_shard(&filter, depth);
                prop_assert!(publish_shards(&topic, depth).iter().any(|(_, k)| *k == key),
                    "filter {} for topic {} not in its shards", filter, topic);
            }
        }
    }
}
