//! Real multi-process clusters (3 to 4 `shoal up` processes on their own 127.x.y.z
//! addresses, all node-to-node traffic through fault-injecting proxies): membership and
//! foreign clusters, SIGKILL during `acks=quorum` ingest (I4), a cut-off node and the
//! majority both taking writes then converging (I5), a join under load with handoff (I2, I6),
//! and a rolling restart under load. Every test checks that no acknowledged record is lost.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use shoal_tests::cluster::{Acked, Cluster, device};
use shoal_tests::{eventually, http_get};

/// Devices publishing QoS 1; each fails over along its address list.
struct Load {
    acked: Acked,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &Cluster, prefix: &'static str, plan: &[(&str, Vec<usize>)]) -> Load {
        let acked: Acked = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = plan
            .iter()
            .map(|(id, nodes)| {
                let addrs = nodes.iter().map(|i| c.nodes[*i].mqtt()).collect();
                tokio::spawn(device(
                    addrs,
                    id.to_string(),
                    prefix,
                    20,
                    acked.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load { acked, stop, tasks }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` further publishes were acknowledged.
    async fn more(&self, more: usize) {
        let target = self.count() + more;
        eventually(&format!("{target} acked publishes"), || async {
            (self.count() >= target).then_some(())
        })
        .await;
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Every acked payload is held by node `i` exactly once.
async fn holds_all_once(c: &Cluster, i: usize, topic: &str, acked: &[String]) {
    let (payloads, _) = c.local_payloads(i, topic).await;
    for p in acked {
        assert_eq!(
            payloads.get(p).copied().unwrap_or(0),
            1,
            "{} holds acked {p:?} {} times",
            c.nodes[i].name,
            payloads.get(p).copied().unwrap_or(0)
        );
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

async fn rounds(c: &Cluster, i: usize) -> u64 {
    let text = reqwest::get(format!("{}/metrics", c.nodes[i].url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric(&text, "shoal_anti_entropy_rounds_total")
}

#[tokio::test]
async fn members_placement_and_foreign_clusters_kept_out() {
    let mut c = Cluster::start(3, "").await;
    let v = http_get(&c.nodes[1].url(), "/v1/cluster").await;
    let names: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for m in v["members"].as_array().unwrap() {
        assert_eq!(m["live"], true);
        assert!(m["peer_addr"].as_str().unwrap().ends_with(":27070"));
        assert_eq!(m["origin"].as_str().unwrap().len(), 16);
    }
    // Every node computes the same placement (I1): three replicas per partition.
    let placement = |v: &Value| v["partitions"].clone();
    for i in [0, 2] {
        let other = http_get(&c.nodes[i].url(), "/v1/cluster").await;
        assert_eq!(placement(&other), placement(&v));
    }
    // Three replicas per partition; the internal control topics (RF 255) are on all nodes
    // and say so.
    assert!(
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["replicas"].as_array().unwrap().len() == 3)
    );

    // A node of another cluster seeded with n1 is never admitted. A legitimate node that
    // starts after it is admitted, which shows gossip with the seed went on meanwhile.
    let foreign_dir = tempfile::tempdir().unwrap();
    let seed = format!(
        "{}:{}",
        c.nodes[0].proxy_ip,
        shoal_tests::cluster::GOSSIP_PORT
    );
    let foreign = shoal_tests::Process::spawn(
        foreign_dir.path(),
        &[
            "--node-id",
            "intruder",
            "--cluster-id",
            "other",
            "--seed",
            &seed,
        ],
    )
    .await
    .unwrap();
    c.add_node().await;
    c.wait_live(4).await;
    for i in 0..4 {
        let v = http_get(&c.nodes[i].url(), "/v1/cluster").await;
        assert!(!v.to_string().contains("intruder"), "{v}");
    }
    let v = http_get(&foreign.url(), "/v1/cluster").await;
    assert_eq!(v["members"].as_array().unwrap().len(), 1, "{v}");

    // Failure detection: a killed node is shown dead, and its partitions get new replicas.
    c.kill9(3).await;
    c.wait_live(3).await;
    let v = http_get(&c.nodes[0].url(), "/v1/cluster").await;
    let n4 = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node_id"] == "n4")
        .unwrap()
        .clone();
    assert_eq!(n4["live"], false);
    assert!(!v["partitions"].to_string().contains("\"n4\""));
}

/// (a) SIGKILL a node during QoS 1 ingest with acks=quorum: every PUBACKed record is
/// readable from the survivors, and after a restart present exactly once on all replicas.
#[tokio::test]
async fn sigkill_during_quorum_ingest_loses_no_acknowledged_record() {
    let mut c = Cluster::start(3, "").await;
    let load = Load::start(
        &c,
        "sensors",
        &[("d1", vec![0, 1]), ("d2", vec![2, 0]), ("d3", vec![1, 0])],
    );
    load.more(600).await;
    c.kill9(2).await;
    load.more(600).await;
    let acked = load.stop().await;
    assert!(acked.len() >= 1200);
    // The survivors converge and each holds every acknowledged record once.
    c.wait_converged(0, "telemetry", Duration::from_secs(30))
        .await;
    for i in [0, 1] {
        holds_all_once(&c, i, "telemetry", &acked).await;
    }
    c.start_node(2).await;
    c.wait_live(3).await;
    c.wait_converged(2, "telemetry", Duration::from_secs(30))
        .await;
    for i in 0..3 {
        holds_all_once(&c, i, "telemetry", &acked).await;
    }
}

/// (b) Cut one node off while both sides take writes (acks=local topic), then heal: every
/// partition's replicas show the same digest within two anti-entropy rounds (I5).
#[tokio::test]
async fn cut_off_node_and_majority_both_take_writes_then_converge() {
    let toml = r#"
[[topics]]
name = "events"
partitions = 4
replication_factor = 3
acks = "local"

[[routes]]
filter = "ev/#"
topic = "events"
"#;
    let c = Cluster::start(3, toml).await;
    let ip = c.nodes[2].ip;
    c.net.isolate(ip);
    // The majority sees the cut-off node dead.
    c.wait_live_on(&[0, 1], 2).await;
    let majority = Load::start(&c, "ev", &[("m1", vec![0]), ("m2", vec![1])]);
    let minority = Load::start(&c, "ev", &[("x1", vec![2])]);
    majority.more(300).await;
    minority.more(300).await;
    let mut acked = majority.stop().await;
    acked.extend(minority.stop().await);
    // The two sides differ now: the cut-off node's copies have other digests.
    let digests = |v: Value| -> Vec<Value> {
        v["partitions_detail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["digest"].clone())
            .collect()
    };
    let a = digests(http_get(&c.nodes[0].url(), "/v1/topics/events?scope=local").await);
    let b = digests(http_get(&c.nodes[2].url(), "/v1/topics/events?scope=local").await);
    assert!(a.iter().zip(&b).any(|(x, y)| x != y), "{a:?} {b:?}");
    c.net.heal();
    c.wait_live(3).await;
    let before: Vec<u64> = [
        rounds(&c, 0).await,
        rounds(&c, 1).await,
        rounds(&c, 2).await,
    ]
    .into();
    c.wait_converged(0, "events", Duration::from_secs(30)).await;
    let after: Vec<u64> = [
        rounds(&c, 0).await,
        rounds(&c, 1).await,
        rounds(&c, 2).await,
    ]
    .into();
    let used: Vec<u64> = before.iter().zip(&after).map(|(b, a)| a - b).collect();
    assert!(
        used.iter().all(|r| *r <= 2),
        "converged only after {used:?} anti-entropy rounds (target: 2)"
    );
    for i in 0..3 {
        holds_all_once(&c, i, "events", &acked).await;
    }
}

/// (c) A node joins under load: partitions move per placement, nothing is lost, and old
/// copies are dropped after handoff (I2, I6).
#[tokio::test]
async fn join_under_load_moves_partitions_and_drops_old_copies() {
    let mut c = Cluster::start(3, "").await;
    let load = Load::start(&c, "sensors", &[("d1", vec![0, 1]), ("d2", vec![1, 0])]);
    load.more(400).await;
    let before = http_get(&c.nodes[0].url(), "/v1/cluster").await;
    c.add_node().await;
    c.wait_live(4).await;
    load.more(400).await;
    let acked = load.stop().await;
    let after = http_get(&c.nodes[0].url(), "/v1/cluster").await;
    // The joiner took some replica slots, and only slots it outranks a member for.
    let slots = |v: &Value, node: &str| {
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["topic"] == "telemetry" && p["replicas"].to_string().contains(node))
            .count()
    };
    assert_eq!(slots(&before, "n4"), 0);
    assert!(slots(&after, "n4") > 0, "{after:#}");
    c.wait_converged(3, "telemetry", Duration::from_secs(30))
        .await;
    // After handoff, every acked record is on exactly three nodes, and each node holds only
    // the partitions placed on it.
    let placement: HashMap<u64, Vec<String>> = after["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == "telemetry")
        .map(|p| {
            (
                p["partition"].as_u64().unwrap(),
                serde_json::from_value(p["replicas"].clone()).unwrap(),
            )
        })
        .collect();
    for i in 0..4 {
        let name = c.nodes[i].name.clone();
        let url = c.nodes[i].url();
        let placement = &placement;
        eventually(
            &format!("{name} dropped the partitions it no longer replicates"),
            || {
                let url = url.clone();
                let name = name.clone();
                async move {
                    let v = http_get(&url, "/v1/topics/telemetry?scope=local").await;
                    v["partitions_detail"]
                        .as_array()?
                        .iter()
                        .all(|p| {
                            let part = p["partition"].as_u64().unwrap();
                            placement[&part].contains(&name) || p["records"] == 0
                        })
                        .then_some(())
                }
            },
        )
        .await;
    }
    let mut copies: HashMap<String, usize> = HashMap::new();
    for i in 0..4 {
        let (payloads, _) = c.local_payloads(i, "telemetry").await;
        for (p, n) in payloads {
            *copies.entry(p).or_default() += n;
        }
    }
    for p in &acked {
        assert_eq!(copies.get(p).copied().unwrap_or(0), 3, "{p:?}");
    }
}

/// (d) Rolling restart of every node under load: no acknowledged record is lost.
#[tokio::test]
async fn rolling_restart_under_load_loses_nothing() {
    let mut c = Cluster::start(3, "").await;
    let load = Load::start(
        &c,
        "sensors",
        &[
            ("d1", vec![0, 1, 2]),
            ("d2", vec![1, 2, 0]),
            ("d3", vec![2, 0, 1]),
        ],
    );
    load.more(300).await;
    for i in 0..3 {
        c.terminate(i).await;
        load.more(200).await;
        c.start_node(i).await;
        c.wait_live(3).await;
        load.more(200).await;
    }
    let acked = load.stop().await;
    c.wait_converged(0, "telemetry", Duration::from_secs(30))
        .await;
    for i in 0..3 {
        holds_all_once(&c, i, "telemetry", &acked).await;
    }
}

/// Cluster-wide reads and MQTT (4 nodes, RF 3, so each node lacks some partitions): an MQTT
/// subscriber on any node gets publishes made on another; a read of a partition a node does
/// not hold is forwarded to a replica; a reader resumes on another node by version vector.
#[tokio::test]
async fn any_node_serves_reads_and_relays_publishes_to_its_subscribers() {
    use rumqttc::QoS;
    use shoal_tests::Client;
    let c = Cluster::start(4, "").await;
    let cluster = http_get(&c.nodes[3].url(), "/v1/cluster").await;
    let not_on_n4: Vec<u64> = cluster["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == "telemetry" && !p["replicas"].to_string().contains("\"n4\""))
        .map(|p| p["partition"].as_u64().unwrap())
        .collect();
    assert!(
        !not_on_n4.is_empty(),
        "some partitions live elsewhere: {cluster:#}"
    );

    let (mut sub, _) = Client::connect(c.nodes[3].mqtt(), "watcher", true).await;
    sub.subscribe("plant/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = Client::connect(c.nodes[0].mqtt(), "pub", true).await;
    let n = 40;
    for i in 0..n {
        let payload = format!("m{i}");
        publisher
            .publish_acked(
                &format!("plant/dev{i}"),
                QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
            )
            .await;
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < n {
        let p = sub.next_publish().await;
        got.insert(String::from_utf8_lossy(&p.payload).to_string());
    }

    // Reads of a partition n4 does not hold are served by a replica; the owners hold every
    // record once replication settles.
    c.wait_converged(3, "telemetry", Duration::from_secs(20))
        .await;
    let mut total = 0;
    for p in 0..8u64 {
        let v = http_get(
            &c.nodes[3].url(),
            &format!("/v1/topics/telemetry/partitions/{p}/records?from=beginning&limit=1000"),
        )
        .await;
        if not_on_n4.contains(&p) {
            assert_ne!(v["served_by"], "n4", "{v}");
        } else {
            assert_eq!(v["served_by"], "n4", "{v}");
        }
        total += v["records"].as_array().unwrap().len();
    }
    assert_eq!(total, n);

    // Resume by version vector: half the partition's records from one replica, the rest
    // from another; together exactly the partition's records.
    let p = not_on_n4[0];
    let replicas: Vec<String> = cluster["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["topic"] == "telemetry" && x["partition"] == p)
        .map(|x| serde_json::from_value(x["replicas"].clone()).unwrap())
        .unwrap();
    let url_of = |name: &str| c.nodes.iter().find(|x| x.name == name).unwrap().url();
    let all = http_get(
        &url_of(&replicas[0]),
        &format!("/v1/topics/telemetry/partitions/{p}/records?after=&limit=1000"),
    )
    .await;
    let all: Vec<String> = all["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let first = http_get(
        &url_of(&replicas[0]),
        &format!("/v1/topics/telemetry/partitions/{p}/records?after=&limit=2"),
    )
    .await;
    let vv = first["version_vector"].as_str().unwrap().to_string();
    let rest = http_get(
        &url_of(&replicas[1]),
        &format!("/v1/topics/telemetry/partitions/{p}/records?after={vv}&limit=1000"),
    )
    .await;
    let mut ids: Vec<String> = first["records"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["records"].as_array().unwrap())
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected = all.clone();
    expected.sort();
    assert_eq!(ids, expected);
}

/// A consumer deployed on one node runs on every partition's owner; when an owner is
/// SIGKILLed mid-stream, the new owner resumes from the replicated checkpoint (I7): every
/// record gets its alert, under the same deterministic id.
#[tokio::test]
async fn consumer_fails_over_to_the_new_owner_without_skipping_records() {
    let mut c = Cluster::start(3, "").await;
    let module = shoal_tests::consumer_wasm("threshold");
    let (code, v) = shoal_tests::deploy(
        &c.nodes[0].url(),
        "all",
        &module,
        serde_json::json!({"config": {"max": -1}}),
        None,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    for i in 1..3 {
        let url = format!("{}/v1/consumers/all", c.nodes[i].url());
        eventually("the deploy reached every node", || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status() == 200)
                    .map(|_| ())
            }
        })
        .await;
    }
    let total = 30_000usize;
    let body: String = (0..total)
        .map(|i| format!("{{\"subject\":\"k/{}\",\"payload\":{i}}}\n", i % 64))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/topics/telemetry/records", c.nodes[0].url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    // Kill the node that owns the most partitions once consumers are under way.
    let cluster = http_get(&c.nodes[0].url(), "/v1/cluster").await;
    let mut owned: HashMap<String, usize> = HashMap::new();
    for p in cluster["partitions"].as_array().unwrap() {
        if p["topic"] == "telemetry" {
            *owned
                .entry(p["owner"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let (victim_name, _) = owned.iter().max_by_key(|(_, n)| **n).unwrap();
    let victim = c.nodes.iter().position(|n| n.name == *victim_name).unwrap();
    let vurl = c.nodes[victim].url();
    let before = eventually("the victim is processing", || {
        let vurl = vurl.clone();
        async move {
            let s = http_get(&vurl, "/v1/consumers/all").await;
            let n: u64 = s["partitions"]
                .as_array()?
                .iter()
                .map(|p| p["records_in"].as_u64().unwrap_or(0))
                .sum();
            (n > 0).then_some(n)
        }
    })
    .await;
    c.kill9(victim).await;
    eprintln!("killed {victim_name} after it processed {before} records");
    let survivor = (0..3).find(|i| *i != victim).unwrap();
    let surl = c.nodes[survivor].url();
    let alerts = eventually("every record alerted after the failover", || {
        let surl = surl.clone();
        async move {
            let a = shoal_tests::alerts(&surl, Some("all")).await;
            let ids: std::collections::HashSet<String> = a
                .iter()
                .map(|x| x["id"].as_str().unwrap().to_string())
                .collect();
            (ids.len() >= total).then_some(a)
        }
    })
    .await;
    let mut records = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for a in &alerts {
        ids.insert(a["id"].as_str().unwrap().to_string());
        records.insert((
            a["partition"].as_u64().unwrap(),
            a["record_id"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(records.len(), total, "no record skipped");
    assert_eq!(ids.len(), total, "one alert id per record");
    assert_eq!(alerts.len(), total, "no alert id twice in _alerts");
    eprintln!(
        "{} alert rows for {total} records ({} re-raised under the same id)",
        alerts.len(),
        alerts.len() - total
    );
}

/// Retained messages and persistent sessions work whichever node a client reconnects to: a
/// retained message published on one node is served by another, and a persistent session
/// made on a node that then dies continues on a survivor without resubscribing.
#[tokio::test]
async fn retained_messages_and_sessions_follow_a_client_to_another_node() {
    use rumqttc::QoS;
    use shoal_tests::Client;
    let mut c = Cluster::start(3, "").await;
    let (mut p, _) = Client::connect(c.nodes[0].mqtt(), "publisher", true).await;
    p.publish_acked("dev/1/state", QoS::AtLeastOnce, true, b"on")
        .await;

    // A subscriber on another node gets the retained state.
    let url = c.nodes[2].url();
    eventually("n3 holds the retained message", || {
        let url = url.clone();
        async move {
            let v = http_get(&url, "/v1/topics/_retained?scope=local").await;
            (v["records"].as_u64()? >= 1).then_some(())
        }
    })
    .await;
    let got = eventually("a subscriber on n3 gets the retained message", || async {
        let (mut s, _) = Client::connect(c.nodes[2].mqtt(), "reader", true).await;
        s.subscribe("dev/#", QoS::AtLeastOnce).await;
        let p = tokio::time::timeout(Duration::from_millis(500), s.next_publish())
            .await
            .ok()?;
        Some(p)
    })
    .await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.retain),
        ("dev/1/state", &b"on"[..], true)
    );

    // A persistent session made on n1 ...
    let (mut s, present) = Client::connect(c.nodes[0].mqtt(), "sticky", false).await;
    assert!(!present);
    s.subscribe("alerts/#", QoS::AtLeastOnce).await;
    s.disconnect().await;
    let url = c.nodes[1].url();
    eventually("n2 knows the session", || {
        let url = url.clone();
        async move {
            let r = reqwest::get(format!("{url}/v1/sessions/sticky"))
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            (v["subscriptions"][0]["filter"] == "alerts/#").then_some(())
        }
    })
    .await;
    // ... survives n1's death: the client fails over to n2 and gets what is published
    // meanwhile, without subscribing again.
    c.kill9(0).await;
    let (mut p, _) = Client::connect(c.nodes[2].mqtt(), "publisher2", true).await;
    p.publish_acked("alerts/boiler", QoS::AtLeastOnce, false, b"hot")
        .await;
    let (mut s, present) = Client::connect(c.nodes[1].mqtt(), "sticky", false).await;
    assert!(
        present,
        "the session is present on the node the client failed over to"
    );
    let m = s.next_publish().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("alerts/boiler", &b"hot"[..])
    );
}

/// A node restarted while its peers are down remembers them (I4): it does not ack alone a
/// write that needs a quorum (the connection closes without PUBACK after the ack timeout),
/// and acks again once a second replica is back.
#[tokio::test]
async fn a_restarted_node_alone_does_not_ack_what_needs_a_quorum() {
    use rumqttc::QoS;
    use rumqttc::mqttbytes::v4::{Packet, Publish};
    let mut c = Cluster::start(3, "").await;
    for i in 0..3 {
        c.kill9(i).await;
    }
    c.start_node(0).await;
    let mut raw = shoal_tests::RawClient::connect(c.nodes[0].mqtt()).await;
    raw.handshake("lonely", true, 60).await;
    let mut p = Publish::new("sensors/x", QoS::AtLeastOnce, b"1".to_vec());
    p.pkid = 1;
    raw.send(Packet::Publish(p)).await;
    let seen = raw.until_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "acked with one copy out of three: {seen:?}"
    );
    c.start_node(1).await;
    c.wait_live_on(&[0, 1], 2).await;
    let (mut client, _) = shoal_tests::Client::connect(c.nodes[0].mqtt(), "back", true).await;
    client
        .publish_acked("sensors/x", QoS::AtLeastOnce, false, b"2")
        .await;
}
