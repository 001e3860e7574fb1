//! Real MQTT clients for the tests: rumqttc, its MQTT 3.1.1 API
//! ([`Client`]) or its MQTT 5 one ([`Client5`]), with the event loop
//! driven by a task. Every event goes to a channel the test reads (waiting
//! for what it expects, bounded); every PUBLISH received is also recorded
//! with its arrival time, so a test on a plain thread can look at what
//! arrived while traffic flows. The loop stops at its first error (the
//! client never reconnects), which shows as [`Mqtt::ended`].

use rumqttc::v5::mqttbytes::v5 as v5p;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a client waits for what must come (CONNACK, SUBACK, acks):
/// generous, as a loaded machine running fleets of debug-build nodes may
/// take seconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Requests a client may have queued before `publish` waits.
const CAPACITY: usize = 1000;

/// What the wrapper needs of one of rumqttc's two APIs.
pub trait Api: Send + 'static {
    type Client: Clone + Send + Sync + 'static;
    type EventLoop: Send + 'static;
    type Options;
    type Event: Debug + Send + 'static;
    type Publish: Clone + Debug + Send + 'static;
    fn new(options: Self::Options) -> (Self::Client, Self::EventLoop);
    fn poll(eventloop: &mut Self::EventLoop) -> impl Future<Output = Result<Self::Event, Ending>> + Send;
    fn incoming_publish(event: &Self::Event) -> Option<&Self::Publish>;
    fn is_puback(event: &Self::Event) -> bool;
    fn is_pubcomp(event: &Self::Event) -> bool;
}

/// How an event loop ended: rumqttc's error, and the reason code of the
/// DISCONNECT the server sent, if that is what ended it (MQTT 5 only).
pub struct Ending {
    pub why: String,
    pub disconnect: Option<u8>,
}

/// rumqttc's MQTT 3.1.1 API (`rumqttc::AsyncClient`).
pub enum V311 {}

/// rumqttc's MQTT 5 API (`rumqttc::v5::AsyncClient`).
pub enum V5 {}

impl Api for V311 {
    type Client = rumqttc::AsyncClient;
    type EventLoop = rumqttc::EventLoop;
    type Options = rumqttc::MqttOptions;
    type Event = rumqttc::Event;
    type Publish = rumqttc::Publish;

    fn new(options: rumqttc::MqttOptions) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, CAPACITY);
        // A loaded machine may take more than rumqttc's default 5 s to accept.
        let mut network = eventloop.network_options();
        network.set_connection_timeout(20);
        eventloop.set_network_options(network);
        (client, eventloop)
    }

    async fn poll(eventloop: &mut rumqttc::EventLoop) -> Result<rumqttc::Event, Ending> {
        eventloop.poll().await.map_err(|err| Ending { why: err.to_string(), disconnect: None })
    }

    fn incoming_publish(event: &rumqttc::Event) -> Option<&rumqttc::Publish> {
        match event {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p),
            _ => None,
        }
    }

    fn is_puback(event: &rumqttc::Event) -> bool {
        matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
    }

    fn is_pubcomp(event: &rumqttc::Event) -> bool {
        matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)))
    }
}

impl Api for V5 {
    type Client = rumqttc::v5::AsyncClient;
    type EventLoop = rumqttc::v5::EventLoop;
    type Options = rumqttc::v5::MqttOptions;
    type Event = rumqttc::v5::Event;
    type Publish = v5p::Publish;

    fn new(mut options: rumqttc::v5::MqttOptions) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
        // As for 3.1.1: a loaded machine (or a CONNACK that waits for
        // another node) may take more than rumqttc's default 5 s.
        options.set_connection_timeout(20);
        rumqttc::v5::AsyncClient::new(options, CAPACITY)
    }

    async fn poll(eventloop: &mut rumqttc::v5::EventLoop) -> Result<rumqttc::v5::Event, Ending> {
        eventloop.poll().await.map_err(|err| {
            let disconnect = match &err {
                rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                    reason_code,
                    ..
                }) => Some(*reason_code as u8),
                _ => None,
            };
            Ending { why: err.to_string(), disconnect }
        })
    }

    fn incoming_publish(event: &rumqttc::v5::Event) -> Option<&v5p::Publish> {
        match event {
            rumqttc::v5::Event::Incoming(v5p::Packet::Publish(p)) => Some(p),
            _ => None,
        }
    }

    fn is_puback(event: &rumqttc::v5::Event) -> bool {
        matches!(event, rumqttc::v5::Event::Incoming(v5p::Packet::PubAck(_)))
    }

    fn is_pubcomp(event: &rumqttc::v5::Event) -> bool {
        matches!(event, rumqttc::v5::Event::Incoming(v5p::Packet::PubComp(_)))
    }
}

/// One PUBLISH a client received, and when.
#[derive(Clone, Debug)]
pub struct Received<P> {
    pub publish: P,
    pub at: Instant,
}

/// What the event loop task records for the test.
struct Record<P> {
    publishes: Mutex<Vec<Received<P>>>,
    pubacks: AtomicU64,
    pubcomps: AtomicU64,
    /// Why the event loop ended, if it did.
    ended: Mutex<Option<String>>,
    /// The reason code of the server's DISCONNECT, if one ended it.
    disconnect: Mutex<Option<u8>>,
}

/// A rumqttc client whose event loop runs in a task (aborted when the
/// client is dropped). `client` is rumqttc's own handle, for requests the
/// wrapper does not name.
pub struct Mqtt<A: Api> {
    pub id: String,
    pub client: A::Client,
    events: mpsc::UnboundedReceiver<A::Event>,
    record: Arc<Record<A::Publish>>,
    task: JoinHandle<()>,
}

/// An MQTT 3.1.1 client (rumqttc's main API).
pub type Client = Mqtt<V311>;
/// An MQTT 5 client (rumqttc's `v5` API).
pub type Client5 = Mqtt<V5>;

impl<A: Api> Drop for Mqtt<A> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<A: Api> Mqtt<A> {
    /// Starts the event loop (in the current runtime) without waiting for
    /// anything: the CONNECT goes with the first poll.
    pub fn start(id: &str, options: A::Options) -> Mqtt<A> {
        let (client, mut eventloop) = A::new(options);
        let (tx, events) = mpsc::unbounded_channel();
        let record = Arc::new(Record {
            publishes: Mutex::new(Vec::new()),
            pubacks: AtomicU64::new(0),
            pubcomps: AtomicU64::new(0),
            ended: Mutex::new(None),
            disconnect: Mutex::new(None),
        });
        let task = tokio::spawn({
            let record = record.clone();
            async move {
                loop {
                    match A::poll(&mut eventloop).await {
                        Ok(event) => {
                            if let Some(publish) = A::incoming_publish(&event) {
                                let received = Received { publish: publish.clone(), at: Instant::now() };
                                record.publishes.lock().unwrap().push(received);
                            }
                            if A::is_puback(&event) {
                                record.pubacks.fetch_add(1, Ordering::Relaxed);
                            }
                            if A::is_pubcomp(&event) {
                                record.pubcomps.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = tx.send(event);
                        }
                        Err(ending) => {
                            // The reason first: whoever sees `ended` may read it.
                            *record.disconnect.lock().unwrap() = ending.disconnect;
                            *record.ended.lock().unwrap() = Some(ending.why);
                            return;
                        }
                    }
                }
            }
        });
        Mqtt { id: id.into(), client, events, record, task }
    }

    /// The next event `pick` takes, skipping the others; panics after
    /// [`PATIENCE`] or if the connection ends first.
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl FnMut(&A::Event) -> Option<T>) -> T {
        self.collect(what, 1, PATIENCE, pick).await.pop().unwrap()
    }

    /// The next `n` events `pick` takes (what it made of them), skipping the
    /// others; panics if they do not all come within `within`.
    pub async fn collect<T>(
        &mut self,
        what: &str,
        n: usize,
        within: Duration,
        mut pick: impl FnMut(&A::Event) -> Option<T>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        let events = &mut self.events;
        let all = tokio::time::timeout(within, async {
            while out.len() < n {
                match events.recv().await {
                    Some(event) => out.extend(pick(&event)),
                    None => return false,
                }
            }
            true
        })
        .await;
        let ended = self.ended();
        assert!(all == Ok(true), "{}: got {} of {n} {what} (connection ended: {ended:?})", self.id, out.len());
        out
    }

    /// The next event `pick` takes within `within`, or None (time out, or
    /// the connection ended).
    pub async fn next_within<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&A::Event) -> Option<T>,
    ) -> Option<T> {
        let events = &mut self.events;
        let found = tokio::time::timeout(within, async {
            while let Some(event) = events.recv().await {
                if let Some(found) = pick(&event) {
                    return Some(found);
                }
            }
            None
        });
        found.await.ok().flatten()
    }

    /// The next PUBLISH (from the channel, in order with the other events).
    pub async fn next_publish(&mut self) -> A::Publish {
        self.wait_for("PUBLISH", |e| A::incoming_publish(e).cloned()).await
    }

    /// The PUBLISHes (from the channel) that arrive within `wait`.
    pub async fn publishes_within(&mut self, wait: Duration) -> Vec<A::Publish> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            out.extend(A::incoming_publish(&event).cloned());
        }
        out
    }

    /// The PUBLISHes (from the channel) received until `quiet` passes without one.
    pub async fn publishes_until_quiet(&mut self, quiet: Duration) -> Vec<A::Publish> {
        let mut out = Vec::new();
        while let Some(publish) = self.next_within(quiet, |e| A::incoming_publish(e).cloned()).await {
            out.push(publish);
        }
        out
    }

    /// Every PUBLISH received so far, in arrival order (whether or not the
    /// test read it from the channel).
    pub fn received(&self) -> Vec<Received<A::Publish>> {
        self.record.publishes.lock().unwrap().clone()
    }

    /// How many PUBLISHes arrived so far.
    pub fn count(&self) -> usize {
        self.record.publishes.lock().unwrap().len()
    }

    /// How many PUBACKs the client received (for its QoS 1 publishes).
    pub fn pubacks(&self) -> u64 {
        self.record.pubacks.load(Ordering::Relaxed)
    }

    /// How many PUBCOMPs the client received (for its QoS 2 publishes).
    pub fn pubcomps(&self) -> u64 {
        self.record.pubcomps.load(Ordering::Relaxed)
    }

    /// The reason code of the DISCONNECT the server ended the connection
    /// with (MQTT 5; None while it is open, or if it ended otherwise).
    pub fn server_disconnect(&self) -> Option<u8> {
        *self.record.disconnect.lock().unwrap()
    }

    /// Why the event loop ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.record.ended.lock().unwrap().clone()
    }

    /// Panics if the connection ended.
    pub fn check_alive(&self) {
        if let Some(why) = self.ended() {
            panic!("{}: connection ended: {why}", self.id);
        }
    }

    /// Stops the event loop (the connection drops) before the client goes.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Client {
    /// Options for client `id` on 127.0.0.1:`port`: keep-alive 30 s, the
    /// rest rumqttc's defaults (clean session).
    pub fn options(id: &str, port: u16) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// Connects and waits for the CONNACK (whatever its code).
    pub async fn connect(options: rumqttc::MqttOptions) -> (Client, rumqttc::ConnAck) {
        let id = options.client_id();
        let mut client = Client::start(&id, options);
        let ack = client
            .wait_for("CONNACK", |e| match e {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) => Some(ack.clone()),
                _ => None,
            })
            .await;
        (client, ack)
    }

    /// Connects, asserts the CONNACK is a success; returns its session present flag.
    pub async fn connect_ok(options: rumqttc::MqttOptions) -> (Client, bool) {
        let (client, ack) = Client::connect(options).await;
        assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "CONNACK for {}", client.id);
        (client, ack.session_present)
    }

    /// SUBSCRIBE to one filter and wait for the SUBACK; returns its return codes.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        self.wait_for("SUBACK", |e| match e {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// SUBSCRIBE to every filter at `qos`, `per_packet` filters a packet,
    /// waiting at most `within` for the SUBACKs; asserts each was granted.
    pub async fn subscribe_all(&mut self, filters: &[String], qos: rumqttc::QoS, per_packet: usize, within: Duration) {
        let chunks: Vec<&[String]> = filters.chunks(per_packet).collect();
        for chunk in &chunks {
            let many = chunk.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
            self.client.subscribe_many(many).await.unwrap();
        }
        let codes: Vec<rumqttc::SubscribeReasonCode> = self
            .collect("SUBACK", chunks.len(), within, |e| match e {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
                _ => None,
            })
            .await
            .concat();
        assert_eq!(codes.len(), filters.len(), "{}: one return code per filter", self.id);
        let refused: Vec<&String> = filters
            .iter()
            .zip(&codes)
            .filter(|(_, c)| **c == rumqttc::SubscribeReasonCode::Failure)
            .map(|(f, _)| f)
            .collect();
        assert!(refused.is_empty(), "{}: subscriptions refused: {refused:?}", self.id);
    }

    /// Queues a PUBLISH (rumqttc sends it and runs its QoS flow).
    pub async fn publish(&self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, retain, payload).await.unwrap();
    }
}

impl Client5 {
    /// Options for client `id` on 127.0.0.1:`port`: keep-alive 10 s, the
    /// rest rumqttc's defaults (clean start).
    pub fn options(id: &str, port: u16) -> rumqttc::v5::MqttOptions {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options
    }

    /// Connects and waits for the CONNACK (whatever its code).
    pub async fn connect(options: rumqttc::v5::MqttOptions) -> (Client5, v5p::ConnAck) {
        let id = options.client_id();
        let mut client = Client5::start(&id, options);
        let ack = client
            .wait_for("CONNACK", |e| match e {
                rumqttc::v5::Event::Incoming(v5p::Packet::ConnAck(ack)) => Some(ack.clone()),
                _ => None,
            })
            .await;
        (client, ack)
    }

    /// Options for a persistent session: clean start 0 and Session Expiry
    /// Interval `expiry` seconds (the first connection of the id simply
    /// finds no session).
    pub fn persistent(id: &str, port: u16, expiry: u32) -> rumqttc::v5::MqttOptions {
        let mut options = Client5::options(id, port);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(expiry));
        options
    }

    /// [`Client5::connect`] without the panic: the CONNACK, or why there
    /// was none (the connection ended or was refused first, or nothing came
    /// within `within`).
    pub async fn try_connect(
        options: rumqttc::v5::MqttOptions,
        within: Duration,
    ) -> Result<(Client5, v5p::ConnAck), String> {
        let id = options.client_id();
        let mut client = Client5::start(&id, options);
        let ack = client
            .next_within(within, |e| match e {
                rumqttc::v5::Event::Incoming(v5p::Packet::ConnAck(ack)) => Some(ack.clone()),
                _ => None,
            })
            .await;
        match ack {
            Some(ack) => Ok((client, ack)),
            None => Err(client.ended().unwrap_or_else(|| format!("no CONNACK within {within:?}"))),
        }
    }

    /// SUBSCRIBE to `filters` (with subscription identifier `id`, if any)
    /// and wait for the SUBACK.
    pub async fn subscribe(&mut self, filters: Vec<v5p::Filter>, id: Option<usize>) -> v5p::SubAck {
        match id {
            Some(id) => {
                let properties = v5p::SubscribeProperties { id: Some(id), user_properties: vec![] };
                self.client.subscribe_many_with_properties(filters, properties).await.unwrap()
            }
            None => self.client.subscribe_many(filters).await.unwrap(),
        }
        self.wait_for("SUBACK", |e| match e {
            rumqttc::v5::Event::Incoming(v5p::Packet::SubAck(ack)) => Some(ack.clone()),
            _ => None,
        })
        .await
    }
}
