//! Deterministic multi-node simulation of the replication protocol (to be written).
