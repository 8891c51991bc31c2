//! TCP drivers of replication: one outbound connection per live peer, on which this node
//! streams its own records (as the coordinator) and anti-entropy pushes, and reads acks,
//! gap reports and digests; and the inbound side, which stores what peers send (I3 is
//! checked by the storage writer) and answers each `Append` with `Ack`/`Gap` after commit,
//! in order. Frames are length-capped postcard ([`super::wire`]); the first frame both ways
//! is `Hello`, and a foreign cluster id or protocol version closes the connection.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::wire::{Frame, FrameCodec, PROTO_MAX, PROTO_MIN, WireRecord, negotiate};
use super::{Control, Shared, Vv};
use crate::metrics::METRICS;
use crate::storage::{Op, OpOutcome, PendingWrite, Record, StorageError};
use crate::types::{Offset, PartitionId};

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Records per `Append` frame (and bytes, roughly).
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 4 << 20;

type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>;
type Writer = FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>;

fn hello(s: &Shared) -> Frame {
    Frame::Hello {
        cluster_id: s.cluster_id.clone(),
        node_id: s.me.clone(),
        origin: s.origin,
        proto_min: PROTO_MIN,
        proto_max: PROTO_MAX,
    }
}

/// Reads the peer's `Hello` and checks it; returns its node id.
async fn read_hello(s: &Shared, reader: &mut Reader) -> Result<String, String> {
    let frame = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
        .await
        .map_err(|_| "no Hello within 5 s".to_string())?
        .ok_or("closed before Hello")?
        .map_err(|e| e.to_string())?;
    let Frame::Hello {
        cluster_id,
        node_id,
        proto_min,
        proto_max,
        ..
    } = frame
    else {
        return Err("first frame is not Hello".into());
    };
    if cluster_id != s.cluster_id {
        return Err(format!(
            "peer {node_id:?} belongs to cluster {cluster_id:?}, not {:?}",
            s.cluster_id
        ));
    }
    if negotiate(proto_min, proto_max).is_none() {
        return Err(format!(
            "peer {node_id:?} speaks protocol {proto_min}..={proto_max}, this node {PROTO_MIN}..={PROTO_MAX}"
        ));
    }
    Ok(node_id)
}

/// Accepts peer connections until shutdown.
pub(crate) async fn listen(s: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = s.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let s2 = s.clone();
                s.tracker.spawn(async move {
                    if let Err(e) = inbound(s2, stream).await {
                        tracing::info!(%addr, error = %e, "peer connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the inbound writer half sends, in arrival order.
enum Reply {
    /// An `Append` being committed: ack its origins once durable.
    Stored {
        topic: String,
        partition: u32,
        origins: Vec<u64>,
        write: PendingWrite,
    },
    Frame(Frame),
}

/// A peer's connection to this node: it sends records and digests; acks go back in order.
async fn inbound(s: Arc<Shared>, stream: TcpStream) -> Result<(), String> {
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::before_hello());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let peer = read_hello(&s, &mut reader).await?;
    *reader.decoder_mut() = FrameCodec::default();
    writer.send(hello(&s)).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::channel::<Reply>(256);
    let stop = s.shutdown.clone();
    let replies = async move {
        while let Some(reply) = rx.recv().await {
            match reply {
                Reply::Frame(f) => writer.feed(f).await.map_err(|e| e.to_string())?,
                Reply::Stored {
                    topic,
                    partition,
                    origins,
                    write,
                } => {
                    let outcomes = write
                        .await
                        .map_err(|e| format!("storing replicated records failed: {e}"))?;
                    if let Some(OpOutcome::Replicated {
                        version_vector,
                        gaps,
                    }) = outcomes.into_iter().next()
                    {
                        for o in origins {
                            let seq = crate::storage::vv_get(&version_vector, o);
                            let f = if gaps.contains(&o) {
                                Frame::Gap {
                                    topic: topic.clone(),
                                    partition,
                                    origin: o,
                                    have: seq,
                                }
                            } else {
                                Frame::Ack {
                                    topic: topic.clone(),
                                    partition,
                                    origin: o,
                                    seq,
                                }
                            };
                            writer.feed(f).await.map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
            if rx.is_empty() {
                writer.flush().await.map_err(|e| e.to_string())?;
            }
        }
        Ok::<(), String>(())
    };
    let reads = async {
        // Owned here: when reading ends, the replies half drains and ends too.
        let tx = tx;
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                f = reader.next() => match f {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(format!("bad frame from {peer}: {e}")),
                    Some(Ok(f)) => f,
                },
            };
            match frame {
                Frame::Append {
                    topic,
                    partition,
                    records,
                } => {
                    if s.storage.topic(&topic).is_none() {
                        // Not known here yet (gossip brings it); anti-entropy resends later.
                        continue;
                    }
                    METRICS
                        .replication_records_received
                        .inc_by(records.len() as u64);
                    let mut origins: Vec<u64> = Vec::new();
                    for r in &records {
                        if !origins.contains(&r.origin) {
                            origins.push(r.origin);
                        }
                    }
                    let op = Op::Replicate {
                        topic: Arc::from(topic.as_str()),
                        partition: PartitionId(partition),
                        records: records.into_iter().map(Record::from).collect(),
                    };
                    match s.storage.enqueue(vec![op]).await {
                        Ok(write) => {
                            let reply = Reply::Stored {
                                topic,
                                partition,
                                origins,
                                write,
                            };
                            if tx.send(reply).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(StorageError::UnknownPartition { .. }) => continue,
                        Err(e) => return Err(format!("storage refused replicated records: {e}")),
                    }
                }
                Frame::Digest {
                    topic,
                    partition,
                    version_vector,
                    ..
                } => {
                    if s.storage.topic(&topic).is_none() {
                        continue;
                    }
                    let mine = my_vv(&s, &topic, partition).await;
                    let reply = Frame::Digest {
                        topic: topic.clone(),
                        partition,
                        digest: super::digest(&mine),
                        version_vector: mine,
                    };
                    if tx.send(Reply::Frame(reply)).await.is_err() {
                        return Ok(());
                    }
                    s.on_digest(&peer, topic, partition, version_vector).await;
                }
                Frame::Pull {
                    topic,
                    partition,
                    version_vector,
                } => s.control(
                    &peer,
                    Control::Push {
                        topic,
                        partition,
                        have: version_vector,
                        only: None,
                        upto: None,
                    },
                ),
                Frame::Trimmed {
                    topic,
                    partition,
                    origin,
                    below,
                } => {
                    if s.storage.topic(&topic).is_none() {
                        continue;
                    }
                    let op = Op::SkipTrimmed {
                        topic: Arc::from(topic.as_str()),
                        partition: PartitionId(partition),
                        origin,
                        below,
                    };
                    // In the same ordered queue as the Appends that follow it.
                    if let Err(e) = s.storage.enqueue(vec![op]).await {
                        return Err(format!("storage refused a trimmed prefix: {e}"));
                    }
                }
                Frame::Live { records, .. } => {
                    let batch: Vec<Arc<Record>> = records
                        .into_iter()
                        .map(|r| Arc::new(Record::from(r)))
                        .collect();
                    let _ = s.remote.send(Arc::new(batch));
                }
                Frame::Hello { .. } => return Err(format!("second Hello from {peer}")),
                Frame::Ack { .. } | Frame::Gap { .. } => {}
            }
        }
    };
    let stop = s.shutdown.clone();
    tokio::select! {
        _ = stop.cancelled() => Ok(()),
        (a, b) = async { tokio::join!(reads, replies) } => a.and(b),
    }
}

async fn my_vv(s: &Shared, topic: &str, partition: u32) -> Vv {
    let st = s.storage.clone();
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || st.partition_meta(&t, PartitionId(partition)))
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|m| m.version_vector)
        .unwrap_or_default()
}

/// Connects from this node's peer IP when it listens on one (so peers and firewalls see the
/// node's own address), else from whatever the route picks.
async fn connect(
    bind_ip: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(ip) = bind_ip else {
        return TcpStream::connect(addr).await;
    };
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// This node's connection to `peer`, reconnecting with backoff until `stop`.
pub(crate) async fn outbound(
    s: Arc<Shared>,
    peer: String,
    addr: SocketAddr,
    mut control: mpsc::Receiver<Control>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio::time::timeout(Duration::from_secs(2), connect(s.bind_ip, addr)) => c,
        };
        match connected {
            Ok(Ok(stream)) => {
                backoff = Duration::from_millis(50);
                let _ = stream.set_nodelay(true);
                // Raced with `stop`, so a peer that stopped reading cannot hold shutdown.
                let run = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = session(&s, &peer, stream, &mut control, &stop) => r,
                };
                match run {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::info!(%peer, %addr, error = %e, "replication connection lost; reconnecting")
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(%peer, %addr, error = %e, "cannot connect to peer"),
            Err(_) => tracing::debug!(%peer, %addr, "connecting to peer timed out"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A frame being filled: topic, partition, records, approximate bytes.
type Pending = (Arc<str>, u32, Vec<WireRecord>, usize);

/// Adds a record to the last frame when it is for the same partition and has room (records
/// and bytes, so a frame stays far below `MAX_FRAME`), else starts a new frame.
fn add(frames: &mut Vec<Pending>, topic: &Arc<str>, partition: u32, r: &Record) {
    let size = r.payload.len()
        + r.key.len()
        + r.subject.len()
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 48;
    match frames.last_mut() {
        Some((t, p, v, bytes))
            if t == topic
                && *p == partition
                && v.len() < BATCH_RECORDS
                && *bytes + size <= BATCH_BYTES =>
        {
            v.push(WireRecord::from(r.clone()));
            *bytes += size;
        }
        _ => frames.push((
            topic.clone(),
            partition,
            vec![WireRecord::from(r.clone())],
            size,
        )),
    }
}

/// One sample of the (seq -> offset) index every this many of this node's records.
const INDEX_EVERY: u64 = 256;
/// Samples kept per partition.
const INDEX_MAX: usize = 4096;

/// One connected session: returns `Ok` on stop, `Err` when the connection failed.
async fn session(
    s: &Arc<Shared>,
    peer: &str,
    stream: TcpStream,
    control: &mut mpsc::Receiver<Control>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::before_hello());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    // Subscribe before anything is sent: every commit from here on is seen live.
    let mut live = s.storage.subscribe_committed();
    writer.send(hello(s)).await.map_err(|e| e.to_string())?;
    let theirs = read_hello(s, &mut reader).await?;
    *reader.decoder_mut() = FrameCodec::default();
    if theirs != peer {
        return Err(format!("expected peer {peer:?}, {theirs:?} answered"));
    }
    tracing::info!(%peer, "replication connection up");
    // The reader half runs on its own so acks are always read, even during a long push.
    let (gap_tx, mut gaps) = mpsc::channel::<(String, u32, u64, u64)>(1024);
    let rs = s.clone();
    let rpeer = peer.to_string();
    let read_stop = stop.child_token();
    let read_task = {
        let read_stop = read_stop.clone();
        s.tracker.spawn(async move {
            loop {
                let f = tokio::select! {
                    _ = read_stop.cancelled() => return Ok(()),
                    f = reader.next() => f,
                };
                match f {
                    None => return Err("peer closed the connection".to_string()),
                    Some(Err(e)) => return Err(format!("bad frame: {e}")),
                    Some(Ok(Frame::Ack {
                        topic,
                        partition,
                        origin,
                        seq,
                    })) => {
                        rs.on_ack(&rpeer, &topic, partition, origin, seq);
                    }
                    Some(Ok(Frame::Gap {
                        topic,
                        partition,
                        origin,
                        have,
                    })) => {
                        rs.on_ack(&rpeer, &topic, partition, origin, have);
                        let _ = gap_tx.try_send((topic, partition, origin, have));
                    }
                    Some(Ok(Frame::Digest {
                        topic,
                        partition,
                        version_vector,
                        ..
                    })) => {
                        rs.on_digest(&rpeer, topic, partition, version_vector).await;
                    }
                    Some(Ok(_)) => {}
                }
            }
        })
    };
    let _stop_reader = read_stop.clone().drop_guard();
    // On (re)connect, compare every shared partition right away.
    super::round_for(s, peer);
    // Sampled (seq -> offset) of this node's records per partition and origin, so a resend after a
    // gap starts near the gap instead of at the start of the log.
    let mut index: HashMap<(Arc<str>, u32, u64), BTreeMap<u64, u64>> = HashMap::new();
    let mut handled_gaps: HashMap<(String, u32, u64), u64> = HashMap::new();
    let mut read_task = std::pin::pin!(read_task);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = &mut read_task => {
                return Err(match r {
                    Ok(Ok(())) => "reader stopped".into(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                });
            }
            batch = live.recv() => match batch {
                Ok(batch) => {
                    let view = s.view.borrow().clone();
                    let mut frames: Vec<Pending> = Vec::new();
                    let mut live_frames: Vec<Pending> = Vec::new();
                    // Commit batches are ordered by partition: one placement per run.
                    let mut last: Option<(Arc<str>, u32, bool)> = None;
                    for c in batch.iter() {
                        if !s.storage.is_own(c.record.id.origin.0) {
                            continue;
                        }
                        let to_peer = match &last {
                            Some((t, p, b)) if *p == c.partition.0 && **t == *c.topic => *b,
                            _ => {
                                let Some(cfg) = s.storage.topic(&c.topic) else { continue };
                                let b = view
                                    .replicas(&c.topic, c.partition.0, cfg.replication_factor)
                                    .iter()
                                    .any(|r| r == peer);
                                last = Some((c.topic.clone(), c.partition.0, b));
                                b
                            }
                        };
                        if !to_peer {
                            // Not stored there: relayed for its live MQTT subscribers only.
                            if !c.topic.starts_with('_') {
                                add(&mut live_frames, &c.topic, c.partition.0, &c.record);
                            }
                            continue;
                        }
                        // A hole in what this connection sent (a placement change, a lag) is
                        // reported by the replica as a gap and resent from the log then.
                        let seq = c.record.id.seq.0;
                        if seq % INDEX_EVERY == 1 {
                            let idx = index
                                .entry((c.topic.clone(), c.partition.0, c.record.id.origin.0))
                                .or_default();
                            idx.insert(seq, c.offset.0);
                            if idx.len() > INDEX_MAX {
                                idx.pop_first();
                            }
                        }
                        add(&mut frames, &c.topic, c.partition.0, &c.record);
                    }
                    for (topic, partition, records, _) in frames {
                        METRICS.replication_records_sent.inc_by(records.len() as u64);
                        writer.feed(Frame::Append { topic: topic.to_string(), partition, records }).await.map_err(|e| e.to_string())?;
                    }
                    for (topic, partition, records, _) in live_frames {
                        writer.feed(Frame::Live { topic: topic.to_string(), partition, records }).await.map_err(|e| e.to_string())?;
                    }
                    writer.flush().await.map_err(|e| e.to_string())?;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(%peer, skipped = n, "live feed lagged; comparing digests");
                    super::round_for(s, peer);
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            Some((topic, partition, origin, have)) = gaps.recv() => {
                // Gaps reported for frames sent before the resend reached the peer repeat the
                // same `have`: one resend covers them.
                let key = (topic.clone(), partition, origin);
                if handled_gaps.get(&key) == Some(&have) {
                    continue;
                }
                handled_gaps.insert(key, have);
                let from = if s.storage.is_own(origin) {
                    index
                        .get(&(Arc::from(topic.as_str()), partition, origin))
                        .and_then(|idx| idx.range(..=have.saturating_add(1)).next_back().map(|(_, o)| *o))
                        .unwrap_or(0)
                } else {
                    0
                };
                push(s, &mut writer, &topic, partition, Offset(from), vec![(origin, have)], Some(origin), None).await?;
            }
            Some(c) = control.recv() => match c {
                Control::Digest { topic, partition } => {
                    let vv = my_vv(s, &topic, partition).await;
                    let f = Frame::Digest { topic, partition, digest: super::digest(&vv), version_vector: vv };
                    writer.send(f).await.map_err(|e| e.to_string())?;
                }
                Control::Push { topic, partition, have, only, upto } => {
                    push(s, &mut writer, &topic, partition, Offset(0), have, only, upto).await?;
                }
            },
        }
    }
}

/// Sends the peer every record of a partition it lacks relative to `have`, read from the
/// log in chunks (resends after a gap, anti-entropy, filling a joining node).
#[allow(clippy::too_many_arguments)]
async fn push(
    s: &Shared,
    writer: &mut Writer,
    topic: &str,
    partition: u32,
    from: Offset,
    have: Vv,
    only: Option<u64>,
    upto: Option<Vv>,
) -> Result<(), String> {
    let have = Arc::new(have);
    let mut started: std::collections::HashSet<u64> = Default::default();
    let mut from = from;
    if from == Offset(0) {
        let st = s.storage.clone();
        let (t, h) = (topic.to_string(), have.clone());
        let start =
            tokio::task::spawn_blocking(move || st.resume_offset(&t, PartitionId(partition), &h))
                .await
                .map_err(|e| e.to_string())?;
        match start {
            Ok(o) => from = o,
            Err(e) => {
                tracing::debug!(topic, partition, error = %e, "cannot find where to push from");
                return Ok(());
            }
        }
    }
    loop {
        let st = s.storage.clone();
        let t = topic.to_string();
        let h = have.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            st.scan_missing(
                &t,
                PartitionId(partition),
                from,
                &h,
                only,
                BATCH_RECORDS,
                BATCH_BYTES,
            )
        })
        .await
        .map_err(|e| e.to_string())?;
        let (mut records, next) = match scanned {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(topic, partition, error = %e, "cannot read for a push");
                return Ok(());
            }
        };
        if let Some(upto) = &upto {
            records.retain(|r| r.id.seq.0 <= crate::replication::core::vv_get(upto, r.id.origin.0));
        }
        for r in &records {
            let o = r.id.origin.0;
            if started.insert(o)
                && r.id.seq.0 > crate::replication::core::vv_get(&have, o).saturating_add(1)
            {
                // The seqs before this one are gone from this log (retention): without this
                // the peer would wait for them forever (I3).
                writer
                    .feed(Frame::Trimmed {
                        topic: topic.to_string(),
                        partition,
                        origin: o,
                        below: r.id.seq.0,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        if !records.is_empty() {
            METRICS
                .replication_records_sent
                .inc_by(records.len() as u64);
            METRICS
                .replication_records_pushed
                .inc_by(records.len() as u64);
            let records = records.into_iter().map(WireRecord::from).collect();
            writer
                .send(Frame::Append {
                    topic: topic.to_string(),
                    partition,
                    records,
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        match next {
            Some(n) => from = n,
            None => return Ok(()),
        }
    }
}
