//! Publish-to-alert latency at a steady message rate on one node: MQTT QoS 1 publishes at
//! `RATE` msg/s; one in 100 carries a reading over the threshold consumer's limit, whose
//! value is the send time, so the alert received on `shoal/alerts/#` gives the latency of
//! publish -> durable append -> consumer -> alert record -> MQTT delivery.
//!
//! Run: `cargo build --profile wasm --target wasm32-unknown-unknown -p threshold` then
//! `cargo run --release -p shoal --example alert_latency [-- RATE SECONDS]`.

use std::time::{Duration, Instant};

use base64::Engine;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shoal::{Config, Node};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        mqtt_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let node = Node::start(config).await?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let module = std::fs::read(format!(
        "{target}/wasm32-unknown-unknown/wasm/threshold.wasm"
    ))?;
    let resp = reqwest::Client::new()
        .put(format!("http://{}/v1/consumers/hot", node.http_addr))
        .json(&serde_json::json!({
            "module_base64": base64::engine::general_purpose::STANDARD.encode(&module),
            "config": {"max": 1},
        }))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "deploy failed: {}",
        resp.text().await?
    );

    let base = Instant::now();
    let addr = node.mqtt_addr;
    let mut sub_opts = MqttOptions::new("latency-sub", addr.ip().to_string(), addr.port());
    sub_opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 1000);
    sub.subscribe("shoal/alerts/#", QoS::AtMostOnce).await?;
    let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let collector = tokio::spawn(async move {
        while let Ok(ev) = sub_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let now = base.elapsed().as_micros() as f64;
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if let Some(sent) = v["value"].as_f64()
                    && lat_tx.send((now - sent) / 1000.0).is_err()
                {
                    break;
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let conns = 4u64;
    let mut pubs = Vec::new();
    for c in 0..conns {
        let mut o = MqttOptions::new(
            format!("latency-pub-{c}"),
            addr.ip().to_string(),
            addr.port(),
        );
        o.set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 10_000);
        tokio::spawn(async move { while el.poll().await.is_ok() {} });
        let per_conn = rate / conns;
        pubs.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (per_conn / 100).max(1);
            let end = Instant::now() + Duration::from_secs(secs);
            let mut n = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                for _ in 0..per_tick {
                    n += 1;
                    let payload = if n.is_multiple_of(100) {
                        format!("{}", base.elapsed().as_micros() as f64 + 2.0)
                    } else {
                        "0".to_string()
                    };
                    let _ = client
                        .publish(
                            format!("lat/{c}/{}", n % 10),
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )
                        .await;
                }
            }
            n
        }));
    }
    let started = Instant::now();
    let (mut sent, mut expected) = (0, 0);
    for p in pubs {
        let n = p.await?;
        sent += n;
        expected += n / 100;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while (lat.len() as u64) < expected {
        match tokio::time::timeout_at(drain_until, lat_rx.recv()).await {
            Ok(Some(l)) => lat.push(l),
            _ => break,
        }
    }
    collector.abort();
    node.shutdown().await;
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "publish-to-alert at {:.0} msg/s offered ({sent} QoS 1 publishes in {elapsed:.1}s), {} of {expected} alerts received: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sent as f64 / elapsed,
        lat.len(),
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}
