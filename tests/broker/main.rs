//! Integration tests: real brokers on 127.0.0.1 (ephemeral ports, temporary
//! data directories) and real MQTT clients. One binary, one module per area.

mod common;

mod bad_input;
mod cli;
mod conformance;
mod http;
mod limits;
mod persistence;
mod review;
mod session_fuzz;
mod v311;
mod v5;
mod websocket;
