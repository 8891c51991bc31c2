//! MQTT 3.1.1 topic names and filters: validation, matching and filter containment (for
//! ACLs). Written here rather than taken from rumqttc because rumqttc's `matches` refuses
//! every `$` topic even for an explicit `$SYS/#` filter and slices the topic by byte, which
//! panics on a multi-byte first character.

/// A topic name a client may publish to: 1..=65535 bytes, no wildcards, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A subscription filter: non-empty; `#` only as the whole last level; `+` only as a whole
/// level; no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter`. Wildcards at the first level do not match topics that
/// start with `$` (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
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

/// Whether every topic matched by `filter` is also matched by `allowed` (both valid
/// filters). Used by subscribe ACLs: a client may subscribe to `a/+/c` under an ACL entry
/// `a/#`, but not to `#`.
pub fn filter_within(filter: &str, allowed: &str) -> bool {
    let mut f = filter.split('/');
    let mut a = allowed.split('/');
    loop {
        match (f.next(), a.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_match(filter: &str, topic: &str, expected: bool) {
        assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
    }

    #[test]
    fn matching_table() {
        for (f, t, m) in [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/x/c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("+", "é", true),
            ("+/+", "/x", true),
            ("/+", "/x", true),
            ("a//b", "a//b", true),
            ("a/+", "a/", true),
            ("sport/tennis/#", "sport/tennis", true),
        ] {
            check_match(f, t, m);
        }
    }

    #[test]
    fn validity_table() {
        for (f, ok) in [
            ("#", true),
            ("a/#", true),
            ("a/#/b", false),
            ("a#", false),
            ("+", true),
            ("a/+/b", true),
            ("a+", false),
            ("", false),
            ("a\0", false),
        ] {
            assert_eq!(valid_filter(f), ok, "{f}");
        }
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name(""));
    }

    #[test]
    fn containment_table() {
        for (f, a, within) in [
            ("a/b", "a/#", true),
            ("a/+/c", "a/#", true),
            ("#", "a/#", false),
            ("a/#", "a/+", false),
            ("a/b", "a/+", true),
            ("a/+", "a/+", true),
            ("a/+", "a/b", false),
            ("a/b/c", "a/+", false),
            ("a", "a/#", true),
            ("secret/x", "public/#", false),
        ] {
            assert_eq!(filter_within(f, a), within, "{f} within {a}");
        }
    }
}
