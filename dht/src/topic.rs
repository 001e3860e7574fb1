//! MQTT topic rules, in one place: what a topic name and a topic filter may
//! be, `$share/{group}/{filter}` parsing, the reference matcher, levels, and
//! the level/length limits.
//!
//! MQTT 3.1.1 §4.7 / MQTT 5.0 §4.7 and §4.8.2. A topic name is what a
//! PUBLISH carries (no wildcards); a topic filter is what a SUBSCRIBE carries
//! (`+` matches one whole level, possibly empty; `#` the rest of the topic
//! including its parent level: `a/#` matches `a`). A topic whose first level
//! starts with `$` matches no filter that starts with a wildcard. Both are
//! UTF-8 strings of at most 65535 bytes without U+0000.
//!
//! Boundary: pure functions over `&str`, no state, no I/O. Used by the
//! broker's codec, sessions and subscription trie, the cluster's wire
//! decoder and the routing core alike, so a node and its peers judge a topic
//! the same way. What to answer when a rule or limit is broken (a reason
//! code, a dropped frame) is the caller's business.

/// The longest string MQTT can carry (two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The default limit on topic levels, the same on a node's clients
/// (`mqtt.max_topic_levels`) and in its routing core: a fleet refuses what
/// a node would.
pub const DEFAULT_MAX_LEVELS: usize = 128;

const SHARE_PREFIX: &str = "$share/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("invalid topic name")]
    InvalidTopicName,
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    #[error("invalid shared subscription group name")]
    InvalidShareGroup,
    #[error("shared subscription without a topic filter")]
    MissingShareFilter,
}

/// A topic name a PUBLISH may carry: non-empty, no `+`/`#`, no U+0000, at
/// most 65535 bytes.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.bytes().any(|b| b == b'+' || b == b'#' || b == 0)
}

/// A topic filter a SUBSCRIBE may carry: non-empty, `#` only as the whole
/// last level, `+` only as a whole level, no U+0000, at most 65535 bytes.
/// A `$share/` filter is checked as an ordinary one here (see [`parse_shared`]).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.as_bytes().contains(&0) {
        return false;
    }
    let mut levels = levels(filter).peekable();
    while let Some(level) = levels.next() {
        match level {
            "+" => {}
            "#" => {
                if levels.peek().is_some() {
                    return false;
                }
            }
            _ => {
                if level.bytes().any(|b| b == b'+' || b == b'#') {
                    return false;
                }
            }
        }
    }
    true
}

/// A shared subscription group name: non-empty, no `/`, `+`, `#` or U+0000.
pub fn valid_share_group(group: &str) -> bool {
    !group.is_empty() && !group.bytes().any(|b| b == b'/' || b == b'+' || b == b'#' || b == 0)
}

/// A shared subscription `$share/{group}/{filter}` split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

/// Splits a shared subscription filter. `Ok(None)` for an ordinary filter
/// (anything not starting with `$share/`); an error when the group is empty
/// or holds `+`/`#`, or the filter part is missing or invalid.
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err(if rest.is_empty() || rest.bytes().any(|b| b == b'+' || b == b'#') {
            TopicError::InvalidShareGroup
        } else {
            TopicError::MissingShareFilter
        });
    };
    if !valid_share_group(group) {
        return Err(TopicError::InvalidShareGroup);
    }
    if filter.is_empty() {
        return Err(TopicError::MissingShareFilter);
    }
    if !valid_topic_filter(filter) {
        return Err(TopicError::InvalidTopicFilter);
    }
    Ok(Some(SharedFilter { group, filter }))
}

/// `$share/g/f` → (`f`, `Some(g)`); any other filter, and a `$share/` filter
/// that does not parse, → (filter, `None`).
pub fn split_shared(filter: &str) -> (&str, Option<&str>) {
    match parse_shared(filter) {
        Ok(Some(shared)) => (shared.filter, Some(shared.group)),
        _ => (filter, None),
    }
}

/// Does `filter` match `topic`? The reference matcher every trie is tested
/// against: both arguments are assumed valid (a non-shared topic filter and
/// a topic name).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let (mut f, mut t) = (levels(filter), levels(topic));
    loop {
        match (f.next(), t.next()) {
            // Also past the topic's end: "a/#" matches "a".
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The levels of a topic name or filter, in order: `a//b` has three, the
/// middle one empty; `/` has two.
pub fn levels(topic: &str) -> std::str::Split<'_, char> {
    topic.split('/')
}

/// How many levels `topic` has (separators + 1), counted over the bytes
/// without splitting: a 64 KiB string of slashes is cheap.
pub fn level_count(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// The most levels and bytes a node accepts in a topic name or filter (of a
/// `$share/` filter, the part after `$share/{group}/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_levels: usize,
    pub max_len: usize,
}

/// Which of the [`TopicLimits`] a topic is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicLimit {
    Levels,
    Length,
}

impl TopicLimits {
    /// The limit `topic` is over, if any; the length is checked first.
    pub fn exceeded_by(&self, topic: &str) -> Option<TopicLimit> {
        if topic.len() > self.max_len {
            return Some(TopicLimit::Length);
        }
        (level_count(topic) > self.max_levels).then_some(TopicLimit::Levels)
    }
}

/// Proptest strategies for topics and filters over a small alphabet (so
/// that generated filters and topics often match), shared by the tests of
/// every trie that matches them against [`matches`].
#[cfg(any(test, feature = "strategies"))]
pub mod strategies {
    use proptest::prelude::*;

    /// One literal level: two names, the empty level, a `$` name.
    pub fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just(String::new()), Just("$c".to_string())]
    }

    /// A valid filter of up to four levels of [`level`] or `+`, ending in
    /// `#` at random (always when it would be empty).
    pub fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4), any::<bool>()).prop_map(
            |(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#".into());
                }
                levels.join("/")
            },
        )
    }

    /// A topic name of one to four [`level`]s.
    pub fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5).prop_map(|levels| levels.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "a/b", "/", "a//b", "$SYS/x", " "] {
            assert!(valid_topic_name(ok), "{ok:?} should be valid");
        }
        for bad in ["", "a/+", "#", "a/b#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?} should be invalid");
        }
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        for ok in
            ["a", "a/b", "#", "+", "/", "a//b", "+/+", "a/#", "+/#", "/+", "a/+/b", "$SYS/#", "//", "+/+/#", "a b"]
        {
            assert!(valid_topic_filter(ok), "{ok:?} should be valid");
        }
        for bad in ["", "a#", "#/a", "a/#/b", "a+", "a+/b", "+a/b", "a/b+", "a/##", "++", "a\0", "a/#/"] {
            assert!(!valid_topic_filter(bad), "{bad:?} should be invalid");
        }
        assert!(valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn share_groups() {
        assert!(valid_share_group("g") && valid_share_group("a b") && valid_share_group("$g"));
        for bad in ["", "a/b", "+", "a#", "a\0"] {
            assert!(!valid_share_group(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn shared_filters() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$shared/g/a"), Ok(None));
        assert_eq!(parse_shared("$SYS/#"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(SharedFilter { group: "g", filter: "a/b" })));
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(SharedFilter { group: "g", filter: "#" })));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(SharedFilter { group: "g", filter: "/" })));
        assert_eq!(parse_shared("$share/g/+/x"), Ok(Some(SharedFilter { group: "g", filter: "+/x" })));
        assert_eq!(parse_shared("$share/g"), Err(TopicError::MissingShareFilter));
        assert_eq!(parse_shared("$share/g/"), Err(TopicError::MissingShareFilter));
        assert_eq!(parse_shared("$share/"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share//x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share/+/x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share/#/x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share/a+b/x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share/+"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse_shared("$share/g/a#"), Err(TopicError::InvalidTopicFilter));
        assert_eq!(parse_shared("$share/g/#/a"), Err(TopicError::InvalidTopicFilter));
    }

    #[test]
    fn split_shared_strips_the_group() {
        assert_eq!(split_shared("$share/g/a/+"), ("a/+", Some("g")));
        assert_eq!(split_shared("a/+"), ("a/+", None));
        assert_eq!(split_shared("$share/+/x"), ("$share/+/x", None), "an invalid one stays whole");
    }

    #[test]
    fn matching() {
        // (filter, topic, matches)
        let cases: &[(&str, &str, bool)] = &[
            ("a", "a", true),
            ("b", "a", false),
            ("a", "a/b", false),
            ("a/b", "a", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a/b/c", true),
            ("a/#", "a", true),
            ("a/#", "a/", true),
            ("a/+", "a/", true),
            ("a/+", "a", false),
            ("a/#", "ab", false),
            ("sport/tennis/#", "sport/tennis", true),
            ("sport/tennis/#", "sport/tennis/player1", true),
            ("sport/tennis/#", "sport/tennis/player1/ranking", true),
            ("sport/tennis/#", "sport", false),
            ("#", "x", true),
            ("#", "a", true),
            ("+", "", true),
            ("#", "/", true),
            ("+", "/", false),
            ("+/+", "/", true),
            ("/+", "/", true),
            ("+/x", "/x", true),
            ("a/+/b", "a//b", true),
            ("a//b", "a//b", true),
            ("a/b", "a//b", false),
            ("+/+/+", "a/b/c", true),
            ("+/+/+", "a/b", false),
            ("+/b/#", "a/b/c", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("$SYS/#", "$SYS", true),
            ("#", "$", false),
            ("+/$SYS", "x/$SYS", true),
            ("", "a", false),
        ];
        for &(filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), want, "matches({filter:?}, {topic:?})");
        }
    }

    #[test]
    fn levels_are_split_and_counted_alike() {
        for topic in ["a", "a/b", "/", "//", "a//b", "", "+/#"] {
            assert_eq!(level_count(topic), levels(topic).count(), "{topic:?}");
        }
        assert_eq!(levels("a//b").collect::<Vec<_>>(), ["a", "", "b"]);
    }

    #[test]
    fn topic_limits_count_levels_and_bytes() {
        let limits = TopicLimits { max_levels: 3, max_len: 10 };
        assert_eq!(limits.exceeded_by("a/b/c"), None);
        assert_eq!(limits.exceeded_by("a/b/c/d"), Some(TopicLimit::Levels));
        assert_eq!(limits.exceeded_by("///"), Some(TopicLimit::Levels), "empty levels count");
        assert_eq!(limits.exceeded_by("abcdefghijk"), Some(TopicLimit::Length));
        assert_eq!(limits.exceeded_by(&"/".repeat(65_535)), Some(TopicLimit::Length), "length first");
    }
}
