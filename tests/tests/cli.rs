//! The CLI against a real node: topic commands and `consume` in all its modes.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Stdio;

use serde_json::Value;
use shoal_tests::{Process, shoal_bin};
use tokio::io::{AsyncBufReadExt, BufReader};

async fn shoal(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(shoal_bin())
        .args(args)
        .env("SHOAL_URL", url)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_consume() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(dir.path(), &[]).await.unwrap();
    let url = node.url();
    let (ok, out, err) = shoal(
        &url,
        &[
            "topic",
            "create",
            "demo",
            "--partitions",
            "2",
            "--acks",
            "local",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("created topic demo with 2 partitions"),
        "{out}"
    );
    let (ok, _, err) = shoal(&url, &["topic", "create", "demo"]).await;
    assert!(!ok);
    assert!(
        err.contains("already exists") && err.contains("409"),
        "{err}"
    );
    let (ok, out, _) = shoal(&url, &["topic", "list"]).await;
    assert!(ok);
    assert!(out.contains("demo") && out.contains("telemetry"), "{out}");

    let body: String = (0..6)
        .map(|i| {
            format!(
                "{{\"subject\":\"s/{i}\",\"payload\":\"v{i}\",\"partition\":{}}}\n",
                i % 2
            )
        })
        .chain(["{\"subject\":\"bin\",\"payload_base64\":\"AAH/\",\"partition\":0}\n".to_string()])
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/topics/demo/records"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    let (ok, out, err) = shoal(&url, &["consume", "demo", "--from", "beginning"]).await;
    assert!(ok, "{err}");
    let recs = lines(&out);
    assert_eq!(recs.len(), 7);
    for r in &recs {
        for field in [
            "partition",
            "offset",
            "id",
            "event_time",
            "ingest_time",
            "subject",
        ] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
    }
    let bin = recs.iter().find(|r| r["subject"] == "bin").unwrap();
    assert_eq!(bin["payload_base64"], "AAH/");
    assert!(bin.get("payload").is_none());

    let (_, out, _) = shoal(
        &url,
        &["consume", "demo", "--partition", "1", "--from", "1"],
    )
    .await;
    let recs = lines(&out);
    assert_eq!(
        recs.iter()
            .map(|r| r["offset"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(recs.iter().all(|r| r["partition"] == 1));
    let (_, out, _) = shoal(
        &url,
        &["consume", "demo", "--partition", "0", "--limit", "2"],
    )
    .await;
    assert_eq!(lines(&out).len(), 2);
    let (_, out, _) = shoal(&url, &["consume", "demo", "--from", "latest"]).await;
    assert!(out.is_empty());
    let (_, out, _) = shoal(&url, &["consume", "demo", "--from", "1h"]).await;
    assert_eq!(
        lines(&out).len(),
        7,
        "everything was ingested in the last hour"
    );
    let (ok, _, err) = shoal(&url, &["consume", "nope"]).await;
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, _, err) = shoal(&url, &["consume", "demo", "--from", "whenever"]).await;
    assert!(!ok && err.contains("--from"), "{err}");

    // --follow prints records as they arrive.
    let mut follow = tokio::process::Command::new(shoal_bin())
        .args([
            "consume",
            "demo",
            "--partition",
            "0",
            "--from",
            "latest",
            "--follow",
        ])
        .env("SHOAL_URL", &url)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(follow.stdout.take().unwrap()).lines();
    let line = tokio::spawn(async move { out.next_line().await });
    let mut n = 0;
    while !line.is_finished() {
        reqwest::Client::new()
            .post(format!("{url}/v1/topics/demo/records"))
            .body(format!("{{\"payload\":\"live{n}\",\"partition\":0}}"))
            .send()
            .await
            .unwrap();
        n += 1;
        assert!(n < 200, "--follow printed nothing");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first: Value = serde_json::from_str(&line.await.unwrap().unwrap().unwrap()).unwrap();
    assert!(first["payload"].as_str().unwrap().starts_with("live"));
    let _ = follow.start_kill();
    let _ = node.terminate().await;
}

#[tokio::test]
async fn unreachable_node_and_seed_flag_give_clear_errors() {
    let (ok, _, err) = shoal("http://127.0.0.1:9", &["topic", "list"]).await;
    assert!(!ok && err.contains("cannot reach the node"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(shoal_bin())
        .args(["up", "--seed", "no-port-here", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not HOST:PORT"), "{err}");
}

#[tokio::test]
async fn cluster_shows_this_node_and_partition_placement() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(dir.path(), &["--node-id", "gw-1"])
        .await
        .unwrap();
    let v = shoal_tests::http_get(&node.url(), "/v1/cluster").await;
    assert_eq!(v["members"][0]["node_id"], "gw-1");
    assert_eq!(v["members"][0]["live"], true);
    let parts = v["partitions"].as_array().unwrap();
    let telemetry: Vec<_> = parts.iter().filter(|p| p["topic"] == "telemetry").collect();
    assert_eq!(telemetry.len(), 8);
    assert!(
        telemetry
            .iter()
            .all(|p| p["owner"] == "gw-1" && p["under_replicated"] == false)
    );
    let (ok, out, err) = shoal(&node.url(), &["cluster"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("gw-1") && !out.contains("fewer live replicas"),
        "{out}"
    );
    let _ = node.terminate().await;
}
