//! What one client's input may make a node hold, and the record of each time
//! a limit is hit.
//!
//! Every size a client decides (topic depth and length, subscriptions,
//! queued messages and bytes, connections, publish rate) has a setting in
//! [`MqttConfig`] (the topic checks themselves are
//! [`kadmq_dht::topic::TopicLimits`], shared with the routing core). A hit
//! is answered with the protocol's reason code by the caller; here it is
//! counted (`kadmq_limit_hits_total{limit}`) and logged once, then at most
//! once a minute per limit with the number of hits in between: a client
//! that hits a limit in a loop must not flood the log.

use super::clock::Clock;
use crate::config::MqttConfig;
use kadmq_dht::topic::{TopicLimit, TopicLimits};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A limit a client can run into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    TopicLevels,
    TopicLength,
    Subscriptions,
    QueuedMessages,
    QueuedBytes,
    Connections,
    PublishRate,
    PacketSize,
}

impl Limit {
    pub const ALL: [Limit; 8] = [
        Limit::TopicLevels,
        Limit::TopicLength,
        Limit::Subscriptions,
        Limit::QueuedMessages,
        Limit::QueuedBytes,
        Limit::Connections,
        Limit::PublishRate,
        Limit::PacketSize,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::TopicLevels => "topic_levels",
            Limit::TopicLength => "topic_length",
            Limit::Subscriptions => "subscriptions",
            Limit::QueuedMessages => "queued_messages",
            Limit::QueuedBytes => "queued_bytes",
            Limit::Connections => "connections",
            Limit::PublishRate => "publish_rate",
            Limit::PacketSize => "packet_size",
        }
    }

    /// The setting that raises it, for the log line.
    pub fn setting(self) -> &'static str {
        match self {
            Limit::TopicLevels => "mqtt.max_topic_levels",
            Limit::TopicLength => "mqtt.max_topic_length",
            Limit::Subscriptions => "mqtt.max_subscriptions_per_client",
            Limit::QueuedMessages => "mqtt.max_queued_messages",
            Limit::QueuedBytes => "mqtt.max_queued_bytes",
            Limit::Connections => "mqtt.max_connections",
            Limit::PublishRate => "mqtt.max_publish_rate",
            Limit::PacketSize => "mqtt.max_packet_size",
        }
    }
}

impl From<TopicLimit> for Limit {
    fn from(limit: TopicLimit) -> Limit {
        match limit {
            TopicLimit::Levels => Limit::TopicLevels,
            TopicLimit::Length => Limit::TopicLength,
        }
    }
}

/// The topic limits of a configuration, checked on every topic name and
/// filter a client sends (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, wills).
pub fn topic_limits(config: &MqttConfig) -> TopicLimits {
    TopicLimits { max_levels: config.max_topic_levels, max_len: config.max_topic_length }
}

/// Hits per limit, and when each was last logged (on the broker's clock).
pub struct LimitHits {
    hits: [AtomicU64; Limit::ALL.len()],
    logs: [LogGate; Limit::ALL.len()],
    clock: Arc<dyn Clock>,
}

impl LimitHits {
    pub fn new(clock: Arc<dyn Clock>) -> LimitHits {
        LimitHits { hits: Default::default(), logs: Default::default(), clock }
    }

    /// Counts a hit of `limit` by `client` and logs it if the gate is open.
    pub fn hit(&self, limit: Limit, client: &str, what: &str) {
        let i = limit as usize;
        self.hits[i].fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.logs[i].pass(self.clock.now_ms()) {
            tracing::warn!(
                limit = limit.name(),
                client_id = client,
                suppressed,
                "{what}: over {}; counted in kadmq_limit_hits_total{{limit=\"{}\"}}, logged at most once a minute",
                limit.setting(),
                limit.name()
            );
        }
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.hits[limit as usize].load(Ordering::Relaxed)
    }
}

/// Lets one log line through, then at most one per [`LogGate::INTERVAL_MS`],
/// and says how many were held back in between.
#[derive(Default)]
pub struct LogGate {
    /// When a line last went through, plus one (0 = never).
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl LogGate {
    pub const INTERVAL_MS: u64 = 60_000;

    /// `Some(lines held back since the last one)` when this one may be logged.
    pub fn pass(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last - 1) >= Self::INTERVAL_MS;
        if due && self.last_ms.compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// A client's PUBLISH allowance: `rate` packets a second, in bursts of up
/// to one second's worth.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, now: Instant) -> Option<TokenBucket> {
        (per_second > 0).then_some(TokenBucket { rate: per_second as f64, tokens: per_second as f64, last: now })
    }

    /// `Ok` when a packet may be taken now; else when one may.
    pub fn ready(&mut self, now: Instant) -> Result<(), Instant> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            return Ok(());
        }
        Err(now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    /// Spends the allowance of one packet.
    pub fn spend(&mut self) {
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_limits_come_from_the_config_and_name_their_limit() {
        let config = MqttConfig { max_topic_levels: 3, max_topic_length: 10, ..MqttConfig::default() };
        let limits = topic_limits(&config);
        assert_eq!(limits.exceeded_by("a/b/c"), None);
        assert_eq!(limits.exceeded_by("a/b/c/d").map(Limit::from), Some(Limit::TopicLevels));
        assert_eq!(limits.exceeded_by("abcdefghijk").map(Limit::from), Some(Limit::TopicLength));
    }

    #[test]
    fn the_gate_lets_one_line_a_minute_through_and_counts_the_rest() {
        let gate = LogGate::default();
        assert_eq!(gate.pass(1_000), Some(0));
        assert_eq!(gate.pass(1_001), None);
        assert_eq!(gate.pass(60_999), None);
        assert_eq!(gate.pass(61_000), Some(2));
        assert_eq!(gate.pass(61_001), None);
        // At time 0 too.
        let gate = LogGate::default();
        assert_eq!(gate.pass(0), Some(0));
        assert_eq!(gate.pass(1), None);
    }

    #[test]
    fn the_bucket_allows_the_rate_and_says_when_to_come_back() {
        let start = Instant::now();
        assert!(TokenBucket::new(0, start).is_none(), "0 = no limit");
        let mut bucket = TokenBucket::new(10, start).unwrap();
        for _ in 0..10 {
            bucket.ready(start).unwrap();
            bucket.spend();
        }
        let back = bucket.ready(start).unwrap_err();
        assert!((back - start).abs_diff(Duration::from_millis(100)) < Duration::from_micros(10), "{back:?}");
        assert!(bucket.ready(start + Duration::from_millis(98)).is_err());
        bucket.ready(start + Duration::from_millis(101)).unwrap();
        bucket.spend();
        // Idle time refills at most one second's worth.
        let later = start + Duration::from_secs(60);
        for _ in 0..10 {
            bucket.ready(later).unwrap();
            bucket.spend();
        }
        assert!(bucket.ready(later).is_err());
    }

    #[test]
    fn hits_are_counted_per_limit() {
        let hits = LimitHits::new(Arc::new(super::super::clock::ManualClock::at(1_000)));
        for _ in 0..5 {
            hits.hit(Limit::TopicLevels, "c", "SUBSCRIBE");
        }
        hits.hit(Limit::Connections, "c", "connection");
        assert_eq!(hits.count(Limit::TopicLevels), 5);
        assert_eq!(hits.count(Limit::Connections), 1);
        assert_eq!(hits.count(Limit::QueuedBytes), 0);
    }
}
