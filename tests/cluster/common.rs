//! Real kadmq nodes as child processes on 127.0.0.1, and what tests need
//! around them: the HTTP API, metrics, MQTT clients, waiting.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a test waits for the cluster to do something it should.
pub const SETTLE: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 100 ms until it is true or `within` passes.
pub fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {within:?} waiting for: {what}");
}

/// A directory with a cluster key, in which nodes keep their data dirs.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        let status = Command::new(env!("CARGO_BIN_EXE_kadmq"))
            .args(["keygen", "--out"])
            .arg(&key)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        Lab { dir, key }
    }

    /// Starts node `name` (data in `<lab>/<name>`), joining through `bootstrap`.
    pub fn node(&self, name: &str, bootstrap: Option<&str>) -> Node {
        self.node_with(name, bootstrap, &self.key, &[])
    }

    /// Starts a node with its own key file and extra `kadmq start` flags.
    pub fn node_with(&self, name: &str, bootstrap: Option<&str>, key: &Path, extra: &[&str]) -> Node {
        let mut node = Node {
            child: None,
            name: name.into(),
            data_dir: self.dir.path().join(name),
            key: key.to_path_buf(),
            mqtt_port: free_port(),
            http_port: free_port(),
            p2p_port: free_port(),
            bootstrap: bootstrap.map(String::from),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: self.dir.path().join(format!("{name}.log")),
        };
        node.start();
        node
    }
}

/// One kadmq process. Killed (SIGKILL) when dropped.
pub struct Node {
    child: Option<Child>,
    pub name: String,
    pub data_dir: PathBuf,
    pub key: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub p2p_port: u16,
    pub bootstrap: Option<String>,
    pub extra: Vec<String>,
    /// Where the node's log goes (read it with [`Node::log`]).
    pub log: PathBuf,
}

impl Node {
    /// (Re)starts the process with the same ports, data dir and flags.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kadmq"));
        command
            .args(["start", "--no-ws", "--log", "info,fjall=warn,lsm_tree=warn,libp2p=warn"])
            .args(["--mqtt", &format!("127.0.0.1:{}", self.mqtt_port)])
            .args(["--http", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--node-name", &self.name])
            .args(["--p2p-listen", &format!("/ip4/127.0.0.1/tcp/{}", self.p2p_port)])
            .arg("--cluster-key-file")
            .arg(&self.key)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(bootstrap) = &self.bootstrap {
            command.args(["--bootstrap", bootstrap]);
        }
        self.child = Some(command.spawn().expect("spawn kadmq"));
        let port = self.http_port;
        wait_until(Duration::from_secs(30), &format!("{} to listen", self.name), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// The multiaddr other nodes bootstrap from (`/ip4/.../tcp/P/p2p/ID`).
    pub fn multiaddr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.peer_id())
    }

    pub fn peer_id(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_kadmq")).arg("id").arg("--data-dir").arg(&self.data_dir).output();
        String::from_utf8(out.unwrap().stdout).unwrap().trim().to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no shutdown code runs, other nodes must detect the death.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the node leaves the cluster cleanly.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the node's HTTP endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path)
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path} on {}: {body}", self.name);
        serde_json::from_str(&body).unwrap()
    }

    /// `/api/v1/cluster`.
    pub fn cluster(&self) -> Value {
        self.get_json("/api/v1/cluster")
    }

    /// Names of the members this node sees alive.
    pub fn alive_members(&self) -> Vec<String> {
        let mut names: Vec<String> = self.cluster()["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "alive")
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    /// One unlabelled figure from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} on {}", self.name))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until each of `nodes` sees exactly `names` alive.
pub fn wait_for_members(nodes: &[&Node], names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    for node in nodes {
        wait_until(SETTLE, &format!("{} to see {want:?} alive", node.name), || node.alive_members() == want);
    }
}

/// A minimal HTTP/1.0 GET on 127.0.0.1.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Prints the tail of every node's log if the test panics (and copies the
/// whole logs to `$KADMQ_KEEP_LOGS`, if set).
pub struct LogsOnPanic(pub Vec<(String, PathBuf)>);

impl LogsOnPanic {
    pub fn watch(nodes: &[&Node]) -> LogsOnPanic {
        LogsOnPanic(nodes.iter().map(|n| (n.name.clone(), n.log.clone())).collect())
    }

    pub fn add(&mut self, node: &Node) {
        self.0.push((node.name.clone(), node.log.clone()));
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, path) in &self.0 {
            let log = std::fs::read_to_string(path).unwrap_or_else(|e| format!("unreadable: {e}"));
            if let Some(dir) = std::env::var_os("KADMQ_KEEP_LOGS") {
                // The lab's directory goes with the test: keep whole logs elsewhere.
                let dir = PathBuf::from(dir);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::copy(path, dir.join(format!("{name}.log")));
            }
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("----- last lines of {name}'s log ({}) -----", path.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}
