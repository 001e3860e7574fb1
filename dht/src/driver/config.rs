//! The driver's configuration and the two secrets a node keeps on disk.
//!
//! Job: say how one node joins the fleet (name, listen and bootstrap
//! multiaddrs, timings) and load, generate and persist its node keypair (so
//! the peer id survives restarts) and the fleet's pre-shared key (libp2p
//! pnet, the go-ipfs `swarm.key` format). Boundary: no sockets here; the
//! event loop turns a validated [`DriverConfig`] into a running swarm.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use libp2p::{
    identity::Keypair,
    multiaddr::{Multiaddr, Protocol},
    pnet::PreSharedKey,
    PeerId,
};

use super::{membership::FleetSettings, Error};

/// File name of the node keypair inside a data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the incarnation counter inside a data directory.
pub const INCARNATION_FILE: &str = "incarnation";

/// How one node's driver takes part in the cluster: identity, addresses,
/// timings. (The routing core's settings are [`crate::core::RoutingConfig`].)
#[derive(Clone)]
pub struct DriverConfig {
    /// Human-readable node name, carried in the node record.
    pub node_name: String,
    /// The node's identity; its public half is the peer id.
    pub keypair: Keypair,
    /// The fleet's pre-shared key: peers without it cannot connect at all.
    pub cluster_key: PreSharedKey,
    /// Multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/7000`.
    pub listen_addrs: Vec<Multiaddr>,
    /// Multiaddrs of nodes to join through, e.g.
    /// `/ip4/10.0.0.5/tcp/7000/p2p/12D3…` or `/dns4/n1.example/tcp/7000`.
    /// One reachable address is enough: the rest of the fleet is found
    /// through Kademlia and gossiped node records.
    pub bootstrap: Vec<Multiaddr>,
    /// MQTT listener addresses of this node, opaque to the driver; carried in
    /// the node record so other nodes can redirect clients.
    pub mqtt_listeners: Vec<String>,
    /// Incarnation of this run. Must grow across restarts of the same peer
    /// id so other nodes replace the old record; see [`next_incarnation`].
    pub incarnation: u64,
    /// How often this node publishes its record (its heartbeat).
    pub heartbeat_interval: Duration,
    /// Silence after which a member is `Suspect`.
    pub suspect_timeout: Duration,
    /// Silence after which a member is `Dead`.
    pub dead_timeout: Duration,
    /// Bound on a connection's upgrade (pnet, noise, yamux). With a wrong
    /// cluster key the handshake often stalls rather than fails (each side
    /// reads the other's bytes as garbage, e.g. a huge length prefix); this
    /// turns the stall into an error.
    pub handshake_timeout: Duration,
    /// Bytes held for all peers together (frames queued, being written):
    /// one node-wide [`super::SendBudget`]; `Client::send` waits for room.
    pub send_buffer: usize,
    /// Bytes of received frames handed to the user and not yet dealt with
    /// (see [`super::Event::Frame`]), from all peers together: past it the
    /// readers wait (yamux flow control pushes back on the senders).
    pub receive_buffer: usize,
    /// This node's fleet settings, announced in its record; peers whose
    /// settings differ are refused (see [`super::Event::MemberRefused`]).
    pub fleet: FleetSettings,
}

impl std::fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets; the pnet key's Debug prints only its
        // fingerprint.
        f.debug_struct("DriverConfig")
            .field("node_name", &self.node_name)
            .field("peer_id", &self.keypair.public().to_peer_id())
            .field("cluster_key", &self.cluster_key)
            .field("listen_addrs", &self.listen_addrs)
            .field("bootstrap", &self.bootstrap)
            .field("mqtt_listeners", &self.mqtt_listeners)
            .field("incarnation", &self.incarnation)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("suspect_timeout", &self.suspect_timeout)
            .field("dead_timeout", &self.dead_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("send_buffer", &self.send_buffer)
            .field("receive_buffer", &self.receive_buffer)
            .field("fleet", &self.fleet)
            .finish()
    }
}

impl DriverConfig {
    /// A config with production timings (heartbeat 1 s, suspect after 5 s,
    /// dead after 15 s, handshakes bounded by 10 s), listening on `/ip4/0.0.0.0/tcp/0`, no bootstrap
    /// addresses and an incarnation taken from the wall clock (milliseconds
    /// since the epoch), which grows across restarts unless the clock jumps
    /// back; use [`next_incarnation`] for a persisted counter.
    pub fn new(node_name: impl Into<String>, keypair: Keypair, cluster_key: PreSharedKey) -> Self {
        let incarnation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
        Self {
            node_name: node_name.into(),
            keypair,
            cluster_key,
            listen_addrs: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: Vec::new(),
            mqtt_listeners: Vec::new(),
            incarnation,
            heartbeat_interval: Duration::from_secs(1),
            suspect_timeout: Duration::from_secs(5),
            dead_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(10),
            send_buffer: 256 << 20,
            receive_buffer: 64 << 20,
            fleet: FleetSettings {
                replication: crate::core::RoutingConfig::default().replication as u32,
                shard_depth: crate::shard::DEFAULT_SHARD_DEPTH as u32,
                frame_version: u32::from(crate::core::frame::FRAME_VERSION),
            },
        }
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Checks the timings and addresses before anything starts.
    pub fn validate(&self) -> Result<(), Error> {
        if self.node_name.is_empty() {
            return Err(Error::Config("node name is empty".into()));
        }
        if self.listen_addrs.is_empty() {
            return Err(Error::Config("no listen address".into()));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(Error::Config("heartbeat interval is zero".into()));
        }
        if self.suspect_timeout <= self.heartbeat_interval {
            return Err(Error::Config("suspect timeout must be longer than the heartbeat interval".into()));
        }
        if self.dead_timeout <= self.suspect_timeout {
            return Err(Error::Config("dead timeout must be longer than the suspect timeout".into()));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::Config("handshake timeout is zero".into()));
        }
        if self.send_buffer < super::frames::MAX_FRAME {
            return Err(Error::Config("send buffer is smaller than one frame (16 MiB)".into()));
        }
        if self.receive_buffer < super::frames::MAX_FRAME {
            return Err(Error::Config("receive buffer is smaller than one frame (16 MiB)".into()));
        }
        for addr in &self.bootstrap {
            if peer_id_of(addr) == Some(self.peer_id()) {
                return Err(Error::Config(format!("bootstrap address {addr} is this node itself")));
            }
        }
        Ok(())
    }
}

/// The peer id at the end of a multiaddr (`…/p2p/<peer id>`), if any.
pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Generates a fresh ed25519 node keypair.
pub fn generate_keypair() -> Keypair {
    Keypair::generate_ed25519()
}

/// Loads the node keypair from `dir/node.key`, generating and saving one
/// first if the file does not exist, so the peer id is stable across
/// restarts with the same data directory.
pub fn load_or_generate_keypair(dir: &Path) -> Result<Keypair, Error> {
    let path = dir.join(NODE_KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| Error::Key(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = generate_keypair();
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let bytes = keypair.to_protobuf_encoding().map_err(|e| Error::Key(e.to_string()))?;
            // Only if no other process (`kadmq id` beside a starting node)
            // created one meanwhile: then that one is the node's key.
            if write_secret_new(&path, &bytes)? {
                Ok(keypair)
            } else {
                load_or_generate_keypair(dir)
            }
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Saves the node keypair to `dir/node.key` (protobuf encoding, mode 0600 on
/// Unix), creating `dir` if needed.
pub fn save_keypair(dir: &Path, keypair: &Keypair) -> Result<PathBuf, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(NODE_KEY_FILE);
    let bytes = keypair.to_protobuf_encoding().map_err(|e| Error::Key(e.to_string()))?;
    write_secret(&path, &bytes)?;
    Ok(path)
}

/// Reads, bumps and persists the incarnation counter in `dir/incarnation`
/// and returns the new value (1 on first start). Each start of a node with
/// this data directory thus announces a higher incarnation than the last.
pub fn next_incarnation(dir: &Path) -> Result<u64, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(INCARNATION_FILE);
    let last = match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(&path, e)),
    };
    let next = last + 1;
    fs::write(&path, format!("{next}\n")).map_err(|e| Error::io(&path, e))?;
    Ok(next)
}

/// Generates a fresh random 32-byte cluster key.
pub fn generate_cluster_key() -> PreSharedKey {
    PreSharedKey::new(rand::random::<[u8; 32]>())
}

/// Parses a cluster key in the standard
/// `/key/swarm/psk/1.0.0/\n/base16/\n<64 hex digits>` format.
pub fn parse_cluster_key(text: &str) -> Result<PreSharedKey, Error> {
    text.parse::<PreSharedKey>().map_err(|e| Error::Key(format!("cluster key: {e:?}")))
}

/// Reads a cluster key file.
pub fn read_cluster_key(path: &Path) -> Result<PreSharedKey, Error> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_cluster_key(&text).map_err(|e| Error::Key(format!("{}: {e}", path.display())))
}

/// Writes a cluster key file (mode 0600 on Unix).
pub fn write_cluster_key(path: &Path, key: &PreSharedKey) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_secret(path, key.to_key_file().as_bytes())
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    // Write to a temporary file and rename, so a crash never leaves half a
    // key behind (which would change the peer id on the next start).
    let tmp = write_temporary(path, bytes)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// As [`write_secret`], but only if `path` does not exist yet: false (and
/// nothing written) if it does.
fn write_secret_new(path: &Path, bytes: &[u8]) -> Result<bool, Error> {
    let tmp = write_temporary(path, bytes)?;
    // A hard link is created whole or not at all, and never replaces.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes `bytes` (mode 0600) to a file beside `path` that no other
/// process writes, synced; returns its path.
fn write_temporary(path: &Path, bytes: &[u8]) -> Result<PathBuf, Error> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nth = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{nth}", std::process::id()));
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        std::io::Write::write_all(&mut file, bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kadmq-dht-config-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keypair_round_trips_through_the_data_dir() {
        let dir = temp_dir("key");
        let first = load_or_generate_keypair(&dir).unwrap();
        let second = load_or_generate_keypair(&dir).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn racing_first_starts_agree_on_one_key() {
        // `kadmq id` beside a node starting on a fresh directory: whoever
        // creates the key first, both use that one.
        for _ in 0..10 {
            let dir = temp_dir("race");
            let ids: Vec<PeerId> = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..6)
                    .map(|_| scope.spawn(|| load_or_generate_keypair(&dir).unwrap().public().to_peer_id()))
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
            assert_eq!(load_or_generate_keypair(&dir).unwrap().public().to_peer_id(), ids[0]);
            let leftovers = fs::read_dir(&dir).unwrap().count();
            assert_eq!(leftovers, 1, "only the key file stays");
            fs::remove_dir_all(&dir).ok();
        }
    }

    #[test]
    fn cluster_key_file_has_the_standard_format() {
        let dir = temp_dir("psk");
        let key = generate_cluster_key();
        let path = dir.join("swarm.key");
        write_cluster_key(&path, &key).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "/key/swarm/psk/1.0.0/");
        assert_eq!(lines[1], "/base16/");
        assert_eq!(lines[2].len(), 64);
        let back = read_cluster_key(&path).unwrap();
        assert_eq!(back.fingerprint().to_string(), key.fingerprint().to_string());
        assert!(parse_cluster_key("nonsense").is_err());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn incarnation_grows_per_start() {
        let dir = temp_dir("inc");
        assert_eq!(next_incarnation(&dir).unwrap(), 1);
        assert_eq!(next_incarnation(&dir).unwrap(), 2);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn validate_rejects_bad_timings() {
        let mut config = DriverConfig::new("n1", generate_keypair(), generate_cluster_key());
        assert!(config.validate().is_ok());
        config.dead_timeout = config.suspect_timeout;
        assert!(config.validate().is_err());
    }
}
