//! `shoal-sim lag`: end-to-end replication lag between two nodes of a cluster. A publisher
//! sends QoS 1 messages at a fixed rate to one node; a subscriber on another node receives
//! them once that node has the record (as a replica, from its own log). Each payload
//! carries its send time, so the subscriber measures publish -> delivery latency per
//! message (both ends run in this process, so they share one clock).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

/// Flags of `shoal-sim lag`.
#[derive(Args, Debug, Clone)]
pub struct LagArgs {
    /// Node the publisher connects to (HOST:PORT).
    #[arg(long)]
    pub publish_to: String,
    /// Node the subscriber connects to (HOST:PORT); use another node than --publish-to.
    #[arg(long)]
    pub subscribe_to: String,
    /// Messages per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 100)]
    pub payload_size: usize,
    /// Topic prefix (each run adds a random suffix).
    #[arg(long, default_value = "lag")]
    pub topic_prefix: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn split(addr: &str) -> Result<(String, u16)> {
    let (h, p) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr:?} is not HOST:PORT"))?;
    Ok((
        h.to_string(),
        p.parse().with_context(|| format!("bad port in {addr:?}"))?,
    ))
}

pub fn main(args: LagArgs) -> Result<()> {
    if args.rate == 0 || args.seconds == 0 || args.payload_size < 16 {
        bail!("--rate and --seconds must be above 0 and --payload-size at least 16");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: LagArgs) -> Result<()> {
    let run_id: u32 = rand::random();
    let topic = format!("{}/{run_id:08x}", args.topic_prefix);
    let start = Instant::now();
    let (sh, sp) = split(&args.subscribe_to)?;
    let mut so = MqttOptions::new(format!("lag-sub-{run_id:08x}"), sh, sp);
    so.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sub_el) = AsyncClient::new(so, 10_000);
    sub.subscribe(format!("{topic}/#"), QoS::AtLeastOnce)
        .await?;
    // Wait for the SUBACK before publishing.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub_el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscriber: {e}"),
            Err(_) => bail!("subscriber: no SUBACK within 10 s"),
        }
    }
    let total = u64::from(args.rate) * args.seconds;
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let h2 = hist.clone();
    let receiver = tokio::spawn(async move {
        let mut got = 0u64;
        let deadline = Duration::from_secs(30);
        while got < total {
            match tokio::time::timeout(deadline, sub_el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.payload.len() >= 8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&p.payload[..8]);
                    let sent_us = u64::from_be_bytes(b);
                    let now_us = start.elapsed().as_micros() as u64;
                    if let Ok(mut h) = h2.lock() {
                        let _ = h.record(now_us.saturating_sub(sent_us).max(1));
                    }
                    got += 1;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        got
    });
    let (ph, pp) = split(&args.publish_to)?;
    let mut po = MqttOptions::new(format!("lag-pub-{run_id:08x}"), ph, pp);
    po.set_keep_alive(Duration::from_secs(30));
    po.set_inflight(1000);
    let (publisher, mut pub_el) = AsyncClient::new(po, 10_000);
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_millis(200) + interval * i as u32).await;
        let mut payload = vec![b'x'; args.payload_size];
        payload[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_be_bytes());
        publisher
            .publish(
                format!("{topic}/{}", i % 64),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await?;
    }
    let got = receiver.await?;
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "sent": total, "received": got, "rate": args.rate,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "sent {total} at {}/s, received {got} on the other node; publish -> delivery p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            args.rate,
            ms(0.5),
            ms(0.99),
            h.max() as f64 / 1000.0
        );
    }
    if got < total {
        bail!("{} messages never arrived at the subscriber", total - got);
    }
    Ok(())
}
