//! Starting and stopping a broker: storage, listeners, background tasks.
//!
//! [`Server::start`] binds every listener and returns once the broker
//! accepts connections (tests use it with port 0 and read the bound
//! addresses); a node that joins a fleet through a bootstrap list answers
//! them with a refusal until it has joined (see [`crate::broker::admission`]:
//! the server closes the door and `admit_when_joined` opens it). [`run`]
//! is what the binary calls: start, wait for the shutdown signal, stop
//! gracefully.

use crate::broker::admission::Door;
use crate::broker::clock::{Clock, SystemClock};
use crate::broker::limits::Limit;
use crate::broker::{sys, Broker};
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::connection;
use crate::http;
use crate::protocol::{ConnectReason, DisconnectReason};
use crate::storage::Storage;
use crate::websocket;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// A running broker.
pub struct Server {
    pub broker: Arc<Broker>,
    /// This node's part of the fleet, when `cluster.p2p_listen` is set.
    pub cluster: Option<Arc<Cluster>>,
    mqtt_addrs: Vec<SocketAddr>,
    ws_addrs: Vec<SocketAddr>,
    http_addr: Option<SocketAddr>,
    stop: broadcast::Sender<()>,
    tasks: JoinSet<()>,
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    WebSocket,
}

impl Server {
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with_clock(config, Arc::new(SystemClock::new())).await
    }

    /// [`Server::start`] with the broker on `clock` (tests give a
    /// [`TokioClock`](crate::broker::clock::TokioClock) and pause tokio).
    pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Server, StartError> {
        config.validate()?;
        let storage = Storage::open(&config.data_dir)?;
        let broker = Arc::new(Broker::open_with_clock(config.mqtt.clone(), storage, clock)?);
        let (stop, _) = broadcast::channel(1);
        let permits = Arc::new(Semaphore::new(config.mqtt.max_connections));
        let mut tasks = JoinSet::new();
        let tcp = bound(&config.listeners.mqtt).await?;
        let ws = bound(&config.listeners.ws).await?;
        let local = |ls: &[TcpListener]| ls.iter().filter_map(|l| l.local_addr().ok()).collect::<Vec<_>>();
        let (mqtt_addrs, ws_addrs) = (local(&tcp), local(&ws));
        let http = match config.listeners.http {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        // Join the fleet before the first client can subscribe or publish.
        let cluster = if config.cluster.enabled() {
            let context = cluster::StartContext {
                data_dir: &config.data_dir,
                broker: &broker,
                mqtt_listeners: mqtt_addrs.iter().map(|a| format!("mqtt://{a}")).collect(),
                tasks: &mut tasks,
            };
            Some(cluster::start(&config.cluster, context).await?)
        } else {
            None
        };
        // A node that joins through a bootstrap list takes clients once it
        // has joined (or the join timeout passed); one alone by
        // configuration at once.
        let join_timeout = Duration::from_millis(config.cluster.join_timeout_ms);
        let waits = !config.cluster.bootstrap.is_empty() && !join_timeout.is_zero();
        if let Some(cluster) = cluster.as_ref().filter(|_| waits) {
            broker.admission.wait_to_join(join_timeout);
            let door = Door::new(broker.uptime(), join_timeout, cluster::sessions::CLAIM_SETTLE);
            tasks.spawn(admit_when_joined(broker.clone(), cluster.clone(), door, stop.subscribe()));
        }
        for (listener, transport) in
            tcp.into_iter().map(|l| (l, Transport::Tcp)).chain(ws.into_iter().map(|l| (l, Transport::WebSocket)))
        {
            let (broker, stop, permits) = (broker.clone(), stop.clone(), permits.clone());
            tasks.spawn(accept_loop(listener, transport, broker, stop, permits));
        }
        {
            let broker = broker.clone();
            let mut stop_rx = stop.subscribe();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop_rx.recv() => return,
                        _ = tick.tick() => broker.sweep(),
                    }
                }
            });
        }
        if config.mqtt.sys_interval_secs > 0 {
            let mut stop_rx = stop.subscribe();
            let stopped = async move {
                let _ = stop_rx.recv().await;
            };
            tasks.spawn(sys::run(broker.clone(), Duration::from_secs(config.mqtt.sys_interval_secs), stopped));
        }
        if let Some(listener) = http {
            let mut stop_rx = stop.subscribe();
            let stopped = async move {
                let _ = stop_rx.recv().await;
            };
            tasks.spawn(http::serve(listener, broker.clone(), cluster.clone(), stopped));
        }
        if let Some(addr) = http_addr {
            tracing::info!(%addr, "HTTP endpoint ready (/metrics, /api/v1/broker, /health/ready)");
        }
        for addr in &mqtt_addrs {
            tracing::info!(%addr, "MQTT listener ready");
        }
        for addr in &ws_addrs {
            tracing::info!(%addr, "MQTT over WebSocket listener ready (path /mqtt)");
        }
        Ok(Server { broker, cluster, mqtt_addrs, ws_addrs, http_addr, stop, tasks })
    }

    pub fn mqtt_addrs(&self) -> &[SocketAddr] {
        &self.mqtt_addrs
    }

    pub fn ws_addrs(&self) -> &[SocketAddr] {
        &self.ws_addrs
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops accepting, closes every connection (MQTT 5 clients get
    /// DISCONNECT 0x8B), leaves the fleet (its sessions and wills handed to
    /// the nodes that take them over, see `crate::cluster::sessions`),
    /// waits for the tasks (the cluster's too: they end with its driver)
    /// and syncs storage.
    pub async fn shutdown(mut self) {
        if self.cluster.is_some() {
            // Connections closed from here on publish their wills as usual.
            self.broker.start_leaving();
        }
        let _ = self.stop.send(());
        self.broker.kick_all(DisconnectReason::ServerShuttingDown).await;
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
            cluster.shutdown().await;
        }
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    tracing::warn!("tasks still running after 5s; stopping them");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        match self.broker.storage.sync() {
            Ok(()) => tracing::info!("storage synced; stopped"),
            Err(err) => tracing::error!(cause = %err, "storage sync at shutdown failed"),
        }
    }
}

/// Runs a broker until `shutdown` resolves, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let server = Server::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn bound(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, StartError> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// How often a node that waits to join looks at its membership view.
const ADMISSION_LOOK: Duration = Duration::from_millis(100);

/// Opens the broker's door once this node has joined its fleet or the join
/// timeout passed: the door ([`Door`]) is shown the routing core's view
/// every [`ADMISSION_LOOK`]. Ends then, or at shutdown.
async fn admit_when_joined(
    broker: Arc<Broker>,
    cluster: Arc<Cluster>,
    mut door: Door,
    mut stop: broadcast::Receiver<()>,
) {
    let mut look = tokio::time::interval(ADMISSION_LOOK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = look.tick() => {}
        }
        let (members, version) = cluster.with_core(|node| (node.membership().len(), node.membership().version()));
        if let Some(opened) = door.look(broker.uptime(), members, version) {
            broker.admission.admit(opened);
            return;
        }
    }
}

/// Connections refused (over `mqtt.max_connections`, or before the node
/// joined its fleet) answered at once; the rest are closed unanswered.
const MAX_REFUSALS_AT_ONCE: usize = 64;

/// Why a connection is answered with a refusal instead of being served.
#[derive(Clone, Copy)]
enum Refusal {
    /// `mqtt.max_connections` are open.
    Full,
    /// The node has not joined its fleet yet.
    NotJoined,
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    broker: Arc<Broker>,
    stop: broadcast::Sender<()>,
    permits: Arc<Semaphore>,
) {
    let mut stop_rx = stop.subscribe();
    let mut connections = JoinSet::new();
    // Refused connections are answered (CONNACK 0x97 or 0x88) by at most
    // this many tasks at once; past that they are closed unanswered.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_AT_ONCE));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop_rx.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(cause = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let broker = broker.clone();
        let why = if broker.admission.is_admitted() {
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shutdown = stop.subscribe();
                    connections.spawn(async move {
                        serve_stream(stream, peer, transport, broker, shutdown).await;
                        drop(permit);
                    });
                    continue;
                }
                Err(_) => Refusal::Full,
            }
        } else {
            broker.admission.count_refusal(peer);
            Refusal::NotJoined
        };
        match refusals.clone().try_acquire_owned() {
            Ok(refusal) => {
                connections.spawn(async move {
                    refuse_stream(stream, peer, transport, &broker, why).await;
                    drop(refusal);
                });
            }
            Err(_) => {
                if let Refusal::Full = why {
                    broker.limits.hit(Limit::Connections, "", &format!("connection from {peer} closed"));
                }
            }
        }
    }
    // Give connections a moment to send DISCONNECT, then stop them.
    let _ =
        tokio::time::timeout(Duration::from_secs(3), async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
}

/// Answers a connection with a refusal (CONNACK `why`) and closes it.
async fn refuse_stream(stream: TcpStream, peer: SocketAddr, transport: Transport, broker: &Broker, why: Refusal) {
    let _ = stream.set_nodelay(true);
    let code = match why {
        Refusal::Full => ConnectReason::QuotaExceeded,
        Refusal::NotJoined => ConnectReason::ServerUnavailable,
    };
    let who = match transport {
        Transport::Tcp => connection::refuse(stream, broker, code).await,
        Transport::WebSocket => match websocket::accept(stream).await {
            Ok(bridge) => connection::refuse(bridge, broker, code).await,
            Err(_) => String::new(),
        },
    };
    if let Refusal::Full = why {
        broker.limits.hit(Limit::Connections, &who, &format!("connection from {peer} refused"));
    }
}

async fn serve_stream(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    broker: Arc<Broker>,
    shutdown: broadcast::Receiver<()>,
) {
    // Small MQTT packets must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    match transport {
        Transport::Tcp => connection::serve(stream, peer, broker, shutdown).await,
        // Boxed: a WebSocket connection's state is larger, and every TCP
        // connection's task would be that large too (an idle connection's
        // memory is mostly its task).
        Transport::WebSocket => {
            Box::pin(async move {
                match websocket::accept(stream).await {
                    Ok(bridge) => connection::serve(bridge, peer, broker, shutdown).await,
                    Err(err) => tracing::info!(%peer, cause = %err, "WebSocket handshake refused"),
                }
            })
            .await
        }
    }
}
