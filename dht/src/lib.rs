//! # kadmq-dht
//!
//! The cluster: the MQTT route table sharded across nodes, decided by a
//! sans-IO routing core and carried by a libp2p driver.
//!
//! # Layout
//!
//! - [`topic`]: the MQTT topic rules (validation, `$share/` parsing,
//!   matching, levels, limits) for the core and the broker alike.
//! - [`shard`]: [`ShardKey`], the shard a topic filter belongs to and the
//!   shards a publish must consult.
//! - [`core`]: the routing core (ownership, route shards, route cache,
//!   handoff, anti-entropy): a `Node` state machine that takes events and
//!   returns actions. Its module docs describe the API the driver and the
//!   simulator drive it with.
//! - `driver` (the `driver` feature, on by default): the libp2p transport,
//!   node records and failure detection, frame streams between nodes.
//!
//! # Boundary
//!
//! The core, the shard keys and the topic rules never see a socket, a clock
//! or randomness: time comes in as `now` with each event, and what should
//! happen goes out as actions for the caller to carry out. That is enforced
//! by the build, not by habit: tokio, libp2p, futures and rand are
//! dependencies of the `driver` feature only, so `default-features = false`
//! (as `sim/` builds it) gives the core without them.

pub mod core;
#[cfg(feature = "driver")]
pub mod driver;
pub mod shard;
pub mod topic;

pub use shard::{filter_shard, publish_shards, ShardKey, DEFAULT_SHARD_DEPTH};
