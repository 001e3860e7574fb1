//! The HTTP endpoint (`--http ADDR`): Prometheus metrics and a JSON view of
//! the broker for operators and tools.
//!
//! - `GET /metrics`: Prometheus text format 0.0.4.
//! - `GET /api/v1/broker`: the same figures as JSON.

use crate::broker::{Broker, Stats};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves the endpoint on `listener` until `stop` resolves.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, stop: impl Future<Output = ()> + Send + 'static) {
    let app =
        Router::new().route("/metrics", get(metrics)).route("/api/v1/broker", get(broker_json)).with_state(broker);
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(cause = %err, "HTTP endpoint failed");
    }
}

/// One figure: Prometheus name, type, help and value.
struct Figure {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: u64,
}

fn figures(broker: &Broker) -> Vec<Figure> {
    let s = &broker.stats;
    let figure = |name, kind, help, value| Figure { name, kind, help, value };
    vec![
        figure(
            "kadmq_uptime_seconds",
            "gauge",
            "Seconds since the broker started.",
            broker.started.elapsed().as_secs(),
        ),
        figure("kadmq_connections", "gauge", "Client connections open now.", Stats::get(&s.clients_connected)),
        figure("kadmq_connections_total", "counter", "Client connections accepted.", Stats::get(&s.clients_total)),
        figure("kadmq_sessions", "gauge", "Sessions held (connected and offline).", broker.session_count() as u64),
        figure("kadmq_subscriptions", "gauge", "Subscriptions in the local trie.", broker.subscription_count() as u64),
        figure("kadmq_retained_messages", "gauge", "Retained messages held.", broker.retained_count() as u64),
        figure(
            "kadmq_messages_received_total",
            "counter",
            "PUBLISH packets received from clients.",
            Stats::get(&s.messages_received),
        ),
        figure(
            "kadmq_messages_sent_total",
            "counter",
            "PUBLISH packets sent to clients.",
            Stats::get(&s.messages_sent),
        ),
        figure(
            "kadmq_messages_dropped_total",
            "counter",
            "Messages dropped: queue full, expired, or too large for the client.",
            Stats::get(&s.messages_dropped),
        ),
        figure("kadmq_bytes_received_total", "counter", "Bytes received from clients.", Stats::get(&s.bytes_received)),
        figure("kadmq_bytes_sent_total", "counter", "Bytes sent to clients.", Stats::get(&s.bytes_sent)),
    ]
}

/// The Prometheus text exposition of the broker's figures.
pub fn render_metrics(broker: &Broker) -> String {
    let mut out = String::with_capacity(2048);
    for f in figures(broker) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}\n{} {}", f.name, f.help, f.name, f.kind, f.name, f.value);
    }
    out
}

async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render_metrics(&broker))
}

async fn broker_json(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let map: serde_json::Map<String, serde_json::Value> = figures(&broker)
        .into_iter()
        .map(|f| (f.name.trim_start_matches("kadmq_").to_string(), f.value.into()))
        .collect();
    Json(serde_json::Value::Object(map))
}
