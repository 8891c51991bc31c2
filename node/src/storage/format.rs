//! On-disk formats: every value Shoal writes to redb. Each value is one format-version byte
//! followed by a postcard body. Architecture invariant: these types only grow by adding new
//! versions; a field is never reordered, removed or retyped (postcard is positional), and the
//! golden tests below pin the bytes of every type.

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::types::RecordId;

/// Version byte of every value type below. Bump per type when its layout changes and keep
/// the old decoder.
pub const FORMAT_V1: u8 = 1;

/// Identifies a Shoal data directory's redb file (stored under `meta/magic`).
pub const MAGIC: &[u8] = b"shoal-data-dir";

/// Version of the data directory as a whole (tables and their key types).
pub const DATA_DIR_VERSION: u8 = 1;

/// A stored record. Offsets are the log table's key, not part of the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: RecordId,
    /// When the reading was taken (device clock, or ingest time when the device gave none).
    pub event_time_ms: u64,
    /// When the coordinator received the record.
    pub ingest_time_ms: u64,
    /// Partition key (the MQTT topic under the default route).
    pub key: Bytes,
    /// The MQTT topic the record came from, or the subject given at HTTP ingest.
    pub subject: String,
    pub payload: Bytes,
    /// Small headers; the MQTT server stores the publish QoS under [`HEADER_MQTT_QOS`].
    pub headers: Vec<(String, Bytes)>,
}

/// Header carrying the QoS a record was published with over MQTT (one byte, `1` or `2`;
/// absent means QoS 0 or not from MQTT).
pub const HEADER_MQTT_QOS: &str = "mqtt.qos";

impl Record {
    /// The MQTT QoS the record was published with (0 when absent).
    pub fn mqtt_qos(&self) -> u8 {
        self.headers
            .iter()
            .find(|(k, _)| k == HEADER_MQTT_QOS)
            .and_then(|(_, v)| v.first().copied())
            .unwrap_or(0)
            .min(2)
    }
}

/// How many replicas must hold a record durably before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Acks {
    Local,
    #[default]
    Quorum,
    All,
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Acks::Local),
            "quorum" => Ok(Acks::Quorum),
            "all" => Ok(Acks::All),
            other => Err(format!(
                "unknown acks policy {other:?}; use local, quorum or all"
            )),
        }
    }
}

/// A topic's persisted configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub acks: Acks,
    /// Records older than this (by ingest time) are deleted; `None` keeps them forever.
    pub retention_ms: Option<u64>,
    /// Each partition is trimmed from its start to stay under this many bytes.
    pub retention_bytes: Option<u64>,
    pub created_ms: u64,
}

/// Per-partition bookkeeping, committed in the same transaction as the appends it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// First offset still stored (retention moves it forward).
    pub log_start: u64,
    /// Offset the next append gets.
    pub next_offset: u64,
    /// Stored bytes (values plus 8-byte keys) between `log_start` and `next_offset`.
    pub bytes: u64,
    /// Version vector: origin -> highest contiguous seq, sorted by origin.
    pub version_vector: Vec<(u64, u64)>,
}

/// A retained MQTT message (kept outside the log so retention of the log does not drop it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedMessage {
    pub topic: String,
    pub qos: u8,
    pub payload: Bytes,
    pub stored_ms: u64,
}

/// A persistent (clean session = 0) MQTT session: its subscriptions and, per log partition,
/// the next offset it has not had acknowledged. Messages for an offline subscriber are not
/// copied anywhere: they are the log itself, read again from these cursors on reconnect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub subscriptions: Vec<(String, u8)>,
    pub cursors: Vec<(String, u32, u64)>,
    pub updated_ms: u64,
}

/// What the server remembers about an inbound QoS 1/2 packet id of a session, so that a
/// retransmitted PUBLISH (DUP) is not stored twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundEntry {
    /// Hash of topic and payload of the stored PUBLISH.
    pub hash: u64,
    /// QoS 2: the PUBREL has not arrived yet.
    pub awaiting_release: bool,
}

/// Where a consumer starts on its first deploy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Beginning,
    Latest,
}

/// A deployed WebAssembly consumer. The module bytes are stored separately under their
/// SHA-256 so redeploying the same module stores nothing new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerSpec {
    pub name: String,
    /// Bumped on every deploy under the same name; the checkpoint carries over.
    pub version: u64,
    pub topic: String,
    /// MQTT-style filter on record subjects.
    pub filter: String,
    /// JSON config handed to the module's `init`.
    pub config: String,
    pub module_sha256: String,
    pub start: StartFrom,
    /// Alerts of this consumer are POSTed here (JSON, with an idempotency key).
    pub webhook: Option<String>,
    pub deployed_ms: u64,
}

/// A consumer's position in one partition, committed with the batch's state and outputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next offset to process.
    pub offset: u64,
    /// Version vector of the records processed (origin -> highest seq seen).
    pub version_vector: Vec<(u64, u64)>,
    pub updated_ms: u64,
}

/// Errors decoding a stored value.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("empty value")]
    Empty,
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("malformed value: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

/// Encodes `value` as `[FORMAT_V1] ++ postcard(value)`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V1);
    // postcard into a Vec cannot fail for these types (no maps with non-string keys, no
    // unsized sequences), so an error here is a programming bug worth surfacing loudly.
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(e) => unreachable!("postcard encoding of a storage type failed: {e}"),
    }
}

/// Decodes a value written by [`encode`], rejecting unknown versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let (&version, body) = bytes.split_first().ok_or(FormatError::Empty)?;
    if version != FORMAT_V1 {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_V1,
        });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(body)?;
    if !rest.is_empty() {
        return Err(FormatError::Trailing(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Origin, Seq};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes: if one of these changes, the on-disk format changed. Add a new version
    /// instead of editing the expectation.
    fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T, golden: &str) {
        let bytes = encode(v);
        assert_eq!(hex(&bytes), golden, "golden bytes of {v:?}");
        let back: T = decode(&bytes).expect("decodes");
        assert_eq!(&back, v);
    }

    #[test]
    fn golden_record() {
        check(
            &Record {
                id: RecordId {
                    origin: Origin(0x0102030405060708),
                    seq: Seq(300),
                },
                event_time_ms: 1_700_000_000_000,
                ingest_time_ms: 1_700_000_000_001,
                key: Bytes::from_static(b"k"),
                subject: "s/1".into(),
                payload: Bytes::from_static(b"21.5"),
                headers: vec![(HEADER_MQTT_QOS.into(), Bytes::from_static(&[1]))],
            },
            "01888e98a8c0e0808101ac0280d095ffbc3181d095ffbc31016b03732f31043231\
             2e3501086d7174742e716f730101",
        );
    }

    #[test]
    fn golden_topic_config() {
        check(
            &TopicConfig {
                name: "telemetry".into(),
                partitions: 8,
                replication_factor: 3,
                acks: Acks::Quorum,
                retention_ms: Some(604_800_000),
                retention_bytes: None,
                created_ms: 1,
            },
            "010974656c656d65747279080301018088b2a0020001",
        );
    }

    #[test]
    fn golden_partition_meta() {
        check(
            &PartitionMeta {
                log_start: 2,
                next_offset: 10,
                bytes: 1000,
                version_vector: vec![(7, 9)],
            },
            "01020ae807010709",
        );
    }

    #[test]
    fn golden_retained_session_inbound() {
        check(
            &RetainedMessage {
                topic: "a/b".into(),
                qos: 1,
                payload: Bytes::from_static(b"x"),
                stored_ms: 5,
            },
            "0103612f62010178 05".replace(' ', "").as_str(),
        );
        check(
            &SessionState {
                subscriptions: vec![("a/#".into(), 1)],
                cursors: vec![("telemetry".into(), 3, 42)],
                updated_ms: 9,
            },
            "010103612f23010109 74656c656d65747279032a09"
                .replace(' ', "")
                .as_str(),
        );
        check(
            &InboundEntry {
                hash: 1,
                awaiting_release: true,
            },
            "010101",
        );
    }

    #[test]
    fn golden_consumer_types() {
        check(
            &ConsumerSpec {
                name: "z".into(),
                version: 2,
                topic: "t".into(),
                filter: "#".into(),
                config: "{}".into(),
                module_sha256: "ab".into(),
                start: StartFrom::Latest,
                webhook: None,
                deployed_ms: 3,
            },
            "01017a020174012302 7b7d02616201 0003"
                .replace(' ', "")
                .as_str(),
        );
        check(
            &Checkpoint {
                offset: 5,
                version_vector: vec![(1, 5)],
                updated_ms: 6,
            },
            "0105010105 06".replace(' ', "").as_str(),
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(
            decode::<PartitionMeta>(&[]),
            Err(FormatError::Empty)
        ));
        assert!(matches!(
            decode::<PartitionMeta>(&[9, 0]),
            Err(FormatError::UnsupportedVersion { found: 9, .. })
        ));
        assert!(matches!(
            decode::<PartitionMeta>(&[1, 0]),
            Err(FormatError::Malformed(_))
        ));
        let mut ok = encode(&PartitionMeta::default());
        ok.push(0);
        assert!(matches!(
            decode::<PartitionMeta>(&ok),
            Err(FormatError::Trailing(1))
        ));
    }
}
