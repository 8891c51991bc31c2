//! Records over HTTP: read a page by offset (optionally waiting for new records), follow a
//! partition as Server-Sent Events, and bulk-ingest JSON lines.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::metrics::METRICS;
use crate::node::AppState;
use crate::route::partition_for;
use crate::storage::format::HEADER_MQTT_QOS;
use crate::storage::{NewRecord, Op, OpOutcome, Record, StorageError};
use crate::types::{Offset, PartitionId};
use axum::extract::rejection::BytesRejection;

/// Most records one page returns.
const MAX_LIMIT: usize = 10_000;
/// Longest long-poll wait.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The JSON shape of a record, shared by the API and the CLI's `consume` output. The
/// payload (and key) is text when it is valid UTF-8, else base64 under `payload_base64`
/// (`key_base64`); `qos` is the MQTT QoS it was published with, when above 0.
pub fn record_json(partition: u32, offset: Offset, r: &Record) -> Value {
    let mut v = json!({
        "partition": partition,
        "offset": offset.0,
        "id": r.id.to_string(),
        "event_time": r.event_time_ms,
        "ingest_time": r.ingest_time_ms,
        "subject": r.subject,
    });
    put_bytes(&mut v, "key", &r.key);
    put_bytes(&mut v, "payload", &r.payload);
    let qos = r.mqtt_qos();
    if qos > 0 {
        v["qos"] = json!(qos);
    }
    if r.headers.iter().any(|(k, _)| k != HEADER_MQTT_QOS) {
        let mut h = serde_json::Map::new();
        for (k, val) in r.headers.iter().filter(|(k, _)| k != HEADER_MQTT_QOS) {
            match std::str::from_utf8(val) {
                Ok(s) => h.insert(k.clone(), json!(s)),
                _ => h.insert(
                    k.clone(),
                    json!({ "base64": base64::engine::general_purpose::STANDARD.encode(val) }),
                ),
            };
        }
        v["headers"] = Value::Object(h);
    }
    v
}

fn put_bytes(v: &mut Value, field: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => v[field] = json!(s),
        Err(_) => {
            v[format!("{field}_base64")] =
                json!(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// `beginning`, `latest`, an offset, an RFC 3339 time, or `time:<unix ms>`.
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// Long poll: wait up to this long for a record when none is there yet.
    #[serde(default)]
    wait_ms: Option<u64>,
    /// Resume by version vector instead of offset (offsets differ between replicas):
    /// `ORIGIN:SEQ,...` (origin in hex) of what the reader already has; `after=` (empty)
    /// reads from the start. The reply's `version_vector` is the value for the next page.
    #[serde(default)]
    after: Option<String>,
    /// `local`: serve from this node's copy even when it does not replicate the partition
    /// (by default such reads are forwarded to a replica).
    #[serde(default)]
    scope: Option<String>,
}

/// Parses `ORIGIN:SEQ,...` (origin in hex) into a sorted version vector.
pub fn parse_vv(s: &str) -> Result<Vec<(u64, u64)>, String> {
    let mut vv: Vec<(u64, u64)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (o, q) = part
            .split_once(':')
            .ok_or_else(|| format!("{part:?} is not ORIGIN:SEQ"))?;
        let o = u64::from_str_radix(o, 16).map_err(|_| format!("origin {o:?} is not hex"))?;
        let q: u64 = q
            .parse()
            .map_err(|_| format!("seq {q:?} is not a number"))?;
        let q = q.max(crate::replication::core::vv_get(&vv, o));
        crate::replication::core::vv_set(&mut vv, o, q);
    }
    Ok(vv)
}

/// Formats a version vector as `ORIGIN:SEQ,...`.
pub fn format_vv(vv: &[(u64, u64)]) -> String {
    vv.iter()
        .map(|(o, q)| format!("{o:016x}:{q}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Header marking a read another node forwarded here (served locally, never forwarded on).
const FORWARDED: &str = "x-shoal-forwarded";

/// When this node does not replicate the partition, the address of a live replica to
/// forward a read to.
fn forward_target(
    s: &AppState,
    topic: &str,
    partition: u32,
    headers: &HeaderMap,
) -> Option<String> {
    if headers.contains_key(FORWARDED) {
        return None;
    }
    let cfg = s.storage.topic(topic)?;
    let view = s.view.borrow().clone();
    let replicas = view.replicas(topic, partition, cfg.replication_factor);
    if replicas.contains(&view.me) {
        return None;
    }
    replicas
        .first()
        .and_then(|r| view.peer(r))
        .map(|m| m.http_addr.clone())
}

/// Serves a read from another node (a live replica), passing its reply through.
async fn forward(s: &AppState, http_addr: &str, uri: &Uri) -> Result<Response, ApiError> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let me = s.view.borrow().me.clone();
    let resp = reqwest::Client::new()
        .get(format!("http://{http_addr}{path}"))
        .header(FORWARDED, me)
        .timeout(Duration::from_secs(70))
        .send()
        .await
        .map_err(|e| ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: format!("this node does not hold the partition and its replica at {http_addr} did not answer: {e}"),
        })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await.map_err(|e| ApiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("reading the forwarded reply failed: {e}"),
    })?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Where a read starts.
enum From {
    Beginning,
    Latest,
    Offset(u64),
    Time(u64),
}

fn parse_from(s: Option<&str>) -> Result<From, ApiError> {
    let Some(s) = s else {
        return Ok(From::Beginning);
    };
    if s == "beginning" || s == "earliest" {
        return Ok(From::Beginning);
    }
    if s == "latest" || s == "end" {
        return Ok(From::Latest);
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(From::Offset(n));
    }
    if let Some(ms) = s.strip_prefix("time:") {
        return ms.parse::<u64>().map(From::Time).map_err(|_| {
            ApiError::bad_request(format!("from={s}: time: needs Unix milliseconds"))
        });
    }
    humantime::parse_rfc3339_weak(s)
        .map(|t| {
            From::Time(
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            )
        })
        .map_err(|_| {
            ApiError::bad_request(format!(
                "from={s:?} is not beginning, latest, an offset, an RFC 3339 time \
                 (2026-01-02T03:04:05Z) or time:<unix ms>"
            ))
        })
}

async fn resolve_from(
    s: &AppState,
    topic: &str,
    partition: PartitionId,
    from: From,
) -> Result<Offset, ApiError> {
    let storage = s.storage.clone();
    let topic = topic.to_string();
    Ok(tokio::task::spawn_blocking(move || match from {
        From::Beginning => storage
            .partition_meta(&topic, partition)
            .map(|m| Offset(m.log_start)),
        From::Latest => storage
            .partition_meta(&topic, partition)
            .map(|m| Offset(m.next_offset)),
        From::Offset(o) => storage.partition_meta(&topic, partition).map(|_| Offset(o)),
        From::Time(t) => storage.offset_for_time(&topic, partition, t),
    })
    .await??)
}

async fn read_page(
    s: &AppState,
    topic: &str,
    partition: PartitionId,
    from: Offset,
    limit: usize,
) -> Result<crate::storage::ReadBatch, ApiError> {
    let storage = s.storage.clone();
    let topic = topic.to_string();
    Ok(
        tokio::task::spawn_blocking(move || storage.read(&topic, partition, from, limit, 4 << 20))
            .await??,
    )
}

/// `GET /v1/topics/{topic}/partitions/{p}/records?from=&limit=&wait_ms=`
pub async fn read(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    path: Result<Path<(String, u32)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((topic, partition)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    match q.scope.as_deref() {
        None => {
            if let Some(addr) = forward_target(&s, &topic, partition, &headers) {
                return forward(&s, &addr, &uri).await;
            }
        }
        Some("local") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "scope={other:?}: use scope=local or leave it out"
            )));
        }
    }
    let partition = PartitionId(partition);
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    if let Some(after) = &q.after {
        if q.from.is_some() {
            return Err(ApiError::bad_request(
                "give either from= or after=, not both",
            ));
        }
        let have =
            parse_vv(after).map_err(|e| ApiError::bad_request(format!("after={after:?}: {e}")))?;
        let storage = s.storage.clone();
        let t = topic.clone();
        let h = have.clone();
        let (records, _) = tokio::task::spawn_blocking(move || {
            // Start at the first record the reader lacks (found from the end of the log).
            let from = storage.resume_offset(&t, partition, &h)?;
            storage.scan_missing(&t, partition, from, &h, None, limit, 4 << 20)
        })
        .await??;
        let mut vv = have;
        for r in &records {
            let (o, q) = (r.id.origin.0, r.id.seq.0);
            if q > crate::replication::core::vv_get(&vv, o) {
                crate::replication::core::vv_set(&mut vv, o, q);
            }
        }
        return Ok(axum::Json(json!({
            "topic": topic,
            "partition": partition.0,
            "records": records.iter().map(|r| {
                let mut v = record_json(partition.0, Offset(0), r);
                if let Some(m) = v.as_object_mut() { m.remove("offset"); }
                v
            }).collect::<Vec<_>>(),
            "version_vector": format_vv(&vv),
            "served_by": s.view.borrow().me,
        }))
        .into_response());
    }
    let from = resolve_from(&s, &topic, partition, parse_from(q.from.as_deref())?).await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut commits = s.storage.watch_commits();
    let batch = loop {
        commits.borrow_and_update();
        let batch = read_page(&s, &topic, partition, from, limit).await?;
        if !batch.records.is_empty() || tokio::time::Instant::now() >= deadline {
            break batch;
        }
        tokio::select! {
            _ = s.shutdown.cancelled() => break batch,
            _ = tokio::time::sleep_until(deadline) => {}
            changed = commits.changed() => if changed.is_err() { break batch },
        }
    };
    let next = batch
        .records
        .last()
        .map_or(from.max(batch.log_start), |(o, _)| Offset(o.0 + 1));
    Ok(axum::Json(json!({
        "topic": topic,
        "partition": partition.0,
        "records": batch.records.iter()
            .map(|(o, r)| record_json(partition.0, *o, r))
            .collect::<Vec<_>>(),
        "next_offset": next.0,
        "log_start": batch.log_start.0,
        "end_offset": batch.next_offset.0,
        "served_by": s.view.borrow().me,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    from: Option<String>,
}

/// `GET /v1/topics/{topic}/partitions/{p}/stream?from=` — Server-Sent Events, one `record`
/// event per record (its `id` is the offset), until the client goes away or the node stops.
pub async fn stream(
    State(s): State<AppState>,
    path: Result<Path<(String, u32)>, axum::extract::rejection::PathRejection>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((topic, partition)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let partition = PartitionId(partition);
    let from = resolve_from(&s, &topic, partition, parse_from(q.from.as_deref())?).await?;
    let commits = s.storage.watch_commits();
    let init = (
        s,
        topic,
        partition,
        from,
        commits,
        Vec::<Event>::new(),
        false,
    );
    let events = futures::stream::unfold(
        init,
        |(s, topic, partition, mut next, mut commits, mut queue, failed)| async move {
            if failed {
                return None;
            }
            loop {
                if let Some(e) = queue.pop() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(e),
                        (s, topic, partition, next, commits, queue, false),
                    ));
                }
                commits.borrow_and_update();
                match read_page(&s, &topic, partition, next, 500).await {
                    Ok(batch) if !batch.records.is_empty() => {
                        for (o, r) in batch.records.iter().rev() {
                            let data = record_json(partition.0, *o, r).to_string();
                            queue.push(
                                Event::default()
                                    .event("record")
                                    .id(o.0.to_string())
                                    .data(data),
                            );
                        }
                        next = batch.records.last().map_or(next, |(o, _)| Offset(o.0 + 1));
                        continue;
                    }
                    Ok(batch) => next = next.max(batch.log_start),
                    Err(e) => {
                        let data = json!({ "error": e.message }).to_string();
                        let ev = Event::default().event("error").data(data);
                        // Report the error once, then end the stream.
                        return Some((Ok(ev), (s, topic, partition, next, commits, queue, true)));
                    }
                }
                tokio::select! {
                    _ = s.shutdown.cancelled() => return None,
                    changed = commits.changed() => if changed.is_err() { return None },
                }
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// One line of a bulk ingest body (borrowing from the body where it can: this is the
/// backfill hot path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestLine<'a> {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    /// A string is stored as its UTF-8 bytes; any other JSON value as its text.
    #[serde(default, borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    payload_base64: Option<String>,
    /// Unix milliseconds or an RFC 3339 time.
    #[serde(default)]
    event_time: Option<Value>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    partition: Option<u32>,
    /// Idempotent ingest: a producer id and a sequence number unique within it; a line
    /// whose (producer, sequence) was already stored in this topic is skipped.
    #[serde(default)]
    producer: Option<String>,
    #[serde(default)]
    sequence: Option<u64>,
}

/// A parsed ingest line.
#[derive(Debug)]
struct Parsed {
    partition: PartitionId,
    record: NewRecord,
    dedup: Option<(String, u64)>,
}

fn parse_line(n: usize, line: &str, partitions: u32) -> Result<Parsed, String> {
    let l: IngestLine = serde_json::from_str(line).map_err(|e| format!("line {n}: {e}"))?;
    let dedup = match (l.producer, l.sequence) {
        (Some(p), Some(s)) if !p.is_empty() && p.len() <= 128 => Some((p, s)),
        (Some(_), Some(_)) => {
            return Err(format!("line {n}: producer must be 1 to 128 characters"));
        }
        (None, None) => None,
        _ => {
            return Err(format!(
                "line {n}: give both producer and sequence, or neither"
            ));
        }
    };
    let payload = match (l.payload, l.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "line {n}: give payload or payload_base64, not both"
            ));
        }
        (Some(raw), None) if raw.get().starts_with('"') => Bytes::from(
            serde_json::from_str::<String>(raw.get())
                .map_err(|e| format!("line {n}: payload: {e}"))?,
        ),
        (Some(raw), None) if raw.get() == "null" => {
            return Err(format!("line {n}: payload is null; send a value"));
        }
        // Numbers, objects and arrays are stored as their JSON text, as sent.
        (Some(raw), None) => Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(b)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| format!("line {n}: payload_base64: {e}"))?,
        ),
        (None, None) => return Err(format!("line {n}: missing \"payload\"")),
    };
    let event_time_ms = match l.event_time {
        None | Some(Value::Null) => None,
        Some(Value::Number(x)) => Some(x.as_u64().ok_or_else(|| {
            format!("line {n}: event_time must be non-negative Unix milliseconds")
        })?),
        Some(Value::String(s)) => Some(
            humantime::parse_rfc3339_weak(&s)
                .map_err(|e| format!("line {n}: event_time {s:?}: {e}"))?
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ),
        Some(other) => {
            return Err(format!(
                "line {n}: event_time must be Unix milliseconds or an RFC 3339 string, not {other}"
            ));
        }
    };
    let subject = l.subject.unwrap_or_default();
    let key = Bytes::from(l.key.unwrap_or_else(|| subject.clone()));
    let partition = match l.partition {
        Some(p) if p >= partitions => {
            return Err(format!(
                "line {n}: partition {p} does not exist (the topic has {partitions})"
            ));
        }
        Some(p) => PartitionId(p),
        None => partition_for(&key, partitions),
    };
    let headers = l
        .headers
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Bytes::from(v)))
        .collect();
    Ok(Parsed {
        partition,
        record: NewRecord {
            key,
            subject,
            payload,
            headers,
            event_time_ms,
        },
        dedup,
    })
}

/// Parses an ingest body into append operations (all lines checked before any is written).
fn parse_body(body: &[u8], topic: &str, partitions: u32) -> Result<Vec<Op>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
    let name: std::sync::Arc<str> = std::sync::Arc::from(topic);
    let mut ops = Vec::new();
    let mut producers: Vec<std::sync::Arc<str>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p = parse_line(i + 1, line, partitions).map_err(ApiError::bad_request)?;
        ops.push(match p.dedup {
            None => Op::Append {
                topic: name.clone(),
                partition: p.partition,
                record: p.record,
            },
            Some((producer, sequence)) => {
                // One shared string per producer in a body.
                let producer = match producers.iter().find(|x| ***x == *producer) {
                    Some(x) => x.clone(),
                    None => {
                        let x: std::sync::Arc<str> = std::sync::Arc::from(producer.as_str());
                        producers.push(x.clone());
                        x
                    }
                };
                Op::AppendOnce {
                    topic: name.clone(),
                    partition: p.partition,
                    record: p.record,
                    producer,
                    sequence,
                }
            }
        });
    }
    Ok(ops)
}

/// `POST /v1/topics/{topic}/records` with one JSON object per line. All lines are checked
/// before anything is written; the reply comes once every record is durable, and the whole
/// body is committed atomically.
pub async fn ingest(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let cfg = s
        .storage
        .topic(&topic)
        .ok_or_else(|| StorageError::UnknownTopic(topic.clone()))?;
    // Parsing a large body is CPU work: keep it off the async workers.
    let partitions = cfg.partitions;
    let ops = tokio::task::spawn_blocking(move || parse_body(&body, &topic, partitions)).await??;
    if ops.is_empty() {
        return Err(ApiError::bad_request(
            "body has no records; send one JSON object per line, e.g. {\"subject\": \"s/1\", \"payload\": 21.5}",
        ));
    }
    let topic_arc: std::sync::Arc<str> = std::sync::Arc::from(cfg.name.as_str());
    let ops_partitions: Vec<PartitionId> = ops
        .iter()
        .map(|op| match op {
            Op::Append { partition, .. } | Op::AppendOnce { partition, .. } => *partition,
            _ => PartitionId(0),
        })
        .collect();
    let outcomes = s.storage.write(ops).await?;
    // The reply waits for the topic's acks policy (I4); 503 when it is not met in time.
    let writes: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            OpOutcome::Appended { partition, id, .. } => Some((topic_arc.clone(), *partition, *id)),
            _ => None,
        })
        .collect();
    s.replication.wait(&writes).await?;
    // Lines skipped as already stored (a retried load) were perhaps never acknowledged
    // (an earlier reply was a 503): wait for their partitions too.
    let mut dup_partitions: Vec<PartitionId> = ops_partitions
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, OpOutcome::Duplicate))
        .map(|(p, _)| *p)
        .collect();
    dup_partitions.sort();
    dup_partitions.dedup();
    for p in dup_partitions {
        s.replication.wait_partition(&topic_arc, p).await?;
    }
    let duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, OpOutcome::Duplicate))
        .count();
    let n = outcomes.len() - duplicates;
    METRICS.http_ingested_records.inc_by(n as u64);
    // Per-record ids for small bodies; per-partition ranges always (building one JSON object
    // per record would cost more than storing it on a large backfill).
    let mut ranges: std::collections::BTreeMap<u32, (u64, u64, u64)> = Default::default();
    let mut ids = Vec::new();
    let small = outcomes.len() <= 1000;
    for o in &outcomes {
        if let OpOutcome::Appended {
            partition,
            offset,
            id,
        } = o
        {
            let r = ranges.entry(partition.0).or_insert((offset.0, offset.0, 0));
            r.0 = r.0.min(offset.0);
            r.1 = r.1.max(offset.0);
            r.2 += 1;
            if small {
                ids.push(
                    json!({ "partition": partition.0, "offset": offset.0, "id": id.to_string() }),
                );
            }
        }
    }
    let partitions: Vec<Value> = ranges
        .into_iter()
        .map(|(p, (first, last, count))| {
            json!({ "partition": p, "first_offset": first, "last_offset": last, "records": count })
        })
        .collect();
    let mut reply = json!({ "accepted": n, "duplicates": duplicates, "partitions": partitions });
    if small {
        reply["records"] = Value::Array(ids);
    }
    Ok(axum::Json(reply).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_lines() {
        let parsed =
            parse_line(1, r#"{"subject":"s/1","payload":21.5,"event_time":5}"#, 8).unwrap();
        let (p, r) = (parsed.partition, parsed.record);
        assert_eq!(r.payload, Bytes::from("21.5"));
        assert_eq!(r.key, Bytes::from("s/1"));
        assert_eq!(r.event_time_ms, Some(5));
        assert_eq!(p, partition_for(b"s/1", 8));
        let r = parse_line(
            1,
            r#"{"payload":"x","event_time":"1970-01-01T00:00:01Z"}"#,
            8,
        )
        .unwrap()
        .record;
        assert_eq!(r.event_time_ms, Some(1000));
        for (bad, needle) in [
            ("{", "line 1"),
            (r#"{"subject":"x"}"#, "missing"),
            (r#"{"payload":1,"partition":8}"#, "partition 8"),
            (r#"{"payload":1,"event_time":-1}"#, "event_time"),
            (r#"{"payload":1,"oops":1}"#, "unknown field"),
            (r#"{"payload_base64":"%%"}"#, "payload_base64"),
            (
                r#"{"payload":1,"producer":"p"}"#,
                "both producer and sequence",
            ),
            (r#"{"payload":1,"producer":"","sequence":1}"#, "1 to 128"),
        ] {
            let e = parse_line(1, bad, 8).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn binary_payloads_are_marked() {
        let mut v = json!({});
        put_bytes(&mut v, "payload", &[0xff, 0x00]);
        assert_eq!(v["payload_base64"], json!("/wA="));
        assert!(v.get("payload").is_none());
    }
}
