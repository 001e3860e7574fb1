//! Shared helpers for the integration tests: real brokers on 127.0.0.1 with
//! ephemeral ports and a temporary data directory, real MQTT clients.
#![allow(dead_code)]

use kadmq::{Config, Server};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// A broker running in this process; its data directory lives as long as it.
pub struct TestBroker {
    pub server: Option<Server>,
    pub dir: TempDir,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `tweak` adjusts the test configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start(test_config(dir.path(), tweak)).await.expect("broker starts");
        TestBroker { server: Some(server), dir }
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.server.as_ref().unwrap().mqtt_addrs()[0]
    }

    pub fn ws(&self) -> SocketAddr {
        self.server.as_ref().unwrap().ws_addrs()[0]
    }

    pub fn port(&self) -> u16 {
        self.mqtt().port()
    }

    /// Stops the broker gracefully and starts a new one on the same data
    /// directory (new ports).
    pub async fn restart(&mut self, tweak: impl FnOnce(&mut Config)) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let server = Server::start(test_config(self.dir.path(), tweak)).await.expect("broker restarts");
        self.server = Some(server);
    }
}

pub fn test_config(data_dir: &Path, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config { data_dir: data_dir.to_path_buf(), ..Config::default() };
    config.listeners.mqtt = vec!["127.0.0.1:0".parse().unwrap()];
    config.listeners.ws = vec!["127.0.0.1:0".parse().unwrap()];
    config.mqtt.sys_interval_secs = 1;
    tweak(&mut config);
    config
}

/// A broker running as a child process of the `kadmq` binary, so tests can
/// SIGKILL it. Killed (by its own pid) when dropped.
pub struct BrokerProcess {
    pub child: Child,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl BrokerProcess {
    pub fn spawn(data_dir: &Path) -> BrokerProcess {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_kadmq"))
            .args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kadmq");
        let process = BrokerProcess { child, port, data_dir: data_dir.to_path_buf() };
        wait_for_port(port);
        process
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listening on 127.0.0.1:{port} after 5s");
}

// ---------------------------------------------------------------------------
// MQTT 3.1.1 helpers (v311 / persistence / bad_input / websocket tests).
// ---------------------------------------------------------------------------

use bytes::BytesMut;
use kadmq::protocol::{
    self as proto, ConnAck as ProtoConnAck, Connect as ProtoConnect, ConnectProperties, LastWill as ProtoLastWill,
    Packet as ProtoPacket, PubAck as ProtoPubAck, Publish as ProtoPublish, PublishProperties, QoS as ProtoQoS,
    Subscribe as ProtoSubscribe, SubscribeFilter, SubscriptionOptions, Version, WillProperties,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// A raw MQTT 3.1.1 client over TCP: hand-made packets (through kadmq's
/// codec or as literal bytes), every byte the broker sends observable.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

/// What a read from a [`Raw`] client saw.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Read {
    Packet(ProtoPacket),
    /// Nothing within the wait.
    Nothing,
    /// The broker closed the connection (EOF or reset).
    Closed,
}

pub fn connect_packet(client_id: &str, clean: bool, keep_alive: u16) -> ProtoConnect {
    ProtoConnect {
        version: Version::V311,
        client_id: client_id.into(),
        clean_start: clean,
        keep_alive,
        username: None,
        password: None,
        will: None,
        properties: ConnectProperties::default(),
    }
}

pub fn will(topic: &str, payload: &str, qos: ProtoQoS, retain: bool) -> ProtoLastWill {
    ProtoLastWill {
        topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
        properties: WillProperties::default(),
    }
}

pub fn publish_packet(topic: &str, payload: &[u8], qos: ProtoQoS, retain: bool, packet_id: Option<u16>) -> ProtoPacket {
    ProtoPacket::Publish(ProtoPublish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id,
        payload: bytes::Bytes::copy_from_slice(payload),
        properties: PublishProperties::default(),
    })
}

pub fn encode311(packet: &ProtoPacket) -> Vec<u8> {
    let mut out = BytesMut::new();
    proto::encode(packet, Version::V311, &mut out).expect("test packet encodes");
    out.to_vec()
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let stream =
            tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.expect("connect in time").expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new() }
    }

    /// Opens a connection and sends CONNECT; returns the CONNACK.
    pub async fn connect_with(addr: SocketAddr, connect: ProtoConnect) -> (Raw, ProtoConnAck) {
        let mut raw = Raw::open(addr).await;
        raw.send(&ProtoPacket::Connect(connect)).await;
        match raw.recv().await {
            ProtoPacket::ConnAck(ack) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// CONNECT with keep-alive 30 s; panics unless the CONNACK is a success.
    pub async fn connect(addr: SocketAddr, client_id: &str, clean: bool) -> (Raw, bool) {
        let (raw, ack) = Raw::connect_with(addr, connect_packet(client_id, clean, 30)).await;
        assert_eq!(ack.code, proto::ConnectReason::Success, "CONNACK for {client_id}");
        (raw, ack.session_present)
    }

    pub async fn send(&mut self, packet: &ProtoPacket) {
        self.send_bytes(&encode311(packet)).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to broker");
    }

    /// Like `send_bytes`, but a failure (the broker already closed) is fine.
    pub async fn try_send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, or Nothing / Closed after `wait`.
    pub async fn read(&mut self, wait: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match proto::decode(&mut self.buf, Version::V311, proto::MAX_PACKET_SIZE) {
                Ok(Some(packet)) => return Read::Packet(packet),
                Ok(None) => {}
                Err(err) => panic!("broker sent bytes that do not decode: {err}: {:02x?}", &self.buf[..]),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Read::Nothing,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics if none comes within [`WAIT`].
    pub async fn recv(&mut self) -> ProtoPacket {
        match self.read(WAIT).await {
            Read::Packet(packet) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// The next PUBLISH; panics on anything else.
    pub async fn recv_publish(&mut self) -> ProtoPublish {
        match self.recv().await {
            ProtoPacket::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        match self.read(QUIET).await {
            Read::Nothing => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection; returns the packets it
    /// sent before closing. Panics if it is still open after `wait`.
    pub async fn expect_closed(&mut self, wait: Duration) -> Vec<ProtoPacket> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Closed => return before,
                Read::Packet(p) => before.push(p),
                Read::Nothing => panic!("connection still open after {wait:?} (got {before:?})"),
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, packet_id: u16, filters: &[(&str, ProtoQoS)]) -> Vec<u8> {
        self.send(&ProtoPacket::Subscribe(ProtoSubscribe {
            packet_id,
            filters: filters
                .iter()
                .map(|(f, q)| SubscribeFilter { filter: (*f).into(), options: SubscriptionOptions::qos(*q) })
                .collect(),
            subscription_identifier: None,
            user_properties: vec![],
        }))
        .await;
        match self.recv().await {
            ProtoPacket::SubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack.reasons
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// PUBLISH and complete the QoS flow as a publisher.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: ProtoQoS, retain: bool, packet_id: u16) {
        let id = (qos != ProtoQoS::AtMostOnce).then_some(packet_id);
        self.send(&publish_packet(topic, payload, qos, retain, id)).await;
        match qos {
            ProtoQoS::AtMostOnce => {}
            ProtoQoS::AtLeastOnce => match self.recv().await {
                ProtoPacket::PubAck(a) => assert_eq!(a.packet_id, packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            },
            ProtoQoS::ExactlyOnce => {
                match self.recv().await {
                    ProtoPacket::PubRec(a) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBREC, got {other:?}"),
                }
                self.send(&ProtoPacket::PubRel(ProtoPubAck::new(packet_id))).await;
                match self.recv().await {
                    ProtoPacket::PubComp(a) => assert_eq!(a.packet_id, packet_id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Acknowledges a received PUBLISH as a subscriber (QoS 2: PUBREC,
    /// expects PUBREL, answers PUBCOMP).
    pub async fn ack(&mut self, publish: &ProtoPublish) {
        let Some(id) = publish.packet_id else { return };
        match publish.qos {
            ProtoQoS::AtMostOnce => {}
            ProtoQoS::AtLeastOnce => self.send(&ProtoPacket::PubAck(ProtoPubAck::new(id))).await,
            ProtoQoS::ExactlyOnce => {
                self.send(&ProtoPacket::PubRec(ProtoPubAck::new(id))).await;
                match self.recv().await {
                    ProtoPacket::PubRel(a) => assert_eq!(a.packet_id, id),
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                self.send(&ProtoPacket::PubComp(ProtoPubAck::new(id))).await;
            }
        }
    }

    /// Receives and acknowledges PUBLISHes until `quiet` passes without one.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<ProtoPublish> {
        let mut got = Vec::new();
        loop {
            match self.read(quiet).await {
                Read::Packet(ProtoPacket::Publish(p)) => {
                    // QoS 2: PUBREC now, PUBCOMP when the PUBREL comes (other
                    // PUBLISHes may arrive in between).
                    match (p.qos, p.packet_id) {
                        (ProtoQoS::AtLeastOnce, Some(id)) => {
                            self.send(&ProtoPacket::PubAck(ProtoPubAck::new(id))).await
                        }
                        (ProtoQoS::ExactlyOnce, Some(id)) => {
                            self.send(&ProtoPacket::PubRec(ProtoPubAck::new(id))).await
                        }
                        _ => {}
                    }
                    got.push(p);
                }
                Read::Packet(ProtoPacket::PubRel(rel)) => {
                    self.send(&ProtoPacket::PubComp(ProtoPubAck::new(rel.packet_id))).await
                }
                Read::Packet(other) => panic!("expected PUBLISH, got {other:?}"),
                Read::Nothing => return got,
                Read::Closed => panic!("connection closed while draining"),
            }
        }
    }

    /// Normal DISCONNECT, then wait for the broker to close.
    pub async fn disconnect(mut self) {
        self.send(&ProtoPacket::Disconnect(proto::Disconnect::new(proto::DisconnectReason::NormalDisconnection))).await;
        self.expect_closed(WAIT).await;
    }

    /// A PINGREQ round trip: proves the connection is alive and that the
    /// broker handled everything sent before.
    pub async fn ping(&mut self) {
        self.send_bytes(&[0xC0, 0x00]).await;
        match self.recv().await {
            ProtoPacket::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// A broker answers a fresh client: CONNECT, SUBSCRIBE, PUBLISH to itself.
pub async fn assert_broker_serves(addr: SocketAddr) {
    let id = format!("probe-{}", rand_suffix());
    let (mut c, _) = Raw::connect(addr, &id, true).await;
    let topic = format!("probe/{id}");
    assert_eq!(c.subscribe(1, &[(&topic, ProtoQoS::AtLeastOnce)]).await, vec![1]);
    c.send(&publish_packet(&topic, b"ok", ProtoQoS::AtMostOnce, false, None)).await;
    let p = c.recv_publish().await;
    assert_eq!(&p.payload[..], b"ok");
    c.disconnect().await;
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A rumqttc (v4 API, MQTT 3.1.1) client whose event loop runs in a task;
/// every event is forwarded on `events`. The loop stops at the first error
/// (no reconnect), which then shows as the channel closing.
pub struct Client311 {
    pub client: rumqttc::AsyncClient,
    pub events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client311 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn options311(id: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl Client311 {
    /// Connects and waits for the CONNACK.
    pub async fn connect(options: rumqttc::MqttOptions) -> (Client311, rumqttc::ConnAck) {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        let connack = tokio::time::timeout(WAIT, async {
            loop {
                match events.recv().await {
                    Some(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => return ack,
                    Some(_) => {}
                    None => panic!("connection failed before CONNACK"),
                }
            }
        })
        .await
        .expect("CONNACK in time");
        (Client311 { client, events, task }, connack)
    }

    /// The next event matching `pick`, skipping others; panics after [`WAIT`].
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&rumqttc::Event) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(event) => {
                        if let Some(t) = pick(&event) {
                            return t;
                        }
                    }
                    None => panic!("client event loop ended"),
                }
            }
        })
        .await
        .expect("event in time")
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        self.wait_for(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        self.wait_for(|e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// PUBLISHes received until `quiet` passes without one.
    pub async fn publishes_until_quiet(&mut self, quiet: Duration) -> Vec<rumqttc::Publish> {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(quiet, self.events.recv()).await {
                Ok(Some(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => got.push(p),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return got,
            }
        }
    }
}
