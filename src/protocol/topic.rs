//! Topic names, topic filters, shared subscriptions and the reference
//! matcher.
//!
//! MQTT 3.1.1 §4.7 / MQTT 5.0 §4.7 and §4.8.2. A topic name is what a
//! PUBLISH carries (no wildcards); a topic filter is what a SUBSCRIBE carries
//! (`+` matches one whole level, `#` the rest of the topic including its
//! parent level). Both are UTF-8 strings of at most 65535 bytes without
//! U+0000.

/// The longest string MQTT can carry (two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

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
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.as_bytes().contains(&0) {
        return false;
    }
    let mut levels = filter.split('/').peekable();
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
    if group.is_empty() || group.bytes().any(|b| b == b'+' || b == b'#' || b == 0) {
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

/// Does `topic` match `filter`? The reference matcher: both arguments are
/// assumed valid (a topic name and a non-shared topic filter).
///
/// Topics starting with `$` are not matched by filters starting with a
/// wildcard (MQTT-4.7.2-1); `a/#` matches `a`; `+` matches an empty level.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            // Only a remaining "#" (first arm) matches past the topic's end:
            // "a/#" matches "a".
            (Some(_), None) => return false,
            (None, Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(valid_topic_name("a"));
        assert!(valid_topic_name("/"));
        assert!(valid_topic_name("a//b"));
        assert!(valid_topic_name("$SYS/x"));
        assert!(valid_topic_name(" "));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("#"));
        assert!(!valid_topic_name("a/b#"));
        assert!(!valid_topic_name("a\0b"));
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        for ok in ["#", "+", "/", "a//b", "+/+", "a/#", "+/#", "/+", "a/+/b", "$SYS/#", "//", "+/+/#", "a b"] {
            assert!(valid_topic_filter(ok), "{ok:?} should be valid");
        }
        for bad in ["", "a#", "#/a", "a/#/b", "a+", "+a/b", "a/b+", "a/##", "++", "a\0", "a/#/"] {
            assert!(!valid_topic_filter(bad), "{bad:?} should be invalid");
        }
        assert!(valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_filter(&"x".repeat(MAX_TOPIC_LEN + 1)));
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
    fn matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("a", "a", true),
            ("a", "b", false),
            ("a/b", "a", false),
            ("a", "a/b", false),
            ("a/b", "a/+", true),
            ("a/b/c", "a/+", false),
            ("a/b/c", "a/#", true),
            ("a", "a/#", true),
            ("a/", "a/#", true),
            ("a/", "a/+", true),
            ("a", "a/+", false),
            ("ab", "a/#", false),
            ("sport/tennis", "sport/tennis/#", true),
            ("sport/tennis/player1", "sport/tennis/#", true),
            ("sport/tennis/player1/ranking", "sport/tennis/#", true),
            ("sport", "sport/tennis/#", false),
            ("x", "#", true),
            ("/", "#", true),
            ("/", "+", false),
            ("/", "+/+", true),
            ("/", "/+", true),
            ("/x", "+/x", true),
            ("a//b", "a/+/b", true),
            ("a//b", "a//b", true),
            ("a//b", "a/b", false),
            ("a/b/c", "+/+/+", true),
            ("a/b", "+/+/+", false),
            ("a/b/c", "+/b/#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("$SYS/x", "$SYS/+", true),
            ("$SYS", "$SYS/#", true),
            ("$", "#", false),
            ("x/$SYS", "+/$SYS", true),
            ("a", "", false),
        ];
        for &(topic, filter, want) in cases {
            assert_eq!(matches(topic, filter), want, "matches({topic:?}, {filter:?})");
        }
    }
}
