//! Multi-node tests: real `kadmq` processes on 127.0.0.1 forming a cluster
//! over libp2p (a `support::lab::Lab` each, one lab at a time), real MQTT
//! clients (rumqttc).

#[path = "../support/mod.rs"]
mod support;

mod admission;
mod churn;
mod cli;
mod forwarding;
mod outbox;
mod peers;
mod rejoin;
mod retained;
mod routes;
mod sessions;
mod splits;
