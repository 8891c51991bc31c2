//! Rendezvous (highest random weight) placement: the replicas of (topic, partition) are the
//! `R` live nodes with the highest score `xxh3_64(node_id 0x00 topic 0x00 partition_be32)`,
//! ties broken by node id; rank 0 is the partition's owner. The function is pure, so every
//! node computes the same placement from the same membership, and a node joining or leaving
//! moves only the partitions it must: a joining node enters a replica set only where it
//! outranks a member, and a leaving node's place is taken by the next-ranked node. Golden
//! vectors below pin the hash: changing it would move data on upgrade.

use std::collections::BTreeMap;

/// A node's name in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn new(s: &str) -> NodeId {
        NodeId(s.to_string())
    }
}

/// The placement score of `node` for (topic, partition).
pub fn score(node: &NodeId, topic: &str, partition: u32) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(node.0.as_bytes());
    h.update(&[0]);
    h.update(topic.as_bytes());
    h.update(&[0]);
    h.update(&partition.to_be_bytes());
    h.digest()
}

/// The replicas of (topic, partition) among `live`, best first (`[0]` is the owner); at
/// most `rf`, fewer when fewer nodes are live.
pub fn replicas(live: &[NodeId], topic: &str, partition: u32, rf: u32) -> Vec<NodeId> {
    let mut ranked: Vec<(u64, &NodeId)> = live
        .iter()
        .map(|n| (score(n, topic, partition), n))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked
        .into_iter()
        .take(rf as usize)
        .map(|(_, n)| n.clone())
        .collect()
}

/// Replica sets of every partition of a set of topics: (topic, partition) -> replicas.
pub type Placement = BTreeMap<(String, u32), Vec<NodeId>>;

/// Placement of `topics` (name, partitions, rf) over `live`.
pub fn place(live: &[NodeId], topics: &[(String, u32, u32)]) -> Placement {
    let mut out = Placement::new();
    for (t, partitions, rf) in topics {
        for p in 0..*partitions {
            out.insert((t.clone(), p), replicas(live, t, p, *rf));
        }
    }
    out
}

/// One partition's change: (topic, partition), nodes that gain a copy, nodes that lose one.
pub type Move = ((String, u32), Vec<NodeId>, Vec<NodeId>);

/// What changes between two placements: per partition, the nodes that gain a copy and the
/// nodes that lose one (handoff deletes only after the new replicas hold everything).
pub fn moves(before: &Placement, after: &Placement) -> Vec<Move> {
    let mut out = Vec::new();
    for (key, new) in after {
        let old = before.get(key).cloned().unwrap_or_default();
        let gained: Vec<NodeId> = new.iter().filter(|n| !old.contains(n)).cloned().collect();
        let lost: Vec<NodeId> = old.iter().filter(|n| !new.contains(n)).cloned().collect();
        if !gained.is_empty() || !lost.is_empty() {
            out.push((key.clone(), gained, lost));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<NodeId> {
        (1..=n).map(|i| NodeId(format!("node-{i}"))).collect()
    }

    #[test]
    fn golden_scores_and_replicas() {
        // Pinned: these change only if the placement hash changes (a data-moving change).
        let got: Vec<u64> = [
            ("node-1", "telemetry", 0),
            ("node-2", "telemetry", 0),
            ("node-1", "telemetry", 7),
        ]
        .iter()
        .map(|(n, t, p)| score(&NodeId::new(n), t, *p) % 1_000_000)
        .collect();
        assert_eq!(got, GOLDEN_SCORES);
        let r: Vec<String> = replicas(&nodes(5), "telemetry", 3, 3)
            .into_iter()
            .map(|n| n.0)
            .collect();
        assert_eq!(r, GOLDEN_REPLICAS);
    }
    const GOLDEN_SCORES: [u64; 3] = [714192, 321753, 252946];
    const GOLDEN_REPLICAS: [&str; 3] = ["node-3", "node-2", "node-1"];

    #[test]
    fn capped_by_live_nodes_and_deterministic() {
        assert_eq!(replicas(&nodes(2), "t", 0, 3).len(), 2);
        assert!(replicas(&[], "t", 0, 3).is_empty());
        let mut shuffled = nodes(5);
        shuffled.reverse();
        assert_eq!(
            replicas(&nodes(5), "t", 1, 3),
            replicas(&shuffled, "t", 1, 3)
        );
    }

    #[test]
    fn a_join_moves_only_what_it_must() {
        let topics = vec![("telemetry".to_string(), 64, 3)];
        let before = place(&nodes(4), &topics);
        let after = place(&nodes(5), &topics);
        let newcomer = NodeId::new("node-5");
        for (key, gained, lost) in moves(&before, &after) {
            // Only the newcomer gains, and it displaces exactly one old replica.
            assert_eq!(gained, vec![newcomer.clone()], "{key:?}");
            assert_eq!(lost.len(), 1, "{key:?}");
        }
        // About R/N of the partitions move (3/5 of 64 ≈ 38), not all of them.
        let moved = moves(&before, &after).len();
        assert!((20..=55).contains(&moved), "{moved} of 64 moved");
    }

    #[test]
    fn a_leave_moves_only_the_leavers_partitions() {
        let topics = vec![("telemetry".to_string(), 64, 3)];
        let before = place(&nodes(5), &topics);
        let live: Vec<NodeId> = nodes(5).into_iter().filter(|n| n.0 != "node-3").collect();
        let after = place(&live, &topics);
        for (key, gained, lost) in moves(&before, &after) {
            assert_eq!(lost, vec![NodeId::new("node-3")], "{key:?}");
            assert_eq!(gained.len(), 1, "{key:?}");
            // The surviving replicas keep their relative order (owners change only where
            // the owner left).
            let old: Vec<&NodeId> = before[&key].iter().filter(|n| n.0 != "node-3").collect();
            let new: Vec<&NodeId> = after[&key].iter().filter(|n| old.contains(n)).collect();
            assert_eq!(old, new, "{key:?}");
        }
    }

    #[test]
    fn owners_spread_over_nodes() {
        let topics = vec![("telemetry".to_string(), 256, 3)];
        let placement = place(&nodes(4), &topics);
        let mut owners: BTreeMap<NodeId, usize> = BTreeMap::new();
        for r in placement.values() {
            *owners.entry(r[0].clone()).or_default() += 1;
        }
        for (n, c) in owners {
            assert!((32..=96).contains(&c), "{n:?} owns {c} of 256");
        }
    }
}
