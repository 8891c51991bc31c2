//! Consumers across the cluster (PROTOCOL.md I7). Deployments and checkpoints travel as
//! records of two internal topics that every node replicates (replication factor 255:
//! placement caps it at the live nodes):
//! - `_consumers`: every deploy (spec and module bytes) and remove;
//! - `_checkpoints`: after every batch, the owner's checkpoint version vector and state
//!   changes, appended in the same write as the batch's outputs.
//!
//! Each node runs a sync task that reads both topics from its own log and applies what other
//! nodes wrote: it starts or stops deployments, and for partitions it does not own it keeps
//! the checkpoint version vector and the state up to date, so the node that becomes owner
//! after a failover resumes where the old owner stopped: it skips every record the
//! checkpoint's version vector covers (records are contiguous per origin on every replica,
//! I3), and re-running a batch yields the same alert ids.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Consumers;
use crate::replication::core::{vv_get, vv_set};
use crate::storage::{
    Checkpoint, ConsumerSpec, NewRecord, Op, Record, StorageError, TopicConfig, format,
};
use crate::types::{Offset, PartitionId, now_ms};

/// Deploys and removes, replicated to every node.
pub const CONSUMERS_TOPIC: &str = "_consumers";
/// Owners' checkpoints, replicated to every node.
pub const CHECKPOINTS_TOPIC: &str = "_checkpoints";

/// A record of `_consumers` or `_checkpoints` (postcard, with the storage format's version
/// byte; variants only grow at the end).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum ControlRecord {
    Deploy {
        spec: ConsumerSpec,
        module: Bytes,
    },
    Remove {
        name: String,
        at_ms: u64,
    },
    Checkpoint {
        name: String,
        version: u64,
        partition: u32,
        version_vector: Vec<(u64, u64)>,
        state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        updated_ms: u64,
    },
}

/// The two internal topics (created at start-up on every node).
pub fn topics() -> Vec<TopicConfig> {
    [
        (CONSUMERS_TOPIC, None),
        (CHECKPOINTS_TOPIC, Some(86_400_000)),
    ]
    .into_iter()
    .map(|(name, retention_ms)| TopicConfig {
        name: name.into(),
        partitions: 1,
        replication_factor: 255,
        acks: crate::storage::Acks::Local,
        retention_ms,
        retention_bytes: None,
        created_ms: now_ms(),
    })
    .collect()
}

fn append(topic: &str, subject: String, r: &ControlRecord) -> Op {
    Op::Append {
        topic: Arc::from(topic),
        partition: PartitionId(0),
        record: NewRecord {
            key: Bytes::from(subject.clone()),
            subject,
            payload: Bytes::from(format::encode(r)),
            headers: Vec::new(),
            event_time_ms: None,
        },
    }
}

pub fn deploy_op(spec: &ConsumerSpec, module: &Bytes) -> Op {
    append(
        CONSUMERS_TOPIC,
        format!("deploy/{}", spec.name),
        &ControlRecord::Deploy {
            spec: spec.clone(),
            module: module.clone(),
        },
    )
}

pub fn remove_op(name: &str) -> Op {
    append(
        CONSUMERS_TOPIC,
        format!("remove/{name}"),
        &ControlRecord::Remove {
            name: name.to_string(),
            at_ms: now_ms(),
        },
    )
}

pub fn checkpoint_op(
    spec: &ConsumerSpec,
    partition: u32,
    cp: &Checkpoint,
    state: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Op {
    append(
        CHECKPOINTS_TOPIC,
        format!("checkpoint/{}/{partition}", spec.name),
        &ControlRecord::Checkpoint {
            name: spec.name.clone(),
            version: spec.version,
            partition,
            version_vector: cp.version_vector.clone(),
            state: state.to_vec(),
            updated_ms: cp.updated_ms,
        },
    )
}

/// Applies other nodes' deploys, removes and checkpoints until shutdown.
pub async fn sync(consumers: Consumers) {
    let inner = consumers.inner.clone();
    let mut commits = inner.storage.watch_commits();
    let mut next = [0u64; 2];
    loop {
        for (i, topic) in [CONSUMERS_TOPIC, CHECKPOINTS_TOPIC].into_iter().enumerate() {
            loop {
                let st = inner.storage.clone();
                let from = next[i];
                let read = tokio::task::spawn_blocking(move || {
                    st.read(topic, PartitionId(0), Offset(from), 200, 8 << 20)
                })
                .await;
                let batch = match read {
                    Ok(Ok(b)) => b,
                    Ok(Err(StorageError::ShuttingDown)) | Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(topic, error = %e, "cannot read consumer control records");
                        break;
                    }
                };
                if batch.records.is_empty() {
                    break;
                }
                let mut stuck = false;
                for (offset, r) in &batch.records {
                    if !inner.storage.is_own(r.id.origin.0)
                        && let Err(e) = apply(&consumers, r).await
                    {
                        // Retried on the next pass (e.g. the topic is not known here yet).
                        tracing::warn!(topic, record = %r.id, error = %e, "cannot apply a consumer control record yet");
                        stuck = true;
                        break;
                    }
                    next[i] = offset.0 + 1;
                }
                if stuck {
                    break;
                }
            }
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            r = commits.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn apply(consumers: &Consumers, r: &Record) -> Result<(), String> {
    let rec: ControlRecord = match format::decode(&r.payload) {
        Ok(rec) => rec,
        Err(e) => {
            // Written by a newer or broken node: skipping it is all this node can do.
            tracing::warn!(record = %r.id, error = %e, "skipping an undecodable consumer control record");
            return Ok(());
        }
    };
    match rec {
        ControlRecord::Deploy { spec, module } => consumers.apply_deploy(spec, module).await,
        ControlRecord::Remove { name, at_ms } => consumers.apply_remove(&name, at_ms).await,
        ControlRecord::Checkpoint {
            name,
            version: _,
            partition,
            version_vector,
            state,
            updated_ms,
        } => {
            let inner = &consumers.inner;
            if consumers.owns(&name, partition) {
                // The runner here owns the partition: it merges the progress before its
                // next batch (its own state and offset rule).
                if let Ok(mut m) = inner.merges.lock() {
                    let e = m.entry((name, partition)).or_default();
                    for (o, s) in version_vector {
                        if s > vv_get(e, o) {
                            vv_set(e, o, s);
                        }
                    }
                }
                return Ok(());
            }
            let st = inner.storage.clone();
            let n = name.clone();
            let local = tokio::task::spawn_blocking(move || st.checkpoint(&n, partition))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let local = local.unwrap_or_default();
            // Progress merges (a record any owner processed is skipped); state follows the
            // most recent owner.
            let mut vv = local.version_vector.clone();
            for (o, s) in &version_vector {
                if *s > vv_get(&vv, *o) {
                    vv_set(&mut vv, *o, *s);
                }
            }
            let newer = updated_ms >= local.updated_ms;
            let cp = Checkpoint {
                offset: local.offset,
                version_vector: vv,
                updated_ms: local.updated_ms.max(updated_ms),
            };
            inner
                .storage
                .write(vec![Op::ConsumerCommit {
                    name,
                    partition,
                    checkpoint: cp,
                    state: if newer { state } else { Vec::new() },
                }])
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_records_round_trip_with_a_version_byte() {
        let r = ControlRecord::Checkpoint {
            name: "c".into(),
            version: 2,
            partition: 1,
            version_vector: vec![(7, 9)],
            state: vec![(b"k".to_vec(), None)],
            updated_ms: 5,
        };
        let bytes = format::encode(&r);
        assert_eq!(bytes[0], 1, "format version byte");
        assert_eq!(
            bytes[1..],
            [2, 1, 99, 2, 1, 1, 7, 9, 1, 1, 107, 0, 5],
            "golden bytes"
        );
        assert_eq!(format::decode::<ControlRecord>(&bytes).unwrap(), r);
    }
}
