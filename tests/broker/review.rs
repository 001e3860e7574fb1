//! Regression tests from a correctness review: each one failed before its fix.

use crate::common::{self, TestBroker, WAIT};
use bytes::{Bytes, BytesMut};
use kadmq::protocol::{
    decode, encode, ConnAck, Connect, ConnectProperties, LastWill, MessageProperties, Packet, PubAck, Publish,
    PublishProperties, QoS, Subscribe, SubscribeFilter, SubscriptionOptions, Version, WillProperties, MAX_PACKET_SIZE,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A minimal MQTT 5 client on kadmq's codec.
struct V5 {
    stream: TcpStream,
    buf: BytesMut,
}

impl V5 {
    async fn connect(addr: SocketAddr, client_id: &str, tweak: impl FnOnce(&mut Connect)) -> (V5, ConnAck) {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = V5 { stream, buf: BytesMut::new() };
        let mut connect = Connect {
            version: Version::V5,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 30,
            username: None,
            password: None,
            will: None,
            properties: ConnectProperties::default(),
        };
        tweak(&mut connect);
        c.send(&Packet::Connect(connect)).await;
        match c.next(WAIT).await {
            Some(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, Version::V5, &mut out).unwrap();
        let _ = self.stream.write_all(&out).await;
    }

    /// The next packet within `wait`; None on silence or close.
    async fn next(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(p) = decode(&mut self.buf, Version::V5, MAX_PACKET_SIZE).unwrap() {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn publish_in(&mut self, wait: Duration) -> Option<Publish> {
        loop {
            match self.next(wait).await? {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter { filter: filter.into(), options: SubscriptionOptions::qos(qos) }],
            subscription_identifier: None,
            user_properties: vec![],
        }))
        .await;
        match self.next(WAIT).await {
            Some(Packet::SubAck(ack)) => assert_eq!(ack.reasons, vec![qos as u8]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish_qos1(&mut self, topic: &str, payload: &[u8], id: u16) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id),
            payload: Bytes::copy_from_slice(payload),
            properties: PublishProperties::default(),
        }))
        .await;
        match self.next(WAIT).await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// MQTT 5 §3.1.3.2.3: the will's Message Expiry Interval is "the
/// Publication Expiry Interval when the Server publishes the Will Message",
/// so it counts from publication, not from the disconnect. A will delayed
/// longer than its expiry must still be delivered.
#[tokio::test]
async fn delayed_will_expiry_counts_from_publication() {
    let broker = TestBroker::start().await;
    let (mut obs, _) = V5::connect(broker.mqtt(), "rwx-obs", |_| {}).await;
    obs.subscribe("rwx/#", QoS::AtLeastOnce).await;
    let (a, _) = V5::connect(broker.mqtt(), "rwx-a", |c| {
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
    let got = obs.publish_in(Duration::from_secs(5)).await.expect("the delayed will is delivered");
    assert_eq!(&got.payload[..], b"gone");
    assert_eq!(got.properties.message.message_expiry_interval, Some(1));
}

/// A subscriber that stops reading (its socket buffers full) and stops
/// sending must still be disconnected by keep-alive, and its will published.
#[tokio::test]
async fn stalled_reader_is_closed_by_keep_alive_and_its_will_published() {
    let broker = TestBroker::start().await;
    let (mut obs, _) = common::Raw::connect(broker.mqtt(), "rst-obs", true).await;
    obs.subscribe(1, &[("rst/will", QoS::AtMostOnce)]).await;

    // The staller: a tiny receive buffer, keep-alive 1 s, a will.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.mqtt()).await.unwrap();
    let mut staller = common::Raw { stream, buf: BytesMut::new() };
    let mut connect = common::connect_packet("rst-s", true, 1);
    connect.will = Some(common::will("rst/will", "stalled", QoS::AtMostOnce, false));
    staller.send(&Packet::Connect(connect)).await;
    assert!(matches!(staller.recv().await, Packet::ConnAck(_)));
    assert_eq!(staller.subscribe(1, &[("rst/data", QoS::AtMostOnce)]).await, vec![0]);

    // Fill every buffer between the broker and the staller, which never reads again.
    let (mut publisher, _) = common::Raw::connect(broker.mqtt(), "rst-p", true).await;
    let payload = vec![7u8; 64 * 1024];
    for _ in 0..400 {
        publisher.send(&common::publish_packet("rst/data", &payload, QoS::AtMostOnce, false, None)).await;
    }
    publisher.ping().await;

    // Keep-alive 1 s: the broker must give up within 1.5 s (plus slack).
    match obs.read(Duration::from_secs(6)).await {
        common::Read::Packet(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"stalled"),
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
    let (mut a, _) = V5::connect(broker.mqtt(), "rsh-a", |_| {}).await;
    a.subscribe("$share/g/rsh/t", QoS::AtLeastOnce).await;
    let (mut b, _) = V5::connect(broker.mqtt(), "rsh-b", |_| {}).await;
    b.subscribe("$share/g/rsh/t", QoS::AtLeastOnce).await;
    let (mut p, _) = V5::connect(broker.mqtt(), "rsh-p", |_| {}).await;
    for i in 1..=4u16 {
        p.publish_qos1("rsh/t", format!("m{i}").as_bytes(), i).await;
    }
    // A receives its share and leaves without acknowledging any of it.
    let mut held = Vec::new();
    while let Some(m) = a.publish_in(Duration::from_millis(300)).await {
        held.push(m.payload.clone());
    }
    assert!(!held.is_empty(), "round robin gives A some of the messages");
    drop(a);
    let mut at_b = Vec::new();
    while let Some(m) = b.publish_in(Duration::from_millis(800)).await {
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
    let mut process = common::BrokerProcess::spawn(dir.path());
    let addr: SocketAddr = ([127, 0, 0, 1], process.port).into();
    let persistent = |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    };
    let (first, ack) = V5::connect(addr, "expiry-drop", persistent).await;
    assert!(!ack.session_present);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (second, ack) = V5::connect(addr, "expiry-drop", |c| c.clean_start = false).await;
    assert!(ack.session_present, "resumed");
    // Still connected when the broker is killed.
    process.kill();
    drop(second);
    let process = common::BrokerProcess::spawn(dir.path());
    let addr: SocketAddr = ([127, 0, 0, 1], process.port).into();
    let (_third, ack) = V5::connect(addr, "expiry-drop", persistent).await;
    assert!(!ack.session_present, "an expiry-0 session must not survive a restart");
}

/// An expired retained message is not only skipped: a subscribe that finds
/// it clears it, in memory and in storage.
#[tokio::test]
async fn an_expired_retained_message_is_cleared_when_found() {
    let mut broker = TestBroker::start_with(|c| c.mqtt.sys_interval_secs = 0).await;
    let (mut publisher, _) = V5::connect(broker.mqtt(), "expiring-retainer", |_| {}).await;
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
    assert!(matches!(publisher.next(WAIT).await, Some(Packet::PubAck(_))));
    let count = |b: &TestBroker| b.server.as_ref().unwrap().broker.retained_count();
    assert_eq!(count(&broker), 1);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (mut subscriber, _) = V5::connect(broker.mqtt(), "expiring-reader", |_| {}).await;
    subscriber.subscribe("expiring/#", QoS::AtLeastOnce).await;
    assert!(subscriber.publish_in(Duration::from_millis(300)).await.is_none(), "expired: not delivered");
    assert_eq!(count(&broker), 0, "cleared from memory");
    let stored = broker.server.as_ref().unwrap().broker.storage.retained().unwrap();
    assert!(stored.is_empty(), "cleared from storage: {stored:?}");
    broker.restart(|c| c.mqtt.sys_interval_secs = 0).await;
    assert_eq!(count(&broker), 0);
}
