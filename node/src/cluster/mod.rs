//! Cluster membership and placement: the chitchat driver that keeps this node's [`View`] of
//! the cluster, and the placement function (rendezvous hashing) every decision calls with
//! that view. See PROTOCOL.md.

pub mod membership;
pub mod placement;

pub use membership::{Membership, Peer, View};
