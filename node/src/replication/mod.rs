//! Replication between peers (PROTOCOL.md). Today: the versioned wire format and its
//! framing codec, with golden tests. The sans-IO core and the TCP drivers build on it.

pub mod core;
pub mod wire;
