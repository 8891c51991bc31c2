//! Alerts out of the node. Every alert is a record in the internal `_alerts` topic (one
//! partition, so alerts have one order), with subject `shoal/alerts/{consumer}/{key}`:
//! MQTT subscribers of that topic get it through the ordinary delivery path, the HTTP API
//! lists and streams `_alerts`, and each consumer with a webhook gets a task that POSTs its
//! alerts in order, retrying with backoff, with the alert id as `Idempotency-Key`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consumers::ALERTS_TOPIC;
use crate::metrics::METRICS;
use crate::storage::{Op, Storage};
use crate::types::{Offset, PartitionId};

/// Longest pause between webhook retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Delivers `consumer`'s alerts to `url` until cancelled. Its position in `_alerts` is
/// stored (cursor `webhook/{consumer}`), so a restart resumes without losing any alert; a
/// receiver may see an alert twice across a crash and dedupes on the idempotency key.
pub async fn webhook_task(
    storage: Storage,
    consumer: String,
    url: String,
    cancel: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(consumer = %consumer, error = %e, "cannot build webhook client");
            return;
        }
    };
    let cursor_name = format!("webhook/{consumer}");
    let st = storage.clone();
    let cn = cursor_name.clone();
    let mut next = match tokio::task::spawn_blocking(move || st.cursor(&cn)).await {
        Ok(Ok(c)) => c.unwrap_or(0),
        _ => 0,
    };
    let mut commits = storage.watch_commits();
    while !cancel.is_cancelled() {
        commits.borrow_and_update();
        let st = storage.clone();
        let batch = tokio::task::spawn_blocking(move || {
            st.read(ALERTS_TOPIC, PartitionId(0), Offset(next), 100, 1 << 20)
        })
        .await;
        let batch = match batch {
            Ok(Ok(b)) => b,
            _ => return,
        };
        next = next.max(batch.log_start.0);
        if batch.records.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = commits.changed() => continue,
            }
        }
        for (offset, r) in &batch.records {
            let mine = r
                .headers
                .iter()
                .any(|(k, v)| k == "shoal.consumer" && v[..] == *consumer.as_bytes());
            if mine {
                let id = String::from_utf8_lossy(&r.key).into_owned();
                let mut backoff = Duration::from_millis(100);
                loop {
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("idempotency-key", &id)
                        .body(r.payload.clone())
                        .send()
                        .await;
                    match sent {
                        Ok(resp) if resp.status().is_success() => {
                            METRICS.webhook_deliveries.inc();
                            break;
                        }
                        other => {
                            METRICS.webhook_failures.inc();
                            let why = match other {
                                Ok(resp) => format!("HTTP {}", resp.status()),
                                Err(e) => e.to_string(),
                            };
                            tracing::warn!(consumer = %consumer, alert = %id, error = %why, "webhook delivery failed; retrying");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
            next = offset.0 + 1;
        }
        if storage
            .write(vec![Op::SetCursor {
                name: cursor_name.clone(),
                offset: next,
            }])
            .await
            .is_err()
        {
            return;
        }
    }
}
