//! Integration tests: real brokers on 127.0.0.1 (ephemeral ports, temporary
//! data directories) and real MQTT clients. One binary, one module per area;
//! `common` starts brokers, `support` (shared with `tests/cluster`) holds
//! the clients, ports and waits.

#[path = "../support/mod.rs"]
mod support;

mod common;

mod bad_input;
mod cli;
mod conformance;
mod http;
mod lifetimes;
mod limits;
mod persistence;
mod proxy;
mod session_fuzz;
mod v311;
mod v5;
mod websocket;
