//! WebAssembly consumers end to end: deploy, alerts over MQTT / HTTP / SSE / webhook,
//! hostile modules, state across restarts, redeploys and the API token.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};
use shoal_tests::{Client, TestNode, alerts, consumer_wasm, deploy, eventually, http_get};

async fn fast_node() -> TestNode {
    TestNode::start_with(|c| {
        c.consumers.batch_timeout = Duration::from_millis(300);
        c.consumers.memory_mb = 16;
    })
    .await
}

async fn status(n: &TestNode, name: &str) -> Value {
    n.get(&format!("/v1/consumers/{name}")).await
}

fn sum(status: &Value, field: &str) -> u64 {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_alerts_reach_mqtt_http_and_sse() {
    let n = fast_node().await;
    let base = n.url();
    let (code, v) = deploy(
        &base,
        "hot",
        &consumer_wasm("threshold"),
        json!({"filter": "boiler/#", "config": {"max": 50}}),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["version"], 1);
    let (mut watcher, _) = Client::connect(n.mqtt(), "watcher", true).await;
    watcher.subscribe("shoal/alerts/#", QoS::AtLeastOnce).await;
    let sse = reqwest::get(format!("{base}/v1/alerts/stream?from=beginning"))
        .await
        .unwrap();
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    for (topic, v) in [
        ("boiler/1/temp", "20"),
        ("boiler/1/temp", "60"),
        ("other/1", "99"),
        ("boiler/2/temp", "{\"value\": 75}"),
    ] {
        p.publish_acked(topic, QoS::AtLeastOnce, false, v.as_bytes())
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = watcher.next_publish().await;
        let a: Value = serde_json::from_slice(&m.payload).unwrap();
        got.push((m.topic, a["value"].as_f64().unwrap()));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("shoal/alerts/hot/boiler/1/temp".into(), 60.0),
            ("shoal/alerts/hot/boiler/2/temp".into(), 75.0)
        ]
    );
    let list = alerts(&base, Some("hot")).await;
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|a| a["id"].as_str().unwrap().len() == 32 && a["severity"] == "warning")
    );
    use futures::StreamExt;
    let mut body = sse.bytes_stream();
    let mut text = String::new();
    while text.matches("event: alert").count() < 2 {
        let chunk = tokio::time::timeout(shoal_tests::DEADLINE, body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Counted once the batch's commit returned, which is just after its alerts are visible.
    let s = eventually("the batch is counted", || async {
        let s = status(&n, "hot").await;
        (sum(&s, "records_in") >= 3).then_some(s)
    })
    .await;
    assert_eq!(sum(&s, "records_in"), 3, "the filter skipped other/1: {s}");
    assert_eq!(sum(&s, "alerts_out"), 2);
    assert_eq!(sum(&s, "lag"), 0);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "shoal_consumer_records_in_total{consumer=\"hot\"} 3",
        "shoal_consumer_alerts_out_total{consumer=\"hot\"} 2",
        "shoal_consumer_lag{consumer=\"hot\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_alerts() {
    let n = fast_node().await;
    deploy(
        &n.url(),
        "hot",
        &consumer_wasm("threshold"),
        json!({"config": {"min": 0}}),
        None,
    )
    .await;
    let port = n.mqtt().port().to_string();
    let mut sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-C",
            "1",
            "-t",
            "shoal/alerts/hot/#",
            "-F",
            "%t",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    // Publish until mosquitto_sub (which may subscribe late) got one alert.
    let mut i = 0;
    let out = loop {
        p.publish_acked("cold/room", QoS::AtLeastOnce, false, b"-5")
            .await;
        i += 1;
        assert!(i < 200, "mosquitto_sub got no alert");
        if let Ok(Some(status)) = sub.try_wait() {
            assert!(status.success());
            break sub.wait_with_output().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "shoal/alerts/hot/cold/room"
    );
    n.stop().await;
}

/// A module that speaks the ABI, with `consume` replaced by `body`.
fn hostile(consume_body: &str, extra: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
            {extra}
            (memory (export "memory") 2)
            (data (i32.const 16) "\00")
            (func (export "shoal_abi_version") (result i32) i32.const 1)
            (func (export "shoal_alloc") (param i32) (result i32) i32.const 1024)
            (func (export "shoal_dealloc") (param i32 i32))
            (func (export "shoal_init") (param i32 i32) (result i64) i64.const 68719476737)
            (func (export "shoal_consume") (param i32 i32) (result i64) {consume_body}))"#
    );
    wat::parse_str(wat).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_are_refused_or_contained() {
    let n = fast_node().await;
    let base = n.url();
    // Refused at upload, with the reason.
    for (module, needle) in [
        (b"definitely not wasm".to_vec(), "not a WebAssembly binary"),
        (b"\0asm\x01\0\0\0\xff".to_vec(), "invalid module"),
        (
            hostile(
                "i64.const 0",
                r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
            ),
            "wasi_snapshot_preview1::fd_write",
        ),
        (
            hostile("i64.const 0", r#"(import "env" "mystery" (func))"#),
            "env::mystery",
        ),
        (
            wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(),
            "does not export shoal_abi_version",
        ),
    ] {
        let (code, v) = deploy(&base, "bad", &module, json!({}), None).await;
        assert!(code == 422 || code == 400, "{needle}: {code} {v}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{needle}: {v}"
        );
    }
    // Accepted, but misbehaving at run time.
    let spin = hostile("(loop br 0) i64.const 0", "");
    let bomb = hostile(
        "(loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable",
        "",
    );
    let trap = hostile("unreachable", "");
    let huge = hostile("i64.const 4294967295", "");
    for (name, module) in [
        ("spin", &spin),
        ("bomb", &bomb),
        ("trap", &trap),
        ("huge", &huge),
    ] {
        let (code, v) = deploy(&base, name, module, json!({"filter": "hostile/#"}), None).await;
        assert_eq!(code, 201, "{name}: {v}");
    }
    // A well-behaved consumer next to them.
    deploy(
        &base,
        "good",
        &consumer_wasm("threshold"),
        json!({"config": {"max": 1}}),
        None,
    )
    .await;
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("hostile/a", QoS::AtLeastOnce, false, b"5")
        .await;
    p.publish_acked("hostile/b", QoS::AtLeastOnce, false, b"6")
        .await;
    // The good consumer keeps going while the others fail.
    eventually("good consumer alerts", || async {
        (alerts(&base, Some("good")).await.len() == 2).then_some(())
    })
    .await;
    for (name, needle) in [
        ("spin", "CPU budget|timed out"),
        ("bomb", "trapped"),
        ("trap", "trapped"),
        ("huge", "bad output"),
    ] {
        let s = eventually(&format!("{name} dead-letters both records"), || async {
            let s = status(&n, name).await;
            (sum(&s, "dead_lettered") == 2).then_some(s)
        })
        .await;
        let errors: Vec<String> = s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["last_error"].as_str().map(str::to_string))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| needle.split('|').any(|n| e.contains(n))),
            "{name}: {errors:?}"
        );
    }
    // The dead-letter topic says who failed on what.
    let dlq = n.all_records("_dlq").await;
    assert_eq!(dlq.len(), 8, "{dlq:?}");
    assert!(dlq.iter().all(|r| {
        r["headers"]["shoal.error"]
            .as_str()
            .unwrap()
            .contains("\"error\"")
    }));
    // The node is healthy and still takes writes.
    p.publish_acked("after/all", QoS::AtLeastOnce, false, b"0")
        .await;
    assert_eq!(n.get("/healthz").await["status"], "ok");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_checkpoints_survive_a_restart() {
    let mut n = fast_node().await;
    let (code, v) = deploy(
        &n.url(),
        "z",
        &consumer_wasm("zscore"),
        json!({"config": {"threshold": 5, "warmup": 20}}),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    for i in 0..40 {
        let v = 20.0 + (i % 5) as f64 * 0.1;
        p.publish_acked("z/1", QoS::AtLeastOnce, false, v.to_string().as_bytes())
            .await;
    }
    eventually("40 records processed", || async {
        (sum(&status(&n, "z").await, "records_in") == 40).then_some(())
    })
    .await;
    assert!(alerts(&n.url(), Some("z")).await.is_empty());
    n.restart().await;
    // Only the warm-up from before the restart (in state) makes this spike an anomaly.
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("z/1", QoS::AtLeastOnce, false, b"90").await;
    let a = eventually("spike alert", || async {
        let a = alerts(&n.url(), Some("z")).await;
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["value"], 90.0);
    // The status counts the batch once its commit returned (just after the alert is
    // visible): wait for it, then check nothing before the restart was processed again.
    let processed = eventually("the batch is counted", || async {
        let n = sum(&status(&n, "z").await, "records_in");
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(
        processed, 1,
        "resumed after the checkpoint, nothing reprocessed"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_continues_and_start_latest_skips_history() {
    let n = fast_node().await;
    let base = n.url();
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("r/1", QoS::AtLeastOnce, false, b"100")
        .await;
    deploy(
        &base,
        "late",
        &consumer_wasm("threshold"),
        json!({"config": {"max": 10}, "start": "latest"}),
        None,
    )
    .await;
    deploy(
        &base,
        "t",
        &consumer_wasm("threshold"),
        json!({"config": {"max": 10}}),
        None,
    )
    .await;
    eventually("t saw the history", || async {
        (alerts(&base, Some("t")).await.len() == 1).then_some(())
    })
    .await;
    // Version 2 with a stricter config continues after the checkpoint.
    let (code, v) = deploy(
        &base,
        "t",
        &consumer_wasm("threshold"),
        json!({"config": {"max": 1}}),
        None,
    )
    .await;
    assert_eq!((code, v["version"].as_u64()), (200, Some(2)), "{v}");
    p.publish_acked("r/1", QoS::AtLeastOnce, false, b"5").await;
    eventually("v2 alerts on the new record only", || async {
        (alerts(&base, Some("t")).await.len() == 2).then_some(())
    })
    .await;
    let a = alerts(&base, Some("t")).await;
    assert_eq!(
        (a[0]["version"].as_u64(), a[1]["version"].as_u64()),
        (Some(1), Some(2))
    );
    eventually("late saw only the new record", || async {
        (sum(&status(&n, "late").await, "records_in") == 1).then_some(())
    })
    .await;
    assert!(
        alerts(&base, Some("late")).await.is_empty(),
        "5 is under max 10"
    );
    // Remove deletes it.
    let r = reqwest::Client::new()
        .delete(format!("{base}/v1/consumers/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = reqwest::get(format!("{base}/v1/consumers/t"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    n.stop().await;
}

#[tokio::test]
async fn deploy_and_remove_need_the_token() {
    let n = TestNode::start_with(|c| c.api_token = Some("s3cret".into())).await;
    let base = n.url();
    let m = consumer_wasm("threshold");
    let cfg = json!({"config": {"max": 1}});
    assert_eq!(deploy(&base, "t", &m, cfg.clone(), None).await.0, 401);
    assert_eq!(
        deploy(&base, "t", &m, cfg.clone(), Some("wrong")).await.0,
        403
    );
    assert_eq!(
        deploy(&base, "t", &m, cfg.clone(), Some("s3cret")).await.0,
        201
    );
    // Reading needs no token.
    assert_eq!(
        http_get(&base, "/v1/consumers").await["consumers"][0]["name"],
        "t"
    );
    let r = reqwest::Client::new()
        .delete(format!("{base}/v1/consumers/t"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Bad deploys say why.
    let (code, v) = deploy(&base, "x", &m, json!({"topic": "nope"}), Some("s3cret")).await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("does not exist"));
    let (code, v) = deploy(&base, "x", &m, json!({"config": {}}), Some("s3cret")).await;
    assert_eq!(code, 422, "threshold refuses an empty config: {v}");
    assert!(v["error"].as_str().unwrap().contains("init failed"), "{v}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_retry_with_an_idempotency_key() {
    let received: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let fail_first = Arc::new(Mutex::new(true));
    let app = {
        let (received, fail_first) = (received.clone(), fail_first.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (received, fail_first) = (received.clone(), fail_first.clone());
                async move {
                    let mut f = fail_first.lock().unwrap();
                    if *f {
                        *f = false;
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let key = headers["idempotency-key"].to_str().unwrap().to_string();
                    received
                        .lock()
                        .unwrap()
                        .push((key, serde_json::from_str(&body).unwrap()));
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let n = fast_node().await;
    let (code, v) = deploy(
        &n.url(),
        "w",
        &consumer_wasm("threshold"),
        json!({"config": {"max": 1}, "webhook": url}),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("w/1", QoS::AtLeastOnce, false, b"5").await;
    p.publish_acked("w/1", QoS::AtLeastOnce, false, b"6").await;
    let got = eventually("two webhook deliveries", || async {
        let r = received.lock().unwrap().clone();
        (r.len() == 2).then_some(r)
    })
    .await;
    for (key, alert) in &got {
        assert_eq!(alert["id"].as_str().unwrap(), key);
    }
    assert_eq!(got[0].1["value"], 5.0, "in order, after a retry");
    n.stop().await;
    server.abort();
}
