//! The HTTP endpoint (`--http ADDR`): Prometheus metrics and a JSON view of
//! the broker for operators and tools.
//!
//! - `GET /metrics`: Prometheus text format 0.0.4.
//! - `GET /api/v1/broker`: the same figures as JSON.
//! - `GET /api/v1/cluster`: the fleet's members (404 on a single node).
//! - `GET /api/v1/routes?topic=a/b`: where a publish to the topic goes (404 on a single node).
//! - `POST /api/v1/faults?cut=NAME` / `?delay=NAME&ms=N` / `?mute_acks=NAME` / `?drop_forwards=NAME` / `?heal`: test-only fault hooks, served
//!   only when the node started with `KADMQ_FAULTS=1` (see `crate::cluster::faults`).
//! - `GET /health/live`: 200 while the process serves HTTP.
//! - `GET /health/ready`: 200 once the node takes MQTT clients, 503 while
//!   it is still joining its fleet (see `crate::broker::admission`).

use crate::broker::limits::Limit;
use crate::broker::{Broker, Stats};
use crate::cluster::Cluster;
use crate::metrics::{self, Figure};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Clone)]
struct App {
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
}

/// Serves the endpoint on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    cluster: Option<Arc<Cluster>>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/broker", get(broker_json))
        .route("/api/v1/cluster", get(cluster_json))
        .route("/api/v1/routes", get(routes_json))
        .route("/api/v1/faults", axum::routing::post(faults))
        .with_state(App { broker, cluster });
    if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(cause = %err, "HTTP endpoint failed");
    }
}

fn figures(broker: &Broker, cluster: Option<&Cluster>) -> Vec<Figure> {
    let s = &broker.stats;
    let figure = Figure::new;
    vec![
        figure("kadmq_uptime_seconds", "gauge", "Seconds since the broker started.", broker.uptime().as_secs()),
        figure("kadmq_connections", "gauge", "Client connections open now.", Stats::get(&s.clients_connected)),
        figure("kadmq_connections_total", "counter", "Client connections accepted.", Stats::get(&s.clients_total)),
        figure(
            "kadmq_connections_refused_not_ready_total",
            "counter",
            "Client connections refused (CONNACK 0x88, 3.1.1: 3) because this node had not joined its fleet yet.",
            broker.admission.refused(),
        ),
        figure(
            "kadmq_ready",
            "gauge",
            "1 once the node takes MQTT clients, 0 while it is still joining its fleet.",
            u64::from(broker.admission.is_admitted()),
        ),
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
    .into_iter()
    .chain(cluster.into_iter().flat_map(|c| c.figures()))
    .collect()
}

/// The Prometheus text exposition of the broker's (and cluster's) figures.
pub fn render_metrics(broker: &Broker, cluster: Option<&Cluster>) -> String {
    let mut out = String::with_capacity(4096);
    metrics::render(&mut out, figures(broker, cluster));
    let name = "kadmq_limit_hits_total";
    let _ =
        writeln!(out, "# HELP {name} Times a client ran into a limit (mqtt.max_*), by limit.\n# TYPE {name} counter");
    for limit in Limit::ALL {
        let _ = writeln!(out, "{name}{{limit=\"{}\"}} {}", limit.name(), broker.limits.count(limit));
    }
    out
}

async fn ready(State(app): State<App>) -> (StatusCode, &'static str) {
    if app.broker.admission.is_admitted() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: joining the fleet (MQTT clients are refused until then)\n")
    }
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let text = render_metrics(&app.broker, app.cluster.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

async fn broker_json(State(app): State<App>) -> impl IntoResponse {
    let map: serde_json::Map<String, serde_json::Value> = figures(&app.broker, None)
        .into_iter()
        .map(|f| (f.name.trim_start_matches("kadmq_").to_string(), f.value.into()))
        .chain(Limit::ALL.map(|l| (format!("limit_hits_{}", l.name()), app.broker.limits.count(l).into())))
        .collect();
    Json(serde_json::Value::Object(map))
}

const NOT_CLUSTERED: &str = "this node runs alone (start it with --p2p-listen to join a cluster)";

async fn cluster_json(State(app): State<App>) -> axum::response::Response {
    match app.cluster {
        Some(cluster) => Json(cluster.status().await).into_response(),
        None => (StatusCode::NOT_FOUND, NOT_CLUSTERED).into_response(),
    }
}

async fn faults(
    State(app): State<App>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    let Some(cluster) = app.cluster else { return (StatusCode::NOT_FOUND, NOT_CLUSTERED).into_response() };
    use crate::cluster::faults::Fault;
    let ms = query.get("ms").and_then(|ms| ms.parse().ok()).map(std::time::Duration::from_millis);
    let named: Vec<(&str, &str)> = ["cut", "delay", "mute_acks", "drop_forwards"]
        .into_iter()
        .filter_map(|key| query.get(key).map(|peer| (key, peer.as_str())))
        .collect();
    let (peer, fault) = match (named.as_slice(), ms, query.contains_key("heal")) {
        ([("cut", peer)], None, false) => (Some(*peer), Fault::Cut),
        ([("delay", peer)], Some(ms), false) => (Some(*peer), Fault::Delay(ms)),
        ([("mute_acks", peer)], None, false) => (Some(*peer), Fault::MuteAcks),
        ([("drop_forwards", peer)], None, false) => (Some(*peer), Fault::DropForwards),
        ([], None, true) => (None, Fault::Cut),
        _ => {
            let usage = "give ?cut=NAME, ?delay=NAME&ms=N, ?mute_acks=NAME, ?drop_forwards=NAME or ?heal";
            return (StatusCode::BAD_REQUEST, usage).into_response();
        }
    };
    match cluster.fault(peer, fault).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => (StatusCode::FORBIDDEN, err).into_response(),
    }
}

async fn routes_json(
    State(app): State<App>,
    Query(mut query): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    let Some(cluster) = app.cluster else { return (StatusCode::NOT_FOUND, NOT_CLUSTERED).into_response() };
    let Some(topic) = query.remove("topic") else {
        return (StatusCode::BAD_REQUEST, "give the topic: /api/v1/routes?topic=a/b").into_response();
    };
    if !kadmq_dht::topic::valid_topic_name(&topic) {
        return (StatusCode::BAD_REQUEST, format!("{topic:?} is not a valid topic name")).into_response();
    }
    Json(cluster.routes(&topic).await).into_response()
}
