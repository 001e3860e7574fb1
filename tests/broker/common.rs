//! Brokers for the broker tests: one in this process on 127.0.0.1 with
//! ephemeral ports and a temporary data directory ([`TestBroker`]), or the
//! `kadmq` binary as a child process ([`BrokerProcess`]), and the check
//! that a broker still serves. Clients, ports and waits are in `support`.

use crate::support::ports::free_port;
use crate::support::process::{kadmq, Process};
use crate::support::raw::{publish_packet, Raw};
use crate::support::wait::wait_for_port;
use kadmq::broker::clock::TokioClock;
use kadmq::protocol::QoS;
use kadmq::{Config, Server};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

/// A broker running in this process; its data directory lives as long as it.
/// Its broker runs on tokio's clock: a `start_paused` test advances it.
pub struct TestBroker {
    pub server: Option<Server>,
    pub dir: TempDir,
    clock: Arc<TokioClock>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `tweak` adjusts the test configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(TokioClock::new());
        let server =
            Server::start_with_clock(test_config(dir.path(), tweak), clock.clone()).await.expect("broker starts");
        TestBroker { server: Some(server), dir, clock }
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
        // The same clock: what the first run stored was stamped by it.
        let config = test_config(self.dir.path(), tweak);
        let server = Server::start_with_clock(config, self.clock.clone()).await.expect("broker restarts");
        self.server = Some(server);
    }
}

/// A broker that is a cluster node joining its fleet through a bootstrap
/// address where nothing listens (so it refuses clients until
/// `join_timeout_ms` passed), with its HTTP endpoint; its cluster key is
/// written into `keys`.
pub async fn joining_broker(keys: &Path, join_timeout_ms: u64) -> TestBroker {
    let key = keys.join("cluster.key");
    kadmq_dht::driver::write_cluster_key(&key, &kadmq_dht::driver::generate_cluster_key()).expect("cluster key");
    TestBroker::start_with(|c| {
        c.listeners.http = Some("127.0.0.1:0".parse().unwrap());
        c.cluster.p2p_listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        c.cluster.bootstrap = vec![format!("/ip4/127.0.0.1/tcp/{}", free_port())];
        c.cluster.cluster_key_file = Some(key);
        c.cluster.join_timeout_ms = join_timeout_ms;
    })
    .await
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
    pub process: Process,
    pub port: u16,
}

impl BrokerProcess {
    pub fn spawn(data_dir: &Path) -> BrokerProcess {
        let port = free_port();
        let mut command = kadmq();
        command
            .args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let process = BrokerProcess { process: Process::spawn(command), port };
        wait_for_port(port, Duration::from_secs(5));
        process
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(self) {
        self.process.kill();
    }
}

/// A broker answers a fresh client: CONNECT, SUBSCRIBE, PUBLISH to itself.
pub async fn assert_broker_serves(addr: SocketAddr) {
    let id = format!("probe-{}", rand_suffix());
    let (mut c, _) = Raw::v311(addr, &id, true).await;
    let topic = format!("probe/{id}");
    assert_eq!(c.subscribe_id(1, &[(&topic, QoS::AtLeastOnce)]).await, vec![1]);
    c.send(&publish_packet(&topic, b"ok", QoS::AtMostOnce, false, None)).await;
    let p = c.recv_publish().await;
    assert_eq!(&p.payload[..], b"ok");
    c.disconnect().await;
}

pub fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
