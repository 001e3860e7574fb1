//! Multi-node tests: real `kadmq` processes on 127.0.0.1 forming a cluster
//! over libp2p, real MQTT clients (rumqttc).

mod churn;
mod cli;
mod common;
mod forwarding;
mod outbox;
mod peers;
mod rejoin;
mod retained;
