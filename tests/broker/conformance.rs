//! Protocol conformance against one node (issue 8, "Protocol gaps"): raw
//! MQTT 5 clients on kadmq's codec, acknowledgements written as literal
//! bytes where their exact form matters, every reason code checked.

use crate::common::TestBroker;
use crate::support::raw::{publish_packet, Raw, Read, WAIT};
use bytes::{Bytes, BytesMut};
use kadmq::protocol::{
    encode, ConnectReason, Disconnect, DisconnectReason, Packet, PubAck, QoS, SubAck, SubscriptionOptions, Version,
};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// A two-byte-body acknowledgement (no reason code, no properties), as
/// MQTT 5 §3.4.2.1 allows for reason 0x00.
fn short_ack(first_byte: u8, packet_id: u16) -> [u8; 4] {
    let id = packet_id.to_be_bytes();
    [first_byte, 0x02, id[0], id[1]]
}

/// What only these tests need of the shared raw MQTT 5 client.
impl Raw {
    /// SUBSCRIBE to one filter with packet id `packet_id`; the SUBACK must grant its QoS.
    async fn subscribe_one(&mut self, packet_id: u16, filter: &str, options: SubscriptionOptions) -> SubAck {
        let ack = self.subscribe_as(packet_id, &[(filter, options)], None).await;
        assert_eq!(ack.reasons, vec![options.qos as u8], "SUBACK {ack:?}");
        ack
    }

    /// Sends a QoS 2 PUBLISH and returns the PUBREC, which must come next.
    async fn publish_qos2(&mut self, topic: &str, packet_id: u16, payload: &[u8]) -> PubAck {
        self.send(&publish_packet(topic, payload, QoS::ExactlyOnce, false, Some(packet_id))).await;
        match self.recv().await {
            Packet::PubRec(rec) => {
                assert_eq!(rec.packet_id, packet_id);
                rec
            }
            other => panic!("expected PUBREC for {packet_id}, got {other:?}"),
        }
    }

    /// Completes a QoS 2 PUBLISH as the publisher: PUBREL (short form), PUBCOMP.
    async fn release(&mut self, packet_id: u16) {
        self.send_bytes(&short_ack(0x62, packet_id)).await;
        match self.recv().await {
            Packet::PubComp(comp) => assert_eq!((comp.packet_id, comp.reason), (packet_id, 0)),
            other => panic!("expected PUBCOMP for {packet_id}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. QoS 2 with a subscriber that acknowledges with minimal packets
// ---------------------------------------------------------------------------

/// MQTT-2.2.1-4 / MQTT-4.3.3-4: the publisher gets its PUBREC whatever the
/// subscriber does; a subscriber acknowledging with two-byte bodies
/// completes both flows.
#[tokio::test]
async fn qos2_with_a_subscriber_sending_short_acks() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::v5(broker.mqtt(), "short-sub", |_| {}).await;
    sub.subscribe_one(1, "conf/short", SubscriptionOptions::qos(QoS::ExactlyOnce)).await;
    let mut publisher = Raw::v5(broker.mqtt(), "short-pub", |_| {}).await;

    for round in 0..3u16 {
        let payload = format!("m{round}");
        let rec = publisher.publish_qos2("conf/short", 10 + round, payload.as_bytes()).await;
        assert_eq!(rec.reason, 0, "PUBREC {rec:?}");
        publisher.release(10 + round).await;

        let p = sub.recv_publish().await;
        assert_eq!((p.qos, &p.payload[..]), (QoS::ExactlyOnce, payload.as_bytes()));
        let id = p.packet_id.expect("QoS 2 id");
        sub.send_bytes(&short_ack(0x50, id)).await; // PUBREC, two-byte body
        match sub.recv().await {
            Packet::PubRel(rel) => assert_eq!((rel.packet_id, rel.reason), (id, 0)),
            other => panic!("expected PUBREL, got {other:?}"),
        }
        sub.send_bytes(&short_ack(0x70, id)).await; // PUBCOMP, two-byte body
    }
    // QoS 1 to the same subscriber, acknowledged with a two-byte PUBACK.
    sub.subscribe_one(2, "conf/short1", SubscriptionOptions::qos(QoS::AtLeastOnce)).await;
    for round in 0..3u16 {
        publisher.send(&publish_packet("conf/short1", b"q1", QoS::AtLeastOnce, false, Some(20 + round))).await;
        match publisher.recv().await {
            Packet::PubAck(ack) => assert_eq!((ack.packet_id, ack.reason), (20 + round, 0)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        let p = sub.recv_publish().await;
        sub.send_bytes(&short_ack(0x40, p.packet_id.expect("QoS 1 id"))).await;
    }
    sub.expect_silence().await;
}

/// A PUBREC with a reason >= 0x80 ends the QoS 2 flow (MQTT 5 §4.3.3): no
/// PUBREL, the inflight slot is free, and further messages flow.
#[tokio::test]
async fn qos2_pubrec_with_an_error_reason_ends_the_flow_and_frees_the_slot() {
    let broker = TestBroker::start().await;
    let (mut sub, ack) = Raw::v5_connack(broker.mqtt(), "rec80-sub", |c| {
        c.properties.receive_maximum = Some(1);
    })
    .await;
    assert_eq!(ack.code, ConnectReason::Success);
    sub.subscribe_one(1, "conf/rec80", SubscriptionOptions::qos(QoS::ExactlyOnce)).await;
    let mut publisher = Raw::v5(broker.mqtt(), "rec80-pub", |_| {}).await;

    for round in 0..4u16 {
        let payload = format!("m{round}");
        let rec = publisher.publish_qos2("conf/rec80", 100 + round, payload.as_bytes()).await;
        assert_eq!(rec.reason, 0, "PUBREC {rec:?}");
        publisher.release(100 + round).await;

        // Receive Maximum 1: this one only comes if the previous flow ended.
        let p = sub.recv_publish().await;
        assert_eq!(&p.payload[..], payload.as_bytes(), "round {round}");
        let id = p.packet_id.expect("QoS 2 id").to_be_bytes();
        sub.send_bytes(&[0x50, 0x03, id[0], id[1], 0x80]).await; // PUBREC 0x80, no properties
        sub.expect_silence().await; // no PUBREL
    }
    sub.send_bytes(&[0xC0, 0x00]).await;
    assert!(matches!(sub.recv().await, Packet::PingResp));
}

/// The same flows when one client is both publisher and subscriber: its
/// PUBREC for its own PUBLISH comes first, then the delivery.
#[tokio::test]
async fn qos2_to_itself_with_short_acks_and_pubrec_0x80() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "self-qos2", |_| {}).await;
    c.subscribe_one(1, "conf/self", SubscriptionOptions::qos(QoS::ExactlyOnce)).await;
    for round in 0..4u16 {
        let rec = c.publish_qos2("conf/self", 1, b"x").await;
        assert_eq!(rec.reason, 0, "round {round}: {rec:?}");
        let p = c.recv_publish().await;
        let id = p.packet_id.expect("QoS 2 id");
        c.release(1).await;
        if round % 2 == 0 {
            c.send_bytes(&short_ack(0x50, id)).await;
            match c.recv().await {
                Packet::PubRel(rel) => assert_eq!(rel.packet_id, id),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            c.send_bytes(&short_ack(0x70, id)).await;
        } else {
            let id = id.to_be_bytes();
            c.send_bytes(&[0x50, 0x04, id[0], id[1], 0x80, 0x00]).await; // PUBREC 0x80, empty properties
        }
    }
    c.expect_silence().await;
}

// ---------------------------------------------------------------------------
// 2. Unsupported protocol level
// ---------------------------------------------------------------------------

/// A CONNECT body with protocol `name` and `level`, clean start, keep-alive
/// 30, client id "x" (and for level 5 an empty property section).
fn connect_bytes(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0x02, 0, 30]);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&[0, 1, b'x']);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// MQTT-3.1.2-2: CONNACK "unacceptable protocol level" and close. kadmq
/// answers an unknown level in the 3.1.1 layout (return code 0x01), which
/// every client version parses; the connection is closed cleanly (FIN, not
/// a reset that could destroy the CONNACK), even with bytes pipelined after
/// the CONNECT.
#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01_and_close() {
    let broker = TestBroker::start().await;
    let cases: [(&[u8], u8, bool); 7] = [
        (b"MQTT", 3, false),
        (b"MQIsdp", 3, false),
        (b"MQTT", 6, false),
        (b"MQTT", 0, false),
        (b"MQTT", 255, false),
        (b"MQTT", 6, true),
        (b"MQIsdp", 3, true),
    ];
    for (name, level, pipelined) in cases {
        let mut raw = Raw::open(broker.mqtt(), Version::V5).await;
        let mut bytes = connect_bytes(name, level);
        if pipelined {
            // SUBSCRIBE and PINGREQ right behind the CONNECT, in the same write.
            bytes.extend_from_slice(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00, 0xC0, 0x00]);
        }
        raw.send_bytes(&bytes).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut got)).await.expect("broker closes");
        assert!(read.is_ok(), "level {level} pipelined {pipelined}: {read:?} after {got:02x?}");
        assert_eq!(got, [0x20, 0x02, 0x00, 0x01], "level {level} ({:?}) pipelined {pipelined}", name);
    }
    // The CONNECT split over two writes is read whole first.
    let mut raw = Raw::open(broker.mqtt(), Version::V5).await;
    let bytes = connect_bytes(b"MQTT", 7);
    raw.send_bytes(&bytes[..5]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.send_bytes(&bytes[5..]).await;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut got)).await.expect("broker closes").unwrap();
    assert_eq!(got, [0x20, 0x02, 0x00, 0x01]);
    // Levels 4 and 5 are served.
    for level in [4, 5] {
        let mut raw = Raw::open(broker.mqtt(), Version::V5).await;
        raw.send_bytes(&connect_bytes(b"MQTT", level)).await;
        let mut got = [0u8; 4];
        tokio::time::timeout(WAIT, raw.stream.read_exact(&mut got)).await.expect("CONNACK").unwrap();
        assert_eq!(got[..2], [0x20, if level == 4 { 0x02 } else { got[1] }]);
        assert_eq!(got[3], 0x00, "level {level}: success");
    }
}

// ---------------------------------------------------------------------------
// 3. Receive Maximum from the client to the broker
// ---------------------------------------------------------------------------

/// Reads until the DISCONNECT, skipping the acknowledgements before it.
async fn disconnect_after_acks(c: &mut Raw) -> (Vec<Packet>, Disconnect) {
    let mut acks = Vec::new();
    loop {
        match c.recv().await {
            Packet::Disconnect(d) => {
                assert!(matches!(c.read(WAIT).await, Read::Closed), "closed after DISCONNECT");
                return (acks, d);
            }
            p @ (Packet::PubAck(_) | Packet::PubRec(_)) => acks.push(p),
            other => panic!("expected acknowledgements then DISCONNECT, got {other:?}"),
        }
    }
}

/// MQTT-3.3.4-7 / MQTT-4.9.0-1: receive_maximum + 1 QoS 2 PUBLISHes without
/// PUBREL: the last one is answered with DISCONNECT 0x93.
#[tokio::test]
async fn qos2_over_receive_maximum_is_disconnected_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 3).await;
    let mut c = Raw::v5(broker.mqtt(), "rm-qos2", |_| {}).await;
    for id in 1..=3 {
        let rec = c.publish_qos2("conf/rm", id, b"x").await;
        assert_eq!(rec.reason, 0x10, "no subscribers: {rec:?}");
    }
    // A retransmission (DUP) of an id in flight is not a new one.
    let mut dup = publish_packet("conf/rm", b"x", QoS::ExactlyOnce, false, Some(2));
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    c.send(&dup).await;
    assert!(matches!(c.recv().await, Packet::PubRec(r) if r.packet_id == 2));
    c.send(&publish_packet("conf/rm", b"x", QoS::ExactlyOnce, false, Some(4))).await;
    let (acks, d) = disconnect_after_acks(&mut c).await;
    assert!(acks.is_empty(), "{acks:?}");
    assert_eq!(d.reason, DisconnectReason::ReceiveMaximumExceeded);
}

/// Released QoS 2 flows (PUBREL received) no longer count.
#[tokio::test]
async fn qos2_released_flows_do_not_count_towards_receive_maximum() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut c = Raw::v5(broker.mqtt(), "rm-released", |_| {}).await;
    for id in 1..=10 {
        c.publish_qos2("conf/rm", id, b"x").await;
        c.release(id).await;
    }
    c.publish_qos2("conf/rm", 11, b"x").await;
    c.publish_qos2("conf/rm", 12, b"x").await;
    c.release(11).await;
    c.publish_qos2("conf/rm", 13, b"x").await;
    c.send(&publish_packet("conf/rm", b"x", QoS::ExactlyOnce, false, Some(14))).await;
    let (_, d) = disconnect_after_acks(&mut c).await;
    assert_eq!(d.reason, DisconnectReason::ReceiveMaximumExceeded);
}

/// QoS 1 counts too: PUBLISHes the broker has not acknowledged yet (their
/// PUBACK not written) are in flight. receive_maximum + 1 in one write,
/// with QoS 2 ones in flight alongside, exceed it.
#[tokio::test]
async fn qos1_and_qos2_together_over_receive_maximum_are_disconnected_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 3).await;
    let mut c = Raw::v5(broker.mqtt(), "rm-qos1", |_| {}).await;
    let mut burst = BytesMut::new();
    for id in 1..=4 {
        encode(&publish_packet("conf/rm", b"x", QoS::AtLeastOnce, false, Some(id)), Version::V5, &mut burst).unwrap();
    }
    c.send_bytes(&burst).await;
    let (acks, d) = disconnect_after_acks(&mut c).await;
    assert_eq!(d.reason, DisconnectReason::ReceiveMaximumExceeded, "after {acks:?}");
    assert!(acks.len() <= 3, "{acks:?}");

    let mut c = Raw::v5(broker.mqtt(), "rm-mixed", |_| {}).await;
    c.publish_qos2("conf/rm", 1, b"x").await;
    c.publish_qos2("conf/rm", 2, b"x").await;
    let mut burst = BytesMut::new();
    for id in 3..=4 {
        encode(&publish_packet("conf/rm", b"x", QoS::AtLeastOnce, false, Some(id)), Version::V5, &mut burst).unwrap();
    }
    c.send_bytes(&burst).await;
    let (acks, d) = disconnect_after_acks(&mut c).await;
    assert_eq!(d.reason, DisconnectReason::ReceiveMaximumExceeded, "after {acks:?}");
}

/// QoS 1 PUBLISHes each sent after the previous PUBACK never exceed it.
#[tokio::test]
async fn acknowledged_qos1_does_not_count_towards_receive_maximum() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut c = Raw::v5(broker.mqtt(), "rm-q1-ok", |_| {}).await;
    for id in 1..=20 {
        c.send(&publish_packet("conf/rm", b"x", QoS::AtLeastOnce, false, Some(id))).await;
        assert!(matches!(c.recv().await, Packet::PubAck(a) if a.packet_id == id));
    }
    // Two at once are within the maximum.
    let mut burst = BytesMut::new();
    for id in 21..=22 {
        encode(&publish_packet("conf/rm", b"x", QoS::AtLeastOnce, false, Some(id)), Version::V5, &mut burst).unwrap();
    }
    c.send_bytes(&burst).await;
    assert!(matches!(c.recv().await, Packet::PubAck(a) if a.packet_id == 21));
    assert!(matches!(c.recv().await, Packet::PubAck(a) if a.packet_id == 22));
    c.expect_silence().await;
}

// ---------------------------------------------------------------------------
// 4. No Local with two clients
// ---------------------------------------------------------------------------

fn no_local(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions { no_local: true, ..SubscriptionOptions::qos(qos) }
}

/// Both subscribe with No Local; b's SUBACK is in before a publishes: b gets
/// the message, a does not get its own.
#[tokio::test]
async fn no_local_subscribers_get_each_others_messages() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "nl-a", |_| {}).await;
    let mut b = Raw::v5(broker.mqtt(), "nl-b", |_| {}).await;
    a.subscribe_one(1, "conf/nl", no_local(QoS::ExactlyOnce)).await;
    b.subscribe_one(1, "conf/nl", no_local(QoS::ExactlyOnce)).await;
    a.send(&publish_packet("conf/nl", b"from a", QoS::AtLeastOnce, false, Some(7))).await;
    match a.recv().await {
        Packet::PubAck(ack) => assert_eq!((ack.packet_id, ack.reason), (7, 0)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let p = b.recv_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("conf/nl", &b"from a"[..], QoS::AtLeastOnce));
    b.send_bytes(&short_ack(0x40, p.packet_id.unwrap())).await;
    a.expect_silence().await;
    b.expect_silence().await;
}

/// Response Topic and Correlation Data (and a user property) reach b
/// byte for byte; a, No Local, gets nothing.
#[tokio::test]
async fn no_local_delivery_keeps_response_topic_and_correlation_data() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "nlp-a", |_| {}).await;
    let mut b = Raw::v5(broker.mqtt(), "nlp-b", |_| {}).await;
    a.subscribe_one(1, "conf/nlp", no_local(QoS::ExactlyOnce)).await;
    b.subscribe_one(1, "conf/nlp", no_local(QoS::ExactlyOnce)).await;
    let mut packet = publish_packet("conf/nlp", b"request", QoS::AtLeastOnce, false, Some(3));
    if let Packet::Publish(p) = &mut packet {
        p.properties.message.response_topic = Some("conf/nlp/reply".into());
        p.properties.message.correlation_data = Some(Bytes::from_static(&[0, 1, 2, 0xFF]));
        p.properties.message.user_properties = vec![("k".into(), "v".into())];
    }
    a.send(&packet).await;
    assert!(matches!(a.recv().await, Packet::PubAck(ack) if ack.packet_id == 3 && ack.reason == 0));
    let p = b.recv_publish().await;
    assert_eq!(p.properties.message.response_topic.as_deref(), Some("conf/nlp/reply"));
    assert_eq!(p.properties.message.correlation_data.as_deref(), Some(&[0u8, 1, 2, 0xFF][..]));
    assert_eq!(p.properties.message.user_properties, vec![("k".to_string(), "v".to_string())]);
    assert_eq!(&p.payload[..], b"request");
    a.expect_silence().await;
}

// ---------------------------------------------------------------------------
// 5. Server Keep Alive
// ---------------------------------------------------------------------------

/// With max_keep_alive > 0, a client asking for more, or for 0, gets Server
/// Keep Alive in the CONNACK; one asking for less keeps its own.
#[tokio::test]
async fn max_keep_alive_is_announced_as_server_keep_alive() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_keep_alive = 20).await;
    for (asked, announced) in [(0u16, Some(20u16)), (21, Some(20)), (600, Some(20)), (20, None), (5, None)] {
        let (_c, ack) = Raw::v5_connack(broker.mqtt(), "ska", |c| c.keep_alive = asked).await;
        assert_eq!(ack.code, ConnectReason::Success);
        assert_eq!(ack.properties.server_keep_alive, announced, "client asked for {asked}");
    }
    let broker = TestBroker::start().await;
    let (_c, ack) = Raw::v5_connack(broker.mqtt(), "ska-off", |c| c.keep_alive = 0).await;
    assert_eq!(ack.properties.server_keep_alive, None, "max_keep_alive 0: the client decides");
}

/// The broker uses the Server Keep Alive it announced: a client that asked
/// for none (0) and stays silent is disconnected with 0x8D after 1.5x.
#[tokio::test(start_paused = true)]
async fn server_keep_alive_is_enforced() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_keep_alive = 1).await;
    let (mut c, ack) = Raw::v5_connack(broker.mqtt(), "ska-enforced", |c| c.keep_alive = 0).await;
    assert_eq!(ack.properties.server_keep_alive, Some(1));
    let started = Instant::now();
    let d = c.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::KeepAliveTimeout);
    let after = started.elapsed();
    assert!(after >= Duration::from_millis(1400) && after < Duration::from_secs(4), "after {after:?}");
}

// ---------------------------------------------------------------------------
// 5. Topic aliases from the broker to the client
// ---------------------------------------------------------------------------

/// Sends a QoS 0 PUBLISH to `topic` from `publisher` and returns what
/// `sub` receives: (topic as sent, alias, payload).
async fn relay(publisher: &mut Raw, sub: &mut Raw, topic: &str, payload: &str) -> (String, Option<u16>) {
    publisher.send(&publish_packet(topic, payload.as_bytes(), QoS::AtMostOnce, false, None)).await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], payload.as_bytes());
    (p.topic, p.properties.topic_alias)
}

/// Client Topic Alias Maximum 2: the first PUBLISH to a topic carries topic
/// and alias, later ones an empty topic; a third topic takes the alias of
/// the least recently used one.
#[tokio::test]
async fn outgoing_topic_aliases_bind_reuse_and_rebind_the_least_recently_used() {
    let broker = TestBroker::start().await;
    let (mut sub, ack) = Raw::v5_connack(broker.mqtt(), "alias-sub", |c| {
        c.properties.topic_alias_maximum = Some(2);
    })
    .await;
    assert_eq!(ack.code, ConnectReason::Success);
    sub.subscribe_one(1, "alias/#", SubscriptionOptions::qos(QoS::AtLeastOnce)).await;
    let mut publisher = Raw::v5(broker.mqtt(), "alias-pub", |_| {}).await;
    let steps: [(&str, &str, Option<u16>); 8] = [
        ("alias/aaaa", "alias/aaaa", Some(1)),
        ("alias/bbbb", "alias/bbbb", Some(2)),
        ("alias/aaaa", "", Some(1)),
        ("alias/bbbb", "", Some(2)),
        ("alias/aaaa", "", Some(1)),
        // bbbb is least recently used: cccc takes alias 2.
        ("alias/cccc", "alias/cccc", Some(2)),
        ("alias/cccc", "", Some(2)),
        // aaaa is now least recently used: bbbb takes alias 1.
        ("alias/bbbb", "alias/bbbb", Some(1)),
    ];
    for (i, (topic, sent_topic, alias)) in steps.into_iter().enumerate() {
        let got = relay(&mut publisher, &mut sub, topic, &format!("p{i}")).await;
        assert_eq!(got, (sent_topic.to_string(), alias), "step {i}: {topic}");
    }
    // The exact bytes of an aliased delivery: 30 07, empty topic 00 00,
    // properties 03 23 00 01 (Topic Alias 1), payload "p".
    publisher.send(&publish_packet("alias/bbbb", b"p", QoS::AtMostOnce, false, None)).await;
    let mut raw = [0u8; 8];
    tokio::time::timeout(WAIT, sub.stream.read_exact(&mut raw)).await.expect("delivery").unwrap();
    assert_eq!(raw, [0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01]);
    let mut payload = [0u8; 1];
    sub.stream.read_exact(&mut payload).await.unwrap();
    assert_eq!(&payload, b"p");
}

/// No aliases to a client that did not announce a Topic Alias Maximum, nor
/// with `outgoing_topic_aliases` off; never more than the broker's own
/// `topic_alias_maximum`.
#[tokio::test]
async fn outgoing_topic_aliases_only_where_accepted_and_enabled() {
    for (switch, client_max, broker_max, expect_alias) in
        [(true, None, 64, false), (false, Some(10), 64, false), (true, Some(10), 0, false), (true, Some(10), 1, true)]
    {
        let broker = TestBroker::start_with(|c| {
            c.mqtt.outgoing_topic_aliases = switch;
            c.mqtt.topic_alias_maximum = broker_max;
        })
        .await;
        let (mut sub, _) =
            Raw::v5_connack(broker.mqtt(), "alias-off", |c| c.properties.topic_alias_maximum = client_max).await;
        sub.subscribe_one(1, "alias/#", SubscriptionOptions::qos(QoS::AtMostOnce)).await;
        let mut publisher = Raw::v5(broker.mqtt(), "alias-off-pub", |_| {}).await;
        for (i, topic) in ["alias/one", "alias/one", "alias/two", "alias/two"].into_iter().enumerate() {
            let (sent, alias) = relay(&mut publisher, &mut sub, topic, "x").await;
            let case = format!("switch {switch} client {client_max:?} broker {broker_max} step {i}");
            if expect_alias {
                // One alias: every topic change rebinds it.
                let expected = if i % 2 == 0 { topic } else { "" };
                assert_eq!((sent.as_str(), alias), (expected, Some(1)), "{case}");
            } else {
                assert_eq!((sent.as_str(), alias), (topic, None), "{case}");
            }
        }
    }
}
