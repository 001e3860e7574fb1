//! # kadmq-dht
//!
//! The cluster: the route table sharded across nodes over a Kademlia DHT.
//!
//! This crate will hold a sans-IO routing core (ownership, route shards,
//! route cache, rebalancing, session directory) and its libp2p driver. Today
//! it holds the first piece every other part builds on: [`shard`], which
//! names the shard a topic filter belongs to and the shards a publish must
//! consult.

pub mod core;
pub mod driver;
pub mod shard;

pub use shard::{filter_shard, publish_shards, ShardKey, DEFAULT_SHARD_DEPTH};
