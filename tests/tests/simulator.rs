//! `shoal-sim` against a real node: replay stores every reading, backfill is exact across
//! re-runs and interruptions, and scoring reads alerts from the node.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;

use serde_json::json;
use shoal_tests::{TestNode, sim};

async fn generate(dir: &std::path::Path, devices: &str, duration: &str) -> std::path::PathBuf {
    generate_with(dir, devices, duration, "1").await
}

async fn generate_with(
    dir: &std::path::Path,
    devices: &str,
    duration: &str,
    per_hour: &str,
) -> std::path::PathBuf {
    let out = dir.join("fleet.csv");
    let (ok, _, err) = sim(&[
        "generate",
        "--devices",
        devices,
        "--duration",
        duration,
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
        "--anomalies-per-device-hour",
        per_hour,
    ])
    .await;
    assert!(ok, "{err}");
    out
}

fn count_rows(csv: &std::path::Path) -> usize {
    std::fs::read_to_string(csv).unwrap().lines().count() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_counts_match_what_the_node_stored() {
    let n = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = generate(dir.path(), "3", "2m").await;
    let rows = count_rows(&file);
    let port = n.mqtt().port().to_string();
    for qos in ["0", "1", "2"] {
        let (ok, out, err) = sim(&[
            "replay",
            file.to_str().unwrap(),
            "--port",
            &port,
            "--qos",
            qos,
            "--flat-out",
            "--json",
        ])
        .await;
        assert!(ok, "qos {qos}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["sent"].as_u64().unwrap() as usize, rows, "{v}");
        if qos != "0" {
            assert_eq!(v["acked"], v["sent"]);
        }
    }
    // QoS 0 needs no ack, but the node commits what it read before the next test step.
    let stored = shoal_tests::eventually("every replayed reading stored", || async {
        let r = n.all_records("telemetry").await;
        (r.len() >= 3 * rows).then_some(r)
    })
    .await;
    assert_eq!(stored.len(), 3 * rows);
    // Per sensor, the readings keep the file's order.
    let mut by_subject: HashMap<String, Vec<u64>> = HashMap::new();
    for r in &stored {
        by_subject
            .entry(r["subject"].as_str().unwrap().into())
            .or_default()
            .push(r["offset"].as_u64().unwrap());
    }
    assert_eq!(by_subject.len(), 15, "3 devices x 5 sensors");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_rerun_and_resume_store_each_reading_once() {
    let n = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = generate(dir.path(), "4", "10m").await;
    let rows = count_rows(&file);
    let url = n.url();
    let f = file.to_str().unwrap();
    // A first run that stops part-way: load only the first half of the file.
    let text = std::fs::read_to_string(&file).unwrap();
    let half: String = text
        .lines()
        .take(rows / 2 + 1)
        .map(|l| format!("{l}\n"))
        .collect();
    let half_file = dir.path().join("half.csv");
    std::fs::write(&half_file, half).unwrap();
    let (ok, _, err) = sim(&[
        "backfill",
        half_file.to_str().unwrap(),
        "--url",
        &url,
        "--chunk",
        "500",
        "--producer",
        "load-1",
    ])
    .await;
    assert!(ok, "{err}");
    // The full run under the same producer resumes: only the rest is new.
    let (ok, out, err) = sim(&[
        "backfill",
        f,
        "--url",
        &url,
        "--chunk",
        "500",
        "--producer",
        "load-1",
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["accepted"].as_u64().unwrap() as usize,
        rows - rows / 2,
        "{v}"
    );
    assert_eq!(v["duplicates"].as_u64().unwrap() as usize, rows / 2, "{v}");
    // A plain re-run sends nothing new (its state file says everything is done) ...
    let (ok, out, _) = sim(&[
        "backfill",
        f,
        "--url",
        &url,
        "--chunk",
        "500",
        "--producer",
        "load-1",
        "--json",
    ])
    .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    // ... and without the state file the node drops every line as a duplicate.
    let (ok, out, _) = sim(&[
        "backfill",
        f,
        "--url",
        &url,
        "--producer",
        "load-1",
        "--state",
        "none",
        "--json",
    ])
    .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["duplicates"].as_u64().unwrap() as usize, rows, "{v}");
    let records = n.all_records("telemetry").await;
    assert_eq!(records.len(), rows, "exactly one copy of each reading");
    // Original event times are kept.
    let first_line = text.lines().nth(1).unwrap();
    let ts = first_line.split(',').next().unwrap();
    let want = humantime_ms(ts);
    assert!(
        records
            .iter()
            .any(|r| r["event_time"].as_u64() == Some(want))
    );
    // Bad input: a file that is not a data file, and a topic that does not exist.
    let junk = dir.path().join("junk.csv");
    std::fs::write(&junk, "hello,world\n1,2\n").unwrap();
    let (ok, _, err) = sim(&["backfill", junk.to_str().unwrap(), "--url", &url]).await;
    assert!(!ok && err.contains("junk.csv"), "{err}");
    let (ok, _, err) = sim(&[
        "backfill", f, "--url", &url, "--topic", "nope", "--state", "none",
    ])
    .await;
    assert!(!ok && err.contains("nope"), "{err}");
    n.stop().await;
}

fn humantime_ms(ts: &str) -> u64 {
    // 2026-01-01T00:00:00.000Z
    let secs = |s: &str| s.parse::<u64>().unwrap();
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<u64> = date.split('-').map(secs).collect();
    let (hms, ms) = time.split_once('.').unwrap();
    let t: Vec<u64> = hms.split(':').map(secs).collect();
    // Days from 1970-01-01 to the date (the generator's dates are in 2026).
    let days_before_year: u64 = (1970..d[0])
        .map(|y| {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                366
            } else {
                365
            }
        })
        .sum();
    let month_days = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let days = days_before_year + month_days[..(d[1] - 1) as usize].iter().sum::<u64>() + d[2] - 1;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) + secs(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_find_generated_spikes_stuck_values_and_dropouts() {
    let n = TestNode::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Dense anomalies so the score rests on dozens of labels, not a handful.
    let file = generate_with(dir.path(), "10", "1h", "6").await;
    let url = n.url();
    for (name, cfg) in [
        (
            "zscore",
            json!({"threshold": 5, "warmup": 30, "scale": "diff"}),
        ),
        ("flatline", json!({"min_count": 30})),
        ("missing-data", json!({"max_gap_ms": 60000})),
    ] {
        let (code, v) = shoal_tests::deploy(
            &url,
            name,
            &shoal_tests::consumer_wasm(name),
            json!({"config": cfg}),
            None,
        )
        .await;
        assert_eq!(code, 201, "{v}");
    }
    let (ok, _, err) = sim(&[
        "backfill",
        file.to_str().unwrap(),
        "--url",
        &url,
        "--state",
        "none",
    ])
    .await;
    assert!(ok, "{err}");
    shoal_tests::eventually("consumers caught up", || async {
        let v = shoal_tests::http_get(&url, "/v1/consumers").await;
        let lag: u64 = v["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| {
                c["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["lag"].as_u64().unwrap())
            })
            .sum();
        let done = v["consumers"].as_array().unwrap().iter().all(|c| {
            c["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["records_in"].as_u64().unwrap() > 0)
        });
        (lag == 0 && done).then_some(())
    })
    .await;
    let labels = file.with_file_name("fleet.labels.jsonl");
    let (ok, out, err) = sim(&[
        "score",
        "--labels",
        labels.to_str().unwrap(),
        "--url",
        &url,
        "--kinds",
        "spike,stuck,dropout",
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let f1 = v["overall"]["f1"].as_f64().unwrap_or(0.0);
    eprintln!("{v}");
    assert!(v["labels"].as_u64().unwrap() >= 20, "{v}");
    assert!(f1 >= 0.9, "F1 {f1}: {v}");
    n.stop().await;
}
