//! The Shoal node: an MQTT server whose every publish lands in a durable, partitioned log in
//! redb, with an HTTP API and a CLI to read it back. See ARCHITECTURE.md for the code map
//! and the data path.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod consumers;
pub mod metrics;
pub mod mqtt;
pub mod node;
pub mod replication;
pub mod route;
pub mod storage;
pub mod types;

pub use config::Config;
pub use node::Node;
