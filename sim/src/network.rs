//! The virtual network: latency, loss, partitions, per-link ordering and
//! the message counters.
//!
//! Each link (ordered pair of nodes) delivers in order, as the yamux stream
//! between two real nodes does: a message never overtakes an earlier one on
//! the same link, whatever latency it drew. Messages across a partition and
//! lost messages are dropped at send time and counted.
//!
//! Boundary: when (and whether) a message arrives. What it carries is
//! opaque here apart from its kind and size.

use crate::dice::Dice;
use crate::engine::Millis;
use crate::scenario::{LatencyConfig, NetworkConfig};
use rustc_hash::FxHashMap;
use serde::Serialize;

/// Number of message kinds: the core's frame kinds plus forwarded publishes.
pub const KINDS: usize = kadmq_dht::core::FRAME_KINDS + 1;
/// Index of forwarded publishes in the per-kind counters.
pub const FORWARD: usize = kadmq_dht::core::FRAME_KINDS;

/// Names of the kinds, frame kinds first (in `FrameKind::ALL` order).
pub fn kind_name(kind: usize) -> &'static str {
    if kind == FORWARD {
        "forward"
    } else {
        kadmq_dht::core::FrameKind::ALL[kind].name()
    }
}

/// Messages and bytes of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
}

impl Traffic {
    pub fn add(&mut self, other: Traffic) {
        self.messages += other.messages;
        self.bytes += other.bytes;
    }
}

/// Counters kept by the network.
#[derive(Clone, Debug, Default)]
pub struct NetCounters {
    /// Sent (offered to the network), per kind.
    pub sent: [Traffic; KINDS],
    pub lost: u64,
    pub cut: u64,
    /// Arrived at a node that had died meanwhile.
    pub to_dead: u64,
}

/// Draws latencies and decides the fate of each message.
pub struct Network {
    config: NetworkConfig,
    rng: Dice,
    /// Latest arrival time per link, so links stay FIFO. Pruned of links
    /// with nothing in flight, so it holds about the messages in flight.
    link_clock: FxHashMap<(u32, u32), Millis>,
    prune_at: usize,
    /// Partition group of each node (by index); all 0 when healed.
    group: Vec<u16>,
    partitioned: bool,
    pub counters: NetCounters,
}

/// What became of a sent message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Arrives(Millis),
    Lost,
    Cut,
}

impl Network {
    pub fn new(config: NetworkConfig, rng: Dice) -> Network {
        Network {
            config,
            rng,
            link_clock: FxHashMap::default(),
            prune_at: 1 << 16,
            group: Vec::new(),
            partitioned: false,
            counters: NetCounters::default(),
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// One latency sample, in ms (at least 1: nothing is instantaneous).
    pub fn latency(&mut self) -> Millis {
        sample_latency(&self.config.latency, &mut self.rng)
    }

    /// A uniform draw in `0..=max`.
    pub fn jitter(&mut self, max: Millis) -> Millis {
        if max == 0 {
            0
        } else {
            self.rng.int(0..=max)
        }
    }

    /// Sends `bytes` of `kind` from `from` to `to` at `now`.
    pub fn send(&mut self, now: Millis, from: u32, to: u32, kind: usize, bytes: usize) -> Fate {
        let t = &mut self.counters.sent[kind];
        t.messages += 1;
        t.bytes += bytes as u64;
        if self.partitioned && self.group_of(from) != self.group_of(to) {
            self.counters.cut += 1;
            return Fate::Cut;
        }
        // Forwards are not lost: the outbox resends QoS 1/2 forwards until
        // they are acknowledged, and the route frames are what is tested.
        if kind != FORWARD && self.config.loss > 0.0 && self.rng.chance(self.config.loss) {
            self.counters.lost += 1;
            return Fate::Lost;
        }
        let mut at = now + self.latency();
        let clock = self.link_clock.entry((from, to)).or_insert(0);
        at = at.max(*clock);
        *clock = at;
        if self.link_clock.len() > self.prune_at {
            self.link_clock.retain(|_, t| *t > now);
            self.prune_at = (self.link_clock.len() * 2).max(1 << 16);
        }
        Fate::Arrives(at)
    }

    /// Splits nodes into groups (`group[i]` for node index `i`).
    pub fn partition(&mut self, group: Vec<u16>) {
        self.group = group;
        self.partitioned = true;
    }

    pub fn heal(&mut self) {
        self.group.clear();
        self.partitioned = false;
    }

    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// The group of a node; nodes that joined after the split are in group 0.
    pub fn group_of(&self, node: u32) -> u16 {
        self.group.get(node as usize).copied().unwrap_or(0)
    }
}

/// One draw from a latency distribution, in whole ms, at least 1.
pub fn sample_latency(config: &LatencyConfig, rng: &mut Dice) -> Millis {
    let ms = match *config {
        LatencyConfig::Fixed { ms } => ms,
        LatencyConfig::Uniform { min_ms, max_ms } => {
            if max_ms > min_ms {
                min_ms + (max_ms - min_ms) * rng.unit()
            } else {
                min_ms
            }
        }
        LatencyConfig::LogNormal { median_ms, sigma, max_ms } => {
            // Box-Muller: one standard normal from two uniforms.
            // u1 in (0, 1]: ln(0) would be infinite.
            let u1 = 1.0 - rng.unit();
            let u2 = rng.unit();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (median_ms.ln() + sigma * z).exp().min(max_ms)
        }
    };
    (ms.round() as Millis).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(latency: LatencyConfig, loss: f64) -> Network {
        let config = NetworkConfig { latency, loss, ..NetworkConfig::default() };
        Network::new(config, Dice::seeded(3))
    }

    #[test]
    fn links_are_fifo_whatever_the_latency() {
        let mut n = net(LatencyConfig::Uniform { min_ms: 1.0, max_ms: 100.0 }, 0.0);
        let mut last = 0;
        for now in 0..1_000 {
            let Fate::Arrives(at) = n.send(now, 1, 2, 0, 10) else { panic!() };
            assert!(at >= last && at > now);
            last = at;
        }
        assert_eq!(n.counters.sent[0], Traffic { messages: 1_000, bytes: 10_000 });
    }

    #[test]
    fn loss_rate_is_close_to_configured_and_spares_forwards() {
        let mut n = net(LatencyConfig::Fixed { ms: 1.0 }, 0.1);
        let lost = (0..20_000).filter(|&i| n.send(i, 1, 2, 0, 1) == Fate::Lost).count();
        assert!((1_700..2_300).contains(&lost), "{lost}");
        assert!((0..1_000).all(|i| n.send(i, 1, 2, FORWARD, 1) != Fate::Lost), "forwards are resent, not lost");
    }

    #[test]
    fn partitions_cut_across_groups_until_healed() {
        let mut n = net(LatencyConfig::Fixed { ms: 5.0 }, 0.0);
        n.partition(vec![0, 0, 1, 1]);
        assert_eq!(n.send(0, 0, 1, 0, 1), Fate::Arrives(5));
        assert_eq!(n.send(0, 0, 2, 0, 1), Fate::Cut);
        assert_eq!(n.send(0, 7, 1, 0, 1), Fate::Arrives(5), "late joiners are in group 0");
        n.heal();
        assert_eq!(n.send(0, 0, 2, 0, 1), Fate::Arrives(5));
    }

    #[test]
    fn lognormal_median_is_about_right() {
        let mut rng = Dice::seeded(9);
        let config = LatencyConfig::LogNormal { median_ms: 20.0, sigma: 0.5, max_ms: 1_000.0 };
        let mut draws: Vec<u64> = (0..10_001).map(|_| sample_latency(&config, &mut rng)).collect();
        draws.sort_unstable();
        assert!((18..=22).contains(&draws[5_000]), "{}", draws[5_000]);
    }
}
