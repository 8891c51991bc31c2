//! Replication between peers (PROTOCOL.md): the versioned wire format ([`wire`]), the
//! sans-IO decisions ([`core`]), and their drivers: [`peer`] (TCP connections) and this
//! module's [`Replication`] handle, which the MQTT server and the HTTP ingest call to wait
//! for their acks policy, and which runs anti-entropy and handoff.
//!
//! Tasks, all owned by the node's `TaskTracker` and stopped by its shutdown token:
//! - the peer listener and one task per inbound connection;
//! - a supervisor that keeps one outbound connection task per live peer;
//! - the anti-entropy loop (every `anti_entropy_interval` and on every membership change).

pub mod core;
pub mod peer;
#[cfg(test)]
mod sim;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::core::AckTracker;
use crate::cluster::View;
use crate::storage::{Op, Record, Storage, StorageError};
use crate::types::{PartitionId, RecordId};

pub use self::core::Vv;

/// Relayed records of partitions this node does not replicate, for live MQTT subscribers.
pub type RemoteBatch = Arc<Vec<Arc<Record>>>;

/// Work for the outbound connection to one peer.
#[derive(Debug)]
pub enum Control {
    /// Send this node's digest of a partition.
    Digest { topic: String, partition: u32 },
    /// Send the peer what it lacks of a partition relative to `have` (optionally one
    /// origin only: a gap report).
    Push {
        topic: String,
        partition: u32,
        have: Vv,
        only: Option<u64>,
        /// Push nothing beyond this (what this node held when it compared): later records
        /// are on their way in the live stream, and re-sending them would only add load.
        upto: Option<Vv>,
    },
}

/// Work items queued per outbound connection before new ones are dropped (anti-entropy
/// repeats them).
const CONTROL_QUEUE: usize = 1 << 16;

pub(crate) struct Shared {
    pub storage: Storage,
    pub me: String,
    pub origin: u64,
    pub cluster_id: String,
    pub view: watch::Receiver<Arc<View>>,
    acks: Mutex<AckTracker<oneshot::Sender<()>>>,
    ack_timeout: Duration,
    /// Outbound connection tasks by peer node id.
    peers: Mutex<HashMap<String, mpsc::Sender<Control>>>,
    /// What each peer last said it holds, by (node, topic, partition).
    peer_vvs: Mutex<HashMap<(String, String, u32), Vv>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Local IP outbound peer connections bind to (the peer listener's, when specified).
    pub bind_ip: Option<std::net::IpAddr>,
    /// Where relayed live records go (the MQTT broker's subscribers).
    pub remote: tokio::sync::broadcast::Sender<RemoteBatch>,
}

/// Handle to the replication drivers; cheap to clone.
#[derive(Clone)]
pub struct Replication {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("me", &self.shared.me)
            .finish()
    }
}

pub use self::core::{digest, lacks};

impl Replication {
    /// Binds nothing; `start` runs the tasks on the peer listener given.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        storage: Storage,
        me: String,
        cluster_id: String,
        view: watch::Receiver<Arc<View>>,
        listener: TcpListener,
        ack_timeout: Duration,
        anti_entropy: Duration,
        remote: tokio::sync::broadcast::Sender<RemoteBatch>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Replication {
        let bind_ip = listener
            .local_addr()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        let shared = Arc::new(Shared {
            bind_ip,
            remote,
            origin: storage.origin().0,
            storage,
            me,
            cluster_id,
            view,
            acks: Mutex::new(AckTracker::new()),
            ack_timeout,
            peers: Mutex::new(HashMap::new()),
            peer_vvs: Mutex::new(HashMap::new()),
            shutdown,
            tracker,
        });
        let s = shared.clone();
        shared.tracker.spawn(peer::listen(s, listener));
        let s = shared.clone();
        shared.tracker.spawn(supervise(s, anti_entropy));
        Replication { shared }
    }

    /// Waits until the acks policy of every given write is met by durable copies (I4), or
    /// fails after the ack timeout. The writes are already committed on this node.
    pub async fn wait(
        &self,
        writes: &[(Arc<str>, PartitionId, RecordId)],
    ) -> Result<(), StorageError> {
        let s = &self.shared;
        let view = s.view.borrow().clone();
        // Per stream, only the highest seq matters: copies are contiguous prefixes.
        let mut top: BTreeMap<(Arc<str>, u32, u64), u64> = BTreeMap::new();
        for (t, p, id) in writes {
            if !s.storage.is_own(id.origin.0) {
                continue;
            }
            let e = top.entry((t.clone(), p.0, id.origin.0)).or_insert(0);
            *e = (*e).max(id.seq.0);
        }
        let mut pending = Vec::new();
        {
            let mut acks = lock(&s.acks);
            for ((t, p, origin), seq) in top {
                let Some(cfg) = s.storage.topic(&t) else {
                    continue;
                };
                let replicas = view.replicas(&t, p, cfg.replication_factor);
                let needed = view.required(cfg.acks, cfg.replication_factor);
                let key = (t.to_string(), p, origin);
                acks.on_durable(&key, &s.me, seq);
                let (tx, rx) = oneshot::channel();
                if acks.wait(key, seq, needed, replicas.clone(), tx).is_none() {
                    pending.push((rx, t, p, needed, replicas));
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + s.ack_timeout;
        for (rx, t, p, needed, replicas) in pending {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(())) => {}
                _ => {
                    crate::metrics::METRICS.replication_ack_timeouts.inc();
                    return Err(StorageError::NotReplicated(format!(
                        "topic {t:?} partition {p} needs {needed} durable copies among {replicas:?} \
                         and did not get them within {:?}; the record is stored and will be \
                         replicated, but this write was not acknowledged",
                        s.ack_timeout
                    )));
                }
            }
        }
        Ok(())
    }

    /// Waits until everything this node wrote to a partition so far meets the acks policy:
    /// for retransmissions and retried loads whose records are already stored (a QoS 2
    /// DUP, an idempotent `producer`/`sequence` seen before), so their ack still means I4.
    pub async fn wait_partition(
        &self,
        topic: &Arc<str>,
        p: PartitionId,
    ) -> Result<(), StorageError> {
        let st = self.shared.storage.clone();
        let t = topic.clone();
        let meta = tokio::task::spawn_blocking(move || st.partition_meta(&t, p))
            .await
            .map_err(|e| StorageError::Failed(e.to_string()))??;
        let writes: Vec<_> = meta
            .version_vector
            .iter()
            .filter(|(o, _)| self.shared.storage.is_own(*o))
            .map(|(o, s)| {
                (
                    topic.clone(),
                    p,
                    RecordId {
                        origin: crate::types::Origin(*o),
                        seq: crate::types::Seq(*s),
                    },
                )
            })
            .collect();
        self.wait(&writes).await
    }

    /// Replicas' version vectors of a partition as last heard by anti-entropy.
    pub fn peer_vv(&self, node: &str, topic: &str, partition: u32) -> Option<Vv> {
        lock(&self.shared.peer_vvs)
            .get(&(node.to_string(), topic.to_string(), partition))
            .cloned()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// A peer said it durably holds `origin` up to `seq` of a partition.
    pub(crate) fn on_ack(&self, node: &str, topic: &str, partition: u32, origin: u64, seq: u64) {
        if !self.storage.is_own(origin) {
            return;
        }
        let key = (topic.to_string(), partition, origin);
        let done = lock(&self.acks).on_durable(&key, node, seq);
        for w in done {
            let _ = w.send(());
        }
    }

    /// A peer's digest of a partition: remember it, and push what it lacks when it is a
    /// replica.
    pub(crate) async fn on_digest(&self, node: &str, topic: String, partition: u32, vv: Vv) {
        // A digest reports durable copies: it acknowledges this node's streams too, so a
        // write whose acks were lost with a connection is still acknowledged (I4).
        for (o, seq) in &vv {
            self.on_ack(node, &topic, partition, *o, *seq);
        }
        lock(&self.peer_vvs).insert((node.to_string(), topic.clone(), partition), vv.clone());
        let Some(cfg) = self.storage.topic(&topic) else {
            return;
        };
        let view = self.view.borrow().clone();
        if !view
            .replicas(&topic, partition, cfg.replication_factor)
            .iter()
            .any(|r| r == node)
        {
            return;
        }
        let st = self.storage.clone();
        let t = topic.clone();
        let mine =
            tokio::task::spawn_blocking(move || st.partition_meta(&t, PartitionId(partition)))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|m| m.version_vector)
                .unwrap_or_default();
        if lacks(&vv, &mine) {
            self.control(
                node,
                Control::Push {
                    topic,
                    partition,
                    have: vv,
                    only: None,
                    upto: Some(mine),
                },
            );
        }
    }

    /// Queues work for the outbound connection to `node` (dropped when its queue is full:
    /// anti-entropy repeats it).
    pub(crate) fn control(&self, node: &str, c: Control) {
        if let Some(tx) = lock(&self.peers).get(node) {
            let _ = tx.try_send(c);
        }
    }
}

/// Keeps one outbound connection per live peer and runs anti-entropy rounds.
async fn supervise(s: Arc<Shared>, every: Duration) {
    let mut view_rx = s.view.clone();
    let mut tasks: HashMap<String, (std::net::SocketAddr, u64, CancellationToken)> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            _ = s.shutdown.cancelled() => break,
            r = view_rx.changed() => {
                if r.is_err() {
                    break;
                }
                true
            }
            _ = tick.tick() => false,
        };
        let view = view_rx.borrow_and_update().clone();
        if changed {
            // Handoff may only trust version vectors reported under the current view: a
            // peer that was a replica before may have handed the partition off since.
            lock(&s.peer_vvs).clear();
            // Connections follow the live members.
            let live: HashMap<&str, (std::net::SocketAddr, u64)> = view
                .members
                .values()
                .filter(|m| m.live && m.node_id != s.me)
                .filter_map(|m| Some((m.node_id.as_str(), (m.peer_addr?, m.generation))))
                .collect();
            tasks.retain(|node, (addr, gen_, stop)| {
                let keep = live.get(node.as_str()) == Some(&(*addr, *gen_));
                if !keep {
                    stop.cancel();
                    lock(&s.peers).remove(node);
                    lock(&s.acks).forget(node);
                    lock(&s.peer_vvs).retain(|k, _| &k.0 != node);
                }
                keep
            });
            for (node, (addr, gen_)) in live {
                if tasks.contains_key(node) {
                    continue;
                }
                let stop = s.shutdown.child_token();
                // Room for a digest and a push of every partition of a large node.
                let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
                lock(&s.peers).insert(node.to_string(), tx);
                tasks.insert(node.to_string(), (addr, gen_, stop.clone()));
                s.tracker
                    .spawn(peer::outbound(s.clone(), node.to_string(), addr, rx, stop));
            }
        }
        lock(&s.acks).sweep(|w| !w.is_closed());
        if let Err(e) = round(&s, &view).await {
            tracing::warn!(error = %e, "anti-entropy round failed");
        }
        crate::metrics::METRICS.anti_entropy_rounds.inc();
    }
    for (_, (_, _, stop)) in tasks {
        stop.cancel();
    }
}

/// Asks for a digest exchange of every partition `peer` replicates (on connect, after a
/// lagged live feed).
pub(crate) fn round_for(s: &Shared, peer: &str) {
    let view = s.view.borrow().clone();
    for t in s.storage.topics() {
        for p in 0..t.partitions {
            if view
                .replicas(&t.name, p, t.replication_factor)
                .iter()
                .any(|r| r == peer)
            {
                s.control(
                    peer,
                    Control::Digest {
                        topic: t.name.clone(),
                        partition: p,
                    },
                );
            }
        }
    }
}

/// One anti-entropy round (PROTOCOL.md I5, I6): every partition this node replicates or
/// holds data of sends its digest to the partition's other replicas; a partition held here
/// but no longer placed here is dropped once every replica's version vector covers it.
async fn round(s: &Arc<Shared>, view: &View) -> Result<(), StorageError> {
    let st = s.storage.clone();
    let metas = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for t in st.topics() {
            for p in 0..t.partitions {
                let m = st.partition_meta(&t.name, PartitionId(p))?;
                out.push((t.clone(), p, m));
            }
        }
        Ok::<_, StorageError>(out)
    })
    .await
    .map_err(|e| StorageError::Failed(e.to_string()))??;
    for (cfg, p, meta) in metas {
        let replicas = view.replicas(&cfg.name, p, cfg.replication_factor);
        let mine = replicas.contains(&s.me);
        let held = meta.next_offset > meta.log_start;
        if !mine && !held {
            continue;
        }
        for r in replicas.iter().filter(|r| **r != s.me) {
            s.control(
                r,
                Control::Digest {
                    topic: cfg.name.clone(),
                    partition: p,
                },
            );
        }
        if !mine && held && !replicas.is_empty() {
            // Handoff: what every current replica is known to hold.
            let covered = {
                let vvs = lock(&s.peer_vvs);
                let theirs: Vec<Option<&Vv>> = replicas
                    .iter()
                    .map(|r| vvs.get(&(r.clone(), cfg.name.clone(), p)))
                    .collect();
                self::core::handoff_covered(&meta.version_vector, &theirs)
            };
            // Only when some origin is covered entirely (origins are dropped whole): no empty,
            // fsynced commits for a hint stream that is still growing.
            let whole = meta
                .version_vector
                .iter()
                .any(|(o, seq)| *seq <= self::core::vv_get(&covered, *o));
            if whole {
                let outcome = s
                    .storage
                    .write(vec![Op::DropCovered {
                        topic: Arc::from(cfg.name.as_str()),
                        partition: PartitionId(p),
                        covered,
                    }])
                    .await?;
                if let Some(crate::storage::OpOutcome::Trimmed(n)) = outcome.first()
                    && *n > 0
                {
                    tracing::info!(topic = %cfg.name, partition = p, records = n, "handed off: dropped records every replica holds");
                    crate::metrics::METRICS
                        .replication_handoff_records
                        .inc_by(*n);
                }
            }
        }
    }
    Ok(())
}

impl From<Record> for wire::WireRecord {
    fn from(r: Record) -> Self {
        wire::WireRecord {
            origin: r.id.origin.0,
            seq: r.id.seq.0,
            event_time_ms: r.event_time_ms,
            ingest_time_ms: r.ingest_time_ms,
            key: r.key,
            subject: r.subject,
            payload: r.payload,
            headers: r.headers,
        }
    }
}

impl From<wire::WireRecord> for Record {
    fn from(r: wire::WireRecord) -> Self {
        Record {
            id: RecordId {
                origin: crate::types::Origin(r.origin),
                seq: crate::types::Seq(r.seq),
            },
            event_time_ms: r.event_time_ms,
            ingest_time_ms: r.ingest_time_ms,
            key: r.key,
            subject: r.subject,
            payload: r.payload,
            headers: r.headers,
        }
    }
}
