//! The local subscription trie: topic filters, level by level, to the
//! subscribers that hold them.
//!
//! Generic over the subscriber key `K` and what is stored per subscriber `V`
//! so the benchmarks can fill it with a million filters without sessions.
//! Matching follows MQTT: `+` matches one level (also an empty one), `#`
//! matches the rest including the parent level (`a/#` matches `a`), and a
//! topic starting with `$` matches no filter that starts with a wildcard.

use ahash::AHashMap;
use std::hash::Hash;

pub struct SubscriptionTrie<K, V> {
    root: Node<K, V>,
    /// Number of (filter, key) entries.
    len: usize,
}

struct Node<K, V> {
    literal: AHashMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Entries of the filter that ends in `#` at this position.
    hash: AHashMap<K, V>,
    /// Entries of the filter that ends exactly at this node.
    here: AHashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { literal: AHashMap::new(), plus: None, hash: AHashMap::new(), here: AHashMap::new() }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

impl<K: Eq + Hash + Clone, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        SubscriptionTrie { root: Node::default(), len: 0 }
    }
}

impl<K: Eq + Hash + Clone, V> SubscriptionTrie<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s entry for `filter`; returns the old value.
    /// The filter must be valid (see `protocol::topic::valid_topic_filter`).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                let old = node.hash.insert(key, value);
                if old.is_none() {
                    self.len += 1;
                }
                return old;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                // Look up first so the common case (level exists) allocates nothing.
                if !node.literal.contains_key(level) {
                    node.literal.insert(level.into(), Node::default());
                }
                node.literal.get_mut(level).expect("inserted above")
            };
        }
        let old = node.here.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s entry for `filter`, pruning empty nodes.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<K, V>, levels: &[&str], key: &K) -> Option<V> {
        let Some((level, rest)) = levels.split_first() else {
            return node.here.remove(key);
        };
        if *level == "#" && rest.is_empty() {
            return node.hash.remove(key);
        }
        if *level == "+" {
            let child = node.plus.as_mut()?;
            let removed = Self::remove_at(child, rest, key);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        } else {
            let child = node.literal.get_mut(*level)?;
            let removed = Self::remove_at(child, rest, key);
            if child.is_empty() {
                node.literal.remove(*level);
            }
            removed
        }
    }

    /// Calls `visit` for every entry whose filter matches `topic`. A key
    /// with several matching filters is visited once per filter.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&K, &V)) {
        let dollar = topic.starts_with('$');
        let mut levels = topic.split('/');
        let first = levels.next().unwrap_or("");
        let root = &self.root;
        if !dollar {
            root.hash.iter().for_each(|(k, v)| visit(k, v));
            if let Some(plus) = &root.plus {
                Self::walk(plus, levels.clone(), &mut visit);
            }
        }
        if let Some(child) = root.literal.get(first) {
            Self::walk(child, levels, &mut visit);
        }
    }

    /// `node` has consumed one level; `rest` are the levels after it.
    fn walk<'t>(node: &Node<K, V>, mut rest: std::str::Split<'t, char>, visit: &mut impl FnMut(&K, &V)) {
        // `#` at this point matches the remaining levels, and also none.
        node.hash.iter().for_each(|(k, v)| visit(k, v));
        let Some(level) = rest.next() else {
            node.here.iter().for_each(|(k, v)| visit(k, v));
            return;
        };
        if let Some(plus) = &node.plus {
            Self::walk(plus, rest.clone(), visit);
        }
        if let Some(child) = node.literal.get(level) {
            Self::walk(child, rest, visit);
        }
    }

    /// Every (filter, key, value) in the trie, for persistence and tests.
    pub fn entries(&self) -> Vec<(String, &K, &V)> {
        let mut out = Vec::with_capacity(self.len);
        Self::collect(&self.root, &mut Vec::new(), &mut out);
        out
    }

    fn collect<'a>(node: &'a Node<K, V>, path: &mut Vec<String>, out: &mut Vec<(String, &'a K, &'a V)>) {
        let filter = |last: Option<&str>| {
            let mut levels = path.clone();
            levels.extend(last.map(str::to_string));
            levels.join("/")
        };
        if !path.is_empty() {
            let here = filter(None);
            out.extend(node.here.iter().map(|(k, v)| (here.clone(), k, v)));
        }
        let hash = filter(Some("#"));
        out.extend(node.hash.iter().map(|(k, v)| (hash.clone(), k, v)));
        if let Some(plus) = &node.plus {
            path.push("+".into());
            Self::collect(plus, path, out);
            path.pop();
        }
        for (level, child) in &node.literal {
            path.push(level.to_string());
            Self::collect(child, path, out);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::topic::matches;
    use proptest::prelude::*;

    fn matched(trie: &SubscriptionTrie<u32, ()>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |k, _| out.push(*k));
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_and_dollar_rule() {
        let mut trie = SubscriptionTrie::new();
        let filters = ["#", "+/x", "a/#", "a/+", "a/b", "$SYS/#", "+", "a/+/c", "/", "+/+"];
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, i as u32, ());
        }
        assert_eq!(matched(&trie, "a/b"), vec![0, 2, 3, 4, 9]);
        assert_eq!(matched(&trie, "a"), vec![0, 2, 6]);
        assert_eq!(matched(&trie, "q/x"), vec![0, 1, 9]);
        assert_eq!(matched(&trie, "$SYS/uptime"), vec![5]);
        assert_eq!(matched(&trie, "a/x/c"), vec![0, 2, 7]);
        assert_eq!(matched(&trie, "/"), vec![0, 8, 9]);
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut trie = SubscriptionTrie::new();
        trie.insert("a/b/c", 1, ());
        trie.insert("a/b/c", 2, ());
        trie.insert("a/+/#", 1, ());
        assert_eq!(trie.len(), 3);
        assert!(trie.remove("a/b/c", &1).is_some());
        assert!(trie.remove("a/b/c", &1).is_none());
        assert!(trie.remove("a/+/#", &1).is_some());
        assert!(trie.remove("a/b/c", &2).is_some());
        assert_eq!(trie.len(), 0);
        assert!(trie.root.is_empty());
    }

    #[test]
    fn entries_round_trip_filters() {
        let mut trie = SubscriptionTrie::new();
        for (i, f) in ["#", "a/#", "+/b", "a", "a/b/c", "/"].iter().enumerate() {
            trie.insert(f, i as u32, ());
        }
        let mut filters: Vec<String> = trie.entries().into_iter().map(|(f, _, _)| f).collect();
        filters.sort();
        assert_eq!(filters, vec!["#", "+/b", "/", "a", "a/#", "a/b/c"]);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just(String::new()), Just("$x".to_string())]
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..4), any::<bool>()).prop_map(
            |(mut levels, hash)| {
                if hash {
                    levels.push("#".into());
                }
                levels.join("/")
            },
        )
    }

    proptest! {
        /// The trie agrees with the reference matcher on every topic.
        #[test]
        fn agrees_with_reference_matcher(
            filters in proptest::collection::vec(filter(), 1..20),
            topics in proptest::collection::vec(proptest::collection::vec(level(), 1..5), 1..20),
        ) {
            let mut trie = SubscriptionTrie::new();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i as u32, ());
            }
            for topic in topics {
                let topic = topic.join("/");
                let expected: Vec<u32> = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| matches(&topic, f))
                    .map(|(i, _)| i as u32)
                    .collect();
                prop_assert_eq!(matched(&trie, &topic), expected, "topic {}", topic);
            }
        }
    }
}
