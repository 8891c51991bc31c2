//! The group-commit writer: one dedicated OS thread owns redb's single write transaction.
//! It takes every request waiting in the bounded queue (up to `max_batch_ops` operations),
//! applies them all in one transaction, commits once (one fsync), and only then answers
//! each request and publishes the committed records to live subscribers.
//!
//! Architecture invariant: no reply says "durable" before `commit()` returned. After a
//! failed commit the writer is fail-stop: every later request gets `StorageError::Failed`
//! (redb's model: after an I/O error, state on disk is only trusted after a reopen).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::format::{self, PartitionMeta, Record, TopicConfig};
use super::{
    ALERT_IDS, CHECKPOINTS, CONSUMER_STATE, CONSUMERS, CURSORS, Committed, CommittedBatch, INBOUND,
    MODULES, OWN_ORIGIN_SET, OWN_ORIGINS, Op, OpOutcome, PARTITIONS, PRODUCERS, RETAINED, SESSIONS,
    StorageError, TOPICS, log_table_name,
};
use crate::metrics::METRICS;
use crate::types::{Offset, Origin, PartitionId, RecordId, Seq};

/// (topic, producer).
pub(super) type ProducerKey = (Arc<str>, Arc<str>);

pub(super) struct Request {
    pub ops: Vec<Op>,
    pub reply: oneshot::Sender<Result<Vec<OpOutcome>, StorageError>>,
}

pub(super) struct WriterState {
    pub db: Arc<Database>,
    pub origin: Origin,
    pub topics: Arc<RwLock<HashMap<String, TopicConfig>>>,
    pub parts: HashMap<(Arc<str>, u32), PartitionMeta>,
    pub committed: broadcast::Sender<CommittedBatch>,
    pub commits: watch::Sender<u64>,
    pub max_batch_ops: usize,
    pub failed: Option<String>,
    /// Committed sequence ranges of idempotent producers, loaded on first use.
    pub producers: HashMap<ProducerKey, Vec<(u64, u64)>>,
    /// Partitions whose new records are written under a fresh origin (see `OWN_ORIGINS`).
    pub own: HashMap<(Arc<str>, u32), u64>,
    /// Every origin this node writes or wrote under, shared with `Storage::is_own`.
    pub own_set: Arc<RwLock<std::collections::HashSet<u64>>>,
}

/// Most records retention deletes from one partition in one pass, so a huge backlog is
/// trimmed over several passes instead of one giant transaction.
const RETENTION_STEP: usize = 50_000;

pub(super) fn run(mut st: WriterState, mut rx: mpsc::Receiver<Request>) {
    let mut last_ingest = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Vec::new();
        let mut stop = None;
        let mut n = 0;
        let mut next = Some(first);
        loop {
            if let Some(req) = next.take() {
                if req.ops.is_empty() {
                    stop = Some(req.reply);
                } else {
                    n += req.ops.len();
                    batch.push(req);
                }
            }
            if n >= st.max_batch_ops {
                break;
            }
            match rx.try_recv() {
                Ok(req) => next = Some(req),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            st.process(batch, &mut last_ingest);
        }
        if let Some(stop) = stop {
            // Commit whatever was queued before the stop marker was seen, then refuse more
            // by dropping the receiver: senders then see `ShuttingDown`.
            rx.close();
            loop {
                let mut rest = Vec::new();
                while let Ok(req) = rx.try_recv() {
                    if !req.ops.is_empty() {
                        rest.push(req);
                    }
                    if rest.len() >= 1024 {
                        break;
                    }
                }
                if rest.is_empty() {
                    break;
                }
                st.process(rest, &mut last_ingest);
            }
            let _ = stop.send(Ok(Vec::new()));
            break;
        }
    }
    tracing::debug!("storage writer stopped");
}

/// Per-request result being built during a batch.
type Outcomes = Result<Vec<OpOutcome>, StorageError>;

impl WriterState {
    fn process(&mut self, batch: Vec<Request>, last_ingest: &mut u64) {
        if let Some(f) = &self.failed {
            for req in batch {
                let _ = req.reply.send(Err(StorageError::Failed(f.clone())));
            }
            return;
        }
        let started = Instant::now();
        let now = crate::types::now_ms().max(*last_ingest);
        *last_ingest = now;
        match self.apply(batch, now) {
            Ok((replies, committed, appended)) => {
                METRICS.storage_commits.inc();
                METRICS.storage_records_appended.inc_by(appended);
                METRICS
                    .storage_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                if !committed.is_empty() && self.committed.receiver_count() > 0 {
                    let _ = self.committed.send(Arc::new(committed));
                }
                for (reply, outcome) in replies {
                    let _ = reply.send(outcome);
                }
                self.commits.send_modify(|g| *g += 1);
            }
            Err((replies, e)) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "storage commit failed; refusing further writes");
                METRICS.storage_errors.inc();
                self.failed = Some(msg.clone());
                for reply in replies {
                    let _ = reply.send(Err(StorageError::Failed(msg.clone())));
                }
            }
        }
    }

    /// Applies one batch in one transaction. On a database error returns every reply
    /// channel so the caller can fail them all.
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        batch: Vec<Request>,
        now: u64,
    ) -> Result<
        (
            Vec<(oneshot::Sender<Outcomes>, Outcomes)>,
            Vec<Committed>,
            u64,
        ),
        (Vec<oneshot::Sender<Outcomes>>, StorageError),
    > {
        let mut replies: Vec<(oneshot::Sender<Outcomes>, Outcomes)> = Vec::new();
        let mut new_topics: Vec<TopicConfig> = Vec::new();
        let mut appends: Staged = BTreeMap::new();
        let mut touched: Vec<(Arc<str>, u32)> = Vec::new();
        let mut others: Vec<Op> = Vec::new();
        let mut retention: Option<u64> = None;
        let mut drops: Vec<((Arc<str>, u32), Vec<(u64, u64)>)> = Vec::new();
        let mut appended = 0u64;
        // Alert ids stored by this transaction (see `ALERT_IDS`), and a read snapshot to look
        // up earlier ones, opened on first use.
        let mut alert_ids: std::collections::HashSet<bytes::Bytes> = Default::default();
        let mut alert_rtx: Option<redb::ReadTransaction> = None;
        // Undo information for the in-memory partition state if the commit fails.
        let mut before: HashMap<(Arc<str>, u32), PartitionMeta> = HashMap::new();
        let mut producer_before: HashMap<ProducerKey, Vec<(u64, u64)>> = HashMap::new();

        for req in batch {
            if let Err(e) = self.validate(&req.ops, &new_topics) {
                replies.push((req.reply, Err(e)));
                continue;
            }
            let mut outcomes = Vec::with_capacity(req.ops.len());
            for op in req.ops {
                let op = match op {
                    Op::AppendOnce {
                        topic,
                        partition,
                        record,
                        producer,
                        sequence,
                    } => {
                        // Loaded by `validate` before anything of this request was applied.
                        let key = (topic.clone(), producer);
                        let ranges = self.producers.entry(key.clone()).or_default();
                        if !producer_before.contains_key(&key) {
                            producer_before.insert(key.clone(), ranges.clone());
                        }
                        if !insert_seq(ranges, sequence) {
                            outcomes.push(OpOutcome::Duplicate);
                            continue;
                        }
                        Op::Append {
                            topic,
                            partition,
                            record,
                        }
                    }
                    Op::Append {
                        topic,
                        partition,
                        record,
                    } if &*topic == crate::consumers::ALERTS_TOPIC => {
                        // `_alerts` keeps one record per alert id: a batch re-run by a new
                        // owner after a failover raises the same ids again (I7).
                        let id = record.key.clone();
                        if alert_ids.contains(&id) || self.alert_seen(&id, &mut alert_rtx) {
                            outcomes.push(OpOutcome::Duplicate);
                            continue;
                        }
                        alert_ids.insert(id);
                        Op::Append {
                            topic,
                            partition,
                            record,
                        }
                    }
                    other => other,
                };
                match op {
                    Op::Append {
                        topic,
                        partition,
                        record,
                    } => {
                        let key = (topic.clone(), partition.0);
                        let meta = touch(&mut self.parts, &mut before, &mut touched, &key);
                        let origin = self.own.get(&key).copied().unwrap_or(self.origin.0);
                        let seq = bump_seq(&mut meta.version_vector, origin);
                        let offset = meta.next_offset;
                        meta.next_offset += 1;
                        let id = RecordId {
                            origin: Origin(origin),
                            seq: Seq(seq),
                        };
                        let rec = Record {
                            id,
                            event_time_ms: record.event_time_ms.unwrap_or(now),
                            ingest_time_ms: now,
                            key: record.key,
                            subject: record.subject,
                            payload: record.payload,
                            headers: record.headers,
                        };
                        stage(meta, &mut appends, &key, offset, rec);
                        appended += 1;
                        outcomes.push(OpOutcome::Appended {
                            partition,
                            offset: Offset(offset),
                            id,
                        });
                    }
                    Op::Replicate {
                        topic,
                        partition,
                        records,
                    } => {
                        let key = (topic.clone(), partition.0);
                        let meta = touch(&mut self.parts, &mut before, &mut touched, &key);
                        let mut gaps: Vec<u64> = Vec::new();
                        for rec in records {
                            let (o, s) = (rec.id.origin.0, rec.id.seq.0);
                            match accept(&mut meta.version_vector, o, s) {
                                Accept::Store => {}
                                Accept::Duplicate => continue,
                                Accept::Gap => {
                                    if !gaps.contains(&o) {
                                        gaps.push(o);
                                    }
                                    continue;
                                }
                            }
                            let offset = meta.next_offset;
                            meta.next_offset += 1;
                            if &*topic == crate::consumers::ALERTS_TOPIC {
                                // Stored whatever its id (I3 keeps every id of an origin),
                                // but remembered, so this node never raises it again.
                                alert_ids.insert(rec.key.clone());
                            }
                            stage(meta, &mut appends, &key, offset, rec);
                            appended += 1;
                        }
                        outcomes.push(OpOutcome::Replicated {
                            version_vector: meta.version_vector.clone(),
                            gaps,
                        });
                    }
                    Op::SkipTrimmed {
                        topic,
                        partition,
                        origin,
                        below,
                    } => {
                        let key = (topic.clone(), partition.0);
                        let meta = self.parts.entry(key.clone()).or_default();
                        if vv_get(&meta.version_vector, origin) < below.saturating_sub(1) {
                            if !before.contains_key(&key) {
                                before.insert(key.clone(), meta.clone());
                                touched.push(key.clone());
                            }
                            vv_set(&mut meta.version_vector, origin, below.saturating_sub(1));
                        }
                        outcomes.push(OpOutcome::Done);
                    }
                    Op::DropCovered {
                        topic,
                        partition,
                        covered,
                    } => {
                        let key = (topic.clone(), partition.0);
                        drops.push((key, covered));
                        outcomes.push(OpOutcome::Trimmed(0));
                    }
                    Op::CreateTopic(cfg) => {
                        let name: Arc<str> = Arc::from(cfg.name.as_str());
                        for p in 0..cfg.partitions {
                            let key = (name.clone(), p);
                            self.parts.insert(key.clone(), PartitionMeta::default());
                            before.entry(key.clone()).or_default();
                            touched.push(key);
                        }
                        new_topics.push(cfg);
                        outcomes.push(OpOutcome::Done);
                    }
                    Op::Retention { now_ms } => {
                        retention = Some(retention.map_or(now_ms, |r: u64| r.max(now_ms)));
                        outcomes.push(OpOutcome::Trimmed(0));
                    }
                    other => {
                        others.push(other);
                        outcomes.push(OpOutcome::Done);
                    }
                }
            }
            replies.push((req.reply, Ok(outcomes)));
        }

        let result = (|| -> Result<u64, StorageError> {
            let wtx = self.db.begin_write()?;
            let mut trimmed = 0;
            if let Some(as_of) = retention {
                trimmed = self.trim(&wtx, as_of, &mut before, &mut touched)?;
            }
            for (key, covered) in &drops {
                let pending = appends.get(key).map(Vec::as_slice).unwrap_or(&[]);
                trimmed +=
                    self.drop_covered(&wtx, key, covered, pending, &mut before, &mut touched)?;
            }
            for ((topic, p), rows) in &appends {
                let name = log_table_name(topic, *p);
                let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
                let mut table = wtx.open_table(def)?;
                for (offset, value, _) in rows {
                    table.insert(*offset, value.as_slice())?;
                }
            }
            if !alert_ids.is_empty() {
                let mut t = wtx.open_table(ALERT_IDS)?;
                for id in &alert_ids {
                    t.insert(&id[..], now)?;
                }
            }
            if !producer_before.is_empty() {
                let mut t = wtx.open_table(PRODUCERS)?;
                for key in producer_before.keys() {
                    if let Some(ranges) = self.producers.get(key) {
                        t.insert((&*key.0, &*key.1), format::encode(ranges).as_slice())?;
                    }
                }
            }
            {
                let mut topics = wtx.open_table(TOPICS)?;
                for cfg in &new_topics {
                    topics.insert(cfg.name.as_str(), format::encode(cfg).as_slice())?;
                }
                let mut parts = wtx.open_table(PARTITIONS)?;
                for key in &touched {
                    if let Some(meta) = self.parts.get(key) {
                        parts.insert((&*key.0, key.1), format::encode(meta).as_slice())?;
                    }
                }
            }
            if !others.is_empty() {
                let mut retained = wtx.open_table(RETAINED)?;
                let mut sessions = wtx.open_table(SESSIONS)?;
                let mut inbound = wtx.open_table(INBOUND)?;
                for op in &others {
                    match op {
                        Op::SetRetained { topic, message } => match message {
                            Some(m) => {
                                retained.insert(topic.as_str(), format::encode(m).as_slice())?;
                            }
                            None => {
                                retained.remove(topic.as_str())?;
                            }
                        },
                        Op::PutSession { client_id, state } => {
                            sessions
                                .insert(client_id.as_str(), format::encode(state).as_slice())?;
                        }
                        Op::DeleteSession { client_id } => {
                            sessions.remove(client_id.as_str())?;
                            let c = client_id.as_str();
                            inbound.retain_in((c, 0u16)..=(c, u16::MAX), |_, _| false)?;
                        }
                        Op::PutInbound {
                            client_id,
                            pkid,
                            entry,
                        } => {
                            inbound.insert(
                                (client_id.as_str(), *pkid),
                                format::encode(entry).as_slice(),
                            )?;
                        }
                        Op::RemoveInbound { client_id, pkid } => {
                            inbound.remove((client_id.as_str(), *pkid))?;
                        }
                        _ => {}
                    }
                }
                drop((retained, sessions, inbound));
                let mut consumers = wtx.open_table(CONSUMERS)?;
                let mut modules = wtx.open_table(MODULES)?;
                let mut checkpoints = wtx.open_table(CHECKPOINTS)?;
                let mut state = wtx.open_table(CONSUMER_STATE)?;
                let mut cursors = wtx.open_table(CURSORS)?;
                for op in &others {
                    match op {
                        Op::PutModule { sha256, bytes } => {
                            modules.insert(sha256.as_str(), &bytes[..])?;
                        }
                        Op::PutConsumer(spec) => {
                            consumers
                                .insert(spec.name.as_str(), format::encode(spec).as_slice())?;
                        }
                        Op::DeleteConsumer { name } => {
                            let n = name.as_str();
                            consumers.remove(n)?;
                            checkpoints.retain_in((n, 0u32)..=(n, u32::MAX), |_, _| false)?;
                            state.retain_in(
                                (n, 0u32, &[][..])..(n, u32::MAX, &[0xFFu8; 64][..]),
                                |_, _| false,
                            )?;
                            cursors.remove(format!("webhook/{name}").as_str())?;
                        }
                        Op::ConsumerCommit {
                            name,
                            partition,
                            checkpoint,
                            state: changes,
                        } => {
                            checkpoints.insert(
                                (name.as_str(), *partition),
                                format::encode(checkpoint).as_slice(),
                            )?;
                            for (k, v) in changes {
                                match v {
                                    Some(v) => {
                                        state
                                            .insert((name.as_str(), *partition, &k[..]), &v[..])?;
                                    }
                                    None => {
                                        state.remove((name.as_str(), *partition, &k[..]))?;
                                    }
                                }
                            }
                        }
                        Op::SetCursor { name, offset } => {
                            cursors.insert(name.as_str(), *offset)?;
                        }
                        _ => {}
                    }
                }
            }
            wtx.commit()?;
            Ok(trimmed)
        })();

        match result {
            Ok(trimmed) => {
                if !new_topics.is_empty()
                    && let Ok(mut t) = self.topics.write()
                {
                    for cfg in new_topics {
                        t.insert(cfg.name.clone(), cfg);
                    }
                }
                if trimmed > 0 {
                    METRICS.storage_records_trimmed.inc_by(trimmed);
                    for (_, outcome) in replies.iter_mut() {
                        if let Ok(v) = outcome {
                            for o in v.iter_mut() {
                                if let OpOutcome::Trimmed(n) = o {
                                    *n = trimmed;
                                }
                            }
                        }
                    }
                }
                let mut committed = Vec::new();
                if self.committed.receiver_count() > 0 {
                    for ((topic, p), rows) in appends {
                        for (offset, _, rec) in rows {
                            committed.push(Committed {
                                topic: topic.clone(),
                                partition: PartitionId(p),
                                offset: Offset(offset),
                                record: Arc::new(rec),
                            });
                        }
                    }
                }
                Ok((replies, committed, appended))
            }
            Err(e) => {
                for (key, meta) in before {
                    self.parts.insert(key, meta);
                }
                for (key, ranges) in producer_before {
                    self.producers.insert(key, ranges);
                }
                Err((replies.into_iter().map(|(r, _)| r).collect(), e))
            }
        }
    }

    fn validate(&mut self, ops: &[Op], new_topics: &[TopicConfig]) -> Result<(), StorageError> {
        // Idempotent producers' ranges are loaded first, so a failed load fails the whole
        // request instead of half of it.
        for op in ops {
            if let Op::AppendOnce {
                topic, producer, ..
            } = op
            {
                let key = (topic.clone(), producer.clone());
                if !self.producers.contains_key(&key) {
                    let rtx = self.db.begin_read()?;
                    let ranges = super::read_producer(&rtx, topic, producer)?;
                    self.producers.insert(key, ranges);
                }
            }
        }
        let topics = self
            .topics
            .read()
            .map_err(|_| StorageError::Failed("topic map poisoned".into()))?;
        let mut created: Vec<&str> = Vec::new();
        for op in ops {
            match op {
                Op::Append {
                    topic, partition, ..
                }
                | Op::AppendOnce {
                    topic, partition, ..
                }
                | Op::Replicate {
                    topic, partition, ..
                }
                | Op::DropCovered {
                    topic, partition, ..
                }
                | Op::SkipTrimmed {
                    topic, partition, ..
                } => {
                    let partitions = topics
                        .get(&**topic)
                        .map(|c| c.partitions)
                        .or_else(|| {
                            new_topics
                                .iter()
                                .find(|c| *c.name == **topic)
                                .map(|c| c.partitions)
                        })
                        .ok_or_else(|| StorageError::UnknownTopic(topic.to_string()))?;
                    if partition.0 >= partitions {
                        return Err(StorageError::UnknownPartition {
                            topic: topic.to_string(),
                            partition: partition.0,
                            partitions,
                        });
                    }
                }
                Op::CreateTopic(cfg) => {
                    if topics.contains_key(&cfg.name)
                        || new_topics.iter().any(|c| c.name == cfg.name)
                        || created.contains(&cfg.name.as_str())
                    {
                        return Err(StorageError::TopicExists(cfg.name.clone()));
                    }
                    if cfg.partitions == 0 || cfg.partitions > 4096 {
                        return Err(StorageError::InvalidTopic(format!(
                            "partitions must be between 1 and 4096, not {}",
                            cfg.partitions
                        )));
                    }
                    crate::types::validate_topic_name(&cfg.name, true)
                        .map_err(StorageError::InvalidTopic)?;
                    created.push(&cfg.name);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether an alert id is already stored (read from a snapshot opened once per batch; a
    /// read failure counts as "not seen", so an alert is never lost to it).
    fn alert_seen(&self, id: &[u8], rtx: &mut Option<redb::ReadTransaction>) -> bool {
        if rtx.is_none() {
            *rtx = self.db.begin_read().ok();
        }
        let Some(rtx) = rtx.as_ref() else {
            return false;
        };
        match rtx.open_table(ALERT_IDS) {
            Ok(t) => t.get(id).ok().flatten().is_some(),
            Err(_) => false,
        }
    }

    /// Handoff: deletes the records of one partition whose origin every current replica
    /// holds entirely (I6). Origins are dropped all or nothing, so the version vector never
    /// claims ids this node does not hold; when this node's own stream of the partition is
    /// dropped, new records go under a fresh origin.
    fn drop_covered(
        &mut self,
        wtx: &redb::WriteTransaction,
        key: &(Arc<str>, u32),
        covered: &[(u64, u64)],
        pending: &[(u64, Vec<u8>, Record)],
        before: &mut HashMap<(Arc<str>, u32), PartitionMeta>,
        touched: &mut Vec<(Arc<str>, u32)>,
    ) -> Result<u64, StorageError> {
        let Some(meta) = self.parts.get(key).cloned() else {
            return Ok(0);
        };
        // Checked against the current version vector: an origin that grew since the
        // replicas reported is not covered, nor is one appended to in this very
        // transaction (its new rows are not in the table yet).
        let gone: Vec<u64> = meta
            .version_vector
            .iter()
            .filter(|(o, s)| {
                *s <= vv_get(covered, *o) && !pending.iter().any(|(_, _, r)| r.id.origin.0 == *o)
            })
            .map(|(o, _)| *o)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let name = log_table_name(&key.0, key.1);
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
        let mut table = wtx.open_table(def)?;
        let mut doomed: Vec<u64> = Vec::new();
        let mut freed = 0u64;
        // Rows appended by this transaction stay, and may be the first ones left.
        let mut first_kept: Option<u64> = pending.iter().map(|(o, _, _)| *o).min();
        for item in table.range(meta.log_start..)? {
            let (k, v) = item?;
            let rec: Record = super::decode_in(&name, v.value())?;
            if gone.contains(&rec.id.origin.0) {
                doomed.push(k.value());
                freed += v.value().len() as u64 + 8;
            } else {
                first_kept = Some(first_kept.map_or(k.value(), |f| f.min(k.value())));
            }
        }
        for k in &doomed {
            table.remove(*k)?;
        }
        before.entry(key.clone()).or_insert_with(|| meta.clone());
        if !touched.contains(key) {
            touched.push(key.clone());
        }
        let own = self.own.get(key).copied().unwrap_or(self.origin.0);
        if let Some(m) = self.parts.get_mut(key) {
            m.bytes = m.bytes.saturating_sub(freed);
            m.log_start = first_kept.unwrap_or(m.next_offset);
            m.version_vector.retain(|(o, _)| !gone.contains(o));
        }
        if gone.contains(&own) {
            let fresh = loop {
                let o: u64 = rand::random();
                if o != 0 && !self.own_set.read().map(|s| s.contains(&o)).unwrap_or(true) {
                    break o;
                }
            };
            let mut t = wtx.open_table(OWN_ORIGINS)?;
            t.insert((&*key.0, key.1), fresh)?;
            let mut all = wtx.open_table(OWN_ORIGIN_SET)?;
            all.insert(fresh, ())?;
            self.own.insert(key.clone(), fresh);
            if let Ok(mut s) = self.own_set.write() {
                s.insert(fresh);
            }
        }
        Ok(doomed.len() as u64)
    }

    /// Deletes records past each topic's retention, oldest first.
    fn trim(
        &mut self,
        wtx: &redb::WriteTransaction,
        now: u64,
        before: &mut HashMap<(Arc<str>, u32), PartitionMeta>,
        touched: &mut Vec<(Arc<str>, u32)>,
    ) -> Result<u64, StorageError> {
        let configs: Vec<TopicConfig> = self
            .topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        let mut total = 0;
        for cfg in configs {
            if cfg.retention_ms.is_none() && cfg.retention_bytes.is_none() {
                continue;
            }
            let cutoff = cfg.retention_ms.map(|ms| now.saturating_sub(ms));
            for p in 0..cfg.partitions {
                let key: (Arc<str>, u32) = (Arc::from(cfg.name.as_str()), p);
                let Some(meta) = self.parts.get(&key).cloned() else {
                    continue;
                };
                if meta.log_start >= meta.next_offset {
                    continue;
                }
                let name = log_table_name(&cfg.name, p);
                let def: TableDefinition<u64, &[u8]> = TableDefinition::new(&name);
                let mut table = wtx.open_table(def)?;
                let mut bytes = meta.bytes;
                let mut end = meta.log_start;
                for item in table.range(meta.log_start..)? {
                    let (k, v) = item?;
                    let size = v.value().len() as u64 + 8;
                    let over_bytes = cfg.retention_bytes.is_some_and(|max| bytes > max);
                    let too_old = match cutoff {
                        Some(c) => format::decode::<Record>(v.value())
                            .map(|r| r.ingest_time_ms < c)
                            .unwrap_or(true),
                        None => false,
                    };
                    if !(over_bytes || too_old) || (end - meta.log_start) as usize >= RETENTION_STEP
                    {
                        break;
                    }
                    bytes = bytes.saturating_sub(size);
                    end = k.value() + 1;
                }
                if end > meta.log_start {
                    table.retain_in(meta.log_start..end, |_, _| false)?;
                    total += end - meta.log_start;
                    before.entry(key.clone()).or_insert_with(|| meta.clone());
                    if !touched.contains(&key) {
                        touched.push(key.clone());
                    }
                    if let Some(m) = self.parts.get_mut(&key) {
                        m.log_start = end;
                        m.bytes = bytes;
                    }
                }
            }
        }
        Ok(total)
    }
}

/// Adds `seq` to a sorted list of disjoint inclusive ranges; false if it was there.
fn insert_seq(ranges: &mut Vec<(u64, u64)>, seq: u64) -> bool {
    // First range whose end is >= seq - 1 (could absorb seq).
    let i = ranges.partition_point(|&(_, end)| end.saturating_add(1) < seq);
    if let Some(&(start, end)) = ranges.get(i)
        && start <= seq
        && seq <= end
    {
        return false;
    }
    let joins_left = ranges
        .get(i)
        .is_some_and(|&(_, end)| end.saturating_add(1) == seq);
    let (left, right) = if joins_left {
        (i, i + 1)
    } else {
        (usize::MAX, i)
    };
    let joins_right = ranges
        .get(right)
        .is_some_and(|&(start, _)| seq.saturating_add(1) == start);
    match (joins_left, joins_right) {
        (true, true) => {
            ranges[left].1 = ranges[right].1;
            ranges.remove(right);
        }
        (true, false) => ranges[left].1 = seq,
        (false, true) => ranges[right].0 = seq,
        (false, false) => ranges.insert(right, (seq, seq)),
    }
    true
}

/// Increments and returns the origin's seq in a sorted version vector.
pub(crate) use crate::replication::core::vv_get;
use crate::replication::core::{Accept, accept, vv_set};

/// Rows of a transaction by partition: (offset, encoded value, record).
type Staged = BTreeMap<(Arc<str>, u32), Vec<(u64, Vec<u8>, Record)>>;

/// A partition's in-memory meta, remembering its state before this transaction (to undo
/// it if the commit fails) and that it must be written.
fn touch<'a>(
    parts: &'a mut HashMap<(Arc<str>, u32), PartitionMeta>,
    before: &mut HashMap<(Arc<str>, u32), PartitionMeta>,
    touched: &mut Vec<(Arc<str>, u32)>,
    key: &(Arc<str>, u32),
) -> &'a mut PartitionMeta {
    let meta = parts.entry(key.clone()).or_default();
    if !before.contains_key(key) {
        before.insert(key.clone(), meta.clone());
        touched.push(key.clone());
    }
    meta
}

/// Encodes a record for the log at `offset` and counts its bytes in the partition's meta.
fn stage(
    meta: &mut PartitionMeta,
    appends: &mut Staged,
    key: &(Arc<str>, u32),
    offset: u64,
    rec: Record,
) {
    let value = format::encode(&rec);
    meta.bytes += value.len() as u64 + 8;
    appends
        .entry(key.clone())
        .or_default()
        .push((offset, value, rec));
}

fn bump_seq(vv: &mut Vec<(u64, u64)>, origin: u64) -> u64 {
    match vv.binary_search_by_key(&origin, |(o, _)| *o) {
        Ok(i) => {
            vv[i].1 += 1;
            vv[i].1
        }
        Err(i) => {
            vv.insert(i, (origin, 1));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::insert_seq;

    #[test]
    fn sequence_ranges_merge_and_detect_duplicates() {
        let mut r = Vec::new();
        for s in [5, 7, 6, 1, 3, 2, 10] {
            assert!(insert_seq(&mut r, s), "{s}");
        }
        assert_eq!(r, vec![(1, 3), (5, 7), (10, 10)]);
        for s in [1, 2, 3, 5, 6, 7, 10] {
            assert!(!insert_seq(&mut r, s), "{s} is a duplicate");
        }
        assert!(insert_seq(&mut r, 4));
        assert_eq!(r, vec![(1, 7), (10, 10)]);
        assert!(insert_seq(&mut r, 0));
        assert!(insert_seq(&mut r, u64::MAX));
        assert_eq!(r, vec![(0, 7), (10, 10), (u64::MAX, u64::MAX)]);
    }
}
