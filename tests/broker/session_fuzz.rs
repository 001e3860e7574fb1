//! Whole hostile client sessions against one broker (issue 8): generated
//! sequences of packets — valid, invalid, out of order, mutated, garbage —
//! from up to three clients at once, while a well-behaved publisher and
//! subscriber on the side must keep getting every message through. The
//! broker runs in this process on its own runtime; a panic on any of its
//! threads fails the test.
//!
//! Cases: `PROPTEST_CASES` (default 64). A failure prints the shrunk case
//! and the seed; replay it with `PROPTEST_RNG_SEED=<seed>`.

use crate::common::{assert_broker_serves, TestBroker};
use crate::support::raw::{self, Raw, Read, WAIT};
use bytes::{Bytes, BytesMut};
use kadmq::protocol::{
    encode, Auth, ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReason, Disconnect, DisconnectReason,
    LastWill, MessageProperties, Packet, PubAck, Publish, PublishProperties, QoS, ReasonProperties, SubAck, Subscribe,
    SubscribeFilter, SubscriptionOptions, Unsubscribe, Version, WillProperties,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Threads of the runtime the broker runs on; panics there are recorded.
const BROKER_THREADS: &str = "fuzzed-broker";

/// One step of a hostile client, after its CONNECT.
#[derive(Debug, Clone)]
enum Step {
    Send(Packet),
    /// The packet encoded, then one byte replaced.
    Mutated(Packet, usize, u8),
    Garbage(Vec<u8>),
    Pause(u8),
}

#[derive(Debug, Clone)]
struct Script {
    connect: Connect,
    steps: Vec<Step>,
    /// How the client leaves: DISCONNECT (true) or dropping the socket.
    disconnect: bool,
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("side"), Just(""), Just("$SYS")].prop_map(String::from)
}

/// Levels that make a topic name or filter invalid (or only a filter).
fn odd_level() -> impl Strategy<Value = String> {
    prop_oneof![Just("+"), Just("#"), Just("x\u{0}y"), Just("a+b"), Just("é")].prop_map(String::from)
}

fn levels(min: usize, max: usize) -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(level(), min..max)
}

/// Topic names: mostly valid, some over the test's 8-level limit, some not
/// names at all.
fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => levels(1, 6).prop_map(|l| l.join("/")),
        2 => levels(9, 14).prop_map(|l| l.join("/")),
        1 => (1usize..20).prop_map(|n| "/".repeat(n)),
        1 => (levels(0, 3), odd_level()).prop_map(|(mut l, odd)| {
            l.push(odd);
            l.join("/")
        }),
    ]
}

/// Topic filters: valid ones, names that are not valid filters, invalid.
fn filter() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => valid_filter(),
        2 => topic(),
        1 => Just("$share/g".to_string()),
        1 => Just("a/#/b".to_string()),
    ]
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

/// Few packet ids, so they collide; sometimes 0, which is invalid.
fn packet_id() -> impl Strategy<Value = u16> {
    prop_oneof![12 => 1u16..5, 1 => Just(0u16)]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// Mostly `None`, sometimes `Some`.
fn rarely<T: std::fmt::Debug + Clone>(value: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::weighted(0.15, value)
}

fn message_properties() -> impl Strategy<Value = MessageProperties> {
    (rarely(0u8..3), rarely(0u32..3), rarely(topic()), rarely(bytes(8))).prop_map(
        |(payload_format_indicator, message_expiry_interval, response_topic, correlation_data)| MessageProperties {
            payload_format_indicator,
            message_expiry_interval,
            response_topic,
            correlation_data,
            ..MessageProperties::default()
        },
    )
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        (
            proptest::bool::weighted(0.1),
            qos(),
            proptest::bool::weighted(0.2),
            topic(),
            proptest::option::weighted(0.9, packet_id()),
        ),
        (bytes(64), message_properties(), rarely(0u16..4), rarely(1u32..3)),
    )
        .prop_map(|((dup, qos, retain, topic, packet_id), (payload, message, topic_alias, id))| Publish {
            dup,
            qos,
            retain,
            topic,
            // Mostly what the QoS asks for.
            packet_id: if qos == QoS::AtMostOnce { None } else { packet_id.or(Some(1)) },
            payload,
            properties: PublishProperties { message, topic_alias, subscription_identifiers: id.into_iter().collect() },
        })
}

fn subscribe() -> impl Strategy<Value = Subscribe> {
    let filter =
        (filter(), qos(), proptest::bool::weighted(0.2), any::<bool>(), prop_oneof![8 => 0u8..3, 1 => Just(3u8)])
            .prop_map(|(filter, qos, no_local, retain_as_published, retain_handling)| SubscribeFilter {
                filter,
                options: SubscriptionOptions { qos, no_local, retain_as_published, retain_handling },
            });
    (packet_id(), proptest::collection::vec(filter, 0..5), rarely(0u32..4)).prop_map(
        |(packet_id, filters, subscription_identifier)| Subscribe {
            packet_id,
            filters,
            subscription_identifier,
            user_properties: vec![],
        },
    )
}

fn ack() -> impl Strategy<Value = PubAck> {
    (packet_id(), prop_oneof![Just(0u8), Just(0x10), Just(0x80), Just(0x92)])
        .prop_map(|(id, reason)| PubAck { reason, ..PubAck::new(id) })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        8 => publish().prop_map(Packet::Publish),
        4 => subscribe().prop_map(Packet::Subscribe),
        2 => (packet_id(), proptest::collection::vec(filter(), 1..4))
            .prop_map(|(packet_id, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, filters, user_properties: vec![] })),
        2 => ack().prop_map(Packet::PubAck),
        2 => ack().prop_map(Packet::PubRec),
        2 => ack().prop_map(Packet::PubRel),
        2 => ack().prop_map(Packet::PubComp),
        1 => Just(Packet::PingReq),
        1 => (prop_oneof![Just(DisconnectReason::NormalDisconnection), Just(DisconnectReason::DisconnectWithWillMessage)],
              proptest::option::of(0u32..5))
            .prop_map(|(reason, session_expiry_interval)| Packet::Disconnect(Disconnect {
                session_expiry_interval,
                ..Disconnect::new(reason)
            })),
        // Protocol errors: each ends its session.
        1 => connect().prop_map(Packet::Connect),
        1 => Just(Packet::Auth(Auth {
            reason: 0x18,
            authentication_method: Some("x".into()),
            authentication_data: None,
            reason_string: None,
            user_properties: vec![],
        })),
        1 => Just(Packet::PingResp),
        1 => Just(Packet::SubAck(SubAck { packet_id: 1, reasons: vec![0], properties: ReasonProperties::default() })),
        1 => Just(Packet::ConnAck(ConnAck { session_present: false, code: ConnectReason::Success, properties: ConnAckProperties::default() })),
    ]
}

/// Topic names a well-meaning client sends: valid, a few over the limits.
fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof![14 => levels(1, 6).prop_map(|l| l.join("/")), 1 => levels(9, 14).prop_map(|l| l.join("/"))]
}

/// Valid filters (a few over the limits).
fn valid_filter() -> impl Strategy<Value = String> {
    let wild = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    prop_oneof![
        8 => (proptest::collection::vec(wild, 1..6), proptest::bool::weighted(0.3)).prop_map(|(mut l, hash)| {
            if hash {
                l.push("#".into());
            }
            l.join("/")
        }),
        2 => (levels(1, 4), "[a-c]{1,3}").prop_map(|(l, g)| format!("$share/{g}/{}", l.join("/"))),
        1 => topic_name(),
    ]
}

/// Packets as a client that follows the protocol sends them, in an order
/// it may not (acks for unknown ids, ids reused, subscriptions repeated).
fn valid_packet() -> impl Strategy<Value = Packet> {
    let publish = (qos(), proptest::bool::weighted(0.2), topic_name(), 1u16..5, bytes(64))
        .prop_flat_map(|(qos, retain, topic, id, payload)| {
            let expiry = rarely(0u32..3);
            let response = rarely(topic_name());
            let alias = rarely(1u16..3);
            (Just((qos, retain, topic, id, payload)), expiry, response, alias)
        })
        .prop_map(|((qos, retain, topic, id, payload), expiry, response_topic, topic_alias)| {
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                payload,
                properties: PublishProperties {
                    message: MessageProperties {
                        message_expiry_interval: expiry,
                        response_topic,
                        ..MessageProperties::default()
                    },
                    topic_alias,
                    subscription_identifiers: vec![],
                },
            })
        });
    let options = (qos(), proptest::bool::weighted(0.2), any::<bool>(), 0u8..3).prop_map(
        |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
            qos,
            no_local,
            retain_as_published,
            retain_handling,
        },
    );
    let subscribe = (1u16..5, proptest::collection::vec((valid_filter(), options), 1..5), rarely(1u32..4)).prop_map(
        |(packet_id, filters, subscription_identifier)| {
            let filters = filters
                .into_iter()
                .map(|(filter, mut options)| {
                    // No Local on a shared subscription is a protocol error.
                    options.no_local &= !filter.starts_with("$share/");
                    SubscribeFilter { filter, options }
                })
                .collect();
            Packet::Subscribe(Subscribe { packet_id, filters, subscription_identifier, user_properties: vec![] })
        },
    );
    let ack = (1u16..5).prop_map(PubAck::new);
    prop_oneof![
        10 => publish,
        4 => subscribe,
        2 => (1u16..5, proptest::collection::vec(valid_filter(), 1..4))
            .prop_map(|(packet_id, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, filters, user_properties: vec![] })),
        2 => ack.clone().prop_map(Packet::PubAck),
        2 => ack.clone().prop_map(Packet::PubRec),
        2 => ack.clone().prop_map(Packet::PubRel),
        2 => ack.prop_map(Packet::PubComp),
        1 => Just(Packet::PingReq),
    ]
}

fn connect() -> impl Strategy<Value = Connect> {
    let will = (topic(), bytes(16), qos(), any::<bool>(), proptest::option::of(0u32..2)).prop_map(
        |(topic, payload, qos, retain, will_delay_interval)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties: WillProperties { will_delay_interval, message: MessageProperties::default() },
        },
    );
    (
        (
            prop_oneof![Just(Version::V311), Just(Version::V5)],
            prop_oneof![Just("h0"), Just("h1"), Just("h2"), Just("")],
        ),
        (any::<bool>(), prop_oneof![0u16..1, 5u16..30, 1u16..3], rarely(will)),
        (proptest::option::of(0u32..10), proptest::option::of(1u16..4), rarely(20u32..200)),
        (proptest::option::of(0u16..4), proptest::bool::weighted(0.05)),
    )
        .prop_map(
            |(
                (version, id),
                (clean_start, keep_alive, will),
                (expiry, receive_maximum, max_packet),
                (aliases, auth),
            )| {
                Connect {
                    version,
                    client_id: id.to_string(),
                    clean_start,
                    keep_alive,
                    username: None,
                    password: None,
                    will,
                    properties: ConnectProperties {
                        session_expiry_interval: expiry,
                        receive_maximum,
                        maximum_packet_size: max_packet,
                        topic_alias_maximum: aliases,
                        authentication_method: auth.then(|| "SCRAM".to_string()),
                        ..ConnectProperties::default()
                    },
                }
            },
        )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        80 => valid_packet().prop_map(Step::Send),
        1 => packet().prop_map(Step::Send),
        1 => (packet(), any::<usize>(), any::<u8>()).prop_map(|(p, i, b)| Step::Mutated(p, i, b)),
        1 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Step::Garbage),
        3 => (0u8..15).prop_map(Step::Pause),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    (connect(), proptest::collection::vec(step(), 0..40), any::<bool>())
        .prop_map(|(connect, steps, disconnect)| Script { connect, steps, disconnect })
}

fn encoded(packet: &Packet, version: Version) -> Option<Vec<u8>> {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out).ok()?;
    Some(out.to_vec())
}

/// Plays one hostile client; the broker's answers are read and dropped so
/// it is never blocked on a full socket.
async fn play(addr: std::net::SocketAddr, script: Script) {
    let Ok(stream) = TcpStream::connect(addr).await else { return };
    let (mut read, mut write) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(n) = read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let version = script.connect.version;
    if let Some(bytes) = encoded(&Packet::Connect(script.connect), version) {
        let _ = write.write_all(&bytes).await;
    }
    for step in script.steps {
        let bytes = match step {
            Step::Send(packet) => encoded(&packet, version),
            Step::Mutated(packet, at, byte) => encoded(&packet, version).map(|mut bytes| {
                let i = at % bytes.len();
                bytes[i] = byte;
                bytes
            }),
            Step::Garbage(bytes) => Some(bytes),
            Step::Pause(ms) => {
                tokio::time::sleep(Duration::from_millis(ms as u64)).await;
                None
            }
        };
        if let Some(bytes) = bytes {
            if write.write_all(&bytes).await.is_err() {
                break; // the broker closed this one: that is allowed
            }
        }
    }
    if script.disconnect {
        if let Some(bytes) =
            encoded(&Packet::Disconnect(Disconnect::new(DisconnectReason::NormalDisconnection)), version)
        {
            let _ = write.write_all(&bytes).await;
        }
    }
    drop(write);
    let _ = tokio::time::timeout(Duration::from_millis(200), reader).await;
}

/// The well-behaved pair: every round's QoS 1 message must arrive.
struct Side {
    publisher: Raw,
    subscriber: Raw,
    rounds: u64,
}

impl Side {
    async fn round(&mut self) -> Result<(), String> {
        self.rounds += 1;
        let payload = self.rounds.to_be_bytes();
        self.publisher.publish(raw::publish("side/check", &payload, QoS::AtLeastOnce)).await;
        loop {
            match self.subscriber.read(WAIT).await {
                Read::Packet(Packet::Publish(p)) if p.topic == "side/check" => {
                    self.subscriber.ack(&p).await;
                    if p.payload[..] == payload {
                        return Ok(());
                    }
                }
                Read::Packet(_) => {}
                other => return Err(format!("side subscriber got {other:?} in round {}", self.rounds)),
            }
        }
    }
}

#[test]
fn hostile_sessions_never_panic_the_broker_and_others_keep_receiving() {
    let panics: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let panics = panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with(BROKER_THREADS)) {
                panics.lock().unwrap().push(info.to_string());
            }
            previous(info);
        }));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(BROKER_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(TestBroker::start_with(|c| {
        c.mqtt.max_topic_levels = 8;
        c.mqtt.max_subscriptions_per_client = 6;
        c.mqtt.max_queued_messages = 32;
        c.mqtt.max_queued_bytes = 4096;
        c.mqtt.receive_maximum = 3;
        c.mqtt.max_packet_size = 1024;
        c.mqtt.topic_alias_maximum = 2;
        c.mqtt.max_connections = 16;
    }));
    let addr = broker.mqtt();
    let side = rt.block_on(async {
        let publisher = Raw::v5(addr, "side-pub", |_| {}).await;
        let mut subscriber = Raw::v5(addr, "side-sub", |_| {}).await;
        subscriber.subscribe("side/check", QoS::AtLeastOnce).await;
        Mutex::new(Side { publisher, subscriber, rounds: 0 })
    });
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let cases: u32 = env("PROPTEST_CASES").map_or(64, |c: u64| c as u32);
    let seed: u64 = env("PROPTEST_RNG_SEED").unwrap_or_else(rand::random);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let played = AtomicU64::new(0);
    let result = runner.run(&proptest::collection::vec(script(), 1..4), |scripts| {
        played.fetch_add(1, Ordering::Relaxed);
        let mut side = side.lock().unwrap();
        rt.block_on(async {
            let done = AtomicBool::new(false);
            let hostile = async {
                let tasks: Vec<_> = scripts.into_iter().map(|s| tokio::spawn(play(addr, s))).collect();
                for task in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
                }
                done.store(true, Ordering::Relaxed);
            };
            // The side pair goes round while the hostile clients play, and once after.
            let during = async {
                while !done.load(Ordering::Relaxed) {
                    side.round().await?;
                }
                side.round().await
            };
            let ((), side_result) = tokio::join!(hostile, during);
            side_result.map_err(TestCaseError::fail)
        })?;
        let seen = std::mem::take(&mut *panics.lock().unwrap());
        prop_assert!(seen.is_empty(), "the broker panicked: {seen:?}");
        Ok(())
    });
    if let Err(failure) = result {
        panic!(
            "{failure}\nreplay: PROPTEST_RNG_SEED={seed} PROPTEST_CASES={cases} cargo test --test broker session_fuzz"
        );
    }
    assert_eq!(played.load(Ordering::Relaxed), cases as u64);
    rt.block_on(assert_broker_serves(addr));
    assert!(side.lock().unwrap().rounds > cases as u64, "the side pair went round during every case");
    drop(side);
    let mut broker = broker;
    if let Some(server) = broker.server.take() {
        rt.block_on(server.shutdown());
    }
    assert!(panics.lock().unwrap().is_empty());
}
