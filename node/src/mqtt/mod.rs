//! The MQTT 3.1.1 server: rumqttc's packet codec on the server side ([`codec`]), topic rules
//! ([`topic`]), the shared broker state and accept loop ([`broker`]), one task per connection
//! ([`connection`]) and the sans-IO delivery core of a session ([`outbox`]).
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod connection;
pub mod outbox;
pub mod topic;

pub use broker::{Broker, serve};
