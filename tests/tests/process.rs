//! Real `shoal up` child processes: SIGKILL in the middle of QoS 1 ingest, SIGTERM that
//! finishes in-flight commits, and refusal of a corrupt data directory.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rumqttc::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use shoal_tests::{Process, all_records, eventually, shoal_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Acked = Arc<Mutex<Vec<String>>>;

/// A pipelined QoS 1 publisher on a raw socket: keeps `window` publishes in flight, and
/// records the payload of every PUBACKed publish, until the connection breaks.
async fn publisher(addr: SocketAddr, id: String, window: usize, acked: Acked) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let mut out = BytesMut::new();
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id.clone());
    c.clean_session = false;
    c.keep_alive = 60;
    let _ = Packet::Connect(c).write(&mut out, usize::MAX);
    if s.write_all(&out).await.is_err() {
        return;
    }
    let mut inbuf = BytesMut::new();
    let mut inflight: HashMap<u16, String> = HashMap::new();
    let mut next = 0u64;
    let mut connected = false;
    loop {
        while connected && inflight.len() < window {
            next += 1;
            let pkid = (next % 65_535 + 1) as u16;
            let payload = format!("{id}-{next}");
            let mut p = Publish::new(
                format!("crash/{id}"),
                QoS::AtLeastOnce,
                payload.clone().into_bytes(),
            );
            p.pkid = pkid;
            out.clear();
            let _ = Packet::Publish(p).write(&mut out, usize::MAX);
            if s.write_all(&out).await.is_err() {
                return;
            }
            inflight.insert(pkid, payload);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
        }
        while let Ok(p) = Packet::read(&mut inbuf, usize::MAX) {
            match p {
                Packet::ConnAck(_) => connected = true,
                Packet::PubAck(a) => {
                    if let Some(payload) = inflight.remove(&a.pkid) {
                        acked.lock().unwrap().push(payload);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Starts publishers, lets them get `min_acked` acks, stops the node with `stop`, restarts
/// it and checks every acknowledged record is stored exactly once.
async fn ingest_then(stop: impl AsyncFnOnce(Process), min_acked: usize) {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(dir.path(), &[]).await.expect("spawn");
    let acked: Acked = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(publisher(
            node.mqtt,
            format!("dev{i}"),
            50,
            acked.clone(),
        )));
    }
    eventually("publishers got acks", || async {
        (acked.lock().unwrap().len() >= min_acked).then_some(())
    })
    .await;
    stop(node).await;
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= min_acked);
    let node = Process::spawn(dir.path(), &[]).await.expect("restart");
    eprintln!("{} publishes acknowledged before the stop", acked.len());
    let records = all_records(&node.url(), "telemetry").await;
    eprintln!("{} records stored after the restart", records.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen
            .entry(r["payload"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "records stored twice: {dups:?}");
    let missing: Vec<_> = acked.iter().filter(|p| !seen.contains_key(*p)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged records lost, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.first()
    );
    // Per-origin order: within one device's stream, payload numbers only go up.
    let mut last: HashMap<String, u64> = HashMap::new();
    for r in &records {
        let p = r["payload"].as_str().unwrap();
        let (dev, n) = p.rsplit_once('-').unwrap();
        let n: u64 = n.parse().unwrap();
        let prev = last.insert(dev.to_string(), n).unwrap_or(0);
        assert!(n > prev, "{dev}: {n} after {prev}");
    }
    let _ = node.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_qos1_ingest_loses_no_acknowledged_record() {
    ingest_then(async |node| node.kill9().await, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_commits_and_exits_cleanly() {
    ingest_then(
        async |node| {
            let status = node.terminate().await;
            assert!(status.success(), "exit status {status}");
        },
        1000,
    )
    .await;
}

/// Runs `shoal up` on `dir`, which must refuse to start; returns its stderr.
async fn refused_start(dir: &std::path::Path) -> String {
    let out = tokio::process::Command::new(shoal_bin())
        .args([
            "up",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn corrupt_or_foreign_data_dir_stops_startup_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shoal.redb"), vec![7u8; 10_000]).unwrap();
    let err = refused_start(dir.path()).await;
    assert!(
        err.contains("shoal.redb") && err.contains("corrupt"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("photo.jpg"), b"x").unwrap();
    let err = refused_start(dir.path()).await;
    assert!(
        err.contains("not a Shoal data directory") && err.contains("photo.jpg"),
        "{err}"
    );
}

#[tokio::test]
async fn config_file_and_environment_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("shoal.toml");
    std::fs::write(
        &cfg,
        "[[topics]]\nname = \"fromfile\"\npartitions = 3\n[mqtt]\nmax_packet_size = 2048\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let node = Process::spawn(&data, &["--config", cfg.to_str().unwrap()])
        .await
        .unwrap();
    let t = shoal_tests::http_get(&node.url(), "/v1/topics/fromfile").await;
    assert_eq!(t["partitions"], 3);
    let _ = node.terminate().await;

    // A bad file is refused with the file name and the problem.
    std::fs::write(&cfg, "[mqtt]\nmax_packet_sise = 1\n").unwrap();
    let out = tokio::process::Command::new(shoal_bin())
        .args(["up", "--config"])
        .arg(&cfg)
        .env("SHOAL_DATA_DIR", &data)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shoal.toml") && err.contains("max_packet_sise"),
        "{err}"
    );
}

/// SIGKILL the node while a consumer is mid-stream: after a restart it resumes from its
/// last committed batch — no record skipped, no alert id written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_sigkill_without_skips_or_duplicate_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let node = Process::spawn(dir.path(), &[]).await.expect("spawn");
    let module = shoal_tests::consumer_wasm("threshold");
    // Every reading is above max: one alert per record.
    let (code, v) = shoal_tests::deploy(
        &node.url(),
        "all",
        &module,
        serde_json::json!({"config": {"max": -1}}),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    // Load history in bulk so the consumer has a backlog to chew through when killed.
    let total = 200_000usize;
    let body: String = (0..total)
        .map(|i| format!("{{\"subject\":\"k/{}\",\"payload\":{i}}}\n", i % 50))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/topics/telemetry/records", node.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let before = eventually("the consumer is part-way through", || async {
        let s = shoal_tests::http_get(&node.url(), "/v1/consumers/all").await;
        let n: u64 = s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["records_in"].as_u64().unwrap())
            .sum();
        (n > 0).then_some(n)
    })
    .await;
    node.kill9().await;
    eprintln!("killed after {before} of {total} records were processed");
    assert!((before as usize) < total, "the kill must land mid-stream");
    let node = Process::spawn(dir.path(), &[]).await.expect("restart");
    let alerts = eventually("all records processed after the restart", || async {
        let a = shoal_tests::alerts(&node.url(), Some("all")).await;
        (a.len() >= total).then_some(a)
    })
    .await;
    let mut ids = HashSet::new();
    let mut records = HashSet::new();
    for a in &alerts {
        assert!(
            ids.insert(a["id"].as_str().unwrap().to_string()),
            "alert id twice: {a}"
        );
        // Record ids are (origin, seq) with seq dense per partition.
        records.insert((
            a["partition"].as_u64().unwrap(),
            a["record_id"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(alerts.len(), total, "one alert per record, none twice");
    assert_eq!(records.len(), total, "no record skipped");
    let _ = node.terminate().await;
}
