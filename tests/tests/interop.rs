//! Interoperability with Debian's mosquitto clients (`mosquitto_pub`, `mosquitto_sub`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Stdio;

use rumqttc::QoS;
use shoal_tests::{Client, TestNode};
use tokio::io::{AsyncBufReadExt, BufReader};

fn tool(name: &str) -> tokio::process::Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run `apt-get install mosquitto-clients` (.ci/run does)"
    );
    tokio::process::Command::new(name)
}

#[tokio::test]
async fn mosquitto_pub_at_every_qos_is_stored() {
    let n = TestNode::start().await;
    let port = n.mqtt().port().to_string();
    for q in ["0", "1", "2"] {
        let st = tool("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                q,
                "-t",
                &format!("interop/q{q}"),
                "-m",
                &format!("hello {q}"),
            ])
            .status()
            .await
            .unwrap();
        assert!(st.success(), "mosquitto_pub -q {q}");
    }
    // mosquitto_pub with QoS 0 disconnects right after sending; the record is still
    // committed before the node shuts down, which `stop` waits for.
    let recs = shoal_tests::eventually("three records stored", || async {
        let r = n.all_records("telemetry").await;
        (r.len() == 3).then_some(r)
    })
    .await;
    let mut payloads: Vec<&str> = recs
        .iter()
        .map(|r| r["payload"].as_str().unwrap())
        .collect();
    payloads.sort();
    assert_eq!(payloads, vec!["hello 0", "hello 1", "hello 2"]);
    n.stop().await;
}

#[tokio::test]
async fn mosquitto_sub_receives_retained_and_live_publishes() {
    let n = TestNode::start().await;
    let port = n.mqtt().port().to_string();
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("interop/state", QoS::AtLeastOnce, true, b"retained-value")
        .await;
    // The retained message arrives first; then wait for one live message.
    let mut sub = tool("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-v",
            "-C",
            "2",
            "-t",
            "interop/#",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(shoal_tests::DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, "interop/state retained-value");
    // mosquitto_sub is subscribed now (it got the retained message).
    p.publish_acked("interop/live", QoS::ExactlyOnce, false, b"live-value")
        .await;
    let second = tokio::time::timeout(shoal_tests::DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second, "interop/live live-value");
    let status = tokio::time::timeout(shoal_tests::DEADLINE, sub.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    n.stop().await;
}
