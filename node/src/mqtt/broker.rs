//! Shared MQTT server state: settings, the route table, the client-id registry (session
//! takeover), authentication and the subscribe ACL; and the accept loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpListener;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outbox::qos_from;
use super::topic::filter_within;
use crate::config::MqttSettings;
use crate::metrics::METRICS;
use crate::route::{RouteTable, partition_for};
use crate::storage::format::HEADER_MQTT_QOS;
use crate::storage::{NewRecord, Op, RetainedMessage, Storage};
use crate::types::now_ms;

struct Registration {
    /// Generation of the most recent CONNECT for this client id.
    latest: u64,
    /// Cancels the connection currently holding the session.
    holder: Option<CancellationToken>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// Everything connections share.
pub struct Broker {
    pub storage: Storage,
    pub routes: RouteTable,
    pub settings: MqttSettings,
    pub replication: crate::replication::Replication,
    /// Records of partitions this node does not replicate, relayed by their coordinators.
    pub remote: tokio::sync::broadcast::Sender<crate::replication::RemoteBatch>,
    registry: Mutex<HashMap<String, Registration>>,
}

/// Proof that a connection holds a client id's session; dropping it lets a newer
/// connection with the same id proceed.
pub struct SessionGuard {
    _guard: OwnedMutexGuard<()>,
    pub kicked: CancellationToken,
}

impl Broker {
    pub fn new(
        storage: Storage,
        routes: RouteTable,
        settings: MqttSettings,
        replication: crate::replication::Replication,
        remote: tokio::sync::broadcast::Sender<crate::replication::RemoteBatch>,
    ) -> Arc<Broker> {
        Arc::new(Broker {
            storage,
            routes,
            settings,
            replication,
            remote,
            registry: Mutex::new(HashMap::new()),
        })
    }

    /// Takes over `client_id`: disconnects the connection that holds it (MQTT-3.1.4-2), waits
    /// until that connection has saved its session, and registers this one. Returns `None`
    /// when an even newer CONNECT for the same id arrived meanwhile.
    pub async fn take_over(&self, client_id: &str) -> Option<SessionGuard> {
        let (gen_, lock) = {
            let mut reg = self.registry.lock().ok()?;
            let r = reg
                .entry(client_id.to_string())
                .or_insert_with(|| Registration {
                    latest: 0,
                    holder: None,
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                });
            r.latest += 1;
            if let Some(h) = &r.holder {
                h.cancel();
            }
            (r.latest, r.lock.clone())
        };
        // The previous holder saves its session and exits once kicked; its socket writes
        // give up after WRITE_TIMEOUT, so this wait is bounded.
        let guard = tokio::time::timeout(std::time::Duration::from_secs(30), lock.lock_owned())
            .await
            .ok()?;
        let mut reg = self.registry.lock().ok()?;
        let r = reg.get_mut(client_id)?;
        if r.latest != gen_ {
            return None;
        }
        let kicked = CancellationToken::new();
        r.holder = Some(kicked.clone());
        Some(SessionGuard {
            _guard: guard,
            kicked,
        })
    }

    /// Forgets the registration once no newer connection waits for it (the registry and
    /// `guard` hold the only references to the lock).
    pub fn release(&self, client_id: &str, guard: SessionGuard) {
        if let Ok(mut reg) = self.registry.lock()
            && let Some(r) = reg.get(client_id)
            && Arc::strong_count(&r.lock) <= 2
        {
            reg.remove(client_id);
        }
        drop(guard);
    }

    /// Checks credentials. `Err` carries the CONNACK refusal.
    pub fn authenticate(
        &self,
        login: Option<&rumqttc::mqttbytes::v4::Login>,
    ) -> Result<(), rumqttc::mqttbytes::v4::ConnectReturnCode> {
        use rumqttc::mqttbytes::v4::ConnectReturnCode;
        if self.settings.users.is_empty() {
            return Ok(());
        }
        match login {
            None if self.settings.allow_anonymous => Ok(()),
            None => Err(ConnectReturnCode::NotAuthorized),
            Some(l) => {
                if self
                    .settings
                    .users
                    .iter()
                    .any(|u| u.username == l.username && u.password == l.password)
                {
                    Ok(())
                } else {
                    Err(ConnectReturnCode::BadUserNamePassword)
                }
            }
        }
    }

    /// Whether the subscribe ACL lets this client subscribe to `filter`.
    pub fn may_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        if self.settings.acl.is_empty() {
            return true;
        }
        let safe = |s: &str| !s.contains(['+', '#', '/']);
        self.settings
            .acl
            .iter()
            .filter(|r| r.username == "*" || Some(r.username.as_str()) == username)
            .flat_map(|r| r.subscribe.iter())
            .any(|pattern| {
                if pattern.contains("%u") && !username.is_some_and(safe) {
                    return false;
                }
                if pattern.contains("%c") && !safe(client_id) {
                    return false;
                }
                let p = pattern
                    .replace("%u", username.unwrap_or(""))
                    .replace("%c", client_id);
                filter_within(filter, &p)
            })
    }

    /// The storage operations for one publish: the log append (through the route table),
    /// and the retained-message update when `retain` is set.
    pub fn publish_ops(
        &self,
        subject: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        client_id: &str,
    ) -> Vec<Op> {
        let (topic, key) = self.routes.resolve(subject, client_id);
        let partitions = self.storage.topic(&topic).map_or(1, |t| t.partitions);
        let qos_n = qos as u8;
        let mut ops = Vec::with_capacity(2);
        if retain {
            ops.push(Op::SetRetained {
                topic: subject.to_string(),
                // An empty payload deletes; it is kept as a tombstone (an empty message) so
                // an older retained message arriving later from another node loses to it.
                message: Some(RetainedMessage {
                    topic: subject.to_string(),
                    qos: qos_n,
                    payload: payload.clone(),
                    stored_ms: now_ms(),
                }),
            });
            ops.push(super::cluster::retained_op(subject, &payload, qos_n));
        }
        ops.push(Op::Append {
            partition: partition_for(&key, partitions),
            topic,
            record: NewRecord {
                key,
                subject: subject.to_string(),
                payload,
                headers: if qos_n > 0 {
                    vec![(HEADER_MQTT_QOS.to_string(), Bytes::from(vec![qos_n]))]
                } else {
                    Vec::new()
                },
                event_time_ms: None,
            },
        });
        ops
    }

    /// Publishes a will message (best effort: logged on failure).
    pub async fn publish_will(&self, will: &rumqttc::mqttbytes::v4::LastWill, client_id: &str) {
        if !super::topic::valid_topic_name(&will.topic) {
            tracing::warn!(client_id, topic = %will.topic, "will topic is invalid; not published");
            return;
        }
        let ops = self.publish_ops(
            &will.topic,
            will.message.clone(),
            qos_from(will.qos as u8),
            will.retain,
            client_id,
        );
        if let Err(e) = self.storage.write(ops).await {
            tracing::warn!(client_id, error = %e, "will message not stored");
        }
    }
}

/// Accepts MQTT connections until `shutdown`; every connection task is tracked by
/// `tracker` and stops (flushing its pending acks) when `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "mqtt accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        METRICS.mqtt_connections_total.inc();
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            METRICS.mqtt_connections.inc();
            super::connection::run(stream, peer, broker, shutdown).await;
            METRICS.mqtt_connections.dec();
        });
    }
    tracing::debug!("mqtt listener stopped");
}
