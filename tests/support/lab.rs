//! A lab of real `kadmq` cluster nodes on 127.0.0.1: child processes
//! sharing a cluster key, each with its own ports, data directory and log,
//! and what tests do to them (start, kill, stop, pause, ask over HTTP).
//!
//! One lab runs at a time on the machine: [`Lab::new`] waits for its turn
//! and holds it until the lab is dropped. An idle debug-build node spends a
//! good part of a core verifying gossip signatures, so two fleets at once
//! on a 2-core machine starve each other and every wait in both stretches.
//!
//! Faults are the ones the tests use: SIGKILL ([`Node::kill`]), SIGTERM
//! ([`Node::stop`]), SIGSTOP/SIGCONT ([`Node::pause`], [`Node::resume`]),
//! each sent only to a process the lab started, by its pid. No test cuts
//! links between nodes, so there is no partition helper.

use super::http::{http_get, http_post};
use super::ports::free_port;
use super::process::{kadmq, Process};
use super::wait::wait_until;
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How long a test waits for the cluster to do something it should.
pub const SETTLE: Duration = Duration::from_secs(20);

/// How long a node started with a bootstrap address may take to be ready
/// (`/health/ready` 200): it joins within seconds, and its join timeout
/// (30 s unless the test gives `--join-timeout-ms`) admits it anyway.
pub const READY: Duration = Duration::from_secs(40);

/// The file whose `flock` is the machine-wide turn. Not the
/// `kadmq-cluster.lock` a whole `cargo test --test cluster` may run under
/// (`flock /tmp/kadmq-cluster.lock cargo test ...`): a lab inside such a
/// run must not wait for the run itself.
const LAB_LOCK: &str = "kadmq-lab.lock";

/// A temporary directory with a cluster key, in which the nodes keep their
/// data directories and logs. Holds the lab turn while it lives. If the
/// test panics, its drop prints the tail of every node's log (and copies
/// the whole logs to `$KADMQ_KEEP_LOGS`, if set).
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    _turn: Turn,
}

/// This process's and this machine's turn to run a lab.
struct Turn {
    _in_process: MutexGuard<'static, ()>,
    _machine: File,
}

impl Turn {
    /// Waits for the turn: first among the tests of this binary (a mutex, so
    /// only one thread at a time waits on the file), then among processes
    /// (an exclusive `flock`, dropped by the kernel when the file is closed
    /// or the process dies).
    fn take() -> Turn {
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        // A test that panicked with the turn leaves it poisoned; the turn is still free.
        let in_process = IN_PROCESS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let path = std::env::temp_dir().join(LAB_LOCK);
        let file = File::options().create(true).truncate(false).write(true).open(&path).expect("open the lab lock");
        // SAFETY: flock on a descriptor owned here; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            println!("  (another process runs a lab: waiting for {})", path.display());
            // SAFETY: as above; this call blocks until the other process lets go.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            assert_eq!(locked, 0, "flock {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Turn { _in_process: in_process, _machine: file }
    }
}

impl Lab {
    /// Waits for the lab turn, then makes the directory and its cluster key.
    /// One lab per test: a second one in the same test would wait forever.
    pub fn new() -> Lab {
        let turn = Turn::take();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        let lab = Lab { dir, key: key.clone(), _turn: turn };
        lab.keygen(&key);
        lab
    }

    /// Writes a fresh cluster key to `path` (`kadmq keygen`).
    pub fn keygen(&self, path: &Path) {
        let status = kadmq().args(["keygen", "--out"]).arg(path).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "kadmq keygen --out {}", path.display());
    }

    /// Starts a fleet: the first node alone, each other one bootstrapping
    /// from it, all with the extra `kadmq start` flags `flags`; returns once
    /// every node sees every one alive and takes clients (`/health/ready`).
    pub fn fleet<const N: usize>(&self, names: [&str; N], flags: &[&str]) -> [Node; N] {
        let mut boot = None;
        // Launched without waiting for each to join: they join together.
        let nodes = names.map(|name| {
            let mut node = self.unstarted(name, boot.as_deref(), &self.key, flags);
            node.launch();
            boot.get_or_insert_with(|| node.multiaddr());
            node
        });
        wait_for_members(&nodes.iter().collect::<Vec<_>>(), &names);
        for node in &nodes {
            node.wait_ready();
        }
        nodes
    }

    /// Starts node `name` (data in `<lab>/<name>`), joining through `bootstrap`.
    pub fn node(&self, name: &str, bootstrap: Option<&str>) -> Node {
        self.node_with(name, bootstrap, &self.key, &[])
    }

    /// Starts a node with its own key file and extra `kadmq start` flags
    /// ([`Node::start`]: with a bootstrap address, it returns once the node
    /// takes clients).
    pub fn node_with(&self, name: &str, bootstrap: Option<&str>, key: &Path, extra: &[&str]) -> Node {
        let mut node = self.unstarted(name, bootstrap, key, extra);
        node.start();
        node
    }

    /// A node of this lab not started yet: its ports and flags may still be
    /// changed before [`Node::start`] or [`Node::launch`].
    pub fn unstarted(&self, name: &str, bootstrap: Option<&str>, key: &Path, extra: &[&str]) -> Node {
        Node {
            process: None,
            name: name.into(),
            data_dir: self.dir.path().join(name),
            key: key.to_path_buf(),
            mqtt_port: free_port(),
            http_port: free_port(),
            p2p_port: free_port(),
            bootstrap: bootstrap.map(String::from),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            log: self.dir.path().join(format!("{name}.log")),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        logs.retain(|path| path.extension().is_some_and(|ext| ext == "log"));
        logs.sort();
        for path in logs {
            let log = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("unreadable: {e}"));
            if let Some(dir) = std::env::var_os("KADMQ_KEEP_LOGS") {
                // The lab's directory goes with the test: keep whole logs elsewhere.
                let dir = PathBuf::from(dir);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::copy(&path, dir.join(path.file_name().unwrap()));
            }
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("----- last lines of {} -----", path.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// One kadmq process of a lab. Killed (SIGKILL) when dropped.
pub struct Node {
    process: Option<Process>,
    pub name: String,
    pub data_dir: PathBuf,
    pub key: PathBuf,
    pub mqtt_port: u16,
    pub http_port: u16,
    pub p2p_port: u16,
    pub bootstrap: Option<String>,
    pub extra: Vec<String>,
    /// Environment variables of the process (settings given as `KADMQ_*`).
    pub env: Vec<(String, String)>,
    /// Where the node's log goes (read it with [`Node::log`]).
    pub log: PathBuf,
}

impl Node {
    /// (Re)starts the process with the same ports, data dir and flags, and
    /// waits until its HTTP endpoint listens and, for a node with a bootstrap
    /// address, until it has joined and takes clients (`/health/ready`).
    pub fn start(&mut self) {
        self.launch();
        if self.bootstrap.is_some() {
            self.wait_ready();
        }
    }

    /// [`Node::start`] without waiting for the node to take clients: a node
    /// with a bootstrap address refuses them until it has joined.
    pub fn launch(&mut self) {
        assert!(self.process.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = kadmq();
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
            // Fault hooks on (they act only when a test asks).
            .env("KADMQ_FAULTS", "1")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(bootstrap) = &self.bootstrap {
            command.args(["--bootstrap", bootstrap]);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.process = Some(Process::spawn(command));
        let port = self.http_port;
        wait_until(Duration::from_secs(30), &format!("{} to listen", self.name), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Waits (up to [`READY`]) until `/health/ready` answers 200.
    pub fn wait_ready(&self) {
        let port = self.http_port;
        wait_until(READY, &format!("{} to take clients (/health/ready)", self.name), || {
            match http_get(port, "/health/ready") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("{status}: {}", body.trim())),
                Err(err) => Err(err.to_string()),
            }
        });
    }

    /// The multiaddr other nodes bootstrap from (`/ip4/.../tcp/P/p2p/ID`).
    pub fn multiaddr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.peer_id())
    }

    /// The node's peer id, from its data dir (`kadmq id`).
    pub fn peer_id(&self) -> String {
        let out = kadmq().arg("id").arg("--data-dir").arg(&self.data_dir).output().expect("run kadmq id");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !id.is_empty(), "kadmq id for {}: {}: {stderr}", self.name, out.status);
        id
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// SIGKILL: no shutdown code runs, other nodes must detect the death.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// SIGTERM and wait (SIGKILL after 10 s): the node leaves the cluster cleanly.
    pub fn stop(&mut self) {
        if let Some(process) = self.process.take() {
            process.stop(Duration::from_secs(10));
        }
    }

    /// SIGSTOP: the node stops answering anyone, its connections stay open.
    pub fn pause(&mut self) {
        self.process.as_mut().expect("running").pause();
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&mut self) {
        self.process.as_mut().expect("running").resume();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the node's HTTP endpoint, once: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path).unwrap_or_else(|err| panic!("GET {path} on {}: {err}", self.name))
    }

    /// Fault hook: loses the route frames between this node and `peer`
    /// (`Some`), or heals every fault (`None`).
    pub fn cut(&self, peer: Option<&str>) {
        match peer {
            Some(peer) => self.fault(&format!("cut={peer}")),
            None => self.fault("heal"),
        }
    }

    /// Fault hook: this node does not acknowledge `peer`'s QoS 1/2 forwards.
    pub fn mute_acks(&self, peer: &str) {
        self.fault(&format!("mute_acks={peer}"));
    }

    /// Fault hook: this node loses `peer`'s QoS 1/2 forwards on arrival
    /// (until healed with `cut(None)`).
    pub fn drop_forwards(&self, peer: &str) {
        self.fault(&format!("drop_forwards={peer}"));
    }

    /// Fault hook: the route frames this node sends `peer` leave `ms` late.
    pub fn delay(&self, peer: &str, ms: u64) {
        self.fault(&format!("delay={peer}&ms={ms}"));
    }

    /// `POST /api/v1/faults?{query}`, answered 204.
    fn fault(&self, query: &str) {
        let path = format!("/api/v1/faults?{query}");
        let (status, body) = http_post(self.http_port, &path).unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert_eq!(status, 204, "POST {path} on {}: {body}", self.name);
    }

    /// GET `path` as JSON, status 200. Up to three tries: a starved node
    /// may drop a request; a test is about the cluster, not about that.
    pub fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_ok(path)).unwrap_or_else(|err| panic!("GET {path} on {}: {err}", self.name))
    }

    /// `/api/v1/cluster`.
    pub fn cluster(&self) -> Value {
        self.json("/api/v1/cluster")
    }

    /// What this node says of member `name`, if it lists it.
    pub fn member(&self, name: &str) -> Option<Value> {
        self.cluster()["members"].as_array()?.iter().find(|m| m["name"] == name).cloned()
    }

    /// Names of the members this node sees alive, sorted.
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

    /// `/api/v1/routes?topic=`, the topic percent-encoded.
    pub fn routes(&self, topic: &str) -> Value {
        let mut query = String::new();
        for byte in topic.bytes() {
            match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => query.push(byte as char),
                other => query.push_str(&format!("%{other:02X}")),
            }
        }
        self.json(&format!("/api/v1/routes?topic={query}"))
    }

    /// Every figure of `/metrics` (a labelled one under its name with the
    /// labels, as in `kadmq_x_total{reason="y"}`).
    pub fn metrics(&self) -> HashMap<String, u64> {
        self.get_ok("/metrics")
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once(' '))
            .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
            .collect()
    }

    /// One figure from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics().get(name).copied().unwrap_or_else(|| panic!("no metric {name} on {}", self.name))
    }

    /// The body of a GET answered 200, in up to three tries.
    fn get_ok(&self, path: &str) -> String {
        let mut last = String::new();
        for _ in 0..3 {
            match http_get(self.http_port, path) {
                Ok((200, body)) => return body,
                Ok((status, body)) => last = format!("status {status}: {body}"),
                Err(err) => last = err.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("GET {path} on {}: {last}", self.name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long each node may take to see the members it should: a fleet of
/// debug-build nodes on a loaded machine forms (or re-forms after a restart)
/// in seconds, but sometimes in tens of them.
pub const MEMBERSHIP: Duration = Duration::from_secs(30);

/// Waits (up to [`MEMBERSHIP`] for each) until each of `nodes` sees exactly
/// `names` alive.
pub fn wait_for_members(nodes: &[&Node], names: &[&str]) {
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    for node in nodes {
        wait_until(MEMBERSHIP, &format!("{} to see {want:?} alive", node.name), || {
            let alive = node.alive_members();
            if alive == want {
                Ok(())
            } else {
                Err(format!("it sees {alive:?}"))
            }
        });
    }
}

/// The strings of a JSON list, in its order (nothing for what is not one).
pub fn strings(list: &Value) -> Vec<String> {
    list.as_array().unwrap_or(&Vec::new()).iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()
}
