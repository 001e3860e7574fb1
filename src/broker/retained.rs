//! Retained messages: the last retained message per topic, found by filter.
//!
//! Topics are stored level by level so a filter walks only the branches it
//! can match instead of testing every retained topic.

use super::message::Message;
use ahash::AHashMap;
use kadmq_dht::topic::levels;
use std::sync::Arc;

/// What a [`RetainedTree`] holds per topic: something that knows its topic
/// (the broker's retained message; the fleet store's versioned entry).
pub trait Retained {
    fn topic(&self) -> &str;
}

impl Retained for Arc<Message> {
    fn topic(&self) -> &str {
        &self.topic
    }
}

pub struct RetainedTree<V = Arc<Message>> {
    root: Level<V>,
    len: usize,
}

impl<V> Default for RetainedTree<V> {
    fn default() -> Self {
        RetainedTree { root: Level::default(), len: 0 }
    }
}

struct Level<V> {
    children: AHashMap<Box<str>, Level<V>>,
    value: Option<V>,
}

impl<V> Default for Level<V> {
    fn default() -> Self {
        Level { children: AHashMap::default(), value: None }
    }
}

impl<V> Level<V> {
    fn child(&self, level: &str) -> Option<&Level<V>> {
        self.children.get(level)
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }
}

/// Dropping a chain of levels would recurse once per level; the children
/// are detached onto a stack instead.
impl<V> Drop for Level<V> {
    fn drop(&mut self) {
        let mut stack: Vec<Level<V>> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut level) = stack.pop() {
            stack.extend(std::mem::take(&mut level.children).into_values());
        }
    }
}

impl<V: Retained> RetainedTree<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` for its topic, replacing the previous one; returns
    /// where it now is.
    pub fn insert(&mut self, value: V) -> &mut V {
        let mut node = &mut self.root;
        for level in levels(value.topic()) {
            if !node.children.contains_key(level) {
                node.children.insert(level.into(), Level::default());
            }
            node = node.children.get_mut(level).expect("inserted above");
        }
        if node.value.is_none() {
            self.len += 1;
        }
        node.value.insert(value)
    }

    /// Takes out what is held for `topic`.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let levels: Vec<&str> = levels(topic).collect();
        let mut node = &mut self.root;
        for level in &levels {
            node = node.children.get_mut(*level)?;
        }
        let value = node.value.take()?;
        self.len -= 1;
        self.prune(&levels);
        Some(value)
    }

    /// Cuts the longest tail of `levels` whose nodes hold nothing but the
    /// rest of the path.
    fn prune(&mut self, levels: &[&str]) {
        let only_leads_to = |node: &Level<V>, next: Option<&str>| {
            node.value.is_none()
                && match next {
                    None => node.is_empty(),
                    Some(next) => node.children.len() == 1 && node.children.contains_key(next),
                }
        };
        let Some(cut) = super::trie::dead_tail(&self.root, levels, Level::child, only_leads_to) else { return };
        let mut parent = &mut self.root;
        for level in &levels[..cut] {
            parent = parent.children.get_mut(*level).expect("walked above");
        }
        parent.children.remove(levels[cut]);
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in levels(topic) {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    pub fn get_mut(&mut self, topic: &str) -> Option<&mut V> {
        let mut node = &mut self.root;
        for level in levels(topic) {
            node = node.children.get_mut(level)?;
        }
        node.value.as_mut()
    }

    /// Everything held, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        let mut stack = vec![&self.root];
        std::iter::from_fn(move || loop {
            let level = stack.pop()?;
            stack.extend(level.children.values());
            if let Some(value) = &level.value {
                return Some(value);
            }
        })
    }

    /// Runs `f` on everything held.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut V)) {
        let mut stack = vec![&mut self.root];
        while let Some(level) = stack.pop() {
            if let Some(value) = &mut level.value {
                f(value);
            }
            stack.extend(level.children.values_mut());
        }
    }

    /// What is held for the topics that match `filter`.
    pub fn matching_refs(&self, filter: &str) -> Vec<&V> {
        let mut out = Vec::new();
        let levels: Vec<&str> = levels(filter).collect();
        // Each entry: a node and how many filter levels it has consumed.
        let mut stack = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            let Some(level) = levels.get(depth) else {
                out.extend(node.value.as_ref());
                continue;
            };
            let at_root = depth == 0;
            // Wildcards at the first level never match `$` topics.
            let visible = |name: &str| !(at_root && name.starts_with('$'));
            match *level {
                "#" => {
                    // `a/#` also matches `a` itself.
                    if !at_root {
                        out.extend(node.value.as_ref());
                    }
                    let mut below: Vec<&Level<V>> =
                        node.children.iter().filter(|(name, _)| visible(name)).map(|(_, child)| child).collect();
                    while let Some(level) = below.pop() {
                        out.extend(level.value.as_ref());
                        below.extend(level.children.values());
                    }
                }
                "+" => {
                    let next = node.children.iter().filter(|(name, _)| visible(name));
                    stack.extend(next.map(|(_, child)| (child, depth + 1)));
                }
                literal => stack.extend(node.children.get(literal).map(|child| (child, depth + 1))),
            }
        }
        out
    }
}

impl RetainedTree<Arc<Message>> {
    /// Clears `topic` if its retained message has expired at `now_ms`;
    /// returns whether it did.
    pub fn remove_expired(&mut self, topic: &str, now_ms: u64) -> bool {
        let expired = self.get(topic).is_some_and(|m| m.is_expired(now_ms));
        expired && self.remove(topic).is_some()
    }

    /// The retained messages whose topics match `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        self.matching_refs(filter).into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MessageProperties, QoS};
    use bytes::Bytes;
    use kadmq_dht::topic::matches;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: MessageProperties::default(),
            expires_at_ms: None,
            origin: None,
            fleet_id: None,
        })
    }

    #[test]
    fn filters_find_what_the_reference_matcher_finds() {
        let topics = ["a", "a/b", "a/b/c", "b/b", "$SYS/x", "/", "a//c", "x"];
        let mut tree = RetainedTree::default();
        for t in topics {
            tree.insert(msg(t));
        }
        assert_eq!(tree.len(), topics.len());
        for filter in ["#", "a/#", "+/b", "+", "a/+/c", "$SYS/#", "+/+", "/", "+/#", "a/b/c/#"] {
            let mut got: Vec<String> = tree.matching(filter).iter().map(|m| m.topic.clone()).collect();
            got.sort();
            let mut want: Vec<String> = topics.iter().filter(|t| matches(filter, t)).map(|t| t.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "filter {filter}");
        }
    }

    #[test]
    fn only_an_expired_message_is_removed_as_expired() {
        let mut tree = RetainedTree::default();
        let mut expiring = (*msg("a/b")).clone();
        expiring.expires_at_ms = Some(1_000);
        tree.insert(Arc::new(expiring));
        tree.insert(msg("a/c"));
        assert!(!tree.remove_expired("a/b", 999));
        assert!(!tree.remove_expired("a/c", 5_000), "no expiry, kept");
        assert!(!tree.remove_expired("a/x", 5_000), "nothing there");
        assert!(tree.remove_expired("a/b", 1_000));
        assert_eq!(tree.len(), 1);
    }

    /// Topics and filters of 100,000 levels go through insert, match,
    /// remove and drop on a 256 KiB stack: no walk recurses per level.
    #[test]
    fn deep_topics_do_not_grow_the_stack() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = "/".repeat(100_000);
                let mut tree = RetainedTree::default();
                tree.insert(msg(&deep));
                tree.insert(msg(&format!("{deep}/x")));
                assert_eq!(tree.matching("#").len(), 2);
                assert_eq!(tree.matching(&vec!["+"; 100_001].join("/")).len(), 1);
                assert_eq!(tree.matching(&deep).len(), 1);
                assert!(tree.remove(&deep).is_some());
                assert_eq!(tree.matching(&format!("{deep}/#")).len(), 1);
                drop(tree);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn remove_keeps_what_shares_the_path() {
        let mut tree = RetainedTree::default();
        for t in ["a/b/c/d", "a/b", "a/x/c", "a/b/e"] {
            tree.insert(msg(t));
        }
        assert!(tree.remove("a/b/c/d").is_some());
        assert!(tree.remove("a/b/c").is_none());
        let mut left: Vec<String> = tree.matching("#").iter().map(|m| m.topic.clone()).collect();
        left.sort();
        assert_eq!(left, ["a/b", "a/b/e", "a/x/c"]);
        for t in ["a/b", "a/b/e", "a/x/c"] {
            assert!(tree.remove(t).is_some(), "{t}");
        }
        assert!(tree.root.is_empty());
    }

    #[test]
    fn every_value_is_visited_and_can_be_changed_in_place() {
        let topics = ["a", "a/b", "a/b/c", "x/y", "$SYS/z"];
        let mut tree = RetainedTree::default();
        for t in topics {
            tree.insert(msg(t));
        }
        let mut seen: Vec<&str> = tree.values().map(|m| m.topic.as_str()).collect();
        seen.sort();
        let mut want = topics.to_vec();
        want.sort();
        assert_eq!(seen, want);
        tree.for_each_mut(|m| *m = Arc::new(Message { payload: Bytes::from_static(b"y"), ..(**m).clone() }));
        assert!(tree.values().all(|m| m.payload == "y"));
        *tree.get_mut("a/b").unwrap() = msg("a/b");
        assert_eq!(tree.get("a/b").unwrap().payload, "x");
        assert_eq!(tree.remove("x/y").map(|m| m.topic.clone()).as_deref(), Some("x/y"));
        assert!(tree.get("x/y").is_none() && tree.get_mut("x/y").is_none());
    }

    #[test]
    fn replace_and_remove() {
        let mut tree = RetainedTree::default();
        tree.insert(msg("a/b"));
        tree.insert(msg("a/b"));
        assert_eq!(tree.len(), 1);
        assert!(tree.remove("a/b").is_some());
        assert!(tree.remove("a/b").is_none());
        assert!(tree.is_empty());
        assert!(tree.root.is_empty());
    }
}
