//! Storage tests on real redb files in temporary directories.

use super::*;
use crate::types::{Seq, now_ms};

fn topic(name: &str, partitions: u32) -> TopicConfig {
    TopicConfig {
        name: name.into(),
        partitions,
        replication_factor: 1,
        acks: Acks::Local,
        retention_ms: None,
        retention_bytes: None,
        created_ms: now_ms(),
    }
}

fn rec(payload: &str) -> NewRecord {
    NewRecord {
        key: Bytes::from_static(b"k"),
        subject: "s".into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        headers: vec![],
        event_time_ms: None,
    }
}

fn append(t: &str, p: u32, payload: &str) -> Op {
    Op::Append {
        topic: Arc::from(t),
        partition: PartitionId(p),
        record: rec(payload),
    }
}

fn open(dir: &Path) -> Storage {
    Storage::open(StorageConfig::new(dir)).expect("open")
}

#[tokio::test]
async fn append_read_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let origin;
    {
        let s = open(dir.path());
        origin = s.origin();
        s.create_topic(topic("t", 2)).await.unwrap();
        let out = s
            .write(vec![
                append("t", 0, "a"),
                append("t", 0, "b"),
                append("t", 1, "c"),
            ])
            .await
            .unwrap();
        assert_eq!(
            out[1],
            OpOutcome::Appended {
                partition: PartitionId(0),
                offset: Offset(1),
                id: RecordId {
                    origin,
                    seq: Seq(2)
                }
            }
        );
        s.shutdown().await;
    }
    let s = open(dir.path());
    assert_eq!(s.origin(), origin, "origin survives a restart");
    let b = s.read("t", PartitionId(0), Offset(0), 10, 1 << 20).unwrap();
    let payloads: Vec<_> = b.records.iter().map(|(_, r)| r.payload.clone()).collect();
    assert_eq!(payloads, vec![Bytes::from("a"), Bytes::from("b")]);
    assert_eq!(b.next_offset, Offset(2));
    let meta = s.partition_meta("t", PartitionId(0)).unwrap();
    assert_eq!(meta.version_vector, vec![(origin.0, 2)]);
    // Appends continue the dense sequence after the restart.
    let out = s.write(vec![append("t", 0, "d")]).await.unwrap();
    assert!(matches!(
        out[0],
        OpOutcome::Appended {
            offset: Offset(2),
            id: RecordId { seq: Seq(3), .. },
            ..
        }
    ));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_folds_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 4)).await.unwrap();
    // This storage's own commit counter (the metric is process-wide).
    let commits_before = *s.watch_commits().borrow();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..50 {
                s.write(vec![append("t", i % 4, &format!("{i}-{j}"))])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut total = 0;
    for p in 0..4 {
        let b = s
            .read("t", PartitionId(p), Offset(0), 10_000, usize::MAX)
            .unwrap();
        // Offsets are dense and seqs are dense per (origin, partition).
        for (i, (off, r)) in b.records.iter().enumerate() {
            assert_eq!(off.0, i as u64);
            assert_eq!(r.id.seq.0, i as u64 + 1);
        }
        total += b.records.len();
    }
    assert_eq!(total, 64 * 50);
    // 3,200 single-record requests from 64 concurrent tasks: the writer folds requests that
    // queue up while it commits, so there are fewer transactions than requests.
    let commits = *s.watch_commits().borrow() - commits_before;
    eprintln!("{commits} commits for 3,200 requests");
    assert!(
        commits > 0 && commits < 3200,
        "{commits} commits for 3,200 requests"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn bad_requests_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 1)).await.unwrap();
    let bad = s.enqueue(vec![append("nope", 0, "x")]).await.unwrap();
    let bad_part = s
        .enqueue(vec![append("t", 0, "ok"), append("t", 5, "x")])
        .await
        .unwrap();
    let good = s.enqueue(vec![append("t", 0, "y")]).await.unwrap();
    assert!(matches!(bad.await, Err(StorageError::UnknownTopic(_))));
    assert!(matches!(
        bad_part.await,
        Err(StorageError::UnknownPartition { partition: 5, .. })
    ));
    good.await.unwrap();
    // The failed request was atomic: its valid first op was not written.
    let b = s.read("t", PartitionId(0), Offset(0), 10, 1 << 20).unwrap();
    assert_eq!(b.records.len(), 1);
    assert!(matches!(
        s.create_topic(topic("t", 1)).await,
        Err(StorageError::TopicExists(_))
    ));
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_commits_queued_and_refuses_later() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 1)).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..100 {
        pending.push(
            s.enqueue(vec![append("t", 0, &i.to_string())])
                .await
                .unwrap(),
        );
    }
    s.shutdown().await;
    for p in pending {
        p.await.expect("queued before shutdown means committed");
    }
    assert!(matches!(
        s.write(vec![append("t", 0, "late")]).await,
        Err(StorageError::ShuttingDown)
    ));
    drop(s);
    let s = open(dir.path());
    let b = s
        .read("t", PartitionId(0), Offset(0), 1000, usize::MAX)
        .unwrap();
    assert_eq!(b.records.len(), 100);
    s.shutdown().await;
}

#[tokio::test]
async fn retention_by_bytes_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut by_bytes = topic("b", 1);
    by_bytes.retention_bytes = Some(1000);
    s.create_topic(by_bytes).await.unwrap();
    let mut by_age = topic("a", 1);
    by_age.retention_ms = Some(60_000);
    s.create_topic(by_age).await.unwrap();
    for i in 0..100 {
        s.write(vec![append("b", 0, &format!("{i:040}"))])
            .await
            .unwrap();
    }
    s.write(vec![append("a", 0, "old")]).await.unwrap();
    // Retention as of now keeps the fresh record, and as of two minutes later drops it.
    s.write(vec![Op::Retention { now_ms: now_ms() }])
        .await
        .unwrap();
    let meta = s.partition_meta("b", PartitionId(0)).unwrap();
    assert!(meta.bytes <= 1000, "bytes {}", meta.bytes);
    assert!(meta.log_start > 0);
    assert_eq!(meta.next_offset, 100);
    let b = s
        .read("b", PartitionId(0), Offset(0), 1000, usize::MAX)
        .unwrap();
    assert_eq!(b.records.first().map(|r| r.0), Some(Offset(meta.log_start)));
    assert_eq!(b.records.last().map(|r| r.0), Some(Offset(99)));
    assert_eq!(s.partition_meta("a", PartitionId(0)).unwrap().log_start, 0);
    let out = s
        .write(vec![Op::Retention {
            now_ms: now_ms() + 120_000,
        }])
        .await
        .unwrap();
    assert!(matches!(out[0], OpOutcome::Trimmed(n) if n >= 1));
    let meta = s.partition_meta("a", PartitionId(0)).unwrap();
    assert_eq!((meta.log_start, meta.next_offset, meta.bytes), (1, 1, 0));
    s.shutdown().await;
}

#[tokio::test]
async fn offset_for_time_finds_first_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 1)).await.unwrap();
    s.write(vec![append("t", 0, "a")]).await.unwrap();
    let b = s.read("t", PartitionId(0), Offset(0), 1, 1 << 20).unwrap();
    let t0 = b.records[0].1.ingest_time_ms;
    assert_eq!(
        s.offset_for_time("t", PartitionId(0), t0).unwrap(),
        Offset(0)
    );
    assert_eq!(
        s.offset_for_time("t", PartitionId(0), 0).unwrap(),
        Offset(0)
    );
    assert_eq!(
        s.offset_for_time("t", PartitionId(0), t0 + 1_000_000)
            .unwrap(),
        Offset(1)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn mqtt_tables_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let state = SessionState {
        subscriptions: vec![("a/#".into(), 1)],
        cursors: vec![],
        updated_ms: 1,
    };
    s.write(vec![
        Op::PutSession {
            client_id: "c".into(),
            state: state.clone(),
        },
        Op::PutInbound {
            client_id: "c".into(),
            pkid: 7,
            entry: InboundEntry {
                hash: 1,
                awaiting_release: true,
            },
        },
        Op::SetRetained {
            topic: "a/b".into(),
            message: Some(RetainedMessage {
                topic: "a/b".into(),
                qos: 1,
                payload: Bytes::from("x"),
                stored_ms: 1,
            }),
        },
    ])
    .await
    .unwrap();
    assert_eq!(s.session("c").unwrap(), Some(state));
    assert_eq!(s.inbound("c").unwrap().len(), 1);
    assert_eq!(s.retained().unwrap().len(), 1);
    s.write(vec![
        Op::DeleteSession {
            client_id: "c".into(),
        },
        Op::SetRetained {
            topic: "a/b".into(),
            message: None,
        },
    ])
    .await
    .unwrap();
    assert_eq!(s.session("c").unwrap(), None);
    assert!(s.inbound("c").unwrap().is_empty());
    assert!(s.retained().unwrap().is_empty());
    // A delete kept as a tombstone (empty payload): not served, but its time is known.
    s.write(vec![Op::SetRetained {
        topic: "a/b".into(),
        message: Some(RetainedMessage {
            topic: "a/b".into(),
            qos: 1,
            payload: Bytes::new(),
            stored_ms: 7,
        }),
    }])
    .await
    .unwrap();
    assert!(s.retained().unwrap().is_empty());
    assert_eq!(
        s.retained_entry("a/b").unwrap().map(|m| m.stored_ms),
        Some(7)
    );
    s.shutdown().await;
}

#[test]
fn refuses_foreign_corrupt_and_locked_directories() {
    let dir = tempfile::tempdir().unwrap();
    // A directory with other files and no database.
    std::fs::write(dir.path().join("notes.txt"), "hi").unwrap();
    let e = Storage::open(StorageConfig::new(dir.path())).unwrap_err();
    assert!(matches!(e, OpenError::NotADataDir { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"), "{e}");

    // Garbage where the database should be.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DB_FILE), vec![0xAB; 4096]).unwrap();
    let e = Storage::open(StorageConfig::new(dir.path())).unwrap_err();
    assert!(matches!(e, OpenError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(DB_FILE), "{e}");

    // A valid redb file written by someone else.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let w = db.begin_write().unwrap();
        {
            let def: TableDefinition<&str, u64> = TableDefinition::new("other");
            w.open_table(def).unwrap().insert("x", 1).unwrap();
        }
        w.commit().unwrap();
    }
    let e = Storage::open(StorageConfig::new(dir.path())).unwrap_err();
    assert!(matches!(e, OpenError::Foreign { .. }), "{e}");

    // A second open of a directory in use.
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = open(dir.path());
    let e = Storage::open(StorageConfig::new(dir.path())).unwrap_err();
    assert!(matches!(e, OpenError::Locked { .. }), "{e}");
    rt.block_on(first.shutdown());
}

fn replicated(origin: u64, seq: u64, payload: &str) -> Record {
    Record {
        id: RecordId {
            origin: Origin(origin),
            seq: Seq(seq),
        },
        event_time_ms: 1,
        ingest_time_ms: 1,
        key: Bytes::from_static(b"k"),
        subject: "s".into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        headers: vec![],
    }
}

/// I3 in the writer: next seq stored, duplicates ignored, a gap stops the origin.
#[tokio::test]
async fn replicate_accepts_in_order_ignores_duplicates_and_reports_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 1)).await.unwrap();
    let op = |records| Op::Replicate {
        topic: Arc::from("t"),
        partition: PartitionId(0),
        records,
    };
    let out = s
        .write(vec![op(vec![
            replicated(9, 1, "a"),
            replicated(9, 2, "b"),
            replicated(9, 2, "b"),
            replicated(9, 4, "d"),
            replicated(8, 1, "x"),
        ])])
        .await
        .unwrap();
    assert_eq!(
        out[0],
        OpOutcome::Replicated {
            version_vector: vec![(8, 1), (9, 2)],
            gaps: vec![9]
        }
    );
    let b = s.read("t", PartitionId(0), Offset(0), 10, 1 << 20).unwrap();
    assert_eq!(b.records.len(), 3);
}

/// I6 in the writer: an origin is dropped only when covered entirely; dropping this node's
/// own stream moves new records to a fresh origin, so the version vector stays truthful.
#[tokio::test]
async fn handoff_drops_whole_origins_and_switches_the_own_stream() {
    let dir = tempfile::tempdir().unwrap();
    let own;
    let fresh;
    {
        let s = open(dir.path());
        own = s.origin().0;
        s.create_topic(topic("t", 1)).await.unwrap();
        s.write(vec![append("t", 0, "a"), append("t", 0, "b")])
            .await
            .unwrap();
        s.write(vec![Op::Replicate {
            topic: Arc::from("t"),
            partition: PartitionId(0),
            records: vec![replicated(9, 1, "x"), replicated(9, 2, "y")],
        }])
        .await
        .unwrap();
        let drop = |covered: Vec<(u64, u64)>| Op::DropCovered {
            topic: Arc::from("t"),
            partition: PartitionId(0),
            covered,
        };
        // Origin 9 only half covered, own fully: only own records go.
        let out = s.write(vec![drop(vec![(9, 1), (own, 2)])]).await.unwrap();
        assert_eq!(out[0], OpOutcome::Trimmed(2));
        let meta = s.partition_meta("t", PartitionId(0)).unwrap();
        assert_eq!(meta.version_vector, vec![(9, 2)]);
        let out = s.write(vec![append("t", 0, "c")]).await.unwrap();
        let OpOutcome::Appended { id, .. } = out[0] else {
            panic!("{out:?}")
        };
        fresh = id.origin.0;
        assert_ne!(
            fresh, own,
            "a fresh origin after the own stream was handed off"
        );
        assert_eq!(id.seq, Seq(1));
        assert!(s.is_own(fresh) && s.is_own(own));
        s.shutdown().await;
    }
    let s = open(dir.path());
    let out = s.write(vec![append("t", 0, "d")]).await.unwrap();
    let OpOutcome::Appended { id, .. } = out[0] else {
        panic!("{out:?}")
    };
    assert_eq!((id.origin.0, id.seq), (fresh, Seq(2)), "survives a restart");
    assert!(
        s.is_own(fresh),
        "own origins are remembered across restarts"
    );
    let payloads: Vec<_> = s
        .read("t", PartitionId(0), Offset(0), 10, 1 << 20)
        .unwrap()
        .records
        .iter()
        .map(|(_, r)| r.payload.clone())
        .collect();
    assert_eq!(payloads, ["x", "y", "c", "d"].map(Bytes::from).to_vec());
}

/// I7: `_alerts` keeps one record per alert id, across requests and restarts; replicated
/// alerts register their ids too.
#[tokio::test]
async fn alerts_are_stored_once_per_id() {
    let dir = tempfile::tempdir().unwrap();
    let alert = |id: &str| Op::Append {
        topic: Arc::from("_alerts"),
        partition: PartitionId(0),
        record: NewRecord {
            key: Bytes::copy_from_slice(id.as_bytes()),
            subject: "shoal/alerts/c/k".into(),
            payload: Bytes::from_static(b"{}"),
            headers: vec![],
            event_time_ms: None,
        },
    };
    {
        let s = open(dir.path());
        s.create_topic(topic("_alerts", 1)).await.unwrap();
        let out = s
            .write(vec![alert("a"), alert("a"), alert("b")])
            .await
            .unwrap();
        assert!(matches!(out[0], OpOutcome::Appended { .. }));
        assert_eq!(out[1], OpOutcome::Duplicate);
        assert!(matches!(out[2], OpOutcome::Appended { .. }));
        let mut r = replicated(9, 1, "{}");
        r.key = Bytes::from_static(b"c");
        s.write(vec![Op::Replicate {
            topic: Arc::from("_alerts"),
            partition: PartitionId(0),
            records: vec![r],
        }])
        .await
        .unwrap();
        s.shutdown().await;
    }
    let s = open(dir.path());
    let out = s
        .write(vec![alert("b"), alert("c"), alert("d")])
        .await
        .unwrap();
    assert_eq!(out[0], OpOutcome::Duplicate, "remembered across a restart");
    assert_eq!(
        out[1],
        OpOutcome::Duplicate,
        "a replicated alert's id counts"
    );
    assert!(matches!(out[2], OpOutcome::Appended { .. }));
}

/// A trimmed prefix reported by a peer counts as held, so I3 accepts what follows it.
#[tokio::test]
async fn a_trimmed_prefix_lets_the_next_records_in() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic(topic("t", 1)).await.unwrap();
    let rep = |records| Op::Replicate {
        topic: Arc::from("t"),
        partition: PartitionId(0),
        records,
    };
    let out = s
        .write(vec![rep(vec![replicated(9, 40, "x")])])
        .await
        .unwrap();
    assert_eq!(
        out[0],
        OpOutcome::Replicated {
            version_vector: vec![],
            gaps: vec![9]
        },
        "seqs 1..39 missing: a gap"
    );
    s.write(vec![
        Op::SkipTrimmed {
            topic: Arc::from("t"),
            partition: PartitionId(0),
            origin: 9,
            below: 40,
        },
        rep(vec![replicated(9, 40, "x"), replicated(9, 41, "y")]),
    ])
    .await
    .unwrap();
    let meta = s.partition_meta("t", PartitionId(0)).unwrap();
    assert_eq!(meta.version_vector, vec![(9, 41)]);
    assert_eq!(meta.next_offset, 2);
}
