//! The HTTP endpoint: Prometheus metrics and the JSON view move with traffic.

use crate::common::{Raw, TestBroker};
use kadmq::protocol::QoS;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain HTTP/1.1 GET; returns (status line, body).
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(crate::common::WAIT, stream.read_to_string(&mut response)).await.unwrap().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
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
    assert!(status.contains("200"), "{status}");
    assert!(before.contains("# TYPE kadmq_messages_received_total counter"), "{before}");
    let received_before = metric(&before, "kadmq_messages_received_total");

    let (mut sub, _) = Raw::connect(broker.mqtt(), "http-sub", true).await;
    sub.subscribe(1, &[("m/#", QoS::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::connect(broker.mqtt(), "http-pub", true).await;
    for id in 1..=3 {
        publisher.publish("m/t", b"x", QoS::AtLeastOnce, false, id).await;
    }
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        sub.ack(&p).await;
    }

    let (_, after) = get(http, "/metrics").await;
    assert_eq!(metric(&after, "kadmq_messages_received_total"), received_before + 3);
    assert!(metric(&after, "kadmq_messages_sent_total") >= 3);
    assert_eq!(metric(&after, "kadmq_connections"), 2);
    assert_eq!(metric(&after, "kadmq_subscriptions"), 1);

    let (status, json) = get(http, "/api/v1/broker").await;
    assert!(status.contains("200"));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["connections"], 2);
    assert_eq!(value["subscriptions"], 1);

    let (status, _) = get(http, "/nothing").await;
    assert!(status.contains("404"), "{status}");
}
