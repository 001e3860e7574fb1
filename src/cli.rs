//! The command line: `kadmq start`, `config`, `keygen`, `id` and
//! `cluster status`. Every option of `start` is also a `KADMQ_*`
//! environment variable and a TOML key; flags win over the environment,
//! which wins over the file.
//!
//! - [`cluster_status`]: what `kadmq cluster status` asks a node and prints.

pub mod cluster_status;

use crate::config::{Config, ConfigError};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kadmq",
    version,
    about = "An MQTT 3.1.1 / 5.0 broker: one node, or a fleet with a sharded route table"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a broker. With no options: MQTT on 127.0.0.1:1883, WebSocket on
    /// 127.0.0.1:8083/mqtt, data in ./kadmq-data.
    Start(Box<StartArgs>),
    /// Print the default configuration file, with every key commented.
    Config,
    /// Write a new random cluster key (pre-shared key) file: every node of a
    /// fleet needs the same one.
    Keygen {
        /// Where to write the key
        #[arg(long, value_name = "FILE", default_value = "cluster.key")]
        out: PathBuf,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
    },
    /// Print this node's peer id (the node key is created in the data
    /// directory on first use and kept), and with --p2p-listen the full
    /// multiaddr other nodes bootstrap from.
    Id {
        /// Data directory of the node
        #[arg(long, env = "KADMQ_DATA_DIR", value_name = "DIR", default_value = "kadmq-data")]
        data_dir: PathBuf,
        /// The node's cluster listen address, e.g. /ip4/10.0.0.5/tcp/7000
        #[arg(long, env = "KADMQ_P2P_LISTEN", value_name = "MULTIADDR")]
        p2p_listen: Option<kadmq_dht::driver::Multiaddr>,
    },
    /// Ask a running node about its fleet.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print the members a node sees (its /api/v1/cluster) as a table; `*`
    /// marks the node that answered.
    Status {
        /// The node's HTTP endpoint (its --http address), host:port
        #[arg(long, env = "KADMQ_HTTP", value_name = "ADDR", default_value = "127.0.0.1:8080")]
        http: String,
    },
}

/// Where the node key lives inside the data directory.
pub fn node_key_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("cluster")
}

#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// Configuration file (TOML); see `kadmq config` for every key.
    #[arg(long, short = 'c', env = "KADMQ_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// MQTT over TCP listen address; repeat for several [toml: listeners.mqtt]
    #[arg(long = "mqtt", env = "KADMQ_MQTT", value_name = "ADDR", value_delimiter = ',')]
    pub mqtt: Vec<SocketAddr>,
    /// MQTT over WebSocket listen address (path /mqtt) [toml: listeners.ws]
    #[arg(long = "ws", env = "KADMQ_WS", value_name = "ADDR", value_delimiter = ',')]
    pub ws: Vec<SocketAddr>,
    /// HTTP endpoint for /metrics and /api/v1 (off unless given) [toml: listeners.http]
    #[arg(long, env = "KADMQ_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Turn the WebSocket listener off
    #[arg(long, env = "KADMQ_NO_WS")]
    pub no_ws: bool,
    /// Data directory for retained messages and sessions [toml: data_dir]
    #[arg(long, env = "KADMQ_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter, e.g. info or kadmq=debug [toml: log; also RUST_LOG]
    #[arg(long, env = "KADMQ_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Worker threads of the async runtime, 0 = one per CPU core [toml: threads]
    #[arg(long, env = "KADMQ_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Largest packet accepted, in bytes [toml: mqtt.max_packet_size]
    #[arg(long, env = "KADMQ_MAX_PACKET_SIZE", value_name = "BYTES")]
    pub max_packet_size: Option<u32>,
    /// Client connections open at once; more are refused [toml: mqtt.max_connections]
    #[arg(long, env = "KADMQ_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Unacknowledged QoS 1/2 messages a client may send [toml: mqtt.receive_maximum]
    #[arg(long, env = "KADMQ_RECEIVE_MAXIMUM", value_name = "N")]
    pub receive_maximum: Option<u16>,
    /// Messages waiting per session before new ones drop [toml: mqtt.max_queued_messages]
    #[arg(long, env = "KADMQ_MAX_QUEUED_MESSAGES", value_name = "N")]
    pub max_queued_messages: Option<usize>,
    /// Bytes waiting per session before new messages drop [toml: mqtt.max_queued_bytes]
    #[arg(long, env = "KADMQ_MAX_QUEUED_BYTES", value_name = "BYTES")]
    pub max_queued_bytes: Option<usize>,
    /// Unacknowledged QoS 1/2 messages sent to a client [toml: mqtt.max_inflight]
    #[arg(long, env = "KADMQ_MAX_INFLIGHT", value_name = "N")]
    pub max_inflight: Option<u16>,
    /// Levels of a topic name or filter [toml: mqtt.max_topic_levels]
    #[arg(long, env = "KADMQ_MAX_TOPIC_LEVELS", value_name = "N")]
    pub max_topic_levels: Option<usize>,
    /// Bytes of a topic name or filter, at most 65535 [toml: mqtt.max_topic_length]
    #[arg(long, env = "KADMQ_MAX_TOPIC_LENGTH", value_name = "BYTES")]
    pub max_topic_length: Option<usize>,
    /// Subscriptions one client may hold [toml: mqtt.max_subscriptions_per_client]
    #[arg(long, env = "KADMQ_MAX_SUBSCRIPTIONS_PER_CLIENT", value_name = "N")]
    pub max_subscriptions_per_client: Option<usize>,
    /// PUBLISH packets per second per client, 0 = no limit; faster clients are slowed [toml: mqtt.max_publish_rate]
    #[arg(long, env = "KADMQ_MAX_PUBLISH_RATE", value_name = "N")]
    pub max_publish_rate: Option<u32>,
    /// Offline persistent sessions also queue QoS 0 [toml: mqtt.queue_qos0_offline]
    #[arg(long, env = "KADMQ_QUEUE_QOS0_OFFLINE", value_name = "BOOL")]
    pub queue_qos0_offline: Option<bool>,
    /// Topic aliases a client may use [toml: mqtt.topic_alias_maximum]
    #[arg(long, env = "KADMQ_TOPIC_ALIAS_MAXIMUM", value_name = "N")]
    pub topic_alias_maximum: Option<u16>,
    /// Send topic aliases to MQTT 5 clients that accept them [toml: mqtt.outgoing_topic_aliases]
    #[arg(long, env = "KADMQ_OUTGOING_TOPIC_ALIASES", value_name = "BOOL")]
    pub outgoing_topic_aliases: Option<bool>,
    /// Largest keep-alive granted in seconds, 0 = client decides [toml: mqtt.max_keep_alive]
    #[arg(long, env = "KADMQ_MAX_KEEP_ALIVE", value_name = "SECS")]
    pub max_keep_alive: Option<u16>,
    /// Largest session expiry granted in seconds [toml: mqtt.max_session_expiry]
    #[arg(long, env = "KADMQ_MAX_SESSION_EXPIRY", value_name = "SECS")]
    pub max_session_expiry: Option<u32>,
    /// Seconds a client has to send CONNECT [toml: mqtt.connect_timeout_secs]
    #[arg(long, env = "KADMQ_CONNECT_TIMEOUT", value_name = "SECS")]
    pub connect_timeout: Option<u64>,
    /// Seconds between $SYS updates, 0 = off [toml: mqtt.sys_interval_secs]
    #[arg(long, env = "KADMQ_SYS_INTERVAL", value_name = "SECS")]
    pub sys_interval: Option<u64>,
    /// Node name in the cluster [toml: cluster.node_name]
    #[arg(long, env = "KADMQ_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Cluster listen multiaddr, e.g. /ip4/0.0.0.0/tcp/7000; turns cluster mode on [toml: cluster.p2p_listen]
    #[arg(long, env = "KADMQ_P2P_LISTEN", value_name = "MULTIADDR", value_delimiter = ',')]
    pub p2p_listen: Vec<String>,
    /// Node to join through, /ip4/../tcp/7000/p2p/PEER_ID or /dns4/../tcp/7000; repeat for several [toml: cluster.bootstrap]
    #[arg(long, env = "KADMQ_BOOTSTRAP", value_name = "MULTIADDR", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// With --bootstrap: milliseconds the node refuses MQTT clients while it joins, at most; 0 = no wait [toml: cluster.join_timeout_ms]
    #[arg(long, env = "KADMQ_JOIN_TIMEOUT_MS", value_name = "MS")]
    pub join_timeout_ms: Option<u64>,
    /// Pre-shared cluster key file, from `kadmq keygen` [toml: cluster.cluster_key_file]
    #[arg(long, env = "KADMQ_CLUSTER_KEY_FILE", value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Owners per route shard, the same on every node [toml: cluster.replication]
    #[arg(long, env = "KADMQ_REPLICATION", value_name = "N")]
    pub replication: Option<usize>,
    /// Topic levels naming a route shard, the same on every node [toml: cluster.shard_depth]
    #[arg(long, env = "KADMQ_SHARD_DEPTH", value_name = "N")]
    pub shard_depth: Option<usize>,
    /// Entries at which a route shard splits by the next topic level (0 = never) [toml: cluster.split_entries]
    #[arg(long, env = "KADMQ_SPLIT_ENTRIES", value_name = "N")]
    pub split_entries: Option<usize>,
    /// Seconds of silence before a node is declared dead [toml: cluster.dead_timeout_secs]
    #[arg(long, env = "KADMQ_DEAD_TIMEOUT", value_name = "SECS")]
    pub dead_timeout: Option<u64>,
    /// MiB held for all other nodes together; past 7/8 QoS 0 forwards are dropped [toml: cluster.send_buffer_mib]
    #[arg(long, env = "KADMQ_CLUSTER_SEND_BUFFER", value_name = "MIB")]
    pub cluster_send_buffer: Option<u64>,
    /// Milliseconds a SUBACK waits for the route owners' acknowledgements (0 = no wait) [toml: cluster.subscribe_ack_timeout_ms]
    #[arg(long, env = "KADMQ_SUBSCRIBE_ACK_TIMEOUT_MS", value_name = "MS")]
    pub subscribe_ack_timeout_ms: Option<u64>,
    /// Seconds a cleared retained message's tombstone is kept (longer than a node may be away) [toml: cluster.retained_tombstone_secs]
    #[arg(long, env = "KADMQ_RETAINED_TOMBSTONE_SECS", value_name = "SECS")]
    pub retained_tombstone_secs: Option<u64>,
    /// Seconds between the retained owners' digest exchanges, which repair lost writes (0 = off) [toml: cluster.retained_check_secs]
    #[arg(long, env = "KADMQ_RETAINED_CHECK_SECS", value_name = "SECS")]
    pub retained_check_secs: Option<u64>,
    /// Seconds between route anti-entropy rounds, which repair route frames lost unseen (0 = off) [toml: cluster.route_check_secs]
    #[arg(long, env = "KADMQ_ROUTE_CHECK_SECS", value_name = "SECS")]
    pub route_check_secs: Option<u64>,
    /// MiB of unacknowledged QoS 1/2 forwards held; past it QoS 1/2 publishes are refused (0x97) [toml: cluster.outbox_max_mib]
    #[arg(long, env = "KADMQ_OUTBOX_MAX_MIB", value_name = "MIB")]
    pub outbox_max_mib: Option<u64>,
    /// Milliseconds a QoS 1/2 PUBACK waits for the other nodes' acknowledgements of its forwards before they are written to disk (0 = write at once) [toml: cluster.forward_ack_window_ms]
    #[arg(long, env = "KADMQ_FORWARD_ACK_WINDOW_MS", value_name = "MS")]
    pub forward_ack_window_ms: Option<u64>,
    /// Seconds a delivered QoS 2 message of another node is remembered (no second delivery after a restart) [toml: cluster.qos2_dedupe_secs]
    #[arg(long, env = "KADMQ_QOS2_DEDUPE_SECS", value_name = "SECS")]
    pub qos2_dedupe_secs: Option<u64>,
}

impl StartArgs {
    /// The file (or defaults) with flags and environment applied on top.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        if !self.mqtt.is_empty() {
            config.listeners.mqtt = self.mqtt.clone();
        }
        if !self.ws.is_empty() {
            config.listeners.ws = self.ws.clone();
        }
        if self.http.is_some() {
            config.listeners.http = self.http;
        }
        if self.no_ws {
            config.listeners.ws.clear();
        }
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        set(&mut config.data_dir, &self.data_dir);
        set(&mut config.log, &self.log);
        set(&mut config.threads, &self.threads);
        let m = &mut config.mqtt;
        set(&mut m.max_packet_size, &self.max_packet_size);
        set(&mut m.max_connections, &self.max_connections);
        set(&mut m.receive_maximum, &self.receive_maximum);
        set(&mut m.max_queued_messages, &self.max_queued_messages);
        set(&mut m.max_queued_bytes, &self.max_queued_bytes);
        set(&mut m.max_inflight, &self.max_inflight);
        set(&mut m.max_topic_levels, &self.max_topic_levels);
        set(&mut m.max_topic_length, &self.max_topic_length);
        set(&mut m.max_subscriptions_per_client, &self.max_subscriptions_per_client);
        set(&mut m.max_publish_rate, &self.max_publish_rate);
        set(&mut m.queue_qos0_offline, &self.queue_qos0_offline);
        set(&mut m.topic_alias_maximum, &self.topic_alias_maximum);
        set(&mut m.outgoing_topic_aliases, &self.outgoing_topic_aliases);
        set(&mut m.max_keep_alive, &self.max_keep_alive);
        set(&mut m.max_session_expiry, &self.max_session_expiry);
        set(&mut m.connect_timeout_secs, &self.connect_timeout);
        set(&mut m.sys_interval_secs, &self.sys_interval);
        let c = &mut config.cluster;
        if self.node_name.is_some() {
            c.node_name = self.node_name.clone();
        }
        if !self.p2p_listen.is_empty() {
            c.p2p_listen = self.p2p_listen.clone();
        }
        if !self.bootstrap.is_empty() {
            c.bootstrap = self.bootstrap.clone();
        }
        set(&mut c.join_timeout_ms, &self.join_timeout_ms);
        if self.cluster_key_file.is_some() {
            c.cluster_key_file = self.cluster_key_file.clone();
        }
        set(&mut c.replication, &self.replication);
        set(&mut c.shard_depth, &self.shard_depth);
        set(&mut c.split_entries, &self.split_entries);
        set(&mut c.dead_timeout_secs, &self.dead_timeout);
        set(&mut c.send_buffer_mib, &self.cluster_send_buffer);
        set(&mut c.subscribe_ack_timeout_ms, &self.subscribe_ack_timeout_ms);
        set(&mut c.retained_tombstone_secs, &self.retained_tombstone_secs);
        set(&mut c.retained_check_secs, &self.retained_check_secs);
        set(&mut c.route_check_secs, &self.route_check_secs);
        set(&mut c.outbox_max_mib, &self.outbox_max_mib);
        set(&mut c.forward_ack_window_ms, &self.forward_ack_window_ms);
        set(&mut c.qos2_dedupe_secs, &self.qos2_dedupe_secs);
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kadmq.toml");
        std::fs::write(&file, "[mqtt]\nreceive_maximum = 7\nmax_queued_messages = 9\n").unwrap();
        let cli = Cli::try_parse_from([
            "kadmq",
            "start",
            "--config",
            file.to_str().unwrap(),
            "--receive-maximum",
            "11",
            "--mqtt",
            "127.0.0.1:0",
        ])
        .unwrap();
        let Command::Start(args) = cli.command else { panic!("start expected") };
        let config = args.resolve().unwrap();
        assert_eq!(config.mqtt.receive_maximum, 11);
        assert_eq!(config.mqtt.max_queued_messages, 9);
        assert_eq!(config.listeners.mqtt, vec!["127.0.0.1:0".parse().unwrap()]);
        assert_eq!(config.mqtt.sys_interval_secs, Config::default().mqtt.sys_interval_secs);
    }

    #[test]
    fn outgoing_topic_aliases_flag_file_and_default() {
        assert!(Config::default().mqtt.outgoing_topic_aliases);
        let config = start_args(&["--outgoing-topic-aliases", "false"]).resolve().unwrap();
        assert!(!config.mqtt.outgoing_topic_aliases);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kadmq.toml");
        std::fs::write(&file, "[mqtt]\noutgoing_topic_aliases = false\n").unwrap();
        let config = start_args(&["--config", file.to_str().unwrap()]).resolve().unwrap();
        assert!(!config.mqtt.outgoing_topic_aliases);
        use clap::CommandFactory;
        let cli = Cli::command();
        let start = cli.find_subcommand("start").unwrap();
        let arg = start.get_arguments().find(|a| a.get_long() == Some("outgoing-topic-aliases")).unwrap();
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("KADMQ_OUTGOING_TOPIC_ALIASES"));
    }

    #[test]
    fn threads_from_flag_or_file_and_bounded() {
        assert_eq!(Config::default().threads, 0, "one per core");
        assert_eq!(start_args(&["--threads", "1"]).resolve().unwrap().threads, 1);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kadmq.toml");
        std::fs::write(&file, "threads = 3\n").unwrap();
        assert_eq!(start_args(&["--config", file.to_str().unwrap()]).resolve().unwrap().threads, 3);
        let err = start_args(&["--threads", "5000"]).resolve().unwrap_err().to_string();
        assert!(err.contains("threads"), "{err}");
    }

    fn start_args(args: &[&str]) -> StartArgs {
        let cli = Cli::try_parse_from(["kadmq", "start"].iter().chain(args)).unwrap();
        let Command::Start(args) = cli.command else { panic!("start expected") };
        *args
    }

    #[test]
    fn cluster_flags_parse_into_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        kadmq_dht::driver::write_cluster_key(&key, &kadmq_dht::driver::generate_cluster_key()).unwrap();
        let args = start_args(&[
            "--node-name",
            "n2",
            "--p2p-listen",
            "/ip4/0.0.0.0/tcp/7000",
            "--bootstrap",
            "/dns4/kadmq-1/tcp/7000",
            "--bootstrap",
            "/ip4/10.0.0.5/tcp/7000,/ip4/10.0.0.6/tcp/7000",
            "--cluster-key-file",
            key.to_str().unwrap(),
            "--replication",
            "2",
            "--shard-depth",
            "3",
            "--dead-timeout",
            "12",
            "--cluster-send-buffer",
            "64",
            "--join-timeout-ms",
            "2500",
        ]);
        let c = args.resolve().unwrap().cluster;
        assert!(c.enabled());
        assert_eq!(c.node_name.as_deref(), Some("n2"));
        assert_eq!(c.p2p_listen, ["/ip4/0.0.0.0/tcp/7000"]);
        assert_eq!(c.bootstrap, ["/dns4/kadmq-1/tcp/7000", "/ip4/10.0.0.5/tcp/7000", "/ip4/10.0.0.6/tcp/7000"]);
        assert_eq!(c.cluster_key_file.as_deref(), Some(key.as_path()));
        assert_eq!((c.replication, c.shard_depth, c.dead_timeout_secs), (2, 3, 12));
        assert_eq!(c.send_buffer_mib, 64);
        assert_eq!(c.join_timeout_ms, 2500);
    }

    #[test]
    fn cluster_flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        kadmq_dht::driver::write_cluster_key(&key, &kadmq_dht::driver::generate_cluster_key()).unwrap();
        let file = dir.path().join("kadmq.toml");
        let toml = format!(
            "[cluster]\nnode_name = \"from-file\"\np2p_listen = [\"/ip4/0.0.0.0/tcp/7000\"]\ncluster_key_file = {:?}\nreplication = 5\n",
            key.to_str().unwrap()
        );
        std::fs::write(&file, toml).unwrap();
        let args = start_args(&["--config", file.to_str().unwrap(), "--node-name", "from-flag"]);
        let c = args.resolve().unwrap().cluster;
        assert_eq!(c.node_name.as_deref(), Some("from-flag"));
        assert_eq!(c.replication, 5);
        assert_eq!(c.p2p_listen, ["/ip4/0.0.0.0/tcp/7000"]);
    }

    #[test]
    fn cluster_flags_have_environment_variables() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let start = cli.find_subcommand("start").unwrap();
        for (flag, var) in [
            ("node-name", "KADMQ_NODE_NAME"),
            ("p2p-listen", "KADMQ_P2P_LISTEN"),
            ("bootstrap", "KADMQ_BOOTSTRAP"),
            ("cluster-key-file", "KADMQ_CLUSTER_KEY_FILE"),
            ("replication", "KADMQ_REPLICATION"),
            ("shard-depth", "KADMQ_SHARD_DEPTH"),
            ("split-entries", "KADMQ_SPLIT_ENTRIES"),
            ("dead-timeout", "KADMQ_DEAD_TIMEOUT"),
            ("join-timeout-ms", "KADMQ_JOIN_TIMEOUT_MS"),
        ] {
            let arg = start.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap_or_else(|| panic!("--{flag}"));
            assert_eq!(arg.get_env().and_then(|v| v.to_str()), Some(var), "--{flag}");
        }
        // The comma-separated forms (KADMQ_BOOTSTRAP=a,b) split like the flag.
        for flag in ["p2p-listen", "bootstrap"] {
            let arg = start.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap();
            assert_eq!(arg.get_value_delimiter(), Some(','), "--{flag}");
        }
        let status = cli.find_subcommand("cluster").and_then(|c| c.find_subcommand("status")).unwrap();
        let http = status.get_arguments().find(|a| a.get_long() == Some("http")).unwrap();
        assert_eq!(http.get_env().and_then(|v| v.to_str()), Some("KADMQ_HTTP"));
    }

    #[test]
    fn cluster_status_takes_an_http_address() {
        let cli = Cli::try_parse_from(["kadmq", "cluster", "status", "--http", "10.0.0.5:8080"]).unwrap();
        let Command::Cluster { command: ClusterCommand::Status { http } } = cli.command else { panic!() };
        assert_eq!(http, "10.0.0.5:8080");
        assert!(Cli::try_parse_from(["kadmq", "cluster"]).is_err(), "a cluster subcommand is required");
    }

    #[test]
    fn bad_cluster_flags_are_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        kadmq_dht::driver::write_cluster_key(&key, &kadmq_dht::driver::generate_cluster_key()).unwrap();
        let key = key.to_str().unwrap();
        let missing = dir.path().join("nonexistent.key");
        let refused = |args: &[&str]| start_args(args).resolve().unwrap_err().to_string();
        let listen = "/ip4/127.0.0.1/tcp/0";
        for (args, expected) in [
            (vec!["--p2p-listen", listen], "a cluster needs a key: give cluster.cluster_key_file (--cluster-key-file)"),
            (vec!["--p2p-listen", "127.0.0.1:7000", "--cluster-key-file", key], "is not a multiaddr"),
            (
                vec!["--p2p-listen", listen, "--cluster-key-file", key, "--bootstrap", "kadmq-1:7000"],
                "is not a multiaddr",
            ),
            (
                vec!["--bootstrap", "/ip4/127.0.0.1/tcp/7000"],
                "cluster.bootstrap needs cluster.p2p_listen (--p2p-listen)",
            ),
            (
                vec!["--p2p-listen", listen, "--cluster-key-file", key, "--replication", "0"],
                "--replication) must be at least 1",
            ),
            (
                vec!["--p2p-listen", listen, "--cluster-key-file", missing.to_str().unwrap()],
                "cannot read the cluster key file",
            ),
        ] {
            let msg = refused(&args);
            assert!(msg.starts_with("invalid configuration: ") && msg.contains(expected), "{args:?}: {msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        assert!(Cli::try_parse_from(["kadmq", "start", "--replication", "two"]).is_err());
    }

    #[test]
    fn help_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
