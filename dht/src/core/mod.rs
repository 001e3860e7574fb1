//! The sans-IO routing core: who owns which shard of the route table, what
//! owners hold, how publishers cache it, and the per-node state machine that
//! ties them together. The libp2p driver (`driver/`) and the simulator
//! (`sim/`) both drive this one core, so what the simulator measures is what
//! the fleet runs.
//!
//! Boundary: no socket, clock or randomness; `now` comes in with each event
//! and what should happen goes out as actions. The build keeps it so: this
//! module compiles without the crate's `driver` feature, the only one that
//! brings in tokio, libp2p and rand.
//!
//! # Layout
//!
//! - [`id`]: [`NodeId`] (a `u64`) and its position in the key space; stable hashes.
//! - [`ownership`]: the [`Ownership`] trait, XOR and ring strategies, [`Membership`].
//! - [`filter_trie`]: [`FilterTrie`], filters to values, matched level by level
//!   (the topic rules themselves are [`crate::topic`]).
//! - [`route_shard`]: owner side, [`RouteShard`].
//! - [`route_cache`]: publisher side, [`RouteCache`].
//! - [`frame`]: [`Frame`]s between nodes, [`encode`]/[`decode`] (rmp-serde).
//! - [`node`]: the state machine, [`Node`], its [`Event`]s and [`Action`]s.
//!
//! # Driving a node
//!
//! ```
//! use kadmq_dht::core::{Action, Event, Membership, Node, NodeId, OwnershipConfig, RoutingConfig};
//! use std::sync::Arc;
//!
//! let me = NodeId::from_peer_bytes(b"peer id bytes");
//! let mut node = Node::new(me, RoutingConfig::default());
//! let mut actions = Vec::new();
//! let view = Arc::new(Membership::new(1, [me], OwnershipConfig::Xor));
//! node.handle(0, Event::Membership(view), &mut actions).unwrap();
//! node.handle(5, Event::Subscribe { filter: "a/+", group: None }, &mut actions).unwrap();
//! node.handle(9, Event::Publish { topic: "a/b", msg: 1 }, &mut actions).unwrap();
//! assert!(actions.iter().any(|a| matches!(a, Action::Deliver { msg: 1, .. })));
//! ```
//!
//! Events (all with `now` in ms, from the caller's clock):
//! `Membership(Arc<Membership>)` — the live set (build the next one with
//! [`Membership::next`] and share the `Arc` among nodes with the same view);
//! `Subscribe`/`Unsubscribe { filter, group }` — a local client's
//! (`$share/group/filter` → `group: Some("group")`, `filter` without the prefix);
//! `Publish { topic, msg }` — a local publish, `msg` the caller's handle;
//! `Frame { from, frame }` — a decoded [`Frame`] from another node;
//! `Forwarded { from, topic, msg, route }` — another node's `Action::Forward`;
//! `Timer`.
//!
//! Actions: `Send { to, frame }` (encode with [`encode`]); `Forward { to,
//! msg, route }` — send the message (topic + payload, which the caller kept)
//! and the [`ForwardRoute`] to `to`, where it becomes `Event::Forwarded`;
//! `Deliver { msg, route }` — deliver through the local trie: every matching
//! non-shared subscription if `route.plain`, one member of each listed shared
//! group; `Routed { msg, forwards, local }` — the publish is fully routed;
//! `ArmTimer { at }` — one timer, each `ArmTimer` replaces it.
//!
//! Counters: [`Node::counters`] ([`Counters`]: lookups sent, cache hits and
//! misses, frames sent/received by kind, …) and gauges [`Node::entries_owned`],
//! [`Node::shards_owned`], [`RouteCache::entries`], [`Node::local_filters`],
//! [`Node::parked`].
//!
//! # Hot-prefix splits
//!
//! A shard at the shard depth or deeper (never the root) whose owner holds
//! [`RoutingConfig::split_entries`] entries, some of them deeper than its
//! prefix, *splits* by the next topic level (DESIGN.md "Hot prefixes"): the
//! owner marks it split ([`Action::Split`]) and says so in every lookup
//! answer, delta and acknowledgement after; filters whose literal prefix
//! goes a level deeper move to the child shard `prefix + "/" + level` (their
//! nodes assert them there, and withdraw them from the parent once the
//! child's owners acknowledged them and `handoff_warmup_ms` passed);
//! filters with a wildcard at that level stay. A publisher that finds a
//! split shard on its topic's path also consults the child, and so on down
//! while children are split. The split flag travels in the subscriber
//! nodes' assertions too, so new owners of the parent (after any churn)
//! learn it; replicas compare it in anti-entropy. Not built: merging a
//! split shard back once it shrinks (a split is for the life of the fleet's
//! nodes).

pub mod filter_trie;
pub mod frame;
pub mod id;
pub mod node;
pub mod ownership;
pub mod route_cache;
pub mod route_shard;

#[cfg(test)]
mod cluster_tests;

pub use filter_trie::FilterTrie;
pub use frame::{
    decode, encode, ForwardRoute, Frame, FrameError, FrameKind, LookupAnswer, RouteChange, RouteOp, SharedPick,
    FRAME_KINDS,
};
pub use id::NodeId;
pub use node::{Action, CoreError, Counters, Event, Node, Rejected, RouteTicket, RoutingConfig};
pub use ownership::{
    Membership, MembershipDelta, Owners, Ownership, OwnershipConfig, Placement, RingOwnership, XorOwnership,
};
pub use route_cache::RouteCache;
pub use route_shard::{FilterRoutes, RouteShard};
