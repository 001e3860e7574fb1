//! The local subscription trie: topic filters, level by level, to the
//! subscribers that hold them.
//!
//! Generic over the subscriber key `K` and what is stored per subscriber `V`
//! so the benchmarks can fill it with a million filters without sessions.
//! Matching follows MQTT: `+` matches one level (also an empty one), `#`
//! matches the rest including the parent level (`a/#` matches `a`), and a
//! topic starting with `$` matches no filter that starts with a wildcard.

use ahash::AHashMap;
use kadmq_dht::topic::levels;
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

    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.literal.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.literal.get_mut(level)
        }
    }

    /// Whether this node holds nothing but the child at `level` (nothing at
    /// all for `None`): removing that child's subtree leaves it empty.
    fn only_leads_to(&self, level: Option<&str>) -> bool {
        if !self.hash.is_empty() || !self.here.is_empty() {
            return false;
        }
        match level {
            None => self.is_empty(),
            Some("+") => self.literal.is_empty() && self.plus.is_some(),
            Some(level) => self.plus.is_none() && self.literal.len() == 1 && self.literal.contains_key(level),
        }
    }
}

/// A node that has consumed one level of a topic, and the levels after it.
type MatchStep<'t, 's, K, V> = (&'t Node<K, V>, std::str::Split<'s, char>);

/// After a removal along `path` (levels from `root`): the depth of the first
/// node of the longest tail of the path whose nodes hold nothing but the
/// rest of the path (`only_leads_to(node, next level)`), i.e. where to cut.
pub(super) fn dead_tail<'n, N>(
    root: &'n N,
    path: &[&str],
    child: impl Fn(&'n N, &str) -> Option<&'n N>,
    only_leads_to: impl Fn(&N, Option<&str>) -> bool,
) -> Option<usize> {
    let mut cut = None;
    let mut node = root;
    for (depth, level) in path.iter().enumerate() {
        node = child(node, level)?;
        if only_leads_to(node, path.get(depth + 1).copied()) {
            cut.get_or_insert(depth);
        } else {
            cut = None;
        }
    }
    cut
}

/// Dropping a chain of nodes one level each would recurse once per level;
/// the children are detached onto a stack instead.
impl<K, V> Drop for Node<K, V> {
    fn drop(&mut self) {
        let mut stack: Vec<Node<K, V>> = std::mem::take(&mut self.literal).into_values().collect();
        stack.extend(self.plus.take().map(|plus| *plus));
        while let Some(mut node) = stack.pop() {
            stack.extend(std::mem::take(&mut node.literal).into_values());
            stack.extend(node.plus.take().map(|plus| *plus));
        }
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
    /// The filter must be valid (see `kadmq_dht::topic::valid_topic_filter`).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        let mut levels = levels(filter).peekable();
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
        let levels: Vec<&str> = levels(filter).collect();
        let (path, in_hash) = match levels.split_last() {
            Some((&"#", path)) => (path, true),
            _ => (&levels[..], false),
        };
        let mut node = &mut self.root;
        for level in path {
            node = node.child_mut(level)?;
        }
        let removed = if in_hash { node.hash.remove(key) } else { node.here.remove(key) }?;
        self.len -= 1;
        self.prune(path);
        Some(removed)
    }

    /// Cuts the longest tail of `path` whose nodes hold nothing but the
    /// rest of the path (found first, read-only, then cut in one place).
    fn prune(&mut self, path: &[&str]) {
        let Some(cut) = dead_tail(&self.root, path, Node::child, Node::only_leads_to) else { return };
        let mut parent = &mut self.root;
        for level in &path[..cut] {
            parent = parent.child_mut(level).expect("walked above");
        }
        if path[cut] == "+" {
            parent.plus = None;
        } else {
            parent.literal.remove(path[cut]);
        }
    }

    /// Calls `visit` for every entry whose filter matches `topic`. A key
    /// with several matching filters is visited once per filter.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&K, &V)) {
        let dollar = topic.starts_with('$');
        let mut levels = levels(topic);
        let first = levels.next().unwrap_or("");
        let root = &self.root;
        // Each entry is a node that has consumed one level, with the levels
        // after it; inline up to 16, so ordinary topics allocate nothing.
        let mut stack: smallvec::SmallVec<[MatchStep<'_, '_, K, V>; 16]> = smallvec::SmallVec::new();
        if let Some(child) = root.literal.get(first) {
            stack.push((child, levels.clone()));
        }
        if !dollar {
            root.hash.iter().for_each(|(k, v)| visit(k, v));
            if let Some(plus) = &root.plus {
                stack.push((plus, levels));
            }
        }
        while let Some((node, mut rest)) = stack.pop() {
            // `#` at this point matches the remaining levels, and also none.
            node.hash.iter().for_each(|(k, v)| visit(k, v));
            let Some(level) = rest.next() else {
                node.here.iter().for_each(|(k, v)| visit(k, v));
                continue;
            };
            if let Some(child) = node.literal.get(level) {
                stack.push((child, rest.clone()));
            }
            if let Some(plus) = &node.plus {
                stack.push((plus, rest));
            }
        }
    }

    /// Every (filter, key, value) in the trie, for persistence and tests.
    pub fn entries<'a>(&'a self) -> Vec<(String, &'a K, &'a V)> {
        enum Step<'a, K, V> {
            Enter(&'a str, &'a Node<K, V>),
            Leave,
        }
        let mut out = Vec::with_capacity(self.len);
        let mut path: Vec<&str> = Vec::new();
        let root = &self.root;
        out.extend(root.hash.iter().map(|(k, v)| ("#".to_string(), k, v)));
        let mut stack: Vec<Step<K, V>> = Vec::new();
        let children = |node: &'a Node<K, V>, stack: &mut Vec<Step<'a, K, V>>| {
            stack.extend(node.literal.iter().map(|(level, child)| Step::Enter(level, child)));
            stack.extend(node.plus.as_deref().map(|plus| Step::Enter("+", plus)));
        };
        children(root, &mut stack);
        while let Some(step) = stack.pop() {
            let Step::Enter(level, node) = step else {
                path.pop();
                continue;
            };
            path.push(level);
            if !node.here.is_empty() {
                let here = path.join("/");
                out.extend(node.here.iter().map(|(k, v)| (here.clone(), k, v)));
            }
            if !node.hash.is_empty() {
                let hash = format!("{}/#", path.join("/"));
                out.extend(node.hash.iter().map(|(k, v)| (hash.clone(), k, v)));
            }
            stack.push(Step::Leave);
            children(node, &mut stack);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kadmq_dht::topic::matches;
    use kadmq_dht::topic::strategies::{filter, topic};
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

    /// The crash input of issue 8 (a filter of 65,535 `/`) and deeper go
    /// through every walk on a 256 KiB stack: no walk recurses per level.
    #[test]
    fn deep_filters_do_not_grow_the_stack() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = "/".repeat(100_000);
                let deep_plus = vec!["+"; 100_001].join("/");
                let deep_hash = format!("{deep}/#");
                let mut trie = SubscriptionTrie::new();
                for (i, f) in [&deep, &deep_plus, &deep_hash, &"a/#".to_string()].into_iter().enumerate() {
                    trie.insert(f, i as u32, ());
                }
                assert_eq!(matched(&trie, &deep), vec![0, 1, 2]);
                assert_eq!(trie.entries().len(), 4);
                assert!(trie.remove(&deep, &0).is_some());
                assert!(trie.remove(&deep_plus, &1).is_some());
                assert_eq!(matched(&trie, &deep), vec![2]);
                drop(trie);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn remove_keeps_what_shares_the_path() {
        let mut trie = SubscriptionTrie::new();
        for (i, f) in ["a/b/c/d", "a/b", "a/+/c", "a/b/#", "x"].iter().enumerate() {
            trie.insert(f, i as u32, ());
        }
        assert!(trie.remove("a/b/c/d", &0).is_some());
        assert_eq!(matched(&trie, "a/b"), vec![1, 3]);
        assert_eq!(matched(&trie, "a/b/c"), vec![2, 3]);
        assert!(trie.remove("a/b/#", &3).is_some());
        assert!(trie.remove("a/b", &1).is_some());
        assert_eq!(matched(&trie, "a/b/c"), vec![2]);
        assert!(trie.remove("a/+/c", &2).is_some());
        assert!(trie.remove("x", &4).is_some());
        assert!(trie.root.is_empty());
    }

    proptest! {
        /// The trie agrees with the reference matcher on every topic.
        #[test]
        fn agrees_with_reference_matcher(
            filters in proptest::collection::vec(filter(), 1..20),
            topics in proptest::collection::vec(topic(), 1..20),
        ) {
            let mut trie = SubscriptionTrie::new();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i as u32, ());
            }
            for topic in topics {
                let expected: Vec<u32> = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| matches(f, &topic))
                    .map(|(i, _)| i as u32)
                    .collect();
                prop_assert_eq!(matched(&trie, &topic), expected, "topic {}", topic);
            }
        }
    }
}
