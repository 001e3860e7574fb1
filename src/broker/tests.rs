//! Broker tests on an in-memory store and a [`ManualClock`]: time-driven
//! behaviour (session expiry, will delay, message expiry, uptime) shown by
//! moving the clock, with no real waiting.

use super::clock::ManualClock;
use super::*;
use crate::protocol::{MessageProperties, Publish};
use bytes::Bytes;

/// Where the tests' clock starts (Unix milliseconds).
const START: u64 = 1_700_000_000_000;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A broker on an in-memory store, and the clock it reads.
fn broker_at(start_ms: u64) -> (Arc<ManualClock>, Broker) {
    let clock = Arc::new(ManualClock::at(start_ms));
    let broker = Broker::open_with_clock(MqttConfig::default(), Storage::in_memory(), clock.clone()).unwrap();
    (clock, broker)
}

fn message(topic: &str, retain: bool, expires_at_ms: Option<u64>) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::from_static(b"payload"),
        qos: QoS::AtLeastOnce,
        retain,
        properties: MessageProperties::default(),
        expires_at_ms,
        origin: None,
        fleet_id: None,
    }
}

fn subscribe(broker: &Broker, session: &Arc<Session>, filter: &str) {
    let request = SubscribeRequest {
        filter: filter.into(),
        options: SubscriptionOptions::qos(QoS::AtLeastOnce),
        identifier: None,
    };
    assert_eq!(broker.subscribe(session, vec![request]), vec![1]);
}

fn leave(broker: &Broker, connected: &Connected, will: Option<(Message, u32)>) {
    broker.disconnect(&connected.session, Departure { connection_id: connected.handle.connection_id, will });
}

/// What `session` would be sent now, as its connection would take it.
fn take(broker: &Broker, session: &Session) -> (Vec<Publish>, usize) {
    let mut out = Vec::new();
    let (_, dropped) = session.take_ready(100, &mut out, &broker.storage, broker.now_ms());
    (out, dropped)
}

#[tokio::test]
async fn a_session_expires_when_the_clock_says_so() {
    let (clock, broker) = broker_at(START);
    let connected = broker.connect("c", false, 10).await;
    leave(&broker, &connected, None);
    assert_eq!(broker.storage.sessions().unwrap()[0].1.disconnected_at_ms, Some(START));

    clock.advance(secs(9));
    broker.sweep();
    assert_eq!(broker.session_count(), 1, "kept at +9 s of a 10 s expiry");
    clock.advance(secs(2));
    broker.sweep();
    assert_eq!(broker.session_count(), 0, "gone at +11 s");
    assert!(broker.storage.sessions().unwrap().is_empty());

    // A CONNECT after the expiry, before any sweep, finds no session.
    let connected = broker.connect("d", false, 10).await;
    leave(&broker, &connected, None);
    clock.advance(secs(11));
    assert!(!broker.connect("d", false, 10).await.session_present);
}

#[tokio::test]
async fn a_delayed_will_is_published_after_its_delay() {
    let (clock, broker) = broker_at(START);
    let subscriber = broker.connect("s", false, 0).await;
    subscribe(&broker, &subscriber.session, "will/#");
    let publisher = broker.connect("p", false, 60).await;
    let mut will = message("will/p", false, None);
    will.properties.message_expiry_interval = Some(30);
    leave(&broker, &publisher, Some((will, 5)));

    clock.advance(secs(4));
    broker.sweep();
    assert!(take(&broker, &subscriber.session).0.is_empty(), "not yet at +4 s of a 5 s delay");
    clock.advance(secs(2));
    broker.sweep();
    let (sent, _) = take(&broker, &subscriber.session);
    assert_eq!(sent.len(), 1, "published at +6 s");
    // Its expiry counts from publication, not from the disconnect.
    assert_eq!(sent[0].properties.message.message_expiry_interval, Some(30));
    broker.sweep();
    assert!(take(&broker, &subscriber.session).0.is_empty(), "published once");
}

#[tokio::test]
async fn an_expired_message_is_dropped_from_the_queue() {
    let (clock, broker) = broker_at(START);
    let subscriber = broker.connect("s", false, 60).await;
    subscribe(&broker, &subscriber.session, "t");
    leave(&broker, &subscriber, None);
    broker.publish(message("t", false, Some(START + 5_000)));
    broker.publish(message("t", false, None));
    assert_eq!(broker.storage.deliveries("s").unwrap().len(), 2);

    clock.advance(secs(6));
    let resumed = broker.connect("s", false, 60).await;
    assert!(resumed.session_present);
    let (sent, dropped) = take(&broker, &resumed.session);
    assert_eq!((sent.len(), dropped), (1, 1), "the message that expired at +5 s is not sent at +6 s");
    assert_eq!(sent[0].properties.message.message_expiry_interval, None);
}

#[tokio::test]
async fn an_expired_retained_message_is_not_sent_and_is_forgotten() {
    let (clock, broker) = broker_at(START);
    broker.publish(message("r", true, Some(START + 5_000)));
    assert_eq!(broker.retained_count(), 1);

    clock.advance(secs(4));
    let early = broker.connect("early", false, 0).await;
    subscribe(&broker, &early.session, "r");
    assert_eq!(take(&broker, &early.session).0.len(), 1, "still retained at +4 s");

    clock.advance(secs(2));
    let late = broker.connect("late", false, 0).await;
    subscribe(&broker, &late.session, "r");
    assert!(take(&broker, &late.session).0.is_empty(), "expired at +6 s");
    assert_eq!(broker.retained_count(), 0);
    assert!(broker.storage.retained().unwrap().is_empty());
}

/// What another node sent on for a dead node reaches each session adopted
/// from it once: a session that holds the message already (by its fleet
/// id, which a copy sent on keeps) is skipped.
#[tokio::test]
async fn a_message_a_session_holds_already_is_not_queued_for_it_again() {
    let (_, broker) = broker_at(START);
    let adopted = broker.connect("adopted", false, 60).await;
    subscribe(&broker, &adopted.session, "t");
    leave(&broker, &adopted, None);
    let mut held = message("t", false, None);
    held.fleet_id = Some((7, 1));
    broker.publish(held.clone());
    let clients = [Arc::<str>::from("adopted")];
    assert_eq!(broker.deliver_to_sessions(&Arc::new(held), &clients), 0, "held already");
    let mut other = message("t", false, None);
    other.fleet_id = Some((7, 2));
    assert_eq!(broker.deliver_to_sessions(&Arc::new(other), &clients), 1, "a message it does not hold");
    let resumed = broker.connect("adopted", false, 60).await;
    assert_eq!(take(&broker, &resumed.session).0.len(), 2, "each once");
}

#[test]
fn uptime_counts_from_open_on_the_monotonic_reading() {
    let clock = Arc::new(ManualClock::at(START));
    clock.advance(secs(100));
    let broker = Broker::open_with_clock(MqttConfig::default(), Storage::in_memory(), clock.clone()).unwrap();
    assert_eq!(broker.uptime(), Duration::ZERO);
    clock.advance(secs(3));
    assert_eq!(broker.uptime(), secs(3));
    clock.set(START - 3_600_000);
    assert_eq!(broker.uptime(), secs(3), "a wall-clock step does not bend uptime");
    assert_eq!(broker.now_ms(), START - 3_600_000);
}
