//! The sans-IO replication core (PROTOCOL.md I3-I6): pure decisions and plain state
//! machines. No sockets, no redb, no clock: the drivers own those, and the simulations
//! (`sim.rs`, and the single-link test below) run the same decisions over a simulated
//! network.
//!
//! - [`accept`] (I3): a replica takes `seq == vv[origin] + 1`, ignores `seq <= vv[origin]`
//!   and reports a gap otherwise. The storage writer calls it inside the transaction that
//!   appends replicated records.
//! - [`lacks`], [`missing`], [`digest`]: anti-entropy comparisons (I5); [`handoff_covered`]:
//!   what a non-replica may drop (I6).
//! - [`AckTracker`] and [`required`]: when a client write may be acknowledged under the
//!   topic's acks policy, counting only durable copies on the partition's replicas (I4).
//! - [`Receiver`] and [`Sender`]: one peer stream in memory, for the single-link lossy
//!   simulation. The TCP driver keeps no per-record send buffer: it resends from the log,
//!   which already holds every record (`peer.rs`).

use std::collections::{BTreeMap, VecDeque};

use super::wire::WireRecord;
use crate::storage::Acks;

/// A stream of one origin's records for one partition.
pub type StreamKey = (String, u32, u64);

/// Version vector: origin -> highest contiguous seq, sorted by origin.
pub type Vv = Vec<(u64, u64)>;

/// The highest contiguous seq of `origin` in a sorted version vector (0 when absent).
pub fn vv_get(vv: &[(u64, u64)], origin: u64) -> u64 {
    vv.binary_search_by_key(&origin, |(o, _)| *o)
        .map(|i| vv[i].1)
        .unwrap_or(0)
}

/// Sets `origin`'s entry of a sorted version vector.
pub fn vv_set(vv: &mut Vv, origin: u64, seq: u64) {
    match vv.binary_search_by_key(&origin, |(o, _)| *o) {
        Ok(i) => vv[i].1 = seq,
        Err(i) => vv.insert(i, (origin, seq)),
    }
}

/// What a replica does with one replicated record (I3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// The next seq of its origin: append it (the version vector was advanced).
    Store,
    /// Already held: ignore it.
    Duplicate,
    /// Records before it are missing: report `have = vv[origin]`.
    Gap,
}

/// I3 on a replica's version vector: the storage writer calls this for every replicated
/// record inside the transaction that appends it.
pub fn accept(vv: &mut Vv, origin: u64, seq: u64) -> Accept {
    let hw = vv_get(vv, origin);
    if seq <= hw {
        Accept::Duplicate
    } else if seq == hw + 1 {
        vv_set(vv, origin, seq);
        Accept::Store
    } else {
        Accept::Gap
    }
}

/// `have` lacks something `mine` holds (anti-entropy: push when the peer is a replica).
pub fn lacks(have: &[(u64, u64)], mine: &[(u64, u64)]) -> bool {
    mine.iter().any(|(o, s)| *s > vv_get(have, *o))
}

/// A record `(origin, seq)` is one a peer with version vector `have` lacks.
pub fn missing(have: &[(u64, u64)], origin: u64, seq: u64) -> bool {
    seq > vv_get(have, origin)
}

/// The order-independent content digest of a partition replica. Under I3 a replica holds
/// exactly the ids `(origin, 1..=vv[origin])` (less what retention deleted), so hashing the
/// sorted version vector identifies the set of record ids it holds.
pub fn digest(vv: &[(u64, u64)]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (o, s) in vv {
        h.update(&o.to_be_bytes());
        h.update(&s.to_be_bytes());
    }
    h.digest()
}

/// Handoff (I6): what a non-replica holding `mine` may delete, given what each current
/// replica is known to hold (`None`: not heard from yet, so nothing of it is covered).
/// Returns, per origin, the seq up to which every replica holds it (entries at 0 dropped).
pub fn handoff_covered(mine: &[(u64, u64)], replicas: &[Option<&Vv>]) -> Vv {
    if replicas.is_empty() {
        return Vv::new();
    }
    let mut covered: Vv = mine.to_vec();
    for theirs in replicas {
        for (o, seq) in covered.iter_mut() {
            *seq = (*seq).min(theirs.map_or(0, |v| vv_get(v, *o)));
        }
    }
    covered.retain(|(_, seq)| *seq > 0);
    covered
}

/// What the receiver decided about an `Append`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Records to append, in seq order (new and contiguous).
    pub store: Vec<WireRecord>,
    /// Set when records were missing: the sender must resend from `have + 1`.
    pub gap: Option<u64>,
}

/// Replica side: the highest contiguous seq held per stream (from the version vector).
#[derive(Debug, Default)]
pub struct Receiver {
    hw: BTreeMap<StreamKey, u64>,
}

impl Receiver {
    /// Starts from the version vectors already on disk.
    pub fn new(hw: BTreeMap<StreamKey, u64>) -> Receiver {
        Receiver { hw }
    }

    pub fn hw(&self, key: &StreamKey) -> u64 {
        self.hw.get(key).copied().unwrap_or(0)
    }

    /// An `Append` for one partition; records may be of several origins, each in seq order.
    pub fn on_append(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<WireRecord>,
    ) -> Vec<(u64, Received)> {
        let mut by_origin: BTreeMap<u64, Received> = BTreeMap::new();
        for r in records {
            let key = (topic.to_string(), partition, r.origin);
            let hw = self.hw.entry(key).or_insert(0);
            let out = by_origin.entry(r.origin).or_default();
            if out.gap.is_some() || r.seq <= *hw {
                continue; // duplicate, or past a gap already reported
            }
            if r.seq == *hw + 1 {
                *hw = r.seq;
                out.store.push(r);
            } else {
                out.gap = Some(*hw);
            }
        }
        by_origin.into_iter().collect()
    }
}

/// Coordinator side towards one replica, for one stream.
#[derive(Debug, Default)]
pub struct Sender {
    /// Sent (or to send) and not yet acknowledged, in seq order.
    unacked: VecDeque<WireRecord>,
    /// Highest seq the replica acknowledged as durable.
    pub acked: u64,
}

impl Sender {
    /// Queues a new record; returns it to send now.
    pub fn push(&mut self, r: WireRecord) -> WireRecord {
        self.unacked.push_back(r.clone());
        r
    }

    /// The replica acknowledged `seq` (durable): forget everything up to it.
    pub fn on_ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.unacked.front().is_some_and(|r| r.seq <= self.acked) {
            self.unacked.pop_front();
        }
    }

    /// The replica has only up to `have`: everything after it, to resend in order.
    pub fn on_gap(&mut self, have: u64) -> Vec<WireRecord> {
        self.on_ack(have);
        self.unacked.iter().cloned().collect()
    }

    /// Everything not acknowledged (resent after a reconnect).
    pub fn pending(&self) -> Vec<WireRecord> {
        self.unacked.iter().cloned().collect()
    }
}

/// Replicas that must hold a record durably before it is acknowledged, out of `r`.
pub fn required(acks: Acks, r: usize) -> usize {
    match acks {
        Acks::Local => 1,
        Acks::Quorum => r / 2 + 1,
        Acks::All => r,
    }
    .max(1)
}

/// A client write waiting for durable copies on its partition's replicas.
#[derive(Debug)]
struct Waiting<T> {
    seq: u64,
    needed: usize,
    /// The replicas when the write was made: only their copies count (a coordinator that
    /// is not a replica holds a hint, not a copy).
    replicas: Vec<String>,
    waiter: T,
}

/// Tracks client writes waiting for enough durable copies (I4).
#[derive(Debug, Default)]
pub struct AckTracker<T> {
    /// stream -> waiting writes, in seq order.
    waiting: BTreeMap<StreamKey, VecDeque<Waiting<T>>>,
    /// stream -> per node the highest seq it holds durably.
    durable: BTreeMap<StreamKey, BTreeMap<String, u64>>,
}

impl<T> AckTracker<T> {
    pub fn new() -> AckTracker<T> {
        AckTracker {
            waiting: BTreeMap::new(),
            durable: BTreeMap::new(),
        }
    }

    fn copies(durable: Option<&BTreeMap<String, u64>>, w: &Waiting<T>) -> usize {
        durable.map_or(0, |d| {
            w.replicas
                .iter()
                .filter(|r| d.get(*r).is_some_and(|&h| h >= w.seq))
                .count()
        })
    }

    /// A write of `seq` waits for `needed` durable copies among `replicas`. Returns the
    /// waiter at once when that is already so.
    pub fn wait(
        &mut self,
        key: StreamKey,
        seq: u64,
        needed: usize,
        replicas: Vec<String>,
        waiter: T,
    ) -> Option<T> {
        let w = Waiting {
            seq,
            needed,
            replicas,
            waiter,
        };
        if Self::copies(self.durable.get(&key), &w) >= needed {
            return Some(w.waiter);
        }
        self.waiting.entry(key).or_default().push_back(w);
        None
    }

    /// `node` now holds the stream durably up to `seq`; returns the waiters now satisfied.
    pub fn on_durable(&mut self, key: &StreamKey, node: &str, seq: u64) -> Vec<T> {
        let d = self.durable.entry(key.clone()).or_default();
        let e = d.entry(node.to_string()).or_insert(0);
        *e = (*e).max(seq);
        let d = self.durable.get(key);
        let mut done = Vec::new();
        if let Some(q) = self.waiting.get_mut(key) {
            // Waiters of one stream may need different replica sets (membership changed
            // between them), so each is checked; most are satisfied from the front.
            let mut i = 0;
            while i < q.len() {
                if Self::copies(d, &q[i]) >= q[i].needed {
                    if let Some(w) = q.remove(i) {
                        done.push(w.waiter);
                    }
                } else if q[i].seq > seq {
                    break;
                } else {
                    i += 1;
                }
            }
            if q.is_empty() {
                self.waiting.remove(key);
            }
        }
        done
    }

    /// Drops waiters `keep` rejects (e.g. whose client gave up after the ack timeout).
    pub fn sweep(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.waiting.retain(|_, q| {
            q.retain(|w| keep(&w.waiter));
            !q.is_empty()
        });
    }

    /// Forgets what a node held (it restarted with a new generation or left).
    pub fn forget(&mut self, node: &str) {
        for d in self.durable.values_mut() {
            d.remove(node);
        }
    }

    /// Writes still waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(|q| q.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn rec(origin: u64, seq: u64) -> WireRecord {
        WireRecord {
            origin,
            seq,
            event_time_ms: 0,
            ingest_time_ms: 0,
            key: Bytes::new(),
            subject: String::new(),
            payload: Bytes::from(format!("{origin}-{seq}")),
            headers: vec![],
        }
    }

    fn seqs(r: &Received) -> Vec<u64> {
        r.store.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn i3_accepts_next_ignores_duplicates_reports_gaps() {
        let mut rx = Receiver::default();
        let out = rx.on_append(
            "t",
            0,
            vec![rec(1, 1), rec(1, 2), rec(1, 2), rec(1, 4), rec(1, 5)],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(seqs(&out[0].1), vec![1, 2]);
        assert_eq!(out[0].1.gap, Some(2));
        let out = rx.on_append("t", 0, vec![rec(1, 1), rec(1, 3), rec(1, 4)]);
        assert_eq!(seqs(&out[0].1), vec![3, 4]);
        assert_eq!(out[0].1.gap, None);
        // Origins are independent streams.
        let out = rx.on_append("t", 0, vec![rec(2, 1), rec(1, 5)]);
        assert_eq!(out.len(), 2);
        assert_eq!(rx.hw(&("t".into(), 0, 1)), 5);
        assert_eq!(rx.hw(&("t".into(), 0, 2)), 1);
    }

    #[test]
    fn sender_forgets_acked_and_resends_after_a_gap() {
        let mut tx = Sender::default();
        for s in 1..=5 {
            tx.push(rec(1, s));
        }
        tx.on_ack(2);
        assert_eq!(
            tx.pending().iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(
            tx.on_gap(3).iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        tx.on_ack(1); // a stale ack does not move backwards
        assert_eq!(tx.acked, 3);
    }

    #[test]
    fn i4_quorum_and_all_count_durable_copies_only() {
        assert_eq!(
            (
                required(Acks::Local, 3),
                required(Acks::Quorum, 3),
                required(Acks::All, 3)
            ),
            (1, 2, 3)
        );
        assert_eq!(required(Acks::Quorum, 1), 1);
        let key: StreamKey = ("t".into(), 0, 1);
        let mut t = AckTracker::new();
        let abc = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert!(t.wait(key.clone(), 1, 2, abc(), "w1").is_none());
        assert!(t.wait(key.clone(), 2, 2, abc(), "w2").is_none());
        assert!(
            t.on_durable(&key, "a", 2).is_empty(),
            "one copy is not a quorum"
        );
        assert!(
            t.on_durable(&key, "x", 2).is_empty(),
            "a non-replica's copy (a hint) does not count"
        );
        assert_eq!(t.on_durable(&key, "b", 1), vec!["w1"]);
        assert_eq!(t.on_durable(&key, "b", 2), vec!["w2"]);
        assert_eq!(
            t.wait(key.clone(), 2, 2, abc(), "w3"),
            Some("w3"),
            "already durable on a quorum: answered at once"
        );
        assert!(t.wait(key.clone(), 3, 3, abc(), "w4").is_none());
        t.sweep(|w| *w != "w4");
        assert_eq!(t.waiting(), 0);
    }

    /// A seeded simulation: a sender streams 200 records to a replica over a link that
    /// drops, duplicates and reorders frames; acks and gap reports travel back over the same
    /// bad link; the sender resends on gaps and timeouts. Whatever the seed, the replica ends
    /// with every record exactly once, in seq order (I3).
    #[test]
    fn i3_converges_over_a_lossy_reordering_link() {
        for seed in 0..200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut tx = Sender::default();
            let mut rx = Receiver::default();
            let mut stored: Vec<u64> = Vec::new();
            let mut to_replica: Vec<WireRecord> = Vec::new();
            let mut to_sender: Vec<(bool, u64)> = Vec::new(); // (is_gap, seq)
            let mut sent = 0u64;
            for _round in 0..2_000 {
                for _ in 0..4 {
                    if sent < 200 {
                        sent += 1;
                        to_replica.push(tx.push(rec(1, sent)));
                    }
                }
                // The link delivers everything in flight this round, in random order,
                // dropping 20% and duplicating 10%.
                let mut frames = std::mem::take(&mut to_replica);
                while !frames.is_empty() {
                    let i = (next() as usize) % frames.len();
                    let r = frames.swap_remove(i);
                    if next() % 10 < 2 {
                        continue;
                    }
                    if next() % 10 == 0 {
                        frames.push(r.clone());
                    }
                    for (_, got) in rx.on_append("t", 0, vec![r]) {
                        stored.extend(got.store.iter().map(|r| r.seq));
                        to_sender.push((false, rx.hw(&("t".into(), 0, 1))));
                        if let Some(have) = got.gap {
                            to_sender.push((true, have));
                        }
                    }
                }
                let mut replies = std::mem::take(&mut to_sender);
                let mut resend = false;
                while !replies.is_empty() {
                    let i = (next() as usize) % replies.len();
                    let (gap, s) = replies.swap_remove(i);
                    if next() % 10 < 2 {
                        continue;
                    }
                    // A gap report also says how far the replica is: it acknowledges `have`.
                    tx.on_ack(s);
                    resend |= gap;
                }
                if sent == 200 && tx.acked == 200 {
                    break;
                }
                // One resend per round after a gap report, or when the replica went quiet
                // (a timeout): everything not yet acknowledged, in order.
                if resend || (sent == 200 && to_replica.is_empty()) {
                    to_replica.extend(tx.pending());
                }
            }
            assert_eq!(stored, (1..=200).collect::<Vec<_>>(), "seed {seed}");
            assert_eq!(tx.acked, 200, "seed {seed}");
        }
    }
}
