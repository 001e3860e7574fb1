//! Conformance checks about sessions that take the broker's address, so
//! the same check runs against one broker (`tests/broker`) and through a
//! round-robin proxy over a fleet (`tests/cluster`, where each connection
//! a check opens lands on another node). Each opens its own connections,
//! with client ids of its own, and waits as the single-node tests always
//! did: [`WAIT`] for what must come, [`QUIET`] for what must not.

use super::raw::{publish, Raw, QUIET, WAIT};
use kadmq::protocol::{Connect, ConnectReason, DisconnectReason, Packet as P, PubAck, QoS as Q};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// A persistent 3.1.1 session is present again with its subscription; a clean session discards it
/// and leaves nothing behind.
pub async fn clean_session_flag_and_subscriptions_across_reconnects(addr: SocketAddr) {
    let (mut publisher, _) = Raw::v311(addr, "cs-pub", true).await;

    // First persistent connection: no session yet.
    let (mut sub, present) = Raw::v311(addr, "cs-sub", false).await;
    assert!(!present, "a new session is not present");
    assert_eq!(sub.subscribe_id(1, &[("cs/t", Q::AtLeastOnce)]).await, vec![1]);
    sub.disconnect().await;

    // Persistent again: session present, the subscription still works.
    let (mut sub, present) = Raw::v311(addr, "cs-sub", false).await;
    assert!(present, "the persistent session must be present");
    publisher.publish_with_id("cs/t", b"one", Q::AtLeastOnce, false, 1).await;
    let got = sub.recv_publish().await;
    assert_eq!((&got.payload[..], got.qos), (&b"one"[..], Q::AtLeastOnce));
    sub.complete(&got).await;
    sub.disconnect().await;

    // Clean session: the old session is discarded, the subscription with it.
    let (mut sub, present) = Raw::v311(addr, "cs-sub", true).await;
    assert!(!present, "clean session never reports a present session");
    publisher.publish_with_id("cs/t", b"two", Q::AtLeastOnce, false, 2).await;
    sub.expect_silence().await;
    sub.disconnect().await;

    // And nothing was kept after the clean session ended.
    let (mut sub, present) = Raw::v311(addr, "cs-sub", false).await;
    assert!(!present, "a clean session leaves no session behind");
    publisher.publish_with_id("cs/t", b"three", Q::AtLeastOnce, false, 3).await;
    sub.expect_silence().await;
}

/// A second 3.1.1 connection with the same id takes over: the first is closed without a packet, the
/// second is the live one.
pub async fn same_client_id_takes_over_and_first_is_disconnected(addr: SocketAddr) {
    let (mut first, _) = Raw::v311(addr, "twin", true).await;
    let (mut second, present) = Raw::v311(addr, "twin", true).await;
    assert!(!present);
    let before = first.expect_closed(WAIT).await;
    assert!(before.is_empty(), "3.1.1: no packet before the close, got {before:?}");
    // The new connection is the live one.
    second.ping().await;
    assert_eq!(second.subscribe_id(1, &[("twin/t", Q::AtMostOnce)]).await, vec![0]);
}

/// QoS 1 messages a persistent session did not acknowledge come again on its next connection, DUP
/// set, same packet ids, and not a third time once acknowledged.
pub async fn unacked_qos1_is_redelivered_with_dup_and_same_ids_after_reconnect(addr: SocketAddr) {
    let (mut sub, _) = Raw::v311(addr, "redeliver", false).await;
    sub.subscribe_id(1, &[("rd/t", Q::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::v311(addr, "redeliver-pub", true).await;
    for i in 0..3u8 {
        publisher.publish_with_id("rd/t", &[i], Q::AtLeastOnce, false, 10 + i as u16).await;
    }
    let mut first = BTreeMap::new();
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        assert!(!p.dup);
        first.insert(p.packet_id.unwrap(), p.payload.to_vec());
    }
    drop(sub); // no PUBACK

    let (mut sub, present) = Raw::v311(addr, "redeliver", false).await;
    assert!(present);
    let mut again = BTreeMap::new();
    for _ in 0..3 {
        let p = sub.recv_publish().await;
        assert!(p.dup, "a resent PUBLISH must have DUP=1: {p:?}");
        assert_eq!(p.qos, Q::AtLeastOnce);
        again.insert(p.packet_id.unwrap(), p.payload.to_vec());
        sub.complete(&p).await;
    }
    assert_eq!(first, again, "same packet ids, same payloads");
    sub.expect_silence().await;
    sub.disconnect().await;

    // Acknowledged now: not sent a third time.
    let (mut sub, _) = Raw::v311(addr, "redeliver", false).await;
    sub.expect_silence().await;
}

/// A QoS 2 flow the subscriber left after its PUBREC resumes with the PUBREL, not the PUBLISH.
pub async fn unreleased_qos2_is_resumed_with_pubrel_after_reconnect(addr: SocketAddr) {
    let (mut sub, _) = Raw::v311(addr, "q2-resume", false).await;
    sub.subscribe_id(1, &[("q2r/t", Q::ExactlyOnce)]).await;
    let (mut publisher, _) = Raw::v311(addr, "q2-resume-pub", true).await;
    publisher.publish_with_id("q2r/t", b"x", Q::ExactlyOnce, false, 1).await;
    let p = sub.recv_publish().await;
    let id = p.packet_id.unwrap();
    sub.send(&P::PubRec(PubAck::new(id))).await;
    assert_eq!(sub.recv().await, P::PubRel(PubAck::new(id)));
    drop(sub); // no PUBCOMP

    let (mut sub, present) = Raw::v311(addr, "q2-resume", false).await;
    assert!(present);
    assert_eq!(sub.recv().await, P::PubRel(PubAck::new(id)), "the PUBREL is sent again, not the PUBLISH");
    sub.send(&P::PubComp(PubAck::new(id))).await;
    sub.expect_silence().await;
}

/// What an offline persistent session was sent at QoS 1 and 2 comes on its next connection, in
/// order; QoS 0 is not queued.
pub async fn offline_persistent_session_gets_qos1_and_qos2_on_reconnect(addr: SocketAddr) {
    let (mut sub, _) = Raw::v311(addr, "offline", false).await;
    sub.subscribe_id(1, &[("off/1", Q::AtLeastOnce), ("off/2", Q::ExactlyOnce), ("off/0", Q::ExactlyOnce)]).await;
    sub.disconnect().await;

    let (mut publisher, _) = Raw::v311(addr, "offline-pub", true).await;
    for i in 0..5u8 {
        publisher.publish_with_id("off/1", &[i], Q::AtLeastOnce, false, 1).await;
        publisher.publish_with_id("off/2", &[i], Q::ExactlyOnce, false, 2).await;
        publisher.publish_with_id("off/0", &[i], Q::AtMostOnce, false, 0).await;
    }
    publisher.ping().await;

    let (mut sub, present) = Raw::v311(addr, "offline", false).await;
    assert!(present);
    let got = sub.drain(QUIET).await;
    let of = |topic: &str, qos: Q| -> Vec<u8> {
        got.iter().filter(|p| p.topic == topic).inspect(|p| assert_eq!(p.qos, qos)).map(|p| p.payload[0]).collect()
    };
    assert_eq!(of("off/1", Q::AtLeastOnce), vec![0, 1, 2, 3, 4], "QoS 1 in order");
    assert_eq!(of("off/2", Q::ExactlyOnce), vec![0, 1, 2, 3, 4], "QoS 2 in order");
    assert_eq!(of("off/0", Q::AtMostOnce), Vec::<u8>::new(), "QoS 0 is not queued offline by default");
}

/// Taking over a persistent session resumes it: session present, the unacknowledged message again
/// (DUP, same packet id), then new ones.
pub async fn takeover_of_a_persistent_session_keeps_it(addr: SocketAddr) {
    let (mut first, _) = Raw::v311(addr, "tk-persist", false).await;
    first.subscribe_id(1, &[("tk/t", Q::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::v311(addr, "tk-pub", true).await;
    publisher.publish_with_id("tk/t", b"unacked", Q::AtLeastOnce, false, 1).await;
    let p = first.recv_publish().await;

    let (mut second, present) = Raw::v311(addr, "tk-persist", false).await;
    assert!(present, "taking over a persistent session resumes it");
    first.expect_closed(WAIT).await;
    let again = second.recv_publish().await;
    assert_eq!((&again.payload[..], again.dup, again.packet_id), (&b"unacked"[..], true, p.packet_id));
    second.complete(&again).await;
    publisher.publish_with_id("tk/t", b"next", Q::AtLeastOnce, false, 2).await;
    let next = second.recv_publish().await;
    assert_eq!(&next.payload[..], b"next");
    second.complete(&next).await;
    second.expect_silence().await;
}

/// 5.0: a second connection with the same id takes over a persistent session; the first gets
/// DISCONNECT 0x8E Session taken over, the second has the subscription.
pub async fn second_connection_with_same_id_takes_over_with_0x8e(addr: SocketAddr) {
    let expiry = |c: &mut Connect| c.properties.session_expiry_interval = Some(60);
    let mut first = Raw::v5(addr, "dup", expiry).await;
    first.subscribe("dup/t", Q::AtLeastOnce).await;
    let (mut second, ack) = Raw::v5_connack(addr, "dup", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert!(ack.session_present, "persistent session not handed over");
    let d = first.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::SessionTakenOver);
    // The new connection has the subscription.
    let mut p = Raw::v5(addr, "dup-pub", |_| {}).await;
    p.publish(publish("dup/t", b"x", Q::AtLeastOnce)).await;
    assert_eq!(second.recv_publish().await.topic, "dup/t");
}
