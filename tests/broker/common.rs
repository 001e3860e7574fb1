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
    let mut config = Config::default();
    config.data_dir = data_dir.to_path_buf();
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
