//! Deterministic, seeded simulation of the replication protocol over several nodes
//! (PROTOCOL.md I3-I6), with plain data structures: no async, no sockets, no clock.
//!
//! What is simulated, per seed:
//! - 3 to 5 nodes, one topic with 1 or 2 partitions, replication factor 3, acks policy
//!   `quorum` (`required(Acks::Quorum, min(R, members))`, as `View::required` computes it).
//!   Sometimes one node joins the cluster late, so partitions move to it.
//! - Durable state per node and partition: the log (record ids `(origin, seq)` in append
//!   order), the version vector, and the origin the node writes new records under (its
//!   data directory's, until a handoff drops that stream); per node, every origin it ever
//!   wrote under (`Storage::is_own`). Volatile state: the [`AckTracker`] of pending client
//!   writes, the peers' version vectors last heard, and the per-connection "gap already
//!   answered" bookkeeping. A crash loses the volatile state and every message in flight
//!   to or from the node; a restart keeps the durable state.
//! - Membership: a node's view is itself plus the nodes that are up and reachable from it;
//!   it changes at once when a fault changes. Placement is [`placement::replicas`] over the
//!   view. A view change does what the supervisor in `replication/mod.rs` does: forget the
//!   peers that left (acks, version vectors, gap bookkeeping), compare digests with new
//!   peers (`round_for`), and run an anti-entropy round.
//! - The drivers' decisions, reusing the sans-IO core (`accept`, `lacks`, `missing`,
//!   `handoff_covered`, `AckTracker`): a client write makes its node the coordinator, which
//!   appends `(origin, vv[origin] + 1)` under its current origin of the partition to its own
//!   log (a hint when it is not a replica), streams it to the other replicas of its view and
//!   waits for a quorum of durable copies among those replicas (the [`AckTracker`] keyed by
//!   the record's origin, as `Replication::wait` does). A receiver stores an `Append` through
//!   `accept` (what the storage writer does for `Op::Replicate`) and answers per origin
//!   `Ack { vv[origin] }`, or `Gap { have }` on a gap; the sender then resends that origin's
//!   records after `have` from its log. Records a node stores of one of its own (old)
//!   origins go on its live stream too. Acks of any origin a node ever wrote under release
//!   its waiters. Anti-entropy rounds send digests to the replicas of each partition a node
//!   replicates or holds; a receiver first counts every entry of the peer's version vector
//!   as that peer's durable ack (`Shared::on_digest`, so acks lost with a connection are
//!   recovered), remembers the peer's version vector, replies with its own digest and
//!   pushes what the peer lacks when the peer is a replica in its view. A node holding a
//!   partition it does not replicate drops origins all or nothing (`Op::DropCovered`): an
//!   origin whose version vector entry every replica covers (`handoff_covered`) loses all
//!   its records and its entry, others keep everything; when the node's own current origin
//!   goes, new records of the partition go under a fresh random origin, from seq 1.
//! - The network is a queue of messages, each with its delivery step. During the fault
//!   phase, seeded faults: message drops, extra delays (so reordering), duplicates, cut
//!   links, isolated nodes, crashes and restarts, a late join.
//!
//! What is checked:
//! - I4, at the moment a write is acknowledged: at least the quorum of nodes hold it in
//!   their durable log.
//! - I6, at the moment a node hands records off: each is still held by at least the quorum
//!   of nodes (the version vectors a handoff relies on may be stale, see
//!   [`Sim::check_still_held`]).
//! - After the heal (every fault repaired, crashed nodes restarted, in-flight messages
//!   drained), within 2 anti-entropy rounds: the replicas of each partition (placement over
//!   all nodes) have equal digests and each holds exactly the ids its version vector claims
//!   (I5); every acknowledged write, and every write stored at all, is on every replica
//!   exactly once.
//! - I3 on every node, at every anti-entropy tick and at the end: each origin's seqs appear
//!   in increasing, contiguous order from 1, without duplicates, and end at the version
//!   vector's entry, which lists no other origin: a version vector claims exactly the ids
//!   its node holds, which digest comparison and digests counted as acks rely on.
//! - I6 after further rounds: nodes that are not replicas hold no records of the partition
//!   and their version vector is empty.
//!
//! [`random_seeds`] runs many seeds; a failing seed is named in the assertion message and is
//! re-run alone with
//! `SHOAL_SIM_SEED=<seed> cargo test -p shoal --lib replication::sim::random_seeds`.
//! The focused tests below replay hand-written fault scripts. Two of them are regression
//! tests for protocol problems this simulation found, since fixed as modelled above: a
//! replica that handed its own records off and became a replica again never got them back
//! (its version vector still claimed them), and acks lost with a connection were never sent
//! again.

use std::collections::{BTreeMap, BTreeSet};

use super::core::{
    Accept, AckTracker, Vv, accept, digest, handoff_covered, lacks, missing, required, vv_get,
    vv_set,
};
use crate::cluster::placement::{self, NodeId};
use crate::storage::Acks;

const TOPIC: &str = "sim";
const RF: u32 = 3;
/// Seeds [`random_seeds`] runs when `SHOAL_SIM_SEED` does not name one.
const SEEDS: u64 = 400;
/// Steps a drain may take before the simulation declares a message storm (a resend loop).
const DRAIN_LIMIT: u64 = 10_000;

/// A record id: `(origin, seq)`.
type Id = (u64, u64);

/// xorshift64: small, deterministic, and good enough to draw faults.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Spread neighbouring seeds apart, and never start at 0 (xorshift's fixed point).
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n`; `n` must be positive.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// In `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick(&mut self, xs: &[usize]) -> Option<usize> {
        if xs.is_empty() {
            None
        } else {
            Some(xs[self.below(xs.len() as u64) as usize])
        }
    }
}

/// The replication frames the simulation needs (record payloads are left out: ids are
/// what the protocol compares).
#[derive(Clone, Debug)]
enum Msg {
    Append { records: Vec<Id> },
    Ack { origin: u64, seq: u64 },
    Gap { origin: u64, have: u64 },
    Digest { vv: Vv, is_reply: bool },
}

#[derive(Clone, Debug)]
struct Envelope {
    from: usize,
    to: usize,
    partition: u32,
    msg: Msg,
}

/// How badly the network behaves: percentages of dropped and duplicated messages, and the
/// most steps a message may be delayed beyond the usual one (which reorders messages).
#[derive(Clone, Copy, Debug)]
struct Network {
    drop_pct: u64,
    dup_pct: u64,
    max_extra_delay: u64,
}

impl Network {
    const PERFECT: Network = Network {
        drop_pct: 0,
        dup_pct: 0,
        max_extra_delay: 0,
    };
}

/// A client waiting for its write to be acknowledged.
#[derive(Debug)]
struct Waiter {
    /// The write's id: the origin is the one it was written under, which may no longer be
    /// the node's current origin of the partition when it is acknowledged.
    origin: u64,
    seq: u64,
    /// Durable copies the write needs (fixed when it was made).
    needed: usize,
    /// The step after which the client gives up (the ack timeout).
    deadline: u64,
}

/// One partition on one node: durable.
#[derive(Clone, Debug, Default)]
struct Replica {
    log: Vec<Id>,
    vv: Vv,
}

struct Node {
    name: String,
    /// Durable, per partition: the origin new records are written under (the data
    /// directory's origin, until a handoff drops that stream and a fresh one replaces it).
    origins: Vec<u64>,
    /// Durable: every origin this node writes or wrote under (`Storage::is_own`).
    owned: BTreeSet<u64>,
    /// A member of the cluster (a late joiner is not, until it joins).
    joined: bool,
    up: bool,
    /// Durable, per partition.
    parts: Vec<Replica>,
    /// Volatile from here on: lost by a crash.
    acks: AckTracker<Waiter>,
    /// What each peer last said it holds, by (peer, partition).
    peer_vvs: BTreeMap<(usize, u32), Vv>,
    /// The last `have` answered per (peer, partition, origin): a gap reported again with
    /// the same `have` was caused by frames sent before the resend, so it is not resent
    /// twice (as `peer::session` does, per connection).
    handled_gaps: BTreeMap<(usize, u32, u64), u64>,
    /// The live set this node last acted on (sorted; empty while down).
    view: Vec<usize>,
}

impl Node {
    fn is_own(&self, origin: u64) -> bool {
        self.owned.contains(&origin)
    }

    fn lose_volatile_state(&mut self) {
        self.acks = AckTracker::new();
        self.peer_vvs.clear();
        self.handled_gaps.clear();
        self.view.clear();
    }
}

/// Counters that show a run exercised the protocol (and were not vacuous).
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    writes: u64,
    acked: u64,
    timed_out: u64,
    messages: u64,
    lost: u64,
    gap_resends: u64,
    pushes: u64,
    handed_off: u64,
    /// Handoffs that dropped the node's own stream, so it moved to a fresh origin.
    fresh_origins: u64,
    /// Waiters released by a digest (their `Ack`s were lost or not sent yet).
    digest_acks: u64,
    crashes: u64,
    joins: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.writes += o.writes;
        self.acked += o.acked;
        self.timed_out += o.timed_out;
        self.messages += o.messages;
        self.lost += o.lost;
        self.gap_resends += o.gap_resends;
        self.pushes += o.pushes;
        self.handed_off += o.handed_off;
        self.fresh_origins += o.fresh_origins;
        self.digest_acks += o.digest_acks;
        self.crashes += o.crashes;
        self.joins += o.joins;
    }
}

struct Sim {
    seed: u64,
    scenario: &'static str,
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    partitions: u32,
    /// Cut links, as (lower index, higher index).
    cuts: BTreeSet<(usize, usize)>,
    isolated: BTreeSet<usize>,
    net: Network,
    /// In flight, by (delivery step, send order).
    queue: BTreeMap<(u64, u64), Envelope>,
    sent: u64,
    /// Steps a client waits for its ack.
    ack_timeout: u64,
    /// Every write a coordinator stored, and those acknowledged, by partition.
    written: BTreeSet<(u32, Id)>,
    acked: BTreeSet<(u32, Id)>,
    stats: Stats,
}

impl Sim {
    /// `n` nodes named `n0..`, all members and up except `pending`, which joins later.
    fn new(
        seed: u64,
        scenario: &'static str,
        n: usize,
        partitions: u32,
        pending: Option<usize>,
    ) -> Sim {
        let mut rng = Rng::new(seed);
        let mut origins = BTreeSet::new();
        let nodes = (0..n)
            .map(|i| {
                // Distinct origins, as random 64-bit ids are in practice.
                let mut origin = rng.next();
                while !origins.insert(origin) {
                    origin = rng.next();
                }
                Node {
                    name: format!("n{i}"),
                    origins: vec![origin; partitions as usize],
                    owned: BTreeSet::from([origin]),
                    joined: pending != Some(i),
                    up: pending != Some(i),
                    parts: vec![Replica::default(); partitions as usize],
                    acks: AckTracker::new(),
                    peer_vvs: BTreeMap::new(),
                    handled_gaps: BTreeMap::new(),
                    view: Vec::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            seed,
            scenario,
            rng,
            now: 0,
            nodes,
            partitions,
            cuts: BTreeSet::new(),
            isolated: BTreeSet::new(),
            net: Network::PERFECT,
            queue: BTreeMap::new(),
            sent: 0,
            ack_timeout: 1_000,
            written: BTreeSet::new(),
            acked: BTreeSet::new(),
            stats: Stats::default(),
        };
        sim.refresh_views();
        sim
    }

    /// Where we are, for assertion messages: the seed first, so a failure can be re-run.
    fn at(&self) -> String {
        format!("seed {} ({}, step {})", self.seed, self.scenario, self.now)
    }

    fn part(&self, i: usize, p: u32) -> &Replica {
        &self.nodes[i].parts[p as usize]
    }

    // --- Membership and placement -----------------------------------------------------

    /// `a` and `b` can talk: both up members, no cut between them, neither isolated.
    fn link_up(&self, a: usize, b: usize) -> bool {
        let alive = |i: usize| self.nodes[i].up && self.nodes[i].joined;
        alive(a)
            && alive(b)
            && (a == b
                || (!self.cuts.contains(&(a.min(b), a.max(b)))
                    && !self.isolated.contains(&a)
                    && !self.isolated.contains(&b)))
    }

    fn live_set(&self, i: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&j| self.link_up(i, j))
            .collect()
    }

    fn members(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].joined)
            .collect()
    }

    /// Durable copies a write needs: quorum over `min(R, members)` (`View::required`).
    fn needed(&self) -> usize {
        required(Acks::Quorum, (RF as usize).min(self.members().len().max(1)))
    }

    fn replicas_of(&self, view: &[usize], p: u32) -> Vec<usize> {
        let live: Vec<NodeId> = view
            .iter()
            .map(|&i| NodeId::new(&self.nodes[i].name))
            .collect();
        placement::replicas(&live, TOPIC, p, RF)
            .iter()
            .map(|n| {
                self.nodes
                    .iter()
                    .position(|node| node.name == n.0)
                    .expect("placement returns members of the view")
            })
            .collect()
    }

    /// Brings every node's view up to date with the faults, doing what the supervisor does
    /// on a membership change.
    fn refresh_views(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            let view = self.live_set(i);
            if view == self.nodes[i].view {
                continue;
            }
            let old = std::mem::replace(&mut self.nodes[i].view, view.clone());
            // A peer that left: its connection stops, and what it held is forgotten (it may
            // come back with other data, or hand off).
            for &gone in old.iter().filter(|g| !view.contains(g)) {
                let name = self.nodes[gone].name.clone();
                let node = &mut self.nodes[i];
                node.acks.forget(&name);
                node.peer_vvs.retain(|k, _| k.0 != gone);
                node.handled_gaps.retain(|k, _| k.0 != gone);
            }
            // A new connection compares digests of what the peer replicates right away
            // (`round_for`), and a membership change runs an anti-entropy round.
            for &new in view.iter().filter(|&&j| j != i && !old.contains(&j)) {
                self.round_for(i, new);
            }
            self.round(i);
        }
    }

    // --- Faults -------------------------------------------------------------------------

    /// Drops what is in flight between `a` and `b` (a broken connection loses it).
    fn purge_link(&mut self, a: usize, b: usize) {
        self.queue
            .retain(|_, e| !((e.from == a && e.to == b) || (e.from == b && e.to == a)));
    }

    fn cut(&mut self, a: usize, b: usize) {
        self.cuts.insert((a.min(b), a.max(b)));
        self.purge_link(a, b);
        self.refresh_views();
    }

    fn heal_link(&mut self, a: usize, b: usize) {
        self.cuts.remove(&(a.min(b), a.max(b)));
        self.refresh_views();
    }

    fn isolate(&mut self, i: usize) {
        self.isolated.insert(i);
        self.queue.retain(|_, e| e.from != i && e.to != i);
        self.refresh_views();
    }

    fn unisolate(&mut self, i: usize) {
        self.isolated.remove(&i);
        self.refresh_views();
    }

    fn crash(&mut self, i: usize) {
        self.nodes[i].up = false;
        self.nodes[i].lose_volatile_state();
        self.queue.retain(|_, e| e.from != i && e.to != i);
        self.stats.crashes += 1;
        self.refresh_views();
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i].up = true;
        self.refresh_views();
    }

    fn join(&mut self, i: usize) {
        self.nodes[i].joined = true;
        self.nodes[i].up = true;
        self.stats.joins += 1;
        self.refresh_views();
    }

    /// Repairs every fault: links, isolation, crashed nodes, pending joins, the network.
    fn heal_all(&mut self) {
        self.cuts.clear();
        self.isolated.clear();
        self.net = Network::PERFECT;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].joined {
                self.nodes[i].joined = true;
                self.stats.joins += 1;
            }
            self.nodes[i].up = true;
        }
        self.refresh_views();
    }

    fn random_fault(&mut self) {
        let n = self.nodes.len();
        let all: Vec<usize> = (0..n).collect();
        match self.rng.below(7) {
            0 => {
                let a = self.rng.below(n as u64) as usize;
                let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.cut(a, b);
            }
            1 => {
                let cuts: Vec<(usize, usize)> = self.cuts.iter().copied().collect();
                if !cuts.is_empty() {
                    let (a, b) = cuts[self.rng.below(cuts.len() as u64) as usize];
                    self.heal_link(a, b);
                }
            }
            2 => {
                if let Some(i) = self.rng.pick(&all) {
                    self.isolate(i);
                }
            }
            3 => {
                let isolated: Vec<usize> = self.isolated.iter().copied().collect();
                if let Some(i) = self.rng.pick(&isolated) {
                    self.unisolate(i);
                }
            }
            4 => {
                let up: Vec<usize> = all.iter().copied().filter(|&i| self.nodes[i].up).collect();
                // Keep one node up so clients have somewhere to write.
                if up.len() > 1
                    && let Some(i) = self.rng.pick(&up)
                {
                    self.crash(i);
                }
            }
            5 => {
                let down: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|&i| self.nodes[i].joined && !self.nodes[i].up)
                    .collect();
                if let Some(i) = self.rng.pick(&down) {
                    self.restart(i);
                }
            }
            _ => {
                let pending: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|&i| !self.nodes[i].joined)
                    .collect();
                if let Some(i) = self.rng.pick(&pending) {
                    self.join(i);
                }
            }
        }
    }

    // --- Network ------------------------------------------------------------------------

    fn send(&mut self, from: usize, to: usize, partition: u32, msg: Msg) {
        self.stats.messages += 1;
        if !self.link_up(from, to) || self.rng.percent(self.net.drop_pct) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.percent(self.net.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + 1 + self.rng.between(0, self.net.max_extra_delay);
            self.sent += 1;
            let e = Envelope {
                from,
                to,
                partition,
                msg: msg.clone(),
            };
            self.queue.insert((at, self.sent), e);
        }
    }

    /// One step: delivers what is due now, in (delivery step, send order) order.
    fn step(&mut self) {
        self.now += 1;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let e = entry.remove();
            self.deliver(e);
        }
    }

    fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step();
        }
    }

    /// Steps until nothing is in flight.
    fn drain(&mut self) {
        let start = self.now;
        while !self.queue.is_empty() {
            assert!(
                self.now - start < DRAIN_LIMIT,
                "{}: messages still in flight after {DRAIN_LIMIT} steps (a resend loop?)",
                self.at()
            );
            self.step();
        }
    }

    fn deliver(&mut self, e: Envelope) {
        if !self.link_up(e.from, e.to) {
            self.stats.lost += 1;
            return;
        }
        let (from, to, p) = (e.from, e.to, e.partition);
        match e.msg {
            Msg::Append { records } => self.on_append(to, from, p, records),
            Msg::Ack { origin, seq } => {
                self.on_ack(to, from, p, origin, seq);
            }
            Msg::Gap { origin, have } => self.on_gap(to, from, p, origin, have),
            Msg::Digest { vv, is_reply } => self.on_digest(to, from, p, vv, is_reply),
        }
    }

    // --- Coordinator and client ---------------------------------------------------------

    /// A client writes to node `i`, which coordinates: it stores the record under its
    /// current origin of the partition (in the partition log, or as a hint when not a
    /// replica), streams it to the other replicas of its view and waits for the acks policy
    /// (`Replication::wait`, keyed by the record's origin). Returns the record's id.
    fn write(&mut self, i: usize, p: u32) -> Id {
        assert!(
            self.nodes[i].up,
            "{}: write to a node that is down",
            self.at()
        );
        let origin = self.nodes[i].origins[p as usize];
        let part = &mut self.nodes[i].parts[p as usize];
        let seq = vv_get(&part.vv, origin) + 1;
        vv_set(&mut part.vv, origin, seq);
        part.log.push((origin, seq));
        self.written.insert((p, (origin, seq)));
        self.stats.writes += 1;

        let replicas = self.stream(i, p, vec![(origin, seq)]);
        let needed = self.needed();
        let names: Vec<String> = replicas
            .iter()
            .map(|&r| self.nodes[r].name.clone())
            .collect();
        let key = (TOPIC.to_string(), p, origin);
        let waiter = Waiter {
            origin,
            seq,
            needed,
            deadline: self.now + self.ack_timeout,
        };
        let node = &mut self.nodes[i];
        // The coordinator's own copy is durable now; it counts when it is a replica.
        let early = node.acks.on_durable(&key, &node.name, seq);
        // `Replication::wait` drops what this returns: a waiter released here would have
        // its client told "not replicated". It cannot happen (own copies are registered
        // before waiting), which this checks.
        assert!(
            early.is_empty(),
            "{}: I4: the coordinator's own copy released an earlier waiter, which Replication::wait would drop",
            self.at()
        );
        if let Some(w) = node.acks.wait(key, seq, needed, names, waiter) {
            self.acknowledge(i, p, w);
        }
        (origin, seq)
    }

    /// Node `i`'s live stream of records of its own origins, just committed (written by a
    /// client, or stored from a peer when it regains an old stream of its own): an
    /// `Append` to every other replica of its view (`peer::outbound`). Returns the
    /// replicas.
    fn stream(&mut self, i: usize, p: u32, records: Vec<Id>) -> Vec<usize> {
        let replicas = self.replicas_of(&self.nodes[i].view.clone(), p);
        if !records.is_empty() {
            for &r in replicas.iter().filter(|&&r| r != i) {
                self.send(
                    i,
                    r,
                    p,
                    Msg::Append {
                        records: records.clone(),
                    },
                );
            }
        }
        replicas
    }

    /// A client write to a random up member, of a random partition.
    fn random_write(&mut self) {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up && self.nodes[i].joined)
            .collect();
        if let Some(i) = self.rng.pick(&up) {
            let p = self.rng.below(u64::from(self.partitions)) as u32;
            self.write(i, p);
        }
    }

    /// The coordinator acknowledges a write to its client: I4 says enough nodes hold it
    /// durably at this moment.
    fn acknowledge(&mut self, coordinator: usize, p: u32, w: Waiter) {
        let id = (w.origin, w.seq);
        let holders: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.parts[p as usize].log.contains(&id))
            .map(|n| n.name.as_str())
            .collect();
        assert!(
            holders.len() >= w.needed,
            "{}: I4: write {id:?} of partition {p} acknowledged by {} while only {holders:?} hold it durably; it needs {}",
            self.at(),
            self.nodes[coordinator].name,
            w.needed
        );
        assert!(
            self.acked.insert((p, id)),
            "{}: I4: write {id:?} of partition {p} acknowledged twice",
            self.at()
        );
        self.stats.acked += 1;
    }

    // --- Receivers (peer.rs) ------------------------------------------------------------

    /// Inbound `Append`: the storage writer applies `accept` per record (`Op::Replicate`);
    /// after the commit, each origin of the frame is answered with `Ack` or `Gap`. Stored
    /// records of the node's own (old) origins are committed ones of its own streams, so
    /// its live stream sends them on too.
    fn on_append(&mut self, at: usize, from: usize, p: u32, records: Vec<Id>) {
        let node = &mut self.nodes[at];
        let part = &mut node.parts[p as usize];
        let mut origins: Vec<u64> = Vec::new();
        let mut gaps: Vec<u64> = Vec::new();
        let mut own: Vec<Id> = Vec::new();
        for (origin, seq) in records {
            if !origins.contains(&origin) {
                origins.push(origin);
            }
            match accept(&mut part.vv, origin, seq) {
                Accept::Store => {
                    part.log.push((origin, seq));
                    if node.owned.contains(&origin) {
                        own.push((origin, seq));
                    }
                }
                Accept::Duplicate => {}
                Accept::Gap => {
                    if !gaps.contains(&origin) {
                        gaps.push(origin);
                    }
                }
            }
        }
        let replies: Vec<Msg> = origins
            .into_iter()
            .map(|origin| {
                let seq = vv_get(&part.vv, origin);
                if gaps.contains(&origin) {
                    Msg::Gap { origin, have: seq }
                } else {
                    Msg::Ack { origin, seq }
                }
            })
            .collect();
        for m in replies {
            self.send(at, from, p, m);
        }
        self.stream(at, p, own);
    }

    /// `from` holds `origin` of partition `p` durably up to `seq` (`Shared::on_ack`): it
    /// matters for the streams of the node's own origins, current or old. Returns how many
    /// waiters it released.
    fn on_ack(&mut self, at: usize, from: usize, p: u32, origin: u64, seq: u64) -> u64 {
        if !self.nodes[at].is_own(origin) {
            return 0;
        }
        let key = (TOPIC.to_string(), p, origin);
        let name = self.nodes[from].name.clone();
        let done = self.nodes[at].acks.on_durable(&key, &name, seq);
        let released = done.len() as u64;
        for w in done {
            self.acknowledge(at, p, w);
        }
        released
    }

    /// A gap report: it also acknowledges `have`; the sender resends that origin's records
    /// after `have` from its log, once per distinct `have`.
    fn on_gap(&mut self, at: usize, from: usize, p: u32, origin: u64, have: u64) {
        self.on_ack(at, from, p, origin, have);
        if self.nodes[at].handled_gaps.insert((from, p, origin), have) == Some(have) {
            return;
        }
        let records: Vec<Id> = self
            .part(at, p)
            .log
            .iter()
            .copied()
            .filter(|&(o, s)| o == origin && s > have)
            .collect();
        self.stats.gap_resends += 1;
        if !records.is_empty() {
            self.send(at, from, p, Msg::Append { records });
        }
    }

    /// A digest: a request is answered with this node's digest; either way
    /// (`Shared::on_digest`) each entry of the peer's version vector counts as its durable
    /// ack of that origin (a version vector claims exactly what its node holds), so writes
    /// whose `Ack`s were lost are still acknowledged; then the peer's version vector is
    /// remembered, and what it lacks is pushed when it is a replica in this node's view.
    fn on_digest(&mut self, at: usize, from: usize, p: u32, vv: Vv, is_reply: bool) {
        if !is_reply {
            let mine = self.part(at, p).vv.clone();
            self.send(
                at,
                from,
                p,
                Msg::Digest {
                    vv: mine,
                    is_reply: true,
                },
            );
        }
        for &(origin, seq) in &vv {
            self.stats.digest_acks += self.on_ack(at, from, p, origin, seq);
        }
        self.nodes[at].peer_vvs.insert((from, p), vv.clone());
        let view = self.nodes[at].view.clone();
        if !self.replicas_of(&view, p).contains(&from) {
            return;
        }
        if lacks(&vv, &self.part(at, p).vv) {
            let records: Vec<Id> = self
                .part(at, p)
                .log
                .iter()
                .copied()
                .filter(|&(o, s)| missing(&vv, o, s))
                .collect();
            self.stats.pushes += 1;
            if !records.is_empty() {
                self.send(at, from, p, Msg::Append { records });
            }
        }
    }

    // --- Anti-entropy (mod.rs `round`) --------------------------------------------------

    /// Node `i` asks `peer` for a digest exchange of every partition `peer` replicates.
    fn round_for(&mut self, i: usize, peer: usize) {
        let view = self.nodes[i].view.clone();
        for p in 0..self.partitions {
            if self.replicas_of(&view, p).contains(&peer) {
                let vv = self.part(i, p).vv.clone();
                self.send(
                    i,
                    peer,
                    p,
                    Msg::Digest {
                        vv,
                        is_reply: false,
                    },
                );
            }
        }
    }

    /// One anti-entropy round of node `i`: digests of every partition it replicates or
    /// holds to the partition's other replicas, then handoff of what it holds but does
    /// not replicate: the origins every replica is known to hold entirely (I6). When its
    /// own current origin of the partition goes, new records go under a fresh one.
    fn round(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        let view = self.nodes[i].view.clone();
        for p in 0..self.partitions {
            let replicas = self.replicas_of(&view, p);
            let mine = replicas.contains(&i);
            let held = !self.part(i, p).log.is_empty();
            if !mine && !held {
                continue;
            }
            let vv = self.part(i, p).vv.clone();
            for &r in replicas.iter().filter(|&&r| r != i) {
                self.send(
                    i,
                    r,
                    p,
                    Msg::Digest {
                        vv: vv.clone(),
                        is_reply: false,
                    },
                );
            }
            if !mine && held && !replicas.is_empty() {
                let node = &mut self.nodes[i];
                let covered = {
                    let theirs: Vec<Option<&Vv>> = replicas
                        .iter()
                        .map(|&r| node.peer_vvs.get(&(r, p)))
                        .collect();
                    handoff_covered(&vv, &theirs)
                };
                if !covered.is_empty() {
                    let (gone, dropped) = drop_covered(&mut node.parts[p as usize], &covered);
                    self.stats.handed_off += dropped.len() as u64;
                    self.check_still_held(i, p, &dropped);
                    if gone.contains(&self.nodes[i].origins[p as usize]) {
                        let fresh = self.fresh_origin();
                        let node = &mut self.nodes[i];
                        node.origins[p as usize] = fresh;
                        node.owned.insert(fresh);
                        self.stats.fresh_origins += 1;
                    }
                }
            }
        }
    }

    /// A new random origin, distinct from every origin any node ever used (as random
    /// 64-bit ids are in practice).
    fn fresh_origin(&mut self) -> u64 {
        loop {
            let o = self.rng.next();
            if self.nodes.iter().all(|n| !n.owned.contains(&o)) {
                return o;
            }
        }
    }

    /// An anti-entropy tick on every up node; clients past their deadline give up first.
    fn anti_entropy(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                continue;
            }
            let now = self.now;
            let acks = &mut self.nodes[i].acks;
            let before = acks.waiting();
            acks.sweep(|w| w.deadline > now);
            self.stats.timed_out += (before - acks.waiting()) as u64;
            self.round(i);
        }
    }

    /// Heals everything, drains, and runs the checks of the end of a seed: I5 within two
    /// anti-entropy rounds, I6 after two more, I3 on every node throughout. (The heal is a
    /// membership change, so nodes whose view changed also ran a round of their own, as the
    /// supervisor does; one periodic round after it converges every seed today.)
    fn heal_and_check(&mut self) {
        self.heal_all();
        self.drain();
        for _ in 0..2 {
            self.anti_entropy();
            self.drain();
        }
        let all = self.members();
        self.check_converged(&all, "within 2 anti-entropy rounds after the heal");
        self.check_logs();
        for _ in 0..2 {
            self.anti_entropy();
            self.drain();
        }
        self.check_converged(&all, "after 4 anti-entropy rounds");
        self.check_handed_off(&all);
        self.check_logs();
    }

    // --- Checks -------------------------------------------------------------------------

    /// I5 over the replicas placed on `live`: equal digests; each replica holds exactly
    /// the ids its version vector claims; every write (acknowledged or not) is on each
    /// replica exactly once.
    fn check_converged(&self, live: &[usize], when: &str) {
        for p in 0..self.partitions {
            let replicas = self.replicas_of(live, p);
            let first = replicas[0];
            for &r in &replicas {
                assert_eq!(
                    digest(&self.part(r, p).vv),
                    digest(&self.part(first, p).vv),
                    "{}: I5: {when}, replicas {} and {} of partition {p} differ: {:?} vs {:?}",
                    self.at(),
                    self.nodes[first].name,
                    self.nodes[r].name,
                    self.part(first, p).vv,
                    self.part(r, p).vv,
                );
                let holds: BTreeSet<Id> = self.part(r, p).log.iter().copied().collect();
                let claims: BTreeSet<Id> = self
                    .part(r, p)
                    .vv
                    .iter()
                    .flat_map(|&(o, s)| (1..=s).map(move |s| (o, s)))
                    .collect();
                assert!(
                    holds == claims,
                    "{}: I5: {when}, replica {} of partition {p} holds other ids than its version vector {:?} claims: missing {:?}, extra {:?}",
                    self.at(),
                    self.nodes[r].name,
                    self.part(r, p).vv,
                    claims.difference(&holds).collect::<Vec<_>>(),
                    holds.difference(&claims).collect::<Vec<_>>(),
                );
                for (set, what) in [(&self.acked, "acknowledged"), (&self.written, "stored")] {
                    for &(_, id) in set.range((p, (0, 0))..=(p, (u64::MAX, u64::MAX))) {
                        let copies = self.part(r, p).log.iter().filter(|&&x| x == id).count();
                        assert_eq!(
                            copies,
                            1,
                            "{}: I5: {when}, {what} write {id:?} of partition {p} is held {copies} times by replica {} (no {what} write may be lost)",
                            self.at(),
                            self.nodes[r].name,
                        );
                    }
                }
            }
        }
    }

    /// I6: nodes that are not replicas (placement over `live`) hold nothing of the
    /// partition, and their version vector is empty (handoff drops whole origins, the
    /// node's own included).
    fn check_handed_off(&self, live: &[usize]) {
        for p in 0..self.partitions {
            let replicas = self.replicas_of(live, p);
            for i in (0..self.nodes.len()).filter(|i| !replicas.contains(i)) {
                let part = self.part(i, p);
                assert!(
                    part.log.is_empty(),
                    "{}: I6: {} is not a replica of partition {p} but still holds {} records after handoff ({:?}...)",
                    self.at(),
                    self.nodes[i].name,
                    part.log.len(),
                    &part.log[..part.log.len().min(5)]
                );
                assert!(
                    part.vv.is_empty(),
                    "{}: I6: {} handed partition {p} off but its version vector still lists origins: {:?}",
                    self.at(),
                    self.nodes[i].name,
                    part.vv
                );
            }
        }
    }

    /// I6 at the moment node `i` hands `dropped` off: each record is still held durably by
    /// at least a quorum of nodes. The version vectors it relied on may be stale (a peer
    /// may have handed off since), but a handoff only relies on higher-ranked nodes, and
    /// with at most 5 nodes and R = 3 at least two of the three best-ranked nodes, which
    /// never hand off, are among them.
    fn check_still_held(&self, i: usize, p: u32, dropped: &[Id]) {
        let logs: Vec<BTreeSet<Id>> = self
            .nodes
            .iter()
            .map(|n| n.parts[p as usize].log.iter().copied().collect())
            .collect();
        let needed = self.needed();
        for id in dropped {
            let holders: Vec<&str> = logs
                .iter()
                .zip(&self.nodes)
                .filter(|(log, _)| log.contains(id))
                .map(|(_, n)| n.name.as_str())
                .collect();
            assert!(
                holders.len() >= needed,
                "{}: I6: {} handed {id:?} of partition {p} off, leaving it only on {holders:?}",
                self.at(),
                self.nodes[i].name
            );
        }
    }

    /// I3 on every node and partition: per origin, seqs start at 1 (nothing here deletes
    /// part of an origin: no retention, and handoff drops whole origins) and increase by
    /// one along the log (so no duplicates), and the last one is the version vector's
    /// entry; the version vector lists no origin the log lacks. So a version vector claims
    /// exactly the ids its node holds, at every moment, which digest comparison (I5) and
    /// digests counted as acks (I4) rely on.
    fn check_logs(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            for p in 0..self.partitions {
                let part = self.part(i, p);
                let mut last: BTreeMap<u64, u64> = BTreeMap::new();
                for &(o, s) in &part.log {
                    let prev = last.get(&o).copied().unwrap_or(0);
                    assert_eq!(
                        s,
                        prev + 1,
                        "{}: I3: {} partition {p}: origin {o} seq {s} follows {prev} in the log",
                        self.at(),
                        node.name
                    );
                    last.insert(o, s);
                }
                let held: Vv = last.into_iter().collect();
                assert_eq!(
                    part.vv,
                    held,
                    "{}: I3: {} partition {p}: the version vector claims other ids than the log holds (left: version vector, right: what the log holds)",
                    self.at(),
                    node.name
                );
            }
        }
    }
}

/// `Op::DropCovered` (storage writer): drops origins all or nothing. An origin goes when
/// the node's version vector entry is at most what `covered` says every replica holds:
/// all its records are deleted and its entry leaves the version vector, so the version
/// vector never claims ids the node does not hold. Origins not entirely covered keep all
/// their records. Returns the origins dropped and the records deleted; the caller moves
/// the node's own stream to a fresh origin when its current one was dropped.
fn drop_covered(part: &mut Replica, covered: &Vv) -> (Vec<u64>, Vec<Id>) {
    let gone: Vec<u64> = part
        .vv
        .iter()
        .filter(|&&(o, s)| s <= vv_get(covered, o))
        .map(|&(o, _)| o)
        .collect();
    if gone.is_empty() {
        return (gone, Vec::new());
    }
    let (dropped, kept): (Vec<Id>, Vec<Id>) =
        part.log.iter().partition(|&&(o, _)| gone.contains(&o));
    part.log = kept;
    part.vv.retain(|(o, _)| !gone.contains(o));
    (gone, dropped)
}

/// One random seed: draws the cluster and fault parameters, runs writes under faults,
/// then heals and checks.
fn run_seed(seed: u64) -> Stats {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let n = rng.between(3, 5) as usize;
    let partitions = rng.between(1, 2) as u32;
    let pending = (n >= 4 && rng.percent(30)).then_some(n - 1);
    let mut sim = Sim::new(seed, "random", n, partitions, pending);
    sim.ack_timeout = rng.between(15, 60);
    let every = rng.between(8, 30);
    let write_pct = rng.between(30, 70);
    let fault_pct = rng.between(2, 8);
    let fault_start = rng.between(10, 60);
    let fault_end = rng.between(250, 350);
    let faulty = Network {
        drop_pct: rng.between(0, 15),
        dup_pct: rng.between(0, 10),
        max_extra_delay: rng.between(0, 8),
    };
    for step in 0..fault_end {
        if step == fault_start {
            sim.net = faulty;
        }
        sim.step();
        if step >= fault_start && sim.rng.percent(fault_pct) {
            sim.random_fault();
        }
        if sim.rng.percent(write_pct) {
            sim.random_write();
        }
        if sim.now.is_multiple_of(every) {
            sim.anti_entropy();
            sim.check_logs();
        }
    }
    sim.check_logs();
    sim.heal_and_check();
    sim.stats
}

#[test]
fn random_seeds() {
    let seeds: Vec<u64> = match std::env::var("SHOAL_SIM_SEED") {
        Ok(s) => vec![s.trim().parse().expect("SHOAL_SIM_SEED is a u64")],
        Err(_) => (0..SEEDS).collect(),
    };
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    for &seed in &seeds {
        total.add(&run_seed(seed));
    }
    eprintln!(
        "{} seeds in {:?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    if seeds.len() > 1 {
        // The run must have exercised what it claims to check.
        assert!(total.acked > 1_000, "few writes acknowledged: {total:?}");
        assert!(total.timed_out > 0, "no write ever timed out: {total:?}");
        assert!(total.gap_resends > 0, "no gap was ever resent: {total:?}");
        assert!(total.handed_off > 0, "no handoff ever happened: {total:?}");
        assert!(
            total.fresh_origins > 0,
            "no handoff ever dropped a node's own stream: {total:?}"
        );
        assert!(
            total.digest_acks > 0,
            "no write was ever acknowledged by a digest: {total:?}"
        );
        assert!(total.crashes > 0 && total.joins > 0, "{total:?}");
    }
}

/// The index of the replica of rank `rank` of partition `p` over all of `sim`'s nodes.
fn ranked(sim: &Sim, p: u32, rank: usize) -> usize {
    let all: Vec<usize> = (0..sim.nodes.len()).collect();
    sim.replicas_of(&all, p)[rank]
}

/// Isolate the coordinator's peers while it streams, then heal: writes the coordinator
/// had sent lose their frames and wait; once healed, anti-entropy pushes them and they are
/// acknowledged. Writes made while it saw no peer (its view had it as the only replica)
/// can never meet the quorum among that replica set, so they are not acknowledged, but
/// they are still replicated.
#[test]
fn isolated_peers_mid_stream_then_heal() {
    let mut sim = Sim::new(1, "isolate peers mid-stream", 3, 1, None);
    let coordinator = ranked(&sim, 0, 0);
    let peers: Vec<usize> = (0..3).filter(|&i| i != coordinator).collect();
    let origin = sim.nodes[coordinator].origins[0];
    let acked = |sim: &Sim, seqs: std::ops::RangeInclusive<u64>| {
        seqs.filter(|&s| sim.acked.contains(&(0, (origin, s))))
            .count()
    };

    for _ in 0..5 {
        sim.write(coordinator, 0);
    }
    sim.run(3);
    assert_eq!(acked(&sim, 1..=5), 5, "{}: steady state acks", sim.at());

    // Mid-stream: frames of 6..=8 are in flight when the peers are isolated.
    for _ in 0..3 {
        sim.write(coordinator, 0);
    }
    for &p in &peers {
        sim.isolate(p);
    }
    for _ in 0..3 {
        sim.write(coordinator, 0);
    }
    sim.run(10);
    sim.anti_entropy();
    sim.drain();
    assert_eq!(
        acked(&sim, 6..=11),
        0,
        "{}: I4: acknowledged without a quorum",
        sim.at()
    );
    for &p in &peers {
        assert_eq!(
            vv_get(&sim.part(p, 0).vv, origin),
            5,
            "{}: isolated peers got nothing",
            sim.at()
        );
    }

    for &p in &peers {
        sim.unisolate(p);
    }
    sim.drain();
    assert_eq!(
        acked(&sim, 6..=8),
        3,
        "{}: the heal's digest exchange pushes 6..=8 and their acks release the waiters",
        sim.at()
    );
    assert_eq!(
        acked(&sim, 9..=11),
        0,
        "{}: I4: writes made while the coordinator was alone were placed on it only",
        sim.at()
    );
    sim.heal_and_check();
}

/// Crash a replica right after it acknowledged, write on, restart it: the crash loses no
/// acknowledged write (it was durable), the remaining replicas keep acknowledging, and the
/// restarted replica catches up by anti-entropy. Then crash the coordinator while a write
/// waits: that write is never acknowledged, yet it is replicated after the restart.
#[test]
fn crash_replica_after_ack_then_restart() {
    let mut sim = Sim::new(2, "crash a replica after it acked", 3, 1, None);
    let coordinator = ranked(&sim, 0, 0);
    let replica = ranked(&sim, 0, 1);
    let other = ranked(&sim, 0, 2);
    let origin = sim.nodes[coordinator].origins[0];

    for _ in 0..5 {
        sim.write(coordinator, 0);
    }
    sim.drain();
    assert_eq!(sim.acked.len(), 5, "{}", sim.at());
    sim.crash(replica);
    assert_eq!(
        vv_get(&sim.part(replica, 0).vv, origin),
        5,
        "{}: a crash keeps the durable log",
        sim.at()
    );

    for _ in 0..5 {
        sim.write(coordinator, 0);
    }
    sim.drain();
    assert_eq!(
        sim.acked.len(),
        10,
        "{}: coordinator and the other replica are a quorum",
        sim.at()
    );

    sim.restart(replica);
    sim.drain();
    assert_eq!(
        sim.part(replica, 0).vv,
        sim.part(coordinator, 0).vv,
        "{}: I5: the restarted replica caught up on reconnect",
        sim.at()
    );

    // The coordinator crashes while a write waits (its only peer able to ack is cut off).
    sim.cut(coordinator, replica);
    sim.cut(coordinator, other);
    let (_, seq) = sim.write(coordinator, 0);
    sim.crash(coordinator);
    sim.heal_link(coordinator, replica);
    sim.heal_link(coordinator, other);
    sim.restart(coordinator);
    sim.drain();
    assert!(
        !sim.acked.contains(&(0, (origin, seq))),
        "{}: I4: a waiter lost in a crash is never acknowledged",
        sim.at()
    );
    sim.heal_and_check();
}

/// Writes to n0..n3, then the partition's best-ranked node joins: it displaces one
/// replica, which must hand its copy off (delete it, I6) only once every new replica
/// holds it, and the newcomer ends with everything (I5). The displaced node hands off every
/// origin whole, its own included, so it moves to a fresh origin. Returns the simulation,
/// the joiner and the displaced node.
fn join_and_hand_off() -> (Sim, usize, usize) {
    let probe = Sim::new(3, "join", 5, 1, None);
    let joiner = ranked(&probe, 0, 0);
    let old: Vec<usize> = {
        let four: Vec<usize> = (0..5).filter(|&i| i != joiner).collect();
        probe.replicas_of(&four, 0)
    };
    let new: Vec<usize> = (0..3).map(|r| ranked(&probe, 0, r)).collect();
    let displaced: Vec<usize> = old.iter().copied().filter(|o| !new.contains(o)).collect();
    assert_eq!(
        displaced.len(),
        1,
        "I2: a join displaces exactly one replica"
    );
    let displaced = displaced[0];

    let mut sim = Sim::new(3, "join moves a partition", 5, 1, Some(joiner));
    for i in (0..5).filter(|&i| i != joiner) {
        for _ in 0..4 {
            sim.write(i, 0);
        }
    }
    sim.drain();
    sim.anti_entropy();
    sim.drain();
    assert_eq!(sim.acked.len(), 16, "{}", sim.at());
    assert_eq!(
        sim.part(displaced, 0).log.len(),
        16,
        "{}: the displaced node replicated everything before the join",
        sim.at()
    );

    let first = sim.nodes[displaced].origins[0];
    sim.join(joiner);
    // Before the newcomer is known to hold everything, nothing is deleted.
    assert_eq!(
        sim.part(displaced, 0).log.len(),
        16,
        "{}: I6: handoff before the new replica holds the data",
        sim.at()
    );
    sim.drain();
    for _ in 0..3 {
        sim.anti_entropy();
        sim.drain();
    }
    let all = sim.members();
    sim.check_converged(&all, "after the join");
    sim.check_handed_off(&all);
    sim.check_logs();
    assert_eq!(
        sim.part(displaced, 0).vv,
        Vv::new(),
        "{}: I6: the displaced node handed off every origin, its own included",
        sim.at()
    );
    let current = sim.nodes[displaced].origins[0];
    assert!(
        current != first && sim.nodes[displaced].is_own(first),
        "{}: the displaced node's own stream was handed off, so it writes under a fresh origin and still owns the old one",
        sim.at()
    );
    (sim, joiner, displaced)
}

#[test]
fn join_moves_partition_and_old_holder_hands_off() {
    let (mut sim, _, _) = join_and_hand_off();
    sim.heal_and_check();
}

/// Regression test for a protocol bug this simulation found. The displaced node handed
/// off every origin, its own included (`Op::DropCovered` drops origins all or nothing), so
/// its version vector is empty and what it coordinates next goes under a fresh origin.
/// When the partition moves back to it (here the newcomer goes down), its digest differs
/// from the replicas', so anti-entropy pushes it everything, its old own stream included,
/// and it converges (I5). Before the fix it kept its own origin's entry without the
/// records: its digest equalled the others' and it never got them back, a replica lacking
/// acknowledged writes while I5's digests said it was in sync (likewise for an origin
/// dropped only in part).
#[test]
fn partition_moving_back_after_handoff_regains_everything() {
    let (mut sim, joiner, displaced) = join_and_hand_off();
    // A hint written after the handoff goes under the fresh origin, from seq 1, and is
    // acknowledged by the replicas.
    let fresh = sim.nodes[displaced].origins[0];
    let id = sim.write(displaced, 0);
    assert_eq!(id, (fresh, 1), "{}: a fresh origin starts at 1", sim.at());
    sim.drain();
    assert!(
        sim.acked.contains(&(0, id)),
        "{}: hint acknowledged",
        sim.at()
    );

    sim.crash(joiner);
    sim.drain();
    for _ in 0..3 {
        sim.anti_entropy();
        sim.drain();
    }
    let live: Vec<usize> = (0..5).filter(|&i| i != joiner).collect();
    assert!(
        sim.replicas_of(&live, 0).contains(&displaced),
        "{}: the partition moved back to the displaced node",
        sim.at()
    );
    sim.check_converged(&live, "after the partition moved back");
    sim.check_logs();
    // And forth again: the newcomer restarts, the displaced node hands off once more.
    sim.heal_and_check();
}

/// Regression test for a liveness gap this simulation found: replicas store a write and
/// their `Ack`s are lost with the connection (a cut, a reset). Once reconnected, the
/// digest exchange shows the replicas lack nothing, so nothing is pushed and no `Ack` is
/// sent again; but a digest reports its node's durable version vector, and
/// `Shared::on_digest` counts each entry as that peer's ack, so the reconnect's digest
/// exchange releases the waiter. Before the fix the write was never acknowledged although
/// every replica held it durably (and the client would publish it again, a duplicate).
#[test]
fn acks_lost_with_a_connection_are_recovered() {
    let mut sim = Sim::new(5, "acks lost with a connection", 3, 1, None);
    let coordinator = ranked(&sim, 0, 0);
    let peers: Vec<usize> = (0..3).filter(|&i| i != coordinator).collect();
    let id = sim.write(coordinator, 0);
    sim.step(); // the replicas stored it; their acks are in flight
    let holders = (0..3).filter(|&i| sim.part(i, 0).log.contains(&id)).count();
    assert_eq!(holders, 3, "{}: every replica holds the write", sim.at());
    for &p in &peers {
        sim.cut(coordinator, p);
    }
    sim.drain();
    assert!(
        !sim.acked.contains(&(0, id)),
        "{}: the acks were lost with the connections",
        sim.at()
    );
    for &p in &peers {
        sim.heal_link(coordinator, p);
    }
    sim.drain();
    assert!(
        sim.acked.contains(&(0, id)),
        "{}: I4: write {id:?} is durable on all {holders} replicas but the reconnect's digest exchange did not acknowledge it",
        sim.at()
    );
    assert_eq!(
        sim.stats.digest_acks,
        1,
        "{}: released by a digest",
        sim.at()
    );
    sim.heal_and_check();
}
