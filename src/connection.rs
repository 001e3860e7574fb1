//! One client connection, from CONNECT to close.
//!
//! Boundary: bytes from a transport (TCP or a WebSocket bridge) are decoded
//! into packets and turned into broker calls; deliveries the broker queued
//! on the session are taken within the client's inflight window, encoded
//! and written. Writes are batched: everything ready goes out in one write.
//! Before an acknowledgement leaves that promises durability (PUBACK,
//! PUBREC, SUBACK of a persistent session), storage is flushed.

use crate::broker::limits::{topic_limits, Limit, TokenBucket};
use crate::broker::message::Message;
use crate::broker::session::{AttachmentHandle, ClientLimits, Session, NEVER_EXPIRES};
use crate::broker::{BoxFuture, Broker, Departure, Stats, SubscribeRequest};
use crate::protocol::alias::{AliasUse, OutgoingAliases};
use crate::protocol::{
    self, ConnAck, ConnAckProperties, Connect, ConnectReason, DecodeError, Disconnect, DisconnectReason, LastWill,
    Packet, PubAck, Publish, QoS, ReasonProperties, SubAck, Subscribe, UnsubAck, Unsubscribe, Version,
};
use bytes::BytesMut;
use kadmq_dht::topic;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Deliveries taken per wake-up before the write buffer is flushed.
const DELIVERY_BATCH: usize = 512;
/// A write buffer grown past this by a burst is given back once written.
const MAX_IDLE_WBUF: usize = 256 * 1024;
/// What the read buffer takes once the client has sent something, and the
/// write buffer once there is something to send. Both are given back when
/// they are empty again (the write buffer: when it is no larger than this,
/// or at the keep-alive tick), so an idle connection holds neither.
const IO_BUFFER: usize = 8 * 1024;

/// A read smaller than this that empties the read buffer gives the buffer
/// back ([`ClientStream::read_more`]).
const SMALL_READ: usize = 1024;

/// A client stream that can tell when it has bytes to read without being
/// handed a buffer to read them into.
pub trait ReadReady {
    /// Resolves once a read would not wait (a stream that cannot tell: at
    /// once, and its idle connections keep a read buffer).
    fn read_ready(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl ReadReady for tokio::net::TcpStream {
    async fn read_ready(&self) {
        // An error shows in the read that follows.
        let _ = self.readable().await;
    }
}

impl ReadReady for crate::websocket::WsBridge {
    async fn read_ready(&self) {}
}

impl ReadReady for tokio::io::DuplexStream {
    async fn read_ready(&self) {}
}

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// Client sent DISCONNECT; `will` for reason 0x04.
    ClientDisconnect { will: bool },
    /// We end it, telling a 5.0 client why.
    Error(DisconnectReason, &'static str),
    /// The socket closed or failed.
    Transport,
}

/// Serves one client until it disconnects, fails, or the broker stops.
pub async fn serve<S>(stream: S, peer: SocketAddr, broker: Arc<Broker>, shutdown: broadcast::Receiver<()>)
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    // Boxed: what only the handshake needs is not held in the task for the
    // connection's whole life (an idle connection's memory is mostly its
    // task).
    let Some(mut connection) = Box::pin(handshake(stream, peer, &broker)).await else { return };
    Stats::add(&broker.stats.clients_connected, 1);
    Stats::add(&broker.stats.clients_total, 1);
    connection.run(shutdown).await;
    broker.stats.clients_connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Reads the client's CONNECT (within the connect timeout) and accepts it:
/// the connection, unless it was refused or closed.
async fn handshake<S>(stream: S, peer: SocketAddr, broker: &Arc<Broker>) -> Option<Connection<S>>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    let mut client = ClientStream { stream, rbuf: BytesMut::with_capacity(1024), wbuf: BytesMut::new(), last_read: 0 };
    let timeout = Duration::from_secs(broker.config.connect_timeout_secs);
    let connect = match tokio::time::timeout(timeout, client.read_connect(broker)).await {
        Ok(Ok(connect)) => connect,
        Ok(Err(reason)) => {
            tracing::info!(%peer, reason, "connection refused before CONNECT");
            let _ = client.flush().await;
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {}s", timeout.as_secs());
            return None;
        }
    };
    Connection::accept(client, connect, peer, broker.clone()).await
}

/// Answers a connection the server does not serve: reads its CONNECT
/// (briefly), refuses it with CONNACK `code` in the client's version (over
/// `mqtt.max_connections`: 0x97 Quota exceeded; before the node joined its
/// fleet: 0x88 Server unavailable; 3.1.1 gets return code 3 for both), so
/// the client learns why instead of waiting, and closes it. Returns the
/// client id (empty when no CONNECT came).
pub async fn refuse<S>(stream: S, broker: &Broker, code: ConnectReason) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client =
        ClientStream { stream, rbuf: BytesMut::with_capacity(1024), wbuf: BytesMut::with_capacity(64), last_read: 0 };
    let wait = Duration::from_secs(broker.config.connect_timeout_secs.min(5));
    let who = match tokio::time::timeout(wait, client.read_connect(broker)).await {
        Ok(Ok(connect)) => {
            client.queue(&connack(code, false), connect.version);
            connect.client_id
        }
        _ => String::new(),
    };
    let _ = tokio::time::timeout(wait, client.flush()).await;
    let _ = tokio::time::timeout(wait, client.stream.shutdown()).await;
    who
}

/// The client's byte stream with its read and write buffers.
struct ClientStream<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes the last [`ClientStream::read_more`] read.
    last_read: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream<S> {
    /// Reads the first packet, which must be a CONNECT. On error, a CONNACK
    /// saying why may already be in the write buffer.
    async fn read_connect(&mut self, broker: &Broker) -> Result<Connect, &'static str> {
        loop {
            match protocol::decode(&mut self.rbuf, Version::V5, broker.config.max_packet_size as usize) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(_)) => return Err("first packet is not CONNECT"),
                Ok(None) => {}
                Err(DecodeError::UnsupportedProtocolVersion(_)) => {
                    // A client of an unknown version cannot read 5.0 properties;
                    // the 3.1.1 form (return code 1) is what every client parses.
                    self.queue(&connack(ConnectReason::UnsupportedProtocolVersion, false), Version::V311);
                    return Err("unsupported protocol version");
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "bad CONNECT");
                    return Err("malformed CONNECT");
                }
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return Err("closed before CONNECT"),
                Ok(_) => {}
            }
        }
    }

    fn queue(&mut self, packet: &Packet, version: Version) {
        if self.wbuf.capacity() == 0 {
            // `with_capacity`, not `reserve`: a `BytesMut` grows by its
            // starting capacity.
            self.wbuf = BytesMut::with_capacity(IO_BUFFER);
        }
        if let Err(err) = protocol::encode(packet, version, &mut self.wbuf) {
            tracing::error!(cause = %err, packet = packet.name(), "could not encode");
        }
    }

    async fn flush(&mut self) -> std::io::Result<usize> {
        self.flush_within(None).await
    }

    /// Writes the buffer; with `stall`, fails when the peer accepts no byte
    /// for that long (a client that stopped reading must not pin the task).
    async fn flush_within(&mut self, stall: Option<Duration>) -> std::io::Result<usize> {
        async fn bounded<T>(
            stall: Option<Duration>,
            io: impl std::future::Future<Output = std::io::Result<T>>,
        ) -> std::io::Result<T> {
            match stall {
                Some(limit) => tokio::time::timeout(limit, io)
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading"))),
                None => io.await,
            }
        }
        let n = self.wbuf.len();
        let mut written = 0;
        while written < n {
            match bounded(stall, self.stream.write(&self.wbuf[written..])).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                m => written += m,
            }
        }
        if n > 0 {
            bounded(stall, self.stream.flush()).await?;
            self.wbuf.clear();
        }
        // A small buffer is cheap to take again; a large one (a busy
        // subscriber's) is kept for the next burst, up to a bound.
        if self.wbuf.capacity() <= IO_BUFFER || self.wbuf.capacity() > MAX_IDLE_WBUF {
            self.wbuf = BytesMut::new();
        }
        Ok(n)
    }

    /// Reads more of the client's bytes. A read buffer left empty by a
    /// small read (the client sends little: it is idle, or about to be) is
    /// given back first, and taken again only once the stream has something
    /// to read: a silent client costs no buffer. A busy client's is kept.
    async fn read_more(&mut self) -> std::io::Result<usize>
    where
        S: ReadReady,
    {
        if self.rbuf.is_empty() && (self.rbuf.capacity() == 0 || self.last_read < SMALL_READ) {
            self.rbuf = BytesMut::new();
            self.stream.read_ready().await;
            // `with_capacity`, not `reserve`: a `BytesMut` split by the
            // decoder grows by its starting capacity.
            self.rbuf = BytesMut::with_capacity(IO_BUFFER);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        self.last_read = n;
        Ok(n)
    }

    /// Gives back an empty write buffer of any size (the connection is idle).
    fn release_idle_write_buffer(&mut self) {
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
    }
}

fn connack(code: ConnectReason, session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck { session_present, code, properties: ConnAckProperties::default() })
}

struct Connection<S> {
    client: ClientStream<S>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    version: Version,
    session: Arc<Session>,
    attachment: AttachmentHandle,
    /// Boxed, as is `awaiting`: rarely set, and large inline.
    will: Option<Box<LastWill>>,
    keep_alive: Option<Duration>,
    /// Session expiry at CONNECT: 0 forbids a later non-zero value.
    connect_expiry: u32,
    topic_aliases: HashMap<u16, String>,
    /// Aliases we send (MQTT 5, when the client accepts them).
    outgoing_aliases: Option<Box<OutgoingAliases>>,
    /// The client's Maximum Packet Size (protocol maximum if it gave none).
    client_max_packet_size: usize,
    problem_information: bool,
    /// Set when storage must be flushed before the write buffer goes out.
    needs_flush: bool,
    publishes: Vec<Publish>,
    /// The client's PUBLISH allowance (`mqtt.max_publish_rate`), if limited.
    publish_rate: Option<TokenBucket>,
    /// Set while the next packet is a PUBLISH over the allowance: nothing
    /// is read or handled until then, so TCP slows the client down.
    throttled_until: Option<Instant>,
    /// An acknowledgement waiting for the fleet: a SUBACK for its routes
    /// ([`Broker::routes_settled`]), a PUBACK or PUBREC of a retained
    /// message for its owners ([`Broker::publish_kept`]). Nothing more is
    /// read or handled until it is sent, so what the client does after the
    /// acknowledgement sees the fleet updated.
    /// With the fleet number of the publish's forward, if it had one.
    awaiting: Option<Box<Awaiting>>,
    /// PUBACKs in the write buffer (MQTT 5 only; 3.1.1 has no Receive
    /// Maximum): their PUBLISHes are still in flight from the client's side.
    unwritten_pubacks: usize,
    /// PUBACKs and PUBRECs waiting for the client's publishes forwarded
    /// to other nodes ([`HeldAcks`]).
    held: HeldAcks,
}

/// An acknowledgement waiting for the fleet, input stopped meanwhile
/// ([`Connection::awaiting`]): the packet, the fleet number of its
/// publish's forward, and what it waits for.
type Awaiting = (Packet, Option<u64>, BoxFuture<'static, ()>);

/// PUBACKs and PUBRECs held until this client's publishes forwarded to
/// other nodes are settled ([`Fleet::forwards_settled`]: acknowledged by
/// the destinations, or past the window and written by the next storage
/// flush), in the order of their PUBLISHes (MQTT-4.6.0-2, -3: an
/// acknowledgement without a forward of its own waits behind the held
/// ones). Input is read and routed meanwhile, so a publisher with many
/// messages in flight keeps the link busy during the round trip instead of
/// waiting for it batch by batch.
///
/// [`Fleet::forwards_settled`]: crate::broker::Fleet::forwards_settled
#[derive(Default)]
struct HeldAcks {
    /// Each with the fleet number of the newest forward it waits for.
    queue: VecDeque<(u64, Packet)>,
    /// The wait under way: for the forwards up to this number.
    settling: Option<(u64, BoxFuture<'static, ()>)>,
    /// PUBACKs held: MQTT 5's Receive Maximum counts them in flight.
    pubacks: usize,
}

impl HeldAcks {
    fn newest(&self) -> Option<u64> {
        self.queue.back().map(|(id, _)| *id)
    }
}

impl<S: AsyncRead + AsyncWrite + ReadReady + Unpin> Connection<S> {
    /// Checks the CONNECT, attaches to the session and answers CONNACK.
    async fn accept(
        mut client: ClientStream<S>,
        connect: Connect,
        peer: SocketAddr,
        broker: Arc<Broker>,
    ) -> Option<Self> {
        let version = connect.version;
        let refuse = |client: &mut ClientStream<S>, code: ConnectReason, why: &'static str| {
            tracing::info!(%peer, client_id = %connect.client_id, why, "CONNECT refused");
            client.queue(&connack(code, false), version);
        };
        if connect.properties.authentication_method.is_some() {
            refuse(&mut client, ConnectReason::BadAuthenticationMethod, "enhanced authentication is not supported");
            let _ = client.flush().await;
            return None;
        }
        if let Some(will) = &connect.will {
            if !topic::valid_topic_name(&will.topic) {
                refuse(&mut client, ConnectReason::TopicNameInvalid, "invalid will topic");
                let _ = client.flush().await;
                return None;
            }
            if let Some(limit) = topic_limits(&broker.config).exceeded_by(&will.topic) {
                broker.limits.hit(limit.into(), &connect.client_id, "CONNECT refused (will topic, 0x90)");
                refuse(&mut client, ConnectReason::TopicNameInvalid, "will topic over the topic limits");
                let _ = client.flush().await;
                return None;
            }
        }
        let config = &broker.config;
        let mut props = ConnAckProperties::default();
        let mut client_id = connect.client_id.clone();
        if client_id.is_empty() {
            if version == Version::V311 && !connect.clean_start {
                refuse(&mut client, ConnectReason::ClientIdentifierNotValid, "empty client id needs a clean session");
                let _ = client.flush().await;
                return None;
            }
            client_id = format!("kadmq-{:016x}", rand::random::<u64>());
            props.assigned_client_identifier = Some(client_id.clone());
        }
        let requested_expiry = match version {
            Version::V311 if connect.clean_start => 0,
            Version::V311 => NEVER_EXPIRES,
            Version::V5 => connect.properties.session_expiry_interval.unwrap_or(0),
        };
        let expiry = requested_expiry.min(config.max_session_expiry);
        if version == Version::V5 && expiry != requested_expiry {
            props.session_expiry_interval = Some(expiry);
        }
        let mut keep_alive = connect.keep_alive;
        if config.max_keep_alive > 0 && (keep_alive == 0 || keep_alive > config.max_keep_alive) {
            keep_alive = config.max_keep_alive;
            if version == Version::V5 {
                props.server_keep_alive = Some(keep_alive);
            }
        }
        let connected = broker.connect(&client_id, connect.clean_start, expiry).await;
        let client_max_packet_size =
            connect.properties.maximum_packet_size.map_or(protocol::MAX_PACKET_SIZE, |m| m as usize);
        {
            let mut st = connected.session.lock();
            st.client_limits = ClientLimits {
                version,
                // The outgoing window: what the client accepts (MQTT 5), at most max_inflight.
                receive_maximum: connect.properties.receive_maximum.unwrap_or(u16::MAX).min(config.max_inflight),
                maximum_packet_size: client_max_packet_size,
            };
        }
        let outgoing_aliases = match version {
            Version::V5 if config.outgoing_topic_aliases => Some(Box::new(OutgoingAliases::new(
                connect.properties.topic_alias_maximum.unwrap_or(0).min(config.topic_alias_maximum),
            )))
            .filter(|aliases| aliases.enabled()),
            _ => None,
        };
        if version == Version::V5 {
            props.receive_maximum = Some(config.receive_maximum);
            props.maximum_packet_size = Some(config.max_packet_size);
            props.topic_alias_maximum = Some(config.topic_alias_maximum);
        }
        client.queue(
            &Packet::ConnAck(ConnAck {
                session_present: connected.session_present,
                code: ConnectReason::Success,
                properties: props,
            }),
            version,
        );
        tracing::debug!(%peer, client_id, version = ?version, session_present = connected.session_present, "connected");
        let publish_rate = TokenBucket::new(config.max_publish_rate, Instant::now());
        let mut connection = Connection {
            client,
            peer,
            broker,
            version,
            session: connected.session,
            attachment: connected.handle,
            will: connect.will.map(Box::new),
            keep_alive: (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500)),
            connect_expiry: expiry,
            topic_aliases: HashMap::new(),
            outgoing_aliases,
            client_max_packet_size,
            problem_information: connect.properties.request_problem_information != Some(0),
            needs_flush: true,
            publishes: Vec::new(),
            publish_rate,
            throttled_until: None,
            awaiting: None,
            unwritten_pubacks: 0,
            held: HeldAcks::default(),
        };
        if connection.broker.fleet().is_some() {
            let client_id = connection.session.client_id.clone();
            let now = connection.broker.now_ms();
            let will = connection.will.clone().map(|w| will_message(*w, version, &client_id, now));
            connection.broker.announce_connected(&client_id, will);
        }
        for packet in connection.session.resend_inflight(connection.broker.now_ms()) {
            connection.send(packet);
        }
        Some(connection)
    }

    async fn run(&mut self, mut shutdown: broadcast::Receiver<()>) {
        let mut last_seen = Instant::now();
        let far = Duration::from_secs(3600 * 24 * 365);
        let keep_alive_timer = tokio::time::sleep(self.keep_alive.unwrap_or(far));
        tokio::pin!(keep_alive_timer);
        let mut more = true;
        // Packets that arrived in the same read as the CONNECT are already
        // buffered: handle them now, not after the next read.
        if !self.client.rbuf.is_empty() {
            if let Err(close) = self.handle_input() {
                self.close(close).await;
                return;
            }
        }
        let close = loop {
            if more {
                more = self.take_deliveries();
            }
            if let Err(err) = self.flush().await {
                tracing::debug!(peer = %self.peer, cause = %err, "write failed");
                break Close::Transport;
            }
            let throttled = self.throttled_until;
            let awaiting = self.awaiting.is_some();
            tokio::select! {
                biased;
                // Before the socket: a client that keeps sending must not
                // hold its own acknowledgements back.
                upto = forwards_settled(&mut self.held.settling), if self.held.settling.is_some() => {
                    self.release_held(upto);
                    self.settle_held();
                }
                read = self.client.read_more(), if throttled.is_none() && !awaiting => {
                    match read {
                        Ok(0) | Err(_) => break Close::Transport,
                        Ok(n) => {
                            Stats::add(&self.broker.stats.bytes_received, n as u64);
                            last_seen = Instant::now();
                            if let Err(close) = self.handle_input() {
                                break close;
                            }
                            more = true;
                        }
                    }
                }
                reason = &mut self.attachment.kicked => {
                    let reason = reason.unwrap_or(DisconnectReason::SessionTakenOver);
                    break Close::Error(reason, "closed by the broker");
                }
                _ = fleet_settled(&mut self.awaiting), if awaiting => {
                    let (ack, forwarded, _) = *self.awaiting.take().expect("awaiting");
                    match ack {
                        Packet::PubAck(_) | Packet::PubRec(_) => self.ack_publish(ack, forwarded),
                        ack => self.send_ack(ack),
                    }
                    // The client did send; only we held back from reading it.
                    last_seen = Instant::now();
                    if let Err(close) = self.handle_input() {
                        break close;
                    }
                    more = true;
                }
                _ = throttle_over(throttled), if throttled.is_some() => {
                    self.throttled_until = None;
                    // The client did send; only we held back from reading it.
                    last_seen = Instant::now();
                    if let Err(close) = self.handle_input() {
                        break close;
                    }
                    more = true;
                }
                _ = shutdown.recv() => break Close::Error(DisconnectReason::ServerShuttingDown, "broker shutting down"),
                _ = self.session.woken(), if !more => more = true,
                // More deliveries are ready than one batch took: go round
                // again at once (after a look at the socket above).
                _ = tokio::task::yield_now(), if more => {}
                _ = &mut keep_alive_timer => {
                    self.client.release_idle_write_buffer();
                    let Some(keep_alive) = self.keep_alive else { continue };
                    if awaiting {
                        // We are not reading (an acknowledgement waits for the
                        // fleet): the client's silence is ours, not its.
                        last_seen = Instant::now();
                    }
                    if last_seen.elapsed() >= keep_alive {
                        break Close::Error(DisconnectReason::KeepAliveTimeout, "keep-alive timeout");
                    }
                    keep_alive_timer.as_mut().reset(last_seen + keep_alive);
                }
            }
        };
        self.close(close).await;
    }

    /// Decodes and handles every complete packet in the read buffer, up to
    /// a PUBLISH over the client's allowance (then `throttled_until` is set).
    fn handle_input(&mut self) -> Result<(), Close> {
        loop {
            if self.awaiting.is_some() {
                return Ok(());
            }
            const PUBLISH: u8 = 3;
            let next_is_publish = self.client.rbuf.first().is_some_and(|b| b >> 4 == PUBLISH);
            if let (true, Some(bucket)) = (next_is_publish, self.publish_rate.as_mut()) {
                if let Err(at) = bucket.ready(Instant::now()) {
                    self.broker.limits.hit(Limit::PublishRate, &self.session.client_id, "PUBLISH read later");
                    self.throttled_until = Some(at);
                    return Ok(());
                }
            }
            let packet = match protocol::decode(
                &mut self.client.rbuf,
                self.version,
                self.broker.config.max_packet_size as usize,
            ) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(()),
                Err(err @ DecodeError::PacketTooLarge { .. }) => {
                    self.broker.limits.hit(Limit::PacketSize, &self.session.client_id, &format!("{err}: disconnected"));
                    return Err(Close::Error(err.disconnect_reason(), "oversize packet"));
                }
                Err(err) => {
                    tracing::info!(peer = %self.peer, client_id = %self.session.client_id, cause = %err, "bad packet");
                    return Err(Close::Error(err.disconnect_reason(), "malformed or oversize packet"));
                }
            };
            if let (Packet::Publish(_), Some(bucket)) = (&packet, self.publish_rate.as_mut()) {
                bucket.spend();
            }
            self.handle(packet)?;
        }
    }

    fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(ack) | Packet::PubComp(ack) => {
                self.session.complete(ack.packet_id, &self.broker.storage);
                Ok(())
            }
            Packet::PubRec(ack) => {
                let known = self.session.received(ack.packet_id, ack.reason, &self.broker.storage);
                if ack.reason < 0x80 {
                    let reason = if known { 0 } else { 0x92 }; // 0x92: packet identifier not found
                    self.send(Packet::PubRel(PubAck::with_reason(ack.packet_id, reason)));
                }
                Ok(())
            }
            Packet::PubRel(ack) => {
                let known = {
                    let mut st = self.session.lock();
                    let known = st.incoming_qos2.remove(&ack.packet_id);
                    if known {
                        self.session.save(&st, &self.broker.storage);
                    }
                    known
                };
                let reason = if known { 0 } else { 0x92 };
                self.send(Packet::PubComp(PubAck::with_reason(ack.packet_id, reason)));
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe),
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(disconnect) => self.on_disconnect(disconnect),
            Packet::Connect(_) => Err(Close::Error(DisconnectReason::ProtocolError, "second CONNECT")),
            Packet::Auth(_) => {
                Err(Close::Error(DisconnectReason::ProtocolError, "AUTH without enhanced authentication"))
            }
            other => {
                tracing::debug!(packet = other.name(), "client sent a server-only packet");
                Err(Close::Error(DisconnectReason::ProtocolError, "server-only packet from client"))
            }
        }
    }

    fn on_publish(&mut self, mut publish: Publish) -> Result<(), Close> {
        Stats::add(&self.broker.stats.messages_received, 1);
        if !publish.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: only the server sends Subscription Identifiers.
            return Err(Close::Error(DisconnectReason::ProtocolError, "subscription identifier in PUBLISH"));
        }
        // Topic aliases (client to broker).
        if let Some(alias) = publish.properties.topic_alias.take() {
            if alias == 0 || alias > self.broker.config.topic_alias_maximum {
                return Err(Close::Error(DisconnectReason::TopicAliasInvalid, "topic alias out of range"));
            }
            if publish.topic.is_empty() {
                match self.topic_aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return Err(Close::Error(DisconnectReason::ProtocolError, "unknown topic alias")),
                }
            } else {
                self.topic_aliases.insert(alias, publish.topic.clone());
            }
        }
        if !topic::valid_topic_name(&publish.topic) {
            return Err(Close::Error(DisconnectReason::TopicNameInvalid, "invalid topic name"));
        }
        let packet_id = publish.packet_id.unwrap_or(0);
        if publish.qos != QoS::AtMostOnce {
            // MQTT-3.3.4-7: at most Receive Maximum QoS 1/2 PUBLISHes without
            // their acknowledgement: QoS 2 from PUBREC until PUBREL, QoS 1
            // until its PUBACK is written (a retransmission is not a new one).
            let st = self.session.lock();
            let resent = publish.qos == QoS::ExactlyOnce && st.incoming_qos2.contains(&packet_id);
            let in_flight = st.incoming_qos2.len() + self.unwritten_pubacks + self.held.pubacks;
            if !resent && in_flight >= self.broker.config.receive_maximum as usize {
                return Err(Close::Error(DisconnectReason::ReceiveMaximumExceeded, "receive maximum exceeded"));
            }
        }
        if let Some(limit) = topic_limits(&self.broker.config).exceeded_by(&publish.topic) {
            // MQTT 5 at QoS 1/2: refused with 0x90 (Topic Name invalid), the
            // connection stays; at QoS 0, and for 3.1.1 (no reason codes in
            // acknowledgements), the only answer is to close the connection.
            self.broker.limits.hit(limit.into(), &self.session.client_id, "PUBLISH refused (0x90)");
            return match (self.version, publish.qos) {
                (Version::V5, QoS::AtLeastOnce) => {
                    self.ack_publish(Packet::PubAck(PubAck::with_reason(packet_id, 0x90)), None);
                    Ok(())
                }
                (Version::V5, QoS::ExactlyOnce) => {
                    self.ack_publish(Packet::PubRec(PubAck::with_reason(packet_id, 0x90)), None);
                    Ok(())
                }
                _ => Err(Close::Error(DisconnectReason::TopicNameInvalid, "topic over the topic limits")),
            };
        }
        if publish.properties.message.payload_format_indicator == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            // MQTT 5: acknowledge with 0x99 (payload format invalid), do not route.
            match publish.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack_publish(Packet::PubAck(PubAck::with_reason(packet_id, 0x99)), None),
                QoS::ExactlyOnce => self.ack_publish(Packet::PubRec(PubAck::with_reason(packet_id, 0x99)), None),
            }
            return Ok(());
        }
        if publish.qos == QoS::ExactlyOnce {
            let mut st = self.session.lock();
            if st.incoming_qos2.contains(&packet_id) {
                // A retransmission: already routed; acknowledge again.
                drop(st);
                self.ack_publish(Packet::PubRec(PubAck::new(packet_id)), None);
                return Ok(());
            }
            st.incoming_qos2.insert(packet_id);
            self.session.save(&st, &self.broker.storage);
        }
        let now = self.broker.now_ms();
        let message = Message {
            expires_at_ms: publish.properties.message.message_expiry_interval.map(|s| now + s as u64 * 1000),
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties.message,
            origin: Some(self.session.client_id.clone()),
            fleet_id: None,
        };
        let published = self.broker.publish_kept(message);
        if published.refused {
            return self.refuse_publish(publish.qos, packet_id);
        }
        let (kept, forwarded) = (published.kept, published.forwarded);
        // MQTT 5: 0x10 tells the publisher nobody was subscribed.
        let reason = if published.matched == 0 && self.version == Version::V5 { 0x10 } else { 0 };
        let ack = match publish.qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Packet::PubAck(PubAck::with_reason(packet_id, reason)),
            QoS::ExactlyOnce => Packet::PubRec(PubAck::with_reason(packet_id, reason)),
        };
        match kept {
            Some(kept) => self.awaiting = Some(Box::new((ack, forwarded, kept))),
            None => self.ack_publish(ack, forwarded),
        }
        Ok(())
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) -> Result<(), Close> {
        let mut requests = Vec::with_capacity(subscribe.filters.len());
        for f in subscribe.filters {
            if f.options.no_local && f.filter.starts_with("$share/") {
                return Err(Close::Error(DisconnectReason::ProtocolError, "No Local on a shared subscription"));
            }
            requests.push(SubscribeRequest {
                filter: f.filter,
                options: f.options,
                identifier: subscribe.subscription_identifier,
            });
        }
        let filters: Vec<String> = requests.iter().map(|r| r.filter.clone()).collect();
        let reasons = self.broker.subscribe(&self.session, requests);
        let settled = self.broker.routes_settled(filters.iter().map(String::as_str), &reasons);
        let suback = SubAck { packet_id: subscribe.packet_id, reasons, properties: ReasonProperties::default() };
        self.acknowledge(Packet::SubAck(suback), settled);
        Ok(())
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), Close> {
        let reasons = self.broker.unsubscribe(&self.session, &unsubscribe.filters);
        self.needs_flush = true;
        self.send(Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            reasons,
            properties: ReasonProperties::default(),
        }));
        Ok(())
    }

    fn on_disconnect(&mut self, disconnect: Disconnect) -> Result<(), Close> {
        if let Some(expiry) = disconnect.session_expiry_interval {
            if self.connect_expiry == 0 && expiry != 0 {
                return Err(Close::Error(DisconnectReason::ProtocolError, "session expiry set after CONNECT with 0"));
            }
            self.broker.set_expiry(&self.session, expiry.min(self.broker.config.max_session_expiry));
        }
        Err(Close::ClientDisconnect { will: disconnect.reason == DisconnectReason::DisconnectWithWillMessage })
    }

    /// Takes deliveries within the window and encodes them; returns whether
    /// more are ready.
    fn take_deliveries(&mut self) -> bool {
        let mut publishes = std::mem::take(&mut self.publishes);
        let (more, dropped) =
            self.session.take_ready(DELIVERY_BATCH, &mut publishes, &self.broker.storage, self.broker.now_ms());
        if dropped > 0 {
            Stats::add(&self.broker.stats.messages_dropped, dropped as u64);
        }
        Stats::add(&self.broker.stats.messages_sent, publishes.len() as u64);
        for mut publish in publishes.drain(..) {
            self.alias_topic(&mut publish);
            self.send(Packet::Publish(publish));
        }
        self.publishes = publishes;
        more
    }

    /// Replaces the topic of an outgoing PUBLISH by an alias where the
    /// client accepts aliases: the first PUBLISH to a topic carries topic
    /// and alias, later ones an empty topic. Topics of up to 3 bytes are
    /// sent as they are (an alias would not make them shorter).
    fn alias_topic(&mut self, publish: &mut Publish) {
        if self.outgoing_aliases.is_none() || publish.topic.len() <= 3 {
            return;
        }
        if let Some(alias) = self.outgoing_aliases.as_mut().and_then(|aliases| aliases.known(&publish.topic)) {
            publish.topic.clear();
            publish.properties.topic_alias = Some(alias);
            return;
        }
        // Binding adds a 3-byte property (and the remaining length may need
        // one more byte): only if the client accepts the larger packet
        // (take_ready checked the size without it).
        if self.client_max_packet_size < protocol::MAX_PACKET_SIZE {
            let len = protocol::encoded_len(&Packet::Publish(publish.clone()), self.version);
            if len + 4 > self.client_max_packet_size {
                return;
            }
        }
        match self.outgoing_aliases.as_mut().and_then(|aliases| aliases.assign(&publish.topic)) {
            Some(AliasUse::Bound(alias)) => publish.properties.topic_alias = Some(alias),
            Some(AliasUse::Known(alias)) => {
                publish.topic.clear();
                publish.properties.topic_alias = Some(alias);
            }
            None => {}
        }
    }

    /// The fleet could not keep a QoS 1/2 message (its outbox is full):
    /// MQTT 5 says so with 0x97 (Quota exceeded) and the client keeps the
    /// message; MQTT 3.1.1 has no refusal in PUBACK, so the connection is
    /// closed without one and the client sends the message again when it
    /// reconnects. Nothing is acknowledged that the fleet cannot keep.
    fn refuse_publish(&mut self, qos: QoS, packet_id: u16) -> Result<(), Close> {
        if qos == QoS::ExactlyOnce {
            let mut st = self.session.lock();
            st.incoming_qos2.remove(&packet_id);
            self.session.save(&st, &self.broker.storage);
        }
        match (self.version, qos) {
            (Version::V5, QoS::AtLeastOnce) => {
                self.ack_publish(Packet::PubAck(PubAck::with_reason(packet_id, 0x97)), None)
            }
            (Version::V5, QoS::ExactlyOnce) => {
                self.ack_publish(Packet::PubRec(PubAck::with_reason(packet_id, 0x97)), None)
            }
            _ => return Err(Close::Error(DisconnectReason::QuotaExceeded, "the fleet's outbox is full")),
        }
        Ok(())
    }

    /// Sends `ack` now, or once `wait` resolves (input waits meanwhile).
    fn acknowledge(&mut self, ack: Packet, wait: Option<BoxFuture<'static, ()>>) {
        match wait {
            Some(wait) => self.awaiting = Some(Box::new((ack, None, wait))),
            None => self.send_ack(ack),
        }
    }

    /// Sends a PUBACK or PUBREC once the forwards up to `forwarded` are
    /// settled, and after every one held before it ([`HeldAcks`]).
    fn ack_publish(&mut self, ack: Packet, forwarded: Option<u64>) {
        let Some(upto) = forwarded.max(self.held.newest()) else { return self.send_ack(ack) };
        if self.in_flight_until_written(&ack) {
            self.held.pubacks += 1;
        }
        self.held.queue.push_back((upto, ack));
        self.settle_held();
    }

    /// Whether `ack`'s PUBLISH counts against MQTT 5's Receive Maximum until
    /// `ack` is written (a PUBACK; a QoS 2 PUBLISH counts until PUBREL).
    fn in_flight_until_written(&self, ack: &Packet) -> bool {
        matches!(ack, Packet::PubAck(_)) && self.version == Version::V5
    }

    /// Starts waiting for the held acknowledgements' forwards; with nothing
    /// to wait for, they go at once.
    fn settle_held(&mut self) {
        while self.held.settling.is_none() {
            let Some(upto) = self.held.newest() else { return };
            match self.broker.fleet().and_then(|fleet| fleet.forwards_settled(upto)) {
                Some(wait) => self.held.settling = Some((upto, wait)),
                None => self.release_held(upto),
            }
        }
    }

    /// The held acknowledgements whose forwards up to `upto` are settled
    /// go to the write buffer; its flush first flushes the storage, which
    /// writes the forwards still unacknowledged.
    fn release_held(&mut self, upto: u64) {
        self.held.settling = None;
        while self.held.queue.front().is_some_and(|(id, _)| *id <= upto) {
            let (_, ack) = self.held.queue.pop_front().expect("a front");
            if self.in_flight_until_written(&ack) {
                self.held.pubacks -= 1;
            }
            self.send_ack(ack);
        }
    }

    /// Waits for every held acknowledgement's forwards and sends them (a
    /// QoS 2 PUBLISH taken but not answered is answered at once when the
    /// client sends it again: its forwards must be safe by then).
    async fn release_all_held(&mut self) {
        // A retained publish's forward waits in `awaiting` until its owners
        // stored it: made safe too (its acknowledgement is not sent).
        let awaiting = self.awaiting.as_ref().and_then(|awaiting| awaiting.1);
        let Some(upto) = self.held.newest().max(awaiting) else { return };
        let wait = match self.held.settling.take() {
            Some((settling, wait)) if settling == upto => Some(wait),
            _ => self.broker.fleet().and_then(|fleet| fleet.forwards_settled(upto)),
        };
        if let Some(wait) = wait {
            wait.await;
        }
        self.release_held(upto);
    }

    fn send_ack(&mut self, ack: Packet) {
        self.needs_flush = true;
        match ack {
            Packet::PubAck(ack) => self.send_puback(ack),
            ack => self.send(ack),
        }
    }

    /// A PUBACK for a client's QoS 1 PUBLISH, which stays in flight (for
    /// Receive Maximum) until the PUBACK is written.
    fn send_puback(&mut self, ack: PubAck) {
        if self.version == Version::V5 {
            self.unwritten_pubacks += 1;
        }
        self.send(Packet::PubAck(ack));
    }

    fn send(&mut self, mut packet: Packet) {
        if !self.problem_information {
            strip_problem_information(&mut packet);
        }
        self.client.queue(&packet, self.version);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.client.wbuf.is_empty() {
            self.unwritten_pubacks = 0;
            return Ok(());
        }
        if self.needs_flush || self.broker.storage.is_dirty() {
            self.needs_flush = false;
            if let Err(err) = self.broker.storage.flush() {
                // What the write buffer acknowledges is not safe: it is not
                // sent, and the connection closes (the client sends its
                // unacknowledged messages again when it reconnects).
                tracing::error!(peer = %self.peer, cause = %err, "storage flush failed: connection closed unacknowledged");
                return Err(std::io::Error::other(err));
            }
        }
        // No byte taken for a keep-alive period: the client is gone.
        let n = self.client.flush_within(self.keep_alive).await?;
        self.unwritten_pubacks = 0;
        Stats::add(&self.broker.stats.bytes_sent, n as u64);
        Ok(())
    }

    async fn close(&mut self, close: Close) {
        let client_id = self.session.client_id.clone();
        self.release_all_held().await;
        let will = match &close {
            Close::ClientDisconnect { will } => *will,
            Close::Error(DisconnectReason::SessionTakenOver, _) => true,
            Close::Error(DisconnectReason::ServerShuttingDown, _) => {
                // A node leaving its fleet hands the session (and a will
                // waiting for its delay) to another node: the usual rules.
                // A single node shutting down keeps the session for its
                // restart, but not the will (it is not durable), so the
                // will is not published.
                self.broker.is_leaving()
            }
            Close::Error(..) | Close::Transport => true,
        };
        match &close {
            Close::Error(reason, why) => {
                tracing::info!(peer = %self.peer, %client_id, reason = ?reason, why, "closing connection");
                if self.version == Version::V5 {
                    let mut disconnect = Disconnect::new(*reason);
                    if self.problem_information {
                        disconnect.reason_string = Some((*why).to_string());
                    }
                    self.send(Packet::Disconnect(disconnect));
                }
                let _ = self.flush().await;
            }
            Close::ClientDisconnect { .. } => tracing::debug!(peer = %self.peer, %client_id, "client disconnected"),
            Close::Transport => tracing::debug!(peer = %self.peer, %client_id, "connection lost"),
        }
        let shutdown = self.client.stream.shutdown();
        let _ = tokio::time::timeout(self.keep_alive.unwrap_or(Duration::from_secs(5)), shutdown).await;
        let now = self.broker.now_ms();
        let will = self.will.take().filter(|_| will).map(|w| will_message(*w, self.version, &client_id, now));
        self.broker.disconnect(&self.session, Departure { connection_id: self.attachment.connection_id, will });
        if let Err(err) = self.broker.storage.flush() {
            tracing::error!(cause = %err, "storage flush failed");
        }
    }
}

/// A client's will as the broker publishes it, with its Will Delay
/// Interval in seconds (MQTT 5; 3.1.1 has none).
fn will_message(will: LastWill, version: Version, client_id: &Arc<str>, now: u64) -> (Message, u32) {
    let delay = if version == Version::V5 { will.properties.will_delay_interval.unwrap_or(0) } else { 0 };
    let message = Message {
        expires_at_ms: will.properties.message.message_expiry_interval.map(|s| now + s as u64 * 1000),
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        properties: will.properties.message,
        origin: Some(client_id.clone()),
        fleet_id: None,
    };
    (message, delay)
}

/// Request Problem Information = 0: no reason string or user properties on
/// anything but PUBLISH, CONNACK and DISCONNECT.
fn strip_problem_information(packet: &mut Packet) {
    match packet {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            a.properties = ReasonProperties::default()
        }
        Packet::SubAck(s) => s.properties = ReasonProperties::default(),
        Packet::UnsubAck(u) => u.properties = ReasonProperties::default(),
        _ => {}
    }
}

/// Resolves at `at` (pending forever without one). Its timer is boxed, made
/// only when polled: a connection never throttled carries none.
async fn throttle_over(at: Option<Instant>) {
    match at {
        Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
        None => std::future::pending().await,
    }
}

/// Waits for what an acknowledgement waits for (pending forever when none
/// waits; the caller polls it only while one does).
async fn fleet_settled(awaiting: &mut Option<Box<Awaiting>>) {
    match awaiting {
        Some(awaiting) => awaiting.2.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The forwards number the held acknowledgements' wait was for, once it
/// resolves.
async fn forwards_settled(settling: &mut Option<(u64, BoxFuture<'static, ()>)>) -> u64 {
    match settling {
        Some((upto, wait)) => {
            wait.as_mut().await;
            *upto
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One burst (512 deliveries of up to the packet size limit each) must
    /// not leave an idle connection holding a buffer of that size for good.
    #[tokio::test]
    async fn write_buffer_is_released_after_a_burst() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            theirs.read_to_end(&mut sink).await.unwrap();
            sink.len()
        });
        let mut client =
            ClientStream { stream: ours, rbuf: BytesMut::new(), wbuf: BytesMut::with_capacity(8 * 1024), last_read: 0 };
        client.wbuf.extend_from_slice(&vec![0u8; 4 << 20]);
        assert_eq!(client.flush().await.unwrap(), 4 << 20);
        assert!(client.wbuf.capacity() <= MAX_IDLE_WBUF, "write buffer kept {} bytes", client.wbuf.capacity());
        drop(client);
        assert_eq!(reader.await.unwrap(), 4 << 20);
    }

    /// A client that sent a little and went quiet leaves its connection
    /// holding neither buffer; the next bytes it sends are read as before.
    #[tokio::test]
    async fn a_quiet_client_costs_no_buffers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut theirs = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let mut client = ClientStream { stream: ours, rbuf: BytesMut::new(), wbuf: BytesMut::new(), last_read: 0 };
        theirs.write_all(b"ab").await.unwrap();
        assert_eq!(client.read_more().await.unwrap(), 2);
        client.rbuf.clear(); // handled
        client.queue(&Packet::PingResp, Version::V311);
        assert_eq!(client.flush().await.unwrap(), 2);
        assert_eq!(client.wbuf.capacity(), 0, "a small write buffer is given back once written");
        let quiet = tokio::time::timeout(Duration::from_millis(50), client.read_more()).await;
        assert!(quiet.is_err(), "nothing to read");
        assert_eq!(client.rbuf.capacity(), 0, "no read buffer while the client is quiet");
        theirs.write_all(b"cde").await.unwrap();
        assert_eq!(client.read_more().await.unwrap(), 3);
        assert_eq!(&client.rbuf[..], b"cde");
    }

    /// A PUBACK promises the message is kept: when the storage cannot
    /// flush, none is sent and the connection closes.
    #[tokio::test]
    async fn no_puback_goes_out_when_the_storage_cannot_flush() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let storage = crate::storage::Storage::in_memory();
        let failing = Arc::new(AtomicBool::new(false));
        let fail = failing.clone();
        storage.before_flush(Box::new(move |_| match fail.load(Ordering::Relaxed) {
            true => Err(crate::storage::StorageError::Store(Box::new(std::io::Error::other("disk gone")))),
            false => Ok(()),
        }));
        let broker = Arc::new(Broker::open(crate::config::MqttConfig::default(), storage).unwrap());
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let (_stop, stopped) = broadcast::channel(1);
        let served = tokio::spawn(serve(ours, "127.0.0.1:1".parse().unwrap(), broker, stopped));
        // CONNECT (3.1.1, clean session, no client id); CONNACK.
        theirs.write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00").await.unwrap();
        let mut connack = [0u8; 4];
        theirs.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0]);
        failing.store(true, Ordering::Relaxed);
        // PUBLISH QoS 1 to "a", packet id 1.
        theirs.write_all(b"\x32\x06\x00\x01a\x00\x01x").await.unwrap();
        let mut next = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(30), theirs.read(&mut next)).await.expect("closed").unwrap();
        assert_eq!(&next[..n], b"", "closed with nothing after the CONNACK: no PUBACK");
        served.await.unwrap();
    }
}
