//! Every MQTT 3.1.1 behaviour of the node, each in its own test, with rumqttc clients and a
//! raw byte-level client where the protocol's edges matter.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubRel, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::{LastWill, QoS};
use shoal::config::{AclSettings, UserSettings};
use shoal_tests::{Client, RawClient, TestNode, eventually};

#[tokio::test]
async fn zero_length_client_id_needs_clean_session() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    let ack = raw.handshake("", true, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let mut raw = RawClient::connect(n.mqtt()).await;
    let ack = raw.handshake("", false, 30).await;
    assert_eq!(ack.code, ConnectReturnCode::BadClientId);
    assert!(raw.until_closed().await.is_empty());
    n.stop().await;
}

#[tokio::test]
async fn keepalive_is_enforced() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    assert_eq!(
        raw.handshake("ka", true, 1).await.code,
        ConnectReturnCode::Success
    );
    let started = tokio::time::Instant::now();
    // No packet for 1.5 x keepalive: the server closes the connection.
    assert!(raw.until_closed().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // A client that pings stays connected past the deadline.
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("ka2", true, 1).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        raw.send(Packet::PingReq).await;
        assert_eq!(raw.recv().await, Some(Packet::PingResp));
    }
    n.stop().await;
}

#[tokio::test]
async fn username_and_password_from_config() {
    let n = TestNode::start_with(|c| {
        c.mqtt.users = vec![UserSettings {
            username: "dev".into(),
            password: "pw".into(),
        }];
    })
    .await;
    let connack = |login: Option<(&str, &str)>| {
        let addr = n.mqtt();
        let login = login.map(|(u, p)| (u.to_string(), p.to_string()));
        async move {
            let mut raw = RawClient::connect(addr).await;
            let mut c = rumqttc::mqttbytes::v4::Connect::new("auth");
            if let Some((u, p)) = login {
                c.set_login(u, p);
            }
            raw.send(Packet::Connect(c)).await;
            match raw.recv().await {
                Some(Packet::ConnAck(a)) => a.code,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(connack(None).await, ConnectReturnCode::NotAuthorized);
    assert_eq!(
        connack(Some(("dev", "nope"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack(Some(("dev", "pw"))).await,
        ConnectReturnCode::Success
    );
    n.stop().await;
}

#[tokio::test]
async fn second_connect_and_bad_protocol_are_refused() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("twice", true, 30).await;
    raw.send(Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(
        "twice",
    )))
    .await;
    assert!(raw.until_closed().await.is_empty(), "second CONNECT closes");

    // Protocol name "MQIsdp" (3.1) is not MQTT 3.1.1: closed without CONNACK.
    let mut raw = RawClient::connect(n.mqtt()).await;
    let mut bytes = vec![0x10, 14, 0, 6];
    bytes.extend_from_slice(b"MQIsdp");
    bytes.extend_from_slice(&[3, 2, 0, 30, 0, 0]);
    raw.send_bytes(&bytes).await;
    assert!(raw.until_closed().await.is_empty());

    // Protocol level 3 and 5 under the name MQTT: CONNACK 0x01.
    for level in [3u8, 5] {
        let mut raw = RawClient::connect(n.mqtt()).await;
        let mut bytes = vec![0x10, 12, 0, 4];
        bytes.extend_from_slice(b"MQTT");
        bytes.extend_from_slice(&[level, 2, 0, 30, 0, 0]);
        if level == 5 {
            bytes[1] = 13;
            bytes.insert(12, 0); // empty v5 properties, after the keepalive
        }
        raw.send_bytes(&bytes).await;
        let seen = raw.until_closed().await;
        assert!(
            matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.code == ConnectReturnCode::RefusedProtocolVersion),
            "level {level}: {seen:?}"
        );
    }
    n.stop().await;
}

#[tokio::test]
async fn qos0_qos1_qos2_delivery_at_granted_qos() {
    let n = TestNode::start().await;
    let (mut sub, _) = Client::connect(n.mqtt(), "sub", true).await;
    assert_eq!(
        sub.subscribe("q/+", QoS::AtLeastOnce).await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (mut publ, _) = Client::connect(n.mqtt(), "pub", true).await;
    publ.publish_acked("q/0", QoS::AtMostOnce, false, b"zero")
        .await;
    publ.publish_acked("q/1", QoS::AtLeastOnce, false, b"one")
        .await;
    publ.publish_acked("q/2", QoS::ExactlyOnce, false, b"two")
        .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = sub.next_publish().await;
        got.push((p.topic.clone(), p.qos, p.payload.clone()));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("q/0".into(), QoS::AtMostOnce, Bytes::from("zero")),
            ("q/1".into(), QoS::AtLeastOnce, Bytes::from("one")),
            // Published at QoS 2, delivered at the granted QoS 1.
            ("q/2".into(), QoS::AtLeastOnce, Bytes::from("two")),
        ]
    );
    // Every publish is in the log.
    let recs = n.all_records("telemetry").await;
    assert_eq!(recs.len(), 3);
    n.stop().await;
}

#[tokio::test]
async fn qos2_delivery_to_subscriber_uses_full_exchange() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("q2sub", true, 30).await;
    raw.send(Packet::Subscribe(Subscribe::new("x", QoS::ExactlyOnce)))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let (mut publ, _) = Client::connect(n.mqtt(), "q2pub", true).await;
    publ.publish_acked("x", QoS::ExactlyOnce, false, b"v").await;
    let Some(Packet::Publish(p)) = raw.recv().await else {
        panic!("publish")
    };
    assert_eq!(p.qos, QoS::ExactlyOnce);
    raw.send(Packet::PubRec(rumqttc::mqttbytes::v4::PubRec::new(p.pkid)))
        .await;
    assert_eq!(raw.recv().await, Some(Packet::PubRel(PubRel::new(p.pkid))));
    raw.send(Packet::PubComp(rumqttc::mqttbytes::v4::PubComp::new(
        p.pkid,
    )))
    .await;
    raw.send(Packet::PingReq).await;
    assert_eq!(raw.recv().await, Some(Packet::PingResp));
    n.stop().await;
}

#[tokio::test]
async fn qos2_retransmission_is_not_stored_twice() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("q2", true, 30).await;
    let mut p = Publish::new("once", QoS::ExactlyOnce, b"payload".to_vec());
    p.pkid = 7;
    raw.send(Packet::Publish(p.clone())).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    p.dup = true;
    raw.send(Packet::Publish(p)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    raw.send(Packet::PubRel(PubRel::new(7))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubComp(c)) if c.pkid == 7));
    let recs = n.all_records("telemetry").await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["qos"], 2);
    n.stop().await;
}

#[tokio::test]
async fn wildcards_do_not_match_dollar_topics() {
    let n = TestNode::start().await;
    let (mut all, _) = Client::connect(n.mqtt(), "all", true).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let (mut sys, _) = Client::connect(n.mqtt(), "sys", true).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    publ.publish_acked("$SYS/x", QoS::AtLeastOnce, false, b"sys")
        .await;
    publ.publish_acked("plain", QoS::AtLeastOnce, false, b"plain")
        .await;
    assert_eq!(sys.next_publish().await.topic, "$SYS/x");
    // `#` skips the $ topic: the first thing it sees is the later plain publish.
    assert_eq!(all.next_publish().await.topic, "plain");
    n.stop().await;
}

#[tokio::test]
async fn acl_refuses_filters_with_suback_failure() {
    let n = TestNode::start_with(|c| {
        c.mqtt.acl = vec![AclSettings {
            username: "*".into(),
            subscribe: vec!["public/#".into(), "devices/%c/#".into()],
        }];
    })
    .await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("dev7", true, 30).await;
    let mut s = Subscribe::new("public/a", QoS::AtLeastOnce);
    for f in [
        "secret/#",
        "#",
        "devices/dev7/cmd",
        "devices/dev8/cmd",
        "bad/#/filter",
    ] {
        s.add(f.into(), QoS::AtMostOnce);
    }
    s.pkid = 3;
    raw.send(Packet::Subscribe(s)).await;
    let Some(Packet::SubAck(ack)) = raw.recv().await else {
        panic!("suback")
    };
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ]
    );
    n.stop().await;
}

#[tokio::test]
async fn retained_messages_and_their_deletion() {
    let mut n = TestNode::start().await;
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    publ.publish_acked("r/a", QoS::AtLeastOnce, true, b"kept")
        .await;
    publ.disconnect().await;
    // Retained messages survive a restart.
    n.restart().await;
    let (mut sub, _) = Client::connect(n.mqtt(), "s", true).await;
    sub.subscribe("r/#", QoS::AtLeastOnce).await;
    let p = sub.next_publish().await;
    assert!(p.retain);
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("r/a", &b"kept"[..]));
    // A live delivery is not flagged retained, and an empty retained payload deletes.
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    publ.publish_acked("r/a", QoS::AtLeastOnce, true, b"").await;
    let p = sub.next_publish().await;
    assert!(!p.retain && p.payload.is_empty());
    let (mut late, _) = Client::connect(n.mqtt(), "late", true).await;
    late.subscribe("r/#", QoS::AtLeastOnce).await;
    publ.publish_acked("r/marker", QoS::AtLeastOnce, false, b"m")
        .await;
    assert_eq!(
        late.next_publish().await.topic,
        "r/marker",
        "no retained message left"
    );
    n.stop().await;
}

#[tokio::test]
async fn will_is_published_on_unclean_disconnect_only() {
    let n = TestNode::start().await;
    let (mut sub, _) = Client::connect(n.mqtt(), "watcher", true).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut o = Client::options(n.mqtt(), "polite", true);
    o.set_last_will(LastWill::new(
        "wills/polite",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (polite, _) = Client::connect_with(o).await;
    polite.disconnect().await;

    let mut o = Client::options(n.mqtt(), "rude", true);
    o.set_last_will(LastWill::new("wills/rude", "gone", QoS::AtLeastOnce, false));
    let (rude, _) = Client::connect_with(o).await;
    rude.kill();
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "wills/rude", "the clean DISCONNECT sent no will");
    n.stop().await;
}

#[tokio::test]
async fn will_is_published_on_keepalive_expiry() {
    let n = TestNode::start().await;
    let (mut sub, _) = Client::connect(n.mqtt(), "watcher", true).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    let mut c = rumqttc::mqttbytes::v4::Connect::new("silent");
    c.keep_alive = 1;
    c.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
        "wills/silent",
        "timeout",
        QoS::AtMostOnce,
        false,
    ));
    raw.send(Packet::Connect(c)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("wills/silent", &b"timeout"[..])
    );
    n.stop().await;
}

#[tokio::test]
async fn persistent_session_queues_for_offline_subscriber() {
    let n = TestNode::start().await;
    let (mut s, present) = Client::connect(n.mqtt(), "durable", false).await;
    assert!(!present);
    s.subscribe("d/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    for i in 0..5 {
        publ.publish_acked(
            &format!("d/{i}"),
            QoS::AtLeastOnce,
            false,
            i.to_string().as_bytes(),
        )
        .await;
    }
    let (mut s, present) = Client::connect(n.mqtt(), "durable", false).await;
    assert!(present, "session present on reconnect");
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(s.next_publish().await.topic);
    }
    got.sort();
    assert_eq!(got, vec!["d/0", "d/1", "d/2", "d/3", "d/4"]);
    // A clean session discards it.
    s.disconnect().await;
    let (c, present) = Client::connect(n.mqtt(), "durable", true).await;
    assert!(!present);
    c.disconnect().await;
    let (_c, present) = Client::connect(n.mqtt(), "durable", false).await;
    assert!(!present);
    n.stop().await;
}

#[tokio::test]
async fn persistent_session_survives_node_restart() {
    let mut n = TestNode::start().await;
    let (mut s, _) = Client::connect(n.mqtt(), "durable", false).await;
    s.subscribe("d/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    publ.publish_acked("d/x", QoS::AtLeastOnce, false, b"before restart")
        .await;
    publ.disconnect().await;
    n.restart().await;
    let (mut s, present) = Client::connect(n.mqtt(), "durable", false).await;
    assert!(present);
    let p = s.next_publish().await;
    assert_eq!(&p.payload[..], b"before restart");
    n.stop().await;
}

#[tokio::test]
async fn unacknowledged_deliveries_are_resent_on_reconnect() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("lazy", false, 30).await;
    raw.send(Packet::Subscribe(Subscribe::new("u", QoS::AtLeastOnce)))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let (mut publ, _) = Client::connect(n.mqtt(), "p", true).await;
    publ.publish_acked("u", QoS::AtLeastOnce, false, b"first")
        .await;
    publ.publish_acked("u", QoS::AtLeastOnce, false, b"second")
        .await;
    let Some(Packet::Publish(a)) = raw.recv().await else {
        panic!()
    };
    let Some(Packet::Publish(b)) = raw.recv().await else {
        panic!()
    };
    // Ack only the first, then drop the connection.
    raw.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(a.pkid)))
        .await;
    raw.send(Packet::PingReq).await;
    assert_eq!(raw.recv().await, Some(Packet::PingResp));
    drop(raw);
    let _ = b;
    let mut raw = eventually("reconnect takes over the session", || async {
        let mut raw = RawClient::connect(n.mqtt()).await;
        let ack = raw.handshake("lazy", false, 30).await;
        ack.session_present.then_some(raw)
    })
    .await;
    let Some(Packet::Publish(again)) = raw.recv().await else {
        panic!()
    };
    assert_eq!(&again.payload[..], b"second");
    n.stop().await;
}

#[tokio::test]
async fn qos1_resend_after_reconnect_is_at_least_once_and_qos2_is_exactly_once() {
    let n = TestNode::start().await;
    let mut raw = RawClient::connect(n.mqtt()).await;
    raw.handshake("dev", false, 30).await;
    let mut p1 = Publish::new("dup/q1", QoS::AtLeastOnce, b"x".to_vec());
    p1.pkid = 9;
    raw.send(Packet::Publish(p1.clone())).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == 9));
    let mut p2 = Publish::new("dup/q2", QoS::ExactlyOnce, b"y".to_vec());
    p2.pkid = 10;
    raw.send(Packet::Publish(p2.clone())).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 10));
    drop(raw);
    // The device saw neither ack and resends both with DUP after reconnecting.
    let mut raw = eventually("session taken over", || async {
        let mut raw = RawClient::connect(n.mqtt()).await;
        raw.handshake("dev", false, 30)
            .await
            .session_present
            .then_some(raw)
    })
    .await;
    p1.dup = true;
    p2.dup = true;
    raw.send(Packet::Publish(p1)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.pkid == 9));
    raw.send(Packet::Publish(p2)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.pkid == 10));
    raw.send(Packet::PubRel(PubRel::new(10))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubComp(c)) if c.pkid == 10));
    let recs = n.all_records("telemetry").await;
    let count = |s: &str| recs.iter().filter(|r| r["subject"] == s).count();
    assert_eq!(count("dup/q1"), 2, "QoS 1: at least once");
    assert_eq!(
        count("dup/q2"),
        1,
        "QoS 2: exactly once across the reconnect"
    );
    n.stop().await;
}

#[tokio::test]
async fn session_takeover_disconnects_the_old_connection() {
    let n = TestNode::start().await;
    let mut first = RawClient::connect(n.mqtt()).await;
    first.handshake("same", true, 30).await;
    let mut second = RawClient::connect(n.mqtt()).await;
    assert_eq!(
        second.handshake("same", true, 30).await.code,
        ConnectReturnCode::Success
    );
    assert!(first.until_closed().await.is_empty());
    second.send(Packet::PingReq).await;
    assert_eq!(second.recv().await, Some(Packet::PingResp));
    n.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let n = TestNode::start().await;
    let (mut s, _) = Client::connect(n.mqtt(), "s", true).await;
    s.subscribe("a", QoS::AtMostOnce).await;
    s.subscribe("b", QoS::AtMostOnce).await;
    s.client.unsubscribe("a").await.unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_)) = s.next_event().await {
            break;
        }
    }
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("a", QoS::AtLeastOnce, false, b"1").await;
    p.publish_acked("b", QoS::AtLeastOnce, false, b"2").await;
    assert_eq!(s.next_publish().await.topic, "b");
    n.stop().await;
}

#[tokio::test]
async fn routes_send_subjects_to_their_topics() {
    let n = TestNode::start_with(|c| {
        c.routes = vec![shoal::config::RouteSettings {
            filter: "factory/+/temp".into(),
            topic: "temps".into(),
            key: "{2}".into(),
        }];
    })
    .await;
    let (mut p, _) = Client::connect(n.mqtt(), "p", true).await;
    p.publish_acked("factory/l1/temp", QoS::AtLeastOnce, false, b"20")
        .await;
    p.publish_acked("home/temp", QoS::AtLeastOnce, false, b"19")
        .await;
    let temps = n.all_records("temps").await;
    assert_eq!(temps.len(), 1);
    assert_eq!(temps[0]["key"], "l1");
    let tele = n.all_records("telemetry").await;
    assert_eq!(tele.len(), 1);
    assert_eq!(tele[0]["subject"], "home/temp");
    n.stop().await;
}
