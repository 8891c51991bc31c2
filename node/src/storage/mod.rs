//! Storage: the only code that opens redb. One redb file per node holds every topic's
//! partition logs (one table per partition, `u64` offset -> versioned record), their
//! bookkeeping, retained MQTT messages, persistent MQTT sessions and inbound packet-id
//! state.
//!
//! Architecture invariant: all writes go through one dedicated writer thread fed by a bounded
//! queue ([`writer`]), which group-commits many requests from many connections in one write
//! transaction and one fsync, and only then tells each requester that its operations are
//! durable. Reads use MVCC snapshots and never block the writer; callers on async workers
//! run them through `spawn_blocking`.

pub mod format;
mod writer;

pub(crate) use writer::vv_get;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use format::{
    Acks, Checkpoint, ConsumerSpec, InboundEntry, PartitionMeta, Record, RetainedMessage,
    SessionState, StartFrom, TopicConfig,
};

use crate::types::{Offset, Origin, PartitionId, RecordId};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const PARTITIONS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("partitions");
/// The origin this node writes a partition's new records under, when it is not the node's
/// origin: after a handoff dropped every record of its previous own stream, a fresh origin
/// keeps the version vector truthful (it never claims ids this node no longer holds).
const OWN_ORIGINS: TableDefinition<(&str, u32), u64> = TableDefinition::new("own_origins");
/// Alert ids present in `_alerts` (value: when first stored), so an alert raised again after
/// a consumer failover is not appended twice.
const ALERT_IDS: TableDefinition<&[u8], u64> = TableDefinition::new("alert_ids");
/// Every origin this node ever wrote under (current and handed-off streams).
const OWN_ORIGIN_SET: TableDefinition<u64, ()> = TableDefinition::new("own_origin_set");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("mqtt_retained");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("mqtt_sessions");
const INBOUND: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("mqtt_inbound");
const CONSUMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("consumers");
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("consumer_modules");
const CHECKPOINTS: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("consumer_checkpoints");
const CONSUMER_STATE: TableDefinition<(&str, u32, &[u8]), &[u8]> =
    TableDefinition::new("consumer_state");
/// Idempotent producers: (topic, producer) -> committed sequence ranges.
const PRODUCERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("producers");
/// Delivery cursors of side tasks (webhooks): name -> next offset.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");

/// File name of the node's database inside its data directory.
pub const DB_FILE: &str = "shoal.redb";

fn log_table_name(topic: &str, partition: u32) -> String {
    format!("log/{topic}/{partition}")
}

/// Tuning for [`Storage::open`].
#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// redb page cache; redb's own default (1 GiB) is far too much for an edge box.
    pub cache_bytes: usize,
    /// Capacity of the writer's request queue. A full queue makes appenders wait, which
    /// reaches MQTT clients as slower PUBACKs (backpressure), never as unbounded memory.
    pub queue_depth: usize,
    /// Most operations folded into one write transaction.
    pub max_batch_ops: usize,
}

impl StorageConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StorageConfig {
            data_dir: data_dir.into(),
            cache_bytes: 32 << 20,
            queue_depth: 4096,
            max_batch_ops: 8192,
        }
    }
}

/// A record to append; the writer assigns its id, offset and ingest time.
#[derive(Clone, Debug)]
pub struct NewRecord {
    pub key: Bytes,
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, Bytes)>,
    /// Device-supplied event time; `None` means "use the ingest time".
    pub event_time_ms: Option<u64>,
}

/// One operation of a write request. All operations of all requests folded into one
/// transaction commit (or fail) together.
#[derive(Clone, Debug)]
pub enum Op {
    Append {
        topic: Arc<str>,
        partition: PartitionId,
        record: NewRecord,
    },
    /// Append unless `(topic, producer, sequence)` was appended before: idempotent ingest
    /// for re-runs of a load (the outcome is then [`OpOutcome::Duplicate`]).
    AppendOnce {
        topic: Arc<str>,
        partition: PartitionId,
        record: NewRecord,
        producer: Arc<str>,
        sequence: u64,
    },
    /// Records replicated from a peer, with their ids (PROTOCOL.md I3): a record is appended
    /// when its seq is the next of its origin here, skipped when already held, and stops its
    /// origin at a gap. The outcome is [`OpOutcome::Replicated`].
    Replicate {
        topic: Arc<str>,
        partition: PartitionId,
        records: Vec<Record>,
    },
    /// A peer no longer has `origin`'s seqs below `below` (retention): count them as held
    /// here too, so the next one it sends is accepted (I3 "less what retention deleted").
    SkipTrimmed {
        topic: Arc<str>,
        partition: PartitionId,
        origin: u64,
        below: u64,
    },
    /// Handoff (PROTOCOL.md I6): delete the records every current replica holds, i.e.
    /// whose seq is at most `covered[origin]`. Origins left without records leave the
    /// version vector, except this node's own (its seqs must keep increasing).
    DropCovered {
        topic: Arc<str>,
        partition: PartitionId,
        covered: Vec<(u64, u64)>,
    },
    CreateTopic(TopicConfig),
    /// Store (`Some`) or delete (`None`) the retained message of an MQTT topic.
    SetRetained {
        topic: String,
        message: Option<RetainedMessage>,
    },
    PutSession {
        client_id: String,
        state: SessionState,
    },
    DeleteSession {
        client_id: String,
    },
    PutInbound {
        client_id: String,
        pkid: u16,
        entry: InboundEntry,
    },
    RemoveInbound {
        client_id: String,
        pkid: u16,
    },
    /// Apply every topic's retention limits as of `now_ms`.
    Retention {
        now_ms: u64,
    },
    /// Store a module's bytes under their SHA-256 (hex).
    PutModule {
        sha256: String,
        bytes: Bytes,
    },
    PutConsumer(ConsumerSpec),
    /// Remove a consumer with its checkpoints and state.
    DeleteConsumer {
        name: String,
    },
    /// A consumer's batch: its new checkpoint and state changes (the batch's outputs are
    /// `Append`s in the same request, so all commit together).
    ConsumerCommit {
        name: String,
        partition: u32,
        checkpoint: Checkpoint,
        state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    },
    SetCursor {
        name: String,
        offset: u64,
    },
}

/// What one operation did, in request order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutcome {
    Appended {
        partition: PartitionId,
        offset: Offset,
        id: RecordId,
    },
    Done,
    /// Retention deleted this many records in total.
    Trimmed(u64),
    /// An `AppendOnce` whose sequence was already committed: nothing written.
    Duplicate,
    /// A `Replicate`: the partition's version vector after it, and the origins that stopped
    /// at a gap (the sender must resend them from `version_vector[origin] + 1`).
    Replicated {
        version_vector: Vec<(u64, u64)>,
        gaps: Vec<u64>,
    },
}

/// A record as committed, handed to live subscribers right after its commit.
#[derive(Clone, Debug)]
pub struct Committed {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    pub offset: Offset,
    pub record: Arc<Record>,
}

/// The records of one write transaction, in commit order.
pub type CommittedBatch = Arc<Vec<Committed>>;

/// Errors of storage operations after open.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("topic {0:?} does not exist; create it first (shoal topic create {0})")]
    UnknownTopic(String),
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("not acknowledged: {0}")]
    NotReplicated(String),
    #[error("storage is shutting down; the operation was not written")]
    ShuttingDown,
    #[error("storage stopped after an I/O error and refuses writes until restart: {0}")]
    Failed(String),
    #[error("database error: {0}")]
    Db(String),
    #[error("corrupt value in table {table}: {source}")]
    Corrupt {
        table: String,
        source: format::FormatError,
    },
}

impl StorageError {
    /// True when the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::ShuttingDown)
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self { StorageError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::StorageError,
    redb::CommitError,
    redb::TableError,
    redb::SetDurabilityError
);

/// Errors opening a data directory. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{path} is not a Shoal data directory: it is not empty ({found}) and has no {DB_FILE}; \
         pick an empty or new directory with --data-dir"
    )]
    NotADataDir { path: PathBuf, found: String },
    #[error(
        "{path} is not a Shoal database (it has no Shoal marker); it may belong to another \
         program; move it away or pick another --data-dir"
    )]
    Foreign { path: PathBuf },
    #[error(
        "{path} was written by a newer Shoal (data directory version {found}, this build reads \
         {supported}); upgrade shoal"
    )]
    NewerFormat {
        path: PathBuf,
        found: u8,
        supported: u8,
    },
    #[error("{path} is locked by another process (is another shoal running with this --data-dir?)")]
    Locked { path: PathBuf },
    #[error("{path} is corrupt or not a redb database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot use data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Inner {
    db: Arc<Database>,
    origin: Origin,
    tx: mpsc::Sender<writer::Request>,
    topics: Arc<RwLock<HashMap<String, TopicConfig>>>,
    committed: broadcast::Sender<CommittedBatch>,
    commits: watch::Receiver<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    own_set: Arc<RwLock<std::collections::HashSet<u64>>>,
}

/// Handle to the node's storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.inner.path)
            .field("origin", &self.inner.origin)
            .finish()
    }
}

/// A page of records read from one partition.
#[derive(Clone, Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<(Offset, Record)>,
    /// First offset still stored.
    pub log_start: Offset,
    /// Offset the next append will get (the end of the log).
    pub next_offset: Offset,
}

impl Storage {
    /// Opens (or creates) the data directory. Refuses a foreign, corrupt, locked or newer
    /// directory with an [`OpenError`] naming the path.
    pub fn open(config: StorageConfig) -> Result<Storage, OpenError> {
        let dir = &config.data_dir;
        let path = dir.join(DB_FILE);
        let io = |source| OpenError::Io {
            path: dir.clone(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(io(std::io::Error::other("exists and is not a directory")));
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let fresh = !path.exists();
        if fresh {
            let mut others = std::fs::read_dir(dir)
                .map_err(io)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            if !others.is_empty() {
                others.sort();
                others.truncate(3);
                return Err(OpenError::NotADataDir {
                    path: dir.clone(),
                    found: format!("contains {}", others.join(", ")),
                });
            }
        }
        let db = Database::builder()
            .set_cache_size(config.cache_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    OpenError::Locked { path: path.clone() }
                }
                redb::DatabaseError::Storage(redb::StorageError::Io(source))
                    if source.kind() != std::io::ErrorKind::InvalidData =>
                {
                    OpenError::Io {
                        path: path.clone(),
                        source,
                    }
                }
                other => OpenError::Corrupt {
                    path: path.clone(),
                    detail: other.to_string(),
                },
            })?;
        let corrupt = |detail: String| OpenError::Corrupt {
            path: path.clone(),
            detail,
        };
        let origin = init_meta(&db, fresh, &path).map_err(|e| match e {
            InitError::Open(e) => e,
            InitError::Db(d) => corrupt(d),
        })?;
        let (topics, parts) = load_state(&db).map_err(|e| corrupt(e.to_string()))?;
        let (own, mut own_set) = load_own_origins(&db).map_err(|e| corrupt(e.to_string()))?;
        own_set.insert(origin.0);
        let own_set = Arc::new(RwLock::new(own_set));
        let db = Arc::new(db);
        let topics = Arc::new(RwLock::new(topics));
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let (committed, _) = broadcast::channel(1024);
        let (commits_tx, commits) = watch::channel(0u64);
        let state = writer::WriterState {
            db: db.clone(),
            origin,
            topics: topics.clone(),
            parts,
            committed: committed.clone(),
            commits: commits_tx,
            max_batch_ops: config.max_batch_ops.max(1),
            failed: None,
            producers: HashMap::new(),
            own,
            own_set: own_set.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("shoal-storage-writer".into())
            .spawn(move || writer::run(state, rx))
            .map_err(io)?;
        Ok(Storage {
            inner: Arc::new(Inner {
                db,
                origin,
                tx,
                topics,
                committed,
                commits,
                writer: Mutex::new(Some(handle)),
                path,
                own_set,
            }),
        })
    }

    /// This data directory's origin id.
    pub fn origin(&self) -> Origin {
        self.inner.origin
    }

    /// Path of the redb file.
    /// Whether `origin` is one this node writes (or wrote) records under: its data
    /// directory's origin, or a partition's fresh origin after a handoff.
    pub fn is_own(&self, origin: u64) -> bool {
        origin == self.inner.origin.0
            || self
                .inner
                .own_set
                .read()
                .map(|s| s.contains(&origin))
                .unwrap_or(false)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues `ops` for the writer and returns as soon as they are queued; the receiver
    /// resolves once they are durable (or failed). Waits while the queue is full.
    pub async fn enqueue(&self, ops: Vec<Op>) -> Result<PendingWrite, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(writer::Request { ops, reply })
            .await
            .map_err(|_| StorageError::ShuttingDown)?;
        Ok(PendingWrite(rx))
    }

    /// Writes `ops` and waits until they are durable.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpOutcome>, StorageError> {
        self.enqueue(ops).await?.await
    }

    /// Creates a topic; fails with [`StorageError::TopicExists`] if it exists.
    pub async fn create_topic(&self, config: TopicConfig) -> Result<TopicConfig, StorageError> {
        self.write(vec![Op::CreateTopic(config.clone())]).await?;
        Ok(config)
    }

    pub fn topic(&self, name: &str) -> Option<TopicConfig> {
        self.inner
            .topics
            .read()
            .ok()
            .and_then(|t| t.get(name).cloned())
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        let mut v: Vec<TopicConfig> = self
            .inner
            .topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Live feed of committed records. A receiver that falls behind gets `Lagged` and must
    /// catch up from the log by offset.
    pub fn subscribe_committed(&self) -> broadcast::Receiver<CommittedBatch> {
        self.inner.committed.subscribe()
    }

    /// A counter bumped after every commit (for followers that re-read by offset).
    pub fn watch_commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    fn check_partition(&self, topic: &str, partition: PartitionId) -> Result<(), StorageError> {
        let cfg = self
            .topic(topic)
            .ok_or_else(|| StorageError::UnknownTopic(topic.to_string()))?;
        if partition.0 >= cfg.partitions {
            return Err(StorageError::UnknownPartition {
                topic: topic.to_string(),
                partition: partition.0,
                partitions: cfg.partitions,
            });
        }
        Ok(())
    }

    /// Bookkeeping of one partition (blocking; call from `spawn_blocking` on async code).
    pub fn partition_meta(
        &self,
        topic: &str,
        partition: PartitionId,
    ) -> Result<PartitionMeta, StorageError> {
        self.check_partition(topic, partition)?;
        let rtx = self.inner.db.begin_read()?;
        read_partition_meta(&rtx, topic, partition.0)
    }

    /// Reads up to `limit` records (and about `max_bytes`) from `from` on (blocking). An
    /// offset before the log start reads from the log start.
    pub fn read(
        &self,
        topic: &str,
        partition: PartitionId,
        from: Offset,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, StorageError> {
        self.check_partition(topic, partition)?;
        let rtx = self.inner.db.begin_read()?;
        let meta = read_partition_meta(&rtx, topic, partition.0)?;
        let mut batch = ReadBatch {
            records: Vec::new(),
            log_start: Offset(meta.log_start),
            next_offset: Offset(meta.next_offset),
        };
        let name = log_table_name(topic, partition.0);
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
        let Some(table) = open_opt(&rtx, def)? else {
            return Ok(batch);
        };
        let start = from.0.max(meta.log_start);
        let mut bytes = 0usize;
        for item in table.range(start..)? {
            if batch.records.len() >= limit || (bytes >= max_bytes && !batch.records.is_empty()) {
                break;
            }
            let (k, v) = item?;
            bytes += v.value().len();
            let record = decode_in(&name, v.value())?;
            batch.records.push((Offset(k.value()), record));
        }
        Ok(batch)
    }

    /// Where a push to a replica holding `have` must start: the lowest offset of a record
    /// it lacks, found by scanning back from the end of the log (what a replica lacks is
    /// usually recent). Records of one origin are in seq order along the log (I3), so the
    /// scan stops once it has passed the first missing seq of every lacking origin
    /// (blocking).
    pub fn resume_offset(
        &self,
        topic: &str,
        partition: PartitionId,
        have: &[(u64, u64)],
    ) -> Result<Offset, StorageError> {
        self.check_partition(topic, partition)?;
        let rtx = self.inner.db.begin_read()?;
        let meta = read_partition_meta(&rtx, topic, partition.0)?;
        let mut need: HashMap<u64, u64> = meta
            .version_vector
            .iter()
            .filter(|(o, s)| *s > crate::replication::core::vv_get(have, *o))
            .map(|(o, _)| (*o, crate::replication::core::vv_get(have, *o) + 1))
            .collect();
        if need.is_empty() {
            return Ok(Offset(meta.next_offset));
        }
        let name = log_table_name(topic, partition.0);
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
        let Some(table) = open_opt(&rtx, def)? else {
            return Ok(Offset(meta.log_start));
        };
        for item in table.range(meta.log_start..)?.rev() {
            let (k, v) = item?;
            let record: Record = decode_in(&name, v.value())?;
            let o = record.id.origin.0;
            if need.get(&o).is_some_and(|first| record.id.seq.0 <= *first) {
                need.remove(&o);
                if need.is_empty() {
                    return Ok(Offset(k.value()));
                }
            }
        }
        Ok(Offset(meta.log_start))
    }

    /// Records of a partition that a replica with version vector `have` lacks (`seq >
    /// have[origin]`), in log order from offset `from`, at most `limit` records or about
    /// `max_bytes`; `only` restricts them to one origin. Returns them with the offset to
    /// continue from, or `None` at the end of the log (blocking; anti-entropy and resends).
    #[allow(clippy::too_many_arguments)]
    pub fn scan_missing(
        &self,
        topic: &str,
        partition: PartitionId,
        from: Offset,
        have: &[(u64, u64)],
        only: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, Option<Offset>), StorageError> {
        self.check_partition(topic, partition)?;
        let rtx = self.inner.db.begin_read()?;
        let meta = read_partition_meta(&rtx, topic, partition.0)?;
        let name = log_table_name(topic, partition.0);
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
        let Some(table) = open_opt(&rtx, def)? else {
            return Ok((Vec::new(), None));
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table.range(from.0.max(meta.log_start)..)? {
            let (k, v) = item?;
            if out.len() >= limit || bytes >= max_bytes {
                return Ok((out, Some(Offset(k.value()))));
            }
            let record: Record = decode_in(&name, v.value())?;
            let o = record.id.origin.0;
            if only.is_some_and(|x| x != o)
                || !crate::replication::core::missing(have, o, record.id.seq.0)
            {
                continue;
            }
            bytes += v.value().len();
            out.push(record);
        }
        Ok((out, None))
    }

    /// The first offset whose record was ingested at or after `time_ms` (blocking). Offsets
    /// are assigned in commit order, so ingest time never decreases along a partition on a
    /// single node; this is a binary search over the log.
    pub fn offset_for_time(
        &self,
        topic: &str,
        partition: PartitionId,
        time_ms: u64,
    ) -> Result<Offset, StorageError> {
        self.check_partition(topic, partition)?;
        let rtx = self.inner.db.begin_read()?;
        let meta = read_partition_meta(&rtx, topic, partition.0)?;
        let name = log_table_name(topic, partition.0);
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
        let Some(table) = open_opt(&rtx, def)? else {
            return Ok(Offset(meta.next_offset));
        };
        let (mut lo, mut hi) = (meta.log_start, meta.next_offset);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let ingest = match table.get(mid)? {
                Some(v) => decode_in::<Record>(&name, v.value())?.ingest_time_ms,
                // Trimmed concurrently: treat as older than anything.
                None => 0,
            };
            if ingest < time_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(Offset(lo))
    }

    /// Every retained message, without tombstones (blocking); the MQTT layer filters them.
    pub fn retained(&self) -> Result<Vec<RetainedMessage>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, RETAINED)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            let m: RetainedMessage = decode_in("mqtt_retained", v.value())?;
            // An empty payload is a tombstone: the message was deleted at `stored_ms`.
            if !m.payload.is_empty() {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The retained entry of one MQTT topic, tombstones (empty payload) included, for
    /// last-writer-wins across nodes (blocking).
    pub fn retained_entry(&self, topic: &str) -> Result<Option<RetainedMessage>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, RETAINED)? else {
            return Ok(None);
        };
        let Some(v) = table.get(topic)? else {
            return Ok(None);
        };
        let m = decode_in("mqtt_retained", v.value())?;
        Ok(Some(m))
    }

    /// A persistent MQTT session, if one is stored (blocking).
    pub fn session(&self, client_id: &str) -> Result<Option<SessionState>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, SESSIONS)? else {
            return Ok(None);
        };
        match table.get(client_id)? {
            Some(v) => Ok(Some(decode_in("mqtt_sessions", v.value())?)),
            None => Ok(None),
        }
    }

    /// Inbound packet-id state of a session (blocking).
    pub fn inbound(&self, client_id: &str) -> Result<Vec<(u16, InboundEntry)>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, INBOUND)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in table.range((client_id, 0u16)..=(client_id, u16::MAX))? {
            let (k, v) = item?;
            let entry = decode_in("mqtt_inbound", v.value())?;
            out.push((k.value().1, entry));
        }
        Ok(out)
    }

    /// Every deployed consumer (blocking).
    pub fn consumers(&self) -> Result<Vec<ConsumerSpec>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, CONSUMERS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(decode_in("consumers", v.value())?);
        }
        Ok(out)
    }

    /// A stored module's bytes (blocking).
    pub fn module(&self, sha256: &str) -> Result<Option<Bytes>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, MODULES)? else {
            return Ok(None);
        };
        Ok(table
            .get(sha256)?
            .map(|v| Bytes::copy_from_slice(v.value())))
    }

    /// A consumer's checkpoint in one partition (blocking).
    pub fn checkpoint(
        &self,
        name: &str,
        partition: u32,
    ) -> Result<Option<Checkpoint>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, CHECKPOINTS)? else {
            return Ok(None);
        };
        match table.get((name, partition))? {
            Some(v) => Ok(Some(decode_in("consumer_checkpoints", v.value())?)),
            None => Ok(None),
        }
    }

    /// One key of a consumer's state in a partition (blocking).
    pub fn consumer_state(
        &self,
        name: &str,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, CONSUMER_STATE)? else {
            return Ok(None);
        };
        Ok(table
            .get((name, partition, key))?
            .map(|v| v.value().to_vec()))
    }

    /// A side task's delivery cursor (blocking).
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, StorageError> {
        let rtx = self.inner.db.begin_read()?;
        let Some(table) = open_opt(&rtx, CURSORS)? else {
            return Ok(None);
        };
        Ok(table.get(name)?.map(|v| v.value()))
    }

    /// Stops accepting writes, commits everything already queued, and joins the writer.
    /// Requests that arrive after that fail with [`StorageError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        // A request with no operations is the stop marker (see `writer::run`).
        if self
            .inner
            .tx
            .send(writer::Request {
                ops: Vec::new(),
                reply,
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// Resolves once the operations of one request are durable.
pub struct PendingWrite(oneshot::Receiver<Result<Vec<OpOutcome>, StorageError>>);

impl std::future::Future for PendingWrite {
    type Output = Result<Vec<OpOutcome>, StorageError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StorageError::ShuttingDown)))
    }
}

/// Opens a table for reading; `None` when it was never created (nothing written yet).
fn open_opt<K: redb::Key + 'static, V: redb::Value + 'static>(
    rtx: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StorageError> {
    match rtx.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn decode_in<T: serde::de::DeserializeOwned>(
    table: &str,
    v: &[u8],
) -> Result<T, StorageError> {
    format::decode(v).map_err(|source| StorageError::Corrupt {
        table: table.to_string(),
        source,
    })
}

enum InitError {
    Open(OpenError),
    Db(String),
}

macro_rules! init_err {
    ($($t:ty),*) => {$(
        impl From<$t> for InitError {
            fn from(e: $t) -> Self { InitError::Db(e.to_string()) }
        }
    )*};
}
init_err!(
    redb::TransactionError,
    redb::StorageError,
    redb::CommitError,
    redb::TableError
);

/// Writes the marker, version and origin into a fresh file, or checks them in an old one.
fn init_meta(db: &Database, fresh: bool, path: &Path) -> Result<Origin, InitError> {
    if !fresh {
        let rtx = db.begin_read()?;
        let table = match rtx.open_table(META) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => {
                return Err(InitError::Open(OpenError::Foreign {
                    path: path.to_path_buf(),
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let magic = table.get("magic")?.map(|v| v.value().to_vec());
        if magic.as_deref() != Some(format::MAGIC) {
            return Err(InitError::Open(OpenError::Foreign {
                path: path.to_path_buf(),
            }));
        }
        let version = table
            .get("version")?
            .and_then(|v| v.value().first().copied())
            .unwrap_or(0);
        if version > format::DATA_DIR_VERSION {
            return Err(InitError::Open(OpenError::NewerFormat {
                path: path.to_path_buf(),
                found: version,
                supported: format::DATA_DIR_VERSION,
            }));
        }
        let origin = table
            .get("origin")?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .ok_or_else(|| InitError::Db("meta/origin is missing or malformed".into()))?;
        return Ok(Origin(u64::from_be_bytes(origin)));
    }
    let origin = Origin(rand::random::<u64>());
    let wtx = db.begin_write()?;
    {
        let mut t = wtx.open_table(META)?;
        t.insert("magic", format::MAGIC)?;
        t.insert("version", &[format::DATA_DIR_VERSION][..])?;
        t.insert("origin", &origin.0.to_be_bytes()[..])?;
        t.insert("created_ms", &crate::types::now_ms().to_be_bytes()[..])?;
        wtx.open_table(TOPICS)?;
        wtx.open_table(PARTITIONS)?;
    }
    wtx.commit()?;
    Ok(origin)
}

type LoadedState = (
    HashMap<String, TopicConfig>,
    HashMap<(Arc<str>, u32), PartitionMeta>,
);

fn load_state(db: &Database) -> Result<LoadedState, StorageError> {
    let rtx = db.begin_read()?;
    let mut topics = HashMap::new();
    let mut parts = HashMap::new();
    let table = rtx.open_table(TOPICS)?;
    for item in table.iter()? {
        let (k, v) = item?;
        let cfg: TopicConfig = decode_in("topics", v.value())?;
        let name: Arc<str> = Arc::from(k.value());
        for p in 0..cfg.partitions {
            parts.insert((name.clone(), p), read_partition_meta(&rtx, &name, p)?);
        }
        topics.insert(k.value().to_string(), cfg);
    }
    Ok((topics, parts))
}

fn read_producer(
    rtx: &redb::ReadTransaction,
    topic: &str,
    producer: &str,
) -> Result<Vec<(u64, u64)>, StorageError> {
    let Some(table) = open_opt(rtx, PRODUCERS)? else {
        return Ok(Vec::new());
    };
    match table.get((topic, producer))? {
        Some(v) => decode_in("producers", v.value()),
        None => Ok(Vec::new()),
    }
}

/// Current own origins per partition, and every origin this node ever wrote under.
type OwnOrigins = (
    HashMap<(Arc<str>, u32), u64>,
    std::collections::HashSet<u64>,
);

fn load_own_origins(db: &Database) -> Result<OwnOrigins, StorageError> {
    let rtx = db.begin_read()?;
    let mut current = HashMap::new();
    let mut all = std::collections::HashSet::new();
    if let Some(t) = open_opt(&rtx, OWN_ORIGINS)? {
        for item in t.iter()? {
            let (k, v) = item?;
            let (topic, p) = k.value();
            current.insert((Arc::from(topic), p), v.value());
            all.insert(v.value());
        }
    }
    if let Some(t) = open_opt(&rtx, OWN_ORIGIN_SET)? {
        for item in t.iter()? {
            all.insert(item?.0.value());
        }
    }
    Ok((current, all))
}

fn read_partition_meta(
    rtx: &redb::ReadTransaction,
    topic: &str,
    partition: u32,
) -> Result<PartitionMeta, StorageError> {
    let Some(table) = open_opt(rtx, PARTITIONS)? else {
        return Ok(PartitionMeta::default());
    };
    match table.get((topic, partition))? {
        Some(v) => decode_in("partitions", v.value()),
        None => Ok(PartitionMeta::default()),
    }
}

#[cfg(test)]
mod tests;
