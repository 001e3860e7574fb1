//! The harness shared by the two integration test binaries (`tests/broker`
//! and `tests/cluster`, each including it with `#[path]`): ports, waiting,
//! HTTP, MQTT clients (a raw one on kadmq's codec, a rumqttc wrapper,
//! numbered streams and a subscriber that follows the fleet), `kadmq`
//! processes, alone or as a [`lab::Lab`] of cluster nodes, a round-robin
//! TCP proxy, and what both binaries run against an address (the session
//! conformance checks, paho-mqtt interop). It knows nothing of any one
//! test; what only one binary needs stays in that binary.
//!
//! Each binary uses part of it, so unused items are no warning here.
#![allow(dead_code)]

pub mod checks;
pub mod http;
pub mod lab;
pub mod mqtt;
pub mod paho;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod stream;
pub mod wait;

/// A multi-threaded runtime of two workers for the MQTT clients of a test
/// that runs on a plain thread (so it can block on HTTP and processes while
/// its clients keep their connections going).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
