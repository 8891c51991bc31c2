//! Cluster membership and placement. Today: the placement function (rendezvous hashing),
//! a pure sans-IO core the membership (chitchat) and replication drivers will call on every
//! membership change. See PROTOCOL.md.

pub mod placement;
