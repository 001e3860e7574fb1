//! Scenario files: what fleet to simulate, under which workload and faults.
//!
//! A scenario is TOML (see `sim/scenarios/`); every key has a default, so a
//! file names only what it changes. [`Scenario::load`] reads a file and
//! applies `key.path=value` overrides (the CLI's `--set`) before
//! deserializing, so an override is checked exactly like the file is.
//!
//! Boundary: configuration and its validation; nothing runs here.

use anyhow::{bail, Context};
use kadmq_dht::core::{OwnershipConfig, RoutingConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One simulation: the fleet, its network, its workload and its faults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Seed of every random choice (workload and network). Logged with the report.
    pub seed: u64,
    /// Virtual time at which workload generation stops; the run then drains
    /// in-flight messages and timers for `report.drain_ms`.
    pub duration_ms: u64,
    pub fleet: FleetConfig,
    pub network: NetworkConfig,
    pub topics: TopicConfig,
    pub subscriptions: SubscriptionConfig,
    pub publishes: PublishConfig,
    pub churn: ChurnConfig,
    pub partitions: Vec<PartitionConfig>,
    pub report: ReportConfig,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "unnamed".into(),
            seed: 1,
            duration_ms: 60_000,
            fleet: FleetConfig::default(),
            network: NetworkConfig::default(),
            topics: TopicConfig::default(),
            subscriptions: SubscriptionConfig::default(),
            publishes: PublishConfig::default(),
            churn: ChurnConfig::default(),
            partitions: Vec::new(),
            report: ReportConfig::default(),
        }
    }
}

/// The fleet and the routing core's settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Nodes at start.
    pub nodes: usize,
    /// Owners per shard (R).
    pub replication: usize,
    pub shard_depth: usize,
    /// `xor` or `ring`.
    pub ownership: OwnershipKind,
    /// Virtual points per node on the ring (ignored for `xor`).
    pub vnodes: u32,
    pub cache_capacity: usize,
    pub handoff_grace_ms: u64,
    pub handoff_warmup_ms: u64,
    pub lookup_timeout_ms: u64,
    /// 0 turns anti-entropy off.
    pub anti_entropy_interval_ms: u64,
    /// Entries at which an owner splits a shard by the next level (0 = never).
    pub split_entries: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        let core = RoutingConfig::default();
        let (ownership, vnodes) = match OwnershipConfig::default() {
            OwnershipConfig::Xor => (OwnershipKind::Xor, 128),
            OwnershipConfig::Ring { vnodes } => (OwnershipKind::Ring, vnodes),
        };
        FleetConfig {
            nodes: 30,
            replication: core.replication,
            shard_depth: core.shard_depth,
            ownership,
            vnodes,
            cache_capacity: core.cache_capacity,
            handoff_grace_ms: core.handoff_grace_ms,
            handoff_warmup_ms: core.handoff_warmup_ms,
            lookup_timeout_ms: core.lookup_timeout_ms,
            anti_entropy_interval_ms: core.anti_entropy_interval_ms,
            split_entries: core.split_entries,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OwnershipKind {
    Xor,
    Ring,
}

impl FleetConfig {
    pub fn core_config(&self) -> RoutingConfig {
        RoutingConfig {
            replication: self.replication,
            shard_depth: self.shard_depth,
            cache_capacity: self.cache_capacity,
            handoff_grace_ms: self.handoff_grace_ms,
            handoff_warmup_ms: self.handoff_warmup_ms,
            lookup_timeout_ms: self.lookup_timeout_ms,
            anti_entropy_interval_ms: self.anti_entropy_interval_ms,
            split_entries: self.split_entries,
            ..RoutingConfig::default()
        }
    }

    pub fn ownership_config(&self) -> OwnershipConfig {
        match self.ownership {
            OwnershipKind::Xor => OwnershipConfig::Xor,
            OwnershipKind::Ring => OwnershipConfig::Ring { vnodes: self.vnodes },
        }
    }
}

/// One-way message latency.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LatencyConfig {
    Fixed {
        ms: f64,
    },
    Uniform {
        min_ms: f64,
        max_ms: f64,
    },
    /// exp(N(ln median, sigma)), capped at `max_ms`.
    LogNormal {
        median_ms: f64,
        sigma: f64,
        max_ms: f64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub latency: LatencyConfig,
    /// Probability that one message (frame or forward) is lost.
    pub loss: f64,
    /// Time for the fleet to notice a crash or a partition (heartbeat timeout).
    pub detect_ms: u64,
    /// Membership news reaches each node within this extra spread (gossip).
    pub gossip_spread_ms: u64,
    /// Payload size of a forwarded publish, for the byte counts.
    pub payload_bytes: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            latency: LatencyConfig::LogNormal { median_ms: 1.0, sigma: 0.5, max_ms: 50.0 },
            loss: 0.0,
            detect_ms: 3_000,
            gossip_spread_ms: 500,
            payload_bytes: 64,
        }
    }
}

/// The topic tree: `top_levels` first-level names drawn with Zipf skew,
/// `branching` names per level below, `depth_min..=depth_max` levels.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    pub top_levels: usize,
    /// Zipf exponent of the first level (0 = uniform).
    pub zipf_exponent: f64,
    /// Names per level below the first.
    pub branching: usize,
    /// Zipf exponent of the second level (0 = uniform): a skewed tree is
    /// one whose hot first level also has hot children.
    pub second_level_zipf: f64,
    pub depth_min: usize,
    pub depth_max: usize,
    /// A share of topics and filters (`hot_share`) starts with these levels
    /// instead of the first one (`devices/eu`: the skewed tree of a fleet
    /// that names devices under one prefix).
    pub hot_prefix: String,
    pub hot_share: f64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            top_levels: 200,
            zipf_exponent: 0.8,
            branching: 20,
            second_level_zipf: 0.0,
            depth_min: 2,
            depth_max: 4,
            hot_prefix: String::new(),
            hot_share: 0.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Subscriptions made by the initial nodes, spread over `start_ms..end_ms`.
    pub count: usize,
    pub start_ms: u64,
    pub end_ms: u64,
    /// `plus_share[k]`: probability that level `k` (0 = first) becomes `+`.
    /// A `+` at level 0 makes a root-shard filter.
    pub plus_share: Vec<f64>,
    /// Probability that the last level becomes `#`.
    pub hash_share: f64,
    /// Share of filters that are root wildcards: `#` or `+/x/...`.
    pub root_wildcard_share: f64,
    /// Share of `$share/{group}/{filter}` subscriptions.
    pub shared_share: f64,
    /// Group names to pick from for shared subscriptions.
    pub shared_groups: usize,
    /// Subscriptions a joining node makes (default: the initial average).
    pub per_join: Option<usize>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            count: 3_000,
            start_ms: 0,
            end_ms: 5_000,
            plus_share: vec![0.0, 0.05, 0.05],
            hash_share: 0.05,
            root_wildcard_share: 0.001,
            shared_share: 0.05,
            shared_groups: 4,
            per_join: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// Publishes, from uniformly chosen live nodes, to leaves of the tree.
    pub count: usize,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig { count: 2_000, start_ms: 10_000, end_ms: 50_000 }
    }
}

/// Churn as fractions of the initial node count, spread uniformly over
/// `start_ms..end_ms` (0.05 with 10,000 nodes = 500 events).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChurnConfig {
    pub start_ms: u64,
    pub end_ms: u64,
    /// New nodes joining (they subscribe `subscriptions.per_join`).
    pub join: f64,
    /// Nodes leaving gracefully (announced at once).
    pub leave: f64,
    /// Nodes crashing (noticed after `network.detect_ms`).
    pub crash: f64,
}

impl Default for ChurnConfig {
    fn default() -> Self {
        ChurnConfig { start_ms: 20_000, end_ms: 40_000, join: 0.0, leave: 0.0, crash: 0.0 }
    }
}

/// The fleet split into groups (fractions of the live nodes) that cannot
/// reach each other from `at_ms` until `heal_ms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionConfig {
    pub at_ms: u64,
    pub heal_ms: u64,
    pub groups: Vec<f64>,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig { at_ms: 20_000, heal_ms: 30_000, groups: vec![0.5, 0.5] }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    /// Width of one point of the time series.
    pub sample_ms: u64,
    /// How often the route table is compared with the oracle.
    pub audit_ms: u64,
    /// Virtual time after `duration_ms` to let messages and timers settle.
    pub drain_ms: u64,
    /// A publish that misses a subscription made less than this long
    /// before it raced the subscription's propagation: counted as
    /// `missed_fresh`, not as lost.
    pub fresh_ms: u64,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig { sample_ms: 1_000, audit_ms: 500, drain_ms: 15_000, fresh_ms: 1_000 }
    }
}

impl Scenario {
    /// Reads a scenario file and applies `key.path=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Scenario::parse(&text, overrides).with_context(|| format!("in {}", path.display()))
    }

    /// Parses scenario TOML and applies overrides.
    pub fn parse(text: &str, overrides: &[String]) -> anyhow::Result<Scenario> {
        let mut value: toml::Table = toml::from_str(text)?;
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        let scenario: Scenario = toml::Value::Table(value).try_into()?;
        scenario.validate()?;
        Ok(scenario)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.fleet.nodes == 0 {
            bail!("fleet.nodes must be at least 1");
        }
        if self.fleet.replication == 0 {
            bail!("fleet.replication must be at least 1");
        }
        if self.fleet.shard_depth == 0 {
            bail!("fleet.shard_depth must be at least 1");
        }
        if self.topics.top_levels == 0 || self.topics.branching == 0 {
            bail!("topics.top_levels and topics.branching must be at least 1");
        }
        if self.topics.depth_min == 0 || self.topics.depth_min > self.topics.depth_max {
            bail!("topics: need 1 <= depth_min <= depth_max");
        }
        if !(0.0..=1.0).contains(&self.network.loss) {
            bail!("network.loss is a probability");
        }
        for p in &self.partitions {
            if p.heal_ms <= p.at_ms || p.groups.len() < 2 || p.groups.iter().any(|g| *g <= 0.0) {
                bail!("a partition needs heal_ms > at_ms and at least two groups of positive size");
            }
        }
        if self.report.sample_ms == 0 || self.report.audit_ms == 0 {
            bail!("report.sample_ms and report.audit_ms must be positive");
        }
        Ok(())
    }
}

/// `a.b.c=value`: value parsed as TOML (number, bool, string, array),
/// falling back to a bare string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> anyhow::Result<()> {
    let Some((path, raw)) = assignment.split_once('=') else {
        bail!("override {assignment:?} is not key=value");
    };
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let keys: Vec<&str> = path.trim().split('.').collect();
    let (last, parents) = keys.split_last().expect("split yields one");
    let mut cursor = table;
    for key in parents {
        let entry = cursor.entry(key.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("override {assignment:?}: {key} is not a table"),
        };
    }
    cursor.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_a_file_leaves_out() {
        let s = Scenario::parse("name = \"x\"\n[fleet]\nnodes = 7\n", &[]).unwrap();
        assert_eq!(s.fleet.nodes, 7);
        assert_eq!(s.fleet.replication, 3);
        assert_eq!(s.name, "x");
    }

    #[test]
    fn overrides_win_and_are_typed() {
        let overrides = ["fleet.nodes=9".to_string(), "fleet.ownership=ring".into(), "seed=42".into()];
        let s = Scenario::parse("[fleet]\nnodes = 7\n", &overrides).unwrap();
        assert_eq!((s.fleet.nodes, s.fleet.ownership, s.seed), (9, OwnershipKind::Ring, 42));
        assert!(Scenario::parse("", &["fleet.nodes=many".into()]).is_err());
        assert!(Scenario::parse("[fleet]\nnodez = 3\n", &[]).is_err(), "unknown keys are refused");
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path, &[]).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 4);
    }
}
