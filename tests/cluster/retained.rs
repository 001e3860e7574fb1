//! Retained messages in a fleet: set on one node, seen by new subscribers
//! on every node, cleared everywhere, and handed to a node that joins later.

use crate::support::lab::{wait_for_members, Lab, Node};
use crate::support::mqtt::Client;
use rumqttc::{Event, Packet, QoS};
use std::time::Duration;

/// Publishes a retained message (empty payload clears) and waits for its PUBACK.
async fn publish_retained(node: &Node, topic: &str, payload: &[u8]) {
    let (mut client, _) = Client::connect(Client::options(&format!("pub-{}", node.name), node.mqtt_port)).await;
    client.publish(topic, QoS::AtLeastOnce, true, payload.to_vec()).await;
    client.wait_for("PUBACK", |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await;
    client.client.disconnect().await.unwrap();
    let _ = client.next_within(Duration::from_secs(1), |_| None::<()>).await;
}

/// Subscribes to `filter` on `node` and returns the retained payloads that
/// arrive within `quiet` after the SUBSCRIBE.
async fn retained_on(node: &Node, filter: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let id = format!("sub-{}-{}", node.name, filter.len());
    let (mut client, _) = Client::connect(Client::options(&id, node.mqtt_port)).await;
    client.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut got: Vec<(String, Vec<u8>)> = client
        .publishes_within(quiet)
        .await
        .into_iter()
        .filter(|p| p.retain)
        .map(|p| (p.topic.clone(), p.payload.to_vec()))
        .collect();
    if let Some(err) = client.ended() {
        panic!("subscriber on {}: {err}", node.name);
    }
    client.client.disconnect().await.unwrap();
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
    let [n1, n2, n3] = lab.fleet(["r1", "r2", "r3"], &[]);
    let boot = n1.multiaddr();

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
