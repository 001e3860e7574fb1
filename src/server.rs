//! Starting and stopping a broker: storage, listeners, background tasks.
//!
//! [`Server::start`] binds every listener and returns once the broker
//! accepts connections (tests use it with port 0 and read the bound
//! addresses); [`run`] is what the binary calls: start, wait for the
//! shutdown signal, stop gracefully.

use crate::broker::clock::{Clock, SystemClock};
use crate::broker::limits::Limit;
use crate::broker::{sys, Broker};
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::connection;
use crate::http;
use crate::protocol::DisconnectReason;
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
            tracing::info!(%addr, "HTTP endpoint ready (/metrics, /api/v1/broker)");
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

/// Connections over `mqtt.max_connections` answered at once (the rest are closed).
const MAX_REFUSALS_AT_ONCE: usize = 64;

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    broker: Arc<Broker>,
    stop: broadcast::Sender<()>,
    permits: Arc<Semaphore>,
) {
    let mut stop_rx = stop.subscribe();
    let mut connections = JoinSet::new();
    // Connections over the limit are answered (CONNACK 0x97) by at most
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            match refusals.clone().try_acquire_owned() {
                Ok(refusal) => {
                    connections.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        match transport {
                            Transport::Tcp => connection::refuse(stream, peer, broker).await,
                            Transport::WebSocket => {
                                if let Ok(bridge) = websocket::accept(stream).await {
                                    connection::refuse(bridge, peer, broker).await;
                                }
                            }
                        }
                        drop(refusal);
                    });
                }
                Err(_) => broker.limits.hit(Limit::Connections, "", &format!("connection from {peer} closed")),
            }
            continue;
        };
        let shutdown = stop.subscribe();
        connections.spawn(async move {
            serve_stream(stream, peer, transport, broker, shutdown).await;
            drop(permit);
        });
    }
    // Give connections a moment to send DISCONNECT, then stop them.
    let _ =
        tokio::time::timeout(Duration::from_secs(3), async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
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
        Transport::WebSocket => match websocket::accept(stream).await {
            Ok(bridge) => connection::serve(bridge, peer, broker, shutdown).await,
            Err(err) => tracing::info!(%peer, cause = %err, "WebSocket handshake refused"),
        },
    }
}
