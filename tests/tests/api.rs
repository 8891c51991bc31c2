//! The HTTP API: topics, bulk ingest, reads by offset and time, long poll, SSE, health and
//! metrics, and JSON errors for bad input.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use futures::StreamExt;
use rumqttc::QoS;
use serde_json::{Value, json};
use shoal_tests::{Client, TestNode};

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON reply"))
}

#[tokio::test]
async fn topics_create_list_describe_and_errors() {
    let n = TestNode::start().await;
    let base = n.url();
    let (s, v) = post(
        &format!("{base}/v1/topics"),
        json!({"name": "sensors", "partitions": 4, "acks": "local", "retention": "1h"}).to_string(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["partitions"], 4);
    assert_eq!(v["retention_ms"], 3_600_000);
    let (s, v) = post(
        &format!("{base}/v1/topics"),
        json!({"name": "sensors"}).to_string(),
    )
    .await;
    assert_eq!(s, 409);
    assert!(v["error"].as_str().unwrap().contains("already exists"));
    for (body, needle) in [
        ("{not json", "body must be JSON"),
        (r#"{"name": "bad name"}"#, "contains ' '"),
        (r#"{"name": "_internal"}"#, "reserved"),
        (r#"{"name": "x", "partitions": 0}"#, "partitions"),
        (r#"{"name": "x", "acks": "some"}"#, "acks"),
        (r#"{"name": "x", "retention": "forever-ish"}"#, "retention"),
    ] {
        let (s, v) = post(&format!("{base}/v1/topics"), body.to_string()).await;
        assert_eq!(s, 400, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle) || msg.contains("unknown variant"),
            "{body}: {msg}"
        );
    }
    let list = n.get("/v1/topics").await;
    let names: Vec<&str> = list["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "_alerts",
            "_checkpoints",
            "_consumers",
            "_dlq",
            "_retained",
            "_sessions",
            "sensors",
            "telemetry"
        ]
    );
    let d = n.get("/v1/topics/sensors").await;
    assert_eq!(d["partitions_detail"].as_array().unwrap().len(), 4);
    let missing = reqwest::get(format!("{base}/v1/topics/nope"))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let v: Value = missing.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("shoal topic create nope")
    );
    n.stop().await;
}

#[tokio::test]
async fn bulk_ingest_is_durable_and_all_or_nothing() {
    let n = TestNode::start().await;
    let base = n.url();
    let body = "{\"subject\":\"s/1\",\"payload\":21.5,\"event_time\":1000}\n\
                {\"subject\":\"s/1\",\"payload\":\"text\"}\n\
                {\"key\":\"k\",\"payload_base64\":\"/wA=\",\"headers\":{\"unit\":\"C\"}}\n";
    let (s, v) = post(&format!("{base}/v1/topics/telemetry/records"), body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["accepted"], 3);
    // A bad line rejects the whole body.
    let (s, v) = post(
        &format!("{base}/v1/topics/telemetry/records"),
        "{\"payload\":1}\n{\"payload\":\n",
    )
    .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("line 2"), "{v}");
    let (s, _) = post(&format!("{base}/v1/topics/nope/records"), "{\"payload\":1}").await;
    assert_eq!(s, 404);
    let (s, v) = post(&format!("{base}/v1/topics/telemetry/records"), "").await;
    assert_eq!(s, 400, "{v}");
    let recs = n.all_records("telemetry").await;
    assert_eq!(recs.len(), 3);
    let first = recs
        .iter()
        .find(|r| r["payload"] == "21.5")
        .expect("number payload");
    assert_eq!(first["event_time"], 1000);
    let bin = recs.iter().find(|r| r["key"] == "k").expect("binary");
    assert_eq!(bin["payload_base64"], "/wA=");
    assert_eq!(bin["headers"]["unit"], "C");
    n.stop().await;
}

#[tokio::test]
async fn reads_by_offset_latest_time_and_bad_parameters() {
    let n = TestNode::start().await;
    let base = n.url();
    let lines: String = (0..10)
        .map(|i| format!("{{\"subject\":\"s\",\"payload\":{i},\"partition\":0}}\n"))
        .collect();
    post(&format!("{base}/v1/topics/telemetry/records"), lines).await;
    let page = n
        .get("/v1/topics/telemetry/partitions/0/records?from=3&limit=4")
        .await;
    let offs: Vec<u64> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, vec![3, 4, 5, 6]);
    assert_eq!(page["next_offset"], 7);
    let latest = n
        .get("/v1/topics/telemetry/partitions/0/records?from=latest")
        .await;
    assert!(latest["records"].as_array().unwrap().is_empty());
    assert_eq!(latest["next_offset"], 10);
    let t0 = page["records"][0]["ingest_time"].as_u64().unwrap();
    let by_time = n
        .get(&format!(
            "/v1/topics/telemetry/partitions/0/records?from=time:{t0}&limit=1"
        ))
        .await;
    assert_eq!(
        by_time["records"][0]["offset"], 0,
        "all ten share one commit's ingest time"
    );
    let future = n
        .get("/v1/topics/telemetry/partitions/0/records?from=2999-01-01T00:00:00Z")
        .await;
    assert!(future["records"].as_array().unwrap().is_empty());
    for (q, status) in [
        ("from=yesterday-ish", 400),
        ("limit=x", 400),
        ("bogus=1", 400),
    ] {
        let r = reqwest::get(format!(
            "{base}/v1/topics/telemetry/partitions/0/records?{q}"
        ))
        .await
        .unwrap();
        assert_eq!(r.status().as_u16(), status, "{q}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{q}: {v}");
    }
    let r = reqwest::get(format!("{base}/v1/topics/telemetry/partitions/99/records"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    n.stop().await;
}

#[tokio::test]
async fn long_poll_and_sse_follow_new_records() {
    let n = TestNode::start().await;
    let base = n.url();
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    // Partition of this key, from the partitioner.
    let part = shoal::route::partition_for(b"follow/me", 8).0;
    let poll = tokio::spawn({
        let base = base.clone();
        async move {
            let v: Value = reqwest::get(format!(
                "{base}/v1/topics/telemetry/partitions/{part}/records?from=latest&wait_ms=20000"
            ))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
            v
        }
    });
    let sse = reqwest::get(format!(
        "{base}/v1/topics/telemetry/partitions/{part}/stream?from=beginning"
    ))
    .await
    .unwrap();
    assert_eq!(
        sse.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    // Publish until the long poll (which may have started after the first) returns.
    let mut i = 0;
    while !poll.is_finished() {
        p.publish_acked(
            "follow/me",
            QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(i < 200, "long poll never returned");
    }
    let v = poll.await.unwrap();
    assert_eq!(v["records"][0]["subject"], "follow/me");
    let mut body = sse.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"payload\":\"0\"") {
        let chunk = tokio::time::timeout(shoal_tests::DEADLINE, body.next())
            .await
            .expect("sse chunk")
            .expect("stream open")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: record"), "{text}");
    assert!(text.contains("id: 0"), "{text}");
    n.stop().await;
}

#[tokio::test]
async fn health_readiness_metrics_and_unknown_paths() {
    let n = TestNode::start().await;
    assert_eq!(n.get("/healthz").await["status"], "ok");
    assert_eq!(n.get("/readyz").await["status"], "ready");
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("m", QoS::AtLeastOnce, false, b"1").await;
    let text = reqwest::get(format!("{}/metrics", n.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "shoal_storage_commits_total",
        "shoal_mqtt_publish_received_total",
        "shoal_mqtt_ack_seconds_bucket",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics");
    }
    let r = reqwest::get(format!("{}/v2/nothing", n.url()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string());
    n.stop().await;
}

#[tokio::test]
async fn retention_trims_old_records_in_the_background() {
    let n = TestNode::start_with(|c| {
        c.storage.retention_interval = Duration::from_millis(100);
        c.topics = vec![shoal::config::TopicSettings {
            name: "small".into(),
            partitions: 1,
            replication_factor: 1,
            acks: shoal::storage::Acks::Local,
            retention: None,
            retention_bytes: Some(2000),
        }];
    })
    .await;
    let lines: String = (0..100)
        .map(|i| format!("{{\"payload\":\"{i:0>50}\"}}\n"))
        .collect();
    let (s, _) = post(&format!("{}/v1/topics/small/records", n.url()), lines).await;
    assert_eq!(s, 200);
    let d = shoal_tests::eventually("retention trims the partition", || async {
        let d = n.get("/v1/topics/small").await;
        (d["partitions_detail"][0]["log_start"].as_u64().unwrap_or(0) > 0).then_some(d)
    })
    .await;
    let p = &d["partitions_detail"][0];
    assert!(p["bytes"].as_u64().unwrap() <= 2000, "{p}");
    assert_eq!(p["next_offset"], 100);
    // Reading from the beginning starts at the new log start.
    let page = n
        .get("/v1/topics/small/partitions/0/records?from=beginning&limit=1")
        .await;
    assert_eq!(page["records"][0]["offset"], p["log_start"]);
    n.stop().await;
}

#[tokio::test]
async fn idempotent_ingest_skips_sequences_already_stored() {
    let mut n = TestNode::start().await;
    let lines = |range: std::ops::Range<u64>| -> String {
        range
            .map(|i| format!("{{\"subject\":\"s/{}\",\"payload\":{i},\"producer\":\"backfill-1\",\"sequence\":{i}}}\n", i % 3))
            .collect()
    };
    let url = |n: &TestNode| format!("{}/v1/topics/telemetry/records", n.url());
    let (s, v) = post(&url(&n), lines(0..10)).await;
    assert_eq!(
        (s, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(10), Some(0)),
        "{v}"
    );
    // A re-run that got further: only the new sequences are stored.
    let (_, v) = post(&url(&n), lines(0..15)).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (Some(5), Some(10)),
        "{v}"
    );
    // The producer's ranges survive a restart.
    n.restart().await;
    let (_, v) = post(&url(&n), lines(5..20)).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (Some(5), Some(10)),
        "{v}"
    );
    // Another producer's sequences are its own.
    let (_, v) = post(
        &url(&n),
        "{\"payload\":1,\"producer\":\"other\",\"sequence\":0}",
    )
    .await;
    assert_eq!(v["accepted"], 1);
    assert_eq!(n.all_records("telemetry").await.len(), 21);
    n.stop().await;
}

#[tokio::test]
async fn an_oversized_body_gets_a_json_413() {
    let n = TestNode::start().await;
    let body = vec![b' '; shoal::api::MAX_BODY + 1];
    let (s, v) = post(&format!("{}/v1/topics/telemetry/records", n.url()), body).await;
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("split it"), "{v}");
    // The node keeps serving.
    assert_eq!(n.get("/healthz").await["status"], "ok");
    n.stop().await;
}
