//! What outlives a connection, and for how long: a delayed will whose
//! expiry counts from publication, the will of a stalled client closed by
//! keep-alive, the messages a departing shared-subscription member held, a
//! session resumed with expiry 0, a retained message past its expiry.
//! Each of these failed once (a correctness review) before its fix.

use crate::common::{BrokerProcess, TestBroker};
use crate::support::raw::{connect_v311, publish_packet, will, Raw, Read};
use bytes::Bytes;
use kadmq::protocol::{
    Connect, LastWill, MessageProperties, Packet, PubAck, Publish, PublishProperties, QoS, Version, WillProperties,
};
use std::net::SocketAddr;
use std::time::Duration;

/// MQTT 5 §3.1.3.2.3: the will's Message Expiry Interval is "the
/// Publication Expiry Interval when the Server publishes the Will Message",
/// so it counts from publication, not from the disconnect. A will delayed
/// longer than its expiry must still be delivered.
#[tokio::test(start_paused = true)]
async fn delayed_will_expiry_counts_from_publication() {
    let broker = TestBroker::start().await;
    let (mut obs, _) = Raw::v5_connack(broker.mqtt(), "rwx-obs", |_| {}).await;
    obs.subscribe("rwx/#", QoS::AtLeastOnce).await;
    let (a, _) = Raw::v5_connack(broker.mqtt(), "rwx-a", |c| {
        c.properties.session_expiry_interval = Some(60);
        c.will = Some(LastWill {
            topic: "rwx/a".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(2),
                message: MessageProperties { message_expiry_interval: Some(1), ..Default::default() },
            },
        });
    })
    .await;
    drop(a);
    let got = obs.publish_within(Duration::from_secs(5)).await.expect("the delayed will is delivered");
    assert_eq!(&got.payload[..], b"gone");
    assert_eq!(got.properties.message.message_expiry_interval, Some(1));
}

/// A subscriber that stops reading (its socket buffers full) and stops
/// sending must still be disconnected by keep-alive, and its will published.
#[tokio::test(start_paused = true)]
async fn stalled_reader_is_closed_by_keep_alive_and_its_will_published() {
    let broker = TestBroker::start().await;
    let (mut obs, _) = Raw::v311(broker.mqtt(), "rst-obs", true).await;
    obs.subscribe_id(1, &[("rst/will", QoS::AtMostOnce)]).await;

    // The staller: a tiny receive buffer, keep-alive 1 s, a will.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.mqtt()).await.unwrap();
    let mut staller = Raw::over(stream, Version::V311);
    let mut connect = connect_v311("rst-s", true, 1);
    connect.will = Some(will("rst/will", b"stalled", QoS::AtMostOnce, false));
    staller.send(&Packet::Connect(connect)).await;
    assert!(matches!(staller.recv().await, Packet::ConnAck(_)));
    assert_eq!(staller.subscribe_id(1, &[("rst/data", QoS::AtMostOnce)]).await, vec![0]);

    // Fill every buffer between the broker and the staller, which never reads again.
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "rst-p", true).await;
    let payload = vec![7u8; 64 * 1024];
    for _ in 0..400 {
        publisher.send(&publish_packet("rst/data", &payload, QoS::AtMostOnce, false, None)).await;
    }
    publisher.ping().await;

    // Keep-alive 1 s: the broker must give up within 1.5 s (plus slack).
    match obs.read(Duration::from_secs(6)).await {
        Read::Packet(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"stalled"),
        other => panic!("will not published for a stalled client: {other:?}"),
    }
    drop(staller);
}

/// MQTT 5 §4.8.2: when a member of a shared subscription ends its session
/// before acknowledging a QoS 1 message, the broker SHOULD send that message
/// to another member. A clean (expiry 0) member's undelivered messages must
/// not vanish while other members are connected.
#[tokio::test]
async fn shared_message_held_by_a_departing_clean_member_goes_to_another() {
    let broker = TestBroker::start().await;
    let (mut a, _) = Raw::v5_connack(broker.mqtt(), "rsh-a", |_| {}).await;
    a.subscribe("$share/g/rsh/t", QoS::AtLeastOnce).await;
    let (mut b, _) = Raw::v5_connack(broker.mqtt(), "rsh-b", |_| {}).await;
    b.subscribe("$share/g/rsh/t", QoS::AtLeastOnce).await;
    let (mut p, _) = Raw::v5_connack(broker.mqtt(), "rsh-p", |_| {}).await;
    for i in 1..=4u16 {
        p.publish_with_id("rsh/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce, false, i).await;
    }
    // A receives its share and leaves without acknowledging any of it.
    let mut held = Vec::new();
    while let Some(m) = a.publish_within(Duration::from_millis(300)).await {
        held.push(m.payload.clone());
    }
    assert!(!held.is_empty(), "round robin gives A some of the messages");
    drop(a);
    let mut at_b = Vec::new();
    while let Some(m) = b.publish_within(Duration::from_millis(800)).await {
        b.send(&Packet::PubAck(PubAck::new(m.packet_id.unwrap()))).await;
        at_b.push(m.payload.clone());
    }
    for m in &held {
        assert!(at_b.contains(m), "{m:?} was held by A and never reached B (B got {at_b:?})");
    }
    assert_eq!(at_b.len(), 4, "B got {at_b:?}");
}

/// A persistent session resumed with Session Expiry 0 is no longer
/// persistent: its old stored record must not bring it back after a crash.
#[tokio::test]
async fn resuming_with_expiry_zero_forgets_the_stored_session() {
    let dir = tempfile::tempdir().unwrap();
    let process = BrokerProcess::spawn(dir.path());
    let addr: SocketAddr = ([127, 0, 0, 1], process.port).into();
    let persistent = |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    };
    let (first, ack) = Raw::v5_connack(addr, "expiry-drop", persistent).await;
    assert!(!ack.session_present);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (second, ack) = Raw::v5_connack(addr, "expiry-drop", |c| c.clean_start = false).await;
    assert!(ack.session_present, "resumed");
    // Still connected when the broker is killed.
    process.kill();
    drop(second);
    let process = BrokerProcess::spawn(dir.path());
    let addr: SocketAddr = ([127, 0, 0, 1], process.port).into();
    let (_third, ack) = Raw::v5_connack(addr, "expiry-drop", persistent).await;
    assert!(!ack.session_present, "an expiry-0 session must not survive a restart");
}

/// An expired retained message is not only skipped: a subscribe that finds
/// it clears it, in memory and in storage.
#[tokio::test(start_paused = true)]
async fn an_expired_retained_message_is_cleared_when_found() {
    let mut broker = TestBroker::start_with(|c| c.mqtt.sys_interval_secs = 0).await;
    let (mut publisher, _) = Raw::v5_connack(broker.mqtt(), "expiring-retainer", |_| {}).await;
    publisher
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "expiring/r".into(),
            packet_id: Some(1),
            payload: Bytes::from_static(b"soon gone"),
            properties: PublishProperties {
                message: MessageProperties { message_expiry_interval: Some(1), ..Default::default() },
                ..Default::default()
            },
        }))
        .await;
    assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    let count = |b: &TestBroker| b.server.as_ref().unwrap().broker.retained_count();
    assert_eq!(count(&broker), 1);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (mut subscriber, _) = Raw::v5_connack(broker.mqtt(), "expiring-reader", |_| {}).await;
    subscriber.subscribe("expiring/#", QoS::AtLeastOnce).await;
    assert!(subscriber.publish_within(Duration::from_millis(300)).await.is_none(), "expired: not delivered");
    assert_eq!(count(&broker), 0, "cleared from memory");
    let stored = broker.server.as_ref().unwrap().broker.storage.retained().unwrap();
    assert!(stored.is_empty(), "cleared from storage: {stored:?}");
    broker.restart(|c| c.mqtt.sys_interval_secs = 0).await;
    assert_eq!(count(&broker), 0);
}
