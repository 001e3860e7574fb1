//! MQTT 5.0 behaviour: the rumqttc v5 client where it can say what a test
//! needs, and a raw TCP client speaking kadmq's own codec where it cannot
//! (specific reason codes, topic aliases only, oversize packets, a second
//! CONNECT, never acknowledging).
//!
//! Every wait is bounded: `WAIT` for what must arrive, `QUIET` for what must
//! not (both from `support::raw`).

use crate::common::TestBroker;
use crate::support::checks;
use crate::support::mqtt::Client5;
use crate::support::raw::{connect_v5, delayed_will, opts, publish, will, Raw, Read, QUIET, WAIT};
use bytes::Bytes;
use kadmq::protocol::{
    Connect, ConnectReason, Disconnect, DisconnectReason, MessageProperties, Packet, PubAck, Publish, QoS, Subscribe,
    SubscribeFilter, UnsubAck, Unsubscribe, Version,
};
use rumqttc::v5::mqttbytes::v5 as rp;
use rumqttc::v5::mqttbytes::QoS as RQoS;
use rumqttc::v5::{Event, MqttOptions};
use std::collections::HashSet;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// A rumqttc MQTT 5 client of `broker`, its options adjusted by `tweak`.
async fn client5(broker: &TestBroker, id: &str, tweak: impl FnOnce(&mut MqttOptions)) -> (Client5, rp::ConnAck) {
    let mut options = Client5::options(id, broker.port());
    tweak(&mut options);
    Client5::connect(options).await
}

fn topic_of(p: &rp::Publish) -> &str {
    std::str::from_utf8(&p.topic).unwrap()
}

// ---------------------------------------------------------------------------
// CONNECT / CONNACK
// ---------------------------------------------------------------------------

#[tokio::test]
async fn connect_with_unknown_protocol_level_is_refused() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(broker.mqtt(), Version::V5).await;
    // CONNECT "MQTT" level 6, clean start, keep alive 30, no properties, client id "x".
    let body = [0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 30, 0, 0, 1, b'x'];
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    raw.send_bytes(&packet).await;
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut bytes)).await.expect("broker closes").unwrap();
    // Either form says "unsupported protocol version": the 3.1.1 CONNACK
    // (return code 1) or the 5.0 one (reason 0x84, empty properties).
    assert!(
        bytes == [0x20, 0x02, 0x00, 0x01] || bytes == [0x20, 0x03, 0x00, 0x84, 0x00],
        "expected an unsupported-protocol-version CONNACK then close, got {bytes:02x?}"
    );
}

#[tokio::test]
async fn connect_with_authentication_method_is_refused_0x8c() {
    let broker = TestBroker::start().await;
    let (mut raw, ack) = Raw::v5_connack(broker.mqtt(), "auth", |c| {
        c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    })
    .await;
    assert_eq!(ack.code, ConnectReason::BadAuthenticationMethod);
    assert!(!ack.session_present);
    assert!(matches!(raw.next().await, Read::Closed));
}

#[tokio::test]
async fn connack_advertises_receive_maximum_packet_size_and_alias_maximum() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.receive_maximum = 77;
        c.mqtt.max_packet_size = 4321;
        c.mqtt.topic_alias_maximum = 9;
    })
    .await;
    let (_raw, ack) = Raw::v5_connack(broker.mqtt(), "props", |_| {}).await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert_eq!(ack.properties.receive_maximum, Some(77));
    assert_eq!(ack.properties.maximum_packet_size, Some(4321));
    assert_eq!(ack.properties.topic_alias_maximum, Some(9));
    assert_eq!(ack.properties.assigned_client_identifier, None);

    // The same through rumqttc.
    let (_c, ack) = client5(&broker, "props-r", |_| {}).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!((p.receive_max, p.max_packet_size, p.topic_alias_max), (Some(77), Some(4321), Some(9)));
}

#[tokio::test]
async fn empty_client_id_gets_an_assigned_identifier() {
    let broker = TestBroker::start().await;
    let (_a, ack_a) = Raw::v5_connack(broker.mqtt(), "", |_| {}).await;
    let (_b, ack_b) = Raw::v5_connack(broker.mqtt(), "", |_| {}).await;
    assert_eq!(ack_a.code, ConnectReason::Success);
    let id_a = ack_a.properties.assigned_client_identifier.expect("assigned id");
    let id_b = ack_b.properties.assigned_client_identifier.expect("assigned id");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b, "two clients got the same identifier");
}

#[tokio::test]
async fn session_expiry_zero_session_ends_with_the_connection() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "exp0", |_| {}).await;
    a.subscribe("exp0/t", QoS::AtLeastOnce).await;
    a.disconnect_with(DisconnectReason::NormalDisconnection).await;

    let (mut a, ack) = Raw::v5_connack(broker.mqtt(), "exp0", |c| c.clean_start = false).await;
    assert!(!ack.session_present, "session with expiry 0 survived its connection");
    // Its subscription went with it.
    let mut p = Raw::v5(broker.mqtt(), "exp0-pub", |_| {}).await;
    let ack = p.publish(publish("exp0/t", b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(ack.reason, 0x10);
    a.expect_silence().await;
}

#[tokio::test(start_paused = true)]
async fn session_expiry_resumes_within_interval_and_ends_after() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let expiry = |c: &mut Connect| c.properties.session_expiry_interval = Some(1);
    let mut a = Raw::v5(addr, "exp1", expiry).await;
    a.subscribe("exp1/t", QoS::AtLeastOnce).await;
    a.disconnect_with(DisconnectReason::NormalDisconnection).await;

    // Within the interval: present, subscription kept, queued message delivered.
    let mut p = Raw::v5(addr, "exp1-pub", |_| {}).await;
    assert_eq!(p.publish(publish("exp1/t", b"queued", QoS::AtLeastOnce)).await.unwrap().reason, 0);
    let (mut a, ack) = Raw::v5_connack(addr, "exp1", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    let got = a.recv_publish().await;
    assert_eq!(&got.payload[..], b"queued");
    a.ack(&got).await;
    a.disconnect_with(DisconnectReason::NormalDisconnection).await;

    // After the interval: gone.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut a, ack) = Raw::v5_connack(addr, "exp1", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert!(!ack.session_present, "session outlived its expiry interval");
    assert_eq!(p.publish(publish("exp1/t", b"late", QoS::AtLeastOnce)).await.unwrap().reason, 0x10);
    a.expect_silence().await;
}

#[tokio::test]
async fn disconnect_with_will_message_publishes_the_will() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "will-obs", |_| {}).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    let a = Raw::v5(broker.mqtt(), "will-a", |c| c.will = Some(will("will/a", b"gone", QoS::AtLeastOnce, false))).await;
    a.disconnect_with(DisconnectReason::DisconnectWithWillMessage).await;
    let got = w.recv_publish().await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("will/a", &b"gone"[..]));
}

#[tokio::test]
async fn normal_disconnect_discards_the_will() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "will-obs", |_| {}).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    let a = Raw::v5(broker.mqtt(), "will-a", |c| c.will = Some(will("will/a", b"gone", QoS::AtLeastOnce, false))).await;
    a.disconnect_with(DisconnectReason::NormalDisconnection).await;
    w.expect_silence().await;
    // Whereas losing the connection publishes it.
    let b = Raw::v5(broker.mqtt(), "will-b", |c| c.will = Some(will("will/b", b"lost", QoS::AtLeastOnce, false))).await;
    drop(b);
    assert_eq!(w.recv_publish().await.topic, "will/b");
}

#[tokio::test]
async fn second_connection_with_same_id_takes_over_with_0x8e() {
    let broker = TestBroker::start().await;
    checks::second_connection_with_same_id_takes_over_with_0x8e(broker.mqtt()).await;
}

#[tokio::test]
async fn takeover_of_an_expiry_zero_session_does_not_resume_it() {
    // Session expiry 0: the session ends when its connection closes, and a
    // takeover closes it, so the newcomer starts afresh even without clean start.
    let broker = TestBroker::start().await;
    let mut first = Raw::v5(broker.mqtt(), "tk0", |_| {}).await;
    first.subscribe("tk0/t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::v5_connack(broker.mqtt(), "tk0", |c| c.clean_start = false).await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert_eq!(first.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    assert!(!ack.session_present, "an expiry-0 session was resumed after takeover");
    let mut p = Raw::v5(broker.mqtt(), "tk0-pub", |_| {}).await;
    let ack = p.publish(publish("tk0/t", b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(ack.reason, 0x10, "the ended session's subscription still matches");
    second.expect_silence().await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_error_with_reason_string() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "twice", |_| {}).await;
    a.send(&Packet::Connect(connect_v5("twice"))).await;
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert!(d.reason_string.as_deref().is_some_and(|s| !s.is_empty()), "no reason string: {d:?}");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_timeout_disconnects_with_0x8d() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "ka", |c| c.keep_alive = 1).await;
    let started = Instant::now();
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::KeepAliveTimeout);
    let took = started.elapsed();
    // One and a half times the keep-alive.
    assert!(took >= Duration::from_millis(1200) && took < Duration::from_millis(3500), "after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_is_kept_by_pings() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "ka-ping", |c| c.keep_alive = 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        a.send(&Packet::PingReq).await;
        assert!(matches!(a.recv().await, Packet::PingResp));
    }
}

#[tokio::test]
async fn disconnect_setting_expiry_after_zero_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "exp-set", |_| {}).await;
    a.subscribe("exp-set/t", QoS::AtLeastOnce).await;
    let mut d = Disconnect::new(DisconnectReason::NormalDisconnection);
    d.session_expiry_interval = Some(30);
    a.send(&Packet::Disconnect(d)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
    let (_a, ack) = Raw::v5_connack(broker.mqtt(), "exp-set", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn disconnect_may_change_a_nonzero_expiry() {
    // From non-zero to 0: the session ends with this connection.
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "exp-chg", |c| c.properties.session_expiry_interval = Some(60)).await;
    a.subscribe("exp-chg/t", QoS::AtLeastOnce).await;
    let mut d = Disconnect::new(DisconnectReason::NormalDisconnection);
    d.session_expiry_interval = Some(0);
    a.send(&Packet::Disconnect(d)).await;
    assert!(matches!(a.next().await, Read::Closed));
    let (_a, ack) = Raw::v5_connack(broker.mqtt(), "exp-chg", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

// ---------------------------------------------------------------------------
// PUBLISH
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_qos_0_1_2_both_directions() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = client5(&broker, "q-sub", |_| {}).await;
    let ack = sub.subscribe(vec![rp::Filter::new("q/#", RQoS::ExactlyOnce)], None).await;
    assert_eq!(ack.return_codes, vec![rp::SubscribeReasonCode::Success(RQoS::ExactlyOnce)]);
    let (mut publisher, _) = client5(&broker, "q-pub", |_| {}).await;
    for (topic, qos) in [("q/0", RQoS::AtMostOnce), ("q/1", RQoS::AtLeastOnce), ("q/2", RQoS::ExactlyOnce)] {
        publisher.client.publish(topic, qos, false, topic.as_bytes().to_vec()).await.unwrap();
        let got = sub.next_publish().await;
        assert_eq!((topic_of(&got), got.qos, &got.payload[..]), (topic, qos, topic.as_bytes()));
    }
    // The publisher's flows completed: PUBACK for QoS 1, PUBREC + PUBCOMP for QoS 2.
    let reason = publisher
        .wait_for("PUBACK", |e| match e {
            Event::Incoming(rp::Packet::PubAck(a)) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, rp::PubAckReason::Success);
    publisher.wait_for("PUBCOMP", |e| matches!(e, Event::Incoming(rp::Packet::PubComp(_))).then_some(())).await;
    // The subscriber's QoS 2 flow too: no redelivery.
    assert!(sub.publishes_within(QUIET).await.is_empty());
}

#[tokio::test]
async fn qos2_from_raw_client_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::v5(broker.mqtt(), "q2-sub", |_| {}).await;
    sub.subscribe("q2/t", QoS::ExactlyOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "q2-pub", |_| {}).await;
    let mut publish = publish("q2/t", b"once", QoS::ExactlyOnce);
    publish.packet_id = Some(7);
    p.send(&Packet::Publish(publish.clone())).await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 7 && a.reason == 0));
    // A retransmission before PUBREL is not routed again.
    publish.dup = true;
    p.send(&Packet::Publish(publish)).await;
    assert!(matches!(p.recv().await, Packet::PubRec(a) if a.packet_id == 7));
    p.send(&Packet::PubRel(PubAck::new(7))).await;
    assert!(matches!(p.recv().await, Packet::PubComp(a) if a.packet_id == 7 && a.reason == 0));

    // Broker to subscriber: PUBLISH, PUBREC, PUBREL, PUBCOMP.
    let got = sub.recv_publish().await;
    assert_eq!((got.qos, &got.payload[..]), (QoS::ExactlyOnce, &b"once"[..]));
    let id = got.packet_id.unwrap();
    sub.send(&Packet::PubRec(PubAck::new(id))).await;
    assert!(matches!(sub.recv().await, Packet::PubRel(a) if a.packet_id == id && a.reason == 0));
    sub.send(&Packet::PubComp(PubAck::new(id))).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn inflight_window_honours_client_receive_maximum() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::v5(broker.mqtt(), "rm-sub", |c| c.properties.receive_maximum = Some(2)).await;
    sub.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "rm-pub", |_| {}).await;
    for i in 0..5u8 {
        p.publish(publish("rm/t", &[b'0' + i], QoS::AtLeastOnce)).await;
    }
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    assert_eq!((&first.payload[..], &second.payload[..]), (&b"0"[..], &b"1"[..]));
    sub.expect_silence().await; // window full
    sub.ack(&first).await;
    let third = sub.recv_publish().await;
    assert_eq!(&third.payload[..], b"2");
    sub.expect_silence().await;
    sub.ack(&second).await;
    sub.ack(&third).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"3");
    assert_eq!(&sub.recv_publish().await.payload[..], b"4");
}

#[tokio::test]
async fn puback_reports_no_matching_subscribers() {
    let broker = TestBroker::start().await;
    let mut p = Raw::v5(broker.mqtt(), "nms", |_| {}).await;
    let ack = p.publish(publish("nobody/here", b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(ack.reason, 0x10);
    let mut s = Raw::v5(broker.mqtt(), "nms-sub", |_| {}).await;
    s.subscribe("nobody/+", QoS::AtMostOnce).await;
    let ack = p.publish(publish("nobody/here", b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(ack.reason, 0x00);
}

// ---------------------------------------------------------------------------
// SUBSCRIBE options
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_local_suppresses_own_messages_only() {
    let broker = TestBroker::start().await;
    let (mut a, _) = client5(&broker, "nl-a", |_| {}).await;
    let mut f = rp::Filter::new("nl/t", RQoS::AtLeastOnce);
    f.nolocal = true;
    a.subscribe(vec![f], None).await;
    let (mut b, _) = client5(&broker, "nl-b", |_| {}).await;
    b.subscribe(vec![rp::Filter::new("nl/t", RQoS::AtLeastOnce)], None).await;

    a.client.publish("nl/t", RQoS::AtLeastOnce, false, "from-a").await.unwrap();
    // b (no No Local) gets a's message; a does not.
    assert_eq!(&b.next_publish().await.payload[..], b"from-a");
    b.client.publish("nl/t", RQoS::AtLeastOnce, false, "from-b").await.unwrap();
    assert_eq!(&a.next_publish().await.payload[..], b"from-b");
    assert!(a.publishes_within(QUIET).await.is_empty());
}

#[tokio::test]
async fn retain_as_published_keeps_or_clears_the_retain_flag() {
    let broker = TestBroker::start().await;
    let mut keep = Raw::v5(broker.mqtt(), "rap-1", |_| {}).await;
    let mut o = opts(QoS::AtMostOnce);
    o.retain_as_published = true;
    keep.subscribe_with(&[("rap/t", o)], None).await;
    let mut clear = Raw::v5(broker.mqtt(), "rap-0", |_| {}).await;
    clear.subscribe("rap/t", QoS::AtMostOnce).await;

    let mut p = Raw::v5(broker.mqtt(), "rap-pub", |_| {}).await;
    let mut retained = publish("rap/t", b"r", QoS::AtLeastOnce);
    retained.retain = true;
    p.publish(retained).await;
    assert!(keep.recv_publish().await.retain, "retain flag cleared despite Retain As Published");
    assert!(!clear.recv_publish().await.retain, "retain flag kept without Retain As Published");
    p.publish(publish("rap/t", b"n", QoS::AtLeastOnce)).await;
    assert!(!keep.recv_publish().await.retain);

    // Retained messages sent because of a subscribe always carry the flag.
    let mut late = Raw::v5(broker.mqtt(), "rap-late", |_| {}).await;
    late.subscribe("rap/t", QoS::AtMostOnce).await;
    let got = late.recv_publish().await;
    assert!(got.retain && &got.payload[..] == b"r");
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let broker = TestBroker::start().await;
    let mut p = Raw::v5(broker.mqtt(), "rh-pub", |_| {}).await;
    let mut retained = publish("rh/t", b"kept", QoS::AtLeastOnce);
    retained.retain = true;
    p.publish(retained).await;

    for (handling, expected) in [(0u8, 2usize), (1, 1), (2, 0)] {
        let mut c = Raw::v5(broker.mqtt(), &format!("rh-{handling}"), |_| {}).await;
        let mut o = opts(QoS::AtMostOnce);
        o.retain_handling = handling;
        let mut got = 0;
        for _ in 0..2 {
            c.subscribe_with(&[("rh/t", o)], None).await;
            loop {
                match c.read(QUIET).await {
                    Read::Packet(Packet::Publish(p)) => {
                        assert!(p.retain && &p.payload[..] == b"kept");
                        got += 1;
                    }
                    Read::Silent => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(got, expected, "retain handling {handling}: retained message delivered {got} times");
    }
}

#[tokio::test]
async fn overlapping_subscriptions_list_every_identifier_once() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = client5(&broker, "sid", |_| {}).await;
    sub.subscribe(vec![rp::Filter::new("sid/+", RQoS::AtLeastOnce)], Some(1)).await;
    sub.subscribe(vec![rp::Filter::new("sid/#", RQoS::AtLeastOnce)], Some(2)).await;
    sub.subscribe(vec![rp::Filter::new("other/#", RQoS::AtLeastOnce)], Some(3)).await;
    let (publisher, _) = client5(&broker, "sid-pub", |_| {}).await;
    publisher.client.publish("sid/x", RQoS::AtLeastOnce, false, "m").await.unwrap();
    let got = sub.next_publish().await;
    let mut ids = got.properties.expect("properties").subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    assert!(sub.publishes_within(QUIET).await.is_empty(), "more than one delivery");
}

#[tokio::test]
async fn overlapping_subscriptions_one_delivery_at_max_qos() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::v5(broker.mqtt(), "ov", |_| {}).await;
    sub.subscribe("ov/+", QoS::AtMostOnce).await;
    sub.subscribe("ov/#", QoS::AtLeastOnce).await;
    sub.subscribe("+/a", QoS::AtMostOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "ov-pub", |_| {}).await;
    p.publish(publish("ov/a", b"m", QoS::AtLeastOnce)).await;
    let got = sub.recv_publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(got.properties.subscription_identifiers.is_empty());
    sub.ack(&got).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn suback_grants_requested_qos() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "grant", |_| {}).await;
    let ack = c
        .subscribe_with(
            &[("g/0", opts(QoS::AtMostOnce)), ("g/1", opts(QoS::AtLeastOnce)), ("g/2", opts(QoS::ExactlyOnce))],
            None,
        )
        .await;
    assert_eq!(ack.reasons, vec![0, 1, 2]);
}

#[tokio::test]
async fn invalid_topic_filter_is_refused_with_0x8f() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "badf", |_| {}).await;
    let packet_id = c.packet_id();
    c.send(&Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![SubscribeFilter { filter: "a/#/b".into(), options: opts(QoS::AtMostOnce) }],
        subscription_identifier: None,
        user_properties: vec![],
    }))
    .await;
    // MQTT 5 allows either answer: a SUBACK with 0x8F for that filter, or
    // (the filter being malformed) a DISCONNECT with 0x8F. kadmq's codec
    // does the latter.
    match c.recv().await {
        Packet::SubAck(ack) => assert_eq!(ack.reasons, vec![0x8F]),
        Packet::Disconnect(d) => {
            assert_eq!(d.reason, DisconnectReason::TopicFilterInvalid);
            assert!(matches!(c.next().await, Read::Closed));
        }
        other => panic!("expected SUBACK or DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn unsuback_reports_success_and_no_subscription_existed() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "unsub", |_| {}).await;
    c.subscribe("u/a", QoS::AtMostOnce).await;
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 99,
        filters: vec!["u/a".into(), "u/never".into()],
        user_properties: vec![],
    }))
    .await;
    match c.recv().await {
        Packet::UnsubAck(UnsubAck { packet_id, reasons, .. }) => {
            assert_eq!(packet_id, 99);
            assert_eq!(reasons, vec![0x00, 0x11]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut p = Raw::v5(broker.mqtt(), "unsub-pub", |_| {}).await;
    assert_eq!(p.publish(publish("u/a", b"x", QoS::AtLeastOnce)).await.unwrap().reason, 0x10);
}

// ---------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn shared_subscription_delivers_each_message_to_one_member() {
    let broker = TestBroker::start().await;
    let (mut m1, _) = client5(&broker, "sh-1", |_| {}).await;
    let (mut m2, _) = client5(&broker, "sh-2", |_| {}).await;
    for m in [&mut m1, &mut m2] {
        let ack = m.subscribe(vec![rp::Filter::new("$share/g/sh/t", RQoS::AtLeastOnce)], None).await;
        assert_eq!(ack.return_codes, vec![rp::SubscribeReasonCode::Success(RQoS::AtLeastOnce)]);
    }
    let (publisher, _) = client5(&broker, "sh-pub", |_| {}).await;
    for i in 0..10 {
        publisher.client.publish("sh/t", RQoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut all = Vec::new();
    let mut counts = [0, 0];
    let deadline = Instant::now() + WAIT;
    while all.len() < 10 && Instant::now() < deadline {
        for (k, m) in [&mut m1, &mut m2].into_iter().enumerate() {
            for p in m.publishes_within(Duration::from_millis(100)).await {
                counts[k] += 1;
                all.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    }
    // Anything late would be a duplicate.
    for (k, m) in [&mut m1, &mut m2].into_iter().enumerate() {
        for p in m.publishes_within(QUIET).await {
            counts[k] += 1;
            all.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 10, "deliveries {all:?}");
    assert_eq!(distinct.len(), 10, "duplicates in {all:?}");
    assert!(counts[0] > 0 && counts[1] > 0, "one member got everything: {counts:?}");
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "sh-nl", |_| {}).await;
    let mut o = opts(QoS::AtMostOnce);
    o.no_local = true;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter { filter: "$share/g/t".into(), options: o }],
        subscription_identifier: None,
        user_properties: vec![],
    }))
    .await;
    assert_eq!(c.disconnected().await.reason, DisconnectReason::ProtocolError);
}

// ---------------------------------------------------------------------------
// Message expiry
// ---------------------------------------------------------------------------

fn expiring(topic: &str, secs: u32, payload: &[u8]) -> Publish {
    let mut p = publish(topic, payload, QoS::AtLeastOnce);
    p.properties.message.message_expiry_interval = Some(secs);
    p
}

#[tokio::test(start_paused = true)]
async fn retained_message_expires() {
    let broker = TestBroker::start().await;
    let mut p = Raw::v5(broker.mqtt(), "mx-pub", |_| {}).await;
    let mut short = expiring("mx/short", 1, b"s");
    short.retain = true;
    p.publish(short).await;
    let mut long = expiring("mx/long", 60, b"l");
    long.retain = true;
    p.publish(long).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut s = Raw::v5(broker.mqtt(), "mx-sub", |_| {}).await;
    s.subscribe("mx/+", QoS::AtLeastOnce).await;
    let got = s.recv_publish().await;
    assert_eq!(got.topic, "mx/long", "expired retained message delivered");
    // Remaining lifetime, counted down: under 60 after 2 s.
    let left = got.properties.message.message_expiry_interval.expect("expiry forwarded");
    assert!((55..60).contains(&left), "remaining expiry {left}");
    s.ack(&got).await;
    s.expect_silence().await;
}

#[tokio::test(start_paused = true)]
async fn queued_message_expires_for_offline_session() {
    let broker = TestBroker::start().await;
    let persistent = |c: &mut Connect| {
        c.properties.session_expiry_interval = Some(60);
        c.clean_start = false;
    };
    let mut s = Raw::v5(broker.mqtt(), "mq-sub", persistent).await;
    s.subscribe("mq/t", QoS::AtLeastOnce).await;
    s.disconnect_with(DisconnectReason::NormalDisconnection).await;
    let mut p = Raw::v5(broker.mqtt(), "mq-pub", |_| {}).await;
    p.publish(expiring("mq/t", 1, b"short")).await;
    p.publish(expiring("mq/t", 60, b"long")).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (mut s, ack) = Raw::v5_connack(broker.mqtt(), "mq-sub", persistent).await;
    assert!(ack.session_present);
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"long", "expired queued message delivered");
    let left = got.properties.message.message_expiry_interval.expect("expiry forwarded");
    assert!((55..60).contains(&left), "remaining expiry {left}, not counted down");
    s.ack(&got).await;
    s.expect_silence().await;
}

#[tokio::test]
async fn immediate_delivery_keeps_the_expiry_interval() {
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "mi-sub", |_| {}).await;
    s.subscribe("mi/t", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "mi-pub", |_| {}).await;
    p.publish(expiring("mi/t", 30, b"x")).await;
    let got = s.recv_publish().await;
    assert_eq!(got.properties.message.message_expiry_interval, Some(30));
    p.publish(publish("mi/t", b"y", QoS::AtLeastOnce)).await;
    let got2 = s.recv_publish().await;
    assert_eq!(got2.properties.message.message_expiry_interval, None);
}

// ---------------------------------------------------------------------------
// Topic aliases (client to broker)
// ---------------------------------------------------------------------------

fn aliased(topic: &str, alias: u16, payload: &[u8]) -> Publish {
    let mut p = publish(topic, payload, QoS::AtLeastOnce);
    p.properties.topic_alias = Some(alias);
    p
}

#[tokio::test]
async fn topic_alias_from_client_is_resolved() {
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "ta-sub", |_| {}).await;
    s.subscribe("a/#", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "ta-pub", |_| {}).await;
    assert_eq!(p.publish(aliased("a/b", 1, b"one")).await.unwrap().reason, 0);
    assert_eq!(p.publish(aliased("", 1, b"two")).await.unwrap().reason, 0);
    // Re-map alias 1.
    p.publish(aliased("a/c", 1, b"three")).await;
    p.publish(aliased("", 1, b"four")).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = s.recv_publish().await;
        assert_eq!(m.properties.topic_alias, None, "broker forwarded the client's alias");
        got.push((m.topic.clone(), String::from_utf8(m.payload.to_vec()).unwrap()));
        s.ack(&m).await;
    }
    let expected: Vec<(String, String)> = [("a/b", "one"), ("a/b", "two"), ("a/c", "three"), ("a/c", "four")]
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn topic_alias_zero_or_over_maximum_is_0x94() {
    let broker = TestBroker::start_with(|c| c.mqtt.topic_alias_maximum = 5).await;
    let mut a = Raw::v5(broker.mqtt(), "ta0", |_| {}).await;
    let mut zero = aliased("t", 0, b"x");
    zero.packet_id = Some(1);
    a.send(&Packet::Publish(zero)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::TopicAliasInvalid);

    let mut b = Raw::v5(broker.mqtt(), "ta6", |_| {}).await;
    b.publish(aliased("t", 5, b"ok")).await; // the maximum itself is fine
    let mut over = aliased("t", 6, b"x");
    over.packet_id = Some(50);
    b.send(&Packet::Publish(over)).await;
    assert_eq!(b.disconnected().await.reason, DisconnectReason::TopicAliasInvalid);
}

#[tokio::test]
async fn unknown_topic_alias_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "ta-unk", |_| {}).await;
    let mut p = aliased("", 3, b"x");
    p.packet_id = Some(1);
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
}

#[tokio::test]
async fn topic_aliases_do_not_outlive_the_connection() {
    let broker = TestBroker::start().await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(60);
    let mut a = Raw::v5(broker.mqtt(), "ta-life", persistent).await;
    a.publish(aliased("t/x", 1, b"x")).await;
    a.disconnect_with(DisconnectReason::NormalDisconnection).await;
    let mut a = Raw::v5(broker.mqtt(), "ta-life", |c| {
        persistent(c);
        c.clean_start = false;
    })
    .await;
    let mut p = aliased("", 1, b"x");
    p.packet_id = Some(1);
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
}

// ---------------------------------------------------------------------------
// Maximum packet size
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversize_packet_from_client_is_0x95() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    let mut a = Raw::v5(broker.mqtt(), "big", |_| {}).await;
    // Just under the limit passes.
    let ok = publish("big/t", &[0u8; 1000], QoS::AtLeastOnce);
    assert_eq!(a.publish(ok).await.unwrap().packet_id, 1);
    let mut too_big = publish("big/t", &[0u8; 2000], QoS::AtLeastOnce);
    too_big.packet_id = Some(2);
    a.send(&Packet::Publish(too_big)).await;
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::PacketTooLarge);
}

#[tokio::test]
async fn messages_over_client_maximum_packet_size_are_dropped() {
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "mps-sub", |c| c.properties.maximum_packet_size = Some(200)).await;
    s.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "mps-pub", |_| {}).await;
    p.publish(publish("mps/t", &[b'x'; 1000], QoS::AtLeastOnce)).await;
    p.publish(publish("mps/t", &[b'y'; 1000], QoS::AtMostOnce)).await;
    p.publish(publish("mps/t", b"small", QoS::AtLeastOnce)).await;
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"small");
    s.ack(&got).await;
    s.expect_silence().await;
    // The reader is not stuck: more small ones flow.
    p.publish(publish("mps/t", b"again", QoS::AtLeastOnce)).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"again");
}

// ---------------------------------------------------------------------------
// Properties passed through
// ---------------------------------------------------------------------------

#[tokio::test]
async fn message_properties_pass_through_unchanged() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = client5(&broker, "pp-sub", |_| {}).await;
    sub.subscribe(vec![rp::Filter::new("pp/t", RQoS::AtLeastOnce)], None).await;
    let (publisher, _) = client5(&broker, "pp-pub", |_| {}).await;
    let user = vec![
        ("z".to_string(), "1".to_string()),
        ("a".to_string(), "2".to_string()),
        ("z".to_string(), "1".to_string()),
        ("z".to_string(), "3".to_string()),
    ];
    let props = rp::PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("pp/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: user.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    publisher.client.publish_with_properties("pp/t", RQoS::AtLeastOnce, false, "{\"k\":1}", props).await.unwrap();
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"{\"k\":1}");
    let p = got.properties.expect("properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.response_topic.as_deref(), Some("pp/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.user_properties, user);
    assert_eq!(p.message_expiry_interval, None);
    assert!(p.subscription_identifiers.is_empty());
}

#[tokio::test]
async fn invalid_utf8_with_payload_format_indicator_is_0x99_and_not_routed() {
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "pfi-sub", |_| {}).await;
    s.subscribe("pfi/t", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "pfi-pub", |_| {}).await;
    let mut bad = publish("pfi/t", b"\xff\xfe not utf-8", QoS::AtLeastOnce);
    bad.properties.message.payload_format_indicator = Some(1);
    assert_eq!(p.publish(bad).await.unwrap().reason, 0x99);
    // Unspecified bytes (indicator 0) are fine.
    let mut raw_bytes = publish("pfi/t", b"\xff\xfe", QoS::AtLeastOnce);
    raw_bytes.properties.message.payload_format_indicator = Some(0);
    assert_eq!(p.publish(raw_bytes).await.unwrap().reason, 0);
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"\xff\xfe", "the invalid message was routed");
    s.ack(&got).await;
    s.expect_silence().await;
}

// ---------------------------------------------------------------------------
// Reason strings and Request Problem Information
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_reason_strings_on_acks_when_problem_information_is_off() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "rpi", |c| c.properties.request_problem_information = Some(0)).await;
    let ack = c.subscribe_with(&[("rpi/t", opts(QoS::AtLeastOnce))], None).await;
    assert_eq!(ack.properties.reason_string, None);
    let mut bad = publish("rpi/t", b"\xff", QoS::AtLeastOnce);
    bad.properties.message.payload_format_indicator = Some(1);
    let ack = c.publish(bad).await.unwrap();
    assert_eq!(ack.reason, 0x99);
    assert_eq!(ack.properties.reason_string, None);
    assert!(ack.properties.user_properties.is_empty());
    let ack = c.publish(publish("nobody", b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!((ack.reason, ack.properties.reason_string), (0x10, None));
}

#[tokio::test]
async fn server_disconnect_reason_string_follows_problem_information() {
    let broker = TestBroker::start().await;
    let connack = Packet::ConnAck(kadmq::protocol::ConnAck {
        session_present: false,
        code: ConnectReason::Success,
        properties: Default::default(),
    });
    let mut on = Raw::v5(broker.mqtt(), "rs-on", |_| {}).await;
    on.send(&Packet::PubRel(PubAck::new(1))).await; // answered, not an error
    assert!(matches!(on.recv().await, Packet::PubComp(a) if a.reason == 0x92));
    on.send(&connack).await; // a server-only packet
    let d = on.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert!(d.reason_string.is_some_and(|s| !s.is_empty()));

    // Request Problem Information 0: kadmq then leaves the reason string out.
    let mut off = Raw::v5(broker.mqtt(), "rs-off", |c| c.properties.request_problem_information = Some(0)).await;
    off.send(&connack).await;
    let d = off.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert_eq!(d.reason_string, None);
}

// ---------------------------------------------------------------------------
// Will delay
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn delayed_will_is_published_after_the_delay() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "wd-obs", |_| {}).await;
    w.subscribe("wd/#", QoS::AtLeastOnce).await;
    let a = Raw::v5(broker.mqtt(), "wd-a", |c| {
        c.properties.session_expiry_interval = Some(30);
        c.will = Some(delayed_will("wd/a", b"late", 2));
    })
    .await;
    let closed = Instant::now();
    drop(a);
    let got = w.recv_publish().await;
    let took = closed.elapsed();
    assert_eq!(got.topic, "wd/a");
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(4000), "will after {took:?}");
}

#[tokio::test(start_paused = true)]
async fn delayed_will_is_cancelled_by_reconnecting() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "wc-obs", |_| {}).await;
    w.subscribe("wc/#", QoS::AtLeastOnce).await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(30);
    let a = Raw::v5(broker.mqtt(), "wc-a", |c| {
        persistent(c);
        c.will = Some(delayed_will("wc/a", b"late", 2));
    })
    .await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_a, ack) = Raw::v5_connack(broker.mqtt(), "wc-a", |c| {
        persistent(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    match w.read(Duration::from_millis(3000)).await {
        Read::Silent => {}
        other => panic!("will published although the client came back: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn will_delay_longer_than_session_expiry_fires_at_expiry() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "we-obs", |_| {}).await;
    w.subscribe("we/#", QoS::AtLeastOnce).await;
    let a = Raw::v5(broker.mqtt(), "we-a", |c| {
        c.properties.session_expiry_interval = Some(1);
        c.will = Some(delayed_will("we/a", b"expired", 60));
    })
    .await;
    let closed = Instant::now();
    drop(a);
    let got = w.recv_publish().await;
    let took = closed.elapsed();
    assert_eq!(&got.payload[..], b"expired");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_millis(3000), "will after {took:?}");
    let (_a, ack) = Raw::v5_connack(broker.mqtt(), "we-a", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn takeover_cancels_a_delayed_will_when_the_session_resumes() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "wt-obs", |_| {}).await;
    w.subscribe("wt/#", QoS::AtLeastOnce).await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(30);
    let mut a = Raw::v5(broker.mqtt(), "wt-a", |c| {
        persistent(c);
        c.will = Some(delayed_will("wt/a", b"late", 1));
    })
    .await;
    let (_b, ack) = Raw::v5_connack(broker.mqtt(), "wt-a", |c| {
        persistent(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    assert_eq!(a.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    match w.read(Duration::from_millis(2500)).await {
        Read::Silent => {}
        other => panic!("will published although the session was taken over: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// More edges
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subscription_identifier_on_retained_delivery_and_cleared_by_resubscribe() {
    let broker = TestBroker::start().await;
    let mut p = Raw::v5(broker.mqtt(), "sidr-pub", |_| {}).await;
    let mut retained = publish("sidr/t", b"r", QoS::AtLeastOnce);
    retained.retain = true;
    p.publish(retained).await;
    let mut s = Raw::v5(broker.mqtt(), "sidr-sub", |_| {}).await;
    s.subscribe_with(&[("sidr/t", opts(QoS::AtLeastOnce))], Some(5)).await;
    let got = s.recv_publish().await;
    assert!(got.retain);
    assert_eq!(got.properties.subscription_identifiers, vec![5]);
    s.ack(&got).await;
    // The same filter again without an identifier replaces the subscription.
    let mut o = opts(QoS::AtLeastOnce);
    o.retain_handling = 2;
    s.subscribe_with(&[("sidr/t", o)], None).await;
    p.publish(publish("sidr/t", b"n", QoS::AtLeastOnce)).await;
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"n");
    assert!(got.properties.subscription_identifiers.is_empty(), "stale identifier {:?}", got.properties);
}

#[tokio::test]
async fn shared_subscription_gets_no_retained_messages() {
    let broker = TestBroker::start().await;
    let mut p = Raw::v5(broker.mqtt(), "shr-pub", |_| {}).await;
    let mut retained = publish("shr/t", b"r", QoS::AtLeastOnce);
    retained.retain = true;
    p.publish(retained).await;
    let mut s = Raw::v5(broker.mqtt(), "shr-sub", |_| {}).await;
    s.subscribe("$share/g/shr/t", QoS::AtLeastOnce).await;
    s.expect_silence().await;
    p.publish(publish("shr/t", b"live", QoS::AtLeastOnce)).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"live");
}

#[tokio::test]
async fn incoming_qos2_over_receive_maximum_is_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut a = Raw::v5(broker.mqtt(), "rm93", |_| {}).await;
    for id in 1..=2u16 {
        let mut p = publish("rm93/t", b"x", QoS::ExactlyOnce);
        p.packet_id = Some(id);
        a.send(&Packet::Publish(p)).await;
        assert!(matches!(a.recv().await, Packet::PubRec(r) if r.packet_id == id));
    }
    // Two unreleased: a third is one too many.
    let mut p = publish("rm93/t", b"x", QoS::ExactlyOnce);
    p.packet_id = Some(3);
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ReceiveMaximumExceeded);
}

#[tokio::test]
async fn connack_reports_granted_keep_alive_and_session_expiry() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_keep_alive = 5;
        c.mqtt.max_session_expiry = 10;
    })
    .await;
    let (_a, ack) = Raw::v5_connack(broker.mqtt(), "grant-ka", |c| {
        c.keep_alive = 60;
        c.properties.session_expiry_interval = Some(100);
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, Some(5));
    assert_eq!(ack.properties.session_expiry_interval, Some(10));
    // Within the limits, nothing is said.
    let (_b, ack) = Raw::v5_connack(broker.mqtt(), "grant-ok", |c| {
        c.keep_alive = 5;
        c.properties.session_expiry_interval = Some(10);
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, None);
    assert_eq!(ack.properties.session_expiry_interval, None);
}

#[tokio::test]
async fn subscription_identifier_in_client_publish_is_a_protocol_error() {
    // MQTT-3.3.4-6: a client's PUBLISH must not carry a Subscription Identifier.
    let broker = TestBroker::start().await;
    let mut a = Raw::v5(broker.mqtt(), "sid-pub", |_| {}).await;
    let mut p = publish("sid/t", b"x", QoS::AtLeastOnce);
    p.packet_id = Some(1);
    p.properties.subscription_identifiers = vec![7];
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
}

#[tokio::test]
async fn wildcards_at_the_start_do_not_match_dollar_topics() {
    // sys_interval_secs is 1 in tests: $SYS topics are being published.
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "dollar", |_| {}).await;
    s.subscribe_with(&[("#", opts(QoS::AtMostOnce)), ("+/broker/#", opts(QoS::AtMostOnce))], None).await;
    let mut sys = Raw::v5(broker.mqtt(), "dollar-sys", |_| {}).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let got = sys.recv_publish().await;
    assert!(got.topic.starts_with("$SYS/"));
    match s.read(Duration::from_millis(1500)).await {
        Read::Silent => {}
        other => panic!("a wildcard matched a $ topic: {other:?}"),
    }
}

#[tokio::test]
async fn will_carries_its_message_properties() {
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "wp-obs", |_| {}).await;
    w.subscribe("wp/#", QoS::AtLeastOnce).await;
    let mut lw = will("wp/a", b"bye", QoS::AtLeastOnce, false);
    lw.retain = true;
    lw.properties.message = MessageProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(100),
        content_type: Some("text/plain".into()),
        response_topic: Some("wp/r".into()),
        correlation_data: Some(Bytes::from_static(b"c")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "v".into())],
    };
    let expected = lw.properties.message.clone();
    let a = Raw::v5(broker.mqtt(), "wp-a", |c| c.will = Some(lw)).await;
    drop(a);
    let got = w.recv_publish().await;
    assert_eq!(&got.payload[..], b"bye");
    let mut props = got.properties.message.clone();
    assert!(props.message_expiry_interval.is_some_and(|s| (95..=100).contains(&s)));
    props.message_expiry_interval = Some(100);
    assert_eq!(props, expected);
    w.ack(&got).await;
    // And it was retained.
    let mut late = Raw::v5(broker.mqtt(), "wp-late", |_| {}).await;
    late.subscribe("wp/a", QoS::AtLeastOnce).await;
    let got = late.recv_publish().await;
    assert!(got.retain && &got.payload[..] == b"bye");
}

#[tokio::test]
async fn takeover_with_clean_start_publishes_a_delayed_will_at_once() {
    // Clean start ends the old session, and a will is due when its session ends.
    let broker = TestBroker::start().await;
    let mut w = Raw::v5(broker.mqtt(), "wcs-obs", |_| {}).await;
    w.subscribe("wcs/#", QoS::AtLeastOnce).await;
    let mut a = Raw::v5(broker.mqtt(), "wcs-a", |c| {
        c.properties.session_expiry_interval = Some(30);
        c.will = Some(delayed_will("wcs/a", b"ended", 20));
    })
    .await;
    let (_b, ack) = Raw::v5_connack(broker.mqtt(), "wcs-a", |_| {}).await;
    assert!(!ack.session_present);
    assert_eq!(a.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    let got = w.recv_publish().await; // within WAIT, long before the 20 s delay
    assert_eq!(&got.payload[..], b"ended");
}

#[tokio::test]
async fn unsubscribing_a_shared_subscription_removes_it() {
    let broker = TestBroker::start().await;
    let mut s = Raw::v5(broker.mqtt(), "shu", |_| {}).await;
    s.subscribe("$share/g/shu/t", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(broker.mqtt(), "shu-pub", |_| {}).await;
    p.publish(publish("shu/t", b"1", QoS::AtMostOnce)).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"1");
    s.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 9,
        filters: vec!["$share/g/shu/t".into(), "$share/other/shu/t".into()],
        user_properties: vec![],
    }))
    .await;
    assert!(matches!(s.recv().await, Packet::UnsubAck(u) if u.reasons == vec![0x00, 0x11]));
    assert_eq!(p.publish(publish("shu/t", b"2", QoS::AtLeastOnce)).await.unwrap().reason, 0x10);
    s.expect_silence().await;
}
