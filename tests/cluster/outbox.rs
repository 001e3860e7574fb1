//! QoS 1 forwards acknowledged to the publisher survive the destination
//! node dying: they wait in the publishing node's persisted outbox and
//! reach the destination's persistent session when it comes back.

use crate::common::{wait_for_members, wait_until, Lab, SETTLE};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::timeout;

const MESSAGES: u32 = 50;

fn options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean);
    options
}

/// Runs a client's event loop in a task; its events come out of the channel.
fn spawn_loop(mut events: EventLoop) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits until `want` says an event is the one awaited (bounded: 10 s).
async fn poll_until(events: &mut mpsc::UnboundedReceiver<Event>, what: &str, mut want: impl FnMut(&Event) -> bool) {
    timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.unwrap_or_else(|| panic!("{what}: connection ended"));
            if want(&event) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_forwards_survive_the_destination_node_dying() {
    let lab = Lab::new();
    let a = lab.node("o1", None);
    let mut b = lab.node("o2", Some(&a.multiaddr()));
    wait_for_members(&[&a, &b], &["o1", "o2"]);

    // A persistent session on B subscribes, then goes offline.
    let (keeper, keeper_loop) = AsyncClient::new(options("keeper", b.mqtt_port, false), 100);
    let mut keeper_events = spawn_loop(keeper_loop);
    keeper.subscribe("keep/#", QoS::AtLeastOnce).await.unwrap();
    poll_until(&mut keeper_events, "SUBACK", |e| matches!(e, Event::Incoming(Packet::SubAck(_)))).await;

    // The route is in place (A knows B's subscription): a first message goes through.
    wait_until(SETTLE, "A to route keep/x to o2", || {
        a.get_json("/api/v1/routes?topic=keep/x")["destinations"].as_array().is_some_and(|d| d.contains(&"o2".into()))
    });
    let (publisher, publisher_loop) = AsyncClient::new(options("publisher", a.mqtt_port, true), 200);
    let mut publisher_events = spawn_loop(publisher_loop);
    publisher.publish("keep/warmup", QoS::AtLeastOnce, false, "warmup").await.unwrap();
    poll_until(&mut keeper_events, "warm-up message", |e| matches!(e, Event::Incoming(Packet::Publish(_)))).await;
    keeper.disconnect().await.unwrap();
    poll_until(&mut keeper_events, "DISCONNECT sent", |e| matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)))
        .await;
    drop(keeper_events);

    // B dies; A does not know yet (dead after 8 s of silence) and keeps
    // routing to it: every PUBACK means the message is in A's outbox.
    b.kill();
    for i in 0..MESSAGES {
        publisher.publish("keep/x", QoS::AtLeastOnce, false, format!("m{i}")).await.unwrap();
    }
    let mut acked = 0;
    poll_until(&mut publisher_events, "PUBACKs", |e| {
        if let Event::Incoming(Packet::PubAck(_)) = e {
            acked += 1;
        }
        acked == MESSAGES + 1
    })
    .await;
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
    let (keeper, keeper_loop) = AsyncClient::new(options("keeper", b.mqtt_port, false), 100);
    let mut keeper_events = spawn_loop(keeper_loop);
    let mut got = Vec::new();
    let _ = timeout(Duration::from_secs(10), async {
        while got.len() < MESSAGES as usize {
            if let Some(Event::Incoming(Packet::Publish(p))) = keeper_events.recv().await {
                // The warm-up may come again: its PUBACK can be cut off by the disconnect.
                if &p.payload[..] != b"warmup" {
                    got.push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
            }
        }
    })
    .await;
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every acknowledged message reaches the restarted node's session");
    let extra = timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::Incoming(Packet::Publish(p))) = keeper_events.recv().await {
                return p;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "no duplicate after the last message: {extra:?}");
    assert!(a.metric("kadmq_cluster_outbox_resent_total") >= MESSAGES as u64, "they arrived by resends");
    drop(keeper);
}
