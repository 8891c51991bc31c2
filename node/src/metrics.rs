//! Process-wide Prometheus metrics, served as text at `GET /metrics`. Counters are global
//! atomics so the hot paths (append, MQTT ack) pay one atomic add, not a lookup.

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    pub storage_commits: Counter,
    pub storage_records_appended: Counter,
    pub storage_records_trimmed: Counter,
    pub storage_errors: Counter,
    pub storage_commit_seconds: Histogram,
    pub mqtt_connections: Gauge,
    pub mqtt_connections_total: Counter,
    pub mqtt_publish_received: Counter,
    pub mqtt_publish_sent: Counter,
    pub mqtt_protocol_errors: Counter,
    pub mqtt_ack_seconds: Histogram,
    pub http_ingested_records: Counter,
    pub consumer_records_in: Family<ConsumerLabel, Counter>,
    pub consumer_alerts_out: Family<ConsumerLabel, Counter>,
    pub consumer_errors: Family<ConsumerLabel, Counter>,
    pub consumer_dead_lettered: Family<ConsumerLabel, Counter>,
    /// Wall-clock seconds spent inside the module (calls, including instantiation).
    pub consumer_busy_seconds: Family<ConsumerLabel, Counter<f64>>,
    pub consumer_lag: Family<ConsumerLabel, Gauge>,
    pub webhook_deliveries: Counter,
    pub webhook_failures: Counter,
    pub anti_entropy_rounds: Counter,
    pub replication_records_sent: Counter,
    pub replication_records_received: Counter,
    pub replication_records_pushed: Counter,
    pub replication_ack_timeouts: Counter,
    pub replication_handoff_records: Counter,
}

/// The `consumer` label of per-consumer metrics.
pub type ConsumerLabel = Vec<(String, String)>;

/// The label set of one consumer.
pub fn consumer_label(name: &str) -> ConsumerLabel {
    vec![("consumer".to_string(), name.to_string())]
}

/// The node's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let m = Metrics {
            storage_commits: Counter::default(),
            storage_records_appended: Counter::default(),
            storage_records_trimmed: Counter::default(),
            storage_errors: Counter::default(),
            storage_commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            mqtt_connections: Gauge::default(),
            mqtt_connections_total: Counter::default(),
            mqtt_publish_received: Counter::default(),
            mqtt_publish_sent: Counter::default(),
            mqtt_protocol_errors: Counter::default(),
            mqtt_ack_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            http_ingested_records: Counter::default(),
            consumer_records_in: Family::default(),
            consumer_alerts_out: Family::default(),
            consumer_errors: Family::default(),
            consumer_dead_lettered: Family::default(),
            consumer_busy_seconds: Family::default(),
            consumer_lag: Family::default(),
            webhook_deliveries: Counter::default(),
            webhook_failures: Counter::default(),
            anti_entropy_rounds: Counter::default(),
            replication_records_sent: Counter::default(),
            replication_records_received: Counter::default(),
            replication_records_pushed: Counter::default(),
            replication_ack_timeouts: Counter::default(),
            replication_handoff_records: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "anti_entropy_rounds",
            "Anti-entropy rounds run (periodic and on membership changes)",
            m.anti_entropy_rounds.clone(),
        );
        registry.register(
            "replication_records_sent",
            "Records sent to peers (live, resends and anti-entropy pushes)",
            m.replication_records_sent.clone(),
        );
        registry.register(
            "replication_records_received",
            "Records received from peers (before deduplication)",
            m.replication_records_received.clone(),
        );
        registry.register(
            "replication_records_pushed",
            "Records sent by resends and anti-entropy pushes",
            m.replication_records_pushed.clone(),
        );
        registry.register(
            "replication_ack_timeouts",
            "Client writes refused because the acks policy was not met in time",
            m.replication_ack_timeouts.clone(),
        );
        registry.register(
            "replication_handoff_records",
            "Records dropped after handoff to the current replicas",
            m.replication_handoff_records.clone(),
        );
        registry.register(
            "storage_commits",
            "Write transactions committed (each one fsync)",
            m.storage_commits.clone(),
        );
        registry.register(
            "storage_records_appended",
            "Records appended to partition logs",
            m.storage_records_appended.clone(),
        );
        registry.register(
            "storage_records_trimmed",
            "Records deleted by retention",
            m.storage_records_trimmed.clone(),
        );
        registry.register(
            "storage_errors",
            "Failed commits (the writer stops after one)",
            m.storage_errors.clone(),
        );
        registry.register(
            "storage_commit_seconds",
            "Time to apply and commit one group of writes",
            m.storage_commit_seconds.clone(),
        );
        registry.register(
            "mqtt_connections",
            "Open MQTT connections",
            m.mqtt_connections.clone(),
        );
        registry.register(
            "mqtt_connections_accepted",
            "MQTT connections accepted since start",
            m.mqtt_connections_total.clone(),
        );
        registry.register(
            "mqtt_publish_received",
            "PUBLISH packets received from clients",
            m.mqtt_publish_received.clone(),
        );
        registry.register(
            "mqtt_publish_sent",
            "PUBLISH packets delivered to subscribers",
            m.mqtt_publish_sent.clone(),
        );
        registry.register(
            "mqtt_protocol_errors",
            "Connections closed for a protocol violation or malformed packet",
            m.mqtt_protocol_errors.clone(),
        );
        registry.register(
            "mqtt_ack_seconds",
            "Time from receiving a QoS 1/2 PUBLISH to sending its PUBACK/PUBREC",
            m.mqtt_ack_seconds.clone(),
        );
        registry.register(
            "http_ingested_records",
            "Records written through the HTTP bulk ingest API",
            m.http_ingested_records.clone(),
        );
        registry.register(
            "consumer_records_in",
            "Records handed to WebAssembly consumers",
            m.consumer_records_in.clone(),
        );
        registry.register(
            "consumer_alerts_out",
            "Alerts raised by consumers",
            m.consumer_alerts_out.clone(),
        );
        registry.register(
            "consumer_errors",
            "Failed consumer batches (traps, timeouts, bad output)",
            m.consumer_errors.clone(),
        );
        registry.register(
            "consumer_dead_lettered",
            "Records a consumer failed on every try, sent to _dlq",
            m.consumer_dead_lettered.clone(),
        );
        registry.register(
            "consumer_busy_seconds",
            "Time spent running the consumer's module",
            m.consumer_busy_seconds.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records not yet processed, summed over the consumer's partitions",
            m.consumer_lag.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Alerts delivered to webhooks",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "webhook_failures",
            "Failed webhook attempts (retried)",
            m.webhook_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
