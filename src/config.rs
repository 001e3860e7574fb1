//! Configuration: defaults, the TOML file, environment and flags.
//!
//! Precedence is flags > environment > file > defaults. clap handles the
//! first two (every flag has a `KADMQ_*` variable); [`Config::load`] reads
//! the file over the defaults, and the CLI layer applies what clap found on
//! top. [`Config::validate`] runs before anything starts.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The commented default configuration, printed by `kadmq config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../deploy/kadmq.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory of the embedded store (retained messages, sessions).
    pub data_dir: PathBuf,
    /// Log filter, `RUST_LOG` syntax (`info`, `kadmq=debug,warn`).
    pub log: String,
    /// Worker threads of the async runtime; 0: one per CPU core.
    pub threads: usize,
    pub listeners: Listeners,
    pub mqtt: MqttConfig,
    pub cluster: ClusterSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    /// MQTT over TCP.
    pub mqtt: Vec<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`).
    pub ws: Vec<SocketAddr>,
    /// HTTP endpoint: `/metrics` (Prometheus) and `/api/v1/...`; off if unset.
    pub http: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet accepted from a client, in bytes (advertised in CONNACK).
    pub max_packet_size: u32,
    /// Client connections open at once; further ones are refused (CONNACK
    /// 0x97 Quota exceeded / 3.1.1 return code 3).
    pub max_connections: usize,
    /// QoS 1/2 messages a client may have unacknowledged towards us (MQTT 5
    /// Receive Maximum advertised in CONNACK).
    pub receive_maximum: u16,
    /// Messages waiting per session (online or offline) before new ones are
    /// dropped.
    pub max_queued_messages: usize,
    /// Bytes (topics and payloads) waiting per session before new messages
    /// are dropped.
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages sent to a client and not yet acknowledged; an MQTT 5
    /// client's smaller Receive Maximum wins.
    pub max_inflight: u16,
    /// Whether offline persistent sessions also queue QoS 0 messages.
    pub queue_qos0_offline: bool,
    /// Levels of a topic name or filter (`a/b/c` has 3).
    pub max_topic_levels: usize,
    /// Bytes of a topic name or filter.
    pub max_topic_length: usize,
    /// Subscriptions one client (session) may hold.
    pub max_subscriptions_per_client: usize,
    /// PUBLISH packets per second one client may send (0 = no limit); a
    /// faster client is read more slowly, not disconnected.
    pub max_publish_rate: u32,
    /// Topic aliases a client may use towards us.
    pub topic_alias_maximum: u16,
    /// Whether the broker uses topic aliases towards MQTT 5 clients that
    /// accept them (at most the client's Topic Alias Maximum, and at most
    /// `topic_alias_maximum`), least recently used rebound first.
    pub outgoing_topic_aliases: bool,
    /// Largest keep-alive granted, in seconds (0 = whatever the client asks).
    pub max_keep_alive: u16,
    /// Largest session expiry interval granted, in seconds.
    pub max_session_expiry: u32,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Seconds between `$SYS` updates (0 = off).
    pub sys_interval_secs: u64,
}

/// Cluster membership: on when `p2p_listen` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Human-readable node name (default: the start of the peer id).
    pub node_name: Option<String>,
    /// libp2p listen multiaddrs, e.g. `/ip4/0.0.0.0/tcp/7000`; empty = single node.
    pub p2p_listen: Vec<String>,
    /// Multiaddrs of nodes to join through (`/ip4/../tcp/7000/p2p/<id>`, `/dns4/../tcp/7000`).
    pub bootstrap: Vec<String>,
    /// With a bootstrap list: how long the node refuses MQTT clients while
    /// it joins the fleet, at most, in milliseconds (0 = it does not wait).
    /// See `crate::broker::admission`.
    pub join_timeout_ms: u64,
    /// Pre-shared cluster key file (`kadmq keygen`); required in a cluster.
    pub cluster_key_file: Option<PathBuf>,
    /// Owners per route shard (R); every node of a fleet must agree.
    pub replication: usize,
    /// Literal topic levels that name a shard; every node of a fleet must agree.
    pub shard_depth: usize,
    /// Entries at which a route shard splits by the next topic level (0 =
    /// never), so a hot prefix (`devices/eu/…`) spreads over the fleet.
    pub split_entries: usize,
    /// Seconds without a heartbeat before a node is declared dead (suspect at half).
    pub dead_timeout_secs: u64,
    /// MiB held for all other nodes together (frames queued or being
    /// written); past 7/8 of it QoS 0 forwards are dropped.
    pub send_buffer_mib: u64,
    /// How long a SUBACK waits for every owner of the filters' shards to
    /// acknowledge the new routes (0 = do not wait). Past it the SUBACK
    /// goes out and the routes keep being retried.
    pub subscribe_ack_timeout_ms: u64,
    /// How long a cleared retained message's tombstone is kept, so that a
    /// node away for less cannot bring the old value back.
    pub retained_tombstone_secs: u64,
    /// Period of the retained owners' digest exchange (0 = off).
    pub retained_check_secs: u64,
    /// Period of the route table's anti-entropy round (0 = off): replicas
    /// compare digests, subscriber nodes check their entries at the
    /// owners, publishers the versions of the shards they cache. It
    /// repairs the losses no sender saw; losses a sender saw are repaired
    /// within a second or two (the resync).
    pub route_check_secs: u64,
    /// MiB of QoS 1/2 forwards the outbox holds (on disk, until their
    /// destinations acknowledge them); past it new QoS 1/2 publishes are
    /// refused (MQTT 5 reason 0x97).
    pub outbox_max_mib: u64,
    /// How long a client's PUBACK/PUBREC for a QoS 1/2 message forwarded to
    /// other nodes waits for their acknowledgements before the forward is
    /// written to disk instead (0 = write at once). A forward acknowledged
    /// within it is never written.
    pub forward_ack_window_ms: u64,
    /// How long a QoS 2 message from another node is remembered after its
    /// delivery (persisted), so that its sender resending it after a
    /// restart of either node does not deliver it twice.
    pub qos2_dedupe_secs: u64,
}

impl ClusterSettings {
    pub fn enabled(&self) -> bool {
        !self.p2p_listen.is_empty()
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            node_name: None,
            p2p_listen: Vec::new(),
            bootstrap: Vec::new(),
            join_timeout_ms: 30_000,
            cluster_key_file: None,
            replication: 3,
            shard_depth: kadmq_dht::shard::DEFAULT_SHARD_DEPTH,
            split_entries: kadmq_dht::core::node::DEFAULT_SPLIT_ENTRIES,
            dead_timeout_secs: 8,
            send_buffer_mib: 256,
            subscribe_ack_timeout_ms: 2_000,
            retained_tombstone_secs: 7 * 24 * 3600,
            retained_check_secs: 30,
            route_check_secs: 30,
            outbox_max_mib: 1024,
            forward_ack_window_ms: 2,
            qos2_dedupe_secs: 24 * 3600,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("kadmq-data"),
            log: "info,fjall=warn,lsm_tree=warn".into(),
            threads: 0,
            listeners: Listeners::default(),
            mqtt: MqttConfig::default(),
            cluster: ClusterSettings::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            ws: vec![SocketAddr::from(([127, 0, 0, 1], 8083))],
            http: None,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            max_connections: 100_000,
            receive_maximum: 1024,
            max_queued_messages: 10_000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_inflight: 1024,
            queue_qos0_offline: false,
            max_topic_levels: kadmq_dht::topic::DEFAULT_MAX_LEVELS,
            max_topic_length: kadmq_dht::topic::MAX_TOPIC_LEN,
            max_subscriptions_per_client: 10_000,
            max_publish_rate: 0,
            topic_alias_maximum: 64,
            outgoing_topic_aliases: true,
            max_keep_alive: 0,
            max_session_expiry: u32::MAX,
            connect_timeout_secs: 10,
            sys_interval_secs: 5,
        }
    }
}

impl Config {
    /// The defaults, overlaid with `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else { return Ok(Config::default()) };
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(source) })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.listeners.mqtt.is_empty() && self.listeners.ws.is_empty() {
            return invalid("no listener: give at least one of listeners.mqtt / listeners.ws");
        }
        if self.threads > 1024 {
            return invalid("threads (--threads) must be at most 1024 (0: one per CPU core)");
        }
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size as usize > crate::protocol::MAX_PACKET_SIZE {
            return invalid("mqtt.max_packet_size must be between 64 and 268435460 bytes");
        }
        if m.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum must be at least 1");
        }
        if m.max_connections == 0 {
            return invalid("mqtt.max_connections must be at least 1");
        }
        if m.max_queued_messages == 0 {
            return invalid("mqtt.max_queued_messages must be at least 1");
        }
        if m.max_queued_bytes == 0 {
            return invalid("mqtt.max_queued_bytes must be at least 1");
        }
        if m.max_inflight == 0 {
            return invalid("mqtt.max_inflight must be at least 1");
        }
        if m.max_topic_levels == 0 {
            return invalid("mqtt.max_topic_levels must be at least 1");
        }
        if m.max_topic_length == 0 || m.max_topic_length > kadmq_dht::topic::MAX_TOPIC_LEN {
            return invalid("mqtt.max_topic_length must be between 1 and 65535 bytes");
        }
        if m.max_subscriptions_per_client == 0 {
            return invalid("mqtt.max_subscriptions_per_client must be at least 1");
        }
        if m.connect_timeout_secs == 0 {
            return invalid("mqtt.connect_timeout_secs must be at least 1");
        }
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        for (key, addrs) in [("cluster.p2p_listen", &c.p2p_listen), ("cluster.bootstrap", &c.bootstrap)] {
            for addr in addrs {
                if let Err(err) = addr.parse::<kadmq_dht::driver::Multiaddr>() {
                    return invalid(format!("{key}: {addr:?} is not a multiaddr ({err})"));
                }
            }
        }
        if !c.enabled() {
            if !c.bootstrap.is_empty() {
                return invalid("cluster.bootstrap needs cluster.p2p_listen (--p2p-listen) too".into());
            }
            return Ok(());
        }
        let Some(key_file) = &c.cluster_key_file else {
            return invalid(
                "a cluster needs a key: give cluster.cluster_key_file (--cluster-key-file); create one with `kadmq keygen`"
                    .into(),
            );
        };
        if c.replication == 0 {
            return invalid("cluster.replication (--replication) must be at least 1".into());
        }
        if c.shard_depth == 0 {
            return invalid("cluster.shard_depth (--shard-depth) must be at least 1".into());
        }
        if c.dead_timeout_secs < 2 {
            return invalid("cluster.dead_timeout_secs (--dead-timeout) must be at least 2".into());
        }
        if c.send_buffer_mib < 32 {
            return invalid("cluster.send_buffer_mib (--cluster-send-buffer) must be at least 32".into());
        }
        // Read the key now, so a wrong path is one clear line before anything starts.
        let text = match std::fs::read_to_string(key_file) {
            Ok(text) => text,
            Err(err) => {
                return invalid(format!(
                    "cannot read the cluster key file {} (cluster.cluster_key_file, --cluster-key-file): {err}",
                    key_file.display()
                ))
            }
        };
        if kadmq_dht::driver::parse_cluster_key(&text).is_err() {
            return invalid(format!(
                "{} is not a cluster key file; create one with `kadmq keygen` and give every node the same",
                key_file.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_file_is_the_defaults() {
        assert_eq!(Config::from_toml(DEFAULT_CONFIG_TOML).unwrap(), Config::default());
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let config = Config::from_toml("[mqtt]\nmax_queued_messages = 5\n").unwrap();
        assert_eq!(config.mqtt.max_queued_messages, 5);
        assert_eq!(config.mqtt.receive_maximum, MqttConfig::default().receive_maximum);
        assert!(Config::from_toml("[mqtt]\nmax_queue = 5\n").is_err());
    }

    #[test]
    fn validation_catches_nonsense() {
        let mut config = Config::default();
        config.mqtt.receive_maximum = 0;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.listeners.mqtt.clear();
        config.listeners.ws.clear();
        assert!(config.validate().is_err());
        assert!(Config::default().validate().is_ok());
    }

    /// A cluster configuration that passes, with its key file in `dir`.
    fn cluster_config(dir: &Path) -> Config {
        let key = dir.join("cluster.key");
        kadmq_dht::driver::write_cluster_key(&key, &kadmq_dht::driver::generate_cluster_key()).unwrap();
        let mut config = Config::default();
        config.cluster.p2p_listen = vec!["/ip4/127.0.0.1/tcp/7000".into()];
        config.cluster.bootstrap = vec!["/dns4/kadmq-0/tcp/7000".into()];
        config.cluster.cluster_key_file = Some(key);
        config
    }

    fn refusal(config: &Config) -> String {
        match config.validate() {
            Err(ConfigError::Invalid(msg)) => msg,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn cluster_file_keys_are_read() {
        let config = Config::from_toml(
            "[cluster]\nnode_name = \"n1\"\np2p_listen = [\"/ip4/0.0.0.0/tcp/7000\"]\n\
             bootstrap = [\"/dns4/kadmq-1/tcp/7000\"]\ncluster_key_file = \"k\"\nreplication = 2\n\
             shard_depth = 3\ndead_timeout_secs = 12\njoin_timeout_ms = 4500\nroute_check_secs = 5\n",
        )
        .unwrap();
        let c = &config.cluster;
        assert!(c.enabled());
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.bootstrap, vec!["/dns4/kadmq-1/tcp/7000".to_string()]);
        assert_eq!(c.cluster_key_file.as_deref(), Some(Path::new("k")));
        assert_eq!((c.replication, c.shard_depth, c.dead_timeout_secs), (2, 3, 12));
        assert_eq!(c.join_timeout_ms, 4500);
        assert_eq!((c.route_check_secs, ClusterSettings::default().route_check_secs), (5, 30));
        assert_eq!(ClusterSettings::default().join_timeout_ms, 30_000);
        assert!(Config::from_toml("[cluster]\nreplicas = 2\n").is_err(), "unknown keys refused");
    }

    #[test]
    fn a_valid_cluster_configuration_passes() {
        let dir = tempfile::tempdir().unwrap();
        let config = cluster_config(dir.path());
        config.validate().unwrap();
        // Bootstrap addresses without /p2p/<peer id> are accepted.
        let mut config = cluster_config(dir.path());
        config.cluster.bootstrap = vec![
            "/ip4/10.0.0.5/tcp/7000".into(),
            "/ip4/10.0.0.6/tcp/7000/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA".into(),
        ];
        config.validate().unwrap();
    }

    #[test]
    fn a_cluster_without_a_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path());
        config.cluster.cluster_key_file = None;
        let msg = refusal(&config);
        assert!(
            msg.contains("needs a key") && msg.contains("--cluster-key-file") && msg.contains("kadmq keygen"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_or_foreign_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path());
        config.cluster.cluster_key_file = Some(dir.path().join("nonexistent.key"));
        let msg = refusal(&config);
        assert!(msg.starts_with("cannot read the cluster key file ") && msg.contains("nonexistent.key"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let foreign = dir.path().join("foreign.key");
        std::fs::write(&foreign, "not a key\n").unwrap();
        config.cluster.cluster_key_file = Some(foreign);
        let msg = refusal(&config);
        assert!(msg.contains("is not a cluster key file") && msg.contains("kadmq keygen"), "{msg}");
    }

    #[test]
    fn a_bad_multiaddr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path());
        config.cluster.p2p_listen = vec!["127.0.0.1:7000".into()];
        let msg = refusal(&config);
        assert!(msg.starts_with("cluster.p2p_listen: \"127.0.0.1:7000\" is not a multiaddr"), "{msg}");

        let mut config = cluster_config(dir.path());
        config.cluster.bootstrap = vec!["/ip4/10.0.0.5/tcp".into()];
        let msg = refusal(&config);
        assert!(msg.starts_with("cluster.bootstrap: \"/ip4/10.0.0.5/tcp\" is not a multiaddr"), "{msg}");
    }

    #[test]
    fn bootstrap_without_p2p_listen_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path());
        config.cluster.p2p_listen.clear();
        let msg = refusal(&config);
        assert!(msg.contains("cluster.bootstrap needs cluster.p2p_listen (--p2p-listen)"), "{msg}");
    }

    #[test]
    fn nonsense_cluster_numbers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = cluster_config(dir.path());
        config.cluster.replication = 0;
        assert_eq!(refusal(&config), "cluster.replication (--replication) must be at least 1");
        let mut config = cluster_config(dir.path());
        config.cluster.shard_depth = 0;
        assert_eq!(refusal(&config), "cluster.shard_depth (--shard-depth) must be at least 1");
        let mut config = cluster_config(dir.path());
        config.cluster.dead_timeout_secs = 1;
        assert_eq!(refusal(&config), "cluster.dead_timeout_secs (--dead-timeout) must be at least 2");
        let mut config = cluster_config(dir.path());
        config.cluster.send_buffer_mib = 31;
        assert_eq!(refusal(&config), "cluster.send_buffer_mib (--cluster-send-buffer) must be at least 32");
    }
}
