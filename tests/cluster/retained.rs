//! Retained messages in a fleet: set on one node, seen by new subscribers
//! on every node, cleared everywhere, and handed to a node that joins later.

use crate::common::{wait_for_members, Lab, Node};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::time::timeout;

async fn connect(node: &Node, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", node.mqtt_port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 100);
    timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.expect("connect") {
                return;
            }
        }
    })
    .await
    .expect("CONNACK within 5 s");
    (client, events)
}

/// Publishes a retained message (empty payload clears) and waits for its PUBACK.
async fn publish_retained(node: &Node, topic: &str, payload: &[u8]) {
    let (client, mut events) = connect(node, &format!("pub-{}", node.name)).await;
    client.publish(topic, QoS::AtLeastOnce, true, payload.to_vec()).await.unwrap();
    timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.expect("publish") {
                return;
            }
        }
    })
    .await
    .expect("PUBACK within 5 s");
    client.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(1), events.poll()).await;
}

/// Subscribes to `filter` on `node` and returns the retained payloads that
/// arrive within `quiet` after the SUBACK.
async fn retained_on(node: &Node, filter: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let (client, mut events) = connect(node, &format!("sub-{}-{}", node.name, filter.len())).await;
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    let _ = timeout(quiet, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.retain => got.push((p.topic.clone(), p.payload.to_vec())),
                Ok(_) => {}
                Err(err) => panic!("subscriber on {}: {err}", node.name),
            }
        }
    })
    .await;
    client.disconnect().await.unwrap();
    got.sort();
    got
}

/// Waits until a new subscriber on `node` sees exactly `want` for `filter`.
async fn wait_retained(node: &Node, filter: &str, want: &[(&str, &[u8])]) {
    let want: Vec<(String, Vec<u8>)> = want.iter().map(|(t, p)| (t.to_string(), p.to_vec())).collect();
    let mut last = Vec::new();
    for _ in 0..40 {
        last = retained_on(node, filter, Duration::from_millis(500)).await;
        if last == want {
            return;
        }
    }
    panic!("{} never showed retained {want:?} for {filter}; last saw {last:?}", node.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_every_node_and_a_late_joiner() {
    let lab = Lab::new();
    let n1 = lab.node("r1", None);
    let boot = n1.multiaddr();
    let n2 = lab.node("r2", Some(&boot));
    let n3 = lab.node("r3", Some(&boot));
    wait_for_members(&[&n1, &n2, &n3], &["r1", "r2", "r3"]);

    publish_retained(&n1, "status/a", b"on").await;
    publish_retained(&n2, "status/b", b"off").await;
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "status/+", &[("status/a", b"on"), ("status/b", b"off")]).await;
    }

    // Cleared on another node than the one that set it: gone everywhere.
    publish_retained(&n3, "status/a", b"").await;
    for node in [&n1, &n2, &n3] {
        wait_retained(node, "status/+", &[("status/b", b"off")]).await;
    }

    // A node that joins later gets the retained messages set before it came.
    let n4 = lab.node("r4", Some(&boot));
    wait_for_members(&[&n1, &n4], &["r1", "r2", "r3", "r4"]);
    wait_retained(&n4, "status/#", &[("status/b", b"off")]).await;
}
