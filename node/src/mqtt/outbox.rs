//! The sans-IO core of delivery to one subscriber session: given committed log records (live
//! or read back from the log), the session's subscriptions and its acks, decide which
//! PUBLISH packets to send and how far the session has been served.
//!
//! Invariants:
//! - per log partition, records are delivered in offset order; `cursor` is the next offset
//!   to consider, so anything below it is skipped (live feed and catch-up reads may overlap);
//! - a record past the cursor means something was missed (the live feed lagged, or the
//!   session was offline): the partition is marked for catch-up from the log, never skipped;
//! - the acknowledged floor of a partition (lowest offset still in flight, else the cursor)
//!   is what a persistent session stores, so a restart resends everything not acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubRel, Publish};

use super::topic::matches;
use crate::storage::{Committed, RetainedMessage};

/// A log partition: (topic, partition index).
pub type PartKey = (Arc<str>, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutState {
    /// QoS 1: waiting for PUBACK. QoS 2: waiting for PUBREC.
    Sent,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Clone, Debug)]
struct Inflight {
    pos: Option<(PartKey, u64)>,
    state: OutState,
}

/// Delivery state of one session.
#[derive(Debug)]
pub struct Outbox {
    subs: Vec<(String, QoS)>,
    cursors: HashMap<PartKey, u64>,
    inflight: BTreeMap<u16, Inflight>,
    inflight_offsets: HashMap<PartKey, BTreeSet<u64>>,
    pending: VecDeque<Committed>,
    retained: VecDeque<Publish>,
    /// Publishes of partitions this node does not replicate, relayed live by their
    /// coordinator: sent as they come, never read back from a log (see `offer_remote`).
    direct: VecDeque<Publish>,
    catch_up: BTreeSet<PartKey>,
    next_pkid: u16,
    max_inflight: usize,
    max_pending: usize,
    dirty: bool,
}

/// Most live records buffered while the in-flight window is full; past it, records are
/// dropped from memory and read back from the log later.
pub const MAX_PENDING: usize = 4096;

/// Most subscriptions one session may hold (a SUBSCRIBE beyond it gets 0x80).
pub const MAX_SUBSCRIPTIONS: usize = 1000;

fn qos_num(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// QoS from its number, saturating at 2.
pub fn qos_from(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    qos_from(qos_num(a).min(qos_num(b)))
}

impl Outbox {
    pub fn new(max_inflight: usize) -> Outbox {
        Outbox {
            subs: Vec::new(),
            cursors: HashMap::new(),
            inflight: BTreeMap::new(),
            inflight_offsets: HashMap::new(),
            pending: VecDeque::new(),
            retained: VecDeque::new(),
            direct: VecDeque::new(),
            catch_up: BTreeSet::new(),
            next_pkid: 0,
            max_inflight: max_inflight.max(1),
            max_pending: MAX_PENDING,
            dirty: false,
        }
    }

    /// Restores a persistent session: its subscriptions and acknowledged cursors. Every
    /// partition is then read again from its cursor.
    pub fn restore(&mut self, subs: Vec<(String, QoS)>, cursors: Vec<(String, u32, u64)>) {
        self.subs = subs;
        for (t, p, off) in cursors {
            let key: PartKey = (Arc::from(t.as_str()), p);
            self.catch_up.insert(key.clone());
            self.cursors.insert(key, off);
        }
    }

    pub fn subscriptions(&self) -> &[(String, QoS)] {
        &self.subs
    }

    pub fn has_subscriptions(&self) -> bool {
        !self.subs.is_empty()
    }

    /// Whether `filter` can be added (it is already there, or there is room).
    pub fn can_subscribe(&self, filter: &str) -> bool {
        self.subs.len() < MAX_SUBSCRIPTIONS || self.subs.iter().any(|(f, _)| f == filter)
    }

    /// Adds or replaces a subscription. `ends` are the current log ends of every partition;
    /// partitions without a cursor start there, so a new subscriber gets only new records.
    pub fn subscribe(&mut self, filter: String, qos: QoS, ends: &[(PartKey, u64)]) {
        if self.subs.is_empty() {
            self.cursors.clear();
            self.catch_up.clear();
            self.pending.clear();
        }
        match self.subs.iter_mut().find(|(f, _)| *f == filter) {
            Some(s) => s.1 = qos,
            None => self.subs.push((filter, qos)),
        }
        for (key, end) in ends {
            self.cursors.entry(key.clone()).or_insert(*end);
        }
        self.dirty = true;
    }

    pub fn unsubscribe(&mut self, filter: &str) {
        self.subs.retain(|(f, _)| f != filter);
        if self.subs.is_empty() {
            self.cursors.clear();
            self.catch_up.clear();
            self.pending.clear();
        }
        self.dirty = true;
    }

    /// Offers a committed record (live or from a catch-up read).
    pub fn offer(&mut self, c: Committed) {
        if self.subs.is_empty() {
            return;
        }
        if self.pending.len() >= self.max_pending {
            self.catch_up.insert((c.topic.clone(), c.partition.0));
            return;
        }
        self.pending.push_back(c);
    }

    /// A record of a partition this node does not hold, relayed live by the node that took
    /// it. There is no local log to resume from, so it is delivered while the session is
    /// connected only (the oldest are dropped past `MAX_PENDING`).
    pub fn offer_remote(&mut self, subject: &str, payload: bytes::Bytes, record_qos: u8) {
        let Some(granted) = self.best_qos(subject) else {
            return;
        };
        let qos = min_qos(qos_from(record_qos), granted);
        if self.direct.len() >= self.max_pending {
            self.direct.pop_front();
        }
        self.direct
            .push_back(Publish::from_bytes(subject.to_string(), qos, payload));
    }

    /// The live feed lost records: read every known partition again from its cursor.
    pub fn lagged(&mut self) {
        self.pending.clear();
        let keys: Vec<PartKey> = self.cursors.keys().cloned().collect();
        self.catch_up.extend(keys);
    }

    /// Queues a retained message matched by a new subscription. One queued entry per topic
    /// (a repeated SUBSCRIBE replaces it) and at most `MAX_PENDING` in all, so a client
    /// that subscribes again and again without acking cannot grow the queue.
    pub fn offer_retained(&mut self, m: &RetainedMessage, granted: QoS) {
        let qos = min_qos(qos_from(m.qos), granted);
        let mut p = Publish::from_bytes(m.topic.clone(), qos, m.payload.clone());
        p.retain = true;
        if let Some(q) = self.retained.iter_mut().find(|q| q.topic == p.topic) {
            *q = p;
            return;
        }
        if self.retained.len() >= self.max_pending {
            self.retained.pop_front();
        }
        self.retained.push_back(p);
    }

    fn window_open(&self) -> bool {
        self.inflight.len() < self.max_inflight
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn best_qos(&self, subject: &str) -> Option<QoS> {
        self.subs
            .iter()
            .filter(|(f, _)| matches(f, subject))
            .map(|(_, q)| *q)
            .max_by_key(|q| qos_num(*q))
    }

    /// Sends from a queue of ready packets (retained or relayed: no log position) while the
    /// window allows; `false` when the window closed.
    fn drain_ready(&mut self, retained: bool, out: &mut Vec<Packet>) -> bool {
        loop {
            let queue = if retained {
                &mut self.retained
            } else {
                &mut self.direct
            };
            let Some(p) = queue.front() else {
                return true;
            };
            if p.qos != QoS::AtMostOnce && self.inflight.len() >= self.max_inflight {
                return false;
            }
            let Some(mut p) = queue.pop_front() else {
                return true;
            };
            if p.qos != QoS::AtMostOnce {
                p.pkid = self.alloc_pkid();
                self.inflight.insert(
                    p.pkid,
                    Inflight {
                        pos: None,
                        state: OutState::Sent,
                    },
                );
            }
            out.push(Packet::Publish(p));
        }
    }

    /// Packets to send now, as far as the in-flight window allows.
    pub fn poll_send(&mut self, out: &mut Vec<Packet>) {
        if !self.drain_ready(true, out) || !self.drain_ready(false, out) {
            return;
        }
        while let Some(c) = self.pending.front() {
            let key: PartKey = (c.topic.clone(), c.partition.0);
            // A partition never seen belongs to a topic created after the subscription: it
            // is read from its start.
            let cursor = *self.cursors.entry(key.clone()).or_insert(0);
            if c.offset.0 < cursor {
                self.pending.pop_front();
                continue;
            }
            if c.offset.0 > cursor {
                self.catch_up.insert(key);
                self.pending.pop_front();
                continue;
            }
            let Some(granted) = self.best_qos(&c.record.subject) else {
                self.cursors.insert(key, cursor + 1);
                self.dirty = true;
                self.pending.pop_front();
                continue;
            };
            let qos = min_qos(qos_from(c.record.mqtt_qos()), granted);
            if qos != QoS::AtMostOnce && !self.window_open() {
                return;
            }
            let Some(c) = self.pending.pop_front() else {
                break;
            };
            let mut p =
                Publish::from_bytes(c.record.subject.clone(), qos, c.record.payload.clone());
            if qos != QoS::AtMostOnce {
                p.pkid = self.alloc_pkid();
                self.inflight_offsets
                    .entry(key.clone())
                    .or_default()
                    .insert(c.offset.0);
                self.inflight.insert(
                    p.pkid,
                    Inflight {
                        pos: Some((key.clone(), c.offset.0)),
                        state: OutState::Sent,
                    },
                );
            }
            self.cursors.insert(key, cursor + 1);
            self.dirty = true;
            out.push(Packet::Publish(p));
        }
    }

    /// The next partition to read back from the log, and from which offset. Only asked for
    /// when nothing is buffered and the window has room, so reads never run ahead of sends.
    pub fn next_catch_up(&self) -> Option<(PartKey, u64)> {
        if !self.pending.is_empty() || !self.window_open() || self.subs.is_empty() {
            return None;
        }
        let key = self.catch_up.iter().next()?.clone();
        let from = self.cursors.get(&key).copied().unwrap_or(0);
        Some((key, from))
    }

    /// Result of a catch-up read: the records (in offset order) and whether the read reached
    /// the end of the log. The read starts at `from`, or at the log start if that is later
    /// (records lost to retention are skipped, as in Kafka).
    pub fn catch_up_read(
        &mut self,
        key: PartKey,
        log_start: u64,
        records: Vec<Committed>,
        at_end: bool,
    ) {
        if let Some(c) = self.cursors.get_mut(&key)
            && *c < log_start
        {
            *c = log_start;
            self.dirty = true;
        }
        if at_end {
            self.catch_up.remove(&key);
        }
        for r in records.into_iter().rev() {
            self.pending.push_front(r);
        }
    }

    fn release(&mut self, pkid: u16) -> bool {
        match self.inflight.remove(&pkid) {
            Some(f) => {
                if let Some((key, off)) = f.pos
                    && let Some(set) = self.inflight_offsets.get_mut(&key)
                {
                    set.remove(&off);
                }
                self.dirty = true;
                true
            }
            None => false,
        }
    }

    /// PUBACK from the client (QoS 1 delivery done).
    pub fn on_puback(&mut self, pkid: u16) -> bool {
        self.release(pkid)
    }

    /// PUBREC from the client: answer PUBREL.
    pub fn on_pubrec(&mut self, pkid: u16) -> Option<Packet> {
        let f = self.inflight.get_mut(&pkid)?;
        f.state = OutState::Released;
        Some(Packet::PubRel(PubRel::new(pkid)))
    }

    /// PUBCOMP from the client (QoS 2 delivery done).
    pub fn on_pubcomp(&mut self, pkid: u16) -> bool {
        matches!(self.inflight.get(&pkid), Some(f) if f.state == OutState::Released)
            && self.release(pkid)
    }

    /// Per partition, the lowest offset not yet acknowledged: what a persistent session
    /// stores.
    pub fn acked_cursors(&self) -> Vec<(String, u32, u64)> {
        let mut v: Vec<(String, u32, u64)> = self
            .cursors
            .iter()
            .map(|(key, cursor)| {
                let floor = self
                    .inflight_offsets
                    .get(key)
                    .and_then(|s| s.first().copied())
                    .map_or(*cursor, |f| f.min(*cursor));
                (key.0.to_string(), key.1, floor)
            })
            .collect();
        v.sort();
        v
    }

    /// Whether anything to persist changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::Record;
    use crate::storage::format::HEADER_MQTT_QOS;
    use crate::types::{Offset, Origin, PartitionId, RecordId, Seq};

    fn rec(p: u32, off: u64, subject: &str, qos: u8) -> Committed {
        Committed {
            topic: Arc::from("telemetry"),
            partition: PartitionId(p),
            offset: Offset(off),
            record: Arc::new(Record {
                id: RecordId {
                    origin: Origin(1),
                    seq: Seq(off + 1),
                },
                event_time_ms: 0,
                ingest_time_ms: 0,
                key: Bytes::new(),
                subject: subject.into(),
                payload: Bytes::from(format!("{off}")),
                headers: vec![(HEADER_MQTT_QOS.into(), Bytes::from(vec![qos]))],
            }),
        }
    }

    fn key(p: u32) -> PartKey {
        (Arc::from("telemetry"), p)
    }

    fn sent(o: &mut Outbox) -> Vec<(String, u16, u8)> {
        let mut out = Vec::new();
        o.poll_send(&mut out);
        out.into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.pkid,
                    qos_num(p.qos),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn delivers_matching_in_order_at_min_qos() {
        let mut o = Outbox::new(10);
        o.subscribe("a/#".into(), QoS::AtLeastOnce, &[(key(0), 5)]);
        o.offer(rec(0, 4, "a/x", 1)); // before the subscription: skipped
        o.offer(rec(0, 5, "a/x", 2));
        o.offer(rec(0, 6, "b/x", 1)); // not matching
        o.offer(rec(0, 7, "a/y", 0));
        assert_eq!(sent(&mut o), vec![("5".into(), 1, 1), ("7".into(), 0, 0)]);
        assert_eq!(o.acked_cursors(), vec![("telemetry".into(), 0, 5)]);
        assert!(o.on_puback(1));
        assert_eq!(o.acked_cursors(), vec![("telemetry".into(), 0, 8)]);
    }

    #[test]
    fn window_limits_inflight_and_gaps_trigger_catch_up() {
        let mut o = Outbox::new(2);
        o.subscribe("#".into(), QoS::AtLeastOnce, &[(key(0), 0)]);
        for off in 0..4 {
            o.offer(rec(0, off, "t", 1));
        }
        assert_eq!(sent(&mut o).len(), 2);
        assert!(o.next_catch_up().is_none(), "window full");
        assert!(o.on_puback(1));
        assert_eq!(sent(&mut o).len(), 1);
        assert!(o.on_puback(2));
        assert_eq!(sent(&mut o).len(), 1);
        // Offsets 0..=3 are sent; 2 and 3 are in flight. Offset 9 is past the cursor (4):
        // it is not delivered, the partition is read back from the log instead.
        o.offer(rec(0, 9, "t", 1));
        assert!(sent(&mut o).is_empty());
        assert!(o.next_catch_up().is_none(), "window full");
        assert!(o.on_puback(3));
        assert_eq!(o.next_catch_up(), Some((key(0), 4)));
        o.catch_up_read(
            key(0),
            0,
            (4..=9).map(|i| rec(0, i, "t", 1)).collect(),
            true,
        );
        let got: Vec<String> = sent(&mut o).into_iter().map(|s| s.0).collect();
        assert_eq!(got, vec!["4"]);
        assert_eq!(o.acked_cursors(), vec![("telemetry".into(), 0, 3)]);
        assert!(o.on_puback(4));
        assert!(o.on_puback(5));
        let got: Vec<String> = sent(&mut o).into_iter().map(|s| s.0).collect();
        assert_eq!(got, vec!["5", "6"]);
    }

    #[test]
    fn qos2_needs_rec_then_comp() {
        let mut o = Outbox::new(5);
        o.subscribe("#".into(), QoS::ExactlyOnce, &[(key(0), 0)]);
        o.offer(rec(0, 0, "t", 2));
        let s = sent(&mut o);
        assert_eq!(s, vec![("0".into(), 1, 2)]);
        assert!(!o.on_pubcomp(1), "PUBCOMP before PUBREC is ignored");
        assert!(matches!(o.on_pubrec(1), Some(Packet::PubRel(_))));
        assert!(o.on_pubcomp(1));
        assert_eq!(o.inflight_len(), 0);
    }

    #[test]
    fn restore_reads_back_from_acked_cursor() {
        let mut o = Outbox::new(5);
        o.restore(
            vec![("#".into(), QoS::AtLeastOnce)],
            vec![("telemetry".into(), 0, 3)],
        );
        assert_eq!(o.next_catch_up(), Some((key(0), 3)));
        // Retention moved the log start past the cursor.
        o.catch_up_read(key(0), 5, vec![rec(0, 5, "t", 1)], true);
        assert_eq!(sent(&mut o), vec![("5".into(), 1, 1)]);
        assert!(o.next_catch_up().is_none());
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_max_qos() {
        let mut o = Outbox::new(5);
        o.subscribe("a/+".into(), QoS::AtMostOnce, &[(key(0), 0)]);
        o.subscribe("a/#".into(), QoS::AtLeastOnce, &[]);
        o.offer(rec(0, 0, "a/b", 1));
        assert_eq!(sent(&mut o), vec![("0".into(), 1, 1)]);
    }

    #[test]
    fn topics_created_later_are_read_from_start() {
        let mut o = Outbox::new(5);
        o.subscribe("#".into(), QoS::AtMostOnce, &[]);
        o.offer(rec(3, 2, "x", 0));
        assert!(sent(&mut o).is_empty());
        assert_eq!(o.next_catch_up(), Some((key(3), 0)));
    }
}
