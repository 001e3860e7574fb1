//! Topic aliases the broker uses towards one MQTT 5 client (§3.3.2.3.4).
//!
//! Boundary: a table, no I/O. The connection asks it for each outgoing
//! PUBLISH; aliases live as long as the network connection. At most the
//! client's Topic Alias Maximum aliases are bound; when all are taken, the
//! least recently used one is bound again to the new topic (the client
//! learns the new binding from the PUBLISH that carries topic and alias).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// How a PUBLISH to a topic is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// The topic is bound to this alias: send an empty topic and the alias.
    Known(u16),
    /// The topic was just bound to this alias: send the topic and the alias.
    Bound(u16),
}

/// An LRU of topics bound to the aliases 1..=maximum.
#[derive(Debug, Default)]
pub struct OutgoingAliases {
    maximum: u16,
    /// Topic → its alias and the tick of its last use.
    by_topic: HashMap<Arc<str>, (u16, u64)>,
    /// Tick of last use → alias: the first entry is the least recently used.
    by_use: BTreeMap<u64, u16>,
    /// The topic of alias `n` at index `n - 1`.
    topics: Vec<Arc<str>>,
    tick: u64,
}

impl OutgoingAliases {
    /// A table of `maximum` aliases; 0 = no aliases are used.
    pub fn new(maximum: u16) -> OutgoingAliases {
        OutgoingAliases { maximum, ..OutgoingAliases::default() }
    }

    pub fn enabled(&self) -> bool {
        self.maximum > 0
    }

    /// The alias of `topic` if it has one; counts as a use.
    pub fn known(&mut self, topic: &str) -> Option<u16> {
        let (alias, used) = self.by_topic.get_mut(topic)?;
        self.tick += 1;
        self.by_use.remove(used);
        *used = self.tick;
        self.by_use.insert(self.tick, *alias);
        Some(*alias)
    }

    /// The alias of `topic`, binding one (a free one, else the least
    /// recently used) if it has none. `None` when aliases are off.
    pub fn assign(&mut self, topic: &str) -> Option<AliasUse> {
        if let Some(alias) = self.known(topic) {
            return Some(AliasUse::Known(alias));
        }
        if self.maximum == 0 {
            return None;
        }
        let topic: Arc<str> = Arc::from(topic);
        let alias = if self.topics.len() < self.maximum as usize {
            self.topics.push(topic.clone());
            self.topics.len() as u16
        } else {
            let (_, alias) = self.by_use.pop_first()?;
            let old = std::mem::replace(&mut self.topics[alias as usize - 1], topic.clone());
            self.by_topic.remove(&old);
            alias
        };
        self.tick += 1;
        self.by_topic.insert(topic, (alias, self.tick));
        self.by_use.insert(self.tick, alias);
        Some(AliasUse::Bound(alias))
    }

    /// Topics currently bound.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_then_reuses_then_evicts_the_least_recently_used() {
        let mut a = OutgoingAliases::new(2);
        assert_eq!(a.assign("t/a"), Some(AliasUse::Bound(1)));
        assert_eq!(a.assign("t/b"), Some(AliasUse::Bound(2)));
        assert_eq!(a.assign("t/a"), Some(AliasUse::Known(1)));
        // t/b is the least recently used: its alias goes to t/c.
        assert_eq!(a.assign("t/c"), Some(AliasUse::Bound(2)));
        assert_eq!(a.known("t/b"), None);
        assert_eq!(a.assign("t/a"), Some(AliasUse::Known(1)));
        // Now t/c is the least recently used.
        assert_eq!(a.assign("t/b"), Some(AliasUse::Bound(2)));
        assert_eq!(a.assign("t/c"), Some(AliasUse::Bound(1)));
        assert_eq!(a.len(), 2);
        assert_eq!(a.by_use.len(), 2);
    }

    #[test]
    fn maximum_zero_uses_no_aliases() {
        let mut a = OutgoingAliases::new(0);
        assert!(!a.enabled());
        assert_eq!(a.assign("t"), None);
        assert!(a.is_empty());
    }

    #[test]
    fn one_alias_is_rebound_each_time_the_topic_changes() {
        let mut a = OutgoingAliases::new(1);
        for round in 0..100 {
            let topic = format!("t/{}", round % 3);
            assert_eq!(a.assign(&topic), Some(AliasUse::Bound(1)));
            assert_eq!(a.assign(&topic), Some(AliasUse::Known(1)));
        }
        assert_eq!((a.len(), a.by_use.len(), a.topics.len()), (1, 1, 1));
    }
}
