//! Newtypes for the identifiers that cross module boundaries: origins, sequence numbers,
//! offsets, partitions and topic names. Keeping them distinct stops an offset from being
//! passed where a sequence number is expected (they are both `u64` on disk).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The random 64-bit id created with a data directory. Record ids are `(origin, seq)`, so a
/// wiped node that rejoins under the same name never reuses ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Origin(pub u64);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Dense sequence number per (origin, partition), starting at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Seq(pub u64);

/// A replica's local, dense position in a partition, starting at 0.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A partition index within a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The cluster-wide identity of a record; replicas deduplicate on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordId {
    pub origin: Origin,
    pub seq: Seq,
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.origin, self.seq.0)
    }
}

/// Longest topic name accepted.
pub const MAX_TOPIC_NAME: usize = 128;

/// Checks a log topic name: 1..=128 characters of `[A-Za-z0-9._-]`. Names starting with `_`
/// are internal and may only be created by the node itself (`internal = true`).
pub fn validate_topic_name(name: &str, internal: bool) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > MAX_TOPIC_NAME {
        return Err(format!(
            "topic name is {} bytes long; the limit is {MAX_TOPIC_NAME}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    if name.starts_with('_') && !internal {
        return Err(format!(
            "topic name {name:?} starts with '_', which is reserved for internal topics"
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the unit of every timestamp Shoal stores.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, internal: bool, ok: bool) {
        assert_eq!(
            validate_topic_name(name, internal).is_ok(),
            ok,
            "{name:?} internal={internal}"
        );
    }

    #[test]
    fn topic_names() {
        check("telemetry", false, true);
        check("a.b-c_d9", false, true);
        check("", false, false);
        check("has space", false, false);
        check("slash/no", false, false);
        check("_alerts", false, false);
        check("_alerts", true, true);
        check(&"x".repeat(128), false, true);
        check(&"x".repeat(129), false, false);
        check("é", false, false);
    }
}
