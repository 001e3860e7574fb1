//! Limits on what one client may make a node hold (issue 8): each answered
//! with the protocol's reason code, counted, and the node keeps serving.

use crate::common::{assert_broker_serves, TestBroker};
use crate::support::raw::{connect_v311, encode311, opts, publish, publish_packet, will, Raw, Read, WAIT};
use crate::support::wait::wait_until_async;
use kadmq::broker::limits::Limit;
use kadmq::protocol::{ConnectReason, DisconnectReason, Packet, PubAck, QoS, Unsubscribe, Version};
use std::time::Duration;

/// The crash input of issue 8: a filter of 65,535 `/` (65,536 empty levels).
fn crash_filter() -> String {
    "/".repeat(65_535)
}

fn hits(broker: &TestBroker, limit: Limit) -> u64 {
    broker.server.as_ref().unwrap().broker.limits.count(limit)
}

#[tokio::test]
async fn the_deep_filter_that_crashed_a_node_is_refused_and_the_node_serves_on() {
    let broker = TestBroker::start().await;
    let mut c = Raw::v5(broker.mqtt(), "deep5", |_| {}).await;
    let ack =
        c.subscribe_with(&[(&crash_filter(), opts(QoS::AtLeastOnce)), ("ok/+", opts(QoS::AtLeastOnce))], None).await;
    assert_eq!(ack.reasons, vec![0x8F, 0x01], "over max_topic_levels: 0x8F for that filter only");
    // 3.1.1: 0x80 for the filter.
    let (mut old, _) = Raw::v311(broker.mqtt(), "deep311", true).await;
    assert_eq!(old.subscribe_id(1, &[(&crash_filter(), QoS::AtMostOnce)]).await, vec![0x80]);
    assert!(hits(&broker, Limit::TopicLength) + hits(&broker, Limit::TopicLevels) >= 2);
    assert_broker_serves(broker.mqtt()).await;
}

/// With the limits raised as far as they go, the same filter is accepted and
/// matched: no walk over it recurses per level (the tokio workers' 2 MiB
/// stacks would overflow).
#[tokio::test]
async fn a_65536_level_filter_is_subscribed_matched_and_removed_when_allowed() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_topic_levels = 1_000_000;
        c.mqtt.max_topic_length = 65_535;
    })
    .await;
    let filter = crash_filter();
    let mut sub = Raw::v5(broker.mqtt(), "deep-sub", |_| {}).await;
    sub.subscribe(&filter, QoS::AtLeastOnce).await;
    let mut publisher = Raw::v5(broker.mqtt(), "deep-pub", |_| {}).await;
    publisher.publish(publish(&filter, b"deep", QoS::AtLeastOnce)).await;
    let got = sub.recv_publish().await;
    assert_eq!((got.topic.len(), &got.payload[..]), (65_535, &b"deep"[..]));
    // Retained on that topic, then found by `#`.
    let mut retained = publish(&filter, b"kept", QoS::AtLeastOnce);
    retained.retain = true;
    publisher.publish(retained).await;
    sub.ack(&got).await;
    let _live = sub.recv_publish().await;
    let mut late = Raw::v5(broker.mqtt(), "deep-late", |_| {}).await;
    late.subscribe("#", QoS::AtMostOnce).await;
    assert_eq!(&late.recv_publish().await.payload[..], b"kept");
    let packet_id = sub.packet_id();
    sub.send(&Packet::Unsubscribe(Unsubscribe { packet_id, filters: vec![filter], user_properties: vec![] })).await;
    assert!(matches!(sub.recv().await, Packet::UnsubAck(a) if a.reasons == vec![0x00]));
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn a_publish_over_the_topic_limits_is_refused_as_its_version_and_qos_allow() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_topic_levels = 4).await;
    let deep = "a/b/c/d/e";
    let mut watcher = Raw::v5(broker.mqtt(), "watch", |_| {}).await;
    watcher.subscribe("#", QoS::AtMostOnce).await;

    let mut c = Raw::v5(broker.mqtt(), "p5", |_| {}).await;
    let ack = c.publish(publish(deep, b"x", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(ack.reason, 0x90, "QoS 1: PUBACK Topic Name invalid");
    let mut qos2 = publish(deep, b"x", QoS::ExactlyOnce);
    qos2.packet_id = Some(c.packet_id());
    c.send(&Packet::Publish(qos2)).await;
    assert!(matches!(c.recv().await, Packet::PubRec(a) if a.reason == 0x90), "QoS 2: PUBREC 0x90");
    // Still connected: a publish within the limits goes through.
    c.publish(publish("a/b/c/d", b"fine", QoS::AtLeastOnce)).await.unwrap();
    assert_eq!(watcher.recv_publish().await.topic, "a/b/c/d", "nothing over the limit was routed");
    // QoS 0 has no acknowledgement: DISCONNECT 0x90.
    c.send(&Packet::Publish(publish(deep, b"x", QoS::AtMostOnce))).await;
    assert_eq!(c.disconnected().await.reason, DisconnectReason::TopicNameInvalid);
    // 3.1.1 has no reason codes in PUBACK: the connection is closed.
    let (mut old, _) = Raw::v311(broker.mqtt(), "p311", true).await;
    old.send_bytes(&encode311(&publish_packet(deep, b"x", QoS::AtLeastOnce, false, Some(1)))).await;
    assert!(old.expect_closed(WAIT).await.is_empty());
    watcher.expect_silence().await;
    assert_eq!(hits(&broker, Limit::TopicLevels), 4);
}

#[tokio::test]
async fn unsubscribe_and_wills_over_the_topic_limits_are_refused() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_topic_length = 8).await;
    let mut c = Raw::v5(broker.mqtt(), "u5", |_| {}).await;
    let packet_id = c.packet_id();
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id,
        filters: vec!["a/very/long/filter".into(), "short".into()],
        user_properties: vec![],
    }))
    .await;
    match c.recv().await {
        Packet::UnsubAck(ack) => assert_eq!(ack.reasons, vec![0x8F, 0x11]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let (_, ack) = Raw::v5_connack(broker.mqtt(), "w5", |c| {
        c.will = Some(will("a/long/will/topic", b"bye", QoS::AtLeastOnce, false))
    })
    .await;
    assert_eq!(ack.code, ConnectReason::TopicNameInvalid);
    assert_eq!(hits(&broker, Limit::TopicLength), 2);
}

#[tokio::test]
async fn subscriptions_per_client_are_bounded_with_quota_exceeded() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_subscriptions_per_client = 2).await;
    let mut c = Raw::v5(broker.mqtt(), "many", |_| {}).await;
    let q = opts(QoS::AtMostOnce);
    let ack = c.subscribe_with(&[("a", q), ("b", q), ("c", q), ("a", q)], None).await;
    assert_eq!(ack.reasons, vec![0x00, 0x00, 0x97, 0x00], "a third is refused, a repeat is fine");
    let (mut old, _) = Raw::v311(broker.mqtt(), "many311", true).await;
    assert_eq!(
        old.subscribe_id(1, &[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce), ("c", QoS::AtMostOnce)]).await,
        vec![0x00, 0x00, 0x80]
    );
    assert_eq!(hits(&broker, Limit::Subscriptions), 2);
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_not_kept_waiting() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_connections = 2).await;
    let first = Raw::v5(broker.mqtt(), "c1", |_| {}).await;
    let _second = Raw::v5(broker.mqtt(), "c2", |_| {}).await;
    let (_, ack) = Raw::v5_connack(broker.mqtt(), "c3", |_| {}).await;
    assert_eq!(ack.code, ConnectReason::QuotaExceeded);
    let (_, ack) = Raw::connect(broker.mqtt(), connect_v311("c3-311", true, 30)).await;
    assert_eq!(ack.code, ConnectReason::ServerUnavailable, "3.1.1: return code 3");
    assert_eq!(hits(&broker, Limit::Connections), 2);
    // A freed slot takes the next client.
    first.disconnect_with(DisconnectReason::NormalDisconnection).await;
    let addr = broker.mqtt();
    wait_until_async(WAIT, "the slot to be freed", move || async move {
        let (_, ack) = Raw::v5_connack(addr, "c4", |_| {}).await;
        ack.code == ConnectReason::Success
    })
    .await;
}

#[tokio::test]
async fn queued_bytes_per_session_are_bounded() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_queued_bytes = 1_000).await;
    let mut sub = Raw::v5(broker.mqtt(), "slow", |c| {
        c.clean_start = true;
        c.properties.session_expiry_interval = Some(600);
    })
    .await;
    sub.subscribe("q/#", QoS::AtLeastOnce).await;
    sub.disconnect_with(DisconnectReason::NormalDisconnection).await;
    let mut publisher = Raw::v5(broker.mqtt(), "fast", |_| {}).await;
    // 10 messages of 3 + 297 = 300 bytes: the offline queue holds 3 (900 bytes).
    for _ in 0..10 {
        publisher.publish(publish("q/1", &[7; 297], QoS::AtLeastOnce)).await.unwrap();
    }
    let mut back = Raw::v5(broker.mqtt(), "slow", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
    })
    .await;
    let mut got = 0;
    while let Read::Packet(Packet::Publish(p)) = back.read(Duration::from_millis(500)).await {
        back.ack(&p).await;
        got += 1;
    }
    assert_eq!(got, 3);
    assert_eq!(hits(&broker, Limit::QueuedBytes), 7);
}

#[tokio::test]
async fn max_inflight_caps_what_a_client_has_unacknowledged() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_inflight = 2).await;
    // A 3.1.1 client announces no window of its own.
    let (mut sub, _) = Raw::v311(broker.mqtt(), "window", true).await;
    sub.subscribe_id(1, &[("w", QoS::AtLeastOnce)]).await;
    let mut publisher = Raw::v5(broker.mqtt(), "pub", |_| {}).await;
    for _ in 0..5 {
        publisher.publish(publish("w", b"m", QoS::AtLeastOnce)).await.unwrap();
    }
    let first = sub.recv_publish().await;
    let _second = sub.recv_publish().await;
    sub.expect_silence().await;
    sub.send(&Packet::PubAck(PubAck::new(first.packet_id.unwrap()))).await;
    let _third = sub.recv_publish().await;
    sub.expect_silence().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_publish_rate_is_slowed_not_dropped() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_publish_rate = 20).await;
    let mut sub = Raw::v5(broker.mqtt(), "rate-sub", |_| {}).await;
    sub.subscribe("r", QoS::AtMostOnce).await;
    let mut publisher = Raw::v5(broker.mqtt(), "rate-pub", |c| c.keep_alive = 1).await;
    // 60 at once: 20 pass at once (one second's allowance), 40 more take 2 s.
    let mut burst = Vec::new();
    for i in 0..60u8 {
        let mut out = bytes::BytesMut::new();
        kadmq::protocol::encode(&Packet::Publish(publish("r", &[i], QoS::AtMostOnce)), Version::V5, &mut out).unwrap();
        burst.extend_from_slice(&out);
    }
    let start = tokio::time::Instant::now();
    publisher.send_bytes(&burst).await;
    for i in 0..60u8 {
        let got = match sub.read(Duration::from_secs(10)).await {
            Read::Packet(Packet::Publish(p)) => p,
            other => panic!("message {i}: expected PUBLISH, got {other:?}"),
        };
        assert_eq!(&got.payload[..], &[i], "in order, none lost");
    }
    assert!(start.elapsed() >= Duration::from_millis(1_500), "40 over the allowance took {:?}", start.elapsed());
    assert!(hits(&broker, Limit::PublishRate) > 0);
    // Slowed, not disconnected (keep-alive 1 s did not fire while held back).
    publisher.send(&Packet::PingReq).await;
    assert!(matches!(publisher.recv().await, Packet::PingResp));
}

#[tokio::test]
async fn limit_hits_are_in_the_metrics() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_topic_levels = 2;
        c.listeners.http = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut c = Raw::v5(broker.mqtt(), "m", |_| {}).await;
    let ack = c.subscribe_with(&[("a/b/c", opts(QoS::AtMostOnce))], None).await;
    assert_eq!(ack.reasons, vec![0x8F]);
    let text = kadmq::http::render_metrics(&broker.server.as_ref().unwrap().broker, None);
    assert!(text.contains("kadmq_limit_hits_total{limit=\"topic_levels\"} 1"), "{text}");
    assert!(text.contains("kadmq_limit_hits_total{limit=\"connections\"} 0"), "{text}");
}
