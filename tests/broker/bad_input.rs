//! Malformed and hostile input over raw TCP: the offending connection is
//! closed, everyone else is unaffected.

use crate::common::{assert_broker_serves, TestBroker};
use crate::support::raw::{connect_v311, encode311, publish_packet, Raw, WAIT};
use crate::support::wait::wait_until_async;
use kadmq::protocol::{Packet as P, QoS as Q, Version};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A remaining length as a variable byte integer.
fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A PUBLISH written by hand, so the topic bytes can be anything.
fn publish_bytes(topic: &[u8], qos: u8, packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut packet = vec![0x30 | (qos << 1)];
    packet.extend(varint(body.len()));
    packet.extend(body);
    packet
}

/// A 3.1.1 SUBSCRIBE written by hand.
fn subscribe_bytes(packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for (f, q) in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(*q);
    }
    let mut packet = vec![0x82];
    packet.extend(varint(body.len()));
    packet.extend(body);
    packet
}

/// A connected client that then sends `bytes`: the broker must close it.
async fn connected_then_closed(addr: SocketAddr, id: &str, bytes: &[u8]) {
    let (mut c, _) = Raw::v311(addr, id, true).await;
    c.try_send_bytes(bytes).await;
    let before = c.expect_closed(WAIT).await;
    assert!(before.is_empty(), "3.1.1: no answer before the close, got {before:?}");
}

/// A fresh connection whose first bytes are `bytes`: the broker must close
/// it without a CONNACK.
async fn first_bytes_closed(addr: SocketAddr, bytes: &[u8]) {
    let mut c = Raw::open(addr, Version::V311).await;
    c.try_send_bytes(bytes).await;
    let before = c.expect_closed(WAIT).await;
    assert!(before.is_empty(), "no answer to {bytes:02x?}, got {before:?}");
}

#[tokio::test]
async fn garbage_as_first_packet_is_closed_and_broker_still_serves() {
    let broker = TestBroker::start().await;
    first_bytes_closed(broker.mqtt(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    first_bytes_closed(broker.mqtt(), &[0x00, 0x00, 0x00, 0x00]).await;
    first_bytes_closed(broker.mqtt(), &[0x10, 0x04, 0xde, 0xad, 0xbe, 0xef]).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn first_packet_not_connect_is_closed() {
    let broker = TestBroker::start().await;
    first_bytes_closed(broker.mqtt(), &[0xC0, 0x00]).await; // PINGREQ
    first_bytes_closed(broker.mqtt(), &subscribe_bytes(1, &[("a", 0)])).await;
    first_bytes_closed(broker.mqtt(), &publish_bytes(b"a/b", 0, None, b"x")).await;
    first_bytes_closed(broker.mqtt(), &[0xE0, 0x00]).await; // DISCONNECT
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn connect_with_reserved_flag_or_bad_protocol_name_is_closed() {
    let broker = TestBroker::start().await;
    // Reserved flag bit 0 set.
    let mut bad_flags = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 30, 0, 0];
    first_bytes_closed(broker.mqtt(), &bad_flags).await;
    // Protocol name "MQTX".
    bad_flags[7] = b'X';
    bad_flags[9] = 0x02;
    first_bytes_closed(broker.mqtt(), &bad_flags).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn no_connect_within_the_connect_timeout_is_closed() {
    let broker = TestBroker::start_with(|c| c.mqtt.connect_timeout_secs = 1).await;
    let mut idle = Raw::open(broker.mqtt(), Version::V311).await;
    let start = Instant::now();
    idle.expect_closed(Duration::from_secs(3)).await;
    assert!(start.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", start.elapsed());
    // Half a CONNECT, then silence: also closed.
    let mut half = Raw::open(broker.mqtt(), Version::V311).await;
    half.send_bytes(&[0x10, 0x20, 0x00, 0x04, b'M']).await;
    half.expect_closed(Duration::from_secs(3)).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn publish_with_a_wildcard_topic_is_closed() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = Raw::v311(broker.mqtt(), "wild-watch", true).await;
    watcher.subscribe_id(1, &[("#", Q::AtMostOnce)]).await;
    connected_then_closed(broker.mqtt(), "wild-1", &publish_bytes(b"a/+", 0, None, b"x")).await;
    connected_then_closed(broker.mqtt(), "wild-2", &publish_bytes(b"a/#", 1, Some(1), b"x")).await;
    connected_then_closed(broker.mqtt(), "wild-3", &publish_bytes(b"+", 0, None, b"x")).await;
    // Empty topic name (3.1.1 has no topic aliases).
    connected_then_closed(broker.mqtt(), "wild-4", &publish_bytes(b"", 0, None, b"x")).await;
    watcher.expect_silence().await;
    watcher.ping().await;
}

#[tokio::test]
async fn publish_with_invalid_utf8_or_nul_in_topic_is_closed() {
    let broker = TestBroker::start().await;
    connected_then_closed(broker.mqtt(), "utf8-1", &publish_bytes(b"a/\xff\xfe", 0, None, b"x")).await;
    connected_then_closed(broker.mqtt(), "utf8-2", &publish_bytes(b"a/\xc0\xaf", 1, Some(3), b"x")).await;
    connected_then_closed(broker.mqtt(), "utf8-3", &publish_bytes(b"a/\x00b", 0, None, b"x")).await;
    // A UTF-16 surrogate encoded in UTF-8 (CESU) is not valid UTF-8 either.
    connected_then_closed(broker.mqtt(), "utf8-4", &publish_bytes(b"a/\xed\xa0\x80", 0, None, b"x")).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn publish_with_bad_flags_or_packet_id_is_closed() {
    let broker = TestBroker::start().await;
    // QoS 3.
    connected_then_closed(broker.mqtt(), "flags-1", &publish_bytes(b"a", 3, Some(1), b"x")).await;
    // QoS 1 with packet id 0.
    connected_then_closed(broker.mqtt(), "flags-2", &publish_bytes(b"a", 1, Some(0), b"x")).await;
    // SUBSCRIBE with its reserved flags 0000 instead of 0010.
    let mut sub = subscribe_bytes(1, &[("a", 0)]);
    sub[0] = 0x80;
    connected_then_closed(broker.mqtt(), "flags-3", &sub).await;
    // SUBSCRIBE requesting QoS 3.
    connected_then_closed(broker.mqtt(), "flags-4", &subscribe_bytes(1, &[("a", 3)])).await;
    // A server-only packet (CONNACK) from the client.
    connected_then_closed(broker.mqtt(), "flags-5", &[0x20, 0x02, 0x00, 0x00]).await;
    // Reserved packet type 0.
    connected_then_closed(broker.mqtt(), "flags-6", &[0x00, 0x00]).await;
    assert_broker_serves(broker.mqtt()).await;
}

// An invalid topic filter makes the SUBSCRIBE malformed: the client is
// disconnected (issue: "invalid filters: the client is disconnected with the
// right reason code where the protocol has one"; 3.1.1 has none, so the
// connection just closes), no SUBACK is sent, nothing is subscribed, and
// other clients are unaffected.
#[tokio::test]
async fn subscribe_with_an_invalid_filter_is_closed_and_subscribes_nothing() {
    let broker = TestBroker::start().await;
    let (mut c, _) = Raw::v311(broker.mqtt(), "badfilter", true).await;
    c.send_bytes(&subscribe_bytes(5, &[("ok/t", 1), ("a/#/b", 1)])).await;
    let before = c.expect_closed(WAIT).await;
    assert!(before.is_empty(), "no SUBACK for a malformed SUBSCRIBE: {before:?}");
    for filter in ["a/b+", "#/a", "a/#/"] {
        let (mut c, _) = Raw::v311(broker.mqtt(), "badfilter", true).await;
        c.send_bytes(&subscribe_bytes(6, &[(filter, 0)])).await;
        c.expect_closed(WAIT).await;
    }
    // The valid filter of the refused SUBSCRIBE was not subscribed either.
    let (mut publisher, _) = Raw::v311(broker.mqtt(), "badfilter-pub", true).await;
    publisher.publish_with_id("ok/t", b"x", Q::AtLeastOnce, false, 1).await;
    assert_eq!(broker.server.as_ref().unwrap().broker.subscription_count(), 0);
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn oversize_packet_is_closed_and_others_are_unaffected() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    let (mut bystander, _) = Raw::v311(broker.mqtt(), "big-bystander", true).await;
    bystander.subscribe_id(1, &[("big/#", Q::AtLeastOnce)]).await;

    let (mut big, _) = Raw::v311(broker.mqtt(), "big-sender", true).await;
    let packet = publish_bytes(b"big/t", 1, Some(1), &[b'x'; 2000]);
    assert!(packet.len() > 2000);
    big.try_send_bytes(&packet).await;
    let before = big.expect_closed(WAIT).await;
    assert!(before.is_empty(), "no PUBACK for an oversize packet: {before:?}");

    // Only the fixed header counts: announcing a huge packet is refused
    // before its body arrives.
    let (mut liar, _) = Raw::v311(broker.mqtt(), "big-liar", true).await;
    liar.try_send_bytes(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    liar.expect_closed(WAIT).await;
    let limits = &broker.server.as_ref().unwrap().broker.limits;
    assert_eq!(limits.count(kadmq::broker::limits::Limit::PacketSize), 2, "both counted");

    // Just under the limit is fine; the bystander gets only that one.
    let (mut fits, _) = Raw::v311(broker.mqtt(), "big-fits", true).await;
    let payload = vec![b'y'; 1024 - 2 - 2 - 5 - 2 - 3];
    let packet = publish_bytes(b"big/t", 1, Some(2), &payload);
    assert!(packet.len() <= 1024, "{}", packet.len());
    fits.send_bytes(&packet).await;
    assert!(matches!(fits.recv().await, P::PubAck(a) if a.packet_id == 2));
    let p = bystander.recv_publish().await;
    assert_eq!(p.payload.len(), payload.len());
    bystander.complete(&p).await;
    bystander.expect_silence().await;
    bystander.ping().await;
}

#[tokio::test]
async fn five_byte_remaining_length_is_closed() {
    let broker = TestBroker::start().await;
    connected_then_closed(broker.mqtt(), "varint", &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]).await;
    first_bytes_closed(broker.mqtt(), &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn second_connect_is_closed() {
    let broker = TestBroker::start().await;
    let connect = encode311(&P::Connect(connect_v311("twice", true, 30)));
    connected_then_closed(broker.mqtt(), "twice", &connect).await;
    assert_broker_serves(broker.mqtt()).await;
}

#[tokio::test]
async fn many_malformed_connections_then_a_normal_client() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let connect = encode311(&P::Connect(connect_v311("", true, 30)));
    let samples: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS ClientHello
        vec![0xff; 64],
        vec![0x10, 0x80, 0x80, 0x80, 0x80, 0x80],
        vec![0x10, 0x02, 0x00, 0x04], // CONNECT cut inside the protocol name
        [connect.clone(), publish_bytes(b"x/#", 0, None, b"")].concat(),
        [connect.clone(), vec![0x60, 0x02, 0x00, 0x01]].concat(), // PUBREL with flags 0
        [connect, encode311(&publish_packet("ok", b"", Q::AtMostOnce, false, None)), vec![0x30, 0x01, 0x00]].concat(),
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x05ab".to_vec(), // id longer than the packet
    ];
    const TOTAL: usize = 200;
    const AT_ONCE: usize = 20;
    for round in 0..TOTAL / AT_ONCE {
        let batch = (0..AT_ONCE).map(|i| {
            let bytes = samples[(round * AT_ONCE + i) % samples.len()].clone();
            async move {
                let mut c = Raw::open(addr, Version::V311).await;
                c.try_send_bytes(&bytes).await;
                let before = c.expect_closed(WAIT).await;
                // At most the CONNACK of the samples that connect first.
                assert!(before.iter().all(|p| matches!(p, P::ConnAck(_))), "{bytes:02x?} got {before:?}");
            }
        });
        futures_util::future::join_all(batch).await;
    }
    assert_broker_serves(addr).await;
    // The probe's own connection is torn down just after it sees EOF.
    let server = broker.server.as_ref().unwrap();
    wait_until_async(WAIT, "every connection and session gone", move || async move {
        let connected = server.broker.stats.clients_connected.load(std::sync::atomic::Ordering::Relaxed);
        let sessions = server.broker.session_count();
        if connected == 0 && sessions == 0 {
            Ok(())
        } else {
            Err(format!("left behind: {connected} connections, {sessions} sessions"))
        }
    })
    .await;
}
