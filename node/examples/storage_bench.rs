//! Raw storage append throughput: 100-byte records through the group-commit writer into
//! a real redb file, every commit fsynced (`Durability::Immediate`).
//!
//! Two shapes, each run `RUNS` times (median printed):
//! - `batched`: 16 concurrent appenders, 1,000 records per request (bulk ingest shape);
//! - `single`: 256 concurrent appenders, one record per request (the MQTT QoS 1 shape,
//!   where group commit folds many connections' records into one transaction).
//!
//! Run: `cargo run --release -p shoal --example storage_bench [-- RECORDS]`

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use shoal::storage::{Acks, NewRecord, Op, Storage, StorageConfig, TopicConfig};
use shoal::types::PartitionId;

const RUNS: usize = 3;

fn record(i: u64) -> NewRecord {
    NewRecord {
        key: Bytes::from(format!("sensor/{}", i % 1000)),
        subject: format!("sensor/{}", i % 1000),
        payload: Bytes::from(vec![b'x'; 100]),
        headers: Vec::new(),
        event_time_ms: None,
    }
}

async fn run(total: u64, appenders: u64, per_request: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let storage = Storage::open(StorageConfig::new(dir.path()))?;
    storage
        .create_topic(TopicConfig {
            name: "bench".into(),
            partitions: 8,
            replication_factor: 1,
            acks: Acks::Local,
            retention_ms: None,
            retention_bytes: None,
            created_ms: 0,
        })
        .await?;
    let topic: Arc<str> = Arc::from("bench");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let (storage, topic) = (storage.clone(), topic.clone());
        let mine = total / appenders;
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while i < mine {
                let n = per_request.min(mine - i);
                let ops = (0..n)
                    .map(|j| Op::Append {
                        topic: topic.clone(),
                        partition: PartitionId(((a + i + j) % 8) as u32),
                        record: record(a * mine + i + j),
                    })
                    .collect();
                storage.write(ops).await?;
                i += n;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let commits = shoal::metrics::METRICS.storage_commits.get();
    storage.shutdown().await;
    eprintln!(
        "  {total} records, {appenders} appenders x {per_request}/request: {secs:.2}s, {:.0} rec/s ({commits} commits so far)",
        total as f64 / secs
    );
    Ok(total as f64 / secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let mut batched = Vec::new();
    let mut single = Vec::new();
    for _ in 0..RUNS {
        batched.push(run(total, 16, 1000).await?);
        single.push(run(total / 5, 256, 1).await?);
    }
    println!(
        "storage append, 100-byte records, fsync per commit: batched median {:.0} rec/s; single-record requests median {:.0} rec/s",
        median(batched),
        median(single)
    );
    Ok(())
}
