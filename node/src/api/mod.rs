//! The HTTP API (axum): health, readiness, Prometheus metrics, topics, reading records by
//! offset (one page, long poll, or an SSE stream) and bulk ingest of JSON lines that answers
//! only once every record is durable. Errors are JSON `{"error": "..."}` with a message a
//! person can act on. Request bodies are parsed here, never by an extractor that answers in
//! plain text.

mod consumers;
mod records;

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::parse_duration;
use crate::metrics::METRICS;
use crate::node::AppState;
use crate::storage::{Acks, StorageError, TopicConfig};
use crate::types::{PartitionId, now_ms, validate_topic_name};

/// Largest ingest body accepted.
pub const MAX_BODY: usize = 64 << 20;

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        let status = match &e {
            StorageError::UnknownTopic(_) | StorageError::UnknownPartition { .. } => {
                StatusCode::NOT_FOUND
            }
            StorageError::TopicExists(_) => StatusCode::CONFLICT,
            StorageError::InvalidTopic(_) => StatusCode::BAD_REQUEST,
            StorageError::ShuttingDown | StorageError::NotReplicated(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            StorageError::Failed(_) | StorageError::Db(_) | StorageError::Corrupt { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

/// A body that could not be read (too large, cut short) as a JSON error.
impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> ApiError {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the body is larger than {MAX_BODY} bytes; split it into several requests")
        } else {
            format!("cannot read the body: {}", e.body_text())
        };
        ApiError { status, message }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("internal task failed: {e}"),
        }
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/sessions/{client_id}", get(session))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route("/v1/topics/{topic}", get(describe_topic))
        .route(
            "/v1/topics/{topic}/records",
            axum::routing::post(records::ingest),
        )
        .route(
            "/v1/topics/{topic}/partitions/{partition}/records",
            get(records::read),
        )
        .route(
            "/v1/topics/{topic}/partitions/{partition}/stream",
            get(records::stream),
        )
        .route("/v1/consumers", get(consumers::list))
        .route(
            "/v1/consumers/{name}",
            get(consumers::status)
                .put(consumers::deploy)
                .delete(consumers::remove),
        )
        .route("/v1/alerts", get(consumers::alerts))
        .route("/v1/alerts/stream", get(consumers::stream))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; see the HTTP API section of README.md".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "this endpoint does not take that method; see the HTTP API section of README.md"
            .into(),
    }
}

async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::SeqCst) && !s.shutdown.is_cancelled() {
        axum::Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "not ready" })),
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.render(),
    )
        .into_response()
}

fn topic_json(t: &TopicConfig) -> Value {
    json!({
        "name": t.name,
        "partitions": t.partitions,
        "replication_factor": t.replication_factor,
        "acks": t.acks,
        "retention_ms": t.retention_ms,
        "retention_bytes": t.retention_bytes,
        "created_ms": t.created_ms,
        "internal": t.name.starts_with('_'),
    })
}

/// `GET /v1/sessions/{client_id}`: a persistent MQTT session as this node holds it.
async fn session(
    State(s): State<AppState>,
    Path(client_id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let st = s.storage.clone();
    let id = client_id.clone();
    let found = tokio::task::spawn_blocking(move || st.session(&id)).await??;
    let Some(state) = found else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no persistent session for client id {client_id:?} on this node"),
        });
    };
    Ok(axum::Json(json!({
        "client_id": client_id,
        "subscriptions": state.subscriptions.iter()
            .map(|(f, q)| json!({ "filter": f, "qos": q }))
            .collect::<Vec<_>>(),
        "updated_ms": state.updated_ms,
    })))
}

/// `GET /v1/cluster`: members with liveness, and where every partition lives.
async fn cluster(State(s): State<AppState>) -> axum::Json<Value> {
    let view = s.view.borrow().clone();
    let mut partitions = Vec::new();
    for t in s.storage.topics() {
        for p in 0..t.partitions {
            let r = view.replicas(&t.name, p, t.replication_factor);
            partitions.push(json!({
                "topic": t.name,
                "partition": p,
                "replication_factor": t.replication_factor,
                "replicas": r,
                "owner": r.first(),
                // Fewer live replicas than the cluster can give it (R capped by members
                // known, dead ones included): a member is down.
                "under_replicated": r.len() < (t.replication_factor as usize).min(view.members.len()),
            }));
        }
    }
    let members: Vec<Value> = view
        .members
        .values()
        .map(|m| {
            json!({
                "node_id": m.node_id,
                "self": m.node_id == view.me,
                "live": m.live,
                "origin": format!("{:016x}", m.origin),
                "generation": m.generation,
                "mqtt_addr": m.mqtt_addr,
                "http_addr": m.http_addr,
                "peer_addr": m.peer_addr.map(|a| a.to_string()),
                "version": m.version,
            })
        })
        .collect();
    axum::Json(json!({
        "node_id": view.me,
        "members": members,
        "partitions": partitions,
    }))
}

async fn list_topics(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({
        "topics": s.storage.topics().iter().map(topic_json).collect::<Vec<_>>()
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    name: String,
    #[serde(default)]
    partitions: Option<u32>,
    #[serde(default)]
    replication_factor: Option<u32>,
    #[serde(default)]
    acks: Option<Acks>,
    /// "7d", "12h", ... or null for no age limit; absent means the default (7d).
    #[serde(default, deserialize_with = "present")]
    retention: Option<Option<String>>,
    #[serde(default)]
    retention_bytes: Option<u64>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn create_topic(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let req: CreateTopic = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be JSON like {{\"name\": \"sensors\", \"partitions\": 8}}: {e}"
        ))
    })?;
    validate_topic_name(&req.name, false).map_err(ApiError::bad_request)?;
    let defaults = crate::config::TopicSettings::defaults(&req.name);
    // Absent: the default; explicit null: keep forever.
    let retention_ms = match req.retention.unwrap_or(defaults.retention) {
        None => None,
        Some(text) => Some(
            parse_duration(&text)
                .map_err(|e| ApiError::bad_request(format!("retention {text:?}: {e}")))?
                .as_millis() as u64,
        ),
    };
    if retention_ms.is_some_and(|ms| ms < 1000) {
        return Err(ApiError::bad_request(
            "retention must be at least 1s (use null to keep records forever)",
        ));
    }
    if req.retention_bytes.is_some_and(|b| b < 4096) {
        return Err(ApiError::bad_request(
            "retention_bytes must be at least 4096",
        ));
    }
    let partitions = req.partitions.unwrap_or(defaults.partitions);
    if partitions == 0 || partitions > 4096 {
        return Err(ApiError::bad_request(format!(
            "partitions must be between 1 and 4096, not {partitions}"
        )));
    }
    let rf = req
        .replication_factor
        .unwrap_or(defaults.replication_factor);
    if rf == 0 {
        return Err(ApiError::bad_request(
            "replication_factor must be at least 1",
        ));
    }
    let cfg = TopicConfig {
        name: req.name,
        partitions,
        replication_factor: rf,
        acks: req.acks.unwrap_or(defaults.acks),
        retention_ms,
        retention_bytes: req.retention_bytes,
        created_ms: now_ms(),
    };
    let cfg = s.storage.create_topic(cfg).await?;
    Ok((StatusCode::CREATED, axum::Json(topic_json(&cfg))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DescribeQuery {
    /// `local`: only this node's copy (what peers ask each other for).
    #[serde(default)]
    scope: Option<String>,
}

fn vv_json(vv: &[(u64, u64)]) -> Value {
    vv.iter()
        .map(|(o, s)| (format!("{o:016x}"), json!(s)))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

/// Every replica's version vector and digest of each partition, asked of the replicas
/// themselves (`scope=local`), so convergence can be checked from any node.
async fn replica_views(s: &AppState, topic: &str, out: &mut Value) {
    let view = s.view.borrow().clone();
    let Some(cfg) = s.storage.topic(topic) else {
        return;
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build();
    let mut remote: std::collections::HashMap<String, Value> = Default::default();
    let nodes: std::collections::BTreeSet<String> = (0..cfg.partitions)
        .flat_map(|p| view.replicas(topic, p, cfg.replication_factor))
        .filter(|n| *n != view.me)
        .collect();
    if let Ok(client) = client {
        let asks = nodes.iter().filter_map(|n| {
            let m = view.peer(n)?;
            let url = format!("http://{}/v1/topics/{topic}?scope=local", m.http_addr);
            let client = client.clone();
            let n = n.clone();
            Some(async move {
                let v = async { client.get(url).send().await?.json::<Value>().await }.await;
                (n, v.ok())
            })
        });
        for (n, v) in futures::future::join_all(asks).await {
            if let Some(v) = v {
                remote.insert(n, v);
            }
        }
    }
    let Some(parts) = out["partitions_detail"].as_array_mut() else {
        return;
    };
    for (p, part) in parts.iter_mut().enumerate() {
        let replicas = view.replicas(topic, p as u32, cfg.replication_factor);
        let list: Vec<Value> = replicas
            .iter()
            .map(|n| {
                let detail = if *n == view.me {
                    Some(part.clone())
                } else {
                    remote.get(n).map(|v| v["partitions_detail"][p].clone())
                };
                match detail {
                    Some(d) => json!({
                        "node_id": n,
                        "reachable": true,
                        "version_vector": d["version_vector"],
                        "digest": d["digest"],
                        "records": d["records"],
                    }),
                    None => json!({ "node_id": n, "reachable": false }),
                }
            })
            .collect();
        let digests: std::collections::BTreeSet<String> = list
            .iter()
            .filter_map(|r| r["digest"].as_str().map(String::from))
            .collect();
        part["replicas"] = json!(list);
        part["converged"] =
            json!(digests.len() == 1 && list.iter().all(|r| r["reachable"] == json!(true)));
    }
}

async fn describe_topic(
    State(s): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<DescribeQuery>,
) -> Result<axum::Json<Value>, ApiError> {
    let cfg = s
        .storage
        .topic(&topic)
        .ok_or_else(|| StorageError::UnknownTopic(topic.clone()))?;
    let storage = s.storage.clone();
    let name = topic.clone();
    let metas = tokio::task::spawn_blocking(move || {
        (0..cfg.partitions)
            .map(|p| storage.partition_meta(&name, PartitionId(p)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let cfg = s
        .storage
        .topic(&topic)
        .ok_or_else(|| StorageError::UnknownTopic(topic.clone()))?;
    let mut out = topic_json(&cfg);
    out["partitions_detail"] = metas
        .iter()
        .enumerate()
        .map(|(p, m)| {
            json!({
                "partition": p,
                "log_start": m.log_start,
                "next_offset": m.next_offset,
                "records": m.next_offset - m.log_start,
                "bytes": m.bytes,
                "version_vector": vv_json(&m.version_vector),
                "digest": format!("{:016x}", crate::replication::digest(&m.version_vector)),
            })
        })
        .collect();
    out["records"] = json!(
        metas
            .iter()
            .map(|m| m.next_offset - m.log_start)
            .sum::<u64>()
    );
    out["bytes"] = json!(metas.iter().map(|m| m.bytes).sum::<u64>());
    out["node_id"] = json!(s.view.borrow().me);
    match q.scope.as_deref() {
        Some("local") => {}
        None => replica_views(&s, &topic, &mut out).await,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "scope={other:?}: use scope=local or leave it out"
            )));
        }
    }
    Ok(axum::Json(out))
}
