//! QoS 1 forwards acknowledged to the publisher survive the destination
//! node dying: they wait in the publishing node's persisted outbox and
//! reach the destination's persistent session when it comes back. A full
//! outbox refuses new QoS 1 publishes (0x97) instead of acknowledging what
//! it cannot keep; a QoS 2 message resent after a restart of either node is
//! delivered once. A forward its destinations acknowledge within
//! `cluster.forward_ack_window_ms` is never written to disk.

use crate::support::lab::{wait_for_members, Lab, SETTLE};
use crate::support::mqtt::{Client, Client5};
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

/// Routing tests, not failure detection: a starved debug node must not be
/// declared dead under them.
const CALM: [&str; 2] = ["--dead-timeout", "30"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_qos1_publishes_with_quota_exceeded() {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::Event as E5;
    let lab = Lab::new();
    let flags = [CALM[0], CALM[1], "--outbox-max-mib", "1"];
    let [a, b] = lab.fleet(["f1", "f2"], &flags);
    let (mut subscriber, _) = Client5::connect(Client5::options("sub", b.mqtt_port)).await;
    subscriber.subscribe(vec![Filter::new("full/t", Q5::AtLeastOnce)], None).await;
    // A subscriber on the publishing node: publishes to it need no outbox.
    let (mut near, _) = Client5::connect(Client5::options("near", a.mqtt_port)).await;
    near.subscribe(vec![Filter::new("near/t", Q5::AtLeastOnce)], None).await;
    // Past the hand-off warm-up after the fleet formed (3 s), a node reads
    // its own copy of the shards it owns: what stays here is known here.
    tokio::time::sleep(Duration::from_secs(4)).await;
    b.mute_acks("f1");
    let (mut publisher, _) = Client5::connect(Client5::options("pub", a.mqtt_port)).await;
    // 8 KiB a message (and some overhead): the 1 MiB bound is reached
    // after about 127.
    let payload = vec![b'x'; 8 << 10];
    let puback = |e: &E5| match e {
        E5::Incoming(P5::PubAck(ack)) => Some(ack.reason),
        _ => None,
    };
    let mut refused_at = None;
    for i in 0..400 {
        publisher.client.publish("full/t", Q5::AtLeastOnce, false, payload.clone()).await.unwrap();
        let reason = publisher.wait_for("PUBACK", puback).await;
        if reason == rumqttc::v5::mqttbytes::v5::PubAckReason::QuotaExceeded {
            refused_at = Some(i);
            break;
        }
    }
    let refused_at = refused_at.expect("a publish past the bound is refused");
    assert!((120..=130).contains(&refused_at), "refused after about 1 MiB: {refused_at}");
    assert!(a.metric("kadmq_cluster_publishes_refused_total") >= 1);
    assert!(a.log().matches("cluster outbox full").count() == 1, "logged once");
    // Full, the outbox still lets through what stays on this node.
    publisher.client.publish("near/t", Q5::AtLeastOnce, false, "local").await.unwrap();
    let reason = publisher.wait_for("PUBACK", puback).await;
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success, "a local-only publish is taken");
    let near_publish = |e: &E5| match e {
        E5::Incoming(P5::Publish(p)) => Some(p.payload.clone()),
        _ => None,
    };
    assert_eq!(&near.wait_for("the local publish", near_publish).await[..], b"local");
    // Acknowledged again: the outbox drains and publishes are taken.
    b.cut(None);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the outbox to drain", || a.metric("kadmq_cluster_outbox_bytes") == 0)
    });
    publisher.client.publish("full/t", Q5::AtLeastOnce, false, "again").await.unwrap();
    let reason = publisher.wait_for("PUBACK", puback).await;
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    // Nothing acknowledged was lost: the subscriber has every taken one.
    let got = subscriber.collect("the taken messages", refused_at + 1, Duration::from_secs(30), |e| match e {
        E5::Incoming(P5::Publish(p)) => Some(p.payload.len()),
        _ => None,
    });
    assert_eq!(got.await.len(), refused_at + 1);
    let more =
        subscriber.next_within(Duration::from_secs(2), |e| matches!(e, E5::Incoming(P5::Publish(_))).then_some(()));
    assert_eq!(more.await, None, "the refused message was not published after all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_message_resent_after_either_node_restarts_is_delivered_once() {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::Event as E5;
    let lab = Lab::new();
    let [mut a, mut b] = lab.fleet(["e1", "e2"], &CALM);
    let (mut subscriber, _) = Client5::connect(Client5::persistent("keeper", b.mqtt_port, 600)).await;
    subscriber.subscribe(vec![Filter::new("once/t", Q5::ExactlyOnce)], None).await;
    let publish = async |node: &crate::support::lab::Node, payload: &str| {
        let (mut publisher, _) = Client5::connect(Client5::options("pub", node.mqtt_port)).await;
        publisher.client.publish("once/t", Q5::ExactlyOnce, false, payload.to_string()).await.unwrap();
        publisher.wait_for("PUBCOMP", |e| matches!(e, E5::Incoming(P5::PubComp(_))).then_some(())).await;
    };
    let next = |e: &E5| match e {
        E5::Incoming(P5::Publish(p)) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
        _ => None,
    };

    // The receiver restarts: b delivers, but its acknowledgement never
    // reaches a, which resends to the new b.
    b.mute_acks("e1");
    publish(&a, "one").await;
    assert_eq!(subscriber.wait_for("the first", next).await, "one");
    // The client's own QoS 2 flow with b completes (else b rightly sends
    // it again, as a retransmission of its session).
    let pubcomp = |e: &E5| matches!(e, E5::Outgoing(rumqttc::Outgoing::PubComp(_))).then_some(());
    subscriber.wait_for("our PUBCOMP", pubcomp).await;
    subscriber.client.disconnect().await.unwrap();
    let _ = subscriber.next_within(Duration::from_secs(1), |_| None::<()>).await;
    drop(subscriber);
    b.kill();
    b.start();
    wait_for_members(&[&a, &b], &["e1", "e2"]);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "a's resend to be acknowledged", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
    assert!(b.metric("kadmq_cluster_qos2_duplicates_total") >= 1, "the resend came and was recognised");
    let (mut subscriber, ack) = Client5::connect(Client5::persistent("keeper", b.mqtt_port, 600)).await;
    assert!(ack.session_present);
    assert_eq!(subscriber.next_within(Duration::from_secs(3), next).await, None, "not delivered again");

    // The sender restarts: its outbox, restored, resends under a new epoch.
    b.mute_acks("e1");
    publish(&a, "two").await;
    assert_eq!(subscriber.wait_for("the second", next).await, "two");
    subscriber.wait_for("our PUBCOMP", pubcomp).await;
    let before = b.metric("kadmq_cluster_qos2_duplicates_total");
    a.kill();
    a.start();
    wait_for_members(&[&a, &b], &["e1", "e2"]);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the resend after a's restart", || b.metric("kadmq_cluster_qos2_duplicates_total") > before)
    });
    assert_eq!(subscriber.next_within(Duration::from_secs(3), next).await, None, "not delivered again");
    b.cut(None);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "a's outbox to empty", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_acknowledged_within_the_window_is_never_written() {
    const N: usize = 100;
    let lab = Lab::new();
    // A generous window: on a loaded machine an acknowledgement still
    // comes well within it.
    let flags = [CALM[0], CALM[1], "--forward-ack-window-ms", "1000"];
    let [a, b] = lab.fleet(["w1", "w2"], &flags);
    let (mut subscriber, _) = Client::connect(options("sub", b.mqtt_port, true)).await;
    subscriber.subscribe("spare/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Client::connect(options("pub", a.mqtt_port, true)).await;
    // A first publish may wait for a route lookup (it and those behind it
    // are then written at once, unrouted): measure after it.
    publisher.publish("spare/t", QoS::AtLeastOnce, false, "warm-up").await;
    subscriber.next_publish().await;
    let pubacks = |e: &Event| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(());
    publisher.collect("the warm-up's PUBACK", 1, Duration::from_secs(30), pubacks).await;
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the warm-up acknowledged", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
    let written = a.metric("kadmq_cluster_outbox_written_total");
    let spared = a.metric("kadmq_cluster_outbox_spared_total");
    for i in 0..N {
        publisher.publish("spare/t", QoS::AtLeastOnce, false, format!("m{i}")).await;
    }
    publisher.collect("PUBACKs", N, Duration::from_secs(30), pubacks).await;
    let publishes = |e: &Event| matches!(e, Event::Incoming(Packet::Publish(_))).then_some(());
    subscriber.collect("the messages", N, Duration::from_secs(30), publishes).await;
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the outbox to empty", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
    assert_eq!(a.metric("kadmq_cluster_outbox_written_total"), written, "every one acknowledged in time");
    assert_eq!(a.metric("kadmq_cluster_outbox_spared_total"), spared + N as u64, "never written");

    // Unacknowledged, a forward is written once the window passed, and
    // only then is the publisher's PUBACK sent.
    b.mute_acks("w1");
    publisher.publish("spare/t", QoS::AtLeastOnce, false, "late").await;
    publisher.collect("the PUBACK", 1, Duration::from_secs(30), pubacks).await;
    assert_eq!(a.metric("kadmq_cluster_outbox_written_total"), written + 1, "written before its PUBACK");
    b.cut(None);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the outbox to drain", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
}

/// While a PUBACK waits for its forward's acknowledgement, the publisher's
/// connection is read and routed on; the PUBACKs still go in the order of
/// their PUBLISHes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_is_read_on_while_its_acknowledgements_wait_for_the_fleet() {
    let lab = Lab::new();
    // Long enough that "the next publish was routed before the window
    // ended" cannot be a race on a loaded machine.
    let flags = [CALM[0], CALM[1], "--forward-ack-window-ms", "5000"];
    let [a, b] = lab.fleet(["p1", "p2"], &flags);
    let (mut remote, _) = Client::connect(options("remote", b.mqtt_port, true)).await;
    remote.subscribe("far/#", QoS::AtLeastOnce).await;
    let (mut near, _) = Client::connect(options("near", a.mqtt_port, true)).await;
    near.subscribe("near/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Client::connect(options("pub", a.mqtt_port, true)).await;
    let pubacks = |e: &Event| match e {
        Event::Incoming(Packet::PubAck(ack)) => Some(ack.pkid),
        _ => None,
    };
    // Warm-ups: each topic's route is known, nothing left in the outbox.
    publisher.publish("far/t", QoS::AtLeastOnce, false, "warm-up").await;
    remote.next_publish().await;
    publisher.publish("near/t", QoS::AtLeastOnce, false, "warm-up").await;
    near.next_publish().await;
    publisher.collect("the warm-ups' PUBACKs", 2, Duration::from_secs(30), pubacks).await;
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the warm-up acknowledged", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
    let written = a.metric("kadmq_cluster_outbox_written_total");

    // The forward to p2 is not acknowledged: its PUBACK waits the window.
    b.mute_acks("p1");
    publisher.publish("far/t", QoS::AtLeastOnce, false, "held").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.publish("near/t", QoS::AtLeastOnce, false, "behind").await;
    let behind = near.next_publish().await;
    assert_eq!(&behind.payload[..], b"behind");
    // Had the connection stopped reading until the window ended, the held
    // forward would have been written before "behind" was routed.
    assert_eq!(a.metric("kadmq_cluster_outbox_written_total"), written, "routed while the first PUBACK waited");
    let acks = publisher.collect("both PUBACKs", 2, Duration::from_secs(30), pubacks).await;
    assert!(acks[0] < acks[1], "PUBACKs in the order of their PUBLISHes: {acks:?}");
    assert_eq!(a.metric("kadmq_cluster_outbox_written_total"), written + 1, "written at the window's end");
    b.cut(None);
    tokio::task::block_in_place(|| {
        wait_until(SETTLE, "the outbox to drain", || a.metric("kadmq_cluster_outbox_messages") == 0)
    });
}
