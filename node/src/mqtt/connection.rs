//! One MQTT connection: CONNECT and session set-up, then a loop that reads packets, sends
//! acks once storage says the records are durable, and delivers subscribed records through
//! the session's [`Outbox`]. Ends with the will message on an unclean close and with the
//! persistent session saved.
//!
//! Invariant: a PUBACK (QoS 1) or PUBREC (QoS 2) is sent only after the storage writer
//! reported the record durable; acks go out in the order the PUBLISHes arrived
//! (MQTT-4.6.0-2) because pending writes complete in queue order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::broker::Broker;
use super::codec::{CodecError, ServerCodec};
use super::outbox::{Outbox, PartKey, qos_from};
use super::topic::{matches, valid_filter, valid_topic_name};
use crate::metrics::METRICS;
use crate::storage::{
    Committed, InboundEntry, Op, OpOutcome, PendingWrite, ReadBatch, SessionState, StorageError,
};
use crate::types::{Offset, PartitionId, now_ms};

/// How often a persistent session's cursors are saved while it is connected.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// How long a shutting-down connection waits for its pending acks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Records read per catch-up read.
const CATCH_UP_BATCH: usize = 512;
/// A client that does not read its socket for this long is disconnected (a stalled reader
/// must not hold its task, the session lock or the node's shutdown).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves to the acks to send, in order, once their writes are durable.
type AckFuture = Pin<Box<dyn Future<Output = Result<Vec<Packet>, StorageError>> + Send>>;

/// Most packets taken from one read before their writes are queued together.
const READ_BATCH: usize = 256;

/// Why the main loop ended.
enum End {
    /// DISCONNECT received: no will.
    Clean,
    /// The node is shutting down: no will.
    Shutdown,
    /// Anything else: network error, protocol error, keepalive expiry, takeover. Publishes
    /// the will.
    Unclean(String),
}

struct Conn {
    broker: Arc<Broker>,
    framed: Framed<TcpStream, ServerCodec>,
    peer: SocketAddr,
    client_id: String,
    username: Option<String>,
    persistent: bool,
    outbox: Outbox,
    /// Inbound QoS 1/2 packet ids already stored (persistent sessions and QoS 2).
    inbound: HashMap<u16, InboundEntry>,
    pending_acks: FuturesOrdered<AckFuture>,
    /// Acks waiting in `pending_acks` (bounded by `max_pending_acks`).
    unacked: usize,
    /// Storage operations of the publishes read so far in this read batch, queued as one
    /// write request (one writer request, one wake-up for all their acks).
    batch_ops: Vec<Op>,
    batch_acks: Vec<Packet>,
    batch_started: Option<Instant>,
    catch_up: Option<(
        PartKey,
        tokio::task::JoinHandle<Result<ReadBatch, StorageError>>,
    )>,
    /// The live feed of committed records, held only while the session has subscriptions:
    /// a publish-only device is never woken by other devices' commits.
    live: Option<broadcast::Receiver<crate::storage::CommittedBatch>>,
    /// Relayed publishes of partitions other nodes hold (joined with `live`).
    remote: Option<broadcast::Receiver<crate::replication::RemoteBatch>>,
    /// The subscriptions last sent to the other nodes (`_sessions`).
    replicated_subs: Option<Vec<(String, u8)>>,
}

/// Runs one connection to its end.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) {
    let codec = ServerCodec::new(broker.settings.max_packet_size);
    let mut framed = Framed::new(stream, codec);
    let timeout = Duration::from_secs(broker.settings.connect_timeout_secs.max(1));
    let connect = tokio::select! {
        _ = shutdown.cancelled() => return,
        first = tokio::time::timeout(timeout, framed.next()) => match first {
            Ok(Some(Ok(Packet::Connect(c)))) => c,
            Ok(Some(Ok(other))) => {
                protocol_error(peer, &format!("first packet was {} and not CONNECT", kind(&other)));
                return;
            }
            Ok(Some(Err(CodecError::Mqtt(mqttbytes::Error::InvalidProtocolLevel(level))))) => {
                tracing::info!(%peer, level, "refusing unsupported MQTT protocol level");
                refuse(&mut framed, ConnectReturnCode::RefusedProtocolVersion).await;
                return;
            }
            Ok(Some(Err(e))) => {
                protocol_error(peer, &format!("bad CONNECT: {e}"));
                return;
            }
            Ok(None) => return,
            Err(_) => {
                tracing::info!(%peer, "no CONNECT within {timeout:?}; closing");
                return;
            }
        },
    };
    if connect.protocol != Protocol::V4 {
        tracing::info!(%peer, "refusing MQTT 5 client; this server speaks MQTT 3.1.1");
        refuse(&mut framed, ConnectReturnCode::RefusedProtocolVersion).await;
        return;
    }
    if let Err(code) = broker.authenticate(connect.login.as_ref()) {
        tracing::info!(%peer, client_id = %connect.client_id, ?code, "refusing login");
        refuse(&mut framed, code).await;
        return;
    }
    let Connect {
        keep_alive,
        client_id,
        clean_session,
        last_will,
        login,
        ..
    } = connect;
    let client_id = if client_id.is_empty() {
        if !clean_session {
            // MQTT-3.1.3-8: a zero-length id needs clean session.
            refuse(&mut framed, ConnectReturnCode::BadClientId).await;
            return;
        }
        format!("auto-{:016x}", rand::random::<u64>())
    } else {
        client_id
    };
    let Some(guard) = broker.take_over(&client_id).await else {
        tracing::debug!(%peer, %client_id, "superseded by a newer connection before start");
        return;
    };
    let mut conn = Conn {
        broker: broker.clone(),
        framed,
        peer,
        client_id: client_id.clone(),
        username: login.map(|l| l.username),
        persistent: !clean_session,
        outbox: Outbox::new(broker.settings.max_inflight as usize),
        inbound: HashMap::new(),
        pending_acks: FuturesOrdered::new(),
        unacked: 0,
        batch_ops: Vec::new(),
        batch_acks: Vec::new(),
        batch_started: None,
        catch_up: None,
        live: None,
        remote: None,
        replicated_subs: None,
    };
    let session_present = match conn.load_session().await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(%peer, %client_id, error = %e, "cannot load session");
            refuse(&mut conn.framed, ConnectReturnCode::ServiceUnavailable).await;
            broker.release(&client_id, guard);
            return;
        }
    };
    if conn
        .framed
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )))
        .await
        .is_err()
    {
        broker.release(&client_id, guard);
        return;
    }
    tracing::debug!(%peer, %client_id, clean_session, session_present, "client connected");
    let end = conn.main_loop(keep_alive, &shutdown, &guard.kicked).await;
    if let End::Unclean(reason) = &end {
        tracing::debug!(%peer, %client_id, %reason, "connection ended uncleanly");
    }
    conn.finish(&end, last_will.as_ref()).await;
    broker.release(&client_id, guard);
}

fn kind(p: &Packet) -> &'static str {
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

fn protocol_error(peer: SocketAddr, what: &str) {
    METRICS.mqtt_protocol_errors.inc();
    tracing::info!(%peer, error = what, "closing mqtt connection");
}

async fn refuse(framed: &mut Framed<TcpStream, ServerCodec>, code: ConnectReturnCode) {
    let _ = framed
        .send(Packet::ConnAck(ConnAck::new(code, false)))
        .await;
}

fn publish_hash(p: &Publish) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(p.topic.as_bytes());
    h.update(&[0]);
    h.update(&p.payload);
    h.digest()
}

fn ready(p: Packet) -> AckFuture {
    Box::pin(async move { Ok(vec![p]) })
}

/// The acks of a batch, sent once its writes are durable locally and the topic's acks policy
/// is met by the replicas (PROTOCOL.md I4).
fn after(
    write: PendingWrite,
    topics: Vec<Option<Arc<str>>>,
    replication: crate::replication::Replication,
    acks: Vec<Packet>,
    started: Instant,
) -> AckFuture {
    Box::pin(async move {
        let outcomes = write.await?;
        let writes: Vec<_> = topics
            .into_iter()
            .zip(outcomes)
            .filter_map(|(t, o)| match (t, o) {
                (Some(t), OpOutcome::Appended { partition, id, .. }) => Some((t, partition, id)),
                _ => None,
            })
            .collect();
        replication.wait(&writes).await?;
        let secs = started.elapsed().as_secs_f64();
        for _ in 0..acks.len() {
            METRICS.mqtt_ack_seconds.observe(secs);
        }
        Ok(acks)
    })
}

impl Conn {
    /// Applies clean-session rules; returns "session present".
    async fn load_session(&mut self) -> Result<bool, StorageError> {
        let storage = self.broker.storage.clone();
        let id = self.client_id.clone();
        let (stored, inbound) = tokio::task::spawn_blocking(move || {
            Ok::<_, StorageError>((storage.session(&id)?, storage.inbound(&id)?))
        })
        .await
        .map_err(|e| StorageError::Db(e.to_string()))??;
        if !self.persistent {
            if stored.is_some() || !inbound.is_empty() {
                self.broker
                    .storage
                    .write(vec![
                        super::cluster::session_op(&self.client_id, None),
                        Op::DeleteSession {
                            client_id: self.client_id.clone(),
                        },
                    ])
                    .await?;
            }
            return Ok(false);
        }
        self.inbound = inbound.into_iter().collect();
        match stored {
            Some(s) => {
                let subs = s
                    .subscriptions
                    .into_iter()
                    .map(|(f, q)| (f, qos_from(q)))
                    .collect();
                self.outbox.restore(subs, s.cursors);
                if self.outbox.has_subscriptions() {
                    self.live = Some(self.broker.storage.subscribe_committed());
                    self.remote = Some(self.broker.remote.subscribe());
                }
                Ok(true)
            }
            None => {
                self.persist().await?;
                Ok(false)
            }
        }
    }

    fn session_state(&self) -> SessionState {
        SessionState {
            subscriptions: self
                .outbox
                .subscriptions()
                .iter()
                .map(|(f, q)| (f.clone(), *q as u8))
                .collect(),
            cursors: self.outbox.acked_cursors(),
            updated_ms: now_ms(),
        }
    }

    async fn persist(&mut self) -> Result<(), StorageError> {
        self.outbox.take_dirty();
        let state = self.session_state();
        let mut ops = Vec::with_capacity(2);
        // Other nodes learn the subscriptions when they change (cursors are per node).
        if self.replicated_subs.as_ref() != Some(&state.subscriptions) {
            ops.push(super::cluster::session_op(
                &self.client_id,
                Some(state.subscriptions.clone()),
            ));
        }
        let subs = state.subscriptions.clone();
        ops.push(Op::PutSession {
            client_id: self.client_id.clone(),
            state,
        });
        self.broker.storage.write(ops).await?;
        self.replicated_subs = Some(subs);
        Ok(())
    }

    async fn main_loop(
        &mut self,
        keep_alive: u16,
        shutdown: &CancellationToken,
        kicked: &CancellationToken,
    ) -> End {
        let ka = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let far = Duration::from_secs(86_400 * 365);
        let idle = tokio::time::sleep(ka.unwrap_or(far));
        tokio::pin!(idle);
        let mut persist_tick = tokio::time::interval(PERSIST_EVERY);
        persist_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_pending = self.broker.settings.max_pending_acks;
        let mut out = Vec::new();
        loop {
            let pumped = tokio::select! {
                r = tokio::time::timeout(WRITE_TIMEOUT, self.pump(&mut out)) => r,
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = kicked.cancelled() => {
                    return End::Unclean("another connection took over this client id".into());
                }
            };
            match pumped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return End::Unclean(e),
                Err(_) => {
                    return End::Unclean("the client stopped reading (write timed out)".into());
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = kicked.cancelled() => {
                    return End::Unclean("another connection took over this client id".into());
                }
                _ = &mut idle => {
                    return End::Unclean(format!("keepalive expired ({keep_alive}s x 1.5)"));
                }
                pkt = self.framed.next(), if self.unacked < max_pending => {
                    idle.as_mut().reset(tokio::time::Instant::now() + ka.unwrap_or(far));
                    // Take every packet already buffered (up to READ_BATCH) so their writes
                    // share one request.
                    let mut next = Some(pkt);
                    let mut taken = 0;
                    let mut end = None;
                    while let Some(pkt) = next.take() {
                        match pkt {
                            None => end = Some(End::Unclean("connection closed by client".into())),
                            Some(Err(e)) => {
                                protocol_error(self.peer, &e.to_string());
                                end = Some(End::Unclean(e.to_string()));
                            }
                            Some(Ok(Packet::Disconnect)) => end = Some(End::Clean),
                            Some(Ok(p)) => {
                                if let Err(e) = self.on_packet(p).await {
                                    protocol_error(self.peer, &e);
                                    end = Some(End::Unclean(e));
                                }
                            }
                        }
                        taken += 1;
                        if end.is_some() || taken >= READ_BATCH || self.unacked + self.batch_acks.len() >= max_pending {
                            break;
                        }
                        next = self.framed.next().now_or_never();
                    }
                    // Publishes read before an error or DISCONNECT are still stored.
                    if let Err(e) = self.flush().await {
                        return End::Unclean(e);
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                Some(done) = self.pending_acks.next() => match done {
                    Ok(acks) => {
                        self.unacked -= acks.len();
                        // Acks free room: the socket is read again, so restart the keepalive
                        // clock (time spent held back by our own backpressure is not idle).
                        idle.as_mut().reset(tokio::time::Instant::now() + ka.unwrap_or(far));
                        for p in acks {
                            if let Err(e) = self.feed(p).await {
                                return End::Unclean(e);
                            }
                        }
                    }
                    Err(e) => {
                        // Never ack what is not durable: drop the connection; the client
                        // resends unacknowledged publishes when it reconnects.
                        tracing::error!(client_id = %self.client_id, error = %e, "write failed; closing without ack");
                        return End::Unclean(format!("storage error: {e}"));
                    }
                },
                batch = async {
                    match &mut self.live {
                        Some(l) => l.recv().await,
                        None => std::future::pending().await,
                    }
                }, if self.live.is_some() => match batch {
                    Ok(batch) => {
                        if self.outbox.has_subscriptions() {
                            for c in batch.iter() {
                                self.outbox.offer(c.clone());
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(client_id = %self.client_id, skipped = n, "live feed lagged; reading from the log");
                        self.outbox.lagged();
                    }
                    Err(broadcast::error::RecvError::Closed) => return End::Shutdown,
                },
                batch = async {
                    match &mut self.remote {
                        Some(l) => l.recv().await,
                        None => std::future::pending().await,
                    }
                }, if self.remote.is_some() => match batch {
                    Ok(batch) => {
                        for r in batch.iter() {
                            self.outbox.offer_remote(&r.subject, r.payload.clone(), r.mqtt_qos());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(client_id = %self.client_id, skipped = n, "relayed feed lagged; those publishes are not delivered here");
                    }
                    Err(broadcast::error::RecvError::Closed) => self.remote = None,
                },
                read = async {
                    match &mut self.catch_up {
                        Some((_, h)) => h.await,
                        None => std::future::pending().await,
                    }
                }, if self.catch_up.is_some() => {
                    let Some((key, _)) = self.catch_up.take() else { continue };
                    match read {
                        Ok(Ok(batch)) => self.on_catch_up(key, batch),
                        Ok(Err(StorageError::UnknownTopic(_))) => {
                            self.outbox.catch_up_read(key, 0, Vec::new(), true);
                        }
                        Ok(Err(e)) => return End::Unclean(format!("log read failed: {e}")),
                        Err(e) => return End::Unclean(format!("log read task failed: {e}")),
                    }
                }
                _ = persist_tick.tick(), if self.persistent => {
                    if self.outbox.take_dirty() {
                        let state = self.session_state();
                        // Not awaited: the writer commits it with the next group.
                        match self.broker.storage.enqueue(vec![Op::PutSession {
                            client_id: self.client_id.clone(),
                            state,
                        }]).await {
                            Ok(_) => {}
                            Err(e) => return End::Unclean(e.to_string()),
                        }
                    }
                }
            }
        }
    }

    /// Sends what the outbox has, starts a catch-up read if one is due, and flushes.
    async fn pump(&mut self, out: &mut Vec<Packet>) -> Result<(), String> {
        self.outbox.poll_send(out);
        for p in out.drain(..) {
            METRICS.mqtt_publish_sent.inc();
            self.framed.feed(p).await.map_err(|e| e.to_string())?;
        }
        if self.catch_up.is_none()
            && let Some((key, from)) = self.outbox.next_catch_up()
        {
            let storage = self.broker.storage.clone();
            let k = key.clone();
            let h = tokio::task::spawn_blocking(move || {
                storage.read(
                    &k.0,
                    PartitionId(k.1),
                    Offset(from),
                    CATCH_UP_BATCH,
                    4 << 20,
                )
            });
            self.catch_up = Some((key, h));
        }
        self.framed.flush().await.map_err(|e| e.to_string())
    }

    fn on_catch_up(&mut self, key: PartKey, batch: ReadBatch) {
        let at_end = batch
            .records
            .last()
            .is_none_or(|(off, _)| off.0 + 1 >= batch.next_offset.0);
        let records = batch
            .records
            .into_iter()
            .map(|(offset, record)| Committed {
                topic: key.0.clone(),
                partition: PartitionId(key.1),
                offset,
                record: Arc::new(record),
            })
            .collect();
        self.outbox
            .catch_up_read(key, batch.log_start.0, records, at_end);
    }

    /// Buffers one packet for the client, giving up on a client that does not read.
    async fn feed(&mut self, p: Packet) -> Result<(), String> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.framed.feed(p)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the client stopped reading (write timed out)".into()),
        }
    }

    /// Queues the read batch's operations as one write request; its acks follow once it is
    /// durable.
    async fn flush(&mut self) -> Result<(), String> {
        if self.batch_ops.is_empty() {
            return Ok(());
        }
        let ops = std::mem::take(&mut self.batch_ops);
        let acks = std::mem::take(&mut self.batch_acks);
        let started = self.batch_started.take().unwrap_or_else(Instant::now);
        let topics: Vec<Option<Arc<str>>> = ops
            .iter()
            .map(|op| match op {
                Op::Append { topic, .. } | Op::AppendOnce { topic, .. } => Some(topic.clone()),
                _ => None,
            })
            .collect();
        // Waits while the writer's queue is full: this is where backpressure reaches the
        // client (its acks slow down, then its socket stops being read).
        let write = self
            .broker
            .storage
            .enqueue(ops)
            .await
            .map_err(|e| e.to_string())?;
        if !acks.is_empty() {
            let n = acks.len();
            let repl = self.broker.replication.clone();
            self.push_acks(after(write, topics, repl, acks, started), n);
        }
        Ok(())
    }

    fn push_acks(&mut self, f: AckFuture, n: usize) {
        self.unacked += n;
        self.pending_acks.push_back(f);
    }

    async fn on_packet(&mut self, p: Packet) -> Result<(), String> {
        if !matches!(p, Packet::Publish(_)) {
            // Keep acks in packet order: what was read before goes first.
            self.flush().await?;
        }
        match p {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck(a) => {
                self.outbox.on_puback(a.pkid);
                Ok(())
            }
            Packet::PubRec(r) => {
                if let Some(rel) = self.outbox.on_pubrec(r.pkid) {
                    self.feed(rel).await?;
                }
                Ok(())
            }
            Packet::PubComp(c) => {
                self.outbox.on_pubcomp(c.pkid);
                Ok(())
            }
            Packet::PubRel(r) => {
                let pkid = r.pkid;
                let comp = Packet::PubComp(PubComp::new(pkid));
                if self.inbound.remove(&pkid).is_some() && self.persistent {
                    let w = self
                        .broker
                        .storage
                        .enqueue(vec![Op::RemoveInbound {
                            client_id: self.client_id.clone(),
                            pkid,
                        }])
                        .await
                        .map_err(|e| e.to_string())?;
                    let repl = self.broker.replication.clone();
                    self.push_acks(after(w, vec![None], repl, vec![comp], Instant::now()), 1);
                } else {
                    self.push_acks(ready(comp), 1);
                }
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::PingReq => self.feed(Packet::PingResp).await,
            Packet::Connect(_) => Err("second CONNECT on one connection".into()),
            other => Err(format!("{} is not sent by clients", kind(&other))),
        }
    }

    async fn on_publish(&mut self, p: Publish) -> Result<(), String> {
        METRICS.mqtt_publish_received.inc();
        if !valid_topic_name(&p.topic) {
            return Err(format!("invalid PUBLISH topic {:?}", p.topic));
        }
        let pkid = p.pkid;
        let hash = publish_hash(&p);
        match p.qos {
            QoS::ExactlyOnce => {
                if let Some(e) = self.inbound.get(&pkid)
                    && e.awaiting_release
                {
                    // Retransmission before PUBREL: already stored (or queued ahead). Its
                    // PUBREC still waits for the acks policy (an earlier wait may have
                    // timed out): everything stored in its partition must be replicated.
                    self.flush().await?;
                    let (topic, key) = self.broker.routes.resolve(&p.topic, &self.client_id);
                    let partitions = self
                        .broker
                        .storage
                        .topic(&topic)
                        .map_or(1, |t| t.partitions);
                    let partition = crate::route::partition_for(&key, partitions);
                    let repl = self.broker.replication.clone();
                    let rec = Packet::PubRec(PubRec::new(pkid));
                    self.push_acks(
                        Box::pin(async move {
                            repl.wait_partition(&topic, partition).await?;
                            Ok(vec![rec])
                        }),
                        1,
                    );
                    return Ok(());
                }
            }
            // QoS 1 is at least once: a DUP resend is stored again. Deduplicating it on
            // (packet id, content) would be unsafe: a client reuses a packet id once it got
            // the PUBACK, so a later identical message that failed to commit would match the
            // earlier one's entry and be acked without being stored. Devices that need
            // exactly once use QoS 2, whose state ends with PUBREL.
            QoS::AtLeastOnce | QoS::AtMostOnce => {}
        }
        let mut ops =
            self.broker
                .publish_ops(&p.topic, p.payload, p.qos, p.retain, &self.client_id);
        if p.qos == QoS::ExactlyOnce {
            let entry = InboundEntry {
                hash,
                awaiting_release: p.qos == QoS::ExactlyOnce,
            };
            self.inbound.insert(pkid, entry);
            if self.persistent {
                ops.push(Op::PutInbound {
                    client_id: self.client_id.clone(),
                    pkid,
                    entry,
                });
            }
        }
        self.batch_started.get_or_insert_with(Instant::now);
        self.batch_ops.append(&mut ops);
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.batch_acks.push(Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => self.batch_acks.push(Packet::PubRec(PubRec::new(pkid))),
        }
        Ok(())
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), String> {
        // Join the live feed before reading the log ends, so nothing committed in between
        // is missed (anything older than the ends is skipped by the cursors).
        if self.live.is_none() {
            self.live = Some(self.broker.storage.subscribe_committed());
            self.remote = Some(self.broker.remote.subscribe());
        }
        let storage = self.broker.storage.clone();
        // Current log ends: a new subscription starts at "now".
        let ends = tokio::task::spawn_blocking(move || {
            let mut ends = Vec::new();
            for t in storage.topics() {
                let name: Arc<str> = Arc::from(t.name.as_str());
                for p in 0..t.partitions {
                    let meta = storage.partition_meta(&t.name, PartitionId(p))?;
                    ends.push(((name.clone(), p), meta.next_offset));
                }
            }
            Ok::<_, StorageError>(ends)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut granted = Vec::new();
        for f in s.filters {
            if !valid_filter(&f.path) {
                tracing::info!(client_id = %self.client_id, filter = %f.path, "invalid subscription filter");
                codes.push(SubscribeReasonCode::Failure);
            } else if !self.outbox.can_subscribe(&f.path) {
                tracing::info!(client_id = %self.client_id, filter = %f.path, "too many subscriptions");
                codes.push(SubscribeReasonCode::Failure);
            } else if !self
                .broker
                .may_subscribe(self.username.as_deref(), &self.client_id, &f.path)
            {
                tracing::info!(client_id = %self.client_id, filter = %f.path, "subscription refused by ACL");
                codes.push(SubscribeReasonCode::Failure);
            } else {
                self.outbox.subscribe(f.path.clone(), f.qos, &ends);
                codes.push(SubscribeReasonCode::Success(f.qos));
                granted.push((f.path, f.qos));
            }
        }
        if self.persistent && !granted.is_empty() {
            self.persist().await.map_err(|e| e.to_string())?;
        }
        self.feed(Packet::SubAck(SubAck::new(s.pkid, codes)))
            .await?;
        if !granted.is_empty() {
            let storage = self.broker.storage.clone();
            let retained = tokio::task::spawn_blocking(move || storage.retained())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            for m in &retained {
                if let Some(q) = granted
                    .iter()
                    .filter(|(f, _)| matches(f, &m.topic))
                    .map(|(_, q)| *q)
                    .max_by_key(|q| *q as u8)
                {
                    self.outbox.offer_retained(m, q);
                }
            }
        }
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), String> {
        for t in &u.topics {
            self.outbox.unsubscribe(t);
        }
        if !self.outbox.has_subscriptions() {
            self.live = None;
            self.remote = None;
        }
        if self.persistent {
            self.persist().await.map_err(|e| e.to_string())?;
        }
        self.feed(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
    }

    /// Flushes pending acks (when the connection is still usable), publishes the will on an
    /// unclean end, and saves a persistent session.
    async fn finish(&mut self, end: &End, will: Option<&LastWill>) {
        if matches!(end, End::Shutdown | End::Clean) {
            let drain = async {
                'drain: while let Some(done) = self.pending_acks.next().await {
                    let Ok(acks) = done else { break };
                    for p in acks {
                        if self.framed.feed(p).await.is_err() {
                            break 'drain;
                        }
                    }
                }
                let _ = self.framed.flush().await;
            };
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        }
        if let (End::Unclean(_), Some(will)) = (end, will) {
            self.broker.publish_will(will, &self.client_id).await;
        }
        if self.persistent
            && let Err(e) = self.persist().await
        {
            tracing::warn!(client_id = %self.client_id, error = %e, "session not saved");
        }
    }
}
