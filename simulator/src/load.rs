//! `shoal-sim load`: an MQTT 3.1.1 load generator for benchmarks.
//!
//! It is deliberately lean so that it is not the bottleneck on a small machine: each
//! connection is one tokio task owning a raw `TcpStream`, with rumqttc's packet codec
//! (`mqttbytes::v4`) for framing and no client event loop. A PUBLISH is encoded once into a
//! template and only its packet id is patched per message; acks are parsed straight out of
//! the read buffer.
//!
//! Each connection sends CONNECT (clean session, unique client id, keep-alive 60 s), waits
//! for CONNACK, then pipelines PUBLISHes to `{prefix}/{conn}` keeping at most `--inflight`
//! unacknowledged (QoS 1: until PUBACK; QoS 2: until PUBCOMP, answering PUBREC with PUBREL),
//! and ends with DISCONNECT. The ack latency of every message goes into an HdrHistogram in
//! microseconds. With `--rate`, each connection is paced on its own evenly spaced schedule
//! (connections staggered), and a second histogram measures latency from the *intended*
//! send time, which does not hide queueing when the server falls behind (coordinated
//! omission). QoS 0 has no acks: only the send rate is measured.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, PubRel, Publish};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};

use crate::report::{Latency, Summary};

/// Largest packet accepted from the server (we only expect acks).
const READ_MAX: usize = 1 << 20;
/// MQTT's own limit on a packet's remaining length.
const WRITE_MAX: usize = 268_435_455;
/// How long CONNECT -> CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive announced in CONNECT; a PINGREQ goes out after half of it without sending.
const KEEP_ALIVE_SECS: u16 = 60;
/// Highest latency the histograms hold (longer ones are clamped): 10 minutes.
const HIST_MAX_US: u64 = 600_000_000;

/// Flags of `shoal-sim load`.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// MQTT server host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// MQTT server port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Concurrent MQTT connections.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub connections: u32,
    /// Total PUBLISHes over all connections (including warm-up).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// QoS of every PUBLISH: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes per PUBLISH.
    #[arg(long, default_value_t = 100)]
    pub payload_size: usize,
    /// Per-connection window of unacknowledged PUBLISHes (QoS 0: PUBLISHes per write).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Target total rate in messages/s, spread evenly over connections; 0 = flat out.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Topic prefix; connection i publishes to `{prefix}/{i}`.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
    /// Leave out of the figures everything acked (QoS 0: sent) in the first SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub warmup_secs: Option<f64>,
    /// Client ids are `{prefix}-{pid}-{i}`.
    #[arg(long, default_value = "sim")]
    pub client_id_prefix: String,
    /// Fail when no packet arrives for this long while publishes are unacknowledged.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_secs: u64,
    /// Tokio worker threads [default: number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

/// Entry point of `shoal-sim load`.
pub fn main(args: LoadArgs) -> Result<()> {
    validate(&args)?;
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(2)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let summary = runtime.block_on(run(&args))?;
    if args.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.to_text());
    }
    Ok(())
}

fn validate(args: &LoadArgs) -> Result<()> {
    if !args.rate.is_finite() || args.rate < 0.0 {
        bail!("--rate must be a finite number >= 0, got {}", args.rate);
    }
    if let Some(w) = args.warmup_secs
        && (!w.is_finite() || w < 0.0)
    {
        bail!("--warmup-secs must be a finite number >= 0, got {w}");
    }
    if args.topic_prefix.is_empty() || args.topic_prefix.contains(['+', '#', '\0']) {
        bail!("--topic-prefix must be non-empty and contain no '+', '#' or NUL");
    }
    if args.payload_size > 256 << 20 {
        bail!("--payload-size must be at most 256 MiB");
    }
    if args.ack_timeout_secs == 0 {
        bail!("--ack-timeout-secs must be at least 1");
    }
    Ok(())
}

/// Messages for connection `conn` when `total` are split over `connections` as evenly as
/// possible (the first `total % connections` connections take one more).
pub fn share(total: u64, connections: u32, conn: u32) -> u64 {
    let n = u64::from(connections.max(1));
    total / n + u64::from(u64::from(conn) < total % n)
}

/// Per-connection send schedule for a total `rate` (msgs/s) over `connections`: every
/// connection sends every `interval`, and connection `conn` starts `offset` after the
/// common start, so the connections interleave evenly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    pub offset: Duration,
    pub interval: Duration,
}

impl Pacing {
    /// `None` when `rate` is 0 (flat out).
    pub fn new(rate: f64, connections: u32, conn: u32) -> Option<Pacing> {
        if rate <= 0.0 || !rate.is_finite() {
            return None;
        }
        let n = f64::from(connections.max(1));
        let interval = n / rate;
        Some(Pacing {
            offset: Duration::from_secs_f64(interval * f64::from(conn) / n),
            interval: Duration::from_secs_f64(interval),
        })
    }

    /// Intended send time of message `k` (0-based) of this connection, after `start`.
    pub fn due(&self, start: Instant, k: u64) -> Instant {
        start + self.offset + Duration::from_secs_f64(self.interval.as_secs_f64() * k as f64)
    }
}

/// A PUBLISH encoded once; `encode` copies it and patches the packet id.
pub struct PublishTemplate {
    bytes: Bytes,
    /// Where the two packet-id bytes sit (QoS > 0 only).
    pkid_at: Option<usize>,
}

impl PublishTemplate {
    pub fn new(topic: &str, qos: QoS, payload: Bytes) -> Result<PublishTemplate> {
        let payload_len = payload.len();
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.to_string(),
            pkid: 1,
            payload,
        };
        let mut buf = BytesMut::new();
        Packet::Publish(publish)
            .write(&mut buf, WRITE_MAX)
            .map_err(|e| anyhow!("cannot encode PUBLISH: {e}"))?;
        // Layout: fixed header | topic | packet id (2 bytes, QoS > 0) | payload.
        let pkid_at = (qos != QoS::AtMostOnce).then(|| buf.len() - payload_len - 2);
        Ok(PublishTemplate {
            bytes: buf.freeze(),
            pkid_at,
        })
    }

    pub fn encode(&self, pkid: u16, out: &mut BytesMut) {
        let at = out.len();
        out.extend_from_slice(&self.bytes);
        if let Some(p) = self.pkid_at {
            out[at + p..at + p + 2].copy_from_slice(&pkid.to_be_bytes());
        }
    }
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).map_err(|e| anyhow!("histogram: {e}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn run(args: &LoadArgs) -> Result<Summary> {
    let addr = format!("{}:{}", args.host, args.port);
    let pid = std::process::id();
    let connects = (0..args.connections).map(|i| {
        let addr = addr.clone();
        let client_id = format!("{}-{pid}-{i}", args.client_id_prefix);
        async move {
            connect(&addr, client_id)
                .await
                .with_context(|| format!("connection {i}"))
        }
    });
    let streams = futures::future::try_join_all(connects).await?;

    let qos = qos_of(args.qos);
    let payload = Bytes::from(vec![b'x'; args.payload_size]);
    let start = Instant::now() + Duration::from_millis(1);
    let warmup_end = start + Duration::from_secs_f64(args.warmup_secs.unwrap_or(0.0));
    let mut tasks = JoinSet::new();
    for (i, stream) in (0u32..).zip(streams) {
        let template =
            PublishTemplate::new(&format!("{}/{i}", args.topic_prefix), qos, payload.clone())?;
        let window = usize::from(args.inflight);
        let conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(window * (template.bytes.len() + 8) + 64),
            template,
            qos: args.qos,
            window,
            free: (1..=args.inflight).rev().collect(),
            slots: vec![None; window + 1],
            total: share(args.messages, args.connections, i),
            sent: 0,
            acked: 0,
            measured: 0,
            pacing: Pacing::new(args.rate, args.connections, i),
            start,
            warmup_end,
            ack_timeout: Duration::from_secs(args.ack_timeout_secs),
            hist: new_histogram()?,
            hist_intended: if args.rate > 0.0 {
                Some(new_histogram()?)
            } else {
                None
            },
        };
        tasks.spawn(async move { conn.run().await.with_context(|| format!("connection {i}")) });
    }

    let mut hist = new_histogram()?;
    let mut hist_intended = (args.rate > 0.0).then(new_histogram).transpose()?;
    let (mut sent, mut acked, mut measured) = (0u64, 0u64, 0u64);
    let mut end = start;
    while let Some(joined) = tasks.join_next().await {
        // An error returns early; dropping `tasks` aborts the other connections.
        let done = joined.map_err(|e| anyhow!("connection task failed: {e}"))??;
        sent += done.sent;
        acked += done.acked;
        measured += done.measured;
        end = end.max(done.end);
        hist.add(&done.hist)
            .map_err(|e| anyhow!("histogram: {e}"))?;
        if let (Some(all), Some(h)) = (hist_intended.as_mut(), done.hist_intended.as_ref()) {
            all.add(h).map_err(|e| anyhow!("histogram: {e}"))?;
        }
    }
    if end <= warmup_end && args.warmup_secs.is_some_and(|w| w > 0.0) {
        bail!("the run ended before the warm-up did; send more messages or shorten --warmup-secs");
    }
    let elapsed = end.saturating_duration_since(warmup_end.max(start));
    Ok(Summary {
        target: addr,
        connections: args.connections,
        qos: args.qos,
        payload_size: args.payload_size,
        inflight: args.inflight,
        rate_target: args.rate,
        warmup_secs: args.warmup_secs.unwrap_or(0.0),
        sent,
        acked: (args.qos > 0).then_some(acked),
        measured,
        elapsed,
        latency: Latency::from_histogram(&hist),
        latency_intended: hist_intended.as_ref().and_then(Latency::from_histogram),
    })
}

/// Opens a TCP connection, sends CONNECT and waits for a successful CONNACK.
async fn connect(addr: &str, client_id: String) -> Result<TcpStream> {
    let mut stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("timed out connecting to {addr}"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    let mut connect = Connect::new(client_id);
    connect.keep_alive = KEEP_ALIVE_SECS;
    connect.clean_session = true;
    let mut buf = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut buf, WRITE_MAX)
        .map_err(|e| anyhow!("cannot encode CONNECT: {e}"))?;
    stream.write_all(&buf).await.context("sending CONNECT")?;
    buf.clear();
    let ack = timeout(CONNECT_TIMEOUT, read_connack(&mut stream, &mut buf))
        .await
        .map_err(|_| anyhow!("no CONNACK from {addr} within {CONNECT_TIMEOUT:?}"))??;
    if ack.code != ConnectReturnCode::Success {
        bail!("{addr} refused the connection: CONNACK {:?}", ack.code);
    }
    if !buf.is_empty() {
        bail!("{addr} sent data after CONNACK before any PUBLISH");
    }
    Ok(stream)
}

async fn read_connack(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<ConnAck> {
    loop {
        match Packet::read(buf, READ_MAX) {
            Ok(Packet::ConnAck(ack)) => return Ok(ack),
            Ok(other) => bail!("expected CONNACK, got {}", packet_name(&other)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("malformed CONNACK: {e}"),
        }
        let n = stream.read_buf(buf).await.context("reading CONNACK")?;
        if n == 0 {
            bail!("the server closed the connection before CONNACK (unexpected EOF)");
        }
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// One unacknowledged PUBLISH.
#[derive(Clone, Copy)]
struct InFlight {
    sent: Instant,
    intended: Instant,
    /// QoS 2: PUBREC arrived and PUBREL went out; waiting for PUBCOMP.
    released: bool,
}

/// What one connection measured.
struct ConnStats {
    sent: u64,
    acked: u64,
    measured: u64,
    end: Instant,
    hist: Histogram<u64>,
    hist_intended: Option<Histogram<u64>>,
}

/// One connection's publishing state.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    template: PublishTemplate,
    qos: u8,
    window: usize,
    /// Free packet ids (1..=window); a PUBLISH takes one, its final ack returns it.
    free: Vec<u16>,
    /// Indexed by packet id.
    slots: Vec<Option<InFlight>>,
    total: u64,
    sent: u64,
    acked: u64,
    /// Messages counted in the figures (after warm-up).
    measured: u64,
    pacing: Option<Pacing>,
    start: Instant,
    warmup_end: Instant,
    ack_timeout: Duration,
    hist: Histogram<u64>,
    hist_intended: Option<Histogram<u64>>,
}

impl Conn {
    fn inflight(&self) -> usize {
        self.window - self.free.len()
    }

    /// Intended time of the next PUBLISH when paced and one may still be sent.
    fn next_due(&self) -> Option<Instant> {
        let p = self.pacing?;
        (self.sent < self.total).then(|| p.due(self.start, self.sent))
    }

    /// Encodes every PUBLISH that may go out at `now` into `wbuf`.
    fn fill(&mut self, now: Instant) {
        let mut batch = 0;
        while self.sent < self.total {
            let intended = match self.pacing {
                Some(p) => {
                    let due = p.due(self.start, self.sent);
                    if due > now {
                        break;
                    }
                    due
                }
                None => now,
            };
            if self.qos == 0 {
                if batch == self.window {
                    break;
                }
                self.template.encode(0, &mut self.wbuf);
                batch += 1;
                if now >= self.warmup_end {
                    self.measured += 1;
                }
            } else {
                let Some(pkid) = self.free.pop() else { break };
                self.template.encode(pkid, &mut self.wbuf);
                self.slots[usize::from(pkid)] = Some(InFlight {
                    sent: now,
                    intended,
                    released: false,
                });
            }
            self.sent += 1;
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream
                .write_all(&self.wbuf)
                .await
                .context("sending to the server")?;
            self.wbuf.clear();
        }
        Ok(())
    }

    async fn run(mut self) -> Result<ConnStats> {
        let keepalive = Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2);
        let start = self.start;
        let sleep_to = move |t: Instant| sleep_until(t.max(start));
        sleep_to(self.start).await;
        let mut last_rx = Instant::now();
        let mut last_tx = last_rx;
        loop {
            self.fill(Instant::now());
            if !self.wbuf.is_empty() {
                self.flush().await?;
                last_tx = Instant::now();
            }
            if self.sent == self.total && self.inflight() == 0 {
                break;
            }
            let due = if self.qos == 0 || self.inflight() < self.window {
                self.next_due()
            } else {
                None
            };
            if self.qos == 0 {
                // Flat out: loop straight back to `fill`; paced: wait for the next slot.
                if let Some(t) = due {
                    sleep_to(t).await;
                }
                continue;
            }
            tokio::select! {
                read = self.stream.read_buf(&mut self.rbuf) => {
                    let n = read.context("reading from the server")?;
                    if n == 0 {
                        bail!(
                            "the server closed the connection (unexpected EOF) with {} publishes unacknowledged",
                            self.inflight()
                        );
                    }
                    last_rx = Instant::now();
                    self.on_readable(last_rx)?;
                }
                _ = sleep_to(due.unwrap_or(last_tx)), if due.is_some() => {}
                _ = sleep_to(last_tx + keepalive) => {
                    Packet::PingReq
                        .write(&mut self.wbuf, WRITE_MAX)
                        .map_err(|e| anyhow!("cannot encode PINGREQ: {e}"))?;
                }
                _ = sleep_to(last_rx + self.ack_timeout), if self.inflight() > 0 => {
                    bail!(
                        "no packet from the server for {:?} with {} publishes unacknowledged",
                        self.ack_timeout,
                        self.inflight()
                    );
                }
            }
        }
        let end = Instant::now();
        Packet::Disconnect
            .write(&mut self.wbuf, WRITE_MAX)
            .map_err(|e| anyhow!("cannot encode DISCONNECT: {e}"))?;
        self.flush().await?;
        // Best effort: the figures are complete; a reset here changes nothing.
        let _ = self.stream.shutdown().await;
        Ok(ConnStats {
            sent: self.sent,
            acked: self.acked,
            measured: self.measured,
            end,
            hist: self.hist,
            hist_intended: self.hist_intended,
        })
    }

    /// Handles every complete packet in the read buffer.
    fn on_readable(&mut self, now: Instant) -> Result<()> {
        loop {
            let packet = match Packet::read(&mut self.rbuf, READ_MAX) {
                Ok(p) => p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => bail!("malformed packet from the server: {e}"),
            };
            match packet {
                Packet::PubAck(a) if self.qos == 1 => self.complete(a.pkid, now)?,
                Packet::PubRec(r) if self.qos == 2 => {
                    let slot = self
                        .slots
                        .get_mut(usize::from(r.pkid))
                        .and_then(Option::as_mut)
                        .ok_or_else(|| anyhow!("PUBREC for unknown packet id {}", r.pkid))?;
                    slot.released = true;
                    Packet::PubRel(PubRel::new(r.pkid))
                        .write(&mut self.wbuf, WRITE_MAX)
                        .map_err(|e| anyhow!("cannot encode PUBREL: {e}"))?;
                }
                Packet::PubComp(c) if self.qos == 2 => {
                    let released = self
                        .slots
                        .get(usize::from(c.pkid))
                        .and_then(Option::as_ref)
                        .is_some_and(|s| s.released);
                    if !released {
                        bail!("PUBCOMP for packet id {} before its PUBREC", c.pkid);
                    }
                    self.complete(c.pkid, now)?;
                }
                Packet::PingResp => {}
                other => bail!(
                    "unexpected {} from the server while publishing at QoS {}",
                    packet_name(&other),
                    self.qos
                ),
            }
        }
    }

    /// The final ack for `pkid` arrived at `now`.
    fn complete(&mut self, pkid: u16, now: Instant) -> Result<()> {
        let f = self
            .slots
            .get_mut(usize::from(pkid))
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("ack for unknown packet id {pkid}"))?;
        self.free.push(pkid);
        self.acked += 1;
        if now >= self.warmup_end {
            self.measured += 1;
            self.hist
                .saturating_record(micros(now.saturating_duration_since(f.sent)).max(1));
            if let Some(h) = self.hist_intended.as_mut() {
                h.saturating_record(micros(now.saturating_duration_since(f.intended)).max(1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_evenly() {
        let parts: Vec<u64> = (0..3).map(|c| share(10, 3, c)).collect();
        assert_eq!(parts, vec![4, 3, 3]);
        assert_eq!((0..7).map(|c| share(200_000, 7, c)).sum::<u64>(), 200_000);
        assert_eq!(share(2, 5, 4), 0);
    }

    #[test]
    fn pacing_interleaves_connections() {
        assert_eq!(Pacing::new(0.0, 4, 0), None);
        let p = Pacing::new(1000.0, 4, 1).unwrap();
        // 1000 msgs/s over 4 connections: each sends every 4 ms; connection 1 starts 1 ms in.
        assert_eq!(p.interval, Duration::from_millis(4));
        assert_eq!(p.offset, Duration::from_millis(1));
        let start = Instant::now();
        assert_eq!(p.due(start, 3), start + Duration::from_millis(13));
    }

    #[test]
    fn template_patches_packet_id() {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let t = PublishTemplate::new("bench/7", qos, Bytes::from_static(b"hello")).unwrap();
            let mut buf = BytesMut::new();
            t.encode(0x1234, &mut buf);
            t.encode(9, &mut buf);
            for want in [0x1234, 9] {
                match Packet::read(&mut buf, READ_MAX).unwrap() {
                    Packet::Publish(p) => {
                        assert_eq!(p.pkid, want);
                        assert_eq!(p.qos, qos);
                        assert_eq!(p.topic, "bench/7");
                        assert_eq!(&p.payload[..], b"hello");
                    }
                    other => panic!("decoded {other:?}"),
                }
            }
            assert!(buf.is_empty());
        }
        let t = PublishTemplate::new("q0", QoS::AtMostOnce, Bytes::from_static(b"x")).unwrap();
        let mut buf = BytesMut::new();
        t.encode(5, &mut buf);
        assert!(matches!(
            Packet::read(&mut buf, READ_MAX).unwrap(),
            Packet::Publish(Publish { pkid: 0, .. })
        ));
    }
}
