//! MQTT 5.0 behaviour: the rumqttc v5 client where it can say what a test
//! needs, and a raw TCP client speaking kadmq's own codec where it cannot
//! (specific reason codes, topic aliases only, oversize packets, a second
//! CONNECT, never acknowledging).
//!
//! Every wait is bounded: `WAIT` for what must arrive, `QUIET` for what must
//! not.

use crate::common::TestBroker;
use bytes::{Bytes, BytesMut};
use kadmq::protocol::{
    decode, encode, Connect, ConnectProperties, ConnectReason, Disconnect, DisconnectReason, LastWill,
    MessageProperties, Packet, PubAck, Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeFilter,
    SubscriptionOptions, UnsubAck, Unsubscribe, Version, WillProperties, MAX_PACKET_SIZE,
};
use rumqttc::v5::mqttbytes::v5 as rp;
use rumqttc::v5::mqttbytes::QoS as RQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long something that must happen may take.
const WAIT: Duration = Duration::from_secs(5);
/// How long we listen to conclude that something does not happen.
const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------
// Raw client on kadmq's codec
// ---------------------------------------------------------------------------

/// What the broker did next.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // test-only; boxing would only add noise
pub(crate) enum Got {
    Packet(Packet),
    Closed,
    Silent,
}

pub(crate) struct Raw {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    next_id: u16,
}

pub(crate) fn connect_packet(client_id: &str) -> Connect {
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

pub(crate) fn will(topic: &str, payload: &'static [u8], delay: Option<u32>) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties { will_delay_interval: delay, message: MessageProperties::default() },
    }
}

pub(crate) fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions::qos(qos)
}

pub(crate) fn publish_packet(topic: &str, qos: QoS, payload: &[u8]) -> Publish {
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

impl Raw {
    pub(crate) async fn open(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect timeout").unwrap();
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new(), next_id: 1 }
    }

    /// Connects with `tweak` applied to a clean-start CONNECT; returns the
    /// CONNACK whatever its reason code.
    pub(crate) async fn connect(
        addr: SocketAddr,
        client_id: &str,
        tweak: impl FnOnce(&mut Connect),
    ) -> (Raw, kadmq::protocol::ConnAck) {
        let mut raw = Raw::open(addr).await;
        let mut connect = connect_packet(client_id);
        tweak(&mut connect);
        raw.send(&Packet::Connect(connect)).await;
        match raw.next().await {
            Got::Packet(Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts success.
    pub(crate) async fn ok(addr: SocketAddr, client_id: &str, tweak: impl FnOnce(&mut Connect)) -> Raw {
        let (raw, ack) = Raw::connect(addr, client_id, tweak).await;
        assert_eq!(ack.code, ConnectReason::Success, "CONNACK {ack:?}");
        raw
    }

    pub(crate) async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, Version::V5, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) {
        // The broker may already have closed; tests look at what comes back.
        let _ = self.stream.write_all(bytes).await;
    }

    pub(crate) fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    pub(crate) async fn next_within(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            match decode(&mut self.buf, Version::V5, MAX_PACKET_SIZE) {
                Ok(Some(packet)) => return Got::Packet(packet),
                Ok(None) => {}
                Err(err) => panic!("broker sent bytes the client cannot decode: {err}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Got::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Got::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics if none comes within `WAIT`.
    pub(crate) async fn next(&mut self) -> Got {
        match self.next_within(WAIT).await {
            Got::Silent => panic!("nothing from the broker within {WAIT:?}"),
            got => got,
        }
    }

    pub(crate) async fn packet(&mut self) -> Packet {
        match self.next().await {
            Got::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    pub(crate) async fn publish_in(&mut self) -> Publish {
        match self.packet().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts that the broker sends nothing (and does not close) for `QUIET`.
    pub(crate) async fn silent(&mut self) {
        match self.next_within(QUIET).await {
            Got::Silent => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Expects a DISCONNECT from the broker followed by the close.
    pub(crate) async fn disconnected(&mut self) -> Disconnect {
        let disconnect = match self.next().await {
            Got::Packet(Packet::Disconnect(d)) => d,
            other => panic!("expected DISCONNECT, got {other:?}"),
        };
        match self.next().await {
            Got::Closed => disconnect,
            other => panic!("expected the connection closed after DISCONNECT, got {other:?}"),
        }
    }

    pub(crate) async fn subscribe_with(&mut self, filters: &[(&str, SubscriptionOptions)], id: Option<u32>) -> SubAck {
        let packet_id = self.packet_id();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: filters.iter().map(|(f, o)| SubscribeFilter { filter: (*f).to_string(), options: *o }).collect(),
            subscription_identifier: id,
            user_properties: vec![],
        }))
        .await;
        match self.packet().await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub(crate) async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubAck {
        let ack = self.subscribe_with(&[(filter, opts(qos))], None).await;
        assert_eq!(ack.reasons, vec![qos as u8]);
        ack
    }

    /// Sends a PUBLISH (a packet id is assigned for QoS > 0) and for QoS 1
    /// returns the PUBACK, which must be the next packet.
    pub(crate) async fn publish(&mut self, mut publish: Publish) -> Option<PubAck> {
        if publish.qos != QoS::AtMostOnce {
            publish.packet_id = Some(self.packet_id());
        }
        let qos = publish.qos;
        let id = publish.packet_id;
        self.send(&Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => match self.packet().await {
                Packet::PubAck(ack) => {
                    assert_eq!(Some(ack.packet_id), id);
                    Some(ack)
                }
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => panic!("use the raw packets for QoS 2"),
        }
    }

    pub(crate) async fn ack(&mut self, publish: &Publish) {
        self.send(&Packet::PubAck(PubAck::new(publish.packet_id.expect("QoS 1")))).await;
    }

    pub(crate) async fn disconnect(mut self, reason: DisconnectReason) {
        self.send(&Packet::Disconnect(Disconnect::new(reason))).await;
        // The broker closes; wait for it so the session is detached.
        let _ = self.next_within(WAIT).await;
    }
}

// ---------------------------------------------------------------------------
// rumqttc v5 client, its event loop driven by a task
// ---------------------------------------------------------------------------

struct Client {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<rp::Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(id: &str, broker: &TestBroker) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(10));
    o
}

impl Client {
    async fn start(broker: &TestBroker, id: &str, tweak: impl FnOnce(&mut MqttOptions)) -> (Client, rp::ConnAck) {
        let mut o = options(id, broker);
        tweak(&mut o);
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(_) => break,
                }
            }
        });
        let mut c = Client { client, rx, task };
        let ack = c
            .wait_for(|p| match p {
                rp::Packet::ConnAck(a) => Some(a),
                _ => None,
            })
            .await;
        (c, ack)
    }

    /// Waits for the first incoming packet `f` picks, skipping others.
    async fn wait_for<T>(&mut self, mut f: impl FnMut(rp::Packet) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let packet = self.rx.recv().await.expect("rumqttc event loop ended");
                if let Some(t) = f(packet) {
                    return t;
                }
            }
        })
        .await
        .expect("expected packet did not arrive in time")
    }

    async fn publish_in(&mut self) -> rp::Publish {
        self.wait_for(|p| match p {
            rp::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// Every PUBLISH that arrives within `wait`.
    async fn publishes_within(&mut self, wait: Duration) -> Vec<rp::Publish> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while let Ok(Some(packet)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let rp::Packet::Publish(p) = packet {
                out.push(p);
            }
        }
        out
    }

    async fn subscribe(&mut self, filters: Vec<rp::Filter>, id: Option<usize>) -> rp::SubAck {
        match id {
            Some(id) => self
                .client
                .subscribe_many_with_properties(
                    filters,
                    rp::SubscribeProperties { id: Some(id), user_properties: vec![] },
                )
                .await
                .unwrap(),
            None => self.client.subscribe_many(filters).await.unwrap(),
        }
        self.wait_for(|p| match p {
            rp::Packet::SubAck(a) => Some(a),
            _ => None,
        })
        .await
    }
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
    let mut raw = Raw::open(broker.mqtt()).await;
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
    let (mut raw, ack) = Raw::connect(broker.mqtt(), "auth", |c| {
        c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    })
    .await;
    assert_eq!(ack.code, ConnectReason::BadAuthenticationMethod);
    assert!(!ack.session_present);
    assert!(matches!(raw.next().await, Got::Closed));
}

#[tokio::test]
async fn connack_advertises_receive_maximum_packet_size_and_alias_maximum() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.receive_maximum = 77;
        c.mqtt.max_packet_size = 4321;
        c.mqtt.topic_alias_maximum = 9;
    })
    .await;
    let (_raw, ack) = Raw::connect(broker.mqtt(), "props", |_| {}).await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert_eq!(ack.properties.receive_maximum, Some(77));
    assert_eq!(ack.properties.maximum_packet_size, Some(4321));
    assert_eq!(ack.properties.topic_alias_maximum, Some(9));
    assert_eq!(ack.properties.assigned_client_identifier, None);

    // The same through rumqttc.
    let (_c, ack) = Client::start(&broker, "props-r", |_| {}).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!((p.receive_max, p.max_packet_size, p.topic_alias_max), (Some(77), Some(4321), Some(9)));
}

#[tokio::test]
async fn empty_client_id_gets_an_assigned_identifier() {
    let broker = TestBroker::start().await;
    let (_a, ack_a) = Raw::connect(broker.mqtt(), "", |_| {}).await;
    let (_b, ack_b) = Raw::connect(broker.mqtt(), "", |_| {}).await;
    assert_eq!(ack_a.code, ConnectReason::Success);
    let id_a = ack_a.properties.assigned_client_identifier.expect("assigned id");
    let id_b = ack_b.properties.assigned_client_identifier.expect("assigned id");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b, "two clients got the same identifier");
}

#[tokio::test]
async fn session_expiry_zero_session_ends_with_the_connection() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "exp0", |_| {}).await;
    a.subscribe("exp0/t", QoS::AtLeastOnce).await;
    a.disconnect(DisconnectReason::NormalDisconnection).await;

    let (mut a, ack) = Raw::connect(broker.mqtt(), "exp0", |c| c.clean_start = false).await;
    assert!(!ack.session_present, "session with expiry 0 survived its connection");
    // Its subscription went with it.
    let mut p = Raw::ok(broker.mqtt(), "exp0-pub", |_| {}).await;
    let ack = p.publish(publish_packet("exp0/t", QoS::AtLeastOnce, b"x")).await.unwrap();
    assert_eq!(ack.reason, 0x10);
    a.silent().await;
}

#[tokio::test]
async fn session_expiry_resumes_within_interval_and_ends_after() {
    let broker = TestBroker::start().await;
    let addr = broker.mqtt();
    let expiry = |c: &mut Connect| c.properties.session_expiry_interval = Some(1);
    let mut a = Raw::ok(addr, "exp1", expiry).await;
    a.subscribe("exp1/t", QoS::AtLeastOnce).await;
    a.disconnect(DisconnectReason::NormalDisconnection).await;

    // Within the interval: present, subscription kept, queued message delivered.
    let mut p = Raw::ok(addr, "exp1-pub", |_| {}).await;
    assert_eq!(p.publish(publish_packet("exp1/t", QoS::AtLeastOnce, b"queued")).await.unwrap().reason, 0);
    let (mut a, ack) = Raw::connect(addr, "exp1", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    let got = a.publish_in().await;
    assert_eq!(&got.payload[..], b"queued");
    a.ack(&got).await;
    a.disconnect(DisconnectReason::NormalDisconnection).await;

    // After the interval: gone.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut a, ack) = Raw::connect(addr, "exp1", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert!(!ack.session_present, "session outlived its expiry interval");
    assert_eq!(p.publish(publish_packet("exp1/t", QoS::AtLeastOnce, b"late")).await.unwrap().reason, 0x10);
    a.silent().await;
}

#[tokio::test]
async fn disconnect_with_will_message_publishes_the_will() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "will-obs", |_| {}).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    let a = Raw::ok(broker.mqtt(), "will-a", |c| c.will = Some(will("will/a", b"gone", None))).await;
    a.disconnect(DisconnectReason::DisconnectWithWillMessage).await;
    let got = w.publish_in().await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("will/a", &b"gone"[..]));
}

#[tokio::test]
async fn normal_disconnect_discards_the_will() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "will-obs", |_| {}).await;
    w.subscribe("will/#", QoS::AtLeastOnce).await;
    let a = Raw::ok(broker.mqtt(), "will-a", |c| c.will = Some(will("will/a", b"gone", None))).await;
    a.disconnect(DisconnectReason::NormalDisconnection).await;
    w.silent().await;
    // Whereas losing the connection publishes it.
    let b = Raw::ok(broker.mqtt(), "will-b", |c| c.will = Some(will("will/b", b"lost", None))).await;
    drop(b);
    assert_eq!(w.publish_in().await.topic, "will/b");
}

#[tokio::test]
async fn second_connection_with_same_id_takes_over_with_0x8e() {
    let broker = TestBroker::start().await;
    let expiry = |c: &mut Connect| c.properties.session_expiry_interval = Some(60);
    let mut first = Raw::ok(broker.mqtt(), "dup", expiry).await;
    first.subscribe("dup/t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::connect(broker.mqtt(), "dup", |c| {
        expiry(c);
        c.clean_start = false;
    })
    .await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert!(ack.session_present, "persistent session not handed over");
    let d = first.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::SessionTakenOver);
    // The new connection has the subscription.
    let mut p = Raw::ok(broker.mqtt(), "dup-pub", |_| {}).await;
    p.publish(publish_packet("dup/t", QoS::AtLeastOnce, b"x")).await;
    assert_eq!(second.publish_in().await.topic, "dup/t");
}

#[tokio::test]
async fn takeover_of_an_expiry_zero_session_does_not_resume_it() {
    // Session expiry 0: the session ends when its connection closes, and a
    // takeover closes it, so the newcomer starts afresh even without clean start.
    let broker = TestBroker::start().await;
    let mut first = Raw::ok(broker.mqtt(), "tk0", |_| {}).await;
    first.subscribe("tk0/t", QoS::AtLeastOnce).await;
    let (mut second, ack) = Raw::connect(broker.mqtt(), "tk0", |c| c.clean_start = false).await;
    assert_eq!(ack.code, ConnectReason::Success);
    assert_eq!(first.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    assert!(!ack.session_present, "an expiry-0 session was resumed after takeover");
    let mut p = Raw::ok(broker.mqtt(), "tk0-pub", |_| {}).await;
    let ack = p.publish(publish_packet("tk0/t", QoS::AtLeastOnce, b"x")).await.unwrap();
    assert_eq!(ack.reason, 0x10, "the ended session's subscription still matches");
    second.silent().await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_error_with_reason_string() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "twice", |_| {}).await;
    a.send(&Packet::Connect(connect_packet("twice"))).await;
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert!(d.reason_string.as_deref().is_some_and(|s| !s.is_empty()), "no reason string: {d:?}");
}

#[tokio::test]
async fn keep_alive_timeout_disconnects_with_0x8d() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "ka", |c| c.keep_alive = 1).await;
    let started = Instant::now();
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::KeepAliveTimeout);
    let took = started.elapsed();
    // One and a half times the keep-alive.
    assert!(took >= Duration::from_millis(1200) && took < Duration::from_millis(3500), "after {took:?}");
}

#[tokio::test]
async fn keep_alive_is_kept_by_pings() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "ka-ping", |c| c.keep_alive = 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        a.send(&Packet::PingReq).await;
        assert!(matches!(a.packet().await, Packet::PingResp));
    }
}

#[tokio::test]
async fn disconnect_setting_expiry_after_zero_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "exp-set", |_| {}).await;
    a.subscribe("exp-set/t", QoS::AtLeastOnce).await;
    let mut d = Disconnect::new(DisconnectReason::NormalDisconnection);
    d.session_expiry_interval = Some(30);
    a.send(&Packet::Disconnect(d)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
    let (_a, ack) = Raw::connect(broker.mqtt(), "exp-set", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn disconnect_may_change_a_nonzero_expiry() {
    // From non-zero to 0: the session ends with this connection.
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "exp-chg", |c| c.properties.session_expiry_interval = Some(60)).await;
    a.subscribe("exp-chg/t", QoS::AtLeastOnce).await;
    let mut d = Disconnect::new(DisconnectReason::NormalDisconnection);
    d.session_expiry_interval = Some(0);
    a.send(&Packet::Disconnect(d)).await;
    assert!(matches!(a.next().await, Got::Closed));
    let (_a, ack) = Raw::connect(broker.mqtt(), "exp-chg", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

// ---------------------------------------------------------------------------
// PUBLISH
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_qos_0_1_2_both_directions() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Client::start(&broker, "q-sub", |_| {}).await;
    let ack = sub.subscribe(vec![rp::Filter::new("q/#", RQoS::ExactlyOnce)], None).await;
    assert_eq!(ack.return_codes, vec![rp::SubscribeReasonCode::Success(RQoS::ExactlyOnce)]);
    let (mut publisher, _) = Client::start(&broker, "q-pub", |_| {}).await;
    for (topic, qos) in [("q/0", RQoS::AtMostOnce), ("q/1", RQoS::AtLeastOnce), ("q/2", RQoS::ExactlyOnce)] {
        publisher.client.publish(topic, qos, false, topic.as_bytes().to_vec()).await.unwrap();
        let got = sub.publish_in().await;
        assert_eq!((topic_of(&got), got.qos, &got.payload[..]), (topic, qos, topic.as_bytes()));
    }
    // The publisher's flows completed: PUBACK for QoS 1, PUBREC + PUBCOMP for QoS 2.
    let reason = publisher
        .wait_for(|p| match p {
            rp::Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, rp::PubAckReason::Success);
    publisher.wait_for(|p| matches!(p, rp::Packet::PubComp(_)).then_some(())).await;
    // The subscriber's QoS 2 flow too: no redelivery.
    assert!(sub.publishes_within(QUIET).await.is_empty());
}

#[tokio::test]
async fn qos2_from_raw_client_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::ok(broker.mqtt(), "q2-sub", |_| {}).await;
    sub.subscribe("q2/t", QoS::ExactlyOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "q2-pub", |_| {}).await;
    let mut publish = publish_packet("q2/t", QoS::ExactlyOnce, b"once");
    publish.packet_id = Some(7);
    p.send(&Packet::Publish(publish.clone())).await;
    assert!(matches!(p.packet().await, Packet::PubRec(a) if a.packet_id == 7 && a.reason == 0));
    // A retransmission before PUBREL is not routed again.
    publish.dup = true;
    p.send(&Packet::Publish(publish)).await;
    assert!(matches!(p.packet().await, Packet::PubRec(a) if a.packet_id == 7));
    p.send(&Packet::PubRel(PubAck::new(7))).await;
    assert!(matches!(p.packet().await, Packet::PubComp(a) if a.packet_id == 7 && a.reason == 0));

    // Broker to subscriber: PUBLISH, PUBREC, PUBREL, PUBCOMP.
    let got = sub.publish_in().await;
    assert_eq!((got.qos, &got.payload[..]), (QoS::ExactlyOnce, &b"once"[..]));
    let id = got.packet_id.unwrap();
    sub.send(&Packet::PubRec(PubAck::new(id))).await;
    assert!(matches!(sub.packet().await, Packet::PubRel(a) if a.packet_id == id && a.reason == 0));
    sub.send(&Packet::PubComp(PubAck::new(id))).await;
    sub.silent().await;
}

#[tokio::test]
async fn inflight_window_honours_client_receive_maximum() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::ok(broker.mqtt(), "rm-sub", |c| c.properties.receive_maximum = Some(2)).await;
    sub.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "rm-pub", |_| {}).await;
    for i in 0..5u8 {
        p.publish(publish_packet("rm/t", QoS::AtLeastOnce, &[b'0' + i])).await;
    }
    let first = sub.publish_in().await;
    let second = sub.publish_in().await;
    assert_eq!((&first.payload[..], &second.payload[..]), (&b"0"[..], &b"1"[..]));
    sub.silent().await; // window full
    sub.ack(&first).await;
    let third = sub.publish_in().await;
    assert_eq!(&third.payload[..], b"2");
    sub.silent().await;
    sub.ack(&second).await;
    sub.ack(&third).await;
    assert_eq!(&sub.publish_in().await.payload[..], b"3");
    assert_eq!(&sub.publish_in().await.payload[..], b"4");
}

#[tokio::test]
async fn puback_reports_no_matching_subscribers() {
    let broker = TestBroker::start().await;
    let mut p = Raw::ok(broker.mqtt(), "nms", |_| {}).await;
    let ack = p.publish(publish_packet("nobody/here", QoS::AtLeastOnce, b"x")).await.unwrap();
    assert_eq!(ack.reason, 0x10);
    let mut s = Raw::ok(broker.mqtt(), "nms-sub", |_| {}).await;
    s.subscribe("nobody/+", QoS::AtMostOnce).await;
    let ack = p.publish(publish_packet("nobody/here", QoS::AtLeastOnce, b"x")).await.unwrap();
    assert_eq!(ack.reason, 0x00);
}

// ---------------------------------------------------------------------------
// SUBSCRIBE options
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_local_suppresses_own_messages_only() {
    let broker = TestBroker::start().await;
    let (mut a, _) = Client::start(&broker, "nl-a", |_| {}).await;
    let mut f = rp::Filter::new("nl/t", RQoS::AtLeastOnce);
    f.nolocal = true;
    a.subscribe(vec![f], None).await;
    let (mut b, _) = Client::start(&broker, "nl-b", |_| {}).await;
    b.subscribe(vec![rp::Filter::new("nl/t", RQoS::AtLeastOnce)], None).await;

    a.client.publish("nl/t", RQoS::AtLeastOnce, false, "from-a").await.unwrap();
    // b (no No Local) gets a's message; a does not.
    assert_eq!(&b.publish_in().await.payload[..], b"from-a");
    b.client.publish("nl/t", RQoS::AtLeastOnce, false, "from-b").await.unwrap();
    assert_eq!(&a.publish_in().await.payload[..], b"from-b");
    assert!(a.publishes_within(QUIET).await.is_empty());
}

#[tokio::test]
async fn retain_as_published_keeps_or_clears_the_retain_flag() {
    let broker = TestBroker::start().await;
    let mut keep = Raw::ok(broker.mqtt(), "rap-1", |_| {}).await;
    let mut o = opts(QoS::AtMostOnce);
    o.retain_as_published = true;
    keep.subscribe_with(&[("rap/t", o)], None).await;
    let mut clear = Raw::ok(broker.mqtt(), "rap-0", |_| {}).await;
    clear.subscribe("rap/t", QoS::AtMostOnce).await;

    let mut p = Raw::ok(broker.mqtt(), "rap-pub", |_| {}).await;
    let mut retained = publish_packet("rap/t", QoS::AtLeastOnce, b"r");
    retained.retain = true;
    p.publish(retained).await;
    assert!(keep.publish_in().await.retain, "retain flag cleared despite Retain As Published");
    assert!(!clear.publish_in().await.retain, "retain flag kept without Retain As Published");
    p.publish(publish_packet("rap/t", QoS::AtLeastOnce, b"n")).await;
    assert!(!keep.publish_in().await.retain);

    // Retained messages sent because of a subscribe always carry the flag.
    let mut late = Raw::ok(broker.mqtt(), "rap-late", |_| {}).await;
    late.subscribe("rap/t", QoS::AtMostOnce).await;
    let got = late.publish_in().await;
    assert!(got.retain && &got.payload[..] == b"r");
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let broker = TestBroker::start().await;
    let mut p = Raw::ok(broker.mqtt(), "rh-pub", |_| {}).await;
    let mut retained = publish_packet("rh/t", QoS::AtLeastOnce, b"kept");
    retained.retain = true;
    p.publish(retained).await;

    for (handling, expected) in [(0u8, 2usize), (1, 1), (2, 0)] {
        let mut c = Raw::ok(broker.mqtt(), &format!("rh-{handling}"), |_| {}).await;
        let mut o = opts(QoS::AtMostOnce);
        o.retain_handling = handling;
        let mut got = 0;
        for _ in 0..2 {
            c.subscribe_with(&[("rh/t", o)], None).await;
            loop {
                match c.next_within(QUIET).await {
                    Got::Packet(Packet::Publish(p)) => {
                        assert!(p.retain && &p.payload[..] == b"kept");
                        got += 1;
                    }
                    Got::Silent => break,
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
    let (mut sub, _) = Client::start(&broker, "sid", |_| {}).await;
    sub.subscribe(vec![rp::Filter::new("sid/+", RQoS::AtLeastOnce)], Some(1)).await;
    sub.subscribe(vec![rp::Filter::new("sid/#", RQoS::AtLeastOnce)], Some(2)).await;
    sub.subscribe(vec![rp::Filter::new("other/#", RQoS::AtLeastOnce)], Some(3)).await;
    let (publisher, _) = Client::start(&broker, "sid-pub", |_| {}).await;
    publisher.client.publish("sid/x", RQoS::AtLeastOnce, false, "m").await.unwrap();
    let got = sub.publish_in().await;
    let mut ids = got.properties.expect("properties").subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    assert!(sub.publishes_within(QUIET).await.is_empty(), "more than one delivery");
}

#[tokio::test]
async fn overlapping_subscriptions_one_delivery_at_max_qos() {
    let broker = TestBroker::start().await;
    let mut sub = Raw::ok(broker.mqtt(), "ov", |_| {}).await;
    sub.subscribe("ov/+", QoS::AtMostOnce).await;
    sub.subscribe("ov/#", QoS::AtLeastOnce).await;
    sub.subscribe("+/a", QoS::AtMostOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "ov-pub", |_| {}).await;
    p.publish(publish_packet("ov/a", QoS::AtLeastOnce, b"m")).await;
    let got = sub.publish_in().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(got.properties.subscription_identifiers.is_empty());
    sub.ack(&got).await;
    sub.silent().await;
}

#[tokio::test]
async fn suback_grants_requested_qos() {
    let broker = TestBroker::start().await;
    let mut c = Raw::ok(broker.mqtt(), "grant", |_| {}).await;
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
    let mut c = Raw::ok(broker.mqtt(), "badf", |_| {}).await;
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
    match c.packet().await {
        Packet::SubAck(ack) => assert_eq!(ack.reasons, vec![0x8F]),
        Packet::Disconnect(d) => {
            assert_eq!(d.reason, DisconnectReason::TopicFilterInvalid);
            assert!(matches!(c.next().await, Got::Closed));
        }
        other => panic!("expected SUBACK or DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn unsuback_reports_success_and_no_subscription_existed() {
    let broker = TestBroker::start().await;
    let mut c = Raw::ok(broker.mqtt(), "unsub", |_| {}).await;
    c.subscribe("u/a", QoS::AtMostOnce).await;
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 99,
        filters: vec!["u/a".into(), "u/never".into()],
        user_properties: vec![],
    }))
    .await;
    match c.packet().await {
        Packet::UnsubAck(UnsubAck { packet_id, reasons, .. }) => {
            assert_eq!(packet_id, 99);
            assert_eq!(reasons, vec![0x00, 0x11]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut p = Raw::ok(broker.mqtt(), "unsub-pub", |_| {}).await;
    assert_eq!(p.publish(publish_packet("u/a", QoS::AtLeastOnce, b"x")).await.unwrap().reason, 0x10);
}

// ---------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn shared_subscription_delivers_each_message_to_one_member() {
    let broker = TestBroker::start().await;
    let (mut m1, _) = Client::start(&broker, "sh-1", |_| {}).await;
    let (mut m2, _) = Client::start(&broker, "sh-2", |_| {}).await;
    for m in [&mut m1, &mut m2] {
        let ack = m.subscribe(vec![rp::Filter::new("$share/g/sh/t", RQoS::AtLeastOnce)], None).await;
        assert_eq!(ack.return_codes, vec![rp::SubscribeReasonCode::Success(RQoS::AtLeastOnce)]);
    }
    let (publisher, _) = Client::start(&broker, "sh-pub", |_| {}).await;
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
    let mut c = Raw::ok(broker.mqtt(), "sh-nl", |_| {}).await;
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
    let mut p = publish_packet(topic, QoS::AtLeastOnce, payload);
    p.properties.message.message_expiry_interval = Some(secs);
    p
}

#[tokio::test]
async fn retained_message_expires() {
    let broker = TestBroker::start().await;
    let mut p = Raw::ok(broker.mqtt(), "mx-pub", |_| {}).await;
    let mut short = expiring("mx/short", 1, b"s");
    short.retain = true;
    p.publish(short).await;
    let mut long = expiring("mx/long", 60, b"l");
    long.retain = true;
    p.publish(long).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut s = Raw::ok(broker.mqtt(), "mx-sub", |_| {}).await;
    s.subscribe("mx/+", QoS::AtLeastOnce).await;
    let got = s.publish_in().await;
    assert_eq!(got.topic, "mx/long", "expired retained message delivered");
    // Remaining lifetime, counted down: under 60 after 2 s.
    let left = got.properties.message.message_expiry_interval.expect("expiry forwarded");
    assert!((55..60).contains(&left), "remaining expiry {left}");
    s.ack(&got).await;
    s.silent().await;
}

#[tokio::test]
async fn queued_message_expires_for_offline_session() {
    let broker = TestBroker::start().await;
    let persistent = |c: &mut Connect| {
        c.properties.session_expiry_interval = Some(60);
        c.clean_start = false;
    };
    let mut s = Raw::ok(broker.mqtt(), "mq-sub", persistent).await;
    s.subscribe("mq/t", QoS::AtLeastOnce).await;
    s.disconnect(DisconnectReason::NormalDisconnection).await;
    let mut p = Raw::ok(broker.mqtt(), "mq-pub", |_| {}).await;
    p.publish(expiring("mq/t", 1, b"short")).await;
    p.publish(expiring("mq/t", 60, b"long")).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (mut s, ack) = Raw::connect(broker.mqtt(), "mq-sub", persistent).await;
    assert!(ack.session_present);
    let got = s.publish_in().await;
    assert_eq!(&got.payload[..], b"long", "expired queued message delivered");
    let left = got.properties.message.message_expiry_interval.expect("expiry forwarded");
    assert!((55..60).contains(&left), "remaining expiry {left}, not counted down");
    s.ack(&got).await;
    s.silent().await;
}

#[tokio::test]
async fn immediate_delivery_keeps_the_expiry_interval() {
    let broker = TestBroker::start().await;
    let mut s = Raw::ok(broker.mqtt(), "mi-sub", |_| {}).await;
    s.subscribe("mi/t", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "mi-pub", |_| {}).await;
    p.publish(expiring("mi/t", 30, b"x")).await;
    let got = s.publish_in().await;
    assert_eq!(got.properties.message.message_expiry_interval, Some(30));
    p.publish(publish_packet("mi/t", QoS::AtLeastOnce, b"y")).await;
    let got2 = s.publish_in().await;
    assert_eq!(got2.properties.message.message_expiry_interval, None);
}

// ---------------------------------------------------------------------------
// Topic aliases (client to broker)
// ---------------------------------------------------------------------------

fn aliased(topic: &str, alias: u16, payload: &[u8]) -> Publish {
    let mut p = publish_packet(topic, QoS::AtLeastOnce, payload);
    p.properties.topic_alias = Some(alias);
    p
}

#[tokio::test]
async fn topic_alias_from_client_is_resolved() {
    let broker = TestBroker::start().await;
    let mut s = Raw::ok(broker.mqtt(), "ta-sub", |_| {}).await;
    s.subscribe("a/#", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "ta-pub", |_| {}).await;
    assert_eq!(p.publish(aliased("a/b", 1, b"one")).await.unwrap().reason, 0);
    assert_eq!(p.publish(aliased("", 1, b"two")).await.unwrap().reason, 0);
    // Re-map alias 1.
    p.publish(aliased("a/c", 1, b"three")).await;
    p.publish(aliased("", 1, b"four")).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = s.publish_in().await;
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
    let mut a = Raw::ok(broker.mqtt(), "ta0", |_| {}).await;
    let mut zero = aliased("t", 0, b"x");
    zero.packet_id = Some(1);
    a.send(&Packet::Publish(zero)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::TopicAliasInvalid);

    let mut b = Raw::ok(broker.mqtt(), "ta6", |_| {}).await;
    b.publish(aliased("t", 5, b"ok")).await; // the maximum itself is fine
    let mut over = aliased("t", 6, b"x");
    over.packet_id = Some(50);
    b.send(&Packet::Publish(over)).await;
    assert_eq!(b.disconnected().await.reason, DisconnectReason::TopicAliasInvalid);
}

#[tokio::test]
async fn unknown_topic_alias_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut a = Raw::ok(broker.mqtt(), "ta-unk", |_| {}).await;
    let mut p = aliased("", 3, b"x");
    p.packet_id = Some(1);
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
}

#[tokio::test]
async fn topic_aliases_do_not_outlive_the_connection() {
    let broker = TestBroker::start().await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(60);
    let mut a = Raw::ok(broker.mqtt(), "ta-life", persistent).await;
    a.publish(aliased("t/x", 1, b"x")).await;
    a.disconnect(DisconnectReason::NormalDisconnection).await;
    let mut a = Raw::ok(broker.mqtt(), "ta-life", |c| {
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
    let mut a = Raw::ok(broker.mqtt(), "big", |_| {}).await;
    // Just under the limit passes.
    let ok = publish_packet("big/t", QoS::AtLeastOnce, &[0u8; 1000]);
    assert_eq!(a.publish(ok).await.unwrap().packet_id, 1);
    let mut too_big = publish_packet("big/t", QoS::AtLeastOnce, &[0u8; 2000]);
    too_big.packet_id = Some(2);
    a.send(&Packet::Publish(too_big)).await;
    let d = a.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::PacketTooLarge);
}

#[tokio::test]
async fn messages_over_client_maximum_packet_size_are_dropped() {
    let broker = TestBroker::start().await;
    let mut s = Raw::ok(broker.mqtt(), "mps-sub", |c| c.properties.maximum_packet_size = Some(200)).await;
    s.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "mps-pub", |_| {}).await;
    p.publish(publish_packet("mps/t", QoS::AtLeastOnce, &[b'x'; 1000])).await;
    p.publish(publish_packet("mps/t", QoS::AtMostOnce, &[b'y'; 1000])).await;
    p.publish(publish_packet("mps/t", QoS::AtLeastOnce, b"small")).await;
    let got = s.publish_in().await;
    assert_eq!(&got.payload[..], b"small");
    s.ack(&got).await;
    s.silent().await;
    // The reader is not stuck: more small ones flow.
    p.publish(publish_packet("mps/t", QoS::AtLeastOnce, b"again")).await;
    assert_eq!(&s.publish_in().await.payload[..], b"again");
}

// ---------------------------------------------------------------------------
// Properties passed through
// ---------------------------------------------------------------------------

#[tokio::test]
async fn message_properties_pass_through_unchanged() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = Client::start(&broker, "pp-sub", |_| {}).await;
    sub.subscribe(vec![rp::Filter::new("pp/t", RQoS::AtLeastOnce)], None).await;
    let (publisher, _) = Client::start(&broker, "pp-pub", |_| {}).await;
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
    let got = sub.publish_in().await;
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
    let mut s = Raw::ok(broker.mqtt(), "pfi-sub", |_| {}).await;
    s.subscribe("pfi/t", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "pfi-pub", |_| {}).await;
    let mut bad = publish_packet("pfi/t", QoS::AtLeastOnce, b"\xff\xfe not utf-8");
    bad.properties.message.payload_format_indicator = Some(1);
    assert_eq!(p.publish(bad).await.unwrap().reason, 0x99);
    // Unspecified bytes (indicator 0) are fine.
    let mut raw_bytes = publish_packet("pfi/t", QoS::AtLeastOnce, b"\xff\xfe");
    raw_bytes.properties.message.payload_format_indicator = Some(0);
    assert_eq!(p.publish(raw_bytes).await.unwrap().reason, 0);
    let got = s.publish_in().await;
    assert_eq!(&got.payload[..], b"\xff\xfe", "the invalid message was routed");
    s.ack(&got).await;
    s.silent().await;
}

// ---------------------------------------------------------------------------
// Reason strings and Request Problem Information
// ---------------------------------------------------------------------------

#[tokio::test]
async fn no_reason_strings_on_acks_when_problem_information_is_off() {
    let broker = TestBroker::start().await;
    let mut c = Raw::ok(broker.mqtt(), "rpi", |c| c.properties.request_problem_information = Some(0)).await;
    let ack = c.subscribe_with(&[("rpi/t", opts(QoS::AtLeastOnce))], None).await;
    assert_eq!(ack.properties.reason_string, None);
    let mut bad = publish_packet("rpi/t", QoS::AtLeastOnce, b"\xff");
    bad.properties.message.payload_format_indicator = Some(1);
    let ack = c.publish(bad).await.unwrap();
    assert_eq!(ack.reason, 0x99);
    assert_eq!(ack.properties.reason_string, None);
    assert!(ack.properties.user_properties.is_empty());
    let ack = c.publish(publish_packet("nobody", QoS::AtLeastOnce, b"x")).await.unwrap();
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
    let mut on = Raw::ok(broker.mqtt(), "rs-on", |_| {}).await;
    on.send(&Packet::PubRel(PubAck::new(1))).await; // answered, not an error
    assert!(matches!(on.packet().await, Packet::PubComp(a) if a.reason == 0x92));
    on.send(&connack).await; // a server-only packet
    let d = on.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert!(d.reason_string.is_some_and(|s| !s.is_empty()));

    // Request Problem Information 0: kadmq then leaves the reason string out.
    let mut off = Raw::ok(broker.mqtt(), "rs-off", |c| c.properties.request_problem_information = Some(0)).await;
    off.send(&connack).await;
    let d = off.disconnected().await;
    assert_eq!(d.reason, DisconnectReason::ProtocolError);
    assert_eq!(d.reason_string, None);
}

// ---------------------------------------------------------------------------
// Will delay
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delayed_will_is_published_after_the_delay() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "wd-obs", |_| {}).await;
    w.subscribe("wd/#", QoS::AtLeastOnce).await;
    let a = Raw::ok(broker.mqtt(), "wd-a", |c| {
        c.properties.session_expiry_interval = Some(30);
        c.will = Some(will("wd/a", b"late", Some(2)));
    })
    .await;
    let closed = Instant::now();
    drop(a);
    let got = w.publish_in().await;
    let took = closed.elapsed();
    assert_eq!(got.topic, "wd/a");
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_millis(4000), "will after {took:?}");
}

#[tokio::test]
async fn delayed_will_is_cancelled_by_reconnecting() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "wc-obs", |_| {}).await;
    w.subscribe("wc/#", QoS::AtLeastOnce).await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(30);
    let a = Raw::ok(broker.mqtt(), "wc-a", |c| {
        persistent(c);
        c.will = Some(will("wc/a", b"late", Some(2)));
    })
    .await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_a, ack) = Raw::connect(broker.mqtt(), "wc-a", |c| {
        persistent(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    match w.next_within(Duration::from_millis(3000)).await {
        Got::Silent => {}
        other => panic!("will published although the client came back: {other:?}"),
    }
}

#[tokio::test]
async fn will_delay_longer_than_session_expiry_fires_at_expiry() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "we-obs", |_| {}).await;
    w.subscribe("we/#", QoS::AtLeastOnce).await;
    let a = Raw::ok(broker.mqtt(), "we-a", |c| {
        c.properties.session_expiry_interval = Some(1);
        c.will = Some(will("we/a", b"expired", Some(60)));
    })
    .await;
    let closed = Instant::now();
    drop(a);
    let got = w.publish_in().await;
    let took = closed.elapsed();
    assert_eq!(&got.payload[..], b"expired");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_millis(3000), "will after {took:?}");
    let (_a, ack) = Raw::connect(broker.mqtt(), "we-a", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn takeover_cancels_a_delayed_will_when_the_session_resumes() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "wt-obs", |_| {}).await;
    w.subscribe("wt/#", QoS::AtLeastOnce).await;
    let persistent = |c: &mut Connect| c.properties.session_expiry_interval = Some(30);
    let mut a = Raw::ok(broker.mqtt(), "wt-a", |c| {
        persistent(c);
        c.will = Some(will("wt/a", b"late", Some(1)));
    })
    .await;
    let (_b, ack) = Raw::connect(broker.mqtt(), "wt-a", |c| {
        persistent(c);
        c.clean_start = false;
    })
    .await;
    assert!(ack.session_present);
    assert_eq!(a.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    match w.next_within(Duration::from_millis(2500)).await {
        Got::Silent => {}
        other => panic!("will published although the session was taken over: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// More edges
// ---------------------------------------------------------------------------

#[tokio::test]
async fn subscription_identifier_on_retained_delivery_and_cleared_by_resubscribe() {
    let broker = TestBroker::start().await;
    let mut p = Raw::ok(broker.mqtt(), "sidr-pub", |_| {}).await;
    let mut retained = publish_packet("sidr/t", QoS::AtLeastOnce, b"r");
    retained.retain = true;
    p.publish(retained).await;
    let mut s = Raw::ok(broker.mqtt(), "sidr-sub", |_| {}).await;
    s.subscribe_with(&[("sidr/t", opts(QoS::AtLeastOnce))], Some(5)).await;
    let got = s.publish_in().await;
    assert!(got.retain);
    assert_eq!(got.properties.subscription_identifiers, vec![5]);
    s.ack(&got).await;
    // The same filter again without an identifier replaces the subscription.
    let mut o = opts(QoS::AtLeastOnce);
    o.retain_handling = 2;
    s.subscribe_with(&[("sidr/t", o)], None).await;
    p.publish(publish_packet("sidr/t", QoS::AtLeastOnce, b"n")).await;
    let got = s.publish_in().await;
    assert_eq!(&got.payload[..], b"n");
    assert!(got.properties.subscription_identifiers.is_empty(), "stale identifier {:?}", got.properties);
}

#[tokio::test]
async fn shared_subscription_gets_no_retained_messages() {
    let broker = TestBroker::start().await;
    let mut p = Raw::ok(broker.mqtt(), "shr-pub", |_| {}).await;
    let mut retained = publish_packet("shr/t", QoS::AtLeastOnce, b"r");
    retained.retain = true;
    p.publish(retained).await;
    let mut s = Raw::ok(broker.mqtt(), "shr-sub", |_| {}).await;
    s.subscribe("$share/g/shr/t", QoS::AtLeastOnce).await;
    s.silent().await;
    p.publish(publish_packet("shr/t", QoS::AtLeastOnce, b"live")).await;
    assert_eq!(&s.publish_in().await.payload[..], b"live");
}

#[tokio::test]
async fn incoming_qos2_over_receive_maximum_is_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let mut a = Raw::ok(broker.mqtt(), "rm93", |_| {}).await;
    for id in 1..=2u16 {
        let mut p = publish_packet("rm93/t", QoS::ExactlyOnce, b"x");
        p.packet_id = Some(id);
        a.send(&Packet::Publish(p)).await;
        assert!(matches!(a.packet().await, Packet::PubRec(r) if r.packet_id == id));
    }
    // Two unreleased: a third is one too many.
    let mut p = publish_packet("rm93/t", QoS::ExactlyOnce, b"x");
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
    let (_a, ack) = Raw::connect(broker.mqtt(), "grant-ka", |c| {
        c.keep_alive = 60;
        c.properties.session_expiry_interval = Some(100);
    })
    .await;
    assert_eq!(ack.properties.server_keep_alive, Some(5));
    assert_eq!(ack.properties.session_expiry_interval, Some(10));
    // Within the limits, nothing is said.
    let (_b, ack) = Raw::connect(broker.mqtt(), "grant-ok", |c| {
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
    let mut a = Raw::ok(broker.mqtt(), "sid-pub", |_| {}).await;
    let mut p = publish_packet("sid/t", QoS::AtLeastOnce, b"x");
    p.packet_id = Some(1);
    p.properties.subscription_identifiers = vec![7];
    a.send(&Packet::Publish(p)).await;
    assert_eq!(a.disconnected().await.reason, DisconnectReason::ProtocolError);
}

#[tokio::test]
async fn wildcards_at_the_start_do_not_match_dollar_topics() {
    // sys_interval_secs is 1 in tests: $SYS topics are being published.
    let broker = TestBroker::start().await;
    let mut s = Raw::ok(broker.mqtt(), "dollar", |_| {}).await;
    s.subscribe_with(&[("#", opts(QoS::AtMostOnce)), ("+/broker/#", opts(QoS::AtMostOnce))], None).await;
    let mut sys = Raw::ok(broker.mqtt(), "dollar-sys", |_| {}).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let got = sys.publish_in().await;
    assert!(got.topic.starts_with("$SYS/"));
    match s.next_within(Duration::from_millis(1500)).await {
        Got::Silent => {}
        other => panic!("a wildcard matched a $ topic: {other:?}"),
    }
}

#[tokio::test]
async fn will_carries_its_message_properties() {
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "wp-obs", |_| {}).await;
    w.subscribe("wp/#", QoS::AtLeastOnce).await;
    let mut lw = will("wp/a", b"bye", None);
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
    let a = Raw::ok(broker.mqtt(), "wp-a", |c| c.will = Some(lw)).await;
    drop(a);
    let got = w.publish_in().await;
    assert_eq!(&got.payload[..], b"bye");
    let mut props = got.properties.message.clone();
    assert!(props.message_expiry_interval.is_some_and(|s| (95..=100).contains(&s)));
    props.message_expiry_interval = Some(100);
    assert_eq!(props, expected);
    w.ack(&got).await;
    // And it was retained.
    let mut late = Raw::ok(broker.mqtt(), "wp-late", |_| {}).await;
    late.subscribe("wp/a", QoS::AtLeastOnce).await;
    let got = late.publish_in().await;
    assert!(got.retain && &got.payload[..] == b"bye");
}

#[tokio::test]
async fn takeover_with_clean_start_publishes_a_delayed_will_at_once() {
    // Clean start ends the old session, and a will is due when its session ends.
    let broker = TestBroker::start().await;
    let mut w = Raw::ok(broker.mqtt(), "wcs-obs", |_| {}).await;
    w.subscribe("wcs/#", QoS::AtLeastOnce).await;
    let mut a = Raw::ok(broker.mqtt(), "wcs-a", |c| {
        c.properties.session_expiry_interval = Some(30);
        c.will = Some(will("wcs/a", b"ended", Some(20)));
    })
    .await;
    let (_b, ack) = Raw::connect(broker.mqtt(), "wcs-a", |_| {}).await;
    assert!(!ack.session_present);
    assert_eq!(a.disconnected().await.reason, DisconnectReason::SessionTakenOver);
    let got = w.publish_in().await; // within WAIT, long before the 20 s delay
    assert_eq!(&got.payload[..], b"ended");
}

#[tokio::test]
async fn unsubscribing_a_shared_subscription_removes_it() {
    let broker = TestBroker::start().await;
    let mut s = Raw::ok(broker.mqtt(), "shu", |_| {}).await;
    s.subscribe("$share/g/shu/t", QoS::AtLeastOnce).await;
    let mut p = Raw::ok(broker.mqtt(), "shu-pub", |_| {}).await;
    p.publish(publish_packet("shu/t", QoS::AtMostOnce, b"1")).await;
    assert_eq!(&s.publish_in().await.payload[..], b"1");
    s.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 9,
        filters: vec!["$share/g/shu/t".into(), "$share/other/shu/t".into()],
        user_properties: vec![],
    }))
    .await;
    assert!(matches!(s.packet().await, Packet::UnsubAck(u) if u.reasons == vec![0x00, 0x11]));
    assert_eq!(p.publish(publish_packet("shu/t", QoS::AtLeastOnce, b"2")).await.unwrap().reason, 0x10);
    s.silent().await;
}
