//! A raw MQTT client on kadmq's own codec, speaking 3.1.1 or 5.0 over TCP:
//! hand-made packets (or literal bytes) out, every byte the broker sends
//! observable, for what a real client library would hide or refuse (exact
//! reason codes, protocol errors, never acknowledging, a second CONNECT).
//! Plus the packet builders the tests share. Every wait is bounded.

use bytes::{Bytes, BytesMut};
use kadmq::protocol::{
    self as proto, ConnAck, Connect, ConnectProperties, ConnectReason, Disconnect, DisconnectReason, LastWill,
    MessageProperties, Packet, PubAck, Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeFilter,
    SubscriptionOptions, Version, WillProperties,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(400);

// ----- packets ------------------------------------------------------------------------

/// A 3.1.1 CONNECT.
pub fn connect_v311(client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect { version: Version::V311, clean_start: clean, keep_alive, ..connect_v5(client_id) }
}

/// A 5.0 CONNECT: clean start, keep-alive 30 s, no properties.
pub fn connect_v5(client_id: &str) -> Connect {
    Connect {
        version: Version::V5,
        client_id: client_id.into(),
        clean_start: true,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: ConnectProperties::default(),
    }
}

/// A will, published at once when the connection is lost.
pub fn will(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        properties: WillProperties::default(),
    }
}

/// A QoS 1 will, not retained, published `delay` seconds after the
/// connection is lost (MQTT 5 Will Delay Interval).
pub fn delayed_will(topic: &str, payload: &[u8], delay: u32) -> LastWill {
    let mut will = will(topic, payload, QoS::AtLeastOnce, false);
    will.properties = WillProperties { will_delay_interval: Some(delay), message: MessageProperties::default() };
    will
}

/// A PUBLISH without packet id, not retained, without properties.
pub fn publish(topic: &str, payload: &[u8], qos: QoS) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: Bytes::copy_from_slice(payload),
        properties: PublishProperties::default(),
    }
}

/// A whole PUBLISH packet.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: Option<u16>) -> Packet {
    Packet::Publish(Publish { retain, packet_id, ..publish(topic, payload, qos) })
}

/// Subscription options granting `qos`, the others at their defaults.
pub fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions::qos(qos)
}

/// `packet` as bytes on the wire in `version`.
pub fn encoded(packet: &Packet, version: Version) -> Vec<u8> {
    let mut out = BytesMut::new();
    proto::encode(packet, version, &mut out).expect("test packet encodes");
    out.to_vec()
}

/// `packet` as 3.1.1 bytes.
pub fn encode311(packet: &Packet) -> Vec<u8> {
    encoded(packet, Version::V311)
}

// ----- the client -----------------------------------------------------------------------

/// A raw client: the socket, what it read and has not decoded yet, the
/// protocol version it encodes and decodes with, the next packet id.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub version: Version,
    next_id: u16,
}

/// What a read saw.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // test-only; boxing would only add noise
pub enum Read {
    Packet(Packet),
    /// Nothing within the wait.
    Silent,
    /// The broker closed the connection (EOF or reset).
    Closed,
}

impl Raw {
    /// A TCP connection to `addr` (nothing sent yet).
    pub async fn open(addr: SocketAddr, version: Version) -> Raw {
        let stream =
            tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect in time").expect("tcp connect");
        Raw::over(stream, version)
    }

    /// A client on a connection the test made itself (to set socket options).
    pub fn over(stream: TcpStream, version: Version) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new(), version, next_id: 1 }
    }

    /// Opens a connection and sends `connect` (its version is the client's);
    /// returns the CONNACK, whatever its code.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (Raw, ConnAck) {
        Raw::connect_within(addr, connect, WAIT).await
    }

    /// [`Raw::connect`], waiting up to `within` for the CONNACK (one a
    /// fleet answers after asking another node, say).
    pub async fn connect_within(addr: SocketAddr, connect: Connect, within: Duration) -> (Raw, ConnAck) {
        let mut raw = Raw::open(addr, connect.version).await;
        raw.send(&Packet::Connect(connect)).await;
        match raw.read(within).await {
            Read::Packet(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK within {within:?}, got {other:?}"),
        }
    }

    /// A 3.1.1 client, keep-alive 30 s; panics unless the CONNACK is a
    /// success. Returns its session present flag.
    pub async fn v311(addr: SocketAddr, client_id: &str, clean: bool) -> (Raw, bool) {
        let (raw, ack) = Raw::connect(addr, connect_v311(client_id, clean, 30)).await;
        assert_eq!(ack.code, ConnectReason::Success, "CONNACK for {client_id}");
        (raw, ack.session_present)
    }

    /// A 5.0 client connected with `tweak` applied to [`connect_v5`];
    /// panics unless the CONNACK is a success.
    pub async fn v5(addr: SocketAddr, client_id: &str, tweak: impl FnOnce(&mut Connect)) -> Raw {
        let (raw, ack) = Raw::v5_connack(addr, client_id, tweak).await;
        assert_eq!(ack.code, ConnectReason::Success, "CONNACK {ack:?}");
        raw
    }

    /// [`Raw::v5`], returning the CONNACK whatever its code.
    pub async fn v5_connack(addr: SocketAddr, client_id: &str, tweak: impl FnOnce(&mut Connect)) -> (Raw, ConnAck) {
        let mut connect = connect_v5(client_id);
        tweak(&mut connect);
        Raw::connect(addr, connect).await
    }

    // ----- writing -----

    pub async fn send(&mut self, packet: &Packet) {
        self.send_bytes(&encoded(packet, self.version)).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to broker");
    }

    /// Like [`Raw::send`], but a failure (the broker already closed) is fine.
    pub async fn try_send(&mut self, packet: &Packet) {
        self.try_send_bytes(&encoded(packet, self.version)).await;
    }

    /// Like [`Raw::send_bytes`], but a failure (the broker already closed) is fine.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet id of this client's own (1, 2, ..., never 0).
    pub fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    // ----- reading -----

    /// The next packet, or Silent / Closed after `wait`.
    pub async fn read(&mut self, wait: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match proto::decode(&mut self.buf, self.version, proto::MAX_PACKET_SIZE) {
                Ok(Some(packet)) => return Read::Packet(packet),
                Ok(None) => {}
                Err(err) => panic!("broker sent bytes that do not decode: {err}: {:02x?}", &self.buf[..]),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Read::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet or the close; panics if neither comes within [`WAIT`].
    pub async fn next(&mut self) -> Read {
        match self.read(WAIT).await {
            Read::Silent => panic!("nothing from the broker within {WAIT:?}"),
            read => read,
        }
    }

    /// The next packet; panics if none comes within [`WAIT`].
    pub async fn recv(&mut self) -> Packet {
        match self.read(WAIT).await {
            Read::Packet(packet) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// The next PUBLISH; panics on anything else.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next PUBLISH, skipping other packets, each read waiting up to
    /// `wait`; None on silence or close.
    pub async fn publish_within(&mut self, wait: Duration) -> Option<Publish> {
        loop {
            match self.read(wait).await {
                Read::Packet(Packet::Publish(p)) => return Some(p),
                Read::Packet(_) => continue,
                Read::Silent | Read::Closed => return None,
            }
        }
    }

    /// Asserts that the broker sends nothing (and does not close) for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        match self.read(QUIET).await {
            Read::Silent => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection; returns the packets it
    /// sent before closing. Panics if it is still open after `wait`.
    pub async fn expect_closed(&mut self, wait: Duration) -> Vec<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Closed => return before,
                Read::Packet(p) => before.push(p),
                Read::Silent => panic!("connection still open after {wait:?} (got {before:?})"),
            }
        }
    }

    /// Expects a DISCONNECT from the broker followed by the close.
    pub async fn disconnected(&mut self) -> Disconnect {
        let disconnect = match self.next().await {
            Read::Packet(Packet::Disconnect(d)) => d,
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        match self.next().await {
            Read::Closed => disconnect,
            other => panic!("expected the connection closed after DISCONNECT, got {other:?}"),
        }
    }

    // ----- flows -----

    /// SUBSCRIBE to one filter (the client's next packet id) and wait for the
    /// SUBACK, which must grant `qos`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
        let ack = self.subscribe_with(&[(filter, opts(qos))], None).await;
        assert_eq!(ack.reasons, vec![qos as u8]);
        ack
    }

    /// SUBSCRIBE (the client's next packet id, a subscription identifier if
    /// `id`) and wait for the SUBACK, whatever it grants.
    pub async fn subscribe_with(&mut self, filters: &[(&str, SubscriptionOptions)], id: Option<u32>) -> SubAck {
        let packet_id = self.packet_id();
        self.subscribe_as(packet_id, filters, id).await
    }

    /// SUBSCRIBE with packet id `packet_id` and wait for the SUBACK; returns
    /// its return codes.
    pub async fn subscribe_id(&mut self, packet_id: u16, filters: &[(&str, QoS)]) -> Vec<u8> {
        let filters: Vec<(&str, SubscriptionOptions)> = filters.iter().map(|(f, q)| (*f, opts(*q))).collect();
        self.subscribe_as(packet_id, &filters, None).await.reasons
    }

    /// SUBSCRIBE with packet id `packet_id` (and subscription identifier
    /// `id`, if any) and wait for the SUBACK, which must carry that packet id.
    pub async fn subscribe_as(
        &mut self,
        packet_id: u16,
        filters: &[(&str, SubscriptionOptions)],
        id: Option<u32>,
    ) -> SubAck {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: filters.iter().map(|(f, o)| SubscribeFilter { filter: (*f).to_string(), options: *o }).collect(),
            subscription_identifier: id,
            user_properties: vec![],
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Sends `publish` (the client's next packet id for QoS > 0); for QoS 1
    /// returns the PUBACK, which must be the next packet.
    pub async fn publish(&mut self, mut publish: Publish) -> Option<PubAck> {
        if publish.qos != QoS::AtMostOnce {
            publish.packet_id = Some(self.packet_id());
        }
        let qos = publish.qos;
        let id = publish.packet_id;
        self.send(&Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => match self.recv().await {
                Packet::PubAck(ack) => {
                    assert_eq!(Some(ack.packet_id), id);
                    Some(ack)
                }
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => panic!("use publish_with_id for QoS 2"),
        }
    }

    /// PUBLISH with packet id `packet_id` (unused at QoS 0) and complete the
    /// QoS flow as a publisher.
    pub async fn publish_with_id(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) {
        let id = (qos != QoS::AtMostOnce).then_some(packet_id);
        self.send(&publish_packet(topic, payload, qos, retain, id)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.recv().await {
                Packet::PubAck(a) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.recv().await {
                    Packet::PubRec(a) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(&Packet::PubRel(PubAck::new(packet_id))).await;
                match self.recv().await {
                    Packet::PubComp(a) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Acknowledges a received QoS 1 PUBLISH (PUBACK).
    pub async fn ack(&mut self, publish: &Publish) {
        self.send(&Packet::PubAck(PubAck::new(publish.packet_id.expect("QoS 1")))).await;
    }

    /// Acknowledges a received PUBLISH as a subscriber, whatever its QoS
    /// (QoS 2: PUBREC, expects PUBREL, answers PUBCOMP).
    pub async fn complete(&mut self, publish: &Publish) {
        let Some(id) = publish.packet_id else { return };
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(&Packet::PubAck(PubAck::new(id))).await,
            QoS::ExactlyOnce => {
                self.send(&Packet::PubRec(PubAck::new(id))).await;
                match self.recv().await {
                    Packet::PubRel(a) => assert_eq!(a.packet_id, id),
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                self.send(&Packet::PubComp(PubAck::new(id))).await;
            }
        }
    }

    /// Receives and acknowledges PUBLISHes until `quiet` passes without one.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            match self.read(quiet).await {
                Read::Packet(Packet::Publish(p)) => {
                    // QoS 2: PUBREC now, PUBCOMP when the PUBREL comes (other
                    // PUBLISHes may arrive in between).
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(PubAck::new(id))).await,
                        (QoS::ExactlyOnce, Some(id)) => self.send(&Packet::PubRec(PubAck::new(id))).await,
                        _ => {}
                    }
                    got.push(p);
                }
                Read::Packet(Packet::PubRel(rel)) => self.send(&Packet::PubComp(PubAck::new(rel.packet_id))).await,
                Read::Packet(other) => panic!("expected PUBLISH, got {other:?}"),
                Read::Silent => return got,
                Read::Closed => panic!("connection closed while draining"),
            }
        }
    }

    /// A PINGREQ round trip: proves the connection is alive and that the
    /// broker handled everything sent before.
    pub async fn ping(&mut self) {
        self.send_bytes(&[0xC0, 0x00]).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Normal DISCONNECT, then wait (up to [`WAIT`]) for the broker to close.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect::new(DisconnectReason::NormalDisconnection))).await;
        self.expect_closed(WAIT).await;
    }

    /// DISCONNECT with `reason` (5.0), then wait (up to [`WAIT`]) for what
    /// the broker does next, so the session is detached when this returns.
    pub async fn disconnect_with(mut self, reason: DisconnectReason) {
        self.try_send(&Packet::Disconnect(Disconnect::new(reason))).await;
        let _ = self.read(WAIT).await;
    }
}

// ----- a client left to itself ------------------------------------------------------------

/// How an [`Acking`] client's connection ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Ending {
    /// The broker sent DISCONNECT with this reason (5.0), then closed.
    Disconnect(DisconnectReason),
    /// The broker closed the connection without a DISCONNECT.
    Closed,
}

/// What an [`Acking`] client saw: every PUBLISH in arrival order (DUP
/// flag and packet id included), and how the connection ended.
#[derive(Default)]
struct Seen {
    publishes: Vec<Publish>,
    ending: Option<Ending>,
}

/// A raw client in a task of its own, behaving as a subscriber that keeps
/// nothing between connections: it acknowledges every PUBLISH (QoS 1
/// PUBACK; QoS 2 PUBREC, then PUBCOMP for the PUBREL) and answers every
/// PUBREL with PUBCOMP, also for a packet id it never saw a PUBLISH of (a
/// resumed session sends the PUBREL of a flow its previous connection
/// began). rumqttc cannot be that client: it ends its connection on a
/// PUBREL it did not expect. Pings every 10 s. Stops when dropped.
pub struct Acking {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Raw {
    /// Leaves this client to a task that acknowledges and records
    /// everything (see [`Acking`]).
    pub fn acking(mut self) -> Acking {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let ending = loop {
                    match self.read(Duration::from_secs(10)).await {
                        Read::Packet(Packet::Publish(p)) => {
                            let ack = match (p.qos, p.packet_id) {
                                (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubAck::new(id))),
                                (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubAck::new(id))),
                                _ => None,
                            };
                            seen.lock().unwrap().publishes.push(p);
                            if let Some(ack) = ack {
                                self.try_send(&ack).await;
                            }
                        }
                        Read::Packet(Packet::PubRel(rel)) => {
                            self.try_send(&Packet::PubComp(PubAck::new(rel.packet_id))).await
                        }
                        Read::Packet(Packet::Disconnect(d)) => break Ending::Disconnect(d.reason),
                        Read::Packet(_) => {}
                        Read::Silent => self.try_send_bytes(&[0xC0, 0x00]).await,
                        Read::Closed => break Ending::Closed,
                    }
                };
                seen.lock().unwrap().ending = Some(ending);
            }
        });
        Acking { seen, task }
    }
}

impl Acking {
    /// Every PUBLISH received so far, in arrival order.
    pub fn publishes(&self) -> Vec<Publish> {
        self.seen.lock().unwrap().publishes.clone()
    }

    /// How the connection ended, if it has.
    pub fn ending(&self) -> Option<Ending> {
        self.seen.lock().unwrap().ending.clone()
    }
}

impl Drop for Acking {
    fn drop(&mut self) {
        self.task.abort();
    }
}
