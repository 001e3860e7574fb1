//! MQTT topic matching for the routing core: filter and topic validation, a
//! reference matcher, and [`FilterTrie`], a map from topic filters to values
//! that finds every filter matching a topic without scanning them all.
//!
//! Rules: levels split on `/`; `+` matches exactly one level (possibly
//! empty); `#` is last and matches the parent level and any number below
//! (`a/#` matches `a`); a topic whose first level starts with `$` matches no
//! filter that starts with a wildcard.
//!
//! Boundary: this is the cluster's matcher (route shards, caches, the local
//! filter set of a node). It knows nothing of clients or sessions; the
//! broker's own trie in `src/` delivers to clients.

/// A valid MQTT topic filter: non-empty, `#` only as the whole last level,
/// `+` only as a whole level, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// A valid topic name to publish to: non-empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Does `filter` match `topic`? The reference the trie is tested against.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

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
#[derive(Clone, Debug)]
pub struct FilterTrie<V> {
    root: TrieNode<V>,
    len: usize,
}

#[derive(Clone, Debug)]
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

    fn remove_child(&mut self, i: usize) {
        self.hashes.remove(i);
        self.children.remove(i);
    }

    fn is_empty(&self) -> bool {
        self.value.is_none() && self.multi.is_none() && self.single.is_none() && self.children.is_empty()
    }
}

impl<V> Default for FilterTrie<V> {
    fn default() -> Self {
        FilterTrie { root: TrieNode::default(), len: 0 }
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
        let mut levels = filter.split('/').peekable();
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
        let mut levels = filter.split('/').peekable();
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
        let mut levels = filter.split('/').peekable();
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
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_in(&mut self.root, &levels);
        if removed.is_some() {
            self.len -= 1;
        }
        removed.map(|b| *b)
    }

    /// Visits every filter matching `topic`, as (levels, ends with `#`, value).
    pub fn match_topic<'a>(&'a self, topic: &str, mut visit: impl FnMut(&[&'a str], bool, &'a V)) {
        let levels: smallvec::SmallVec<[(&str, u64); 8]> = topic.split('/').map(|l| (l, level_hash(l))).collect();
        let dollar = topic.starts_with('$');
        let mut path = Vec::with_capacity(levels.len());
        match_in(&self.root, &levels, 0, dollar, &mut path, &mut visit);
    }

    /// Visits every filter, in a deterministic order.
    pub fn for_each<'a>(&'a self, mut visit: impl FnMut(&[&'a str], bool, &'a V)) {
        let mut path = Vec::new();
        visit_all(&self.root, &mut path, &mut visit);
    }

    /// Visits every filter as a joined string.
    pub fn for_each_filter(&self, mut visit: impl FnMut(&str, &V)) {
        self.for_each(|levels, hash, v| visit(&join_filter(levels, hash), v));
    }

    /// Keeps only the filters for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        let removed = retain_in(&mut self.root, &mut keep);
        self.len -= removed;
    }
}

fn remove_in<V>(node: &mut TrieNode<V>, levels: &[&str]) -> Option<Box<V>> {
    let Some((&level, rest)) = levels.split_first() else { return node.value.take() };
    if level == "#" && rest.is_empty() {
        return node.multi.take();
    }
    if level == "+" {
        let child = node.single.as_deref_mut()?;
        let removed = remove_in(child, rest);
        if child.is_empty() {
            node.single = None;
        }
        return removed;
    }
    let i = node.find(level, level_hash(level)).ok()?;
    let removed = remove_in(&mut node.children[i].1, rest);
    if node.children[i].1.is_empty() {
        node.remove_child(i);
    }
    removed
}

fn retain_in<V>(node: &mut TrieNode<V>, keep: &mut impl FnMut(&mut V) -> bool) -> usize {
    let mut removed = 0;
    for slot in [&mut node.value, &mut node.multi] {
        if let Some(v) = slot {
            if !keep(v) {
                *slot = None;
                removed += 1;
            }
        }
    }
    if let Some(single) = node.single.as_deref_mut() {
        removed += retain_in(single, keep);
        if single.is_empty() {
            node.single = None;
        }
    }
    let mut i = 0;
    while i < node.children.len() {
        removed += retain_in(&mut node.children[i].1, keep);
        if node.children[i].1.is_empty() {
            node.remove_child(i);
        } else {
            i += 1;
        }
    }
    removed
}

fn match_in<'a, V>(
    node: &'a TrieNode<V>,
    levels: &[(&str, u64)],
    depth: usize,
    dollar: bool,
    path: &mut Vec<&'a str>,
    visit: &mut impl FnMut(&[&'a str], bool, &'a V),
) {
    let root_of_dollar = dollar && depth == 0;
    if let Some(v) = node.multi.as_deref() {
        if !root_of_dollar {
            visit(path, true, v);
        }
    }
    let Some(&(level, h)) = levels.get(depth) else {
        if let Some(v) = node.value.as_deref() {
            visit(path, false, v);
        }
        return;
    };
    if let Ok(i) = node.find(level, h) {
        let (label, child) = &node.children[i];
        path.push(label);
        match_in(child, levels, depth + 1, dollar, path, visit);
        path.pop();
    }
    if let Some(single) = node.single.as_deref() {
        if !root_of_dollar {
            path.push("+");
            match_in(single, levels, depth + 1, dollar, path, visit);
            path.pop();
        }
    }
}

fn visit_all<'a, V>(node: &'a TrieNode<V>, path: &mut Vec<&'a str>, visit: &mut impl FnMut(&[&'a str], bool, &'a V)) {
    if let Some(v) = node.value.as_deref() {
        visit(path, false, v);
    }
    if let Some(v) = node.multi.as_deref() {
        visit(path, true, v);
    }
    if let Some(single) = node.single.as_deref() {
        path.push("+");
        visit_all(single, path, visit);
        path.pop();
    }
    for (label, child) in &node.children {
        path.push(label);
        visit_all(child, path, visit);
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn validates_filters_and_topics() {
        for ok in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "a//b", "$SYS/#"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "#/a", "a/b+"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_topic("a/b") && valid_topic("$SYS/x") && valid_topic("/"));
        assert!(!valid_topic("") && !valid_topic("a/+") && !valid_topic("#"));
    }

    #[test]
    fn reference_matcher_follows_mqtt() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a"));
        assert!(matches("+", ""));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

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

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just(String::new()), Just("$c".to_string())]
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4), any::<bool>()).prop_map(
            |(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#".into());
                }
                levels.join("/")
            },
        )
    }

    proptest! {
        /// The trie finds exactly the filters the reference matcher accepts.
        #[test]
        fn trie_agrees_with_reference(
            filters in proptest::collection::vec(filter(), 0..20),
            topic in proptest::collection::vec(level(), 1..5),
            removed in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let topic = topic.join("/");
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
