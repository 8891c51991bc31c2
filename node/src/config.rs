//! Node configuration: defaults that run a single embedded node with no file, a TOML file
//! with every setting (`--config`), and overrides from flags and `SHOAL_*` variables
//! (applied by `cli`). Validation happens once here so the rest of the node can trust it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::storage::{Acks, TopicConfig};
use crate::types::{now_ms, validate_topic_name};

/// The topic the default route writes to.
pub const DEFAULT_TOPIC: &str = "telemetry";

/// Everything a node needs to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of this node in the cluster; defaults to the host name.
    pub node_id: Option<String>,
    pub data_dir: PathBuf,
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Peer replication (TCP) listen address.
    pub peer_addr: SocketAddr,
    /// Gossip (UDP) listen address.
    pub gossip_addr: SocketAddr,
    /// Gossip addresses of cluster members to join (`HOST:PORT`); empty = start a new cluster.
    pub seeds: Vec<String>,
    pub cluster: ClusterSettings,
    pub storage: StorageSettings,
    pub mqtt: MqttSettings,
    /// Topic declarations; created at start-up when missing.
    pub topics: Vec<TopicSettings>,
    /// MQTT topic filter -> log topic routes, first match wins; subjects no route matches
    /// go to `telemetry` keyed by the MQTT topic.
    pub routes: Vec<RouteSettings>,
    /// When set, deploying and removing consumers needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    pub consumers: ConsumerSettings,
}

/// Membership and replication settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// Nodes only gossip and replicate with nodes of the same cluster id.
    pub cluster_id: String,
    /// Host (name or IP) other nodes use to reach this one. Default: the listen IP, or,
    /// when listening on 0.0.0.0, the local IP that routes to the first seed (127.0.0.1
    /// without seeds).
    pub advertise_host: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub gossip_interval: Duration,
    /// Phi-accrual threshold above which a silent node is declared dead.
    pub phi_threshold: f64,
    /// How long a dead node is remembered (it still counts towards `min(R, members)`).
    #[serde(with = "humantime_serde_compat")]
    pub dead_node_grace: Duration,
    /// How often replicas compare version vectors (also run on every membership change).
    #[serde(with = "humantime_serde_compat")]
    pub anti_entropy_interval: Duration,
    /// How long a client write waits for its acks policy before it is refused unacked.
    #[serde(with = "humantime_serde_compat")]
    pub ack_timeout: Duration,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            cluster_id: "shoal".into(),
            advertise_host: None,
            gossip_interval: Duration::from_millis(200),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(3600),
            anti_entropy_interval: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Sandbox limits of WebAssembly consumers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Fuel (roughly wasm instructions) a batch may use per record, plus `fuel_per_batch`.
    pub fuel_per_record: u64,
    pub fuel_per_batch: u64,
    /// Wall-clock limit of one batch call.
    #[serde(with = "humantime_serde_compat")]
    pub batch_timeout: Duration,
    /// Linear memory cap of one instance, in MiB.
    pub memory_mb: usize,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            fuel_per_record: 2_000_000,
            fuel_per_batch: 20_000_000,
            batch_timeout: Duration::from_secs(2),
            memory_mb: 64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// redb page cache in MiB.
    pub cache_mb: usize,
    /// Write requests that may wait for the group-commit writer before appenders block.
    pub queue_depth: usize,
    /// Most operations folded into one transaction.
    pub max_batch_ops: usize,
    /// How often retention runs.
    #[serde(with = "humantime_serde_compat")]
    pub retention_interval: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Largest packet accepted from a client, in bytes; a bigger one closes the connection.
    pub max_packet_size: usize,
    /// QoS 1/2 deliveries in flight per subscriber before the server waits for acks.
    pub max_inflight: u16,
    /// Unacknowledged inbound publishes per connection before the server stops reading it.
    pub max_pending_acks: usize,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u64,
    /// When non-empty, clients must log in with one of these.
    pub users: Vec<UserSettings>,
    /// Allow clients without credentials even when `users` is set.
    pub allow_anonymous: bool,
    /// Subscribe ACL; empty means everyone may subscribe to everything.
    pub acl: Vec<AclSettings>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    pub username: String,
    pub password: String,
}

/// One ACL rule: `username` (or `"*"` for everyone, including anonymous clients) may
/// subscribe to filters contained in one of `subscribe`. `%u` and `%c` in a pattern stand for
/// the username and client id.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclSettings {
    #[serde(default = "star")]
    pub username: String,
    pub subscribe: Vec<String>,
}

fn star() -> String {
    "*".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub name: String,
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    #[serde(default = "default_rf")]
    pub replication_factor: u32,
    #[serde(default)]
    pub acks: Acks,
    /// Retention by age, e.g. "7d"; absent keeps records until `retention_bytes` applies.
    #[serde(default = "default_retention")]
    pub retention: Option<String>,
    pub retention_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// MQTT topic filter, e.g. `factory/+/temperature`.
    pub filter: String,
    /// Log topic the matching publishes go to.
    pub topic: String,
    /// Partition key template: `{topic}` (the MQTT topic), `{client_id}`, `{N}` (the Nth
    /// level of the MQTT topic, from 1) and literal text.
    #[serde(default = "default_key")]
    pub key: String,
}

impl TopicSettings {
    /// A topic with the default settings (8 partitions, RF 3, acks quorum, 7 days).
    pub fn defaults(name: &str) -> TopicSettings {
        TopicSettings {
            name: name.to_string(),
            partitions: default_partitions(),
            replication_factor: default_rf(),
            acks: Acks::Quorum,
            retention: default_retention(),
            retention_bytes: None,
        }
    }
}

fn default_partitions() -> u32 {
    8
}
fn default_rf() -> u32 {
    3
}
fn default_retention() -> Option<String> {
    Some("7d".into())
}
fn default_key() -> String {
    "{topic}".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: None,
            data_dir: PathBuf::from("./shoal-data"),
            mqtt_addr: ([0, 0, 0, 0], 1883).into(),
            http_addr: ([0, 0, 0, 0], 8080).into(),
            peer_addr: ([0, 0, 0, 0], 7070).into(),
            gossip_addr: ([0, 0, 0, 0], 7946).into(),
            seeds: Vec::new(),
            cluster: ClusterSettings::default(),
            storage: StorageSettings::default(),
            mqtt: MqttSettings::default(),
            topics: Vec::new(),
            routes: Vec::new(),
            api_token: None,
            consumers: ConsumerSettings::default(),
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            cache_mb: 32,
            queue_depth: 4096,
            max_batch_ops: 8192,
            retention_interval: Duration::from_secs(30),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            max_packet_size: 1 << 20,
            max_inflight: 100,
            max_pending_acks: 1024,
            connect_timeout_secs: 10,
            users: Vec::new(),
            allow_anonymous: false,
            acl: Vec::new(),
        }
    }
}

/// A configuration problem, with the setting it concerns.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Parses a TOML file.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Checks every setting and returns the topics to create at start-up (always including
    /// `telemetry`).
    pub fn validate(&self) -> Result<Vec<TopicConfig>, ConfigError> {
        // A record must fit one replication frame (16 MiB) with room to spare.
        if self.mqtt.max_packet_size < 64 || self.mqtt.max_packet_size > 8 << 20 {
            return Err(ConfigError(format!(
                "mqtt.max_packet_size = {} is outside 64 bytes ..= 8 MiB (records must fit a \
                 replication frame)",
                self.mqtt.max_packet_size
            )));
        }
        if self.mqtt.max_inflight == 0 || self.mqtt.max_pending_acks == 0 {
            return Err(ConfigError(
                "mqtt.max_inflight and mqtt.max_pending_acks must be at least 1".into(),
            ));
        }
        if self.storage.queue_depth == 0 || self.storage.max_batch_ops == 0 {
            return Err(ConfigError(
                "storage.queue_depth and storage.max_batch_ops must be at least 1".into(),
            ));
        }
        for seed in &self.seeds {
            let ok = seed
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(ConfigError(format!(
                    "seed {seed:?} is not HOST:PORT (the gossip address of a cluster member, e.g. 10.0.0.5:7946)"
                )));
            }
        }
        let c = &self.cluster;
        if c.cluster_id.is_empty() || c.cluster_id.len() > 64 {
            return Err(ConfigError(
                "cluster.cluster_id must be 1 to 64 characters".into(),
            ));
        }
        if c.gossip_interval < Duration::from_millis(10)
            || c.anti_entropy_interval < Duration::from_millis(50)
            || c.ack_timeout < Duration::from_millis(10)
        {
            return Err(ConfigError(
                "cluster: gossip_interval >= 10ms, anti_entropy_interval >= 50ms and \
                 ack_timeout >= 10ms are required"
                    .into(),
            ));
        }
        if c.phi_threshold.is_nan() || c.phi_threshold <= 0.0 {
            return Err(ConfigError("cluster.phi_threshold must be > 0".into()));
        }
        let mut topics: Vec<TopicConfig> = Vec::new();
        for t in &self.topics {
            validate_topic_name(&t.name, false)
                .map_err(|e| ConfigError(format!("[[topics]] {e}")))?;
            if topics.iter().any(|x| x.name == t.name) {
                return Err(ConfigError(format!(
                    "[[topics]] {:?} is declared twice",
                    t.name
                )));
            }
            topics.push(t.to_topic_config()?);
        }
        if !topics.iter().any(|t| t.name == DEFAULT_TOPIC) {
            topics.push(TopicSettings::defaults(DEFAULT_TOPIC).to_topic_config()?);
        }
        for r in &self.routes {
            if !crate::mqtt::topic::valid_filter(&r.filter) {
                return Err(ConfigError(format!(
                    "[[routes]] filter {:?} is not a valid MQTT topic filter",
                    r.filter
                )));
            }
            validate_topic_name(&r.topic, false)
                .map_err(|e| ConfigError(format!("[[routes]] {e}")))?;
            crate::route::KeyTemplate::parse(&r.key)
                .map_err(|e| ConfigError(format!("[[routes]] key {:?}: {e}", r.key)))?;
            if !topics.iter().any(|t| t.name == r.topic) {
                topics.push(TopicSettings::defaults(&r.topic).to_topic_config()?);
            }
        }
        for a in &self.mqtt.acl {
            for f in &a.subscribe {
                let probe = f.replace("%u", "u").replace("%c", "c");
                if !crate::mqtt::topic::valid_filter(&probe) {
                    return Err(ConfigError(format!(
                        "[[mqtt.acl]] pattern {f:?} is not a valid MQTT topic filter"
                    )));
                }
            }
        }
        Ok(topics)
    }
}

impl TopicSettings {
    fn to_topic_config(&self) -> Result<TopicConfig, ConfigError> {
        if self.partitions == 0 || self.partitions > 4096 {
            return Err(ConfigError(format!(
                "topic {:?}: partitions must be between 1 and 4096",
                self.name
            )));
        }
        if self.replication_factor == 0 {
            return Err(ConfigError(format!(
                "topic {:?}: replication_factor must be at least 1",
                self.name
            )));
        }
        let retention_ms = match &self.retention {
            None => None,
            Some(s) => Some(parse_duration(s).map_err(|e| {
                ConfigError(format!("topic {:?}: retention {s:?}: {e}", self.name))
            })?),
        }
        .map(|d| d.as_millis() as u64);
        Ok(TopicConfig {
            name: self.name.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            acks: self.acks,
            retention_ms,
            retention_bytes: self.retention_bytes,
            created_ms: now_ms(),
        })
    }
}

/// Parses "30s", "15m", "2h", "7d" (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Serde adapter for human-readable durations in TOML (`"30s"`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_create_telemetry() {
        let topics = Config::default().validate().unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!(topics[0].name, "telemetry");
        assert_eq!(topics[0].partitions, 8);
        assert_eq!(topics[0].replication_factor, 3);
        assert_eq!(topics[0].acks, Acks::Quorum);
    }

    #[test]
    fn full_file_parses() {
        let c = Config::from_toml(
            r#"
            data_dir = "/tmp/x"
            mqtt_addr = "127.0.0.1:1884"
            [storage]
            cache_mb = 16
            retention_interval = "5s"
            [mqtt]
            max_packet_size = 4096
            users = [{ username = "dev", password = "pw" }]
            [[mqtt.acl]]
            username = "dev"
            subscribe = ["devices/%c/#"]
            [[topics]]
            name = "temps"
            partitions = 4
            acks = "local"
            retention = "1h"
            [[routes]]
            filter = "factory/+/temp"
            topic = "temps"
            key = "{2}"
            "#,
        )
        .unwrap();
        let topics = c.validate().unwrap();
        assert_eq!(topics.len(), 2);
        assert_eq!(topics[0].retention_ms, Some(3_600_000));
        assert_eq!(c.storage.retention_interval, Duration::from_secs(5));
    }

    fn check_err(toml: &str, needle: &str) {
        let e = Config::from_toml(toml)
            .and_then(|c| c.validate().map(|_| c))
            .unwrap_err();
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        check_err("nope = 1", "unknown field");
        check_err("mqtt_addr = \"not an address\"", "mqtt_addr");
        check_err("[[routes]]\nfilter = \"a/#/b\"\ntopic = \"t\"", "a/#/b");
        check_err(
            "[[routes]]\nfilter = \"a\"\ntopic = \"t\"\nkey = \"{x}\"",
            "{x}",
        );
        check_err("[[topics]]\nname = \"_x\"", "reserved");
        check_err("[[topics]]\nname = \"t\"\nretention = \"soon\"", "soon");
        check_err("[mqtt]\nmax_packet_size = 1", "max_packet_size");
    }
}

#[cfg(test)]
mod readme {
    use super::*;

    /// The README's "every setting" TOML block parses and validates as documented.
    #[test]
    fn readme_config_block_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\ndata_dir").expect("the config block") + 8;
        let end = start + readme[start..].find("```").expect("its end");
        let c = Config::from_toml(&readme[start..end]).expect("parses");
        c.validate().expect("validates");
        assert_eq!(c.cluster.cluster_id, "shoal");
        assert_eq!(c.cluster.ack_timeout, Duration::from_secs(5));
    }
}
