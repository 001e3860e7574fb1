//! Retained messages: the last retained message per topic, found by filter.
//!
//! Topics are stored level by level so a filter walks only the branches it
//! can match instead of testing every retained topic.

use super::message::Message;
use ahash::AHashMap;
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
        for level in message.topic.split('/') {
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
        let levels: Vec<&str> = topic.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Level, levels: &[&str]) -> bool {
        let Some((level, rest)) = levels.split_first() else {
            return node.message.take().is_some();
        };
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        let removed = Self::remove_at(child, rest);
        if child.message.is_none() && child.children.is_empty() {
            node.children.remove(*level);
        }
        removed
    }

    /// Clears `topic` if its retained message has expired at `now_ms`;
    /// returns whether it did.
    pub fn remove_expired(&mut self, topic: &str, now_ms: u64) -> bool {
        let expired = self.get(topic).is_some_and(|m| m.is_expired(now_ms));
        expired && self.remove(topic)
    }

    fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// The retained messages whose topics match `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        let levels: Vec<&str> = filter.split('/').collect();
        Self::walk(&self.root, &levels, true, &mut out);
        out
    }

    fn walk(node: &Level, levels: &[&str], at_root: bool, out: &mut Vec<Arc<Message>>) {
        let Some((level, rest)) = levels.split_first() else {
            out.extend(node.message.iter().cloned());
            return;
        };
        // Wildcards at the first level never match `$` topics.
        let visible = |name: &str| !(at_root && name.starts_with('$'));
        match *level {
            "#" => {
                // `a/#` also matches `a` itself.
                if !at_root {
                    out.extend(node.message.iter().cloned());
                }
                for (name, child) in &node.children {
                    if visible(name) {
                        Self::all(child, out);
                    }
                }
            }
            "+" => {
                for (name, child) in &node.children {
                    if visible(name) {
                        Self::walk(child, rest, false, out);
                    }
                }
            }
            literal => {
                if let Some(child) = node.children.get(literal) {
                    Self::walk(child, rest, false, out);
                }
            }
        }
    }

    fn all(node: &Level, out: &mut Vec<Arc<Message>>) {
        out.extend(node.message.iter().cloned());
        for child in node.children.values() {
            Self::all(child, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{topic::matches, MessageProperties, QoS};
    use bytes::Bytes;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: MessageProperties::default(),
            expires_at_ms: None,
            origin: None,
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
            let mut want: Vec<String> = topics.iter().filter(|t| matches(t, filter)).map(|t| t.to_string()).collect();
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

    #[test]
    fn replace_and_remove() {
        let mut tree = RetainedTree::default();
        tree.insert(msg("a/b"));
        tree.insert(msg("a/b"));
        assert_eq!(tree.len(), 1);
        assert!(tree.remove("a/b"));
        assert!(!tree.remove("a/b"));
        assert!(tree.is_empty());
        assert!(tree.root.children.is_empty());
    }
}
