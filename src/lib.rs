//! # kadmq
//!
//! An MQTT 3.1.1 / 5.0 broker that runs as one node or as a fleet whose
//! route table is sharded over a Kademlia DHT (`kadmq-dht`).
//!
//! # Layout
//!
//! - [`protocol`]: packets, the 3.1.1/5.0 codec. No I/O. The topic rules
//!   are [`kadmq_dht::topic`], shared with the routing core.
//! - [`broker`]: sessions, the subscription trie, retained messages, wills,
//!   `$SYS`. Shared by all connections; never touches a socket.
//! - [`connection`]: one client connection, CONNECT to close.
//! - [`websocket`]: MQTT over WebSocket as a byte stream.
//! - [`http`]: `/metrics` (Prometheus) and `/api/v1/broker`.
//! - [`metrics`]: the one figure type and its Prometheus text.
//! - [`cluster`]: the node in a fleet: routing core, libp2p driver, forwards.
//! - [`server`]: listeners, background tasks, start and graceful stop.
//! - [`storage`]: durable state over a small key-value engine (fjall in the
//!   data directory, in memory for unit tests).
//! - [`config`] and [`cli`]: configuration file, environment, flags.
//!
//! `docs/ARCHITECTURE.md` follows one PUBLISH through these modules.

pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod websocket;

pub use config::Config;
pub use server::{run, Server, StartError};
