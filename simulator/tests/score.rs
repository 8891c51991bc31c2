//! Tests of `shoal-sim score`, run as a process: exact precision / recall / F1 / delay on a
//! hand-made case (from a file and from a fake node on 127.0.0.1), SKAB labels, and errors
//! that name the line.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

mod common;
use common::temp_dir;

fn score(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .arg("score")
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn score_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&score(&a).unwrap()).unwrap()
}

const LABELS: &str = r#"{"device":"dev-1","sensor":"temperature","kind":"spike","start":1000,"end":2000}
{"device":"dev-1","sensor":null,"kind":"level_shift","start":10000,"end":20000}

{"device":"dev-2","sensor":"humidity","kind":"stuck","start":5000,"end":8000}
{"device":"dev-2","sensor":"pressure","kind":"spike","start":50000,"end":50000}
"#;

fn alert(id: &str, consumer: &str, subject: &str, t: u64) -> Value {
    json!({"id": id, "consumer": consumer, "key": subject, "subject": subject, "event_time": t, "severity": "warning"})
}

/// Alerts of the hand-made case, in the order a node would list them.
fn alerts() -> Vec<Value> {
    vec![
        // Matches the temperature spike 500 ms in.
        alert("a", "zscore", "sensors/dev-1/temperature", 1500),
        // The same alert again (at-least-once delivery): dropped.
        alert("a", "zscore", "sensors/dev-1/temperature", 1500),
        // Any sensor of dev-1 matches the device-wide level shift.
        alert("b", "zscore", "sensors/dev-1/humidity", 12000),
        // Within the 5 s tolerance after the shift's end.
        alert("c", "zscore", "sensors/dev-1/current", 24000),
        // After the stuck window's end + tolerance: false alarm.
        alert("d", "zscore", "sensors/dev-2/humidity", 14000),
        // Before the stuck window starts: false alarm.
        alert("e", "zscore", "sensors/dev-2/humidity", 4999),
        // Not a sensor subject: false alarm.
        alert("f", "zscore", "derived/dev-1/avg", 1500),
        // Another consumer: filtered out by --consumer.
        alert("g", "threshold", "sensors/dev-2/pressure", 50000),
        // Matches the spike at its very start: delay 0.
        alert("h", "zscore", "sensors/dev-1/temperature", 1000),
    ]
}

fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!((got - want).abs() < 1e-9, "{got} != {want}");
}

fn check_hand_made(r: &Value) {
    assert_eq!(r["alerts"], 7);
    assert_eq!(r["duplicates"], 1);
    assert_eq!(r["unmatched_alerts"], 3);
    assert_eq!(r["foreign_subjects"], 1);
    assert_eq!(r["labels"], 4);
    assert_eq!(r["tolerance_ms"], 5000);
    let o = &r["overall"];
    assert_eq!(o["detected"], 2);
    assert_eq!(o["matched_alerts"], 4);
    close(&o["precision"], 4.0 / 7.0);
    close(&o["recall"], 0.5);
    close(&o["f1"], 8.0 / 15.0);
    assert_eq!(o["delay_ms_p50"], 0);
    assert_eq!(o["delay_ms_p90"], 2000);

    let spike = &r["kinds"]["spike"];
    assert_eq!(spike["labels"], 2);
    assert_eq!(spike["detected"], 1);
    assert_eq!(spike["matched_alerts"], 2);
    close(&spike["precision"], 2.0 / 5.0);
    close(&spike["recall"], 0.5);
    close(&spike["f1"], 2.0 * 0.4 * 0.5 / 0.9);
    assert_eq!(spike["delay_ms_p50"], 0);

    let shift = &r["kinds"]["level_shift"];
    assert_eq!(shift["detected"], 1);
    assert_eq!(shift["matched_alerts"], 2);
    close(&shift["precision"], 0.4);
    close(&shift["recall"], 1.0);
    close(&shift["f1"], 0.8 / 1.4);
    assert_eq!(shift["delay_ms_p90"], 2000);

    let stuck = &r["kinds"]["stuck"];
    assert_eq!(stuck["detected"], 0);
    // No consumer found a stuck value, so no false alert is charged to the kind.
    assert_eq!(stuck["precision"], Value::Null);
    close(&stuck["f1"], 0.0);
    assert_eq!(stuck["delay_ms_p50"], Value::Null);
}

#[test]
fn hand_made_case_from_a_file() {
    let dir = temp_dir("file");
    let labels = dir.join("labels.jsonl");
    std::fs::write(&labels, LABELS).unwrap();
    let file = dir.join("alerts.jsonl");
    let all = alerts();
    // Some lines are single alerts, one is a saved page of `GET /v1/alerts`.
    let mut text = String::new();
    for a in &all[..4] {
        text.push_str(&format!("{a}\n"));
    }
    text.push_str(&format!(
        "{}\n\n",
        json!({"alerts": all[4..].to_vec(), "next": 9})
    ));
    std::fs::write(&file, text).unwrap();
    let args = [
        "--labels",
        labels.to_str().unwrap(),
        "--alerts",
        file.to_str().unwrap(),
        "--consumer",
        "zscore",
        "--tolerance",
        "5s",
    ];
    check_hand_made(&score_json(&args));

    let table = score(&args).unwrap();
    assert!(
        table.contains("7 alerts (3 unmatched, 1 duplicates dropped"),
        "{table}"
    );
    let overall = table.lines().find(|l| l.starts_with("overall")).unwrap();
    let cols: Vec<&str> = overall.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "overall", "4", "2", "0.500", "4", "0.571", "0.533", "0.0s", "2.0s"
        ],
        "{table}"
    );

    // Without --consumer, the threshold alert detects the pressure spike too.
    let mut all_consumers = args.to_vec();
    all_consumers.truncate(4);
    all_consumers.extend(["--tolerance", "5s"]);
    let r = score_json(&all_consumers);
    assert_eq!(r["alerts"], 8);
    assert_eq!(r["overall"]["detected"], 3);
}

/// A fake node answering `GET /v1/alerts?from=N&limit=..&consumer=..` from `items`, two per
/// page; records each request line.
fn fake_node(items: Vec<Value>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            let line = req.lines().next().unwrap_or_default().to_string();
            log.lock().unwrap().push(line.clone());
            let from: usize = line
                .split(['?', '&', ' '])
                .find_map(|p| p.strip_prefix("from="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let consumer = line
                .split(['?', '&', ' '])
                .find_map(|p| p.strip_prefix("consumer="))
                .map(str::to_string);
            let mut page = Vec::new();
            let mut next = from;
            for (i, item) in items.iter().enumerate().skip(from) {
                if page.len() == 2 {
                    break;
                }
                next = i + 1;
                if consumer.as_deref().is_none_or(|c| item["consumer"] == c) {
                    page.push(item.clone());
                }
            }
            let body = json!({"alerts": page, "next": next}).to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes());
        }
    });
    (url, seen)
}

#[test]
fn hand_made_case_from_a_node() {
    let dir = temp_dir("node");
    let labels = dir.join("labels.jsonl");
    std::fs::write(&labels, LABELS).unwrap();
    let (url, seen) = fake_node(alerts());
    let r = score_json(&[
        "--labels",
        labels.to_str().unwrap(),
        "--url",
        &format!("{url}/"),
        "--consumer",
        "zscore",
        "--tolerance",
        "5s",
    ]);
    check_hand_made(&r);
    let seen = seen.lock().unwrap();
    assert!(
        seen[0].starts_with("GET /v1/alerts?from=0&limit=10000&consumer=zscore "),
        "{seen:?}"
    );
    assert!(seen.last().unwrap().contains("from=9&"), "{seen:?}");
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn skab_labels_file_and_directory() {
    let dir = temp_dir("skab");
    let header = "datetime;Accelerometer1RMS;Current;anomaly;changepoint";
    // valve1/3.csv: anomaly on 10:00:02-10:00:03 (CRLF); other/2.csv: 10:00:01 (LF).
    write(
        &dir.join("data/valve1/3.csv"),
        &format!(
            "{header}\r\n2020-03-09 10:00:00;0.1;1;0.0;0.0\r\n2020-03-09 10:00:01;0.1;1;0.0;0.0\r\n2020-03-09 10:00:02;0.9;1;1.0;1.0\r\n2020-03-09 10:00:03;0.9;1;1.0;0.0\r\n2020-03-09 10:00:04;0.1;1;0.0;1.0\r\n"
        ),
    );
    write(
        &dir.join("data/other/2.csv"),
        &format!(
            "{header}\n2020-03-09 10:00:00;0.1;1;0.0;0.0\n2020-03-09 10:00:01;0.1;1;1.0;1.0\n"
        ),
    );
    let t0 = 1_583_748_000_000u64; // 2020-03-09 10:00:00 UTC
    let alerts = dir.join("alerts.jsonl");
    let lines = [
        alert("1", "z", "sensors/valve1-3/accelerometer1rms", t0 + 3000),
        alert("2", "z", "sensors/valve1-3/current", t0 + 4000),
        alert("3", "z", "sensors/other-2/current", t0 + 500),
    ];
    let text: String = lines.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&alerts, text).unwrap();

    let one = score_json(&[
        "--labels",
        dir.join("data/valve1/3.csv").to_str().unwrap(),
        "--alerts",
        alerts.to_str().unwrap(),
    ]);
    assert_eq!(one["labels"], 1);
    assert_eq!(one["overall"]["detected"], 1);
    assert_eq!(one["overall"]["matched_alerts"], 2);
    assert_eq!(one["overall"]["delay_ms_p50"], 1000);
    close(&one["overall"]["precision"], 2.0 / 3.0);

    let all = score_json(&[
        "--labels",
        dir.join("data").to_str().unwrap(),
        "--alerts",
        alerts.to_str().unwrap(),
    ]);
    assert_eq!(all["labels"], 2);
    assert_eq!(all["kinds"]["skab"]["labels"], 2);
    assert_eq!(all["overall"]["detected"], 1);
    close(&all["overall"]["recall"], 0.5);
}

#[test]
fn bad_input_names_the_line() {
    let dir = temp_dir("bad");
    let labels = dir.join("labels.jsonl");
    std::fs::write(&labels, LABELS).unwrap();
    let bad_labels = dir.join("bad-labels.jsonl");
    std::fs::write(
        &bad_labels,
        format!("{LABELS}{{\"device\":\"d\",\"kind\":\"k\",\"start\":1}}\n"),
    )
    .unwrap();
    let alerts = dir.join("alerts.jsonl");
    std::fs::write(
        &alerts,
        format!("{}\n{{\"subject\":\"sensors/a/b\"}}\n", alerts_line()),
    )
    .unwrap();
    let not_json = dir.join("not-json.jsonl");
    std::fs::write(&not_json, "\n\n{oops\n").unwrap();

    let err = score(&[
        "--labels",
        bad_labels.to_str().unwrap(),
        "--alerts",
        not_json.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.contains("bad-labels.jsonl: line 6: bad label"), "{err}");
    let err = score(&[
        "--labels",
        labels.to_str().unwrap(),
        "--alerts",
        alerts.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        err.contains("alerts.jsonl: line 2: alert has no field \"event_time\""),
        "{err}"
    );
    let err = score(&[
        "--labels",
        labels.to_str().unwrap(),
        "--alerts",
        not_json.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.contains("not-json.jsonl: line 3: not JSON"), "{err}");
    let err = score(&["--labels", labels.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("--alerts"), "{err}");
}

fn alerts_line() -> Value {
    alert("x", "z", "sensors/a/b", 1)
}
