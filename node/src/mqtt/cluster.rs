//! MQTT state across the cluster. Retained messages and persistent sessions' subscriptions
//! travel as records of two internal topics that every node replicates (replication factor
//! 255, capped by placement at the live nodes); each node applies what other nodes wrote:
//! - `_retained`: every retained PUBLISH (an empty payload deletes and is kept as a
//!   tombstone), last writer wins by ingest time;
//! - `_sessions`: a persistent session's subscriptions whenever they change, and its
//!   deletion. A node applying one sets the session's cursors to its own log ends at that
//!   moment (offsets are per node), so a device that fails over to it finds its
//!   subscriptions and gets everything published after the session reached this node.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::storage::{
    NewRecord, Op, Record, RetainedMessage, SessionState, Storage, StorageError, TopicConfig,
    format,
};
use crate::types::{Offset, PartitionId, now_ms};

pub const RETAINED_TOPIC: &str = "_retained";
pub const SESSIONS_TOPIC: &str = "_sessions";

/// A `_sessions` record (postcard with the storage format's version byte).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client_id: String,
    /// `None`: the session was discarded (clean session).
    pub subscriptions: Option<Vec<(String, u8)>>,
    pub at_ms: u64,
}

/// The two internal topics (created at start-up on every node).
pub fn topics() -> Vec<TopicConfig> {
    [RETAINED_TOPIC, SESSIONS_TOPIC]
        .into_iter()
        .map(|name| TopicConfig {
            name: name.into(),
            partitions: 1,
            replication_factor: 255,
            acks: crate::storage::Acks::Local,
            retention_ms: Some(7 * 86_400_000),
            retention_bytes: None,
            created_ms: now_ms(),
        })
        .collect()
}

/// The record that carries a retained PUBLISH to the other nodes.
pub fn retained_op(subject: &str, payload: &Bytes, qos: u8) -> Op {
    Op::Append {
        topic: Arc::from(RETAINED_TOPIC),
        partition: PartitionId(0),
        record: NewRecord {
            key: Bytes::from(subject.to_string()),
            subject: subject.to_string(),
            payload: payload.clone(),
            headers: vec![(
                crate::storage::format::HEADER_MQTT_QOS.to_string(),
                Bytes::from(vec![qos]),
            )],
            event_time_ms: None,
        },
    }
}

/// The record that carries a session's subscriptions (or its end) to the other nodes.
pub fn session_op(client_id: &str, subscriptions: Option<Vec<(String, u8)>>) -> Op {
    let r = SessionRecord {
        client_id: client_id.to_string(),
        subscriptions,
        at_ms: now_ms(),
    };
    Op::Append {
        topic: Arc::from(SESSIONS_TOPIC),
        partition: PartitionId(0),
        record: NewRecord {
            key: Bytes::from(client_id.to_string()),
            subject: format!("session/{client_id}"),
            payload: Bytes::from(format::encode(&r)),
            headers: Vec::new(),
            event_time_ms: None,
        },
    }
}

/// Applies other nodes' retained messages and sessions until shutdown.
pub async fn sync(storage: Storage, stop: CancellationToken) {
    let mut commits = storage.watch_commits();
    // Where each topic was applied up to, committed with what it applied: a restart does not
    // replay older records over newer local state (a deleted retained message stays deleted).
    let cursor = |topic: &str| format!("sync/{topic}");
    let mut next = [0u64; 2];
    for (i, topic) in [RETAINED_TOPIC, SESSIONS_TOPIC].into_iter().enumerate() {
        let st = storage.clone();
        let name = cursor(topic);
        match tokio::task::spawn_blocking(move || st.cursor(&name)).await {
            Ok(Ok(c)) => next[i] = c.unwrap_or(0),
            Ok(Err(e)) => tracing::warn!(topic, error = %e, "cannot read the sync cursor"),
            Err(_) => return,
        }
    }
    loop {
        for (i, topic) in [RETAINED_TOPIC, SESSIONS_TOPIC].into_iter().enumerate() {
            loop {
                let st = storage.clone();
                let from = next[i];
                let read = tokio::task::spawn_blocking(move || {
                    st.read(topic, PartitionId(0), Offset(from), 500, 8 << 20)
                })
                .await;
                let batch = match read {
                    Ok(Ok(b)) => b,
                    Ok(Err(StorageError::ShuttingDown)) | Err(_) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(topic, error = %e, "cannot read MQTT state records");
                        break;
                    }
                };
                let Some((last, _)) = batch.records.last() else {
                    break;
                };
                next[i] = last.0 + 1;
                let mut ops = Vec::new();
                for (_, r) in &batch.records {
                    if storage.is_own(r.id.origin.0) {
                        continue;
                    }
                    let applied = if i == 0 {
                        apply_retained(&storage, r).await
                    } else {
                        apply_session(&storage, r).await
                    };
                    match applied {
                        Ok(Some(op)) => ops.push(op),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(topic, record = %r.id, error = %e, "cannot apply an MQTT state record")
                        }
                    }
                }
                ops.push(Op::SetCursor {
                    name: cursor(topic),
                    offset: next[i],
                });
                if let Err(e) = storage.write(ops).await {
                    tracing::warn!(topic, error = %e, "cannot store MQTT state from peers");
                    return;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = commits.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

async fn apply_retained(storage: &Storage, r: &Record) -> Result<Option<Op>, String> {
    let st = storage.clone();
    let subject = r.subject.clone();
    let current = tokio::task::spawn_blocking(move || st.retained_entry(&subject))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if current.is_some_and(|c| c.stored_ms > r.ingest_time_ms) {
        return Ok(None); // a later one is held here
    }
    // An empty payload is stored as a tombstone, like a local delete.
    Ok(Some(Op::SetRetained {
        topic: r.subject.clone(),
        message: Some(RetainedMessage {
            topic: r.subject.clone(),
            qos: r.mqtt_qos(),
            payload: r.payload.clone(),
            stored_ms: r.ingest_time_ms,
        }),
    }))
}

async fn apply_session(storage: &Storage, r: &Record) -> Result<Option<Op>, String> {
    let rec: SessionRecord = format::decode(&r.payload).map_err(|e| e.to_string())?;
    let st = storage.clone();
    let id = rec.client_id.clone();
    let (current, ends) = tokio::task::spawn_blocking(move || {
        let current = st.session(&id)?;
        let mut ends = Vec::new();
        for t in st.topics() {
            for p in 0..t.partitions {
                let m = st.partition_meta(&t.name, PartitionId(p))?;
                ends.push((t.name.clone(), p, m.next_offset));
            }
        }
        Ok::<_, StorageError>((current, ends))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if current.as_ref().is_some_and(|c| c.updated_ms >= rec.at_ms) {
        return Ok(None); // this node saw the session later (the client is or was here)
    }
    Ok(Some(match rec.subscriptions {
        None => Op::DeleteSession {
            client_id: rec.client_id,
        },
        Some(subscriptions) => Op::PutSession {
            client_id: rec.client_id,
            state: SessionState {
                subscriptions,
                // Offsets are per node: deliver what is published from now on.
                cursors: current.map(|c| c.cursors).unwrap_or(ends),
                updated_ms: rec.at_ms,
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_record_golden_bytes() {
        let r = SessionRecord {
            client_id: "c".into(),
            subscriptions: Some(vec![("a/#".into(), 1)]),
            at_ms: 5,
        };
        let bytes = format::encode(&r);
        assert_eq!(bytes, [1, 1, 99, 1, 1, 3, 97, 47, 35, 1, 5]);
        assert_eq!(format::decode::<SessionRecord>(&bytes).unwrap(), r);
    }
}
