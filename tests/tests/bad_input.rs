//! Bad input on the MQTT port: each offender gets its connection closed while a healthy
//! client keeps being served and nothing acknowledged is lost.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use rumqttc::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use shoal_tests::{Client, RawClient, TestNode};

/// A healthy publisher/subscriber pair checks the node still serves after each offence.
async fn still_serving(n: &TestNode, healthy: &mut Client, round: usize) {
    let topic = format!("healthy/{round}");
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake(&format!("probe{round}"), true, 30).await;
    healthy
        .publish_acked(&topic, QoS::AtLeastOnce, false, b"ok")
        .await;
    let p = healthy.next_publish().await;
    assert_eq!(p.topic, topic);
}

#[tokio::test]
async fn offenders_are_cut_off_and_everyone_else_is_served() {
    let n = TestNode::start_with(|c| c.mqtt.max_packet_size = 4096).await;
    let (mut healthy, _) = Client::connect(n.mqtt(), "healthy", true).await;
    healthy.subscribe("healthy/#", QoS::AtLeastOnce).await;

    // 1. Garbage bytes.
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(raw.until_closed().await.is_empty());
    still_serving(&n, &mut healthy, 1).await;

    // 2. A packet over the limit (refused from its header, before the body arrives).
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("big", true, 30).await;
    let p = Publish::new("big", QoS::AtLeastOnce, vec![0u8; 8192]);
    let mut p = p;
    p.pkid = 1;
    raw.send(Packet::Publish(p)).await;
    let seen = raw.until_closed().await;
    assert!(
        seen.is_empty(),
        "no PUBACK for an oversized publish: {seen:?}"
    );
    still_serving(&n, &mut healthy, 2).await;

    // 3. PUBLISH before CONNECT.
    let mut raw = RawClient::connect(n.mqtt()).await;
    let mut p = Publish::new("early", QoS::AtLeastOnce, b"x".to_vec());
    p.pkid = 1;
    raw.send(Packet::Publish(p)).await;
    assert!(raw.until_closed().await.is_empty());
    still_serving(&n, &mut healthy, 3).await;

    // 4. Invalid UTF-8 in a topic name.
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("utf8", true, 30).await;
    raw.send_bytes(&[0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, b'x'])
        .await;
    assert!(raw.until_closed().await.is_empty());
    still_serving(&n, &mut healthy, 4).await;

    // 5. Wildcards in a PUBLISH topic.
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("wild", true, 30).await;
    let mut p = Publish::new("a/+", QoS::AtLeastOnce, b"x".to_vec());
    p.pkid = 2;
    raw.send(Packet::Publish(p)).await;
    assert!(raw.until_closed().await.is_empty());
    still_serving(&n, &mut healthy, 5).await;

    // 6. A truncated packet followed by the client vanishing.
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.send_bytes(&[0x10, 0x20, 0x00]).await;
    drop(raw);
    still_serving(&n, &mut healthy, 6).await;

    // Only the healthy publishes were stored.
    let recs = n.all_records("telemetry").await;
    let mut subjects: Vec<String> = recs
        .iter()
        .map(|r| r["subject"].as_str().unwrap_or("").to_string())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        (1..=6).map(|i| format!("healthy/{i}")).collect::<Vec<_>>()
    );
    n.stop().await;
}

/// The peer port refuses strangers: garbage, an oversized frame before `Hello`, and a
/// `Hello` of another cluster each close only that connection; the node keeps serving.
#[tokio::test]
async fn peer_port_cuts_off_garbage_and_foreign_clusters() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = TestNode::start().await;
    let peer = n.node.as_ref().unwrap().peer_addr;
    let (mut healthy, _) = Client::connect(n.mqtt(), "healthy", true).await;
    healthy.subscribe("healthy/#", QoS::AtLeastOnce).await;
    let closed = |mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(shoal_tests::DEADLINE, s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "expected the node to close: {r:?}"
        );
    };
    let mut s = tokio::net::TcpStream::connect(peer).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed(s).await;
    let mut s = tokio::net::TcpStream::connect(peer).await.unwrap();
    s.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    closed(s).await;
    // A well-formed Hello from cluster "other".
    use shoal::replication::wire::{Frame, FrameCodec};
    use tokio_util::codec::Encoder;
    let mut hello = bytes::BytesMut::new();
    FrameCodec::default()
        .encode(
            Frame::Hello {
                cluster_id: "other".into(),
                node_id: "intruder".into(),
                origin: 1,
                proto_min: 1,
                proto_max: 1,
            },
            &mut hello,
        )
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(peer).await.unwrap();
    s.write_all(&hello).await.unwrap();
    closed(s).await;
    still_serving(&n, &mut healthy, 0).await;
}
