//! The HTTP endpoint: Prometheus metrics and the JSON view move with traffic.

use crate::common::{joining_broker, TestBroker};
use crate::support::http::http_get_async;
use crate::support::raw::Raw;
use crate::support::wait::wait_until_async;
use kadmq::protocol::QoS;
use std::net::SocketAddr;
use std::time::Duration;

/// GET `path` on the broker's HTTP endpoint: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_async(addr.port(), path).await.unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_and_json_follow_traffic() {
    let broker = TestBroker::start_with(|c| c.listeners.http = Some("127.0.0.1:0".parse().unwrap())).await;
    let http = broker.server.as_ref().unwrap().http_addr().expect("http endpoint bound");

    let (status, before) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(before.contains("# TYPE kadmq_messages_received_total counter"), "{before}");
    let received_before = metric(&before, "kadmq_messages_received_total");

    let (mut sub, _) = Raw::v311(broker.mqtt(), "http-sub", true).await;
    sub.subscribe_id(1, &[("m/#", QoS::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "http-pub", true).await;
    for id in 1..=3 {
        publisher.publish_with_id("m/t", b"x", QoS::AtLeastOnce, false, id).await;
    }
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        sub.complete(&p).await;
    }

    let (_, after) = get(http, "/metrics").await;
    assert_eq!(metric(&after, "kadmq_messages_received_total"), received_before + 3);
    assert!(metric(&after, "kadmq_messages_sent_total") >= 3);
    assert_eq!(metric(&after, "kadmq_connections"), 2);
    assert_eq!(metric(&after, "kadmq_subscriptions"), 1);

    let (status, json) = get(http, "/api/v1/broker").await;
    assert_eq!(status, 200);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["connections"], 2);
    assert_eq!(value["subscriptions"], 1);

    let (status, _) = get(http, "/nothing").await;
    assert_eq!(status, 404);
}

/// A node alone by configuration takes clients at once: ready, counted
/// as such, and a client connects.
#[tokio::test]
async fn a_single_node_is_ready_at_once() {
    let broker = TestBroker::start_with(|c| c.listeners.http = Some("127.0.0.1:0".parse().unwrap())).await;
    let http = broker.server.as_ref().unwrap().http_addr().expect("http endpoint bound");
    assert_eq!(get(http, "/health/ready").await, (200, "ready\n".to_string()));
    assert_eq!(get(http, "/health/live").await.0, 200);
    let (_, text) = get(http, "/metrics").await;
    assert_eq!(metric(&text, "kadmq_ready"), 1);
    assert_eq!(metric(&text, "kadmq_connections_refused_not_ready_total"), 0);
    let (client, _) = Raw::v311(broker.mqtt(), "ready-at-once", true).await;
    client.disconnect().await;
    let (_, json) = get(http, "/api/v1/broker").await;
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((value["ready"].clone(), value["connections_total"].clone()), (1.into(), 1.into()));
}

/// A node joining its fleet that joins nobody: the join timeout admits it.
#[tokio::test]
async fn the_join_timeout_admits_a_node_that_joins_nobody() {
    let keys = tempfile::tempdir().unwrap();
    let broker = joining_broker(keys.path(), 3_000).await;
    let http = broker.server.as_ref().unwrap().http_addr().unwrap();
    assert_eq!(get(http, "/health/ready").await.0, 503);
    wait_until_async(Duration::from_secs(15), "the join timeout to admit the node", || async {
        get(http, "/health/ready").await.0 == 200
    })
    .await;
    let (client, _) = Raw::v311(broker.mqtt(), "after-the-timeout", true).await;
    client.disconnect().await;
}
