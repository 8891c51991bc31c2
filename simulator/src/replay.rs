//! `shoal-sim replay FILE`: publishes a data file over MQTT from many device connections,
//! in event-time order per device, at a speed factor or flat out, at QoS 0, 1 or 2. It
//! reads the generator's CSV / JSON lines and SKAB files (see [`crate::dataset`]) and can
//! target any MQTT broker. Each connection pipelines publishes (a window of unacknowledged
//! ones) on a raw socket with rumqttc's packet codec, so the replayer is rarely the
//! bottleneck.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PubRel, Publish};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::dataset::{self, Reading};

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Data file: the generator's CSV or JSON lines, or a SKAB CSV.
    pub file: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// QoS of every PUBLISH: 0, 1 or 2.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Replay speed as a factor of real time (10 = ten times faster).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Ignore event times and publish as fast as the broker acknowledges.
    #[arg(long)]
    pub flat_out: bool,
    /// Most device connections; devices share connections beyond that.
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// MQTT topic per reading: {device}, {sensor} placeholders.
    #[arg(long, default_value = "sensors/{device}/{sensor}")]
    pub topic: String,
    /// Payload per reading: {value}, {ts} (Unix ms), {device}, {sensor} placeholders.
    #[arg(long, default_value = "{value}")]
    pub payload: String,
    /// Unacknowledged publishes per connection (QoS 1/2).
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// Client ids are `{prefix}-{device}` (or `{prefix}-{n}` for a shared connection).
    #[arg(long, default_value = "replay")]
    pub client_id_prefix: String,
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long, env = "SHOAL_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A publish ready to send.
struct Msg {
    at_ms: u64,
    topic: String,
    payload: Bytes,
}

fn render(template: &str, r: &Reading) -> String {
    template
        .replace("{device}", &r.device)
        .replace("{sensor}", &r.sensor)
        .replace("{value}", &format_value(r.value))
        .replace("{ts}", &r.ts_ms.to_string())
}

fn format_value(v: f64) -> String {
    // Shortest text that reads back to the same number.
    format!("{v}")
}

pub fn main(args: ReplayArgs) -> Result<()> {
    if args.qos > 2 {
        bail!("--qos must be 0, 1 or 2");
    }
    if (args.speed.is_nan() || args.speed <= 0.0) && !args.flat_out {
        bail!("--speed must be above 0 (or use --flat-out)");
    }
    if args.connections == 0 || args.inflight == 0 {
        bail!("--connections and --inflight must be at least 1");
    }
    let readings = dataset::read_readings(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    if readings.is_empty() {
        bail!("{} has no readings", args.file.display());
    }
    // One queue per device, in event-time order; devices over the connection cap share.
    let mut devices: BTreeMap<String, Vec<Msg>> = BTreeMap::new();
    for r in &readings {
        devices.entry(r.device.clone()).or_default().push(Msg {
            at_ms: r.ts_ms,
            topic: render(&args.topic, r),
            payload: Bytes::from(render(&args.payload, r)),
        });
    }
    let t0 = readings.iter().map(|r| r.ts_ms).min().unwrap_or(0);
    let n_conns = devices.len().min(args.connections);
    let mut queues: Vec<(String, Vec<Msg>)> =
        (0..n_conns).map(|_| (String::new(), Vec::new())).collect();
    for (i, (device, msgs)) in devices.into_iter().enumerate() {
        let q = &mut queues[i % n_conns];
        if q.0.is_empty() {
            q.0 = format!("{}-{device}", args.client_id_prefix);
        } else if i >= n_conns && i < 2 * n_conns {
            q.0 = format!("{}-{}", args.client_id_prefix, i % n_conns);
        }
        q.1.extend(msgs);
    }
    for q in &mut queues {
        q.1.sort_by_key(|m| m.at_ms);
    }
    let total: u64 = queues.iter().map(|q| q.1.len() as u64).sum();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(run(&args, queues, t0, total))?;
    summary.print(args.json);
    if summary.acked < summary.sent && args.qos > 0 {
        bail!(
            "{} publishes were not acknowledged",
            summary.sent - summary.acked
        );
    }
    Ok(())
}

struct Summary {
    sent: u64,
    acked: u64,
    elapsed: Duration,
    qos: u8,
    connections: usize,
    hist: Histogram<u64>,
}

impl Summary {
    fn print(&self, json: bool) {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| self.hist.value_at_quantile(p) as f64 / 1000.0;
        if json {
            let v = serde_json::json!({
                "sent": self.sent,
                "acked": self.acked,
                "elapsed_s": secs,
                "msgs_per_s": self.sent as f64 / secs,
                "qos": self.qos,
                "connections": self.connections,
                "ack_latency_ms": if self.qos > 0 { serde_json::json!({
                    "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": self.hist.max() as f64 / 1000.0
                }) } else { serde_json::Value::Null },
            });
            println!("{v}");
        } else {
            println!(
                "replayed {} readings over {} connections in {secs:.2} s: {:.0} msgs/s, QoS {}",
                self.sent,
                self.connections,
                self.sent as f64 / secs,
                self.qos
            );
            if self.qos > 0 {
                println!(
                    "  acked {}; ack latency (ms): p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
                    self.acked,
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    self.hist.max() as f64 / 1000.0
                );
            }
        }
    }
}

async fn run(
    args: &ReplayArgs,
    queues: Vec<(String, Vec<Msg>)>,
    t0: u64,
    total: u64,
) -> Result<Summary> {
    let progress = crate::progress::bar(total, "replay");
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let addr = format!("{}:{}", args.host, args.port);
    let mut tasks = tokio::task::JoinSet::new();
    let n = queues.len();
    for (client_id, msgs) in queues {
        let args = args.clone();
        let addr = addr.clone();
        let (sent, progress) = (sent.clone(), progress.clone());
        tasks.spawn(async move {
            let r = publish_all(&args, &addr, &client_id, msgs, t0, start, &sent, &progress).await;
            r.with_context(|| format!("connection {client_id}"))
        });
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow!("{e}"))?;
    let mut acked = 0;
    let mut end = start;
    while let Some(j) = tasks.join_next().await {
        let (h, a, e) = j.map_err(|e| anyhow!("task failed: {e}"))??;
        hist.add(&h).map_err(|e| anyhow!("{e}"))?;
        acked += a;
        end = end.max(e);
    }
    progress.finish_and_clear();
    Ok(Summary {
        sent: sent.load(Ordering::Relaxed),
        acked,
        elapsed: end.saturating_duration_since(start),
        qos: args.qos,
        connections: n,
        hist,
    })
}

#[allow(clippy::too_many_arguments)]
async fn publish_all(
    args: &ReplayArgs,
    addr: &str,
    client_id: &str,
    msgs: Vec<Msg>,
    t0: u64,
    start: Instant,
    sent_total: &AtomicU64,
    progress: &indicatif::ProgressBar,
) -> Result<(Histogram<u64>, u64, Instant)> {
    let mut stream = timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("timed out connecting to {addr}"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut c = Connect::new(client_id);
    c.keep_alive = 60;
    c.clean_session = true;
    if let Some(u) = &args.username {
        c.set_login(u.clone(), args.password.clone().unwrap_or_default());
    }
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    Packet::Connect(c)
        .write(&mut wbuf, usize::MAX)
        .map_err(|e| anyhow!("encode CONNECT: {e}"))?;
    stream.write_all(&wbuf).await?;
    wbuf.clear();
    loop {
        match Packet::read(&mut rbuf, 1 << 20) {
            Ok(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => break,
            Ok(Packet::ConnAck(a)) => bail!("connection refused: CONNACK {:?}", a.code),
            Ok(_) => bail!("expected CONNACK"),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {
                if timeout(Duration::from_secs(10), stream.read_buf(&mut rbuf)).await?? == 0 {
                    bail!("closed before CONNACK");
                }
            }
            Err(e) => bail!("malformed CONNACK: {e}"),
        }
    }
    let qos = match args.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let window = usize::from(args.inflight);
    let mut free: Vec<u16> = (1..=args.inflight).rev().collect();
    let mut slots: Vec<Option<Instant>> = vec![None; window + 1];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow!("{e}"))?;
    let mut acked = 0u64;
    let mut next = 0usize;
    let mut end = Instant::now();
    let due = |m: &Msg| -> Instant {
        if args.flat_out {
            start
        } else {
            start + Duration::from_secs_f64(m.at_ms.saturating_sub(t0) as f64 / 1000.0 / args.speed)
        }
    };
    while next < msgs.len() || free.len() < window {
        let now = Instant::now();
        let mut batch = 0u64;
        while next < msgs.len()
            && due(&msgs[next]) <= now
            && (qos == QoS::AtMostOnce || !free.is_empty())
        {
            let m = &msgs[next];
            let mut p = Publish::from_bytes(m.topic.clone(), qos, m.payload.clone());
            if qos != QoS::AtMostOnce {
                let pkid = free.pop().ok_or_else(|| anyhow!("no packet id"))?;
                p.pkid = pkid;
                slots[usize::from(pkid)] = Some(now);
            }
            Packet::Publish(p)
                .write(&mut wbuf, usize::MAX)
                .map_err(|e| anyhow!("encode PUBLISH: {e}"))?;
            next += 1;
            batch += 1;
            if batch >= 1000 {
                break;
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await.context("sending")?;
            wbuf.clear();
            sent_total.fetch_add(batch, Ordering::Relaxed);
            progress.inc(batch);
            end = Instant::now();
        }
        if qos == QoS::AtMostOnce {
            if next < msgs.len() {
                let d = due(&msgs[next]);
                if d > Instant::now() {
                    tokio::time::sleep_until(d).await;
                }
            }
            continue;
        }
        // Wait for acks, or for the next reading to fall due.
        let wake = if next < msgs.len() && !free.is_empty() {
            Some(due(&msgs[next]))
        } else {
            None
        };
        let read = async { stream.read_buf(&mut rbuf).await };
        let n = match wake {
            Some(w) => match tokio::time::timeout_at(w, read).await {
                Ok(r) => r?,
                Err(_) => continue,
            },
            None => timeout(Duration::from_secs(30), read)
                .await
                .map_err(|_| anyhow!("no ack for 30 s"))??,
        };
        if n == 0 {
            bail!("the broker closed the connection");
        }
        loop {
            let p = match Packet::read(&mut rbuf, 1 << 20) {
                Ok(p) => p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("malformed packet from the broker: {e}"),
            };
            let done = match p {
                Packet::PubAck(a) => Some(a.pkid),
                Packet::PubRec(r) => {
                    Packet::PubRel(PubRel::new(r.pkid))
                        .write(&mut wbuf, usize::MAX)
                        .map_err(|e| anyhow!("encode PUBREL: {e}"))?;
                    None
                }
                Packet::PubComp(c) => Some(c.pkid),
                _ => None,
            };
            if let Some(pkid) = done
                && let Some(t) = slots.get_mut(usize::from(pkid)).and_then(Option::take)
            {
                let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                free.push(pkid);
                acked += 1;
                end = Instant::now();
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
    }
    let mut d = BytesMut::new();
    let _ = Packet::Disconnect.write(&mut d, usize::MAX);
    let _ = stream.write_all(&d).await;
    Ok((hist, acked, end))
}
