//! Wiring: opens storage, creates the configured topics, binds the MQTT and HTTP listeners
//! and runs their tasks plus retention until shutdown. Every task is owned by one of two
//! `TaskTracker`s (cluster tasks stop last); `Node::shutdown` stops accepting, lets
//! connections flush their pending
//! acks, then lets the storage writer commit everything already queued.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Membership;
use crate::cluster::membership::Advertised;
use crate::config::Config;
use crate::consumers::{Consumers, Limits};
use crate::mqtt::Broker;
use crate::replication::Replication;
use crate::route::RouteTable;
use crate::storage::{Op, Storage, StorageConfig, StorageError};
use crate::types::now_ms;

/// A running node.
pub struct Node {
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// Gossip address to give other nodes' `--seed`.
    pub gossip_addr: SocketAddr,
    storage: Storage,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    cluster_stop: CancellationToken,
    cluster_tracker: TaskTracker,
    membership: Option<Membership>,
}

/// State the HTTP API handlers share.
#[derive(Clone)]
pub struct AppState {
    pub storage: Storage,
    pub consumers: Consumers,
    pub api_token: Option<String>,
    pub ready: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
    /// This node's view of the cluster.
    pub view: tokio::sync::watch::Receiver<Arc<crate::cluster::View>>,
    pub replication: Replication,
}

impl Node {
    /// Starts a node; returns once both listeners are bound and the node is ready.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        let topics = config.validate()?;
        let routes = RouteTable::new(&config.routes).map_err(anyhow::Error::msg)?;
        let mut sc = StorageConfig::new(&config.data_dir);
        sc.cache_bytes = config.storage.cache_mb << 20;
        sc.queue_depth = config.storage.queue_depth;
        sc.max_batch_ops = config.storage.max_batch_ops;
        let storage = tokio::task::spawn_blocking(move || Storage::open(sc)).await??;
        for t in topics
            .into_iter()
            .chain(crate::consumers::internal_topics())
            .chain(crate::mqtt::cluster::topics())
        {
            match storage.create_topic(t.clone()).await {
                Ok(_) => {
                    tracing::info!(topic = %t.name, partitions = t.partitions, "created topic")
                }
                Err(StorageError::TopicExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mqtt = TcpListener::bind(config.mqtt_addr)
            .await
            .with_context(|| format!("cannot listen for MQTT on {}", config.mqtt_addr))?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http_addr))?;
        let peer = TcpListener::bind(config.peer_addr)
            .await
            .with_context(|| format!("cannot listen for peers on {}", config.peer_addr))?;
        let mqtt_addr = mqtt.local_addr()?;
        let http_addr = http.local_addr()?;
        let peer_addr = peer.local_addr()?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Membership and replication stop last, so connections draining their acks at
        // shutdown can still get them from the replicas.
        let cluster_stop = CancellationToken::new();
        let cluster_tracker = TaskTracker::new();
        let node_name = config.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "shoal".into())
        });
        let limits = Limits {
            fuel_per_record: config.consumers.fuel_per_record,
            fuel_base: config.consumers.fuel_per_batch,
            timeout: config.consumers.batch_timeout,
            memory_bytes: config.consumers.memory_mb << 20,
        };
        let membership = Membership::start(
            &config.cluster,
            config.gossip_addr,
            &config.seeds,
            Advertised {
                node_id: node_name.clone(),
                origin: storage.origin().0,
                mqtt: mqtt_addr,
                http: http_addr,
                peer: peer_addr,
            },
            storage.clone(),
            &cluster_tracker,
            cluster_stop.clone(),
        )
        .await?;
        let gossip_addr = membership.gossip_addr;
        let (remote, _) = tokio::sync::broadcast::channel(1024);
        let replication = Replication::start(
            storage.clone(),
            node_name.clone(),
            config.cluster.cluster_id.clone(),
            membership.view.clone(),
            peer,
            config.cluster.ack_timeout,
            config.cluster.anti_entropy_interval,
            remote.clone(),
            cluster_tracker.clone(),
            cluster_stop.clone(),
        );
        let consumers = Consumers::start(
            storage.clone(),
            limits,
            tracker.clone(),
            shutdown.clone(),
            node_name.clone(),
            membership.view.clone(),
            replication.clone(),
        )
        .await?;
        tracker.spawn(crate::mqtt::cluster::sync(
            storage.clone(),
            shutdown.clone(),
        ));
        let broker = Broker::new(
            storage.clone(),
            routes,
            config.mqtt.clone(),
            replication.clone(),
            remote,
        );
        tracker.spawn(crate::mqtt::serve(
            mqtt,
            broker,
            shutdown.clone(),
            tracker.clone(),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let state = AppState {
            storage: storage.clone(),
            consumers,
            api_token: config.api_token.clone(),
            ready: ready.clone(),
            shutdown: shutdown.clone(),
            view: membership.view.clone(),
            replication,
        };
        let app = crate::api::router(state);
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let served = axum::serve(http, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        let interval = config.storage.retention_interval;
        let (st, stop) = (storage.clone(), shutdown.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = st.write(vec![Op::Retention { now_ms: now_ms() }]).await {
                            tracing::warn!(error = %e, "retention pass failed");
                        }
                    }
                }
            }
        });
        ready.store(true, Ordering::SeqCst);
        tracing::info!(
            mqtt = %mqtt_addr,
            http = %http_addr,
            peer = %peer_addr,
            gossip = %gossip_addr,
            data_dir = %config.data_dir.display(),
            origin = %storage.origin(),
            "shoal node ready"
        );
        Ok(Node {
            mqtt_addr,
            http_addr,
            peer_addr,
            gossip_addr,
            storage,
            shutdown,
            tracker,
            cluster_stop,
            cluster_tracker,
            membership: Some(membership),
        })
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Graceful stop: no new connections, pending acks flushed, queued writes committed.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(m) = self.membership.take() {
            m.shutdown().await;
        }
        self.cluster_stop.cancel();
        self.cluster_tracker.close();
        self.cluster_tracker.wait().await;
        self.storage.shutdown().await;
        tracing::info!("shoal node stopped");
    }
}
