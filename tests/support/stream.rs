//! Numbered streams across a fleet: a publisher that sends the numbers
//! 0, 1, 2, ... (the payload is the number in decimal) and knows exactly
//! which ones the broker acknowledged, and a persistent subscriber that
//! follows the fleet when its node goes. Both move to the next address
//! when their connection ends, as a client behind a load balancer would.
//!
//! Everything here is bounded: in count, in time, and in how long each
//! connection attempt or acknowledgement may take.

use super::mqtt::{Api, Client5, PATIENCE, V5};
use super::raw::{connect_v5, publish_packet, Raw, Read};
use kadmq::protocol::{ConnectReason, Packet, PubAck, QoS};
use rumqttc::v5::mqttbytes::v5 as v5p;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long the publisher waits for each acknowledgement (PUBACK, PUBREC,
/// PUBCOMP) before it takes the connection for lost and moves on.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// The number a stream payload carries (None if it carries none).
pub fn number(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload).ok()?.parse().ok()
}

/// 127.0.0.1:`port` for each port.
pub fn loopback(ports: &[u16]) -> Vec<SocketAddr> {
    ports.iter().map(|&p| SocketAddr::from(([127, 0, 0, 1], p))).collect()
}

// ----- the publisher -----------------------------------------------------------------

/// What to publish: each number in `0..count`, one `every`, to each of
/// `topics` at its QoS, one message in flight at a time; never for longer
/// than `limit`.
pub struct Numbered {
    /// The publisher's client id (MQTT 5, clean start, no session kept).
    pub id: String,
    pub topics: Vec<(String, QoS)>,
    pub count: u64,
    pub every: Duration,
    pub limit: Duration,
    /// Where to connect: the first address, then, each time the connection
    /// ends or an acknowledgement does not come, the next one in turn.
    pub addrs: Vec<SocketAddr>,
}

/// Shared between a running [`Numbered`] stream and the test.
#[derive(Default)]
pub struct Progress {
    /// Numbers acknowledged on every topic so far (the stream goes in order).
    pub done: AtomicU64,
    /// Set by the test to end the stream early (after the number in flight).
    pub stop: AtomicBool,
}

/// What a stream did.
#[derive(Debug, Default)]
pub struct Published {
    /// Per topic (in the order of [`Numbered::topics`]): the numbers the
    /// broker acknowledged (QoS 1 PUBACK or QoS 2 PUBCOMP, reason < 0x80).
    pub acked: Vec<BTreeSet<u64>>,
    /// Per topic: the numbers acknowledged with 0x10 No matching subscribers.
    pub unmatched: Vec<BTreeSet<u64>>,
    /// Every connection it made and why it left each (for the test's report).
    pub connections: Vec<String>,
    /// Numbers published more than once (sent again on a new connection
    /// because the first send was not acknowledged), per topic.
    pub resent: Vec<BTreeSet<u64>>,
}

impl Published {
    /// Whether every number below `count` was acknowledged on every topic.
    pub fn all_acked(&self, count: u64) -> bool {
        self.acked.iter().all(|set| set.len() as u64 == count)
    }
}

impl Numbered {
    /// Runs the stream (spawn it on the test's runtime); `progress` tells
    /// the test how far it got and lets it stop the stream.
    pub async fn run(self, progress: Arc<Progress>) -> Published {
        let started = Instant::now();
        let n_topics = self.topics.len();
        let mut out = Published {
            acked: vec![BTreeSet::new(); n_topics],
            unmatched: vec![BTreeSet::new(); n_topics],
            resent: vec![BTreeSet::new(); n_topics],
            connections: Vec::new(),
        };
        let mut at = 0; // index in addrs
        let mut raw: Option<Raw> = None;
        let mut next_id: u16 = 0;
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'numbers: for n in 0..self.count {
            tick.tick().await;
            if progress.stop.load(Ordering::Relaxed) {
                break;
            }
            for (t, (topic, qos)) in self.topics.iter().enumerate() {
                let mut attempts = 0;
                loop {
                    if started.elapsed() > self.limit {
                        out.connections.push(format!("gave up at {n} after {:?}", self.limit));
                        break 'numbers;
                    }
                    let client = match raw.as_mut() {
                        Some(client) => client,
                        None => match connect(self.addrs[at], &self.id).await {
                            Ok(client) => raw.insert(client),
                            Err(why) => {
                                out.connections.push(format!("{}: {why}", self.addrs[at]));
                                at = (at + 1) % self.addrs.len();
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        },
                    };
                    next_id = next_id.wrapping_add(1).max(1);
                    if attempts > 0 {
                        out.resent[t].insert(n);
                    }
                    attempts += 1;
                    match publish_one(client, topic, *qos, n, next_id).await {
                        Ok(reason) => {
                            out.acked[t].insert(n);
                            if reason == 0x10 {
                                out.unmatched[t].insert(n);
                            }
                            break;
                        }
                        Err(why) => {
                            out.connections.push(format!("{}: left at {n} on {topic}: {why}", self.addrs[at]));
                            raw = None;
                            at = (at + 1) % self.addrs.len();
                        }
                    }
                }
            }
            progress.done.store(n + 1, Ordering::Relaxed);
        }
        if raw.is_some() {
            out.connections.push(format!("{}: to the end", self.addrs[at]));
        }
        out
    }
}

/// A clean-start MQTT 5 connection, or why not.
async fn connect(addr: SocketAddr, id: &str) -> Result<Raw, String> {
    let stream = match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(format!("connect: {err}")),
        Err(_) => return Err("connect: timed out".into()),
    };
    let mut raw = Raw::over(stream, kadmq::protocol::Version::V5);
    raw.try_send(&Packet::Connect(connect_v5(id))).await;
    match raw.read(PATIENCE).await {
        Read::Packet(Packet::ConnAck(ack)) if ack.code == ConnectReason::Success => Ok(raw),
        other => Err(format!("CONNACK: {other:?}")),
    }
}

/// One number on one topic, its QoS flow completed: the final ack's reason.
async fn publish_one(raw: &mut Raw, topic: &str, qos: QoS, n: u64, id: u16) -> Result<u8, String> {
    let packet_id = (qos != QoS::AtMostOnce).then_some(id);
    raw.try_send(&publish_packet(topic, n.to_string().as_bytes(), qos, false, packet_id)).await;
    match qos {
        QoS::AtMostOnce => Ok(0),
        QoS::AtLeastOnce => expect_ack(raw, "PUBACK", id, |p| matches!(p, Packet::PubAck(_))).await,
        QoS::ExactlyOnce => {
            let rec = expect_ack(raw, "PUBREC", id, |p| matches!(p, Packet::PubRec(_))).await?;
            if rec >= 0x80 {
                return Err(format!("PUBREC reason {rec:#04x}"));
            }
            raw.try_send(&Packet::PubRel(PubAck::new(id))).await;
            expect_ack(raw, "PUBCOMP", id, |p| matches!(p, Packet::PubComp(_))).await?;
            Ok(rec)
        }
    }
}

/// Waits for the ack `is` takes with packet id `id`; its reason code.
async fn expect_ack(raw: &mut Raw, what: &str, id: u16, is: impl Fn(&Packet) -> bool) -> Result<u8, String> {
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match raw.read(left).await {
            Read::Packet(p) if is(&p) => {
                let (Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubComp(ack)) = &p else { unreachable!() };
                if ack.packet_id != id {
                    return Err(format!("{what} for {} instead of {id}", ack.packet_id));
                }
                if ack.reason >= 0x80 {
                    return Err(format!("{what} reason {:#04x}", ack.reason));
                }
                return Ok(ack.reason);
            }
            Read::Packet(Packet::Disconnect(d)) => return Err(format!("DISCONNECT {:?}", d.reason)),
            Read::Packet(_) => {}
            Read::Silent => return Err(format!("no {what} within {ACK_WAIT:?}")),
            Read::Closed => return Err(format!("closed before the {what}")),
        }
    }
}

// ----- the subscriber ----------------------------------------------------------------

/// One PUBLISH a [`Roaming`] subscriber received.
#[derive(Clone, Debug)]
pub struct Got {
    pub topic: String,
    pub number: Option<u64>,
    pub dup: bool,
    /// Which of the subscriber's connections (0 = the first) it came on.
    pub connection: usize,
}

/// What a [`Roaming`] subscriber has seen so far.
#[derive(Default)]
struct Log {
    got: Vec<Got>,
    /// Per connection: where, session present, and how it ended.
    connections: Vec<String>,
    /// Reconnections that did not find the session (session present 0).
    sessions_lost: Vec<String>,
}

/// A persistent MQTT 5 session (Session Expiry Interval 300 s, QoS 1
/// acknowledged by rumqttc on arrival) that follows the fleet: subscribed
/// once, on its first connection; whenever a connection ends (a
/// DISCONNECT such as 0x8B Server shutting down, or the close), it
/// connects again, clean start 0, to the next address in turn, and does
/// not subscribe again: the session must still hold its subscriptions.
/// Stops when dropped.
pub struct Roaming {
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

impl Roaming {
    /// Connects `id` to `addrs[0]`, subscribes to `filter` at `qos`, waits
    /// for the SUBACK, then roams in a task (on the current runtime) for at
    /// most `limit`.
    pub async fn start(
        id: &str,
        addrs: Vec<SocketAddr>,
        filter: &str,
        qos: rumqttc::v5::mqttbytes::QoS,
        limit: Duration,
    ) -> Roaming {
        let options = {
            let id = id.to_string();
            move |addr: SocketAddr| Client5::persistent(&id, addr.port(), 300)
        };
        let (mut client, _) =
            Client5::try_connect(options(addrs[0]), PATIENCE).await.unwrap_or_else(|why| panic!("{id}: {why}"));
        let suback = client.subscribe(vec![v5p::Filter::new(filter, qos)], None).await;
        let granted = suback.return_codes.iter().all(|c| matches!(c, v5p::SubscribeReasonCode::Success(_)));
        assert!(granted, "{id}: {suback:?}");
        let log = Arc::new(Mutex::new(Log::default()));
        log.lock().unwrap().connections.push(format!("{}", addrs[0]));
        let id = id.to_string();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                let started = Instant::now();
                let mut at = 0;
                let mut connection = 0;
                loop {
                    // Record what arrives until the connection ends.
                    loop {
                        let event = client
                            .next_within(Duration::from_millis(500), |e| Some(V5::incoming_publish(e).cloned()))
                            .await;
                        match event {
                            Some(Some(p)) => log.lock().unwrap().got.push(Got {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                number: number(&p.payload),
                                dup: p.dup,
                                connection,
                            }),
                            Some(None) => {}
                            None if client.ended().is_some() => break,
                            None if started.elapsed() > limit => return,
                            None => {}
                        }
                    }
                    let why = format!("ended ({:?}): {}", client.server_disconnect(), client.ended().unwrap());
                    log.lock().unwrap().connections.last_mut().unwrap().push_str(&format!(", {why}"));
                    // Connect again, elsewhere.
                    loop {
                        if started.elapsed() > limit {
                            return;
                        }
                        at = (at + 1) % addrs.len();
                        match Client5::try_connect(options(addrs[at]), PATIENCE).await {
                            Ok((next, ack)) => {
                                connection += 1;
                                let mut log = log.lock().unwrap();
                                log.connections.push(format!("{}: session present {}", addrs[at], ack.session_present));
                                if !ack.session_present {
                                    log.sessions_lost.push(format!("{id} on {}", addrs[at]));
                                }
                                client = next;
                                break;
                            }
                            Err(why) => {
                                log.lock().unwrap().connections.push(format!("{}: failed: {why}", addrs[at]));
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                }
            }
        });
        Roaming { log, task }
    }

    /// Every PUBLISH received so far, over all connections.
    pub fn got(&self) -> Vec<Got> {
        self.log.lock().unwrap().got.clone()
    }

    /// The distinct numbers received on `topic`.
    pub fn numbers(&self, topic: &str) -> BTreeSet<u64> {
        self.log.lock().unwrap().got.iter().filter(|g| g.topic == topic).filter_map(|g| g.number).collect()
    }

    /// Its connections so far, one line each.
    pub fn connections(&self) -> Vec<String> {
        self.log.lock().unwrap().connections.clone()
    }

    /// Reconnections that found no session.
    pub fn sessions_lost(&self) -> Vec<String> {
        self.log.lock().unwrap().sessions_lost.clone()
    }
}

impl Drop for Roaming {
    fn drop(&mut self) {
        self.task.abort();
    }
}
