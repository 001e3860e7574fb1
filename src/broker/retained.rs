//! Retained messages: the last retained message per topic, found by filter.
//!
//! Topics are stored level by level so a filter walks only the branches it
//! can match instead of testing every retained topic.

use super::message::Message;
use ahash::AHashMap;
use kadmq_dht::topic::levels;
use std::sync::Arc;

#[derive(Default)]
pub struct RetainedTree {
    root: Level,
    len: usize,
}

#[derive(Default)]
struct Level {
    children: AHashMap<Box<str>, Level>,
    message: Option<Arc<Message>>,
}

impl Level {
    fn child(&self, level: &str) -> Option<&Level> {
        self.children.get(level)
    }

    fn is_empty(&self) -> bool {
        self.message.is_none() && self.children.is_empty()
    }
}

/// Dropping a chain of levels would recurse once per level; the children
/// are detached onto a stack instead.
impl Drop for Level {
    fn drop(&mut self) {
        let mut stack: Vec<Level> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut level) = stack.pop() {
            stack.extend(std::mem::take(&mut level.children).into_values());
        }
    }
}

impl RetainedTree {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `message` for its topic, replacing the previous one.
    pub fn insert(&mut self, message: Arc<Message>) {
        let mut node = &mut self.root;
        for level in levels(&message.topic) {
            if !node.children.contains_key(level) {
                node.children.insert(level.into(), Level::default());
            }
            node = node.children.get_mut(level).expect("inserted above");
        }
        if node.message.replace(message).is_none() {
            self.len += 1;
        }
    }

    /// Clears the retained message of `topic`; returns whether there was one.
    pub fn remove(&mut self, topic: &str) -> bool {
        let levels: Vec<&str> = levels(topic).collect();
        let mut node = &mut self.root;
        for level in &levels {
            match node.children.get_mut(*level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        if node.message.take().is_none() {
            return false;
        }
        self.len -= 1;
        self.prune(&levels);
        true
    }

    /// Cuts the longest tail of `levels` whose nodes hold nothing but the
    /// rest of the path.
    fn prune(&mut self, levels: &[&str]) {
        let only_leads_to = |node: &Level, next: Option<&str>| {
            node.message.is_none()
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

    /// Clears `topic` if its retained message has expired at `now_ms`;
    /// returns whether it did.
    pub fn remove_expired(&mut self, topic: &str, now_ms: u64) -> bool {
        let expired = self.get(topic).is_some_and(|m| m.is_expired(now_ms));
        expired && self.remove(topic)
    }

    fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in levels(topic) {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// The retained messages whose topics match `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        let levels: Vec<&str> = levels(filter).collect();
        // Each entry: a node and how many filter levels it has consumed.
        let mut stack = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            let Some(level) = levels.get(depth) else {
                out.extend(node.message.iter().cloned());
                continue;
            };
            let at_root = depth == 0;
            // Wildcards at the first level never match `$` topics.
            let visible = |name: &str| !(at_root && name.starts_with('$'));
            match *level {
                "#" => {
                    // `a/#` also matches `a` itself.
                    if !at_root {
                        out.extend(node.message.iter().cloned());
                    }
                    let mut below: Vec<&Level> =
                        node.children.iter().filter(|(name, _)| visible(name)).map(|(_, child)| child).collect();
                    while let Some(level) = below.pop() {
                        out.extend(level.message.iter().cloned());
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
                assert!(tree.remove(&deep));
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
        assert!(tree.remove("a/b/c/d"));
        assert!(!tree.remove("a/b/c"));
        let mut left: Vec<String> = tree.matching("#").iter().map(|m| m.topic.clone()).collect();
        left.sort();
        assert_eq!(left, ["a/b", "a/b/e", "a/x/c"]);
        for t in ["a/b", "a/b/e", "a/x/c"] {
            assert!(tree.remove(t), "{t}");
        }
        assert!(tree.root.is_empty());
    }

    #[test]
    fn replace_and_remove() {
        let mut tree = RetainedTree::default();
        tree.insert(msg("a/b"));
        tree.insert(msg("a/b"));
        assert_eq!(tree.len(), 1);
        assert!(tree.remove("a/b"));
        assert!(!tree.remove("a/b"));
        assert!(tree.is_empty());
        assert!(tree.root.is_empty());
    }
}
