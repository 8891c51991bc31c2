//! Cluster membership and placement. Today: the member record and the placement function
//! (rendezvous hashing), a pure core the membership (chitchat) and replication drivers will
//! call on every membership change. A node runs alone until membership lands, so the live
//! set is this node. See PROTOCOL.md.

pub mod placement;

use serde::Serialize;

/// A cluster member as `GET /v1/cluster` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    pub node_id: String,
    pub origin: String,
    pub mqtt_addr: String,
    pub http_addr: String,
    pub version: String,
    pub live: bool,
}
