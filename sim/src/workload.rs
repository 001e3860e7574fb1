//! Workloads: the topic tree, the filters nodes subscribe to and the topics
//! they publish to.
//!
//! The tree's first level has `top_levels` names (`t0`, `t1`, …) drawn with
//! a Zipf law, so a few prefixes carry most subscriptions and publishes, as
//! in real fleets (`devices/…`). Lower levels are `l0`, `l1`, … Filters are
//! tree paths with wildcards placed by position (`+` at level k with
//! `plus_share[k]`, `#` at the end with `hash_share`), a share of root
//! wildcards (`#`, `+/x/…`) and a share of `$share` groups.
//!
//! Boundary: what is subscribed and published, never how it is routed.

use crate::dice::Dice;
use crate::scenario::{SubscriptionConfig, TopicConfig};

/// Samples ranks `0..n` with probability proportional to `1/(rank+1)^s`.
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(exponent);
            cdf.push(total);
        }
        for p in &mut cdf {
            *p /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut Dice) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&p| p <= u).min(self.cdf.len() - 1)
    }

    /// Probability of the most frequent rank.
    pub fn top_share(&self) -> f64 {
        self.cdf[0]
    }
}

/// One subscription: a filter, and the group if it is `$share/{group}/…`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Subscription {
    pub filter: Box<str>,
    pub group: Option<Box<str>>,
}

/// Generates topics and filters from a scenario's tree.
#[derive(Clone, Debug)]
pub struct Workload {
    topics: TopicConfig,
    subs: SubscriptionConfig,
    first: Zipf,
    second: Zipf,
}

impl Workload {
    pub fn new(topics: &TopicConfig, subs: &SubscriptionConfig) -> Workload {
        Workload {
            first: Zipf::new(topics.top_levels, topics.zipf_exponent),
            second: Zipf::new(topics.branching, topics.second_level_zipf),
            topics: topics.clone(),
            subs: subs.clone(),
        }
    }

    fn levels(&self, rng: &mut Dice) -> Vec<String> {
        let depth = rng.int(self.topics.depth_min..=self.topics.depth_max);
        let mut levels = Vec::with_capacity(depth);
        levels.push(format!("t{}", self.first.sample(rng)));
        for i in 1..depth {
            let name = if i == 1 { self.second.sample(rng) } else { rng.int(0..self.topics.branching) };
            levels.push(format!("l{name}"));
        }
        let hot = &self.topics.hot_prefix;
        if self.topics.hot_share > 0.0 && !hot.is_empty() && rng.chance(self.topics.hot_share.min(1.0)) {
            levels.splice(0..1, hot.split('/').map(str::to_string));
        }
        levels
    }

    /// A topic to publish to: a path of the tree.
    pub fn topic(&self, rng: &mut Dice) -> String {
        self.levels(rng).join("/")
    }

    /// A filter to subscribe to.
    pub fn subscription(&self, rng: &mut Dice) -> Subscription {
        let mut levels = self.levels(rng);
        if rng.chance(self.subs.root_wildcard_share.clamp(0.0, 1.0)) {
            if levels.len() < 2 || rng.chance(0.5) {
                levels = vec!["#".into()];
            } else {
                levels[0] = "+".into();
            }
        } else {
            for (k, level) in levels.iter_mut().enumerate() {
                let p = self.subs.plus_share.get(k).copied().unwrap_or(0.0);
                if p > 0.0 && rng.chance(p.min(1.0)) {
                    *level = "+".into();
                }
            }
            if rng.chance(self.subs.hash_share.clamp(0.0, 1.0)) {
                // Replace the last level, keeping at least one level above
                // it so `#` here is not a root wildcard.
                if levels.len() > 1 {
                    *levels.last_mut().expect("levels") = "#".into();
                } else {
                    levels.push("#".into());
                }
            }
        }
        let group = if self.subs.shared_share > 0.0 && rng.chance(self.subs.shared_share.min(1.0)) {
            Some(format!("g{}", rng.int(0..self.subs.shared_groups.max(1))).into_boxed_str())
        } else {
            None
        };
        Subscription { filter: levels.join("/").into_boxed_str(), group }
    }

    /// Share of the first level's most frequent name.
    pub fn top_prefix_share(&self) -> f64 {
        self.first.top_share()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_uniform_at_zero() {
        let mut rng = Dice::seeded(1);
        let z = Zipf::new(100, 1.0);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        // 1/H(100) ≈ 19%; rank 10 ≈ 1.7%.
        assert!((18_000..21_000).contains(&counts[0]), "{}", counts[0]);
        assert!(counts[0] > 5 * counts[9]);
        let flat = Zipf::new(4, 0.0);
        assert!((flat.top_share() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn filters_follow_the_configured_mix() {
        let topics = TopicConfig { top_levels: 50, depth_min: 3, depth_max: 3, ..TopicConfig::default() };
        let subs = SubscriptionConfig {
            plus_share: vec![0.0, 0.5, 0.0],
            hash_share: 0.2,
            root_wildcard_share: 0.1,
            shared_share: 0.3,
            ..SubscriptionConfig::default()
        };
        let w = Workload::new(&topics, &subs);
        let mut rng = Dice::seeded(2);
        let all: Vec<Subscription> = (0..10_000).map(|_| w.subscription(&mut rng)).collect();
        let share = |f: &dyn Fn(&Subscription) -> bool| all.iter().filter(|s| f(s)).count() as f64 / 1e4;
        let root = share(&|s| s.filter.starts_with('+') || s.filter.starts_with('#'));
        let plus1 = share(&|s| s.filter.split('/').nth(1) == Some("+"));
        let hash = share(&|s| s.filter.ends_with("/#"));
        let shared = share(&|s| s.group.is_some());
        assert!((0.08..0.12).contains(&root), "{root}");
        assert!((0.40..0.50).contains(&plus1), "{plus1}");
        assert!((0.15..0.22).contains(&hash), "{hash}");
        assert!((0.27..0.33).contains(&shared), "{shared}");
        assert!(all.iter().all(|s| kadmq_dht::topic::valid_topic_filter(&s.filter)));
        let topic = w.topic(&mut rng);
        assert_eq!(topic.split('/').count(), 3);
    }
}
