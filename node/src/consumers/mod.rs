//! WebAssembly consumers: deploy, run, checkpoint. Every node knows every deployment
//! ([`cluster`] replicates deploys and checkpoints), and a partition is processed by its
//! owner only (rank 0 of its placement); a lone node owns everything.
//!
//! Per deployment one task walks the topic's partitions in order. For each partition it
//! reads the next records from the consumer's checkpoint, hands the ones matching the
//! subject filter to the module in one call, and commits in **one** write request the
//! batch's alerts (to `_alerts`), emitted records, state changes and the new checkpoint.
//! A failing batch is retried with backoff, then split to find the record that fails;
//! that record goes to `_dlq` and the consumer moves on.
//!
//! Invariants: the checkpoint, state and outputs of a batch commit atomically, so after a
//! restart processing resumes exactly after the last committed batch and no alert id is
//! written twice; alert ids are derived from (consumer, topic, partition, record id, index)
//! so a reprocessed record yields the same id.

pub mod cluster;
pub mod runtime;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use sha2::Digest;
use shoal_sdk::abi;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmtime::Module;

pub use runtime::{ConsumerError, Limits, Runtime};

use crate::metrics::{METRICS, consumer_label};
use crate::mqtt::topic::{matches, valid_filter};
use crate::storage::{
    Checkpoint, ConsumerSpec, NewRecord, Op, Record, StartFrom, Storage, StorageError, TopicConfig,
};
use crate::types::{Offset, PartitionId, now_ms, validate_topic_name};

/// Internal topic receiving every alert.
pub const ALERTS_TOPIC: &str = "_alerts";
/// Internal topic receiving records a consumer failed on after all retries.
pub const DLQ_TOPIC: &str = "_dlq";
/// Records per batch.
const BATCH: usize = 500;
/// Tries of one batch before it is split record by record.
const MAX_TRIES: u32 = 3;
/// Most alerts plus emitted records one batch may produce.
const MAX_OUTPUTS: usize = 50_000;

/// Topics the consumer runtime needs; created at start-up.
pub fn internal_topics() -> Vec<TopicConfig> {
    let mut v: Vec<TopicConfig> = [ALERTS_TOPIC, DLQ_TOPIC]
        .iter()
        .map(|name| TopicConfig {
            name: (*name).into(),
            partitions: 1,
            replication_factor: 3,
            acks: crate::storage::Acks::Quorum,
            retention_ms: Some(30 * 86_400_000),
            retention_bytes: None,
            created_ms: now_ms(),
        })
        .collect();
    v.extend(cluster::topics());
    v
}

/// A deploy request (from the API or the CLI).
#[derive(Clone, Debug)]
pub struct DeployRequest {
    pub name: String,
    pub module: Bytes,
    pub topic: String,
    pub filter: String,
    pub config: String,
    pub start: StartFrom,
    pub webhook: Option<String>,
}

/// Why a deploy or remove was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("{0}")]
    BadRequest(String),
    #[error("consumer {0:?} is not deployed")]
    NotFound(String),
    #[error(transparent)]
    Module(#[from] ConsumerError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Counters and position of one partition of one consumer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub owner: String,
    /// Next offset to process.
    pub cursor: u64,
    pub end_offset: u64,
    pub lag: u64,
    pub records_in: u64,
    pub alerts_out: u64,
    pub emitted: u64,
    pub errors: u64,
    pub dead_lettered: u64,
    /// Records deleted by retention before the consumer reached them.
    pub skipped_by_retention: u64,
    pub fuel_used: u64,
    pub busy_ms: u64,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

/// What `GET /v1/consumers/{name}` shows.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub version: u64,
    pub topic: String,
    pub filter: String,
    pub config: serde_json::Value,
    pub module_sha256: String,
    pub start: StartFrom,
    pub webhook: Option<String>,
    pub deployed_ms: u64,
    pub state: String,
    pub partitions: Vec<PartitionStatus>,
}

struct Deployment {
    spec: ConsumerSpec,
    status: Arc<Mutex<Vec<PartitionStatus>>>,
    state: Arc<Mutex<String>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    webhook: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    storage: Storage,
    runtime: Arc<Runtime>,
    limits: Limits,
    deployments: Mutex<HashMap<String, Deployment>>,
    /// Serialises deploys and removes.
    deploy_lock: tokio::sync::Mutex<()>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    node_name: String,
    view: tokio::sync::watch::Receiver<Arc<crate::cluster::View>>,
    replication: crate::replication::Replication,
    /// Checkpoint version vectors other nodes sent for partitions a runner here owns:
    /// (consumer, partition) -> vv, merged by the runner before its next batch.
    merges: Mutex<HashMap<(String, u32), crate::replication::Vv>>,
}

/// The consumer manager; cheap to clone.
#[derive(Clone)]
pub struct Consumers {
    inner: Arc<Inner>,
}

fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The deterministic id of the `index`-th alert raised for a record.
pub fn alert_id(consumer: &str, topic: &str, partition: u32, r: &Record, index: u32) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [consumer.as_bytes(), topic.as_bytes()] {
        h.update(part);
        h.update(&[0]);
    }
    h.update(&partition.to_be_bytes());
    h.update(&r.id.origin.0.to_be_bytes());
    h.update(&r.id.seq.0.to_be_bytes());
    h.update(&index.to_be_bytes());
    format!("{:032x}", h.digest128())
}

/// MQTT topic level made safe from a free-form alert key.
fn topic_safe(key: &str) -> String {
    let s: String = key
        .chars()
        .map(|c| {
            if matches!(c, '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.is_empty() { "_".into() } else { s }
}

impl Consumers {
    /// Loads stored deployments, compiles their modules and starts them.
    pub async fn start(
        storage: Storage,
        limits: Limits,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        node_name: String,
        view: tokio::sync::watch::Receiver<Arc<crate::cluster::View>>,
        replication: crate::replication::Replication,
    ) -> anyhow::Result<Consumers> {
        let fuel = limits.fuel_per_record > 0;
        let runtime = Arc::new(tokio::task::spawn_blocking(move || Runtime::new(fuel)).await??);
        let me = Consumers {
            inner: Arc::new(Inner {
                storage: storage.clone(),
                runtime,
                limits,
                deployments: Mutex::new(HashMap::new()),
                deploy_lock: tokio::sync::Mutex::new(()),
                tracker,
                shutdown,
                node_name,
                view,
                replication,
                merges: Mutex::new(HashMap::new()),
            }),
        };
        let st = storage.clone();
        let specs = tokio::task::spawn_blocking(move || st.consumers()).await??;
        for spec in specs {
            let st = storage.clone();
            let sha = spec.module_sha256.clone();
            let bytes = tokio::task::spawn_blocking(move || st.module(&sha)).await??;
            let Some(bytes) = bytes else {
                tracing::error!(consumer = %spec.name, "module bytes missing; consumer not started");
                continue;
            };
            let rt = me.inner.runtime.clone();
            match tokio::task::spawn_blocking(move || rt.compile(&bytes)).await? {
                Ok(module) => me.launch(spec, module),
                Err(e) => {
                    tracing::error!(consumer = %spec.name, error = %e, "stored module no longer compiles")
                }
            }
        }
        me.inner.tracker.spawn(cluster::sync(me.clone()));
        Ok(me)
    }

    /// The running deployment's spec of `name`.
    fn spec(&self, name: &str) -> Option<ConsumerSpec> {
        self.inner
            .deployments
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|d| d.spec.clone()))
    }

    /// Whether this node's runner of `name` currently owns `partition`.
    fn owns(&self, name: &str, partition: u32) -> bool {
        let Some(topic) = self.spec(name).map(|s| s.topic) else {
            return false;
        };
        let Some(cfg) = self.inner.storage.topic(&topic) else {
            return false;
        };
        let view = self.inner.view.borrow().clone();
        view.replicas(&topic, partition, cfg.replication_factor)
            .first()
            .is_some_and(|o| *o == view.me)
    }

    /// Another node deployed `spec`: store and run it here unless this node already runs
    /// that deploy or a later one.
    async fn apply_deploy(&self, spec: ConsumerSpec, module: Bytes) -> Result<(), String> {
        let _guard = self.inner.deploy_lock.lock().await;
        let current = self.spec(&spec.name);
        if current.is_some_and(|c| (c.deployed_ms, c.version) >= (spec.deployed_ms, spec.version)) {
            return Ok(());
        }
        if self.inner.storage.topic(&spec.topic).is_none() {
            return Err(format!("topic {:?} is not known here yet", spec.topic));
        }
        let rt = self.inner.runtime.clone();
        let bytes = module.clone();
        let compiled = tokio::task::spawn_blocking(move || rt.compile(&bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.inner
            .storage
            .write(vec![
                Op::PutModule {
                    sha256: spec.module_sha256.clone(),
                    bytes: module,
                },
                Op::PutConsumer(spec.clone()),
            ])
            .await
            .map_err(|e| e.to_string())?;
        self.stop(&spec.name).await;
        tracing::info!(consumer = %spec.name, version = spec.version, "consumer deployed by a peer");
        self.launch(spec, compiled);
        Ok(())
    }

    /// Another node removed `name`.
    async fn apply_remove(&self, name: &str, at_ms: u64) -> Result<(), String> {
        let _guard = self.inner.deploy_lock.lock().await;
        let current = self.spec(name);
        if current.is_none_or(|c| c.deployed_ms > at_ms) {
            return Ok(());
        }
        self.stop(name).await;
        self.inner
            .storage
            .write(vec![Op::DeleteConsumer {
                name: name.to_string(),
            }])
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(consumer = %name, "consumer removed by a peer");
        Ok(())
    }

    /// Validates, stores and (re)starts a consumer. A redeploy under the same name keeps
    /// the checkpoints and state: the new version continues where the old one stopped.
    pub async fn deploy(&self, req: DeployRequest) -> Result<ConsumerStatus, DeployError> {
        validate_topic_name(&req.name, false)
            .map_err(|e| DeployError::BadRequest(format!("consumer name: {e}")))?;
        let topic = self.inner.storage.topic(&req.topic).ok_or_else(|| {
            DeployError::BadRequest(format!(
                "topic {:?} does not exist; create it first (shoal topic create {})",
                req.topic, req.topic
            ))
        })?;
        if !valid_filter(&req.filter) {
            return Err(DeployError::BadRequest(format!(
                "filter {:?} is not a valid MQTT topic filter (use # for everything)",
                req.filter
            )));
        }
        if serde_json::from_str::<serde_json::Value>(&req.config).is_err() {
            return Err(DeployError::BadRequest("config must be JSON".into()));
        }
        if let Some(url) = &req.webhook
            && reqwest::Url::parse(url)
                .map(|u| !matches!(u.scheme(), "http" | "https"))
                .unwrap_or(true)
        {
            return Err(DeployError::BadRequest(format!(
                "webhook {url:?} is not an http(s) URL"
            )));
        }
        // Compile, then prove the module instantiates and accepts its config.
        let rt = self.inner.runtime.clone();
        let (bytes, config) = (req.module.clone(), req.config.clone());
        let (storage, name, limits) = (
            self.inner.storage.clone(),
            req.name.clone(),
            self.inner.limits,
        );
        let module = tokio::task::spawn_blocking(move || {
            let m = rt.compile(&bytes)?;
            rt.instantiate(&m, &config, storage, &name, 0, limits)?;
            Ok::<_, ConsumerError>(m)
        })
        .await
        .map_err(|e| DeployError::BadRequest(e.to_string()))??;

        let _guard = self.inner.deploy_lock.lock().await;
        let previous = self.spec(&req.name);
        let sha = sha256_hex(&req.module);
        let spec = ConsumerSpec {
            name: req.name.clone(),
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            topic: req.topic.clone(),
            filter: req.filter,
            config: req.config,
            module_sha256: sha.clone(),
            start: req.start,
            webhook: req.webhook,
            deployed_ms: now_ms(),
        };
        let mut ops = vec![
            cluster::deploy_op(&spec, &req.module),
            Op::PutModule {
                sha256: sha,
                bytes: req.module,
            },
            Op::PutConsumer(spec.clone()),
        ];
        if previous.is_none() && spec.start == StartFrom::Latest {
            let st = self.inner.storage.clone();
            let t = topic.name.clone();
            let ends = tokio::task::spawn_blocking(move || {
                (0..topic.partitions)
                    .map(|p| {
                        st.partition_meta(&t, PartitionId(p))
                            .map(|m| (p, m.next_offset, m.version_vector))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| DeployError::BadRequest(e.to_string()))??;
            for (p, end, vv) in ends {
                let has = {
                    let st = self.inner.storage.clone();
                    let n = spec.name.clone();
                    tokio::task::spawn_blocking(move || st.checkpoint(&n, p))
                        .await
                        .map_err(|e| DeployError::BadRequest(e.to_string()))??
                        .is_some()
                };
                if !has {
                    // The version vector says "everything up to now" on every node.
                    let checkpoint = Checkpoint {
                        offset: end,
                        version_vector: vv,
                        updated_ms: now_ms(),
                    };
                    ops.push(cluster::checkpoint_op(&spec, p, &checkpoint, &[]));
                    ops.push(Op::ConsumerCommit {
                        name: spec.name.clone(),
                        partition: p,
                        checkpoint,
                        state: Vec::new(),
                    });
                }
            }
        }
        // Stored first: if that fails, the running version keeps running.
        self.inner.storage.write(ops).await?;
        self.stop(&req.name).await;
        tracing::info!(consumer = %spec.name, version = spec.version, topic = %spec.topic, "consumer deployed");
        let name = spec.name.clone();
        self.launch(spec, module);
        self.status(&name)
            .ok_or_else(|| DeployError::NotFound(name.clone()))
    }

    /// Stops and deletes a consumer with its checkpoints and state.
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        let _guard = self.inner.deploy_lock.lock().await;
        if self.stop(name).await.is_none() {
            return Err(DeployError::NotFound(name.to_string()));
        }
        self.inner
            .storage
            .write(vec![
                cluster::remove_op(name),
                Op::DeleteConsumer {
                    name: name.to_string(),
                },
            ])
            .await?;
        tracing::info!(consumer = %name, "consumer removed");
        Ok(())
    }

    /// Stops a running deployment and waits for its task to finish its batch.
    async fn stop(&self, name: &str) -> Option<ConsumerSpec> {
        let d = self.inner.deployments.lock().ok()?.remove(name)?;
        d.cancel.cancel();
        // The runner finishes the batch it is in (its commit is atomic) and exits; the
        // webhook task stops too, so two never write the same delivery cursor.
        let _ = d.task.await;
        if let Some(w) = d.webhook {
            let _ = w.await;
        }
        Some(d.spec)
    }

    fn launch(&self, spec: ConsumerSpec, module: Module) {
        let partitions = self
            .inner
            .storage
            .topic(&spec.topic)
            .map_or(0, |t| t.partitions);
        let status = Arc::new(Mutex::new(
            (0..partitions)
                .map(|p| PartitionStatus {
                    partition: p,
                    owner: self.inner.node_name.clone(),
                    ..Default::default()
                })
                .collect(),
        ));
        let state = Arc::new(Mutex::new("starting".to_string()));
        let cancel = self.inner.shutdown.child_token();
        let runner = Runner {
            inner: self.inner.clone(),
            spec: spec.clone(),
            module,
            status: status.clone(),
            state: state.clone(),
            cancel: cancel.clone(),
            instances: HashMap::new(),
            parts: Vec::new(),
        };
        let webhook = spec.webhook.clone().map(|url| {
            let task = crate::alerts::webhook_task(
                self.inner.storage.clone(),
                spec.name.clone(),
                url,
                cancel.clone(),
            );
            self.inner.tracker.spawn(task)
        });
        let task = self.inner.tracker.spawn(runner.run());
        if let Ok(mut d) = self.inner.deployments.lock() {
            d.insert(
                spec.name.clone(),
                Deployment {
                    spec,
                    status,
                    state,
                    cancel,
                    task,
                    webhook,
                },
            );
        }
    }

    pub fn list(&self) -> Vec<ConsumerStatus> {
        let names: Vec<String> = self
            .inner
            .deployments
            .lock()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        let mut v: Vec<ConsumerStatus> = names.iter().filter_map(|n| self.status(n)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn status(&self, name: &str) -> Option<ConsumerStatus> {
        let d = self.inner.deployments.lock().ok()?;
        let d = d.get(name)?;
        let s = &d.spec;
        Some(ConsumerStatus {
            name: s.name.clone(),
            version: s.version,
            topic: s.topic.clone(),
            filter: s.filter.clone(),
            config: serde_json::from_str(&s.config).unwrap_or(serde_json::Value::Null),
            module_sha256: s.module_sha256.clone(),
            start: s.start,
            webhook: s.webhook.clone(),
            deployed_ms: s.deployed_ms,
            state: d.state.lock().map(|s| s.clone()).unwrap_or_default(),
            partitions: d.status.lock().map(|s| s.clone()).unwrap_or_default(),
        })
    }
}

/// Per-partition progress kept by the runner.
#[derive(Clone, Debug, Default)]
struct PartState {
    checkpoint: Checkpoint,
    tries: u32,
    retry_at: Option<Instant>,
    /// While set, records up to this offset are processed one at a time to find the one
    /// that fails.
    isolate_until: Option<u64>,
    /// This node owned the partition at the last step.
    owned: bool,
}

struct Runner {
    inner: Arc<Inner>,
    spec: ConsumerSpec,
    module: Module,
    status: Arc<Mutex<Vec<PartitionStatus>>>,
    state: Arc<Mutex<String>>,
    cancel: CancellationToken,
    instances: HashMap<u32, runtime::Instance>,
    parts: Vec<PartState>,
}

impl Runner {
    fn set_state(&self, s: &str) {
        if let Ok(mut st) = self.state.lock() {
            *st = s.to_string();
        }
    }

    fn with_status(&self, p: u32, f: impl FnOnce(&mut PartitionStatus)) {
        if let Ok(mut s) = self.status.lock()
            && let Some(ps) = s.get_mut(p as usize)
        {
            f(ps);
        }
    }

    fn publish_lag(&self) {
        if let Ok(s) = self.status.lock() {
            let lag: u64 = s.iter().map(|p| p.lag).sum();
            METRICS
                .consumer_lag
                .get_or_create(&consumer_label(&self.spec.name))
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
    }

    async fn run(mut self) {
        let Some(topic) = self.inner.storage.topic(&self.spec.topic) else {
            self.set_state("failed: topic does not exist");
            return;
        };
        for p in 0..topic.partitions {
            let st = self.inner.storage.clone();
            let name = self.spec.name.clone();
            let cp = tokio::task::spawn_blocking(move || st.checkpoint(&name, p)).await;
            let checkpoint = match cp {
                Ok(Ok(c)) => c.unwrap_or_default(),
                other => {
                    self.set_state(&format!("failed: cannot read checkpoint: {other:?}"));
                    return;
                }
            };
            self.with_status(p, |s| s.cursor = checkpoint.offset);
            self.parts.push(PartState {
                checkpoint,
                ..Default::default()
            });
        }
        self.set_state("running");
        let mut commits = self.inner.storage.watch_commits();
        let mut view = self.inner.view.clone();
        while !self.cancel.is_cancelled() {
            commits.borrow_and_update();
            view.borrow_and_update();
            let mut progressed = false;
            for p in 0..topic.partitions {
                if self.cancel.is_cancelled() {
                    break;
                }
                match self.step(&topic, p).await {
                    Ok(moved) => progressed |= moved,
                    Err(e) => {
                        // Storage failed (shutting down or I/O): stop this runner.
                        self.set_state(&format!("stopped: {e}"));
                        return;
                    }
                }
            }
            if progressed {
                continue;
            }
            let retry = self.parts.iter().filter_map(|p| p.retry_at).min();
            let wait = retry.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = commits.changed() => {}
                _ = view.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.set_state("stopped");
    }

    /// Processes one batch of partition `p`; `Ok(true)` when it moved forward.
    async fn step(&mut self, topic: &TopicConfig, p: u32) -> Result<bool, StorageError> {
        // Only the partition's owner processes it (I7).
        let view = self.inner.view.borrow().clone();
        let owner = view
            .replicas(&topic.name, p, topic.replication_factor)
            .first()
            .cloned()
            .unwrap_or_default();
        // A (re)starting node processes nothing until it has heard from the cluster.
        let mine = owner == view.me && view.settled;
        self.with_status(p, |s| s.owner = owner.clone());
        if !mine {
            self.parts[p as usize].owned = false;
            return Ok(false);
        }
        if !self.parts[p as usize].owned {
            // Newly owned: the checkpoint may have been advanced by the previous owner's
            // replicated checkpoints, and the instance's cached state with it.
            let st = self.inner.storage.clone();
            let name = self.spec.name.clone();
            let cp = tokio::task::spawn_blocking(move || st.checkpoint(&name, p))
                .await
                .map_err(|e| StorageError::Db(e.to_string()))??
                .unwrap_or_default();
            self.instances.remove(&p);
            let ps = &mut self.parts[p as usize];
            ps.checkpoint = cp;
            ps.owned = true;
        }
        // Progress other nodes made on this partition (e.g. while this node was away).
        let merged = self
            .inner
            .merges
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&(self.spec.name.clone(), p)));
        if let Some(theirs) = merged {
            let vv = &mut self.parts[p as usize].checkpoint.version_vector;
            for (o, seq) in theirs {
                bump(vv, o, seq);
            }
        }
        let ps = self.parts[p as usize].clone();
        if ps.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(false);
        }
        let limit = if ps.isolate_until.is_some() { 1 } else { BATCH };
        let st = self.inner.storage.clone();
        let tname = topic.name.clone();
        let from = ps.checkpoint.offset;
        let batch = tokio::task::spawn_blocking(move || {
            st.read(&tname, PartitionId(p), Offset(from), limit, 8 << 20)
        })
        .await
        .map_err(|e| StorageError::Db(e.to_string()))??;
        let end = batch.next_offset.0;
        if from < batch.log_start.0 {
            let lost = batch.log_start.0 - from;
            tracing::warn!(consumer = %self.spec.name, partition = p, records = lost, "records expired by retention before this consumer read them");
            self.with_status(p, |s| s.skipped_by_retention += lost);
        }
        let lag_cursor = from.max(batch.log_start.0);
        self.with_status(p, |s| {
            s.end_offset = end;
            s.lag = end.saturating_sub(lag_cursor);
        });
        self.publish_lag();
        if batch.records.is_empty() {
            return Ok(false);
        }
        let records = batch.records;
        // Records the checkpoint's version vector covers were processed by a previous owner.
        let done = &ps.checkpoint.version_vector;
        let selected: Vec<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, (_, r))| {
                r.id.seq.0 > crate::replication::core::vv_get(done, r.id.origin.0)
                    && matches(&self.spec.filter, &r.subject)
            })
            .map(|(i, _)| i)
            .collect();
        let last = records.last().map_or(from, |(o, _)| o.0);
        let output = if selected.is_empty() {
            abi::Output::default()
        } else {
            let input = abi::Batch {
                partition: p,
                records: selected
                    .iter()
                    .map(|&i| {
                        let (o, r) = &records[i];
                        abi::Record {
                            offset: o.0,
                            origin: r.id.origin.0,
                            seq: r.id.seq.0,
                            event_time_ms: r.event_time_ms,
                            ingest_time_ms: r.ingest_time_ms,
                            key: &r.key,
                            subject: &r.subject,
                            payload: &r.payload,
                        }
                    })
                    .collect(),
            };
            let n = input.records.len();
            let encoded = match runtime::encode_batch(&input) {
                Ok(e) => e,
                Err(e) => return self.failed(p, &records, e).await,
            };
            drop(input);
            match self.call(p, encoded, n).await {
                Ok(out) => out,
                Err(e) => return self.failed(p, &records, e).await,
            }
        };
        match self
            .commit(topic, p, &records, &selected, output, last + 1)
            .await
        {
            Ok(()) => Ok(true),
            Err(CommitError::Consumer(e)) => self.failed(p, &records, e).await,
            Err(CommitError::Storage(e)) => Err(e),
        }
    }

    /// Runs the module on a blocking thread (creating its instance if needed).
    async fn call(
        &mut self,
        p: u32,
        input: Vec<u8>,
        records: usize,
    ) -> Result<abi::Output, ConsumerError> {
        let instance = self.instances.remove(&p);
        let rt = self.inner.runtime.clone();
        let module = self.module.clone();
        let (config, storage, name, limits) = (
            self.spec.config.clone(),
            self.inner.storage.clone(),
            self.spec.name.clone(),
            self.inner.limits,
        );
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let mut inst = match instance {
                Some(i) => i,
                None => rt.instantiate(&module, &config, storage, &name, p, limits)?,
            };
            let out = inst.consume_encoded(&input, records);
            let fuel_left = inst.fuel_left();
            let budget = limits.fuel_base + limits.fuel_per_record * records as u64;
            // A failed instance may hold broken state: drop it, a fresh one is made on retry.
            let keep = out.is_ok().then_some(inst);
            Ok::<_, ConsumerError>((out, keep, budget.saturating_sub(fuel_left)))
        })
        .await;
        let busy = started.elapsed().as_millis() as u64;
        let (out, inst, fuel) = match joined {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(ConsumerError::Trap(format!("runtime task failed: {e}"))),
        };
        if let Some(i) = inst {
            self.instances.insert(p, i);
        }
        self.with_status(p, |s| {
            s.busy_ms += busy;
            s.fuel_used += fuel;
        });
        METRICS
            .consumer_busy_seconds
            .get_or_create(&consumer_label(&self.spec.name))
            .inc_by(busy as f64 / 1000.0);
        out
    }

    async fn failed(
        &mut self,
        p: u32,
        records: &[(Offset, Record)],
        e: ConsumerError,
    ) -> Result<bool, StorageError> {
        let name = self.spec.name.clone();
        tracing::warn!(consumer = %name, partition = p, error = %e, "consumer batch failed");
        METRICS
            .consumer_errors
            .get_or_create(&consumer_label(&name))
            .inc();
        self.with_status(p, |s| {
            s.errors += 1;
            s.last_error = Some(e.to_string());
            s.last_error_ms = Some(now_ms());
        });
        self.set_state("failing");
        let ps = &mut self.parts[p as usize];
        ps.tries += 1;
        if ps.tries < MAX_TRIES {
            let backoff = Duration::from_millis(100 << ps.tries.min(6));
            ps.retry_at = Some(Instant::now() + backoff);
            return Ok(false);
        }
        ps.tries = 0;
        ps.retry_at = None;
        if records.len() > 1 {
            // Find the record that fails: go one at a time through this batch.
            ps.isolate_until = records.last().map(|(o, _)| o.0);
            return Ok(true);
        }
        // One record failed every try: dead-letter it and move on.
        let Some((offset, r)) = records.first() else {
            return Ok(false);
        };
        let payload = json!({
            "consumer": name,
            "version": self.spec.version,
            "topic": self.spec.topic,
            "partition": p,
            "offset": offset.0,
            "record_id": r.id.to_string(),
            "subject": r.subject,
            "error": e.to_string(),
        });
        let next = offset.0 + 1;
        let mut vv = ps.checkpoint.version_vector.clone();
        bump(&mut vv, r.id.origin.0, r.id.seq.0);
        let checkpoint = Checkpoint {
            offset: next,
            version_vector: vv,
            updated_ms: now_ms(),
        };
        let ops = vec![
            Op::Append {
                topic: Arc::from(DLQ_TOPIC),
                partition: PartitionId(0),
                record: NewRecord {
                    key: Bytes::from(name.clone()),
                    subject: r.subject.clone(),
                    payload: r.payload.clone(),
                    headers: vec![
                        ("shoal.consumer".into(), Bytes::from(name.clone())),
                        ("shoal.error".into(), Bytes::from(payload.to_string())),
                    ],
                    event_time_ms: Some(r.event_time_ms),
                },
            },
            cluster::checkpoint_op(&self.spec, p, &checkpoint, &[]),
            Op::ConsumerCommit {
                name: name.clone(),
                partition: p,
                checkpoint: checkpoint.clone(),
                state: Vec::new(),
            },
        ];
        self.inner.storage.write(ops).await?;
        let ps = &mut self.parts[p as usize];
        ps.checkpoint = checkpoint;
        if ps.isolate_until.is_some_and(|u| next > u) {
            ps.isolate_until = None;
        }
        self.with_status(p, |s| {
            s.dead_lettered += 1;
            s.cursor = next;
        });
        METRICS
            .consumer_dead_lettered
            .get_or_create(&consumer_label(&name))
            .inc();
        tracing::warn!(consumer = %name, partition = p, offset = offset.0, "record sent to _dlq");
        Ok(true)
    }

    async fn commit(
        &mut self,
        topic: &TopicConfig,
        p: u32,
        records: &[(Offset, Record)],
        selected: &[usize],
        out: abi::Output,
        next: u64,
    ) -> Result<(), CommitError> {
        if out.alerts.len() + out.emits.len() > MAX_OUTPUTS {
            return Err(CommitError::Consumer(ConsumerError::BadOutput(format!(
                "{} alerts and emitted records in one batch (limit {MAX_OUTPUTS})",
                out.alerts.len() + out.emits.len()
            ))));
        }
        let source = |i: u32| -> Result<&(Offset, Record), CommitError> {
            selected
                .get(i as usize)
                .and_then(|&k| records.get(k))
                .ok_or_else(|| {
                    CommitError::Consumer(ConsumerError::BadOutput(format!(
                        "output refers to record {i}, outside the batch"
                    )))
                })
        };
        let mut ops = Vec::with_capacity(out.alerts.len() + out.emits.len() + 1);
        let mut per_record: HashMap<u32, u32> = HashMap::new();
        let alerts_topic: Arc<str> = Arc::from(ALERTS_TOPIC);
        for a in &out.alerts {
            let (offset, r) = source(a.record_index)?;
            let n = per_record.entry(a.record_index).or_default();
            let id = alert_id(&self.spec.name, &topic.name, p, r, *n);
            *n += 1;
            let payload = json!({
                "id": id,
                "consumer": self.spec.name,
                "version": self.spec.version,
                "key": a.key,
                "severity": a.severity.as_str(),
                "message": a.message,
                "value": a.value,
                "topic": topic.name,
                "partition": p,
                "offset": offset.0,
                "record_id": r.id.to_string(),
                "subject": r.subject,
                "event_time": r.event_time_ms,
                "raised_at": now_ms(),
            });
            ops.push(Op::Append {
                topic: alerts_topic.clone(),
                partition: PartitionId(0),
                record: NewRecord {
                    key: Bytes::from(id),
                    subject: format!("shoal/alerts/{}/{}", self.spec.name, topic_safe(&a.key)),
                    payload: Bytes::from(payload.to_string()),
                    headers: vec![("shoal.consumer".into(), Bytes::from(self.spec.name.clone()))],
                    event_time_ms: Some(r.event_time_ms),
                },
            });
        }
        for e in &out.emits {
            let (_, r) = source(e.record_index)?;
            let Some(target) = self
                .inner
                .storage
                .topic(&e.topic)
                .filter(|t| !t.name.starts_with('_'))
            else {
                return Err(CommitError::Consumer(ConsumerError::BadOutput(format!(
                    "emits to topic {:?}, which does not exist (create it first)",
                    e.topic
                ))));
            };
            ops.push(Op::Append {
                topic: Arc::from(target.name.as_str()),
                partition: crate::route::partition_for(&e.key, target.partitions),
                record: NewRecord {
                    key: Bytes::from(e.key.clone()),
                    subject: e.subject.clone(),
                    payload: Bytes::from(e.payload.clone()),
                    headers: vec![("shoal.consumer".into(), Bytes::from(self.spec.name.clone()))],
                    event_time_ms: Some(r.event_time_ms),
                },
            });
        }
        let ps = &self.parts[p as usize];
        let mut vv = ps.checkpoint.version_vector.clone();
        for (_, r) in records {
            bump(&mut vv, r.id.origin.0, r.id.seq.0);
        }
        let checkpoint = Checkpoint {
            offset: next,
            version_vector: vv,
            updated_ms: now_ms(),
        };
        ops.push(Op::ConsumerCommit {
            name: self.spec.name.clone(),
            partition: p,
            checkpoint: checkpoint.clone(),
            state: out.state.clone(),
        });
        let topics: Vec<Option<Arc<str>>> = ops
            .iter()
            .map(|op| match op {
                Op::Append { topic, .. } => Some(topic.clone()),
                _ => None,
            })
            .collect();
        let outcomes = self
            .inner
            .storage
            .write(ops)
            .await
            .map_err(CommitError::Storage)?;
        if let Some(i) = self.instances.get_mut(&p) {
            i.committed(&out.state);
        }
        let state_changes = out.state;
        let ps = &mut self.parts[p as usize];
        ps.checkpoint = checkpoint;
        ps.tries = 0;
        ps.retry_at = None;
        if ps.isolate_until.is_some_and(|u| next > u) {
            ps.isolate_until = None;
        }
        let (n_in, n_alerts, n_emits) = (
            selected.len() as u64,
            out.alerts.len() as u64,
            out.emits.len() as u64,
        );
        let label = consumer_label(&self.spec.name);
        METRICS
            .consumer_records_in
            .get_or_create(&label)
            .inc_by(n_in);
        METRICS
            .consumer_alerts_out
            .get_or_create(&label)
            .inc_by(n_alerts);
        self.with_status(p, |s| {
            s.cursor = next;
            s.records_in += n_in;
            s.alerts_out += n_alerts;
            s.emitted += n_emits;
            s.lag = s.end_offset.saturating_sub(next);
        });
        self.publish_lag();
        if self.parts.iter().all(|p| p.tries == 0) {
            self.set_state("running");
        }
        // The checkpoint reaches the other nodes only once the batch's outputs meet their
        // topics' acks policies, so a new owner never skips a record whose alerts exist on
        // the dead owner's disk alone (I7). When they do not in time, this batch's
        // checkpoint is not sent (a later one covers it); a failover then re-runs the batch
        // and `_alerts` drops the repeated ids.
        let writes: Vec<_> = topics
            .into_iter()
            .zip(&outcomes)
            .filter_map(|(t, o)| match (t, o) {
                (Some(t), crate::storage::OpOutcome::Appended { partition, id, .. }) => {
                    Some((t, *partition, *id))
                }
                _ => None,
            })
            .collect();
        match self.inner.replication.wait(&writes).await {
            Ok(()) => {
                let cp = self.parts[p as usize].checkpoint.clone();
                let op = cluster::checkpoint_op(&self.spec, p, &cp, &state_changes);
                self.inner
                    .storage
                    .write(vec![op])
                    .await
                    .map_err(CommitError::Storage)?;
            }
            Err(e) => {
                tracing::debug!(consumer = %self.spec.name, partition = p, error = %e, "checkpoint kept local: outputs not replicated in time")
            }
        }
        Ok(())
    }
}

enum CommitError {
    Consumer(ConsumerError),
    Storage(StorageError),
}

/// Raises `origin`'s entry of a version vector to at least `seq`.
fn bump(vv: &mut Vec<(u64, u64)>, origin: u64, seq: u64) {
    match vv.binary_search_by_key(&origin, |(o, _)| *o) {
        Ok(i) => vv[i].1 = vv[i].1.max(seq),
        Err(i) => vv.insert(i, (origin, seq)),
    }
}
