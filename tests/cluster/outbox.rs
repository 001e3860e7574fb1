//! QoS 1 forwards acknowledged to the publisher survive the destination
//! node dying: they wait in the publishing node's persisted outbox and
//! reach the destination's persistent session when it comes back.

use crate::support::lab::{wait_for_members, Lab, SETTLE};
use crate::support::mqtt::Client;
use crate::support::wait::wait_until;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use std::time::Duration;

const MESSAGES: u32 = 50;

fn options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut options = Client::options(id, port);
    options.set_clean_session(clean);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_forwards_survive_the_destination_node_dying() {
    let lab = Lab::new();
    let a = lab.node("o1", None);
    let mut b = lab.node("o2", Some(&a.multiaddr()));
    wait_for_members(&[&a, &b], &["o1", "o2"]);

    // A persistent session on B subscribes, then goes offline.
    let (mut keeper, _) = Client::connect(options("keeper", b.mqtt_port, false)).await;
    keeper.subscribe("keep/#", QoS::AtLeastOnce).await;

    // The route is in place (A knows B's subscription): a first message goes through.
    wait_until(SETTLE, "A to route keep/x to o2", || {
        a.json("/api/v1/routes?topic=keep/x")["destinations"].as_array().is_some_and(|d| d.contains(&"o2".into()))
    });
    let (mut publisher, _) = Client::connect(options("publisher", a.mqtt_port, true)).await;
    publisher.publish("keep/warmup", QoS::AtLeastOnce, false, "warmup").await;
    keeper.next_publish().await;
    keeper.client.disconnect().await.unwrap();
    keeper
        .wait_for("DISCONNECT sent", |e| matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(()))
        .await;
    drop(keeper);

    // B dies; A does not know yet (dead after 8 s of silence) and keeps
    // routing to it: every PUBACK means the message is in A's outbox.
    b.kill();
    for i in 0..MESSAGES {
        publisher.publish("keep/x", QoS::AtLeastOnce, false, format!("m{i}")).await;
    }
    let pubacks = |e: &Event| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(());
    publisher.collect("PUBACKs", MESSAGES as usize + 1, Duration::from_secs(10), pubacks).await;
    // (Right after the cluster formed A may first ask B, which it still
    // takes for an owner of longer standing, for the route: those
    // publishes are persisted unrouted until the lookup times out and A
    // routes them from its own copy.)
    wait_until(SETTLE, "A to hold the unacknowledged forwards", || {
        a.metric("kadmq_cluster_outbox_messages") >= MESSAGES as u64
    });

    // Once A takes B for dead its link to B and whatever was queued on it
    // are gone: only the outbox still has the messages.
    wait_until(SETTLE, "A to declare B dead", || a.metric("kadmq_cluster_members") == 1);

    // B comes back with its data dir: A resends, B acknowledges.
    b.start();
    wait_for_members(&[&a, &b], &["o1", "o2"]);
    wait_until(SETTLE, "A's outbox to drain", || a.metric("kadmq_cluster_outbox_messages") == 0);

    // The persistent session gets every message, in order, once.
    let (mut keeper, _) = Client::connect(options("keeper", b.mqtt_port, false)).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < MESSAGES as usize {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(p) = keeper
            .next_within(left, |e| match e {
                Event::Incoming(Packet::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await
        else {
            break;
        };
        // The warm-up may come again: its PUBACK can be cut off by the disconnect.
        if &p.payload[..] != b"warmup" {
            got.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every acknowledged message reaches the restarted node's session");
    let extra = keeper.publishes_within(Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "no duplicate after the last message: {extra:?}");
    assert!(a.metric("kadmq_cluster_outbox_resent_total") >= MESSAGES as u64, "they arrived by resends");
}
