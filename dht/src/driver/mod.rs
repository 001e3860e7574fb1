//! The libp2p driver: kadmq's cluster transport and membership. Built with
//! the crate's `driver` feature (on by default).
//!
//! Job: move opaque frames between nodes and say who is in the fleet. One
//! libp2p swarm per node (TCP + pnet pre-shared key + noise + yamux, with
//! identify, Kademlia, gossipsub and a stream protocol), split as in
//! rust-libp2p's file-sharing example: [`start`] returns a cloneable
//! [`Client`], a channel of [`Event`]s and the [`EventLoop`], the only task
//! that touches the swarm.
//!
//! Boundary: frames are opaque bytes here (the routing core in
//! `crate::core` fills them with rmp-serde encoded messages and handles
//! acknowledgements); delivery is ordered per sending node and at most once
//! across link drops. Membership is heartbeat-based: `MemberUp` on a new
//! node or incarnation, `MemberSuspect` then `MemberDead` when heartbeats
//! stop.
//!
//! # Layout
//!
//! - [`config`]: [`DriverConfig`], node keypair and cluster key files.
//! - [`behaviour`]: the transport stack and the composed `Behaviour`.
//! - [`membership`]: node records and the [`FailureDetector`] (no I/O).
//! - [`budget`]: [`SendBudget`], the node-wide bound on bytes held for peers.
//! - [`frames`]: the `/kadmq/frames/1` protocol, writer and reader tasks.
//! - [`client`]: [`Client`], [`Event`] and the command enum.
//! - [`event_loop`]: [`start`] and [`EventLoop`].
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), kadmq_dht::driver::Error> {
//! use kadmq_dht::driver::{self, DriverConfig};
//! let dir = std::path::Path::new("/var/lib/kadmq");
//! let mut config = DriverConfig::new(
//!     "n1",
//!     driver::load_or_generate_keypair(dir)?,
//!     driver::read_cluster_key(&dir.join("cluster.key"))?,
//! );
//! config.incarnation = driver::next_incarnation(dir)?;
//! config.bootstrap = vec!["/dns4/n0.example/tcp/7000".parse().unwrap()];
//! let (client, mut events, event_loop) = driver::start(config).await?;
//! tokio::spawn(event_loop.run());
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # let _ = client; Ok(()) }
//! ```

pub mod behaviour;
pub mod budget;
pub mod client;
pub mod config;
mod error;
pub mod event_loop;
pub mod frames;
pub mod membership;

pub use budget::{Charged, SendBudget};
pub use client::{Client, Event};
pub use config::{
    generate_cluster_key, generate_keypair, load_or_generate_keypair, next_incarnation, parse_cluster_key, peer_id_of,
    read_cluster_key, save_keypair, write_cluster_key, DriverConfig,
};
pub use error::Error;
pub use event_loop::{start, EventLoop};
pub use membership::{FailureDetector, FleetSettings, Load, Member, MemberState, NodeRecord};

// Re-exported so callers need not depend on libp2p for the basic types.
pub use libp2p::{identity::Keypair, multiaddr, pnet::PreSharedKey, Multiaddr, PeerId};
