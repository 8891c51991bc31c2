//! Membership driver: chitchat (UDP gossip with a phi-accrual failure detector) in, a
//! [`View`] out. Each node publishes its addresses, origin and version as chitchat keys, plus
//! one `topic/{name}` key per user topic so that topics created on one node appear on all.
//! A task polls chitchat every gossip interval, dedupes members by node id (highest
//! generation wins, see CRATE-NOTES), and publishes a new `View` when anything changed.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;

use anyhow::Context;
use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::placement;
use crate::config::ClusterSettings;
use crate::storage::{Acks, Storage, StorageError, TopicConfig};

const K_ORIGIN: &str = "origin";
const K_MQTT: &str = "mqtt";
const K_HTTP: &str = "http";
const K_PEER: &str = "peer";
const K_VERSION: &str = "version";
const TOPIC_PREFIX: &str = "topic/";
/// Node ids of the other members, one per line, in the data directory.
const MEMBERS_FILE: &str = "cluster-members";

/// What this node knows about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node_id: String,
    pub generation: u64,
    pub origin: u64,
    pub mqtt_addr: String,
    pub http_addr: String,
    pub peer_addr: Option<SocketAddr>,
    pub version: String,
    pub live: bool,
}

/// This node's view of the cluster: every known member (live or dead, until forgotten).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub me: String,
    pub members: BTreeMap<String, Peer>,
    /// False while a (re)starting node has not heard from the cluster yet: it then counts
    /// the members it remembers (as dead) for acks, and runs no consumers, so it neither
    /// acks alone what needs a quorum nor processes partitions another node owns.
    pub settled: bool,
}

impl View {
    /// A view holding only this node (before gossip starts, and in unit tests).
    pub fn solo(me: Peer) -> View {
        View {
            me: me.node_id.clone(),
            members: BTreeMap::from([(me.node_id.clone(), me)]),
            settled: true,
        }
    }

    /// Adds members remembered from an earlier run that gossip has not reported yet, as
    /// dead, so `required` counts them.
    fn remember(&mut self, ids: &std::collections::BTreeSet<String>) {
        for id in ids {
            self.members.entry(id.clone()).or_insert_with(|| Peer {
                node_id: id.clone(),
                generation: 0,
                origin: 0,
                mqtt_addr: String::new(),
                http_addr: String::new(),
                peer_addr: None,
                version: String::new(),
                live: false,
            });
        }
    }

    /// Live members' ids, sorted.
    pub fn live(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.live)
            .map(|m| m.node_id.clone())
            .collect()
    }

    /// The replicas of a partition over the live members, owner first (PROTOCOL.md I1).
    pub fn replicas(&self, topic: &str, partition: u32, rf: u32) -> Vec<String> {
        let live: Vec<placement::NodeId> = self.live().into_iter().map(placement::NodeId).collect();
        placement::replicas(&live, topic, partition, rf)
            .into_iter()
            .map(|n| n.0)
            .collect()
    }

    pub fn is_replica(&self, topic: &str, partition: u32, rf: u32) -> bool {
        self.replicas(topic, partition, rf).contains(&self.me)
    }

    /// Durable copies a client write needs (I4): the acks policy over
    /// `min(R, known members)`, so a lone embedded node acks on its own disk while a
    /// three-node cluster with one node down still needs two copies for `quorum`.
    pub fn required(&self, acks: Acks, rf: u32) -> usize {
        let r = (rf as usize).min(self.members.len().max(1));
        crate::replication::core::required(acks, r)
    }

    pub fn peer(&self, node: &str) -> Option<&Peer> {
        self.members.get(node)
    }
}

/// The running membership: chitchat plus the view it feeds.
pub struct Membership {
    handle: ChitchatHandle,
    pub view: watch::Receiver<Arc<View>>,
    /// Gossip address other nodes reach this one at (give it to `--seed`).
    pub gossip_addr: SocketAddr,
}

/// Addresses this node advertises.
#[derive(Clone, Debug)]
pub struct Advertised {
    pub node_id: String,
    pub origin: u64,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub peer: SocketAddr,
}

/// The IP other nodes should use for this node (see `ClusterSettings::advertise_host`).
pub fn advertise_ip(
    settings: &ClusterSettings,
    listen: SocketAddr,
    seeds: &[String],
) -> anyhow::Result<std::net::IpAddr> {
    if let Some(host) = &settings.advertise_host {
        let addr = (host.as_str(), 0)
            .to_socket_addrs()
            .with_context(|| format!("cluster.advertise_host {host:?} does not resolve"))?
            .next()
            .with_context(|| format!("cluster.advertise_host {host:?} has no address"))?;
        return Ok(addr.ip());
    }
    if !listen.ip().is_unspecified() {
        return Ok(listen.ip());
    }
    for seed in seeds {
        if let Some(addr) = seed.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            // Connecting a UDP socket sends nothing; it only picks the route's local address.
            let probe = UdpSocket::bind(("0.0.0.0", 0))?;
            if probe.connect(addr).is_ok()
                && let Ok(local) = probe.local_addr()
            {
                return Ok(local.ip());
            }
        }
    }
    Ok(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// A free UDP port on `ip` (gossip on port 0: chitchat binds its own socket by address).
fn free_udp_port(ip: std::net::IpAddr) -> anyhow::Result<u16> {
    let s = UdpSocket::bind((ip, 0)).with_context(|| format!("cannot bind UDP on {ip}"))?;
    Ok(s.local_addr()?.port())
}

impl Membership {
    /// Joins (or starts) the cluster and spawns the task that keeps the view current.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        settings: &ClusterSettings,
        gossip_listen: SocketAddr,
        seeds: &[String],
        me: Advertised,
        storage: Storage,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Membership> {
        let ip = advertise_ip(settings, gossip_listen, seeds)?;
        let mut listen = gossip_listen;
        if listen.port() == 0 {
            listen.set_port(free_udp_port(listen.ip())?);
        }
        let gossip_addr = SocketAddr::new(ip, listen.port());
        let generation = crate::types::now_ms();
        let chitchat_id = ChitchatId::new(me.node_id.clone(), generation, gossip_addr);
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: settings.cluster_id.clone(),
            gossip_interval: settings.gossip_interval,
            listen_addr: listen,
            seed_nodes: seeds.to_vec(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: settings.phi_threshold,
                initial_interval: settings.gossip_interval,
                dead_node_grace_period: settings.dead_node_grace,
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: std::time::Duration::from_secs(7200),
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|s: &chitchat::NodeState| {
                s.contains_key(K_PEER) && s.contains_key(K_ORIGIN)
            })),
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let with_ip = |a: SocketAddr| SocketAddr::new(ip, a.port()).to_string();
        let kvs = vec![
            (K_ORIGIN.to_string(), format!("{:016x}", me.origin)),
            (K_MQTT.to_string(), with_ip(me.mqtt)),
            (K_HTTP.to_string(), with_ip(me.http)),
            (K_PEER.to_string(), with_ip(me.peer)),
            (K_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ];
        let handle = chitchat::spawn_chitchat(config, kvs, &UdpTransport)
            .await
            .with_context(|| format!("cannot start gossip on {listen}"))?;
        let solo = View::solo(Peer {
            node_id: me.node_id.clone(),
            generation,
            origin: me.origin,
            mqtt_addr: with_ip(me.mqtt),
            http_addr: with_ip(me.http),
            peer_addr: Some(SocketAddr::new(ip, me.peer.port())),
            version: env!("CARGO_PKG_VERSION").to_string(),
            live: true,
        });
        // Members of earlier runs (the file is rewritten whenever the set changes).
        let members_file = storage
            .path()
            .parent()
            .map(|d| d.join(MEMBERS_FILE))
            .unwrap_or_else(|| std::path::PathBuf::from(MEMBERS_FILE));
        let mut remembered: std::collections::BTreeSet<String> =
            std::fs::read_to_string(&members_file)
                .map(|t| {
                    t.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && *l != me.node_id)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
        let mut solo = solo;
        let alone = seeds.is_empty() && remembered.is_empty();
        if !alone {
            solo.remember(&remembered);
            solo.settled = false;
        }
        // Without an answer from any member for this long, the node settles alone (the
        // remembered members still count as dead ones).
        let settle_by = tokio::time::Instant::now() + settings.gossip_interval * 25;
        let mut settled = alone;
        let (tx, view) = watch::channel(Arc::new(solo));
        let chitchat = handle.chitchat();
        let interval = settings.gossip_interval;
        let mut last_written = String::new();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let mine: Vec<(String, String)> = storage
                    .topics()
                    .into_iter()
                    .filter(|t| !t.name.starts_with('_'))
                    .filter_map(|t| Some((format!("{TOPIC_PREFIX}{}", t.name), serde_json::to_string(&t).ok()?)))
                    .collect();
                let (new_view, remote_topics) = {
                    let mut cc = chitchat.lock().await;
                    let me_state = cc.self_node_state();
                    for (k, v) in &mine {
                        me_state.set(k, v);
                    }
                    snapshot(&cc)
                };
                for t in remote_topics {
                    if storage.topic(&t.name).is_none() {
                        match storage.create_topic(t.clone()).await {
                            Ok(_) => tracing::info!(topic = %t.name, "created topic learned from a peer"),
                            Err(StorageError::TopicExists(_)) => {}
                            Err(e) => tracing::warn!(topic = %t.name, error = %e, "cannot create topic learned from a peer"),
                        }
                    }
                }
                let mut new_view = new_view;
                if !settled
                    && (new_view.members.values().any(|m| m.live && m.node_id != new_view.me)
                        || tokio::time::Instant::now() >= settle_by)
                {
                    settled = true;
                }
                new_view.settled = settled;
                // Remembered members count until gossip reports them (then chitchat's own
                // dead-node expiry applies).
                remembered.retain(|id| !new_view.members.contains_key(id));
                new_view.remember(&remembered);
                let known: Vec<&str> = new_view
                    .members
                    .keys()
                    .map(String::as_str)
                    .filter(|id| *id != new_view.me)
                    .collect();
                let text = known.join("\n");
                if text != last_written {
                    if let Err(e) = std::fs::write(&members_file, &text) {
                        tracing::warn!(file = %members_file.display(), error = %e, "cannot save the member list");
                    }
                    last_written = text;
                }
                if **tx.borrow() != new_view {
                    let old = tx.borrow().live();
                    if old != new_view.live() {
                        tracing::info!(live = ?new_view.live(), "membership changed");
                    }
                    let _ = tx.send(Arc::new(new_view));
                }
            }
        });
        Ok(Membership {
            handle,
            view,
            gossip_addr,
        })
    }

    /// Leaves the gossip (peers then see this node go dead).
    pub async fn shutdown(self) {
        let _ = self.handle.shutdown().await;
    }
}

/// Builds the view and collects the topics other nodes declare (under the chitchat lock:
/// no awaits here).
fn snapshot(cc: &chitchat::Chitchat) -> (View, Vec<TopicConfig>) {
    let me = cc.self_chitchat_id().node_id.to_string();
    let live: std::collections::HashSet<&ChitchatId> = cc.live_nodes().collect();
    let mut members: BTreeMap<String, Peer> = BTreeMap::new();
    let mut topics = Vec::new();
    for (id, state) in cc.node_states() {
        let Some(origin) = state
            .get(K_ORIGIN)
            .and_then(|o| u64::from_str_radix(o, 16).ok())
        else {
            continue;
        };
        let peer = Peer {
            node_id: id.node_id.to_string(),
            generation: id.generation_id,
            origin,
            mqtt_addr: state.get(K_MQTT).unwrap_or_default().to_string(),
            http_addr: state.get(K_HTTP).unwrap_or_default().to_string(),
            peer_addr: state.get(K_PEER).and_then(|a| a.parse().ok()),
            version: state.get(K_VERSION).unwrap_or_default().to_string(),
            live: live.contains(id),
        };
        match members.get(&peer.node_id) {
            Some(old) if old.generation >= peer.generation => {}
            _ => {
                members.insert(peer.node_id.clone(), peer);
            }
        }
        if id.node_id.as_ref() != me {
            for (k, v) in state.key_values() {
                if k.starts_with(TOPIC_PREFIX)
                    && let Ok(t) = serde_json::from_str::<TopicConfig>(v)
                    && crate::types::validate_topic_name(&t.name, false).is_ok()
                    && t.partitions >= 1
                    && t.partitions <= 4096
                    && t.replication_factor >= 1
                {
                    topics.push(t);
                }
            }
        }
    }
    (
        View {
            me,
            members,
            settled: true,
        },
        topics,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, live: bool) -> Peer {
        Peer {
            node_id: id.into(),
            generation: 1,
            origin: 1,
            mqtt_addr: String::new(),
            http_addr: String::new(),
            peer_addr: None,
            version: String::new(),
            live,
        }
    }

    #[test]
    fn required_copies_count_known_members() {
        let mut v = View::solo(peer("a", true));
        assert_eq!(v.required(Acks::Quorum, 3), 1, "a lone node acks alone");
        for (id, live) in [("b", true), ("c", false)] {
            v.members.insert(id.into(), peer(id, live));
        }
        assert_eq!(v.required(Acks::Quorum, 3), 2);
        assert_eq!(v.required(Acks::All, 3), 3);
        assert_eq!(v.required(Acks::Local, 3), 1);
        assert_eq!(v.live(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            v.replicas("t", 0, 3).len(),
            2,
            "placement is over live nodes"
        );
    }
}
