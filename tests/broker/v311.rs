//! MQTT 3.1.1 behaviour: rumqttc (v4 API) clients and raw sockets against an
//! in-process broker on 127.0.0.1.

use crate::common::TestBroker;
use crate::support::checks;
use crate::support::mqtt::Client;
use crate::support::raw::{connect_v311, encode311, publish_packet, will, Raw, Read, QUIET, WAIT};
use kadmq::protocol::{ConnectReason, Packet as P, PubAck, QoS as Q, Version};
use rumqttc::{Event, Outgoing, Packet, QoS, SubscribeReasonCode};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A 3.1.1 CONNECT written by hand (protocol name "MQTT").
fn connect_bytes(level: u8, client_id: &str, flags: u8, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Reads exactly `n` bytes (or what came before the close) within [`WAIT`].
async fn read_exact_bytes(raw: &mut Raw, n: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = vec![0u8; n];
    tokio::time::timeout(WAIT, raw.stream.read_exact(&mut out)).await.expect("bytes in time").expect("bytes");
    out
}

async fn expect_eof(raw: &mut Raw) {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, raw.stream.read_to_end(&mut rest))
        .await
        .expect("broker closes the connection in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing may follow, got {rest:02x?}");
}

// --- CONNECT / CONNACK -------------------------------------------------------

#[tokio::test]
async fn connack_unsupported_protocol_level_is_code_1_then_close() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(broker.mqtt(), Version::V311).await;
    raw.send_bytes(&connect_bytes(6, "lvl", 0x02, 30)).await;
    assert_eq!(read_exact_bytes(&mut raw, 4).await, [0x20, 0x02, 0x00, 0x01]);
    expect_eof(&mut raw).await;
}

#[tokio::test]
async fn connack_empty_client_id_without_clean_session_is_code_2_then_close() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(broker.mqtt(), Version::V311).await;
    raw.send_bytes(&connect_bytes(4, "", 0x00, 30)).await;
    assert_eq!(read_exact_bytes(&mut raw, 4).await, [0x20, 0x02, 0x00, 0x02]);
    expect_eof(&mut raw).await;
}

#[tokio::test]
async fn connack_empty_client_id_with_clean_session_is_accepted() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(broker.mqtt(), Version::V311).await;
    raw.send_bytes(&connect_bytes(4, "", 0x02, 30)).await;
    assert_eq!(read_exact_bytes(&mut raw, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // And the connection works: subscribe and receive our own message.
    assert_eq!(raw.subscribe_id(1, &[("anon/t", Q::AtMostOnce)]).await, vec![0]);
    raw.send(&publish_packet("anon/t", b"x", Q::AtMostOnce, false, None)).await;
    assert_eq!(&raw.recv_publish().await.payload[..], b"x");
}

#[tokio::test]
async fn pingreq_gets_pingresp() {
    let broker = TestBroker::start().await;
    let (mut raw, _) = Raw::v311(broker.mqtt(), "pinger", true).await;
    raw.send_bytes(&[0xC0, 0x00]).await;
    assert_eq!(read_exact_bytes(&mut raw, 2).await, [0xD0, 0x00]);
    raw.send_bytes(&[0xC0, 0x00, 0xC0, 0x00]).await;
    assert_eq!(read_exact_bytes(&mut raw, 4).await, [0xD0, 0x00, 0xD0, 0x00]);
}

// --- sessions ----------------------------------------------------------------

#[tokio::test]
async fn clean_session_flag_and_subscriptions_across_reconnects() {
    let broker = TestBroker::start().await;
    checks::clean_session_flag_and_subscriptions_across_reconnects(broker.mqtt()).await;
}

#[tokio::test]
async fn rumqttc_persistent_session_keeps_subscription() {
    let broker = TestBroker::start().await;
    let mut o = Client::options("rq-sub", broker.port());
    o.set_clean_session(false);
    let (mut sub, ack) = Client::connect(o.clone()).await;
    assert!(!ack.session_present);
    assert_eq!(sub.subscribe("rq/#", QoS::AtLeastOnce).await, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    sub.client.disconnect().await.unwrap();
    sub.wait_for("event", |e| matches!(e, Event::Outgoing(Outgoing::Disconnect)).then_some(())).await;
    drop(sub);

    let (mut publisher, _) = Client::connect(Client::options("rq-pub", broker.port())).await;
    publisher.client.publish("rq/x", QoS::AtLeastOnce, false, "offline").await.unwrap();
    publisher.wait_for("event", |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await;

    let (mut sub, ack) = Client::connect(o).await;
    assert!(ack.session_present);
    let p = sub.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("rq/x", &b"offline"[..], QoS::AtLeastOnce));
}

#[tokio::test]
async fn same_client_id_takes_over_and_first_is_disconnected() {
    let broker = TestBroker::start().await;
    checks::same_client_id_takes_over_and_first_is_disconnected(broker.mqtt()).await;
}

// --- keep-alive and wills -----------------------------------------------------

#[tokio::test(start_paused = true)]
async fn keep_alive_is_enforced_at_one_and_a_half_times_and_publishes_the_will() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = Raw::v311(broker.mqtt(), "ka-watch", true).await;
    watcher.subscribe_id(1, &[("will/ka", Q::AtLeastOnce)]).await;

    let mut connect = connect_v311("ka-client", true, 1);
    connect.will = Some(will("will/ka", b"gone", Q::AtLeastOnce, false));
    let (mut silent, ack) = Raw::connect(broker.mqtt(), connect).await;
    assert_eq!(ack.code, ConnectReason::Success);
    let start = tokio::time::Instant::now();
    let before = silent.expect_closed(Duration::from_secs(4)).await;
    let elapsed = start.elapsed();
    assert!(before.is_empty(), "{before:?}");
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed <= Duration::from_millis(2600),
        "keep-alive 1s must close after ~1.5s, closed after {elapsed:?}"
    );
    let w = watcher.recv_publish().await;
    assert_eq!((w.topic.as_str(), &w.payload[..]), ("will/ka", &b"gone"[..]));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_is_reset_by_any_packet() {
    let broker = TestBroker::start().await;
    let (mut c, _) = Raw::connect(broker.mqtt(), connect_v311("ka-busy", true, 1)).await;
    // 3 s of PINGREQs every 0.5 s: never 1.5 s of silence.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.ping().await;
    }
}

#[tokio::test]
async fn will_is_published_when_the_socket_drops() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = Raw::v311(broker.mqtt(), "will-watch", true).await;
    watcher.subscribe_id(1, &[("will/#", Q::ExactlyOnce)]).await;

    let mut connect = connect_v311("will-drop", true, 30);
    connect.will = Some(will("will/drop", b"lost", Q::ExactlyOnce, false));
    let (c, _) = Raw::connect(broker.mqtt(), connect).await;
    drop(c);
    let w = watcher.recv_publish().await;
    assert_eq!((w.topic.as_str(), &w.payload[..], w.qos), ("will/drop", &b"lost"[..], Q::ExactlyOnce));
    watcher.complete(&w).await;
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = Raw::v311(broker.mqtt(), "nowill-watch", true).await;
    watcher.subscribe_id(1, &[("will/#", Q::AtLeastOnce)]).await;

    let mut connect = connect_v311("will-clean", true, 30);
    connect.will = Some(will("will/clean", b"should not appear", Q::AtLeastOnce, false));
    let (c, _) = Raw::connect(broker.mqtt(), connect).await;
    c.disconnect().await;
    watcher.expect_silence().await;
}

#[tokio::test]
async fn retained_will_is_kept_for_later_subscribers() {
    let broker = TestBroker::start().await;
    let mut connect = connect_v311("will-retain", true, 30);
    connect.will = Some(will("will/retained", b"offline", Q::AtLeastOnce, true));
    let (c, _) = Raw::connect(broker.mqtt(), connect).await;
    drop(c);
    // Poll until the broker has noticed the drop and retained the will.
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut late, _) = Raw::v311(broker.mqtt(), "will-late", true).await;
        late.subscribe_id(1, &[("will/retained", Q::AtLeastOnce)]).await;
        match late.read(Duration::from_millis(200)).await {
            Read::Packet(P::Publish(p)) => {
                assert!(p.retain);
                assert_eq!(&p.payload[..], b"offline");
                return;
            }
            Read::Silent if Instant::now() < deadline => continue,
            other => panic!("retained will not delivered: {other:?}"),
        }
    }
}

// --- QoS flows -----------------------------------------------------------------

#[tokio::test]
async fn rumqttc_qos_0_1_2_both_directions_with_full_ack_flows() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Client::connect(Client::options("flow-sub", broker.port())).await;
    assert_eq!(sub.subscribe("flow/#", QoS::ExactlyOnce).await, vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]);
    let (mut publisher, _) = Client::connect(Client::options("flow-pub", broker.port())).await;

    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        let topic = format!("flow/{i}");
        publisher.client.publish(&topic, qos, false, format!("m{i}")).await.unwrap();
        // Publisher side of the flow.
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                publisher.wait_for("event", |e| matches!(e, Event::Incoming(Packet::PubAck(_))).then_some(())).await
            }
            QoS::ExactlyOnce => {
                publisher.wait_for("event", |e| matches!(e, Event::Incoming(Packet::PubRec(_))).then_some(())).await;
                publisher.wait_for("event", |e| matches!(e, Event::Outgoing(Outgoing::PubRel(_))).then_some(())).await;
                publisher.wait_for("event", |e| matches!(e, Event::Incoming(Packet::PubComp(_))).then_some(())).await;
            }
        }
        // Subscriber side.
        let p = sub.next_publish().await;
        assert_eq!((p.topic.as_str(), p.qos, p.retain), (topic.as_str(), qos, false));
        assert_eq!(p.payload, format!("m{i}").as_bytes());
        match qos {
            QoS::AtMostOnce => assert_eq!(p.pkid, 0),
            QoS::AtLeastOnce => {
                sub.wait_for("event", |e| matches!(e, Event::Outgoing(Outgoing::PubAck(_))).then_some(())).await
            }
            QoS::ExactlyOnce => {
                sub.wait_for("event", |e| matches!(e, Event::Outgoing(Outgoing::PubRec(_))).then_some(())).await;
                sub.wait_for("event", |e| matches!(e, Event::Incoming(Packet::PubRel(_))).then_some(())).await;
                sub.wait_for("event", |e| matches!(e, Event::Outgoing(Outgoing::PubComp(_))).then_some(())).await;
            }
        }
    }
    assert!(sub.publishes_until_quiet(QUIET).await.is_empty(), "each message exactly once");
}

#[tokio::test]
async fn raw_qos2_order_and_duplicate_publish_routed_once() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "q2-sub", true).await;
    assert_eq!(sub.subscribe_id(1, &[("q2/t", Q::ExactlyOnce)]).await, vec![2]);
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "q2-pub", true).await;

    // PUBLISH id 7 → PUBREC 7; the same PUBLISH again (DUP) → PUBREC 7 again.
    publisher.send(&publish_packet("q2/t", b"once", Q::ExactlyOnce, false, Some(7))).await;
    assert_eq!(publisher.recv().await, P::PubRec(PubAck::new(7)));
    let mut dup = publish_packet("q2/t", b"once", Q::ExactlyOnce, false, Some(7));
    if let P::Publish(p) = &mut dup {
        p.dup = true;
    }
    publisher.send(&dup).await;
    assert_eq!(publisher.recv().await, P::PubRec(PubAck::new(7)));
    publisher.send(&P::PubRel(PubAck::new(7))).await;
    assert_eq!(publisher.recv().await, P::PubComp(PubAck::new(7)));

    // The subscriber gets it once: PUBLISH → PUBREC → PUBREL → PUBCOMP.
    let p = sub.recv_publish().await;
    assert_eq!((&p.payload[..], p.qos, p.dup), (&b"once"[..], Q::ExactlyOnce, false));
    let id = p.packet_id.expect("QoS 2 has a packet id");
    sub.send(&P::PubRec(PubAck::new(id))).await;
    assert_eq!(sub.recv().await, P::PubRel(PubAck::new(id)));
    sub.send(&P::PubComp(PubAck::new(id))).await;
    sub.expect_silence().await;

    // After PUBREL the id is free again: a new message with id 7 is routed.
    publisher.publish_with_id("q2/t", b"again", Q::ExactlyOnce, false, 7).await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"again");
    sub.complete(&p).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn raw_qos1_publisher_gets_puback_with_its_packet_id() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "q1-sub", true).await;
    sub.subscribe_id(1, &[("q1/t", Q::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "q1-pub", true).await;
    for id in [1u16, 500, 65535] {
        publisher.publish_with_id("q1/t", &id.to_be_bytes(), Q::AtLeastOnce, false, id).await;
        let p = sub.recv_publish().await;
        assert_eq!((&p.payload[..], p.qos), (&id.to_be_bytes()[..], Q::AtLeastOnce));
        sub.complete(&p).await;
    }
}

#[tokio::test]
async fn granted_qos_is_requested_and_delivered_qos_is_the_minimum() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "min-sub", true).await;
    let granted =
        sub.subscribe_id(1, &[("m/0", Q::AtMostOnce), ("m/1", Q::AtLeastOnce), ("m/2", Q::ExactlyOnce)]).await;
    assert_eq!(granted, vec![0, 1, 2]);
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "min-pub", true).await;
    let levels = [Q::AtMostOnce, Q::AtLeastOnce, Q::ExactlyOnce];
    let mut id = 1;
    for sub_qos in levels {
        for pub_qos in levels {
            let topic = format!("m/{}", sub_qos as u8);
            publisher.publish_with_id(&topic, &[pub_qos as u8], pub_qos, false, id).await;
            id += 1;
            let p = sub.recv_publish().await;
            assert_eq!(p.topic, topic);
            assert_eq!(p.payload[..], [pub_qos as u8]);
            assert_eq!(p.qos, pub_qos.min(sub_qos), "published at {pub_qos:?}, subscribed at {sub_qos:?}");
            assert_eq!(p.packet_id.is_some(), p.qos != Q::AtMostOnce);
            sub.complete(&p).await;
        }
    }
    sub.expect_silence().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "ovl-sub", true).await;
    let granted =
        sub.subscribe_id(1, &[("o/+", Q::AtMostOnce), ("o/#", Q::ExactlyOnce), ("o/x", Q::AtLeastOnce)]).await;
    assert_eq!(granted, vec![0, 2, 1]);
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "ovl-pub", true).await;
    publisher.publish_with_id("o/x", b"1", Q::ExactlyOnce, false, 1).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, Q::ExactlyOnce);
    sub.complete(&p).await;
    publisher.publish_with_id("o/x", b"2", Q::AtLeastOnce, false, 2).await;
    let p = sub.recv_publish().await;
    assert_eq!((&p.payload[..], p.qos), (&b"2"[..], Q::AtLeastOnce));
    sub.complete(&p).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn resubscribing_replaces_the_subscription_qos() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "resub", true).await;
    assert_eq!(sub.subscribe_id(1, &[("rs/t", Q::ExactlyOnce)]).await, vec![2]);
    assert_eq!(sub.subscribe_id(2, &[("rs/t", Q::AtMostOnce)]).await, vec![0]);
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "resub-pub", true).await;
    publisher.publish_with_id("rs/t", b"x", Q::ExactlyOnce, false, 1).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.qos, Q::AtMostOnce);
    sub.expect_silence().await;
}

#[tokio::test]
async fn unsubscribe_stops_deliveries() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "unsub", true).await;
    sub.subscribe_id(1, &[("us/t", Q::AtLeastOnce)]).await;
    sub.send(&P::Unsubscribe(kadmq::protocol::Unsubscribe {
        packet_id: 9,
        filters: vec!["us/t".into()],
        user_properties: vec![],
    }))
    .await;
    match sub.recv().await {
        P::UnsubAck(a) => assert_eq!(a.packet_id, 9),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "unsub-pub", true).await;
    publisher.publish_with_id("us/t", b"x", Q::AtLeastOnce, false, 1).await;
    sub.expect_silence().await;
}

// --- topic matching -------------------------------------------------------------

async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> Raw {
    let (mut c, _) = Raw::v311(addr, id, true).await;
    assert_eq!(c.subscribe_id(1, &[(filter, Q::AtMostOnce)]).await, vec![0], "filter {filter}");
    c
}

async fn topics_received(c: &mut Raw) -> BTreeSet<String> {
    c.drain(QUIET).await.into_iter().filter(|p| !p.retain).map(|p| p.topic).collect()
}

#[tokio::test]
async fn plus_and_hash_wildcards() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let filters = ["w/+/c", "w/#", "+/+", "w/+", "w/b/c", "#"];
    let mut subs = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        subs.push(subscriber(addr, &format!("wc-{i}"), f).await);
    }
    let (mut publisher, _) = Raw::v311(addr, "wc-pub", true).await;
    let topics = ["w", "w/b", "w/b/c", "w/b/d", "w//c", "x/y", "w/b/c/d", "/w"];
    for t in topics {
        publisher.send(&publish_packet(t, b"", Q::AtMostOnce, false, None)).await;
    }
    publisher.ping().await;
    let expected: [&[&str]; 6] = [
        &["w/b/c", "w//c"],
        &["w", "w/b", "w/b/c", "w/b/d", "w//c", "w/b/c/d"],
        &["w/b", "x/y", "/w"],
        &["w/b"],
        &["w/b/c"],
        &topics,
    ];
    let results = futures_util::future::join_all(subs.iter_mut().map(topics_received)).await;
    for ((filter, want), got) in filters.iter().zip(expected).zip(results) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "filter {filter}");
    }
}

#[tokio::test(start_paused = true)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let mut all = subscriber(addr, "dl-hash", "#").await;
    let mut plus = subscriber(addr, "dl-plus", "+/broker/#").await;
    let mut sys = subscriber(addr, "dl-sys", "$SYS/#").await;
    let mut app = subscriber(addr, "dl-app", "$app/+").await;

    // $SYS is published every second (retained, so also sent on subscribe).
    let got = sys.recv_publish().await;
    assert!(got.topic.starts_with("$SYS/broker/"), "{got:?}");
    let (mut publisher, _) = Raw::v311(addr, "dl-pub", true).await;
    publisher.send(&publish_packet("$app/x", b"1", Q::AtMostOnce, false, None)).await;
    publisher.send(&publish_packet("app/x", b"2", Q::AtMostOnce, false, None)).await;
    publisher.ping().await;
    assert_eq!(app.recv_publish().await.topic, "$app/x");
    // Let at least one $SYS round pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hash_topics = topics_received(&mut all).await;
    assert_eq!(hash_topics, BTreeSet::from(["app/x".to_string()]), "`#` must not match $-topics");
    let plus_topics = topics_received(&mut plus).await;
    assert!(plus_topics.is_empty(), "`+/broker/#` must not match $SYS: {plus_topics:?}");
    assert!(!topics_received(&mut sys).await.is_empty(), "$SYS/# keeps getting updates");
}

// --- retained messages ------------------------------------------------------------

#[tokio::test]
async fn retained_stored_replaced_cleared_and_flagged() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let (mut publisher, _) = Raw::v311(addr, "ret-pub", true).await;
    publisher.publish_with_id("ret/a", b"v1", Q::AtLeastOnce, true, 1).await;

    // Stored: a new subscriber gets it with retain=1.
    let (mut s1, _) = Raw::v311(addr, "ret-s1", true).await;
    s1.subscribe_id(1, &[("ret/+", Q::AtLeastOnce)]).await;
    let p = s1.recv_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.retain, p.qos), ("ret/a", &b"v1"[..], true, Q::AtLeastOnce));
    s1.complete(&p).await;

    // Replaced: the existing subscriber gets a normal delivery, retain=0.
    publisher.publish_with_id("ret/a", b"v2", Q::AtLeastOnce, true, 2).await;
    let p = s1.recv_publish().await;
    assert_eq!((&p.payload[..], p.retain), (&b"v2"[..], false), "live delivery must have retain=0");
    s1.complete(&p).await;

    // Retained QoS is capped by the subscription.
    let (mut s2, _) = Raw::v311(addr, "ret-s2", true).await;
    s2.subscribe_id(1, &[("ret/#", Q::AtMostOnce)]).await;
    let p = s2.recv_publish().await;
    assert_eq!((&p.payload[..], p.retain, p.qos), (&b"v2"[..], true, Q::AtMostOnce));
    s2.expect_silence().await;

    // Cleared by an empty retained payload.
    publisher.publish_with_id("ret/a", b"", Q::AtLeastOnce, true, 3).await;
    let (mut s3, _) = Raw::v311(addr, "ret-s3", true).await;
    s3.subscribe_id(1, &[("ret/#", Q::AtLeastOnce)]).await;
    s3.expect_silence().await;

    // A non-retained publish does not replace the retained one.
    publisher.publish_with_id("ret/b", b"kept", Q::AtMostOnce, true, 0).await;
    publisher.publish_with_id("ret/b", b"not kept", Q::AtMostOnce, false, 0).await;
    publisher.ping().await;
    let (mut s4, _) = Raw::v311(addr, "ret-s4", true).await;
    s4.subscribe_id(1, &[("ret/b", Q::AtMostOnce)]).await;
    let p = s4.recv_publish().await;
    assert_eq!((&p.payload[..], p.retain), (&b"kept"[..], true));
    s4.expect_silence().await;
}

#[tokio::test]
async fn retained_delivered_for_each_matching_topic_on_wildcard_subscribe() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "rw-pub", true).await;
    for t in ["rw/a", "rw/b", "rw/c/d", "other"] {
        publisher.publish_with_id(t, t.as_bytes(), Q::AtLeastOnce, true, 1).await;
    }
    let (mut sub, _) = Raw::v311(broker.mqtt(), "rw-sub", true).await;
    sub.subscribe_id(1, &[("rw/#", Q::AtLeastOnce)]).await;
    let got: BTreeSet<String> =
        sub.drain(QUIET).await.into_iter().inspect(|p| assert!(p.retain)).map(|p| p.topic).collect();
    assert_eq!(got, BTreeSet::from(["rw/a".into(), "rw/b".into(), "rw/c/d".into()]));
}

// --- shared subscriptions -----------------------------------------------------------

#[tokio::test]
async fn shared_subscription_delivers_each_message_to_exactly_one_member() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let mut members = Vec::new();
    for i in 0..3 {
        let (mut m, _) = Raw::v311(addr, &format!("share-{i}"), true).await;
        assert_eq!(m.subscribe_id(1, &[("$share/g/sh/t", Q::AtLeastOnce)]).await, vec![1]);
        members.push(m);
    }
    // A normal subscriber next to the group gets everything.
    let (mut plain, _) = Raw::v311(addr, "share-plain", true).await;
    plain.subscribe_id(1, &[("sh/t", Q::AtLeastOnce)]).await;

    let (mut publisher, _) = Raw::v311(addr, "share-pub", true).await;
    const N: usize = 30;
    for i in 0..N {
        publisher.publish_with_id("sh/t", i.to_string().as_bytes(), Q::AtLeastOnce, false, i as u16 + 1).await;
    }
    let per_member = futures_util::future::join_all(members.iter_mut().map(|m| m.drain(QUIET))).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, got) in per_member.iter().enumerate() {
        assert!(!got.is_empty(), "member {i} got nothing");
        for p in got {
            assert_eq!(p.topic, "sh/t");
            *seen.entry(String::from_utf8(p.payload.to_vec()).unwrap()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), N, "every message reaches the group: {seen:?}");
    assert!(seen.values().all(|&n| n == 1), "each message to exactly one member: {seen:?}");
    assert_eq!(plain.drain(QUIET).await.len(), N);
}

// --- inflight, redelivery, offline queue ------------------------------------------------

#[tokio::test]
async fn unacked_qos1_is_redelivered_with_dup_and_same_ids_after_reconnect() {
    let broker = TestBroker::start().await;
    checks::unacked_qos1_is_redelivered_with_dup_and_same_ids_after_reconnect(broker.mqtt()).await;
}

#[tokio::test]
async fn unreleased_qos2_is_resumed_with_pubrel_after_reconnect() {
    let broker = TestBroker::start().await;
    checks::unreleased_qos2_is_resumed_with_pubrel_after_reconnect(broker.mqtt()).await;
}

#[tokio::test]
async fn offline_persistent_session_gets_qos1_and_qos2_on_reconnect() {
    let broker = TestBroker::start().await;
    checks::offline_persistent_session_gets_qos1_and_qos2_on_reconnect(broker.mqtt()).await;
}

#[tokio::test]
async fn offline_queue_is_bounded_by_max_queued_messages() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_queued_messages = 5).await;
    let addr = broker.mqtt();
    let (mut sub, _) = Raw::v311(addr, "bounded", false).await;
    sub.subscribe_id(1, &[("bq/t", Q::AtLeastOnce)]).await;
    sub.disconnect().await;

    let (mut publisher, _) = Raw::v311(addr, "bounded-pub", true).await;
    for i in 0..8u8 {
        // The publisher is acknowledged even when the subscriber's queue is full.
        publisher.publish_with_id("bq/t", &[i], Q::AtLeastOnce, false, i as u16 + 1).await;
    }
    let (mut sub, _) = Raw::v311(addr, "bounded", false).await;
    let got: Vec<u8> = sub.drain(QUIET).await.iter().map(|p| p.payload[0]).collect();
    assert_eq!(got, vec![0, 1, 2, 3, 4], "the first 5 are kept, the excess dropped");
}

// --- $SYS ------------------------------------------------------------------------------

/// Reads `$SYS/broker/...` values until `done` holds for the latest ones.
async fn sys_until(c: &mut Raw, values: &mut HashMap<String, String>, done: impl Fn(&HashMap<String, String>) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(values) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.read(left).await {
            Read::Packet(P::Publish(p)) => {
                values.insert(
                    p.topic.trim_start_matches("$SYS/broker/").to_string(),
                    String::from_utf8_lossy(&p.payload).into(),
                );
            }
            other => panic!("$SYS values never satisfied the condition: {other:?}, last values {values:?}"),
        }
    }
}

fn num(values: &HashMap<String, String>, key: &str) -> u64 {
    let v = values.get(key).unwrap_or_else(|| panic!("no $SYS/broker/{key} in {values:?}"));
    v.split_whitespace().next().unwrap().parse().unwrap_or_else(|_| panic!("{key} = {v:?} is not a number"))
}

#[tokio::test]
async fn sys_topics_appear_and_change() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let (mut sys, _) = Raw::v311(addr, "sys-watch", true).await;
    sys.subscribe_id(1, &[("$SYS/broker/#", Q::AtMostOnce)]).await;
    let keys = ["uptime", "clients/connected", "messages/received", "messages/sent", "subscriptions/count"];
    let mut v = HashMap::new();
    sys_until(&mut sys, &mut v, |v| keys.iter().all(|k| v.contains_key(*k))).await;
    let uptime0 = num(&v, "uptime");
    assert!(v["uptime"].ends_with("seconds"), "{:?}", v["uptime"]);

    // Wait for a snapshot taken after our own subscription.
    sys_until(&mut sys, &mut v, |v| num(v, "subscriptions/count") >= 1 && num(v, "clients/connected") >= 1).await;
    let (received0, sent0, subs0, clients0) = (
        num(&v, "messages/received"),
        num(&v, "messages/sent"),
        num(&v, "subscriptions/count"),
        num(&v, "clients/connected"),
    );

    let (mut other, _) = Raw::v311(addr, "sys-other", true).await;
    other.subscribe_id(1, &[("sys/a", Q::AtMostOnce), ("sys/b", Q::AtMostOnce)]).await;
    for _ in 0..3 {
        other.send(&publish_packet("sys/a", b"x", Q::AtMostOnce, false, None)).await;
    }
    assert_eq!(other.drain(QUIET).await.len(), 3);

    sys_until(&mut sys, &mut v, |v| {
        num(v, "messages/received") >= received0 + 3
            && num(v, "messages/sent") >= sent0 + 3
            && num(v, "subscriptions/count") >= subs0 + 2
            && num(v, "clients/connected") > clients0
            && num(v, "uptime") > uptime0
    })
    .await;
}

#[tokio::test]
async fn packets_pipelined_with_connect_are_handled() {
    // Some clients write CONNECT and SUBSCRIBE/PUBLISH back to back; they
    // arrive in one read and must all be handled without further input.
    let broker = TestBroker::start().await;
    let mut bytes = encode311(&P::Connect(connect_v311("pipelined", true, 30)));
    bytes.extend(encode311(&P::Subscribe(kadmq::protocol::Subscribe {
        packet_id: 3,
        filters: vec![kadmq::protocol::SubscribeFilter {
            filter: "pipe/t".into(),
            options: kadmq::protocol::SubscriptionOptions::qos(Q::AtLeastOnce),
        }],
        subscription_identifier: None,
        user_properties: vec![],
    })));
    bytes.extend(encode311(&publish_packet("pipe/t", b"self", Q::AtLeastOnce, false, Some(4))));
    let mut c = Raw::open(broker.mqtt(), Version::V311).await;
    c.send_bytes(&bytes).await;
    assert!(matches!(c.recv().await, P::ConnAck(a) if a.code == ConnectReason::Success));
    assert!(matches!(c.recv().await, P::SubAck(a) if a.packet_id == 3 && a.reasons == vec![1]));
    let mut got_puback = false;
    let mut got_publish = false;
    while !(got_puback && got_publish) {
        match c.recv().await {
            P::PubAck(a) if a.packet_id == 4 => got_puback = true,
            P::Publish(p) if &p.payload[..] == b"self" => {
                got_publish = true;
                c.complete(&p).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn takeover_of_a_persistent_session_keeps_it() {
    let broker = TestBroker::start().await;
    checks::takeover_of_a_persistent_session_keeps_it(broker.mqtt()).await;
}

#[tokio::test]
async fn qos1_order_is_kept_for_one_publisher() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "order-sub", true).await;
    sub.subscribe_id(1, &[("order/t", Q::AtLeastOnce)]).await;
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "order-pub", true).await;
    let mut bytes = Vec::new();
    for i in 0..300u16 {
        bytes.extend(encode311(&publish_packet("order/t", &i.to_be_bytes(), Q::AtLeastOnce, false, Some(i + 1))));
    }
    publisher.send_bytes(&bytes).await;
    let got: Vec<u16> =
        sub.drain(QUIET).await.iter().map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]])).collect();
    assert_eq!(got, (0..300).collect::<Vec<_>>());
}

#[tokio::test]
async fn unsubscribe_on_a_persistent_session_is_remembered() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let (mut c, _) = Raw::v311(addr, "unsub-persist", false).await;
    c.subscribe_id(1, &[("up/a", Q::AtLeastOnce), ("up/b", Q::AtLeastOnce)]).await;
    c.send(&P::Unsubscribe(kadmq::protocol::Unsubscribe {
        packet_id: 2,
        filters: vec!["up/a".into()],
        user_properties: vec![],
    }))
    .await;
    assert!(matches!(c.recv().await, P::UnsubAck(a) if a.packet_id == 2));
    c.disconnect().await;
    let (mut publisher, _) = Raw::v311(addr, "unsub-persist-pub", true).await;
    publisher.publish_with_id("up/a", b"a", Q::AtLeastOnce, false, 1).await;
    publisher.publish_with_id("up/b", b"b", Q::AtLeastOnce, false, 2).await;
    let (mut c, present) = Raw::v311(addr, "unsub-persist", false).await;
    assert!(present);
    let topics: Vec<String> = c.drain(QUIET).await.into_iter().map(|p| p.topic).collect();
    assert_eq!(topics, vec!["up/b".to_string()]);
}

#[tokio::test]
async fn sys_clients_connected_goes_down_after_disconnect() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let (mut sys, _) = Raw::v311(addr, "sysc-watch", true).await;
    sys.subscribe_id(1, &[("$SYS/broker/clients/connected", Q::AtMostOnce)]).await;
    let mut v = HashMap::new();
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(Raw::v311(addr, &format!("sysc-{i}"), true).await.0);
    }
    sys_until(&mut sys, &mut v, |v| v.get("clients/connected").is_some_and(|_| num(v, "clients/connected") == 4)).await;
    for c in others {
        c.disconnect().await;
    }
    sys_until(&mut sys, &mut v, |v| num(v, "clients/connected") == 1).await;
}

/// A burst bigger than one delivery batch reaches a QoS 0 subscriber that
/// never sends anything (it used to stop after the first 512 until the
/// client spoke again).
#[tokio::test]
async fn qos0_burst_larger_than_a_batch_is_delivered_without_client_traffic() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Raw::v311(broker.mqtt(), "burst-sub", true).await;
    sub.subscribe_id(1, &[("burst/t", Q::AtMostOnce)]).await;
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "burst-pub", true).await;
    let mut bytes = Vec::new();
    for i in 0..2000u32 {
        bytes.extend(encode311(&publish_packet("burst/t", &i.to_be_bytes(), Q::AtMostOnce, false, None)));
    }
    publisher.send_bytes(&bytes).await;
    publisher.ping().await; // all 2000 routed once the PINGRESP is back
    let got = sub.drain(Duration::from_secs(1)).await;
    assert_eq!(got.len(), 2000);
    assert!(got.iter().enumerate().all(|(i, p)| p.payload[..] == (i as u32).to_be_bytes()), "order kept");
}
