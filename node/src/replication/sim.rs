//! Deterministic, seeded simulation of the replication protocol over several nodes
//! (PROTOCOL.md I3-I6), with plain data structures: no async, no sockets, no clock.
//!
//! What is simulated, per seed:
//! - 3 to 5 nodes, one topic with 1 or 2 partitions, replication factor 3, acks policy
//!   `quorum` (`required(Acks::Quorum, min(R, members))`, as `View::required` computes it).
//!   Sometimes one node joins the cluster late, so partitions move to it.
//! - Durable state per node and partition: the log (record ids `(origin, seq)` in append
//!   order) and the version vector; each node has its own origin. Volatile state: the
//!   [`AckTracker`] of pending client writes, the peers' version vectors last heard, and the
//!   per-connection "gap already answered" bookkeeping. A crash loses the volatile state
//!   and every message in flight to or from the node; a restart keeps the durable state.
//! - Membership: a node's view is itself plus the nodes that are up and reachable from it;
//!   it changes at once when a fault changes. Placement is [`placement::replicas`] over the
//!   view. A view change does what the supervisor in `replication/mod.rs` does: forget the
//!   peers that left (acks, version vectors, gap bookkeeping), compare digests with new
//!   peers (`round_for`), and run an anti-entropy round.
//! - The drivers' decisions, reusing the sans-IO core (`accept`, `lacks`, `missing`,
//!   `handoff_covered`, `AckTracker`): a client write makes its node the coordinator, which
//!   appends `(own origin, vv[own] + 1)` to its own log (a hint when it is not a replica),
//!   streams it to the other replicas of its view and waits for a quorum of durable copies
//!   among those replicas. A receiver stores an `Append` through `accept` (what the storage
//!   writer does for `Op::Replicate`) and answers per origin `Ack { vv[origin] }`, or
//!   `Gap { have }` on a gap; the sender then resends that origin's records after `have`
//!   from its log. Anti-entropy rounds send digests to the replicas of each partition a node
//!   replicates or holds; a receiver remembers the peer's version vector, replies with its
//!   own digest and pushes what the peer lacks when the peer is a replica in its view. A
//!   node holding a partition it does not replicate deletes what `handoff_covered` says
//!   every replica holds (`Op::DropCovered`, which also forgets emptied origins but its own).
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
//!   in increasing, contiguous order, without duplicates, and end at the version vector's
//!   entry.
//! - I6 after further rounds: nodes that are not replicas hold no records of the partition,
//!   and their version vector keeps at most their own origin.
//!
//! [`random_seeds`] runs many seeds; a failing seed is named in the assertion message and is
//! re-run alone with
//! `SHOAL_SIM_SEED=<seed> cargo test -p shoal --lib replication::sim::random_seeds`.
//! The focused tests below replay hand-written fault scripts. Two of them are `#[ignore]`d:
//! they reproduce protocol problems this simulation found (a replica that handed its own
//! records off and becomes a replica again never gets them back; acks lost with a
//! connection are never sent again) and pass once those are fixed
//! (`cargo test -p shoal --lib replication::sim -- --ignored`).

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
    origin: u64,
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
                    origin,
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
            Msg::Ack { origin, seq } => self.on_ack(to, from, p, origin, seq),
            Msg::Gap { origin, have } => self.on_gap(to, from, p, origin, have),
            Msg::Digest { vv, is_reply } => self.on_digest(to, from, p, vv, is_reply),
        }
    }

    // --- Coordinator and client ---------------------------------------------------------

    /// A client writes to node `i`, which coordinates: it stores the record (in the
    /// partition log, or as a hint when not a replica), streams it to the other replicas
    /// of its view and waits for the acks policy (`Replication::wait`). Returns the seq.
    fn write(&mut self, i: usize, p: u32) -> u64 {
        assert!(
            self.nodes[i].up,
            "{}: write to a node that is down",
            self.at()
        );
        let origin = self.nodes[i].origin;
        let part = &mut self.nodes[i].parts[p as usize];
        let seq = vv_get(&part.vv, origin) + 1;
        vv_set(&mut part.vv, origin, seq);
        part.log.push((origin, seq));
        self.written.insert((p, (origin, seq)));
        self.stats.writes += 1;

        let replicas = self.replicas_of(&self.nodes[i].view.clone(), p);
        for &r in replicas.iter().filter(|&&r| r != i) {
            self.send(
                i,
                r,
                p,
                Msg::Append {
                    records: vec![(origin, seq)],
                },
            );
        }
        let needed = self.needed();
        let names: Vec<String> = replicas
            .iter()
            .map(|&r| self.nodes[r].name.clone())
            .collect();
        let key = (TOPIC.to_string(), p, origin);
        let waiter = Waiter {
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
        seq
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
        let id = (self.nodes[coordinator].origin, w.seq);
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
    /// after the commit, each origin of the frame is answered with `Ack` or `Gap`.
    fn on_append(&mut self, at: usize, from: usize, p: u32, records: Vec<Id>) {
        let part = &mut self.nodes[at].parts[p as usize];
        let mut origins: Vec<u64> = Vec::new();
        let mut gaps: Vec<u64> = Vec::new();
        for (origin, seq) in records {
            if !origins.contains(&origin) {
                origins.push(origin);
            }
            match accept(&mut part.vv, origin, seq) {
                Accept::Store => part.log.push((origin, seq)),
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
    }

    /// `from` holds `origin` of partition `p` durably up to `seq` (`Shared::on_ack`).
    fn on_ack(&mut self, at: usize, from: usize, p: u32, origin: u64, seq: u64) {
        if origin != self.nodes[at].origin {
            return;
        }
        let key = (TOPIC.to_string(), p, origin);
        let name = self.nodes[from].name.clone();
        let done = self.nodes[at].acks.on_durable(&key, &name, seq);
        for w in done {
            self.acknowledge(at, p, w);
        }
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

    /// A digest: a request is answered with this node's digest; either way the peer's
    /// version vector is remembered, and what it lacks is pushed when it is a replica in
    /// this node's view (`Shared::on_digest`).
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
    /// not replicate, as far as every replica is known to cover it (I6).
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
                    let own = node.origin;
                    let dropped = drop_covered(&mut node.parts[p as usize], &covered, own);
                    self.stats.handed_off += dropped.len() as u64;
                    self.check_still_held(i, p, &dropped);
                }
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
    /// partition, and only their own origin stays in their version vector.
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
                    part.vv.iter().all(|&(o, _)| o == self.nodes[i].origin),
                    "{}: I6: {} handed partition {p} off but its version vector still lists other origins: {:?}",
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

    /// I3 on every node and partition: per origin, seqs increase by one along the log
    /// (so no duplicates), and the last one is the version vector's entry.
    fn check_logs(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            for p in 0..self.partitions {
                let part = self.part(i, p);
                let mut last: BTreeMap<u64, u64> = BTreeMap::new();
                for &(o, s) in &part.log {
                    if let Some(&prev) = last.get(&o) {
                        assert_eq!(
                            s,
                            prev + 1,
                            "{}: I3: {} partition {p}: origin {o} seq {s} follows {prev} in the log",
                            self.at(),
                            node.name
                        );
                    }
                    last.insert(o, s);
                }
                for (o, s) in last {
                    assert_eq!(
                        vv_get(&part.vv, o),
                        s,
                        "{}: I3: {} partition {p}: the log of origin {o} ends at {s}, its version vector says otherwise",
                        self.at(),
                        node.name
                    );
                }
            }
        }
    }
}

/// `Op::DropCovered` (storage writer): deletes the records `covered` includes; when
/// something was deleted, origins left without records leave the version vector, except
/// the node's own (its seqs must keep increasing). Returns what was deleted.
fn drop_covered(part: &mut Replica, covered: &Vv, own: u64) -> Vec<Id> {
    let (dropped, kept): (Vec<Id>, Vec<Id>) = part
        .log
        .iter()
        .partition(|&&(o, s)| s <= vv_get(covered, o));
    part.log = kept;
    if !dropped.is_empty() {
        let remaining: BTreeSet<u64> = part.log.iter().map(|&(o, _)| o).collect();
        part.vv.retain(|(o, _)| *o == own || remaining.contains(o));
    }
    dropped
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
    let origin = sim.nodes[coordinator].origin;
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
    let origin = sim.nodes[coordinator].origin;

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
    let seq = sim.write(coordinator, 0);
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
/// holds it, and the newcomer ends with everything (I5). Returns the simulation, the
/// joiner and the displaced node.
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
        vec![(sim.nodes[displaced].origin, 4)],
        "{}: I6: the displaced node keeps only its own origin's high-water mark",
        sim.at()
    );
    (sim, joiner, displaced)
}

#[test]
fn join_moves_partition_and_old_holder_hands_off() {
    let (mut sim, _, _) = join_and_hand_off();
    sim.heal_and_check();
}

/// PROTOCOL BUG (found by this simulation; see the report): after a handoff, the old
/// holder keeps its own origin's entry in its version vector (`Op::DropCovered` must, so
/// its seqs keep increasing) although it deleted those records. When the partition moves
/// back to it (here the newcomer goes down for good), its digest equals the others', so
/// anti-entropy never sends back its own records: it is a replica that lacks acknowledged
/// writes while I5's digests say it is in sync. The same happens for any origin a handoff
/// dropped only partly (`covered[o] < vv[o]`).
#[test]
#[ignore = "protocol bug: a replica that handed its own records off never gets them back (I5 digest claims them)"]
fn partition_moving_back_after_handoff_regains_everything() {
    let (mut sim, joiner, _displaced) = join_and_hand_off();
    sim.crash(joiner);
    sim.drain();
    for _ in 0..3 {
        sim.anti_entropy();
        sim.drain();
    }
    let live: Vec<usize> = (0..5).filter(|&i| i != joiner).collect();
    sim.check_converged(&live, "after the partition moved back");
}

/// LIVENESS GAP (found by this simulation; see the report): replicas store a write and
/// their `Ack`s are lost with the connection (a cut, a reset). Once reconnected, the digest
/// exchange shows the replicas lack nothing, so nothing is pushed and no `Ack` is sent
/// again: the coordinator's waiter is never released although every replica holds the
/// write durably, and the client gets no ack (and will publish it again, a duplicate).
/// A peer's digest reports its committed version vector, so it could count as an ack of
/// the coordinator's origin.
#[test]
#[ignore = "liveness gap: acks lost with a connection are never sent again, the write is never acknowledged"]
fn acks_lost_with_a_connection_are_recovered() {
    let mut sim = Sim::new(5, "acks lost with a connection", 3, 1, None);
    let coordinator = ranked(&sim, 0, 0);
    let peers: Vec<usize> = (0..3).filter(|&i| i != coordinator).collect();
    let seq = sim.write(coordinator, 0);
    sim.step(); // the replicas stored it; their acks are in flight
    for &p in &peers {
        sim.cut(coordinator, p);
    }
    for &p in &peers {
        sim.heal_link(coordinator, p);
    }
    sim.drain();
    for _ in 0..3 {
        sim.anti_entropy();
        sim.drain();
    }
    let id = (sim.nodes[coordinator].origin, seq);
    let holders = (0..3).filter(|&i| sim.part(i, 0).log.contains(&id)).count();
    assert_eq!(holders, 3, "{}: every replica holds the write", sim.at());
    assert!(
        sim.acked.contains(&(0, id)),
        "{}: I4: write {id:?} is durable on all {holders} replicas but never acknowledged",
        sim.at()
    );
}
