//! # kadmq-dht
//!
//! The cluster: the route table sharded across nodes over a Kademlia DHT.
//!
//! This crate will hold a sans-IO routing core (ownership, route shards,
//! route cache, rebalancing, session directory) and its libp2p driver. Today
//! it holds the first piece every other part builds on: [`shard`], which
//! names the shard a topic filter belongs to and the shards a publish must
//! consult.
//!
//! [`core`] is the sans-IO routing core (ownership, route shards, route
//! cache, rebalancing, anti-entropy): a `Node` state machine that takes
//! events and returns actions. Its module docs describe the API the driver
//! and the simulator drive it with.
//!
//! [`topic`] holds the MQTT topic rules (validation, `$share/` parsing,
//! matching, levels, limits) for the core and the broker alike.

pub mod core;
pub mod driver;
pub mod shard;
pub mod topic;

pub use shard::{filter_shard, publish_shards, ShardKey, DEFAULT_SHARD_DEPTH};
