//! # kadmq-sim
//!
//! A discrete-event simulator that will run thousands of virtual kadmq nodes
//! on the real routing core of `kadmq-dht`, on a virtual network and clock.
//! It holds no routing logic of its own: what it measures is what the fleet
//! runs. Today it only re-exports the shard naming it will drive.

pub use kadmq_dht::{filter_shard, publish_shards, ShardKey};
