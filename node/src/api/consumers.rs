//! Consumers and alerts over HTTP: deploy (`PUT`), list, status, remove; list and stream
//! alerts. Deploy and remove need `Authorization: Bearer <api_token>` when a token is set.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::consumers::{ALERTS_TOPIC, DeployError, DeployRequest};
use crate::node::AppState;
use crate::storage::StartFrom;
use crate::types::{Offset, PartitionId};
use axum::extract::rejection::BytesRejection;

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> ApiError {
        match e {
            DeployError::BadRequest(m) => ApiError::bad_request(m),
            DeployError::NotFound(_) => ApiError {
                status: StatusCode::NOT_FOUND,
                message: e.to_string(),
            },
            DeployError::Module(m) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("module refused: {m}"),
            },
            DeployError::Storage(s) => s.into(),
        }
    }
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.api_token else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g == token => Ok(()),
        Some(_) => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "the API token is wrong".into(),
        }),
        None => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "this node requires an API token: send Authorization: Bearer <token> \
                      (shoal ... --token or SHOAL_API_TOKEN)"
                .into(),
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    module_base64: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    start: Option<StartFrom>,
    #[serde(default)]
    webhook: Option<String>,
}

/// `PUT /v1/consumers/{name}`
pub async fn deploy(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    authorize(&s, &headers)?;
    let b: DeployBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be JSON like {{\"module_base64\": \"...\", \"topic\": \"telemetry\", \"filter\": \"#\", \"config\": {{}}}}: {e}"
        ))
    })?;
    let module = base64::engine::general_purpose::STANDARD
        .decode(b.module_base64.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("module_base64: {e}")))?;
    let existed = s.consumers.status(&name).is_some();
    let status = s
        .consumers
        .deploy(DeployRequest {
            name,
            module: Bytes::from(module),
            topic: b
                .topic
                .unwrap_or_else(|| crate::config::DEFAULT_TOPIC.into()),
            filter: b.filter.unwrap_or_else(|| "#".into()),
            config: b.config.unwrap_or_else(|| json!({})).to_string(),
            start: b.start.unwrap_or_default(),
            webhook: b.webhook,
        })
        .await?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, axum::Json(status)).into_response())
}

/// `GET /v1/consumers`
pub async fn list(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(json!({ "consumers": s.consumers.list() }))
}

/// `GET /v1/consumers/{name}`
pub async fn status(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let st = s
        .consumers
        .status(&name)
        .ok_or(DeployError::NotFound(name))?;
    Ok(axum::Json(st).into_response())
}

/// `DELETE /v1/consumers/{name}`
pub async fn remove(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    s.consumers.remove(&name).await?;
    Ok(axum::Json(json!({ "removed": name })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    /// Offset in `_alerts` to start from (default 0).
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    wait_ms: Option<u64>,
    #[serde(default)]
    consumer: Option<String>,
}

fn alert_json(offset: Offset, payload: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("alert_offset".into(), json!(offset.0));
    }
    v
}

/// `GET /v1/alerts?from=&limit=&wait_ms=&consumer=`
pub async fn alerts(
    State(s): State<AppState>,
    query: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut from = q.from.unwrap_or(0);
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(q.wait_ms.unwrap_or(0)).min(Duration::from_secs(60));
    let mut commits = s.storage.watch_commits();
    let mut out = Vec::new();
    loop {
        commits.borrow_and_update();
        let st = s.storage.clone();
        let batch = tokio::task::spawn_blocking(move || {
            st.read(ALERTS_TOPIC, PartitionId(0), Offset(from), limit, 4 << 20)
        })
        .await??;
        from = from.max(batch.log_start.0);
        for (o, r) in &batch.records {
            from = o.0 + 1;
            let v = alert_json(*o, &r.payload);
            if q.consumer.as_deref().is_none_or(|c| v["consumer"] == c) && out.len() < limit {
                out.push(v);
            }
        }
        let scanned_all = batch.records.len() < limit;
        if !out.is_empty()
            || tokio::time::Instant::now() >= deadline
            || (!scanned_all && out.len() >= limit)
        {
            break;
        }
        if !scanned_all {
            continue;
        }
        tokio::select! {
            _ = s.shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            changed = commits.changed() => if changed.is_err() { break },
        }
    }
    Ok(axum::Json(json!({ "alerts": out, "next": from })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    consumer: Option<String>,
}

/// `GET /v1/alerts/stream?from=beginning|latest|OFFSET&consumer=` — one `alert` event per
/// alert (event id = its offset in `_alerts`).
pub async fn stream(
    State(s): State<AppState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let st = s.storage.clone();
    let meta = tokio::task::spawn_blocking(move || st.partition_meta(ALERTS_TOPIC, PartitionId(0)))
        .await??;
    let from = match q.from.as_deref() {
        None | Some("latest") => meta.next_offset,
        Some("beginning") => meta.log_start,
        Some(n) => n.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("from={n:?}: use beginning, latest or an offset"))
        })?,
    };
    let commits = s.storage.watch_commits();
    let init = (s, q.consumer, from, commits, Vec::<Event>::new());
    let events = futures::stream::unfold(
        init,
        |(s, consumer, mut next, mut commits, mut queue)| async move {
            loop {
                if let Some(e) = queue.pop() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(e),
                        (s, consumer, next, commits, queue),
                    ));
                }
                commits.borrow_and_update();
                let st = s.storage.clone();
                let from = next;
                let batch = tokio::task::spawn_blocking(move || {
                    st.read(ALERTS_TOPIC, PartitionId(0), Offset(from), 500, 4 << 20)
                })
                .await;
                let Ok(Ok(batch)) = batch else { return None };
                next = next.max(batch.log_start.0);
                if !batch.records.is_empty() {
                    for (o, r) in batch.records.iter().rev() {
                        let v = alert_json(*o, &r.payload);
                        if consumer.as_deref().is_none_or(|c| v["consumer"] == c) {
                            queue.push(
                                Event::default()
                                    .event("alert")
                                    .id(o.0.to_string())
                                    .data(v.to_string()),
                            );
                        }
                    }
                    next = batch.records.last().map_or(next, |(o, _)| o.0 + 1);
                    continue;
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
