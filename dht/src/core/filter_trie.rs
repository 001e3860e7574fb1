//! [`FilterTrie`]: a map from topic filters to values that finds every
//! filter matching a topic without scanning them all, and [`join_filter`],
//! which turns a visited path back into its filter.
//!
//! Boundary: a data structure of the routing core (route shards, route
//! caches, a node's local filter set). The topic rules it follows (levels,
//! wildcards, the `$` rule) are [`crate::topic`]'s, and its tests check it
//! against [`crate::topic::matches`]. It knows nothing of clients or
//! sessions; the broker's own trie in `src/` delivers to clients.

use crate::topic::levels;

/// Joins matched filter levels (as given to the [`FilterTrie`] visitors)
/// back into a filter.
pub fn join_filter(levels: &[&str], hash: bool) -> String {
    let mut filter = levels.join("/");
    if hash {
        if !levels.is_empty() {
            filter.push('/');
        }
        filter.push('#');
    }
    filter
}

/// A map from topic filters to `V`, shaped as a trie over levels.
///
/// Values are boxed so inner trie nodes stay small. Literal children are
/// kept sorted by (hash of the level, level), with the hashes in their own
/// vector: a lookup binary-searches a dense array of `u64`s and compares one
/// string, instead of chasing a heap pointer per probe — with millions of
/// filters per process (the simulator) the trie is memory-latency bound.
/// Iteration order is the (deterministic) hash order.
///
/// No walk recurses per level (insert, remove, match, visit, retain, clone
/// and drop all use loops or an explicit stack): a filter of 30,000 levels
/// costs time, never stack.
pub struct FilterTrie<V> {
    root: TrieNode<V>,
    len: usize,
}

struct TrieNode<V> {
    /// The filter that ends at this node.
    value: Option<Box<V>>,
    /// The filter that ends with `#` below this node.
    multi: Option<Box<V>>,
    /// The `+` child.
    single: Option<Box<TrieNode<V>>>,
    /// Hashes of the literal children's levels, sorted (parallel to `children`).
    hashes: Vec<u64>,
    /// Literal children, in `hashes` order (ties by level).
    children: Vec<(Box<str>, TrieNode<V>)>,
}

/// The hash literal levels are ordered by (FNV-1a; levels are short).
#[inline]
fn level_hash(level: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in level.as_bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl<V> Default for TrieNode<V> {
    fn default() -> Self {
        TrieNode { value: None, multi: None, single: None, hashes: Vec::new(), children: Vec::new() }
    }
}

impl<V> Drop for TrieNode<V> {
    /// Frees a subtree with an explicit stack: the derived drop would
    /// recurse once per level.
    fn drop(&mut self) {
        if self.children.is_empty() && self.single.is_none() {
            return;
        }
        let mut stack: Vec<TrieNode<V>> = Vec::new();
        detach_children(self, &mut stack);
        while let Some(mut node) = stack.pop() {
            detach_children(&mut node, &mut stack);
            // `node` now has no children: dropping it recurses no further.
        }
    }
}

fn detach_children<V>(node: &mut TrieNode<V>, into: &mut Vec<TrieNode<V>>) {
    node.hashes.clear();
    into.extend(node.children.drain(..).map(|(_, child)| child));
    if let Some(single) = node.single.take() {
        into.push(*single);
    }
}

/// One step down the trie: the `+` child or a literal child (its index).
#[derive(Clone, Copy)]
enum Step {
    Single,
    Child(usize),
}

impl<V> TrieNode<V> {
    /// The child for `level` (hash `h`), or where to insert it.
    #[inline]
    fn find(&self, level: &str, h: u64) -> Result<usize, usize> {
        let mut i = self.hashes.partition_point(|&x| x < h);
        while i < self.hashes.len() && self.hashes[i] == h {
            match (*self.children[i].0).cmp(level) {
                std::cmp::Ordering::Equal => return Ok(i),
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => break,
            }
        }
        Err(i)
    }

    fn child(&self, step: Step) -> &TrieNode<V> {
        match step {
            Step::Single => self.single.as_deref().expect("step taken"),
            Step::Child(i) => &self.children[i].1,
        }
    }

    fn child_mut(&mut self, step: Step) -> &mut TrieNode<V> {
        match step {
            Step::Single => self.single.as_deref_mut().expect("step taken"),
            Step::Child(i) => &mut self.children[i].1,
        }
    }

    fn remove_step(&mut self, step: Step) {
        match step {
            Step::Single => self.single = None,
            Step::Child(i) => {
                self.hashes.remove(i);
                self.children.remove(i);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.multi.is_none() && self.single.is_none() && self.children.is_empty()
    }

    /// Nothing but the one child `next` (or nothing at all) below it.
    fn only_leads_to(&self, next: Option<Step>) -> bool {
        if self.value.is_some() || self.multi.is_some() {
            return false;
        }
        match next {
            None => self.single.is_none() && self.children.is_empty(),
            Some(Step::Single) => self.children.is_empty(),
            Some(Step::Child(_)) => self.single.is_none() && self.children.len() == 1,
        }
    }
}

impl<V> Default for FilterTrie<V> {
    fn default() -> Self {
        FilterTrie { root: TrieNode::default(), len: 0 }
    }
}

impl<V: Clone> Clone for FilterTrie<V> {
    /// Rebuilt filter by filter: no recursion over levels.
    fn clone(&self) -> Self {
        let mut copy = FilterTrie::new();
        self.for_each_filter(|filter, v| {
            copy.get_or_insert_with(filter, || v.clone());
        });
        copy
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for FilterTrie<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        self.for_each_filter(|filter, v| {
            map.entry(&filter, v);
        });
        map.finish()
    }
}

impl<V> FilterTrie<V> {
    pub fn new() -> FilterTrie<V> {
        FilterTrie::default()
    }

    /// Number of filters held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, filter: &str) -> Option<&Option<Box<V>>> {
        let mut node = &self.root;
        let mut levels = levels(filter).peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return Some(&node.multi);
            }
            node = if level == "+" {
                node.single.as_deref()?
            } else {
                let i = node.find(level, level_hash(level)).ok()?;
                &node.children[i].1
            };
        }
        Some(&node.value)
    }

    pub fn get(&self, filter: &str) -> Option<&V> {
        self.slot(filter)?.as_deref()
    }

    pub fn get_mut(&mut self, filter: &str) -> Option<&mut V> {
        let mut node = &mut self.root;
        let mut levels = levels(filter).peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return node.multi.as_deref_mut();
            }
            node = if level == "+" {
                node.single.as_deref_mut()?
            } else {
                let i = node.find(level, level_hash(level)).ok()?;
                &mut node.children[i].1
            };
        }
        node.value.as_deref_mut()
    }

    /// The value of `filter`, inserted with `make` if absent.
    pub fn get_or_insert_with(&mut self, filter: &str, make: impl FnOnce() -> V) -> &mut V {
        let mut node = &mut self.root;
        let mut levels = levels(filter).peekable();
        let slot = loop {
            let Some(level) = levels.next() else { break &mut node.value };
            if level == "#" && levels.peek().is_none() {
                break &mut node.multi;
            }
            node = if level == "+" {
                node.single.get_or_insert_with(Default::default)
            } else {
                let h = level_hash(level);
                let i = match node.find(level, h) {
                    Ok(i) => i,
                    Err(i) => {
                        node.hashes.insert(i, h);
                        node.children.insert(i, (level.into(), TrieNode::default()));
                        i
                    }
                };
                &mut node.children[i].1
            };
        };
        if slot.is_none() {
            self.len += 1;
        }
        slot.get_or_insert_with(|| Box::new(make()))
    }

    /// Removes `filter`, pruning trie nodes left empty.
    pub fn remove(&mut self, filter: &str) -> Option<V> {
        // The path to the filter's node, and whether it ends in `#`.
        let mut steps: Vec<Step> = Vec::new();
        let mut multi = false;
        {
            let mut node = &self.root;
            let mut levels = levels(filter).peekable();
            while let Some(level) = levels.next() {
                if level == "#" && levels.peek().is_none() {
                    multi = true;
                    break;
                }
                let step = if level == "+" {
                    node.single.as_ref()?;
                    Step::Single
                } else {
                    Step::Child(node.find(level, level_hash(level)).ok()?)
                };
                node = node.child(step);
                steps.push(step);
            }
        }
        let mut node = &mut self.root;
        for &step in &steps {
            node = node.child_mut(step);
        }
        let removed = if multi { node.multi.take() } else { node.value.take() }?;
        self.len -= 1;
        // Prune: cut the path below the deepest node that still holds
        // something besides the path itself.
        let mut nodes = Vec::with_capacity(steps.len() + 1);
        let mut node = &self.root;
        nodes.push(node);
        for &step in &steps {
            node = node.child(step);
            nodes.push(node);
        }
        let mut cut = steps.len();
        while cut > 0 && nodes[cut].only_leads_to(steps.get(cut).copied().filter(|_| cut < steps.len())) {
            cut -= 1;
        }
        if cut < steps.len() {
            let mut parent = &mut self.root;
            for &step in &steps[..cut] {
                parent = parent.child_mut(step);
            }
            parent.remove_step(steps[cut]);
        }
        Some(*removed)
    }

    /// Visits every filter matching `topic`, as (levels, ends with `#`, value).
    pub fn match_topic<'a>(&'a self, topic: &str, mut visit: impl FnMut(&[&'a str], bool, &'a V)) {
        let levels: smallvec::SmallVec<[(&str, u64); 8]> = levels(topic).map(|l| (l, level_hash(l))).collect();
        let dollar = topic.starts_with('$');
        // Inline up to 16 levels and branches: no allocation for ordinary topics.
        let mut path: smallvec::SmallVec<[&'a str; 16]> = smallvec::SmallVec::new();
        // (node, levels consumed to reach it, its label); a node at depth d
        // has the labels of its path in `path[..d]` once it is popped.
        let mut stack: smallvec::SmallVec<[(&'a TrieNode<V>, usize, &'a str); 16]> =
            smallvec::smallvec![(&self.root, 0, "")];
        while let Some((node, depth, label)) = stack.pop() {
            if depth > 0 {
                path.truncate(depth - 1);
                path.push(label);
            }
            let root_of_dollar = dollar && depth == 0;
            if let Some(v) = node.multi.as_deref() {
                if !root_of_dollar {
                    visit(&path, true, v);
                }
            }
            let Some(&(level, h)) = levels.get(depth) else {
                if let Some(v) = node.value.as_deref() {
                    visit(&path, false, v);
                }
                continue;
            };
            // Pushed in reverse of the visiting order: literal child first.
            if let Some(single) = node.single.as_deref() {
                if !root_of_dollar {
                    stack.push((single, depth + 1, "+"));
                }
            }
            if let Ok(i) = node.find(level, h) {
                let (label, child) = &node.children[i];
                stack.push((child, depth + 1, label));
            }
        }
    }

    /// Visits every filter, in a deterministic order.
    pub fn for_each<'a>(&'a self, mut visit: impl FnMut(&[&'a str], bool, &'a V)) {
        let mut path: Vec<&'a str> = Vec::new();
        let mut stack: Vec<(&'a TrieNode<V>, usize, &'a str)> = vec![(&self.root, 0, "")];
        while let Some((node, depth, label)) = stack.pop() {
            if depth > 0 {
                path.truncate(depth - 1);
                path.push(label);
            }
            if let Some(v) = node.value.as_deref() {
                visit(&path, false, v);
            }
            if let Some(v) = node.multi.as_deref() {
                visit(&path, true, v);
            }
            // Visiting order: the `+` subtree, then the literal children in order.
            for (label, child) in node.children.iter().rev() {
                stack.push((child, depth + 1, label));
            }
            if let Some(single) = node.single.as_deref() {
                stack.push((single, depth + 1, "+"));
            }
        }
    }

    /// Visits every filter as a joined string.
    pub fn for_each_filter(&self, mut visit: impl FnMut(&str, &V)) {
        self.for_each(|levels, hash, v| visit(&join_filter(levels, hash), v));
    }

    /// Keeps only the filters for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        // Post-order with an explicit stack: each node is detached from its
        // parent while its subtree is worked on, and put back unless it
        // ended up empty.
        type Children<V> = std::iter::Zip<std::vec::IntoIter<u64>, std::vec::IntoIter<(Box<str>, TrieNode<V>)>>;
        struct Open<V> {
            node: TrieNode<V>,
            /// How it hangs from its parent: `None` for `+`, else its label and hash.
            label: Option<(Box<str>, u64)>,
            single: Option<Box<TrieNode<V>>>,
            children: Children<V>,
        }
        let open = |mut node: TrieNode<V>, label, keep: &mut dyn FnMut(&mut V) -> bool, removed: &mut usize| {
            for slot in [&mut node.value, &mut node.multi] {
                if slot.as_deref_mut().is_some_and(|v| !keep(v)) {
                    *slot = None;
                    *removed += 1;
                }
            }
            let single = node.single.take();
            let hashes = std::mem::take(&mut node.hashes);
            let children = std::mem::take(&mut node.children);
            Open { node, label, single, children: hashes.into_iter().zip(children) }
        };
        let mut removed = 0;
        let root = std::mem::take(&mut self.root);
        let mut stack = vec![open(root, None, &mut keep, &mut removed)];
        loop {
            let top = stack.last_mut().expect("the root stays until the end");
            let next = match top.single.take() {
                Some(single) => Some((*single, None)),
                None => top.children.next().map(|(h, (label, child))| (child, Some((label, h)))),
            };
            if let Some((child, label)) = next {
                let opened = open(child, label, &mut keep, &mut removed);
                stack.push(opened);
                continue;
            }
            let done = stack.pop().expect("checked above");
            let Some(parent) = stack.last_mut() else {
                self.root = done.node;
                break;
            };
            if done.node.is_empty() {
                continue;
            }
            match done.label {
                None => parent.node.single = Some(Box::new(done.node)),
                Some((label, h)) => {
                    parent.node.hashes.push(h);
                    parent.node.children.push((label, done.node));
                }
            }
        }
        self.len -= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;
    use crate::topic::strategies::{filter, topic};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn trie_inserts_removes_and_prunes() {
        let mut trie = FilterTrie::new();
        for f in ["a/b", "a/+", "a/#", "#", "+", "a"] {
            *trie.get_or_insert_with(f, || 0) += 1;
        }
        assert_eq!(trie.len(), 6);
        assert_eq!(trie.get("a/+"), Some(&1));
        assert_eq!(trie.get("a/c"), None);
        let mut seen = Vec::new();
        trie.match_topic("a/b", |levels, hash, _| seen.push(join_filter(levels, hash)));
        seen.sort();
        assert_eq!(seen, ["#", "a/#", "a/+", "a/b"]);
        for f in ["a/b", "a/+", "a/#", "#", "+", "a"] {
            assert_eq!(trie.remove(f), Some(1), "{f}");
        }
        assert!(trie.is_empty() && trie.root.is_empty());
    }

    /// Filters and topics of 100,000 levels (the crash input of issue 8 is a filter of 65,535 `/`)
    /// go through every walk on a thread with a 256 KiB stack: no walk recurses per level.
    #[test]
    fn deep_filters_do_not_grow_the_stack() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = "/".repeat(100_000);
                let deep_plus = vec!["+"; 100_001].join("/"); // as many levels as `deep`
                let mut trie = FilterTrie::new();
                for f in [deep.as_str(), deep_plus.as_str(), "a/#"] {
                    *trie.get_or_insert_with(f, || 0) += 1;
                }
                let mut seen = 0;
                trie.match_topic(&deep, |_, _, _| seen += 1);
                assert_eq!(seen, 2);
                let mut all = 0;
                trie.for_each_filter(|_, _| all += 1);
                assert_eq!(all, 3);
                let copy = trie.clone();
                assert_eq!(copy.len(), 3);
                drop(copy);
                assert_eq!(trie.remove(&deep), Some(1));
                trie.retain(|_| false);
                assert!(trie.is_empty() && trie.root.is_empty());
                *trie.get_or_insert_with(&deep, || 0) += 1;
                drop(trie);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    proptest! {
        /// The trie finds exactly the filters the reference matcher accepts.
        #[test]
        fn trie_agrees_with_reference(
            filters in proptest::collection::vec(filter(), 0..20),
            topic in topic(),
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let mut trie = FilterTrie::new();
            let mut set = BTreeSet::new();
            for f in &filters {
                trie.get_or_insert_with(f, || f.clone());
                set.insert(f.clone());
            }
            for ix in removed {
                if filters.is_empty() { break; }
                let f = ix.get(&filters);
                prop_assert_eq!(trie.remove(f).is_some(), set.remove(f));
            }
            prop_assert_eq!(trie.len(), set.len());
            let mut found = BTreeSet::new();
            trie.match_topic(&topic, |levels, hash, v| {
                assert_eq!(&join_filter(levels, hash), v);
                assert!(found.insert(v.clone()), "visited twice");
            });
            let expected: BTreeSet<String> = set.iter().filter(|f| matches(f, &topic)).cloned().collect();
            prop_assert_eq!(found, expected);
            let mut all = BTreeSet::new();
            trie.for_each_filter(|f, v| { assert_eq!(f, v); all.insert(f.to_string()); });
            prop_assert_eq!(all, set);
        }
    }
}
